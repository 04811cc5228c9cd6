//! The response future of [`RateLimit`](crate::RateLimit).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tollgate_core::clock::Clock;
use tollgate_core::headers::RateLimitInfo;
use tollgate_core::refusal::Refusal;
use tollgate_core::BoxError;
use tower::Service;

use tollgate_core::wait::Acquire;

use crate::limit::Answer;
use crate::shared::{Keys, Limits, Shared};
use tollgate_core::meter::{Asked, RateAsk};
use tollgate_core::wait::{Admission, Admit, Priority, Share, WaitReport};

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
    /// When it began to wait (on the limit's clock), for the request's [`WaitReport`].
    since: tokio::time::Instant,
}

/// A request asking the shared store for its cells (core's guarded store call), with the
/// service and request it will call once admitted.
pub(crate) struct RemoteWait<S, Req> {
    pub(crate) ask: RateAsk,
    pub(crate) svc: Option<S>,
    pub(crate) req: Option<Req>,
    pub(crate) keys: Keys,
    pub(crate) priority: Priority,
    pub(crate) share: Option<Share>,
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
                    since: shared.clock().now(),
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

impl<S, B, ResB> Future for ResponseFuture<S, Request<B>>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<ResB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Waiting { waiting } => {
                    let Waiting {
                        acquire,
                        svc,
                        req,
                        since,
                    } = &mut **waiting;
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
                    if let Some(shared) = this.shared.as_ref() {
                        let waited = shared.clock().now().saturating_duration_since(*since);
                        WaitReport::note(&req, waited);
                    }
                    // `svc` was made ready by `poll_ready` before the request was accepted.
                    let fut = svc.call(req);
                    this.state.set(State::Called { fut });
                }
                StateProj::Remote { remote } => {
                    let Some(shared) = this.shared.clone() else {
                        return Poll::Ready(Err("rate limit future without its limits".into()));
                    };
                    let asked = ready!(Pin::new(&mut remote.ask).poll(cx));
                    let (Some(mut svc), Some(req)) = (remote.svc.take(), remote.req.take()) else {
                        return Poll::Ready(
                            Err("rate limit future polled after completion".into()),
                        );
                    };
                    let limits = shared.admitter();
                    match asked {
                        Asked::Refused {
                            binding,
                            retry_after,
                            reason,
                        } => {
                            let r = limits.refusal(&remote.keys, binding, retry_after, reason);
                            return Poll::Ready(Err(r.into()));
                        }
                        Asked::Failed(e) => return Poll::Ready(Err(e.into())),
                        Asked::Granted(()) => {
                            limits.count_admitted();
                            let fut = svc.call(req);
                            this.state.set(State::Called { fut });
                        }
                        Asked::Local => match shared.admit_shared(
                            remote.keys.clone(),
                            remote.priority,
                            remote.share,
                        ) {
                            Admission::Now => {
                                limits.count_admitted();
                                let fut = svc.call(req);
                                this.state.set(State::Called { fut });
                            }
                            Admission::Wait(acquire) => {
                                this.state.set(State::Waiting {
                                    waiting: Box::new(Waiting {
                                        acquire,
                                        svc: Some(svc),
                                        req: Some(req),
                                        since: shared.clock().now(),
                                    }),
                                });
                            }
                            Admission::Refused(r) => return Poll::Ready(Err(r.into())),
                        },
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
