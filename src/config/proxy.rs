//! `[proxy]`: the connection proxy's settings, accepted in a node's file
//! (the proxy then runs inside the agent) and in a proxy-only file for
//! `pgha proxy -c FILE` (with `cluster`, `namespace` and `[etcd]` as in a
//! node's file). Every key is documented in `docs/configuration.md`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::raw::RawEtcd;
use super::{ConfigError, EtcdConfig};

/// Longest `unix_sockets` directory: a socket address holds 107 bytes,
/// and `/.s.PGSQL.65535` takes 15 of them.
pub const MAX_SOCKET_DIR_LEN: usize = 92;

/// Upper bound on `max_message_size`: PostgreSQL itself refuses messages
/// over 1 GiB.
const MAX_MESSAGE_SIZE_LIMIT: usize = 1 << 30;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxyFile {
    pub cluster: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default = "default_threads")]
    pub threads: usize,
    pub etcd: RawEtcd,
    pub proxy: RawProxy,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub listen_rw: Option<String>,
    #[serde(default)]
    pub listen_ro: Option<String>,
    #[serde(default)]
    pub listen_auto: Option<String>,
    #[serde(default = "default_true")]
    pub read_your_writes: bool,
    #[serde(default, with = "humantime_serde")]
    pub causal_reads_timeout: Duration,
    #[serde(default = "default_replica_lsn_interval", with = "humantime_serde")]
    pub replica_lsn_interval: Duration,
    #[serde(default)]
    pub read_only_functions: Vec<String>,
    #[serde(default)]
    pub pool_mode: PoolMode,
    #[serde(default = "default_pool_size")]
    pub default_pool_size: usize,
    #[serde(default = "default_max_client_conn")]
    pub max_client_conn: usize,
    #[serde(default = "default_server_idle_timeout", with = "humantime_serde")]
    pub server_idle_timeout: Duration,
    #[serde(default = "default_server_lifetime", with = "humantime_serde")]
    pub server_lifetime: Duration,
    #[serde(default, with = "humantime_serde")]
    pub client_idle_timeout: Duration,
    #[serde(default = "default_hold_timeout", with = "humantime_serde")]
    pub hold_timeout: Duration,
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    #[serde(default = "default_startup_timeout", with = "humantime_serde")]
    pub startup_timeout: Duration,
    #[serde(default = "default_max_lag")]
    pub max_lag: u64,
    #[serde(default = "default_true")]
    pub ro_fallback_to_leader: bool,
    #[serde(default)]
    pub auth_file: Option<PathBuf>,
    #[serde(default)]
    pub auth_user: Option<String>,
    #[serde(default = "default_auth_query")]
    pub auth_query: String,
    #[serde(default = "default_auth_dbname")]
    pub auth_dbname: String,
    #[serde(default = "default_auth_cache_ttl", with = "humantime_serde")]
    pub auth_cache_ttl: Duration,
    #[serde(default)]
    pub server_passfile: Option<PathBuf>,
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
    #[serde(default)]
    pub tls_certificate: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Kept as text so that a bad value is reported with its key.
    #[serde(default)]
    pub server_tls: Option<String>,
    #[serde(default)]
    pub server_tls_ca: Option<PathBuf>,
    #[serde(default)]
    pub server_tls_certificate: Option<PathBuf>,
    #[serde(default)]
    pub server_tls_key: Option<PathBuf>,
    /// Lease TTL of the proxy's registration; default: `ha.ttl` inside an
    /// agent, 3 s standalone.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    #[serde(default)]
    pub api: Option<RawProxyApi>,
    /// Member name -> the directory of that member's PostgreSQL Unix
    /// socket, for members on this host.
    #[serde(default)]
    pub unix_sockets: std::collections::BTreeMap<String, PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxyApi {
    pub listen: String,
}

/// Transaction mode hands a server connection to a client for one
/// transaction; session mode for the client's whole connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    #[default]
    Transaction,
    Session,
}

