use super::*;
use crate::dcs::{FailoverRequest, LeaderKey};
use crate::model::{HistoryEntry, Lsn, MemberRecord, Timeline};

fn member(name: &str, role: PgRole, state: PgState, tl: u32, lsn: u64) -> MemberRecord {
    MemberRecord {
        name: name.into(),
        api_url: String::new(),
        host: "127.0.0.1".into(),
        port: 5000 + name.as_bytes()[name.len() - 1] as u16,
        role,
        state,
        timeline: Some(Timeline(tl)),
        received_lsn: None,
        replayed_lsn: Some(Lsn(lsn)),
        flushed_lsn: None,
        upstream: (role == PgRole::Replica).then(|| "n1".into()),
        priority: 100,
        nofailover: false,
        nosync: false,
        last_decision: None,
        updated_at_ms: 0,
        parameters: Default::default(),
        adoptable: false,
    }
}

fn t(name: &str) -> Target {
    Target {
        member: name.into(),
        host: "127.0.0.1".into(),
        port: 5000 + name.as_bytes()[name.len() - 1] as u16,
    }
}

/// n1 leads on timeline 2 at LSN 1000; n2 streams 100 bytes behind, n3
/// 10 000 behind.
fn healthy() -> ClusterView {
    let mut v = ClusterView {
        leader: Some(LeaderKey {
            name: "n1".into(),
            lease_id: 1,
        }),
        history: vec![HistoryEntry {
            old_timeline: Timeline(1),
            new_timeline: Timeline(2),
            switch_lsn: Lsn(0),
            at_unix_ms: 0,
            reason: String::new(),
            old_leader: None,
            new_leader: "n1".into(),
        }],
        ..Default::default()
    };
    for m in [
        member("n1", PgRole::Primary, PgState::Running, 2, 10_000),
        member("n2", PgRole::Replica, PgState::Streaming, 2, 9_900),
        member("n3", PgRole::Replica, PgState::Streaming, 2, 0),
    ] {
        v.members.insert(m.name.clone(), m);
    }
    v
}

#[test]
fn read_write_goes_only_to_a_running_primary_holding_the_key() {
    type Edit = fn(&mut ClusterView);
    let cases: &[(&str, Edit, Rw)] = &[
        ("healthy", |_| {}, Rw::Serve(t("n1"))),
        (
            "no leader key",
            |v| v.leader = None,
            Rw::Hold(NoPrimary::NoLeader),
        ),
        (
            "key holder has no record",
            |v| {
                v.members.remove(&"n1".into());
            },
            Rw::Hold(NoPrimary::NoRecord {
                leader: "n1".into(),
            }),
        ),
        (
            "key holder still a replica (promotion in progress)",
            |v| {
                let m = v.members.get_mut(&"n1".into()).unwrap();
                m.role = PgRole::Replica;
                m.state = PgState::Streaming;
            },
            Rw::Hold(NoPrimary::NotRunningPrimary {
                leader: "n1".into(),
                role: PgRole::Replica,
                state: PgState::Streaming,
            }),
        ),
        (
            "key holder stopping",
            |v| v.members.get_mut(&"n1".into()).unwrap().state = PgState::Stopping,
            Rw::Hold(NoPrimary::NotRunningPrimary {
                leader: "n1".into(),
                role: PgRole::Primary,
                state: PgState::Stopping,
            }),
        ),
        (
            "key holder on an old timeline",
            |v| v.members.get_mut(&"n1".into()).unwrap().timeline = Some(Timeline(1)),
            Rw::Hold(NoPrimary::BehindTimeline {
                leader: "n1".into(),
            }),
        ),
        (
            "key holder with no timeline",
            |v| v.members.get_mut(&"n1".into()).unwrap().timeline = None,
            Rw::Hold(NoPrimary::BehindTimeline {
                leader: "n1".into(),
            }),
        ),
        (
            // A former primary still writable but without the key: the
            // key holder (n2, not yet promoted) gets nothing either.
            "old primary writable, key moved to a replica",
            |v| v.leader.as_mut().unwrap().name = "n2".into(),
            Rw::Hold(NoPrimary::NotRunningPrimary {
                leader: "n2".into(),
                role: PgRole::Replica,
                state: PgState::Streaming,
            }),
        ),
        (
            "switchover away from the leader is due",
            |v| {
                v.failover = Some(FailoverRequest {
                    from: Some("n1".into()),
                    to: Some("n2".into()),
                    not_before_unix_ms: Some(500),
                    accept_data_loss: false,
                    requested_at_unix_ms: 0,
                });
                v.failover_revision = Revision(42);
            },
            Rw::Drain {
                from: t("n1"),
                revision: Revision(42),
            },
        ),
        (
            "switchover scheduled later",
            |v| {
                v.failover = Some(FailoverRequest {
                    from: Some("n1".into()),
                    to: None,
                    not_before_unix_ms: Some(5_000),
                    accept_data_loss: false,
                    requested_at_unix_ms: 0,
                });
            },
            Rw::Serve(t("n1")),
        ),
        (
            "failover request from another member",
            |v| {
                v.failover = Some(FailoverRequest {
                    from: Some("n3".into()),
                    to: None,
                    not_before_unix_ms: None,
                    accept_data_loss: false,
                    requested_at_unix_ms: 0,
                });
            },
            Rw::Serve(t("n1")),
        ),
    ];
    for (name, edit, want) in cases {
        let mut v = healthy();
        edit(&mut v);
        assert_eq!(&routes(&v, 1_000, 1_000).rw, want, "{name}");
    }
}

