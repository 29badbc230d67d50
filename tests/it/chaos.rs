//! The network fault suite, short variant (the long one is
//! `pgha-bench chaos`, see bench/README.md): hosts in network namespaces
//! built by bench/netns.rs, faults injected with nftables.
//!
//! Needs root, iproute2 and nftables (scripts/install-deps.sh).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

#[path = "../../bench/clock.rs"]
#[allow(dead_code)]
mod clock;
#[path = "../../bench/history.rs"]
mod history;
#[path = "../../bench/netns.rs"]
mod netns;

use history::{History, Target, Writer};
use netns::{Host, Net};

use crate::support::cluster::{PGHA_BIN, SUPERUSER, is_healthy, list_json};
use crate::support::{ProcessGuard, TestDir};

/// Opens a TCP connection from `from` to `to`'s listener and exchanges
/// one byte both ways; false on any timeout or error.
fn round_trip(from: &Host, listener: &TcpListener) -> bool {
    let addr = listener.local_addr().unwrap();
    let from = from.clone();
    let client = std::thread::spawn(move || -> std::io::Result<()> {
        from.enter().map_err(std::io::Error::other)?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(700))?;
        s.set_read_timeout(Some(Duration::from_millis(700)))?;
        s.write_all(b"?")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        Ok(())
    });
    let deadline = std::time::Instant::now() + Duration::from_millis(1500);
    listener.set_nonblocking(true).unwrap();
    let mut served = false;
    while std::time::Instant::now() < deadline && !client.is_finished() {
        if let Ok((mut s, _)) = listener.accept() {
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(700)))
                .unwrap();
            let mut b = [0u8; 1];
            served = s.read_exact(&mut b).is_ok() && s.write_all(b"!").is_ok();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    client.join().unwrap().is_ok() && served
}

/// A listener bound inside `host`'s namespace (the socket keeps the
/// namespace of the thread that created it).
fn listen_in(host: &Host) -> TcpListener {
    let host = host.clone();
    std::thread::spawn(move || {
        host.enter().unwrap();
        TcpListener::bind(SocketAddr::from((host.addr, 0))).unwrap()
    })
    .join()
    .unwrap()
}

#[test]
fn net_harness_cuts_and_heals_traffic_between_namespaces() {
    let net = Net::new("pghait").expect("create the network");
    let a = net.add_host("a").unwrap();
    let b = net.add_host("b").unwrap();
    let c = net.add_host("c").unwrap();
    assert_ne!(a.addr, b.addr);
    let la = listen_in(&a);
    let lb = listen_in(&b);
    assert!(round_trip(&b, &la), "b reaches a before any fault");
    assert!(round_trip(&a, &lb), "a reaches b before any fault");

    net.isolate(&a).unwrap();
    assert!(!round_trip(&b, &la), "a is isolated");
    assert!(!round_trip(&c, &la), "a is isolated from c too");
    assert!(round_trip(&c, &lb), "b and c still talk");
    net.heal().unwrap();
    assert!(round_trip(&b, &la), "healed");

    net.cut(&a, &b).unwrap();
    assert!(!round_trip(&b, &la) && !round_trip(&a, &lb), "a-b cut");
    assert!(round_trip(&c, &la) && round_trip(&c, &lb), "c reaches both");
    net.heal().unwrap();

    // One way: a's packets to b are dropped, so no TCP handshake completes
    // in either direction, but b's packets still arrive at a.
    net.cut_one_way(&a, &b).unwrap();
    assert!(!round_trip(&a, &lb));
    net.heal().unwrap();
    assert!(round_trip(&a, &lb));

    net.lossy(&a, 100).unwrap();
    assert!(!round_trip(&b, &la), "100% loss on a's side");
    net.heal().unwrap();
    // netem is missing from some kernels (sch_netem not built); the token
    // bucket is the fallback of the chaos suite's slow network.
    if net.has_netem(&a) {
        net.netem(&a, "delay 100ms loss 1%").unwrap();
        assert!(round_trip(&b, &la), "a slow link still carries traffic");
        net.heal().unwrap();
    }
    net.throttle(&a, "1mbit").unwrap();
    assert!(
        round_trip(&b, &la),
        "a throttled link still carries traffic"
    );
    net.heal().unwrap();
    assert!(round_trip(&b, &la), "healed");

    let prefix = net.prefix().to_string();
    drop(net);
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        !list.contains(&prefix),
        "namespaces of {prefix} left after drop: {list}"
    );
}

/// One pgha member in its own namespace.
struct NsNode {
    name: String,
    host: Host,
    config: PathBuf,
    socket_dir: PathBuf,
    log: PathBuf,
    agent: Option<ProcessGuard>,
}

