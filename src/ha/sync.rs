//! Synchronous replication: which standbys the leader names in
//! `synchronous_standby_names`, and in what order the DCS record and the
//! server setting change, so that the record always covers every member
//! that may hold an acknowledged commit.
//!
//! The record `R` (members, k) promises: every acknowledged commit is on at
//! least `k` members of `R`. The server setting `S` acknowledges a commit
//! once `k_s` members of `S` flushed it. The promise holds as long as
//! `S ⊆ R` and `k_s ≥ k`, hence the order of the steps:
//!
//! 1. grow: `R := R ∪ D`, `k := min(k, k_d)` (before the setting changes);
//! 2. switch: `S := D` with `k_d`;
//! 3. shrink: `R := D`, `k := k_d` — only once every member of `D` has
//!    flushed past the position at which step 2 took effect, because
//!    commits acknowledged under the old setting may be only on members
//!    leaving `R`.
//!
//! Failover then needs to see `|R| - k + 1` members of `R` (at least one of
//! them holds every acknowledged commit) and promotes the most advanced.
//!
//! A standby that stopped replying (network cut, frozen process) stays in
//! `pg_stat_replication` as `streaming` until `wal_sender_timeout`, and a
//! commit waiting for it waits as long. Its reply age says so sooner: see
//! [`replies_stale_after_ms`].

use super::membership::Membership;
use crate::dcs::{ClusterConfig, ClusterView, SyncMode, SyncRecord};
use crate::model::{Lsn, MemberName};
use crate::postgres::observe::StandbyInfo;

/// A never-connecting standby name: with it in the setting, commits wait.
/// Used in `strict` mode when no standby can be synchronous.
pub const NOBODY: &str = "pgha_no_synchronous_standby";

/// The value of `synchronous_standby_names`, as pgha writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncSetting {
    pub names: Vec<MemberName>,
    pub k: u32,
    pub quorum: bool,
}

impl SyncSetting {
    pub fn empty() -> Self {
        SyncSetting {
            names: Vec::new(),
            k: 0,
            quorum: false,
        }
    }

    /// `FIRST k ("a", "b")` / `ANY k (...)`, or empty for asynchronous.
    pub fn render(&self) -> String {
        if self.names.is_empty() {
            return String::new();
        }
        let names: Vec<String> = self.names.iter().map(|n| format!("\"{n}\"")).collect();
        format!(
            "{} {} ({})",
            if self.quorum { "ANY" } else { "FIRST" },
            self.k,
            names.join(", ")
        )
    }

    /// Parses what [`render`](Self::render) writes; anything else (set by
    /// hand) parses as `None` and will be replaced.
    pub fn parse(text: &str) -> Option<SyncSetting> {
        let text = text.trim();
        if text.is_empty() {
            return Some(SyncSetting::empty());
        }
        let (kind, rest) = text.split_once(' ')?;
        let quorum = match kind {
            "FIRST" => false,
            "ANY" => true,
            _ => return None,
        };
        let (k, rest) = rest.trim().split_once(' ')?;
        let k: u32 = k.parse().ok()?;
        let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
        let names = inner
            .split(',')
            .map(|n| MemberName::new(n.trim().trim_matches('"')))
            .collect();
        Some(SyncSetting { names, k, quorum })
    }

    /// Members whose flush confirms commits (the placeholder excluded).
    pub fn real_names(&self) -> Vec<MemberName> {
        self.names
            .iter()
            .filter(|n| n.as_str() != NOBODY)
            .cloned()
            .collect()
    }
}

/// What the leader wants right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub setting: SyncSetting,
    /// `on` mode with no eligible standby.
    pub degraded: bool,
}

