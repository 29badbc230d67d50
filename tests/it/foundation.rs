//! Cluster foundation: a real etcd, real agents, real PostgreSQL 15.
//!
//! A cluster bootstraps to one leader and streaming replicas, replicas
//! rebuild a lost data directory, an agent without etcd does nothing
//! harmful, a restarted leader agent picks its lease back up without
//! touching PostgreSQL, and a bad configuration stops the agent before it
//! writes anything. Every test has its own etcd, ports and directories.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::cluster::{self, members, pids_mentioning};
use crate::support::{
    Cluster, ClusterOptions, Node, OneWritablePrimary, ProcessGuard, TestDir, Writer, free_port,
    wait_until,
};

const POLL: Duration = Duration::from_millis(100);
/// Replication on an idle loopback cluster takes milliseconds; the slack is
/// for parallel tests on a small host.
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(20);

/// Waits until `sql` returns `expected` (first column of the first row) on
/// `node`.
async fn wait_for_value(node: &Node, sql: &str, expected: &str, timeout: Duration) {
    let last = std::sync::Mutex::new(String::new());
    let r = wait_until(timeout, POLL, || async {
        match node.scalar(sql).await {
            Ok(v) if v.as_deref() == Some(expected) => Some(()),
            Ok(v) => {
                *last.lock().unwrap() = format!("{v:?}");
                None
            }
            Err(e) => {
                *last.lock().unwrap() = format!("{e:#}");
                None
            }
        }
    })
    .await;
    if let Err(e) = r {
        panic!(
            "{}: {sql:?} never returned {expected:?} (last: {}): {e:#}",
            node.name(),
            last.lock().unwrap()
        );
    }
}

