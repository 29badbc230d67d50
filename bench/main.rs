//! `pgha-bench`: end-to-end measurements of pgha on a private local
//! cluster (one etcd, N real `pgha agent` processes, PostgreSQL 15).
//!
//! - `failover`: write unavailability, rejoin time, acknowledged-write
//!   loss and the phases of each takeover, for node loss, PostgreSQL crash
//!   and planned switchover.
//! - `load`: leader stability under a sustained pgbench load.
//! - `backup`: backup, restore and archiving against pgBackRest.
//! - `chaos`: network and process faults against a cluster whose members
//!   are separate hosts (network namespaces), with a history check of
//!   every acknowledged write after each fault.
//! - `proxy`: pgbench through the pgha proxy, pgbouncer and HAProxy as a
//!   ratio to direct connections, and the proxy's memory per idle client.
//! - `route`: the proxy's auto listener (statement routing) and pgpool-II
//!   in load-balancing mode on a three-node cluster, as a ratio to direct
//!   connections, and the stale reads each gives.
//!
//! The JSON report goes to stdout (and `--json-out`); progress goes to
//! stderr. See bench/README.md for what every number means.

mod backup;
mod chaos;
mod clock;
mod cluster;
mod failover;
mod history;
mod load;
mod netns;
mod pgpool;
mod promotion;
mod proxy;
mod reaper;
mod report;
mod route;
mod writer;

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::clock::log;
use crate::cluster::{Cluster, Timing};

#[derive(Debug, Parser)]
#[command(name = "pgha-bench", about = "Failover and load benchmarks for pgha")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct Common {
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    #[command(flatten)]
    timing: Timing,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Keep the work directory (data directories, agent and etcd logs)
    /// after a successful run; it is always kept after a failed one.
    #[arg(long)]
    keep: bool,
    /// Cluster-wide setting applied with `pgha config set` once the cluster
    /// is up, e.g. `--cluster-config synchronous_mode=on` (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    cluster_config: Vec<String>,
    /// Shorthand for `--cluster-config synchronous_mode=MODE`.
    #[arg(long, value_name = "off|on|strict", value_parser = ["off", "on", "strict"])]
    sync: Option<String>,
    /// Leave orphaned PostgreSQL processes to PID 1 instead of reaping
    /// them at once (see bench/reaper.rs; shows what a slow init costs).
    #[arg(long)]
    no_subreaper: bool,
    /// `bootstrap.wal_segment_size` of the cluster, e.g. `4MB` (default:
    /// PostgreSQL's 16MB).
    #[arg(long)]
    wal_segment_size: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure failover: node loss, PostgreSQL crash, switchover.
    Failover {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: failover::Args,
    },
    /// Run pgbench against the leader and count leader changes.
    Load {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: load::Args,
    },
    /// Backup, restore and WAL archiving of one server, pgha vs pgBackRest.
    Backup {
        #[command(flatten)]
        args: backup::Args,
    },
    /// Inject network and process faults into a cluster of network
    /// namespaces (3 etcd, 3 nodes, a client) under writes; needs root.
    Chaos {
        #[command(flatten)]
        args: chaos::Args,
    },
    /// Compare pgbench through the pgha proxy, pgbouncer and HAProxy with
    /// direct connections (always on a single node).
    Proxy {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: proxy::Args,
    },
    /// The proxy's auto listener (statement routing, read-your-writes)
    /// beside pgpool-II's load balancing and direct connections.
    Route {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: route::Args,
    },
}

/// Exit codes: 0 success; 1 error, aborted run or failed trial; 3 when an
/// acknowledged write was lost (the one result that must never happen).
pub(crate) const EXIT_ERROR: i32 = 1;
pub(crate) const EXIT_LOST_WRITES: i32 = 3;

