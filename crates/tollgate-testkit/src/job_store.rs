//! The rules every [`JobStore`] keeps, as one suite each store's tests run: claims once
//! each and in submission order, an answer recorded once and only for the claim in force,
//! a batch added all or none and listed by its prefix, a cancelled or expired job never
//! claimed. Taking over a dead worker's claim depends on whose clock measures the lease
//! (the caller's for an embedded store, the server's for Redis), so each store tests that
//! itself.
//!
//! ```no_run
//! # async fn demo(store: &dyn tollgate_core::store::JobStore) {
//! tollgate_testkit::job_store::contract(store, "t1").await;
//! # }
//! ```

use std::time::Duration;

use tollgate_core::store::{Job, JobState, JobStore};

/// A queued job `id`, submitted at `created_ms`.
pub fn job(id: &str, created_ms: u64) -> Job {
    Job {
        id: id.into(),
        tenant: "acme".into(),
        path: "/v1/chat/completions".into(),
        body: r#"{"model":"m","messages":[]}"#.into(),
        state: JobState::Queued,
        status: None,
        response: None,
        created_ms,
        started_ms: None,
        finished_ms: None,
        claims: 0,
        lease_until_ms: None,
        callback: None,
        deadline_ms: None,
    }
}

const LEASE: Duration = Duration::from_secs(60);

/// Runs the whole suite on `store`, which must hold no job yet; every id starts with
/// `prefix`.
///
/// # Panics
///
/// When the store breaks a rule: this is a test.
pub async fn contract(store: &dyn JobStore, prefix: &str) {
    claims_once_each_in_order(store, prefix).await;
    batches_all_or_none(store, prefix).await;
    cancelled_and_expired_are_never_claimed(store, prefix).await;
    renewed_only_for_the_claim_in_force(store, prefix).await;
}

/// Drains the store of claimable jobs.
async fn drain(store: &dyn JobStore, now: u64) -> Vec<Job> {
    let mut out = Vec::new();
    while let Some(j) = store.claim(now, LEASE).await.expect("claim") {
        out.push(j);
    }
    out
}

