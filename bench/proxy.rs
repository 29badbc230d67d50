//! `pgha-bench proxy`: pgbench throughput through the pgha proxy
//! (transaction and session mode), pgbouncer and HAProxy (TCP mode), each
//! as a ratio to a direct TCP connection measured in the same round, on
//! one single-node cluster; then the proxy's memory with many idle
//! clients. See bench/README.md.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::clock::log;
use crate::cluster::{CLUSTER_NAME, Cluster, SUPERUSER, free_port};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Rounds; every figure is the median over them.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// pgbench run time of each measurement (whole seconds).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Client counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    pub clients: Vec<u32>,
    /// Workloads (comma-separated): select-prepared, select-simple, tpcb.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "select-prepared,select-simple,tpcb"
    )]
    pub workloads: Vec<String>,
    /// Targets besides `direct` (comma-separated): pgha-tx, pgha-session,
    /// pgbouncer, haproxy.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "pgha-tx,pgha-session,pgbouncer,haproxy"
    )]
    pub targets: Vec<String>,
    /// pgbench scale factor.
    #[arg(long, default_value_t = 10)]
    pub scale: u32,
    /// Server connections per pool, for the pgha proxy and pgbouncer alike
    /// (at least the largest client count, so that session mode serves
    /// every client).
    #[arg(long, default_value_t = 40)]
    pub pool_size: u32,
    /// Idle clients for the memory measurement (0: skip it).
    #[arg(long, default_value_t = 1000)]
    pub idle: usize,
    /// Idle clients that must be held (0: skip it).
    #[arg(long, default_value_t = 10_000)]
    pub idle_max: usize,
    /// A short smoke run: 1 round of 3 s, 100 and 500 idle clients.
    #[arg(long)]
    pub quick: bool,
    /// `threads` of the pgha proxies (default: pgha's own default).
    #[arg(long)]
    pub proxy_threads: Option<usize>,
    /// Every proxy reaches PostgreSQL through its Unix socket, as a proxy
    /// on the database host does (pgha: `unix_sockets`; pgbouncer: a
    /// socket directory as host; HAProxy: the socket path as server).
    /// pgbench still connects to every target, and directly, over TCP.
    #[arg(long)]
    pub unix_socket: bool,
}

const WORKLOADS: [(&str, &[&str]); 3] = [
    ("select-prepared", &["-S", "-M", "prepared"]),
    ("select-simple", &["-S", "-M", "simple"]),
    ("tpcb", &["-M", "simple"]),
];

/// A process the bench started; killed when dropped.
pub(crate) struct Service {
    name: String,
    pub(crate) port: u16,
    child: Child,
    log: PathBuf,
}

