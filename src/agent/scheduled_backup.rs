//! Scheduled base backups (`backup.schedule`). The agent holding the
//! leader key starts one when [`schedule::due`] says so, as a task of its
//! own that a later loop reaps, like the clone and rewind jobs: the HA loop
//! only starts, checks and reaps it, never waits for it. The task lists the
//! repository first and does nothing when a complete backup started at or
//! after the slot (another leader's, before a failover); otherwise it runs
//! [`run::take`], the code path of `pgha backup`, with retention after it.
//! When this member stops holding the lease the backup is cancelled
//! (pg_basebackup terminated): the next leader takes the slot, and a
//! backup never outlives the leadership that started it. A backup that
//! runs longer than `backup.schedule_timeout` is cancelled the same way
//! and counted as failed ([`schedule::overrun`]); one that does not end
//! within [`schedule::WIND_DOWN`] of being cancelled is abandoned, so that
//! a backup stuck for good never holds up the later slots.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::Agent;
use super::status::ScheduledBackupStatus;
use crate::backup::base::{self, Cancel};
use crate::backup::schedule::{self, Due, Overrun, Schedule};
use crate::backup::{open_repository, run};
use crate::config::Config;
use crate::config::backup::{BackupConfig, ScheduleFrom};
use crate::ha::Snapshot;
use crate::model::{MemberRecord, PgRole};
use crate::postgres::PgStatus;

/// The schedule and what this agent did about it.
pub(super) struct Scheduler {
    schedule: Schedule,
    /// `backup.schedule_timeout`.
    timeout: Duration,
    /// The latest slot this agent started, skipped or found covered.
    handled: Option<i64>,
    running: Option<Running>,
    status: ScheduledBackupStatus,
}

struct Running {
    slot: i64,
    started: Instant,
    /// When it was cancelled, by the timeout or on losing the leader key.
    cancelled_at: Option<Instant>,
    /// Cancelled because it overran `backup.schedule_timeout`: its end is
    /// a failure, not a cancellation.
    timed_out: bool,
    cancel: Arc<Cancel>,
    handle: JoinHandle<anyhow::Result<Outcome>>,
}

impl Running {
    fn cancel(&mut self, now: Instant) {
        self.cancel.cancel();
        self.cancelled_at.get_or_insert(now);
    }
}

enum Outcome {
    Taken(Box<run::Completed>),
    /// A complete backup started at or after the slot already exists.
    Covered {
        id: String,
    },
}

impl Scheduler {
    pub(super) fn new(cfg: &Config) -> Option<Scheduler> {
        let b = cfg.backup.as_ref()?;
        let schedule = b.schedule.clone()?;
        Some(Scheduler {
            schedule,
            timeout: b.schedule_timeout,
            handled: None,
            running: None,
            status: ScheduledBackupStatus::default(),
        })
    }

    pub(super) fn status(&self) -> ScheduledBackupStatus {
        ScheduledBackupStatus {
            running: self.running.is_some(),
            ..self.status.clone()
        }
    }

    /// Cancels the running backup, if any, and forgets it (shutdown).
    pub(super) fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.cancel.cancel();
            r.handle.abort();
        }
    }

    /// Cancels the running backup once it overruns `backup.schedule_timeout`,
    /// and forgets one that does not end after being cancelled. Never
    /// waits for it.
    fn check_overrun(&mut self, now: Instant) {
        let Some(r) = self.running.as_mut() else {
            return;
        };
        let cancelled_for = r.cancelled_at.map(|at| now.saturating_duration_since(at));
        match schedule::overrun(
            now.saturating_duration_since(r.started),
            cancelled_for,
            self.timeout,
        ) {
            Overrun::Wait => {}
            Overrun::Cancel => {
                tracing::error!(
                    slot = %slot_text(r.slot),
                    timeout = %humantime::format_duration(self.timeout),
                    "scheduled backup still running after backup.schedule_timeout: cancelling it"
                );
                r.timed_out = true;
                r.cancel(now);
            }
            Overrun::Abandon => {
                let r = self.running.take().expect("checked above");
                r.handle.abort();
                tracing::error!(
                    slot = %slot_text(r.slot),
                    wind_down = %humantime::format_duration(schedule::WIND_DOWN),
                    "scheduled backup abandoned: it has not ended since it was cancelled (it may be blocked in the repository or on a server); the next slot starts regardless"
                );
                if r.timed_out {
                    self.status.failures += 1;
                }
            }
        }
    }

    /// Logs and counts a finished backup; does nothing while it runs.
    async fn reap(&mut self) {
        if !self
            .running
            .as_ref()
            .is_some_and(|r| r.handle.is_finished())
        {
            return;
        }
        let r = self.running.take().expect("checked above");
        let slot = slot_text(r.slot);
        match r.handle.await {
            Ok(Ok(Outcome::Taken(done))) => {
                let m = &done.manifest;
                tracing::info!(
                    %slot,
                    id = %m.id,
                    source = %m.source,
                    bytes = done.bytes(),
                    stored_bytes = m.stored_bytes(),
                    seconds = %format!("{:.1}", done.elapsed.as_secs_f64()),
                    expired_backups = done.expired.expired_backups.len(),
                    expired_wal_objects = done.expired.expired_wal_objects,
                    "scheduled backup done"
                );
                self.status.last_success_unix_s = Some(crate::util::unix_ms() / 1000);
                self.status.last_duration_s = Some(done.elapsed.as_secs_f64());
            }
            Ok(Ok(Outcome::Covered { id })) => {
                tracing::info!(%slot, %id, "scheduled backup not needed: backup {id} started at or after the slot");
            }
            Ok(Err(e)) if r.timed_out => {
                tracing::error!(
                    %slot,
                    timeout = %humantime::format_duration(self.timeout),
                    seconds = %format!("{:.1}", r.started.elapsed().as_secs_f64()),
                    error = %format!("{e:#}"),
                    "scheduled backup failed: it ran longer than backup.schedule_timeout and was cancelled"
                );
                self.status.failures += 1;
            }
            Ok(Err(e)) if r.cancel.is_cancelled() => {
                tracing::warn!(%slot, error = %format!("{e:#}"), "scheduled backup cancelled");
            }
            Ok(Err(e)) => {
                tracing::error!(%slot, error = %format!("{e:#}"), "scheduled backup failed");
                self.status.failures += 1;
            }
            Err(e) => {
                tracing::error!(%slot, error = %e, "scheduled backup failed: its task ended abnormally");
                self.status.failures += 1;
            }
        }
    }
}

