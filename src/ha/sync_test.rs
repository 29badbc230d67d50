//! Which standbys the leader makes synchronous when one stops replying
//! (its `pg_stat_replication` row still says `streaming`), and the steps by
//! which a replacement happens.

use super::{Desired, Known, SyncSetting, SyncStep, desired, next_step, settling};
use crate::dcs::{ClusterConfig, ClusterView, SyncMode, SyncRecord};
use crate::ha::membership::{KnownMember, Membership};
use crate::model::{Lsn, MemberName, MemberRecord, PgRole, PgState};
use crate::postgres::observe::StandbyInfo;

const TTL_MS: u64 = 3_000;
const NOW_MS: u64 = 1_000_000;
/// The leader's flush position.
const L: u64 = 0x5000_0000;
/// A standby replying normally.
const FRESH: Option<u64> = Some(400);
/// A standby silent for longer than the TTL.
const SILENT: Option<u64> = Some(TTL_MS + 1);

fn m(name: &str) -> MemberName {
    MemberName::from(name)
}

fn names(list: &[&str]) -> Vec<MemberName> {
    list.iter().map(|n| m(n)).collect()
}

fn membership(list: &[&str], nosync: &[&str]) -> Membership {
    list.iter()
        .map(|n| {
            let member = KnownMember {
                api_url: format!("http://{n}:8008"),
                host: format!("{n}.db"),
                port: 5432,
                nosync: nosync.contains(n),
                absent_since_ms: None,
                lost_in_outage: false,
            };
            (m(n), member)
        })
        .collect()
}

/// Every listed member publishes a record saying its replica streams.
fn view(list: &[&str]) -> ClusterView {
    let mut view = ClusterView::default();
    for n in list {
        let mut r: MemberRecord = serde_json::from_value(serde_json::json!({
            "name": n,
            "api_url": format!("http://{n}:8008"),
            "host": format!("{n}.db"),
            "port": 5432,
            "role": "unknown",
            "state": "stopped",
        }))
        .expect("a minimal member record decodes");
        r.role = PgRole::Replica;
        r.state = PgState::Streaming;
        view.members.insert(m(n), r);
    }
    view
}

fn standby(name: &str, flush: u64, sync_state: &str, reply_age_ms: Option<u64>) -> StandbyInfo {
    StandbyInfo {
        application_name: name.into(),
        state: "streaming".into(),
        flush_lsn: Some(Lsn(flush)),
        replay_lsn: Some(Lsn(flush)),
        sync_state: sync_state.into(),
        reply_age_ms,
    }
}

fn config(mode: SyncMode, k: u32, quorum: bool) -> ClusterConfig {
    ClusterConfig {
        synchronous_mode: mode,
        synchronous_node_count: k,
        synchronous_quorum: quorum,
        ..ClusterConfig::default()
    }
}

fn setting(list: &[&str], k: u32, quorum: bool) -> SyncSetting {
    SyncSetting {
        names: names(list),
        k,
        quorum,
    }
}

fn wanted(list: &[&str], k: u32, quorum: bool) -> Desired {
    Desired {
        setting: setting(list, k, quorum),
        degraded: false,
    }
}

struct Case {
    what: &'static str,
    cfg: ClusterConfig,
    ttl_ms: u64,
    nosync: &'static [&'static str],
    current: SyncSetting,
    standbys: Vec<StandbyInfo>,
    expected: Desired,
}

fn case(what: &'static str, current: SyncSetting, standbys: Vec<StandbyInfo>) -> Case {
    Case {
        what,
        cfg: config(SyncMode::On, 1, false),
        ttl_ms: TTL_MS,
        nosync: &[],
        current,
        standbys,
        expected: wanted(&[], 0, false),
    }
}

impl Case {
    fn cfg(mut self, cfg: ClusterConfig) -> Self {
        self.cfg = cfg;
        self
    }
    fn ttl_ms(mut self, ttl_ms: u64) -> Self {
        self.ttl_ms = ttl_ms;
        self
    }
    fn nosync(mut self, nosync: &'static [&'static str]) -> Self {
        self.nosync = nosync;
        self
    }
    fn wants(mut self, expected: Desired) -> Self {
        self.expected = expected;
        self
    }
}

