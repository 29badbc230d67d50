//! The HTTP/1.1 server under the API: one task per connection, with the
//! limits that keep slow or idle clients from holding the descriptors the
//! agent needs for etcd and PostgreSQL.
//!
//! Every connection is in one of three phases:
//!
//! - **head**: waiting for a request head (for a new connection, from the
//!   moment it was accepted, TLS handshake included). The whole head must
//!   arrive within `header_read_timeout`, however slowly it trickles in.
//! - **busy**: a request is being handled. No deadline here: handlers
//!   bound their own waits, and the body's is `body_read_timeout`
//!   (enforced by [`super::read_body`], which answers 408).
//! - **idle**: between requests of a keep-alive connection; closed after
//!   `idle_timeout` without a byte in either direction (which also ends a
//!   client that stops reading its response).
//!
//! **At the connection limit** (`max_connections`) a new connection takes
//! the place of the connection that has waited longest in the head or
//! idle phase, which is closed first; when every connection is busy, the
//! new one is closed at once. A slot is only freed once its socket is
//! closed, so the agent never holds more than `max_connections` client
//! descriptors (plus the one just accepted), and a flood cannot lock out a
//! load balancer's health check: a check sends its whole request at once,
//! so it completes long before it becomes the oldest idle connection,
//! while the flood's connections, which never finish a head, keep making
//! room for newcomers. Closing without an answer (rather than writing a
//! 503) costs nothing more than the accept, which is what a flood must not
//! be able to make expensive; an HTTP client sees a closed connection and
//! retries.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::config::ApiLimits;

/// The client's address, available to handlers and middleware as
/// `ConnectInfo<PeerAddr>` over both HTTP and HTTPS.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// Request heads larger than this are refused (431) rather than buffered:
/// the API's requests are a line and a few headers.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// How often at most the agent logs that the limit is being hit.
const PRESSURE_LOG_EVERY: Duration = Duration::from_secs(10);
/// How long the accept loop waits for an evicted connection to close.
/// Its task only has to be scheduled to drop the socket, so this is a
/// bound for a stalled runtime, not an expected wait.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Head { since: Instant },
    Busy,
    Idle { since: Instant },
}

/// One connection's state, shared by its task, its I/O wrapper, its
/// request handlers and the registry.
struct Conn {
    phase: Mutex<Phase>,
    /// Wakes the watchdog when the phase changes (deadlines move).
    changed: Notify,
    /// Set by the registry to close this connection for a newcomer.
    evict: Notify,
}

impl Conn {
    fn new(now: Instant) -> Arc<Conn> {
        Arc::new(Conn {
            phase: Mutex::new(Phase::Head { since: now }),
            changed: Notify::new(),
            evict: Notify::new(),
        })
    }

    fn phase(&self) -> Phase {
        *self.phase.lock().unwrap()
    }

    fn set(&self, phase: Phase) {
        *self.phase.lock().unwrap() = phase;
        self.changed.notify_one();
    }

    /// Bytes of a request arrived: an idle connection starts a head.
    fn on_read(&self) {
        let mut p = self.phase.lock().unwrap();
        if let Phase::Idle { .. } = *p {
            *p = Phase::Head {
                since: Instant::now(),
            };
            drop(p);
            self.changed.notify_one();
        }
    }

    /// Bytes of a response left: an idle connection is not idle yet.
    fn on_write(&self) {
        let mut p = self.phase.lock().unwrap();
        if let Phase::Idle { since } = &mut *p {
            *since = Instant::now();
        }
    }

    /// When this connection must be closed, if its phase does not change.
    fn deadline(&self, limits: &ApiLimits) -> Option<Instant> {
        match self.phase() {
            Phase::Head { since } => Some(since + limits.header_read_timeout),
            Phase::Idle { since } => Some(since + limits.idle_timeout),
            Phase::Busy => None,
        }
    }

