//! The distributed configuration store (DCS): where members find each
//! other and where the one leader lease lives.
//!
//! The rest of pgha depends only on the [`Dcs`] trait. [`etcd::EtcdDcs`] is
//! the real backend (etcd v3: leases, transactions, watches);
//! [`memory::MemoryDcs`] implements the same contract in memory for unit
//! tests of the agent. The key layout is in [`keys`].
//!
//! Safety rests on two etcd guarantees: a key bound to a lease disappears
//! when the lease is not renewed within its TTL, and a transaction that
//! creates a key only if its `create_revision` is 0 succeeds for exactly
//! one caller.

pub mod etcd;
pub mod keys;
pub mod memory;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{HistoryEntry, MemberName, MemberRecord};

/// State of the `initialize` key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Initialize {
    /// A member won the bootstrap race and is running initdb.
    Pending { by: MemberName },
    /// The cluster exists; the value is PostgreSQL's system identifier.
    Done { system_id: String },
}

/// The `leader` key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderKey {
    pub name: MemberName,
    /// etcd lease the key is bound to; a restarted agent adopts it.
    pub lease_id: i64,
}

/// Cluster-wide settings kept in the DCS (`config` key), changed by
/// operators at run time and obeyed by every agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterConfig {
    /// Maintenance mode: agents take no automatic action.
    pub paused: bool,
    /// Synchronous replication: off, on (degrade to asynchronous when no
    /// standby is available) or strict (commits wait instead).
    pub synchronous_mode: SyncMode,
    /// How many standbys must confirm each commit (k).
    #[serde(default = "one")]
    pub synchronous_node_count: u32,
    /// `ANY k (...)` quorum commit instead of `FIRST k (...)`.
    pub synchronous_quorum: bool,
    /// Keep the primary writable through an etcd outage while every known
    /// member confirms it over the REST API (docs/architecture.md, S2a).
    pub failsafe_mode: bool,
    /// Server parameters for every member (`postgresql.parameters.NAME`).
    #[serde(skip_serializing_if = "PostgresqlSettings::is_empty")]
    pub postgresql: PostgresqlSettings,
}

/// The `postgresql` table of the cluster configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PostgresqlSettings {
    /// Name to value, as text (what postgresql.conf would hold).
    pub parameters: BTreeMap<String, String>,
}

impl PostgresqlSettings {
    pub fn is_empty(&self) -> bool {
        self.parameters.is_empty()
    }
}

impl ClusterConfig {
    /// Prefix of the keys that set one server parameter each.
    pub const PARAMETER_PREFIX: &'static str = "postgresql.parameters.";

    /// The keys operators may set; [`ClusterConfig::set`] rejects others.
    pub const KEYS: &'static [&'static str] = &[
        "paused",
        "synchronous_mode",
        "synchronous_node_count",
        "synchronous_quorum",
        "failsafe_mode",
        "postgresql.parameters.NAME",
    ];

    /// Sets one key from its text form (`pgha config set key=value`).
    /// `postgresql.parameters.NAME=` (empty) removes that parameter.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        if let Some(name) = key.strip_prefix(Self::PARAMETER_PREFIX) {
            let parameters = &mut self.postgresql.parameters;
            if value.is_empty() {
                parameters.remove(name);
                return Ok(());
            }
            crate::postgres::params::check_cluster_parameter(name, value)
                .map_err(|reason| format!("{key} {reason}"))?;
            parameters.insert(name.to_string(), value.to_string());
            return Ok(());
        }
        let bad = |what: &str| Err(format!("{key}: {value:?} is not {what}"));
        let boolean = |v: &str| match v {
            "true" | "on" | "yes" => Some(true),
            "false" | "off" | "no" => Some(false),
            _ => None,
        };
        match key {
            "paused" => match boolean(value) {
                Some(b) => self.paused = b,
                None => return bad("true or false"),
            },
            "synchronous_quorum" => match boolean(value) {
                Some(b) => self.synchronous_quorum = b,
                None => return bad("true or false"),
            },
            "failsafe_mode" => match boolean(value) {
                Some(b) => self.failsafe_mode = b,
                None => return bad("true or false"),
            },
            "synchronous_mode" => {
                self.synchronous_mode = match value {
                    "off" | "false" => SyncMode::Off,
                    "on" | "true" => SyncMode::On,
                    "strict" => SyncMode::Strict,
                    _ => return bad("off, on or strict"),
                }
            }
            "synchronous_node_count" => match value.parse::<u32>() {
                Ok(n) if (1..=16).contains(&n) => self.synchronous_node_count = n,
                _ => return bad("a number from 1 to 16"),
            },
            _ => {
                return Err(format!(
                    "unknown key {key:?}; known keys: {}",
                    Self::KEYS.join(", ")
                ));
            }
        }
        Ok(())
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            paused: false,
            synchronous_mode: SyncMode::On,
            synchronous_node_count: 1,
            synchronous_quorum: false,
            failsafe_mode: true,
            postgresql: PostgresqlSettings::default(),
        }
    }
}

