//! An axum server that limits each tenant (the `x-tenant-id` header) to 5 requests a
//! minute, and everyone together to 100, refusing the rest with a 429 that carries
//! `Retry-After` and the IETF `RateLimit` headers.
//!
//! ```text
//! cargo run --example axum_tenant_limit            # serves, sends a few requests, exits
//! cargo run --example axum_tenant_limit -- --serve # serves on 127.0.0.1:3000 until Ctrl-C
//! ```

use std::net::SocketAddr;

use axum::error_handling::HandleErrorLayer;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{BoxError, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_core::key::Header;
use tollgate_core::response::error_response;
use tollgate_ratelimit::{Limit, Quota, RateLimitLayer};
use tower::ServiceBuilder;

/// Refusals and bad bodies become their proper responses; anything else is a 500.
async fn handle_error(err: BoxError) -> axum::response::Response {
    error_response::<axum::body::Body>(&*err)
        .unwrap_or_else(|| (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response())
}

fn app() -> Router {
    let limits = RateLimitLayer::builder()
        .limit(Limit::new("tenant", Quota::per_minute(5)).keyed_by(Header::new("x-tenant-id")))
        .limit(Limit::new("global", Quota::per_minute(100)))
        .build();
    Router::new()
        .route(
            "/v1/chat/completions",
            post(|| async { "{\"answer\":\"hello\"}" }),
        )
        // axum clones the service for every connection; the limits are shared by all.
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(handle_error))
                .layer(limits),
        )
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let serve = std::env::args().any(|a| a == "--serve");
    let addr: SocketAddr = if serve {
        "127.0.0.1:3000"
    } else {
        "127.0.0.1:0"
    }
    .parse()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    let server = tokio::spawn(async move { axum::serve(listener, app()).await });
    if serve {
        server.await??;
        return Ok(());
    }

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    for (i, tenant) in ["acme"; 6].into_iter().chain(["globex"]).enumerate() {
        let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
            .header("x-tenant-id", tenant)
            .body(Full::new(Bytes::new()))?;
        let res = client.request(req).await?;
        let status = res.status();
        let h = res.headers().clone();
        let body = res.into_body().collect().await?.to_bytes();
        print!("request {} from {tenant:6}: {status}", i + 1);
        if status == StatusCode::TOO_MANY_REQUESTS {
            print!(
                "  retry-after: {}  ratelimit: {}",
                h["retry-after"].to_str()?,
                h["ratelimit"].to_str()?
            );
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            print!("\n    {}", v["error"]["message"]);
        }
        println!();
    }
    server.abort();
    Ok(())
}
