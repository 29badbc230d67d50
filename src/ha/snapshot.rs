//! Inputs and outputs of [`decide`](super::decide).

use std::fmt;

use crate::config::HaConfig;
use crate::dcs::{ClusterView, SyncRecord};
use crate::model::{Lsn, MemberName, PgRole, Timeline};
use crate::postgres::adopt::Unmanaged;
use crate::postgres::{DataDirState, PgStatus};

/// Everything the decision may look at, captured at one instant.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// `CLOCK_BOOTTIME` milliseconds: lease deadlines and timeouts.
    pub now_ms: u64,
    /// Unix milliseconds: only for comparing with operator-given times
    /// (scheduled switchovers).
    /// When this agent started (`CLOCK_BOOTTIME`, ms).
    pub up_since_ms: u64,
    pub now_unix_ms: u64,
    pub me: MemberName,
    pub ha: HaConfig,
    /// `None` when the DCS could not be read this loop.
    pub dcs: Option<ClusterView>,
    pub lease: Lease,
    pub local: Local,
    /// Every member this agent knows of: the DCS records plus those it
    /// remembers through an etcd outage (see [`super::membership`]).
    pub members: super::membership::Membership,
    /// Fresh statuses of the other known members, fetched from their APIs
    /// when a leader race is on (empty otherwise).
    pub peers: Vec<PeerStatus>,
    /// The leader this agent last saw (not itself).
    pub last_leader: Option<MemberName>,
    /// The leader's WAL position the last time this agent saw a leader;
    /// bounds how far behind a replica may be and still promote.
    pub last_leader_lsn: Option<Lsn>,
    /// A long operation (clone, rewind) running in the background.
    pub job: Option<Job>,
    /// The leader's flush position when the current
    /// `synchronous_standby_names` was first seen in effect.
    pub sync_switched_at: Option<Lsn>,
    /// This member's promise to a failsafe leader not to take the leader
    /// key (see [`super::failsafe`]).
    pub failsafe_promise: Option<super::failsafe::Promise>,
}

impl Snapshot {
    /// This snapshot as the next loop would find it right after this member
    /// took (or resumed) the leader key bound to `lease_id`, holding
    /// `lease` at `now_ms`; `None` without a view of the DCS.
    ///
    /// The agent decides again on it at once instead of a loop later: a
    /// promotion then starts some 50 ms sooner (no wait for the next loop,
    /// no second read of etcd and PostgreSQL). Everything else was read
    /// just before the key was taken, and the executor checks the lease
    /// again before it promotes.
    pub fn with_leader_key_taken(
        &self,
        lease_id: i64,
        lease: Lease,
        now_ms: u64,
    ) -> Option<Snapshot> {
        let mut next = self.clone();
        next.dcs.as_mut()?.leader = Some(crate::dcs::LeaderKey {
            name: self.me.clone(),
            lease_id,
        });
        next.lease = lease;
        next.now_ms = now_ms;
        Some(next)
    }
}

/// What this agent knows about its own leader lease.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lease {
    /// The agent holds (or held until a failed renewal) the leader lease.
    pub held: bool,
    /// The lease cannot expire before this instant (`CLOCK_BOOTTIME` ms).
    pub valid_until_ms: Option<u64>,
    /// That instant comes from every member's failsafe confirmation, not
    /// from etcd: etcd could not renew the lease for that long.
    pub confirmed_by_members: bool,
}

/// The local PostgreSQL and its data directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Local {
    pub data: DataDirState,
    /// The data directory's system identifier, when known.
    pub system_id: Option<String>,
    pub pg: PgStatus,
    /// When PostgreSQL was first seen not running (stopped or not answering)
    /// since it last ran; `None` while it runs.
    pub down_since_ms: Option<u64>,
    /// What pg_control says about a stopped server.
    pub on_disk: Option<OnDisk>,
    /// The member this server was configured to stream from.
    pub upstream: Option<MemberName>,
    /// A replica that should be streaming from the leader but is not,
    /// since this instant.
    pub not_streaming_since_ms: Option<u64>,
    /// The last pg_rewind attempt failed (cleared by a successful start).
    pub rewind_failed: bool,
    /// This data directory last ran as a primary and has not since been
    /// rewound, re-cloned, or seen streaming from a leader: its history may
    /// have diverged, whatever its control file now says.
    pub former_primary: bool,
    /// Consecutive starts after which the postmaster exited again.
    pub failed_starts: u32,
    /// Promotions in a row, under the current lease, that did not leave a
    /// writable server (see [`super::promotion`]).
    pub failed_promotions: u32,
    /// When the first of those promotions was requested.
    pub promoting_since_ms: Option<u64>,
    /// When this member last gave the leader key up because its promotions
    /// kept failing.
    pub resigned_at_ms: Option<u64>,
    /// A fence keeper is running, not stopped, and acknowledging (see
    /// [`super::lease::keeper_health`]). Required before taking the lease.
    pub fence_ready: bool,
    /// The data directory holds a database pgha never managed.
    pub unmanaged: Option<Unmanaged>,
    /// A bootstrap from a backup began on this data directory and had not
    /// reached the promotion: what is there is a partial copy.
    pub bootstrap_restore_unfinished: bool,
}

