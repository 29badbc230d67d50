//! Read-only views: this member (`/`, `/status`), the whole cluster
//! (`/cluster`), the timeline history (`/history`) and the cluster-wide
//! dynamic configuration (`/config`).
//!
//! `/cluster`, `/history` and `/config` come from the DCS view of the
//! agent's last loop (at most `loop_wait` old), so polling them costs etcd
//! nothing.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use serde::{Deserialize, Serialize};

use super::health::is_synchronous;
use super::{ApiError, AppState, json_error};
use crate::agent::status::AgentStatus;
use crate::dcs::{ClusterView, FailoverRequest, SyncMode, SyncRecord};
use crate::ha::PeerReport;
use crate::model::{HistoryEntry, Lsn, MemberName, MemberRecord, PgRole, PgState, Timeline};

/// `GET /status`: this member as its agent sees it right now. Agents read
/// each other's during leader races: only ever add optional fields.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusReport {
    pub name: MemberName,
    pub role: PgRole,
    pub state: PgState,
    pub timeline: Option<Timeline>,
    pub wal_position: Option<Lsn>,
    pub priority: u32,
    pub nofailover: bool,
    pub leader: bool,
    pub lease_valid: bool,
    pub paused: bool,
    pub dcs_reachable: bool,
    pub last_decision: Option<String>,
    pub upstream: Option<MemberName>,
    /// `pg_stat_archiver` while the server runs (`pgha list` shows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<crate::postgres::observe::ArchiveStatus>,
    /// Failsafe mode: this member's promise, and the leader's last round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failsafe: Option<crate::agent::failsafe::FailsafeStatus>,
    /// `[vip]`: whether this node holds the floating address, and the
    /// last failure to add or remove it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<crate::agent::vip::VipStatus>,
    /// Server parameters waiting for a restart, and cluster-wide ones
    /// this member refused (`postgresql.parameters`).
    #[serde(
        default,
        skip_serializing_if = "crate::model::ParameterStatus::is_clean"
    )]
    pub parameters: crate::model::ParameterStatus,
}

impl StatusReport {
    pub fn peer_report(&self) -> PeerReport {
        PeerReport {
            role: self.role,
            running: matches!(
                self.state,
                PgState::Running | PgState::Streaming | PgState::InRecovery
            ),
            timeline: self.timeline,
            wal_position: self.wal_position,
            priority: self.priority,
            nofailover: self.nofailover,
        }
    }

    /// The report as the answer of member `asked`, whose `api_url` was
    /// queried; `Err` with the name the answer carries when it is another
    /// member's (a `connect_url` pointing at the wrong node, or a wildcard
    /// address that reached the asker itself). Trusting such an answer
    /// would credit `asked` with another member's WAL position in a
    /// leader race.
    pub fn report_of(&self, asked: &MemberName) -> Result<PeerReport, &MemberName> {
        if &self.name == asked {
            Ok(self.peer_report())
        } else {
            Err(&self.name)
        }
    }

    pub fn from_status(s: &AgentStatus) -> Option<StatusReport> {
        let m = s.member.as_ref()?;
        Some(StatusReport {
            name: m.name.clone(),
            role: m.role,
            state: m.state,
            timeline: m.timeline,
            wal_position: s.wal_position,
            priority: m.priority,
            nofailover: m.nofailover,
            leader: s.lease_held,
            lease_valid: s.lease_valid,
            paused: s.paused,
            dcs_reachable: s.dcs_reachable,
            last_decision: s.last_decision.clone(),
            upstream: m.upstream.clone(),
            archive: s.archive.clone(),
            failsafe: s.failsafe.clone(),
            vip: s.vip.clone(),
            parameters: m.parameters.clone(),
        })
    }
}

