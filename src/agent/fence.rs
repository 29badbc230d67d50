//! Self-fencing: a writable primary stops before its lease can expire.
//!
//! The agent cannot guarantee this on its own: a frozen (SIGSTOP), swapped
//! out or killed agent executes nothing. So a second, tiny process — the
//! fence keeper ([`super::fence_keeper`]) — watches a deadline the agent
//! writes after every successful lease renewal. If the clock
//! (`CLOCK_BOOTTIME`, shared by every process on the host) passes the
//! deadline and no newer one has been written, the keeper kills the
//! postmaster and all its backends at once.
//!
//! The deadline is `renewal sent + ttl - fence_margin`: etcd received the
//! renewal after it was sent, so the lease outlives the deadline by at
//! least `fence_margin`, and no other member can hold the lease before the
//! old primary is dead.
//!
//! The keeper is itself watched. It acknowledges every state it reads, and
//! rewrites the acknowledgement as a heartbeat; the agent counts a lease as
//! usable only up to a deadline a keeper acknowledged, renews only while
//! its keeper is alive and making progress, and restarts a keeper that
//! exited, was stopped, or went silent ([`FenceSupervisor`]).
//!
//! Every file lives in the state directory, which belongs to the agent's
//! account and which the PostgreSQL OS user cannot write; all access goes
//! through one checked directory descriptor ([`TrustedDir`]).
//!
//! Not covered: a frozen *machine* (both processes stop). That is the job of
//! a hardware or kernel watchdog; see docs/architecture.md.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::vip_net::FloatingAddress;
use crate::ha::lease::{KeeperAck, KeeperView};
use crate::safe_fs::{SafeFsError, TrustedDir};

/// File names inside the state directory.
pub const STATE_FILE: &str = "fence.state";
pub const ACK_FILE: &str = "fence.ack";
pub const LOCK_FILE: &str = "fence.lock";
pub const LOG_FILE: &str = "fence-keeper.log";

/// The descriptor number under which the keeper inherits the state
/// directory.
pub const KEEPER_DIR_FD: i32 = 3;

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
        Self::parse_words(&mut text.split_whitespace())
    }

    fn parse_words<'a>(words: &mut impl Iterator<Item = &'a str>) -> Option<FenceState> {
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

    fn armed_deadline(&self) -> Option<u64> {
        match self {
            FenceState::Armed { deadline_ms, .. } => Some(*deadline_ms),
            _ => None,
        }
    }
}

/// The keeper's acknowledgement: `ack <keeper pid> <beat ms> <state>`.
pub fn render_ack(keeper_pid: i32, beat_ms: u64, state: Option<FenceState>) -> String {
    let state = state.map_or_else(|| "none\n".to_string(), |s| s.render());
    format!("ack {keeper_pid} {beat_ms} {state}")
}