impl std::fmt::Display for PoolMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            PoolMode::Transaction => "transaction",
            PoolMode::Session => "session",
        })
    }
}

/// TLS towards the servers, with libpq's `sslmode` meanings. libpq's
/// `allow` (plain first, TLS only if the server insists) is not offered:
/// it protects nothing that `prefer` does not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServerTlsMode {
    /// Never ask for TLS.
    Disable,
    /// Ask for TLS; go on in plain text if the server declines. The
    /// certificate is not checked.
    #[default]
    Prefer,
    /// TLS or no connection; the certificate is not checked.
    Require,
    /// TLS with a certificate signed by `server_tls_ca`, any host name.
    VerifyCa,
    /// TLS with a certificate signed by `server_tls_ca` and valid for the
    /// host the member publishes.
    VerifyFull,
}

impl ServerTlsMode {
    pub const VALUES: [(&'static str, ServerTlsMode); 5] = [
        ("disable", ServerTlsMode::Disable),
        ("prefer", ServerTlsMode::Prefer),
        ("require", ServerTlsMode::Require),
        ("verify-ca", ServerTlsMode::VerifyCa),
        ("verify-full", ServerTlsMode::VerifyFull),
    ];

    pub fn parse(s: &str) -> Option<ServerTlsMode> {
        Self::VALUES
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, m)| *m)
    }

    /// A server that declines TLS is refused.
    pub fn requires_tls(self) -> bool {
        !matches!(self, ServerTlsMode::Disable | ServerTlsMode::Prefer)
    }

    /// The certificate chain is checked against `server_tls_ca`.
    pub fn verifies(self) -> bool {
        matches!(self, ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull)
    }
}

impl std::fmt::Display for ServerTlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = Self::VALUES
            .iter()
            .find(|(_, m)| m == self)
            .map_or("?", |(n, _)| n);
        f.pad(name)
    }
}

/// A validated `[proxy]` table.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// The file this came from (for messages about the files it names).
    pub path: PathBuf,
    pub name: String,
    pub listen_rw: Option<SocketAddr>,
    pub listen_ro: Option<SocketAddr>,
    /// The listener that routes each statement (`docs/proxy.md`).
    pub listen_auto: Option<SocketAddr>,
    /// Auto listener: a client's reads never see a state older than its
    /// own last commit.
    pub read_your_writes: bool,
    /// Auto listener: how long a read may wait for a replica to replay the
    /// client's last write before it goes to the leader (0: at once).
    pub causal_reads_timeout: Duration,
    /// How often the proxy asks replicas for `pg_last_wal_replay_lsn()`.
    pub replica_lsn_interval: Duration,
    /// Functions the auto listener may send to a replica besides the
    /// built-in immutable/stable ones.
    pub read_only_functions: Vec<String>,
    pub pool_mode: PoolMode,
    pub default_pool_size: usize,
    pub max_client_conn: usize,
    pub server_idle_timeout: Duration,
    pub server_lifetime: Duration,
    /// None: clients may stay idle forever.
    pub client_idle_timeout: Option<Duration>,
    pub hold_timeout: Duration,
    pub drain_timeout: Duration,
    pub startup_timeout: Duration,
    pub max_lag: u64,
    pub ro_fallback_to_leader: bool,
    /// None with `auth_query` only.
    pub auth_file: Option<PathBuf>,
    /// Verifiers of users missing from `auth_file`, fetched from the leader.
    pub auth_query: Option<AuthQueryConfig>,
    pub server_passfile: Option<PathBuf>,
    pub max_message_size: usize,
    pub tls: Option<ProxyTls>,
    /// TLS towards the servers.
    pub server_tls: ServerTlsMode,
    /// Trust anchors for `verify-ca` and `verify-full` (set exactly then).
    pub server_tls_ca: Option<PathBuf>,
    /// The certificate the proxy shows servers that ask for one (`cert`
    /// authentication, `clientcert=verify-ca`).
    pub server_tls_client: Option<ProxyTls>,
    pub ttl: Option<Duration>,
    pub api_listen: Option<SocketAddr>,
    /// Runs inside an agent (a `[proxy]` table in a node's file).
    pub auto: bool,
    /// Members whose PostgreSQL runs on this host: the directory of its
    /// Unix socket (`.s.PGSQL.<port>` inside). Server connections to them
    /// go through the socket, which costs the host far less than TCP.
    pub unix_sockets: std::collections::BTreeMap<String, PathBuf>,
}

