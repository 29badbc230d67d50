//! The decision function. The order of the checks follows the questions an
//! operator would ask: can I see the DCS? does the cluster exist? is my data
//! usable? who leads? am I allowed to be writable?

use super::election::may_race;
use super::lease::lease_usable;
use super::promotion;
use super::snapshot::{Action, Decision, DemoteReason, OnDisk, Reason, Snapshot};
use super::sync::{self, SyncSetting, SyncStep};
use crate::dcs::{ClusterView, Initialize, SyncMode, SyncRecord};
use crate::model::{MemberName, PgRole, PgState};
use crate::postgres::adopt::Unmanaged;
use crate::postgres::{DataDirState, PgStatus};

/// How long a switchover/failover request steers the leader race. After
/// that, a target that never took over no longer blocks automatic failover.
pub const FAILOVER_REQUEST_TTL_MS: u64 = 30_000;

/// Starts of a replica that end with the postmaster gone again before the
/// data directory is repaired (rewind, then re-clone).
pub const FAILED_STARTS_BEFORE_REPAIR: u32 = 3;

/// One loop's decision. Pure: same snapshot, same decision.
pub fn decide(s: &Snapshot) -> Decision {
    let d = decide_unguarded(s);
    // Taking (or resuming) the lease, and bootstrapping (which takes it),
    // need a fence keeper standing guard first: a leader that froze with no
    // keeper would stay writable after its lease ran out.
    let takes_lease = matches!(
        d.action,
        Action::AcquireLease | Action::AdoptLease { .. } | Action::Bootstrap | Action::Adopt
    );
    if takes_lease && !s.local.fence_ready {
        // A primary that would adopt its lease is writable with nothing
        // guarding it: stop writes rather than wait. A database to adopt
        // is not pgha's yet: it waits, untouched.
        return if is_primary(s) && d.action != Action::Adopt {
            Decision::new(
                Action::Demote {
                    reason: DemoteReason::LeaseLost,
                },
                Reason::FenceKeeperNotReady,
            )
        } else {
            Decision::wait(Reason::FenceKeeperNotReady)
        };
    }
    d
}

/// How many `loop_wait`s a member with an empty data directory waits after
/// starting before it races to create a new cluster (see
/// [`Reason::BootstrapGrace`]).
pub const BOOTSTRAP_GRACE_LOOPS: u64 = 3;

/// Another member that will adopt its existing database (it says so in its
/// record), the first by name: an empty member waits for it rather than
/// racing to create an empty cluster, which would leave the operator's
/// database outside.
fn adopting_member(s: &Snapshot, view: &ClusterView) -> Option<MemberName> {
    view.members
        .values()
        .filter(|m| m.name != s.me && m.adoptable)
        .map(|m| m.name.clone())
        .min()
}

