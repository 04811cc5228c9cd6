//! The gateway end to end: served on a loopback port, called with a real HTTP client, the
//! simulated provider (or a small recording upstream) behind it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tollgate_gateway::{Config, Gateway};
use tollgate_integration_tests::{chat, client, dead_url, post, sse_events, Answer, HttpClient};
use tollgate_testkit::Provider;

fn hash(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A gateway served on a free port until dropped.
struct Running {
    addr: SocketAddr,
    gateway: Gateway,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops accepting and waits for the drain to end.
    async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        (&mut self.task).await.unwrap().unwrap();
    }
}

async fn start(gateway: Gateway) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let g = gateway.clone();
    let task = tokio::spawn(async move {
        g.serve(listener, async {
            let _ = stopped.await;
        })
        .await
    });
    Running {
        addr,
        gateway,
        stop: Some(stop),
        task,
    }
}

/// The config with `{provider}` replaced by `url`.
fn config(yaml: &str, url: &str) -> Config {
    Config::from_yaml(&yaml.replace("{provider}", url)).unwrap()
}

fn keyed(extra_tenant: &str) -> String {
    format!(
        r#"
shutdown_grace: 10s
models:
  gpt-4o:
    primary: {{ url: "{{provider}}", headers: {{ authorization: "Bearer sk-provider" }} }}
  text-embedding-3-small:
    primary: {{ url: "{{provider}}", headers: {{ authorization: "Bearer sk-provider" }} }}
aliases: {{ gpt-4o-latest: gpt-4o }}
tenants:
  acme: {{ key_sha256: "{}" }}
  small: {{ key_sha256: "{}", models: [text-embedding-3-small] }}
{extra_tenant}
"#,
        hash("vk-acme"),
        hash("vk-small"),
    )
}

