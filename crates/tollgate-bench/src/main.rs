//! `tollgate-bench SCENARIO [--quick]`: benchmarks over loopback against the simulated
//! provider.
//!
//! Every scenario prints a readable table and, as its last line,
//! `RESULT <scenario> key=value ...`. `--quick` finishes in under 30 seconds. Every run is
//! bounded in requests and time, targets only 127.0.0.1, and stops by itself.
//!
//! Scenarios:
//!
//! - `baseline`: a hyper client straight to the simulated provider at fixed concurrency
//!   (no Tollgate layer): requests per second and p50/p99 latency, the denominator every
//!   overhead figure uses.
//! - `ratelimit`: the per-request cost of `RateLimitLayer` on the admit path, in process
//!   over a no-op service, against governor's keyed `check_key`, with 1 and 10,000 keys.
//!   `ratio` in the `RESULT` line is the worse of the two (goal: at most 3).
//! - `tpm`: estimating a request's tokens for 1, 10 and 100 KB prompts (µs, MB/s), whether
//!   the estimate equals the simulated provider's own count (`exact`), and the budget
//!   layer's own cost per small request on the admit path (`layer_ns`).
//! - `retry`: N requests at concurrency 50 against the simulated provider at 600 RPM,
//!   through the naive loop (`Retry-After × 1.5^n`, 3 tries) and through `RetryLayer`:
//!   failures, 429s the provider sent, makespan ÷ (N / rate).
//! - `cache`: hit latency for 1 KB and 100 KB requests, what the cache adds to a miss,
//!   and provider calls saved when half the questions repeat.
//! - `failover`: a primary answering 503 for a while, then recovering, and a fallback:
//!   failed requests, the primary's share, time from its recovery to traffic returning.
//! - `overhead`: the whole stack a policy builds (cache, failover, retry, rate limit, token
//!   budget; in-memory stores; every request a cache miss) against the bare client, in
//!   alternating rounds of one run at concurrency 64: `rps_ratio`, `p50_added_us`,
//!   `p99_added_us`, `cpu_ratio`, `cpu_added_us` (goal: ratio ≥ 0.7 for every layer, ≥ 0.9
//!   for the cache alone; p99 added ≤ 1 ms). `--side bare|stack` runs one side alone and
//!   prints its CPU per request, to profile it.
//! - `goodput`: the demo's burst without repeats, through the demo's policy (primary only,
//!   no cache, `max_wait` raised so the whole burst may wait its turn), against a provider
//!   at 600 RPM / 100k TPM with a few 5xx: makespan ÷ the least time the quota allows,
//!   provider 429s, failures (goal: ≤ 1.05, ≤ 1% of requests, 0). `goodput --blind`: 300
//!   requests at concurrency 50 against a provider at 600 a minute with a burst of 10,
//!   through a policy that states that quota and through one that says only `primary` and
//!   `retry` (the quota learned from the provider's headers): failures, provider 429s,
//!   makespan ÷ the quota's floor (goal for the learned one: 0, ≤ 5%, ≤ 1.10).
//! - `stack-cost`: the `overhead` policy's whole stack in process, one request at a time,
//!   over a client that answers at once: ns per request, and with `--features
//!   count-allocs` (a counting global allocator, kept out of the other scenarios)
//!   allocations and bytes per request. Under callgrind it gives instructions per request.
//! - `gateway`: the `tollgate` binary (built beside this one) as its own process, full
//!   policy and a keyed tenant, in front of the simulated provider, against the provider
//!   direct and a minimal hyper pass-through proxy (this binary again, as its own
//!   process) in one run, 1 KB chat requests, all misses, concurrency 1 and 64: CPU per
//!   request of the gateway and the proxy from `/proc/<pid>/stat`, and latency added
//!   (goal: `cpu_ratio ≤ 2.0`, `p99_added_us ≤ 1000`). `--target URL --target-pid PID`
//!   measures another gateway in front of the same kind of provider.
//! - `jobs`: the `tollgate` binary with jobs, in front of a provider at 6,000 RPM (50 ms
//!   answers): a batch of 2,000 lines (500 quick) through the Batch API beside a live
//!   load at half the quota, against the same live load alone: the batch's makespan ÷ the
//!   floor the quota left by live traffic allows, the live p99 with the batch ÷ without,
//!   live failures, provider 429s, lines lost and recorded twice (goal: makespan within
//!   10% of the floor, live p99 within 10%, 0 live failures, 0 lost, 0 twice).
//! - `job-store`: the embedded job store, redb against SQLite (`--features sqlite`): a
//!   batch of N jobs in one transaction, then each claimed and finished by one worker and
//!   by four, and the batch listed.
//! - `fairness`: two tenants of weights 3 and 1, 32 requests in flight each, sharing a
//!   model's quota (20 a second) through the `tollgate` binary: tenant a's share of the
//!   quota alone, then the answers each got once both wait, and how soon the one who
//!   joined late was first answered (goal: 1.0, 0.75 / 0.25, within one cell's interval
//!   and the provider's answer time).
//! - `balancing`: one model over three keys of 200 RPM, each behind its own limiter, a
//!   burst of 1,200 requests (6,000 full) through balanced and through ordered failover,
//!   on tokio's paused clock over loopback: makespan ÷ the three quotas' floor, provider
//!   429s, the share of the quotas left unused (goal: ≤ 1.05, ≤ 1%, ≈ 0).
//! - `batching`: 2,000 single-text embeddings requests (10,000 full) at concurrency 64
//!   against a provider at 600 RPM behind a limiter of that quota, with and without
//!   `BatchLayer`, on the paused clock: upstream requests, speedup (makespan without ÷
//!   with; goal ≥ 20), and whether every answer equals the request's alone.
//! - `soak [--minutes N]`: the `tollgate` binary under a steady mixed load (500/s, 1,000
//!   tenants, streamed and not, hits and misses, a provider with 1% 5xx, 1% 429 and
//!   resets) for N minutes (10; `--quick` 15 s), then 10⁶ requests of distinct keys to a
//!   per-key limit (20,000 quick): RSS growth after warm-up, descriptor growth,
//!   client-visible errors, p99 of the first and last window, RSS before, during and
//!   after the keys (goal: growth within 10%, fds flat, 0 errors, RSS back near its start).
//! - `chaos`: two `tollgate` instances on one Redis (a `redis-server` of its own) under a
//!   load of 40/s with a batch running: Redis killed and restarted, the primary provider
//!   killed and restarted, answering after 10 s, sending malformed JSON, cutting answers:
//!   requests failed that the policy must absorb, hung past their deadline, panics, batch
//!   lines lost or twice, time to recover from each fault (goal: 0, 0, 0, 0, 0).
//! - `redis`: rate-limit decisions against the local Redis (`REDIS_URL`, or
//!   127.0.0.1:6379) at concurrency 64, plain (one script call each) and pooled: decisions
//!   per second, p99 latency, Redis calls per decision from `INFO commandstats`, and
//!   whether pooled mode held the quota (goal: plain 1 call per decision, pooled ≥ 10×).

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod balancing;
mod batching;
mod blind;
mod chaos;

