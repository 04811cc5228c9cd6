//! What the token budget charges, behind a real axum server, against what the simulated
//! provider itself reports: the two must agree, for answers of known length (hyper stops
//! polling at their last byte) as for streams.

use std::sync::Arc;

use serde_json::json;
use tokio::sync::Semaphore;
use tollgate_integration_tests::{build, client, post, serve, sse_events, Counters};
use tollgate_testkit::Provider;

/// Tokens the budgets of backend `backend` kept: reserved, less what settling gave back,
/// plus what answers cost beyond their reservation.
fn kept(c: &Counters, backend: &str) -> u64 {
    let budget = format!("{backend}:tokens");
    let get = |name| c.get(name, "budget", &budget);
    get("tollgate_tpm_reserved_tokens_total") - get("tollgate_tpm_refunded_tokens_total")
        + get("tollgate_tpm_charged_tokens_total")
}

fn settled(c: &Counters, backend: &str) -> u64 {
    c.get(
        "tollgate_tpm_settled_tokens_total",
        "budget",
        &format!("{backend}:tokens"),
    )
}

#[tokio::test]
async fn json_answers_settle_to_the_providers_exact_usage() {
    let counters = Counters::install();
    let provider = Provider::builder().spawn().await.unwrap();
    // Each request reserves its prompt plus 1024 (no `max_tokens`), ~1.05k tokens; the
    // 5k budget admits all ten only if each settles to its ~26 real tokens as it ends.
    let addr = serve(build(&format!(
        r#"
primary:    {{ name: exact, url: "{}" }}
rate_limit: {{ tokens: 5k/min, mode: refuse }}
"#,
        provider.url()
    )))
    .await;
    let url = format!("http://{addr}/v1/chat/completions");
    let http = client();
    let mut used = 0;
    for i in 0..10 {
        let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": format!("question {i}")}]});
        let a = post(&http, &url, "k", &body, &[]).await.unwrap();
        assert_eq!(a.status, 200, "request {i}: {:?}", a.body);
        assert!(a.header("content-length").is_some());
        used += a.json()["usage"]["total_tokens"].as_u64().unwrap();
    }
    let served = provider.stats().tokens_served();
    assert_eq!(used, served);
    assert_eq!(settled(counters, "exact"), served, "every answer settled");
    assert_eq!(
        kept(counters, "exact"),
        served,
        "and kept exactly its usage"
    );
}

#[tokio::test]
async fn under_mixed_load_from_many_tenants_tollgate_charges_what_the_provider_reports() {
    let counters = Counters::install();
    let primary = Provider::builder().spawn().await.unwrap();
    let fallback = Provider::builder().spawn().await.unwrap();
    let addr = serve(build(&format!(
        r#"
primary:    {{ name: mixed-primary, url: "{}" }}
fallbacks:  [ {{ name: mixed-fallback, url: "{}", rate_limit: {{ requests: 600/min, tokens: 200k/min }} }} ]
rate_limit: {{ requests: 40/min, tokens: 200k/min, mode: wait, max_wait: 50ms }}
retry:      {{ max_retries: 2, backoff: 10ms }}
cache:      {{ ttl: 10m, partition: "header:x-tenant-id" }}
"#,
        primary.url(),
        fallback.url()
    )))
    .await;
    let url = format!("http://{addr}/v1/chat/completions");
    let http = client();
    let gate = Arc::new(Semaphore::new(8));
    let mut tasks = Vec::new();
    for i in 0..120usize {
        let (http, url, gate) = (http.clone(), url.clone(), Arc::clone(&gate));
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let tenant = ["acme", "globex", "initech", "umbrella"][i % 4];
            // A fifth are repeats (cache hits for the same tenant).
            let prompt = format!("{tenant} question {}", if i % 5 == 0 { 0 } else { i });
            let mut body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}],
                                  "max_tokens": 64});
            match i % 3 {
                0 => {}
                1 => body["stream"] = json!(true),
                _ => {
                    body["stream"] = json!(true);
                    body["stream_options"] = json!({"include_usage": true});
                }
            }
            let a = post(&http, &url, "k", &body, &[("x-tenant-id", tenant)])
                .await
                .unwrap();
            assert_eq!(a.status, 200, "request {i}: {:?}", a.body);
            if i % 3 != 0 {
                assert!(sse_events(&a.body).iter().all(|e| e.is_object()));
            }
            a.header("x-tollgate-cache") == Some("hit")
        }));
    }
    let mut hits = 0;
    for t in tasks {
        hits += u64::from(t.await.unwrap());
    }
    assert!(hits > 0, "repeats were served from cache");
    let (p, f) = (primary.stats(), fallback.stats());
    assert!(p.ok > 0 && f.ok > 0, "both backends served: {p:?} {f:?}");
    assert_eq!(p.ok + f.ok + hits, 120, "every request answered once");
    for (name, stats) in [("mixed-primary", p), ("mixed-fallback", f)] {
        assert_eq!(
            settled(counters, name),
            stats.tokens_served(),
            "{name}: every answer settled to its usage"
        );
        assert_eq!(
            kept(counters, name),
            stats.tokens_served(),
            "{name}: Tollgate kept what the provider charged"
        );
    }
}