async fn get(http: &HttpClient, url: &str, key: Option<&str>) -> Answer {
    let mut req = Request::get(url);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let res = http
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

#[tokio::test]
async fn chat_plain_and_streamed_goes_through_with_the_providers_key_never_the_callers() {
    let provider = Provider::builder().spawn().await.unwrap();
    let gw = start(Gateway::new(config(&keyed(""), &provider.url())).unwrap()).await;
    let http = client();
    let url = gw.url("/v1/chat/completions");

    let a = post(
        &http,
        &url,
        "vk-acme",
        &chat("hello"),
        &[("x-request-id", "abc-1")],
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.json()["usage"]["completion_tokens"], 16);
    assert_eq!(
        a.header("x-request-id"),
        Some("abc-1"),
        "the caller's id comes back"
    );
    assert_eq!(a.header("x-tollgate-backend"), Some("gpt-4o"));

    // Through an alias, streamed with usage asked for.
    let mut body = chat("stream please");
    body["model"] = json!("gpt-4o-latest");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let s = post(&http, &url, "vk-acme", &body, &[]).await.unwrap();
    assert_eq!(s.status, 200);
    assert!(s
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    assert!(
        s.header("x-request-id").unwrap().starts_with("req_"),
        "an id is made"
    );
    let events = sse_events(&s.body);
    assert!(events.len() > 2, "{events:?}");
    assert_eq!(events.last().unwrap()["usage"]["completion_tokens"], 16);
    assert!(String::from_utf8_lossy(&s.body)
        .trim_end()
        .ends_with("data: [DONE]"));

    // Streamed without usage asked for: none shown.
    body["stream_options"] = serde_json::Value::Null;
    body["messages"][0]["content"] = json!("no usage");
    let s = post(&http, &url, "vk-acme", &body, &[]).await.unwrap();
    assert_eq!(s.status, 200);
    assert!(sse_events(&s.body)
        .iter()
        .all(|e| e.get("usage").is_none_or(|u| u.is_null())));

    assert_eq!(provider.key_stats("sk-provider").requests, 3);
    assert_eq!(
        provider.key_stats("vk-acme").requests,
        0,
        "a tenant's key never reaches a provider"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn embeddings_go_through_and_models_lists_what_a_key_may_use() {
    let provider = Provider::builder().spawn().await.unwrap();
    let gw = start(Gateway::new(config(&keyed(""), &provider.url())).unwrap()).await;
    let http = client();
    let e = post(
        &http,
        &gw.url("/v1/embeddings"),
        "vk-small",
        &json!({"model": "text-embedding-3-small", "input": ["a", "b"]}),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(e.status, 200, "{:?}", e.body);
    assert_eq!(e.json()["data"].as_array().unwrap().len(), 2);

    let all = get(&http, &gw.url("/v1/models"), Some("vk-acme")).await;
    let ids: Vec<_> = all.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["gpt-4o", "gpt-4o-latest", "text-embedding-3-small"]);
    let small = get(&http, &gw.url("/v1/models"), Some("vk-small")).await;
    assert_eq!(small.json()["data"].as_array().unwrap().len(), 1);
    assert_eq!(
        get(&http, &gw.url("/v1/models/gpt-4o"), Some("vk-small"))
            .await
            .status,
        404
    );
    assert_eq!(
        get(&http, &gw.url("/v1/models/gpt-4o"), Some("vk-acme"))
            .await
            .status,
        200
    );
    assert_eq!(get(&http, &gw.url("/v1/models"), None).await.status, 401);
    gw.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_openai_errors_and_spend_nothing() {
    let provider = Provider::builder().spawn().await.unwrap();
    let yaml = keyed("").replace(
        "shutdown_grace: 10s",
        "shutdown_grace: 10s\nbody_limit: 4KiB",
    );
    let gw = start(Gateway::new(config(&yaml, &provider.url())).unwrap()).await;
    let http = client();
    let url = gw.url("/v1/chat/completions");
    let code = |a: &Answer| a.json()["error"]["code"].as_str().unwrap_or("").to_owned();

    let a = post(&http, &url, "vk-nobody", &chat("x"), &[])
        .await
        .unwrap();
    assert_eq!(
        (a.status, code(&a).as_str()),
        (StatusCode::UNAUTHORIZED, "invalid_api_key")
    );
    let req = Request::post(&url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(chat("x").to_string())))
        .unwrap();
    let a = http.request(req).await.unwrap();
    assert_eq!(a.status(), 401, "no key at all");

    let a = post(&http, &url, "vk-small", &chat("x"), &[])
        .await
        .unwrap();
    assert_eq!(
        (a.status, code(&a).as_str()),
        (StatusCode::FORBIDDEN, "model_not_allowed")
    );

    let mut unknown = chat("x");
    unknown["model"] = json!("gpt-9");
    let a = post(&http, &url, "vk-acme", &unknown, &[]).await.unwrap();
    assert_eq!(
        (a.status, code(&a).as_str()),
        (StatusCode::NOT_FOUND, "model_not_found")
    );

    let a = post(&http, &url, "vk-acme", &chat(&"x".repeat(10_000)), &[])
        .await
        .unwrap();
    assert_eq!(a.status, 413);
    assert_eq!(a.json()["error"]["type"], "invalid_request_error");

    let req = Request::post(&url)
        .header("authorization", "Bearer vk-acme")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{not json")))
        .unwrap();
    let res = http.request(req).await.unwrap();
    assert_eq!(res.status(), 400);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(v["error"]["message"].is_string(), "{v}");

    let a = post(&http, &url, "vk-acme", &json!({"messages": []}), &[])
        .await
        .unwrap();
    assert_eq!(
        (a.status, code(&a).as_str()),
        (StatusCode::BAD_REQUEST, "missing_model")
    );

    let a = post(&http, &gw.url("/v1/nothing"), "vk-acme", &chat("x"), &[])
        .await
        .unwrap();
    assert_eq!(
        (a.status, code(&a).as_str()),
        (StatusCode::NOT_FOUND, "unknown_url")
    );
    let a = get(&http, &url, Some("vk-acme")).await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(a.json()["error"]["message"].is_string());

    assert_eq!(provider.stats().requests, 0, "nothing reached the provider");
    // And the gateway goes on.
    let a = post(&http, &url, "vk-acme", &chat("fine"), &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_tenant_over_its_rate_gets_a_proper_429_and_others_go_on() {
    let provider = Provider::builder().spawn().await.unwrap();
    let extra = format!(
        "  capped: {{ key_sha256: \"{}\", requests: 2/min }}",
        hash("vk-capped")
    );
    let gw = start(Gateway::new(config(&keyed(&extra), &provider.url())).unwrap()).await;
    let http = client();
    let url = gw.url("/v1/chat/completions");
    for i in 0..2 {
        let a = post(&http, &url, "vk-capped", &chat(&format!("q{i}")), &[])
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{:?}", a.body);
    }
    let r = post(&http, &url, "vk-capped", &chat("q3"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 429);
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=30).contains(&wait), "{wait}");
    assert!(
        r.header("ratelimit").unwrap().contains("r=0"),
        "{:?}",
        r.headers
    );
    assert!(r.header("ratelimit-policy").is_some());
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    let other = post(&http, &url, "vk-acme", &chat("q"), &[]).await.unwrap();
    assert_eq!(other.status, 200);
    assert_eq!(
        provider.stats().requests,
        3,
        "the refused request never left"
    );
    gw.shutdown().await;
}

/// A gateway whose tenant `vk-one` has `limits`, and a stream of that tenant's in
/// flight (its head out, its body still coming: 12 chunks 40 ms apart).
async fn one_place_taken_by_a_stream(
    limits: &str,
) -> (
    Running,
    HttpClient,
    String,
    http::Response<hyper::body::Incoming>,
    Provider,
) {
    let provider = Provider::builder()
        .chunk_delay(Duration::from_millis(40))
        .completion_tokens(12)
        .tokens_per_chunk(1)
        .spawn()
        .await
        .unwrap();
    let extra = format!("  one: {{ key_sha256: \"{}\", {limits} }}", hash("vk-one"));
    let gw = start(Gateway::new(config(&keyed(&extra), &provider.url())).unwrap()).await;
    let http = client();
    let url = gw.url("/v1/chat/completions");
    let mut body = chat("long stream");
    body["stream"] = json!(true);
    let req = Request::post(&url)
        .header("authorization", "Bearer vk-one")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let streaming = http.request(req).await.unwrap();
    assert_eq!(streaming.status(), 200);
    (gw, http, url, streaming, provider)
}

#[tokio::test]
async fn a_tenant_at_its_concurrency_is_refused_until_its_stream_ends() {
    let (gw, http, url, streaming, _provider) = one_place_taken_by_a_stream("concurrency: 1").await;
    // The stream's head is out, its body still coming: the one place is taken.
    let second = post(&http, &url, "vk-one", &chat("meanwhile"), &[])
        .await
        .unwrap();
    assert_eq!(second.status, 429);
    assert_eq!(second.header("retry-after"), Some("1"));
    let rest = streaming.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&rest).contains("[DONE]"));
    let third = post(&http, &url, "vk-one", &chat("after"), &[])
        .await
        .unwrap();
    assert_eq!(third.status, 200, "the place is free once the stream ended");
    // That answer had a Content-Length: the server stops polling at its last byte, and
    // the body's end must still free the place (and write the access line).
    assert!(
        third.header("content-length").is_some(),
        "{:?}",
        third.headers
    );
    let fourth = post(&http, &url, "vk-one", &chat("and again"), &[])
        .await
        .unwrap();
    assert_eq!(
        fourth.status, 200,
        "a sized answer's end frees the place too"
    );
    let stats = get(&http, &gw.url("/api/stats"), None).await.json();
    assert_eq!(stats["models"][0]["in_flight"], 0, "{stats}");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_waiting_tenant_at_its_concurrency_takes_the_place_its_stream_frees() {
    let (gw, http, url, streaming, _provider) =
        one_place_taken_by_a_stream("concurrency: 1, mode: wait, max_wait: 30s").await;
    let second = {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move {
            post(&http, &url, "vk-one", &chat("meanwhile"), &[])
                .await
                .unwrap()
                .status
        })
    };
    let rest = streaming.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&rest).contains("[DONE]"));
    assert_eq!(
        second.await.unwrap(),
        200,
        "it waited for the place instead of a 429"
    );
    gw.shutdown().await;
}

/// A recording upstream for the endpoints the simulated provider does not speak: answers
/// every POST with a small JSON body with usage, and keeps what it saw.
async fn recorder() -> (
    String,
    Arc<Mutex<Vec<(String, http::HeaderMap, serde_json::Value)>>>,
) {
    use axum::extract::State;
    type Seen = Arc<Mutex<Vec<(String, http::HeaderMap, serde_json::Value)>>>;
    let seen: Seen = Arc::default();
    async fn handle(
        State(seen): State<Seen>,
        req: Request<axum::body::Body>,
    ) -> axum::response::Response {
        let path = req.uri().path().to_owned();
        let headers = req.headers().clone();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        seen.lock().unwrap().push((path.clone(), headers, v));
        let answer = if path == "/v1/messages" {
            json!({"id": "msg_1", "type": "message", "role": "assistant", "content": [{"type": "text", "text": "hi"}],
                   "usage": {"input_tokens": 7, "output_tokens": 2}})
        } else {
            json!({"id": "x", "object": "response", "output_text": "hi",
                   "usage": {"input_tokens": 7, "output_tokens": 2, "prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}})
        };
        let mut res = axum::response::Response::new(axum::body::Body::from(answer.to_string()));
        res.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/json"),
        );
        res
    }
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(Arc::clone(&seen));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

#[tokio::test]
async fn completions_responses_and_anthropic_messages_reach_their_backends_with_their_keys() {
    let (url, seen) = recorder().await;
    std::env::set_var("TOLLGATE_E2E_ANTHROPIC_KEY", "sk-ant-e2e");
    let yaml = r#"
open: true
models:
  gpt-4o:
    primary: { url: "{provider}", headers: { authorization: "Bearer sk-oai" } }
  claude-sonnet-4:
    primary: { url: "{provider}", api_key_env: TOLLGATE_E2E_ANTHROPIC_KEY, api_key_header: x-api-key, headers: { anthropic-version: "2023-06-01" } }
"#;
    let gw = start(Gateway::new(config(yaml, &url)).unwrap()).await;
    let http = client();
    let c = post(
        &http,
        &gw.url("/v1/completions"),
        "caller-key",
        &json!({"model": "gpt-4o", "prompt": "Say hi"}),
        &[("x-tenant-id", "team-a")],
    )
    .await
    .unwrap();
    assert_eq!(c.status, 200, "{:?}", c.body);
    let r = post(
        &http,
        &gw.url("/v1/responses"),
        "caller-key",
        &json!({"model": "gpt-4o", "input": "Say hi"}),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let m = post(
        &http,
        &gw.url("/v1/messages"),
        "caller-key",
        &json!({"model": "claude-sonnet-4", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}),
        &[("x-api-key", "caller-key")],
    )
    .await
    .unwrap();
    assert_eq!(m.status, 200, "{:?}", m.body);
    assert_eq!(m.json()["usage"]["output_tokens"], 2);

    let seen = seen.lock().unwrap().clone();
    let paths: Vec<_> = seen.iter().map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(paths, ["/v1/completions", "/v1/responses", "/v1/messages"]);
    assert_eq!(seen[0].1["authorization"], "Bearer sk-oai");
    assert_eq!(seen[1].1["authorization"], "Bearer sk-oai");
    let anthropic = &seen[2].1;
    assert_eq!(
        anthropic["x-api-key"], "sk-ant-e2e",
        "the caller's key is replaced"
    );
    assert_eq!(anthropic["anthropic-version"], "2023-06-01");
    assert!(
        anthropic.get("authorization").is_none(),
        "no caller credential goes on"
    );
    assert!(
        seen.iter().all(|(_, h, _)| h.contains_key("x-request-id")),
        "the id is forwarded"
    );
    assert!(
        seen.iter().all(|(_, h, _)| !h.contains_key("x-tenant-id")),
        "the tenant's name stays in the gateway"
    );
    assert_eq!(seen[0].2["prompt"], "Say hi", "the body arrives as sent");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_dead_provider_is_a_502_and_a_slow_one_a_504() {
    let dead = dead_url();
    let gw = start(
        Gateway::new(config(
            "open: true\nmodels:\n  gpt-4o:\n    primary: { url: \"{provider}\" }\n",
            &dead,
        ))
        .unwrap(),
    )
    .await;
    let http = client();
    let a = post(&http, &gw.url("/v1/chat/completions"), "k", &chat("x"), &[])
        .await
        .unwrap();
    assert_eq!(a.status, 502, "{:?}", a.body);
    assert_eq!(a.json()["error"]["type"], "server_error");
    gw.shutdown().await;

    let slow = Provider::builder()
        .latency(Duration::from_secs(5))
        .spawn()
        .await
        .unwrap();
    let yaml = "open: true\ntimeouts: { upstream: 200ms }\nmodels:\n  gpt-4o:\n    primary: { url: \"{provider}\" }\n    rate_limit: { requests: 100/s, learn: false }\n";
    let gw = start(Gateway::new(config(yaml, &slow.url())).unwrap()).await;
    let a = post(&http, &gw.url("/v1/chat/completions"), "k", &chat("x"), &[])
        .await
        .unwrap();
    assert_eq!(a.status, 504, "{:?}", a.body);
    assert_eq!(a.json()["error"]["code"], "upstream_timeout");
    gw.shutdown().await;
}

/// Behind the real server: a primary whose 200s are all malformed is asked again, then
/// set aside, and the caller gets the fallback's whole answer with its Content-Length;
/// with no backend left that answers whole, the caller gets a 502, never the broken body.
#[tokio::test]
async fn a_malformed_answer_goes_to_the_fallback_and_never_reaches_the_caller() {
    let broken = Provider::builder()
        .faults(tollgate_testkit::Faults {
            malformed_rate: 1.0,
            ..Default::default()
        })
        .spawn()
        .await
        .unwrap();
    let good = Provider::builder().spawn().await.unwrap();
    let yaml = format!(
        "open: true\nmodels:\n  gpt-4o:\n    primary: {{ url: \"{}\" }}\n    fallbacks: [ {{ name: good, url: \"{}\" }} ]\n    retry: {{ max_retries: 1, backoff: 10ms }}\n    rate_limit: {{ requests: 100/s, learn: false }}\n",
        broken.url(),
        good.url()
    );
    let gw = start(Gateway::new(Config::from_yaml(&yaml).unwrap()).unwrap()).await;
    let http = client();
    let a = post(
        &http,
        &gw.url("/v1/chat/completions"),
        "k",
        &chat("whole, please"),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.json()["object"], "chat.completion");
    assert_eq!(a.header("x-tollgate-backend"), Some("good"));
    assert_eq!(
        a.header("content-length"),
        Some(a.body.len().to_string().as_str()),
        "a sized answer stays sized"
    );
    assert_eq!(broken.stats().faults, 2, "the first try and one retry");
    gw.shutdown().await;

    // The only backend's answers all broken: a 502 in OpenAI's shape.
    let yaml = format!(
        "open: true\nmodels:\n  gpt-4o:\n    primary: {{ url: \"{}\" }}\n    retry: {{ max_retries: 1, backoff: 10ms }}\n    rate_limit: {{ requests: 100/s, learn: false }}\n",
        broken.url()
    );
    let gw = start(Gateway::new(Config::from_yaml(&yaml).unwrap()).unwrap()).await;
    let a = post(
        &http,
        &gw.url("/v1/chat/completions"),
        "k",
        &chat("again"),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(a.status, 502, "{:?}", a.body);
    assert_eq!(a.json()["error"]["code"], "upstream_answer_broken");
    gw.shutdown().await;
}

/// A provider that starts its stream, then falls silent longer than the upstream timeout:
/// the stream ends with an error event the SDK can read, instead of holding the caller.
#[tokio::test]
async fn a_stream_whose_provider_falls_silent_ends_with_an_error_event() {
    let silent = Provider::builder()
        .chunk_delay(Duration::from_secs(30))
        .spawn()
        .await
        .unwrap();
    let yaml = "open: true\ntimeouts: { upstream: 300ms }\nmodels:\n  gpt-4o:\n    primary: { url: \"{provider}\" }\n    rate_limit: { requests: 100/s, learn: false }\n";
    let gw = start(Gateway::new(config(yaml, &silent.url())).unwrap()).await;
    let http = client();
    let mut body = chat("stream, then stop");
    body["stream"] = json!(true);
    let started = std::time::Instant::now();
    let a = post(&http, &gw.url("/v1/chat/completions"), "k", &body, &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    let text = String::from_utf8_lossy(&a.body);
    assert!(text.contains("event: error"), "{text}");
    assert!(text.contains("stream_interrupted"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "ended after the silence, not after the provider's 30 s: {:?}",
        started.elapsed()
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn health_readiness_and_metrics_with_the_genai_names() {
    let provider = Provider::builder().spawn().await.unwrap();
    let gw = start(Gateway::new(config(&keyed(""), &provider.url())).unwrap()).await;
    let http = client();
    assert_eq!(get(&http, &gw.url("/healthz"), None).await.status, 200);
    assert_eq!(get(&http, &gw.url("/readyz"), None).await.status, 200);
    let a = post(
        &http,
        &gw.url("/v1/chat/completions"),
        "vk-acme",
        &chat("count me"),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200);
    let m = get(&http, &gw.url("/metrics"), None).await;
    assert_eq!(m.status, 200);
    let text = String::from_utf8_lossy(&m.body);
    for name in [
        "gen_ai_client_token_usage_bucket",
        "gen_ai_token_type=\"input\"",
        "gen_ai_client_operation_duration_seconds",
        "tollgate_gateway_overhead_seconds_bucket",
        "tollgate_gateway_requests_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    assert!(!text.contains("vk-acme"), "no key in metrics");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_reload_adds_tenants_without_dropping_anything_and_a_bad_file_is_refused() {
    let provider = Provider::builder().spawn().await.unwrap();
    let dir = std::env::temp_dir().join(format!("tollgate-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.yaml");
    std::env::set_var("TOLLGATE_E2E_ADMIN_KEY", "admin-e2e");
    let base = keyed("").replace("{provider}", &provider.url())
        + "admin_key_env: TOLLGATE_E2E_ADMIN_KEY\n";
    std::fs::write(&path, &base).unwrap();
    let gw = start(Gateway::from_path(&path).unwrap()).await;
    let http = client();
    let url = gw.url("/v1/chat/completions");
    assert_eq!(
        post(&http, &url, "vk-new", &chat("x"), &[])
            .await
            .unwrap()
            .status,
        401
    );

    // A keep-alive connection stays up across the reload.
    let with_new = base.replace(
        "tenants:\n",
        &format!(
            "tenants:\n  new: {{ key_sha256: \"{}\" }}\n",
            hash("vk-new")
        ),
    );
    std::fs::write(&path, &with_new).unwrap();
    let reload = |key: &'static str| {
        let req = Request::post(gw.url("/admin/reload"))
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        http.request(req)
    };
    assert_eq!(
        reload("wrong").await.unwrap().status(),
        401,
        "behind the admin key"
    );
    assert_eq!(reload("admin-e2e").await.unwrap().status(), 200);
    assert_eq!(
        post(&http, &url, "vk-new", &chat("x"), &[])
            .await
            .unwrap()
            .status,
        200
    );

    std::fs::write(&path, with_new.replace("models:", "modelz:")).unwrap();
    let refused = reload("admin-e2e").await.unwrap();
    assert_eq!(refused.status(), 400);
    let body = refused.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("modelz"),
        "{body:?}"
    );
    assert_eq!(
        post(&http, &url, "vk-new", &chat("y"), &[])
            .await
            .unwrap()
            .status,
        200,
        "the old config serves on"
    );
    assert_eq!(gw.gateway.config().tenants.len(), 3);
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn shutdown_lets_a_stream_in_flight_finish_and_takes_no_new_connection() {
    let provider = Provider::builder()
        .chunk_delay(Duration::from_millis(30))
        .completion_tokens(20)
        .tokens_per_chunk(1)
        .spawn()
        .await
        .unwrap();
    let gw = start(Gateway::new(config(&keyed(""), &provider.url())).unwrap()).await;
    let addr = gw.addr;
    let http = client();
    let mut body = chat("drain me");
    body["stream"] = json!(true);
    let req = Request::post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer vk-acme")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let res = http.request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let drained = tokio::spawn(gw.shutdown());
    let rest = res.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("[DONE]"), "the stream finished: {text}");
    let events = sse_events(&rest);
    assert!(
        events.len() >= 21,
        "every one of the 20 tokens: {}",
        events.len()
    );
    assert_eq!(
        events.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    drained.await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
}

#[tokio::test]
async fn two_gateways_on_one_redis_share_one_model_quota() {
    let Some(redis) =
        tollgate_testkit::redis::redis_url("two_gateways_on_one_redis_share_one_model_quota")
    else {
        return;
    };
    let provider = Provider::builder().spawn().await.unwrap();
    let ns = format!("gw-e2e-{}-{}", std::process::id(), fastrand::u64(..));
    let yaml = format!(
        r#"
open: true
# A loaded CI machine can take longer than the 50 ms default to answer.
store: {{ url: "{redis}", namespace: "{ns}", timeout: 5s }}
models:
  gpt-4o:
    primary: {{ url: "{{provider}}" }}
    rate_limit: {{ requests: 3/min, mode: refuse }}
"#
    );
    let a = start(Gateway::new(config(&yaml, &provider.url())).unwrap()).await;
    let b = start(Gateway::new(config(&yaml, &provider.url())).unwrap()).await;
    let http = client();
    assert_eq!(get(&http, &a.url("/readyz"), None).await.status, 200);
    let mut statuses = Vec::new();
    for (i, gw) in [&a, &b, &a, &b].into_iter().enumerate() {
        let r = post(
            &http,
            &gw.url("/v1/chat/completions"),
            "k",
            &chat(&format!("q{i}")),
            &[],
        )
        .await
        .unwrap();
        statuses.push(r.status.as_u16());
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 429],
        "three a minute across both instances"
    );
    assert_eq!(provider.stats().requests, 3);
    a.shutdown().await;
    b.shutdown().await;
}

/// Two gateways on one Redis spend one tenant budget, and each one's `/api/stats` (the
/// dashboard's feed, and what the `quota_used` alert reads) shows what both spent.
#[tokio::test]
async fn two_gateways_on_one_redis_show_the_spend_of_both() {
    let Some(redis) =
        tollgate_testkit::redis::redis_url("two_gateways_on_one_redis_show_the_spend_of_both")
    else {
        return;
    };
    let provider = Provider::builder().spawn().await.unwrap();
    let ns = format!("gw-spend-{}-{}", std::process::id(), fastrand::u64(..));
    let yaml = format!(
        r#"
store: {{ url: "{redis}", namespace: "{ns}", timeout: 5s }}
prices:
  gpt-4o: {{ input: 2.5, output: 10 }}
models:
  gpt-4o:
    primary: {{ url: "{{provider}}" }}
tenants:
  acme: {{ key_sha256: "{}", budget: "5/day" }}
"#,
        hash("vk-acme")
    );
    let a = start(Gateway::new(config(&yaml, &provider.url())).unwrap()).await;
    let b = start(Gateway::new(config(&yaml, &provider.url())).unwrap()).await;
    let http = client();
    let mut charged = 0f64;
    for (i, gw) in [&a, &b, &a, &b, &b].into_iter().enumerate() {
        let r = post(
            &http,
            &gw.url("/v1/chat/completions"),
            "vk-acme",
            &chat(&format!("q{i}")),
            &[],
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
        let u = &r.json()["usage"];
        charged += u["prompt_tokens"].as_f64().unwrap() * 2.5e-6
            + u["completion_tokens"].as_f64().unwrap() * 10e-6;
    }
    // Each reads Redis once a second; give both a few seconds, bounded.
    let spent = |gw: &Running| {
        let (http, url) = (http.clone(), gw.url("/api/stats"));
        async move {
            let stats = get(&http, &url, None).await.json();
            stats["tenants"]
                .as_array()
                .and_then(|ts| ts.iter().find(|t| t["name"] == "acme").cloned())
                .and_then(|t| t["spend"]["spent_usd"].as_f64())
                .unwrap_or(-1.0)
        }
    };
    for gw in [&a, &b] {
        let mut seen = -1.0;
        for _ in 0..60 {
            seen = spent(gw).await;
            if (seen - charged).abs() < 1e-9 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            (seen - charged).abs() < 1e-9,
            "one gateway shows {seen}, both charged {charged}"
        );
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn h2c_clients_are_served_on_the_same_port() {
    let provider = Provider::builder().spawn().await.unwrap();
    let gw = start(Gateway::new(config(&keyed(""), &provider.url())).unwrap()).await;
    let h2: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let req = Request::post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer vk-acme")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(chat("over h2").to_string())))
        .unwrap();
    let res = h2.request(req).await.unwrap();
    assert_eq!(res.version(), http::Version::HTTP_2);
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 16);
    gw.shutdown().await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_client_slow_to_send_its_headers_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = Provider::builder().spawn().await.unwrap();
    let yaml = keyed("").replace(
        "shutdown_grace: 10s",
        "shutdown_grace: 1s\ntimeouts: { header_read: 5s }",
    );
    let gw = start(Gateway::new(config(&yaml, &provider.url())).unwrap()).await;
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    conn.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // The rest of the headers never come: on the paused clock, the 5 s pass at once.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), conn.read_to_end(&mut buf)).await;
    let read = read.expect("the gateway closes the connection");
    assert!(
        read.is_ok_and(|_| buf.is_empty() || buf.starts_with(b"HTTP/1.1 408")),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    gw.shutdown().await;
}

/// A local webhook receiver: every body it was sent.
async fn alert_receiver() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    type Got = Arc<Mutex<Vec<serde_json::Value>>>;
    let got: Got = Arc::default();
    async fn hook(
        axum::extract::State(got): axum::extract::State<Got>,
        body: Bytes,
    ) -> &'static str {
        got.lock()
            .unwrap()
            .push(serde_json::from_slice(&body).unwrap_or_default());
        "ok"
    }
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(Arc::clone(&got));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), got)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_backend_answering_429s_for_the_rules_time_fires_once_and_resolves_once() {
    // The provider allows two requests a minute; the model's own limit is far above, so
    // the provider's 429s come back (no retries): the model is limited.
    let provider = Provider::builder().rpm(2).burst(2).spawn().await.unwrap();
    let (hook, got) = alert_receiver().await;
    let yaml = format!(
        r#"
open: true
timeouts: {{ header_read: 1h }}
models:
  gpt-4o:
    primary: {{ url: "{{provider}}", headers: {{ authorization: "Bearer sk-alerts" }} }}
    rate_limit: {{ requests: 1000/min, learn: false, mode: refuse }}
alerts:
  rules: [ {{ name: gpt-4o-limited, when: limited_for, model: gpt-4o, for: 30s }} ]
  sinks: [ {{ url: "{hook}" }} ]
"#
    );
    let gw = start(Gateway::new(config(&yaml, &provider.url())).unwrap()).await;
    let http = client();
    let url = gw.url("/v1/chat/completions");
    let mut statuses = Vec::new();
    // One request a second, 80 of them: the provider lets two a minute through.
    for i in 0..80 {
        let a = post(&http, &url, "k", &chat(&format!("q{i}")), &[])
            .await
            .unwrap();
        statuses.push(a.status.as_u16());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The gateway waits out each 429 (the backend is back at its Retry-After), so no
    // caller sees one; the provider answered them all the same, and the model is limited.
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        provider.key_stats("sk-alerts").rate_limited > 40,
        "{:?}",
        provider.stats()
    );
    let kinds = |got: &Arc<Mutex<Vec<serde_json::Value>>>| -> Vec<String> {
        got.lock()
            .unwrap()
            .iter()
            .map(|v| v["type"].as_str().unwrap_or("?").to_owned())
            .collect()
    };
    assert_eq!(kinds(&got), ["alert.firing"], "fired once while limited");
    assert_eq!(got.lock().unwrap()[0]["data"]["rule"], "gpt-4o-limited");
    // The dashboard's data says so too.
    let firing = get(&http, &gw.url("/api/stats"), None).await.json()["alerts"].clone();
    assert_eq!(firing[0]["rule"], "gpt-4o-limited", "{firing}");
    // Quiet for a minute and a half (the provider's bucket refills), then fine again.
    tokio::time::sleep(Duration::from_secs(90)).await;
    for i in 0..2 {
        let a = post(&http, &url, "k", &chat(&format!("after {i}")), &[])
            .await
            .unwrap();
        assert_eq!(a.status, 200);
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        kinds(&got),
        ["alert.firing", "alert.resolved"],
        "resolved once"
    );
    let firing = get(&http, &gw.url("/api/stats"), None).await.json()["alerts"].clone();
    assert_eq!(firing, json!([]), "nothing firing any more");
    gw.shutdown().await;
}

#[tokio::test]
async fn an_open_stats_stream_ends_at_shutdown_instead_of_holding_the_drain() {
    let provider = Provider::builder().spawn().await.unwrap();
    let yaml = keyed("").replace("shutdown_grace: 10s", "shutdown_grace: 1h");
    let gw = start(Gateway::new(config(&yaml, &provider.url())).unwrap()).await;
    let http = client();
    let req = Request::get(gw.url("/api/stats/stream"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = http.request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"event: stats\ndata: {"), "{first:?}");
    let drained = tokio::spawn(gw.shutdown());
    // The stream ends, and with it the drain — long before the hour of grace.
    let rest = tokio::time::timeout(Duration::from_secs(60), body.collect()).await;
    assert!(rest.expect("the stream ended").is_ok());
    tokio::time::timeout(Duration::from_secs(60), drained)
        .await
        .expect("the drain ended")
        .unwrap();
}

#[tokio::test]
async fn the_dashboard_data_shows_requests_waiting_for_quota_and_the_quota_in_force() {
    let provider = Provider::builder().spawn().await.unwrap();
    let yaml = r#"
open: true
shutdown_grace: 1s
models:
  gpt-4o:
    primary: { url: "{provider}" }
    rate_limit: { requests: 1/min, burst: 1, mode: wait, max_wait: 5m, learn: false }
"#;
    let gw = start(Gateway::new(config(yaml, &provider.url())).unwrap()).await;
    let http = client();
    let url = gw.url("/v1/chat/completions");
    assert_eq!(
        post(&http, &url, "k", &chat("first"), &[])
            .await
            .unwrap()
            .status,
        200
    );
    // The second waits a minute for its cell.
    let waiting = {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move { post(&http, &url, "k", &chat("second"), &[]).await })
    };
    let model = |v: &serde_json::Value| v["models"][0].clone();
    let mut seen = serde_json::Value::Null;
    for _ in 0..200 {
        seen = model(&get(&http, &gw.url("/api/stats"), None).await.json());
        if seen["queue"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen["queue"], 1, "one waiting: {seen}");
    assert_eq!(seen["backends"][0]["waiting"], 1);
    assert_eq!(
        seen["backends"][0]["rpm"], 1.0,
        "the quota in force, from the layer"
    );
    // The caller gives up: it leaves the queue.
    waiting.abort();
    for _ in 0..200 {
        seen = model(&get(&http, &gw.url("/api/stats"), None).await.json());
        if seen["queue"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen["queue"], 0, "{seen}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_tenant_of_higher_priority_goes_first_in_the_models_queue() {
    let provider = Provider::builder().spawn().await.unwrap();
    let yaml = format!(
        r#"
timeouts: {{ header_read: 1h }}
models:
  gpt-4o:
    primary: {{ url: "{{provider}}" }}
    rate_limit: {{ requests: 1/min, burst: 1, mode: wait, max_wait: 10m, learn: false }}
tenants:
  batch: {{ key_sha256: "{}", priority: 0 }}
  live:  {{ key_sha256: "{}", priority: 10 }}
"#,
        hash("vk-batch"),
        hash("vk-live")
    );
    let gw = start(Gateway::new(config(&yaml, &provider.url())).unwrap()).await;
    let http = client();
    let url = gw.url("/v1/chat/completions");
    assert_eq!(
        post(&http, &url, "vk-batch", &chat("first"), &[])
            .await
            .unwrap()
            .status,
        200
    );
    let order = Arc::new(Mutex::new(Vec::new()));
    let send = |key: &'static str, q: &'static str| {
        let (http, url, order) = (http.clone(), url.clone(), Arc::clone(&order));
        tokio::spawn(async move {
            let a = post(&http, &url, key, &chat(q), &[]).await.unwrap();
            assert_eq!(a.status, 200);
            order.lock().unwrap().push(key);
        })
    };
    // The batch tenant queues first, the live one after it.
    let batch = send("vk-batch", "queued first");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let live = send("vk-live", "queued second");
    batch.await.unwrap();
    live.await.unwrap();
    assert_eq!(
        *order.lock().unwrap(),
        ["vk-live", "vk-batch"],
        "priority before arrival"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn tenants_waiting_for_a_model_share_its_quota_by_weight() {
    let provider = Provider::builder().spawn().await.unwrap();
    let yaml = format!(
        r#"
timeouts: {{ header_read: 1h }}
models:
  gpt-4o:
    primary: {{ url: "{{provider}}" }}
    rate_limit: {{ requests: 60/min, burst: 1, mode: wait, max_wait: 10m, learn: false }}
tenants:
  heavy: {{ key_sha256: "{}", weight: 3 }}
  light: {{ key_sha256: "{}" }}
"#,
        hash("vk-heavy"),
        hash("vk-light")
    );
    let gw = start(Gateway::new(config(&yaml, &provider.url())).unwrap()).await;
    let http = client();
    let url = gw.url("/v1/chat/completions");
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    // The heavy tenant queues eight first, the light one eight after them.
    for key in ["vk-heavy", "vk-light"] {
        for i in 0..8 {
            let (http, url, order) = (http.clone(), url.clone(), Arc::clone(&order));
            tasks.push(tokio::spawn(async move {
                let a = post(&http, &url, key, &chat(&format!("{key} {i}")), &[])
                    .await
                    .unwrap();
                assert_eq!(a.status, 200);
                order.lock().unwrap().push(key);
            }));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    let heavy_first_eight = order[..8].iter().filter(|k| **k == "vk-heavy").count();
    assert_eq!(
        heavy_first_eight, 6,
        "three cells to one while both wait, not arrival order: {order:?}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_tenants_cost_budget_charges_the_usage_at_the_price_and_refuses_past_it() {
    let provider = Provider::builder().spawn().await.unwrap();
    let yaml = format!(
        r#"
prices:
  gpt-4o: {{ input: 2.5, output: 10, cached_input: 1.25 }}
models:
  gpt-4o:
    primary: {{ url: "{{provider}}" }}
tenants:
  acme: {{ key_sha256: "{}", budget: "0.002/day" }}
"#,
        hash("vk-acme")
    );
    let gw = start(Gateway::new(config(&yaml, &provider.url())).unwrap()).await;
    let http = client();
    let url = gw.url("/v1/chat/completions");
    let body = json!({"model": "gpt-4o", "max_tokens": 16,
                      "messages": [{"role": "user", "content": "What does a budget cost?"}]});
    let (mut passed, mut charged, mut refusal) = (0u64, 0f64, None);
    for _ in 0..50 {
        let a = post(&http, &url, "vk-acme", &body, &[]).await.unwrap();
        if a.status != 200 {
            refusal = Some(a);
            break;
        }
        passed += 1;
        let u = &a.json()["usage"];
        charged += u["prompt_tokens"].as_f64().unwrap() * 2.5e-6
            + u["completion_tokens"].as_f64().unwrap() * 10e-6;
    }
    let refusal = refusal.expect("the budget ran out");
    assert!(passed >= 5, "{passed} passed before the budget ran out");
    assert_eq!(refusal.status, 429);
    let e = &refusal.json()["error"];
    assert_eq!(
        (e["code"].as_str(), e["type"].as_str()),
        (Some("budget_exceeded"), Some("budget"))
    );
    let retry: u64 = refusal.header("retry-after").unwrap().parse().unwrap();
    assert!(
        (1..=86_400).contains(&retry),
        "until the day ends in UTC: {retry}"
    );
    let policy = refusal.header("ratelimit-policy").unwrap();
    assert!(
        policy.contains("q=2000") && policy.contains("qu=\"usd-micros\""),
        "{policy}"
    );
    assert_eq!(
        provider.stats().requests,
        passed,
        "a refused request never left"
    );
    let stats = get(&http, &gw.url("/api/stats"), None).await.json();
    let acme = stats["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "acme")
        .unwrap()
        .clone();
    let spent = acme["spend"]["spent_usd"].as_f64().unwrap();
    assert!(
        (spent - charged).abs() < 1e-9,
        "charged {spent}, the usage at the price {charged}"
    );
    assert!(spent <= 0.002 + 1e-9, "never past the budget here: {spent}");
    assert_eq!(acme["spend"]["budget_usd"], 0.002);
    gw.shutdown().await;
}

/// 16 embeddings requests sent together through a gateway whose config ends in `extra`:
/// the provider's request count, and each answer.
async fn sixteen_embeddings(extra: &str) -> (u64, Vec<Answer>) {
    let provider = Provider::builder().spawn().await.unwrap();
    // A window long enough that 16 loopback requests surely meet in it.
    let yaml = keyed("") + extra;
    let gw = start(Gateway::new(config(&yaml, &provider.url())).unwrap()).await;
    let http = client();
    let url = gw.url("/v1/embeddings");
    let answers = futures_util::future::join_all((0..16).map(|i| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let body = json!({"model": "text-embedding-3-small", "input": format!("text {i}")});
            post(&http, &url, "vk-acme", &body, &[]).await.unwrap()
        }
    }))
    .await;
    let calls = provider.stats().requests;
    gw.shutdown().await;
    (calls, answers)
}

#[tokio::test]
async fn concurrent_embeddings_go_as_one_provider_call_unless_the_model_is_off() {
    let (calls, answers) = sixteen_embeddings("batching: { max_delay: 300ms }\n").await;
    assert_eq!(calls, 1, "one call for sixteen");
    for a in &answers {
        assert_eq!(a.status, 200, "{:?}", a.body);
        let v = a.json();
        assert_eq!(v["data"].as_array().unwrap().len(), 1);
        assert_eq!(v["data"][0]["index"], 0);
        assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() >= 2);
    }
    let (calls, _) =
        sixteen_embeddings("batching: { max_delay: 300ms, off: [text-embedding-3-small] }\n").await;
    assert_eq!(calls, 16, "off: one by one");
}

async fn post_async(http: &HttpClient, url: &str, key: &str, body: &serde_json::Value) -> Answer {
    post(http, url, key, body, &[("prefer", "respond-async")])
        .await
        .unwrap()
}

/// Polls the job until it is over (or 200 tries).
async fn job_done(http: &HttpClient, gw: &Running, id: &str, key: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    for _ in 0..200 {
        last = get(http, &gw.url(&format!("/v1/jobs/{id}")), Some(key))
            .await
            .json();
        if matches!(
            last["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    last
}

#[tokio::test]
async fn a_request_preferring_async_is_kept_answered_later_and_shown_to_its_tenant_alone() {
    let provider = Provider::builder().spawn().await.unwrap();
    let dir = std::env::temp_dir().join(format!("tollgate-jobs-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let yaml = keyed(&format!(
        "  other: {{ key_sha256: \"{}\" }}",
        hash("vk-other")
    )) + &format!(
        "jobs: {{ path: \"{}\", workers: 2 }}\n",
        dir.join("jobs.redb").display()
    );
    let gw = start(Gateway::new(config(&yaml, &provider.url())).unwrap()).await;
    let http = client();
    let url = gw.url("/v1/chat/completions");
    let a = post_async(&http, &url, "vk-acme", &chat("later, please")).await;
    assert_eq!(a.status, 202, "{:?}", a.body);
    assert_eq!(a.header("preference-applied"), Some("respond-async"));
    let id = a.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(a.header("location").unwrap(), format!("/v1/jobs/{id}"));
    assert_eq!(a.json()["status"], "queued");
    let done = job_done(&http, &gw, &id, "vk-acme").await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["response"]["status_code"], 200);
    assert_eq!(done["response"]["body"]["usage"]["completion_tokens"], 16);
    assert_eq!(done["attempts"], 1);
    // Another tenant does not see it, and cannot cancel it.
    assert_eq!(
        get(&http, &gw.url(&format!("/v1/jobs/{id}")), Some("vk-other"))
            .await
            .status,
        404
    );
    let cancel = |key: &'static str, id: String| {
        let req = Request::post(gw.url(&format!("/v1/jobs/{id}/cancel")))
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        http.request(req)
    };
    assert_eq!(cancel("vk-other", id.clone()).await.unwrap().status(), 404);
    let res = cancel("vk-acme", id.clone()).await.unwrap();
    let body: serde_json::Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(
        body["status"], "completed",
        "an answered job stays answered"
    );
    // A job's request still passes every check: a bad one is refused at once, not stored.
    let mut bad = chat("x");
    bad["model"] = json!("gpt-9");
    assert_eq!(post_async(&http, &url, "vk-acme", &bad).await.status, 404);
    assert_eq!(
        get(&http, &gw.url("/v1/jobs/job_nope"), Some("vk-acme"))
            .await
            .status,
        404
    );
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A call that takes seven leases is not taken over by the gateway's other worker: the
/// worker running it renews its lease. (Without renewal the idle worker claims it after
/// 300 ms and the provider is asked twice.) Real time, about two seconds.
#[tokio::test]
async fn a_job_slower_than_its_lease_runs_once_while_its_worker_renews_the_lease() {
    let provider = Provider::builder()
        .latency(Duration::from_millis(2100))
        .spawn()
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("tollgate-jobs-renew-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let yaml = format!(
        "open: true\njobs: {{ path: \"{}\", workers: 2, lease: 300ms }}\nmodels:\n  gpt-4o:\n    primary: {{ url: \"{{provider}}\" }}\n",
        dir.join("jobs.redb").display()
    );
    let gw = start(Gateway::new(config(&yaml, &provider.url())).unwrap()).await;
    let http = client();
    let a = post_async(&http, &gw.url("/v1/chat/completions"), "k", &chat("slowly")).await;
    assert_eq!(a.status, 202, "{:?}", a.body);
    let id = a.json()["id"].as_str().unwrap().to_owned();
    let done = job_done(&http, &gw, &id, "k").await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["attempts"], 1, "never claimed again: {done}");
    assert_eq!(provider.stats().requests, 1, "the provider was asked once");
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn without_a_job_store_the_preference_is_ignored_and_answered_at_once() {
    let provider = Provider::builder().spawn().await.unwrap();
    let gw = start(Gateway::new(config(&keyed(""), &provider.url())).unwrap()).await;
    let http = client();
    let a = post_async(
        &http,
        &gw.url("/v1/chat/completions"),
        "vk-acme",
        &chat("now"),
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(a.header("preference-applied").is_none());
    gw.shutdown().await;
}

#[tokio::test]
async fn a_background_response_is_queued_run_and_read_back_under_its_id() {
    let (url, seen) = recorder().await;
    let dir = std::env::temp_dir().join(format!("tollgate-resp-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let yaml = format!(
        "open: true\njobs: {{ path: \"{}\" }}\nmodels:\n  gpt-4o:\n    primary: {{ url: \"{{provider}}\" }}\n",
        dir.join("jobs.redb").display()
    );
    let gw = start(Gateway::new(config(&yaml, &url)).unwrap()).await;
    let http = client();
    let a = post(
        &http,
        &gw.url("/v1/responses"),
        "k",
        &json!({"model": "gpt-4o", "input": "Say hi", "background": true}),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200, "{:?}", a.body);
    let created = a.json();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("resp_"), "{created}");
    assert_eq!(
        (created["object"].as_str(), created["status"].as_str()),
        (Some("response"), Some("queued"))
    );
    assert_eq!(created["background"], true);
    let mut done = serde_json::Value::Null;
    for _ in 0..200 {
        done = get(&http, &gw.url(&format!("/v1/responses/{id}")), Some("k"))
            .await
            .json();
        if !matches!(done["status"].as_str(), Some("queued" | "in_progress")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        done["id"],
        id.as_str(),
        "the provider's answer, under the id given: {done}"
    );
    assert_eq!(done["output_text"], "hi");
    assert_eq!(done["background"], true);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, "/v1/responses");
    assert!(
        seen[0].2.get("background").is_none(),
        "the provider is asked without it: {:?}",
        seen[0].2
    );
    assert_eq!(
        get(&http, &gw.url("/v1/responses/resp_nope"), Some("k"))
            .await
            .status,
        404
    );
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `POST /v1/files` with a multipart form, as the SDKs send it.
async fn upload(http: &HttpClient, gw: &Running, key: &str, content: &str) -> Answer {
    let boundary = "tollgate-test-boundary";
    let body = format!(
        "--{boundary}\r\ncontent-disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\ncontent-type: application/jsonl\r\n\r\n{content}\r\n--{boundary}--\r\n"
    );
    let req = Request::post(gw.url("/v1/files"))
        .header("authorization", format!("Bearer {key}"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let res = http.request(req).await.unwrap();
    let (parts, body) = res.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

#[tokio::test]
async fn a_batch_is_validated_whole_run_line_by_line_and_kept_to_its_tenant() {
    let provider = Provider::builder().spawn().await.unwrap();
    let dir = std::env::temp_dir().join(format!("tollgate-batch-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let yaml = keyed(&format!(
        "  other: {{ key_sha256: \"{}\" }}",
        hash("vk-other")
    )) + &format!(
        "jobs: {{ path: \"{}\" }}\n",
        dir.join("jobs.redb").display()
    );
    let gw = start(Gateway::new(config(&yaml, &provider.url())).unwrap()).await;
    let http = client();
    let line = |id: &str, model: &str| {
        json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
               "body": {"model": model, "messages": [{"role": "user", "content": id}]}})
        .to_string()
    };
    let good = format!("{}\n{}\n", line("a", "gpt-4o"), line("b", "gpt-4o-latest"));
    let f = upload(&http, &gw, "vk-acme", &good).await;
    assert_eq!(f.status, 200, "{:?}", f.body);
    let file_id = f.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(f.json()["bytes"], good.len());
    // Another tenant sees no such file.
    assert_eq!(
        get(
            &http,
            &gw.url(&format!("/v1/files/{file_id}")),
            Some("vk-other")
        )
        .await
        .status,
        404
    );
    let create = |key: &'static str, body: serde_json::Value| {
        let url = gw.url("/v1/batches");
        let http = http.clone();
        async move { post(&http, &url, key, &body, &[]).await.unwrap() }
    };
    // An endpoint the gateway does not run fails the batch at once.
    let bad = create(
        "vk-acme",
        json!({"input_file_id": file_id, "endpoint": "/v1/images", "completion_window": "24h"}),
    )
    .await;
    assert_eq!(bad.status, 400);
    // So does a model it does not know, on any line.
    let unknown = upload(
        &http,
        &gw,
        "vk-acme",
        &format!("{}\n{}\n", line("a", "gpt-4o"), line("z", "gpt-9")),
    )
    .await;
    let unknown_id = unknown.json()["id"].as_str().unwrap().to_owned();
    let bad = create(
        "vk-acme",
        json!({"input_file_id": unknown_id, "endpoint": "/v1/chat/completions"}),
    )
    .await;
    assert_eq!(
        (bad.status, bad.json()["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("model_not_found"))
    );
    // A good batch runs; its tenant alone sees it.
    let b = create("vk-acme", json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"})).await;
    assert_eq!(b.status, 200, "{:?}", b.body);
    let batch_id = b.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(
        get(
            &http,
            &gw.url(&format!("/v1/batches/{batch_id}")),
            Some("vk-other")
        )
        .await
        .status,
        404
    );
    let mut seen = serde_json::Value::Null;
    for _ in 0..400 {
        seen = get(
            &http,
            &gw.url(&format!("/v1/batches/{batch_id}")),
            Some("vk-acme"),
        )
        .await
        .json();
        if seen["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(seen["status"], "completed", "{seen}");
    assert_eq!(
        seen["request_counts"],
        json!({"total": 2, "completed": 2, "failed": 0})
    );
    assert!(
        seen.get("tenant").is_none() && seen.get("custom_ids").is_none(),
        "internals stay inside: {seen}"
    );
    let out = get(
        &http,
        &gw.url(&format!(
            "/v1/files/{}/content",
            seen["output_file_id"].as_str().unwrap()
        )),
        Some("vk-acme"),
    )
    .await;
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.body)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["custom_id"], "a");
    assert_eq!(lines[1]["response"]["status_code"], 200);
    assert_eq!(provider.stats().requests, 2, "each line ran once");
    let listed = get(&http, &gw.url("/v1/batches?limit=10"), Some("vk-acme"))
        .await
        .json();
    assert_eq!(listed["data"][0]["id"], batch_id.as_str());
    assert_eq!(
        get(&http, &gw.url("/v1/batches"), Some("vk-other"))
            .await
            .json()["data"],
        json!([])
    );
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_batch_past_its_completion_window_ends_expired_and_keeps_what_finished() {
    let provider = Provider::builder().spawn().await.unwrap();
    let dir = std::env::temp_dir().join(format!("tollgate-expiry-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Two requests a minute: two lines run at once, the others wait for minutes — far
    // past the batch's two-second window. (The window is on the wall clock, as a batch's
    // `expires_at` is; two local calls take milliseconds of it.)
    let yaml = format!(
        "open: true\njobs: {{ path: \"{}\" }}\nmodels:\n  gpt-4o:\n    primary: {{ url: \"{{provider}}\" }}\n    rate_limit: {{ requests: 2/min, mode: wait, max_wait: 10m }}\n",
        dir.join("jobs.redb").display()
    );
    let gw = start(Gateway::new(config(&yaml, &provider.url())).unwrap()).await;
    let http = client();
    let content: String = (0..6)
        .map(|i| {
            json!({"custom_id": format!("r{i}"), "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}})
            .to_string()
                + "\n"
        })
        .collect();
    let f = upload(&http, &gw, "k", &content).await;
    let file_id = f.json()["id"].as_str().unwrap().to_owned();
    let bad = post(&http, &gw.url("/v1/batches"), "k",
        &json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "soon"}), &[])
        .await
        .unwrap();
    assert_eq!(
        (bad.status, bad.json()["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_completion_window"))
    );
    let b = post(&http, &gw.url("/v1/batches"), "k",
        &json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "2s"}), &[])
        .await
        .unwrap();
    assert_eq!(b.status, 200, "{:?}", b.body);
    let created = b.json();
    assert_eq!(
        created["expires_at"].as_u64().unwrap() - created["created_at"].as_u64().unwrap(),
        2
    );
    let batch_id = created["id"].as_str().unwrap().to_owned();
    let mut seen = serde_json::Value::Null;
    for _ in 0..300 {
        seen = get(
            &http,
            &gw.url(&format!("/v1/batches/{batch_id}")),
            Some("k"),
        )
        .await
        .json();
        if !matches!(seen["status"].as_str(), Some("in_progress" | "validating")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen["status"], "expired", "{seen}");
    assert!(seen["expired_at"].is_u64(), "{seen}");
    assert_eq!(
        seen["request_counts"],
        json!({"total": 6, "completed": 2, "failed": 4})
    );
    let read = |id: &serde_json::Value| {
        let url = gw.url(&format!("/v1/files/{}/content", id.as_str().unwrap()));
        let http = http.clone();
        async move {
            let body = get(&http, &url, Some("k")).await.body;
            String::from_utf8_lossy(&body)
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .collect::<Vec<_>>()
        }
    };
    let out = read(&seen["output_file_id"]).await;
    assert_eq!(out.len(), 2, "what finished is kept");
    assert!(out.iter().all(|l| l["response"]["status_code"] == 200));
    let errs = read(&seen["error_file_id"]).await;
    assert_eq!(errs.len(), 4);
    assert!(
        errs.iter().all(|l| l["error"]["code"] == "batch_expired"),
        "{errs:?}"
    );
    let mut ids: Vec<String> = out
        .iter()
        .chain(&errs)
        .map(|l| l["custom_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, ["r0", "r1", "r2", "r3", "r4", "r5"], "every line once");
    assert_eq!(
        provider.stats().requests,
        2,
        "no expired line reached the provider"
    );
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_finished_job_is_posted_to_its_callback_signed_per_standard_webhooks() {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let provider = Provider::builder().spawn().await.unwrap();
    // A receiver keeping headers and bodies.
    type Got = Arc<Mutex<Vec<(http::HeaderMap, Bytes)>>>;
    let got: Got = Arc::default();
    async fn hook(
        axum::extract::State(got): axum::extract::State<Got>,
        headers: http::HeaderMap,
        body: Bytes,
    ) -> &'static str {
        got.lock().unwrap().push((headers, body));
        "ok"
    }
    let app = axum::Router::new()
        .route("/done", axum::routing::post(hook))
        .with_state(Arc::clone(&got));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/done", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    std::env::set_var("TOLLGATE_E2E_CALLBACK_SECRET", "a-plain-secret");
    let dir = std::env::temp_dir().join(format!("tollgate-cb-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let yaml = keyed("")
        + &format!(
            "jobs: {{ path: \"{}\", callback_secret_env: TOLLGATE_E2E_CALLBACK_SECRET }}\n",
            dir.join("jobs.redb").display()
        );
    let gw = start(Gateway::new(config(&yaml, &provider.url())).unwrap()).await;
    let http = client();
    let url = gw.url("/v1/chat/completions");
    let bad = post(
        &http,
        &url,
        "vk-acme",
        &chat("x"),
        &[
            ("prefer", "respond-async"),
            ("x-tollgate-callback-url", "ftp://nope"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(bad.status, 400, "a callback that is not http(s) is refused");
    let a = post(
        &http,
        &url,
        "vk-acme",
        &chat("call me back"),
        &[
            ("prefer", "respond-async"),
            ("x-tollgate-callback-url", &hook_url),
        ],
    )
    .await
    .unwrap();
    assert_eq!(a.status, 202);
    let id = a.json()["id"].as_str().unwrap().to_owned();
    let mut calls = Vec::new();
    for _ in 0..400 {
        calls = got.lock().unwrap().clone();
        if !calls.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(calls.len(), 1, "called once");
    let (headers, body) = &calls[0];
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["type"], "job.finished");
    assert_eq!(v["data"]["id"], id.as_str());
    assert_eq!(v["data"]["status"], "completed");
    assert_eq!(
        v["data"]["response"]["body"]["usage"]["completion_tokens"],
        16
    );
    // The receiver can verify it: HMAC-SHA256 over "id.timestamp.body".
    let h = |n: &str| headers[n].to_str().unwrap().to_owned();
    let mut mac = Hmac::<Sha256>::new_from_slice(b"a-plain-secret").unwrap();
    mac.update(format!("{}.{}.", h("webhook-id"), h("webhook-timestamp")).as_bytes());
    mac.update(body);
    let want = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    assert_eq!(h("webhook-signature"), want);
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
