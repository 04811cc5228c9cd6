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
use tollgate_core::refusal::{LimitKind, QuotaState, Refusal};
use tollgate_core::usage::UsageScanner;
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
            let (start, end) = l.budget.window.bounds(now);
            let window = Duration::from_secs(end - start);
            tracing::debug!(budget = %l.budget.name(), "a cost budget refused a request");
            return Err(Refusal::new(
                LimitKind::Budget,
                Arc::clone(&l.budget.name),
                Some(standing.resets_in.max(Duration::from_secs(1))),
            )
            .with_key(k.clone())
            .with_quota(QuotaState {
                limit: standing.amount.micros(),
                window,
                remaining: left.micros(),
            }));
        }
    }
    Ok(())
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
            hold_all(&shared, &keys, held)?;
            let settle = Settle {
                shared: Arc::clone(&shared),
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
