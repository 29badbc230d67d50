//! Promotion against real PostgreSQL standbys: a startup process that
//! sleeps through the promotion request, and a member whose every
//! promotion fails.
//!
//! The first: `postgres::promote` against a standby whose startup
//! process sleeps through the promotion request.
//!
//! PostgreSQL 15 does that when the request arrives after the startup
//! process asked the postmaster for a new WAL receiver and before that
//! receiver started: it cancels the receiver, counts a failed stream and
//! sleeps out the rest of `wal_retrieve_retry_interval` (see
//! `src/postgres/promote.rs`). In a failover that window lasts tens of
//! milliseconds; here it is held open by stopping the standby's postmaster
//! (it cannot fork the receiver), and the request is handed to the startup
//! process directly, as the postmaster would. The interval is 10 minutes,
//! so a sleep that nothing ends outlasts the promotion's deadline.
//!
//! Regression: the promotion used `pg_promote(wait => true)`, which
//! returned only when that sleep was over (up to 0.5 s with pgha's default
//! interval; 8 of 48 promotions of a fault suite were that late).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgha::postgres::promote::{self, RETRY_INTERVAL_WAIT};

use crate::support::cluster::connect;
use crate::support::{Cluster, ClusterOptions, Node, OneWritablePrimary, wait_until};

const POLL: Duration = Duration::from_millis(20);
/// Far below the sleep (10 minutes), far above a promotion.
const PROMOTION_DEADLINE: Duration = Duration::from_secs(30);

/// The startup process's pid and wait event.
async fn startup(client: &tokio_postgres::Client) -> (i32, Option<String>) {
    let row = client
        .query_one(
            "SELECT pid, wait_event FROM pg_stat_activity WHERE backend_type = 'startup'",
            &[],
        )
        .await
        .expect("the standby's startup process");
    (row.get(0), row.get(1))
}

async fn wait_for_startup_wait(client: &tokio_postgres::Client, event: &str) {
    wait_until(Duration::from_secs(60), POLL, || async {
        (startup(client).await.1.as_deref() == Some(event)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("the startup process never waited on {event}: {e:#}"));
}

fn signal(pid: i32, sig: Signal) {
    kill(Pid::from_raw(pid), sig).unwrap_or_else(|e| panic!("kill({pid}, {sig}): {e}"));
}

/// Resumes the postmaster even when the test fails halfway.
struct Thaw(i32);

impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGCONT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_wakes_a_startup_process_sleeping_through_the_request() {
    let mut cluster = Cluster::start("promote-wake", 2, ClusterOptions::default())
        .await
        .expect("a 2-node cluster");
    let leader = cluster.leader().await.unwrap().expect("a leader");
    let standby_name = cluster.replica_names().await.unwrap().remove(0);

    // A bare standby whose primary is gone: no agent to interfere.
    cluster.node_mut(&standby_name).kill_agent().await.unwrap();
    cluster.node_mut(&leader).kill_everything();
    let standby: &Node = cluster.node(&standby_name);
    // Two sessions, opened while the postmaster can still fork them.
    let watcher = connect(&standby.pg_config()).await.unwrap();
    let promoter = connect(&standby.pg_config()).await.unwrap();
    for sql in [
        "ALTER SYSTEM SET wal_retrieve_retry_interval = '10min'",
        "SELECT pg_reload_conf()",
    ] {
        watcher.batch_execute(sql).await.unwrap();
    }
    // With the primary gone, the startup process settles in that sleep.
    wait_for_startup_wait(&watcher, RETRY_INTERVAL_WAIT).await;

    let postmaster = standby.postmaster_pid().expect("the standby's postmaster");
    let (startup_pid, _) = startup(&watcher).await;
    signal(postmaster, Signal::SIGSTOP);
    let thaw = Thaw(postmaster);
    // Woken (as by a reload), it asks the stopped postmaster for a WAL
    // receiver that cannot start, and waits for it to stream.
    signal(startup_pid, Signal::SIGHUP);
    wait_for_startup_wait(&watcher, "RecoveryWalStream").await;

    let promotion =
        tokio::spawn(async move { promote::promote(&promoter, PROMOTION_DEADLINE).await });
    let signal_file = standby.data_dir().join("promote");
    wait_until(Duration::from_secs(10), POLL, || async {
        signal_file.exists().then_some(())
    })
    .await
    .expect("pg_promote writes the promote signal file");
    // What the postmaster would do on pg_promote's signal.
    signal(startup_pid, Signal::SIGUSR2);
    // The startup process took the request, cancelled the receiver that
    // never ran, and now sleeps.
    wait_for_startup_wait(&watcher, RETRY_INTERVAL_WAIT).await;
    drop(thaw);

    let promoted = promotion
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("promotion: {}", pgha::util::chain(&e)));
    assert!(
        promoted.wakeups >= 1,
        "the startup process ended its sleep without being woken: {promoted:?}"
    );
    assert!(standby.is_writable().await.unwrap());
    eprintln!("promoted: {promoted:?}");
}

/// Gives a directory back its mode when the test ends, even on failure.
struct RestoreMode(PathBuf, u32);

impl Drop for RestoreMode {
    fn drop(&mut self) {
        let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(self.1));
    }
}

