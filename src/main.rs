//! The `pgha` binary: parse the command line, set up logging, run the
//! command, and turn errors into exit codes (2 for usage and configuration
//! errors, 1 for everything else).

use clap::Parser;
use pgha::cli::{self, Cli, Command};

fn main() {
    let cli = Cli::parse();
    if let Command::FenceKeeper {
        state_dir,
        data_dir,
        agent_pid,
        vip,
        vip_interface,
    } = &cli.command
    {
        // No runtime, no logging framework: the keeper must stay tiny and
        // must never wait on anything but the clock.
        let code = match pgha::agent::fence_keeper::run_keeper(
            state_dir,
            data_dir,
            *agent_pid,
            vip.as_deref().zip(vip_interface.as_deref()),
        ) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("fence keeper: {e:#}");
                1
            }
        };
        std::process::exit(code);
    }
    if let Command::Wal { action } = &cli.command {
        // Run by PostgreSQL for every WAL file: no runtime, no logging
        // framework, just the exit code PostgreSQL acts on.
        std::process::exit(cli::wal::main(action));
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PGHA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Proxy {
            action: None,
            config,
        } => standalone_proxy(config.as_deref()),
        command => runtime(2).block_on(run(command)),
    };
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            // `{:#}` prints the chain once: each error type says what was
            // attempted and leaves its cause to `source()`.
            eprintln!("error: {e:#}");
            cli::exit_code(&e)
        }
    };
    std::process::exit(code);
}

/// A runtime with `threads` threads. One thread is a current-thread
/// runtime: every task runs on it, and no wake-up crosses threads.
fn runtime(threads: usize) -> tokio::runtime::Runtime {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder.enable_all().build().expect("tokio runtime")
}

/// `pgha proxy -c FILE`: the file is read before the runtime is built,
/// since it says how many threads the runtime gets (`threads`).
fn standalone_proxy(config: Option<&std::path::Path>) -> anyhow::Result<()> {
    let config = config.ok_or_else(|| cli::UsageError("pgha proxy needs -c FILE".into()))?;
    let cfg = pgha::config::ProxyFileConfig::load(config)?;
    runtime(cfg.threads).block_on(pgha::proxy::run_standalone(cfg))
}

/// Loads the configuration; its errors map to exit code 2 by type.
fn load(path: &std::path::Path) -> anyhow::Result<pgha::config::Config> {
    Ok(cli::load_config(path)?)
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Agent { config } => pgha::agent::run(load(&config)?).await,
        Command::PostStop {
            config,
            service_result,
        } => cli::post_stop::run(&load(&config)?, service_result.as_deref()).await,
        Command::CheckConfig { config } => {
            load(&config)?;
            println!("{}: valid", config.display());
            Ok(())
        }
        Command::Proxy {
            action: Some(cli::ProxyAction::Explain { sql, config, json }),
            ..
        } => cli::explain::run(&sql, config.as_deref(), json).await,
        Command::Proxy { action: None, .. } => {
            unreachable!("the standalone proxy is run by main, on its own runtime")
        }
        Command::List { config, json } => cli::list::run(&load(&config)?, json).await,
        Command::Switchover {
            config,
            cancel: true,
            ..
        } => cli::manage::cancel_request(&load(&config)?).await,
        Command::Switchover {
            config,
            to,
            at,
            force,
            cancel: false,
        } => cli::manage::switchover(&load(&config)?, to, at, force).await,
        Command::Failover {
            config,
            to,
            accept_data_loss,
            force,
        } => cli::manage::failover(&load(&config)?, to, accept_data_loss, force).await,
        Command::Restart {
            config,
            nodes,
            pending,
            switchover,
            force,
            timeout,
        } => {
            cli::operate::restart(&load(&config)?, nodes, pending, switchover, force, timeout).await
        }
        Command::Reinit {
            config,
            node,
            force,
            timeout,
        } => cli::operate::reinit(&load(&config)?, &node, force, timeout).await,
        Command::Reload { config, nodes } => cli::operate::reload(&load(&config)?, nodes).await,
        Command::Dsn {
            config,
            role,
            dbname,
            user,
            json,
        } => cli::operate::dsn(&load(&config)?, role, dbname, user, json).await,
        Command::Topology { config, json } => {
            cli::operate::show_topology(&load(&config)?, json).await
        }
        Command::Pause { config } => cli::manage::set_paused(&load(&config)?, true).await,
        Command::Resume { config } => cli::manage::set_paused(&load(&config)?, false).await,
        Command::History { config, json } => cli::manage::history(&load(&config)?, json).await,
        Command::Config {
            action: cli::ConfigAction::Show { config, json },
        } => cli::manage::config_show(&load(&config)?, json).await,
        Command::Config {
            action:
                cli::ConfigAction::Set {
                    config,
                    assignments,
                },
        } => cli::manage::config_set(&load(&config)?, &assignments).await,
        Command::EditConfig {
            config,
            apply,
            force,
        } => {
            let source = match apply {
                Some(file) => cli::edit_config::Source::File(file),
                None => cli::edit_config::Source::Editor,
            };
            cli::edit_config::edit_config(&load(&config)?, source, force).await
        }
        Command::Backup {
            action: Some(action),
            ..
        } => cli::backup::action(action).await,
        Command::Backup {
            action: None,
            config,
            from,
            json,
        } => {
            let config =
                config.ok_or_else(|| cli::UsageError("pgha backup needs -c FILE".into()))?;
            cli::backup::take(&load(&config)?, from, json).await
        }
        Command::Restore {
            config,
            target_dir,
            to,
            backup,
            pause,
            port,
        } => cli::backup::restore(&load(&config)?, &target_dir, &to, backup, pause, port).await,
        Command::Demo { nodes, dir } => cli::demo::run(nodes, &dir).await,
        Command::FenceKeeper { .. } | Command::Wal { .. } => {
            unreachable!("handled before the runtime starts")
        }
    }
}
