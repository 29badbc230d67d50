//! `pgha backup`, `pgha backup list`, `pgha backup verify` and
//! `pgha restore`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};

use super::UsageError;
use crate::backup::base::{self, BackupSource, Manifest};
use crate::backup::repo::Repository;
use crate::backup::{OpenError, file, naming, open_repository, restore, retention};
use crate::config::Config;
use crate::config::backup::{BackupConfig, RepositoryFile};
use crate::dcs::Dcs;
use crate::model::PgState;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum From {
    Leader,
    Replica,
}

#[derive(Debug, Subcommand)]
pub enum BackupAction {
    /// The complete backups in the repository, oldest first.
    List {
        /// The node's configuration file (e.g. /etc/pgha/pgha.toml).
        #[arg(short, long)]
        config: PathBuf,
        /// Print JSON (one document) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check backups (checksums) and the WAL chain from each to the newest
    /// archived segment of every timeline.
    Verify {
        /// The node's configuration file (e.g. /etc/pgha/pgha.toml).
        #[arg(short, long)]
        config: PathBuf,
        /// One backup; default: all.
        id: Option<String>,
        /// Print JSON (one document) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove the backups beyond `keep` and the archived WAL no kept
    /// backup needs (also done after every `pgha backup`).
    Expire {
        /// The node configuration or the repository file.
        #[arg(short, long)]
        config: PathBuf,
        /// Print JSON (one document) instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn backup_config(cfg: &Config) -> anyhow::Result<&BackupConfig> {
    cfg.backup.as_ref().ok_or_else(|| {
        UsageError(format!(
            "{}: [backup] is not configured",
            cfg.path.display()
        ))
        .into()
    })
}

/// Opens the repository; a bad S3 credentials file is a configuration
/// error (exit 2), found by [`super::exit_code`] under anyhow.
fn repository(b: &BackupConfig) -> anyhow::Result<Arc<dyn Repository>> {
    match open_repository(b) {
        Ok(r) => Ok(Arc::from(r)),
        Err(OpenError::Config(e)) => Err(e.into()),
        Err(e) => Err(e.into()),
    }
}

/// A byte progress bar on a terminal; nothing otherwise.
fn progress_bar(what: &str) -> Option<indicatif::ProgressBar> {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg} {bytes} ({binary_bytes_per_sec}, {elapsed})",
        )
        .expect("valid template"),
    );
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    Some(bar)
}

