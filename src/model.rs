//! Domain values shared by every layer: WAL positions, timelines, member
//! names and the member record each agent publishes to the DCS.
//!
//! These are newtypes so that a byte offset is never confused with a
//! timeline and so that parsing/printing of PostgreSQL's `X/Y` notation lives
//! in exactly one place.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A WAL position (PostgreSQL `pg_lsn`), ordered, printed as `X/Y`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Bytes by which `self` trails `ahead` (0 when `self` is not behind).
    pub fn lag_behind(self, ahead: Lsn) -> u64 {
        ahead.0.saturating_sub(self.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid LSN {0:?}: expected two hexadecimal numbers separated by '/'")]
pub struct LsnParseError(String);

impl FromStr for Lsn {
    type Err = LsnParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A PostgreSQL timeline id. A promotion starts a new, higher timeline.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timeline(pub u32);

impl fmt::Display for Timeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0.to_string())
    }
}

/// A member's name: unique within a cluster, used in DCS keys and slot names.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MemberName(pub String);

impl MemberName {
    pub fn new(s: impl Into<String>) -> Self {
        MemberName(s.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// Physical replication slot name for this member on the leader.
    /// Slot names allow only `[a-z0-9_]`, so anything else becomes `_`.
    /// The `pgha_` prefix marks the slots pgha manages: it drops those of
    /// departed members and never touches anyone else's.
    pub fn slot_name(&self) -> String {
        let mut s: String = String::from(SLOT_PREFIX);
        s += &self
            .0
            .chars()
            .map(|c| {
                let c = c.to_ascii_lowercase();
                if c.is_ascii_lowercase() || c.is_ascii_digit() {
                    c
                } else {
                    '_'
                }
            })
            .collect::<String>();
        s.truncate(63);
        s
    }
    /// Member names end up in DCS keys, slot names and file names: keep
    /// them to a conservative alphabet.
    pub fn is_valid(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    }
}

/// Prefix of the physical replication slots pgha creates and drops.
pub const SLOT_PREFIX: &str = "pgha_";

impl fmt::Display for MemberName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl From<&str> for MemberName {
    fn from(s: &str) -> Self {
        MemberName(s.to_string())
    }
}

/// What the local PostgreSQL is, as far as its own server says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PgRole {
    /// Not in recovery: accepts writes.
    Primary,
    /// In recovery (hot standby).
    Replica,
    /// Not running or not answering.
    Unknown,
}

/// Observable state of a member's PostgreSQL, published in its record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PgState {
    /// Primary accepting connections.
    Running,
    /// Replica receiving WAL from its upstream.
    Streaming,
    /// Replica up but not receiving WAL (upstream gone, catching up from archive...).
    InRecovery,
    Starting,
    Stopping,
    Stopped,
    /// Not running although it should be.
    Crashed,
    /// Data directory being created by pg_basebackup.
    Cloning,
    /// pg_rewind in progress.
    Rewinding,
    /// Bootstrapping a brand new cluster (initdb).
    Initializing,
}

impl fmt::Display for PgState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            PgState::Running => "running",
            PgState::Streaming => "streaming",
            PgState::InRecovery => "in recovery",
            PgState::Starting => "starting",
            PgState::Stopping => "stopping",
            PgState::Stopped => "stopped",
            PgState::Crashed => "crashed",
            PgState::Cloning => "cloning",
            PgState::Rewinding => "rewinding",
            PgState::Initializing => "initializing",
        };
        f.write_str(s)
    }
}

/// The record each agent publishes under `members/<name>` every loop.
///
/// It is JSON so that operators can read it with `etcdctl get`, and every
/// field that a later version might add is optional on decode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub name: MemberName,
    /// Base URL of the member's REST API, e.g. `http://127.0.0.1:8008`.
    pub api_url: String,
    /// Address other members and clients use to reach this PostgreSQL.
    pub host: String,
    pub port: u16,
    pub role: PgRole,
    pub state: PgState,
    #[serde(default)]
    pub timeline: Option<Timeline>,
    /// Primary: current WAL insert/flush position. Replica: last received.
    #[serde(default)]
    pub received_lsn: Option<Lsn>,
    #[serde(default)]
    pub replayed_lsn: Option<Lsn>,
    /// Primary: `pg_current_wal_flush_lsn()`.
    #[serde(default)]
    pub flushed_lsn: Option<Lsn>,
    /// The member this replica streams from, when streaming.
    #[serde(default)]
    pub upstream: Option<MemberName>,
    /// 0 means "never promote"; higher wins ties at equal WAL position.
    #[serde(default = "default_priority")]
    pub priority: u32,
    #[serde(default)]
    pub nofailover: bool,
    /// Never chosen as a synchronous standby.
    #[serde(default)]
    pub nosync: bool,
    /// Why the agent did what it did on its last loop (human readable).
    #[serde(default)]
    pub last_decision: Option<String>,
    /// Unix time (ms) when the record was written; for display only,
    /// liveness comes from the key's lease.
    #[serde(default)]
    pub updated_at_ms: u64,
    /// Server parameters waiting for a restart, or refused by this member.
    #[serde(default, skip_serializing_if = "ParameterStatus::is_clean")]
    pub parameters: ParameterStatus,
    /// Its data directory holds a primary pgha never managed, which it
    /// adopts as the first leader while the cluster is new (members with
    /// an empty directory wait for it instead of creating an empty one).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adoptable: bool,
}

