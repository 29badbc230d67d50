//! `pgha-bench route`: the proxy's auto listener (statement routing) on a
//! three-node cluster, beside pgpool-II in load-balancing mode on the same
//! cluster and a direct connection to the leader, all measured in the same
//! round: pgbench select-only (reads spread over the members), TPC-B
//! (everything on the leader: the parsing overhead), and a mixed
//! read-after-write workload counting stale reads with read-your-writes on
//! and off, and with pgpool-II. See bench/README.md.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::process::Command;

use crate::clock::log;
use crate::cluster::{CLUSTER_NAME, Cluster, free_port};
use crate::proxy::{
    Row, Service, last_lines, pgbench, row_mut, spawn, superuser_client, tps, wait_ready,
    write_userlist,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// pgbench run time of each measurement.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    pub clients: Vec<u32>,
    #[arg(long, default_value_t = 10)]
    pub scale: u32,
    /// Clients of the read-after-write workload.
    #[arg(long, default_value_t = 8)]
    pub raw_clients: usize,
    /// pgpool-II's `backend_weight` for the leader (each replica has 1).
    /// 0 sends pgpool's load-balanced reads to the replicas only, as the
    /// auto listener does.
    #[arg(long, default_value_t = 0)]
    pub pgpool_primary_weight: u32,
    /// Leave pgpool-II out (machines without it).
    #[arg(long)]
    pub no_pgpool: bool,
    /// One round of 3 s.
    #[arg(long)]
    pub quick: bool,
}

/// (name, pgbench arguments, targets measured besides `direct`).
const WORKLOADS: [(&str, &[&str], &[&str]); 3] = [
    (
        "select-simple",
        &["-S", "-M", "simple"],
        &["auto", "pgpool"],
    ),
    (
        "select-prepared",
        &["-S", "-M", "prepared"],
        &["auto", "pgpool"],
    ),
    ("tpcb", &["-M", "simple"], &["auto", "rw", "pgpool"]),
];

struct Proxy {
    service: Service,
    auto_port: u16,
}

async fn start_proxy(
    cluster: &Cluster,
    dir: &std::path::Path,
    tag: &str,
    read_your_writes: bool,
) -> anyhow::Result<Proxy> {
    let (rw_port, auto_port) = (free_port()?, free_port()?);
    let config = dir.join(format!("pgha-{tag}.toml"));
    std::fs::write(
        &config,
        format!(
            r#"cluster = "{CLUSTER_NAME}"

[etcd]
endpoints = ["{etcd}"]

[proxy]
name = "bench-{tag}"
listen_rw = "127.0.0.1:{rw_port}"
listen_auto = "127.0.0.1:{auto_port}"
auth_file = "{auth}"
default_pool_size = 40
max_client_conn = 2000
read_your_writes = {read_your_writes}
"#,
            etcd = cluster.etcd_endpoint(),
            auth = dir.join("userlist.txt").display(),
        ),
    )?;
    let name = format!("pgha-{tag}");
    let mut cmd = Command::new(cluster.pgha_exe());
    cmd.args(["proxy", "-c"])
        .arg(&config)
        .env("PGHA_LOG", "warn");
    let service = spawn(&name, rw_port, &mut cmd, dir.join(format!("{name}.log")))?;
    wait_ready(cluster, &service).await?;
    Ok(Proxy { service, auto_port })
}

/// pgpool-II started and answering, or why not (reported in every row
/// it would have had, never fatal).
async fn start_pgpool(
    cluster: &Cluster,
    dir: &std::path::Path,
    leader: usize,
    args: &Args,
) -> Result<crate::pgpool::Pgpool, String> {
    let max_clients = args.clients.iter().copied().max().unwrap_or(0);
    // The read-after-write workload opens a setup connection besides its
    // clients; a few spare slots for stragglers of the previous run.
    let children = max_clients.max(args.raw_clients as u32 + 1) + 4;
    let r = async {
        let p = crate::pgpool::start(cluster, dir, leader, args.pgpool_primary_weight, children)
            .await?;
        wait_ready(cluster, &p.service).await?;
        Ok::<_, anyhow::Error>(p)
    }
    .await;
    r.map_err(|e| format!("{e:#}"))
}

