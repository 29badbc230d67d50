//! Failsafe mode's moving parts (the rules are in [`crate::ha::failsafe`]).
//!
//! One [`Failsafe`] is shared by the HA loop, the executor, the lease
//! keeper and the REST API:
//!
//! - the loop records what it read from etcd (is failsafe mode on, who
//!   leads, whom a failsafe round must ask);
//! - the API answers `POST /failsafe` from a leader and records the promise;
//! - the executor asks [`Failsafe::begin_race`] before it takes the leader
//!   key, under the same lock as the API's confirmation, so a member never
//!   both confirms a leader and takes the key;
//! - the lease keeper runs a round ([`run_round`]) when etcd does not
//!   renew the lease.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

use crate::config::ApiConfig;
use crate::dcs::ClusterView;
use crate::ha::failsafe::{self, MemberSide, Promise, Refusal};
use crate::ha::membership::Membership;
use crate::model::MemberName;

/// The body of `POST /failsafe`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailsafeRequest {
    /// The member that leads and asks to stay writable.
    pub leader: MemberName,
}

/// The answer to a confirmed request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailsafeConfirmation {
    pub member: MemberName,
    pub leader: MemberName,
    /// How long this member promised not to take the leader key.
    pub promise_ms: u64,
}

/// What the last failsafe round of this leader found (for `/status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundReport {
    pub asked: Vec<MemberName>,
    pub confirmed: Vec<MemberName>,
    /// Granted: the lease may be used until this instant.
    pub extended: bool,
}

#[derive(Debug, Default)]
struct Inner {
    enabled: bool,
    /// Whom a round asks; `None` while this member does not lead with a
    /// published `failsafe` record.
    ask: Option<BTreeMap<MemberName, String>>,
    promise: Option<Promise>,
    racing_or_leading: bool,
    leader_seen: Option<MemberName>,
    last_round: Option<RoundReport>,
    warned_no_credentials: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Failsafe {
    inner: Arc<Mutex<Inner>>,
}

/// What `/status` shows of failsafe mode.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailsafeStatus {
    pub enabled: bool,
    /// This member's promise to a failsafe leader, with the milliseconds
    /// it still runs.
    pub promised_to: Option<MemberName>,
    pub promise_remaining_ms: Option<u64>,
    pub last_round: Option<RoundReport>,
}

impl Failsafe {
    /// Called by the loop once per iteration, after reading etcd (`view`
    /// is `None` when the read failed: what was known stays).
    pub fn observe(
        &self,
        me: &MemberName,
        view: Option<&ClusterView>,
        members: &Membership,
        lease_held: bool,
        has_credentials: bool,
    ) {
        let mut s = self.inner.lock().unwrap();
        s.racing_or_leading = lease_held;
        let Some(view) = view else {
            return;
        };
        s.enabled = view.config.failsafe_mode;
        if s.enabled && !has_credentials && !s.warned_no_credentials {
            tracing::warn!(
                "failsafe_mode is on but this member has no API credentials (api.token or api.username/api.password): the other members cannot confirm each other, so an etcd outage still stops writes; give every member the same credentials"
            );
        }
        s.warned_no_credentials = s.enabled && !has_credentials;
        s.leader_seen = view.leader.as_ref().map(|l| l.name.clone());
        let leads = s.leader_seen.as_ref() == Some(me);
        // With the key expired but the lease still held on the members'
        // word, the loop is about to take the key again: keep asking.
        let keeps_asking = s.leader_seen.is_none() && lease_held;
        s.ask = match &view.failsafe {
            Some(record) if s.enabled && (leads || keeps_asking) => {
                Some(failsafe::members_to_ask(me, record, members))
            }
            _ if keeps_asking => s.ask.take(),
            _ => None,
        };
    }