/// How long a streaming standby may go without replying before the leader
/// treats it as cut off. Standbys reply after every WAL write and at least
/// every `wal_receiver_status_interval`, which pgha sets to
/// [`STATUS_INTERVAL_MS`](crate::postgres::conf::STATUS_INTERVAL_MS): three
/// missed intervals are not scheduling jitter. The TTL is the floor because
/// it is the silence pgha already tolerates from a leader before replacing
/// it; a cut synchronous standby then stalls commits about as long as a lost
/// leader stalls them, and clock skew between the hosts (`reply_time` is
/// the standby's clock) has that much room before it matters.
pub fn replies_stale_after_ms(ttl_ms: u64) -> u64 {
    ttl_ms.max(3 * crate::postgres::conf::STATUS_INTERVAL_MS)
}

/// Standbys eligible to be synchronous: streaming from this leader (its
/// own `pg_stat_replication` lists only direct streamers), known members,
/// not `nosync`; most advanced first so `FIRST k` picks the best. Known
/// means in the membership, which outlives the records: right after an etcd
/// outage the records are gone while the standbys already stream.
///
/// Standbys whose last reply is older than `stale_after_ms` count as not
/// streaming, so that a healthy one replaces them — but only when one
/// replies in time: with none, they stay eligible, as before the reply age
/// was known. Dropping them then would change nothing for `strict` (commits
/// wait either way) and, in `on`, would turn skewed clocks or a hiccup into
/// a degradation, which the `on` rules reserve for standbys that are gone.
fn eligible(
    members: &Membership,
    me: &MemberName,
    standbys: &[StandbyInfo],
    stale_after_ms: u64,
) -> Vec<MemberName> {
    let mut ok: Vec<(&StandbyInfo, MemberName)> = standbys
        .iter()
        .filter(|s| s.state == "streaming")
        .filter_map(|s| {
            let name = MemberName::new(&s.application_name);
            let known = members.get(&name)?;
            (name != *me && !known.nosync).then_some((s, name))
        })
        .collect();
    let replying = |s: &StandbyInfo| s.reply_age_ms.is_none_or(|age| age <= stale_after_ms);
    if ok.iter().any(|(s, _)| replying(s)) {
        ok.retain(|(s, _)| replying(s));
    }
    ok.sort_by(|a, b| {
        b.0.flush_lsn
            .cmp(&a.0.flush_lsn)
            .then_with(|| a.1.cmp(&b.1))
    });
    ok.into_iter().map(|(_, n)| n).collect()
}

/// A member whose agent still reports its PostgreSQL up or coming up — or
/// whose record an etcd outage just expired (see
/// [`expected_back`](super::membership::KnownMember::expected_back)): its agent publishes again on its first
/// loop that reaches etcd. Declaring the set degraded meanwhile would let the
/// leader acknowledge commits alone while its standbys are reconnecting.
fn alive(view: &ClusterView, known: &Known, name: &MemberName) -> bool {
    use crate::model::PgState;
    match view.members.get(name) {
        Some(m) => matches!(
            m.state,
            PgState::Streaming | PgState::InRecovery | PgState::Starting | PgState::Running
        ),
        None => known
            .members
            .get(name)
            .is_some_and(|m| m.expected_back(known.now_ms, known.ttl_ms)),
    }
}

/// The membership as the synchronous rules need it: who is known, and the
/// time and TTL that say whose missing record is still awaited.
#[derive(Clone, Copy, Debug)]
pub struct Known<'a> {
    pub members: &'a Membership,
    pub now_ms: u64,
    pub ttl_ms: u64,
}

