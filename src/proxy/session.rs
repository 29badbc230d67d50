//! One logged-in client: the message loop between it and the server
//! connection it holds (for a transaction, or for its session).
//!
//! The loop reads both sides at once (`select!` over cancel-safe reads),
//! so pipelined extended-protocol batches, `Flush`, COPY in and out,
//! notices and notifications all flow as they come. The proxy only looks
//! at the few messages it must: `Parse`/`Bind`/`Describe`/`Close` (to carry
//! named statements across server connections), `Sync`/`Query` and
//! `ReadyForQuery` (to know when a transaction ends), and `ErrorResponse`.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::watch;
use tokio::time::Instant;

use super::cancel::{CancelKey, CancelTarget};
use super::codec::{self, Frame, Severity};
use super::conn::{Conn, ConnError, Stream};
use super::pool::{AcquireError, Lease, Pool, PoolKey};
use super::prepared::{self, Statement};
use super::route::{self, Routes, Rw, Target};
use super::scram::ScramKeys;
use super::server::Credentials;
use super::{PoolMode, Shared};

/// Which listener the client came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Rw,
    Ro,
    /// Routes each statement (`auto.rs`).
    Auto,
}

impl Side {
    pub fn label(self) -> &'static str {
        match self {
            Side::Rw => "rw",
            Side::Ro => "ro",
            Side::Auto => "auto",
        }
    }
}

/// Bookkeeping for the responses to one `Sync` (or `Query`): which
/// `ParseComplete`/`CloseComplete` answer the proxy's own messages and
/// must not reach the client.
#[derive(Default)]
struct Batch {
    parse: VecDeque<bool>,
    close: VecDeque<bool>,
    /// Server statement names parsed in this batch: unknown again if it fails.
    parsed: Vec<String>,
}

pub struct Session {
    shared: Arc<Shared>,
    side: Side,
    client: Conn<Box<dyn Stream>>,
    user: String,
    database: String,
    keys: ScramKeys,
    server: Option<Lease>,
    statements: HashMap<String, Statement>,
    batches: VecDeque<Batch>,
    pending_syncs: usize,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    /// Transaction status of the last ReadyForQuery.
    status: u8,
    /// After an error the proxy raised itself mid-batch: drop client
    /// messages up to the next Sync, as a server would.
    discarding: bool,
    /// When a switchover drain started while this client was in a
    /// transaction: cancel it at this instant.
    drain_deadline: Option<Instant>,
    client_out: BytesMut,
    server_out: BytesMut,
    routes: watch::Receiver<Arc<Routes>>,
    /// Resolves on the next change of the routes. Kept across loop
    /// iterations: a fresh `changed()` per iteration would lock the
    /// channel's waiter list twice per message, shared by every client.
    routes_changed: RoutesChanged,
    cancel: CancelKey,
    /// The pools of the last few targets, kept between transactions (the
    /// auto listener alternates between members).
    pools: Vec<(Target, Arc<Pool>)>,
    /// The transaction counter of the last member used.
    counter: Option<(crate::model::MemberName, Arc<AtomicU64>)>,
    /// The auto listener's per-client routing state.
    auto: auto::AutoState,
}

mod auto;

type RoutesChanged = Pin<Box<dyn Future<Output = watch::Receiver<Arc<Routes>>> + Send>>;

fn routes_changed(mut rx: watch::Receiver<Arc<Routes>>) -> RoutesChanged {
    Box::pin(async move {
        if rx.changed().await.is_err() {
            // The watch task is gone (the proxy is stopping): no more
            // changes will come.
            std::future::pending::<()>().await;
        }
        rx
    })
}

