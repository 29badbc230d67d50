//! A whole base backup, as `pgha backup` and the agent's schedule take it:
//! [`base::take`] from the member chosen, the leader's current WAL segment
//! ended (a replica cannot end one), the wait until the backup's last
//! segment is archived, then retention. One code path for both, so that a
//! scheduled backup is exactly an operator's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::base::{self, BackupSource, Cancel, Manifest};
use super::repo::Repository;
use super::{BackupError, file, naming, retention};
use crate::config::Config;
use crate::config::backup::BackupConfig;
use crate::dcs::ClusterView;
use crate::model::{MemberName, MemberRecord, PgState};

/// How long a backup waits for its last segment to be archived.
const STOP_SEGMENT_TIMEOUT: Duration = Duration::from_secs(60);

/// A backup stored, restorable, and retention applied after it.
#[derive(Debug)]
pub struct Completed {
    pub manifest: Manifest,
    pub expired: retention::ExpireReport,
    /// From the start of the backup to its last segment archived
    /// (retention excluded).
    pub elapsed: Duration,
}

impl Completed {
    /// Uncompressed bytes.
    pub fn bytes(&self) -> u64 {
        self.manifest.files.iter().map(|f| f.size).sum()
    }
}

/// What went wrong, naming the step.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error("end the WAL segment on the leader {leader}")]
    EndSegment {
        leader: MemberName,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "backup {id} is stored, but {stop}, the last segment it needs, was not archived within {} s: check archive_command on the leader",
        STOP_SEGMENT_TIMEOUT.as_secs()
    )]
    NotArchived { id: String, stop: String },
    #[error("backup {id} is stored, but expiring old backups failed")]
    Expire {
        id: String,
        #[source]
        source: BackupError,
    },
    #[error("backup {id} is stored, but was cancelled while waiting for {stop} to be archived")]
    Cancelled { id: String, stop: String },
    #[error("read wal_segment_size from {member}")]
    SegmentSize {
        member: MemberName,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("the backup thread failed")]
    Thread(#[from] tokio::task::JoinError),
}

/// The streaming replica least behind the leader, which a backup reads
/// from when it should spare the primary; `None` when no replica streams.
pub fn least_lagging_replica<'a>(
    view: &'a ClusterView,
    leader: &MemberName,
) -> Option<&'a MemberRecord> {
    view.members
        .values()
        .filter(|m| &m.name != leader && m.state == PgState::Streaming)
        .min_by_key(|m| view.lag_of(m).unwrap_or(u64::MAX))
}

/// How [`take`] reports and can be stopped.
pub struct Options {
    /// Called with the bytes pg_basebackup has sent so far and the
    /// server's estimate of the total.
    pub progress: Box<dyn Fn(u64, u64) + Send + Sync>,
    pub cancel: Arc<Cancel>,
    /// See [`BackupSource::background`].
    pub background: bool,
}

