//! A standalone `pgha proxy` in front of a [`Cluster`]: its auth file is
//! filled from the leader's `pg_authid` (so SCRAM pass-through is what
//! logs it in to the servers), its listeners take free ports, and its
//! output goes to `<cluster dir>/<name>.log`.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use super::cluster::{PGHA_BIN, SUPERUSER};
use super::{Cluster, ProcessGuard, free_port, wait_until};

pub struct Proxy {
    pub rw_port: u16,
    pub ro_port: u16,
    /// The auto listener's port (none in session mode, which it requires
    /// transaction pooling for).
    pub auto_port: u16,
    pub api_port: u16,
    pub log_path: PathBuf,
    password: String,
    _guard: ProcessGuard,
}

impl Proxy {
    /// Starts a proxy named `name` with extra `[proxy]` keys (TOML literals)
    /// and waits until the read-write port accepts a login.
    pub async fn start(
        cluster: &Cluster,
        name: &str,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Proxy> {
        let proxy = Self::spawn(cluster, name, extra).await?;
        let cfg = proxy.config(proxy.rw_port);
        wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
            let cfg = cfg.clone();
            async move { super::cluster::connect(&cfg).await.ok().map(|_| ()) }
        })
        .await
        .with_context(|| proxy.log_tail())?;
        Ok(proxy)
    }

    /// Like [`Proxy::start`], but only waits until the read-write port
    /// accepts TCP connections (for proxies that cannot log anyone in).
    pub async fn spawn(
        cluster: &Cluster,
        name: &str,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Proxy> {
        let leader = cluster.leader_node().await?;
        let rows = leader
            .psql("SELECT rolname, rolpassword FROM pg_authid WHERE rolpassword LIKE 'SCRAM-SHA-256$%'")
            .await?;
        let mut userlist = String::new();
        for row in rows {
            if let [Some(user), Some(secret)] = &row[..] {
                userlist.push_str(&format!("\"{user}\" \"{secret}\"\n"));
            }
        }
        let dir = cluster.dir().join(name);
        std::fs::create_dir_all(&dir)?;
        let auth_file = dir.join("userlist.txt");
        std::fs::write(&auth_file, userlist)?;
        let (rw_port, ro_port, api_port) = (free_port(), free_port(), free_port());
        let session_mode = extra.iter().any(|(k, _)| *k == "pool_mode");
        let auto_port = if session_mode { 0 } else { free_port() };
        let endpoints: Vec<String> = cluster
            .etcd
            .endpoints()
            .iter()
            .map(|e| format!("{e:?}"))
            .collect();
        let mut toml = format!(
            r#"cluster = "{cluster}"

[etcd]
endpoints = [{endpoints}]

[proxy]
name = "{name}"
listen_rw = "127.0.0.1:{rw_port}"
listen_ro = "127.0.0.1:{ro_port}"
auth_file = "{auth}"
"#,
            cluster = cluster.name(),
            endpoints = endpoints.join(", "),
            auth = auth_file.display(),
        );
        if !session_mode {
            toml.push_str(&format!("listen_auto = \"127.0.0.1:{auto_port}\"\n"));
        }
        for (k, v) in extra {
            toml.push_str(&format!("{k} = {v}\n"));
        }
        toml.push_str(&format!(
            "\n[proxy.api]\nlisten = \"127.0.0.1:{api_port}\"\n"
        ));
        let config = dir.join("proxy.toml");
        std::fs::write(&config, toml)?;
        let log_path = cluster.dir().join(format!("{name}.log"));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let guard = ProcessGuard::spawn(
            Command::new(PGHA_BIN)
                .args(["proxy", "-c"])
                .arg(&config)
                .env("PGHA_LOG", "info,pgha=debug")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log),
        )?;
        let proxy = Proxy {
            rw_port,
            ro_port,
            auto_port,
            api_port,
            log_path,
            password: cluster.superuser_password().to_string(),
            _guard: guard,
        };
        wait_until(
            Duration::from_secs(30),
            Duration::from_millis(100),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", rw_port))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await
        .with_context(|| proxy.log_tail())?;
        Ok(proxy)
    }

    /// Superuser settings for one of the proxy's ports.
    pub fn config(&self, port: u16) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(port)
            .user(SUPERUSER)
            .password(self.password.as_str())
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(5));
        c
    }

    /// Signals the proxy process (e.g. SIGHUP to reload its files).
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        self._guard.signal(signal)
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}
