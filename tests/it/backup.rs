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

/// The leader's host dies (its agent and postmaster killed outright);
/// returns the member that took over, once it accepts writes.
async fn lose_the_leader(cluster: &mut Cluster, leader: &str) -> String {
    {
        let victim = cluster.node_mut(leader);
        victim.kill_agent().await.unwrap();
        victim.kill_postgres().expect("the leader's postmaster");
    }
    let new_leader = cluster
        .wait_for_leader_other_than(leader, FAILOVER_TIMEOUT)
        .await
        .unwrap();
    let node = cluster.node(&new_leader);
    wait_until(FAILOVER_TIMEOUT, Duration::from_millis(200), || async {
        node.is_writable().await.ok()?.then_some(())
    })
    .await
    .unwrap();
    new_leader
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

    // Replicas archive what they receive too (archive_mode = always), and
    // never fail: their copies are the primary's, so every push is a no-op
    // or fills a hole.
    for name in cluster.replica_names().await.unwrap() {
        let node = cluster.node(&name);
        let mode = node.scalar("SHOW archive_mode").await.unwrap();
        assert_eq!(mode.as_deref(), Some("always"), "{name}");
        let failed = node
            .scalar("SELECT failed_count FROM pg_stat_archiver")
            .await
            .unwrap();
        assert_eq!(failed.as_deref(), Some("0"), "{name} failed to archive");
    }

    // Failover: the new leader archives its history file and its timeline.
    let new_leader = lose_the_leader(&mut cluster, &leader).await;
    let new_node = cluster.node(&new_leader);
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
    // The segment holding the backup's start: on every restore's path
    // (the newest TL1 segment may be a replica's copy cut at the switch,
    // which no recovery reads).
    let start: u64 = {
        let (hi, lo) = summary["start_lsn"]
            .as_str()
            .unwrap()
            .split_once('/')
            .unwrap();
        (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
    };
    let segno = start / (16 << 20);
    let start_name = format!("00000001{:08X}{:08X}", segno >> 8, segno & 0xFF);
    let tl1 = archived(&repo, 1);
    let victim = tl1
        .iter()
        .find(|n| n.starts_with(&format!("{start_name}.")) && n.split('.').count() == 3)
        .unwrap_or_else(|| panic!("{start_name} not archived: {tl1:?}"))
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

/// `pgha` as the PostgreSQL account (root ignores file modes, the
/// archiver does not).
async fn pgha_as_postgres(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let user = nix::unistd::User::from_name("postgres")?.context("no postgres user")?;
    let mut cmd = tokio::process::Command::new(PGHA_BIN);
    cmd.args(args)
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .current_dir("/")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await??;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    ))
}

/// Every file under `dir` with its size.
fn tree(dir: &Path) -> BTreeSet<(PathBuf, u64)> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                out.insert((e.path(), meta.len()));
            }
        }
    }
    out
}

fn chmod_tree(dir: &Path, writable: bool) {
    let status = std::process::Command::new("chmod")
        .args(["-R", if writable { "u+w" } else { "a-w" }])
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success());
}

