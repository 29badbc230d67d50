//! Building the snapshot, and publishing what the loop saw and did.

use futures_util::future::join_all;

use super::Agent;
use super::status::AgentStatus;
use crate::dcs::ClusterView;
use crate::ha::membership::{self, Membership};
use crate::ha::{Decision, Job, Local, OnDisk, PeerStatus, Snapshot};
use crate::model::{MemberRecord, PgRole, PgState};
use crate::postgres::adopt::Unmanaged;
use crate::postgres::observe::Running;
use crate::postgres::{DataDirState, Observation, PgStatus};
use crate::util::{boottime_ms, unix_ms};

/// File name of the former-primary mark in the state directory.
const FORMER_PRIMARY_MARK: &str = "former-primary";
/// Present from the start of a bootstrap from a backup until the restored
/// server has promoted.
const BOOTSTRAP_RESTORE_MARK: &str = "bootstrap-restore-unfinished";

/// File name of the remembered membership in the state directory.
const MEMBERSHIP_FILE: &str = "members.json";

/// The membership saved by a previous run: without it, an agent restarted
/// while the records are expired would know no peers. Unreadable or
/// malformed means "none remembered" (the records refill it).
pub(super) fn load_membership(state: &crate::safe_fs::TrustedDir) -> Membership {
    match state.read_to_string(MEMBERSHIP_FILE) {
        Ok(Some(text)) => serde_json::from_str(&text).unwrap_or_else(|e| {
            tracing::warn!(error = %e, file = MEMBERSHIP_FILE, "ignoring an unreadable membership file");
            Membership::new()
        }),
        Ok(None) => Membership::new(),
        Err(e) => {
            tracing::warn!(error = %crate::util::chain(&e), file = MEMBERSHIP_FILE, "cannot read the membership file");
            Membership::new()
        }
    }
}

