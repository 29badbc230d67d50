//! Operator commands that change the cluster through the DCS:
//! `switchover`, `failover`, `pause`, `resume`, and `history`.

use std::time::Duration;

use anyhow::{Context, bail};

use super::UsageError;
use crate::config::Config;
use crate::dcs::{ClusterConfig, ClusterView, Dcs, FailoverRequest};
use crate::model::{MemberName, MemberRecord, PgRole, PgState};
use crate::util::unix_ms;

/// Why a member cannot take over in a planned switchover.
pub fn switchover_target_problem(
    view: &ClusterView,
    target: &MemberRecord,
    max_lag: u64,
) -> Option<String> {
    if view.leader.as_ref().is_some_and(|l| l.name == target.name) {
        return Some(format!("{} is already the leader", target.name));
    }
    if target.never_promote() {
        return Some(format!(
            "{} has nofailover set (or priority 0)",
            target.name
        ));
    }
    if target.role != PgRole::Replica || target.state != PgState::Streaming {
        return Some(format!(
            "{} is not a streaming replica (state: {})",
            target.name, target.state
        ));
    }
    let leader_pos = view.leader_record().and_then(MemberRecord::wal_position);
    match (leader_pos, target.wal_position()) {
        (Some(l), Some(t)) if t.lag_behind(l) > max_lag => Some(format!(
            "{} is {} bytes behind the leader (maximum_lag_on_failover is {max_lag})",
            target.name,
            t.lag_behind(l)
        )),
        (Some(_), None) => Some(format!("{}'s WAL position is unknown", target.name)),
        _ => None,
    }
}

/// The best switchover target: a healthy streaming replica, least lag
/// first, then priority, then name.
pub fn pick_target(view: &ClusterView, max_lag: u64) -> Option<MemberName> {
    let mut ok: Vec<&MemberRecord> = view
        .members
        .values()
        .filter(|m| switchover_target_problem(view, m, max_lag).is_none())
        .collect();
    ok.sort_by_key(|m| {
        (
            std::cmp::Reverse(m.wal_position()),
            std::cmp::Reverse(m.priority),
            m.name.clone(),
        )
    });
    ok.first().map(|m| m.name.clone())
}

fn parse_at(at: &str) -> Result<u64, UsageError> {
    let bad = || {
        UsageError(format!(
            "--at {at:?}: expected a time like 2026-01-31T02:00:00Z"
        ))
    };
    let t = humantime::parse_rfc3339_weak(at).map_err(|_| bad())?;
    let since_epoch = t.duration_since(std::time::UNIX_EPOCH).map_err(|_| bad())?;
    Ok(since_epoch.as_millis() as u64)
}

async fn wait_for_leader(
    dcs: &dyn Dcs,
    target: &MemberName,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(v) = dcs.read_cluster().await
            && v.leader.as_ref().is_some_and(|l| &l.name == target)
            && v.leader_record()
                .is_some_and(|r| r.role == PgRole::Primary && r.state == PgState::Running)
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{target} did not become the leader within {timeout:?}; see `pgha list` and the agents' logs"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn switchover(
    cfg: &Config,
    to: Option<String>,
    at: Option<String>,
    force: bool,
) -> anyhow::Result<()> {
    // Argument errors first: they are usage errors (exit 2), whatever etcd says.
    let not_before = at.as_deref().map(parse_at).transpose()?;
    let dcs = super::connect_dcs(cfg).await?;
    let view = dcs.read_cluster().await?;
    let Some(leader) = view.leader.clone() else {
        bail!("the cluster has no leader; use `pgha failover --to NODE` instead");
    };
    if view.failover.is_some() && !force {
        bail!("a switchover or failover is already pending; use --force to replace it");
    }
    let max_lag = cfg.ha.maximum_lag_on_failover;
    let target = match to {
        Some(t) => {
            let name = MemberName::new(t);
            let Some(rec) = view.members.get(&name) else {
                bail!("no member named {name}")
            };
            if let Some(problem) = switchover_target_problem(&view, rec, max_lag)
                && !force
            {
                bail!("refusing to switch over: {problem} (use --force to override)");
            }
            name
        }
        None => {
            pick_target(&view, max_lag).context("no healthy streaming replica to switch over to")?
        }
    };
    dcs.put_failover(&FailoverRequest {
        from: Some(leader.name.clone()),
        to: Some(target.clone()),
        not_before_unix_ms: not_before,
        accept_data_loss: false,
        requested_at_unix_ms: unix_ms(),
    })
    .await?;
    if let Some(t) = at {
        println!(
            "switchover from {} to {target} scheduled at {t}",
            leader.name
        );
        return Ok(());
    }
    println!("switching over from {} to {target}...", leader.name);
    let started = std::time::Instant::now();
    wait_for_leader(&dcs, &target, Duration::from_secs(60)).await?;
    println!(
        "{target} is the leader ({} ms)",
        started.elapsed().as_millis()
    );
    Ok(())
}

