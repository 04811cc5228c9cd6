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

/// The usage reading as it was written over a `serde_json::Value` (`as_u64` and `get`
/// chains), kept as the oracle the reader without a `Value` must agree with.
fn usage_by_value(v: &serde_json::Value) -> Option<Usage> {
    use serde_json::Value;
    let obj = v.as_object()?;
    let found = obj
        .get("usage")
        .filter(|u| u.is_object())
        .or_else(|| obj.get("usageMetadata"))
        .or_else(|| obj.get("message").and_then(|m| m.get("usage")))
        .or_else(|| obj.get("response").and_then(|r| r.get("usage")));
    let Some(Value::Object(u)) = found else {
        return None;
    };
    let n = |k: &str| u.get(k).and_then(Value::as_u64);
    let sum = |ks: &[&str]| {
        ks.iter()
            .filter_map(|k| n(k))
            .fold(None, |acc: Option<u64>, x| {
                Some(acc.unwrap_or(0).saturating_add(x))
            })
    };
    let (mut input, mut output, mut total, mut cached) = (None, None, None, None);
    if let Some(p) = n("prompt_tokens") {
        input = Some(p);
    }
    if let Some(c) = n("completion_tokens") {
        output = Some(c);
    }
    if let Some(i) = sum(&[
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ]) {
        input = Some(i);
    }
    if let Some(o) = n("output_tokens") {
        output = Some(o);
    }
    if let Some(p) = n("promptTokenCount") {
        input = Some(p);
    }
    if let Some(o) = sum(&["candidatesTokenCount", "thoughtsTokenCount"]) {
        output = Some(o);
    }
    if let Some(t) = n("total_tokens").or_else(|| n("totalTokenCount")) {
        total = Some(t);
    }
    if let Some(c) = n("cache_read_input_tokens")
        .or_else(|| n("cachedContentTokenCount"))
        .or_else(|| {
            ["prompt_tokens_details", "input_tokens_details"]
                .iter()
                .find_map(|d| u.get(*d)?.get("cached_tokens")?.as_u64())
        })
    {
        cached = Some(c);
    }
    if input.is_none() && output.is_none() && total.is_none() {
        return None;
    }
    let (i, o) = (input.unwrap_or(0), output.unwrap_or(0));
    Some(Usage {
        input_tokens: i,
        output_tokens: o,
        total_tokens: total
            .unwrap_or(i.saturating_add(o))
            .max(i.saturating_add(o)),
        cached_input_tokens: cached.unwrap_or(0),
    })
}

/// JSON shaped like answers and events, dense in the names usage hides under, with
/// counts of every kind a provider (or a broken one) might send.
fn usage_shaped() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (0u64..1_000_000).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-5i64..0).prop_map(Value::from),
        (0.0f64..100.0).prop_map(Value::from),
        "[a-z]{0,4}".prop_map(Value::from),
    ];
    let names = prop_oneof![
        Just("usage"),
        Just("usageMetadata"),
        Just("message"),
        Just("response"),
        Just("prompt_tokens"),
        Just("completion_tokens"),
        Just("total_tokens"),
        Just("input_tokens"),
        Just("output_tokens"),
        Just("cache_creation_input_tokens"),
        Just("cache_read_input_tokens"),
        Just("promptTokenCount"),
        Just("candidatesTokenCount"),
        Just("thoughtsTokenCount"),
        Just("totalTokenCount"),
        Just("cachedContentTokenCount"),
        Just("prompt_tokens_details"),
        Just("input_tokens_details"),
        Just("cached_tokens"),
        Just("choices"),
    ];
    let top = names.clone();
    let any = leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            prop::collection::btree_map(names.clone().prop_map(str::to_owned), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    // An answer is an object: the top level always is one.
    prop::collection::btree_map(top.prop_map(str::to_owned), any, 1..6)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]
    #[test]
    fn usage_read_without_a_value_agrees_with_the_value_reading(v in usage_shaped()) {
        let expected = usage_by_value(&v);
        prop_assert_eq!(Usage::from_json(&v), expected);
        prop_assert_eq!(Usage::from_json_bytes(v.to_string().as_bytes()), expected);
        let mut json = UsageScanner::json(1 << 20);
        json.feed(&Bytes::from(v.to_string()));
        prop_assert_eq!(json.finish(), expected);
    }
}

#[test]
fn usage_in_odd_places_reads_as_a_value_does() {
    for body in [
        r#"{"usage":null,"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":1}}"#,
        r#"{"usage":[1],"message":{"usage":{"input_tokens":4,"output_tokens":1}}}"#,
        r#"{"usageMetadata":null,"message":{"usage":{"input_tokens":4,"output_tokens":1}}}"#,
        r#"{"message":{"usage":null},"response":{"usage":{"input_tokens":4,"output_tokens":1}}}"#,
        r#"{"message":"text","response":{"usage":{"input_tokens":4,"output_tokens":1}}}"#,
        r#"{"usage":{"prompt_tokens":4.0,"completion_tokens":-1,"total_tokens":"9"}}"#,
        r#"{"usage":{"prompt_tokens":4,"prompt_tokens_details":null,"input_tokens_details":{"cached_tokens":2}}}"#,
        r#"{"usage":{"prompt_tokens":4,"prompt_tokens_details":{"cached_tokens":[1]},"input_tokens_details":{"cached_tokens":2}}}"#,
        r#"{"usage":{"input_tokens":18446744073709551615,"cache_read_input_tokens":5}}"#,
    ] {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        let expected = usage_by_value(&v);
        assert_eq!(Usage::from_json_bytes(body.as_bytes()), expected, "{body}");
        assert_eq!(Usage::from_json(&v), expected, "{body}");
    }
}

#[test]
fn usage_sent_twice_reads_the_last_as_a_value_does() {
    let body = br#"{"usage":{"prompt_tokens":1,"completion_tokens":1},"usage":{"prompt_tokens":7,"completion_tokens":3}}"#;
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(Usage::from_json_bytes(body), usage_by_value(&v));
    assert_eq!(
        Usage::from_json_bytes(body).map(|u| u.input_tokens),
        Some(7)
    );
}
