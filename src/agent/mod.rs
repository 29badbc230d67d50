//! The agent: one per PostgreSQL node.
//!
//! Each loop: observe (DCS view, local PostgreSQL, peers when racing) into a
//! [`Snapshot`](crate::ha::Snapshot), call [`ha::decide`](crate::ha::decide),
//! hand the action to the [`executor`], publish the member record, then
//! sleep `loop_wait` — or less, when the DCS watch reports a change.
//!
//! Beside the loop run the [`lease`] keeper (renews the leader lease on its
//! own task) and the [`fence`] keeper (a separate process that kills a
//! primary whose lease deadline passes). Long operations (clone, rewind)
//! run as background jobs so that the loop keeps publishing state, and so
//! do the leader's [`scheduled_backup`]s.

mod executor;
pub mod failsafe;
pub mod fence;
pub mod fence_keeper;
pub mod lease;
mod observe;
mod parameters;
mod scheduled_backup;
pub mod status;
pub mod vip;
pub mod vip_net;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use crate::config::Config;
use crate::dcs::Dcs;
use crate::dcs::etcd::EtcdDcs;
use crate::dcs::keys::Keys;
use crate::ha::{self, Action, Job};
use crate::model::Lsn;
use crate::postgres::adopt::Unmanaged;
use crate::postgres::observe::Observer;
use crate::postgres::{Instance, PgError, StopMode};
use fence::{Fence, FenceState};
use lease::LeaseKeeper;
use status::AgentStatus;

/// How soon the leader looks again while its synchronous record waits for
/// a standby's confirmation.
const SETTLING_RECHECK: Duration = Duration::from_millis(100);

/// A background job and its eventual result.
struct RunningJob {
    kind: Job,
    handle: tokio::task::JoinHandle<Result<(), PgError>>,
}

pub struct Agent {
    cfg: Config,
    dcs: Arc<dyn Dcs>,
    instance: Instance,
    observer: Observer,
    lease: LeaseKeeper,
    fence: Fence,
    failsafe: failsafe::Failsafe,
    http: reqwest::Client,
    status: watch::Sender<AgentStatus>,
    // What the loop remembers between iterations; everything else is
    // observed afresh each time.
    down_since_ms: Option<u64>,
    /// Since when a running replica has not streamed, and from which
    /// configured upstream (a new upstream restarts the count).
    not_streaming_since: Option<(u64, Option<(String, u16)>)>,
    last_leader_lsn: Option<Lsn>,
    last_leader: Option<crate::model::MemberName>,
    /// Every member known, surviving etcd outages (see `ha::membership`);
    /// also kept in the state directory across restarts.
    members: ha::membership::Membership,
    /// Since when every etcd read succeeded (`None` during an outage).
    dcs_reads_ok_since: Option<u64>,
    rewind_failed: bool,
    fence_armed_by_loop: bool,
    job: Option<RunningJob>,
    loop_count: u64,
    commands: tokio::sync::mpsc::Receiver<status::AgentCommand>,
    loop_started_ms: u64,
    /// When this agent started (`CLOCK_BOOTTIME`).
    up_since_ms: u64,
    /// `synchronous_standby_names` as last observed, and the flush position
    /// when that value was first seen (see `ha::sync`).
    last_sync_setting: Option<String>,
    dcs_failures: u64,
    last_reason: Option<String>,
    /// A start was issued and its outcome not yet observed.
    start_pending: bool,
    failed_starts: u32,
    /// Failed promotions under the current lease, and when the first was
    /// requested (see `ha::promotion`); the error of the last one.
    failed_promotions: u32,
    promoting_since_ms: Option<u64>,
    last_promotion_error: Option<String>,
    /// When this member last resigned the leader key.
    resigned_at_ms: Option<u64>,
    sync_switched_at: Option<Lsn>,
    /// The leader's synchronous record waits for a standby's confirmation
    /// ([`ha::sync::settling`]); the loop then runs every
    /// [`SETTLING_RECHECK`].
    sync_settling: bool,
    /// Set by the executor when it has just taken or resumed the leader key
    /// (the etcd lease it is bound to); the loop then decides again at once.
    key_taken: Option<i64>,
    /// What the data directory holds when pgha never managed it.
    unmanaged: Option<Unmanaged>,
    /// `[vip]`: the floating address, when configured.
    vip: Option<vip::Vip>,
    /// Cluster-wide server parameters (`postgresql.parameters`).
    parameters: parameters::Parameters,
    /// `backup.schedule`, when configured.
    schedule: Option<scheduled_backup::Scheduler>,
    /// Turns true at SIGTERM/SIGINT: the loop stops, and so do the long
    /// waits of a bootstrap from a backup.
    stop_requested: watch::Receiver<bool>,
    /// Bootstraps from a backup that failed in a row, and when this member
    /// may try again (each failure doubles the wait).
    restore_failures: u32,
    restore_retry_at: Option<tokio::time::Instant>,
}

