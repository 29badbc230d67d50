//! Table tests and an exhaustive safety sweep for [`decide`].
//!
//! Every test builds its [`Snapshot`] with [`Fixture`], a small builder
//! whose defaults describe a quiet cluster: initialized, DCS reachable,
//! nobody leading, and this member ("n1") with its PostgreSQL stopped on a
//! standby's data directory. Each builder method changes one fact, so a
//! table row reads as the situation it tests. Expected results are
//! compared as enums (`Action` and `Reason`), never as rendered strings.
//!
//! `purity_test.rs` scans this file too: the code here must not name
//! clocks, async runtimes or I/O either. Time is `NOW` (boot clock) and
//! `NOW_UNIX` (wall clock), and everything else is relative to them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::decide::{FAILOVER_REQUEST_TTL_MS, PROXY_ACK_MARGIN_MS, decide};
use super::membership::{KnownMember, Membership};
use super::sync::{NOBODY, SyncSetting};
use super::{
    Action, Decision, DemoteReason, Disqualified, Job, Lease, Local, OnDisk, PeerReport,
    PeerStatus, Reason, Snapshot,
};
use crate::config::HaConfig;
use crate::dcs::{ClusterView, FailoverRequest, Initialize, LeaderKey, SyncMode, SyncRecord};
use crate::model::{Lsn, MemberName, MemberRecord, PgRole, PgState, Timeline};
use crate::postgres::adopt::Unmanaged;
use crate::postgres::observe::{Running, SlotInfo, StandbyInfo};
use crate::postgres::{DataDirState, PgStatus};

// ---------------------------------------------------------------------------
// Time, positions and configuration shared by every test.

/// Boot-clock "now". Large enough that `NOW - timeout` never underflows.
const NOW: u64 = 10_000_000;
/// Wall-clock "now", for failover requests and scheduled switchovers.
const NOW_UNIX: u64 = 1_700_000_000_000;
const SYSID: &str = "7300000000000000001";
/// The `failover` key's revision, for proxies' drain acknowledgements.
const FAILOVER_REV: i64 = 77;
/// The proxies' `drain_timeout` in these tests.
const PROXY_DRAIN_MS: u64 = 5_000;
const LEASE_ID: i64 = 4242;

const FENCE_MARGIN_MS: u64 = 500;
const PRIMARY_START_TIMEOUT_MS: u64 = 10_000;
const STREAM_STALL_MS: u64 = 15_000;
const MAX_LAG: u64 = 1 << 20;

/// A lease comfortably past the fence margin.
const VALID: u64 = 2_000;
/// A lease that has not expired yet but is inside the fence margin: the
/// others may already be racing, so it no longer counts as valid.
const EXPIRING: u64 = FENCE_MARGIN_MS - 1;

/// The leader's WAL position; replicas that are caught up have it too.
const L: u64 = 0x5_0000_0000;

fn ha_config() -> HaConfig {
    // Every field decide reads is set explicitly, so a change of the
    // shipped defaults cannot move the boundaries these tests probe.
    HaConfig {
        fence_margin: Duration::from_millis(FENCE_MARGIN_MS),
        priority: 100,
        nofailover: false,
        maximum_lag_on_failover: MAX_LAG,
        primary_start_timeout: Duration::from_millis(PRIMARY_START_TIMEOUT_MS),
        stream_stall_timeout: Duration::from_millis(STREAM_STALL_MS),
        reclone_on_rewind_failure: true,
        loop_wait: Duration::from_millis(500),
        ..HaConfig::default()
    }
}

fn m(name: &str) -> MemberName {
    MemberName::from(name)
}

/// A member record as another agent would publish it.
fn record(name: &str, role: PgRole, state: PgState) -> MemberRecord {
    // Decoded rather than spelled out: every field beyond these is optional
    // on decode (see model.rs), so this keeps compiling as the record grows.
    let mut r: MemberRecord = serde_json::from_value(serde_json::json!({
        "name": name,
        "api_url": format!("http://{name}:8008"),
        "host": format!("{name}.db"),
        "port": 5432,
        "role": "unknown",
        "state": "stopped",
    }))
    .expect("a minimal member record decodes");
    r.role = role;
    r.state = state;
    r.timeline = Some(Timeline(1));
    r
}

fn running(role: PgRole) -> Running {
    Running {
        role,
        timeline: Some(Timeline(1)),
        current_lsn: None,
        flush_lsn: None,
        receive_lsn: None,
        replay_lsn: None,
        streaming: false,
        sender: None,
        synchronous_standby_names: String::new(),
        configured_upstream: None,
        system_id: SYSID.into(),
        standbys: Vec::new(),
        slots: Vec::new(),
    }
}

/// A peer's answer during a leader race: running, on `tl`, at `lsn`.
fn report(tl: u32, lsn: u64) -> PeerReport {
    PeerReport {
        role: PgRole::Replica,
        running: true,
        timeline: Some(Timeline(tl)),
        wal_position: Some(Lsn(lsn)),
        priority: 100,
        nofailover: false,
    }
}

fn names(list: &[&str]) -> Vec<MemberName> {
    list.iter().map(|n| m(n)).collect()
}

fn sync_rec(leader: &str, members: &[&str], quorum: u32, degraded: bool) -> SyncRecord {
    SyncRecord {
        leader: m(leader),
        members: names(members),
        quorum,
        degraded,
    }
}

fn setting(members: &[&str], k: u32, quorum: bool) -> SyncSetting {
    SyncSetting {
        names: names(members),
        k,
        quorum,
    }
}

// ---------------------------------------------------------------------------
// The fixture builder.

#[derive(Clone, Debug)]
struct Fixture {
    /// Always carries a view while building, so methods can edit it;
    /// `reachable = false` drops it in [`Fixture::snapshot`].
    snap: Snapshot,
    reachable: bool,
    /// Members known without a record in the view (see `.remembered…()`);
    /// the snapshot's membership is these plus every record, as the
    /// agent's `membership::update` would make it.
    remembered: Membership,
}

impl Fixture {
    fn new(me: &str) -> Self {
        let mut members = BTreeMap::new();
        members.insert(m(me), record(me, PgRole::Unknown, PgState::Stopped));
        let mut view = ClusterView {
            initialize: Some(Initialize::Done {
                system_id: SYSID.into(),
            }),
            members,
            revision: 1,
            ..ClusterView::default()
        };
        // The rows are written for asynchronous replication; `sync_mode`
        // turns it on (new clusters default to `on`).
        view.config.synchronous_mode = SyncMode::Off;
        view.config.failsafe_mode = false;
        Fixture {
            snap: Snapshot {
                now_ms: NOW,
                now_unix_ms: NOW_UNIX,
                up_since_ms: NOW - 60_000,
                me: m(me),
                ha: ha_config(),
                dcs: Some(view),
                lease: Lease::default(),
                local: Local {
                    data: DataDirState::Initialized,
                    system_id: Some(SYSID.into()),
                    pg: PgStatus::Stopped,
                    down_since_ms: Some(NOW),
                    on_disk: Some(OnDisk::Standby),
                    upstream: None,
                    not_streaming_since_ms: None,
                    rewind_failed: false,
                    former_primary: false,
                    failed_starts: 0,
                    fence_ready: true,
                    failed_promotions: 0,
                    promoting_since_ms: None,
                    resigned_at_ms: None,
                    unmanaged: None,
                    bootstrap_restore_unfinished: false,
                },
                members: Membership::new(),
                peers: Vec::new(),
                last_leader: None,
                last_leader_lsn: None,
                job: None,
                sync_switched_at: None,
                failsafe_promise: None,
            },
            reachable: true,
            remembered: Membership::new(),
        }
    }

    fn snapshot(&self) -> Snapshot {
        let mut s = self.snap.clone();
        let view = s.dcs.as_ref().expect("the fixture always keeps a view");
        s.members = self.remembered.clone();
        for (name, r) in &view.members {
            s.members.insert(
                name.clone(),
                KnownMember {
                    api_url: r.api_url.clone(),
                    host: r.host.clone(),
                    port: r.port,
                    nosync: r.nosync,
                    absent_since_ms: None,
                    lost_in_outage: false,
                },
            );
        }
        if !self.reachable {
            s.dcs = None;
        }
        s
    }

    fn view(&mut self) -> &mut ClusterView {
        self.snap
            .dcs
            .as_mut()
            .expect("the fixture always keeps a view")
    }

    fn record_mut(&mut self, name: &str) -> &mut MemberRecord {
        self.view()
            .members
            .entry(m(name))
            .or_insert_with(|| record(name, PgRole::Replica, PgState::Streaming))
    }

    fn running_mut(&mut self) -> &mut Running {
        match &mut self.snap.local.pg {
            PgStatus::Running(r) => r.as_mut(),
            _ => panic!("fixture: make PostgreSQL run (.primary()/.replica…()) first"),
        }
    }

    fn set_running(mut self, r: Running, upstream: Option<&str>) -> Self {
        let l = &mut self.snap.local;
        l.pg = PgStatus::Running(Box::new(r));
        // What the agent's observer reports for a running server.
        l.down_since_ms = None;
        l.on_disk = None;
        l.upstream = upstream.map(m);
        l.not_streaming_since_ms = None;
        self
    }

    // --- the DCS -----------------------------------------------------------

    /// The leader key names `name`. Another member's key comes with its
    /// record saying it runs as primary, the normal case; see
    /// `.leader_not_running()`.
    fn leader(mut self, name: &str) -> Self {
        self.view().leader = Some(LeaderKey {
            name: m(name),
            lease_id: LEASE_ID,
        });
        if name != self.snap.me.as_str() {
            let rec = self.record_mut(name);
            rec.role = PgRole::Primary;
            rec.state = PgState::Running;
            rec.flushed_lsn = Some(Lsn(L));
        }
        self
    }

    fn leader_name(&mut self) -> String {
        let key = self
            .view()
            .leader
            .as_ref()
            .expect("fixture: .leader() first");
        key.name.0.clone()
    }

    /// The leader key lives on (its lease has not run out) but the
    /// leader's PostgreSQL is down.
    fn leader_not_running(mut self) -> Self {
        let name = self.leader_name();
        let rec = self.record_mut(&name);
        rec.role = PgRole::Unknown;
        rec.state = PgState::Crashed;
        self
    }

    /// The agent started `ms` ago.
    fn up_for_ms(mut self, ms: u64) -> Self {
        self.snap.up_since_ms = NOW - ms;
        self
    }

    /// This member's own record is not (yet) in etcd.
    fn without_own_record(mut self) -> Self {
        let me = self.snap.me.clone();
        self.view().members.remove(&me);
        self
    }

    fn leader_without_record(mut self) -> Self {
        let name = m(&self.leader_name());
        self.view().members.remove(&name);
        self
    }

    /// Another member, publishing a streaming replica's record.
    fn member(mut self, name: &str) -> Self {
        self.record_mut(name);
        self
    }

    fn member_with(mut self, name: &str, edit: impl FnOnce(&mut MemberRecord)) -> Self {
        edit(self.record_mut(name));
        self
    }

    fn initialize(mut self, init: Option<Initialize>) -> Self {
        self.view().initialize = init;
        self
    }

    fn paused(mut self) -> Self {
        self.view().config.paused = true;
        self
    }

    fn dcs_down(mut self) -> Self {
        self.reachable = false;
        self
    }

    /// A switchover (`from` set) or failover request, made just now.
    fn failover_request(mut self, from: Option<&str>, to: Option<&str>) -> Self {
        self.view().failover = Some(FailoverRequest {
            from: from.map(m),
            to: to.map(m),
            not_before_unix_ms: None,
            accept_data_loss: false,
            requested_at_unix_ms: NOW_UNIX,
        });
        self
    }

    /// A live proxy with a read-write listener (or without, `rw = false`),
    /// that drained for the `failover` key at `drained_for` (its revision
    /// is [`FAILOVER_REV`] in these tests).
    fn proxy(mut self, name: &str, rw: bool, drained_for: Option<i64>) -> Self {
        self.view().failover_revision = crate::dcs::Revision(FAILOVER_REV);
        self.view().proxies.insert(
            name.into(),
            crate::dcs::ProxyRecord {
                name: name.into(),
                rw: rw.then(|| "127.0.0.1:6432".into()),
                ro: None,
                auto: false,
                state: crate::dcs::ProxyState::Draining,
                drained_for,
                drain_timeout_ms: Some(PROXY_DRAIN_MS),
            },
        );
        self
    }

    fn failover_mut(&mut self) -> &mut FailoverRequest {
        self.view()
            .failover
            .as_mut()
            .expect("fixture: .failover_request() first")
    }

    fn requested_ago(mut self, ms: u64) -> Self {
        self.failover_mut().requested_at_unix_ms = NOW_UNIX - ms;
        self
    }

    /// Scheduled for `NOW_UNIX + offset_ms` (negative: in the past).
    fn not_before(mut self, offset_ms: i64) -> Self {
        self.failover_mut().not_before_unix_ms = Some(NOW_UNIX.saturating_add_signed(offset_ms));
        self
    }

    fn accept_data_loss(mut self) -> Self {
        self.failover_mut().accept_data_loss = true;
        self
    }

    /// Synchronous replication as configured in the DCS (`pgha config set`).
    fn sync_mode(mut self, mode: SyncMode) -> Self {
        self.view().config.synchronous_mode = mode;
        self
    }

    fn sync_node_count(mut self, k: u32) -> Self {
        self.view().config.synchronous_node_count = k;
        self
    }

    fn sync_quorum(mut self) -> Self {
        self.view().config.synchronous_quorum = true;
        self
    }

    /// The `sync` key, as written by `leader`.
    fn sync_record(mut self, leader: &str, members: &[&str], quorum: u32, degraded: bool) -> Self {
        self.view().sync = Some(sync_rec(leader, members, quorum, degraded));
        self
    }

    // --- the lease -----------------------------------------------------------

    /// This agent holds the lease, which cannot expire for `valid_for_ms`.
    fn lease_held(mut self, valid_for_ms: u64) -> Self {
        self.snap.lease = Lease {
            held: true,
            valid_until_ms: Some(NOW + valid_for_ms),
            confirmed_by_members: false,
        };
        self
    }

    /// Held on every member's failsafe confirmation (etcd did not renew
    /// it), usable for `valid_for_ms`.
    fn lease_confirmed_by_members(mut self, valid_for_ms: u64) -> Self {
        self.snap.lease = Lease {
            held: true,
            valid_until_ms: Some(NOW + valid_for_ms),
            confirmed_by_members: true,
        };
        self
    }

    /// This member promised failsafe leader `leader` not to take the key
    /// for `for_ms` more.
    fn promised(mut self, leader: &str, for_ms: u64) -> Self {
        self.snap.failsafe_promise = Some(crate::ha::failsafe::Promise {
            leader: m(leader),
            until_ms: NOW + for_ms,
        });
        self
    }

    /// Failsafe mode on, with a `failsafe` record written by `leader`
    /// listing `members`.
    fn failsafe(mut self, leader: &str, members: &[&str]) -> Self {
        let view = self.view();
        view.config.failsafe_mode = true;
        view.failsafe = Some(crate::dcs::FailsafeRecord {
            leader: m(leader),
            members: members
                .iter()
                .map(|n| (m(n), format!("http://{n}:8008")))
                .collect(),
        });
        self
    }

    /// Held, but the last renewal found the lease gone: no deadline left.
    fn lease_lost(mut self) -> Self {
        self.snap.lease = Lease {
            held: true,
            valid_until_ms: None,
            confirmed_by_members: false,
        };
        self
    }

    // --- the local PostgreSQL ---------------------------------------------

    /// Running writable, at the leader position `L`, with no slots.
    fn primary(self) -> Self {
        let mut r = running(PgRole::Primary);
        r.current_lsn = Some(Lsn(L));
        r.flush_lsn = Some(Lsn(L));
        self.set_running(r, None)
    }

    /// Running read-only at `L`, configured to stream from nobody (a
    /// standby started while there was no leader).
    fn replica(mut self) -> Self {
        let mut r = running(PgRole::Replica);
        r.receive_lsn = Some(Lsn(L));
        r.replay_lsn = Some(Lsn(L));
        self = self.set_running(r, None);
        self.snap.local.not_streaming_since_ms = Some(NOW);
        self
    }

    fn replica_streaming_from(self, upstream: &str) -> Self {
        let mut f = self.replica();
        f.running_mut().streaming = true;
        f.snap.local.upstream = Some(m(upstream));
        f.snap.local.not_streaming_since_ms = None;
        f
    }

    /// Configured to stream from `upstream`, but has not for `for_ms`.
    fn replica_stalled(self, upstream: &str, for_ms: u64) -> Self {
        let mut f = self.replica();
        f.snap.local.upstream = Some(m(upstream));
        f.snap.local.not_streaming_since_ms = Some(NOW - for_ms);
        f
    }

    /// The leader (`leader`) moved to timeline 2, branching off timeline 1
    /// at `switch_lsn` (recorded in the DCS history), while this replica is
    /// still on timeline 1 (at `L`, so `switch_lsn < L` means it diverged).
    fn leader_branched_at(mut self, leader: &str, switch_lsn: Option<u64>) -> Self {
        self = self
            .member_with(leader, |r| r.timeline = Some(Timeline(2)))
            .timeline(Some(1));
        if let Some(lsn) = switch_lsn {
            self.view().history.push(crate::model::HistoryEntry {
                old_timeline: Timeline(1),
                new_timeline: Timeline(2),
                switch_lsn: Lsn(lsn),
                at_unix_ms: NOW_UNIX,
                reason: "failover".into(),
                old_leader: None,
                new_leader: m(leader),
            });
        }
        self
    }

