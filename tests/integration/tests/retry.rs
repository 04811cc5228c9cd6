//! The retry layer against the simulated provider over real sockets, on a paused clock.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tollgate_retry::{RequestBody, RetryLayer};
use tollgate_testkit::{Faults, Provider};
use tower::{Layer, ServiceExt};

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, RequestBody<Full<Bytes>>>
{
    Client::builder(TokioExecutor::new()).build_http()
}

fn chat(url: &str) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("authorization", "Bearer sk-1")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}]}"#,
        )))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn rate_limited_requests_wait_out_the_providers_retry_after() {
    let provider = Provider::builder().rpm(2).spawn().await.unwrap();
    let url = format!("{}/v1/chat/completions", provider.url());
    let svc = RetryLayer::new().layer(client());
    let start = Instant::now();
    for _ in 0..3 {
        let res = svc.clone().oneshot(chat(&url)).await.unwrap();
        assert_eq!(res.status(), 200);
        res.into_body().collect().await.unwrap();
    }
    let s = provider.key_stats("sk-1");
    assert_eq!((s.ok, s.rate_limited), (3, 1), "one 429, waited out");
    // 2 RPM: the third cell comes 30 s after the first.
    assert!(Instant::now() - start >= Duration::from_secs(29));
}

#[tokio::test(start_paused = true)]
async fn resets_and_server_errors_are_retried_until_they_pass() {
    let provider = Provider::builder()
        .faults(Faults {
            reset_rate: 0.2,
            server_error_rate: 0.2,
            ..Faults::default()
        })
        .seed(11)
        .spawn()
        .await
        .unwrap();
    let url = format!("{}/v1/chat/completions", provider.url());
    let svc = RetryLayer::builder()
        .max_retries(8)
        .budget(None)
        .build()
        .layer(client());
    for _ in 0..50 {
        let res = svc.clone().oneshot(chat(&url)).await.unwrap();
        assert_eq!(res.status(), 200);
        res.into_body().collect().await.unwrap();
    }
    let s = provider.stats();
    assert_eq!(s.ok, 50);
    assert!(
        s.faults > 5,
        "faults were injected and retried past: {}",
        s.faults
    );
}
