//! `pgha-bench failover`: inject leader failures into a live cluster under a
//! steady write load and measure what the client saw.
//!
//! Per trial: wait for a healthy cluster and steady writes, inject the
//! event at `E`, wait for the first write acknowledged by a recovered
//! server at `R`, and report the longest gap between two acknowledged
//! writes inside `[E - 1 s, R + 1 s]`. Looking at gaps rather than at
//! `R - E` charges the scenario for everything the client noticed,
//! including writes that stalled before the event took effect (a
//! switchover's shutdown happens some time after the command starts).

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio_postgres::NoTls;

use crate::clock::{log, now_ms};
use crate::cluster::Cluster;
use crate::promotion::Phases;
use crate::report::summary;
use crate::writer::{Ack, Writer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// The leader's host dies: agent, fence keeper and PostgreSQL SIGKILLed at once.
    NodeLoss,
    /// The leader's PostgreSQL crashes (postmaster and backends SIGKILLed); the agent lives.
    PgCrash,
    /// Planned `pgha switchover --to <streaming replica>`.
    Switchover,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::NodeLoss => "node-loss",
            Scenario::PgCrash => "pg-crash",
            Scenario::Switchover => "switchover",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 5)]
    pub trials: usize,
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "node-loss,pg-crash,switchover"
    )]
    pub scenarios: Vec<Scenario>,
}

/// How long a failed-over cluster may take to accept writes again before
/// the trial is declared failed.
const RECOVERY_TIMEOUT_MS: f64 = 90_000.0;
/// How long a restarted former leader may take to stream again. After
/// that the bench reclones it (see [`Cluster::reclone`]) so that the
/// remaining trials can run, and reports the rejoin as failed.
const REJOIN_TIMEOUT_MS: f64 = 120_000.0;
/// Between trials: how long to wait for the cluster to heal.
const HEAL_TIMEOUT: Duration = Duration::from_secs(120);
/// The cluster must be healthy, with writes flowing, for this long before
/// an event is injected, so that one trial's aftermath (a rewind, a slot
/// being recreated) cannot leak into the next one.
const SETTLE_MS: f64 = 2_000.0;

struct Trial {
    event_ms: f64,
    /// When the trial's measurements ended (after the rejoin, if any).
    end_ms: f64,
    old_leader: String,
    new_leader: Option<String>,
    timeline: Option<u32>,
    unavailability_ms: f64,
    /// From the event to the first write acknowledged by a recovered server.
    recovery_ms: f64,
    rejoin_ms: Option<f64>,
    /// Why the restarted node did not stream again in time.
    rejoin_error: Option<String>,
    write_errors: usize,
    /// How long `pgha switchover` took to return.
    command_ms: Option<f64>,
    command_output: Option<String>,
    /// The new leader's takeover, from its agent log (none when the old
    /// leader restarted in place).
    promotion: Option<Phases>,
}

impl Trial {
    /// `lost`: every acknowledged write missing at the end of the run.
    fn json(&self, lost: &[Ack]) -> Value {
        let round = |x: f64| x.round() as i64;
        // Where each lost write sits relative to the event (negative:
        // acknowledged before it) tells a replication window from a bug.
        let lost: Vec<Value> = lost
            .iter()
            .filter(|a| (self.event_ms - 1000.0..=self.end_ms).contains(&a.at_ms))
            .map(|a| json!({"id": a.id, "acked_ms_after_event": (a.at_ms - self.event_ms).round() as i64}))
            .collect();
        json!({
            "lost_acknowledged": lost.len(),
            "lost": lost,
            "old_leader": self.old_leader,
            "new_leader": self.new_leader,
            "timeline": self.timeline,
            "unavailability_ms": round(self.unavailability_ms),
            "recovery_ms": round(self.recovery_ms),
            "rejoin_ms": self.rejoin_ms.map(round),
            "rejoin_error": self.rejoin_error,
            "write_errors": self.write_errors,
            "command_ms": self.command_ms.map(round),
            "command_output": self.command_output,
            "promotion": self.promotion.map(|p| p.json()),
        })
    }
}