fn one() -> u32 {
    1
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    #[default]
    Off,
    On,
    Strict,
}

impl std::fmt::Display for SyncMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            SyncMode::Off => "off",
            SyncMode::On => "on",
            SyncMode::Strict => "strict",
        })
    }
}

/// The `sync` key: which members may hold every acknowledged commit.
///
/// Invariant kept by the leader: every acknowledged commit is on at least
/// `quorum` members of `members`. So a failover that sees
/// `members.len() - quorum + 1` of them has seen at least one member with
/// every acknowledged commit, and promotes the most advanced it saw.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRecord {
    /// The leader that wrote it.
    pub leader: MemberName,
    pub members: Vec<MemberName>,
    /// k: how many of `members` confirm each commit.
    pub quorum: u32,
    /// Mode `on` with no synchronous standby: commits are acknowledged by
    /// the leader alone and nobody may be promoted automatically.
    #[serde(default)]
    pub degraded: bool,
}

/// The members a leader in failsafe mode must hear from (`failsafe` key),
/// written by the leader whenever its membership changes. With
/// `failsafe_mode` on, a member that is not listed never races for the
/// leader key: the leader would not ask it before staying writable
/// through an etcd outage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailsafeRecord {
    /// The leader that wrote it.
    pub leader: MemberName,
    /// Every known member (the leader included) and its API address.
    pub members: BTreeMap<MemberName, String>,
}

/// A pending switchover (planned, a healthy leader hands over) or failover
/// (operator-forced promotion when there is no healthy leader).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRequest {
    /// For a switchover: the leader that must hand over. None for failover.
    #[serde(default)]
    pub from: Option<MemberName>,
    /// Target; None lets the cluster choose the best candidate.
    #[serde(default)]
    pub to: Option<MemberName>,
    /// Unix time (ms) before which a switchover must not start.
    #[serde(default)]
    pub not_before_unix_ms: Option<u64>,
    /// Operator accepted that the target may lack acknowledged commits.
    #[serde(default)]
    pub accept_data_loss: bool,
    pub requested_at_unix_ms: u64,
}

impl std::fmt::Display for FailoverRequest {
    /// What an operator needs to recognise a pending request: "from node1
    /// to node2, scheduled at ..., requested at ...". (`from` is set for
    /// failovers too, when a leader key existed, so the kind is not told.)
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let time = |ms: u64| {
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms))
        };
        if let Some(from) = &self.from {
            write!(f, "from {from} ")?;
        }
        match &self.to {
            Some(to) => write!(f, "to {to}")?,
            None => write!(f, "to the best candidate")?,
        }
        if let Some(at) = self.not_before_unix_ms {
            write!(f, ", scheduled at {}", time(at))?;
        }
        if self.accept_data_loss {
            write!(f, ", accepting data loss")?;
        }
        write!(f, ", requested at {}", time(self.requested_at_unix_ms))
    }
}

/// What a live proxy publishes about itself (`proxies/<name>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyRecord {
    pub name: String,
    /// The read-write listener as `host:port`; None when disabled.
    pub rw: Option<String>,
    pub ro: Option<String>,
    /// Runs inside an agent (`[proxy]` in a node's file).
    pub auto: bool,
    pub state: ProxyState,
    /// Revision of the `failover` key this proxy drained for, during a
    /// switchover; None otherwise.
    #[serde(default)]
    pub drained_for: Option<i64>,
    /// How long this proxy lets running transactions finish before it
    /// cancels them (`drain_timeout`); the leader waits that long for its
    /// acknowledgement, and a little more.
    #[serde(default)]
    pub drain_timeout_ms: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyState {
    /// Routing read-write transactions to the leader.
    Serving,
    /// No primary: new read-write transactions wait.
    Holding,
    /// A switchover is due: no new read-write transactions, running ones finishing.
    Draining,
    /// No read-write transaction left on the old leader.
    Drained,
}

impl std::fmt::Display for ProxyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            ProxyState::Serving => "serving",
            ProxyState::Holding => "holding",
            ProxyState::Draining => "draining",
            ProxyState::Drained => "drained",
        })
    }
}