impl NsNode {
    fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = self.host.command(PGHA_BIN);
        cmd.arg("agent")
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.agent = Some(ProcessGuard::spawn(&mut cmd)?);
        Ok(())
    }
}

/// A leader's name from `pgha list --json`, when the cluster is healthy.
async fn healthy_leader(config: &std::path::Path, names: &BTreeSet<String>) -> Option<String> {
    let list = list_json(config).await.ok()?;
    if !is_healthy(&list, names) {
        return None;
    }
    list["members"]
        .as_array()?
        .iter()
        .find(|m| m["role"] == "leader")?["name"]
        .as_str()
        .map(str::to_string)
}

async fn wait_healthy(
    config: &std::path::Path,
    names: &BTreeSet<String>,
    timeout: Duration,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(leader) = healthy_leader(config, names).await {
            return Ok(leader);
        }
        if Instant::now() > deadline {
            let last = list_json(config).await.map(|l| l.to_string());
            anyhow::bail!("not healthy after {timeout:?}; last `pgha list`: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    IsolateLeader,
    CutLeaderFromEtcd,
    FreezeLeaderNode,
}

/// The short chaos run: one etcd member and three nodes in namespaces,
/// `synchronous_mode = on`, a client writer and a local writer per node.
/// After each fault is healed: no acknowledged write missing on the
/// leader, no two servers acknowledging writes at the same time, and the
/// cluster back to one leader with two streaming replicas within 60 s.
#[test]
fn partitions_and_a_frozen_node_lose_no_acknowledged_write_in_sync_mode() {
    let net = Arc::new(Net::new("pghait").expect("create the network"));
    let dir = TestDir::new("chaos");
    // The whole story runs on a thread inside the client namespace, so
    // that every socket and every `pgha` CLI it starts is a client's.
    let story = {
        let net = net.clone();
        let root = dir.path().to_path_buf();
        std::thread::spawn(move || -> anyhow::Result<()> {
            let etcd = net.add_host("etcd")?;
            let hosts: Vec<Host> = (1..=3)
                .map(|k| net.add_host(&format!("node{k}")))
                .collect::<Result<_, _>>()?;
            let client = net.add_host("client")?;
            client.enter()?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(story(&net, &root, etcd, hosts))
        })
    };
    let result = story.join().expect("story thread");
    drop(net);
    result.unwrap();
}

async fn story(
    net: &Net,
    root: &std::path::Path,
    etcd: Host,
    hosts: Vec<Host>,
) -> anyhow::Result<()> {
    let endpoint = format!("http://{}:2379", etcd.addr);
    let mut etcd_cmd = etcd.command("etcd");
    let etcd_log = std::fs::File::create(root.join("etcd.log"))?;
    etcd_cmd
        .arg("--name=etcd")
        .arg(format!("--data-dir={}", root.join("etcd").display()))
        .arg(format!("--listen-client-urls={endpoint}"))
        .arg(format!("--advertise-client-urls={endpoint}"))
        .arg(format!("--listen-peer-urls=http://{}:2380", etcd.addr))
        .arg(format!(
            "--initial-advertise-peer-urls=http://{}:2380",
            etcd.addr
        ))
        .arg(format!("--initial-cluster=etcd=http://{}:2380", etcd.addr))
        .stdin(Stdio::null())
        .stdout(etcd_log.try_clone()?)
        .stderr(etcd_log);
    let _etcd = ProcessGuard::spawn(&mut etcd_cmd)?;

    let password = format!("chaos-su-{}", std::process::id());
    let mut nodes = Vec::new();
    for host in &hosts {
        let dir = root.join(&host.name);
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("node.toml");
        std::fs::write(
            &config,
            format!(
                r#"cluster = "chaos-{pid}"
name = "{name}"
state_dir = "{dir}/state"

[etcd]
endpoints = ["{endpoint}"]

[postgres]
data_dir = "{dir}/data"
listen_addresses = "{addr}"
replication_networks = ["10.77.0.0/24"]
client_networks = ["10.77.0.0/24"]
superuser = {{ username = "{SUPERUSER}", password = "{password}" }}
replication = {{ username = "replicator", password = "{password}-r" }}

[api]
listen = "{addr}:8008"
"#,
                pid = std::process::id(),
                name = host.name,
                dir = dir.display(),
                addr = host.addr,
            ),
        )?;
        nodes.push(NsNode {
            name: host.name.clone(),
            host: host.clone(),
            socket_dir: dir.join("state/postgres/run"),
            log: dir.join("agent.log"),
            config,
            agent: None,
        });
    }
    for n in &mut nodes {
        n.start()?;
    }
    let names: BTreeSet<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let config = nodes[0].config.clone();
    wait_healthy(&config, &names, Duration::from_secs(90)).await?;
    let set = tokio::process::Command::new(PGHA_BIN)
        .args(["config", "set", "-c"])
        .arg(&config)
        .arg("synchronous_mode=on")
        .output()
        .await?;
    anyhow::ensure!(set.status.success(), "pgha config set: {set:?}");
    wait_healthy(&config, &names, Duration::from_secs(60)).await?;

    let mut client_config = tokio_postgres::Config::new();
    for h in &hosts {
        client_config.host(h.addr.to_string()).port(5432);
    }
    client_config
        .user(SUPERUSER)
        .password(&password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(1))
        .target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
    let admin = crate::support::cluster::connect(&client_config).await?;
    admin
        .batch_execute(&format!(
            "CREATE TABLE {} (id bigint PRIMARY KEY)",
            history::TABLE
        ))
        .await?;
    let history = Arc::new(History::default());
    let mut writers = vec![Writer::start(
        0,
        Target::Client {
            config: client_config.clone(),
            addrs: hosts.iter().map(|h| h.addr.to_string()).collect(),
        },
        Duration::from_millis(10),
        history.clone(),
    )];
    for (i, n) in nodes.iter().enumerate() {
        let mut c = tokio_postgres::Config::new();
        c.host_path(&n.socket_dir)
            .port(5432)
            .user(SUPERUSER)
            .password(&password)
            .dbname("postgres");
        writers.push(Writer::start(
            i + 1,
            Target::Local {
                server: i,
                config: c,
            },
            Duration::from_millis(20),
            history.clone(),
        ));
    }

    let mut window_start = clock::now_ms();
    let mut failures = Vec::new();
    for fault in [
        Fault::IsolateLeader,
        Fault::CutLeaderFromEtcd,
        Fault::FreezeLeaderNode,
    ] {
        let leader = wait_healthy(&config, &names, Duration::from_secs(60)).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let lead = &hosts[nodes
            .iter()
            .position(|n| n.name == leader)
            .context("leader")?];
        match fault {
            Fault::IsolateLeader => net.isolate(lead)?,
            Fault::CutLeaderFromEtcd => net.cut(lead, &etcd)?,
            Fault::FreezeLeaderNode => {
                lead.signal_all(libc::SIGSTOP);
                lead.signal_all(libc::SIGSTOP);
            }
        }
        tokio::time::sleep(Duration::from_secs(6)).await;
        net.heal()?;
        if let Fault::FreezeLeaderNode = fault {
            lead.signal_all(libc::SIGCONT);
        }
        let healthy = wait_healthy(&config, &names, Duration::from_secs(60)).await;
        let end = clock::now_ms();
        let acks = history.acks_between(window_start, end);
        window_start = end;
        let leader_now = connect_leader(&client_config).await?;
        let lost = history::missing(&leader_now, &acks).await?;
        let overlaps = history::overlaps(&acks);
        eprintln!(
            "{fault:?} on {leader}: {} acknowledged, lost {}, overlaps {overlaps:?}, healthy: {:?}",
            acks.len(),
            lost.len(),
            healthy.as_ref().map_err(|e| e.to_string())
        );
        if acks.is_empty() {
            failures.push(format!("{fault:?}: no write acknowledged at all"));
        }
        if !lost.is_empty() {
            failures.push(format!(
                "{fault:?} on {leader}: acknowledged ids lost: {lost:?}"
            ));
        }
        if !overlaps.is_empty() {
            failures.push(format!(
                "{fault:?} on {leader}: two servers acknowledged writes: {overlaps:?}"
            ));
        }
        if let Err(e) = healthy {
            failures.push(format!("{fault:?} on {leader}: {e:#}"));
            break;
        }
    }
    for w in &mut writers {
        w.stop().await;
    }
    for n in &mut nodes {
        if let Some(a) = n.agent.take() {
            a.terminate(Duration::from_secs(20)).await;
        }
    }
    if !failures.is_empty() {
        let logs: Vec<String> = nodes
            .iter()
            .map(|n| format!("{}: {}", n.name, n.log.display()))
            .collect();
        anyhow::bail!("{}\nagent logs: {}", failures.join("\n"), logs.join(", "));
    }
    Ok(())
}

async fn connect_leader(config: &tokio_postgres::Config) -> anyhow::Result<tokio_postgres::Client> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match crate::support::cluster::connect(config).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
