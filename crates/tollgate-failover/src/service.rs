//! [`Failover`], its backends and its builder.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tollgate_core::clock::later;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::time::Instant;
use tollgate_core::body::{AnswerBody, CallerBody};
use tollgate_core::clock::{Clock, SharedClock};
use tollgate_core::facts::{buffer_with_facts, ReplayBody, DEFAULT_BODY_LIMIT};
use tollgate_core::headers;
use tollgate_core::refusal::{LimitKind, Refusal};
use tollgate_core::unavailable::Unavailable;
use tollgate_core::BoxError;
use tower::Service;

use crate::body::FailoverBody;
use crate::health::{Cooldown, Gate, Health};

/// `x-tollgate-backend`: which backend served the answer.
pub const X_TOLLGATE_BACKEND: HeaderName = HeaderName::from_static("x-tollgate-backend");

/// The backend that served an answer, in the response's extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedBy(pub Arc<str>);

/// One backend: a service with its own stack (retry, limits, credentials, base URL), the
/// model to ask it for, headers only it receives, and its priority.
#[derive(Clone)]
pub struct Backend<S> {
    name: Arc<str>,
    service: S,
    model: Option<String>,
    headers: HeaderMap,
    priority: u32,
}

impl<S> fmt::Debug for Backend<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .field("model", &self.model)
            .field("priority", &self.priority)
            .finish_non_exhaustive()
    }
}

impl<S> Backend<S> {
    /// A backend named `name` (for the `x-tollgate-backend` header, logs and metrics).
    pub fn new(name: impl Into<Arc<str>>, service: S) -> Self {
        Self {
            name: name.into(),
            service,
            model: None,
            headers: HeaderMap::new(),
            priority: 0,
        }
    }

    /// Asks this backend for `model` (the request body's `model` is rewritten for it; the
    /// caller's copy is untouched).
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Sends `name: value` to this backend only (its credentials, say), replacing the
    /// caller's header of that name.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Lower goes first (0 by default; equal priorities keep the order given).
    pub fn priority(mut self, p: u32) -> Self {
        self.priority = p;
        self
    }
}

/// Why a request moved on from a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Why {
    /// 429.
    RateLimited,
    /// A Tollgate limit in the backend's stack refused this request's key: it moves on,
    /// and the backend's health is untouched.
    Refused,
    /// 5xx or 529.
    ServerError,
    /// 408.
    Timeout,
    /// No answer: connection or timeout error.
    Transport,
    /// The prompt is too long for this backend's model.
    ContextLength,
    /// This backend's content policy refused it.
    ContentPolicy,
    /// Not ready to take a request.
    NotReady,
}

impl Why {
    fn as_str(self) -> &'static str {
        match self {
            Why::RateLimited => "rate_limited",
            Why::Refused => "refused",
            Why::ServerError => "server_error",
            Why::Timeout => "timeout",
            Why::Transport => "transport",
            Why::ContextLength => "context_length",
            Why::ContentPolicy => "content_policy",
            Why::NotReady => "not_ready",
        }
    }
}

/// How long a request waits, by default, for a backend whose provider said "later".
const DEFAULT_QUOTA_WAIT: Duration = Duration::from_secs(30);

/// When no backend can take a request now: every one cooling, or saying when it can.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllCooling {
    /// Answer at once with the time until the first backend is back (the default): an
    /// [`Unavailable`] (503) when it is away for errors, a [`Refusal`] (429) when for its
    /// provider's 429s.
    Refuse,
    /// Wait for the first backend back, up to this long; refuse beyond it.
    Wait(Duration),
}

struct Shared<S> {
    backends: Vec<(Backend<S>, Health)>,
    cooldown: Cooldown,
    all_cooling: AllCooling,
    quota_wait: Duration,
    on_context_length: bool,
    on_content_policy: bool,
    body_limit: usize,
    clock: SharedClock,
}

/// Tries backends in order; see the [crate docs](crate).
pub struct Failover<S> {
    shared: Arc<Shared<S>>,
    services: Vec<S>,
}

impl<S: Clone> Clone for Failover<S> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            services: self.services.clone(),
        }
    }
}

impl<S> fmt::Debug for Failover<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.shared.backends.iter().map(|(b, _)| &*b.name).collect();
        f.debug_struct("Failover")
            .field("backends", &names)
            .finish()
    }
}

