//! A synchronous standby cut off from the leader while a third member
//! streams (architecture.md, S6, "a standby that stops replying").
//!
//! The cut is the walreceiver of the synchronous standby stopped with
//! SIGSTOP: its connection stays open, so the leader's
//! `pg_stat_replication` keeps listing it as `streaming` until
//! `wal_sender_timeout`, but it replies no more — what a network cut looks
//! like to the leader. The test sets `wal_sender_timeout = 60s`
//! (PostgreSQL's default) so that only the reply age can end the stall:
//! before the fix, commits waited the whole 60 s.

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgha::dcs::SyncRecord;
use pgha::dcs::keys::Keys;

use crate::support::cluster::{self, children_of, cmdline};
use crate::support::{Cluster, ClusterOptions, OneWritablePrimary, Writer, wait_until};

const POLL: Duration = Duration::from_millis(100);
/// The leader records and settles its synchronous set within a few loops.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Writes resume about a TTL (3 s) plus two loops and a writer reconnect
/// after the cut; generous for a loaded host, yet far below the 60 s the
/// walsender takes to give up on the standby.
const RESUME_DEADLINE: Duration = Duration::from_secs(15);
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends SIGCONT to a stopped process when dropped (also on panic), so no
/// stopped PostgreSQL process outlives the test or stalls its cleanup.
struct Stopped(i32);

impl Stopped {
    fn stop(pid: i32) -> Stopped {
        kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("SIGSTOP the walreceiver");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGCONT);
    }
}

async fn read_sync(cluster: &Cluster) -> Option<SyncRecord> {
    let mut client = cluster.etcd.client().await.ok()?;
    let key = Keys::new("pgha", cluster.name()).sync();
    let resp = client.get(key, None).await.ok()?;
    serde_json::from_slice(resp.kvs().first()?.value()).ok()
}

/// Waits until `leader` owns a settled record naming exactly `member`.
async fn wait_record(cluster: &Cluster, leader: &str, member: Option<&str>) -> SyncRecord {
    let last = std::sync::Mutex::new(None::<SyncRecord>);
    wait_until(SETTLE_TIMEOUT, POLL, || async {
        let rec = read_sync(cluster).await?;
        *last.lock().unwrap() = Some(rec.clone());
        let names: Vec<&str> = rec.members.iter().map(|m| m.as_str()).collect();
        let wanted = match member {
            Some(m) => names == [m],
            None => names.len() == 1 && names[0] != leader,
        };
        (rec.leader.as_str() == leader && !rec.degraded && rec.quorum == 1 && wanted).then_some(rec)
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{leader} never settled the synchronous set on {member:?}; last record {:?}: {e:#}\n{}",
            last.lock().unwrap(),
            cluster.log_tails(30)
        )
    })
}

/// The pid of the walreceiver under `name`'s postmaster.
async fn walreceiver_pid(cluster: &Cluster, name: &str) -> i32 {
    let node = cluster.node(name);
    wait_until(Duration::from_secs(30), POLL, || async {
        children_of(node.postmaster_pid()?)
            .into_iter()
            .find(|&p| cmdline(p).join(" ").contains("walreceiver"))
    })
    .await
    .unwrap_or_else(|e| panic!("no walreceiver under {name}'s postmaster: {e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_synchronous_standby_is_replaced_and_writes_resume() {
    let started = Instant::now();
    let mut cluster = Cluster::start(
        "sync-cut",
        3,
        ClusterOptions::default().parameter("wal_sender_timeout", "\"60s\""),
    )
    .await
    .expect("start a 3-node cluster");
    let config = cluster.nodes[0].config_path().to_path_buf();
    cluster::pgha(
        &[
            "config",
            "set",
            "synchronous_mode=on",
            "synchronous_node_count=1",
            "synchronous_quorum=false",
        ],
        &config,
    )
    .await
    .expect("enable synchronous mode");
    let leader = cluster.leader().await.unwrap().expect("a leader");
    let first = wait_record(&cluster, &leader, None).await;
    let cut = first.members[0].as_str().to_string();
    let other = cluster
        .nodes
        .iter()
        .map(|n| n.name().to_string())
        .find(|n| *n != leader && *n != cut)
        .expect("a third member");

    let checker = OneWritablePrimary::start(&cluster);
    let writer = Writer::start(&cluster).await.expect("start the writer");
    writer
        .wait_for_progress(50, Duration::from_secs(30))
        .await
        .expect("writes flow in synchronous mode");

    // The cut: the synchronous standby stops replying, its connection and
    // its agent stay up.
    let frozen = Stopped::stop(walreceiver_pid(&cluster, &cut).await);
    let cut_at = Instant::now();
    eprintln!(
        "[sync-cut] {cut}'s walreceiver stopped after {:?}; leader {leader}, other {other}",
        started.elapsed()
    );
    let before = writer.acknowledged_count();
    let resumed = wait_until(RESUME_DEADLINE, Duration::from_millis(20), || async {
        (writer.acknowledged_count() >= before + 20).then_some(())
    })
    .await;
    if let Err(e) = resumed {
        panic!(
            "writes did not resume within {RESUME_DEADLINE:?} of cutting {cut}: {e:#}; record {:?}\n{}",
            read_sync(&cluster).await,
            cluster.log_tails(30)
        );
    }
    let resumed_after = cut_at.elapsed();
    // Still listed as streaming: the walsender had not given up, so the
    // reply age is what let writes go on.
    let rows = cluster
        .node(&leader)
        .psql(&format!(
            "SELECT state FROM pg_stat_replication WHERE application_name = '{cut}'"
        ))
        .await
        .expect("read pg_stat_replication");
    assert_eq!(
        rows,
        vec![vec![Some("streaming".to_string())]],
        "{cut} should still be listed as streaming"
    );
    let settled = wait_record(&cluster, &leader, Some(&other)).await;
    eprintln!(
        "[sync-cut] writes resumed {resumed_after:?} after the cut; record settled on {:?} after {:?}",
        settled.members,
        cut_at.elapsed()
    );

    // The replacement holds every acknowledged commit: lose the leader
    // (node loss) while the cut lasts, and the new synchronous standby
    // takes over with all of them.
    cluster
        .node_mut(&leader)
        .kill_agent()
        .await
        .expect("kill the leader's agent");
    cluster.node(&leader).kill_postgres();
    let new_leader = cluster
        .wait_for_leader_other_than(&leader, FAILOVER_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("no failover: {e:#}\n{}", cluster.log_tails(30)));
    assert_eq!(
        new_leader, other,
        "only the recorded synchronous standby may be promoted"
    );
    // The new leader waits for a synchronous standby: the cut one comes back.
    drop(frozen);
    writer
        .wait_for_progress(20, FAILOVER_TIMEOUT)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "writes did not resume on {new_leader}: {e:#}\n{}",
                cluster.log_tails(30)
            )
        });
    let report = writer.stop().await;
    checker.stop().await.assert_ok();
    let missing = report
        .missing_on(cluster.node(&new_leader))
        .await
        .expect("read the ids on the new leader");
    assert!(
        missing.is_empty(),
        "{new_leader} lacks acknowledged ids (lost commits): {:?} of {} acknowledged",
        missing.iter().take(50).collect::<Vec<_>>(),
        report.acknowledged.len()
    );
    eprintln!(
        "[sync-cut] {} acknowledged, {} unknown, all on {new_leader}; test took {:?}",
        report.acknowledged.len(),
        report.unknown.len(),
        started.elapsed()
    );
}
