//! `pgha demo`: a whole cluster on one machine, from nothing.
//!
//! Starts a private etcd and N agents on free loopback ports, writes every
//! node's configuration under DIR, and the superuser's credentials to
//! DIR/pgpass. Running it again on the same DIR resumes the same cluster
//! (the ports and passwords are read back from the files). Ctrl-C or
//! SIGTERM stops the agents (which stop PostgreSQL), then etcd.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};

use crate::config::Config;
use crate::dcs::Dcs;
use crate::safe_fs::{Owner, Strictness, TrustedDir};

const ETCD_BIN: &str = "etcd";

/// A free loopback port, never one handed out before in this process: the
/// kernel may offer a just-released port again, and two nodes must not
/// share one.
fn free_port() -> anyhow::Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    for _ in 0..100 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port found")
}

fn random_secret() -> anyhow::Result<String> {
    let mut bytes = [0u8; 18];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Ports chosen on the first run, kept in DIR/etcd/ports so that a second
/// run resumes the same cluster.
fn etcd_ports(dir: &TrustedDir) -> anyhow::Result<(u16, u16)> {
    if let Some(text) = dir.read_to_string("etcd-ports")?
        && let Some((a, b)) = text.trim().split_once(' ')
    {
        return Ok((a.parse()?, b.parse()?));
    }
    let ports = (free_port()?, free_port()?);
    dir.write(
        "etcd-ports",
        format!("{} {}\n", ports.0, ports.1).as_bytes(),
        0o644,
    )?;
    Ok(ports)
}

fn node_config(
    dir: &Path,
    n: usize,
    etcd_port: u16,
    su_password: &str,
    repl_password: &str,
    api_token: &str,
) -> anyhow::Result<String> {
    let node_dir = dir.join(format!("node{n}"));
    Ok(format!(
        r#"# pgha demo node {n}; see docs/configuration.md for every key.
cluster = "demo"
name = "node{n}"
state_dir = "{state}"

[etcd]
endpoints = ["http://127.0.0.1:{etcd_port}"]

[postgres]
data_dir = "{data}"
port = {pg_port}
superuser = {{ username = "postgres", password = "{su_password}" }}
replication = {{ username = "replicator", password = "{repl_password}" }}

# The same token on every node: actions need it, and with failsafe mode
# (on by default) the members confirm each other through the API.
[api]
listen = "127.0.0.1:{api_port}"
token = "{api_token}"

# WAL archiving and `pgha backup` / `pgha restore` (docs/backup.md).
[backup]
repository = "{repo}"
"#,
        repo = dir.join("repo").display(),
        state = node_dir.join("state").display(),
        data = node_dir.join("data").display(),
        pg_port = free_port()?,
        api_port = free_port()?,
    ))
}

/// PostgreSQL runs as `postgres` when the demo runs as root; make sure the
/// account exists and can reach DIR.
fn ensure_os_user(dir: &Path) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    if nix::unistd::User::from_name("postgres")?.is_none() {
        let status = std::process::Command::new("useradd")
            .args([
                "--system",
                "--home-dir",
                "/var/lib/postgresql",
                "--shell",
                "/bin/bash",
                "postgres",
            ])
            .status()
            .context("run useradd")?;
        anyhow::ensure!(status.success(), "could not create the postgres OS user");
    }
    // Every directory on the way to DIR must be traversable by postgres.
    let mut p = Some(dir);
    while let Some(d) = p {
        let meta = std::fs::metadata(d)?;
        let mode = meta.permissions().mode();
        if mode & 0o001 == 0 {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o001))?;
        }
        p = d.parent();
    }
    Ok(())
}

fn spawn_logged(mut cmd: Command, log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .kill_on_drop(true);
    Ok(cmd.spawn()?)
}

