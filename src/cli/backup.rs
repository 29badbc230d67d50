//! `pgha backup`, `pgha backup list`, `pgha backup verify` and
//! `pgha restore`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};

use super::UsageError;
use crate::backup::base::{self, Manifest};
use crate::backup::repo::Repository;
use crate::backup::{OpenError, open_repository, progress, restore, retention, run};
use crate::config::Config;
use crate::config::backup::{BackupConfig, RepositoryFile};
use crate::dcs::Dcs;

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
    /// Unpack the newest backup that fits a leader on `--timeline` into
    /// `--dir`, for a new replica. The agent runs it as the PostgreSQL
    /// account when `backup.clone_from = "backup"`.
    #[command(hide = true)]
    UnpackReplica {
        /// The repository file (`<state_dir>/postgres/backup.toml`).
        #[arg(short, long)]
        config: PathBuf,
        /// The data directory to fill: empty or absent.
        #[arg(long)]
        dir: PathBuf,
        /// PostgreSQL's binaries (for pg_verifybackup).
        #[arg(long)]
        bin_dir: PathBuf,
        /// The leader's timeline.
        #[arg(long)]
        timeline: u32,
        /// The cluster's database system identifier: a backup of another
        /// system is refused.
        #[arg(long)]
        system_id: Option<String>,
    },
    /// Unpack the backup `[bootstrap.from_backup]` asks for into `--dir`,
    /// for the first leader of a new cluster. The agent runs it as the
    /// PostgreSQL account.
    #[command(hide = true)]
    UnpackBootstrap {
        /// The repository file of the repository to restore from.
        #[arg(short, long)]
        config: PathBuf,
        /// The data directory to fill: empty or absent.
        #[arg(long)]
        dir: PathBuf,
        /// PostgreSQL's binaries (for pg_verifybackup).
        #[arg(long)]
        bin_dir: PathBuf,
        /// `latest`, a time or an LSN.
        #[arg(long)]
        target: String,
        /// One backup by id; default: the newest that suits the target.
        #[arg(long)]
        backup: Option<String>,
        /// The timeline to follow; default: the newest archived.
        #[arg(long)]
        timeline: Option<u32>,
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

/// The one line an unpack command reports to the agent: the backup (for
/// its log and a bootstrap's recovery settings) and, for a bootstrap, the
/// timeline replay must follow.
fn print_unpack_report(m: &Manifest, follow: Option<crate::model::Timeline>) {
    let mut report = serde_json::json!({
        "backup": m.id,
        "timeline": m.timeline,
        "stop_lsn": m.stop_lsn.to_string(),
        "stop_time": m.stop_time,
    });
    if let Some(t) = follow {
        report["follow_timeline"] = t.0.into();
    }
    println!("{report}");
}

/// A byte progress bar on a terminal (done of the total, rate, time
/// left); nothing otherwise. The total may come later
/// (`ProgressBar::set_length`): pg_basebackup reports its estimate with
/// its first progress line.
fn progress_bar(what: &str, total: u64) -> Option<indicatif::ProgressBar> {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bytes}/{total_bytes} ({binary_bytes_per_sec}, {elapsed}, about {eta} left)",
        )
        .expect("valid template"),
    );
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    Some(bar)
}

/// Progress lines of `unpack-replica` on standard error, for the agent to
/// relay into its log: the start (backup and size), one every
/// [`progress::INTERVAL`], the end. Called from the thread that reads the
/// backup, once per chunk (a mebibyte).
fn unpack_progress() -> impl Fn(&Manifest, u64) + Sync {
    use std::io::Write;
    let meter = std::sync::Mutex::new(None::<progress::Meter>);
    move |m: &Manifest, done: u64| {
        let now = std::time::Instant::now();
        let mut meter = meter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let meter = meter.get_or_insert_with(|| {
            let total = m.files.iter().map(|f| f.size).sum();
            progress::Meter::new(total, progress::INTERVAL, now)
        });
        if let Some(report) = meter.update(done, now) {
            let next = if report.finished {
                "; syncing and checking the files"
            } else {
                ""
            };
            // Progress must never fail the unpack (the agent gone, say).
            let _ = writeln!(
                std::io::stderr(),
                "{}backup {}: unpacked {report}{next}",
                progress::PREFIX,
                m.id
            );
        }
    }
}

