//! Limits kept in a shared store: the store's decisions drive the layer, and its failures
//! follow the stated policy (closed, or open with this instance's share), with recovery.
//! A store in memory stands in for Redis here; tollgate-redis tests the real one.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{ok_service, refusal, req, send};
use tollgate_core::key::Header;
use tollgate_core::refusal::Reason;
use tollgate_core::store::{
    OnStoreFailure, RateCell, RateDecision, RateStore, StoreError, StoreFuture,
};
use tollgate_ratelimit::{Limit, Quota, RateLimitLayer};
use tower::Layer;

/// A store that answers what it is told to, and counts its calls.
#[derive(Clone, Default)]
struct Scripted {
    fail: Arc<AtomicBool>,
    deny_for: Arc<Mutex<Option<Duration>>>,
    calls: Arc<AtomicU32>,
    seen: Arc<Mutex<Vec<RateCell>>>,
}

impl RateStore for Scripted {
    fn acquire(&self, cells: Arc<[RateCell]>) -> StoreFuture<Result<RateDecision, StoreError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.seen.lock().unwrap().extend(cells.iter().cloned());
        let answer = if self.fail.load(Ordering::SeqCst) {
            Err(StoreError::new("connection refused"))
        } else {
            Ok(match self.deny_for.lock().unwrap().take() {
                Some(wait) => RateDecision::Denied {
                    binding: 0,
                    retry_after: wait,
                },
                None => RateDecision::Admitted,
            })
        };
        Box::pin(std::future::ready(answer))
    }
}

fn limit() -> Limit {
    Limit::new("tenant", Quota::per_minute(40)).keyed_by(Header::new("x-tenant-id"))
}

/// A scripted store, and the tenant limit kept in it (failing closed) over an
/// always-ok service; `wait` puts it in wait mode.
fn stored(wait: Option<Duration>) -> (Scripted, tollgate_ratelimit::RateLimit<common::Ok200>) {
    let store = Scripted::default();
    let mut builder = RateLimitLayer::builder().limit(limit());
    if let Some(max_wait) = wait {
        builder = builder.wait(max_wait);
    }
    let layer = builder.store(store.clone(), OnStoreFailure::Closed).build();
    (store, layer.layer(ok_service()))
}

#[tokio::test(start_paused = true)]
async fn the_store_decides_and_names_the_limit_and_key() {
    let (store, mut svc) = stored(None);
    assert!(send(&mut svc, req("acme")).await.is_ok());
    let cell = store.seen.lock().unwrap()[0].clone();
    // The limit's name, then the request's key: two limits never share a bucket.
    assert!(
        cell.key.as_str().starts_with("tenant:") && cell.key.as_str().ends_with("acme"),
        "{:?}",
        cell.key
    );
    assert_eq!(
        (cell.interval, cell.burst),
        (Duration::from_millis(1500), 40)
    );

    *store.deny_for.lock().unwrap() = Some(Duration::from_millis(1200));
    let r = refusal(send(&mut svc, req("acme")).await.unwrap_err());
    assert_eq!(r.retry_after(), Some(Duration::from_millis(1200)));
    assert_eq!(r.reason(), Reason::OverLimit);
}

#[tokio::test(start_paused = true)]
async fn wait_mode_waits_the_stores_time_then_asks_again() {
    let (store, mut svc) = stored(Some(Duration::from_secs(5)));
    *store.deny_for.lock().unwrap() = Some(Duration::from_millis(700));
    let start = tokio::time::Instant::now();
    assert!(send(&mut svc, req("acme")).await.is_ok());
    assert_eq!(start.elapsed(), Duration::from_millis(700));
    assert_eq!(store.calls.load(Ordering::SeqCst), 2);

    // Beyond max_wait: refused at once, so failover can move on.
    *store.deny_for.lock().unwrap() = Some(Duration::from_secs(6));
    let r = refusal(send(&mut svc, req("acme")).await.unwrap_err());
    assert_eq!(r.reason(), Reason::WaitTooLong);
}

#[tokio::test(start_paused = true)]
async fn failing_closed_refuses_and_recovers_within_a_second() {
    let (store, mut svc) = stored(None);
    store.fail.store(true, Ordering::SeqCst);
    let err = send(&mut svc, req("acme")).await.unwrap_err();
    assert!(err.downcast_ref::<StoreError>().is_some(), "{err}");
    // Marked down: the next requests are refused without waiting on the store.
    for _ in 0..5 {
        assert!(send(&mut svc, req("acme")).await.is_err());
    }
    assert_eq!(store.calls.load(Ordering::SeqCst), 1);

    store.fail.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        send(&mut svc, req("acme")).await.is_ok(),
        "back within a second"
    );
    assert!(send(&mut svc, req("acme")).await.is_ok());
    assert_eq!(store.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn failing_open_holds_to_this_instances_share() {
    let store = Scripted::default();
    // 40 a minute shared by four instances: without the store, this one passes 10 at
    // once and one every 6 s, never the whole quota.
    let layer = RateLimitLayer::builder()
        .limit(limit())
        .store(store.clone(), OnStoreFailure::Open { instances: 4 })
        .build();
    let mut svc = layer.layer(ok_service());
    store.fail.store(true, Ordering::SeqCst);
    let mut passed = 0;
    for _ in 0..20 {
        passed += usize::from(send(&mut svc, req("acme")).await.is_ok());
    }
    assert_eq!(passed, 10);
    let r = refusal(send(&mut svc, req("acme")).await.unwrap_err());
    assert_eq!(r.retry_after(), Some(Duration::from_secs(6)));

    // The store is back: its decisions apply again, within a second.
    store.fail.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..20 {
        assert!(send(&mut svc, req("acme")).await.is_ok());
    }
    // The store is asked for the whole quota, not this instance's share.
    let last = store.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        (last.interval, last.burst),
        (Duration::from_millis(1500), 40)
    );
}

#[tokio::test(start_paused = true)]
async fn absurd_waits_and_bounds_never_panic() {
    // A store answering a wait of centuries, under a max_wait of Duration::MAX.
    let store = Scripted::default();
    let layer = RateLimitLayer::builder()
        .limit(limit())
        .wait(Duration::MAX)
        .store(store.clone(), OnStoreFailure::Closed)
        .build();
    let mut svc = layer.layer(ok_service());
    *store.deny_for.lock().unwrap() = Some(Duration::from_secs(u64::MAX / 4));
    let err = tokio::time::timeout(Duration::from_secs(1), send(&mut svc, req("acme"))).await;
    // Refused at once as too long, or still waiting: either way, no panic.
    if let Ok(res) = err {
        assert_eq!(refusal(res.unwrap_err()).reason(), Reason::WaitTooLong);
    }
}
