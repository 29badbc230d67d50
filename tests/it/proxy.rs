//! The pgha proxy in front of a real three-node cluster: routing, pooling
//! with prepared statements, SCRAM, cancel, bad input, and a leader that
//! dies while clients are connected.

use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use crate::support::cluster::{alive, children_of, connect};
use crate::support::proxy::Proxy;
use crate::support::{Cluster, ClusterOptions, Pki, wait_until};

async fn server_port(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("select inet_server_port()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Runs pgbench against `port` and asserts it finished every transaction.
fn pgbench(proxy: &Proxy, port: u16, args: &[&str]) {
    let out = Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .arg("postgres")
        .env("PGPASSWORD", proxy.password())
        .output()
        .expect("run pgbench");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "pgbench {args:?} failed:\n{text}\n{}",
        proxy.log_tail()
    );
    assert!(!text.contains("number of failed transactions: 1"), "{text}");
}

async fn raw_exchange(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await;
    out
}

/// Each client's prepared `select $1::int4 + 1` answers right.
async fn every_statement_runs(
    clients: &[(tokio_postgres::Client, tokio_postgres::Statement)],
    when: &str,
) {
    for (k, (c, st)) in clients.iter().enumerate() {
        let v: i32 = c
            .query_one(st, &[&(k as i32)])
            .await
            .unwrap_or_else(|e| panic!("{when}, client {k}: {e}"))
            .get(0);
        assert_eq!(v, k as i32 + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transaction_pooling_routes_authenticates_and_survives_bad_input() {
    let cluster = Cluster::start("pxtx", 3, ClusterOptions::default())
        .await
        .unwrap();
    let leader = cluster.leader_node().await.unwrap();
    let leader_port = leader.pg_port() as i32;
    // Two server connections for four clients: statements must be
    // re-prepared on whichever server a transaction gets.
    let proxy = Proxy::start(
        &cluster,
        "px1",
        &[
            ("default_pool_size", "2"),
            ("max_lag", "1073741824"),
            ("startup_timeout", "\"2s\""),
            // Four pgbench clients share the two connections, and each
            // commit waits for a synchronous standby: on a loaded host a
            // client can wait longer than the default 10 s for one. This
            // test is about the protocol, not about that limit.
            ("hold_timeout", "\"60s\""),
        ],
    )
    .await
    .unwrap();

    // Read-write reaches the leader only; read-only a replica.
    let rw = connect(&proxy.config(proxy.rw_port)).await.unwrap();
    assert_eq!(server_port(&rw).await, leader_port);
    let in_recovery: bool = rw
        .query_one("select pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!in_recovery);
    let ro = connect(&proxy.config(proxy.ro_port)).await.unwrap();
    let in_recovery: bool = ro
        .query_one("select pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery, "the read-only port reached a primary");
    assert_ne!(server_port(&ro).await, leader_port);

    // Named prepared statements across server connections.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let c = connect(&proxy.config(proxy.rw_port)).await.unwrap();
        let st = c.prepare("select $1::int4 + 1").await.unwrap();
        clients.push((c, st));
    }
    for i in 0..25i32 {
        for (c, st) in &clients {
            let v: i32 = c.query_one(st, &[&i]).await.unwrap().get(0);
            assert_eq!(v, i + 1);
        }
    }
    // A server whose statements were all dropped, in ways a plain
    // `DISCARD ALL` query would not show (behind a comment, through the
    // extended protocol): the proxy prepares them there again.
    for round in 0..3 {
        let (c, _) = &clients[round % clients.len()];
        if round % 2 == 0 {
            c.batch_execute("/* pool reset */ DISCARD ALL")
                .await
                .unwrap();
        } else {
            c.execute("DISCARD ALL", &[]).await.unwrap();
        }
        every_statement_runs(&clients, &format!("round {round}")).await;
    }
    // One the proxy cannot see at all (a DO block): the next Bind of a
    // statement on that server fails once, with the server's "does not
    // exist", and then the proxy prepares its statements there again.
    clients[0]
        .0
        .batch_execute("DO $$BEGIN EXECUTE 'DEALLOCATE ALL'; END$$")
        .await
        .unwrap();
    if let Err(e) = clients[0].0.query_one(&clients[0].1, &[&0i32]).await {
        assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::INVALID_SQL_STATEMENT_NAME),
            "{e}"
        );
    }
    for round in 0..2 {
        every_statement_runs(&clients, &format!("after DO, round {round}")).await;
    }
    // A transaction keeps its server connection; temp state of one
    // transaction is visible within it.
    let (c, _) = &clients[0];
    c.batch_execute("begin; create temp table t(x int) on commit drop; insert into t values (1);")
        .await
        .unwrap();
    let n: i64 = c
        .query_one("select count(*) from t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    c.batch_execute("commit").await.unwrap();

    // Errors mid-pipeline: the failed batch does not poison the session.
    let err = c.query_one("select 1/0", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO));
    let v: i32 = c.query_one("select 7", &[]).await.unwrap().get(0);
    assert_eq!(v, 7);

    // SCRAM failure: PostgreSQL's code and text.
    let mut bad = proxy.config(proxy.rw_port);
    bad.password("wrong");
    let err = bad
        .connect(NoTls)
        .await
        .err()
        .expect("wrong password accepted");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code(), &SqlState::INVALID_PASSWORD);
    assert_eq!(
        db.message(),
        "password authentication failed for user \"postgres\""
    );
    let mut nobody = proxy.config(proxy.rw_port);
    nobody.user("nobody");
    let err = nobody
        .connect(NoTls)
        .await
        .err()
        .expect("unknown user accepted");
    assert_eq!(
        err.as_db_error().map(|d| d.message().to_string()),
        Some("password authentication failed for user \"nobody\"".into())
    );

    // Cancel reaches the backend running the client's query.
    let sleeper = connect(&proxy.config(proxy.rw_port)).await.unwrap();
    let token = sleeper.cancel_token();
    let started = Instant::now();
    let running = tokio::spawn(async move { sleeper.batch_execute("select pg_sleep(60)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(NoTls).await.unwrap();
    let err = running.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED));
    assert!(started.elapsed() < Duration::from_secs(30));

    // Bad input, each followed by a client that still works.
    let bad_inputs: Vec<(&str, Vec<u8>)> = vec![
        ("unknown protocol version", vec![0, 0, 0, 8, 0, 2, 0, 0]),
        ("negative length", vec![0xff, 0xff, 0xff, 0xff, 0, 3, 0, 0]),
        ("oversized startup", vec![0x7f, 0, 0, 0, 0, 3, 0, 0]),
        ("truncated startup", vec![0, 0, 0, 40, 0, 3, 0, 0, b'u']),
        ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("GSS then nothing", vec![0, 0, 0, 8, 4, 210, 22, 48]),
        ("SSL without TLS, then garbage", {
            let mut v = vec![0, 0, 0, 8, 4, 210, 22, 47];
            v.extend_from_slice(&[1, 2, 3]);
            v
        }),
    ];
    for (what, bytes) in bad_inputs {
        let answer = raw_exchange(proxy.rw_port, &bytes).await;
        if what == "unknown protocol version" {
            assert_eq!(answer.first(), Some(&b'E'), "{what}: {answer:?}");
            assert!(
                String::from_utf8_lossy(&answer).contains("unsupported frontend protocol 2.0"),
                "{what}"
            );
        }
        if what.starts_with("GSS") || what.starts_with("SSL") {
            assert_eq!(answer.first(), Some(&b'N'), "{what}: {answer:?}");
        }
        let c = connect(&proxy.config(proxy.rw_port))
            .await
            .unwrap_or_else(|e| panic!("after {what}: {e}\n{}", proxy.log_tail()));
        assert_eq!(server_port(&c).await, leader_port, "after {what}");
    }
    // A client that logs in and then sends an oversized message.
    {
        let mut s = TcpStream::connect(("127.0.0.1", proxy.rw_port))
            .await
            .unwrap();
        s.write_all(b"Q\x7f\xff\xff\xff").await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    }
    assert_eq!(server_port(&rw).await, leader_port);

    // pgbench through both ports: COPY in (-i), and the three protocols.
    pgbench(&proxy, proxy.rw_port, &["-i", "-s", "1", "-q"]);
    for mode in ["simple", "extended", "prepared"] {
        pgbench(
            &proxy,
            proxy.rw_port,
            &["-M", mode, "-c", "4", "-j", "2", "-t", "50"],
        );
        pgbench(
            &proxy,
            proxy.ro_port,
            &["-S", "-M", mode, "-c", "4", "-j", "2", "-t", "50"],
        );
    }

    // Registered in the DCS: `pgha list --json` shows it.
    let list = cluster.list_json().await.unwrap();
    let proxies = list["proxies"].as_array().expect("proxies in pgha list");
    assert_eq!(proxies.len(), 1, "{list}");
    assert_eq!(proxies[0]["name"], "px1");
    assert_eq!(proxies[0]["rw"], format!("127.0.0.1:{}", proxy.rw_port));
    assert_eq!(proxies[0]["ro"], format!("127.0.0.1:{}", proxy.ro_port));
    assert_eq!(proxies[0]["auto"], false);
    assert_eq!(proxies[0]["state"], "serving");

    // The metrics endpoint counts what happened.
    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", proxy.api_port))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("pgha_proxy_auth_failures_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pgha_proxy_transactions_total{member="),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_mode_keeps_session_state() {
    let cluster = Cluster::start("pxss", 2, ClusterOptions::default())
        .await
        .unwrap();
    let pki = Pki::generate(&cluster.dir().join("pki")).unwrap();
    let cert = format!("{:?}", pki.server_cert.display().to_string());
    let key = format!("{:?}", pki.server_key.display().to_string());
    let proxy = Proxy::start(
        &cluster,
        "px2",
        // One session for `c`, two for pgbench, one being reset.
        &[
            ("pool_mode", "\"session\""),
            ("default_pool_size", "4"),
            ("tls_certificate", &cert),
            ("tls_key", &key),
        ],
    )
    .await
    .unwrap();

    // TLS towards clients: psql with sslmode=require gets a TLS session.
    let out = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require",
            proxy.rw_port
        ))
        .args(["-Atc", "select 42"])
        .env("PGPASSWORD", proxy.password())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        proxy.log_tail()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    let c = connect(&proxy.config(proxy.rw_port)).await.unwrap();
    c.batch_execute("set application_name = 'kept'; create temp table s(x int)")
        .await
        .unwrap();
    for _ in 0..5 {
        let name: String = c
            .query_one("show application_name", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(name, "kept");
        c.execute("insert into s values (1)", &[]).await.unwrap();
    }
    pgbench(&proxy, proxy.rw_port, &["-i", "-s", "1", "-q"]);
    pgbench(
        &proxy,
        proxy.rw_port,
        &["-M", "prepared", "-c", "2", "-t", "30"],
    );
    pgbench(
        &proxy,
        proxy.ro_port,
        &["-S", "-M", "extended", "-c", "2", "-t", "30"],
    );
}

/// The leader's host dies: a client between transactions waits and its
/// next transaction runs on the new leader, never on the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill_holds_then_serves_the_new_leader() {
    let mut cluster = Cluster::start("pxkill", 3, ClusterOptions::default())
        .await
        .unwrap();
    let proxy = Proxy::start(&cluster, "px3", &[("hold_timeout", "\"60s\"")])
        .await
        .unwrap();
    let c = connect(&proxy.config(proxy.rw_port)).await.unwrap();
    let old = cluster.leader().await.unwrap().expect("a leader");
    let old_port = cluster.node(&old).pg_port() as i32;
    assert_eq!(server_port(&c).await, old_port);
    c.batch_execute("create table if not exists w(id int)")
        .await
        .unwrap();

    let victim = cluster.node_mut(&old);
    let backends = children_of(victim.postmaster_pid().expect("postmaster"));
    victim.kill_agent().await.unwrap();
    victim.kill_postgres().expect("the leader's postmaster");
    // Idle backends exit once they notice their postmaster died; a query
    // sent before that would run on the dying primary and fail with
    // "outcome unknown", which is not what this test is about.
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async { backends.iter().all(|&p| !alive(p)).then_some(()) },
    )
    .await
    .unwrap();

    // Held (no primary), then served by the new leader; no error.
    c.execute("insert into w values (1)", &[])
        .await
        .unwrap_or_else(|e| panic!("held transaction failed: {e:?}\n{}", proxy.log_tail()));
    let port = server_port(&c).await;
    assert_ne!(port, old_port);
    let new = cluster
        .wait_for_leader_other_than(&old, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(port, cluster.node(&new).pg_port() as i32);
}

/// A `[proxy]` table in every node's file: each agent runs a proxy, each
/// reaches the leader, each registers as `auto`, and each agent's
/// `/metrics` carries its proxy's counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxies_inside_agents_route_to_the_leader() {
    let cluster = Cluster::start(
        "pxauto",
        2,
        ClusterOptions {
            embedded_proxy: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let leader_port = cluster.leader_node().await.unwrap().pg_port() as i32;
    for node in &cluster.nodes {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1")
            .port(node.proxy_port().expect("proxy port"))
            .user("postgres")
            .password(cluster.superuser_password())
            .dbname("postgres");
        let c = connect(&cfg)
            .await
            .unwrap_or_else(|e| panic!("{}'s proxy: {e}\n{}", node.name(), node.log_tail(20)));
        let row = c
            .query_one(
                "SELECT current_setting('port')::int, inet_server_port()",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), leader_port, "through {}", node.name());
        // The leader's own proxy reaches it through its Unix socket (no
        // server address); the other node's over TCP.
        let tcp_port: Option<i32> = row.get(1);
        if node.pg_port() as i32 == leader_port {
            assert_eq!(tcp_port, None, "through {}", node.name());
        } else {
            assert_eq!(tcp_port, Some(leader_port), "through {}", node.name());
        }
    }
    let leader_name = cluster.leader().await.unwrap().expect("a leader");
    for node in &cluster.nodes {
        let text = reqwest::get(format!("{}/metrics", node.api_url()))
            .await
            .and_then(|r| r.error_for_status())
            .unwrap_or_else(|e| panic!("{}: GET /metrics: {e}", node.name()))
            .text()
            .await
            .unwrap();
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .unwrap_or_else(|e| panic!("{}: /metrics does not parse: {e}\n{text}", node.name()));
        let value = |name: &str, labels: &[(&str, &str)]| {
            scrape
                .samples
                .iter()
                .find(|s| {
                    s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
                })
                .and_then(|s| match &s.value {
                    prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Untyped(v) => Some(*v),
                    _ => None,
                })
        };
        // The agent's own series are still there, beside the proxy's.
        assert!(value("pgha_role", &[]).is_some(), "{text}");
        let transactions = value(
            "pgha_proxy_transactions_total",
            &[("member", &leader_name), ("side", "rw")],
        )
        .unwrap_or(0.0);
        assert!(
            transactions >= 1.0,
            "{}: no transaction counted on {leader_name}:\n{text}",
            node.name()
        );
        let opened = value(
            "pgha_proxy_server_connections",
            &[("member", &leader_name), ("user", "postgres")],
        );
        assert!(opened.is_some(), "{}: no pool series:\n{text}", node.name());
        let waits = scrape
            .samples
            .iter()
            .find(|s| s.metric == "pgha_proxy_wait_seconds")
            .and_then(|s| match &s.value {
                prometheus_parse::Value::Histogram(h) => h.iter().map(|c| c.count).reduce(f64::max),
                _ => None,
            })
            .unwrap_or(0.0);
        assert!(waits >= 1.0, "{}: no wait observed:\n{text}", node.name());
    }
    let list = wait_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            let list = cluster.list_json().await.ok()?;
            let proxies = list["proxies"].as_array()?;
            (proxies.len() == 2).then_some(list)
        },
    )
    .await
    .unwrap();
    for p in list["proxies"].as_array().unwrap() {
        assert_eq!(p["auto"], true, "{p}");
        assert_eq!(p["state"], "serving", "{p}");
        assert_eq!(p["ro"], serde_json::Value::Null, "{p}");
    }
}

