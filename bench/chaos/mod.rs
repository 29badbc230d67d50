//! `pgha-bench chaos`: network and process faults against a cluster whose
//! members are separate hosts (network namespaces, bench/netns.rs), with
//! writers running, and a history check after every fault.
//!
//! Topology: three etcd members (`etcd1..3`), three nodes (`node1..3`: a
//! real `pgha agent` and its PostgreSQL, listening on the node's address,
//! its data directory on a size-limited tmpfs), and a `client` namespace
//! in which this whole process runs (the main thread enters it before the
//! runtime starts, so every socket the bench opens is a client's socket).
//! Writers: one per node over the node's unix socket (what an isolated old
//! primary still acknowledges is seen) and one client writer through a
//! multi-host `target_session_attrs=read-write` connection.
//!
//! Per fault: wait for a healthy cluster, let writes settle, wait a random
//! moment, inject, hold for a random duration, heal, then wait up to
//! [`HEAL_DEADLINE`] for full health (one leader, every other member
//! streaming). The history of that window then gives: acknowledged writes
//! missing on the leader, overlapping acknowledging periods of two servers
//! and the client's longest gap without an acknowledgement; the agents'
//! logs of the window give what the HA loop did (bench/chaos/logs.rs).

mod faults;
mod logs;
mod run;

use run::run;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use tokio::process::Child;

use crate::clock::log;
use crate::cluster::{Cluster, PlacedHost, Placement, Timing};
use crate::netns::{Host, Net};

/// After a fault is healed the cluster must be back to full health within
/// this time, or the fault counts as unrecovered.
const HEAL_DEADLINE: Duration = Duration::from_secs(60);
/// Healthy and writing for this long before each injection.
const SETTLE: Duration = Duration::from_secs(2);
/// Size of every node's data file system (the disk-full fault fills it).
/// A run fails over about 25 times in 20 minutes while writing only ~100 MB
/// of WAL: every new timeline starts with a full 16 MB segment, and
/// `wal_keep_size` (128 MB) keeps every segment whose number is that
/// recent, on every timeline, so pg_wal holds about 25 x 16 MB that a
/// real cluster (many segments between two failovers) would have
/// recycled. 512 MB filled up at fault 54 of 100.
const DISK_SIZE: &str = "2g";
const CLIENT_WRITE_INTERVAL: Duration = Duration::from_millis(10);
const NODE_WRITE_INTERVAL: Duration = Duration::from_millis(20);
const NODES: usize = 3;
const ETCD_MEMBERS: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// The leader's node loses its network (etcd, peers and clients).
    IsolateLeader,
    /// The leader cannot reach any etcd member; peers and clients can.
    CutLeaderFromEtcd,
    /// No node reaches any etcd member; nodes and clients still reach
    /// each other. Held for the next of `--etcd-cut`'s durations.
    CutAllFromEtcd,
    /// One replica cannot reach the leader; both reach etcd.
    CutReplicaFromLeader,
    /// The leader sends but receives nothing.
    LeaderDeaf,
    /// The leader receives but nothing it sends arrives.
    LeaderMute,
    /// One etcd member is isolated.
    LoseEtcdMember,
    /// Two of three etcd members are isolated: no quorum.
    LoseEtcdQuorum,
    /// Every etcd process is killed; restarted on heal.
    StopAllEtcd,
    /// SIGSTOP the leader's agent only.
    FreezeLeaderAgent,
    /// SIGSTOP every process of the leader's node.
    FreezeLeaderNode,
    /// SIGKILL every process of the leader's node; its agent is restarted on heal.
    KillLeaderNode,
    /// SIGKILL the leader's postmaster and backends.
    CrashLeaderPostgres,
    /// Fill the leader's data file system; the filler is removed on heal.
    FillLeaderDisk,
    /// Delay and loss (netem), or loss and a 1 Mbit/s link, on the leader.
    SlowLeaderNetwork,
}

