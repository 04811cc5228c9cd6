//! Failover between simulated providers over real sockets, on a paused clock.

use std::time::Duration;

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tollgate_core::facts::ReplayBody;
use tollgate_core::refusal::Refusal;
use tollgate_failover::{AllCooling, Backend, Cooldown, Failover, X_TOLLGATE_BACKEND};
use tollgate_testkit::{Faults, Provider};
use tower::util::BoxCloneSyncService;
use tower::{service_fn, ServiceExt};

type BoxError = tollgate_core::BoxError;
type Svc = BoxCloneSyncService<Request<ReplayBody>, Response<Incoming>, BoxError>;

/// A backend: a client that sends the request to `provider`'s base URL.
fn backend(provider: &Provider) -> Svc {
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody>();
    let base = provider.url();
    BoxCloneSyncService::new(service_fn(move |mut req: Request<ReplayBody>| {
        let client = client.clone();
        let uri = format!("{base}{}", req.uri().path());
        async move {
            *req.uri_mut() = uri.parse()?;
            Ok::<_, BoxError>(client.request(req).await?)
        }
    }))
}

fn bearer(key: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("Bearer {key}")).unwrap()
}

fn chat(body: Value) -> Request<Full<Bytes>> {
    Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sk-caller")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn hello() -> Value {
    json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]})
}