/// The revision of a key's last write, as etcd's `mod_revision`;
/// [`Revision::ABSENT`] (0) when the key does not exist.
///
/// Writes of keys that several operators edit (`config`, `failover`) take
/// the revision their caller read and are refused with
/// [`DcsError::Conflict`] when the key changed since: a write based on a
/// stale read must never silently undo someone else's change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(pub i64);

impl Revision {
    /// The key does not exist: a write conditioned on it creates the key
    /// only if nobody else did.
    pub const ABSENT: Revision = Revision(0);
}

impl std::fmt::Display for Revision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if *self == Revision::ABSENT {
            f.pad("absent")
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// Everything under the cluster prefix, read in one consistent range read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterView {
    pub initialize: Option<Initialize>,
    pub leader: Option<LeaderKey>,
    pub members: BTreeMap<MemberName, MemberRecord>,
    pub config: ClusterConfig,
    /// Revision of the `config` key as read; pass it to
    /// [`Dcs::put_config`] (or use [`update_config`]).
    pub config_revision: Revision,
    pub history: Vec<HistoryEntry>,
    pub failover: Option<FailoverRequest>,
    /// Revision of the `failover` key as read (ABSENT when no request is
    /// pending); [`Dcs::put_failover`] and [`Dcs::clear_failover`] take it.
    pub failover_revision: Revision,
    pub sync: Option<SyncRecord>,
    pub failsafe: Option<FailsafeRecord>,
    /// Live proxies (`proxies/<name>`, each bound to its proxy's lease).
    pub proxies: BTreeMap<String, ProxyRecord>,
    /// etcd revision of the read, to tell fresh views from stale ones.
    pub revision: i64,
}

impl ClusterView {
    pub fn leader_record(&self) -> Option<&MemberRecord> {
        self.leader.as_ref().and_then(|l| self.members.get(&l.name))
    }

    /// Bytes `member` trails the leader's published position (0 for the
    /// leader itself); `None` when either position is unknown.
    pub fn lag_of(&self, member: &MemberRecord) -> Option<u64> {
        if self.leader.as_ref().is_some_and(|l| l.name == member.name) {
            return Some(0);
        }
        let leader = self.leader_record().and_then(MemberRecord::wal_position)?;
        Some(member.wal_position()?.lag_behind(leader))
    }
}

/// What went wrong talking to the DCS. `Unavailable` is the one that the
/// agent treats as "cannot prove I still hold the lease".
#[derive(Debug, thiserror::Error)]
pub enum DcsError {
    #[error("etcd unavailable while trying to {action}")]
    Unavailable {
        action: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("etcd did not answer within {timeout:?} while trying to {action}")]
    Timeout {
        action: &'static str,
        timeout: Duration,
    },
    #[error("cannot read the etcd TLS file {}", path.display())]
    TlsFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed value under {key}: {message}")]
    Malformed { key: String, message: String },
    #[error("the leader key is not held by this member")]
    NotLeader,
    /// A conditional write found the key at another revision than the
    /// one its caller read: someone else wrote it in between.
    #[error("{key} was changed by another writer (read at revision {expected}, now {actual})")]
    Conflict {
        key: String,
        expected: Revision,
        actual: Revision,
    },
}

/// Result of a renewal: until when the caller may act as leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseRenewal {
    /// The etcd lease the leader key is bound to.
    pub lease_id: i64,
    /// `CLOCK_BOOTTIME` ms before which the lease cannot have expired:
    /// the time the renewal request was *sent* plus the TTL.
    pub valid_until_ms: u64,
}

/// The operations pgha needs from a consensus store.
///
/// Every call is bounded by the backend's timeout; none retries forever.
#[async_trait::async_trait]
pub trait Dcs: Send + Sync {
    /// One consistent read of the whole cluster state.
    async fn read_cluster(&self) -> Result<ClusterView, DcsError>;

    /// Races to create `initialize` as `pending:<me>`. True for exactly one
    /// caller over the life of the cluster (unless it abandons).
    async fn claim_initialize(&self) -> Result<bool, DcsError>;
    /// Records the system identifier once bootstrap succeeded.
    async fn complete_initialize(&self, system_id: &str) -> Result<(), DcsError>;
    /// Gives the claim up after a failed bootstrap, so another member may try.
    async fn abandon_initialize(&self) -> Result<(), DcsError>;

    /// Creates the leader key bound to a fresh lease if nobody holds it.
    /// `Some` when this member is now the leader.
    async fn acquire_leader(&self) -> Result<Option<LeaseRenewal>, DcsError>;
    /// Takes over the lease of a leader key that already names this member
    /// (the agent restarted while its lease was still alive).
    async fn adopt_leader(&self, lease_id: i64) -> Result<Option<LeaseRenewal>, DcsError>;
    /// Renews the leader lease. `Ok(None)` when the lease is gone.
    async fn renew_leader(&self) -> Result<Option<LeaseRenewal>, DcsError>;
    /// Deletes the leader key (if still ours) and revokes the lease, so the
    /// others need not wait for the TTL.
    async fn release_leader(&self) -> Result<(), DcsError>;

