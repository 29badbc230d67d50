//! The fence keeper process (`pgha fence-keeper`, started by the agent).
//!
//! Synchronous on purpose: no async runtime, no logging framework, nothing
//! to wait on but the clock. Every 20 ms it reads the state the agent
//! wrote; when an armed deadline passes, it kills PostgreSQL. It writes an
//! acknowledgement of what it read whenever that changes and at least every
//! [`KEEPER_BEAT_MS`], so the agent can tell a working keeper from a dead,
//! stopped or hung one.
//!
//! The agent also nudges it: its standard input is a pipe, and the agent
//! writes a byte after each new state, so a new deadline is acknowledged
//! at once rather than at the next poll. A new leader waits for that
//! acknowledgement before it promotes, so the nudge comes straight off
//! the failover time. The nudge only shortens a wait: the poll alone is
//! what the keeper's guarantees rest on, and a closed or missing pipe (a
//! dead agent, a keeper started by hand) leaves it polling.
//!
//! With `[vip]` it also removes the floating address when it fences,
//! right after the kill (see [`run_keeper`] for why in that order), so a
//! frozen agent cannot leave the address on a node that no longer leads.
//!
//! It works in the state directory through the descriptor it inherited
//! from the agent ([`KEEPER_DIR_FD`]), checked again here, so that neither
//! a renamed directory nor a planted symlink can redirect it.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use super::fence::{ACK_FILE, FenceState, KEEPER_DIR_FD, LOCK_FILE, STATE_FILE, render_ack};
use super::vip_net::FloatingAddress;
use crate::ha::lease::KEEPER_BEAT_MS;
use crate::safe_fs::{Owner, Strictness, TrustedDir};
use crate::util::boottime_ms;

const POLL: Duration = Duration::from_millis(20);

/// Runs the keeper until the agent says exit, or the agent is gone and
/// nothing is armed.
///
/// `vip` is the floating address (`address/prefix`, interface) to remove
/// when fencing. The kill comes first: it is what safety rests on (no
/// write may be acknowledged past the deadline), and it takes no more than
/// a few signals, while the netlink call could be slowed by a busy kernel.
/// Once PostgreSQL is dead, a client that still reaches the address gets
/// a refused connection at once and retries; the address is gone a
/// moment later, well inside `fence_margin`, before any other member can
/// take the lease and add it.
pub fn run_keeper(
    state_dir: &Path,
    data_dir: &Path,
    first_agent_pid: i32,
    vip: Option<(&str, &str)>,
) -> anyhow::Result<()> {
    let floating_address = match vip {
        Some((cidr, interface)) => {
            let (address, prefix_len) = crate::config::vip::parse_address(cidr)
                .map_err(|m| anyhow::anyhow!("--vip: {m}"))?;
            Some(FloatingAddress {
                address,
                prefix_len,
                interface: interface.to_string(),
            })
        }
        None => None,
    };
    // SAFETY: the agent passes the state directory as this descriptor
    // (see `Fence::spawn_keeper`); nothing else in this process owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(KEEPER_DIR_FD) };
    let dir = TrustedDir::from_fd(
        fd,
        state_dir.to_path_buf(),
        Owner::current(),
        Strictness::Private,
    )?;
    let lock = dir.open_rw(LOCK_FILE, 0o600)?;
    // Held for the life of the process. A keeper of an earlier agent may
    // still hold it: wait; the agent kills that one once this one runs.
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("cannot lock {LOCK_FILE}: {e}"))?;
    eprintln!(
        "fence keeper {} guarding {}",
        std::process::id(),
        data_dir.display()
    );
    let me = std::process::id() as i32;
    let mut acknowledged: Option<Option<FenceState>> = None;
    let mut last_beat = 0;
    // A removal that failed is retried every poll, and the keeper does not
    // exit before it succeeded.
    let mut address_to_remove = false;
    let mut nudges = Nudges::from_stdin();
    loop {
        if address_to_remove && let Some(a) = &floating_address {
            address_to_remove = !remove_address(a);
        }
        let state = dir
            .read_to_string(STATE_FILE)
            .ok()
            .flatten()
            .and_then(|t| FenceState::parse(&t));
        let now = boottime_ms();
        if acknowledged != Some(state) || now.saturating_sub(last_beat) >= KEEPER_BEAT_MS {
            // An acknowledgement that cannot be written is simply missing:
            // the agent then stops renewing, which is the safe side.
            if dir
                .write(ACK_FILE, render_ack(me, now, state).as_bytes(), 0o600)
                .is_ok()
            {
                acknowledged = Some(state);
                last_beat = now;
            }
        }
        match state {
            Some(FenceState::Armed {
                deadline_ms,
                agent_pid,
            }) if now >= deadline_ms => {
                if let Some(pid) = kill_postgres(data_dir) {
                    eprintln!(
                        "fence keeper: lease deadline passed {} ms ago without renewal; killed postmaster {pid}",
                        now - deadline_ms
                    );
                }
                if let Some(a) = &floating_address {
                    address_to_remove = !remove_address(a);
                }
                let _ = dir.write(
                    STATE_FILE,
                    FenceState::Disarmed { agent_pid }.render().as_bytes(),
                    0o600,
                );
            }
            Some(FenceState::Armed { .. }) => {}
            _ if address_to_remove => {}
            // Nothing to protect and nobody to protect it for: the state
            // names the agent that disarmed (or, after a fencing, armed)
            // it, which after an agent restart is the previous one. The
            // agent that started this keeper counts too, or a keeper
            // started by a new agent would exit at once, be restarted,
            // and exit again, hundreds of times a second.
            Some(FenceState::Disarmed { agent_pid })
                if !pid_alive(agent_pid) && !pid_alive(first_agent_pid) =>
            {
                return Ok(());
            }
            Some(FenceState::Disarmed { .. }) => {}
            Some(FenceState::Exit) => return Ok(()),
            None if !pid_alive(first_agent_pid) => return Ok(()),
            None => {}
        }
        nudges.wait(POLL);
    }
}

