//! Rate-limit headers, read and written.
//!
//! Reading: the hints providers send with a 429 or a 200 — `retry-after-ms`,
//! `Retry-After` (delta-seconds or HTTP date), OpenAI's `x-ratelimit-{limit,remaining,
//! reset}-{requests,tokens}`, Anthropic's `anthropic-ratelimit-*` and gRPC's
//! `grpc-retry-pushback-ms`. Every parser returns `None` on garbage or negative values and
//! clamps absurd waits to [`MAX_HINT`]; none of them panics on any input.
//!
//! Writing: `Retry-After` in whole seconds, rounded up, and the IETF `RateLimit-Policy` /
//! `RateLimit` fields of draft-ietf-httpapi-ratelimit-headers (draft 08 onwards:
//! `RateLimit-Policy: "rpm";q=3000;w=60` and `RateLimit: "rpm";r=0;t=2`).
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use http::HeaderMap;
//! use tollgate_core::headers::{self, RateLimitInfo};
//!
//! let mut h = HeaderMap::new();
//! h.insert("retry-after", "7".parse().unwrap());
//! h.insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
//! h.insert("x-ratelimit-reset-requests", "6m0s".parse().unwrap());
//!
//! let now = SystemTime::now();
//! assert_eq!(headers::retry_after(&h, now), Some(Duration::from_secs(7)));
//! let info = RateLimitInfo::from_headers(&h, now);
//! assert_eq!(info.requests.remaining, Some(0));
//! assert_eq!(info.requests.reset, Some(Duration::from_secs(360)));
//! ```

use std::time::{Duration, SystemTime};

use http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};

use crate::duration::parse_go_duration;
pub use crate::duration::MAX_HINT;

/// `retry-after-ms`: OpenAI's wait hint in milliseconds.
pub const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
/// `grpc-retry-pushback-ms`: gRPC's server pushback, in milliseconds.
pub const GRPC_RETRY_PUSHBACK_MS: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");
/// `x-should-retry`: a server's explicit yes or no to retrying.
pub const X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");
/// `ratelimit`: the IETF field describing the current state of a limit.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// `ratelimit-policy`: the IETF field describing a limit's quota and window.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// `x-ratelimit-limit-requests`.
pub const X_RATELIMIT_LIMIT_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-limit-requests");
/// `x-ratelimit-limit-tokens`.
pub const X_RATELIMIT_LIMIT_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-limit-tokens");
/// `x-ratelimit-remaining-requests`.
pub const X_RATELIMIT_REMAINING_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-requests");
/// `x-ratelimit-remaining-tokens`.
pub const X_RATELIMIT_REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-tokens");
/// `x-ratelimit-reset-requests`.
pub const X_RATELIMIT_RESET_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-reset-requests");
/// `x-ratelimit-reset-tokens`.
pub const X_RATELIMIT_RESET_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-reset-tokens");

fn text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

/// A non-negative decimal number of `unit`s, clamped to [`MAX_HINT`].
fn decimal(value: &str, unit: Duration) -> Option<Duration> {
    let n: f64 = value.parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let secs = n * unit.as_secs_f64();
    if secs >= MAX_HINT.as_secs_f64() {
        return Some(MAX_HINT);
    }
    Duration::try_from_secs_f64(secs).ok()
}

/// `retry-after-ms`, a (possibly fractional) number of milliseconds.
pub fn retry_after_ms(headers: &HeaderMap) -> Option<Duration> {
    decimal(text(headers, "retry-after-ms")?, Duration::from_millis(1))
}

/// The server's hint of when to come back: `retry-after-ms` when present (it is exact),
/// else `Retry-After` (seconds or an HTTP date relative to `now`), as OpenAI's SDK reads
/// them.
pub fn server_hint(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    retry_after_ms(headers).or_else(|| retry_after(headers, now))
}

/// `Retry-After`, as delta-seconds or as an HTTP date relative to `now`.
///
/// A date in the past means no wait (`Some(Duration::ZERO)`). Fractional seconds are
/// accepted although RFC 9110 allows only integers, because some servers send them.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = text(headers, RETRY_AFTER.as_str())?;
    if value.starts_with(|c: char| c.is_ascii_digit() || c == '.' || c == '-' || c == '+') {
        return decimal(value, Duration::from_secs(1));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(until(at, now))
}

fn until(at: SystemTime, now: SystemTime) -> Duration {
    at.duration_since(now)
        .unwrap_or(Duration::ZERO)
        .min(MAX_HINT)
}

/// What a gRPC server's `grpc-retry-pushback-ms` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushback {
    /// Retry, but not before this long.
    After(Duration),
    /// Do not retry: gRPC (proposal A6) says a negative or malformed value means this.
    DoNotRetry,
}

