//! The simulated provider, seen through `tollgate-core`'s parsers.
//!
//! Starts a provider allowing 5 requests and 2,000 tokens a minute, sends chat requests
//! until it refuses, and prints what each answer says: usage, the provider's view of the
//! limits, and how long the refusal asks us to wait.
//!
//! ```text
//! cargo run --example simulated_provider
//! ```

use std::time::SystemTime;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_core::headers::{self, RateLimitInfo};
use tollgate_core::usage::Usage;
use tollgate_testkit::Provider;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let provider = Provider::builder().rpm(5).tpm(2_000).spawn().await?;
    println!(
        "simulated provider on {} (5 RPM, 2000 TPM per key)\n",
        provider.url()
    );

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let url = format!("{}/v1/chat/completions", provider.url());
    let body = r#"{"model":"gpt-4o","max_tokens":32,"messages":[{"role":"user","content":"Tell me about toll gates."}]}"#;

    for i in 1..=6 {
        let req = Request::post(url.as_str())
            .header("content-type", "application/json")
            .header("authorization", "Bearer sk-example")
            .body(Full::new(Bytes::from_static(body.as_bytes())))?;
        let res = client.request(req).await?;
        let (parts, body) = res.into_parts();
        let body = body.collect().await?.to_bytes();
        let info = RateLimitInfo::from_headers(&parts.headers, SystemTime::now());
        print!("request {i}: {}", parts.status);
        if let Some(u) = Usage::from_json_bytes(&body) {
            print!(
                "  usage {} in + {} out = {}",
                u.input_tokens, u.output_tokens, u.total_tokens
            );
        }
        if let (Some(r), Some(t)) = (info.requests.remaining, info.tokens.remaining) {
            print!("  remaining {r} requests, {t} tokens");
        }
        if parts.status == 429 {
            let wait = headers::retry_after_ms(&parts.headers)
                .or_else(|| headers::retry_after(&parts.headers, SystemTime::now()));
            print!("  -> wait {wait:?} before retrying");
        }
        println!();
    }

    let s = provider.stats();
    println!(
        "\nprovider counted {} requests: {} ok, {} refused, {} tokens served",
        s.requests,
        s.ok,
        s.rate_limited,
        s.tokens_served()
    );
    Ok(())
}