pub fn desired(
    cfg: &ClusterConfig,
    view: &ClusterView,
    known: Known,
    me: &MemberName,
    standbys: &[StandbyInfo],
    current: &SyncSetting,
) -> Desired {
    let k = cfg.synchronous_node_count.max(1);
    let quorum = cfg.synchronous_quorum;
    let candidates = eligible(
        known.members,
        me,
        standbys,
        replies_stale_after_ms(known.ttl_ms),
    );
    match cfg.synchronous_mode {
        SyncMode::Off => Desired {
            setting: SyncSetting::empty(),
            degraded: false,
        },
        _ if !candidates.is_empty() => {
            // Current synchronous standbys that are still eligible keep
            // their place (in their order): re-picking by a momentary flush
            // position would churn the set, and each change costs a reload
            // and a catch-up before the record may shrink.
            let current_names = current.real_names();
            let mut names: Vec<MemberName> = current_names
                .iter()
                .filter(|n| candidates.contains(n))
                .cloned()
                .collect();
            names.extend(
                candidates
                    .into_iter()
                    .filter(|c| !current_names.contains(c)),
            );
            if !quorum {
                names.truncate(k as usize);
            }
            let k = k.min(names.len() as u32);
            Desired {
                setting: SyncSetting { names, k, quorum },
                degraded: false,
            }
        }
        // No eligible standby right now. If the named ones are still alive
        // (reconnecting after a failover, restarting), keep waiting for
        // them: writes pause briefly instead of losing their protection.
        // Only when they are gone does `on` degrade.
        SyncMode::On if current.real_names().iter().any(|n| alive(view, &known, n)) => Desired {
            setting: current.clone(),
            degraded: false,
        },
        SyncMode::On => Desired {
            setting: SyncSetting::empty(),
            degraded: true,
        },
        SyncMode::Strict => {
            // Keep waiting on whoever was synchronous; with nobody at all,
            // name a standby that never connects so commits still wait.
            let keep = current.real_names();
            let setting = if keep.is_empty() {
                SyncSetting {
                    names: vec![MemberName::new(NOBODY)],
                    k: 1,
                    quorum: false,
                }
            } else {
                SyncSetting {
                    names: keep,
                    k: current.k.max(1),
                    quorum: current.quorum,
                }
            };
            Desired {
                setting,
                degraded: false,
            }
        }
    }
}

/// The leader's record waits for its standbys to confirm the switch point
/// (step 3 of [`next_step`]): the record is still degraded, or names other
/// members than the setting in effect, while the setting names standbys.
/// Until it settles, automatic failover is blocked or rests on a wider set
/// than needed, and what settles it is a standby's reply — which comes at
/// any moment, not at the next `loop_wait` — so the agent looks again soon.
pub fn settling(me: &MemberName, record: Option<&SyncRecord>, current: &SyncSetting) -> bool {
    let names = current.real_names();
    if names.is_empty() {
        return false;
    }
    match record.filter(|r| &r.leader == me) {
        Some(r) => r.degraded || r.members != names || r.quorum != current.k,
        None => true,
    }
}

/// One change towards the desired state, in the safe order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncStep {
    WriteRecord(SyncRecord),
    SetSetting(SyncSetting),
}

