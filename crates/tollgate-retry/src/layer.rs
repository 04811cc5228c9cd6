//! [`RetryLayer`] and the [`Retry`] service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tollgate_core::clock::later;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use tollgate_core::clock::{Clock, SharedClock};
use tollgate_core::facts::DEFAULT_BODY_LIMIT;
use tollgate_core::BoxError;
use tower::retry::budget::{Budget, TpsBudget};
use tower::{Layer, Service, ServiceExt};

use crate::backoff::Backoff;
use crate::body::{RetryBody, MAX_CHECKED_BODY, MAX_ERROR_BODY};
use crate::classify::{Classifier, HttpClassifier};
use crate::policy::{Attempt, Config, RetryPolicy};
use tollgate_core::body::RequestBody;
use tollgate_core::facts::buffer_for_replay;

/// The whole request, waits included, took longer than the layer's deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadlineExceeded(pub Duration);

impl fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "request deadline of {:.3}s exceeded, retries included",
            self.0.as_secs_f64()
        )
    }
}

impl std::error::Error for DeadlineExceeded {}

/// Retries what the classifier calls worth it; see the [crate docs](crate). Cheap to
/// clone; every service it makes shares its retry budget.
#[derive(Clone)]
pub struct RetryLayer {
    config: Arc<Config>,
    body_limit: usize,
    seed: Arc<AtomicU64>,
}

impl fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("backoff", &self.config.backoff)
            .field("max_retries", &self.config.max_retries)
            .field("max_server_wait", &self.config.max_server_wait)
            .field("deadline", &self.config.deadline)
            .finish_non_exhaustive()
    }
}

impl Default for RetryLayer {
    fn default() -> Self {
        Self::builder().build()
    }
}

impl RetryLayer {
    /// The defaults: up to 3 retries, 500 ms × 2ⁿ backoff capped at 8 s with full jitter,
    /// server hints up to 120 s obeyed, a deadline of 10 minutes per request, and a retry
    /// budget of 20% of traffic (at least 10 retries a second).
    pub fn new() -> Self {
        Self::default()
    }

    /// A builder.
    pub fn builder() -> RetryBuilder {
        RetryBuilder {
            classifier: Arc::new(HttpClassifier),
            backoff: Backoff::default(),
            max_retries: 3,
            max_server_wait: Duration::from_secs(120),
            hint_spread: 0.0,
            deadline: Some(Duration::from_secs(600)),
            budget: Some(Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2))),
            clock: SharedClock::default(),
            body_limit: DEFAULT_BODY_LIMIT,
            seed: None,
        }
    }
}

/// Builds a [`RetryLayer`].
pub struct RetryBuilder {
    classifier: Arc<dyn Classifier>,
    backoff: Backoff,
    max_retries: u32,
    max_server_wait: Duration,
    hint_spread: f64,
    deadline: Option<Duration>,
    budget: Option<Arc<TpsBudget>>,
    clock: SharedClock,
    body_limit: usize,
    seed: Option<u64>,
}

impl fmt::Debug for RetryBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBuilder")
            .field("max_retries", &self.max_retries)
            .finish_non_exhaustive()
    }
}

impl RetryBuilder {
    /// What is retried ([`HttpClassifier`] by default; [`GrpcClassifier`](crate::GrpcClassifier) for tonic).
    pub fn classifier(mut self, c: impl Classifier) -> Self {
        self.classifier = Arc::new(c);
        self
    }

    /// The backoff used when the server gives no hint.
    pub fn backoff(mut self, b: Backoff) -> Self {
        self.backoff = b;
        self
    }

    /// At most this many retries (attempts = retries + 1).
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// A server hint longer than this is not waited out: the answer is returned, so a
    /// failover layer above can act (120 s by default, as openai-python).
    pub fn max_server_wait(mut self, d: Duration) -> Self {
        self.max_server_wait = d;
        self
    }

    /// Waits up to `fraction` longer than a server's hint, at random (0 by default: the
    /// hint exactly, as openai-python does). A spread keeps many clients told the same
    /// time from coming back in the same instant. Clamped to 0–10.
    pub fn hint_spread(mut self, fraction: f64) -> Self {
        self.hint_spread = if fraction.is_finite() {
            fraction.clamp(0.0, 10.0)
        } else {
            0.0
        };
        self
    }

    /// The most a whole request may take, attempts and waits included (`None`: no limit).
    pub fn deadline(mut self, d: Option<Duration>) -> Self {
        self.deadline = d;
        self
    }

    /// The retry budget: tower's `TpsBudget` (`None`: unlimited). Keeps retries a bounded
    /// share of traffic when a provider is down, so retries cannot become a storm.
    pub fn budget(mut self, budget: Option<TpsBudget>) -> Self {
        self.budget = budget.map(Arc::new);
        self
    }