/// `GET /cluster`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ClusterReport {
    pub cluster: String,
    /// The member whose agent answered.
    pub observed_by: MemberName,
    pub leader: Option<MemberName>,
    /// The leader's timeline.
    pub timeline: Option<Timeline>,
    pub paused: bool,
    pub members: Vec<ClusterMember>,
    pub pending_failover: Option<PendingFailover>,
    /// `off`, `on` or `strict` (from the dynamic configuration).
    pub synchronous_mode: SyncMode,
    /// The current leader's synchronous set, when it has one.
    pub sync: Option<SyncRecord>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ClusterMember {
    pub name: MemberName,
    /// `leader`, `replica`, or `unknown` (stopped, cloning...).
    pub role: &'static str,
    pub state: PgState,
    pub host: String,
    pub port: u16,
    pub api_url: String,
    pub timeline: Option<Timeline>,
    pub wal_position: Option<Lsn>,
    /// Bytes behind the leader; `None` when either position is unknown.
    pub lag_bytes: Option<u64>,
    pub upstream: Option<MemberName>,
    pub priority: u32,
    pub nofailover: bool,
    pub sync_standby: bool,
    pub last_decision: Option<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PendingFailover {
    pub from: Option<MemberName>,
    pub to: Option<MemberName>,
    /// RFC 3339, UTC.
    pub scheduled_at: Option<String>,
    pub accept_data_loss: bool,
    pub requested_at: String,
}

pub(crate) fn rfc3339_ms(unix_ms: u64) -> String {
    humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms),
    )
    .to_string()
}

impl PendingFailover {
    fn from_request(r: &FailoverRequest) -> Self {
        PendingFailover {
            from: r.from.clone(),
            to: r.to.clone(),
            scheduled_at: r.not_before_unix_ms.map(rfc3339_ms),
            accept_data_loss: r.accept_data_loss,
            requested_at: rfc3339_ms(r.requested_at_unix_ms),
        }
    }
}

/// Builds `/cluster` from a DCS view: pure, so it is unit-tested.
pub fn cluster_report(cluster: &str, me: &MemberName, view: &ClusterView) -> ClusterReport {
    let leader = view.leader.as_ref().map(|l| l.name.clone());
    let mut members: Vec<&MemberRecord> = view.members.values().collect();
    members.sort_by_key(|m| (Some(&m.name) != leader.as_ref(), m.name.clone()));
    ClusterReport {
        cluster: cluster.to_string(),
        observed_by: me.clone(),
        timeline: view.leader_record().and_then(|r| r.timeline),
        paused: view.config.paused,
        synchronous_mode: view.config.synchronous_mode,
        sync: view
            .sync
            .clone()
            .filter(|r| leader.as_ref() == Some(&r.leader)),
        pending_failover: view.failover.as_ref().map(PendingFailover::from_request),
        members: members
            .into_iter()
            .map(|m| {
                let is_leader = Some(&m.name) == leader.as_ref();
                ClusterMember {
                    name: m.name.clone(),
                    role: if is_leader {
                        "leader"
                    } else if m.role == PgRole::Replica {
                        "replica"
                    } else {
                        "unknown"
                    },
                    state: m.state,
                    host: m.host.clone(),
                    port: m.port,
                    api_url: m.api_url.clone(),
                    timeline: m.timeline,
                    wal_position: m.wal_position(),
                    lag_bytes: view.lag_of(m),
                    upstream: m.upstream.clone(),
                    priority: m.priority,
                    nofailover: m.nofailover,
                    sync_standby: !is_leader && is_synchronous(Some(view), &m.name),
                    last_decision: m.last_decision.clone(),
                }
            })
            .collect(),
        leader,
    }
}

/// `GET /` and `GET /status`.
pub async fn status(State(app): State<AppState>) -> Response {
    let s = app.status.borrow().clone();
    match StatusReport::from_status(&s) {
        Some(r) => Json(r).into_response(),
        None => json_error(StatusCode::SERVICE_UNAVAILABLE, "agent starting"),
    }
}

/// The DCS view of the agent's last loop, or 503.
fn last_view(app: &AppState) -> Result<ClusterView, ApiError> {
    app.status.borrow().view.clone().ok_or_else(|| {
        ApiError::unavailable(
            "no view of the cluster: the agent is starting or etcd is unreachable",
        )
    })
}

