//! `pgha list`: the member table, leader first.

use crate::api::StatusReport;
use crate::postgres::observe::ArchiveStatus;
use serde::Serialize;

use crate::dcs::{ClusterView, Dcs};
use crate::model::{MemberRecord, PgRole};

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ListOutput {
    pub cluster: String,
    pub paused: bool,
    /// `off`, `on` or `strict`.
    pub synchronous_mode: String,
    /// Mode `on` with no synchronous standby: commits are acknowledged by
    /// the leader alone and automatic failover is blocked.
    pub synchronous_degraded: bool,
    pub members: Vec<ListMember>,
    /// Live proxies, by name.
    pub proxies: Vec<ListProxy>,
    /// Conditions an operator must act on (two writable servers).
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ListMember {
    pub name: String,
    /// `leader` or `replica` (or `unknown` while stopped or cloning).
    pub role: String,
    pub state: String,
    pub host: String,
    pub port: u16,
    pub timeline: Option<u32>,
    /// Bytes behind the leader; `None` when either position is unknown.
    pub lag_bytes: Option<u64>,
    pub api_url: String,
    /// `sync`, `quorum` or `async` for replicas; empty for the leader.
    pub sync_state: String,
    /// The member a replica streams from (the leader, or another replica
    /// when cascading); null when not streaming.
    pub upstream: Option<String>,
    pub decision: Option<String>,
    /// The member's `pg_stat_archiver` from its agent's `/status`; null
    /// when the agent did not answer or its server is not running.
    pub archive: Option<ArchiveStatus>,
    /// Server parameters whose new value waits for a restart of this
    /// member (pgha never restarts for them by itself).
    pub pending_restart: Vec<String>,
    /// Cluster-wide parameters this member refused, with the reason.
    pub rejected_parameters: std::collections::BTreeMap<String, String>,
    /// `[vip]` on this member, from its agent's `/status`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vip: Option<crate::agent::vip::VipStatus>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ListProxy {
    pub name: String,
    /// `host:port`, or null when the listener is disabled.
    pub rw: Option<String>,
    pub ro: Option<String>,
    /// Runs inside an agent.
    pub auto: bool,
    /// `serving`, `holding`, `draining` or `drained`.
    pub state: String,
}

/// Builds the table from a DCS view: pure, so it is unit-tested.
pub fn build(cluster: &str, view: &ClusterView) -> ListOutput {
    let leader_name = view.leader.as_ref().map(|l| l.name.clone());
    let mut members: Vec<&MemberRecord> = view.members.values().collect();
    members.sort_by_key(|m| (Some(&m.name) != leader_name.as_ref(), m.name.clone()));
    let sync = view
        .sync
        .as_ref()
        .filter(|r| Some(&r.leader) == leader_name.as_ref());
    let writable: Vec<String> = members
        .iter()
        .filter(|m| m.role == PgRole::Primary && m.state == crate::model::PgState::Running)
        .map(|m| m.name.to_string())
        .collect();
    let mut warnings = Vec::new();
    if writable.len() > 1 {
        warnings.push(format!(
            "TWO OR MORE WRITABLE PRIMARIES: {}; only {} holds the leader key{}",
            writable.join(", "),
            leader_name
                .as_ref()
                .map_or("nobody".to_string(), |l| l.to_string()),
            if view.config.paused {
                " (paused: pgha takes no action; `pgha resume` demotes the others)"
            } else {
                ""
            }
        ));
    }
    for m in &members {
        for (name, reason) in &m.parameters.rejected {
            warnings.push(format!(
                "{} refused postgresql.parameters.{name}: {reason}",
                m.name
            ));
        }
    }
    ListOutput {
        cluster: cluster.to_string(),
        warnings,
        paused: view.config.paused,
        synchronous_mode: view.config.synchronous_mode.to_string(),
        synchronous_degraded: view.config.synchronous_mode != crate::dcs::SyncMode::Off
            && sync.is_some_and(|r| r.degraded),
        proxies: view
            .proxies
            .values()
            .map(|p| ListProxy {
                name: p.name.clone(),
                rw: p.rw.clone(),
                ro: p.ro.clone(),
                auto: p.auto,
                state: p.state.to_string(),
            })
            .collect(),
        members: members
            .into_iter()
            .map(|m| {
                let is_leader = Some(&m.name) == leader_name.as_ref();
                let role = if is_leader {
                    "leader"
                } else if m.role == PgRole::Replica {
                    "replica"
                } else if m.role == PgRole::Primary && m.state == crate::model::PgState::Running {
                    // Writable without the key: only by hand while paused,
                    // or for the moment before its agent demotes it.
                    "primary"
                } else {
                    "unknown"
                };
                ListMember {
                    name: m.name.to_string(),
                    role: role.into(),
                    state: m.state.to_string(),
                    host: m.host.clone(),
                    port: m.port,
                    timeline: m.timeline.map(|t| t.0),
                    lag_bytes: view.lag_of(m),
                    api_url: m.api_url.clone(),
                    sync_state: if is_leader {
                        String::new()
                    } else if sync.is_some_and(|r| r.members.contains(&m.name)) {
                        if view.config.synchronous_quorum {
                            "quorum".into()
                        } else {
                            "sync".into()
                        }
                    } else {
                        "async".into()
                    },
                    upstream: m.upstream.as_ref().map(|u| u.to_string()),
                    decision: m.last_decision.clone(),
                    pending_restart: m.parameters.pending_restart.clone(),
                    rejected_parameters: m.parameters.rejected.clone(),
                    archive: None,
                    vip: None,
                }
            })
            .collect(),
    }
}

pub fn render_table(out: &ListOutput) -> String {
    let mut rows = vec![
        [
            "Member",
            "Host",
            "Role",
            "State",
            "Sync",
            "TL",
            "Lag (bytes)",
            "Archived",
            "Pending restart",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for m in &out.members {
        rows.push(vec![
            m.name.clone(),
            format!("{}:{}", m.host, m.port),
            m.role.clone(),
            m.state.clone(),
            m.sync_state.clone(),
            m.timeline.map(|t| t.to_string()).unwrap_or_default(),
            m.lag_bytes
                .map(|l| l.to_string())
                .unwrap_or_else(|| "unknown".into()),
            m.archive.as_ref().map(archive_cell).unwrap_or_default(),
            m.pending_restart.join(","),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut text = format!(
        "Cluster: {}  synchronous_mode: {}{}{}\n",
        out.cluster,
        out.synchronous_mode,
        if out.synchronous_degraded {
            " (degraded: no synchronous standby, automatic failover blocked)"
        } else {
            ""
        },
        if out.paused {
            "  (paused: no automatic failover)"
        } else {
            ""
        }
    );
    for w in &out.warnings {
        text.push_str(&format!("WARNING: {w}\n"));
    }
    let mut proxies = String::new();
    for p in &out.proxies {
        proxies.push_str(&format!(
            "Proxy: {}  rw: {}  ro: {}  {}{}\n",
            p.name,
            p.rw.as_deref().unwrap_or("-"),
            p.ro.as_deref().unwrap_or("-"),
            p.state,
            if p.auto { "  (in agent)" } else { "" }
        ));
    }
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        text.push_str(line.join("  ").trim_end());
        text.push('\n');
    }
    text.push_str(&proxies);
    for m in &out.members {
        if let Some(v) = &m.vip
            && (v.held || v.error.is_some())
        {
            text.push_str(&format!(
                "Floating address: {} on {} ({}){}\n",
                v.address,
                m.name,
                v.interface,
                v.error
                    .as_deref()
                    .map(|e| format!("  ERROR: {e}"))
                    .unwrap_or_default()
            ));
        }
    }
    text
}

/// The last archived segment and the failures, e.g.
/// `000000020000000000000007` or `000000020000000000000007, 3 failed (failing)`.
fn archive_cell(a: &ArchiveStatus) -> String {
    let last = a.last_archived_wal.as_deref().unwrap_or("-");
    match (a.failed_count, a.failing()) {
        (0, _) => last.to_string(),
        (n, true) => format!("{last}, {n} failed (failing)"),
        (n, false) => format!("{last}, {n} failed"),
    }
}

/// Each member's archive and floating-address status from its agent's `/status`, all at once
/// with a short timeout: `pgha list` must stay quick when a node is down.
async fn fill_archive(out: &mut ListOutput, api: &crate::config::ApiConfig) {
    let Ok(http) = crate::api::tls::peer_client(api, std::time::Duration::from_secs(2)) else {
        return;
    };
    let requests = out.members.iter().map(|m| {
        let mut request = http.get(format!("{}/status", m.api_url));
        // Members share the API credentials; `public_read = false` needs them.
        if let Some(token) = &api.token {
            request = request.bearer_auth(token.expose());
        } else if let Some((user, password)) = &api.basic_auth {
            request = request.basic_auth(user, Some(password.expose()));
        }
        async move {
            let report: StatusReport = request.send().await.ok()?.json().await.ok()?;
            Some((report.archive, report.vip))
        }
    });
    let answers = futures_util::future::join_all(requests).await;
    for (m, a) in out.members.iter_mut().zip(answers) {
        (m.archive, m.vip) = a.unwrap_or_default();
    }
}

pub async fn run(cfg: &crate::config::Config, json: bool) -> anyhow::Result<()> {
    let dcs = super::connect_dcs(cfg).await?;
    let view = dcs.read_cluster().await?;
    let mut out = build(&cfg.cluster, &view);
    fill_archive(&mut out, &cfg.api).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", render_table(&out));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcs::LeaderKey;
    use crate::model::{Lsn, PgState, Timeline};

    fn rec(name: &str, role: PgRole, state: PgState, lsn: u64) -> MemberRecord {
        MemberRecord {
            name: name.into(),
            api_url: format!("http://{name}"),
            host: "127.0.0.1".into(),
            port: 5432,
            role,
            state,
            timeline: Some(Timeline(1)),
            received_lsn: (role == PgRole::Replica).then_some(Lsn(lsn)),
            replayed_lsn: (role == PgRole::Replica).then_some(Lsn(lsn)),
            flushed_lsn: (role == PgRole::Primary).then_some(Lsn(lsn)),
            upstream: None,
            priority: 100,
            nofailover: false,
            nosync: false,
            last_decision: None,
            updated_at_ms: 0,
            parameters: Default::default(),
            adoptable: false,
        }
    }

    #[test]
    fn two_writable_servers_are_flagged() {
        let mut view = ClusterView::default();
        for r in [
            rec("a", PgRole::Primary, PgState::Running, 90),
            rec("b", PgRole::Primary, PgState::Running, 100),
        ] {
            view.members.insert(r.name.clone(), r);
        }
        view.leader = Some(LeaderKey {
            name: "b".into(),
            lease_id: 1,
        });
        view.config.paused = true;
        let out = build("x", &view);
        assert_eq!(out.members[1].role, "primary");
        assert_eq!(out.warnings.len(), 1);
        assert!(
            out.warnings[0].contains("b, a"),
            "leader first: {:?}",
            out.warnings
        );
        assert!(out.warnings[0].contains("paused"), "{:?}", out.warnings);
        assert!(render_table(&out).contains("WARNING: TWO OR MORE WRITABLE PRIMARIES"));
        let json = serde_json::to_value(&out).unwrap();
        assert_eq!(json["warnings"].as_array().unwrap().len(), 1);
        // One writable server: no warning.
        view.members.remove(&crate::model::MemberName::from("a"));
        assert!(build("x", &view).warnings.is_empty());
    }

    #[test]
    fn pending_restarts_and_refused_parameters_are_shown() {
        let mut view = ClusterView::default();
        let mut a = rec("a", PgRole::Primary, PgState::Running, 100);
        a.parameters.pending_restart = vec!["max_connections".into(), "shared_buffers".into()];
        a.parameters
            .rejected
            .insert("work_mem".into(), "invalid value".into());
        view.members.insert(a.name.clone(), a);
        let out = build("x", &view);
        assert_eq!(
            out.members[0].pending_restart,
            vec!["max_connections", "shared_buffers"]
        );
        assert_eq!(
            out.warnings,
            vec!["a refused postgresql.parameters.work_mem: invalid value"]
        );
        let table = render_table(&out);
        assert!(table.contains("max_connections,shared_buffers"), "{table}");
        let json = serde_json::to_value(&out).unwrap();
        assert_eq!(json["members"][0]["pending_restart"][1], "shared_buffers");
    }

    #[test]
    fn leader_first_with_lag() {
        let mut view = ClusterView::default();
        for r in [
            rec("a", PgRole::Replica, PgState::Streaming, 90),
            rec("b", PgRole::Primary, PgState::Running, 100),
            rec("c", PgRole::Unknown, PgState::Stopped, 0),
        ] {
            view.members.insert(r.name.clone(), r);
        }
        view.leader = Some(LeaderKey {
            name: "b".into(),
            lease_id: 1,
        });
        let out = build("x", &view);
        let names: Vec<_> = out
            .members
            .iter()
            .map(|m| (m.name.as_str(), m.role.as_str(), m.lag_bytes))
            .collect();
        assert_eq!(
            names,
            vec![
                ("b", "leader", Some(0)),
                ("a", "replica", Some(10)),
                ("c", "unknown", None)
            ]
        );
        let json = serde_json::to_value(&out).unwrap();
        for key in [
            "name",
            "role",
            "state",
            "host",
            "port",
            "timeline",
            "lag_bytes",
            "api_url",
            "archive",
            "pending_restart",
        ] {
            assert!(json["members"][0].get(key).is_some(), "{key} missing");
        }
        let table = render_table(&out);
        assert!(table.lines().nth(2).unwrap().starts_with("b "));
        let header: Vec<&str> = table
            .lines()
            .nth(1)
            .unwrap()
            .split("  ")
            .filter(|c| !c.trim().is_empty())
            .collect();
        assert_eq!(header.len(), 9, "{table}");
        assert!(
            table.lines().nth(3).unwrap().trim_end().ends_with("10"),
            "replica lag shown last: {table}"
        );
    }
}
