//! Errors as HTTP responses, in the shape OpenAI-compatible clients understand.
//!
//! [`openai_error`] builds `{"error": {"message", "type", "param", "code"}}` with a status.
//! [`ErrorResponseLayer`] is the one step a server takes to turn Tollgate's typed errors —
//! a [`Refusal`] (429 with `Retry-After` and `RateLimit` headers), a [`FactsError`]
//! (413, 400), [`Unavailable`](crate::unavailable::Unavailable) (503 with `Retry-After`),
//! a [`BrokenAnswer`](crate::unavailable::BrokenAnswer) (502) or a
//! [`StoreError`](crate::store::StoreError) (503) — into responses; any other error
//! passes through unchanged.
//!
//! ```
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{service_fn, BoxError, Layer, ServiceExt};
//! use tollgate_core::refusal::{LimitKind, Refusal};
//! use tollgate_core::response::ErrorResponseLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let refusing = service_fn(|_: Request<()>| async {
//!     Err::<Response<Full<Bytes>>, BoxError>(
//!         Refusal::new(LimitKind::Requests, "rpm", Some(Duration::from_secs(2))).into(),
//!     )
//! });
//! let svc = ErrorResponseLayer::new().layer(refusing);
//! let res = svc.oneshot(Request::new(())).await.unwrap();
//! assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(res.headers()["retry-after"], "2");
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::facts::FactsError;
use crate::refusal::Refusal;
use crate::BoxError;

/// A response with an OpenAI-style error body.
pub fn openai_error<B: From<Bytes>>(
    status: StatusCode,
    kind: &str,
    code: &str,
    message: &str,
) -> Response<B> {
    let body = serde_json::json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    });
    let mut res = Response::new(B::from(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// The response for a Tollgate error, or `None` when `err` is not one.
///
/// Looks through the error's `source()` chain, so a refusal wrapped by another layer's
/// error is still found.
pub fn error_response<B: From<Bytes>>(
    err: &(dyn std::error::Error + 'static),
) -> Option<Response<B>> {
    for e in crate::error::chain(err) {
        if let Some(r) = e.downcast_ref::<Refusal>() {
            return Some(r.to_response());
        }
        if let Some(f) = e.downcast_ref::<FactsError>() {
            return Some(f.to_response());
        }
        if let Some(u) = e.downcast_ref::<crate::unavailable::Unavailable>() {
            return Some(u.to_response());
        }
        if let Some(b) = e.downcast_ref::<crate::unavailable::BrokenAnswer>() {
            return Some(b.to_response());
        }
        if let Some(e) = e.downcast_ref::<crate::store::StoreError>() {
            // The shared quota could not be consulted and the layer fails closed: the
            // request may be tried again shortly.
            let mut res = openai_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "quota_store_unavailable",
                &e.to_string(),
            );
            res.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("1"),
            );
            return Some(res);
        }
    }
    None
}

/// Turns Tollgate errors into responses; see the [module docs](self).
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorResponseLayer {
    _priv: (),
}

impl ErrorResponseLayer {
    /// The layer.
    pub const fn new() -> Self {
        Self { _priv: () }
    }
}

impl<S> Layer<S> for ErrorResponseLayer {
    type Service = ErrorResponse<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ErrorResponse::new(inner)
    }
}

/// The service of [`ErrorResponseLayer`].
#[derive(Clone, Copy, Debug)]
pub struct ErrorResponse<S> {
    inner: S,
}

impl<S> ErrorResponse<S> {
    /// Wraps `inner`.
    pub const fn new(inner: S) -> Self {
        Self { inner }
    }
    crate::inner_service_accessors!();
}

impl<S, Req, B> Service<Req> for ErrorResponse<S>
where
    S: Service<Req, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: From<Bytes>,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// The future of [`ErrorResponse`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: From<Bytes>,
{
    type Output = Result<Response<B>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match ready!(self.project().inner.poll(cx)) {
            Ok(res) => Poll::Ready(Ok(res)),
            Err(e) => {
                let e: BoxError = e.into();
                Poll::Ready(error_response(&*e).ok_or(e))
            }
        }
    }
}

/// Whether a provider's answer says the model never ran: 502, 503 and 504 from a gateway
/// or load balancer, and Anthropic's 529 "overloaded". A budget charges such an answer
/// nothing — counting its prompt would drain the budget fastest during an outage, just
/// when it matters least.
pub fn never_ran(status: http::StatusCode) -> bool {
    matches!(status.as_u16(), 502 | 503 | 504 | 529)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;
    use http_body_util::{BodyExt, Full};
    use std::time::Duration;
    use tower::{service_fn, ServiceExt};

    use crate::refusal::LimitKind;

    #[derive(Debug)]
    struct Wrapped(Refusal);
    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("wrapped")
        }
    }
    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    async fn run(err: BoxError) -> Result<Response<Full<Bytes>>, BoxError> {
        let mut err = Some(err);
        let svc = service_fn(move |_: Request<()>| {
            let e = err.take();
            async move { Err::<Response<Full<Bytes>>, _>(e.unwrap_or_else(|| "twice".into())) }
        });
        ErrorResponseLayer::new()
            .layer(svc)
            .oneshot(Request::new(()))
            .await
    }

    #[tokio::test]
    async fn refusals_and_bad_bodies_become_responses_others_pass() {
        let r = Refusal::new(LimitKind::Tokens, "tpm", Some(Duration::from_millis(1500)));
        let res = run(Box::new(Wrapped(r))).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(res.headers()["retry-after"], "2");

        let res = run(Box::new(FactsError::TooLarge { limit: 10 }))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "request_too_large");
        assert_eq!(v["error"]["type"], "invalid_request_error");

        let err = run("connection refused".into()).await.unwrap_err();
        assert_eq!(err.to_string(), "connection refused");
    }
}