    /// A WAL receiver runs and reports its sender (it may be retrying).
    fn receiver_running(mut self, streaming: bool) -> Self {
        let r = self.running_mut();
        r.sender = Some(("10.0.0.2".into(), 5432));
        r.streaming = streaming;
        if streaming {
            self.snap.local.not_streaming_since_ms = None;
        }
        self
    }

    /// The agent has not recorded when streaming stopped.
    fn stall_start_unknown(mut self) -> Self {
        self.snap.local.not_streaming_since_ms = None;
        self
    }

    /// Moves the running server's WAL position.
    fn wal(mut self, lsn: u64) -> Self {
        let r = self.running_mut();
        let at = Some(Lsn(lsn));
        if r.role == PgRole::Primary {
            (r.current_lsn, r.flush_lsn) = (at, at);
        } else {
            (r.receive_lsn, r.replay_lsn) = (at, at);
        }
        self
    }

    fn wal_unknown(mut self) -> Self {
        let r = self.running_mut();
        (r.current_lsn, r.flush_lsn, r.receive_lsn, r.replay_lsn) = (None, None, None, None);
        self
    }

    fn timeline(mut self, tl: Option<u32>) -> Self {
        self.running_mut().timeline = tl.map(Timeline);
        self
    }

    /// pgha-managed slots, named as pgha names them (`pgha_<member>`),
    /// unreserved and idle.
    fn slots(mut self, slots: &[&str]) -> Self {
        self.running_mut().slots = slots
            .iter()
            .map(|s| SlotInfo::unreserved(format!("pgha_{s}")))
            .collect();
        self
    }

    /// A slot someone else created (a backup tool, say).
    fn foreign_slot(mut self, slot: &str) -> Self {
        self.running_mut().slots.push(SlotInfo::unreserved(slot));
        self
    }

    /// pgha's slot for `member` as a leader leaves it behind: reserved at
    /// `restart_lsn` and, with the member's hot_standby_feedback, an xmin.
    fn held_slot(mut self, member: &str, restart_lsn: Option<u64>, holds_xmin: bool) -> Self {
        self.running_mut().slots.push(SlotInfo {
            name: format!("pgha_{member}"),
            restart_lsn: restart_lsn.map(Lsn),
            active: false,
            holds_xmin,
        });
        self
    }

    /// The last slot added has a walsender streaming from it.
    fn active(mut self) -> Self {
        self.running_mut()
            .slots
            .last_mut()
            .expect("a slot to mark active")
            .active = true;
        self
    }

    /// A standby connected to this primary (`pg_stat_replication`).
    fn standby(mut self, name: &str, flush: u64, sync_state: &str) -> Self {
        self.running_mut().standbys.push(StandbyInfo {
            application_name: name.into(),
            state: "streaming".into(),
            flush_lsn: Some(Lsn(flush)),
            replay_lsn: Some(Lsn(flush)),
            sync_state: sync_state.into(),
            reply_age_ms: Some(100),
        });
        self
    }

    /// The server's `synchronous_standby_names`, as text.
    fn sync_setting(mut self, text: &str) -> Self {
        self.running_mut().synchronous_standby_names = text.into();
        self
    }

    /// A postmaster that does not answer yet, first seen down `down_for_ms` ago.
    fn starting(mut self, down_for_ms: u64) -> Self {
        let l = &mut self.snap.local;
        l.pg = PgStatus::Starting;
        l.down_since_ms = Some(NOW - down_for_ms);
        l.on_disk = None;
        l.upstream = None;
        l.not_streaming_since_ms = None;
        self
    }

    /// No postmaster; `on_disk` is what pg_control says (None: unknown).
    /// Just went down; see `.down_for()`.
    fn stopped(mut self, on_disk: impl Into<Option<OnDisk>>) -> Self {
        let l = &mut self.snap.local;
        l.pg = PgStatus::Stopped;
        l.down_since_ms = Some(NOW);
        l.on_disk = on_disk.into();
        l.upstream = None;
        l.not_streaming_since_ms = None;
        self
    }

    fn down_for(mut self, ms: u64) -> Self {
        self.snap.local.down_since_ms = Some(NOW - ms);
        self
    }

    /// A bootstrap from a backup began here and did not reach promotion.
    fn restore_unfinished(mut self) -> Self {
        self.snap.local.bootstrap_restore_unfinished = true;
        self
    }

    /// The data directory holds a database pgha never managed.
    fn unmanaged(mut self, what: Unmanaged) -> Self {
        self.snap.local.unmanaged = Some(what);
        self
    }

    fn empty_data(mut self) -> Self {
        let l = &mut self.snap.local;
        l.data = DataDirState::Empty;
        l.system_id = None;
        l.on_disk = None;
        self
    }

    fn unusable_data(mut self) -> Self {
        let l = &mut self.snap.local;
        l.data = DataDirState::Unusable("half a clone".into());
        l.system_id = None;
        l.on_disk = None;
        self
    }

    fn system_id(mut self, id: Option<&str>) -> Self {
        self.snap.local.system_id = id.map(str::to_string);
        if let PgStatus::Running(r) = &mut self.snap.local.pg {
            r.system_id = id.unwrap_or_default().to_string();
        }
        self
    }

    fn without_record(mut self, name: &str) -> Self {
        self.view().members.remove(&m(name));
        self
    }

    /// The fence keeper is dead, stopped or silent.
    fn fence_not_ready(mut self) -> Self {
        self.snap.local.fence_ready = false;
        self
    }

    /// Holding the key, `n` promotions failed in a row; the first was
    /// requested `trying_for_ms` ago.
    fn failed_promotions(mut self, n: u32, trying_for_ms: u64) -> Self {
        self.snap.local.failed_promotions = n;
        self.snap.local.promoting_since_ms = Some(NOW - trying_for_ms);
        self
    }

    /// Gave the key up after failed promotions, `ago_ms` ago.
    fn resigned(mut self, ago_ms: u64) -> Self {
        self.snap.local.resigned_at_ms = Some(NOW - ago_ms);
        self
    }

    fn failed_starts(mut self, n: u32) -> Self {
        self.snap.local.failed_starts = n;
        self
    }

    /// The data directory last ran as a primary (the agent's mark).
    fn former_primary(mut self) -> Self {
        self.snap.local.former_primary = true;
        self
    }

    fn rewind_failed(mut self) -> Self {
        self.snap.local.rewind_failed = true;
        self
    }

    fn job(mut self, job: Job) -> Self {
        self.snap.job = Some(job);
        self
    }

    // --- configuration and the leader race -----------------------------------

    fn ha(mut self, edit: impl FnOnce(&mut HaConfig)) -> Self {
        edit(&mut self.snap.ha);
        self
    }

    fn peer(mut self, name: &str, report: PeerReport) -> Self {
        self.snap.peers.push(PeerStatus {
            name: m(name),
            report: Some(report),
        });
        self
    }

    /// A peer whose API did not answer in time.
    fn unreachable_peer(mut self, name: &str) -> Self {
        self.snap.peers.push(PeerStatus {
            name: m(name),
            report: None,
        });
        self
    }

    /// A member known from before an etcd outage whose record the outage
    /// expired a moment ago (its agent has not published again yet).
    fn remembered_after_outage(mut self, name: &str) -> Self {
        self.remembered.insert(
            m(name),
            KnownMember {
                api_url: format!("http://{name}:8008"),
                host: format!("{name}.db"),
                port: 5432,
                nosync: false,
                absent_since_ms: Some(NOW - 100),
                lost_in_outage: true,
            },
        );
        self
    }

    /// A member whose record expired while etcd was reachable: it stopped
    /// renewing (not forgotten yet).
    fn remembered_gone(mut self, name: &str) -> Self {
        self.remembered.insert(
            m(name),
            KnownMember {
                api_url: format!("http://{name}:8008"),
                host: format!("{name}.db"),
                port: 5432,
                nosync: false,
                absent_since_ms: Some(NOW - 100),
                lost_in_outage: false,
            },
        );
        self
    }

    fn last_leader(mut self, name: &str) -> Self {
        self.snap.last_leader = Some(m(name));
        self
    }

    fn last_leader_lsn(mut self, lsn: u64) -> Self {
        self.snap.last_leader_lsn = Some(Lsn(lsn));
        self
    }
}

// ---------------------------------------------------------------------------
// Table helpers.

fn wait(reason: Reason) -> Decision {
    Decision::wait(reason)
}

fn act(action: Action, reason: Reason) -> Decision {
    Decision::new(action, reason)
}

fn demote(why: DemoteReason, reason: Reason) -> Decision {
    act(Action::Demote { reason: why }, reason)
}

fn not_healthiest(d: Disqualified) -> Decision {
    wait(Reason::NotHealthiest(d))
}

