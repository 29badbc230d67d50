//! Real pgha clusters: an etcd, N agents and their PostgreSQL servers.
//!
//! - [`Node`]: one member. It writes its own TOML configuration (data and
//!   state directories inside the test dir, free ports, the etcd endpoints,
//!   the passwords), runs `pgha agent -c FILE` with its output in
//!   `<node dir>/agent.log`, and offers the faults the HA tests need:
//!   SIGTERM, SIGKILL or SIGSTOP the agent, SIGKILL PostgreSQL.
//! - [`Cluster`]: an [`Etcd`] plus N nodes, started together and waited on
//!   until exactly one leader and N-1 streaming replicas show up in
//!   `pgha list --json`.
//!
//! Nothing outlives the fixture: dropping a node SIGKILLs its agent, its
//! postmaster (even when the agent was killed before and PostgreSQL
//! survived it), the postmaster's children, and any other process whose
//! command line names the node's directory (the fence keeper, a
//! pg_basebackup in flight). When the test is failing, each node prints the
//! tail of its agent log (and of PostgreSQL's log) as it is dropped.
//!
//! PostgreSQL runs as the `postgres` OS user (the tests run as root), so
//! everything lives under the 0755 [`TestDir`]; socket paths stay short
//! (`/dev/shm/pgha-<test>-XXXXXX/<node>/state/run/.s.PGSQL.<port>`, see `TestDir`).

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio_postgres::NoTls;
use tokio_postgres::config::TargetSessionAttrs;

use super::{Etcd, Pki, ProcessGuard, TestDir, free_port, wait_until};

/// The binary under test, built by cargo for this test target.
pub const PGHA_BIN: &str = env!("CARGO_BIN_EXE_pgha");
pub const SUPERUSER: &str = "postgres";
pub const REPLICATION_USER: &str = "replicator";
/// A fresh cluster (initdb, start, two clones) is normally up in ~5-10 s;
/// parallel tests on a small host need slack.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `stop()` lets the agent shut PostgreSQL down cleanly.
const STOP_GRACE: Duration = Duration::from_secs(90);
const LOG_TAIL_LINES: usize = 40;

/// Settings shared by every node of a cluster.
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// Extra `[ha]` keys, each value a TOML literal: `("ttl", "\"5s\"")`,
    /// `("priority", "0")`.
    pub ha: Vec<(String, String)>,
    /// Extra `[postgres.parameters]`, each value a TOML literal.
    pub parameters: Vec<(String, String)>,
    /// Extra `[etcd]` keys, each value a TOML literal.
    pub etcd: Vec<(String, String)>,
    /// Run etcd with TLS and client-certificate authentication; the nodes
    /// get the CA and a client certificate in `[etcd]`.
    pub etcd_tls: bool,
    /// How long [`Cluster::start`] waits for a healthy cluster
    /// (default [`STARTUP_TIMEOUT`]).
    pub startup_timeout: Option<Duration>,
    /// Give every node a `[proxy]` table (read-write port only), so the
    /// agents run the proxy; see [`Node::proxy_port`].
    pub embedded_proxy: bool,
    /// A `[backup]` table with its repository at `<test dir>/repo`, plus
    /// these extra keys (TOML literals; a `repository` key replaces that
    /// directory).
    pub backup: Option<Vec<(String, String)>>,
    /// `api.token`, the same on every node (members then confirm each
    /// other's authenticated calls, such as `POST /failsafe`).
    pub api_token: Option<String>,
    /// Raw TOML appended to every node's file, after all other tables.
    pub extra_toml: String,
}

impl ClusterOptions {
    /// Adds an `[ha]` key; `value` is a TOML literal (quote durations).
    pub fn ha(mut self, key: &str, value: &str) -> Self {
        self.ha.push((key.into(), value.into()));
        self
    }

    /// Adds an `[etcd]` key; `value` is a TOML literal.
    pub fn etcd(mut self, key: &str, value: &str) -> Self {
        self.etcd.push((key.into(), value.into()));
        self
    }

