//! Backups against a real cluster and a real directory repository: WAL
//! archiving across a failover, a base backup taken while a writer runs,
//! verify, point-in-time and latest restores started with a plain
//! `pg_ctl start`, and the faults a repository can have.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};

use crate::support::cluster::{PGHA_BIN, SUPERUSER, connect};
use crate::support::{Cluster, ClusterOptions, Writer, free_port, wait_until};

const FAILOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `pgha <args>`; returns (success, stdout, stderr).
async fn pgha(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new(PGHA_BIN)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("pgha {args:?} timed out"))??;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    ))
}

/// Archived object names (file names) of one timeline directory.
fn archived(repo: &Path, timeline: u32) -> Vec<String> {
    std::fs::read_dir(repo.join(format!("archive/{timeline:08X}")))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A restored server, run as the PostgreSQL account with plain `pg_ctl`;
/// stopped on drop.
struct Restored {
    dir: PathBuf,
    port: u16,
    password: String,
}

fn pg_ctl(dir: &Path, action: &str) -> anyhow::Result<std::process::Output> {
    let user = nix::unistd::User::from_name("postgres")?.context("no postgres user")?;
    Ok(
        std::process::Command::new("/usr/lib/postgresql/15/bin/pg_ctl")
            .args(["-D"])
            .arg(dir)
            .args(["-l"])
            .arg(dir.join("restore.log"))
            .args(["-w", "-t", "120", action])
            .uid(user.uid.as_raw())
            .gid(user.gid.as_raw())
            .stdin(Stdio::null())
            .output()?,
    )
}

impl Restored {
    async fn start(dir: &Path, port: u16, password: &str) -> anyhow::Result<Restored> {
        let r = Restored {
            dir: dir.to_path_buf(),
            port,
            password: password.into(),
        };
        let out = pg_ctl(dir, "start")?;
        if !out.status.success() {
            let log = std::fs::read_to_string(dir.join("restore.log")).unwrap_or_default();
            bail!(
                "pg_ctl start failed: {}\n{log}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(r)
    }

    async fn client(&self) -> anyhow::Result<tokio_postgres::Client> {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.port)
            .user(SUPERUSER)
            .password(&self.password)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(2));
        connect(&c).await
    }

    /// Waits until recovery has ended (promoted).
    async fn wait_promoted(&self) -> anyhow::Result<()> {
        let log = self.dir.join("restore.log");
        wait_until(
            Duration::from_secs(120),
            Duration::from_millis(200),
            || async {
                let c = self.client().await.ok()?;
                let row = c.query_one("SELECT pg_is_in_recovery()", &[]).await.ok()?;
                (!row.get::<_, bool>(0)).then_some(())
            },
        )
        .await
        .with_context(|| {
            format!(
                "the restored server did not promote:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })
    }

    async fn ids(&self, table: &str) -> anyhow::Result<BTreeSet<i64>> {
        let c = self.client().await?;
        Ok(c.query(&format!("SELECT id FROM {table}"), &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        let _ = pg_ctl(&self.dir, "stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_backup_failover_verify_and_restore() {
    let mut cluster = Cluster::start("bk", 3, ClusterOptions::default().backup())
        .await
        .unwrap();
    let repo = cluster.dir().join("repo");
    let config = cluster.node("node1").config_path().display().to_string();
    let writer = Writer::start(&cluster).await.unwrap();
    writer
        .wait_for_progress(100, Duration::from_secs(30))
        .await
        .unwrap();

    // A base backup from a replica while the writer runs.
    let (ok, out, err) = pgha(&["backup", "-c", &config, "--json"]).await.unwrap();
    assert!(ok, "pgha backup failed: {err}\n{}", cluster.log_tails(20));
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    let leader = cluster.leader().await.unwrap().unwrap();
    assert_ne!(summary["source"], leader.as_str(), "taken from a replica");
    assert_eq!(summary["timeline"], 1);
    writer
        .wait_for_progress(100, Duration::from_secs(30))
        .await
        .unwrap();
    let before = writer.stop().await;

    // A point in time with no commit near it: every acknowledged id before
    // it, the marker rows after it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let target = SystemTime::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let leader_node = cluster.node(&leader);
    leader_node
        .psql("CREATE TABLE after_target (id bigint); INSERT INTO after_target VALUES (1)")
        .await
        .unwrap();

    // Replicas with archive_mode = on do not archive.
    for name in cluster.replica_names().await.unwrap() {
        let n = cluster
            .node(&name)
            .scalar("SELECT archived_count FROM pg_stat_archiver")
            .await
            .unwrap();
        assert_eq!(n.as_deref(), Some("0"), "{name} archived");
    }

    // Failover: the new leader archives its history file and its timeline.
    {
        let victim = cluster.node_mut(&leader);
        victim.kill_agent().await.unwrap();
        victim.kill_postgres().expect("the leader's postmaster");
    }
    let new_leader = cluster
        .wait_for_leader_other_than(&leader, FAILOVER_TIMEOUT)
        .await
        .unwrap();
    let new_node = cluster.node(&new_leader);
    wait_until(FAILOVER_TIMEOUT, Duration::from_millis(200), || async {
        new_node.is_writable().await.ok()?.then_some(())
    })
    .await
    .unwrap();
    new_node
        .psql("CREATE TABLE after_failover (id bigint); INSERT INTO after_failover SELECT generate_series(1, 1000)")
        .await
        .unwrap();
    new_node.psql("SELECT pg_switch_wal()").await.unwrap();
    let tl = new_node.timeline().await.unwrap();
    assert!(tl >= 2);
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let names = archived(&repo, tl);
            let history = names
                .iter()
                .any(|n| n.starts_with(&format!("{tl:08X}.history.")));
            let segment = names.iter().any(|n| n.split('.').count() == 3);
            (history && segment).then_some(())
        },
    )
    .await
    .with_context(|| format!("timeline {tl} not archived: {:?}", archived(&repo, tl)))
    .unwrap();

    let (ok, out, err) = pgha(&["backup", "verify", "-c", &config]).await.unwrap();
    assert!(ok, "verify failed: {out}{err}");

    // Restore to the point in time: exactly the acknowledged rows (unknown
    // ones may or may not be there), and not the later table.
    let password = cluster.superuser_password().to_string();
    let pitr_dir = cluster.dir().join("pitr");
    let to = humantime::format_rfc3339_micros(target).to_string();
    let (ok, out, err) = pgha(&[
        "restore",
        "-c",
        &config,
        "--target-dir",
        pitr_dir.to_str().unwrap(),
        "--to",
        &to,
        "--port",
        &free_port().to_string(),
    ])
    .await
    .unwrap();
    assert!(ok, "restore failed: {out}{err}");
    let port = port_of(&pitr_dir);
    let pitr = Restored::start(&pitr_dir, port, &password).await.unwrap();
    pitr.wait_promoted().await.unwrap();
    let ids = pitr.ids(&before.table).await.unwrap();
    let missing: Vec<_> = before.acknowledged.difference(&ids).collect();
    assert!(missing.is_empty(), "acknowledged ids missing: {missing:?}");
    let extra: Vec<_> = ids
        .difference(&before.acknowledged)
        .filter(|i| !before.unknown.contains(i))
        .collect();
    assert!(extra.is_empty(), "ids never written: {extra:?}");
    let c = pitr.client().await.unwrap();
    let after = c
        .query_one("SELECT to_regclass('after_target') IS NULL", &[])
        .await
        .unwrap();
    assert!(
        after.get::<_, bool>(0),
        "a table created after the target is there"
    );
    drop(pitr);

    // Restore to latest: everything, across the failover.
    let latest_dir = cluster.dir().join("latest");
    let (ok, out, err) = pgha(&[
        "restore",
        "-c",
        &config,
        "--target-dir",
        latest_dir.to_str().unwrap(),
        "--to",
        "latest",
        "--port",
        &free_port().to_string(),
    ])
    .await
    .unwrap();
    assert!(ok, "restore failed: {out}{err}");
    let latest = Restored::start(&latest_dir, port_of(&latest_dir), &password)
        .await
        .unwrap();
    latest.wait_promoted().await.unwrap();
    let ids = latest.ids(&before.table).await.unwrap();
    assert!(before.acknowledged.is_subset(&ids), "acknowledged ids lost");
    assert_eq!(latest.ids("after_failover").await.unwrap().len(), 1000);
    drop(latest);

    // Faults. A target before the oldest backup.
    let (ok, _, err) = pgha(&[
        "restore",
        "-c",
        &config,
        "--target-dir",
        cluster.dir().join("early").to_str().unwrap(),
        "--to",
        "2000-01-01T00:00:00Z",
    ])
    .await
    .unwrap();
    assert!(!ok && err.contains("before the oldest backup"), "{err}");
    // A corrupt segment, then a missing one: verify names each.
    let tl1 = archived(&repo, 1);
    let victim = tl1
        .iter()
        .filter(|n| n.split('.').count() == 3)
        .max()
        .unwrap()
        .clone();
    let path = repo.join("archive/00000001").join(&victim);
    let good = std::fs::read(&path).unwrap();
    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    let out_dir = cluster.dir().join("corrupt");
    std::fs::create_dir(&out_dir).unwrap();
    let (ok, _, err) = pgha(&[
        "wal",
        "get",
        "-c",
        &config,
        &victim[..24],
        out_dir.join("x").to_str().unwrap(),
    ])
    .await
    .unwrap();
    assert!(!ok && err.contains(&victim), "{err}");
    std::fs::remove_file(&path).unwrap();
    let (ok, out, _) = pgha(&["backup", "verify", "-c", &config]).await.unwrap();
    assert!(
        !ok && out.contains(&victim[..24]) && out.contains("missing"),
        "{out}"
    );
}

/// The port the restore wrote into postgresql.auto.conf.
fn port_of(dir: &Path) -> u16 {
    let text = std::fs::read_to_string(dir.join("postgresql.auto.conf")).unwrap();
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("port = '")?.strip_suffix('\'')?.parse().ok())
        .expect("a port line")
}
