//! Refuse mode: the limit, the true Retry-After, all-or-nothing, shared clones.

mod common;

use std::time::Duration;

use common::{ok_service, refusal, req, send};
use tollgate_core::key::Header;
use tollgate_core::refusal::Reason;
use tollgate_ratelimit::{Limit, Quota, RateLimitLayer};
use tower::{Layer, Service, ServiceExt};

fn per_tenant(q: Quota) -> Limit {
    Limit::new("tenant", q).keyed_by(Header::new("x-tenant-id"))
}

#[tokio::test(start_paused = true)]
async fn burst_then_refusal_with_the_true_time_to_the_next_cell() {
    let mut svc = RateLimitLayer::new(per_tenant(Quota::per_second(2))).layer(ok_service());
    assert!(send(&mut svc, req("a")).await.is_ok());
    tokio::time::advance(Duration::from_millis(120)).await;
    assert!(send(&mut svc, req("a")).await.is_ok());
    let r = refusal(send(&mut svc, req("a")).await.unwrap_err());
    assert_eq!(r.reason(), Reason::OverLimit);
    assert_eq!(r.limit(), "tenant");
    assert_eq!(r.key().unwrap().as_str(), "tenant:a");
    // Two cells per second: the first came back 500 ms after it was taken, at 500 ms;
    // 120 ms have passed, so 380 ms are left — exactly.
    let wait = r.retry_after().unwrap();
    assert_eq!(wait, Duration::from_millis(380));
    tokio::time::advance(wait - Duration::from_millis(1)).await;
    assert!(
        send(&mut svc, req("a")).await.is_err(),
        "not a moment early"
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(
        send(&mut svc, req("a")).await.is_ok(),
        "and not a moment late"
    );
    // Other tenants have their own buckets.
    assert!(send(&mut svc, req("b")).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn the_429_rounds_retry_after_up_and_describes_the_quota() {
    let mut svc = RateLimitLayer::new(per_tenant(Quota::per_minute(3))).layer(ok_service());
    for _ in 0..3 {
        send(&mut svc, req("a")).await.unwrap();
    }
    let r = refusal(send(&mut svc, req("a")).await.unwrap_err());
    assert_eq!(r.retry_after(), Some(Duration::from_secs(20)));
    tokio::time::advance(Duration::from_millis(500)).await;
    let r = refusal(send(&mut svc, req("a")).await.unwrap_err());
    let res: http::Response<bytes::Bytes> = r.to_response();
    assert_eq!(res.status(), 429);
    assert_eq!(
        res.headers()["retry-after"],
        "20",
        "19.5 s rounds up, never down"
    );
    assert_eq!(res.headers()["ratelimit-policy"], "\"tenant\";q=3;w=60");
    assert_eq!(res.headers()["ratelimit"], "\"tenant\";r=0;t=20");
}

#[tokio::test(start_paused = true)]
async fn a_refusal_by_one_limit_spends_no_cell_of_another() {
    let layer = RateLimitLayer::builder()
        .limit(per_tenant(Quota::per_hour(1)))
        .limit(Limit::new("global", Quota::per_hour(3)))
        .build();
    let mut svc = layer.layer(ok_service());
    assert!(send(&mut svc, req("a")).await.is_ok());
    for _ in 0..5 {
        let r = refusal(send(&mut svc, req("a")).await.unwrap_err());
        assert_eq!(r.limit(), "tenant");
    }
    // Tenant a's refusals took nothing from the global limit: two more tenants pass.
    assert!(send(&mut svc, req("b")).await.is_ok());
    assert!(send(&mut svc, req("c")).await.is_ok());
    let r = refusal(send(&mut svc, req("d")).await.unwrap_err());
    assert_eq!(r.limit(), "global");
    // ... and the global refusal took nothing from tenant d's own limit.
    tokio::time::advance(Duration::from_secs(1200)).await;
    assert!(send(&mut svc, req("d")).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn when_two_limits_refuse_retry_after_is_the_longer_wait() {
    let layer = RateLimitLayer::builder()
        .limit(per_tenant(Quota::per_minute(1)))
        .limit(Limit::new("global", Quota::per_hour(1)))
        .build();
    let mut svc = layer.layer(ok_service());
    send(&mut svc, req("a")).await.unwrap();
    let r = refusal(send(&mut svc, req("a")).await.unwrap_err());
    assert_eq!(r.limit(), "global");
    assert_eq!(r.retry_after(), Some(Duration::from_secs(3600)));
}

#[tokio::test(start_paused = true)]
async fn every_clone_draws_on_the_same_limit() {
    let layer = RateLimitLayer::new(per_tenant(Quota::per_minute(10)));
    // As axum does: one clone per connection.
    let svc = layer.layer(ok_service());
    let mut admitted = 0;
    for _ in 0..100 {
        let mut clone = svc.clone();
        if clone.ready().await.unwrap().call(req("a")).await.is_ok() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10);
    // Services made separately by the same layer share it too.
    let mut other = layer.layer(ok_service());
    assert!(send(&mut other, req("a")).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn a_zero_quota_lets_nothing_through_and_says_so() {
    let mut svc = RateLimitLayer::new(per_tenant(Quota::per_minute(0))).layer(ok_service());
    let r = refusal(send(&mut svc, req("a")).await.unwrap_err());
    assert_eq!(r.reason(), Reason::TooLarge);
    assert_eq!(r.retry_after(), None);
}

#[tokio::test(start_paused = true)]
async fn requests_without_a_key_share_one_bucket() {
    let mut svc = RateLimitLayer::new(per_tenant(Quota::per_hour(1))).layer(ok_service());
    let anon = || http::Request::get("/").body(()).unwrap();
    assert!(send(&mut svc, anon()).await.is_ok());
    let r = refusal(send(&mut svc, anon()).await.unwrap_err());
    assert_eq!(r.key().unwrap().as_str(), "unkeyed");
}

#[tokio::test(start_paused = true)]
async fn adaptive_limits_follow_the_providers_remaining_count() {
    // The provider reports 2 requests left, though our quota has 600.
    let provider = tower::service_fn(|_: http::Request<()>| async {
        let res = http::Response::builder()
            .header("x-ratelimit-limit-requests", "60")
            .header("x-ratelimit-remaining-requests", "2")
            .header("x-ratelimit-reset-requests", "58s")
            .body(())
            .unwrap();
        Ok::<_, std::convert::Infallible>(res)
    });
    let layer = RateLimitLayer::new(Limit::new("rpm", Quota::per_minute(600)).adaptive());
    let mut svc = layer.layer(provider);
    send(&mut svc, req("a")).await.unwrap();
    send(&mut svc, req("a")).await.unwrap();
    send(&mut svc, req("a")).await.unwrap();
    // Each answer said "2 left"; after the third we may send at most 2 more, not 597.
    let mut more = 0;
    while send(&mut svc, req("a")).await.is_ok() {
        more += 1;
        assert!(more < 10, "the provider's count was ignored");
    }
    assert!(more <= 2, "{more}");

    // A limit that is not adaptive ignores the headers.
    let plain = RateLimitLayer::new(Limit::new("rpm", Quota::per_minute(600)));
    let mut svc = plain.layer(provider);
    for _ in 0..20 {
        send(&mut svc, req("a")).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn adaptive_waits_for_the_providers_pace_when_nothing_is_left() {
    let provider = tower::service_fn(|_: http::Request<()>| async {
        let res = http::Response::builder()
            .header("x-ratelimit-limit-requests", "10")
            .header("x-ratelimit-remaining-requests", "0")
            .header("x-ratelimit-reset-requests", "60s")
            .body(())
            .unwrap();
        Ok::<_, std::convert::Infallible>(res)
    });
    let layer = RateLimitLayer::new(Limit::new("rpm", Quota::per_minute(6000)).adaptive());
    let mut svc = layer.layer(provider);
    send(&mut svc, req("a")).await.unwrap();
    let r = refusal(send(&mut svc, req("a")).await.unwrap_err());
    // The provider refills 10 a minute: the next cell in 6 s, not our 10 ms.
    let wait = r.retry_after().unwrap();
    assert!(
        wait >= Duration::from_secs(6) && wait <= Duration::from_millis(6010),
        "{wait:?}"
    );
}
