//! The response future of [`RateLimit`](crate::RateLimit).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tollgate_core::clock::later;

use http::Response;
use pin_project_lite::pin_project;
use tollgate_core::clock::Clock;
use tollgate_core::headers::RateLimitInfo;
use tollgate_core::refusal::Refusal;
use tollgate_core::BoxError;
use tower::Service;

use tollgate_core::wait::Acquire;

use crate::limit::Answer;
use crate::remote::Remote;
use crate::shared::{Keys, Limits, Shared};
use tokio::time::Instant;
use tollgate_core::clock::Sleep;
use tollgate_core::refusal::Reason;
use tollgate_core::store::{OnStoreFailure, RateCell, RateDecision, StoreError, StoreFuture};
use tollgate_core::wait::{Admission, Admit, Priority};

pin_project! {
    /// The response future of [`RateLimit`](crate::RateLimit): waits for a cell when it
    /// must, calls the inner service, and reads the provider's rate-limit headers for
    /// adaptive limits.
    pub struct ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req>,
        // Set while waiting (to count the admission) and for adaptive limits.
        shared: Option<Arc<Shared>>,
        // The keys, for adaptive limits only.
        keys: Option<Keys>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        // Boxed: waiting is the rare path, and unboxed it would make every future as large
        // as a whole request.
        Waiting { waiting: Box<Waiting<S, Req>> },
        // Asking the shared store (boxed, for the same reason).
        Remote { remote: Box<RemoteWait<S, Req>> },
        Called { #[pin] fut: S::Future },
        Refused { refusal: Option<Refusal> },
    }
}

struct Waiting<S, Req> {
    acquire: Acquire<Limits>,
    svc: Option<S>,
    req: Option<Req>,
}

/// A request asking the shared store for its cells, and waiting between asks.
pub(crate) struct RemoteWait<S, Req> {
    pub(crate) acquire: Option<StoreFuture<Result<RateDecision, StoreError>>>,
    pub(crate) sleep: Option<Sleep>,
    pub(crate) svc: Option<S>,
    pub(crate) req: Option<Req>,
    pub(crate) cells: Arc<[RateCell]>,
    pub(crate) keys: Keys,
    pub(crate) priority: Priority,
    pub(crate) remote: Arc<Remote>,
    /// In wait mode, the latest a request may be admitted.
    pub(crate) deadline: Option<Instant>,
    /// Whether this request may ask the store (it may not while the store is down).
    pub(crate) ask: bool,
}

/// What the store (or its absence) decided.
enum Decided {
    Admitted,
    Refused(BoxError),
    /// The store failed and the policy is to go on with this instance's share.
    Local,
}

impl<S, Req> RemoteWait<S, Req> {
    fn poll_decide(&mut self, cx: &mut Context<'_>, shared: &Shared) -> Poll<Decided> {
        let clock = shared.clock();
        loop {
            if !self.ask {
                return Poll::Ready(self.without_store(None));
            }
            if let Some(sleep) = self.sleep.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                self.sleep = None;
            }
            let store = &self.remote.store;
            let cells = &self.cells;
            let fut = self
                .acquire
                .get_or_insert_with(|| store.acquire(Arc::clone(cells)));
            let answer = ready!(fut.as_mut().poll(cx));
            self.acquire = None;
            match answer {
                Ok(RateDecision::Admitted) => {
                    self.remote.health.answered("ratelimit");
                    return Poll::Ready(Decided::Admitted);
                }
                Ok(RateDecision::Denied {
                    binding,
                    retry_after,
                }) => {
                    self.remote.health.answered("ratelimit");
                    let limits = shared.admitter();
                    match self.deadline {
                        None => {
                            let r = limits.refusal(
                                &self.keys,
                                binding,
                                Some(retry_after),
                                Reason::OverLimit,
                            );
                            return Poll::Ready(Decided::Refused(r.into()));
                        }
                        Some(deadline) if later(clock.now(), retry_after) > deadline => {
                            let r = limits.refusal(
                                &self.keys,
                                binding,
                                Some(retry_after),
                                Reason::WaitTooLong,
                            );
                            return Poll::Ready(Decided::Refused(r.into()));
                        }
                        Some(_) => self.sleep = Some(clock.sleep(retry_after)),
                    }
                }
                Err(e) => {
                    self.remote.health.failed(clock.now(), "ratelimit", &e);
                    return Poll::Ready(self.without_store(Some(e)));
                }
            }
        }
    }

    fn without_store(&self, error: Option<StoreError>) -> Decided {
        match self.remote.on_failure {
            OnStoreFailure::Open { .. } => Decided::Local,
            OnStoreFailure::Closed => Decided::Refused(
                error
                    .unwrap_or_else(|| StoreError::new("it failed moments ago; retrying shortly"))
                    .into(),
            ),
        }
    }
}

impl<S: Service<Req>, Req> std::fmt::Debug for ResponseFuture<S, Req> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S: Service<Req>, Req> ResponseFuture<S, Req> {
    pub(crate) fn called(fut: S::Future, adaptive: Option<(Arc<Shared>, Keys)>) -> Self {
        let (shared, keys) = adaptive.unzip();
        Self {
            state: State::Called { fut },
            shared,
            keys,
        }
    }