/// Takes a base backup of `member` (the leader itself, or a replica of
/// `leader`) into `repo`, waits until the last segment it needs is
/// archived, then applies retention (`b.keep`): retention runs only once
/// the new backup is complete and restorable, so a failed backup never
/// costs an older one.
pub async fn take(
    cfg: &Config,
    b: &BackupConfig,
    repo: Arc<dyn Repository>,
    leader: &MemberRecord,
    member: &MemberRecord,
    opts: Options,
) -> Result<Completed, RunError> {
    let from_replica = member.name != leader.name;
    let started = Instant::now();
    // Chosen at initdb, the same on every member; asked of the source so
    // that a backup always records the size its WAL really has.
    let wal_segment_size =
        segment_size(cfg, member)
            .await
            .map_err(|source| RunError::SegmentSize {
                member: member.name.clone(),
                source,
            })?;
    let nudge = from_replica.then(|| {
        tokio::spawn(nudge_leader(
            cfg.clone(),
            (member.host.clone(), member.port),
            (leader.host.clone(), leader.port),
            wal_segment_size,
        ))
    });
    let stored = {
        let repo = repo.clone();
        let (host, port, name) = (member.host.clone(), member.port, member.name.to_string());
        let user = cfg.postgres.replication.username.clone();
        let bin_dir = cfg.postgres.bin_dir.clone();
        let passfile = cfg.passfile_path();
        let (level, parallel) = (b.compress_level, b.parallel);
        let (progress, cancel, background) = (opts.progress, opts.cancel.clone(), opts.background);
        tokio::task::spawn_blocking(move || {
            base::take(
                repo.as_ref(),
                &BackupSource {
                    member: name,
                    host,
                    port,
                    user,
                    bin_dir: &bin_dir,
                    passfile: &passfile,
                    level,
                    parallel,
                    progress: &progress,
                    cancel: Some(&cancel),
                    background,
                    wal_segment_size,
                },
            )
        })
        .await
    };
    if let Some(nudge) = nudge {
        nudge.abort();
    }
    let manifest = stored??;
    // A replica cannot end a WAL segment; until the leader does, the
    // segment holding the end of the backup is not archived and the
    // backup cannot be restored.
    let stop = base::stop_segment(&manifest);
    if from_replica {
        let end = async {
            connect(cfg, &leader.host, leader.port)
                .await?
                .batch_execute(END_SEGMENT)
                .await
        };
        end.await.map_err(|source| RunError::EndSegment {
            leader: leader.name.clone(),
            source,
        })?;
    }
    let deadline = Instant::now() + STOP_SEGMENT_TIMEOUT;
    loop {
        let done = {
            let (repo, manifest, stop) = (repo.clone(), manifest.clone(), stop.clone());
            tokio::task::spawn_blocking(move || -> Result<bool, BackupError> {
                Ok(!file::archived_copies(repo.as_ref(), &stop)?.is_empty()
                    || newer_timeline_has(repo.as_ref(), &manifest)?)
            })
            .await??
        };
        if done {
            break;
        }
        if opts.cancel.is_cancelled() {
            return Err(RunError::Cancelled {
                id: manifest.id,
                stop: stop.to_string(),
            });
        }
        if Instant::now() >= deadline {
            return Err(RunError::NotArchived {
                id: manifest.id,
                stop: stop.to_string(),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    let keep = b.keep;
    let expired = tokio::task::spawn_blocking(move || retention::expire(repo.as_ref(), keep))
        .await?
        .map_err(|source| RunError::Expire {
            id: manifest.id.clone(),
            source,
        })?;
    Ok(Completed {
        manifest,
        expired,
        elapsed,
    })
}

/// Ends the leader's current WAL segment. The restore point first: on an
/// idle leader whose insert position sits at a segment boundary,
/// `pg_switch_wal()` alone does nothing, and a replica closes (and marks
/// for archiving) a received segment only once it writes into the next.
const END_SEGMENT: &str = "SELECT pg_create_restore_point('pgha backup'); SELECT pg_switch_wal()";

/// The member's `wal_segment_size`, in bytes.
async fn segment_size(cfg: &Config, member: &MemberRecord) -> Result<u64, tokio_postgres::Error> {
    let client = connect(cfg, &member.host, member.port).await?;
    let row = client
        .query_one(
            "SELECT pg_size_bytes(current_setting('wal_segment_size'))",
            &[],
        )
        .await?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// A superuser session to a member's PostgreSQL.
async fn connect(
    cfg: &Config,
    host: &str,
    port: u16,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let pg = &cfg.postgres.superuser;
    let (client, conn) = tokio_postgres::Config::new()
        .host(host)
        .port(port)
        .user(&pg.username)
        .password(pg.password.expose())
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(5))
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(conn);
    Ok(client)
}

/// While a backup runs on a replica: with `archive_mode = always` the
/// replica's `pg_backup_stop` waits until the segment holding the end of
/// the backup is archived, and only the leader can end that segment. So
/// when the replica's backup is seen waiting for the archive
/// (`BackupWaitWalArchive`), the leader switches WAL segments (at most every
/// 2 s). Errors are ignored: the backup's own result says what went wrong.
async fn nudge_leader(cfg: Config, replica: (String, u16), leader: (String, u16), seg: u64) {
    let mut sessions = None;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if sessions.is_none() {
            let r = connect(&cfg, &replica.0, replica.1).await;
            let l = connect(&cfg, &leader.0, leader.1).await;
            if let (Ok(r), Ok(l)) = (r, l) {
                sessions = Some((r, l));
            }
        }
        let Some((r, l)) = &sessions else { continue };
        let waiting = r
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'BackupWaitWalArchive'",
                &[],
            )
            .await
            .map(|row| row.get::<_, i64>(0) > 0);
        // Only while the replica's position is still in the leader's
        // current segment: once that segment is complete, the replica just
        // has to archive it, and another switch would only add a segment
        // to its queue. Any failure (the leader restarted, say) starts
        // both sessions afresh: a broken leader session kept would leave
        // the replica's backup waiting for its segment forever.
        let nudged = match waiting {
            Ok(true) => match same_segment(r, l, seg).await {
                Ok(true) => l.batch_execute(END_SEGMENT).await.map(|()| true),
                Ok(false) => Ok(false),
                Err(_) => {
                    sessions = None;
                    continue;
                }
            },
            Ok(false) => Ok(false),
            Err(e) => Err(e),
        };
        match nudged {
            Ok(true) => tokio::time::sleep(Duration::from_secs(2)).await,
            Ok(false) => {}
            Err(_) => sessions = None,
        }
    }
}

/// Whether ending the leader's segment would help the replica's backup:
/// the replica's replay position is in the leader's current segment (so
/// that segment is what it waits for) and its archiver has caught up with
/// every segment before it (otherwise it is still working through its
/// queue, and a switch would only lengthen it).
async fn same_segment(
    replica: &tokio_postgres::Client,
    leader: &tokio_postgres::Client,
    seg: u64,
) -> anyhow::Result<bool> {
    let row = replica
        .query_one(
            "SELECT pg_last_wal_replay_lsn()::text, coalesce(last_archived_wal, '') FROM pg_stat_archiver",
            &[],
        )
        .await?;
    let replay: crate::model::Lsn = row.get::<_, String>(0).parse()?;
    let archived = naming::WalName::parse(&row.get::<_, String>(1)).and_then(|w| w.segno(seg));
    let replay_seg = naming::segno_of(replay, seg);
    if archived.is_some_and(|a| a + 1 < replay_seg) {
        return Ok(false);
    }
    let l: crate::model::Lsn = leader
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get::<_, String>(0)
        .parse()?;
    Ok(replay_seg == naming::segno_of(l, seg))
}

/// Whether a timeline after the backup's already has a history file: then
/// the backup's last segment lives on as that timeline's copy.
fn newer_timeline_has(repo: &dyn Repository, m: &Manifest) -> Result<bool, BackupError> {
    for dir in repo.list("archive")? {
        if u32::from_str_radix(&dir, 16).is_ok_and(|tl| tl > m.timeline) {
            return Ok(true);
        }
    }
    Ok(false)
}