    /// etcd over TLS with client certificates (see [`ClusterOptions::etcd_tls`]).
    pub fn etcd_tls(mut self) -> Self {
        self.etcd_tls = true;
        self
    }

    /// Configures `[backup]` with the repository `<test dir>/repo`.
    pub fn backup(mut self) -> Self {
        self.backup.get_or_insert_with(Vec::new);
        self
    }

    /// Gives every node the same generated `api.token`.
    pub fn api_token(mut self) -> Self {
        self.api_token = Some(password("api"));
        self
    }

    /// Adds a `[postgres.parameters]` entry; `value` is a TOML literal.
    pub fn parameter(mut self, key: &str, value: &str) -> Self {
        self.parameters.push((key.into(), value.into()));
        self
    }
}

/// A password that is unique per process and call (at least 8 characters,
/// as the config requires, and free of quoting trouble).
fn password(kind: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{kind}-{}-{}-{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A cluster name from a test name: `[A-Za-z0-9_.-]`, at most 63 chars.
fn cluster_name(test: &str) -> String {
    let mut s: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    s.truncate(40);
    format!("{s}-{}", std::process::id())
}

/// One pgha member: its config file, its agent process, its PostgreSQL.
pub struct Node {
    name: String,
    cluster: String,
    /// `<test dir>/<name>`: everything of this node lives here.
    dir: PathBuf,
    config_path: PathBuf,
    data_dir: PathBuf,
    state_dir: PathBuf,
    log_path: PathBuf,
    pg_port: u16,
    api_port: u16,
    su_password: String,
    proxy_port: Option<u16>,
    agent: Option<ProcessGuard>,
    /// Run the agent inside this network namespace (`ip netns exec`).
    netns: Option<String>,
    /// Run the agent through this command (e.g. `setpriv ...`), which
    /// must exec it so that the pid stays the agent's.
    wrapper: Vec<String>,
}

impl Node {
    /// Creates `<test dir>/<name>` and writes `<name>.toml` in it; does not
    /// start anything.
    pub fn new(
        test_dir: &TestDir,
        cluster: &str,
        name: &str,
        etcd_endpoints: &[String],
        opts: &ClusterOptions,
    ) -> anyhow::Result<Node> {
        Self::with_passwords(
            test_dir,
            cluster,
            name,
            etcd_endpoints,
            opts,
            &password("su"),
            &password("repl"),
        )
    }

    /// Like [`new`](Node::new), with the passwords every member of one
    /// cluster must share.
    pub fn with_passwords(
        test_dir: &TestDir,
        cluster: &str,
        name: &str,
        etcd_endpoints: &[String],
        opts: &ClusterOptions,
        su_password: &str,
        repl_password: &str,
    ) -> anyhow::Result<Node> {
        let dir = test_dir.subdir(name);
        let node = Node {
            name: name.into(),
            cluster: cluster.into(),
            config_path: dir.join(format!("{name}.toml")),
            data_dir: dir.join("data"),
            state_dir: dir.join("state"),
            log_path: dir.join("agent.log"),
            pg_port: free_port(),
            api_port: free_port(),
            su_password: su_password.into(),
            proxy_port: opts.embedded_proxy.then(free_port),
            agent: None,
            netns: None,
            wrapper: Vec::new(),
            dir,
        };
        let endpoints: Vec<String> = etcd_endpoints.iter().map(|e| format!("{e:?}")).collect();
        let mut toml = format!(
            r#"# written by the pgha integration tests
cluster = "{cluster}"
name = "{name}"
state_dir = "{state}"

[etcd]
endpoints = [{endpoints}]
"#,
            state = node.state_dir.display(),
            endpoints = endpoints.join(", "),
        );
        for (k, v) in &opts.etcd {
            toml.push_str(&format!("{k} = {v}\n"));
        }
        toml.push_str("\n[ha]\n");
        for (k, v) in &opts.ha {
            toml.push_str(&format!("{k} = {v}\n"));
        }
        toml.push_str(&format!(
            r#"
[postgres]
data_dir = "{data}"
port = {pg_port}
superuser = {{ username = "{SUPERUSER}", password = "{su_password}" }}
replication = {{ username = "{REPLICATION_USER}", password = "{repl_password}" }}

[postgres.parameters]
"#,
            data = node.data_dir.display(),
            pg_port = node.pg_port,
        ));
        for (k, v) in &opts.parameters {
            toml.push_str(&format!("{k} = {v}\n"));
        }
        toml.push_str(&format!(
            "\n[api]\nlisten = \"127.0.0.1:{}\"\n",
            node.api_port
        ));
        if let Some(token) = &opts.api_token {
            toml.push_str(&format!("token = \"{token}\"\n"));
        }
        if let Some(port) = node.proxy_port {
            // The verifier has its own salt, so the proxy logs in to the
            // servers with the password from the passfile.
            std::fs::create_dir_all(&node.dir)?;
            let verifier =
                pgha::proxy::scram::ScramVerifier::from_password(su_password, b"test salt", 4096);
            let userlist = node.dir.join("userlist.txt");
            std::fs::write(
                &userlist,
                format!("\"{SUPERUSER}\" \"{}\"\n", verifier.encode()),
            )?;
            let passfile = node.dir.join("proxy-pgpass");
            std::fs::write(&passfile, format!("*:*:*:{SUPERUSER}:{su_password}\n"))?;
            std::fs::set_permissions(
                &passfile,
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )?;
            toml.push_str(&format!(
                "\n[proxy]\nlisten_rw = \"127.0.0.1:{port}\"\nauth_file = \"{}\"\nserver_passfile = \"{}\"\n",
                userlist.display(),
                passfile.display()
            ));
        }
        if let Some(keys) = &opts.backup {
            toml.push_str("\n[backup]\n");
            // A `repository` among the extra keys (an S3 URL) replaces the
            // test directory's.
            if !keys.iter().any(|(k, _)| k == "repository") {
                toml.push_str(&format!(
                    "repository = {:?}\n",
                    test_dir.path().join("repo").display().to_string()
                ));
            }
            for (k, v) in keys {
                toml.push_str(&format!("{k} = {v}\n"));
            }
        }
        toml.push_str(&opts.extra_toml);
        std::fs::write(&node.config_path, toml)
            .with_context(|| format!("write {}", node.config_path.display()))?;
        Ok(node)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn cluster(&self) -> &str {
        &self.cluster
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }
    /// The embedded proxy's read-write port (with `embedded_proxy`).
    pub fn proxy_port(&self) -> Option<u16> {
        self.proxy_port
    }
    pub fn pg_port(&self) -> u16 {
        self.pg_port
    }
    pub fn api_port(&self) -> u16 {
        self.api_port
    }
    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }
    pub fn superuser_password(&self) -> &str {
        &self.su_password
    }

    /// Starts `pgha agent -c <config>`, appending to `agent.log`. Fails if
    /// this fixture's agent is already running.
    pub fn start(&mut self) -> anyhow::Result<()> {
        if let Some(p) = &mut self.agent
            && p.try_wait().is_none()
        {
            bail!("{}: the agent is already running", self.name);
        }
        self.agent = None;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("open {}", self.log_path.display()))?;
        let mut cmd = match &self.netns {
            // `ip netns exec` execs the program: the pid stays the agent's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, PGHA_BIN]);
                c
            }
            None if !self.wrapper.is_empty() => {
                let mut c = Command::new(&self.wrapper[0]);
                c.args(&self.wrapper[1..]).arg(PGHA_BIN);
                c
            }
            None => Command::new(PGHA_BIN),
        };
        cmd.arg("agent")
            .arg("-c")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.agent = Some(ProcessGuard::spawn(&mut cmd)?);
        Ok(())
    }

    /// Starts the agent (and so PostgreSQL and the fence keeper) inside
    /// network namespace `ns` from the next [`start`](Node::start) on.
    /// The caller rewrites the addresses in the config to match.
    pub fn set_netns(&mut self, ns: &str) {
        self.netns = Some(ns.to_string());
    }

    /// Starts the agent through `wrapper` (a program and its arguments,
    /// which execs the pgha command line appended to it) from the next
    /// [`start`](Node::start) on.
    pub fn set_wrapper(&mut self, wrapper: &[&str]) {
        self.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
    }

    /// The agent's pid while this fixture's agent process exists.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(ProcessGuard::pid)
    }

    /// True while the agent process runs (reaps it once it has exited).
    pub fn agent_running(&mut self) -> bool {
        self.agent.as_mut().is_some_and(|p| p.try_wait().is_none())
    }

    /// The agent's exit status, if it was started and has exited.
    pub fn agent_exit_status(&mut self) -> Option<ExitStatus> {
        self.agent.as_mut().and_then(ProcessGuard::try_wait)
    }

    /// Clean stop: SIGCONT + SIGTERM to the agent only (it stops PostgreSQL
    /// itself), wait for it to exit, SIGKILL its process group after a
    /// grace period. Returns the agent's exit status.
    pub async fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(mut agent) = self.agent.take() else {
            bail!("{}: the agent is not running", self.name);
        };
        let pid = Pid::from_raw(agent.pid() as i32);
        if agent.try_wait().is_none() {
            let _ = kill(pid, Signal::SIGCONT);
            let _ = kill(pid, Signal::SIGTERM);
        }
        let status = agent.wait_timeout(STOP_GRACE).await;
        drop(agent); // SIGKILLs whatever is left of its group
        status.with_context(|| {
            format!(
                "{}: the agent did not exit within {STOP_GRACE:?} of SIGTERM",
                self.name
            )
        })
    }

    /// SIGKILLs the agent process (a crash). PostgreSQL and the fence
    /// keeper run in their own process groups and survive it; tool
    /// children the agent was running (initdb, pg_basebackup) are killed
    /// with the agent's process group when the fixture reaps it.
    pub async fn kill_agent(&mut self) -> anyhow::Result<()> {
        let Some(mut agent) = self.agent.take() else {
            bail!("{}: the agent is not running", self.name);
        };
        let _ = kill(Pid::from_raw(agent.pid() as i32), Signal::SIGKILL);
        agent
            .wait_timeout(Duration::from_secs(5))
            .await
            .with_context(|| format!("{}: the agent survived SIGKILL", self.name))?;
        Ok(())
    }

    /// SIGSTOPs the agent process only (not PostgreSQL, not the keeper).
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.signal_agent(Signal::SIGSTOP)
    }

    /// SIGCONTs the agent after [`freeze`](Node::freeze).
    pub fn thaw(&self) -> anyhow::Result<()> {
        self.signal_agent(Signal::SIGCONT)
    }

    fn signal_agent(&self, sig: Signal) -> anyhow::Result<()> {
        let pid = self
            .agent_pid()
            .with_context(|| format!("{}: the agent is not running", self.name))?;
        kill(Pid::from_raw(pid as i32), sig)
            .with_context(|| format!("{}: kill({pid}, {sig})", self.name))
    }

    /// The live postmaster's pid from `data_dir/postmaster.pid`.
    pub fn postmaster_pid(&self) -> Option<i32> {
        postmaster_pid(&self.data_dir)
    }

    /// SIGKILLs the postmaster and all its children at once (postmaster
    /// stopped first so it cannot fork replacements). Returns its pid.
    pub fn kill_postgres(&self) -> Option<i32> {
        let pm = self.postmaster_pid()?;
        kill_tree(pm);
        Some(pm)
    }

    /// `GET /status`, parsed. Errors on connection failures and on non-2xx
    /// answers (503 while the agent has not finished its first loop).
    pub async fn status(&self) -> anyhow::Result<Value> {
        let (code, body) = self.api_get("/status").await?;
        if !(200..300).contains(&code) {
            bail!("{}: GET /status answered {code}: {body}", self.name);
        }
        Ok(body)
    }

    /// `GET path` on the agent's API: status code and JSON body.
    pub async fn api_get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let resp = client
            .get(format!("{}{path}", self.api_url()))
            .send()
            .await
            .with_context(|| format!("{}: GET {path}", self.name))?;
        let code = resp.status().as_u16();
        let body = resp
            .json::<Value>()
            .await
            .with_context(|| format!("{}: GET {path}: body is not JSON", self.name))?;
        Ok((code, body))
    }

    /// Connection settings for the superuser over TCP to this node.
    pub fn pg_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.pg_port)
            .user(SUPERUSER)
            .password(self.su_password.as_str())
            .dbname("postgres")
            .application_name("pgha-tests")
            .connect_timeout(Duration::from_secs(2));
        c
    }

    /// A superuser session over TCP 127.0.0.1 (the connection task runs in
    /// the background and ends when the client is dropped).
    pub async fn client(&self) -> anyhow::Result<tokio_postgres::Client> {
        connect(&self.pg_config()).await.with_context(|| {
            format!(
                "{}: connect to PostgreSQL on port {}",
                self.name, self.pg_port
            )
        })
    }

    /// Runs `sql` (simple query protocol, may hold several statements) and
    /// returns the rows of every statement as text.
    pub async fn psql(&self, sql: &str) -> anyhow::Result<Vec<Vec<Option<String>>>> {
        let client = self.client().await?;
        let msgs = tokio::time::timeout(Duration::from_secs(10), client.simple_query(sql))
            .await
            .with_context(|| format!("{}: {sql:?} timed out", self.name))?
            .with_context(|| format!("{}: {sql:?}", self.name))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .collect())
    }

    /// The first column of the first row of `sql`.
    pub async fn scalar(&self, sql: &str) -> anyhow::Result<Option<String>> {
        let rows = self.psql(sql).await?;
        let row = rows
            .into_iter()
            .next()
            .with_context(|| format!("{}: {sql:?} returned no row", self.name))?;
        Ok(row.into_iter().next().flatten())
    }

    /// `NOT pg_is_in_recovery()`.
    pub async fn is_writable(&self) -> anyhow::Result<bool> {
        Ok(self
            .scalar("SELECT NOT pg_is_in_recovery()")
            .await?
            .as_deref()
            == Some("t"))
    }

    /// PostgreSQL's system identifier (the same on every member of one
    /// cluster, new after an initdb).
    pub async fn system_identifier(&self) -> anyhow::Result<String> {
        self.scalar("SELECT system_identifier::text FROM pg_control_system()")
            .await?
            .context("no system identifier")
    }

    /// The server's current timeline: from the WAL insert position on a
    /// primary (pg_control may lag behind a promotion until the next
    /// checkpoint), from pg_control / the WAL receiver on a standby.
    pub async fn timeline(&self) -> anyhow::Result<u32> {
        let tl = self
            .scalar(
                "SELECT CASE WHEN pg_is_in_recovery()
                    THEN greatest((SELECT received_tli FROM pg_stat_wal_receiver),
                                  (SELECT timeline_id FROM pg_control_checkpoint()))
                    ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int
                 END",
            )
            .await?
            .context("no timeline")?;
        Ok(tl.parse()?)
    }

    /// Whether something accepts TCP connections on the PostgreSQL port.
    pub async fn pg_port_open(&self) -> bool {
        matches!(
            tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(("127.0.0.1", self.pg_port)),
            )
            .await,
            Ok(Ok(_))
        )
    }

    /// Live `pgha fence-keeper` processes guarding this node's data dir.
    pub fn fence_keeper_pids(&self) -> Vec<i32> {
        let data_dir = self.data_dir.to_string_lossy().to_string();
        all_pids()
            .into_iter()
            .filter(|&p| alive(p))
            .filter(|&p| {
                let args = cmdline(p);
                args.iter().any(|a| a == "fence-keeper")
                    && args
                        .windows(2)
                        .any(|w| w[0] == "--data-dir" && w[1] == data_dir)
            })
            .collect()
    }

    /// The whole agent log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last `lines` lines of the agent log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path, lines)
    }

    /// The last `lines` lines of PostgreSQL's server log.
    pub fn pg_log_tail(&self, lines: usize) -> String {
        tail(&self.state_dir.join("postgres/postgresql.log"), lines)
    }

    /// The last `lines` lines of the fence keeper's log.
    pub fn fence_log(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("fence-keeper.log")).unwrap_or_default()
    }

    /// Kills everything of this node: the agent (SIGKILL), its postmaster
    /// and the postmaster's children, and every process whose command line
    /// names the node's directory (fence keeper, tools). Waits until they
    /// are gone. Idempotent.
    pub fn kill_everything(&mut self) {
        self.agent = None; // ProcessGuard's drop SIGKILLs and reaps the group
        let mut killed = Vec::new();
        if let Some(pm) = self.postmaster_pid() {
            killed.extend(kill_tree(pm));
        }
        // Postmasters that lost their pid file, fence keepers, tools: all
        // name a path under the node's directory on their command line.
        for pid in pids_mentioning(&self.dir) {
            killed.extend(kill_tree(pid));
        }
        let left = wait_gone(&killed, Duration::from_secs(5));
        if !left.is_empty() {
            eprintln!(
                "{}: processes still alive 5 s after SIGKILL: {left:?}",
                self.name
            );
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- {} agent log (last {LOG_TAIL_LINES} lines of {}) ----\n{}\n---- {} postgresql.log (last 15 lines) ----\n{}\n---- end {} ----",
                self.name,
                self.log_path.display(),
                self.log_tail(LOG_TAIL_LINES),
                self.name,
                self.pg_log_tail(15),
                self.name,
            );
        }
        self.kill_everything();
    }
}

