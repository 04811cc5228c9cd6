//! [`Concurrency`], the service, and the body that holds a place until it ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tollgate_core::body::{Watched, Watcher};
use tollgate_core::key::{Key, RequestHead};
use tollgate_core::meter::Knobs;
use tollgate_core::wait::{Admission, Mode, Priority, WaitQueue, WaitReport};
use tollgate_core::BoxError;
use tower::Service;

use crate::layer::Places;

/// A service that limits requests in flight. Built by
/// [`ConcurrencyLayer`](crate::ConcurrencyLayer).
#[derive(Clone)]
pub struct Concurrency<S> {
    pub(crate) inner: S,
    pub(crate) queue: Arc<WaitQueue<Places>>,
    pub(crate) knobs: Arc<Knobs<()>>,
}

impl<S> std::fmt::Debug for Concurrency<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Concurrency").finish_non_exhaustive()
    }
}

impl<S> Concurrency<S> {
    tollgate_core::inner_service_accessors!();
}

/// A place taken: given back when dropped, and the next waiter woken.
pub struct Place {
    queue: Arc<WaitQueue<Places>>,
    key: Key,
}

impl std::fmt::Debug for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Place").field("key", &self.key).finish()
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.queue.admitter().release(&self.key);
        self.queue.dispatch();
    }
}

/// Holds the place until the answer is complete, fails, or is dropped.
impl Watcher for Place {
    fn complete(&mut self) -> Bytes {
        Bytes::new()
    }
}

/// The body of an answer through [`Concurrency`]: it holds the request's place.
pub type InFlightBody<B> = Watched<B, Place>;

/// The future of [`Concurrency`]: boxed, because it may wait for a place.
pub type ResponseFuture<B> =
    Pin<Box<dyn Future<Output = Result<Response<InFlightBody<B>>, BoxError>> + Send>>;

/// `e` boxed (a named function: see the gateway's note on rustc's higher-ranked check).
fn boxed<E: Into<BoxError>>(e: E) -> BoxError {
    e.into()
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Concurrency<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    ReqB: Send + 'static,
    ResB: http_body::Body<Data = Bytes>,
{
    type Response = Response<InFlightBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(boxed)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let queue = Arc::clone(&self.queue);
        let (key, priority, share) = {
            let head = RequestHead::new(&req);
            let key = queue.admitter().limit.key_for(&head);
            match queue.mode() {
                Mode::Wait { .. } => (
                    key,
                    self.knobs.priority.priority(&head),
                    self.knobs.share.share(&head),
                ),
                Mode::Refuse => (key, Priority::default(), None),
            }
        };
        // A place taken now is the request's from this moment: dropped with the future,
        // even one never polled, it is given back.
        let admission = match queue.admit_shared(key.clone(), priority, share) {
            Admission::Now => Ok(Place { queue, key }),
            Admission::Wait(acquire) => Err(Ok((acquire, queue, key))),
            Admission::Refused(r) => Err(Err(r)),
        };
        let mut svc = tollgate_core::service::take_ready(&mut self.inner);
        Box::pin(async move {
            let place = match admission {
                Ok(place) => place,
                Err(Err(r)) => return Err(r.into()),
                Err(Ok((acquire, queue, key))) => {
                    let waited = acquire.await?;
                    WaitReport::note(&req, waited);
                    Place { queue, key }
                }
            };
            let res = svc.call(req).await.map_err(boxed)?;
            Ok(res.map(|b| Watched::new(b, Some(place))))
        })
    }
}