    /// The member side of `POST /failsafe`.
    pub fn confirm(
        &self,
        me: &MemberName,
        leader: &MemberName,
        now_ms: u64,
        ttl_ms: u64,
    ) -> Result<Promise, Refusal> {
        let mut s = self.inner.lock().unwrap();
        let side = MemberSide {
            me,
            racing_or_leading: s.racing_or_leading,
            leader_seen: s.leader_seen.as_ref(),
            current: s.promise.as_ref(),
        };
        let promise = failsafe::confirm(&side, leader, now_ms, ttl_ms)?;
        s.promise = Some(promise.clone());
        Ok(promise)
    }

    /// Before taking the leader key: refused while a promise runs;
    /// otherwise no confirmation is given until [`Failsafe::end_race`] or
    /// the next loop finds the lease not held.
    pub fn begin_race(&self, now_ms: u64) -> Result<(), Promise> {
        let mut s = self.inner.lock().unwrap();
        failsafe::may_take_key(s.promise.as_ref(), now_ms)?;
        s.racing_or_leading = true;
        Ok(())
    }

    pub fn end_race(&self) {
        self.inner.lock().unwrap().racing_or_leading = false;
    }

    pub fn promise(&self) -> Option<Promise> {
        self.inner.lock().unwrap().promise.clone()
    }

    /// Whom a round must ask, when failsafe mode lets this leader run one.
    pub fn round_targets(&self) -> Option<BTreeMap<MemberName, String>> {
        let s = self.inner.lock().unwrap();
        if s.enabled { s.ask.clone() } else { None }
    }

    fn record_round(&self, report: RoundReport) {
        self.inner.lock().unwrap().last_round = Some(report);
    }

    pub fn status(&self, now_ms: u64) -> FailsafeStatus {
        let s = self.inner.lock().unwrap();
        let active = s.promise.as_ref().filter(|p| p.active(now_ms));
        FailsafeStatus {
            enabled: s.enabled,
            promised_to: active.map(|p| p.leader.clone()),
            promise_remaining_ms: active.map(|p| p.until_ms - now_ms),
            last_round: s.last_round.clone(),
        }
    }
}

/// Asks every member in `targets` to confirm `me` as leader. Returns the
/// instant until which the lease may be used (sent + ttl) when all did.
pub async fn run_round(
    failsafe: &Failsafe,
    http: &reqwest::Client,
    api: &ApiConfig,
    me: &MemberName,
    targets: &BTreeMap<MemberName, String>,
    ttl: Duration,
) -> Option<u64> {
    let sent_ms = crate::util::boottime_ms();
    let body = FailsafeRequest { leader: me.clone() };
    let requests = targets.iter().map(|(name, url)| {
        let mut request = http.post(format!("{url}/failsafe")).json(&body);
        if let Some(token) = &api.token {
            request = request.bearer_auth(token.expose());
        } else if let Some((user, password)) = &api.basic_auth {
            request = request.basic_auth(user, Some(password.expose()));
        }
        async move {
            let confirmed = match request.send().await {
                Ok(resp) if resp.status().is_success() => resp
                    .json::<FailsafeConfirmation>()
                    .await
                    .is_ok_and(|c| &c.member == name && &c.leader == me),
                Ok(resp) => {
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    tracing::warn!(peer = %name, %status, answer = %text, "failsafe confirmation refused");
                    false
                }
                Err(e) => {
                    tracing::warn!(peer = %name, error = %crate::util::chain(&e), "failsafe confirmation not received");
                    false
                }
            };
            (name.clone(), confirmed)
        }
    });
    let answers = join_all(requests).await;
    let asked: BTreeSet<MemberName> = targets.keys().cloned().collect();
    let confirmed: BTreeSet<MemberName> = answers
        .into_iter()
        .filter(|(_, ok)| *ok)
        .map(|(n, _)| n)
        .collect();
    let until = failsafe::extension(sent_ms, ttl.as_millis() as u64, &asked, &confirmed);
    failsafe.record_round(RoundReport {
        asked: asked.into_iter().collect(),
        confirmed: confirmed.into_iter().collect(),
        extended: until.is_some(),
    });
    until
}
