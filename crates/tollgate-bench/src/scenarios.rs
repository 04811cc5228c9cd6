//! The scenarios.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_testkit::Provider;

use crate::load::{self, Plan};
use crate::report;
use crate::Args;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub(crate) fn plan(args: &Args) -> Plan {
    let (requests, secs) = if args.quick {
        (100_000, 10)
    } else {
        (1_000_000, 60)
    };
    Plan {
        concurrency: args.concurrency.unwrap_or(32),
        warmup: (requests / 20).min(1_000),
        requests: args.requests.unwrap_or(requests),
        max_duration: Duration::from_secs(secs),
    }
}

/// A hyper client straight to the simulated provider: the cost of the HTTP round trip and
/// the provider itself, with no Tollgate layer in between.
pub(crate) async fn baseline(args: &Args) -> Result<(), BoxError> {
    let provider = Provider::builder().spawn().await?;
    let url: http::Uri = format!("{}/v1/chat/completions", provider.url()).parse()?;
    let body = Bytes::from_static(
        br#"{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"Say hello in a few words."}]}"#,
    );
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.concurrency.unwrap_or(32))
        .build_http::<Full<Bytes>>();
    let plan = plan(args);
    let outcome = load::run(plan, move |_| {
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        async move {
            let req = Request::post(url)
                .header("content-type", "application/json")
                .header("authorization", "Bearer sk-bench")
                .body(Full::new(body))
                .map_err(|e| e.to_string())?;
            let res = client.request(req).await.map_err(|e| e.to_string())?;
            let status = res.status();
            res.into_body().collect().await.map_err(|e| e.to_string())?;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("status {status}"))
            }
        }
    })
    .await;
    let served = provider.stats();
    provider.shutdown().await;

    let h = &outcome.latency_us;
    let ms = |us: u64| format!("{:.3} ms", us as f64 / 1000.0);
    report::table(
        "baseline: hyper client -> simulated provider over 127.0.0.1 (no Tollgate layer)",
        &[
            (
                "requests",
                format!("{} ok, {} failed", outcome.ok, outcome.errors),
            ),
            ("concurrency", plan.concurrency.to_string()),
            ("elapsed", format!("{:.2} s", outcome.elapsed.as_secs_f64())),
            ("throughput", format!("{:.0} req/s", outcome.rps())),
            ("latency p50", ms(h.value_at_quantile(0.50))),
            ("latency p90", ms(h.value_at_quantile(0.90))),
            ("latency p99", ms(h.value_at_quantile(0.99))),
            ("latency max", ms(h.max())),
            (
                "provider saw",
                format!(
                    "{} requests, {} tokens",
                    served.requests,
                    served.tokens_served()
                ),
            ),
        ],
    );
    if let Some(e) = &outcome.first_error {
        println!("first error: {e}");
    }
    report::result_line(
        "baseline",
        &[
            ("rps", format!("{:.0}", outcome.rps())),
            ("p50_us", h.value_at_quantile(0.50).to_string()),
            ("p99_us", h.value_at_quantile(0.99).to_string()),
            ("requests", outcome.ok.to_string()),
            ("errors", outcome.errors.to_string()),
            ("concurrency", plan.concurrency.to_string()),
        ],
    );
    if outcome.errors > 0 {
        return Err(format!("{} requests failed", outcome.errors).into());
    }
    Ok(())
}
