//! Learned limits on tokio's paused clock, against a scripted provider that keeps its own
//! bucket (600 a minute, ten at once) and says so in its headers, as OpenAI does.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use tokio::time::Instant;
use tollgate_ratelimit::{Limit, Quota, RateLimitLayer};
use tower::{service_fn, Layer, Service, ServiceExt};

/// The provider's bucket and what it saw.
struct Bucket {
    level: f64,
    last: Instant,
    /// When each request arrived, and whether it was refused.
    seen: Vec<(Duration, bool)>,
}

const LIMIT: f64 = 600.0;
const BURST: f64 = 10.0;
const RATE: f64 = LIMIT / 60.0;

/// One request through `svc`, which must succeed.
async fn one<S>(svc: &mut S)
where
    S: Service<Request<()>>,
    S::Error: std::fmt::Debug,
{
    svc.ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
}

/// A provider whose bucket holds `burst_size`, answering after `latency`, with or without
/// its `x-ratelimit-*` headers.
fn provider(
    latency: Duration,
    headers: bool,
    start: Instant,
    burst_size: f64,
) -> (
    Arc<Mutex<Bucket>>,
    impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static,
) {
    let bucket = Arc::new(Mutex::new(Bucket {
        level: burst_size,
        last: start,
        seen: Vec::new(),
    }));
    let b = Arc::clone(&bucket);
    let svc = service_fn(move |_: Request<()>| {
        let b = Arc::clone(&b);
        async move {
            let now = Instant::now();
            let res = {
                let mut b = b.lock().unwrap();
                b.level = (b.level + (now - b.last).as_secs_f64() * RATE).min(burst_size);
                b.last = now;
                let refused = b.level < 1.0;
                b.seen.push((now - start, refused));
                let mut res = Response::builder();
                if refused {
                    let wait = (1.0 - b.level) / RATE;
                    res = res
                        .status(429)
                        .header("retry-after-ms", format!("{}", (wait * 1000.0).ceil()));
                } else {
                    b.level -= 1.0;
                }
                if headers {
                    let reset = (burst_size - b.level) / RATE;
                    res = res
                        .header("x-ratelimit-limit-requests", "600")
                        .header(
                            "x-ratelimit-remaining-requests",
                            b.level.floor().to_string(),
                        )
                        .header(
                            "x-ratelimit-reset-requests",
                            format!("{}ms", (reset * 1000.0).round()),
                        );
                }
                res.body(()).unwrap()
            };
            tokio::time::sleep(latency).await;
            Ok::<_, Infallible>(res)
        }
    });
    (bucket, svc)
}

fn learning() -> RateLimitLayer {
    RateLimitLayer::builder()
        .limit(Limit::learned("backend"))
        .wait(Duration::from_secs(60))
        .build()
}

async fn burst<S>(svc: S, n: usize) -> Vec<u16>
where
    S: Service<Request<()>, Response = Response<()>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    let mut tasks = Vec::new();
    for _ in 0..n {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            svc.oneshot(Request::new(()))
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(start_paused = true)]
async fn one_request_goes_first_then_the_rest_at_the_learned_pace() {
    let start = Instant::now();
    let (bucket, provider) = provider(Duration::from_millis(50), true, start, BURST);
    let layer = learning();
    assert_eq!(layer.quota("backend"), None, "nothing known yet");
    let statuses = burst(layer.layer(provider), 40).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");

    let seen = std::mem::take(&mut bucket.lock().unwrap().seen);
    assert_eq!(
        seen.len(),
        40,
        "no request was refused, so none was sent twice"
    );
    assert!(seen.iter().all(|(_, refused)| !refused));
    // Slow start: the first alone, the rest only once its answer (at 50 ms) was in.
    assert_eq!(seen[0].0, Duration::ZERO);
    assert!(
        seen[1..]
            .iter()
            .all(|(t, _)| *t >= Duration::from_millis(50)),
        "{seen:?}"
    );
    // Then the bucket's nine, and one every 100 ms: the last of 40 at 50 ms + 30 × 100 ms
    // at best. Each answer's `remaining` was counted when the provider admitted it, 50 ms
    // before it arrives, so following it may cost a cell or two over the run.
    let last = seen.last().unwrap().0;
    assert!(
        last >= Duration::from_millis(3050) && last <= Duration::from_millis(3250),
        "paced to the provider's rate: {last:?}"
    );
    let q = layer.quota("backend").unwrap();
    assert_eq!(q.interval(), Duration::from_millis(100));
    assert_eq!(
        q.burst_size(),
        10,
        "the bucket's size, read from remaining and reset"
    );
}

#[tokio::test(start_paused = true)]
async fn a_provider_without_quota_headers_is_not_held_back() {
    let start = Instant::now();
    let (bucket, provider) = provider(Duration::from_millis(50), false, start, BURST);
    let layer = learning();
    burst(layer.layer(provider), 8).await;
    let seen = std::mem::take(&mut bucket.lock().unwrap().seen);
    // The first, then — no quota stated — all the others at once at 50 ms.
    assert_eq!(seen[0].0, Duration::ZERO);
    assert!(
        seen[1..]
            .iter()
            .all(|(t, _)| *t == Duration::from_millis(50)),
        "{seen:?}"
    );
    assert_eq!(layer.quota("backend"), None);
}

