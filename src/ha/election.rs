//! Who should lead when nobody does.
//!
//! The most advanced member wins — (timeline, WAL position) — because
//! promoting anyone else throws away commits the others have. Ties go to
//! the higher `priority`, then to the lower name, so that every member
//! computes the same winner from the same data. The etcd transaction on
//! the leader key is what makes the race safe; this ranking only keeps
//! the wrong members from entering it.

use std::fmt;

use super::snapshot::{PeerReport, Snapshot};
use crate::model::{Lsn, MemberName, Timeline};

/// Why a member stays out of the race.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Disqualified {
    /// Too far behind the last known leader position.
    Lagging { bytes: u64 },
    /// A peer is on a later timeline.
    BehindTimeline { peer: MemberName },
    /// A healthy peer has more WAL.
    PeerAhead { peer: MemberName },
    /// `nofailover = true` or `priority = 0`.
    NoFailover,
    /// A peer at the same position has a higher priority (or equal priority
    /// and a lower name).
    LowerPriority { peer: MemberName },
    /// This member does not know its own WAL position.
    UnknownPosition,
    /// Synchronous mode: not in the recorded synchronous set.
    NotSynchronous,
    /// Synchronous mode `on` degraded to asynchronous (or the set is
    /// empty): nobody is known to hold every acknowledged commit.
    NoSynchronousStandby,
    /// Without synchronous replication: too few of the known members
    /// answered to be sure nobody unseen has more WAL (a replica that hears
    /// from nobody must not conclude it is the most advanced).
    TooFewAnswered { seen: u32, needed: u32 },
    /// This member gave the leader key up because its promotions kept
    /// failing, and is out of the race until its cooldown ends.
    PromotionKeptFailing,
    /// Quorum commit: too few members of the synchronous set answered to
    /// be sure which one holds every acknowledged commit.
    CannotProveCommits { seen: u32, needed: u32 },
}

impl fmt::Display for Disqualified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Disqualified::Lagging { bytes } => {
                write!(
                    f,
                    "{bytes} bytes behind the last known leader position (maximum_lag_on_failover)"
                )
            }
            Disqualified::BehindTimeline { peer } => write!(f, "{peer} is on a later timeline"),
            Disqualified::PeerAhead { peer } => write!(f, "{peer} has more WAL"),
            Disqualified::NoFailover => write!(f, "nofailover is set (or priority is 0)"),
            Disqualified::LowerPriority { peer } => {
                write!(f, "{peer} is as advanced and preferred")
            }
            Disqualified::UnknownPosition => write!(f, "own WAL position unknown"),
            Disqualified::NotSynchronous => {
                write!(f, "not in the synchronous set recorded in the DCS")
            }
            Disqualified::NoSynchronousStandby => {
                write!(
                    f,
                    "no synchronous standby was recorded (degraded to asynchronous); only `pgha failover --accept-data-loss` can promote"
                )
            }
            Disqualified::PromotionKeptFailing => write!(
                f,
                "gave the leader key up because promoting this member kept failing (ha.primary_start_timeout)"
            ),
            Disqualified::TooFewAnswered { seen, needed } => write!(
                f,
                "heard from {seen} of the {needed} members needed (a majority of the known members other than the lost leader) to be sure none has more WAL"
            ),
            Disqualified::CannotProveCommits { seen, needed } => write!(
                f,
                "only {seen} of the {needed} synchronous members needed to prove who holds every acknowledged commit answered; use `pgha failover --to NODE --accept-data-loss` to promote anyway"
            ),
        }
    }
}

/// A member in the race, as ranked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub name: MemberName,
    pub timeline: Timeline,
    pub position: Lsn,
    pub priority: u32,
}

impl Candidate {
    /// Ordering key: better candidates sort first.
    fn key(&self) -> (std::cmp::Reverse<(Timeline, Lsn, u32)>, &MemberName) {
        (
            std::cmp::Reverse((self.timeline, self.position, self.priority)),
            &self.name,
        )
    }
}

