//! When this member holds the floating address (`[vip]`).
//!
//! The address must be up exactly while this member is the writable
//! leader holding a usable lease. The agent asks [`should_hold_address`]
//! every loop, before it carries the decision out, and makes the interface
//! match: a reconciliation, not a hook on each action, so that no path
//! (a demotion, a failed start, an address removed by hand, a restart of
//! the agent) can leave the address in the wrong state for longer than a
//! loop.
//!
//! The fence keeper removes the address too when it fences a frozen agent
//! (`agent::fence_keeper`); this rule covers a live agent.

use super::lease::lease_usable;
use super::snapshot::{Action, Lease};
use crate::model::PgRole;
use crate::postgres::PgStatus;

/// Whether the address should be up: the server runs writable, the lease
/// is usable at `now_ms` (the current lease, not the snapshot's: time has
/// passed since), and this loop's action does not stop writes. The
/// address goes *before* a demotion, so new clients do not reach a server
/// that is about to shut down; it comes back only once a later loop sees
/// the server writable again (the loop after a promotion).
pub fn should_hold_address(
    pg: &PgStatus,
    action: &Action,
    lease: &Lease,
    now_ms: u64,
    fence_margin_ms: u64,
) -> bool {
    let writable = matches!(pg, PgStatus::Running(r) if r.role == PgRole::Primary);
    let stopping = matches!(
        action,
        Action::Demote { .. }
            | Action::ReleaseLease
            | Action::Resign { .. }
            | Action::StopAndRelease
            // A writable server told to follow or restart as a replica is
            // on its way down too.
            | Action::Follow { .. }
            | Action::StartReplica { .. }
            | Action::Rewind { .. }
            | Action::Reclone { .. }
            | Action::Clone { .. }
    );
    writable && !stopping && lease_usable(lease, now_ms, fence_margin_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ha::DemoteReason;
    use crate::model::MemberName;

    fn running(role: PgRole) -> PgStatus {
        PgStatus::Running(Box::new(crate::postgres::observe::Running {
            role,
            timeline: None,
            current_lsn: None,
            flush_lsn: None,
            receive_lsn: None,
            replay_lsn: None,
            streaming: false,
            sender: None,
            synchronous_standby_names: String::new(),
            configured_upstream: None,
            system_id: "1".into(),
            standbys: Vec::new(),
            slots: Vec::new(),
        }))
    }

    const NOW: u64 = 100_000;
    const MARGIN: u64 = 500;

    fn lease(held: bool, valid_for_ms: Option<u64>) -> Lease {
        Lease {
            held,
            valid_until_ms: valid_for_ms.map(|v| NOW + v),
            confirmed_by_members: false,
        }
    }

    #[test]
    fn holds_only_as_writable_leader_with_usable_lease() {
        let leader = MemberName::new("n2".to_string());
        let cases: Vec<(&str, PgStatus, Action, Lease, bool)> = vec![
            (
                "leading",
                running(PgRole::Primary),
                Action::Wait,
                lease(true, Some(3_000)),
                true,
            ),
            (
                "leading, slots",
                running(PgRole::Primary),
                Action::Lead {
                    create_slots: vec![],
                    drop_slots: vec![],
                },
                lease(true, Some(3_000)),
                true,
            ),
            (
                "replica with the lease (promotion pending)",
                running(PgRole::Replica),
                Action::Wait,
                lease(true, Some(3_000)),
                false,
            ),
            (
                "replica being promoted",
                running(PgRole::Replica),
                Action::Promote { sync: None },
                lease(true, Some(3_000)),
                false,
            ),
            (
                "primary without the lease",
                running(PgRole::Primary),
                Action::Wait,
                lease(false, None),
                false,
            ),
            (
                "lease held, no deadline",
                running(PgRole::Primary),
                Action::Wait,
                lease(true, None),
                false,
            ),
            (
                "lease inside the fence margin",
                running(PgRole::Primary),
                Action::Wait,
                lease(true, Some(MARGIN - 1)),
                false,
            ),
            (
                "lease exactly at the margin",
                running(PgRole::Primary),
                Action::Wait,
                lease(true, Some(MARGIN)),
                true,
            ),
            (
                "lease expired",
                running(PgRole::Primary),
                Action::Wait,
                Lease {
                    held: true,
                    valid_until_ms: Some(NOW - 1),
                    confirmed_by_members: false,
                },
                false,
            ),
            (
                "demoting: lease lost",
                running(PgRole::Primary),
                Action::Demote {
                    reason: DemoteReason::LeaseLost,
                },
                lease(true, Some(3_000)),
                false,
            ),
            (
                "demoting: switchover",
                running(PgRole::Primary),
                Action::Demote {
                    reason: DemoteReason::Switchover,
                },
                lease(true, Some(3_000)),
                false,
            ),
            (
                "releasing",
                running(PgRole::Primary),
                Action::ReleaseLease,
                lease(true, Some(3_000)),
                false,
            ),
            (
                "stopping",
                running(PgRole::Primary),
                Action::StopAndRelease,
                lease(true, Some(3_000)),
                false,
            ),
            (
                "told to follow",
                running(PgRole::Primary),
                Action::Follow {
                    leader: leader.clone(),
                },
                lease(true, Some(3_000)),
                false,
            ),
            (
                "rewinding",
                running(PgRole::Primary),
                Action::Rewind { leader },
                lease(true, Some(3_000)),
                false,
            ),
            (
                "stopped leader",
                PgStatus::Stopped,
                Action::Wait,
                lease(true, Some(3_000)),
                false,
            ),
            (
                "leader starting",
                PgStatus::Starting,
                Action::StartPrimary {
                    sync: crate::ha::sync::SyncSetting::empty(),
                },
                lease(true, Some(3_000)),
                false,
            ),
        ];
        for (name, pg, action, lease, want) in cases {
            assert_eq!(
                should_hold_address(&pg, &action, &lease, NOW, MARGIN),
                want,
                "{name}"
            );
        }
    }

    /// Whatever the action and the server: never without a usable lease,
    /// never unless the server is writable.
    #[test]
    fn never_without_usable_lease_or_writable_server() {
        let actions = [
            Action::Wait,
            Action::AcquireLease,
            Action::Promote { sync: None },
            Action::Bootstrap,
            Action::Lead {
                create_slots: vec![],
                drop_slots: vec![],
            },
            Action::Demote {
                reason: DemoteReason::NoLeaderKey,
            },
            Action::ReleaseLease,
        ];
        let servers = [
            running(PgRole::Primary),
            running(PgRole::Replica),
            PgStatus::Stopped,
            PgStatus::Starting,
        ];
        let leases = [
            lease(false, None),
            lease(false, Some(3_000)),
            lease(true, None),
            lease(true, Some(0)),
            lease(true, Some(3_000)),
        ];
        for a in &actions {
            for pg in &servers {
                for l in &leases {
                    if should_hold_address(pg, a, l, NOW, MARGIN) {
                        assert!(lease_usable(l, NOW, MARGIN), "{a:?} {pg:?} {l:?}");
                        assert!(matches!(pg, PgStatus::Running(r) if r.role == PgRole::Primary));
                    }
                }
            }
        }
    }
}
