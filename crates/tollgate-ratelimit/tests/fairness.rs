//! Weighted fair share between tenants waiting for one limit, on tokio's paused clock:
//! a model's quota of 10 requests a second (one at a time) shared by tenants through
//! `FairShare` on `x-tenant-id`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{ok_service, req};
use proptest::prelude::*;
use tokio::time::Instant;
use tollgate_core::key::Header;
use tollgate_core::wait::FairShare;
use tollgate_ratelimit::{Limit, Quota, RateLimitLayer};
use tower::{Layer, Service, ServiceExt};

const INTERVAL: Duration = Duration::from_millis(100);

/// The tenants' fair share by `x-tenant-id`, with these weights (1 for the rest).
fn share(weights: &[(&str, u32)]) -> FairShare {
    let mut share = FairShare::by(Header::new("x-tenant-id"));
    for (t, w) in weights {
        share = share.weight(*t, *w);
    }
    share
}

fn layer(weights: &[(&str, u32)], per_second: u32) -> RateLimitLayer {
    RateLimitLayer::builder()
        .limit(Limit::new("model", Quota::per_second(per_second).burst(1)))
        .wait(Duration::from_secs(3600))
        .max_queue(100_000)
        .share(share(weights))
        .build()
}

/// Who was admitted when, in order.
type Log = Arc<Mutex<Vec<(String, Duration)>>>;

/// Sends `n` requests of `tenant` now, each on its own task; they log their admission.
async fn send(
    svc: &tollgate_ratelimit::RateLimit<common::Ok200>,
    log: &Log,
    start: Instant,
    tenant: &str,
    n: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (mut svc, log, tenant) = (svc.clone(), Arc::clone(log), tenant.to_owned());
        tasks.push(tokio::spawn(async move {
            svc.ready().await.unwrap().call(req(&tenant)).await.unwrap();
            log.lock().unwrap().push((tenant, Instant::now() - start));
        }));
        tokio::task::yield_now().await;
    }
    tasks
}

async fn join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        t.await.unwrap();
    }
}

/// How many of the admissions in [from, from + 10 s) were `tenant`'s, and how many in all.
fn window(log: &Log, tenant: &str, from: Duration) -> (usize, usize) {
    let to = from + Duration::from_secs(10);
    let log = log.lock().unwrap();
    let all: Vec<_> = log.iter().filter(|(_, t)| *t >= from && *t < to).collect();
    (
        all.iter().filter(|(who, _)| who == tenant).count(),
        all.len(),
    )
}

/// 200 requests of tenant a, then 200 of b, all waiting at once; who passed when.
async fn two_hundred_each(svc: &tollgate_ratelimit::RateLimit<common::Ok200>) -> Log {
    let (log, start) = (Log::default(), Instant::now());
    let mut tasks = send(svc, &log, start, "a", 200).await;
    tasks.extend(send(svc, &log, start, "b", 200).await);
    join(tasks).await;
    log
}

