//! `postgres::promote` against a real PostgreSQL standby whose startup
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

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgha::postgres::promote::{self, RETRY_INTERVAL_WAIT};

use crate::support::cluster::connect;
use crate::support::{Cluster, ClusterOptions, Node, wait_until};

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