impl Agent {
    pub(super) async fn observe(&mut self) -> (Snapshot, Observation) {
        // A leader must not sit in an etcd read past the moment it has to
        // stop writes: the read gets what is left of the lease, and a read
        // cut short counts as "etcd unreachable", which the decision
        // answers with a demotion once the lease is no longer usable.
        let margin = self.cfg.ha.fence_margin.as_millis() as u64;
        let read_budget =
            crate::ha::lease::time_to_act(&self.lease.snapshot(), boottime_ms(), margin).map_or(
                self.cfg.ha.retry_timeout,
                |ms| {
                    self.cfg
                        .ha
                        .retry_timeout
                        .min(std::time::Duration::from_millis(ms))
                },
            );
        let read = match tokio::time::timeout(read_budget, self.dcs.read_cluster()).await {
            Ok(r) => r,
            Err(_) => Err(crate::dcs::DcsError::Timeout {
                action: "read the cluster state before the lease runs out",
                timeout: read_budget,
            }),
        };
        let view = match read {
            Ok(v) => {
                if self.dcs_failures > 0 {
                    tracing::info!(failed_loops = self.dcs_failures, "etcd reachable again");
                }
                self.dcs_failures = 0;
                Some(v)
            }
            Err(e) => {
                // Once at first, then every 20 loops: enough to see it is
                // still going on without drowning the log.
                if self.dcs_failures.is_multiple_of(20) {
                    tracing::warn!(error = %crate::util::chain(&e), failed_loops = self.dcs_failures + 1, endpoints = ?self.cfg.etcd.endpoints, "cannot read the cluster state from etcd; retrying");
                }
                self.dcs_failures += 1;
                None
            }
        };
        let obs = self.observer.observe().await;
        let now = boottime_ms();
        self.remember_members(view.as_ref(), now);

        if self.start_pending {
            match &obs.status {
                PgStatus::Running(_) => {
                    self.start_pending = false;
                    self.failed_starts = 0;
                }
                PgStatus::Stopped => {
                    self.start_pending = false;
                    self.failed_starts += 1;
                    tracing::warn!(failed_starts = self.failed_starts, log = %self.instance.log_file.display(), "PostgreSQL exited right after being started");
                }
                PgStatus::Starting => {}
            }
        }
        match &obs.status {
            PgStatus::Running(_) => self.down_since_ms = None,
            _ => {
                self.down_since_ms.get_or_insert(now);
            }
        }
        let running = match &obs.status {
            PgStatus::Running(r) => Some(r.as_ref()),
            _ => None,
        };
        // Failed promotions count within one tenure as key holder, until
        // the server is seen writable.
        if !self.lease.snapshot().held || running.is_some_and(|r| r.role == PgRole::Primary) {
            self.failed_promotions = 0;
            self.promoting_since_ms = None;
            self.last_promotion_error = None;
        }
        // "Not streaming since" counts only time in which streaming could
        // have worked: the leader is known to run, and the replica points
        // at the same upstream as when the count started. An etcd outage or
        // a leader change must not leave a replica that just re-pointed
        // looking stalled (it would be rewound for nothing).
        let leader_running = view
            .as_ref()
            .and_then(|v| v.leader_record())
            .is_some_and(|l| {
                l.role == PgRole::Primary && l.state == crate::model::PgState::Running
            });
        self.not_streaming_since = match (running, self.not_streaming_since.take()) {
            (Some(r), previous) if r.role == PgRole::Replica && !r.streaming && leader_running => {
                match previous {
                    Some((since, upstream)) if upstream == r.configured_upstream => {
                        Some((since, upstream))
                    }
                    _ => Some((now, r.configured_upstream.clone())),
                }
            }
            _ => None,
        };

        // The former-primary mark survives agent restarts in a file.
        match running {
            Some(r) if r.role == PgRole::Primary => self.set_former_primary(true),
            Some(r) if r.role == PgRole::Replica && r.streaming => self.set_former_primary(false),
            _ => {}
        }
        match running {
            Some(r) if r.role == PgRole::Primary => {
                if self.last_sync_setting.as_deref() != Some(r.synchronous_standby_names.as_str()) {
                    self.last_sync_setting = Some(r.synchronous_standby_names.clone());
                    self.sync_switched_at = r.flush_lsn.or(r.current_lsn);
                }
            }
            _ => {
                self.last_sync_setting = None;
                self.sync_switched_at = None;
            }
        }
        if let Some(v) = &view
            && let Some(leader) = v.leader_record()
            && leader.name != self.cfg.name
        {
            self.last_leader_lsn = leader.wal_position().or(self.last_leader_lsn);
            self.last_leader = Some(leader.name.clone());
        }

        let system_id = match (running, &obs.data) {
            (Some(r), _) => Some(r.system_id.clone()),
            (None, DataDirState::Initialized) => self
                .instance
                .controldata()
                .await
                .ok()
                .and_then(|c| c.get("Database system identifier").cloned()),
            _ => None,
        };
        let on_disk = match (&obs.status, &obs.data) {
            (PgStatus::Stopped, DataDirState::Initialized) => self.on_disk().await,
            _ => None,
        };
        self.unmanaged = match &obs.data {
            DataDirState::Initialized => self.instance.unmanaged(),
            _ => None,
        };
        let upstream = running
            .and_then(|r| r.configured_upstream.as_ref())
            .and_then(|(h, p)| membership::member_at(&self.members, h, *p));
        let peers = match (&view, running) {
            (Some(v), Some(r)) if v.leader.is_none() && r.role == PgRole::Replica => {
                self.fetch_peers().await
            }
            _ => Vec::new(),
        };
        let lease = self.lease.snapshot();
        let has_credentials = self.cfg.api.token.is_some() || self.cfg.api.basic_auth.is_some();
        self.failsafe.observe(
            &self.cfg.name,
            view.as_ref(),
            &self.members,
            lease.held,
            has_credentials,
        );
        let snapshot = Snapshot {
            now_ms: now,
            now_unix_ms: unix_ms(),
            up_since_ms: self.up_since_ms,
            me: self.cfg.name.clone(),
            ha: self.cfg.ha.clone(),
            dcs: view,
            lease,
            local: Local {
                data: obs.data.clone(),
                system_id,
                pg: obs.status.clone(),
                down_since_ms: self.down_since_ms,
                on_disk,
                upstream,
                not_streaming_since_ms: self.not_streaming_since.as_ref().map(|(since, _)| *since),
                rewind_failed: self.rewind_failed,
                former_primary: self.former_primary(),
                fence_ready: crate::ha::lease::keeper_health(now, &self.fence.view()).is_ok(),
                failed_starts: self.failed_starts,
                failed_promotions: self.failed_promotions,
                promoting_since_ms: self.promoting_since_ms,
                resigned_at_ms: self.resigned_at_ms,
                unmanaged: self.unmanaged.clone(),
                bootstrap_restore_unfinished: self.bootstrap_restore_unfinished(),
            },
            members: self.members.clone(),
            peers,
            last_leader: self.last_leader.clone(),
            last_leader_lsn: self.last_leader_lsn,
            job: self.job.as_ref().map(|j| j.kind),
            sync_switched_at: self.sync_switched_at,
            failsafe_promise: self.failsafe.promise(),
        };
        (snapshot, obs)
    }

