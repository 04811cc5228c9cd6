//! [`Cost`], the service: buffer, estimate, hold, call, settle.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tollgate_core::body::{AnswerBody, CallerBody, Watched};
use tollgate_core::facts::{buffer_with_facts, ReplayBody};
use tollgate_core::key::{Key, RequestHead};
use tollgate_core::meter::{Asked, CostAsk, Guarded};
use tollgate_core::refusal::{LimitKind, QuotaState, Refusal};
use tollgate_core::store::{CostCell, CostStore};
use tollgate_core::usage::UsageScanner;
use tollgate_core::wait::Mode;
use tollgate_core::BoxError;
use tower::Service;

use crate::body::{CostBody, Settle};
use crate::layer::Shared;
use crate::price::Money;

/// A service with cost budgets. Built by [`CostLayer`](crate::CostLayer).
#[derive(Clone)]
pub struct Cost<S> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for Cost<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cost").finish_non_exhaustive()
    }
}

impl<S> Cost<S> {
    tollgate_core::inner_service_accessors!();
}

/// The future of [`Cost`]: boxed, because it buffers the body before it decides.
pub type ResponseFuture<B> =
    Pin<Box<dyn Future<Output = Result<Response<CostBody<B>>, BoxError>> + Send>>;

/// Holds `cost` in every budget for `keys`, or none: the refusal of the first that cannot.
fn hold_all(shared: &Shared, keys: &[Key], cost: Money) -> Result<(), Refusal> {
    let now = shared.now();
    for (i, (l, k)) in shared.ledgers.iter().zip(keys).enumerate() {
        if let Err(standing) = l.hold(k, cost, now) {
            for (l, k) in shared.ledgers.iter().zip(keys).take(i) {
                l.settle(k, cost, Money::ZERO, now);
            }
            let left = standing.amount.minus(standing.spent.plus(standing.held));
            return Err(over_budget(shared, i, k, left));
        }
    }
    Ok(())
}

/// The refusal of budget `i` for `key`, with `left` in it: until its window starts again.
fn over_budget(shared: &Shared, i: usize, key: &Key, left: Money) -> Refusal {
    let now = shared.now();
    let Some(l) = shared.ledgers.get(i) else {
        return Refusal::new(LimitKind::Budget, "budget", Some(Duration::from_secs(1)));
    };
    let (start, end) = l.budget.window.bounds(now);
    let since_epoch = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let resets_in = Duration::from_secs(end).saturating_sub(since_epoch);
    tracing::debug!(budget = %l.budget.name(), "a cost budget refused a request");
    Refusal::new(
        LimitKind::Budget,
        Arc::clone(&l.budget.name),
        Some(resets_in.max(Duration::from_secs(1))),
    )
    .with_key(key.clone())
    .with_quota(QuotaState {
        limit: l.budget.whole.micros(),
        window: Duration::from_secs(end - start),
        remaining: left.micros(),
    })
}

/// Where a request's hold is: in the shared store (its cells), or in process.
pub(crate) enum Held {
    Store(Arc<Guarded<dyn CostStore>>, Arc<[CostCell]>),
    Local,
}

/// Holds `cost` for `keys`: in the shared store when there is one and it answers, else in
/// process (when the store is down and the policy is to go on).
async fn hold(shared: &Arc<Shared>, keys: &[Key], cost: Money) -> Result<Held, BoxError> {
    let Some(guard) = &shared.remote else {
        hold_all(shared, keys, cost)?;
        return Ok(Held::Local);
    };
    let now = shared.now();
    let cells: Arc<[CostCell]> = shared
        .ledgers
        .iter()
        .zip(keys)
        .map(|(l, k)| l.cell(k, now))
        .collect();
    let ask = CostAsk::new(
        Arc::clone(guard),
        Arc::clone(&cells),
        cost.nanos(),
        Mode::Refuse,
        shared.clock.clone(),
    );
    match ask.await {
        Asked::Granted(()) => Ok(Held::Store(Arc::clone(guard), cells)),
        Asked::Refused { binding, .. } => {
            let key = keys.get(binding).cloned().unwrap_or_else(Key::global);
            Err(over_budget(shared, binding, &key, Money::ZERO).into())
        }
        Asked::Local => {
            hold_all(shared, keys, cost)?;
            Ok(Held::Local)
        }
        Asked::Failed(e) => Err(e.into()),
    }
}

impl<S, B, ResB> Service<Request<B>> for Cost<S>
where
    S: Service<Request<ReplayBody>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: CallerBody,
    ResB: AnswerBody,
{
    type Response = Response<CostBody<ResB>>;
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
            // A model without a price is not counted.
            let Some(price) = shared.prices.get(facts.model()).copied() else {
                let res = svc.call(req).await.map_err(boxed)?;
                return Ok(res.map(|b| Watched::new(b, None)));
            };
            let (input, max_output) = (shared.estimate)(&facts);
            let held = price.estimate(input, max_output);
            let keys: Vec<Key> = {
                let head = RequestHead::new(&req);
                shared
                    .ledgers
                    .iter()
                    .map(|l| l.budget.key_for(&head))
                    .collect()
            };
            let place = hold(&shared, &keys, held).await?;
            let settle = Settle {
                shared: Arc::clone(&shared),
                place,
                keys,
                held,
                price,
                prompt: price.estimate(input, 0),
                scanner: None,
            };
            let res = match svc.call(req).await {
                Ok(res) => res,
                Err(e) => {
                    let e = boxed(e);
                    // Refused inside (a limiter), it never reached the provider.
                    let charged = if e.is::<Refusal>() {
                        Money::ZERO
                    } else {
                        settle.prompt
                    };
                    settle.now(charged);
                    return Err(e);
                }
            };
            let status = res.status();
            let (parts, body) = res.into_parts();
            let watcher = match charge_at_once(status) {
                Some(prompt_only) => {
                    let charged = if prompt_only {
                        settle.prompt
                    } else {
                        Money::ZERO
                    };
                    settle.now(charged);
                    None
                }
                None => {
                    let mut settle = settle;
                    settle.scanner = Some(UsageScanner::for_response(&parts.headers));
                    Some(settle)
                }
            };
            Ok(Response::from_parts(parts, Watched::new(body, watcher)))
        })
    }
}

/// `e` boxed. A named function rather than `Into::into` in the future: rustc cannot see
/// through `Into::into` on a generic error inside a boxed `Send` future whose concrete
/// error is already a `BoxError` (the "`From` is not general enough" error).
fn boxed<E: Into<BoxError>>(e: E) -> BoxError {
    e.into()
}

/// What a non-2xx answer is charged, at once: `Some(true)` the prompt (a 5xx the model
/// may have read it for), `Some(false)` nothing (a 4xx, or 502/503/504/529: turned away
/// at the door), `None` for a 2xx, settled with its usage when its body ends.
fn charge_at_once(status: StatusCode) -> Option<bool> {
    if status.is_success() {
        None
    } else if status.is_server_error() && !tollgate_core::response::never_ran(status) {
        Some(true)
    } else {
        Some(false)
    }
}
