//! The simulated provider, judged over real sockets: limits, usage, streams, faults.

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;
use tollgate_core::headers::{self, RateLimitInfo};
use tollgate_core::usage::UsageScanner;
use tollgate_integration_tests::{chat, client, post};
use tollgate_testkit::{tokens, Faults, Provider, COMPLETION_TOKENS_HEADER, FAULT_HEADER};

fn chat_url(p: &Provider) -> String {
    format!("{}/v1/chat/completions", p.url())
}

#[tokio::test]
async fn the_61st_request_in_a_minute_is_refused_with_retry_after() {
    let provider = Provider::builder().rpm(60).spawn().await.unwrap();
    let c = client();
    let url = chat_url(&provider);
    for i in 0..60u64 {
        let a = post(&c, &url, "sk-a", &chat("Hello!"), &[]).await.unwrap();
        assert_eq!(a.status, 200, "request {}", i + 1);
        let remaining: u64 = a
            .header("x-ratelimit-remaining-requests")
            .unwrap()
            .parse()
            .unwrap();
        // Refill during the run may give back a cell; never more than the run's length.
        assert!(
            remaining <= 59 - i + 1,
            "request {}: {remaining} left",
            i + 1
        );
        assert!(a.json()["usage"]["total_tokens"].as_u64().unwrap() > 0);
    }
    let a = post(&c, &url, "sk-a", &chat("Hello!"), &[]).await.unwrap();
    assert_eq!(a.status, 429);
    let wait = headers::retry_after(&a.headers, std::time::SystemTime::now()).unwrap();
    assert!(
        wait >= Duration::from_secs(1) && wait <= Duration::from_secs(2),
        "{wait:?}"
    );
    let wait_ms = headers::retry_after_ms(&a.headers).unwrap();
    assert!(
        wait_ms > Duration::ZERO && wait_ms <= Duration::from_secs(1),
        "{wait_ms:?}"
    );
    assert_eq!(a.json()["error"]["code"], "rate_limit_exceeded");
    assert_eq!(a.json()["error"]["type"], "requests");

    // Another key has its own quota.
    assert_eq!(
        post(&c, &url, "sk-b", &chat("Hi"), &[])
            .await
            .unwrap()
            .status,
        200
    );

    let s = provider.key_stats("sk-a");
    assert_eq!((s.requests, s.ok, s.rate_limited), (61, 60, 1));
    assert_eq!(provider.stats().requests, 62);
}

#[tokio::test(start_paused = true)]
async fn waiting_out_retry_after_on_the_tokio_clock_gets_through() {
    let provider = Provider::builder().rpm(2).spawn().await.unwrap();
    let c = client();
    let url = chat_url(&provider);
    for _ in 0..2 {
        assert_eq!(
            post(&c, &url, "k", &chat("x"), &[]).await.unwrap().status,
            200
        );
    }
    let refused = post(&c, &url, "k", &chat("x"), &[]).await.unwrap();
    assert_eq!(refused.status, 429);
    let wait = headers::retry_after_ms(&refused.headers).unwrap();
    assert!(
        wait > Duration::from_secs(25),
        "2 RPM refills one request in 30 s: {wait:?}"
    );
    // The paused clock jumps; no real time passes.
    tokio::time::sleep(wait).await;
    assert_eq!(
        post(&c, &url, "k", &chat("x"), &[]).await.unwrap().status,
        200
    );
}

