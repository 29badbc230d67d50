//! Writers and the history checker of `pgha-bench chaos`.
//!
//! Several writers insert unique ids into one table, each insert its own
//! transaction, and record every acknowledged commit with the server that
//! acknowledged it and when ([`Ack`]). A failed insert has an unknown
//! outcome and is never counted (nor its id reused), as in
//! bench/writer.rs. The checker then asks three questions of a time
//! window: which acknowledged ids are missing on the leader ([`missing`]),
//! when two different servers both acknowledged writes ([`overlaps`]) and
//! the longest stretch without any acknowledgement ([`max_gap`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_postgres::NoTls;

// `super`, not `crate`: the integration tests include this file and
// bench/clock.rs side by side with `#[path]`.
use super::clock::now_ms;

pub const TABLE: &str = "chaos_writes";
/// Ids of writer `w` are `w * ID_STRIDE + 1, + 2, ...`: unique across writers.
const ID_STRIDE: i64 = 1_000_000_000_000;
/// An insert slower than this is abandoned (outcome unknown) and the
/// session replaced: a frozen or cut-off server must not stall a writer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Two acknowledgements by the same server less than this apart belong to
/// one "acknowledging period". Larger than any pause of a healthy writer
/// (slow links included), smaller than any real change of primary (which
/// takes at least a lease TTL), so a period never spans an A→B→A change.
pub const PERIOD_GAP_MS: f64 = 1_000.0;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ack {
    pub writer: usize,
    pub id: i64,
    /// Index of the node whose server acknowledged the commit.
    pub server: usize,
    pub sent_ms: f64,
    pub ack_ms: f64,
}

/// Every acknowledgement of every writer, in the order they arrived.
#[derive(Default)]
pub struct History {
    acks: Mutex<Vec<Ack>>,
}

impl History {
    pub fn acks_between(&self, from_ms: f64, to_ms: f64) -> Vec<Ack> {
        let acks = self.acks.lock().unwrap();
        acks.iter()
            .filter(|a| (from_ms..=to_ms).contains(&a.ack_ms))
            .copied()
            .collect()
    }
}

/// Where a writer connects and how it learns which server answered.
#[derive(Clone)]
pub enum Target {
    /// One node's server over its unix socket: whatever that server
    /// acknowledges is seen, even when the node is cut off from the
    /// network.
    Local {
        server: usize,
        config: tokio_postgres::Config,
    },
    /// A multi-host, `target_session_attrs=read-write` connection; the
    /// answering server is found from `inet_server_addr()` in `addrs`.
    Client {
        config: tokio_postgres::Config,
        addrs: Vec<String>,
    },
}

pub struct Writer {
    stop: Arc<AtomicBool>,
    task: Option<JoinHandle<()>>,
}

impl Writer {
    pub fn start(writer: usize, target: Target, interval: Duration, history: Arc<History>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(writer, target, interval, history, stop.clone()));
        Writer {
            stop,
            task: Some(task),
        }
    }

    pub async fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

async fn connect(
    target: &Target,
) -> anyhow::Result<(tokio_postgres::Client, tokio_postgres::Statement, usize)> {
    let config = match target {
        Target::Local { config, .. } | Target::Client { config, .. } => config,
    };
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(connection);
    let server = match target {
        Target::Local { server, .. } => *server,
        Target::Client { addrs, .. } => {
            let addr: Option<String> = client
                .query_one("SELECT host(inet_server_addr())", &[])
                .await?
                .get(0);
            let addr = addr.unwrap_or_default();
            addrs
                .iter()
                .position(|a| *a == addr)
                .ok_or_else(|| anyhow::anyhow!("unknown server address {addr:?}"))?
        }
    };
    let insert = client
        .prepare(&format!("INSERT INTO {TABLE} (id) VALUES ($1)"))
        .await?;
    Ok((client, insert, server))
}

async fn run(
    writer: usize,
    target: Target,
    interval: Duration,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
) {
    let mut next_id = writer as i64 * ID_STRIDE + 1;
    while !stop.load(Ordering::SeqCst) {
        let Ok(Ok((client, insert, server))) =
            tokio::time::timeout(CONNECT_TIMEOUT, connect(&target)).await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.load(Ordering::SeqCst) {
            tick.tick().await;
            let id = next_id;
            next_id += 1;
            let sent_ms = now_ms();
            match tokio::time::timeout(WRITE_TIMEOUT, client.execute(&insert, &[&id])).await {
                Ok(Ok(_)) => history.acks.lock().unwrap().push(Ack {
                    writer,
                    id,
                    server,
                    sent_ms,
                    ack_ms: now_ms(),
                }),
                // A replica refuses at once; keep the session and try
                // again a little later (it may be promoted).
                Ok(Err(e))
                    if e.code()
                        == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION) =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => break,
            }
        }
    }
}

