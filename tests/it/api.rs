//! The REST API of real agents: health-check codes on a leader, a replica,
//! a stopped PostgreSQL and a paused cluster; status, cluster, history,
//! config and metrics documents; actions with and without credentials,
//! malformed and oversized requests; HTTPS with client certificates; a
//! flood of slow clients.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

use crate::support::cluster::STARTUP_TIMEOUT;
use crate::support::{Cluster, ClusterOptions, Node, wait_until};

const TOKEN: &str = "api-test-token-0123456789";
const ADMIN_PASSWORD: &str = "admin-password-1";
const POLL: Duration = Duration::from_millis(100);

/// Creates a cluster, appends `api_lines` to every node's `[api]` table
/// (the last table of the fixture's files), starts it and waits until it
/// is healthy.
async fn start_with_api(test: &str, n: usize, api_lines: &str) -> Cluster {
    let mut cluster = Cluster::create(test, n, ClusterOptions::default())
        .await
        .expect("create the cluster");
    for node in &mut cluster.nodes {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(node.config_path())
            .unwrap();
        writeln!(f, "{api_lines}").unwrap();
        node.start().expect("start the agent");
    }
    if let Err(e) = cluster.wait_healthy(STARTUP_TIMEOUT).await {
        panic!("{e:#}\n{}", cluster.log_tails(30));
    }
    cluster
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

fn basic(user: &str, password: &str) -> String {
    let creds = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {creds}")
}

struct Reply {
    code: u16,
    headers: HeaderMap,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text))
    }
}

async fn call(
    client: &reqwest::Client,
    base: &str,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<(&str, Vec<u8>)>,
) -> anyhow::Result<Reply> {
    let mut req = client
        .request(method.parse()?, format!("{base}{path}"))
        .timeout(Duration::from_secs(60));
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    if let Some((ct, bytes)) = body {
        req = req.header("Content-Type", ct).body(bytes);
    }
    let resp = req.send().await?;
    Ok(Reply {
        code: resp.status().as_u16(),
        headers: resp.headers().clone(),
        text: resp.text().await?,
    })
}

async fn req(
    node: &Node,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<(&str, Vec<u8>)>,
) -> Reply {
    call(
        &reqwest::Client::new(),
        &node.api_url(),
        method,
        path,
        auth,
        body,
    )
    .await
    .unwrap_or_else(|e| panic!("{}: {method} {path}: {e:#}", node.name()))
}

async fn post_json(node: &Node, path: &str, auth: Option<&str>, body: Value) -> Reply {
    req(
        node,
        "POST",
        path,
        auth,
        Some(("application/json", body.to_string().into_bytes())),
    )
    .await
}

/// `/` first: it is Patroni's primary check, so it must answer as `/primary`.
const CHECKS: [&str; 12] = [
    "/",
    "/primary",
    "/leader",
    "/master",
    "/read-write",
    "/replica",
    "/read-only",
    "/sync",
    "/async",
    "/health",
    "/liveness",
    "/readiness",
];
const LEADER: [u16; 12] = [200, 200, 200, 200, 200, 503, 200, 503, 503, 200, 200, 200];
const REPLICA: [u16; 12] = [503, 503, 503, 503, 503, 200, 200, 503, 200, 200, 200, 200];
/// A replica whose upstream is gone: still serves reads, not streaming.
const ORPHAN: [u16; 12] = [503, 503, 503, 503, 503, 200, 200, 503, 200, 200, 200, 503];
const STOPPED: [u16; 12] = [503, 503, 503, 503, 503, 503, 503, 503, 503, 503, 200, 503];

