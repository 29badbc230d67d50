//! `pgha post-stop`: stop what an agent left running once it has exited.
//!
//! The systemd unit runs the agent with `KillMode=process`, so that an
//! agent crash leaves PostgreSQL and the fence keeper running for the
//! restarted agent to take over (docs/architecture.md, "Running under
//! systemd"). The price is that systemd itself never stops them; this
//! command, the unit's `ExecStopPost=`, does so after a *requested* stop,
//! and leaves them alone after a crash. systemd tells the two apart in
//! `SERVICE_RESULT`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use nix::sys::signal::Signal;

use crate::agent::fence::{Fence, FenceState};
use crate::agent::vip_net::FloatingAddress;
use crate::config::Config;
use crate::postgres::ctl::postmaster_pid;
use crate::safe_fs::{Owner, SafeFsError, Strictness, TrustedDir};

/// How long a fast shutdown may take before it becomes an immediate one.
const FAST_STOP: Duration = Duration::from_secs(30);
/// How long an immediate shutdown may take before the server is killed.
const IMMEDIATE_STOP: Duration = Duration::from_secs(10);
/// How long the fence keeper gets to read its exit order.
const KEEPER_EXIT: Duration = Duration::from_secs(2);

/// What to do, given how the agent ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cleanup {
    /// The agent crashed: leave everything for the restarted agent.
    LeaveRunning,
    /// A requested stop: PostgreSQL gets a fast shutdown (a checkpoint).
    Fast,
    /// The agent did not finish its own shutdown within the stop timeout:
    /// it already had its chance at a clean one.
    Immediate,
}

/// Maps systemd's `SERVICE_RESULT` (unset when run by hand) to a cleanup.
///
/// systemd counts an exit by SIGTERM as "success"; every other result
/// ("exit-code", "signal", "core-dump", "watchdog", "oom-kill", ...)
/// means the agent ended on its own, and `Restart=on-failure` starts it
/// again.
pub fn cleanup_for(service_result: Option<&str>) -> Cleanup {
    match service_result {
        None | Some("") | Some("success") => Cleanup::Fast,
        Some("timeout") => Cleanup::Immediate,
        Some(_) => Cleanup::LeaveRunning,
    }
}

pub async fn run(cfg: &Config, service_result: Option<&str>) -> anyhow::Result<()> {
    let cleanup = cleanup_for(service_result);
    if cleanup == Cleanup::LeaveRunning {
        tracing::info!(
            result = service_result.unwrap_or_default(),
            "the agent ended on its own; leaving PostgreSQL and the fence keeper to the restarted agent"
        );
        return Ok(());
    }
    let fence = match TrustedDir::open(&cfg.state_dir, Owner::current(), Strictness::Private) {
        Ok(dir) => Some(Fence::new(Arc::new(dir))),
        // Never started here: there is no keeper, and no agent to ask.
        Err(SafeFsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            None
        }
        Err(e) => return Err(anyhow::Error::new(e).context("open the state directory")),
    };
    if let Some(pid) = fence.as_ref().and_then(live_agent) {
        bail!(
            "the agent (pid {pid}) still runs for {}; stop it first",
            cfg.path.display()
        );
    }
    let mut problems = Vec::new();
    let data_dir = &cfg.postgres.data_dir;
    let postgres_stopped = stop_postgres(data_dir, cleanup).await;
    if !postgres_stopped {
        problems.push(format!(
            "PostgreSQL of {} is still running",
            data_dir.display()
        ));
    }
    kill_tools(data_dir);
    if let Some(vip) = &cfg.vip {
        let address = FloatingAddress::from_config(vip);
        match address.remove() {
            Ok(true) => tracing::info!(address = %address.cidr(), "removed the floating address"),
            Ok(false) => {}
            Err(e) => problems.push(format!(
                "cannot remove the floating address {}: {:#}",
                address.cidr(),
                anyhow::Error::new(e)
            )),
        }
    }
    // The keeper goes last, and only once PostgreSQL is down: while a
    // server runs it may still need fencing.
    if postgres_stopped
        && let Some(fence) = &fence
        && !stop_keepers(fence, data_dir).await
    {
        problems.push("a fence keeper survived SIGKILL".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("; "))
    }
}

/// The agent named in the fence state, if it still runs.
fn live_agent(fence: &Fence) -> Option<i32> {
    let pid = match fence.current()? {
        FenceState::Armed { agent_pid, .. } | FenceState::Disarmed { agent_pid } => agent_pid,
        FenceState::Exit => return None,
    };
    let process = procfs::process::Process::new(pid).ok()?;
    let running = process.stat().is_ok_and(|s| s.state != 'Z')
        && process.uid().ok() == Some(nix::unistd::geteuid().as_raw())
        && process
            .cmdline()
            .is_ok_and(|args| args.get(1).map(String::as_str) == Some("agent"));
    running.then_some(pid)
}

