//! Property tests: the parsers of untrusted input never panic, stay within their bounds,
//! and agree with their writers.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use proptest::prelude::*;
use tollgate_core::duration::{format_go_duration, parse_go_duration, MAX_HINT};
use tollgate_core::facts::RequestFacts;
use tollgate_core::headers::{self, RateLimitInfo};
use tollgate_core::key::{ApiKey, Header, KeyExtractor, RequestHead};
use tollgate_core::usage::{Usage, UsageScanner};

/// Any byte string a `HeaderValue` accepts: visible ASCII, space, tab and obs-text.
fn header_value() -> impl Strategy<Value = HeaderValue> {
    prop::collection::vec(prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff], 0..40)
        .prop_map(|b| HeaderValue::from_bytes(&b).unwrap())
}

/// Header values that look like what the parsers expect, give or take.
fn plausible_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| n.to_string()),
        "[0-9]{0,25}(\\.[0-9]{0,12})?(ns|us|ms|s|m|h)?([0-9]{1,3}(ms|s|m))?",
        "-?[0-9]{1,4}m[0-9]{1,3}s",
        "(Mon|Sun), [0-9]{2} (Jan|Nov) [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT",
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?Z",
    ]
}

const NAMES: &[&str] = &[
    "retry-after",
    "retry-after-ms",
    "grpc-retry-pushback-ms",
    "x-should-retry",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-input-tokens-remaining",
    "authorization",
    "x-api-key",
    "x-tenant-id",
];

fn check_all(h: &HeaderMap) {
    let now = SystemTime::now();
    for d in [headers::retry_after(h, now), headers::retry_after_ms(h)]
        .into_iter()
        .flatten()
    {
        assert!(d <= MAX_HINT);
    }
    let _ = headers::grpc_retry_pushback(h);
    let _ = headers::should_retry(h);
    let info = RateLimitInfo::from_headers(h, now);
    for s in [
        info.requests,
        info.tokens,
        info.input_tokens,
        info.output_tokens,
    ] {
        assert!(s.reset.is_none_or(|d| d <= MAX_HINT));
    }
    let mut req = Request::new(());
    *req.headers_mut() = h.clone();
    let head = RequestHead::new(&req);
    if let Some(k) = ApiKey.extract(&head) {
        assert!(k.as_str().starts_with("apikey:"));
    }
    let _ = Header::new("x-tenant-id").extract(&head);
}

proptest! {
    #[test]
    fn go_duration_parser_never_panics(s in "\\PC{0,30}") {
        if let Some(d) = parse_go_duration(&s) {
            prop_assert!(d <= MAX_HINT);
        }
    }

    #[test]
    fn go_duration_round_trips(nanos in 0u64..=MAX_HINT.as_nanos() as u64) {
        let d = Duration::from_nanos(nanos);
        prop_assert_eq!(parse_go_duration(&format_go_duration(d)), Some(d));
    }

    #[test]
    fn header_parsers_never_panic_on_any_value(
        picks in prop::collection::vec((0..NAMES.len(), header_value()), 0..8)
    ) {
        let mut h = HeaderMap::new();
        for (i, v) in picks {
            h.append(HeaderName::from_static(NAMES[i]), v);
        }
        check_all(&h);
    }

    #[test]
    fn header_parsers_never_panic_on_plausible_values(
        picks in prop::collection::vec((0..NAMES.len(), plausible_value()), 0..8)
    ) {
        let mut h = HeaderMap::new();
        for (i, v) in picks {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.append(HeaderName::from_static(NAMES[i]), v);
            }
        }
        check_all(&h);
    }

    #[test]
    fn retry_after_round_trips_through_the_writer(ms in 0u64..MAX_HINT.as_millis() as u64) {
        let mut h = HeaderMap::new();
        headers::set_retry_after(&mut h, Duration::from_millis(ms));
        let back = headers::retry_after(&h, SystemTime::now()).unwrap();
        // Written rounded up to whole seconds: never early, at most a second late.
        prop_assert!(back >= Duration::from_millis(ms));
        prop_assert!(back < Duration::from_millis(ms) + Duration::from_secs(1));
    }

    #[test]
    fn sse_usage_is_the_same_however_the_stream_is_cut(
        input in 0u64..1_000_000,
        output in 0u64..1_000_000,
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        crlf in any::<bool>(),
    ) {
        let mut body = format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"a\"}}}}]}}\n\n\
             : comment\n\
             data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{input},\"completion_tokens\":{output}}}}}\n\n\
             data: [DONE]\n\n"
        );
        if crlf {
            body = body.replace('\n', "\r\n");
        }
        let bytes = body.as_bytes();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        points.push(0);
        points.push(bytes.len());
        points.sort_unstable();
        let mut scanner = UsageScanner::sse();
        for w in points.windows(2) {
            scanner.feed(&Bytes::copy_from_slice(&bytes[w[0]..w[1]]));
        }
        let u = scanner.finish().unwrap();
        prop_assert_eq!((u.input_tokens, u.output_tokens, u.total_tokens), (input, output, input + output));
    }

    #[test]
    fn sse_scanner_never_panics_on_any_bytes(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..16)
    ) {
        let mut scanner = UsageScanner::sse();
        for c in chunks {
            scanner.feed(&Bytes::from(c));
        }
        let _ = scanner.finish();
    }

    #[test]
    fn usage_and_facts_never_panic_on_any_json(s in "\\PC{0,200}") {
        let _ = Usage::from_json_bytes(s.as_bytes());
        if let Ok(f) = RequestFacts::parse("/v1/chat/completions", &HeaderMap::new(), Bytes::from(s)) {
            let _ = f.prompt();
        }
    }
}

/// A generator of JSON values, for the facts parser.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "[a-z ]{0,8}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("model".to_owned()),
                    Just("messages".to_owned()),
                    Just("content".to_owned()),
                    Just("input".to_owned()),
                    Just("type".to_owned()),
                    Just("max_tokens".to_owned()),
                    Just("stream".to_owned()),
                    Just("usage".to_owned()),
                    "[a-z]{1,6}",
                ],
                inner,
                0..6,
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn facts_and_usage_accept_any_json_shape(v in json_value()) {
        let body = Bytes::from(v.to_string());
        for path in ["/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/other"] {
            let f = RequestFacts::parse(path, &HeaderMap::new(), body.clone()).unwrap();
            let p = f.prompt();
            prop_assert!(p.text_len() <= body.len() * 2);
        }
        let _ = Usage::from_json(&v);
    }
}