/// `pgha backup`: a base backup from a healthy replica (or the leader).
pub async fn take(cfg: &Config, from: From, json: bool) -> anyhow::Result<()> {
    let b = backup_config(cfg)?.clone();
    let dcs = super::connect_dcs(cfg).await?;
    let view = dcs.read_cluster().await?;
    let leader = view
        .leader_record()
        .context("the cluster has no leader")?
        .clone();
    let member = match from {
        From::Leader => leader.clone(),
        From::Replica => run::least_lagging_replica(&view, &leader.name)
            .cloned()
            .context("no streaming replica to back up from; use --from leader")?,
    };
    let repo = repository(&b)?;
    let bar = progress_bar(&format!("backing up {}", member.name), 0);
    let progress = {
        let bar = bar.clone();
        Box::new(move |n: u64, total: u64| {
            if let Some(bar) = &bar {
                // The server's estimate; the last files may add a little.
                bar.set_length(total.max(n));
                bar.set_position(n);
            }
        })
    };
    let done = run::take(
        cfg,
        &b,
        repo,
        &leader,
        &member,
        run::Options {
            progress,
            cancel: Default::default(),
            background: false,
        },
    )
    .await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let done = done?;
    let manifest = &done.manifest;
    let size = done.bytes();
    if json {
        let mut v = serde_json::to_value(manifest)?;
        v["expire"] = serde_json::to_value(&done.expired)?;
        v["seconds"] = serde_json::json!(done.elapsed.as_secs_f64());
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
            done.elapsed.as_secs_f64(),
            manifest.start_lsn,
            manifest.stop_lsn,
            manifest.timeline
        );
        print_expired(&done.expired);
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
        BackupAction::UnpackReplica {
            config,
            dir,
            bin_dir,
            timeline,
            system_id,
        } => {
            let b = crate::config::backup::load_backup_config(&config)
                .map_err(|e| UsageError(e.to_string()))?;
            let repo = repository(&b)?;
            let m = tokio::task::spawn_blocking(move || {
                crate::backup::replica::unpack(
                    repo.as_ref(),
                    &dir,
                    &bin_dir,
                    crate::model::Timeline(timeline),
                    system_id.as_deref(),
                    &unpack_progress(),
                )
            })
            .await??;
            print_unpack_report(&m, None);
            Ok(())
        }
        BackupAction::UnpackBootstrap {
            config,
            dir,
            bin_dir,
            target,
            backup,
            timeline,
        } => {
            let b = crate::config::backup::load_backup_config(&config)
                .map_err(|e| UsageError(e.to_string()))?;
            let target =
                restore::parse_target(&target).map_err(|e| UsageError(format!("--target {e}")))?;
            let repo = repository(&b)?;
            let (m, follow) = tokio::task::spawn_blocking(move || {
                crate::backup::bootstrap::unpack(
                    repo.as_ref(),
                    &dir,
                    &bin_dir,
                    &target,
                    backup.as_deref(),
                    timeline.map(crate::model::Timeline),
                    &unpack_progress(),
                )
            })
            .await??;
            print_unpack_report(&m, Some(follow));
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
    let bar = progress_bar(
        &format!("restoring {}", manifest.id),
        manifest.files.iter().map(|f| f.size).sum(),
    );
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
                    // A server-compressed backup's size leaves out the
                    // tar's headers: the count may pass it a little.
                    if bar.length().is_some_and(|l| n > l) {
                        bar.set_length(n);
                    }
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