// The allocator the gateway ships with (on by default), so that every figure is the stack
// as it is deployed. Over glibc's malloc the `overhead` scenario measures the allocator
// more than the stack: memory freed on the other worker thread goes back through arena
// locks, and the bare client's own throughput swung from 47k to 70k requests a second
// with what the stack's rounds had left in the heap. `--no-default-features` measures
// over the system allocator; `count-allocs` brings its own counting allocator.
#[cfg(all(feature = "mimalloc", not(feature = "count-allocs")))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
mod cache;
mod failover;
mod fairness;
mod gateway;
mod goodput;
mod job_store;
mod jobs;
mod load;
mod overhead;
mod ratelimit;
mod redis;
mod report;
mod retry;
mod scenarios;
mod soak;
mod stack_cost;
mod tpm;

use std::process::ExitCode;

use clap::{Parser, ValueEnum};

/// Benchmarks of the Tollgate layers against the simulated provider.
#[derive(Debug, Parser)]
#[command(name = "tollgate-bench", version)]
struct Args {
    /// Which scenario to run.
    scenario: Scenario,
    /// A short run (under 30 s) for CI and a first look.
    #[arg(long)]
    quick: bool,
    /// Concurrent requests in flight (32 for `baseline`, 64 for `overhead`).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Requests to measure (default: 100000 quick, 1000000 full; a run also stops after 10 s quick, 60 s full).
    #[arg(long)]
    requests: Option<u64>,
    #[arg(long)]
    minutes: Option<f64>,
    /// `overhead`: measure this policy file instead of the built-in one (every layer).
    #[arg(long)]
    policy: Option<std::path::PathBuf>,
    /// `overhead`: run one side alone (`bare` or `stack`), to profile it (under callgrind,
    /// say) without the other's work in the count.
    #[arg(long)]
    side: Option<OverheadSide>,
    /// `goodput`: a provider whose quota the policy does not state (learned from its
    /// headers), beside a policy that states it.
    #[arg(long)]
    blind: bool,
    /// `gateway`: measure the gateway at this base URL (`http://127.0.0.1:4000`) instead
    /// of starting the `tollgate` binary.
    #[arg(long)]
    target: Option<String>,
    /// `gateway`: the process id of the `--target` gateway, for its CPU per request.
    #[arg(long)]
    target_pid: Option<u32>,
    /// `gateway`: the `tollgate` binary to start (by default the one beside this one).
    #[arg(long)]
    gateway_bin: Option<std::path::PathBuf>,
    /// `proxy` (started by `gateway`): the address to listen on.
    #[arg(long, hide = true)]
    listen: Option<String>,
    /// `proxy` (started by `gateway`): the upstream base URL.
    #[arg(long, hide = true)]
    upstream: Option<String>,
}

