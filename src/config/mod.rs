//! Configuration: one TOML file per node.
//!
//! Loading happens in two stages, so that every later stage can trust its
//! input: [`raw`] mirrors the file (serde, unknown keys rejected), and
//! [`validate`] turns it into a typed [`Config`] or a [`ConfigError`] that
//! names the file and the key. Nothing is started or written before this
//! succeeds. Every key is documented in `docs/configuration.md`.

pub mod backup;
pub mod bootstrap;
mod error;
pub mod proxy;
pub mod raw;
mod validate;
pub mod vip;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::ConfigError;
pub use proxy::{PoolMode, ProxyConfig, ProxyFileConfig};
pub use vip::VipConfig;

use crate::model::MemberName;
use crate::secret::SecretString;

/// A validated node configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file this came from (for messages).
    pub path: PathBuf,
    pub cluster: String,
    pub namespace: String,
    pub name: MemberName,
    pub state_dir: PathBuf,
    pub etcd: EtcdConfig,
    pub ha: HaConfig,
    pub postgres: PostgresConfig,
    pub api: ApiConfig,
    /// `[proxy]`: run the connection proxy inside the agent.
    pub proxy: Option<proxy::ProxyConfig>,
    /// `[backup]`: absent when the cluster has no backup repository.
    pub backup: Option<backup::BackupConfig>,
    /// `[bootstrap]`: how a new cluster gets its first database.
    pub bootstrap: bootstrap::BootstrapConfig,
    /// `[vip]`: a floating address that follows the writable leader.
    pub vip: Option<vip::VipConfig>,
}

#[derive(Clone, Debug)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub credentials: Option<(String, SecretString)>,
    /// Set exactly when the endpoints are `https://` (all of them: the
    /// etcd client has one TLS setting for every endpoint).
    pub tls: Option<EtcdTls>,
}

/// How the etcd client speaks TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    /// CA certificates to verify the etcd servers with; `None`: the
    /// system's trusted roots.
    pub ca_file: Option<PathBuf>,
    /// The certificate presented to etcd (for `--client-cert-auth`).
    pub client: Option<ClientCertificate>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCertificate {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Timing and election settings. The relations between the durations are
/// explained in `validate.rs` and `docs/configuration.md`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HaConfig {
    pub ttl: Duration,
    pub loop_wait: Duration,
    pub retry_timeout: Duration,
    pub fence_margin: Duration,
    pub priority: u32,
    pub nofailover: bool,
    pub maximum_lag_on_failover: u64,
    /// How long a crashed primary may take to come back in place before
    /// the leader gives the lease up so that a replica takes over.
    pub primary_start_timeout: Duration,
    /// How long a replica may fail to stream from the leader before it is
    /// assumed diverged and rewound.
    pub stream_stall_timeout: Duration,
    pub reclone_on_rewind_failure: bool,
    pub nosync: bool,
}

impl Default for HaConfig {
    fn default() -> Self {
        let raw = raw::RawHa::default();
        HaConfig {
            ttl: raw.ttl,
            loop_wait: raw.loop_wait,
            retry_timeout: raw.retry_timeout,
            fence_margin: raw.fence_margin,
            priority: raw.priority,
            nofailover: raw.nofailover,
            maximum_lag_on_failover: raw.maximum_lag_on_failover,
            primary_start_timeout: raw.primary_start_timeout,
            stream_stall_timeout: raw.stream_stall_timeout,
            reclone_on_rewind_failure: raw.reclone_on_rewind_failure,
            nosync: raw.nosync,
        }
    }
}

#[derive(Clone, Debug)]
pub struct RoleCredentials {
    pub username: String,
    pub password: SecretString,
}

#[derive(Clone, Debug)]
pub struct PostgresConfig {
    pub bin_dir: PathBuf,
    pub data_dir: PathBuf,
    pub listen_addresses: String,
    pub connect_host: String,
    pub port: u16,
    pub os_user: String,
    pub superuser: RoleCredentials,
    pub replication: RoleCredentials,
    pub replication_networks: Vec<String>,
    pub client_networks: Vec<String>,
    pub pg_hba: Vec<String>,
    /// Extra server parameters, values already rendered as text.
    pub parameters: BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    pub connect_url: String,
    /// Basic-auth credentials for actions.
    pub basic_auth: Option<(String, SecretString)>,
    pub token: Option<SecretString>,
    pub public_read: bool,
    pub tls: Option<TlsConfig>,
    /// Limits that keep slow or idle clients from holding descriptors
    /// the agent needs for etcd and PostgreSQL.
    pub limits: ApiLimits,
}

/// Per-connection limits of the API server (`[api]` keys of the same
/// names; `docs/configuration.md` explains them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiLimits {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

#[derive(Clone, Debug)]
pub struct TlsConfig {
    pub certificate: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    /// Trusted, beside the system's roots, for the other members' APIs.
    pub ca: Option<PathBuf>,
    /// Certificate and key presented to the other members' APIs (for
    /// their `client_ca`).
    pub client_identity: Option<(PathBuf, PathBuf)>,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(path, &text)
    }

    /// Parses and validates `text` as if read from `path` (relative paths
    /// inside are resolved against `path`'s directory).
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw = validate::parse(path, text)?;
        validate::validate(path, raw)
    }

    /// DCS key prefix for this cluster: `/<namespace>/<cluster>/`.
    pub fn dcs_prefix(&self) -> String {
        format!("/{}/{}/", self.namespace, self.cluster)
    }

    /// The part of the state directory that belongs to the PostgreSQL OS
    /// user (the rest belongs to the agent's account).
    pub fn pg_state_dir(&self) -> PathBuf {
        self.state_dir.join(crate::postgres::ctl::PG_SUBDIR)
    }

    /// Where the agent keeps the libpq passfile it hands to PostgreSQL tools.
    pub fn passfile_path(&self) -> PathBuf {
        self.pg_state_dir().join("pgpass")
    }

    /// Directory for PostgreSQL's unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.pg_state_dir().join("run")
    }

    /// PostgreSQL's server log (written by the server, as its OS user).
    pub fn postgres_log_path(&self) -> PathBuf {
        self.pg_state_dir().join("postgresql.log")
    }
}

#[cfg(test)]
mod tests;
