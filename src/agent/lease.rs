//! The lease keeper: renews the leader lease on its own task, so that a
//! slow executor step (a promotion, a fast shutdown) never delays a renewal.
//!
//! It renews only while the HA loop proves it is alive (a heartbeat fresher
//! than the TTL) and a fence keeper stands guard (rules in
//! [`crate::ha::lease`]): a leader whose loop hangs, or whose keeper died,
//! must lose its lease rather than hold it while nothing could stop
//! PostgreSQL. Every renewal re-arms the fence keeper with the new deadline;
//! the lease counts as usable only up to the deadline the keeper
//! acknowledged. It also replaces a keeper that stopped making progress.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::failsafe::Failsafe;
use super::fence::{Fence, FenceError};
use crate::config::ApiConfig;
use crate::dcs::{Dcs, LeaseRenewal};
use crate::ha::Lease;
use crate::ha::lease::{
    AGENT_LEAD_MS, KeeperProblem, RenewRefusal, keeper_health, keeper_needs_replacing, may_renew,
    usable_until,
};
use crate::model::MemberName;
use crate::util::{boottime_ms, chain};

#[derive(Debug, Default)]
struct State {
    held: bool,
    /// The later of what etcd granted and what the members confirmed.
    valid_until_ms: Option<u64>,
    /// What etcd granted (`None` once it reported the lease gone).
    etcd_until_ms: Option<u64>,
    /// What the last successful failsafe round granted.
    members_until_ms: Option<u64>,
    /// The last renewal attempt failed: the next failsafe round runs
    /// beside the renewal rather than after it.
    renewal_failing: bool,
    loop_heartbeat_ms: u64,
    /// The loop announced a long step (a promotion, a shutdown) lasting
    /// until this instant; it is not hung before then.
    busy_until_ms: u64,
    last_renewal_latency_ms: Option<u64>,
    latency: Option<super::status::Histogram>,
    last_refusal: Option<RenewRefusal>,
}

/// What the keeper needs to ask the members when etcd does not renew
/// (failsafe mode, [`crate::ha::failsafe`]).
#[derive(Clone)]
pub struct FailsafeRounds {
    pub failsafe: Failsafe,
    pub http: reqwest::Client,
    pub api: ApiConfig,
    pub me: MemberName,
}

/// Handle shared by the HA loop and the executor.
#[derive(Clone)]
pub struct LeaseKeeper {
    state: Arc<Mutex<State>>,
    fence: Fence,
    fence_margin_ms: u64,
    rounds: Option<FailsafeRounds>,
}