fn decide_unguarded(s: &Snapshot) -> Decision {
    if let Some(job) = s.job {
        return Decision::wait(Reason::JobRunning(job));
    }
    let Some(view) = &s.dcs else {
        return without_dcs(s);
    };

    // A database pgha never managed is not part of any cluster: pgha
    // adopts it when the cluster is new and otherwise never touches it
    // (no demotion either: its clients use it on purpose).
    let unmanaged = s.local.data == DataDirState::Initialized && s.local.unmanaged.is_some();
    match &view.initialize {
        None => {
            // What a restore of ours left half-done is nobody's database:
            // as good as empty (never adopted).
            let data = if s.local.bootstrap_restore_unfinished {
                &DataDirState::Empty
            } else {
                &s.local.data
            };
            return match (data, &s.local.unmanaged) {
                (DataDirState::Empty, _) => match adopting_member(s, view) {
                    Some(by) => Decision::wait(Reason::WaitingForAdoption { by }),
                    // Race only once this member's own record is visible
                    // and it has been up for a few loops: the records of
                    // members started at the same time are then visible
                    // too (an adopting member publishes after its first
                    // loop, which may be slow), and one with a database to
                    // adopt is waited for.
                    None if !view.members.contains_key(&s.me)
                        || s.now_ms.saturating_sub(s.up_since_ms)
                            < BOOTSTRAP_GRACE_LOOPS * s.ha.loop_wait.as_millis() as u64 =>
                    {
                        Decision::wait(Reason::BootstrapGrace)
                    }
                    None => Decision::new(Action::Bootstrap, Reason::NotInitialized),
                },
                (DataDirState::Initialized, Some(Unmanaged::Primary)) => {
                    Decision::new(Action::Adopt, Reason::AdoptingDatabase)
                }
                (DataDirState::Initialized, Some(Unmanaged::Standby)) => {
                    Decision::wait(Reason::CannotAdoptStandby)
                }
                // Local data but no cluster in the DCS: the DCS was wiped or
                // this node points at the wrong one. Guessing could fork
                // the cluster, so wait for an operator (writes stopped).
                _ => demote_or_wait(s, Reason::ForeignDataDirectory),
            };
        }
        Some(Initialize::Pending { by }) => {
            if by == &s.me {
                // This member claimed the initialization and stopped before
                // finishing it: start over on an empty directory, finish on
                // the data it has (initdb's, or the database it adopts). A
                // restore from a backup cut short is a partial copy: never
                // adopted, restored again.
                if s.local.bootstrap_restore_unfinished {
                    return Decision::new(Action::Bootstrap, Reason::RestartingRestore);
                }
                return match (&s.local.data, &s.local.unmanaged) {
                    (DataDirState::Empty, _) => {
                        Decision::new(Action::Bootstrap, Reason::NotInitialized)
                    }
                    (DataDirState::Initialized, Some(Unmanaged::Standby)) => {
                        Decision::wait(Reason::CannotAdoptStandby)
                    }
                    (DataDirState::Initialized, _) => {
                        Decision::new(Action::Adopt, Reason::ResumingInitialization)
                    }
                    _ => demote_or_wait(s, Reason::UnusableDataDirectory),
                };
            }
            if unmanaged {
                return Decision::wait(Reason::UnmanagedDatabaseBesideCluster);
            }
            return demote_or_wait(s, Reason::BootstrapInProgress { by: by.clone() });
        }
        Some(Initialize::Done { system_id }) => {
            if unmanaged {
                return Decision::wait(Reason::UnmanagedDatabaseBesideCluster);
            }
            if let (DataDirState::Initialized, Some(mine)) = (&s.local.data, &s.local.system_id)
                && mine != system_id
            {
                return demote_or_wait(s, Reason::ForeignDataDirectory);
            }
        }
    }

    if let DataDirState::Unusable(_) = s.local.data {
        return demote_or_wait(s, Reason::UnusableDataDirectory);
    }

    match &view.leader {
        Some(l) if l.name == s.me => as_leader(s, view, l.lease_id),
        Some(l) => as_follower(s, view, &l.name),
        None => without_leader(s, view),
    }
}

/// Lease usable for writes: held, and not within `fence_margin` of expiry.
fn lease_valid(s: &Snapshot) -> bool {
    lease_usable(&s.lease, s.now_ms, s.ha.fence_margin.as_millis() as u64)
}

fn is_primary(s: &Snapshot) -> bool {
    s.local.role() == Some(PgRole::Primary)
}

/// A writable server must stop before anything else happens.
fn demote_or_wait(s: &Snapshot, reason: Reason) -> Decision {
    if is_primary(s) {
        Decision::new(
            Action::Demote {
                reason: DemoteReason::NoLeaderKey,
            },
            reason,
        )
    } else {
        Decision::wait(reason)
    }
}

fn without_dcs(s: &Snapshot) -> Decision {
    if is_primary(s) {
        // The lease may still be valid: etcd being slow for one loop is no
        // reason to fail over. Once it is about to run out, stop writes,
        // because the others may already be promoting.
        return if lease_valid(s) && s.lease.confirmed_by_members {
            Decision::wait(Reason::LeadingOnMembersConfirmation)
        } else if lease_valid(s) {
            Decision::wait(Reason::DcsUnreachableLeaseValid)
        } else {
            Decision::new(
                Action::Demote {
                    reason: DemoteReason::LeaseLost,
                },
                Reason::LeaseRunningOut,
            )
        };
    }
    // Without the DCS this member cannot know who leads; a stopped server
    // is started read-only so it can at least serve reads — unless it was a
    // primary: its history may have diverged from the new leader's, and it
    // must not serve (or later follow with) commits nobody acknowledged.
    if s.local.pg == PgStatus::Stopped
        && s.local.data == DataDirState::Initialized
        && !s.local.former_primary
        && s.local.on_disk != Some(OnDisk::FormerPrimary)
    {
        return Decision::new(
            Action::StartReplica { leader: None },
            Reason::DcsUnreachable,
        );
    }
    Decision::wait(Reason::DcsUnreachable)
}