/// With no replica, the read-only port falls back to the leader only when
/// allowed; otherwise it holds and then says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_only_fallback_to_the_leader_is_configurable() {
    let cluster = Cluster::start("pxro", 1, ClusterOptions::default())
        .await
        .unwrap();
    let leader_port = cluster.leader_node().await.unwrap().pg_port() as i32;
    let with = Proxy::start(&cluster, "pxf1", &[]).await.unwrap();
    let c = connect(&with.config(with.ro_port)).await.unwrap();
    assert_eq!(server_port(&c).await, leader_port);

    let without = Proxy::start(
        &cluster,
        "pxf2",
        &[
            ("ro_fallback_to_leader", "false"),
            ("hold_timeout", "\"1s\""),
        ],
    )
    .await
    .unwrap();
    let Err(err) = connect(&without.config(without.ro_port)).await else {
        panic!("the read-only port reached the leader with fallback off");
    };
    let text = format!("{err:#}");
    assert!(
        text.contains("no read-only server available")
            && text.contains("no replica within max_lag"),
        "{text}"
    );
}

/// psql against `port` with extra connection keywords; (success, stdout,
/// stderr).
fn psql(proxy: &Proxy, port: u16, conninfo: &str, sql: &str) -> (bool, String, String) {
    let out = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=5 {conninfo}"
        ))
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGPASSWORD", proxy.password())
        .output()
        .expect("run psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `max_client_conn`, a client stalling mid-message, COPY TO STDOUT in
/// transaction mode, notices, and a certificate reload on SIGHUP; after
/// each bad client, another client still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_stalls_copy_out_notices_and_tls_reload() {
    let cluster = Cluster::start("pxlim", 1, ClusterOptions::default())
        .await
        .unwrap();
    let leader_port = cluster.leader_node().await.unwrap().pg_port() as i32;

    // max_client_conn: the fourth client gets PostgreSQL's 53300.
    let limited = Proxy::start(&cluster, "pxmax", &[("max_client_conn", "3")])
        .await
        .unwrap();
    // Retried: the start-up probe's connection may still hold a slot
    // for a moment after it closed.
    let mut held = Vec::new();
    for _ in 0..3 {
        let c = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            let cfg = limited.config(limited.rw_port);
            async move { connect(&cfg).await.ok() }
        })
        .await
        .unwrap();
        held.push(c);
    }
    let err = limited
        .config(limited.rw_port)
        .connect(NoTls)
        .await
        .err()
        .expect("a fourth client was accepted");
    assert_eq!(
        err.code(),
        Some(&SqlState::TOO_MANY_CONNECTIONS),
        "{err:?}\n{}",
        limited.log_tail()
    );
    for c in &held {
        assert_eq!(server_port(c).await, leader_port);
    }
    // A slot frees when a client leaves.
    held.pop();
    let again = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let cfg = limited.config(limited.rw_port);
        async move { connect(&cfg).await.ok() }
    })
    .await
    .unwrap();
    assert_eq!(server_port(&again).await, leader_port);
    drop((held, again, limited));

    let pki = Pki::generate(&cluster.dir().join("pki-a")).unwrap();
    let next = Pki::generate(&cluster.dir().join("pki-b")).unwrap();
    let tls_dir = cluster.dir().join("proxy-tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    let (cert_path, key_path) = (tls_dir.join("server.pem"), tls_dir.join("server.key"));
    std::fs::copy(&pki.server_cert, &cert_path).unwrap();
    std::fs::copy(&pki.server_key, &key_path).unwrap();
    let cert = format!("{:?}", cert_path.display().to_string());
    let key = format!("{:?}", key_path.display().to_string());
    let proxy = Proxy::start(
        &cluster,
        "pxstall",
        &[
            ("startup_timeout", "\"1s\""),
            ("client_idle_timeout", "\"2s\""),
            ("tls_certificate", &cert),
            ("tls_key", &key),
        ],
    )
    .await
    .unwrap();
    let worker = connect(&proxy.config(proxy.rw_port)).await.unwrap();

    // Stalls mid-message: in the startup packet (startup_timeout), and
    // after the login, in a query (client_idle_timeout). Each is dropped
    // after its timeout while `worker` keeps working.
    let mut stalled_startup = TcpStream::connect(("127.0.0.1", proxy.rw_port))
        .await
        .unwrap();
    stalled_startup
        .write_all(&[0, 0, 0, 40, 0, 3, 0, 0, b'u'])
        .await
        .unwrap();
    let mut stalled_query = {
        let mut s = TcpStream::connect(("127.0.0.1", proxy.rw_port))
            .await
            .unwrap();
        login_raw(&mut s, &proxy).await;
        // A Query announcing 100 bytes, 10 of them sent.
        s.write_all(b"Q\0\0\0\x64select 1 ").await.unwrap();
        s
    };
    let started = Instant::now();
    assert_eq!(server_port(&worker).await, leader_port);
    let mut buf = Vec::new();
    let n = tokio::time::timeout(
        Duration::from_secs(10),
        stalled_startup.read_to_end(&mut buf),
    )
    .await
    .expect("a client stalled in its startup packet was not dropped")
    .unwrap_or(0);
    assert_eq!(n, 0, "{buf:?}");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), stalled_query.read_to_end(&mut buf))
        .await
        .expect("a client stalled mid-query was not dropped")
        .ok();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.contains("57P05"), "{text}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    let worker = connect(&proxy.config(proxy.rw_port)).await.unwrap();
    assert_eq!(server_port(&worker).await, leader_port);

    // COPY TO STDOUT through transaction pooling, twice, then a query on
    // the same client.
    for _ in 0..2 {
        let stream = worker
            .copy_out("copy (select generate_series(1, 5000)) to stdout")
            .await
            .unwrap();
        let chunks: Vec<bytes::Bytes> = futures_util::TryStreamExt::try_collect(stream)
            .await
            .unwrap();
        let data: Vec<u8> = chunks.concat();
        let text = String::from_utf8(data).unwrap();
        assert_eq!(text.lines().count(), 5000);
        assert_eq!(text.lines().last(), Some("5000"));
    }
    let v: i32 = worker.query_one("select 11", &[]).await.unwrap().get(0);
    assert_eq!(v, 11);

    // NOTICE messages reach the client (psql prints them on stderr).
    let (ok, out, err) = psql(
        &proxy,
        proxy.rw_port,
        "",
        "DO $$ BEGIN RAISE NOTICE 'notice from % through the proxy', 'plpgsql'; END $$; SELECT 5",
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["DO", "5"]);
    assert!(
        err.contains("NOTICE:  notice from plpgsql through the proxy"),
        "{err}"
    );

    // TLS: the first certificate, then the second after SIGHUP.
    let verify = |ca: &std::path::Path| format!("sslmode=verify-ca sslrootcert={}", ca.display());
    let (ok, out, err) = psql(&proxy, proxy.rw_port, &verify(&pki.ca), "select 1");
    assert!(ok && out.trim() == "1", "{err}\n{}", proxy.log_tail());
    let (ok, _, _) = psql(&proxy, proxy.rw_port, &verify(&next.ca), "select 1");
    assert!(!ok, "the second CA verified the first certificate");
    std::fs::copy(&next.server_cert, &cert_path).unwrap();
    std::fs::copy(&next.server_key, &key_path).unwrap();
    proxy.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    let proxy_ref = &proxy;
    let next_ca = verify(&next.ca);
    wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
        let next_ca = next_ca.clone();
        async move {
            let (ok, _, _) = psql(proxy_ref, proxy_ref.rw_port, &next_ca, "select 1");
            ok.then_some(())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("new certificate not served: {e}\n{}", proxy.log_tail()));
    let (ok, _, _) = psql(&proxy, proxy.rw_port, &verify(&pki.ca), "select 1");
    assert!(!ok, "the old certificate is still served");
    // (`worker` may have met client_idle_timeout meanwhile.)
    let after = connect(&proxy.config(proxy.rw_port)).await.unwrap();
    assert_eq!(server_port(&after).await, leader_port);
}

