//! The REST API each agent serves.
//!
//! Health endpoints follow Patroni's status-code semantics so that existing
//! HAProxy `option httpchk` configurations work unchanged; `/status` is
//! also how agents read each other's fresh WAL positions during a leader
//! race.

mod health;

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::agent::status::AgentStatus;
use crate::config::Config;
use crate::ha::PeerReport;
use crate::model::{Lsn, MemberName, PgRole, PgState, Timeline};

pub use health::{HealthCheck, health_status};

/// `GET /status`: this member as its agent sees it right now.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusReport {
    pub name: MemberName,
    pub role: PgRole,
    pub state: PgState,
    pub timeline: Option<Timeline>,
    pub wal_position: Option<Lsn>,
    pub priority: u32,
    pub nofailover: bool,
    pub leader: bool,
    pub lease_valid: bool,
    pub paused: bool,
    pub dcs_reachable: bool,
    pub last_decision: Option<String>,
    pub upstream: Option<MemberName>,
}

impl StatusReport {
    pub fn peer_report(&self) -> PeerReport {
        PeerReport {
            role: self.role,
            running: matches!(
                self.state,
                PgState::Running | PgState::Streaming | PgState::InRecovery
            ),
            timeline: self.timeline,
            wal_position: self.wal_position,
            priority: self.priority,
            nofailover: self.nofailover,
        }
    }

    fn from_status(s: &AgentStatus) -> Option<StatusReport> {
        let m = s.member.as_ref()?;
        Some(StatusReport {
            name: m.name.clone(),
            role: m.role,
            state: m.state,
            timeline: m.timeline,
            wal_position: s.wal_position,
            priority: m.priority,
            nofailover: m.nofailover,
            leader: s.lease_held,
            lease_valid: s.lease_valid,
            paused: s.paused,
            dcs_reachable: s.dcs_reachable,
            last_decision: s.last_decision.clone(),
            upstream: m.upstream.clone(),
        })
    }
}

#[derive(Clone)]
struct AppState {
    status: watch::Receiver<AgentStatus>,
    loop_wait_ms: u64,
    ttl_ms: u64,
}

fn json_error(code: StatusCode, message: &str) -> Response {
    (code, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn status(State(app): State<AppState>) -> Response {
    let s = app.status.borrow().clone();
    match StatusReport::from_status(&s) {
        Some(r) => Json(r).into_response(),
        None => json_error(StatusCode::SERVICE_UNAVAILABLE, "agent starting"),
    }
}

async fn check(app: AppState, check: HealthCheck) -> Response {
    let s = app.status.borrow().clone();
    let code = health_status(
        &s,
        check,
        crate::util::boottime_ms(),
        app.loop_wait_ms,
        app.ttl_ms,
    );
    let body = StatusReport::from_status(&s)
        .map(|r| serde_json::to_value(r).unwrap_or_default())
        .unwrap_or_else(|| serde_json::json!({ "state": "starting" }));
    (code, Json(body)).into_response()
}

/// What the API needs from the agent.
pub struct ApiContext {
    pub status: watch::Receiver<AgentStatus>,
    pub dcs: std::sync::Arc<dyn crate::dcs::Dcs>,
    pub commands: tokio::sync::mpsc::Sender<crate::agent::status::AgentCommand>,
    pub config: Config,
}

/// Binds the API and serves it on a background task.
pub async fn serve(ctx: ApiContext) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let addr: SocketAddr = ctx.config.api.listen;
    let app = AppState {
        status: ctx.status,
        loop_wait_ms: ctx.config.ha.loop_wait.as_millis() as u64,
        ttl_ms: ctx.config.ha.ttl.as_millis() as u64,
    };
    let router = Router::new()
        .route("/", get(status))
        .route("/status", get(status))
        .route(
            "/primary",
            get(|State(a): State<AppState>| check(a, HealthCheck::Primary)),
        )
        .route(
            "/leader",
            get(|State(a): State<AppState>| check(a, HealthCheck::Primary)),
        )
        .route(
            "/master",
            get(|State(a): State<AppState>| check(a, HealthCheck::Primary)),
        )
        .route(
            "/replica",
            get(|State(a): State<AppState>| check(a, HealthCheck::Replica)),
        )
        .route(
            "/read-only",
            get(|State(a): State<AppState>| check(a, HealthCheck::ReadOnly)),
        )
        .route(
            "/health",
            get(|State(a): State<AppState>| check(a, HealthCheck::Health)),
        )
        .route(
            "/liveness",
            get(|State(a): State<AppState>| check(a, HealthCheck::Liveness)),
        )
        .route(
            "/readiness",
            get(|State(a): State<AppState>| check(a, HealthCheck::Readiness)),
        )
        .fallback(|| async { json_error(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "REST API stopped");
        }
    }))
}