impl Service {
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

pub async fn run(cluster: Arc<Cluster>, args: &Args) -> anyhow::Result<Value> {
    let (rounds, secs, idle, idle_max) = if args.quick {
        (1, 3, 100, 500)
    } else {
        (
            args.rounds,
            args.duration.as_secs().max(1),
            args.idle,
            args.idle_max,
        )
    };
    for w in &args.workloads {
        anyhow::ensure!(
            WORKLOADS.iter().any(|(n, _)| n == w),
            "unknown workload {w}"
        );
    }
    let fd_limit = raise_fd_limit();
    cluster.start().await?;
    let port = cluster.nodes[0].pg_port;
    let dir = cluster.dir.join("proxy-bench");
    std::fs::create_dir_all(&dir)?;
    // pgbouncer runs as `postgres` and reads its files from here.
    chown_postgres(&dir)?;

    log(&format!("pgbench -i -s {} on the leader", args.scale));
    pgbench(
        cluster.as_ref(),
        port,
        &["-i", "-q", "-s", &args.scale.to_string()],
    )
    .await?;
    let userlist = dir.join("userlist.txt");
    write_userlist(&cluster, port, &userlist).await?;

    // Where the one node's PostgreSQL has its Unix socket.
    let socket_dir = args
        .unix_socket
        .then(|| cluster.nodes[0].dir.join("state/postgres/run"));
    let socket_dir = socket_dir.as_deref();
    let mut services = Vec::new();
    for t in &args.targets {
        let s = match t.as_str() {
            "pgha-tx" => start_pgha(&cluster, &dir, "tx", "transaction", args, socket_dir).await?,
            "pgha-session" => {
                start_pgha(&cluster, &dir, "session", "session", args, socket_dir).await?
            }
            "pgbouncer" => start_pgbouncer(&dir, port, args.pool_size, socket_dir).await?,
            "haproxy" => start_haproxy(&dir, port, socket_dir).await?,
            other => bail!("unknown target {other}"),
        };
        wait_ready(&cluster, &s).await?;
        services.push(s);
    }
    let versions = json!({
        "pgbench": first_line("pgbench", &["--version"]),
        "pgbouncer": first_line("pgbouncer", &["--version"]),
        "haproxy": first_line("haproxy", &["-v"]),
    });

    // rows[(workload, clients, target)] = per-round tps, or the error.
    let mut rows: Vec<Row> = Vec::new();
    for round in 0..rounds {
        for (wname, wargs) in WORKLOADS
            .iter()
            .filter(|(n, _)| args.workloads.iter().any(|w| w == n))
        {
            for &c in &args.clients {
                // Rotate the order of the proxies each round, so that a
                // drift of the machine's load does not favour one of them.
                let mut order: Vec<(&str, u16, Option<u32>)> = services
                    .iter()
                    .map(|s| (s.name.as_str(), s.port, s.pid()))
                    .collect();
                if !order.is_empty() {
                    let n = round % order.len();
                    order.rotate_left(n);
                }
                order.insert(0, ("direct", port, None));
                let mut direct = None;
                for (target, tport, pid) in order {
                    let mut a: Vec<String> = vec![
                        "-n".into(),
                        "-c".into(),
                        c.to_string(),
                        "-j".into(),
                        "2".into(),
                        "-T".into(),
                        secs.to_string(),
                    ];
                    a.extend(wargs.iter().map(|s| s.to_string()));
                    let a: Vec<&str> = a.iter().map(String::as_str).collect();
                    log(&format!(
                        "round {}/{rounds}: {wname} c{c} via {target}",
                        round + 1
                    ));
                    let before = CpuTicks::read(pid);
                    let result = pgbench(cluster.as_ref(), tport, &a).await.and_then(|out| {
                        let t = tps(&out)
                            .with_context(|| format!("no tps in pgbench output: {out}"))?;
                        let n = transactions(&out)
                            .with_context(|| format!("no transaction count in: {out}"))?;
                        Ok((t, n))
                    });
                    let cpu = CpuTicks::read(pid).since(&before);
                    let row = row_mut(&mut rows, wname, c, target);
                    match result {
                        Ok((t, n)) => {
                            let (machine_us, proxy_us) = cpu.per_transaction(n);
                            log(&format!(
                                "  {t:.0} tps; CPU per transaction: {machine_us:.1} us in all, {} in the proxy",
                                proxy_us.map(|u| format!("{u:.1} us")).unwrap_or("-".into())
                            ));
                            row.machine_cpu_us.push(machine_us);
                            if let Some(u) = proxy_us {
                                row.proxy_cpu_us.push(u);
                            }
                            if target == "direct" {
                                direct = Some(t);
                            }
                            row.tps.push(t);
                            if let Some(d) = direct.filter(|d| *d > 0.0) {
                                row.ratio.push(t / d);
                            }
                        }
                        Err(e) => {
                            let e = format!("{e:#}");
                            log(&format!("  failed: {e}"));
                            row.errors.push(e);
                        }
                    }
                }
            }
        }
    }

    let idle_report = if idle > 0 || idle_max > 0 {
        let s = start_pgha(&cluster, &dir, "idle", "transaction", args, socket_dir).await?;
        wait_ready(&cluster, &s).await?;
        let r = idle_clients(&cluster, &s, idle, idle_max).await;
        drop(s);
        r?
    } else {
        Value::Null
    };
    drop(services);

    let mut table = serde_json::Map::new();
    for r in &rows {
        table.insert(
            format!("{} c{} {}", r.workload, r.clients, r.target),
            json!({
                "workload": r.workload,
                "clients": r.clients,
                "target": r.target,
                "tps": crate::report::summary_decimals(&r.tps, 0),
                "ratio_to_direct": if r.target == "direct" { Value::Null } else { crate::report::summary_decimals(&r.ratio, 3) },
                // CPU time of the whole machine (user + system, all
                // processes) and of the proxy process alone, divided by
                // the transactions pgbench completed.
                "machine_cpu_us_per_tx": crate::report::summary_decimals(&r.machine_cpu_us, 1),
                "proxy_cpu_us_per_tx": if r.proxy_cpu_us.is_empty() { Value::Null } else { crate::report::summary_decimals(&r.proxy_cpu_us, 1) },
                // A failed round is reported as failed, never as a number.
                "failed": !r.errors.is_empty(),
                "errors": r.errors.iter().map(|e| last_lines(e, 3)).collect::<Vec<_>>(),
            }),
        );
    }
    Ok(json!({
        "machine": crate::report::machine(),
        "config": {
            "rounds": rounds,
            "duration_s": secs,
            "clients": args.clients,
            "pgbench_threads": 2,
            "scale": args.scale,
            "pool_size": args.pool_size,
            "proxy_threads": args.proxy_threads,
            "proxies_to_server_over": if args.unix_socket { "unix socket" } else { "tcp" },
            "fd_limit": fd_limit,
        },
        "versions": versions,
        "rows": table,
        "idle_clients": idle_report,
        "work_dir": cluster.dir.display().to_string(),
    }))
}

/// One (workload, client count, target) cell: per-round figures, or the
/// errors of the rounds that failed.
pub(crate) struct Row {
    pub(crate) workload: String,
    pub(crate) clients: u32,
    pub(crate) target: String,
    pub(crate) tps: Vec<f64>,
    pub(crate) ratio: Vec<f64>,
    pub(crate) machine_cpu_us: Vec<f64>,
    pub(crate) proxy_cpu_us: Vec<f64>,
    pub(crate) errors: Vec<String>,
}

pub(crate) fn row_mut<'a>(rows: &'a mut Vec<Row>, w: &str, c: u32, t: &str) -> &'a mut Row {
    let i = match rows
        .iter()
        .position(|r| r.workload == w && r.clients == c && r.target == t)
    {
        Some(i) => i,
        None => {
            rows.push(Row {
                workload: w.into(),
                clients: c,
                target: t.into(),
                tps: Vec::new(),
                ratio: Vec::new(),
                machine_cpu_us: Vec::new(),
                proxy_cpu_us: Vec::new(),
                errors: Vec::new(),
            });
            rows.len() - 1
        }
    };
    &mut rows[i]
}

