//! Helpers for Tollgate's cross-crate tests: a small HTTP client for talking to the
//! simulated provider over real sockets. The tests themselves live in `tests/`.
//!
//! ```no_run
//! use tollgate_integration_tests::{chat, client, post};
//!
//! # async fn demo(base: &str) -> Result<(), tollgate_integration_tests::BoxError> {
//! let answer = post(&client(), &format!("{base}/v1/chat/completions"), "sk-test", &chat("Hi"), &[]).await?;
//! assert_eq!(answer.status, 200);
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

/// The boxed error type of these helpers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A pooled HTTP/1.1 client.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A new pooled client.
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A whole answer.
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// `POST base+path` with a JSON body, the API key as a bearer token, and extra headers;
/// the whole answer, or the transport error.
pub async fn post(
    client: &HttpClient,
    url: &str,
    key: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> Result<Answer, BoxError> {
    let mut req = Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_string())))?;
    let res = client.request(req).await?;
    let (parts, body) = res.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// A one-message chat request.
pub fn chat(content: &str) -> serde_json::Value {
    serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": content}]})
}