async fn backup_ids(config: &str) -> Vec<String> {
    let (ok, out, err) = pgha(&["backup", "list", "-c", config, "--json"])
        .await
        .unwrap();
    assert!(ok, "{err}");
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    list.iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// One cluster, `keep = 2`, for: `DROP TABLE` recovery; three consecutive
/// failovers, the first with the leader's archiver stopped so that only
/// the replicas (archive_mode = always) archive its last segments; then
/// retention after a third backup, verify, a restore of the oldest kept
/// backup to latest across every failover, and a read-only repository.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_table_failovers_retention_and_read_only_repository() {
    let mut options = ClusterOptions::default().backup();
    options
        .backup
        .as_mut()
        .unwrap()
        .push(("keep".into(), "2".into()));
    let mut cluster = Cluster::start("bk-ret", 3, options).await.unwrap();
    let repo = cluster.dir().join("repo");
    let config = cluster.node("node1").config_path().display().to_string();
    let password = cluster.superuser_password().to_string();

    // Two backups (ids are per second).
    for _ in 0..2 {
        let (ok, _, err) = pgha(&["backup", "-c", &config]).await.unwrap();
        assert!(ok, "pgha backup failed: {err}\n{}", cluster.log_tails(20));
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let first_two = backup_ids(&config).await;
    assert_eq!(first_two.len(), 2, "{first_two:?}");

    // A table, a point in time, then the mistake.
    let leader = cluster.leader_node().await.unwrap();
    leader
        .psql("CREATE TABLE precious (id bigint PRIMARY KEY); INSERT INTO precious SELECT generate_series(1, 500)")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_drop = SystemTime::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    leader.psql("DROP TABLE precious").await.unwrap();
    leader
        .psql("CREATE TABLE failovers (round int)")
        .await
        .unwrap();

    // Three failovers; the killed leader comes back as a replica each time.
    for round in 1..=3 {
        let old = cluster.leader().await.unwrap().unwrap();
        let mut stopped_archiver = None;
        if round == 1 {
            // The leader completes segments it never archives: only the
            // replicas can bring them to the repository.
            let node = cluster.node(&old);
            let pid = node
                .scalar("SELECT pid FROM pg_stat_activity WHERE backend_type = 'archiver'")
                .await
                .unwrap()
                .unwrap();
            let pid = nix::unistd::Pid::from_raw(pid.parse().unwrap());
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
            stopped_archiver = Some(pid);
            let mut unarchived = Vec::new();
            for _ in 0..2 {
                node.psql("INSERT INTO failovers SELECT 0 FROM generate_series(1, 1000)")
                    .await
                    .unwrap();
                let seg = node
                    .scalar("SELECT pg_walfile_name(pg_switch_wal())")
                    .await
                    .unwrap()
                    .unwrap();
                unarchived.push(seg);
            }
            wait_until(
                Duration::from_secs(30),
                Duration::from_millis(200),
                || async {
                    let names = archived(&repo, 1);
                    unarchived
                        .iter()
                        .all(|s| names.iter().any(|n| n.starts_with(&format!("{s}."))))
                        .then_some(())
                },
            )
            .await
            .with_context(|| format!("replicas did not archive {unarchived:?}"))
            .unwrap();
        }
        {
            let victim = cluster.node_mut(&old);
            victim.kill_agent().await.unwrap();
            victim.kill_postgres().expect("the leader's postmaster");
        }
        if let Some(pid) = stopped_archiver {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let new = cluster
            .wait_for_leader_other_than(&old, FAILOVER_TIMEOUT)
            .await
            .unwrap();
        let node = cluster.node(&new);
        wait_until(FAILOVER_TIMEOUT, Duration::from_millis(200), || async {
            node.is_writable().await.ok()?.then_some(())
        })
        .await
        .unwrap();
        node.psql(&format!("INSERT INTO failovers VALUES ({round})"))
            .await
            .unwrap();
        node.psql("SELECT pg_switch_wal()").await.unwrap();
        cluster.node_mut(&old).start().unwrap();
        cluster
            .wait_healthy(Duration::from_secs(120))
            .await
            .with_context(|| cluster.log_tails(30))
            .unwrap();
    }
    let tl = cluster
        .leader_node()
        .await
        .unwrap()
        .timeline()
        .await
        .unwrap();
    assert!(tl >= 4, "timeline {tl} after three failovers");

    // A third backup expires the first, and the archive before the oldest
    // kept one; verify still finds no gap on any timeline.
    let (ok, out, err) = pgha(&["backup", "-c", &config, "--json"]).await.unwrap();
    assert!(ok, "pgha backup failed: {err}\n{}", cluster.log_tails(20));
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        summary["expire"]["expired_backups"][0],
        first_two[0].as_str()
    );
    let ids = backup_ids(&config).await;
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(ids[0], first_two[1]);
    assert!(!repo.join("backup").join(&first_two[0]).exists());
    let (ok, out, err) = pgha(&["backup", "verify", "-c", &config]).await.unwrap();
    assert!(ok, "verify after expire failed: {out}{err}");
    let (ok, out, _) = pgha(&["backup", "expire", "-c", &config, "--json"])
        .await
        .unwrap();
    let again: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok && again["expired_backups"].as_array().unwrap().is_empty());
    assert_eq!(
        again["expired_wal_objects"], 0,
        "a second expire is a no-op"
    );

    // DROP TABLE recovery from the oldest kept backup.
    let dir = cluster.dir().join("undrop");
    let to = humantime::format_rfc3339_micros(before_drop).to_string();
    let (ok, out, err) = pgha(&[
        "restore",
        "-c",
        &config,
        "--target-dir",
        dir.to_str().unwrap(),
        "--to",
        &to,
        "--backup",
        &ids[0],
        "--port",
        &free_port().to_string(),
    ])
    .await
    .unwrap();
    assert!(ok, "restore failed: {out}{err}");
    let undrop = Restored::start(&dir, port_of(&dir), &password)
        .await
        .unwrap();
    undrop.wait_promoted().await.unwrap();
    let rows = undrop.ids("precious").await.unwrap();
    assert_eq!(rows, (1..=500).collect::<BTreeSet<i64>>());
    drop(undrop);

    // The oldest kept backup to latest: across the three failovers.
    let dir = cluster.dir().join("latest");
    let (ok, out, err) = pgha(&[
        "restore",
        "-c",
        &config,
        "--target-dir",
        dir.to_str().unwrap(),
        "--to",
        "latest",
        "--backup",
        &ids[0],
        "--port",
        &free_port().to_string(),
    ])
    .await
    .unwrap();
    assert!(ok, "restore failed: {out}{err}");
    let latest = Restored::start(&dir, port_of(&dir), &password)
        .await
        .unwrap();
    latest.wait_promoted().await.unwrap();
    let c = latest.client().await.unwrap();
    let rounds: Vec<i32> = c
        .query(
            "SELECT round FROM failovers WHERE round > 0 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rounds, [1, 2, 3]);
    let n: i64 = c
        .query_one("SELECT count(*) FROM failovers WHERE round = 0", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2000, "the rows of the segments only replicas archived");
    let gone = c
        .query_one("SELECT to_regclass('precious') IS NULL", &[])
        .await
        .unwrap();
    assert!(gone.get::<_, bool>(0));
    drop(latest);

    // A read-only repository: a clear error naming the object, and
    // nothing deleted or overwritten.
    let leader = cluster.leader_node().await.unwrap();
    let repo_file = leader.state_dir().join("postgres/backup.toml");
    let scratch = cluster.dir().join("ro");
    std::fs::create_dir(&scratch).unwrap();
    let text = std::fs::read_to_string(&repo_file).unwrap();
    let keep1 = scratch.join("keep1.toml");
    std::fs::write(&keep1, text.replace("keep = 2", "keep = 1")).unwrap();
    let seg = scratch.join("0000000100000000000000FE");
    std::fs::write(&seg, vec![1u8; 8192]).unwrap();
    let pg = nix::unistd::User::from_name("postgres").unwrap().unwrap();
    for p in [&scratch, &keep1, &seg] {
        nix::unistd::chown(p.as_path(), Some(pg.uid), Some(pg.gid)).unwrap();
    }
    let before = tree(&repo);
    chmod_tree(&repo, false);
    let (ok, _, err) = pgha_as_postgres(&[
        "wal",
        "push",
        "-c",
        keep1.to_str().unwrap(),
        seg.to_str().unwrap(),
    ])
    .await
    .unwrap();
    assert!(
        !ok && err.contains("0000000100000000000000FE") && err.contains("archive/00000001"),
        "{err}"
    );
    let (ok, _, err) = pgha_as_postgres(&["backup", "expire", "-c", keep1.to_str().unwrap()])
        .await
        .unwrap();
    let manifest = format!("backup/{}/manifest.json", ids[0]);
    assert!(!ok && err.contains(&manifest), "{err}");
    // The leader's archiver fails too, and keeps the segment. A switch
    // with no WAL written since the last one ends no segment: write some.
    leader
        .psql("SELECT pg_create_restore_point('read-only repository')")
        .await
        .unwrap();
    leader.psql("SELECT pg_switch_wal()").await.unwrap();
    let failing = leader
        .scalar("SELECT pg_walfile_name(pg_current_wal_lsn() - 1)")
        .await
        .unwrap()
        .unwrap();
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let failed = leader
                .scalar("SELECT failed_count FROM pg_stat_archiver")
                .await
                .ok()??;
            (failed != "0").then_some(())
        },
    )
    .await
    .unwrap();
    assert_eq!(tree(&repo), before, "the read-only repository changed");
    // Writable again: archiving catches up, nothing lost. After three
    // failures in a row the archiver rests until a new segment is ready
    // (or a minute passes): complete one to wake it.
    chmod_tree(&repo, true);
    leader
        .psql("SELECT pg_create_restore_point('wake the archiver')")
        .await
        .unwrap();
    leader.psql("SELECT pg_switch_wal()").await.unwrap();
    wait_until(
        Duration::from_secs(90),
        Duration::from_millis(300),
        || async {
            archived(&repo, tl)
                .iter()
                .any(|n| n.starts_with(&format!("{failing}.")))
                .then_some(())
        },
    )
    .await
    .with_context(|| format!("{failing} not archived after the repository came back"))
    .unwrap();
}

