//! `pgha-bench route`: the proxy's auto listener (statement routing) on a
//! three-node cluster, against a direct connection to the leader measured
//! in the same round: pgbench select-only (reads spread over the members),
//! TPC-B (everything on the leader: the parsing overhead), and a mixed
//! read-after-write workload counting stale reads with read-your-writes on
//! and off. See bench/README.md.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::process::Command;

use crate::clock::log;
use crate::cluster::{CLUSTER_NAME, Cluster, free_port};
use crate::proxy::{Service, pgbench, spawn, superuser_client, tps, wait_ready, write_userlist};

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
    /// One round of 3 s.
    #[arg(long)]
    pub quick: bool,
}

/// (name, pgbench arguments, targets measured besides `direct`).
const WORKLOADS: [(&str, &[&str], &[&str]); 3] = [
    ("select-simple", &["-S", "-M", "simple"], &["auto"]),
    ("select-prepared", &["-S", "-M", "prepared"], &["auto"]),
    ("tpcb", &["-M", "simple"], &["auto", "rw"]),
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

pub async fn run(cluster: Arc<Cluster>, args: &Args) -> anyhow::Result<Value> {
    let (rounds, secs) = if args.quick {
        (1, 3)
    } else {
        (args.rounds, args.duration.as_secs().max(1))
    };
    cluster.start().await?;
    let status = cluster.wait_healthy(Duration::from_secs(120)).await?;
    let leader = status.leader.clone().context("no leader")?;
    let leader_port = cluster.nodes[cluster.index_of(&leader)?].pg_port;
    let dir = cluster.dir.join("route-bench");
    std::fs::create_dir_all(&dir)?;
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

    let mut rows: Vec<Value> = Vec::new();
    let mut samples: std::collections::BTreeMap<(String, u32, String), Vec<f64>> =
        Default::default();
    let mut raw_samples: Vec<(f64, u64, f64, u64)> = Vec::new();
    for round in 1..=rounds {
        log(&format!("round {round}/{rounds}"));
        for (w, wargs, targets) in WORKLOADS {
            for &c in &args.clients {
                for t in std::iter::once(&"direct").chain(targets.iter()) {
                    let port = match *t {
                        "direct" => leader_port,
                        "auto" => with.auto_port,
                        _ => with.service.port,
                    };
                    let mut a: Vec<String> = wargs.iter().map(|s| s.to_string()).collect();
                    a.extend([
                        "-c".into(),
                        c.to_string(),
                        "-j".into(),
                        "2".into(),
                        "-T".into(),
                        secs.to_string(),
                    ]);
                    let a: Vec<&str> = a.iter().map(String::as_str).collect();
                    let out = pgbench(&cluster, port, &a).await?;
                    let v = tps(&out).with_context(|| format!("no tps: {out}"))?;
                    log(&format!("{w} c={c} {t}: {v:.0} tps"));
                    samples
                        .entry((w.to_string(), c, t.to_string()))
                        .or_default()
                        .push(v);
                }
            }
        }
        let on = read_after_write(&cluster, with.auto_port, args.raw_clients, secs).await?;
        let off = read_after_write(&cluster, without.auto_port, args.raw_clients, secs).await?;
        log(&format!(
            "read-after-write: {:.0} ops/s, {} stale with read-your-writes; {:.0} ops/s, {} stale without",
            on.0, on.1, off.0, off.1
        ));
        raw_samples.push((on.0, on.1, off.0, off.1));
    }
    for ((w, c, t), v) in &samples {
        let direct = &samples[&(w.clone(), *c, "direct".to_string())];
        let ratios: Vec<f64> = v.iter().zip(direct).map(|(a, d)| a / d).collect();
        rows.push(json!({
            "workload": w, "clients": c, "target": t,
            "tps": crate::report::summary(v),
            "ratio_to_direct": crate::report::summary_decimals(&ratios, 3),
        }));
    }
    let col = |f: fn(&(f64, u64, f64, u64)) -> f64| raw_samples.iter().map(f).collect::<Vec<f64>>();
    Ok(json!({
        "bench": "route",
        "machine": crate::report::machine(),
        "config": crate::report::config(&cluster, json!({
            "rounds": rounds, "seconds": secs, "scale": args.scale,
            "raw_clients": args.raw_clients,
        })),
        "pgbench": rows,
        "read_after_write": {
            "read_your_writes_on": {
                "ops_per_s": crate::report::summary(&col(|r| r.0)),
                "stale_reads": crate::report::summary(&col(|r| r.1 as f64)),
            },
            "read_your_writes_off": {
                "ops_per_s": crate::report::summary(&col(|r| r.2)),
                "stale_reads": crate::report::summary(&col(|r| r.3 as f64)),
            },
        },
    }))
}

/// `clients` tasks, each with its own row: increment it, read it back
/// through the same connection. (operations per second, stale reads).
async fn read_after_write(
    cluster: &Cluster,
    port: u16,
    clients: usize,
    secs: u64,
) -> anyhow::Result<(f64, u64)> {
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
    Ok((
        ops.load(Ordering::Relaxed) as f64 / secs as f64,
        stale.load(Ordering::Relaxed),
    ))
}

async fn first_value(client: &tokio_postgres::Client, sql: &str) -> anyhow::Result<i64> {
    for m in client.simple_query(sql).await? {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            return Ok(r.get(0).unwrap_or("0").parse()?);
        }
    }
    anyhow::bail!("{sql}: no row")
}
