//! [`RateLimit`], the service.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tollgate_core::key::RequestHead;
use tollgate_core::BoxError;
use tower::Service;

use crate::future::{RemoteWait, ResponseFuture};
use crate::remote::{self, Remote};
use tollgate_core::meter::RateAsk;
use tollgate_core::wait::{Admission, Mode, Priority};

use crate::shared::{Keys, Shared};

/// Applies the limits of a [`RateLimitLayer`](crate::RateLimitLayer) to an inner service.
///
/// Admission happens in `call`, not `poll_ready`: the key a request counts against comes
/// from the request, which `poll_ready` never sees, so a cell cannot be reserved before
/// the request is known (tower's `ConcurrencyLimit` can, because all its permits are
/// alike). `poll_ready` only asks the inner service. A request that must wait takes the
/// inner service that was made ready with it (a fresh clone stays behind for the next
/// request) and calls it once admitted.
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    shared: Arc<Shared>,
    remote: Option<Arc<Remote>>,
}

impl<S> RateLimit<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>, remote: Option<Arc<Remote>>) -> Self {
        Self {
            inner,
            shared,
            remote,
        }
    }

    tollgate_core::inner_service_accessors!();
}

impl<S, B, ResB> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S, Request<B>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let shared = &self.shared;
        let limits = shared.admitter();
        let head = RequestHead::new(&req);
        let mut keys: Keys = limits
            .limits
            .iter()
            .map(|l| l.limit.key_for(&head))
            .collect();
        let priority = match shared.mode() {
            Mode::Wait { .. } => limits.priority.priority(&head),
            Mode::Refuse if limits.reserve > 0 => limits.priority.priority(&head),
            Mode::Refuse => Priority::default(),
        };
        keys.background = limits.reserve > 0 && priority == Priority(0);
        let share = match shared.mode() {
            Mode::Wait { .. } => limits.share.share(&head),
            Mode::Refuse => None,
        };
        // Only limits that read answers need the keys and the limits again once it is in.
        let adaptive = limits
            .watches_answers
            .then(|| (Arc::clone(shared), keys.clone()));
        // A closed (zero) quota is refused by the local limiter, whatever the store says.
        if let Some(remote) = self.remote.as_ref().filter(|_| !limits.any_closed()) {
            let cells = remote::cells(remote, limits, &keys);
            let ask = RateAsk::new(
                Arc::clone(&remote.guard),
                cells,
                1,
                shared.mode(),
                shared.clock().clone(),
            )
            .in_line(priority, share);
            let ready = tollgate_core::service::take_ready(&mut self.inner);
            let wait = RemoteWait {
                ask,
                svc: Some(ready),
                req: Some(req),
                keys,
                priority,
                share,
            };
            return ResponseFuture::remote(wait, Arc::clone(shared), adaptive);
        }
        match shared.admit_shared(keys, priority, share) {
            Admission::Now => {
                limits.count_admitted();
                ResponseFuture::called(self.inner.call(req), adaptive)
            }
            Admission::Wait(acquire) => {
                let ready = tollgate_core::service::take_ready(&mut self.inner);
                ResponseFuture::waiting(acquire, ready, req, Arc::clone(shared), adaptive)
            }
            Admission::Refused(refusal) => ResponseFuture::refused(refusal),
        }
    }
}