    /// The bootstrap-restore mark, in the agent's own state directory like
    /// the former-primary mark. Unreadable counts as present: then a
    /// pending bootstrap of this member starts over rather than adopt what
    /// may be a partial copy.
    pub(super) fn bootstrap_restore_unfinished(&self) -> bool {
        self.instance
            .state
            .is_file(BOOTSTRAP_RESTORE_MARK)
            .unwrap_or(true)
    }

    pub(super) fn set_bootstrap_restore_mark(&self, on: bool) -> anyhow::Result<()> {
        let state = &self.instance.state;
        if on {
            // Durable: after a power loss the partial copy must still be
            // recognised as one.
            state.write_durable(
                BOOTSTRAP_RESTORE_MARK,
                b"a bootstrap from a backup is restoring into the data directory\n",
                0o600,
            )?;
        } else {
            state.remove(BOOTSTRAP_RESTORE_MARK)?;
        }
        Ok(())
    }

    /// The former-primary mark: a file in the agent's own state directory
    /// (the PostgreSQL account can neither create nor remove it). Anything
    /// but a clear "absent" counts as present: the mark only ever makes
    /// pgha more careful.
    pub(super) fn former_primary(&self) -> bool {
        self.instance
            .state
            .is_file(FORMER_PRIMARY_MARK)
            .unwrap_or(true)
    }

    pub(super) fn set_former_primary(&self, on: bool) {
        let state = &self.instance.state;
        let result = match (on, self.former_primary()) {
            // Durable: after a power loss the mark must still be there.
            (true, false) => state.write_durable(
                FORMER_PRIMARY_MARK,
                b"this data directory ran as a primary\n",
                0o600,
            ),
            (false, true) => state.remove(FORMER_PRIMARY_MARK),
            _ => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(error = %crate::util::chain(&e), "cannot update the former-primary mark");
        }
    }

    /// Whether a stopped data directory was last a primary. A fresh clone
    /// or a rewound directory carries a backup_label and is a standby even
    /// though its control file was copied from a primary.
    async fn on_disk(&self) -> Option<OnDisk> {
        if self.instance.data_dir.join("backup_label").exists() {
            return Some(OnDisk::Standby);
        }
        let control = self.instance.controldata().await.ok()?;
        let state = control.get("Database cluster state")?;
        Some(match state.as_str() {
            "in production" | "shut down" | "in crash recovery" => OnDisk::FormerPrimary,
            _ => OnDisk::Standby,
        })
    }

