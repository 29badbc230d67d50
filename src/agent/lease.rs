//! The lease keeper: renews the leader lease on its own task, so that a
//! slow executor step (a promotion, a fast shutdown) never delays a renewal.
//!
//! It renews only while the HA loop proves it is alive (a heartbeat fresher
//! than the TTL): a leader whose loop hangs must lose its lease rather than
//! hold it while nobody watches PostgreSQL. Every renewal re-arms the fence
//! keeper with the new deadline.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::fence::Fence;
use crate::dcs::{Dcs, LeaseRenewal};
use crate::ha::Lease;
use crate::util::boottime_ms;

#[derive(Debug, Default)]
struct State {
    held: bool,
    valid_until_ms: Option<u64>,
    loop_heartbeat_ms: u64,
    /// The loop announced a long step (a promotion, a shutdown) lasting
    /// until this instant; it is not hung before then.
    busy_until_ms: u64,
    last_renewal_latency_ms: Option<u64>,
    latency: Option<super::status::Histogram>,
}

/// Handle shared by the HA loop and the executor.
#[derive(Clone)]
pub struct LeaseKeeper {
    state: Arc<Mutex<State>>,
    fence: Fence,
    fence_margin_ms: u64,
}

impl LeaseKeeper {
    /// Spawns the renewal task and returns its handle.
    pub fn start(
        dcs: Arc<dyn Dcs>,
        fence: Fence,
        ttl: Duration,
        interval: Duration,
        fence_margin: Duration,
    ) -> Self {
        let keeper = LeaseKeeper {
            state: Arc::default(),
            fence,
            fence_margin_ms: fence_margin.as_millis() as u64,
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
        if !held {
            return;
        }
        let now = boottime_ms();
        let stale = now.saturating_sub(heartbeat);
        if stale > ttl.as_millis() as u64 && now > busy_until {
            tracing::error!(
                stale_ms = stale,
                "HA loop has not run for longer than the TTL; not renewing the lease"
            );
            return;
        }
        let started = boottime_ms();
        match dcs.renew_leader().await {
            Ok(Some(r)) => self.record(r, Some(boottime_ms() - started)),
            Ok(None) => {
                tracing::warn!("leader lease is gone");
                let mut s = self.state.lock().unwrap();
                s.valid_until_ms = None;
            }
            Err(e) => {
                tracing::warn!(error = %crate::util::chain(&e), "leader lease renewal failed")
            }
        }
    }

    /// Records a successful acquisition or renewal and moves the fence
    /// deadline forward.
    pub fn record(&self, r: LeaseRenewal, latency_ms: Option<u64>) {
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
        if let Some(ms) = latency_ms {
            s.last_renewal_latency_ms = Some(ms);
            s.latency
                .get_or_insert_with(super::status::Histogram::latency)
                .observe(ms as f64);
        }
        self.fence.arm(until.saturating_sub(self.fence_margin_ms));
    }

    /// Forgets the lease (released, or known lost).
    pub fn clear(&self) {
        let mut s = self.state.lock().unwrap();
        s.held = false;
        s.valid_until_ms = None;
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

    pub fn snapshot(&self) -> Lease {
        let s = self.state.lock().unwrap();
        Lease {
            held: s.held,
            valid_until_ms: s.valid_until_ms,
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
