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
use tollgate_retry::{RequestBody, RetryLayer};
use tollgate_testkit::Provider;
use tower::{Layer, ServiceExt};

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

pub(crate) async fn run(args: &Args) -> Result<(), BoxError> {
    let n: u64 = args.requests.unwrap_or(if args.quick { 120 } else { 300 });
    let concurrency = 50;
    // 600 RPM, enforced as 60 per 6 s (a burst of 60): providers quantize minute limits
    // into shorter windows. One bucket of 600 would let the whole burst through at once.
    let window = Duration::from_secs(6);
    let provider = Provider::builder().rpm(60).window(window).spawn().await?;
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

    // Through the layer: hints obeyed, spread up to 2x so 50 clients told the same time
    // do not all come back in the same instant; retries until the deadline rather than a
    // fixed three; no budget, since a rate-limited provider is not a failing one.
    let layer = RetryLayer::builder()
        .max_retries(1000)
        .hint_spread(1.0)
        .budget(None)
        .deadline(Some(Duration::from_secs(120)))
        .build();
    let retrying = layer.layer(
        Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(concurrency)
            .build_http::<RequestBody<Full<Bytes>>>(),
    );
    let tg_url = Arc::new(url.clone());
    let start = Instant::now();
    let tg_out = load::run(plan, move |_| {
        let (svc, u) = (retrying.clone(), Arc::clone(&tg_url));
        async move {
            let res = svc
                .oneshot(chat(&u, "sk-tollgate"))
                .await
                .map_err(|e| e.to_string())?;
            let status = res.status();
            let _ = res.into_body().collect().await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("status {status}"))
            }
        }
    })
    .await;
    let tg_makespan = start.elapsed();
    let tg_429 = provider.key_stats("sk-tollgate").rate_limited;
    provider.shutdown().await;

    let ideal = Duration::from_secs_f64(n as f64 / rate);
    let ratio = tg_makespan.as_secs_f64() / ideal.as_secs_f64();
    report::table(
        &format!(
            "retry: {n} requests at concurrency {concurrency}, provider at 600 RPM (60 per 6 s)"
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
                "RetryLayer",
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
            ("naive_429", naive_429.to_string()),
            ("tollgate_429", tg_429.to_string()),
            ("ratio", format!("{ratio:.2}")),
        ],
    );
    Ok(())
}
