//! Oracles for failover tests: what clients were promised, and whether two
//! servers ever accepted writes at once.
//!
//! - [`Writer`]: inserts ids 1, 2, 3... every ~5 ms through a multi-host,
//!   `target_session_attrs=read-write` connection (the way an application
//!   follows a failover), reconnecting on errors. An id is *acknowledged*
//!   only when its INSERT (autocommit) returned OK; an id whose INSERT
//!   failed or timed out is *unknown*: it may or may not have committed,
//!   and is never assumed absent. Ids are never reused.
//!   [`WriterReport::missing_on`] then lists acknowledged ids a node lacks:
//!   any such id is a lost commit.
//! - [`OneWritablePrimary`]: polls every node's `SELECT NOT
//!   pg_is_in_recovery()` every ~50 ms in the background, in parallel,
//!   over kept-open sessions with short timeouts, and records every round
//!   in which two nodes answered "writable".

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::future::join_all;
use tokio::task::JoinHandle;

use super::cluster::{Cluster, Node, connect};

/// The default table the writer fills.
pub const ORACLE_TABLE: &str = "pgha_oracle";
/// Pause between two inserts.
const WRITE_INTERVAL: Duration = Duration::from_millis(5);
/// An INSERT that takes longer is abandoned (its id becomes unknown) and the
/// session is dropped: a frozen or partitioned primary must not stall the
/// writer forever.
const INSERT_TIMEOUT: Duration = Duration::from_secs(2);

/// A background writer; see the module docs.
pub struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    task: Option<JoinHandle<WriterReport>>,
}

/// What the writer saw, returned by [`Writer::stop`].
#[derive(Clone, Debug, Default)]
pub struct WriterReport {
    pub table: String,
    /// Ids whose INSERT returned OK: they must survive any failover.
    pub acknowledged: BTreeSet<i64>,
    /// Ids whose outcome is unknown (error or timeout during the INSERT).
    pub unknown: BTreeSet<i64>,
    /// Failed connection attempts (no writable server reachable).
    pub connect_failures: u64,
    /// Sessions opened (1 + reconnections after errors).
    pub sessions: u64,
    /// The last error seen, for diagnostics.
    pub last_error: Option<String>,
}

impl Writer {
    /// Creates `ORACLE_TABLE` through the cluster's multi-host connection
    /// (waiting up to 30 s for a writable server) and starts writing.
    pub async fn start(cluster: &Cluster) -> anyhow::Result<Writer> {
        Self::start_with(cluster.multi_host_config(), ORACLE_TABLE).await
    }

    /// Like [`start`](Writer::start) with any connection settings and table.
    pub async fn start_with(config: tokio_postgres::Config, table: &str) -> anyhow::Result<Writer> {
        Self::start_patient(config, table, INSERT_TIMEOUT).await
    }

