//! A response cache for LLM API calls.
//!
//! The cheapest request is the one never sent. [`CacheLayer`] answers identical questions
//! once:
//!
//! - **The key** ([`key`]) is a SHA-256 of the method, the path, the partition and the
//!   canonical JSON body (key order and whitespace do not matter; `user` and other chosen
//!   fields are left out). The partition is the tenant (`x-tenant-id`) or hashed API key,
//!   so one tenant never receives another's answer; sharing across tenants is an explicit
//!   choice ([`CacheBuilder::shared_across_tenants`]).
//! - **The store** ([`store`]) is `quick_cache`, bounded in bytes by a weigher, behind the
//!   [`CacheStore`](store::CacheStore) trait a Redis store can implement. TTL per layer,
//!   per model prefix, or per request (`x-tollgate-cache-ttl`), kept on the core clock.
//! - **What is cached:** 2xx answers whose body ended whole. Never errors, 429s or cut
//!   streams. `Cache-Control: no-cache` / `no-store` bypass. Optionally only deterministic
//!   requests (`temperature: 0` or a `seed`); off by default, for the reason given on
//!   [`CacheBuilder::deterministic_only`]. Request bodies over 1 MiB are passed on uncached.
//! - **Single-flight** ([`flight`]): concurrent identical requests make one upstream call;
//!   the others wait for its answer. A leader that fails or is cancelled is replaced by
//!   one waiter — nobody hangs (a cache's own `get_with` would block them while the leader
//!   is not polled, as moka's does, moka#240).
//! - **Streams:** a streamed answer is recorded frame by frame as it passes (never delaying
//!   the caller) and stored when it completes; a hit replays the SSE events as they came.
//!   A streamed and a plain request are different keys (`stream` is part of the body).
//! - Every answer says `x-tollgate-cache: hit | miss | bypass`. Metrics:
//!   `tollgate_cache_requests_total{result}`, `tollgate_cache_stored_bytes_total`,
//!   `tollgate_cache_evictions_total`.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tollgate_cache::{CacheLayer, X_TOLLGATE_CACHE};
//! use tollgate_core::facts::ReplayBody;
//! use tower::{service_fn, Layer, ServiceExt};
//! use http_body_util::BodyExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let provider = service_fn(|_: Request<ReplayBody>| async {
//!     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(r#"{"answer":42}"#))))
//! });
//! let svc = CacheLayer::new().layer(provider);
//! let ask = || {
//!     Request::post("/v1/chat/completions")
//!         .header("x-tenant-id", "acme")
//!         .body(Full::new(Bytes::from(r#"{"model":"gpt-4o","messages":[]}"#)))
//!         .unwrap()
//! };
//! let first = svc.clone().oneshot(ask()).await.unwrap();
//! assert_eq!(first.headers()[X_TOLLGATE_CACHE], "miss");
//! first.into_body().collect().await.unwrap(); // stored once the body has ended
//! let second = svc.oneshot(ask()).await.unwrap();
//! assert_eq!(second.headers()[X_TOLLGATE_CACHE], "hit");
//! # }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod body;
pub mod flight;
pub mod key;
mod layer;
pub mod store;

pub use body::{CacheBody, Recording};
pub use layer::{
    Cache, CacheBuilder, CacheLayer, ResponseFuture, X_TOLLGATE_CACHE, X_TOLLGATE_CACHE_TTL,
};
