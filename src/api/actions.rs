//! Actions: switchover, failover, restart, reinitialize, reload, pause,
//! resume and changes to the cluster-wide configuration.
//!
//! The authentication middleware has already run. Bodies are JSON objects
//! (an empty body counts as `{}`), at most [`super::BODY_LIMIT`] bytes,
//! and unknown fields are refused. Validation is done on a fresh DCS read
//! and follows `pgha switchover` / `pgha failover`: the checks themselves
//! are the CLI's ([`switchover_target_problem`], [`pick_target`]).
//!
//! Writes never overwrite a concurrent one: a switchover or failover
//! request is only created (409 while another is pending; `DELETE
//! /switchover` cancels one), and configuration changes are conditioned on
//! the revision read and retried from a fresh read ([`update_config`]).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::status::rfc3339_ms;
use super::{ApiError, AppState};
use crate::agent::status::{AgentCommand, AgentStatus};
use crate::cli::manage::{pending_request, pick_target, switchover_target_problem};
use crate::dcs::{
    ClusterConfig, ClusterView, DcsError, FailoverRequest, Revision, SyncMode, UpdateConfigError,
    update_config,
};
use crate::model::{MemberName, PgRole, PgState};
use crate::util::unix_ms;

/// How long a switchover or failover request waits for the new leader.
const LEADER_WAIT: Duration = Duration::from_secs(30);
/// How long an agent command may wait for the agent's loop to pick it up
/// and carry it out (a fast shutdown may take a while).
const COMMAND_WAIT: Duration = Duration::from_secs(90);
/// How long `/restart` waits for PostgreSQL to run again.
const RESTART_WAIT: Duration = Duration::from_secs(60);

fn is_json(content_type: &str) -> bool {
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Reads a request body as `T`: JSON only, empty means `{}`.
pub fn parse_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is larger than {} bytes",
                    super::BODY_LIMIT
                ),
            )
        } else {
            ApiError::bad_request(format!(
                "cannot read the request body: {}",
                rejection.body_text()
            ))
        }
    })?;
    let empty = body.iter().all(u8::is_ascii_whitespace);
    if !empty {
        match headers.get(header::CONTENT_TYPE).map(|v| v.to_str()) {
            Some(Ok(ct)) if is_json(ct) => {}
            None => {}
            _ => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "the request body must be JSON (Content-Type: application/json)",
                ));
            }
        }
    }
    if empty {
        return serde_json::from_value(Value::Object(Default::default()))
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")));
    }
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

/// Actions that take no parameters accept `{}` (or nothing) only.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParameters {}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SwitchoverBody {
    /// When given, must name the current leader.
    #[serde(default)]
    pub leader: Option<String>,
    /// Default: the healthiest streaming replica.
    #[serde(default)]
    pub candidate: Option<String>,
    /// RFC 3339 (`2026-01-31T02:00:00Z`, `2026-01-31T03:00:00+01:00`).
    #[serde(default)]
    pub scheduled_at: Option<String>,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FailoverBody {
    pub candidate: String,
    #[serde(default)]
    pub accept_data_loss: bool,
}

/// Parses an RFC 3339 time into Unix milliseconds.
pub fn parse_time(text: &str) -> Result<u64, String> {
    let err =
        || format!("scheduled_at {text:?}: expected an RFC 3339 time such as 2026-01-31T02:00:00Z");
    let t = text.trim();
    // humantime understands UTC only: apply a numeric offset ourselves.
    let (base, offset_ms): (&str, i64) = match t.len().checked_sub(6).map(|i| t.split_at(i)) {
        Some((base, off))
            if base.contains('T')
                && (off.starts_with('+') || off.starts_with('-'))
                && off.as_bytes()[3] == b':' =>
        {
            let h: i64 = off[1..3].parse().map_err(|_| err())?;
            let m: i64 = off[4..6].parse().map_err(|_| err())?;
            let sign = if off.starts_with('-') { -1 } else { 1 };
            (base, sign * (h * 3600 + m * 60) * 1000)
        }
        _ => (t, 0),
    };
    let time = humantime::parse_rfc3339_weak(base).map_err(|_| err())?;
    let ms = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| err())?
        .as_millis() as i64;
    u64::try_from(ms - offset_ms).map_err(|_| err())
}