#[test]
fn a_silent_synchronous_standby_is_replaced_by_a_replying_one() {
    let all = ["n1", "n2", "n3", "n4"];
    let cases = vec![
        case(
            "FIRST 1: the synchronous standby stopped replying, another replies: it takes over",
            setting(&["n2"], 1, false),
            vec![
                standby("n2", L - 100, "sync", SILENT),
                standby("n3", L - 200, "async", FRESH),
            ],
        )
        .wants(wanted(&["n3"], 1, false)),
        case(
            "FIRST 1: both silent: keep the current one (as if the reply age were unknown)",
            setting(&["n2"], 1, false),
            vec![
                standby("n2", L - 100, "sync", SILENT),
                standby("n3", L, "async", SILENT),
            ],
        )
        .wants(wanted(&["n2"], 1, false)),
        case(
            "silent exactly for the bound: not yet stale",
            setting(&["n2"], 1, false),
            vec![
                standby("n2", L, "sync", Some(TTL_MS)),
                standby("n3", L, "async", FRESH),
            ],
        )
        .wants(wanted(&["n2"], 1, false)),
        case(
            "no reply yet (reply_time NULL): not judged, the current one stays",
            setting(&["n2"], 1, false),
            vec![
                standby("n2", L, "sync", None),
                standby("n3", L, "async", FRESH),
            ],
        )
        .wants(wanted(&["n2"], 1, false)),
        case(
            "the only replying standby is nosync: no replacement",
            setting(&["n2"], 1, false),
            vec![
                standby("n2", L, "sync", SILENT),
                standby("n3", L, "async", FRESH),
            ],
        )
        .nosync(&["n3"])
        .wants(wanted(&["n2"], 1, false)),
        case(
            "a silent standby is not picked over a replying one that is behind",
            setting(&[], 0, false),
            vec![
                standby("n2", L, "async", SILENT),
                standby("n3", L - 500, "async", FRESH),
            ],
        )
        .wants(wanted(&["n3"], 1, false)),
        case(
            "mode on, the only standby is silent: it stays synchronous, no degradation",
            setting(&["n2"], 1, false),
            vec![standby("n2", L, "sync", SILENT)],
        )
        .wants(wanted(&["n2"], 1, false)),
        case(
            "strict, the only standby is silent: it stays synchronous",
            setting(&["n2"], 1, false),
            vec![standby("n2", L, "sync", SILENT)],
        )
        .cfg(config(SyncMode::Strict, 1, false))
        .wants(wanted(&["n2"], 1, false)),
        case(
            "strict, the synchronous standby is silent, another replies: it takes over",
            setting(&["n2"], 1, false),
            vec![
                standby("n2", L, "sync", SILENT),
                standby("n3", L, "async", FRESH),
            ],
        )
        .cfg(config(SyncMode::Strict, 1, false))
        .wants(wanted(&["n3"], 1, false)),
        case(
            "FIRST 2: the silent one is replaced, the replying one keeps its place",
            setting(&["n2", "n3"], 2, false),
            vec![
                standby("n2", L, "sync", SILENT),
                standby("n3", L - 100, "sync", FRESH),
                standby("n4", L - 200, "async", FRESH),
            ],
        )
        .cfg(config(SyncMode::On, 2, false))
        .wants(wanted(&["n3", "n4"], 2, false)),
        case(
            "FIRST 2, nobody to replace the silent one: k shrinks, as if it had stopped streaming",
            setting(&["n2", "n3"], 2, false),
            vec![
                standby("n2", L, "sync", SILENT),
                standby("n3", L, "sync", FRESH),
            ],
        )
        .cfg(config(SyncMode::On, 2, false))
        .wants(wanted(&["n3"], 1, false)),
        case(
            "ANY 1: the silent one leaves the quorum",
            setting(&["n2", "n3"], 1, true),
            vec![
                standby("n2", L, "quorum", SILENT),
                standby("n3", L, "quorum", FRESH),
            ],
        )
        .cfg(config(SyncMode::On, 1, true))
        .wants(wanted(&["n3"], 1, true)),
        case(
            "a longer TTL is a longer bound: 4 s of silence under ttl = 10 s is not stale",
            setting(&["n2"], 1, false),
            vec![
                standby("n2", L, "sync", Some(4_000)),
                standby("n3", L, "async", FRESH),
            ],
        )
        .ttl_ms(10_000)
        .wants(wanted(&["n2"], 1, false)),
        case(
            "the bound is at least three status intervals: 2.5 s under ttl = 2 s is not stale",
            setting(&["n2"], 1, false),
            vec![
                standby("n2", L, "sync", Some(2_500)),
                standby("n3", L, "async", FRESH),
            ],
        )
        .ttl_ms(2_000)
        .wants(wanted(&["n2"], 1, false)),
        case(
            "a replaced standby that replies again stays asynchronous (no churn)",
            setting(&["n3"], 1, false),
            vec![
                standby("n2", L, "async", FRESH),
                standby("n3", L - 100, "sync", FRESH),
            ],
        )
        .wants(wanted(&["n3"], 1, false)),
    ];
    let mut failures = Vec::new();
    for c in cases {
        let members = membership(&all, c.nosync);
        let known = Known {
            members: &members,
            now_ms: NOW_MS,
            ttl_ms: c.ttl_ms,
        };
        let got = desired(
            &c.cfg,
            &view(&all),
            known,
            &m("n1"),
            &c.standbys,
            &c.current,
        );
        if got != c.expected {
            failures.push(format!(
                "{}\n  expected {:?}\n  got      {got:?}",
                c.what, c.expected
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `S ⊆ R` and `k_S ≥ k_R`: every acknowledged commit is on k_R members of R.
fn assert_covered(record: &SyncRecord, current: &SyncSetting, step: usize) {
    for n in current.real_names() {
        assert!(
            record.members.contains(&n),
            "step {step}: {n} is in the setting {current:?} but not in the record {record:?}"
        );
    }
    assert!(
        current.real_names().is_empty() || current.k >= record.quorum,
        "step {step}: setting {current:?} acknowledges with fewer than the record's k {record:?}"
    );
}

/// The whole replacement, each step applied as the agent would: the record
/// covers the new standby before the setting names it, and the silent one
/// leaves the record only once the new one is synchronous and holds every
/// commit acknowledged before the switch. Writes resume at the switch.
#[test]
fn replacement_grows_the_record_switches_then_settles_once_caught_up() {
    let all = ["n1", "n2", "n3"];
    let members = membership(&all, &[]);
    let known = Known {
        members: &members,
        now_ms: NOW_MS,
        ttl_ms: TTL_MS,
    };
    let me = m("n1");
    let cfg = config(SyncMode::On, 1, false);
    let view = view(&all);
    let mut record = SyncRecord {
        leader: me.clone(),
        members: names(&["n2"]),
        quorum: 1,
        degraded: false,
    };
    let mut current = setting(&["n2"], 1, false);
    let mut switched_at = Some(Lsn(L - 1000));
    // n2 is frozen at its last reply; n3 is behind the leader until it
    // catches up below.
    let mut n3_flush = L - 200;
    let mut steps = Vec::new();
    for step in 0..10 {
        let n3_state = if current.names.contains(&m("n3")) {
            "sync"
        } else {
            "async"
        };
        let n2_state = if current.names.contains(&m("n2")) {
            "sync"
        } else {
            "async"
        };
        let standbys = vec![
            standby("n2", L - 1000, n2_state, SILENT),
            standby("n3", n3_flush, n3_state, FRESH),
        ];
        let d = desired(&cfg, &view, known, &me, &standbys, &current);
        let Some(next) = next_step(&me, &d, Some(&record), &current, &standbys, switched_at) else {
            if n3_flush < L {
                // Synchronous but not yet past the switch: the record must
                // still hold n2. Now n3 catches up.
                assert!(record.members.contains(&m("n2")), "{record:?}");
                n3_flush = L;
                steps.push(None);
                continue;
            }
            break;
        };
        match &next {
            SyncStep::WriteRecord(r) => record = r.clone(),
            SyncStep::SetSetting(s) => {
                current = s.clone();
                switched_at = Some(Lsn(L));
            }
        }
        assert_covered(&record, &current, step);
        steps.push(Some(next));
    }
    let grow = SyncRecord {
        members: names(&["n2", "n3"]),
        ..record.clone()
    };
    assert_eq!(
        steps,
        vec![
            Some(SyncStep::WriteRecord(grow)),
            Some(SyncStep::SetSetting(setting(&["n3"], 1, false))),
            None,
            Some(SyncStep::WriteRecord(SyncRecord {
                leader: me.clone(),
                members: names(&["n3"]),
                quorum: 1,
                degraded: false,
            })),
        ]
    );
}

/// The leader looks again soon while its record waits for a standby's
/// confirmation, and not otherwise.
#[test]
fn settling_lasts_until_the_record_matches_the_setting() {
    let me = m("a");
    let setting = |list: &[&str], k: u32| SyncSetting {
        names: names(list),
        k,
        quorum: false,
    };
    let rec = |leader: &str, list: &[&str], k: u32, degraded: bool| SyncRecord {
        leader: m(leader),
        members: names(list),
        quorum: k,
        degraded,
    };
    let rows: Vec<(Option<SyncRecord>, SyncSetting, bool, &str)> = vec![
        (None, SyncSetting::empty(), false, "asynchronous, no record"),
        (
            Some(rec("a", &[], 0, true)),
            SyncSetting::empty(),
            false,
            "degraded with nobody to wait for",
        ),
        (
            Some(rec("a", &["b"], 1, true)),
            setting(&["b"], 1),
            true,
            "bootstrap: b named, not confirmed",
        ),
        (
            Some(rec("a", &["b"], 1, false)),
            setting(&["b"], 1),
            false,
            "settled",
        ),
        (
            Some(rec("a", &["a", "b", "c"], 1, false)),
            setting(&["b", "c"], 1),
            true,
            "new leader still in its own record",
        ),
        (
            Some(rec("a", &["b", "c"], 1, false)),
            setting(&["c"], 1),
            true,
            "narrowing to c",
        ),
        (
            Some(rec("z", &["b"], 1, false)),
            setting(&["b"], 1),
            true,
            "record of a former leader",
        ),
        (None, setting(&["b"], 1), true, "no record yet"),
        (
            Some(rec("a", &["b", "c"], 1, false)),
            setting(&["b", "c"], 2),
            true,
            "raising k",
        ),
        (
            Some(rec("a", &[], 0, false)),
            SyncSetting {
                names: vec![m(super::NOBODY)],
                k: 1,
                quorum: false,
            },
            false,
            "strict with no standby: nothing to confirm",
        ),
    ];
    for (record, current, want, why) in rows {
        assert_eq!(settling(&me, record.as_ref(), &current), want, "{why}");
    }
}