fn as_leader(s: &Snapshot, view: &ClusterView, lease_id: i64) -> Decision {
    if !s.lease.held {
        // The key names this member but this agent does not hold the lease:
        // it restarted while the lease lived on. Resume it.
        return Decision::new(Action::AdoptLease { lease_id }, Reason::LeaderKeyIsMine);
    }
    if !lease_valid(s) {
        return if is_primary(s) {
            Decision::new(
                Action::Demote {
                    reason: DemoteReason::LeaseLost,
                },
                Reason::LeaseRunningOut,
            )
        } else {
            Decision::new(Action::ReleaseLease, Reason::LeaseRunningOut)
        };
    }
    if let Some(f) = &view.failover
        && f.from.as_ref() == Some(&s.me)
        && !is_primary(s)
        && s.local.pg != PgStatus::Starting
    {
        // Demoted for a switchover but the release did not go through:
        // finish handing over instead of starting up again.
        return Decision::new(Action::ReleaseLease, Reason::SwitchoverRequested);
    }
    if let Some(f) = &view.failover
        && f.from.as_ref() == Some(&s.me)
        && is_primary(s)
    {
        let due = f.not_before_unix_ms.is_none_or(|t| t <= s.now_unix_ms);
        if due && let Some(pending) = proxies_still_draining(s, view, f) {
            return leading(s, view, Reason::WaitingForProxiesToDrain { pending });
        }
        return if due {
            Decision::new(
                Action::Demote {
                    reason: DemoteReason::Switchover,
                },
                Reason::SwitchoverRequested,
            )
        } else {
            leading(s, view, Reason::SwitchoverScheduled)
        };
    }
    if let Some(d) = resign_if_promotion_keeps_failing(s, view) {
        return d;
    }
    match &s.local.pg {
        PgStatus::Running(r) if r.role == PgRole::Primary => leading(s, view, Reason::Leading),
        PgStatus::Running(_) => Decision::new(
            Action::Promote {
                sync: promotion_sync_plan(s, view),
            },
            Reason::PromotingWithLease,
        ),
        // In synchronous mode a crashed primary holds commits it wrote but
        // never acknowledged; restarting it in place would serve them. A
        // synchronous standby takes over instead, and this one is rewound.
        // Paused: the operator is in charge of a stopped server.
        PgStatus::Starting | PgStatus::Stopped if view.config.paused => {
            Decision::wait(Reason::Paused)
        }
        PgStatus::Stopped if sync_protected(view) && s.local.on_disk != Some(OnDisk::Standby) => {
            Decision::new(Action::ReleaseLease, Reason::PrimaryCrashedInSyncMode)
        }
        PgStatus::Starting => {
            if down_too_long(s) {
                Decision::new(Action::StopAndRelease, Reason::PrimaryDownTooLong)
            } else {
                Decision::wait(Reason::PostgresStarting)
            }
        }
        PgStatus::Stopped => match s.local.data {
            DataDirState::Initialized if view.config.paused => Decision::wait(Reason::Paused),
            // A standby's data must be promoted, never started writable in
            // place: that would keep the old timeline and hide divergence.
            DataDirState::Initialized
                if s.local.on_disk == Some(OnDisk::FormerPrimary) && !down_too_long(s) =>
            {
                let sync = match &view.sync {
                    _ if view.config.synchronous_mode == SyncMode::Off => SyncSetting::empty(),
                    Some(r) if r.leader == s.me && !r.members.is_empty() => SyncSetting {
                        names: r.members.clone(),
                        k: r.quorum.max(1),
                        quorum: view.config.synchronous_quorum,
                    },
                    _ if view.config.synchronous_mode == SyncMode::Strict => SyncSetting {
                        names: vec![MemberName::new(sync::NOBODY)],
                        k: 1,
                        quorum: false,
                    },
                    _ => SyncSetting::empty(),
                };
                Decision::new(Action::StartPrimary { sync }, Reason::RestartingPrimary)
            }
            DataDirState::Initialized if !down_too_long(s) => Decision::new(
                Action::StartReplica { leader: None },
                Reason::StartingBeforePromotion,
            ),
            DataDirState::Initialized => {
                Decision::new(Action::ReleaseLease, Reason::PrimaryDownTooLong)
            }
            _ => Decision::new(Action::ReleaseLease, Reason::DataDirectoryLost),
        },
    }
}

/// A key holder that cannot become writable hands the key on (see
/// `ha::promotion`). Its server is first brought up read-only, so that its
/// position is known when it records who else holds every commit; one that
/// does not come back within `primary_start_timeout` resigns anyway.
/// Paused: the operator is in charge.
fn resign_if_promotion_keeps_failing(s: &Snapshot, view: &ClusterView) -> Option<Decision> {
    if view.config.paused || !promotion::keeps_failing(&s.local, s.now_ms, &s.ha) {
        return None;
    }
    let mine = match &s.local.pg {
        PgStatus::Running(r) if r.role == PgRole::Primary => return None,
        PgStatus::Running(r) => r
            .wal_position()
            .map(|position| (r.timeline.unwrap_or_default(), position)),
        _ if !down_too_long(s) => return None,
        _ => None,
    };
    let failures = s.local.failed_promotions;
    let reason = Reason::PromotionKeepsFailing { failures };
    if view.config.synchronous_mode != SyncMode::Off {
        let record = promotion::resignation_record(&s.me, view, mine);
        if view.sync.as_ref() != Some(&record) {
            return Some(Decision::new(Action::WriteSyncRecord(record), reason));
        }
    }
    Some(Decision::new(
        Action::Resign {
            failed_promotions: failures,
        },
        reason,
    ))
}

