//! The REST API each agent serves (reference: `docs/api.md`).
//!
//! - [`health`]: Patroni-compatible health checks for load balancers
//!   (`/` and `/primary`, `/replica?lag=10MB`, `/read-only`, `/sync`, `/async`,
//!   `/health`, `/liveness`, `/readiness`).
//! - [`status`]: `/status` (also how agents read each other's fresh WAL
//!   positions during a leader race), `/cluster`, `/history`, `/config`.
//! - [`metrics`]: `/metrics` in Prometheus text format.
//! - [`actions`]: switchover (and its cancellation), failover, restart,
//!   reinitialize, reload, pause, resume, `PATCH /config`.
//! - [`auth`]: who may call what; [`tls`]: optional HTTPS.
//! - [`server`]: connections, with the timeouts and the connection limit
//!   that keep slow clients from exhausting the agent's descriptors.
//!
//! Every error is a JSON object `{"error": "..."}` with a 4xx status for
//! the client's mistakes and 503 when etcd or the agent cannot help now.

mod actions;
mod auth;
mod health;
mod metrics;
mod server;
mod status;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{MethodRouter, get, post};
use futures_util::StreamExt;
use tokio::sync::watch;

use crate::agent::status::{AgentCommand, AgentStatus};
use crate::config::Config;

pub use health::{CheckQuery, HealthCheck, health_status, parse_size};
pub use status::StatusReport;

/// The largest request body accepted (413 beyond).
pub const BODY_LIMIT: usize = 64 * 1024;

#[derive(Clone)]
pub(crate) struct AppState {
    status: watch::Receiver<AgentStatus>,
    dcs: Arc<dyn crate::dcs::Dcs>,
    commands: tokio::sync::mpsc::Sender<AgentCommand>,
    config: Arc<Config>,
    failsafe: crate::agent::failsafe::Failsafe,
    /// The embedded proxy, whose counters `/metrics` appends.
    proxy: Option<Arc<crate::proxy::Shared>>,
}

/// An error answer: a status code and a message, sent as
/// `{"error": message}`.
#[derive(Debug, PartialEq, Eq)]
pub struct ApiError {
    pub code: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PRECONDITION_FAILED, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_error(self.code, &self.message)
    }
}

fn json_error(code: StatusCode, message: &str) -> Response {
    (code, Json(serde_json::json!({ "error": message }))).into_response()
}

fn too_large() -> Response {
    json_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("the request body is larger than {BODY_LIMIT} bytes"),
    )
}

/// Middleware: reads the whole request body (at most [`BODY_LIMIT`])
/// within `api.body_read_timeout` of the head, or answers 408 and closes
/// the connection; a client trickling its body cannot keep a request,
/// and its descriptor, open for longer. Runs after authentication, so a
/// refused request's body is never read.
async fn read_body(
    State(timeout): State<std::time::Duration>,
    req: Request,
    next: Next,
) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    let collect = async {
        let mut stream = body.into_data_stream();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| Some(e.to_string()))?;
            if bytes.len() + chunk.len() > BODY_LIMIT {
                return Err(None::<String>);
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    };
    let bytes = match tokio::time::timeout(timeout, collect).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(None)) => return too_large(),
        Ok(Err(Some(e))) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the request body: {e}"),
            );
        }
        Err(_) => {
            let mut resp = json_error(
                StatusCode::REQUEST_TIMEOUT,
                &format!(
                    "the request body did not arrive within {} (api.body_read_timeout)",
                    humantime::format_duration(timeout)
                ),
            );
            // The rest of the body may still come: the connection cannot
            // carry another request.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

async fn not_found() -> Response {
    json_error(StatusCode::NOT_FOUND, "no such endpoint; see docs/api.md")
}

async fn method_not_allowed() -> Response {
    json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this endpoint",
    )
}

/// GET (and so HEAD) plus OPTIONS, with the same handler.
fn read<H, T>(handler: H) -> MethodRouter<AppState>
where
    H: axum::handler::Handler<T, AppState> + Clone,
    T: 'static,
{
    get(handler.clone())
        .options(handler)
        .fallback(method_not_allowed)
}

