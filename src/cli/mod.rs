//! The `pgha` command line: one module per subcommand.

pub mod backup;
pub mod demo;
pub mod edit_config;
pub mod explain;
pub mod list;
pub mod manage;
pub mod operate;
pub mod post_stop;
pub mod wal;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Exit code for usage and configuration errors.
pub const EXIT_CONFIG: i32 = 2;
/// Exit code for every other failure.
pub const EXIT_FAILURE: i32 = 1;

/// A command-line argument pgha cannot use: like a configuration error,
/// the operator must change the command, so it exits with [`EXIT_CONFIG`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit code for an error that ended a command: decided by the types in
/// its chain, never by its text, so rewording a message cannot change it.
pub fn exit_code(error: &anyhow::Error) -> i32 {
    let usage = error.chain().any(|e| {
        e.downcast_ref::<crate::config::ConfigError>().is_some()
            || e.downcast_ref::<crate::proxy::ProxyError>().is_some()
            || e.downcast_ref::<UsageError>().is_some()
    });
    if usage { EXIT_CONFIG } else { EXIT_FAILURE }
}

#[derive(Debug, Parser)]
#[command(
    name = "pgha",
    version,
    about = "PostgreSQL high-availability manager",
    long_about = "PostgreSQL high-availability manager.\n\n\
        Run `pgha agent` on every PostgreSQL node (the package's pgha.service does), \
        with a node configuration such as /etc/pgha/pgha.toml; the other commands \
        read the same file to find etcd and the cluster, and may run on any node.",
    after_long_help = "Files:\n  \
        /etc/pgha/pgha.toml      the node configuration (agent and commands)\n  \
        /etc/pgha/proxy.toml     a standalone proxy's configuration (pgha proxy)\n  \
        /usr/share/doc/pgha/examples/   commented examples of both\n\n\
        Environment:\n  \
        PGHA_LOG    log filter, e.g. `debug` or `pgha=debug,info` (default: info)\n  \
        EDITOR      the editor of `pgha edit-config` (default: vi)\n\n\
        Exit codes: 0 success, 1 failure, 2 usage or configuration error.\n\n\
        Signals (agent): SIGTERM or SIGINT stop it cleanly: a leader stops PostgreSQL \
        and hands the leader key over; a replica stops PostgreSQL.\n\n\
        Documentation: /usr/share/doc/pgha (configuration.md lists every key)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent for one PostgreSQL node (in the foreground, logging to
    /// standard error; stop it with SIGTERM).
    Agent {
        /// The node's configuration file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Stop what an agent left running: run after the agent has exited
    /// (systemd's ExecStopPost does), or by hand after a crash.
    ///
    /// Under systemd it reads SERVICE_RESULT: after a crash ("signal",
    /// "exit-code", "core-dump", ...) it does nothing, so that the restarted
    /// agent takes over the running PostgreSQL; after a requested stop
    /// ("success") or a stop that timed out ("timeout"), and when run by
    /// hand (unset), it stops PostgreSQL (fast, or immediate after a
    /// timeout), makes the fence keeper exit, removes the `[vip]` address
    /// and kills pgha's PostgreSQL tools (pg_basebackup, pg_rewind, initdb).
    /// Refuses while an agent for this configuration still runs.
    PostStop {
        /// The node's configuration file.
        #[arg(short, long)]
        config: PathBuf,
        /// How the agent ended, as systemd reports it.
        #[arg(long, env = "SERVICE_RESULT", value_name = "RESULT")]
        service_result: Option<String>,
    },
    /// Check a configuration file and exit (0 when valid, 2 otherwise).
    CheckConfig {
        /// The node's configuration file (e.g. /etc/pgha/pgha.toml).
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Show the cluster's members.
    List {
        /// Any member's configuration file (for the etcd address and cluster name).
        #[arg(short, long)]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Planned handover of the leader role, with no data loss.
    Switchover {
        /// The node's configuration file (e.g. /etc/pgha/pgha.toml).
        #[arg(short, long)]
        config: PathBuf,
        /// Target member; default: the healthiest streaming replica.
        #[arg(long)]
        to: Option<String>,
        /// Run at this time (RFC 3339, e.g. 2026-01-31T02:00:00Z) instead of now.
        #[arg(long)]
        at: Option<String>,
        /// Skip the target health checks, and replace a pending request
        /// (the one read: a request recorded meanwhile is never replaced).
        #[arg(long)]
        force: bool,
        /// Cancel the pending switchover or failover request instead.
        #[arg(long, conflicts_with_all = ["to", "at", "force"])]
        cancel: bool,
    },
    /// Force a promotion when the cluster has no healthy leader.
    Failover {
        /// The node's configuration file (e.g. /etc/pgha/pgha.toml).
        /// The node's configuration file (e.g. /etc/pgha/pgha.toml).
        #[arg(short, long)]
        config: PathBuf,
        /// The member to promote.
        #[arg(long)]
        to: String,
        /// Promote even if the target may lack acknowledged commits.
        #[arg(long)]
        accept_data_loss: bool,
        /// Replace a pending switchover or failover request (the one read).
        #[arg(long)]
        force: bool,
    },
    /// Rolling restart of PostgreSQL: replicas first, one at a time, each
    /// back and streaming before the next; the leader last, by switchover.
    /// Stops at the first member that does not come back. Needs the API
    /// credentials (api.token or api.username/api.password) in CONFIG.
    Restart {
        #[arg(short, long)]
        config: PathBuf,
        /// Members to restart (default: all).
        nodes: Vec<String>,
        /// Only members with a parameter waiting for a restart
        /// (`pending_restart` in `pgha list`).
        #[arg(long)]
        pending: bool,
        /// Include the leader: hand its role over to a replica first
        /// (planned switchover), then restart it as a replica. Without
        /// it, a plan that includes the leader is refused.
        #[arg(long)]
        switchover: bool,
        /// Go ahead although writes pause while a member restarts
        /// (`strict` mode with one standby).
        #[arg(long)]
        force: bool,
        /// How long each member may take to come back.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Rebuild a replica from scratch: remove its data directory and clone
    /// the leader again. Refused for the leader.
    Reinit {
        #[arg(short, long)]
        config: PathBuf,
        node: String,
        /// Go ahead although writes would wait for the clone (`strict`
        /// mode with this as the only standby).
        #[arg(long)]
        force: bool,
        /// How long the clone may take.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Re-render the members' configuration files and reload PostgreSQL.
    Reload {
        #[arg(short, long)]
        config: PathBuf,
        /// Members to reload (default: all).
        nodes: Vec<String>,
    },
    /// A libpq connection string that reaches the cluster's leader (or a
    /// replica) whichever member holds the role.
    Dsn {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long, value_enum, default_value = "leader")]
        role: operate::DsnRole,
        #[arg(long)]
        dbname: Option<String>,
        #[arg(long)]
        user: Option<String>,
        /// Both forms (key/value and URI) and the host list.
        #[arg(long)]
        json: bool,
    },
    /// Who streams from whom.
    Topology {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Maintenance mode: no automatic action until `resume`.
    Pause {
        /// The node's configuration file (e.g. /etc/pgha/pgha.toml).
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Leave maintenance mode.
    Resume {
        /// The node's configuration file (e.g. /etc/pgha/pgha.toml).
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Show or change the cluster-wide configuration kept in etcd.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Edit the cluster-wide configuration in $EDITOR (default vi) as
    /// TOML: checked, shown as a diff, confirmed, then written only if
    /// nobody changed it meanwhile.
    EditConfig {
        /// The node's configuration file (e.g. /etc/pgha/pgha.toml).
        #[arg(short, long)]
        config: PathBuf,
        /// Take the new configuration from this file (`-`: standard input)
        /// instead of an editor, and apply it without asking (for scripts).
        #[arg(long, value_name = "FILE")]
        apply: Option<PathBuf>,
        /// Apply without asking for confirmation.
        #[arg(long, short = 'y')]
        force: bool,
    },
    /// The timeline history (failovers and switchovers).
    History {
        /// The node's configuration file (e.g. /etc/pgha/pgha.toml).
        #[arg(short, long)]
        config: PathBuf,
        /// Print JSON (one document) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run the connection proxy (`docs/proxy.md`); `explain` too.
    #[command(args_conflicts_with_subcommands = true)]
    Proxy {
        #[command(subcommand)]
        action: Option<ProxyAction>,
        /// The proxy's configuration file (`cluster`, `[etcd]`, `[proxy]`).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Take a base backup into the repository (`list` and `verify` too).
    #[command(args_conflicts_with_subcommands = true)]
    Backup {
        #[command(subcommand)]
        action: Option<backup::BackupAction>,
        /// Any member's configuration file (with `[backup]`).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Where to take the backup from.
        #[arg(long, value_enum, default_value = "replica")]
        from: backup::From,
        /// Print JSON (one document) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Restore a backup into a new data directory, ready to replay to a target.
    Restore {
        /// The node's configuration file (e.g. /etc/pgha/pgha.toml).
        #[arg(short, long)]
        config: PathBuf,
        /// An empty or new directory.
        #[arg(long)]
        target_dir: PathBuf,
        /// `latest`, a time (2026-01-31T02:00:00Z) or an LSN (0/3000060).
        #[arg(long)]
        to: String,
        /// Restore this backup instead of the newest one before the target.
        #[arg(long)]
        backup: Option<String>,
        /// Pause at the target instead of promoting.
        #[arg(long)]
        pause: bool,
        /// The port the restored server listens on (default: the backed-up
        /// member's).
        #[arg(long)]
        port: Option<u16>,
    },
    /// WAL archiving commands PostgreSQL runs (archive_command, restore_command).
    Wal {
        #[command(subcommand)]
        action: wal::WalAction,
    },
    /// Start a complete local cluster (etcd + N nodes) for trying pgha out.
    Demo {
        /// How many PostgreSQL nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Where the nodes' data, configurations and logs go.
        #[arg(long, default_value = "./pgha-demo")]
        dir: PathBuf,
    },
    /// Internal: the fence keeper process started by the agent.
    #[command(hide = true)]
    FenceKeeper {
        /// For messages only: the directory itself is inherited as a
        /// descriptor.
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        agent_pid: i32,
        /// `[vip]` address/prefix to remove when fencing.
        #[arg(long, requires = "vip_interface")]
        vip: Option<String>,
        #[arg(long, requires = "vip")]
        vip_interface: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Print the cluster-wide configuration.
    Show {
        /// The node's configuration file (e.g. /etc/pgha/pgha.toml).
        #[arg(short, long)]
        config: PathBuf,
        /// Print JSON (one document) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Set keys, e.g. `synchronous_mode=on synchronous_node_count=1` or
    /// `postgresql.parameters.work_mem=64MB` (`...NAME=` removes one).
    Set {
        /// The node's configuration file (e.g. /etc/pgha/pgha.toml).
        #[arg(short, long)]
        config: PathBuf,
        #[arg(required = true)]
        assignments: Vec<String>,
    },
}

/// Loads a config, or says why not ([`exit_code`] maps the error to
/// [`EXIT_CONFIG`]).
pub fn load_config(
    path: &std::path::Path,
) -> Result<crate::config::Config, crate::config::ConfigError> {
    crate::config::Config::load(path)
}

/// Connects to the cluster's etcd for a one-off command (no watch).
pub async fn connect_dcs(cfg: &crate::config::Config) -> anyhow::Result<crate::dcs::etcd::EtcdDcs> {
    Ok(crate::dcs::etcd::EtcdDcs::connect(
        &cfg.etcd,
        crate::dcs::keys::Keys::new(&cfg.namespace, &cfg.cluster),
        cfg.name.clone(),
        cfg.ha.ttl,
        cfg.ha.retry_timeout.max(std::time::Duration::from_secs(3)),
        false,
    )
    .await?)
}

#[derive(Debug, clap::Subcommand)]
pub enum ProxyAction {
    /// Where the auto listener would send a statement, and why.
    Explain {
        /// The statement (or several, separated by semicolons).
        sql: String,
        /// A proxy file: its `read_only_functions`, and the members that
        /// would serve the statement now (read from etcd).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Print JSON (one document) instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use anyhow::Context;

    use super::*;
    use crate::config::ConfigError;
    use crate::dcs::DcsError;

    #[test]
    fn exit_code_follows_the_error_type_not_its_text() {
        let config = anyhow::Error::new(ConfigError::invalid(
            Path::new("/etc/pgha/node.toml"),
            "ha.ttl",
            "is not valid",
        ));
        assert_eq!(exit_code(&config), EXIT_CONFIG);
        let wrapped = Err::<(), _>(config).context("load").unwrap_err();
        assert_eq!(exit_code(&wrapped), EXIT_CONFIG, "found under context");
        let usage = anyhow::Error::new(UsageError("--at \"x\": expected a time".into()));
        assert_eq!(exit_code(&usage), EXIT_CONFIG);
        // Runtime failures exit 1, even when their text looks like a usage
        // error's (the old text matching would have said 2).
        let runtime = anyhow::Error::new(DcsError::Malformed {
            key: "config".into(),
            message: "\"x\" is not a boolean: unknown key".into(),
        });
        assert_eq!(exit_code(&runtime), EXIT_FAILURE);
        assert_eq!(
            exit_code(&anyhow::anyhow!("expected key=value")),
            EXIT_FAILURE
        );
    }
}
