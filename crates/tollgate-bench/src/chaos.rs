//! Scenario `chaos`: faults injected one after another during a load run through two
//! `tollgate` instances (their own processes) that share one Redis (their own
//! `redis-server`, so it can be killed) for quotas and jobs, with a batch running through
//! the Batch API all along.
//!
//! The model has a primary provider (quota 6,000 a minute, shared by both instances
//! through Redis; `on_failure: open` with `instances: 2`, so each keeps half while Redis
//! is away) and a fallback; retries 2, failover after 3 failures, upstream timeout 2 s.
//! The load is 40 requests a second (three in ten streamed), alternating between the
//! instances, each with a 30 s deadline. The faults, in order, each followed by a quiet
//! spell:
//!
//! 1. Redis killed (`SIGKILL`) and restarted on the same port (append-only file,
//!    `appendfsync always`, as a Redis that holds jobs must be run);
//! 2. the primary provider killed and restarted on the same port;
//! 3. the primary answering only after 10 s;
//! 4. the primary answering 200s with malformed JSON;
//! 5. the primary cutting its answers halfway.
//!
//! Outcomes: `failed` counts requests that got no whole 200 where the policy says they
//! must (every phase but 4 and 5: a dead Redis, a dead or slow primary are absorbed by the
//! fallback, the local share and the retries). In phases 4 and 5 a broken non-streamed
//! answer is read whole and checked by the retry layer, so it is asked again (or goes to
//! the fallback) and never reaches the client; a broken stream, already begun, reaches
//! the client as it was sent and is counted as `passed_on`, checked against the faults
//! the provider injected (any excess is `failed`). `hung`: requests past their deadline. `panics`: "panicked" in
//! either gateway's stderr. `provider_429`: the primary's 429s (its quota is never to be
//! exceeded, Redis or not). `lost` / `duplicated`: batch lines missing from, or appearing
//! twice in, the output and error files together. `recover_ms_*`: from the end of each
//! fault to the first request started after it that came back whole in under a second
//! (Redis: to both instances' `/readyz` answering 200 again; the primary's restart: to its
//! first request). `--quick` runs each phase 3–4 s; the full run 10 s.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_testkit::{Faults, Provider};

use crate::gateway::{free_addr, Proc};
use crate::Args;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

const RATE: f64 = 40.0;
const DEADLINE: Duration = Duration::from_secs(30);
const PRIMARY_RPM: u64 = 6_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// A 200 whose body was broken or cut.
    Broken,
    /// Not a 200, or no answer.
    Failed,
    Hung,
}

/// One request: when it started and ended, in which phase it started, how it ended.
#[derive(Clone, Copy, Debug)]
struct Record {
    start: Instant,
    end: Instant,
    phase: usize,
    outcome: Outcome,
}

type Log = Arc<Mutex<Vec<Record>>>;

/// A `redis-server` of our own on `port`, durable to `dir`, so it can be killed and come
/// back with what it held.
fn redis_server(port: u16, dir: &std::path::Path) -> Result<Proc, BoxError> {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start redis-server (is it installed?): {e}"))?;
    Ok(Proc(child))
}

async fn redis_up(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let mut buf = [0u8; 16];
    s.write_all(b"PING\r\n").await.is_ok()
        && matches!(
            tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await,
            Ok(Ok(n)) if buf[..n].starts_with(b"+PONG")
        )
}

async fn wait_for(mut ready: impl AsyncFnMut() -> bool, what: &str) -> Result<(), BoxError> {
    for _ in 0..300 {
        if ready().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("{what} was not ready within 6 s").into())
}

async fn status(http: &Http, url: &str) -> Option<u16> {
    let req = Request::get(url).body(Full::new(Bytes::new())).ok()?;
    let res = tokio::time::timeout(Duration::from_secs(2), http.request(req))
        .await
        .ok()?
        .ok()?;
    let s = res.status().as_u16();
    let _ = res.into_body().collect().await;
    Some(s)
}