/// `backup.schedule`: with a slot every minute, the leader's agent takes
/// a backup by itself (the current minute's slot as soon as it leads, or
/// the next one), `pgha backup list` shows it, it verifies, and the
/// leader's `/metrics` reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backup_by_the_leaders_agent() {
    let mut options = ClusterOptions::default().backup();
    options
        .backup
        .as_mut()
        .unwrap()
        .push(("schedule".into(), "\"* * * * *\"".into()));
    let cluster = Cluster::start("bk-sched", 2, options).await.unwrap();
    let config = cluster.node("node1").config_path().display().to_string();

    let ids = wait_until(Duration::from_secs(70), Duration::from_secs(1), || async {
        let ids = backup_ids(&config).await;
        (!ids.is_empty()).then_some(ids)
    })
    .await
    .with_context(|| cluster.log_tails(30))
    .unwrap();
    let (ok, out, err) = pgha(&["backup", "verify", "-c", &config, &ids[0]])
        .await
        .unwrap();
    assert!(ok, "verify failed: {out}{err}");

    // The backup is listed once its manifest is written; the agent counts
    // it once its last segment is archived and retention has run.
    let leader = cluster.leader_node().await.unwrap();
    let metrics = format!("{}/metrics", leader.api_url());
    let text = wait_until(
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async {
            let text = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
            text.contains("pgha_scheduled_backup_last_success_timestamp_seconds{")
                .then_some(text)
        },
    )
    .await
    .with_context(|| cluster.log_tails(30))
    .unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("pgha_scheduled_backup_failures_total{") && l.ends_with(" 0")),
        "{text}"
    );
    assert!(
        text.contains("pgha_scheduled_backup_last_duration_seconds{"),
        "{text}"
    );
}

