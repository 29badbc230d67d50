//! Who is in the cluster, as this agent knows it — surviving etcd outages.
//!
//! Member records in the DCS are bound to each member's lease, so an etcd
//! outage longer than the TTL erases all of them at once, and for a moment
//! after etcd returns nobody is listed. Deciding from the records alone then
//! goes blind: a replica finds no peer to compare WAL positions with and
//! believes itself the most advanced, and a new leader finds no standby to
//! make synchronous. The membership is the agent's own memory of every
//! member seen: a record adds or refreshes a member, and a member is
//! forgotten only after fresh DCS reads have shown it absent for
//! [`forget_after_ms`] — never while etcd cannot be read, whatever its
//! length.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::dcs::ClusterView;
use crate::model::MemberName;

/// How to reach a member and what it allows, as last published.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownMember {
    pub api_url: String,
    pub host: String,
    pub port: u16,
    #[serde(default)]
    pub nosync: bool,
    /// When fresh DCS reads first showed this member without a record
    /// (`CLOCK_BOOTTIME` ms); `None` while its record is there. Not kept
    /// across restarts: boot-time instants mean nothing after one.
    #[serde(skip)]
    pub absent_since_ms: Option<u64>,
    /// Its record vanished within a TTL of this agent reaching etcd again
    /// (after an outage, or after starting): the lease may have run out
    /// only because etcd was out of reach for everyone. A record that
    /// vanished while this agent had been reading etcd for longer expired
    /// because its member stopped renewing.
    #[serde(skip)]
    pub lost_in_outage: bool,
}

impl KnownMember {
    /// Whether its record is missing only because of an etcd outage, so
    /// recently that a live agent has not yet had the chance to publish
    /// again (it does on its first loop that reaches etcd): waiting for it
    /// is worth a moment, while waiting for a member that stopped renewing
    /// would only stall.
    pub fn expected_back(&self, now_ms: u64, ttl_ms: u64) -> bool {
        self.lost_in_outage
            && self
                .absent_since_ms
                .is_some_and(|absent| now_ms.saturating_sub(absent) < ttl_ms)
    }
}

/// Every member this agent knows of, by name.
pub type Membership = BTreeMap<MemberName, KnownMember>;

/// How long fresh DCS reads must show a member absent before it is
/// forgotten: twice the TTL gives every live agent time to publish again
/// after an outage (it does so on its first loop that reaches etcd), while
/// a member that really left stops counting soon after its record expired.
pub fn forget_after_ms(ttl_ms: u64) -> u64 {
    2 * ttl_ms
}

/// Folds one loop's DCS read into the membership. `view` is `None` when
/// etcd could not be read: then nothing changes. `reads_ok_since_ms`: when
/// the current run of successful reads began (the end of the last outage,
/// or this agent's first read).
pub fn update(
    known: &Membership,
    view: Option<&ClusterView>,
    now_ms: u64,
    ttl_ms: u64,
    reads_ok_since_ms: u64,
) -> Membership {
    let Some(view) = view else {
        return known.clone();
    };
    let mut next = Membership::new();
    for (name, record) in &view.members {
        next.insert(
            name.clone(),
            KnownMember {
                api_url: record.api_url.clone(),
                host: record.host.clone(),
                port: record.port,
                nosync: record.nosync,
                absent_since_ms: None,
                lost_in_outage: false,
            },
        );
    }
    for (name, member) in known {
        if next.contains_key(name) {
            continue;
        }
        let (since, lost_in_outage) = match member.absent_since_ms {
            Some(since) => (since, member.lost_in_outage),
            None => (now_ms, now_ms.saturating_sub(reads_ok_since_ms) < ttl_ms),
        };
        if now_ms.saturating_sub(since) < forget_after_ms(ttl_ms) {
            next.insert(
                name.clone(),
                KnownMember {
                    absent_since_ms: Some(since),
                    lost_in_outage,
                    ..member.clone()
                },
            );
        }
    }
    next
}

/// Whether two memberships differ in anything worth persisting (who, and
/// how to reach them); absence timers are not.
pub fn same_members(a: &Membership, b: &Membership) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((na, ma), (nb, mb))| {
            na == nb
                && ma.api_url == mb.api_url
                && ma.host == mb.host
                && ma.port == mb.port
                && ma.nosync == mb.nosync
        })
}

/// The member serving PostgreSQL at `host:port`, if known.
pub fn member_at(known: &Membership, host: &str, port: u16) -> Option<MemberName> {
    known
        .iter()
        .find(|(_, m)| m.host == host && m.port == port)
        .map(|(n, _)| n.clone())
}