    /// Folds this loop's read into the membership, and saves it when who is
    /// known (or how to reach them) changed.
    fn remember_members(&mut self, view: Option<&ClusterView>, now: u64) {
        let ttl_ms = self.cfg.ha.ttl.as_millis() as u64;
        let reads_ok_since = match view {
            Some(_) => *self.dcs_reads_ok_since.get_or_insert(now),
            None => {
                self.dcs_reads_ok_since = None;
                now
            }
        };
        let next = membership::update(&self.members, view, now, ttl_ms, reads_ok_since);
        if !membership::same_members(&next, &self.members) {
            let names: Vec<&str> = next.keys().map(|n| n.as_str()).collect();
            tracing::info!(members = ?names, "membership changed");
            let saved = serde_json::to_vec_pretty(&next)
                .map_err(anyhow::Error::from)
                .and_then(|text| {
                    Ok(self
                        .instance
                        .state
                        .write_durable(MEMBERSHIP_FILE, &text, 0o600)?)
                });
            if let Err(e) = saved {
                tracing::warn!(error = format!("{e:#}"), "cannot save the membership");
            }
        }
        self.members = next;
    }

    /// Asks every other known member how far it is, in parallel, with a
    /// short timeout: the DCS records may be a loop old (or expired by an
    /// etcd outage), and failover must pick the member that really has the
    /// most WAL.
    async fn fetch_peers(&self) -> Vec<PeerStatus> {
        let requests = self
            .members
            .iter()
            .filter(|(name, _)| **name != self.cfg.name)
            .map(|(name, m)| {
                let url = format!("{}/status", m.api_url);
                // Members share the API credentials, so peers that keep
                // their status private (public_read = false) still answer.
                let mut request = self.http.get(&url);
                if let Some(token) = &self.cfg.api.token {
                    request = request.bearer_auth(token.expose());
                } else if let Some((user, password)) = &self.cfg.api.basic_auth {
                    request = request.basic_auth(user, Some(password.expose()));
                }
                let name = name.clone();
                async move {
                    let status = match request.send().await {
                        Ok(resp) => resp.json::<crate::api::StatusReport>().await.ok(),
                        Err(_) => None,
                    };
                    let report = status.and_then(|s| match s.report_of(&name) {
                        Ok(report) => Some(report),
                        Err(answered) => {
                            tracing::warn!(peer = %name, %url, answered = %answered, "ignoring a status that names another member; check that member's api.connect_url");
                            None
                        }
                    });
                    PeerStatus { name, report }
                }
            });
        join_all(requests).await
    }

    pub(super) async fn publish(
        &mut self,
        decision: &Decision,
        view: Option<ClusterView>,
        obs: Observation,
    ) {
        let running = match &obs.status {
            PgStatus::Running(r) => Some(r.as_ref()),
            _ => None,
        };
        let record = self.member_record(&obs, running, Some(decision.reason.to_string()));
        let reachable = view.is_some();
        if reachable && let Err(e) = self.dcs.put_member(&record).await {
            tracing::warn!(error = %crate::util::chain(&e), "cannot publish the member record");
        }
        let lease = self.lease.snapshot();
        let now = boottime_ms();
        let (mut loop_duration, mut leader_changes, previous_leader) = {
            let prev = self.status.borrow();
            let h = if prev.loop_duration.bounds_ms.is_empty() {
                super::status::Histogram::latency()
            } else {
                prev.loop_duration.clone()
            };
            (h, prev.leader_changes, prev.leader.clone())
        };
        loop_duration.observe(now.saturating_sub(self.loop_started_ms) as f64);
        let leader = view
            .as_ref()
            .and_then(|v| v.leader.as_ref().map(|l| l.name.clone()));
        if leader.is_some() && previous_leader.is_some() && leader != previous_leader {
            leader_changes += 1;
        }
        let archive = match running {
            Some(_) => self.observer.archive_status().await,
            None => None,
        };
        let status = AgentStatus {
            archive,
            failsafe: Some(self.failsafe.status(now)),
            loop_duration,
            renewal_latency: self.lease.renewal_histogram(),
            leader_changes,
            leader: leader.or(previous_leader),
            wal_position: running.and_then(Running::wal_position),
            member: Some(record),
            lease_held: lease.held,
            lease_valid: lease.held && lease.valid_until_ms.is_some_and(|u| u > now),
            dcs_reachable: reachable,
            paused: view.as_ref().is_some_and(|v| v.config.paused),
            last_decision: Some(decision.reason.to_string()),
            last_action: Some(format!("{:?}", decision.action)),
            loop_count: self.loop_count,
            view,
            last_loop_ms: now,
            renewal_latency_ms: self.lease.last_renewal_latency_ms(),
            vip: self.vip.as_ref().map(|v| v.status()),
            scheduled_backup: self.schedule.as_ref().map(|s| s.status()),
        };
        self.status.send_replace(status);
    }

