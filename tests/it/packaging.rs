//! The Debian package and the systemd unit it installs (docs/deploy.md,
//! docs/architecture.md "Running under systemd").
//!
//! This machine runs no systemd, so the tests play its part: they read the
//! unit file, send the signals its `KillMode=` implies, run its
//! `ExecStopPost=` with the `SERVICE_RESULT` systemd would set, wait its
//! `RestartSec=` and start the agent again, then look at what runs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::cluster::{PGHA_BIN, pids_mentioning};
use crate::support::{Cluster, ClusterOptions, Node, TestDir, wait_until};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const UNIT_CONFIG: &str = "/etc/pgha/pgha.toml";
const UNIT_BIN: &str = "/usr/bin/pgha";

/// A unit file's settings, in order (systemd lets a later one win).
struct Unit {
    settings: Vec<(String, String)>,
}

impl Unit {
    fn read(path: &Path) -> Unit {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let settings = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#') && !l.starts_with('['))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Unit { settings }
    }

    /// The agent's unit as the package ships it.
    fn agent() -> Unit {
        Unit::read(&Path::new(REPO).join("packaging/deb/pgha.service"))
    }

    fn get(&self, key: &str) -> &str {
        self.settings
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("the unit sets no {key}="))
    }

    fn restart_delay(&self) -> Duration {
        humantime::parse_duration(self.get("RestartSec")).expect("RestartSec is a duration")
    }

    /// The signals `systemctl stop` sends: to the main process only, or to
    /// every process of the unit.
    fn stop_signals_only_the_agent(&self) -> bool {
        match self.get("KillMode") {
            "process" => true,
            "control-group" | "mixed" => false,
            other => panic!("unexpected KillMode={other}"),
        }
    }

    /// Runs `ExecStopPost=` for `node` as systemd would after the agent
    /// ended with `service_result`.
    async fn exec_stop_post(&self, node: &Node, service_result: &str) -> Output {
        run_unit_command(self.get("ExecStopPost"), node, Some(service_result)).await
    }
}

/// Runs a unit command line with the test binary and the node's file in
/// place of the installed ones.
async fn run_unit_command(line: &str, node: &Node, service_result: Option<&str>) -> Output {
    let words: Vec<String> = line
        .split_whitespace()
        .map(|w| match w {
            UNIT_BIN => PGHA_BIN.to_string(),
            UNIT_CONFIG => node.config_path().display().to_string(),
            w => w.to_string(),
        })
        .collect();
    assert_eq!(words[0], PGHA_BIN, "the unit runs pgha: {line}");
    let mut cmd = tokio::process::Command::new(&words[0]);
    cmd.args(&words[1..]).env_remove("SERVICE_RESULT");
    if let Some(r) = service_result {
        cmd.env("SERVICE_RESULT", r);
    }
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the unit command finishes")
        .expect("run the unit command")
}

/// What the agent started that still runs: the postmaster, fence keepers,
/// and any process naming the node's directory.
fn leftovers(node: &Node) -> Vec<String> {
    let mut left: Vec<String> = node
        .postmaster_pid()
        .map(|p| format!("postmaster {p}"))
        .into_iter()
        .collect();
    left.extend(
        node.fence_keeper_pids()
            .iter()
            .map(|p| format!("fence keeper {p}")),
    );
    left.extend(
        pids_mentioning(node.dir())
            .iter()
            .map(|p| format!("{p}: {:?}", crate::support::cluster::cmdline(*p))),
    );
    left
}

fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// The package builds from the test binary, installs into a scratch root,
/// holds the expected files with the expected owners and modes, and its
/// units pass `systemd-analyze verify`.
#[test]
fn deb_package_installs_the_binary_units_and_examples() {
    let dir = TestDir::new("deb");
    let out = dir.subdir("out");
    let deb = run(
        std::process::Command::new(Path::new(REPO).join("scripts/build-deb.sh"))
            .args(["--binary", PGHA_BIN, "--compress", "none", "--out"])
            .arg(&out),
    );
    let deb = PathBuf::from(deb.trim());

    let control = run(std::process::Command::new("dpkg-deb")
        .args(["--field"])
        .arg(&deb));
    assert!(control.contains("Package: pgha\n"), "{control}");
    let depends = control
        .lines()
        .find_map(|l| l.strip_prefix("Depends: "))
        .expect("a Depends field");
    assert!(
        depends.contains("postgresql-15 | postgresql-16") && depends.contains("libc6"),
        "{depends}"
    );

    // Every entry belongs to root.
    let listing = run(std::process::Command::new("dpkg-deb").arg("-c").arg(&deb));
    for line in listing.lines() {
        assert_eq!(
            line.split_whitespace().nth(1),
            Some("root/root"),
            "owner: {line}"
        );
    }

    let root = dir.subdir("root");
    run(std::process::Command::new("dpkg")
        .arg("-x")
        .arg(&deb)
        .arg(&root));
    let expected = [
        ("usr/bin/pgha", 0o755),
        ("lib/systemd/system/pgha.service", 0o644),
        ("lib/systemd/system/pgha-proxy.service", 0o644),
        ("usr/share/doc/pgha/examples/pgha.toml", 0o644),
        ("usr/share/doc/pgha/examples/proxy.toml", 0o644),
        ("usr/share/doc/pgha/configuration.md", 0o644),
        ("usr/share/doc/pgha/deploy.md", 0o644),
        ("usr/share/doc/pgha/copyright", 0o644),
        // The configuration holds passwords.
        ("etc/pgha", 0o750),
        // The parent of the data and state directories the agent creates.
        ("var/lib/pgha", 0o755),
    ];
    for (path, expected_mode) in expected {
        assert_eq!(
            mode(&root.join(path)),
            expected_mode,
            "{path}: mode {:o}",
            mode(&root.join(path))
        );
    }
    let etc: Vec<_> = std::fs::read_dir(root.join("etc/pgha")).unwrap().collect();
    assert!(etc.is_empty(), "nothing that starts by itself: {etc:?}");

    // The installed binary runs, and the example is a valid configuration.
    let example = root.join("usr/share/doc/pgha/examples/pgha.toml");
    let check = run(std::process::Command::new(root.join("usr/bin/pgha"))
        .arg("check-config")
        .arg("-c")
        .arg(&example));
    assert!(check.contains("valid"), "{check}");

    // systemd-analyze resolves the units' commands and dependencies inside
    // the root: give it the host's system units and the kill command.
    std::fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
    run(std::process::Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(root.join("usr/lib/systemd/")));
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/kill", root.join("bin/kill")).unwrap();
    let units =
        ["pgha.service", "pgha-proxy.service"].map(|u| root.join("lib/systemd/system").join(u));
    let verify = std::process::Command::new("systemd-analyze")
        .arg(format!("--root={}", root.display()))
        .arg("verify")
        .args(&units)
        .output()
        .expect("run systemd-analyze (scripts/install-deps.sh installs it)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        verify.status.success() && said.trim().is_empty(),
        "systemd-analyze verify ({}):\n{said}",
        verify.status
    );
}

/// An agent crash under the unit: `ExecStopPost=` leaves PostgreSQL and
/// the fence keeper running, systemd starts the agent again after
/// `RestartSec=`, and the new agents take the running servers over: the
/// same postmasters, the same leader, no fencing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_crash_under_the_unit_keeps_postgres_and_the_leader() {
    let unit = Unit::agent();
    // A wide fence window, so that a slow machine cannot turn a restart
    // into a fence; the default window is measured below, not assumed.
    let options = ClusterOptions::default().ha("ttl", "\"10s\"");
    let mut cluster = Cluster::start("deb-crash", 2, options)
        .await
        .expect("start a 2-node cluster");
    let leader = cluster.leader().await.unwrap().expect("a leader");
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name().to_string()).collect();
    let postmasters: Vec<Option<i32>> = cluster.nodes.iter().map(Node::postmaster_pid).collect();
    assert!(postmasters.iter().all(Option::is_some), "{postmasters:?}");

    let crashed_at = Instant::now();
    for node in &mut cluster.nodes {
        if !unit.stop_signals_only_the_agent() {
            // systemd would kill the rest of the unit's processes too.
            node.kill_postgres();
            for keeper in node.fence_keeper_pids() {
                let _ = kill(Pid::from_raw(keeper), Signal::SIGKILL);
            }
        }
        node.kill_agent().await.unwrap();
    }
    for node in &cluster.nodes {
        let post = unit.exec_stop_post(node, "signal").await;
        assert!(
            post.status.success(),
            "{}: post-stop after a crash: {}",
            node.name(),
            String::from_utf8_lossy(&post.stderr)
        );
    }
    tokio::time::sleep(unit.restart_delay()).await;
    for node in &mut cluster.nodes {
        node.start().unwrap();
    }
    let l = cluster.node(&leader);
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || async {
            let s = l.status().await.ok()?;
            (s["leader"] == true && s["lease_valid"] == true).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("the restarted leader agent: {e:#}\n{}", l.log_tail(30)));
    eprintln!(
        "lease resumed {:?} after the crash (default fence window: 2.5 s)",
        crashed_at.elapsed()
    );
    cluster
        .wait_healthy(Duration::from_secs(20))
        .await
        .expect("the cluster is healthy again");
    assert_eq!(cluster.leader().await.unwrap(), Some(leader.clone()));
    for (name, before) in names.iter().zip(&postmasters) {
        let node = cluster.node(name);
        assert_eq!(
            node.postmaster_pid(),
            *before,
            "{name}: PostgreSQL kept running through the agent's crash"
        );
        assert!(
            !node.fence_log().contains("killed postmaster"),
            "{name}: the fence keeper fired:\n{}",
            node.fence_log()
        );
        assert_eq!(node.fence_keeper_pids().len(), 1, "{name}: one keeper");
    }
    assert!(cluster.node(&leader).is_writable().await.unwrap());
}