pub async fn failover(cfg: &Config, to: String, accept_data_loss: bool) -> anyhow::Result<()> {
    let dcs = super::connect_dcs(cfg).await?;
    let view = dcs.read_cluster().await?;
    let target = MemberName::new(to);
    let Some(rec) = view.members.get(&target) else {
        bail!("no member named {target}")
    };
    if let Some(leader) = view.leader_record()
        && leader.state == PgState::Running
    {
        bail!(
            "{} is a healthy leader; use `pgha switchover --to {target}` for a planned handover",
            leader.name
        );
    }
    if !matches!(
        rec.state,
        PgState::Running | PgState::Streaming | PgState::InRecovery
    ) {
        bail!("{target} is not running (state: {})", rec.state);
    }
    dcs.put_failover(&FailoverRequest {
        from: view.leader.as_ref().map(|l| l.name.clone()),
        to: Some(target.clone()),
        not_before_unix_ms: None,
        accept_data_loss,
        requested_at_unix_ms: unix_ms(),
    })
    .await?;
    println!("failover to {target} requested...");
    wait_for_leader(&dcs, &target, Duration::from_secs(60)).await?;
    println!("{target} is the leader");
    Ok(())
}

pub async fn set_paused(cfg: &Config, paused: bool) -> anyhow::Result<()> {
    let dcs = super::connect_dcs(cfg).await?;
    let mut config = dcs.read_cluster().await?.config;
    config.paused = paused;
    dcs.put_config(&config).await?;
    println!(
        "{}",
        if paused {
            "cluster paused: no automatic failover until `pgha resume`"
        } else {
            "cluster resumed"
        }
    );
    Ok(())
}

pub async fn history(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let dcs = super::connect_dcs(cfg).await?;
    let view = dcs.read_cluster().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&view.history)?);
        return Ok(());
    }
    println!(
        "{:<4} {:<4} {:<14} {:<25} {:<10} {:<10} Reason",
        "Old", "New", "Switch LSN", "Time (UTC)", "From", "To"
    );
    for h in &view.history {
        let time = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + Duration::from_millis(h.at_unix_ms),
        );
        println!(
            "{:<4} {:<4} {:<14} {:<25} {:<10} {:<10} {}",
            h.old_timeline,
            h.new_timeline,
            h.switch_lsn.to_string(),
            time.to_string(),
            h.old_leader
                .as_ref()
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into()),
            h.new_leader,
            h.reason
        );
    }
    Ok(())
}

pub async fn config_show(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let dcs = super::connect_dcs(cfg).await?;
    let c = dcs.read_cluster().await?.config;
    if json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        println!("paused = {}", c.paused);
        println!("synchronous_mode = {}", c.synchronous_mode);
        println!("synchronous_node_count = {}", c.synchronous_node_count);
        println!("synchronous_quorum = {}", c.synchronous_quorum);
    }
    Ok(())
}

/// `pgha config set key=value ...`: all assignments are validated before
/// anything is written.
pub async fn config_set(cfg: &Config, assignments: &[String]) -> anyhow::Result<()> {
    let assignments = parse_assignments(assignments)?;
    let dcs = super::connect_dcs(cfg).await?;
    let mut c = dcs.read_cluster().await?.config;
    for (k, v) in &assignments {
        c.set(k, v)
            .expect("parse_assignments checked every assignment");
    }
    dcs.put_config(&c).await?;
    println!("{}", serde_json::to_string(&c)?);
    Ok(())
}

/// Splits and checks `key=value` assignments before anything is read from
/// etcd, so that a typo is a usage error (exit 2) and never half-applied.
/// Every key's values are valid whatever the current configuration.
fn parse_assignments(assignments: &[String]) -> Result<Vec<(String, String)>, UsageError> {
    let mut scratch = ClusterConfig::default();
    assignments
        .iter()
        .map(|a| {
            let (k, v) = a
                .split_once('=')
                .ok_or_else(|| UsageError(format!("{a:?}: expected key=value")))?;
            let (k, v) = (k.trim(), v.trim());
            scratch.set(k, v).map_err(UsageError)?;
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcs::LeaderKey;
    use crate::model::{Lsn, Timeline};

    fn rec(name: &str, role: PgRole, state: PgState, lsn: u64, prio: u32) -> MemberRecord {
        MemberRecord {
            name: name.into(),
            api_url: String::new(),
            host: "h".into(),
            port: 1,
            role,
            state,
            timeline: Some(Timeline(1)),
            received_lsn: Some(Lsn(lsn)),
            replayed_lsn: None,
            flushed_lsn: None,
            upstream: None,
            priority: prio,
            nofailover: false,
            nosync: false,
            last_decision: None,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn target_checks() {
        let mut view = ClusterView::default();
        for r in [
            rec("l", PgRole::Primary, PgState::Running, 1000, 100),
            rec("good", PgRole::Replica, PgState::Streaming, 1000, 100),
            rec("lagging", PgRole::Replica, PgState::Streaming, 10, 100),
            rec("down", PgRole::Unknown, PgState::Stopped, 1000, 100),
            rec("never", PgRole::Replica, PgState::Streaming, 1000, 0),
        ] {
            view.members.insert(r.name.clone(), r);
        }
        view.leader = Some(LeaderKey {
            name: "l".into(),
            lease_id: 1,
        });
        let problem =
            |n: &str| switchover_target_problem(&view, &view.members[&MemberName::from(n)], 100);
        assert_eq!(problem("good"), None);
        assert!(problem("lagging").unwrap().contains("990 bytes behind"));
        assert!(problem("down").unwrap().contains("not a streaming replica"));
        assert!(problem("never").unwrap().contains("nofailover"));
        assert!(problem("l").unwrap().contains("already the leader"));
        assert_eq!(pick_target(&view, 100), Some("good".into()));
    }

    #[test]
    fn scheduled_time_parses() {
        assert_eq!(parse_at("1970-01-01T00:00:01Z").unwrap(), 1000);
        assert!(parse_at("tomorrow").is_err());
    }
}
