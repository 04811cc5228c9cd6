//! Scenario `soak [--minutes N]`: the `tollgate` binary (its own process) under a steady
//! mixed load for N minutes (10 by default; `--quick`: 15 s), then a stream of distinct
//! keys, while its memory and file descriptors are sampled from `/proc`.
//!
//! **The steady load.** 500 requests a second from 32 paced workers, spread over 1,000
//! tenants (each its own API key), three in ten streamed, three in ten repeating one of
//! 200 popular prompts (cache hits), the rest distinct (misses). The simulated provider
//! answers 1% of requests 500/503, 1% 429 with a short `retry-after-ms`, and resets 0.2%
//! of connections; the model's policy retries (4 times, obeying hints), so every one of
//! those must be absorbed: `errors` counts what a client saw that was not a whole 200
//! answer. RSS and open descriptors are read every 10 s (every 1 s with `--quick`);
//! `rss_growth_pct` is the largest sample after warm-up (the first fifth of the run, at most
//! a minute) over the first one, `fd_growth` the last count less the first. p99 latency
//! of the first window after warm-up and of the last (a minute each, or a fifth of the run)
//! shows whether the gateway slows with age.
//!
//! **Distinct keys.** Then 10⁶ requests (`--requests`; 20,000 with `--quick`), each with a
//! new `x-user-id`, to a model whose rate limit is keyed by that header — the state a
//! per-user limit keeps, one entry per key seen. `keys_rss_peak_mb` is the largest RSS
//! while they arrive; after 5 s idle, longer than the limit's housekeeping (2 s
//! here), `keys_rss_after_mb` should be back near `keys_rss_before_mb`. The allocator
//! keeps some of what it was given, so the same number of new keys is sent again:
//! `keys_rss_after_second_mb` no higher than `keys_rss_after_mb` means nothing is kept per
//! key.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_testkit::{Faults, Provider};

use crate::gateway::{free_addr, serve, sha256_hex};
use crate::Args;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

const TENANTS: usize = 1_000;
const WORKERS: usize = 32;
const RATE: f64 = 500.0;
const POPULAR: u64 = 200;

/// What the gateway process holds: resident memory (kB) and open descriptors.
fn sample(pid: u32) -> (u64, usize) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    (rss, fds)
}

fn key(tenant: usize) -> String {
    format!("sk-soak-{tenant:04}")
}

/// One request's outcome: when it ended, its latency, whether the client got a whole 200.
type Log = Arc<Mutex<Vec<(Instant, Duration, bool)>>>;

/// Sends one request and reads its whole answer: true for a complete 200.
async fn call(http: &Http, url: &str, tenant: usize, body: String, stream: bool) -> bool {
    let req = Request::post(url)
        .header("authorization", format!("Bearer {}", key(tenant)))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)));
    let Ok(req) = req else { return false };
    let Ok(res) = http.request(req).await else {
        return false;
    };
    let ok = res.status() == 200;
    let Ok(body) = res.into_body().collect().await else {
        return false;
    };
    let body = body.to_bytes();
    let whole = if stream {
        body.ends_with(b"data: [DONE]\n\n")
    } else {
        body.starts_with(b"{") && contains(&body, b"\"choices\"")
    };
    ok && whole
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The steady load: `WORKERS` workers, each sending at `RATE / WORKERS` a second until
/// `until`.
async fn steady(http: &Http, url: &str, until: Instant, log: &Log) {
    let period = Duration::from_secs_f64(WORKERS as f64 / RATE);
    let workers = (0..WORKERS).map(|w| {
        let (http, url, log) = (http.clone(), url.to_owned(), Arc::clone(log));
        async move {
            let mut rng = fastrand::Rng::with_seed(w as u64);
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            while Instant::now() < until {
                tick.tick().await;
                n += 1;
                let tenant = rng.usize(..TENANTS);
                let stream = rng.f64() < 0.3;
                let prompt = if rng.f64() < 0.3 {
                    format!("popular question {}", rng.u64(..POPULAR))
                } else {
                    format!("worker {w} question {n}: tell me something new")
                };
                let body = format!(
                    r#"{{"model":"gpt-4o-mini","max_tokens":16,"stream":{stream},"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
                );
                let t = Instant::now();
                let ok = call(&http, &url, tenant, body, stream).await;
                if let Ok(mut l) = log.lock() {
                    l.push((Instant::now(), t.elapsed(), ok));
                }
            }
        }
    });
    futures_util::future::join_all(workers).await;
}