/// Logs in on a raw socket with SCRAM (through tokio-postgres' client
/// side of the exchange) and reads up to ReadyForQuery.
async fn login_raw(s: &mut TcpStream, proxy: &Proxy) {
    use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
    use postgres_protocol::message::{backend, frontend};
    let mut out = bytes::BytesMut::new();
    frontend::startup_message([("user", "postgres"), ("database", "postgres")], &mut out).unwrap();
    s.write_all(&out).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let mut scram: Option<ScramSha256> = None;
    loop {
        let msg = loop {
            if let Some(m) = backend::Message::parse(&mut buf).unwrap() {
                break m;
            }
            let n = s.read_buf(&mut buf).await.unwrap();
            assert!(n > 0, "proxy closed during login");
        };
        out.clear();
        match msg {
            backend::Message::AuthenticationSasl(_) => {
                let sc =
                    ScramSha256::new(proxy.password().as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response(SCRAM_SHA_256, sc.message(), &mut out).unwrap();
                scram = Some(sc);
            }
            backend::Message::AuthenticationSaslContinue(body) => {
                let sc = scram.as_mut().unwrap();
                sc.update(body.data()).unwrap();
                frontend::sasl_response(sc.message(), &mut out).unwrap();
            }
            backend::Message::AuthenticationSaslFinal(body) => {
                scram.as_mut().unwrap().finish(body.data()).unwrap();
            }
            backend::Message::ErrorResponse(_) => panic!("login refused"),
            backend::Message::ReadyForQuery(_) => return,
            _ => {}
        }
        if !out.is_empty() {
            s.write_all(&out).await.unwrap();
        }
    }
}

/// Three planned switchovers while three writers insert through the
/// read-write port in transaction mode: the writers see no error at all
/// (each keeps its one session, no insert fails or times out), every
/// acknowledged row is on the final leader, and at no instant are two
/// servers writable. Each old leader waits for the proxy's drain
/// acknowledgement before it stops (docs/proxy.md, "Switchover").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switchovers_through_the_proxy_cause_no_client_errors() {
    use crate::support::cluster::pgha;
    use crate::support::{OneWritablePrimary, Writer};

    let cluster = Cluster::start("pxswitch", 3, ClusterOptions::default())
        .await
        .unwrap();
    let proxy = Proxy::start(
        &cluster,
        "pxs",
        &[("hold_timeout", "\"30s\""), ("drain_timeout", "\"5s\"")],
    )
    .await
    .unwrap();
    let checker = OneWritablePrimary::start(&cluster);
    let mut writers = Vec::new();
    for i in 0..3 {
        // A pause (held by the proxy) is expected; an error is not. The
        // wait covers a switchover on a loaded machine, well under the
        // proxy's hold_timeout.
        let w = Writer::start_patient(
            proxy.config(proxy.rw_port),
            &format!("px_writes_{i}"),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
        writers.push(w);
    }
    for w in &writers {
        w.wait_for_progress(20, Duration::from_secs(30))
            .await
            .unwrap();
    }
    // One writer whose transactions last a quarter of a second: a
    // switchover that stopped the old leader without waiting for the proxy's
    // drain would cut one of them off.
    let slow = {
        let client = connect(&proxy.config(proxy.rw_port)).await.unwrap();
        client
            .batch_execute("CREATE TABLE px_slow (id bigint PRIMARY KEY)")
            .await
            .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop_flag = stop.clone();
        let task = tokio::spawn(async move {
            let (mut acked, mut errors) = (Vec::new(), Vec::new());
            let mut id = 0i64;
            while !stop_flag.load(std::sync::atomic::Ordering::Relaxed) {
                id += 1;
                let sql = format!(
                    "BEGIN; INSERT INTO px_slow VALUES ({id}); SELECT pg_sleep(0.25); COMMIT"
                );
                match tokio::time::timeout(Duration::from_secs(20), client.batch_execute(&sql))
                    .await
                {
                    Ok(Ok(())) => acked.push(id),
                    Ok(Err(e)) => errors.push(format!("{id}: {e}")),
                    Err(_) => errors.push(format!("{id}: timed out")),
                }
            }
            (acked, errors)
        });
        (stop, task)
    };
    let config = cluster.nodes[0].config_path().to_path_buf();
    for round in 1..=3 {
        let from = cluster.leader().await.unwrap().expect("a leader");
        let to = cluster.replica_names().await.unwrap()[0].clone();
        let started = Instant::now();
        let out = pgha(&["switchover", "--to", to.as_str()], &config)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "round {round}: switchover to {to}: {e:#}\n{}",
                    cluster.log_tails(30)
                )
            });
        eprintln!(
            "round {round}: {from} -> {to} in {:.2}s: {}",
            started.elapsed().as_secs_f64(),
            out.trim().replace('\n', " / ")
        );
        for w in &writers {
            w.wait_for_progress(20, Duration::from_secs(60))
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "round {round}: writes did not resume: {e:#}\n{}",
                        proxy.log_tail()
                    )
                });
        }
        cluster
            .wait_healthy(Duration::from_secs(120))
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e:#}\n{}", cluster.log_tails(30)));
    }
    let leader = cluster.leader_node().await.unwrap();
    slow.0.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, errors) = slow.1.await.unwrap();
    assert!(
        errors.is_empty(),
        "long transactions failed across the switchovers: {errors:?}\n{}",
        proxy.log_tail()
    );
    let present: i64 = leader
        .scalar(&format!(
            "SELECT count(*) FROM px_slow WHERE id = ANY('{{{}}}')",
            acked
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ))
        .await
        .unwrap()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        present,
        acked.len() as i64,
        "acknowledged long transactions lost"
    );
    eprintln!(
        "px_slow: {} long transactions acknowledged, no errors",
        acked.len()
    );
    for w in writers {
        let report = w.stop().await;
        assert!(
            report.unknown.is_empty() && report.connect_failures == 0 && report.sessions == 1,
            "{}: a client saw errors across the switchovers: {} unknown, {} failed connects, {} sessions, last error {:?}\n{}",
            report.table,
            report.unknown.len(),
            report.connect_failures,
            report.sessions,
            report.last_error,
            proxy.log_tail()
        );
        let missing = report.missing_on(leader).await.unwrap();
        assert!(missing.is_empty(), "{}: lost {missing:?}", report.table);
        eprintln!(
            "{}: {} acknowledged, no errors",
            report.table,
            report.acknowledged.len()
        );
    }
    checker.stop().await.assert_ok();
}