impl Fault {
    pub const ALL: [Fault; 15] = [
        Fault::IsolateLeader,
        Fault::CutLeaderFromEtcd,
        Fault::CutAllFromEtcd,
        Fault::CutReplicaFromLeader,
        Fault::LeaderDeaf,
        Fault::LeaderMute,
        Fault::LoseEtcdMember,
        Fault::LoseEtcdQuorum,
        Fault::StopAllEtcd,
        Fault::FreezeLeaderAgent,
        Fault::FreezeLeaderNode,
        Fault::KillLeaderNode,
        Fault::CrashLeaderPostgres,
        Fault::FillLeaderDisk,
        Fault::SlowLeaderNetwork,
    ];

    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of faults to inject.
    #[arg(long, default_value_t = 100)]
    pub faults: usize,
    #[arg(long, default_value = "on", value_parser = ["off", "on", "strict"])]
    pub sync: String,
    /// Cluster-wide `failsafe_mode`, set either way (reported as
    /// `default` when the setting fails). pgha's default is on.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub failsafe: String,
    /// Seed for fault order (with `--random-order`), moments, durations
    /// and targets; printed and reported, so a run can be repeated.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Pick each fault at random instead of round-robin.
    #[arg(long)]
    pub random_order: bool,
    /// Only these fault types (comma-separated); all by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Fault>,
    /// Shortest and longest time a fault is held, in seconds.
    #[arg(long, default_value_t = 5)]
    pub min_duration: u64,
    #[arg(long, default_value_t = 12)]
    pub max_duration: u64,
    /// How long `cut-all-from-etcd` is held: these durations in turn
    /// (humantime, comma-separated), instead of a random duration.
    #[arg(long, value_delimiter = ',', value_parser = humantime::parse_duration,
          default_value = "2.5s,5s,30s")]
    pub etcd_cut: Vec<Duration>,
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// `bootstrap.wal_segment_size` of the cluster, e.g. `4MB` (default:
    /// PostgreSQL's 16MB).
    #[arg(long)]
    pub wal_segment_size: Option<String>,
    /// Keep the work directory (logs) after a successful run.
    #[arg(long)]
    pub keep: bool,
}

/// One etcd member: a process in its own namespace, restartable with the
/// same arguments (its data directory survives).
struct EtcdMember {
    host: Host,
    args: Vec<String>,
    log_path: PathBuf,
    child: Mutex<Option<Child>>,
}

impl EtcdMember {
    fn start(&self) -> anyhow::Result<()> {
        let mut cmd = tokio::process::Command::from(self.host.command("etcd"));
        cmd.args(&self.args);
        *self.child.lock().unwrap() = Some(crate::cluster::spawn_logged(cmd, &self.log_path)?);
        Ok(())
    }

    fn kill(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.start_kill();
            tokio::spawn(async move {
                let _ = c.wait().await;
            });
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}:2379", self.host.addr)
    }
}

struct Topology {
    net: Arc<Net>,
    etcd: Vec<EtcdMember>,
    nodes: Vec<Host>,
    cluster: Arc<Cluster>,
    /// Each node's tmpfs mount point (its data directory's parent).
    disks: Vec<PathBuf>,
    netem: bool,
}

