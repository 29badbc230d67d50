//! Failsafe mode: keeping a healthy primary writable through an etcd
//! outage, on the word of every other member.
//!
//! Without it, a leader that cannot renew its lease stops writes before
//! the lease can expire (S2), so an etcd outage longer than the TTL stops
//! every write although every PostgreSQL server is fine. With
//! `failsafe_mode` on, the leader may instead extend its lease *locally*:
//! it sends `POST /failsafe` to every member of the membership it
//! published, and only if every one of them confirms does it count the
//! lease as valid until `sent + ttl`, exactly as if etcd had granted a
//! renewal sent at that instant (the fence keeper is armed the same way).
//!
//! A member that confirms promises not to take the leader key for `ttl`
//! from the moment it received the request, and it refuses to confirm
//! while it takes or holds the key itself. Since it received the request
//! after it was sent, its promise outlives the leader's extension: no
//! member can lead before the old leader's extended deadline has passed.
//! Members the leader did not ask are kept out of the race by the
//! `failsafe` key, which lists the members the leader asks. The argument is
//! spelled out in docs/architecture.md (S2a).
//!
//! Everything here is pure; the agent does the HTTP and the locking.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::membership::Membership;
use crate::dcs::FailsafeRecord;
use crate::model::MemberName;

/// A member's promise not to take the leader key before `until_ms` (its
/// own `CLOCK_BOOTTIME`), given to `leader`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Promise {
    pub leader: MemberName,
    pub until_ms: u64,
}

impl Promise {
    pub fn active(&self, now_ms: u64) -> bool {
        now_ms < self.until_ms
    }
}

/// Why a member does not confirm a failsafe leader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// This member is taking or holds the leader key itself.
    LeadingOrRacing,
    /// This member last saw another member hold the leader key.
    OtherLeader { leader: MemberName },
    /// The request names this member as the leader.
    NamesMe,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::LeadingOrRacing => {
                write!(f, "this member is taking or holds the leader key")
            }
            Refusal::OtherLeader { leader } => {
                write!(f, "this member sees {leader} holding the leader key")
            }
            Refusal::NamesMe => write!(f, "the request names this member as the leader"),
        }
    }
}

/// What a member knows when a failsafe request arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberSide<'a> {
    pub me: &'a MemberName,
    /// Taking the leader key right now, or holding it.
    pub racing_or_leading: bool,
    /// Who held the leader key in this member's last successful read of
    /// etcd (`None`: nobody, or never read).
    pub leader_seen: Option<&'a MemberName>,
    pub current: Option<&'a Promise>,
}

/// The member side: confirm `leader` at `now_ms`, or refuse. A
/// confirmation is a promise lasting `ttl_ms` from now; a newer
/// confirmation never shortens an older one.
pub fn confirm(
    side: &MemberSide<'_>,
    leader: &MemberName,
    now_ms: u64,
    ttl_ms: u64,
) -> Result<Promise, Refusal> {
    if leader == side.me {
        return Err(Refusal::NamesMe);
    }
    if side.racing_or_leading {
        return Err(Refusal::LeadingOrRacing);
    }
    if let Some(seen) = side.leader_seen
        && seen != leader
    {
        return Err(Refusal::OtherLeader {
            leader: seen.clone(),
        });
    }
    let until_ms = now_ms + ttl_ms;
    let until_ms = match side.current {
        Some(p) if p.active(now_ms) => p.until_ms.max(until_ms),
        _ => until_ms,
    };
    Ok(Promise {
        leader: leader.clone(),
        until_ms,
    })
}

/// The `failsafe` record a leader publishes: every member it knows (and
/// itself), with the address it will ask.
pub fn desired_record(me: &MemberName, members: &Membership) -> FailsafeRecord {
    FailsafeRecord {
        leader: me.clone(),
        members: members
            .iter()
            .map(|(name, m)| (name.clone(), m.api_url.clone()))
            .collect(),
    }
}

/// The members a failsafe leader must hear from: everyone in the record
/// it published and everyone it knows now, except itself. A member
/// missing from both can neither be asked nor race (it is not listed).
pub fn members_to_ask(
    me: &MemberName,
    published: &FailsafeRecord,
    members: &Membership,
) -> BTreeMap<MemberName, String> {
    let mut ask: BTreeMap<MemberName, String> = published.members.clone();
    for (name, m) in members {
        ask.entry(name.clone()).or_insert_with(|| m.api_url.clone());
    }
    ask.remove(me);
    ask
}

/// The leader side: how long the lease may be used after a round sent at
/// `sent_ms` in which `confirmed` answered yes. Every member asked must
/// have confirmed; one silence or refusal and the round extends nothing.
pub fn extension(
    sent_ms: u64,
    ttl_ms: u64,
    asked: &BTreeSet<MemberName>,
    confirmed: &BTreeSet<MemberName>,
) -> Option<u64> {
    asked.is_subset(confirmed).then_some(sent_ms + ttl_ms)
}

/// Whether this member may take the leader key now: never while it has
/// promised a failsafe leader not to.
pub fn may_take_key(promise: Option<&Promise>, now_ms: u64) -> Result<(), Promise> {
    match promise {
        Some(p) if p.active(now_ms) => Err(p.clone()),
        _ => Ok(()),
    }
}

