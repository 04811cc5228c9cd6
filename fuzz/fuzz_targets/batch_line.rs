//! A Batch API input line, on any text: a line to run or a line error, never a panic; a
//! line that runs has a JSON object for its body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_jobs::batch::parse_line;

const ENDPOINTS: &[&str] = &["/v1/chat/completions", "/v1/embeddings", "/v1/responses"];

fuzz_target!(|data: &[u8]| {
    let Some((&e, line)) = data.split_first() else {
        return;
    };
    let Ok(line) = std::str::from_utf8(line) else {
        return;
    };
    if let Ok(ok) = parse_line(line, ENDPOINTS[usize::from(e) % ENDPOINTS.len()]) {
        let body: serde_json::Value = serde_json::from_str(&ok.body).expect("the body is JSON");
        assert!(body.is_object());
    }
});
