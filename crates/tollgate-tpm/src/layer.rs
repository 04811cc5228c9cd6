//! [`TpmLayer`], its builder, and the [`Tpm`] service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tollgate_core::clock::later;

use http::header::CONTENT_LENGTH;
use http::{Request, Response, StatusCode};
use serde_json::Value;
use tollgate_core::body::{AnswerBody, CallerBody};
use tollgate_core::clock::Clock;
use tollgate_core::facts::{
    buffer_with_facts, ApiKind, ReplayBody, RequestFacts, DEFAULT_BODY_LIMIT,
};
use tollgate_core::headers::RateLimitInfo;
use tollgate_core::key::{Key, RequestHead};
use tollgate_core::refusal::Refusal;
use tollgate_core::usage::UsageScanner;
use tollgate_core::wait::{Admission, Mode, Priority, PriorityExtractor, WaitQueue};
use tollgate_core::BoxError;
use tower::{Layer, Service};

use crate::body::{RemoteHold, Settlement, TpmBody};
use crate::budget::{Budget, Budgets, Ledger, ProviderView, Ticket, TokenQuota};
use crate::estimate::Estimator;
use tollgate_core::meter::{Asked, Guarded, Knobs, TokenAsk};
use tollgate_core::store::{TokenCell, TokenStore};
use tollgate_core::wait::Admit;

struct Shared {
    queue: Arc<WaitQueue<Budgets>>,
    estimator: Estimator,
    priority: Arc<dyn PriorityExtractor>,
    body_limit: usize,
    adaptive: bool,
    /// Some budget learns its quota from the provider.
    learn: bool,
    remote: Option<Remote>,
}

/// The shared store of a layer behind its guard, and each budget's whole quota as the
/// store keeps it (the ledgers in process hold only this instance's share when failing
/// open).
struct Remote {
    guard: Arc<Guarded<dyn TokenStore>>,
    quotas: Vec<TokenQuota>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("budgets", self.queue.admitter())
            .field("estimator", &self.estimator)
            .finish_non_exhaustive()
    }
}

/// Applies one or more token [`Budget`]s to every request; see the [crate docs](crate).
/// Every service it makes, and every clone of those, draws on the same budgets.
#[derive(Clone, Debug)]
pub struct TpmLayer {
    shared: Arc<Shared>,
}

impl TpmLayer {
    /// One budget, refusing what is over it.
    pub fn new(budget: Budget) -> Self {
        Self::builder().budget(budget).build()
    }

    /// A builder.
    pub fn builder() -> TpmBuilder {
        TpmBuilder {
            budgets: Vec::new(),
            estimator: Estimator::default(),
            body_limit: DEFAULT_BODY_LIMIT,
            knobs: Knobs::default(),
        }
    }

    /// Tokens the budget named `budget` holds for `key` now (negative while in debt), or
    /// `None` when there is no such budget.
    pub fn available(&self, budget: &str, key: &Key) -> Option<i64> {
        self.ledger(budget).map(|l| l.available(key))
    }

    fn ledger(&self, budget: &str) -> Option<&Ledger> {
        self.shared
            .queue
            .admitter()
            .ledgers
            .iter()
            .find(|l| l.budget.name() == budget)
    }

    /// The quota in force for the budget named `budget`: the configured one, or the one a
    /// learning budget ([`Budget::learned`], [`Budget::learn`]) took from the provider's
    /// answers; `None` for a budget of another name, or one that knows no quota yet.
    pub fn quota(&self, budget: &str) -> Option<TokenQuota> {
        self.ledger(budget).and_then(Ledger::quota)
    }

    /// How many keys the budgets hold state for.
    pub fn keys(&self) -> usize {
        self.shared
            .queue
            .admitter()
            .ledgers
            .iter()
            .map(Ledger::len)
            .sum()
    }

    /// How many requests are waiting for tokens now.
    pub fn waiting(&self) -> usize {
        self.shared.queue.waiting()
    }

    /// Drops the state of every key whose bucket is full again (the layer does this on a
    /// schedule by itself; see [`TpmBuilder::housekeeping`]).
    pub fn retain_recent(&self) {
        for l in &self.shared.queue.admitter().ledgers {
            l.retain_recent();
        }
    }
}

impl<S> Layer<S> for TpmLayer {
    type Service = Tpm<S>;
    fn layer(&self, inner: S) -> Tpm<S> {
        Tpm {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// Builds a [`TpmLayer`].
pub struct TpmBuilder {
    budgets: Vec<Budget>,
    estimator: Estimator,
    body_limit: usize,
    knobs: Knobs<dyn TokenStore>,
}

impl fmt::Debug for TpmBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmBuilder")
            .field("budgets", &self.budgets)
            .field("knobs", &self.knobs)
            .finish_non_exhaustive()
    }
}

impl TpmBuilder {
    /// Adds a budget. A request passes only when every budget holds its estimate, and
    /// takes from none of them when one refuses.
    pub fn budget(mut self, budget: Budget) -> Self {
        self.budgets.push(budget);
        self
    }