/// Checks a switchover request against a fresh view and turns it into
/// the DCS record: pure, so it is unit-tested.
pub fn plan_switchover(
    view: &ClusterView,
    body: &SwitchoverBody,
    max_lag: u64,
    now_unix_ms: u64,
) -> Result<FailoverRequest, ApiError> {
    let Some(leader) = &view.leader else {
        return Err(ApiError::precondition(
            "the cluster has no leader; use POST /failover with a candidate instead",
        ));
    };
    if let Some(l) = &body.leader
        && l != leader.name.as_str()
    {
        return Err(ApiError::precondition(format!(
            "the leader is {}, not {l}",
            leader.name
        )));
    }
    refuse_when_pending(view)?;
    let target = match &body.candidate {
        Some(c) => {
            let name = MemberName::new(c.as_str());
            let Some(rec) = view.members.get(&name) else {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("no member named {c}"),
                ));
            };
            if let Some(problem) = switchover_target_problem(view, rec, max_lag) {
                return Err(ApiError::precondition(format!(
                    "refusing to switch over: {problem}"
                )));
            }
            name
        }
        None => pick_target(view, max_lag).ok_or_else(|| {
            ApiError::precondition("no healthy streaming replica to switch over to")
        })?,
    };
    let not_before = match &body.scheduled_at {
        Some(t) => {
            let at = parse_time(t).map_err(ApiError::bad_request)?;
            if at + 1000 < now_unix_ms {
                return Err(ApiError::bad_request(format!(
                    "scheduled_at {t:?} is in the past"
                )));
            }
            Some(at)
        }
        None => None,
    };
    Ok(FailoverRequest {
        from: Some(leader.name.clone()),
        to: Some(target),
        not_before_unix_ms: not_before,
        accept_data_loss: false,
        requested_at_unix_ms: now_unix_ms,
    })
}

/// 409 naming the pending request: a new one must never silently replace
/// it (the operator who made it would not know).
fn refuse_when_pending(view: &ClusterView) -> Result<(), ApiError> {
    match pending_request(view) {
        Some(pending) => Err(pending_conflict(&pending)),
        None => Ok(()),
    }
}

fn pending_conflict(pending: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        format!(
            "a switchover or failover is already pending ({pending}); wait for it or cancel it with DELETE /switchover"
        ),
    )
}

/// Checks a failover request like `pgha failover`: pure.
pub fn plan_failover(
    view: &ClusterView,
    body: &FailoverBody,
    now_unix_ms: u64,
) -> Result<FailoverRequest, ApiError> {
    refuse_when_pending(view)?;
    let target = MemberName::new(body.candidate.as_str());
    let Some(rec) = view.members.get(&target) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no member named {}", body.candidate),
        ));
    };
    if let Some(leader) = view.leader_record()
        && leader.state == PgState::Running
    {
        return Err(ApiError::precondition(format!(
            "{} is a healthy leader; use POST /switchover for a planned handover",
            leader.name
        )));
    }
    if !matches!(
        rec.state,
        PgState::Running | PgState::Streaming | PgState::InRecovery
    ) {
        return Err(ApiError::precondition(format!(
            "{target} is not running (state: {})",
            rec.state
        )));
    }
    Ok(FailoverRequest {
        from: view.leader.as_ref().map(|l| l.name.clone()),
        to: Some(target),
        not_before_unix_ms: None,
        accept_data_loss: body.accept_data_loss,
        requested_at_unix_ms: now_unix_ms,
    })
}

async fn fresh_view(app: &AppState) -> Result<ClusterView, ApiError> {
    app.dcs.read_cluster().await.map_err(|e| {
        ApiError::unavailable(format!(
            "cannot read the cluster state: {}",
            crate::util::chain(&e)
        ))
    })
}

