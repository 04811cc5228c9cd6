//! The cache layer on a paused clock, against a counting fake provider.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tollgate_cache::{CacheLayer, X_TOLLGATE_CACHE};
use tollgate_core::facts::ReplayBody;
use tollgate_testkit::body::ScriptedBody;
use tower::{Layer, ServiceExt};

/// A provider counting its calls, answering each with `answer(call number)`.
fn counting<R, Fut>(
    answer: impl Fn(u32) -> Fut + Clone + Send + 'static,
) -> (
    impl tower::Service<
            Request<ReplayBody>,
            Response = Response<R>,
            Error = Infallible,
            Future = Fut,
        > + Clone
        + Send
        + 'static,
    Arc<AtomicU32>,
)
where
    Fut: std::future::Future<Output = Result<Response<R>, Infallible>> + Send,
{
    let calls = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&calls);
    let svc = tower::service_fn(move |_req: Request<ReplayBody>| {
        answer(seen.fetch_add(1, Ordering::SeqCst))
    });
    (svc, calls)
}

/// A provider answering `status` with a JSON body naming the call number, after `delay`.
fn provider(
    status: u16,
    delay: Duration,
) -> (
    impl tower::Service<
            Request<ReplayBody>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
    Arc<AtomicU32>,
) {
    counting(move |n| async move {
        tokio::time::sleep(delay).await;
        Ok::<_, Infallible>(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .header("x-ratelimit-remaining-requests", "41")
                .body(Full::new(Bytes::from(format!("{{\"answer\":{n}}}"))))
                .unwrap(),
        )
    })
}

fn chat(tenant: &str, body: &str) -> Request<Full<Bytes>> {
    Request::post("/v1/chat/completions")
        .header("x-tenant-id", tenant)
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

const Q: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"What is GCRA?"}]}"#;

async fn send<S>(svc: &S, req: Request<Full<Bytes>>) -> (String, Bytes)
where
    S: tower::Service<
            Request<Full<Bytes>>,
            Response = Response<tollgate_cache::CacheBody<Full<Bytes>>>,
            Error = tollgate_core::BoxError,
        > + Clone,
{
    let res = svc.clone().oneshot(req).await.unwrap();
    let label = res.headers()[X_TOLLGATE_CACHE].to_str().unwrap().to_owned();
    (label, res.into_body().collect().await.unwrap().to_bytes())
}

#[tokio::test(start_paused = true)]
async fn hits_and_misses_follow_the_key() {
    let (p, calls) = provider(200, Duration::ZERO);
    let svc = CacheLayer::new().layer(p);
    let (l1, b1) = send(&svc, chat("acme", Q)).await;
    let reordered =
        r#"{ "messages": [ { "content": "What is GCRA?", "role": "user" } ], "model": "gpt-4o" }"#;
    let (l2, b2) = send(&svc, chat("acme", reordered)).await;
    assert_eq!((l1.as_str(), l2.as_str()), ("miss", "hit"));
    assert_eq!(b1, b2, "the same answer, byte for byte");
    assert_eq!(
        send(&svc, chat("globex", Q)).await.0,
        "miss",
        "another tenant never gets acme's answer"
    );
    assert_eq!(
        send(&svc, chat("acme", &Q.replace("gpt-4o", "gpt-4o-mini")))
            .await
            .0,
        "miss"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn entries_expire_after_their_ttl() {
    let (p, calls) = provider(200, Duration::ZERO);
    let svc = CacheLayer::builder()
        .ttl(Duration::from_secs(60))
        .build()
        .layer(p);
    send(&svc, chat("a", Q)).await;
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(send(&svc, chat("a", Q)).await.0, "hit");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(send(&svc, chat("a", Q)).await.0, "miss");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // A request can ask for a shorter life for its answer.
    let mut short = chat("b", Q);
    short
        .headers_mut()
        .insert("x-tollgate-cache-ttl", "5s".parse().unwrap());
    send(&svc, short).await;
    tokio::time::advance(Duration::from_secs(6)).await;
    assert_eq!(send(&svc, chat("b", Q)).await.0, "miss");
}

#[tokio::test(start_paused = true)]
async fn a_hundred_identical_requests_make_one_upstream_call() {
    let (p, calls) = provider(200, Duration::from_millis(500));
    let svc = CacheLayer::new().layer(p);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move { send(&svc, chat("a", Q)).await })
        })
        .collect();
    let mut bodies = Vec::new();
    for t in tasks {
        bodies.push(t.await.unwrap().1);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(bodies.iter().all(|b| b == &bodies[0]));
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_leader_is_replaced_and_nobody_hangs() {
    let (p, calls) = provider(200, Duration::from_millis(500));
    let svc = CacheLayer::new().layer(p);
    // The leader's caller gives up after 100 ms.
    let leader = {
        let svc = svc.clone();
        tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(100), send(&svc, chat("a", Q))).await
        })
    };
    tokio::task::yield_now().await;
    let followers: Vec<_> = (0..99)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move { send(&svc, chat("a", Q)).await })
        })
        .collect();
    assert!(leader.await.unwrap().is_err(), "the leader timed out");
    for f in followers {
        f.await.unwrap();
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one more call, by the waiter that took over"
    );
}

