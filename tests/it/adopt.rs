//! Putting an existing database under pgha without a dump and restore: the
//! production server becomes the new cluster's first leader, the other
//! nodes clone it.
//!
//! The database is made the way an operator's would be: initdb without
//! checksums (so pg_rewind depends on pgha turning `wal_log_hints` on), a
//! superuser password different from the one pgha is configured with, a
//! setting in postgresql.conf and one set by `ALTER SYSTEM`. It runs, with
//! a writer committing into it, when the three agents start at the same
//! moment.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::support::cluster::{SUPERUSER, connect};
use crate::support::{Cluster, ClusterOptions, Node, wait_until};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const ROWS: i64 = 20_000;

/// The account pgha runs the server as: the `postgres` user when the
/// tests run as root, the current user otherwise (`None`).
fn pg_owner() -> Option<nix::unistd::User> {
    nix::unistd::geteuid().is_root().then(|| {
        nix::unistd::User::from_name("postgres")
            .expect("look the postgres user up")
            .expect("a postgres user")
    })
}

/// Runs a PostgreSQL tool as [`pg_owner`].
pub(crate) fn as_pg_owner(tool: &str) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(Path::new(PG_BIN).join(tool));
    if let Some(user) = pg_owner() {
        cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    cmd.stdin(Stdio::null()).env("LC_ALL", "C.UTF-8");
    cmd
}

pub(crate) fn run(mut cmd: std::process::Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("run {what}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The database as it was before pgha: created, running on the node's
/// port, holding data.
pub(crate) async fn standalone_database(node: &Node, old_password: &str) -> anyhow::Result<()> {
    let data = node.data_dir();
    std::fs::create_dir_all(node.dir())?;
    let pwfile = node.dir().join("old-password");
    std::fs::write(&pwfile, old_password)?;
    std::fs::create_dir(data)?;
    if let Some(user) = pg_owner() {
        nix::unistd::chown(data, Some(user.uid), Some(user.gid))?;
    }
    std::fs::set_permissions(data, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let mut initdb = as_pg_owner("initdb");
    initdb
        .arg("-D")
        .arg(data)
        .args(["-U", SUPERUSER, "--auth=scram-sha-256", "--encoding=UTF8"])
        .arg(format!("--pwfile={}", pwfile.display()));
    run(initdb, "initdb (no checksums)")?;
    std::fs::remove_file(&pwfile)?;
    // An operator's own setting, kept through the adoption.
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))?;
    std::io::Write::write_all(&mut conf, b"\nmax_connections = 57\n")?;
    let mut start = as_pg_owner("pg_ctl");
    start
        .arg("-D")
        .arg(data)
        .arg("-l")
        .arg(data.join("standalone.log"))
        .arg("-o")
        .arg(format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}",
            node.pg_port(),
            data.display()
        ))
        .args(["-w", "-t", "60", "start"]);
    run(start, "start the standalone server")?;
    let client = connect(&pg_config(node, old_password)).await?;
    client
        .batch_execute("ALTER SYSTEM SET work_mem = '7MB'")
        .await
        .context("ALTER SYSTEM")?;
    client
        .batch_execute(&format!(
            "SELECT pg_reload_conf();
             CREATE TABLE items (id bigint PRIMARY KEY, payload text NOT NULL);
             INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) g;
             CREATE TABLE acked (id bigint PRIMARY KEY);
             CHECKPOINT;"
        ))
        .await
        .context("fill the standalone database")?;
    Ok(())
}

fn pg_config(node: &Node, password: &str) -> tokio_postgres::Config {
    let mut c = node.pg_config();
    c.password(password).connect_timeout(Duration::from_secs(1));
    c
}

/// What the writer saw: ids the server acknowledged, and failures with the
/// time they happened.
#[derive(Default)]
struct History {
    acked: Vec<i64>,
    errors: Vec<(Instant, String)>,
    /// When a write first succeeded with pgha's password, i.e. after the
    /// restart under pgha.
    first_after_restart: Option<Instant>,
}