    /// Publishes this member's record, bound to a member lease that is
    /// renewed by this call.
    async fn put_member(&self, record: &MemberRecord) -> Result<(), DcsError>;
    async fn delete_member(&self) -> Result<(), DcsError>;

    /// Appends to `history`; only succeeds while this member holds the leader key.
    async fn append_history(&self, entry: &HistoryEntry) -> Result<(), DcsError>;
    /// Writes the synchronous set; only succeeds while this member holds
    /// the leader key.
    async fn put_sync(&self, record: &SyncRecord) -> Result<(), DcsError>;
    /// Writes the failsafe membership; only while holding the leader key.
    async fn put_failsafe(&self, record: &FailsafeRecord) -> Result<(), DcsError>;

    /// Writes the cluster-wide configuration if the `config` key is still
    /// at `expected` (the revision the caller read it at; ABSENT: only if
    /// it does not exist). Returns the new revision; [`DcsError::Conflict`]
    /// when another writer got there first. See [`update_config`].
    async fn put_config(
        &self,
        config: &ClusterConfig,
        expected: Revision,
    ) -> Result<Revision, DcsError>;
    /// Records a switchover/failover request if the `failover` key is
    /// still at `expected`. With ABSENT the write only creates: a pending
    /// request is never replaced unless the caller read it and passes its
    /// revision (an explicit replace).
    async fn put_failover(
        &self,
        request: &FailoverRequest,
        expected: Revision,
    ) -> Result<Revision, DcsError>;
    /// Deletes the request read at `expected`; a request written since
    /// (a newer one) is left alone and reported as [`DcsError::Conflict`].
    async fn clear_failover(&self, expected: Revision) -> Result<(), DcsError>;

    /// Waits until something under the cluster prefix changes, or `timeout`.
    /// Lets the agent react to a released lease within milliseconds instead
    /// of a full loop.
    async fn wait_for_change(&self, timeout: Duration);
}

/// How many times [`update_config`] reads and writes before giving up.
/// Every conflict means another writer succeeded, so attempts run out only
/// when more writers than this edit the key at the same instant.
pub const CONFIG_WRITE_ATTEMPTS: u32 = 5;

/// The outcome of [`update_config`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigUpdate {
    /// The configuration the edit was applied to (the last read).
    pub before: ClusterConfig,
    pub after: ClusterConfig,
    /// Revision of the `config` key after the update.
    pub revision: Revision,
    /// Reads it took: more than 1 when another writer got in between.
    pub attempts: u32,
}

impl ConfigUpdate {
    pub fn changed(&self) -> bool {
        self.before != self.after
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpdateConfigError {
    /// The edit refused the current configuration (an invalid value).
    #[error("{0}")]
    Invalid(String),
    /// etcd failed, or other writers kept winning for
    /// [`CONFIG_WRITE_ATTEMPTS`] rounds ([`DcsError::Conflict`]).
    #[error(transparent)]
    Dcs(#[from] DcsError),
}

/// Read-modify-write of the `config` key without lost updates: reads it,
/// applies `edit` to what it read, and writes conditioned on the revision
/// read. When another writer changed the key in between, it starts again
/// from the fresh value, so both changes land. `edit` must therefore be
/// an idempotent edit of named keys ("set paused to true"), not a value
/// computed from elsewhere. Nothing is written when `edit` changes nothing.
pub async fn update_config(
    dcs: &dyn Dcs,
    mut edit: impl FnMut(&ClusterConfig) -> Result<ClusterConfig, String>,
) -> Result<ConfigUpdate, UpdateConfigError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let view = dcs.read_cluster().await?;
        let after = edit(&view.config).map_err(UpdateConfigError::Invalid)?;
        if after == view.config {
            return Ok(ConfigUpdate {
                before: view.config,
                after,
                revision: view.config_revision,
                attempts,
            });
        }
        match dcs.put_config(&after, view.config_revision).await {
            Ok(revision) => {
                return Ok(ConfigUpdate {
                    before: view.config,
                    after,
                    revision,
                    attempts,
                });
            }
            // Another writer succeeded: no backoff needed, the retry
            // cannot collide with that writer again.
            Err(DcsError::Conflict { .. }) if attempts < CONFIG_WRITE_ATTEMPTS => {}
            Err(e) => return Err(e.into()),
        }
    }
}
