//! The policy stack behind a real axum server, driven by a real HTTP client, the way a
//! gateway runs it: hyper writes answers of known length and stops polling at their last
//! byte, every tenant shares the backends, and clients read statuses and error codes.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::json;
use tollgate_integration_tests::{build, chat, client, dead_url, post, serve, sse_events};
use tollgate_testkit::Provider;

#[tokio::test]
async fn a_json_answer_of_known_length_is_cached_and_the_repeat_is_a_hit() {
    let provider = Provider::builder().spawn().await.unwrap();
    let addr = serve(build(&format!(
        r#"
primary: {{ url: "{}" }}
cache:   {{ ttl: 10m, partition: "header:x-tenant-id" }}
"#,
        provider.url()
    )))
    .await;
    let url = format!("http://{addr}/v1/chat/completions");
    let http = client();
    let tenant = [("x-tenant-id", "acme")];

    let first = post(&http, &url, "k", &chat("What is GCRA?"), &tenant)
        .await
        .unwrap();
    assert_eq!(first.status, 200);
    assert!(
        first.header("content-length").is_some(),
        "{:?}",
        first.headers
    );
    assert_eq!(first.header("x-tollgate-cache"), Some("miss"));

    let again = post(&http, &url, "k", &chat("What is GCRA?"), &tenant)
        .await
        .unwrap();
    assert_eq!(again.status, 200);
    assert_eq!(again.header("x-tollgate-cache"), Some("hit"));
    assert_eq!(again.body, first.body, "the same answer, byte for byte");
    assert_eq!(provider.stats().requests, 1, "the repeat spent no quota");
}

/// A policy whose per-tenant request limit refuses a tenant's third request in a minute.
fn tenant_policy(primary: &str, fallback: Option<&str>) -> String {
    let fallbacks = fallback.map_or(String::new(), |u| {
        format!("fallbacks: [ {{ name: fallback, url: \"{u}\" }} ]")
    });
    format!(
        r#"
primary:    {{ name: primary, url: "{primary}" }}
{fallbacks}
rate_limit: {{ requests: 2/min, key: "header:x-tenant-id", mode: refuse }}
"#
    )
}

#[tokio::test]
async fn one_tenants_refusal_leaves_every_other_tenant_untouched() {
    for with_fallback in [false, true] {
        let primary = Provider::builder().spawn().await.unwrap();
        let fallback = Provider::builder().spawn().await.unwrap();
        let fb_url = fallback.url();
        let addr = serve(build(&tenant_policy(
            &primary.url(),
            with_fallback.then_some(fb_url.as_str()),
        )))
        .await;
        let url = format!("http://{addr}/v1/chat/completions");
        let http = client();
        let send = |tenant: &'static str, i: usize| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                post(
                    &http,
                    &url,
                    "k",
                    &chat(&format!("{tenant} {i}")),
                    &[("x-tenant-id", tenant)],
                )
                .await
                .unwrap()
            }
        };

        // acme spends its quota at the primary, then goes over it.
        for i in 0..2 {
            assert_eq!(send("acme", i).await.status, 200);
        }
        let over = send("acme", 2).await;
        if with_fallback {
            assert_eq!(
                over.status, 200,
                "acme's next request moves to the fallback"
            );
            assert_eq!(over.header("x-tollgate-backend"), Some("fallback"));
            // The fallback's own quota for acme spent too: a 429 for acme, with the time.
            send("acme", 3).await;
            let refused = send("acme", 4).await;
            assert_eq!(refused.status, 429, "{:?}", refused.body);
            assert!(refused.header("retry-after").is_some());
        } else {
            assert_eq!(over.status, 429, "{:?}", over.body);
            assert!(over.header("retry-after").is_some());
            assert_eq!(over.json()["error"]["code"], "rate_limit_exceeded");
        }

        // Nobody else is held back by acme's limit: the primary serves them all.
        for tenant in ["globex", "initech"] {
            for i in 0..2 {
                let a = send(tenant, i).await;
                assert_eq!(
                    a.status, 200,
                    "{tenant} (fallback: {with_fallback}): {:?}",
                    a.body
                );
                assert_eq!(
                    a.header("x-tollgate-backend"),
                    Some("primary"),
                    "{tenant} is served by the primary, which acme's refusal did not cool"
                );
            }
        }
        assert_eq!(primary.stats().requests, 6);
    }
}

