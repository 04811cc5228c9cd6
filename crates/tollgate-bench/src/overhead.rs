//! Scenario `overhead`: what the whole stack costs a request that misses the cache, next to
//! the bare client, under the same load in the same run.
//!
//! `rps_ratio` is the stack's throughput over the bare client's. Both sides are bound by
//! this process's CPU, so the ratio is also what the stack costs in CPU, as long as the
//! machine lends the process the same CPU in both sides' rounds; on a shared machine it
//! does not quite, and the bare side's own rate moves by a fifth between runs. So the
//! process's CPU time (`/proc/self/stat`) is read over each side's rounds as well:
//! `cpu_ratio` (bare CPU per request ÷ the stack's) is the same figure measured by CPU
//! spent rather than by time passed, and moves much less with the neighbours.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::Request;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate::policy::{BoxBody, Policy};
use tollgate_testkit::Provider;

use crate::load::{self, Outcome, Plan};
use crate::report;
use crate::{Args, OverheadSide};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every layer, with limits far above the load so that none waits: what is measured is
/// the work each does per request.
pub(crate) const POLICY: &str = r#"
primary:   { url: "http://placeholder", model: gpt-4o-mini }
fallbacks: [ { name: fallback, url: "http://placeholder" } ]
rate_limit: { requests: 100M/min, tokens: 100000M/min, mode: wait, max_wait: 30s }
retry:      { max_retries: 3 }
cache:      { ttl: 10m, max_size: 64MiB }
"#;

fn body(i: u64) -> Bytes {
    // Distinct per request: every one misses the cache and is stored.
    Bytes::from(format!(
        r#"{{"model":"gpt-4o-mini","max_tokens":16,"messages":[{{"role":"user","content":"Say hello in a few words, number {i}."}}]}}"#
    ))
}

fn request<B>(uri: &http::Uri, body: B) -> Result<Request<B>, String> {
    Request::post(uri.clone())
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-bench")
        .header("x-tenant-id", "bench")
        .body(body)
        .map_err(|e| e.to_string())
}

/// Runs `plan` through `svc` (the bare client, or the stack), each request distinct.
async fn drive<S, B>(plan: Plan, svc: S, uri: http::Uri, offset: u64) -> Outcome
where
    S: tower::Service<Request<Full<Bytes>>, Response = http::Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
    S::Error: std::fmt::Display,
    B: http_body::Body + Send,
    B::Data: Send,
    B::Error: std::fmt::Display,
{
    load::run(plan, move |i| {
        let (svc, uri) = (svc.clone(), uri.clone());
        async move { load::send(svc, request(&uri, Full::new(body(offset + i)))?).await }
    })
    .await
}

struct Side {
    ok: u64,
    errors: u64,
    busy: Duration,
    /// The process's CPU ticks over this side's rounds.
    cpu_ticks: u64,
    hist: Histogram<u64>,
    first_error: Option<String>,
}

impl Side {
    fn new() -> Self {
        Self {
            ok: 0,
            errors: 0,
            busy: Duration::ZERO,
            cpu_ticks: 0,
            hist: Histogram::new_with_bounds(1, 60_000_000, 3)
                .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!())),
            first_error: None,
        }
    }

    fn add(&mut self, o: Outcome) {
        self.ok += o.ok;
        self.errors += o.errors;
        self.busy += o.elapsed;
        let _ = self.hist.add(&o.latency_us);
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }

    fn rps(&self) -> f64 {
        self.ok as f64 / self.busy.as_secs_f64().max(1e-9)
    }

    /// CPU per request of the whole process (client, provider and, on the stack's side,
    /// the stack), in µs.
    fn cpu_us(&self, tick_s: f64) -> f64 {
        let requests = (self.ok + self.errors).max(1) as f64;
        self.cpu_ticks as f64 / tick_s * 1e6 / requests
    }
}

/// Runs `f`, adding the process's CPU ticks over it to `ticks`.
async fn on_cpu<F: std::future::Future<Output = Outcome>>(ticks: &mut u64, f: F) -> Outcome {
    let me = std::process::id();
    let before = crate::gateway::cpu_ticks(me);
    let out = f.await;
    if let (Some(b), Some(a)) = (before, crate::gateway::cpu_ticks(me)) {
        *ticks += a.saturating_sub(b);
    }
    out
}

