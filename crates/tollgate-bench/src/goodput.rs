//! Scenario `goodput`: the demo's burst, without repeats, through the demo's policy against
//! one provider with the demo's limits — how close to the quota's own pace does it finish,
//! with how many 429s and failures?

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate::policy::{BoxBody, Policy};
use tollgate_testkit::workload::{demo_primary, quota_floor, Burst, DEMO_RPM, DEMO_TPM};
use tower::ServiceExt;

use crate::report;
use crate::Args;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const RPM: u64 = DEMO_RPM;
const TPM: u64 = DEMO_TPM;
const POLICY: &str = include_str!("../../../examples/tollgate.yaml");

pub(crate) async fn run(args: &Args) -> Result<(), BoxError> {
    let provider = demo_primary().spawn().await?;
    // The demo's policy, for one backend and without the cache: every request costs quota.
    let mut policy = match &args.policy {
        Some(path) => Policy::from_path(path)?,
        None => Policy::from_yaml(POLICY)?,
    };
    policy.primary.url = provider.url();
    policy.fallbacks.clear();
    policy.cache = None;
    // With no fallback to move on to, every request waits its turn: the whole burst must
    // fit within the wait allowed (the demo's 30 s would refuse the tail of the full run).
    if let Some(rl) = policy.rate_limit.as_mut() {
        rl.max_wait = Some(tollgate::policy::Dur(Duration::from_secs(180)));
    }
    let client: Client<HttpConnector, BoxBody> = Client::builder(TokioExecutor::new()).build_http();
    let svc = policy.build::<_, _, Full<Bytes>>(client)?;

    let n = args
        .requests
        .map_or(if args.quick { 300 } else { 400 }, |n| n as usize);
    let calls = Burst {
        requests: n,
        repeat_share: 0.0,
        ..Burst::default()
    }
    .calls();
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let start = Instant::now();
    let limit = Duration::from_secs(if args.quick { 60 } else { 180 });
    let mut tasks = tokio::task::JoinSet::new();
    for call in calls {
        let (svc, failed, first_error) =
            (svc.clone(), Arc::clone(&failed), Arc::clone(&first_error));
        tasks.spawn(async move {
            tokio::time::sleep_until((start + call.at).into()).await;
            let req = Request::post("/v1/chat/completions")
                .header("content-type", "application/json")
                .header("authorization", "Bearer sk-bench")
                .header("x-tenant-id", &call.tenant)
                .body(Full::new(Bytes::from(call.body.to_string())));
            let outcome = match req {
                Ok(req) => match svc.oneshot(req).await {
                    Ok(res) if res.status().is_success() => res
                        .into_body()
                        .collect()
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    Ok(res) => Err(format!("status {}", res.status())),
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = outcome {
                failed.fetch_add(1, Ordering::Relaxed);
                first_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(e);
            }
        });
    }
    let finished =
        tokio::time::timeout(limit, async { while tasks.join_next().await.is_some() {} }).await;
    let makespan = start.elapsed();
    let unfinished = if finished.is_err() {
        tasks.len() as u64
    } else {
        0
    };
    tasks.abort_all();
    let stats = provider.stats();
    provider.shutdown().await;

    let floor = quota_floor(&stats, RPM, TPM, Duration::from_secs(60));
    let ratio = makespan.as_secs_f64() / floor.as_secs_f64().max(1e-9);
    let failed = failed.load(Ordering::Relaxed) + unfinished;
    let naive_bound = n as f64 / (RPM as f64 / 60.0);
    report::table(
        &format!("goodput: {n} chat requests (no repeats, a third streamed) through examples/tollgate.yaml, provider at {RPM} RPM / {TPM} TPM with 2% 5xx"),
        &[
            ("makespan", format!("{:.2} s", makespan.as_secs_f64())),
            ("quota floor", format!("{:.2} s: {} requests, {} tokens served; beyond the full bucket at the refill rate", floor.as_secs_f64(), stats.ok, stats.tokens_served())),
            ("ratio", format!("{ratio:.3} (goal ≤ 1.05)")),
            ("N / RPM rate", format!("{naive_bound:.1} s (the issue's yardstick; the bucket starting full lets the burst beat it)")),
            ("provider 429s", format!("{} of {} requests it saw (goal ≤ 1% of {n})", stats.rate_limited, stats.requests)),
            ("provider faults", stats.faults.to_string()),
            ("failed", format!("{failed} (goal 0)")),
        ],
    );
    if let Some(e) = first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
    {
        println!("first error: {e}");
    }
    report::result_line(
        "goodput",
        &[
            ("ratio", format!("{ratio:.3}")),
            ("provider_429", stats.rate_limited.to_string()),
            ("failed", failed.to_string()),
            ("makespan_s", format!("{:.2}", makespan.as_secs_f64())),
            ("floor_s", format!("{:.2}", floor.as_secs_f64())),
            ("requests", n.to_string()),
        ],
    );
    Ok(())
}