/// How many members must answer before a replica may race for leadership
/// without synchronous replication: a majority of the members that could
/// hold WAL the others lack — everyone known except the lost leader (it is
/// the one that failed; counting it would block every failover of a
/// two-member cluster). `voters` includes the deciding member itself.
pub fn race_quorum(voters: usize) -> usize {
    voters / 2 + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MemberRecord, PgRole, PgState};

    fn record(name: &str, port: u16) -> MemberRecord {
        MemberRecord {
            name: MemberName::new(name),
            api_url: format!("http://127.0.0.1:{}", port + 1000),
            host: "127.0.0.1".into(),
            port,
            role: PgRole::Replica,
            state: PgState::Streaming,
            timeline: None,
            received_lsn: None,
            replayed_lsn: None,
            flushed_lsn: None,
            upstream: None,
            priority: 100,
            nofailover: false,
            nosync: false,
            last_decision: None,
            updated_at_ms: 0,
            parameters: Default::default(),
            adoptable: false,
        }
    }

    fn view(names: &[(&str, u16)]) -> ClusterView {
        ClusterView {
            members: names
                .iter()
                .map(|(n, p)| (MemberName::new(*n), record(n, *p)))
                .collect(),
            ..ClusterView::default()
        }
    }

    const TTL: u64 = 3_000;

    #[test]
    fn records_add_and_refresh_members() {
        let m = update(
            &Membership::new(),
            Some(&view(&[("a", 1), ("b", 2)])),
            0,
            TTL,
            0,
        );
        assert_eq!(m.len(), 2);
        let m = update(&m, Some(&view(&[("a", 1), ("b", 7)])), 10, TTL, 0);
        assert_eq!(
            m[&MemberName::new("b")].port,
            7,
            "a new address replaces the old"
        );
    }

    #[test]
    fn an_etcd_outage_forgets_nobody_however_long() {
        let m = update(
            &Membership::new(),
            Some(&view(&[("a", 1), ("b", 2)])),
            0,
            TTL,
            0,
        );
        let mut t = 0;
        let mut now = m.clone();
        while t < 3_600_000 {
            t += 500;
            now = update(&now, None, t, TTL, 0);
        }
        assert_eq!(now, m);
        // etcd is back and every record expired: still known, timer starts.
        let back = update(&now, Some(&view(&[])), t, TTL, 0);
        assert_eq!(back.len(), 2);
        assert!(back.values().all(|m| m.absent_since_ms == Some(t)));
    }

    #[test]
    fn absence_in_fresh_reads_forgets_after_twice_the_ttl() {
        let m = update(
            &Membership::new(),
            Some(&view(&[("a", 1), ("b", 2)])),
            0,
            TTL,
            0,
        );
        let m = update(&m, Some(&view(&[("a", 1)])), 1_000, TTL, 0);
        let m = update(&m, Some(&view(&[("a", 1)])), 1_000 + 2 * TTL - 1, TTL, 0);
        assert!(m.contains_key(&MemberName::new("b")), "not yet");
        // An outage in between does not advance or reset the timer.
        let m = update(&m, None, 50_000, TTL, 0);
        assert!(m.contains_key(&MemberName::new("b")));
        let m = update(&m, Some(&view(&[("a", 1)])), 50_001, TTL, 0);
        assert!(!m.contains_key(&MemberName::new("b")), "forgotten");
    }

    #[test]
    fn a_record_that_returns_clears_the_timer() {
        let m = update(&Membership::new(), Some(&view(&[("a", 1)])), 0, TTL, 0);
        let m = update(&m, Some(&view(&[])), 1_000, TTL, 0);
        let m = update(&m, Some(&view(&[("a", 1)])), 2_000, TTL, 0);
        assert_eq!(m[&MemberName::new("a")].absent_since_ms, None);
        let m = update(&m, Some(&view(&[])), 2_000 + 2 * TTL - 1, TTL, 0);
        assert!(m.contains_key(&MemberName::new("a")), "timer restarted");
    }

    #[test]
    fn persisted_form_round_trips_without_timers() {
        let mut m = update(&Membership::new(), Some(&view(&[("a", 1)])), 0, TTL, 0);
        m.get_mut(&MemberName::new("a")).unwrap().absent_since_ms = Some(5);
        let text = serde_json::to_string(&m).unwrap();
        let back: Membership = serde_json::from_str(&text).unwrap();
        assert!(same_members(&m, &back));
        assert_eq!(back[&MemberName::new("a")].absent_since_ms, None);
    }

    #[test]
    fn only_records_lost_in_an_outage_are_expected_back() {
        let a = MemberName::new("a");
        let m = update(&Membership::new(), Some(&view(&[("a", 1)])), 0, TTL, 0);
        // Vanished after a long run of successful reads: it stopped renewing.
        let gone = update(&m, Some(&view(&[])), 20_000, TTL, 0);
        assert!(!gone[&a].expected_back(20_000, TTL));
        // Vanished in the first TTL after etcd came back (etcd revokes the
        // leases that ran out during the outage a moment after it returns).
        let back = update(&m, Some(&view(&[])), 20_000, TTL, 19_500);
        assert!(back[&a].expected_back(20_000, TTL));
        assert!(back[&a].expected_back(20_000 + TTL - 1, TTL));
        assert!(!back[&a].expected_back(20_000 + TTL, TTL), "not forever");
        // The verdict is taken when the absence starts, not re-judged.
        let later = update(&back, Some(&view(&[])), 21_000, TTL, 19_500);
        assert!(later[&a].expected_back(21_000, TTL));
        // Loaded after a restart: absent at the agent's first reads.
        let text = serde_json::to_string(&m).unwrap();
        let loaded: Membership = serde_json::from_str(&text).unwrap();
        let after_restart = update(&loaded, Some(&view(&[])), 100, TTL, 100);
        assert!(after_restart[&a].expected_back(100, TTL));
        // A member with a record is not "expected back".
        assert!(!m[&a].expected_back(0, TTL));
    }

    #[test]
    fn race_quorum_table() {
        // voters (me included, lost leader excluded) -> answers needed
        for (voters, needed) in [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3)] {
            assert_eq!(race_quorum(voters), needed, "{voters} voters");
        }
    }

    #[test]
    fn member_at_finds_by_address() {
        let m = update(
            &Membership::new(),
            Some(&view(&[("a", 1), ("b", 2)])),
            0,
            TTL,
            0,
        );
        assert_eq!(member_at(&m, "127.0.0.1", 2), Some(MemberName::new("b")));
        assert_eq!(member_at(&m, "127.0.0.1", 3), None);
    }
}