/// Whether `me` is kept out of leader races by the published `failsafe`
/// record: with failsafe mode on, only listed members may race, since the
/// leader asks only them before it extends its lease.
pub fn barred_from_race(
    failsafe_mode: bool,
    record: Option<&FailsafeRecord>,
    me: &MemberName,
) -> bool {
    failsafe_mode && record.is_some_and(|r| !r.members.contains_key(me))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ha::membership::KnownMember;

    fn m(s: &str) -> MemberName {
        MemberName::new(s)
    }

    fn known(url: &str) -> KnownMember {
        KnownMember {
            api_url: url.into(),
            host: "h".into(),
            port: 5432,
            nosync: false,
            absent_since_ms: None,
            lost_in_outage: false,
        }
    }

    fn side<'a>(
        me: &'a MemberName,
        racing: bool,
        seen: Option<&'a MemberName>,
        current: Option<&'a Promise>,
    ) -> MemberSide<'a> {
        MemberSide {
            me,
            racing_or_leading: racing,
            leader_seen: seen,
            current,
        }
    }

    #[test]
    fn confirm_table() {
        let (a, b, c) = (m("a"), m("b"), m("c"));
        let old = Promise {
            leader: a.clone(),
            until_ms: 5_000,
        };
        let expired = Promise {
            leader: a.clone(),
            until_ms: 900,
        };
        // (side, leader, expected)
        let cases: Vec<(MemberSide, &MemberName, Result<u64, Refusal>)> = vec![
            (side(&b, false, None, None), &a, Ok(4_000)),
            (side(&b, false, Some(&a), None), &a, Ok(4_000)),
            (
                side(&b, false, Some(&c), None),
                &a,
                Err(Refusal::OtherLeader { leader: c.clone() }),
            ),
            (
                side(&b, true, None, None),
                &a,
                Err(Refusal::LeadingOrRacing),
            ),
            (
                side(&b, true, Some(&a), None),
                &a,
                Err(Refusal::LeadingOrRacing),
            ),
            (side(&b, false, Some(&b), None), &b, Err(Refusal::NamesMe)),
            // A later, longer promise never shrinks to a shorter one.
            (side(&b, false, Some(&a), Some(&old)), &a, Ok(5_000)),
            (side(&b, false, Some(&a), Some(&expired)), &a, Ok(4_000)),
        ];
        for (side, leader, want) in cases {
            let got = confirm(&side, leader, 1_000, 3_000).map(|p| p.until_ms);
            assert_eq!(got, want, "{side:?} asked by {leader}");
        }
    }

    #[test]
    fn a_promise_outlives_the_extension_it_grants() {
        // The leader sends at t; a member receives at t + d (d >= 0) and
        // promises until t + d + ttl; the leader uses its lease until
        // t + ttl at most. For every delay the promise ends no earlier.
        let me = m("b");
        for delay in [0, 1, 250, 2_999, 10_000] {
            let sent = 100_000;
            let promise = confirm(&side(&me, false, None, None), &m("a"), sent + delay, 3_000)
                .expect("confirms");
            let asked = BTreeSet::from([m("b")]);
            let until = extension(sent, 3_000, &asked, &asked).expect("extends");
            assert!(promise.until_ms >= until, "delay {delay}");
            assert!(may_take_key(Some(&promise), until - 1).is_err());
        }
    }

    #[test]
    fn extension_needs_every_member_asked() {
        let asked = BTreeSet::from([m("b"), m("c")]);
        let both = asked.clone();
        let one = BTreeSet::from([m("b")]);
        let none = BTreeSet::new();
        assert_eq!(extension(10, 3_000, &asked, &both), Some(3_010));
        assert_eq!(extension(10, 3_000, &asked, &one), None);
        assert_eq!(extension(10, 3_000, &asked, &none), None);
        // A lone leader asks nobody: nobody else can lead (unlisted
        // members are barred), so it keeps its primary.
        assert_eq!(extension(10, 3_000, &BTreeSet::new(), &none), Some(3_010));
    }

    #[test]
    fn members_to_ask_is_the_union_without_the_leader() {
        let mut members = Membership::new();
        members.insert(m("a"), known("http://a"));
        members.insert(m("b"), known("http://b"));
        let published = FailsafeRecord {
            leader: m("a"),
            members: BTreeMap::from([
                (m("a"), "http://a".to_string()),
                (m("c"), "http://c".to_string()),
            ]),
        };
        let ask = members_to_ask(&m("a"), &published, &members);
        assert_eq!(
            ask.keys().cloned().collect::<Vec<_>>(),
            vec![m("b"), m("c")]
        );
        assert_eq!(
            desired_record(&m("a"), &members).members.len(),
            2,
            "the record lists the leader too"
        );
    }

    #[test]
    fn may_take_key_and_barring() {
        let p = Promise {
            leader: m("a"),
            until_ms: 2_000,
        };
        assert!(may_take_key(Some(&p), 1_999).is_err());
        assert!(may_take_key(Some(&p), 2_000).is_ok());
        assert!(may_take_key(None, 0).is_ok());
        let rec = FailsafeRecord {
            leader: m("a"),
            members: BTreeMap::from([(m("b"), "http://b".to_string())]),
        };
        assert!(barred_from_race(true, Some(&rec), &m("c")));
        assert!(!barred_from_race(true, Some(&rec), &m("b")));
        assert!(!barred_from_race(false, Some(&rec), &m("c")));
        assert!(!barred_from_race(true, None, &m("c")));
    }
}
