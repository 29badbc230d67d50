//! Pure rules about the leader lease and the fence keeper that guards it.
//!
//! The lease keeper and the executor used to carry these rules inline;
//! they live here, next to [`decide`](super::decide), so that every rule
//! that can let a primary stay writable is table-tested without I/O.
//!
//! The central rule: the agent may treat its lease as valid only as long as
//! a fence keeper has *acknowledged* a kill deadline that covers it. A
//! renewal etcd granted but no keeper acknowledged extends nothing, so a
//! dead, frozen or unreachable keeper leads to a clean demotion at the last
//! acknowledged deadline instead of a primary that nobody would stop.

use super::snapshot::Lease;

/// Whether the lease may be used for writes now: held, and more than
/// `fence_margin` before the end of its usable time. The decision and the
/// executor's last check before anything writable both ask this.
pub fn lease_usable(lease: &Lease, now_ms: u64, fence_margin_ms: u64) -> bool {
    lease.held
        && lease
            .valid_until_ms
            .is_some_and(|until| now_ms + fence_margin_ms <= until)
}

/// What the fence keeper last wrote in its acknowledgement file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeeperAck {
    pub keeper_pid: i32,
    /// When it wrote the acknowledgement (`CLOCK_BOOTTIME` ms). The keeper
    /// rewrites it periodically, so its age shows progress.
    pub beat_ms: u64,
    /// The deadline it enforces, when armed.
    pub armed_deadline_ms: Option<u64>,
}

/// The agent's view of its fence keeper, captured at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeeperView {
    /// The keeper process this agent started and watches (its child).
    pub supervised_pid: Option<i32>,
    /// The kernel reported that child stopped (SIGSTOP) and not continued.
    pub stopped: bool,
    pub ack: Option<KeeperAck>,
}

/// A keeper acknowledgement older than this shows a keeper that stopped
/// making progress (it writes one at least every
/// [`KEEPER_BEAT_MS`]). Generous on purpose: under heavy load a 20 ms
/// sleep can overrun, and a stale keeper only pauses renewals.
pub const KEEPER_STALE_MS: u64 = 1_000;

/// How often the keeper rewrites its acknowledgement when nothing changes.
pub const KEEPER_BEAT_MS: u64 = 100;

/// A keeper whose acknowledgement is this old is hung: the agent kills it
/// and starts another.
pub const KEEPER_HUNG_MS: u64 = 2 * KEEPER_STALE_MS;

/// Why a keeper cannot be relied on right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeeperProblem {
    NotRunning,
    Stopped,
    /// The acknowledgement comes from another process (a keeper of an
    /// earlier agent still hands over, or none answered yet).
    NotAcknowledged,
    /// No acknowledgement for longer than [`KEEPER_STALE_MS`].
    Stale {
        age_ms: u64,
    },
}

impl std::fmt::Display for KeeperProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeeperProblem::NotRunning => write!(f, "the fence keeper is not running"),
            KeeperProblem::Stopped => write!(f, "the fence keeper is stopped"),
            KeeperProblem::NotAcknowledged => {
                write!(f, "the fence keeper has not acknowledged yet")
            }
            KeeperProblem::Stale { age_ms } => {
                write!(f, "the fence keeper made no progress for {age_ms} ms")
            }
        }
    }
}

/// Whether the keeper is alive, running, and making progress.
pub fn keeper_health(now_ms: u64, k: &KeeperView) -> Result<(), KeeperProblem> {
    let Some(pid) = k.supervised_pid else {
        return Err(KeeperProblem::NotRunning);
    };
    if k.stopped {
        return Err(KeeperProblem::Stopped);
    }
    let Some(ack) = k.ack.filter(|a| a.keeper_pid == pid) else {
        return Err(KeeperProblem::NotAcknowledged);
    };
    let age_ms = now_ms.saturating_sub(ack.beat_ms);
    if age_ms > KEEPER_STALE_MS {
        return Err(KeeperProblem::Stale { age_ms });
    }
    Ok(())
}

/// Whether the agent should kill its keeper and start a new one: it is
/// stopped, or has been silent for [`KEEPER_HUNG_MS`].
pub fn keeper_needs_replacing(now_ms: u64, k: &KeeperView) -> bool {
    match keeper_health(now_ms, k) {
        Err(KeeperProblem::Stopped) => true,
        Err(KeeperProblem::Stale { age_ms }) => age_ms > KEEPER_HUNG_MS,
        _ => false,
    }
}

