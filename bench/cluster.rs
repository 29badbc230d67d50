//! A private cluster for one benchmark run: one etcd and N `pgha agent`
//! processes, each with its own generated configuration, under a short
//! work directory in /tmp.
//!
//! The agents are the real `pgha` binary from the same build as the bench.
//! Everything started here is stopped by [`Cluster::shutdown`]; if that
//! never runs (a panic), `Drop` SIGKILLs what is left, and every child
//! carries `PR_SET_PDEATHSIG` so a killed bench does not leave agents or
//! etcd behind.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use pgha::cli::list::ListMember;
use pgha::dcs::Dcs;
use pgha::dcs::etcd::EtcdDcs;
use tokio::process::{Child, Command};

use crate::clock::{log, now_ms};

/// Optional `[ha]` overrides; `None` keeps pgha's default, so the bench
/// measures what an operator gets out of the box unless told otherwise.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Timing {
    /// Leader lease TTL (whole seconds), e.g. 3s.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// HA loop and lease renewal interval, e.g. 500ms.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub loop_wait: Option<Duration>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub retry_timeout: Option<Duration>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub fence_margin: Option<Duration>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub primary_start_timeout: Option<Duration>,
}

impl Timing {
    fn toml(&self) -> String {
        let mut s = String::new();
        for (key, value) in [
            ("ttl", self.ttl),
            ("loop_wait", self.loop_wait),
            ("retry_timeout", self.retry_timeout),
            ("fence_margin", self.fence_margin),
            ("primary_start_timeout", self.primary_start_timeout),
        ] {
            if let Some(v) = value {
                s.push_str(&format!("{key} = \"{}\"\n", humantime::format_duration(v)));
            }
        }
        s
    }
}

pub const SUPERUSER: &str = "postgres";
/// Per-host connect timeout of the writer's multi-host connection.
pub const CLIENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
pub const CLUSTER_NAME: &str = "bench";
/// A healthy replica must be within this many bytes of the leader before a
/// trial starts, well under pgha's default `maximum_lag_on_failover`, so
/// that no trial starts with a replica that is not allowed to take over.
const MAX_HEALTHY_LAG: u64 = 256 * 1024;

/// Where the nodes run when they do not all share the loopback interface:
/// `pgha-bench chaos` puts each node in a network namespace of its own
/// (bench/netns.rs) and runs etcd itself.
#[derive(Clone, Debug)]
pub struct Placement {
    /// One per node: PostgreSQL and the REST API listen on `addr`.
    pub hosts: Vec<PlacedHost>,
    /// The etcd cluster the agents use; the [`Cluster`] starts no etcd.
    pub etcd_endpoints: Vec<String>,
    /// The network every member and client is in (pg_hba), e.g. `10.77.0.0/24`.
    pub network: String,
    /// Data directories go to `<node dir>/<data_parent>/data`, so that a
    /// caller can mount a size-limited file system on `<data_parent>`.
    pub data_parent: String,
}

#[derive(Clone, Debug)]
pub struct PlacedHost {
    pub addr: String,
    /// Command prefix the agent is started with, e.g.
    /// `["ip", "netns", "exec", "<ns>"]`.
    pub launcher: Vec<String>,
}

pub struct Node {
    pub name: String,
    /// Node directory: config-independent files (state, agent log).
    pub dir: PathBuf,
    /// PostgreSQL's unix socket directory (as pgha configures it).
    pub socket_dir: PathBuf,
    /// The address PostgreSQL and the API listen on.
    pub addr: String,
    launcher: Vec<String>,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    pub pg_port: u16,
    pub log_path: PathBuf,
    agent: Mutex<Option<Child>>,
}

pub struct Cluster {
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    pub superuser_password: String,
    /// libpq passfile for the superuser (0600), for tools like pgbench.
    pub pgpass: PathBuf,
    /// The `[ha]` settings the agents really run with (defaults included).
    pub ha: pgha::config::HaConfig,
    /// Cluster-wide settings applied with `pgha config set` once the
    /// cluster is up, e.g. `synchronous_mode=on`.
    pub cluster_config: Vec<String>,
    pgha_exe: PathBuf,
    etcd_ports: Mutex<(u16, u16)>,
    etcd: Mutex<Option<Child>>,
    /// etcd is run by the caller (see [`Placement`]).
    external_etcd: bool,
    dcs: tokio::sync::OnceCell<EtcdDcs>,
    shut_down: std::sync::atomic::AtomicBool,
}

