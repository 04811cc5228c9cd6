//! Scenario `tpm`: what estimating a request's tokens costs, and whether the estimate is
//! exact against the simulated provider's own count. (The budget layer is not built yet:
//! `layer_ns` reads `na` until it is.)

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_core::facts::RequestFacts;
use tollgate_testkit::Provider;
use tollgate_tpm::estimate::Estimator;

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
            ("layer_ns", "na".to_owned()),
            ("est_us_1k", format!("{:.1}", us[0])),
            ("est_us_10k", format!("{:.1}", us[1])),
            ("est_us_100k", format!("{:.1}", us[2])),
        ],
    );
    Ok(())
}