/// Builds a [`Failover`].
#[derive(Clone)]
pub struct FailoverBuilder<S> {
    backends: Vec<Backend<S>>,
    cooldown: Cooldown,
    all_cooling: AllCooling,
    quota_wait: Duration,
    on_context_length: bool,
    on_content_policy: bool,
    body_limit: usize,
    clock: SharedClock,
}

impl<S> fmt::Debug for FailoverBuilder<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailoverBuilder")
            .field("backends", &self.backends)
            .finish_non_exhaustive()
    }
}

impl<S: Clone> Failover<S> {
    /// A builder.
    pub fn builder() -> FailoverBuilder<S> {
        FailoverBuilder {
            backends: Vec::new(),
            cooldown: Cooldown::default(),
            all_cooling: AllCooling::Refuse,
            quota_wait: DEFAULT_QUOTA_WAIT,
            on_context_length: false,
            on_content_policy: false,
            body_limit: DEFAULT_BODY_LIMIT,
            clock: SharedClock::default(),
        }
    }
}

impl<S: Clone> FailoverBuilder<S> {
    /// Adds a backend.
    pub fn backend(mut self, b: Backend<S>) -> Self {
        self.backends.push(b);
        self
    }

    /// When a backend is set aside, and for how long.
    pub fn cooldown(mut self, c: Cooldown) -> Self {
        self.cooldown = c;
        self
    }

    /// What to do when every backend is cooling.
    pub fn all_cooling(mut self, a: AllCooling) -> Self {
        self.all_cooling = a;
        self
    }

    /// With nowhere else to go, how long a request may wait for a backend away because
    /// its provider said "later" (a 429 with a hint, or the cooldown one put it in): that
    /// is a time to wait for, not a failure to report (30 s by default; zero: answer at
    /// once). Refusals by a backend's own limits are never waited for here: their own
    /// `max_wait` already decided.
    pub fn wait_for_quota(mut self, max: Duration) -> Self {
        self.quota_wait = max;
        self
    }

    /// Also move on when a backend says the prompt is too long for its model
    /// (`context_length_exceeded`), hoping a later backend's model takes more.
    pub fn on_context_length(mut self, yes: bool) -> Self {
        self.on_context_length = yes;
        self
    }

    /// Also move on when a backend's content policy refuses the request.
    pub fn on_content_policy(mut self, yes: bool) -> Self {
        self.on_content_policy = yes;
        self
    }

    /// The clock cooldowns are kept by.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = SharedClock::new(clock);
        self
    }

    /// The largest request body buffered for replay to several backends (10 MiB).
    pub fn body_limit(mut self, n: usize) -> Self {
        self.body_limit = n;
        self
    }

    /// The service.
    pub fn build(mut self) -> Failover<S> {
        self.backends.sort_by_key(|b| b.priority);
        let services = self.backends.iter().map(|b| b.service.clone()).collect();
        Failover {
            shared: Arc::new(Shared {
                backends: self
                    .backends
                    .into_iter()
                    .map(|b| (b, Health::new()))
                    .collect(),
                cooldown: self.cooldown,
                all_cooling: self.all_cooling,
                quota_wait: self.quota_wait,
                on_context_length: self.on_context_length,
                on_content_policy: self.on_content_policy,
                body_limit: self.body_limit,
                clock: self.clock,
            }),
            services,
        }
    }
}

/// The verdict on one backend's answer: move on (why, and the server's hint), or keep it.
fn judge<B>(
    res: &Result<Response<B>, BoxError>,
    now: std::time::SystemTime,
) -> Option<(Why, Option<Duration>)> {
    match res {
        Err(e) => {
            for err in tollgate_core::error::chain(&**e) {
                if let Some(r) = err.downcast_ref::<Refusal>() {
                    return Some((Why::Refused, r.retry_after()));
                }
                if err.is::<tollgate_core::facts::FactsError>() {
                    return None;
                }
            }
            Some((Why::Transport, None))
        }
        Ok(res) => {
            let h = res.headers();
            let hint = headers::server_hint(h, now);
            match res.status().as_u16() {
                429 => Some((Why::RateLimited, hint)),
                408 => Some((Why::Timeout, hint)),
                500..=599 => Some((Why::ServerError, hint)),
                _ => None,
            }
        }
    }
}

/// Reads an error answer's code, for the context-length and content-policy switches.
fn body_code(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v["error"]["code"].as_str().map(str::to_owned)
}