pub(crate) fn tps(out: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("tps ="))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// pgbench's "number of transactions actually processed: N".
pub(crate) fn transactions(out: &str) -> Option<u64> {
    out.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("number of transactions actually processed:")
        })
        .and_then(|rest| rest.split(['/', ' ']).find(|w| !w.is_empty()))
        .and_then(|n| n.trim().parse().ok())
}

/// CPU time in clock ticks: the whole machine's busy time (`/proc/stat`,
/// every mode but idle and iowait) and one process's user + system time.
#[derive(Debug, Default)]
struct CpuTicks {
    machine: u64,
    process: Option<u64>,
}

impl CpuTicks {
    fn read(pid: Option<u32>) -> CpuTicks {
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| s.lines().next().map(busy_ticks))
            .unwrap_or(0);
        let process = pid.and_then(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // Fields after the command name (which may hold spaces).
            let rest = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of stat(5); `rest`
            // starts at field 3.
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        });
        CpuTicks { machine, process }
    }

    fn since(self, before: &CpuTicks) -> CpuTicks {
        CpuTicks {
            machine: self.machine.saturating_sub(before.machine),
            process: self
                .process
                .zip(before.process)
                .map(|(a, b)| a.saturating_sub(b)),
        }
    }

    /// Microseconds per transaction: the machine's, and the process's.
    fn per_transaction(&self, transactions: u64) -> (f64, Option<f64>) {
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        let us = |ticks: u64| ticks as f64 / hz * 1e6 / transactions.max(1) as f64;
        (us(self.machine), self.process.map(us))
    }
}

