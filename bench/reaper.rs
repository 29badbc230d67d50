//! Prompt reaping of orphaned PostgreSQL processes.
//!
//! The agent starts PostgreSQL through `pg_ctl`, which exits once the
//! postmaster is forked, so the postmaster is an orphan adopted by the
//! nearest "child subreaper" or by PID 1. When it is SIGKILLed it stays a
//! zombie until that process reaps it, and a zombie still answers
//! `kill(pid, 0)`: PostgreSQL then refuses to start on the data directory
//! ("lock file postmaster.pid already exists ... Is another postmaster
//! running?"). systemd reaps at once; the init of some sandboxes and
//! containers reaps late (seconds) or never, which would charge the init's
//! latency to pgha's crash recovery. The bench therefore makes itself the
//! subreaper of everything it starts and reaps orphans (postmasters, their
//! backends, fence keepers whose agent died) as soon as they die, like a
//! normal host's init would.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

/// Makes this process adopt its orphaned descendants. Call before
/// starting any child.
pub fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn is_subreaper() -> bool {
    let mut flag: libc::c_int = 0;
    // SAFETY: PR_GET_CHILD_SUBREAPER writes one int through the pointer.
    let rc = unsafe {
        libc::prctl(
            libc::PR_GET_CHILD_SUBREAPER,
            &mut flag as *mut libc::c_int,
            0,
            0,
            0,
        )
    };
    rc == 0 && flag != 0
}

/// Pids of the children the bench spawned itself: their owners wait for
/// them, and reaping one here would steal its exit status.
static OWN_CHILDREN: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// Spawns a child the bench will wait for itself. The registry lock is
/// held across the spawn so that the reaper cannot mistake a child that
/// exits at once for an orphan.
pub fn spawn_own(cmd: &mut tokio::process::Command) -> std::io::Result<tokio::process::Child> {
    let mut own = OWN_CHILDREN.lock().unwrap();
    let child = cmd.spawn()?;
    if let Some(pid) = child.id() {
        own.insert(pid as i32);
    }
    Ok(child)
}

/// Reaps adopted zombies (orphans: not spawned by the bench itself) on
/// every SIGCHLD, plus once a second in case a signal was missed. Each
/// pass scans /proc (this kernel has no /proc/PID/task/TID/children),
/// which is why it does not simply poll.
pub fn spawn() {
    tokio::spawn(async {
        let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
        {
            Ok(s) => s,
            Err(e) => {
                crate::clock::log(&format!("no SIGCHLD handler, orphans reaped late: {e}"));
                return;
            }
        };
        let me = std::process::id() as i32;
        loop {
            tokio::select! {
                _ = sigchld.recv() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let own = OWN_CHILDREN.lock().unwrap();
            for pid in zombie_children(me) {
                if !own.contains(&pid) && !is_waited_tool(pid) {
                    let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
                }
            }
        }
    });
}

/// The short-lived `ip`, `nft` and `tc` commands of the fault harness
/// (bench/netns.rs, shared with the integration tests and therefore unable
/// to register its children here) are waited for by whoever ran them.
/// These names never belong to an orphan: `ip netns exec` execs its
/// program, so long-lived processes carry the program's name.
fn is_waited_tool(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|c| matches!(c.trim(), "ip" | "nft" | "tc"))
}

fn zombie_children(me: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let mut fields = stat
                .rsplit_once(')')
                .map(|(_, r)| r)
                .unwrap_or("")
                .split_whitespace();
            fields.next() == Some("Z")
                && fields.next().and_then(|p| p.parse::<i32>().ok()) == Some(me)
        })
        .collect()
}
