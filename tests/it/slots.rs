//! Replication slots across a change of leader.
//!
//! Regression: a leader creates its members' slots reserving WAL, and the
//! members' hot_standby_feedback gives them an xmin. After a switchover the
//! former leader, now a replica, kept both: nothing streamed from those
//! slots or moved them, so every WAL segment since the switchover stayed in
//! its pg_wal (a fault run filled a 512 MB disk) and the stale xmin went to
//! the new leader with the replica's feedback. The former leader must now
//! hold, in its slots for the other members, no WAL older than what it has
//! replayed (in practice: none) and no xmin.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::support::cluster::pgha;
use crate::support::{Cluster, ClusterOptions, Node, wait_until};

const POLL: Duration = Duration::from_millis(250);
/// Generous: other suites share the 2-core host.
const TIMEOUT: Duration = Duration::from_secs(60);
const SEGMENT: i64 = 16 * 1024 * 1024;
/// WAL segments written on the new leader after the switchover: several
/// times [`SEGMENT`], so that a slot left where the switchover put it
/// lags replay by far more than the bound checked below.
const SEGMENTS_WRITTEN: usize = 6;

/// One of pgha's slots on `node`, with how far behind the server's own
/// position (replay on a replica) its `restart_lsn` is.
#[derive(Debug)]
struct Slot {
    name: String,
    restart_lsn: Option<String>,
    active: bool,
    holds_xmin: bool,
    behind: Option<i64>,
}

async fn pgha_slots(node: &Node) -> anyhow::Result<Vec<Slot>> {
    let rows = node
        .psql(
            "SELECT slot_name, restart_lsn::text, active::text,
                    (xmin IS NOT NULL OR catalog_xmin IS NOT NULL)::text,
                    pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                                         ELSE pg_current_wal_lsn() END,
                                    restart_lsn)::bigint::text
               FROM pg_replication_slots
              WHERE slot_name LIKE 'pgha\\_%'
              ORDER BY slot_name",
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| Slot {
            name: r[0].clone().unwrap_or_default(),
            restart_lsn: r[1].clone(),
            active: r[2].as_deref() == Some("true"),
            holds_xmin: r[3].as_deref() == Some("true"),
            behind: r[4].as_deref().and_then(|b| b.parse().ok()),
        })
        .collect())
}

/// The WAL receiver streams from `leader`.
async fn streams_from(replica: &Node, leader: &Node) -> bool {
    replica
        .scalar("SELECT sender_port::text FROM pg_stat_wal_receiver WHERE status = 'streaming'")
        .await
        .ok()
        .flatten()
        .is_some_and(|port| port == leader.pg_port().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_former_leader_keeps_no_wal_or_xmin_in_its_slots() {
    let started = Instant::now();
    let say = |msg: String| eprintln!("[slots +{:6.2}s] {msg}", started.elapsed().as_secs_f64());
    let cluster = Cluster::start("slots-demoted", 3, ClusterOptions::default())
        .await
        .unwrap_or_else(|e| panic!("start a 3-node cluster: {e:#}"));
    let first_name = cluster.leader().await.unwrap().expect("a leader");
    let second_name = cluster.replica_names().await.unwrap()[0].clone();
    let (first, second) = (cluster.node(&first_name), cluster.node(&second_name));

    // The state the defect starts from: the leader's slots are in use and
    // reserve WAL.
    let leading = wait_until(TIMEOUT, POLL, || async {
        let slots = pgha_slots(first).await.ok()?;
        (slots.len() == 2 && slots.iter().all(|s| s.active && s.restart_lsn.is_some()))
            .then_some(slots)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.log_tails(30)));
    say(format!("leader {first_name}, slots {leading:?}"));

    let out = pgha(&["switchover", "--to", &second_name], first.config_path())
        .await
        .unwrap_or_else(|e| panic!("switchover: {e:#}\n{}", cluster.log_tails(30)));
    say(format!("switchover: {}", out.trim().replace('\n', " / ")));
    wait_until(TIMEOUT, POLL, || async {
        streams_from(first, second).await.then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.log_tails(30)));
    let from = second
        .scalar("SELECT pg_current_wal_lsn()::text")
        .await
        .unwrap()
        .expect("an LSN");
    say(format!(
        "{first_name} streams from {second_name}, which is at {from}"
    ));

    for _ in 0..SEGMENTS_WRITTEN {
        second
            .psql(
                "CREATE TABLE IF NOT EXISTS slot_wal (i int);
                 INSERT INTO slot_wal SELECT generate_series(1, 1000);
                 SELECT pg_switch_wal();",
            )
            .await
            .unwrap();
    }
    second.psql("CHECKPOINT").await.unwrap();
    let written: i64 = second
        .scalar(&format!(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{from}')::bigint::text"
        ))
        .await
        .unwrap()
        .expect("a distance")
        .parse()
        .unwrap();
    let target = second
        .scalar("SELECT pg_current_wal_lsn()::text")
        .await
        .unwrap()
        .expect("an LSN");
    say(format!(
        "wrote {written} bytes of WAL on {second_name}, up to {target}"
    ));
    assert!(
        written > 4 * SEGMENT,
        "too little WAL for a stale slot to stand out"
    );

    // Replayed past the writes, with both slots (for the new leader and the
    // other replica) still there, idle, holding at most a segment's worth
    // of WAL behind replay and no xmin.
    // pgha's slot names: the member name, sanitized, after a prefix.
    let others: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| n.name())
        .filter(|n| *n != first_name)
        .map(|n| {
            let safe: String = n
                .to_lowercase()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            format!("pgha_{safe}")
        })
        .collect();
    let last = Mutex::new(String::new());
    let settled = wait_until(TIMEOUT, POLL, || {
        let (last, target, others) = (&last, &target, &others);
        async move {
            let caught_up = first
                .scalar(&format!(
                    "SELECT (pg_last_wal_replay_lsn() >= '{target}')::text"
                ))
                .await
                .ok()
                .flatten()
                .is_some_and(|t| t == "true");
            let slots = pgha_slots(first).await.ok()?;
            *last.lock().unwrap() = format!("caught up {caught_up}, slots {slots:?}");
            let names: Vec<&str> = slots.iter().map(|s| s.name.as_str()).collect();
            let clean = names == *others
                && slots
                    .iter()
                    .all(|s| !s.active && !s.holds_xmin && s.behind.is_none_or(|b| b < SEGMENT));
            (caught_up && clean).then_some(slots)
        }
    })
    .await;
    match settled {
        Ok(slots) => say(format!("{first_name} as a replica: {slots:?}")),
        Err(e) => panic!(
            "{first_name}, now a replica, still holds WAL or an xmin in its slots: {e:#}\nlast seen: {}\n{}",
            last.lock().unwrap(),
            cluster.log_tails(30)
        ),
    }
}