/// One sample of an agent's `/metrics` (the first series of that name).
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `backup.schedule_timeout`: a scheduled backup from a replica whose
/// archiver is stuck (with `archive_mode = always` its `pg_backup_stop`
/// then waits for ever for the archive) is cancelled once it has run
/// longer than the timeout. The leader's `/metrics` counts a failure, the
/// log says why, no backup of that slot is listed as complete or left
/// behind in the repository, and once the replica archives again the next
/// slot runs and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backup_past_its_timeout_is_cancelled_and_counted() {
    let mut options = ClusterOptions::default().backup();
    options.backup.as_mut().unwrap().extend([
        ("schedule".into(), "\"* * * * *\"".into()),
        ("schedule_timeout".into(), "\"20s\"".into()),
    ]);
    let cluster = Cluster::start("bk-sched-timeout", 2, options)
        .await
        .unwrap();
    let config = cluster.node("node1").config_path().display().to_string();
    let repo = cluster.dir().join("repo");
    let leader = cluster.leader_node().await.unwrap();
    let replica = cluster.node(&cluster.replica_names().await.unwrap()[0]);
    let url = format!("{}/metrics", leader.api_url());
    let scrape = || async {
        let text = reqwest::get(&url).await.ok()?.text().await.ok()?;
        let get = |name: &str| metric(&text, name);
        Some((
            get("pgha_scheduled_backup_failures_total")?,
            get("pgha_scheduled_backup_running")?,
            get("pgha_scheduled_backup_last_success_timestamp_seconds"),
        ))
    };

    // The slot the new leader takes at once (or a later one) completes
    // normally, well within the timeout; then, with no backup running and
    // the next slot at least 15 s away, the replica's archiver stops.
    wait_until(
        Duration::from_secs(150),
        Duration::from_millis(500),
        || async {
            let (_, running, success) = scrape().await?;
            (success.is_some() && running == 0.0).then_some(())
        },
    )
    .await
    .with_context(|| cluster.log_tails(30))
    .unwrap();
    let failures_before = wait_until(
        Duration::from_secs(120),
        Duration::from_millis(200),
        || async {
            let second = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                % 60;
            let (failures, running, _) = scrape().await?;
            (second < 45 && running == 0.0).then_some(failures)
        },
    )
    .await
    .with_context(|| cluster.log_tails(30))
    .unwrap();
    let complete_before = backup_ids(&config).await;
    let archiver = replica
        .scalar("SELECT pid FROM pg_stat_activity WHERE backend_type = 'archiver'")
        .await
        .unwrap()
        .expect("the replica runs an archiver (archive_mode = always)");
    let archiver = nix::unistd::Pid::from_raw(archiver.parse().unwrap());
    nix::sys::signal::kill(archiver, nix::sys::signal::Signal::SIGSTOP).unwrap();

    // The next slot's backup hangs in pg_backup_stop on the replica until
    // the timeout cancels it (20 s), then it winds down.
    wait_until(
        Duration::from_secs(150),
        Duration::from_millis(500),
        || async {
            let (failures, running, _) = scrape().await?;
            (failures == failures_before + 1.0 && running == 0.0).then_some(())
        },
    )
    .await
    .with_context(|| cluster.log_tails(30))
    .unwrap();
    let log = leader.log_text();
    assert!(
        log.contains("scheduled backup still running after backup.schedule_timeout: cancelling it")
            && log.contains(
                "scheduled backup failed: it ran longer than backup.schedule_timeout and was cancelled"
            ),
        "{}",
        leader.log_tail(60)
    );
    assert_eq!(
        backup_ids(&config).await,
        complete_before,
        "the timed-out backup must not be listed as complete"
    );
    // Nothing of it stays behind: every backup directory is a complete one.
    let dirs: BTreeSet<String> = std::fs::read_dir(repo.join("backup"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        dirs,
        complete_before.iter().cloned().collect::<BTreeSet<_>>(),
        "partial backup left in the repository"
    );

    // The replica archives again: the next slot is taken as usual.
    nix::sys::signal::kill(archiver, nix::sys::signal::Signal::SIGCONT).unwrap();
    let ids = wait_until(Duration::from_secs(150), Duration::from_secs(1), || async {
        let ids = backup_ids(&config).await;
        ids.iter()
            .any(|id| !complete_before.contains(id))
            .then_some(ids)
    })
    .await
    .with_context(|| cluster.log_tails(30))
    .unwrap();
    let new = ids.iter().find(|id| !complete_before.contains(id)).unwrap();
    let (ok, out, err) = pgha(&["backup", "verify", "-c", &config, new])
        .await
        .unwrap();
    assert!(ok, "verify failed: {out}{err}");
    let (failures, _, _) = wait_until(
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async {
            let m = scrape().await?;
            (m.1 == 0.0).then_some(m)
        },
    )
    .await
    .unwrap();
    assert_eq!(failures, failures_before + 1.0, "{}", leader.log_tail(40));
}

/// `backup.clone_from = "backup"`: a new member with nothing in the
/// repository yet clones the leader; once a backup exists, the next new
/// member starts from it, replays the archived WAL written after it and
/// streams the rest (rows only in the leader's current segment), and ends
/// up with every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_replicas_start_from_the_newest_backup() {
    let mut options = ClusterOptions::default().backup();
    options
        .backup
        .as_mut()
        .unwrap()
        .push(("clone_from".into(), "\"backup\"".into()));
    let mut cluster = Cluster::start("bk-clone", 1, options).await.unwrap();
    let config = cluster.node("node1").config_path().display().to_string();
    let leader = cluster.node("node1");
    leader
        .psql(
            "CREATE TABLE clone_rows (id bigint PRIMARY KEY); \
             INSERT INTO clone_rows SELECT generate_series(1, 1000)",
        )
        .await
        .unwrap();

    // Nothing in the repository yet: the leader is cloned instead.
    cluster.add_node().unwrap().start().unwrap();
    cluster
        .wait_healthy(Duration::from_secs(60))
        .await
        .with_context(|| cluster.log_tails(30))
        .unwrap();
    let log = cluster.node("node2").log_text();
    assert!(
        log.contains("cannot start this replica from a backup; cloning the leader instead")
            && log.contains("no complete backup"),
        "{log}"
    );

    let (ok, out, err) = pgha(&["backup", "-c", &config, "--from", "leader", "--json"])
        .await
        .unwrap();
    assert!(ok, "pgha backup failed: {err}\n{}", cluster.log_tails(20));
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = summary["id"].as_str().expect("a backup id").to_string();
    let leader = cluster.node("node1");
    // Rows in archived WAL only, then rows in the leader's current segment.
    leader
        .psql("INSERT INTO clone_rows SELECT generate_series(1001, 2000)")
        .await
        .unwrap();
    leader.psql("SELECT pg_switch_wal()").await.unwrap();
    leader
        .psql("INSERT INTO clone_rows SELECT generate_series(2001, 3000)")
        .await
        .unwrap();

    cluster.add_node().unwrap().start().unwrap();
    cluster
        .wait_healthy(Duration::from_secs(90))
        .await
        .with_context(|| cluster.log_tails(30))
        .unwrap();
    let node3 = cluster.node("node3");
    let log = node3.log_text();
    assert!(
        log.contains("restored a backup as this replica's data directory") && log.contains(&id),
        "{log}"
    );
    // While it unpacked, the agent relayed the command's progress at info
    // level: the start with the backup's size, then the end (a backup this
    // small is unpacked before a periodic report is due), both before the
    // restore was reported done.
    let restored_at = log
        .find("restored a backup as this replica's data directory")
        .unwrap();
    let progress: Vec<&str> = log[..restored_at]
        .lines()
        .filter(|l| l.contains(" INFO ") && l.contains("restoring a backup for this replica"))
        .collect();
    let unpacked = format!("backup {id}: unpacked ");
    assert!(
        progress
            .first()
            .is_some_and(|l| l.contains(&format!("{unpacked}0 B of ")) && l.contains("(0%)")),
        "{log}"
    );
    assert!(
        progress.last().is_some_and(|l| l.contains(&unpacked)
            && l.contains("(100%)")
            && l.contains("/s on average, done")),
        "{log}"
    );
    let count = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            node3
                .scalar("SELECT count(*) FROM clone_rows")
                .await
                .ok()
                .flatten()
                .filter(|c| c == "3000")
        },
    )
    .await
    .with_context(|| cluster.log_tails(20));
    assert_eq!(count.unwrap(), "3000");
    // It is a standby that streams from the leader, not a restored copy
    // that promoted itself.
    assert!(!node3.is_writable().await.unwrap());
    assert_eq!(
        node3
            .scalar("SELECT status FROM pg_stat_wal_receiver")
            .await
            .unwrap()
            .as_deref(),
        Some("streaming")
    );
}

