//! Scenario `jobs`: a Batch API batch through the `tollgate` binary (its own process)
//! while live traffic runs at half the provider's quota.
//!
//! The provider allows 6,000 requests a minute (a burst of 100) and answers in 50 ms; the
//! gateway's model states that quota, waits for its turn, and runs jobs with 32 workers.
//! Phase 1: the live load alone (an open loop at half the quota) — its p99. Phase 2: a
//! batch of N lines (2,000; 500 with `--quick`) submitted with the same live load beside
//! it, until the batch completes. Printed: the batch's makespan against the floor the
//! quota left by live traffic allows, `(N − the burst jobs may take) ÷ (quota − live
//! rate)`; the live p99 with the batch ÷ without; live requests that were not 200; the
//! provider's 429s; and from the output file, lines lost and lines recorded twice.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_testkit::Provider;

use crate::gateway::{free_addr, serve};
use crate::Args;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// The provider's quota, per second.
const RATE: u64 = 100;
/// The provider's burst.
const BURST: u64 = 100;
/// The live load: half the quota.
const LIVE_RATE: u64 = RATE / 2;

fn chat(i: u64) -> String {
    format!(
        r#"{{"model":"gpt-4o-mini","max_tokens":16,"messages":[{{"role":"user","content":"request {i}"}}]}}"#
    )
}

async fn call(
    http: &Http,
    method: http::Method,
    url: &str,
    content_type: &str,
    body: Bytes,
) -> Result<(u16, Bytes), BoxError> {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", content_type)
        .body(Full::new(body))?;
    let res = http.request(req).await?;
    let status = res.status().as_u16();
    Ok((status, res.into_body().collect().await?.to_bytes()))
}

async fn json(http: &Http, url: &str) -> Result<serde_json::Value, BoxError> {
    let (_, body) = call(
        http,
        http::Method::GET,
        url,
        "application/json",
        Bytes::new(),
    )
    .await?;
    Ok(serde_json::from_slice(&body)?)
}

/// The live load: one request every 1/LIVE_RATE s until `stop`; latencies of the 200s
/// (µs) and the count of the others.
struct Live {
    hist: Mutex<Histogram<u64>>,
    failed: AtomicU64,
    sent: AtomicU64,
}

