//! The `tower::retry::Policy`.

use std::sync::Arc;
use std::time::Duration;
use tollgate_core::clock::later;

use http::{Request, Response};
use tokio::time::Instant;
use tollgate_core::clock::{Clock, SharedClock, Sleep};
use tollgate_core::BoxError;
use tower::retry::budget::{Budget, TpsBudget};

use crate::backoff::Backoff;
use crate::body::RetryBody;
use crate::classify::{Classifier, Outcome, Verdict};
use tollgate_core::body::RequestBody;

/// Settings every request's policy shares.
pub(crate) struct Config {
    pub(crate) classifier: Arc<dyn Classifier>,
    pub(crate) backoff: Backoff,
    pub(crate) max_retries: u32,
    pub(crate) max_server_wait: Duration,
    pub(crate) hint_spread: f64,
    pub(crate) deadline: Option<Duration>,
    pub(crate) budget: Option<Arc<TpsBudget>>,
    pub(crate) clock: SharedClock,
}

/// Which attempt a request is on (1 for the first); in the request's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt(pub u32);

/// The retry policy: a `tower::retry::Policy` for HTTP requests whose bodies are
/// replayable. Built by [`RetryLayer`](crate::RetryLayer), one per request.
#[derive(Clone)]
pub struct RetryPolicy {
    config: Arc<Config>,
    start: Instant,
    retries: u32,
    previous_wait: Duration,
    rng: fastrand::Rng,
}

impl std::fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

impl RetryPolicy {
    pub(crate) fn new(config: Arc<Config>, start: Instant, seed: u64) -> Self {
        Self {
            config,
            start,
            retries: 0,
            previous_wait: Duration::ZERO,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    fn give_up(why: &'static str, reason: crate::RetryReason) {
        metrics::counter!("tollgate_retry_giveups_total", "why" => why, "reason" => reason.as_str()).increment(1);
        tracing::debug!(why, %reason, "not retrying");
    }
}

impl<B, ResB> tower::retry::Policy<Request<RequestBody<B>>, Response<RetryBody<ResB>>, BoxError>
    for RetryPolicy
{
    type Future = Sleep;

    fn retry(
        &mut self,
        req: &mut Request<RequestBody<B>>,
        result: &mut Result<Response<RetryBody<ResB>>, BoxError>,
    ) -> Option<Sleep> {
        let c = Arc::clone(&self.config);
        let now_sys = c.clock.system_now();
        let outcome = match result {
            Ok(res) => Outcome::Response {
                status: res.status(),
                headers: res.headers(),
                body: res.body().buffered(),
            },
            Err(e) => Outcome::Error(&**e),
        };
        let (reason, hint) = match c.classifier.classify(outcome, now_sys) {
            Verdict::Return => return None,
            Verdict::Retry { reason, hint } => (reason, hint),
        };
        if !req.body().is_replayable() {
            Self::give_up("body_not_replayable", reason);
            return None;
        }
        if self.retries >= c.max_retries {
            Self::give_up("max_retries", reason);
            return None;
        }
        let backoff = c
            .backoff
            .wait(self.retries, self.previous_wait, &mut self.rng);
        let (wait, why) = match hint {
            Some(h) if h > c.max_server_wait => {
                Self::give_up("hint_too_long", reason);
                return None;
            }
            // max(hint, backoff): never less than the server asked, and — when it keeps
            // asking many colliding clients for the same short wait — growing, with
            // jitter, like any backoff. A spread adds a little on top of the hint.
            Some(h) => {
                let h = h + h.mul_f64(c.hint_spread * self.rng.f64());
                if h >= backoff {
                    (h, "hint")
                } else {
                    (backoff, "backoff")
                }
            }
            None => (backoff, "backoff"),
        };
        let now = c.clock.now();
        if let Some(deadline) = c.deadline {
            if later(now, wait) >= later(self.start, deadline) {
                Self::give_up("deadline", reason);
                return None;
            }
        }
        // A 429 or a refusal that says when to come back is a pacing signal from a working
        // service, not a failure: it is waited out, bounded by `max_retries`, the deadline
        // and `max_server_wait`, and draws nothing from the budget, which is there to stop
        // retry storms against a failing one (5xx, transport errors, hintless 429s).
        let paced = hint.is_some()
            && matches!(
                reason,
                crate::RetryReason::RateLimited | crate::RetryReason::Refused
            );
        if let (Some(budget), false) = (&c.budget, paced) {
            if !budget.withdraw() {
                Self::give_up("budget", reason);
                return None;
            }
        }
        self.retries += 1;
        self.previous_wait = wait;
        req.extensions_mut().insert(Attempt(self.retries + 1));
        metrics::counter!("tollgate_retry_retries_total", "reason" => reason.as_str()).increment(1);
        metrics::histogram!("tollgate_retry_wait_seconds").record(wait.as_secs_f64());
        tracing::debug!(attempt = self.retries + 1, %reason, wait_ms = wait.as_millis() as u64, why, "retrying");
        Some(c.clock.sleep(wait))
    }

    fn clone_request(&mut self, req: &Request<RequestBody<B>>) -> Option<Request<RequestBody<B>>> {
        let mut copy = Request::new(req.body().try_clone()?);
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.version_mut() = req.version();
        *copy.headers_mut() = req.headers().clone();
        *copy.extensions_mut() = req.extensions().clone();
        Some(copy)
    }
}
