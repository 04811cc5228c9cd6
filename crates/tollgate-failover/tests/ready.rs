//! A backend that is not ready is passed over, and the layer form wraps a primary.

use std::convert::Infallible;
use std::future::Ready;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tollgate_core::facts::ReplayBody;
use tollgate_failover::{Backend, Failover, FailoverLayer, ServedBy, X_TOLLGATE_BACKEND};
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};

/// A backend that is never ready (its connection pool is exhausted, say), counting calls.
#[derive(Clone)]
struct NeverReady(Arc<AtomicU32>);

impl Service<Request<ReplayBody>> for NeverReady {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Full<Bytes>>, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Pending
    }
    fn call(&mut self, _: Request<ReplayBody>) -> Self::Future {
        self.0.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(Response::new(Full::new(Bytes::new()))))
    }
}

type Svc = BoxCloneSyncService<Request<ReplayBody>, Response<Full<Bytes>>, Infallible>;

fn ok(tag: &'static str) -> Svc {
    BoxCloneSyncService::new(tower::service_fn(
        move |_: Request<ReplayBody>| async move {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(tag))))
        },
    ))
}

fn req() -> Request<Full<Bytes>> {
    Request::post("/v1/chat/completions")
        .body(Full::new(Bytes::from(r#"{"model":"m","messages":[]}"#)))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_is_not_ready_is_passed_over_not_waited_for() {
    let calls = Arc::new(AtomicU32::new(0));
    let svc = Failover::builder()
        .backend(Backend::new(
            "stuck",
            BoxCloneSyncService::new(NeverReady(Arc::clone(&calls))),
        ))
        .backend(Backend::new("ready", ok("ready")).priority(1))
        .build();
    let res = svc.oneshot(req()).await.unwrap();
    assert_eq!(res.headers()[X_TOLLGATE_BACKEND], "ready");
    assert_eq!(
        res.extensions().get::<ServedBy>().map(|s| &*s.0),
        Some("ready")
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn the_layer_makes_the_wrapped_service_the_primary() {
    let svc = FailoverLayer::new(vec![Backend::new("backup", ok("backup")).priority(1)])
        .layer(ok("main"));
    let res = svc.oneshot(req()).await.unwrap();
    assert_eq!(res.headers()[X_TOLLGATE_BACKEND], "primary");
}

/// A backend whose limiter refuses its first `n` requests, saying when it will admit.
fn full_for(
    n: u32,
    wait: std::time::Duration,
    tag: &'static str,
) -> BoxCloneSyncService<Request<ReplayBody>, Response<Full<Bytes>>, tollgate_core::BoxError> {
    let calls = Arc::new(AtomicU32::new(0));
    BoxCloneSyncService::new(tower::service_fn(move |_: Request<ReplayBody>| {
        let call = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            if call < n {
                let r = tollgate_core::refusal::Refusal::new(
                    tollgate_core::refusal::LimitKind::Requests,
                    "rpm",
                    Some(wait),
                )
                .with_reason(tollgate_core::refusal::Reason::WaitTooLong);
                return Err(r.into());
            }
            Ok(Response::new(Full::new(Bytes::from(tag))))
        }
    }))
}

#[tokio::test(start_paused = true)]
async fn with_every_backend_full_it_waits_for_the_first_to_admit() {
    // Neither backend can take the request now: their limiters say in 2 s and 8 s. With
    // a wait allowed when no backend can answer, the request waits the 2 s for the first
    // rather than failing.
    let svc = Failover::builder()
        .backend(Backend::new(
            "primary",
            full_for(1, std::time::Duration::from_secs(2), "primary"),
        ))
        .backend(
            Backend::new(
                "fallback",
                full_for(1, std::time::Duration::from_secs(8), "fallback"),
            )
            .priority(1),
        )
        .all_cooling(tollgate_failover::AllCooling::Wait(
            std::time::Duration::from_secs(5),
        ))
        .build();
    let start = tokio::time::Instant::now();
    let res = svc
        .oneshot(req())
        .await
        .expect("served once the primary admits");
    assert_eq!(res.headers()[X_TOLLGATE_BACKEND], "primary");
    assert_eq!(start.elapsed(), std::time::Duration::from_secs(2));
}
