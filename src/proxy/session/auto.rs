//! The auto listener's part of a session: statement routing, read-your-
//! writes and transparent retry of reads (`docs/proxy.md`).
//!
//! Between transactions the client's messages are buffered up to a batch
//! boundary (`Sync`, `Query`, `Flush`, `FunctionCall`), so the whole batch
//! is classified before a server is chosen: a pipelined batch that mixes a
//! read with a write goes to the leader as one. A batch sent to a replica
//! is kept until its answer starts, so that it can be sent again elsewhere
//! when the replica fails first. While a replica serves one batch, the
//! next batches wait for it to finish and are routed on their own.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::super::classify::{self, Analysis, Decision, Destination, Kind, Reason, SessionState};
use super::super::codec::{self, Frame, Severity};
use super::super::prepared;
use super::super::replay;
use super::super::route::{self, AutoRead, LeaderFallback};
use super::{Batch, End, Session};
use crate::model::MemberName;

/// More buffered messages than this without a boundary: route what there
/// is to the leader (a client streaming Bind/Execute without Sync).
const MAX_PENDING: usize = 1000;
/// How long a replica that failed gets no reads (unless the watch drops
/// it first).
const SUSPECT_FOR: Duration = Duration::from_secs(2);

#[derive(Default)]
pub(super) struct AutoState {
    /// Messages waiting for a routing decision.
    pending: Vec<Frame>,
    /// Analyses of the client's named statements, and of the last unnamed.
    analyses: HashMap<String, Arc<Analysis>>,
    unnamed: Option<Arc<Analysis>>,
    temp_tables: HashSet<String>,
    /// The held server is a replica serving a read batch.
    pub(super) on_replica: bool,
    /// The batch sent to the replica, for a retry.
    sent: Vec<Frame>,
    /// Part of the replica's answer has been passed to the client.
    answered: bool,
    /// The replica failed before answering: send the batch elsewhere.
    pub(super) retry: bool,
    /// The held leader transaction may have written: learn its position
    /// before releasing the connection.
    pub(super) wrote: bool,
    pub(super) lsn_due: bool,
    /// The leader's insert position after the client's last write
    /// transaction (`u64::MAX`: unknown, so reads go to the leader until
    /// the next write tells).
    last_write_lsn: Option<u64>,
}

impl AutoState {
    /// The server is going back: nothing of the batch is kept.
    pub(super) fn batch_done(&mut self) {
        self.on_replica = false;
        self.sent.clear();
        self.answered = false;
    }
}

pub(super) enum Step {
    Forward(Frame),
    Done(Option<End>),
}

fn is_boundary(tag: u8) -> bool {
    matches!(tag, b'S' | b'Q' | b'H' | b'F')
}

/// FATAL or PANIC: the server is going away (a fast shutdown sends
/// `57P01` before closing).
fn is_fatal(body: &[u8]) -> bool {
    let mut b = body;
    while let Some((&kind, rest)) = b.split_first() {
        if kind == 0 {
            break;
        }
        b = rest;
        let Some(value) = codec::cstr(&mut b) else {
            break;
        };
        if kind == b'V' {
            return value == "FATAL" || value == "PANIC";
        }
    }
    false
}

impl Session {
    /// Buffers, routes or forwards one client message.
    pub(super) async fn auto_client(&mut self, frame: Frame) -> Step {
        if self.server.is_none() {
            if self.auto.pending.is_empty() {
                match frame.tag {
                    b'S' => {
                        codec::ready_for_query(&mut self.client_out, b'I');
                        return Step::Done(None);
                    }
                    b'H' | b'd' | b'c' | b'f' => return Step::Done(None),
                    _ => {}
                }
            }
            let boundary = is_boundary(frame.tag);
            self.auto.pending.push(frame);
            if boundary || self.auto.pending.len() > MAX_PENDING {
                return Step::Done(self.dispatch().await);
            }
            return Step::Done(None);
        }
        if self.auto.on_replica {
            // A later batch waits for the replica to finish this one.
            let batch_in_flight = self.pending_syncs > 0 && !self.unsynced;
            if batch_in_flight || !self.auto.pending.is_empty() {
                self.auto.pending.push(frame);
                return Step::Done(None);
            }
            if frame.tag == b'C' {
                self.forget_statement(frame.body());
            }
            self.auto.sent.push(frame.clone());
        } else {
            // A statement pipelined behind the batch that took this leader
            // connection was never classified: it may write.
            if matches!(frame.tag, b'Q' | b'P' | b'B' | b'F') && self.shared.cfg.read_your_writes {
                self.auto.wrote = true;
            }
            self.note_statement(&frame);
        }
        Step::Forward(frame)
    }

