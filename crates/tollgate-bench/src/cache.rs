//! Scenario `cache`: what a hit costs, what the cache adds to a miss, and how many
//! provider calls a workload with repeated questions saves.

use std::convert::Infallible;
use std::task::{Context, Waker};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_cache::CacheLayer;
use tollgate_core::facts::ReplayBody;
use tollgate_testkit::Provider;
use tower::{service_fn, Layer, Service, ServiceExt};

use crate::report;
use crate::Args;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The no-op provider's answer future.
type Answer = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;

const ANSWER: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"GCRA is a rate-limiting algorithm."},"finish_reason":"stop"}],"usage":{"prompt_tokens":20,"completion_tokens":8,"total_tokens":28}}"#;

fn noop() -> impl Service<
    Request<ReplayBody>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = Answer,
> + Clone {
    service_fn(|_: Request<ReplayBody>| {
        std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(ANSWER)))))
    })
}

/// A chat request whose user message is about `bytes` long; `n` makes it unique.
fn question(bytes: usize, n: u64) -> Bytes {
    let filler: String = (0..bytes / 6)
        .map(|i| format!("w{} ", (i as u64 * 31 + n) % 1000))
        .collect();
    Bytes::from(format!(
        r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{n} {filler}"}}]}}"#
    ))
}

use crate::load::{drain, ready};

/// Microseconds per request through `svc`, for the bodies `body(i)`; requests built
/// before the clock starts.
fn per_request_us<S, B>(mut svc: S, n: u64, body: impl Fn(u64) -> Bytes) -> f64
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let reqs: Vec<_> = (0..n)
        .map(|i| {
            Request::post("/v1/chat/completions")
                .header("x-tenant-id", "bench")
                .body(Full::new(body(i)))
                .unwrap_or_default()
        })
        .collect();
    let mut cx = Context::from_waker(Waker::noop());
    let start = Instant::now();
    for req in reqs {
        let _ = svc.poll_ready(&mut cx);
        if let Some(Ok(res)) = ready(svc.call(req)) {
            drain(res.into_body());
        }
    }
    start.elapsed().as_secs_f64() * 1e6 / n as f64
}

pub(crate) async fn run(args: &Args) -> Result<(), BoxError> {
    let n = if args.quick { 2_000 } else { 20_000 };

    // Hits: the same question again and again (stored by the first).
    let hit_1k = {
        let q = question(1024, 0);
        per_request_us(CacheLayer::new().layer(noop()), n, move |_| q.clone())
    };
    let hit_100k = {
        let q = question(100 * 1024, 0);
        per_request_us(CacheLayer::new().layer(noop()), n / 10, move |_| q.clone())
    };
    // Misses: every question new, through the cache and straight to the provider.
    let miss = per_request_us(CacheLayer::new().layer(noop()), n, |i| {
        question(1024, i + 1)
    });
    let direct = per_request_us(noop_full(), n, |i| question(1024, i + 1));
    let miss_overhead = (miss - direct).max(0.0);

    // Calls saved: half the questions repeat an earlier one, against the simulated provider.
    let provider = Provider::builder().spawn().await?;
    let url = format!("{}/v1/chat/completions", provider.url());
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let svc = CacheLayer::new().layer(client);
    let total: u64 = if args.quick { 200 } else { 1000 };
    let mut rng = Lcg(7);
    for i in 0..total {
        // Even requests ask something new; odd ones repeat a question already asked.
        let q = if i % 2 == 0 {
            i
        } else {
            rng.next() % (i / 2 * 2 + 1) / 2 * 2
        };
        let req = Request::post(url.as_str())
            .header("x-tenant-id", "bench")
            .header("content-type", "application/json")
            .body(Full::new(question(200, q)))?;
        let res = svc.clone().oneshot(req).await?;
        res.into_body().collect().await?;
    }
    let calls = provider.stats().requests;
    provider.shutdown().await;
    let saved = total - calls;

    report::table(
        "cache: in process over a no-op provider, then against the simulated provider",
        &[
            ("hit, 1 KB request", format!("{hit_1k:8.2} µs (buffer, parse, hash, look up, replay)")),
            ("hit, 100 KB request", format!("{hit_100k:8.2} µs")),
            ("miss overhead", format!("{miss_overhead:8.2} µs over the same requests without the cache ({direct:.2} µs)")),
            ("50% repeated questions", format!("{total} requests, {calls} reached the provider, {saved} calls saved ({:.0}%)", saved as f64 * 100.0 / total as f64)),
        ],
    );
    report::result_line(
        "cache",
        &[
            ("hit_us_1k", format!("{hit_1k:.2}")),
            ("hit_us_100k", format!("{hit_100k:.2}")),
            ("miss_overhead_us", format!("{miss_overhead:.2}")),
            ("calls_saved", saved.to_string()),
        ],
    );
    Ok(())
}

/// The no-op provider, taking the caller's body type directly (the baseline for misses).
fn noop_full() -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = Answer,
> + Clone {
    service_fn(|_: Request<Full<Bytes>>| {
        std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(ANSWER)))))
    })
}

/// A tiny deterministic generator, so the workload is the same on every run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}