/// The member table as `pgha list --json` shows it, plus the leader key.
#[derive(Debug)]
pub struct Status {
    /// Holder of the leader key, even when its member record is gone.
    pub leader: Option<String>,
    pub members: Vec<ListMember>,
}

impl Status {
    pub fn member(&self, name: &str) -> Option<&ListMember> {
        self.members.iter().find(|m| m.name == name)
    }

    pub fn leader_member(&self) -> Option<&ListMember> {
        self.member(self.leader.as_deref()?)
    }

    pub fn leader_timeline(&self) -> Option<u32> {
        self.leader_member()?.timeline
    }

    /// A running leader and every other member streaming from it on its
    /// timeline, nearly caught up.
    pub fn healthy(&self, nodes: usize) -> bool {
        let Some(leader) = self.leader_member() else {
            return false;
        };
        self.members.len() == nodes
            && leader.role == "leader"
            && leader.state == "running"
            && self
                .members
                .iter()
                .filter(|m| m.name != leader.name)
                .all(|m| self.is_streaming_replica(m))
    }

    pub fn is_streaming_replica(&self, m: &ListMember) -> bool {
        m.role == "replica"
            && m.state == "streaming"
            && m.timeline.is_some()
            && m.timeline == self.leader_timeline()
            && m.lag_bytes.is_some_and(|l| l <= MAX_HEALTHY_LAG)
    }

    /// One line for progress messages.
    pub fn summary(&self) -> String {
        let members: Vec<String> = self
            .members
            .iter()
            .map(|m| {
                format!(
                    "{}={}/{}/tl{}",
                    m.name,
                    m.role,
                    m.state,
                    m.timeline.map(|t| t.to_string()).unwrap_or("?".into())
                )
            })
            .collect();
        format!(
            "leader={} [{}]",
            self.leader.as_deref().unwrap_or("-"),
            members.join(" ")
        )
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// A child in its own process group (so it can be killed with everything
/// it forked) that dies with the bench (`PR_SET_PDEATHSIG`). Linux sends
/// that signal when the spawning *thread* exits; tokio's worker threads
/// and the main thread live as long as the bench.
pub fn spawn_logged(mut cmd: Command, log_path: &Path) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("open {}", log_path.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0);
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    crate::reaper::spawn_own(&mut cmd)
        .with_context(|| format!("spawn {:?}", cmd.as_std().get_program()))
}

/// (state, ppid, pgrp) from /proc/PID/stat; the command name may contain
/// spaces and parentheses, so parse after the last ')'.
fn proc_stat(pid: i32) -> Option<(char, i32, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, ppid, pgrp))
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `pgha fence-keeper` processes guarding a data directory under `dir`
/// (or exactly `dir`).
fn fence_keepers_under(dir: &Path) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|pid| {
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
            args.iter().any(|a| *a == b"fence-keeper")
                && args.windows(2).any(|w| {
                    w[0] == b"--data-dir"
                        && Path::new(std::str::from_utf8(w[1]).unwrap_or("")).starts_with(dir)
                })
        })
        .collect()
}

fn children_of(parent: i32) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|p| proc_stat(*p).is_some_and(|(_, ppid, _)| ppid == parent))
        .collect()
}

/// Processes to kill "at the same instant", as a host loss would.
///
/// PostgreSQL makes every postmaster child a session leader (`setsid()` in
/// `InitPostmasterChild`), so signalling the postmaster's process group
/// would spare the backends: they live on until they notice the postmaster
/// is gone, and acknowledge commits meanwhile. Each child is therefore
/// signalled itself, and its group (anything it forked, e.g. an
/// `archive_command`).
#[derive(Default)]
struct Victims {
    /// Signalled with kill(2).
    pids: Vec<i32>,
    /// Signalled with killpg(2) and kill(2).
    groups: Vec<i32>,
    /// Postmasters whose children forked after listing must be caught.
    postmasters: Vec<i32>,
}