/// Busy ticks from the `cpu` line of `/proc/stat`: user, system, irq,
/// softirq and steal. Idle and iowait are not work; nice is left out so
/// that a niced build beside the bench does not count as its cost.
fn busy_ticks(line: &str) -> u64 {
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect();
    [0, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum()
}

pub(crate) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

fn first_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .map(str::to_string)
}

/// 10,000 idle clients need 10,000 descriptors in the bench and in the
/// proxy (which inherits the limit): raise the soft limit, and the hard
/// one too when root may.
fn raise_fd_limit() -> Option<u64> {
    let get = || {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit through the pointer.
        (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } == 0).then_some(l)
    };
    let current = get()?;
    let want = current.rlim_max.max(65_536);
    for limit in [want, current.rlim_max] {
        let l = libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        };
        // SAFETY: setrlimit reads one rlimit through the pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) } == 0 {
            break;
        }
    }
    get().map(|l| l.rlim_cur)
}

pub(crate) fn chown_postgres(path: &Path) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let user = nix::unistd::User::from_name("postgres")?.context("no OS user postgres")?;
    nix::unistd::chown(path, Some(user.uid), Some(user.gid))?;
    Ok(())
}

pub(crate) async fn superuser_client(
    cluster: &Cluster,
    port: u16,
) -> anyhow::Result<tokio_postgres::Client> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user(SUPERUSER)
        .password(&cluster.superuser_password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(5));
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// The superuser's SCRAM verifier from `pg_authid`, in the
/// `"user" "secret"` format pgha's `auth_file` and pgbouncer both read.
pub(crate) async fn write_userlist(
    cluster: &Cluster,
    port: u16,
    path: &Path,
) -> anyhow::Result<()> {
    let client = superuser_client(cluster, port).await?;
    client.batch_execute("VACUUM ANALYZE").await?;
    let row = client
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&SUPERUSER],
        )
        .await?;
    let secret: String = row.get(0);
    anyhow::ensure!(
        secret.starts_with("SCRAM-SHA-256$"),
        "the superuser has no SCRAM verifier"
    );
    std::fs::write(path, format!("\"{SUPERUSER}\" \"{secret}\"\n"))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    chown_postgres(path)
}

pub(crate) fn spawn(
    name: &str,
    port: u16,
    cmd: &mut Command,
    log_path: PathBuf,
) -> anyhow::Result<Service> {
    let log_file = std::fs::File::create(&log_path)?;
    cmd.stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .kill_on_drop(true);
    let child = crate::reaper::spawn_own(cmd).with_context(|| format!("start {name}"))?;
    Ok(Service {
        name: name.into(),
        port,
        child,
        log: log_path,
    })
}

async fn start_pgha(
    cluster: &Cluster,
    dir: &Path,
    tag: &str,
    mode: &str,
    args: &Args,
    socket_dir: Option<&Path>,
) -> anyhow::Result<Service> {
    let port = free_port()?;
    let config = dir.join(format!("pgha-{tag}.toml"));
    let sockets = socket_dir
        .map(|d| {
            format!(
                "\n[proxy.unix_sockets]\n{} = \"{}\"\n",
                cluster.nodes[0].name,
                d.display()
            )
        })
        .unwrap_or_default();
    let pool_size = args.pool_size;
    let threads = args
        .proxy_threads
        .map(|n| format!("threads = {n}\n"))
        .unwrap_or_default();
    std::fs::write(
        &config,
        format!(
            r#"cluster = "{CLUSTER_NAME}"
{threads}
[etcd]
endpoints = ["{etcd}"]

[proxy]
name = "bench-{tag}"
listen_rw = "127.0.0.1:{port}"
auth_file = "{auth}"
pool_mode = "{mode}"
default_pool_size = {pool_size}
max_client_conn = 20000
{sockets}"#,
            etcd = cluster.etcd_endpoint(),
            auth = dir.join("userlist.txt").display(),
        ),
    )?;
    let name = if tag == "idle" {
        "pgha-idle".to_string()
    } else {
        format!("pgha-{tag}")
    };
    let mut cmd = Command::new(cluster.pgha_exe());
    cmd.args(["proxy", "-c"])
        .arg(&config)
        .env("PGHA_LOG", "warn");
    spawn(&name, port, &mut cmd, dir.join(format!("{name}.log")))
}