/// `systemctl stop pgha`: SIGTERM as `KillMode=` says, the agent's own
/// shutdown, then `ExecStopPost=` with SERVICE_RESULT=success. Nothing the
/// agent started survives. Run by hand while the agent runs, post-stop
/// refuses and touches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemctl_stop_leaves_nothing_running() {
    let unit = Unit::agent();
    let mut cluster = Cluster::start("deb-stop", 1, ClusterOptions::default())
        .await
        .expect("start a 1-node cluster");
    let node = cluster.node_mut("node1");
    let postmaster = node.postmaster_pid().expect("a postmaster");

    let by_hand = run_unit_command(unit.get("ExecStopPost"), node, None).await;
    assert_eq!(
        by_hand.status.code(),
        Some(1),
        "refuses while the agent runs"
    );
    assert!(
        String::from_utf8_lossy(&by_hand.stderr).contains("still runs"),
        "{}",
        String::from_utf8_lossy(&by_hand.stderr)
    );
    assert_eq!(node.postmaster_pid(), Some(postmaster), "untouched");

    let keepers = node.fence_keeper_pids();
    assert_eq!(keepers.len(), 1);
    if unit.stop_signals_only_the_agent() {
        let status = node.stop().await.expect("the agent stops on SIGTERM");
        assert!(status.success(), "{status}");
    } else {
        for pid in [postmaster, keepers[0], node.agent_pid().unwrap() as i32] {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        node.stop().await.expect("the agent stops");
    }
    let post = unit.exec_stop_post(node, "success").await;
    assert!(
        post.status.success(),
        "post-stop: {}",
        String::from_utf8_lossy(&post.stderr)
    );
    let left = leftovers(node);
    assert!(left.is_empty(), "still running after stop: {left:?}");
}

/// `systemctl stop pgha` with a hung agent: after `TimeoutStopSec=`
/// systemd SIGKILLs it and runs `ExecStopPost=` with
/// SERVICE_RESULT=timeout, which stops the PostgreSQL server and the fence
/// keeper the agent left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_timeout_cleans_up_after_a_hung_agent() {
    let unit = Unit::agent();
    assert!(unit.stop_signals_only_the_agent());
    let options = ClusterOptions::default().ha("ttl", "\"10s\"");
    let mut cluster = Cluster::start("deb-hung", 1, options)
        .await
        .expect("start a 1-node cluster");
    let node = cluster.node_mut("node1");
    node.freeze().unwrap();
    let agent = Pid::from_raw(node.agent_pid().unwrap() as i32);
    let _ = kill(agent, Signal::SIGTERM); // pending: the agent is stopped
    node.kill_agent().await.unwrap(); // TimeoutStopSec= passed
    assert!(
        node.postmaster_pid().is_some(),
        "the hung agent left PostgreSQL"
    );
    assert_eq!(node.fence_keeper_pids().len(), 1, "and its fence keeper");

    let post = unit.exec_stop_post(node, "timeout").await;
    assert!(
        post.status.success(),
        "post-stop: {}",
        String::from_utf8_lossy(&post.stderr)
    );
    let left = leftovers(node);
    assert!(left.is_empty(), "still running after stop: {left:?}");
    assert!(
        !node.fence_log().contains("killed postmaster"),
        "post-stop stopped PostgreSQL, not the keeper's deadline:\n{}",
        node.fence_log()
    );
}

/// The agent bootstraps a cluster with only the capabilities of the unit's
/// `CapabilityBoundingSet=` and with `NoNewPrivileges=`, applied with
/// setpriv as systemd would: initdb and PostgreSQL as the postgres user,
/// the state directory, the fence keeper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_works_within_the_units_capabilities() {
    let unit = Unit::agent();
    assert_eq!(unit.get("NoNewPrivileges"), "yes");
    let caps: Vec<String> = unit
        .get("CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let bounding = format!("-all,{}", caps.join(","));
    let mut cluster = Cluster::create("deb-caps", 1, ClusterOptions::default())
        .await
        .expect("create a 1-node cluster");
    let node = cluster.node_mut("node1");
    node.set_wrapper(&[
        "setpriv",
        "--no-new-privs",
        "--inh-caps=-all",
        &format!("--bounding-set={bounding}"),
        "--",
    ]);
    node.start().unwrap();
    cluster
        .wait_healthy(Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.log_tails(30)));
    let node = cluster.node("node1");
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", node.agent_pid().unwrap())).unwrap();
    assert!(
        status.lines().any(|l| l == "NoNewPrivs:\t1"),
        "the agent runs under setpriv:\n{status}"
    );
    assert!(node.is_writable().await.unwrap());
    assert_eq!(node.fence_keeper_pids().len(), 1);
}