impl Victims {
    /// A postmaster and its current children, listed ahead of the kill
    /// (a /proc scan takes milliseconds; signalling does not).
    fn add_postgres(&mut self, pm: i32) {
        self.pids.push(pm);
        self.groups.extend(children_of(pm));
        self.postmasters.push(pm);
    }

    fn signal(&self, sig: Signal) {
        for p in &self.pids {
            let _ = kill(Pid::from_raw(*p), sig);
        }
        for g in &self.groups {
            let _ = killpg(Pid::from_raw(*g), sig);
            let _ = kill(Pid::from_raw(*g), sig);
        }
    }

    /// Freezes everything (SIGSTOP: nobody reacts, no postmaster forks),
    /// stops children forked since listing, then SIGKILLs everything.
    fn kill(mut self) {
        self.signal(Signal::SIGSTOP);
        for pm in self.postmasters.clone() {
            for c in children_of(pm) {
                if !self.groups.contains(&c) {
                    let _ = killpg(Pid::from_raw(c), Signal::SIGSTOP);
                    let _ = kill(Pid::from_raw(c), Signal::SIGSTOP);
                    self.groups.push(c);
                }
            }
        }
        self.signal(Signal::SIGKILL);
    }
}

fn kill_postgres_now(pm: i32) {
    let mut v = Victims::default();
    v.add_postgres(pm);
    v.kill();
}

impl Cluster {
    /// Creates the work directory and the node configurations; starts
    /// nothing (see [`start`](Cluster::start)).
    pub fn create(
        nodes: usize,
        timing: &Timing,
        cluster_config: Vec<String>,
        pg_parameters: &[(&str, &str)],
        wal_segment_size: Option<&str>,
    ) -> anyhow::Result<Cluster> {
        Self::create_placed(
            nodes,
            timing,
            cluster_config,
            pg_parameters,
            wal_segment_size,
            None,
        )
    }