pub async fn run(nodes: usize, dir: &Path) -> anyhow::Result<()> {
    anyhow::ensure!((1..=9).contains(&nodes), "--nodes must be between 1 and 9");
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let dir: PathBuf = dir.canonicalize()?;
    // Files holding passwords are created with their final mode (0600)
    // through a checked descriptor of the demo directory.
    let files = TrustedDir::create(&dir, Owner::current(), 0o711, Strictness::Private)?;
    ensure_os_user(&dir)?;

    let (client_port, peer_port) = etcd_ports(&files)?;
    let first_config = dir.join("node1.toml");
    let resuming = first_config.exists();
    let (su_password, repl_password, api_token) = if resuming {
        let cfg = Config::load(&first_config)?;
        (
            cfg.postgres.superuser.password.expose().to_string(),
            cfg.postgres.replication.password.expose().to_string(),
            match &cfg.api.token {
                Some(t) => t.expose().to_string(),
                None => random_secret()?,
            },
        )
    } else {
        (random_secret()?, random_secret()?, random_secret()?)
    };
    let mut configs = Vec::new();
    for n in 1..=nodes {
        let path = dir.join(format!("node{n}.toml"));
        if !path.exists() {
            files.subdir(
                &format!("node{n}"),
                Owner::current(),
                0o755,
                Strictness::Private,
            )?;
            files.write(
                &format!("node{n}.toml"),
                node_config(
                    &dir,
                    n,
                    client_port,
                    &su_password,
                    &repl_password,
                    &api_token,
                )?
                .as_bytes(),
                0o600,
            )?;
        }
        configs.push(Config::load(&path)?);
    }
    let pgpass = dir.join("pgpass");
    files.write(
        "pgpass",
        format!("127.0.0.1:*:*:postgres:{su_password}\nlocalhost:*:*:postgres:{su_password}\n")
            .as_bytes(),
        0o600,
    )?;

    // The proxy: clients log in with the superuser's password (checked
    // against a verifier made here); the proxy logs in to the servers
    // with the same password from the pgpass file.
    let proxy_config = dir.join("proxy.toml");
    if !proxy_config.exists() {
        let salt: [u8; 16] = rand::random();
        let verifier =
            crate::proxy::scram::ScramVerifier::from_password(&su_password, &salt, 4096).encode();
        // Every demo node is on this host: the proxy reaches them through
        // their sockets (where the path fits a socket address).
        let sockets: String = configs
            .iter()
            .map(|c| (c.name.to_string(), c.socket_dir().display().to_string()))
            .filter(|(_, d)| d.len() <= crate::config::proxy::MAX_SOCKET_DIR_LEN)
            .map(|(name, d)| format!("{name} = \"{d}\"\n"))
            .collect();
        files.write(
            "userlist.txt",
            format!("\"postgres\" \"{verifier}\"\n").as_bytes(),
            0o600,
        )?;
        files.write(
            "proxy.toml",
            format!(
                "cluster = \"demo\"\n\n[etcd]\nendpoints = [\"http://127.0.0.1:{client_port}\"]\n\n\
                 [proxy]\nname = \"demo-proxy\"\nlisten_rw = \"127.0.0.1:{}\"\nlisten_ro = \"127.0.0.1:{}\"\n\
                 pool_mode = \"transaction\"\nauth_file = \"userlist.txt\"\nserver_passfile = \"pgpass\"\n\n\
                 [proxy.unix_sockets]\n{sockets}",
                free_port()?,
                free_port()?
            )
            .as_bytes(),
            0o600,
        )?;
    }
    let proxy_cfg = crate::config::ProxyFileConfig::load(&proxy_config)?;

    let mut etcd_cmd = Command::new(ETCD_BIN);
    etcd_cmd
        .arg("--name=demo")
        .arg(format!("--data-dir={}", dir.join("etcd").display()))
        .arg(format!(
            "--listen-client-urls=http://127.0.0.1:{client_port}"
        ))
        .arg(format!(
            "--advertise-client-urls=http://127.0.0.1:{client_port}"
        ))
        .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
        .arg(format!(
            "--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"
        ))
        .arg(format!(
            "--initial-cluster=demo=http://127.0.0.1:{peer_port}"
        ));
    let mut etcd = spawn_logged(etcd_cmd, &dir.join("etcd.log"))
        .context("start etcd (install it with: apt-get install etcd-server)")?;
    eprintln!(
        "etcd listening on 127.0.0.1:{client_port} (log: {})",
        dir.join("etcd.log").display()
    );

    let exe = std::env::current_exe()?;
    let mut agents = Vec::new();
    for (n, cfg) in configs.iter().enumerate() {
        let mut cmd = Command::new(&exe);
        cmd.arg("agent").arg("-c").arg(&cfg.path);
        let log = dir.join(format!("node{}/agent.log", n + 1));
        agents.push(spawn_logged(cmd, &log)?);
    }
    let mut proxy_cmd = Command::new(&exe);
    proxy_cmd.arg("proxy").arg("-c").arg(&proxy_config);
    agents.push(spawn_logged(proxy_cmd, &dir.join("proxy.log"))?);
    let hosts: Vec<String> = configs
        .iter()
        .map(|c| format!("127.0.0.1:{}", c.postgres.port))
        .collect();
    println!(
        "pgha demo: {nodes} node(s) in {}{}",
        dir.display(),
        if resuming { " (resumed)" } else { "" }
    );
    println!(
        "Synchronous replication is on (the default): a commit is acknowledged once another node has it.\nFailsafe mode is on (the default): the leader stays writable while etcd is down if every node confirms it."
    );
    println!("Connect (writes go to the leader):");
    println!(
        "  PGPASSFILE={} psql 'postgresql://postgres@{}/postgres?target_session_attrs=read-write'",
        pgpass.display(),
        hosts.join(",")
    );
    let port = |a: Option<std::net::SocketAddr>| a.map(|a| a.port()).unwrap_or_default();
    println!("One endpoint through the pgha proxy (transaction pooling):");
    println!(
        "  read-write: PGPASSFILE={} psql 'postgresql://postgres@127.0.0.1:{}/postgres'",
        pgpass.display(),
        port(proxy_cfg.proxy.listen_rw)
    );
    println!(
        "  read-only:  PGPASSFILE={} psql 'postgresql://postgres@127.0.0.1:{}/postgres'",
        pgpass.display(),
        port(proxy_cfg.proxy.listen_ro)
    );
    println!(
        "Status from another terminal:\n  pgha list -c {}",
        first_config.display()
    );
    println!(
        "Agent logs: {}/nodeN/agent.log. Ctrl-C stops everything.\n",
        dir.display()
    );

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut last_table = String::new();
    let dcs = super::connect_dcs(&configs[0]).await?;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
        if let Ok(view) = dcs.read_cluster().await {
            let table = super::list::render_table(&super::list::build("demo", &view));
            if table != last_table {
                println!("{table}");
                last_table = table;
            }
        }
    }
    eprintln!("stopping the agents (they stop PostgreSQL cleanly)...");
    stop_children(&mut agents, Duration::from_secs(90)).await;
    stop_children(std::slice::from_mut(&mut etcd), Duration::from_secs(10)).await;
    eprintln!("stopped.");
    Ok(())
}

/// SIGTERM, wait up to `grace`, then SIGKILL the whole process group.
async fn stop_children(children: &mut [Child], grace: Duration) {
    use nix::sys::signal::{Signal, kill, killpg};
    use nix::unistd::Pid;
    for c in children.iter() {
        if let Some(pid) = c.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    let deadline = tokio::time::Instant::now() + grace;
    for c in children.iter_mut() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if tokio::time::timeout(left, c.wait()).await.is_err()
            && let Some(pid) = c.id()
        {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let _ = c.wait().await;
        }
    }
}