fn down_too_long(s: &Snapshot) -> bool {
    s.local.down_since_ms.is_some_and(|since| {
        s.now_ms.saturating_sub(since) >= s.ha.primary_start_timeout.as_millis() as u64
    })
}

/// How long after a proxy's own `drain_timeout` the leader still waits for
/// its acknowledgement: the proxy cancels what still runs, then writes its
/// record, and the leader reads it on its next loop.
pub(crate) const PROXY_ACK_MARGIN_MS: u64 = 2_000;
/// The `drain_timeout` assumed for a proxy that does not publish one.
const DEFAULT_PROXY_DRAIN_MS: u64 = 5_000;

/// A planned switchover ends the old leader's sessions when PostgreSQL
/// stops. Every live proxy with a read-write listener first stops starting
/// transactions there and lets running ones finish (docs/proxy.md); the
/// leader shuts down once each has acknowledged for this very request (the
/// `failover` key's revision), or once the longest proxy `drain_timeout`
/// plus [`PROXY_ACK_MARGIN_MS`] has passed since the switchover became due
/// (a proxy that cannot write its record must not block the handover).
/// `Some(names)` while waiting is still worthwhile.
fn proxies_still_draining(
    s: &Snapshot,
    view: &ClusterView,
    request: &crate::dcs::FailoverRequest,
) -> Option<Vec<String>> {
    let rw_proxies: Vec<&crate::dcs::ProxyRecord> =
        view.proxies.values().filter(|p| p.rw.is_some()).collect();
    let pending: Vec<String> = rw_proxies
        .iter()
        .filter(|p| p.drained_for != Some(view.failover_revision.0))
        .map(|p| p.name.clone())
        .collect();
    if pending.is_empty() {
        return None;
    }
    let due_since = request
        .requested_at_unix_ms
        .max(request.not_before_unix_ms.unwrap_or(0));
    let longest = rw_proxies
        .iter()
        .map(|p| p.drain_timeout_ms.unwrap_or(DEFAULT_PROXY_DRAIN_MS))
        .max()
        .unwrap_or(DEFAULT_PROXY_DRAIN_MS);
    (s.now_unix_ms < due_since + longest + PROXY_ACK_MARGIN_MS).then_some(pending)
}

/// Whether a synchronous set currently promises that some standby holds
/// every acknowledged commit.
fn sync_protected(view: &ClusterView) -> bool {
    view.config.synchronous_mode != SyncMode::Off
        && view
            .sync
            .as_ref()
            .is_some_and(|r| !r.degraded && !r.members.is_empty())
}

/// In synchronous mode, what the new leader records and configures before
/// it promotes, so that its very first commit already waits for a standby.
///
/// Nobody streams from it yet, so it names every member that may soon: the
/// known replicas and the known members whose records an etcd outage just
/// expired (they are about to publish again), most advanced first, but not
/// the leader it replaces. With `FIRST k` all of them are listed, not only
/// the first `k`: whichever connects first acknowledges, and a replica that
/// is slow to re-point (or gone) does not hold every commit back. The
/// record names the new leader as well (see below); the leader narrows
/// both once standbys stream and have caught up.
fn promotion_sync_plan(s: &Snapshot, view: &ClusterView) -> Option<(SyncRecord, SyncSetting)> {
    let cfg = &view.config;
    if cfg.synchronous_mode == SyncMode::Off {
        return None;
    }
    let ttl_ms = s.ha.ttl.as_millis() as u64;
    let mut others: Vec<(Option<crate::model::Lsn>, &MemberName)> = s
        .members
        .iter()
        .filter(|(name, known)| {
            **name != s.me && !known.nosync && Some(*name) != s.last_leader.as_ref()
        })
        .filter_map(|(name, known)| match view.members.get(name) {
            Some(record) => (record.role == PgRole::Replica && !record.nosync)
                .then(|| (record.wal_position(), name)),
            None => known
                .expected_back(s.now_ms, ttl_ms)
                .then_some((None, name)),
        })
        .collect();
    others.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    let names: Vec<MemberName> = others.into_iter().map(|(_, n)| n.clone()).collect();
    let k = cfg.synchronous_node_count.max(1);
    let record = |members: Vec<MemberName>, quorum: u32, degraded: bool| SyncRecord {
        leader: s.me.clone(),
        members,
        quorum,
        degraded,
    };
    Some(if !names.is_empty() {
        let k = k.min(names.len() as u32);
        let setting = SyncSetting {
            names: names.clone(),
            k,
            quorum: cfg.synchronous_quorum,
        };
        // The named standbys do not hold the commits acknowledged under the
        // previous leader yet (they may have been asynchronous then, and
        // catch up only by streaming from this one); only this member
        // surely does. So the record names it too, with k = 1: were it to
        // die before they caught up, no member could prove it holds every
        // commit and nobody would promote by itself. The leader narrows the
        // record to the standbys once they are synchronous past the point
        // its setting took effect ([`sync::next_step`], step 3).
        let mut members = vec![s.me.clone()];
        members.extend(names);
        (record(members, 1, false), setting)
    } else if cfg.synchronous_mode == SyncMode::Strict {
        (
            record(Vec::new(), 0, false),
            SyncSetting {
                names: vec![MemberName::new(sync::NOBODY)],
                k: 1,
                quorum: false,
            },
        )
    } else {
        (record(Vec::new(), 0, true), SyncSetting::empty())
    })
}

