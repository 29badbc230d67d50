//! Cluster-wide server parameters (`postgresql.parameters` in etcd) as an
//! operator meets them: `pgha config set` and `pgha edit-config` reach
//! every member's running server, a parameter that needs a restart is
//! reported as pending on every member and restarts nothing, and refused
//! changes (pgha-owned names, invalid values, an edit based on a stale
//! read) change nothing.
//!
//! One two-node cluster serves every check, in sequence, to keep the test
//! short.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use crate::support::cluster::{PGHA_BIN, members, pgha};
use crate::support::{Cluster, ClusterOptions, wait_until};

/// Generous: an agent takes a change in within one loop (1 s here).
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// `pgha ARGS -c CONFIG` with `EDITOR` set, no terminal; any exit status.
async fn run(args: &[&str], config: &Path, editor: Option<&Path>) -> Output {
    // `config set` takes both words before `-c`.
    let (sub, rest) = args.split_at(if args[0] == "config" { 2 } else { 1 });
    let mut cmd = tokio::process::Command::new(PGHA_BIN);
    cmd.args(sub)
        .arg("-c")
        .arg(config)
        .args(rest)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(e) = editor {
        cmd.env("EDITOR", e);
    }
    tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("pgha {args:?} did not exit within 90 s"))
        .unwrap_or_else(|e| panic!("run pgha {args:?}: {e}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The cluster-wide parameters as `pgha config show --json` prints them.
async fn parameters(config: &Path) -> anyhow::Result<Value> {
    let out = pgha(&["config", "show", "--json"], config).await?;
    let json: Value = serde_json::from_str(&out).context("config show --json")?;
    Ok(json["postgresql"]["parameters"].clone())
}

/// Waits until `SHOW name` answers `value` on every node.
async fn wait_for_setting(cluster: &Cluster, name: &str, value: &str) -> anyhow::Result<()> {
    for node in &cluster.nodes {
        wait_until(APPLY_TIMEOUT, Duration::from_millis(200), || async {
            let shown = node.scalar(&format!("SHOW {name}")).await.ok()??;
            (shown == value).then_some(())
        })
        .await
        .with_context(|| format!("{}: {name} never became {value}", node.name()))?;
    }
    Ok(())
}

/// An executable editor script in the cluster's directory.
fn editor(cluster: &Cluster, name: &str, body: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = cluster.dir().join(name);
    std::fs::write(&path, format!("#!/bin/sh\nset -e\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[tokio::test]
async fn cluster_wide_parameters_reach_every_member_and_refusals_change_nothing() {
    let cluster = Cluster::start("params", 2, ClusterOptions::default())
        .await
        .expect("cluster");
    let config = cluster.nodes[0].config_path().to_path_buf();

    // A reload parameter reaches every running server.
    pgha(
        &["config", "set", "postgresql.parameters.work_mem=64MB"],
        &config,
    )
    .await
    .unwrap();
    wait_for_setting(&cluster, "work_mem", "64MB")
        .await
        .unwrap();

    // A postmaster parameter: pending restart on every member, nothing
    // restarted, the running value unchanged.
    let postmasters: Vec<Option<i32>> = cluster.nodes.iter().map(|n| n.postmaster_pid()).collect();
    pgha(
        &["config", "set", "postgresql.parameters.max_connections=150"],
        &config,
    )
    .await
    .unwrap();
    let list = wait_until(APPLY_TIMEOUT, Duration::from_millis(300), || async {
        let list = cluster.list_json().await.ok()?;
        let pending = members(&list).iter().all(|m| {
            m["pending_restart"]
                .as_array()
                .is_some_and(|p| p.iter().any(|n| n == "max_connections"))
        });
        pending.then_some(list)
    })
    .await;
    let list = match list {
        Ok(list) => list,
        Err(e) => panic!("{e:#}: {:?}", cluster.list_json().await),
    };
    assert_eq!(members(&list).len(), 2, "{list}");
    for (node, before) in cluster.nodes.iter().zip(&postmasters) {
        assert_eq!(&node.postmaster_pid(), before, "{} restarted", node.name());
        assert_eq!(
            node.scalar("SHOW max_connections")
                .await
                .unwrap()
                .as_deref(),
            Some("100")
        );
    }
    let table = pgha(&["list"], &config).await.unwrap();
    assert!(table.contains("Pending restart"), "{table}");

    // A parameter pgha owns, and a value PostgreSQL refuses: exit 2, the
    // key named, nothing written.
    let before = parameters(&config).await.unwrap();
    for (assignment, named) in [
        (
            "postgresql.parameters.synchronous_standby_names=*",
            "postgresql.parameters.synchronous_standby_names",
        ),
        (
            "postgresql.parameters.work_mem=lots",
            "postgresql.parameters.work_mem",
        ),
        (
            "postgresql.parameters.no_such_parameter=1",
            "postgresql.parameters.no_such_parameter",
        ),
    ] {
        let out = run(&["config", "set", assignment], &config, None).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{assignment}: {err}");
        assert!(err.contains(named), "{assignment}: {err}");
    }
    assert_eq!(parameters(&config).await.unwrap(), before);

    // Concurrent `config set`s of different keys: none is lost.
    let keys = [
        ("random_page_cost", "1.5"),
        ("seq_page_cost", "2"),
        ("cpu_tuple_cost", "0.02"),
        ("effective_io_concurrency", "3"),
    ];
    let sets = keys.iter().map(|(k, v)| {
        let assignment = format!("postgresql.parameters.{k}={v}");
        let config = config.clone();
        async move { run(&["config", "set", &assignment], &config, None).await }
    });
    for out in futures_util::future::join_all(sets).await {
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let now = parameters(&config).await.unwrap();
    for (k, v) in keys {
        assert_eq!(now[k], v, "{k} lost: {now}");
    }

    // edit-config with an editor that changes one value applies it.
    let edit = editor(
        &cluster,
        "edit-work-mem.sh",
        r#"sed -i 's/^work_mem = .*/work_mem = "32MB"/' "$1""#,
    );
    let out = run(&["edit-config", "--force"], &config, Some(&edit)).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("- postgresql.parameters.work_mem = 64MB")
            && shown.contains("+ postgresql.parameters.work_mem = 32MB"),
        "{shown}"
    );
    wait_for_setting(&cluster, "work_mem", "32MB")
        .await
        .unwrap();

    // An invalid edit changes nothing, names the key and keeps the file.
    let before = parameters(&config).await.unwrap();
    let invalid = editor(
        &cluster,
        "edit-invalid.sh",
        r#"sed -i 's/^work_mem = .*/work_mem = "lots"/' "$1""#,
    );
    let out = run(&["edit-config", "--force"], &config, Some(&invalid)).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("postgresql.parameters.work_mem"), "{err}");
    assert!(err.contains("kept in"), "{err}");
    assert_eq!(parameters(&config).await.unwrap(), before);

    // A change made while the editor is open: the edit is refused rather
    // than undoing it.
    let racing = editor(
        &cluster,
        "edit-racing.sh",
        &format!(
            "{PGHA_BIN} config set -c {} postgresql.parameters.jit=off >/dev/null\n\
             sed -i 's/^work_mem = .*/work_mem = \"16MB\"/' \"$1\"",
            config.display()
        ),
    );
    let out = run(&["edit-config", "--force"], &config, Some(&racing)).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("changed by someone else"), "{err}");
    let now = parameters(&config).await.unwrap();
    assert_eq!(now["jit"], "off", "{now}");
    assert_eq!(now["work_mem"], "32MB", "{now}");

    // A value written to etcd past the command's checks (an older pgha,
    // etcdctl): every agent refuses it before writing any file, keeps the
    // previous value and says so in `pgha list`.
    let node_config = pgha::config::Config::load(&config).unwrap();
    let dcs = pgha::cli::connect_dcs(&node_config).await.unwrap();
    pgha::dcs::update_config(&dcs, |c| {
        let mut c = c.clone();
        c.postgresql
            .parameters
            .insert("work_mem".into(), "lots".into());
        Ok(c)
    })
    .await
    .unwrap();
    let list = wait_until(APPLY_TIMEOUT, Duration::from_millis(300), || async {
        let list = cluster.list_json().await.ok()?;
        let refused = members(&list)
            .iter()
            .all(|m| m["rejected_parameters"]["work_mem"].is_string());
        refused.then_some(list)
    })
    .await
    .unwrap();
    assert!(
        list["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("refused postgresql.parameters.work_mem")),
        "{list}"
    );
    for node in &cluster.nodes {
        assert_eq!(
            node.scalar("SHOW work_mem").await.unwrap().as_deref(),
            Some("32MB")
        );
    }
}