/// `grpc-retry-pushback-ms`. `None` when the header is absent.
pub fn grpc_retry_pushback(headers: &HeaderMap) -> Option<Pushback> {
    let value = headers.get(GRPC_RETRY_PUSHBACK_MS)?;
    let parsed = value
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok());
    Some(match parsed {
        Some(ms) if ms >= 0 => {
            Pushback::After(Duration::from_millis(ms.unsigned_abs()).min(MAX_HINT))
        }
        _ => Pushback::DoNotRetry,
    })
}

/// `x-should-retry: true|false`, a server's explicit word on retrying.
pub fn should_retry(headers: &HeaderMap) -> Option<bool> {
    match text(headers, "x-should-retry")? {
        v if v.eq_ignore_ascii_case("true") => Some(true),
        v if v.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

/// The state of one limit as a provider reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitState {
    /// The quota (`x-ratelimit-limit-*`).
    pub limit: Option<u64>,
    /// What is left of it (`x-ratelimit-remaining-*`).
    pub remaining: Option<u64>,
    /// How long until the limit is fully replenished (`x-ratelimit-reset-*`).
    pub reset: Option<Duration>,
}

impl LimitState {
    /// True when no header said anything about this limit.
    pub fn is_empty(&self) -> bool {
        self.limit.is_none() && self.remaining.is_none() && self.reset.is_none()
    }
}

/// Everything a response's rate-limit headers say, from OpenAI-style `x-ratelimit-*` or
/// Anthropic's `anthropic-ratelimit-*` fields (OpenAI's win when both are present).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimitInfo {
    /// The requests limit.
    pub requests: LimitState,
    /// The tokens limit (Anthropic: the combined `-tokens-` fields).
    pub tokens: LimitState,
    /// Anthropic's input-tokens limit.
    pub input_tokens: LimitState,
    /// Anthropic's output-tokens limit.
    pub output_tokens: LimitState,
}

impl RateLimitInfo {
    /// Reads every known rate-limit field; `now` turns Anthropic's RFC 3339 reset
    /// timestamps into durations.
    pub fn from_headers(headers: &HeaderMap, now: SystemTime) -> Self {
        // One pass over the names first: most answers carry one family or none, and a
        // lookup by name costs far more than looking at the few names an answer has (it is
        // read on every answer, by the limiter and the budget both).
        let (mut has_openai, mut has_anthropic) = (false, false);
        for name in headers.keys() {
            let n = name.as_str();
            has_openai |= n.starts_with("x-ratelimit-");
            has_anthropic |= n.starts_with("anthropic-ratelimit-");
        }
        if !has_openai && !has_anthropic {
            return Self::default();
        }
        let openai = |[limit, remaining, reset]: [&str; 3]| {
            if !has_openai {
                return LimitState::default();
            }
            LimitState {
                limit: count(headers, limit),
                remaining: count(headers, remaining),
                reset: text(headers, reset).and_then(reset_duration),
            }
        };
        let anthropic = |[limit, remaining, reset]: [&str; 3]| {
            if !has_anthropic {
                return LimitState::default();
            }
            LimitState {
                limit: count(headers, limit),
                remaining: count(headers, remaining),
                reset: text(headers, reset)
                    .and_then(|v| humantime::parse_rfc3339_weak(v).ok())
                    .map(|at| until(at, now)),
            }
        };
        let either = |a: LimitState, b: LimitState| if a.is_empty() { b } else { a };
        Self {
            requests: either(openai(OPENAI_REQUESTS), anthropic(ANTHROPIC_REQUESTS)),
            tokens: either(openai(OPENAI_TOKENS), anthropic(ANTHROPIC_TOKENS)),
            input_tokens: anthropic(ANTHROPIC_INPUT_TOKENS),
            output_tokens: anthropic(ANTHROPIC_OUTPUT_TOKENS),
        }
    }

    /// True when the headers carried no rate-limit field at all.
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
            && self.tokens.is_empty()
            && self.input_tokens.is_empty()
            && self.output_tokens.is_empty()
    }
}

const OPENAI_REQUESTS: [&str; 3] = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
];
const OPENAI_TOKENS: [&str; 3] = [
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];
const ANTHROPIC_REQUESTS: [&str; 3] = [
    "anthropic-ratelimit-requests-limit",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
];
const ANTHROPIC_TOKENS: [&str; 3] = [
    "anthropic-ratelimit-tokens-limit",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-tokens-reset",
];
const ANTHROPIC_INPUT_TOKENS: [&str; 3] = [
    "anthropic-ratelimit-input-tokens-limit",
    "anthropic-ratelimit-input-tokens-remaining",
    "anthropic-ratelimit-input-tokens-reset",
];
const ANTHROPIC_OUTPUT_TOKENS: [&str; 3] = [
    "anthropic-ratelimit-output-tokens-limit",
    "anthropic-ratelimit-output-tokens-remaining",
    "anthropic-ratelimit-output-tokens-reset",
];

