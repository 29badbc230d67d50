//! The whole router over a real socket, with the in-memory DCS and a fake
//! agent loop: authentication, body limits, malformed input, methods, and
//! that refused requests change nothing.

use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::*;
use crate::dcs::Dcs;
use crate::dcs::memory::MemoryStore;
use crate::model::MemberRecord;
use crate::secret::SecretString;

const TOKEN: &str = "0123456789abcdef-token";

fn config(basic: bool, token: bool, public_read: bool) -> Config {
    let toml = r#"
cluster = "c"
name = "n2"
[etcd]
endpoints = ["http://127.0.0.1:2379"]
[postgres]
data_dir = "/tmp/pgha-api-unit/data"
superuser = { username = "postgres", password = "superuser-pw" }
replication = { username = "replicator", password = "replication-pw" }
"#;
    let mut c = Config::from_toml(std::path::Path::new("/tmp/n2.toml"), toml).expect("config");
    c.api.basic_auth = basic.then(|| ("admin".into(), SecretString::new("admin-password")));
    c.api.token = token.then(|| SecretString::new(TOKEN));
    c.api.public_read = public_read;
    c
}

fn record(name: &str, role: &str, state: &str) -> MemberRecord {
    serde_json::from_value(json!({
        "name": name, "api_url": "http://x", "host": "h", "port": 1,
        "role": role, "state": state, "timeline": 1, "received_lsn": "0/3000000",
    }))
    .unwrap()
}

struct Fixture {
    url: String,
    store: MemoryStore,
    commands: Arc<AtomicUsize>,
    status: watch::Sender<AgentStatus>,
    http: reqwest::Client,
}

impl Fixture {
    /// n1 leads, n2 (this agent) and n3 stream.
    async fn start(cfg: Config) -> Fixture {
        let store = MemoryStore::new();
        let n1 = store.handle("n1");
        n1.put_member(&record("n1", "primary", "running"))
            .await
            .unwrap();
        assert!(n1.acquire_leader().await.unwrap().is_some());
        store
            .handle("n2")
            .put_member(&record("n2", "replica", "streaming"))
            .await
            .unwrap();
        store
            .handle("n3")
            .put_member(&record("n3", "replica", "streaming"))
            .await
            .unwrap();
        let (status, rx) = watch::channel(AgentStatus {
            member: Some(record("n2", "replica", "streaming")),
            dcs_reachable: true,
            view: Some(store.view()),
            last_loop_ms: crate::util::boottime_ms(),
            loop_count: 1,
            ..Default::default()
        });
        // A fake agent loop: answers every command and starts a new loop.
        let (tx, mut cmd_rx) = mpsc::channel(8);
        let commands = Arc::new(AtomicUsize::new(0));
        let (count, st) = (commands.clone(), status.clone());
        tokio::spawn(async move {
            while let Some(c) = cmd_rx.recv().await {
                count.fetch_add(1, Ordering::SeqCst);
                let reply = match c {
                    AgentCommand::Restart { reply }
                    | AgentCommand::Reinitialize { reply }
                    | AgentCommand::Reload { reply } => reply,
                };
                // Like the agent: answer at the start of a loop, publish
                // at its end.
                let _ = reply.send(Ok(()));
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                st.send_modify(|s| s.loop_count += 1);
            }
        });
        let app = AppState {
            status: rx,
            dcs: Arc::new(store.handle("n2")),
            commands: tx,
            config: Arc::new(cfg),
            failsafe: crate::agent::failsafe::Failsafe::default(),
            proxy: None,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let limits = app.config.api.limits;
        tokio::spawn(server::run(listener, None, router(app), limits));
        Fixture {
            url,
            store,
            commands,
            status,
            http: reqwest::Client::new(),
        }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        ct: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, reqwest::header::HeaderMap, String) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.url))
            .body(body);
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        if let Some(ct) = ct {
            req = req.header("Content-Type", ct);
        }
        let resp = req.send().await.unwrap();
        let code = resp.status().as_u16();
        let headers = resp.headers().clone();
        (code, headers, resp.text().await.unwrap())
    }

    async fn post(&self, path: &str, auth: Option<&str>, body: &str) -> (u16, Value) {
        let (code, _, text) = self
            .send(
                "POST",
                path,
                auth,
                Some("application/json"),
                body.as_bytes().to_vec(),
            )
            .await;
        let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text:?}"));
        (code, json)
    }
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

