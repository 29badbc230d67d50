//! `GET /metrics`: Prometheus text exposition format 0.0.4.
//!
//! Every series carries `cluster` and `member` labels. `member` names the
//! agent that answered, except for the `pgha_member_*` series, which
//! describe every member of the cluster as this agent's last DCS view shows
//! them (so `member` names the member described). Durations are in
//! seconds, positions and lag in bytes.
//!
//! An agent that runs a proxy (a `[proxy]` table) appends the proxy's
//! `pgha_proxy_*` series exactly as a standalone proxy serves them (same
//! names and labels, so one dashboard reads both): they carry no `cluster`
//! label, and their `member` label, where present, names the server the
//! proxy routed to.

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::health::{is_synchronous, lag_behind_leader};
use crate::agent::status::{AgentStatus, Histogram};
use crate::model::{MemberRecord, PgRole, PgState};

/// Escapes a label value (`\`, `"` and newlines).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders label pairs as `{a="x",b="y"}`.
fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// A float in Prometheus syntax (`+Inf`, no exponent surprises).
fn num(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v.is_nan() {
        "NaN".into()
    } else {
        format!("{v}")
    }
}

struct Out {
    text: String,
    base: Vec<(String, String)>,
}

impl Out {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, extra: &[(&str, &str)], value: f64) {
        let mut pairs: Vec<(&str, &str)> = self
            .base
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        pairs.extend_from_slice(extra);
        let _ = writeln!(self.text, "{name}{} {}", labels(&pairs), num(value));
    }

    fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.header(name, "gauge", help);
        self.sample(name, &[], value);
    }

    /// A histogram in seconds from one kept in milliseconds, with
    /// cumulative buckets as the format requires.
    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.header(name, "histogram", help);
        let mut cumulative = 0u64;
        for (bound, count) in h.bounds_ms.iter().zip(&h.counts) {
            cumulative += count;
            let le = num(bound / 1000.0);
            self.sample(&format!("{name}_bucket"), &[("le", &le)], cumulative as f64);
        }
        self.sample(&format!("{name}_bucket"), &[("le", "+Inf")], h.count as f64);
        self.sample(&format!("{name}_sum"), &[], h.sum_ms / 1000.0);
        self.sample(&format!("{name}_count"), &[], h.count as f64);
    }
}

fn b(v: bool) -> f64 {
    if v { 1.0 } else { 0.0 }
}

fn running(m: &MemberRecord) -> bool {
    matches!(
        m.state,
        PgState::Running | PgState::Streaming | PgState::InRecovery
    )
}

/// `pg_stat_archiver` of the local server (only while it runs). Counters
/// restart at zero with the server (Prometheus' `rate` handles resets);
/// the ages are absent until the first success or failure.
fn archive(o: &mut Out, a: &crate::postgres::observe::ArchiveStatus) {
    o.header(
        "pgha_archive_archived_total",
        "counter",
        "WAL files archived by the local server since its statistics were reset.",
    );
    o.sample(
        "pgha_archive_archived_total",
        &[("mode", &a.mode)],
        a.archived_count as f64,
    );
    o.header(
        "pgha_archive_failed_total",
        "counter",
        "Failed archive_command runs of the local server since its statistics were reset.",
    );
    o.sample(
        "pgha_archive_failed_total",
        &[("mode", &a.mode)],
        a.failed_count as f64,
    );
    if let Some(ms) = a.last_archived_age_ms {
        o.gauge(
            "pgha_archive_last_archived_age_seconds",
            "Seconds since the local server last archived a WAL file.",
            ms as f64 / 1000.0,
        );
    }
    if let Some(ms) = a.last_failed_age_ms {
        o.gauge(
            "pgha_archive_last_failed_age_seconds",
            "Seconds since the local server's last failed archive attempt.",
            ms as f64 / 1000.0,
        );
    }
    o.gauge(
        "pgha_archive_failing",
        "1 when the local server's last archive attempt failed (a failure newer than the last success).",
        b(a.failing()),
    );
}