/// The S3 repository against a local S3-compatible server (moto): both
/// servers archive WAL into the bucket under a prefix, a base backup is
/// taken into it, stored in pieces (`s3_max_object_mib` lowered to 1 MiB
/// so that the test's small backup crosses it), and a restore to `latest`
/// from it has every row committed before, including those only in
/// archived WAL. A backup within the limit is one object; retention
/// removes every piece. The secret key stays in its private file: not in
/// the rendered repository files, and a credentials file others can read
/// is a configuration error (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_repository_archive_backup_and_restore_to_latest() {
    use crate::support::s3::{S3Server, SECRET};

    let s3 = S3Server::start("pgha-it").unwrap();
    let prefix = "clusters/s3";
    let opts = ClusterOptions {
        backup: Some(s3.backup_keys(prefix)),
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start("s3", 2, opts).await.unwrap();
    let node1_config = cluster.node("node1").config_path();
    let config = node1_config.display().to_string();
    // node1's file with more `[backup]` keys, beside it.
    let with_keys = |name: &str, keys: &str| {
        let text = std::fs::read_to_string(node1_config).unwrap();
        assert!(text.contains("\n[backup]\n"), "{text}");
        let path = node1_config.with_file_name(name);
        std::fs::write(
            &path,
            text.replace("\n[backup]\n", &format!("\n[backup]\n{keys}\n")),
        )
        .unwrap();
        path.display().to_string()
    };
    let pieces_config = with_keys("pieces.toml", "s3_max_object_mib = 1");
    let leader = cluster.leader().await.unwrap().unwrap();
    let node = cluster.node(&leader);
    node.psql(
        "CREATE TABLE s3_rows (id bigint PRIMARY KEY); \
         INSERT INTO s3_rows SELECT generate_series(1, 1000)",
    )
    .await
    .unwrap();

    let (ok, out, err) = pgha(&["backup", "-c", &pieces_config, "--json"])
        .await
        .unwrap();
    assert!(ok, "pgha backup failed: {err}\n{}", cluster.log_tails(20));
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = summary["id"].as_str().expect("a backup id").to_string();

    // Rows only in WAL archived after the backup.
    node.psql("INSERT INTO s3_rows SELECT generate_series(1001, 2000)")
        .await
        .unwrap();
    let segment = node
        .scalar("SELECT pg_walfile_name(pg_current_wal_lsn())")
        .await
        .unwrap()
        .unwrap();
    node.psql("SELECT pg_switch_wal()").await.unwrap();
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            let done = node
                .scalar(&format!(
                    "SELECT coalesce(last_archived_wal >= '{segment}', false) FROM pg_stat_archiver"
                ))
                .await
                .ok()??;
            (done == "t").then_some(())
        },
    )
    .await
    .with_context(|| format!("{segment} not archived\n{}", cluster.log_tails(20)))
    .unwrap();
    for name in cluster.replica_names().await.unwrap() {
        let failed = cluster
            .node(&name)
            .scalar("SELECT failed_count FROM pg_stat_archiver")
            .await
            .unwrap();
        assert_eq!(failed.as_deref(), Some("0"), "{name} failed to archive");
    }
    let archived = s3.keys(&format!("{prefix}/archive/00000001/")).unwrap();
    assert!(
        archived.iter().any(|k| k.contains(&segment)),
        "{segment} not in the bucket: {archived:?}"
    );
    let backups = s3.keys(&format!("{prefix}/backup/{id}/")).unwrap();
    let (ok, out, err) = pgha(&["backup", "list", "-c", &config, "--json"])
        .await
        .unwrap();
    assert!(ok, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let file = &list[0]["files"][0];
    let pieces: Vec<String> = file["pieces"]
        .as_array()
        .expect("the backup is in pieces")
        .iter()
        .map(|p| format!("{prefix}/{}", p["key"].as_str().unwrap()))
        .collect();
    assert!(pieces.len() >= 2, "{file}");
    let dir = format!("{prefix}/backup/{id}");
    let mut expected: Vec<String> = (1..=pieces.len())
        .map(|n| match n {
            1 => format!("{dir}/base.tar.zst"),
            n => format!("{dir}/base.tar.zst.{n}"),
        })
        .collect();
    assert_eq!(pieces, expected);
    assert!(
        file["pieces"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["stored_size"].as_u64().unwrap() <= 1 << 20),
        "{file}"
    );
    expected.push(format!("{dir}/backup_manifest.zst"));
    expected.push(format!("{dir}/manifest.json"));
    let mut backups = backups;
    backups.sort();
    expected.sort();
    assert_eq!(backups, expected, "no staging object left");
    assert!(
        s3.keys("").unwrap().iter().all(|k| k.starts_with(prefix)),
        "every object under the prefix"
    );
    assert_eq!(backup_ids(&config).await, std::slice::from_ref(&id));
    let (ok, out, err) = pgha(&["backup", "verify", "-c", &config]).await.unwrap();
    assert!(ok, "verify failed: {out}{err}");

    // What the agent renders for archive_command names the credentials
    // file, never the secret.
    for name in ["node1", "node2"] {
        let rendered = cluster.node(name).state_dir().join("postgres/backup.toml");
        let text = std::fs::read_to_string(&rendered).unwrap();
        assert!(text.contains("s3_credentials_file"), "{text}");
        assert!(!text.contains(SECRET), "{}", rendered.display());
    }

    let password = cluster.superuser_password().to_string();
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
    let restored_file = std::fs::read_to_string(latest_dir.join("pgha_backup.toml")).unwrap();
    assert!(!restored_file.contains(SECRET));
    let latest = Restored::start(&latest_dir, port_of(&latest_dir), &password)
        .await
        .unwrap();
    latest.wait_promoted().await.unwrap();
    let ids = latest.ids("s3_rows").await.unwrap();
    assert_eq!(ids, (1..=2000).collect::<BTreeSet<i64>>());
    drop(latest);

    // Within the limit (the default): one object, as before pieces. Then
    // retention keeping one backup removes every piece of the first.
    let (ok, out, err) = pgha(&["backup", "-c", &config, "--json"]).await.unwrap();
    assert!(ok, "pgha backup failed: {err}\n{}", cluster.log_tails(20));
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    let second = summary["id"].as_str().expect("a backup id").to_string();
    let mut keys = s3.keys(&format!("{prefix}/backup/{second}/")).unwrap();
    keys.sort();
    assert_eq!(
        keys,
        [
            format!("{prefix}/backup/{second}/backup_manifest.zst"),
            format!("{prefix}/backup/{second}/base.tar.zst"),
            format!("{prefix}/backup/{second}/manifest.json"),
        ]
    );
    let keep_one = with_keys("keep-one.toml", "keep = 1");
    let (ok, out, err) = pgha(&["backup", "expire", "-c", &keep_one, "--json"])
        .await
        .unwrap();
    assert!(ok, "expire failed: {out}{err}");
    assert_eq!(s3.keys(&format!("{dir}/")).unwrap(), Vec::<String>::new());
    assert_eq!(backup_ids(&config).await, [second]);

    // A credentials file group and others can read: a configuration
    // error naming the file and key, exit 2, and the secret not echoed.
    let loose = cluster.dir().join("loose.credentials");
    std::fs::copy(s3.credentials_file(), &loose).unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let repo_file = cluster.dir().join("loose.toml");
    std::fs::write(
        &repo_file,
        restored_file.replace(
            &s3.credentials_file().display().to_string(),
            &loose.display().to_string(),
        ),
    )
    .unwrap();
    let out = tokio::process::Command::new(PGHA_BIN)
        .args(["wal", "get", "-c"])
        .arg(&repo_file)
        .args(["000000010000000000000001"])
        .arg(cluster.dir().join("seg"))
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("backup.s3_credentials_file"), "{stderr}");
    assert!(stderr.contains("loose.toml"), "{stderr}");
    assert!(!stderr.contains(SECRET), "{stderr}");
}

