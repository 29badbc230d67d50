//! Where a transaction goes: pure functions of the cluster view (and, for
//! the read-only side, the current load per member). No I/O and no clock
//! reads: the caller passes `now`.
//!
//! The read-write rule is strict on purpose: the member must hold the
//! leader key *and* report itself a running primary on the newest timeline
//! the history knows. A former primary that still accepts writes, or a new
//! leader that has the key but has not finished promoting, gets nothing.

use crate::dcs::{ClusterView, Revision};
use crate::model::{MemberName, PgRole, PgState};

/// A server the proxy may connect to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub member: MemberName,
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}:{})", self.member, self.host, self.port)
    }
}

/// Why the read-write side has no target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoPrimary {
    /// Nobody holds the leader key (failover in progress, or etcd
    /// unreachable from this proxy).
    NoLeader,
    /// The key holder has no member record.
    NoRecord { leader: MemberName },
    /// The key holder is not (yet, or no longer) a running primary.
    NotRunningPrimary {
        leader: MemberName,
        role: PgRole,
        state: PgState,
    },
    /// The key holder reports an older timeline than the history's newest.
    BehindTimeline { leader: MemberName },
}

impl std::fmt::Display for NoPrimary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoPrimary::NoLeader => write!(f, "no member holds the leader key"),
            NoPrimary::NoRecord { leader } => write!(f, "leader {leader} has no member record"),
            NoPrimary::NotRunningPrimary {
                leader,
                role,
                state,
            } => write!(
                f,
                "leader {leader} is not a running primary (role {role:?}, state {state})"
            ),
            NoPrimary::BehindTimeline { leader } => {
                write!(f, "leader {leader} is not on the newest timeline")
            }
        }
    }
}

/// The read-write decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rw {
    Serve(Target),
    /// New transactions wait (up to `hold_timeout`).
    Hold(NoPrimary),
    /// A switchover away from this leader is pending: new transactions
    /// wait, running ones finish (up to `drain_timeout`). `revision` is
    /// the failover key's, acknowledged in the proxy's record.
    Drain {
        from: Target,
        revision: Revision,
    },
}

/// Everything routing needs, derived once per cluster view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routes {
    pub rw: Rw,
    /// Streaming replicas within `max_lag`, by name.
    pub replicas: Vec<Target>,
    /// The running primary, for the read-only fallback (set whenever `rw`
    /// is `Serve` or `Drain`).
    pub leader: Option<Target>,
}

impl Routes {
    /// Routes for a proxy that cannot trust its view (etcd unreachable):
    /// hold everything on the read-write side.
    pub fn unknown() -> Routes {
        Routes {
            rw: Rw::Hold(NoPrimary::NoLeader),
            replicas: Vec::new(),
            leader: None,
        }
    }

    pub fn rw_target(&self) -> Option<&Target> {
        match &self.rw {
            Rw::Serve(t) => Some(t),
            _ => None,
        }
    }

    /// Whether a server on `member` may keep serving the read-write side
    /// (a draining leader still finishes its running transactions).
    pub fn rw_member_alive(&self, member: &MemberName) -> bool {
        match &self.rw {
            Rw::Serve(t) | Rw::Drain { from: t, .. } => &t.member == member,
            Rw::Hold(_) => false,
        }
    }

    /// Whether a server on `member` may serve the read-only side.
    pub fn ro_member_allowed(&self, member: &MemberName, fallback: bool) -> bool {
        self.replicas.iter().any(|t| &t.member == member)
            || (fallback
                && self.replicas.is_empty()
                && self.leader.as_ref().is_some_and(|l| &l.member == member))
    }
}

fn target(view: &ClusterView, name: &MemberName) -> Option<Target> {
    view.members.get(name).map(|m| Target {
        member: name.clone(),
        host: m.host.clone(),
        port: m.port,
    })
}