    /// The clock waits are timed by.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = SharedClock::new(clock);
        self
    }

    /// Request bodies up to this size are buffered to be replayed (10 MiB by default); a
    /// larger one is sent once and never retried.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// Seeds the jitter, for runs that repeat exactly.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The layer.
    pub fn build(self) -> RetryLayer {
        RetryLayer {
            config: Arc::new(Config {
                classifier: self.classifier,
                backoff: self.backoff,
                max_retries: self.max_retries,
                max_server_wait: self.max_server_wait,
                hint_spread: self.hint_spread,
                deadline: self.deadline,
                budget: self.budget,
                clock: self.clock,
            }),
            body_limit: self.body_limit,
            seed: Arc::new(AtomicU64::new(
                self.seed.unwrap_or_else(|| fastrand::u64(..)),
            )),
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner: ReadErrors { inner },
            layer: self.clone(),
        }
    }
}

/// The retrying service. See the [crate docs](crate).
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: ReadErrors<S>,
    layer: RetryLayer,
}

impl<S> Retry<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner.inner
    }
}

/// Reads error answers whole (up to 64 KiB, when their length is known), so the classifier
/// can see their error code; and marks each attempt with a `tracing` span.
#[derive(Clone, Debug)]
pub struct ReadErrors<S> {
    inner: S,
}

impl<S> ReadErrors<S> {
    tollgate_core::inner_service_accessors!();
}

impl<S, B, ResB> Service<Request<RequestBody<B>>> for ReadErrors<S>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<RetryBody<ResB>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RetryBody<ResB>>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<RequestBody<B>>) -> Self::Future {
        let attempt = req.extensions().get::<Attempt>().map_or(1, |a| a.0);
        let fut = self.inner.call(req);
        let span = tracing::debug_span!("tollgate.retry.attempt", attempt);
        use tracing::Instrument;
        Box::pin(
            async move {
                metrics::counter!("tollgate_retry_attempts_total").increment(1);
                let res = fut.await.map_err(Into::into);
                match res {
                    Err(e) => {
                        tracing::debug!(error = %e, "attempt failed");
                        Err(e)
                    }
                    Ok(res) => {
                        tracing::debug!(status = res.status().as_u16(), "attempt answered");
                        let small = res
                            .body()
                            .size_hint()
                            .upper()
                            .is_some_and(|n| n <= MAX_ERROR_BODY as u64);
                        let (parts, body) = res.into_parts();
                        let body = if parts.status.as_u16() >= 400 && small {
                            RetryBody::read(body.collect().await.map_err(Into::into)?.to_bytes())
                        } else if parts.status.is_success()
                            && tollgate_core::headers::is_json(&parts.headers)
                            && body.size_hint().lower() <= MAX_CHECKED_BODY as u64
                        {
                            // A whole JSON document: read it before passing it on, so an
                            // answer that broke off or is not JSON is asked again.
                            crate::body::checked(body).await?
                        } else {
                            RetryBody::streaming(body)
                        };
                        Ok(Response::from_parts(parts, body))
                    }
                }
            }
            .instrument(span),
        )
    }
}

/// The future of [`Retry`]: boxed, since it buffers the body, runs tower's `Retry`, and
/// races the deadline.
pub type ResponseFuture<ResB> =
    Pin<Box<dyn Future<Output = Result<Response<RetryBody<ResB>>, BoxError>> + Send>>;

impl<S, B, ResB> Service<Request<B>> for Retry<S>
where
    S: Service<Request<RequestBody<B>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<RetryBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness is taken per attempt, inside tower's Retry.
        let _ = cx;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        let layer = self.layer.clone();
        Box::pin(async move {
            let c = &layer.config;
            let start = c.clock.now();
            if let Some(budget) = &c.budget {
                budget.deposit();
            }
            let req = buffer_for_replay(req, layer.body_limit).await?;
            let seed = layer
                .seed
                .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
            let policy = RetryPolicy::new(Arc::clone(c), start, seed);
            let attempts = tower::retry::Retry::new(policy, inner).oneshot(req);
            match c.deadline {
                None => attempts.await,
                Some(d) => {
                    let mut attempts = std::pin::pin!(attempts);
                    let mut timer = c.clock.sleep_until(later(start, d));
                    std::future::poll_fn(|cx| {
                        if let Poll::Ready(r) = attempts.as_mut().poll(cx) {
                            return Poll::Ready(r);
                        }
                        match timer.as_mut().poll(cx) {
                            Poll::Ready(()) => Poll::Ready(Err(DeadlineExceeded(d).into())),
                            Poll::Pending => Poll::Pending,
                        }
                    })
                    .await
                }
            }
        })
    }
}