type Row = (&'static str, Fixture, Decision);

/// Runs every row and reports all mismatches at once, by row name.
fn check(rows: Vec<Row>) {
    let mut names = BTreeSet::new();
    let mut failures = Vec::new();
    for (name, fixture, want) in rows {
        assert!(names.insert(name), "duplicate row name {name:?}");
        let got = decide(&fixture.snapshot());
        if got != want {
            failures.push(format!("{name}\n   want {want:?}\n    got {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} row(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

type F = Fixture;

// ---------------------------------------------------------------------------
// Tables: one per stage of decide, in the order decide asks its questions.

#[test]
fn a_running_job_overrides_everything() {
    check(vec![
        (
            "rewinding, even as leader",
            F::new("n1")
                .leader("n1")
                .lease_held(VALID)
                .primary()
                .job(Job::Rewinding),
            wait(Reason::JobRunning(Job::Rewinding)),
        ),
        (
            "cloning, DCS down",
            F::new("n1").empty_data().dcs_down().job(Job::Cloning),
            wait(Reason::JobRunning(Job::Cloning)),
        ),
        (
            "bootstrapping, not initialized",
            F::new("n1")
                .initialize(None)
                .empty_data()
                .job(Job::Bootstrapping),
            wait(Reason::JobRunning(Job::Bootstrapping)),
        ),
    ]);
}

#[test]
fn dcs_unreachable() {
    check(vec![
        (
            "primary, lease valid: one slow etcd read is no reason to fail over",
            F::new("n1").lease_held(VALID).primary().dcs_down(),
            wait(Reason::DcsUnreachableLeaseValid),
        ),
        (
            "primary, lease valid exactly until now + fence_margin",
            F::new("n1")
                .lease_held(FENCE_MARGIN_MS)
                .primary()
                .dcs_down(),
            wait(Reason::DcsUnreachableLeaseValid),
        ),
        (
            "primary, lease inside the fence margin",
            F::new("n1").lease_held(EXPIRING).primary().dcs_down(),
            demote(DemoteReason::LeaseLost, Reason::LeaseRunningOut),
        ),
        (
            "primary, lease gone",
            F::new("n1").lease_lost().primary().dcs_down(),
            demote(DemoteReason::LeaseLost, Reason::LeaseRunningOut),
        ),
        (
            "primary without any lease",
            F::new("n1").primary().dcs_down(),
            demote(DemoteReason::LeaseLost, Reason::LeaseRunningOut),
        ),
        (
            "stopped standby starts read-only",
            F::new("n1").stopped(OnDisk::Standby).dcs_down(),
            act(
                Action::StartReplica { leader: None },
                Reason::DcsUnreachable,
            ),
        ),
        (
            "stopped former primary, even with a valid lease, stays down: its history may have diverged",
            F::new("n1")
                .lease_held(VALID)
                .stopped(OnDisk::FormerPrimary)
                .dcs_down(),
            wait(Reason::DcsUnreachable),
        ),
        (
            "stopped standby-looking data that last ran as a primary stays down",
            F::new("n1")
                .stopped(OnDisk::Standby)
                .former_primary()
                .dcs_down(),
            wait(Reason::DcsUnreachable),
        ),
        (
            "stopped, empty data",
            F::new("n1").empty_data().stopped(None).dcs_down(),
            wait(Reason::DcsUnreachable),
        ),
        (
            "stopped, unusable data",
            F::new("n1").unusable_data().stopped(None).dcs_down(),
            wait(Reason::DcsUnreachable),
        ),
        (
            "streaming replica",
            F::new("n1").replica_streaming_from("n2").dcs_down(),
            wait(Reason::DcsUnreachable),
        ),
        (
            "replica with a valid lease is not promoted",
            F::new("n1").lease_held(VALID).replica().dcs_down(),
            wait(Reason::DcsUnreachable),
        ),
        (
            "starting",
            F::new("n1").starting(0).dcs_down(),
            wait(Reason::DcsUnreachable),
        ),
    ]);
}

#[test]
fn initialize_key() {
    let pending = |by: &str| Some(Initialize::Pending { by: m(by) });
    let done_other = Some(Initialize::Done {
        system_id: "999".into(),
    });
    check(vec![
        (
            "not initialized, empty data: race to bootstrap",
            F::new("n1").initialize(None).empty_data(),
            act(Action::Bootstrap, Reason::NotInitialized),
        ),
        (
            "not initialized, empty data, own record not yet visible: publish first",
            F::new("n1")
                .initialize(None)
                .empty_data()
                .without_own_record(),
            wait(Reason::BootstrapGrace),
        ),
        (
            "not initialized, empty data, agent just started: give the others a moment",
            F::new("n1").initialize(None).empty_data().up_for_ms(1_499),
            wait(Reason::BootstrapGrace),
        ),
        (
            "not initialized, empty data, up for three loops: race",
            F::new("n1").initialize(None).empty_data().up_for_ms(1_500),
            act(Action::Bootstrap, Reason::NotInitialized),
        ),
        (
            "not initialized, local data: never guess",
            F::new("n1").initialize(None).stopped(OnDisk::FormerPrimary),
            wait(Reason::ForeignDataDirectory),
        ),
        (
            "not initialized, unusable data",
            F::new("n1").initialize(None).unusable_data(),
            wait(Reason::ForeignDataDirectory),
        ),
        (
            "pending by me, empty data: resume my bootstrap",
            F::new("n1").initialize(pending("n1")).empty_data(),
            act(Action::Bootstrap, Reason::NotInitialized),
        ),
        (
            // The initialization stopped half-way (a role may be missing):
            // finish it on the data present, which marks the cluster
            // initialized; carrying on as a leader would leave it pending
            // and the other members waiting for ever.
            "pending by me, data present: finish the initialization",
            F::new("n1")
                .initialize(pending("n1"))
                .leader("n1")
                .lease_held(VALID)
                .primary(),
            act(Action::Adopt, Reason::ResumingInitialization),
        ),
        (
            // A restore from a backup cut short by a crash: the copy may be
            // partial, so it is never adopted as the cluster's database.
            "pending by me, a restore from a backup unfinished: restore again",
            F::new("n1")
                .initialize(pending("n1"))
                .stopped(OnDisk::Standby)
                .restore_unfinished(),
            act(Action::Bootstrap, Reason::RestartingRestore),
        ),
        (
            "pending by me, a restore unfinished, its server replaying: restore again",
            F::new("n1")
                .initialize(pending("n1"))
                .replica_streaming_from("n2")
                .restore_unfinished(),
            act(Action::Bootstrap, Reason::RestartingRestore),
        ),
        (
            // The restore failed and its removal too: the partial copy
            // looks like a database pgha never managed, but is never
            // adopted; it is bootstrapped over like an empty directory.
            "not initialized, a partial restore of mine: bootstrap over it",
            F::new("n1")
                .initialize(None)
                .stopped(OnDisk::FormerPrimary)
                .unmanaged(Unmanaged::Primary)
                .restore_unfinished(),
            act(Action::Bootstrap, Reason::NotInitialized),
        ),
        (
            "not initialized, a partial restore of mine, another member adopting: wait",
            F::new("n1")
                .initialize(None)
                .stopped(OnDisk::FormerPrimary)
                .restore_unfinished()
                .member_with("n2", |r| r.adoptable = true),
            wait(Reason::WaitingForAdoption { by: m("n2") }),
        ),
        (
            "pending by another, my restore mark left over: wait for it",
            F::new("n1")
                .initialize(pending("n2"))
                .empty_data()
                .restore_unfinished(),
            wait(Reason::BootstrapInProgress { by: m("n2") }),
        ),
        (
            "pending by me, a restore unfinished, no fence keeper: wait",
            F::new("n1")
                .initialize(pending("n1"))
                .empty_data()
                .restore_unfinished()
                .fence_not_ready(),
            wait(Reason::FenceKeeperNotReady),
        ),
        (
            "pending by me, a standby pgha never managed: refuse",
            F::new("n1")
                .initialize(pending("n1"))
                .stopped(OnDisk::Standby)
                .unmanaged(Unmanaged::Standby),
            wait(Reason::CannotAdoptStandby),
        ),
        (
            "not initialized, a primary pgha never managed: adopt it",
            F::new("n1")
                .initialize(None)
                .stopped(OnDisk::FormerPrimary)
                .unmanaged(Unmanaged::Primary),
            act(Action::Adopt, Reason::AdoptingDatabase),
        ),
        (
            "not initialized, a running primary pgha never managed: adopt it",
            F::new("n1")
                .initialize(None)
                .primary()
                .unmanaged(Unmanaged::Primary),
            act(Action::Adopt, Reason::AdoptingDatabase),
        ),
        (
            "not initialized, a running primary pgha never managed, no fence keeper: wait, untouched",
            F::new("n1")
                .initialize(None)
                .primary()
                .unmanaged(Unmanaged::Primary)
                .fence_not_ready(),
            wait(Reason::FenceKeeperNotReady),
        ),
        (
            "not initialized, a standby pgha never managed: refuse, touch nothing",
            F::new("n1")
                .initialize(None)
                .stopped(OnDisk::Standby)
                .unmanaged(Unmanaged::Standby),
            wait(Reason::CannotAdoptStandby),
        ),
        (
            "not initialized, empty data, another member adopts: wait for it",
            F::new("n1")
                .initialize(None)
                .empty_data()
                .member_with("n3", |r| r.adoptable = true)
                .member_with("n2", |r| r.adoptable = true)
                .member("n4"),
            wait(Reason::WaitingForAdoption { by: m("n2") }),
        ),
        (
            "pending by another member, a running primary pgha never managed: left running",
            F::new("n1")
                .initialize(pending("n2"))
                .primary()
                .unmanaged(Unmanaged::Primary),
            wait(Reason::UnmanagedDatabaseBesideCluster),
        ),
        (
            "done, a running primary pgha never managed: left running, never demoted",
            F::new("n1")
                .initialize(done_other.clone())
                .leader("n2")
                .primary()
                .unmanaged(Unmanaged::Primary),
            wait(Reason::UnmanagedDatabaseBesideCluster),
        ),
        (
            "pending by another member, empty data",
            F::new("n1").initialize(pending("n2")).empty_data(),
            wait(Reason::BootstrapInProgress { by: m("n2") }),
        ),
        (
            "pending by another member, stopped",
            F::new("n1")
                .initialize(pending("n2"))
                .stopped(OnDisk::Standby),
            wait(Reason::BootstrapInProgress { by: m("n2") }),
        ),
        (
            "done, other system id, primary: stop writes first",
            F::new("n1")
                .initialize(done_other.clone())
                .leader("n1")
                .lease_held(VALID)
                .primary(),
            demote(DemoteReason::NoLeaderKey, Reason::ForeignDataDirectory),
        ),
        (
            "done, other system id, replica",
            F::new("n1")
                .initialize(done_other.clone())
                .leader("n2")
                .replica_streaming_from("n2"),
            wait(Reason::ForeignDataDirectory),
        ),
        (
            "done, other system id, stopped",
            F::new("n1")
                .initialize(done_other.clone())
                .leader("n2")
                .stopped(OnDisk::Standby),
            wait(Reason::ForeignDataDirectory),
        ),
        (
            "done, own system id unknown: not treated as foreign",
            F::new("n1")
                .leader("n2")
                .stopped(OnDisk::Standby)
                .system_id(None),
            act(
                Action::StartReplica {
                    leader: Some(m("n2")),
                },
                Reason::StartingAsReplica,
            ),
        ),
        (
            "done, empty data: no system id to compare, clone",
            F::new("n1").leader("n2").empty_data().stopped(None),
            act(Action::Clone { leader: m("n2") }, Reason::CloningLeader),
        ),
    ]);
}

#[test]
fn unusable_data_directory() {
    check(vec![
        (
            "primary",
            F::new("n1")
                .leader("n1")
                .lease_held(VALID)
                .primary()
                .unusable_data(),
            demote(DemoteReason::NoLeaderKey, Reason::UnusableDataDirectory),
        ),
        (
            "stopped, another leader",
            F::new("n1").leader("n2").unusable_data().stopped(None),
            wait(Reason::UnusableDataDirectory),
        ),
        (
            "stopped, no leader",
            F::new("n1").unusable_data().stopped(None),
            wait(Reason::UnusableDataDirectory),
        ),
    ]);
}

#[test]
fn leader_key_is_mine() {
    let me = || F::new("n1").leader("n1");
    check(vec![
        (
            "lease not held (agent restarted): adopt it",
            me().primary(),
            act(
                Action::AdoptLease { lease_id: LEASE_ID },
                Reason::LeaderKeyIsMine,
            ),
        ),
        (
            "lease not held, stopped",
            me().stopped(OnDisk::FormerPrimary),
            act(
                Action::AdoptLease { lease_id: LEASE_ID },
                Reason::LeaderKeyIsMine,
            ),
        ),
        (
            "lease inside the fence margin, primary",
            me().lease_held(EXPIRING).primary(),
            demote(DemoteReason::LeaseLost, Reason::LeaseRunningOut),
        ),
        (
            "lease gone, primary",
            me().lease_lost().primary(),
            demote(DemoteReason::LeaseLost, Reason::LeaseRunningOut),
        ),
        (
            "lease inside the fence margin, replica",
            me().lease_held(EXPIRING).replica(),
            act(Action::ReleaseLease, Reason::LeaseRunningOut),
        ),
        (
            "lease gone, stopped",
            me().lease_lost().stopped(OnDisk::FormerPrimary),
            act(Action::ReleaseLease, Reason::LeaseRunningOut),
        ),
        (
            "lease valid exactly until now + fence_margin still counts",
            me().lease_held(FENCE_MARGIN_MS).primary(),
            wait(Reason::Leading),
        ),
    ]);
}

#[test]
fn leader_switchover() {
    let leading = || F::new("n1").leader("n1").lease_held(VALID).primary();
    check(vec![
        (
            "switchover from me, unscheduled",
            leading().failover_request(Some("n1"), Some("n2")),
            demote(DemoteReason::Switchover, Reason::SwitchoverRequested),
        ),
        (
            "switchover from me, any target",
            leading().failover_request(Some("n1"), None),
            demote(DemoteReason::Switchover, Reason::SwitchoverRequested),
        ),
        (
            "switchover from me, scheduled in the past",
            leading()
                .failover_request(Some("n1"), Some("n2"))
                .not_before(-1),
            demote(DemoteReason::Switchover, Reason::SwitchoverRequested),
        ),
        (
            "switchover from me, scheduled for exactly now",
            leading()
                .failover_request(Some("n1"), Some("n2"))
                .not_before(0),
            demote(DemoteReason::Switchover, Reason::SwitchoverRequested),
        ),
        (
            "switchover from me, scheduled later: keep leading",
            leading()
                .failover_request(Some("n1"), Some("n2"))
                .not_before(1),
            wait(Reason::SwitchoverScheduled),
        ),
        (
            "switchover scheduled later, slots still kept in shape",
            leading()
                .member("n2")
                .failover_request(Some("n1"), Some("n2"))
                .not_before(60_000),
            act(
                Action::Lead {
                    create_slots: vec!["pgha_n2".into()],
                    drop_slots: vec![],
                },
                Reason::SwitchoverScheduled,
            ),
        ),
        (
            "switchover from another member: not mine to act on",
            leading().failover_request(Some("n3"), Some("n2")),
            wait(Reason::Leading),
        ),
        (
            "failover request without a source: the leader ignores it",
            leading().failover_request(None, Some("n2")),
            wait(Reason::Leading),
        ),
        (
            "switchover due, a proxy still draining: keep leading, say who is waited for",
            leading()
                .failover_request(Some("n1"), Some("n2"))
                .proxy("p1", true, Some(FAILOVER_REV))
                .proxy("p2", true, None),
            wait(Reason::WaitingForProxiesToDrain {
                pending: vec!["p2".into()],
            }),
        ),
        (
            "switchover due, a proxy acknowledged an older request: still waited for",
            leading().failover_request(Some("n1"), Some("n2")).proxy(
                "p1",
                true,
                Some(FAILOVER_REV - 1),
            ),
            wait(Reason::WaitingForProxiesToDrain {
                pending: vec!["p1".into()],
            }),
        ),
        (
            "switchover due, every read-write proxy drained: demote",
            leading()
                .failover_request(Some("n1"), Some("n2"))
                .proxy("p1", true, Some(FAILOVER_REV))
                .proxy("ro-only", false, None),
            demote(DemoteReason::Switchover, Reason::SwitchoverRequested),
        ),
        (
            "switchover due, a proxy silent past its drain_timeout and the margin: demote anyway",
            leading()
                .failover_request(Some("n1"), Some("n2"))
                .requested_ago(PROXY_DRAIN_MS + PROXY_ACK_MARGIN_MS)
                .proxy("p1", true, None),
            demote(DemoteReason::Switchover, Reason::SwitchoverRequested),
        ),
        (
            "switchover due, just inside the proxy's drain_timeout and the margin: wait",
            leading()
                .failover_request(Some("n1"), Some("n2"))
                .requested_ago(PROXY_DRAIN_MS + PROXY_ACK_MARGIN_MS - 1)
                .proxy("p1", true, None),
            wait(Reason::WaitingForProxiesToDrain {
                pending: vec!["p1".into()],
            }),
        ),
        (
            "switchover scheduled later: proxies are not waited for yet",
            leading()
                .failover_request(Some("n1"), Some("n2"))
                .not_before(1)
                .proxy("p1", true, None),
            wait(Reason::SwitchoverScheduled),
        ),
        (
            "switchover from me, lease running out: the lease comes first",
            F::new("n1")
                .leader("n1")
                .lease_held(EXPIRING)
                .primary()
                .failover_request(Some("n1"), Some("n2")),
            demote(DemoteReason::LeaseLost, Reason::LeaseRunningOut),
        ),
    ]);
}

#[test]
fn leader_with_valid_lease() {
    let me = || F::new("n1").leader("n1").lease_held(VALID);
    let lead = |create: &[&str], drop: &[&str]| {
        act(
            Action::Lead {
                create_slots: create.iter().map(|s| format!("pgha_{s}")).collect(),
                drop_slots: drop.iter().map(|s| format!("pgha_{s}")).collect(),
            },
            Reason::Leading,
        )
    };
    check(vec![
        (
            "primary, alone, no slots",
            me().primary(),
            wait(Reason::Leading),
        ),
        (
            "primary, slots match the members",
            me().member("n2")
                .member("n3")
                .primary()
                .slots(&["n2", "n3"]),
            wait(Reason::Leading),
        ),
        (
            "primary, one slot per other member missing",
            me().member("n3").member("n2").primary(),
            lead(&["n2", "n3"], &[]),
        ),
        (
            "primary, slot of a departed member dropped",
            me().member("n2").primary().slots(&["n2", "n9"]),
            lead(&[], &["n9"]),
        ),
        (
            "primary, create and drop at once",
            me().member("n2").primary().slots(&["n9"]),
            lead(&["n2"], &["n9"]),
        ),
        (
            "primary, slots pgha did not create are left alone",
            me().member("n2")
                .primary()
                .slots(&["n2"])
                .foreign_slot("backup_tool"),
            wait(Reason::Leading),
        ),
        (
            "primary, own slot never wanted",
            me().member("n2").primary().slots(&["n1", "n2"]),
            lead(&[], &["n1"]),
        ),
        (
            "slot names are sanitized member names",
            me().member("Node-3").primary(),
            lead(&["node_3"], &[]),
        ),
        (
            "paused does not stop a healthy leader",
            me().paused().primary(),
            wait(Reason::Leading),
        ),
        (
            "running replica: promote",
            me().replica(),
            act(Action::Promote { sync: None }, Reason::PromotingWithLease),
        ),
        (
            "starting, within primary_start_timeout",
            me().starting(PRIMARY_START_TIMEOUT_MS - 1),
            wait(Reason::PostgresStarting),
        ),
        (
            "starting for primary_start_timeout: hand over",
            me().starting(PRIMARY_START_TIMEOUT_MS),
            act(Action::StopAndRelease, Reason::PrimaryDownTooLong),
        ),
        (
            "stopped former primary: restart it writable in place",
            me().stopped(OnDisk::FormerPrimary)
                .down_for(PRIMARY_START_TIMEOUT_MS - 1),
            act(
                Action::StartPrimary {
                    sync: SyncSetting::empty(),
                },
                Reason::RestartingPrimary,
            ),
        ),
        (
            "stopped standby data: start read-only, then promote",
            me().stopped(OnDisk::Standby),
            act(
                Action::StartReplica { leader: None },
                Reason::StartingBeforePromotion,
            ),
        ),
        (
            "stopped, pg_control unreadable: never writable in place",
            me().stopped(None),
            act(
                Action::StartReplica { leader: None },
                Reason::StartingBeforePromotion,
            ),
        ),
        (
            "stopped former primary for primary_start_timeout: hand over",
            me().stopped(OnDisk::FormerPrimary)
                .down_for(PRIMARY_START_TIMEOUT_MS),
            act(Action::ReleaseLease, Reason::PrimaryDownTooLong),
        ),
        (
            "stopped standby data for too long: hand over",
            me().stopped(OnDisk::Standby)
                .down_for(PRIMARY_START_TIMEOUT_MS + 1),
            act(Action::ReleaseLease, Reason::PrimaryDownTooLong),
        ),
        (
            "data directory gone",
            me().empty_data().stopped(None),
            act(Action::ReleaseLease, Reason::DataDirectoryLost),
        ),
        (
            "paused, stopped: no restart, no hand-over",
            me().paused()
                .stopped(OnDisk::FormerPrimary)
                .down_for(PRIMARY_START_TIMEOUT_MS * 10),
            wait(Reason::Paused),
        ),
    ]);
}

#[test]
fn follower() {
    let other = || F::new("n1").leader("n2");
    let follow = || {
        act(
            Action::Follow { leader: m("n2") },
            Reason::RepointingToLeader { leader: m("n2") },
        )
    };
    let following = || wait(Reason::Following { leader: m("n2") });
    let rewind = |reason| act(Action::Rewind { leader: m("n2") }, reason);
    let reclone = || {
        act(
            Action::Reclone { leader: m("n2") },
            Reason::RecloningAfterRewindFailure,
        )
    };
    let no_reclone = |h: &mut HaConfig| h.reclone_on_rewind_failure = false;
    check(vec![
        (
            "former primary started read-only, not streaming yet: rewound before it follows",
            other().replica_stalled("n2", 1).former_primary(),
            rewind(Reason::RewindingFormerPrimary),
        ),
        (
            "the leader's record expired before its key: nothing to re-point at yet",
            F::new("n1")
                .leader("n2")
                .without_record("n2")
                .replica_streaming_from("n3"),
            wait(Reason::LeaderRecordMissing { leader: m("n2") }),
        ),
        (
            "a replica whose server exits at every start is repaired: rewind first",
            other().stopped(OnDisk::Standby).failed_starts(3),
            rewind(Reason::StartKeepsFailing),
        ),
        (
            "two failed starts are not yet a pattern",
            other().stopped(OnDisk::Standby).failed_starts(2),
            act(
                Action::StartReplica {
                    leader: Some(m("n2")),
                },
                Reason::StartingAsReplica,
            ),
        ),
        (
            "still failing after a failed rewind: re-clone",
            other()
                .stopped(OnDisk::Standby)
                .failed_starts(3)
                .rewind_failed(),
            reclone(),
        ),
        (
            "stopped standby data that last ran as a primary: rewound",
            other().stopped(OnDisk::Standby).former_primary(),
            rewind(Reason::RewindingFormerPrimary),
        ),
        (
            "primary while another member leads",
            other().primary(),
            demote(
                DemoteReason::OtherLeader {},
                Reason::OtherLeaderHoldsKey { leader: m("n2") },
            ),
        ),
        (
            "primary while another leads, even believing it holds a lease",
            other().lease_held(VALID).primary(),
            demote(
                DemoteReason::OtherLeader {},
                Reason::OtherLeaderHoldsKey { leader: m("n2") },
            ),
        ),
        (
            "paused, promoted by hand while another holds the key: hands off, alarm",
            other().paused().primary(),
            wait(Reason::PausedBesideAnotherPrimary { leader: m("n2") }),
        ),
        (
            "the same once resumed: demoted",
            other().primary(),
            demote(
                DemoteReason::OtherLeader {},
                Reason::OtherLeaderHoldsKey { leader: m("n2") },
            ),
        ),
        (
            "a stale lease belief while another leads",
            other().lease_held(VALID).replica_streaming_from("n2"),
            act(
                Action::ReleaseLease,
                Reason::OtherLeaderHoldsKey { leader: m("n2") },
            ),
        ),
        (
            "paused, replica pointing elsewhere",
            other().paused().replica_streaming_from("n3"),
            wait(Reason::Paused),
        ),
        (
            "paused, stopped",
            other().paused().stopped(OnDisk::FormerPrimary),
            wait(Reason::Paused),
        ),
        (
            "replica configured for no upstream",
            other().replica(),
            follow(),
        ),
        (
            "replica streaming from the old leader",
            other().replica_streaming_from("n3"),
            follow(),
        ),
        (
            "streaming from the leader",
            other().replica_streaming_from("n2").slots(&["n2"]),
            following(),
        ),
        (
            "streaming, no slots yet: unreserved slots for the others, so they exist when promoted",
            other().member("n3").replica_streaming_from("n2"),
            act(
                Action::PrepareSlots {
                    create_slots: vec!["pgha_n2".into(), "pgha_n3".into()],
                    drop_slots: vec![],
                    reset_slots: vec![],
                },
                Reason::Following { leader: m("n2") },
            ),
        ),
        (
            "streaming: a member known only from before an etcd outage keeps its slot; a departed one loses it",
            other()
                .remembered_after_outage("n3")
                .replica_streaming_from("n2")
                .slots(&["n2", "n3", "old"])
                .foreign_slot("backup_tool"),
            act(
                Action::PrepareSlots {
                    create_slots: vec![],
                    drop_slots: vec!["pgha_old".into()],
                    reset_slots: vec![],
                },
                Reason::Following { leader: m("n2") },
            ),
        ),
        (
            "streaming, former leader: slots it reserved are reset, or they pin its WAL",
            other()
                .member("n3")
                .replica_streaming_from("n2")
                .held_slot("n2", Some(L - 0x5000000), true)
                .held_slot("n3", Some(L - 0x5000000), false),
            act(
                Action::PrepareSlots {
                    create_slots: vec![],
                    drop_slots: vec![],
                    reset_slots: vec!["pgha_n2".into(), "pgha_n3".into()],
                },
                Reason::Following { leader: m("n2") },
            ),
        ),
        (
            "streaming: an xmin alone (feedback forwarded to the leader) is reset too",
            other()
                .member("n3")
                .replica_streaming_from("n2")
                .slots(&["n3"])
                .held_slot("n2", None, true),
            act(
                Action::PrepareSlots {
                    create_slots: vec![],
                    drop_slots: vec![],
                    reset_slots: vec!["pgha_n2".into()],
                },
                Reason::Following { leader: m("n2") },
            ),
        ),
        (
            "streaming: one slot missing, one held, one departed, in one step",
            other()
                .member("n3")
                .replica_streaming_from("n2")
                .held_slot("n2", Some(L), true)
                .held_slot("old", Some(L), true),
            act(
                Action::PrepareSlots {
                    create_slots: vec!["pgha_n3".into()],
                    drop_slots: vec!["pgha_old".into()],
                    reset_slots: vec!["pgha_n2".into()],
                },
                Reason::Following { leader: m("n2") },
            ),
        ),
        (
            "streaming: a slot a member streams from (cascading) is kept as it is",
            other()
                .member("n3")
                .replica_streaming_from("n2")
                .slots(&["n2"])
                .held_slot("n3", Some(L), true)
                .active(),
            following(),
        ),
        (
            "not streaming yet (a former leader waits for its rewind): held slots wait",
            other()
                .member("n3")
                .replica_stalled("n2", 1_000)
                .slots(&["n3"])
                .held_slot("n2", Some(L), true),
            following(),
        ),
        (
            "not streaming yet: slots wait",
            other().member("n3").replica_stalled("n2", 1_000),
            following(),
        ),
        (
            "stalled past a branch point the leader recorded: diverged, rewind",
            other()
                .replica_stalled("n2", STREAM_STALL_MS)
                .leader_branched_at("n2", Some(L - 1)),
            rewind(Reason::StreamingStalled),
        ),
        (
            "receiving an older timeline past the leader's branch point: diverged, rewind at once",
            other()
                .replica_stalled("n2", 0)
                .leader_branched_at("n2", Some(L - 1))
                .receiver_running(false),
            rewind(Reason::DivergedFromLeader {
                leader: m("n2"),
                timeline: Timeline(1),
                switch_lsn: Lsn(L - 1),
            }),
        ),
        (
            "the same while the receiver looks streaming between retries: rewind at once",
            other()
                .replica_streaming_from("n2")
                .leader_branched_at("n2", Some(L - 1))
                .receiver_running(true),
            rewind(Reason::DivergedFromLeader {
                leader: m("n2"),
                timeline: Timeline(1),
                switch_lsn: Lsn(L - 1),
            }),
        ),
        (
            "receiving an older timeline exactly up to the branch point: shared, no rewind",
            other()
                .replica_streaming_from("n2")
                .slots(&["n2"])
                .leader_branched_at("n2", Some(L))
                .receiver_running(true),
            following(),
        ),
        (
            "past the branch point but no receiver runs (timeline may be a stale restartpoint's): wait for the stall timer",
            other()
                .replica_stalled("n2", 0)
                .leader_branched_at("n2", Some(L - 1)),
            following(),
        ),
        (
            "receiving an older timeline past the branch point, but the leader is down: wait",
            other()
                .leader_not_running()
                .replica_stalled("n2", 0)
                .leader_branched_at("n2", Some(L - 1))
                .receiver_running(false),
            following(),
        ),
        (
            "stalled on an older timeline, no history recorded: not proven, rewind",
            other()
                .replica_stalled("n2", STREAM_STALL_MS)
                .leader_branched_at("n2", None),
            rewind(Reason::StreamingStalled),
        ),
        (
            "stalled on an older timeline, not past the branch point: no rewind",
            other()
                .replica_stalled("n2", STREAM_STALL_MS)
                .leader_branched_at("n2", Some(L)),
            wait(Reason::NotStreamingSameHistory { leader: m("n2") }),
        ),
        (
            "stalled on the leader's own timeline: no rewind (it would change nothing)",
            other().replica_stalled("n2", STREAM_STALL_MS),
            wait(Reason::NotStreamingSameHistory { leader: m("n2") }),
        ),
        (
            "stalled, own timeline unknown: not proven, rewind",
            other()
                .replica_stalled("n2", STREAM_STALL_MS)
                .timeline(None),
            rewind(Reason::StreamingStalled),
        ),
        (
            "not streaming for just under stream_stall_timeout",
            other().replica_stalled("n2", STREAM_STALL_MS - 1),
            following(),
        ),
        (
            "not streaming for long, but the leader is down: not our fault",
            other()
                .leader_not_running()
                .replica_stalled("n2", STREAM_STALL_MS * 10),
            following(),
        ),
        (
            "stopped streaming just now",
            other().replica_stalled("n2", 0),
            following(),
        ),
        (
            "not streaming, start of the stall unknown",
            other()
                .replica_stalled("n2", STREAM_STALL_MS * 10)
                .stall_start_unknown(),
            following(),
        ),
        (
            "stalled after a failed rewind: reclone",
            other()
                .rewind_failed()
                .replica_stalled("n2", STREAM_STALL_MS)
                .leader_branched_at("n2", Some(L - 1)),
            reclone(),
        ),
        (
            "stalled after a failed rewind, reclone disabled",
            other()
                .ha(no_reclone)
                .rewind_failed()
                .replica_stalled("n2", STREAM_STALL_MS)
                .leader_branched_at("n2", Some(L - 1)),
            wait(Reason::RewindFailedNoReclone),
        ),
        (
            "starting",
            other().starting(PRIMARY_START_TIMEOUT_MS * 10),
            wait(Reason::PostgresStarting),
        ),
        (
            "stopped, empty data, leader running: clone",
            other().empty_data().stopped(None),
            act(Action::Clone { leader: m("n2") }, Reason::CloningLeader),
        ),
        (
            "stopped, empty data, leader down",
            other().leader_not_running().empty_data().stopped(None),
            wait(Reason::NoLeaderToCloneFrom),
        ),
        (
            "stopped, empty data, leader has no record",
            other().leader_without_record().empty_data().stopped(None),
            wait(Reason::NoLeaderToCloneFrom),
        ),
        (
            "stopped after a failed rewind: reclone",
            other().rewind_failed().stopped(OnDisk::FormerPrimary),
            reclone(),
        ),
        (
            "stopped after a failed rewind, reclone disabled",
            other()
                .ha(no_reclone)
                .rewind_failed()
                .stopped(OnDisk::FormerPrimary),
            wait(Reason::RewindFailedNoReclone),
        ),
        (
            "stopped former primary, leader running: rewind",
            other().stopped(OnDisk::FormerPrimary),
            rewind(Reason::RewindingFormerPrimary),
        ),
        (
            "stopped former primary, leader down: wait for it",
            other().leader_not_running().stopped(OnDisk::FormerPrimary),
            wait(Reason::FormerPrimaryWaitsForRunningLeader { leader: m("n2") }),
        ),
        (
            "stopped former primary, leader record says replica: not running",
            other()
                .member_with("n2", |r| {
                    (r.role, r.state) = (PgRole::Replica, PgState::Streaming)
                })
                .stopped(OnDisk::FormerPrimary),
            wait(Reason::FormerPrimaryWaitsForRunningLeader { leader: m("n2") }),
        ),
        (
            "stopped after a failed rewind, leader down: repair waits",
            other()
                .leader_not_running()
                .rewind_failed()
                .stopped(OnDisk::FormerPrimary),
            wait(Reason::RepairWaitsForRunningLeader { leader: m("n2") }),
        ),
        (
            "stopped standby",
            other().stopped(OnDisk::Standby),
            act(
                Action::StartReplica {
                    leader: Some(m("n2")),
                },
                Reason::StartingAsReplica,
            ),
        ),
        (
            "stopped standby, leader down: start anyway, it will stream later",
            other().leader_not_running().stopped(OnDisk::Standby),
            act(
                Action::StartReplica {
                    leader: Some(m("n2")),
                },
                Reason::StartingAsReplica,
            ),
        ),
        (
            "stopped, pg_control unreadable",
            other().stopped(None),
            act(
                Action::StartReplica {
                    leader: Some(m("n2")),
                },
                Reason::StartingAsReplica,
            ),
        ),
    ]);
}

#[test]
fn no_lease_without_a_fence_keeper() {
    check(vec![
        (
            "healthiest replica, keeper dead: no race",
            F::new("n1")
                .member("n2")
                .peer("n2", report(1, 0))
                .replica()
                .fence_not_ready(),
            wait(Reason::FenceKeeperNotReady),
        ),
        (
            "own key after a restart, keeper not acknowledging: no adoption",
            F::new("n1").leader("n1").replica().fence_not_ready(),
            wait(Reason::FenceKeeperNotReady),
        ),
        (
            "writable after an agent restart, keeper not acknowledging: no adoption, demoted",
            F::new("n1").leader("n1").primary().fence_not_ready(),
            demote(DemoteReason::LeaseLost, Reason::FenceKeeperNotReady),
        ),
        (
            "uninitialized cluster, keeper dead: no bootstrap",
            F::new("n1").initialize(None).empty_data().fence_not_ready(),
            wait(Reason::FenceKeeperNotReady),
        ),
        (
            "writable, lease still valid, keeper gone: keeps writing until the acknowledged deadline",
            F::new("n1")
                .leader("n1")
                .lease_held(VALID)
                .primary()
                .fence_not_ready(),
            wait(Reason::Leading),
        ),
        (
            "writable under another member's key, keeper gone: still demotes",
            F::new("n1").leader("n2").primary().fence_not_ready(),
            demote(
                DemoteReason::OtherLeader {},
                Reason::OtherLeaderHoldsKey { leader: m("n2") },
            ),
        ),
    ]);
}

#[test]
fn no_leader() {
    let race = || act(Action::AcquireLease, Reason::RacingAsHealthiest);
    check(vec![
        (
            "primary without a leader key",
            F::new("n1").primary(),
            demote(DemoteReason::NoLeaderKey, Reason::WritableWithoutLease),
        ),
        (
            "primary without a key, lease believed valid",
            F::new("n1").lease_held(VALID).primary(),
            demote(DemoteReason::NoLeaderKey, Reason::WritableWithoutLease),
        ),
        (
            "lease believed held, replica",
            F::new("n1").lease_held(VALID).replica(),
            act(Action::ReleaseLease, Reason::LeaseRunningOut),
        ),
        (
            "starting",
            F::new("n1").starting(0),
            wait(Reason::PostgresStarting),
        ),
        (
            "stopped standby: start read-only",
            F::new("n1").stopped(OnDisk::Standby),
            act(
                Action::StartReplica { leader: None },
                Reason::StartingReadOnly,
            ),
        ),
        (
            "stopped former primary: read-only too",
            F::new("n1").stopped(OnDisk::FormerPrimary),
            act(
                Action::StartReplica { leader: None },
                Reason::StartingReadOnly,
            ),
        ),
        (
            "stopped, paused",
            F::new("n1").paused().stopped(OnDisk::Standby),
            wait(Reason::Paused),
        ),
        (
            "stopped, empty data",
            F::new("n1").empty_data().stopped(None),
            wait(Reason::NoLeaderToCloneFrom),
        ),
        (
            "running replica, nobody to compare with",
            F::new("n1").replica(),
            race(),
        ),
        (
            "running replica, paused",
            F::new("n1").paused().replica(),
            wait(Reason::Paused),
        ),
    ]);
}

#[test]
fn failover_requests_without_leader() {
    let target = || act(Action::AcquireLease, Reason::ManualFailoverTarget);
    let race = || act(Action::AcquireLease, Reason::RacingAsHealthiest);
    let waiting_for = |t: &str| wait(Reason::WaitingForSwitchoverTarget { target: m(t) });
    // After a switchover the old leader n2 published its final position.
    let after_switchover = |final_lsn: u64| {
        F::new("n1")
            .member_with("n2", |r| {
                r.flushed_lsn = Some(Lsn(final_lsn));
                r.state = PgState::Stopped;
            })
            .replica()
            .failover_request(Some("n2"), Some("n1"))
    };
    check(vec![
        (
            "I am the target",
            F::new("n1").replica().failover_request(None, Some("n1")),
            target(),
        ),
        (
            "I am the target, even paused",
            F::new("n1")
                .paused()
                .replica()
                .failover_request(None, Some("n1")),
            target(),
        ),
        (
            "I am the target, even with nofailover: the operator decides",
            F::new("n1")
                .ha(|h| h.nofailover = true)
                .replica()
                .failover_request(None, Some("n1")),
            target(),
        ),
        (
            "I am the target although a peer is ahead",
            F::new("n1")
                .replica()
                .peer("n3", report(1, L + 100))
                .failover_request(None, Some("n1")),
            target(),
        ),
        (
            "another member is the target",
            F::new("n1").replica().failover_request(None, Some("n3")),
            waiting_for("n3"),
        ),
        (
            "another target, request just under the TTL old",
            F::new("n1")
                .replica()
                .failover_request(None, Some("n3"))
                .requested_ago(FAILOVER_REQUEST_TTL_MS - 1),
            waiting_for("n3"),
        ),
        (
            "another target, request exactly the TTL old: ignored",
            F::new("n1")
                .replica()
                .failover_request(None, Some("n3"))
                .requested_ago(FAILOVER_REQUEST_TTL_MS),
            race(),
        ),
        (
            "stale request naming me: ordinary race, which I may lose",
            F::new("n1")
                .replica()
                .peer("n3", report(1, L + 100))
                .failover_request(None, Some("n1"))
                .requested_ago(FAILOVER_REQUEST_TTL_MS),
            not_healthiest(Disqualified::PeerAhead { peer: m("n3") }),
        ),
        (
            "stale request, paused",
            F::new("n1")
                .paused()
                .replica()
                .failover_request(None, Some("n3"))
                .requested_ago(FAILOVER_REQUEST_TTL_MS),
            wait(Reason::Paused),
        ),
        (
            "request without a target: ordinary race",
            F::new("n1").replica().failover_request(Some("n2"), None),
            race(),
        ),
        (
            "request does not start a stopped target",
            F::new("n1")
                .stopped(OnDisk::Standby)
                .failover_request(None, Some("n1")),
            act(
                Action::StartReplica { leader: None },
                Reason::StartingReadOnly,
            ),
        ),
        (
            "target behind the old leader's final position: catch up",
            after_switchover(L + 1),
            wait(Reason::CatchingUpBeforePromotion),
        ),
        (
            "target at the old leader's final position",
            after_switchover(L),
            target(),
        ),
        (
            "target past the old leader's final position",
            after_switchover(L - 1),
            target(),
        ),
        (
            "target behind, operator accepted data loss",
            after_switchover(L + 1).accept_data_loss(),
            target(),
        ),
        (
            "target's own position unknown: cannot prove it caught up",
            after_switchover(L).wal_unknown(),
            wait(Reason::CatchingUpBeforePromotion),
        ),
        (
            "old leader published no final position",
            F::new("n1")
                .member("n2")
                .replica()
                .failover_request(Some("n2"), Some("n1")),
            target(),
        ),
        (
            "old leader's record is gone",
            F::new("n1")
                .replica()
                .failover_request(Some("n2"), Some("n1")),
            target(),
        ),
    ]);
}

#[test]
fn election() {
    let race = || act(Action::AcquireLease, Reason::RacingAsHealthiest);
    let racer = || F::new("n1").replica().wal(L);
    check(vec![
        (
            "nofailover",
            racer().ha(|h| h.nofailover = true),
            not_healthiest(Disqualified::NoFailover),
        ),
        (
            "priority 0",
            racer().ha(|h| h.priority = 0),
            not_healthiest(Disqualified::NoFailover),
        ),
        (
            "own position unknown",
            racer().wal_unknown(),
            not_healthiest(Disqualified::UnknownPosition),
        ),
        (
            "lagging more than maximum_lag_on_failover",
            racer().last_leader_lsn(L + MAX_LAG + 1),
            not_healthiest(Disqualified::Lagging { bytes: MAX_LAG + 1 }),
        ),
        (
            "lagging exactly maximum_lag_on_failover",
            racer().last_leader_lsn(L + MAX_LAG),
            race(),
        ),
        (
            "ahead of the last known leader position",
            racer().last_leader_lsn(L - 1),
            race(),
        ),
        (
            "a peer has more WAL",
            racer().peer("n2", report(1, L + 1)),
            not_healthiest(Disqualified::PeerAhead { peer: m("n2") }),
        ),
        (
            "records expired by an etcd outage, peers remembered but not heard: no blind race",
            racer()
                .remembered_after_outage("n2")
                .remembered_after_outage("n3")
                .unreachable_peer("n2")
                .unreachable_peer("n3"),
            not_healthiest(Disqualified::TooFewAnswered { seen: 1, needed: 2 }),
        ),
        (
            "records expired, a remembered peer answers with more WAL: it wins",
            racer()
                .remembered_after_outage("n2")
                .remembered_after_outage("n3")
                .peer("n2", report(1, L + 1))
                .unreachable_peer("n3"),
            not_healthiest(Disqualified::PeerAhead { peer: m("n2") }),
        ),
        (
            "a majority heard, the lost leader not counted: race",
            racer()
                .member("n2")
                .member("n3")
                .last_leader("n3")
                .peer("n2", report(1, L - 1))
                .unreachable_peer("n3"),
            race(),
        ),
        (
            "the lost leader counts when unknown: 1 of 3 heard is too few",
            racer()
                .member("n2")
                .member("n3")
                .unreachable_peer("n2")
                .unreachable_peer("n3"),
            not_healthiest(Disqualified::TooFewAnswered { seen: 1, needed: 2 }),
        ),
        (
            "two members, the other was the leader: the survivor races alone",
            racer()
                .member("n2")
                .last_leader("n2")
                .unreachable_peer("n2"),
            race(),
        ),
        (
            "five members, leader lost, one more unreachable: 3 of 4 heard is enough",
            racer()
                .member("n2")
                .member("n3")
                .member("n4")
                .member("n5")
                .last_leader("n5")
                .peer("n2", report(1, L - 1))
                .peer("n3", report(1, L - 1))
                .unreachable_peer("n4"),
            race(),
        ),
        (
            "five members, leader lost, two more unreachable: 2 of 4 is not a majority",
            racer()
                .member("n2")
                .member("n3")
                .member("n4")
                .member("n5")
                .last_leader("n5")
                .peer("n2", report(1, L - 1))
                .unreachable_peer("n3")
                .unreachable_peer("n4"),
            not_healthiest(Disqualified::TooFewAnswered { seen: 2, needed: 3 }),
        ),
        (
            "a peer has less WAL",
            racer().peer("n2", report(1, L - 1)),
            race(),
        ),
        (
            "a peer on a later timeline wins even with less WAL",
            racer().peer("n2", report(2, L - 100)),
            not_healthiest(Disqualified::BehindTimeline { peer: m("n2") }),
        ),
        (
            "I am on a later timeline",
            racer().timeline(Some(2)).peer("n2", report(1, L + 100)),
            race(),
        ),
        (
            "own timeline unknown counts as the lowest",
            racer().timeline(None).peer("n2", report(1, L)),
            not_healthiest(Disqualified::BehindTimeline { peer: m("n2") }),
        ),
        (
            "equal position, peer has a higher priority",
            racer().peer(
                "n2",
                PeerReport {
                    priority: 101,
                    ..report(1, L)
                },
            ),
            not_healthiest(Disqualified::LowerPriority { peer: m("n2") }),
        ),
        (
            "equal position, I have the higher priority",
            racer().ha(|h| h.priority = 101).peer("n0", report(1, L)),
            race(),
        ),
        (
            "equal position and priority, peer has the lower name",
            F::new("n2").replica().peer("n1", report(1, L)),
            not_healthiest(Disqualified::LowerPriority { peer: m("n1") }),
        ),
        (
            "equal position and priority, I have the lower name",
            racer().peer("n2", report(1, L)),
            race(),
        ),
        (
            "a peer ahead but unreachable is ignored",
            racer().unreachable_peer("n2"),
            race(),
        ),
        (
            "a peer ahead but not running is ignored",
            racer().peer(
                "n2",
                PeerReport {
                    running: false,
                    ..report(1, L + 100)
                },
            ),
            race(),
        ),
        (
            "a peer ahead but with an unknown position is ignored",
            racer().peer(
                "n2",
                PeerReport {
                    wal_position: None,
                    ..report(1, L + 100)
                },
            ),
            race(),
        ),
        (
            "a peer ahead but nofailover is ignored",
            racer().peer(
                "n2",
                PeerReport {
                    nofailover: true,
                    ..report(1, L + 100)
                },
            ),
            race(),
        ),
        (
            "a peer ahead but with priority 0 is ignored",
            racer().peer(
                "n2",
                PeerReport {
                    priority: 0,
                    ..report(1, L + 100)
                },
            ),
            race(),
        ),
        (
            "several peers: the best one is named",
            racer()
                .peer("n2", report(1, L + 10))
                .unreachable_peer("n5")
                .peer("n3", report(1, L + 20))
                .peer(
                    "n4",
                    PeerReport {
                        nofailover: true,
                        ..report(3, L + 30)
                    },
                ),
            not_healthiest(Disqualified::PeerAhead { peer: m("n3") }),
        ),
        (
            "lag is checked before peers",
            racer()
                .last_leader_lsn(L + MAX_LAG + 1)
                .peer("n2", report(1, L - 1)),
            not_healthiest(Disqualified::Lagging { bytes: MAX_LAG + 1 }),
        ),
    ]);
}

#[test]
fn failover_request_freshness_counts_from_its_schedule() {
    let race = || act(Action::AcquireLease, Reason::RacingAsHealthiest);
    let ttl = FAILOVER_REQUEST_TTL_MS as i64;
    check(vec![
        (
            "requested long ago, scheduled for just under the TTL ago: fresh",
            F::new("n1")
                .replica()
                .failover_request(None, Some("n3"))
                .requested_ago(FAILOVER_REQUEST_TTL_MS * 2)
                .not_before(-(ttl - 1)),
            wait(Reason::WaitingForSwitchoverTarget { target: m("n3") }),
        ),
        (
            "requested long ago, scheduled for exactly the TTL ago: stale",
            F::new("n1")
                .replica()
                .failover_request(None, Some("n3"))
                .requested_ago(FAILOVER_REQUEST_TTL_MS * 2)
                .not_before(-ttl),
            race(),
        ),
    ]);
}

// ---------------------------------------------------------------------------
// Synchronous replication: the branches of decide that depend on the
// synchronous mode and the `sync` record. ha::sync computes the steps; these
// rows pin what decide does with them.

#[test]
fn sync_leader_keeps_the_set() {
    let leading = || {
        F::new("n1")
            .leader("n1")
            .lease_held(VALID)
            .member("n2")
            .primary()
            .slots(&["n2"])
    };
    let managing = |a| act(a, Reason::ManagingSynchronousStandbys);
    check(vec![
        (
            "mode on, no record yet: the record grows before the setting, degraded until the setting is in effect",
            leading().sync_mode(SyncMode::On).standby("n2", L, "async"),
            managing(Action::WriteSyncRecord(sync_rec("n1", &["n2"], 1, true))),
        ),
        (
            "mode on, record in place: then the setting switches",
            leading()
                .sync_mode(SyncMode::On)
                .sync_record("n1", &["n2"], 1, false)
                .standby("n2", L, "async"),
            managing(Action::SetSyncSetting(setting(&["n2"], 1, false))),
        ),
        (
            "mode on, record and setting agree: back to slots",
            leading()
                .sync_mode(SyncMode::On)
                .sync_record("n1", &["n2"], 1, false)
                .sync_setting(r#"FIRST 1 ("n2")"#)
                .standby("n2", L, "sync"),
            wait(Reason::Leading),
        ),
        (
            "another leader's record says nothing about my commits: rewrite it",
            leading()
                .sync_mode(SyncMode::On)
                .sync_record("n2", &["n3"], 1, false)
                .sync_setting(r#"FIRST 1 ("n2")"#)
                .standby("n2", L, "sync"),
            managing(Action::WriteSyncRecord(sync_rec("n1", &["n2"], 1, false))),
        ),
        (
            "mode on, no standby: record the degradation before going async",
            leading().sync_mode(SyncMode::On),
            managing(Action::WriteSyncRecord(sync_rec("n1", &[], 0, true))),
        ),
        (
            "mode on, the named standby is restarting (alive, not streaming): keep waiting for it, no degradation",
            leading()
                .sync_mode(SyncMode::On)
                .member_with("n2", |r| {
                    r.role = PgRole::Replica;
                    r.state = PgState::Starting;
                })
                .sync_record("n1", &["n2"], 1, false)
                .sync_setting("FIRST 1 (\"n2\")"),
            wait(Reason::Leading),
        ),
        (
            "mode on, the named standbys' records expired in an etcd outage: wait for them, no degradation",
            F::new("n1")
                .leader("n1")
                .lease_held(VALID)
                .primary()
                .slots(&["n2", "n3"])
                .sync_mode(SyncMode::On)
                .remembered_after_outage("n2")
                .remembered_after_outage("n3")
                .sync_record("n1", &["n2", "n3"], 1, false)
                .sync_setting(r#"FIRST 1 ("n2", "n3")"#),
            wait(Reason::Leading),
        ),
        (
            "mode on, a standby streams before its record returns: it is eligible (known member)",
            F::new("n1")
                .leader("n1")
                .lease_held(VALID)
                .primary()
                .slots(&["n2", "n3"])
                .sync_mode(SyncMode::On)
                .remembered_after_outage("n2")
                .remembered_after_outage("n3")
                .standby("n3", L, "sync")
                .sync_record("n1", &["n2", "n3"], 1, false)
                .sync_setting(r#"FIRST 1 ("n2", "n3")"#),
            managing(Action::SetSyncSetting(setting(&["n3"], 1, false))),
        ),
        (
            "mode on, the named standby's record expired while etcd was reachable: degrade",
            F::new("n1")
                .leader("n1")
                .lease_held(VALID)
                .primary()
                .slots(&["n2"])
                .sync_mode(SyncMode::On)
                .remembered_gone("n2")
                .sync_record("n1", &["n2"], 1, false)
                .sync_setting(r#"FIRST 1 ("n2")"#),
            managing(Action::WriteSyncRecord(sync_rec("n1", &["n2"], 1, true))),
        ),
        (
            "mode on, the named standby is gone: degrade (record first)",
            leading()
                .sync_mode(SyncMode::On)
                .member_with("n2", |r| r.state = PgState::Stopped)
                .sync_record("n1", &["n2"], 1, false)
                .sync_setting("FIRST 1 (\"n2\")"),
            managing(Action::WriteSyncRecord(sync_rec("n1", &["n2"], 1, true))),
        ),
        (
            "FIRST 1: the current synchronous standby stays while eligible, even when another is ahead",
            leading()
                .sync_mode(SyncMode::On)
                .member("n2")
                .member("n3")
                .standby("n2", L - 100, "sync")
                .standby("n3", L, "async")
                .sync_record("n1", &["n2"], 1, false)
                .sync_setting("FIRST 1 (\"n2\")"),
            // No synchronous step: only n3's slot is new.
            act(
                Action::Lead {
                    create_slots: vec!["pgha_n3".into()],
                    drop_slots: vec![],
                },
                Reason::Leading,
            ),
        ),
        (
            "a standby appears after a degradation: the record grows, still degraded",
            leading()
                .sync_mode(SyncMode::On)
                .sync_record("n1", &[], 0, true)
                .standby("n2", L, "async"),
            managing(Action::WriteSyncRecord(sync_rec("n1", &["n2"], 1, true))),
        ),
        (
            "mode on, degradation recorded: nothing more to do",
            leading()
                .sync_mode(SyncMode::On)
                .sync_record("n1", &[], 0, true),
            wait(Reason::Leading),
        ),
        (
            "strict, no standby: an empty record first",
            leading().sync_mode(SyncMode::Strict),
            managing(Action::WriteSyncRecord(sync_rec("n1", &[], 0, true))),
        ),
        (
            "strict, no standby: then commits wait on a placeholder",
            leading()
                .sync_mode(SyncMode::Strict)
                .sync_record("n1", &[], 0, false),
            managing(Action::SetSyncSetting(setting(&[NOBODY], 1, false))),
        ),
        (
            "mode off, a setting left over: the record covers it first",
            leading().sync_setting(r#"FIRST 1 ("n2")"#),
            managing(Action::WriteSyncRecord(sync_rec("n1", &["n2"], 1, false))),
        ),
        (
            "mode off, covered: the setting goes",
            leading()
                .sync_record("n1", &["n2"], 1, false)
                .sync_setting(r#"FIRST 1 ("n2")"#),
            managing(Action::SetSyncSetting(SyncSetting::empty())),
        ),
        (
            "mode off, setting gone: the record empties",
            leading().sync_record("n1", &["n2"], 1, false),
            managing(Action::WriteSyncRecord(sync_rec("n1", &[], 0, false))),
        ),
        (
            "sync bookkeeping comes before a scheduled switchover's slots",
            leading()
                .sync_mode(SyncMode::On)
                .standby("n2", L, "async")
                .failover_request(Some("n1"), Some("n2"))
                .not_before(60_000),
            managing(Action::WriteSyncRecord(sync_rec("n1", &["n2"], 1, true))),
        ),
    ]);
}

#[test]
fn sync_promotion_plan() {
    // n1 holds the key and runs as a replica: it promotes, and in
    // synchronous mode names its synchronous standbys before it does.
    let promoting = || F::new("n1").leader("n1").lease_held(VALID).replica();
    let at = |lsn: u64| move |r: &mut MemberRecord| r.received_lsn = Some(Lsn(lsn));
    let promote = |plan: Option<(SyncRecord, SyncSetting)>| {
        act(Action::Promote { sync: plan }, Reason::PromotingWithLease)
    };
    check(vec![
        ("mode off: no plan", promoting().member("n2"), promote(None)),
        (
            "every replica, most advanced first, FIRST k: whichever re-points first acknowledges",
            promoting()
                .sync_mode(SyncMode::On)
                .member_with("n2", at(L - 10))
                .member_with("n3", at(L)),
            promote(Some((
                sync_rec("n1", &["n1", "n3", "n2"], 1, false),
                setting(&["n3", "n2"], 1, false),
            ))),
        ),
        (
            "records expired by an etcd outage: the remembered members are named, not a degraded set",
            promoting()
                .sync_mode(SyncMode::On)
                .remembered_after_outage("n2")
                .remembered_after_outage("n3"),
            promote(Some((
                sync_rec("n1", &["n1", "n2", "n3"], 1, false),
                setting(&["n2", "n3"], 1, false),
            ))),
        ),
        (
            "remembered, but its record expired while etcd was reachable: gone, not named",
            promoting()
                .sync_mode(SyncMode::On)
                .remembered_gone("n2")
                .member_with("n3", at(L)),
            promote(Some((
                sync_rec("n1", &["n1", "n3"], 1, false),
                setting(&["n3"], 1, false),
            ))),
        ),
        (
            "the leader it replaces is not named, record or not",
            promoting()
                .sync_mode(SyncMode::On)
                .remembered_after_outage("n2")
                .last_leader("n2")
                .member_with("n3", at(L)),
            promote(Some((
                sync_rec("n1", &["n1", "n3"], 1, false),
                setting(&["n3"], 1, false),
            ))),
        ),
        (
            "only a vanished old leader is known: degraded",
            promoting()
                .sync_mode(SyncMode::On)
                .remembered_after_outage("n2")
                .last_leader("n2"),
            promote(Some((sync_rec("n1", &[], 0, true), SyncSetting::empty()))),
        ),
        (
            "quorum: every replica, any k",
            promoting()
                .sync_mode(SyncMode::On)
                .sync_quorum()
                .member_with("n2", at(L - 10))
                .member_with("n3", at(L)),
            promote(Some((
                sync_rec("n1", &["n1", "n3", "n2"], 1, false),
                setting(&["n3", "n2"], 1, true),
            ))),
        ),
        (
            "k capped at the replicas there are",
            promoting()
                .sync_mode(SyncMode::On)
                .sync_node_count(3)
                .member_with("n2", at(L - 10))
                .member_with("n3", at(L)),
            promote(Some((
                sync_rec("n1", &["n1", "n3", "n2"], 1, false),
                setting(&["n3", "n2"], 2, false),
            ))),
        ),
        (
            "nosync members and non-replicas (the old leader) are left out",
            promoting()
                .sync_mode(SyncMode::On)
                .sync_node_count(3)
                .member_with("n2", |r| (r.nosync, r.received_lsn) = (true, Some(Lsn(L))))
                .member_with("n3", |r| {
                    (r.role, r.state) = (PgRole::Primary, PgState::Running)
                })
                .member_with("n4", at(L - 10)),
            promote(Some((
                sync_rec("n1", &["n1", "n4"], 1, false),
                setting(&["n4"], 1, false),
            ))),
        ),
        (
            "never its own synchronous standby, whatever its record says",
            promoting()
                .sync_mode(SyncMode::On)
                .member_with("n1", |r| {
                    (r.role, r.received_lsn) = (PgRole::Replica, Some(Lsn(L + 1)))
                })
                .member_with("n2", at(L)),
            promote(Some((
                sync_rec("n1", &["n1", "n2"], 1, false),
                setting(&["n2"], 1, false),
            ))),
        ),
        (
            "mode on, no replica: degraded record, asynchronous",
            promoting().sync_mode(SyncMode::On),
            promote(Some((sync_rec("n1", &[], 0, true), SyncSetting::empty()))),
        ),
        (
            "strict, no replica: commits wait on a placeholder",
            promoting().sync_mode(SyncMode::Strict),
            promote(Some((
                sync_rec("n1", &[], 0, false),
                setting(&[NOBODY], 1, false),
            ))),
        ),
    ]);
}

#[test]
fn sync_crashed_primary() {
    let me = || F::new("n1").leader("n1").lease_held(VALID);
    let release = || act(Action::ReleaseLease, Reason::PrimaryCrashedInSyncMode);
    let restart = |sync| act(Action::StartPrimary { sync }, Reason::RestartingPrimary);
    check(vec![
        (
            "protected by a synchronous standby: hand over, never restart in place",
            me().sync_mode(SyncMode::On)
                .sync_record("n1", &["n2"], 1, false)
                .stopped(OnDisk::FormerPrimary),
            release(),
        ),
        (
            "protected, pg_control unreadable: same",
            me().sync_mode(SyncMode::Strict)
                .sync_record("n1", &["n2"], 1, false)
                .stopped(None),
            release(),
        ),
        (
            "protected, even by a record another leader wrote",
            me().sync_mode(SyncMode::On)
                .sync_record("n2", &["n3"], 1, false)
                .stopped(OnDisk::FormerPrimary),
            release(),
        ),
        (
            "protected, standby data: start read-only and promote as usual",
            me().sync_mode(SyncMode::On)
                .sync_record("n1", &["n2"], 1, false)
                .stopped(OnDisk::Standby),
            act(
                Action::StartReplica { leader: None },
                Reason::StartingBeforePromotion,
            ),
        ),
        (
            "degraded: nobody else has the commits, restart asynchronous",
            me().sync_mode(SyncMode::On)
                .sync_record("n1", &[], 0, true)
                .stopped(OnDisk::FormerPrimary),
            restart(SyncSetting::empty()),
        ),
        (
            "strict, nobody recorded: restart with commits waiting",
            me().sync_mode(SyncMode::Strict)
                .sync_record("n1", &[], 0, false)
                .stopped(OnDisk::FormerPrimary),
            restart(setting(&[NOBODY], 1, false)),
        ),
    ]);
}

#[test]
fn sync_race() {
    let race = || act(Action::AcquireLease, Reason::RacingAsHealthiest);
    let on = |members: &[&str], k: u32| {
        F::new("n1")
            .sync_mode(SyncMode::On)
            .sync_record("n2", members, k, false)
            .replica()
    };
    check(vec![
        ("the only member of the set", on(&["n1"], 1), race()),
        (
            "strict mode, same rule",
            on(&["n1"], 1).sync_mode(SyncMode::Strict),
            race(),
        ),
        (
            "not in the set",
            on(&["n3"], 1),
            not_healthiest(Disqualified::NotSynchronous),
        ),
        (
            "no record at all",
            F::new("n1").sync_mode(SyncMode::On).replica(),
            not_healthiest(Disqualified::NotSynchronous),
        ),
        (
            "degraded record",
            F::new("n1")
                .sync_mode(SyncMode::On)
                .sync_record("n2", &["n1"], 1, true)
                .replica(),
            not_healthiest(Disqualified::NoSynchronousStandby),
        ),
        (
            "empty record",
            on(&[], 0),
            not_healthiest(Disqualified::NoSynchronousStandby),
        ),
        (
            "degraded record of this member: it acknowledged every commit alone, it takes the key back",
            F::new("n1")
                .sync_mode(SyncMode::On)
                .sync_record("n1", &[], 0, true)
                .replica(),
            race(),
        ),
        (
            "empty record of this member, peers behind it",
            F::new("n1")
                .sync_mode(SyncMode::On)
                .sync_record("n1", &[], 0, false)
                .replica()
                .peer("n2", report(1, L - 1)),
            race(),
        ),
        (
            "degraded record of this member, a peer ahead: an anomaly, defer",
            F::new("n1")
                .sync_mode(SyncMode::On)
                .sync_record("n1", &[], 0, true)
                .replica()
                .peer("n2", report(2, L)),
            not_healthiest(Disqualified::PeerAhead { peer: m("n2") }),
        ),
        (
            "degraded record of another member: nobody else has its commits",
            F::new("n1")
                .sync_mode(SyncMode::On)
                .sync_record("n2", &[], 0, true)
                .replica()
                .peer("n2", report(1, L - 1)),
            not_healthiest(Disqualified::NoSynchronousStandby),
        ),
        (
            "one of two, the other unheard: cannot prove who has the commits",
            on(&["n1", "n3"], 1).unreachable_peer("n3"),
            not_healthiest(Disqualified::CannotProveCommits { seen: 1, needed: 2 }),
        ),
        (
            "one of two, the other answers but is not running",
            on(&["n1", "n3"], 1).peer(
                "n3",
                PeerReport {
                    running: false,
                    ..report(1, L)
                },
            ),
            not_healthiest(Disqualified::CannotProveCommits { seen: 1, needed: 2 }),
        ),
        (
            "one of two, the other behind",
            on(&["n1", "n3"], 1).peer("n3", report(1, L - 1)),
            race(),
        ),
        (
            "one of two, the other ahead",
            on(&["n1", "n3"], 1).peer("n3", report(1, L + 1)),
            not_healthiest(Disqualified::PeerAhead { peer: m("n3") }),
        ),
        (
            "one of two, equal: the lower name wins",
            F::new("n3")
                .sync_mode(SyncMode::On)
                .sync_record("n2", &["n1", "n3"], 1, false)
                .replica()
                .peer("n1", report(1, L)),
            not_healthiest(Disqualified::PeerAhead { peer: m("n1") }),
        ),
        (
            "both of two confirm every commit: one suffices",
            on(&["n1", "n3"], 2).unreachable_peer("n3"),
            race(),
        ),
        (
            "peers outside the set do not count, however far ahead",
            on(&["n1"], 1).peer("n4", report(2, L + 100)),
            race(),
        ),
        (
            "maximum_lag_on_failover does not apply: the set proves the commits",
            on(&["n1"], 1).last_leader_lsn(L + MAX_LAG * 10),
            race(),
        ),
        (
            "nofailover",
            on(&["n1"], 1).ha(|h| h.nofailover = true),
            not_healthiest(Disqualified::NoFailover),
        ),
        (
            "priority 0",
            on(&["n1"], 1).ha(|h| h.priority = 0),
            not_healthiest(Disqualified::NoFailover),
        ),
        (
            "own position unknown",
            on(&["n1"], 1).wal_unknown(),
            not_healthiest(Disqualified::UnknownPosition),
        ),
        ("paused", on(&["n1"], 1).paused(), wait(Reason::Paused)),
    ]);
}

#[test]
fn sync_failover_target() {
    let target = || act(Action::AcquireLease, Reason::ManualFailoverTarget);
    let to_me = |members: &[&str]| {
        F::new("n1")
            .sync_mode(SyncMode::On)
            .sync_record("n2", members, 1, false)
            .replica()
            .failover_request(Some("n2"), Some("n1"))
    };
    // What publish_final_position writes after a clean stop as leader.
    let stopped_cleanly_at = |lsn: u64| {
        move |r: &mut MemberRecord| {
            (r.role, r.state, r.flushed_lsn) = (PgRole::Unknown, PgState::Stopped, Some(Lsn(lsn)))
        }
    };
    check(vec![
        ("target in the set", to_me(&["n1"]), target()),
        (
            "target in the set, paused",
            to_me(&["n1"]).paused(),
            target(),
        ),
        (
            "target outside the set, no final position: refused",
            to_me(&["n3"]),
            not_healthiest(Disqualified::NotSynchronous),
        ),
        (
            "target outside the set, operator accepted data loss",
            to_me(&["n3"]).accept_data_loss(),
            target(),
        ),
        (
            "target outside the set, reached the old leader's final position",
            to_me(&["n3"]).member_with("n2", stopped_cleanly_at(L)),
            target(),
        ),
        (
            "target short of the old leader's final position",
            to_me(&["n1"]).member_with("n2", stopped_cleanly_at(L + 1)),
            wait(Reason::CatchingUpBeforePromotion),
        ),
        (
            "another target",
            to_me(&["n1"]).failover_request(Some("n2"), Some("n3")),
            wait(Reason::WaitingForSwitchoverTarget { target: m("n3") }),
        ),
    ]);
}

/// The key holder whose promotion keeps failing (its server starts
/// read-only but dies at every promotion) gives the key up, then stays out
/// of the race while the others elect one of them (`ha::promotion`).
#[test]
fn promotion_keeps_failing() {
    let holder = || {
        F::new("n1")
            .member("n2")
            .member("n3")
            .leader("n1")
            .lease_held(VALID)
            .replica()
    };
    let resign = |n: u32| {
        act(
            Action::Resign {
                failed_promotions: n,
            },
            Reason::PromotionKeepsFailing { failures: n },
        )
    };
    let promote = || act(Action::Promote { sync: None }, Reason::PromotingWithLease);
    check(vec![
        (
            "two failures: try again",
            holder().failed_promotions(2, 2_000),
            promote(),
        ),
        (
            "three failures: resign",
            holder().failed_promotions(3, 2_000),
            resign(3),
        ),
        (
            "one failure, trying for primary_start_timeout: resign",
            holder().failed_promotions(1, PRIMARY_START_TIMEOUT_MS),
            resign(1),
        ),
        (
            "one failure, trying for less: try again",
            holder().failed_promotions(1, PRIMARY_START_TIMEOUT_MS - 1),
            promote(),
        ),
        (
            // Its position must be known to say who else holds the commits.
            "server down after the third failure: start it read-only first",
            holder()
                .stopped(OnDisk::Standby)
                .failed_promotions(3, 2_000),
            act(
                Action::StartReplica { leader: None },
                Reason::StartingBeforePromotion,
            ),
        ),
        (
            "server does not come back: resign anyway",
            holder()
                .stopped(OnDisk::Standby)
                .down_for(PRIMARY_START_TIMEOUT_MS)
                .failed_promotions(3, 2_000),
            resign(3),
        ),
        (
            "still coming up, not for long: wait",
            holder().starting(1_000).failed_promotions(3, 2_000),
            wait(Reason::PostgresStarting),
        ),
        (
            "writable after all: keep leading",
            holder()
                .primary()
                .slots(&["n2", "n3"])
                .failed_promotions(3, 2_000),
            wait(Reason::Leading),
        ),
        (
            "paused: the operator is in charge",
            holder().paused().failed_promotions(3, 2_000),
            promote(),
        ),
        (
            "lease running out: release as before",
            F::new("n1")
                .leader("n1")
                .lease_held(EXPIRING)
                .replica()
                .failed_promotions(3, 2_000),
            act(Action::ReleaseLease, Reason::LeaseRunningOut),
        ),
        // The member that resigned, once the key is gone.
        (
            "resigned a moment ago: not racing",
            F::new("n1").replica().resigned(1_000),
            not_healthiest(Disqualified::PromotionKeptFailing),
        ),
        (
            "resigned just under the cooldown ago: not racing",
            F::new("n1")
                .replica()
                .resigned(PRIMARY_START_TIMEOUT_MS - 1),
            not_healthiest(Disqualified::PromotionKeptFailing),
        ),
        (
            "cooldown over: races again",
            F::new("n1").replica().resigned(PRIMARY_START_TIMEOUT_MS),
            act(Action::AcquireLease, Reason::RacingAsHealthiest),
        ),
        (
            "resigned, but the operator names it: the operator decides",
            F::new("n1")
                .replica()
                .resigned(1_000)
                .failover_request(None, Some("n1")),
            act(Action::AcquireLease, Reason::ManualFailoverTarget),
        ),
        (
            "resigned, then another member leads: follow it",
            F::new("n1").leader("n2").replica().resigned(1_000),
            act(
                Action::Follow { leader: m("n2") },
                Reason::RepointingToLeader { leader: m("n2") },
            ),
        ),
        // The others: a member out of the race publishes `nofailover`.
        (
            "a peer that resigned is skipped, even ahead",
            F::new("n2")
                .member("n1")
                .member("n3")
                .replica()
                .last_leader("n1")
                .last_leader_lsn(L)
                .peer(
                    "n1",
                    PeerReport {
                        nofailover: true,
                        ..report(1, L + 10)
                    },
                )
                .peer("n3", report(1, L)),
            act(Action::AcquireLease, Reason::RacingAsHealthiest),
        ),
    ]);
}

/// Synchronous mode: the resigning holder first records who holds every
/// acknowledged commit — itself and the members with at least its WAL — so
/// that a member lacking commits never takes over; if nobody else has
/// them, nobody promotes until the holder tries again.
#[test]
fn sync_promotion_keeps_failing() {
    let holder = || {
        F::new("n1")
            .sync_mode(SyncMode::On)
            .member_with("n2", |r| {
                r.role = PgRole::Replica;
                r.state = PgState::InRecovery;
                r.received_lsn = Some(Lsn(L));
            })
            .member_with("n3", |r| {
                r.role = PgRole::Replica;
                r.state = PgState::InRecovery;
                r.received_lsn = Some(Lsn(L - 4096));
            })
            .leader("n1")
            .lease_held(VALID)
            .replica()
            .failed_promotions(3, 2_000)
    };
    let reason = Reason::PromotionKeepsFailing { failures: 3 };
    let resign = act(
        Action::Resign {
            failed_promotions: 3,
        },
        reason.clone(),
    );
    // A peer's view once the key is gone: the resigned n1 answers at L.
    let resigned_n1 = PeerReport {
        nofailover: true,
        ..report(1, L)
    };
    let seeing_n1 = |me: &str, n1: PeerReport| {
        F::new(me)
            .sync_mode(SyncMode::On)
            .member("n1")
            .replica()
            .last_leader("n1")
            .peer("n1", n1)
    };
    let peer = |me: &str| seeing_n1(me, resigned_n1.clone());
    check(vec![
        (
            // Written before the failed promotion: it names n3, which
            // lacks commits only n1 has.
            "record first, naming those with all of n1's WAL",
            holder().sync_record("n1", &["n3"], 1, false),
            act(
                Action::WriteSyncRecord(sync_rec("n1", &["n1", "n2"], 2, false)),
                reason.clone(),
            ),
        ),
        (
            "then resign",
            holder().sync_record("n1", &["n1", "n2"], 2, false),
            resign.clone(),
        ),
        (
            "server down for good: only itself is proven",
            holder()
                .stopped(OnDisk::Standby)
                .down_for(PRIMARY_START_TIMEOUT_MS)
                .sync_record("n1", &["n3"], 1, false),
            act(
                Action::WriteSyncRecord(sync_rec("n1", &["n1"], 1, false)),
                reason.clone(),
            ),
        ),
        (
            "a caught-up member of that record races, tied with n1",
            peer("n2").sync_record("n1", &["n1", "n2"], 2, false),
            act(Action::AcquireLease, Reason::RacingAsHealthiest),
        ),
        (
            "a member left out of it does not",
            peer("n3")
                .wal(L - 4096)
                .sync_record("n1", &["n1", "n2"], 2, false),
            not_healthiest(Disqualified::NotSynchronous),
        ),
        (
            "nobody else holds every commit: nobody promotes",
            peer("n2").wal(L - 1).sync_record("n1", &["n1"], 1, false),
            not_healthiest(Disqualified::NotSynchronous),
        ),
        (
            "n1 ahead, even out of the race, still blocks",
            peer("n2")
                .wal(L - 1)
                .sync_record("n1", &["n1", "n2"], 1, false),
            not_healthiest(Disqualified::PeerAhead { peer: m("n1") }),
        ),
        (
            "a tie with a candidate still goes to the lower name",
            seeing_n1("n2", report(1, L)).sync_record("n1", &["n1", "n2"], 2, false),
            not_healthiest(Disqualified::PeerAhead { peer: m("n1") }),
        ),
    ]);
}

// ---------------------------------------------------------------------------
// Known bugs: each test states the behaviour decide should have. They are
// ignored until decide.rs is fixed; run them with `--ignored`.

/// A running primary must be told to stop whenever it is not entitled to
/// write, whatever the `initialize` key says. Today the `initialize` checks
/// return `Wait` before the leader key is even looked at.
#[test]
fn running_primary_is_stopped_whatever_the_initialize_key_says() {
    let cases = [
        (
            // DCS wiped, or this node pointed at the wrong prefix: nobody
            // holds a key, yet the primary keeps accepting writes.
            "initialize missing, no leader key, no lease",
            F::new("n1").initialize(None).primary(),
        ),
        (
            "initialize missing, n2 holds the leader key",
            F::new("n1").initialize(None).leader("n2").primary(),
        ),
        (
            // Another member's key: the sweep's "other leader ⇒ Demote"
            // invariant, broken only because initialize is not Done.
            "initialize pending by n2, n2 holds the leader key",
            F::new("n1")
                .initialize(Some(Initialize::Pending { by: m("n2") }))
                .leader("n2")
                .primary(),
        ),
    ];
    let failures: Vec<String> = cases
        .into_iter()
        .map(|(name, f)| (name, decide(&f.snapshot())))
        .filter(|(_, d)| !matches!(d.action, Action::Demote { .. }))
        .map(|(name, d)| format!("{name}: got {d:?}"))
        .collect();
    assert!(
        failures.is_empty(),
        "a primary without a lease must be demoted:\n{}",
        failures.join("\n")
    );
}

/// Recloning wipes the data directory before pg_basebackup runs. Every
/// other path that needs the leader as a source (clone, rewind, the
/// stalled-stream rewind) first checks that its PostgreSQL is running;
/// this one does not, so a member whose rewind failed destroys its copy of
/// the data while the leader cannot serve a new one.
#[test]
fn no_reclone_while_the_leader_is_down() {
    let f = F::new("n1")
        .leader("n2")
        .leader_not_running()
        .rewind_failed()
        .stopped(OnDisk::FormerPrimary);
    let d = decide(&f.snapshot());
    assert_eq!(d.action, Action::Wait, "got {d:?}");
}

/// In synchronous mode a failover target outside the synchronous set may
/// still take over once it reaches the old leader's "final position" — the
/// `flushed_lsn` in the old leader's member record. That value is final
/// only when publish_final_position wrote it after a clean stop (the
/// record then says stopped). A leader that crashed after the switchover
/// was requested leaves a record with its *live* flush position of the
/// last loop, which its member lease keeps visible for a moment after the
/// leader key expired; commits acknowledged by the synchronous standby
/// after that loop are not on the target, and promoting it loses them.
#[test]
fn sync_target_not_promoted_on_a_live_leader_position() {
    let f = F::new("n1")
        .sync_mode(SyncMode::On)
        .sync_record("n2", &["n3"], 1, false)
        // n2 crashed while leading: its record still says primary, running.
        .member_with("n2", |r| {
            (r.role, r.state, r.flushed_lsn) = (PgRole::Primary, PgState::Running, Some(Lsn(L)))
        })
        .member("n3")
        .replica()
        .failover_request(Some("n2"), Some("n1"));
    let d = decide(&f.snapshot());
    assert_eq!(
        d,
        not_healthiest(Disqualified::NotSynchronous),
        "only the synchronous standby n3 is known to hold every acknowledged commit"
    );
}

// ---------------------------------------------------------------------------
// The exhaustive sweep: every combination of small domains, checked against
// the safety invariants rather than exact results.

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum LeaseCase {
    #[default]
    NotHeld,
    /// Held, renewal found it gone.
    Lost,
    Valid,
    /// Held and not expired, but inside the fence margin.
    Expiring,
    /// Valid on the members' failsafe confirmation, not on etcd's.
    ConfirmedByMembers,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum FailsafeCase {
    #[default]
    Off,
    /// Failsafe mode on, listed, and promised n2 not to race.
    Promised,
    /// Failsafe mode on and not listed in the record.
    Barred,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum PgCase {
    #[default]
    Primary,
    Replica,
    Stopped,
    Starting,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum KeyCase {
    #[default]
    None,
    Me,
    Other,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum DataCase {
    #[default]
    Empty,
    Initialized,
    Unusable,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum FailoverCase {
    #[default]
    None,
    /// n2 hands over to me.
    ToMe,
    /// I hand over to n2 (a switchover away from me).
    ToOther,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum SyncCase {
    #[default]
    Off,
    /// Mode on; n2's record names me and n3, one of which has every commit.
    OnWithMe,
    /// Mode on; n2's record names only n3.
    OnWithoutMe,
    /// Mode on; n2 recorded that nobody is synchronous.
    OnDegraded,
    /// Mode on; my own record (from when I led) names n2.
    OnOwned,
}

#[derive(Clone, Copy, Debug, Default)]
struct Case {
    lease: LeaseCase,
    pg: PgCase,
    key: KeyCase,
    paused: bool,
    reachable: bool,
    data: DataCase,
    /// pg_control of a stopped server. pg_control is only read for a
    /// stopped server, so for a running replica the same axis picks where
    /// it streams from instead: None → nobody, Standby → n2 (the leader
    /// when one is), FormerPrimary → n3.
    on_disk: Option<OnDisk>,
    failover: FailoverCase,
    sync: SyncCase,
    /// Fresh: just went down, streaming, caught up. Troubled: down longer
    /// than every timeout, not streaming, last rewind failed, behind a peer.
    troubled: bool,
    /// No fence keeper acknowledges (dead, stopped or hung).
    no_fence: bool,
    failsafe: FailsafeCase,
    /// Promotions failed here: three in a row under the current lease, and
    /// the key was resigned a moment ago (with the key held again, an
    /// operator named this member).
    promotions_fail: bool,
}

/// Every combination of the domains; the cartesian product is built axis by
/// axis so that adding a value to a domain grows the sweep automatically.
fn all_cases() -> Vec<Case> {
    fn expand<T: Copy>(cases: Vec<Case>, values: &[T], set: impl Fn(&mut Case, T)) -> Vec<Case> {
        let set = &set;
        cases
            .into_iter()
            .flat_map(|c| {
                values.iter().map(move |&v| {
                    let mut c = c;
                    set(&mut c, v);
                    c
                })
            })
            .collect()
    }
    use LeaseCase as Le;
    let mut cases = vec![Case::default()];
    cases = expand(
        cases,
        &[
            Le::NotHeld,
            Le::Lost,
            Le::Valid,
            Le::Expiring,
            Le::ConfirmedByMembers,
        ],
        |c, v| c.lease = v,
    );
    cases = expand(
        cases,
        &[
            PgCase::Primary,
            PgCase::Replica,
            PgCase::Stopped,
            PgCase::Starting,
        ],
        |c, v| c.pg = v,
    );
    cases = expand(
        cases,
        &[KeyCase::None, KeyCase::Me, KeyCase::Other],
        |c, v| c.key = v,
    );
    cases = expand(cases, &[false, true], |c, v| c.paused = v);
    cases = expand(cases, &[true, false], |c, v| c.reachable = v);
    cases = expand(
        cases,
        &[DataCase::Empty, DataCase::Initialized, DataCase::Unusable],
        |c, v| c.data = v,
    );
    cases = expand(
        cases,
        &[None, Some(OnDisk::FormerPrimary), Some(OnDisk::Standby)],
        |c, v| c.on_disk = v,
    );
    cases = expand(
        cases,
        &[
            FailoverCase::None,
            FailoverCase::ToMe,
            FailoverCase::ToOther,
        ],
        |c, v| c.failover = v,
    );
    cases = expand(
        cases,
        &[
            SyncCase::Off,
            SyncCase::OnWithMe,
            SyncCase::OnWithoutMe,
            SyncCase::OnDegraded,
            SyncCase::OnOwned,
        ],
        |c, v| c.sync = v,
    );
    cases = expand(cases, &[false, true], |c, v| c.troubled = v);
    cases = expand(cases, &[false, true], |c, v| c.no_fence = v);
    cases = expand(
        cases,
        &[
            FailsafeCase::Off,
            FailsafeCase::Promised,
            FailsafeCase::Barred,
        ],
        |c, v| c.failsafe = v,
    );
    cases = expand(cases, &[false, true], |c, v| c.promotions_fail = v);
    cases
}

fn sweep_fixture(c: Case) -> Fixture {
    // Three members; n2 leads when "another member" does. n3 answers the
    // race at the leader position, so a caught-up n1 wins ties by name and
    // a troubled (lagging) n1 loses.
    let mut f = F::new("n1")
        .member("n2")
        .member("n3")
        .peer("n3", report(1, L))
        .unreachable_peer("n2")
        .last_leader_lsn(L);
    f = match c.key {
        KeyCase::None => f,
        KeyCase::Me => f.leader("n1"),
        KeyCase::Other => f.leader("n2"),
    };
    f = match c.lease {
        LeaseCase::NotHeld => f,
        LeaseCase::Lost => f.lease_lost(),
        LeaseCase::Valid => f.lease_held(VALID),
        LeaseCase::Expiring => f.lease_held(EXPIRING),
        LeaseCase::ConfirmedByMembers => f.lease_confirmed_by_members(VALID),
    };
    f = match c.failsafe {
        FailsafeCase::Off => f,
        FailsafeCase::Promised => f.failsafe("n2", &["n1", "n2", "n3"]).promised("n2", 2_000),
        FailsafeCase::Barred => f.failsafe("n2", &["n2", "n3"]),
    };
    f = match c.data {
        DataCase::Empty => f.empty_data(),
        DataCase::Initialized => f,
        DataCase::Unusable => f.unusable_data(),
    };
    let long = PRIMARY_START_TIMEOUT_MS.max(STREAM_STALL_MS) * 2;
    let down_for = if c.troubled { long } else { 0 };
    let upstream = match c.on_disk {
        None => None,
        Some(OnDisk::Standby) => Some("n2"),
        Some(OnDisk::FormerPrimary) => Some("n3"),
    };
    f = match c.pg {
        // n2 and n3 stream from it, so a synchronous set can be formed.
        PgCase::Primary => {
            let f = f
                .primary()
                .standby("n2", L, "async")
                .standby("n3", L, "async");
            // With the slots in place a leader gets as far as publishing
            // the failsafe record (slots come first).
            if c.failsafe == FailsafeCase::Promised {
                f.slots(&["n2", "n3"])
            } else {
                f
            }
        }
        PgCase::Replica => {
            let r = match (upstream, c.troubled) {
                (None, _) => f.replica(),
                (Some(up), false) => f.replica_streaming_from(up),
                (Some(up), true) => f.replica_stalled(up, long),
            };
            // As a demoted leader leaves it: n2's slot reserved, with
            // an xmin (n2 streamed from it).
            r.wal(if c.troubled { L - 4096 } else { L })
                .held_slot("n2", Some(L - 0x100_0000), true)
        }
        PgCase::Stopped => f.stopped(c.on_disk).down_for(down_for),
        PgCase::Starting => f.starting(down_for),
    };
    if c.troubled {
        f = f.rewind_failed();
    }
    if c.paused {
        f = f.paused();
    }
    f = match c.sync {
        SyncCase::Off => f,
        SyncCase::OnWithMe => f.sync_record("n2", &["n1", "n3"], 1, false),
        SyncCase::OnWithoutMe => f.sync_record("n2", &["n3"], 1, false),
        SyncCase::OnDegraded => f.sync_record("n2", &[], 0, true),
        SyncCase::OnOwned => f.sync_record("n1", &["n2"], 1, false),
    };
    if c.sync != SyncCase::Off {
        f = f.sync_mode(SyncMode::On);
    }
    f = match c.failover {
        FailoverCase::None => f,
        FailoverCase::ToMe => f.failover_request(Some("n2"), Some("n1")),
        FailoverCase::ToOther => f.failover_request(Some("n1"), Some("n2")),
    };
    if !c.reachable {
        f = f.dcs_down();
    }
    if c.no_fence {
        f = f.fence_not_ready();
    }
    if c.promotions_fail {
        f = f.failed_promotions(3, 2_000).resigned(1_000);
    }
    f
}

/// The lease counts for writes: held, and not within fence_margin of its
/// end. Restated here rather than borrowed from decide.rs, so that a bug in
/// decide's own check cannot hide from the sweep.
fn lease_valid(s: &Snapshot) -> bool {
    let margin = s.ha.fence_margin.as_millis() as u64;
    s.lease.held
        && s.lease
            .valid_until_ms
            .is_some_and(|u| s.now_ms + margin <= u)
}

/// The safety invariants every decision must satisfy, whatever the input.
fn invariants(s: &Snapshot, d: &Decision) -> Result<(), String> {
    let key = s.dcs.as_ref().and_then(|v| v.leader.as_ref());
    let key_is_mine = key.is_some_and(|k| k.name == s.me);
    let key_is_other = key.is_some_and(|k| k.name != s.me);
    let primary = s.local.role() == Some(PgRole::Primary);
    let stopped = s.local.pg == PgStatus::Stopped;
    let a = &d.action;

    // 1. Becoming writable needs the key and a lease valid past the margin.
    if matches!(a, Action::Promote { .. } | Action::StartPrimary { .. })
        && !(key_is_mine && lease_valid(s))
    {
        return Err("becomes writable without own key and valid lease".into());
    }
    // 2. Staying writable needs the same, except that while the DCS cannot
    // be read the key cannot be checked and the lease alone is the proof
    // (a short etcd hiccup must not stop a healthy primary). Without that
    // entitlement the only acceptable answers stop writes; adopting the
    // own key is allowed because a key naming us proves nobody else leads.
    // Failsafe: with the key gone from etcd while every member confirmed
    // this leader, it may take the key back (and nothing else).
    let retakes = key.is_none()
        && s.lease.confirmed_by_members
        && lease_valid(s)
        && matches!(a, Action::AcquireLease);
    let entitled = lease_valid(s) && (s.dcs.is_none() || key_is_mine) || retakes;
    let hands_off = s.dcs.as_ref().is_some_and(|v| v.config.paused)
        && key_is_other
        && d.reason.is_alarm()
        && matches!(a, Action::Wait);
    if primary && !entitled && !hands_off {
        let stops = matches!(a, Action::Demote { .. } | Action::StopAndRelease);
        let adopts = matches!(a, Action::AdoptLease { .. }) && key_is_mine;
        if !stops && !adopts {
            return Err("running primary not entitled to write is not stopped".into());
        }
    }
    // 3. Giving the key away while still writable lets another member
    // promote next to us.
    if primary && matches!(a, Action::ReleaseLease | Action::Resign { .. }) {
        return Err("releases the lease while writable".into());
    }
    // 18. Only the key holder resigns, and a member that resigned does not
    // race again before its cooldown ends (an operator may still name it).
    if matches!(a, Action::Resign { .. }) && !key_is_mine {
        return Err("resigns a key that is not its own".into());
    }
    if crate::ha::promotion::barred(s.local.resigned_at_ms, s.now_ms, &s.ha)
        && matches!(a, Action::AcquireLease)
        && !matches!(
            d.reason,
            Reason::ManualFailoverTarget | Reason::RetakingLeaderKeyAfterFailsafe
        )
    {
        return Err("races again right after resigning".into());
    }
    // 4. The race is only for a key nobody holds.
    if matches!(a, Action::AcquireLease) && (s.dcs.is_none() || key.is_some()) {
        return Err("acquires the lease while a key exists or the DCS is unknown".into());
    }
    // 5. Two primaries must never coexist — unless the operator paused
    // the cluster: maintenance mode is hands-off, and a second primary
    // then was made by hand (the decision raises an alarm instead).
    let paused = s.dcs.as_ref().is_some_and(|v| v.config.paused);
    let alarmed = paused && d.reason.is_alarm();
    if primary && key_is_other && !matches!(a, Action::Demote { .. }) && !alarmed {
        return Err("running primary under another member's key not demoted".into());
    }
    // 6. Without the DCS nothing may move leadership or writability.
    if s.dcs.is_none()
        && matches!(
            a,
            Action::Promote { .. }
                | Action::StartPrimary { .. }
                | Action::AcquireLease
                | Action::AdoptLease { .. }
                | Action::Bootstrap
        )
    {
        return Err("moves leadership with the DCS unreachable".into());
    }
    // 7. Demote is for primaries only: stopping a replica loses nothing but
    // availability, yet it means decide misread the state.
    if matches!(a, Action::Demote { .. }) && !primary {
        return Err("demotes a server that is not primary".into());
    }
    // 8. Starting or cloning needs a stopped server.
    if matches!(
        a,
        Action::StartPrimary { .. } | Action::StartReplica { .. } | Action::Clone { .. }
    ) && !stopped
    {
        return Err("starts or clones while PostgreSQL runs".into());
    }
    // 9. Data only ever comes from the member holding the key, never us.
    let source = match a {
        Action::Clone { leader }
        | Action::Reclone { leader }
        | Action::Rewind { leader }
        | Action::Follow { leader }
        | Action::StartReplica {
            leader: Some(leader),
        } => Some(leader),
        _ => None,
    };
    if let Some(src) = source
        && (src == &s.me || key.is_none_or(|k| &k.name != src))
    {
        return Err(format!("takes data from {src}, not from the key holder"));
    }
    // 15. Nobody takes the lease without a fence keeper standing guard.
    if !s.local.fence_ready
        && matches!(
            a,
            Action::AcquireLease | Action::AdoptLease { .. } | Action::Bootstrap
        )
    {
        return Err("takes the lease with no fence keeper".into());
    }
    // 16. A member that promised a failsafe leader never takes the key,
    // and with failsafe mode on an unlisted member never races.
    let promised = s
        .failsafe_promise
        .as_ref()
        .is_some_and(|p| p.active(s.now_ms));
    let barred = s.dcs.as_ref().is_some_and(|v| {
        crate::ha::failsafe::barred_from_race(v.config.failsafe_mode, v.failsafe.as_ref(), &s.me)
    });
    if (promised || barred) && matches!(a, Action::AcquireLease) {
        return Err("takes the key despite a failsafe promise or unlisted".into());
    }
    // 17. Only the key holder publishes the failsafe membership, in its
    // own name.
    if let Action::WriteFailsafeRecord(rec) = a
        && (!key_is_mine || rec.leader != s.me)
    {
        return Err("writes a failsafe record without holding the key".into());
    }
    // 10. The leader never keeps a slot for itself.
    if let Action::Lead { create_slots, .. } = a
        && create_slots.contains(&s.me.slot_name())
    {
        return Err("creates a slot for itself".into());
    }
    // 18. Slots are reset only on a replica, and only pgha's idle ones: a
    // slot a member streams from keeps what it holds.
    if let Action::PrepareSlots { reset_slots, .. } = a {
        let PgStatus::Running(r) = &s.local.pg else {
            return Err("resets slots without a running server".into());
        };
        let idle_and_ours = |name: &String| {
            r.slots.iter().any(|have| {
                &have.name == name && !have.active && name.starts_with(crate::model::SLOT_PREFIX)
            })
        };
        if primary || !reset_slots.iter().all(idle_and_ours) {
            return Err("resets a slot it must keep".into());
        }
    }
    sync_invariants(s, d)
}

/// Synchronous replication's promise: every acknowledged commit is on at
/// least `quorum` members of the recorded set (see `ha::sync`).
fn sync_invariants(s: &Snapshot, d: &Decision) -> Result<(), String> {
    let Some(view) = &s.dcs else { return Ok(()) };
    let mode_on = view.config.synchronous_mode != SyncMode::Off;
    let record = view.sync.as_ref();
    let a = &d.action;
    // 11. Racing in synchronous mode: only a member of a live set. The
    // operator's target may skip this with accept_data_loss, or once it
    // reached a final position the old leader published.
    // A failsafe leader taking its own key back is not a race: it never
    // stopped being the primary, so it has every acknowledged commit.
    let retakes = s.local.role() == Some(PgRole::Primary)
        && s.lease.confirmed_by_members
        && d.reason == Reason::RetakingLeaderKeyAfterFailsafe;
    if mode_on && matches!(a, Action::AcquireLease) && !retakes {
        let operator_vouches = d.reason == Reason::ManualFailoverTarget
            && view.failover.as_ref().is_some_and(|f| {
                f.accept_data_loss
                    || f.from
                        .as_ref()
                        .and_then(|o| view.members.get(o))
                        .is_some_and(|r| r.flushed_lsn.is_some())
            });
        let in_live_set = record.is_some_and(|r| !r.degraded && r.members.contains(&s.me));
        if !operator_vouches && !in_live_set {
            return Err("races in synchronous mode outside the recorded set".into());
        }
    }
    // 12. A crashed primary whose commits a synchronous standby holds must
    // not come back writable: it may serve commits never acknowledged.
    let protected = mode_on && record.is_some_and(|r| !r.degraded && !r.members.is_empty());
    if protected && matches!(a, Action::StartPrimary { .. }) {
        return Err("restarts in place although a synchronous standby took the commits".into());
    }
    // 13. A promotion's plan must keep the promise from the first commit:
    // the setting within the record, confirming at least `quorum` of it.
    if let Action::Promote { sync } = a {
        match (mode_on, sync) {
            (false, None) => {}
            (true, Some((rec, set))) => {
                let covered = set.real_names().iter().all(|n| rec.members.contains(n));
                let strong = set.real_names().is_empty() || set.k >= rec.quorum.max(1);
                // Only the new leader surely holds what the previous one
                // acknowledged: the record must name it, with k = 1, until
                // its standbys catch up.
                let holds_past = if set.real_names().is_empty() {
                    !rec.members.contains(&s.me)
                } else {
                    rec.members.contains(&s.me) && rec.quorum == 1
                };
                if rec.leader != s.me || !holds_past || !covered || !strong {
                    return Err(format!(
                        "promotion plan breaks the promise: {rec:?} {set:?}"
                    ));
                }
                if set.names.is_empty() && !rec.degraded {
                    return Err("asynchronous promotion without a degraded record".into());
                }
            }
            _ => return Err("promotion plan does not match the synchronous mode".into()),
        }
    }
    // 14. The server setting only ever changes within what the leader's own
    // record already covers; going asynchronous in synchronous mode
    // requires the record to say so first.
    if let Action::SetSyncSetting(set) = a {
        let Some(rec) = record.filter(|r| r.leader == s.me) else {
            return Err("changes the setting without an own record".into());
        };
        let covered = set.real_names().iter().all(|n| rec.members.contains(n));
        let strong = set.real_names().is_empty() || set.k >= rec.quorum.max(1);
        if !covered || !strong {
            return Err(format!("setting {set:?} outside record {rec:?}"));
        }
        if mode_on && set.names.is_empty() && !rec.degraded {
            return Err("goes asynchronous before recording the degradation".into());
        }
    }
    if let Action::WriteSyncRecord(rec) = a
        && rec.leader != s.me
    {
        return Err("writes a sync record in another member's name".into());
    }
    // 19. A key holder that never became writable records a set that
    // includes itself: it is the one member known to hold every
    // acknowledged commit.
    if let Action::WriteSyncRecord(rec) = a
        && s.local.role() != Some(PgRole::Primary)
        && (!rec.members.contains(&s.me) || rec.degraded)
    {
        return Err(format!(
            "non-writable holder records a set without itself: {rec:?}"
        ));
    }
    Ok(())
}

fn action_kind(a: &Action) -> &'static str {
    match a {
        Action::Wait => "Wait",
        Action::Bootstrap => "Bootstrap",
        Action::Adopt => "Adopt",
        Action::Clone { .. } => "Clone",
        Action::Reclone { .. } => "Reclone",
        Action::Rewind { .. } => "Rewind",
        Action::StartReplica { .. } => "StartReplica",
        Action::StartPrimary { .. } => "StartPrimary",
        Action::Follow { .. } => "Follow",
        Action::AcquireLease => "AcquireLease",
        Action::AdoptLease { .. } => "AdoptLease",
        Action::Promote { .. } => "Promote",
        Action::WriteSyncRecord(_) => "WriteSyncRecord",
        Action::WriteFailsafeRecord(_) => "WriteFailsafeRecord",
        Action::SetSyncSetting(_) => "SetSyncSetting",
        Action::PrepareSlots { .. } => "PrepareSlots",
        Action::Lead { .. } => "Lead",
        Action::Demote { .. } => "Demote",
        Action::ReleaseLease => "ReleaseLease",
        Action::Resign { .. } => "Resign",
        Action::StopAndRelease => "StopAndRelease",
    }
}

#[test]
fn sweep_safety_invariants() {
    let cases = all_cases();
    // 5 leases × 4 PG states × 3 keys × 2 paused × 2 DCS × 3 data dirs
    // × 3 pg_control states × 3 failover requests × 5 sync states
    // × 2 histories × 2 fence keeper states × 3 failsafe states
    // × 2 promotion histories.
    assert_eq!(
        cases.len(),
        5 * 4 * 3 * 2 * 2 * 3 * 3 * 3 * 5 * 2 * 2 * 3 * 2
    );
    assert_eq!(cases.len(), 777_600);

    // Split over the cores: the cases are independent, and one thread takes
    // most of the unit tests' time on a small CI host.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = cases.len().div_ceil(threads);
    let results: Vec<(BTreeSet<&'static str>, Vec<String>, usize, usize)> = std::thread::scope(
        |scope| {
            let workers: Vec<_> = cases
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    let mut seen = BTreeSet::new();
                    let mut violations = Vec::new();
                    let mut resets = 0usize;
                    for c in part {
                        let s = sweep_fixture(*c).snapshot();
                        let d = decide(&s);
                        if decide(&s) != d || decide(&s.clone()) != d {
                            violations.push(format!("not deterministic: {c:?}"));
                        }
                        if let Err(why) = invariants(&s, &d) {
                            violations.push(format!("{why}: {c:?} -> {d:?}"));
                        }
                        seen.insert(action_kind(&d.action));
                        if matches!(&d.action, Action::PrepareSlots { reset_slots, .. } if !reset_slots.is_empty())
                        {
                            resets += 1;
                        }
                    }
                    (seen, violations, part.len(), resets)
                })
            })
            .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("a sweep worker panicked"))
                .collect()
        },
    );
    let mut seen = BTreeSet::new();
    let mut violations = Vec::new();
    let mut checked = 0usize;
    let mut resets = 0usize;
    for (part_seen, part_violations, n, part_resets) in results {
        seen.extend(part_seen);
        violations.extend(part_violations);
        checked += n;
        resets += part_resets;
    }
    assert_eq!(checked, cases.len());
    assert!(
        resets > 0,
        "the sweep never resets a slot (invariant 18 untested)"
    );
    assert!(
        violations.is_empty(),
        "{} violation(s), first ones:\n{}",
        violations.len(),
        violations[..violations.len().min(20)].join("\n")
    );
    // The invariants are only worth something if the sweep reaches the
    // actions they constrain. Bootstrap needs an uninitialized cluster,
    // which the sweep deliberately holds fixed.
    let expected: BTreeSet<&str> = [
        "Wait",
        "Clone",
        "Reclone",
        "Rewind",
        "StartReplica",
        "StartPrimary",
        "Follow",
        "AcquireLease",
        "AdoptLease",
        "Promote",
        "Lead",
        "PrepareSlots",
        "Demote",
        "ReleaseLease",
        "Resign",
        "StopAndRelease",
        "WriteSyncRecord",
        "WriteFailsafeRecord",
        "SetSyncSetting",
    ]
    .into_iter()
    .collect();
    assert_eq!(seen, expected, "actions reached by the sweep");
}

/// The invariant checker itself must catch what it claims to: feed it
/// hand-made wrong decisions for situations where they are unsafe.
#[test]
fn invariant_checker_rejects_unsafe_decisions() {
    let cases: Vec<(&str, Fixture, Action)> = vec![
        (
            "promote without key",
            F::new("n1").replica(),
            Action::Promote { sync: None },
        ),
        (
            "promote with expiring lease",
            F::new("n1").leader("n1").lease_held(EXPIRING).replica(),
            Action::Promote { sync: None },
        ),
        (
            "keep writing under another key",
            F::new("n1").leader("n2").lease_held(VALID).primary(),
            Action::Wait,
        ),
        (
            "keep writing with the DCS down and the lease expiring",
            F::new("n1").lease_held(EXPIRING).primary().dcs_down(),
            Action::Wait,
        ),
        (
            "race while a key exists",
            F::new("n1").leader("n2").replica(),
            Action::AcquireLease,
        ),
        (
            "release while writable",
            F::new("n1").leader("n1").lease_held(VALID).primary(),
            Action::ReleaseLease,
        ),
        (
            "resign while writable",
            F::new("n1").leader("n1").lease_held(VALID).primary(),
            Action::Resign {
                failed_promotions: 3,
            },
        ),
        (
            "race right after resigning",
            F::new("n1").replica().resigned(1_000),
            Action::AcquireLease,
        ),
        (
            "non-writable holder records a set without itself",
            F::new("n1")
                .sync_mode(SyncMode::On)
                .leader("n1")
                .lease_held(VALID)
                .replica(),
            Action::WriteSyncRecord(sync_rec("n1", &["n2"], 1, false)),
        ),
        (
            "clone from a non-leader",
            F::new("n1").leader("n2").empty_data().stopped(None),
            Action::Clone { leader: m("n3") },
        ),
        (
            "reset a slot a member streams from",
            F::new("n1")
                .leader("n2")
                .replica_streaming_from("n2")
                .held_slot("n3", Some(L), true)
                .active(),
            Action::PrepareSlots {
                create_slots: vec![],
                drop_slots: vec![],
                reset_slots: vec!["pgha_n3".into()],
            },
        ),
        (
            "reset the leader's slots",
            F::new("n1")
                .leader("n1")
                .lease_held(VALID)
                .primary()
                .held_slot("n2", Some(L), true),
            Action::PrepareSlots {
                create_slots: vec![],
                drop_slots: vec![],
                reset_slots: vec!["pgha_n2".into()],
            },
        ),
    ];
    for (name, f, action) in cases {
        let s = f.snapshot();
        let wrong = Decision::new(action, Reason::Leading);
        assert!(invariants(&s, &wrong).is_err(), "{name}: not caught");
    }
}

#[test]
fn failsafe_mode() {
    let three = || F::new("n1").member("n2").member("n3");
    let desired = {
        let f = three().leader("n1").failsafe("n1", &[]);
        let s = f.snapshot();
        crate::ha::failsafe::desired_record(&m("n1"), &s.members)
    };
    check(vec![
        (
            "etcd down, members confirmed: stay primary",
            three()
                .leader("n1")
                .lease_confirmed_by_members(VALID)
                .primary()
                .dcs_down(),
            wait(Reason::LeadingOnMembersConfirmation),
        ),
        (
            "etcd down, confirmation running out: demote",
            three()
                .leader("n1")
                .lease_confirmed_by_members(EXPIRING)
                .primary()
                .dcs_down(),
            demote(DemoteReason::LeaseLost, Reason::LeaseRunningOut),
        ),
        (
            "etcd back, key expired, members confirmed: take it back",
            three().lease_confirmed_by_members(VALID).primary(),
            act(Action::AcquireLease, Reason::RetakingLeaderKeyAfterFailsafe),
        ),
        (
            "etcd back, key expired, lease from etcd only: demote",
            three().lease_held(VALID).primary(),
            demote(DemoteReason::NoLeaderKey, Reason::WritableWithoutLease),
        ),
        (
            "etcd back, key expired, confirmation running out: demote",
            three().lease_confirmed_by_members(EXPIRING).primary(),
            demote(DemoteReason::NoLeaderKey, Reason::WritableWithoutLease),
        ),
        (
            "etcd back, another member took the key: demote",
            three()
                .leader("n2")
                .lease_confirmed_by_members(VALID)
                .primary(),
            demote(
                DemoteReason::OtherLeader {},
                Reason::OtherLeaderHoldsKey { leader: m("n2") },
            ),
        ),
        (
            "replica that promised: no race",
            three()
                .replica()
                .failsafe("n2", &["n1", "n2", "n3"])
                .promised("n2", 100),
            wait(Reason::PromisedFailsafeLeader { leader: m("n2") }),
        ),
        (
            "replica that promised: not even as the operator's target",
            three()
                .replica()
                .failsafe("n2", &["n1", "n2", "n3"])
                .promised("n2", 100)
                .failover_request(None, Some("n1")),
            wait(Reason::PromisedFailsafeLeader { leader: m("n2") }),
        ),
        (
            "replica not listed while failsafe mode is on: no race",
            three().replica().failsafe("n2", &["n2", "n3"]),
            wait(Reason::NotInFailsafeMembers),
        ),
        (
            "leader publishes the membership when failsafe mode is on",
            three()
                .leader("n1")
                .lease_held(VALID)
                .primary()
                .slots(&["n2", "n3"])
                .failsafe("n1", &[]),
            act(
                Action::WriteFailsafeRecord(desired.clone()),
                Reason::PublishingFailsafeMembers,
            ),
        ),
    ]);
    // Up to date, or failsafe mode off: nothing to publish.
    let mut current = three()
        .leader("n1")
        .lease_held(VALID)
        .primary()
        .slots(&["n2", "n3"]);
    current.view().config.failsafe_mode = true;
    current.view().failsafe = Some(desired);
    let off = three().leader("n1").lease_held(VALID).primary();
    for f in [current, off] {
        let d = decide(&f.snapshot());
        assert!(!matches!(d.action, Action::WriteFailsafeRecord(_)), "{d:?}");
    }
    // An expired promise binds nothing.
    let expired = three()
        .replica()
        .failsafe("n2", &["n1", "n2", "n3"])
        .promised("n2", 0);
    let d = decide(&expired.snapshot());
    assert!(
        !matches!(d.reason, Reason::PromisedFailsafeLeader { .. }),
        "{d:?}"
    );
}

/// Right after taking the key, the agent decides again on the snapshot it
/// raced with, the key now its own (`Snapshot::with_leader_key_taken`):
/// that must be the very decision the next loop would make on a fresh
/// read, which is a promotion with the same synchronous plan.
#[test]
fn deciding_again_after_taking_the_key_promotes_as_the_next_loop_would() {
    let async_race = || {
        F::new("n1")
            .replica()
            .member_with("n2", |r| r.received_lsn = Some(Lsn(L - 10)))
            .peer("n2", report(1, L - 10))
    };
    let sync_race = |members: &[&str], k: u32| {
        F::new("n1")
            .sync_mode(SyncMode::On)
            .sync_record("n2", members, k, false)
            .replica()
    };
    let rows: Vec<(&str, F)> = vec![
        ("asynchronous, the other replica behind", async_race()),
        (
            "synchronous, the only member of the set",
            sync_race(&["n1"], 1),
        ),
        (
            "synchronous, one of two, the other behind",
            sync_race(&["n1", "n3"], 1).peer("n3", report(1, L - 1)),
        ),
        ("strict", sync_race(&["n1"], 1).sync_mode(SyncMode::Strict)),
    ];
    for (name, fixture) in rows {
        let raced = fixture.snapshot();
        assert_eq!(
            decide(&raced).action,
            Action::AcquireLease,
            "{name}: the fixture races"
        );
        let mut next_loop = fixture.leader("n1").lease_held(VALID).snapshot();
        // With a leader in place the next loop fetches no peers.
        next_loop.peers.clear();
        let again = raced
            .with_leader_key_taken(LEASE_ID, next_loop.lease, NOW)
            .expect("a view");
        let expected = decide(&next_loop);
        assert!(
            matches!(expected.action, Action::Promote { .. }),
            "{name}: the next loop promotes: {expected:?}"
        );
        assert_eq!(decide(&again), expected, "{name}");
    }
    assert!(
        F::new("n1")
            .dcs_down()
            .snapshot()
            .with_leader_key_taken(LEASE_ID, Lease::default(), NOW)
            .is_none(),
        "without a view there is nothing to decide on"
    );
}