fn p99_ms(log: &Log, from: Instant, to: Instant) -> f64 {
    let mut h = Histogram::<u64>::new(3).unwrap_or_else(|_| unreachable!("3 digits is valid"));
    if let Ok(l) = log.lock() {
        for (_, d, _) in l.iter().filter(|e| e.0 >= from && e.0 < to) {
            let _ = h.record(d.as_micros().max(1) as u64);
        }
    }
    h.value_at_quantile(0.99) as f64 / 1e3
}

/// `n` requests, each with a new `x-user-id`, 64 at a time; the RSS peak while they run,
/// and the errors. With `warm`, to a model of the same policy without the keyed limit,
/// with no `x-user-id`: the same work without new keys, so that what the keys add is
/// measured from a gateway already working at it.
async fn distinct_keys(
    http: &Http,
    url: &str,
    n: u64,
    pid: u32,
    warm: bool,
    first: u64,
) -> (u64, u64) {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (Arc::clone(&peak), Arc::clone(&done));
        tokio::spawn(async move {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(sample(pid).0, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let workers = (0..64).map(|_| {
        let (http, url, next, errors) = (
            http.clone(),
            url.to_owned(),
            Arc::clone(&next),
            Arc::clone(&errors),
        );
        async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let req = Request::post(&url)
                    .header("authorization", format!("Bearer {}", key(i as usize % TENANTS)))
                    .header("content-type", "application/json");
                let req = if warm {
                    req.body(Full::new(Bytes::from_static(
                        br#"{"model":"plain","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}"#,
                    )))
                } else {
                    req.header("x-user-id", format!("user-{:08}", first + i)).body(Full::new(
                        Bytes::from_static(
                            br#"{"model":"per-user","max_tokens":4,"messages":[{"role":"user","content":"hi"}]}"#,
                        ),
                    ))
                };
                let ok = match req {
                    Ok(req) => match http.request(req).await {
                        Ok(res) => {
                            let s = res.status();
                            res.into_body().collect().await.is_ok() && s == 200
                        }
                        Err(_) => false,
                    },
                    Err(_) => false,
                };
                if !ok {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    });
    futures_util::future::join_all(workers).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.await;
    peak.fetch_max(sample(pid).0, std::sync::atomic::Ordering::Relaxed);
    (
        peak.load(std::sync::atomic::Ordering::Relaxed),
        errors.load(std::sync::atomic::Ordering::Relaxed),
    )
}

pub(crate) async fn run(args: &Args) -> Result<(), BoxError> {
    let minutes = args.minutes.unwrap_or(if args.quick { 0.25 } else { 10.0 });
    let run_for = Duration::from_secs_f64(minutes * 60.0);
    let window = (run_for / 5).min(Duration::from_secs(60));
    let every = if args.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(10)
    };
    let keys = args
        .requests
        .unwrap_or(if args.quick { 20_000 } else { 1_000_000 });

    let provider = Provider::builder()
        .latency(Duration::from_millis(2))
        .chunk_delay(Duration::from_millis(1))
        .faults(Faults {
            server_error_rate: 0.01,
            rate_limited_rate: 0.01,
            reset_rate: 0.002,
            ..Faults::default()
        })
        .spawn()
        .await?;
    let addr = free_addr()?;
    let dir = std::env::temp_dir().join(format!("tollgate-bench-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut config = format!(
        "listen: {addr}
models:
  gpt-4o-mini:
    primary: {{ url: \"{p}\" }}
    retry: {{ max_retries: 4, backoff: 10ms }}
    cache: {{ ttl: 10m, max_size: 32MiB }}
    rate_limit: {{ requests: 100k/min, tokens: 50M/min, learn: false }}
  plain:
    primary: {{ url: \"{p}\", model: gpt-4o-mini }}
    retry: {{ max_retries: 4, backoff: 10ms }}
  per-user:
    primary: {{ url: \"{p}\", model: gpt-4o-mini }}
    retry: {{ max_retries: 4, backoff: 10ms }}
    rate_limit: {{ requests: 60/min, key: \"header:x-user-id\", mode: refuse, learn: false, housekeeping: 2s }}
tenants:
",
        p = provider.url()
    );
    for t in 0..TENANTS {
        config.push_str(&format!(
            "  t{t:04}: {{ key_sha256: \"{}\", requests: 6000/min }}\n",
            sha256_hex(&key(t))
        ));
    }
    let path = dir.join("gateway.yaml");
    std::fs::write(&path, config)?;
    let gw = serve(args, &path, addr).await?;
    let pid = gw.0.id();
    let url = format!("http://{addr}/v1/chat/completions");
    let http: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http();

    println!(
        "soak: {minutes} min at {RATE} requests/s over {TENANTS} tenants (30% streamed, 30% repeats), \
         provider with 1% 5xx, 1% 429, 0.2% resets"
    );
    let start = Instant::now();
    let until = start + run_for;
    let log = Log::default();
    let samples: Arc<Mutex<Vec<(Duration, u64, usize)>>> = Arc::default();
    let sampler = {
        let samples = Arc::clone(&samples);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            while Instant::now() < until {
                tick.tick().await;
                let (rss, fds) = sample(pid);
                if let Ok(mut s) = samples.lock() {
                    s.push((start.elapsed(), rss, fds));
                }
            }
        })
    };
    steady(&http, &url, until, &log).await;
    let _ = sampler.await;

    let warm = start + window;
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let after: Vec<_> = samples.iter().filter(|s| s.0 >= window).collect();
    let (first, last) = (after.first(), after.last());
    let base_rss = first.map_or(0, |s| s.1).max(1);
    let max_rss = after.iter().map(|s| s.1).max().unwrap_or(0);
    let rss_growth_pct = (max_rss as f64 - base_rss as f64) / base_rss as f64 * 100.0;
    let fd_growth = last.map_or(0, |s| s.2 as i64) - first.map_or(0, |s| s.2 as i64);
    let (total, errors) = log
        .lock()
        .map_or((0, 0), |l| (l.len(), l.iter().filter(|e| !e.2).count()));
    let p99_first = p99_ms(&log, warm, warm + window);
    let p99_last = p99_ms(&log, until - window, until + Duration::from_secs(5));
    let stats = provider.stats();
    println!();
    println!("  {:>8}  {:>9}  {:>4}", "at", "RSS MB", "fds");
    for (at, rss, fds) in &samples {
        println!(
            "  {:>7.0}s  {:>9.1}  {:>4}",
            at.as_secs_f64(),
            *rss as f64 / 1024.0,
            fds
        );
    }
    println!(
        "\n  {total} requests, {errors} client-visible errors; the provider injected {} faults and {} 429s",
        stats.faults, stats.rate_limited
    );
    println!(
        "  RSS after warm-up {:.1} MB, at most {:.1} MB ({rss_growth_pct:+.1}%); fds {:+}",
        base_rss as f64 / 1024.0,
        max_rss as f64 / 1024.0,
        fd_growth
    );
    println!(
        "  p99 first window {p99_first:.2} ms, last window {p99_last:.2} ms (window {window:?})"
    );

    println!("\nsoak: {keys} requests, each a new x-user-id, to a limit keyed by it");
    let (_, warm_errors) = distinct_keys(&http, &url, 20_000, pid, true, 0).await;
    let before = sample(pid).0;
    let (peak, key_errors) = distinct_keys(&http, &url, keys, pid, false, 0).await;
    // Longer than the limit's housekeeping (2 s) and the time a key's bucket takes to be
    // full again (1 s at 60/min).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after_idle = sample(pid).0;
    // As many new keys again: memory the first pass left with the allocator is reused, so
    // a second pass that ends where the first did shows there is no growth per key.
    let (peak2, errors2) = distinct_keys(&http, &url, keys, pid, false, keys).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after_second = sample(pid).0;
    let key_errors = key_errors + warm_errors + errors2;
    let mb = |kb: u64| kb as f64 / 1024.0;
    println!(
        "  RSS before {:.1} MB, peak {:.1} MB, after 5 s idle {:.1} MB; as many new keys again: peak {:.1} MB, \
         after 5 s idle {:.1} MB; {key_errors} errors",
        mb(before),
        mb(peak),
        mb(after_idle),
        mb(peak2),
        mb(after_second)
    );
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "RESULT soak minutes={minutes} requests={total} rss_growth_pct={rss_growth_pct:.1} fd_growth={fd_growth} \
         errors={errors} p99_first_ms={p99_first:.2} p99_last_ms={p99_last:.2} keys={keys} key_errors={key_errors} \
         keys_rss_before_mb={:.1} keys_rss_peak_mb={:.1} keys_rss_after_mb={:.1} keys_rss_after_second_mb={:.1}",
        mb(before),
        mb(peak),
        mb(after_idle),
        mb(after_second)
    );
    Ok(())
}