/// The state recorded in pg_control of a stopped server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDisk {
    /// Was a primary: shut down cleanly, or crashed ("in production").
    /// Must go through pg_rewind before following another leader.
    FormerPrimary,
    /// Was a standby.
    Standby,
}

/// A peer's answer to "how far are you?" during a leader race.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub name: MemberName,
    /// `None` when the peer's API did not answer in time.
    pub report: Option<PeerReport>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerReport {
    pub role: PgRole,
    pub running: bool,
    pub timeline: Option<Timeline>,
    pub wal_position: Option<Lsn>,
    pub priority: u32,
    pub nofailover: bool,
}

/// Background operations that outlive one loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Job {
    Cloning,
    Rewinding,
    Bootstrapping,
}

/// Why a primary is being stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DemoteReason {
    /// The lease is running out and could not be renewed.
    LeaseLost,
    /// Another member holds the leader key.
    OtherLeader {},
    /// A planned switchover.
    Switchover,
    /// Writable without any leader key.
    NoLeaderKey,
}

/// The one thing the executor does this loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing to change.
    Wait,
    /// Create the cluster: claim `initialize`, initdb, take the lease,
    /// start writable.
    Bootstrap,
    /// Create the cluster from the database already in the data directory:
    /// claim `initialize` (or resume this member's claim), give it pgha's
    /// configuration and roles, take the lease, start writable. Never
    /// removes data.
    Adopt,
    /// Clone the leader into the (empty) data directory.
    Clone {
        leader: MemberName,
    },
    /// Wipe the data directory and clone again.
    Reclone {
        leader: MemberName,
    },
    /// pg_rewind a former primary onto the leader's timeline, then start as
    /// its replica.
    Rewind {
        leader: MemberName,
    },
    /// Start as a standby; `leader: None` = read-only, streaming from nobody.
    StartReplica {
        leader: Option<MemberName>,
    },
    /// Start writable, with this synchronous setting. Only returned while
    /// the lease is valid.
    StartPrimary {
        sync: super::sync::SyncSetting,
    },
    /// Re-point a running replica at a new leader (reload, no restart).
    Follow {
        leader: MemberName,
    },
    /// Take the leader key (the race for leadership).
    AcquireLease,
    /// Resume a lease whose key already names this member (agent restart).
    AdoptLease {
        lease_id: i64,
    },
    /// Promote the local standby. Only returned while the lease is valid.
    /// In synchronous mode the record is written and the setting applied
    /// before the promotion, so that no commit is acknowledged by the new
    /// leader alone.
    Promote {
        sync: Option<(SyncRecord, super::sync::SyncSetting)>,
    },
    /// Publish the members a failsafe leader asks (`failsafe` key).
    WriteFailsafeRecord(crate::dcs::FailsafeRecord),
    /// Synchronous replication bookkeeping (see `ha::sync` for the order).
    WriteSyncRecord(SyncRecord),
    SetSyncSetting(super::sync::SyncSetting),
    /// Keep leading: make the leader's slots match the members.
    Lead {
        create_slots: Vec<String>,
        drop_slots: Vec<String>,
    },
    /// On a replica: slots for the other members, created without
    /// reserving WAL (nothing streams from them until this member leads).
    PrepareSlots {
        create_slots: Vec<String>,
        drop_slots: Vec<String>,
        /// Idle slots still holding WAL or an xmin from when this member
        /// led: dropped and created again unreserved (see `ha::slots`).
        reset_slots: Vec<String>,
    },
    /// Stop writes: shut the primary down and restart it read-only. For a
    /// switchover the lease is released once PostgreSQL is down.
    Demote {
        reason: DemoteReason,
    },
    /// Give the leader key up (PostgreSQL cannot serve as primary).
    ReleaseLease,
    /// Give the leader key up because promoting the local server keeps
    /// failing, and stay out of the race for a while (`ha::promotion`).
    Resign {
        failed_promotions: u32,
    },
    /// Stop PostgreSQL immediately, then give the lease up.
    StopAndRelease,
}

