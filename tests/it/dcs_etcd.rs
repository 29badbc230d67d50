//! `EtcdDcs` against a real etcd: the guarantees the HA logic relies on
//! (one initializer, one leader, leases that expire, leader-only writes,
//! bounded calls when etcd is gone, prompt wake-ups) checked end to end.
//!
//! Every test starts its own etcd, so they run in parallel and an outage
//! simulated by one test cannot disturb another.

use std::time::{Duration, Instant};

use pgha::config::EtcdConfig;
use pgha::dcs::etcd::EtcdDcs;
use pgha::dcs::keys::Keys;
use pgha::dcs::{
    ClusterConfig, Dcs, DcsError, FailoverRequest, Initialize, LeaseRenewal, Revision,
    update_config,
};
use pgha::model::{HistoryEntry, Lsn, MemberName, MemberRecord, PgRole, PgState, Timeline};
use pgha::util::{boottime_ms, unix_ms};

use crate::support::{Etcd, TestDir, free_port, wait_until};

/// Generous TTL for tests where nothing should expire.
const LONG_TTL: Duration = Duration::from_secs(30);
/// Short TTL for expiry tests; etcd's minimum with default timings is ~1.5 s.
const SHORT_TTL: Duration = Duration::from_secs(2);
const TIMEOUT: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(100);

/// A test dir and an etcd in it. Field order matters: etcd is dropped
/// (killed) before its directory is removed.
struct Env {
    etcd: Etcd,
    _dir: TestDir,
}

async fn env(test: &str) -> Env {
    let dir = TestDir::new(test);
    let etcd = Etcd::spawn(&dir, "e1").await.expect("start etcd");
    Env { etcd, _dir: dir }
}

/// Plain http endpoints, no credentials.
fn plain(endpoints: &[String]) -> EtcdConfig {
    EtcdConfig {
        endpoints: endpoints.to_vec(),
        credentials: None,
        tls: None,
    }
}

async fn member(
    endpoints: &[String],
    cluster: &str,
    name: &str,
    ttl: Duration,
    watch: bool,
) -> EtcdDcs {
    EtcdDcs::connect(
        &plain(endpoints),
        Keys::new("pgha", cluster),
        MemberName::new(name),
        ttl,
        TIMEOUT,
        watch,
    )
    .await
    .unwrap_or_else(|e| panic!("connect {name}: {e}"))
}

impl Env {
    async fn member(&self, cluster: &str, name: &str, ttl: Duration) -> EtcdDcs {
        member(&self.etcd.endpoints(), cluster, name, ttl, false).await
    }
}

fn record(name: &str, state: PgState) -> MemberRecord {
    MemberRecord {
        name: MemberName::new(name),
        api_url: "http://127.0.0.1:8008".into(),
        host: "127.0.0.1".into(),
        port: 5432,
        role: PgRole::Replica,
        state,
        timeline: Some(Timeline(1)),
        received_lsn: Some(Lsn(0x300_0060)),
        replayed_lsn: None,
        flushed_lsn: None,
        upstream: None,
        priority: 100,
        nofailover: false,
        nosync: false,
        last_decision: None,
        updated_at_ms: unix_ms(),
        parameters: Default::default(),
        adoptable: false,
    }
}

fn history_entry(new_timeline: u32, leader: &str) -> HistoryEntry {
    HistoryEntry {
        old_timeline: Timeline(new_timeline - 1),
        new_timeline: Timeline(new_timeline),
        switch_lsn: Lsn(u64::from(new_timeline) << 24),
        at_unix_ms: unix_ms(),
        reason: format!("test promotion to timeline {new_timeline}"),
        old_leader: None,
        new_leader: MemberName::new(leader),
    }
}

fn leader_name(view: &pgha::dcs::ClusterView) -> Option<&str> {
    view.leader.as_ref().map(|l| l.name.as_str())
}

