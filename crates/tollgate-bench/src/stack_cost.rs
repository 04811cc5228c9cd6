//! Scenario `stack-cost`: what the whole policy stack costs one request in process, with
//! no sockets — every layer (cache, failover, retry, rate limit, token budget; in-memory
//! stores; every request a cache miss) over a client that answers at once. One request at
//! a time, so the figure is work, not contention: nanoseconds per request, and — built
//! with `--features count-allocs` — allocations and bytes allocated per request.
//!
//! Under `valgrind --tool=callgrind` the same scenario gives instructions per request, a
//! figure this machine's noise does not move: run it with two request counts and divide
//! the difference of the totals by the difference of the counts.

use std::convert::Infallible;
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tollgate::policy::{BoxBody, Policy};
use tower::ServiceExt;

use crate::report;
use crate::Args;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// The `overhead` scenario's policy: every layer, limits far above the load.
use crate::overhead::POLICY;

const ANSWER: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there, friend."},"finish_reason":"stop"}],"usage":{"prompt_tokens":17,"completion_tokens":5,"total_tokens":22}}"#;

fn body(i: u64) -> Bytes {
    // Distinct per request: every one misses the cache and is stored.
    Bytes::from(format!(
        r#"{{"model":"gpt-4o-mini","max_tokens":16,"messages":[{{"role":"user","content":"Say hello in a few words, number {i}."}}]}}"#
    ))
}

#[cfg(feature = "count-allocs")]
mod allocs {
    use std::alloc::System;

    use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

    #[global_allocator]
    static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

    pub(crate) struct Counter(Region<'static, System>);

    impl Counter {
        pub(crate) fn start() -> Self {
            Self(Region::new(GLOBAL))
        }
        /// Allocations and bytes allocated since the start.
        pub(crate) fn read(&self) -> Option<(u64, u64)> {
            let c = self.0.change();
            Some((c.allocations as u64, c.bytes_allocated as u64))
        }
    }
}

#[cfg(not(feature = "count-allocs"))]
mod allocs {
    pub(crate) struct Counter;
    impl Counter {
        pub(crate) fn start() -> Self {
            Self
        }
        pub(crate) fn read(&self) -> Option<(u64, u64)> {
            None
        }
    }
}

pub(crate) async fn run(args: &Args) -> Result<(), BoxError> {
    let n = args
        .requests
        .unwrap_or(if args.quick { 20_000 } else { 200_000 });
    let policy = match &args.policy {
        Some(path) => Policy::from_path(path)?,
        None => Policy::from_yaml(POLICY)?,
    };
    let client = tower::service_fn(|_: Request<BoxBody>| async {
        let res = Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(ANSWER)))
            .unwrap_or_default();
        Ok::<_, Infallible>(res)
    });
    let svc = policy.build::<_, _, Full<Bytes>>(client)?;
    let one = |i: u64| {
        let svc = svc.clone();
        async move {
            let req = Request::post("/v1/chat/completions")
                .header("content-type", "application/json")
                .header("authorization", "Bearer sk-bench")
                .header("x-tenant-id", "bench")
                .body(Full::new(body(i)))?;
            let res = svc.oneshot(req).await?;
            if !res.status().is_success() {
                return Err::<(), BoxError>(format!("status {}", res.status()).into());
            }
            res.into_body().collect().await?;
            Ok(())
        }
    };
    // Warm up: the tokenizer's tables, the maps, the allocator's arenas.
    let warm = (n / 10).max(1_000);
    for i in 0..warm {
        one(i).await?;
    }
    let counter = allocs::Counter::start();
    let start = Instant::now();
    for i in warm..warm + n {
        one(i).await?;
    }
    let elapsed = start.elapsed();
    let counted = counter.read();
    let ns = elapsed.as_nanos() as f64 / n as f64;
    let per = |x: u64| x as f64 / n as f64;
    report::table(
        &format!(
            "stack-cost: {n} cache-miss requests through every layer, one at a time, no sockets"
        ),
        &[
            (
                "time",
                format!("{ns:.0} ns per request ({:.2} s)", elapsed.as_secs_f64()),
            ),
            (
                "allocations",
                match counted {
                    Some((a, b)) => {
                        format!("{:.1} per request, {:.0} bytes per request", per(a), per(b))
                    }
                    None => "not counted (build with --features count-allocs)".to_owned(),
                },
            ),
        ],
    );
    report::result_line(
        "stack-cost",
        &[
            ("ns_per_req", format!("{ns:.0}")),
            (
                "allocs_per_req",
                counted.map_or("n/a".to_owned(), |(a, _)| format!("{:.1}", per(a))),
            ),
            (
                "bytes_per_req",
                counted.map_or("n/a".to_owned(), |(_, b)| format!("{:.0}", per(b))),
            ),
            ("requests", n.to_string()),
        ],
    );
    Ok(())
}