async fn ask(svc: &Failover<Svc>, body: Value) -> (String, Value) {
    let res = svc.clone().oneshot(chat(body)).await.unwrap();
    let who = res.headers()[X_TOLLGATE_BACKEND]
        .to_str()
        .unwrap()
        .to_owned();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (who, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn two(primary: &Provider, fallback: &Provider) -> Failover<Svc> {
    Failover::builder()
        .backend(
            Backend::new("primary", backend(primary)).header(AUTHORIZATION, bearer("sk-primary")),
        )
        .backend(
            Backend::new("fallback", backend(fallback))
                .model("gpt-4o-mini")
                .header(AUTHORIZATION, bearer("sk-fallback"))
                .priority(1),
        )
        .build()
}

#[tokio::test(start_paused = true)]
async fn a_limited_primary_sends_traffic_to_the_fallback_with_its_model() {
    let hour = Duration::from_secs(3600);
    let primary = Provider::builder()
        .rpm(1)
        .window(hour)
        .spawn()
        .await
        .unwrap();
    let fallback = Provider::builder().spawn().await.unwrap();
    let svc = two(&primary, &fallback);
    let (who, v) = ask(&svc, hello()).await;
    assert_eq!(
        (who.as_str(), v["model"].as_str()),
        ("primary", Some("gpt-4o"))
    );
    let (who, v) = ask(&svc, hello()).await;
    assert_eq!(
        (who.as_str(), v["model"].as_str()),
        ("fallback", Some("gpt-4o-mini"))
    );
    // Credentials stay with their backend, and the caller's never reaches either.
    assert_eq!(primary.key_stats("sk-primary").requests, 2);
    assert_eq!(primary.key_stats("sk-fallback").requests, 0);
    assert_eq!(fallback.key_stats("sk-fallback").requests, 1);
    assert_eq!(fallback.key_stats("sk-primary").requests, 0);
    assert_eq!(
        primary.key_stats("sk-caller").requests + fallback.key_stats("sk-caller").requests,
        0
    );
}

#[tokio::test(start_paused = true)]
async fn traffic_returns_to_the_primary_after_its_cooldown() {
    // 2 requests per 20 s: the third is refused with a wait of about 10 s, a long hint.
    let primary = Provider::builder()
        .rpm(2)
        .window(Duration::from_secs(20))
        .spawn()
        .await
        .unwrap();
    let fallback = Provider::builder().spawn().await.unwrap();
    let svc = two(&primary, &fallback);
    for _ in 0..2 {
        assert_eq!(ask(&svc, hello()).await.0, "primary");
    }
    assert_eq!(
        ask(&svc, hello()).await.0,
        "fallback",
        "the 429 sets the primary aside"
    );
    for _ in 0..5 {
        assert_eq!(
            ask(&svc, hello()).await.0,
            "fallback",
            "cooling: not even tried"
        );
    }
    assert_eq!(primary.stats().requests, 3);
    tokio::time::sleep(Duration::from_secs(11)).await;
    let (who, v) = ask(&svc, hello()).await;
    assert_eq!(who, "primary", "the trial passed");
    assert_eq!(v["model"], "gpt-4o");
    // Healthy again: as the primary's quota refills, traffic is its own.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(ask(&svc, hello()).await.0, "primary");
}

#[tokio::test(start_paused = true)]
async fn a_bad_request_is_not_failed_over() {
    let primary = Provider::builder().spawn().await.unwrap();
    let fallback = Provider::builder().spawn().await.unwrap();
    let svc = two(&primary, &fallback);
    let res = svc
        .clone()
        .oneshot(chat(json!({"model": "gpt-4o", "messages": []})))
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(res.headers()[X_TOLLGATE_BACKEND], "primary");
    assert_eq!(fallback.stats().requests, 0);
}

#[tokio::test(start_paused = true)]
async fn with_every_backend_cooling_it_refuses_with_the_time_or_waits() {
    let hour = Duration::from_secs(3600);
    let a = Provider::builder()
        .rpm(1)
        .window(Duration::from_secs(60))
        .spawn()
        .await
        .unwrap();
    let b = Provider::builder()
        .rpm(1)
        .window(hour)
        .spawn()
        .await
        .unwrap();
    let build = |all| {
        Failover::builder()
            .backend(Backend::new("a", backend(&a)))
            .backend(Backend::new("b", backend(&b)).priority(1))
            .all_cooling(all)
            .build()
    };
    let svc = build(AllCooling::Refuse);
    ask(&svc, hello()).await; // a's one request
    ask(&svc, hello()).await; // a: 429 (~60 s, cools), b's one request
    let res = svc.clone().oneshot(chat(hello())).await.unwrap();
    assert_eq!(
        res.status(),
        429,
        "b refused too; every backend failed: the last answer"
    );
    let err = svc.clone().oneshot(chat(hello())).await.unwrap_err();
    let refusal = err.downcast::<Refusal>().unwrap();
    let wait = refusal.retry_after().unwrap();
    assert!(
        wait > Duration::from_secs(55) && wait <= Duration::from_secs(60),
        "a is back first: {wait:?}"
    );

    // Waiting instead, on fresh providers: when every backend has failed or is cooling,
    // the request waits for the first one back and is served by it.
    let a = Provider::builder()
        .rpm(1)
        .window(Duration::from_secs(60))
        .spawn()
        .await
        .unwrap();
    let b = Provider::builder()
        .rpm(1)
        .window(hour)
        .spawn()
        .await
        .unwrap();
    let waiting = Failover::builder()
        .backend(Backend::new("a", backend(&a)))
        .backend(Backend::new("b", backend(&b)).priority(1))
        .cooldown(Cooldown::default())
        .all_cooling(AllCooling::Wait(Duration::from_secs(120)))
        .build();
    assert_eq!(ask(&waiting, hello()).await.0, "a");
    assert_eq!(
        ask(&waiting, hello()).await.0,
        "b",
        "a refused and cools for ~60 s"
    );
    let start = tokio::time::Instant::now();
    assert_eq!(
        ask(&waiting, hello()).await.0,
        "a",
        "b refused too: waited for a"
    );
    assert!(
        start.elapsed() >= Duration::from_secs(50),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_stream_fails_over_before_its_first_byte_and_not_after() {
    let resets = Provider::builder()
        .faults(Faults {
            reset_rate: 1.0,
            ..Faults::default()
        })
        .spawn()
        .await
        .unwrap();
    let fallback = Provider::builder().spawn().await.unwrap();
    let mut streamed = hello();
    streamed["stream"] = json!(true);
    let svc = two(&resets, &fallback);
    let res = svc.clone().oneshot(chat(streamed.clone())).await.unwrap();
    assert_eq!(
        res.headers()[X_TOLLGATE_BACKEND],
        "fallback",
        "the reset came before any byte"
    );
    res.into_body().collect().await.unwrap();

    let cuts = Provider::builder()
        .faults(Faults {
            cut_rate: 1.0,
            ..Faults::default()
        })
        .chunk_delay(Duration::from_millis(5))
        .spawn()
        .await
        .unwrap();
    let fallback2 = Provider::builder().spawn().await.unwrap();
    let svc = two(&cuts, &fallback2);
    let res = svc.oneshot(chat(streamed)).await.unwrap();
    assert_eq!(res.headers()[X_TOLLGATE_BACKEND], "primary");
    let text =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(
        text.contains("event: error"),
        "the broken stream ends with an error event: {text}"
    );
    assert!(text.contains("stream_interrupted"));
    assert_eq!(
        fallback2.stats().requests,
        0,
        "no failover after the first byte"
    );
}

#[tokio::test(start_paused = true)]
async fn three_backends_in_priority_order() {
    let down = Provider::builder()
        .faults(Faults {
            server_error_rate: 1.0,
            ..Faults::default()
        })
        .spawn()
        .await
        .unwrap();
    let limited = Provider::builder()
        .rpm(1)
        .window(Duration::from_secs(3600))
        .spawn()
        .await
        .unwrap();
    let last = Provider::builder().spawn().await.unwrap();
    let svc: Failover<Svc> = Failover::builder()
        .backend(Backend::new("third", backend(&last)).priority(3))
        .backend(Backend::new("first", backend(&down)).priority(1))
        .backend(Backend::new("second", backend(&limited)).priority(2))
        .build();
    assert_eq!(ask(&svc, hello()).await.0, "second");
    assert_eq!(ask(&svc, hello()).await.0, "third");
}