struct ScenarioRun {
    scenario: Scenario,
    start_ms: f64,
    end_ms: f64,
    trials: Vec<Trial>,
    failures: Vec<String>,
}

pub async fn run(cluster: Arc<Cluster>, args: &Args) -> anyhow::Result<Value> {
    anyhow::ensure!(args.trials > 0, "--trials must be at least 1");
    anyhow::ensure!(cluster.nodes.len() >= 2, "failover needs at least 2 nodes");
    cluster.start().await?;
    create_table(&cluster).await?;
    let mut writer = Writer::start(cluster.writer_config());

    let mut runs: Vec<ScenarioRun> = Vec::new();
    let mut aborted: Option<String> = None;
    for &scenario in &args.scenarios {
        let (sr, stop) = run_scenario(&cluster, &writer, scenario, args.trials).await;
        runs.push(sr);
        if stop.is_some() {
            aborted = stop;
            break;
        }
    }

    // Compare what the client was told with what the final leader has.
    // Only the leader matters here, so a member that did not heal does not
    // prevent the check (it is already reported).
    if let Err(e) = cluster.wait_healthy(Duration::from_secs(30)).await {
        log(&format!("final check without a healthy cluster: {e:#}"));
    }
    writer.stop().await;
    let present = match committed_ids(&cluster).await {
        Ok(ids) => Some(ids),
        Err(e) => {
            aborted.get_or_insert(format!("final check: {e:#}"));
            None
        }
    };
    let acks = writer.acks();
    let lost: Vec<Ack> = match &present {
        Some(present) => acks
            .iter()
            .filter(|a| !present.contains(&a.id))
            .copied()
            .collect(),
        None => Vec::new(),
    };
    if !lost.is_empty() {
        log(&format!(
            "{} acknowledged write(s) missing on the final leader",
            lost.len()
        ));
    }

    let mut scenarios = serde_json::Map::new();
    for sr in &runs {
        let pick =
            |f: fn(&Trial) -> Option<f64>| -> Vec<f64> { sr.trials.iter().filter_map(f).collect() };
        let in_span = acks
            .iter()
            .filter(|a| (sr.start_ms..=sr.end_ms).contains(&a.at_ms))
            .count();
        let mut v = json!({
            "trials": sr.trials.len(),
            "unavailability_ms": summary(&pick(|t| Some(t.unavailability_ms))),
            "recovery_ms": summary(&pick(|t| Some(t.recovery_ms))),
            "lost_acknowledged": present.as_ref().map(|_| lost.iter().filter(|a| (sr.start_ms..=sr.end_ms).contains(&a.at_ms)).count()),
            "acknowledged": in_span,
            "write_errors": writer.failed_writes(sr.start_ms, sr.end_ms),
            "new_leaders": sr.trials.iter().map(|t| t.new_leader.clone()).collect::<Vec<_>>(),
            "failures": sr.failures,
            "details": sr.trials.iter().map(|t| t.json(&lost)).collect::<Vec<_>>(),
        });
        if sr.scenario == Scenario::NodeLoss {
            v["rejoin_ms"] = summary(&pick(|t| t.rejoin_ms));
        }
        let promotions: Vec<Phases> = sr.trials.iter().filter_map(|t| t.promotion).collect();
        if !promotions.is_empty() {
            let of = |f: fn(&Phases) -> f64| summary(&promotions.iter().map(f).collect::<Vec<_>>());
            v["promotion_ms"] = json!({
                "total": of(|p| p.total_ms),
                "lease": of(|p| p.lease_ms),
                "decide": of(|p| p.decide_ms),
                "promote": of(|p| p.promote_ms),
                "startup_wakeups": promotions.iter().map(|p| p.wakeups).sum::<u32>(),
            });
        }
        scenarios.insert(sr.scenario.name().to_string(), v);
    }
    let rss: Vec<f64> = cluster
        .agent_rss_kib()
        .into_iter()
        .map(|k| k as f64)
        .collect();
    let rss_summary = summary(&rss);
    Ok(json!({
        "machine": crate::report::machine(),
        "config": crate::report::config(&cluster, json!({
            "trials": args.trials,
            "write_interval_ms": crate::writer::WRITE_INTERVAL.as_millis() as u64,
            "reconnect_delay_ms": crate::writer::RECONNECT_DELAY.as_millis() as u64,
            "client_connect_timeout_ms": crate::cluster::CLIENT_CONNECT_TIMEOUT.as_millis() as u64,
        })),
        "scenarios": scenarios,
        "acknowledged_total": acks.len(),
        "lost_acknowledged_total": present.as_ref().map(|_| lost.len()),
        "failed_connects": writer.failed_connects(),
        "agent_rss_kib": {"median": rss_summary["median"], "max": rss_summary["max"], "all": rss_summary["all"]},
        "aborted": aborted,
        "work_dir": cluster.dir.display().to_string(),
    }))
}

