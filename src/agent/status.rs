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