const EVENTS: [&str; 4] = [
    "data: {\"choices\":[{\"delta\":{\"content\":\"G\"}}]}\n\n",
    "data: {\"choices\":[{\"delta\":{\"content\":\"CRA\"}}]}\n\n",
    "data: {\"choices\":[],\"usage\":{\"total_tokens\":9}}\n\n",
    "data: [DONE]\n\n",
];

/// A provider streaming [`EVENTS`], cut after `fail_at` of them when given.
fn sse_provider(
    fail_at: Option<usize>,
) -> (
    impl tower::Service<
            Request<ReplayBody>,
            Response = Response<ScriptedBody>,
            Error = Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
    Arc<AtomicU32>,
) {
    counting(move |_| {
        let events = EVENTS
            .iter()
            .map(|e| Bytes::from_static(e.as_bytes()))
            .collect();
        std::future::ready(Ok::<_, Infallible>(
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(ScriptedBody::new(events, Duration::ZERO, fail_at))
                .unwrap(),
        ))
    })
}

#[tokio::test(start_paused = true)]
async fn streams_are_recorded_as_they_pass_and_replayed_event_by_event() {
    let (p, calls) = sse_provider(None);
    let svc = CacheLayer::new().layer(p);
    let streamed = Q.replace("}]}", "}],\"stream\":true}");
    let first = svc.clone().oneshot(chat("a", &streamed)).await.unwrap();
    assert_eq!(first.headers()[X_TOLLGATE_CACHE], "miss");
    let live = first.into_body().collect().await.unwrap().to_bytes();
    let again = svc.clone().oneshot(chat("a", &streamed)).await.unwrap();
    assert_eq!(again.headers()[X_TOLLGATE_CACHE], "hit");
    assert_eq!(again.headers()["content-type"], "text/event-stream");
    let mut body = again.into_body();
    let mut frames = Vec::new();
    while let Some(f) = body.frame().await {
        frames.push(f.unwrap().into_data().unwrap());
    }
    assert_eq!(frames.len(), EVENTS.len(), "replayed event by event");
    assert_eq!(frames.concat(), live.to_vec(), "byte for byte");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // The same question, not streamed, is another entry.
    let plain = svc.clone().oneshot(chat("a", Q)).await.unwrap();
    assert_eq!(plain.headers()[X_TOLLGATE_CACHE], "miss");
}

#[tokio::test(start_paused = true)]
async fn partial_streams_and_errors_are_never_stored() {
    let (p, calls) = sse_provider(Some(2));
    let svc = CacheLayer::new().layer(p);
    let streamed = Q.replace("}]}", "}],\"stream\":true}");
    for _ in 0..2 {
        let res = svc.clone().oneshot(chat("a", &streamed)).await.unwrap();
        assert_eq!(res.headers()[X_TOLLGATE_CACHE], "miss");
        assert!(res.into_body().collect().await.is_err());
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the cut stream was not kept"
    );

    for status in [500u16, 429, 400] {
        let (p, calls) = provider(status, Duration::ZERO);
        let svc = CacheLayer::new().layer(p);
        for _ in 0..2 {
            let (label, _) = send(&svc, chat("a", Q)).await;
            assert_eq!(label, "miss");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2, "{status} was not kept");
    }
}