pub fn parse_ack(text: &str) -> Option<KeeperAck> {
    let mut words = text.split_whitespace();
    if words.next()? != "ack" {
        return None;
    }
    let keeper_pid = words.next()?.parse().ok()?;
    let beat_ms = words.next()?.parse().ok()?;
    let state = FenceState::parse_words(&mut words);
    Some(KeeperAck {
        keeper_pid,
        beat_ms,
        armed_deadline_ms: state.and_then(|s| s.armed_deadline()),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("cannot write the fence state")]
    Write(#[source] SafeFsError),
    #[error("cannot start the fence keeper")]
    Spawn(#[source] std::io::Error),
    #[error("cannot open the fence keeper's log")]
    Log(#[source] SafeFsError),
}

/// The agent's side: writes states, reads acknowledgements, and keeps a
/// keeper running.
#[derive(Clone, Debug)]
pub struct Fence {
    dir: Arc<TrustedDir>,
    supervisor: Arc<FenceSupervisor>,
    /// `[vip]`: the keeper removes this address when it fences.
    floating_address: Option<FloatingAddress>,
}

impl Fence {
    pub fn new(dir: Arc<TrustedDir>) -> Self {
        Fence {
            dir,
            supervisor: Arc::new(FenceSupervisor::default()),
            floating_address: None,
        }
    }

    /// Hands the floating address to every keeper this fence starts.
    pub fn with_floating_address(mut self, address: Option<FloatingAddress>) -> Self {
        self.floating_address = address;
        self
    }

    pub fn set(&self, state: FenceState) -> Result<(), FenceError> {
        self.dir
            .write(STATE_FILE, state.render().as_bytes(), 0o600)
            .map_err(FenceError::Write)?;
        self.supervisor.nudge();
        Ok(())
    }

    /// Arms the keeper with a new deadline. An error is the caller's to act
    /// on: the new deadline is then never acknowledged, and the lease
    /// stops being usable at the previous one.
    pub fn arm(&self, deadline_ms: u64) -> Result<(), FenceError> {
        self.set(FenceState::Armed {
            deadline_ms,
            agent_pid: std::process::id() as i32,
        })
    }

    pub fn disarm(&self) {
        if let Err(e) = self.set(FenceState::Disarmed {
            agent_pid: std::process::id() as i32,
        }) {
            tracing::error!(error = %crate::util::chain(&e), "cannot disarm the fence keeper");
        }
    }

    pub fn current(&self) -> Option<FenceState> {
        self.dir
            .read_to_string(STATE_FILE)
            .ok()
            .flatten()
            .and_then(|t| FenceState::parse(&t))
    }

    pub fn ack(&self) -> Option<KeeperAck> {
        self.dir
            .read_to_string(ACK_FILE)
            .ok()
            .flatten()
            .and_then(|t| parse_ack(&t))
    }

    /// The keeper as the agent sees it now.
    pub fn view(&self) -> KeeperView {
        let (pid, stopped) = self.supervisor.child();
        KeeperView {
            supervised_pid: pid,
            stopped,
            ack: self.ack(),
        }
    }

    /// Starts the keeper and a thread that restarts it whenever it exits
    /// or is stopped. A keeper left by an earlier agent for the same state
    /// directory is replaced: the new one waits for its lock, then the old
    /// one is killed, so a keeper guards at every instant.
    pub fn start_keeper(&self, data_dir: &Path) -> Result<(), FenceError> {
        let previous = self.ack().map(|a| a.keeper_pid);
        let child = self.spawn_keeper(data_dir)?;
        let pid = child.id() as i32;
        self.supervisor.set_child(Some(pid), false);
        if let Some(old) = previous.filter(|&p| p != pid)
            && is_our_keeper(old)
        {
            tracing::info!(
                old,
                new = pid,
                "replacing the fence keeper of a previous agent"
            );
            kill(old, nix::sys::signal::Signal::SIGKILL);
        }
        let fence = self.clone();
        let data_dir = data_dir.to_path_buf();
        std::thread::Builder::new()
            .name("fence-supervisor".into())
            .spawn(move || fence.supervise(child, &data_dir))
            .map_err(FenceError::Spawn)?;
        Ok(())
    }

    fn spawn_keeper(&self, data_dir: &Path) -> Result<std::process::Child, FenceError> {
        let log = self
            .dir
            .open_append(LOG_FILE, 0o600)
            .map_err(FenceError::Log)?;
        let dir_fd = self.dir.try_clone_fd().map_err(FenceError::Spawn)?;
        let raw = dir_fd.as_raw_fd();
        // /proc/self/exe still works after the binary was replaced on disk
        // (a package upgrade): the keeper is always this very program.
        let mut cmd = std::process::Command::new("/proc/self/exe");
        cmd.arg("fence-keeper")
            .arg("--state-dir")
            .arg(self.dir.path())
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--agent-pid")
            .arg(std::process::id().to_string());
        if let Some(a) = &self.floating_address {
            cmd.arg("--vip")
                .arg(a.cidr())
                .arg("--vip-interface")
                .arg(&a.interface);
        }
        // Its standard input is the nudge pipe (see `fence_keeper`). Both
        // ends are close-on-exec, so no other child inherits them; the
        // read end becomes descriptor 0 of the keeper alone.
        let (nudge_read, nudge_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(|e| FenceError::Spawn(e.into()))?;
        cmd.stdin(std::process::Stdio::from(nudge_read))
            .stdout(log.try_clone().map_err(FenceError::Spawn)?)
            .stderr(log);
        // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork
        // and exec. dup2 clears close-on-exec on the copy; when the
        // descriptor already has the target number, clear it by hand.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                if raw == KEEPER_DIR_FD {
                    if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(raw, KEEPER_DIR_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().map_err(FenceError::Spawn)?;
        drop(dir_fd);
        // Replaces (closes) the pipe of a keeper this one replaces.
        *self.supervisor.nudge_pipe.lock().unwrap() = Some(std::fs::File::from(nudge_write));
        Ok(child)
    }

    /// The supervisor thread: waits for the keeper's state changes (exit,
    /// stop, continue) as its parent, so a SIGKILL or SIGSTOP is noticed
    /// at once, not at the next loop.
    fn supervise(&self, mut child: std::process::Child, data_dir: &Path) {
        use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
        loop {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let status = waitpid(pid, Some(WaitPidFlag::WUNTRACED | WaitPidFlag::WCONTINUED));
            let shutting_down = self.supervisor.shutting_down.load(Ordering::SeqCst);
            match status {
                Ok(WaitStatus::Stopped(_, sig)) => {
                    self.supervisor.set_child(Some(pid.as_raw()), true);
                    tracing::error!(pid = pid.as_raw(), signal = ?sig, "the fence keeper was stopped; replacing it");
                    kill(pid.as_raw(), nix::sys::signal::Signal::SIGKILL);
                    continue;
                }
                Ok(WaitStatus::Continued(_)) => {
                    self.supervisor.set_child(Some(pid.as_raw()), false);
                    continue;
                }
                Ok(WaitStatus::StillAlive) => continue,
                Ok(other) if shutting_down => {
                    tracing::debug!(status = ?other, "fence keeper exited");
                    self.supervisor.set_child(None, false);
                    return;
                }
                Ok(other) => {
                    tracing::error!(pid = pid.as_raw(), status = ?other, "the fence keeper exited; starting another");
                }
                Err(e) => {
                    // ECHILD: reaped elsewhere. Either way it is gone.
                    if shutting_down {
                        self.supervisor.set_child(None, false);
                        return;
                    }
                    tracing::error!(pid = pid.as_raw(), error = %e, "lost track of the fence keeper; starting another");
                }
            }
            self.supervisor.set_child(None, false);
            child = loop {
                if self.supervisor.shutting_down.load(Ordering::SeqCst) {
                    return;
                }
                match self.spawn_keeper(data_dir) {
                    Ok(c) => break c,
                    Err(e) => {
                        tracing::error!(error = %crate::util::chain(&e), "cannot restart the fence keeper; retrying");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            };
            self.supervisor.set_child(Some(child.id() as i32), false)
        }
    }

    /// Kills a keeper that stopped making progress; the supervisor thread
    /// then starts another. Only a process that is still a fence keeper
    /// of this account: the supervisor may have reaped the child a moment
    /// ago, and its number may already belong to another process.
    pub fn replace_hung_keeper(&self) {
        let (pid, _) = self.supervisor.child();
        if let Some(pid) = pid
            && is_our_keeper(pid)
        {
            tracing::error!(pid, "the fence keeper stopped acknowledging; replacing it");
            kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// Unit tests of the agent's runtime stand in for the keeper process:
    /// they name its pid and write its acknowledgements themselves.
    #[cfg(test)]
    pub(crate) fn pretend_keeper(&self, pid: Option<i32>, stopped: bool) {
        self.supervisor.set_child(pid, stopped);
    }

    /// Clean shutdown: the keeper is told to exit and is not restarted.
    pub fn exit(&self) {
        self.supervisor.shutting_down.store(true, Ordering::SeqCst);
        if let Err(e) = self.set(FenceState::Exit) {
            tracing::error!(error = %crate::util::chain(&e), "cannot tell the fence keeper to exit");
        }
    }
}

/// The keeper child the supervisor thread watches.
#[derive(Debug, Default)]
struct FenceSupervisor {
    child: Mutex<(Option<i32>, bool)>,
    shutting_down: AtomicBool,
    /// The write end of the current keeper's nudge pipe.
    nudge_pipe: Mutex<Option<std::fs::File>>,
}

impl FenceSupervisor {
    fn child(&self) -> (Option<i32>, bool) {
        *self.child.lock().unwrap()
    }
    fn set_child(&self, pid: Option<i32>, stopped: bool) {
        *self.child.lock().unwrap() = (pid, stopped);
    }

    /// Wakes the keeper to read the state now. Best effort: a full pipe
    /// (EAGAIN) already holds a nudge it has not read, a dead keeper's
    /// pipe answers EPIPE (Rust programs ignore SIGPIPE), and without a
    /// pipe the keeper reads the state at its next poll anyway.
    fn nudge(&self) {
        use std::io::Write;
        if let Some(pipe) = self.nudge_pipe.lock().unwrap().as_mut() {
            let _ = pipe.write(&[1]);
        }
    }
}

fn kill(pid: i32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
}

/// Whether `pid` is a fence keeper of this program running as this
/// account, so that replacing it never signals an unrelated process that
/// reused the number.
fn is_our_keeper(pid: i32) -> bool {
    let Ok(p) = procfs::process::Process::new(pid) else {
        return false;
    };
    p.uid().ok() == Some(nix::unistd::geteuid().as_raw())
        && p.cmdline()
            .is_ok_and(|args| args.iter().any(|a| a == "fence-keeper"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hung keeper is killed only while its number still names a fence
    /// keeper of this account; any other process with that number lives.
    #[test]
    fn a_hung_keeper_is_replaced_but_no_other_process() {
        use crate::safe_fs::{Owner, Strictness};
        let tmp = tempfile::tempdir().unwrap();
        let dir = TrustedDir::create(
            &tmp.path().join("state"),
            Owner::current(),
            0o700,
            Strictness::Private,
        )
        .unwrap();
        let fence = Fence::new(Arc::new(dir));
        // `sh -c CMD NAME`: NAME is only the script's $0, but it is in the
        // command line, which is what identifies a keeper. (`; :` keeps the
        // shell from replacing itself with `sleep`.)
        let spawn = |name: &str| {
            let child = std::process::Command::new("sh")
                .args(["-c", "sleep 60; :", name])
                .spawn()
                .unwrap();
            // Until the new program runs, the command line is empty.
            let started = |pid: u32| {
                procfs::process::Process::new(pid as i32)
                    .and_then(|p| p.cmdline())
                    .is_ok_and(|args| !args.is_empty())
            };
            for _ in 0..500 {
                if started(child.id()) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            child
        };
        // SIGKILL is sent before `replace_hung_keeper` returns: a killed
        // process is gone within moments.
        let wait = |child: &mut std::process::Child, tries: u32| {
            for _ in 0..tries {
                if let Some(status) = child.try_wait().unwrap() {
                    return Some(status);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            None
        };
        let mut other = spawn("not-a-keeper");
        fence.pretend_keeper(Some(other.id() as i32), false);
        fence.replace_hung_keeper();
        assert_eq!(
            wait(&mut other, 50),
            None,
            "an unrelated process was killed"
        );
        other.kill().unwrap();
        other.wait().unwrap();

        let mut keeper = spawn("fence-keeper");
        fence.pretend_keeper(Some(keeper.id() as i32), false);
        fence.replace_hung_keeper();
        let status = wait(&mut keeper, 500).expect("the hung keeper was not killed");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

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

    #[test]
    fn acknowledgements_round_trip() {
        let armed = FenceState::Armed {
            deadline_ms: 99,
            agent_pid: 4,
        };
        assert_eq!(
            parse_ack(&render_ack(12, 5000, Some(armed))),
            Some(KeeperAck {
                keeper_pid: 12,
                beat_ms: 5000,
                armed_deadline_ms: Some(99)
            })
        );
        for s in [
            None,
            Some(FenceState::Exit),
            Some(FenceState::Disarmed { agent_pid: 4 }),
        ] {
            assert_eq!(
                parse_ack(&render_ack(12, 5000, s))
                    .unwrap()
                    .armed_deadline_ms,
                None
            );
        }
        assert_eq!(parse_ack("armed 1 2"), None);
        assert_eq!(parse_ack("ack x 1 exit"), None);
    }
}
