//! Health checks for load balancers, as a pure function of the agent's
//! status.
//!
//! Status codes match Patroni's: 200 when the member is fit for the asked
//! role, 503 otherwise, so HAProxy's `http-check expect status 200` routes
//! correctly. Query parameters narrow a check down:
//!
//! - `lag=<size>` (`/replica`, `/read-only`, `/sync`, `/async`): 503 when
//!   this member is more than `size` behind the leader's last published WAL
//!   position. `size` is bytes, or a number with a unit as in
//!   postgresql.conf (`16kB`, `10MB`, `1GB`; units are powers of 1024).
//! - `tag_<name>=<value>` (every role check): 503 unless this member's tag
//!   `name` has that value. The tags are `nofailover` and `nosync`
//!   (booleans, from `[ha]`); any other tag never matches.
//!
//! `/sync` and `/async` tell synchronous standbys (listed in the current
//! leader's `sync` record) from the others: see [`is_synchronous`].

use axum::extract::Query;
use axum::extract::rejection::QueryRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};

use super::status::StatusReport;
use super::{AppState, json_error};

use crate::agent::status::AgentStatus;
use crate::dcs::ClusterView;
use crate::model::{MemberName, MemberRecord, PgRole, PgState};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthCheck {
    /// The lease-holding, writable leader.
    Primary,
    /// A running replica.
    Replica,
    /// Leader or replica: anything that serves reads.
    ReadOnly,
    /// A running replica that is a synchronous standby.
    Sync,
    /// A running replica that is not a synchronous standby.
    Async,
    /// PostgreSQL is up.
    Health,
    /// The agent's loop is alive.
    Liveness,
    /// Ready to serve its role.
    Readiness,
}

impl HealthCheck {
    /// Every health path and the check it runs (aliases included).
    ///
    /// `/` is the primary check, as in Patroni: a load balancer configured
    /// for Patroni that checks `/` must never see 200 from a replica.
    pub const PATHS: &'static [(&'static str, HealthCheck)] = &[
        ("/", HealthCheck::Primary),
        ("/primary", HealthCheck::Primary),
        ("/leader", HealthCheck::Primary),
        ("/master", HealthCheck::Primary),
        ("/read-write", HealthCheck::Primary),
        ("/replica", HealthCheck::Replica),
        ("/read-only", HealthCheck::ReadOnly),
        ("/sync", HealthCheck::Sync),
        ("/synchronous", HealthCheck::Sync),
        ("/async", HealthCheck::Async),
        ("/asynchronous", HealthCheck::Async),
        ("/health", HealthCheck::Health),
        ("/liveness", HealthCheck::Liveness),
        ("/readiness", HealthCheck::Readiness),
    ];

    /// Whether `lag=` applies (checks that can answer 200 on a replica).
    fn uses_lag(self) -> bool {
        matches!(
            self,
            HealthCheck::Replica | HealthCheck::ReadOnly | HealthCheck::Sync | HealthCheck::Async
        )
    }

    /// Whether `tag_*=` applies (role checks).
    fn uses_tags(self) -> bool {
        self.uses_lag() || self == HealthCheck::Primary
    }
}

/// The filters of a health request's query string.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckQuery {
    /// `lag=`: the most bytes this member may trail the leader.
    pub max_lag: Option<u64>,
    /// `tag_<name>=<value>` pairs, `tag_` removed.
    pub tags: Vec<(String, String)>,
}

impl CheckQuery {
    /// Reads `lag` and `tag_*` from decoded query pairs; other parameters
    /// are ignored. An unparsable `lag` is an error (the caller answers 400).
    pub fn from_pairs(pairs: &[(String, String)]) -> Result<CheckQuery, String> {
        let mut q = CheckQuery::default();
        for (k, v) in pairs {
            if k == "lag" {
                q.max_lag = Some(parse_size(v).map_err(|e| format!("lag: {e}"))?);
            } else if let Some(tag) = k.strip_prefix("tag_") {
                q.tags.push((tag.to_string(), v.clone()));
            }
        }
        Ok(q)
    }
}

/// Parses a byte count: `1048576`, `512B`, `16kB`, `10MB`, `1GB`, `1TB`
/// (units are powers of 1024, as in postgresql.conf; letter case and a
/// space before the unit are accepted, as are `KiB`, `MiB`...).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let err =
        || format!("{text:?} is not a size (expected bytes, or a number with B, kB, MB, GB or TB)");
    if num.is_empty() {
        return Err(err());
    }
    let n: u64 = num.parse().map_err(|_| err())?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(err()),
    };
    n.checked_mul(factor).ok_or_else(err)
}

