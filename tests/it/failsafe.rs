//! Failsafe mode against real etcd outages (docs/architecture.md, S2a):
//! with every member reachable, a primary stays writable for as long as
//! etcd is gone; with one member unreachable as well, it stops writes
//! before its lease could have expired.

use std::time::{Duration, Instant};

use pgha::dcs::keys::Keys;

use crate::support::cluster::{Cluster, ClusterOptions, members, pgha};
use crate::support::oracle::{OneWritablePrimary, Writer};
use crate::support::wait_until;

const TTL: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(100);

fn keys(cluster: &Cluster) -> Keys {
    Keys::new("pgha", cluster.name())
}

async fn failsafe_cluster(test: &str) -> Cluster {
    let cluster = Cluster::start(test, 3, ClusterOptions::default().api_token())
        .await
        .expect("start a 3-node cluster");
    let config = cluster.nodes[0].config_path().to_path_buf();
    pgha(
        &["config", "set", "failsafe_mode=on", "synchronous_mode=on"],
        &config,
    )
    .await
    .expect("turn failsafe mode on");
    cluster
}

/// The `failsafe` record, once the leader has published one listing all
/// three members.
async fn wait_failsafe_record(cluster: &Cluster, leader: &str) -> serde_json::Value {
    let key = format!("{}failsafe", keys(cluster).prefix());
    wait_until(Duration::from_secs(30), POLL, || async {
        let mut client = cluster.etcd.client().await.ok()?;
        let resp = client.get(key.as_str(), None).await.ok()?;
        let value: serde_json::Value = serde_json::from_slice(resp.kvs().first()?.value()).ok()?;
        (value["leader"] == leader && value["members"].as_object()?.len() == 3).then_some(value)
    })
    .await
    .expect("the leader publishes the failsafe membership")
}

async fn leader_key(cluster: &Cluster) -> Option<String> {
    let key = format!("{}leader", keys(cluster).prefix());
    let mut client = cluster.etcd.client().await.ok()?;
    let resp = client.get(key.as_str(), None).await.ok()?;
    Some(resp.kvs().first()?.value_str().ok()?.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_gone_for_half_a_minute_keeps_the_primary_writable() {
    let mut cluster = failsafe_cluster("failsafe-outage").await;
    let leader = cluster.leader().await.unwrap().expect("a leader");
    wait_failsafe_record(&cluster, &leader).await;
    let timeline_before = cluster.node(&leader).timeline().await.unwrap();
    let checker = OneWritablePrimary::start(&cluster);
    let writer = Writer::start(&cluster).await.expect("start the writer");
    writer
        .wait_for_progress(20, Duration::from_secs(30))
        .await
        .unwrap();
    let log_marks: Vec<usize> = cluster.nodes.iter().map(|n| n.log_text().len()).collect();

    // Frozen rather than stopped: requests hang until they time out, the
    // slowest way for etcd to fail.
    cluster.etcd.pause().expect("freeze etcd");
    let outage = Duration::from_secs(30);
    let frozen_at = Instant::now();
    while frozen_at.elapsed() < outage {
        tokio::time::sleep(Duration::from_secs(5)).await;
        writer
            .wait_for_progress(10, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "writes stalled {:?} into the etcd outage: {e:#}\n{}",
                    frozen_at.elapsed(),
                    cluster.log_tails(30)
                )
            });
        assert!(
            cluster.node(&leader).is_writable().await.unwrap_or(false),
            "{leader} stopped being writable {:?} into the outage\n{}",
            frozen_at.elapsed(),
            cluster.log_tails(30)
        );
    }
    let status = cluster.node(&leader).status().await.unwrap();
    assert_eq!(
        status["failsafe"]["last_round"]["extended"], true,
        "the leader's last failsafe round: {status}"
    );
    cluster.etcd.resume().expect("thaw etcd");

    // etcd back: the same member holds the key again, nobody was rewound.
    let back = wait_until(Duration::from_secs(30), POLL, || async {
        leader_key(&cluster).await
    })
    .await
    .expect("a leader key after etcd returned");
    assert_eq!(back, leader, "the leader changed across the outage");
    cluster
        .wait_healthy(Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("not healthy after etcd returned: {e:#}"));
    writer
        .wait_for_progress(20, Duration::from_secs(30))
        .await
        .unwrap();
    let report = writer.stop().await;
    assert!(
        report.unknown.is_empty() && report.connect_failures == 0 && report.sessions == 1,
        "clients saw errors: {} unknown, {} failed connects, {} sessions, last error {:?}",
        report.unknown.len(),
        report.connect_failures,
        report.sessions,
        report.last_error
    );
    let missing = report.missing_on(cluster.node(&leader)).await.unwrap();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
    checker.stop().await.assert_ok();
    assert_eq!(
        cluster.node(&leader).timeline().await.unwrap(),
        timeline_before,
        "a promotion happened"
    );
    for (node, mark) in cluster.nodes.iter().zip(log_marks) {
        let log = &node.log_text()[mark..];
        assert!(
            !log.contains("pg_rewind") && !log.contains("rewinding"),
            "{} was rewound:\n{}",
            node.name(),
            node.log_tail(40)
        );
    }
    cluster.etcd.start().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_gone_and_a_member_silent_stops_writes_before_the_lease_ends() {
    let cluster = failsafe_cluster("failsafe-silent").await;
    let leader = cluster.leader().await.unwrap().expect("a leader");
    wait_failsafe_record(&cluster, &leader).await;
    let replica = cluster.replica_names().await.unwrap().remove(0);
    let checker = OneWritablePrimary::start(&cluster);
    let writer = Writer::start(&cluster).await.expect("start the writer");
    writer
        .wait_for_progress(20, Duration::from_secs(30))
        .await
        .unwrap();

    // The replica's agent cannot answer (its API is frozen with it), and
    // etcd is gone: the leader cannot get every confirmation.
    cluster.node(&replica).freeze().unwrap();
    cluster.etcd.pause().expect("freeze etcd");
    let cut_at = Instant::now();
    let stopped_after = wait_until(TTL * 3, Duration::from_millis(20), || async {
        (!cluster.node(&leader).is_writable().await.unwrap_or(false)).then(|| cut_at.elapsed())
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "the leader stayed writable: {e:#}\n{}",
            cluster.log_tails(30)
        )
    });
    // Its last renewal was sent before the cut, so its lease in etcd ends
    // less than one TTL after it: writes must stop before that.
    assert!(
        stopped_after < TTL,
        "the leader stopped writes {stopped_after:?} after the cut, not within the TTL ({TTL:?})"
    );
    eprintln!("the leader stopped writes {stopped_after:?} after etcd and {replica} went silent");

    cluster.node(&replica).thaw().unwrap();
    cluster.etcd.resume().expect("thaw etcd");
    cluster
        .wait_healthy(Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "not healthy after the fault: {e:#}\n{}",
                cluster.log_tails(30)
            )
        });
    writer
        .wait_for_progress(20, Duration::from_secs(60))
        .await
        .unwrap();
    let report = writer.stop().await;
    // Asked only now: right after etcd returns, the old lease may still
    // expire and move the key once more.
    let list = cluster.wait_healthy(Duration::from_secs(60)).await.unwrap();
    let new_leader = members(&list)
        .into_iter()
        .find(|m| m["role"] == "leader")
        .and_then(|m| m["name"].as_str().map(str::to_string))
        .expect("a leader");
    let missing = report.missing_on(cluster.node(&new_leader)).await.unwrap();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
    checker.stop().await.assert_ok();
}
