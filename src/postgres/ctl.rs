//! Running PostgreSQL's own tools against the local data directory.
//!
//! PostgreSQL refuses to run as root. When the agent is root, every tool
//! runs as `postgres.os_user` (uid/gid switched in the child, supplementary
//! groups dropped), and every file pgha writes for PostgreSQL is created
//! for that user through a checked directory descriptor ([`TrustedDir`]),
//! never by following a path that account could have redirected. As a
//! normal user, everything runs as that user.
//!
//! Layout: the state directory belongs to the agent's account and holds
//! what safety depends on (fence state, former-primary mark); its
//! `postgres/` subdirectory belongs to the PostgreSQL account and holds
//! what PostgreSQL and its tools read or write (passfile, socket, log).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use super::conf::{self, HbaPolicy, PassEntry, ServerSettings, Upstream};
use crate::config::{Config, RoleCredentials};
use crate::model::Timeline;
use crate::safe_fs::{Owner, SafeFsError, Strictness, TrustedDir};

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("OS user {user:?} (postgres.os_user) does not exist; create it or set another")]
    NoSuchOsUser { user: String },
    #[error("{action}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}) while trying to {action}: {stderr}")]
    Tool {
        tool: String,
        action: String,
        status: String,
        stderr: String,
    },
    #[error("{tool} did not finish within {timeout:?} while trying to {action}")]
    ToolTimeout {
        tool: String,
        action: String,
        timeout: Duration,
    },
    #[error("SQL failed while trying to {action}")]
    Sql {
        action: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("could not connect to the local PostgreSQL")]
    Connect(#[source] tokio_postgres::Error),
    #[error("unsafe or unusable directory")]
    Directory(#[from] SafeFsError),
    #[error("{0}")]
    Unexpected(String),
}

pub(super) fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> PgError {
    let action = action.into();
    move |source| PgError::Io { action, source }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Checkpoint, disconnect clients, shut down cleanly.
    Fast,
    /// Abort at once; the next start runs crash recovery.
    Immediate,
}

/// The unprivileged account PostgreSQL runs as when the agent is root.
#[derive(Clone, Debug)]
pub struct OsUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// The local PostgreSQL server pgha manages.
#[derive(Clone, Debug)]
pub struct Instance {
    pub name: String,
    pub bin_dir: PathBuf,
    pub data_dir: PathBuf,
    /// The agent's own state directory (fence state, former-primary mark).
    pub state: Arc<TrustedDir>,
    /// The PostgreSQL account's directory inside it (passfile, log).
    pub pg_dir: Arc<TrustedDir>,
    pub socket_dir: PathBuf,
    pub passfile: PathBuf,
    pub log_file: PathBuf,
    pub port: u16,
    pub listen_addresses: String,
    pub superuser: RoleCredentials,
    pub replication: RoleCredentials,
    pub hba: HbaPolicy,
    pub parameters: std::collections::BTreeMap<String, String>,
    /// The cluster-wide parameters from etcd this member accepted, shared
    /// by every clone of the instance so each rendering uses the latest.
    cluster_parameters: Arc<std::sync::Mutex<std::collections::BTreeMap<String, String>>>,
    /// Set when the agent is root.
    pub os_user: Option<OsUser>,
    /// Who owns the data directory and the files PostgreSQL reads.
    pub pg_owner: Owner,
    /// Archive settings when `[backup]` is configured.
    pub archiving: Option<conf::Archiving>,
    /// `backup.clone_from = "backup"`: replicas start from the repository.
    pub clone_from_backup: bool,
    /// `bootstrap.wal_segment_size` in MiB, for initdb.
    pub wal_segment_mib: Option<u32>,
}

/// Subdirectory of the state directory that belongs to the PostgreSQL
/// account.
pub const PG_SUBDIR: &str = "postgres";

/// The repository file of a bootstrap from a backup, in the PostgreSQL
/// account's directory beside the cluster's own.
pub const BOOTSTRAP_SOURCE_FILE: &str = "bootstrap-source.toml";

/// What [`Instance::restore_for_bootstrap`] unpacked.
#[derive(Clone, Debug)]
pub struct BootstrapRestore {
    pub backup: String,
    /// The timeline replay follows (checked to carry the backup).
    pub timeline: crate::model::Timeline,
    /// Reads the WAL of the repository restored from.
    pub restore_command: String,
}

impl Instance {
    /// Resolves the OS user and opens (creating when missing) the state
    /// directory and the PostgreSQL account's subdirectory, then writes the
    /// passfile. Refuses a state directory another account owns or could
    /// write.
    pub fn open(cfg: &Config) -> Result<Instance, PgError> {
        let os_user = if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name(&cfg.postgres.os_user)
                .ok()
                .flatten()
                .ok_or_else(|| PgError::NoSuchOsUser {
                    user: cfg.postgres.os_user.clone(),
                })?;
            Some(OsUser {
                name: user.name,
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
                home: user.dir,
            })
        } else {
            None
        };
        let pg_owner = os_user.as_ref().map_or_else(Owner::current, |u| Owner {
            uid: u.uid,
            gid: u.gid,
        });
        // 0711 when PostgreSQL runs as another account: it must reach its
        // subdirectory, but may neither list nor change this one.
        let state_mode = if os_user.is_some() { 0o711 } else { 0o700 };
        let state = TrustedDir::create(
            &cfg.state_dir,
            Owner::current(),
            state_mode,
            Strictness::Private,
        )?;
        let pg_dir = state.subdir(PG_SUBDIR, pg_owner, 0o700, Strictness::OwnerOnly)?;
        let archiving = match &cfg.backup {
            Some(b) => {
                let exe = std::env::current_exe().map_err(io("find the pgha binary"))?;
                Some(crate::backup::agent::prepare(b, &pg_dir, pg_owner, &exe)?)
            }
            None => None,
        };
        let instance = Instance {
            name: cfg.name.to_string(),
            bin_dir: cfg.postgres.bin_dir.clone(),
            data_dir: cfg.postgres.data_dir.clone(),
            state: Arc::new(state),
            pg_dir: Arc::new(pg_dir),
            socket_dir: cfg.socket_dir(),
            passfile: cfg.passfile_path(),
            log_file: cfg.postgres_log_path(),
            port: cfg.postgres.port,
            listen_addresses: cfg.postgres.listen_addresses.clone(),
            superuser: cfg.postgres.superuser.clone(),
            replication: cfg.postgres.replication.clone(),
            hba: HbaPolicy {
                superuser: cfg.postgres.superuser.username.clone(),
                replication_user: cfg.postgres.replication.username.clone(),
                replication_networks: cfg.postgres.replication_networks.clone(),
                client_networks: cfg.postgres.client_networks.clone(),
                extra_lines: cfg.postgres.pg_hba.clone(),
            },
            parameters: cfg.postgres.parameters.clone(),
            cluster_parameters: Arc::default(),
            os_user,
            pg_owner,
            archiving,
            clone_from_backup: cfg
                .backup
                .as_ref()
                .is_some_and(|b| b.clone_from == crate::config::backup::CloneFrom::Backup),
            wal_segment_mib: cfg.bootstrap.wal_segment_mib,
        };
        instance.prepare()?;
        Ok(instance)
    }

    /// A command for one of PostgreSQL's binaries, as the right OS user,
    /// with the passfile in the environment (never a password in argv).
    pub(super) fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(tool));
        cmd.env("PGPASSFILE", &self.passfile)
            .env("LC_ALL", "C.UTF-8")
            .env_remove("PGPASSWORD")
            .current_dir(self.pg_dir.path())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(u) = &self.os_user {
            cmd.uid(u.uid)
                .gid(u.gid)
                .env("HOME", &u.home)
                .env("USER", &u.name);
        }
        cmd
    }

    async fn run(
        &self,
        tool: &str,
        args: &[&std::ffi::OsStr],
        action: &str,
        timeout: Duration,
    ) -> Result<String, PgError> {
        let mut cmd = self.command(tool);
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let out = tokio::time::timeout(timeout, cmd.output())
            .await
            .map_err(|_| PgError::ToolTimeout {
                tool: tool.into(),
                action: action.into(),
                timeout,
            })?
            .map_err(io(format!("run {tool} to {action}")))?;
        if !out.status.success() {
            return Err(PgError::Tool {
                tool: tool.into(),
                action: action.into(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// The data directory, opened without following a symlink and checked
    /// to belong to the PostgreSQL account.
    pub(super) fn data_dir_handle(&self) -> Result<TrustedDir, PgError> {
        Ok(TrustedDir::open(
            &self.data_dir,
            self.pg_owner,
            Strictness::OwnerOnly,
        )?)
    }

    /// Creates the socket directory and writes the passfile.
    fn prepare(&self) -> Result<(), PgError> {
        self.pg_dir
            .subdir("run", self.pg_owner, 0o700, Strictness::OwnerOnly)?;
        let entries = [
            PassEntry {
                host: "*".into(),
                port: "*".into(),
                database: "replication".into(),
                user: self.replication.username.clone(),
                password: self.replication.password.expose().to_string(),
            },
            PassEntry {
                host: "*".into(),
                port: "*".into(),
                database: "*".into(),
                user: self.superuser.username.clone(),
                password: self.superuser.password.expose().to_string(),
            },
            PassEntry {
                host: "*".into(),
                port: "*".into(),
                database: "*".into(),
                user: self.replication.username.clone(),
                password: self.replication.password.expose().to_string(),
            },
        ];
        self.pg_dir
            .write("pgpass", conf::render_passfile(&entries).as_bytes(), 0o600)?;
        Ok(())
    }

    /// Creates a brand new cluster: checksums on (so pg_rewind works),
    /// SCRAM everywhere, the superuser's password read from a file that
    /// exists only for the duration of initdb.
    pub async fn initdb(&self) -> Result<(), PgError> {
        self.create_data_dir()?;
        let pwfile = self.pg_dir.join("initdb.pw");
        self.pg_dir.write(
            "initdb.pw",
            self.superuser.password.expose().as_bytes(),
            0o600,
        )?;
        let pwfile_arg = format!("--pwfile={}", pwfile.display());
        let segsize_arg = self.wal_segment_mib.map(|m| format!("--wal-segsize={m}"));
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "-D".as_ref(),
            self.data_dir.as_os_str(),
            "--data-checksums".as_ref(),
            "--encoding=UTF8".as_ref(),
            "--locale=C.UTF-8".as_ref(),
            "--auth=scram-sha-256".as_ref(),
            "-U".as_ref(),
            self.superuser.username.as_ref(),
            pwfile_arg.as_ref(),
        ];
        if let Some(a) = &segsize_arg {
            args.push(a.as_ref());
        }
        let result = self
            .run(
                "initdb",
                &args,
                "initialize a new cluster",
                Duration::from_secs(300),
            )
            .await;
        let _ = self.pg_dir.remove("initdb.pw");
        result?;
        // Keep initdb's postgresql.conf under another name; pgha writes its
        // own. Renamed within the checked directory, never through a path.
        self.data_dir_handle()?
            .rename("postgresql.conf", conf::BASE_CONF)?;
        Ok(())
    }

    fn create_data_dir(&self) -> Result<(), PgError> {
        TrustedDir::create(&self.data_dir, self.pg_owner, 0o700, Strictness::OwnerOnly)?;
        Ok(())
    }

    /// The cluster-wide parameters the next rendering uses.
    pub fn cluster_parameters(&self) -> std::collections::BTreeMap<String, String> {
        self.cluster_parameters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the cluster-wide parameters (already validated); takes
    /// effect at the next [`Instance::write_config`].
    pub fn set_cluster_parameters(&self, parameters: std::collections::BTreeMap<String, String>) {
        *self
            .cluster_parameters
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = parameters;
    }

    /// How to ask this server's `postgres` binary about parameter values.
    pub fn parameter_checker(&self) -> super::params::Checker<'_> {
        super::params::Checker {
            bin_dir: &self.bin_dir,
            run_as: self.os_user.as_ref().map(|u| (u.uid, u.gid)),
        }
    }

    /// Renders and writes postgresql.conf, pg_hba.conf and (for replicas)
    /// standby.signal. `upstream: None` with `standby: true` starts a
    /// standby that streams from nobody: read-only, safe without a lease.
    pub fn write_config(
        &self,
        standby: bool,
        upstream: Option<Upstream>,
        sync_names: Option<String>,
    ) -> Result<(), PgError> {
        let settings = ServerSettings {
            cluster_name: self.name.clone(),
            listen_addresses: self.listen_addresses.clone(),
            port: self.port,
            socket_dir: self.socket_dir.display().to_string(),
            passfile: self.passfile.display().to_string(),
            upstream,
            synchronous_standby_names: sync_names,
            extra: super::params::effective(&self.parameters, &self.cluster_parameters()).0,
            archive: self.archiving.clone(),
        };
        let data = self.data_dir_handle()?;
        data.write(
            "postgresql.conf",
            conf::render_postgresql_conf(&settings).as_bytes(),
            0o600,
        )?;
        data.write(
            "pg_hba.conf",
            conf::render_pg_hba(&self.hba).as_bytes(),
            0o600,
        )?;
        // pg_basebackup copies the leader's auto.conf; settings there would
        // override ours, so pgha keeps it empty.
        data.write(
            "postgresql.auto.conf",
            b"# Managed by pgha; use the pgha configuration.\n",
            0o600,
        )?;
        if standby {
            data.write(conf::STANDBY_SIGNAL, b"", 0o600)?;
        } else {
            data.remove(conf::STANDBY_SIGNAL)?;
        }
        Ok(())
    }

    /// Starts the postmaster without waiting for it to accept connections:
    /// the HA loop keeps running and observes "starting" until it is up.
    /// The server gets its own process group so that signals aimed at the
    /// agent do not reach it.
    pub async fn start(&self) -> Result<(), PgError> {
        reap_postgres_orphans();
        self.wait_for_previous_server(Duration::from_secs(2)).await;
        let mut cmd = self.command("pg_ctl");
        cmd.args(["start", "-W", "-s", "-D"])
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        let out = tokio::time::timeout(Duration::from_secs(10), cmd.output())
            .await
            .map_err(|_| PgError::ToolTimeout {
                tool: "pg_ctl".into(),
                action: "start PostgreSQL".into(),
                timeout: Duration::from_secs(10),
            })?
            .map_err(io("run pg_ctl start"))?;
        if !out.status.success() {
            return Err(PgError::Tool {
                tool: "pg_ctl".into(),
                action: "start PostgreSQL".into(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        // pg_ctl -W returns before the postmaster wrote its pid file; wait
        // for it (briefly) so the next loop does not see "stopped" and
        // start a second postmaster.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while self.postmaster_pid().is_none() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// After a crash the old postmaster may linger as a zombie for a few
    /// milliseconds; PostgreSQL then refuses to start ("lock file already
    /// exists"). Wait, briefly, until its process is really gone.
    async fn wait_for_previous_server(&self, timeout: Duration) {
        let Some(pid) = read_pid_file(&self.data_dir)
            .and_then(|t| t.lines().next()?.trim().parse::<i32>().ok())
        else {
            return;
        };
        let deadline = tokio::time::Instant::now() + timeout;
        while std::path::Path::new(&format!("/proc/{pid}")).exists()
            && tokio::time::Instant::now() < deadline
        {
            if self.postmaster_pid() == Some(pid) {
                return; // alive and well: not ours to wait for
            }
            reap_postgres_orphans();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(&self, mode: StopMode, timeout: Duration) -> Result<(), PgError> {
        if self.postmaster_pid().is_none() {
            return Ok(());
        }
        let m = match mode {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        let secs = timeout.as_secs().max(1).to_string();
        let args: [&std::ffi::OsStr; 9] = [
            "stop".as_ref(),
            "-s".as_ref(),
            "-D".as_ref(),
            self.data_dir.as_os_str(),
            "-m".as_ref(),
            m.as_ref(),
            "-w".as_ref(),
            "-t".as_ref(),
            secs.as_ref(),
        ];
        let stopping = self.run(
            "pg_ctl",
            &args,
            "stop PostgreSQL",
            timeout + Duration::from_secs(2),
        );
        // pg_ctl waits until the postmaster's pid is gone, and a postmaster
        // that dies meanwhile (the fence keeper killed it, say) stays a
        // zombie of ours until we reap it: reap while waiting, or pg_ctl
        // waits for its whole timeout.
        tokio::pin!(stopping);
        let r = loop {
            tokio::select! {
                r = &mut stopping => break r,
                _ = tokio::time::sleep(Duration::from_millis(50)) => reap_postgres_orphans(),
            }
        };
        // The stopped postmaster was our adopted child: reap it.
        reap_postgres_orphans();
        match r {
            Ok(_) => Ok(()),
            // Already gone between the check and the stop: what we wanted.
            Err(_) if self.postmaster_pid().is_none() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The postmaster's pid, if one is running for this data directory.
    pub fn postmaster_pid(&self) -> Option<i32> {
        postmaster_pid(&self.data_dir)
    }

    /// Clones the leader's data directory with pg_basebackup, logging
    /// progress as it goes. `-X stream` holds a temporary slot on the leader
    /// for the copy; the member's own slot takes over once it streams.
    pub async fn basebackup(&self, up: &Upstream) -> Result<(), PgError> {
        self.remove_data_dir()?;
        self.create_data_dir()?;
        let mut cmd = self.command("pg_basebackup");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-h", &up.host, "-p", &up.port.to_string(), "-U", &up.user])
            .args(["-X", "stream", "-c", "fast", "-P", "-w"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(io("run pg_basebackup"))?;
        let mut stderr = child.stderr.take().expect("piped");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        let mut last_log = std::time::Instant::now() - Duration::from_secs(60);
        let mut errors = String::new();
        loop {
            let n = stderr
                .read(&mut chunk)
                .await
                .map_err(io("read pg_basebackup output"))?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            // -P redraws its progress line with '\r'.
            while let Some(pos) = buf.iter().position(|&b| b == b'\r' || b == b'\n') {
                let line = String::from_utf8_lossy(&buf[..pos]).trim().to_string();
                buf.drain(..=pos);
                if line.is_empty() {
                    continue;
                }
                if line.contains("kB (") || line.contains("tablespace") {
                    if last_log.elapsed() >= Duration::from_secs(2) {
                        tracing::info!(progress = %line, "cloning the leader");
                        last_log = std::time::Instant::now();
                    }
                } else {
                    errors.push_str(&line);
                    errors.push('\n');
                }
            }
        }
        let status = child.wait().await.map_err(io("wait for pg_basebackup"))?;
        if !status.success() {
            return Err(PgError::Tool {
                tool: "pg_basebackup".into(),
                action: format!("clone from {}:{}", up.host, up.port),
                status: status.to_string(),
                stderr: errors.trim().to_string(),
            });
        }
        tracing::info!("clone complete");
        Ok(())
    }

    /// Fills the data directory from the newest backup in the repository
    /// that lies on the history of `timeline` (the leader's), for a replica
    /// that then replays archived WAL and streams. `pgha backup
    /// unpack-replica` does the work as the PostgreSQL account, so the
    /// agent never writes into that account's directory. Returns the
    /// tool's one-line report (the backup's id, timeline and end), for the
    /// log; a failed attempt leaves no data directory behind.
    pub async fn restore_from_backup(
        &self,
        timeline: Timeline,
        system_id: Option<&str>,
    ) -> Result<String, PgError> {
        self.remove_data_dir()?;
        self.create_data_dir()?;
        let exe = std::env::current_exe().map_err(io("find the pgha binary"))?;
        let repo_file = self.pg_dir.join(crate::backup::agent::REPOSITORY_FILE);
        let timeline = timeline.0.to_string();
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "backup".as_ref(),
            "unpack-replica".as_ref(),
            "-c".as_ref(),
            repo_file.as_os_str(),
            "--dir".as_ref(),
            self.data_dir.as_os_str(),
            "--bin-dir".as_ref(),
            self.bin_dir.as_os_str(),
            "--timeline".as_ref(),
            timeline.as_ref(),
        ];
        if let Some(id) = system_id {
            args.push(std::ffi::OsStr::new("--system-id"));
            args.push(std::ffi::OsStr::new(id));
        }
        let result = self
            .run_unpack(
                &exe,
                &args,
                "restore a backup for this replica",
                "restoring a backup for this replica",
            )
            .await;
        match result {
            Ok(out) => {
                // The tool's one-line report, for the log.
                Ok(out.trim().to_string())
            }
            Err(e) => {
                let _ = self.remove_data_dir();
                Err(e)
            }
        }
    }

    /// Runs one of pgha's unpack commands as the PostgreSQL account,
    /// relaying its progress into the log (see [`super::relay`]). A
    /// restore of a large cluster takes hours; the clone it replaces has no
    /// time limit either, so the bound is only against a hung command.
    async fn run_unpack(
        &self,
        exe: &Path,
        args: &[&std::ffi::OsStr],
        action: &str,
        doing: &str,
    ) -> Result<String, PgError> {
        let tool = exe.to_string_lossy().into_owned();
        let timeout = Duration::from_secs(7 * 24 * 3600);
        let mut cmd = self.command(&tool);
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        // An agent killed outright (SIGKILL, OOM) cannot kill its command,
        // and a restarted agent would restore into the same directory
        // beside it: the command dies with the agent's thread that started
        // it (the runtime's worker threads live as long as the agent).
        // SAFETY: prctl is async-signal-safe and only reads its integer
        // arguments; it runs after the switch to the PostgreSQL account,
        // which would otherwise clear it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        match tokio::time::timeout(timeout, super::relay::run(cmd, &tool, action, doing)).await {
            Ok(result) => result,
            Err(_) => Err(PgError::ToolTimeout {
                tool,
                action: action.into(),
                timeout,
            }),
        }
    }

    /// Fills the data directory from the backup `[bootstrap.from_backup]`
    /// asks for, as the PostgreSQL account (`pgha backup
    /// unpack-bootstrap`), for the first leader of a new cluster. A failed
    /// attempt leaves no data directory.
    pub async fn restore_for_bootstrap(
        &self,
        from: &crate::config::bootstrap::FromBackup,
    ) -> Result<BootstrapRestore, PgError> {
        self.remove_data_dir()?;
        self.create_data_dir()?;
        let exe = std::env::current_exe().map_err(io("find the pgha binary"))?;
        // Its own file even when it is the cluster's repository: the
        // command and the replay read it as the PostgreSQL account. Removed
        // once the cluster is initialized (see remove_bootstrap_source).
        self.pg_dir.write(
            BOOTSTRAP_SOURCE_FILE,
            crate::config::backup::RepositoryFile::render(&from.source).as_bytes(),
            0o600,
        )?;
        let source_file = self.pg_dir.join(BOOTSTRAP_SOURCE_FILE);
        let timeline = from.timeline.map(|t| t.to_string());
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "backup".as_ref(),
            "unpack-bootstrap".as_ref(),
            "-c".as_ref(),
            source_file.as_os_str(),
            "--dir".as_ref(),
            self.data_dir.as_os_str(),
            "--bin-dir".as_ref(),
            self.bin_dir.as_os_str(),
            "--target".as_ref(),
            from.target_text.as_ref(),
        ];
        if let Some(id) = &from.backup {
            args.push("--backup".as_ref());
            args.push(id.as_ref());
        }
        if let Some(t) = &timeline {
            args.push("--timeline".as_ref());
            args.push(t.as_ref());
        }
        let result = self
            .run_unpack(
                &exe,
                &args,
                "restore the backup the cluster bootstraps from",
                "restoring the backup the cluster bootstraps from",
            )
            .await
            .and_then(|out| {
                // Written by the PostgreSQL account: checked before it goes
                // into the recovery settings and the log.
                let report: serde_json::Value =
                    serde_json::from_str(out.trim()).ok().unwrap_or_default();
                let backup = report["backup"]
                    .as_str()
                    .filter(|id| crate::backup::naming::is_backup_id(id));
                let follow = report["follow_timeline"]
                    .as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .filter(|t| *t >= 1);
                match (backup, follow) {
                    (Some(backup), Some(t)) => Ok((backup.to_string(), t)),
                    _ => Err(PgError::Tool {
                        tool: "pgha backup unpack-bootstrap".into(),
                        action: "report the backup it restored".into(),
                        status: "exit 0".into(),
                        stderr: format!("unreadable report {:?}", out.trim()),
                    }),
                }
            });
        match result {
            Ok((backup, timeline)) => {
                let archiving = crate::backup::agent::archiving(&from.source, &exe, &source_file);
                Ok(BootstrapRestore {
                    backup,
                    timeline: crate::model::Timeline(timeline),
                    restore_command: archiving.restore_command,
                })
            }
            Err(e) => {
                let _ = self.remove_data_dir();
                Err(e)
            }
        }
    }

    /// Removes the source repository's file once the cluster exists: it may
    /// name another cluster's repository, which this one's PostgreSQL
    /// account has no further business reading.
    pub fn remove_bootstrap_source(&self) -> Result<(), PgError> {
        Ok(self.pg_dir.remove(BOOTSTRAP_SOURCE_FILE)?)
    }

    /// The last `lines` lines of the server log, for an error message.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = super::promote::read_log_tail(&self.log_file);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Puts the recovery settings of a bootstrap from a backup in place
    /// (`postgresql.auto.conf`, after [`Instance::write_config`] emptied
    /// it) with `recovery.signal`: the next start replays archived WAL to
    /// the target and promotes.
    pub fn write_bootstrap_recovery(&self, settings: &str) -> Result<(), PgError> {
        let data = self.data_dir_handle()?;
        data.write("postgresql.auto.conf", settings.as_bytes(), 0o600)?;
        data.write(conf::RECOVERY_SIGNAL, b"", 0o600)?;
        Ok(())
    }

    /// Whether the server started by a bootstrap from a backup has ended
    /// recovery and accepts writes: PostgreSQL removes `recovery.signal`
    /// when recovery ends and marks `postmaster.pid` "ready" once it
    /// accepts connections as a primary (a hot standby reads "standby").
    pub fn bootstrap_recovery_finished(&self) -> Result<bool, PgError> {
        let data = self.data_dir_handle()?;
        if data.is_file(conf::RECOVERY_SIGNAL)? {
            return Ok(false);
        }
        let pid_file = data.read_to_string("postmaster.pid")?.unwrap_or_default();
        Ok(pid_file.lines().nth(7).map(str::trim) == Some("ready"))
    }

    /// Rewinds a stopped former primary onto the source's timeline. If the
    /// target was not shut down cleanly, pg_rewind first runs crash
    /// recovery in single-user mode (no client can connect meanwhile).
    /// When the histories have not diverged it changes nothing.
    pub async fn rewind(&self, source_host: &str, source_port: u16) -> Result<(), PgError> {
        // pg_rewind reads the source's timeline from its control file, which
        // a just-promoted server updates only at its next checkpoint; without
        // one, pg_rewind sees "the same timeline", changes nothing, and the
        // former primary cannot follow.
        self.checkpoint_source(source_host, source_port).await?;
        // pg_rewind's own single-user recovery refuses to run while the old
        // postmaster is an unreaped zombie.
        reap_postgres_orphans();
        self.wait_for_previous_server(Duration::from_secs(2)).await;
        let conninfo = format!(
            "host={} port={} user={} dbname=postgres connect_timeout=5",
            conf::quote_conninfo(source_host),
            source_port,
            conf::quote_conninfo(&self.superuser.username)
        );
        self.run(
            "pg_rewind",
            &[
                "--target-pgdata".as_ref(),
                self.data_dir.as_os_str(),
                "--source-server".as_ref(),
                conninfo.as_ref(),
                "--progress".as_ref(),
            ],
            "rewind onto the leader's timeline",
            Duration::from_secs(3600),
        )
        .await
        .map(|_| ())
    }

    /// Asks the rewind source for a checkpoint, as the superuser.
    async fn checkpoint_source(&self, host: &str, port: u16) -> Result<(), PgError> {
        let mut c = tokio_postgres::Config::new();
        c.host(host)
            .port(port)
            .user(&self.superuser.username)
            .password(self.superuser.password.expose())
            .dbname("postgres")
            .application_name("pgha-rewind")
            .connect_timeout(Duration::from_secs(5));
        let (client, connection) = c
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(PgError::Connect)?;
        tokio::spawn(connection);
        tokio::time::timeout(
            Duration::from_secs(600),
            client.batch_execute(super::query::CHECKPOINT),
        )
        .await
        .map_err(|_| {
            PgError::Unexpected(format!("CHECKPOINT on {host}:{port} took longer than 600s"))
        })?
        .map_err(|source| PgError::Sql {
            action: format!("checkpoint the rewind source {host}:{port}"),
            source,
        })
    }

    /// `pg_controldata` as key → value.
    pub async fn controldata(&self) -> Result<std::collections::BTreeMap<String, String>, PgError> {
        let out = self
            .run(
                "pg_controldata",
                &[self.data_dir.as_os_str()],
                "read the control file",
                Duration::from_secs(10),
            )
            .await?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect())
    }

    /// Empties the data directory (before a clone or a new initdb).
    /// Refuses obviously wrong targets as a last line of defence against a
    /// bad path.
    ///
    /// The deletion runs as the PostgreSQL account when the agent is root:
    /// that account could have replaced a component of the path with a
    /// symlink, and a root deletion would then remove whatever it points
    /// to. As that account, it can only delete what it could delete anyway.
    /// The directory itself stays (empty), as PostgreSQL's tools accept.
    pub fn remove_data_dir(&self) -> Result<(), PgError> {
        let d = &self.data_dir;
        if d.parent().is_none() || d == Path::new("/") {
            return Err(PgError::Unexpected(format!(
                "refusing to remove {}",
                d.display()
            )));
        }
        if self.postmaster_pid().is_some() {
            return Err(PgError::Unexpected(format!(
                "refusing to remove {} while PostgreSQL runs",
                d.display()
            )));
        }
        let Some(u) = &self.os_user else {
            return match std::fs::remove_dir_all(d) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(PgError::Io {
                    action: format!("remove {}", d.display()),
                    source: e,
                }),
            };
        };
        if !d.exists() {
            return Ok(());
        }
        use std::os::unix::process::CommandExt;
        let out = std::process::Command::new("find")
            .arg(d)
            .args(["-mindepth", "1", "-delete"])
            .uid(u.uid)
            .gid(u.gid)
            .stdin(Stdio::null())
            .output()
            .map_err(io("run find to empty the data directory"))?;
        if !out.status.success() {
            return Err(PgError::Tool {
                tool: "find".into(),
                action: format!("empty {} as {}", d.display(), u.name),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    /// Connection parameters for the agent's own SQL session (unix socket).
    pub fn client_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host_path(&self.socket_dir)
            .port(self.port)
            .user(&self.superuser.username)
            .password(self.superuser.password.expose())
            .dbname("postgres")
            .application_name("pgha")
            .connect_timeout(Duration::from_secs(2));
        c
    }
}

/// Makes this process the reaper of its orphaned descendants. The
/// postmaster, started through `pg_ctl`, is such an orphan; when it dies,
/// PostgreSQL refuses to start again until its zombie is reaped, and some
/// hosts' PID 1 (containers without an init) reap late or never.
pub fn become_subreaper() {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER only sets a flag on this process.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot become the subreaper of PostgreSQL");
    }
}

/// Reaps zombie `postgres` processes adopted by this process (a crashed
/// postmaster and its backends). Only those: other children belong to the
/// async runtime, which reaps them itself.
pub fn reap_postgres_orphans() {
    let me = std::process::id() as i32;
    let Ok(all) = procfs::process::all_processes() else {
        return;
    };
    for p in all.filter_map(Result::ok) {
        let Ok(stat) = p.stat() else { continue };
        if stat.ppid == me && stat.state == 'Z' && stat.comm == "postgres" {
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(p.pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
    }
}

/// `postmaster.pid`, written by the PostgreSQL account: read as an
/// untrusted file (no symlink, a regular file, a few KiB at most).
fn read_pid_file(data_dir: &Path) -> Option<String> {
    let bytes = crate::safe_fs::read_untrusted(&data_dir.join("postmaster.pid"), 4096, false)?;
    String::from_utf8(bytes).ok()
}

/// Reads `postmaster.pid` and checks that process is a live postmaster of
/// this data directory's owner.
///
/// The file is written by the PostgreSQL account, so its number is not
/// trusted: the process must be named `postgres`, not be a zombie, and run
/// as the owner of the data directory (never root). Otherwise a root agent
/// or fence keeper could be steered into signalling any process.
pub fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    use std::os::unix::fs::MetadataExt;
    let text = read_pid_file(data_dir)?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    if pid <= 0 {
        return None;
    }
    let owner = std::fs::metadata(data_dir).ok()?.uid();
    let process = procfs::process::Process::new(pid).ok()?;
    let stat = process.stat().ok()?;
    let uid = process.uid().ok()?;
    // PostgreSQL refuses to run as root, so a root "postmaster" is never one.
    (stat.comm == "postgres" && stat.state != 'Z' && uid == owner && uid != 0).then_some(pid)
}
