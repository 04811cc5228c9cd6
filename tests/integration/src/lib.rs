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

/// A policy's stack served behind axum on a free loopback port, as a gateway serves it:
/// Tollgate's errors become their responses (429, 413, 503…), any other error a 502.
/// Every path is routed to the stack.
pub async fn serve(
    stack: tollgate::policy::PolicyService<axum::body::Body>,
) -> std::net::SocketAddr {
    use axum::error_handling::HandleErrorLayer;
    use axum::response::IntoResponse;

    async fn handle_error(err: axum::BoxError) -> axum::response::Response {
        tollgate::core::response::error_response::<axum::body::Body>(&*err)
            .unwrap_or_else(|| (StatusCode::BAD_GATEWAY, err.to_string()).into_response())
    }
    let app = axum::Router::new().fallback_service(
        tower::ServiceBuilder::new()
            .layer(HandleErrorLayer::new(handle_error))
            .service(stack),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free loopback port");
    let addr = listener.local_addr().expect("a bound address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Builds `yaml`'s policy stack over a pooled hyper client, ready for [`serve`].
pub fn build(yaml: &str) -> tollgate::policy::PolicyService<axum::body::Body> {
    let policy = tollgate::policy::Policy::from_yaml(yaml).expect("a valid policy");
    let upstream: Client<HttpConnector, tollgate::policy::BoxBody> =
        Client::builder(TokioExecutor::new()).build_http();
    policy.build(upstream).expect("a policy that builds")
}

/// An address on loopback where nothing listens: connecting is refused.
pub fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    let addr = l.local_addr().expect("a bound address");
    drop(l);
    format!("http://{addr}")
}

/// The JSON of every `data:` event of an SSE body but `[DONE]`.
pub fn sse_events(body: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or(serde_json::Value::Null))
        .collect()
}

/// The counting `metrics` recorder the tests check what the layers counted with.
pub use tollgate_testkit::counters::Counters;
