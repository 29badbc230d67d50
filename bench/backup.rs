//! `pgha-bench backup`: pgha's backup path side by side with pgBackRest on
//! one PostgreSQL server of this machine, same compression (zstd, same
//! level) and parallelism:
//!
//! - full backup of a pgbench database (`--scale`, 200 is about 3 GB):
//!   time and repository size;
//! - full restore into an empty directory: time;
//! - WAL archiving under pgbench TPC-B at full speed: the largest number of
//!   completed but not yet archived segments seen (sampled every 250 ms).
//!
//! pgha's side calls the library functions `pgha backup` and `pgha restore`
//! run (`backup::base::take`, `backup::restore::unpack`, which includes
//! `pg_verifybackup`) and its real `archive_command` (`pgha wal push`);
//! the DCS lookup of `pgha backup` is left out, since there is no cluster
//! here. pgBackRest runs as its Debian package installs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::clock::log;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// pgbench scale factor (200: about 3 GB).
    #[arg(long, default_value_t = 200)]
    scale: u32,
    /// zstd level for both tools.
    #[arg(long, default_value_t = 3)]
    level: i32,
    /// Processes (pgBackRest `process-max`) / zstd threads (pgha).
    #[arg(long, default_value_t = 2)]
    parallel: usize,
    /// Seconds of pgbench TPC-B per tool for the archive-lag measurement.
    #[arg(long, default_value_t = 60)]
    archive_seconds: u64,
    /// Full backups and restores per tool (the times are reported as
    /// median/min/max).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// pgbench clients for the archive-lag measurement.
    #[arg(long, default_value_t = 4)]
    clients: u32,
    /// PostgreSQL binaries.
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin")]
    bin_dir: PathBuf,
    /// Only pgha (when pgBackRest is not installed).
    #[arg(long)]
    skip_pgbackrest: bool,
    /// Keep the work directory.
    #[arg(long)]
    keep: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

struct Env {
    dir: PathBuf,
    data: PathBuf,
    port: u16,
    bin: PathBuf,
    pgha: PathBuf,
    uid: u32,
    gid: u32,
}

