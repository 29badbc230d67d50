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

/// Upper bound on `max_message_size`: PostgreSQL itself refuses messages
/// over 1 GiB.
const MAX_MESSAGE_SIZE_LIMIT: usize = 1 << 30;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxyFile {
    pub cluster: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
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
    pub auth_file: PathBuf,
    #[serde(default)]
    pub server_passfile: Option<PathBuf>,
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
    #[serde(default)]
    pub tls_certificate: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Lease TTL of the proxy's registration; default: `ha.ttl` inside an
    /// agent, 3 s standalone.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    #[serde(default)]
    pub api: Option<RawProxyApi>,
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

/// A validated `[proxy]` table.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// The file this came from (for messages about the files it names).
    pub path: PathBuf,
    pub name: String,
    pub listen_rw: Option<SocketAddr>,
    pub listen_ro: Option<SocketAddr>,
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
    pub auth_file: PathBuf,
    pub server_passfile: Option<PathBuf>,
    pub max_message_size: usize,
    pub tls: Option<ProxyTls>,
    pub ttl: Option<Duration>,
    pub api_listen: Option<SocketAddr>,
    /// Runs inside an agent (a `[proxy]` table in a node's file).
    pub auto: bool,
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
        let etcd = super::validate::validate_etcd(path, raw.etcd, &resolve)?;
        let proxy = validate_proxy(path, raw.proxy, &resolve, None, false)?;
        Ok(ProxyFileConfig {
            path: path.to_path_buf(),
            cluster: raw.cluster,
            namespace: raw.namespace,
            etcd,
            proxy,
        })
    }
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
    if listen_rw.is_none() && listen_ro.is_none() {
        return Err(bad(
            "listen_rw",
            "at least one of proxy.listen_rw and proxy.listen_ro is required".into(),
        ));
    }
    if listen_rw.is_some() && listen_rw == listen_ro {
        return Err(bad("listen_ro", "must differ from proxy.listen_rw".into()));
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
    let auth_file = resolve(&raw.auth_file);
    let text = std::fs::read_to_string(&auth_file).map_err(|e| {
        bad(
            "auth_file",
            format!("cannot read {}: {e}", auth_file.display()),
        )
    })?;
    crate::proxy::auth::AuthFile::parse(&text)
        .map_err(|e| bad("auth_file", format!("{}: {e}", auth_file.display())))?;
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
    Ok(ProxyConfig {
        path: path.to_path_buf(),
        name,
        listen_rw,
        listen_ro,
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
        server_passfile,
        max_message_size: raw.max_message_size,
        tls,
        ttl: raw.ttl,
        api_listen,
        auto,
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
fn default_true() -> bool {
    true
}
fn default_max_message_size() -> usize {
    16 * 1024 * 1024
}