/// Every health path with GET, HEAD and OPTIONS answers `expected`;
/// HEAD without a body.
async fn assert_health(node: &Node, expected: [u16; 12], what: &str) {
    let mut wrong = Vec::new();
    for (path, want) in CHECKS.iter().zip(expected) {
        for method in ["GET", "HEAD", "OPTIONS"] {
            let r = req(node, method, path, None, None).await;
            if r.code != want {
                wrong.push(format!(
                    "{method} {path}: {} (expected {want}) {}",
                    r.code, r.text
                ));
            }
            if method == "HEAD" && !r.text.is_empty() {
                wrong.push(format!("HEAD {path} has a body"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} ({what}):\n{}\n{}",
        node.name(),
        wrong.join("\n"),
        node.log_tail(20)
    );
}

async fn code(node: &Node, path: &str) -> u16 {
    req(node, "GET", path, None, None).await.code
}

async fn wait_code(node: &Node, path: &str, want: u16) {
    wait_until(Duration::from_secs(30), POLL, || async {
        (code(node, path).await == want).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{}: GET {path} never answered {want}: {e:#}", node.name()));
}

fn metric(text: &str, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("metrics parse");
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => f64::NAN,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_on_leader_replica_stopped_postgres_and_paused_cluster() {
    let cluster = start_with_api("api-health", 3, &format!("token = \"{TOKEN}\"")).await;
    let leader = cluster.leader_node().await.unwrap();
    let replica_name = cluster.replica_names().await.unwrap()[0].clone();
    let replica = cluster.node(&replica_name);
    let other = cluster
        .nodes
        .iter()
        .find(|n| n.name() != leader.name() && n.name() != replica_name)
        .unwrap();

    assert_health(leader, LEADER, "leader").await;
    assert_health(replica, REPLICA, "replica").await;
    // Filters.
    assert_eq!(code(replica, "/replica?lag=10MB").await, 200);
    assert_eq!(code(replica, "/replica?lag=16777216").await, 200);
    assert_eq!(
        code(replica, "/read-only?lag=1GB&tag_nofailover=false").await,
        200
    );
    assert_eq!(code(replica, "/replica?tag_nofailover=true").await, 503);
    assert_eq!(code(replica, "/replica?tag_datacenter=east").await, 503);
    assert_eq!(code(replica, "/replica?lag=plenty").await, 400);
    assert_eq!(code(leader, "/primary?tag_nosync=false").await, 200);

    // Status documents.
    let status = req(replica, "GET", "/status", None, None).await.json();
    assert_eq!(status["name"], replica_name.as_str());
    assert_eq!(status["role"], "replica");
    assert_eq!(status["state"], "streaming");
    assert_eq!(status["leader"], false);
    // `/` is the primary check, with the status document as its body.
    assert_eq!(
        req(leader, "GET", "/", None, None).await.json()["leader"],
        true
    );
    let root = req(replica, "GET", "/", None, None).await;
    assert_eq!(
        (root.code, root.json()["role"].clone()),
        (503, json!("replica"))
    );
    let view = req(other, "GET", "/cluster", None, None).await.json();
    assert_eq!(view["leader"], leader.name());
    assert_eq!(view["paused"], false);
    assert_eq!(view["pending_failover"], Value::Null);
    let members = view["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    assert_eq!(members[0]["name"], leader.name());
    assert_eq!(members[0]["role"], "leader");
    for m in &members[1..] {
        assert_eq!(m["role"], "replica", "{view}");
        assert_eq!(m["state"], "streaming", "{view}");
        assert!(m["lag_bytes"].is_u64(), "{view}");
        assert_eq!(m["timeline"], members[0]["timeline"], "{view}");
    }
    assert!(
        req(leader, "GET", "/history", None, None)
            .await
            .json()
            .is_array()
    );
    let config = req(replica, "GET", "/config", None, None).await;
    assert_eq!(config.code, 200);
    assert_eq!(config.json()["paused"], false);
    assert!(!config.text.contains(TOKEN) && !config.text.contains(cluster.superuser_password()));

    // Metrics.
    let m = req(leader, "GET", "/metrics", None, None).await;
    assert!(
        m.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    for (name, label, want) in [
        ("pgha_role", Some(("role", "leader")), 1.0),
        ("pgha_leader_lease_held", None, 1.0),
        ("pgha_postgres_up", None, 1.0),
        ("pgha_paused", None, 0.0),
        ("pgha_members", None, 3.0),
        (
            "pgha_member_lag_bytes",
            Some(("member", leader.name())),
            0.0,
        ),
        ("pgha_member_leader", Some(("member", leader.name())), 1.0),
    ] {
        assert_eq!(
            metric(&m.text, name, label),
            Some(want),
            "{name}\n{}",
            m.text
        );
    }
    assert!(
        metric(&m.text, "pgha_loop_duration_seconds", None).unwrap() > 0.0,
        "{}",
        m.text
    );
    assert!(
        metric(&m.text, "pgha_lease_renewal_seconds", None).unwrap() > 0.0,
        "{}",
        m.text
    );
    assert!(
        metric(
            &m.text,
            "pgha_member_wal_position_bytes",
            Some(("member", &replica_name))
        )
        .is_some()
    );
    assert!(metric(&m.text, "pgha_postgres_timeline", None).unwrap() >= 1.0);
    assert!(metric(&m.text, "pgha_leader_changes_total", None).is_some());
    let m = req(replica, "GET", "/metrics", None, None).await;
    assert_eq!(
        metric(&m.text, "pgha_role", Some(("role", "replica"))),
        Some(1.0)
    );
    assert_eq!(metric(&m.text, "pgha_leader_lease_held", None), Some(0.0));
    assert!(
        metric(&m.text, "pgha_replication_lag_bytes", None).is_some(),
        "{}",
        m.text
    );

    // Paused: health is unchanged.
    let r = post_json(replica, "/pause", Some(&bearer()), json!({})).await;
    assert_eq!(r.code, 200, "{}", r.text);
    for n in &cluster.nodes {
        wait_until(Duration::from_secs(10), POLL, || async {
            (req(n, "GET", "/status", None, None).await.json()["paused"] == true).then_some(())
        })
        .await
        .unwrap();
    }
    assert_health(leader, LEADER, "leader, paused").await;
    assert_health(replica, REPLICA, "replica, paused").await;
    assert_eq!(
        req(other, "GET", "/cluster", None, None).await.json()["paused"],
        true
    );
    let m = req(other, "GET", "/metrics", None, None).await;
    assert_eq!(metric(&m.text, "pgha_paused", None), Some(1.0));

    // Stopped PostgreSQL (paused, so the agents leave it down).
    replica.kill_postgres().expect("replica postmaster");
    wait_code(replica, "/health", 503).await;
    assert_health(replica, STOPPED, "replica, PostgreSQL stopped").await;
    leader.kill_postgres().expect("leader postmaster");
    wait_code(leader, "/health", 503).await;
    assert_health(leader, STOPPED, "leader, PostgreSQL stopped").await;
    let m = req(leader, "GET", "/metrics", None, None).await;
    assert_eq!(metric(&m.text, "pgha_postgres_up", None), Some(0.0));
    wait_code(other, "/readiness", 503).await;
    assert_health(
        other,
        ORPHAN,
        "the other replica, its leader's PostgreSQL stopped",
    )
    .await;

    // Resume: everything comes back.
    let r = post_json(other, "/resume", Some(&bearer()), json!({})).await;
    assert_eq!(r.code, 200, "{}", r.text);
    if let Err(e) = cluster.wait_healthy(Duration::from_secs(60)).await {
        panic!("{e:#}\n{}", cluster.log_tails(30));
    }
    let leader = cluster.leader_node().await.unwrap();
    wait_code(leader, "/primary", 200).await;
    assert_health(leader, LEADER, "leader after resume").await;
}

/// What must not change when a request is refused.
#[derive(Debug, PartialEq)]
struct Observed {
    leader: Option<String>,
    paused: Value,
    pending_failover: Value,
    postmasters: Vec<Option<i32>>,
}

async fn observe(cluster: &Cluster) -> Observed {
    // Two loops, so that the agents' views include anything just written.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let view = req(&cluster.nodes[0], "GET", "/cluster", None, None)
        .await
        .json();
    Observed {
        leader: cluster.leader().await.unwrap(),
        paused: cluster.list_json().await.unwrap()["paused"].clone(),
        pending_failover: view["pending_failover"].clone(),
        postmasters: cluster.nodes.iter().map(Node::postmaster_pid).collect(),
    }
}

/// Every action, with a body that would be valid.
fn actions(leader: &str, replica: &str) -> Vec<(&'static str, &'static str, Value)> {
    vec![
        (
            "POST",
            "/switchover",
            json!({"leader": leader, "candidate": replica}),
        ),
        ("POST", "/failover", json!({"candidate": replica})),
        ("POST", "/restart", json!({})),
        ("POST", "/reinitialize", json!({})),
        ("POST", "/reload", json!({})),
        ("POST", "/pause", json!({})),
        ("POST", "/resume", json!({})),
        ("PATCH", "/config", json!({"paused": true})),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_need_credentials_reject_bad_input_and_work() {
    let api = format!("username = \"admin\"\npassword = \"{ADMIN_PASSWORD}\"\ntoken = \"{TOKEN}\"");
    let cluster = start_with_api("api-actions", 2, &api).await;
    let leader_name = cluster.leader().await.unwrap().unwrap();
    let replica_name = cluster.replica_names().await.unwrap()[0].clone();
    let (leader, replica) = (cluster.node(&leader_name), cluster.node(&replica_name));
    let before = observe(&cluster).await;
    assert_eq!(before.paused, false);

    // Missing or wrong credentials: 401 with a challenge, nothing changes.
    let wrong = [
        None,
        Some("Bearer not-the-token".to_string()),
        Some(basic("admin", "wrong-password")),
        Some(basic("root", ADMIN_PASSWORD)),
        Some(format!("Basic {TOKEN}")),
    ];
    for (method, path, body) in actions(&leader_name, &replica_name) {
        for node in [leader, replica] {
            for auth in &wrong {
                let r = req(
                    node,
                    method,
                    path,
                    auth.as_deref(),
                    Some(("application/json", body.to_string().into_bytes())),
                )
                .await;
                assert_eq!(r.code, 401, "{method} {path} {auth:?}: {}", r.text);
                let challenges: Vec<_> = r.headers.get_all("www-authenticate").iter().collect();
                assert_eq!(challenges.len(), 2, "{method} {path}: {challenges:?}");
                assert!(r.json()["error"].is_string());
            }
        }
    }
    assert_eq!(
        observe(&cluster).await,
        before,
        "refused requests changed the cluster"
    );

    // Malformed and oversized requests: 4xx with a JSON error, nothing changes.
    let oversized = format!(r#"{{"candidate": "{}"}}"#, "x".repeat(70 * 1024)).into_bytes();
    let bad: Vec<(&str, Vec<u8>, u16)> = vec![
        ("application/json", b"{\"candidate\": ".to_vec(), 400),
        ("application/json", b"[]".to_vec(), 400),
        ("application/json", b"{\"surprise\": 1}".to_vec(), 400),
        ("application/json", vec![0xc3, 0x28], 400),
        ("text/plain", b"{}".to_vec(), 415),
        ("application/json", oversized, 413),
    ];
    for (method, path, _) in actions(&leader_name, &replica_name) {
        for (ct, body, want) in &bad {
            let auth = if path == "/pause" {
                basic("admin", ADMIN_PASSWORD)
            } else {
                bearer()
            };
            let r = req(replica, method, path, Some(&auth), Some((ct, body.clone()))).await;
            assert_eq!(r.code, *want, "{method} {path} {ct}: {}", r.text);
            assert!(r.json()["error"].is_string(), "{}", r.text);
        }
    }
    for (path, body) in [
        ("/switchover", json!({"candidate": 5})),
        ("/switchover", json!({"scheduled_at": "next tuesday"})),
        ("/failover", json!({})),
        (
            "/failover",
            json!({"candidate": replica_name, "accept_data_loss": "yes"}),
        ),
    ] {
        let r = post_json(replica, path, Some(&bearer()), body.clone()).await;
        assert_eq!(r.code, 400, "{path} {body}: {}", r.text);
    }
    for patch in [
        json!({"ttl": "5s"}),
        json!({"paused": "perhaps"}),
        json!({"synchronous_node_count": 0}),
    ] {
        let r = req(
            replica,
            "PATCH",
            "/config",
            Some(&bearer()),
            Some(("application/json", patch.to_string().into_bytes())),
        )
        .await;
        assert_eq!(r.code, 400, "{patch}: {}", r.text);
    }
    // Validated like the CLI.
    let r = post_json(
        replica,
        "/switchover",
        Some(&bearer()),
        json!({"candidate": "ghost"}),
    )
    .await;
    assert_eq!(r.code, 404, "{}", r.text);
    let r = post_json(
        replica,
        "/switchover",
        Some(&bearer()),
        json!({"candidate": leader_name}),
    )
    .await;
    assert_eq!(r.code, 412, "{}", r.text);
    let r = post_json(
        replica,
        "/switchover",
        Some(&bearer()),
        json!({"leader": replica_name, "candidate": replica_name}),
    )
    .await;
    assert_eq!(r.code, 412, "{}", r.text);
    let r = post_json(
        replica,
        "/failover",
        Some(&bearer()),
        json!({"candidate": replica_name}),
    )
    .await;
    assert_eq!(r.code, 412, "{}", r.text);
    assert!(r.json()["error"].as_str().unwrap().contains("/switchover"));
    let r = post_json(leader, "/reinitialize", Some(&bearer()), json!({})).await;
    assert_eq!(r.code, 409, "{}", r.text);
    assert_eq!(
        observe(&cluster).await,
        before,
        "refused requests changed the cluster"
    );

    // Valid requests.
    let patch = json!({"paused": true}).to_string().into_bytes();
    let r = req(
        replica,
        "PATCH",
        "/config",
        Some(&bearer()),
        Some(("application/merge-patch+json", patch)),
    )
    .await;
    assert_eq!(
        (r.code, r.json()["paused"].clone()),
        (200, json!(true)),
        "{}",
        r.text
    );
    assert_eq!(cluster.list_json().await.unwrap()["paused"], true);
    let r = post_json(
        leader,
        "/resume",
        Some(&basic("admin", ADMIN_PASSWORD)),
        json!({}),
    )
    .await;
    assert_eq!(r.code, 200, "{}", r.text);
    assert_eq!(cluster.list_json().await.unwrap()["paused"], false);

    let r = post_json(replica, "/reload", Some(&bearer()), json!({})).await;
    assert_eq!(r.code, 200, "{}", r.text);
    let old_pid = replica.postmaster_pid().unwrap();
    let r = req(replica, "POST", "/restart", Some(&bearer()), None).await;
    assert_eq!(r.code, 200, "{}", r.text);
    assert_ne!(replica.postmaster_pid(), Some(old_pid), "restarted");
    wait_code(replica, "/replica", 200).await;

    let r = post_json(
        leader,
        "/switchover",
        Some(&bearer()),
        json!({"leader": leader_name, "candidate": replica_name}),
    )
    .await;
    assert_eq!(r.code, 200, "{}\n{}", r.text, cluster.log_tails(20));
    assert_eq!(r.json()["leader"], replica_name.as_str());
    if let Err(e) = cluster.wait_healthy(Duration::from_secs(60)).await {
        panic!("{e:#}\n{}", cluster.log_tails(30));
    }
    assert_eq!(
        cluster.leader().await.unwrap().as_deref(),
        Some(replica_name.as_str())
    );
    wait_code(leader, "/replica", 200).await;

    // The former leader is now a replica: reinitialize it.
    let system_id = replica.system_identifier().await.unwrap();
    let r = post_json(leader, "/reinitialize", Some(&bearer()), json!({})).await;
    assert_eq!(r.code, 202, "{}", r.text);
    if let Err(e) = cluster.wait_healthy(Duration::from_secs(90)).await {
        panic!("{e:#}\n{}", cluster.log_tails(30));
    }
    wait_code(leader, "/replica", 200).await;
    assert_eq!(leader.system_identifier().await.unwrap(), system_id);

    // Secrets never reach the logs.
    for n in &cluster.nodes {
        let log = n.log_text();
        assert!(
            !log.contains(TOKEN) && !log.contains(ADMIN_PASSWORD),
            "{} logged a secret",
            n.name()
        );
    }
}

/// Runs `openssl` in `dir`; `args` are separated by whitespace.
fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .output()
        .expect("run openssl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openssl {args}: {err}");
}

/// A CA (`ca.pem`), and `name.pem` / `name.key` signed by it for each
/// `(name, extended key usage, subject alternative name)`.
fn make_ca(dir: &Path, leaves: &[(&str, &str, &str)]) {
    std::fs::create_dir_all(dir).unwrap();
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    openssl(
        dir,
        &format!(
            "req -x509 {ec} -keyout ca.key -out ca.pem -days 2 -subj /CN=pgha-test-ca \
             -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
        ),
    );
    for (name, usage, san) in leaves {
        openssl(
            dir,
            &format!("req {ec} -keyout {name}.key -out {name}.csr -subj /CN={name}"),
        );
        let ext =
            format!("subjectAltName={san}\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n");
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            dir,
            &format!(
                "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
                 -out {name}.pem -days 2 -extfile {name}.ext"
            ),
        );
    }
}

/// An HTTPS client trusting `dir/ca.pem` only, presenting
/// `<identity>.pem` + `<identity>.key` when given.
fn tls_client(dir: &Path, identity: Option<&Path>) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(dir.join("ca.pem")).unwrap()).unwrap();
    let mut b = reqwest::Client::builder()
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(10));
    if let Some(prefix) = identity {
        let mut pem = std::fs::read(prefix.with_extension("pem")).unwrap();
        pem.extend(std::fs::read(prefix.with_extension("key")).unwrap());
        b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    b.build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_client_certificates_and_private_reads() {
    let certs = crate::support::TestDir::new("api-tls-certs");
    let tls_dir = certs.path().join("tls");
    make_ca(
        &tls_dir,
        &[
            ("server", "serverAuth", "IP:127.0.0.1"),
            ("client", "clientAuth", "DNS:operator"),
        ],
    );
    make_ca(&tls_dir.join("other"), &[("client", "clientAuth", "DNS:x")]);
    let api = format!(
        "token = \"{TOKEN}\"\npublic_read = false\n[api.tls]\ncertificate = \"{d}/server.pem\"\nkey = \"{d}/server.key\"\nclient_ca = \"{d}/ca.pem\"",
        d = tls_dir.display()
    );
    let cluster = start_with_api("api-tls", 1, &api).await;
    let node = &cluster.nodes[0];
    let base = format!("https://127.0.0.1:{}", node.api_port());
    let ok = tls_client(&tls_dir, Some(&tls_dir.join("client")));

    // Plain HTTP, no client certificate, or one from another CA: no answer.
    let plain = format!("http://127.0.0.1:{}/status", node.api_port());
    assert!(reqwest::Client::new().get(plain).send().await.is_err());
    let anonymous = tls_client(&tls_dir, None);
    assert!(
        call(&anonymous, &base, "GET", "/status", Some(&bearer()), None)
            .await
            .is_err()
    );
    let intruder = tls_client(&tls_dir, Some(&tls_dir.join("other").join("client")));
    assert!(
        call(&intruder, &base, "GET", "/status", Some(&bearer()), None)
            .await
            .is_err()
    );

    // Reads need the token too (public_read = false).
    for path in ["/status", "/primary", "/cluster", "/metrics"] {
        let r = call(&ok, &base, "GET", path, None, None).await.unwrap();
        assert_eq!(r.code, 401, "{path}");
        assert_eq!(r.headers["www-authenticate"], "Bearer realm=\"pgha\"");
        let r = call(&ok, &base, "GET", path, Some(&bearer()), None)
            .await
            .unwrap();
        assert_eq!(r.code, 200, "{path}: {}", r.text);
    }
    let r = call(&ok, &base, "HEAD", "/primary", Some(&bearer()), None)
        .await
        .unwrap();
    assert_eq!((r.code, r.text.as_str()), (200, ""));
    let r = call(&ok, &base, "GET", "/status", Some(&bearer()), None)
        .await
        .unwrap();
    assert_eq!(r.json()["name"], node.name());
    let r = call(&ok, &base, "GET", "/metrics", Some(&bearer()), None)
        .await
        .unwrap();
    assert_eq!(metric(&r.text, "pgha_leader_lease_held", None), Some(1.0));

    // Actions over HTTPS.
    let r = call(&ok, &base, "POST", "/pause", Some(&bearer()), None)
        .await
        .unwrap();
    assert_eq!(r.code, 200, "{}", r.text);
    assert_eq!(cluster.list_json().await.unwrap()["paused"], true);
    let r = call(&ok, &base, "POST", "/resume", Some("Bearer wrong"), None)
        .await
        .unwrap();
    assert_eq!(r.code, 401);
    assert_eq!(cluster.list_json().await.unwrap()["paused"], true);

    // The client options documented in docs/api.md, with curl.
    let out = Command::new("curl")
        .args(["-sS", "--fail", "-X", "POST"])
        .arg("--cacert")
        .arg(tls_dir.join("ca.pem"))
        .arg("--cert")
        .arg(tls_dir.join("client.pem"))
        .arg("--key")
        .arg(tls_dir.join("client.key"))
        .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
        .arg(format!("{base}/resume"))
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["paused"], false);
    assert_eq!(cluster.list_json().await.unwrap()["paused"], false);
}

/// How many connections the slow-client test lets the agent hold, and
/// how many slow clients it sends.
const SLOW_LIMIT: usize = 64;
const SLOW_CLIENTS: usize = 400;
const SLOW_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A slowloris client: sends a request line, then one header line a
/// second, never finishing the head. When the server closes the
/// connection it waits half a second and starts again, so the flood
/// keeps pressing for as long as it runs.
async fn slow_client(
    addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while !stop.load(Ordering::Relaxed) {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await
            && s.write_all(b"GET /primary HTTP/1.1\r\nHost: pgha\r\n")
                .await
                .is_ok()
        {
            let mut buf = [0u8; 256];
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                    Err(_) => {}
                    // Closed, or an answer: either way this connection is done.
                    Ok(_) => break,
                }
                if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One load-balancer health check: a fresh connection (HAProxy opens
/// one per check), retried for up to `within`. Returns the status code
/// and how long it took to get one.
async fn probe(url: &str, within: Duration) -> (Option<u16>, Duration) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let start = std::time::Instant::now();
    while start.elapsed() < within {
        if let Ok(r) = client.get(url).send().await {
            return (Some(r.status().as_u16()), start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (None, start.elapsed())
}

/// Hundreds of clients that trickle header bytes and never finish their
/// request must not make the agent hold a descriptor each: the count
/// stays near `max_connections`, the leader's health check keeps
/// answering 200 while the flood goes on, and the leader keeps its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_cannot_exhaust_the_agents_descriptors() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let api_lines = format!(
        "max_connections = {SLOW_LIMIT}\nheader_read_timeout = \"{}s\"",
        SLOW_HEADER_TIMEOUT.as_secs()
    );
    let cluster = start_with_api("api-slow", 2, &api_lines).await;
    let leader = cluster.leader_node().await.unwrap();
    let leader_name = leader.name().to_string();
    let pid = leader.agent_pid().expect("the leader's agent runs");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", leader.api_port()).parse().unwrap();
    let baseline = open_descriptors(pid);
    assert!(baseline > 0, "cannot read /proc/{pid}/fd");
    let changes = |text: &str| metric(text, "pgha_leader_changes_total", None);
    let changes_before = changes(&req(leader, "GET", "/metrics", None, None).await.text);

    let stop = Arc::new(AtomicBool::new(false));
    let flood: Vec<_> = (0..SLOW_CLIENTS)
        .map(|_| tokio::spawn(slow_client(addr, stop.clone())))
        .collect();
    let primary = format!("{}/primary", leader.api_url());
    let mut most = baseline;
    let mut probes = Vec::new();
    let flood_for = Duration::from_secs(20);
    let start = std::time::Instant::now();
    while start.elapsed() < flood_for {
        most = most.max(open_descriptors(pid));
        if probes.len() < (start.elapsed().as_secs() as usize) {
            // Every second, a health check, as HAProxy would send.
            probes.push(probe(&primary, Duration::from_secs(5)).await);
            most = most.max(open_descriptors(pid));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = open_descriptors(pid);
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.abort();
    }
    eprintln!(
        "descriptors: baseline {baseline}, at most {most} during the flood of {SLOW_CLIENTS} slow clients (limit {SLOW_LIMIT}); probes (code, latency): {probes:?}"
    );
    // The limit, plus the agent's own short-lived connections (peers,
    // etcd reconnects) and an evicted connection not yet closed.
    assert!(
        most <= baseline + SLOW_LIMIT + 16,
        "the agent held {most} descriptors (baseline {baseline}, limit {SLOW_LIMIT}); last {during}"
    );
    let failed: Vec<_> = probes.iter().filter(|(c, _)| *c != Some(200)).collect();
    assert!(
        failed.is_empty() && probes.len() >= 15,
        "GET /primary on the leader during the flood: {probes:?}\n{}",
        leader.log_tail(30)
    );
    // Once the flood stops, its connections time out and are closed.
    wait_until(SLOW_HEADER_TIMEOUT * 3, POLL, || async {
        (open_descriptors(pid) <= baseline + 8).then_some(())
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{} descriptors {:?} after the flood stopped (baseline {baseline})",
            open_descriptors(pid),
            SLOW_HEADER_TIMEOUT * 3
        )
    });
    assert_eq!(
        cluster.leader().await.unwrap().as_deref(),
        Some(leader_name.as_str()),
        "the leader changed during the flood\n{}",
        cluster.log_tails(30)
    );
    assert_eq!(
        changes(&req(leader, "GET", "/metrics", None, None).await.text),
        changes_before,
        "the leader saw its key change during the flood"
    );
}

/// Members whose APIs use certificates from a private CA and require
/// client certificates still read each other's status during a leader
/// race (`api.tls.ca`, `api.tls.client_certificate`): without that, a
/// replica hears from nobody and, without synchronous replication, may not
/// race at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_behind_a_private_ca_fail_over() {
    let certs = crate::support::TestDir::new("api-peer-ca");
    let tls_dir = certs.path().join("tls");
    make_ca(
        &tls_dir,
        &[
            ("server", "serverAuth", "IP:127.0.0.1"),
            ("member", "clientAuth", "DNS:member"),
        ],
    );
    let api = format!(
        "token = \"{TOKEN}\"\npublic_read = false\n[api.tls]\ncertificate = \"{d}/server.pem\"\nkey = \"{d}/server.key\"\nclient_ca = \"{d}/ca.pem\"\nca = \"{d}/ca.pem\"\nclient_certificate = \"{d}/member.pem\"\nclient_key = \"{d}/member.key\"",
        d = tls_dir.display()
    );
    let mut cluster = start_with_api("api-peer-ca", 3, &api).await;
    let old = cluster.leader().await.unwrap().expect("a leader");
    // `pgha list` reads every member's status through the same client.
    let list = cluster.list_json().await.unwrap();
    assert_eq!(
        list["members"].as_array().map(Vec::len),
        Some(3),
        "{list:#}"
    );

    let victim = cluster.node_mut(&old);
    victim.kill_agent().await.unwrap();
    victim.kill_postgres().expect("the leader's postmaster");
    let new = cluster
        .wait_for_leader_other_than(&old, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("no failover: {e:#}\n{}", cluster.log_tails(30)));
    assert!(cluster.node(&new).is_writable().await.unwrap_or(false));
    for n in cluster.nodes.iter().filter(|n| n.name() != old) {
        let log = n.log_text();
        assert!(
            !log.contains("heard from 1 of the 2"),
            "{} could not read its peer's status:\n{}",
            n.name(),
            n.log_tail(30)
        );
    }
}
