//! Helpers shared by the rate-limit tests.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;

use http::{Request, Response};
use tollgate_core::refusal::Refusal;
use tollgate_core::BoxError;
use tower::{service_fn, Service, ServiceExt};

pub type Ok200 =
    tower::util::ServiceFn<fn(Request<()>) -> std::future::Ready<Result<Response<()>, Infallible>>>;

/// An inner service that answers at once.
pub fn ok_service() -> Ok200 {
    fn answer(_: Request<()>) -> std::future::Ready<Result<Response<()>, Infallible>> {
        std::future::ready(Ok(Response::new(())))
    }
    service_fn(answer as fn(_) -> _)
}

pub fn req(tenant: &str) -> Request<()> {
    Request::get("/")
        .header("x-tenant-id", tenant)
        .body(())
        .unwrap()
}

pub async fn send<S>(svc: &mut S, r: Request<()>) -> Result<Response<()>, BoxError>
where
    S: Service<Request<()>, Response = Response<()>, Error = BoxError>,
{
    svc.ready().await?.call(r).await
}

pub fn refusal(e: BoxError) -> Refusal {
    *e.downcast::<Refusal>().expect("a Refusal")
}