#[tokio::test(start_paused = true)]
async fn no_cache_bypasses_and_deterministic_only_skips_sampled_requests() {
    let (p, calls) = provider(200, Duration::ZERO);
    let svc = CacheLayer::new().layer(p);
    send(&svc, chat("a", Q)).await;
    let mut fresh = chat("a", Q);
    fresh
        .headers_mut()
        .insert("cache-control", "no-cache".parse().unwrap());
    assert_eq!(send(&svc, fresh).await.0, "bypass");
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    let (p, calls) = provider(200, Duration::ZERO);
    let svc = CacheLayer::builder()
        .deterministic_only(true)
        .build()
        .layer(p);
    let sampled = r#"{"model":"m","temperature":0.7,"messages":[]}"#;
    let greedy = r#"{"model":"m","temperature":0,"messages":[]}"#;
    assert_eq!(send(&svc, chat("a", sampled)).await.0, "bypass");
    assert_eq!(send(&svc, chat("a", greedy)).await.0, "miss");
    assert_eq!(send(&svc, chat("a", greedy)).await.0, "hit");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn per_request_headers_are_not_replayed() {
    let (p, _) = provider(200, Duration::ZERO);
    let svc = CacheLayer::new().layer(p);
    send(&svc, chat("a", Q)).await;
    let hit = svc.clone().oneshot(chat("a", Q)).await.unwrap();
    assert_eq!(hit.status(), StatusCode::OK);
    assert!(hit
        .headers()
        .get("x-ratelimit-remaining-requests")
        .is_none());
    assert_eq!(hit.headers()["content-type"], "application/json");
}

#[tokio::test(start_paused = true)]
async fn requests_over_the_cap_pass_uncached() {
    let (p, calls) = provider(200, Duration::ZERO);
    let svc = CacheLayer::builder().max_request_bytes(64).build().layer(p);
    let long = Q.replace("What is GCRA?", &"x".repeat(200));
    assert_eq!(send(&svc, chat("a", &long)).await.0, "bypass");
    assert_eq!(send(&svc, chat("a", &long)).await.0, "bypass");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn ttls_per_model_and_per_route() {
    let (p, calls) = provider(200, Duration::ZERO);
    let svc = CacheLayer::builder()
        .ttl(Duration::from_secs(600))
        .ttl_for_path("/v1/chat", Duration::from_secs(30))
        .ttl_for_model("gpt-4o-mini", Duration::from_secs(5))
        .build()
        .layer(p);
    let mini = Q.replace("gpt-4o", "gpt-4o-mini");
    send(&svc, chat("a", Q)).await; // the route's 30 s
    send(&svc, chat("a", &mini)).await; // the model's 5 s, over the route's
    tokio::time::advance(Duration::from_secs(6)).await;
    assert_eq!(send(&svc, chat("a", &mini)).await.0, "miss");
    assert_eq!(send(&svc, chat("a", Q)).await.0, "hit");
    tokio::time::advance(Duration::from_secs(25)).await;
    assert_eq!(send(&svc, chat("a", Q)).await.0, "miss");
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

/// A store that keeps what it is given, to look at.
#[derive(Clone, Default)]
struct Kept(Arc<std::sync::Mutex<Vec<Arc<tollgate_cache::store::Stored>>>>);

impl tollgate_cache::store::CacheStore for Kept {
    fn get(
        &self,
        _: &tollgate_cache::key::CacheKey,
    ) -> tollgate_cache::store::StoreFuture<Option<Arc<tollgate_cache::store::Stored>>> {
        Box::pin(std::future::ready(None))
    }
    fn put(
        &self,
        _: tollgate_cache::key::CacheKey,
        value: Arc<tollgate_cache::store::Stored>,
        _: Duration,
    ) -> tollgate_cache::store::StoreFuture<()> {
        self.0.lock().unwrap().push(value);
        Box::pin(std::future::ready(()))
    }
}

#[tokio::test]
async fn an_entry_holds_its_own_bytes_not_the_buffer_they_arrived_in() {
    // The answer arrives as a small slice of a large buffer, as hyper's reads do.
    let buffer = Bytes::from(vec![b' '; 1 << 20]);
    let answer = {
        let mut v = buffer.to_vec();
        v[..2].copy_from_slice(b"{}");
        Bytes::from(v)
    };
    let range = answer.as_ptr() as usize..answer.as_ptr() as usize + answer.len();
    let frame = answer.slice(0..2);
    // Its header values too: hyper parses them as slices of the same read buffer.
    let content_type = http::HeaderValue::from_maybe_shared(answer.slice(2..18)).unwrap();
    let kept = Kept::default();
    let layer = CacheLayer::builder().store(kept.clone()).build();
    let svc = layer.layer(tower::service_fn(move |_: Request<ReplayBody>| {
        let (frame, content_type) = (frame.clone(), content_type.clone());
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", content_type)
                    .body(Full::new(frame))
                    .unwrap(),
            )
        }
    }));
    let req = Request::post("/v1/chat/completions")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"m","messages":[]}"#,
        )))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    res.into_body().collect().await.unwrap();
    let stored = kept.0.lock().unwrap()[0].clone();
    assert_eq!(&stored.frames[0][..], b"{}");
    let at = stored.frames[0].as_ptr() as usize;
    assert!(
        !range.contains(&at),
        "the entry must not point into the 1 MiB buffer"
    );
    let value = &stored.headers["content-type"];
    assert_eq!(value.len(), 16);
    assert!(
        !range.contains(&(value.as_bytes().as_ptr() as usize)),
        "a header value must not point into the 1 MiB buffer either"
    );
}