/// How much earlier than the fence keeper the agent stops writes when the
/// lease cannot be renewed. The keeper is the backstop for a frozen agent;
/// a live agent must get there first, so that a lost lease ends in a clean
/// demotion (and a server the agent restarts read-only at once) rather than
/// in a SIGKILL and crash recovery. Covers one `pg_ctl stop -m immediate`
/// (about 100-200 ms) with room to spare.
pub const AGENT_LEAD_MS: u64 = 400;

/// How long the lease may be used for writes: what etcd granted, cut at the
/// deadline some keeper acknowledged (plus the margin, since
/// [`decide`](super::decide) stops writes `fence_margin` before the end),
/// and `agent_lead_ms` earlier, so the agent demotes before its keeper
/// fires.
///
/// The acknowledged deadline counts even when the keeper has died since:
/// the agent itself then demotes before that deadline, and nothing later
/// is granted without a new acknowledgement.
pub fn usable_until(
    etcd_valid_until_ms: Option<u64>,
    ack: Option<&KeeperAck>,
    fence_margin_ms: u64,
    agent_lead_ms: u64,
) -> Option<u64> {
    let guarded = ack?.armed_deadline_ms?.saturating_add(fence_margin_ms);
    Some(
        etcd_valid_until_ms?
            .min(guarded)
            .saturating_sub(agent_lead_ms),
    )
}

/// How long the agent may spend on one step (an etcd read, a sleep)
/// before it must decide again, given the lease as the decision sees it:
/// up to the instant the decision would stop writes. `None` when no lease
/// is held (nothing to be late for).
pub fn time_to_act(lease: &Lease, now_ms: u64, fence_margin_ms: u64) -> Option<u64> {
    if !lease.held {
        return None;
    }
    Some(lease.valid_until_ms.map_or(0, |u| {
        u.saturating_sub(fence_margin_ms).saturating_sub(now_ms)
    }))
}

/// Why the lease keeper does not send a renewal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenewRefusal {
    /// The HA loop has not run for longer than the TTL and announced no
    /// long step: nobody watches PostgreSQL, so the lease must lapse.
    LoopStale { stale_ms: u64 },
    /// No fence keeper stands guard: a renewal would extend a lease that
    /// nothing could enforce if the agent froze now.
    Keeper(KeeperProblem),
}