/// Runs the agent until SIGTERM/SIGINT, then shuts down cleanly.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let instance = Instance::open(&cfg).context("prepare the state directory")?;
    let vip = match &cfg.vip {
        Some(v) => Some(vip::Vip::open(v, &cfg.path)?),
        None => None,
    };
    crate::postgres::ctl::become_subreaper();
    let keys = Keys::new(&cfg.namespace, &cfg.cluster);
    let dcs: Arc<dyn Dcs> = loop {
        match EtcdDcs::connect(
            &cfg.etcd,
            keys.clone(),
            cfg.name.clone(),
            cfg.ha.ttl,
            cfg.ha.retry_timeout,
            true,
        )
        .await
        {
            Ok(d) => break Arc::new(d),
            Err(e) => {
                tracing::warn!(error = %crate::util::chain(&e), endpoints = ?cfg.etcd.endpoints, "cannot connect to etcd; retrying");
                tokio::time::sleep(cfg.ha.loop_wait).await;
            }
        }
    };
    let fence = Fence::new(instance.state.clone())
        .with_floating_address(vip.as_ref().map(|v| v.address().clone()));
    if !matches!(fence.current(), Some(FenceState::Armed { .. })) {
        fence.disarm();
    }
    fence
        .start_keeper(&cfg.postgres.data_dir)
        .context("start the fence keeper")?;
    // Give the keeper a moment to take over before the first decision: a
    // primary left running by the previous agent is demoted if no keeper
    // guards it when the loop first looks.
    let waiting_since = crate::util::boottime_ms();
    while let Err(problem) = ha::lease::keeper_health(crate::util::boottime_ms(), &fence.view()) {
        if crate::util::boottime_ms() - waiting_since > 2_000 {
            tracing::warn!(problem = %problem, "the fence keeper has not acknowledged within 2 s");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let http = crate::api::tls::peer_client(&cfg.api, Duration::from_millis(800))
        .context("build the HTTP client for the other members' APIs ([api.tls])")?;
    let failsafe = failsafe::Failsafe::default();
    let lease = LeaseKeeper::start(
        dcs.clone(),
        fence.clone(),
        cfg.ha.ttl,
        cfg.ha.loop_wait,
        cfg.ha.fence_margin,
        Some(lease::FailsafeRounds {
            failsafe: failsafe.clone(),
            http: http.clone(),
            api: cfg.api.clone(),
            me: cfg.name.clone(),
        }),
    );
    // Before the API, which appends the proxy's counters to `/metrics`.
    // Kept until the agent returns: dropping the handle stops the proxy.
    let proxy = match &cfg.proxy {
        Some(p) => Some({
            let mut p = p.clone();
            // This node's own server is reached through its socket.
            p.unix_sockets
                .entry(cfg.name.to_string())
                .or_insert_with(|| cfg.socket_dir());
            crate::proxy::start(p, &cfg.etcd, keys.clone(), cfg.ha.ttl)
                .await
                .context("start the proxy")?
        }),
        None => None,
    };
    let (status_tx, status_rx) = watch::channel(AgentStatus::default());
    let (command_tx, commands) = tokio::sync::mpsc::channel(8);
    let api = crate::api::serve(crate::api::ApiContext {
        status: status_rx,
        dcs: dcs.clone(),
        commands: command_tx,
        config: cfg.clone(),
        failsafe: failsafe.clone(),
        proxy: proxy.as_ref().map(|p| p.shared.clone()),
    })
    .await
    .with_context(|| format!("start the REST API on {}", cfg.api.listen))?;

    let members = observe::load_membership(&instance.state);
    instance.set_cluster_parameters(parameters::load_accepted(&instance.state));
    // Signals are listened for from the start, so that one arriving while
    // the loop is busy (a bootstrap from a backup can take hours) is seen.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
        let _ = shutdown_tx.send(true);
    });
    let mut agent = Agent {
        observer: Observer::new(instance.clone()),
        instance,
        dcs,
        lease,
        fence,
        failsafe,
        http,
        status: status_tx,
        down_since_ms: None,
        not_streaming_since: None,
        last_leader_lsn: None,
        last_leader: None,
        members,
        dcs_reads_ok_since: None,
        rewind_failed: false,
        fence_armed_by_loop: false,
        job: None,
        loop_count: 0,
        commands,
        loop_started_ms: 0,
        up_since_ms: crate::util::boottime_ms(),
        last_sync_setting: None,
        dcs_failures: 0,
        last_reason: None,
        start_pending: false,
        failed_starts: 0,
        failed_promotions: 0,
        promoting_since_ms: None,
        last_promotion_error: None,
        resigned_at_ms: None,
        sync_switched_at: None,
        sync_settling: false,
        key_taken: None,
        unmanaged: None,
        vip,
        parameters: Default::default(),
        schedule: scheduled_backup::Scheduler::new(&cfg),
        stop_requested: shutdown_rx,
        restore_failures: 0,
        restore_retry_at: None,
        cfg,
    };
    tracing::info!(member = %agent.cfg.name, cluster = %agent.cfg.cluster, "agent started");

    let mut shutdown = agent.stop_requested.clone();
    loop {
        if *shutdown.borrow_and_update() {
            break;
        }
        let hurry = agent.run_once().await;
        let wait = if hurry {
            Duration::from_millis(20)
        } else if agent.sync_settling {
            // A standby's reply settles the record: notice it within
            // 100 ms rather than one loop_wait later.
            agent.cfg.ha.loop_wait.min(SETTLING_RECHECK)
        } else {
            agent.cfg.ha.loop_wait
        };
        // Wake up in time to stop writes when the lease cannot be renewed,
        // rather than one loop_wait later (the fence keeper would then fire
        // first).
        let wait = ha::lease::time_to_act(
            &agent.lease.snapshot(),
            crate::util::boottime_ms(),
            agent.cfg.ha.fence_margin.as_millis() as u64,
        )
        .map_or(wait, |ms| wait.min(Duration::from_millis(ms.max(10))));
        let postmaster = agent.instance.postmaster_pid();
        tokio::select! {
            _ = agent.dcs.wait_for_change(wait) => {}
            _ = postmaster_exit(&agent.instance, postmaster) => {
                tracing::warn!(pid = postmaster, "postmaster exited");
            }
            _ = shutdown.changed() => break,
        }
    }
    agent.shutdown().await;
    api.abort();
    Ok(())
}