/// A failed backend's outcome, kept to hand back if every backend fails: an answer
/// (streamed, or read for its error code), or an error.
type Outcome<B> = Result<Result<Response<B>, (http::response::Parts, bytes::Bytes)>, BoxError>;

/// Makes a [`Failover`] with the wrapped service as its primary (named `primary`, tried
/// first) and the given fallbacks after it; every other setting as a [`FailoverBuilder`]
/// says (see [`from_builder`](Self::from_builder)).
#[derive(Clone)]
pub struct FailoverLayer<S> {
    fallbacks: FailoverBuilder<S>,
}

impl<S> fmt::Debug for FailoverLayer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailoverLayer")
            .field("fallbacks", &self.fallbacks.backends)
            .finish_non_exhaustive()
    }
}

impl<S: Clone> FailoverLayer<S> {
    /// Fallbacks for whatever service this layer wraps; give them priorities of 1 and up.
    pub fn new(fallbacks: Vec<Backend<S>>) -> Self {
        Self::from_builder(
            fallbacks
                .into_iter()
                .fold(Failover::builder(), FailoverBuilder::backend),
        )
    }

    /// The backends of `builder` as the fallbacks, and all its settings (cooldown, what
    /// to do when all are cooling, the wait for quota, the 400 switches, the body limit,
    /// the clock) for the failover this layer makes.
    pub fn from_builder(builder: FailoverBuilder<S>) -> Self {
        Self { fallbacks: builder }
    }
}

impl<S: Clone> tower::Layer<S> for FailoverLayer<S> {
    type Service = Failover<S>;
    fn layer(&self, primary: S) -> Failover<S> {
        let mut b = self.fallbacks.clone();
        // First among equals: the sort by priority keeps this order.
        b.backends.insert(0, Backend::new("primary", primary));
        b.build()
    }
}

/// The future of [`Failover`]: boxed, since it buffers and tries backends in turn.
pub type ResponseFuture<B> =
    Pin<Box<dyn Future<Output = Result<Response<FailoverBody<B>>, BoxError>> + Send>>;