fn count(headers: &HeaderMap, name: &str) -> Option<u64> {
    text(headers, name)?.parse().ok()
}

/// A reset is usually a Go duration (`6m0s`); some servers send plain seconds (`12`).
fn reset_duration(value: &str) -> Option<Duration> {
    parse_go_duration(value).or_else(|| decimal(value, Duration::from_secs(1)))
}

/// Whether an answer is a server-sent event stream: its `Content-Type` is
/// `text/event-stream` (any case, parameters such as `; charset=utf-8` aside).
pub fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// Whether `Content-Type` says JSON: `application/json` or any `…+json`, parameters
/// aside, in any case. `false` without a `Content-Type`.
pub fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct.split(';').next().unwrap_or("").trim();
    let b = essence.as_bytes();
    essence.eq_ignore_ascii_case("application/json")
        || b.len() > 5 && b[b.len() - 5..].eq_ignore_ascii_case(b"+json")
}

/// Writes `Retry-After` as whole seconds, rounded up so a client that waits exactly that
/// long is never early (`0.2 s` becomes `1`).
pub fn set_retry_after(headers: &mut HeaderMap, wait: Duration) {
    headers.insert(RETRY_AFTER, HeaderValue::from(ceil_secs(wait)));
}

/// Whole seconds, rounded up, clamped to [`MAX_HINT`].
pub fn ceil_secs(d: Duration) -> u64 {
    let d = d.min(MAX_HINT);
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// One limit, described for the IETF `RateLimit-Policy` and `RateLimit` fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitField<'a> {
    /// The policy's name (`"rpm"`, `"tpm"`); characters outside printable ASCII, `"` and
    /// `\` are replaced by `_`.
    pub name: &'a str,
    /// The quota per window.
    pub quota: u64,
    /// The window.
    pub window: Duration,
    /// What the quota counts, when it is not requests (`Some("tokens")`).
    pub unit: Option<&'a str>,
    /// What is left now.
    pub remaining: u64,
    /// How long until the quota is replenished enough to pass again.
    pub reset: Duration,
}