const ACTIONS: &[(&str, &str)] = &[
    ("POST", "/switchover"),
    ("POST", "/failover"),
    ("POST", "/restart"),
    ("POST", "/reinitialize"),
    ("POST", "/reload"),
    ("POST", "/pause"),
    ("POST", "/resume"),
    ("PATCH", "/config"),
];

#[tokio::test]
async fn actions_need_the_right_credentials_and_change_nothing_otherwise() {
    let f = Fixture::start(config(true, true, true)).await;
    let before = f.store.view();
    let wrong = [
        None,
        Some("Bearer nope".to_string()),
        Some(basic("admin", "wrong-password")),
        Some(basic("root", "admin-password")),
        Some(format!("Basic {TOKEN}")),
    ];
    for (method, path) in ACTIONS {
        for auth in &wrong {
            let (code, headers, text) = f
                .send(
                    method,
                    path,
                    auth.as_deref(),
                    Some("application/json"),
                    br#"{"candidate":"n3"}"#.to_vec(),
                )
                .await;
            assert_eq!(code, 401, "{method} {path} with {auth:?}: {text}");
            let challenges: Vec<&str> = headers
                .get_all("www-authenticate")
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect();
            assert!(
                challenges.iter().any(|c| c.starts_with("Basic ")),
                "{challenges:?}"
            );
            assert!(
                challenges.iter().any(|c| c.starts_with("Bearer ")),
                "{challenges:?}"
            );
            assert!(serde_json::from_str::<Value>(&text).unwrap()["error"].is_string());
            assert!(!text.contains(TOKEN) && !text.contains("admin-password"));
        }
    }
    assert_eq!(f.store.view(), before);
    assert_eq!(f.commands.load(Ordering::SeqCst), 0);
    // Reads stay public.
    let (code, _, _) = f.send("GET", "/cluster", None, None, vec![]).await;
    assert_eq!(code, 200);
    // Both schemes work.
    let (code, body) = f.post("/pause", Some(&bearer()), "").await;
    assert_eq!(
        (code, body["paused"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    assert!(f.store.view().config.paused);
    let (code, body) = f
        .post("/resume", Some(&basic("admin", "admin-password")), "{}")
        .await;
    assert_eq!(code, 200, "{body}");
    assert!(!f.store.view().config.paused);
}

#[tokio::test]
async fn without_configured_credentials_actions_are_forbidden() {
    let f = Fixture::start(config(false, false, true)).await;
    for (method, path) in ACTIONS {
        let (code, _, text) = f
            .send(
                method,
                path,
                Some(&bearer()),
                Some("application/json"),
                b"{}".to_vec(),
            )
            .await;
        assert_eq!(code, 403, "{method} {path}");
        let msg = serde_json::from_str::<Value>(&text).unwrap()["error"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            msg.contains("api.username") && msg.contains("api.token"),
            "{msg}"
        );
    }
    assert!(!f.store.view().config.paused);
    let (code, _, _) = f.send("GET", "/status", None, None, vec![]).await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn private_reads_need_credentials() {
    let f = Fixture::start(config(true, false, false)).await;
    for (path, want) in [
        ("/", 503),
        ("/status", 200),
        ("/cluster", 200),
        ("/history", 200),
        ("/config", 200),
        ("/metrics", 200),
        ("/replica", 200),
        ("/liveness", 200),
    ] {
        let (code, headers, _) = f.send("GET", path, None, None, vec![]).await;
        assert_eq!(code, 401, "{path}");
        assert!(headers.get("www-authenticate").is_some());
        let (code, _, _) = f
            .send(
                "GET",
                path,
                Some(&basic("admin", "admin-password")),
                None,
                vec![],
            )
            .await;
        assert_eq!(code, want, "{path}");
    }
    let f = Fixture::start(config(false, false, false)).await;
    let (code, _, text) = f.send("GET", "/status", None, None, vec![]).await;
    assert_eq!(code, 403, "{text}");
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_4xx_and_change_nothing() {
    let f = Fixture::start(config(true, true, true)).await;
    let before = f.store.view();
    let big = format!(r#"{{"candidate": "{}"}}"#, "x".repeat(BODY_LIMIT));
    let cases: Vec<(Option<&str>, Vec<u8>, u16)> = vec![
        (Some("application/json"), b"{".to_vec(), 400),
        (Some("application/json"), b"[1,2]".to_vec(), 400),
        (Some("application/json"), b"\"pause\"".to_vec(), 400),
        (
            Some("application/json"),
            br#"{"unexpected": true}"#.to_vec(),
            400,
        ),
        (Some("application/json"), vec![0xff, 0xfe, 0x00], 400),
        (Some("text/plain"), br#"{"candidate":"n3"}"#.to_vec(), 415),
        (Some("application/json"), big.into_bytes(), 413),
    ];
    for (method, path) in ACTIONS {
        for (ct, body, want) in &cases {
            let (code, _, text) = f
                .send(method, path, Some(&bearer()), *ct, body.clone())
                .await;
            assert_eq!(
                code,
                *want,
                "{method} {path} {ct:?} {:?}: {text}",
                String::from_utf8_lossy(&body[..body.len().min(40)])
            );
            assert!(
                serde_json::from_str::<Value>(&text).unwrap()["error"].is_string(),
                "{text}"
            );
        }
    }
    // Wrong types and values.
    for (path, body) in [
        ("/switchover", r#"{"candidate": 3}"#),
        ("/switchover", r#"{"scheduled_at": "soon"}"#),
        (
            "/failover",
            r#"{"candidate": "n3", "accept_data_loss": "yes"}"#,
        ),
        ("/failover", r#"{}"#),
    ] {
        let (code, body) = f.post(path, Some(&bearer()), body).await;
        assert_eq!(code, 400, "{path}: {body}");
    }
    let (code, _, text) = f
        .send(
            "PATCH",
            "/config",
            Some(&bearer()),
            Some("application/json"),
            br#"{"paused": 1}"#.to_vec(),
        )
        .await;
    assert_eq!(code, 400, "{text}");
    let (code, _, text) = f
        .send(
            "PATCH",
            "/config",
            Some(&bearer()),
            Some("application/json"),
            br#"{"loop_wait": "1s"}"#.to_vec(),
        )
        .await;
    assert_eq!(code, 400, "{text}");
    assert!(text.contains(r#"unknown key \"loop_wait\""#), "{text}");
    assert_eq!(f.store.view(), before);
    assert_eq!(f.commands.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn switchover_and_failover_are_validated_like_the_cli() {
    let f = Fixture::start(config(false, true, true)).await;
    let auth = Some(bearer());
    let auth = auth.as_deref();
    let (code, body) = f
        .post("/switchover", auth, r#"{"candidate": "ghost"}"#)
        .await;
    assert_eq!(code, 404, "{body}");
    let (code, body) = f.post("/switchover", auth, r#"{"candidate": "n1"}"#).await;
    assert_eq!(code, 412, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("already the leader")
    );
    let (code, body) = f
        .post(
            "/switchover",
            auth,
            r#"{"leader": "n3", "candidate": "n2"}"#,
        )
        .await;
    assert_eq!(code, 412, "{body}");
    let (code, body) = f.post("/failover", auth, r#"{"candidate": "n3"}"#).await;
    assert_eq!(code, 412, "{body}");
    assert!(f.store.view().failover.is_none());
    // Scheduled: recorded, answered at once.
    let (code, body) = f
        .post(
            "/switchover",
            auth,
            r#"{"leader": "n1", "candidate": "n3", "scheduled_at": "2999-01-01T00:00:00Z"}"#,
        )
        .await;
    assert_eq!(code, 202, "{body}");
    let pending = f.store.view().failover.expect("request recorded");
    assert_eq!(pending.to, Some("n3".into()));
    assert_eq!(pending.from, Some("n1".into()));
    // A pending request is never replaced; the answer names it.
    let (code, body) = f.post("/switchover", auth, r#"{"candidate": "n3"}"#).await;
    assert_eq!(code, 409);
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("from n1 to n3, scheduled at 2999-01-01T00:00:00.000Z")
            && error.contains("DELETE /switchover"),
        "{error}"
    );
    f.store.expire_leader();
    let (code, body) = f.post("/failover", auth, r#"{"candidate": "n3"}"#).await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(f.store.view().failover, Some(pending));
    // Cancelled explicitly: gone, and a second cancel finds nothing.
    let (code, _, text) = f.send("DELETE", "/switchover", auth, None, vec![]).await;
    assert_eq!(code, 200, "{text}");
    assert!(
        text.contains("cancelled the pending request (from n1 to n3"),
        "{text}"
    );
    assert_eq!(f.store.view().failover, None);
    let (code, _, text) = f.send("DELETE", "/switchover", auth, None, vec![]).await;
    assert_eq!(code, 404, "{text}");
}

/// Two `PATCH /config` and a `POST /pause` at once: every change lands.
#[tokio::test]
async fn concurrent_config_changes_all_land() {
    let f = Fixture::start(config(false, true, true)).await;
    let auth = bearer();
    let patch = |body: &'static str| {
        f.send(
            "PATCH",
            "/config",
            Some(&auth),
            Some("application/json"),
            body.as_bytes().to_vec(),
        )
    };
    let (a, b, c) = tokio::join!(
        patch(r#"{"synchronous_mode": "on"}"#),
        patch(r#"{"synchronous_node_count": 2}"#),
        f.post("/pause", Some(&auth), ""),
    );
    assert_eq!((a.0, b.0, c.0), (200, 200, 200), "{a:?} {b:?} {c:?}");
    let config = f.store.view().config;
    assert_eq!(
        (
            config.synchronous_mode,
            config.synchronous_node_count,
            config.paused
        ),
        (crate::dcs::SyncMode::On, 2, true)
    );
}

#[tokio::test]
async fn agent_commands() {
    let f = Fixture::start(config(false, true, true)).await;
    let auth = Some(bearer());
    let auth = auth.as_deref();
    let (code, body) = f.post("/reload", auth, "").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = f.post("/restart", auth, "{}").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = f.post("/reinitialize", auth, "").await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(f.commands.load(Ordering::SeqCst), 3);
    // Paused: restart and reinitialize would leave PostgreSQL down.
    f.status.send_modify(|s| s.paused = true);
    for path in ["/restart", "/reinitialize"] {
        let (code, body) = f.post(path, auth, "").await;
        assert_eq!(code, 409, "{path}: {body}");
    }
    // The leader is never reinitialized.
    f.status.send_modify(|s| {
        s.paused = false;
        s.lease_held = true;
    });
    let (code, body) = f.post("/reinitialize", auth, "").await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(f.commands.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn config_patch_and_reads() {
    let f = Fixture::start(config(false, true, true)).await;
    let (code, _, text) = f
        .send(
            "PATCH",
            "/config",
            Some(&bearer()),
            Some("application/merge-patch+json"),
            br#"{"paused": true}"#.to_vec(),
        )
        .await;
    assert_eq!(code, 200, "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["paused"],
        true
    );
    assert!(f.store.view().config.paused);
    // /config serves the agent's last view: publish a new one.
    f.status.send_modify(|s| s.view = Some(f.store.view()));
    let (code, _, text) = f.send("GET", "/config", None, None, vec![]).await;
    assert_eq!(
        (
            code,
            serde_json::from_str::<Value>(&text).unwrap()["paused"].clone()
        ),
        (200, json!(true))
    );
    for path in ["/cluster", "/history", "/status"] {
        let (code, _, text) = f.send("GET", path, None, None, vec![]).await;
        assert_eq!(code, 200, "{path}");
        assert!(
            !text.contains(TOKEN) && !text.contains("superuser-pw"),
            "{path}: {text}"
        );
    }
    let (_, _, text) = f.send("GET", "/cluster", None, None, vec![]).await;
    let cluster: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(cluster["leader"], "n1");
    assert_eq!(cluster["members"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn health_methods_queries_and_unknown_routes() {
    let f = Fixture::start(config(false, true, true)).await;
    for (path, want) in [
        ("/replica", 200),
        ("/primary", 503),
        ("/async", 200),
        ("/sync", 503),
        ("/read-only", 200),
    ] {
        for method in ["GET", "HEAD", "OPTIONS"] {
            let (code, _, text) = f.send(method, path, None, None, vec![]).await;
            assert_eq!(code, want, "{method} {path}");
            assert_eq!(
                text.is_empty(),
                method == "HEAD",
                "{method} {path}: {text:?}"
            );
        }
    }
    let (code, _, text) = f.send("GET", "/replica?lag=lots", None, None, vec![]).await;
    assert_eq!(code, 400, "{text}");
    let (code, _, _) = f
        .send(
            "GET",
            "/replica?lag=10MB&tag_nofailover=false",
            None,
            None,
            vec![],
        )
        .await;
    assert_eq!(code, 200);
    let (code, _, text) = f.send("GET", "/nope", None, None, vec![]).await;
    assert_eq!(code, 404);
    assert!(text.contains("error"));
    let (code, _, text) = f
        .send("DELETE", "/failover", Some(&bearer()), None, vec![])
        .await;
    assert_eq!(code, 405, "{text}");
    assert!(text.contains("error"));
    let (code, _, text) = f
        .send("PUT", "/primary", Some(&bearer()), None, vec![])
        .await;
    assert_eq!(code, 405, "{text}");
    let (code, headers, text) = f.send("GET", "/metrics", None, None, vec![]).await;
    assert_eq!(code, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
}

/// Patroni serves its primary check on `/`: an HAProxy configuration
/// written for Patroni that checks `/` must never route writes to a
/// replica.
#[tokio::test]
async fn root_is_the_primary_check() {
    let f = Fixture::start(config(false, true, true)).await;
    for method in ["GET", "HEAD", "OPTIONS"] {
        let (code, _, text) = f.send(method, "/", None, None, vec![]).await;
        assert_eq!(code, 503, "{method} / on a replica: {text}");
        if method != "HEAD" {
            let body: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(body["role"], "replica", "{method} /: {text}");
        }
    }
    f.status.send_modify(|s| {
        s.member = Some(record("n2", "primary", "running"));
        s.lease_held = true;
        s.lease_valid = true;
    });
    for method in ["GET", "HEAD", "OPTIONS"] {
        let (root, _, text) = f.send(method, "/", None, None, vec![]).await;
        let (primary, _, _) = f.send(method, "/primary", None, None, vec![]).await;
        assert_eq!(
            (root, primary),
            (200, 200),
            "{method} / on the leader: {text}"
        );
    }
    // Query filters apply as on /primary.
    let (code, _, _) = f
        .send("GET", "/?tag_nofailover=true", None, None, vec![])
        .await;
    assert_eq!(code, 503);
}

/// A body that trickles in is cut off after `api.body_read_timeout` with
/// 408 (as JSON, connection closed) and the action does not happen.
#[tokio::test]
async fn a_slow_body_gets_408_and_changes_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cfg = config(false, true, true);
    cfg.api.limits.body_read_timeout = std::time::Duration::from_millis(300);
    let f = Fixture::start(cfg).await;
    let addr = f.url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /pause HTTP/1.1\r\nHost: t\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{{",
        bearer()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        s.read_to_end(&mut answer),
    )
    .await
    .expect("answered and closed within 5 s")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_string();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(answer.contains("api.body_read_timeout"), "{answer}");
    assert!(!f.store.view().config.paused);
}