impl Action {
    /// Actions that make or keep PostgreSQL writable.
    pub fn makes_writable(&self) -> bool {
        matches!(
            self,
            Action::StartPrimary { .. } | Action::Promote { .. } | Action::Bootstrap
        )
    }
}

/// Why the decision was what it was: logged once per loop, published in
/// the member record, shown by `pgha list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    DcsUnreachable,
    DcsUnreachableLeaseValid,
    LeaseRunningOut,
    NotInitialized,
    BootstrapInProgress {
        by: MemberName,
    },
    ForeignDataDirectory,
    UnusableDataDirectory,
    /// The data directory holds a database pgha never managed and the
    /// cluster is new: it becomes the first leader.
    AdoptingDatabase,
    /// This member's own claim on the initialization was not completed
    /// (the agent stopped half-way): it finishes it on the data it has.
    ResumingInitialization,
    /// This member's own bootstrap from a backup stopped before the
    /// restored server promoted: it starts the restore over.
    RestartingRestore,
    /// A new cluster: this member publishes its record and gives members
    /// started at the same moment [`BOOTSTRAP_GRACE_LOOPS`] loops to
    /// publish theirs before racing to create it, so that it sees whether
    /// one of them adopts a database.
    ///
    /// [`BOOTSTRAP_GRACE_LOOPS`]: super::decide::BOOTSTRAP_GRACE_LOOPS
    BootstrapGrace,
    /// Another member adopts its existing database; this empty member
    /// clones it afterwards instead of racing to create an empty cluster.
    WaitingForAdoption {
        by: MemberName,
    },
    /// A database pgha never managed, set up as a standby (or to recover):
    /// pgha does not guess which history to keep.
    CannotAdoptStandby,
    /// A database pgha never managed in a cluster that already exists (or
    /// is being created by another member): left untouched.
    UnmanagedDatabaseBesideCluster,
    Paused,
    JobRunning(Job),
    /// Would take the lease, but no fence keeper stands guard yet.
    FenceKeeperNotReady,
    /// Paused, and this server is writable while another member holds the
    /// leader key: two primaries, left to the operator.
    PausedBesideAnotherPrimary {
        leader: MemberName,
    },
    // leader side
    Leading,
    LeaderKeyIsMine,
    PromotingWithLease,
    RestartingPrimary,
    StartingBeforePromotion,
    PrimaryDownTooLong,
    /// Promotions keep failing here; the key goes to someone who can lead.
    PromotionKeepsFailing {
        failures: u32,
    },
    PrimaryCrashedInSyncMode,
    ManagingSynchronousStandbys,
    DataDirectoryLost,
    SwitchoverRequested,
    SwitchoverScheduled,
    /// A switchover is due, and these proxies have not yet acknowledged
    /// that no read-write transaction of theirs runs on this leader.
    WaitingForProxiesToDrain {
        pending: Vec<String>,
    },
    // replica side
    Following {
        leader: MemberName,
    },
    RepointingToLeader {
        leader: MemberName,
    },
    StartingAsReplica,
    StartingReadOnly,
    PostgresStarting,
    NoLeaderToCloneFrom,
    /// The last rewind failed; repairing (rewind, re-clone) needs a running
    /// leader.
    RepairWaitsForRunningLeader {
        leader: MemberName,
    },
    /// A stopped former primary must be rewound against a running leader
    /// before it may follow.
    FormerPrimaryWaitsForRunningLeader {
        leader: MemberName,
    },
    CloningLeader,
    RewindingFormerPrimary,
    RecloningAfterRewindFailure,
    RewindFailedNoReclone,
    StreamingStalled,
    /// The leader's timeline branched off this replica's at a point the
    /// replica has already passed: it holds WAL the leader never had.
    DivergedFromLeader {
        leader: MemberName,
        timeline: Timeline,
        switch_lsn: Lsn,
    },
    /// Not streaming, but the replica's history is the leader's: a rewind
    /// would change nothing.
    NotStreamingSameHistory {
        leader: MemberName,
    },
    StartKeepsFailing,
    LeaderRecordMissing {
        leader: MemberName,
    },
    OtherLeaderHoldsKey {
        leader: MemberName,
    },
    WritableWithoutLease,
    // failsafe mode
    /// etcd unreachable; every member confirmed this leader.
    LeadingOnMembersConfirmation,
    /// The lease expired in etcd while every member confirmed this leader:
    /// take the key again.
    RetakingLeaderKeyAfterFailsafe,
    PublishingFailsafeMembers,
    /// This member promised a failsafe leader not to race.
    PromisedFailsafeLeader {
        leader: MemberName,
    },
    /// Failsafe mode: not listed in the `failsafe` record.
    NotInFailsafeMembers,
    // race
    RacingAsHealthiest,
    ManualFailoverTarget,
    NotHealthiest(super::Disqualified),
    WaitingForSwitchoverTarget {
        target: MemberName,
    },
    CatchingUpBeforePromotion,
    NoLeaderNotRunning,
}