    /// How requests are estimated (exact counting and a 1024-token default output
    /// unless changed).
    pub fn estimator(mut self, estimator: Estimator) -> Self {
        self.estimator = estimator;
        self
    }

    tollgate_core::meter_builder_methods!(TokenStore, "budget");

    /// The largest request body the layer buffers to estimate (10 MiB by default); larger
    /// ones are refused with 413.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// The layer.
    pub fn build(self) -> TpmLayer {
        let knobs = self.knobs;
        let adaptive = self.budgets.iter().any(Budget::is_adaptive);
        let learn = self.budgets.iter().any(Budget::learns);
        let share = knobs.share();
        let quotas: Vec<TokenQuota> = self.budgets.iter().map(Budget::quota).collect();
        let ledgers = self
            .budgets
            .into_iter()
            .map(|b| Ledger::new(b.shared_by(share), knobs.clock.clone()))
            .collect();
        let queue = Arc::new(WaitQueue::new(
            Budgets { ledgers },
            knobs.mode,
            knobs.clock.clone(),
        ));
        knobs.spawn_housekeeping(&queue, |q: &WaitQueue<Budgets>| {
            for l in &q.admitter().ledgers {
                l.retain_recent();
            }
        });
        TpmLayer {
            shared: Arc::new(Shared {
                queue,
                estimator: self.estimator,
                priority: Arc::clone(&knobs.priority),
                body_limit: self.body_limit,
                adaptive,
                learn,
                remote: knobs.guarded("tpm").map(|guard| Remote { guard, quotas }),
            }),
        }
    }
}

/// Applies the budgets of a [`TpmLayer`] to an inner service. See the [crate docs](crate).
#[derive(Clone, Debug)]
pub struct Tpm<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Tpm<S> {
    tollgate_core::inner_service_accessors!();
}

/// The future of [`Tpm`]: boxed, because it buffers the body, estimates, may wait, and
/// calls the inner service — a few microseconds of work next to which the allocation does
/// not show.
pub type ResponseFuture<B> =
    Pin<Box<dyn Future<Output = Result<Response<TpmBody<B>>, BoxError>> + Send>>;

/// Whether an error shows the request never reached the provider: a refusal by a limiter
/// inside, a body that could not be read, or a connection that could not be made.
fn never_reached(err: &(dyn std::error::Error + 'static)) -> bool {
    tollgate_core::error::chain(err).any(|e| {
        use std::io::ErrorKind::*;
        e.is::<Refusal>()
            || e.is::<tollgate_core::facts::FactsError>()
            || e.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    ConnectionRefused
                        | AddrNotAvailable
                        | NotConnected
                        | HostUnreachable
                        | NetworkUnreachable
                )
            })
    })
}

/// Asks a streamed chat request for its usage chunk when the caller did not; returns the
/// new facts, or `None` when the request needs no change (or cannot take one).
fn with_usage_requested(facts: &RequestFacts) -> Option<RequestFacts> {
    if facts.kind() != ApiKind::ChatCompletions || !facts.is_stream() || facts.include_usage() {
        return None;
    }
    let options = facts.json()?.get("stream_options");
    if options.is_some_and(|o| !o.is_object()) {
        return None;
    }
    facts.rewrite(|v| {
        if let Some(obj) = v.as_object_mut() {
            let options = obj
                .entry("stream_options")
                .or_insert_with(|| Value::Object(serde_json::Map::new()));
            if let Some(o) = options.as_object_mut() {
                o.insert("include_usage".to_owned(), Value::Bool(true));
            }
        }
    })
}

/// Reserves `ticket` in the shared store: `Some` when reserved there, `None` when the
/// store failed and the policy is to go on in process; an error for a refusal.
async fn reserve_in_store(
    shared: &Shared,
    remote: &Remote,
    ticket: &Ticket,
) -> Result<Option<RemoteHold>, BoxError> {
    let budgets = shared.queue.admitter();
    let cells: Arc<[TokenCell]> = budgets
        .ledgers
        .iter()
        .zip(&remote.quotas)
        .zip(&ticket.keys)
        .map(|((l, q), k)| TokenCell {
            key: Key::prefixed(l.budget.name(), k.as_str()),
            capacity: q.capacity(),
            window: q.window(),
        })
        .collect();
    let ask = TokenAsk::new(
        Arc::clone(&remote.guard),
        Arc::clone(&cells),
        ticket.cost,
        shared.queue.mode(),
        shared.queue.clock().clone(),
    );
    match ask.await {
        Asked::Granted(hold) => Ok(Some(RemoteHold {
            store: Arc::clone(remote.guard.store()),
            cells,
            hold,
        })),
        Asked::Refused {
            binding,
            retry_after,
            reason,
        } => Err(budgets.refusal(ticket, binding, retry_after, reason).into()),
        Asked::Local => Ok(None),
        Asked::Failed(e) => Err(e.into()),
    }
}

