//! Day-to-day operations across the members: `pgha restart` (rolling),
//! `reinit`, `reload` — carried out by each member's agent through its REST
//! API — and `dsn`, `topology`, read from the cluster state in etcd.
//!
//! The plans are pure functions of a `pgha list` view ([`ListOutput`]), so
//! their refusals are unit-tested; the loops that carry them out re-read
//! the cluster before every step and stop at the first surprise.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::UsageError;
use super::list::{ListMember, ListOutput};
use crate::config::Config;
use crate::dcs::Dcs;

/// One step of a rolling restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestartStep {
    /// Restart this replica in place and wait until it streams again.
    Replica(String),
    /// Hand the leader role over (planned switchover), wait until the
    /// former leader streams from the new one, then restart it.
    Leader(String),
}

/// The order of a rolling restart: the replicas first, one at a time (by
/// name), the leader last and only by switchover. `nodes` empty means every
/// member; `pending` keeps those with a parameter waiting for a restart.
pub fn plan_restart(
    list: &ListOutput,
    nodes: &[String],
    pending: bool,
    switchover: bool,
) -> anyhow::Result<Vec<RestartStep>> {
    if list.paused {
        bail!("the cluster is paused: pgha takes no action (`pgha resume` first)");
    }
    let Some(leader) = list.members.iter().find(|m| m.role == "leader") else {
        bail!("the cluster has no leader; restart nothing until it has one");
    };
    let unknown: Vec<&String> = nodes
        .iter()
        .filter(|n| !list.members.iter().any(|m| &m.name == *n))
        .collect();
    if !unknown.is_empty() {
        return Err(UsageError(format!(
            "no member named {}",
            unknown
                .iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .into());
    }
    let wanted = |m: &&ListMember| {
        (nodes.is_empty() || nodes.contains(&m.name)) && (!pending || !m.pending_restart.is_empty())
    };
    let mut replicas: Vec<&ListMember> = list
        .members
        .iter()
        .filter(wanted)
        .filter(|m| m.name != leader.name)
        .collect();
    replicas.sort_by(|a, b| a.name.cmp(&b.name));
    let mut steps: Vec<RestartStep> = replicas
        .into_iter()
        .map(|m| RestartStep::Replica(m.name.clone()))
        .collect();
    if wanted(&leader) {
        if !switchover {
            bail!(
                "{} is the leader: restarting it in place stops writes; pass --switchover to hand the role over first",
                leader.name
            );
        }
        if !list
            .members
            .iter()
            .any(|m| m.name != leader.name && is_ready(m))
        {
            bail!(
                "{} is the leader and no replica streams to take over from it",
                leader.name
            );
        }
        steps.push(RestartStep::Leader(leader.name.clone()));
    }
    Ok(steps)
}

/// Up in its role: the leader running, a replica streaming.
fn is_ready(m: &ListMember) -> bool {
    match m.role.as_str() {
        "leader" => m.state == "running",
        "replica" => m.state == "streaming",
        _ => false,
    }
}

/// Why taking `target` down now would cost availability or redundancy
/// beyond that one member: another member is not up. `None`: go ahead.
pub fn others_not_ready(list: &ListOutput, target: &str) -> Option<String> {
    if list.paused {
        return Some("the cluster is paused".into());
    }
    let down: Vec<String> = list
        .members
        .iter()
        .filter(|m| m.name != target && !is_ready(m))
        .map(|m| format!("{} is {} ({})", m.name, m.state, m.role))
        .collect();
    if !list.members.iter().any(|m| m.role == "leader") {
        return Some("the cluster has no leader".into());
    }
    (!down.is_empty()).then(|| down.join(", "))
}

/// Why wiping `target` and cloning it again would cost more than that
/// replica: it leads, there is no leader to clone from, or (mode `strict`)
/// it is the only standby, so commits would wait for the whole clone.
pub fn reinit_problem(list: &ListOutput, target: &str) -> anyhow::Result<Option<String>> {
    let Some(member) = list.members.iter().find(|m| m.name == target) else {
        return Err(UsageError(format!("no member named {target}")).into());
    };
    if member.role == "leader" {
        bail!("{target} is the leader: switch over first (`pgha switchover`), then reinit it");
    }
    if list.paused {
        bail!("the cluster is paused: pgha takes no action (`pgha resume` first)");
    }
    if !list
        .members
        .iter()
        .any(|m| m.role == "leader" && m.state == "running")
    {
        bail!("the cluster has no running leader to clone {target} from");
    }
    Ok(only_strict_standby(list, target)
        .then(|| format!("{target} is the only standby and synchronous_mode is strict: commits wait until its clone finishes")))
}

/// `target` is the only streaming standby and the mode is `strict`: while
/// it is down, commits wait.
pub fn only_strict_standby(list: &ListOutput, target: &str) -> bool {
    list.synchronous_mode == "strict"
        && !list
            .members
            .iter()
            .any(|m| m.name != target && m.role == "replica" && m.state == "streaming")
}

/// A libpq connection string for the cluster: every member's address, in
/// the order a client should try them, and the session attribute that
/// makes libpq skip the wrong ones.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Dsn {
    /// `host=a,b port=1,2 ...` (key/value form).
    pub dsn: String,
    /// `postgresql://a:1,b:2/db?...` (URI form).
    pub uri: String,
    pub hosts: Vec<String>,
    pub target_session_attrs: String,
}

/// Which server a connection string should reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DsnRole {
    /// The writable leader (`target_session_attrs=read-write`).
    Leader,
    /// A replica when one is up, else the leader (`prefer-standby`).
    Replica,
    /// Any member.
    Any,
}