/// An etcd and N nodes named `node1`..`nodeN`. Field order matters: nodes
/// are dropped (killed) before etcd, and both before the directory.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub etcd: Etcd,
    name: String,
    options: ClusterOptions,
    su_password: String,
    repl_password: String,
    dir: TestDir,
}

impl Cluster {
    /// Starts etcd and `n` agents and waits until `pgha list` shows one
    /// leader and `n - 1` streaming replicas. `test` names the directory
    /// and (with the pid) the cluster; keep it short.
    pub async fn start(test: &str, n: usize, options: ClusterOptions) -> anyhow::Result<Cluster> {
        let mut cluster = Self::create(test, n, options).await?;
        for node in &mut cluster.nodes {
            node.start()?;
        }
        let timeout = cluster.options.startup_timeout.unwrap_or(STARTUP_TIMEOUT);
        if let Err(e) = cluster.wait_healthy(timeout).await {
            let logs = cluster.log_tails(LOG_TAIL_LINES);
            bail!("{e:#}\n{logs}");
        }
        Ok(cluster)
    }

    /// Starts etcd and writes the node configs, without starting agents.
    pub async fn create(test: &str, n: usize, options: ClusterOptions) -> anyhow::Result<Cluster> {
        let dir = TestDir::new(test);
        let mut options = options;
        let etcd = if options.etcd_tls {
            let pki = Pki::generate(&dir.subdir("pki"))?;
            for (key, path) in [
                ("ca_file", &pki.ca),
                ("cert_file", &pki.client_cert),
                ("key_file", &pki.client_key),
            ] {
                options = options.etcd(key, &format!("{:?}", path.display().to_string()));
            }
            Etcd::spawn_tls(&dir, "e1", &pki).await?
        } else {
            Etcd::spawn(&dir, "e1").await?
        };
        let name = cluster_name(test);
        let (su_password, repl_password) = (password("su"), password("repl"));
        let mut nodes = Vec::new();
        for i in 1..=n {
            nodes.push(Node::with_passwords(
                &dir,
                &name,
                &format!("node{i}"),
                &etcd.endpoints(),
                &options,
                &su_password,
                &repl_password,
            )?);
        }
        // New clusters default to synchronous_mode = on and failsafe_mode
        // = on; these tests are written for asynchronous replication and
        // for a leader that demotes when etcd is gone, unless they turn
        // either on themselves (the sync, failsafe and chaos tests do).
        if let Some(first) = nodes.first() {
            pgha(
                &["config", "set", "synchronous_mode=off", "failsafe_mode=off"],
                first.config_path(),
            )
            .await
            .context("set the cluster-wide defaults before the agents start")?;
        }
        Ok(Cluster {
            nodes,
            etcd,
            name,
            options,
            su_password,
            repl_password,
            dir,
        })
    }

