//! Four instances (separate connections, concurrent tasks) sharing quotas in a real Redis.
//! Needs `REDIS_URL`; skips with a message without it, unless `TOLLGATE_REQUIRE_REDIS=1`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tollgate_core::key::Key;
use tollgate_core::store::{
    RateCell, RateDecision, RateStore, TokenCell, TokenDecision, TokenStore,
};
use tollgate_redis::{PooledStore, RedisStore};

/// A namespace no other test or run uses.
fn fresh_namespace(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("test:{test}:{}:{nanos}", std::process::id())
}

fn instances(url: &str, ns: &str, n: usize) -> Vec<RedisStore> {
    (0..n)
        .map(|_| {
            RedisStore::open(url)
                .unwrap()
                .namespace(ns)
                .timeout(Duration::from_secs(2))
        })
        .collect()
}

const INTERVAL: Duration = Duration::from_millis(5);
const BURST: u32 = 20;

/// Four instances, four tasks each, asking for cells as fast as they are granted (waiting
/// out each refusal) for 1.5 s: when each was admitted.
async fn hammer(stores: Vec<Arc<dyn RateStore>>) -> Vec<Instant> {
    // 200 a second, 20 at once, for tenant "acme" across the instances; and a second
    // limit every request also passes (global, looser), all or nothing.
    let cells: Arc<[RateCell]> = Arc::new([
        RateCell {
            key: Key::new("rpm:acme"),
            interval: INTERVAL,
            burst: BURST,
        },
        RateCell {
            key: Key::new("global"),
            interval: Duration::from_micros(500),
            burst: 1000,
        },
    ]);
    let admitted = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let run = Duration::from_millis(1500);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for store in stores {
        for _ in 0..4 {
            let (store, cells, admitted) = (
                Arc::clone(&store),
                Arc::clone(&cells),
                Arc::clone(&admitted),
            );
            tasks.push(tokio::spawn(async move {
                while start.elapsed() < run {
                    match store.acquire(Arc::clone(&cells)).await.unwrap() {
                        RateDecision::Admitted => admitted.lock().unwrap().push(Instant::now()),
                        RateDecision::Denied {
                            binding,
                            retry_after,
                        } => {
                            assert_eq!(binding, 0, "the tenant limit binds");
                            assert!(retry_after <= INTERVAL, "{retry_after:?}");
                            tokio::time::sleep(retry_after).await;
                        }
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut times = admitted.lock().unwrap().clone();
    times.sort();
    times
}

/// Every `window` holds at most the burst plus what refills in it and in `slack`; the
/// whole run is within 2% of the burst plus one per interval.
///
/// The times are taken here, after each answer, so they also carry this side's scheduling
/// delays: 25 ms of them are allowed for (five cells), far less than a broken limiter
/// lets through.
fn check(times: &[Instant], window: Duration, slack: Duration) {
    let jitter = Duration::from_millis(25);
    let most = BURST as usize
        + ((window + slack + jitter).as_micros() / INTERVAL.as_micros()) as usize
        + 1;
    for (i, t) in times.iter().enumerate() {
        let within = times[i..].iter().take_while(|u| **u - *t < window).count();
        assert!(
            within <= most,
            "{within} admitted within {window:?} (most {most})"
        );
    }
    let span = *times.last().unwrap() - times[0];
    let expected = BURST as f64 + span.as_secs_f64() / INTERVAL.as_secs_f64();
    let got = times.len() as f64;
    assert!(
        got <= expected + 1.0,
        "{got} admitted, the quota allows {expected:.0}"
    );
    assert!(
        got >= expected * 0.98,
        "{got} admitted, the quota allows {expected:.0}: capacity was lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_hold_one_gcra_quota() {
    let Some(url) = tollgate_testkit::redis::redis_url("four_instances_hold_one_gcra_quota") else {
        return;
    };
    let ns = fresh_namespace("gcra");
    let stores = instances(&url, &ns, 4)
        .into_iter()
        .map(|s| Arc::new(s) as Arc<dyn RateStore>)
        .collect();
    check(
        &hammer(stores).await,
        Duration::from_millis(250),
        Duration::ZERO,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_pooled_instances_hold_one_gcra_quota() {
    let Some(url) = tollgate_testkit::redis::redis_url("four_pooled_instances_hold_one_gcra_quota")
    else {
        return;
    };
    let ns = fresh_namespace("pooled");
    let lease = Duration::from_millis(50);
    let stores = instances(&url, &ns, 4)
        .into_iter()
        .map(|s| Arc::new(PooledStore::new(s).slice(10).lease(lease)) as Arc<dyn RateStore>)
        .collect();
    // Cells are spent up to a lease after Redis lent them: that is all pooling shifts.
    check(&hammer(stores).await, Duration::from_millis(250), lease);
}

/// Four instances, four tasks each, reserving 200–2000 tokens, holding them a while and
/// settling with about what they reserved, for 1.5 s: never more held at once than the
/// bucket, never more spent than it and its refill.
async fn reserve_and_settle(stores: Vec<Arc<dyn TokenStore>>) {
    let capacity = 10_000u64;
    let window = Duration::from_secs(2);
    let cells: Arc<[TokenCell]> = Arc::new([
        TokenCell {
            key: Key::new("tpm:acme"),
            capacity,
            window,
        },
        TokenCell {
            key: Key::new("tpm:global"),
            capacity: 1_000_000,
            window,
        },
    ]);
    // Tokens held by requests in flight, as the callers count them: granted before they
    // count, released before the store hears of it, so this never exceeds the store's.
    let held = Arc::new(AtomicU64::new(0));
    let most_held = Arc::new(AtomicU64::new(0));
    let spent = Arc::new(AtomicU64::new(0));
    let run = Duration::from_millis(1500);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (n, store) in stores.into_iter().enumerate() {
        for k in 0..4u64 {
            let (store, cells) = (store.clone(), Arc::clone(&cells));
            let (held, most_held, spent) = (
                Arc::clone(&held),
                Arc::clone(&most_held),
                Arc::clone(&spent),
            );
            tasks.push(tokio::spawn(async move {
                let mut rng = (n as u64 * 7 + k) * 2654435761 + 1;
                let mut next = move |m: u64| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % m
                };
                while start.elapsed() < run {
                    let amount = 200 + next(1800);
                    match store.reserve(Arc::clone(&cells), amount).await.unwrap() {
                        TokenDecision::Reserved { hold } => {
                            let now = held.fetch_add(amount, Ordering::SeqCst) + amount;
                            most_held.fetch_max(now, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(next(20))).await;
                            // Usually less than reserved; sometimes a little more.
                            let used = (amount * (50 + next(60))) / 100;
                            held.fetch_sub(amount, Ordering::SeqCst);
                            spent.fetch_add(used, Ordering::SeqCst);
                            store
                                .settle(Arc::clone(&cells), hold, amount, used)
                                .await
                                .unwrap();
                        }
                        TokenDecision::Denied {
                            binding,
                            retry_after,
                        } => {
                            assert_eq!(binding, 0);
                            let wait = retry_after.expect("the amount fits the bucket");
                            tokio::time::sleep(wait.min(Duration::from_millis(50))).await;
                        }
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let most = most_held.load(Ordering::SeqCst);
    assert!(
        most <= capacity,
        "{most} tokens held at once, capacity {capacity}"
    );
    assert!(most > capacity / 2, "the budget was used: {most}");
    // Spent over the run: at most a full bucket plus what refilled.
    let refill = capacity as f64 * start.elapsed().as_secs_f64() / window.as_secs_f64();
    let total = spent.load(Ordering::SeqCst) as f64;
    assert!(
        total <= capacity as f64 + refill + 2000.0,
        "{total} spent, allowed {}",
        capacity as f64 + refill
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_across_instances_never_overshoot_the_budget() {
    let Some(url) = tollgate_testkit::redis::redis_url(
        "reservations_across_instances_never_overshoot_the_budget",
    ) else {
        return;
    };
    let ns = fresh_namespace("tpm");
    let stores = instances(&url, &ns, 4)
        .into_iter()
        .map(|s| Arc::new(s) as Arc<dyn TokenStore>)
        .collect();
    reserve_and_settle(stores).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_reservations_across_instances_never_overshoot_the_budget() {
    let Some(url) = tollgate_testkit::redis::redis_url(
        "pooled_reservations_across_instances_never_overshoot_the_budget",
    ) else {
        return;
    };
    let ns = fresh_namespace("tpm-pooled");
    let stores = instances(&url, &ns, 4)
        .into_iter()
        .map(|s| {
            Arc::new(
                PooledStore::new(s)
                    .token_slice(3000)
                    .lease(Duration::from_millis(100)),
            ) as Arc<dyn TokenStore>
        })
        .collect();
    reserve_and_settle(stores).await;
}

#[tokio::test]
async fn an_amount_larger_than_the_bucket_is_refused_for_good() {
    let Some(url) =
        tollgate_testkit::redis::redis_url("an_amount_larger_than_the_bucket_is_refused_for_good")
    else {
        return;
    };
    let store = RedisStore::open(&url)
        .unwrap()
        .namespace(&fresh_namespace("big"));
    let cells: Arc<[TokenCell]> = Arc::new([TokenCell {
        key: Key::new("t"),
        capacity: 100,
        window: Duration::from_secs(60),
    }]);
    assert_eq!(
        store.reserve(Arc::clone(&cells), 101).await.unwrap(),
        TokenDecision::Denied {
            binding: 0,
            retry_after: None
        }
    );
    let TokenDecision::Reserved { hold } = store.reserve(Arc::clone(&cells), 100).await.unwrap()
    else {
        panic!("reserved");
    };
    // Held, not free: a second reservation waits for the first to settle.
    assert!(matches!(
        store.reserve(Arc::clone(&cells), 1).await.unwrap(),
        TokenDecision::Denied {
            retry_after: Some(_),
            ..
        }
    ));
    store
        .settle(Arc::clone(&cells), hold, 100, 40)
        .await
        .unwrap();
    assert!(matches!(
        store.reserve(Arc::clone(&cells), 60).await.unwrap(),
        TokenDecision::Reserved { .. }
    ));
}

#[tokio::test]
async fn a_hold_never_settled_ends_at_its_deadline() {
    let Some(url) = tollgate_testkit::redis::redis_url("a_hold_never_settled_ends_at_its_deadline")
    else {
        return;
    };
    let ns = fresh_namespace("holds");
    // 100 tokens a second. A request reserves them all and its process dies: no settle.
    let cells: Arc<[TokenCell]> = Arc::new([TokenCell {
        key: Key::new("t"),
        capacity: 100,
        window: Duration::from_secs(1),
    }]);
    let forever = RedisStore::open(&url).unwrap().namespace(&ns);
    let deadline = RedisStore::open(&url)
        .unwrap()
        .namespace(&fresh_namespace("holds-deadline"))
        .max_hold(Duration::from_millis(200));
    for store in [&forever, &deadline] {
        assert!(matches!(
            store.reserve(Arc::clone(&cells), 100).await.unwrap(),
            TokenDecision::Reserved { .. }
        ));
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Held for ever (10 min), nothing refills into it; past a 200 ms deadline, the hold
    // counts as spent and the bucket refills.
    assert!(matches!(
        forever.reserve(Arc::clone(&cells), 50).await.unwrap(),
        TokenDecision::Denied { .. }
    ));
    let TokenDecision::Reserved { hold } = deadline.reserve(Arc::clone(&cells), 50).await.unwrap()
    else {
        panic!("the expired hold no longer holds the bucket");
    };
    // A settle that arrives after its hold's deadline gives back only what was unused.
    deadline
        .settle(Arc::clone(&cells), hold, 50, 50)
        .await
        .unwrap();
}

#[tokio::test]
async fn keys_are_hashed_namespaced_and_expire() {
    let Some(url) = tollgate_testkit::redis::redis_url("keys_are_hashed_namespaced_and_expire")
    else {
        return;
    };
    let ns = fresh_namespace("keys");
    let store = RedisStore::open(&url).unwrap().namespace(&ns);
    let secret = Key::new("rpm:sk-live-very-secret");
    let cells: Arc<[RateCell]> = Arc::new([RateCell {
        key: secret.clone(),
        interval: Duration::from_secs(1),
        burst: 5,
    }]);
    assert_eq!(store.acquire(cells).await.unwrap(), RateDecision::Admitted);
    let key = tollgate_redis::key_for(&store, "rl", &secret);
    assert!(key.starts_with(&format!("{{{ns}}}:rl:")), "{key}");
    assert!(!key.contains("secret"), "{key}");
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        (1..=1001).contains(&ttl),
        "expires when its cell is back: {ttl} ms"
    );
}
