//! A private network of Linux network namespaces for fault tests.
//!
//! Every host is a namespace with one interface, `eth0`, whose peer sits
//! on a bridge inside a "switch" namespace of the same run, with an
//! address in `10.77.0.0/24`. Nothing is attached to the caller's own
//! namespace, so traffic between hosts never leaves the namespaces a
//! [`Net`] creates, and two runs (each with its own switch) can use the
//! same subnet without seeing each other.
//!
//! Faults are nftables drop rules in the hosts' own namespaces
//! ([`Net::isolate`], [`Net::cut`], [`Net::cut_one_way`], random loss
//! with [`Net::lossy`]) and qdiscs on their `eth0` ([`Net::netem`], or
//! [`Net::throttle`] where the kernel lacks `sch_netem`); [`Net::heal`]
//! removes them all.
//!
//! Namespace names are `<tag>-<pid>-<n>-<host>` (`n` counts the networks
//! of one process), so two runs never collide
//! and a later run can remove what a dead run left ([`Net::new`] does).
//! Teardown happens in `Drop` (normal exit, error, panic) and, for a
//! process that dies without unwinding (SIGKILL, a signal's default
//! action), in a watchdog child: a shell that waits for its stdin (a pipe
//! from this process) to close and then deletes the run's namespaces.
//! Ctrl-C therefore needs no handler here; the program's own handler, if
//! any, just has to let `Net` drop.
//!
//! Shared by `pgha-bench chaos` and the integration tests (included there
//! with `#[path]`), so it uses nothing but std, libc and thiserror. Needs
//! root, iproute2 (`ip`, `tc`) and nftables (`nft`).

// Each user (the bench, the tests) needs a different subset.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

/// The private subnet; hosts get `.10`, `.11`, ... in creation order.
pub const SUBNET_PREFIX: [u8; 3] = [10, 77, 0];
pub const PREFIX_LEN: u8 = 24;
/// The interface of every host (its peer is on the switch's bridge).
pub const HOST_IF: &str = "eth0";
/// The nftables table holding a host's drop rules.
const FAULT_TABLE: &str = "pgha_fault";

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot run `{command}` (is it installed?)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no host named {0}")]
    UnknownHost(String),
    #[error("the subnet is full (at most 240 hosts)")]
    SubnetFull,
}

/// One namespace of the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    /// The namespace's name (`ip netns exec <ns> ...`).
    pub ns: String,
    pub addr: Ipv4Addr,
}

