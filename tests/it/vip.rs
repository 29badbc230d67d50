//! The floating address (`[vip]`) in network namespaces: three nodes and
//! an etcd, each in its own namespace on a private bridge
//! (bench/netns.rs), and a client namespace that reaches PostgreSQL only
//! through the floating address. A failover with the leader's agent
//! frozen (so only its fence keeper can drop the address), then a
//! switchover: after each, the client reaches the new leader, and a
//! sampler that looks at every node's interface every 20 ms never sees
//! two nodes holding the address.
//!
//! Needs root, iproute2 and nftables (scripts/install-deps.sh).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pgha::agent::vip_net::FloatingAddress;

use crate::support::cluster::{ClusterOptions, Node, PGHA_BIN, SUPERUSER};
use crate::support::process::output;
use crate::support::{ProcessGuard, TestDir};

// chaos.rs includes the same file privately; a second copy keeps the two
// test modules independent of each other.
#[allow(clippy::duplicate_mod)]
#[path = "../../bench/netns.rs"]
mod netns;

use netns::{Host, Net};

const VIP: &str = "10.77.0.200";
const PG_PORT: u16 = 5432;
const PSQL: &str = "/usr/lib/postgresql/15/bin/psql";

/// etcd inside `host`'s namespace, on its address.
fn spawn_etcd(dir: &TestDir, host: &Host) -> anyhow::Result<ProcessGuard> {
    let data = dir.subdir("etcd");
    let log = std::fs::File::create(dir.path().join("etcd.log"))?;
    let client = format!("http://{}:2379", host.addr);
    let peer = format!("http://{}:2380", host.addr);
    let mut cmd = host.command("etcd");
    cmd.arg("--name=e1")
        .arg(format!("--data-dir={}", data.display()))
        .arg(format!("--listen-client-urls={client}"))
        .arg(format!("--advertise-client-urls={client}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster=e1={peer}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    ProcessGuard::spawn(&mut cmd)
}

/// Points the node's config at its namespace: PostgreSQL on every
/// address of the host (so also on the floating one, whenever it comes)
/// and port 5432 (the same on every node, so one address and
/// port reach the leader), the API on the host's address, clients of the
/// bridge allowed, and the floating address on `eth0`.
fn place(node: &mut Node, host: &Host) -> anyhow::Result<()> {
    let path = node.config_path().to_path_buf();
    let text = std::fs::read_to_string(&path)?;
    let pg_port_line = format!("port = {}\n", node.pg_port());
    let api_line = format!("listen = \"127.0.0.1:{}\"", node.api_port());
    anyhow::ensure!(text.contains(&pg_port_line) && text.contains(&api_line));
    let text = text
        .replace(
            &pg_port_line,
            &format!(
                "port = {PG_PORT}\nlisten_addresses = \"*\"\nconnect_host = \"{a}\"\nclient_networks = [\"127.0.0.1/32\", \"10.77.0.0/24\"]\nreplication_networks = [\"10.77.0.0/24\"]\n",
                a = host.addr
            ),
        )
        .replace(&api_line, &format!("listen = \"{}:8008\"", host.addr));
    let text = format!("{text}\n[vip]\naddress = \"{VIP}/24\"\ninterface = \"eth0\"\n");
    std::fs::write(&path, text)?;
    node.set_netns(&host.ns);
    Ok(())
}

/// From the client namespace, through the floating address: whether the
/// server is in recovery, and which member answered (pgha sets
/// `cluster_name` to the member name).
async fn ask_through_vip(client: &Host, password: &str) -> anyhow::Result<(bool, String)> {
    let mut cmd = client.command(PSQL);
    cmd.env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "2")
        .args(["-X", "-At", "-h", VIP, "-p", &PG_PORT.to_string()])
        .args(["-U", SUPERUSER, "-d", "postgres", "-c"])
        .arg(
            "SELECT pg_is_in_recovery(), current_setting('cluster_name'), host(inet_server_addr())",
        );
    let out = output(cmd).await?;
    let fields: Vec<&str> = out.split('|').collect();
    let [recovery, name, server_addr] = fields[..] else {
        bail!("unexpected psql output {out:?}");
    };
    anyhow::ensure!(server_addr == VIP, "answered on {server_addr}, not {VIP}");
    Ok((recovery == "t", name.to_string()))
}

/// Waits until the client reaches a writable server through the address
/// on a member other than `not`; returns that member's name.
async fn wait_for_writable_leader(
    client: &Host,
    password: &str,
    not: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match ask_through_vip(client, password).await {
            Ok((false, name)) if not.is_none_or(|n| n != name) => return Ok(name),
            Ok(answer) => last = format!("{answer:?}"),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("no writable leader other than {not:?} through {VIP} within {timeout:?}; last: {last}")
}

/// The MAC address of `eth0` in `host`'s namespace.
async fn mac_of(host: &Host) -> anyhow::Result<String> {
    let out = output(ip(&["-n", &host.ns, "-o", "link", "show", "eth0"])).await?;
    let mac = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .context("no link/ether")?;
    Ok(mac.to_string())
}

/// The client's neighbour entry for the floating address: its MAC.
async fn client_neighbour(client: &Host) -> Option<String> {
    let out = output(ip(&["-n", &client.ns, "neigh", "show", VIP]))
        .await
        .ok()?;
    let mac = out
        .split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)?;
    Some(mac.to_string())
}

fn ip(args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(args);
    c
}

/// Looks at every node's interface in turn (one netlink dump per node,
/// about a millisecond for all) every 20 ms and records each round in
/// which more than one node held the address, and who held it when.
struct Sampler {
    stop: Arc<AtomicBool>,
    overlaps: Arc<Mutex<Vec<Vec<String>>>>,
    holders: Arc<Mutex<Vec<String>>>,
    rounds: Arc<Mutex<u64>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(hosts: Vec<Host>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let overlaps = Arc::new(Mutex::new(Vec::new()));
        let holders = Arc::new(Mutex::new(Vec::new()));
        let rounds = Arc::new(Mutex::new(0));
        let (s, o, h, r) = (
            stop.clone(),
            overlaps.clone(),
            holders.clone(),
            rounds.clone(),
        );
        let thread = std::thread::spawn(move || {
            let address = FloatingAddress {
                address: VIP.parse().unwrap(),
                prefix_len: 24,
                interface: "eth0".into(),
            };
            while !s.load(Ordering::SeqCst) {
                let mut now = Vec::new();
                for host in &hosts {
                    // A netlink socket belongs to the namespace of the
                    // thread that opens it; each query opens its own.
                    host.enter().expect("enter the node's namespace");
                    if address.is_present().unwrap_or(false) {
                        now.push(host.name.clone());
                    }
                }
                if now.len() > 1 {
                    o.lock().unwrap().push(now.clone());
                }
                *h.lock().unwrap() = now;
                *r.lock().unwrap() += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Sampler {
            stop,
            overlaps,
            holders,
            rounds,
            thread: Some(thread),
        }
    }

    fn holders(&self) -> Vec<String> {
        self.holders.lock().unwrap().clone()
    }

    async fn wait_for_holder(&self, other_than: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.holders().as_slice() {
                [one] if one != other_than => return Ok(one.clone()),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        bail!(
            "no node other than {other_than} holds {VIP} after {timeout:?} (holders: {:?})",
            self.holders()
        )
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `pgha ARGS -c <node config>` run inside `host`'s namespace.
async fn pgha_in(host: &Host, config: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = host.command(PGHA_BIN);
    cmd.arg(args[0]).arg("-c").arg(config).args(&args[1..]);
    output(cmd).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floating_address_follows_the_leader_and_is_never_held_twice() {
    // Drop order (reverse of declaration): nodes, etcd, the directory,
    // then the namespaces.
    let net = Net::new("pghavip").expect("create the network");
    let etcd_host = net.add_host("etcd").unwrap();
    let hosts: Vec<Host> = (1..=3)
        .map(|i| net.add_host(&format!("node{i}")).unwrap())
        .collect();
    let client = net.add_host("client").unwrap();
    let dir = TestDir::new("vip");
    let _etcd = spawn_etcd(&dir, &etcd_host).expect("start etcd");
    let endpoint = format!("http://{}:2379", etcd_host.addr);
    let cluster = format!("vip-{}", std::process::id());
    let opts = ClusterOptions::default();
    let mut nodes = Vec::new();
    for h in &hosts {
        let mut n = Node::with_passwords(
            &dir,
            &cluster,
            &h.name,
            std::slice::from_ref(&endpoint),
            &opts,
            &format!("su-{cluster}"),
            &format!("repl-{cluster}"),
        )
        .expect("write the node config");
        place(&mut n, h).expect("place the node in its namespace");
        n.start().expect("start the agent");
        nodes.push(n);
    }
    let password = nodes[0].superuser_password().to_string();
    let sampler = Sampler::start(hosts.clone());
    let host_named = |name: &str| hosts.iter().position(|h| h.name == name).unwrap();

    // 1. Bootstrap: the first leader takes the address.
    let first = sampler
        .wait_for_holder("", Duration::from_secs(60))
        .await
        .expect("the first leader adds the address");
    let first_i = host_named(&first);
    let addr = wait_for_writable_leader(&client, &password, None, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(addr, first, "the client reaches the holder");
    let old_mac = client_neighbour(&client).await;
    assert_eq!(old_mac, Some(mac_of(&hosts[first_i]).await.unwrap()));
    // Every replica streams before the failover, so one can take over.
    wait_streaming(&hosts[first_i], nodes[first_i].config_path(), 2).await;

    // 2. Failover with the leader's agent frozen: only its fence keeper
    // can stop PostgreSQL and drop the address.
    nodes[first_i].freeze().unwrap();
    let second = sampler
        .wait_for_holder(&first, Duration::from_secs(30))
        .await
        .expect("a new leader adds the address");
    let second_i = host_named(&second);
    // Gratuitous ARP: the client's cache entry moves to the new leader's
    // MAC address without the client sending anything.
    let new_mac = mac_of(&hosts[second_i]).await.unwrap();
    // The announcement is sent once the address is up; the deadline only
    // covers a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(10);
    while client_neighbour(&client).await.as_ref() != Some(&new_mac) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        client_neighbour(&client).await,
        Some(new_mac),
        "the gratuitous ARP updates the client's neighbour entry"
    );
    let addr = wait_for_writable_leader(&client, &password, Some(&first), Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(addr, second);
    let fence_log = nodes[first_i].fence_log();
    assert!(
        fence_log.contains("removed the floating address"),
        "the frozen leader's keeper removed the address: {fence_log}"
    );

    // 3. Switchover to the third node, with the old leader still frozen.
    let third_i = (0..3).find(|i| *i != first_i && *i != second_i).unwrap();
    let third = hosts[third_i].name.clone();
    wait_streaming_member(&hosts[second_i], nodes[second_i].config_path(), &third).await;
    pgha_in(
        &hosts[second_i],
        nodes[second_i].config_path(),
        &["switchover", "--to", &third],
    )
    .await
    .expect("switchover");
    let holder = sampler
        .wait_for_holder(&second, Duration::from_secs(30))
        .await
        .expect("the switchover target adds the address");
    assert_eq!(holder, third);
    let addr = wait_for_writable_leader(&client, &password, Some(&second), Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(addr, third);

    // The status API and `pgha list` show who holds it.
    let list = pgha_in(
        &hosts[third_i],
        nodes[third_i].config_path(),
        &["list", "--json"],
    )
    .await
    .unwrap();
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let held: Vec<&str> = list["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["vip"]["held"] == true)
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(held, vec![third.as_str()], "{list}");

    nodes[first_i].thaw().unwrap();
    let rounds = *sampler.rounds.lock().unwrap();
    let overlaps = sampler.overlaps.lock().unwrap().clone();
    drop(sampler);
    assert!(rounds > 100, "the sampler ran ({rounds} rounds)");
    assert!(
        overlaps.is_empty(),
        "two nodes held {VIP} at once in {} of {rounds} rounds: {:?}",
        overlaps.len(),
        &overlaps[..overlaps.len().min(5)]
    );
}

/// Waits until `pgha list` (run in `host`) shows a leader, `replicas`
/// streaming replicas and a synchronous record that is not degraded.
async fn wait_streaming(host: &Host, config: &Path, replicas: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(out) = pgha_in(host, config, &["list", "--json"]).await {
            let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
            let streaming = v["members"].as_array().map_or(0, |m| {
                m.iter().filter(|m| m["state"] == "streaming").count()
            });
            // A degraded record blocks automatic failover (mode `on`): the
            // leader names a standby shortly after they stream.
            if streaming >= replicas && v["synchronous_degraded"] == false {
                return;
            }
            last = out;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("fewer than {replicas} streaming replicas after 60 s: {last}");
}

/// Waits until `pgha list` (run in `host`) shows `member` streaming.
async fn wait_streaming_member(host: &Host, config: &Path, member: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(out) = pgha_in(host, config, &["list", "--json"]).await {
            let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
            if v["members"].as_array().is_some_and(|m| {
                m.iter()
                    .any(|m| m["name"] == member && m["state"] == "streaming")
            }) {
                return;
            }
            last = out;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("{member} does not stream after 60 s: {last}");
}