impl LeaseKeeper {
    /// Spawns the renewal task and returns its handle.
    pub fn start(
        dcs: Arc<dyn Dcs>,
        fence: Fence,
        ttl: Duration,
        interval: Duration,
        fence_margin: Duration,
        rounds: Option<FailsafeRounds>,
    ) -> Self {
        let keeper = LeaseKeeper {
            state: Arc::default(),
            fence,
            fence_margin_ms: fence_margin.as_millis() as u64,
            rounds,
        };
        let k = keeper.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                k.renew_once(dcs.as_ref(), ttl).await;
            }
        });
        keeper
    }

    async fn renew_once(&self, dcs: &dyn Dcs, ttl: Duration) {
        let (held, heartbeat, busy_until) = {
            let s = self.state.lock().unwrap();
            (s.held, s.loop_heartbeat_ms, s.busy_until_ms)
        };
        let now = boottime_ms();
        let keeper = self.fence.view();
        if keeper_needs_replacing(now, &keeper) {
            self.fence.replace_hung_keeper();
        }
        if !held {
            return;
        }
        let refusal = may_renew(now, heartbeat, busy_until, ttl.as_millis() as u64, &keeper).err();
        {
            // Logged when the reason changes, not every interval.
            let mut s = self.state.lock().unwrap();
            if refusal != s.last_refusal {
                match refusal {
                    Some(RenewRefusal::LoopStale { stale_ms }) => tracing::error!(
                        stale_ms,
                        "HA loop has not run for longer than the TTL; not renewing the lease"
                    ),
                    Some(RenewRefusal::Keeper(problem)) => tracing::error!(
                        problem = %problem,
                        "no fence keeper stands guard; not renewing the lease"
                    ),
                    None if s.last_refusal.is_some() => {
                        tracing::info!("renewing the lease again")
                    }
                    None => {}
                }
                s.last_refusal = refusal;
            }
        }
        if refusal.is_some() {
            return;
        }
        let targets = self
            .rounds
            .as_ref()
            .and_then(|r| Some((r, r.failsafe.round_targets()?)));
        let failing = self.state.lock().unwrap().renewal_failing;
        let started = boottime_ms();
        // While etcd keeps failing, ask the members at once rather than
        // after another renewal timed out, and use their answer as soon as
        // it arrives: a round grants `ttl` from when it was sent, and
        // waiting for the renewal to time out first would spend most of
        // that before the loop could see it.
        let (renewal, asked_early) = match &targets {
            Some((rounds, targets)) if failing => {
                let (renewal, ()) = tokio::join!(
                    dcs.renew_leader(),
                    self.failsafe_round(rounds, targets, ttl)
                );
                (renewal, true)
            }
            _ => (dcs.renew_leader().await, false),
        };
        let renewed = match renewal {
            Ok(Some(r)) => {
                if let Err(e) = self.record(r, Some(boottime_ms() - started)) {
                    // The new deadline is never acknowledged, so the lease
                    // stays usable only up to the previous one: the loop
                    // demotes then, unless a later arm succeeds.
                    tracing::error!(error = %chain(&e), "renewed the lease but cannot arm the fence keeper");
                }
                true
            }
            Ok(None) => {
                tracing::warn!("leader lease is gone");
                let mut s = self.state.lock().unwrap();
                s.etcd_until_ms = None;
                s.valid_until_ms = s.members_until_ms;
                false
            }
            Err(e) => {
                tracing::warn!(error = %crate::util::chain(&e), "leader lease renewal failed");
                false
            }
        };
        self.state.lock().unwrap().renewal_failing = !renewed;
        if renewed || asked_early {
            return;
        }
        if let Some((rounds, targets)) = targets {
            self.failsafe_round(rounds, &targets, ttl).await;
        }
    }

    /// Runs one failsafe round and records what it granted.
    async fn failsafe_round(
        &self,
        rounds: &FailsafeRounds,
        targets: &std::collections::BTreeMap<MemberName, String>,
        ttl: Duration,
    ) {
        let until = super::failsafe::run_round(
            &rounds.failsafe,
            &rounds.http,
            &rounds.api,
            &rounds.me,
            targets,
            ttl,
        )
        .await;
        match until {
            Some(until) => {
                if let Err(e) = self.record_members(until) {
                    tracing::error!(error = %chain(&e), "members confirmed the lease but the fence keeper cannot be armed");
                }
            }
            None => tracing::warn!(
                "failsafe: not every member confirmed this leader; the lease runs out unless etcd renews it"
            ),
        }
    }

    /// Records a failsafe round every member confirmed: the lease may be
    /// used until `until_ms`, as if etcd had granted a renewal sent when
    /// the round was.
    fn record_members(&self, until_ms: u64) -> Result<(), FenceError> {
        let until = {
            let mut s = self.state.lock().unwrap();
            if !s.held {
                return Ok(());
            }
            let newly = s
                .members_until_ms
                .is_none_or(|m| m < s.etcd_until_ms.unwrap_or(0));
            s.members_until_ms = Some(s.members_until_ms.map_or(until_ms, |m| m.max(until_ms)));
            let until = s.valid_until_ms.map_or(until_ms, |v| v.max(until_ms));
            s.valid_until_ms = Some(until);
            if newly {
                tracing::warn!(
                    "failsafe: etcd cannot renew the lease; every member confirmed this leader, staying primary"
                );
            }
            until
        };
        self.fence.arm(until.saturating_sub(self.fence_margin_ms))
    }

    /// Records a successful acquisition or renewal and moves the fence
    /// deadline forward. The lease becomes usable up to the new deadline
    /// only once the keeper acknowledges it.
    pub fn record(&self, r: LeaseRenewal, latency_ms: Option<u64>) -> Result<(), FenceError> {
        let until = {
            let mut s = self.state.lock().unwrap();
            // Never move the deadline backwards: a slow, older response must
            // not shorten what a newer one granted (it would only be safe,
            // but could fence needlessly).
            let until = s
                .valid_until_ms
                .filter(|_| s.held)
                .map_or(r.valid_until_ms, |u| u.max(r.valid_until_ms));
            s.held = true;
            s.valid_until_ms = Some(until);
            s.etcd_until_ms = Some(
                s.etcd_until_ms
                    .map_or(r.valid_until_ms, |e| e.max(r.valid_until_ms)),
            );
            if let Some(ms) = latency_ms {
                s.last_renewal_latency_ms = Some(ms);
                s.latency
                    .get_or_insert_with(super::status::Histogram::latency)
                    .observe(ms as f64);
            }
            until
        };
        self.fence.arm(until.saturating_sub(self.fence_margin_ms))
    }

    /// Waits (briefly) until a keeper acknowledged the deadline of the
    /// lease as recorded now. Called after acquiring a lease, before
    /// anything writable: a member must never lead without a fence.
    pub async fn wait_until_guarded(&self, timeout: Duration) -> Result<(), KeeperProblem> {
        let deadline = boottime_ms() + timeout.as_millis() as u64;
        loop {
            let wanted = self
                .state
                .lock()
                .unwrap()
                .valid_until_ms
                .map(|u| u.saturating_sub(self.fence_margin_ms));
            let view = self.fence.view();
            let health = keeper_health(boottime_ms(), &view);
            let acked = view.ack.and_then(|a| a.armed_deadline_ms);
            if health.is_ok() && wanted.is_some() && acked >= wanted {
                return Ok(());
            }
            if boottime_ms() >= deadline {
                return Err(health.err().unwrap_or(KeeperProblem::NotAcknowledged));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Forgets the lease (released, or known lost).
    pub fn clear(&self) {
        let mut s = self.state.lock().unwrap();
        s.held = false;
        s.valid_until_ms = None;
        s.etcd_until_ms = None;
        s.members_until_ms = None;
    }

    /// The loop is about to run a step that may legitimately take up to
    /// `d` (each such step has its own timeout).
    pub fn expect_busy(&self, d: std::time::Duration) {
        let mut s = self.state.lock().unwrap();
        s.busy_until_ms = boottime_ms() + d.as_millis() as u64;
    }

    pub fn heartbeat(&self) {
        self.state.lock().unwrap().loop_heartbeat_ms = boottime_ms();
    }

    /// The lease as the decision sees it: usable only up to a deadline a
    /// fence keeper acknowledged (see [`usable_until`]).
    pub fn snapshot(&self) -> Lease {
        let (held, valid_until_ms, confirmed_by_members) = {
            let s = self.state.lock().unwrap();
            let by_members = s
                .members_until_ms
                .is_some_and(|m| s.etcd_until_ms.is_none_or(|e| m > e));
            (s.held, s.valid_until_ms, by_members)
        };
        Lease {
            held,
            confirmed_by_members,
            valid_until_ms: usable_until(
                valid_until_ms,
                self.fence.ack().as_ref(),
                self.fence_margin_ms,
                AGENT_LEAD_MS,
            ),
        }
    }

    pub fn renewal_histogram(&self) -> super::status::Histogram {
        self.state
            .lock()
            .unwrap()
            .latency
            .clone()
            .unwrap_or_else(super::status::Histogram::latency)
    }

    pub fn last_renewal_latency_ms(&self) -> Option<u64> {
        self.state.lock().unwrap().last_renewal_latency_ms
    }
}

#[cfg(test)]
#[path = "lease_test.rs"]
mod tests;