/// Stops the postmaster of `data_dir`, escalating from fast to immediate
/// to SIGKILL. True when no postmaster runs any more.
async fn stop_postgres(data_dir: &Path, cleanup: Cleanup) -> bool {
    let Some(pid) = postmaster_pid(data_dir) else {
        return true;
    };
    let steps: &[(Signal, &str, Duration)] = match cleanup {
        Cleanup::Fast => &[
            (Signal::SIGINT, "fast", FAST_STOP),
            (Signal::SIGQUIT, "immediate", IMMEDIATE_STOP),
        ],
        _ => &[(Signal::SIGQUIT, "immediate", IMMEDIATE_STOP)],
    };
    for (signal, mode, timeout) in steps {
        tracing::info!(pid, mode, "stopping the PostgreSQL server the agent left");
        // postmaster_pid checked that this is a live postmaster of the data
        // directory's owner, never root: the pid file cannot steer this.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), *signal);
        if wait_until(*timeout, || postmaster_pid(data_dir) != Some(pid)).await {
            return postmaster_pid(data_dir).is_none();
        }
        tracing::warn!(pid, mode, ?timeout, "PostgreSQL did not stop in time");
    }
    crate::agent::fence_keeper::kill_postgres(data_dir);
    wait_until(IMMEDIATE_STOP, || postmaster_pid(data_dir).is_none()).await
}

/// Kills the PostgreSQL tools the agent ran on `data_dir` (a clone, a
/// rewind, an initdb, a single-user adoption): they survive an agent killed
/// at its stop timeout. Only processes of the data directory's owner are
/// signalled.
fn kill_tools(data_dir: &Path) {
    let Ok(owner) = std::fs::symlink_metadata(data_dir).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid()
    }) else {
        return;
    };
    if owner == 0 {
        return;
    }
    for (pid, name) in processes_naming(data_dir, owner) {
        tracing::info!(pid, name, "killing a PostgreSQL tool the agent left");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Processes of `uid` with `dir` among their arguments (alone or as
/// `--option=dir`), with their command names.
fn processes_naming(dir: &Path, uid: u32) -> Vec<(i32, String)> {
    let dir = dir.to_string_lossy().to_string();
    let suffix = format!("={dir}");
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.filter_map(Result::ok)
        .filter(|p| p.uid().ok() == Some(uid))
        .filter(|p| {
            p.cmdline()
                .is_ok_and(|args| args.iter().any(|a| *a == dir || a.ends_with(&suffix)))
        })
        .filter_map(|p| Some((p.pid, p.stat().ok()?.comm)))
        .collect()
}

/// Tells the fence keepers of `data_dir` to exit, and kills those that do
/// not. True when none is left.
async fn stop_keepers(fence: &Fence, data_dir: &Path) -> bool {
    let keepers = || {
        let me = nix::unistd::geteuid().as_raw();
        keeper_pids(data_dir, me)
    };
    if keepers().is_empty() {
        return true;
    }
    fence.exit();
    if wait_until(KEEPER_EXIT, || keepers().is_empty()).await {
        return true;
    }
    for pid in keepers() {
        tracing::warn!(pid, "the fence keeper did not exit; killing it");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
    wait_until(KEEPER_EXIT, || keepers().is_empty()).await
}

/// Live `pgha fence-keeper` processes of `uid` guarding `data_dir`.
fn keeper_pids(data_dir: &Path, uid: u32) -> Vec<i32> {
    let data_dir = PathBuf::from(data_dir).to_string_lossy().to_string();
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.filter_map(Result::ok)
        .filter(|p| p.uid().ok() == Some(uid))
        .filter(|p| p.stat().is_ok_and(|s| s.state != 'Z'))
        .filter(|p| {
            p.cmdline().is_ok_and(|args| {
                args.iter().any(|a| a == "fence-keeper")
                    && args
                        .windows(2)
                        .any(|w| w[0] == "--data-dir" && w[1] == data_dir)
            })
        })
        .map(|p| p.pid)
        .collect()
}

/// Polls `done` every 50 ms until it holds (true) or `timeout` passes.
async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_requested_stop_cleans_up() {
        for (result, expected) in [
            (None, Cleanup::Fast),
            (Some(""), Cleanup::Fast),
            (Some("success"), Cleanup::Fast),
            (Some("timeout"), Cleanup::Immediate),
            (Some("signal"), Cleanup::LeaveRunning),
            (Some("core-dump"), Cleanup::LeaveRunning),
            (Some("exit-code"), Cleanup::LeaveRunning),
            (Some("watchdog"), Cleanup::LeaveRunning),
            (Some("oom-kill"), Cleanup::LeaveRunning),
        ] {
            assert_eq!(cleanup_for(result), expected, "{result:?}");
        }
    }
}
