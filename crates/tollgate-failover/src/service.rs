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
use tollgate_core::facts::{buffer_with_facts, ReplayBody, RequestFacts, DEFAULT_BODY_LIMIT};
use tollgate_core::headers;
use tollgate_core::key::{KeyExtractor, RequestHead};
use tollgate_core::meter::{Capacity, Headroom};
use tollgate_core::refusal::{LimitKind, Refusal};
use tollgate_core::unavailable::Unavailable;
use tollgate_core::BoxError;
use tower::Service;

use crate::balance::{self, Candidate, Strategy};
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
    /// `name` as the `x-tollgate-backend` value, made once (`None` if it is not a valid
    /// header value).
    label: Option<HeaderValue>,
    service: S,
    model: Option<String>,
    headers: HeaderMap,
    priority: u32,
    weight: u32,
    capacity: Option<Arc<dyn Capacity>>,
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
        let name: Arc<str> = name.into();
        Self {
            label: HeaderValue::from_str(&name).ok(),
            name,
            service,
            model: None,
            headers: HeaderMap::new(),
            priority: 0,
            weight: 1,
            capacity: None,
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

    /// Its weight for [`Strategy::Balanced`] and [`Strategy::Weighted`] (1 by default;
    /// 0 counts as 1).
    pub fn weight(mut self, w: u32) -> Self {
        self.weight = w.max(1);
        self
    }

    /// Where a balancer reads how much room this backend's limits have (its rate
    /// limiter, say): [`Strategy::Balanced`] asks it before each request.
    pub fn capacity(mut self, c: impl Capacity) -> Self {
        self.capacity = Some(Arc::new(c));
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
    strategy: Strategy,
    sticky: Option<Arc<dyn KeyExtractor>>,
}

/// Tries backends in order; see the [crate docs](crate).
pub struct Failover<S> {
    shared: Arc<Shared<S>>,
    /// The backends' services, cloned one at a time for the backend a call tries.
    services: Arc<[S]>,
}

impl<S: Clone> Clone for Failover<S> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            services: Arc::clone(&self.services),
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
    strategy: Strategy,
    sticky: Option<Arc<dyn KeyExtractor>>,
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
            strategy: Strategy::Ordered,
            sticky: None,
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

    /// How each request's backends are ordered ([`Strategy::Ordered`] by default).
    pub fn strategy(mut self, s: Strategy) -> Self {
        self.strategy = s;
        self
    }

    /// Keeps the requests of one key (a tenant, a conversation header) on one backend
    /// while it has room, so its provider's prompt cache keeps being hit. The cost: that
    /// key's traffic is not spread, so one busy key can fill its backend while another
    /// has room (it moves on only when its backend has none left).
    pub fn sticky(mut self, key: impl KeyExtractor) -> Self {
        self.sticky = Some(Arc::new(key));
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
                strategy: self.strategy,
                sticky: self.sticky,
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
        let services = Arc::clone(&self.services);
        Box::pin(async move {
            let (req, facts) = buffer_with_facts(req, shared.body_limit).await?;
            let (parts, _) = req.into_parts();
            let start = shared.clock.now();
            // What every round so far left to answer with: the last failure, and the
            // refusal that passes soonest.
            let mut outcome = Outcomes::default();
            loop {
                let now = shared.clock.now();
                let mut round = Round::default();
                for i in round_order(&shared, &parts, &facts) {
                    let (backend, health) = &shared.backends[i];
                    let trial = match health.gate(now) {
                        Gate::Open => false,
                        Gate::Trial => true,
                        Gate::Cooling(until, limited) => {
                            round.cooling(until, limited, &backend.name);
                            continue;
                        }
                        Gate::Busy => continue,
                    };
                    let mut svc = services[i].clone();
                    let svc = &mut svc;
                    // Not ready now: pass it over rather than wait for it.
                    let ready: Poll<Result<(), BoxError>> = std::future::poll_fn(|cx| {
                        Poll::Ready(svc.poll_ready(cx).map_err(Into::into))
                    })
                    .await;
                    if let Some(not_ready) = not_ready(ready) {
                        if trial {
                            health.trial_abandoned();
                        }
                        if let Some(e) = not_ready {
                            outcome.last = Some(Err(e));
                        }
                        count(
                            backend,
                            "tollgate_failover_skipped_total",
                            Some(Why::NotReady),
                        );
                        continue;
                    }
                    round.tried = true;
                    count(backend, "tollgate_failover_attempts_total", None);
                    let res: Result<Response<ResB>, BoxError> = svc
                        .call(backend_request(backend, &parts, &facts))
                        .await
                        .map_err(Into::into);
                    let (res, verdict) = read_verdict(&shared, res).await?;
                    match verdict {
                        None => {
                            if res
                                .as_ref()
                                .is_ok_and(|r| r.as_ref().is_ok_and(|r| r.status().is_success()))
                            {
                                health.success();
                            } else if trial {
                                health.trial_abandoned();
                            }
                            return served_outcome(res, &backend.name, backend.label.as_ref());
                        }
                        Some((Why::Refused, hint)) => {
                            // A limit in this backend's own stack said "not for this key
                            // until then": move this request on and remember that time,
                            // nothing more. The backend is as healthy as it was; other
                            // keys still go to it.
                            count(
                                backend,
                                "tollgate_failover_moved_on_total",
                                Some(Why::Refused),
                            );
                            tracing::debug!(backend = %backend.name, "refused by the backend's limit; moving on");
                            if trial {
                                health.trial_abandoned();
                            }
                            if let Some(d) = hint {
                                round.back_at(later(shared.clock.now(), d), false);
                            }
                            if let Err(e) = &res {
                                outcome.refused_by(&**e);
                            }
                        }
                        Some((why, hint)) => {
                            count(backend, "tollgate_failover_moved_on_total", Some(why));
                            tracing::debug!(backend = %backend.name, why = why.as_str(), "moving on to the next backend");
                            let limited = why == Why::RateLimited;
                            let entered =
                                health.failure(shared.clock.now(), hint, limited, &shared.cooldown);
                            if let Some(d) = entered {
                                count(backend, "tollgate_failover_cooldowns_total", None);
                                // When it is back, on the wall clock, for dashboards.
                                let back = std::time::SystemTime::now() + d;
                                let secs = back
                                    .duration_since(std::time::UNIX_EPOCH)
                                    .map_or(0.0, |t| t.as_secs_f64());
                                let label =
                                    metrics::SharedString::from_shared(Arc::clone(&backend.name));
                                metrics::gauge!("tollgate_failover_cooling_until_seconds", "backend" => label)
                                    .set(secs);
                                tracing::info!(backend = %backend.name, cooldown_ms = d.as_millis() as u64, "backend set aside");
                            }
                            // When it said when it could take the request (a server's
                            // hint) or was set aside until then, that is when it is back:
                            // a request that may wait for the first backend back waits
                            // for this one too.
                            if let Some(d) = entered.or(hint) {
                                round.back_at(later(shared.clock.now(), d), limited);
                            }
                            outcome.last = Some(res);
                        }
                    }
                }
                match round.next(&shared, now, now.saturating_duration_since(start), &outcome) {
                    Next::Wait(d) => shared.clock.sleep(d.max(Duration::from_millis(1))).await,
                    Next::Answer => return outcome.answer(round, now),
                }
            }
        })
    }
}