/// `GET /cluster`.
pub async fn cluster(State(app): State<AppState>) -> Response {
    match last_view(&app) {
        Ok(view) => {
            Json(cluster_report(&app.config.cluster, &app.config.name, &view)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// `GET /history`: timeline switches, oldest first.
pub async fn history(State(app): State<AppState>) -> Response {
    match last_view(&app) {
        Ok(view) => Json::<Vec<HistoryEntry>>(view.history).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /config`: the cluster-wide dynamic configuration (the DCS
/// `config` key). It holds no secret; node files are never served.
pub async fn config(State(app): State<AppState>) -> Response {
    match last_view(&app) {
        Ok(view) => Json(view.config).into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcs::LeaderKey;

    fn record(name: &str, role: &str, state: &str, lsn: &str) -> MemberRecord {
        serde_json::from_value(serde_json::json!({
            "name": name, "api_url": format!("http://{name}"), "host": "h", "port": 1,
            "role": role, "state": state, "timeline": 3, "received_lsn": lsn,
        }))
        .unwrap()
    }

    #[test]
    fn cluster_report_lists_the_leader_first_with_lag() {
        let mut view = ClusterView::default();
        for r in [
            record("b", "replica", "streaming", "0/1000"),
            record("c", "primary", "running", "0/3000"),
            record("a", "unknown", "stopped", "0/0"),
        ] {
            view.members.insert(r.name.clone(), r);
        }
        view.members
            .get_mut(&MemberName::from("a"))
            .unwrap()
            .received_lsn = None;
        view.leader = Some(LeaderKey {
            name: "c".into(),
            lease_id: 7,
        });
        view.config.paused = true;
        view.failover = Some(FailoverRequest {
            from: Some("c".into()),
            to: Some("b".into()),
            not_before_unix_ms: Some(1000),
            accept_data_loss: false,
            requested_at_unix_ms: 0,
        });
        let r = cluster_report("orders", &"b".into(), &view);
        let names: Vec<&str> = r.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["c", "a", "b"]);
        let roles: Vec<&str> = r.members.iter().map(|m| m.role).collect();
        assert_eq!(roles, ["leader", "unknown", "replica"]);
        let lags: Vec<Option<u64>> = r.members.iter().map(|m| m.lag_bytes).collect();
        assert_eq!(lags, [Some(0), None, Some(0x2000)]);
        assert_eq!(r.leader, Some("c".into()));
        assert_eq!(r.timeline, Some(Timeline(3)));
        assert!(r.paused);
        let f = r.pending_failover.unwrap();
        assert_eq!(f.to, Some("b".into()));
        assert_eq!(f.scheduled_at.as_deref(), Some("1970-01-01T00:00:01.000Z"));
        let json = serde_json::to_value(cluster_report("orders", &"b".into(), &view)).unwrap();
        assert_eq!(json["members"][2]["wal_position"], "0/1000");
        assert_eq!(json["members"][2]["state"], "streaming");
    }

    #[test]
    fn status_report_is_what_peers_parse() {
        let s = AgentStatus {
            member: Some(record("a", "replica", "streaming", "0/10")),
            wal_position: Some(Lsn(0x10)),
            ..Default::default()
        };
        let r = StatusReport::from_status(&s).unwrap();
        let back: StatusReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert!(back.peer_report().running);
        assert!(StatusReport::from_status(&AgentStatus::default()).is_none());
    }

    /// A member whose connect_url points at another node (say
    /// `http://0.0.0.0:8008`, which reaches whoever asks) would report that
    /// node's WAL position as its own; such an answer must be dropped.
    #[test]
    fn a_status_naming_another_member_is_not_taken_as_the_peers() {
        let s = AgentStatus {
            member: Some(record("b", "replica", "streaming", "0/10")),
            wal_position: Some(Lsn(0x10)),
            ..Default::default()
        };
        let r = StatusReport::from_status(&s).unwrap();
        let asked_b = r.report_of(&"b".into()).expect("b answered for b");
        assert_eq!(asked_b, r.peer_report());
        assert_eq!(asked_b.wal_position, Some(Lsn(0x10)));
        assert_eq!(r.report_of(&"a".into()), Err(&MemberName::from("b")));
        // Names are compared exactly, as the DCS keys are.
        assert!(r.report_of(&"B".into()).is_err());
    }
}
