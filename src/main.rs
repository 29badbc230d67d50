//! The `pgha` binary: parse the command line, set up logging, run the
//! command, and turn errors into exit codes (2 for usage and configuration
//! errors, 1 for everything else).

use clap::Parser;
use pgha::cli::{self, Cli, Command, EXIT_CONFIG};

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
    std::process::exit(runtime.block_on(run(cli.command)));
}

async fn run(command: Command) -> i32 {
    let load = |path: &std::path::Path| match cli::load_config(path) {
        Ok(c) => Ok(c),
        Err(e) => {
            eprintln!("error: {e}");
            Err(EXIT_CONFIG)
        }
    };
    let result = match command {
        Command::Agent { config } => match load(&config) {
            Ok(cfg) => pgha::agent::run(cfg).await,
            Err(code) => return code,
        },
        Command::CheckConfig { config } => match load(&config) {
            Ok(_) => {
                println!("{}: valid", config.display());
                Ok(())
            }
            Err(code) => return code,
        },
        Command::List { config, json } => match load(&config) {
            Ok(cfg) => cli::list::run(&cfg, json).await,
            Err(code) => return code,
        },
        Command::Switchover {
            config,
            to,
            at,
            force,
        } => match load(&config) {
            Ok(cfg) => cli::manage::switchover(&cfg, to, at, force).await,
            Err(code) => return code,
        },
        Command::Failover {
            config,
            to,
            accept_data_loss,
        } => match load(&config) {
            Ok(cfg) => cli::manage::failover(&cfg, to, accept_data_loss).await,
            Err(code) => return code,
        },
        Command::Pause { config } => match load(&config) {
            Ok(cfg) => cli::manage::set_paused(&cfg, true).await,
            Err(code) => return code,
        },
        Command::Resume { config } => match load(&config) {
            Ok(cfg) => cli::manage::set_paused(&cfg, false).await,
            Err(code) => return code,
        },
        Command::History { config, json } => match load(&config) {
            Ok(cfg) => cli::manage::history(&cfg, json).await,
            Err(code) => return code,
        },
        Command::Config {
            action: cli::ConfigAction::Show { config, json },
        } => match load(&config) {
            Ok(cfg) => cli::manage::config_show(&cfg, json).await,
            Err(code) => return code,
        },
        Command::Config {
            action:
                cli::ConfigAction::Set {
                    config,
                    assignments,
                },
        } => match load(&config) {
            Ok(cfg) => match cli::manage::config_set(&cfg, &assignments).await {
                Err(e)
                    if e.to_string().contains(" is not ")
                        || e.to_string().contains("unknown key")
                        || e.to_string().contains("expected key=value") =>
                {
                    eprintln!("error: {e:#}");
                    return EXIT_CONFIG;
                }
                r => r,
            },
            Err(code) => return code,
        },
        Command::Demo { nodes, dir } => cli::demo::run(nodes, &dir).await,
        Command::FenceKeeper { .. } => unreachable!("handled before the runtime starts"),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}
