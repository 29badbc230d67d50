//! The pgha proxy: one endpoint for applications (`docs/proxy.md`).
//!
//! - [`watch`] follows the cluster through an etcd watch and publishes
//!   [`route::Routes`], derived by the pure functions of [`route`].
//! - [`client`] takes a connection through negotiation and SCRAM login
//!   ([`scram`], [`auth`]); [`session`] then runs its message loop,
//!   borrowing server connections from [`pool`] per transaction or per
//!   session, carrying named prepared statements across them
//!   ([`prepared`]) and forwarding cancel requests ([`cancel`]).
//! - [`codec`] frames messages without I/O; [`conn`] reads them off sockets.
//!
//! The same code runs standalone (`pgha proxy -c FILE`) and inside an
//! agent (a `[proxy]` table in the node's file).

pub mod auth;
pub mod auth_query;
pub mod cancel;
pub mod classify;
pub mod client;
pub mod codec;
pub mod conn;
pub mod pool;
pub mod prepared;
pub mod register;
pub mod replay;
pub mod route;
pub mod scram;
pub mod server;
pub mod server_tls;
pub mod session;
pub mod stats;
pub mod watch;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use crate::config::EtcdConfig;
pub use crate::config::proxy::{PoolMode, ProxyConfig, ProxyFileConfig, ProxyTls, ServerTlsMode};
use crate::dcs::ClusterView;
use crate::dcs::etcd::EtcdDcs;
use crate::dcs::keys::Keys;
use crate::model::MemberName;
use auth::{AuthFile, Passfile};
use route::Routes;
use scram::ScramVerifier;
use session::Side;