    /// Like [`start_with`](Writer::start_with), waiting up to
    /// `insert_timeout` for each INSERT: for clients behind a proxy that
    /// holds queries through a switchover, where a pause is the expected
    /// behaviour and only an error is a failure.
    pub async fn start_patient(
        config: tokio_postgres::Config,
        table: &str,
        insert_timeout: Duration,
    ) -> anyhow::Result<Writer> {
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {table} (id bigint PRIMARY KEY, \
             written_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let attempt = async {
                let client = connect(&config).await?;
                client.batch_execute(&ddl).await?;
                anyhow::Ok(())
            };
            match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                Ok(Ok(())) => break,
                Ok(Err(e)) if Instant::now() >= deadline => {
                    return Err(e).context(format!("create the oracle table {table}"));
                }
                Err(_) if Instant::now() >= deadline => {
                    anyhow::bail!("create the oracle table {table}: timed out");
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(write_loop(
            config,
            table.to_string(),
            insert_timeout,
            stop.clone(),
            acked.clone(),
        ));
        Ok(Writer {
            stop,
            acked,
            task: Some(task),
        })
    }

    /// How many inserts have been acknowledged so far.
    pub fn acknowledged_count(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Waits until `more` further inserts are acknowledged (progress check,
    /// e.g. "writes resumed after the failover").
    pub async fn wait_for_progress(&self, more: u64, timeout: Duration) -> anyhow::Result<()> {
        let target = self.acknowledged_count() + more;
        let deadline = Instant::now() + timeout;
        while self.acknowledged_count() < target {
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "writer made no progress: {} acknowledged, wanted {target} within {timeout:?}",
                    self.acknowledged_count()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Stops writing (the INSERT in flight finishes or times out) and
    /// returns what was acknowledged.
    pub async fn stop(mut self) -> WriterReport {
        self.stop.store(true, Ordering::Relaxed);
        match self.task.take() {
            Some(t) => t.await.expect("the writer task panicked"),
            None => WriterReport::default(),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn write_loop(
    config: tokio_postgres::Config,
    table: String,
    insert_timeout: Duration,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
) -> WriterReport {
    let mut report = WriterReport {
        table: table.clone(),
        ..Default::default()
    };
    let mut client: Option<tokio_postgres::Client> = None;
    let mut next_id: i64 = 1;
    while !stop.load(Ordering::Relaxed) {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            // connect_timeout applies per host; bound the whole attempt too.
            match tokio::time::timeout(Duration::from_secs(5), connect(&config)).await {
                Ok(Ok(c)) => {
                    report.sessions += 1;
                    client = Some(c);
                }
                Ok(Err(e)) => {
                    report.connect_failures += 1;
                    report.last_error = Some(format!("connect: {e:#}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(_) => {
                    report.connect_failures += 1;
                    report.last_error = Some("connect: timed out".into());
                    continue;
                }
            }
        }
        let c = client.as_ref().expect("connected above");
        let id = next_id;
        next_id += 1;
        let sql = format!("INSERT INTO {table} (id) VALUES ({id})");
        match tokio::time::timeout(insert_timeout, c.batch_execute(&sql)).await {
            Ok(Ok(())) => {
                report.acknowledged.insert(id);
                acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                report.unknown.insert(id);
                report.last_error = Some(format!("insert {id}: {e}"));
                client = None;
            }
            Err(_) => {
                report.unknown.insert(id);
                report.last_error = Some(format!("insert {id}: timed out"));
                client = None;
            }
        }
        tokio::time::sleep(WRITE_INTERVAL).await;
    }
    report
}

impl WriterReport {
    /// Reads the table on `node` and returns the acknowledged ids it lacks
    /// (lost commits). Wait for the node to catch up first.
    pub async fn missing_on(&self, node: &Node) -> anyhow::Result<BTreeSet<i64>> {
        let present = self.ids_on(node).await?;
        Ok(self.acknowledged.difference(&present).copied().collect())
    }

    /// Every id present in the table on `node`.
    pub async fn ids_on(&self, node: &Node) -> anyhow::Result<BTreeSet<i64>> {
        let rows = node.psql(&format!("SELECT id FROM {}", self.table)).await?;
        rows.into_iter()
            .map(|r| {
                r.into_iter()
                    .next()
                    .flatten()
                    .context("NULL id")?
                    .parse::<i64>()
                    .context("id is not a number")
            })
            .collect()
    }

    /// The largest acknowledged id (0 when none).
    pub fn max_acknowledged(&self) -> i64 {
        self.acknowledged.last().copied().unwrap_or(0)
    }
}

/// Two nodes that answered "writable" in the same polling round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub nodes: (String, String),
    /// When each of the two answered, since the checker started.
    pub answered_at: (Duration, Duration),
    /// Wall-clock time of the round, for matching with logs.
    pub wall: std::time::SystemTime,
}

/// What the checker saw, returned by [`OneWritablePrimary::stop`].
#[derive(Clone, Debug, Default)]
pub struct CheckerReport {
    pub violations: Vec<Violation>,
    pub rounds: u64,
    /// Rounds in which each node answered "writable".
    pub writable_rounds: BTreeMap<String, u64>,
}

impl CheckerReport {
    /// Panics with the violations, if any.
    #[track_caller]
    pub fn assert_ok(&self) {
        assert!(
            self.violations.is_empty(),
            "two writable primaries at once ({} rounds checked): {:#?}",
            self.rounds,
            self.violations
        );
    }
}

/// The background "at most one writable primary" checker.
pub struct OneWritablePrimary {
    stop: Arc<AtomicBool>,
    shared: Arc<Mutex<CheckerReport>>,
    task: Option<JoinHandle<()>>,
}

/// Per-query and per-connect timeout of the checker: a frozen server just
/// counts as "no answer" for that round.
const CHECK_TIMEOUT: Duration = Duration::from_millis(300);
const CHECK_INTERVAL: Duration = Duration::from_millis(50);

impl OneWritablePrimary {
    /// Starts checking every node of `cluster` (its nodes as of now).
    pub fn start(cluster: &Cluster) -> Self {
        let targets = cluster
            .nodes
            .iter()
            .map(|n| {
                let mut c = n.pg_config();
                c.connect_timeout(CHECK_TIMEOUT)
                    .application_name("pgha-tests-checker");
                (n.name().to_string(), c)
            })
            .collect();
        Self::start_with(targets)
    }

    /// Starts checking the given (name, connection settings) pairs.
    pub fn start_with(targets: Vec<(String, tokio_postgres::Config)>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Mutex::new(CheckerReport::default()));
        let task = tokio::spawn(check_loop(targets, stop.clone(), shared.clone()));
        OneWritablePrimary {
            stop,
            shared,
            task: Some(task),
        }
    }

    pub fn violations_so_far(&self) -> Vec<Violation> {
        self.shared.lock().unwrap().violations.clone()
    }

    pub fn rounds_so_far(&self) -> u64 {
        self.shared.lock().unwrap().rounds
    }

    pub async fn stop(mut self) -> CheckerReport {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            t.await.expect("the checker task panicked");
        }
        self.shared.lock().unwrap().clone()
    }
}

impl Drop for OneWritablePrimary {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn check_loop(
    targets: Vec<(String, tokio_postgres::Config)>,
    stop: Arc<AtomicBool>,
    shared: Arc<Mutex<CheckerReport>>,
) {
    let started = Instant::now();
    let mut clients: Vec<Option<tokio_postgres::Client>> = targets.iter().map(|_| None).collect();
    while !stop.load(Ordering::Relaxed) {
        let round_start = Instant::now();
        let wall = std::time::SystemTime::now();
        let answers = join_all(targets.iter().zip(clients.iter_mut()).map(
            |((_, config), slot)| async move {
                let writable = ask_writable(config, slot).await;
                (writable, started.elapsed())
            },
        ))
        .await;
        {
            let mut report = shared.lock().unwrap();
            report.rounds += 1;
            let writable: Vec<(&str, Duration)> = targets
                .iter()
                .zip(&answers)
                .filter(|(_, (w, _))| *w == Some(true))
                .map(|((name, _), (_, at))| (name.as_str(), *at))
                .collect();
            for (name, _) in &writable {
                *report.writable_rounds.entry(name.to_string()).or_default() += 1;
            }
            for (i, a) in writable.iter().enumerate() {
                for b in &writable[i + 1..] {
                    report.violations.push(Violation {
                        nodes: (a.0.to_string(), b.0.to_string()),
                        answered_at: (a.1, b.1),
                        wall,
                    });
                }
            }
        }
        let spent = round_start.elapsed();
        if spent < CHECK_INTERVAL {
            tokio::time::sleep(CHECK_INTERVAL - spent).await;
        }
    }
}

/// `Some(true)` writable, `Some(false)` in recovery, `None` no answer in
/// time (the session is then dropped and reopened next round).
pub async fn ask_writable(
    config: &tokio_postgres::Config,
    slot: &mut Option<tokio_postgres::Client>,
) -> Option<bool> {
    if slot.as_ref().is_none_or(|c| c.is_closed()) {
        *slot = tokio::time::timeout(CHECK_TIMEOUT, connect(config))
            .await
            .ok()
            .and_then(Result::ok);
    }
    let client = slot.as_ref()?;
    match tokio::time::timeout(
        CHECK_TIMEOUT,
        client.simple_query("SELECT NOT pg_is_in_recovery()"),
    )
    .await
    {
        Ok(Ok(msgs)) => msgs.into_iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v == "t"),
            _ => None,
        }),
        _ => {
            *slot = None;
            None
        }
    }
}