#[tokio::test(start_paused = true)]
async fn a_429s_hint_holds_every_request_back_until_it_passes() {
    let start = Instant::now();
    let (bucket, provider) = provider(Duration::ZERO, false, start, BURST);
    // Empty the provider's bucket, so the next request is refused with a hint.
    bucket.lock().unwrap().level = 0.0;
    let layer = learning();
    let mut svc = layer.layer(provider);
    let first = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    assert_eq!(first.status(), 429);
    let hinted = Duration::from_millis(100);
    let statuses = burst(svc, 3).await;
    assert!(statuses.contains(&200), "{statuses:?}");
    let seen = std::mem::take(&mut bucket.lock().unwrap().seen);
    assert!(
        seen[1..].iter().all(|(t, _)| *t >= hinted),
        "nobody went before the hint passed: {seen:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_configured_quota_is_an_upper_bound_and_a_stricter_provider_wins() {
    let start = Instant::now();
    let (bucket, provider) = provider(Duration::ZERO, true, start, BURST);
    let layer = RateLimitLayer::builder()
        .limit(Limit::new("backend", Quota::per_minute(6000)).learn())
        .wait(Duration::from_secs(60))
        .build();
    let mut svc = layer.layer(provider);
    // Configured: no slow start.
    one(&mut svc).await;
    let q = layer.quota("backend").unwrap();
    assert_eq!(
        q.interval(),
        Duration::from_millis(100),
        "the provider's slower rate"
    );
    assert_eq!(q.burst_size(), 10, "and its smaller bucket");
    let statuses = burst(svc, 30).await;
    assert!(statuses.iter().all(|&s| s == 200));
    assert!(bucket.lock().unwrap().seen.iter().all(|(_, r)| !r));

    // A provider more generous than the configuration never lifts it.
    let layer = RateLimitLayer::builder()
        .limit(Limit::new("backend", Quota::per_minute(60).burst(2)).learn())
        .wait(Duration::from_secs(60))
        .build();
    let (_, provider) = self::provider(Duration::ZERO, true, Instant::now(), BURST);
    let mut svc = layer.layer(provider);
    one(&mut svc).await;
    let q = layer.quota("backend").unwrap();
    assert_eq!((q.interval(), q.burst_size()), (Duration::from_secs(1), 2));
}

#[tokio::test(start_paused = true)]
async fn a_quota_adopted_late_keeps_its_pace_and_never_stalls() {
    // Idle for a minute, then a provider with a smaller bucket (4) than configured (10):
    // the limit adopts it mid-run. (A limiter built late once misread the state kept by
    // the first, relative to its own start, and held requests back for the idle time.)
    let layer = RateLimitLayer::builder()
        .limit(Limit::new("backend", Quota::per_minute(600).burst(10)).learn())
        .wait(Duration::from_secs(60))
        .build();
    tokio::time::advance(Duration::from_secs(60)).await;
    let start = Instant::now();
    let (bucket, provider) = provider(Duration::ZERO, true, start, 4.0);
    let svc = layer.layer(provider);
    let statuses = burst(svc, 24).await;
    assert_eq!(layer.quota("backend").unwrap().burst_size(), 4);
    let seen = std::mem::take(&mut bucket.lock().unwrap().seen);
    let refused = seen.iter().filter(|(_, r)| *r).count();
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    assert!(
        refused <= 6,
        "the first requests may meet the smaller bucket: {seen:?}"
    );
    let last = seen.last().unwrap().0;
    assert!(
        last <= Duration::from_secs(3),
        "24 requests at ten a second from a bucket of four take about two seconds: {last:?}"
    );
    assert_eq!(ok + refused, 24);
}

#[tokio::test(start_paused = true)]
async fn an_error_without_quota_headers_does_not_end_slow_start() {
    let start = Instant::now();
    let (bucket, provider) = provider(Duration::from_millis(50), true, start, BURST);
    // The very first answer is a bare 500, as an error page may be.
    let failed_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flaky = service_fn(move |req: Request<()>| {
        let (provider, failed_once) = (provider.clone(), Arc::clone(&failed_once));
        async move {
            if !failed_once.swap(true, std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Ok::<_, Infallible>(Response::builder().status(500).body(()).unwrap());
            }
            provider.oneshot(req).await
        }
    });
    let layer = learning();
    let statuses = burst(layer.layer(flaky), 12).await;
    assert_eq!(statuses.iter().filter(|&&s| s == 500).count(), 1);
    let seen = std::mem::take(&mut bucket.lock().unwrap().seen);
    // The second request is slow start's next probe, sent when the 500 came back; the
    // rest only once its answer stated the quota, never all at once after the error.
    assert_eq!(seen[0].0, Duration::from_millis(50), "{seen:?}");
    assert!(
        seen[1..]
            .iter()
            .all(|(t, _)| *t >= Duration::from_millis(100)),
        "{seen:?}"
    );
    assert!(seen.iter().all(|(_, refused)| !refused), "{seen:?}");
    assert_eq!(layer.quota("backend").unwrap().burst_size(), 10);
}
