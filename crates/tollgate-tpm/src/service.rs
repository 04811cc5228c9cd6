//! [`Tpm`], the service: buffer, estimate, reserve, call, settle — each a named step.

//! [`TpmLayer`], its builder, and the [`Tpm`] service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tollgate_core::clock::later;

use http::header::CONTENT_LENGTH;
use http::{Request, Response, StatusCode};
use tollgate_core::body::{AnswerBody, CallerBody};
use tollgate_core::clock::Clock;
use tollgate_core::facts::{buffer_with_facts, ReplayBody, RequestFacts};
use tollgate_core::headers::RateLimitInfo;
use tollgate_core::key::{Key, RequestHead};
use tollgate_core::refusal::Refusal;
use tollgate_core::usage::UsageReport;
use tollgate_core::usage::UsageScanner;
use tollgate_core::wait::{Admission, Mode, Priority, Share};
use tollgate_core::BoxError;
use tower::Service;

use crate::body::{RemoteHold, Settlement, TpmBody};
use crate::budget::{ProviderView, Ticket};
use tollgate_core::meter::{Asked, TokenAsk};
use tollgate_core::store::TokenCell;
use tollgate_core::wait::Admit;

use crate::layer::{Remote, Shared};

/// Applies the budgets of a [`TpmLayer`](crate::TpmLayer) to an inner service. See the [crate docs](crate).
#[derive(Clone, Debug)]
pub struct Tpm<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Tpm<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }

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

/// Reserves `ticket` in the shared store: `Some` when reserved there, `None` when the
/// store failed and the policy is to go on in process; an error for a refusal.
async fn reserve_in_store(
    shared: &Shared,
    remote: &Remote,
    ticket: &Ticket,
    (priority, share): (Priority, Option<Share>),
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
    )
    .in_line(priority, share);
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

use tollgate_core::response::never_ran;

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
        let mut svc = tollgate_core::service::take_ready(&mut self.inner);
        Box::pin(async move {
            let (req, facts) = buffer_with_facts(req, shared.body_limit).await?;
            let report = req.extensions().get::<Arc<UsageReport>>().cloned();
            let estimate = shared.estimator.estimate(&facts);
            let (req, strip_usage) = ask_for_usage(&shared, req, &facts);
            let mut settlement = reserve(&shared, &req, estimate.total()).await?;
            let res = match svc.call(req).await {
                Ok(res) => res,
                Err(e) => {
                    let e = e.into();
                    unanswered(&shared, settlement, &e, estimate.prompt_tokens);
                    return Err(e);
                }
            };
            if shared.adaptive && settlement.remote.is_none() {
                follow(&shared, &res, &mut settlement);
            }
            let (mut parts, body) = res.into_parts();
            let body = settle_or_watch(
                &mut parts,
                body,
                settlement,
                estimate.prompt_tokens,
                strip_usage,
                report,
            );
            Ok(Response::from_parts(parts, body))
        })
    }
}

/// The request as it goes upstream: a streamed chat request is asked for its usage chunk
/// when some budget counts and the caller did not ask (`true`: strip that chunk from the
/// answer again).
fn ask_for_usage(
    shared: &Shared,
    req: Request<ReplayBody>,
    facts: &RequestFacts,
) -> (Request<ReplayBody>, bool) {
    let asked = shared
        .queue
        .admitter()
        .counting()
        .then(|| facts.with_usage_requested())
        .flatten();
    match asked {
        Some(asked) => {
            let (parts, _) = req.into_parts();
            (asked.into_request(parts), true)
        }
        None => (req, false),
    }
}

/// Reserves `cost` tokens for `req` in every budget (in the shared store, or in process
/// when there is none or it fails open), waiting when the mode says so; the reservation
/// to settle once the answer is known.
async fn reserve(
    shared: &Arc<Shared>,
    req: &Request<ReplayBody>,
    cost: u64,
) -> Result<Settlement, BoxError> {
    let budgets = shared.queue.admitter();
    let head = RequestHead::new(req);
    let keys: Vec<Key> = budgets
        .ledgers
        .iter()
        .map(|l| l.budget.key_for(&head))
        .collect();
    let (priority, share) = match shared.queue.mode() {
        Mode::Wait { .. } => (shared.priority.priority(&head), shared.share.share(&head)),
        Mode::Refuse => (Priority::default(), None),
    };
    let ticket = Ticket { keys, cost };
    let hold = match &shared.remote {
        Some(remote) => reserve_in_store(shared, remote, &ticket, (priority, share)).await?,
        None => None,
    };
    if hold.is_none() {
        match shared.queue.admit_shared(ticket.clone(), priority, share) {
            Admission::Now => {}
            Admission::Wait(acquire) => {
                let since = shared.queue.clock().now();
                acquire.await?;
                let waited = shared.queue.clock().now().saturating_duration_since(since);
                tollgate_core::wait::WaitReport::note(req, waited);
            }
            Admission::Refused(r) => return Err(r.into()),
        }
    }
    for l in &budgets.ledgers {
        l.metrics.reserved(cost);
    }
    Ok(Settlement {
        queue: Arc::clone(&shared.queue),
        keys: ticket.keys,
        reserved: cost,
        provider: None,
        done: false,
        remote: hold,
    })
}

/// No answer came (`e`): a request that never reached the provider costs nothing; one
/// that may have keeps its prompt (the provider will have counted it) and gives back the
/// output that never came.
fn unanswered(shared: &Shared, settlement: Settlement, e: &BoxError, prompt_tokens: u64) {
    if shared.learn && shared.queue.admitter().unanswered() {
        shared.queue.dispatch();
    }
    if never_reached(&**e) {
        settlement.settle_at(0);
    } else {
        settlement.settle_at(prompt_tokens);
    }
}

/// What the answer says of the provider's token quota: learning budgets learn it (and a
/// 429's hint holds every request back until it passes); adaptive ones follow what it
/// says is left, now and again after settling.
fn follow<B>(shared: &Shared, res: &Response<B>, settlement: &mut Settlement) {
    let budgets = shared.queue.admitter();
    let clock = shared.queue.clock();
    let info = RateLimitInfo::from_headers(res.headers(), clock.system_now());
    if shared.learn {
        let pause = (res.status() == StatusCode::TOO_MANY_REQUESTS)
            .then(|| tollgate_core::headers::server_hint(res.headers(), clock.system_now()))
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
        budgets.follow_provider(&settlement.keys, &view);
        settlement.provider = Some(view);
    }
}

/// Settles now what the status alone decides, or watches the body for its `usage`.
fn settle_or_watch<B: http_body::Body>(
    parts: &mut http::response::Parts,
    body: B,
    settlement: Settlement,
    prompt_tokens: u64,
    strip_usage: bool,
    report: Option<Arc<UsageReport>>,
) -> TpmBody<B> {
    let status = parts.status;
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_client_error() || never_ran(status) {
        // Refused, rejected, or turned away at the door (unavailable, overloaded, a
        // gateway error): the model never ran, and the provider counts nothing. Were it to
        // count something after all, an adaptive budget follows the provider's own
        // `x-ratelimit-remaining-tokens` on the next answer.
        settlement.settle_at(0);
        return crate::body::passthrough(body);
    }
    if status.is_server_error() {
        settlement.settle_at(prompt_tokens);
        return crate::body::passthrough(body);
    }
    let scanner = UsageScanner::for_response(&parts.headers);
    let strip = strip_usage && tollgate_core::headers::is_event_stream(&parts.headers);
    if strip {
        parts.headers.remove(CONTENT_LENGTH);
    }
    crate::body::settling(body, scanner, strip, settlement, report)
}
