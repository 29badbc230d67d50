//! The proxy's auto listener against a real two-node cluster: reads reach
//! the replica, writes hidden in reads never do, a client never reads a
//! state older than its own last write, and a replica that dies under
//! running reads costs the clients nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio_postgres::SimpleQueryMessage;

use crate::support::cluster::{PGHA_BIN, connect};
use crate::support::proxy::Proxy;
use crate::support::{Cluster, ClusterOptions, Node, wait_until};

/// The first column of the first row of a simple query.
async fn simple_value(client: &tokio_postgres::Client, sql: &str) -> anyhow::Result<String> {
    for m in client.simple_query(sql).await? {
        if let SimpleQueryMessage::Row(r) = m {
            return Ok(r.get(0).unwrap_or_default().to_string());
        }
    }
    anyhow::bail!("{sql}: no row")
}

async fn metrics(proxy: &Proxy) -> String {
    reqwest::get(format!("http://127.0.0.1:{}/metrics", proxy.api_port))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one sample line (`name{labels} value`), 0 when absent.
fn sample(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn replica(cluster: &Cluster) -> &Node {
    let name = cluster.replica_names().await.unwrap().remove(0);
    cluster.node(&name)
}

/// Waits until the auto port sends a plain read to `node`.
async fn wait_reads_reach(proxy: &Proxy, node: &Node) {
    let port = node.pg_port().to_string();
    let cfg = proxy.config(proxy.auto_port);
    wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        let (cfg, port) = (cfg.clone(), port.clone());
        async move {
            let c = connect(&cfg).await.ok()?;
            let got = simple_value(&c, "SELECT inet_server_port()").await.ok()?;
            (got == port).then_some(())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", proxy.log_tail()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hidden_writes_never_reach_a_replica() {
    let cluster = Cluster::start(
        "pxau",
        2,
        ClusterOptions::default().parameter("shared_preload_libraries", "\"pg_stat_statements\""),
    )
    .await
    .unwrap();
    let proxy = Proxy::start(
        &cluster,
        "pxa1",
        &[
            ("max_lag", "1073741824"),
            ("read_only_functions", "[\"app_ro\"]"),
        ],
    )
    .await
    .unwrap();
    let rw = connect(&proxy.config(proxy.rw_port)).await.unwrap();
    rw.batch_execute(
        "CREATE EXTENSION pg_stat_statements;
         CREATE TABLE t (id int PRIMARY KEY, v int);
         INSERT INTO t VALUES (1, 1);
         CREATE SEQUENCE s;
         CREATE FUNCTION app_writes() RETURNS int LANGUAGE sql
             AS $$ INSERT INTO t VALUES (nextval('s') + 100, 0) RETURNING 1 $$;
         CREATE FUNCTION app_ro() RETURNS int STABLE LANGUAGE sql AS $$ SELECT 7 $$;",
    )
    .await
    .unwrap();
    let replica = replica(&cluster).await;
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            let n = replica
                .scalar("SELECT count(*) FROM pg_proc WHERE proname = 'app_ro'")
                .await
                .ok()??;
            (n == "1").then_some(())
        },
    )
    .await
    .unwrap();
    wait_reads_reach(&proxy, replica).await;

    let auto = connect(&proxy.config(proxy.auto_port)).await.unwrap();
    // Reads, simple and extended protocol, and a configured function.
    assert_eq!(
        simple_value(&auto, "SELECT v /*m_read_simple*/ FROM t WHERE id = 1")
            .await
            .unwrap(),
        "1"
    );
    let row = auto
        .query_one("SELECT v /*m_read_ext*/ FROM t WHERE id = $1", &[&1i32])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    assert_eq!(
        simple_value(&auto, "SELECT app_ro() /*m_read_fn*/")
            .await
            .unwrap(),
        "7"
    );

    // Writes hidden in reads, each marked.
    let hidden = [
        "WITH d AS (INSERT INTO t VALUES (2, 2) RETURNING *) SELECT * /*m_w_cte*/ FROM d",
        "WITH u AS (UPDATE t SET v = v + 1 WHERE id = 1 RETURNING v) SELECT v /*m_w_cte2*/ FROM u",
        "SELECT app_writes() /*m_w_fn*/",
        "SELECT nextval('s') /*m_w_seq*/",
        "SELECT v /*m_w_lock*/ FROM t WHERE id = 1 FOR UPDATE",
        "SELECT * /*m_w_into*/ INTO t_copy FROM t",
        "SELECT 1 /*m_w_multi*/; INSERT INTO t VALUES (3, 3)",
        "SELECT v /*m_w_random*/ FROM t ORDER BY random() LIMIT 1",
    ];
    for sql in hidden {
        auto.simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    auto.query("SELECT app_writes() + 0 /*m_w_fn_ext*/", &[])
        .await
        .unwrap();
    // A temporary table exists only where it was created (a new client:
    // nothing pipelined before its BEGIN).
    let auto = connect(&proxy.config(proxy.auto_port)).await.unwrap();
    for sql in [
        "BEGIN",
        "CREATE TEMP TABLE m_scratch (x int)",
        "INSERT INTO m_scratch VALUES (1)",
        "COMMIT",
    ] {
        auto.simple_query(sql).await.unwrap();
    }
    // In transaction mode the next transaction may get another server
    // connection of the leader, without the table (an error then); it
    // must never run on the replica, checked below.
    let _ = simple_value(&auto, "SELECT count(*) /*m_w_temp*/ FROM m_scratch").await;

    let leader = cluster.leader_node().await.unwrap();
    let on_replica = marked_statements(replica).await;
    let on_leader = marked_statements(leader).await;
    let writes_on_replica: Vec<&String> =
        on_replica.iter().filter(|q| q.contains("/*m_w_")).collect();
    assert!(
        writes_on_replica.is_empty(),
        "writes reached the replica: {writes_on_replica:?}"
    );
    for m in ["m_read_simple", "m_read_ext", "m_read_fn"] {
        assert!(
            on_replica.iter().any(|q| q.contains(m)),
            "{m} not on the replica: {on_replica:?}"
        );
    }
    for m in [
        "m_w_cte",
        "m_w_cte2",
        "m_w_fn",
        "m_w_seq",
        "m_w_lock",
        "m_w_into",
        "m_w_multi",
        "m_w_random",
        "m_w_fn_ext",
    ] {
        assert!(
            on_leader.iter().any(|q| q.contains(&format!("{m}*/"))),
            "{m} not on the leader: {on_leader:?}"
        );
    }

    // The counters say where and why.
    let text = metrics(&proxy).await;
    let replica_name = replica.name().to_string();
    let leader_name = leader.name().to_string();
    assert!(
        sample(
            &text,
            &format!(
                "pgha_proxy_routed_statements_total{{member=\"{replica_name}\",reason=\"read_only\"}}"
            )
        ) >= 3,
        "{text}"
    );
    for reason in ["write", "function", "in_transaction"] {
        assert!(
            sample(
                &text,
                &format!(
                    "pgha_proxy_routed_statements_total{{member=\"{leader_name}\",reason=\"{reason}\"}}"
                )
            ) >= 1,
            "{reason}: {text}"
        );
    }

    // `pgha proxy explain`.
    let out = std::process::Command::new(PGHA_BIN)
        .args(["proxy", "explain", "--json", "SELECT nextval('s')"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["destination"], "leader");
    assert_eq!(v["reason"], "function");
    let out = std::process::Command::new(PGHA_BIN)
        .args(["proxy", "explain", "SELECT * FROM t"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("replica: read-only statement"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The statements with an `/*m_...*/` marker in `node`'s pg_stat_statements.
async fn marked_statements(node: &Node) -> Vec<String> {
    let rows = node
        .psql("SELECT query FROM pg_stat_statements WHERE query LIKE '%/*m\\_%'")
        .await
        .unwrap();
    rows.into_iter().filter_map(|r| r[0].clone()).collect()
}

/// Writes `i`, reads it back: `None` when the read saw an older value.
async fn write_then_read(c: &tokio_postgres::Client, i: u64) -> Option<u64> {
    // Asynchronous commit keeps an iteration cheap (no fsync wait); the
    // commit's position is what read-your-writes follows either way.
    c.simple_query(&format!(
        "BEGIN; SET LOCAL synchronous_commit = off; UPDATE kv SET v = {i} WHERE k = 1; COMMIT"
    ))
    .await
    .unwrap();
    let v: u64 = simple_value(c, "SELECT v FROM kv WHERE k = 1")
        .await
        .unwrap()
        .parse()
        .unwrap();
    (v >= i).then_some(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_never_go_back_behind_the_clients_own_writes() {
    // The replica applies every commit 200 ms late, while staying within
    // max_lag in bytes: it stays in rotation, and is always behind.
    let cluster = Cluster::start(
        "pxryw",
        2,
        ClusterOptions::default().parameter("recovery_min_apply_delay", "\"200ms\""),
    )
    .await
    .unwrap();
    let with = Proxy::start(&cluster, "pxr1", &[("max_lag", "1073741824")])
        .await
        .unwrap();
    let without = Proxy::start(
        &cluster,
        "pxr2",
        &[("max_lag", "1073741824"), ("read_your_writes", "false")],
    )
    .await
    .unwrap();
    let rw = connect(&with.config(with.rw_port)).await.unwrap();
    rw.batch_execute("CREATE TABLE kv (k int PRIMARY KEY, v bigint); INSERT INTO kv VALUES (1, 0)")
        .await
        .unwrap();
    let replica = replica(&cluster).await;
    wait_reads_reach(&with, replica).await;
    wait_reads_reach(&without, replica).await;
    // The replica applies the table 200 ms late: reads routed to it
    // before that fail ("relation does not exist") instead of being stale.
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async {
            replica
                .scalar("SELECT v FROM kv WHERE k = 1")
                .await
                .ok()
                .flatten()
        },
    )
    .await
    .expect("the replica has the table");

    // Without read-your-writes the delayed replica serves stale reads: the
    // check below can fail.
    let c = connect(&without.config(without.auto_port)).await.unwrap();
    let mut stale_without = 0;
    for i in 1..=100 {
        if write_then_read(&c, i).await.is_none() {
            stale_without += 1;
        }
    }
    assert!(
        stale_without > 50,
        "only {stale_without} of 100 reads were stale without read-your-writes"
    );

    let c = connect(&with.config(with.auto_port)).await.unwrap();
    let replica_reads = format!(
        "pgha_proxy_routed_statements_total{{member=\"{}\",reason=\"read_only\"}}",
        replica.name()
    );
    let replica_reads_before = sample(&metrics(&with).await, &replica_reads);
    let started = std::time::Instant::now();
    let mut stale = Vec::new();
    for i in 1_000..11_000u64 {
        // Now and then the replica has time to catch up: those reads may
        // (and should) go to it.
        if i % 3_000 == 0 {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let v: u64 = simple_value(&c, "SELECT v FROM kv WHERE k = 1")
                .await
                .unwrap()
                .parse()
                .unwrap();
            if v < i - 1 {
                stale.push((i - 1, v));
            }
        }
        if write_then_read(&c, i).await.is_none() {
            stale.push((i, 0));
        }
    }
    eprintln!(
        "10,000 read-after-write iterations in {:?}",
        started.elapsed()
    );
    assert!(
        stale.is_empty(),
        "stale reads: {:?}",
        &stale[..stale.len().min(10)]
    );
    let text = metrics(&with).await;
    // Reads after a pause, once the replica has replayed: most reach it.
    assert!(
        sample(&text, &replica_reads) >= replica_reads_before + 2,
        "the replica served too few reads: {text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("reason=\"read_your_writes_fallback\"")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_dies_under_running_reads_costs_no_client_error() {
    let cluster = Cluster::start("pxkill", 2, ClusterOptions::default())
        .await
        .unwrap();
    let proxy = Proxy::start(&cluster, "pxk1", &[("max_lag", "1073741824")])
        .await
        .unwrap();
    let replica = replica(&cluster).await;
    wait_reads_reach(&proxy, replica).await;

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for n in 0..4 {
        let cfg = proxy.config(proxy.auto_port);
        let (stop, done) = (stop.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            let c = connect(&cfg).await.unwrap();
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                // Long enough to be running when the replica dies.
                let r = if n % 2 == 0 {
                    c.simple_query("SELECT count(*) FROM generate_series(1, 300000)")
                        .await
                        .map(|_| ())
                } else {
                    c.query(
                        "SELECT count(*) FROM generate_series(1, $1::int)",
                        &[&300000i32],
                    )
                    .await
                    .map(|_| ())
                };
                match r {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
            errors
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = done.load(Ordering::Relaxed);
    assert!(before > 0, "no read finished before the kill");
    replica.kill_postgres().expect("replica postmaster");
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for c in clients {
        errors.extend(c.await.unwrap());
    }
    assert!(
        errors.is_empty(),
        "client errors: {errors:?}\n{}",
        proxy.log_tail()
    );
    assert!(
        done.load(Ordering::Relaxed) > before,
        "no read finished after the kill"
    );
    let text = metrics(&proxy).await;
    assert!(
        sample(&text, "pgha_proxy_read_retries_total") >= 1,
        "{text}"
    );
}