/// Acknowledged ids of `acks` that `client` (the leader) does not have.
pub async fn missing(client: &tokio_postgres::Client, acks: &[Ack]) -> anyhow::Result<Vec<i64>> {
    let mut lost = Vec::new();
    for chunk in acks.chunks(20_000) {
        let ids: Vec<i64> = chunk.iter().map(|a| a.id).collect();
        let rows = client
            .query(
                &format!("SELECT x FROM unnest($1::bigint[]) x WHERE NOT EXISTS (SELECT 1 FROM {TABLE} WHERE id = x)"),
                &[&ids],
            )
            .await?;
        lost.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
    }
    Ok(lost)
}

/// A time range in which two different servers both acknowledged writes.
#[derive(Clone, Debug, PartialEq)]
pub struct Overlap {
    pub servers: (usize, usize),
    pub from_ms: f64,
    pub to_ms: f64,
}

/// Per server, the periods from its first to its last acknowledgement
/// with no gap of [`PERIOD_GAP_MS`] or more in between; then every
/// intersection of two periods of different servers. An intersection of
/// zero length (one server's last ack at the instant of another's first)
/// does not count.
pub fn overlaps(acks: &[Ack]) -> Vec<Overlap> {
    let mut by_server: std::collections::BTreeMap<usize, Vec<f64>> = Default::default();
    for a in acks {
        by_server.entry(a.server).or_default().push(a.ack_ms);
    }
    let periods: Vec<(usize, f64, f64)> = by_server
        .into_iter()
        .flat_map(|(server, mut times)| {
            times.sort_by(f64::total_cmp);
            let mut out: Vec<(usize, f64, f64)> = Vec::new();
            for t in times {
                match out.last_mut() {
                    Some(p) if t - p.2 < PERIOD_GAP_MS => p.2 = t,
                    _ => out.push((server, t, t)),
                }
            }
            out
        })
        .collect();
    let mut found = Vec::new();
    for (i, a) in periods.iter().enumerate() {
        for b in &periods[i + 1..] {
            if a.0 == b.0 {
                continue;
            }
            let (from, to) = (a.1.max(b.1), a.2.min(b.2));
            if to > from {
                found.push(Overlap {
                    servers: (a.0.min(b.0), a.0.max(b.0)),
                    from_ms: from,
                    to_ms: to,
                });
            }
        }
    }
    found
}

/// The longest time in `[from_ms, to_ms]` without an acknowledgement in
/// `times` (sorted), the window's ends included: a writer that got nothing
/// through for the whole window has a gap of the whole window.
pub fn max_gap(times: &[f64], from_ms: f64, to_ms: f64) -> f64 {
    let mut last = from_ms;
    let mut gap: f64 = 0.0;
    for &t in times.iter().filter(|t| (from_ms..=to_ms).contains(*t)) {
        gap = gap.max(t - last);
        last = t;
    }
    gap.max(to_ms - last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(server: usize, at: f64) -> Ack {
        Ack {
            writer: 0,
            id: at as i64,
            server,
            sent_ms: at - 1.0,
            ack_ms: at,
        }
    }

    #[test]
    fn a_clean_handover_has_no_overlap() {
        let acks = [ack(0, 0.0), ack(0, 100.0), ack(1, 3_000.0), ack(1, 3_100.0)];
        assert!(overlaps(&acks).is_empty());
    }

    #[test]
    fn two_servers_acknowledging_at_once_overlap() {
        // Server 0 (isolated, still writable) acks until 5 s; server 1 was
        // promoted at 3 s.
        let mut acks: Vec<Ack> = (0..=50).map(|i| ack(0, i as f64 * 100.0)).collect();
        acks.extend((30..=60).map(|i| ack(1, i as f64 * 100.0)));
        assert_eq!(
            overlaps(&acks),
            vec![Overlap {
                servers: (0, 1),
                from_ms: 3_000.0,
                to_ms: 5_000.0
            }]
        );
    }

    #[test]
    fn periods_split_at_long_gaps() {
        // Server 0 leads, server 1 takes over, server 0 leads again.
        let acks = [
            ack(0, 0.0),
            ack(0, 500.0),
            ack(1, 4_000.0),
            ack(1, 4_500.0),
            ack(0, 9_000.0),
        ];
        assert!(overlaps(&acks).is_empty());
    }

    #[test]
    fn gaps_include_the_window_ends() {
        assert_eq!(max_gap(&[10.0, 20.0, 50.0], 0.0, 60.0), 30.0);
        assert_eq!(max_gap(&[], 0.0, 60.0), 60.0);
        assert_eq!(max_gap(&[10.0, 100.0], 0.0, 40.0), 30.0);
    }
}
