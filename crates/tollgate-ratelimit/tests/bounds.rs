//! Properties that must hold whatever the traffic: never more than the burst plus the
//! rate in any window, under concurrency; and memory that comes back when keys go idle.

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use common::ok_service;
use proptest::prelude::*;
use tollgate_core::clock::ManualClock;
use tollgate_core::key::{key_fn, Key};
use tollgate_ratelimit::{Limit, Quota, RateLimitLayer};
use tower::{Layer, Service};

/// Calls a refuse-mode service whose inner service answers at once: everything is ready
/// on the first poll, so no runtime is needed.
fn call_now<S>(svc: &mut S) -> bool
where
    S: Service<http::Request<()>>,
{
    let mut cx = Context::from_waker(Waker::noop());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        _ => panic!("the service should be ready"),
    }
    let mut fut = std::pin::pin!(svc.call(http::Request::new(())));
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(r) => r.is_ok(),
        Poll::Pending => panic!("refuse mode never waits"),
    }
}

proptest! {
    // 48 cases by default; PROPTEST_CASES raises it for a longer search.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        ..ProptestConfig::default()
    })]

    /// GCRA's guarantee: over any span of time, admissions ≤ burst + span / interval —
    /// so never more than quota + burst in any window — with 4 threads sending at once.
    #[test]
    fn never_more_than_burst_plus_rate_in_any_window(
        rate in 1u32..40,
        burst in 1u32..16,
        steps in prop::collection::vec((0u64..600, 0usize..24), 1..40),
    ) {
        let clock = ManualClock::new();
        let quota = Quota::per_second(rate).burst(burst);
        let layer = RateLimitLayer::builder()
            .limit(Limit::new("l", quota))
            .clock(clock.clone())
            .housekeeping(None)
            .build();
        let svc = layer.layer(ok_service());
        // (time since start, admissions at that instant)
        let mut instants: Vec<(Duration, u64)> = Vec::new();
        let mut now = Duration::ZERO;
        for (gap_ms, n) in steps {
            clock.advance(Duration::from_millis(gap_ms));
            now += Duration::from_millis(gap_ms);
            let admitted = AtomicU64::new(0);
            std::thread::scope(|s| {
                for w in 0..4 {
                    let (svc, admitted) = (svc.clone(), &admitted);
                    s.spawn(move || {
                        let mut svc = svc;
                        for _ in (w..n).step_by(4) {
                            if call_now(&mut svc) {
                                admitted.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
            instants.push((now, admitted.load(Ordering::Relaxed)));
        }
        let t = quota.interval().as_nanos();
        for i in 0..instants.len() {
            let mut count = 0;
            for j in i..instants.len() {
                count += instants[j].1;
                let span = (instants[j].0 - instants[i].0).as_nanos();
                let bound = u64::from(burst) + (span / t) as u64;
                prop_assert!(count <= bound, "{count} admitted in {span} ns; bound {bound}");
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_million_idle_keys_come_back_down_to_zero() {
    let next = AtomicU64::new(0);
    let layer = RateLimitLayer::builder()
        .limit(
            Limit::new("per-key", Quota::per_second(10)).keyed_by(key_fn(move |_| {
                Some(Key::new(next.fetch_add(1, Ordering::Relaxed).to_string()))
            })),
        )
        .housekeeping(None)
        .build();
    let mut svc = layer.layer(ok_service());
    for _ in 0..1_000_000 {
        assert!(call_now(&mut svc));
    }
    assert_eq!(layer.keys(), 1_000_000);
    // Still busy: nothing may be dropped yet.
    layer.retain_recent();
    assert_eq!(layer.keys(), 1_000_000);
    // Idle for longer than a cell takes to come back: every key is as good as new.
    tokio::time::advance(Duration::from_millis(250)).await;
    layer.retain_recent();
    assert_eq!(layer.keys(), 0);
}

#[tokio::test(start_paused = true)]
async fn housekeeping_runs_by_itself_and_stops_with_the_layer() {
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let before = tasks();
    let next = AtomicU64::new(0);
    let layer = RateLimitLayer::builder()
        .limit(
            Limit::new("per-key", Quota::per_second(10)).keyed_by(key_fn(move |_| {
                Some(Key::new(next.fetch_add(1, Ordering::Relaxed).to_string()))
            })),
        )
        .housekeeping(Some(Duration::from_secs(1)))
        .build();
    assert_eq!(tasks(), before + 1, "one housekeeping task");
    let mut svc = layer.layer(ok_service());
    for _ in 0..1000 {
        call_now(&mut svc);
    }
    assert_eq!(layer.keys(), 1000);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(layer.keys(), 0, "the background task dropped the idle keys");
    drop((svc, layer));
    // The task holds only a weak reference; with the layer gone it ends at its next tick.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(tasks(), before, "the housekeeping task ended");
}