/// `pgha backup`: a base backup from a healthy replica (or the leader).
pub async fn take(cfg: &Config, from: From, json: bool) -> anyhow::Result<()> {
    let b = backup_config(cfg)?.clone();
    let dcs = super::connect_dcs(cfg).await?;
    let view = dcs.read_cluster().await?;
    let leader = view
        .leader
        .as_ref()
        .and_then(|l| view.members.get(&l.name))
        .context("the cluster has no leader")?
        .clone();
    let member = match from {
        From::Leader => leader.clone(),
        From::Replica => view
            .members
            .values()
            .filter(|m| m.name != leader.name && m.state == PgState::Streaming)
            .min_by_key(|m| view.lag_of(m).unwrap_or(u64::MAX))
            .cloned()
            .context("no streaming replica to back up from; use --from leader")?,
    };
    let repo = repository(&b)?;
    let bar = progress_bar(&format!("backing up {}", member.name));
    let started = Instant::now();
    let nudge = (from == From::Replica).then(|| {
        tokio::spawn(nudge_leader(
            cfg.clone(),
            (member.host.clone(), member.port),
            (leader.host.clone(), leader.port),
        ))
    });
    let manifest = {
        let repo = repo.clone();
        let bar = bar.clone();
        let (host, port, name) = (member.host.clone(), member.port, member.name.to_string());
        let user = cfg.postgres.replication.username.clone();
        let bin_dir = cfg.postgres.bin_dir.clone();
        let passfile = cfg.passfile_path();
        tokio::task::spawn_blocking(move || {
            let progress = move |n: u64| {
                if let Some(bar) = &bar {
                    bar.set_position(n);
                }
            };
            base::take(
                repo.as_ref(),
                &BackupSource {
                    member: name,
                    host,
                    port,
                    user,
                    bin_dir: &bin_dir,
                    passfile: &passfile,
                    level: b.compress_level,
                    parallel: b.parallel,
                    progress: &progress,
                },
            )
        })
        .await??
    };
    if let Some(nudge) = nudge {
        nudge.abort();
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // A replica cannot end a WAL segment; until the leader does, the
    // segment holding the end of the backup is not archived and the
    // backup cannot be restored.
    let stop = base::stop_segment(&manifest);
    if from == From::Replica {
        let client = connect(cfg, &leader.host, leader.port)
            .await
            .with_context(|| {
                format!(
                    "connect to the leader {} to end the WAL segment",
                    leader.name
                )
            })?;
        client
            .batch_execute(END_SEGMENT)
            .await
            .context("pg_switch_wal on the leader")?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let wal = naming::WalName::parse(stop.as_str()).expect("valid");
        if !file::archived_copies(repo.as_ref(), &wal)?.is_empty()
            || newer_timeline_has(repo.as_ref(), &manifest)?
        {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "backup {} is stored, but {stop}, the last segment it needs, was not archived within 60 s: check archive_command on the leader",
                manifest.id
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    // Retention runs only once the new backup is complete and restorable,
    // so that a failed backup never costs an older one.
    let expired = {
        let (repo, keep) = (repo.clone(), b.keep);
        tokio::task::spawn_blocking(move || retention::expire(repo.as_ref(), keep))
            .await?
            .with_context(|| {
                format!(
                    "backup {} is stored, but expiring old backups failed",
                    manifest.id
                )
            })?
    };
    let size = manifest.files.iter().map(|f| f.size).sum::<u64>();
    if json {
        let mut v = serde_json::to_value(&manifest)?;
        v["expire"] = serde_json::to_value(&expired)?;
        v["seconds"] = serde_json::json!(elapsed.as_secs_f64());
        v["bytes"] = serde_json::json!(size);
        v["stored_bytes"] = serde_json::json!(manifest.stored_bytes());
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "backup {} from {}: {} bytes ({} stored) in {:.1}s, WAL {} .. {} on timeline {}",
            manifest.id,
            manifest.source,
            size,
            manifest.stored_bytes(),
            elapsed.as_secs_f64(),
            manifest.start_lsn,
            manifest.stop_lsn,
            manifest.timeline
        );
        print_expired(&expired);
    }
    Ok(())
}

fn print_expired(r: &retention::ExpireReport) {
    println!(
        "kept {} backup(s) ({}); expired {} backup(s){}{}; removed {} archived WAL file(s)",
        r.kept.len(),
        r.kept.join(", "),
        r.expired_backups.len(),
        if r.expired_backups.is_empty() {
            ""
        } else {
            ": "
        },
        r.expired_backups.join(", "),
        r.expired_wal_objects
    );
}

/// Ends the leader's current WAL segment. The restore point first: on an
/// idle leader whose insert position sits at a segment boundary,
/// `pg_switch_wal()` alone does nothing, and a replica closes (and marks
/// for archiving) a received segment only once it writes into the next.
const END_SEGMENT: &str = "SELECT pg_create_restore_point('pgha backup'); SELECT pg_switch_wal()";

/// A superuser session to a member's PostgreSQL.
async fn connect(cfg: &Config, host: &str, port: u16) -> anyhow::Result<tokio_postgres::Client> {
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
async fn nudge_leader(cfg: Config, replica: (String, u16), leader: (String, u16)) {
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
        match waiting {
            // Only while the replica's position is still in the leader's
            // current segment: once that segment is complete, the replica
            // just has to archive it, and another switch would only add a
            // segment to its queue.
            Ok(true) if same_segment(r, l).await.unwrap_or(false) => {
                let _ = l.batch_execute(END_SEGMENT).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Ok(_) => {}
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
) -> anyhow::Result<bool> {
    let seg = naming::DEFAULT_SEGMENT_SIZE;
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
fn newer_timeline_has(repo: &dyn Repository, m: &Manifest) -> anyhow::Result<bool> {
    for dir in repo.list("archive")? {
        if u32::from_str_radix(&dir, 16).is_ok_and(|tl| tl > m.timeline) {
            return Ok(true);
        }
    }
    Ok(false)
}

pub async fn action(action: BackupAction) -> anyhow::Result<()> {
    match action {
        BackupAction::List { config, json } => {
            let cfg = super::load_config(&config)?;
            let repo = repository(backup_config(&cfg)?)?;
            let list = tokio::task::spawn_blocking(move || base::list(repo.as_ref())).await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<17} {:<10} {:>3} {:<12} {:<12} {:<21} {:>12}",
                    "ID", "SOURCE", "TL", "START LSN", "STOP LSN", "STOP TIME", "STORED"
                );
                for m in &list {
                    println!(
                        "{:<17} {:<10} {:>3} {:<12} {:<12} {:<21} {:>12}",
                        m.id,
                        m.source,
                        m.timeline,
                        m.start_lsn.to_string(),
                        m.stop_lsn.to_string(),
                        m.stop_time,
                        m.stored_bytes()
                    );
                }
            }
            Ok(())
        }
        BackupAction::Expire { config, json } => {
            // The node file or the repository file: expiry needs nothing
            // else, and may run as the account that owns the repository.
            let b = crate::config::backup::load_backup_config(&config)
                .map_err(|e| UsageError(e.to_string()))?;
            let keep = b.keep;
            let repo = repository(&b)?;
            let report =
                tokio::task::spawn_blocking(move || retention::expire(repo.as_ref(), keep))
                    .await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_expired(&report);
            }
            Ok(())
        }
        BackupAction::Verify { config, id, json } => {
            let cfg = super::load_config(&config)?;
            let repo = repository(backup_config(&cfg)?)?;
            let reports = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let list = base::list(repo.as_ref())?;
                let chosen: Vec<&Manifest> = match &id {
                    Some(id) => vec![list.iter().find(|m| &m.id == id).ok_or_else(|| {
                        UsageError(format!("no backup {id:?} in the repository"))
                    })?],
                    None => list.iter().collect(),
                };
                if chosen.is_empty() {
                    bail!("the repository holds no complete backup");
                }
                chosen
                    .into_iter()
                    .map(|m| Ok(base::verify(repo.as_ref(), m)?))
                    .collect::<anyhow::Result<Vec<_>>>()
            })
            .await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                for r in &reports {
                    let status = if r.problems.is_empty() {
                        "ok"
                    } else {
                        "FAILED"
                    };
                    println!(
                        "backup {}: {status} ({} segments on timelines {:?})",
                        r.id, r.segments_checked, r.timelines
                    );
                    for p in &r.problems {
                        println!("  {p}");
                    }
                }
            }
            let bad: usize = reports.iter().map(|r| r.problems.len()).sum();
            if bad > 0 {
                bail!("verify found {bad} problem(s)");
            }
            Ok(())
        }
    }
}

