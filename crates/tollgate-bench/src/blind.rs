//! Scenario `goodput --blind`: a burst against a provider whose quota the policy does not
//! state (600 a minute, ten at once, said only in its `x-ratelimit-*` headers), beside the
//! same burst through a policy that states it. The client does not retry; the stack must.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate::policy::{BoxBody, Policy};
use tollgate_testkit::Provider;

use crate::load::{self, Plan};
use crate::report;
use crate::Args;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const RPM: u64 = 600;
const BURST: u64 = 10;
const CONCURRENCY: usize = 50;

/// The policy a user writes who knows the quota.
const CONFIGURED: &str = r#"
primary:    { url: "http://placeholder" }
rate_limit: { requests: 600/min, burst: 10, mode: wait, max_wait: 60s }
retry:      {}
"#;

/// The policy a user writes who does not: where the provider is, and to retry.
const BLIND: &str = r#"
primary: { url: "http://placeholder" }
retry:   {}
"#;

struct Run {
    ok: u64,
    failed: u64,
    provider_429: u64,
    makespan: Duration,
    first_error: Option<String>,
}

impl Run {
    /// Makespan over the quota's floor: the requests beyond the bucket at the refill rate.
    fn ratio(&self) -> f64 {
        let floor = self.ok.saturating_sub(BURST) as f64 * 60.0 / RPM as f64;
        self.makespan.as_secs_f64() / floor.max(1e-9)
    }
}

async fn burst(yaml: &str, n: u64, max: Duration) -> Result<Run, BoxError> {
    let provider = Provider::builder().rpm(RPM).burst(BURST).spawn().await?;
    let mut policy = Policy::from_yaml(yaml)?;
    policy.primary.url = provider.url();
    let client: Client<HttpConnector, BoxBody> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(CONCURRENCY)
        .build_http();
    let svc = policy.build::<_, _, Full<Bytes>>(client)?;
    let body = Arc::new(
        serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 16,
                           "messages": [{"role": "user", "content": "How do token buckets work?"}]})
        .to_string(),
    );
    let plan = Plan {
        concurrency: CONCURRENCY,
        warmup: 0,
        requests: n,
        max_duration: max,
    };
    let start = Instant::now();
    let out = load::run(plan, move |_| {
        let (svc, body) = (svc.clone(), Arc::clone(&body));
        async move {
            let req = Request::post("/v1/chat/completions")
                .header("content-type", "application/json")
                .header("authorization", "Bearer sk-bench")
                .body(Full::new(Bytes::from(body.as_bytes().to_vec())))
                .map_err(|e| e.to_string())?;
            crate::load::send(svc, req).await
        }
    })
    .await;
    let makespan = start.elapsed();
    let stats = provider.stats();
    provider.shutdown().await;
    Ok(Run {
        ok: out.ok,
        failed: out.errors + n.saturating_sub(out.ok + out.errors),
        provider_429: stats.rate_limited,
        makespan,
        first_error: out.first_error,
    })
}

pub(crate) async fn run(args: &Args) -> Result<(), BoxError> {
    let n = args.requests.unwrap_or(if args.quick { 120 } else { 300 });
    let max = Duration::from_secs(if args.quick { 30 } else { 90 });
    let configured = burst(CONFIGURED, n, max).await?;
    let blind = burst(BLIND, n, max).await?;
    let row = |r: &Run| {
        format!(
            "{:4} ok {:4} failed {:4} provider 429s   makespan {:6.2} s   ratio {:.3}",
            r.ok,
            r.failed,
            r.provider_429,
            r.makespan.as_secs_f64(),
            r.ratio()
        )
    };
    report::table(
        &format!("goodput --blind: {n} chat requests at concurrency {CONCURRENCY}, provider at {RPM}/min with a burst of {BURST}, the client never retries"),
        &[
            ("quota in the policy", row(&configured)),
            ("quota learned", row(&blind)),
            (
                "goal (learned)",
                format!("0 failed, 429s ≤ 5% of {n}, ratio ≤ 1.10 (makespan ÷ the quota's floor)"),
            ),
        ],
    );
    for (name, r) in [("configured", &configured), ("learned", &blind)] {
        if let Some(e) = &r.first_error {
            println!("first error ({name}): {e}");
        }
    }
    report::result_line(
        "goodput-blind",
        &[
            ("ratio", format!("{:.3}", blind.ratio())),
            ("provider_429", blind.provider_429.to_string()),
            ("failed", blind.failed.to_string()),
            ("configured_ratio", format!("{:.3}", configured.ratio())),
            ("configured_429", configured.provider_429.to_string()),
            ("configured_failed", configured.failed.to_string()),
            ("requests", n.to_string()),
        ],
    );
    Ok(())
}