/// The steady state of a healthy leader: keep the synchronous set right
/// (when enabled), then one slot per other member.
fn leading(s: &Snapshot, view: &ClusterView, reason: Reason) -> Decision {
    let PgStatus::Running(r) = &s.local.pg else {
        return Decision::wait(reason);
    };
    let current = SyncSetting::parse(&r.synchronous_standby_names).unwrap_or_else(|| SyncSetting {
        // Set by hand: unknown to pgha, replaced on the next step.
        names: vec![MemberName::new("?")],
        k: 0,
        quorum: false,
    });
    let owned_record = view.sync.as_ref().filter(|rec| rec.leader == s.me);
    if view.config.synchronous_mode != SyncMode::Off
        || !current.names.is_empty()
        || owned_record.is_some_and(|rec| !rec.members.is_empty() || rec.degraded)
    {
        let known = sync::Known {
            members: &s.members,
            now_ms: s.now_ms,
            ttl_ms: s.ha.ttl.as_millis() as u64,
        };
        let desired = sync::desired(&view.config, view, known, &s.me, &r.standbys, &current);
        if let Some(step) = sync::next_step(
            &s.me,
            &desired,
            view.sync.as_ref(),
            &current,
            &r.standbys,
            s.sync_switched_at,
        ) {
            let action = match step {
                SyncStep::WriteRecord(rec) => Action::WriteSyncRecord(rec),
                SyncStep::SetSetting(setting) => Action::SetSyncSetting(setting),
            };
            return Decision::new(action, Reason::ManagingSynchronousStandbys);
        }
    }
    if let Some((create_slots, drop_slots)) = slot_changes(s, view, r) {
        return Decision::new(
            Action::Lead {
                create_slots,
                drop_slots,
            },
            reason,
        );
    }
    // After the slots: replicas must be able to stream first; the record
    // only matters once etcd fails.
    if view.config.failsafe_mode {
        let wanted = super::failsafe::desired_record(&s.me, &s.members);
        if view.failsafe.as_ref() != Some(&wanted) {
            return Decision::new(
                Action::WriteFailsafeRecord(wanted),
                Reason::PublishingFailsafeMembers,
            );
        }
    }
    Decision::wait(reason)
}

/// One slot per other member (the known ones: a record expired by an etcd
/// outage does not cost its member its slot), and no slot of pgha's for
/// anyone else. `None` when the slots are right.
fn slot_changes(
    s: &Snapshot,
    view: &ClusterView,
    r: &crate::postgres::observe::Running,
) -> Option<(Vec<String>, Vec<String>)> {
    let wanted: Vec<String> = s
        .members
        .keys()
        .chain(view.members.keys())
        .filter(|m| **m != s.me)
        .map(MemberName::slot_name)
        .collect();
    let create: Vec<String> = wanted
        .iter()
        .filter(|w| !r.slots.iter().any(|have| have.name == **w))
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let drop: Vec<String> = r
        .slots
        .iter()
        .map(|have| &have.name)
        .filter(|have| have.starts_with(crate::model::SLOT_PREFIX) && !wanted.contains(have))
        .cloned()
        .collect();
    (!create.is_empty() || !drop.is_empty()).then_some((create, drop))
}