    /// Like [`create`](Cluster::create), with the nodes placed on the
    /// given hosts (`None`: all on 127.0.0.1 with a local etcd).
    pub fn create_placed(
        nodes: usize,
        timing: &Timing,
        cluster_config: Vec<String>,
        pg_parameters: &[(&str, &str)],
        wal_segment_size: Option<&str>,
        placement: Option<&Placement>,
    ) -> anyhow::Result<Cluster> {
        if let Some(p) = placement {
            anyhow::ensure!(p.hosts.len() == nodes, "one placed host per node");
        }
        anyhow::ensure!((1..=9).contains(&nodes), "--nodes must be between 1 and 9");
        let exe = std::env::current_exe()?;
        let pgha_exe = exe.with_file_name("pgha");
        anyhow::ensure!(
            pgha_exe.is_file(),
            "{} not found: build it with `cargo build --release --bins`",
            pgha_exe.display()
        );
        if nix::unistd::geteuid().is_root() {
            anyhow::ensure!(
                nix::unistd::User::from_name("postgres")?.is_some(),
                "the agents run PostgreSQL as OS user `postgres`, which does not exist"
            );
        }
        // Short on purpose: PostgreSQL's unix socket path lives below it and
        // must fit in 107 bytes. 0755 so that `postgres` can traverse it.
        let dir = PathBuf::from(format!("/tmp/pgb-{}", random_hex(4)?));
        std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;

        let superuser_password = random_hex(16)?;
        let replication_password = random_hex(16)?;
        // Shared by every member: failsafe mode's confirmations between
        // members are authenticated API calls.
        let api_token = random_hex(16)?;
        let etcd_ports = (free_port()?, free_port()?);
        let mut node_list = Vec::new();
        for n in 1..=nodes {
            let name = format!("node{n}");
            let node_dir = dir.join(&name);
            std::fs::create_dir(&node_dir)?;
            std::fs::set_permissions(&node_dir, std::fs::Permissions::from_mode(0o755))?;
            let host = placement.map(|p| &p.hosts[n - 1]);
            let addr = host.map_or("127.0.0.1".to_string(), |h| h.addr.clone());
            // Every namespace has its own port space: the standard ports.
            let (pg_port, api_port) = match host {
                Some(_) => (5432, 8008),
                None => (free_port()?, free_port()?),
            };
            let config_path = dir.join(format!("{name}.toml"));
            let data_dir = match placement {
                Some(p) => node_dir.join(&p.data_parent).join("data"),
                None => node_dir.join("data"),
            };
            let endpoints = match placement {
                Some(p) => p
                    .etcd_endpoints
                    .iter()
                    .map(|e| format!("{e:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                None => format!("\"http://127.0.0.1:{}\"", etcd_ports.0),
            };
            let networks = match placement {
                Some(p) => format!(
                    "listen_addresses = \"{addr}\"\nreplication_networks = [\"{0}\"]\nclient_networks = [\"{0}\"]\n",
                    p.network
                ),
                None => String::new(),
            };
            let text = format!(
                r#"# Generated by pgha-bench.
cluster = "{CLUSTER_NAME}"
name = "{name}"
state_dir = "{state}"

[etcd]
endpoints = [{endpoints}]

[ha]
{timing}
[postgres]
data_dir = "{data}"
port = {pg_port}
{networks}superuser = {{ username = "{SUPERUSER}", password = "{superuser_password}" }}
replication = {{ username = "replicator", password = "{replication_password}" }}

[api]
listen = "{addr}:{api_port}"
token = "{api_token}"
{parameters}{bootstrap}"#,
                state = node_dir.join("state").display(),
                data = data_dir.display(),
                timing = timing.toml(),
                bootstrap = wal_segment_size.map_or(String::new(), |size| {
                    format!("\n[bootstrap]\nwal_segment_size = {size:?}\n")
                }),
                parameters = if pg_parameters.is_empty() {
                    String::new()
                } else {
                    let lines: Vec<String> = pg_parameters
                        .iter()
                        .map(|(k, v)| format!("{k} = {v}\n"))
                        .collect();
                    format!("\n[postgres.parameters]\n{}", lines.concat())
                },
            );
            std::fs::write(&config_path, text)?;
            std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o600))?;
            node_list.push(Node {
                socket_dir: node_dir.join("state").join("postgres").join("run"),
                dir: node_dir.clone(),
                addr,
                launcher: host.map(|h| h.launcher.clone()).unwrap_or_default(),
                name,
                config_path,
                data_dir,
                pg_port,
                log_path: node_dir.join("agent.log"),
                agent: Mutex::new(None),
            });
        }
        // Let pgha validate the overrides now (e.g. ttl < loop_wait +
        // retry_timeout + fence_margin), and report the effective values.
        let cfg = pgha::config::Config::load(&node_list[0].config_path)
            .context("generated configuration rejected")?;
        let pgpass = dir.join("pgpass");
        std::fs::write(
            &pgpass,
            format!("127.0.0.1:*:*:{SUPERUSER}:{superuser_password}\n"),
        )?;
        std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600))?;
        Ok(Cluster {
            dir,
            nodes: node_list,
            superuser_password,
            pgpass,
            ha: cfg.ha,
            cluster_config,
            pgha_exe,
            etcd_ports: Mutex::new(etcd_ports),
            etcd: Mutex::new(None),
            external_etcd: placement.is_some(),
            dcs: tokio::sync::OnceCell::new(),
            shut_down: false.into(),
        })
    }

    pub fn pgha_exe(&self) -> &Path {
        &self.pgha_exe
    }

    /// The etcd client URL (for a standalone proxy's configuration).
    pub fn etcd_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.etcd_ports.lock().unwrap().0)
    }

    /// Starts etcd and every agent, then waits for one leader and N-1
    /// streaming replicas.
    pub async fn start(&self) -> anyhow::Result<()> {
        if !self.external_etcd {
            self.start_etcd().await?;
        }
        for i in 0..self.nodes.len() {
            self.start_agent(i)?;
        }
        log(&format!(
            "started {} agents in {}; waiting for a healthy cluster",
            self.nodes.len(),
            self.dir.display()
        ));
        let st = self.wait_healthy(Duration::from_secs(300)).await?;
        log(&format!("cluster healthy: {}", st.summary()));
        if !self.cluster_config.is_empty() {
            self.set_cluster_config().await?;
            let st = self.wait_healthy(Duration::from_secs(120)).await?;
            log(&format!("cluster healthy: {}", st.summary()));
        }
        Ok(())
    }

    /// `pgha config set -c node1.toml KEY=VALUE...`, through the real CLI
    /// like an operator would.
    async fn set_cluster_config(&self) -> anyhow::Result<()> {
        self.config_set(&self.cluster_config).await
    }

    /// `pgha config set -c node1.toml KEY=VALUE...` with any settings.
    pub async fn config_set(&self, settings: &[String]) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.pgha_exe);
        cmd.arg("config")
            .arg("set")
            .arg("-c")
            .arg(&self.nodes[0].config_path)
            .args(settings)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = crate::reaper::spawn_own(&mut cmd)
            .context("run pgha config set")?
            .wait_with_output()
            .await?;
        anyhow::ensure!(
            out.status.success(),
            "pgha config set {:?} failed ({}): {}",
            settings,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        log(&format!(
            "cluster configuration set: {}",
            settings.join(" ")
        ));
        Ok(())
    }

    /// Starts etcd on the chosen ports; a port taken between choosing and
    /// binding makes etcd exit at once, so retry on fresh ports.
    async fn start_etcd(&self) -> anyhow::Result<()> {
        let log_path = self.dir.join("etcd.log");
        for attempt in 0..3 {
            let (client, peer) = *self.etcd_ports.lock().unwrap();
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut cmd = Command::new("etcd");
            cmd.arg("--name=bench")
                .arg(format!("--data-dir={}", self.dir.join("etcd").display()))
                .arg(format!("--listen-client-urls={client_url}"))
                .arg(format!("--advertise-client-urls={client_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=bench={peer_url}"));
            let child = spawn_logged(cmd, &log_path)
                .context("start etcd (install it with: apt-get install etcd-server)")?;
            *self.etcd.lock().unwrap() = Some(child);
            let http = reqwest::Client::new();
            let deadline = now_ms() + 20_000.0;
            while now_ms() < deadline {
                if self.try_reap_etcd() {
                    break;
                }
                // /health answers true only once etcd has elected itself.
                if let Ok(r) = http
                    .get(format!("{client_url}/health"))
                    .timeout(Duration::from_millis(500))
                    .send()
                    .await
                    && let Ok(body) = r.text().await
                    && body.contains("\"true\"")
                {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            log(&format!(
                "etcd did not start (attempt {}); retrying on new ports",
                attempt + 1
            ));
            self.stop_etcd().await;
            let _ = std::fs::remove_dir_all(self.dir.join("etcd"));
            *self.etcd_ports.lock().unwrap() = (free_port()?, free_port()?);
            // The agents' configs name the client port: rewrite them.
            for node in &self.nodes {
                let text = std::fs::read_to_string(&node.config_path)?;
                let text = text.replace(
                    &format!("127.0.0.1:{client}\""),
                    &format!("127.0.0.1:{}\"", self.etcd_ports.lock().unwrap().0),
                );
                std::fs::write(&node.config_path, text)?;
            }
        }
        bail!("etcd did not start; see {}", log_path.display())
    }

    /// True when etcd has exited (and reaps it).
    fn try_reap_etcd(&self) -> bool {
        let mut etcd = self.etcd.lock().unwrap();
        match etcd.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(_))) => {
                *etcd = None;
                true
            }
            _ => false,
        }
    }

    pub fn start_agent(&self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        let mut slot = node.agent.lock().unwrap();
        anyhow::ensure!(slot.is_none(), "{}'s agent is already running", node.name);
        let mut cmd = match node.launcher.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&self.pgha_exe);
                c
            }
            None => Command::new(&self.pgha_exe),
        };
        cmd.arg("agent").arg("-c").arg(&node.config_path);
        *slot = Some(spawn_logged(cmd, &node.log_path)?);
        Ok(())
    }

    /// Starts the agent of every node whose agent is not running.
    pub fn start_missing_agents(&self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            if self.agent_pid(i).is_none() {
                log(&format!("restarting {}'s agent", self.nodes[i].name));
                self.start_agent(i)?;
            }
        }
        Ok(())
    }

    /// The pid of node `i`'s agent while it runs (an agent that exited on
    /// its own is reaped here and reported as not running).
    pub fn agent_pid(&self, i: usize) -> Option<i32> {
        let mut slot = self.nodes[i].agent.lock().unwrap();
        if let Some(Ok(Some(status))) = slot.as_mut().map(|c| c.try_wait()) {
            log(&format!("{}'s agent exited: {status}", self.nodes[i].name));
            *slot = None;
        }
        slot.as_ref().and_then(|c| c.id()).map(|p| p as i32)
    }

    pub fn postmaster_pid(&self, i: usize) -> Option<i32> {
        pgha::postgres::ctl::postmaster_pid(&self.nodes[i].data_dir)
    }

    pub fn index_of(&self, name: &str) -> anyhow::Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node named {name}"))
    }

    /// PostgreSQL crash: SIGKILL the postmaster and all its children at
    /// once; the agent stays alive. Returns the time of the first signal.
    pub fn kill_postgres(&self, i: usize) -> anyhow::Result<f64> {
        let pm = self
            .postmaster_pid(i)
            .with_context(|| format!("{} has no running postmaster", self.nodes[i].name))?;
        let mut v = Victims::default();
        v.add_postgres(pm);
        let at = now_ms();
        v.kill();
        Ok(at)
    }

    /// Host loss: the agent (and its children), its fence keeper and
    /// PostgreSQL die at the same instant. Returns the time of the first
    /// signal; the processes are listed beforehand, so that writes
    /// acknowledged during the /proc scans do not count as acknowledged
    /// after the event.
    pub fn kill_host(&self, i: usize) -> anyhow::Result<f64> {
        let agent = self
            .agent_pid(i)
            .with_context(|| format!("{}'s agent is not running", self.nodes[i].name))?;
        let mut v = Victims::default();
        v.groups.push(agent);
        v.pids.extend(fence_keepers_under(&self.nodes[i].data_dir));
        if let Some(pm) = self.postmaster_pid(i) {
            v.add_postgres(pm);
        }
        let at = now_ms();
        v.kill();
        // Reap the agent in the background; its slot is free for a restart.
        if let Some(mut child) = self.nodes[i].agent.lock().unwrap().take() {
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
        }
        Ok(at)
    }

    async fn dcs(&self) -> anyhow::Result<&EtcdDcs> {
        self.dcs
            .get_or_try_init(|| async {
                let cfg = pgha::config::Config::load(&self.nodes[0].config_path)?;
                pgha::cli::connect_dcs(&cfg).await
            })
            .await
    }

    /// The member table, as `pgha list --json` builds it, read through one
    /// long-lived etcd connection (polling a subprocess every 100 ms would
    /// cost CPU the cluster under test needs).
    pub async fn status(&self) -> anyhow::Result<Status> {
        let view = tokio::time::timeout(Duration::from_secs(3), self.dcs().await?.read_cluster())
            .await
            .context("etcd read timed out")??;
        let out = pgha::cli::list::build(CLUSTER_NAME, &view);
        Ok(Status {
            leader: view.leader.map(|l| l.name.to_string()),
            members: out.members,
        })
    }

    /// Waits until [`Status::healthy`] holds.
    pub async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<Status> {
        let deadline = now_ms() + timeout.as_secs_f64() * 1000.0;
        loop {
            let last = match self.status().await {
                Ok(st) if st.healthy(self.nodes.len()) => return Ok(st),
                Ok(st) => st.summary(),
                Err(e) => format!("{e:#}"),
            };
            if now_ms() > deadline {
                bail!("cluster not healthy after {timeout:?}; last status: {last}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// VmRSS of every running agent, in KiB.
    pub fn agent_rss_kib(&self) -> Vec<u64> {
        (0..self.nodes.len())
            .filter_map(|i| {
                let status =
                    std::fs::read_to_string(format!("/proc/{}/status", self.agent_pid(i)?)).ok()?;
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// A libpq-style client configuration reaching whichever node is
    /// writable.
    pub fn writer_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        for n in &self.nodes {
            c.host(&n.addr).port(n.pg_port);
        }
        c.user(SUPERUSER)
            .password(&self.superuser_password)
            .dbname("postgres")
            .application_name("pgha-bench")
            .connect_timeout(CLIENT_CONNECT_TIMEOUT)
            .target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        c
    }

    /// Stops everything: agents first (SIGTERM: they stop PostgreSQL
    /// cleanly), then leftovers (postmasters, fence keepers), then etcd.
    /// Idempotent.
    pub async fn shutdown(&self) {
        if self
            .shut_down
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        for i in 0..self.nodes.len() {
            if let Some(pid) = self.agent_pid(i) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let deadline = now_ms() + 60_000.0;
        for node in &self.nodes {
            loop {
                let exited = {
                    let mut slot = node.agent.lock().unwrap();
                    match slot.as_mut().map(|c| c.try_wait()) {
                        None | Some(Ok(Some(_))) | Some(Err(_)) => {
                            *slot = None;
                            true
                        }
                        Some(Ok(None)) => false,
                    }
                };
                if exited {
                    break;
                }
                if now_ms() > deadline {
                    log(&format!(
                        "{}'s agent ignored SIGTERM; killing it",
                        node.name
                    ));
                    self.kill_agent_group(node);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.kill_leftovers();
        self.stop_etcd().await;
    }

    /// SIGTERM node `i`'s agent (it stops PostgreSQL) and wait for it to
    /// exit; SIGKILL its process group after `grace`.
    pub async fn stop_agent(&self, i: usize, grace: Duration) {
        let Some(pid) = self.agent_pid(i) else {
            return;
        };
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let deadline = now_ms() + grace.as_secs_f64() * 1000.0;
        while self.agent_pid(i).is_some() {
            if now_ms() > deadline {
                self.kill_agent_group(&self.nodes[i]);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An operator's last resort for a member that cannot rejoin: stop
    /// it, delete its data directory and start its agent again, which
    /// clones the leader.
    pub async fn reclone(&self, i: usize) -> anyhow::Result<()> {
        self.stop_agent(i, Duration::from_secs(30)).await;
        if let Some(pm) = self.postmaster_pid(i) {
            kill_postgres_now(pm);
        }
        match std::fs::remove_dir_all(&self.nodes[i].data_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).context("remove the data directory");
            }
            _ => {}
        }
        self.start_agent(i)
    }

    fn kill_agent_group(&self, node: &Node) {
        if let Some(mut child) = node.agent.lock().unwrap().take() {
            if let Some(pid) = child.id() {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            let _ = child.start_kill();
            let _ = child.try_wait();
        }
    }

    /// PostgreSQL servers and fence keepers survive their agent by design;
    /// find them through the data directories and /proc.
    fn kill_leftovers(&self) {
        for (i, node) in self.nodes.iter().enumerate() {
            if let Some(pm) = self.postmaster_pid(i) {
                log(&format!("killing {}'s leftover postmaster {pm}", node.name));
                kill_postgres_now(pm);
            }
        }
        for k in fence_keepers_under(&self.dir) {
            let _ = kill(Pid::from_raw(k), Signal::SIGKILL);
        }
    }

    async fn stop_etcd(&self) {
        let Some(mut etcd) = self.etcd.lock().unwrap().take() else {
            return;
        };
        if let Some(pid) = etcd.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(5), etcd.wait())
            .await
            .is_err()
        {
            if let Some(pid) = etcd.id() {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            let _ = etcd.wait().await;
        }
    }

    /// Removes the work directory (logs included).
    pub fn remove_dir(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            log(&format!("cannot remove {}: {e}", self.dir.display()));
        }
    }
}

impl Drop for Cluster {
    /// Last resort when [`Cluster::shutdown`] did not run (a panic): no
    /// grace, SIGKILL everything this cluster started.
    fn drop(&mut self) {
        if self.shut_down.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        for node in &self.nodes {
            self.kill_agent_group(node);
        }
        self.kill_leftovers();
        if let Some(mut etcd) = self.etcd.lock().unwrap().take() {
            if let Some(pid) = etcd.id() {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            let _ = etcd.start_kill();
        }
    }
}
