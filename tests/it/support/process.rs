//! Child processes that cannot outlive their test.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// A child started as the leader of its own process group; the whole
/// group (the child and anything it forked, e.g. PostgreSQL's backends)
/// is SIGKILLed and reaped on drop, also when the test panics.
///
/// The child also gets `PR_SET_PDEATHSIG = SIGKILL`, so it dies if the test
/// binary is killed (Ctrl-C) before drops run. Linux sends that signal when
/// the *thread* that spawned the child exits: spawn from the test's own
/// task, not from a short-lived thread such as `spawn_blocking`'s.
pub struct ProcessGuard {
    child: Child,
    pgid: Pid,
    exited: Option<ExitStatus>,
}

impl ProcessGuard {
    pub fn spawn(cmd: &mut Command) -> anyhow::Result<ProcessGuard> {
        cmd.process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
        let pgid = Pid::from_raw(child.id() as i32);
        Ok(ProcessGuard {
            child,
            pgid,
            exited: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the whole process group.
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        killpg(self.pgid, signal).with_context(|| format!("killpg({}, {signal})", self.pgid))
    }

    /// The exit status if the child has exited (reaping it), else None.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Waits up to `timeout` for the child to exit on its own.
    pub async fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM to the group, then SIGKILL if it has not exited after `grace`.
    pub async fn terminate(mut self, grace: Duration) -> Option<ExitStatus> {
        if self.try_wait().is_none() {
            let _ = self.signal(Signal::SIGCONT); // a paused process cannot handle SIGTERM
            let _ = self.signal(Signal::SIGTERM);
            self.wait_timeout(grace).await;
        }
        self.kill_and_reap();
        self.exited
    }

    /// SIGKILL to the group (also when the leader has exited but children
    /// remain) and reap the child.
    fn kill_and_reap(&mut self) {
        let _ = killpg(self.pgid, Signal::SIGKILL);
        if self.exited.is_none() {
            self.exited = self.child.wait().ok();
        }
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// Runs `cmd` to completion off the async runtime (stdin closed) and
/// returns its trimmed standard output; a non-zero exit is an error
/// carrying both outputs.
pub async fn output(mut cmd: Command) -> anyhow::Result<String> {
    let out = tokio::task::spawn_blocking(move || cmd.stdin(std::process::Stdio::null()).output())
        .await??;
    if !out.status.success() {
        anyhow::bail!(
            "{} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