/// `pgha restore`.
pub async fn restore(
    cfg: &Config,
    target_dir: &Path,
    to: &str,
    backup: Option<String>,
    pause: bool,
    port: Option<u16>,
) -> anyhow::Result<()> {
    let b = backup_config(cfg)?.clone();
    let target = restore::parse_target(to).map_err(|e| UsageError(format!("--to {e}")))?;
    let repo = repository(&b)?;
    let list = {
        let repo = repo.clone();
        tokio::task::spawn_blocking(move || base::list(repo.as_ref())).await??
    };
    let manifest = match &backup {
        Some(id) => {
            let m = list.iter().find(|m| &m.id == id).ok_or_else(|| {
                UsageError(format!("--backup: no backup {id:?} in the repository"))
            })?;
            restore::choose(std::slice::from_ref(m), &target)?.clone()
        }
        None => restore::choose(&list, &target)?.clone(),
    };
    let bar = progress_bar(&format!("restoring {}", manifest.id));
    {
        let (repo, m, dir, bin) = (
            repo.clone(),
            manifest.clone(),
            target_dir.to_path_buf(),
            cfg.postgres.bin_dir.clone(),
        );
        let bar = bar.clone();
        tokio::task::spawn_blocking(move || {
            let progress = move |n: u64| {
                if let Some(bar) = &bar {
                    bar.set_position(n);
                }
            };
            restore::unpack(repo.as_ref(), &m, &dir, &bin, &progress)
        })
        .await??;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // The restored server reads the repository through the same command
    // the cluster uses, with its own copy of the repository file.
    let repo_file = target_dir.join("pgha_backup.toml");
    std::fs::write(&repo_file, RepositoryFile::render(&b))
        .with_context(|| format!("write {}", repo_file.display()))?;
    let exe = std::env::current_exe().context("find the pgha binary")?;
    let archiving = crate::backup::agent::archiving(&b, &exe, &repo_file);
    let dir_text = target_dir.display().to_string();
    // Unix socket paths are limited to about 100 bytes.
    let socket_dir = if dir_text.len() < 80 {
        dir_text.as_str()
    } else {
        "/tmp"
    };
    let settings = restore::recovery_settings(&target, pause, &archiving, port, socket_dir);
    let auto = target_dir.join("postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&auto).unwrap_or_default();
    text.push_str(&settings);
    std::fs::write(&auto, text).with_context(|| format!("write {}", auto.display()))?;
    std::fs::write(target_dir.join("recovery.signal"), b"")
        .with_context(|| format!("write {}/recovery.signal", target_dir.display()))?;
    if nix::unistd::geteuid().is_root() {
        let user = nix::unistd::User::from_name(&cfg.postgres.os_user)
            .ok()
            .flatten()
            .ok_or_else(|| {
                UsageError(format!(
                    "OS user {:?} (postgres.os_user) does not exist",
                    cfg.postgres.os_user
                ))
            })?;
        chown_tree(target_dir, user.uid, user.gid)?;
    }
    println!(
        "restored backup {} into {}; start it with pg_ctl start -D {} to replay to {to} and {}",
        manifest.id,
        target_dir.display(),
        target_dir.display(),
        if matches!(target, restore::Target::Latest) {
            "promote"
        } else if pause {
            "pause"
        } else {
            "promote"
        }
    );
    Ok(())
}

/// Hands the restored tree to the PostgreSQL account. `lchown`: a link in
/// the backup is changed itself, never what it points at.
fn chown_tree(dir: &Path, uid: nix::unistd::Uid, gid: nix::unistd::Gid) -> anyhow::Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &p,
            Some(uid),
            Some(gid),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .with_context(|| format!("chown {}", p.display()))?;
        let meta = std::fs::symlink_metadata(&p)?;
        if meta.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(())
}
