//! Request facts, on any body for any API path, and the token estimate made from them:
//! never a panic.
#![no_main]

use bytes::Bytes;
use http::HeaderMap;
use libfuzzer_sys::fuzz_target;
use tollgate_core::facts::RequestFacts;
use tollgate_tpm::estimate::{Counting, Estimator};

const PATHS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/moderations",
    "/v1beta/models/gemini-2.0-flash:generateContent",
    "/v1/images/generations",
    "/other",
];

fuzz_target!(|data: &[u8]| {
    let Some((&p, body)) = data.split_first() else {
        return;
    };
    let path = PATHS[usize::from(p) % PATHS.len()];
    let Ok(facts) = RequestFacts::parse(path, &HeaderMap::new(), Bytes::copy_from_slice(body))
    else {
        return;
    };
    let _ = (
        facts.kind(),
        facts.model(),
        facts.is_stream(),
        facts.include_usage(),
    );
    let _ = (
        facts.max_output_tokens(),
        facts.choices(),
        facts.prompt().text_len(),
    );
    if let Some(f) = facts.with_usage_requested() {
        assert!(f.json().is_some());
    }
    let counting = if p & 0x80 == 0 {
        Counting::Exact
    } else {
        Counting::Bytes
    };
    let e = Estimator::default().counting(counting).estimate(&facts);
    let _ = e.total();
});
