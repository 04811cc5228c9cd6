//! The rate limiter in wait mode, judged by the simulated provider over real sockets, on
//! one paused clock: a burst of requests through a limiter with the provider's quota gets
//! no 429 at all, at the pace the quota allows.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tollgate_integration_tests::{chat, client};
use tollgate_ratelimit::{Limit, Quota, RateLimitLayer};
use tollgate_testkit::Provider;
use tower::{Layer, ServiceExt};

#[tokio::test(start_paused = true)]
async fn a_waiting_client_with_the_providers_quota_never_sees_a_429() {
    let window = Duration::from_secs(3);
    let provider = Provider::builder()
        .rpm(30)
        .window(window)
        .spawn()
        .await
        .unwrap();
    let url = format!("{}/v1/chat/completions", provider.url());
    let limited = RateLimitLayer::builder()
        .limit(Limit::new("provider-rpm", Quota::per(30, window)))
        .wait(Duration::from_secs(60))
        .max_queue(100)
        .build()
        .layer(client());

    let start = Instant::now();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let svc = limited.clone();
            let req = Request::post(url.as_str())
                .header("authorization", "Bearer sk-1")
                .body(Full::new(Bytes::from(chat("Hi").to_string())))
                .unwrap();
            tokio::spawn(async move {
                let res = svc.oneshot(req).await.unwrap();
                let status = res.status();
                res.into_body().collect().await.unwrap();
                status
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let took = Instant::now() - start;
    let s = provider.key_stats("sk-1");
    assert_eq!((s.ok, s.rate_limited), (100, 0));
    // 30 at once, 70 more at 10 a second: 7 s, and not much more.
    assert!(took >= Duration::from_secs(7), "{took:?}");
    assert!(took < Duration::from_millis(7500), "{took:?}");
}