    /// On the leader: remember what later routing needs (named statements,
    /// temporary tables created inside a transaction block).
    fn note_statement(&mut self, frame: &Frame) {
        let body = frame.body();
        match frame.tag {
            b'C' => self.forget_statement(body),
            b'P' => {
                if let Some(msg) = prepared::parse_parse(body)
                    && (!msg.name.is_empty() || mentions_temp(&msg.query))
                {
                    let a = Arc::new(classify::analyze(&msg.query));
                    self.auto.temp_tables.extend(a.creates_temp.iter().cloned());
                    if !msg.name.is_empty() {
                        self.auto.analyses.insert(msg.name, a);
                    }
                }
            }
            b'Q' => {
                if let Some(q) = codec::cstr(&mut &body[..])
                    && mentions_temp(&q)
                {
                    let a = classify::analyze(&q);
                    self.auto.temp_tables.extend(a.creates_temp);
                }
            }
            _ => {}
        }
    }

    /// A client `Close` of a named statement: its analysis goes too (a
    /// driver that prepares a new name per query would otherwise grow the
    /// map without bound).
    fn forget_statement(&mut self, body: &[u8]) {
        if let Some((b'S', name)) = prepared::target(body) {
            self.auto.analyses.remove(&name);
        }
    }

    /// The decision for the buffered batch: the leader as soon as one
    /// statement needs it.
    fn batch_decision(&mut self) -> Decision {
        let mut leader = None;
        let mut closed = Vec::new();
        let in_transaction = self.status != b'I';
        let state = &mut self.auto;
        for f in &state.pending {
            let body = f.body();
            let analysis = match f.tag {
                b'Q' => codec::cstr(&mut &body[..]).map(|q| Arc::new(classify::analyze(&q))),
                b'P' => prepared::parse_parse(body).map(|msg| {
                    let a = Arc::new(classify::analyze(&msg.query));
                    if msg.name.is_empty() {
                        state.unnamed = Some(a.clone());
                    } else {
                        state.analyses.insert(msg.name, a.clone());
                    }
                    a
                }),
                b'B' => Some(
                    prepared::bind_statement(body)
                        .and_then(|(_, stmt, _)| {
                            if stmt.is_empty() {
                                state.unnamed.clone()
                            } else {
                                state.analyses.get(stmt).cloned()
                            }
                        })
                        .unwrap_or_else(|| unknown("Bind of an unknown statement")),
                ),
                b'F' => Some(unknown("FunctionCall message")),
                b'C' => {
                    if let Some((b'S', name)) = prepared::target(body) {
                        closed.push(name);
                    }
                    None
                }
                _ => None,
            };
            let Some(a) = analysis else { continue };
            state.temp_tables.extend(a.creates_temp.iter().cloned());
            let d = classify::decide(
                &a,
                SessionState {
                    in_transaction,
                    temp_tables: &state.temp_tables,
                },
                &self.shared.functions,
            );
            if d.destination == Destination::Leader && leader.is_none() {
                leader = Some(d);
            }
        }
        for name in closed {
            self.auto.analyses.remove(&name);
        }
        leader.unwrap_or(Decision {
            destination: Destination::AnyMember,
            reason: Reason::ReadOnly,
        })
    }

