//! Requests in flight at once, per key, for tower services — refuse or wait, on the
//! Tollgate kit.
//!
//! tower's `ConcurrencyLimit` counts one global pool and frees a place when the response
//! *future* completes. An LLM answer is mostly its body — a stream can run for minutes —
//! so [`ConcurrencyLayer`] frees a place only when the answer's body ends, fails or is
//! dropped (a client that goes away), and counts per key (a tenant, an API key):
//!
//! - **Refuse** (the default): a request past the limit gets the core `Refusal` of kind
//!   `Concurrency` at once — on a server, a 429 with `Retry-After: 1`.
//! - **Wait**: it waits in core's wait queue — by priority, then by fair share
//!   ([`Share`](tollgate_core::wait::Share)), then arrival — and takes the place the
//!   moment one frees (no timer: the end of a body wakes it), or is refused once it has
//!   waited `max_wait`.
//!
//! Kept in process.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tollgate_concurrency::{ConcurrencyLayer, InFlight};
//! use tollgate_core::key::Header;
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let layer = ConcurrencyLayer::builder()
//!     .limit(InFlight::new("tenant-streams", 4).keyed_by(Header::new("x-tenant-id")))
//!     .wait(std::time::Duration::from_secs(30))
//!     .build();
//! let svc = layer.layer(service_fn(|_: Request<()>| async {
//!     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hi"))))
//! }));
//! let res = svc.oneshot(Request::new(())).await.unwrap();
//! assert_eq!(res.status(), 200);
//! # }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod layer;
mod service;

pub use layer::{ConcurrencyBuilder, ConcurrencyLayer, InFlight};
pub use service::{Concurrency, InFlightBody, Place, ResponseFuture};
