//! The `pgha` command line as an operator meets it: exit codes (2 for
//! usage and configuration errors, 1 for failures at run time) and error
//! messages that name the file and key, each cause once.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use crate::support::cluster::PGHA_BIN;
use crate::support::{ClusterOptions, Node, TestDir, free_port};

/// Runs the real binary; no etcd is needed by any of these tests.
async fn pgha(args: &[&str], config: &Path) -> Output {
    tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(PGHA_BIN)
            .args(args)
            .arg("-c")
            .arg(config)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("pgha {args:?} did not exit within 60 s"))
    .unwrap_or_else(|e| panic!("run pgha {args:?}: {e}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A valid node configuration whose etcd endpoint has nobody listening.
fn node(dir: &TestDir) -> Node {
    let endpoints = vec![format!("http://127.0.0.1:{}", free_port())];
    Node::new(dir, "cli", "node1", &endpoints, &ClusterOptions::default()).unwrap()
}

/// The single non-empty line of `text`, which must start with `error: `.
#[track_caller]
fn one_error_line(text: &str) -> &str {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{text}");
    assert!(lines[0].starts_with("error: "), "{text}");
    lines[0]
}

#[tokio::test]
async fn check_config_exits_0_when_valid_and_2_naming_file_and_key_when_invalid() {
    let dir = TestDir::new("cli-check");
    let node = node(&dir);
    let config = node.config_path();
    let out = pgha(&["check-config"], config).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));

    // Listening on every address with no connect_url: peers could not be
    // told where to find this node.
    let text = std::fs::read_to_string(config).unwrap();
    let bad = text.replace("listen = \"127.0.0.1:", "listen = \"0.0.0.0:");
    assert_ne!(bad, text, "the fixture's api.listen line moved");
    std::fs::write(config, bad).unwrap();
    let out = pgha(&["check-config"], config).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let line = one_error_line(&err);
    assert!(line.contains(&config.display().to_string()), "{line}");
    assert!(line.contains("api.connect_url"), "{line}");
}

#[tokio::test]
async fn unreadable_config_exits_2_and_shows_the_cause_once() {
    let dir = TestDir::new("cli-noconf");
    let missing = dir.path().join("missing.toml");
    for cmd in [&["check-config"][..], &["agent"], &["list"]] {
        let out = pgha(cmd, &missing).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{cmd:?}: {err}");
        let line = one_error_line(&err);
        assert!(line.contains(&missing.display().to_string()), "{line}");
        assert_eq!(
            line.matches("No such file or directory").count(),
            1,
            "the cause appears exactly once: {line}"
        );
    }
}

/// A malformed `config set` assignment is a usage error: exit 2 before
/// etcd is even contacted (nothing listens at the configured endpoint).
#[tokio::test]
async fn bad_config_set_assignment_exits_2() {
    let dir = TestDir::new("cli-set");
    let node = node(&dir);
    for (assignment, named) in [
        ("synchronous_mode=sometimes", "synchronous_mode"),
        ("bogus=1", "bogus"),
        ("paused", "paused"),
    ] {
        let out = pgha(&["config", "set", assignment], node.config_path()).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{assignment}: {err}");
        assert!(one_error_line(&err).contains(named), "{assignment}: {err}");
    }
    let out = pgha(&["switchover", "--at", "tomorrow"], node.config_path()).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "--at tomorrow: {err}");
    assert!(one_error_line(&err).contains("--at"), "{err}");
}

/// A valid configuration whose etcd is unreachable is a failure at run
/// time, not a usage error.
#[tokio::test]
async fn unreachable_etcd_exits_1() {
    let dir = TestDir::new("cli-noetcd");
    let node = node(&dir);
    for cmd in [&["list"][..], &["config", "set", "paused=true"]] {
        let out = pgha(cmd, node.config_path()).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}: {err}");
        assert!(one_error_line(&err).contains("etcd"), "{cmd:?}: {err}");
    }
}
