//! The fault loop and the report.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use tokio_postgres::NoTls;

use super::faults::{heal, inject};
use super::logs::{HaCounts, LogMarks};
use super::{Fault, HEAL_DEADLINE, Plan, SETTLE, Topology};
use crate::clock::{log, now_ms};
use crate::cluster::SUPERUSER;
use crate::history::{self, Ack, History, Target, Writer};

struct Outcome {
    fault: Fault,
    target: String,
    leader_before: String,
    leader_after: Option<String>,
    inject_ms: f64,
    held_ms: f64,
    /// From heal to full health; `None`: not within [`HEAL_DEADLINE`].
    recovery_ms: Option<f64>,
    unavailability_ms: f64,
    lost: Vec<i64>,
    overlaps: Vec<history::Overlap>,
    acks: usize,
    /// The HA loop's turns in this fault's window, from the agents' logs.
    ha: HaCounts,
    error: Option<String>,
}

impl Outcome {
    fn overlap_ms(&self) -> f64 {
        // fold, not sum: an empty float sum is -0.0, printed as "-0".
        self.overlaps
            .iter()
            .fold(0.0, |total, o| total + (o.to_ms - o.from_ms))
    }

    fn json(&self, index: usize) -> Value {
        let r = |x: f64| x.round() as i64;
        json!({
            "index": index,
            "fault": self.fault.name(),
            "target": self.target,
            "leader_before": self.leader_before,
            "leader_after": self.leader_after,
            "inject_at_ms": r(self.inject_ms),
            "held_ms": r(self.held_ms),
            "recovered": self.recovery_ms.is_some(),
            "recovery_ms": self.recovery_ms.map(r),
            "unavailability_ms": r(self.unavailability_ms),
            "lost_acknowledged": self.lost.len(),
            "lost_ids": self.lost,
            "overlap_ms": r(self.overlap_ms()),
            "overlaps": self.overlaps.iter().map(|o| json!({
                "servers": [format!("node{}", o.servers.0 + 1), format!("node{}", o.servers.1 + 1)],
                "from_ms": r(o.from_ms), "to_ms": r(o.to_ms),
            })).collect::<Vec<_>>(),
            "acknowledged_writes": self.acks,
            "ha": ha_json(std::slice::from_ref(&self.ha)),
            "error": self.error,
        })
    }
}

