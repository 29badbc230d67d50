//! Self-fencing: a writable primary stops before its lease can expire.
//!
//! The agent cannot guarantee this on its own: a frozen (SIGSTOP), swapped
//! out or killed agent executes nothing. So a second, tiny process — the
//! fence keeper — watches a deadline the agent writes into a file after
//! every successful lease renewal. If the clock (`CLOCK_BOOTTIME`, shared by
//! every process on the host) passes the deadline and no newer one has been
//! written, the keeper kills the postmaster and all its backends at once.
//!
//! The deadline is `renewal sent + ttl - fence_margin`: etcd received the
//! renewal after it was sent, so the lease outlives the deadline by at
//! least `fence_margin`, and no other member can hold the lease before the
//! old primary is dead. The keeper has its own process group, uses no
//! async runtime, and polls every 20 ms.
//!
//! Not covered: a frozen *machine* (both processes stop). That is the job of
//! a hardware or kernel watchdog; see docs/architecture.md.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::util::boottime_ms;

/// What the agent tells the keeper. The file holds one line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceState {
    /// Kill PostgreSQL if `deadline_ms` passes without a newer state.
    Armed { deadline_ms: u64, agent_pid: i32 },
    /// Nothing to protect; exit once the agent is gone.
    Disarmed { agent_pid: i32 },
    /// The agent shut down cleanly; exit now.
    Exit,
}

impl FenceState {
    pub fn render(&self) -> String {
        match self {
            FenceState::Armed {
                deadline_ms,
                agent_pid,
            } => format!("armed {deadline_ms} {agent_pid}\n"),
            FenceState::Disarmed { agent_pid } => format!("disarmed {agent_pid}\n"),
            FenceState::Exit => "exit\n".to_string(),
        }
    }

    pub fn parse(text: &str) -> Option<FenceState> {
        let mut words = text.split_whitespace();
        match words.next()? {
            "armed" => Some(FenceState::Armed {
                deadline_ms: words.next()?.parse().ok()?,
                agent_pid: words.next()?.parse().ok()?,
            }),
            "disarmed" => Some(FenceState::Disarmed {
                agent_pid: words.next()?.parse().ok()?,
            }),
            "exit" => Some(FenceState::Exit),
            _ => None,
        }
    }
}

/// The agent's side: writes states atomically (temp file + rename).
#[derive(Clone, Debug)]
pub struct Fence {
    path: PathBuf,
}

impl Fence {
    pub fn new(state_dir: &Path) -> Self {
        Fence {
            path: state_dir.join("fence.state"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn set(&self, state: FenceState) -> std::io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(state.render().as_bytes())?;
        std::fs::rename(&tmp, &self.path)
    }

    pub fn arm(&self, deadline_ms: u64) {
        if let Err(e) = self.set(FenceState::Armed {
            deadline_ms,
            agent_pid: std::process::id() as i32,
        }) {
            tracing::error!(error = %crate::util::chain(&e), path = %self.path.display(), "cannot arm the fence keeper");
        }
    }

    pub fn disarm(&self) {
        if let Err(e) = self.set(FenceState::Disarmed {
            agent_pid: std::process::id() as i32,
        }) {
            tracing::error!(error = %crate::util::chain(&e), path = %self.path.display(), "cannot disarm the fence keeper");
        }
    }

    pub fn current(&self) -> Option<FenceState> {
        std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| FenceState::parse(&t))
    }

    /// Starts a keeper for `data_dir` unless one already runs (it holds an
    /// exclusive lock; a second one exits at once).
    pub fn spawn_keeper(&self, data_dir: &Path) -> std::io::Result<()> {
        let exe = std::env::current_exe()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path.with_file_name("fence-keeper.log"))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("fence-keeper")
            .arg("--state-file")
            .arg(&self.path)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--agent-pid")
            .arg(std::process::id().to_string())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn()?;
        // Reap it in the background so it never lingers as a zombie.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(())
    }
}

fn pid_alive(pid: i32) -> bool {
    pid > 0
        && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Kills the postmaster of `data_dir` and every child it has: the
/// postmaster is stopped first so it cannot fork replacements, then the
/// children and the postmaster are SIGKILLed. No backend gets to send one
/// more reply. Returns the postmaster pid that was killed.
pub fn kill_postgres(data_dir: &Path) -> Option<i32> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let pm = crate::postgres::ctl::postmaster_pid(data_dir)?;
    let _ = kill(Pid::from_raw(pm), Signal::SIGSTOP);
    for child in children_of(pm) {
        let _ = kill(Pid::from_raw(child), Signal::SIGKILL);
    }
    let _ = kill(Pid::from_raw(pm), Signal::SIGKILL);
    Some(pm)
}

fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit(')')
                        .next()
                        .and_then(|rest| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
                })
                == Some(parent)
        })
        .collect()
}

/// The keeper process's main loop (`pgha fence-keeper`). Synchronous on
/// purpose: nothing here may wait on anything but the clock.
pub fn run_keeper(state_file: &Path, data_dir: &Path, first_agent_pid: i32) -> std::io::Result<()> {
    let lock_path = state_file.with_file_name("fence.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)?;
    // Held for the life of the process: a second keeper for the same data
    // directory finds it taken and exits.
    let Ok(_lock) = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
    else {
        return Ok(());
    };
    eprintln!(
        "fence keeper {} guarding {}",
        std::process::id(),
        data_dir.display()
    );
    loop {
        let state = std::fs::read_to_string(state_file)
            .ok()
            .and_then(|t| FenceState::parse(&t));
        match state {
            Some(FenceState::Armed { deadline_ms, .. }) if boottime_ms() >= deadline_ms => {
                if let Some(pid) = kill_postgres(data_dir) {
                    eprintln!(
                        "fence keeper: lease deadline passed {} ms ago without renewal; killed postmaster {pid}",
                        boottime_ms() - deadline_ms
                    );
                }
                let agent_pid = match state {
                    Some(FenceState::Armed { agent_pid, .. }) => agent_pid,
                    _ => first_agent_pid,
                };
                let _ = Fence {
                    path: state_file.to_path_buf(),
                }
                .set(FenceState::Disarmed { agent_pid });
            }
            Some(FenceState::Armed { .. }) => {}
            Some(FenceState::Disarmed { agent_pid }) if !pid_alive(agent_pid) => return Ok(()),
            Some(FenceState::Disarmed { .. }) => {}
            Some(FenceState::Exit) => return Ok(()),
            None if !pid_alive(first_agent_pid) => return Ok(()),
            None => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        for s in [
            FenceState::Armed {
                deadline_ms: 123456,
                agent_pid: 42,
            },
            FenceState::Disarmed { agent_pid: 7 },
            FenceState::Exit,
        ] {
            assert_eq!(FenceState::parse(&s.render()), Some(s));
        }
        assert_eq!(FenceState::parse("armed x 1"), None);
        assert_eq!(FenceState::parse(""), None);
    }
}
