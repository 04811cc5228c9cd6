//! Balancing one model over two keys of their own quota, against simulated providers over
//! real sockets, on a paused clock.

use std::time::Duration;

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tollgate_core::facts::ReplayBody;
use tollgate_failover::{Backend, Failover, Strategy, X_TOLLGATE_BACKEND};
use tollgate_ratelimit::{Limit, Quota, RateLimitLayer};
use tollgate_testkit::Provider;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, Layer, ServiceExt};

type BoxError = tollgate_core::BoxError;
type Svc = BoxCloneSyncService<Request<ReplayBody>, Response<Incoming>, BoxError>;

/// A key: the client to its provider behind its own limiter of its quota.
fn key(provider: &Provider, limiter: &RateLimitLayer) -> Svc {
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody>();
    let base = provider.url();
    let http = service_fn(move |mut req: Request<ReplayBody>| {
        let client = client.clone();
        let uri = format!("{base}{}", req.uri().path());
        async move {
            *req.uri_mut() = uri.parse()?;
            Ok::<_, BoxError>(client.request(req).await?)
        }
    });
    BoxCloneSyncService::new(limiter.layer(http))
}

/// Two keys, each its client to its provider behind its limiter, read for its room.
fn two_keys(
    providers: &[Provider; 2],
    limiters: &[RateLimitLayer; 2],
) -> tollgate_failover::FailoverBuilder<Svc> {
    Failover::builder()
        .backend(Backend::new("k1", key(&providers[0], &limiters[0])).capacity(limiters[0].clone()))
        .backend(Backend::new("k2", key(&providers[1], &limiters[1])).capacity(limiters[1].clone()))
}

type Plain = BoxCloneSyncService<Request<ReplayBody>, Response<Full<Bytes>>, BoxError>;

/// A backend that answers at once.
fn plain() -> Plain {
    BoxCloneSyncService::new(service_fn(|_: Request<ReplayBody>| async {
        Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(b"{}"))))
    }))
}

fn limiter(name: &str) -> RateLimitLayer {
    RateLimitLayer::builder()
        .limit(Limit::new(name.to_owned(), Quota::per_minute(60)))
        .wait(Duration::from_secs(300))
        .build()
}

