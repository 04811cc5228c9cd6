//! What Tollgate does, in one command: `cargo run --release --example demo`.
//!
//! It starts two simulated providers in this process — a primary with real limits (600
//! RPM, 100k TPM, a few 503s, and a three-second outage early on) and a fallback with the
//! same limits —, and the Tollgate gateway in front of them, serving the model
//! `gpt-4o-mini` with the policy of `examples/tollgate.yaml`. A burst of chat requests from
//! five tenants goes over HTTP through the gateway: a quarter of them repeated, a third
//! streamed. The same burst
//! goes at the same time, to a second pair of providers just like the first, through the
//! retry loop most programs write by hand: sleep for `Retry-After`, try again.
//!
//! It ends with a report side by side, and exits non-zero if a request through Tollgate
//! failed or the provider had to refuse more than 1% of them. With `--keep-serving`
//! (`cargo run --release --example demo -- --keep-serving`) the gateway stays up after
//! the report, its dashboard showing the burst, until ctrl-c.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tollgate::failover::X_TOLLGATE_BACKEND;
use tollgate::policy::Policy;
use tollgate_gateway::{Config, Gateway};
use tollgate_testkit::workload::{
    demo_fallback, demo_faults, demo_primary, Burst, Call, DEMO_RPM, DEMO_TPM,
};
use tollgate_testkit::{Faults, Provider, Stats};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The providers' limits (the fallback has the primary's).
const PRIMARY_RPM: u64 = DEMO_RPM;
const PRIMARY_TPM: u64 = DEMO_TPM;
const FALLBACK_RPM: u64 = DEMO_RPM;
const FALLBACK_TPM: u64 = DEMO_TPM;
/// When the primary goes down, and for how long.
const OUTAGE_AT: Duration = Duration::from_secs(1);
const OUTAGE_FOR: Duration = Duration::from_secs(3);
/// The longest the demo may run.
const TIME_LIMIT: Duration = Duration::from_secs(50);

/// What one run of the burst came to.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    cache_hits: AtomicU64,
    fallback: AtomicU64,
    retries: AtomicU64,
}

async fn providers() -> Result<(Provider, Provider), BoxError> {
    Ok((
        demo_primary().spawn().await?,
        demo_fallback().spawn().await?,
    ))
}

/// Takes the primary down for a while, as providers do.
async fn outage(primary: &Provider, started: Instant) {
    tokio::time::sleep_until((started + OUTAGE_AT).into()).await;
    primary.set_faults(Faults {
        unavailable_rate: 1.0,
        ..Faults::default()
    });
    tokio::time::sleep(OUTAGE_FOR).await;
    primary.set_faults(demo_faults());
}

fn request(call: &Call, url: &str) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-demo")
        .header("x-tenant-id", &call.tenant)
        .body(Full::new(Bytes::from(call.body.to_string())))
        .expect("a valid request")
}

/// Sends one call over HTTP through the gateway.
async fn through_tollgate(
    client: Client<HttpConnector, Full<Bytes>>,
    url: String,
    call: Call,
    tally: Arc<Tally>,
) {
    let res = client.request(request(&call, &url)).await;
    let ok = match res {
        Ok(res) if res.status() == 200 => {
            let h = res.headers();
            if h.get("x-tollgate-cache").is_some_and(|v| v == "hit") {
                tally.cache_hits.fetch_add(1, Ordering::Relaxed);
            }
            if h.get(X_TOLLGATE_BACKEND).is_some_and(|v| v != "primary") {
                tally.fallback.fetch_add(1, Ordering::Relaxed);
            }
            res.into_body().collect().await.is_ok()
        }
        Ok(res) => {
            let status = res.status();
            let body = res.into_body().collect().await.map(|b| b.to_bytes());
            eprintln!("tollgate: request {} got {status}: {body:?}", call.index);
            false
        }
        Err(e) => {
            eprintln!("tollgate: request {} failed: {e}", call.index);
            false
        }
    };
    let n = if ok { &tally.ok } else { &tally.failed };
    n.fetch_add(1, Ordering::Relaxed);
}

/// Sends one call the way most programs do: on 429 sleep for `Retry-After` (1 s without
/// it), on 5xx or a broken connection sleep a second, up to 8 retries.
async fn naively(
    client: Client<HttpConnector, Full<Bytes>>,
    url: String,
    call: Call,
    tally: Arc<Tally>,
) {
    for attempt in 0..=8 {
        if attempt > 0 {
            tally.retries.fetch_add(1, Ordering::Relaxed);
        }
        let wait = match client.request(request(&call, &url)).await {
            Ok(res) if res.status() == 200 => {
                if res.into_body().collect().await.is_ok() {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Duration::from_secs(1)
            }
            Ok(res) if res.status() == 429 => {
                let secs = res
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1);
                Duration::from_secs(secs)
            }
            Ok(res) if res.status().is_server_error() => Duration::from_secs(1),
            Ok(_) => break,
            Err(_) => Duration::from_secs(1),
        };
        tokio::time::sleep(wait).await;
    }
    tally.failed.fetch_add(1, Ordering::Relaxed);
}