impl Agent {
    /// The schedule's step of the loop: reap a finished backup, cancel a
    /// running one when the lease is gone or it overran
    /// `backup.schedule_timeout`, start one when due. Never waits for the
    /// backup.
    pub(super) async fn scheduled_backup(&mut self, s: &Snapshot) {
        let Some(sched) = self.schedule.as_mut() else {
            return;
        };
        sched.reap().await;
        let held = self.lease.snapshot().held;
        let instant = Instant::now();
        if let Some(r) = &mut sched.running
            && !held
            && !r.cancel.is_cancelled()
        {
            tracing::warn!(slot = %slot_text(r.slot), "this member no longer holds the leader key: cancelling its scheduled backup");
            r.cancel(instant);
            // Should the key come back before the next slot, the slot is
            // considered again; the repository check keeps that to one
            // backup if the meantime leader took it.
            sched.handled = None;
        }
        sched.check_overrun(instant);
        // A cancelled backup is still winding down: decide once it is
        // reaped (or abandoned). Deciding now would see its slot as running
        // and mark the slot skipped, although the key may have come back
        // for it, or a timed-out backup may end in time for the next slot.
        if sched
            .running
            .as_ref()
            .is_some_and(|r| r.cancel.is_cancelled())
        {
            return;
        }
        let Some(b) = self.cfg.backup.as_ref() else {
            return;
        };
        let members = leader_and_source(s, b.schedule_from).filter(|_| held);
        let now = (s.now_unix_ms / 1000) as i64;
        let running = sched.running.as_ref().map(|r| r.slot);
        match schedule::due(
            &sched.schedule,
            now,
            members.is_some(),
            sched.handled,
            running,
        ) {
            Due::NotLeader | Due::Done => {}
            Due::Skip { slot, running } => {
                sched.handled = Some(slot);
                tracing::warn!(
                    slot = %slot_text(slot),
                    running = %slot_text(running),
                    "scheduled backup skipped: the previous one is still running"
                );
            }
            Due::Start { slot } => {
                sched.handled = Some(slot);
                let (leader, source) = members.expect("due only for the leader");
                let cancel = Arc::new(Cancel::default());
                let handle = tokio::spawn(take_scheduled(
                    self.cfg.clone(),
                    b.clone(),
                    slot,
                    leader,
                    source,
                    cancel.clone(),
                ));
                sched.running = Some(Running {
                    slot,
                    started: instant,
                    cancelled_at: None,
                    timed_out: false,
                    cancel,
                    handle,
                });
            }
        }
    }
}

/// This member's record and the member to back up, when this member
/// leads: it holds the leader key in the view just read and runs a
/// writable primary. A replica is the least lagging streaming one, or the
/// leader itself when none streams.
fn leader_and_source(s: &Snapshot, from: ScheduleFrom) -> Option<(MemberRecord, MemberRecord)> {
    let view = s.dcs.as_ref()?;
    if view.leader.as_ref()?.name != s.me {
        return None;
    }
    if !matches!(&s.local.pg, PgStatus::Running(r) if r.role == PgRole::Primary) {
        return None;
    }
    let leader = view.members.get(&s.me)?;
    let source = match from {
        ScheduleFrom::Leader => leader,
        ScheduleFrom::Replica => run::least_lagging_replica(view, &s.me).unwrap_or(leader),
    };
    Some((leader.clone(), source.clone()))
}

