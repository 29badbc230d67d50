//! The executor: the only code that turns an [`Action`] into side effects.
//!
//! Each step re-checks the one precondition that safety rests on where a
//! race is possible (the lease before anything writable), logs what it
//! does, and leaves retrying to the next loop: a failed step is reported
//! and the next snapshot decides again.

use std::time::Duration;

use anyhow::Context;

use super::{Agent, RunningJob};
use crate::dcs::SyncRecord;
use crate::dcs::{ClusterView, Initialize};
use crate::ha::sync::SyncSetting;
use crate::ha::{Action, Decision, DemoteReason, Job, Snapshot};
use crate::model::{HistoryEntry, MemberName, Timeline};
use crate::postgres::conf::Upstream;
use crate::postgres::{Instance, PgError, PgStatus, StopMode, promote, query};
use crate::util::{boottime_ms, unix_ms};

impl Agent {
    pub(super) async fn execute(&mut self, decision: &Decision, s: &Snapshot) {
        self.reconcile_vip(decision, s);
        let result: anyhow::Result<()> = match &decision.action {
            Action::Wait => Ok(()),
            Action::Bootstrap => self.bootstrap(s).await,
            Action::Adopt => self.adopt_database(s).await,
            Action::Clone { leader } => self.start_job(Job::Cloning, s, leader, false),
            Action::Reclone { leader } => self.start_job(Job::Cloning, s, leader, true),
            Action::Rewind { leader } => self.start_job(Job::Rewinding, s, leader, false),
            Action::StartReplica { leader } => self.start_replica(s, leader.as_ref()).await,
            Action::StartPrimary { sync } => self.start_primary(sync).await,
            Action::Follow { leader } => self.follow(s, leader).await,
            Action::AcquireLease => self.acquire().await,
            Action::AdoptLease { lease_id } => self.adopt(*lease_id).await,
            Action::Promote { sync } => {
                self.promoting_since_ms.get_or_insert(boottime_ms());
                let result = self.promote(s, sync.as_ref()).await;
                if let Err(e) = &result {
                    self.failed_promotions += 1;
                    self.last_promotion_error = Some(format!("{e:#}"));
                }
                result
            }
            Action::WriteFailsafeRecord(record) => {
                self.dcs.put_failsafe(record).await.map_err(Into::into).map(|()| {
                    tracing::info!(members = ?record.members.keys().collect::<Vec<_>>(), "recorded the failsafe membership");
                })
            }
            Action::WriteSyncRecord(record) => {
                self.dcs.put_sync(record).await.map_err(Into::into).map(|()| {
                    tracing::info!(members = ?record.members, k = record.quorum, degraded = record.degraded, "recorded the synchronous set");
                })
            }
            Action::SetSyncSetting(setting) => self.set_sync_setting(setting).await,
            Action::Lead {
                create_slots,
                drop_slots,
            } => self.sync_slots(create_slots, drop_slots, true).await,
            Action::PrepareSlots {
                create_slots,
                drop_slots,
                reset_slots,
            } => {
                let synced = self.sync_slots(create_slots, drop_slots, false).await;
                match synced {
                    Ok(()) => self.reset_slots(reset_slots).await,
                    Err(e) => Err(e),
                }
            }
            Action::Demote { reason } => self.demote(*reason).await,
            Action::ReleaseLease => self.release().await,
            Action::Resign { failed_promotions } => self.resign(*failed_promotions).await,
            Action::StopAndRelease => {
                let r = self
                    .instance
                    .stop(StopMode::Immediate, Duration::from_secs(10))
                    .await;
                self.release().await.and(r.map_err(Into::into))
            }
        };
        if let Err(e) = result {
            tracing::error!(action = ?decision.action, error = format!("{e:#}"), "action failed");
        }
        self.reconcile_vip_after(decision).await;
    }

    fn upstream_for(&self, view: Option<&ClusterView>, leader: &MemberName) -> Option<Upstream> {
        let rec = view?.members.get(leader)?;
        Some(Upstream {
            host: rec.host.clone(),
            port: rec.port,
            user: self.cfg.postgres.replication.username.clone(),
            slot: self.cfg.name.slot_name(),
        })
    }

    /// The decision's lease rule, asked again at the last moment before
    /// anything writable: time has passed since the snapshot.
    fn lease_valid_now(&self) -> bool {
        crate::ha::lease::lease_usable(
            &self.lease.snapshot(),
            boottime_ms(),
            self.cfg.ha.fence_margin.as_millis() as u64,
        )
    }