#[tokio::test]
async fn tpm_charges_prompt_plus_completion_exactly() {
    let provider = Provider::builder()
        .tpm(100)
        .completion_tokens(10)
        .spawn()
        .await
        .unwrap();
    let c = client();
    let url = chat_url(&provider);
    let a = post(&c, &url, "k", &chat("Hello!"), &[]).await.unwrap();
    assert_eq!(a.status, 200);
    let usage = &a.json()["usage"];
    let prompt = 3 + 3 + tokens::count("user") + tokens::count("Hello!");
    assert_eq!(usage["prompt_tokens"], prompt);
    assert_eq!(usage["completion_tokens"], 10);
    assert_eq!(usage["total_tokens"], prompt + 10);
    let info = RateLimitInfo::from_headers(&a.headers, std::time::SystemTime::now());
    assert_eq!(info.tokens.limit, Some(100));
    assert_eq!(info.tokens.remaining, Some(100 - prompt - 10));

    // A request that costs more than what is left is refused, and spends nothing.
    let big = post(
        &c,
        &url,
        "k",
        &chat("Hello!"),
        &[(COMPLETION_TOKENS_HEADER, "90")],
    )
    .await
    .unwrap();
    assert_eq!(big.status, 429);
    assert_eq!(big.json()["error"]["type"], "tokens");
    assert!(big.header("retry-after").is_some());
    // One that costs more than the whole quota can never pass, and says so.
    let huge = post(
        &c,
        &url,
        "k",
        &chat("Hello!"),
        &[(COMPLETION_TOKENS_HEADER, "500")],
    )
    .await
    .unwrap();
    assert_eq!(huge.status, 429);
    assert_eq!(huge.header("x-should-retry"), Some("false"));
    assert_eq!(huge.json()["error"]["code"], "request_too_large");
    assert_eq!(provider.stats().tokens_served(), prompt + 10);
}

