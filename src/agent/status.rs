//! What the agent shows the world: its latest member record, decision and
//! lease state. The loop publishes it on a `watch` channel; the API reads it.

use serde::Serialize;

use crate::dcs::ClusterView;
use crate::model::{Lsn, MemberRecord};

#[derive(Clone, Debug, Default, Serialize)]
pub struct AgentStatus {
    /// `None` until the first loop completes.
    pub member: Option<MemberRecord>,
    pub lease_held: bool,
    pub lease_valid: bool,
    pub dcs_reachable: bool,
    pub paused: bool,
    pub last_decision: Option<String>,
    pub last_action: Option<String>,
    /// The furthest WAL position of the local server.
    pub wal_position: Option<Lsn>,
    pub loop_count: u64,
    #[serde(skip)]
    pub view: Option<ClusterView>,
    /// `CLOCK_BOOTTIME` ms at the end of the last loop (liveness).
    pub last_loop_ms: u64,
    pub renewal_latency_ms: Option<u64>,
    /// Duration of each HA loop (observe + decide + execute + publish).
    pub loop_duration: Histogram,
    /// Round trip of each successful lease renewal.
    pub renewal_latency: Histogram,
    /// Times the leader key changed hands, as seen by this agent.
    pub leader_changes: u64,
    /// Name of the leader in the last view.
    pub leader: Option<crate::model::MemberName>,
    /// `pg_stat_archiver` of the local server, while it runs.
    pub archive: Option<crate::postgres::observe::ArchiveStatus>,
    /// Failsafe mode as this member sees it.
    pub failsafe: Option<super::failsafe::FailsafeStatus>,
    /// `[vip]`: the floating address on this node, when configured.
    pub vip: Option<super::vip::VipStatus>,
    /// `backup.schedule`: this agent's scheduled backups, when configured.
    pub scheduled_backup: Option<ScheduledBackupStatus>,
}

/// What this agent's scheduled base backups did since it started (for
/// `/metrics`; each agent counts the backups it ran while leading).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScheduledBackupStatus {
    /// A scheduled backup of this agent is in progress.
    pub running: bool,
    /// Unix seconds when the last successful one completed.
    pub last_success_unix_s: Option<u64>,
    /// How long it took, up to its last WAL segment archived.
    pub last_duration_s: Option<f64>,
    /// Scheduled backups that failed, including those cancelled for
    /// running longer than `backup.schedule_timeout` (those cancelled on
    /// losing the leader key are not counted: the next leader takes the
    /// slot).
    pub failures: u64,
}

/// Requests the REST API hands to the agent loop; each is carried out at
/// the start of the next loop, by the executor, like any other action.
#[derive(Debug)]
pub enum AgentCommand {
    /// Restart PostgreSQL in its current role.
    Restart {
        reply: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
    /// Wipe this replica's data directory and clone the leader again.
    Reinitialize {
        reply: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
    /// Re-render the configuration files and reload PostgreSQL.
    Reload {
        reply: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
}

/// A cumulative histogram with fixed buckets (milliseconds), in the shape
/// Prometheus expects: counts per upper bound, plus sum and count.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Histogram {
    /// Upper bounds in ms; the implicit last bucket is +Inf.
    pub bounds_ms: Vec<f64>,
    /// Observations `<=` each bound (not cumulative; summed when rendered).
    pub counts: Vec<u64>,
    pub sum_ms: f64,
    pub count: u64,
}

impl Histogram {
    pub fn with_bounds(bounds_ms: &[f64]) -> Self {
        Histogram {
            bounds_ms: bounds_ms.to_vec(),
            counts: vec![0; bounds_ms.len()],
            sum_ms: 0.0,
            count: 0,
        }
    }

    /// Buckets suited to loop and etcd round-trip times.
    pub fn latency() -> Self {
        Self::with_bounds(&[
            1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
        ])
    }

    pub fn observe(&mut self, ms: f64) {
        if let Some(i) = self.bounds_ms.iter().position(|b| ms <= *b) {
            self.counts[i] += 1;
        }
        self.sum_ms += ms;
        self.count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets() {
        let mut h = Histogram::with_bounds(&[1.0, 10.0]);
        for v in [0.5, 1.0, 5.0, 50.0] {
            h.observe(v);
        }
        assert_eq!(h.counts, vec![2, 1]);
        assert_eq!(h.count, 4);
        assert_eq!(h.sum_ms, 56.5);
    }
}