/// Asserts a renewal promises `ttl` from some instant in `[before, after]`.
fn assert_valid_for(r: LeaseRenewal, before_ms: u64, after_ms: u64, ttl: Duration) {
    let ttl_ms = ttl.as_millis() as u64;
    assert!(
        (before_ms + ttl_ms..=after_ms + ttl_ms).contains(&r.valid_until_ms),
        "valid_until_ms {} not within [{before_ms}, {after_ms}] + {ttl_ms}",
        r.valid_until_ms
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn initialize_race_has_exactly_one_winner() {
    let env = env("init").await;
    // Several rounds, each a fresh cluster, to give the race a chance to bite.
    for round in 0..5 {
        let cluster = format!("init{round}");
        let a = env.member(&cluster, "a", LONG_TTL).await;
        let b = env.member(&cluster, "b", LONG_TTL).await;
        let (ra, rb) = tokio::join!(a.claim_initialize(), b.claim_initialize());
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert!(
            ra != rb,
            "round {round}: exactly one claim must win, got a={ra} b={rb}"
        );
        let (winner, loser, winner_name) = if ra { (&a, &b, "a") } else { (&b, &a, "b") };

        let view = loser.read_cluster().await.unwrap();
        assert_eq!(
            view.initialize,
            Some(Initialize::Pending {
                by: winner_name.into()
            })
        );
        assert!(
            !loser.claim_initialize().await.unwrap(),
            "a second claim must fail"
        );
        assert!(matches!(
            loser.complete_initialize("1").await,
            Err(DcsError::NotLeader)
        ));

        loser.abandon_initialize().await.unwrap();
        let view = loser.read_cluster().await.unwrap();
        assert_eq!(
            view.initialize,
            Some(Initialize::Pending {
                by: winner_name.into()
            }),
            "loser's abandon is a no-op"
        );

        winner
            .complete_initialize("7312345678901234567")
            .await
            .unwrap();
        loser.abandon_initialize().await.unwrap();
        winner.abandon_initialize().await.unwrap(); // too late: the claim is no longer pending
        let view = loser.read_cluster().await.unwrap();
        assert_eq!(
            view.initialize,
            Some(Initialize::Done {
                system_id: "7312345678901234567".into()
            })
        );
    }
}

#[tokio::test]
async fn abandoned_initialize_can_be_claimed_again() {
    let env = env("reinit").await;
    let a = env.member("c", "a", LONG_TTL).await;
    let b = env.member("c", "b", LONG_TTL).await;
    assert!(a.claim_initialize().await.unwrap());
    assert!(!b.claim_initialize().await.unwrap());
    a.abandon_initialize().await.unwrap();
    assert_eq!(b.read_cluster().await.unwrap().initialize, None);
    assert!(
        b.claim_initialize().await.unwrap(),
        "after an abandon another member may try"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_election_has_exactly_one_winner() {
    let env = env("elect").await;
    let a = env.member("c", "a", LONG_TTL).await;
    let b = env.member("c", "b", LONG_TTL).await;

    let before = boottime_ms();
    let (ra, rb) = tokio::join!(a.acquire_leader(), b.acquire_leader());
    let after = boottime_ms();
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(
        ra.is_some() != rb.is_some(),
        "exactly one acquire must win: a={ra:?} b={rb:?}"
    );
    let (winner, loser, winner_name, loser_name) = if ra.is_some() {
        (&a, &b, "a", "b")
    } else {
        (&b, &a, "b", "a")
    };
    assert_valid_for(ra.or(rb).unwrap(), before, after, LONG_TTL);

    let view = loser.read_cluster().await.unwrap();
    assert_eq!(leader_name(&view), Some(winner_name));
    let lease_id = view.leader.unwrap().lease_id;
    assert_ne!(lease_id, 0, "the leader key must be bound to a lease");
    // The loser revoked the lease it granted for its attempt.
    let leases = env.etcd.client().await.unwrap().leases().await.unwrap();
    let ids: Vec<i64> = leases.leases().iter().map(|l| l.id()).collect();
    assert_eq!(
        ids,
        vec![lease_id],
        "the losing attempt's lease must not linger"
    );

    let before = boottime_ms();
    let renewal = winner
        .renew_leader()
        .await
        .unwrap()
        .expect("the holder renews");
    assert_valid_for(renewal, before, boottime_ms(), LONG_TTL);
    assert_eq!(
        loser.renew_leader().await.unwrap(),
        None,
        "the loser has nothing to renew"
    );
    assert_eq!(
        loser.acquire_leader().await.unwrap(),
        None,
        "the key is taken"
    );

    winner.release_leader().await.unwrap();
    assert_eq!(
        leader_name(&loser.read_cluster().await.unwrap()),
        None,
        "release deletes the key at once"
    );
    assert!(
        loser.acquire_leader().await.unwrap().is_some(),
        "the other member acquires without waiting"
    );
    assert_eq!(
        winner.renew_leader().await.unwrap(),
        None,
        "a released lease is not renewed"
    );
    assert_eq!(
        leader_name(&winner.read_cluster().await.unwrap()),
        Some(loser_name)
    );
}

#[tokio::test]
async fn expired_lease_frees_the_leader_key() {
    let env = env("expire").await;
    let a = env.member("c", "a", SHORT_TTL).await;
    let b = env.member("c", "b", SHORT_TTL).await;

    let start = Instant::now();
    assert!(a.acquire_leader().await.unwrap().is_some());
    // a now "hangs": it neither renews nor releases.
    wait_until(SHORT_TTL + Duration::from_secs(8), POLL, || async {
        b.read_cluster().await.ok().filter(|v| v.leader.is_none())
    })
    .await
    .unwrap();
    let gone_after = start.elapsed();
    assert!(
        gone_after >= SHORT_TTL,
        "the key vanished after {gone_after:?}, before its TTL {SHORT_TTL:?}"
    );

    // a still believes it holds a lease: the leader-only write must be
    // refused by etcd itself, not just by a's bookkeeping.
    assert!(matches!(
        a.append_history(&history_entry(2, "a")).await,
        Err(DcsError::NotLeader)
    ));

    assert!(
        b.acquire_leader().await.unwrap().is_some(),
        "another member takes over"
    );
    assert!(
        a.renew_leader().await.ok().flatten().is_none(),
        "the old holder cannot renew"
    );
    assert_eq!(leader_name(&a.read_cluster().await.unwrap()), Some("b"));
}

/// The trait promises `Ok(None)` (not an error) when a lease is gone, so
/// the agent can tell "I lost the lease" from "etcd is unreachable".
#[tokio::test]
async fn renew_and_adopt_report_a_lost_lease_as_gone() {
    let env = env("lost").await;
    let a = env.member("c", "a", SHORT_TTL).await;
    assert!(a.acquire_leader().await.unwrap().is_some());
    let lease_id = a.read_cluster().await.unwrap().leader.unwrap().lease_id;
    wait_until(SHORT_TTL + Duration::from_secs(8), POLL, || async {
        a.read_cluster().await.ok().filter(|v| v.leader.is_none())
    })
    .await
    .unwrap();

    assert_eq!(
        a.renew_leader().await.unwrap(),
        None,
        "the old holder learns its lease is gone"
    );
    let restarted = env.member("c", "a", SHORT_TTL).await;
    assert_eq!(
        restarted.adopt_leader(lease_id).await.unwrap(),
        None,
        "an expired lease cannot be adopted"
    );
}

/// A member whose lease expired (agent stalled or partitioned for longer
/// than the TTL) must reappear on its next `put_member`.
#[tokio::test]
async fn member_record_is_republished_after_its_lease_expired() {
    let env = env("republish").await;
    let a = env.member("c", "a", SHORT_TTL).await;
    a.put_member(&record("a", PgState::Running)).await.unwrap();
    wait_until(SHORT_TTL + Duration::from_secs(8), POLL, || async {
        a.read_cluster().await.ok().filter(|v| v.members.is_empty())
    })
    .await
    .unwrap();

    a.put_member(&record("a", PgState::Running))
        .await
        .expect("put_member grants a new lease");
    assert!(
        a.read_cluster()
            .await
            .unwrap()
            .members
            .contains_key(&"a".into())
    );
}

#[tokio::test]
async fn restarted_member_adopts_its_lease() {
    let env = env("adopt").await;
    let ttl = Duration::from_secs(3);
    let old = env.member("c", "a", ttl).await;
    assert!(old.acquire_leader().await.unwrap().is_some());
    drop(old); // the agent restarts without releasing

    let new = env.member("c", "a", ttl).await;
    let leader = new
        .read_cluster()
        .await
        .unwrap()
        .leader
        .expect("the key outlives the agent");
    assert_eq!(leader.name.as_str(), "a");
    let before = boottime_ms();
    let adopted = new
        .adopt_leader(leader.lease_id)
        .await
        .unwrap()
        .expect("the lease is alive");
    assert_valid_for(adopted, before, boottime_ms(), ttl);

    // Renewing the adopted lease keeps the key well past its TTL.
    let until = Instant::now() + 2 * ttl;
    while Instant::now() < until {
        assert!(new.renew_leader().await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let view = new.read_cluster().await.unwrap();
    assert_eq!(
        view.leader.as_ref().map(|l| l.lease_id),
        Some(leader.lease_id)
    );
    new.append_history(&history_entry(2, "a"))
        .await
        .expect("the adopter is the leader");

    // A revoked lease cannot be adopted.
    new.release_leader().await.unwrap();
    let other = env.member("c", "a", ttl).await;
    assert!(
        other
            .adopt_leader(leader.lease_id)
            .await
            .ok()
            .flatten()
            .is_none()
    );
    assert_eq!(
        other.renew_leader().await.unwrap(),
        None,
        "nothing adopted, nothing to renew"
    );
}

#[tokio::test]
async fn history_is_written_only_by_the_leader() {
    let env = env("history").await;
    let a = env.member("c", "a", LONG_TTL).await;
    let b = env.member("c", "b", LONG_TTL).await;
    assert!(matches!(
        b.append_history(&history_entry(2, "b")).await,
        Err(DcsError::NotLeader)
    ));
    assert!(a.acquire_leader().await.unwrap().is_some());

    let entries: Vec<HistoryEntry> = (2..5).map(|tl| history_entry(tl, "a")).collect();
    for e in &entries {
        a.append_history(e).await.unwrap();
        assert!(matches!(
            b.append_history(&history_entry(9, "b")).await,
            Err(DcsError::NotLeader)
        ));
    }
    assert_eq!(
        b.read_cluster().await.unwrap().history,
        entries,
        "appended in order, nothing from b"
    );

    a.release_leader().await.unwrap();
    assert!(matches!(
        a.append_history(&history_entry(5, "a")).await,
        Err(DcsError::NotLeader)
    ));
    assert_eq!(a.read_cluster().await.unwrap().history, entries);
}

#[tokio::test]
async fn member_records_live_and_die_with_their_lease() {
    let env = env("members").await;
    let a = env.member("c", "a", SHORT_TTL).await;
    let b = env.member("c", "b", SHORT_TTL).await;
    let (rec_a, rec_b) = (
        record("a", PgState::Running),
        record("b", PgState::Streaming),
    );
    a.put_member(&rec_a).await.unwrap();
    b.put_member(&rec_b).await.unwrap();
    let view = a.read_cluster().await.unwrap();
    assert_eq!(view.members.get(&"a".into()), Some(&rec_a));
    assert_eq!(view.members.get(&"b".into()), Some(&rec_b));

    // b's process dies; a keeps publishing (which renews its lease).
    drop(b);
    let rec_a = record("a", PgState::Starting);
    let view = wait_until(
        SHORT_TTL + Duration::from_secs(8),
        Duration::from_millis(300),
        || async {
            a.put_member(&rec_a).await.unwrap();
            a.read_cluster()
                .await
                .ok()
                .filter(|v| !v.members.contains_key(&"b".into()))
        },
    )
    .await
    .unwrap();
    assert_eq!(
        view.members.get(&"a".into()),
        Some(&rec_a),
        "a's record is kept alive and updated"
    );

    a.delete_member().await.unwrap();
    assert!(
        a.read_cluster().await.unwrap().members.is_empty(),
        "delete_member is immediate"
    );
    a.put_member(&rec_a).await.unwrap();
    assert!(
        a.read_cluster()
            .await
            .unwrap()
            .members
            .contains_key(&"a".into()),
        "a deleted member can come back"
    );
}

/// Every call must fail within its timeout when etcd cannot be reached:
/// the agent's loop (and its fencing) depend on never hanging.
#[tokio::test]
async fn unreachable_etcd_fails_within_the_timeout() {
    let endpoints = vec![format!("http://127.0.0.1:{}", free_port())]; // nothing listens
    let limit = TIMEOUT + Duration::from_secs(2);
    let start = Instant::now();
    let connected = EtcdDcs::connect(
        &plain(&endpoints),
        Keys::new("pgha", "c"),
        MemberName::new("a"),
        SHORT_TTL,
        TIMEOUT,
        true,
    )
    .await;
    assert!(
        start.elapsed() < limit,
        "connect took {:?}",
        start.elapsed()
    );
    let Ok(dcs) = connected else { return }; // failing fast is fine too

    let start = Instant::now();
    let err = dcs.read_cluster().await.expect_err("nobody to read from");
    assert!(
        start.elapsed() < limit,
        "read_cluster took {:?}",
        start.elapsed()
    );
    assert!(
        matches!(err, DcsError::Unavailable { .. } | DcsError::Timeout { .. }),
        "{err}"
    );

    let start = Instant::now();
    assert!(dcs.acquire_leader().await.is_err());
    assert!(
        dcs.put_member(&record("a", PgState::Running))
            .await
            .is_err()
    );
    assert!(
        start.elapsed() < 2 * limit,
        "acquire + put_member took {:?}",
        start.elapsed()
    );
}

/// An etcd that stops answering (stopped, or frozen like a partition)
/// makes calls fail within the timeout, and the same client recovers
/// when etcd is back; the leader lease survives a short etcd restart.
#[tokio::test]
async fn etcd_outage_fails_fast_and_recovers() {
    let mut env = env("outage").await;
    let a = env.member("c", "a", Duration::from_secs(10)).await;
    assert!(a.acquire_leader().await.unwrap().is_some());
    let limit = TIMEOUT + Duration::from_secs(2);

    env.etcd.pause().unwrap();
    let start = Instant::now();
    assert!(
        a.renew_leader().await.is_err(),
        "a frozen etcd cannot renew the lease"
    );
    assert!(
        start.elapsed() < limit,
        "renew against a paused etcd took {:?}",
        start.elapsed()
    );
    env.etcd.resume().unwrap();
    wait_until(Duration::from_secs(10), POLL, || async {
        a.read_cluster().await.ok()
    })
    .await
    .unwrap();

    env.etcd.stop().await;
    let start = Instant::now();
    assert!(a.read_cluster().await.is_err());
    assert!(
        start.elapsed() < limit,
        "read_cluster against a stopped etcd took {:?}",
        start.elapsed()
    );

    env.etcd.start().await.unwrap();
    let view = wait_until(Duration::from_secs(10), POLL, || async {
        a.read_cluster().await.ok()
    })
    .await
    .unwrap();
    assert_eq!(
        leader_name(&view),
        Some("a"),
        "etcd persisted the leader key"
    );
    assert!(
        a.renew_leader().await.unwrap().is_some(),
        "etcd extends leases across its restart"
    );
}

#[tokio::test]
async fn watch_wakes_waiters_on_changes() {
    let env = env("watch").await;
    let watcher = member(&env.etcd.endpoints(), "c", "w", LONG_TTL, true).await;
    let other = env.member("c", "o", LONG_TTL).await;
    // The first wait returns once the watch is established (it reports a
    // possible change); consume that so the next wake is the put's.
    watcher.wait_for_change(Duration::from_secs(5)).await;

    let delay = Duration::from_millis(300);
    let writer = async {
        tokio::time::sleep(delay).await;
        let request = FailoverRequest {
            from: None,
            to: Some("o".into()),
            not_before_unix_ms: None,
            accept_data_loss: false,
            requested_at_unix_ms: unix_ms(),
        };
        other
            .put_failover(&request, Revision::ABSENT)
            .await
            .unwrap();
    };
    let start = Instant::now();
    tokio::join!(watcher.wait_for_change(Duration::from_secs(10)), writer);
    let waited = start.elapsed();
    assert!(
        waited >= delay,
        "woke after {waited:?}, before anything changed"
    );
    assert!(
        waited < Duration::from_secs(3),
        "woke only after {waited:?}"
    );
    assert_eq!(
        watcher
            .read_cluster()
            .await
            .unwrap()
            .failover
            .and_then(|f| f.to),
        Some("o".into())
    );
}

/// Member records are rewritten every loop by every agent; waking on them
/// would make every agent's loop busy. A member disappearing does wake.
#[tokio::test]
async fn watch_ignores_member_updates_but_not_departures() {
    let env = env("watchm").await;
    let watcher = member(&env.etcd.endpoints(), "c", "w", LONG_TTL, true).await;
    let other = env.member("c", "o", LONG_TTL).await;
    watcher.wait_for_change(Duration::from_secs(5)).await;

    let quiet = Duration::from_millis(1500);
    let start = Instant::now();
    tokio::join!(watcher.wait_for_change(quiet), async {
        other
            .put_member(&record("o", PgState::Streaming))
            .await
            .unwrap();
        other
            .put_member(&record("o", PgState::Running))
            .await
            .unwrap();
    });
    assert!(
        start.elapsed() >= quiet,
        "a member update woke the waiter after {:?}",
        start.elapsed()
    );

    let start = Instant::now();
    tokio::join!(watcher.wait_for_change(Duration::from_secs(10)), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        other.delete_member().await.unwrap();
    });
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "a departure woke the waiter only after {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn clusters_sharing_an_etcd_are_isolated() {
    let env = env("iso").await;
    let c = env.member("c", "a", LONG_TTL).await;
    let c2 = env.member("c2", "a", LONG_TTL).await;

    assert!(c.claim_initialize().await.unwrap());
    c.complete_initialize("1111").await.unwrap();
    assert!(c.acquire_leader().await.unwrap().is_some());
    c.put_member(&record("a", PgState::Running)).await.unwrap();
    c.put_config(
        &ClusterConfig {
            paused: true,
            ..Default::default()
        },
        Revision::ABSENT,
    )
    .await
    .unwrap();
    c.append_history(&history_entry(2, "a")).await.unwrap();

    let view2 = c2.read_cluster().await.unwrap();
    assert_eq!(view2.initialize, None);
    assert_eq!(view2.leader, None);
    assert!(
        view2.members.is_empty() && view2.history.is_empty() && !view2.config.paused,
        "{view2:?}"
    );

    // c2 runs its own, independent, election and bootstrap.
    assert!(c2.claim_initialize().await.unwrap());
    assert!(c2.acquire_leader().await.unwrap().is_some());
    c2.release_leader().await.unwrap();
    let view = c.read_cluster().await.unwrap();
    assert_eq!(
        view.initialize,
        Some(Initialize::Done {
            system_id: "1111".into()
        })
    );
    assert_eq!(
        leader_name(&view),
        Some("a"),
        "c2's release leaves c's leader alone"
    );
    assert_eq!(view.members.len(), 1);
}

/// Two operators edit different keys of the `config` key at the same
/// instant (both read the same revision, as `tokio::join!` sends both
/// reads before either answer arrives): both changes land, every round.
/// Before writes were conditioned on the revision read, the second write
/// silently undid the first.
#[tokio::test]
async fn concurrent_config_edits_both_land() {
    let env = env("cfgrace").await;
    let a = env.member("c", "a", LONG_TTL).await;
    let b = env.member("c", "b", LONG_TTL).await;
    let mut retries = 0;
    for round in 1..=20u32 {
        let paused = round % 2 == 1;
        let count = round % 16 + 1;
        let (ua, ub) = tokio::join!(
            update_config(&a, |c| Ok(ClusterConfig {
                paused,
                ..c.clone()
            })),
            update_config(&b, |c| Ok(ClusterConfig {
                synchronous_node_count: count,
                ..c.clone()
            })),
        );
        let (ua, ub) = (ua.unwrap(), ub.unwrap());
        retries += ua.attempts + ub.attempts - 2;
        let now = a.read_cluster().await.unwrap();
        assert_eq!(
            (now.config.paused, now.config.synchronous_node_count),
            (paused, count),
            "round {round}: a lost update"
        );
        assert_eq!(now.config_revision, ua.revision.max(ub.revision));
    }
    // Otherwise the writes never raced and the test proved nothing.
    assert!(retries > 0, "the two writers never conflicted");
}

/// A write based on a stale read is refused, names the key and both
/// revisions, and leaves the newer value in place.
#[tokio::test]
async fn stale_revision_writes_are_refused() {
    let env = env("cfgstale").await;
    let a = env.member("c", "a", LONG_TTL).await;
    let b = env.member("c", "b", LONG_TTL).await;
    let paused = ClusterConfig {
        paused: true,
        ..Default::default()
    };
    let seen = a.read_cluster().await.unwrap();
    assert_eq!(seen.config_revision, Revision::ABSENT);
    let rev = b.put_config(&paused, Revision::ABSENT).await.unwrap();
    assert!(rev > Revision::ABSENT);
    assert_eq!(a.read_cluster().await.unwrap().config_revision, rev);

    match a
        .put_config(&ClusterConfig::default(), seen.config_revision)
        .await
    {
        Err(DcsError::Conflict {
            key,
            expected,
            actual,
        }) => {
            assert_eq!(key, "/pgha/c/config");
            assert_eq!((expected, actual), (Revision::ABSENT, rev));
        }
        other => panic!("stale write not refused: {other:?}"),
    }
    assert!(a.read_cluster().await.unwrap().config.paused);
    // With the current revision the write goes through.
    let next = a.put_config(&ClusterConfig::default(), rev).await.unwrap();
    assert!(next > rev);
    assert!(!a.read_cluster().await.unwrap().config.paused);
}

fn request(to: &str, at: u64) -> FailoverRequest {
    FailoverRequest {
        from: Some(MemberName::new("a")),
        to: Some(MemberName::new(to)),
        not_before_unix_ms: Some(at),
        accept_data_loss: false,
        requested_at_unix_ms: unix_ms(),
    }
}

/// A pending switchover or failover request is never replaced by a
/// create, only by a write that names its revision; clearing removes only
/// the request that was read.
#[tokio::test]
async fn failover_requests_are_created_once_and_cleared_as_read() {
    let env = env("fo-cas").await;
    let a = env.member("c", "a", LONG_TTL).await;
    let b = env.member("c", "b", LONG_TTL).await;
    let first = a
        .put_failover(&request("b", 1), Revision::ABSENT)
        .await
        .unwrap();
    let err = b.put_failover(&request("c", 2), Revision::ABSENT).await;
    assert!(
        matches!(err, Err(DcsError::Conflict { actual, .. }) if actual == first),
        "{err:?}"
    );
    let view = b.read_cluster().await.unwrap();
    assert_eq!(view.failover_revision, first);
    assert_eq!(view.failover.unwrap().not_before_unix_ms, Some(1));

    // An explicit replace of the request read.
    let second = b.put_failover(&request("c", 2), first).await.unwrap();
    // An agent that promoted for the first request must not clear the
    // second one.
    assert!(matches!(
        a.clear_failover(first).await,
        Err(DcsError::Conflict { actual, .. }) if actual == second
    ));
    let view = a.read_cluster().await.unwrap();
    assert_eq!(view.failover.unwrap().to, Some(MemberName::new("c")));
    a.clear_failover(second).await.unwrap();
    let view = a.read_cluster().await.unwrap();
    assert_eq!(
        (view.failover, view.failover_revision),
        (None, Revision::ABSENT)
    );
    // Clearing what is already gone is a conflict too: the caller's view
    // is stale.
    assert!(matches!(
        a.clear_failover(second).await,
        Err(DcsError::Conflict {
            actual: Revision::ABSENT,
            ..
        })
    ));
}

/// A node configuration for the `pgha` commands, pointing at `env`'s etcd.
fn cli_config(env: &Env, cluster: &str) -> pgha::config::Config {
    let toml = format!(
        r#"
cluster = "{cluster}"
name = "b"
[etcd]
endpoints = ["{}"]
[postgres]
data_dir = "/tmp/pgha-cli-unused/data"
superuser = {{ username = "postgres", password = "superuser-pw" }}
replication = {{ username = "replicator", password = "replication-pw" }}
"#,
        env.etcd.endpoint()
    );
    pgha::config::Config::from_toml(std::path::Path::new("/tmp/pgha-cli.toml"), &toml)
        .expect("config")
}

/// `pgha switchover` refuses to replace a pending request (and names it),
/// replaces it with `--force`, and `--cancel` removes it; `pgha pause` and
/// `pgha config set` run at the same time both land.
#[tokio::test]
async fn cli_requests_and_config_edits_do_not_overwrite_others() {
    use pgha::cli::manage;
    let env = env("cli-cas").await;
    let a = env.member("c", "a", LONG_TTL).await;
    let b = env.member("c", "b", LONG_TTL).await;
    assert!(a.acquire_leader().await.unwrap().is_some());
    let mut leader = record("a", PgState::Running);
    leader.role = PgRole::Primary;
    a.put_member(&leader).await.unwrap();
    b.put_member(&record("b", PgState::Streaming))
        .await
        .unwrap();
    let cfg = cli_config(&env, "c");
    let at = |t: &str| Some(t.to_string());

    manage::switchover(&cfg, at("b"), at("2999-01-01T00:00:00Z"), false)
        .await
        .unwrap();
    let err = manage::switchover(&cfg, at("b"), at("2998-01-01T00:00:00Z"), false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("already pending (from a to b, scheduled at 2999-01-01T00:00:00.000Z"),
        "{err}"
    );
    let err = manage::failover(&cfg, "b".into(), false, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("healthy leader"), "{err}");
    let scheduled = |v: pgha::dcs::ClusterView| v.failover.and_then(|f| f.not_before_unix_ms);
    assert_eq!(
        scheduled(a.read_cluster().await.unwrap()),
        Some(32_472_144_000_000)
    );
    manage::switchover(&cfg, at("b"), at("2998-01-01T00:00:00Z"), true)
        .await
        .unwrap();
    assert_eq!(
        scheduled(a.read_cluster().await.unwrap()),
        Some(32_440_608_000_000)
    );
    manage::cancel_request(&cfg).await.unwrap();
    assert_eq!(a.read_cluster().await.unwrap().failover, None);

    for round in 1..=5u32 {
        let paused = round % 2 == 1;
        let count = round + 1;
        let set = [format!("synchronous_node_count={count}")];
        let (p, s) = tokio::join!(
            manage::set_paused(&cfg, paused),
            manage::config_set(&cfg, &set)
        );
        p.unwrap();
        s.unwrap();
        let c = a.read_cluster().await.unwrap().config;
        assert_eq!((c.paused, c.synchronous_node_count), (paused, count));
    }
}