/// Statuses a provider's front door answers when the model never ran: 502, 503 and 504
/// from a gateway or load balancer, and Anthropic's 529 "overloaded". Counting their
/// prompts would drain the budget fastest during an outage, just when it matters least.
fn never_ran(status: StatusCode) -> bool {
    matches!(status.as_u16(), 502 | 503 | 504 | 529)
}

impl<S, B, ResB> Service<Request<B>> for Tpm<S>
where
    S: Service<Request<ReplayBody>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: CallerBody,
    ResB: AnswerBody,
{
    type Response = Response<TpmBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let shared = Arc::clone(&self.shared);
        // The service made ready by `poll_ready` goes with this request; a clone stays.
        let mut svc = tollgate_core::service::take_ready(&mut self.inner);
        Box::pin(async move {
            let (req, facts) = buffer_with_facts(req, shared.body_limit).await?;
            let estimate = shared.estimator.estimate(&facts);
            let counting = shared.queue.admitter().counting();
            let asked = if counting {
                with_usage_requested(&facts)
            } else {
                None
            };
            let (req, strip_usage) = match asked {
                Some(asked) => {
                    let (parts, _) = req.into_parts();
                    (asked.into_request(parts), true)
                }
                None => (req, false),
            };
            let budgets = shared.queue.admitter();
            let head = RequestHead::new(&req);
            let keys: Vec<Key> = budgets
                .ledgers
                .iter()
                .map(|l| l.budget.key_for(&head))
                .collect();
            let priority = match shared.queue.mode() {
                Mode::Wait { .. } => shared.priority.priority(&head),
                Mode::Refuse => Priority::default(),
            };
            let ticket = Ticket {
                keys: keys.clone(),
                cost: estimate.total(),
            };
            let hold = match &shared.remote {
                Some(remote) => reserve_in_store(&shared, remote, &ticket).await?,
                None => None,
            };
            if hold.is_none() {
                match shared.queue.admit(ticket.clone(), priority) {
                    Admission::Now => {}
                    Admission::Wait(acquire) => {
                        acquire.await?;
                    }
                    Admission::Refused(r) => return Err(r.into()),
                }
            }
            for l in &budgets.ledgers {
                l.metrics.reserved(ticket.cost);
            }
            let mut settlement = Settlement {
                queue: Arc::clone(&shared.queue),
                keys,
                reserved: ticket.cost,
                provider: None,
                done: false,
                remote: hold,
            };
            let res = match svc.call(req).await {
                Ok(res) => res,
                Err(e) => {
                    let e: BoxError = e.into();
                    if shared.learn && budgets.unanswered() {
                        shared.queue.dispatch();
                    }
                    if never_reached(&*e) {
                        settlement.settle_at(0);
                    } else {
                        // It may have reached the provider, which will have counted the
                        // prompt: keep that, give back the output that never came.
                        settlement.settle_at(estimate.prompt_tokens);
                    }
                    return Err(e);
                }
            };
            if shared.adaptive && settlement.remote.is_none() {
                let clock = shared.queue.clock();
                let info = RateLimitInfo::from_headers(res.headers(), clock.system_now());
                if shared.learn {
                    // A 429's hint holds every request back until it passes.
                    let pause = (res.status() == StatusCode::TOO_MANY_REQUESTS)
                        .then(|| {
                            tollgate_core::headers::server_hint(res.headers(), clock.system_now())
                        })
                        .flatten()
                        .map(|d| later(clock.now(), d));
                    if budgets.answered(&info.tokens, res.status().is_success(), pause) {
                        shared.queue.dispatch();
                    }
                }
                if let Some(remaining) = info.tokens.remaining {
                    let view = ProviderView {
                        remaining,
                        reset: info.tokens.reset,
                        limit: info.tokens.limit,
                    };
                    budgets.follow_provider(&ticket.keys, &view);
                    settlement.provider = Some(view);
                }
            }
            let status = res.status();
            let (mut parts, body) = res.into_parts();
            let body = if status == StatusCode::TOO_MANY_REQUESTS
                || status.is_client_error()
                || never_ran(status)
            {
                // Refused, rejected, or turned away at the door (unavailable, overloaded,
                // a gateway error): the model never ran, and the provider counts nothing.
                // Were it to count something after all, an adaptive budget follows the
                // provider's own `x-ratelimit-remaining-tokens` on the next answer.
                settlement.settle_at(0);
                crate::body::passthrough(body)
            } else if status.is_server_error() {
                settlement.settle_at(estimate.prompt_tokens);
                crate::body::passthrough(body)
            } else {
                let scanner = UsageScanner::for_response(&parts.headers);
                let sse = tollgate_core::headers::is_event_stream(&parts.headers);
                let strip = strip_usage && sse;
                if strip {
                    parts.headers.remove(CONTENT_LENGTH);
                }
                crate::body::settling(body, scanner, strip, settlement)
            };
            Ok(Response::from_parts(parts, body))
        })
    }
}