impl Reason {
    /// A state an operator must hear about at once and keep hearing about
    /// until it is resolved (logged as an error, repeatedly).
    pub fn is_alarm(&self) -> bool {
        matches!(self, Reason::PausedBesideAnotherPrimary { .. })
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Reason::*;
        match self {
            DcsUnreachable => write!(f, "DCS unreachable; not changing anything"),
            DcsUnreachableLeaseValid => write!(f, "DCS unreachable; leader lease still valid"),
            PausedBesideAnotherPrimary { leader } => write!(
                f,
                "PAUSED WITH TWO PRIMARIES: this server is writable while {leader} holds the leader key; \
                 no automatic action until `pgha resume`, which demotes this one"
            ),
            FenceKeeperNotReady => write!(
                f,
                "not taking the leader lease: no fence keeper is acknowledging"
            ),
            LeaseRunningOut => write!(f, "leader lease could not be renewed and is running out"),
            NotInitialized => write!(f, "cluster not initialized; racing to bootstrap"),
            BootstrapInProgress { by } => write!(f, "waiting for {by} to bootstrap the cluster"),
            AdoptingDatabase => write!(
                f,
                "cluster not initialized and the data directory holds a database pgha never managed; racing to adopt it as the first leader"
            ),
            ResumingInitialization => write!(
                f,
                "this member claimed the initialization and did not finish it; finishing it on the existing data"
            ),
            RestartingRestore => write!(
                f,
                "this member's bootstrap from a backup stopped before the restored server promoted; restoring again"
            ),
            BootstrapGrace => write!(
                f,
                "cluster not initialized; giving members started at the same time a moment to publish (one may adopt its database) before racing to bootstrap"
            ),
            WaitingForAdoption { by } => write!(
                f,
                "waiting for {by} to adopt its existing database, then cloning it"
            ),
            CannotAdoptStandby => write!(
                f,
                "the data directory holds a standby pgha never managed (standby.signal or recovery.signal); \
                 refusing to adopt it: promote it or start the agent on the primary's node first"
            ),
            UnmanagedDatabaseBesideCluster => write!(
                f,
                "the data directory holds a database pgha never managed, but the cluster already has (or is getting) \
                 another one; leaving it untouched: move it away to let this member clone the leader"
            ),
            ForeignDataDirectory => write!(
                f,
                "data directory belongs to another cluster (system identifier differs); refusing to touch it"
            ),
            UnusableDataDirectory => write!(
                f,
                "data directory is neither empty nor valid; refusing to touch it"
            ),
            Paused => write!(f, "cluster paused; no automatic action"),
            JobRunning(j) => write!(f, "{j:?} in progress"),
            Leading => write!(f, "leader with a valid lease"),
            LeaderKeyIsMine => write!(f, "leader key names this member; resuming the lease"),
            PromotingWithLease => write!(f, "holding the lease; promoting"),
            RestartingPrimary => write!(f, "holding the lease; starting PostgreSQL as primary"),
            StartingBeforePromotion => write!(
                f,
                "holding the lease; starting the standby read-only to promote it"
            ),
            PrimaryCrashedInSyncMode => write!(
                f,
                "primary stopped in synchronous mode: handing over to a synchronous standby (a restart would expose unacknowledged commits)"
            ),
            ManagingSynchronousStandbys => write!(f, "leader updating the synchronous standby set"),
            PrimaryDownTooLong => write!(
                f,
                "primary did not come back within primary_start_timeout; handing leadership over"
            ),
            PromotionKeepsFailing { failures } => write!(
                f,
                "promotion failed {failures} time(s) in a row (see the PostgreSQL log); \
                 giving the leader key up and staying out of the race for a while"
            ),
            DataDirectoryLost => write!(
                f,
                "leader's data directory is gone; handing leadership over"
            ),
            SwitchoverRequested => write!(f, "switchover requested; demoting"),
            SwitchoverScheduled => write!(f, "switchover scheduled for later"),
            WaitingForProxiesToDrain { pending } => write!(
                f,
                "switchover due; waiting for proxies to drain their read-write transactions: {}",
                pending.join(", ")
            ),
            Following { leader } => write!(f, "replica streaming from {leader}"),
            RepointingToLeader { leader } => write!(f, "re-pointing replication to {leader}"),
            StartingAsReplica => write!(f, "starting PostgreSQL as a replica"),
            StartingReadOnly => write!(f, "no leader; starting PostgreSQL read-only"),
            PostgresStarting => write!(f, "waiting for PostgreSQL to accept connections"),
            NoLeaderToCloneFrom => write!(
                f,
                "empty data directory and no running leader to clone from"
            ),
            RepairWaitsForRunningLeader { leader } => write!(
                f,
                "the last pg_rewind failed; waiting for leader {leader} to run before repairing"
            ),
            FormerPrimaryWaitsForRunningLeader { leader } => write!(
                f,
                "former primary: waiting for leader {leader} to run, to rewind against it before following"
            ),
            CloningLeader => write!(f, "empty data directory; cloning the leader"),
            RewindingFormerPrimary => {
                write!(f, "former primary; rewinding onto the leader's timeline")
            }
            RecloningAfterRewindFailure => write!(f, "pg_rewind failed; re-cloning"),
            RewindFailedNoReclone => write!(
                f,
                "pg_rewind failed and ha.reclone_on_rewind_failure is off; waiting for an operator"
            ),
            LeaderRecordMissing { leader } => write!(
                f,
                "{leader} holds the leader key but has no member record (it may be gone); waiting"
            ),
            StartKeepsFailing => write!(
                f,
                "PostgreSQL exits at every start (see its log); rewinding, then re-cloning"
            ),
            NotStreamingSameHistory { leader } => write!(
                f,
                "not streaming from {leader} although it runs; the histories have not diverged, \
                 so no rewind (check the network, the replication slot and the leader's WAL retention)"
            ),
            StreamingStalled => write!(
                f,
                "replica cannot stream from the leader (diverged timeline?); rewinding"
            ),
            DivergedFromLeader {
                leader,
                timeline,
                switch_lsn,
            } => write!(
                f,
                "this replica received WAL of timeline {timeline} past {switch_lsn}, where {leader}'s history branched off; rewinding"
            ),
            OtherLeaderHoldsKey { leader } => write!(
                f,
                "{leader} holds the leader key; demoting to stay the only primary"
            ),
            WritableWithoutLease => write!(f, "writable without a leader lease; demoting"),
            LeadingOnMembersConfirmation => write!(
                f,
                "etcd unreachable; failsafe mode: every member confirmed this leader"
            ),
            RetakingLeaderKeyAfterFailsafe => write!(
                f,
                "failsafe mode: the lease expired in etcd while every member confirmed this leader; taking the key again"
            ),
            PublishingFailsafeMembers => write!(f, "publishing the failsafe membership"),
            PromisedFailsafeLeader { leader } => write!(
                f,
                "no leader key; not racing: promised failsafe leader {leader} not to"
            ),
            NotInFailsafeMembers => write!(
                f,
                "no leader key; not racing: failsafe mode is on and this member is not in the failsafe record (the leader would not have asked it)"
            ),
            RacingAsHealthiest => write!(f, "no leader; this member is the healthiest candidate"),
            ManualFailoverTarget => write!(
                f,
                "no leader; this member is the operator's failover target"
            ),
            NotHealthiest(d) => write!(f, "no leader; not racing: {d}"),
            WaitingForSwitchoverTarget { target } => {
                write!(f, "no leader; waiting for failover target {target}")
            }
            CatchingUpBeforePromotion => write!(
                f,
                "failover target catching up to the old leader's final position"
            ),
            NoLeaderNotRunning => write!(f, "no leader; PostgreSQL not running yet"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub reason: Reason,
}

impl Decision {
    pub fn new(action: Action, reason: Reason) -> Self {
        Decision { action, reason }
    }
    pub fn wait(reason: Reason) -> Self {
        Decision {
            action: Action::Wait,
            reason,
        }
    }
}

impl Local {
    pub fn role(&self) -> Option<PgRole> {
        match &self.pg {
            PgStatus::Running(r) => Some(r.role),
            _ => None,
        }
    }
}
