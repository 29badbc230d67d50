//! Which of a replica's slots still hold something from a former
//! leadership.
//!
//! A leader creates its members' slots reserving WAL, and the members'
//! hot_standby_feedback gives them an xmin. Once that leader is demoted,
//! nothing streams from those slots and nothing moves them: their
//! `restart_lsn` keeps every WAL segment since the demotion on the replica
//! (a fault run filled a 512 MB disk this way), and with
//! hot_standby_feedback (pgha's default) their `xmin` is forwarded to the
//! leader and holds back its vacuum.
//!
//! Such a slot is reset: dropped and created again without reserving WAL,
//! the state every replica keeps its slots in (see
//! `docs/architecture.md`, "Replication slots"). Advancing it to the replay
//! position (`pg_replication_slot_advance`, as Patroni does) was the other
//! choice; it was not taken because
//! - it cannot clear an xmin: only dropping the slot does;
//! - the position a former leadership left is useless to the members after
//!   a later promotion of this replica: they re-point from around the
//!   promotion point, far past it. Keeping a reservation that follows
//!   replay would protect them better, but only if every replica did so;
//!   replicas that never led keep unreserved slots, and a member that
//!   re-points reserves its slot from its own position when it connects,
//!   with `wal_keep_size` covering the gap, as before;
//! - a reset is done once, while advancing would be an action on every
//!   replica for as long as WAL is written.

use crate::model::SLOT_PREFIX;
use crate::postgres::observe::SlotInfo;

/// pgha's slots on a streaming replica that hold WAL or an xmin while
/// nothing streams from them, minus those about to be dropped anyway.
/// Active slots are left alone (a member streams from this replica), and
/// so are slots pgha did not create.
pub(super) fn to_reset(slots: &[SlotInfo], dropping: &[String]) -> Vec<String> {
    slots
        .iter()
        .filter(|s| s.name.starts_with(SLOT_PREFIX) && !dropping.contains(&s.name))
        .filter(|s| !s.active && (s.restart_lsn.is_some() || s.holds_xmin))
        .map(|s| s.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Lsn;

    fn slot(name: &str, restart_lsn: Option<u64>, active: bool, holds_xmin: bool) -> SlotInfo {
        SlotInfo {
            name: name.into(),
            restart_lsn: restart_lsn.map(Lsn),
            active,
            holds_xmin,
        }
    }

    #[test]
    fn table() {
        let cases: &[(&str, SlotInfo, &[&str], bool)] = &[
            (
                "unreserved, as a replica creates it",
                slot("pgha_n2", None, false, false),
                &[],
                false,
            ),
            (
                "reserved by a former leadership",
                slot("pgha_n2", Some(0x3000000), false, false),
                &[],
                true,
            ),
            (
                "xmin from a member's feedback, no WAL",
                slot("pgha_n2", None, false, true),
                &[],
                true,
            ),
            (
                "both, as a demoted leader leaves them",
                slot("pgha_n2", Some(0x3000000), false, true),
                &[],
                true,
            ),
            (
                "active: a member streams from this replica",
                slot("pgha_n2", Some(0x3000000), true, true),
                &[],
                false,
            ),
            (
                "not pgha's",
                slot("backup_tool", Some(0x3000000), false, true),
                &[],
                false,
            ),
            (
                "being dropped already",
                slot("pgha_old", Some(0x3000000), false, true),
                &["pgha_old"],
                false,
            ),
        ];
        for (what, s, dropping, reset) in cases {
            let dropping: Vec<String> = dropping.iter().map(|d| d.to_string()).collect();
            let got = to_reset(std::slice::from_ref(s), &dropping);
            let want = if *reset { vec![s.name.clone()] } else { vec![] };
            assert_eq!(got, want, "{what}");
        }
    }

    /// Every combination of the inputs: only pgha's idle slots that hold
    /// something are reset, and a slot as the reset leaves it (unreserved)
    /// is never reset again, so the rule converges in one step.
    #[test]
    fn sweep() {
        for name in ["pgha_n2", "other"] {
            for restart_lsn in [None, Some(1), Some(u64::MAX)] {
                for active in [false, true] {
                    for holds_xmin in [false, true] {
                        for dropping in [vec![], vec![name.to_string()]] {
                            let s = slot(name, restart_lsn, active, holds_xmin);
                            let got = to_reset(std::slice::from_ref(&s), &dropping);
                            let holds = restart_lsn.is_some() || holds_xmin;
                            let expected = name.starts_with(SLOT_PREFIX)
                                && !active
                                && holds
                                && dropping.is_empty();
                            assert_eq!(!got.is_empty(), expected, "{s:?} dropping {dropping:?}");
                            let after = SlotInfo::unreserved(name);
                            assert!(to_reset(&[after], &dropping).is_empty());
                        }
                    }
                }
            }
        }
    }
}