/// Candidates, best first.
pub fn rank_candidates(mut candidates: Vec<Candidate>) -> Vec<Candidate> {
    candidates.sort_by(|a, b| a.key().cmp(&b.key()));
    candidates
}

/// Whether this member should race for the leader key, given fresh peer
/// reports. A majority of the known members other than the lost leader
/// must have answered (this member included): an unreachable minority may
/// be failed nodes, and waiting for them would block failover, but a
/// replica that hears from nobody cannot know it is the most advanced.
pub(super) fn may_race(
    s: &Snapshot,
    my_timeline: Option<Timeline>,
    my_position: Option<Lsn>,
) -> Result<(), Disqualified> {
    if s.ha.nofailover || s.ha.priority == 0 {
        return Err(Disqualified::NoFailover);
    }
    let Some(position) = my_position else {
        return Err(Disqualified::UnknownPosition);
    };
    let timeline = my_timeline.unwrap_or_default();
    if let Some(leader_lsn) = s.last_leader_lsn {
        let lag = position.lag_behind(leader_lsn);
        if lag > s.ha.maximum_lag_on_failover {
            return Err(Disqualified::Lagging { bytes: lag });
        }
    }
    let voters: Vec<&MemberName> = s
        .members
        .keys()
        .chain(std::iter::once(&s.me))
        .filter(|n| Some(*n) != s.last_leader.as_ref())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let needed = super::membership::race_quorum(voters.len());
    let seen = 1 + s
        .peers
        .iter()
        .filter(|p| p.report.is_some() && p.name != s.me && voters.contains(&&p.name))
        .count();
    if seen < needed {
        return Err(Disqualified::TooFewAnswered {
            seen: seen as u32,
            needed: needed as u32,
        });
    }
    let me = Candidate {
        name: s.me.clone(),
        timeline,
        position,
        priority: s.ha.priority,
    };
    let mut all = vec![me.clone()];
    for peer in &s.peers {
        let Some(PeerReport {
            running: true,
            wal_position: Some(pos),
            timeline,
            priority,
            nofailover,
            ..
        }) = &peer.report
        else {
            continue;
        };
        if *nofailover || *priority == 0 {
            continue;
        }
        all.push(Candidate {
            name: peer.name.clone(),
            timeline: timeline.unwrap_or_default(),
            position: *pos,
            priority: *priority,
        });
    }
    let best = rank_candidates(all)
        .into_iter()
        .next()
        .expect("contains me");
    if best.name == me.name {
        return Ok(());
    }
    Err(if best.timeline > me.timeline {
        Disqualified::BehindTimeline { peer: best.name }
    } else if best.position > me.position {
        Disqualified::PeerAhead { peer: best.name }
    } else {
        Disqualified::LowerPriority { peer: best.name }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, tl: u32, pos: u64, prio: u32) -> Candidate {
        Candidate {
            name: name.into(),
            timeline: Timeline(tl),
            position: Lsn(pos),
            priority: prio,
        }
    }

    #[test]
    fn ranking_table() {
        // (candidates, expected winner)
        let cases = [
            (vec![c("a", 1, 100, 100), c("b", 1, 200, 100)], "b"),
            (vec![c("a", 2, 100, 100), c("b", 1, 200, 100)], "a"),
            (vec![c("a", 1, 100, 100), c("b", 1, 100, 200)], "b"),
            (vec![c("b", 1, 100, 100), c("a", 1, 100, 100)], "a"),
            (vec![c("c", 1, 5, 1), c("a", 1, 4, 9), c("b", 1, 5, 1)], "b"),
        ];
        for (cands, winner) in cases {
            assert_eq!(
                rank_candidates(cands.clone())[0].name.as_str(),
                winner,
                "{cands:?}"
            );
        }
    }
}