/// `auth_user`, `auth_query`, `auth_dbname`, `auth_cache_ttl`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthQueryConfig {
    /// Runs the query; its password comes from `server_passfile`.
    pub user: String,
    /// `$1` is the user name; the second column of the first row is the
    /// secret.
    pub query: String,
    pub dbname: String,
    /// How long an answer (a verifier or "no such user") is reused.
    pub cache_ttl: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyTls {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

/// A validated proxy-only file (`pgha proxy -c FILE`).
#[derive(Clone, Debug)]
pub struct ProxyFileConfig {
    pub path: PathBuf,
    pub cluster: String,
    pub namespace: String,
    /// Threads of the standalone proxy's runtime (1: a current-thread
    /// runtime).
    pub threads: usize,
    pub etcd: EtcdConfig,
    pub proxy: ProxyConfig,
}

impl ProxyFileConfig {
    pub fn load(path: &Path) -> Result<ProxyFileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(path, &text)
    }

    pub fn from_toml(path: &Path, text: &str) -> Result<ProxyFileConfig, ConfigError> {
        let raw: RawProxyFile = super::validate::parse(path, text)?;
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base_dir.join(p)
            }
        };
        for (key, value) in [("cluster", &raw.cluster), ("namespace", &raw.namespace)] {
            if !crate::model::MemberName::is_valid(value) {
                return Err(ConfigError::invalid(
                    path,
                    key,
                    format!("{value:?} must be 1-63 characters of [A-Za-z0-9_.-]"),
                ));
            }
        }
        if !(1..=MAX_THREADS).contains(&raw.threads) {
            return Err(ConfigError::invalid(
                path,
                "threads",
                format!("{} must be 1-{MAX_THREADS}", raw.threads),
            ));
        }
        let etcd = super::validate::validate_etcd(path, raw.etcd, &resolve)?;
        let proxy = validate_proxy(path, raw.proxy, &resolve, None, false)?;
        Ok(ProxyFileConfig {
            path: path.to_path_buf(),
            cluster: raw.cluster,
            namespace: raw.namespace,
            threads: raw.threads,
            etcd,
            proxy,
        })
    }
}

/// Upper bound of `threads`: far beyond what one proxy process can use.
pub const MAX_THREADS: usize = 64;

/// Two, as the agent's runtime: measured no slower than one thread on two
/// cores (bench/README.md, "threads").
fn default_threads() -> usize {
    2
}