pub fn build_dsn(
    list: &ListOutput,
    role: DsnRole,
    dbname: Option<&str>,
    user: Option<&str>,
) -> anyhow::Result<Dsn> {
    let mut members: Vec<&ListMember> = list.members.iter().collect();
    // The likeliest match first: libpq tries hosts in order.
    let rank = |m: &ListMember| -> u8 {
        let first = match role {
            DsnRole::Leader | DsnRole::Any => m.role == "leader",
            DsnRole::Replica => m.role == "replica" && m.state == "streaming",
        };
        u8::from(!first)
    };
    members.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.name.cmp(&b.name)));
    if members.is_empty() {
        bail!("the cluster has no members in etcd");
    }
    let attrs = match role {
        DsnRole::Leader => "read-write",
        DsnRole::Replica => "prefer-standby",
        DsnRole::Any => "any",
    };
    let hosts: Vec<String> = members
        .iter()
        .map(|m| format!("{}:{}", uri_host(&m.host), m.port))
        .collect();
    let mut kv = format!(
        "host={} port={}",
        members
            .iter()
            .map(|m| m.host.as_str())
            .collect::<Vec<_>>()
            .join(","),
        members
            .iter()
            .map(|m| m.port.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut query = vec![format!("target_session_attrs={attrs}")];
    if let Some(user) = user {
        kv.push_str(&format!(
            " user={}",
            crate::postgres::conf::quote_conninfo(user)
        ));
        query.push(format!("user={}", percent_encode(user)));
    }
    if let Some(db) = dbname {
        kv.push_str(&format!(
            " dbname={}",
            crate::postgres::conf::quote_conninfo(db)
        ));
    }
    kv.push_str(&format!(" target_session_attrs={attrs} connect_timeout=2"));
    query.push("connect_timeout=2".into());
    let uri = format!(
        "postgresql://{}/{}?{}",
        hosts.join(","),
        dbname.map(percent_encode).unwrap_or_default(),
        query.join("&")
    );
    Ok(Dsn {
        dsn: kv,
        uri,
        hosts,
        target_session_attrs: attrs.into(),
    })
}

/// IPv6 literals go in brackets inside a URI.
fn uri_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn percent_encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A member and the members streaming from it.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct TopologyNode {
    pub name: String,
    pub role: String,
    pub state: String,
    pub sync_state: String,
    pub lag_bytes: Option<u64>,
    pub timeline: Option<u32>,
    pub replicas: Vec<TopologyNode>,
}

/// Who streams from whom: the leader first with its streaming replicas
/// (and theirs, when cascading), then every member that streams from
/// nobody known (stopped, cloning, or a former primary).
pub fn topology(list: &ListOutput) -> Vec<TopologyNode> {
    fn node(list: &ListOutput, m: &ListMember, seen: &mut Vec<String>) -> TopologyNode {
        seen.push(m.name.clone());
        let mut children: Vec<&ListMember> = list
            .members
            .iter()
            .filter(|c| c.upstream.as_deref() == Some(m.name.as_str()) && !seen.contains(&c.name))
            .collect();
        children.sort_by(|a, b| a.name.cmp(&b.name));
        let replicas = children.into_iter().map(|c| node(list, c, seen)).collect();
        TopologyNode {
            name: m.name.clone(),
            role: m.role.clone(),
            state: m.state.clone(),
            sync_state: m.sync_state.clone(),
            lag_bytes: m.lag_bytes,
            timeline: m.timeline,
            replicas,
        }
    }
    let mut seen = Vec::new();
    let mut roots = Vec::new();
    // `build` puts the leader first.
    for m in &list.members {
        let upstream_known = m.upstream.as_ref().is_some_and(|u| {
            list.members
                .iter()
                .any(|o| &o.name == u && o.name != m.name)
        });
        if !upstream_known && !seen.contains(&m.name) {
            roots.push(node(list, m, &mut seen));
        }
    }
    // Members in a streaming loop (cannot happen with PostgreSQL, but a
    // stale record could say so) are shown rather than dropped.
    for m in &list.members {
        if !seen.contains(&m.name) {
            roots.push(node(list, m, &mut seen));
        }
    }
    roots
}

pub fn render_topology(roots: &[TopologyNode]) -> String {
    fn line(out: &mut String, n: &TopologyNode, prefix: &str, branch: &str) {
        let lag = n
            .lag_bytes
            .map(|l| format!("lag {l} B"))
            .unwrap_or_default();
        let tl = n.timeline.map(|t| format!("TL {t}")).unwrap_or_default();
        let role = if n.sync_state.is_empty() {
            n.role.clone()
        } else {
            format!("{} ({})", n.role, n.sync_state)
        };
        out.push_str(
            format!(
                "{prefix}{branch}{}  {role}  {}  {tl}  {lag}",
                n.name, n.state
            )
            .trim_end(),
        );
        out.push('\n');
        let child_prefix = match branch {
            "" => prefix.to_string(),
            "├─ " => format!("{prefix}│  "),
            _ => format!("{prefix}   "),
        };
        for (i, c) in n.replicas.iter().enumerate() {
            let b = if i + 1 == n.replicas.len() {
                "└─ "
            } else {
                "├─ "
            };
            line(out, c, &child_prefix, b);
        }
    }
    let mut out = String::new();
    for r in roots {
        line(&mut out, r, "", "");
    }
    out
}

/// A client for the members' APIs, with this member's credentials: the
/// mutating calls need them, and members share them.
struct Api<'a> {
    cfg: &'a Config,
    http: reqwest::Client,
}