/// Resolves when the postmaster that was running at the end of the loop
/// exits, so a crash is handled within ~100 ms instead of a full loop.
/// Pends forever when none was running.
async fn postmaster_exit(instance: &Instance, pid: Option<i32>) {
    let Some(pid) = pid else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if instance.postmaster_pid() != Some(pid) {
            crate::postgres::ctl::reap_postgres_orphans();
            return;
        }
    }
}

impl Agent {
    /// One HA loop. Returns true when the next loop should follow at once
    /// (the state just changed in a way that calls for another decision).
    async fn run_once(&mut self) -> bool {
        self.lease.heartbeat();
        self.loop_started_ms = crate::util::boottime_ms();
        self.reap_job().await;
        while let Ok(command) = self.commands.try_recv() {
            self.run_command(command).await;
        }
        let (snapshot, running) = self.observe().await;
        let decision = ha::decide(&snapshot);
        self.log_decision(&decision);
        self.key_taken = None;
        self.execute(&decision, &snapshot).await;
        // The key just became ours: decide again on what was read before
        // taking it rather than a loop later, so a promotion does not wait
        // for the next loop's sleep and reads (see
        // `Snapshot::with_leader_key_taken`). Only a promotion is carried
        // out at once; anything else waits for a fresh read.
        let again = self
            .key_taken
            .take()
            .and_then(|lease_id| {
                snapshot.with_leader_key_taken(
                    lease_id,
                    self.lease.snapshot(),
                    crate::util::boottime_ms(),
                )
            })
            .map(|next| (ha::decide(&next), next))
            .filter(|(again, _)| matches!(again.action, Action::Promote { .. }));
        let (snapshot, decision) = match again {
            Some((again, next)) => {
                self.log_decision(&again);
                self.execute(&again, &next).await;
                (next, again)
            }
            None => (snapshot, decision),
        };
        let hurry = matches!(
            decision.action,
            Action::AcquireLease | Action::AdoptLease { .. } | Action::Promote { .. }
        );
        self.sync_settling = match &snapshot.local.pg {
            crate::postgres::observe::PgStatus::Running(r)
                if r.role == crate::model::PgRole::Primary =>
            {
                ha::sync::SyncSetting::parse(&r.synchronous_standby_names).is_some_and(|current| {
                    ha::sync::settling(
                        &snapshot.me,
                        snapshot.dcs.as_ref().and_then(|v| v.sync.as_ref()),
                        &current,
                    )
                })
            }
            _ => false,
        };
        let view = snapshot.dcs.clone();
        self.keep_fence_consistent().await;
        self.scheduled_backup(&snapshot).await;
        self.apply_cluster_parameters(view.as_ref()).await;
        self.publish(&decision, view, running).await;
        self.loop_count += 1;
        hurry
    }