    /// Adds `node<N+1>` with the cluster's settings (not started).
    pub fn add_node(&mut self) -> anyhow::Result<&mut Node> {
        let node = Node::with_passwords(
            &self.dir,
            &self.name,
            &format!("node{}", self.nodes.len() + 1),
            &self.etcd.endpoints(),
            &self.options,
            &self.su_password,
            &self.repl_password,
        )?;
        self.nodes.push(node);
        Ok(self.nodes.last_mut().expect("just pushed"))
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    pub fn superuser_password(&self) -> &str {
        &self.su_password
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Every node's PostgreSQL, in node order, as one libpq-style
    /// multi-host configuration that lands on the writable one
    /// (`target_session_attrs=read-write`, 1 s connect timeout per host).
    pub fn multi_host_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        for n in &self.nodes {
            c.host("127.0.0.1").port(n.pg_port);
        }
        c.user(SUPERUSER)
            .password(self.su_password.as_str())
            .dbname("postgres")
            .application_name("pgha-tests")
            .connect_timeout(Duration::from_secs(1))
            .target_session_attrs(TargetSessionAttrs::ReadWrite);
        c
    }

    /// `pgha list --json -c node1.toml`, run as a subprocess.
    pub async fn list_json(&self) -> anyhow::Result<Value> {
        let config = self.nodes.first().context("no nodes")?.config_path.clone();
        list_json(&config).await
    }

    /// The leader's name according to `pgha list`, if there is one.
    pub async fn leader(&self) -> anyhow::Result<Option<String>> {
        let list = self.list_json().await?;
        Ok(members(&list)
            .iter()
            .find(|m| m["role"] == "leader")
            .and_then(|m| m["name"].as_str())
            .map(str::to_string))
    }

    /// The leader's node; fails when there is none.
    pub async fn leader_node(&self) -> anyhow::Result<&Node> {
        let name = self.leader().await?.context("no leader")?;
        Ok(self.node(&name))
    }

    /// Names of the nodes that are not the leader.
    pub async fn replica_names(&self) -> anyhow::Result<Vec<String>> {
        let leader = self.leader().await?.context("no leader")?;
        Ok(self
            .nodes
            .iter()
            .filter(|n| n.name != leader)
            .map(|n| n.name.clone())
            .collect())
    }

    /// Waits until `pgha list` names a leader other than `name`.
    pub async fn wait_for_leader_other_than(
        &self,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        wait_until(timeout, Duration::from_millis(100), || async {
            let leader = self.leader().await.ok().flatten()?;
            (leader != name).then_some(leader)
        })
        .await
        .with_context(|| format!("no leader other than {name}"))
    }

    /// Waits until `pgha list` shows every node: exactly one leader that is
    /// `running` and every other node a `streaming` replica. Returns that
    /// listing.
    pub async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<Value> {
        let expected: BTreeSet<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        let last = std::sync::Mutex::new(String::new());
        wait_until(timeout, Duration::from_millis(200), || async {
            let list = match self.list_json().await {
                Ok(l) => l,
                Err(e) => {
                    *last.lock().unwrap() = format!("{e:#}");
                    return None;
                }
            };
            *last.lock().unwrap() = list.to_string();
            is_healthy(&list, &expected).then_some(list)
        })
        .await
        .with_context(|| {
            format!(
                "cluster not healthy (one running leader, other members streaming); last `pgha list`: {}",
                last.lock().unwrap()
            )
        })
    }

    /// Every node's agent and PostgreSQL log tails, for error messages.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            s.push_str(&format!(
                "---- {} agent log ----\n{}\n---- {} postgresql.log ----\n{}\n",
                n.name,
                n.log_tail(lines),
                n.name,
                n.pg_log_tail(10)
            ));
        }
        s
    }
}

