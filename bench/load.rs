//! `pgha-bench load`: a sustained pgbench run against the leader, to check
//! that a busy (CPU- and I/O-starved) host never makes a healthy leader
//! lose its lease. Any leader or timeline change during the run is a
//! spurious failover.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::clock::log;
use crate::cluster::{Cluster, SUPERUSER};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// pgbench run time (rounded up to whole seconds).
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    #[arg(long, default_value_t = 8)]
    pub clients: u32,
    /// pgbench scale factor for `pgbench -i`.
    #[arg(long, default_value_t = 10)]
    pub scale: u32,
}

/// What the leader poller saw during the run.
#[derive(Default)]
struct Observed {
    samples: u64,
    leader_changes: u64,
    timeline_changes: u64,
    /// Polls that found no leader key (or could not read etcd).
    leaderless_samples: u64,
    status_errors: u64,
    leaders: Vec<String>,
}

/// A Prometheus histogram as `/metrics` exposes it: cumulative counts per
/// upper bound (seconds), sum and count.
#[derive(Debug, Default)]
struct Histogram {
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

impl Histogram {
    fn parse(text: &str, name: &str) -> Option<Histogram> {
        let value = |l: &str| l.rsplit(' ').next()?.parse::<f64>().ok();
        let mut h = Histogram::default();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix(&format!("{name}_bucket{{")) {
                let le = rest.split("le=\"").nth(1)?.split('"').next()?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                h.buckets.push((le, value(l)?));
            } else if l.starts_with(&format!("{name}_sum")) {
                h.sum = value(l)?;
            } else if l.starts_with(&format!("{name}_count")) {
                h.count = value(l)?;
            }
        }
        (!h.buckets.is_empty()).then_some(h)
    }

    /// What was observed between `before` and `self` (same agent).
    fn since(&self, before: &Histogram) -> Histogram {
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|(le, c)| {
                    let b = before
                        .buckets
                        .iter()
                        .find(|(l, _)| l == le)
                        .map_or(0.0, |x| x.1);
                    (*le, c - b)
                })
                .collect(),
            sum: self.sum - before.sum,
            count: self.count - before.count,
        }
    }

    /// The upper bound (ms) of the bucket holding the slowest observation.
    fn max_bound_ms(&self) -> Option<f64> {
        (self.count > 0.0).then(|| {
            self.buckets
                .iter()
                .find(|(_, c)| *c >= self.count)
                .map_or(f64::INFINITY, |(le, _)| le * 1000.0)
        })
    }

    fn json(&self) -> Value {
        json!({
            "count": self.count,
            "mean_ms": (self.count > 0.0).then(|| (self.sum / self.count * 1000.0 * 10.0).round() / 10.0),
            // Histogram resolution: the slowest one took at most this long.
            "max_le_ms": self.max_bound_ms().filter(|m| m.is_finite()),
        })
    }
}