#[tokio::test(start_paused = true)]
async fn weights_three_to_one_give_three_quarters_of_the_cells_in_every_ten_seconds() {
    let svc = layer(&[("a", 3)], 10).layer(ok_service());
    let log = two_hundred_each(&svc).await;
    // Both wait until a has had its 200 (at about 26 s): every 10-second window in
    // that time gives a three quarters of the cells, ± 3.
    for from in (0..=16).map(Duration::from_secs) {
        let (a, all) = window(&log, "a", from);
        assert_eq!(all, 100, "the quota is used whole (from {from:?})");
        assert!((72..=78).contains(&a), "a had {a} of {all} from {from:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_tenant_alone_gets_the_whole_quota() {
    let svc = layer(&[("a", 1), ("b", 3)], 10).layer(ok_service());
    let (log, start) = (Log::default(), Instant::now());
    join(send(&svc, &log, start, "a", 100).await).await;
    let last = log.lock().unwrap().last().unwrap().1;
    assert_eq!(window(&log, "a", Duration::ZERO), (100, 100));
    assert!(last <= Duration::from_millis(9_902), "{last:?}");
}

#[tokio::test(start_paused = true)]
async fn a_tenant_joining_late_is_served_within_one_interval_then_gets_its_share() {
    let svc = layer(&[("a", 3)], 10).layer(ok_service());
    let (log, start) = (Log::default(), Instant::now());
    let mut tasks = send(&svc, &log, start, "a", 300).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let joined = Instant::now() - start;
    tasks.extend(send(&svc, &log, start, "b", 100).await);
    join(tasks).await;
    let first_b = log
        .lock()
        .unwrap()
        .iter()
        .find(|(who, _)| who == "b")
        .unwrap()
        .1;
    assert!(
        first_b - joined <= INTERVAL + Duration::from_millis(1),
        "b waited {:?}",
        first_b - joined
    );
    let (b, all) = window(&log, "b", joined);
    assert_eq!(all, 100);
    assert!((22..=28).contains(&b), "b had {b} of {all} after joining");
}

/// 99 light tenants send one request each at once, after a heavy one sent `heavy`
/// (100 times as many): each light request's wait.
async fn light_waits(heavy: usize) -> Vec<Duration> {
    let svc = layer(&[], 10).layer(ok_service());
    let (log, start) = (Log::default(), Instant::now());
    let mut tasks = send(&svc, &log, start, "heavy", heavy).await;
    for i in 0..99 {
        tasks.extend(send(&svc, &log, start, &format!("light-{i}"), 1).await);
    }
    join(tasks).await;
    let log = log.lock().unwrap();
    (0..99)
        .map(|i| {
            log.iter()
                .find(|(who, _)| *who == format!("light-{i}"))
                .unwrap()
                .1
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_tenant_sending_a_hundred_times_more_adds_at_most_one_interval_to_the_others() {
    let alone = light_waits(0).await;
    let with_heavy = light_waits(100).await;
    for (i, (a, h)) in alone.iter().zip(&with_heavy).enumerate() {
        assert!(
            *h <= *a + INTERVAL + Duration::from_millis(1),
            "light tenant {i}: {h:?} with the heavy one, {a:?} without"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Under any arrival pattern, a tenant with requests waiting is never passed over for
    /// long: between two of its admissions, each other tenant gets at most its weight ÷
    /// this tenant's weight, rounded up, plus one (start-time fair queueing's bound).
    #[test]
    fn no_tenant_starves(
        tenants in proptest::collection::vec((1u32..=4, 1usize..=30, 0u64..3_000), 2..=5)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let names: Vec<String> = (0..tenants.len()).map(|i| format!("t{i}")).collect();
            let weights: Vec<(&str, u32)> =
                names.iter().zip(&tenants).map(|(n, t)| (n.as_str(), t.0)).collect();
            let svc = layer(&weights, 20).layer(ok_service());
            let (log, start) = (Log::default(), Instant::now());
            // Each tenant's burst arrives at its own moment.
            let mut order: Vec<usize> = (0..tenants.len()).collect();
            order.sort_by_key(|&i| tenants[i].2);
            let mut tasks = Vec::new();
            let mut arrived = std::collections::HashMap::new();
            for i in order {
                let at = start + Duration::from_millis(tenants[i].2);
                tokio::time::sleep_until(at).await;
                arrived.insert(names[i].clone(), Instant::now() - start);
                tasks.extend(send(&svc, &log, start, &names[i], tenants[i].1).await);
            }
            join(tasks).await;
            let log = log.lock().unwrap();
            for (i, name) in names.iter().enumerate() {
                let mine: Vec<usize> = log
                    .iter()
                    .enumerate()
                    .filter(|(_, (who, _))| who == name)
                    .map(|(k, _)| k)
                    .collect();
                assert_eq!(mine.len(), tenants[i].1, "every request of {name} passed");
                // From its arrival to its first admission, and between two of its own.
                let first_possible = log
                    .iter()
                    .position(|(_, t)| *t >= arrived[name])
                    .unwrap_or(0);
                let bounds = std::iter::once((first_possible, mine[0]))
                    .chain(mine.windows(2).map(|w| (w[0] + 1, w[1])));
                for (from, to) in bounds {
                    for (j, other) in names.iter().enumerate().filter(|(j, _)| *j != i) {
                        let got = log[from..to].iter().filter(|(who, _)| who == other).count();
                        let bound = tenants[j].0.div_ceil(tenants[i].0) as usize + 1;
                        assert!(
                            got <= bound,
                            "{other} (weight {}) got {got} while {name} (weight {}) waited; bound {bound}",
                            tenants[j].0,
                            tenants[i].0
                        );
                    }
                }
            }
        });
    }
}

/// A GCRA store in memory on tokio's clock, standing in for Redis (shared by every
/// "instance" that holds a clone): what tollgate-redis's script decides, one call each.
#[derive(Clone, Default)]
struct Gcra {
    tat: Arc<Mutex<std::collections::HashMap<String, Instant>>>,
}

impl tollgate_core::store::RateStore for Gcra {
    fn acquire(
        &self,
        cells: Arc<[tollgate_core::store::RateCell]>,
    ) -> tollgate_core::store::StoreFuture<
        Result<tollgate_core::store::RateDecision, tollgate_core::store::StoreError>,
    > {
        use tollgate_core::store::RateDecision;
        let now = Instant::now();
        let mut tat = self.tat.lock().unwrap();
        let mut denied: Option<(usize, Duration)> = None;
        let mut next = Vec::new();
        for (i, c) in cells.iter().enumerate() {
            let t = tat.get(c.key.as_str()).copied().unwrap_or(now).max(now);
            let tolerance = c.interval * c.burst.saturating_sub(1);
            let allow_at = t.checked_sub(tolerance).unwrap_or(now);
            if allow_at > now {
                let wait = allow_at - now;
                if denied.is_none_or(|(_, w)| wait > w) {
                    denied = Some((i, wait));
                }
            }
            next.push((c.key.as_str().to_owned(), t + c.interval));
        }
        let decision = match denied {
            Some((binding, retry_after)) => RateDecision::Denied {
                binding,
                retry_after,
            },
            None => {
                tat.extend(next);
                RateDecision::Admitted
            }
        };
        Box::pin(std::future::ready(Ok(decision)))
    }
}

fn stored(weights: &[(&str, u32)], per_second: u32, store: &Gcra) -> RateLimitLayer {
    RateLimitLayer::builder()
        .limit(Limit::new("model", Quota::per_second(per_second).burst(1)))
        .wait(Duration::from_secs(3600))
        .share(share(weights))
        .store(store.clone(), tollgate_core::store::OnStoreFailure::Closed)
        .build()
}

/// With the quota in a shared store (Redis, for many instances), an instance keeps the
/// fair share among its own waiters: only the first in line asks the store, so each cell
/// the store gives goes where the weights say. (Without that order every waiter asks on
/// its own timer and whoever asks first wins: an even split.)
#[tokio::test(start_paused = true)]
async fn with_a_shared_store_weights_three_to_one_still_give_three_quarters() {
    let store = Gcra::default();
    let svc = stored(&[("a", 3)], 10, &store).layer(ok_service());
    let log = two_hundred_each(&svc).await;
    for from in (0..=16).map(Duration::from_secs) {
        let (a, all) = window(&log, "a", from);
        assert!(
            (98..=101).contains(&all),
            "the quota is used whole: {all} from {from:?}"
        );
        assert!((72..=78).contains(&a), "a had {a} of {all} from {from:?}");
    }
}

/// Two instances on one store: the quota holds across them (10 a second in all), each
/// keeps its own tenants' weights, and the store's cells go to whichever instance asks
/// first — so the split between instances follows how many of them wait, not weights.
#[tokio::test(start_paused = true)]
async fn two_instances_on_one_store_share_its_quota_and_each_keeps_its_weights() {
    let store = Gcra::default();
    let one = stored(&[("a", 3)], 10, &store).layer(ok_service());
    let two = stored(&[("a", 3)], 10, &store).layer(ok_service());
    let (log, start) = (Log::default(), Instant::now());
    let mut tasks = send(&one, &log, start, "a", 150).await;
    tasks.extend(send(&one, &log, start, "b", 150).await);
    tasks.extend(send(&two, &log, start, "c", 100).await);
    join(tasks).await;
    let (_, all) = window(&log, "a", Duration::from_secs(5));
    assert!(
        (98..=101).contains(&all),
        "one quota for both: {all} in 10 s"
    );
    // While all three wait (the first 10 s): a and b, on one instance, split what it
    // gets 3:1.
    let (a, _) = window(&log, "a", Duration::ZERO);
    let (b, _) = window(&log, "b", Duration::ZERO);
    let share = a as f64 / (a + b) as f64;
    assert!((0.70..=0.80).contains(&share), "a {a}, b {b}: {share:.2}");
}

/// Priorities hold among one instance's waiters with the quota in a shared store too: a
/// live request (priority 1) arriving behind background work (priority 0) is served
/// first. (This is what keeps a gateway's jobs behind its live traffic with Redis.)
#[tokio::test(start_paused = true)]
async fn with_a_shared_store_a_higher_priority_goes_first() {
    let store = Gcra::default();
    let layer = RateLimitLayer::builder()
        .limit(Limit::new("model", Quota::per_second(1).burst(1)))
        .wait(Duration::from_secs(60))
        .priority(tollgate_ratelimit::HeaderPriority::new(
            http::HeaderName::from_static("x-priority"),
        ))
        .store(store, tollgate_core::store::OnStoreFailure::Closed)
        .build();
    let svc = layer.layer(ok_service());
    svc.clone().oneshot(req("x")).await.unwrap(); // takes the only cell
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (name, prio) in [("job1", "0"), ("job2", "0"), ("live", "1"), ("job3", "0")] {
        let (mut svc, order) = (svc.clone(), Arc::clone(&order));
        let mut r = req("x");
        r.headers_mut().insert("x-priority", prio.parse().unwrap());
        tasks.push(tokio::spawn(async move {
            svc.ready().await.unwrap().call(r).await.unwrap();
            order.lock().unwrap().push(name);
        }));
        tokio::task::yield_now().await;
    }
    join(tasks).await;
    assert_eq!(*order.lock().unwrap(), ["live", "job1", "job2", "job3"]);
}