/// `members` of a `pgha list --json` output (empty when malformed).
pub fn members(list: &Value) -> Vec<Value> {
    list["members"].as_array().cloned().unwrap_or_default()
}

/// One member of a `pgha list --json` output, by name.
pub fn member<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list["members"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == name)
}

/// Exactly the `expected` members, one running leader, the rest streaming.
pub fn is_healthy(list: &Value, expected: &BTreeSet<String>) -> bool {
    let members = members(list);
    let names: BTreeSet<String> = members
        .iter()
        .filter_map(|m| m["name"].as_str().map(str::to_string))
        .collect();
    let leaders = members
        .iter()
        .filter(|m| m["role"] == "leader" && m["state"] == "running")
        .count();
    let streaming = members
        .iter()
        .filter(|m| m["role"] == "replica" && m["state"] == "streaming")
        .count();
    // In mode `on` a leader whose standbys stream names one within about a
    // second; until then its record is degraded and nobody may take over,
    // so a test that injects a fault first would test nothing.
    let settled = !(streaming > 0 && list["synchronous_degraded"] == true);
    &names == expected && leaders == 1 && streaming + 1 == expected.len() && settled
}

/// Runs `pgha SUBCOMMAND -c CONFIG REST...` (90 s at most) and returns its
/// standard output; a non-zero exit is an error carrying both outputs.
/// The subcommands with subcommands of their own (`config set`, `backup
/// list`...) take both words before `-c`.
pub async fn pgha(args: &[&str], config: &Path) -> anyhow::Result<String> {
    let nested = matches!(args.first(), Some(&"config"));
    let (sub, rest) = args.split_at(if nested { 2 } else { 1 }.min(args.len()));
    anyhow::ensure!(!sub.is_empty(), "no subcommand");
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(PGHA_BIN)
            .args(sub)
            .arg("-c")
            .arg(config)
            .args(rest)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("pgha {args:?} timed out"))?
    .with_context(|| format!("run pgha {args:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "pgha {args:?} failed ({}): {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}

/// `pgha list --json -c <config>`.
pub async fn list_json(config: &Path) -> anyhow::Result<Value> {
    let out = pgha(&["list", "--json"], config).await?;
    serde_json::from_str(&out).with_context(|| format!("pgha list --json printed no JSON: {out}"))
}

/// Connects and runs the connection on a background task.
pub async fn connect(config: &tokio_postgres::Config) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Reads `postmaster.pid` and checks the process is a live `postgres`.
pub fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    (pid > 0 && alive(pid) && comm(pid).as_deref() == Some("postgres")).then_some(pid)
}

fn comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// True when `dir` does not exist or has no entries.
pub fn data_dir_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

/// Exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Live processes whose parent is `pid`.
pub fn children_of(pid: i32) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&p| parent_of(p) == Some(pid) && alive(p))
        .collect()
}

/// A process's arguments (empty when it is gone or a kernel thread).
pub fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Live processes (other than this one) with an argument naming `dir` or
/// a path under it.
pub fn pids_mentioning(dir: &Path) -> Vec<i32> {
    let dir = dir.to_string_lossy().to_string();
    let under = format!("{dir}/");
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|&p| p != me && alive(p))
        .filter(|&p| {
            cmdline(p)
                .iter()
                .any(|arg| arg.ends_with(dir.as_str()) || arg.contains(&under))
        })
        .collect()
}

/// Stops `pid`, SIGKILLs its children, then it. Returns every pid signalled.
fn kill_tree(pid: i32) -> Vec<i32> {
    let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
    let mut killed = vec![pid];
    for child in children_of(pid) {
        let _ = kill(Pid::from_raw(child), Signal::SIGKILL);
        killed.push(child);
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    killed
}

/// Waits (blocking, briefly) until none of `pids` is alive; returns those
/// still alive at the deadline.
fn wait_gone(pids: &[i32], timeout: Duration) -> Vec<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