/// Every trial of one scenario. The second value says why the whole run
/// must stop (the cluster cannot be brought back to health), if it must.
async fn run_scenario(
    cluster: &Cluster,
    writer: &Writer,
    scenario: Scenario,
    trials: usize,
) -> (ScenarioRun, Option<String>) {
    let mut sr = ScenarioRun {
        scenario,
        start_ms: now_ms(),
        end_ms: 0.0,
        trials: Vec::new(),
        failures: Vec::new(),
    };
    let mut stop = None;
    for t in 1..=trials {
        if let Err(e) = ready_or_repair(cluster, writer, &mut sr.failures, t).await {
            stop = Some(format!("{} trial {t}: {e:#}", scenario.name()));
            break;
        }
        log(&format!("{} trial {t}/{trials}", scenario.name()));
        match trial(cluster, writer, scenario).await {
            Ok(tr) => {
                log(&format!(
                    "  {} -> {}: unavailable {:.0} ms, first write after {:.0} ms{}{}",
                    tr.old_leader,
                    tr.new_leader.as_deref().unwrap_or("?"),
                    tr.unavailability_ms,
                    tr.recovery_ms,
                    tr.promotion
                        .map(|p| format!(
                            ", takeover {:.0} ms (lease {:.0}, decide {:.0}, promote {:.0}, wakeups {})",
                            p.total_ms, p.lease_ms, p.decide_ms, p.promote_ms, p.wakeups
                        ))
                        .unwrap_or_default(),
                    tr.rejoin_ms
                        .map(|r| format!(", rejoined after {r:.0} ms"))
                        .unwrap_or_default()
                ));
                if let Some(e) = &tr.rejoin_error {
                    sr.failures.push(format!("trial {t}: rejoin: {e}"));
                }
                sr.trials.push(tr);
            }
            Err(e) => {
                log(&format!("  trial failed: {e:#}"));
                sr.failures.push(format!("trial {t}: {e:#}"));
                // A node-loss trial may fail before the agent came back.
                if let Err(e) = cluster.start_missing_agents() {
                    stop = Some(format!("restart agents: {e:#}"));
                    break;
                }
            }
        }
    }
    sr.end_ms = now_ms();
    (sr, stop)
}

/// Waits for [`wait_ready`]. If the previous trial left a member that does
/// not come back, that is recorded as its failure and the member is
/// repaired as an operator would, so that the remaining trials still
/// measure something.
async fn ready_or_repair(
    cluster: &Cluster,
    writer: &Writer,
    failures: &mut Vec<String>,
    t: usize,
) -> anyhow::Result<()> {
    let Err(e) = wait_ready(cluster, writer).await else {
        return Ok(());
    };
    let names = repair(cluster)
        .await
        .with_context(|| format!("{e:#}; repair failed"))?;
    if names.is_empty() {
        return Err(e);
    }
    failures.push(format!(
        "before trial {t}: cluster did not heal ({e:#}); the bench recloned {}",
        names.join(", ")
    ));
    wait_ready(cluster, writer).await
}