/// Commits one row at a time into node1, directly (no pgha in the path,
/// as the application did before), with whichever password the server
/// takes: the old one until the adoption, pgha's after.
fn start_writer(
    node: &Node,
    old_password: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (Arc<Mutex<History>>, tokio::task::JoinHandle<()>) {
    let history = Arc::new(Mutex::new(History::default()));
    let new_config = pg_config(node, node.superuser_password());
    let old_config = pg_config(node, &old_password);
    let h = history.clone();
    let task = tokio::spawn(async move {
        let mut next = 1i64;
        let mut client: Option<(tokio_postgres::Client, bool)> = None;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            if client.as_ref().is_none_or(|(c, _)| c.is_closed()) {
                client = match connect(&new_config).await {
                    Ok(c) => Some((c, true)),
                    Err(_) => connect(&old_config).await.ok().map(|c| (c, false)),
                };
                if client.is_none() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
            let (c, under_pgha) = client.as_ref().expect("connected");
            let id = next;
            next += 1;
            let write = tokio::time::timeout(
                Duration::from_secs(20),
                c.execute("INSERT INTO acked VALUES ($1)", &[&id]),
            )
            .await;
            let under_pgha = *under_pgha;
            let failed = {
                let mut h = h.lock().unwrap();
                match write {
                    Ok(Ok(_)) => {
                        h.acked.push(id);
                        if under_pgha && h.first_after_restart.is_none() {
                            h.first_after_restart = Some(Instant::now());
                        }
                        false
                    }
                    Ok(Err(e)) => {
                        h.errors.push((Instant::now(), e.to_string()));
                        true
                    }
                    Err(_) => {
                        h.errors.push((Instant::now(), "timed out".into()));
                        true
                    }
                }
            };
            if failed {
                client = None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    (history, task)
}

/// `count(*)` and a digest of every row of `items`, and how many of the
/// `acked` ids are present (a write whose outcome the writer never learnt
/// may be there too; it is not counted).
async fn contents(node: &Node, acked: &[i64]) -> anyhow::Result<(String, String, String)> {
    let ids: Vec<String> = acked.iter().map(i64::to_string).collect();
    let rows = node
        .psql(&format!(
            "SELECT count(*)::text, md5(string_agg(id::text || payload, ',' ORDER BY id)) FROM items;
             SELECT count(*)::text FROM acked WHERE id = ANY('{{{}}}'::bigint[])",
            ids.join(",")
        ))
        .await?;
    Ok((
        rows[0][0].clone().unwrap_or_default(),
        rows[0][1].clone().unwrap_or_default(),
        rows[1][0].clone().unwrap_or_default(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_database_under_writes_becomes_the_first_leader() {
    let started = Instant::now();
    let say = |msg: String| eprintln!("[adopt +{:6.2}s] {msg}", started.elapsed().as_secs_f64());
    let mut cluster = Cluster::create("adopt", 3, ClusterOptions::default())
        .await
        .unwrap_or_else(|e| panic!("create the cluster: {e:#}"));
    let old_password = format!("old-{}", std::process::id());
    standalone_database(&cluster.nodes[0], &old_password)
        .await
        .unwrap_or_else(|e| panic!("set up the standalone database: {e:#}"));
    let expected_digest = {
        let c = connect(&pg_config(&cluster.nodes[0], &old_password))
            .await
            .unwrap();
        let row = c
            .query_one(
                "SELECT md5(string_agg(id::text || payload, ',' ORDER BY id)) FROM items",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, String>(0)
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (history, writer) = start_writer(&cluster.nodes[0], old_password.clone(), stop.clone());
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async { (history.lock().unwrap().acked.len() >= 20).then_some(()) },
    )
    .await
    .expect("the writer commits into the standalone database");
    say("standalone database running with a writer; starting three agents at once".into());

    for node in &mut cluster.nodes {
        node.start().unwrap();
    }
    let list = match cluster.wait_healthy(Duration::from_secs(120)).await {
        Ok(l) => l,
        Err(e) => panic!("{e:#}\n{}", cluster.log_tails(40)),
    };
    say(format!("healthy: {list}"));
    assert_eq!(
        cluster.leader().await.unwrap().as_deref(),
        Some("node1"),
        "the adopted database leads"
    );
    // Writes go on under pgha for a moment, replicated synchronously.
    let acked_then = history.lock().unwrap().acked.len();
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || async { (history.lock().unwrap().acked.len() >= acked_then + 50).then_some(()) },
    )
    .await
    .expect("writes go on after the adoption");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.await.unwrap();

    let (acked_ids, acked) = {
        let h = history.lock().unwrap();
        let restarted = h
            .first_after_restart
            .expect("the writer got in with pgha's password");
        let late_errors: Vec<&String> = h
            .errors
            .iter()
            .filter(|(at, _)| *at > restarted)
            .map(|(_, e)| e)
            .collect();
        assert!(
            late_errors.is_empty(),
            "no write fails once the adopted server runs under pgha: {late_errors:?}"
        );
        say(format!(
            "{} writes acknowledged, {} failed during the restart",
            h.acked.len(),
            h.errors.len()
        ));
        (h.acked.clone(), h.acked.len().to_string())
    };

    // Every row, on every node, once the replicas have replayed it all.
    for node in &cluster.nodes {
        let got = wait_until(
            Duration::from_secs(30),
            Duration::from_millis(200),
            || async {
                contents(node, &acked_ids)
                    .await
                    .ok()
                    .filter(|c| c.2 == acked)
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{}: acknowledged rows: {e:#}", node.name()));
        assert_eq!(got.0, ROWS.to_string(), "{}: rows of items", node.name());
        assert_eq!(got.1, expected_digest, "{}: contents of items", node.name());
        assert_eq!(
            node.scalar("SHOW data_checksums").await.unwrap().as_deref(),
            Some("off"),
            "{}: the data is the original's, checksums and all",
            node.name()
        );
        assert_eq!(
            node.scalar("SHOW wal_log_hints").await.unwrap().as_deref(),
            Some("on"),
            "{}: pg_rewind works without checksums",
            node.name()
        );
    }
    let leader = &cluster.nodes[0];
    // The operator's settings survive, from both places.
    assert_eq!(
        leader
            .scalar("SHOW max_connections")
            .await
            .unwrap()
            .as_deref(),
        Some("57")
    );
    assert_eq!(
        leader.scalar("SHOW work_mem").await.unwrap().as_deref(),
        Some("7MB")
    );
    // The old password no longer opens the database: pgha's roles and
    // rules are in force.
    assert!(
        connect(&pg_config(leader, &old_password)).await.is_err(),
        "the superuser's old password is replaced"
    );
    assert!(
        leader.data_dir().join("pg_hba.conf.before-pgha").is_file(),
        "the original pg_hba.conf is kept"
    );
    let log = leader.log_text();
    assert!(
        log.contains("stopping the running server to adopt it"),
        "{}",
        leader.log_tail(40)
    );
    for replica in &cluster.nodes[1..] {
        let log = replica.log_text();
        assert!(
            !log.contains("won the bootstrap race"),
            "{} never created a cluster of its own:\n{}",
            replica.name(),
            replica.log_tail(40)
        );
    }
}