/// Waits until `node` has archived the segment `pg_switch_wal()` just
/// closed.
async fn switch_and_wait_archived(node: &crate::support::Node) {
    let segment = node
        .scalar("SELECT pg_walfile_name(pg_switch_wal())")
        .await
        .unwrap()
        .expect("a segment name");
    let archived = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            node.scalar("SELECT last_archived_wal FROM pg_stat_archiver")
                .await
                .ok()
                .flatten()
                .filter(|last| last.as_str() >= segment.as_str())
        },
    )
    .await;
    assert!(archived.is_ok(), "{segment} was not archived");
}

/// A one-node source cluster for the bootstrap tests: rows 1-1000, a
/// backup, rows 1001-2000, a target time, rows 2001-3000, all archived.
/// Returns the cluster, the target time, its system identifier and a
/// repository file naming its repository.
async fn pitr_source(test: &str) -> (Cluster, String, Option<String>, PathBuf) {
    let source = Cluster::start(test, 1, ClusterOptions::default().backup())
        .await
        .unwrap();
    let node = source.node("node1");
    let config = node.config_path().display().to_string();
    node.psql(
        "CREATE TABLE boot_rows (id bigint PRIMARY KEY); \
         INSERT INTO boot_rows SELECT generate_series(1, 1000)",
    )
    .await
    .unwrap();
    let (ok, _, err) = pgha(&["backup", "-c", &config, "--from", "leader", "--json"])
        .await
        .unwrap();
    assert!(ok, "pgha backup failed: {err}\n{}", source.log_tails(20));
    node.psql("INSERT INTO boot_rows SELECT generate_series(1001, 2000)")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let target = node
        .scalar("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.psql("INSERT INTO boot_rows SELECT generate_series(2001, 3000)")
        .await
        .unwrap();
    // Recovery stops at the first commit after the target, so one must be
    // archived: the segment with the last insert is closed and archived.
    switch_and_wait_archived(node).await;
    let system = node
        .scalar("SELECT system_identifier::text FROM pg_control_system()")
        .await
        .unwrap();
    let source_file = source.dir().join("source-repository.toml");
    std::fs::write(
        &source_file,
        format!(
            "[backup]\nrepository = {:?}\n",
            source.dir().join("repo").display().to_string()
        ),
    )
    .unwrap();
    (source, target, system, source_file)
}

/// `[bootstrap.from_backup]`: a new cluster, with its own repository and
/// its own passwords, starts from another cluster's backup replayed to a
/// time between two commits. It holds exactly the rows committed before
/// that time, runs on a new timeline whose history reaches its own
/// repository, is the same database system as the source, admits its own
/// superuser, and its second member clones it and streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cluster_bootstraps_from_a_backup_to_a_point_in_time() {
    let (source, target, source_system, source_file) = pitr_source("bk-src").await;
    let options = ClusterOptions {
        extra_toml: format!(
            "\n[bootstrap.from_backup]\ntarget = \"{target}\"\nrepository_file = {:?}\n",
            source_file.display().to_string()
        ),
        ..ClusterOptions::default().backup()
    };
    let restored = Cluster::start("bk-boot", 2, options).await.unwrap();
    let leader = restored.leader_node().await.unwrap();
    assert_eq!(
        leader
            .scalar("SELECT count(*)::text || ' ' || max(id)::text FROM boot_rows")
            .await
            .unwrap()
            .as_deref(),
        Some("2000 2000"),
        "{}",
        restored.log_tails(30)
    );
    assert!(leader.is_writable().await.unwrap());
    assert_eq!(
        leader
            .scalar("SELECT system_identifier::text FROM pg_control_system()")
            .await
            .unwrap(),
        source_system
    );
    let timeline: u32 = leader
        .scalar("SELECT timeline_id::text FROM pg_control_checkpoint()")
        .await
        .unwrap()
        .unwrap()
        .parse()
        .unwrap();
    assert!(timeline >= 2, "still on timeline {timeline}");
    let log = leader.log_text();
    assert!(
        log.contains("cluster initialized from a backup"),
        "{}",
        restored.log_tails(30)
    );
    // Nothing of the restore outlives it: no recovery settings in force or
    // in the base configuration (replicas copy both), no copy of the
    // source repository's file, and only the new cluster's superuser
    // password opens it.
    for file in [
        "postgresql.auto.conf",
        "postgresql.base.conf",
        "postgresql.conf",
    ] {
        let text = std::fs::read_to_string(leader.data_dir().join(file)).unwrap_or_default();
        let set: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter(|l| {
                [
                    "recovery_target_time ",
                    "recovery_target_lsn",
                    "recovery_target_action",
                    "bootstrap-source",
                    "hot_standby = 'off'",
                ]
                .iter()
                .any(|k| l.contains(k))
            })
            .collect();
        assert!(set.is_empty(), "{file}: {set:?}");
    }
    assert!(!leader.data_dir().join("recovery.signal").exists());
    assert!(
        !leader
            .state_dir()
            .join("postgres/bootstrap-source.toml")
            .exists()
    );
    let old_password = connect(
        tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(leader.pg_port())
            .user(SUPERUSER)
            .password(source.superuser_password())
            .dbname("postgres"),
    )
    .await;
    assert!(old_password.is_err(), "the source's password still works");
    // The unpacking's progress reached the agent's log.
    assert!(
        log.lines().any(|l| l.contains(" INFO ")
            && l.contains("restoring the backup the cluster bootstraps from")
            && l.contains("(100%)")),
        "{log}"
    );
    // The new timeline continues in the new cluster's own repository.
    let history = format!("{timeline:08X}.history");
    let own_repo = restored.dir().join("repo");
    let found = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            archived(&own_repo, timeline)
                .iter()
                .any(|f| f.starts_with(&history))
                .then_some(())
        },
    )
    .await;
    assert!(
        found.is_ok(),
        "{history} not in {}: {:?}",
        own_repo.display(),
        archived(&own_repo, timeline)
    );
    // The second member cloned the restored leader and streams from it.
    let replica = restored
        .nodes
        .iter()
        .find(|n| n.name() != leader.name())
        .unwrap();
    let rows = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            replica
                .scalar("SELECT count(*) FROM boot_rows")
                .await
                .ok()
                .flatten()
                .filter(|c| c == "2000")
        },
    )
    .await;
    assert!(rows.is_ok(), "{}", restored.log_tails(30));
    assert!(!replica.is_writable().await.unwrap());
}

