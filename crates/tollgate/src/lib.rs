//! Tower middleware for programs that call rate-limited LLM APIs, and for the gateways in
//! front of them.
//!
//! This crate gathers Tollgate's layers, each behind a Cargo feature (all on by default
//! but `jobs`):
//!
//! | feature | module | what it does |
//! |---|---|---|
//! | `ratelimit` | [`ratelimit`] | GCRA limits per tenant, key or model; refuse or wait in a bounded, prioritised queue |
//! | `tpm` | [`tpm`] | a tokens-per-minute budget: estimate before the call, settle with `usage` after |
//! | `retry` | [`retry`] | retries that obey `Retry-After`, `retry-after-ms`, `x-ratelimit-reset-*` |
//! | `cache` | [`cache`] | a response cache keyed by the request, per tenant, single-flight |
//! | `failover` | [`failover`] | from a primary backend to fallbacks, with cooldown |
//! | `redis` | [`redis`] | Redis-backed stores, so many instances share one quota and one cache |
//! | `batch` | [`batch`] | concurrent embeddings requests of one model sent as one provider call |
//! | `concurrency` | [`concurrency`] | requests in flight per key, freed when the answer's body ends |
//! | `cost` | [`cost`] | budgets in dollars per key and window: the estimate held, the usage charged |
//! | `jobs` | `jobs` | the embedded durable job store (redb) a gateway runs background work from |
//! | `policy` | [`policy`] | the whole stack from one YAML or TOML file |
//!
//! [`core`] is the shared vocabulary: request facts, keys, refusals, server hints, the
//! end-of-body rule and the one watched body every wrapper uses, the replayable request
//! body, quota learning and slow start, the wait queue, every store trait — and the kit
//! for metered limits (`core::meter`: one definition of a limit, the builder knobs, the
//! guarded store call), of which the rate limiter and the token budget are thin users and
//! a third meter (money) would be another. No layer crate depends on another;
//! `tollgate-redis` depends on `tollgate-core` alone.
//!
//! ```text
//!              tollgate-core  (facts, body::Watched, meter kit, wait queue, store traits)
//!      ┌───────────┬──────────┼──────────┬───────────┬──────────────┐
//!  ratelimit      tpm       retry      cache      failover     redis (stores)
//!  (meter kit)  (meter kit) (RequestBody) (Watched)  (Watched)
//!  concurrency   cost       batch                               jobs (embedded store)
//!  (meter kit)  (meter kit) (RequestBody)
//!      └───────────┴──────────┴────┬─────┴───────────┴──────────────┘
//!                  tollgate (this facade, the policy file) ─ tollgate-gateway
//! ```
//!
//! # The request path
//!
//! What [`Policy::build`](policy::Policy::build) stacks, outermost first (and the order
//! to keep when stacking by hand):
//!
//! ```text
//! caller
//!  └ cache          a hit is answered at once and spends no quota
//!    └ failover     backends in priority order; a refusal moves on and cools nothing
//!      └ per backend:
//!        retry       429 / 5xx / transport: wait max(server hint, backoff), again
//!        └ rate limit requests: configured, or learned from the provider's headers
//!          └ tokens   reserved from the estimate, settled to the real usage at the body's end
//!            └ base URL, credentials
//!              └ the HTTP client
//! ```
//!
//! A gateway puts a tenant's own limits in front of that (concurrency, cost, requests,
//! tokens), then the embeddings batch layer, then the model's stack: so a batch of many
//! callers is one request for the model's rate limiter and its total for the budget.
//!
//! The cache sits outside everything that spends quota; each retry passes the limits
//! again; failover sits outside retry so a backend gets its retries before the next is
//! tried. A limit that would make a request wait past `max_wait` refuses at once, and
//! retry hands that refusal back rather than wait it out, so failover moves on.
//!
//! # One layer, or a stack by hand
//!
//! [`ServiceBuilderExt`] names each layer on tower's `ServiceBuilder`, outermost first, in
//! the order DESIGN.md's request path gives (cache, then retry, then the limits):
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tollgate::ratelimit::{Limit, Mode, Quota};
//! use tollgate::tpm::{Budget, TokenQuota, TpmLayer};
//! use tollgate::ServiceBuilderExt;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // Stands in for an HTTP client: answers every chat request.
//! let client = service_fn(|_req: Request<Full<Bytes>>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
//!         br#"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}"#,
//!     ))))
//! });
//! let svc = ServiceBuilder::new()
//!     .tollgate_cache(Duration::from_secs(600))
//!     .tollgate_retry()
//!     .tollgate_rate_limit(
//!         Limit::new("rpm", Quota::per_minute(500)),
//!         Mode::Refuse.wait(Duration::from_secs(30)),
//!     )
//!     // Any layer with settings of its own: built with its builder.
//!     .layer(TpmLayer::builder().budget(Budget::new("tpm", TokenQuota::per_minute(30_000))).build())
//!     .service(client);
//!
//! let req = Request::post("/v1/chat/completions")
//!     .body(Full::new(Bytes::from(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#)))
//!     .unwrap();
//! let res = svc.oneshot(req).await.unwrap();
//! assert_eq!(res.status(), 200);
//! # }
//! ```
//!
//! # A whole strategy from a file
//!
//! ```
//! # #[cfg(feature = "policy")] {
//! use tollgate::policy::Policy;
//!
//! let policy = Policy::from_yaml(r#"
//! primary:   { url: "http://127.0.0.1:8080", model: gpt-4o }
//! fallbacks: [ { name: mini, url: "http://127.0.0.1:8081", model: gpt-4o-mini } ]
//! rate_limit: { requests: 600/min, tokens: 100k/min, mode: wait, max_wait: 30s }
//! retry:      { max_retries: 3, backoff: 500ms, jitter: full }
//! cache:      { ttl: 10m, partition: "header:x-tenant-id" }
//! "#).unwrap();
//! assert_eq!(policy.fallbacks[0].model.as_deref(), Some("gpt-4o-mini"));
//!
//! // A typo is an error that says where, never a silent default.
//! let err = Policy::from_yaml("primary: { url: \"http://h\" }\nretry: { max_retires: 3 }\n").unwrap_err();
//! assert_eq!(err.line(), Some(2));
//! assert!(err.to_string().contains("max_retires"));
//! # }
//! ```
//!
//! [`Policy::build`](policy::Policy::build) wraps any HTTP client service in that stack;
//! the `demo` example runs it against simulated providers.
//! [`Policy::describe`](policy::Policy::describe) writes the resolved stack out: each
//! backend with the limits it really gets, its own or inherited.
//!
//! # What a caller is answered, and why
//!
//! A server turns Tollgate's errors into answers in one step
//! ([`core::response::ErrorResponseLayer`], or [`core::response::error_response`] in a
//! handler). Every body is OpenAI's error shape, `{"error": {"message", "type", "param",
//! "code"}}`, so SDKs raise the right exception; **429 is kept for limits**, so an outage
//! is never read as "slow down".
//!
//! | cause | status | `error.code` | headers |
//! |---|---|---|---|
//! | a Tollgate limit (requests or tokens) refuses this key, or would make it wait past `max_wait` | 429 | `rate_limit_exceeded` | `Retry-After`, `RateLimit`, `RateLimit-Policy` |
//! | the request alone costs more than a whole quota | 429 | `request_too_large` | `x-should-retry: false` |
//! | every backend is set aside after its provider's own 429s | 429 | `rate_limit_exceeded` | `Retry-After` (the first back) |
//! | every backend is set aside after errors (5xx, 408, connection failures) | 503 | `upstream_unavailable` | `Retry-After` (the first back) |
//! | the shared store (Redis) is away and the layer fails closed | 503 | `quota_store_unavailable` | `Retry-After: 1` |
//! | the request body is over the cap | 413 | `request_too_large` | |
//! | the body is not JSON, or is empty where JSON is needed | 400 | `invalid_json`, `empty_body` | |
//! | the backend's own answer (a 400, a 401, its 5xx after retries) | as the backend said | as the backend said | as the backend sent |
//! | the last backend could not be reached at all | the server's choice for a transport error (502 is usual) | | |
//!
//! A refusal names a key and a time; it moves that request on to the next backend and
//! cools nothing. Only a backend's own answers — its provider's 429s, 5xx, 408, transport
//! errors — count against its health.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod base_url;
mod ext;
#[cfg(feature = "policy")]
pub mod policy;