#[derive(Debug, thiserror::Error)]
enum End {
    #[error("client disconnected")]
    ClientGone,
    #[error("client connection failed")]
    Client(#[source] ConnError),
    /// The client was told why (a FATAL error); just close.
    #[error("{0}")]
    Told(String),
}

impl Session {
    /// Finishes the login: gets a server connection (which also proves
    /// the proxy can log in as this user), shows the client its
    /// parameters and the proxy's cancel key.
    pub async fn start(
        shared: Arc<Shared>,
        side: Side,
        client: Conn<Box<dyn Stream>>,
        user: String,
        database: String,
        keys: ScramKeys,
    ) -> Result<Option<Session>, ConnError> {
        let cancel = shared.cancels.register();
        let routes = shared.routes.clone();
        let mut changes = shared.routes.clone();
        changes.mark_unchanged();
        let mut s = Session {
            shared,
            side,
            client,
            user,
            database,
            keys,
            server: None,
            statements: HashMap::new(),
            batches: VecDeque::from([Batch::default()]),
            pending_syncs: 0,
            unsynced: false,
            status: b'I',
            discarding: false,
            drain_deadline: None,
            client_out: BytesMut::new(),
            server_out: BytesMut::new(),
            routes,
            routes_changed: routes_changed(changes),
            cancel,
            pools: Vec::new(),
            counter: None,
            auto: auto::AutoState::default(),
        };
        match s.acquire().await {
            Ok(lease) => {
                let mut out = BytesMut::new();
                for (name, value) in &lease.server().params {
                    codec::parameter_status(&mut out, name, value);
                }
                codec::backend_key_data(&mut out, s.cancel.process_id, s.cancel.secret_key);
                codec::ready_for_query(&mut out, b'I');
                s.take_server(lease);
                if s.shared.cfg.pool_mode == PoolMode::Transaction {
                    s.release_server();
                }
                s.client.send(&out).await?;
                Ok(Some(s))
            }
            Err(message) => {
                let mut out = BytesMut::new();
                codec::error_response(&mut out, Severity::Fatal, "08006", &message);
                let _ = s.client.send(&out).await;
                Ok(None)
            }
        }
    }

    pub async fn run(mut self) {
        let end = self.main_loop().await;
        match &end {
            End::ClientGone | End::Told(_) => {}
            End::Client(e) => tracing::debug!(error = %e, "client connection ended"),
        }
        if let Some(lease) = self.server.take() {
            self.cancel.set(None);
            let clean = self.status == b'I' && self.pending_syncs == 0 && !self.unsynced;
            if clean && matches!(end, End::ClientGone) {
                let shared = self.shared.clone();
                let session_mode = shared.cfg.pool_mode == PoolMode::Session;
                tokio::spawn(async move { reset_and_release(shared, lease, session_mode).await });
            }
            // Otherwise dropped: closing the connection ends whatever the
            // client left open on the server.
        }
    }

    async fn main_loop(&mut self) -> End {
        loop {
            // Everything already buffered from the server, then from the
            // client; then write both ways in one go each.
            loop {
                let frame = match self
                    .server
                    .as_mut()
                    .map(|l| l.server_mut().conn.try_frame())
                {
                    Some(Ok(Some(f))) => f,
                    Some(Err(e)) => {
                        if self.retry_read() {
                            break;
                        }
                        return self.server_lost(&e.to_string()).await;
                    }
                    _ => break,
                };
                self.on_server(frame);
                if self.auto.retry {
                    break;
                }
            }
            if let Err(e) = self.flush_client().await {
                return End::Client(e.into());
            }
            if self.side == Side::Auto
                && let Some(end) = self.auto_between_batches().await
            {
                return end;
            }
            loop {
                let frame = match self.client.try_frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        let msg = format!("invalid message from client: {e}");
                        return self.fatal("08P01", &msg).await;
                    }
                };
                if let Some(end) = self.on_client(frame).await {
                    return end;
                }
            }
            if let Err(e) = self.flush_client().await {
                return End::Client(e.into());
            }
            if !self.server_out.is_empty() {
                let out = std::mem::take(&mut self.server_out);
                let sent = match self.server.as_mut() {
                    Some(l) => l.server_mut().conn.send(&out).await,
                    None => Ok(()),
                };
                if let Err(e) = sent {
                    if self.retry_read() {
                        continue;
                    }
                    return self.server_lost(&e.to_string()).await;
                }
            }