/// Polls the DCS until `target` is the running leader.
async fn wait_for_leader(app: &AppState, target: &MemberName) -> bool {
    let deadline = tokio::time::Instant::now() + LEADER_WAIT;
    while tokio::time::Instant::now() < deadline {
        if let Ok(v) = app.dcs.read_cluster().await
            && v.leader.as_ref().is_some_and(|l| &l.name == target)
            && v.leader_record()
                .is_some_and(|r| r.role == PgRole::Primary && r.state == PgState::Running)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Writes the request and waits for its target to lead.
async fn request_and_wait(
    app: &AppState,
    req: FailoverRequest,
    what: &str,
) -> Result<Response, ApiError> {
    // Create only: the plan checked that nothing was pending, and a
    // request recorded since then wins.
    match app.dcs.put_failover(&req, Revision::ABSENT).await {
        Ok(_) => {}
        Err(DcsError::Conflict { .. }) => {
            let view = fresh_view(app).await?;
            return Err(pending_conflict(
                &pending_request(&view).unwrap_or_else(|| "since withdrawn; retry".into()),
            ));
        }
        Err(e) => {
            return Err(ApiError::unavailable(format!(
                "cannot record the {what}: {}",
                crate::util::chain(&e)
            )));
        }
    }
    let target = req.to.clone().unwrap_or_else(|| MemberName::new(""));
    let from = req.from.as_ref().map(|n| n.to_string());
    if let Some(at) = req.not_before_unix_ms.filter(|at| *at > unix_ms()) {
        tracing::info!(from = ?from, to = %target, at = %rfc3339_ms(at), "{what} scheduled through the API");
        let body = json!({
            "message": format!("{what} to {target} scheduled at {}", rfc3339_ms(at)),
            "from": from, "to": target, "scheduled_at": rfc3339_ms(at),
        });
        return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
    }
    tracing::info!(from = ?from, to = %target, "{what} requested through the API");
    let started = std::time::Instant::now();
    if wait_for_leader(app, &target).await {
        let body = json!({
            "message": format!("{target} is the leader"),
            "from": from, "to": target, "leader": target,
            "duration_ms": started.elapsed().as_millis() as u64,
        });
        Ok(Json(body).into_response())
    } else {
        Err(ApiError::unavailable(format!(
            "{target} did not become the leader within {} s; see GET /cluster and the agents' logs",
            LEADER_WAIT.as_secs()
        )))
    }
}

/// `POST /switchover`.
pub async fn switchover(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: SwitchoverBody = parse_body(&headers, body)?;
    let view = fresh_view(&app).await?;
    let req = plan_switchover(
        &view,
        &body,
        app.config.ha.maximum_lag_on_failover,
        unix_ms(),
    )?;
    request_and_wait(&app, req, "switchover").await
}

/// `POST /failover`.
pub async fn failover(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: FailoverBody = parse_body(&headers, body)?;
    let view = fresh_view(&app).await?;
    let req = plan_failover(&view, &body, unix_ms())?;
    request_and_wait(&app, req, "failover").await
}

/// `DELETE /switchover`: cancels the pending switchover or failover
/// request (the one read: a request recorded meanwhile stays).
pub async fn cancel_request(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let NoParameters {} = parse_body(&headers, body)?;
    let view = fresh_view(&app).await?;
    let Some(pending) = pending_request(&view) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no switchover or failover is pending",
        ));
    };
    match app.dcs.clear_failover(view.failover_revision).await {
        Ok(()) => {
            tracing::info!(request = %pending, "pending switchover/failover cancelled through the API");
            Ok(Json(json!({
                "message": format!("cancelled the pending request ({pending})"),
                "cancelled": view.failover,
            }))
            .into_response())
        }
        Err(DcsError::Conflict { .. }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "the pending request changed while cancelling it (it was {pending}); see GET /cluster and retry"
            ),
        )),
        Err(e) => Err(ApiError::unavailable(format!(
            "cannot cancel the pending request: {}",
            crate::util::chain(&e)
        ))),
    }
}

/// Hands a command to the agent loop and waits for its answer.
async fn command(
    app: &AppState,
    make: impl FnOnce(oneshot::Sender<Result<(), String>>) -> AgentCommand,
) -> Result<(), ApiError> {
    let (tx, rx) = oneshot::channel();
    app.commands.try_send(make(tx)).map_err(|e| match e {
        tokio::sync::mpsc::error::TrySendError::Full(_) => {
            ApiError::unavailable("the agent has other API requests queued; retry later")
        }
        tokio::sync::mpsc::error::TrySendError::Closed(_) => {
            ApiError::unavailable("the agent is shutting down")
        }
    })?;
    match tokio::time::timeout(COMMAND_WAIT, rx).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(ApiError::new(StatusCode::CONFLICT, e)),
        Ok(Err(_)) => Err(ApiError::unavailable("the agent dropped the request")),
        Err(_) => Err(ApiError::unavailable(format!(
            "the agent did not carry the request out within {} s",
            COMMAND_WAIT.as_secs()
        ))),
    }
}

fn refuse_when_paused(app: &AppState, what: &str) -> Result<(), ApiError> {
    if app.status.borrow().paused {
        return Err(paused_conflict(what));
    }
    Ok(())
}

