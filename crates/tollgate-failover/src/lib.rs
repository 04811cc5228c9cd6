//! Failover across ordered LLM backends.
//!
//! [`Failover`] holds an ordered list of [`Backend`]s, each a service with its own stack
//! (its own retry, limiter and budget, credentials and base URL) and a priority. For each
//! request it tries them in order:
//!
//! - **It moves on** after an answer no other backend would give: 429 (after the backend's
//!   own retries), a Tollgate refusal (its limiter refused, or would wait past `max_wait`), 408, 5xx,
//!   529, a timeout or connection error — and, when switched on, `context_length_exceeded`
//!   or a content-policy refusal. Anything else (a 400, a 401) is the answer, returned as
//!   it is.
//! - **Model rewrite:** a backend may name its model; the buffered body is rewritten for
//!   it, never the caller's copy. Each backend's headers (its credentials) go to it alone.
//! - **Cooldown:** a backend that fails repeatedly (3 times in 30 s) or answers 429/503
//!   with a long `Retry-After` is set aside — for the hint when given — then given one
//!   trial request, and brought back on success ([`Cooldown`]). The state is shared by
//!   every clone. Only the backend's own answers count: its provider's 429s, 5xx, 408,
//!   transport errors.
//! - **A refusal is not a failure.** A Tollgate limit in the backend's stack (keyed by
//!   tenant, API key or model) says "not for this key until t": the request moves on to
//!   the next backend, and nothing is cooled, so every other key still goes to the
//!   backend. When every backend refused, the caller gets the refusal that passes
//!   soonest (a 429 with its `Retry-After`).
//! - **When no backend can take the request now** — each set aside, or saying when it can
//!   (its limiter's wait, a `Retry-After`) — the request waits for the first one back (up
//!   to a bound) or is answered with the time until one is ([`AllCooling`]): an
//!   [`Unavailable`](tollgate_core::unavailable::Unavailable) (503) when the first back is
//!   away for errors, a [`Refusal`](tollgate_core::refusal::Refusal) (429) when it is away
//!   because its provider's quota ran out — never a bare "no deployments available".
//! - **`poll_ready` never waits for all backends** (tower's `Steer` does, and one slow
//!   backend blocks the rest): a backend that is not ready is passed over.
//! - **Streams:** failover happens only before the first byte reaches the caller; an SSE
//!   stream that breaks later ends with an `event: error` the caller can read.
//! - **Balancing** ([`Strategy`]): the order is by priority unless the builder says
//!   otherwise. `Balanced` sends each request first to the backend whose limits
//!   ([`Backend::capacity`], its rate limiter) have the most room for its weight — two
//!   drawn by weight, the roomier wins — so several keys of one model are all used and
//!   none refuses while another idles; `Weighted` draws the first by fixed shares. The
//!   group balanced is the backends asking for the first backend's model; a backend
//!   asking for another model is a fallback, tried by priority after the group. A
//!   sticky key ([`FailoverBuilder::sticky`]) keeps a tenant or a conversation on one
//!   backend while it has room. Whatever the order, what happens after a backend
//!   answers is as above: a refusal moves on without counting as a failure.
//! - The answer says who served it: `x-tollgate-backend` and the [`ServedBy`] extension.
//!   Metrics: `tollgate_failover_attempts_total{backend}`,
//!   `tollgate_failover_moved_on_total{backend,why}`, `tollgate_failover_cooldowns_total`,
//!   and the gauge `tollgate_failover_cooling_until_seconds{backend}`: when the backend's
//!   latest cooldown ends, in Unix seconds (in the past once it is back).
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tollgate_core::facts::ReplayBody;
//! use tollgate_failover::{Backend, Failover, X_TOLLGATE_BACKEND};
//! use tower::{service_fn, util::BoxCloneSyncService, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! type Svc = BoxCloneSyncService<Request<ReplayBody>, Response<Full<Bytes>>, Infallible>;
//! let down: Svc = BoxCloneSyncService::new(service_fn(|_: Request<ReplayBody>| async {
//!     Ok::<_, Infallible>(Response::builder().status(503).body(Full::new(Bytes::new())).unwrap())
//! }));
//! let up: Svc = BoxCloneSyncService::new(service_fn(|_: Request<ReplayBody>| async {
//!     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
//! }));
//! let svc = Failover::builder()
//!     .backend(Backend::new("primary", down))
//!     .backend(Backend::new("fallback", up).model("gpt-4o-mini").priority(1))
//!     .build();
//! let req = Request::post("/v1/chat/completions")
//!     .body(Full::new(Bytes::from(r#"{"model":"gpt-4o","messages":[]}"#)))
//!     .unwrap();
//! let res = svc.oneshot(req).await.unwrap();
//! assert_eq!(res.headers()[X_TOLLGATE_BACKEND], "fallback");
//! # }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod balance;
mod body;
mod health;
mod service;

pub use balance::Strategy;

pub use body::{FailoverBody, StreamGuard};
pub use health::Cooldown;
pub use service::{
    AllCooling, Backend, Failover, FailoverBuilder, FailoverLayer, ResponseFuture, ServedBy, Why,
    X_TOLLGATE_BACKEND,
};
