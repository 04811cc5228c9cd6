//! Requests-per-interval limiting for tower services, GCRA through [`governor`].
//!
//! [`RateLimitLayer`] keeps a caller inside a provider's RPM, or a gateway's tenants inside
//! theirs. Each [`Limit`] has a name, a [`Quota`] in the units people think in
//! (`Quota::per_minute(3000)`, burst stated apart) and a key extractor from
//! `tollgate-core` (tenant header, hashed API key, model, global, closure). Several limits
//! can apply to one request — per tenant and global, say — and a request passes only when
//! all of them admit it; when one refuses, no cell of the others is spent.
//!
//! Two modes:
//!
//! - **refuse** (the default): a request over a limit fails at once with the core
//!   [`Refusal`](tollgate_core::refusal::Refusal), which says which limit, which key and
//!   how long until it would pass. A server turns it into a 429 with `Retry-After` and the
//!   IETF `RateLimit` headers through
//!   [`ErrorResponseLayer`](tollgate_core::response::ErrorResponseLayer); a client stack
//!   acts on it (retry, failover).
//! - **wait** ([`RateLimitBuilder::wait`]): a request over a limit waits for a cell, up to
//!   `max_wait`; when the wait would be longer it is refused at once, so failover can move
//!   on. Waiters queue by [`Priority`], then arrival; the queue is bounded; a caller that
//!   goes away leaves the queue and gives back what it was granted. Waiters are released
//!   one per free cell, in order, not woken all at once to race.
//!
//! Every clone of the service shares one set of limits, so behind axum (one clone per
//! connection) the limit still holds. Idle keys are dropped on a schedule, so a million
//! one-off keys do not stay in memory. An [adaptive](Limit::adaptive) limit also reads the
//! provider's `x-ratelimit-remaining-requests` / `-reset-requests` and slows down before
//! the provider starts refusing.
//!
//! A [learned](Limit::learned) limit needs no quota at all: it adopts the one the
//! provider's answers state (`x-ratelimit-limit-requests` per minute, the bucket's size
//! read from `remaining` and `reset`), starts slow until the first answer states it (one
//! request goes, the rest wait and are released the moment it is known), and holds every
//! request back for a 429's hint. [`Limit::learn`] does the same within a configured
//! quota. A learned quota is this process's: to share a quota through a store, state it.
//!
//! Metrics (through the `metrics` facade, labelled by limit name, never by key):
//! `tollgate_ratelimit_admitted_total`, `tollgate_ratelimit_refused_total` (with a
//! `reason`), `tollgate_ratelimit_waited_total` and the histogram
//! `tollgate_ratelimit_wait_seconds`. Refusals and waits are `tracing` debug events.
//!
//! # Example
//!
//! A per-tenant limit and a global one, in refuse mode, with refusals turned into 429s:
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tollgate_core::key::Header;
//! use tollgate_core::response::ErrorResponseLayer;
//! use tollgate_ratelimit::{Limit, Quota, RateLimitLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let limits = RateLimitLayer::builder()
//!     .limit(Limit::new("tenant", Quota::per_minute(2)).keyed_by(Header::new("x-tenant-id")))
//!     .limit(Limit::new("global", Quota::per_minute(1000)))
//!     .build();
//! let svc = ServiceBuilder::new()
//!     .layer(ErrorResponseLayer::new())
//!     .layer(limits)
//!     .service(service_fn(|_: Request<()>| async {
//!         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
//!     }));
//!
//! let call = |svc: &_| {
//!     let req = Request::get("/").header("x-tenant-id", "acme").body(()).unwrap();
//!     tower::ServiceExt::<Request<()>>::oneshot(Clone::clone(svc), req)
//! };
//! assert_eq!(call(&svc).await.unwrap().status(), StatusCode::OK);
//! assert_eq!(call(&svc).await.unwrap().status(), StatusCode::OK);
//! let refused = call(&svc).await.unwrap();
//! assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(refused.headers()["retry-after"], "30");
//! # }
//! ```
//!
//! # Differences from `tower::limit::RateLimit` and `tower-governor`
//!
//! - tower's `RateLimit` keeps its state per clone, so behind axum it limits nothing
//!   (axum#2634), and it is not keyed. Here all clones share one state.
//! - tower-governor refuses only; this layer can also wait, in a bounded, prioritised
//!   queue, on the core clock (governor's `until_ready` sleeps on another timer, which a
//!   paused tokio clock cannot drive).
//! - Admission happens in `call` (see [`RateLimit`]), because the key is in the request.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod future;
mod gov;
mod layer;
mod limit;
mod metrics;
mod quota;
mod remote;
mod service;
mod shared;

pub use future::ResponseFuture;
pub use layer::{RateLimitBuilder, RateLimitLayer};
pub use limit::Limit;
pub use quota::Quota;
pub use service::RateLimit;
/// The wait queue's priorities and modes, shared with every Tollgate limit that can wait.
pub use tollgate_core::wait::{
    priority_fn, ExtensionPriority, HeaderPriority, Mode, Priority, PriorityExtractor, PriorityFn,
};
