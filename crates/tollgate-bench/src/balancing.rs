//! Scenario `balancing`: one model over three keys of 200 requests a minute each (a whole
//! minute's burst, as providers' buckets allow), each behind its own rate limiter, and a
//! burst of 1,200 requests (6,000 for a full run) through `Failover` with
//! `Strategy::Balanced`, beside the same burst through `Strategy::Ordered`.
//!
//! The simulated providers answer over loopback, but time is tokio's paused clock: the
//! minutes a quota takes to refill pass at once, so the run takes seconds and its
//! makespan is exact, free of this machine's noise. Printed: makespan ÷ the three quotas'
//! floor `(N − Σ bursts) ÷ Σ rates`, provider 429s, and `idle_share`, the share of the
//! three quotas (each key's burst plus its refill over the makespan) left unused while
//! requests waited (goal: within 5% of the floor, 429s ≤ 1%, idle share ≈ 0).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_core::facts::ReplayBody;
use tollgate_failover::{Backend, Failover, Strategy, X_TOLLGATE_BACKEND};
use tollgate_ratelimit::{Limit, Quota, RateLimitLayer};
use tollgate_testkit::Provider;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, Layer, ServiceExt};

use crate::Args;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Svc = BoxCloneSyncService<Request<ReplayBody>, Response<Incoming>, BoxError>;

const KEYS: usize = 3;
const RPM: u32 = 200;

struct Outcome {
    per_key: [usize; KEYS],
    failed: usize,
    provider_429: u64,
    makespan: Duration,
}

async fn burst(strategy: Strategy, n: usize) -> Result<Outcome, BoxError> {
    let mut providers = Vec::new();
    for _ in 0..KEYS {
        providers.push(Provider::builder().rpm(u64::from(RPM)).spawn().await?);
    }
    let mut failover = Failover::builder().strategy(strategy);
    for (i, p) in providers.iter().enumerate() {
        let limiter = RateLimitLayer::builder()
            .limit(Limit::new(format!("k{i}"), Quota::per_minute(RPM)))
            .wait(Duration::from_secs(3600))
            .max_queue(100_000)
            .build();
        let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody>();
        let base = p.url();
        let http = service_fn(move |mut req: Request<ReplayBody>| {
            let client = client.clone();
            let uri = format!("{base}{}", req.uri().path());
            async move {
                *req.uri_mut() = uri.parse()?;
                Ok::<_, BoxError>(client.request(req).await?)
            }
        });
        let svc: Svc = BoxCloneSyncService::new(limiter.layer(http));
        failover = failover.backend(
            Backend::new(format!("k{i}"), svc)
                .header(
                    http::header::AUTHORIZATION,
                    HeaderValue::from_str(&format!("Bearer sk-{i}"))?,
                )
                .capacity(limiter),
        );
    }
    let failover = failover.build();
    let start = tokio::time::Instant::now();
    // Polled together in this task, not spawned: a spawned one would need the failover
    // future to be `Send` through its boxed-error services, which rustc cannot show
    // (the gateway boxes its futures for the same reason).
    let answers = futures_util::future::join_all((0..n).map(|i| {
        let f = failover.clone();
        async move {
            let body = format!(r#"{{"model":"gpt-4o-mini","max_tokens":8,"messages":[{{"role":"user","content":"{i}"}}]}}"#);
            let req = Request::post("/v1/chat/completions").body(Full::new(Bytes::from(body)));
            let Ok(req) = req else { return None };
            let res = f.oneshot(req).await.ok()?;
            if res.status() != 200 {
                return None;
            }
            let who = res.headers().get(X_TOLLGATE_BACKEND)?.to_str().ok()?.to_owned();
            res.into_body().collect().await.ok()?;
            who.strip_prefix('k')?.parse::<usize>().ok()
        }
    }))
    .await;
    let mut out = Outcome {
        per_key: [0; KEYS],
        failed: 0,
        provider_429: 0,
        makespan: Duration::ZERO,
    };
    for r in answers {
        match r {
            Some(k) if k < KEYS => out.per_key[k] += 1,
            _ => out.failed += 1,
        }
    }
    out.makespan = tokio::time::Instant::now() - start;
    out.provider_429 = providers.iter().map(|p| p.stats().rate_limited).sum();
    Ok(out)
}

pub(crate) fn run(args: &Args) -> Result<(), BoxError> {
    let n = args
        .requests
        .map_or(if args.quick { 1200 } else { 6000 }, |r| {
            usize::try_from(r).unwrap_or(1200)
        });
    crate::load::on_paused_clock(move || async move {
        let rate = f64::from(RPM) / 60.0 * KEYS as f64;
        let bursts = (RPM as usize * KEYS) as f64;
        let floor = (n as f64 - bursts).max(0.0) / rate;
        let mut line = String::new();
        for (name, strategy) in [
            ("balanced", Strategy::Balanced),
            ("ordered", Strategy::Ordered),
        ] {
            let o = burst(strategy, n).await.map_err(|e| e.to_string())?;
            let t = o.makespan.as_secs_f64();
            let capacity = bursts + rate * t;
            let unused: f64 = o
                .per_key
                .iter()
                .map(|&k| (f64::from(RPM) + f64::from(RPM) / 60.0 * t - k as f64).max(0.0))
                .sum();
            let idle = unused / capacity.max(1.0);
            println!(
                    "  {name:<9} {n} requests in {t:.1} s (floor {floor:.1} s), per key {:?}, failed {}, provider 429s {}, idle share {idle:.3}",
                    o.per_key, o.failed, o.provider_429
                );
            if name == "balanced" {
                line = format!(
                        "RESULT balancing makespan_ratio={:.3} provider_429={} idle_share={idle:.3} failed={}",
                        t / floor.max(f64::MIN_POSITIVE),
                        o.provider_429,
                        o.failed
                    );
            } else {
                line.push_str(&format!(
                    " ordered_makespan_ratio={:.3}",
                    t / floor.max(f64::MIN_POSITIVE)
                ));
            }
        }
        println!("{line}");
        Ok(())
    })
}