fn as_follower(s: &Snapshot, view: &ClusterView, leader: &MemberName) -> Decision {
    if view.config.paused && is_primary(s) {
        // Maintenance mode is hands-off: an operator promoted this server
        // by hand, or is in the middle of doing so. Say loudly that two
        // primaries exist; resolving it is the operator's call until
        // `pgha resume`, after which the key holder stays and this one is
        // demoted.
        return Decision::wait(Reason::PausedBesideAnotherPrimary {
            leader: leader.clone(),
        });
    }
    if is_primary(s) {
        // Two writable primaries must never coexist; this one has no key.
        return Decision::new(
            Action::Demote {
                reason: DemoteReason::OtherLeader {},
            },
            Reason::OtherLeaderHoldsKey {
                leader: leader.clone(),
            },
        );
    }
    if s.lease.held {
        // A lease this agent still thinks it holds, while the key names
        // someone else: drop it so the keeper stops renewing.
        return Decision::new(
            Action::ReleaseLease,
            Reason::OtherLeaderHoldsKey {
                leader: leader.clone(),
            },
        );
    }
    if view.config.paused {
        return Decision::wait(Reason::Paused);
    }
    let leader_running = view
        .members
        .get(leader)
        .is_some_and(|m| m.role == PgRole::Primary && m.state == PgState::Running);
    match &s.local.pg {
        PgStatus::Running(r) => {
            // The leader's member record can expire a moment before its key
            // (node loss): there is nowhere to point replication at yet.
            if s.local.upstream.as_ref() != Some(leader) && !view.members.contains_key(leader) {
                return Decision::wait(Reason::LeaderRecordMissing {
                    leader: leader.clone(),
                });
            }
            if s.local.upstream.as_ref() != Some(leader) {
                return Decision::new(
                    Action::Follow {
                        leader: leader.clone(),
                    },
                    Reason::RepointingToLeader {
                        leader: leader.clone(),
                    },
                );
            }
            // A former primary started read-only (to take part in a race)
            // is rewound before it follows: its history may have diverged.
            if s.local.former_primary && !r.streaming && leader_running {
                return Decision::new(
                    Action::Rewind {
                        leader: leader.clone(),
                    },
                    Reason::RewindingFormerPrimary,
                );
            }
            // Evidence rather than elapsed time: a replica that received
            // the old leader's WAL past the point the new timeline branched
            // off can never stream from the leader, and its WAL receiver may
            // reconnect and give up over and over, so that it looks
            // streaming half of the time and the stall timer never fires.
            if leader_running
                && let Some((timeline, switch_lsn)) = history_diverged(view, leader, r)
            {
                return rewind_or_reclone(
                    s,
                    leader,
                    Reason::DivergedFromLeader {
                        leader: leader.clone(),
                        timeline,
                        switch_lsn,
                    },
                );
            }
            let stalled = !r.streaming
                && leader_running
                && s.local.not_streaming_since_ms.is_some_and(|t| {
                    s.now_ms.saturating_sub(t) >= s.ha.stream_stall_timeout.as_millis() as u64
                });
            if stalled {
                // Elapsed time alone is no proof of divergence: rewinding a
                // replica whose history the leader shares changes nothing
                // and costs a restart.
                if history_shared(view, leader, r) {
                    return Decision::wait(Reason::NotStreamingSameHistory {
                        leader: leader.clone(),
                    });
                }
                return rewind_or_reclone(s, leader, Reason::StreamingStalled);
            }
            // A replica keeps (unreserved) slots for the other members, so
            // that the moment it is promoted they can stream from it with
            // their slots: creating them after promotion made every replica
            // that re-pointed at once retry its connection. Slots reserved
            // while this member led are reset, or they pin its WAL forever.
            if r.streaming {
                let (create_slots, drop_slots) = slot_changes(s, view, r).unwrap_or_default();
                let reset_slots = super::slots::to_reset(&r.slots, &drop_slots);
                if !(create_slots.is_empty() && drop_slots.is_empty() && reset_slots.is_empty()) {
                    return Decision::new(
                        Action::PrepareSlots {
                            create_slots,
                            drop_slots,
                            reset_slots,
                        },
                        Reason::Following {
                            leader: leader.clone(),
                        },
                    );
                }
            }
            Decision::wait(Reason::Following {
                leader: leader.clone(),
            })
        }
        PgStatus::Starting => Decision::wait(Reason::PostgresStarting),
        PgStatus::Stopped => match s.local.data {
            DataDirState::Empty if leader_running => Decision::new(
                Action::Clone {
                    leader: leader.clone(),
                },
                Reason::CloningLeader,
            ),
            DataDirState::Empty => Decision::wait(Reason::NoLeaderToCloneFrom),
            // A replica whose server dies at every start has data it cannot
            // recover from (e.g. a minimum recovery point on a timeline the
            // leader does not have): rewind it, then re-clone.
            _ if s.local.failed_starts >= FAILED_STARTS_BEFORE_REPAIR && leader_running => {
                rewind_or_reclone(s, leader, Reason::StartKeepsFailing)
            }
            // Re-cloning wipes the data directory: only with a leader to
            // clone from.
            _ if s.local.rewind_failed && leader_running => {
                rewind_or_reclone(s, leader, Reason::RecloningAfterRewindFailure)
            }
            _ if s.local.rewind_failed => Decision::wait(Reason::RepairWaitsForRunningLeader {
                leader: leader.clone(),
            }),
            _ if (s.local.on_disk == Some(OnDisk::FormerPrimary) || s.local.former_primary)
                && leader_running =>
            {
                Decision::new(
                    Action::Rewind {
                        leader: leader.clone(),
                    },
                    Reason::RewindingFormerPrimary,
                )
            }
            // A former primary must not start following before pg_rewind
            // can run against a live leader.
            _ if s.local.on_disk == Some(OnDisk::FormerPrimary) || s.local.former_primary => {
                Decision::wait(Reason::FormerPrimaryWaitsForRunningLeader {
                    leader: leader.clone(),
                })
            }
            _ => Decision::new(
                Action::StartReplica {
                    leader: Some(leader.clone()),
                },
                Reason::StartingAsReplica,
            ),
        },
    }
}

