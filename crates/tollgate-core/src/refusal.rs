//! The refusal: a Tollgate limit said no.
//!
//! A [`Refusal`] says which limit refused (requests or tokens, and its name), for which
//! key, why, and how long until the request would pass. Client stacks act on it (the retry
//! policy waits, failover moves on); servers turn it into a 429 with
//! [`Refusal::to_response`] or [`ErrorResponseLayer`](crate::response::ErrorResponseLayer).
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http::Response;
//! use tollgate_core::key::Key;
//! use tollgate_core::refusal::{LimitKind, QuotaState, Refusal};
//!
//! let refusal = Refusal::new(LimitKind::Requests, "rpm", Some(Duration::from_millis(2500)))
//!     .with_key(Key::new("tenant:acme"))
//!     .with_quota(QuotaState { limit: 600, window: Duration::from_secs(60), remaining: 0 });
//!
//! let res: Response<Bytes> = refusal.to_response();
//! assert_eq!(res.status(), 429);
//! assert_eq!(res.headers()["retry-after"], "3");
//! assert_eq!(res.headers()["ratelimit-policy"], "\"rpm\";q=600;w=60");
//! assert_eq!(res.headers()["ratelimit"], "\"rpm\";r=0;t=3");
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use crate::headers::{self, RateLimitField, X_SHOULD_RETRY};
use crate::key::Key;
use crate::response::openai_error;

/// What a limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LimitKind {
    /// Requests per interval.
    Requests,
    /// Tokens per interval.
    Tokens,
    /// Money per window (a cost budget, in US dollars).
    Budget,
    /// Requests in flight at once.
    Concurrency,
}

impl LimitKind {
    /// `"requests"` or `"tokens"`, as OpenAI names them in error bodies and headers
    /// (`"budget"` for a cost budget).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
            Self::Budget => "budget",
            Self::Concurrency => "concurrency",
        }
    }
}

/// Why a limit refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// Over the limit now, and the layer refuses rather than waits.
    OverLimit,
    /// Waiting would take longer than the layer's `max_wait`.
    WaitTooLong,
    /// The queue of waiting requests is full.
    QueueFull,
    /// The request alone costs more than the whole quota; it can never pass.
    TooLarge,
}

/// A limit's quota, as the `RateLimit-Policy` header describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaState {
    /// How much the window allows.
    pub limit: u64,
    /// The window.
    pub window: Duration,
    /// How much is left now.
    pub remaining: u64,
}

/// A limit refused a request. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Refusal {
    kind: LimitKind,
    limit: Arc<str>,
    key: Option<Key>,
    retry_after: Option<Duration>,
    reason: Reason,
    quota: Option<QuotaState>,
}

impl Refusal {
    /// A refusal by the limit named `limit`, passing again after `retry_after` (`None`:
    /// never, see [`Reason::TooLarge`]). The reason defaults to [`Reason::OverLimit`], or
    /// [`Reason::TooLarge`] when `retry_after` is `None`.
    pub fn new(kind: LimitKind, limit: impl Into<Arc<str>>, retry_after: Option<Duration>) -> Self {
        Self {
            kind,
            limit: limit.into(),
            key: None,
            reason: if retry_after.is_some() {
                Reason::OverLimit
            } else {
                Reason::TooLarge
            },
            retry_after,
            quota: None,
        }
    }

    /// Names the key that was refused.
    pub fn with_key(mut self, key: Key) -> Self {
        self.key = Some(key);
        self
    }

    /// Says why.
    pub fn with_reason(mut self, reason: Reason) -> Self {
        self.reason = reason;
        self
    }

    /// Describes the quota, for the `RateLimit` headers.
    pub fn with_quota(mut self, quota: QuotaState) -> Self {
        self.quota = Some(quota);
        self
    }

    /// Requests or tokens.
    pub fn kind(&self) -> LimitKind {
        self.kind
    }
    /// The name of the limit that refused.
    pub fn limit(&self) -> &str {
        &self.limit
    }
    /// The key that was refused, when known.
    pub fn key(&self) -> Option<&Key> {
        self.key.as_ref()
    }
    /// How long until the request would pass; `None` when it never will.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
    /// Why it was refused.
    pub fn reason(&self) -> Reason {
        self.reason
    }
    /// The quota, when the limit described it.
    pub fn quota(&self) -> Option<QuotaState> {
        self.quota
    }

