//! Which answers are worth another attempt, and what the server said about when.

use std::fmt;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tollgate_core::headers::{self, Pushback, RateLimitInfo};
use tollgate_core::refusal::{Reason as RefusalReason, Refusal};

/// One attempt's outcome, as a classifier sees it.
#[derive(Clone, Copy, Debug)]
pub enum Outcome<'a> {
    /// An answer came.
    Response {
        /// Its status.
        status: StatusCode,
        /// Its headers.
        headers: &'a HeaderMap,
        /// Its body, for error answers (status 400 and above, up to 64 KiB); `None` for
        /// successes, whose bodies stream on untouched.
        body: Option<&'a Bytes>,
    },
    /// No answer: the error.
    Error(&'a (dyn std::error::Error + 'static)),
}

/// Why an attempt is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RetryReason {
    /// 429: over the provider's rate limit.
    RateLimited,
    /// A Tollgate limiter inside refused (it says when it will pass).
    Refused,
    /// 500, 502, 503, 504, 529: the provider failed or is overloaded.
    ServerError,
    /// 408: the server timed out waiting for the request.
    RequestTimeout,
    /// 409: a lock timed out on the server.
    Conflict,
    /// The connection failed, or no answer came.
    Transport,
    /// A 2xx JSON answer broke off before its end, or is not JSON.
    BrokenAnswer,
    /// The server said `x-should-retry: true`.
    ServerSaid,
    /// gRPC `RESOURCE_EXHAUSTED` or `UNAVAILABLE`.
    Grpc,
}

impl RetryReason {
    /// A short label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            RetryReason::RateLimited => "rate_limited",
            RetryReason::Refused => "refused",
            RetryReason::ServerError => "server_error",
            RetryReason::RequestTimeout => "request_timeout",
            RetryReason::Conflict => "conflict",
            RetryReason::Transport => "transport",
            RetryReason::BrokenAnswer => "broken_answer",
            RetryReason::ServerSaid => "server_said",
            RetryReason::Grpc => "grpc",
        }
    }
}

impl fmt::Display for RetryReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the classifier makes of one attempt's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Return it as it is: success, or a failure no wait fixes.
    Return,
    /// Worth another attempt, for this reason, not before `hint` when the server gave one.
    Retry {
        /// Why.
        reason: RetryReason,
        /// The server's (or the refusing limiter's) word on how long to wait.
        hint: Option<Duration>,
    },
}

/// Decides, for each attempt, whether to retry. Replace it to change what is retried.
pub trait Classifier: Send + Sync + 'static {
    /// The verdict on one attempt. `now` turns HTTP dates into waits.
    fn classify(&self, outcome: Outcome<'_>, now: SystemTime) -> Verdict;
}

/// The classifier for HTTP LLM APIs (the default). See [`HttpClassifier::verdict`].
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpClassifier;

/// Body codes that mean a quota is gone until someone pays or the month turns: waiting
/// never fixes them.
const QUOTA_GONE: &[&str] = &[
    "insufficient_quota",
    "billing_hard_limit_reached",
    "quota_exceeded",
];

impl HttpClassifier {
    /// The verdict on a response:
    ///
    /// - `x-should-retry: true|false` wins over everything else;
    /// - 429 is retried, unless its body's error code says the quota is gone
    ///   (`insufficient_quota` and the like);
    /// - 408, 409, 500, 502, 503, 504 and 529 (Anthropic's "overloaded") are retried;
    /// - everything else is returned.
    pub fn verdict(
        status: StatusCode,
        h: &HeaderMap,
        body: Option<&Bytes>,
        now: SystemTime,
    ) -> Verdict {
        let retry = |reason| Verdict::Retry {
            reason,
            hint: server_hint(h, status, now),
        };
        match headers::should_retry(h) {
            Some(true) => return retry(RetryReason::ServerSaid),
            Some(false) => return Verdict::Return,
            None => {}
        }
        match status.as_u16() {
            429 => {
                let gone = body
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
                    .is_some_and(|v| {
                        let e = &v["error"];
                        [&e["code"], &e["type"]]
                            .iter()
                            .any(|c| c.as_str().is_some_and(|c| QUOTA_GONE.contains(&c)))
                    });
                if gone {
                    Verdict::Return
                } else {
                    retry(RetryReason::RateLimited)
                }
            }
            408 => retry(RetryReason::RequestTimeout),
            409 => retry(RetryReason::Conflict),
            500 | 502 | 503 | 504 | 529 => retry(RetryReason::ServerError),
            _ => Verdict::Return,
        }
    }
}

