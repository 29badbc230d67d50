//! The plans and refusals of the rolling operations, and the read-only
//! views (`dsn`, `topology`), from hand-made `pgha list` views.

use super::*;

fn member(name: &str, role: &str, state: &str) -> ListMember {
    ListMember {
        name: name.into(),
        role: role.into(),
        state: state.into(),
        host: format!("10.0.0.{}", name.trim_start_matches("n")),
        port: 5432,
        timeline: Some(3),
        lag_bytes: Some(0),
        api_url: format!("http://{name}:8008"),
        sync_state: if role == "leader" {
            String::new()
        } else {
            "async".into()
        },
        upstream: None,
        decision: None,
        archive: None,
        pending_restart: Vec::new(),
        rejected_parameters: Default::default(),
        vip: None,
    }
}

fn list(members: Vec<ListMember>) -> ListOutput {
    ListOutput {
        cluster: "c".into(),
        paused: false,
        synchronous_mode: "on".into(),
        synchronous_degraded: false,
        members,
        proxies: Vec::new(),
        warnings: Vec::new(),
    }
}

/// n1 leads, n2 and n3 stream from it.
fn healthy() -> ListOutput {
    let mut n2 = member("n2", "replica", "streaming");
    n2.upstream = Some("n1".into());
    n2.sync_state = "sync".into();
    let mut n3 = member("n3", "replica", "streaming");
    n3.upstream = Some("n1".into());
    list(vec![member("n1", "leader", "running"), n3, n2])
}