/// The read-after-write figures of one target over the rounds.
#[derive(Default)]
struct RawRuns {
    ops_per_s: Vec<f64>,
    stale: Vec<f64>,
    stale_share: Vec<f64>,
    errors: Vec<String>,
}

impl RawRuns {
    fn record(&mut self, label: &str, r: anyhow::Result<RawResult>) {
        match r {
            Ok(r) => {
                log(&format!(
                    "read-after-write via {label}: {:.0} ops/s, {} stale reads of {}",
                    r.ops_per_s, r.stale, r.ops
                ));
                self.ops_per_s.push(r.ops_per_s);
                self.stale.push(r.stale as f64);
                self.stale_share
                    .push(r.stale as f64 / (r.ops as f64).max(1.0));
            }
            Err(e) => {
                let e = format!("{e:#}");
                log(&format!("read-after-write via {label} failed: {e}"));
                self.errors.push(e);
            }
        }
    }

    fn json(&self) -> Value {
        json!({
            "ops_per_s": crate::report::summary(&self.ops_per_s),
            "stale_reads": crate::report::summary(&self.stale),
            "stale_share": crate::report::summary_decimals(&self.stale_share, 4),
            "failed": !self.errors.is_empty(),
            "errors": self.errors.iter().map(|e| last_lines(e, 3)).collect::<Vec<_>>(),
        })
    }
}