impl Host {
    /// `program` run inside this host's namespace through
    /// `ip netns exec` (which execs it: the pid is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.arg("netns").arg("exec").arg(&self.ns).arg(program);
        c
    }

    /// Moves the *calling thread* into this host's namespace: every socket
    /// it creates from now on, and every child it forks, lives there. Used
    /// to run a client (e.g. a tokio runtime's worker threads, from
    /// `on_thread_start`) inside the network without a subprocess.
    pub fn enter(&self) -> Result<(), NetError> {
        let path = format!("/run/netns/{}", self.ns);
        let file = std::fs::File::open(&path).map_err(|source| NetError::Io {
            what: format!("open {path}"),
            source,
        })?;
        // SAFETY: setns takes a valid fd and a flag; it only changes this
        // thread's network namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(NetError::Io {
                what: format!("setns into {}", self.ns),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Every process whose network namespace is this host's (read from
    /// /proc): what "the machine" is when a whole node is frozen or killed.
    pub fn pids(&self) -> Vec<i32> {
        let Ok(meta) = std::fs::metadata(format!("/run/netns/{}", self.ns)) else {
            return Vec::new();
        };
        let want = format!("net:[{}]", meta.ino());
        let me = std::process::id() as i32;
        std::fs::read_dir("/proc")
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                    .filter(|pid| *pid != me)
                    .filter(|pid| {
                        std::fs::read_link(format!("/proc/{pid}/ns/net"))
                            .is_ok_and(|l| l.to_string_lossy() == want)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sends `signal` to every process of the namespace (see [`pids`](Host::pids)).
    pub fn signal_all(&self, signal: libc::c_int) -> usize {
        let pids = self.pids();
        for pid in &pids {
            // SAFETY: kill(2) with a pid and a signal number.
            unsafe { libc::kill(*pid, signal) };
        }
        pids.len()
    }
}

/// The network of one run; see the module docs.
pub struct Net {
    /// `<tag>-<pid>-<n>`: every namespace of this network starts with it.
    prefix: String,
    switch_ns: String,
    hosts: Mutex<Vec<Host>>,
    /// Deletes the namespaces if this process dies without dropping `Net`.
    watchdog: Mutex<Option<Child>>,
}

impl Net {
    /// Creates the switch namespace with its bridge, after removing the
    /// namespaces of dead runs that used the same `tag`. `tag`: a short
    /// `[a-z0-9]` word such as `chaos`.
    pub fn new(tag: &str) -> Result<Net, NetError> {
        remove_stale(tag);
        // The counter keeps two networks of one process (parallel tests)
        // apart.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("{tag}-{}-{n}", std::process::id());
        let switch_ns = format!("{prefix}-sw");
        let net = Net {
            watchdog: Mutex::new(Some(spawn_watchdog(&prefix)?)),
            prefix,
            switch_ns,
            hosts: Mutex::new(Vec::new()),
        };
        run(&["ip", "netns", "add", &net.switch_ns])?;
        let sw = net.switch_ns.as_str();
        run(&["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", sw, "link", "set", "br0", "up"])?;
        Ok(net)
    }

    /// `<tag>-<pid>-<n>`, the prefix of every namespace of this network.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A new host on the switch with the next free address, loopback up,
    /// and an empty nftables table for faults.
    pub fn add_host(&self, name: &str) -> Result<Host, NetError> {
        let mut hosts = self.hosts.lock().unwrap();
        let index = hosts.len();
        if index >= 240 {
            return Err(NetError::SubnetFull);
        }
        let [a, b, c] = SUBNET_PREFIX;
        let host = Host {
            name: name.to_string(),
            ns: format!("{}-{name}", self.prefix),
            addr: Ipv4Addr::new(a, b, c, 10 + index as u8),
        };
        let ns = host.ns.as_str();
        let sw = self.switch_ns.as_str();
        // Interface names are per namespace: the switch side only has to
        // be unique within this run's switch.
        let port = format!("p{index}");
        run(&["ip", "netns", "add", ns])?;
        run(&[
            "ip", "-n", sw, "link", "add", &port, "type", "veth", "peer", "name", HOST_IF, "netns",
            ns,
        ])?;
        run(&["ip", "-n", sw, "link", "set", &port, "master", "br0", "up"])?;
        let cidr = format!("{}/{PREFIX_LEN}", host.addr);
        run(&["ip", "-n", ns, "addr", "add", &cidr, "dev", HOST_IF])?;
        run(&["ip", "-n", ns, "link", "set", HOST_IF, "up"])?;
        run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        let ruleset = format!(
            "table inet {FAULT_TABLE} {{\n\
             chain input {{ type filter hook input priority 0; policy accept; }}\n\
             chain output {{ type filter hook output priority 0; policy accept; }}\n\
             }}\n"
        );
        run_stdin(&["ip", "netns", "exec", ns, "nft", "-f", "-"], &ruleset)?;
        hosts.push(host.clone());
        Ok(host)
    }

    pub fn hosts(&self) -> Vec<Host> {
        self.hosts.lock().unwrap().clone()
    }

    pub fn host(&self, name: &str) -> Result<Host, NetError> {
        self.hosts
            .lock()
            .unwrap()
            .iter()
            .find(|h| h.name == name)
            .cloned()
            .ok_or_else(|| NetError::UnknownHost(name.to_string()))
    }

    /// Drops every packet `host` sends or receives on its interface
    /// (its loopback and unix sockets keep working, like a pulled cable).
    pub fn isolate(&self, host: &Host) -> Result<(), NetError> {
        add_rule(host, &format!("input iifname \"{HOST_IF}\" drop"))?;
        add_rule(host, &format!("output oifname \"{HOST_IF}\" drop"))
    }

    /// Drops all traffic between `a` and `b`, both ways.
    pub fn cut(&self, a: &Host, b: &Host) -> Result<(), NetError> {
        self.cut_one_way(a, b)?;
        self.cut_one_way(b, a)
    }

    /// Drops every packet `from` sends to `to` (`to` can still reach
    /// `from`, though TCP replies of course get lost). The rule sits at
    /// the receiver's input so that the sender sees nothing unusual.
    pub fn cut_one_way(&self, from: &Host, to: &Host) -> Result<(), NetError> {
        add_rule(to, &format!("input ip saddr {} drop", from.addr))
    }

    /// netem on `host`'s interface (outgoing traffic), e.g.
    /// `"delay 200ms 50ms loss 5%"`; replaces any earlier netem.
    pub fn netem(&self, host: &Host, spec: &str) -> Result<(), NetError> {
        let mut args = vec![
            "ip", "netns", "exec", &host.ns, "tc", "qdisc", "replace", "dev", HOST_IF, "root",
            "netem",
        ];
        args.extend(spec.split_whitespace());
        run(&args)
    }

    /// Drops `percent` % of the packets `host` sends, at random, with
    /// nftables: packet loss on kernels without `sch_netem` (netem's
    /// `loss` needs that module).
    pub fn lossy(&self, host: &Host, percent: u8) -> Result<(), NetError> {
        let sample = match percent {
            0 => return Ok(()),
            // numgen's values are 0..=99: "< 100" is out of its range.
            100.. => String::new(),
            p => format!("numgen random mod 100 < {p}"),
        };
        add_rule(host, &format!("output oifname \"{HOST_IF}\" {sample} drop"))
    }

    /// Limits what `host` sends to `rate` (tc syntax, e.g. `"1mbit"`) with
    /// a token bucket: a slow link where netem is unavailable. Queueing
    /// behind the bucket (up to 400 ms) also delays packets.
    pub fn throttle(&self, host: &Host, rate: &str) -> Result<(), NetError> {
        run(&[
            "ip", "netns", "exec", &host.ns, "tc", "qdisc", "replace", "dev", HOST_IF, "root",
            "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms",
        ])
    }

    /// True when this kernel has netem (`sch_netem`), which
    /// [`netem`](Net::netem) needs. Probed on `host`, left unchanged.
    pub fn has_netem(&self, host: &Host) -> bool {
        let ok = self.netem(host, "delay 1ms").is_ok();
        let _ = run(&[
            "ip", "netns", "exec", &host.ns, "tc", "qdisc", "del", "dev", HOST_IF, "root",
        ]);
        ok
    }

    /// Removes every drop rule and qdisc (netem, token bucket) of every host.
    pub fn heal(&self) -> Result<(), NetError> {
        for host in self.hosts() {
            for chain in ["input", "output"] {
                run(&[
                    "ip",
                    "netns",
                    "exec",
                    &host.ns,
                    "nft",
                    "flush",
                    "chain",
                    "inet",
                    FAULT_TABLE,
                    chain,
                ])?;
            }
            // Fails when there is no netem qdisc, which is fine.
            let _ = run(&[
                "ip", "netns", "exec", &host.ns, "tc", "qdisc", "del", "dev", HOST_IF, "root",
            ]);
        }
        Ok(())
    }

    /// SIGKILLs every process left in the run's namespaces and deletes
    /// them. Idempotent; also done by `Drop`.
    pub fn teardown(&self) {
        let hosts = std::mem::take(&mut *self.hosts.lock().unwrap());
        for host in &hosts {
            host.signal_all(libc::SIGKILL);
            let _ = run(&["ip", "netns", "del", &host.ns]);
        }
        let _ = run(&["ip", "netns", "del", &self.switch_ns]);
        // Closing its stdin lets the watchdog run its (now empty) sweep.
        if let Some(mut w) = self.watchdog.lock().unwrap().take() {
            drop(w.stdin.take());
            let _ = w.wait();
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn add_rule(host: &Host, rule: &str) -> Result<(), NetError> {
    let mut args = vec![
        "ip", "netns", "exec", &host.ns, "nft", "add", "rule", "inet",
    ];
    args.push(FAULT_TABLE);
    args.extend(rule.split_whitespace());
    run(&args)
}

fn command_of(args: &[&str]) -> Command {
    let mut c = Command::new(args[0]);
    c.args(&args[1..]).stdin(Stdio::null());
    c
}

fn check(args: &[&str], out: std::io::Result<std::process::Output>) -> Result<(), NetError> {
    let command = args.join(" ");
    let out = out.map_err(|source| NetError::Spawn {
        command: command.clone(),
        source,
    })?;
    if out.status.success() {
        return Ok(());
    }
    Err(NetError::Command {
        command,
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

fn run(args: &[&str]) -> Result<(), NetError> {
    check(args, command_of(args).output())
}

fn run_stdin(args: &[&str], input: &str) -> Result<(), NetError> {
    use std::io::Write;
    let mut cmd = command_of(args);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = cmd.spawn().and_then(|mut child| {
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes())?;
        }
        child.wait_with_output()
    });
    check(args, out)
}

/// Shell that deletes every namespace starting with `<prefix>-`, killing
/// the processes still inside first.
fn sweep_script(prefix: &str) -> String {
    format!(
        "for ns in $(ip netns list | cut -d' ' -f1 | grep '^{prefix}-'); do \
         pids=$(ip netns pids \"$ns\"); [ -n \"$pids\" ] && kill -9 $pids; \
         ip netns del \"$ns\"; done"
    )
}

/// The watchdog runs in its own process group (a terminal's Ctrl-C must
/// not kill it before it can clean up) and without PR_SET_PDEATHSIG: it
/// is meant to outlive this process by the time its sweep takes.
fn spawn_watchdog(prefix: &str) -> Result<Child, NetError> {
    use std::os::unix::process::CommandExt;
    let script = format!("read _ignored; {}", sweep_script(prefix));
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|source| NetError::Spawn {
            command: "sh (namespace watchdog)".into(),
            source,
        })
}

/// Deletes namespaces `<tag>-<pid>-*` whose `pid` no longer runs.
fn remove_stale(tag: &str) {
    let Ok(out) = command_of(&["ip", "netns", "list"]).output() else {
        return;
    };
    let mut dead = std::collections::BTreeSet::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(&format!("{tag}-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            dead.insert(pid);
        }
    }
    for pid in dead {
        let _ = run(&["sh", "-c", &sweep_script(&format!("{tag}-{pid}"))]);
    }
}