            let idle_timeout = self
                .shared
                .cfg
                .client_idle_timeout
                .filter(|_| self.server.is_none());
            let drain_deadline = self.drain_deadline;
            let Session {
                client,
                server,
                routes_changed: changes,
                ..
            } = self;
            let server_read = async {
                match server.as_mut() {
                    Some(l) => l.server_mut().conn.fill().await,
                    None => std::future::pending().await,
                }
            };
            enum Event {
                Client(Result<(), ConnError>),
                Server(Result<(), ConnError>),
                Routes(watch::Receiver<Arc<Routes>>),
                Idle,
                DrainDue,
            }
            let event = tokio::select! {
                r = client.fill() => Event::Client(r),
                r = server_read => Event::Server(r),
                rx = changes => Event::Routes(rx),
                _ = sleep_opt(idle_timeout) => Event::Idle,
                _ = sleep_until_opt(drain_deadline) => Event::DrainDue,
            };
            match event {
                Event::Client(Ok(())) | Event::Server(Ok(())) => {}
                Event::Client(Err(ConnError::Closed)) => return End::ClientGone,
                Event::Client(Err(e)) => return End::Client(e),
                Event::Server(Err(e)) => {
                    if !self.retry_read() {
                        return self.server_lost(&e.to_string()).await;
                    }
                }
                Event::Routes(rx) => {
                    self.routes_changed = routes_changed(rx);
                    if let Some(end) = self.check_routes().await {
                        return end;
                    }
                }
                Event::Idle => {
                    return self
                        .fatal("57P05", "terminating connection due to idle timeout (pgha proxy client_idle_timeout)")
                        .await;
                }
                Event::DrainDue => {
                    self.drain_deadline = None;
                    if let Some(l) = &self.server {
                        let s = l.server();
                        tracing::info!(member = %s.target.member, "drain_timeout reached: cancelling a running transaction");
                        super::server::send_cancel(
                            &self.shared.server_tls,
                            &s.target.host,
                            s.target.port,
                            s.process_id,
                            s.secret_key,
                        )
                        .await;
                    }
                }
            }
        }
    }

    async fn flush_client(&mut self) -> std::io::Result<()> {
        if self.client_out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.client_out);
        self.client.send(&out).await
    }

    async fn fatal(&mut self, code: &str, message: &str) -> End {
        codec::error_response(&mut self.client_out, Severity::Fatal, code, message);
        let _ = self.flush_client().await;
        End::Told(message.to_string())
    }

    async fn server_lost(&mut self, why: &str) -> End {
        let member = self
            .server
            .as_ref()
            .map(|l| l.server().target.member.to_string())
            .unwrap_or_default();
        self.server = None;
        self.cancel.set(None);
        let message = format!(
            "terminating connection: the server connection to {member} was lost ({why}); the outcome of the running transaction is unknown"
        );
        self.fatal("08006", &message).await
    }

    /// A new cluster view: a server on a member that may no longer serve
    /// this side is never used again.
    async fn check_routes(&mut self) -> Option<End> {
        let routes = self.routes.borrow_and_update().clone();
        let Some(lease) = &self.server else {
            return None;
        };
        let member = lease.server().target.member.clone();
        if self.side == Side::Rw || (self.side == Side::Auto && !self.auto.on_replica) {
            if let Rw::Drain { from, .. } = &routes.rw
                && from.member == member
                && self.drain_deadline.is_none()
            {
                self.drain_deadline = Some(Instant::now() + self.shared.cfg.drain_timeout);
            }
            if !routes.rw_member_alive(&member) {
                let message = format!(
                    "terminating connection: {member}, the primary this session was using, is no longer the leader; the outcome of a running transaction is unknown"
                );
                self.server = None;
                self.cancel.set(None);
                return Some(self.fatal("57P01", &message).await);
            }
        }
        None
    }

    fn take_server(&mut self, lease: Lease) {
        let s = lease.server();
        self.cancel.set(Some(CancelTarget {
            host: s.target.host.clone(),
            port: s.target.port,
            process_id: s.process_id,
            secret_key: s.secret_key,
        }));
        match &self.counter {
            Some((member, counter)) if *member == s.target.member => {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                let counter = self
                    .shared
                    .stats
                    .transaction_counter(s.target.member.as_str(), self.side.label());
                counter.fetch_add(1, Ordering::Relaxed);
                self.counter = Some((s.target.member.clone(), counter));
            }
        }
        self.server = Some(lease);
    }

    /// Back to the pool, unless its member may no longer serve this side.
    fn release_server(&mut self) {
        let Some(lease) = self.server.take() else {
            return;
        };
        self.cancel.set(None);
        self.drain_deadline = None;
        let routes = self.routes.borrow().clone();
        let member = &lease.server().target.member;
        let allowed = match self.side {
            Side::Rw => routes.rw_target().is_some_and(|t| &t.member == member),
            Side::Ro => routes.ro_member_allowed(member, self.shared.cfg.ro_fallback_to_leader),
            Side::Auto => {
                routes.rw_target().is_some_and(|t| &t.member == member)
                    || routes.replicas.iter().any(|t| &t.member == member)
            }
        };
        self.auto.batch_done();
        if allowed {
            self.shared.pools.release(lease);
        }
    }

    /// A server connection for this client's next transaction: waits
    /// (up to `hold_timeout`) while there is no target. The error is the
    /// message for the client.
    async fn acquire(&mut self) -> Result<Lease, String> {
        let shared = self.shared.clone();
        let cfg = &shared.cfg;
        let started = Instant::now();
        let deadline = started + cfg.hold_timeout;
        let mut held = false;
        let mut last_error = None;
        self.shared
            .stats
            .clients_waiting
            .fetch_add(1, Ordering::Relaxed);
        let result = loop {
            let routes = self.routes.borrow_and_update().clone();
            let target = match self.side {
                Side::Rw | Side::Auto => routes.rw_target().cloned(),
                Side::Ro => route::pick_ro(
                    &routes,
                    |m| self.shared.pools.load(m),
                    cfg.ro_fallback_to_leader,
                ),
            };
            if let Some(target) = target {
                match self.acquire_at(target, deadline).await {
                    Ok(lease) => break Ok(lease),
                    Err(AcquireError::Server(e))
                        if e.is_transient() && Instant::now() < deadline =>
                    {
                        tracing::debug!(error = %crate::util::chain(&e), "server not ready; retrying");
                        last_error = Some(crate::util::chain(&e).to_string());
                        held = true;
                        let _ = tokio::time::timeout_at(
                            deadline.min(Instant::now() + Duration::from_millis(100)),
                            self.routes.changed(),
                        )
                        .await;
                        continue;
                    }
                    Err(e) => break Err(format!("pgha proxy: {}", crate::util::chain(&e))),
                }
            }
            held = true;
            let why = match (&routes.rw, self.side) {
                (Rw::Hold(why), Side::Rw | Side::Auto) => why.to_string(),
                (Rw::Drain { from, .. }, Side::Rw | Side::Auto) => {
                    format!("a switchover away from {} is in progress", from.member)
                }
                _ => "no replica within max_lag is streaming".to_string(),
            };
            let changed = tokio::time::timeout_at(deadline, self.routes.changed()).await;
            if changed.is_err() {
                self.shared
                    .stats
                    .hold_timeouts_total
                    .fetch_add(1, Ordering::Relaxed);
                let detail = last_error
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default();
                break Err(format!(
                    "pgha proxy: no {} server available after waiting {:?} ({why}{detail})",
                    if self.side != Side::Ro {
                        "primary"
                    } else {
                        "read-only"
                    },
                    cfg.hold_timeout
                ));
            }
        };
        self.shared
            .stats
            .clients_waiting
            .fetch_sub(1, Ordering::Relaxed);
        let waited = started.elapsed();
        self.shared.stats.observe_wait(waited);
        if held {
            self.shared.stats.observe_hold(waited);
        }
        result
    }

    /// A server connection to `target` (waiting for a pool permit until
    /// `deadline`).
    async fn acquire_at(
        &mut self,
        target: Target,
        deadline: Instant,
    ) -> Result<Lease, AcquireError> {
        let key = PoolKey {
            target,
            user: self.user.clone(),
            database: self.database.clone(),
        };
        let cached = self
            .pools
            .iter()
            .find(|(t, p)| *t == key.target && !p.is_retired())
            .map(|(_, p)| p.clone());
        let pool = match cached {
            Some(p) => p,
            None => {
                let p = self.shared.pools.pool(&key);
                self.pools
                    .retain(|(t, p)| *t != key.target && !p.is_retired());
                // A cluster has a handful of members; beyond that, forget.
                if self.pools.len() >= 8 {
                    self.pools.remove(0);
                }
                self.pools.push((key.target.clone(), p.clone()));
                p
            }
        };
        // Only the fields: the closure lives across an await, where
        // a borrow of the whole session would need it to be Sync.
        let (shared, user, database, keys) = (&self.shared, &self.user, &self.database, &self.keys);
        let credentials = || credentials(shared, &key.target, user, database, keys);
        self.shared
            .pools
            .acquire(&pool, &key, credentials, deadline)
            .await
    }

    /// Handles one client message; `Some` ends the session.
    async fn on_client(&mut self, frame: Frame) -> Option<End> {
        let tag = frame.tag;
        if self.discarding {
            if tag == b'S' {
                self.discarding = false;
                codec::ready_for_query(&mut self.client_out, b'I');
            }
            return None;
        }
        match tag {
            b'X' => return Some(End::ClientGone),
            b'P' | b'B' | b'D' | b'C' | b'E' | b'H' | b'S' | b'Q' | b'F' | b'd' | b'c' | b'f' => {}
            other => {
                let msg = format!("invalid frontend message type {}", other);
                return Some(self.fatal("08P01", &msg).await);
            }
        }
        let frame = if self.side == Side::Auto {
            match self.auto_client(frame).await {
                auto::Step::Forward(f) => f,
                auto::Step::Done(end) => return end,
            }
        } else {
            frame
        };
        if self.server.is_none() {
            match tag {
                // Nothing is pending: answer without a server.
                b'S' => {
                    codec::ready_for_query(&mut self.client_out, b'I');
                    return None;
                }
                b'H' => return None,
                // COPY data with no COPY running: the server would ignore it.
                b'd' | b'c' | b'f' => return None,
                _ => {}
            }
            match self.acquire().await {
                Ok(lease) => self.take_server(lease),
                Err(message) => {
                    codec::error_response(&mut self.client_out, Severity::Error, "08006", &message);
                    if tag == b'Q' || tag == b'F' {
                        codec::ready_for_query(&mut self.client_out, b'I');
                    } else {
                        self.discarding = true;
                    }
                    return None;
                }
            }
        }
        if let Err(message) = self.forward(frame) {
            return Some(self.fatal("08P01", &message).await);
        }
        None
    }

    /// Forwards one client message to the held server, rewriting statement
    /// names. The error is a protocol violation to report.
    fn forward(&mut self, frame: Frame) -> Result<(), String> {
        let lease = self.server.as_mut().expect("server held");
        let server = lease.server_mut();
        let batch = self.batches.back_mut().expect("always one batch");
        let body = frame.body();
        let bad = |what: &str| format!("invalid {what} message");
        match frame.tag {
            b'P' => {
                let msg = prepared::parse_parse(body).ok_or_else(|| bad("Parse"))?;
                if msg.name.is_empty() {
                    self.server_out.extend_from_slice(&frame.raw);
                    batch.parse.push_back(true);
                } else {
                    let st = prepared::statement(&msg);
                    // Same content, same name: the server may hold it from
                    // another client. Close it (hidden) and parse again, so
                    // the client gets the ParseComplete it expects in order.
                    self.server_out.extend_from_slice(&prepared::rebuild_target(
                        b'C',
                        b'S',
                        &st.server_name,
                    ));
                    batch.close.push_back(false);
                    self.server_out.extend_from_slice(&st.parse);
                    batch.parse.push_back(true);
                    batch.parsed.push(st.server_name.clone());
                    server.prepared.insert(st.server_name.clone());
                    self.statements.insert(msg.name, st);
                }
                self.unsynced = true;
            }
            b'B' => {
                let (portal, stmt, rest) =
                    prepared::bind_statement(body).ok_or_else(|| bad("Bind"))?;
                match self.statements.get(stmt) {
                    Some(st) => {
                        ensure_prepared(&mut self.server_out, server, batch, st);
                        prepared::write_bind(&mut self.server_out, portal, &st.server_name, rest);
                    }
                    None => self.server_out.extend_from_slice(&frame.raw),
                }
                self.unsynced = true;
            }
            b'D' | b'C' => {
                let (kind, name) =
                    prepared::target(body).ok_or_else(|| bad("Describe or Close"))?;
                let known = if kind == b'S' && !name.is_empty() {
                    if frame.tag == b'C' {
                        self.statements.remove(&name)
                    } else {
                        self.statements.get(&name).cloned()
                    }
                } else {
                    None
                };
                match known {
                    Some(st) if frame.tag == b'D' => {
                        ensure_prepared(&mut self.server_out, server, batch, &st);
                        self.server_out.extend_from_slice(&prepared::rebuild_target(
                            b'D',
                            b'S',
                            &st.server_name,
                        ));
                    }
                    Some(st) => {
                        server.prepared.remove(&st.server_name);
                        self.server_out.extend_from_slice(&prepared::rebuild_target(
                            b'C',
                            b'S',
                            &st.server_name,
                        ));
                        batch.close.push_back(true);
                    }
                    None => {
                        self.server_out.extend_from_slice(&frame.raw);
                        if frame.tag == b'C' {
                            batch.close.push_back(true);
                        }
                    }
                }
                self.unsynced = true;
            }
            b'E' | b'H' => {
                self.server_out.extend_from_slice(&frame.raw);
                self.unsynced = true;
            }
            b'S' | b'Q' | b'F' => {
                if frame.tag == b'Q'
                    && prepared::drops_all_statements(body.strip_suffix(b"\0").unwrap_or(body))
                {
                    server.prepared.clear();
                }
                self.server_out.extend_from_slice(&frame.raw);
                self.pending_syncs += 1;
                self.unsynced = false;
                self.batches.push_back(Batch::default());
            }
            _ => self.server_out.extend_from_slice(&frame.raw),
        }
        Ok(())
    }

    fn on_server(&mut self, frame: Frame) {
        if self.side == Side::Auto && !self.auto_server_frame(&frame) {
            return;
        }
        let front = self.batches.front_mut().expect("always one batch");
        match frame.tag {
            b'1' => {
                if front.parse.pop_front().unwrap_or(true) {
                    self.client_out.extend_from_slice(&frame.raw);
                }
            }
            b'3' => {
                if front.close.pop_front().unwrap_or(true) {
                    self.client_out.extend_from_slice(&frame.raw);
                }
            }
            b'C' => {
                // However it was sent (through the extended protocol, or
                // in a query the text check missed), the server says so
                // when it dropped them all.
                if prepared::completes_drop_all(frame.body())
                    && let Some(l) = self.server.as_mut()
                {
                    l.server_mut().prepared.clear();
                }
                self.client_out.extend_from_slice(&frame.raw);
            }
            b'E' => {
                // The server skips the rest of the batch: statements it
                // was to parse may not exist.
                if let Some(l) = self.server.as_mut() {
                    let prepared = &mut l.server_mut().prepared;
                    for name in front.parsed.drain(..) {
                        prepared.remove(&name);
                    }
                    if prepared::reports_missing_statement(&frame.raw) {
                        prepared.clear();
                    }
                }
                self.client_out.extend_from_slice(&frame.raw);
            }
            b'Z' => {
                self.status = frame.body().first().copied().unwrap_or(b'I');
                self.pending_syncs = self.pending_syncs.saturating_sub(1);
                self.batches.pop_front();
                if self.batches.is_empty() {
                    self.batches.push_back(Batch::default());
                }
                self.client_out.extend_from_slice(&frame.raw);
                if self.status == b'I' {
                    self.drain_deadline = None;
                }
                if self.shared.cfg.pool_mode == PoolMode::Transaction
                    && self.status == b'I'
                    && self.pending_syncs == 0
                    && !self.unsynced
                {
                    if self.auto.wrote {
                        // Released once the commit's position is known.
                        self.auto.lsn_due = true;
                    } else {
                        self.release_server();
                    }
                }
            }
            _ => self.client_out.extend_from_slice(&frame.raw),
        }
    }
}

