//! A leader-key holder whose promotion keeps failing gives the key up.
//!
//! Holding the key means "I am about to be the writable primary": while it
//! lives nobody else may promote. A member whose PostgreSQL starts fine
//! read-only but dies at every promotion (a full or read-only WAL disk kills
//! the startup process when it writes the new timeline's first segment)
//! would otherwise renew the key for ever, with writes stopped and healthy
//! replicas waiting. So the holder *resigns* after
//! [`FAILED_PROMOTIONS_BEFORE_RESIGNING`] failed promotions in a row, or
//! once it has been trying for `primary_start_timeout` and failed at least
//! once (a promotion that hangs), and then stays out of the race for
//! [`cooldown_ms`], publishing `nofailover` meanwhile so that the others do
//! not wait for it either.
//!
//! In synchronous mode the resigning holder first records the set
//! [`resignation_record`]: itself and the members known to have at least
//! its WAL. It holds every acknowledged commit (that is how it won the
//! race) and acknowledged none of its own (it was never writable), so that
//! record is true, and a member without all commits stays unpromotable.

use crate::config::HaConfig;
use crate::dcs::{ClusterView, SyncRecord};
use crate::model::{Lsn, MemberName, PgRole, PgState, Timeline};

use super::snapshot::Local;

/// Failed promotions in a row after which the key holder resigns. One
/// failure can be bad luck (a promotion racing a restart); three that end
/// the same way are a server that cannot become writable here.
pub const FAILED_PROMOTIONS_BEFORE_RESIGNING: u32 = 3;

/// Whether the key holder has tried long enough: enough failed promotions
/// in a row, or at least one and `primary_start_timeout` since the first
/// of them was requested.
pub fn keeps_failing(local: &Local, now_ms: u64, ha: &HaConfig) -> bool {
    let failures = local.failed_promotions;
    let trying_for = local
        .promoting_since_ms
        .map_or(0, |since| now_ms.saturating_sub(since));
    failures >= FAILED_PROMOTIONS_BEFORE_RESIGNING
        || (failures >= 1 && trying_for >= ha.primary_start_timeout.as_millis() as u64)
}

/// How long a member that resigned stays out of the race:
/// `primary_start_timeout`, and at least one `ttl` so that the others have
/// time to elect one of them. Afterwards it may try again: when nobody
/// else may lead (synchronous mode, only it holds every commit), retrying
/// is the only way writes can resume without an operator.
pub fn cooldown_ms(ha: &HaConfig) -> u64 {
    ha.primary_start_timeout.max(ha.ttl).as_millis() as u64
}

/// Whether a member that resigned at `resigned_at_ms` is still out of the
/// race at `now_ms`.
pub fn barred(resigned_at_ms: Option<u64>, now_ms: u64, ha: &HaConfig) -> bool {
    resigned_at_ms.is_some_and(|at| now_ms < at.saturating_add(cooldown_ms(ha)))
}

