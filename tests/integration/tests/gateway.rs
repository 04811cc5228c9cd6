//! A gateway as a user would build one: axum in front, inbound per-tenant limits in refuse
//! mode, and the policy's outbound stack behind, tried with a plain HTTP client.

use std::net::SocketAddr;

use axum::error_handling::HandleErrorLayer;
use axum::response::IntoResponse;
use axum::Router;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tollgate::core::key::Header;
use tollgate::core::response::error_response;
use tollgate::policy::{BoxBody, Policy};
use tollgate::ratelimit::{Limit, Quota, RateLimitLayer};
use tollgate_integration_tests::{chat, client, post};
use tollgate_testkit::Provider;
use tower::ServiceBuilder;

async fn handle_error(err: axum::BoxError) -> axum::response::Response {
    error_response::<axum::body::Body>(&*err)
        .unwrap_or_else(|| (http::StatusCode::BAD_GATEWAY, err.to_string()).into_response())
}

/// Serves the gateway on a free port.
async fn gateway(provider: &Provider) -> SocketAddr {
    let mut policy = Policy::from_yaml(
        r#"
primary: { url: "http://placeholder", headers: { authorization: "Bearer sk-gateway" } }
retry:   { max_retries: 2, backoff: 100ms }
body_limit: 64KiB
"#,
    )
    .unwrap();
    policy.primary.url = provider.url();
    let upstream: Client<HttpConnector, BoxBody> =
        Client::builder(TokioExecutor::new()).build_http();
    let outbound = policy.build::<_, _, axum::body::Body>(upstream).unwrap();
    let inbound = RateLimitLayer::builder()
        .limit(Limit::new("tenant", Quota::per_minute(3)).keyed_by(Header::new("x-tenant-id")))
        .refuse()
        .build();
    let app = Router::new().route_service(
        "/v1/chat/completions",
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(handle_error))
            .layer(inbound)
            .service(outbound),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test]
async fn each_tenant_gets_its_quota_and_a_proper_429_beyond_it() {
    let provider = Provider::builder().spawn().await.unwrap();
    let addr = gateway(&provider).await;
    let url = format!("http://{addr}/v1/chat/completions");
    let http = client();

    for i in 0..3 {
        let a = post(
            &http,
            &url,
            "sk-acme",
            &chat(&format!("q{i}")),
            &[("x-tenant-id", "acme")],
        )
        .await
        .unwrap();
        assert_eq!(a.status, 200, "{:?}", a.body);
        assert_eq!(a.json()["usage"]["completion_tokens"], 16);
    }
    let refused = post(
        &http,
        &url,
        "sk-acme",
        &chat("q3"),
        &[("x-tenant-id", "acme")],
    )
    .await
    .unwrap();
    assert_eq!(refused.status, 429);
    let wait: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!(
        (1..=20).contains(&wait),
        "a third of a minute at most: {wait}"
    );
    assert!(
        refused.header("ratelimit").unwrap().contains("r=0"),
        "{:?}",
        refused.headers
    );
    assert_eq!(refused.json()["error"]["code"], "rate_limit_exceeded");

    let other = post(
        &http,
        &url,
        "sk-globex",
        &chat("q"),
        &[("x-tenant-id", "globex")],
    )
    .await
    .unwrap();
    assert_eq!(other.status, 200, "another tenant is not held back by acme");
    assert_eq!(
        provider.key_stats("sk-gateway").requests,
        4,
        "refused requests never reach the provider, and the gateway's key is used"
    );
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_the_gateway_goes_on() {
    let provider = Provider::builder().spawn().await.unwrap();
    let addr = gateway(&provider).await;
    let url = format!("http://{addr}/v1/chat/completions");
    let http = client();

    let big =
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(100_000)}]});
    let a = post(&http, &url, "k", &big, &[("x-tenant-id", "t1")])
        .await
        .unwrap();
    assert_eq!(a.status, 413);

    let req = http::Request::post(&url)
        .header("x-tenant-id", "t2")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"{not json",
        )))
        .unwrap();
    let res = http.request(req).await.unwrap();
    assert_eq!(res.status(), 400);

    let a = post(&http, &url, "k", &chat("fine"), &[("x-tenant-id", "t3")])
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(
        provider.stats().requests,
        1,
        "only the good request went upstream"
    );

    // The upstream gone: a clear 502, not a hang or a panic.
    provider.shutdown().await;
    let a = post(&http, &url, "k", &chat("down"), &[("x-tenant-id", "t4")])
        .await
        .unwrap();
    assert_eq!(a.status, 502, "{:?}", a.body);
}