pub async fn run(topo: Arc<Topology>, plan: Plan, seed: u64) -> anyhow::Result<Value> {
    let mut rng = StdRng::seed_from_u64(seed);
    for m in &topo.etcd {
        m.start()?;
    }
    wait_etcd(&topo).await?;
    log("etcd cluster healthy");
    topo.cluster.start().await?;
    // Set either way: `off` must really be off whatever pgha's default.
    let failsafe_setting = format!("failsafe_mode={}", if plan.failsafe { "on" } else { "off" });
    let failsafe_error = match topo.cluster.config_set(&[failsafe_setting]).await {
        Ok(()) => None,
        Err(e) => {
            log(&format!(
                "failsafe_mode not set, running with pgha's default: {e:#}"
            ));
            Some(format!("{e:#}"))
        }
    };
    let client_config = topo.cluster.writer_config();
    create_table(&client_config).await?;
    let history = Arc::new(History::default());
    let addrs: Vec<String> = topo.nodes.iter().map(|h| h.addr.to_string()).collect();
    let mut writers = vec![Writer::start(
        0,
        Target::Client {
            config: client_config.clone(),
            addrs,
        },
        super::CLIENT_WRITE_INTERVAL,
        history.clone(),
    )];
    for (i, node) in topo.cluster.nodes.iter().enumerate() {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&node.socket_dir)
            .port(node.pg_port)
            .user(SUPERUSER)
            .password(&topo.cluster.superuser_password)
            .dbname("postgres")
            .application_name("pgha-chaos-local");
        writers.push(Writer::start(
            i + 1,
            Target::Local { server: i, config },
            super::NODE_WRITE_INTERVAL,
            history.clone(),
        ));
    }

    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut aborted = None;
    let mut window_start = now_ms();
    let mut etcd_cuts = plan.etcd_cuts.iter().cycle();
    for index in 0..plan.faults {
        let fault = if plan.random_order {
            plan.kinds[rng.random_range(0..plan.kinds.len())]
        } else {
            plan.kinds[index % plan.kinds.len()]
        };
        let leader = match ready(&topo).await {
            Ok(l) => l,
            Err(e) => {
                aborted = Some(format!("before fault {index}: {e:#}"));
                break;
            }
        };
        tokio::time::sleep(SETTLE + Duration::from_millis(rng.random_range(0..3000))).await;
        let random_hold = Duration::from_millis(
            rng.random_range(plan.durations.0 * 1000..=plan.durations.1 * 1000),
        );
        let held = match fault {
            Fault::CutAllFromEtcd => etcd_cuts.next().copied().unwrap_or(random_hold),
            _ => random_hold,
        };
        let marks = LogMarks::take(&topo.cluster);
        let inject_ms = now_ms();
        let (target, undo, mut error) = match inject(&topo, fault, leader, &mut rng).await {
            Ok((t, u)) => (t, Some(u), None),
            Err(e) => (String::new(), None, Some(format!("inject: {e:#}"))),
        };
        log(&format!(
            "fault {}/{}: {} on {target} for {:.1}s",
            index + 1,
            plan.faults,
            fault.name(),
            held.as_secs_f64()
        ));
        tokio::time::sleep(held).await;
        let heal_ms = now_ms();
        if let Err(e) = heal(&topo, undo.unwrap_or(super::faults::Undo::Nothing)).await {
            error.get_or_insert(format!("heal: {e:#}"));
        }
        let recovery_ms = match topo.cluster.wait_healthy(HEAL_DEADLINE).await {
            Ok(_) => Some(now_ms() - heal_ms),
            Err(e) => {
                error.get_or_insert(format!("{e:#}"));
                None
            }
        };
        // Let the client get a write through (or not) before judging.
        let _ = wait_client_ack(&history, now_ms(), Duration::from_secs(10)).await;
        let end_ms = now_ms();
        let acks = history.acks_between(window_start, end_ms);
        let client_times: Vec<f64> = acks
            .iter()
            .filter(|a| a.writer == 0)
            .map(|a| a.ack_ms)
            .collect();
        let lost = match leader_client(&topo).await {
            Ok(c) => history::missing(&c, &acks).await.unwrap_or_else(|e| {
                error.get_or_insert(format!("loss check: {e:#}"));
                Vec::new()
            }),
            Err(e) => {
                error.get_or_insert(format!("loss check: {e:#}"));
                Vec::new()
            }
        };
        let leader_before = format!("node{}", leader + 1);
        let ha = super::logs::analyse(&marks.read_since(), &leader_before);
        let outcome = Outcome {
            fault,
            target,
            leader_before,
            leader_after: topo.cluster.status().await.ok().and_then(|s| s.leader),
            inject_ms,
            held_ms: heal_ms - inject_ms,
            recovery_ms,
            unavailability_ms: history::max_gap(&client_times, inject_ms, end_ms),
            lost,
            overlaps: history::overlaps(&acks),
            acks: acks.len(),
            ha,
            error,
        };
        let h = &outcome.ha;
        log(&format!(
            "  {}: unavailable {:.1}s, lost {}, overlap {:.0} ms, leader changes {}, \
             races {}, degraded {}, needless rewinds {}, demotions {}, keeper kills {}, \
             promotions {:?} ms, {}",
            fault.name(),
            outcome.unavailability_ms / 1000.0,
            outcome.lost.len(),
            outcome.overlap_ms(),
            h.leader_changes,
            h.blind_races,
            h.degraded_records,
            h.needless_rewinds,
            h.agent_demotions,
            h.keeper_fencings,
            h.promotion_ms
                .iter()
                .map(|m| m.round() as i64)
                .collect::<Vec<_>>(),
            match outcome.recovery_ms {
                Some(r) => format!("healthy {:.1}s after heal", r / 1000.0),
                None => format!(
                    "NOT healthy {}s after heal: {}",
                    HEAL_DEADLINE.as_secs(),
                    outcome.error.as_deref().unwrap_or("")
                ),
            }
        ));
        outcomes.push(outcome);
        window_start = end_ms;
    }
    for w in &mut writers {
        w.stop().await;
    }
    // Writes acknowledged in one fault's window and lost in a later one.
    let all = history.acks_between(0.0, f64::MAX);
    let lost_later = match leader_client(&topo).await {
        Ok(c) => {
            let missing = history::missing(&c, &all).await.unwrap_or_default();
            let seen: std::collections::BTreeSet<i64> = outcomes
                .iter()
                .flat_map(|o| o.lost.iter().copied())
                .collect();
            missing
                .into_iter()
                .filter(|id| !seen.contains(id))
                .collect::<Vec<_>>()
        }
        Err(_) => Vec::new(),
    };
    Ok(report(
        &topo,
        &plan,
        seed,
        &outcomes,
        &all,
        lost_later,
        failsafe_error,
        aborted,
    ))
}

