//! The configuration file as written: serde types that mirror the TOML
//! exactly, with defaults, and nothing else. Turning this into values the
//! rest of pgha can trust happens in `validate.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::secret::SecretString;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Cluster name: every member of one cluster uses the same value.
    pub cluster: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// This member's name, unique within the cluster.
    pub name: String,
    /// Files the agent owns besides the data directory (passfile, fence
    /// state, unix sockets). Default: `<data_dir>.pgha`.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    pub etcd: RawEtcd,
    #[serde(default)]
    pub ha: RawHa,
    pub postgres: RawPostgres,
    #[serde(default)]
    pub api: RawApi,
    /// The connection proxy, run inside the agent (`docs/proxy.md`).
    #[serde(default)]
    pub proxy: Option<super::proxy::RawProxy>,
    #[serde(default)]
    pub backup: Option<super::backup::RawBackup>,
    /// How a new cluster gets its first database (initdb or a backup).
    #[serde(default)]
    pub bootstrap: Option<super::bootstrap::RawBootstrap>,
    /// A floating address held by the writable leader only.
    #[serde(default)]
    pub vip: Option<super::vip::RawVip>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEtcd {
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<SecretString>,
    /// CA certificates that sign the etcd servers' certificates (https
    /// endpoints); default: the system's trusted roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate for etcd's `--client-cert-auth`, with `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHa {
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub ttl: std::time::Duration,
    #[serde(default = "default_loop_wait", with = "humantime_serde")]
    pub loop_wait: std::time::Duration,
    #[serde(default = "default_retry_timeout", with = "humantime_serde")]
    pub retry_timeout: std::time::Duration,
    #[serde(default = "default_fence_margin", with = "humantime_serde")]
    pub fence_margin: std::time::Duration,
    #[serde(default = "default_priority")]
    pub priority: u32,
    #[serde(default)]
    pub nofailover: bool,
    #[serde(default = "default_max_lag")]
    pub maximum_lag_on_failover: u64,
    #[serde(default = "default_primary_start_timeout", with = "humantime_serde")]
    pub primary_start_timeout: std::time::Duration,
    #[serde(default = "default_stream_stall_timeout", with = "humantime_serde")]
    pub stream_stall_timeout: std::time::Duration,
    #[serde(default = "default_true")]
    pub reclone_on_rewind_failure: bool,
    /// Never chosen as a synchronous standby.
    #[serde(default)]
    pub nosync: bool,
}

impl Default for RawHa {
    fn default() -> Self {
        RawHa {
            ttl: default_ttl(),
            loop_wait: default_loop_wait(),
            retry_timeout: default_retry_timeout(),
            fence_margin: default_fence_margin(),
            priority: default_priority(),
            nofailover: false,
            maximum_lag_on_failover: default_max_lag(),
            primary_start_timeout: default_primary_start_timeout(),
            stream_stall_timeout: default_stream_stall_timeout(),
            reclone_on_rewind_failure: true,
            nosync: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostgres {
    #[serde(default = "default_bin_dir")]
    pub bin_dir: PathBuf,
    pub data_dir: PathBuf,
    #[serde(default = "default_listen")]
    pub listen_addresses: String,
    /// Address other members and clients use; default: the first of
    /// `listen_addresses` (or 127.0.0.1 for `*`).
    #[serde(default)]
    pub connect_host: Option<String>,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    #[serde(default = "default_os_user")]
    pub os_user: String,
    pub superuser: RawRole,
    pub replication: RawRole,
    /// Networks (CIDR) allowed to open replication connections.
    #[serde(default = "default_networks")]
    pub replication_networks: Vec<String>,
    /// Networks (CIDR) allowed to open client connections (all databases, all users, SCRAM).
    #[serde(default = "default_networks")]
    pub client_networks: Vec<String>,
    /// Extra pg_hba.conf lines, appended after pgha's own.
    #[serde(default)]
    pub pg_hba: Vec<String>,
    /// Extra server parameters (postgresql.conf).
    #[serde(default)]
    pub parameters: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRole {
    pub username: String,
    pub password: SecretString,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    #[serde(default = "default_api_listen")]
    pub listen: String,
    /// URL other members use to reach this API; default `http://<listen>`.
    #[serde(default)]
    pub connect_url: Option<String>,
    /// HTTP basic-auth credentials for actions (and reads when
    /// `public_read = false`).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<SecretString>,
    /// Bearer token accepted as an alternative to basic auth.
    #[serde(default)]
    pub token: Option<SecretString>,
    /// Whether status and health endpoints are served without credentials.
    #[serde(default = "default_true")]
    pub public_read: bool,
    #[serde(default)]
    pub tls: Option<RawTls>,
    /// The whole request head (and the TLS handshake) must arrive within
    /// this much of the connection's first byte.
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: std::time::Duration,
    /// A request body must arrive within this much of its head.
    #[serde(default = "default_body_read_timeout", with = "humantime_serde")]
    pub body_read_timeout: std::time::Duration,
    /// A keep-alive connection with no request in progress is closed
    /// after this long.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: std::time::Duration,
    /// The most client connections the API holds at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub certificate: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// CA certificates the agent trusts for the other members' APIs.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The certificate this agent presents to the other members' APIs.
    #[serde(default)]
    pub client_certificate: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

impl Default for RawApi {
    fn default() -> Self {
        RawApi {
            listen: default_api_listen(),
            connect_url: None,
            username: None,
            password: None,
            token: None,
            public_read: true,
            tls: None,
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
            idle_timeout: default_idle_timeout(),
            max_connections: default_max_connections(),
        }
    }
}

fn default_namespace() -> String {
    "pgha".into()
}
fn default_ttl() -> std::time::Duration {
    std::time::Duration::from_secs(3)
}
fn default_loop_wait() -> std::time::Duration {
    std::time::Duration::from_millis(500)
}
fn default_retry_timeout() -> std::time::Duration {
    std::time::Duration::from_millis(1000)
}
fn default_fence_margin() -> std::time::Duration {
    std::time::Duration::from_millis(500)
}
fn default_priority() -> u32 {
    100
}
fn default_max_lag() -> u64 {
    1024 * 1024
}
fn default_primary_start_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}
fn default_stream_stall_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(15)
}
fn default_true() -> bool {
    true
}
fn default_bin_dir() -> PathBuf {
    PathBuf::from("/usr/lib/postgresql/15/bin")
}
fn default_listen() -> String {
    "127.0.0.1".into()
}
fn default_pg_port() -> u16 {
    5432
}
fn default_os_user() -> String {
    "postgres".into()
}
fn default_networks() -> Vec<String> {
    vec!["127.0.0.1/32".into()]
}
fn default_api_listen() -> String {
    "127.0.0.1:8008".into()
}
fn default_header_read_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(5)
}
fn default_body_read_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}
fn default_idle_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}
fn default_max_connections() -> usize {
    256
}