/// Checks `[proxy]`. `default_name` is the node's name when embedded;
/// standalone, the host name.
pub(super) fn validate_proxy(
    path: &Path,
    raw: RawProxy,
    resolve: &dyn Fn(&Path) -> PathBuf,
    default_name: Option<&str>,
    auto: bool,
) -> Result<ProxyConfig, ConfigError> {
    let bad = |key: &str, msg: String| ConfigError::invalid(path, &format!("proxy.{key}"), msg);
    let name = match raw.name {
        Some(n) => n,
        None => match default_name {
            Some(n) => n.to_string(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default(),
        },
    };
    if !crate::model::MemberName::is_valid(&name) {
        return Err(bad(
            "name",
            format!("{name:?} must be 1-63 characters of [A-Za-z0-9_.-]"),
        ));
    }
    let addr = |key: &str, v: Option<String>| -> Result<Option<SocketAddr>, ConfigError> {
        v.map(|s| {
            s.parse::<SocketAddr>().map_err(|_| {
                bad(
                    key,
                    format!("{s:?} must be an address:port such as 0.0.0.0:6432"),
                )
            })
        })
        .transpose()
    };
    let listen_rw = addr("listen_rw", raw.listen_rw)?;
    let listen_ro = addr("listen_ro", raw.listen_ro)?;
    let listen_auto = addr("listen_auto", raw.listen_auto)?;
    if listen_rw.is_none() && listen_ro.is_none() && listen_auto.is_none() {
        return Err(bad(
            "listen_rw",
            "at least one of proxy.listen_rw, proxy.listen_ro and proxy.listen_auto is required"
                .into(),
        ));
    }
    if listen_rw.is_some() && listen_rw == listen_ro {
        return Err(bad("listen_ro", "must differ from proxy.listen_rw".into()));
    }
    if listen_auto.is_some() && (listen_auto == listen_rw || listen_auto == listen_ro) {
        return Err(bad(
            "listen_auto",
            "must differ from proxy.listen_rw and proxy.listen_ro".into(),
        ));
    }
    // Routing per statement needs a server connection per transaction.
    if listen_auto.is_some() && raw.pool_mode != PoolMode::Transaction {
        return Err(bad(
            "listen_auto",
            "requires proxy.pool_mode = \"transaction\"".into(),
        ));
    }
    // Below this the polling would load the replicas for little gain.
    if raw.replica_lsn_interval < Duration::from_millis(10) {
        return Err(bad("replica_lsn_interval", "must be at least 10ms".into()));
    }
    for f in &raw.read_only_functions {
        let ok = !f.is_empty()
            && f.split('.').count() <= 2
            && f.split('.').all(|p| {
                !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_alphanumeric() || c == '_' || c == '$')
            });
        if !ok {
            return Err(bad(
                "read_only_functions",
                format!("{f:?} must be a function name, optionally schema-qualified (schema.name)"),
            ));
        }
    }
    if raw.default_pool_size == 0 {
        return Err(bad("default_pool_size", "must be at least 1".into()));
    }
    if raw.max_client_conn == 0 {
        return Err(bad("max_client_conn", "must be at least 1".into()));
    }
    for (key, value) in [
        ("server_idle_timeout", raw.server_idle_timeout),
        ("server_lifetime", raw.server_lifetime),
        ("hold_timeout", raw.hold_timeout),
        ("drain_timeout", raw.drain_timeout),
        ("startup_timeout", raw.startup_timeout),
    ] {
        if value.is_zero() {
            return Err(bad(key, "must be greater than 0".into()));
        }
    }
    if let Some(ttl) = raw.ttl
        && ttl < Duration::from_secs(2)
    {
        // etcd leases have whole-second TTLs; under 2 s one missed
        // renewal would unregister the proxy.
        return Err(bad("ttl", "must be at least 2s".into()));
    }
    // Below this a plain startup packet with a few parameters would not
    // fit; above it PostgreSQL refuses the message anyway.
    if !(8192..=MAX_MESSAGE_SIZE_LIMIT).contains(&raw.max_message_size) {
        return Err(bad(
            "max_message_size",
            format!("must be between 8192 and {MAX_MESSAGE_SIZE_LIMIT} bytes"),
        ));
    }
    let auth_file = match raw.auth_file {
        Some(f) => {
            let auth_file = resolve(&f);
            let text = std::fs::read_to_string(&auth_file).map_err(|e| {
                bad(
                    "auth_file",
                    format!("cannot read {}: {e}", auth_file.display()),
                )
            })?;
            crate::proxy::auth::AuthFile::parse(&text)
                .map_err(|e| bad("auth_file", format!("{}: {e}", auth_file.display())))?;
            Some(auth_file)
        }
        None if raw.auth_user.is_some() => None,
        None => {
            return Err(bad(
                "auth_file",
                "required unless proxy.auth_user is set (auth_query)".into(),
            ));
        }
    };
    let passfile_users = |p: &Path| -> Option<crate::proxy::auth::Passfile> {
        crate::proxy::auth::Passfile::parse(&std::fs::read_to_string(p).ok()?).ok()
    };
    let server_passfile = match raw.server_passfile {
        Some(p) => {
            let p = resolve(&p);
            let meta = std::fs::metadata(&p).map_err(|e| {
                bad(
                    "server_passfile",
                    format!("cannot read {}: {e}", p.display()),
                )
            })?;
            // libpq refuses a passfile others can read; so does pgha.
            if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077 != 0 {
                return Err(bad(
                    "server_passfile",
                    format!(
                        "{} must not be readable by group or others (chmod 0600)",
                        p.display()
                    ),
                ));
            }
            let text = std::fs::read_to_string(&p).map_err(|e| {
                bad(
                    "server_passfile",
                    format!("cannot read {}: {e}", p.display()),
                )
            })?;
            crate::proxy::auth::Passfile::parse(&text)
                .map_err(|e| bad("server_passfile", format!("{}: {e}", p.display())))?;
            Some(p)
        }
        None => None,
    };
    let tls = match super::validate::paired(
        path,
        ("proxy.tls_certificate", raw.tls_certificate),
        ("proxy.tls_key", raw.tls_key),
    )? {
        Some((c, k)) => {
            let tls = ProxyTls {
                certificate: resolve(&c),
                key: resolve(&k),
            };
            crate::pem::read_key_pair(&tls.certificate, &tls.key)
                .map_err(|e| bad("tls_certificate", crate::util::chain(&e).to_string()))?;
            Some(tls)
        }
        None => None,
    };
    let auth_query = match raw.auth_user {
        Some(user) => {
            if user.is_empty() {
                return Err(bad("auth_user", "must not be empty".into()));
            }
            if !raw.auth_query.contains("$1") {
                return Err(bad("auth_query", "must take the user name as $1".into()));
            }
            if raw.auth_dbname.is_empty() {
                return Err(bad("auth_dbname", "must not be empty".into()));
            }
            // The proxy cannot log in as auth_user without a password
            // (there is no client proof to pass through).
            let has_password = server_passfile
                .as_deref()
                .and_then(passfile_users)
                .is_some_and(|p| p.has_user(&user));
            if !has_password {
                return Err(bad(
                    "auth_user",
                    format!("needs a password for {user:?} in proxy.server_passfile"),
                ));
            }
            Some(AuthQueryConfig {
                user,
                query: raw.auth_query,
                dbname: raw.auth_dbname,
                cache_ttl: raw.auth_cache_ttl,
            })
        }
        None => None,
    };
    let server_tls = match raw.server_tls.as_deref() {
        None => ServerTlsMode::default(),
        Some(v) => ServerTlsMode::parse(v).ok_or_else(|| {
            let names: Vec<&str> = ServerTlsMode::VALUES.iter().map(|(n, _)| *n).collect();
            bad(
                "server_tls",
                format!("{v:?} must be one of {}", names.join(", ")),
            )
        })?,
    };
    // Verification without trust anchors would either fail every
    // connection or silently trust the system's roots; an anchor with a
    // mode that does not verify would suggest a check that never happens.
    let server_tls_ca = match (server_tls.verifies(), raw.server_tls_ca) {
        (true, Some(ca)) => {
            let ca = resolve(&ca);
            crate::pem::read_ca(&ca)
                .map_err(|e| bad("server_tls_ca", crate::util::chain(&e).to_string()))?;
            Some(ca)
        }
        (true, None) => {
            return Err(bad(
                "server_tls_ca",
                format!("required with proxy.server_tls = \"{server_tls}\""),
            ));
        }
        (false, Some(_)) => {
            return Err(bad(
                "server_tls_ca",
                format!(
                    "only used with proxy.server_tls = \"verify-ca\" or \"verify-full\" (it is \"{server_tls}\")"
                ),
            ));
        }
        (false, None) => None,
    };
    let server_tls_client = match super::validate::paired(
        path,
        ("proxy.server_tls_certificate", raw.server_tls_certificate),
        ("proxy.server_tls_key", raw.server_tls_key),
    )? {
        Some(_) if server_tls == ServerTlsMode::Disable => {
            return Err(bad(
                "server_tls_certificate",
                "not used with proxy.server_tls = \"disable\"".into(),
            ));
        }
        Some((c, k)) => {
            let client = ProxyTls {
                certificate: resolve(&c),
                key: resolve(&k),
            };
            crate::pem::read_key_pair(&client.certificate, &client.key)
                .map_err(|e| bad("server_tls_certificate", crate::util::chain(&e).to_string()))?;
            Some(client)
        }
        None => None,
    };
    let api_listen = match raw.api {
        Some(api) => Some(api.listen.parse::<SocketAddr>().map_err(|_| {
            bad(
                "api.listen",
                format!(
                    "{:?} must be an address:port such as 127.0.0.1:8009",
                    api.listen
                ),
            )
        })?),
        None => None,
    };
    let mut unix_sockets = std::collections::BTreeMap::new();
    for (member, dir) in raw.unix_sockets {
        let key = format!("unix_sockets.{member}");
        if !crate::model::MemberName::is_valid(&member) {
            return Err(bad(&key, format!("{member:?} is not a member name")));
        }
        let dir = resolve(&dir);
        if dir.as_os_str().len() > MAX_SOCKET_DIR_LEN {
            return Err(bad(
                &key,
                format!(
                    "{} is too long for a socket path (at most {MAX_SOCKET_DIR_LEN} bytes)",
                    dir.display()
                ),
            ));
        }
        unix_sockets.insert(member, dir);
    }
    Ok(ProxyConfig {
        path: path.to_path_buf(),
        name,
        listen_rw,
        listen_ro,
        listen_auto,
        read_your_writes: raw.read_your_writes,
        causal_reads_timeout: raw.causal_reads_timeout,
        replica_lsn_interval: raw.replica_lsn_interval,
        read_only_functions: raw.read_only_functions,
        pool_mode: raw.pool_mode,
        default_pool_size: raw.default_pool_size,
        max_client_conn: raw.max_client_conn,
        server_idle_timeout: raw.server_idle_timeout,
        server_lifetime: raw.server_lifetime,
        client_idle_timeout: (!raw.client_idle_timeout.is_zero())
            .then_some(raw.client_idle_timeout),
        hold_timeout: raw.hold_timeout,
        drain_timeout: raw.drain_timeout,
        startup_timeout: raw.startup_timeout,
        max_lag: raw.max_lag,
        ro_fallback_to_leader: raw.ro_fallback_to_leader,
        auth_file,
        auth_query,
        server_passfile,
        max_message_size: raw.max_message_size,
        tls,
        server_tls,
        server_tls_ca,
        server_tls_client,
        ttl: raw.ttl,
        api_listen,
        auto,
        unix_sockets,
    })
}

fn default_namespace() -> String {
    "pgha".into()
}
fn default_pool_size() -> usize {
    20
}
fn default_max_client_conn() -> usize {
    1000
}
fn default_server_idle_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_server_lifetime() -> Duration {
    Duration::from_secs(3600)
}
fn default_hold_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_startup_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_lag() -> u64 {
    1024 * 1024
}
fn default_replica_lsn_interval() -> Duration {
    Duration::from_millis(100)
}
/// pgbouncer's default.
fn default_auth_query() -> String {
    "SELECT usename, passwd FROM pg_shadow WHERE usename=$1".into()
}
fn default_auth_dbname() -> String {
    "postgres".into()
}
fn default_auth_cache_ttl() -> Duration {
    Duration::from_secs(10)
}
fn default_true() -> bool {
    true
}
fn default_max_message_size() -> usize {
    16 * 1024 * 1024
}