fn main() {
    clock::now_ms(); // start the run's clock
    let cli = Cli::parse();
    // It builds its own runtime, from inside its client namespace.
    if let Command::Chaos { args } = cli.command {
        std::process::exit(chaos::main(args));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    std::process::exit(runtime.block_on(run(cli)));
}

async fn run(cli: Cli) -> i32 {
    let common = match cli.command {
        // One server of its own: no cluster.
        Command::Backup { args } => return backup::main(args).await,
        Command::Chaos { .. } => unreachable!("handled in main"),
        Command::Failover { ref common, .. }
        | Command::Load { ref common, .. }
        | Command::Proxy { ref common, .. }
        | Command::Route { ref common, .. } => common,
    };
    // Every target of the proxy bench must reach the same PostgreSQL.
    // Its pooled targets keep server connections open side by side.
    let (nodes, pg_parameters): (usize, &[(&str, &str)]) = match &cli.command {
        Command::Proxy { .. } => (1, &[("max_connections", "400")]),
        // Two pgha proxies and pgpool-II keep pooled connections to every
        // member while the direct pgbench runs open their own.
        Command::Route { .. } => (common.nodes, &[("max_connections", "400")]),
        _ => (common.nodes, &[]),
    };
    report::init_machine();
    if !common.no_subreaper {
        if let Err(e) = reaper::become_subreaper() {
            eprintln!("error: PR_SET_CHILD_SUBREAPER: {e}");
            return EXIT_ERROR;
        }
        reaper::spawn();
    }
    let mut cluster_config = common.cluster_config.clone();
    if let Some(mode) = &common.sync {
        cluster_config.push(format!("synchronous_mode={mode}"));
    }
    let cluster = match Cluster::create(
        nodes,
        &common.timing,
        cluster_config,
        pg_parameters,
        common.wal_segment_size.as_deref(),
    ) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("error: {e:#}");
            return EXIT_ERROR;
        }
    };
    let work = async {
        match &cli.command {
            Command::Failover { args, .. } => failover::run(cluster.clone(), args).await,
            Command::Load { args, .. } => load::run(cluster.clone(), args).await,
            Command::Backup { .. } | Command::Chaos { .. } => unreachable!("handled above"),
            Command::Proxy { args, .. } => proxy::run(cluster.clone(), args).await,
            Command::Route { args, .. } => route::run(cluster.clone(), args).await,
        }
    };
    // The cluster outlives the work future, so that Ctrl-C (which drops
    // the future mid-step) still ends in an orderly shutdown.
    let result = tokio::select! {
        r = work => r,
        s = termination() => Err(anyhow::anyhow!("interrupted by {s}")),
    };
    log("stopping the cluster");
    cluster.shutdown().await;

    let code = match &result {
        Ok(report) => exit_code(report),
        Err(_) => EXIT_ERROR,
    };
    match result {
        Ok(report) => {
            let text = serde_json::to_string_pretty(&report).expect("JSON");
            println!("{text}");
            if let Some(path) = &common.json_out
                && let Err(e) = std::fs::write(path, format!("{text}\n"))
            {
                eprintln!("error: cannot write {}: {e}", path.display());
            }
        }
        Err(e) => eprintln!("error: {e:#}"),
    }
    if code == 0 && !common.keep {
        cluster.remove_dir();
    } else {
        log(&format!(
            "work directory kept: {} (agent logs: nodeN/agent.log, PostgreSQL logs under nodeN/state)",
            cluster.dir.display()
        ));
    }
    code
}

fn exit_code(report: &Value) -> i32 {
    let lost = report["lost_acknowledged_total"].as_u64().unwrap_or(0);
    let failures = report["scenarios"].as_object().is_some_and(|s| {
        s.values()
            .any(|v| v["failures"].as_array().is_some_and(|f| !f.is_empty()))
    });
    if lost > 0 {
        EXIT_LOST_WRITES
    } else if !report["aborted"].is_null() || failures {
        EXIT_ERROR
    } else {
        0
    }
}

pub(crate) async fn termination() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
    }
}
