//! Health-check semantics, as a pure function of the agent's status.
//!
//! Status codes match Patroni's: 200 when the member is fit for the asked
//! role, 503 otherwise, so HAProxy's `http-check expect status 200` routes
//! correctly.

use axum::http::StatusCode;

use crate::agent::status::AgentStatus;
use crate::model::{PgRole, PgState};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthCheck {
    /// The lease-holding, writable leader.
    Primary,
    /// A running replica.
    Replica,
    /// Leader or replica: anything that serves reads.
    ReadOnly,
    /// PostgreSQL is up.
    Health,
    /// The agent's loop is alive.
    Liveness,
    /// Ready to serve its role.
    Readiness,
}

pub fn health_status(
    s: &AgentStatus,
    check: HealthCheck,
    now_ms: u64,
    loop_wait_ms: u64,
    ttl_ms: u64,
) -> StatusCode {
    let ok = |b: bool| {
        if b {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        }
    };
    let Some(m) = &s.member else {
        return StatusCode::SERVICE_UNAVAILABLE;
    };
    let is_primary =
        m.role == PgRole::Primary && m.state == PgState::Running && s.lease_held && s.lease_valid;
    let is_replica =
        m.role == PgRole::Replica && matches!(m.state, PgState::Streaming | PgState::InRecovery);
    let pg_up = matches!(
        m.state,
        PgState::Running | PgState::Streaming | PgState::InRecovery
    );
    match check {
        HealthCheck::Primary => ok(is_primary),
        HealthCheck::Replica => ok(is_replica),
        HealthCheck::ReadOnly => ok(is_primary || is_replica),
        HealthCheck::Health => ok(pg_up),
        // A loop that has not finished within its period plus a TTL is hung.
        HealthCheck::Liveness => ok(now_ms.saturating_sub(s.last_loop_ms) <= loop_wait_ms + ttl_ms),
        HealthCheck::Readiness => ok(is_primary || (is_replica && m.state == PgState::Streaming)),
    }
}