impl RateLimitField<'_> {
    /// Appends this limit to the `RateLimit-Policy` and `RateLimit` fields of `headers`
    /// (several limits make several list members, as the draft allows).
    pub fn append_to(&self, headers: &mut HeaderMap) {
        let name: String = self
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let unit = self
            .unit
            .filter(|u| !u.is_empty() && u.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'))
            .map(|u| format!(";qu=\"{u}\""))
            .unwrap_or_default();
        let policy = format!(
            "\"{name}\";q={};w={}{unit}",
            self.quota,
            ceil_secs(self.window).max(1)
        );
        let state = format!(
            "\"{name}\";r={};t={}",
            self.remaining,
            ceil_secs(self.reset)
        );
        // Both strings are built from printable ASCII only, so they are valid values.
        if let Ok(v) = HeaderValue::from_str(&policy) {
            headers.append(RATELIMIT_POLICY, v);
        }
        if let Ok(v) = HeaderValue::from_str(&state) {
            headers.append(RATELIMIT, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn retry_after_ms_reads_fractions_and_rejects_garbage() {
        let ms = |v| retry_after_ms(&map(&[("retry-after-ms", v)]));
        assert_eq!(ms("1500"), Some(Duration::from_millis(1500)));
        assert_eq!(ms("12.5"), Some(Duration::from_micros(12_500)));
        assert_eq!(ms(" 20 "), Some(Duration::from_millis(20)));
        assert_eq!(ms("-1"), None);
        assert_eq!(ms("NaN"), None);
        assert_eq!(ms("inf"), None);
        assert_eq!(ms("soon"), None);
        assert_eq!(ms("1e300"), Some(MAX_HINT));
        assert_eq!(retry_after_ms(&HeaderMap::new()), None);
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        let ra = |v| retry_after(&map(&[("retry-after", v)]), now);
        assert_eq!(ra("120"), Some(Duration::from_secs(120)));
        assert_eq!(ra("0"), Some(Duration::ZERO));
        assert_eq!(ra("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(ra("-5"), None);
        assert_eq!(ra("99999999999"), Some(MAX_HINT));
        assert_eq!(
            ra("Sun, 06 Nov 1994 08:50:07 GMT"),
            Some(Duration::from_secs(30))
        );
        // A date in the past means "now".
        assert_eq!(ra("Sun, 06 Nov 1994 08:00:00 GMT"), Some(Duration::ZERO));
        // The two obsolete date formats RFC 9110 still asks recipients to accept.
        assert_eq!(
            ra("Sunday, 06-Nov-94 08:49:47 GMT"),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            ra("Sun Nov  6 08:49:57 1994"),
            Some(Duration::from_secs(20))
        );
        assert_eq!(ra("tomorrow"), None);
        assert_eq!(ra(""), None);
    }

    #[test]
    fn grpc_pushback_negative_means_do_not_retry() {
        let p = |v| grpc_retry_pushback(&map(&[("grpc-retry-pushback-ms", v)]));
        assert_eq!(p("250"), Some(Pushback::After(Duration::from_millis(250))));
        assert_eq!(p("-1"), Some(Pushback::DoNotRetry));
        assert_eq!(p("later"), Some(Pushback::DoNotRetry));
        assert_eq!(p("999999999999"), Some(Pushback::After(MAX_HINT)));
        assert_eq!(grpc_retry_pushback(&HeaderMap::new()), None);
    }

    #[test]
    fn should_retry_is_a_strict_boolean() {
        let s = |v| should_retry(&map(&[("x-should-retry", v)]));
        assert_eq!(s("true"), Some(true));
        assert_eq!(s("FALSE"), Some(false));
        assert_eq!(s("maybe"), None);
    }

    #[test]
    fn reads_openai_rate_limit_headers() {
        let h = map(&[
            ("x-ratelimit-limit-requests", "3000"),
            ("x-ratelimit-remaining-requests", "2999"),
            ("x-ratelimit-reset-requests", "20ms"),
            ("x-ratelimit-limit-tokens", "250000"),
            ("x-ratelimit-remaining-tokens", "-3"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]);
        let info = RateLimitInfo::from_headers(&h, SystemTime::now());
        assert_eq!(
            info.requests,
            LimitState {
                limit: Some(3000),
                remaining: Some(2999),
                reset: Some(Duration::from_millis(20)),
            }
        );
        assert_eq!(info.tokens.limit, Some(250_000));
        assert_eq!(info.tokens.remaining, None, "negative remaining is garbage");
        assert_eq!(info.tokens.reset, Some(Duration::from_secs(360)));
        assert!(info.input_tokens.is_empty());
    }

    #[test]
    fn reads_anthropic_rate_limit_headers() {
        let now = humantime::parse_rfc3339("2025-01-01T00:00:00Z").unwrap();
        let h = map(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-requests-reset", "2025-01-01T00:00:01Z"),
            ("anthropic-ratelimit-input-tokens-limit", "40000"),
            ("anthropic-ratelimit-input-tokens-remaining", "39000"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2025-01-01T00:00:01.500Z",
            ),
            ("anthropic-ratelimit-output-tokens-reset", "not a date"),
        ]);
        let info = RateLimitInfo::from_headers(&h, now);
        assert_eq!(info.requests.limit, Some(50));
        assert_eq!(info.requests.remaining, Some(49));
        assert_eq!(info.requests.reset, Some(Duration::from_secs(1)));
        assert_eq!(info.input_tokens.remaining, Some(39_000));
        assert_eq!(info.input_tokens.reset, Some(Duration::from_millis(1500)));
        assert!(info.output_tokens.is_empty());
        assert!(info.tokens.is_empty());
        assert!(RateLimitInfo::from_headers(&HeaderMap::new(), now).is_empty());
    }

    #[test]
    fn writes_retry_after_rounded_up() {
        let mut h = HeaderMap::new();
        set_retry_after(&mut h, Duration::from_millis(200));
        assert_eq!(h["retry-after"], "1");
        set_retry_after(&mut h, Duration::from_secs(3));
        assert_eq!(h["retry-after"], "3");
        set_retry_after(&mut h, Duration::from_millis(3001));
        assert_eq!(h["retry-after"], "4");
    }

    #[test]
    fn writes_ietf_ratelimit_fields() {
        let mut h = HeaderMap::new();
        RateLimitField {
            name: "rpm",
            quota: 3000,
            window: Duration::from_secs(60),
            unit: None,
            remaining: 0,
            reset: Duration::from_millis(1500),
        }
        .append_to(&mut h);
        RateLimitField {
            name: "t\"pm\n",
            quota: 100_000,
            window: Duration::from_secs(60),
            unit: Some("tokens"),
            remaining: 42,
            reset: Duration::ZERO,
        }
        .append_to(&mut h);
        let policies: Vec<_> = h.get_all("ratelimit-policy").iter().collect();
        let states: Vec<_> = h.get_all("ratelimit").iter().collect();
        assert_eq!(
            policies,
            [
                "\"rpm\";q=3000;w=60",
                "\"t_pm_\";q=100000;w=60;qu=\"tokens\""
            ]
        );
        assert_eq!(states, ["\"rpm\";r=0;t=2", "\"t_pm_\";r=42;t=0"]);
    }
}