fn paused_conflict(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        format!(
            "the cluster is paused and agents do not start PostgreSQL while paused, so {what} would leave it down; POST /resume first"
        ),
    )
}

/// Why `/restart` must not go ahead on this member: pure.
pub fn restart_problem(s: &AgentStatus) -> Option<ApiError> {
    if s.paused {
        return Some(paused_conflict("a restart"));
    }
    // In synchronous mode the agent treats a stopped primary as crashed
    // (it may hold commits it never acknowledged) and hands leadership to
    // a synchronous standby instead of starting it again.
    let sync_protected = s.view.as_ref().is_some_and(|v| {
        v.config.synchronous_mode != SyncMode::Off
            && v.sync
                .as_ref()
                .is_some_and(|r| !r.degraded && !r.members.is_empty())
    });
    if s.lease_held && sync_protected {
        return Some(ApiError::new(
            StatusCode::CONFLICT,
            "restarting the leader in synchronous mode would fail over to a synchronous standby; POST /switchover first, then restart this member",
        ));
    }
    None
}

/// `POST /restart`: restart the local PostgreSQL in its current role.
pub async fn restart(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let NoParameters {} = parse_body(&headers, body)?;
    if let Some(problem) = restart_problem(&app.status.borrow()) {
        return Err(problem);
    }
    tracing::info!("restart requested through the API");
    let mut status = app.status.clone();
    command(&app, |reply| AgentCommand::Restart { reply }).await?;
    // The agent answers at the start of a loop, once PostgreSQL is
    // stopped; that loop publishes after `before`, and it or the next
    // ones start PostgreSQL again.
    let before = status.borrow_and_update().loop_count;
    let up = |s: &AgentStatus| {
        s.member.as_ref().is_some_and(|m| {
            matches!(
                m.state,
                PgState::Running | PgState::Streaming | PgState::InRecovery
            )
        })
    };
    let back = tokio::time::timeout(
        RESTART_WAIT,
        status.wait_for(|s| s.loop_count > before && up(s)),
    )
    .await;
    match back {
        Ok(Ok(_)) => Ok(Json(json!({"message": "PostgreSQL restarted"})).into_response()),
        _ => {
            let state = app
                .status
                .borrow()
                .member
                .as_ref()
                .map(|m| m.state.to_string());
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({
                    "message": format!("PostgreSQL was stopped but is not running again yet (state: {})", state.as_deref().unwrap_or("unknown")),
                })),
            )
                .into_response())
        }
    }
}

/// `POST /reinitialize`: wipe this replica and clone the leader again.
pub async fn reinitialize(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let NoParameters {} = parse_body(&headers, body)?;
    if app.status.borrow().lease_held {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "refusing to reinitialize the leader; switch over first",
        ));
    }
    refuse_when_paused(&app, "wiping the data directory")?;
    tracing::warn!("reinitialize requested through the API");
    command(&app, |reply| AgentCommand::Reinitialize { reply }).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(
            json!({"message": "data directory removed; cloning from the leader (see GET /status)"}),
        ),
    )
        .into_response())
}

/// `POST /reload`: re-render the configuration files and reload PostgreSQL.
pub async fn reload(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let NoParameters {} = parse_body(&headers, body)?;
    tracing::info!("reload requested through the API");
    command(&app, |reply| AgentCommand::Reload { reply }).await?;
    Ok(Json(json!({"message": "configuration reloaded"})).into_response())
}

/// `POST /failsafe`: a leader that cannot renew its lease in etcd asks
/// this member to confirm it (docs/architecture.md, S2a). 200 with the
/// promise when confirmed: this member then takes no leader key for one
/// TTL. 409 when it refuses (it leads or races itself, or sees another
/// leader); the leader then demotes before its lease runs out.
pub async fn failsafe(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: crate::agent::failsafe::FailsafeRequest = parse_body(&headers, body)?;
    let me = &app.config.name;
    let ttl_ms = app.config.ha.ttl.as_millis() as u64;
    let now = crate::util::boottime_ms();
    match app.failsafe.confirm(me, &request.leader, now, ttl_ms) {
        Ok(promise) => {
            tracing::debug!(leader = %request.leader, "confirmed a failsafe leader");
            Ok(Json(crate::agent::failsafe::FailsafeConfirmation {
                member: me.clone(),
                leader: promise.leader,
                promise_ms: promise.until_ms.saturating_sub(now),
            })
            .into_response())
        }
        Err(refusal) => {
            tracing::warn!(leader = %request.leader, refusal = %refusal, "refused to confirm a failsafe leader");
            Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("not confirming {}: {refusal}", request.leader),
            ))
        }
    }
}

