//! The readers of rate-limit and retry headers, on any header map: never a panic, and
//! every hint within `MAX_HINT`.
#![no_main]

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tollgate_core::duration::{parse_go_duration, MAX_HINT};
use tollgate_core::headers::{self, RateLimitInfo};

/// The names the readers look for: a one-byte name in the input stands for one of them, so
/// the fuzzer reaches the parsers without having to guess the names first.
const NAMES: &[&str] = &[
    "retry-after",
    "retry-after-ms",
    "grpc-retry-pushback-ms",
    "x-should-retry",
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "anthropic-ratelimit-requests-limit",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-input-tokens-remaining",
    "anthropic-ratelimit-output-tokens-reset",
    "content-type",
];

fuzz_target!(|data: &[u8]| {
    let mut h = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let name = match name {
            [b] => HeaderName::from_static(NAMES[usize::from(*b) % NAMES.len()]),
            _ => match HeaderName::from_bytes(name) {
                Ok(n) => n,
                Err(_) => continue,
            },
        };
        if let Ok(v) = HeaderValue::from_bytes(value) {
            h.append(name, v);
        }
    }
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000);
    for d in [
        headers::retry_after(&h, now),
        headers::retry_after_ms(&h),
        headers::server_hint(&h, now),
    ]
    .into_iter()
    .flatten()
    {
        assert!(d <= MAX_HINT, "{d:?} over the cap");
    }
    let _ = headers::grpc_retry_pushback(&h);
    let _ = headers::should_retry(&h);
    let _ = headers::is_event_stream(&h);
    let info = RateLimitInfo::from_headers(&h, now);
    let _ = info.is_empty();
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(d) = parse_go_duration(s) {
            assert!(d <= MAX_HINT, "{d:?} over the cap");
        }
    }
});
