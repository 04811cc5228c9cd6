//! Two instances' cost layers on one Redis: one budget, spent together. Needs
//! `REDIS_URL`; skips with a message without it, unless `TOLLGATE_REQUIRE_REDIS=1`.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tollgate_core::facts::ReplayBody;
use tollgate_core::key::Header;
use tollgate_core::refusal::{LimitKind, Refusal};
use tollgate_core::store::OnStoreFailure;
use tollgate_cost::{CostBudget, CostLayer, Money, Price, Prices, Window};
use tollgate_redis::RedisStore;
use tower::{Layer, ServiceExt};

type Answer = Result<Response<Full<Bytes>>, Infallible>;

/// 1,000 tokens in, 100 out, whatever is asked: $0.0035 at $2.50 / $10 per million.
fn answer(_: Request<ReplayBody>) -> std::future::Ready<Answer> {
    std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(
        br#"{"usage":{"prompt_tokens":1000,"completion_tokens":100,"total_tokens":1100}}"#,
    )))))
}

fn provider() -> tower::util::ServiceFn<fn(Request<ReplayBody>) -> std::future::Ready<Answer>> {
    tower::service_fn(answer as fn(_) -> _)
}

fn layer(store: RedisStore) -> CostLayer {
    layer_failing(store, OnStoreFailure::Closed)
}

fn layer_failing(store: RedisStore, on_failure: OnStoreFailure) -> CostLayer {
    CostLayer::builder()
        .prices(Prices::new().model("gpt-4o", Price::per_million(2.5, 10.0)))
        .budget(
            CostBudget::new("daily", Money::dollars(0.035), Window::Day)
                .keyed_by(Header::new("x-tenant-id")),
        )
        // Every request is estimated at what it will cost, so the budget holds ten.
        .estimate(|_| (1000, 100))
        .store(store, on_failure)
        .build()
}

fn chat(tenant: &str) -> Request<Full<Bytes>> {
    Request::post("/v1/chat/completions")
        .header("x-tenant-id", tenant)
        .body(Full::new(Bytes::from_static(
            br#"{"model":"gpt-4o","messages":[]}"#,
        )))
        .unwrap()
}

/// Opens stores on `url` in a namespace of their own: each store is one instance.
fn stores(url: &str) -> impl Fn() -> RedisStore + '_ {
    let ns = format!("test:cost:{}:{:x}", std::process::id(), fastrand::u64(..));
    move || {
        RedisStore::open(url)
            .unwrap()
            .namespace(&ns)
            .timeout(Duration::from_secs(2))
    }
}

#[tokio::test]
async fn two_instances_spend_one_budget_in_redis() {
    let Some(url) = tollgate_testkit::redis::redis_url("cost budgets shared") else {
        return;
    };
    let open = stores(&url);
    let (a, b) = (
        layer(open()).layer(provider()),
        layer(open()).layer(provider()),
    );
    let (mut passed, mut refused) = (0, 0);
    for i in 0..30 {
        let svc = if i % 2 == 0 { a.clone() } else { b.clone() };
        match svc.oneshot(chat("acme")).await {
            Ok(res) => {
                res.into_body().collect().await.unwrap();
                // Its settlement goes to Redis off the answer's path; the estimate is
                // its cost, so held or spent, it counts the same meanwhile.
                passed += 1;
            }
            Err(e) => {
                let r = e.downcast::<Refusal>().expect("a refusal");
                assert_eq!(r.kind(), LimitKind::Budget);
                assert!(r.retry_after().is_some());
                refused += 1;
            }
        }
    }
    assert_eq!(
        (passed, refused),
        (10, 20),
        "ten of $0.0035 in $0.035, across both"
    );
    // Another tenant's budget is its own.
    assert!(a.oneshot(chat("other")).await.is_ok());
}

/// Failing open, each instance keeps only its share in process for when Redis is away;
/// Redis still holds the two to the whole budget. And either instance reads what both
/// spent (what a dashboard or an alert shows), not only its own.
#[tokio::test]
async fn the_whole_budget_is_kept_in_redis_and_read_back_summed_over_instances() {
    let Some(url) = tollgate_testkit::redis::redis_url("cost budgets standing") else {
        return;
    };
    let open = stores(&url);
    let open_for_4 = OnStoreFailure::Open { instances: 4 };
    let (la, lb) = (
        layer_failing(open(), open_for_4),
        layer_failing(open(), open_for_4),
    );
    let (a, b) = (la.clone().layer(provider()), lb.clone().layer(provider()));
    let mut passed = 0;
    for i in 0..30 {
        let svc = if i % 2 == 0 { a.clone() } else { b.clone() };
        if let Ok(res) = svc.oneshot(chat("acme")).await {
            res.into_body().collect().await.unwrap();
            passed += 1;
        }
    }
    assert_eq!(passed, 10, "the whole $0.035, not a quarter of it");
    let acme = tollgate_core::key::Key::prefixed("tenant", "acme");
    let started = std::time::Instant::now();
    let st = loop {
        let st = lb.standing_shared("daily", &acme).await.unwrap();
        if st.held == Money::ZERO || started.elapsed() > Duration::from_secs(3) {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(st.held, Money::ZERO, "every settlement arrived");
    assert_eq!(st.spent, Money::dollars(0.035), "both instances' spend");
    assert_eq!(st.amount, Money::dollars(0.035), "the whole budget");
    assert_eq!(
        la.standing_shared("daily", &acme).await.unwrap().spent,
        st.spent,
        "the same from the other instance"
    );
    // In process, neither instance spent anything: Redis answered every request.
    assert_eq!(la.standing("daily", &acme).unwrap().spent, Money::ZERO);
}

#[tokio::test]
async fn an_unreachable_store_fails_closed_with_a_store_error() {
    let dead = RedisStore::open("redis://127.0.0.1:1")
        .unwrap()
        .timeout(Duration::from_millis(300));
    let svc = layer(dead).layer(provider());
    let e = svc.oneshot(chat("acme")).await.unwrap_err();
    assert!(
        e.is::<tollgate_core::store::StoreError>(),
        "{e}: a 503 from a server, not a 429"
    );
}