/// 400 for an invalid edit, 409 when other writers kept winning, 503 when
/// etcd cannot be reached.
fn config_write_error(e: UpdateConfigError) -> ApiError {
    match e {
        UpdateConfigError::Invalid(message) => ApiError::bad_request(message),
        UpdateConfigError::Dcs(e @ DcsError::Conflict { .. }) => ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "other writers kept changing the cluster configuration ({e}); nothing was written, retry"
            ),
        ),
        UpdateConfigError::Dcs(e) => ApiError::unavailable(format!(
            "cannot write the cluster configuration: {}",
            crate::util::chain(&e)
        )),
    }
}

async fn set_paused(app: &AppState, paused: bool) -> Result<Response, ApiError> {
    let update = update_config(app.dcs.as_ref(), |c| {
        Ok(ClusterConfig {
            paused,
            ..c.clone()
        })
    })
    .await
    .map_err(config_write_error)?;
    let changed = update.changed();
    if changed {
        tracing::info!(
            paused,
            "cluster {} through the API",
            if paused { "paused" } else { "resumed" }
        );
    }
    let message = match (paused, changed) {
        (true, true) => "cluster paused: no automatic action until POST /resume",
        (true, false) => "the cluster was already paused",
        (false, true) => "cluster resumed",
        (false, false) => "the cluster was not paused",
    };
    Ok(Json(json!({"message": message, "paused": paused})).into_response())
}

/// `POST /pause`.
pub async fn pause(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let NoParameters {} = parse_body(&headers, body)?;
    set_paused(&app, true).await
}

/// `POST /resume`.
pub async fn resume(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let NoParameters {} = parse_body(&headers, body)?;
    set_paused(&app, false).await
}

/// The text form [`ClusterConfig::set`] takes (as `pgha config set`).
fn text_value(key: &str, value: &Value) -> Result<String, String> {
    match value {
        Value::Bool(b) => Ok(b.to_string()),
        Value::Number(n) => Ok(n.to_string()),
        Value::String(s) => Ok(s.clone()),
        // null removes a server parameter (`set` takes "" as removal).
        Value::Null if key.starts_with(ClusterConfig::PARAMETER_PREFIX) => Ok(String::new()),
        Value::Null => {
            // null (RFC 7396: remove) restores the default.
            let defaults =
                serde_json::to_value(ClusterConfig::default()).map_err(|e| e.to_string())?;
            match defaults.get(key) {
                Some(v) if !v.is_null() => text_value(key, v),
                _ => Err(format!("{key}: has no default to restore")),
            }
        }
        Value::Array(_) | Value::Object(_) => {
            Err(format!("{key}: must be a string, number or boolean"))
        }
    }
}

/// Applies a JSON merge patch (RFC 7396) to the dynamic configuration:
/// every key goes through [`ClusterConfig::set`], the validation
/// `pgha config set` uses, and nothing is applied unless all are valid.
/// `null` restores a key's default.
pub fn patch_config(current: &ClusterConfig, patch: &Value) -> Result<ClusterConfig, String> {
    let Value::Object(entries) = patch else {
        return Err("the body must be a JSON object of configuration keys".into());
    };
    let mut new = current.clone();
    let mut errors = Vec::new();
    for (key, value) in entries {
        if let Err(e) = text_value(key, value).and_then(|text| new.set(key, &text)) {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        Ok(new)
    } else {
        Err(errors.join("; "))
    }
}

/// `PATCH /config`: JSON merge of the cluster-wide configuration.
pub async fn patch_config_handler(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let patch: Value = parse_body(&headers, body)?;
    // Values are checked without the current configuration: a bad request
    // is 400 even when etcd is down.
    patch_config(&ClusterConfig::default(), &patch).map_err(ApiError::bad_request)?;
    // The patch names the keys it changes, so applying it again to a
    // configuration someone else changed meanwhile keeps both changes.
    let update = update_config(app.dcs.as_ref(), |current| patch_config(current, &patch))
        .await
        .map_err(config_write_error)?;
    if update.changed() {
        tracing::info!(config = ?update.after, "cluster configuration changed through the API");
    }
    Ok(Json(update.after).into_response())
}

#[cfg(test)]
#[path = "actions_test.rs"]
mod tests;
