//! Counters for `/metrics`, and their Prometheus text rendering.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::pool::PoolStats;

/// Upper bounds (seconds) of the wait-time histogram buckets.
const WAIT_BUCKETS: [f64; 9] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0];

#[derive(Default)]
pub struct Stats {
    pub clients_active: AtomicU64,
    pub clients_waiting: AtomicU64,
    pub clients_refused: AtomicU64,
    pub held_total: AtomicU64,
    pub hold_timeouts_total: AtomicU64,
    hold_micros_total: AtomicU64,
    pub drains_total: AtomicU64,
    pub auth_failures_total: AtomicU64,
    wait: Histogram,
    /// Sessions keep the counter of the member they use (see
    /// [`Stats::transaction_counter`]): the map's lock is not taken per
    /// transaction.
    transactions: Mutex<BTreeMap<(String, &'static str), Arc<AtomicU64>>>,
    /// The auto listener's routing decisions, per member and reason.
    routed: Mutex<BTreeMap<(String, &'static str), Arc<AtomicU64>>>,
    /// Read-only statements retried on another member after their replica
    /// failed before answering.
    pub read_retries_total: AtomicU64,
}

/// Atomics, not a lock: every transaction records its wait.
#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; WAIT_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Stats {
    /// How long a client waited for a server connection.
    pub fn observe_wait(&self, wait: Duration) {
        let secs = wait.as_secs_f64();
        let h = &self.wait;
        // Cumulative buckets: only the first one that fits is counted
        // here; `render` sums them.
        if let Some(i) = WAIT_BUCKETS.iter().position(|b| secs <= *b) {
            h.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        h.count.fetch_add(1, Ordering::Relaxed);
        h.sum_nanos
            .fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
    }

    /// A transaction that waited because there was no target.
    pub fn observe_hold(&self, held: Duration) {
        self.held_total.fetch_add(1, Ordering::Relaxed);
        self.hold_micros_total
            .fetch_add(held.as_micros() as u64, Ordering::Relaxed);
    }

    /// The counter of transactions routed to `member` on `side`.
    pub fn transaction_counter(&self, member: &str, side: &'static str) -> Arc<AtomicU64> {
        self.transactions
            .lock()
            .expect("transactions")
            .entry((member.to_string(), side))
            .or_default()
            .clone()
    }

    /// Counts one routing decision of the auto listener.
    pub fn count_route(&self, member: &str, reason: &'static str) {
        let counter = self
            .routed
            .lock()
            .expect("routed")
            .entry((member.to_string(), reason))
            .or_default()
            .clone();
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, pools: &[PoolStats]) -> String {
        let mut out = String::new();
        let g = |out: &mut String, name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        g(
            &mut out,
            "pgha_proxy_clients_active",
            "gauge",
            "Client connections past the login.",
            load(&self.clients_active),
        );
        g(
            &mut out,
            "pgha_proxy_clients_waiting",
            "gauge",
            "Clients waiting for a server connection or a target.",
            load(&self.clients_waiting),
        );
        g(
            &mut out,
            "pgha_proxy_clients_refused_total",
            "counter",
            "Clients refused by max_client_conn.",
            load(&self.clients_refused),
        );
        g(
            &mut out,
            "pgha_proxy_auth_failures_total",
            "counter",
            "Failed client logins.",
            load(&self.auth_failures_total),
        );
        g(
            &mut out,
            "pgha_proxy_held_transactions_total",
            "counter",
            "Transactions that waited for a primary or replica.",
            load(&self.held_total),
        );
        g(
            &mut out,
            "pgha_proxy_hold_timeouts_total",
            "counter",
            "Held transactions that got an error after hold_timeout.",
            load(&self.hold_timeouts_total),
        );
        let _ = writeln!(
            out,
            "# HELP pgha_proxy_hold_seconds_total Time transactions spent held.\n# TYPE pgha_proxy_hold_seconds_total counter\npgha_proxy_hold_seconds_total {}",
            load(&self.hold_micros_total) as f64 / 1e6
        );
        g(
            &mut out,
            "pgha_proxy_drains_total",
            "counter",
            "Switchover drains completed.",
            load(&self.drains_total),
        );

        let h = &self.wait;
        let count = load(&h.count);
        out.push_str("# HELP pgha_proxy_wait_seconds Time clients waited for a server connection.\n# TYPE pgha_proxy_wait_seconds histogram\n");
        let mut cumulative = 0;
        for (i, bound) in WAIT_BUCKETS.iter().enumerate() {
            cumulative += load(&h.buckets[i]);
            let _ = writeln!(
                out,
                "pgha_proxy_wait_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "pgha_proxy_wait_seconds_bucket{{le=\"+Inf\"}} {}",
            count.max(cumulative)
        );
        let _ = writeln!(
            out,
            "pgha_proxy_wait_seconds_sum {}",
            load(&h.sum_nanos) as f64 / 1e9
        );
        let _ = writeln!(
            out,
            "pgha_proxy_wait_seconds_count {}",
            count.max(cumulative)
        );

        out.push_str("# HELP pgha_proxy_transactions_total Transactions (or sessions) routed, per member and side.\n# TYPE pgha_proxy_transactions_total counter\n");
        for ((member, side), n) in self.transactions.lock().expect("transactions").iter() {
            let n = load(n);
            let _ = writeln!(
                out,
                "pgha_proxy_transactions_total{{member=\"{member}\",side=\"{side}\"}} {n}"
            );
        }
        out.push_str("# HELP pgha_proxy_routed_statements_total Statements (simple queries or extended-protocol batches) the auto listener routed, per member and reason.\n# TYPE pgha_proxy_routed_statements_total counter\n");
        for ((member, reason), n) in self.routed.lock().expect("routed").iter() {
            let n = load(n);
            let _ = writeln!(
                out,
                "pgha_proxy_routed_statements_total{{member=\"{member}\",reason=\"{reason}\"}} {n}"
            );
        }
        g(
            &mut out,
            "pgha_proxy_read_retries_total",
            "counter",
            "Read-only statements retried elsewhere after their replica failed before answering.",
            load(&self.read_retries_total),
        );
        out.push_str("# HELP pgha_proxy_server_connections Server connections per pool, in use or idle.\n# TYPE pgha_proxy_server_connections gauge\n");
        for p in pools {
            for (state, n) in [("active", p.in_use), ("idle", p.idle)] {
                let _ = writeln!(
                    out,
                    "pgha_proxy_server_connections{{member=\"{}\",user=\"{}\",database=\"{}\",state=\"{state}\"}} {n}",
                    p.key.target.member,
                    escape(&p.key.user),
                    escape(&p.key.database)
                );
            }
        }
        out
    }
}

/// Label values: backslash, quote and newline escaped.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
