//! The upstream is away: every backend failed on its own account and none is back yet.
//!
//! Not a limit — the caller did nothing wrong and has quota left — so not a 429: a **503**
//! with `Retry-After` (the time until the first backend is back) and an OpenAI-style error
//! whose code, `upstream_unavailable`, says so. SDKs then raise their server-error type
//! (and retry it), and alerting on 5xx sees the outage.
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http::Response;
//! use tollgate_core::unavailable::Unavailable;
//!
//! let res: Response<Bytes> = Unavailable::new(Duration::from_millis(1200)).to_response();
//! assert_eq!(res.status(), 503);
//! assert_eq!(res.headers()["retry-after"], "2");
//! ```

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};

use crate::headers;
use crate::response::openai_error;

/// Every backend is away for its own failures (cooling down after errors or an outage);
/// the first is back after [`retry_after`](Self::retry_after).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unavailable {
    retry_after: Duration,
}

impl Unavailable {
    /// The first backend is back after `retry_after`.
    pub fn new(retry_after: Duration) -> Self {
        Self { retry_after }
    }

    /// How long until the first backend is back.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// The 503 a server answers with: `Retry-After` (whole seconds, rounded up) and an
    /// OpenAI-style error with code `upstream_unavailable`.
    pub fn to_response<B: From<Bytes>>(&self) -> Response<B> {
        let mut res = openai_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "upstream_unavailable",
            &self.to_string(),
        );
        headers::set_retry_after(res.headers_mut(), self.retry_after);
        res
    }
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "every upstream backend is unavailable after failing; the first is back in {:.3}s",
            self.retry_after.as_secs_f64()
        )
    }
}

impl std::error::Error for Unavailable {}

/// A backend answered 2xx with a JSON body that broke off before its end, or that is not
/// JSON: an answer the caller could not use. The retry layer reads such answers whole
/// before passing them on, so it can ask again (and failover can move on) instead of
/// handing the caller a broken 200; past every attempt, the caller gets a **502** with
/// code `upstream_answer_broken`.
#[derive(Debug)]
pub struct BrokenAnswer {
    why: BrokenWhy,
}

/// How an answer was broken.
#[derive(Debug)]
#[non_exhaustive]
pub enum BrokenWhy {
    /// Its body ended early: the connection was cut, or it timed out mid-body.
    Cut(crate::BoxError),
    /// Its body came whole but is not JSON.
    Malformed(serde_json::Error),
}

impl BrokenAnswer {
    /// An answer whose body broke off with `error`.
    pub fn cut(error: impl Into<crate::BoxError>) -> Self {
        Self {
            why: BrokenWhy::Cut(error.into()),
        }
    }

    /// An answer whose body is not JSON.
    pub fn malformed(error: serde_json::Error) -> Self {
        Self {
            why: BrokenWhy::Malformed(error),
        }
    }

    /// How it was broken.
    pub fn why(&self) -> &BrokenWhy {
        &self.why
    }

    /// The 502 a server answers with, in OpenAI's error shape.
    pub fn to_response<B: From<Bytes>>(&self) -> Response<B> {
        openai_error(
            StatusCode::BAD_GATEWAY,
            "server_error",
            "upstream_answer_broken",
            &self.to_string(),
        )
    }
}

impl fmt::Display for BrokenAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.why {
            BrokenWhy::Cut(e) => write!(f, "the upstream's answer broke off before its end: {e}"),
            BrokenWhy::Malformed(e) => write!(
                f,
                "the upstream answered 200 with a body that is not JSON: {e}"
            ),
        }
    }
}

impl std::error::Error for BrokenAnswer {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.why {
            BrokenWhy::Cut(e) => Some(e.as_ref()),
            BrokenWhy::Malformed(e) => Some(e),
        }
    }
}