async fn claims_once_each_in_order(s: &dyn JobStore, p: &str) {
    let (a, b) = (format!("{p}-order-a"), format!("{p}-order-b"));
    s.enqueue(job(&a, 1)).await.expect("enqueue");
    let mut with_callback = job(&b, 2);
    with_callback.callback = Some("http://127.0.0.1:9/hook".into());
    with_callback.deadline_ms = Some(99);
    s.enqueue(with_callback.clone()).await.expect("enqueue");
    assert!(s.enqueue(job(&a, 3)).await.is_err(), "ids are unique");
    let got = s.get(&b).await.expect("get").expect("there");
    assert_eq!(got, with_callback, "a job reads back as it went in");

    let first = s.claim(10, LEASE).await.expect("claim").expect("a job");
    assert_eq!(
        (first.id.as_str(), first.claims, first.state),
        (a.as_str(), 1, JobState::InProgress)
    );
    assert_eq!(first.started_ms, Some(10));
    let second = s.claim(10, LEASE).await.expect("claim").expect("a job");
    assert_eq!(second.id, b, "a claimed job is not claimed again");
    assert!(s.claim(10, LEASE).await.expect("claim").is_none());

    assert!(
        !s.finish(&a, 2, JobState::Completed, 200, "{}".into(), 20)
            .await
            .expect("finish"),
        "only the claim in force may answer"
    );
    assert!(s
        .finish(&a, 1, JobState::Completed, 200, r#"{"ok":1}"#.into(), 20)
        .await
        .expect("finish"));
    assert!(
        !s.finish(&a, 1, JobState::Failed, 500, "{}".into(), 21)
            .await
            .expect("finish"),
        "an answer is recorded once"
    );
    let done = s.get(&a).await.expect("get").expect("there");
    assert_eq!(
        (
            done.state,
            done.status,
            done.response.as_deref(),
            done.finished_ms,
            done.lease_until_ms
        ),
        (
            JobState::Completed,
            Some(200),
            Some(r#"{"ok":1}"#),
            Some(20),
            None
        )
    );
    assert!(
        s.cancel(&a, 30)
            .await
            .expect("cancel")
            .expect("there")
            .state
            == JobState::Completed,
        "a final job never changes"
    );
    assert!(s.get(&format!("{p}-none")).await.expect("get").is_none());
    s.finish(&b, 1, JobState::Failed, 502, "{}".into(), 40)
        .await
        .expect("finish");
}

async fn batches_all_or_none(s: &dyn JobStore, p: &str) {
    let lines: Vec<Job> = (0..100)
        .map(|i| job(&format!("{p}-batch-1_{i:06}"), 5))
        .collect();
    s.enqueue_many(lines).await.expect("enqueue_many");
    s.enqueue(job(&format!("{p}-batch-2_000000"), 6))
        .await
        .expect("enqueue");
    let listed = s.list(&format!("{p}-batch-1_")).await.expect("list");
    assert_eq!(listed.len(), 100);
    assert_eq!(listed[0].id, format!("{p}-batch-1_000000"));
    assert_eq!(listed[99].id, format!("{p}-batch-1_000099"));
    let clash = vec![
        job(&format!("{p}-batch-3_000000"), 7),
        job(&format!("{p}-batch-1_000003"), 7),
    ];
    assert!(s.enqueue_many(clash).await.is_err(), "all or none");
    assert!(
        s.get(&format!("{p}-batch-3_000000"))
            .await
            .expect("get")
            .is_none(),
        "nothing of a refused batch went in"
    );
    let claimed = drain(s, 50).await;
    assert_eq!(claimed.len(), 101, "each line once");
    assert!(claimed.windows(2).take(99).all(|w| w[0].id < w[1].id));
    for j in claimed {
        s.finish(&j.id, j.claims, JobState::Completed, 200, "{}".into(), 60)
            .await
            .expect("finish");
    }
}

async fn cancelled_and_expired_are_never_claimed(s: &dyn JobStore, p: &str) {
    let (x, y, z) = (
        format!("{p}-stop-x"),
        format!("{p}-stop-y"),
        format!("{p}-stop-z"),
    );
    for (id, at) in [(&x, 1), (&y, 2), (&z, 3)] {
        s.enqueue(job(id, at)).await.expect("enqueue");
    }
    let c = s.cancel(&x, 5).await.expect("cancel").expect("there");
    assert_eq!((c.state, c.finished_ms), (JobState::Cancelled, Some(5)));
    let e = s.expire(&y, 6).await.expect("expire").expect("there");
    assert_eq!(e.state, JobState::Expired);
    let left = drain(s, 10).await;
    assert_eq!(
        left.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        [z.as_str()]
    );
    let zc = s.cancel(&z, 11).await.expect("cancel").expect("there");
    assert_eq!(
        zc.state,
        JobState::Cancelled,
        "a running job may be cancelled"
    );
    assert!(
        !s.finish(&z, 1, JobState::Completed, 200, "{}".into(), 12)
            .await
            .expect("finish"),
        "and its answer is then not recorded"
    );
    assert!(s
        .cancel(&format!("{p}-nope"), 0)
        .await
        .expect("cancel")
        .is_none());
}

async fn renewed_only_for_the_claim_in_force(s: &dyn JobStore, p: &str) {
    let (a, b) = (format!("{p}-renew-a"), format!("{p}-renew-b"));
    s.enqueue(job(&a, 1)).await.expect("enqueue");
    s.enqueue(job(&b, 2)).await.expect("enqueue");
    let ja = s.claim(10, LEASE).await.expect("claim").expect("a job");
    let jb = s.claim(10, LEASE).await.expect("claim").expect("a job");
    assert_eq!((ja.id.as_str(), jb.id.as_str()), (a.as_str(), b.as_str()));
    assert!(
        s.renew(&a, ja.claims, 20, LEASE).await.expect("renew"),
        "the claim in force is renewed"
    );
    let renewed = s.get(&a).await.expect("get").expect("there");
    assert_eq!(renewed.lease_until_ms, Some(20 + 60_000));
    assert_eq!(renewed.claims, ja.claims, "a renewal is not a new claim");
    assert!(
        !s.renew(&a, ja.claims + 1, 20, LEASE).await.expect("renew"),
        "another claim's number renews nothing"
    );
    assert!(s
        .finish(&a, ja.claims, JobState::Completed, 200, "{}".into(), 30)
        .await
        .expect("finish"));
    assert!(
        !s.renew(&a, ja.claims, 31, LEASE).await.expect("renew"),
        "an answered job's lease is gone"
    );
    s.cancel(&b, 32).await.expect("cancel");
    assert!(
        !s.renew(&b, jb.claims, 33, LEASE).await.expect("renew"),
        "a cancelled job's lease is gone"
    );
    assert!(!s
        .renew(&format!("{p}-renew-nope"), 1, 34, LEASE)
        .await
        .expect("renew"));
}