/// One side of the `overhead` scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OverheadSide {
    /// The hyper client straight to the provider.
    Bare,
    /// The policy's stack in front of the same client.
    Stack,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Scenario {
    /// A hyper client straight to the simulated provider.
    Baseline,
    /// The rate-limit layer's admit path against governor's `check_key`.
    Ratelimit,
    /// Token estimation: speed for 1/10/100 KB prompts, exactness against the provider.
    Tpm,
    /// A burst against a rate-limited provider: the naive retry loop against RetryLayer.
    Retry,
    /// The cache: hit latency, miss overhead, provider calls saved.
    Cache,
    /// A primary down for a while, then back; a fallback in between.
    Failover,
    /// The whole policy stack against the bare client, same load, same run.
    Overhead,
    /// The demo's burst without repeats: makespan against the quota's floor, 429s, failures.
    Goodput,
    /// Decisions against the local Redis, plain and pooled (needs REDIS_URL or 127.0.0.1:6379).
    Redis,
    /// The whole stack in process over a client that answers at once: ns (and, with
    /// `--features count-allocs`, allocations) per request.
    StackCost,
    /// The gateway binary against a hyper pass-through proxy and the provider direct.
    Gateway,
    /// A Batch API batch through the gateway binary beside live traffic at half the quota.
    Jobs,
    /// The embedded job store: redb against SQLite (`--features sqlite`).
    JobStore,
    /// Two tenants of weights 3 and 1 sharing a model's quota through the gateway binary.
    Fairness,
    /// One model over three keys of 200 RPM: a burst through balanced and ordered failover.
    Balancing,
    /// Single-text embeddings against a 600 RPM provider, with and without batching.
    Batching,
    /// The gateway binary under steady load for `--minutes`, then a million distinct keys: RSS, fds and p99 first against last.
    Soak,
    /// Two gateways on their own Redis, a primary and a fallback, while Redis, the primary and the network fail in turn.
    Chaos,
    /// The pass-through proxy `gateway` starts as its own process.
    #[value(hide = true)]
    Proxy,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tollgate-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match args.scenario {
            Scenario::Baseline => scenarios::baseline(&args).await,
            Scenario::Ratelimit => ratelimit::run(&args),
            Scenario::Tpm => tpm::run(&args).await,
            Scenario::Retry => retry::run(&args).await,
            Scenario::Cache => cache::run(&args).await,
            Scenario::Failover => failover::run(&args).await,
            Scenario::Overhead => overhead::run(&args).await,
            Scenario::Goodput if args.blind => blind::run(&args).await,
            Scenario::Goodput => goodput::run(&args).await,
            Scenario::Redis => redis::run_scenario(&args).await,
            Scenario::StackCost => stack_cost::run(&args).await,
            Scenario::Gateway => gateway::run(&args).await,
            Scenario::Jobs => jobs::run(&args).await,
            Scenario::JobStore => job_store::run(&args).await,
            Scenario::Fairness => fairness::run(&args).await,
            Scenario::Balancing => balancing::run(&args),
            Scenario::Batching => batching::run(&args),
            Scenario::Soak => soak::run(&args).await,
            Scenario::Chaos => chaos::run(&args).await,
            Scenario::Proxy => gateway::proxy(&args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