/// What a member made of the server parameters it was given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ParameterStatus {
    /// Parameters whose new value takes effect only after a restart of
    /// this member's server (`pg_settings.pending_restart`); pgha never
    /// restarts for them by itself.
    pub pending_restart: Vec<String>,
    /// Cluster-wide parameters this member refused, with PostgreSQL's
    /// reason; it keeps running with the previous value.
    pub rejected: BTreeMap<String, String>,
}

impl ParameterStatus {
    pub fn is_clean(&self) -> bool {
        self.pending_restart.is_empty() && self.rejected.is_empty()
    }
}

fn default_priority() -> u32 {
    100
}

impl MemberRecord {
    /// The most advanced WAL position this member is known to hold.
    pub fn wal_position(&self) -> Option<Lsn> {
        [self.received_lsn, self.replayed_lsn, self.flushed_lsn]
            .into_iter()
            .flatten()
            .max()
    }

    /// Failover-ineligible by configuration.
    pub fn never_promote(&self) -> bool {
        self.nofailover || self.priority == 0
    }
}

/// A timeline switch, appended to `history` in the DCS by the new leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub old_timeline: Timeline,
    pub new_timeline: Timeline,
    /// WAL position at which the new timeline branched off.
    pub switch_lsn: Lsn,
    pub at_unix_ms: u64,
    pub reason: String,
    pub old_leader: Option<MemberName>,
    pub new_leader: MemberName,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_text() {
        for (text, value) in [
            ("0/0", 0u64),
            ("0/3000060", 0x300_0060),
            ("16/B374D848", 0x16_B374_D848),
        ] {
            let lsn: Lsn = text.parse().unwrap();
            assert_eq!(lsn, Lsn(value));
            assert_eq!(lsn.to_string(), text);
        }
    }

    #[test]
    fn lsn_rejects_garbage() {
        for bad in ["", "0", "0/", "/0", "G/0", "0/1/2", "123456789/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn lsn_lag() {
        assert_eq!(Lsn(10).lag_behind(Lsn(25)), 15);
        assert_eq!(Lsn(30).lag_behind(Lsn(25)), 0);
    }

    #[test]
    fn slot_names_are_postgres_safe() {
        assert_eq!(MemberName::from("Node-1.a").slot_name(), "pgha_node_1_a");
        assert_eq!(MemberName::from(&*"x".repeat(63)).slot_name().len(), 63);
    }

    #[test]
    fn member_record_encoding_is_stable() {
        let rec = MemberRecord {
            name: "node1".into(),
            api_url: "http://127.0.0.1:8008".into(),
            host: "127.0.0.1".into(),
            port: 5432,
            role: PgRole::Replica,
            state: PgState::Streaming,
            timeline: Some(Timeline(2)),
            received_lsn: Some(Lsn(0x300_0060)),
            replayed_lsn: Some(Lsn(0x300_0000)),
            flushed_lsn: None,
            upstream: Some("node2".into()),
            priority: 100,
            nofailover: false,
            nosync: false,
            last_decision: None,
            updated_at_ms: 1,
            parameters: Default::default(),
            adoptable: false,
        };
        let json = serde_json::to_string(&rec).unwrap();
        assert_eq!(
            json,
            r#"{"name":"node1","api_url":"http://127.0.0.1:8008","host":"127.0.0.1","port":5432,"role":"replica","state":"streaming","timeline":2,"received_lsn":"0/3000060","replayed_lsn":"0/3000000","flushed_lsn":null,"upstream":"node2","priority":100,"nofailover":false,"nosync":false,"last_decision":null,"updated_at_ms":1}"#
        );
        let back: MemberRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, rec);
        assert_eq!(back.wal_position(), Some(Lsn(0x300_0060)));
    }

    #[test]
    fn member_record_tolerates_missing_optional_fields() {
        let json = r#"{"name":"n","api_url":"http://x","host":"h","port":1,"role":"primary","state":"running"}"#;
        let rec: MemberRecord = serde_json::from_str(json).unwrap();
        assert_eq!(rec.priority, 100);
        assert!(rec.timeline.is_none());
    }
}