async fn live(http: Http, url: String, live: Arc<Live>, stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / LIVE_RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    let mut i = 0u64;
    while !*stop.borrow() {
        tick.tick().await;
        i += 1;
        let (http, url, live) = (http.clone(), url.clone(), Arc::clone(&live));
        tasks.spawn(async move {
            live.sent.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            let r = call(
                &http,
                http::Method::POST,
                &url,
                "application/json",
                Bytes::from(chat(i)),
            )
            .await;
            match r {
                Ok((200, _)) => {
                    let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                    let _ = live.hist.lock().map(|mut h| h.record(us.max(1)));
                }
                _ => {
                    live.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Runs the live load for `d`, or until `until` completes.
async fn with_live<F: std::future::Future>(
    http: &Http,
    url: &str,
    until: F,
) -> (Arc<Live>, F::Output) {
    let l = Arc::new(Live {
        hist: Mutex::new(Histogram::new(3).expect("3 significant digits")),
        failed: AtomicU64::new(0),
        sent: AtomicU64::new(0),
    });
    let (tx, rx) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(live(http.clone(), url.to_owned(), Arc::clone(&l), rx));
    let out = until.await;
    let _ = tx.send(true);
    let _ = load.await;
    (l, out)
}

fn quantile(l: &Live, q: f64) -> u64 {
    l.hist.lock().map(|h| h.value_at_quantile(q)).unwrap_or(0)
}

fn p99(l: &Live) -> u64 {
    quantile(l, 0.99)
}

pub(crate) async fn run(args: &Args) -> Result<(), BoxError> {
    let lines = args.requests.unwrap_or(if args.quick { 500 } else { 2000 });
    let provider = Provider::builder()
        .rpm(RATE * 60)
        .burst(BURST)
        .latency(Duration::from_millis(50))
        .spawn()
        .await?;
    let addr = free_addr()?;
    let dir = std::env::temp_dir().join(format!("tollgate-bench-jobs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let config = format!(
        "listen: {addr}\nopen: true\njobs: {{ path: \"{}\", workers: 32 }}\nmodels:\n  gpt-4o-mini:\n    primary: {{ url: \"{}\" }}\n    rate_limit: {{ requests: {}/min, burst: {BURST}, mode: wait, max_wait: 5m, max_queue: 4096 }}\n",
        dir.join("jobs.redb").display(),
        provider.url(),
        RATE * 60,
    );
    let path = dir.join("gateway.yaml");
    std::fs::write(&path, config)?;
    let gw = serve(args, &path, addr).await?;
    let base = format!("http://{addr}");
    let chat_url = format!("{base}/v1/chat/completions");
    let http: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http();

    // A warm-up, not measured: the first requests build the tokenizer and connections.
    let _ = with_live(&http, &chat_url, tokio::time::sleep(Duration::from_secs(2))).await;
    // Phase 1: live alone, as long as the batch will take.
    let reserve = BURST / 10;
    let floor = (lines.saturating_sub(BURST - reserve)) as f64 / (RATE - LIVE_RATE) as f64;
    let alone_for = Duration::from_secs_f64(floor.max(5.0));
    println!("jobs: phase 1, live load alone at {LIVE_RATE}/s for {alone_for:.1?}");
    let (alone, ()) = with_live(&http, &chat_url, tokio::time::sleep(alone_for)).await;
    // Let the bucket fill again before the batch.
    tokio::time::sleep(Duration::from_secs_f64(BURST as f64 / RATE as f64 + 0.5)).await;
    let before = provider.stats();

    // Phase 2: the batch, with the same live load beside it.
    let content: String = (0..lines)
        .map(|i| {
            format!(
                "{{\"custom_id\":\"line-{i}\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{}}}\n",
                chat(1_000_000 + i)
            )
        })
        .collect();
    let boundary = "tollgate-bench";
    let form = format!(
        "--{boundary}\r\ncontent-disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"batch.jsonl\"\r\n\r\n{content}\r\n--{boundary}--\r\n"
    );
    let (status, body) = call(
        &http,
        http::Method::POST,
        &format!("{base}/v1/files"),
        &format!("multipart/form-data; boundary={boundary}"),
        Bytes::from(form),
    )
    .await?;
    if status != 200 {
        return Err(format!(
            "the upload answered {status}: {}",
            String::from_utf8_lossy(&body)
        )
        .into());
    }
    let file: serde_json::Value = serde_json::from_slice(&body)?;
    println!("jobs: phase 2, a batch of {lines} lines with the live load beside it");
    let batch_run = async {
        let started = Instant::now();
        let create = serde_json::json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"});
        let (status, body) = call(
            &http,
            http::Method::POST,
            &format!("{base}/v1/batches"),
            "application/json",
            Bytes::from(create.to_string()),
        )
        .await?;
        if status != 200 {
            return Err::<_, BoxError>(
                format!(
                    "the batch answered {status}: {}",
                    String::from_utf8_lossy(&body)
                )
                .into(),
            );
        }
        let id = serde_json::from_slice::<serde_json::Value>(&body)?["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let limit = Duration::from_secs_f64(floor * 3.0 + 60.0);
        loop {
            let b = json(&http, &format!("{base}/v1/batches/{id}")).await?;
            if !matches!(b["status"].as_str(), Some("in_progress" | "validating")) {
                return Ok((started.elapsed(), b));
            }
            if started.elapsed() > limit {
                return Err(format!("the batch did not finish within {limit:?}: {b}").into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (with, result) = with_live(&http, &chat_url, batch_run).await;
    let (makespan, batch) = result?;
    let after = provider.stats();

    let out = match batch["output_file_id"].as_str() {
        Some(f) => {
            call(
                &http,
                http::Method::GET,
                &format!("{base}/v1/files/{f}/content"),
                "application/json",
                Bytes::new(),
            )
            .await?
            .1
        }
        None => Bytes::new(),
    };
    let mut seen = std::collections::HashMap::<String, u32>::new();
    for line in String::from_utf8_lossy(&out).lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["response"]["status_code"] == 200 {
            *seen
                .entry(v["custom_id"].as_str().unwrap_or_default().to_owned())
                .or_default() += 1;
        }
    }
    let lost = (0..lines)
        .filter(|i| !seen.contains_key(&format!("line-{i}")))
        .count();
    let duplicated: u32 = seen.values().map(|n| n - 1).sum();
    let makespan_ratio = makespan.as_secs_f64() / floor;
    let (p99_alone, p99_with) = (p99(&alone), p99(&with));
    let live_p99_ratio = p99_with as f64 / p99_alone.max(1) as f64;
    let live_failed = alone.failed.load(Ordering::Relaxed) + with.failed.load(Ordering::Relaxed);
    let provider_429 = after.rate_limited;
    println!();
    println!("  batch: {lines} lines in {:.2} s; floor {floor:.2} s ((N − {}) ÷ {}/s left by live traffic)", makespan.as_secs_f64(), BURST - reserve, RATE - LIVE_RATE);
    println!(
        "  batch status {}, counts {}",
        batch["status"], batch["request_counts"]
    );
    println!(
        "  live: {} alone p50 {} p99 {} µs; {} beside the batch p50 {} p99 {} µs; not 200: {live_failed}",
        alone.sent.load(Ordering::Relaxed),
        quantile(&alone, 0.5),
        p99_alone,
        with.sent.load(Ordering::Relaxed),
        quantile(&with, 0.5),
        p99_with
    );
    println!(
        "  provider: {} requests during the batch, {provider_429} answered 429 in the run",
        after.requests - before.requests
    );
    println!(
        "RESULT jobs lines={lines} makespan_ratio={makespan_ratio:.3} live_p99_ratio={live_p99_ratio:.3} lost={lost} duplicated={duplicated} live_not_200={live_failed} provider_429={provider_429}"
    );
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