/// Whether `member` is listed as a synchronous standby of the current
/// leader, in the leader's `sync` record.
///
/// This is the one place `/sync`, `/async`, `/cluster` and `/metrics`
/// learn about synchronous replication. Without synchronous replication
/// (no record, or one written by a former leader) nobody is synchronous.
pub fn is_synchronous(view: Option<&ClusterView>, member: &MemberName) -> bool {
    let Some(v) = view else { return false };
    let Some(sync) = &v.sync else { return false };
    v.leader.as_ref().is_some_and(|l| l.name == sync.leader)
        && &sync.leader != member
        && sync.members.contains(member)
}

/// This member's tags, as `tag_<name>=` filters see them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalTags {
    pub nofailover: bool,
    pub nosync: bool,
}

impl LocalTags {
    fn matches(&self, name: &str, value: &str) -> bool {
        let actual = match name {
            "nofailover" => self.nofailover,
            "nosync" => self.nosync,
            _ => return false,
        };
        parse_bool(value) == Some(actual)
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" | "1" => Some(true),
        "false" | "off" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Bytes `me` trails the leader's last published position. `None` when
/// either position is unknown (no leader, nothing published yet).
pub fn lag_behind_leader(
    view: Option<&ClusterView>,
    me: &MemberRecord,
    my_position: Option<crate::model::Lsn>,
) -> Option<u64> {
    let leader_pos = view?.leader_record()?.wal_position()?;
    let mine = my_position.or_else(|| me.wal_position())?;
    Some(mine.lag_behind(leader_pos))
}

/// Timing the liveness check needs.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub now_ms: u64,
    pub loop_wait_ms: u64,
    pub ttl_ms: u64,
}

/// The status code of `check` for this member.
pub fn health_status(
    s: &AgentStatus,
    check: HealthCheck,
    query: &CheckQuery,
    tags: LocalTags,
    clock: Clock,
) -> StatusCode {
    let ok = |b: bool| {
        if b {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        }
    };
    let Some(m) = &s.member else {
        return StatusCode::SERVICE_UNAVAILABLE;
    };
    let is_primary =
        m.role == PgRole::Primary && m.state == PgState::Running && s.lease_held && s.lease_valid;
    let is_replica =
        m.role == PgRole::Replica && matches!(m.state, PgState::Streaming | PgState::InRecovery);
    let pg_up = matches!(
        m.state,
        PgState::Running | PgState::Streaming | PgState::InRecovery
    );
    let sync = is_synchronous(s.view.as_ref(), &m.name);
    if check.uses_tags() && !query.tags.iter().all(|(k, v)| tags.matches(k, v)) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    if check.uses_lag()
        && !is_primary
        && let Some(max) = query.max_lag
        && lag_behind_leader(s.view.as_ref(), m, s.wal_position).is_some_and(|lag| lag > max)
    {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    match check {
        HealthCheck::Primary => ok(is_primary),
        HealthCheck::Replica => ok(is_replica),
        HealthCheck::ReadOnly => ok(is_primary || is_replica),
        HealthCheck::Sync => ok(is_replica && sync),
        HealthCheck::Async => ok(is_replica && !sync),
        HealthCheck::Health => ok(pg_up),
        // A loop that has not finished within its period plus a TTL is hung.
        HealthCheck::Liveness => ok(s.last_loop_ms > 0
            && clock.now_ms.saturating_sub(s.last_loop_ms) <= clock.loop_wait_ms + clock.ttl_ms),
        HealthCheck::Readiness => ok(is_primary || (is_replica && m.state == PgState::Streaming)),
    }
}

/// The handler behind every health path (GET, HEAD and OPTIONS answer the
/// same code; HEAD without a body).
pub async fn handle(
    app: AppState,
    check: HealthCheck,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let query = match query
        .map_err(|e| e.body_text())
        .and_then(|Query(pairs)| CheckQuery::from_pairs(&pairs))
    {
        Ok(q) => q,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &e),
    };
    let s = app.status.borrow().clone();
    let tags = LocalTags {
        nofailover: s
            .member
            .as_ref()
            .map_or(app.config.ha.nofailover, |m| m.nofailover),
        nosync: s.member.as_ref().map_or(app.config.ha.nosync, |m| m.nosync),
    };
    let clock = Clock {
        now_ms: crate::util::boottime_ms(),
        loop_wait_ms: app.config.ha.loop_wait.as_millis() as u64,
        ttl_ms: app.config.ha.ttl.as_millis() as u64,
    };
    let code = health_status(&s, check, &query, tags, clock);
    let body = StatusReport::from_status(&s)
        .and_then(|r| serde_json::to_value(r).ok())
        .unwrap_or_else(|| serde_json::json!({ "state": "starting" }));
    (code, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcs::LeaderKey;
    use crate::model::Lsn;

    pub(crate) fn record(name: &str, role: &str, state: &str, lsn: &str) -> MemberRecord {
        serde_json::from_value(serde_json::json!({
            "name": name, "api_url": "http://x", "host": "h", "port": 1,
            "role": role, "state": state, "timeline": 1, "received_lsn": lsn,
        }))
        .unwrap()
    }

    fn status(role: &str, state: &str, lease: bool, leader_lsn: &str, my_lsn: &str) -> AgentStatus {
        let me = record("me", role, state, my_lsn);
        let mut view = ClusterView::default();
        let leader_name = if lease { "me" } else { "boss" };
        if !lease {
            view.members.insert(
                "boss".into(),
                record("boss", "primary", "running", leader_lsn),
            );
        }
        view.members.insert("me".into(), me.clone());
        view.leader = Some(LeaderKey {
            name: leader_name.into(),
            lease_id: 1,
        });
        AgentStatus {
            member: Some(me),
            lease_held: lease,
            lease_valid: lease,
            view: Some(view),
            last_loop_ms: 1000,
            ..Default::default()
        }
    }

    const CLOCK: Clock = Clock {
        now_ms: 1500,
        loop_wait_ms: 500,
        ttl_ms: 3000,
    };

    fn code(s: &AgentStatus, c: HealthCheck, q: &str) -> u16 {
        let pairs: Vec<(String, String)> = q
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect();
        let query = CheckQuery::from_pairs(&pairs).unwrap();
        health_status(
            s,
            c,
            &query,
            LocalTags {
                nofailover: false,
                nosync: true,
            },
            CLOCK,
        )
        .as_u16()
    }

    use HealthCheck::*;
    const ALL: [HealthCheck; 8] = [
        Primary, Replica, ReadOnly, Sync, Async, Health, Liveness, Readiness,
    ];

    #[test]
    fn codes_by_role() {
        let leader = status("primary", "running", true, "0/0", "0/100");
        let replica = status("replica", "streaming", false, "0/100", "0/100");
        let recovering = status("replica", "in_recovery", false, "0/100", "0/100");
        let stopped = status("unknown", "stopped", false, "0/100", "0/100");
        let no_lease = status("primary", "running", false, "0/100", "0/100");
        let expect = [
            // Primary Replica ReadOnly Sync Async Health Liveness Readiness
            (&leader, [200, 503, 200, 503, 503, 200, 200, 200]),
            (&replica, [503, 200, 200, 503, 200, 200, 200, 200]),
            (&recovering, [503, 200, 200, 503, 200, 200, 200, 503]),
            (&stopped, [503, 503, 503, 503, 503, 503, 200, 503]),
            (&no_lease, [503, 503, 503, 503, 503, 200, 200, 503]),
        ];
        for (s, codes) in expect {
            for (c, want) in ALL.iter().zip(codes) {
                assert_eq!(
                    code(s, *c, ""),
                    want,
                    "{c:?} for {:?}",
                    s.member.as_ref().unwrap().state
                );
            }
        }
    }

    #[test]
    fn a_starting_agent_is_unhealthy_and_a_hung_loop_is_not_alive() {
        let s = AgentStatus::default();
        for c in ALL {
            assert_eq!(code(&s, c, ""), 503);
        }
        let mut s = status("replica", "streaming", false, "0/0", "0/0");
        s.last_loop_ms = 1;
        let late = Clock {
            now_ms: 3502,
            ..CLOCK
        };
        let q = CheckQuery::default();
        assert_eq!(
            health_status(&s, Liveness, &q, LocalTags::default(), late),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn lag_filter() {
        // 0x1000 = 4096 bytes behind.
        let s = status("replica", "streaming", false, "0/2000", "0/1000");
        assert_eq!(code(&s, Replica, "lag=4096"), 200);
        assert_eq!(code(&s, Replica, "lag=4095"), 503);
        assert_eq!(code(&s, Replica, "lag=4kB"), 200);
        assert_eq!(code(&s, ReadOnly, "lag=1kB"), 503);
        assert_eq!(code(&s, Async, "lag=1kB"), 503);
        // lag does not apply to the leader or to non-role checks.
        let leader = status("primary", "running", true, "0/0", "0/100");
        assert_eq!(code(&leader, ReadOnly, "lag=0"), 200);
        assert_eq!(code(&s, Health, "lag=0"), 200);
        // Unknown leader position: not known to lag (as Patroni).
        let mut orphan = s.clone();
        orphan.view.as_mut().unwrap().leader = None;
        assert_eq!(code(&orphan, Replica, "lag=0"), 200);
    }

    #[test]
    fn tag_filters() {
        let s = status("replica", "streaming", false, "0/0", "0/0");
        assert_eq!(code(&s, Replica, "tag_nofailover=false"), 200);
        assert_eq!(code(&s, Replica, "tag_nofailover=true"), 503);
        assert_eq!(
            code(&s, Replica, "tag_nosync=true&tag_nofailover=False"),
            200
        );
        assert_eq!(code(&s, Replica, "tag_nosync=false"), 503);
        assert_eq!(code(&s, Replica, "tag_datacenter=east"), 503);
        assert_eq!(code(&s, Replica, "tag_nofailover=maybe"), 503);
        // Tags do not affect non-role checks.
        assert_eq!(code(&s, Health, "tag_datacenter=east"), 200);
        let leader = status("primary", "running", true, "0/0", "0/100");
        assert_eq!(code(&leader, Primary, "tag_nofailover=true"), 503);
    }

    #[test]
    fn sizes() {
        for (text, want) in [
            ("0", 0),
            ("1048576", 1 << 20),
            ("512B", 512),
            ("16kB", 16 << 10),
            ("10MB", 10 << 20),
            ("10 mb", 10 << 20),
            ("1GB", 1 << 30),
            ("2TB", 2 << 40),
            ("3MiB", 3 << 20),
        ] {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
        for bad in [
            "",
            "MB",
            "-1",
            "1.5MB",
            "10XB",
            "99999999999999999999",
            "20000000TB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert!(CheckQuery::from_pairs(&[("lag".into(), "lots".into())]).is_err());
    }

    #[test]
    fn lag_uses_the_freshest_local_position() {
        let mut s = status("replica", "streaming", false, "0/2000", "0/1000");
        s.wal_position = Some(Lsn(0x2000));
        assert_eq!(code(&s, Replica, "lag=0"), 200);
    }

    #[test]
    fn synchronous_standbys_come_from_the_current_leaders_record() {
        assert!(!is_synchronous(None, &"me".into()));
        let mut s = status("replica", "streaming", false, "0/0", "0/0");
        assert_eq!((code(&s, Sync, ""), code(&s, Async, "")), (503, 200));
        let record = |leader: &str, members: &[&str]| crate::dcs::SyncRecord {
            leader: leader.into(),
            members: members.iter().map(|&m| m.into()).collect(),
            quorum: 1,
            degraded: false,
        };
        s.view.as_mut().unwrap().sync = Some(record("boss", &["me"]));
        assert_eq!((code(&s, Sync, ""), code(&s, Async, "")), (200, 503));
        assert_eq!(code(&s, Sync, "lag=0"), 200);
        // A record left by a former leader does not count.
        s.view.as_mut().unwrap().sync = Some(record("old", &["me"]));
        assert_eq!((code(&s, Sync, ""), code(&s, Async, "")), (503, 200));
        s.view.as_mut().unwrap().sync = Some(record("boss", &["other"]));
        assert_eq!((code(&s, Sync, ""), code(&s, Async, "")), (503, 200));
        // Only running replicas answer either.
        let mut stopped = status("unknown", "stopped", false, "0/0", "0/0");
        stopped.view.as_mut().unwrap().sync = Some(record("boss", &["me"]));
        assert_eq!(
            (code(&stopped, Sync, ""), code(&stopped, Async, "")),
            (503, 503)
        );
    }
}