async fn one(http: &Http, url: &str, i: u64) -> Outcome {
    let stream = i % 10 < 3;
    let body = format!(
        r#"{{"model":"gpt-4o-mini","max_tokens":16,"stream":{stream},"messages":[{{"role":"user","content":"chaos {i}"}}]}}"#
    );
    let req = Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)));
    let Ok(req) = req else {
        return Outcome::Failed;
    };
    let call = async {
        let Ok(res) = http.request(req).await else {
            return Outcome::Failed;
        };
        if res.status() != 200 {
            let _ = res.into_body().collect().await;
            return Outcome::Failed;
        }
        let Ok(body) = res.into_body().collect().await else {
            return Outcome::Broken;
        };
        let body = body.to_bytes();
        let whole = if stream {
            body.ends_with(b"data: [DONE]\n\n")
                && body
                    .split(|&b| b == b'\n')
                    .filter_map(|l| l.strip_prefix(b"data: "))
                    .filter(|d| *d != b"[DONE]")
                    .all(|d| serde_json::from_slice::<serde_json::Value>(d).is_ok())
        } else {
            serde_json::from_slice::<serde_json::Value>(&body)
                .is_ok_and(|v| v["choices"].is_array())
        };
        if whole {
            Outcome::Ok
        } else {
            Outcome::Broken
        }
    };
    tokio::time::timeout(DEADLINE, call)
        .await
        .unwrap_or(Outcome::Hung)
}

