//! Redis killed in the middle of a run and started again, on a server of the test's own:
//! failing closed refuses, failing open holds to this instance's share, and both go back
//! to Redis by themselves within a second of its return.
//!
//! Needs `redis-server` on the PATH; skips with a message without it, unless
//! `TOLLGATE_REQUIRE_REDIS=1`.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::{Request, Response};
use tollgate_core::key::Header;
use tollgate_core::store::{OnStoreFailure, StoreError};
use tollgate_ratelimit::{Limit, Quota, RateLimitLayer};
use tollgate_redis::RedisStore;
use tower::{service_fn, Layer, ServiceExt};

/// A redis-server of this test's own, on a free port; killed when dropped.
struct Server {
    child: Option<Child>,
    port: u16,
}

impl Server {
    fn start(test: &str) -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let mut s = Self { child: None, port };
        if let Err(e) = s.restart() {
            if tollgate_testkit::redis::redis_required() {
                panic!("{test}: TOLLGATE_REQUIRE_REDIS=1 but redis-server cannot start: {e}");
            }
            eprintln!("skipping {test}: redis-server cannot start: {e}");
            return None;
        }
        Some(s)
    }

    fn restart(&mut self) -> Result<(), String> {
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        self.child = Some(child);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if start.elapsed() > Duration::from_secs(5) {
                return Err("it did not listen within 5 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

type Svc = tollgate_ratelimit::RateLimit<
    tower::util::ServiceFn<
        fn(Request<()>) -> std::future::Ready<Result<Response<()>, std::convert::Infallible>>,
    >,
>;

fn service(url: &str, on_failure: OnStoreFailure) -> Svc {
    fn ok(_: Request<()>) -> std::future::Ready<Result<Response<()>, std::convert::Infallible>> {
        std::future::ready(Ok(Response::new(())))
    }
    let store = RedisStore::open(url)
        .unwrap()
        .timeout(Duration::from_millis(100));
    RateLimitLayer::builder()
        .limit(Limit::new("tenant", Quota::per_minute(40)).keyed_by(Header::new("x-tenant-id")))
        .store(store, on_failure)
        .build()
        .layer(service_fn(ok as fn(_) -> _))
}

async fn send(svc: &Svc) -> Result<(), tollgate_core::BoxError> {
    let req = Request::get("/")
        .header("x-tenant-id", "acme")
        .body(())
        .unwrap();
    svc.clone().oneshot(req).await.map(|_| ())
}

/// Sends until one passes; how long it took.
async fn until_ok(svc: &Svc, limit: Duration) -> Duration {
    let start = Instant::now();
    while send(svc).await.is_err() {
        assert!(start.elapsed() < limit, "not back within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

/// Redis was restarted: requests pass again within about a second (the recovery probe
/// asks half a second after the last failure).
async fn back_within_a_second(svc: &Svc) {
    let took = until_ok(svc, Duration::from_secs(3)).await;
    assert!(
        took <= Duration::from_millis(1200),
        "back within about a second: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_closed_refuses_while_redis_is_away_and_recovers() {
    let Some(mut server) = Server::start("failing_closed_refuses_while_redis_is_away_and_recovers")
    else {
        return;
    };
    let svc = service(&server.url(), OnStoreFailure::Closed);
    for _ in 0..5 {
        send(&svc).await.unwrap();
    }
    server.kill();
    for _ in 0..20 {
        let err = send(&svc).await.unwrap_err();
        assert!(
            err.downcast_ref::<StoreError>().is_some(),
            "refused with the store's error: {err}"
        );
    }
    server.restart().unwrap();
    back_within_a_second(&svc).await;
    // Redis kept nothing: the quota starts again, and Redis counts it.
    for _ in 0..39 {
        send(&svc).await.unwrap();
    }
    assert!(
        send(&svc).await.is_err(),
        "the 41st in the minute is refused by Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_open_holds_to_the_local_share_and_recovers() {
    let Some(mut server) = Server::start("failing_open_holds_to_the_local_share_and_recovers")
    else {
        return;
    };
    let svc = service(&server.url(), OnStoreFailure::Open { instances: 4 });
    send(&svc).await.unwrap();
    server.kill();
    // Without Redis: this instance's share, 40 ÷ 4 = 10 at once, never the whole quota.
    let mut passed = 0;
    for _ in 0..30 {
        passed += usize::from(send(&svc).await.is_ok());
    }
    assert_eq!(passed, 10);
    server.restart().unwrap();
    back_within_a_second(&svc).await;
    // Back on Redis, which starts afresh: the whole quota again.
    for _ in 0..39 {
        send(&svc).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_fail_closed_or_open_and_come_back() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tollgate_tpm::{Budget, TokenQuota, TpmLayer};

    let Some(mut server) = Server::start("budgets_fail_closed_or_open_and_come_back") else {
        return;
    };
    // Answers every request as having used 100 tokens.
    let provider = service_fn(|_: Request<tollgate_core::facts::ReplayBody>| async {
        let body = r#"{"choices":[],"usage":{"prompt_tokens":50,"completion_tokens":50,"total_tokens":100}}"#;
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
            body.as_bytes(),
        ))))
    });
    let layer = |on_failure| {
        let store = RedisStore::open(&server.url())
            .unwrap()
            .timeout(Duration::from_millis(100));
        TpmLayer::builder()
            .budget(Budget::new("tpm", TokenQuota::per_minute(4_000)))
            .store(store, on_failure)
            .build()
    };
    let closed = layer(OnStoreFailure::Closed).layer(provider);
    let open = layer(OnStoreFailure::Open { instances: 4 }).layer(provider);
    let chat = || {
        Request::post("/v1/chat/completions")
            .body(Full::new(Bytes::from_static(
                br#"{"model":"gpt-4o","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#,
            )))
            .unwrap()
    };
    closed
        .clone()
        .oneshot(chat())
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();

    server.kill();
    let err = closed.clone().oneshot(chat()).await.unwrap_err();
    assert!(err.downcast_ref::<StoreError>().is_some(), "{err}");
    // Open: a quarter of 4,000 tokens, about 110 reserved each: nine pass, not 36.
    let mut passed = 0;
    for _ in 0..20 {
        if let Ok(res) = open.clone().oneshot(chat()).await {
            res.into_body().collect().await.unwrap();
            passed += 1;
        }
    }
    assert!(
        (8..=10).contains(&passed),
        "{passed} passed on this instance's share"
    );

    server.restart().unwrap();
    let start = Instant::now();
    loop {
        if let Ok(res) = closed.clone().oneshot(chat()).await {
            res.into_body().collect().await.unwrap();
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "not back within 3 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        start.elapsed() <= Duration::from_millis(1200),
        "back within about a second: {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_without_redis_misses_quickly_and_finds_its_entries_after() {
    use std::sync::Arc;
    use tollgate_core::store::{CacheKey, CacheStore, Stored};

    let Some(mut server) =
        Server::start("a_cache_without_redis_misses_quickly_and_finds_its_entries_after")
    else {
        return;
    };
    let store = RedisStore::open(&server.url())
        .unwrap()
        .timeout(Duration::from_millis(100));
    let value = Arc::new(Stored {
        status: http::StatusCode::OK,
        headers: http::HeaderMap::new(),
        frames: vec![bytes::Bytes::from_static(b"{}")],
        stream: false,
    });
    let key = CacheKey([7; 32]);
    store
        .put(key, Arc::clone(&value), Duration::from_secs(60))
        .await;
    assert!(store.get(&key).await.is_some());
    server.kill();
    let t = Instant::now();
    assert!(store.get(&key).await.is_none(), "a miss, not an error");
    store.put(key, value, Duration::from_secs(60)).await;
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "bounded by the timeout: {:?}",
        t.elapsed()
    );
    server.restart().unwrap();
    // Redis kept nothing; a new entry is stored and found again.
    let start = Instant::now();
    while store.get(&key).await.is_none() && start.elapsed() < Duration::from_secs(3) {
        store
            .put(
                key,
                Arc::new(Stored {
                    status: http::StatusCode::OK,
                    headers: http::HeaderMap::new(),
                    frames: vec![],
                    stream: false,
                }),
                Duration::from_secs(60),
            )
            .await;
    }
    assert!(store.get(&key).await.is_some(), "Redis is used again");
}