/// A bootstrap from a backup that cannot be done (the target is before
/// the only backup) creates no cluster: both members wait, the one that
/// tried says why and backs off, and no empty cluster takes the
/// restore's place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_from_an_unsuitable_backup_creates_no_cluster() {
    let source = Cluster::start("bk-nosrc", 1, ClusterOptions::default().backup())
        .await
        .unwrap();
    let config = source.node("node1").config_path().display().to_string();
    let (ok, _, err) = pgha(&["backup", "-c", &config, "--from", "leader"])
        .await
        .unwrap();
    assert!(ok, "pgha backup failed: {err}");
    let source_file = source.dir().join("source-repository.toml");
    std::fs::write(
        &source_file,
        format!(
            "[backup]\nrepository = {:?}\n",
            source.dir().join("repo").display().to_string()
        ),
    )
    .unwrap();
    let options = ClusterOptions {
        extra_toml: format!(
            "\n[bootstrap.from_backup]\ntarget = \"2001-01-01T00:00:00Z\"\nrepository_file = {:?}\n",
            source_file.display().to_string()
        ),
        ..ClusterOptions::default().backup()
    };
    let mut cluster = Cluster::create("bk-noboot", 2, options).await.unwrap();
    for name in ["node1", "node2"] {
        cluster.node_mut(name).start().unwrap();
    }
    let said = wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            cluster
                .nodes
                .iter()
                .any(|n| {
                    let log = n.log_text();
                    log.contains("before the oldest backup") && log.contains("will be tried again")
                })
                .then_some(())
        },
    )
    .await;
    assert!(said.is_ok(), "{}", cluster.log_tails(30));
    tokio::time::sleep(Duration::from_secs(3)).await;
    for node in &cluster.nodes {
        let log = node.log_text();
        assert!(
            !log.contains("cluster initialized") && !log.contains("running initdb"),
            "{}",
            cluster.log_tails(30)
        );
        assert!(
            !node.data_dir().join("PG_VERSION").exists(),
            "{}: a data directory was left behind",
            node.name()
        );
    }
}

