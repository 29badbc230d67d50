//! A real single-node etcd per test.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use nix::sys::signal::Signal;

use super::{Pki, ProcessGuard, TestDir, free_port};

const ETCD_BIN: &str = "/usr/bin/etcd";
/// etcd normally elects itself within ~1-2 s; a loaded CI host needs slack.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A single-node etcd with its data dir and log (`etcd.log`) in a
/// `etcd-<name>` subdirectory of the test dir, listening on free ports.
/// With [`spawn_tls`](Etcd::spawn_tls) it serves clients over TLS only and
/// requires a client certificate signed by the test CA.
///
/// It can be stopped and started again on the same data dir and ports, or
/// frozen with [`pause`](Etcd::pause), to simulate outages. Dropping it
/// kills it.
pub struct Etcd {
    name: String,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    tls: Option<Pki>,
    process: Option<ProcessGuard>,
}

impl Etcd {
    /// Starts a new etcd and waits until it serves reads. Another process
    /// may grab one of the free ports before etcd binds it, so a start that
    /// dies early is retried on new ports.
    pub async fn spawn(test_dir: &TestDir, name: &str) -> anyhow::Result<Etcd> {
        Self::spawn_with(test_dir, name, None).await
    }

    /// Like [`spawn`](Etcd::spawn), but clients must speak TLS and present
    /// a certificate signed by `pki.ca` (etcd's `--client-cert-auth`).
    pub async fn spawn_tls(test_dir: &TestDir, name: &str, pki: &Pki) -> anyhow::Result<Etcd> {
        Self::spawn_with(test_dir, name, Some(pki.clone())).await
    }

    async fn spawn_with(test_dir: &TestDir, name: &str, tls: Option<Pki>) -> anyhow::Result<Etcd> {
        let dir = test_dir.subdir(&format!("etcd-{name}"));
        let mut last_err = None;
        for _ in 0..3 {
            let mut etcd = Etcd {
                name: name.to_string(),
                dir: dir.clone(),
                client_port: free_port(),
                peer_port: free_port(),
                tls: tls.clone(),
                process: None,
            };
            match etcd.start().await {
                Ok(()) => return Ok(etcd),
                Err(e) => {
                    drop(etcd);
                    let _ = std::fs::remove_dir_all(dir.join("data"));
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    /// `http://127.0.0.1:<client port>` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The certificates, when started with [`spawn_tls`](Etcd::spawn_tls).
    pub fn pki(&self) -> Option<&Pki> {
        self.tls.as_ref()
    }

    /// Connect options with the test CA and client certificate when etcd
    /// runs with TLS.
    fn connect_options(&self) -> anyhow::Result<ConnectOptions> {
        let mut opts = ConnectOptions::new();
        if let Some(pki) = &self.tls {
            let pem = |p: &Path| std::fs::read(p).with_context(|| format!("read {}", p.display()));
            opts = opts.with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(pem(&pki.ca)?))
                    .identity(Identity::from_pem(
                        pem(&pki.client_cert)?,
                        pem(&pki.client_key)?,
                    )),
            );
        }
        Ok(opts)
    }

    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// A plain client, for tests that inspect or tamper with keys directly.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let opts = self
            .connect_options()?
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        Client::connect(self.endpoints(), Some(opts))
            .await
            .context("connect to etcd")
    }

    /// Starts etcd (again) on the same data dir and ports, and waits until
    /// it serves linearizable reads. No-op when it is running.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        if self.process.is_some() {
            return Ok(());
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("open etcd.log")?;
        let (client_url, peer_url) = (
            self.endpoint(),
            format!("http://127.0.0.1:{}", self.peer_port),
        );
        let mut cmd = Command::new(ETCD_BIN);
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("{}={peer_url}", self.name));
        if let Some(pki) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&pki.server_cert)
                .arg("--key-file")
                .arg(&pki.server_key)
                .arg("--trusted-ca-file")
                .arg(&pki.ca)
                .arg("--client-cert-auth");
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.process = Some(ProcessGuard::spawn(&mut cmd)?);
        self.wait_ready().await
    }

    /// Stops etcd gracefully (SIGTERM, then SIGKILL after 5 s). Its clients
    /// then see connection errors until [`start`](Etcd::start).
    pub async fn stop(&mut self) {
        if let Some(p) = self.process.take() {
            p.terminate(Duration::from_secs(5)).await;
        }
    }

    /// Kills etcd with SIGKILL, like a crash.
    pub fn kill(&mut self) {
        self.process = None; // ProcessGuard's drop kills the group
    }

    /// Freezes etcd (SIGSTOP): connections stay open but nothing answers,
    /// which is what a network partition looks like to clients.
    /// Freezes etcd and returns once every one of its threads is stopped:
    /// SIGSTOP takes effect asynchronously, and on a loaded host a thread
    /// could otherwise still answer one more request.
    pub fn pause(&self) -> anyhow::Result<()> {
        let process = self.running()?;
        process.signal(Signal::SIGSTOP)?;
        let pid = process.pid() as i32;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !all_threads_stopped(pid) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "etcd {pid} did not stop within 5s of SIGSTOP"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    pub fn resume(&self) -> anyhow::Result<()> {
        self.running()?.signal(Signal::SIGCONT)
    }

    fn running(&self) -> anyhow::Result<&ProcessGuard> {
        self.process.as_ref().context("etcd is not running")
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let opts = self
            .connect_options()?
            .with_connect_timeout(Duration::from_millis(500))
            .with_timeout(Duration::from_millis(500))
            .with_require_leader(true);
        loop {
            if let Some(status) = self.process.as_mut().and_then(|p| p.try_wait()) {
                self.process = None;
                bail!(
                    "etcd exited during start-up ({status}); log:\n{}",
                    tail(&self.log_path())
                );
            }
            // require_leader: a fresh node answers only once it elected itself.
            if let Ok(mut c) = Client::connect(self.endpoints(), Some(opts.clone())).await
                && c.get("pgha-test-ready", None).await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!(
                    "etcd not ready after {READY_TIMEOUT:?}; log:\n{}",
                    tail(&self.log_path())
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The last lines of a log file, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Whether every thread of `pid` is in the stopped state (`T`).
fn all_threads_stopped(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.filter_map(|t| t.ok()).all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('T'))
            })
            .unwrap_or(true)
    })
}