/// Removes the floating address; true when it is gone.
fn remove_address(a: &FloatingAddress) -> bool {
    match a.remove() {
        Ok(true) => {
            eprintln!("fence keeper: removed the floating address {}", a.cidr());
            true
        }
        Ok(false) => true,
        Err(e) => {
            eprintln!("fence keeper: {:#}; retrying", anyhow::Error::new(e));
            false
        }
    }
}

fn pid_alive(pid: i32) -> bool {
    pid > 0
        && procfs::process::Process::new(pid)
            .and_then(|p| p.stat())
            .is_ok_and(|s| s.state != 'Z')
}

/// Kills the postmaster of `data_dir` and every child it has: the
/// postmaster is stopped first so it cannot fork replacements, then the
/// children and the postmaster are SIGKILLed. No backend gets to send one
/// more reply. Returns the postmaster pid that was killed.
///
/// Only processes of the data directory's owner are signalled (see
/// [`crate::postgres::ctl::postmaster_pid`]): `postmaster.pid` is written by
/// the PostgreSQL account, and must not steer a root keeper's SIGKILL
/// elsewhere.
pub fn kill_postgres(data_dir: &Path) -> Option<i32> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let pm = crate::postgres::ctl::postmaster_pid(data_dir)?;
    let owner = procfs::process::Process::new(pm).ok()?.uid().ok()?;
    let _ = kill(Pid::from_raw(pm), Signal::SIGSTOP);
    for child in children_of(pm, owner) {
        let _ = kill(Pid::from_raw(child), Signal::SIGKILL);
    }
    let _ = kill(Pid::from_raw(pm), Signal::SIGKILL);
    Some(pm)
}

/// Processes whose parent is `parent` and which run as `uid`.
fn children_of(parent: i32, uid: u32) -> Vec<i32> {
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.filter_map(Result::ok)
        .filter(|p| p.stat().is_ok_and(|s| s.ppid == parent) && p.uid().ok() == Some(uid))
        .map(|p| p.pid)
        .collect()
}

/// The agent's nudges (see the module comment): the read end of a pipe.
struct Nudges {
    /// `None` once the pipe reached its end or failed: plain sleeps from
    /// then on, or a closed pipe (always readable) would make a busy loop.
    pipe: Option<OwnedFd>,
}

impl Nudges {
    /// The keeper's standard input, where the agent puts the pipe. Only a
    /// pipe counts, made non-blocking here: a keeper started by hand with
    /// a terminal, a file or `/dev/zero` there must neither stop on a read
    /// nor spin, and plainly sleeps.
    fn from_stdin() -> Nudges {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        use nix::sys::stat::{SFlag, fstat};
        use std::os::fd::AsFd;
        let pipe = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .ok()
            .filter(|fd| {
                fstat(fd).is_ok_and(|st| {
                    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFIFO
                })
            })
            .filter(|fd| fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).is_ok());
        Nudges { pipe }
    }

    /// Waits up to `timeout`, less when a nudge arrives.
    fn wait(&mut self, timeout: Duration) {
        use nix::errno::Errno;
        use nix::poll::{PollFd, PollFlags, poll};
        use std::os::fd::AsFd;
        let Some(pipe) = &self.pipe else {
            std::thread::sleep(timeout);
            return;
        };
        let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
        // At least 1 ms: a zero timeout would make the keeper spin.
        let ms = u16::try_from(timeout.as_millis().max(1)).unwrap_or(u16::MAX);
        let open = match poll(&mut fds, ms) {
            Ok(0) | Err(Errno::EINTR) => true,
            // Drain what is there, until the non-blocking pipe answers
            // EAGAIN. The end of the pipe (the agent is gone) or any other
            // error ends the nudges.
            Ok(_) => loop {
                let mut buf = [0u8; 64];
                match nix::unistd::read(pipe.as_fd(), &mut buf) {
                    Ok(1..) | Err(Errno::EINTR) => continue,
                    Err(Errno::EAGAIN) => break true,
                    Ok(0) | Err(_) => break false,
                }
            },
            Err(_) => false,
        };
        if !open {
            self.pipe = None;
            std::thread::sleep(timeout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn pipe() -> (Nudges, std::fs::File) {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .unwrap();
        (Nudges { pipe: Some(read) }, std::fs::File::from(write))
    }

    #[test]
    fn a_nudge_ends_the_wait() {
        use std::io::Write;
        let (mut nudges, mut agent) = pipe();
        agent.write_all(&[1, 1, 1]).unwrap();
        let started = Instant::now();
        nudges.wait(Duration::from_secs(30));
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(nudges.pipe.is_some());
        // All three bytes were drained: the next wait runs its course.
        let started = Instant::now();
        nudges.wait(Duration::from_millis(50));
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(nudges.pipe.is_some());
    }

    #[test]
    fn a_closed_pipe_falls_back_to_sleeping() {
        let (mut nudges, agent) = pipe();
        drop(agent);
        for _ in 0..3 {
            let started = Instant::now();
            nudges.wait(Duration::from_millis(30));
            assert!(started.elapsed() >= Duration::from_millis(30));
            assert!(nudges.pipe.is_none());
        }
    }
}
