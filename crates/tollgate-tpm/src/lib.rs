//! A tokens-per-interval budget for tower services calling LLM APIs.
//!
//! Providers limit tokens per minute as well as requests. [`TpmLayer`] keeps a caller
//! inside that budget by paying for a request *before* it is sent, then settling with the
//! provider's own count after:
//!
//! 1. **Estimate** ([`estimate`]): prompt tokens, counted exactly with the model's
//!    encoding for OpenAI models (by length for others), plus the most the request can
//!    generate (`max_tokens` × `n`, or a default per model). Embeddings cost their input.
//! 2. **Reserve** the estimate from every [`Budget`] (per tenant, global, …), all or
//!    nothing; over a budget, refuse with the core `Refusal` (a 429 on a server) or wait
//!    in `tollgate-core`'s bounded, prioritised wait queue, as the rate limiter does.
//!    Because reservations happen before the call, concurrent requests cannot overshoot.
//! 3. **Settle** when the response body ends: the real `usage` is read as frames pass
//!    (JSON, or SSE from OpenAI, the Responses API, Anthropic and Gemini — the stream is
//!    never held), and what was over-reserved is given back, what was under-reserved
//!    taken (a budget may go into debt, which later requests wait out).
//!
//! Streamed chat requests that did not ask for `stream_options.include_usage` are asked
//! for it, and the usage-only chunk is removed from what the caller sees.
//!
//! # What is kept when things go wrong
//!
//! | outcome | tokens kept |
//! | --- | --- |
//! | answer with `usage` | exactly the reported total |
//! | answer without `usage` | the whole reservation |
//! | 429, or any other 4xx, from the provider | none: it generated nothing |
//! | 502, 503, 504, 529 from the provider | none: turned away at the door (an outage or overload), the model never ran |
//! | 500 and other 5xx from the provider | the prompt: it may have read it; the output never came |
//! | refused inside (a limiter), body unreadable, connection refused | none: it never reached the provider |
//! | other transport errors (reset, timeout) | the prompt |
//! | body cut midway, or dropped by the caller | the whole reservation: the provider counted some of it, nobody can say how much |
//!
//! An [adaptive](Budget::adaptive) budget also reads `x-ratelimit-remaining-tokens` and
//! never holds more than the provider says is left. Idle keys are dropped on a schedule.
//! Metrics (labelled by budget name, never by key): `tollgate_tpm_reserved_tokens_total`,
//! `_settled_tokens_total`, `_refunded_tokens_total`, `_charged_tokens_total`,
//! `_refused_total{reason}`, `_refused_tokens_total`.
//!
//! A [learned](Budget::learned) budget needs no quota: it adopts the one the provider's
//! answers state (`x-ratelimit-limit-tokens` per minute, or Anthropic's
//! `anthropic-ratelimit-tokens-*`), starts slow until the first answer states it, and
//! follows `remaining` from then on; [`Budget::learn`] does the same within a configured
//! quota.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tollgate_core::facts::ReplayBody;
//! use tollgate_core::key::{Header, Key};
//! use tollgate_tpm::{Budget, TokenQuota, TpmLayer};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // A provider that reports 30 tokens used.
//! let provider = service_fn(|_: Request<ReplayBody>| async {
//!     let body = r#"{"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}"#;
//!     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
//! });
//! let budget = TpmLayer::new(
//!     Budget::new("tpm", TokenQuota::per_minute(10_000)).keyed_by(Header::new("x-tenant-id")),
//! );
//! let svc = budget.layer(provider);
//!
//! let req = Request::post("/v1/chat/completions")
//!     .header("x-tenant-id", "acme")
//!     .body(Full::new(Bytes::from(
//!         r#"{"model":"gpt-4o","max_tokens":500,"messages":[{"role":"user","content":"Hi"}]}"#,
//!     )))
//!     .unwrap();
//! let res = svc.oneshot(req).await.unwrap();
//! // 508 tokens were reserved (8 prompt + 500 output) ...
//! res.into_body().collect().await.unwrap();
//! // ... and settled to the 30 the provider counted.
//! assert_eq!(budget.available("tpm", &Key::new("tenant:acme")), Some(10_000 - 30));
//! # }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod body;
mod budget;
pub mod estimate;
mod layer;
mod metrics;
mod service;

pub use body::{Settling, TpmBody};
pub use budget::{Budget, TokenQuota};
pub use layer::{TpmBuilder, TpmLayer};
pub use service::{ResponseFuture, Tpm};
pub use tollgate_core::wait::{HeaderPriority, Mode, Priority, PriorityExtractor};