impl Env {
    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new(program);
        c.uid(self.uid)
            .gid(self.gid)
            .current_dir(&self.dir)
            .env("PGHOST", &self.dir)
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", "postgres")
            .env("PGDATABASE", "postgres")
            .stdin(Stdio::null());
        c
    }

    fn pg(&self, tool: &str) -> Command {
        self.cmd(self.bin.join(tool))
    }

    fn run(&self, mut c: Command, what: &str) -> anyhow::Result<String> {
        let out = c.output().with_context(|| format!("run {what}"))?;
        if !out.status.success() {
            bail!(
                "{what}: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn sql(&self, sql: &str) -> anyhow::Result<String> {
        let mut c = self.pg("psql");
        c.args(["-XAtc", sql]);
        self.run(c, sql)
    }

    fn set_archive_command(&self, command: &str) -> anyhow::Result<()> {
        self.sql(&format!(
            "ALTER SYSTEM SET archive_command = '{}'",
            command.replace('\'', "''")
        ))?;
        self.sql("SELECT pg_reload_conf()")?;
        std::thread::sleep(Duration::from_millis(300));
        let in_effect = self.sql("SHOW archive_command")?;
        anyhow::ensure!(
            in_effect == command,
            "archive_command is {in_effect:?}, not {command:?}: a higher-priority setting overrides it"
        );
        // Let the archiver drain what the previous command left.
        std::thread::sleep(Duration::from_secs(2));
        Ok(())
    }

    fn pgbackrest(&self, args: &[&str]) -> Command {
        let mut c = self.cmd("pgbackrest");
        c.arg(format!(
            "--config={}",
            self.dir.join("pgbackrest.conf").display()
        ))
        .arg("--stanza=bench")
        .args(args);
        c
    }
}

fn du(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn segno(name: &str) -> Option<u64> {
    let hi = u64::from_str_radix(name.get(8..16)?, 16).ok()?;
    let lo = u64::from_str_radix(name.get(16..24)?, 16).ok()?;
    Some(hi * 256 + lo)
}

/// pgbench TPC-B for `secs` while sampling how many completed segments
/// wait for the archiver; returns (max lag in segments, tps).
fn archive_lag(env: &Env, args: &Args) -> anyhow::Result<Value> {
    env.sql("SELECT pg_stat_reset_shared('archiver')")?;
    let mut bench = env.pg("pgbench");
    bench.args([
        "-c",
        &args.clients.to_string(),
        "-j",
        "2",
        "-T",
        &args.archive_seconds.to_string(),
        "postgres",
    ]);
    let child = bench
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut max_lag = 0u64;
    let mut samples = 0u64;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(args.archive_seconds) {
        std::thread::sleep(Duration::from_millis(250));
        let row = env.sql(
            "SELECT pg_walfile_name(pg_current_wal_lsn()), coalesce(last_archived_wal, '') FROM pg_stat_archiver",
        )?;
        let (cur, last) = row.split_once('|').unwrap_or((&row, ""));
        if let (Some(c), Some(l)) = (segno(cur), segno(last)) {
            // Segments before the current one that are not archived yet.
            max_lag = max_lag.max(c.saturating_sub(l + 1));
            samples += 1;
        }
    }
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let tps = text.lines().find_map(|l| {
        l.strip_prefix("tps = ")?
            .split_whitespace()
            .next()?
            .parse::<f64>()
            .ok()
    });
    let failed = env.sql("SELECT failed_count FROM pg_stat_archiver")?;
    Ok(json!({
        "max_lag_segments": max_lag,
        "samples": samples,
        "tps": tps,
        "archive_failures": failed.parse::<u64>().unwrap_or(0),
    }))
}

/// Checkpoints the server and writes back what earlier steps left dirty
/// (pgbench's load, a removed restore), then gives the disk a moment, so
/// that each timed step pays for its own writes only. Every timed step ends
/// with a `sync` for the same reason: a backup or restore is done when it
/// is on disk (see [`timed`]).
fn settle(env: &Env) -> anyhow::Result<()> {
    env.sql("CHECKPOINT")?;
    nix::unistd::sync();
    std::thread::sleep(Duration::from_secs(2));
    Ok(())
}

/// Seconds `step` takes, from a settled machine until its writes are on
/// disk.
fn timed<T>(env: &Env, step: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(f64, T)> {
    settle(env)?;
    let started = Instant::now();
    let out = step()?;
    nix::unistd::sync();
    Ok((started.elapsed().as_secs_f64(), out))
}

/// One tool's timings over the runs.
#[derive(Default)]
struct Times {
    backups: Vec<f64>,
    restores: Vec<f64>,
    /// Repository bytes of one backup.
    stored: u64,
}

impl Times {
    fn report(&self, archive: anyhow::Result<Value>, error: Option<anyhow::Error>) -> Value {
        let mut v = json!({
            "backup_seconds": crate::report::summary_decimals(&self.backups, 2),
            "restore_seconds": crate::report::summary_decimals(&self.restores, 2),
            "backup_runs": self.backups,
            "restore_runs": self.restores,
            "repository_backup_bytes": self.stored,
        });
        match archive {
            Ok(a) => v["archive"] = a,
            Err(e) => v["archive"] = json!({"error": format!("{e:#}")}),
        }
        if let Some(e) = error {
            v["error"] = json!(format!("{e:#}"));
        }
        v
    }
}

fn pgha_archive_command(env: &Env) -> String {
    format!(
        "{} wal push -c {} %p",
        env.pgha.display(),
        env.dir.join("pgha-repo.toml").display()
    )
}

fn pgbackrest_archive_command(env: &Env) -> String {
    format!(
        "pgbackrest --config={} --stanza=bench archive-push %p",
        env.dir.join("pgbackrest.conf").display()
    )
}

/// One full backup and one full restore with pgha.
fn pgha_run(env: &Env, args: &Args, run: usize, times: &mut Times) -> anyhow::Result<()> {
    let repo = pgha::backup::repo::DirRepository::new(env.dir.join("pgha-repo"));
    env.set_archive_command(&pgha_archive_command(env))?;
    let passfile = env.dir.join("empty.pgpass");
    log(&format!("pgha: full backup {run}"));
    let (seconds, m) = timed(env, || {
        Ok(pgha::backup::base::take(
            &repo,
            &pgha::backup::base::BackupSource {
                member: "bench".into(),
                host: env.dir.display().to_string(),
                port: env.port,
                user: "postgres".into(),
                bin_dir: &env.bin,
                passfile: &passfile,
                level: args.level,
                parallel: args.parallel,
                progress: &|_, _| {},
                cancel: None,
                background: false,
                // The bench's own initdb keeps PostgreSQL's default.
                wal_segment_size: pgha::backup::naming::DEFAULT_SEGMENT_SIZE,
            },
        )?)
    })?;
    times.backups.push(seconds);
    times.stored = m.stored_bytes();
    log(&format!("pgha: full restore {run}"));
    let target = env.dir.join("pgha-restore");
    let (seconds, ()) = timed(env, || {
        Ok(pgha::backup::restore::unpack(
            &repo,
            &m,
            &target,
            &env.bin,
            &|_| {},
        )?)
    })?;
    times.restores.push(seconds);
    let _ = std::fs::remove_dir_all(&target);
    Ok(())
}

fn pgbackrest_prepare(env: &Env, args: &Args) -> anyhow::Result<()> {
    std::fs::write(
        env.dir.join("pgbackrest.conf"),
        format!(
            "[global]\nrepo1-path={}\ncompress-type=zst\ncompress-level={}\nprocess-max={}\nstart-fast=y\nlog-level-console=warn\nlog-level-file=off\nlock-path={}\nspool-path={}\n\n[bench]\npg1-path={}\npg1-port={}\npg1-socket-path={}\n",
            env.dir.join("pgbr-repo").display(),
            args.level,
            args.parallel,
            env.dir.join("pgbr-lock").display(),
            env.dir.join("pgbr-spool").display(),
            env.data.display(),
            env.port,
            env.dir.display(),
        ),
    )?;
    env.run(
        env.pgbackrest(&["stanza-create"]),
        "pgbackrest stanza-create",
    )?;
    Ok(())
}

/// One full backup and one full restore with pgBackRest.
fn pgbackrest_run(env: &Env, run: usize, times: &mut Times) -> anyhow::Result<()> {
    let repo_dir = env.dir.join("pgbr-repo");
    env.set_archive_command(&pgbackrest_archive_command(env))?;
    log(&format!("pgBackRest: full backup {run}"));
    let before = du(&repo_dir.join("backup"));
    let (seconds, _) = timed(env, || {
        env.run(
            env.pgbackrest(&["--type=full", "backup"]),
            "pgbackrest backup",
        )
    })?;
    times.backups.push(seconds);
    times.stored = du(&repo_dir.join("backup")).saturating_sub(before);
    log(&format!("pgBackRest: full restore {run}"));
    let target = env.dir.join("pgbr-restore");
    std::fs::create_dir_all(&target)?;
    nix::unistd::chown(&target, Some(env.uid.into()), Some(env.gid.into()))?;
    std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let (seconds, _) = timed(env, || {
        env.run(
            env.pgbackrest(&[&format!("--pg1-path={}", target.display()), "restore"]),
            "pgbackrest restore",
        )
    })?;
    times.restores.push(seconds);
    let _ = std::fs::remove_dir_all(&target);
    Ok(())
}

/// The runs interleaved (pgha, pgBackRest, pgha, ...) so that neither tool
/// always gets the machine right after pgbench's load, then each tool's
/// archiving under pgbench.
fn compare(env: &Env, args: &Args) -> (Value, Value) {
    let (mut pgha, mut pgbr) = (Times::default(), Times::default());
    let mut pgha_error = None;
    let mut pgbr_error = if args.skip_pgbackrest {
        None
    } else {
        pgbackrest_prepare(env, args).err()
    };
    for run in 1..=args.runs.max(1) {
        if pgha_error.is_none() {
            pgha_error = pgha_run(env, args, run, &mut pgha).err();
        }
        if !args.skip_pgbackrest && pgbr_error.is_none() {
            pgbr_error = pgbackrest_run(env, run, &mut pgbr).err();
        }
    }
    log("pgha: archiving under pgbench");
    let archive = env
        .set_archive_command(&pgha_archive_command(env))
        .and_then(|()| archive_lag(env, args));
    let mut pgha_report = pgha.report(archive, pgha_error);
    pgha_report["location"] = json!(env.dir.join("pgha-repo"));
    if args.skip_pgbackrest {
        return (pgha_report, Value::Null);
    }
    log("pgBackRest: archiving under pgbench");
    let archive = env
        .set_archive_command(&pgbackrest_archive_command(env))
        .and_then(|()| archive_lag(env, args));
    (pgha_report, pgbr.report(archive, pgbr_error))
}

fn setup(args: &Args) -> anyhow::Result<Env> {
    let user = nix::unistd::User::from_name("postgres")?.context("no postgres OS user")?;
    let dir = std::env::temp_dir().join(format!("pgha-bench-backup-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    nix::unistd::chown(&dir, Some(user.uid), Some(user.gid))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let pgha = std::env::current_exe()?
        .parent()
        .context("bench binary directory")?
        .join("pgha");
    let env = Env {
        data: dir.join("data"),
        dir,
        port,
        bin: args.bin_dir.clone(),
        pgha,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    };
    for sub in ["pgha-repo", "pgbr-repo", "pgbr-lock", "pgbr-spool"] {
        let p = env.dir.join(sub);
        std::fs::create_dir_all(&p)?;
        nix::unistd::chown(&p, Some(user.uid), Some(user.gid))?;
    }
    std::fs::write(
        env.dir.join("pgha-repo.toml"),
        format!(
            "[backup]\nrepository = {:?}\ncompress_level = {}\nparallel = {}\n",
            env.dir.join("pgha-repo").display().to_string(),
            args.level,
            args.parallel
        ),
    )?;
    std::fs::write(env.dir.join("empty.pgpass"), "")?;
    let mut init = env.pg("initdb");
    init.args(["-D"])
        .arg(&env.data)
        .args(["-U", "postgres", "--auth=trust"]);
    env.run(init, "initdb")?;
    // In postgresql.conf, not on the command line: a `-c` setting outranks
    // the `ALTER SYSTEM` with which each side installs its own command.
    let conf = env.data.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf)?;
    text.push_str("\narchive_command = '/bin/true'\n");
    std::fs::write(&conf, text)?;
    let mut start = env.pg("pg_ctl");
    start
        .args(["-D"])
        .arg(&env.data)
        .args(["-l"])
        .arg(env.dir.join("postgres.log"))
        .args(["-w", "-o"])
        .arg(format!(
            "-p {} -k {} -c listen_addresses='' -c archive_mode=on -c max_wal_size=8GB -c shared_buffers=512MB",
            env.port,
            env.dir.display()
        ))
        .arg("start");
    env.run(start, "pg_ctl start")?;
    log(&format!("pgbench -i -s {}", args.scale));
    let mut init = env.pg("pgbench");
    init.args(["-i", "-q", "-s", &args.scale.to_string(), "postgres"]);
    env.run(init, "pgbench -i")?;
    env.sql("CHECKPOINT")?;
    Ok(env)
}

pub async fn main(args: Args) -> i32 {
    crate::report::init_machine();
    let result = tokio::task::spawn_blocking(move || {
        let env = setup(&args)?;
        let db_bytes: u64 = env
            .sql("SELECT pg_database_size('postgres')")?
            .parse()
            .unwrap_or(0);
        let (pgha, pgbr) = compare(&env, &args);
        let mut stop = env.pg("pg_ctl");
        stop.args(["-D"])
            .arg(&env.data)
            .args(["-m", "fast", "stop"]);
        let _ = env.run(stop, "pg_ctl stop");
        if !args.keep {
            let _ = std::fs::remove_dir_all(&env.dir);
        }
        let report = json!({
            "bench": "backup",
            "machine": crate::report::machine(),
            "scale": args.scale,
            "database_bytes": db_bytes,
            "compression": format!("zstd {}", args.level),
            "parallel": args.parallel,
            "pgha": pgha,
            "pgbackrest": pgbr,
        });
        if let Some(path) = &args.json_out {
            std::fs::write(path, format!("{report:#}\n"))?;
        }
        anyhow::Ok(report)
    })
    .await;
    match result {
        Ok(Ok(report)) => {
            println!("{report:#}");
            if report["pgha"]["error"].is_null() && report["pgbackrest"]["error"].is_null() {
                0
            } else {
                1
            }
        }
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            1
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