async fn start_pgbouncer(
    dir: &Path,
    pg_port: u16,
    pool_size: u32,
    socket_dir: Option<&Path>,
) -> anyhow::Result<Service> {
    let port = free_port()?;
    let host = socket_dir
        .map(|d| d.display().to_string())
        .unwrap_or_else(|| "127.0.0.1".into());
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\npostgres = host={host} port={pg_port} dbname=postgres\n\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = scram-sha-256\nauth_file = {auth}\npool_mode = transaction\n\
             default_pool_size = {pool_size}\nmax_client_conn = 20000\n\
             logfile = {log}\nlog_connections = 0\nlog_disconnections = 0\n",
            auth = dir.join("userlist.txt").display(),
            log = dir.join("pgbouncer.file.log").display(),
        ),
    )?;
    chown_postgres(&ini)?;
    let mut cmd = Command::new("pgbouncer");
    if nix::unistd::geteuid().is_root() {
        // pgbouncer refuses to run as root.
        cmd.args(["-u", "postgres"]);
    }
    cmd.arg(&ini);
    spawn("pgbouncer", port, &mut cmd, dir.join("pgbouncer.log"))
        .context("start pgbouncer (scripts/install-deps.sh --bench, or apt-get install pgbouncer)")
}

async fn start_haproxy(
    dir: &Path,
    pg_port: u16,
    socket_dir: Option<&Path>,
) -> anyhow::Result<Service> {
    let port = free_port()?;
    let server = match socket_dir {
        Some(d) => d.join(format!(".s.PGSQL.{pg_port}")).display().to_string(),
        None => format!("127.0.0.1:{pg_port}"),
    };
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n    maxconn 4096\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    \
             timeout client 1h\n    timeout server 1h\n\nlisten pg\n    bind 127.0.0.1:{port}\n    \
             server pg {server}\n"
        ),
    )?;
    let mut cmd = Command::new("haproxy");
    cmd.args(["-db", "-f"]).arg(&cfg);
    spawn("haproxy", port, &mut cmd, dir.join("haproxy.log"))
        .context("start haproxy (apt-get install haproxy)")
}