/// Lease TTL of a standalone proxy's registration.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot read {}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    File {
        path: std::path::PathBuf,
        source: auth::FileError,
    },
    #[error("cannot load the TLS certificate or key")]
    Tls(#[source] crate::pem::PemError),
    #[error("TLS configuration refused")]
    TlsConfig(#[source] rustls::Error),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up TLS towards the servers")]
    ServerTls(#[source] server_tls::ServerTlsError),
    #[error("cannot connect to etcd")]
    Etcd(#[source] crate::dcs::DcsError),
}

/// State shared by every client of one proxy.
pub struct Shared {
    pub cfg: ProxyConfig,
    pub auth: RwLock<AuthFile>,
    /// Verifiers of users the auth file does not list, from the leader.
    pub auth_query: Option<auth_query::AuthQuery>,
    pub passfile: Option<Passfile>,
    /// TLS towards the servers (also used by cancel requests).
    pub server_tls: Arc<server_tls::ServerTls>,
    pub pools: pool::Pools,
    pub cancels: Arc<cancel::Cancels>,
    pub routes: tokio::sync::watch::Receiver<Arc<Routes>>,
    pub views: tokio::sync::watch::Receiver<Arc<ClusterView>>,
    pub tls: RwLock<Option<TlsAcceptor>>,
    pub stats: stats::Stats,
    pub client_slots: Arc<Semaphore>,
    /// Stands in for users missing from the auth file (see `client.rs`).
    pub unknown_user_verifier: ScramVerifier,
    /// Built-in and configured read-only functions (auto listener).
    pub functions: classify::ReadOnlyFunctions,
    /// Replay positions and failed replicas (auto listener).
    pub positions: replay::Positions,
}

impl Shared {
    /// The metrics text for `/metrics`.
    pub fn metrics(&self) -> String {
        self.stats.render(&self.pools.stats())
    }
}

/// A running proxy; dropping it stops every task.
pub struct ProxyHandle {
    pub shared: Arc<Shared>,
    pub rw_addr: Option<SocketAddr>,
    pub ro_addr: Option<SocketAddr>,
    pub auto_addr: Option<SocketAddr>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The auth file; none (with `auth_query` only) lists nobody.
fn load_auth(path: Option<&std::path::Path>) -> Result<AuthFile, ProxyError> {
    let Some(path) = path else {
        return Ok(AuthFile::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ProxyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    AuthFile::parse(&text).map_err(|source| ProxyError::File {
        path: path.to_path_buf(),
        source,
    })
}

fn load_passfile(path: &std::path::Path) -> Result<Passfile, ProxyError> {
    let text = std::fs::read_to_string(path).map_err(|source| ProxyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Passfile::parse(&text).map_err(|source| ProxyError::File {
        path: path.to_path_buf(),
        source,
    })
}

/// rustls server configuration for clients. ALPN "postgresql" is what
/// libpq 17's direct TLS asks for; older clients send no ALPN.
fn tls_acceptor(tls: &ProxyTls) -> Result<TlsAcceptor, ProxyError> {
    let (certs, key) =
        crate::pem::read_key_pair(&tls.certificate, &tls.key).map_err(ProxyError::Tls)?;
    let mut config = rustls::ServerConfig::builder_with_provider(crate::pem::provider())
        .with_safe_default_protocol_versions()
        .map_err(ProxyError::TlsConfig)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(ProxyError::TlsConfig)?;
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Starts the proxy: reads its files, connects to etcd, binds the
/// listeners (errors here stop the caller's start) and spawns the rest.
pub async fn start(
    cfg: ProxyConfig,
    etcd: &EtcdConfig,
    keys: Keys,
    ttl: Duration,
) -> Result<ProxyHandle, ProxyError> {
    let auth = load_auth(cfg.auth_file.as_deref())?;
    let passfile = cfg
        .server_passfile
        .as_deref()
        .map(load_passfile)
        .transpose()?;
    let tls = cfg.tls.as_ref().map(tls_acceptor).transpose()?;
    let server_tls = Arc::new(
        server_tls::ServerTls::new(
            cfg.server_tls,
            cfg.server_tls_ca.as_deref(),
            cfg.server_tls_client.as_ref(),
        )
        .map_err(ProxyError::ServerTls)?,
    );
    let dcs = EtcdDcs::connect(
        etcd,
        keys.clone(),
        MemberName::new(cfg.name.clone()),
        ttl,
        Duration::from_secs(3),
        false,
    )
    .await
    .map_err(ProxyError::Etcd)?;
    let bind = |addr: Option<SocketAddr>| async move {
        match addr {
            Some(addr) => TcpListener::bind(addr)
                .await
                .map(Some)
                .map_err(|source| ProxyError::Listen { addr, source }),
            None => Ok(None),
        }
    };
    let rw = bind(cfg.listen_rw).await?;
    let ro = bind(cfg.listen_ro).await?;
    let auto = bind(cfg.listen_auto).await?;
    let api = bind(cfg.api_listen).await?;

    let (routes_tx, routes_rx) = tokio::sync::watch::channel(Arc::new(Routes::unknown()));
    let (views_tx, views_rx) = tokio::sync::watch::channel(Arc::new(ClusterView::default()));
    let mut salt = [0u8; 16];
    salt.copy_from_slice(&rand::random::<[u8; 16]>());
    let shared = Arc::new(Shared {
        pools: pool::Pools::new(
            cfg.default_pool_size,
            cfg.server_lifetime,
            cfg.server_idle_timeout,
            server_tls.clone(),
            cfg.unix_sockets.clone(),
        ),
        server_tls,
        client_slots: Arc::new(Semaphore::new(cfg.max_client_conn)),
        auth: RwLock::new(auth),
        auth_query: cfg.auth_query.clone().map(auth_query::AuthQuery::new),
        passfile,
        cancels: Arc::new(cancel::Cancels::default()),
        routes: routes_rx,
        views: views_rx,
        tls: RwLock::new(tls),
        stats: stats::Stats::default(),
        unknown_user_verifier: ScramVerifier::from_password(&scram::random_nonce(), &salt, 4096),
        functions: classify::ReadOnlyFunctions::new(&cfg.read_only_functions),
        positions: replay::Positions::default(),
        cfg,
    });
    let keys_for_record = keys.clone();
    let mut tasks = vec![tokio::spawn(watch::run(
        dcs.client(),
        keys,
        shared.cfg.max_lag,
        views_tx,
        routes_tx,
    ))];
    let rw_addr = rw.as_ref().and_then(|l| l.local_addr().ok());
    let ro_addr = ro.as_ref().and_then(|l| l.local_addr().ok());
    let auto_addr = auto.as_ref().and_then(|l| l.local_addr().ok());
    let base = crate::dcs::ProxyRecord {
        name: shared.cfg.name.clone(),
        rw: rw_addr.map(|a| a.to_string()),
        ro: ro_addr.map(|a| a.to_string()),
        auto: shared.cfg.auto,
        state: crate::dcs::ProxyState::Holding,
        drained_for: None,
        drain_timeout_ms: Some(shared.cfg.drain_timeout.as_millis() as u64),
    };
    tasks.push(tokio::spawn(register::run(
        dcs.client(),
        keys_for_record,
        base,
        ttl,
        shared.clone(),
    )));
    if auto.is_some() {
        tasks.push(tokio::spawn(replay::monitor(shared.clone())));
    }
    for (listener, side) in [(rw, Side::Rw), (ro, Side::Ro), (auto, Side::Auto)] {
        if let Some(listener) = listener {
            tracing::info!(addr = ?listener.local_addr().ok(), side = side.label(), "proxy listening");
            tasks.push(tokio::spawn(accept_loop(shared.clone(), listener, side)));
        }
    }
    if let Some(api) = api {
        tasks.push(tokio::spawn(serve_api(shared.clone(), api)));
    }
    tasks.push(tokio::spawn(maintenance(shared.clone())));
    tasks.push(tokio::spawn(reload_on_sighup(shared.clone())));
    // Keeps the etcd connection (shared by the watch) alive with the tasks.
    tasks.push(tokio::spawn(async move {
        let _dcs = dcs;
        std::future::pending::<()>().await
    }));
    Ok(ProxyHandle {
        shared,
        rw_addr,
        ro_addr,
        auto_addr,
        tasks,
    })
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, side: Side) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                tokio::spawn(client::serve(shared.clone(), tcp, side));
            }
            Err(e) => {
                // Out of descriptors, most likely: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Closes idle server connections that expired or whose member may no
/// longer serve.
async fn maintenance(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut routes = shared.routes.clone();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = routes.changed() => {}
        }
        let r = routes.borrow_and_update().clone();
        let fallback = shared.cfg.ro_fallback_to_leader;
        shared.pools.sweep(|t| {
            r.rw_target().is_some_and(|rw| rw == t)
                || r.ro_member_allowed(&t.member, fallback)
                || r.replicas.contains(t)
        });
    }
}

/// SIGHUP: re-read the auth file, the TLS certificate, and the trust
/// anchors and client certificate towards the servers. A broken file keeps
/// the previous one (and says so).
async fn reload_on_sighup(shared: Arc<Shared>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        match load_auth(shared.cfg.auth_file.as_deref()) {
            Ok(a) => *shared.auth.write().expect("auth") = a,
            Err(e) => {
                tracing::warn!(error = %crate::util::chain(&e), "keeping the previous auth file")
            }
        }
        if let Some(tls) = &shared.cfg.tls {
            match tls_acceptor(tls) {
                Ok(a) => *shared.tls.write().expect("tls") = Some(a),
                Err(e) => {
                    tracing::warn!(error = %crate::util::chain(&e), "keeping the previous TLS certificate")
                }
            }
        }
        if let Err(e) = shared.server_tls.reload() {
            tracing::warn!(error = %crate::util::chain(&e), "keeping the previous server TLS configuration");
        }
        tracing::info!("proxy reloaded its auth file and certificates");
    }
}

async fn serve_api(shared: Arc<Shared>, listener: TcpListener) {
    use axum::routing::get;
    let metrics = shared.clone();
    let health = shared;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let s = metrics.clone();
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4")],
                        s.metrics(),
                    )
                }
            }),
        )
        .route(
            "/health",
            get(move || {
                let s = health.clone();
                async move {
                    let routes = s.routes.borrow().clone();
                    let body = serde_json::json!({
                        "name": s.cfg.name,
                        "rw": routes.rw_target().map(|t| t.member.to_string()),
                        "ro": routes.replicas.iter().map(|t| t.member.to_string()).collect::<Vec<_>>(),
                    });
                    axum::Json(body)
                }
            }),
        );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "proxy API stopped");
    }
}

/// `pgha proxy -c FILE`: runs until SIGTERM or SIGINT.
pub async fn run_standalone(cfg: ProxyFileConfig) -> anyhow::Result<()> {
    let ttl = cfg.proxy.ttl.unwrap_or(DEFAULT_TTL);
    let keys = Keys::new(&cfg.namespace, &cfg.cluster);
    let _handle = start(cfg.proxy, &cfg.etcd, keys, ttl).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("proxy stopping");
    Ok(())
}