/// The paced load over both instances until `stop`, each request tagged with the phase in
/// force when it started.
async fn load(
    http: Http,
    urls: [String; 2],
    phase: Arc<std::sync::atomic::AtomicUsize>,
    log: Log,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = Vec::new();
    let mut i = 0u64;
    while !*stop.borrow() {
        tick.tick().await;
        i += 1;
        let (http, url, log) = (
            http.clone(),
            urls[(i % 2) as usize].clone(),
            Arc::clone(&log),
        );
        let phase = phase.load(std::sync::atomic::Ordering::Relaxed);
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let outcome = one(&http, &url, i).await;
            if let Ok(mut l) = log.lock() {
                l.push(Record {
                    start,
                    end: Instant::now(),
                    phase,
                    outcome,
                });
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

fn gateway(
    bin: &std::path::Path,
    config: &std::path::Path,
    log: &std::path::Path,
) -> Result<Proc, BoxError> {
    let child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(config)
        .env("TOLLGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()?;
    Ok(Proc(child))
}

async fn upload_batch(http: &Http, base: &str, lines: u64) -> Result<String, BoxError> {
    let content: String = (0..lines)
        .map(|i| {
            format!(
                "{{\"custom_id\":\"line-{i}\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{{\"model\":\"gpt-4o-mini\",\"max_tokens\":8,\"messages\":[{{\"role\":\"user\",\"content\":\"batch {i}\"}}]}}}}\n"
            )
        })
        .collect();
    let boundary = "tollgate-chaos";
    let form = format!(
        "--{boundary}\r\ncontent-disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"b.jsonl\"\r\n\r\n{content}\r\n--{boundary}--\r\n"
    );
    let (s, body) = send(
        http,
        "POST",
        &format!("{base}/v1/files"),
        &format!("multipart/form-data; boundary={boundary}"),
        form,
    )
    .await?;
    let file: serde_json::Value = serde_json::from_slice(&body)?;
    if s != 200 {
        return Err(format!("the upload answered {s}: {file}").into());
    }
    let create = serde_json::json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    let (s, body) = send(
        http,
        "POST",
        &format!("{base}/v1/batches"),
        "application/json",
        create.to_string(),
    )
    .await?;
    let batch: serde_json::Value = serde_json::from_slice(&body)?;
    if s != 200 {
        return Err(format!("the batch answered {s}: {batch}").into());
    }
    Ok(batch["id"].as_str().unwrap_or_default().to_owned())
}

async fn send(
    http: &Http,
    method: &str,
    url: &str,
    ct: &str,
    body: String,
) -> Result<(u16, Bytes), BoxError> {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", ct)
        .body(Full::new(Bytes::from(body)))?;
    let res = tokio::time::timeout(Duration::from_secs(10), http.request(req)).await??;
    let s = res.status().as_u16();
    Ok((s, res.into_body().collect().await?.to_bytes()))
}

/// Waits for the batch to end (up to `limit`), then counts its lines in the output and
/// error files: (lost, duplicated, in the error file, its status).
async fn batch_result(
    http: &Http,
    base: &str,
    id: &str,
    lines: u64,
    limit: Duration,
) -> Result<(u64, u64, u64, String), BoxError> {
    let started = Instant::now();
    let batch = loop {
        let (_, body) = send(
            http,
            "GET",
            &format!("{base}/v1/batches/{id}"),
            "application/json",
            String::new(),
        )
        .await?;
        let b: serde_json::Value = serde_json::from_slice(&body)?;
        if !matches!(
            b["status"].as_str(),
            Some("in_progress" | "validating" | "finalizing")
        ) || started.elapsed() > limit
        {
            break b;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut seen = std::collections::HashMap::<String, u64>::new();
    let mut errors = 0;
    for (field, is_error) in [("output_file_id", false), ("error_file_id", true)] {
        let Some(f) = batch[field].as_str() else {
            continue;
        };
        let (_, body) = send(
            http,
            "GET",
            &format!("{base}/v1/files/{f}/content"),
            "application/json",
            String::new(),
        )
        .await?;
        for line in String::from_utf8_lossy(&body)
            .lines()
            .filter(|l| !l.trim().is_empty())
        {
            let v: serde_json::Value = serde_json::from_str(line)?;
            *seen
                .entry(v["custom_id"].as_str().unwrap_or_default().to_owned())
                .or_default() += 1;
            errors += u64::from(is_error);
        }
    }
    let lost = (0..lines)
        .filter(|i| !seen.contains_key(&format!("line-{i}")))
        .count() as u64;
    let duplicated = seen.values().map(|n| n - 1).sum();
    Ok((
        lost,
        duplicated,
        errors,
        batch["status"].as_str().unwrap_or("?").to_owned(),
    ))
}

pub(crate) async fn run(args: &Args) -> Result<(), BoxError> {
    let phase_len = Duration::from_secs(if args.quick { 4 } else { 10 });
    let quiet = Duration::from_secs(if args.quick { 3 } else { 10 });
    let lines = args.requests.unwrap_or(if args.quick { 100 } else { 400 });
    let bin = crate::gateway::gateway_bin(args)?;
    let dir = std::env::temp_dir().join(format!("tollgate-bench-chaos-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("redis"))?;

    let redis_port = free_addr()?.port();
    let mut redis = redis_server(redis_port, &dir.join("redis"))?;
    wait_for(async || redis_up(redis_port).await, "redis-server").await?;
    let primary_rpm = PRIMARY_RPM;
    let spawn_primary = |addr: SocketAddr| {
        Provider::builder()
            .rpm(primary_rpm)
            .burst(100)
            .latency(Duration::from_millis(20))
            .chunk_delay(Duration::from_millis(2))
            .listen(addr)
            .spawn()
    };
    let mut primary = spawn_primary(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let primary_addr = primary.addr();
    let fallback = Provider::builder()
        .latency(Duration::from_millis(20))
        .spawn()
        .await?;

    let addrs = [free_addr()?, free_addr()?];
    let mut gws = Vec::new();
    for (n, addr) in addrs.iter().enumerate() {
        let config = format!(
            "listen: {addr}
open: true
store: {{ url: \"redis://127.0.0.1:{redis_port}\", on_failure: open, instances: 2, timeout: 100ms }}
timeouts: {{ upstream: 2s }}
jobs: {{ path: \"{jobs}\", store: \"redis://127.0.0.1:{redis_port}\", workers: 4, lease: 5s }}
models:
  gpt-4o-mini:
    primary: {{ url: \"{p}\" }}
    fallbacks:
      - {{ name: backup, url: \"{f}\", model: gpt-4o-mini }}
    rate_limit: {{ requests: {primary_rpm}/min, burst: 100, mode: wait, max_wait: 10s, learn: false }}
    retry: {{ max_retries: 2, backoff: 50ms }}
    failover: {{ failures: 3, window: 10s, cooldown: 2s }}
",
            jobs = dir.join("jobs").display(),
            p = primary.url(),
            f = fallback.url(),
        );
        let path = dir.join(format!("gateway-{n}.yaml"));
        std::fs::write(&path, config)?;
        let mut gw = gateway(&bin, &path, &dir.join(format!("gateway-{n}.log")))?;
        crate::gateway::wait_listening(*addr, &mut gw, "a gateway").await?;
        gws.push(gw);
    }
    let http: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(128)
        .build_http();
    let bases = addrs.map(|a| format!("http://{a}"));
    let urls = bases.clone().map(|b| format!("{b}/v1/chat/completions"));

    let batch = upload_batch(&http, &bases[0], lines).await?;
    println!("chaos: 2 gateways on one Redis, {RATE}/s (30% streamed), a batch of {lines} lines; phases of {phase_len:?}");
    let phase = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let log = Log::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let runner = tokio::spawn(load(
        http.clone(),
        urls.clone(),
        Arc::clone(&phase),
        Arc::clone(&log),
        stop_rx,
    ));
    let set = |p: usize| phase.store(p, std::sync::atomic::Ordering::Relaxed);
    let mut recover: Vec<(&str, Instant)> = Vec::new();
    let mut extra_recover: Vec<(&str, f64)> = Vec::new();
    let mut injected_broken = 0u64;

    tokio::time::sleep(quiet).await;

    // 1. Redis killed and restarted.
    println!("chaos: Redis killed");
    set(1);
    let _ = redis.0.kill();
    let _ = redis.0.wait();
    tokio::time::sleep(phase_len).await;
    redis = redis_server(redis_port, &dir.join("redis"))?;
    let back = Instant::now();
    wait_for(async || redis_up(redis_port).await, "redis-server again").await?;
    let ready_urls = bases.clone().map(|b| format!("{b}/readyz"));
    for _ in 0..500 {
        let mut all = true;
        for u in &ready_urls {
            all &= status(&http, u).await == Some(200);
        }
        if all {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    extra_recover.push(("redis_ready", back.elapsed().as_secs_f64() * 1e3));
    println!("chaos: Redis back");
    recover.push(("redis", back));
    set(2);
    tokio::time::sleep(quiet).await;

    // 2. The primary killed and restarted.
    println!("chaos: primary provider killed");
    set(3);
    primary.shutdown().await;
    tokio::time::sleep(phase_len).await;
    primary = spawn_primary(primary_addr).await?;
    let back = Instant::now();
    println!("chaos: primary back");
    recover.push(("primary", back));
    set(4);
    let mut first_primary = None;
    let until = Instant::now() + quiet;
    while Instant::now() < until {
        if first_primary.is_none() && primary.stats().requests > 0 {
            first_primary = Some(back.elapsed().as_secs_f64() * 1e3);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    extra_recover.push(("primary_traffic", first_primary.unwrap_or(f64::NAN)));
    let mut primary_429 = primary.stats().rate_limited;

    // 3. The primary answering after 10 s.
    println!("chaos: primary answers after 10 s");
    set(5);
    primary.set_faults(Faults {
        slow_rate: 1.0,
        slow_first_byte: Duration::from_secs(10),
        ..Faults::default()
    });
    tokio::time::sleep(phase_len).await;
    primary.set_faults(Faults::default());
    recover.push(("slow", Instant::now()));
    set(6);
    tokio::time::sleep(quiet).await;

    // 4 and 5. Malformed JSON, then cut answers.
    for (name, p, faults) in [
        (
            "malformed",
            7,
            Faults {
                malformed_rate: 0.5,
                ..Faults::default()
            },
        ),
        (
            "cut",
            9,
            Faults {
                cut_rate: 0.5,
                ..Faults::default()
            },
        ),
    ] {
        println!("chaos: primary sends {name} answers (half of them)");
        let before = primary.stats().faults;
        set(p);
        primary.set_faults(faults);
        tokio::time::sleep(phase_len).await;
        primary.set_faults(Faults::default());
        recover.push((name, Instant::now()));
        set(p + 1);
        tokio::time::sleep(quiet).await;
        injected_broken += primary.stats().faults - before;
    }
    let _ = stop_tx.send(true);
    let _ = runner.await;
    primary_429 += primary.stats().rate_limited;

    let (lost, duplicated, batch_errors, batch_status) =
        batch_result(&http, &bases[1], &batch, lines, Duration::from_secs(120)).await?;

    let records = log.lock().map(|l| l.clone()).unwrap_or_default();
    let broken_phase = |p: usize| p == 7 || p == 9;
    let count = |f: &dyn Fn(&Record) -> bool| records.iter().filter(|r| f(r)).count() as u64;
    let hung = count(&|r| r.outcome == Outcome::Hung);
    let passed_on =
        count(&|r| broken_phase(r.phase) && matches!(r.outcome, Outcome::Broken | Outcome::Failed));
    let failed = count(&|r| {
        !broken_phase(r.phase) && matches!(r.outcome, Outcome::Broken | Outcome::Failed)
    }) + passed_on.saturating_sub(injected_broken);
    let panics: usize = (0..2)
        .map(|n| {
            std::fs::read_to_string(dir.join(format!("gateway-{n}.log")))
                .map_or(0, |s| s.matches("panicked").count())
        })
        .sum();

    println!();
    let names = [
        "quiet",
        "redis down",
        "after",
        "primary down",
        "after",
        "primary slow",
        "after",
        "malformed",
        "after",
        "cut",
        "after",
    ];
    println!(
        "  {:<13} {:>6} {:>6} {:>7} {:>7} {:>5}",
        "phase", "sent", "ok", "broken", "failed", "hung"
    );
    for (p, name) in names.iter().enumerate() {
        let of = |o: Outcome| count(&|r| r.phase == p && r.outcome == o);
        println!(
            "  {name:<13} {:>6} {:>6} {:>7} {:>7} {:>5}",
            count(&|r| r.phase == p),
            of(Outcome::Ok),
            of(Outcome::Broken),
            of(Outcome::Failed),
            of(Outcome::Hung)
        );
    }
    let mut recover_ms = Vec::new();
    for (name, at) in &recover {
        let ms = records
            .iter()
            .filter(|r| {
                r.start >= *at
                    && r.outcome == Outcome::Ok
                    && r.end - r.start < Duration::from_secs(1)
            })
            .map(|r| (r.end - *at).as_secs_f64() * 1e3)
            .fold(f64::INFINITY, f64::min);
        recover_ms.push((*name, ms));
    }
    recover_ms.extend(extra_recover);
    let recover_ms_max = recover_ms.iter().map(|r| r.1).fold(0.0, f64::max);
    println!();
    for (name, ms) in &recover_ms {
        println!("  recovered from {name}: {ms:.0} ms");
    }
    println!(
        "  broken answers passed on {passed_on} (the primary injected {injected_broken}); provider 429s {primary_429}; \
         the fallback served {}",
        fallback.stats().ok
    );
    println!("  batch {batch_status}: {lines} lines, {batch_errors} in the error file, {lost} lost, {duplicated} twice");
    drop(gws);
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "RESULT chaos failed={failed} hung={hung} panics={panics} lost={lost} duplicated={duplicated} \
         recover_ms_max={recover_ms_max:.0} passed_on={passed_on} provider_429={primary_429} requests={} batch_errors={batch_errors}",
        records.len()
    );
    Ok(())
}
