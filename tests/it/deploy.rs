//! The production layout of docs/deploy.md, on "machines" made of network
//! namespaces: a three-member etcd cluster on three hosts of its own,
//! three database hosts, and an application host. etcd speaks TLS with
//! client certificates (peers too), the agents' REST API speaks TLS with a
//! token, every host runs the firewall of docs/deploy.md (only the listed
//! ports open), and node1 holds the existing production database, which
//! the cluster adopts. The application reaches the leader through the
//! connection string `pgha dsn` prints, before and after a switchover.
//!
//! Needs root, iproute2, nftables and openssl (scripts/install-deps.sh).

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::support::Pki;
use crate::support::cluster::{ClusterOptions, Node, PGHA_BIN, SUPERUSER};
use crate::support::process::output;
use crate::support::{ProcessGuard, TestDir, wait_until};

// chaos.rs and vip.rs include the same file privately.
#[allow(clippy::duplicate_mod)]
#[path = "../../bench/netns.rs"]
mod netns;

use netns::{Host, Net};

const PSQL: &str = "/usr/lib/postgresql/15/bin/psql";
const PG_CTL: &str = "pg_ctl";
/// The application network (all hosts are on one /24 here).
const NETWORK: &str = "10.77.0.0/24";

/// The firewall of docs/deploy.md for a database host: PostgreSQL and the
/// agent's API from the network, nothing else in.
fn database_firewall() -> String {
    format!(
        "table inet pgha_firewall {{\n\
         chain input {{ type filter hook input priority 10; policy drop;\n\
         iif lo accept\n\
         ct state established,related accept\n\
         ip saddr {NETWORK} tcp dport {{ 5432, 8008 }} accept\n\
         }}\n}}\n"
    )
}