#[allow(clippy::too_many_arguments)]
fn report(
    topo: &Topology,
    plan: &Plan,
    seed: u64,
    outcomes: &[Outcome],
    all: &[Ack],
    lost_later: Vec<i64>,
    failsafe_error: Option<String>,
    aborted: Option<String>,
) -> Value {
    let mut by_type: BTreeMap<String, Vec<&Outcome>> = BTreeMap::new();
    for o in outcomes {
        by_type.entry(o.fault.name()).or_default().push(o);
    }
    let per_type: serde_json::Map<String, Value> = by_type
        .into_iter()
        .map(|(name, os)| {
            let unavail: Vec<f64> = os.iter().map(|o| o.unavailability_ms).collect();
            let s = crate::report::summary(&unavail);
            let v = json!({
                "faults": os.len(),
                "lost_acknowledged": os.iter().map(|o| o.lost.len()).sum::<usize>(),
                "overlap_ms": os.iter().fold(0.0, |t, o| t + o.overlap_ms()).round() as i64,
                "unrecovered": os.iter().filter(|o| o.recovery_ms.is_none()).count(),
                "worst_unavailability_ms": s["max"],
                "median_unavailability_ms": s["median"],
                "unavailability_ms": s,
                "recovery_after_heal_ms": crate::report::summary(
                    &os.iter().filter_map(|o| o.recovery_ms).collect::<Vec<_>>()),
                "ha": ha_json(&os.iter().map(|o| o.ha.clone()).collect::<Vec<_>>()),
            });
            (name, v)
        })
        .collect();
    let lost: usize = outcomes.iter().map(|o| o.lost.len()).sum::<usize>() + lost_later.len();
    json!({
        "faults": outcomes.len(),
        "lost_acknowledged": lost,
        "overlap_ms": outcomes.iter().fold(0.0, |t, o| t + o.overlap_ms()).round() as i64,
        "unrecovered": outcomes.iter().filter(|o| o.recovery_ms.is_none()).count(),
        "lost_in_a_later_fault": lost_later,
        "acknowledged_writes": all.len(),
        "ha": ha_json(&outcomes.iter().map(|o| o.ha.clone()).collect::<Vec<_>>()),
        "aborted": aborted,
        "synchronous_mode": plan.sync,
        "failsafe_mode": match (&failsafe_error, plan.failsafe) {
            (Some(_), _) => "default",
            (None, true) => "on",
            (None, false) => "off",
        },
        "failsafe_error": failsafe_error,
        "seed": seed,
        "slow_network": if topo.netem { "netem delay 200ms 50ms loss 5%" } else { "nft loss 5% + tbf 1mbit (no sch_netem)" },
        "per_fault_type": per_type,
        "details": outcomes.iter().enumerate().map(|(i, o)| o.json(i + 1)).collect::<Vec<_>>(),
        "config": crate::report::config(&topo.cluster, json!({
            "etcd_members": topo.etcd.len(),
            "heal_deadline_s": HEAL_DEADLINE.as_secs(),
            "fault_duration_s": [plan.durations.0, plan.durations.1],
            "etcd_cut_s": plan.etcd_cuts.iter().map(|d| d.as_secs_f64()).collect::<Vec<_>>(),
        })),
        "machine": crate::report::machine(),
    })
}

/// The HA counts of `faults` added up; `faults_with_leader_change`
/// answers "did the leader move at all".
fn ha_json(faults: &[HaCounts]) -> Value {
    let mut total = HaCounts::default();
    for f in faults {
        total.add(f);
    }
    json!({
        "leader_changes": total.leader_changes,
        "faults_with_leader_change": faults.iter().filter(|f| f.leader_changes > 0).count(),
        "blind_races": total.blind_races,
        "degraded_records": total.degraded_records,
        "needless_rewinds": total.needless_rewinds,
        "agent_demotions": total.agent_demotions,
        "keeper_fencings": total.keeper_fencings,
        "promotion_ms": crate::report::summary(&total.promotion_ms),
        "promote_call_ms": crate::report::summary(&total.promote_call_ms),
    })
}

/// Waits for a healthy cluster (repairing what a failed fault left: a
/// dead agent is restarted) and returns the leader's index.
async fn ready(topo: &Topology) -> anyhow::Result<usize> {
    let _ = topo.net.heal();
    for m in &topo.etcd {
        let alive = m
            .child
            .lock()
            .unwrap()
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        if !alive {
            m.start()?;
        }
    }
    topo.cluster.start_missing_agents()?;
    let st = topo.cluster.wait_healthy(Duration::from_secs(180)).await?;
    let leader = st.leader.context("no leader")?;
    topo.cluster.index_of(&leader)
}

async fn wait_etcd(topo: &Topology) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let deadline = now_ms() + 60_000.0;
    loop {
        let mut healthy = 0;
        for m in &topo.etcd {
            if let Ok(r) = http
                .get(format!("{}/health", m.endpoint()))
                .timeout(Duration::from_millis(500))
                .send()
                .await
                && r.text().await.is_ok_and(|b| b.contains("\"true\""))
            {
                healthy += 1;
            }
        }
        if healthy == topo.etcd.len() {
            return Ok(());
        }
        anyhow::ensure!(now_ms() < deadline, "etcd cluster not healthy after 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn create_table(config: &tokio_postgres::Config) -> anyhow::Result<()> {
    let (client, conn) = config.connect(NoTls).await?;
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {} (id bigint PRIMARY KEY)",
            history::TABLE
        ))
        .await?;
    Ok(())
}

/// A session on the writable server (the leader).
async fn leader_client(topo: &Topology) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(10),
        topo.cluster.writer_config().connect(NoTls),
    )
    .await
    .context("connect to the leader: timed out")??;
    tokio::spawn(conn);
    Ok(client)
}

async fn wait_client_ack(history: &History, after_ms: f64, timeout: Duration) -> bool {
    let deadline = now_ms() + timeout.as_secs_f64() * 1000.0;
    while now_ms() < deadline {
        if history
            .acks_between(after_ms, f64::MAX)
            .iter()
            .any(|a| a.writer == 0)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
