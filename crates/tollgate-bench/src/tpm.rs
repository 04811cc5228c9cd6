//! Scenario `tpm`: what estimating a request's tokens costs, whether the estimate is exact
//! against the simulated provider's own count, and the layer's own cost per request on
//! the admit path (reserve, call, settle) for a small chat request.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::convert::Infallible;
use std::task::{Context, Waker};

use http::Response;
use tollgate_core::facts::{ReplayBody, RequestFacts};
use tollgate_testkit::Provider;
use tollgate_tpm::estimate::Estimator;
use tollgate_tpm::{Budget, TokenQuota, TpmLayer};
use tower::{service_fn, Layer, Service};

use crate::report;
use crate::Args;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const WORDS: &[&str] = &[
    "the ",
    "rate ",
    "limit ",
    "protects ",
    "providers; ",
    "tokens ",
    "per ",
    "minute, ",
    "fn ",
    "main() ",
    "{ ",
    "} ",
    "\"json\": ",
    "[1, 2] ",
    "Grüße ",
    "東京 ",
    "🙂 ",
    "\n",
];

/// About `bytes` of text that never repeats (words drawn by an LCG, numbers that never
/// recur), so no cache of pieces can make counting look cheaper than it is.
fn text(bytes: usize, seed: u64) -> String {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut out = String::with_capacity(bytes + 16);
    let mut n = seed.wrapping_mul(1_000_003);
    while out.len() < bytes {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        out.push_str(WORDS[(x >> 33) as usize % WORDS.len()]);
        if x.is_multiple_of(5) {
            n += 1;
            out.push_str(&format!("{} ", n.wrapping_mul(7919) % 1_000_003));
        }
    }
    out
}

fn chat(content: &str) -> serde_json::Value {
    serde_json::json!({"model": "gpt-4o", "max_tokens": 16,
                       "messages": [{"role": "user", "content": content}]})
}

fn facts(body: &serde_json::Value) -> Result<RequestFacts, BoxError> {
    Ok(RequestFacts::parse(
        "/v1/chat/completions",
        &HeaderMap::new(),
        Bytes::from(body.to_string()),
    )?)
}

use crate::load::{drain, ready};

/// Nanoseconds per request through `svc` (call and read the answer to its end, which
/// settles it), requests built before the clock starts.
fn per_request_ns<S, B>(mut svc: S, n: usize) -> f64
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let body = Bytes::from_static(
        br#"{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"Say hello in a few words."}]}"#,
    );
    let mut elapsed = Duration::ZERO;
    let mut done = 0;
    let mut cx = Context::from_waker(Waker::noop());
    while done < n {
        let reqs: Vec<_> = (0..1000)
            .map(|_| {
                Request::post("/v1/chat/completions")
                    .body(Full::new(body.clone()))
                    .unwrap_or_default()
            })
            .collect();
        let start = Instant::now();
        for req in reqs {
            let _ = svc.poll_ready(&mut cx);
            if let Some(Ok(res)) = ready(svc.call(req)) {
                drain(res.into_body());
            }
        }
        elapsed += start.elapsed();
        done += 1000;
    }
    elapsed.as_nanos() as f64 / done as f64
}

/// The layer's own cost per request: through it, less the same requests sent straight to
/// the no-op provider. Medians of alternating rounds.
fn layer_ns(n: usize) -> f64 {
    let provider = || {
        service_fn(|_: Request<ReplayBody>| {
            let body = r#"{"usage":{"prompt_tokens":15,"completion_tokens":5,"total_tokens":20}}"#;
            std::future::ready(Ok::<_, Infallible>(Response::new(Full::new(
                Bytes::from_static(body.as_bytes()),
            ))))
        })
    };
    // The direct path still has to turn the request body into the one the provider takes.
    let direct = || {
        let mut p = provider();
        service_fn(move |req: Request<Full<Bytes>>| p.call(req))
    };
    let layer = TpmLayer::builder()
        .budget(Budget::new("tpm", TokenQuota::per_minute(u64::MAX / 4)))
        .housekeeping(None)
        .build();
    let rounds = 9;
    let (mut through, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        through.push(per_request_ns(layer.layer(provider()), n / rounds));
        plain.push(per_request_ns(direct(), n / rounds));
    }
    through.sort_by(f64::total_cmp);
    plain.sort_by(f64::total_cmp);
    (through[rounds / 2] - plain[rounds / 2]).max(0.0)
}

pub(crate) async fn run(args: &Args) -> Result<(), BoxError> {
    let estimator = Estimator::default();
    let reps = if args.quick { 20 } else { 100 };
    let provider = Provider::builder().completion_tokens(1).spawn().await?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let url = format!("{}/v1/chat/completions", provider.url());

    let mut rows = Vec::new();
    let mut exact = true;
    let mut mb_s_100k = 0.0;
    let mut us = Vec::new();
    for kb in [1usize, 10, 100] {
        // A fresh text for every run; parsing is outside the timed part.
        let all: Vec<RequestFacts> = (0..reps)
            .map(|seed| facts(&chat(&text(kb * 1024, seed as u64))))
            .collect::<Result<_, _>>()?;
        let _ = estimator.estimate(&all[0]); // load the encoding
        let mut elapsed = Duration::ZERO;
        for f in &all {
            let start = Instant::now();
            std::hint::black_box(estimator.estimate(f));
            elapsed += start.elapsed();
        }
        let per = elapsed.as_secs_f64() / reps as f64;
        let mb_s = (kb * 1024) as f64 / per / 1e6;
        if kb == 100 {
            mb_s_100k = mb_s;
        }
        us.push(per * 1e6);

        // Exactness: the provider's own count of a few of them.
        let mut worst = 0i64;
        for seed in 0..3u64 {
            let body = chat(&text(kb * 1024, 10_000 + seed));
            let estimate = estimator.estimate(&facts(&body)?);
            let req = Request::post(url.as_str())
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))?;
            let res = client.request(req).await?;
            let v: serde_json::Value =
                serde_json::from_slice(&res.into_body().collect().await?.to_bytes())?;
            let counted = v["usage"]["prompt_tokens"]
                .as_u64()
                .ok_or("no usage in the answer")?;
            let diff = estimate.prompt_tokens as i64 - counted as i64;
            if diff.abs() > worst.abs() {
                worst = diff;
            }
            exact &= diff == 0 && estimate.exact;
        }
        rows.push((
            format!("{kb} KB prompt"),
            format!(
                "{:8.1} µs   {mb_s:7.1} MB/s   estimate − provider's count: {worst:+}",
                per * 1e6
            ),
        ));
    }
    provider.shutdown().await;
    let layer = layer_ns(if args.quick { 100_000 } else { 500_000 });
    rows.push((
        "layer, admit path".to_owned(),
        format!("{layer:8.0} ns per small chat request (estimate, reserve, call, settle), over a no-op provider"),
    ));
    let table: Vec<(&str, String)> = rows.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    report::table(
        &format!("tpm: estimating a gpt-4o chat request (o200k_base), {reps} fresh texts per size"),
        &table,
    );
    report::result_line(
        "tpm",
        &[
            ("est_mb_s_100k", format!("{mb_s_100k:.1}")),
            ("exact", exact.to_string()),
            ("layer_ns", format!("{layer:.0}")),
            ("est_us_1k", format!("{:.1}", us[0])),
            ("est_us_10k", format!("{:.1}", us[1])),
            ("est_us_100k", format!("{:.1}", us[2])),
        ],
    );
    Ok(())
}