pub(crate) async fn run(args: &Args) -> Result<(), BoxError> {
    let provider = Provider::builder().spawn().await?;
    let concurrency = args.concurrency.unwrap_or(64);
    let total = args
        .requests
        .unwrap_or(if args.quick { 60_000 } else { 400_000 });
    let rounds: u64 = if args.quick { 4 } else { 8 };
    let per_round = (total / rounds).max(1);

    let mut policy = match &args.policy {
        Some(path) => Policy::from_path(path)?,
        None => Policy::from_yaml(POLICY)?,
    };
    policy.primary.url = provider.url();
    for f in &mut policy.fallbacks {
        f.url = provider.url();
    }
    let stack_client: Client<HttpConnector, BoxBody> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build_http();
    let svc = policy.build(stack_client)?;
    let bare_client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build_http::<Full<Bytes>>();
    let uri: http::Uri = format!("{}/v1/chat/completions", provider.url()).parse()?;
    let stack_uri: http::Uri = "/v1/chat/completions".parse()?;

    let plan = |warmup| Plan {
        concurrency,
        warmup,
        requests: per_round,
        max_duration: Duration::from_secs(if args.quick { 5 } else { 30 }),
    };
    // Alternating rounds, so that drift in the machine's speed falls on both sides alike.
    let (mut b, mut s) = (Side::new(), Side::new());
    let offset = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let next = || offset.fetch_add(10_000_000, std::sync::atomic::Ordering::Relaxed);
    let (run_bare, run_stack) = match args.side {
        None => (true, true),
        Some(side) => (side == OverheadSide::Bare, side == OverheadSide::Stack),
    };
    for round in 0..rounds {
        if round == 0 {
            // Warm-up, outside the CPU count: connections, the tokenizer's tables.
            let warm = Plan {
                requests: 2_000,
                ..plan(0)
            };
            if run_bare {
                let _ = drive(warm, bare_client.clone(), uri.clone(), next()).await;
            }
            if run_stack {
                let _ = drive(warm, svc.clone(), stack_uri.clone(), next()).await;
            }
        }
        if run_bare {
            let out = on_cpu(
                &mut b.cpu_ticks,
                drive(plan(0), bare_client.clone(), uri.clone(), next()),
            )
            .await;
            b.add(out);
        }
        if run_stack {
            let out = on_cpu(
                &mut s.cpu_ticks,
                drive(plan(0), svc.clone(), stack_uri.clone(), next()),
            )
            .await;
            s.add(out);
        }
    }
    let tick_s = crate::gateway::clock_ticks();
    if let Some(side) = args.side {
        provider.shutdown().await;
        let one = if side == OverheadSide::Bare { &b } else { &s };
        report::result_line(
            "overhead-side",
            &[
                ("side", format!("{side:?}").to_lowercase()),
                ("ok", one.ok.to_string()),
                ("errors", one.errors.to_string()),
                ("rps", format!("{:.0}", one.rps())),
                ("cpu_us", format!("{:.1}", one.cpu_us(tick_s))),
            ],
        );
        return match one.errors {
            0 => Ok(()),
            n => Err(format!("{n} requests failed").into()),
        };
    }
    let (bare_cpu, stack_cpu) = (b.cpu_us(tick_s), s.cpu_us(tick_s));
    let cpu_ratio = bare_cpu / stack_cpu.max(1e-9);
    let served = provider.stats();
    provider.shutdown().await;

    let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p);
    let ratio = s.rps() / b.rps().max(1e-9);
    let p50_added = q(&s.hist, 0.5) as i64 - q(&b.hist, 0.5) as i64;
    let p99_added = q(&s.hist, 0.99) as i64 - q(&b.hist, 0.99) as i64;
    let us = |v: u64| format!("{:.0} µs", v as f64);
    report::table(
        &format!("overhead: the whole policy stack vs the bare client, concurrency {concurrency}, {rounds} alternating rounds"),
        &[
            ("bare", format!("{} ok, {} failed, {:.0} req/s, p50 {}, p99 {}", b.ok, b.errors, b.rps(), us(q(&b.hist, 0.5)), us(q(&b.hist, 0.99)))),
            ("stack", format!("{} ok, {} failed, {:.0} req/s, p50 {}, p99 {}", s.ok, s.errors, s.rps(), us(q(&s.hist, 0.5)), us(q(&s.hist, 0.99)))),
            ("rps ratio", format!("{ratio:.3} (goal ≥ 0.7 for every layer, ≥ 0.9 for the cache alone)")),
            ("CPU per request", format!("bare {bare_cpu:.1} µs, stack {stack_cpu:.1} µs: cpu ratio {cpu_ratio:.3}, {:.1} µs added", stack_cpu - bare_cpu)),
            ("p50 added", format!("{p50_added} µs")),
            ("p99 added", format!("{p99_added} µs (goal ≤ 1000 µs)")),
            ("provider saw", format!("{} requests", served.requests)),
        ],
    );
    for e in [&b.first_error, &s.first_error].into_iter().flatten() {
        println!("first error: {e}");
    }
    report::result_line(
        "overhead",
        &[
            ("rps_ratio", format!("{ratio:.3}")),
            ("cpu_ratio", format!("{cpu_ratio:.3}")),
            ("cpu_added_us", format!("{:.1}", stack_cpu - bare_cpu)),
            ("p50_added_us", p50_added.to_string()),
            ("p99_added_us", p99_added.to_string()),
            ("bare_rps", format!("{:.0}", b.rps())),
            ("stack_rps", format!("{:.0}", s.rps())),
            ("concurrency", concurrency.to_string()),
            ("errors", (b.errors + s.errors).to_string()),
        ],
    );
    if b.errors + s.errors > 0 {
        return Err(format!("{} requests failed", b.errors + s.errors).into());
    }
    Ok(())
}