#[tokio::test]
async fn answers_follow_max_tokens_and_the_steering_header() {
    let provider = Provider::builder().spawn().await.unwrap();
    let c = client();
    let url = chat_url(&provider);
    let body = json!({"model": "m", "max_tokens": 5, "n": 2,
                      "messages": [{"role": "user", "content": "Count"}]});
    let a = post(&c, &url, "k", &body, &[]).await.unwrap().json();
    assert_eq!(a["choices"][1]["finish_reason"], "length");
    let text = a["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(tokens::count(text), 5);
    assert_eq!(a["usage"]["completion_tokens"], 10, "two choices of five");

    let steered = post(
        &c,
        &url,
        "k",
        &chat("x"),
        &[(COMPLETION_TOKENS_HEADER, "3")],
    )
    .await
    .unwrap()
    .json();
    assert_eq!(steered["usage"]["completion_tokens"], 3);
    assert_eq!(steered["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn embeddings_cost_their_input() {
    let provider = Provider::builder().spawn().await.unwrap();
    let c = client();
    let url = format!("{}/v1/embeddings", provider.url());
    let a = post(
        &c,
        &url,
        "k",
        &json!({"model": "text-embedding-3-small", "input": ["Hello, world!", "Hi"]}),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200);
    let v = a.json();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(
        v["usage"]["prompt_tokens"],
        tokens::count("Hello, world!") + tokens::count("Hi")
    );
    assert_eq!(v["usage"]["total_tokens"], v["usage"]["prompt_tokens"]);
}

#[tokio::test(start_paused = true)]
async fn streams_are_paced_and_carry_usage_only_when_asked() {
    let provider = Provider::builder()
        .chunk_delay(Duration::from_secs(1))
        .completion_tokens(4)
        .spawn()
        .await
        .unwrap();
    let c = client();
    let url = chat_url(&provider);
    let mut body = chat("Hi");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});

    let start = Instant::now();
    let a = post(&c, &url, "k", &body, &[]).await.unwrap();
    // role chunk, 4 content chunks, finish chunk, usage chunk, [DONE]: 7 pauses.
    assert!(
        start.elapsed() >= Duration::from_secs(7),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        a.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    let mut scanner = UsageScanner::for_response(&a.headers);
    scanner.feed(&a.body);
    let usage = scanner.finish().unwrap();
    assert_eq!(usage.output_tokens, 4);
    assert_eq!(
        usage.input_tokens,
        3 + 3 + tokens::count("user") + tokens::count("Hi")
    );
    assert!(std::str::from_utf8(&a.body)
        .unwrap()
        .ends_with("data: [DONE]\n\n"));

    body["stream_options"] = json!({"include_usage": false});
    let b = post(&c, &url, "k", &body, &[]).await.unwrap();
    let mut scanner = UsageScanner::for_response(&b.headers);
    scanner.feed(&b.body);
    assert_eq!(scanner.finish(), None);
}

#[tokio::test]
async fn faults_on_request() {
    // A window of a year: nothing refills while the test runs, so spending is exact.
    let year = Duration::from_secs(365 * 24 * 3600);
    let provider = Provider::builder()
        .rpm(1000)
        .window(year)
        .spawn()
        .await
        .unwrap();
    let c = client();
    let url = chat_url(&provider);

    let a = post(&c, &url, "k", &chat("x"), &[(FAULT_HEADER, "503")])
        .await
        .unwrap();
    assert_eq!(a.status, 503);
    assert_eq!(a.json()["error"]["code"], "injected_fault");
    assert_eq!(
        post(&c, &url, "k", &chat("x"), &[(FAULT_HEADER, "529")])
            .await
            .unwrap()
            .status,
        529
    );

    let reset = post(&c, &url, "k", &chat("x"), &[(FAULT_HEADER, "reset")]).await;
    assert!(reset.is_err(), "a reset gives no answer");

    let cut = post(&c, &url, "k", &chat("x"), &[(FAULT_HEADER, "cut")]).await;
    assert!(cut.is_err(), "a cut body fails mid-read");

    let mut streamed = chat("x");
    streamed["stream"] = json!(true);
    let cut_stream = post(&c, &url, "k", &streamed, &[(FAULT_HEADER, "cut")]).await;
    assert!(cut_stream.is_err());

    let bad = post(&c, &url, "k", &chat("x"), &[(FAULT_HEADER, "malformed")])
        .await
        .unwrap();
    assert_eq!(bad.status, 200);
    assert!(serde_json::from_slice::<serde_json::Value>(&bad.body).is_err());

    let s = provider.key_stats("k");
    assert_eq!(s.faults, 6);
    assert_eq!(s.ok, 0);
    // Errors and resets cost no quota; cut and malformed answers were generated, so they do.
    let left = post(&c, &url, "k", &chat("x"), &[]).await.unwrap();
    let remaining: u64 = left
        .header("x-ratelimit-remaining-requests")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        remaining,
        1000 - 4,
        "cut, cut stream, malformed, and this one"
    );
}

#[tokio::test(start_paused = true)]
async fn slow_first_byte_waits_on_the_tokio_clock() {
    let provider = Provider::builder().spawn().await.unwrap();
    let c = client();
    let start = Instant::now();
    let a = post(
        &c,
        &chat_url(&provider),
        "k",
        &chat("x"),
        &[(FAULT_HEADER, "slow=30s")],
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200);
    assert!(start.elapsed() >= Duration::from_secs(30));
}

#[tokio::test]
async fn random_faults_hit_about_their_share() {
    let provider = Provider::builder()
        .faults(Faults {
            server_error_rate: 0.25,
            ..Faults::default()
        })
        .seed(7)
        .spawn()
        .await
        .unwrap();
    let c = client();
    let url = chat_url(&provider);
    let mut errors = 0;
    for _ in 0..200 {
        if post(&c, &url, "k", &chat("x"), &[])
            .await
            .unwrap()
            .status
            .is_server_error()
        {
            errors += 1;
        }
    }
    // Seeded: the same run every time; the share is near the rate.
    assert!((30..=70).contains(&errors), "{errors}");
    assert_eq!(provider.stats().faults, errors);
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let provider = Provider::builder().spawn().await.unwrap();
    let c = client();
    let url = chat_url(&provider);
    let no_model = post(&c, &url, "k", &json!({"messages": []}), &[])
        .await
        .unwrap();
    assert_eq!(no_model.status, 400);
    assert_eq!(no_model.json()["error"]["type"], "invalid_request_error");
    let no_messages = post(&c, &url, "k", &json!({"model": "m", "messages": []}), &[])
        .await
        .unwrap();
    assert_eq!(no_messages.status, 400);
    let unknown = post(
        &c,
        &format!("{}/v1/nope", provider.url()),
        "k",
        &chat("x"),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(unknown.status, 404);
    assert_eq!(provider.key_stats("k").bad_requests, 3);
}

#[tokio::test]
async fn shutdown_closes_the_port() {
    let provider = Provider::builder().spawn().await.unwrap();
    let addr = provider.addr();
    provider.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
