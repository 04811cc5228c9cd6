//! Scenario `fairness`: two tenants of weights 3 and 1 sharing one model's quota through
//! the `tollgate` binary (its own process) in front of the simulated provider.
//!
//! The model's quota is 1,200 requests a minute, one at a time (the provider's is the
//! same, with a little slack so that timing on this machine never turns into a 429); each
//! tenant keeps 32 requests in flight, so both always wait. Phase 1: tenant a alone — its
//! share of the quota (`alone`, goal 1.0). Phase 2: tenant b joins — the time from its
//! first request to its first answer (`late_join_ms`; the provider answers in 20 ms, one
//! cell comes every 50 ms), then over the next 10 s (5 with `--quick`) the share of the
//! answers each tenant got (goal 0.75 / 0.25).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_testkit::Provider;

use crate::gateway::{free_addr, serve, sha256_hex};
use crate::Args;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// The model's quota, per second.
const RATE: f64 = 20.0;

/// Answers: (tenant, when it came, its status).
type Log = Arc<Mutex<Vec<(&'static str, Instant, u16)>>>;

/// One tenant's load: `in_flight` loops, each sending its next request when the last is
/// answered, until `stop`.
fn load(
    http: &Http,
    url: &str,
    tenant: &'static str,
    in_flight: usize,
    log: &Log,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..in_flight)
        .map(|i| {
            let (http, url, log, stop) = (http.clone(), url.to_owned(), Arc::clone(log), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !*stop.borrow() {
                    n += 1;
                    let body = format!(
                        r#"{{"model":"gpt-4o-mini","max_tokens":8,"messages":[{{"role":"user","content":"{tenant} {i} {n}"}}]}}"#
                    );
                    let req = Request::post(&url)
                        .header("authorization", format!("Bearer sk-{tenant}"))
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body)));
                    let Ok(req) = req else { return };
                    let status = match http.request(req).await {
                        Ok(res) => {
                            let s = res.status().as_u16();
                            let _ = res.into_body().collect().await;
                            s
                        }
                        Err(_) => 0,
                    };
                    if let Ok(mut l) = log.lock() {
                        l.push((tenant, Instant::now(), status));
                    }
                }
            })
        })
        .collect()
}

/// The answers of `tenant` with status 200 in [from, to).
fn count(log: &Log, tenant: &str, from: Instant, to: Instant) -> usize {
    log.lock().map_or(0, |l| {
        l.iter()
            .filter(|(t, at, s)| *t == tenant && *s == 200 && *at >= from && *at < to)
            .count()
    })
}

pub(crate) async fn run(args: &Args) -> Result<(), BoxError> {
    let phase = Duration::from_secs(if args.quick { 5 } else { 10 });
    let provider = Provider::builder()
        .rpm((RATE * 60.0) as u64)
        .burst(5)
        .latency(Duration::from_millis(20))
        .spawn()
        .await?;
    let addr = free_addr()?;
    let dir = std::env::temp_dir().join(format!("tollgate-bench-fair-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = format!(
        "listen: {addr}\nmodels:\n  gpt-4o-mini:\n    primary: {{ url: \"{}\" }}\n    rate_limit: {{ requests: {}/min, burst: 1, mode: wait, max_wait: 1m }}\ntenants:\n  a: {{ key_sha256: \"{}\", weight: 3 }}\n  b: {{ key_sha256: \"{}\", weight: 1 }}\n",
        provider.url(),
        (RATE * 60.0) as u64,
        sha256_hex("sk-a"),
        sha256_hex("sk-b"),
    );
    let path = dir.join("gateway.yaml");
    std::fs::write(&path, config)?;
    let gw = serve(args, &path, addr).await?;
    let url = format!("http://{addr}/v1/chat/completions");
    let http: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(128)
        .build_http();
    let log = Log::default();
    let (tx, rx) = tokio::sync::watch::channel(false);

    println!("fairness: tenant a (weight 3) alone for {phase:?}, 32 in flight");
    let mut tasks = load(&http, &url, "a", 32, &log, &rx);
    // Let the queue form, then measure a alone.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = Instant::now();
    tokio::time::sleep(phase).await;
    let t1 = Instant::now();
    let alone = count(&log, "a", t0, t1) as f64 / (RATE * (t1 - t0).as_secs_f64());

    println!("fairness: tenant b (weight 1) joins, 32 in flight");
    let joined = Instant::now();
    tasks.extend(load(&http, &url, "b", 32, &log, &rx));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t2 = Instant::now();
    tokio::time::sleep(phase * 2).await;
    let t3 = Instant::now();
    let _ = tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let first_b = log.lock().ok().and_then(|l| {
        l.iter()
            .find(|(t, _, s)| *t == "b" && *s == 200)
            .map(|e| e.1)
    });
    let late_join_ms = first_b.map_or(f64::NAN, |f| (f - joined).as_secs_f64() * 1e3);
    let (a, b) = (count(&log, "a", t2, t3), count(&log, "b", t2, t3));
    let total = (a + b).max(1) as f64;
    let (share_a, share_b) = (a as f64 / total, b as f64 / total);
    let not_ok = log
        .lock()
        .map_or(0, |l| l.iter().filter(|e| e.2 != 200).count());
    let used = total / (RATE * (t3 - t2).as_secs_f64());
    println!();
    println!("  a alone: {:.1}% of the quota", alone * 100.0);
    println!(
        "  both, over {:?}: a {a} ({:.1}%), b {b} ({:.1}%); {:.1}% of the quota used",
        t3 - t2,
        share_a * 100.0,
        share_b * 100.0,
        used * 100.0
    );
    println!("  b's first answer {late_join_ms:.0} ms after it joined; answers not 200: {not_ok}; provider 429s: {}", provider.stats().rate_limited);
    println!(
        "RESULT fairness share_a={share_a:.3} share_b={share_b:.3} alone={alone:.3} late_join_ms={late_join_ms:.0} not_ok={not_ok}"
    );
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
