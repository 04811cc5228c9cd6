//! A backend whose provider says "later" (429 with a hint) is a time to wait for when there
//! is nowhere else to go, on tokio's paused clock.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tokio::time::Instant;
use tollgate_core::facts::ReplayBody;
use tollgate_core::refusal::Refusal;
use tollgate_failover::{Backend, Failover};
use tower::util::BoxCloneSyncService;
use tower::ServiceExt;

type Svc = BoxCloneSyncService<Request<ReplayBody>, Response<Full<Bytes>>, Infallible>;

/// Answers 429 with `retry-after-ms: 500` to the first `limited` requests, then 200.
fn provider(limited: u32) -> (Arc<AtomicU32>, Svc) {
    let calls = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&calls);
    let svc = BoxCloneSyncService::new(tower::service_fn(move |_: Request<ReplayBody>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            let res = if n < limited {
                Response::builder()
                    .status(429)
                    .header("retry-after-ms", "500")
                    .body(Full::new(Bytes::new()))
            } else {
                Response::builder().body(Full::new(Bytes::from("ok")))
            };
            Ok::<_, Infallible>(res.unwrap())
        }
    }));
    (calls, svc)
}

fn req() -> Request<Full<Bytes>> {
    Request::post("/v1/chat/completions")
        .body(Full::new(Bytes::from(r#"{"model":"m","messages":[]}"#)))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn with_one_backend_a_provider_429_is_waited_out_not_reported() {
    let (calls, only) = provider(4);
    let svc = Failover::builder()
        .backend(Backend::new("only", only))
        .build();
    let start = Instant::now();
    let res = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(
        res.status(),
        200,
        "waited for the provider's quota, then served"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(2000) && took < Duration::from_millis(2100),
        "four hints of 500 ms, each waited once: {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn past_the_bound_the_caller_gets_a_429_with_the_true_time() {
    let (_, only) = provider(u32::MAX);
    let svc = Failover::builder()
        .backend(Backend::new("only", only))
        .wait_for_quota(Duration::from_secs(2))
        .build();
    let start = Instant::now();
    let res = svc.clone().oneshot(req()).await.unwrap();
    // The backend's own 429 (after waiting as long as allowed), passed on as it came.
    assert_eq!(res.status(), 429);
    assert!(start.elapsed() <= Duration::from_millis(2000));
    // Three 429s set it aside for the hint: the next caller is told when it is back.
    match svc.clone().oneshot(req()).await {
        Ok(res) => assert_eq!(res.status(), 429),
        Err(e) => {
            let r = e
                .downcast::<Refusal>()
                .expect("a refusal: the provider's quota is a limit");
            assert!(
                r.retry_after().unwrap() <= Duration::from_millis(500),
                "{r:?}"
            );
        }
    }

    // Not waiting at all: the 429 comes back at once.
    let (_, only) = provider(u32::MAX);
    let svc = Failover::builder()
        .backend(Backend::new("only", only))
        .wait_for_quota(Duration::ZERO)
        .build();
    let start = Instant::now();
    assert_eq!(svc.oneshot(req()).await.unwrap().status(), 429);
    assert_eq!(start.elapsed(), Duration::ZERO);
}