/// Derives the routes from a view. `now_unix_ms` decides whether a
/// scheduled switchover is due.
pub fn routes(view: &ClusterView, max_lag: u64, now_unix_ms: u64) -> Routes {
    let primary = running_primary(view);
    let leader = primary.as_ref().ok().cloned();
    let rw = match primary {
        Err(why) => Rw::Hold(why),
        Ok(t) => match &view.failover {
            Some(req)
                if req.from.as_ref() == Some(&t.member)
                    && req.not_before_unix_ms.is_none_or(|at| at <= now_unix_ms) =>
            {
                Rw::Drain {
                    from: t,
                    revision: view.failover_revision,
                }
            }
            _ => Rw::Serve(t),
        },
    };
    let leader_name = view.leader.as_ref().map(|l| &l.name);
    // A replica on another timeline than the leader's follows a history
    // that is not the leader's: it gets no reads.
    let leader_timeline = view.leader_record().and_then(|l| l.timeline);
    let replicas = view
        .members
        .values()
        .filter(|m| Some(&m.name) != leader_name)
        .filter(|m| m.role == PgRole::Replica && m.state == PgState::Streaming)
        .filter(|m| m.upstream.is_some())
        .filter(|m| leader_timeline.is_none() || m.timeline == leader_timeline)
        .filter(|m| view.lag_of(m).is_some_and(|lag| lag <= max_lag))
        .filter_map(|m| target(view, &m.name))
        .collect();
    Routes {
        rw,
        replicas,
        leader,
    }
}

fn running_primary(view: &ClusterView) -> Result<Target, NoPrimary> {
    let key = view.leader.as_ref().ok_or(NoPrimary::NoLeader)?;
    let leader = key.name.clone();
    let rec = view
        .members
        .get(&key.name)
        .ok_or_else(|| NoPrimary::NoRecord {
            leader: leader.clone(),
        })?;
    if rec.role != PgRole::Primary || rec.state != PgState::Running {
        return Err(NoPrimary::NotRunningPrimary {
            leader,
            role: rec.role,
            state: rec.state,
        });
    }
    let newest = view.history.iter().map(|h| h.new_timeline).max();
    if let Some(newest) = newest
        && rec.timeline.is_none_or(|t| t < newest)
    {
        return Err(NoPrimary::BehindTimeline { leader });
    }
    Ok(Target {
        member: leader,
        host: rec.host.clone(),
        port: rec.port,
    })
}

/// The read-only target: the qualifying replica with the fewest
/// connections in use (ties: by name, so the choice is deterministic), or
/// the leader when none qualifies and `fallback` allows it.
pub fn pick_ro(
    routes: &Routes,
    load: impl Fn(&MemberName) -> usize,
    fallback: bool,
) -> Option<Target> {
    routes
        .replicas
        .iter()
        .min_by(|a, b| {
            load(&a.member)
                .cmp(&load(&b.member))
                .then(a.member.cmp(&b.member))
        })
        .cloned()
        .or_else(|| {
            if fallback {
                routes.leader.clone()
            } else {
                None
            }
        })
}

/// Where the auto listener sends a read-only statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AutoRead {
    Replica(Target),
    /// The leader (held for like a write while there is none), because
    /// no replica qualifies.
    Leader(LeaderFallback),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaderFallback {
    /// Some replica is in rotation, but none is known to have replayed
    /// the client's last commit.
    ReadYourWrites,
    /// No replica is in rotation (none streaming within `max_lag`, or all
    /// excluded).
    NoReplica,
}

impl LeaderFallback {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            LeaderFallback::ReadYourWrites => "read_your_writes_fallback",
            LeaderFallback::NoReplica => "no_replica",
        }
    }
}

/// The auto listener's choice for a read: among the replicas in rotation
/// that `excluded` does not rule out (failed a moment ago, or measured
/// past `max_lag` by the proxy's own polling), those whose replay position
/// has reached `need` (the client's last commit; `None`: no requirement),
/// the least loaded (ties by name). Otherwise the leader.
pub fn pick_auto_read(
    routes: &Routes,
    need: Option<u64>,
    replayed: impl Fn(&MemberName) -> Option<u64>,
    load: impl Fn(&MemberName) -> usize,
    excluded: impl Fn(&MemberName) -> bool,
) -> AutoRead {
    let mut in_rotation = routes
        .replicas
        .iter()
        .filter(|t| !excluded(&t.member))
        .peekable();
    if in_rotation.peek().is_none() {
        return AutoRead::Leader(LeaderFallback::NoReplica);
    }
    let caught_up = in_rotation
        .filter(|t| need.is_none_or(|need| replayed(&t.member).is_some_and(|r| r >= need)))
        .min_by(|a, b| {
            load(&a.member)
                .cmp(&load(&b.member))
                .then(a.member.cmp(&b.member))
        });
    match caught_up {
        Some(t) => AutoRead::Replica(t.clone()),
        None => AutoRead::Leader(LeaderFallback::ReadYourWrites),
    }
}

#[cfg(test)]
mod tests;