fn pending(mut l: ListOutput, names: &[&str]) -> ListOutput {
    for m in &mut l.members {
        if names.contains(&m.name.as_str()) {
            m.pending_restart = vec!["shared_buffers".into()];
        }
    }
    l
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn replica(n: &str) -> RestartStep {
    RestartStep::Replica(n.into())
}

#[test]
fn rolling_restart_plans() {
    type Row = (
        &'static str,
        ListOutput,
        Vec<String>,
        bool,
        bool,
        Result<Vec<RestartStep>, &'static str>,
    );
    let rows: Vec<Row> = vec![
        (
            "every member: refused without --switchover (the leader is in it)",
            healthy(),
            vec![],
            false,
            false,
            Err("n1 is the leader: restarting it in place stops writes"),
        ),
        (
            "every member with --switchover: replicas by name, the leader last",
            healthy(),
            vec![],
            false,
            true,
            Ok(vec![
                replica("n2"),
                replica("n3"),
                RestartStep::Leader("n1".into()),
            ]),
        ),
        (
            "named replicas only, in name order whatever the argument order",
            healthy(),
            names(&["n3", "n2"]),
            false,
            false,
            Ok(vec![replica("n2"), replica("n3")]),
        ),
        (
            "--pending: only members with a parameter waiting",
            pending(healthy(), &["n3"]),
            vec![],
            true,
            false,
            Ok(vec![replica("n3")]),
        ),
        (
            "--pending with the leader pending needs --switchover",
            pending(healthy(), &["n1", "n3"]),
            vec![],
            true,
            false,
            Err("n1 is the leader"),
        ),
        (
            "--pending, nothing pending: nothing to do",
            healthy(),
            vec![],
            true,
            false,
            Ok(vec![]),
        ),
        (
            "unknown member: a usage error naming it",
            healthy(),
            names(&["n2", "n9"]),
            false,
            false,
            Err("no member named n9"),
        ),
        (
            "paused: refused",
            ListOutput {
                paused: true,
                ..healthy()
            },
            names(&["n2"]),
            false,
            false,
            Err("paused"),
        ),
        (
            "no leader: refused",
            list(vec![
                member("n1", "unknown", "stopped"),
                member("n2", "replica", "in recovery"),
            ]),
            names(&["n2"]),
            false,
            false,
            Err("no leader"),
        ),
        (
            "the leader alone, no replica streams: no switchover possible",
            list(vec![
                member("n1", "leader", "running"),
                member("n2", "unknown", "stopped"),
            ]),
            names(&["n1"]),
            false,
            true,
            Err("no replica streams"),
        ),
    ];
    for (why, l, nodes, pending, switchover, want) in rows {
        let got = plan_restart(&l, &nodes, pending, switchover);
        match (got, want) {
            (Ok(g), Ok(w)) => assert_eq!(g, w, "{why}"),
            (Err(e), Err(w)) => assert!(format!("{e:#}").contains(w), "{why}: {e:#}"),
            (g, w) => panic!("{why}: got {g:?}, want {w:?}"),
        }
    }
}

#[test]
fn a_step_waits_for_every_other_member() {
    assert_eq!(others_not_ready(&healthy(), "n2"), None);
    let mut l = healthy();
    l.members[1].state = "starting".into();
    let name = l.members[1].name.clone();
    let problem = others_not_ready(&l, "n2").expect("another member is down");
    assert!(
        problem.contains(&format!("{name} is starting")),
        "{problem}"
    );
    // The target itself being down is what the step is about.
    assert_eq!(others_not_ready(&l, &name), None);
    l.members[0].state = "stopped".into();
    assert!(others_not_ready(&l, &name).is_some(), "the leader is down");
}

#[test]
fn reinit_refusals() {
    let l = healthy();
    assert!(reinit_problem(&l, "n2").unwrap().is_none());
    let e = reinit_problem(&l, "n1").unwrap_err();
    assert!(format!("{e}").contains("is the leader"), "{e}");
    let e = reinit_problem(&l, "n9").unwrap_err();
    assert!(e.downcast_ref::<UsageError>().is_some(), "{e}");
    // strict with one standby: commits would wait for the whole clone.
    let mut strict = list(vec![
        member("n1", "leader", "running"),
        member("n2", "replica", "streaming"),
    ]);
    strict.synchronous_mode = "strict".into();
    let p = reinit_problem(&strict, "n2").unwrap().expect("a warning");
    assert!(p.contains("only standby"), "{p}");
    assert!(only_strict_standby(&strict, "n2"));
    assert!(!only_strict_standby(&healthy(), "n2"));
    // A broken replica is what reinit is for: its own state does not matter.
    let mut broken = healthy();
    broken.members[1].state = "stopped".into();
    let name = broken.members[1].name.clone();
    assert!(reinit_problem(&broken, &name).unwrap().is_none());
    let mut leaderless = healthy();
    leaderless.members[0].state = "stopped".into();
    assert!(reinit_problem(&leaderless, "n2").is_err());
}

#[test]
fn dsn_lists_the_likeliest_server_first() {
    let l = healthy();
    let d = build_dsn(&l, DsnRole::Leader, Some("app"), Some("alice")).unwrap();
    assert_eq!(
        d.dsn,
        "host=10.0.0.1,10.0.0.2,10.0.0.3 port=5432,5432,5432 user='alice' dbname='app' target_session_attrs=read-write connect_timeout=2"
    );
    assert_eq!(
        d.uri,
        "postgresql://10.0.0.1:5432,10.0.0.2:5432,10.0.0.3:5432/app?target_session_attrs=read-write&user=alice&connect_timeout=2"
    );
    let d = build_dsn(&l, DsnRole::Replica, None, None).unwrap();
    assert_eq!(
        d.hosts,
        vec!["10.0.0.2:5432", "10.0.0.3:5432", "10.0.0.1:5432"]
    );
    assert_eq!(d.target_session_attrs, "prefer-standby");
    let mut v6 = healthy();
    v6.members[0].host = "fd00::1".into();
    let d = build_dsn(&v6, DsnRole::Any, Some("a b"), None).unwrap();
    assert!(
        d.uri.starts_with("postgresql://[fd00::1]:5432,"),
        "{}",
        d.uri
    );
    assert!(d.uri.contains("/a%20b?"), "{}", d.uri);
    assert!(build_dsn(&list(vec![]), DsnRole::Leader, None, None).is_err());
}

#[test]
fn topology_nests_replicas_under_their_upstream() {
    let mut l = healthy();
    let mut n4 = member("n4", "replica", "streaming");
    n4.upstream = Some("n3".into());
    l.members.push(n4);
    l.members.push(member("n5", "unknown", "stopped"));
    let roots = topology(&l);
    assert_eq!(
        roots.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        vec!["n1", "n5"]
    );
    let leader = &roots[0];
    assert_eq!(
        leader
            .replicas
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        vec!["n2", "n3"]
    );
    assert_eq!(leader.replicas[1].replicas[0].name, "n4");
    let text = render_topology(&roots);
    let want = [
        "n1  leader  running  TL 3  lag 0 B",
        "├─ n2  replica (sync)  streaming  TL 3  lag 0 B",
        "└─ n3  replica (async)  streaming  TL 3  lag 0 B",
        "   └─ n4  replica (async)  streaming  TL 3  lag 0 B",
        "n5  unknown (async)  stopped  TL 3  lag 0 B",
    ];
    assert_eq!(text.lines().collect::<Vec<_>>(), want, "{text}");
    // A record naming an unknown or looping upstream is still shown.
    let mut looped = list(vec![
        member("a", "replica", "streaming"),
        member("b", "replica", "streaming"),
    ]);
    looped.members[0].upstream = Some("b".into());
    looped.members[1].upstream = Some("a".into());
    let roots = topology(&looped);
    let count = |n: &TopologyNode| -> usize {
        fn c(n: &TopologyNode) -> usize {
            1 + n.replicas.iter().map(c).sum::<usize>()
        }
        c(n)
    };
    assert_eq!(roots.iter().map(count).sum::<usize>(), 2);
}