/// The firewall of an etcd host: clients on 2379 from the database hosts,
/// peers on 2380 from the other etcd hosts.
fn etcd_firewall(clients: &[Ipv4Addr], peers: &[Ipv4Addr]) -> String {
    let list = |ips: &[Ipv4Addr]| {
        ips.iter()
            .map(|ip| ip.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "table inet pgha_firewall {{\n\
         chain input {{ type filter hook input priority 10; policy drop;\n\
         iif lo accept\n\
         ct state established,related accept\n\
         ip saddr {{ {} }} tcp dport 2379 accept\n\
         ip saddr {{ {} }} tcp dport 2380 accept\n\
         }}\n}}\n",
        list(clients),
        list(peers)
    )
}

fn firewall(host: &Host, rules: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = host
        .command("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().unwrap().write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "nft on {}: {}",
        host.name,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// One etcd member with TLS for clients (client certificates required)
/// and peers.
fn spawn_etcd(
    dir: &TestDir,
    host: &Host,
    cluster: &[(String, Ipv4Addr)],
    pki: &Pki,
    cert: (&Path, &Path),
) -> anyhow::Result<ProcessGuard> {
    let data = dir.subdir(&format!("{}-data", host.name));
    let log = std::fs::File::create(dir.path().join(format!("{}.log", host.name)))?;
    let client = format!("https://{}:2379", host.addr);
    let peer = format!("https://{}:2380", host.addr);
    let initial: Vec<String> = cluster
        .iter()
        .map(|(name, ip)| format!("{name}=https://{ip}:2380"))
        .collect();
    let mut cmd = host.command("etcd");
    cmd.arg(format!("--name={}", host.name))
        .arg(format!("--data-dir={}", data.display()))
        .arg(format!("--listen-client-urls={client}"))
        .arg(format!("--advertise-client-urls={client}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster={}", initial.join(",")))
        .arg("--initial-cluster-state=new")
        .arg("--initial-cluster-token=pgha-deploy")
        .arg(format!("--cert-file={}", cert.0.display()))
        .arg(format!("--key-file={}", cert.1.display()))
        .arg(format!("--trusted-ca-file={}", pki.ca.display()))
        .arg("--client-cert-auth")
        .arg(format!("--peer-cert-file={}", cert.0.display()))
        .arg(format!("--peer-key-file={}", cert.1.display()))
        .arg(format!("--peer-trusted-ca-file={}", pki.ca.display()))
        .arg("--peer-client-cert-auth")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    ProcessGuard::spawn(&mut cmd)
}

/// The node configuration of docs/deploy.md for `host`.
#[allow(clippy::too_many_arguments)]
fn node_config(
    node: &Node,
    host: &Host,
    cluster: &str,
    etcd: &[Ipv4Addr],
    pki: &Pki,
    cert: (&Path, &Path),
    token: &str,
    passwords: (&str, &str),
) -> String {
    let endpoints: Vec<String> = etcd
        .iter()
        .map(|ip| format!("\"https://{ip}:2379\""))
        .collect();
    format!(
        r#"cluster = "{cluster}"
name = "{name}"
state_dir = "{state}"

[etcd]
endpoints = [{endpoints}]
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"

[postgres]
data_dir = "{data}"
port = 5432
listen_addresses = "*"
connect_host = "{addr}"
client_networks = ["{NETWORK}"]
replication_networks = ["{NETWORK}"]
superuser = {{ username = "{SUPERUSER}", password = "{su}" }}
replication = {{ username = "replicator", password = "{repl}" }}

[api]
listen = "{addr}:8008"
token = "{token}"

[api.tls]
certificate = "{cert}"
key = "{key}"
ca = "{ca}"
"#,
        name = node.name(),
        state = node.state_dir().display(),
        endpoints = endpoints.join(", "),
        ca = pki.ca.display(),
        cert = cert.0.display(),
        key = cert.1.display(),
        data = node.data_dir().display(),
        addr = host.addr,
        su = passwords.0,
        repl = passwords.1,
    )
}

async fn pgha_in(host: &Host, config: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = host.command(PGHA_BIN);
    cmd.arg(args[0]).arg("-c").arg(config).args(&args[1..]);
    output(cmd).await
}

/// `psql` on the application host with a connection string.
async fn app_sql(app: &Host, dsn: &str, password: &str, sql: &str) -> anyhow::Result<String> {
    let mut cmd = app.command(PSQL);
    cmd.env("PGPASSWORD", password)
        .args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(format!("{dsn} user={SUPERUSER} dbname=postgres"))
        .args(["-c", sql]);
    output(cmd).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_deployment_adopts_a_database_behind_tls_and_a_firewall() {
    let started = std::time::Instant::now();
    let say = |msg: String| eprintln!("[deploy +{:6.2}s] {msg}", started.elapsed().as_secs_f64());
    // Drop order (reverse of declaration): nodes, etcd, the directory,
    // then the namespaces.
    let net = Net::new("pghadep").expect("create the network");
    let etcd_hosts: Vec<Host> = (1..=3)
        .map(|i| net.add_host(&format!("etcd{i}")).unwrap())
        .collect();
    let db_hosts: Vec<Host> = (1..=3)
        .map(|i| net.add_host(&format!("node{i}")).unwrap())
        .collect();
    let app = net.add_host("app").unwrap();
    let dir = TestDir::new("deploy");
    let pki_dir = dir.subdir("tls");
    let pki = Pki::generate(&pki_dir).unwrap();

    // etcd: three members, TLS everywhere, firewalled.
    let etcd_ips: Vec<Ipv4Addr> = etcd_hosts.iter().map(|h| h.addr).collect();
    let db_ips: Vec<Ipv4Addr> = db_hosts.iter().map(|h| h.addr).collect();
    let members: Vec<(String, Ipv4Addr)> = etcd_hosts
        .iter()
        .map(|h| (h.name.clone(), h.addr))
        .collect();
    let mut etcds = Vec::new();
    for h in &etcd_hosts {
        let (cert, key) = Pki::issue(&pki_dir, &h.name, &[h.addr]).unwrap();
        let peers: Vec<Ipv4Addr> = etcd_ips
            .iter()
            .copied()
            .filter(|ip| *ip != h.addr)
            .collect();
        firewall(h, &etcd_firewall(&db_ips, &peers)).unwrap();
        etcds.push(spawn_etcd(&dir, h, &members, &pki, (&cert, &key)).unwrap());
    }
    for h in &db_hosts {
        firewall(h, &database_firewall()).unwrap();
    }

    // The database hosts; node1 holds the production database.
    let cluster = format!("deploy-{}", std::process::id());
    let (su, repl) = (
        format!("superuser-{}", std::process::id()),
        format!("replication-{}", std::process::id()),
    );
    let token = format!("token-{:016}", std::process::id());
    let mut nodes = Vec::new();
    for h in &db_hosts {
        let mut n = Node::with_passwords(
            &dir,
            &cluster,
            &h.name,
            &[],
            &ClusterOptions::default(),
            &su,
            &repl,
        )
        .unwrap();
        let (cert, key) = Pki::issue(&pki_dir, &format!("{}-tls", h.name), &[h.addr]).unwrap();
        let text = node_config(
            &n,
            h,
            &cluster,
            &etcd_ips,
            &pki,
            (&cert, &key),
            &token,
            (&su, &repl),
        );
        std::fs::write(n.config_path(), text).unwrap();
        n.set_netns(&h.ns);
        nodes.push(n);
    }
    let old_password = format!("old-{}", std::process::id());
    crate::adopt::standalone_database(&nodes[0], &old_password)
        .await
        .unwrap_or_else(|e| panic!("the production database: {e:#}"));
    // Production shuts down cleanly for the migration window's start.
    let mut stop = crate::adopt::as_pg_owner(PG_CTL);
    stop.arg("-D")
        .arg(nodes[0].data_dir())
        .args(["-m", "fast", "-w", "stop"]);
    crate::adopt::run(stop, "stop the production database").unwrap();
    say("etcd up, firewalls on, production database stopped; starting the agents".into());

    // docs/deploy.md: check the configuration, then start the agents.
    for (n, h) in nodes.iter().zip(&db_hosts) {
        pgha_in(h, n.config_path(), &["check-config"])
            .await
            .unwrap_or_else(|e| panic!("{}: check-config: {e:#}", n.name()));
    }
    for n in &mut nodes {
        n.start().unwrap();
    }
    let config1 = nodes[0].config_path().to_path_buf();
    let names: std::collections::BTreeSet<String> =
        nodes.iter().map(|n| n.name().to_string()).collect();
    let healthy = wait_until(
        Duration::from_secs(120),
        Duration::from_millis(500),
        || async {
            let out = pgha_in(&db_hosts[0], &config1, &["list", "--json"])
                .await
                .ok()?;
            let list: serde_json::Value = serde_json::from_str(&out).ok()?;
            crate::support::cluster::is_healthy(&list, &names).then_some(list)
        },
    )
    .await;
    let list = match healthy {
        Ok(l) => l,
        Err(e) => {
            let logs: Vec<String> = nodes.iter().map(|n| n.log_tail(30)).collect();
            panic!("{e:#}\n{}", logs.join("\n----\n"))
        }
    };
    say("healthy".into());
    let leader = crate::support::cluster::members(&list)
        .iter()
        .find(|m| m["role"] == "leader")
        .and_then(|m| m["name"].as_str().map(str::to_string));
    assert_eq!(
        leader.as_deref(),
        Some("node1"),
        "the production database leads"
    );

    // The application connects with what `pgha dsn` prints.
    let dsn = pgha_in(&db_hosts[1], nodes[1].config_path(), &["dsn"])
        .await
        .unwrap();
    assert!(dsn.contains("target_session_attrs=read-write"), "{dsn}");
    let rows = app_sql(&app, &dsn, &su, "SELECT count(*) FROM items")
        .await
        .unwrap();
    assert_eq!(rows, "20000", "the adopted data");
    app_sql(&app, &dsn, &su, "INSERT INTO acked VALUES (-1)")
        .await
        .unwrap();

    // A switchover through the TLS API and etcd, then the same string
    // finds the new leader.
    // Right after the clone a replica's published position may trail by a
    // loop's worth of WAL; the switchover refuses until it is close.
    let last_refusal = std::sync::Mutex::new(String::new());
    let out = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(500),
        || async {
            let args = ["switchover", "--to", "node2"];
            match pgha_in(&db_hosts[2], nodes[2].config_path(), &args).await {
                Ok(out) => Some(out),
                Err(e) => {
                    *last_refusal.lock().unwrap() = format!("{e:#}");
                    None
                }
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("switchover: {e:#}: {}", last_refusal.lock().unwrap()));
    say(out);
    let writable = wait_until(
        Duration::from_secs(30),
        Duration::from_millis(300),
        || async {
            app_sql(
                &app,
                &dsn,
                &su,
                "INSERT INTO acked VALUES (-2) RETURNING current_setting('cluster_name')",
            )
            .await
            .ok()
        },
    )
    .await
    .unwrap();
    assert_eq!(writable, "node2");
    let seen = app_sql(&app, &dsn, &su, "SELECT count(*) FROM acked WHERE id < 0")
        .await
        .unwrap();
    assert_eq!(seen, "2");

    // The firewall holds: nothing else is reachable (etcd from the
    // application host, for one).
    let mut probe = app.command("bash");
    probe.args([
        "-c",
        &format!("timeout 2 bash -c '</dev/tcp/{}/2379'", etcd_ips[0]),
    ]);
    assert!(
        output(probe).await.is_err(),
        "etcd is closed to the application host"
    );
    drop(etcds);
}