pub use base_url::{BadBaseUrl, BaseUrl, BaseUrlLayer};
pub use ext::ServiceBuilderExt;
/// The shared vocabulary: request facts, keys, refusals, server hints, clocks.
pub use tollgate_core as core;

/// Micro-batching of embeddings requests (`tollgate-batch`).
#[cfg(feature = "batch")]
pub use tollgate_batch as batch;
/// The response cache (`tollgate-cache`).
#[cfg(feature = "cache")]
pub use tollgate_cache as cache;
/// Requests in flight per key (`tollgate-concurrency`).
#[cfg(feature = "concurrency")]
pub use tollgate_concurrency as concurrency;
/// Cost budgets (`tollgate-cost`).
#[cfg(feature = "cost")]
pub use tollgate_cost as cost;
/// Failover across backends (`tollgate-failover`).
#[cfg(feature = "failover")]
pub use tollgate_failover as failover;
/// The embedded durable job store (`tollgate-jobs`).
#[cfg(feature = "jobs")]
pub use tollgate_jobs as jobs;
/// GCRA rate limiting (`tollgate-ratelimit`).
#[cfg(feature = "ratelimit")]
pub use tollgate_ratelimit as ratelimit;
/// Redis-backed stores (`tollgate-redis`).
#[cfg(feature = "redis")]
pub use tollgate_redis as redis;
/// Retries that obey server hints (`tollgate-retry`).
#[cfg(feature = "retry")]
pub use tollgate_retry as retry;
/// The tokens-per-minute budget (`tollgate-tpm`).
#[cfg(feature = "tpm")]
pub use tollgate_tpm as tpm;