/// Entry point (before any runtime exists: the main thread must enter the
/// client namespace first, see the module docs).
pub fn main(args: Args) -> i32 {
    crate::report::init_machine();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    let net = match Net::new("chaos") {
        Ok(n) => Arc::new(n),
        Err(e) => {
            eprintln!("error: cannot create the network namespaces: {e:#}");
            return crate::EXIT_ERROR;
        }
    };
    let topo = match build(&net, &args) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return crate::EXIT_ERROR;
        }
    };
    let client = net.host("client").expect("client host");
    if let Err(e) = client.enter() {
        eprintln!("error: {e:#}");
        return crate::EXIT_ERROR;
    }
    if let Err(e) = crate::reaper::become_subreaper() {
        eprintln!("error: PR_SET_CHILD_SUBREAPER: {e}");
        return crate::EXIT_ERROR;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let topo = Arc::new(topo);
    let result = runtime.block_on(async {
        crate::reaper::spawn();
        let work = tokio::spawn(run(topo.clone(), args_summary(&args, seed), seed));
        let result = tokio::select! {
            r = work => r.unwrap_or_else(|e| Err(anyhow::anyhow!("chaos run panicked: {e}"))),
            s = crate::termination() => Err(anyhow::anyhow!("interrupted by {s}")),
        };
        log("stopping the cluster");
        topo.cluster.shutdown().await;
        for m in &topo.etcd {
            m.kill();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        result
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    for disk in &topo.disks {
        unmount(disk);
    }
    net.teardown();
    let code = match &result {
        Ok(report) => exit_code(report),
        Err(_) => crate::EXIT_ERROR,
    };
    match result {
        Ok(report) => {
            let text = serde_json::to_string_pretty(&report).expect("JSON");
            println!("{text}");
            if let Some(path) = &args.json_out
                && let Err(e) = std::fs::write(path, format!("{text}\n"))
            {
                eprintln!("error: cannot write {}: {e}", path.display());
            }
        }
        Err(e) => eprintln!("error: {e:#}"),
    }
    if code == 0 && !args.keep {
        topo.cluster.remove_dir();
    } else {
        log(&format!(
            "work directory kept: {}",
            topo.cluster.dir.display()
        ));
    }
    code
}

fn exit_code(report: &Value) -> i32 {
    if report["lost_acknowledged"].as_u64().unwrap_or(0) > 0 {
        crate::EXIT_LOST_WRITES
    } else if report["overlap_ms"].as_f64().unwrap_or(0.0) > 0.0
        || report["unrecovered"].as_u64().unwrap_or(0) > 0
        || !report["aborted"].is_null()
    {
        crate::EXIT_ERROR
    } else {
        0
    }
}

/// What `run` needs from the arguments (they stay with `main`).
#[derive(Clone)]
struct Plan {
    faults: usize,
    kinds: Vec<Fault>,
    random_order: bool,
    sync: String,
    failsafe: bool,
    durations: (u64, u64),
    etcd_cuts: Vec<Duration>,
}

fn args_summary(args: &Args, seed: u64) -> Plan {
    log(&format!("seed {seed}"));
    Plan {
        faults: args.faults,
        kinds: if args.only.is_empty() {
            Fault::ALL.to_vec()
        } else {
            args.only.clone()
        },
        random_order: args.random_order,
        sync: args.sync.clone(),
        failsafe: args.failsafe == "on",
        durations: (args.min_duration, args.max_duration.max(args.min_duration)),
        etcd_cuts: args.etcd_cut.clone(),
    }
}

/// Namespaces, configurations and data file systems; starts nothing.
fn build(net: &Arc<Net>, args: &Args) -> anyhow::Result<Topology> {
    let etcd_hosts: Vec<Host> = (1..=ETCD_MEMBERS)
        .map(|k| net.add_host(&format!("etcd{k}")))
        .collect::<Result<_, _>>()?;
    let nodes: Vec<Host> = (1..=NODES)
        .map(|k| net.add_host(&format!("node{k}")))
        .collect::<Result<_, _>>()?;
    let client = net.add_host("client")?;
    let netem = net.has_netem(&client);
    let placement = Placement {
        hosts: nodes
            .iter()
            .map(|h| PlacedHost {
                addr: h.addr.to_string(),
                launcher: vec!["ip".into(), "netns".into(), "exec".into(), h.ns.clone()],
            })
            .collect(),
        etcd_endpoints: etcd_hosts
            .iter()
            .map(|h| format!("http://{}:2379", h.addr))
            .collect(),
        network: format!("{}.0/24", {
            let [a, b, c] = crate::netns::SUBNET_PREFIX;
            format!("{a}.{b}.{c}")
        }),
        data_parent: "disk".into(),
    };
    let cluster = Cluster::create_placed(
        NODES,
        &Timing::default(),
        vec![format!("synchronous_mode={}", args.sync)],
        &[],
        args.wal_segment_size.as_deref(),
        Some(&placement),
    )?;
    let mut disks = Vec::new();
    for node in &cluster.nodes {
        let disk = node.dir.join("disk");
        std::fs::create_dir_all(&disk)?;
        mount_tmpfs(&disk)?;
        disks.push(disk);
    }
    let initial: Vec<String> = etcd_hosts
        .iter()
        .enumerate()
        .map(|(k, h)| format!("etcd{}=http://{}:2380", k + 1, h.addr))
        .collect();
    let etcd = etcd_hosts
        .into_iter()
        .enumerate()
        .map(|(k, host)| {
            let a = host.addr;
            EtcdMember {
                args: vec![
                    format!("--name=etcd{}", k + 1),
                    format!(
                        "--data-dir={}",
                        cluster.dir.join(format!("etcd{}", k + 1)).display()
                    ),
                    format!("--listen-client-urls=http://{a}:2379"),
                    format!("--advertise-client-urls=http://{a}:2379"),
                    format!("--listen-peer-urls=http://{a}:2380"),
                    format!("--initial-advertise-peer-urls=http://{a}:2380"),
                    format!("--initial-cluster={}", initial.join(",")),
                    format!("--initial-cluster-token={}", net.prefix()),
                    "--initial-cluster-state=new".into(),
                ],
                log_path: cluster.dir.join(format!("etcd{}.log", k + 1)),
                host,
                child: Mutex::new(None),
            }
        })
        .collect();
    Ok(Topology {
        net: net.clone(),
        etcd,
        nodes,
        cluster: Arc::new(cluster),
        disks,
        netem,
    })
}

fn mount_tmpfs(dir: &Path) -> anyhow::Result<()> {
    use std::ffi::CString;
    let target = CString::new(dir.as_os_str().as_encoded_bytes())?;
    let options = CString::new(format!("size={DISK_SIZE},mode=0755"))?;
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mount a tmpfs on {}", dir.display()));
    }
    Ok(())
}

fn unmount(dir: &Path) {
    if let Ok(target) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) {
        // SAFETY: a NUL-terminated path; MNT_DETACH never blocks.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}