/// Whether the lease keeper may renew now.
pub fn may_renew(
    now_ms: u64,
    loop_heartbeat_ms: u64,
    busy_until_ms: u64,
    ttl_ms: u64,
    keeper: &KeeperView,
) -> Result<(), RenewRefusal> {
    let stale_ms = now_ms.saturating_sub(loop_heartbeat_ms);
    if stale_ms > ttl_ms && now_ms > busy_until_ms {
        return Err(RenewRefusal::LoopStale { stale_ms });
    }
    keeper_health(now_ms, keeper).map_err(RenewRefusal::Keeper)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    fn ack(pid: i32, age: u64, deadline: Option<u64>) -> Option<KeeperAck> {
        Some(KeeperAck {
            keeper_pid: pid,
            beat_ms: NOW - age,
            armed_deadline_ms: deadline,
        })
    }

    fn view(pid: Option<i32>, stopped: bool, ack: Option<KeeperAck>) -> KeeperView {
        KeeperView {
            supervised_pid: pid,
            stopped,
            ack,
        }
    }

    #[test]
    fn keeper_health_table() {
        use KeeperProblem::*;
        let rows: &[(KeeperView, Result<(), KeeperProblem>, bool)] = &[
            // (view, health, needs replacing)
            (view(Some(7), false, ack(7, 0, None)), Ok(()), false),
            (
                view(Some(7), false, ack(7, KEEPER_STALE_MS, Some(5))),
                Ok(()),
                false,
            ),
            (view(None, false, ack(7, 0, None)), Err(NotRunning), false),
            (view(Some(7), true, ack(7, 0, None)), Err(Stopped), true),
            // An acknowledgement by a previous keeper is not this one's.
            (
                view(Some(8), false, ack(7, 0, None)),
                Err(NotAcknowledged),
                false,
            ),
            (view(Some(8), false, None), Err(NotAcknowledged), false),
            (
                view(Some(7), false, ack(7, KEEPER_STALE_MS + 1, None)),
                Err(Stale {
                    age_ms: KEEPER_STALE_MS + 1,
                }),
                false,
            ),
            (
                view(Some(7), false, ack(7, KEEPER_HUNG_MS + 1, None)),
                Err(Stale {
                    age_ms: KEEPER_HUNG_MS + 1,
                }),
                true,
            ),
        ];
        for (i, (v, health, replace)) in rows.iter().enumerate() {
            assert_eq!(keeper_health(NOW, v), *health, "row {i}");
            assert_eq!(keeper_needs_replacing(NOW, v), *replace, "row {i}");
        }
    }

    #[test]
    fn usable_until_is_cut_at_the_acknowledged_deadline() {
        let margin = 1_000;
        let lead = 400;
        let rows: &[(Option<u64>, Option<KeeperAck>, Option<u64>)] = &[
            // Acknowledged the current deadline: etcd's validity stands,
            // less the agent's lead on its keeper.
            (
                Some(NOW + 3_000),
                ack(7, 0, Some(NOW + 2_000)),
                Some(NOW + 2_600),
            ),
            // Renewed, not yet acknowledged: the older deadline bounds it.
            (
                Some(NOW + 3_500),
                ack(7, 0, Some(NOW + 2_000)),
                Some(NOW + 2_600),
            ),
            // A keeper that died still bounds it by what it acknowledged.
            (
                Some(NOW + 9_000),
                ack(7, 5_000, Some(NOW + 100)),
                Some(NOW + 700),
            ),
            // Disarmed keeper, or none: nothing is usable.
            (Some(NOW + 3_000), ack(7, 0, None), None),
            (Some(NOW + 3_000), None, None),
            // No lease: nothing, whatever the keeper says.
            (None, ack(7, 0, Some(NOW + 2_000)), None),
        ];
        for (i, (etcd, a, want)) in rows.iter().enumerate() {
            assert_eq!(
                usable_until(*etcd, a.as_ref(), margin, lead),
                *want,
                "row {i}"
            );
            // The decision stops writes `margin` before what is usable:
            // always at least `lead` before the keeper's deadline.
            if let (Some(u), Some(d)) = (want, a.and_then(|a| a.armed_deadline_ms)) {
                assert!(u - margin + lead <= d, "row {i}");
            }
        }
    }

    #[test]
    fn the_agent_never_waits_past_its_demotion_point() {
        let held = |until: Option<u64>| Lease {
            held: true,
            valid_until_ms: until,
            confirmed_by_members: false,
        };
        let margin = 500;
        assert_eq!(time_to_act(&Lease::default(), NOW, margin), None);
        assert_eq!(
            time_to_act(&held(Some(NOW + 2_000)), NOW, margin),
            Some(1_500)
        );
        // Already past it, or nothing usable: act now.
        assert_eq!(time_to_act(&held(Some(NOW + 100)), NOW, margin), Some(0));
        assert_eq!(time_to_act(&held(None), NOW, margin), Some(0));
    }

    #[test]
    fn renewals_need_a_live_loop_and_a_live_keeper() {
        let ttl = 3_000;
        let healthy = view(Some(7), false, ack(7, 10, Some(NOW)));
        assert_eq!(may_renew(NOW, NOW - 500, 0, ttl, &healthy), Ok(()));
        // A loop silent for longer than the TTL...
        assert_eq!(
            may_renew(NOW, NOW - 3_001, 0, ttl, &healthy),
            Err(RenewRefusal::LoopStale { stale_ms: 3_001 })
        );
        // ...unless it announced a long step that is still running.
        assert_eq!(may_renew(NOW, NOW - 3_001, NOW + 1, ttl, &healthy), Ok(()));
        // The keeper was SIGKILLed (no child) or SIGSTOPped.
        assert_eq!(
            may_renew(NOW, NOW, 0, ttl, &view(None, false, None)),
            Err(RenewRefusal::Keeper(KeeperProblem::NotRunning))
        );
        assert_eq!(
            may_renew(NOW, NOW, 0, ttl, &view(Some(7), true, ack(7, 0, None))),
            Err(RenewRefusal::Keeper(KeeperProblem::Stopped))
        );
    }
}
