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
    } = &cli.command
    {
        // No runtime, no logging framework: the keeper must stay tiny and
        // must never wait on anything but the clock.
        let code = match pgha::agent::fence_keeper::run_keeper(state_dir, data_dir, *agent_pid) {
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match runtime.block_on(run(cli.command)) {
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

/// Loads the configuration; its errors map to exit code 2 by type.
fn load(path: &std::path::Path) -> anyhow::Result<pgha::config::Config> {
    Ok(cli::load_config(path)?)
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Agent { config } => pgha::agent::run(load(&config)?).await,
        Command::CheckConfig { config } => {
            load(&config)?;
            println!("{}: valid", config.display());
            Ok(())
        }
        Command::Proxy { config } => {
            pgha::proxy::run_standalone(pgha::config::ProxyFileConfig::load(&config)?).await
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