fn chat(i: usize) -> Request<Full<Bytes>> {
    let body = format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{i}"}}]}}"#);
    Request::post("/v1/chat/completions")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// 240 requests at once over two keys of 60 a minute (each a whole minute's burst):
/// (answers per key, provider 429s, makespan).
async fn burst(strategy: Strategy) -> ([usize; 2], u64, Duration) {
    let providers = [
        Provider::builder().rpm(60).spawn().await.unwrap(),
        Provider::builder().rpm(60).spawn().await.unwrap(),
    ];
    let limiters = [limiter("k1"), limiter("k2")];
    let failover = Failover::builder()
        .strategy(strategy)
        .backend(
            Backend::new("k1", key(&providers[0], &limiters[0]))
                .header(AUTHORIZATION, HeaderValue::from_static("Bearer sk-1"))
                .capacity(limiters[0].clone()),
        )
        .backend(
            Backend::new("k2", key(&providers[1], &limiters[1]))
                .header(AUTHORIZATION, HeaderValue::from_static("Bearer sk-2"))
                .capacity(limiters[1].clone()),
        )
        .build();
    let start = Instant::now();
    let answers = futures_util::future::join_all((0..240).map(|i| {
        let f = failover.clone();
        async move {
            let res = f.oneshot(chat(i)).await.unwrap();
            assert_eq!(res.status(), 200);
            let who = res.headers()[X_TOLLGATE_BACKEND]
                .to_str()
                .unwrap()
                .to_owned();
            res.into_body().collect().await.unwrap();
            who
        }
    }))
    .await;
    let makespan = Instant::now() - start;
    let per = [
        answers.iter().filter(|w| *w == "k1").count(),
        answers.iter().filter(|w| *w == "k2").count(),
    ];
    let provider_429 = providers.iter().map(|p| p.stats().rate_limited).sum();
    (per, provider_429, makespan)
}

#[tokio::test(start_paused = true)]
async fn two_keys_of_60_a_minute_serve_120_a_minute_with_no_429_and_neither_idle() {
    let (per, provider_429, makespan) = burst(Strategy::Balanced).await;
    eprintln!("balanced: {per:?} {provider_429} {makespan:?}");
    assert_eq!(provider_429, 0);
    assert!(
        per[0].abs_diff(per[1]) <= 4,
        "each key took its share: {per:?}"
    );
    // The floor: 120 at once (both bursts), then two a second: 60 s for the other 120.
    assert!(
        makespan <= Duration::from_secs(63),
        "within 5% of the two quotas' floor: {makespan:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn in_order_the_second_key_sits_idle_while_the_first_makes_requests_wait() {
    let (per, provider_429, makespan) = burst(Strategy::Ordered).await;
    eprintln!("ordered: {per:?} {provider_429} {makespan:?}");
    assert_eq!(provider_429, 0);
    assert!(
        makespan > Duration::from_secs(100),
        "the first key's queue, not both quotas: {makespan:?} {per:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_key_that_starts_answering_429_gets_less_traffic_at_once() {
    // k2's provider allows half what its limiter was told: a burst past its 30 is
    // answered 429, and it keeps answering 429 past its own pace.
    let providers = [
        Provider::builder().rpm(60).spawn().await.unwrap(),
        Provider::builder().rpm(30).spawn().await.unwrap(),
    ];
    let limiters = [limiter("k1"), limiter("k2")];
    let failover = two_keys(&providers, &limiters)
        .strategy(Strategy::Balanced)
        .build();
    let start = Instant::now();
    let answers = futures_util::future::join_all((0..180).map(|i| {
        let f = failover.clone();
        async move {
            let res = f.oneshot(chat(i)).await.unwrap();
            assert_eq!(res.status(), 200, "a 429 moves the request on");
            let who = res.headers()[X_TOLLGATE_BACKEND]
                .to_str()
                .unwrap()
                .to_owned();
            res.into_body().collect().await.unwrap();
            (who, Instant::now() - start)
        }
    }))
    .await;
    let makespan = Instant::now() - start;
    let k2 = answers.iter().filter(|(w, _)| w == "k2").count();
    let provider_429: u64 = providers.iter().map(|p| p.stats().rate_limited).sum();
    eprintln!("k2 served {k2} of 180 in {makespan:?}; provider 429s {provider_429}");
    // Each 429 moved its request on to k1 (every answer was a 200, above) and set k2
    // aside: it serves its burst, then no more than its provider's own pace. (The 429s
    // themselves are the requests in flight to k2 when its quota ran out, and one
    // half-open trial per cooldown: about 45 here.)
    // Its burst, then no more than its provider's own pace.
    let bound = 30 + (makespan.as_secs_f64() / 2.0) as usize + 2;
    assert!(k2 <= bound, "k2 served {k2}, its provider allows {bound}");
}

#[tokio::test(start_paused = true)]
async fn weights_three_to_one_split_a_thousand_requests_75_25() {
    let failover = Failover::builder()
        .strategy(Strategy::Weighted)
        .backend(Backend::new("old", plain()).weight(3))
        .backend(Backend::new("new", plain()).weight(1))
        .build();
    let mut old = 0;
    for i in 0..1000 {
        let res = failover.clone().oneshot(chat(i)).await.unwrap();
        old += usize::from(res.headers()[X_TOLLGATE_BACKEND] == "old");
    }
    assert!((720..=780).contains(&old), "old took {old} of 1000");
}

/// The stack a policy file with two backends builds, each sent to its own provider of
/// 60 a minute.
async fn policy_stack(yaml: &str) -> (tollgate::policy::PolicyService<Full<Bytes>>, [Provider; 2]) {
    use hyper_util::client::legacy::connect::HttpConnector;
    use tollgate::policy::{BoxBody, Policy};
    let providers = [
        Provider::builder().rpm(60).spawn().await.unwrap(),
        Provider::builder().rpm(60).spawn().await.unwrap(),
    ];
    let mut policy = Policy::from_yaml(yaml).unwrap();
    policy.primary.url = providers[0].url();
    policy.fallbacks[0].url = providers[1].url();
    let client: Client<HttpConnector, BoxBody> = Client::builder(TokioExecutor::new()).build_http();
    (policy.build(client).unwrap(), providers)
}

/// The same from a policy file: `strategy: balanced` over a primary and a fallback, each
/// with its own key and the same quota; and a `backends:` group, balanced by default.
async fn policy_burst(yaml: &str) {
    let (stack, providers) = policy_stack(yaml).await;
    let start = Instant::now();
    let answers = futures_util::future::join_all((0..240).map(|i| {
        let s = stack.clone();
        async move {
            let res = s.oneshot(chat(i)).await.unwrap();
            assert_eq!(res.status(), 200);
            let who = res.headers()[X_TOLLGATE_BACKEND]
                .to_str()
                .unwrap()
                .to_owned();
            res.into_body().collect().await.unwrap();
            who
        }
    }))
    .await;
    let makespan = Instant::now() - start;
    let second = answers.iter().filter(|w| *w == "second").count();
    let provider_429: u64 = providers.iter().map(|p| p.stats().rate_limited).sum();
    eprintln!(
        "policy balanced: second {second} of 240 in {makespan:?}, provider 429s {provider_429}"
    );
    assert_eq!(provider_429, 0);
    assert!((116..=124).contains(&second), "{second}");
    assert!(makespan <= Duration::from_secs(63), "{makespan:?}");
}

#[tokio::test(start_paused = true)]
async fn a_policy_with_strategy_balanced_spreads_a_burst_over_both_keys() {
    policy_burst(
        r#"
primary:   { url: "http://placeholder", headers: { authorization: "Bearer sk-1" } }
fallbacks: [ { name: second, url: "http://placeholder", headers: { authorization: "Bearer sk-2" } } ]
rate_limit: { requests: 60/min, mode: wait, max_wait: 5m, learn: false }
failover:  { strategy: balanced }
"#,
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_policy_with_a_backends_group_balances_it_without_saying_so() {
    policy_burst(
        r#"
backends:
  - { name: first,  url: "http://placeholder", headers: { authorization: "Bearer sk-1" } }
  - { name: second, url: "http://placeholder", headers: { authorization: "Bearer sk-2" } }
rate_limit: { requests: 60/min, mode: wait, max_wait: 5m, learn: false }
"#,
    )
    .await;
}

/// `failover.sticky` in the policy file: each tenant on one backend while it has room,
/// and the tenants spread over both.
#[tokio::test(start_paused = true)]
async fn a_policy_with_sticky_tenants_keeps_each_on_one_backend() {
    let (stack, _providers) = policy_stack(
        r#"
backends:
  - { name: first,  url: "http://placeholder", headers: { authorization: "Bearer sk-1" } }
  - { name: second, url: "http://placeholder", headers: { authorization: "Bearer sk-2" } }
rate_limit: { requests: 60/min, mode: wait, max_wait: 5m, learn: false }
failover: { sticky: "header:x-tenant-id" }
"#,
    )
    .await;
    let mut homes = std::collections::BTreeMap::<String, Vec<String>>::new();
    for tenant in ["t1", "t2", "t3", "t4", "t5", "t6"] {
        for i in 0..8 {
            let mut req = chat(i);
            req.headers_mut()
                .insert("x-tenant-id", HeaderValue::from_static(tenant));
            let res = stack.clone().oneshot(req).await.unwrap();
            let who = res.headers()[X_TOLLGATE_BACKEND]
                .to_str()
                .unwrap()
                .to_owned();
            res.into_body().collect().await.unwrap();
            homes.entry(tenant.to_owned()).or_default().push(who);
        }
    }
    for (tenant, seen) in &homes {
        assert!(seen.iter().all(|w| *w == seen[0]), "{tenant}: {seen:?}");
    }
    let firsts: std::collections::BTreeSet<_> = homes.values().map(|s| s[0].clone()).collect();
    assert_eq!(firsts.len(), 2, "six tenants over both backends: {homes:?}");
}

#[tokio::test(start_paused = true)]
async fn a_sticky_tenant_stays_on_one_key_while_it_has_quota_then_spills_over() {
    use tollgate_core::key::Header;
    let providers = [
        Provider::builder().rpm(60).spawn().await.unwrap(),
        Provider::builder().rpm(60).spawn().await.unwrap(),
    ];
    let limiters = [limiter("k1"), limiter("k2")];
    let failover = two_keys(&providers, &limiters)
        .strategy(Strategy::Balanced)
        .sticky(Header::new("x-tenant-id"))
        .build();
    let send = |n: usize| {
        let f = failover.clone();
        futures_util::future::join_all((0..n).map(move |i| {
            let f = f.clone();
            async move {
                let mut req = chat(i);
                req.headers_mut()
                    .insert("x-tenant-id", HeaderValue::from_static("acme"));
                let res = f.oneshot(req).await.unwrap();
                let who = res.headers()[X_TOLLGATE_BACKEND]
                    .to_str()
                    .unwrap()
                    .to_owned();
                res.into_body().collect().await.unwrap();
                who
            }
        }))
    };
    // 50 fit in one key's minute: all on one key (its provider's prompt cache stays warm).
    let first = send(50).await;
    assert!(first.iter().all(|w| *w == first[0]), "{first:?}");
    // 40 more pass that key's quota: the rest spill to the other key rather than wait.
    let more = send(40).await;
    let home = more.iter().filter(|w| **w == first[0]).count();
    assert!(
        (8..=12).contains(&home),
        "{home} of 40 stayed home: {more:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_fallback_model_is_not_balanced_with_the_group_but_tried_after_it() {
    let failover = Failover::builder()
        .strategy(Strategy::Balanced)
        .backend(Backend::new("key-a", plain()))
        .backend(Backend::new("key-b", plain()).priority(1))
        .backend(
            Backend::new("smaller", plain())
                .model("gpt-4o-mini")
                .priority(2),
        )
        .build();
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for i in 0..200 {
        let res = failover.clone().oneshot(chat(i)).await.unwrap();
        let who = res.headers()[X_TOLLGATE_BACKEND]
            .to_str()
            .unwrap()
            .to_owned();
        *seen.entry(who).or_default() += 1;
    }
    assert_eq!(seen.get("smaller"), None, "{seen:?}");
    assert!(seen["key-a"] > 60 && seen["key-b"] > 60, "{seen:?}");
}

/// With the keys' quotas in Redis (shared by every instance), the balancer reads what
/// the store last answered: a key another instance drained is passed over at once,
/// without asking the store again for each request. Real time (Redis keeps its own
/// clock), bounded: about a second.
#[tokio::test]
async fn with_quotas_in_redis_a_key_another_instance_drained_is_passed_over() {
    use tollgate::redis::RedisStore;
    use tollgate_core::store::OnStoreFailure;
    let Some(url) = tollgate_testkit::redis::redis_url("balancing over Redis") else {
        return;
    };
    let ns = format!("test:balance:{}:{:x}", std::process::id(), fastrand_ns());
    let store = || {
        RedisStore::open(&url)
            .unwrap()
            .namespace(&ns)
            .timeout(Duration::from_secs(2))
    };
    let shared_limit = |name: &str| {
        RateLimitLayer::builder()
            .limit(Limit::new(name.to_owned(), Quota::per_minute(60).burst(5)))
            .wait(Duration::from_secs(5))
            .store(store(), OnStoreFailure::Closed)
            .build()
    };
    // Another instance takes k1's whole burst.
    let other = shared_limit("k1").layer(service_fn(|_: Request<()>| async {
        Ok::<_, BoxError>(Response::new(()))
    }));
    for _ in 0..5 {
        other.clone().oneshot(Request::new(())).await.unwrap();
    }
    let providers = [
        Provider::builder().spawn().await.unwrap(),
        Provider::builder().spawn().await.unwrap(),
    ];
    let limiters = [shared_limit("k1"), {
        RateLimitLayer::builder()
            .limit(Limit::new("k2", Quota::per_minute(6000)))
            .store(store(), OnStoreFailure::Closed)
            .build()
    }];
    let failover = two_keys(&providers, &limiters)
        .strategy(Strategy::Balanced)
        .build();
    let mut k2 = 0;
    for i in 0..20 {
        let res = failover.clone().oneshot(chat(i)).await.unwrap();
        k2 += usize::from(res.headers()[X_TOLLGATE_BACKEND] == "k2");
        res.into_body().collect().await.unwrap();
    }
    // At most the first request that went to k1 learned it was empty (and waited for
    // its next cell); every one after went to k2 while the store's "not until" held.
    assert!(k2 >= 18, "k2 served {k2} of 20");
}

fn fastrand_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