/// Every `pgha list --json` key, at the top level and per member.
const LIST_KEYS: &[&str] = &["cluster", "paused", "members"];
const MEMBER_KEYS: &[&str] = &[
    "name",
    "role",
    "state",
    "host",
    "port",
    "timeline",
    "lag_bytes",
    "api_url",
    "decision",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_one_leader_and_two_streaming_replicas() {
    let started = Instant::now();
    let cluster = Cluster::start("fnd-up", 3, ClusterOptions::default())
        .await
        .expect("start a 3-node cluster");
    eprintln!("cluster healthy after {:?}", started.elapsed());

    let leader_name = cluster.leader().await.unwrap().expect("a leader");
    let leader = cluster.node(&leader_name);
    let replicas: Vec<&Node> = cluster
        .nodes
        .iter()
        .filter(|n| n.name() != leader_name)
        .collect();
    assert_eq!(replicas.len(), 2);

    // What PostgreSQL itself says matches what pgha says.
    assert!(
        leader.is_writable().await.unwrap(),
        "the leader is writable"
    );
    for r in &replicas {
        assert!(
            !r.is_writable().await.unwrap(),
            "{} must be in recovery",
            r.name()
        );
        let receiver = r
            .scalar("SELECT status FROM pg_stat_wal_receiver")
            .await
            .unwrap();
        assert_eq!(receiver.as_deref(), Some("streaming"), "{}", r.name());
    }
    let sysid = leader.system_identifier().await.unwrap();
    for r in &replicas {
        assert_eq!(r.system_identifier().await.unwrap(), sysid, "{}", r.name());
    }

    // A row written on the leader reaches both replicas.
    leader
        .psql("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'hello')")
        .await
        .unwrap();
    for r in &replicas {
        wait_for_value(
            r,
            "SELECT v FROM t WHERE id = 1",
            "hello",
            REPLICATION_TIMEOUT,
        )
        .await;
    }

    // Once caught up, `pgha list --json` shows no lag anywhere.
    let list = wait_until(REPLICATION_TIMEOUT, Duration::from_millis(200), || async {
        let list = cluster.list_json().await.ok()?;
        let all_zero = members(&list).len() == 3
            && members(&list)
                .iter()
                .all(|m| m["lag_bytes"].as_u64() == Some(0));
        all_zero.then_some(list)
    })
    .await
    .unwrap_or_else(|e| panic!("lag never reached 0 everywhere: {e:#}"));
    for key in LIST_KEYS {
        assert!(
            list.get(key).is_some(),
            "pgha list --json lacks {key}: {list}"
        );
    }
    assert_eq!(list["cluster"], cluster.name());
    assert_eq!(list["paused"], false);
    let ms = members(&list);
    assert_eq!(
        ms[0]["name"], leader_name,
        "the leader is listed first: {list}"
    );
    for m in &ms {
        for key in MEMBER_KEYS {
            assert!(m.get(key).is_some(), "member lacks {key}: {m}");
        }
        let node = cluster.node(m["name"].as_str().unwrap());
        assert_eq!(m["host"], "127.0.0.1");
        assert_eq!(m["port"], node.pg_port());
        assert_eq!(m["api_url"], node.api_url());
        assert_eq!(m["timeline"], 1, "a fresh cluster is on timeline 1: {m}");
        if m["name"] == leader_name.as_str() {
            assert_eq!(
                (&m["role"], &m["state"]),
                (&"leader".into(), &"running".into())
            );
        } else {
            assert_eq!(
                (&m["role"], &m["state"]),
                (&"replica".into(), &"streaming".into())
            );
        }
    }

    // The REST API agrees, health checks included.
    for n in &cluster.nodes {
        let status = n.status().await.unwrap();
        let is_leader = n.name() == leader_name;
        assert_eq!(status["name"], n.name());
        assert_eq!(status["leader"], is_leader, "{status}");
        assert_eq!(status["dcs_reachable"], true, "{status}");
        assert_eq!(
            status["role"],
            if is_leader { "primary" } else { "replica" },
            "{status}"
        );
        let (primary, _) = n.api_get("/primary").await.unwrap();
        let (replica, _) = n.api_get("/replica").await.unwrap();
        assert_eq!(
            (primary, replica),
            if is_leader { (200, 503) } else { (503, 200) },
            "{}: /primary and /replica",
            n.name()
        );
    }

    // The oracles agree with a healthy cluster: writes through the
    // multi-host connection land on the leader, reach every replica, and
    // only one server is ever writable.
    let checker = OneWritablePrimary::start(&cluster);
    let writer = Writer::start(&cluster).await.unwrap();
    writer
        .wait_for_progress(100, Duration::from_secs(20))
        .await
        .unwrap();
    let report = writer.stop().await;
    let checks = checker.stop().await;
    checks.assert_ok();
    assert!(checks.rounds >= 5, "checker rounds: {}", checks.rounds);
    assert_eq!(
        checks.writable_rounds.keys().collect::<Vec<_>>(),
        vec![&leader_name],
        "only the leader is ever writable: {checks:?}"
    );
    assert!(
        report.unknown.is_empty(),
        "no failed insert expected: {report:?}"
    );
    assert_eq!(report.sessions, 1, "no reconnection expected: {report:?}");
    // The checker does report two writable servers: point it at the
    // leader under two names.
    let twice = OneWritablePrimary::start_with(vec![
        ("a".into(), leader.pg_config()),
        ("b".into(), leader.pg_config()),
    ]);
    wait_until(Duration::from_secs(10), POLL, || async {
        (!twice.violations_so_far().is_empty()).then_some(())
    })
    .await
    .expect("the checker must flag two writable servers");
    let flagged = twice.stop().await;
    assert_eq!(flagged.violations[0].nodes, ("a".into(), "b".into()));
    for n in &cluster.nodes {
        let missing = wait_until(REPLICATION_TIMEOUT, POLL, || async {
            let missing = report.missing_on(n).await.ok()?;
            missing.is_empty().then_some(())
        })
        .await;
        assert!(
            missing.is_ok(),
            "{} lacks acknowledged rows: {:?}",
            n.name(),
            report.missing_on(n).await
        );
    }

    // Dropping the fixture leaves nothing behind.
    let dir = cluster.dir().to_path_buf();
    let postmasters: Vec<i32> = cluster
        .nodes
        .iter()
        .filter_map(Node::postmaster_pid)
        .collect();
    assert_eq!(postmasters.len(), 3);
    drop(cluster);
    assert_eq!(
        pids_mentioning(&dir),
        Vec::<i32>::new(),
        "processes left behind"
    );
    for pm in postmasters {
        assert!(!cluster::alive(pm), "postmaster {pm} survived the fixture");
    }
    eprintln!("test took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_with_wiped_data_directory_reclones_and_streams() {
    let started = Instant::now();
    let mut cluster = Cluster::start("fnd-wipe", 3, ClusterOptions::default())
        .await
        .expect("start a 3-node cluster");
    let leader_name = cluster.leader().await.unwrap().expect("a leader");
    cluster
        .node(&leader_name)
        .psql(
            "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'before wipe')",
        )
        .await
        .unwrap();
    let victim_name = cluster.replica_names().await.unwrap()[0].clone();
    wait_for_value(
        cluster.node(&victim_name),
        "SELECT v FROM t WHERE id = 1",
        "before wipe",
        REPLICATION_TIMEOUT,
    )
    .await;
    let sysid = cluster
        .node(&leader_name)
        .system_identifier()
        .await
        .unwrap();

    let victim = cluster.node_mut(&victim_name);
    let status = victim.stop().await.expect("stop the replica's agent");
    assert!(
        status.success(),
        "agent exit status after SIGTERM: {status}"
    );
    assert_eq!(
        victim.postmaster_pid(),
        None,
        "SIGTERM stops PostgreSQL too"
    );
    std::fs::remove_dir_all(victim.data_dir()).expect("wipe the data directory");
    victim.start().unwrap();

    cluster
        .wait_healthy(Duration::from_secs(60))
        .await
        .expect("the wiped replica streams again");
    let victim = cluster.node(&victim_name);
    assert!(victim.data_dir().join("PG_VERSION").is_file());
    assert_eq!(victim.system_identifier().await.unwrap(), sysid);
    assert!(!victim.is_writable().await.unwrap());
    wait_for_value(
        victim,
        "SELECT v FROM t WHERE id = 1",
        "before wipe",
        REPLICATION_TIMEOUT,
    )
    .await;
    // And it follows new writes.
    cluster
        .node(&leader_name)
        .psql("INSERT INTO t VALUES (2, 'after wipe')")
        .await
        .unwrap();
    wait_for_value(
        victim,
        "SELECT v FROM t WHERE id = 2",
        "after wipe",
        REPLICATION_TIMEOUT,
    )
    .await;
    assert!(
        victim.log_text().contains("clone complete"),
        "the agent logs the clone:\n{}",
        victim.log_tail(40)
    );
    assert_eq!(
        cluster.leader().await.unwrap().as_deref(),
        Some(leader_name.as_str()),
        "the leader did not change"
    );
    eprintln!("test took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_without_etcd_keeps_running_and_never_starts_postgres() {
    let dir = TestDir::new("fnd-noetcd");
    // A port nothing listens on.
    let endpoints = vec![format!("http://127.0.0.1:{}", free_port())];
    let mut node = Node::new(
        &dir,
        "noetcd",
        "node1",
        &endpoints,
        &ClusterOptions::default(),
    )
    .unwrap();
    node.start().unwrap();

    let observe_for = Duration::from_secs(5);
    let until = Instant::now() + observe_for;
    while Instant::now() < until {
        assert!(
            node.agent_running(),
            "the agent exited: {:?}\n{}",
            node.agent_exit_status(),
            node.log_tail(20)
        );
        assert!(
            !node.data_dir().join("postmaster.pid").exists(),
            "PostgreSQL was started without etcd"
        );
        assert!(
            !node.pg_port_open().await,
            "something listens on the PostgreSQL port"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(node.postmaster_pid(), None);
    assert!(
        cluster::data_dir_is_empty(node.data_dir()),
        "no initdb without etcd"
    );

    let log = node.log_text();
    let etcd_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("etcd") && (l.contains("WARN") || l.contains("ERROR")))
        .collect();
    assert!(
        !etcd_lines.is_empty(),
        "the agent should log a warning naming etcd; log:\n{log}"
    );
    // The API is up and says why nothing happens.
    let status = node.status().await.expect("GET /status");
    assert_eq!(status["dcs_reachable"], false, "{status}");
    assert_eq!(status["leader"], false, "{status}");
    assert_eq!(status["state"], "stopped", "{status}");
    assert!(node.agent_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_leader_agent_resumes_leadership_without_touching_postgres() {
    let started = Instant::now();
    let mut cluster = Cluster::start("fnd-restart", 3, ClusterOptions::default())
        .await
        .expect("start a 3-node cluster");
    let leader_name = cluster.leader().await.unwrap().expect("a leader");
    let leader = cluster.node(&leader_name);
    leader
        .psql("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'kept')")
        .await
        .unwrap();
    let sysid = leader.system_identifier().await.unwrap();
    let timeline = leader.timeline().await.unwrap();
    let pm = leader.postmaster_pid().expect("the leader's postmaster");
    let status_before = leader.status().await.unwrap();
    assert_eq!(status_before["leader"], true);

    let leader = cluster.node_mut(&leader_name);
    let old_agent = leader.agent_pid().unwrap();
    leader.kill_agent().await.unwrap();
    let killed_at = Instant::now();
    leader.start().unwrap();
    assert_ne!(leader.agent_pid(), Some(old_agent));

    // The new agent resumes the lease (well within the TTL).
    let leader = cluster.node(&leader_name);
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            let s = leader.status().await.ok()?;
            (s["leader"] == true && s["lease_valid"] == true).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "the restarted agent never held the lease: {e:#}\n{}",
            leader.log_tail(30)
        )
    });
    eprintln!("lease resumed {:?} after the kill", killed_at.elapsed());

    // Give a missed renewal every chance to show: the old fence deadline
    // and the old lease would both have run out by now.
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster
        .wait_healthy(Duration::from_secs(10))
        .await
        .expect("the cluster stays healthy");
    assert_eq!(
        cluster.leader().await.unwrap().as_deref(),
        Some(leader_name.as_str()),
        "leadership must not move"
    );
    assert_eq!(leader.postmaster_pid(), Some(pm), "PostgreSQL kept running");
    assert_eq!(
        leader.system_identifier().await.unwrap(),
        sysid,
        "no re-initialisation"
    );
    assert_eq!(
        leader.timeline().await.unwrap(),
        timeline,
        "no new timeline"
    );
    assert!(leader.is_writable().await.unwrap());
    assert_eq!(
        leader
            .scalar("SELECT v FROM t WHERE id = 1")
            .await
            .unwrap()
            .as_deref(),
        Some("kept")
    );
    leader
        .psql("INSERT INTO t VALUES (2, 'after restart')")
        .await
        .unwrap();
    for r in cluster.replica_names().await.unwrap() {
        wait_for_value(
            cluster.node(&r),
            "SELECT v FROM t WHERE id = 2",
            "after restart",
            REPLICATION_TIMEOUT,
        )
        .await;
    }
    let log = leader.log_text();
    assert!(
        log.contains("resumed the leader lease"),
        "the agent logs the adoption:\n{}",
        leader.log_tail(30)
    );
    assert!(
        !leader.fence_log().contains("killed postmaster"),
        "the fence keeper fired:\n{}",
        leader.fence_log()
    );
    for n in &cluster.nodes {
        let log = n.log_text();
        for forbidden in ["running initdb", "promoted", "acquired the leader lease"] {
            if n.name() == leader_name && forbidden == "acquired the leader lease" {
                continue; // it acquired it once, at bootstrap
            }
            let count = log.matches(forbidden).count();
            let allowed = usize::from(n.name() == leader_name && forbidden == "running initdb");
            assert!(
                count <= allowed,
                "{}: {forbidden:?} appears {count} times:\n{}",
                n.name(),
                n.log_tail(30)
            );
        }
    }
    eprintln!("test took {:?}", started.elapsed());
}

/// The fence keeper takes an exclusive lock so that one keeper guards a
/// data directory however often the agent restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_leaves_exactly_one_fence_keeper() {
    let mut cluster = Cluster::start("fnd-keeper", 1, ClusterOptions::default())
        .await
        .expect("start a 1-node cluster");
    let node = cluster.node_mut("node1");
    assert_eq!(node.fence_keeper_pids().len(), 1, "one keeper after start");
    assert_nudge_pipe(&node.fence_keeper_pids());
    for round in 1..=2 {
        node.kill_agent().await.unwrap();
        node.start().unwrap();
        let n: &Node = node;
        wait_until(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || async {
                let s = n.status().await.ok()?;
                (s["leader"] == true && s["lease_valid"] == true).then_some(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("round {round}: lease not resumed: {e:#}"));
        let keepers = node.fence_keeper_pids();
        assert_eq!(
            keepers.len(),
            1,
            "round {round}: fence keepers guarding {}: {keepers:?}\nfence-keeper.log:\n{}",
            node.data_dir().display(),
            node.fence_log()
        );
        assert_nudge_pipe(&keepers);
    }
}

/// Each keeper's standard input is its own nudge pipe from the agent
/// that started it.
fn assert_nudge_pipe(keepers: &[i32]) {
    for pid in keepers {
        let stdin = std::fs::read_link(format!("/proc/{pid}/fd/0")).unwrap();
        assert!(
            stdin.to_string_lossy().starts_with("pipe:"),
            "keeper {pid}: standard input is {stdin:?}, not the nudge pipe"
        );
    }
}

/// Runs `pgha agent -c <config>` expecting a configuration error: exit code
/// 2 within a few seconds. Returns stderr.
async fn agent_config_error(dir: &Path, config: &Path) -> String {
    let stderr_path = dir.join("bad-agent.stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let mut agent = ProcessGuard::spawn(
        Command::new(cluster::PGHA_BIN)
            .arg("agent")
            .arg("-c")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr),
    )
    .unwrap();
    let status = agent.wait_timeout(Duration::from_secs(10)).await;
    let text = std::fs::read_to_string(&stderr_path).unwrap();
    let status = status
        .unwrap_or_else(|| panic!("the agent kept running with a bad config; stderr:\n{text}"));
    assert_eq!(
        status.code(),
        Some(2),
        "exit status {status}; stderr:\n{text}"
    );
    text
}

fn assert_one_line_naming(stderr: &str, config: &Path, key: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got:\n{stderr}");
    let line = lines[0];
    assert!(
        line.contains(&config.display().to_string()),
        "the error must name the file {}: {line}",
        config.display()
    );
    assert!(
        line.contains(key),
        "the error must name the key {key}: {line}"
    );
}

fn assert_nothing_created(node: &Node) {
    assert!(
        !node.data_dir().exists(),
        "data dir created: {}",
        node.data_dir().display()
    );
    assert!(
        !node.state_dir().exists(),
        "state dir created: {}",
        node.state_dir().display()
    );
}

#[tokio::test]
async fn config_with_unknown_key_exits_2_naming_file_and_key() {
    let dir = TestDir::new("fnd-badkey");
    let endpoints = vec![format!("http://127.0.0.1:{}", free_port())];
    let opts = ClusterOptions::default().ha("loopwait", "\"1s\"");
    let node = Node::new(&dir, "badkey", "node1", &endpoints, &opts).unwrap();
    let stderr = agent_config_error(dir.path(), node.config_path()).await;
    assert_one_line_naming(&stderr, node.config_path(), "loopwait");
    assert!(stderr.contains("ha"), "the key's table is named: {stderr}");
    assert_nothing_created(&node);
}

#[tokio::test]
async fn config_with_impossible_timing_exits_2_naming_file_and_key() {
    let dir = TestDir::new("fnd-badttl");
    let endpoints = vec![format!("http://127.0.0.1:{}", free_port())];
    // 500ms + 1s + 1s > 2s: a healthy leader would fence itself.
    let opts = ClusterOptions::default()
        .ha("ttl", "\"2s\"")
        .ha("fence_margin", "\"1s\"");
    let node = Node::new(&dir, "badttl", "node1", &endpoints, &opts).unwrap();
    let stderr = agent_config_error(dir.path(), node.config_path()).await;
    assert_one_line_naming(&stderr, node.config_path(), "ha.ttl");
    assert_nothing_created(&node);
}