/// Every route, with authentication and the body limit.
pub(crate) fn router(app: AppState) -> Router {
    let creds = Arc::new(auth::Credentials::from_config(&app.config.api));
    let mut r = Router::new()
        .route("/status", read(status::status))
        .route("/cluster", read(status::cluster))
        .route("/history", read(status::history))
        .route(
            "/config",
            read(status::config).patch(actions::patch_config_handler),
        )
        .route("/metrics", read(metrics::metrics));
    for &(path, check) in HealthCheck::PATHS {
        let h = move |State(a): State<AppState>,
                      q: Result<Query<Vec<(String, String)>>, QueryRejection>| {
            health::handle(a, check, q)
        };
        r = r.route(path, read(h));
    }
    let action = |m: MethodRouter<AppState>| m.fallback(method_not_allowed);
    r.route(
        "/switchover",
        action(post(actions::switchover).delete(actions::cancel_request)),
    )
    .route("/failover", action(post(actions::failover)))
    .route("/restart", action(post(actions::restart)))
    .route("/reinitialize", action(post(actions::reinitialize)))
    .route("/reload", action(post(actions::reload)))
    .route("/pause", action(post(actions::pause)))
    .route("/resume", action(post(actions::resume)))
    .route("/failsafe", action(post(actions::failsafe)))
    .fallback(not_found)
    .layer(axum::middleware::from_fn_with_state(
        app.config.api.limits.body_read_timeout,
        read_body,
    ))
    .layer(axum::middleware::from_fn_with_state(creds, auth::require))
    .layer(DefaultBodyLimit::max(BODY_LIMIT))
    .with_state(app)
}

/// What the API needs from the agent.
pub struct ApiContext {
    pub status: watch::Receiver<AgentStatus>,
    pub dcs: Arc<dyn crate::dcs::Dcs>,
    pub commands: tokio::sync::mpsc::Sender<AgentCommand>,
    pub config: Config,
    pub failsafe: crate::agent::failsafe::Failsafe,
    /// The proxy this agent runs (a `[proxy]` table), if any.
    pub proxy: Option<Arc<crate::proxy::Shared>>,
}

/// Binds the API (HTTPS when `[api.tls]` is set) and serves it on a
/// background task. Fails when the address is taken or the TLS files are
/// unusable.
pub async fn serve(ctx: ApiContext) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let addr: SocketAddr = ctx.config.api.listen;
    let acceptor = ctx.config.api.tls.as_ref().map(tls::acceptor).transpose()?;
    if ctx.config.api.basic_auth.is_none() && ctx.config.api.token.is_none() {
        tracing::warn!(
            "no API credentials configured (api.username/api.password or api.token): actions through the REST API are disabled"
        );
    }
    let app = AppState {
        status: ctx.status,
        dcs: ctx.dcs,
        commands: ctx.commands,
        config: Arc::new(ctx.config),
        failsafe: ctx.failsafe,
        proxy: ctx.proxy,
    };
    let limits = app.config.api.limits;
    warn_if_descriptors_are_short(limits.max_connections);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    Ok(tokio::spawn(server::run(
        listener,
        acceptor,
        router(app),
        limits,
    )))
}

/// Descriptors the agent needs besides API clients: etcd, PostgreSQL,
/// peers' APIs, logs, pipes.
const RESERVED_DESCRIPTORS: u64 = 128;

/// `api.max_connections` only protects the agent if the process may open
/// that many descriptors and more; say so at start when it may not.
fn warn_if_descriptors_are_short(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let needed = max_connections as u64 + RESERVED_DESCRIPTORS;
    let open_files = limit.rlim_cur;
    if open_files < needed {
        tracing::warn!(
            open_files_limit = open_files,
            max_connections,
            "the open-files limit (ulimit -n) leaves too few descriptors beside api.max_connections; raise it to at least {needed} or lower api.max_connections"
        );
    }
}

#[cfg(test)]
mod router_test;
