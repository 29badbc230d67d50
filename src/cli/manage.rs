//! Operator commands that change the cluster through the DCS:
//! `switchover`, `failover`, `pause`, `resume`, `config`, and `history`.
//!
//! Two operators may run these at the same time. Every write is
//! conditioned on the revision it was based on: `pause`, `resume` and
//! `config set` edit named keys and start again from a fresh read when
//! someone else wrote in between ([`update_config`]); a switchover or
//! failover request never replaces a pending one unless asked to
//! (`--force`), and then only the one the operator was shown.

use std::time::Duration;

use anyhow::{Context, bail};

use super::UsageError;
use crate::config::Config;
use crate::dcs::{
    ClusterConfig, ClusterView, Dcs, DcsError, FailoverRequest, Revision, UpdateConfigError,
    update_config,
};
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

/// The pending request as the operator should see it, `None` when there
/// is none. An unreadable value still counts as pending: replacing it
/// must be as deliberate as replacing a readable one.
pub fn pending_request(view: &ClusterView) -> Option<String> {
    match (&view.failover, view.failover_revision) {
        (Some(f), _) => Some(f.to_string()),
        (None, Revision::ABSENT) => None,
        (None, _) => Some("unreadable".into()),
    }
}

/// Records `request`: creates the key, or, with `replace`, overwrites the
/// request `view` showed (and only that one).
async fn record_request(
    dcs: &dyn Dcs,
    view: &ClusterView,
    request: &FailoverRequest,
    replace: bool,
) -> anyhow::Result<()> {
    if let Some(pending) = pending_request(view)
        && !replace
    {
        bail!(
            "a switchover or failover is already pending ({pending}); wait for it, cancel it with `pgha switchover --cancel`, or replace it with --force"
        );
    }
    match dcs.put_failover(request, view.failover_revision).await {
        Ok(_) => Ok(()),
        Err(DcsError::Conflict { .. }) => {
            let now = dcs.read_cluster().await.ok();
            let pending = now
                .as_ref()
                .and_then(pending_request)
                .unwrap_or_else(|| "since withdrawn".into());
            bail!(
                "another switchover or failover request was recorded meanwhile ({pending}); nothing was changed: check `pgha list` and try again"
            )
        }
        Err(e) => Err(e.into()),
    }
}

/// `pgha switchover --cancel`: removes the pending request, if it is still
/// the one just read.
pub async fn cancel_request(cfg: &Config) -> anyhow::Result<()> {
    let dcs = super::connect_dcs(cfg).await?;
    let view = dcs.read_cluster().await?;
    let Some(pending) = pending_request(&view) else {
        println!("no switchover or failover is pending");
        return Ok(());
    };
    match dcs.clear_failover(view.failover_revision).await {
        Ok(()) => {
            println!("cancelled the pending request ({pending})");
            Ok(())
        }
        Err(DcsError::Conflict { .. }) => bail!(
            "the pending request changed while cancelling it (it was {pending}); check `pgha list` and try again"
        ),
        Err(e) => Err(e.into()),
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
    let request = FailoverRequest {
        from: Some(leader.name.clone()),
        to: Some(target.clone()),
        not_before_unix_ms: not_before,
        accept_data_loss: false,
        requested_at_unix_ms: unix_ms(),
    };
    record_request(&dcs, &view, &request, force).await?;
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

pub async fn failover(
    cfg: &Config,
    to: String,
    accept_data_loss: bool,
    replace: bool,
) -> anyhow::Result<()> {
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
    let request = FailoverRequest {
        from: view.leader.as_ref().map(|l| l.name.clone()),
        to: Some(target.clone()),
        not_before_unix_ms: None,
        accept_data_loss,
        requested_at_unix_ms: unix_ms(),
    };
    record_request(&dcs, &view, &request, replace).await?;
    println!("failover to {target} requested...");
    wait_for_leader(&dcs, &target, Duration::from_secs(60)).await?;
    println!("{target} is the leader");
    Ok(())
}

/// Adds what to do when other writers kept winning.
fn config_write_error(e: UpdateConfigError) -> anyhow::Error {
    match e {
        UpdateConfigError::Dcs(e @ DcsError::Conflict { .. }) => anyhow::Error::new(e).context(
            "other writers kept changing the cluster configuration; nothing was written by this command, try again",
        ),
        e => e.into(),
    }
}

pub async fn set_paused(cfg: &Config, paused: bool) -> anyhow::Result<()> {
    let dcs = super::connect_dcs(cfg).await?;
    update_config(&dcs, |c| {
        Ok(ClusterConfig {
            paused,
            ..c.clone()
        })
    })
    .await
    .map_err(config_write_error)?;
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
        for (key, value) in super::edit_config::flatten(&c) {
            println!("{key} = {value}");
        }
    }
    Ok(())
}

/// `pgha config set key=value ...`: all assignments are validated before
/// anything is written; only the keys named change, even when someone
/// else edits other keys at the same time.
pub async fn config_set(cfg: &Config, assignments: &[String]) -> anyhow::Result<()> {
    let pairs = parse_assignments(assignments)?;
    // The values PostgreSQL would refuse, before etcd is contacted: the
    // parameters are checked as set on an empty configuration.
    let mut wanted = ClusterConfig::default();
    for (k, v) in pairs
        .iter()
        .filter(|(k, _)| k.starts_with(ClusterConfig::PARAMETER_PREFIX))
    {
        wanted.set(k, v).map_err(UsageError)?;
    }
    super::edit_config::check_parameter_values(cfg, &ClusterConfig::default(), &wanted).await?;
    let dcs = super::connect_dcs(cfg).await?;
    let update = update_config(&dcs, |current| {
        let mut c = current.clone();
        for (k, v) in &pairs {
            c.set(k, v)?;
        }
        Ok(c)
    })
    .await
    .map_err(config_write_error)?;
    println!("{}", serde_json::to_string(&update.after)?);
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
            parameters: Default::default(),
            adoptable: false,
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