/// The scheduled backup's task: the repository check, then the backup.
async fn take_scheduled(
    cfg: Config,
    b: BackupConfig,
    slot: i64,
    leader: MemberRecord,
    source: MemberRecord,
    cancel: Arc<Cancel>,
) -> anyhow::Result<Outcome> {
    let repo: Arc<dyn crate::backup::repo::Repository> = Arc::from(open_repository(&b)?);
    let backups = {
        let repo = repo.clone();
        tokio::task::spawn_blocking(move || base::list(repo.as_ref())).await??
    };
    if let Some(m) = schedule::covering(&backups, slot) {
        return Ok(Outcome::Covered { id: m.id.clone() });
    }
    if cancel.is_cancelled() {
        anyhow::bail!("cancelled before it started");
    }
    tracing::info!(
        slot = %slot_text(slot),
        source = %source.name,
        "scheduled backup starting"
    );
    let done = run::take(
        &cfg,
        &b,
        repo,
        &leader,
        &source,
        run::Options {
            progress: Box::new(|_, _| {}),
            cancel,
            background: true,
        },
    )
    .await?;
    Ok(Outcome::Taken(Box::new(done)))
}

fn slot_text(slot: i64) -> String {
    humantime::format_rfc3339_seconds(schedule::unix_time(slot)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn scheduler() -> Scheduler {
        Scheduler {
            schedule: Schedule::parse("0 * * * *").unwrap(),
            timeout: MINUTE,
            handled: None,
            running: None,
            status: ScheduledBackupStatus::default(),
        }
    }

    fn running(
        started: Instant,
        cancel: &Arc<Cancel>,
        handle: JoinHandle<anyhow::Result<Outcome>>,
    ) -> Running {
        Running {
            slot: 0,
            started,
            cancelled_at: None,
            timed_out: false,
            cancel: cancel.clone(),
            handle,
        }
    }

    async fn until_finished(s: &Scheduler) {
        while !s.running.as_ref().unwrap().handle.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A backup that ends, failing, only once cancelled, like `run::take`
    /// with a pg_basebackup that hangs.
    fn hanging_until_cancelled(cancel: &Arc<Cancel>) -> JoinHandle<anyhow::Result<Outcome>> {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            while !cancel.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(anyhow::anyhow!("cancelled"))
        })
    }

    #[tokio::test]
    async fn a_backup_past_its_timeout_is_cancelled_and_counted_once_when_it_ends() {
        let mut s = scheduler();
        let t0 = Instant::now();
        let cancel = Arc::new(Cancel::default());
        s.running = Some(running(t0, &cancel, hanging_until_cancelled(&cancel)));
        s.check_overrun(t0 + MINUTE - Duration::from_millis(1));
        assert!(!cancel.is_cancelled());
        s.check_overrun(t0 + MINUTE);
        assert!(cancel.is_cancelled());
        // Counted when it has ended, not before: it may still complete.
        assert_eq!(s.status.failures, 0);
        assert!(s.status().running);
        // Checking again while it winds down changes nothing.
        s.check_overrun(t0 + 2 * MINUTE);
        assert!(s.running.is_some());
        until_finished(&s).await;
        s.reap().await;
        assert!(s.running.is_none());
        assert!(!s.status().running);
        assert_eq!(s.status.failures, 1);
        assert_eq!(s.status.last_success_unix_s, None);
    }

    #[tokio::test]
    async fn a_backup_cancelled_on_losing_the_key_is_not_a_failure() {
        let mut s = scheduler();
        let t0 = Instant::now();
        let cancel = Arc::new(Cancel::default());
        s.running = Some(running(t0, &cancel, hanging_until_cancelled(&cancel)));
        s.running.as_mut().unwrap().cancel(t0);
        // Past the timeout while winding down: no second cancellation, and
        // no timeout failure.
        s.check_overrun(t0 + 2 * MINUTE);
        assert!(!s.running.as_ref().unwrap().timed_out);
        until_finished(&s).await;
        s.reap().await;
        assert!(s.running.is_none());
        assert_eq!(s.status.failures, 0);
    }

    #[tokio::test]
    async fn a_cancelled_backup_that_never_ends_is_abandoned() {
        // (cancelled by the timeout, counted as a failure)
        for timed_out in [true, false] {
            let mut s = scheduler();
            let t0 = Instant::now();
            let cancel = Arc::new(Cancel::default());
            let handle = tokio::spawn(std::future::pending::<anyhow::Result<Outcome>>());
            let task = handle.abort_handle();
            s.running = Some(running(t0, &cancel, handle));
            let cancelled = if timed_out {
                s.check_overrun(t0 + MINUTE);
                t0 + MINUTE
            } else {
                s.running
                    .as_mut()
                    .unwrap()
                    .cancel(t0 + Duration::from_secs(1));
                t0 + Duration::from_secs(1)
            };
            assert!(cancel.is_cancelled());
            s.check_overrun(cancelled + schedule::WIND_DOWN - Duration::from_millis(1));
            s.reap().await;
            assert!(s.running.is_some(), "timed out: {timed_out}");
            s.check_overrun(cancelled + schedule::WIND_DOWN);
            assert!(s.running.is_none(), "timed out: {timed_out}");
            assert_eq!(s.status.failures, u64::from(timed_out));
            // Its task is aborted, not left to run.
            while !task.is_finished() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}