/// The order this round tries the backends in: by priority, or as the strategy and a
/// sticky key say.
fn round_order<S>(shared: &Shared<S>, parts: &http::request::Parts, facts: &RequestFacts) -> Order {
    if shared.strategy == Strategy::Ordered && shared.sticky.is_none() {
        // The common case allocates nothing.
        return Order::All(0..shared.backends.len());
    }
    let key = shared.sticky.as_ref().and_then(|_| {
        let req = Request::from_parts(parts.clone(), ());
        balance::sticky_key(&shared.sticky, &RequestHead::new(&req))
    });
    // The group balanced is the first backend's model's; backends that ask for another
    // model are fallbacks, tried in priority order once the group could not serve.
    let group_model = shared
        .backends
        .first()
        .and_then(|(b, _)| b.model.as_deref());
    let (group, fallbacks): (Vec<usize>, Vec<usize>) = (0..shared.backends.len())
        .partition(|&i| shared.backends[i].0.model.as_deref() == group_model);
    let cands = group
        .iter()
        .map(|&index| (index, &shared.backends[index]))
        .map(|(index, (b, _))| {
            // Its room for this request as it would go to it (its credentials decide an
            // API-key limit's key).
            let room = b.capacity.as_ref().map_or(Headroom::FULL, |c| {
                let req = backend_request(b, parts, facts);
                c.headroom(&RequestHead::new(&req))
            });
            Candidate {
                index,
                weight: b.weight,
                room,
                affinity: key
                    .as_deref()
                    .map(|k| balance::affinity(k, &b.name, b.weight)),
            }
        })
        .collect();
    let mut order = balance::order(shared.strategy, cands);
    order.extend(fallbacks);
    Order::Listed(order.into_iter())
}

