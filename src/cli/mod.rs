//! The `pgha` command line: one module per subcommand.

pub mod backup;
pub mod demo;
pub mod list;
pub mod manage;
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
#[command(name = "pgha", version, about = "PostgreSQL high-availability manager")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent for one PostgreSQL node.
    Agent {
        /// The node's configuration file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Check a configuration file and exit (0 when valid, 2 otherwise).
    CheckConfig {
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
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long)]
        to: String,
        /// Promote even if the target may lack acknowledged commits.
        #[arg(long)]
        accept_data_loss: bool,
        /// Replace a pending switchover or failover request (the one read).
        #[arg(long)]
        force: bool,
    },
    /// Maintenance mode: no automatic action until `resume`.
    Pause {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Leave maintenance mode.
    Resume {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Show or change the cluster-wide configuration kept in etcd.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// The timeline history (failovers and switchovers).
    History {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Run the connection proxy (`docs/proxy.md`).
    Proxy {
        /// The proxy's configuration file (`cluster`, `[etcd]`, `[proxy]`).
        #[arg(short, long)]
        config: PathBuf,
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
        #[arg(long)]
        json: bool,
    },
    /// Restore a backup into a new data directory, ready to replay to a target.
    Restore {
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
        #[arg(long, default_value_t = 3)]
        nodes: usize,
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
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Print the cluster-wide configuration.
    Show {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Set keys, e.g. `synchronous_mode=on synchronous_node_count=1`.
    Set {
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