    /// Routes the buffered batch and forwards it.
    async fn dispatch(&mut self) -> Option<End> {
        let decision = self.batch_decision();
        let shared = self.shared.clone();
        let cfg = &shared.cfg;
        let mut tried: Vec<MemberName> = Vec::new();
        let (lease, label, on_replica) = loop {
            if decision.destination == Destination::Leader {
                match self.acquire().await {
                    Ok(l) => break (l, decision.reason.label(), false),
                    Err(message) => return self.refuse_batch(&message),
                }
            }
            let routes = self.routes.borrow().clone();
            let need = self.auto.last_write_lsn.filter(|_| cfg.read_your_writes);
            // Polls older than this say nothing about the lag now.
            let fresh = cfg.replica_lsn_interval * 3 + Duration::from_millis(500);
            // Loads under one lock of the pool map, not one per comparison.
            let members: Vec<&MemberName> = routes.replicas.iter().map(|t| &t.member).collect();
            let loads = shared.pools.loads(&members);
            let load =
                |m: &MemberName| members.iter().position(|x| *x == m).map_or(0, |i| loads[i]);
            let pick = route::pick_auto_read(
                &routes,
                need,
                |m| shared.positions.replayed(m),
                load,
                |m| tried.contains(m) || shared.positions.excluded(m, cfg.max_lag, fresh),
            );
            match pick {
                AutoRead::Replica(t) => {
                    let member = t.member.clone();
                    let deadline = Instant::now() + cfg.hold_timeout;
                    match self.acquire_at(t, deadline).await {
                        Ok(l) => break (l, "read_only", true),
                        Err(e) => {
                            tracing::debug!(%member, error = %crate::util::chain(&e), "replica refused a read; trying another member");
                            self.shared
                                .positions
                                .suspect(&member, std::time::Instant::now() + SUSPECT_FOR);
                            tried.push(member);
                        }
                    }
                }
                AutoRead::Leader(why) => {
                    if why == LeaderFallback::ReadYourWrites
                        && !cfg.causal_reads_timeout.is_zero()
                        && let Some(l) = self.wait_for_replica(&routes, need, &tried).await
                    {
                        break (l, "read_only", true);
                    }
                    match self.acquire().await {
                        Ok(l) => break (l, why.label(), false),
                        Err(message) => return self.refuse_batch(&message),
                    }
                }
            }
        };
        self.shared
            .stats
            .count_route(lease.server().target.member.as_str(), label);
        self.take_server(lease);
        self.auto.on_replica = on_replica;
        self.auto.wrote = decision.destination == Destination::Leader && cfg.read_your_writes;
        let frames = std::mem::take(&mut self.auto.pending);
        if on_replica {
            self.auto.sent = frames.clone();
        }
        for f in frames {
            if let Err(message) = self.forward(f) {
                return Some(self.fatal("08P01", &message).await);
            }
        }
        None
    }