/// The backends of a round, in the order to try them.
enum Order {
    All(std::ops::Range<usize>),
    Listed(std::vec::IntoIter<usize>),
}

impl Iterator for Order {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        match self {
            Order::All(r) => r.next(),
            Order::Listed(l) => l.next(),
        }
    }
}

/// Whether a backend's `poll_ready` said "not now": `None` when it is ready; `Some(error)`
/// when it is not (with its error, when it failed).
fn not_ready(ready: Poll<Result<(), BoxError>>) -> Option<Option<BoxError>> {
    match ready {
        Poll::Ready(Ok(())) => None,
        Poll::Ready(Err(e)) => Some(Some(e)),
        Poll::Pending => Some(None),
    }
}

/// Counts `name` for `backend` (and `why`, when given).
fn count<S>(backend: &Backend<S>, name: &'static str, why: Option<Why>) {
    let label = metrics::SharedString::from_shared(Arc::clone(&backend.name));
    match why {
        Some(why) => {
            metrics::counter!(name, "backend" => label, "why" => why.as_str()).increment(1)
        }
        None => metrics::counter!(name, "backend" => label).increment(1),
    }
}

/// This backend's request, from the caller's copy: its model, its headers.
fn backend_request<S>(
    backend: &Backend<S>,
    parts: &http::request::Parts,
    facts: &RequestFacts,
) -> Request<ReplayBody> {
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
    f.into_request(p)
}

/// Judges one backend's answer: move on (why, and the server's hint) or keep it. A 400's
/// error code is read only when a switch asks to move on for it; the answer is then kept
/// read (`Ok(Err(..))`).
async fn read_verdict<S, ResB: AnswerBody>(
    shared: &Shared<S>,
    res: Result<Response<ResB>, BoxError>,
) -> Result<(Outcome<ResB>, Option<(Why, Option<Duration>)>), BoxError> {
    let mut verdict = judge(&res, shared.clock.system_now());
    let res = match res {
        Ok(r)
            if verdict.is_none()
                && r.status() == StatusCode::BAD_REQUEST
                && (shared.on_context_length || shared.on_content_policy)
                && r.body().size_hint().upper().is_some_and(|n| n <= 64 * 1024) =>
        {
            let (rp, rb) = r.into_parts();
            let bytes = rb.collect().await.map_err(Into::into)?.to_bytes();
            let code = body_code(&bytes);
            if shared.on_context_length && code.as_deref() == Some("context_length_exceeded") {
                verdict = Some((Why::ContextLength, None));
            } else if shared.on_content_policy && code.as_deref() == Some("content_filter") {
                verdict = Some((Why::ContentPolicy, None));
            }
            Ok(Err((rp, bytes)))
        }
        other => other.map(Ok),
    };
    Ok((res, verdict))
}

/// What one pass over the backends saw of when they are back.
#[derive(Default)]
struct Round {
    /// When the first backend is back (cooling, or a hint said so).
    earliest: Option<Instant>,
    /// The backend cooling that is back first, and whether its provider's quota (429s)
    /// is why it is away.
    first_back: Option<(Instant, bool, Arc<str>)>,
    /// When the first backend away for its provider's quota (cooling after 429s, or a 429
    /// that said when) can take requests again.
    quota_back: Option<Instant>,
    /// Some backend was tried.
    tried: bool,
}

/// What to do after a round.
enum Next {
    /// Wait this long and go round again.
    Wait(Duration),
    /// Answer with what the rounds left.
    Answer,
}

fn min(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.min(b)))
}

impl Round {
    /// A backend is cooling until `until` (`limited`: for its provider's 429s).
    fn cooling(&mut self, until: Instant, limited: bool, name: &Arc<str>) {
        self.earliest = min(self.earliest, until);
        if self.first_back.as_ref().is_none_or(|(t, ..)| until < *t) {
            self.first_back = Some((until, limited, Arc::clone(name)));
        }
        if limited {
            self.quota_back = min(self.quota_back, until);
        }
    }