/// Whether this replica's WAL is provably part of the leader's history:
/// on the leader's timeline, or on an earlier one and not past the point
/// where the leader's history branched off it (from the DCS's timeline
/// history). Anything unknown counts as "not proven".
fn history_shared(
    view: &ClusterView,
    leader: &MemberName,
    r: &crate::postgres::observe::Running,
) -> bool {
    let (Some(mine), Some(position)) = (r.timeline, r.wal_position()) else {
        return false;
    };
    let Some(theirs) = view.members.get(leader).and_then(|m| m.timeline) else {
        return false;
    };
    if mine == theirs {
        return true;
    }
    mine < theirs
        && view
            .history
            .iter()
            .find(|h| h.old_timeline == mine)
            .is_some_and(|h| position <= h.switch_lsn)
}

/// The branch point this replica has passed, when its WAL receiver reports
/// receiving an older timeline than the leader's at a position beyond the
/// point where the leader's history left that timeline (the recorded
/// timeline history). Only while a receiver runs: without one, the
/// reported timeline can be the last restartpoint's, older than the WAL
/// the replica has already received from the leader.
fn history_diverged(
    view: &ClusterView,
    leader: &MemberName,
    r: &crate::postgres::observe::Running,
) -> Option<(crate::model::Timeline, crate::model::Lsn)> {
    r.sender.as_ref()?;
    let (mine, position) = (r.timeline?, r.wal_position()?);
    let theirs = view.members.get(leader)?.timeline?;
    if mine >= theirs {
        return None;
    }
    let branch = view.history.iter().find(|h| h.old_timeline == mine)?;
    (position > branch.switch_lsn).then_some((mine, branch.switch_lsn))
}

fn rewind_or_reclone(s: &Snapshot, leader: &MemberName, reason: Reason) -> Decision {
    if !s.local.rewind_failed {
        return Decision::new(
            Action::Rewind {
                leader: leader.clone(),
            },
            reason,
        );
    }
    if s.ha.reclone_on_rewind_failure {
        Decision::new(
            Action::Reclone {
                leader: leader.clone(),
            },
            Reason::RecloningAfterRewindFailure,
        )
    } else {
        Decision::wait(Reason::RewindFailedNoReclone)
    }
}