    fn log_decision(&mut self, decision: &ha::Decision) {
        let reason = decision.reason.to_string();
        if decision.reason.is_alarm() {
            if self.last_reason.as_deref() != Some(reason.as_str())
                || self.loop_count.is_multiple_of(20)
            {
                tracing::error!(reason = %reason, "operator action needed");
            }
        } else if decision.action != Action::Wait {
            tracing::info!(action = ?decision.action, reason = %reason, "decided");
        } else if self.last_reason.as_deref() != Some(reason.as_str()) {
            // Waiting is logged once per change of reason: "why is nothing
            // happening" must be answerable from the log at the default level.
            tracing::info!(reason = %reason, "waiting");
        } else {
            tracing::debug!(reason = %reason, "nothing to do");
        }
        self.last_reason = Some(reason);
    }

    /// Disarms the fence keeper once this member neither leads nor runs a
    /// writable server, so it does not kill a replica later.
    async fn keep_fence_consistent(&mut self) {
        let lease = self.lease.snapshot();
        if lease.held {
            self.fence_armed_by_loop = true;
            return;
        }
        if self.fence_armed_by_loop
            || matches!(self.fence.current(), Some(FenceState::Armed { .. }))
        {
            let obs = self.observer.observe().await;
            let writable = matches!(&obs.status, crate::postgres::PgStatus::Running(r) if r.role == crate::model::PgRole::Primary);
            if !writable && !matches!(obs.status, crate::postgres::PgStatus::Starting) {
                self.fence.disarm();
                self.fence_armed_by_loop = false;
            }
        }
    }

    async fn reap_job(&mut self) {
        let Some(job) = &self.job else { return };
        if !job.handle.is_finished() {
            return;
        }
        let job = self.job.take().expect("checked above");
        let result = job
            .handle
            .await
            .unwrap_or_else(|e| Err(PgError::Unexpected(format!("job panicked: {e}"))));
        match (job.kind, result) {
            (kind, Ok(())) => {
                tracing::info!(job = ?kind, "background job finished");
                if kind == Job::Rewinding {
                    self.rewind_failed = false;
                }
                // Rewound or freshly cloned: the history is the leader's.
                self.set_former_primary(false);
                self.failed_starts = 0;
            }
            (Job::Rewinding, Err(e)) => {
                tracing::error!(error = %crate::util::chain(&e), "pg_rewind failed");
                self.rewind_failed = true;
            }
            (kind, Err(e)) => {
                tracing::error!(job = ?kind, error = %crate::util::chain(&e), "background job failed")
            }
        }
        self.observer.reset();
    }

    /// Clean shutdown: a leader checkpoints and stops PostgreSQL, publishes
    /// its final position and releases the lease, so that a replica takes
    /// over within one loop instead of one TTL.
    async fn shutdown(&mut self) {
        tracing::info!("shutting down");
        if let Some(job) = self.job.take() {
            job.handle.abort();
        }
        if let Some(schedule) = self.schedule.as_mut() {
            schedule.stop();
        }
        let was_leader = self.lease.snapshot().held;
        if let Some(vip) = self.vip.as_mut() {
            vip.release();
        }
        if let Err(e) = self
            .instance
            .stop(StopMode::Fast, Duration::from_secs(60))
            .await
        {
            tracing::error!(error = %crate::util::chain(&e), "fast shutdown failed; stopping immediately");
            let _ = self
                .instance
                .stop(StopMode::Immediate, Duration::from_secs(10))
                .await;
        }
        if was_leader {
            self.publish_final_position().await;
            self.lease.clear();
            if let Err(e) = self.dcs.release_leader().await {
                tracing::warn!(error = %crate::util::chain(&e), "could not release the leader key; it expires with its TTL");
            }
        }
        let _ = self.dcs.delete_member().await;
        self.fence.exit();
        tracing::info!("stopped");
    }
}
