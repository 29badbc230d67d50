//! Injecting and healing each [`Fault`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use rand::RngExt;
use rand::rngs::StdRng;

use super::{Fault, Topology};
use crate::clock::{log, now_ms};

/// What healing a fault takes, beyond removing every network rule
/// (always done).
pub enum Undo {
    Nothing,
    /// SIGCONT these processes.
    Continue(Vec<i32>),
    /// SIGCONT every process of node `i`'s namespace.
    ContinueNode(usize),
    /// Start node `i`'s agent again (it was killed with its node).
    RestartAgent(usize),
    RestartEtcd,
    RemoveFile(PathBuf),
}

/// Injects `fault` with `leader` (a node index) as the leader; returns a
/// description of the target and what healing needs.
pub async fn inject(
    topo: &Topology,
    fault: Fault,
    leader: usize,
    rng: &mut StdRng,
) -> anyhow::Result<(String, Undo)> {
    let net = &topo.net;
    let lead = &topo.nodes[leader];
    let others = || {
        topo.net
            .hosts()
            .into_iter()
            .filter(|h| h.ns != lead.ns)
            .collect::<Vec<_>>()
    };
    let name = lead.name.clone();
    Ok(match fault {
        Fault::IsolateLeader => {
            net.isolate(lead)?;
            (name, Undo::Nothing)
        }
        Fault::CutLeaderFromEtcd => {
            for e in &topo.etcd {
                net.cut(lead, &e.host)?;
            }
            (name, Undo::Nothing)
        }
        Fault::CutAllFromEtcd => {
            for node in &topo.nodes {
                for e in &topo.etcd {
                    net.cut(node, &e.host)?;
                }
            }
            ("nodes<->etcd".into(), Undo::Nothing)
        }
        Fault::CutReplicaFromLeader => {
            let replicas: Vec<usize> = (0..topo.nodes.len()).filter(|i| *i != leader).collect();
            let r = replicas[rng.random_range(0..replicas.len())];
            net.cut(lead, &topo.nodes[r])?;
            (format!("{}<->{name}", topo.nodes[r].name), Undo::Nothing)
        }
        Fault::LeaderDeaf => {
            for h in others() {
                net.cut_one_way(&h, lead)?;
            }
            (name, Undo::Nothing)
        }
        Fault::LeaderMute => {
            for h in others() {
                net.cut_one_way(lead, &h)?;
            }
            (name, Undo::Nothing)
        }
        Fault::LoseEtcdMember => {
            let k = rng.random_range(0..topo.etcd.len());
            net.isolate(&topo.etcd[k].host)?;
            (topo.etcd[k].host.name.clone(), Undo::Nothing)
        }
        Fault::LoseEtcdQuorum => {
            let keep = rng.random_range(0..topo.etcd.len());
            let mut lost = Vec::new();
            for (k, e) in topo.etcd.iter().enumerate() {
                if k != keep {
                    net.isolate(&e.host)?;
                    lost.push(e.host.name.clone());
                }
            }
            (lost.join("+"), Undo::Nothing)
        }
        Fault::StopAllEtcd => {
            for e in &topo.etcd {
                e.kill();
            }
            ("etcd".into(), Undo::RestartEtcd)
        }
        Fault::FreezeLeaderAgent => {
            let pid = topo
                .cluster
                .agent_pid(leader)
                .with_context(|| format!("{name}'s agent is not running"))?;
            stop(pid);
            (format!("{name} agent"), Undo::Continue(vec![pid]))
        }
        Fault::FreezeLeaderNode => {
            // Twice: a process forked between listing and signalling
            // (a new backend) is caught by the second pass.
            lead.signal_all(libc::SIGSTOP);
            lead.signal_all(libc::SIGSTOP);
            (name, Undo::ContinueNode(leader))
        }
        Fault::KillLeaderNode => {
            lead.signal_all(libc::SIGSTOP);
            lead.signal_all(libc::SIGSTOP);
            lead.signal_all(libc::SIGKILL);
            (name, Undo::RestartAgent(leader))
        }
        Fault::CrashLeaderPostgres => {
            topo.cluster.kill_postgres(leader)?;
            (name, Undo::Nothing)
        }
        Fault::FillLeaderDisk => {
            let file = topo.disks[leader].join("filler");
            let path = file.clone();
            let written = tokio::task::spawn_blocking(move || fill(&path)).await??;
            log(&format!(
                "  filled {} with {} MiB",
                file.display(),
                written >> 20
            ));
            (name, Undo::RemoveFile(file))
        }
        Fault::SlowLeaderNetwork => {
            if topo.netem {
                net.netem(lead, "delay 200ms 50ms loss 5%")?;
            } else {
                net.lossy(lead, 5)?;
                net.throttle(lead, "1mbit")?;
            }
            (name, Undo::Nothing)
        }
    })
}

pub async fn heal(topo: &Topology, undo: Undo) -> anyhow::Result<()> {
    topo.net.heal()?;
    match undo {
        Undo::Nothing => {}
        Undo::Continue(pids) => {
            for pid in pids {
                // SAFETY: kill(2) with a pid and a signal number.
                unsafe { libc::kill(pid, libc::SIGCONT) };
            }
        }
        Undo::ContinueNode(i) => {
            topo.nodes[i].signal_all(libc::SIGCONT);
        }
        Undo::RestartAgent(i) => {
            // The killed agent must be reaped before its slot frees up.
            let deadline = now_ms() + 10_000.0;
            while topo.cluster.agent_pid(i).is_some() && now_ms() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            topo.cluster.start_missing_agents()?;
        }
        Undo::RestartEtcd => {
            for e in &topo.etcd {
                e.start()?;
            }
        }
        Undo::RemoveFile(path) => {
            std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?
        }
    }
    Ok(())
}

fn stop(pid: i32) {
    // SAFETY: kill(2) with a pid and a signal number.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
}

/// Writes zeros to `path` until the file system is full; returns the bytes written.
fn fill(path: &std::path::Path) -> anyhow::Result<u64> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0u8; 1 << 20];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(written)
}