/// How the proxy logs in to `target` as `user`: a password from the
/// server passfile, or else the client's own SCRAM keys.
fn credentials(
    shared: &Shared,
    target: &Target,
    user: &str,
    database: &str,
    keys: &ScramKeys,
) -> Credentials {
    shared
        .passfile
        .as_ref()
        .and_then(|p| p.lookup(&target.host, target.port, database, user))
        .map(Credentials::Password)
        .unwrap_or_else(|| Credentials::Keys(keys.clone()))
}

/// Makes sure the server holds `st` before a Bind or Describe uses it:
/// a hidden Close (in case the proxy's knowledge is stale) and Parse.
fn ensure_prepared(
    out: &mut BytesMut,
    server: &mut super::server::Server,
    batch: &mut Batch,
    st: &Statement,
) {
    if server.prepared.contains(&st.server_name) {
        return;
    }
    out.extend_from_slice(&prepared::rebuild_target(b'C', b'S', &st.server_name));
    batch.close.push_back(false);
    out.extend_from_slice(&st.parse);
    batch.parse.push_back(false);
    batch.parsed.push(st.server_name.clone());
    server.prepared.insert(st.server_name.clone());
}

/// Session mode: `DISCARD ALL` before the connection serves another
/// client. Transaction mode: returned as is.
async fn reset_and_release(shared: Arc<Shared>, mut lease: Lease, discard: bool) {
    if discard {
        let mut out = BytesMut::new();
        if postgres_protocol::message::frontend::query("DISCARD ALL", &mut out).is_err() {
            return;
        }
        let server = lease.server_mut();
        server.prepared.clear();
        let reset = async {
            server.conn.send(&out).await?;
            loop {
                let f = server.conn.next_frame().await?;
                match f.tag {
                    b'E' => return Err(ConnError::Closed),
                    b'Z' => return Ok::<_, ConnError>(()),
                    _ => {}
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), reset).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
    shared.pools.release(lease);
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