/// The synchronous set a resigning holder records: itself, plus every
/// running replica on its timeline whose published position is at least its
/// own (`mine`; unknown when its server is down, and then nobody else),
/// each of them holding every acknowledged commit, hence `quorum` = all of
/// them. Any one of them may then race on its own; a replica that lacks
/// commits is not in the set and cannot.
pub fn resignation_record(
    me: &MemberName,
    view: &ClusterView,
    mine: Option<(Timeline, Lsn)>,
) -> SyncRecord {
    let mut members = vec![me.clone()];
    if let Some((timeline, position)) = mine {
        members.extend(
            view.members
                .values()
                .filter(|r| &r.name != me && r.role == PgRole::Replica)
                .filter(|r| matches!(r.state, PgState::Streaming | PgState::InRecovery))
                .filter(|r| r.timeline == Some(timeline))
                .filter(|r| r.wal_position().is_some_and(|p| p >= position))
                .map(|r| r.name.clone()),
        );
    }
    SyncRecord {
        leader: me.clone(),
        quorum: members.len() as u32,
        members,
        degraded: false,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::MemberRecord;
    use crate::postgres::{DataDirState, PgStatus};

    const NOW: u64 = 1_000_000;

    fn ha() -> HaConfig {
        HaConfig {
            primary_start_timeout: Duration::from_secs(10),
            ttl: Duration::from_secs(3),
            ..HaConfig::default()
        }
    }

    fn local(failed_promotions: u32, promoting_for_ms: Option<u64>) -> Local {
        Local {
            data: DataDirState::Initialized,
            system_id: None,
            pg: PgStatus::Stopped,
            down_since_ms: None,
            on_disk: None,
            upstream: None,
            not_streaming_since_ms: None,
            rewind_failed: false,
            former_primary: false,
            failed_starts: 0,
            fence_ready: true,
            failed_promotions,
            promoting_since_ms: promoting_for_ms.map(|ms| NOW - ms),
            resigned_at_ms: None,
            unmanaged: None,
            bootstrap_restore_unfinished: false,
        }
    }

    #[test]
    fn when_the_holder_resigns() {
        // (failed promotions, trying for, resigns)
        let cases = [
            (0, None, false),
            (0, Some(60_000), false), // first promotion still running
            (1, Some(1_000), false),
            (2, Some(9_999), false),
            (1, Some(10_000), true), // one that hung for the whole timeout
            (3, Some(2_000), true),
            (3, None, true),
        ];
        for (failures, trying_for, resigns) in cases {
            assert_eq!(
                keeps_failing(&local(failures, trying_for), NOW, &ha()),
                resigns,
                "{failures} failures, trying for {trying_for:?}"
            );
        }
    }

    #[test]
    fn the_bar_lasts_the_cooldown() {
        let ha = ha();
        assert_eq!(cooldown_ms(&ha), 10_000);
        let short = HaConfig {
            primary_start_timeout: Duration::from_secs(1),
            ..ha.clone()
        };
        assert_eq!(cooldown_ms(&short), 3_000, "at least one ttl");
        assert!(!barred(None, NOW, &ha));
        assert!(barred(Some(NOW), NOW, &ha));
        assert!(barred(Some(NOW - 9_999), NOW, &ha));
        assert!(!barred(Some(NOW - 10_000), NOW, &ha));
    }

    fn replica(name: &str, state: PgState, timeline: u32, lsn: u64) -> MemberRecord {
        let mut r: MemberRecord = serde_json::from_value(serde_json::json!({
            "name": name, "api_url": "http://x:8008", "host": "x", "port": 5432,
            "role": "replica", "state": "streaming",
        }))
        .expect("a minimal member record decodes");
        r.state = state;
        r.timeline = Some(Timeline(timeline));
        r.received_lsn = Some(Lsn(lsn));
        r
    }

    #[test]
    fn resignation_record_names_only_members_with_all_of_my_wal() {
        let mut view = ClusterView::default();
        for r in [
            replica("n1", PgState::InRecovery, 1, 100),
            replica("a_equal", PgState::InRecovery, 1, 100),
            replica("b_ahead", PgState::Streaming, 1, 150),
            replica("c_behind", PgState::InRecovery, 1, 99),
            replica("d_other_timeline", PgState::InRecovery, 2, 200),
            replica("e_stopped", PgState::Stopped, 1, 100),
        ] {
            view.members.insert(r.name.clone(), r);
        }
        let me = MemberName::from("n1");
        let rec = resignation_record(&me, &view, Some((Timeline(1), Lsn(100))));
        let names: Vec<&str> = rec.members.iter().map(|n| n.as_str()).collect();
        assert_eq!(names, ["n1", "a_equal", "b_ahead"]);
        assert_eq!((rec.quorum, rec.degraded), (3, false));
        assert_eq!(rec.leader, me);

        // Position unknown (server down): nobody else is proven to hold
        // every commit.
        let alone = resignation_record(&me, &view, None);
        assert_eq!(alone.members, vec![me.clone()]);
        assert_eq!(alone.quorum, 1);
    }
}
