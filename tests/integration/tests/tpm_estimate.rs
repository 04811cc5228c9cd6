//! The TPM estimate against the simulated provider's own count (made with a different
//! tokenizer implementation, bpe-openai): exact for OpenAI encodings.

use bytes::Bytes;
use http::HeaderMap;
use serde_json::{json, Value};
use tollgate_core::facts::RequestFacts;
use tollgate_integration_tests::{client, post};
use tollgate_testkit::Provider;
use tollgate_tpm::estimate::Estimator;

fn requests() -> Vec<(&'static str, Value)> {
    let long: String = (0..2000)
        .map(|i| format!("token{} ", i * 7919 % 10007))
        .collect();
    vec![
        (
            "/v1/chat/completions",
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello!"}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "gpt-4o-mini", "max_tokens": 5, "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "name": "ann", "content": "Grüße aus Köln! 東京は晴れです。 🙂"},
            {"role": "assistant", "content": "fn main() { println!(\"{}\", 1 + 2); }"},
            {"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "gpt-4", "messages": [{"role": "user", "content": long}]}),
        ),
        (
            "/v1/embeddings",
            json!({"model": "text-embedding-3-small", "input": ["Hello, world!", "Ünïcödé ✓", [1, 2, 3]]}),
        ),
    ]
}

#[tokio::test]
async fn estimates_equal_the_providers_count_exactly() {
    let provider = Provider::builder().spawn().await.unwrap();
    let c = client();
    let estimator = Estimator::default();
    for (path, body) in requests() {
        let facts =
            RequestFacts::parse(path, &HeaderMap::new(), Bytes::from(body.to_string())).unwrap();
        let e = estimator.estimate(&facts);
        assert!(e.exact, "{body}");
        let answer = post(&c, &format!("{}{path}", provider.url()), "k", &body, &[])
            .await
            .unwrap();
        assert_eq!(answer.status, 200);
        let counted = answer.json()["usage"]["prompt_tokens"].as_u64().unwrap();
        assert_eq!(e.prompt_tokens, counted, "{path} {body}");
    }
}