fn bar(mp: &MultiProgress, name: &str, n: usize) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{prefix:>9} {bar:40.cyan/blue} {pos:>3}/{len} {elapsed:>4} {msg}",
    )
    .expect("a valid template")
    .progress_chars("=> ");
    mp.add(
        ProgressBar::new(n as u64)
            .with_style(style)
            .with_prefix(name.to_owned()),
    )
}

/// A Prometheus text page.
async fn scrape(client: &Client<HttpConnector, Full<Bytes>>, url: &str) -> Option<String> {
    let req = Request::get(url).body(Full::new(Bytes::new())).ok()?;
    let res = client.request(req).await.ok()?;
    let body = res.into_body().collect().await.ok()?.to_bytes();
    String::from_utf8(body.to_vec()).ok()
}

/// The sum of a counter over its labels in a Prometheus text page.
fn metric_total(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn quota_floor(s: &Stats, rpm: u64, tpm: u64) -> Duration {
    tollgate_testkit::workload::quota_floor(s, rpm, tpm, Duration::from_secs(60))
}

#[tokio::main]
async fn main() -> Result<ExitCode, BoxError> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tollgate.yaml");
    let mut policy = Policy::from_path(path)?;
    let (primary, fallback) = providers().await?;
    let (naive_primary, _naive_fallback) = providers().await?;
    policy.primary.url = primary.url();
    if let Some(f) = policy.fallbacks.first_mut() {
        f.url = fallback.url();
    }
    // The burst is more than the fallback's minute of tokens when the outage sends it
    // there: let a request wait for the refill (as `tollgate-bench goodput` does) rather
    // than be refused at the policy's 30 s, which a slow machine overran by 0.1 s.
    let patient = |rl: &mut Option<tollgate::policy::RateLimitConfig>| {
        if let Some(rl) = rl {
            rl.max_wait = Some(tollgate::policy::Dur(Duration::from_secs(120)));
        }
    };
    patient(&mut policy.rate_limit);
    for f in &mut policy.fallbacks {
        patient(&mut f.rate_limit);
    }
    // The gateway, in process, on a free port: the burst goes to it over HTTP.
    let gateway = Gateway::new(Config::open(
        [("gpt-4o-mini".to_owned(), policy)].into_iter().collect(),
    ))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gateway_addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn({
        let gateway = gateway.clone();
        async move {
            gateway
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
        }
    });

    let calls = Burst {
        requests: 600,
        ..Burst::default()
    }
    .calls();
    let n = calls.len();
    println!(
        "Tollgate demo: {n} chat requests from 5 tenants (a quarter repeated, a third streamed),"
    );
    println!(
        "against a primary allowing {PRIMARY_RPM} RPM and {PRIMARY_TPM} TPM with a few 503s and a"
    );
    println!(
        "{}-second outage at {} s, and a fallback; the policy is examples/tollgate.yaml.",
        OUTAGE_FOR.as_secs(),
        OUTAGE_AT.as_secs()
    );
    println!(
        "The gateway serves it at http://{gateway_addr}/v1 while the demo runs: the live dashboard at\nhttp://{gateway_addr}/dashboard, metrics at http://{gateway_addr}/metrics.\n"
    );

    let mp = MultiProgress::new();
    let (tg_bar, naive_bar) = (bar(&mp, "tollgate", n), bar(&mp, "naive", n));
    let (tg, naive) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    // The token estimator loads its tables on first use (seconds, in a debug build on a
    // loaded machine): load them now, or the burst reaches the primary only once its
    // outage has begun, and the fallback's token quota runs out (CI failed so).
    let _ = tollgate::tpm::estimate::Encoding::for_model("gpt-4o-mini").map(|e| e.count("warm up"));
    let started = Instant::now();

    let mut tasks = tokio::task::JoinSet::new();
    let tg_client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let tg_url = format!("http://{gateway_addr}/v1/chat/completions");
    let naive_client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let naive_url = format!("{}/v1/chat/completions", naive_primary.url());
    for call in calls {
        let at = (started + call.at).into();
        let (client, url, tally, b) = (
            tg_client.clone(),
            tg_url.clone(),
            Arc::clone(&tg),
            tg_bar.clone(),
        );
        let c = call.clone();
        tasks.spawn(async move {
            tokio::time::sleep_until(at).await;
            through_tollgate(client, url, c, tally).await;
            b.inc(1);
        });
        let (client, url, tally, b) = (
            naive_client.clone(),
            naive_url.clone(),
            Arc::clone(&naive),
            naive_bar.clone(),
        );
        tasks.spawn(async move {
            tokio::time::sleep_until(at).await;
            naively(client, url, call, tally).await;
            b.inc(1);
        });
    }
    let mut tg_done = None;
    let mut naive_done = None;
    let run = async {
        let outages =
            async { tokio::join!(outage(&primary, started), outage(&naive_primary, started)) };
        let finish = async {
            while tasks.join_next().await.is_some() {
                let done =
                    |t: &Tally| t.ok.load(Ordering::Relaxed) + t.failed.load(Ordering::Relaxed);
                if tg_done.is_none() && done(&tg) == n as u64 {
                    tg_done = Some(started.elapsed());
                    tg_bar.finish();
                }
                if naive_done.is_none() && done(&naive) == n as u64 {
                    naive_done = Some(started.elapsed());
                    naive_bar.finish();
                }
                tg_bar.set_message(format!(
                    "provider 429s {}",
                    primary.stats().rate_limited + fallback.stats().rate_limited
                ));
                naive_bar.set_message(format!(
                    "provider 429s {}",
                    naive_primary.stats().rate_limited
                ));
            }
        };
        tokio::join!(outages, finish);
    };
    let timed_out = tokio::time::timeout(TIME_LIMIT, run).await.is_err();
    tg_bar.finish();
    naive_bar.finish();

    // The retries, as the gateway's /metrics reports them.
    let retries = match scrape(&tg_client, &format!("http://{gateway_addr}/metrics")).await {
        Some(text) => metric_total(&text, "tollgate_retry_retries_total").to_string(),
        None => "?".to_owned(),
    };
    let (p, f, np) = (primary.stats(), fallback.stats(), naive_primary.stats());
    let get = |t: &Tally, f: fn(&Tally) -> &AtomicU64| f(t).load(Ordering::Relaxed);
    let secs = |d: Option<Duration>| {
        d.map_or("unfinished".to_owned(), |d| {
            format!("{:.1} s", d.as_secs_f64())
        })
    };
    let floor =
        quota_floor(&p, PRIMARY_RPM, PRIMARY_TPM).max(quota_floor(&f, FALLBACK_RPM, FALLBACK_TPM));
    let tg_failed = get(&tg, |t| &t.failed)
        + (n as u64).saturating_sub(get(&tg, |t| &t.ok) + get(&tg, |t| &t.failed));
    let tg_429 = p.rate_limited + f.rate_limited;

    println!();
    println!("{:<34} {:>12} {:>12}", "", "tollgate", "naive loop");
    let row = |label: &str, a: String, b: String| println!("{label:<34} {a:>12} {b:>12}");
    row(
        "requests succeeded",
        get(&tg, |t| &t.ok).to_string(),
        get(&naive, |t| &t.ok).to_string(),
    );
    row(
        "requests failed",
        tg_failed.to_string(),
        (n as u64 - get(&naive, |t| &t.ok)).to_string(),
    );
    row(
        "429s from the providers",
        tg_429.to_string(),
        np.rate_limited.to_string(),
    );
    row(
        "requests the providers saw",
        (p.requests + f.requests).to_string(),
        np.requests.to_string(),
    );
    row(
        "answered from cache",
        get(&tg, |t| &t.cache_hits).to_string(),
        "0".into(),
    );
    row("retries", retries, get(&naive, |t| &t.retries).to_string());
    row(
        "answered by the fallback",
        get(&tg, |t| &t.fallback).to_string(),
        "0".into(),
    );
    row(
        "tokens the providers charged",
        (p.tokens_served() + f.tokens_served()).to_string(),
        np.tokens_served().to_string(),
    );
    row(
        "time until every request ended",
        secs(tg_done),
        secs(naive_done),
    );
    println!(
        "\nThe quotas allow what Tollgate sent in no less than {:.1} s: the primary served {} requests and\n{} tokens, the fallback {} and {}; each bucket holds a minute's worth, then refills.",
        floor.as_secs_f64(), p.ok, p.tokens_served(), f.ok, f.tokens_served()
    );
    if let Some(d) = tg_done {
        if floor > Duration::from_secs(1) {
            println!(
                "Tollgate's makespan is {:.2}× that.",
                d.as_secs_f64() / floor.as_secs_f64()
            );
        }
    }

    let mut bad = Vec::new();
    if timed_out {
        bad.push(format!("the demo ran past {} s", TIME_LIMIT.as_secs()));
    }
    if tg_failed > 0 {
        bad.push(format!("{tg_failed} requests through Tollgate failed"));
    }
    if tg_429 * 100 > n as u64 {
        bad.push(format!(
            "the providers refused {tg_429} requests sent through Tollgate"
        ));
    }
    // `--keep-serving`: the gateway stays up (its dashboard showing the burst) until
    // ctrl-c, before the verdict.
    if std::env::args().any(|a| a == "--keep-serving") {
        println!("\nThe gateway keeps serving: http://{gateway_addr}/dashboard (ctrl-c to stop).");
        let _ = tokio::signal::ctrl_c().await;
    }
    let _ = stop.send(());
    let _ = serving.await;
    if bad.is_empty() {
        println!("\nOK: every request through Tollgate succeeded.");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("\nFAILED: {}", bad.join("; "));
        Ok(ExitCode::FAILURE)
    }
}