    /// `causal_reads_timeout`: waits on a replica connection until it has
    /// replayed `need`, re-checking its position every few milliseconds.
    async fn wait_for_replica(
        &mut self,
        routes: &route::Routes,
        need: Option<u64>,
        tried: &[MemberName],
    ) -> Option<super::Lease> {
        let need = need?;
        let shared = self.shared.clone();
        let target = match route::pick_auto_read(
            routes,
            None,
            |_| None,
            |m| shared.pools.load(m),
            |m| tried.contains(m),
        ) {
            AutoRead::Replica(t) => t,
            AutoRead::Leader(_) => return None,
        };
        let deadline = Instant::now() + shared.cfg.causal_reads_timeout;
        let mut lease = self.acquire_at(target.clone(), deadline).await.ok()?;
        loop {
            let checked = tokio::time::timeout_at(
                deadline,
                replay::query_lsn(lease.server_mut(), replay::REPLICA_LSN),
            )
            .await;
            match checked {
                Ok(Ok(Some(lsn))) => {
                    shared
                        .positions
                        .set_replayed(&target.member, lsn, std::time::Instant::now());
                    if lsn >= need {
                        return Some(lease);
                    }
                }
                // Timed out mid-query, or failed: the connection is dropped.
                _ => return None,
            }
            if Instant::now() + Duration::from_millis(2) >= deadline {
                shared.pools.release(lease);
                return None;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// No server for the batch: the client gets the error, as a server
    /// would give it.
    fn refuse_batch(&mut self, message: &str) -> Option<End> {
        let last = self.auto.pending.last().map(|f| f.tag);
        self.auto.pending.clear();
        codec::error_response(&mut self.client_out, Severity::Error, "08006", message);
        match last {
            Some(b'S' | b'Q' | b'F') => codec::ready_for_query(&mut self.client_out, b'I'),
            _ => self.discarding = true,
        }
        None
    }

    /// A frame from the server; `false` keeps it from the client (the
    /// replica is failing before answering: the batch will be retried).
    pub(super) fn auto_server_frame(&mut self, frame: &Frame) -> bool {
        if self.auto.retry {
            return false;
        }
        if !self.auto.on_replica {
            return true;
        }
        if !self.auto.answered && frame.tag == b'E' && is_fatal(frame.body()) {
            self.retry_read();
            return false;
        }
        self.auto.answered = true;
        true
    }

    /// The held replica failed: when none of its answer reached the client,
    /// drops it and queues the batch again (`true`).
    pub(super) fn retry_read(&mut self) -> bool {
        if self.side != super::Side::Auto || !self.auto.on_replica || self.auto.answered {
            return false;
        }
        if let Some(lease) = self.server.take() {
            let member = lease.server().target.member.clone();
            tracing::info!(%member, "replica failed before answering; retrying the read elsewhere");
            self.shared
                .positions
                .suspect(&member, std::time::Instant::now() + SUSPECT_FOR);
        }
        self.cancel.set(None);
        self.shared
            .stats
            .read_retries_total
            .fetch_add(1, Ordering::Relaxed);
        let mut frames = std::mem::take(&mut self.auto.sent);
        frames.append(&mut self.auto.pending);
        self.auto.pending = frames;
        self.auto.batch_done();
        self.auto.retry = true;
        self.batches.clear();
        self.batches.push_back(Batch::default());
        self.pending_syncs = 0;
        self.unsynced = false;
        true
    }

    /// Between batches: retry a failed read, learn the position of a
    /// commit, route what the client sent meanwhile.
    pub(super) async fn auto_between_batches(&mut self) -> Option<End> {
        if self.auto.retry {
            self.auto.retry = false;
            if let Some(end) = self.dispatch().await {
                return Some(end);
            }
        }
        if self.auto.lsn_due {
            self.auto.lsn_due = false;
            self.auto.wrote = false;
            if let Some(mut lease) = self.server.take() {
                let lsn = tokio::time::timeout(
                    Duration::from_secs(5),
                    replay::query_lsn(lease.server_mut(), replay::COMMIT_LSN),
                )
                .await;
                match lsn {
                    Ok(Ok(Some(lsn))) => {
                        self.auto.last_write_lsn = Some(lsn);
                        self.server = Some(lease);
                        self.release_server();
                    }
                    _ => {
                        self.auto.last_write_lsn = Some(u64::MAX);
                        self.cancel.set(None);
                    }
                }
            }
        }
        if self.server.is_none() && self.auto.pending.iter().any(|f| is_boundary(f.tag)) {
            return self.dispatch().await;
        }
        None
    }
}

fn unknown(what: &str) -> Arc<Analysis> {
    Arc::new(Analysis {
        kind: Kind::NotRead(Reason::Write {
            statement: what.into(),
        }),
        functions: Vec::new(),
        relations: Vec::new(),
        creates_temp: Vec::new(),
    })
}

/// Cheap pre-check before parsing a statement on the leader path.
fn mentions_temp(sql: &str) -> bool {
    sql.as_bytes()
        .windows(4)
        .any(|w| w.eq_ignore_ascii_case(b"temp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_errors_are_recognised() {
        let mut body = Vec::new();
        for (k, v) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', "57P01")] {
            body.push(k);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        assert!(is_fatal(&body));
        let error = [b"VERROR\0".as_slice(), b"C42P01\0\0"].concat();
        assert!(!is_fatal(&error));
        assert!(mentions_temp("create TEMPORARY table x()"));
        assert!(!mentions_temp("select 1"));
    }
}