fn without_leader(s: &Snapshot, view: &ClusterView) -> Decision {
    let may_take_key = super::failsafe::may_take_key(s.failsafe_promise.as_ref(), s.now_ms).is_ok()
        && !super::failsafe::barred_from_race(
            view.config.failsafe_mode,
            view.failsafe.as_ref(),
            &s.me,
        );
    if is_primary(s) && lease_valid(s) && s.lease.confirmed_by_members && may_take_key {
        // The key expired in etcd while every member promised this leader
        // not to take it (failsafe mode): nobody else can have taken it,
        // and nobody may before the promises end. Take it back rather than
        // demote a primary nothing is wrong with.
        return Decision::new(Action::AcquireLease, Reason::RetakingLeaderKeyAfterFailsafe);
    }
    if is_primary(s) {
        // Writable with no leader key at all: the lease ran out (the fence
        // keeper should already have stopped it) or was deleted by hand.
        return Decision::new(
            Action::Demote {
                reason: DemoteReason::NoLeaderKey,
            },
            Reason::WritableWithoutLease,
        );
    }
    if s.lease.held {
        return Decision::new(Action::ReleaseLease, Reason::LeaseRunningOut);
    }
    let running = match &s.local.pg {
        PgStatus::Running(r) => r,
        PgStatus::Starting => return Decision::wait(Reason::PostgresStarting),
        PgStatus::Stopped => {
            return match s.local.data {
                DataDirState::Initialized if !view.config.paused => Decision::new(
                    Action::StartReplica { leader: None },
                    Reason::StartingReadOnly,
                ),
                DataDirState::Initialized => Decision::wait(Reason::Paused),
                _ => Decision::wait(Reason::NoLeaderToCloneFrom),
            };
        }
    };
    // A promise to a failsafe leader binds every way of taking the key,
    // an operator's request included: that leader may still be writable.
    if let Err(p) = super::failsafe::may_take_key(s.failsafe_promise.as_ref(), s.now_ms) {
        return Decision::wait(Reason::PromisedFailsafeLeader { leader: p.leader });
    }
    if super::failsafe::barred_from_race(view.config.failsafe_mode, view.failsafe.as_ref(), &s.me) {
        return Decision::wait(Reason::NotInFailsafeMembers);
    }
    // An operator-requested target races alone, even when paused, as long
    // as the request is fresh: a target that died must not block failover.
    if let Some(f) = &view.failover
        && let Some(target) = &f.to
        && s.now_unix_ms.saturating_sub(
            f.requested_at_unix_ms
                .max(f.not_before_unix_ms.unwrap_or(0)),
        ) < FAILOVER_REQUEST_TTL_MS
    {
        if target != &s.me {
            return Decision::wait(Reason::WaitingForSwitchoverTarget {
                target: target.clone(),
            });
        }
        if f.accept_data_loss {
            return Decision::new(Action::AcquireLease, Reason::ManualFailoverTarget);
        }
        // After a switchover the old leader publishes its final position;
        // promoting before replaying up to it would lose commits. Reaching
        // it proves this member has everything, synchronous set or not.
        // Only a clean stop publishes a final position; a crashed leader's
        // record shows where it was one loop before, which proves nothing.
        if let Some(old) = f.from.as_ref().and_then(|o| view.members.get(o))
            && old.state == PgState::Stopped
            && let Some(final_lsn) = old.flushed_lsn
        {
            return if running.wal_position().is_none_or(|mine| mine < final_lsn) {
                Decision::wait(Reason::CatchingUpBeforePromotion)
            } else {
                Decision::new(Action::AcquireLease, Reason::ManualFailoverTarget)
            };
        }
        return match sync_candidacy(s, view, running) {
            Some(Err(d)) => Decision::wait(Reason::NotHealthiest(d)),
            _ => Decision::new(Action::AcquireLease, Reason::ManualFailoverTarget),
        };
    }
    if view.config.paused {
        return Decision::wait(Reason::Paused);
    }
    if promotion::barred(s.local.resigned_at_ms, s.now_ms, &s.ha) {
        return Decision::wait(Reason::NotHealthiest(
            super::Disqualified::PromotionKeptFailing,
        ));
    }
    let verdict = match sync_candidacy(s, view, running) {
        Some(v) => v,
        None => may_race(s, running.timeline, running.wal_position()),
    };
    match verdict {
        Ok(()) => Decision::new(Action::AcquireLease, Reason::RacingAsHealthiest),
        Err(d) => Decision::wait(Reason::NotHealthiest(d)),
    }
}

/// Synchronous mode's rule for who may race: only a member of the recorded
/// set, having seen enough of the set to know it is the most advanced.
/// `None` when synchronous replication is off.
fn sync_candidacy(
    s: &Snapshot,
    view: &ClusterView,
    running: &crate::postgres::observe::Running,
) -> Option<Result<(), super::Disqualified>> {
    if view.config.synchronous_mode == SyncMode::Off {
        return None;
    }
    if s.ha.nofailover || s.ha.priority == 0 {
        return Some(Err(super::Disqualified::NoFailover));
    }
    let Some(position) = running.wal_position() else {
        return Some(Err(super::Disqualified::UnknownPosition));
    };
    let answered: Vec<sync::Answer> = s
        .peers
        .iter()
        .filter_map(|p| {
            let r = p.report.as_ref().filter(|r| r.running)?;
            Some(sync::Answer {
                name: p.name.clone(),
                position: (r.timeline.unwrap_or_default(), r.wal_position?),
                candidate: !r.nofailover && r.priority > 0,
            })
        })
        .collect();
    Some(sync::promotable(
        view.sync.as_ref(),
        &s.me,
        &answered,
        (running.timeline.unwrap_or_default(), position),
    ))
}