    pub(crate) fn waiting(
        acquire: Acquire<Limits>,
        svc: S,
        req: Req,
        shared: Arc<Shared>,
        adaptive: Option<(Arc<Shared>, Keys)>,
    ) -> Self {
        Self {
            state: State::Waiting {
                waiting: Box::new(Waiting {
                    acquire,
                    svc: Some(svc),
                    req: Some(req),
                }),
            },
            shared: Some(shared),
            keys: adaptive.map(|(_, keys)| keys),
        }
    }

    pub(crate) fn remote(
        wait: RemoteWait<S, Req>,
        shared: Arc<Shared>,
        adaptive: Option<(Arc<Shared>, Keys)>,
    ) -> Self {
        Self {
            state: State::Remote {
                remote: Box::new(wait),
            },
            shared: Some(shared),
            keys: adaptive.map(|(_, keys)| keys),
        }
    }

    pub(crate) fn refused(refusal: Refusal) -> Self {
        Self {
            state: State::Refused {
                refusal: Some(refusal),
            },
            shared: None,
            keys: None,
        }
    }
}

impl<S, Req, ResB> Future for ResponseFuture<S, Req>
where
    S: Service<Req, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<ResB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Waiting { waiting } => {
                    let Waiting { acquire, svc, req } = &mut **waiting;
                    if let Err(refusal) = ready!(Pin::new(acquire).poll(cx)) {
                        return Poll::Ready(Err(refusal.into()));
                    }
                    if let Some(shared) = this.shared.as_ref() {
                        shared.admitter().count_admitted();
                    }
                    let (Some(mut svc), Some(req)) = (svc.take(), req.take()) else {
                        return Poll::Ready(
                            Err("rate limit future polled after completion".into()),
                        );
                    };
                    // `svc` was made ready by `poll_ready` before the request was accepted.
                    let fut = svc.call(req);
                    this.state.set(State::Called { fut });
                }
                StateProj::Remote { remote } => {
                    let Some(shared) = this.shared.clone() else {
                        return Poll::Ready(Err("rate limit future without its limits".into()));
                    };
                    let decided = ready!(remote.poll_decide(cx, &shared));
                    let (Some(mut svc), Some(req)) = (remote.svc.take(), remote.req.take()) else {
                        return Poll::Ready(
                            Err("rate limit future polled after completion".into()),
                        );
                    };
                    match decided {
                        Decided::Refused(e) => return Poll::Ready(Err(e)),
                        Decided::Admitted => {
                            shared.admitter().count_admitted();
                            let fut = svc.call(req);
                            this.state.set(State::Called { fut });
                        }
                        Decided::Local => {
                            let keys = remote.keys.clone();
                            match shared.admit(keys, remote.priority) {
                                Admission::Now => {
                                    shared.admitter().count_admitted();
                                    let fut = svc.call(req);
                                    this.state.set(State::Called { fut });
                                }
                                Admission::Wait(acquire) => {
                                    this.state.set(State::Waiting {
                                        waiting: Box::new(Waiting {
                                            acquire,
                                            svc: Some(svc),
                                            req: Some(req),
                                        }),
                                    });
                                }
                                Admission::Refused(r) => return Poll::Ready(Err(r.into())),
                            }
                        }
                    }
                }
                StateProj::Called { fut } => {
                    let res = ready!(fut.poll(cx)).map_err(Into::into);
                    if let (Some(shared), Some(keys)) = (this.shared.as_ref(), this.keys.as_ref()) {
                        answered(shared, keys, res.as_ref().ok());
                    }
                    return Poll::Ready(res);
                }
                StateProj::Refused { refusal } => {
                    return Poll::Ready(Err(match refusal.take() {
                        Some(r) => r.into(),
                        None => "rate limit future polled after completion".into(),
                    }));
                }
            }
        }
    }
}

/// Tells the adaptive and learning limits what the answer said (or that none came), and
/// tries the waiters again when one of them learned something that lets them go.
fn answered<B>(shared: &Shared, keys: &Keys, res: Option<&Response<B>>) {
    let limits = &shared.admitter().limits;
    let kick = match res {
        None => limits.iter().fold(false, |kick, l| l.unanswered() | kick),
        Some(res) => {
            let clock = shared.clock();
            let h = res.headers();
            let info = RateLimitInfo::from_headers(h, clock.system_now());
            let rate_limited = res.status() == http::StatusCode::TOO_MANY_REQUESTS;
            let hint = rate_limited
                .then(|| tollgate_core::headers::server_hint(h, clock.system_now()))
                .flatten();
            let answer = Answer {
                state: &info.requests,
                rate_limited,
                success: res.status().is_success(),
                hint,
            };
            let now = clock.now();
            limits
                .iter()
                .zip(keys.iter())
                .fold(false, |kick, (l, k)| l.answered(k, &answer, now) | kick)
        }
    };
    if kick {
        shared.dispatch();
    }
}