impl<S, B, ResB> Service<Request<B>> for Failover<S>
where
    S: Service<Request<ReplayBody>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: CallerBody,
    ResB: AnswerBody,
{
    type Response = Response<FailoverBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<ResB>;

    /// Always ready: a backend that is not ready is passed over per request, so one slow
    /// backend never holds up the others (tower's `Steer` waits for all of them).
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let shared = Arc::clone(&self.shared);
        let mut services = self.services.clone();
        Box::pin(async move {
            let (req, facts) = buffer_with_facts(req, shared.body_limit).await?;
            let (parts, _) = req.into_parts();
            // The last failure, to hand back when every backend failed: an answer (streamed,
            // or read) or an error.
            let mut last: Option<Outcome<ResB>> = None;
            // The refusal that would pass soonest, when a backend's own limit refused.
            let mut refused: Option<Refusal> = None;
            let start = shared.clock.now();
            loop {
                let now = shared.clock.now();
                let mut earliest: Option<Instant> = None;
                // The backend cooling that is back first, and whether its provider's
                // quota (429s) is why it is away.
                let mut first_back: Option<(Instant, bool, &str)> = None;
                // When the first backend away for its provider's quota (cooling after 429s,
                // or a 429 that said when) can take requests again.
                let mut quota_back: Option<Instant> = None;
                let mut tried = false;
                for (i, (backend, health)) in shared.backends.iter().enumerate() {
                    let trial = match health.gate(now) {
                        Gate::Open => false,
                        Gate::Trial => true,
                        Gate::Cooling(until, limited) => {
                            earliest = Some(earliest.map_or(until, |e| e.min(until)));
                            if first_back.is_none_or(|(t, ..)| until < t) {
                                first_back = Some((until, limited, &backend.name));
                            }
                            if limited {
                                quota_back = Some(quota_back.map_or(until, |q| q.min(until)));
                            }
                            continue;
                        }
                        Gate::Busy => continue,
                    };
                    let svc = &mut services[i];
                    // Not ready now: pass it over rather than wait for it.
                    let ready: Poll<Result<(), BoxError>> = std::future::poll_fn(|cx| {
                        Poll::Ready(svc.poll_ready(cx).map_err(Into::into))
                    })
                    .await;
                    match ready {
                        Poll::Ready(Ok(())) => {}
                        other => {
                            if trial {
                                health.trial_abandoned();
                            }
                            if let Poll::Ready(Err(e)) = other {
                                last = Some(Err(e));
                            }
                            metrics::counter!("tollgate_failover_skipped_total", "backend" => metrics::SharedString::from_shared(Arc::clone(&backend.name)), "why" => Why::NotReady.as_str()).increment(1);
                            continue;
                        }
                    }
                    tried = true;
                    // This backend's request: its model, its headers, from the caller's copy.
                    let mut p = parts.clone();
                    for (name, value) in &backend.headers {
                        p.headers.insert(name.clone(), value.clone());
                    }
                    let f = match &backend.model {
                        // The caller's own model needs no rewrite (and no copy of the JSON).
                        Some(m) if facts.model() != Some(m.as_str()) => facts
                            .rewrite(|v| {
                                if let Some(o) = v.as_object_mut() {
                                    o.insert("model".to_owned(), Value::String(m.clone()));
                                }
                            })
                            .unwrap_or_else(|| facts.clone()),
                        _ => facts.clone(),
                    };
                    metrics::counter!("tollgate_failover_attempts_total", "backend" => metrics::SharedString::from_shared(Arc::clone(&backend.name))).increment(1);
                    let res: Result<Response<ResB>, BoxError> =
                        svc.call(f.into_request(p)).await.map_err(Into::into);
                    let mut verdict = judge(&res, shared.clock.system_now());
                    // A 400's error code is read only when a switch asks to move on for it;
                    // then the answer is kept read (`Ok(Err(..))`).
                    let res: Outcome<ResB> = match res {
                        Ok(r)
                            if verdict.is_none()
                                && r.status() == StatusCode::BAD_REQUEST
                                && (shared.on_context_length || shared.on_content_policy)
                                && r.body().size_hint().upper().is_some_and(|n| n <= 64 * 1024) =>
                        {
                            let (rp, rb) = r.into_parts();
                            let bytes = rb.collect().await.map_err(Into::into)?.to_bytes();
                            let code = body_code(&bytes);
                            if shared.on_context_length
                                && code.as_deref() == Some("context_length_exceeded")
                            {
                                verdict = Some((Why::ContextLength, None));
                            } else if shared.on_content_policy
                                && code.as_deref() == Some("content_filter")
                            {
                                verdict = Some((Why::ContentPolicy, None));
                            }
                            Ok(Err((rp, bytes)))
                        }
                        other => other.map(Ok),
                    };
                    match verdict.take() {
                        None => {
                            if res
                                .as_ref()
                                .is_ok_and(|r| r.as_ref().is_ok_and(|r| r.status().is_success()))
                            {
                                health.success();
                            } else if trial {
                                health.trial_abandoned();
                            }
                            return match res {
                                Ok(Ok(r)) => Ok(served(r, &backend.name)),
                                Ok(Err((rp, bytes))) => Ok(served_read(rp, bytes, &backend.name)),
                                Err(e) => Err(e),
                            };
                        }
                        Some((Why::Refused, hint)) => {
                            // A limit in this backend's own stack said "not for this key
                            // until then": move this request on and remember that time,
                            // nothing more. The backend is as healthy as it was; other
                            // keys still go to it.
                            metrics::counter!("tollgate_failover_moved_on_total", "backend" => metrics::SharedString::from_shared(Arc::clone(&backend.name)), "why" => Why::Refused.as_str()).increment(1);
                            tracing::debug!(backend = %backend.name, "refused by the backend's limit; moving on");
                            if trial {
                                health.trial_abandoned();
                            }
                            if let Some(d) = hint {
                                let back = later(shared.clock.now(), d);
                                earliest = Some(earliest.map_or(back, |e| e.min(back)));
                            }
                            if let Err(e) = &res {
                                let sooner = |r: &Refusal, than: &Refusal| match (
                                    r.retry_after(),
                                    than.retry_after(),
                                ) {
                                    (Some(a), Some(b)) => a < b,
                                    (a, b) => a.is_some() && b.is_none(),
                                };
                                if let Some(r) = tollgate_core::error::find::<Refusal>(&**e) {
                                    if refused.as_ref().is_none_or(|k| sooner(r, k)) {
                                        refused = Some(r.clone());
                                    }
                                }
                            }
                        }
                        Some((why, hint)) => {
                            metrics::counter!("tollgate_failover_moved_on_total", "backend" => metrics::SharedString::from_shared(Arc::clone(&backend.name)), "why" => why.as_str()).increment(1);
                            tracing::debug!(backend = %backend.name, why = why.as_str(), "moving on to the next backend");
                            let entered = health.failure(
                                shared.clock.now(),
                                hint,
                                why == Why::RateLimited,
                                &shared.cooldown,
                            );
                            if let Some(d) = entered {
                                metrics::counter!("tollgate_failover_cooldowns_total", "backend" => metrics::SharedString::from_shared(Arc::clone(&backend.name))).increment(1);
                                tracing::info!(backend = %backend.name, cooldown_ms = d.as_millis() as u64, "backend set aside");
                            }
                            // When it said when it could take the request (a server's
                            // hint) or was set aside until then, that is when it is back:
                            // a request that may wait for the first backend back waits
                            // for this one too.
                            if let Some(d) = entered.or(hint) {
                                let back = later(shared.clock.now(), d);
                                earliest = Some(earliest.map_or(back, |e| e.min(back)));
                                if why == Why::RateLimited {
                                    quota_back = Some(quota_back.map_or(back, |q| q.min(back)));
                                }
                            }
                            last = Some(res);
                        }
                    }
                }
                let back_in = earliest.map(|e| e.saturating_duration_since(now));
                let waited = now.saturating_duration_since(start);
                // Wait for the first backend back, when allowed and it is back in time.
                if let (AllCooling::Wait(max), Some(d)) = (shared.all_cooling, back_in) {
                    if waited + d <= max {
                        shared.clock.sleep(d.max(Duration::from_millis(1))).await;
                        continue;
                    }
                }
                // A backend whose provider said "later" is a time to wait for, when there
                // is nowhere else to go (`refused` is a limit's own answer: not waited).
                if let (Some(back), None) = (quota_back, &refused) {
                    let d = back.saturating_duration_since(now);
                    if waited + d <= shared.quota_wait {
                        shared.clock.sleep(d.max(Duration::from_millis(1))).await;
                        continue;
                    }
                }
                // A limit refused this request somewhere: that is its answer (a 429 with
                // the time), for it is this key that must wait, not the backends.
                if let Some(r) = refused {
                    return Err(r.into());
                }
                if tried {
                    // Every backend tried failed, and none is back in time: the last answer.
                    return match last {
                        Some(Ok(Ok(r))) => Ok(served(r, &Arc::from("none"))),
                        Some(Ok(Err((rp, bytes)))) => {
                            Ok(served_read(rp, bytes, &Arc::from("none")))
                        }
                        Some(Err(e)) => Err(e),
                        None => Err("no backend could take the request".into()),
                    };
                }
                // Nobody could be tried: every backend is set aside. When the first back is
                // away because its provider's quota ran out (429s), that is a limit: 429
                // with the time. Otherwise an outage, not a limit: 503 with the time.
                let back_in = back_in.unwrap_or(Duration::from_millis(100));
                return Err(match first_back {
                    Some((_, true, name)) => Refusal::new(
                        LimitKind::Requests,
                        format!("upstream:{name}"),
                        Some(back_in),
                    )
                    .into(),
                    _ => Unavailable::new(back_in).into(),
                });
            }
        })
    }
}

/// Marks an answer with the backend that served it: the `x-tollgate-backend` header and
/// the [`ServedBy`] extension.
fn mark(parts: &mut http::response::Parts, name: &Arc<str>) {
    if let Ok(v) = HeaderValue::from_str(name) {
        parts.headers.insert(X_TOLLGATE_BACKEND, v);
    }
    parts.extensions.insert(ServedBy(Arc::clone(name)));
}

fn served_read<B>(
    mut parts: http::response::Parts,
    bytes: bytes::Bytes,
    name: &Arc<str>,
) -> Response<FailoverBody<B>> {
    mark(&mut parts, name);
    Response::from_parts(parts, crate::body::read(bytes))
}

fn served<B: Body>(res: Response<B>, name: &Arc<str>) -> Response<FailoverBody<B>> {
    let (mut parts, body) = res.into_parts();
    let sse = headers::is_event_stream(&parts.headers);
    mark(&mut parts, name);
    Response::from_parts(parts, crate::body::stream(body, sse, Arc::clone(name)))
}