    pub(super) fn member_record(
        &self,
        obs: &Observation,
        running: Option<&Running>,
        decision: Option<String>,
    ) -> MemberRecord {
        let (role, state) = match (self.job.as_ref().map(|j| j.kind), running, &obs.status) {
            (Some(Job::Cloning), _, _) => (PgRole::Unknown, PgState::Cloning),
            (Some(Job::Rewinding), _, _) => (PgRole::Unknown, PgState::Rewinding),
            (Some(Job::Bootstrapping), _, _) => (PgRole::Unknown, PgState::Initializing),
            (None, Some(r), _) if r.role == PgRole::Primary => (PgRole::Primary, PgState::Running),
            (None, Some(r), _) if r.streaming => (PgRole::Replica, PgState::Streaming),
            (None, Some(_), _) => (PgRole::Replica, PgState::InRecovery),
            (None, None, PgStatus::Starting) => (PgRole::Unknown, PgState::Starting),
            (None, None, _) => (PgRole::Unknown, PgState::Stopped),
        };
        MemberRecord {
            name: self.cfg.name.clone(),
            api_url: self.cfg.api.connect_url.clone(),
            host: self.cfg.postgres.connect_host.clone(),
            port: self.cfg.postgres.port,
            role,
            state,
            timeline: running.and_then(|r| r.timeline),
            received_lsn: running.and_then(|r| r.receive_lsn),
            replayed_lsn: running.and_then(|r| r.replay_lsn),
            flushed_lsn: running.and_then(|r| r.flush_lsn),
            upstream: running
                .and_then(|r| r.sender.as_ref())
                .and_then(|(h, p)| membership::member_at(&self.members, h, *p)),
            priority: self.cfg.ha.priority,
            // A member out of the race after resigning says so, so that
            // the others do not defer to it (agents of any version skip a
            // `nofailover` member when ranking).
            nofailover: self.cfg.ha.nofailover
                || crate::ha::promotion::barred(self.resigned_at_ms, boottime_ms(), &self.cfg.ha),
            nosync: self.cfg.ha.nosync,
            last_decision: decision,
            updated_at_ms: unix_ms(),
            parameters: self.parameters.status(),
            adoptable: self.unmanaged == Some(Unmanaged::Primary),
        }
    }

    /// After a clean stop as leader: publish the shutdown checkpoint as the
    /// final position, so that a switchover target knows what to wait for.
    pub(super) async fn publish_final_position(&mut self) {
        let Ok(control) = self.instance.controldata().await else {
            return;
        };
        let Some(lsn) = control
            .get("Latest checkpoint location")
            .and_then(|s| s.parse().ok())
        else {
            return;
        };
        let obs = Observation {
            data: DataDirState::Initialized,
            status: PgStatus::Stopped,
        };
        let mut record = self.member_record(&obs, None, Some("stopped cleanly as leader".into()));
        record.flushed_lsn = Some(lsn);
        if let Err(e) = self.dcs.put_member(&record).await {
            tracing::warn!(error = %crate::util::chain(&e), "cannot publish the final position");
        }
        tracing::info!(final_lsn = %lsn, "published the final WAL position");
    }
}