#[test]
fn read_only_balances_over_replicas_within_max_lag() {
    let v = healthy();
    let none = |_: &MemberName| 0;
    // n3 is 10 000 bytes behind: out at max_lag 1000, in at 20 000.
    let r = routes(&v, 1_000, 0);
    assert_eq!(r.replicas, vec![t("n2")]);
    let r = routes(&v, 20_000, 0);
    assert_eq!(r.replicas, vec![t("n2"), t("n3")]);
    assert_eq!(pick_ro(&r, none, true), Some(t("n2")));
    let busy_n2 = |m: &MemberName| if m.as_str() == "n2" { 5 } else { 1 };
    assert_eq!(pick_ro(&r, busy_n2, true), Some(t("n3")));

    // No qualifying replica: the leader with fallback, nothing without.
    let r = routes(&v, 10, 0);
    assert!(r.replicas.is_empty());
    assert_eq!(pick_ro(&r, none, true), Some(t("n1")));
    assert_eq!(pick_ro(&r, none, false), None);
    assert!(r.ro_member_allowed(&"n1".into(), true));
    assert!(!r.ro_member_allowed(&"n1".into(), false));

    // Replicas that are not streaming, or whose lag is unknown, never qualify.
    let mut v = healthy();
    v.members.get_mut(&"n2".into()).unwrap().state = PgState::InRecovery;
    v.members.get_mut(&"n3".into()).unwrap().replayed_lsn = None;
    assert!(routes(&v, u64::MAX, 0).replicas.is_empty());

    // Without a running primary the lag is unknown: no replica, no fallback.
    let mut v = healthy();
    v.leader = None;
    let r = routes(&v, u64::MAX, 0);
    assert!(r.replicas.is_empty());
    assert_eq!(pick_ro(&r, none, true), None);
}

#[test]
fn servers_on_a_former_leader_are_not_kept() {
    let v = healthy();
    let r = routes(&v, 1_000, 0);
    assert!(r.rw_member_alive(&"n1".into()));
    assert!(!r.rw_member_alive(&"n2".into()));
    let mut v = healthy();
    v.leader = None;
    assert!(!routes(&v, 1_000, 0).rw_member_alive(&"n1".into()));
    assert!(!Routes::unknown().rw_member_alive(&"n1".into()));
}

#[test]
fn a_replica_on_another_timeline_gets_no_reads() {
    let mut v = healthy();
    v.members.get_mut(&MemberName::from("n2")).unwrap().timeline = Some(Timeline(1));
    let r = routes(&v, 1_000_000, 0);
    assert_eq!(r.replicas, vec![t("n3")]);
}

#[test]
fn auto_reads_go_to_a_replica_that_replayed_the_clients_commit() {
    let r = routes(&healthy(), 1_000_000, 0);
    let replayed = |m: &MemberName| match m.as_str() {
        "n2" => Some(900),
        "n3" => Some(500),
        _ => None,
    };
    let idle = |_: &MemberName| 0;
    let none = |_: &MemberName| false;
    // No requirement: least loaded, ties by name.
    assert_eq!(
        pick_auto_read(&r, None, replayed, idle, none),
        AutoRead::Replica(t("n2"))
    );
    let n2_busy = |m: &MemberName| usize::from(m.as_str() == "n2");
    assert_eq!(
        pick_auto_read(&r, None, replayed, n2_busy, none),
        AutoRead::Replica(t("n3"))
    );
    // Only n2 has replayed 600; busy or not, it is the one.
    assert_eq!(
        pick_auto_read(&r, Some(600), replayed, n2_busy, none),
        AutoRead::Replica(t("n2"))
    );
    assert_eq!(
        pick_auto_read(&r, Some(900), replayed, idle, none),
        AutoRead::Replica(t("n2"))
    );
    // Nobody has: the leader.
    assert_eq!(
        pick_auto_read(&r, Some(901), replayed, idle, none),
        AutoRead::Leader(LeaderFallback::ReadYourWrites)
    );
    // An unknown position never satisfies a requirement.
    assert_eq!(
        pick_auto_read(&r, Some(1), |_| None, idle, none),
        AutoRead::Leader(LeaderFallback::ReadYourWrites)
    );
    // Excluded replicas (failed, or measured behind) are skipped.
    let n2_out = |m: &MemberName| m.as_str() == "n2";
    assert_eq!(
        pick_auto_read(&r, Some(600), replayed, idle, n2_out),
        AutoRead::Leader(LeaderFallback::ReadYourWrites)
    );
    assert_eq!(
        pick_auto_read(&r, None, replayed, idle, n2_out),
        AutoRead::Replica(t("n3"))
    );
    let all_out = |_: &MemberName| true;
    assert_eq!(
        pick_auto_read(&r, None, replayed, idle, all_out),
        AutoRead::Leader(LeaderFallback::NoReplica)
    );
}
