//! A retry policy for LLM API calls that obeys the server.
//!
//! [`RetryLayer`] wraps tower's `Retry` with [`RetryPolicy`]. It fixes what the retry
//! loop everyone writes by hand gets wrong:
//!
//! - **It obeys the server.** It waits `max(server hint, backoff)`, as DESIGN.md's request
//!   path says: never less than the server's hint — `retry-after-ms`, then `Retry-After`
//!   (seconds or HTTP date), then for a 429 the `x-ratelimit-reset-*` of the exhausted
//!   limit; gRPC's `grpc-retry-pushback-ms`; a Tollgate refusal's own wait — and, when a
//!   server keeps asking many clients for the same short wait, growing like any backoff so
//!   they stop colliding. A hint longer than `max_server_wait` (120 s) is not waited out:
//!   the answer is returned so failover can act.
//! - **Backoff with jitter** ([`Backoff`], [`Jitter`]): 500 ms × 2ⁿ, capped at 8 s, full
//!   jitter by default (the reason is on [`Jitter`]).
//! - **It retries what a wait can fix** ([`HttpClassifier`], replaceable): 429 — but not
//!   `insufficient_quota` and other "the quota is gone" answers —, 408, 409, 500, 502,
//!   503, 504, 529, connection and timeout errors, and Tollgate refusals that will pass.
//!   `x-should-retry: true|false` wins. Everything else comes back after one attempt.
//!   [`GrpcClassifier`] does the same for tonic (`RESOURCE_EXHAUSTED`, `UNAVAILABLE`).
//! - **It is bounded:** at most `max_retries`; an overall deadline for the whole request,
//!   waits included (never overrun: the request fails with [`DeadlineExceeded`] at the
//!   deadline); and a retry budget (tower's `TpsBudget`, 20% of traffic by default), so
//!   retries stay a bounded share of traffic when a provider is down. **A 429 (or a
//!   Tollgate refusal) that says when to come back is waited, not budgeted:** it is a
//!   pacing signal from a working service, so its retries are bounded by `max_retries`,
//!   the deadline and `max_server_wait` alone; 5xx, transport errors and 429s without a
//!   hint draw on the budget.
//! - **It checks whole answers:** a 2xx JSON answer (up to 8 MiB) is read whole before
//!   it is passed on, so one whose body breaks off or is not JSON — a cut connection, a
//!   provider's truncated write — is asked again like a transport failure
//!   (`reason="broken_answer"`) instead of reaching the caller as a broken 200. Past every
//!   attempt the error is a [`BrokenAnswer`](tollgate_core::unavailable::BrokenAnswer): a
//!   502 `upstream_answer_broken` through `ErrorResponseLayer`, and failover moves on.
//!   Streams are never held back.
//! - **It replays bodies:** the request body is buffered once (or taken from the
//!   `tollgate-core` facts an outer layer put there) and replayed; a body over the cap is
//!   sent once and never retried, and the log says so. A streamed answer is retried only
//!   on its status — before its first byte reaches the caller; a stream that breaks later
//!   is the caller's to see.
//! - **Each attempt is visible:** a `tracing` span per attempt, a debug event with the
//!   wait chosen and why (hint or backoff); metrics `tollgate_retry_attempts_total`,
//!   `_retries_total{reason}`, `_wait_seconds`, `_giveups_total{why}`.
//! - Waits use the core clock, so paused-clock tests run at once.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tollgate_retry::RetryLayer;
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // A provider that is rate limited twice, then answers.
//! let calls = Arc::new(AtomicU32::new(0));
//! let seen = Arc::clone(&calls);
//! let provider = service_fn(move |_req: Request<_>| {
//!     let n = seen.fetch_add(1, Ordering::SeqCst);
//!     async move {
//!         let res = if n < 2 {
//!             Response::builder().status(429).header("retry-after-ms", "250").body(Full::new(Bytes::new()))
//!         } else {
//!             Response::builder().body(Full::new(Bytes::from("ok")))
//!         };
//!         Ok::<_, Infallible>(res.unwrap())
//!     }
//! });
//! let svc = RetryLayer::new().layer(provider);
//! let res = svc.oneshot(Request::post("/v1/chat/completions").body(Full::new(Bytes::from("{}"))).unwrap()).await.unwrap();
//! assert_eq!(res.status(), 200);
//! assert_eq!(calls.load(Ordering::SeqCst), 3);
//! # }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod backoff;
mod body;
mod classify;
mod layer;
mod policy;

pub use backoff::{Backoff, Jitter};
pub use body::RetryBody;
pub use classify::{
    error_verdict, server_hint, Classifier, GrpcClassifier, HttpClassifier, Outcome, RetryReason,
    Verdict,
};
pub use layer::{DeadlineExceeded, ReadErrors, ResponseFuture, Retry, RetryBuilder, RetryLayer};
pub use policy::{Attempt, RetryPolicy};
/// The retry layer's request body: core's replayable-or-once body.
pub use tollgate_core::body::RequestBody;
pub use tower::retry::budget::TpsBudget;
