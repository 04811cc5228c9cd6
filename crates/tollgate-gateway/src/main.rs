//! `tollgate`: the gateway's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tollgate_gateway::{describe, shutdown_signal, Config, Gateway};
use tracing_subscriber::EnvFilter;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An OpenAI-compatible gateway in front of every provider quota a team shares.
#[derive(Parser, Debug)]
#[command(name = "tollgate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serves the config's models until SIGTERM or ctrl-c; SIGHUP reloads the config.
    Serve {
        /// The config file (YAML, or TOML when it ends in `.toml`).
        #[arg(long, short)]
        config: PathBuf,
        /// Listen here instead of the config's `listen`.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Reads the config and prints the stack each model will have; exits non-zero with
    /// the field and line of the first error.
    Check {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match Config::from_path(&config) {
            Ok(c) => {
                print!("{}", describe(&c));
                println!("\n{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve { config, listen } => {
            // JSON lines: the access log (target `tollgate::access`) and everything else.
            tracing_subscriber::fmt()
                .json()
                .with_current_span(false)
                .with_env_filter(
                    EnvFilter::try_from_env("TOLLGATE_LOG")
                        .unwrap_or_else(|_| EnvFilter::new("info")),
                )
                .init();
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(serve(config, listen)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "tollgate stopped");
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn serve(path: PathBuf, listen: Option<String>) -> Result<(), Box<dyn std::error::Error>> {
    let gateway = Gateway::from_path(&path)?;
    let mut config = gateway.config();
    if let Some(l) = listen {
        config.listen = l;
    }
    let addr = config.listen_addr()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    gateway.serve(listener, shutdown_signal()).await?;
    Ok(())
}