/// `switched_at`: the leader's flush position when the current setting was
/// first seen in effect (the agent remembers it); `None` = unknown.
pub fn next_step(
    me: &MemberName,
    desired: &Desired,
    record: Option<&SyncRecord>,
    current: &SyncSetting,
    standbys: &[StandbyInfo],
    switched_at: Option<Lsn>,
) -> Option<SyncStep> {
    let d_names = desired.setting.real_names();
    let d_k = if d_names.is_empty() {
        0
    } else {
        desired.setting.k
    };
    let (r_members, r_k, r_degraded) = match record.filter(|r| &r.leader == me) {
        Some(r) => (r.members.clone(), r.quorum, r.degraded),
        // A record written by another leader says nothing about this
        // leader's commits: start from the current setting. With no
        // synchronous names in effect, commits so far were acknowledged by
        // this leader alone, so the first record it writes is degraded.
        None => (
            current.real_names(),
            current.k,
            current.real_names().is_empty(),
        ),
    };
    let record_of = |members: Vec<MemberName>, k: u32, degraded: bool| {
        SyncStep::WriteRecord(SyncRecord {
            leader: me.clone(),
            members,
            quorum: k,
            degraded,
        })
    };
    // 0. going asynchronous: first make sure nobody is promotable.
    if desired.degraded && !r_degraded {
        return Some(record_of(r_members, r_k, true));
    }
    // 1. grow the record first (keeping a degraded mark until step 3).
    let missing: Vec<MemberName> = d_names
        .iter()
        .filter(|n| !r_members.contains(n))
        .cloned()
        .collect();
    let owned = record.is_some_and(|r| &r.leader == me);
    if !missing.is_empty() || !owned {
        let mut members = r_members.clone();
        members.extend(missing);
        let k = if r_members.is_empty() {
            d_k
        } else {
            r_k.min(d_k.max(1))
        };
        return Some(record_of(members, k, r_degraded));
    }
    // 2. then switch the server setting.
    if current != &desired.setting {
        return Some(SyncStep::SetSetting(desired.setting.clone()));
    }
    // 3. settle the record: removing members, raising k or leaving the
    // degraded state is safe only once the new members hold everything
    // acknowledged before the switch.
    if r_members != d_names || r_k != d_k || r_degraded != desired.degraded {
        if desired.degraded {
            return Some(record_of(Vec::new(), 0, true));
        }
        let caught_up = d_names.iter().all(|n| {
            standbys.iter().any(|s| {
                s.application_name == n.as_str()
                    && matches!(s.sync_state.as_str(), "sync" | "quorum")
                    && switched_at.is_some_and(|at| s.flush_lsn.is_some_and(|f| f >= at))
            })
        });
        if caught_up {
            return Some(record_of(d_names, d_k, false));
        }
    }
    None
}

/// A member's answer during a leader race.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub name: MemberName,
    pub position: (crate::model::Timeline, Lsn),
    /// It races itself (not `nofailover`, nor out of the race after failed
    /// promotions). Only a candidate wins a tie: at the same position the
    /// WAL is the same, and deferring to a member that never races would
    /// leave the cluster without a leader.
    pub candidate: bool,
}

/// Whether `me` may race for leadership under synchronous replication,
/// given the record and which of its members answered. `Err` says why not.
pub fn promotable(
    record: Option<&SyncRecord>,
    me: &MemberName,
    answered: &[Answer],
    my_position: (crate::model::Timeline, Lsn),
) -> Result<(), super::Disqualified> {
    use super::Disqualified;
    let Some(r) = record else {
        return Err(Disqualified::NotSynchronous);
    };
    if r.degraded || r.members.is_empty() {
        // Degraded (or empty): commits were acknowledged by the record's
        // leader alone, so that leader holds every one of them. Having lost
        // its lease (an etcd stall longer than the TTL, a frozen agent) it
        // may take the key back; anybody else would lose them. Without this
        // a single-member cluster, or one whose standbys are all gone, stays
        // read-only after any lease loss until an operator steps in. A
        // newer leader would have replaced the record before its first
        // commit (S6), so a peer ahead of this member is an anomaly: defer.
        if &r.leader != me {
            return Err(Disqualified::NoSynchronousStandby);
        }
        if let Some(peer) = answered.iter().find(|a| a.position > my_position) {
            return Err(Disqualified::PeerAhead {
                peer: peer.name.clone(),
            });
        }
        return Ok(());
    }
    if !r.members.contains(me) {
        return Err(Disqualified::NotSynchronous);
    }
    let seen: Vec<&Answer> = answered
        .iter()
        .filter(|a| r.members.contains(&a.name) && &a.name != me)
        .collect();
    let needed = (r.members.len() as u32).saturating_sub(r.quorum.max(1)) + 1;
    let seen_count = seen.len() as u32 + 1;
    if seen_count < needed {
        return Err(Disqualified::CannotProveCommits {
            seen: seen_count,
            needed,
        });
    }
    if let Some(peer) = seen.iter().find(|a| {
        a.position > my_position || (a.position == my_position && a.candidate && &a.name < me)
    }) {
        return Err(Disqualified::PeerAhead {
            peer: peer.name.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
#[path = "sync_test.rs"]
mod tests;
