//! The operations an operator runs for years: a parameter change that
//! reaches every member, a rolling restart that applies one needing a
//! restart (the leader by switchover) with applications writing through
//! it, rebuilding a broken replica, and the read-only views.

use std::time::Duration;

use serde_json::Value;

use crate::support::cluster::{members, pgha};
use crate::support::oracle::Writer;
use crate::support::{Cluster, ClusterOptions, wait_until};

/// `pgha list --json` until `done` holds for it.
async fn wait_list(
    cluster: &Cluster,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let last = std::sync::Mutex::new(Value::Null);
    let result = wait_until(timeout, Duration::from_millis(250), || async {
        let list = cluster.list_json().await.ok()?;
        *last.lock().unwrap() = list.clone();
        done(&list).then_some(list)
    })
    .await;
    match result {
        Ok(list) => list,
        Err(e) => panic!(
            "{what}: {e:#}\nlast list: {:#}\n{}",
            last.lock().unwrap(),
            cluster.log_tails(30)
        ),
    }
}

fn pending_of(list: &Value, member: &str) -> Vec<String> {
    members(list)
        .iter()
        .find(|m| m["name"] == member)
        .and_then(|m| m["pending_restart"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_applies_a_pending_parameter_without_client_errors() {
    let opts = ClusterOptions {
        embedded_proxy: true,
        ..ClusterOptions::default()
    }
    .api_token();
    let cluster = Cluster::start("roll", 3, opts)
        .await
        .unwrap_or_else(|e| panic!("start the cluster: {e:#}"));
    let config = cluster.nodes[0].config_path().to_path_buf();
    let first_leader = cluster.leader().await.unwrap().expect("a leader");
    // Applications write through a proxy (node3's agent runs one): the
    // switchover of the rolling restart pauses them, it must not fail one.
    let entry = &cluster.nodes[2];
    let mut proxy = tokio_postgres::Config::new();
    proxy
        .host("127.0.0.1")
        .port(entry.proxy_port().expect("an embedded proxy"))
        .user(crate::support::cluster::SUPERUSER)
        .password(entry.superuser_password())
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(2));
    let writer = Writer::start_patient(proxy, "roll_writes", Duration::from_secs(20))
        .await
        .unwrap();
    writer
        .wait_for_progress(20, Duration::from_secs(30))
        .await
        .unwrap();
    // And one with the multi-host connection string `pgha dsn` prints:
    // its session is on the leader, so the switchover ends it (libpq has
    // no way around that); the replicas' restarts must not touch it.
    let direct = Writer::start(&cluster).await.unwrap();

    // One parameter a reload applies, one that needs a restart.
    pgha(
        &[
            "config",
            "set",
            "postgresql.parameters.work_mem=5MB",
            "postgresql.parameters.max_connections=120",
        ],
        &config,
    )
    .await
    .unwrap();
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name().to_string()).collect();
    wait_list(
        &cluster,
        Duration::from_secs(30),
        "every member reports the pending restart",
        |l| {
            names
                .iter()
                .all(|n| pending_of(l, n) == vec!["max_connections".to_string()])
        },
    )
    .await;
    for node in &cluster.nodes {
        assert_eq!(
            node.scalar("SHOW work_mem").await.unwrap().as_deref(),
            Some("5MB"),
            "{}: the reload reached it",
            node.name()
        );
    }

    // The leader is in the plan: refused without --switchover.
    let refused = pgha(&["restart", "--pending"], &config).await.unwrap_err();
    assert!(
        format!("{refused:#}").contains("pass --switchover"),
        "{refused:#}"
    );

    let out = pgha(
        &["restart", "--pending", "--switchover", "--timeout", "120s"],
        &config,
    )
    .await
    .unwrap_or_else(|e| panic!("rolling restart: {e:#}\n{}", cluster.log_tails(40)));
    eprintln!("{out}");
    assert!(out.contains("rolling restart done"), "{out}");
    // Replicas first, one at a time, the leader last.
    let order: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("restarting ")?.strip_suffix("..."))
        .collect();
    assert_eq!(order.len(), 3, "{out}");
    assert_eq!(order[2], first_leader, "the leader goes last: {out}");

    let list = wait_list(
        &cluster,
        Duration::from_secs(30),
        "healthy, nothing pending",
        |l| {
            crate::support::cluster::is_healthy(l, &names.iter().cloned().collect())
                && names.iter().all(|n| pending_of(l, n).is_empty())
        },
    )
    .await;
    let leader_now = members(&list)
        .iter()
        .find(|m| m["role"] == "leader")
        .and_then(|m| m["name"].as_str().map(str::to_string))
        .unwrap();
    assert_ne!(leader_now, first_leader, "the leader was handed over");
    for node in &cluster.nodes {
        assert_eq!(
            node.scalar("SHOW max_connections")
                .await
                .unwrap()
                .as_deref(),
            Some("120"),
            "{}: restarted with the new value",
            node.name()
        );
    }

    let report = writer.stop().await;
    assert!(
        report.unknown.is_empty() && report.last_error.is_none() && report.sessions == 1,
        "no write failed and the session was never cut: {} unknown, {} sessions, last error {:?}",
        report.unknown.len(),
        report.sessions,
        report.last_error
    );
    let leader = cluster.node(&leader_now);
    let missing = report.missing_on(leader).await.unwrap();
    assert!(
        missing.is_empty(),
        "{} acknowledged writes missing",
        missing.len()
    );
    let direct = direct.stop().await;
    eprintln!(
        "multi-host writer: {} acknowledged, {} with unknown outcome, {} sessions, last error {:?}",
        direct.acknowledged.len(),
        direct.unknown.len(),
        direct.sessions,
        direct.last_error
    );
    assert!(
        direct.sessions <= 3 && direct.unknown.len() <= 2,
        "the multi-host writer lost its session only at the switchover: {} sessions, {} unknown",
        direct.sessions,
        direct.unknown.len()
    );
    let missing = direct.missing_on(leader).await.unwrap();
    assert!(
        missing.is_empty(),
        "{} acknowledged writes missing",
        missing.len()
    );

    // `pgha reload` reaches every member.
    let out = pgha(&["reload"], &config).await.unwrap();
    assert_eq!(
        out.lines().filter(|l| l.ends_with(": reloaded")).count(),
        3,
        "{out}"
    );

    // `pgha dsn` reaches the leader whichever member holds it.
    let dsn = pgha(&["dsn"], &config).await.unwrap();
    let mut c: tokio_postgres::Config = dsn.trim().parse().expect("a libpq connection string");
    c.user(crate::support::cluster::SUPERUSER)
        .password(cluster.nodes[0].superuser_password())
        .dbname("postgres");
    let client = crate::support::cluster::connect(&c).await.unwrap();
    let writable: bool = client
        .query_one("SELECT NOT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(writable, "{dsn}");

    // `pgha topology`: the leader with both replicas under it.
    let topo: Value =
        serde_json::from_str(&pgha(&["topology", "--json"], &config).await.unwrap()).unwrap();
    let roots = topo["members"].as_array().unwrap();
    assert_eq!(roots.len(), 1, "{topo:#}");
    assert_eq!(roots[0]["name"], leader_now.as_str());
    assert_eq!(
        roots[0]["replicas"].as_array().unwrap().len(),
        2,
        "{topo:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reinit_rebuilds_a_replica_whose_data_directory_is_broken() {
    let cluster = Cluster::start("reinit", 3, ClusterOptions::default().api_token())
        .await
        .unwrap_or_else(|e| panic!("start the cluster: {e:#}"));
    let config = cluster.nodes[0].config_path().to_path_buf();
    let leader_name = cluster.leader().await.unwrap().expect("a leader");
    let leader = cluster.node(&leader_name);
    leader
        .psql(
            "CREATE TABLE kept AS SELECT g AS id FROM generate_series(1, 5000) g;
             SELECT pg_switch_wal(); CHECKPOINT;",
        )
        .await
        .unwrap();
    let victim = cluster
        .nodes
        .iter()
        .find(|n| n.name() != leader_name)
        .unwrap();

    let refused = pgha(&["reinit", &leader_name], &config).await.unwrap_err();
    assert!(
        format!("{refused:#}").contains("is the leader"),
        "{refused:#}"
    );

    // A replica loses part of its data directory: pgha refuses to touch
    // it by itself.
    victim.kill_postgres();
    let data = victim.data_dir();
    std::fs::remove_file(data.join("global/pg_control")).unwrap();
    std::fs::remove_dir_all(data.join("base")).unwrap();
    let name = victim.name().to_string();
    wait_list(
        &cluster,
        Duration::from_secs(30),
        "the broken replica is left alone",
        |l| {
            members(l).iter().any(|m| {
                m["name"] == name.as_str()
                    && m["decision"]
                        .as_str()
                        .is_some_and(|d| d.contains("neither empty nor valid"))
            })
        },
    )
    .await;

    let out = pgha(&["reinit", &name, "--timeout", "120s"], &config)
        .await
        .unwrap_or_else(|e| panic!("reinit: {e:#}\n{}", cluster.log_tails(40)));
    assert!(out.contains("cloned and streaming"), "{out}");
    let count = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            victim
                .scalar("SELECT count(*)::text FROM kept")
                .await
                .ok()
                .flatten()
        },
    )
    .await
    .unwrap();
    assert_eq!(count, "5000");
}