async fn create_table(cluster: &Cluster) -> anyhow::Result<()> {
    let (client, conn) = cluster
        .writer_config()
        .connect(NoTls)
        .await
        .context("connect to the leader")?;
    tokio::spawn(conn);
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS bench_writes (id bigint PRIMARY KEY)")
        .await?;
    Ok(())
}

/// Every id in the table, read from whichever node is writable (retried
/// for 30 s, in case the last trial's aftermath is still settling).
async fn committed_ids(cluster: &Cluster) -> anyhow::Result<HashSet<i64>> {
    let deadline = now_ms() + 30_000.0;
    loop {
        let attempt = async {
            let (client, conn) = cluster.writer_config().connect(NoTls).await?;
            tokio::spawn(conn);
            let rows = client.query("SELECT id FROM bench_writes", &[]).await?;
            anyhow::Ok(rows.iter().map(|r| r.get(0)).collect())
        };
        match attempt.await {
            Ok(ids) => return Ok(ids),
            Err(e) if now_ms() > deadline => {
                return Err(e).context("read the ids from the final leader");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Reclones every member that is neither the leader nor a streaming
/// replica; returns their names.
async fn repair(cluster: &Cluster) -> anyhow::Result<Vec<String>> {
    let st = cluster.status().await?;
    anyhow::ensure!(st.leader_member().is_some(), "no leader to clone from");
    let mut names = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let ok = st.leader.as_deref() == Some(node.name.as_str())
            || st
                .member(&node.name)
                .is_some_and(|m| st.is_streaming_replica(m));
        if !ok {
            log(&format!(
                "{} is stuck ({}); recloning it",
                node.name,
                st.summary()
            ));
            cluster.reclone(i).await?;
            names.push(node.name.clone());
        }
    }
    Ok(names)
}

/// Healthy cluster and steady writes, continuously for [`SETTLE_MS`].
async fn wait_ready(cluster: &Cluster, writer: &Writer) -> anyhow::Result<()> {
    let deadline = now_ms() + HEAL_TIMEOUT.as_secs_f64() * 1000.0;
    let mut ready_since: Option<f64> = None;
    let mut last = String::new();
    loop {
        let (recent, age) = writer.recent(1000.0);
        let writes_ok = recent >= 50 && age.is_some_and(|a| a < 100.0);
        match cluster.status().await {
            Ok(st) if st.healthy(cluster.nodes.len()) && writes_ok => {
                let since = *ready_since.get_or_insert(now_ms());
                if now_ms() - since >= SETTLE_MS {
                    return Ok(());
                }
            }
            Ok(st) => {
                ready_since = None;
                last = format!("{}; {recent} writes in the last second", st.summary());
            }
            Err(e) => {
                ready_since = None;
                last = format!("{e:#}");
            }
        }
        if now_ms() > deadline {
            bail!("cluster not ready after {HEAL_TIMEOUT:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn trial(cluster: &Cluster, writer: &Writer, scenario: Scenario) -> anyhow::Result<Trial> {
    let st = cluster.status().await?;
    let leader = st.leader_member().context("no leader")?;
    let old_leader = leader.name.clone();
    let old_port = leader.port;
    let old_timeline = leader.timeline.unwrap_or(0);
    let idx = cluster.index_of(&old_leader)?;

    let mut command = None;
    // The agents' logs carry wall-clock times.
    let event_wall = SystemTime::now();
    let event_ms;
    match scenario {
        Scenario::NodeLoss => {
            event_ms = cluster.kill_host(idx)?;
        }
        Scenario::PgCrash => {
            event_ms = cluster.kill_postgres(idx)?;
        }
        Scenario::Switchover => {
            let target = st
                .members
                .iter()
                .find(|m| m.name != old_leader && st.is_streaming_replica(m))
                .context("no streaming replica to switch over to")?
                .name
                .clone();
            event_ms = now_ms();
            let mut cmd = tokio::process::Command::new(cluster.pgha_exe());
            cmd.arg("switchover")
                .arg("-c")
                .arg(&cluster.nodes[idx].config_path)
                .arg("--to")
                .arg(&target)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            let child = crate::reaper::spawn_own(&mut cmd).context("run pgha switchover")?;
            // Timestamp the exit here: the trial only looks at the command
            // after the measurement window.
            command = Some(tokio::spawn(async move {
                let out = child.wait_with_output().await;
                (out, now_ms())
            }));
        }
    }

    // A crashed PostgreSQL may come back in place; in the other scenarios
    // the old leader must not be the one acknowledging.
    let not_port = (scenario != Scenario::PgCrash).then_some(old_port);
    let recovered_ms = loop {
        if let Some(t) = writer.recovery_ack(event_ms, not_port) {
            break t;
        }
        if now_ms() - event_ms > RECOVERY_TIMEOUT_MS {
            bail!(
                "no write acknowledged within {:.0} s of the event; status: {}",
                RECOVERY_TIMEOUT_MS / 1000.0,
                cluster
                    .status()
                    .await
                    .map(|s| s.summary())
                    .unwrap_or_else(|e| e.to_string())
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let window_end = recovered_ms + 1000.0;
    tokio::time::sleep(Duration::from_secs_f64(
        ((window_end - now_ms()) / 1000.0).max(0.0),
    ))
    .await;
    let unavailability_ms = writer.max_gap(event_ms - 1000.0, window_end);

    let (command_ms, command_output) = match command {
        Some(handle) => {
            let (out, exited_ms) = tokio::time::timeout(Duration::from_secs(90), handle)
                .await
                .context("pgha switchover did not return within 90 s")??;
            let out = out?;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .trim()
            .to_string();
            if !out.status.success() {
                bail!("pgha switchover failed ({}): {text}", out.status);
            }
            (Some(exited_ms - event_ms), Some(text))
        }
        None => (None, None),
    };

    let st = cluster.status().await?;
    let new_leader = st.leader.clone();
    let timeline = st.leader_timeline();
    let promotion = new_leader
        .as_deref()
        .and_then(|name| cluster.index_of(name).ok())
        .and_then(|i| crate::promotion::read(&cluster.nodes[i].log_path, event_wall));

    let (rejoin_ms, rejoin_error) = if scenario == Scenario::NodeLoss {
        match rejoin(cluster, idx, old_timeline).await {
            Ok(ms) => (Some(ms), None),
            Err(e) => {
                log(&format!("  {e:#}; recloning it so that the run can go on"));
                cluster.reclone(idx).await?;
                (None, Some(format!("{e:#}")))
            }
        }
    } else {
        (None, None)
    };
    Ok(Trial {
        event_ms,
        end_ms: now_ms(),
        old_leader,
        new_leader,
        timeline,
        unavailability_ms,
        recovery_ms: recovered_ms - event_ms,
        rejoin_ms,
        rejoin_error,
        write_errors: writer.failed_writes(event_ms - 1000.0, now_ms()),
        command_ms,
        command_output,
        promotion,
    })
}

/// Restarts the killed node's agent and waits until it streams from the
/// new leader on the new timeline (after a pg_rewind, typically).
async fn rejoin(cluster: &Cluster, idx: usize, old_timeline: u32) -> anyhow::Result<f64> {
    let name = cluster.nodes[idx].name.clone();
    let started = now_ms();
    cluster.start_agent(idx)?;
    loop {
        if let Ok(st) = cluster.status().await
            && let Some(m) = st.member(&name)
            && st.leader.as_deref() != Some(name.as_str())
            && m.role == "replica"
            && m.state == "streaming"
            && m.timeline.is_some_and(|t| t > old_timeline)
            && m.timeline == st.leader_timeline()
        {
            return Ok(now_ms() - started);
        }
        if now_ms() - started > REJOIN_TIMEOUT_MS {
            let st = cluster.status().await.map(|s| s.summary());
            bail!(
                "{name} not streaming {:.0} s after its agent restarted; status: {}",
                REJOIN_TIMEOUT_MS / 1000.0,
                st.unwrap_or_else(|e| e.to_string())
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