/// The verdict on an error (no answer): a Tollgate refusal is retried after the time it
/// names (never, when it names none, or when it says the wait is longer than the
/// limiter's `max_wait` allows); a request Tollgate could not read is returned; any
/// other error is a transport failure and is retried.
pub fn error_verdict(err: &(dyn std::error::Error + 'static)) -> Verdict {
    for e in tollgate_core::error::chain(err) {
        if let Some(r) = e.downcast_ref::<Refusal>() {
            // A limiter in wait mode refuses only what would wait past its `max_wait`:
            // waiting that long here instead would break the bound the user set, and
            // would keep failover from moving on to a backend that can answer now.
            if r.reason() == RefusalReason::WaitTooLong {
                return Verdict::Return;
            }
            return match r.retry_after() {
                Some(wait) => Verdict::Retry {
                    reason: RetryReason::Refused,
                    hint: Some(wait),
                },
                None => Verdict::Return,
            };
        }
        if e.is::<tollgate_core::facts::FactsError>() || e.is::<crate::DeadlineExceeded>() {
            return Verdict::Return;
        }
        if e.is::<tollgate_core::unavailable::BrokenAnswer>() {
            return Verdict::Retry {
                reason: RetryReason::BrokenAnswer,
                hint: None,
            };
        }
    }
    Verdict::Retry {
        reason: RetryReason::Transport,
        hint: None,
    }
}

impl Classifier for HttpClassifier {
    fn classify(&self, outcome: Outcome<'_>, now: SystemTime) -> Verdict {
        match outcome {
            Outcome::Response {
                status,
                headers,
                body,
            } => Self::verdict(status, headers, body, now),
            Outcome::Error(e) => error_verdict(e),
        }
    }
}

/// The server's word on when to come back: `retry-after-ms`, then `Retry-After` (seconds
/// or HTTP date), then — for a 429 — the reset of whichever `x-ratelimit-*` limit is
/// exhausted (the later one when both are, or when neither says which).
pub fn server_hint(h: &HeaderMap, status: StatusCode, now: SystemTime) -> Option<Duration> {
    if let Some(d) = headers::server_hint(h, now) {
        return Some(d);
    }
    if status != StatusCode::TOO_MANY_REQUESTS {
        return None;
    }
    let info = RateLimitInfo::from_headers(h, now);
    let exhausted: Vec<Duration> = [
        info.requests,
        info.tokens,
        info.input_tokens,
        info.output_tokens,
    ]
    .iter()
    .filter(|l| l.remaining == Some(0))
    .filter_map(|l| l.reset)
    .collect();
    if let Some(d) = exhausted.into_iter().max() {
        return Some(d);
    }
    [info.requests.reset, info.tokens.reset]
        .into_iter()
        .flatten()
        .max()
}

/// The classifier for gRPC over HTTP/2 (tonic): `grpc-status` 8 (`RESOURCE_EXHAUSTED`) and
/// 14 (`UNAVAILABLE`) are retried, after `grpc-retry-pushback-ms` when given; a negative
/// pushback means "do not retry". Transport errors are retried as for HTTP.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcClassifier;

impl Classifier for GrpcClassifier {
    fn classify(&self, outcome: Outcome<'_>, _now: SystemTime) -> Verdict {
        let h = match outcome {
            Outcome::Response { headers, .. } => headers,
            Outcome::Error(e) => return error_verdict(e),
        };
        // A failure before any message is "trailers-only": grpc-status in the headers.
        let code = h
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok());
        match (code, headers::grpc_retry_pushback(h)) {
            (_, Some(Pushback::DoNotRetry)) => Verdict::Return,
            (Some(8 | 14), Some(Pushback::After(d))) => Verdict::Retry {
                reason: RetryReason::Grpc,
                hint: Some(d),
            },
            (Some(8 | 14), None) => Verdict::Retry {
                reason: RetryReason::Grpc,
                hint: None,
            },
            _ => Verdict::Return,
        }
    }
}
