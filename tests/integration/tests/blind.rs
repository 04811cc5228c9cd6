//! A policy that says nothing of the provider's quota — only where it is and to retry —
//! behind a real axum server, on a paused clock: the stack learns the quota from the
//! provider's own headers, starts slow until it has, and paces to it, so a burst that no
//! client retries itself still passes whole.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tollgate_integration_tests::{build, client, post, serve};
use tollgate_testkit::Provider;

const REQUESTS: usize = 300;
const CONCURRENCY: usize = 50;

/// The burst through a gateway whose policy names only the provider and says to retry
/// (every setting its default); returns (failed, makespan).
async fn blind_burst(provider: &Provider) -> (usize, Duration) {
    let addr = serve(build(&format!(
        r#"
primary: {{ url: "{}" }}
retry:   {{}}
"#,
        provider.url()
    )))
    .await;
    burst(&format!("http://{addr}/v1/chat/completions"), 16).await
}

/// Sends the burst; returns (failed, makespan).
async fn burst(url: &str, max_tokens: u64) -> (usize, Duration) {
    let http = client();
    let gate = Arc::new(Semaphore::new(CONCURRENCY));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..REQUESTS {
        let (http, url, gate) = (http.clone(), url.to_owned(), Arc::clone(&gate));
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let body = json!({"model": "gpt-4o", "max_tokens": max_tokens,
                              "messages": [{"role": "user", "content": format!("question {i}")}]});
            let a = post(&http, &url, "k", &body, &[]).await.unwrap();
            if a.status != 200 {
                eprintln!("request {i}: {} {:?}", a.status, a.body);
            }
            a.status == 200
        }));
    }
    let mut failed = 0;
    for t in tasks {
        failed += usize::from(!t.await.unwrap());
    }
    (failed, start.elapsed())
}

#[tokio::test(start_paused = true)]
async fn a_request_quota_learned_from_the_provider_passes_a_burst_at_its_pace() {
    // 600 requests a minute, ten at once: the floor is (300 − 10) ÷ 10/s = 29 s.
    let provider = Provider::builder()
        .rpm(600)
        .burst(10)
        .spawn()
        .await
        .unwrap();
    let (failed, makespan) = blind_burst(&provider).await;
    let stats = provider.stats();
    let floor = Duration::from_secs_f64((REQUESTS as f64 - 10.0) / 10.0);
    println!("failed {failed}, provider {stats:?}, makespan {makespan:?}, floor {floor:?}");
    assert_eq!(failed, 0, "no client saw a failure");
    assert!(
        stats.rate_limited as usize <= REQUESTS * 5 / 100,
        "the provider refused at most 5%: {stats:?}"
    );
    assert!(
        makespan.as_secs_f64() <= floor.as_secs_f64() * 1.1,
        "within 10% of the quota's floor: {makespan:?} against {floor:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_token_quota_learned_from_the_provider_passes_a_burst_at_its_pace() {
    // Only tokens are limited: 6000 a minute (100/s). Each request costs its prompt plus
    // 16 answer tokens; the floor is the tokens beyond the first minute's at 100/s.
    let provider = Provider::builder().tpm(6000).spawn().await.unwrap();
    let (failed, makespan) = blind_burst(&provider).await;
    let stats = provider.stats();
    let floor = Duration::from_secs_f64(stats.tokens_served().saturating_sub(6000) as f64 / 100.0);
    println!("failed {failed}, provider {stats:?}, makespan {makespan:?}, floor {floor:?}");
    assert_eq!(failed, 0, "no client saw a failure");
    assert!(
        stats.rate_limited as usize <= REQUESTS * 5 / 100,
        "the provider refused at most 5%: {stats:?}"
    );
    assert!(
        makespan.as_secs_f64() <= floor.as_secs_f64() * 1.1,
        "within 10% of the quota's floor: {makespan:?} against {floor:?}"
    );
}