    /// Records a lease just taken and waits until the fence keeper guards
    /// it. Without that acknowledgement the lease never becomes usable: the
    /// next decision demotes (if writable) and then releases it, in that
    /// order, so it is not given back here.
    async fn take_lease(&mut self, r: crate::dcs::LeaseRenewal) -> anyhow::Result<()> {
        self.lease
            .record(r, None)
            .context("took the leader lease but cannot arm the fence keeper")?;
        self.lease
            .wait_until_guarded(Duration::from_millis(500))
            .await
            .map_err(|p| anyhow::anyhow!("took the leader lease but {p}"))?;
        self.key_taken = Some(r.lease_id);
        Ok(())
    }

    async fn bootstrap(&mut self, s: &Snapshot) -> anyhow::Result<()> {
        let from_backup = self.cfg.bootstrap.from_backup.clone();
        // A restore that keeps failing the same way (a target past the end
        // of the archive, say) is not retried at once: each one may read
        // the whole backup again.
        if from_backup.is_some()
            && let Some(at) = self.restore_retry_at
            && tokio::time::Instant::now() < at
        {
            return Ok(());
        }
        let resuming = matches!(s.dcs.as_ref().and_then(|v| v.initialize.as_ref()), Some(Initialize::Pending { by }) if by == &self.cfg.name);
        if !resuming && !self.dcs.claim_initialize().await? {
            tracing::info!("another member won the bootstrap race");
            return Ok(());
        }
        // initdb (or the restore) and the first start block this loop for
        // a while; once the lease is held, the waits keep it alive.
        self.lease.expect_busy(Duration::from_secs(360));
        let result = match &from_backup {
            Some(from) => {
                tracing::info!("won the bootstrap race; restoring the cluster from a backup");
                match self.restore_and_promote(from).await {
                    // The data is whole from here: a failure keeps it.
                    Ok(restored) => return self.finish_restored(&restored).await,
                    Err(e) => Err(e),
                }
            }
            None => {
                tracing::info!("won the bootstrap race; running initdb");
                self.bootstrap_claimed().await
            }
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::error!(
                    error = format!("{e:#}"),
                    "bootstrap failed; giving the claim up"
                );
                let _ = self
                    .instance
                    .stop(StopMode::Immediate, Duration::from_secs(10))
                    .await;
                let _ = self.release().await;
                if self.instance.remove_data_dir().is_ok() && from_backup.is_some() {
                    let _ = self.set_bootstrap_restore_mark(false);
                }
                let _ = self.dcs.abandon_initialize().await;
                if from_backup.is_some() {
                    self.restore_failures += 1;
                    let wait = restore_backoff(self.restore_failures);
                    self.restore_retry_at = Some(tokio::time::Instant::now() + wait);
                    tracing::warn!(
                        failures = self.restore_failures,
                        retry_in_s = wait.as_secs(),
                        "the restore will be tried again (by this member; another may try sooner)"
                    );
                }
                Err(e)
            }
        }
    }

    /// Makes the database already in the data directory the first leader.
    /// Unlike a bootstrap, a failure never removes anything, and the claim
    /// is kept: the next loop tries again (the other members wait rather
    /// than create an empty cluster beside the operator's database). The
    /// database is left stopped with pgha's configuration files, the
    /// originals kept beside them.
    async fn adopt_database(&mut self, s: &Snapshot) -> anyhow::Result<()> {
        let resuming = matches!(s.dcs.as_ref().and_then(|v| v.initialize.as_ref()), Some(Initialize::Pending { by }) if by == &self.cfg.name);
        if !resuming && !self.dcs.claim_initialize().await? {
            tracing::info!("another member won the race to initialize the cluster");
            return Ok(());
        }
        tracing::info!(data_dir = %self.instance.data_dir.display(), "adopting the existing database as the cluster's first leader");
        // Stopping a busy server, crash recovery in single-user mode and
        // the first start block this loop for a while.
        self.lease.expect_busy(Duration::from_secs(900));
        match self.adopt_claimed().await {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::error!(
                    error = format!("{e:#}"),
                    "adoption failed; retrying (the data is untouched)"
                );
                let _ = self
                    .instance
                    .stop(StopMode::Fast, Duration::from_secs(60))
                    .await;
                let _ = self.release().await;
                Err(e)
            }
        }
    }

    async fn adopt_claimed(&mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.instance.postmaster_pid() {
            // The settings pgha needs (replication, wal_log_hints, its
            // authentication rules) take a restart; this is the moment, as
            // the cluster has no other server to keep writes going.
            tracing::warn!(
                pid,
                "stopping the running server to adopt it (fast shutdown: open transactions are rolled back)"
            );
            self.instance
                .stop(StopMode::Fast, Duration::from_secs(300))
                .await
                .context("stop the server to adopt it")?;
        }
        let disabled = self.instance.adopt_config_files()?;
        if !disabled.is_empty() {
            tracing::warn!(settings = ?disabled, "disabled settings of the adopted configuration that pgha manages itself");
        }
        let verifier = |password: &crate::secret::SecretString| {
            postgres_protocol::password::scram_sha_256(password.expose().as_bytes())
        };
        let sql = crate::postgres::adopt::roles_sql(
            &self.cfg.postgres.superuser.username,
            &verifier(&self.cfg.postgres.superuser.password),
            &self.cfg.postgres.replication.username,
            &verifier(&self.cfg.postgres.replication.password),
        );
        // Single-user mode reads postgresql.conf: pgha's, from now on.
        self.instance.write_config(false, None, None)?;
        self.instance.set_roles_single_user(&sql).await?;
        // The lease comes before the first writable start, always.
        let Some(renewal) = self.dcs.acquire_leader().await? else {
            anyhow::bail!(
                "the leader key is held by another member although the cluster was not initialized"
            );
        };
        self.take_lease(renewal).await?;
        self.instance.start().await?;
        self.wait_until_running(Duration::from_secs(600)).await?;
        let system_id = self.read_system_id().await?;
        self.dcs.complete_initialize(&system_id).await?;
        // Resuming a restored cluster ends here too: nothing of the
        // restore is needed any more.
        let _ = self.instance.remove_bootstrap_source();
        tracing::info!(
            system_id,
            "existing database adopted; this member leads (the original pg_hba.conf is kept as {})",
            crate::postgres::adopt::HBA_BEFORE_ADOPTION
        );
        Ok(())
    }

    async fn read_system_id(&mut self) -> anyhow::Result<String> {
        let client = self.observer.client().await?;
        let row = client
            .query_one(
                "SELECT system_identifier::text FROM pg_control_system()",
                &[],
            )
            .await
            .map_err(|source| PgError::Sql {
                action: "read the system identifier".into(),
                source,
            })?;
        Ok(row.get(0))
    }

    async fn bootstrap_claimed(&mut self) -> anyhow::Result<()> {
        self.instance.remove_data_dir()?;
        // A mark left by a restore that was given up (the table removed
        // since) would make a later failed adoption look like one.
        self.set_bootstrap_restore_mark(false)?;
        self.instance.initdb().await?;
        // The lease comes before the first writable start, always.
        let Some(renewal) = self.dcs.acquire_leader().await? else {
            anyhow::bail!(
                "the leader key is held by another member although the cluster was not initialized"
            );
        };
        self.take_lease(renewal).await?;
        self.instance.write_config(false, None, None)?;
        self.instance.start().await?;
        self.wait_until_running(Duration::from_secs(60)).await?;
        let client = self.observer.client().await?;
        let verifier = postgres_protocol::password::scram_sha_256(
            self.cfg.postgres.replication.password.expose().as_bytes(),
        );
        // The password goes in as a SCRAM verifier computed here, so the
        // clear text never reaches the server (or its statement log).
        client
            .batch_execute(&format!(
                "CREATE ROLE {} WITH REPLICATION LOGIN PASSWORD '{}'",
                self.cfg.postgres.replication.username, verifier
            ))
            .await
            .map_err(|source| PgError::Sql {
                action: "create the replication role".into(),
                source,
            })?;
        let system_id = self.read_system_id().await?;
        self.dcs.complete_initialize(&system_id).await?;
        tracing::info!(system_id, "cluster initialized; this member leads");
        Ok(())
    }

    /// `[bootstrap.from_backup]`, first part: the backup unpacked and
    /// replayed to its target, promoted. The copy is unpacked and
    /// configured first; the lease comes before the server starts, because
    /// recovery ends in a promotion (the invariant of
    /// [`Self::bootstrap_claimed`]: nothing writable without the lease).
    /// Ends with the recovery settings gone and the restore mark cleared:
    /// from then on the data is whole and is never removed.
    async fn restore_and_promote(
        &mut self,
        from: &crate::config::bootstrap::FromBackup,
    ) -> anyhow::Result<crate::postgres::ctl::BootstrapRestore> {
        // Marked before anything is written: a crash from here until the
        // promotion leaves a partial copy that the next loop restores
        // again instead of adopting (see `Reason::RestartingRestore`).
        self.set_bootstrap_restore_mark(true)
            .context("mark the data directory as being restored")?;
        if self.instance.postmaster_pid().is_some() {
            // Only a restore of this member's own, cut short, runs here:
            // the cluster does not exist yet.
            self.instance
                .stop(StopMode::Immediate, Duration::from_secs(10))
                .await?;
        }
        self.instance.remove_data_dir()?;
        let mut stop = self.stop_requested.clone();
        let restored = tokio::select! {
            r = self.instance.restore_for_bootstrap(from) => r.context("restore the backup")?,
            // Dropping the restore kills its command.
            _ = stop.wait_for(|s| *s) => anyhow::bail!("the agent is stopping"),
        };
        tracing::info!(
            backup = restored.backup,
            timeline = restored.timeline.0,
            target = %from.target_text,
            "backup unpacked; taking the lease, then replaying archived WAL to the target"
        );
        self.instance.write_config(false, None, None)?;
        self.instance
            .write_bootstrap_recovery(&crate::backup::bootstrap::recovery_settings(
                &from.target,
                restored.timeline,
                &restored.restore_command,
                &restored.backup,
            ))?;
        // The loop has been busy unpacking: say it is alive before the
        // lease keeper is asked to renew.
        self.lease.heartbeat();
        let Some(renewal) = self.dcs.acquire_leader().await? else {
            anyhow::bail!(
                "the leader key is held by another member although the cluster was not initialized"
            );
        };
        self.take_lease(renewal).await?;
        self.instance.start().await?;
        self.wait_until_restore_promoted().await?;
        // PostgreSQL read its recovery settings at start; emptied now, so
        // that nothing of them outlives the restore (a later start, or a
        // replica's copy of this directory).
        self.instance.write_config(false, None, None)?;
        self.set_bootstrap_restore_mark(false)
            .context("clear the restore mark")?;
        self.restore_failures = 0;
        self.restore_retry_at = None;
        Ok(restored)
    }

    /// `[bootstrap.from_backup]`, second part, on a promoted restore: the
    /// backup's roles are the old cluster's, so pgha's own are set in
    /// single-user mode (which needs the server stopped), as for an
    /// adopted database; then the cluster is initialized. A failure keeps
    /// the data and the claim, as an adoption does: the next loop finishes
    /// the initialization on it (`Reason::ResumingInitialization`).
    async fn finish_restored(
        &mut self,
        restored: &crate::postgres::ctl::BootstrapRestore,
    ) -> anyhow::Result<()> {
        let result = self.finish_restored_steps(restored).await;
        if let Err(e) = &result {
            tracing::error!(
                error = format!("{e:#}"),
                "finishing the restored cluster failed; retrying on the same data (nothing is removed)"
            );
            let _ = self
                .instance
                .stop(StopMode::Fast, Duration::from_secs(1800))
                .await;
            let _ = self.release().await;
        }
        result
    }

    async fn finish_restored_steps(
        &mut self,
        restored: &crate::postgres::ctl::BootstrapRestore,
    ) -> anyhow::Result<()> {
        // The shutdown checkpoint after a long replay may write much.
        self.lease.expect_busy(Duration::from_secs(2400));
        self.instance
            .stop(StopMode::Fast, Duration::from_secs(1800))
            .await
            .context("stop the restored server to set pgha's roles")?;
        let verifier = |password: &crate::secret::SecretString| {
            postgres_protocol::password::scram_sha_256(password.expose().as_bytes())
        };
        let sql = crate::postgres::adopt::roles_sql(
            &self.cfg.postgres.superuser.username,
            &verifier(&self.cfg.postgres.superuser.password),
            &self.cfg.postgres.replication.username,
            &verifier(&self.cfg.postgres.replication.password),
        );
        self.instance.set_roles_single_user(&sql).await?;
        if !self.lease_valid_now() {
            anyhow::bail!("the lease ran out while the restored server was stopped");
        }
        self.instance.start().await?;
        self.wait_until_running(Duration::from_secs(600)).await?;
        let system_id = self.read_system_id().await?;
        self.dcs.complete_initialize(&system_id).await?;
        if let Err(e) = self.instance.remove_bootstrap_source() {
            tracing::warn!(error = %crate::util::chain(&e), "cannot remove the bootstrap's repository file");
        }
        tracing::info!(
            system_id,
            backup = restored.backup,
            timeline = restored.timeline.0,
            "cluster initialized from a backup; this member leads"
        );
        Ok(())
    }

    /// Waits, keeping the lease alive, until the restored server has
    /// replayed to its target and promoted. Replay has no time limit (a
    /// week of WAL takes long); a server that stops (a missing segment, a
    /// target it cannot reach, the fence keeper after a lost lease) fails
    /// the bootstrap, with the end of its log in the error.
    async fn wait_until_restore_promoted(&mut self) -> anyhow::Result<()> {
        let started = tokio::time::Instant::now();
        let mut last_report = started;
        let mut gone_since: Option<tokio::time::Instant> = None;
        loop {
            self.lease.heartbeat();
            if *self.stop_requested.borrow() {
                anyhow::bail!("the agent is stopping");
            }
            if self.instance.bootstrap_recovery_finished()? {
                tracing::info!(
                    elapsed_s = started.elapsed().as_secs(),
                    "the restored server reached its target and promoted"
                );
                return Ok(());
            }
            // The postmaster writes its pid file a moment after pg_ctl
            // returns; only an absence that lasts means it exited.
            if self.instance.postmaster_pid().is_none() {
                let since = *gone_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() > Duration::from_secs(5) {
                    anyhow::bail!(
                        "the restored server stopped before it promoted; the end of {}:\n{}",
                        self.instance.log_file.display(),
                        self.instance.log_tail(15)
                    );
                }
            } else {
                gone_since = None;
            }
            if last_report.elapsed() >= Duration::from_secs(30) {
                last_report = tokio::time::Instant::now();
                // Hot standby is off during the replay: the control file,
                // not a session, says how far it got.
                let c = self.instance.controldata().await.unwrap_or_default();
                let field = |k: &str| c.get(k).map_or("unknown", String::as_str).to_string();
                tracing::info!(
                    elapsed_s = started.elapsed().as_secs(),
                    checkpoint = field("Latest checkpoint location"),
                    min_recovery_end = field("Minimum recovery ending location"),
                    "replaying archived WAL to the bootstrap target"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn wait_until_running(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.lease.heartbeat();
            let obs = self.observer.observe().await;
            if matches!(obs.status, PgStatus::Running(_)) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "PostgreSQL did not accept connections within {timeout:?}; see {}",
                    self.instance.log_file.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clone and rewind run in the background: they can take minutes, and
    /// the loop must keep publishing "cloning"/"rewinding" meanwhile. Each
    /// job ends with PostgreSQL started as a replica of `leader`.
    fn start_job(
        &mut self,
        kind: Job,
        s: &Snapshot,
        leader: &MemberName,
        wipe: bool,
    ) -> anyhow::Result<()> {
        let Some(up) = self.upstream_for(s.dcs.as_ref(), leader) else {
            anyhow::bail!("no record for leader {leader}");
        };
        let instance = self.instance.clone();
        let leader_timeline = s
            .dcs
            .as_ref()
            .and_then(|v| v.members.get(leader))
            .and_then(|m| m.timeline);
        let system_id = match s.dcs.as_ref().and_then(|v| v.initialize.as_ref()) {
            Some(crate::dcs::Initialize::Done { system_id }) => Some(system_id.clone()),
            _ => None,
        };
        tracing::info!(job = ?kind, %leader, host = %up.host, port = up.port, "starting background job");
        let handle = tokio::spawn(async move {
            match kind {
                Job::Rewinding => {
                    instance
                        .stop(StopMode::Fast, Duration::from_secs(60))
                        .await?;
                    // The server must not start before this config is in
                    // place: rewound data follows the leader, never leads.
                    instance.rewind(&up.host, up.port).await?;
                }
                _ => {
                    if wipe {
                        instance
                            .stop(StopMode::Immediate, Duration::from_secs(10))
                            .await?;
                        instance.remove_data_dir()?;
                    }
                    if !restored_from_backup(&instance, leader_timeline, system_id.as_deref()).await
                        && let Err(e) = instance.basebackup(&up).await
                    {
                        // A half-copied directory is useless and would
                        // block the next attempt.
                        let _ = instance.remove_data_dir();
                        return Err(e);
                    }
                }
            }
            start_as_replica(&instance, Some(up)).await
        });
        self.job = Some(RunningJob { kind, handle });
        Ok(())
    }

    async fn start_replica(
        &mut self,
        s: &Snapshot,
        leader: Option<&MemberName>,
    ) -> anyhow::Result<()> {
        let up = match leader {
            Some(l) => Some(
                self.upstream_for(s.dcs.as_ref(), l)
                    .ok_or_else(|| anyhow::anyhow!("no record for leader {l}"))?,
            ),
            None => None,
        };
        start_as_replica(&self.instance, up).await?;
        self.start_pending = true;
        self.observer.reset();
        Ok(())
    }

    async fn start_primary(&mut self, sync: &SyncSetting) -> anyhow::Result<()> {
        if !self.lease_valid_now() {
            anyhow::bail!("refusing to start writable: the lease is not valid");
        }
        self.instance
            .write_config(false, None, Some(sync.render()))?;
        self.instance.start().await?;
        self.observer.reset();
        Ok(())
    }

    async fn follow(&mut self, s: &Snapshot, leader: &MemberName) -> anyhow::Result<()> {
        let up = self
            .upstream_for(s.dcs.as_ref(), leader)
            .ok_or_else(|| anyhow::anyhow!("no record for leader {leader}"))?;
        self.instance.write_config(true, Some(up), None)?;
        // PostgreSQL 13+ restarts the WAL receiver on reload when
        // primary_conninfo changes: no restart, no lost connections.
        self.reload("new upstream").await?;
        Ok(())
    }

    async fn acquire(&mut self) -> anyhow::Result<()> {
        // Checked under the lock the API confirms failsafe leaders under:
        // a promise given after the decision still stops the race here.
        if let Err(p) = self.failsafe.begin_race(crate::util::boottime_ms()) {
            anyhow::bail!(
                "not taking the leader key: promised failsafe leader {} not to",
                p.leader
            );
        }
        match self.dcs.acquire_leader().await {
            Ok(Some(r)) => {
                self.take_lease(r).await?;
                tracing::info!("acquired the leader lease");
            }
            Ok(None) => {
                self.failsafe.end_race();
                tracing::info!("another member acquired the leader lease first");
            }
            // Whether the key was taken is unknown: keep refusing
            // confirmations until the next loop has read etcd.
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    async fn adopt(&mut self, lease_id: i64) -> anyhow::Result<()> {
        match self.dcs.adopt_leader(lease_id).await? {
            Some(r) => {
                self.take_lease(r).await?;
                tracing::info!(lease_id, "resumed the leader lease held before the restart");
            }
            None => tracing::warn!(
                lease_id,
                "the leader lease from before the restart has expired"
            ),
        }
        Ok(())
    }

    async fn promote(
        &mut self,
        s: &Snapshot,
        sync: Option<&(SyncRecord, SyncSetting)>,
    ) -> anyhow::Result<()> {
        if !self.lease_valid_now() {
            anyhow::bail!("refusing to promote: the lease is not valid");
        }
        let (old_tl, replayed, upstream) = match &s.local.pg {
            PgStatus::Running(r) => (
                r.timeline.unwrap_or_default(),
                r.replay_lsn.unwrap_or_default(),
                r.configured_upstream.clone(),
            ),
            _ => anyhow::bail!("PostgreSQL is not running"),
        };
        let ssn = sync.map(|(_, setting)| setting.render());
        if let Some((record, _)) = sync {
            // Record first, then the setting, then the promotion: the new
            // leader's first commit already waits for a recorded standby.
            self.dcs.put_sync(record).await?;
            let up = upstream.map(|(host, port)| Upstream {
                host,
                port,
                user: self.cfg.postgres.replication.username.clone(),
                slot: self.cfg.name.slot_name(),
            });
            self.instance.write_config(true, up, ssn.clone())?;
            self.reload("synchronous standbys before promotion").await?;
        }
        // The configuration is rewritten only after the promotion: the
        // startup process removes standby.signal itself and treats a
        // missing file as fatal.
        self.lease.expect_busy(Duration::from_secs(65));
        let client = self.observer.client().await?;
        let promoted = promote::promote(client, Duration::from_secs(60)).await?;
        let new_tl = promoted.timeline.unwrap_or(old_tl);
        // Logged at once: the line's time is when writes became possible
        // (pgha-bench reads it).
        tracing::info!(
            ms = promoted.elapsed.as_millis() as u64,
            wakeups = promoted.wakeups,
            timeline = %new_tl,
            "promoted"
        );
        // primary_conninfo must not survive into the next start of a primary.
        self.instance.write_config(false, None, ssn)?;
        // A checkpoint puts the new timeline into pg_control, which is what
        // pg_rewind on the former primary reads. In the background: it may
        // take a while and nothing here waits for it.
        let config = self.instance.client_config();
        tokio::spawn(async move {
            if let Ok((client, connection)) = config.connect(tokio_postgres::NoTls).await {
                tokio::spawn(connection);
                if let Err(e) = client.batch_execute(query::CHECKPOINT).await {
                    tracing::warn!(error = %crate::util::chain(&e), "post-promotion checkpoint failed");
                }
            }
        });
        // The exact branch point decides whether a replica must be rewound
        // (`ha::decide::history_shared`). Without it, the position replayed
        // before the request is a lower bound: a replica below it surely
        // shares the history, and one above it is rewound, which is safe.
        let switch_lsn = match promote::switch_point(client, new_tl, old_tl).await {
            Ok(Some(lsn)) => lsn,
            Ok(None) => {
                tracing::warn!(fallback = %replayed, "the timeline history file names no switch point for the old timeline");
                replayed
            }
            Err(e) => {
                tracing::warn!(error = %crate::util::chain(&e), fallback = %replayed, "cannot read the switch point from the timeline history file");
                replayed
            }
        };
        let view = s.dcs.as_ref();
        let failover = view.and_then(|v| v.failover.clone());
        let entry = HistoryEntry {
            old_timeline: old_tl,
            new_timeline: new_tl,
            switch_lsn,
            at_unix_ms: unix_ms(),
            reason: match &failover {
                Some(f) if f.from.is_some() => "switchover".into(),
                Some(_) => "manual failover".into(),
                None => "failover".into(),
            },
            old_leader: failover
                .as_ref()
                .and_then(|f| f.from.clone())
                .or_else(|| self.last_leader.clone()),
            new_leader: self.cfg.name.clone(),
        };
        if let Err(e) = self.dcs.append_history(&entry).await {
            tracing::warn!(error = %crate::util::chain(&e), "cannot record the timeline switch in the history");
        }
        // Conditioned on the request this promotion served: one recorded
        // since then is a new operator decision and stays.
        if failover.is_some()
            && let Err(e) = self
                .dcs
                .clear_failover(view.map_or(Default::default(), |v| v.failover_revision))
                .await
        {
            tracing::warn!(error = %crate::util::chain(&e), "cannot clear the failover request");
        }
        Ok(())
    }

    async fn set_sync_setting(&mut self, setting: &SyncSetting) -> anyhow::Result<()> {
        self.instance
            .write_config(false, None, Some(setting.render()))?;
        self.reload("synchronous_standby_names").await?;
        tracing::info!(synchronous_standby_names = %setting.render(), "synchronous standbys changed");
        Ok(())
    }

    /// `reserve`: hold WAL from now on (a leader's slots); a replica's
    /// slots wait for their member's first connection, or they would keep
    /// the replica's WAL forever.
    async fn sync_slots(
        &mut self,
        create: &[String],
        drop: &[String],
        reserve: bool,
    ) -> anyhow::Result<()> {
        let client = self.observer.client().await?;
        for slot in create {
            client
                .execute(query::CREATE_SLOT, &[slot, &reserve])
                .await
                .map_err(|source| PgError::Sql {
                    action: format!("create slot {slot}"),
                    source,
                })?;
            tracing::info!(slot, reserve, "created replication slot");
        }
        for slot in drop {
            let dropped = client
                .execute(query::DROP_SLOT, &[slot])
                .await
                .map_err(|source| PgError::Sql {
                    action: format!("drop slot {slot}"),
                    source,
                })?;
            // An active slot (its member is streaming again) is kept.
            if dropped > 0 {
                tracing::info!(slot, "dropped replication slot");
            }
        }
        Ok(())
    }

    /// Drops each slot and creates it again without reserving WAL, on a
    /// replica, so it no longer holds the WAL and xmin of a former
    /// leadership (see `ha::slots`). A slot a member started streaming from
    /// since the snapshot is not dropped, and so not recreated either.
    async fn reset_slots(&mut self, slots: &[String]) -> anyhow::Result<()> {
        let client = self.observer.client().await?;
        for slot in slots {
            let dropped = client
                .execute(query::DROP_SLOT, &[slot])
                .await
                .map_err(|source| PgError::Sql {
                    action: format!("drop slot {slot} to reset it"),
                    source,
                })?;
            if dropped == 0 {
                continue;
            }
            client
                .execute(query::CREATE_SLOT, &[slot, &false])
                .await
                .map_err(|source| PgError::Sql {
                    action: format!("create slot {slot} again, unreserved"),
                    source,
                })?;
            tracing::info!(
                slot,
                "reset replication slot: it held WAL or an xmin from when this member led"
            );
        }
        Ok(())
    }

    async fn demote(&mut self, reason: DemoteReason) -> anyhow::Result<()> {
        let mode = if reason == DemoteReason::Switchover {
            StopMode::Fast
        } else {
            StopMode::Immediate
        };
        tracing::warn!(?reason, ?mode, "demoting: stopping PostgreSQL");
        self.lease.expect_busy(Duration::from_secs(75));
        let stopped = self.instance.stop(mode, Duration::from_secs(60)).await;
        if stopped.is_err() {
            // Writes must stop; a failed fast shutdown is not an option.
            self.instance
                .stop(StopMode::Immediate, Duration::from_secs(10))
                .await?;
        }
        self.observer.reset();
        if reason == DemoteReason::Switchover {
            self.publish_final_position().await;
        }
        if self.lease.snapshot().held {
            self.release().await?;
        }
        Ok(())
    }

    /// Operator requests from the REST API.
    pub(super) async fn run_command(&mut self, command: super::status::AgentCommand) {
        use super::status::AgentCommand;
        match command {
            AgentCommand::Restart { reply } => {
                // A fast stop; the next loop starts PostgreSQL again in the
                // role the decision function picks (a leader with a valid
                // lease restarts writable, within primary_start_timeout).
                tracing::info!("restart requested through the API");
                let r = self
                    .instance
                    .stop(StopMode::Fast, Duration::from_secs(60))
                    .await
                    .map_err(|e| crate::util::chain(&e).to_string());
                self.observer.reset();
                let _ = reply.send(r);
            }
            AgentCommand::Reinitialize { reply } => {
                let r = if self.lease.snapshot().held {
                    Err("refusing to reinitialize the leader".to_string())
                } else if self.job.is_some() {
                    Err("a clone or rewind is already running".to_string())
                } else {
                    tracing::warn!(
                        "reinitialize requested through the API: wiping the data directory"
                    );
                    match self
                        .instance
                        .stop(StopMode::Immediate, Duration::from_secs(10))
                        .await
                    {
                        Ok(()) => self
                            .instance
                            .remove_data_dir()
                            .map_err(|e| crate::util::chain(&e).to_string()),
                        Err(e) => Err(crate::util::chain(&e).to_string()),
                    }
                };
                self.observer.reset();
                let _ = reply.send(r);
            }
            AgentCommand::Reload { reply } => {
                let r = self.reload_config().await.map_err(|e| format!("{e:#}"));
                let _ = reply.send(r);
            }
        }
    }

    pub(super) async fn reload_config(&mut self) -> anyhow::Result<()> {
        let obs = self.observer.observe().await;
        let PgStatus::Running(r) = &obs.status else {
            anyhow::bail!("PostgreSQL is not running")
        };
        let standby = r.role == crate::model::PgRole::Replica;
        let up = r.configured_upstream.clone().map(|(host, port)| Upstream {
            host,
            port,
            user: self.cfg.postgres.replication.username.clone(),
            slot: self.cfg.name.slot_name(),
        });
        let ssn = (!standby).then(|| r.synchronous_standby_names.clone());
        self.instance.write_config(standby, up, ssn)?;
        self.reload("requested through the API").await?;
        Ok(())
    }

    /// `pg_reload_conf()` after a configuration file was rewritten.
    async fn reload(&mut self, why: &str) -> Result<(), PgError> {
        let client = self.observer.client().await?;
        client
            .batch_execute(query::RELOAD)
            .await
            .map_err(|source| PgError::Sql {
                action: format!("reload the configuration ({why})"),
                source,
            })
    }

    /// Gives the key up after failed promotions; the bar on racing starts
    /// now, whether or not etcd takes the release (the lease then expires).
    async fn resign(&mut self, failed_promotions: u32) -> anyhow::Result<()> {
        self.resigned_at_ms = Some(boottime_ms());
        let log_tail = tokio::task::spawn_blocking({
            let path = self.instance.log_file.clone();
            move || promote::read_log_tail(&path)
        })
        .await
        .unwrap_or_default();
        tracing::error!(
            failed_promotions,
            last_error = self.last_promotion_error.as_deref().unwrap_or("none"),
            postgres_error = promote::failed_promotion_cause(&log_tail).unwrap_or("none found"),
            log = %self.instance.log_file.display(),
            out_of_race_ms = crate::ha::promotion::cooldown_ms(&self.cfg.ha),
            "PostgreSQL cannot be promoted here: giving the leader key up so that another member can lead"
        );
        self.release().await
    }

    async fn release(&mut self) -> anyhow::Result<()> {
        self.lease.clear();
        self.dcs.release_leader().await?;
        tracing::info!("released the leader lease");
        Ok(())
    }
}

/// Writes a standby configuration and starts the server.
/// With `backup.clone_from = "backup"`: fills the data directory from the
/// newest backup that fits the leader's timeline. `false` (logged) when it
/// is not configured or cannot be done: the caller clones the leader.
async fn restored_from_backup(
    instance: &Instance,
    leader_timeline: Option<Timeline>,
    system_id: Option<&str>,
) -> bool {
    if !instance.clone_from_backup {
        return false;
    }
    let Some(timeline) = leader_timeline else {
        tracing::warn!(
            "the leader has not published its timeline; cloning it instead of restoring a backup"
        );
        return false;
    };
    match instance.restore_from_backup(timeline, system_id).await {
        Ok(report) => {
            tracing::info!(backup = %report, "restored a backup as this replica's data directory; it replays archived WAL, then streams from the leader");
            true
        }
        Err(e) => {
            tracing::warn!(error = %crate::util::chain(&e), "cannot start this replica from a backup; cloning the leader instead");
            false
        }
    }
}

async fn start_as_replica(instance: &Instance, up: Option<Upstream>) -> Result<(), PgError> {
    instance.write_config(true, up, None)?;
    instance.start().await
}

/// How long a member waits before restoring again after `failures`
/// bootstraps from a backup failed in a row: 30 s, doubling, at most
/// 10 minutes.
fn restore_backoff(failures: u32) -> Duration {
    let secs = 30u64.saturating_mul(1 << failures.saturating_sub(1).min(5));
    Duration::from_secs(secs.min(600))
}