/// `bootstrap.wal_segment_size`: initdb makes 4 MB segments, replicas have
/// them too, and backups record and follow them: after a failover, verify
/// walks the WAL chain across the timeline switch with the cluster's real
/// segment size (with PostgreSQL's default it would look for segments of
/// the new timeline that never existed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_wal_segments_from_initdb_through_backup_and_failover() {
    let options = ClusterOptions {
        extra_toml: "\n[bootstrap]\nwal_segment_size = \"4MB\"\n".into(),
        ..ClusterOptions::default().backup()
    };
    let mut cluster = Cluster::start("bk-seg", 2, options).await.unwrap();
    let repo = cluster.dir().join("repo");
    let config = cluster.node("node1").config_path().display().to_string();
    for node in &cluster.nodes {
        assert_eq!(
            node.scalar("SHOW wal_segment_size")
                .await
                .unwrap()
                .as_deref(),
            Some("4MB"),
            "{}",
            node.name()
        );
    }
    let leader = cluster.leader().await.unwrap().unwrap();
    let node = cluster.node(&leader);
    node.psql(
        "CREATE TABLE seg_rows (id bigint PRIMARY KEY, pad text); \
         INSERT INTO seg_rows SELECT i, repeat('x', 100) FROM generate_series(1, 100000) i",
    )
    .await
    .unwrap();
    let (ok, out, err) = pgha(&["backup", "-c", &config, "--json"]).await.unwrap();
    assert!(ok, "pgha backup failed: {err}\n{}", cluster.log_tails(20));
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = summary["id"].as_str().unwrap().to_string();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo.join(format!("backup/{id}/manifest.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["wal_segment_size"], 4 << 20);

    let new_leader = lose_the_leader(&mut cluster, &leader).await;
    let new_node = cluster.node(&new_leader);
    new_node
        .psql("INSERT INTO seg_rows SELECT i, repeat('y', 100) FROM generate_series(100001, 150000) i")
        .await
        .unwrap();
    let tl = new_node.timeline().await.unwrap();
    assert!(tl >= 2);
    switch_and_wait_archived(new_node).await;
    let (ok, out, err) = pgha(&["backup", "verify", "-c", &config]).await.unwrap();
    assert!(ok, "verify failed: {out}{err}");
}

/// Kills the agent of `node` as soon as its log has `marker` past
/// `from_len` bytes (polling every 10 ms), and starts it again. Returns the
/// log's length at the kill.
async fn kill_agent_at(cluster: &mut Cluster, node: &str, marker: &str, from_len: usize) -> usize {
    let seen = wait_until(
        Duration::from_secs(60),
        Duration::from_millis(10),
        || async {
            let log = cluster.node(node).log_text();
            log.get(from_len..)
                .is_some_and(|tail| tail.contains(marker))
                .then_some(())
        },
    )
    .await;
    assert!(seen.is_ok(), "no {marker:?}\n{}", cluster.log_tails(30));
    let n = cluster.node_mut(node);
    n.kill_agent().await.unwrap();
    let len = n.log_text().len();
    n.start().unwrap();
    len
}

/// The agent killed outright twice during a bootstrap from a backup: while
/// it unpacks (a partial copy, restored again from scratch) and just after
/// the restored server promoted (whole data, finished in place). Whatever
/// the kills interrupt, the cluster ends initialized with exactly the rows
/// before the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_during_a_bootstrap_restore_ends_in_the_right_cluster() {
    let (_source, target, _, source_file) = pitr_source("bk-ksrc").await;
    let options = ClusterOptions {
        extra_toml: format!(
            "\n[bootstrap.from_backup]\ntarget = \"{target}\"\nrepository_file = {:?}\n",
            source_file.display().to_string()
        ),
        ..ClusterOptions::default().backup()
    };
    let mut cluster = Cluster::create("bk-kill", 1, options).await.unwrap();
    cluster.node_mut("node1").start().unwrap();
    let at = kill_agent_at(
        &mut cluster,
        "node1",
        "restoring the cluster from a backup",
        0,
    )
    .await;
    let at = kill_agent_at(
        &mut cluster,
        "node1",
        "the restored server reached its target and promoted",
        at,
    )
    .await;
    cluster
        .wait_healthy(Duration::from_secs(120))
        .await
        .with_context(|| cluster.log_tails(40))
        .unwrap();
    let node = cluster.node("node1");
    assert_eq!(
        node.scalar("SELECT count(*)::text || ' ' || max(id)::text FROM boot_rows")
            .await
            .unwrap()
            .as_deref(),
        Some("2000 2000"),
        "{}",
        cluster.log_tails(40)
    );
    assert!(node.is_writable().await.unwrap());
    let log = node.log_text();
    assert!(
        log[..at].contains("restored server reached its target and promoted"),
        "{log}"
    );
    // The first kill came during the unpacking: the partial copy was
    // restored again, never adopted.
    assert!(log.contains("restoring again"), "{log}");
}