pub(crate) async fn wait_ready(cluster: &Cluster, s: &Service) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match superuser_client(cluster, s.port).await {
            Ok(c) if c.simple_query("SELECT 1").await.is_ok() => return Ok(()),
            r => {
                if tokio::time::Instant::now() > deadline {
                    let tail = std::fs::read_to_string(&s.log).unwrap_or_default();
                    bail!(
                        "{} not ready on port {}: {:?}; log: {}",
                        s.name,
                        s.port,
                        r.err(),
                        last_lines(&tail, 10)
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

type Held = Vec<(tokio_postgres::Client, tokio::task::JoinHandle<()>)>;

/// Logs `n` clients in (64 logins at a time) and keeps them.
async fn open_clients(cluster: &Cluster, port: u16, n: usize) -> (Held, Vec<String>) {
    let results: Vec<_> = futures_util::stream::iter(0..n)
        .map(|_| async move {
            let mut cfg = tokio_postgres::Config::new();
            cfg.host("127.0.0.1")
                .port(port)
                .user(SUPERUSER)
                .password(&cluster.superuser_password)
                .dbname("postgres")
                .connect_timeout(Duration::from_secs(30));
            let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
            let task = tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok::<_, tokio_postgres::Error>((client, task))
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let mut held = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(c) => held.push(c),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    (held, errors)
}

/// Queries a spread of the held clients (and a new one): held means they
/// still work.
async fn probe(cluster: &Cluster, port: u16, held: &Held) -> (usize, usize, bool) {
    let step = (held.len() / 20).max(1);
    let mut ok = 0;
    let mut tried = 0;
    for (c, _) in held.iter().step_by(step) {
        tried += 1;
        if c.simple_query("SELECT 1").await.is_ok() {
            ok += 1;
        }
    }
    let fresh = match superuser_client(cluster, port).await {
        Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
        Err(_) => false,
    };
    (ok, tried, fresh)
}

async fn idle_clients(
    cluster: &Cluster,
    s: &Service,
    idle: usize,
    idle_max: usize,
) -> anyhow::Result<Value> {
    let pid = s.pid().context("proxy pid")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = rss_kib(pid);
    let mut out = serde_json::Map::new();
    out.insert("rss_kib_before".into(), json!(base));
    for (label, n) in [("idle", idle), ("idle_max", idle_max)] {
        if n == 0 {
            continue;
        }
        log(&format!("opening {n} idle clients to the pgha proxy"));
        let started = std::time::Instant::now();
        let (held, errors) = open_clients(cluster, s.port, n).await;
        let login_s = started.elapsed().as_secs_f64();
        // Let them sit idle, then look at the proxy.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let rss = rss_kib(pid);
        let (ok, tried, fresh) = probe(cluster, s.port, &held).await;
        let alive = held.iter().filter(|(_, t)| !t.is_finished()).count();
        let extra = rss.zip(base).map(|(r, b)| r.saturating_sub(b));
        log(&format!(
            "{n} clients: {} connected, {alive} alive after 5 s, proxy RSS {rss:?} KiB (+{extra:?})",
            held.len()
        ));
        out.insert(
            label.into(),
            json!({
                "clients": n,
                "connected": held.len(),
                "alive_after_5s": alive,
                "probe_queries_ok": ok,
                "probe_queries": tried,
                "new_client_ok": fresh,
                "login_seconds": (login_s * 10.0).round() / 10.0,
                "rss_kib": rss,
                "extra_rss_kib": extra,
                "extra_rss_mib": extra.map(|k| ((k as f64 / 1024.0) * 10.0).round() / 10.0),
                "held": held.len() == n && alive == n && ok == tried && fresh,
                "errors": errors.iter().take(3).collect::<Vec<_>>(),
                "error_count": errors.len(),
            }),
        );
        drop(held);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(Value::Object(out))
}

/// pgbench against 127.0.0.1:`port` as the superuser, the password in the
/// cluster's 0600 passfile; stdout, or the error with stderr.
pub(crate) async fn pgbench(cluster: &Cluster, port: u16, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new("pgbench");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", SUPERUSER])
        .args(args)
        .arg("postgres")
        .env("PGPASSFILE", &cluster.pgpass)
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = crate::reaper::spawn_own(&mut cmd)
        .context("run pgbench (apt-get install postgresql-client-15)")?
        .wait_with_output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // pgbench exits 2 when a client aborted mid-run (it still prints
    // a tps): such a run is a failure, not a figure.
    if !out.status.success() {
        bail!(
            "pgbench failed ({}): {}",
            out.status,
            last_lines(&String::from_utf8_lossy(&out.stderr), 3)
        );
    }
    Ok(stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbench_transaction_count_is_read() {
        let out = "transaction type: <builtin: select only>\nnumber of transactions actually processed: 812345\nnumber of failed transactions: 0 (0.000%)\ntps = 27078.1 (without initial connection time)\n";
        assert_eq!(transactions(out), Some(812_345));
        assert_eq!(transactions("tps = 1.0\n"), None);
    }

    #[test]
    fn busy_ticks_leave_out_idle_iowait_and_nice() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let line = "cpu  100 1000 20 5000 700 3 4 5 0 0";
        assert_eq!(busy_ticks(line), 100 + 20 + 3 + 4 + 5);
    }
}
