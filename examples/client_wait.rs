//! A client that waits instead of failing: 100 requests sent at once to a provider that
//! allows 30 per 3 seconds, first by a naive client, then through a `RateLimitLayer` in
//! wait mode with the provider's quota less a 10% margin. The naive client sees 429s; the
//! limited one sees none, and finishes close to the pace the quota allows.
//!
//! ```text
//! cargo run --example client_wait
//! ```

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_ratelimit::{Limit, Quota, RateLimitLayer};
use tollgate_testkit::Provider;
use tower::{Layer, Service, ServiceExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const REQUESTS: usize = 100;

fn chat(url: &str, key: &str) -> Request<Full<Bytes>> {
    let body =
        r#"{"model":"gpt-4o-mini","max_tokens":8,"messages":[{"role":"user","content":"Hi"}]}"#;
    Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap_or_default()
}

/// Sends `REQUESTS` at once through `svc`; returns (ok, 429s, other failures, elapsed).
async fn burst<S>(svc: S, url: &str, key: &str) -> (usize, usize, usize, Duration)
where
    S: Service<Request<Full<Bytes>>, Response = http::Response<hyper::body::Incoming>>
        + Clone
        + Send
        + 'static,
    S::Error: std::fmt::Display + Send,
    S::Future: Send,
{
    let start = Instant::now();
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let (svc, req) = (svc.clone(), chat(url, key));
            tokio::spawn(async move {
                match svc.oneshot(req).await {
                    Ok(res) => {
                        let status = res.status();
                        let _ = res.into_body().collect().await;
                        Ok(status)
                    }
                    Err(e) => Err(e.to_string()),
                }
            })
        })
        .collect();
    let (mut ok, mut limited, mut failed) = (0, 0, 0);
    for t in tasks {
        match t.await {
            Ok(Ok(s)) if s.is_success() => ok += 1,
            Ok(Ok(s)) if s == 429 => limited += 1,
            _ => failed += 1,
        }
    }
    (ok, limited, failed, start.elapsed())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // The provider: 30 requests per 3 s per API key (a bucket of 30, refilled 10 a second).
    let window = Duration::from_secs(3);
    let provider = Provider::builder().rpm(30).window(window).spawn().await?;
    let url = format!("{}/v1/chat/completions", provider.url());
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    println!("{REQUESTS} requests at once; the provider allows 30 per {window:?} per key\n");

    let (ok, limited, failed, took) = burst(client.clone(), &url, "sk-naive").await;
    println!("naive client:     {ok:3} ok, {limited:3} got 429, {failed} failed, in {took:.2?}");

    // The provider's quota on our side, with a 10% margin on the rate (9 a second against
    // its 10): our clock and the provider's are not the same clock, and a request sent
    // the instant a cell frees may reach the provider a hair before its cell does. Wait
    // up to 30 s for a cell rather than fail.
    let limiter = RateLimitLayer::builder()
        .limit(Limit::new("provider-rpm", Quota::per_second(9).burst(30)))
        .wait(Duration::from_secs(30))
        .max_queue(REQUESTS)
        .build();
    let limited_client = limiter.layer(client);
    let (ok, limited, failed, took) = burst(limited_client, &url, "sk-tollgate").await;
    println!("through Tollgate: {ok:3} ok, {limited:3} got 429, {failed} failed, in {took:.2?}");
    println!(
        "\n(30 pass at once, the other 70 at 9 a second: about 7.8 s; the quota itself allows 7 s)"
    );
    let s = provider.key_stats("sk-tollgate");
    println!(
        "the provider sent {} 429s to the Tollgate client",
        s.rate_limited
    );
    if limited > 0 || failed > 0 || s.rate_limited > 0 {
        return Err("the rate-limited client should never see a 429".into());
    }
    Ok(())
}
