//! The whole stack a policy file builds, end to end over loopback HTTP against simulated
//! providers, on a paused clock: what a user of `Policy::build` relies on.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::time::Instant;
use tollgate::failover::X_TOLLGATE_BACKEND;
use tollgate::policy::{BoxBody, Policy, PolicyService};
use tollgate_testkit::{Faults, Provider};
use tower::ServiceExt;

const POLICY: &str = r#"
primary:  { url: "http://placeholder", model: gpt-4o-mini, headers: { authorization: "Bearer sk-primary" } }
fallbacks:
  - { name: fallback, url: "http://placeholder", model: gpt-4o-mini, headers: { authorization: "Bearer sk-fallback" } }
rate_limit: { requests: 60/min, tokens: 6000/min, mode: wait, max_wait: 5m, adaptive: true }
retry:      { max_retries: 3, backoff: 250ms, max_backoff: 2s }
cache:      { ttl: 10m, partition: "header:x-tenant-id" }
failover:   { failures: 3, window: 30s, cooldown: 10s }
"#;

/// The policy's stack, with its backends pointed at the simulated providers.
fn stack(yaml: &str, primary: &Provider, fallback: &Provider) -> PolicyService<Full<Bytes>> {
    let mut policy = Policy::from_yaml(yaml).unwrap();
    policy.primary.url = primary.url();
    if let Some(f) = policy.fallbacks.first_mut() {
        f.url = fallback.url();
    }
    let client: Client<HttpConnector, BoxBody> = Client::builder(TokioExecutor::new()).build_http();
    policy.build(client).unwrap()
}

fn chat(tenant: &str, prompt: &str, stream: bool) -> Request<Full<Bytes>> {
    let mut body = json!({
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": prompt}],
        // Far more than the 16 tokens the provider answers with: the budget only keeps
        // pace if it settles with the real `usage` and gives the rest back.
        "max_tokens": 500,
    });
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("x-tenant-id", tenant)
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

struct Reply {
    status: u16,
    backend: String,
    cache: String,
    body: Bytes,
}

fn header(h: &http::HeaderMap, name: &str) -> String {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

async fn send(svc: &PolicyService<Full<Bytes>>, req: Request<Full<Bytes>>) -> Reply {
    let res = svc.clone().oneshot(req).await.expect("the stack answers");
    let h = res.headers();
    let (backend, cache) = (
        header(h, X_TOLLGATE_BACKEND.as_str()),
        header(h, "x-tollgate-cache"),
    );
    let status = res.status().as_u16();
    let body = res
        .into_body()
        .collect()
        .await
        .expect("the whole body")
        .to_bytes();
    Reply {
        status,
        backend,
        cache,
        body,
    }
}

/// The answer's text, from a JSON completion or from an SSE stream's chunks.
fn answer_text(r: &Reply) -> String {
    let text = String::from_utf8_lossy(&r.body);
    if text.starts_with("data:") {
        assert!(
            text.trim_end().ends_with("data: [DONE]"),
            "a stream ends with [DONE]: {text}"
        );
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect()
    } else {
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

#[tokio::test(start_paused = true)]
async fn a_burst_passes_at_the_quota_pace_with_no_429_and_every_request_answered() {
    // The provider's real limits; the policy mirrors them. 5% of answers are 500/503.
    let primary = Provider::builder()
        .rpm(60)
        .tpm(6000)
        .faults(Faults {
            server_error_rate: 0.05,
            ..Faults::default()
        })
        .seed(7)
        .spawn()
        .await
        .unwrap();
    let fallback = Provider::builder().rpm(60).tpm(6000).spawn().await.unwrap();
    let svc = stack(POLICY, &primary, &fallback);

    let start = Instant::now();
    let tasks: Vec<_> = (0..120)
        .map(|i| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let req = chat(
                    &format!("tenant-{}", i % 4),
                    &format!("question {i}"),
                    i % 2 == 0,
                );
                send(&svc, req).await
            })
        })
        .collect();
    let mut served_by_primary = 0;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert!(!answer_text(&r).is_empty());
        served_by_primary += usize::from(r.backend == "primary");
    }
    let makespan = start.elapsed();

    let p = primary.stats();
    assert_eq!(
        p.rate_limited, 0,
        "the limiter kept the provider from refusing: {p:?}"
    );
    assert!(
        p.faults > 0,
        "the run met faults, and retried through them: {p:?}"
    );
    assert!(
        served_by_primary >= 115,
        "the fallback was needed only rarely: {served_by_primary}"
    );
    // 60 at once, then one a second: the RPM bound is 60 s. The token budget must not
    // add to it, which it would if it kept the 500-token reservations.
    assert!(
        makespan >= Duration::from_secs(55),
        "paced by the limiter: {makespan:?}"
    );
    assert!(
        makespan <= Duration::from_secs(66),
        "within 10% of the quota's pace: {makespan:?}"
    );
    assert!(p.tokens_served() <= 6000 + 60 * 100, "{p:?}");
}

