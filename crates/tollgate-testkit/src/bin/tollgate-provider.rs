//! `tollgate-provider`: the simulated LLM provider as a command.
//!
//! ```text
//! tollgate-provider --listen 127.0.0.1:8080 --rpm 60 --tpm 100000 --error-rate 0.02
//! ```
//!
//! It prints the address it listens on, serves until Ctrl-C, then prints its counters.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tollgate_testkit::{Faults, Provider};

/// A simulated OpenAI-compatible provider that enforces RPM and TPM per API key.
#[derive(Debug, Parser)]
#[command(name = "tollgate-provider", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Requests per minute per API key (unlimited when absent).
    #[arg(long)]
    rpm: Option<u64>,
    /// Tokens per minute per API key (unlimited when absent).
    #[arg(long)]
    tpm: Option<u64>,
    /// Requests at once per API key (the whole RPM when absent); refills at the RPM's pace.
    #[arg(long)]
    burst: Option<u64>,
    /// Tokens in an answer when the request does not cap it lower.
    #[arg(long, default_value_t = 16)]
    completion_tokens: u64,
    /// Milliseconds between two SSE chunks of a streamed answer.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Milliseconds every admitted request takes before its answer.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Share of requests answered 500 or 503.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Share of connections reset without an answer.
    #[arg(long, default_value_t = 0.0)]
    reset_rate: f64,
    /// Share of answers delayed by --slow-ms before their first byte.
    #[arg(long, default_value_t = 0.0)]
    slow_rate: f64,
    /// Delay of a slow answer, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    slow_ms: u64,
    /// Share of answers cut halfway through the body.
    #[arg(long, default_value_t = 0.0)]
    cut_rate: f64,
    /// Share of answers with malformed JSON.
    #[arg(long, default_value_t = 0.0)]
    malformed_rate: f64,
    /// Seed of the random fault draws.
    #[arg(long)]
    seed: Option<u64>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    for (name, rate) in [
        ("--error-rate", args.error_rate),
        ("--reset-rate", args.reset_rate),
        ("--slow-rate", args.slow_rate),
        ("--cut-rate", args.cut_rate),
        ("--malformed-rate", args.malformed_rate),
    ] {
        if !(0.0..=1.0).contains(&rate) {
            eprintln!("tollgate-provider: {name} must be between 0 and 1, got {rate}");
            return ExitCode::from(2);
        }
    }
    let mut builder = Provider::builder()
        .listen(args.listen)
        .completion_tokens(args.completion_tokens)
        .chunk_delay(Duration::from_millis(args.chunk_delay_ms))
        .latency(Duration::from_millis(args.latency_ms))
        .faults(Faults {
            server_error_rate: args.error_rate,
            reset_rate: args.reset_rate,
            slow_rate: args.slow_rate,
            slow_first_byte: Duration::from_millis(args.slow_ms),
            cut_rate: args.cut_rate,
            malformed_rate: args.malformed_rate,
            ..Faults::default()
        });
    if let Some(n) = args.rpm {
        builder = builder.rpm(n);
    }
    if let Some(n) = args.tpm {
        builder = builder.tpm(n);
    }
    if let Some(n) = args.burst {
        builder = builder.burst(n);
    }
    if let Some(seed) = args.seed {
        builder = builder.seed(seed);
    }
    let provider = match builder.spawn().await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tollgate-provider: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    println!("tollgate-provider listening on {}", provider.url());
    if tokio::signal::ctrl_c().await.is_err() {
        eprintln!("tollgate-provider: cannot wait for Ctrl-C; stopping");
    }
    let s = provider.stats();
    println!(
        "requests={} ok={} rate_limited={} faults={} bad_requests={} tokens_served={}",
        s.requests,
        s.ok,
        s.rate_limited,
        s.faults,
        s.bad_requests,
        s.tokens_served()
    );
    provider.shutdown().await;
    ExitCode::SUCCESS
}