    /// The 429 a server answers with: `Retry-After` (whole seconds, rounded up), the IETF
    /// `RateLimit-Policy` / `RateLimit` fields when the quota is known, `x-should-retry:
    /// false` when the request can never pass, and an OpenAI-style error body.
    pub fn to_response<B: From<Bytes>>(&self) -> Response<B> {
        let mut res = openai_error(
            StatusCode::TOO_MANY_REQUESTS,
            self.kind.as_str(),
            match (self.kind, self.reason) {
                (LimitKind::Budget, _) => "budget_exceeded",
                (_, Reason::TooLarge) => "request_too_large",
                _ => "rate_limit_exceeded",
            },
            &self.to_string(),
        );
        let h = res.headers_mut();
        match self.retry_after {
            Some(wait) => headers::set_retry_after(h, wait),
            None => {
                h.insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
            }
        }
        if let Some(q) = self.quota {
            RateLimitField {
                name: &self.limit,
                quota: q.limit,
                window: q.window,
                unit: match self.kind {
                    LimitKind::Tokens => Some("tokens"),
                    LimitKind::Budget => Some("usd-micros"),
                    _ => None,
                },
                remaining: q.remaining,
                reset: self.retry_after.unwrap_or(q.window),
            }
            .append_to(h);
        }
        res
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} limit \"{}\" ", self.kind.as_str(), self.limit)?;
        match self.reason {
            Reason::OverLimit => f.write_str("reached")?,
            Reason::WaitTooLong => f.write_str("reached, and the wait is longer than allowed")?,
            Reason::QueueFull => f.write_str("reached, and the wait queue is full")?,
            Reason::TooLarge => f.write_str("is smaller than this one request")?,
        }
        if let Some(key) = &self.key {
            write!(f, " for {key}")?;
        }
        if let Some(q) = &self.quota {
            write!(
                f,
                " (limit {} per {}s)",
                q.limit,
                headers::ceil_secs(q.window)
            )?;
        }
        match self.retry_after {
            Some(wait) => write!(f, "; try again in {:.3}s", wait.as_secs_f64()),
            None => f.write_str("; it can never pass"),
        }
    }
}

impl std::error::Error for Refusal {}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(res: Response<Bytes>) -> serde_json::Value {
        serde_json::from_slice(res.body()).unwrap()
    }

    #[test]
    fn a_refusal_that_will_pass_says_when() {
        let r = Refusal::new(LimitKind::Tokens, "tpm", Some(Duration::from_millis(100)))
            .with_key(Key::new("tenant:a"));
        let res: Response<Bytes> = r.to_response();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(res.headers()["retry-after"], "1");
        assert!(
            res.headers().get("ratelimit").is_none(),
            "no quota, no RateLimit fields"
        );
        let v = body(res);
        assert_eq!(v["error"]["type"], "tokens");
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("tenant:a") && msg.contains("0.100s"), "{msg}");
    }

    #[test]
    fn a_refusal_that_never_passes_says_do_not_retry() {
        let r = Refusal::new(LimitKind::Tokens, "tpm", None).with_quota(QuotaState {
            limit: 1000,
            window: Duration::from_secs(60),
            remaining: 1000,
        });
        assert_eq!(r.reason(), Reason::TooLarge);
        let res: Response<Bytes> = r.to_response();
        assert!(res.headers().get("retry-after").is_none());
        assert_eq!(res.headers()["x-should-retry"], "false");
        assert_eq!(
            res.headers()["ratelimit-policy"],
            "\"tpm\";q=1000;w=60;qu=\"tokens\""
        );
        assert_eq!(body(res)["error"]["code"], "request_too_large");
    }

    #[test]
    fn reasons_read_well() {
        let r = Refusal::new(LimitKind::Requests, "rpm", Some(Duration::from_secs(30)))
            .with_reason(Reason::WaitTooLong);
        assert_eq!(
            r.to_string(),
            "requests limit \"rpm\" reached, and the wait is longer than allowed; try again in 30.000s"
        );
    }
}
