//! What the auto listener knows about WAL positions, fresher than the
//! member records (which agents publish once per loop): each replica's
//! replay position and the leader's current position, polled by the proxy
//! itself every `replica_lsn_interval` on an idle pooled connection, and
//! replicas that failed a moment ago.
//!
//! A replay position only grows while the leader stays the same, so a
//! position read earlier is a safe lower bound for read-your-writes. The
//! table is cleared when the leader changes and forgets replicas that leave
//! the rotation (a re-cloned or rewound member starts over).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::message::frontend;

use super::Shared;
use super::server::Server;
use crate::model::{Lsn, MemberName};

/// The replay position of a replica (what read-your-writes compares with).
pub const REPLICA_LSN: &str = "SELECT pg_last_wal_replay_lsn()";
/// The leader's position right after a client's commit: at or past the
/// commit record.
pub const COMMIT_LSN: &str = "SELECT pg_current_wal_insert_lsn()";
/// The leader's position for the proxy's own lag measurement.
pub const LEADER_LSN: &str = "SELECT pg_current_wal_lsn()";

#[derive(Clone, Copy, Debug)]
struct Polled {
    lsn: u64,
    at: Instant,
}

#[derive(Default)]
struct Table {
    leader: Option<MemberName>,
    leader_lsn: Option<Polled>,
    replicas: HashMap<MemberName, Polled>,
    /// Failed to connect or lost mid-statement: no reads until then.
    suspect_until: HashMap<MemberName, Instant>,
}

#[derive(Default)]
pub struct Positions {
    table: Mutex<Table>,
}

impl Positions {
    pub fn replayed(&self, member: &MemberName) -> Option<u64> {
        self.table
            .lock()
            .expect("positions")
            .replicas
            .get(member)
            .map(|p| p.lsn)
    }

    /// Records a replay position (never moves one back: two polls may
    /// answer out of order).
    pub fn set_replayed(&self, member: &MemberName, lsn: u64, at: Instant) {
        let mut t = self.table.lock().expect("positions");
        let e = t
            .replicas
            .entry(member.clone())
            .or_insert(Polled { lsn, at });
        if lsn >= e.lsn {
            *e = Polled { lsn, at };
        }
    }

    pub fn suspect(&self, member: &MemberName, until: Instant) {
        self.table
            .lock()
            .expect("positions")
            .suspect_until
            .insert(member.clone(), until);
    }

    /// Whether reads must avoid `member` now: it failed a moment ago, or
    /// the last fresh polls (both newer than `fresh`) put it more than
    /// `max_lag` bytes behind the leader.
    pub fn excluded(&self, member: &MemberName, max_lag: u64, fresh: Duration) -> bool {
        let now = Instant::now();
        let t = self.table.lock().expect("positions");
        if t.suspect_until.get(member).is_some_and(|u| *u > now) {
            return true;
        }
        match (t.leader_lsn, t.replicas.get(member)) {
            (Some(l), Some(r))
                if now.duration_since(l.at) < fresh && now.duration_since(r.at) < fresh =>
            {
                l.lsn.saturating_sub(r.lsn) > max_lag
            }
            _ => false,
        }
    }

    /// Keeps the table to the current leader and rotation.
    fn retain(&self, leader: Option<&MemberName>, replicas: &[MemberName]) {
        let mut t = self.table.lock().expect("positions");
        if t.leader.as_ref() != leader {
            t.leader = leader.cloned();
            t.leader_lsn = None;
            t.replicas.clear();
        }
        t.replicas.retain(|m, _| replicas.contains(m));
        let now = Instant::now();
        t.suspect_until.retain(|_, u| *u > now);
    }

    fn set_leader_lsn(&self, leader: &MemberName, lsn: u64, at: Instant) {
        let mut t = self.table.lock().expect("positions");
        if t.leader.as_ref() == Some(leader) {
            t.leader_lsn = Some(Polled { lsn, at });
        }
    }
}

