//! Wait mode on tokio's paused clock: pace, priorities, max_wait, a bounded queue, and
//! cancelled waiters that leave nothing behind.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{ok_service, refusal, req, send};
use tokio::time::Instant;
use tollgate_core::key::Header;
use tollgate_core::refusal::Reason;
use tollgate_ratelimit::{HeaderPriority, Limit, Quota, RateLimitLayer};
use tower::{Layer, Service, ServiceExt};

fn layer(q: Quota, max_wait: Duration) -> RateLimitLayer {
    RateLimitLayer::builder()
        .limit(Limit::new("tenant", q).keyed_by(Header::new("x-tenant-id")))
        .wait(max_wait)
        .priority(HeaderPriority::new(http::HeaderName::from_static(
            "x-priority",
        )))
        .build()
}

#[tokio::test(start_paused = true)]
async fn waiters_are_admitted_at_the_quotas_pace() {
    let layer = layer(Quota::per_second(10).burst(1), Duration::from_secs(10));
    let svc = layer.layer(ok_service());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = req("a");
            let waits = Arc::new(tollgate_core::wait::WaitReport::default());
            r.extensions_mut().insert(Arc::clone(&waits));
            svc.ready().await.unwrap().call(r).await.unwrap();
            let t = Instant::now() - start;
            // Each request's own wait is reported to whoever asked (a gateway's overhead).
            assert_eq!(waits.total(), t);
            t
        }));
    }
    let mut times = Vec::new();
    for t in tasks {
        times.push(t.await.unwrap());
    }
    times.sort();
    for (i, t) in times.iter().enumerate() {
        // One cell every 100 ms: the i-th request passes at i × 100 ms (timer granularity
        // is 1 ms).
        let want = Duration::from_millis(100 * i as u64);
        assert!(
            *t >= want && *t <= want + Duration::from_millis(2),
            "request {i} at {t:?}"
        );
    }
    assert_eq!(layer.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn higher_priority_goes_first_then_arrival_order() {
    let layer = layer(Quota::per_second(1).burst(1), Duration::from_secs(60));
    let svc = layer.layer(ok_service());
    send(&mut svc.clone(), req("a")).await.unwrap(); // takes the only cell
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (name, prio) in [
        ("low1", "1"),
        ("low2", "1"),
        ("none", ""),
        ("high", "9"),
        ("low3", "1"),
    ] {
        let (mut svc, order) = (svc.clone(), Arc::clone(&order));
        let mut r = req("a");
        if !prio.is_empty() {
            r.headers_mut().insert("x-priority", prio.parse().unwrap());
        }
        tasks.push(tokio::spawn(async move {
            svc.ready().await.unwrap().call(r).await.unwrap();
            order.lock().unwrap().push(name);
        }));
        // Arrive in this order.
        tokio::task::yield_now().await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        *order.lock().unwrap(),
        ["high", "low1", "low2", "low3", "none"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_wait_longer_than_max_wait_is_refused_at_once() {
    let layer = layer(Quota::per_minute(1), Duration::from_secs(5));
    let mut svc = layer.layer(ok_service());
    send(&mut svc, req("a")).await.unwrap();
    let before = Instant::now();
    let r = refusal(send(&mut svc, req("a")).await.unwrap_err());
    assert_eq!(before, Instant::now(), "refused without waiting");
    assert_eq!(r.reason(), Reason::WaitTooLong);
    assert_eq!(r.retry_after(), Some(Duration::from_secs(60)));
}

#[tokio::test(start_paused = true)]
async fn the_wait_behind_others_counts_against_max_wait() {
    // One cell every 4 s; waiting up to 5 s: one waiter fits, the next would wait 8 s.
    let layer = layer(
        Quota::per(1, Duration::from_secs(4)),
        Duration::from_secs(5),
    );
    let svc = layer.layer(ok_service());
    send(&mut svc.clone(), req("a")).await.unwrap();
    let mut first = svc.clone();
    let waiter = tokio::spawn(async move { first.ready().await.unwrap().call(req("a")).await });
    tokio::task::yield_now().await;
    assert_eq!(layer.waiting(), 1);
    let r = refusal(send(&mut svc.clone(), req("a")).await.unwrap_err());
    assert_eq!(r.reason(), Reason::WaitTooLong);
    assert!(waiter.await.unwrap().is_ok());
    // Other keys do not queue behind tenant a.
    let before = Instant::now();
    send(&mut svc.clone(), req("b")).await.unwrap();
    assert_eq!(before, Instant::now());
}

#[tokio::test(start_paused = true)]
async fn the_queue_is_bounded() {
    let layer = RateLimitLayer::builder()
        .limit(
            Limit::new("tenant", Quota::per_second(1).burst(1))
                .keyed_by(Header::new("x-tenant-id")),
        )
        .wait(Duration::from_secs(60))
        .max_queue(2)
        .build();
    let svc = layer.layer(ok_service());
    send(&mut svc.clone(), req("a")).await.unwrap();
    let mut waiters = Vec::new();
    for _ in 0..2 {
        let mut s = svc.clone();
        waiters.push(tokio::spawn(async move {
            s.ready().await.unwrap().call(req("a")).await
        }));
        tokio::task::yield_now().await;
    }
    assert_eq!(layer.waiting(), 2);
    let r = refusal(send(&mut svc.clone(), req("a")).await.unwrap_err());
    assert_eq!(r.reason(), Reason::QueueFull);
    for w in waiters {
        assert!(w.await.unwrap().is_ok());
    }
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_waiter_leaves_the_queue_and_loses_no_cell() {
    let layer = layer(Quota::per_second(1).burst(1), Duration::from_secs(60));
    let svc = layer.layer(ok_service());
    send(&mut svc.clone(), req("a")).await.unwrap();
    let start = Instant::now();

    // A waiter that gives up after 300 ms (its caller timed out).
    let mut s = svc.clone();
    let gave_up = tokio::time::timeout(Duration::from_millis(300), async move {
        s.ready().await.unwrap().call(req("a")).await
    })
    .await;
    assert!(gave_up.is_err());
    assert_eq!(layer.waiting(), 0, "the cancelled waiter left the queue");

    // The cell it was waiting for is still there at 1 s, for the next caller.
    let mut s = svc.clone();
    s.ready().await.unwrap().call(req("a")).await.unwrap();
    assert_eq!(Instant::now() - start, Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_granted_waiter_dropped_before_it_runs_gives_its_cell_back() {
    let layer = layer(Quota::per_second(1).burst(1), Duration::from_secs(60));
    let svc = layer.layer(ok_service());
    send(&mut svc.clone(), req("a")).await.unwrap();
    // A queues first (polled once, then never again: its caller is stuck elsewhere).
    let mut a = svc.clone();
    let mut fut_a = Box::pin(async move { a.ready().await.unwrap().call(req("a")).await });
    assert!(futures_poll_once(&mut fut_a).is_pending());
    // B queues behind A.
    let mut b = svc.clone();
    let waiter_b = tokio::spawn(async move { b.ready().await.unwrap().call(req("a")).await });
    tokio::task::yield_now().await;
    tokio::time::advance(Duration::from_secs(1)).await;
    // C arrives when the cell is free: the dispatch it runs grants the cell to A, first
    // in line, though A is not polled to take it.
    let mut c = svc.clone();
    let waiter_c = tokio::spawn(async move { c.ready().await.unwrap().call(req("a")).await });
    tokio::task::yield_now().await;
    assert_eq!(layer.waiting(), 3);
    // A's caller goes away: its granted cell goes back, and B (next in line) gets it now.
    let start = Instant::now();
    drop(fut_a);
    assert!(waiter_b.await.unwrap().is_ok());
    assert_eq!(
        Instant::now() - start,
        Duration::ZERO,
        "A's cell was given back to B"
    );
    assert!(waiter_c.await.unwrap().is_ok());
    assert_eq!(
        Instant::now() - start,
        Duration::from_secs(1),
        "C one interval later"
    );
    assert_eq!(layer.waiting(), 0);
}

fn futures_poll_once<F: std::future::Future + Unpin>(f: &mut F) -> std::task::Poll<F::Output> {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    std::pin::Pin::new(f).poll(&mut cx)
}

/// 20 background requests (priority 0) and then 4 live ones (priority 1) at once, on a
/// bucket of 10 refilled at 10 a second that keeps `reserve` cells for live traffic: the
/// live requests' waits, and when the last background request passed.
async fn background_then_live(reserve: u32) -> (Vec<Duration>, Duration) {
    let layer = RateLimitLayer::builder()
        .limit(Limit::new("model", Quota::per_second(10)))
        .wait(Duration::from_secs(60))
        .priority(HeaderPriority::new(http::HeaderName::from_static(
            "x-priority",
        )))
        .reserve(reserve)
        .build();
    let svc = layer.layer(ok_service());
    let start = Instant::now();
    let mut background = Vec::new();
    for _ in 0..20 {
        let mut svc = svc.clone();
        background.push(tokio::spawn(async move {
            svc.ready().await.unwrap().call(req("a")).await.unwrap();
            Instant::now() - start
        }));
        tokio::task::yield_now().await;
    }
    let mut live = Vec::new();
    for _ in 0..4 {
        let mut svc = svc.clone();
        let mut r = req("a");
        r.headers_mut().insert("x-priority", "1".parse().unwrap());
        live.push(tokio::spawn(async move {
            svc.ready().await.unwrap().call(r).await.unwrap();
            Instant::now() - start
        }));
        tokio::task::yield_now().await;
    }
    let mut waits = Vec::new();
    for t in live {
        waits.push(t.await.unwrap());
    }
    let mut last = Duration::ZERO;
    for t in background {
        last = last.max(t.await.unwrap());
    }
    (waits, last)
}

#[tokio::test(start_paused = true)]
async fn background_work_leaves_the_reserve_to_live_requests_and_takes_the_rest() {
    let (waits, last) = background_then_live(4).await;
    assert_eq!(
        waits,
        [Duration::ZERO; 4],
        "live requests find the 4 kept cells at once"
    );
    // Background took 6 at once, then every cell beyond the reserve: 14 more at 10 a
    // second, after the live burst emptied the bucket and 5 cells came back (0.5 s).
    assert!(
        last >= Duration::from_millis(1800) && last <= Duration::from_millis(1902),
        "{last:?}"
    );
    // Without a reserve the background work had drained the bucket: live waits.
    let (waits, _) = background_then_live(0).await;
    assert!(
        waits.iter().all(|w| *w >= Duration::from_millis(100)),
        "{waits:?}"
    );
}
