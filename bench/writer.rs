//! The client whose experience the failover benchmark measures: one
//! connection to "whichever node is writable" (a multi-host libpq-style
//! configuration with `target_session_attrs=read-write`) inserting ids
//! 1, 2, 3... every few milliseconds, each insert its own transaction.
//!
//! Every acknowledged insert is recorded with the time of its
//! acknowledgement and the connection it went through. A failed insert
//! has an unknown outcome (the commit may or may not have happened), so
//! its id is never reused and never counted as acknowledged.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_postgres::NoTls;

use crate::clock::now_ms;

/// Target spacing between two inserts.
pub const WRITE_INTERVAL: Duration = Duration::from_millis(5);
/// An insert that takes longer than this is abandoned (outcome unknown)
/// and the connection replaced; only a frozen server can cause it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause after a failed connection attempt. A failed attempt against the
/// replicas costs each of them a SCRAM authentication; retrying in a tight
/// loop would steal the CPU the failover itself needs on a small machine.
pub const RECONNECT_DELAY: Duration = Duration::from_millis(10);

#[derive(Clone, Copy, Debug)]
pub struct Ack {
    pub id: i64,
    pub at_ms: f64,
    /// Index into `Log::conns`.
    conn: usize,
}

#[derive(Clone, Copy, Debug)]
struct Conn {
    opened_ms: f64,
    /// The server's port, to tell which node acknowledged a write.
    port: u16,
}

#[derive(Default)]
struct Log {
    acks: Vec<Ack>,
    conns: Vec<Conn>,
    failed_writes: Vec<f64>,
    failed_connects: u64,
}

pub struct Writer {
    log: Arc<Mutex<Log>>,
    stop: Arc<AtomicBool>,
    task: Option<JoinHandle<()>>,
}

impl Writer {
    pub fn start(config: tokio_postgres::Config) -> Writer {
        let log = Arc::new(Mutex::new(Log::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(config, log.clone(), stop.clone()));
        Writer {
            log,
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

    /// Acknowledgements in the last `window_ms`, and the age of the last one.
    pub fn recent(&self, window_ms: f64) -> (usize, Option<f64>) {
        let log = self.log.lock().unwrap();
        let now = now_ms();
        let from = log.acks.partition_point(|a| a.at_ms < now - window_ms);
        (
            log.acks.len() - from,
            log.acks.last().map(|a| now - a.at_ms),
        )
    }

    /// The first write acknowledged after `event_ms` through a connection
    /// opened after `event_ms` (so the client really got through to a
    /// recovered server, not the tail of the old session), and, when
    /// `not_port` is set, not by that server (the old leader).
    pub fn recovery_ack(&self, event_ms: f64, not_port: Option<u16>) -> Option<f64> {
        let log = self.log.lock().unwrap();
        let from = log.acks.partition_point(|a| a.at_ms <= event_ms);
        log.acks[from..].iter().find_map(|a| {
            let c = log.conns[a.conn];
            (c.opened_ms > event_ms && Some(c.port) != not_port).then_some(a.at_ms)
        })
    }

    /// The longest time between two consecutive acknowledgements inside
    /// `[from_ms, to_ms]`: the write unavailability a client saw.
    pub fn max_gap(&self, from_ms: f64, to_ms: f64) -> f64 {
        let log = self.log.lock().unwrap();
        let a = log.acks.partition_point(|x| x.at_ms < from_ms);
        let b = log.acks.partition_point(|x| x.at_ms <= to_ms);
        log.acks[a..b]
            .windows(2)
            .map(|w| w[1].at_ms - w[0].at_ms)
            .fold(0.0, f64::max)
    }

    /// Inserts that failed (outcome unknown) inside `[from_ms, to_ms]`.
    pub fn failed_writes(&self, from_ms: f64, to_ms: f64) -> usize {
        let log = self.log.lock().unwrap();
        log.failed_writes
            .iter()
            .filter(|t| (from_ms..=to_ms).contains(*t))
            .count()
    }

    pub fn failed_connects(&self) -> u64 {
        self.log.lock().unwrap().failed_connects
    }

    pub fn acks(&self) -> Vec<Ack> {
        self.log.lock().unwrap().acks.clone()
    }
}

async fn connect(
    config: &tokio_postgres::Config,
) -> Result<(tokio_postgres::Client, tokio_postgres::Statement, u16), tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(connection);
    let port: Option<i32> = client
        .query_one("SELECT inet_server_port()", &[])
        .await?
        .get(0);
    let insert = client
        .prepare("INSERT INTO bench_writes (id) VALUES ($1)")
        .await?;
    Ok((client, insert, port.unwrap_or(0) as u16))
}

async fn run(config: tokio_postgres::Config, log: Arc<Mutex<Log>>, stop: Arc<AtomicBool>) {
    let mut next_id: i64 = 1;
    while !stop.load(Ordering::SeqCst) {
        // The connect timeout is per host; bound the whole attempt too.
        let (client, insert, port) =
            match tokio::time::timeout(Duration::from_secs(5), connect(&config)).await {
                Ok(Ok(c)) => c,
                _ => {
                    log.lock().unwrap().failed_connects += 1;
                    tokio::time::sleep(RECONNECT_DELAY).await;
                    continue;
                }
            };
        let conn = {
            let mut l = log.lock().unwrap();
            l.conns.push(Conn {
                opened_ms: now_ms(),
                port,
            });
            l.conns.len() - 1
        };
        let mut tick = tokio::time::interval(WRITE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.load(Ordering::SeqCst) {
            tick.tick().await;
            let id = next_id;
            next_id += 1;
            match tokio::time::timeout(WRITE_TIMEOUT, client.execute(&insert, &[&id])).await {
                Ok(Ok(_)) => log.lock().unwrap().acks.push(Ack {
                    id,
                    at_ms: now_ms(),
                    conn,
                }),
                _ => {
                    // Reconnect at once: the next attempt finds the new
                    // writable node (or fails and retries shortly).
                    log.lock().unwrap().failed_writes.push(now_ms());
                    break;
                }
            }
        }
    }
}