impl<'a> Api<'a> {
    fn new(cfg: &'a Config, timeout: Duration) -> anyhow::Result<Api<'a>> {
        if cfg.api.token.is_none() && cfg.api.basic_auth.is_none() {
            bail!(
                "actions on the members go through their REST API, which needs credentials: set api.token (or api.username/api.password) in this configuration file, the same as the agents'"
            );
        }
        Ok(Api {
            cfg,
            http: crate::api::tls::peer_client(&cfg.api, timeout)?,
        })
    }

    /// `POST {api_url}{path}`: the status and the message of the answer.
    async fn post(&self, api_url: &str, path: &str) -> anyhow::Result<(u16, String)> {
        let url = format!("{api_url}{path}");
        let mut request = self
            .http
            .post(&url)
            .header("content-type", "application/json")
            .body("{}");
        if let Some(token) = &self.cfg.api.token {
            request = request.bearer_auth(token.expose());
        } else if let Some((user, password)) = &self.cfg.api.basic_auth {
            request = request.basic_auth(user, Some(password.expose()));
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let message = body["message"]
            .as_str()
            .or(body["error"].as_str())
            .unwrap_or("")
            .to_string();
        Ok((status, message))
    }
}

async fn read_list(cfg: &Config, dcs: &dyn Dcs) -> anyhow::Result<ListOutput> {
    let view = dcs.read_cluster().await?;
    Ok(super::list::build(&cfg.cluster, &view))
}

fn member<'l>(list: &'l ListOutput, name: &str) -> anyhow::Result<&'l ListMember> {
    list.members
        .iter()
        .find(|m| m.name == name)
        .with_context(|| format!("{name} is no longer a member"))
}

