//! The response future of [`RateLimit`](crate::RateLimit).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project_lite::pin_project;
use tollgate_core::clock::Clock;
use tollgate_core::headers::RateLimitInfo;
use tollgate_core::refusal::Refusal;
use tollgate_core::BoxError;
use tower::Service;

use tollgate_core::wait::Acquire;

use crate::shared::{Keys, Limits, Shared};

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
        Called { #[pin] fut: S::Future },
        Refused { refusal: Option<Refusal> },
    }
}

struct Waiting<S, Req> {
    acquire: Acquire<Limits>,
    svc: Option<S>,
    req: Option<Req>,
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
                StateProj::Called { fut } => {
                    let res = ready!(fut.poll(cx)).map_err(Into::into);
                    if let (Ok(res), Some(shared), Some(keys)) =
                        (&res, this.shared.as_ref(), this.keys.as_ref())
                    {
                        follow_provider(shared, keys, res);
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

fn follow_provider<B>(shared: &Shared, keys: &Keys, res: &Response<B>) {
    let info = RateLimitInfo::from_headers(res.headers(), shared.clock().system_now());
    if info.requests.remaining.is_none() {
        return;
    }
    let now = shared.clock().now();
    for (limit, key) in shared.admitter().limits.iter().zip(keys.iter()) {
        if limit.limit.adaptive {
            limit.follow_provider(key, &info.requests, now);
        }
    }
}
