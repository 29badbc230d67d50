//! Unit tests of the pure parts of the actions: body parsing, switchover
//! and failover validation, times, configuration patches.

use super::*;
use crate::dcs::LeaderKey;
use crate::model::MemberRecord;

fn record(name: &str, role: &str, state: &str, lsn: &str) -> MemberRecord {
    serde_json::from_value(json!({
        "name": name, "api_url": "http://x", "host": "h", "port": 1,
        "role": role, "state": state, "timeline": 1, "received_lsn": lsn,
    }))
    .unwrap()
}

fn view() -> ClusterView {
    let mut v = ClusterView::default();
    for r in [
        record("l", "primary", "running", "0/5000000"),
        record("good", "replica", "streaming", "0/5000000"),
        record("lagging", "replica", "streaming", "0/1"),
        record("down", "unknown", "stopped", "0/5000000"),
    ] {
        v.members.insert(r.name.clone(), r);
    }
    v.leader = Some(LeaderKey {
        name: "l".into(),
        lease_id: 1,
    });
    v
}

fn headers(ct: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(ct) = ct {
        h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
    }
    h
}

fn body(text: &str) -> Result<Bytes, BytesRejection> {
    Ok(Bytes::from(text.to_string()))
}

const MIB: u64 = 1 << 20;
const NOW: u64 = 1_800_000_000_000;