#[tokio::test(start_paused = true)]
async fn repeats_are_served_from_cache_per_tenant_streams_included() {
    let primary = Provider::builder().spawn().await.unwrap();
    let fallback = Provider::builder().spawn().await.unwrap();
    let svc = stack(POLICY, &primary, &fallback);

    for stream in [false, true] {
        let first = send(&svc, chat("acme", "What is GCRA?", stream)).await;
        let again = send(&svc, chat("acme", "What is GCRA?", stream)).await;
        let other = send(&svc, chat("globex", "What is GCRA?", stream)).await;
        assert_eq!((first.status, again.status, other.status), (200, 200, 200));
        assert_eq!(first.cache, "miss");
        assert_eq!(again.cache, "hit", "stream={stream}");
        assert_eq!(
            other.cache, "miss",
            "another tenant never reads acme's answer"
        );
        assert_eq!(answer_text(&first), answer_text(&again));
    }
    assert_eq!(
        primary.stats().requests,
        4,
        "two misses per shape reached the provider"
    );
}

#[tokio::test(start_paused = true)]
async fn fails_over_while_the_primary_is_down_and_returns_when_it_recovers() {
    let primary = Provider::builder().spawn().await.unwrap();
    let fallback = Provider::builder().spawn().await.unwrap();
    let svc = stack(POLICY, &primary, &fallback);

    let r = send(&svc, chat("t", "before", false)).await;
    assert_eq!((r.status, r.backend.as_str()), (200, "primary"));

    primary.set_faults(Faults {
        server_error_rate: 1.0,
        ..Faults::default()
    });
    for i in 0..5 {
        let r = send(&svc, chat("t", &format!("during {i}"), i % 2 == 1)).await;
        assert_eq!(
            (r.status, r.backend.as_str()),
            (200, "fallback"),
            "request {i}"
        );
    }
    let tried = primary.stats().requests;
    // Three failures set the primary aside: the later requests went straight to the
    // fallback without paying for the primary's retries.
    let r = send(&svc, chat("t", "cooling", false)).await;
    assert_eq!(r.backend, "fallback");
    assert_eq!(
        primary.stats().requests,
        tried,
        "a cooling backend is not tried"
    );

    primary.set_faults(Faults::default());
    tokio::time::sleep(Duration::from_secs(11)).await;
    let r = send(&svc, chat("t", "after", false)).await;
    assert_eq!(
        (r.status, r.backend.as_str()),
        (200, "primary"),
        "back after its cooldown"
    );
    assert_eq!(
        fallback.stats().rate_limited + primary.stats().rate_limited,
        0
    );
}

#[tokio::test(start_paused = true)]
async fn a_refusal_by_a_full_backend_moves_to_the_fallback_at_once() {
    // The primary's quota is 2 a minute and the policy will not wait for it.
    let policy = POLICY
        .replace("requests: 60/min", "requests: 2/min")
        .replace("max_wait: 5m", "max_wait: 1s");
    let primary = Provider::builder().rpm(2).spawn().await.unwrap();
    let fallback = Provider::builder().spawn().await.unwrap();
    let svc = stack(&policy, &primary, &fallback);
    let mut by = Vec::new();
    for i in 0..4 {
        by.push(send(&svc, chat("t", &format!("q{i}"), false)).await.backend);
    }
    assert_eq!(by, ["primary", "primary", "fallback", "fallback"]);
    assert_eq!(
        primary.stats().rate_limited,
        0,
        "the provider never had to refuse"
    );
}