    /// A backend tried now is back at `at` (`limited`: away for its provider's quota).
    fn back_at(&mut self, at: Instant, limited: bool) {
        self.earliest = min(self.earliest, at);
        if limited {
            self.quota_back = min(self.quota_back, at);
        }
    }

    /// Wait for a backend, or answer: wait for the first backend back when allowed and it
    /// is back in time; wait for one whose provider said "later" when there is nowhere
    /// else to go (a limit's own refusal is never waited for here: its `max_wait`
    /// decided).
    /// `now` is when the round began, `waited` how long the request had waited then.
    fn next<S, B>(
        &self,
        shared: &Shared<S>,
        now: Instant,
        waited: Duration,
        outcome: &Outcomes<B>,
    ) -> Next {
        if let (AllCooling::Wait(max), Some(e)) = (shared.all_cooling, self.earliest) {
            let d = e.saturating_duration_since(now);
            if waited + d <= max {
                return Next::Wait(d);
            }
        }
        if let (Some(back), None) = (self.quota_back, &outcome.refused) {
            let d = back.saturating_duration_since(now);
            if waited + d <= shared.quota_wait {
                return Next::Wait(d);
            }
        }
        Next::Answer
    }
}

/// What the backends answered, kept to hand back when none served the request.
struct Outcomes<B> {
    /// The last failure: an answer (streamed, or read) or an error.
    last: Option<Outcome<B>>,
    /// The refusal that would pass soonest, when a backend's own limit refused.
    refused: Option<Refusal>,
}

impl<B> Default for Outcomes<B> {
    fn default() -> Self {
        Self {
            last: None,
            refused: None,
        }
    }
}

impl<B: Body> Outcomes<B> {
    /// A backend's own limit refused: keep the refusal if it passes sooner than the one
    /// kept.
    fn refused_by(&mut self, e: &(dyn std::error::Error + 'static)) {
        let sooner = |r: &Refusal, than: &Refusal| match (r.retry_after(), than.retry_after()) {
            (Some(a), Some(b)) => a < b,
            (a, b) => a.is_some() && b.is_none(),
        };
        if let Some(r) = tollgate_core::error::find::<Refusal>(e) {
            if self.refused.as_ref().is_none_or(|k| sooner(r, k)) {
                self.refused = Some(r.clone());
            }
        }
    }

    /// The answer when no backend served the request: a limit's refusal (a 429 with its
    /// time: it is this key that must wait, not the backends); else the last failure of
    /// the backends tried; else, nobody could be tried, every backend set aside — a 429
    /// with the time when the first back is away for its provider's quota, otherwise an
    /// outage (503 with the time). `now` is when the round began.
    fn answer(self, round: Round, now: Instant) -> Result<Response<FailoverBody<B>>, BoxError> {
        if let Some(r) = self.refused {
            return Err(r.into());
        }
        if round.tried {
            return match self.last {
                Some(last) => served_outcome(
                    last,
                    &Arc::from("none"),
                    Some(&HeaderValue::from_static("none")),
                ),
                None => Err("no backend could take the request".into()),
            };
        }
        let back_in = round.earliest.map_or(Duration::from_millis(100), |e| {
            e.saturating_duration_since(now)
        });
        Err(match round.first_back {
            Some((_, true, name)) => Refusal::new(
                LimitKind::Requests,
                format!("upstream:{name}"),
                Some(back_in),
            )
            .into(),
            _ => Unavailable::new(back_in).into(),
        })
    }
}

/// An outcome as the caller's answer, marked with the backend that gave it (`name`, and
/// `label`, its header value).
fn served_outcome<B: Body>(
    res: Outcome<B>,
    name: &Arc<str>,
    label: Option<&HeaderValue>,
) -> Result<Response<FailoverBody<B>>, BoxError> {
    let (mut parts, body) = match res {
        Ok(Ok(r)) => {
            let (parts, body) = r.into_parts();
            let sse = headers::is_event_stream(&parts.headers);
            (parts, crate::body::stream(body, sse, Arc::clone(name)))
        }
        Ok(Err((parts, bytes))) => (parts, crate::body::read(bytes)),
        Err(e) => return Err(e),
    };
    if let Some(v) = label {
        parts.headers.insert(X_TOLLGATE_BACKEND, v.clone());
    }
    parts.extensions.insert(ServedBy(Arc::clone(name)));
    Ok(Response::from_parts(parts, body))
}