/// `backup.schedule`: this agent's scheduled base backups. The success
/// time and duration are absent until one succeeds; an agent counts only
/// the backups it ran itself while leading, so a dashboard takes the
/// maximum of the success time over the members.
fn scheduled_backup(o: &mut Out, sb: &crate::agent::status::ScheduledBackupStatus) {
    o.gauge(
        "pgha_scheduled_backup_running",
        "1 while a scheduled base backup started by this agent runs.",
        b(sb.running),
    );
    if let Some(t) = sb.last_success_unix_s {
        o.gauge(
            "pgha_scheduled_backup_last_success_timestamp_seconds",
            "Unix time at which this agent's last successful scheduled base backup completed.",
            t as f64,
        );
    }
    if let Some(d) = sb.last_duration_s {
        o.gauge(
            "pgha_scheduled_backup_last_duration_seconds",
            "Duration of this agent's last successful scheduled base backup, up to its last WAL segment archived.",
            d,
        );
    }
    o.header(
        "pgha_scheduled_backup_failures_total",
        "counter",
        "Scheduled base backups started by this agent that failed (or ran longer than backup.schedule_timeout), since it started.",
    );
    o.sample(
        "pgha_scheduled_backup_failures_total",
        &[],
        sb.failures as f64,
    );
}

/// The whole exposition for one agent status: pure, so it is unit-tested.
pub fn render(cluster: &str, s: &AgentStatus) -> String {
    let me = s.member.as_ref();
    let member = me.map(|m| m.name.to_string()).unwrap_or_default();
    let mut o = Out {
        text: String::new(),
        base: vec![
            ("cluster".into(), cluster.into()),
            ("member".into(), member),
        ],
    };
    let view = s.view.as_ref();
    let is_leader = s.lease_held && me.is_some_and(|m| m.role == PgRole::Primary);
    let role = match me {
        _ if s.lease_held => "leader",
        Some(m) if m.role == PgRole::Replica => "replica",
        _ => "unknown",
    };

    o.header(
        "pgha_info",
        "gauge",
        "Always 1; labels carry the pgha version.",
    );
    o.sample("pgha_info", &[("version", env!("CARGO_PKG_VERSION"))], 1.0);
    o.header(
        "pgha_role",
        "gauge",
        "1 for this member's current role (leader, replica or unknown), 0 for the others.",
    );
    for r in ["leader", "replica", "unknown"] {
        o.sample("pgha_role", &[("role", r)], b(r == role));
    }
    o.gauge(
        "pgha_primary",
        "1 when this member is the lease-holding writable leader.",
        b(is_leader && me.is_some_and(|m| m.state == PgState::Running)),
    );
    o.gauge(
        "pgha_leader_lease_held",
        "1 while this member holds the leader lease.",
        b(s.lease_held),
    );
    o.gauge(
        "pgha_leader_lease_valid",
        "1 while the held leader lease has not expired.",
        b(s.lease_valid),
    );
    o.gauge(
        "pgha_postgres_up",
        "1 when the local PostgreSQL accepts queries.",
        b(me.is_some_and(running)),
    );
    o.header(
        "pgha_postgres_state",
        "gauge",
        "1 for the local PostgreSQL's state as published in the member record.",
    );
    if let Some(m) = me {
        o.sample(
            "pgha_postgres_state",
            &[("state", &m.state.to_string())],
            1.0,
        );
    }
    if let Some(tl) = me.and_then(|m| m.timeline) {
        o.gauge(
            "pgha_postgres_timeline",
            "The local PostgreSQL's timeline.",
            tl.0 as f64,
        );
    }
    if let Some(pos) = s.wal_position {
        o.gauge(
            "pgha_wal_position_bytes",
            "The local server's furthest WAL position (written or received).",
            pos.0 as f64,
        );
    }
    if let Some(lag) = me
        .and_then(|m| lag_behind_leader(view, m, s.wal_position))
        .filter(|_| !is_leader)
    {
        o.gauge(
            "pgha_replication_lag_bytes",
            "Bytes this replica trails the leader's last published position.",
            lag as f64,
        );
    }
    if let Some(a) = &s.archive {
        archive(&mut o, a);
    }
    if let Some(sb) = &s.scheduled_backup {
        scheduled_backup(&mut o, sb);
    }
    let sync = me.is_some_and(|m| !is_leader && is_synchronous(view, &m.name));
    o.gauge(
        "pgha_sync_standby",
        "1 when this member is a synchronous standby.",
        b(sync),
    );
    o.gauge(
        "pgha_paused",
        "1 while the cluster is paused (maintenance mode).",
        b(s.paused),
    );
    o.gauge(
        "pgha_dcs_reachable",
        "1 when the last loop could read etcd.",
        b(s.dcs_reachable),
    );
    o.gauge(
        "pgha_cluster_has_leader",
        "1 when the last DCS view had a leader.",
        b(view.is_some_and(|v| v.leader.is_some())),
    );
    o.gauge(
        "pgha_failover_pending",
        "1 while a switchover or failover request is pending.",
        b(view.is_some_and(|v| v.failover.is_some())),
    );
    o.gauge(
        "pgha_last_loop_timestamp_seconds",
        "CLOCK_BOOTTIME at the end of the last HA loop.",
        s.last_loop_ms as f64 / 1000.0,
    );
    o.header(
        "pgha_loops_total",
        "counter",
        "HA loops run since the agent started.",
    );
    o.sample("pgha_loops_total", &[], s.loop_count as f64);
    o.header(
        "pgha_leader_changes_total",
        "counter",
        "Times the leader key changed hands, as seen by this agent.",
    );
    o.sample("pgha_leader_changes_total", &[], s.leader_changes as f64);
    o.histogram(
        "pgha_loop_duration_seconds",
        "Duration of each HA loop (observe, decide, execute, publish).",
        &s.loop_duration,
    );
    o.histogram(
        "pgha_lease_renewal_seconds",
        "Round trip of each successful leader lease renewal.",
        &s.renewal_latency,
    );

    if let Some(v) = view {
        o.gauge(
            "pgha_members",
            "Members in the last DCS view.",
            v.members.len() as f64,
        );
        let leader = v.leader.as_ref().map(|l| &l.name);
        let metrics: [(&str, &str, &str); 6] = [
            (
                "pgha_member_up",
                "gauge",
                "1 when the member's PostgreSQL runs (from its DCS record).",
            ),
            (
                "pgha_member_leader",
                "gauge",
                "1 for the member named by the leader key.",
            ),
            (
                "pgha_member_timeline",
                "gauge",
                "The member's timeline (from its DCS record).",
            ),
            (
                "pgha_member_wal_position_bytes",
                "gauge",
                "The member's furthest published WAL position.",
            ),
            (
                "pgha_member_lag_bytes",
                "gauge",
                "Bytes the member trails the leader's published position.",
            ),
            (
                "pgha_member_sync_standby",
                "gauge",
                "1 when the member is a synchronous standby.",
            ),
        ];
        for (i, (name, kind, help)) in metrics.iter().enumerate() {
            o.header(name, kind, help);
            for m in v.members.values() {
                let who = [("member", m.name.as_str())];
                // `member` names the described member here, not this agent.
                let mut pairs = vec![("cluster", cluster)];
                pairs.extend_from_slice(&who);
                let value = match i {
                    0 => Some(b(running(m))),
                    1 => Some(b(leader == Some(&m.name))),
                    2 => m.timeline.map(|t| t.0 as f64),
                    3 => m.wal_position().map(|p| p.0 as f64),
                    4 => v.lag_of(m).map(|l| l as f64),
                    _ => Some(b(leader != Some(&m.name) && is_synchronous(view, &m.name))),
                };
                if let Some(value) = value {
                    let _ = writeln!(o.text, "{name}{} {}", labels(&pairs), num(value));
                }
            }
        }
    }
    o.text
}

