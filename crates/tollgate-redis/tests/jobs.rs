//! The Redis job store against a real Redis: every rule of a job store, and a dead
//! instance's work taken over by another after the lease.

use std::time::Duration;

use tollgate_core::store::{JobState, JobStore};
use tollgate_redis::{RedisJobStore, RedisStore};
use tollgate_testkit::job_store::{contract, job};

fn namespace(test: &str) -> String {
    format!("jobs-{test}-{}-{:x}", std::process::id(), fastrand::u64(..))
}

fn store(url: &str, ns: &str) -> RedisJobStore {
    RedisJobStore::new(&RedisStore::open(url).expect("url").namespace(ns))
}

#[tokio::test]
async fn the_store_keeps_every_rule_of_a_job_store() {
    let Some(url) = tollgate_testkit::redis::redis_url("jobs contract") else {
        return;
    };
    let s = store(&url, &namespace("contract"));
    contract(&s, "c").await;
}

/// Claims on `store` until a job left by another instance comes back to the queue, which
/// must be after about `lease` (Redis's clock measures it) and within 20 s.
async fn taken_over(
    store: &RedisJobStore,
    now_ms: u64,
    lease: Duration,
) -> tollgate_core::store::Job {
    let started = std::time::Instant::now();
    let job = loop {
        if let Some(j) = store.claim(now_ms, lease).await.unwrap() {
            break j;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the job was never taken over"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        started.elapsed() >= lease * 2 / 3,
        "not before the lease: {:?}",
        started.elapsed()
    );
    job
}

#[tokio::test]
async fn a_dead_instances_job_is_taken_over_after_the_lease_and_only_the_new_claim_answers() {
    let Some(url) = tollgate_testkit::redis::redis_url("jobs takeover") else {
        return;
    };
    let ns = namespace("takeover");
    let (dead, alive) = (store(&url, &ns), store(&url, &ns));
    assert_ne!(dead.consumer(), alive.consumer());
    // The lease is measured by Redis's clock (an entry's idle time), so this test runs
    // on real time: a lease long enough that the claim right after the first one is
    // surely inside it, and a bounded wait for it to run out.
    let lease = Duration::from_millis(1500);
    dead.enqueue(job("j", 1)).await.unwrap();
    dead.enqueue(job("k", 2)).await.unwrap();
    let old = dead.claim(0, lease).await.unwrap().unwrap();
    assert_eq!((old.id.as_str(), old.claims), ("j", 1));
    let other = alive.claim(0, lease).await.unwrap().unwrap();
    assert_eq!(
        other.id, "k",
        "the other instance takes the next job, not the claimed one"
    );
    assert!(
        alive.claim(0, lease).await.unwrap().is_none(),
        "the lease holds"
    );
    alive
        .finish("k", 1, JobState::Completed, 200, "{}".into(), 1)
        .await
        .unwrap();
    // `dead` stops here. Its entry idles in the group until `alive` takes it over.
    let new = taken_over(&alive, 5, lease).await;
    assert_eq!((new.id.as_str(), new.claims), ("j", 2));
    assert!(
        !dead
            .finish("j", old.claims, JobState::Completed, 200, "old".into(), 6)
            .await
            .unwrap(),
        "the dead claim's late answer is not recorded"
    );
    assert!(alive
        .finish("j", new.claims, JobState::Completed, 200, "new".into(), 7)
        .await
        .unwrap());
    assert_eq!(
        alive.get("j").await.unwrap().unwrap().response.as_deref(),
        Some("new")
    );
    assert!(
        alive.claim(8, lease).await.unwrap().is_none(),
        "an answered job's entry is gone from the queue"
    );
}

/// A worker alive renews its lease: its entry is not taken over while it renews, however
/// long past the first lease, and is once it stops. Real time (Redis's clock measures the
/// lease), about three seconds.
#[tokio::test]
async fn a_renewed_lease_is_not_taken_over_and_a_lapsed_one_is() {
    let Some(url) = tollgate_testkit::redis::redis_url("jobs renewal") else {
        return;
    };
    let ns = namespace("renew");
    let (busy, other) = (store(&url, &ns), store(&url, &ns));
    let lease = Duration::from_millis(600);
    busy.enqueue(job("j", 1)).await.unwrap();
    let held = busy.claim(0, lease).await.unwrap().unwrap();
    // Three leases long, renewed every third of one: never free for the other instance.
    for _ in 0..9 {
        tokio::time::sleep(lease / 3).await;
        assert!(busy.renew("j", held.claims, 1, lease).await.unwrap());
        assert!(
            other.claim(1, lease).await.unwrap().is_none(),
            "a renewed claim holds"
        );
    }
    // It stops renewing (its instance died): taken over after a lease.
    let taken = taken_over(&other, 2, lease).await;
    assert_eq!(taken.claims, 2);
    assert!(
        !busy.renew("j", held.claims, 3, lease).await.unwrap(),
        "the old claim renews nothing once taken over"
    );
    assert!(other.renew("j", taken.claims, 3, lease).await.unwrap());
}

#[tokio::test]
async fn an_unreachable_redis_is_an_error_not_a_hang() {
    let s = RedisJobStore::new(&RedisStore::open("redis://127.0.0.1:1").unwrap())
        .timeout(Duration::from_millis(500));
    assert!(s.enqueue(job("x", 1)).await.is_err());
    assert!(s.claim(0, Duration::from_secs(1)).await.is_err());
}