pub async fn run(cluster: Arc<Cluster>, args: &Args) -> anyhow::Result<Value> {
    let (rounds, secs) = if args.quick {
        (1, 3)
    } else {
        (args.rounds, args.duration.as_secs().max(1))
    };
    cluster.start().await?;
    let status = cluster.wait_healthy(Duration::from_secs(120)).await?;
    let leader = status.leader.clone().context("no leader")?;
    let leader_index = cluster.index_of(&leader)?;
    let leader_port = cluster.nodes[leader_index].pg_port;
    let dir = cluster.dir.join("route-bench");
    std::fs::create_dir_all(&dir)?;
    // pgpool runs as `postgres` and keeps its sockets below this.
    crate::proxy::chown_postgres(&dir)?;
    log(&format!("pgbench -i -s {} on the leader", args.scale));
    pgbench(
        &cluster,
        leader_port,
        &["-i", "-q", "-s", &args.scale.to_string()],
    )
    .await?;
    write_userlist(&cluster, leader_port, &dir.join("userlist.txt")).await?;
    let with = start_proxy(&cluster, &dir, "auto", true).await?;
    let without = start_proxy(&cluster, &dir, "auto-noryw", false).await?;
    // Replicas must have replayed the pgbench tables before they qualify.
    cluster.wait_healthy(Duration::from_secs(120)).await?;
    let pgpool = if args.no_pgpool {
        None
    } else {
        let p = start_pgpool(&cluster, &dir, leader_index, args).await;
        if let Err(e) = &p {
            log(&format!("pgpool-II did not start: {e}"));
        }
        Some(p)
    };
    let versions = json!({
        "pgbench": version_of("pgbench").await,
        "pgpool": if args.no_pgpool { None } else { version_of("pgpool").await },
    });

    let mut rows: Vec<Row> = Vec::new();
    let (mut raw_on, mut raw_off, mut raw_pgpool) =
        (RawRuns::default(), RawRuns::default(), RawRuns::default());
    // Every figure assumes the leader of the start: the direct target and
    // pgpool's primary are that server. A leader change (an etcd stall on a
    // loaded machine can cost the lease) ends the measurements, and the
    // report says so instead of carrying figures of a different cluster.
    let mut aborted: Option<String> = None;
    'rounds: for round in 0..rounds {
        log(&format!("round {}/{rounds}", round + 1));
        for (w, wargs, targets) in WORKLOADS {
            for &c in &args.clients {
                // Direct first (every ratio divides by it), then the others
                // in an order that rotates from round to round, so that a
                // drift of the machine's load favours none of them.
                let mut order: Vec<&str> = targets
                    .iter()
                    .copied()
                    .filter(|t| *t != "pgpool" || pgpool.is_some())
                    .collect();
                let n = round % order.len().max(1);
                order.rotate_left(n);
                order.insert(0, "direct");
                let mut direct = None;
                for t in order {
                    let port = match t {
                        "direct" => Ok(leader_port),
                        "auto" => Ok(with.auto_port),
                        "rw" => Ok(with.service.port),
                        _ => match &pgpool {
                            Some(Ok(p)) => Ok(p.service.port),
                            Some(Err(e)) => Err(anyhow::anyhow!("pgpool-II did not start: {e}")),
                            None => unreachable!("filtered above"),
                        },
                    };
                    let mut a: Vec<String> = vec![
                        "-n".into(),
                        "-c".into(),
                        c.to_string(),
                        "-j".into(),
                        "2".into(),
                        "-T".into(),
                        secs.to_string(),
                    ];
                    a.extend(wargs.iter().map(|s| s.to_string()));
                    let a: Vec<&str> = a.iter().map(String::as_str).collect();
                    let mut result = match port {
                        Ok(port) => pgbench(&cluster, port, &a).await.and_then(|out| {
                            tps(&out).with_context(|| format!("no tps in pgbench output: {out}"))
                        }),
                        Err(e) => Err(e),
                    };
                    if let Some(moved) = leader_moved(&cluster, &leader).await {
                        result = Err(anyhow::anyhow!("{moved}"));
                        aborted = Some(moved);
                    }
                    let row = row_mut(&mut rows, w, c, t);
                    match result {
                        Ok(v) => {
                            log(&format!("{w} c={c} {t}: {v:.0} tps"));
                            if t == "direct" {
                                direct = Some(v);
                            }
                            row.tps.push(v);
                            if let Some(d) = direct.filter(|d| *d > 0.0) {
                                row.ratio.push(v / d);
                            }
                        }
                        Err(e) => {
                            let e = format!("{e:#}");
                            log(&format!("{w} c={c} {t}: failed: {e}"));
                            row.errors.push(e);
                        }
                    }
                    if aborted.is_some() {
                        break 'rounds;
                    }
                }
            }
        }
        let mut raws: Vec<(&str, &mut RawRuns, Result<u16, String>)> = vec![
            ("auto, read-your-writes on", &mut raw_on, Ok(with.auto_port)),
            (
                "auto, read-your-writes off",
                &mut raw_off,
                Ok(without.auto_port),
            ),
        ];
        match &pgpool {
            Some(Ok(p)) => raws.push(("pgpool-II", &mut raw_pgpool, Ok(p.service.port))),
            Some(Err(e)) => raws.push((
                "pgpool-II",
                &mut raw_pgpool,
                Err(format!("pgpool-II did not start: {e}")),
            )),
            None => {}
        }
        for (label, runs, port) in raws {
            let mut r = match port {
                Ok(port) => read_after_write(&cluster, port, args.raw_clients, secs).await,
                Err(e) => Err(anyhow::anyhow!("{e}")),
            };
            if let Some(moved) = leader_moved(&cluster, &leader).await {
                r = Err(anyhow::anyhow!("{moved}"));
                aborted = Some(moved);
            }
            runs.record(label, r);
            if aborted.is_some() {
                break 'rounds;
            }
        }
    }
    if let Some(a) = &aborted {
        log(&format!("measurements stopped: {a}"));
    }
    // Where pgpool sent the reads (select_cnt per node, with its view of
    // each node's role): the evidence that it balanced at all.
    let pgpool_nodes = match &pgpool {
        Some(Ok(p)) => match show_pool_nodes(&cluster, p.service.port).await {
            Ok(v) => v,
            Err(e) => json!({ "error": format!("{e:#}") }),
        },
        _ => Value::Null,
    };
    drop(pgpool);
    drop(without);
    drop(with);

    let table: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "workload": r.workload,
                "clients": r.clients,
                "target": r.target,
                "tps": crate::report::summary(&r.tps),
                "ratio_to_direct": if r.target == "direct" {
                    Value::Null
                } else {
                    crate::report::summary_decimals(&r.ratio, 3)
                },
                // A failed round is reported as failed, never as a number.
                "failed": !r.errors.is_empty(),
                "errors": r.errors.iter().map(|e| last_lines(e, 3)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut read_after_write = json!({
        "read_your_writes_on": raw_on.json(),
        "read_your_writes_off": raw_off.json(),
    });
    if !args.no_pgpool {
        read_after_write["pgpool"] = raw_pgpool.json();
    }
    Ok(json!({
        "bench": "route",
        "machine": crate::report::machine(),
        "config": crate::report::config(&cluster, json!({
            "rounds": rounds, "seconds": secs, "scale": args.scale,
            "clients": args.clients, "pgbench_threads": 2,
            "raw_clients": args.raw_clients,
            "pgpool_primary_weight": if args.no_pgpool { Value::Null } else { json!(args.pgpool_primary_weight) },
        })),
        "versions": versions,
        "pgbench": table,
        "read_after_write": read_after_write,
        "pgpool_nodes": pgpool_nodes,
        "aborted": aborted,
    }))
}

