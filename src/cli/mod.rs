//! The `pgha` command line: one module per subcommand.

pub mod demo;
pub mod list;
pub mod manage;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Exit code for usage and configuration errors.
pub const EXIT_CONFIG: i32 = 2;

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
        /// Skip the target health checks (and replace a pending request).
        #[arg(long)]
        force: bool,
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

/// Loads a config, or says why not (the caller exits with [`EXIT_CONFIG`]).
pub fn load_config(
    path: &std::path::Path,
) -> Result<crate::config::Config, crate::config::ConfigError> {
    crate::config::Config::load(path)
}

/// Connects to the cluster's etcd for a one-off command (no watch).
pub async fn connect_dcs(cfg: &crate::config::Config) -> anyhow::Result<crate::dcs::etcd::EtcdDcs> {
    let credentials = cfg
        .etcd
        .credentials
        .as_ref()
        .map(|(u, p)| (u.clone(), p.expose().to_string()));
    Ok(crate::dcs::etcd::EtcdDcs::connect(
        &cfg.etcd.endpoints,
        credentials,
        crate::dcs::keys::Keys::new(&cfg.namespace, &cfg.cluster),
        cfg.name.clone(),
        cfg.ha.ttl,
        cfg.ha.retry_timeout.max(std::time::Duration::from_secs(3)),
        false,
    )
    .await?)
}
