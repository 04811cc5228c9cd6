//! Scenario `ratelimit`: the per-request cost of `RateLimitLayer` on the admit path, in
//! process, against governor's keyed `check_key` called directly.

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use http::{Request, Response};
use tollgate_core::key::Header;
use tollgate_ratelimit::{Limit, Quota, RateLimitLayer};
use tower::{service_fn, Layer, Service};

use crate::report;
use crate::Args;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Nanoseconds per request through `svc`, with `keys` distinct tenants in rotation. The
/// requests are built before the clock starts; dropping them (in the inner service) is
/// inside the timed loop, as it is in real use.
fn per_request_ns<S>(mut svc: S, keys: usize, total: usize) -> f64
where
    S: Service<Request<()>>,
{
    let names: Vec<String> = (0..keys).map(|i| format!("tenant-{i}")).collect();
    let mut cx = Context::from_waker(Waker::noop());
    let batch = 1_000;
    let mut elapsed = Duration::ZERO;
    let mut done = 0;
    while done < total {
        let reqs: Vec<Request<()>> = (0..batch)
            .map(|i| {
                Request::get("/v1/chat/completions")
                    .header("x-tenant-id", names[(done + i) % keys].as_str())
                    .body(())
                    .unwrap_or_default()
            })
            .collect();
        let start = Instant::now();
        for req in reqs {
            let _ = svc.poll_ready(&mut cx);
            let mut fut = std::pin::pin!(svc.call(req));
            if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
                let _ = black_box(r);
            }
        }
        elapsed += start.elapsed();
        done += batch;
    }
    elapsed.as_nanos() as f64 / done as f64
}

fn noop() -> impl Service<Request<()>, Response = Response<()>, Error = Infallible> + Clone {
    service_fn(|_: Request<()>| std::future::ready(Ok::<_, Infallible>(Response::new(()))))
}

/// The layer's own cost per request: through the layer to a no-op service, less the
/// same requests sent to the no-op service directly. Returns (layer, direct).
fn layer_ns(keys: usize, total: usize) -> (f64, f64) {
    let layer = RateLimitLayer::builder()
        .limit(
            Limit::new("tenant", Quota::per_second(u32::MAX)).keyed_by(Header::new("x-tenant-id")),
        )
        .housekeeping(None)
        .build();
    // Alternate the two over several rounds and take medians: the machine's noise (other
    // processes, the allocator's state) then lands on both sides alike.
    let rounds = 9;
    let (mut through, mut direct) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        through.push(per_request_ns(layer.layer(noop()), keys, total / rounds));
        direct.push(per_request_ns(noop(), keys, total / rounds));
    }
    let (t, d) = (median(&mut through), median(&mut direct));
    ((t - d).max(0.0), d)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Nanoseconds per `check_key` on governor's default keyed limiter, keys prebuilt.
fn governor_ns(keys: usize, total: usize) -> f64 {
    let quota = governor::Quota::per_second(NonZeroU32::MAX);
    let limiter = governor::RateLimiter::keyed(quota);
    let names: Vec<String> = (0..keys).map(|i| format!("tenant:tenant-{i}")).collect();
    let rounds = 9;
    let mut runs = Vec::new();
    for _ in 0..rounds {
        let n = total / rounds;
        let start = Instant::now();
        for i in 0..n {
            let _ = black_box(limiter.check_key(&names[i % keys]));
        }
        runs.push(start.elapsed().as_nanos() as f64 / n as f64);
    }
    median(&mut runs)
}

pub(crate) fn run(args: &Args) -> Result<(), BoxError> {
    let total = args
        .requests
        .map_or(if args.quick { 1_000_000 } else { 5_000_000 }, |n| {
            n as usize
        });
    let mut rows = Vec::new();
    let mut worst = (0.0f64, 0.0f64, 0.0f64);
    for keys in [1usize, 10_000] {
        // Warm up both (allocator, map growth), then measure.
        let _ = (layer_ns(keys, total / 10), governor_ns(keys, total / 10));
        let (l, direct) = layer_ns(keys, total);
        let g = governor_ns(keys, total);
        let ratio = l / g;
        rows.push((keys, l, g, ratio, direct));
        if ratio > worst.2 {
            worst = (l, g, ratio);
        }
    }
    let table: Vec<(String, String)> = rows
        .iter()
        .map(|(k, l, g, r, d)| {
            (
                format!("{k} key{}", if *k == 1 { "" } else { "s" }),
                format!(
                    "layer {l:6.1} ns   governor check_key {g:6.1} ns   ratio {r:.2}   (request to a no-op service without the layer: {d:.1} ns)"
                ),
            )
        })
        .collect();
    let table: Vec<(&str, String)> = table.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    report::table(
        &format!("ratelimit: admit path in process, {total} requests per figure (refuse mode, one limit keyed by tenant header)"),
        &table,
    );
    let (l, g, r) = worst;
    let mut pairs = vec![
        ("layer_ns", format!("{l:.1}")),
        ("governor_ns", format!("{g:.1}")),
        ("ratio", format!("{r:.2}")),
    ];
    for (k, l, g, r, _) in &rows {
        pairs.push((
            if *k == 1 {
                "layer_ns_1key"
            } else {
                "layer_ns_10k"
            },
            format!("{l:.1}"),
        ));
        pairs.push((
            if *k == 1 {
                "governor_ns_1key"
            } else {
                "governor_ns_10k"
            },
            format!("{g:.1}"),
        ));
        pairs.push((
            if *k == 1 { "ratio_1key" } else { "ratio_10k" },
            format!("{r:.2}"),
        ));
    }
    report::result_line("ratelimit", &pairs);
    Ok(())
}
