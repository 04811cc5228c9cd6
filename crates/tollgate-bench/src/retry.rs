//! Scenario `retry`: a burst against a rate-limited provider, through the naive retry loop
//! everyone writes by hand, and through `RetryLayer`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_core::headers;
use tollgate_ratelimit::{Limit, RateLimitLayer};
use tollgate_retry::{RequestBody, RetryLayer};
use tollgate_testkit::Provider;
use tower::Layer;

use crate::load::{self, Plan};
use crate::report;
use crate::Args;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const BODY: &[u8] =
    br#"{"model":"gpt-4o-mini","max_tokens":8,"messages":[{"role":"user","content":"Hi"}]}"#;

fn chat(url: &str, key: &str) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::from_static(BODY)))
        .unwrap_or_default()
}

/// The seed's loop: three tries, sleeping `Retry-After × 1.5^n` after each 429.
async fn naive(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
) -> Result<(), String> {
    for attempt in 0..3i32 {
        let res = client
            .request(chat(url, "sk-naive"))
            .await
            .map_err(|e| e.to_string())?;
        let status = res.status();
        let wait = headers::retry_after(res.headers(), std::time::SystemTime::now());
        let _ = res.into_body().collect().await;
        if status.is_success() {
            return Ok(());
        }
        if status != 429 || attempt == 2 {
            return Err(format!("status {status}"));
        }
        let secs = wait.unwrap_or(Duration::from_secs(1)).as_secs_f64() * 1.5f64.powi(attempt);
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    }
    Err("gave up".into())
}

/// Sends the plan's requests through `svc` with the API key `key`.
async fn through<S, ResB>(
    plan: Plan,
    svc: S,
    url: &str,
    key: &'static str,
) -> (load::Outcome, Duration)
where
    S: tower::Service<Request<Full<Bytes>>, Response = http::Response<ResB>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
    S::Error: std::fmt::Display,
    ResB: http_body::Body + Send + 'static,
    ResB::Data: Send,
    ResB::Error: Send + std::fmt::Display,
{
    let url = Arc::new(url.to_owned());
    let start = Instant::now();
    let out = load::run(plan, move |_| {
        let (svc, u) = (svc.clone(), Arc::clone(&url));
        async move { crate::load::send(svc, chat(&u, key)).await }
    })
    .await;
    (out, start.elapsed())
}

pub(crate) async fn run(args: &Args) -> Result<(), BoxError> {
    let n: u64 = args.requests.unwrap_or(if args.quick { 120 } else { 300 });
    let concurrency = 50;
    // 600 RPM, enforced as a bucket of 60 refilled at 10 a second: providers quantize
    // minute limits into shorter windows. One bucket of 600 would let the whole burst
    // through at once. Its headers state the minute's 600, as real providers do.
    let provider = Provider::builder().rpm(600).burst(60).spawn().await?;
    let rate = 10.0; // requests per second
    let url = format!("{}/v1/chat/completions", provider.url());
    let plan = Plan {
        concurrency,
        warmup: 0,
        requests: n,
        max_duration: Duration::from_secs(if args.quick { 25 } else { 120 }),
    };

    let plain = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build_http::<Full<Bytes>>();
    let naive_client = plain.clone();
    let naive_url = Arc::new(url.clone());
    let start = Instant::now();
    let naive_out = load::run(plan, move |_| {
        let (c, u) = (naive_client.clone(), Arc::clone(&naive_url));
        async move { naive(&c, &u).await }
    })
    .await;
    let naive_makespan = start.elapsed();
    let naive_429 = provider.key_stats("sk-naive").rate_limited;

    // Through the layer with its defaults (three retries, the default budget, hints obeyed):
    // what a user gets by adding `RetryLayer::new()` and nothing else.
    let alone = RetryLayer::new().layer(
        Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(concurrency)
            .build_http::<RequestBody<Full<Bytes>>>(),
    );
    let (alone_out, alone_makespan) = through(plan, alone, &url, "sk-alone").await;
    let alone_429 = provider.key_stats("sk-alone").rate_limited;

    // The default stack of a policy that says only `retry`: the same defaults, over a limit
    // that learns the provider's quota from its headers (slow start until the first
    // answer) and waits its turn.
    let learned = RateLimitLayer::builder()
        .limit(Limit::learned("provider"))
        .wait(Duration::from_secs(120))
        .build();
    let retrying = RetryLayer::new().layer(
        learned.layer(
            Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(concurrency)
                .build_http::<RequestBody<Full<Bytes>>>(),
        ),
    );
    let start = Instant::now();
    let (tg_out, _) = through(plan, retrying, &url, "sk-tollgate").await;
    let tg_makespan = start.elapsed();
    let _ = alone_makespan;
    let tg_429 = provider.key_stats("sk-tollgate").rate_limited;
    provider.shutdown().await;

    let ideal = Duration::from_secs_f64(n as f64 / rate);
    let ratio = tg_makespan.as_secs_f64() / ideal.as_secs_f64();
    report::table(
        &format!(
            "retry: {n} requests at concurrency {concurrency}, provider at 600 RPM (a bucket of 60)"
        ),
        &[
            (
                "naive loop",
                format!(
                    "{:4} ok {:4} failed {:5} provider 429s   makespan {:6.2} s",
                    naive_out.ok,
                    naive_out.errors,
                    naive_429,
                    naive_makespan.as_secs_f64()
                ),
            ),
            (
                "RetryLayer::new()",
                format!(
                    "{:4} ok {:4} failed {:5} provider 429s   makespan {:6.2} s",
                    alone_out.ok,
                    alone_out.errors,
                    alone_429,
                    alone_makespan.as_secs_f64()
                ),
            ),
            (
                "+ learned limit",
                format!(
                    "{:4} ok {:4} failed {:5} provider 429s   makespan {:6.2} s",
                    tg_out.ok,
                    tg_out.errors,
                    tg_429,
                    tg_makespan.as_secs_f64()
                ),
            ),
            (
                "N / rate",
                format!(
                    "{:.2} s; RetryLayer makespan ÷ (N / rate) = {ratio:.2}",
                    ideal.as_secs_f64()
                ),
            ),
        ],
    );
    report::result_line(
        "retry",
        &[
            ("naive_failed", naive_out.errors.to_string()),
            ("tollgate_failed", tg_out.errors.to_string()),
            ("retry_alone_failed", alone_out.errors.to_string()),
            ("retry_alone_429", alone_429.to_string()),
            ("naive_429", naive_429.to_string()),
            ("tollgate_429", tg_429.to_string()),
            ("ratio", format!("{ratio:.2}")),
        ],
    );
    Ok(())
}