/// Why the figures stop being comparable, if the leader is no longer the
/// one of the start. An unreadable etcd is no verdict: the next check
/// decides.
async fn leader_moved(cluster: &Cluster, leader: &str) -> Option<String> {
    let now = cluster.status().await.ok()?.leader;
    (now.as_deref() != Some(leader)).then(|| {
        format!(
            "the leader changed from {leader} to {} during the measurements",
            now.as_deref().unwrap_or("none")
        )
    })
}

/// pgpool's `SHOW pool_nodes`, one object per backend (column → text).
async fn show_pool_nodes(cluster: &Cluster, port: u16) -> anyhow::Result<Value> {
    let client = superuser_client(cluster, port).await?;
    let mut nodes = Vec::new();
    for m in client.simple_query("SHOW pool_nodes").await? {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            let mut o = serde_json::Map::new();
            for (i, c) in r.columns().iter().enumerate() {
                o.insert(c.name().to_string(), json!(r.get(i)));
            }
            nodes.push(Value::Object(o));
        }
    }
    Ok(Value::Array(nodes))
}

/// The first line of `CMD --version`. Spawned as the bench's own child:
/// the orphan reaper would otherwise take its exit status.
async fn version_of(cmd: &str) -> Option<String> {
    let mut c = Command::new(cmd);
    c.arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = crate::reaper::spawn_own(&mut c)
        .ok()?
        .wait_with_output()
        .await
        .ok()?;
    let text = [out.stdout, out.stderr].concat();
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

struct RawResult {
    ops_per_s: f64,
    ops: u64,
    stale: u64,
}

/// `clients` tasks, each with its own row: increment it, read it back
/// through the same connection.
async fn read_after_write(
    cluster: &Cluster,
    port: u16,
    clients: usize,
    secs: u64,
) -> anyhow::Result<RawResult> {
    let setup = superuser_client(cluster, port).await?;
    setup
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS raw_bench (k int PRIMARY KEY, v bigint);
             INSERT INTO raw_bench SELECT g, 0 FROM generate_series(1, 1000) g
                 ON CONFLICT (k) DO UPDATE SET v = 0",
        )
        .await?;
    let stale = Arc::new(AtomicU64::new(0));
    let ops = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for k in 1..=clients {
        let client = superuser_client(cluster, port).await?;
        let (stale, ops) = (stale.clone(), ops.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let written = first_value(
                    &client,
                    &format!("UPDATE raw_bench SET v = v + 1 WHERE k = {k} RETURNING v"),
                )
                .await?;
                let read =
                    first_value(&client, &format!("SELECT v FROM raw_bench WHERE k = {k}")).await?;
                if read < written {
                    stale.fetch_add(1, Ordering::Relaxed);
                }
                ops.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let ops = ops.load(Ordering::Relaxed);
    Ok(RawResult {
        ops_per_s: ops as f64 / secs as f64,
        ops,
        stale: stale.load(Ordering::Relaxed),
    })
}

async fn first_value(client: &tokio_postgres::Client, sql: &str) -> anyhow::Result<i64> {
    for m in client.simple_query(sql).await? {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            return Ok(r.get(0).unwrap_or("0").parse()?);
        }
    }
    anyhow::bail!("{sql}: no row")
}
