//! The token budget in front of the simulated provider, over real sockets: it reserves
//! the estimate, settles with the provider's own count (JSON and SSE), asks streams for
//! their usage without showing it to a caller who did not ask, keeps what a cut stream
//! reserved, gives back what a 429 reserved, and never overshoots with 64 in flight.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tollgate_core::key::Key;
use tollgate_testkit::{Provider, COMPLETION_TOKENS_HEADER, FAULT_HEADER};
use tollgate_tpm::estimate::Estimator;
use tollgate_tpm::{Budget, TokenQuota, TpmLayer};
use tower::{Layer, Service, ServiceExt};

fn layer(tokens: u64) -> TpmLayer {
    TpmLayer::builder()
        .budget(Budget::new(
            "tpm",
            TokenQuota::per(tokens, Duration::from_secs(365 * 24 * 3600)),
        ))
        .estimator(Estimator::default().default_output(100))
        .housekeeping(None)
        .build()
}

fn request(url: &str, body: &Value, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::post(url).header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

fn available(l: &TpmLayer) -> i64 {
    l.available("tpm", &Key::global()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn json_answers_settle_to_the_providers_count() {
    let provider = Provider::builder().spawn().await.unwrap();
    let url = format!("{}/v1/chat/completions", provider.url());
    let l = layer(10_000);
    let svc = l.layer(tollgate_integration_tests::client());
    let body = json!({"model": "gpt-4o", "max_tokens": 50, "messages": [{"role": "user", "content": "Hello!"}]});
    let res = svc
        .oneshot(request(&url, &body, &[(COMPLETION_TOKENS_HEADER, "7")]))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let total = v["usage"]["total_tokens"].as_u64().unwrap() as i64;
    assert_eq!(total, 9 + 7);
    // Reserved 9 + 50; settled to the 16 the provider counted.
    assert_eq!(available(&l), 10_000 - total);
}

#[tokio::test(start_paused = true)]
async fn streams_are_asked_for_usage_the_caller_does_not_see_and_settle() {
    let provider = Provider::builder().spawn().await.unwrap();
    let url = format!("{}/v1/chat/completions", provider.url());
    let l = layer(10_000);
    let svc = l.layer(tollgate_integration_tests::client());
    let body = json!({"model": "gpt-4o", "stream": true, "max_tokens": 50,
                      "messages": [{"role": "user", "content": "Hello!"}]});
    let res = svc
        .clone()
        .oneshot(request(&url, &body, &[(COMPLETION_TOKENS_HEADER, "5")]))
        .await
        .unwrap();
    let text =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert!(
        !text.contains("\"prompt_tokens\""),
        "the usage chunk was not the caller's: {text}"
    );
    assert_eq!(available(&l), 10_000 - (9 + 5));

    // A caller who asked for usage sees it.
    let mut asked = body.clone();
    asked["stream_options"] = json!({"include_usage": true});
    let res = svc
        .oneshot(request(&url, &asked, &[(COMPLETION_TOKENS_HEADER, "5")]))
        .await
        .unwrap();
    let text =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.contains("\"prompt_tokens\":9"));
    assert_eq!(available(&l), 10_000 - 2 * (9 + 5));
}

#[tokio::test(start_paused = true)]
async fn a_stream_cut_midway_keeps_its_reservation() {
    // Paced, so the headers and the first chunks are out before the cut.
    let provider = Provider::builder()
        .chunk_delay(Duration::from_millis(5))
        .spawn()
        .await
        .unwrap();
    let url = format!("{}/v1/chat/completions", provider.url());
    let l = layer(10_000);
    let svc = l.layer(tollgate_integration_tests::client());
    let body = json!({"model": "gpt-4o", "stream": true, "max_tokens": 50,
                      "messages": [{"role": "user", "content": "Hello!"}]});
    let res = svc
        .oneshot(request(&url, &body, &[(FAULT_HEADER, "cut")]))
        .await
        .unwrap();
    assert!(res.into_body().collect().await.is_err());
    assert_eq!(available(&l), 10_000 - (9 + 50));
}

#[tokio::test(start_paused = true)]
async fn a_provider_429_gives_everything_back() {
    let provider = Provider::builder().spawn().await.unwrap();
    let url = format!("{}/v1/chat/completions", provider.url());
    let l = layer(10_000);
    let svc = l.layer(tollgate_integration_tests::client());
    let body = json!({"model": "gpt-4o", "max_tokens": 50, "messages": [{"role": "user", "content": "Hi"}]});
    let res = svc
        .clone()
        .oneshot(request(&url, &body, &[(FAULT_HEADER, "429")]))
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(available(&l), 10_000);
    // A 503 (an outage: the model never ran) keeps nothing.
    let res = svc
        .clone()
        .oneshot(request(&url, &body, &[(FAULT_HEADER, "503")]))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(available(&l), 10_000);
    // A 500 keeps the prompt (the provider may have counted it), not the output.
    let res = svc
        .oneshot(request(&url, &body, &[(FAULT_HEADER, "500")]))
        .await
        .unwrap();
    assert_eq!(res.status(), 500);
    assert_eq!(
        available(&l),
        10_000 - 8,
        "3 + (3 + 'user' + 'Hi') prompt tokens kept"
    );
}

#[tokio::test(start_paused = true)]
async fn sixty_four_in_flight_cannot_overshoot() {
    // A slow provider: every request is in flight before any answer settles.
    let provider = Provider::builder()
        .latency(Duration::from_millis(200))
        .spawn()
        .await
        .unwrap();
    let url = format!("{}/v1/chat/completions", provider.url());
    // Each request reserves 9 + 100 = 109; the budget holds 10 of them.
    let l = layer(1090);
    let svc = l.layer(tollgate_integration_tests::client());
    let body = json!({"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": "Hello!"}]});
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (mut svc, req) = (
                svc.clone(),
                request(&url, &body, &[(COMPLETION_TOKENS_HEADER, "100")]),
            );
            tokio::spawn(async move {
                let res = ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc)
                    .await
                    .ok()?
                    .call(req)
                    .await
                    .ok()?;
                res.into_body().collect().await.ok()?;
                Some(())
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        if t.await.unwrap().is_some() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10);
    let s = provider.stats();
    assert_eq!(
        s.requests, 10,
        "refused requests never reached the provider"
    );
    assert!(s.tokens_served() <= 1090);
}

#[tokio::test(start_paused = true)]
async fn a_provider_that_cannot_be_reached_costs_nothing() {
    // A port nobody listens on: the connection is refused, the request never left.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/v1/chat/completions",
        closed.local_addr().unwrap()
    );
    drop(closed);
    let l = layer(10_000);
    let svc = l.layer(tollgate_integration_tests::client());
    let body = json!({"model": "gpt-4o", "max_tokens": 50, "messages": [{"role": "user", "content": "Hi"}]});
    assert!(svc.oneshot(request(&url, &body, &[])).await.is_err());
    assert_eq!(available(&l), 10_000);
}