    /// Resolves once the phase's deadline has passed.
    async fn expired(&self, limits: &ApiLimits) -> Phase {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.deadline(limits) {
                Some(d) if d <= Instant::now() => return self.phase(),
                Some(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(d) => {}
                        _ = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }
}

/// Marks a connection busy while a request is handled.
struct BusyGuard(Arc<Conn>);

impl BusyGuard {
    fn new(conn: Arc<Conn>) -> BusyGuard {
        conn.set(Phase::Busy);
        BusyGuard(conn)
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.set(Phase::Idle {
            since: Instant::now(),
        });
    }
}

/// The I/O of one connection, reporting traffic to its [`Conn`].
struct Tracked<T> {
    io: T,
    conn: Arc<Conn>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.conn.on_read();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.conn.on_write();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The open connections, for the limit and for eviction.
struct Registry {
    max: usize,
    /// One permit per client socket, released once the socket is closed.
    slots: Arc<Semaphore>,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    /// Connections evicted or refused since the last warning.
    pressure: AtomicU64,
    last_warning: Mutex<Option<Instant>>,
}

/// A connection's place in the registry.
struct Admitted {
    id: u64,
    conn: Arc<Conn>,
    slot: OwnedSemaphorePermit,
}

impl Registry {
    fn new(max: usize) -> Registry {
        Registry {
            max,
            slots: Arc::new(Semaphore::new(max)),
            conns: Mutex::default(),
            next_id: AtomicU64::default(),
            pressure: AtomicU64::default(),
            last_warning: Mutex::default(),
        }
    }

    /// A slot for a connection just accepted: a free one, or the one of
    /// the connection that has waited longest without a request in
    /// progress, once that connection is closed. `None` when every
    /// connection is busy.
    async fn admit(&self) -> Option<Admitted> {
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                self.under_pressure();
                if !self.evict_oldest() {
                    return None;
                }
                tokio::time::timeout(EVICTION_WAIT, self.slots.clone().acquire_owned())
                    .await
                    .ok()?
                    .ok()?
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Conn::new(Instant::now());
        self.conns.lock().unwrap().insert(id, conn.clone());
        Some(Admitted { id, conn, slot })
    }

    /// Closes the connection that has waited longest in the head or idle
    /// phase; false when every connection is busy.
    fn evict_oldest(&self) -> bool {
        let mut conns = self.conns.lock().unwrap();
        let oldest = conns
            .iter()
            .filter_map(|(id, c)| match c.phase() {
                Phase::Head { since } | Phase::Idle { since } => Some((since, *id)),
                Phase::Busy => None,
            })
            .min();
        match oldest.and_then(|(_, id)| conns.remove(&id)) {
            Some(c) => {
                c.evict.notify_one();
                true
            }
            None => false,
        }
    }

    fn remove(&self, id: u64) {
        self.conns.lock().unwrap().remove(&id);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    /// Counts a connection closed because of the limit and warns, at most
    /// every [`PRESSURE_LOG_EVERY`], so a flood cannot flood the log too.
    fn under_pressure(&self) {
        self.pressure.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last_warning.lock().unwrap();
        if last.is_some_and(|t| t.elapsed() < PRESSURE_LOG_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        let closed = self.pressure.swap(0, Ordering::Relaxed);
        tracing::warn!(
            max_connections = self.max,
            closed,
            "REST API connection limit reached: closing the connections that wait longest without a request (see api.max_connections)"
        );
    }
}

/// Accepts connections on `listener` (HTTPS when `tls` is set) and serves
/// `router` on each, within `limits`. Runs until the task is dropped.
pub async fn run(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    limits: ApiLimits,
) {
    let registry = Arc::new(Registry::new(limits.max_connections));
    serve(listener, tls, router, limits, registry).await
}

async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    limits: ApiLimits,
    registry: Arc<Registry>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Typically EMFILE: give the descriptors a moment to free
                // up instead of spinning.
                tracing::debug!(error = %crate::util::chain(&e), "API accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(Admitted { id, conn, slot }) = registry.admit().await else {
            drop(tcp);
            continue;
        };
        let (registry, router, tls) = (registry.clone(), router.clone(), tls.clone());
        tokio::spawn(async move {
            // Returns once the socket is closed; only then is the slot free.
            serve_connection(tcp, peer, tls, router, conn, limits).await;
            registry.remove(id);
            drop(slot);
        });
    }
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    router: Router,
    conn: Arc<Conn>,
    limits: ApiLimits,
) {
    let _ = tcp.set_nodelay(true);
    let served = async {
        match tls {
            Some(acceptor) => match acceptor.accept(tcp).await {
                Ok(stream) => http(stream, peer, router, conn.clone()).await,
                Err(e) => {
                    tracing::debug!(%peer, error = %crate::util::chain(&e), "TLS handshake failed")
                }
            },
            None => http(tcp, peer, router, conn.clone()).await,
        }
    };
    tokio::select! {
        _ = served => {}
        phase = conn.expired(&limits) => match phase {
            Phase::Head { .. } => tracing::debug!(%peer, "API client did not send a request head within api.header_read_timeout; closed"),
            _ => tracing::debug!(%peer, "idle API connection closed (api.idle_timeout)"),
        },
        _ = conn.evict.notified() => {
            tracing::debug!(%peer, "API connection closed to make room for a new one (api.max_connections)");
        }
    }
}

async fn http<T>(io: T, peer: SocketAddr, router: Router, conn: Arc<Conn>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(Tracked {
        io,
        conn: conn.clone(),
    });
    let inner = TowerToHyperService::new(router);
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        let busy = BusyGuard::new(conn.clone());
        req.extensions_mut().insert(ConnectInfo(PeerAddr(peer)));
        let fut = hyper::service::Service::call(&inner, req);
        async move {
            let response = fut.await;
            drop(busy);
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Timeouts are this module's (per phase, see the module comment);
    // hyper's own header timeout would restart with every keep-alive wait.
    builder
        .header_read_timeout(None)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    if let Err(e) = builder.serve_connection(io, service).await {
        tracing::debug!(%peer, error = %crate::util::chain(&e), "API connection ended with an error");
    }
}

#[cfg(test)]
#[path = "server_test.rs"]
mod tests;