#[tokio::test]
async fn every_backend_dead_is_a_503_with_retry_after_never_a_429() {
    let addr = serve(build(&format!(
        r#"
primary:   {{ name: primary, url: "{}" }}
fallbacks: [ {{ name: fallback, url: "{}" }} ]
retry:     {{ max_retries: 1, backoff: 10ms }}
failover:  {{ failures: 2, window: 30s, cooldown: 20s }}
"#,
        dead_url(),
        dead_url()
    )))
    .await;
    let url = format!("http://{addr}/v1/chat/completions");
    let http = client();

    let mut unavailable = 0;
    for i in 0..6 {
        let a = post(&http, &url, "k", &chat(&format!("q{i}")), &[])
            .await
            .unwrap();
        assert_ne!(a.status, 429, "an outage is not a rate limit: {:?}", a.body);
        assert!(
            a.status == 502 || a.status == 503,
            "{}: {:?}",
            a.status,
            a.body
        );
        if a.status == 503 {
            unavailable += 1;
            let wait: u64 = a.header("retry-after").unwrap().parse().unwrap();
            assert!((1..=20).contains(&wait), "until the first is back: {wait}");
            assert_eq!(a.json()["error"]["code"], "upstream_unavailable");
            assert_eq!(a.json()["error"]["type"], "server_error");
        }
    }
    assert!(
        unavailable >= 3,
        "once both backends are set aside, callers are told they are away"
    );
}

#[tokio::test]
async fn a_stream_without_include_usage_looks_as_it_would_without_tollgate() {
    let provider = Provider::builder().spawn().await.unwrap();
    // A token budget: it asks the provider for usage on the caller's behalf.
    let addr = serve(build(&format!(
        r#"
primary:    {{ url: "{}" }}
rate_limit: {{ tokens: 100k/min }}
"#,
        provider.url()
    )))
    .await;
    let url = format!("http://{addr}/v1/chat/completions");
    let http = client();

    let mut body = chat("Stream, please.");
    body["stream"] = json!(true);
    let plain = post(&http, &url, "k", &body, &[]).await.unwrap();
    assert_eq!(plain.status, 200);
    let events = sse_events(&plain.body);
    assert!(events.len() > 2, "{events:?}");
    for e in &events {
        assert!(e.is_object(), "every event still parses: {e}");
        assert!(
            e.get("usage").is_none(),
            "no `usage` field the caller did not ask for: {e}"
        );
    }

    // Asked for: OpenAI's shape, `usage: null` on each chunk and the usage chunk last.
    body["stream_options"] = json!({"include_usage": true});
    let asked = post(&http, &url, "k", &body, &[]).await.unwrap();
    let events = sse_events(&asked.body);
    let (last, rest) = events.split_last().unwrap();
    assert!(last["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert!(rest
        .iter()
        .all(|e| e["usage"].is_null() && e.get("usage").is_some()));
}

#[tokio::test]
async fn an_empty_or_broken_json_body_is_refused_locally_and_spends_nothing() {
    let provider = Provider::builder().spawn().await.unwrap();
    let addr = serve(build(&format!(
        r#"
primary:    {{ url: "{}" }}
rate_limit: {{ requests: 10/min }}
"#,
        provider.url()
    )))
    .await;
    let url = format!("http://{addr}/v1/chat/completions");
    let http = client();
    for body in ["", "  \n", "{\"model\": "] {
        let req = http::Request::post(&url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let res = http.request(req).await.unwrap();
        assert_eq!(res.status(), 400, "body {body:?}");
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    }
    // An empty POST to a model endpoint, with no content type at all: refused too.
    let req = http::Request::post(&url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(http.request(req).await.unwrap().status(), 400);
    assert_eq!(provider.stats().requests, 0, "nothing reached the provider");
}

#[tokio::test]
async fn a_stream_cut_after_its_first_byte_ends_with_an_error_event_not_a_broken_connection() {
    // The primary cuts every stream partway; the fallback is healthy but must not be used
    // once the caller has bytes. Failover's watched body turns the cut into an event.
    let cuts = Provider::builder()
        .faults(tollgate_testkit::Faults {
            cut_rate: 1.0,
            ..Default::default()
        })
        .chunk_delay(std::time::Duration::from_millis(2))
        .spawn()
        .await
        .unwrap();
    let fallback = Provider::builder().spawn().await.unwrap();
    let addr = serve(build(&format!(
        r#"
primary:   {{ name: primary, url: "{}" }}
fallbacks: [ {{ name: fallback, url: "{}" }} ]
"#,
        cuts.url(),
        fallback.url()
    )))
    .await;
    let url = format!("http://{addr}/v1/chat/completions");
    let mut body = chat("Stream, please.");
    body["stream"] = json!(true);

    // The client reads the whole answer without a transport error.
    let res = post(&client(), &url, "k", &body, &[]).await.unwrap();
    assert_eq!(res.status, 200);
    assert_eq!(res.header("x-tollgate-backend"), Some("primary"));
    let text = String::from_utf8(res.body.to_vec()).unwrap();
    assert!(text.contains("event: error"), "{text}");
    let last = sse_events(&res.body).pop().unwrap();
    assert_eq!(last["error"]["code"], "stream_interrupted", "{text}");
    assert_eq!(
        fallback.stats().requests,
        0,
        "no failover after the first byte"
    );
}
