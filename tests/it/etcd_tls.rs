//! etcd over TLS with client-certificate authentication: pgha's DCS layer,
//! the agent and `pgha list` work against a real etcd started with
//! `--client-cert-auth`, and a wrong CA or a missing client certificate
//! fails with an error that says so.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use pgha::config::{ClientCertificate, EtcdConfig, EtcdTls};
use pgha::dcs::Dcs;
use pgha::dcs::etcd::EtcdDcs;
use pgha::dcs::keys::Keys;
use pgha::model::{Lsn, MemberName, MemberRecord, PgRole, PgState, Timeline};
use pgha::util::chain;

use crate::support::cluster::{self, PGHA_BIN};
use crate::support::{Cluster, ClusterOptions, Etcd, Pki, TestDir};

const TTL: Duration = Duration::from_secs(30);
const TIMEOUT: Duration = Duration::from_secs(2);

/// A test dir with its certificates and a TLS-only etcd. Field order:
/// etcd is killed before its directory is removed.
struct Env {
    etcd: Etcd,
    pki: Pki,
    _dir: TestDir,
}

async fn env(test: &str) -> Env {
    let dir = TestDir::new(test);
    let pki = Pki::generate(&dir.subdir("pki")).expect("generate certificates");
    let etcd = Etcd::spawn_tls(&dir, "e1", &pki)
        .await
        .expect("start etcd with TLS");
    Env {
        etcd,
        pki,
        _dir: dir,
    }
}

impl Env {
    fn config(&self, ca: Option<&PathBuf>, client_cert: bool) -> EtcdConfig {
        EtcdConfig {
            endpoints: self.etcd.endpoints(),
            credentials: None,
            tls: Some(EtcdTls {
                ca_file: ca.cloned(),
                client: client_cert.then(|| ClientCertificate {
                    cert_file: self.pki.client_cert.clone(),
                    key_file: self.pki.client_key.clone(),
                }),
            }),
        }
    }

    async fn member(&self, etcd: &EtcdConfig, name: &str) -> EtcdDcs {
        EtcdDcs::connect(
            etcd,
            Keys::new("pgha", "tls"),
            MemberName::new(name),
            TTL,
            TIMEOUT,
            false,
        )
        .await
        .unwrap_or_else(|e| panic!("connect {name}: {}", chain(&e)))
    }
}

fn record(name: &str) -> MemberRecord {
    MemberRecord {
        name: MemberName::new(name),
        api_url: "http://127.0.0.1:8008".into(),
        host: "127.0.0.1".into(),
        port: 5432,
        role: PgRole::Replica,
        state: PgState::Streaming,
        timeline: Some(Timeline(1)),
        received_lsn: Some(Lsn(0x300_0060)),
        replayed_lsn: None,
        flushed_lsn: None,
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

#[tokio::test]
async fn dcs_works_over_tls_with_a_client_certificate() {
    let env = env("tls-dcs").await;
    let config = env.config(Some(&env.pki.ca), true);
    let a = env.member(&config, "a").await;
    let b = env.member(&config, "b").await;

    assert!(
        a.acquire_leader().await.unwrap().is_some(),
        "a takes the free leader key"
    );
    assert!(
        b.acquire_leader().await.unwrap().is_none(),
        "b cannot take a held key"
    );
    a.put_member(&record("a")).await.unwrap();
    let view = b.read_cluster().await.unwrap();
    assert_eq!(view.leader.map(|l| l.name), Some(MemberName::new("a")));
    assert_eq!(view.members.get(&MemberName::new("a")), Some(&record("a")));

    // The key really is in this etcd, as its own client sees it.
    let mut client = env.etcd.client().await.unwrap();
    let leader = client
        .get(Keys::new("pgha", "tls").leader(), None)
        .await
        .unwrap();
    assert_eq!(leader.kvs().len(), 1);
}

/// The etcd runs with `--client-cert-auth`: trusting its CA is not enough.
#[tokio::test]
async fn etcd_refuses_a_client_without_a_certificate() {
    let env = env("tls-nocert").await;
    let a = env.member(&env.config(Some(&env.pki.ca), false), "a").await;
    let err = a.read_cluster().await.expect_err("no client certificate");
    let shown = chain(&err).to_string();
    assert!(shown.contains("etcd"), "{shown}");
}

/// A CA that did not sign etcd's certificate: every call fails, quickly,
/// and the error says that the certificate is the problem.
#[tokio::test]
async fn a_wrong_ca_fails_with_a_clear_error() {
    let env = env("tls-wrongca").await;
    let a = env
        .member(&env.config(Some(&env.pki.other_ca), true), "a")
        .await;
    let start = Instant::now();
    let err = a.read_cluster().await.expect_err("untrusted server");
    assert!(
        start.elapsed() < TIMEOUT + Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
    let shown = chain(&err).to_string();
    assert!(
        shown.to_lowercase().contains("certificate"),
        "the error must name the certificate problem: {shown}"
    );
}

/// An agent bootstraps through a TLS etcd, `pgha list` shows it, and the
/// same command with the wrong CA exits 1 naming the problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_pgha_list_work_over_tls() {
    let cluster = Cluster::start("tls-agent", 1, ClusterOptions::default().etcd_tls())
        .await
        .expect("a one-node cluster on a TLS etcd");
    let list = cluster.list_json().await.unwrap();
    let members = cluster::members(&list);
    assert_eq!(members.len(), 1, "{list}");
    assert_eq!(members[0]["role"], "leader", "{list}");

    let node = &cluster.nodes[0];
    let pki = cluster.etcd.pki().expect("TLS etcd");
    let text = std::fs::read_to_string(node.config_path()).unwrap();
    let ca = format!("{:?}", pki.ca.display().to_string());
    assert!(text.contains(&ca), "the node config names the CA:\n{text}");
    let wrong = node.dir().join("wrong-ca.toml");
    let other = format!("{:?}", pki.other_ca.display().to_string());
    std::fs::write(&wrong, text.replace(&ca, &other)).unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(PGHA_BIN)
            .args(["list", "-c"])
            .arg(&wrong)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("pgha list exits")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.to_lowercase().contains("certificate"),
        "the error must name the certificate problem: {stderr}"
    );
}