/// Polls the leader and the replicas in rotation until the proxy stops.
/// Only idle pooled connections are used (no login of its own, so no
/// credentials beyond the clients'); a member without one keeps its last
/// position and the member records' rule.
pub async fn monitor(shared: Arc<Shared>) {
    let interval = shared.cfg.replica_lsn_interval;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let routes = shared.routes.borrow().clone();
        let replicas: Vec<MemberName> = routes.replicas.iter().map(|t| t.member.clone()).collect();
        let leader = routes.leader.as_ref().map(|t| t.member.clone());
        shared.positions.retain(leader.as_ref(), &replicas);
        if let Some(leader) = &leader {
            let at = Instant::now();
            if let Some(lsn) = poll(&shared, leader, LEADER_LSN, interval).await {
                shared.positions.set_leader_lsn(leader, lsn, at);
            }
        }
        for member in &replicas {
            let at = Instant::now();
            if let Some(lsn) = poll(&shared, member, REPLICA_LSN, interval).await {
                shared.positions.set_replayed(member, lsn, at);
            }
        }
    }
}

async fn poll(shared: &Shared, member: &MemberName, sql: &str, interval: Duration) -> Option<u64> {
    let mut lease = shared.pools.borrow_idle(member)?;
    let timeout = interval.max(Duration::from_millis(500));
    match tokio::time::timeout(timeout, query_lsn(lease.server_mut(), sql)).await {
        Ok(Ok(lsn)) => {
            shared.pools.release(lease);
            lsn
        }
        // Dropped, not returned: the connection is in an unknown state.
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("server connection failed")]
    Conn(#[from] super::conn::ConnError),
    #[error("cannot send the query")]
    Io(#[from] std::io::Error),
    #[error("the server refused the query")]
    Refused,
}

/// Runs one of the LSN queries on an idle server connection (simple
/// protocol) and returns the value (`None` for SQL NULL, such as the replay
/// position of a server that is not in recovery).
pub async fn query_lsn(server: &mut Server, sql: &str) -> Result<Option<u64>, QueryError> {
    let mut out = BytesMut::new();
    frontend::query(sql, &mut out)?;
    server.conn.send(&out).await?;
    let mut value = None;
    let mut failed = false;
    loop {
        let f = server.conn.next_frame().await?;
        match f.tag {
            b'D' => value = first_column(f.body()).and_then(|s| s.parse::<Lsn>().ok()),
            b'E' => failed = true,
            b'Z' => break,
            _ => {}
        }
    }
    if failed {
        return Err(QueryError::Refused);
    }
    Ok(value.map(|l| l.0))
}

/// The first column of a DataRow body, as text.
fn first_column(body: &[u8]) -> Option<&str> {
    let count = i16::from_be_bytes(body.get(0..2)?.try_into().ok()?);
    if count < 1 {
        return None;
    }
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    if len < 0 {
        return None;
    }
    std::str::from_utf8(body.get(6..6 + len as usize)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_column_reads_text_and_null() {
        let mut row = vec![0, 1, 0, 0, 0, 9];
        row.extend_from_slice(b"0/16B3748");
        assert_eq!(first_column(&row), Some("0/16B3748"));
        assert_eq!(first_column(&[0, 1, 255, 255, 255, 255]), None);
        assert_eq!(first_column(&[0, 1, 0]), None);
    }

    #[test]
    fn positions_never_move_back_and_reset_with_the_leader() {
        let p = Positions::default();
        let n1 = MemberName::from("n1");
        let n2 = MemberName::from("n2");
        p.retain(Some(&n1), std::slice::from_ref(&n2));
        let now = Instant::now();
        p.set_replayed(&n2, 100, now);
        p.set_replayed(&n2, 50, now);
        assert_eq!(p.replayed(&n2), Some(100));
        // Measured lag: 1000 - 100 > 500.
        p.set_leader_lsn(&n1, 1000, now);
        assert!(p.excluded(&n2, 500, Duration::from_secs(1)));
        assert!(!p.excluded(&n2, 900, Duration::from_secs(1)));
        // Old polls do not count.
        assert!(!p.excluded(&n2, 500, Duration::ZERO));
        p.suspect(&n2, now + Duration::from_secs(60));
        assert!(p.excluded(&n2, 900, Duration::from_secs(1)));
        // A new leader: nothing is known any more.
        p.retain(Some(&n2), std::slice::from_ref(&n1));
        assert_eq!(p.replayed(&n2), None);
    }
}