/// The leader's host dies, and the replica that wins the race cannot
/// become writable: its WAL directory cannot be written, so at every
/// promotion the startup process dies creating the new timeline's files,
/// as it did on the full disk of a fault run (FATAL "could not write to
/// file \"pg_wal/xlogtemp…\": No space left on device"). The server
/// still starts read-only, so the agent kept promoting and renewing the
/// key, and writes stayed stopped beside a healthy replica.
///
/// Now the holder resigns after three failed promotions and stays out of
/// the race; the healthy replica takes over. Both replicas are at the
/// dead leader's position, so the failing one (the lower name) wins the
/// first race: the test checks that it did, then that the key moved on,
/// that the failing member never accepted writes, that it said why at
/// error level, and that it follows the new leader once its disk is
/// fixed. Before the fix the key never moved (the wait for the healthy
/// replica times out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_promotion_keeps_failing_hands_the_key_on() {
    let mut cluster = Cluster::start("promote-fails", 3, ClusterOptions::default())
        .await
        .expect("a 3-node cluster");
    let old = cluster.leader().await.unwrap().expect("a leader");
    let mut replicas = cluster.replica_names().await.unwrap();
    replicas.sort();
    let (failing, healthy) = (replicas[0].clone(), replicas[1].clone());
    // Equal positions: the race then goes to the lower name, `failing`.
    let position = |name: String| {
        let node = cluster.node(&name);
        async move {
            node.scalar("SELECT coalesce(pg_last_wal_receive_lsn(), pg_current_wal_lsn())::text")
                .await
                .ok()
                .flatten()
        }
    };
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let leader_at = position(old.clone()).await?;
            let all = [
                position(failing.clone()).await?,
                position(healthy.clone()).await?,
            ];
            all.iter().all(|p| *p == leader_at).then_some(())
        },
    )
    .await
    .expect("both replicas at the leader's position");

    let checker = OneWritablePrimary::start(&cluster);
    cluster.node_mut(&old).kill_everything();
    let killed = Instant::now();
    let pg_wal = cluster.node(&failing).data_dir().join("pg_wal");
    let restore = RestoreMode(pg_wal.clone(), 0o700);
    std::fs::set_permissions(&pg_wal, std::fs::Permissions::from_mode(0o500))
        .expect("make pg_wal read-only for the PostgreSQL account");
    eprintln!("killed {old}; {failing}'s pg_wal is read-only, {healthy} is fine");

    let leader = wait_until(
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            let l = cluster.leader().await.ok().flatten()?;
            (l == healthy).then_some(l)
        },
    )
    .await;
    let failing_node = cluster.node(&failing);
    if let Err(e) = leader {
        panic!(
            "the key never reached {healthy}: {e:#}\n{}",
            cluster.log_tails(30)
        );
    }
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async {
            cluster
                .node(&healthy)
                .is_writable()
                .await
                .ok()?
                .then_some(())
        },
    )
    .await
    .expect("the new leader accepts writes");
    let writable_after = killed.elapsed();
    eprintln!(
        "{healthy} writable {:.1}s after the leader's loss",
        writable_after.as_secs_f64()
    );

    let log = failing_node.log_text();
    assert!(
        log.contains("acquired the leader lease"),
        "{failing} was expected to win the first race (equal positions, lower name); \
         the story did not happen:\n{}",
        failing_node.log_tail(40)
    );
    let resigned = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("giving the leader key up"))
        .unwrap_or_else(|| {
            panic!(
                "no error line for the resignation:\n{}",
                failing_node.log_tail(40)
            )
        });
    eprintln!("{resigned}");
    assert!(
        resigned.contains("failed_promotions=3") && resigned.contains("pg_wal/xlogtemp"),
        "the error names the count and PostgreSQL's cause: {resigned}"
    );

    // Fixed disk: the member that resigned follows the new leader.
    drop(restore);
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async {
            let status = failing_node.status().await.ok()?;
            (status["state"] == "streaming" && status["upstream"] == healthy.as_str()).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{failing} does not follow {healthy}: {e:#}\n{}",
            failing_node.log_tail(30)
        )
    });

    let checks = checker.stop().await;
    checks.assert_ok();
    assert_eq!(
        checks.writable_rounds.get(&failing),
        None,
        "{failing} must never accept writes"
    );
    assert_eq!(
        cluster.leader().await.unwrap().as_deref(),
        Some(healthy.as_str())
    );
}