/// `GET /metrics`: the agent's series, then its proxy's.
pub async fn metrics(State(app): State<AppState>) -> Response {
    let s = app.status.borrow().clone();
    let mut text = render(&app.config.cluster, &s);
    if let Some(proxy) = &app.proxy {
        text.push_str(&proxy.metrics());
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcs::{ClusterView, LeaderKey};
    use crate::model::Lsn;
    use prometheus_parse::{Scrape, Value};

    fn record(name: &str, role: &str, state: &str, lsn: &str) -> MemberRecord {
        serde_json::from_value(serde_json::json!({
            "name": name, "api_url": "http://x", "host": "h", "port": 1,
            "role": role, "state": state, "timeline": 2, "received_lsn": lsn,
        }))
        .unwrap()
    }

    fn parse(text: &str) -> Scrape {
        Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
    }

    fn value(scrape: &Scrape, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .and_then(|s| match s.value {
                Value::Gauge(v) | Value::Counter(v) | Value::Untyped(v) => Some(v),
                _ => None,
            })
    }

    fn replica_status() -> AgentStatus {
        let me = record("r1", "replica", "streaming", "0/1000");
        let mut view = ClusterView::default();
        view.members
            .insert("l".into(), record("l", "primary", "running", "0/3000"));
        view.members.insert("r1".into(), me.clone());
        view.leader = Some(LeaderKey {
            name: "l".into(),
            lease_id: 1,
        });
        let mut loop_duration = Histogram::with_bounds(&[1.0, 10.0]);
        for ms in [0.5, 5.0, 50.0] {
            loop_duration.observe(ms);
        }
        AgentStatus {
            member: Some(me),
            wal_position: Some(Lsn(0x1000)),
            view: Some(view),
            dcs_reachable: true,
            paused: true,
            leader_changes: 3,
            loop_count: 9,
            loop_duration,
            renewal_latency: Histogram::latency(),
            ..Default::default()
        }
    }

    #[test]
    fn archive_metrics_from_pg_stat_archiver() {
        let mut s = replica_status();
        assert!(!render("orders", &s).contains("pgha_archive_"));
        s.archive = Some(crate::postgres::observe::ArchiveStatus {
            mode: "always".into(),
            archived_count: 41,
            failed_count: 2,
            last_archived_wal: Some("000000020000000000000007".into()),
            last_failed_wal: Some("000000020000000000000008".into()),
            last_archived_age_ms: Some(12_500),
            last_failed_age_ms: Some(1_000),
        });
        let text = render("orders", &s);
        let scrape = parse(&text);
        assert_eq!(
            value(
                &scrape,
                "pgha_archive_archived_total",
                Some(("mode", "always"))
            ),
            Some(41.0)
        );
        assert_eq!(
            value(
                &scrape,
                "pgha_archive_failed_total",
                Some(("mode", "always"))
            ),
            Some(2.0)
        );
        assert_eq!(
            value(&scrape, "pgha_archive_last_archived_age_seconds", None),
            Some(12.5)
        );
        assert_eq!(
            value(&scrape, "pgha_archive_last_failed_age_seconds", None),
            Some(1.0)
        );
        assert_eq!(value(&scrape, "pgha_archive_failing", None), Some(1.0));
        assert!(text.contains("# TYPE pgha_archive_failed_total counter"));
    }

    #[test]
    fn scheduled_backup_metrics() {
        let mut s = replica_status();
        assert!(!render("orders", &s).contains("pgha_scheduled_backup_"));
        // Configured, nothing run yet: no success time, no duration.
        s.scheduled_backup = Some(Default::default());
        let scrape = parse(&render("orders", &s));
        assert_eq!(
            value(&scrape, "pgha_scheduled_backup_failures_total", None),
            Some(0.0)
        );
        assert_eq!(
            value(&scrape, "pgha_scheduled_backup_running", None),
            Some(0.0)
        );
        assert_eq!(
            value(
                &scrape,
                "pgha_scheduled_backup_last_success_timestamp_seconds",
                None
            ),
            None
        );
        s.scheduled_backup = Some(crate::agent::status::ScheduledBackupStatus {
            running: true,
            last_success_unix_s: Some(1_769_824_800),
            last_duration_s: Some(12.5),
            failures: 2,
        });
        let text = render("orders", &s);
        let scrape = parse(&text);
        assert_eq!(
            value(
                &scrape,
                "pgha_scheduled_backup_last_success_timestamp_seconds",
                Some(("member", "r1"))
            ),
            Some(1_769_824_800.0)
        );
        assert_eq!(
            value(&scrape, "pgha_scheduled_backup_last_duration_seconds", None),
            Some(12.5)
        );
        assert_eq!(
            value(&scrape, "pgha_scheduled_backup_failures_total", None),
            Some(2.0)
        );
        assert_eq!(
            value(&scrape, "pgha_scheduled_backup_running", None),
            Some(1.0)
        );
        assert!(text.contains("# TYPE pgha_scheduled_backup_failures_total counter"));
    }

    #[test]
    fn replica_metrics_parse() {
        let text = render("orders", &replica_status());
        let scrape = parse(&text);
        assert_eq!(
            value(&scrape, "pgha_role", Some(("role", "replica"))),
            Some(1.0)
        );
        assert_eq!(
            value(&scrape, "pgha_role", Some(("role", "leader"))),
            Some(0.0)
        );
        assert_eq!(value(&scrape, "pgha_leader_lease_held", None), Some(0.0));
        assert_eq!(value(&scrape, "pgha_postgres_up", None), Some(1.0));
        assert_eq!(value(&scrape, "pgha_postgres_timeline", None), Some(2.0));
        assert_eq!(value(&scrape, "pgha_paused", None), Some(1.0));
        assert_eq!(
            value(&scrape, "pgha_replication_lag_bytes", None),
            Some(8192.0)
        );
        assert_eq!(
            value(&scrape, "pgha_member_lag_bytes", Some(("member", "r1"))),
            Some(8192.0)
        );
        assert_eq!(
            value(&scrape, "pgha_member_lag_bytes", Some(("member", "l"))),
            Some(0.0)
        );
        assert_eq!(
            value(
                &scrape,
                "pgha_member_wal_position_bytes",
                Some(("member", "l"))
            ),
            Some(12288.0)
        );
        assert_eq!(
            value(&scrape, "pgha_member_leader", Some(("member", "l"))),
            Some(1.0)
        );
        assert_eq!(value(&scrape, "pgha_leader_changes_total", None), Some(3.0));
        assert_eq!(value(&scrape, "pgha_sync_standby", None), Some(0.0));
        let hist = scrape
            .samples
            .iter()
            .find(|s| s.metric == "pgha_loop_duration_seconds")
            .expect("loop histogram");
        let Value::Histogram(buckets) = &hist.value else {
            panic!("not a histogram: {:?}", hist.value)
        };
        let counts: Vec<(f64, f64)> = buckets.iter().map(|b| (b.less_than, b.count)).collect();
        assert_eq!(counts, [(0.001, 1.0), (0.01, 2.0), (f64::INFINITY, 3.0)]);
        assert!(
            text.contains(
                "pgha_loop_duration_seconds_sum{cluster=\"orders\",member=\"r1\"} 0.0555"
            )
        );
        assert!(
            text.contains("pgha_loop_duration_seconds_count{cluster=\"orders\",member=\"r1\"} 3")
        );
    }

    #[test]
    fn every_sample_has_a_type_and_a_starting_agent_renders() {
        for s in [replica_status(), AgentStatus::default()] {
            let text = render("c", &s);
            parse(&text);
            let typed: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("# TYPE "))
                .filter_map(|l| l.split(' ').next())
                .collect();
            for line in text.lines().filter(|l| !l.starts_with('#')) {
                let name = line.split(['{', ' ']).next().unwrap();
                let base = name
                    .trim_end_matches("_bucket")
                    .trim_end_matches("_sum")
                    .trim_end_matches("_count");
                assert!(typed.contains(&name) || typed.contains(&base), "{line}");
            }
        }
    }

    /// The agent appends its proxy's text: the whole must stay one valid
    /// exposition, with no family declared twice.
    #[test]
    fn agent_and_proxy_series_form_one_exposition() {
        let stats = crate::proxy::stats::Stats::default();
        stats.count_route("m1", "read_only");
        stats
            .transaction_counter("m1", "rw")
            .fetch_add(3, std::sync::atomic::Ordering::Relaxed);
        let mut text = render("c", &replica_status());
        text.push_str(&stats.render(&[]));
        let scrape = parse(&text);
        assert_eq!(
            value(
                &scrape,
                "pgha_proxy_transactions_total",
                Some(("member", "m1"))
            ),
            Some(3.0)
        );
        let mut families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let declared = families.len();
        families.sort_unstable();
        families.dedup();
        assert_eq!(families.len(), declared, "a family is declared twice");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(labels(&[("a", "x\"y\\z\n")]), r#"{a="x\"y\\z\n"}"#);
        assert_eq!(num(f64::INFINITY), "+Inf");
        assert_eq!(num(0.25), "0.25");
    }
}