/// Waits until `name` is up in its role and, with `restarted`, has no
/// parameter left waiting for a restart; prints each new state on the way.
async fn wait_ready(
    cfg: &Config,
    dcs: &dyn Dcs,
    name: &str,
    restarted: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        if let Ok(list) = read_list(cfg, dcs).await
            && let Some(m) = list.members.iter().find(|m| m.name == name)
        {
            let state = format!("{} {}", m.role, m.state);
            if state != last {
                println!("  {name}: {state}");
                last = state;
            }
            if is_ready(m) && (!restarted || m.pending_restart.is_empty()) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{name} is not back ({last}) after {timeout:?}; stopping here (see `pgha list` and its agent's log)"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Restarts one replica through its API, once every other member is up.
async fn restart_replica(
    cfg: &Config,
    dcs: &dyn Dcs,
    api: &Api<'_>,
    name: &str,
    force: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let list = read_list(cfg, dcs).await?;
    if let Some(problem) = others_not_ready(&list, name) {
        bail!("not restarting {name} now: {problem}; stopping here");
    }
    let m = member(&list, name)?;
    if m.role == "leader" {
        bail!("{name} became the leader meanwhile; stopping here");
    }
    if only_strict_standby(&list, name) && !force {
        bail!(
            "{name} is the only standby and synchronous_mode is strict: commits would wait while it restarts (use --force to accept the pause)"
        );
    }
    let started = Instant::now();
    println!("restarting {name}...");
    let (status, message) = api.post(&m.api_url, "/restart").await?;
    if !(200..300).contains(&status) {
        bail!("{name} refused the restart ({status}): {message}");
    }
    wait_ready(cfg, dcs, name, true, timeout).await?;
    println!(
        "{name} restarted and streaming ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub async fn restart(
    cfg: &Config,
    nodes: Vec<String>,
    pending: bool,
    switchover: bool,
    force: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let dcs = super::connect_dcs(cfg).await?;
    let api = Api::new(cfg, timeout)?;
    let list = read_list(cfg, &dcs).await?;
    let steps = plan_restart(&list, &nodes, pending, switchover)?;
    if steps.is_empty() {
        println!(
            "nothing to restart{}",
            if pending {
                " (no member has a parameter waiting for a restart)"
            } else {
                ""
            }
        );
        return Ok(());
    }
    for step in steps {
        match step {
            RestartStep::Replica(name) => {
                restart_replica(cfg, &dcs, &api, &name, force, timeout).await?
            }
            RestartStep::Leader(name) => {
                let list = read_list(cfg, &dcs).await?;
                if let Some(problem) = others_not_ready(&list, &name) {
                    bail!("not switching over from {name} now: {problem}; stopping here");
                }
                super::manage::switchover(cfg, None, None, false).await?;
                // The former leader rejoins as a replica of the new one.
                // Its parameters may still wait for the restart that
                // follows: being up is what matters here.
                wait_ready(cfg, &dcs, &name, false, timeout).await?;
                restart_replica(cfg, &dcs, &api, &name, force, timeout).await?;
            }
        }
    }
    println!("rolling restart done");
    Ok(())
}

pub async fn reinit(
    cfg: &Config,
    node: &str,
    force: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let dcs = super::connect_dcs(cfg).await?;
    let api = Api::new(cfg, timeout)?;
    let list = read_list(cfg, &dcs).await?;
    if let Some(problem) = reinit_problem(&list, node)?
        && !force
    {
        bail!("refusing to reinit: {problem} (use --force to do it anyway)");
    }
    let m = member(&list, node)?;
    let started = Instant::now();
    println!("reinitializing {node}: its data directory is removed and cloned from the leader");
    let (status, message) = api.post(&m.api_url, "/reinitialize").await?;
    if !(200..300).contains(&status) {
        bail!("{node} refused to reinitialize ({status}): {message}");
    }
    wait_ready(cfg, &dcs, node, false, timeout).await?;
    println!(
        "{node} cloned and streaming ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub async fn reload(cfg: &Config, nodes: Vec<String>) -> anyhow::Result<()> {
    let dcs = super::connect_dcs(cfg).await?;
    let api = Api::new(cfg, Duration::from_secs(30))?;
    let list = read_list(cfg, &dcs).await?;
    let targets: Vec<&ListMember> = if nodes.is_empty() {
        list.members.iter().collect()
    } else {
        let mut t = Vec::new();
        for n in &nodes {
            t.push(
                list.members
                    .iter()
                    .find(|m| &m.name == n)
                    .ok_or_else(|| UsageError(format!("no member named {n}")))?,
            );
        }
        t
    };
    let mut failed = Vec::new();
    for m in targets {
        match api.post(&m.api_url, "/reload").await {
            Ok((status, _)) if (200..300).contains(&status) => println!("{}: reloaded", m.name),
            Ok((status, message)) => {
                println!("{}: refused ({status}): {message}", m.name);
                failed.push(m.name.clone());
            }
            Err(e) => {
                println!("{}: {e:#}", m.name);
                failed.push(m.name.clone());
            }
        }
    }
    if !failed.is_empty() {
        bail!("not reloaded: {}", failed.join(", "));
    }
    Ok(())
}

pub async fn dsn(
    cfg: &Config,
    role: DsnRole,
    dbname: Option<String>,
    user: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let dcs = super::connect_dcs(cfg).await?;
    let list = read_list(cfg, &dcs).await?;
    let dsn = build_dsn(&list, role, dbname.as_deref(), user.as_deref())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&dsn)?);
    } else {
        println!("{}", dsn.dsn);
    }
    Ok(())
}

pub async fn show_topology(cfg: &Config, json: bool) -> anyhow::Result<()> {
    let dcs = super::connect_dcs(cfg).await?;
    let list = read_list(cfg, &dcs).await?;
    let roots = topology(&list);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "cluster": list.cluster,
                "members": roots,
            }))?
        );
    } else {
        print!("{}", render_topology(&roots));
    }
    Ok(())
}

#[cfg(test)]
#[path = "operate_test.rs"]
mod tests;
