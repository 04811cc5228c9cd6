//! Scenario `batching`: 2,000 single-text embeddings requests (10,000 for a full run), 64
//! at a time, against a provider at 600 RPM behind a limiter of that quota — through
//! `BatchLayer` and without it, on tokio's paused clock over loopback (the minutes the
//! quota takes to refill pass at once; the makespan is exact, not a CPU figure).
//! Printed: upstream requests, speedup (makespan without ÷ with; goal ≥ 20), and whether
//! every caller's vectors and usage equal those of the same request sent alone.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tollgate_core::facts::ReplayBody;
use tollgate_ratelimit::{Limit, Quota, RateLimitLayer};
use tollgate_testkit::Provider;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, Layer, ServiceExt};

use crate::Args;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Svc = BoxCloneSyncService<Request<ReplayBody>, Response<Incoming>, BoxError>;

const RPM: u32 = 600;
const CONCURRENCY: usize = 64;
const MODEL: &str = "text-embedding-3-small";

fn client(provider: &Provider) -> Svc {
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody>();
    let base = provider.url();
    BoxCloneSyncService::new(service_fn(move |mut req: Request<ReplayBody>| {
        let client = client.clone();
        let uri = format!("{base}{}", req.uri().path());
        async move {
            *req.uri_mut() = uri.parse()?;
            Ok::<_, BoxError>(client.request(req).await?)
        }
    }))
}

fn text(i: usize) -> String {
    format!("chunk {i} of the document: {}", "words ".repeat(i % 11 + 1))
}

fn embed(i: usize) -> Request<Full<Bytes>> {
    let body = json!({"model": MODEL, "input": text(i)});
    Request::post("/v1/embeddings")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_default()
}

async fn answer<B: http_body::Body>(res: Response<B>) -> Value {
    let bytes = match res.into_body().collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return Value::Null,
    };
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    json!({"data": v["data"], "prompt_tokens": v["usage"]["prompt_tokens"]})
}

/// `n` requests, `CONCURRENCY` at a time, each worker sending its next when the last is
/// answered, through `svc`: every answer (by request), and the makespan.
async fn drive<S>(svc: S, n: usize) -> (Vec<Value>, Duration)
where
    S: tower::Service<Request<Full<Bytes>>> + Clone,
    S::Response: Into<Response<http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>>>,
{
    let start = tokio::time::Instant::now();
    let per_worker = futures_util::future::join_all((0..CONCURRENCY).map(|w| {
        let svc = svc.clone();
        async move {
            let mut got = Vec::new();
            for i in (w..n).step_by(CONCURRENCY) {
                let v = match svc.clone().oneshot(embed(i)).await {
                    Ok(res) => answer(res.into()).await,
                    Err(_) => Value::Null,
                };
                got.push((i, v));
            }
            got
        }
    }))
    .await;
    let mut all = vec![Value::Null; n];
    for (i, v) in per_worker.into_iter().flatten() {
        all[i] = v;
    }
    (all, tokio::time::Instant::now() - start)
}

fn limited(
    provider: &Provider,
) -> impl tower::Service<
    Request<ReplayBody>,
    Response = Response<Incoming>,
    Error = BoxError,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    RateLimitLayer::builder()
        .limit(Limit::new("embeddings", Quota::per_minute(RPM)))
        .wait(Duration::from_secs(3600))
        .max_queue(100_000)
        .build()
        .layer(client(provider))
}

pub(crate) fn run(args: &Args) -> Result<(), BoxError> {
    let n = args
        .requests
        .map_or(if args.quick { 2000 } else { 10_000 }, |r| {
            usize::try_from(r).unwrap_or(2000)
        });
    crate::load::on_paused_clock(move || async move {
        // Without batching: each text a request against the quota.
        let plain_provider = Provider::builder()
            .rpm(u64::from(RPM))
            .spawn()
            .await
            .map_err(|e| e.to_string())?;
        let plain = limited(&plain_provider).map_response(|r: Response<Incoming>| {
            r.map(|b| b.map_err(|e| -> BoxError { e.into() }).boxed_unsync())
        });
        let (alone, slow) = drive(plain, n).await;
        // With batching, in front of the same limiter.
        let batched_provider = Provider::builder()
            .rpm(u64::from(RPM))
            .spawn()
            .await
            .map_err(|e| e.to_string())?;
        let batched = tollgate_batch::BatchLayer::builder()
            .max_delay(Duration::from_millis(5))
            .count(|t| tollgate_testkit::tokens::Vocab::for_model(MODEL).count(t))
            .build()
            .layer(limited(&batched_provider));
        let (together, fast) = drive(batched, n).await;
        let upstream = batched_provider.stats().requests;
        let identical =
            alone.iter().all(|v| !v.is_null() && !v["data"].is_null()) && alone == together;
        let speedup = slow.as_secs_f64() / fast.as_secs_f64().max(1e-9);
        println!(
            "  without batching: {n} requests upstream in {:.1} s; with it: {upstream} in {:.2} s",
            slow.as_secs_f64(),
            fast.as_secs_f64()
        );
        println!(
                "RESULT batching requests={n} upstream_requests={upstream} speedup={speedup:.1} identical={identical}"
            );
        Ok(())
    })
}