#[test]
fn bodies() {
    let json = Some("application/json");
    let b: SwitchoverBody = parse_body(&headers(json), body(r#"{"candidate":"good"}"#)).unwrap();
    assert_eq!(b.candidate.as_deref(), Some("good"));
    // Empty means {}, with or without a content type.
    let b: SwitchoverBody = parse_body(&headers(None), body("")).unwrap();
    assert_eq!(
        b,
        SwitchoverBody {
            leader: None,
            candidate: None,
            scheduled_at: None
        }
    );
    let NoParameters {} = parse_body(&headers(json), body(" \n")).unwrap();
    let NoParameters {} = parse_body(
        &headers(Some("application/json; charset=utf-8")),
        body("{}"),
    )
    .unwrap();
    let NoParameters {} =
        parse_body(&headers(Some("application/merge-patch+json")), body("{}")).unwrap();
    for (ct, text, code) in [
        (json, "{", 400),
        (json, "[]", 400),
        (json, "null", 400),
        (json, r#"{"candidate": 7}"#, 400),
        (json, r#"{"candidat": "good"}"#, 400),
        (Some("text/plain"), r#"{"candidate":"good"}"#, 415),
        (
            Some("application/x-www-form-urlencoded"),
            "candidate=good",
            415,
        ),
    ] {
        let e = parse_body::<SwitchoverBody>(&headers(ct), body(text)).unwrap_err();
        assert_eq!(e.code.as_u16(), code, "{ct:?} {text:?}: {e:?}");
    }
    let e = parse_body::<NoParameters>(&headers(json), body(r#"{"force": true}"#)).unwrap_err();
    assert!(e.message.contains("unknown field"), "{e:?}");
    let e = parse_body::<FailoverBody>(&headers(json), body("{}")).unwrap_err();
    assert!(e.message.contains("candidate"), "{e:?}");
}

#[test]
fn switchover_validation() {
    let v = view();
    let plan = |candidate: Option<&str>, leader: Option<&str>| {
        plan_switchover(
            &v,
            &SwitchoverBody {
                leader: leader.map(String::from),
                candidate: candidate.map(String::from),
                scheduled_at: None,
            },
            MIB,
            NOW,
        )
    };
    let ok = plan(Some("good"), Some("l")).unwrap();
    assert_eq!(ok.from, Some("l".into()));
    assert_eq!(ok.to, Some("good".into()));
    assert_eq!(ok.requested_at_unix_ms, NOW);
    assert!(!ok.accept_data_loss);
    // The CLI's choice when no candidate is named.
    assert_eq!(plan(None, None).unwrap().to, Some("good".into()));
    let err = |c: Option<&str>, l: Option<&str>| {
        let e = plan(c, l).unwrap_err();
        (e.code.as_u16(), e.message)
    };
    assert_eq!(err(Some("ghost"), None).0, 404);
    let (code, msg) = err(Some("lagging"), None);
    assert_eq!(code, 412);
    assert!(msg.contains("bytes behind"), "{msg}");
    let (code, msg) = err(Some("down"), None);
    assert_eq!(code, 412);
    assert!(msg.contains("not a streaming replica"), "{msg}");
    assert_eq!(err(Some("l"), None).0, 412);
    let (code, msg) = err(Some("good"), Some("other"));
    assert_eq!(code, 412);
    assert!(msg.contains("the leader is l"), "{msg}");

    let mut pending = view();
    pending.failover = Some(ok);
    let e = plan_switchover(
        &pending,
        &SwitchoverBody {
            leader: None,
            candidate: None,
            scheduled_at: None,
        },
        MIB,
        NOW,
    )
    .unwrap_err();
    assert_eq!(e.code, StatusCode::CONFLICT);

    let mut leaderless = view();
    leaderless.leader = None;
    let e = plan_switchover(
        &leaderless,
        &SwitchoverBody {
            leader: None,
            candidate: None,
            scheduled_at: None,
        },
        MIB,
        NOW,
    )
    .unwrap_err();
    assert!(e.message.contains("/failover"), "{e:?}");
}

#[test]
fn scheduled_switchover() {
    let v = view();
    let at = |t: &str| {
        plan_switchover(
            &v,
            &SwitchoverBody {
                leader: None,
                candidate: Some("good".into()),
                scheduled_at: Some(t.into()),
            },
            MIB,
            NOW,
        )
    };
    // NOW is 2027-01-15T08:00:00Z.
    assert_eq!(
        at("2027-01-15T09:00:00Z").unwrap().not_before_unix_ms,
        Some(NOW + 3_600_000)
    );
    assert_eq!(
        at("2027-01-15T10:00:00+01:00").unwrap().not_before_unix_ms,
        Some(NOW + 3_600_000)
    );
    assert_eq!(
        at("2027-01-15T08:30:00-00:30").unwrap().not_before_unix_ms,
        Some(NOW + 3_600_000)
    );
    assert_eq!(
        at("2020-01-01T00:00:00Z").unwrap_err().code,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(at("tomorrow").unwrap_err().code, StatusCode::BAD_REQUEST);
}

#[test]
fn times() {
    assert_eq!(parse_time("1970-01-01T00:00:01Z"), Ok(1000));
    assert_eq!(parse_time("1970-01-01T00:00:01.250Z"), Ok(1250));
    assert_eq!(parse_time("1970-01-01T01:00:01+01:00"), Ok(1000));
    for bad in [
        "",
        "now",
        "1970-01-01",
        "1970-01-01T00:00:00+1:00",
        "1970-01-01T00:00:00+xx:00",
        "1969-12-31T23:00:00+01:00x",
    ] {
        assert!(parse_time(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn failover_validation() {
    let body = |c: &str| FailoverBody {
        candidate: c.into(),
        accept_data_loss: true,
    };
    // A healthy leader: switch over instead.
    let e = plan_failover(&view(), &body("good"), NOW).unwrap_err();
    assert_eq!(e.code, StatusCode::PRECONDITION_FAILED);
    assert!(e.message.contains("/switchover"), "{e:?}");
    let mut v = view();
    v.leader = None;
    let ok = plan_failover(&v, &body("lagging"), NOW).unwrap();
    assert_eq!(ok.to, Some("lagging".into()));
    assert!(ok.accept_data_loss);
    assert_eq!(ok.from, None);
    assert_eq!(
        plan_failover(&v, &body("ghost"), NOW).unwrap_err().code,
        StatusCode::NOT_FOUND
    );
    let e = plan_failover(&v, &body("down"), NOW).unwrap_err();
    assert_eq!(e.code, StatusCode::PRECONDITION_FAILED);
    assert!(e.message.contains("not running"), "{e:?}");
}

#[test]
fn config_patches() {
    let current = ClusterConfig::default();
    let paused = patch_config(&current, &json!({"paused": true})).unwrap();
    assert!(paused.paused);
    // null restores the default; {} changes nothing.
    assert_eq!(
        patch_config(&paused, &json!({"paused": null})).unwrap(),
        current
    );
    assert_eq!(patch_config(&paused, &json!({})).unwrap(), paused);
    let sync = patch_config(
        &current,
        &json!({"synchronous_mode": "on", "synchronous_node_count": 2, "synchronous_quorum": true}),
    )
    .unwrap();
    assert_eq!(sync.synchronous_mode, crate::dcs::SyncMode::On);
    assert_eq!(sync.synchronous_node_count, 2);
    assert!(sync.synchronous_quorum);
    assert_eq!(
        patch_config(&sync, &json!({"synchronous_node_count": null}))
            .unwrap()
            .synchronous_node_count,
        1
    );
    let e = patch_config(&current, &json!({"paused": true, "ttl": 5})).unwrap_err();
    assert!(e.contains("unknown key \"ttl\""), "{e}");
    assert!(e.contains("known keys: paused"), "{e}");
    for bad in [
        json!({"paused": "maybe"}),
        json!({"paused": [true]}),
        json!({"paused": {"x": 1}}),
        json!({"synchronous_node_count": 0}),
        json!({"synchronous_node_count": 1.5}),
        json!({"synchronous_node_count": true}),
        json!({"synchronous_mode": "sometimes"}),
        json!([1]),
        json!("paused"),
    ] {
        assert!(patch_config(&current, &bad).is_err(), "{bad}");
    }
}

#[test]
fn restart_guards() {
    let mut s = AgentStatus {
        view: Some(view()),
        ..Default::default()
    };
    assert_eq!(restart_problem(&s), None);
    s.lease_held = true;
    assert_eq!(restart_problem(&s), None);
    let v = s.view.as_mut().unwrap();
    v.config.synchronous_mode = crate::dcs::SyncMode::On;
    v.sync = Some(crate::dcs::SyncRecord {
        leader: "l".into(),
        members: vec!["good".into()],
        quorum: 1,
        degraded: false,
    });
    let e = restart_problem(&s).unwrap();
    assert_eq!(e.code, StatusCode::CONFLICT);
    assert!(e.message.contains("/switchover"), "{e:?}");
    // A replica restarts in place whatever the mode.
    s.lease_held = false;
    assert_eq!(restart_problem(&s), None);
    s.paused = true;
    assert!(restart_problem(&s).unwrap().message.contains("paused"));
}

#[test]
fn config_patches_set_and_remove_server_parameters() {
    let current = ClusterConfig::default();
    let with = patch_config(
        &current,
        &json!({"postgresql.parameters.work_mem": "64MB", "postgresql.parameters.max_connections": 200}),
    )
    .unwrap();
    assert_eq!(with.postgresql.parameters["work_mem"], "64MB");
    assert_eq!(with.postgresql.parameters["max_connections"], "200");
    let without = patch_config(&with, &json!({"postgresql.parameters.work_mem": null})).unwrap();
    assert!(!without.postgresql.parameters.contains_key("work_mem"));
    let e = patch_config(&current, &json!({"postgresql.parameters.port": "5433"})).unwrap_err();
    assert!(e.contains("postgresql.parameters.port"), "{e}");
}