/// Fetches one histogram from an agent's `/metrics`.
async fn agent_histogram(api_url: &str, name: &str) -> Option<Histogram> {
    let text = reqwest::Client::new()
        .get(format!("{api_url}/metrics"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Histogram::parse(&text, name)
}

const RENEWAL: &str = "pgha_lease_renewal_seconds";
const LOOP: &str = "pgha_loop_duration_seconds";

pub async fn run(cluster: Arc<Cluster>, args: &Args) -> anyhow::Result<Value> {
    cluster.start().await?;
    let st = cluster.status().await?;
    let leader = st.leader_member().context("no leader")?;
    let port = leader.port.to_string();
    let secs = args.duration.as_secs() + u64::from(args.duration.subsec_nanos() > 0);

    log(&format!("pgbench -i -s {} on {}", args.scale, leader.name));
    pgbench(
        &cluster,
        &["-i", "-s", &args.scale.to_string(), "-p", &port],
    )
    .await?;

    // The leader's renewal and loop histograms, before and after the run:
    // the difference is what the load did to them.
    let api_url = leader.api_url.clone();
    let renewal_before = agent_histogram(&api_url, RENEWAL).await;
    let loop_before = agent_histogram(&api_url, LOOP).await;
    let stop = Arc::new(AtomicBool::new(false));
    let poller = tokio::spawn(poll_leader(cluster.clone(), stop.clone()));
    log(&format!(
        "pgbench -c {} -j 2 -T {secs} on {}",
        args.clients, leader.name
    ));
    let out = pgbench(
        &cluster,
        &[
            "-c",
            &args.clients.to_string(),
            "-j",
            "2",
            "-T",
            &secs.to_string(),
            "-p",
            &port,
        ],
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let seen = poller.await?;
    let out = out?;
    let delta = |before: Option<Histogram>, after: Option<Histogram>| {
        before.zip(after).map(|(b, a)| a.since(&b))
    };
    let renewals = delta(renewal_before, agent_histogram(&api_url, RENEWAL).await);
    let loops = delta(loop_before, agent_histogram(&api_url, LOOP).await);
    let number = |prefix: &str| -> Option<f64> {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
    };
    let rss: Vec<f64> = cluster
        .agent_rss_kib()
        .into_iter()
        .map(|k| k as f64)
        .collect();
    let rss = crate::report::summary(&rss);
    Ok(json!({
        "machine": crate::report::machine(),
        "config": crate::report::config(&cluster, json!({
            "clients": args.clients,
            "threads": 2,
            "scale": args.scale,
        })),
        "duration_s": secs,
        "tps": number("tps ="),
        "transactions": number("number of transactions actually processed:"),
        "failed_transactions": number("number of failed transactions:"),
        "latency_avg_ms": number("latency average ="),
        "leader_changes": seen.leader_changes,
        "timeline_changes": seen.timeline_changes,
        "leaderless_samples": seen.leaderless_samples,
        "status_errors": seen.status_errors,
        "samples": seen.samples,
        "leaders": seen.leaders,
        "max_renewal_latency_ms": renewals.as_ref().and_then(Histogram::max_bound_ms).filter(|m| m.is_finite()),
        "leader_lease_renewals": renewals.as_ref().map(Histogram::json),
        "leader_loop_duration": loops.as_ref().map(Histogram::json),
        "agent_rss_kib": {"median": rss["median"], "max": rss["max"], "all": rss["all"]},
        "work_dir": cluster.dir.display().to_string(),
    }))
}

/// Runs pgbench against 127.0.0.1 as the superuser, with the password in a
/// 0600 passfile (never on the command line); returns its stdout.
async fn pgbench(cluster: &Cluster, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new("pgbench");
    cmd.args(["-h", "127.0.0.1", "-U", SUPERUSER])
        .args(args)
        .arg("postgres")
        .env("PGPASSFILE", &cluster.pgpass)
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = crate::reaper::spawn_own(&mut cmd)
        .context("run pgbench (apt-get install postgresql-client-15)")?
        .wait_with_output()
        .await?;
    if !out.status.success() {
        bail!(
            "pgbench {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every 200 ms: who leads, and on which timeline.
async fn poll_leader(cluster: Arc<Cluster>, stop: Arc<AtomicBool>) -> Observed {
    let mut seen = Observed::default();
    let mut last: Option<(String, Option<u32>)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        seen.samples += 1;
        let st = match cluster.status().await {
            Ok(st) => st,
            Err(_) => {
                seen.status_errors += 1;
                continue;
            }
        };
        let Some(leader) = st.leader.clone() else {
            seen.leaderless_samples += 1;
            continue;
        };
        let timeline = st.leader_timeline();
        if let Some((prev, prev_tl)) = &last {
            if *prev != leader {
                seen.leader_changes += 1;
                log(&format!("leader changed: {prev} -> {leader}"));
            }
            if prev_tl.is_some() && timeline.is_some() && *prev_tl != timeline {
                seen.timeline_changes += 1;
                log(&format!("timeline changed: {prev_tl:?} -> {timeline:?}"));
            }
        }
        if !seen.leaders.contains(&leader) {
            seen.leaders.push(leader.clone());
        }
        last = Some((leader, timeline.or(last.and_then(|l| l.1))));
    }
    seen
}
