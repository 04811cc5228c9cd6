//! Cost budgets for tower services calling LLM APIs: money per window, per tenant.
//!
//! Token counts say nothing about money: a million tokens of one model cost a hundred
//! times those of another. [`CostLayer`] keeps each key (a tenant, an API key) inside a
//! budget of dollars per day, per month, or per fixed window, the way the token budget
//! keeps tokens:
//!
//! 1. **Estimate** the request: its prompt tokens and the most it may generate (by
//!    default a token every four bytes and its `max_tokens`; give the token budget's
//!    exact estimator with [`CostBuilder::estimate`]), priced by the model's line in the
//!    [`Prices`] table (input, output and cached-input dollars per million tokens).
//! 2. **Hold** that cost in every [`CostBudget`], all or none. Over a budget the request
//!    is refused with the core `Refusal` of kind `Budget`: on a server, a 429 with code
//!    `budget_exceeded`, `Retry-After` until the window starts again, and the budget in
//!    `RateLimit-Policy` (in millionths of a dollar, `qu="usd-micros"`). Because the hold
//!    comes first, requests in flight together can never pass the budget by more than
//!    one request's estimate (a provider that uses more than the estimate allowed).
//! 3. **Settle** when the answer's body ends, with its `usage` read as frames pass (JSON
//!    or SSE; streams need `stream_options.include_usage`, which the token budget or a
//!    gateway asks for): uncached input, cached input and output, each at its price.
//!
//! | outcome | charged |
//! | --- | --- |
//! | answer with `usage` | its cost, exactly (sums are kept in nanodollars) |
//! | answer without `usage`, or cut short | the whole hold |
//! | a 4xx, or 502/503/504/529 (turned away at the door) | nothing |
//! | another 5xx, or a transport error | the prompt |
//! | refused inside by a limiter | nothing |
//!
//! A model without a price (and no default) is not counted. Windows are calendar days
//! and months in UTC (see [`Window`] for why), on the clock's wall time. Budgets are kept
//! in process, or with [`CostBuilder::store`] in a shared store (`tollgate-redis`), where
//! every instance holds and settles against one account per key and window.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use tollgate_core::facts::ReplayBody;
//! use tollgate_core::key::Header;
//! use tollgate_cost::{CostBudget, CostLayer, Money, Price, Prices, Window};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let layer = CostLayer::builder()
//!     .prices(Prices::new().model("gpt-4o", Price::per_million(2.5, 10.0).cached_input(1.25)))
//!     .budget(CostBudget::new("daily", Money::dollars(10.0), Window::Day)
//!         .keyed_by(Header::new("x-tenant-id")))
//!     .build();
//! let provider = service_fn(|_: Request<ReplayBody>| async {
//!     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
//!         br#"{"usage":{"prompt_tokens":1000,"completion_tokens":100,"total_tokens":1100}}"#,
//!     ))))
//! });
//! let svc = layer.clone().layer(provider);
//! let req = Request::post("/v1/chat/completions")
//!     .header("x-tenant-id", "acme")
//!     .body(Full::new(Bytes::from_static(br#"{"model":"gpt-4o","max_tokens":100,"messages":[]}"#)))
//!     .unwrap();
//! let res = svc.oneshot(req).await.unwrap();
//! http_body_util::BodyExt::collect(res.into_body()).await.unwrap();
//! let acme = tollgate_core::key::Key::prefixed("tenant", "acme");
//! // 1000 × $2.50 + 100 × $10 per million = $0.0035.
//! assert_eq!(layer.standing("daily", &acme).unwrap().spent, Money::dollars(0.0035));
//! # }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod body;
mod budget;
mod layer;
mod price;
mod service;

pub use body::{CostBody, Settle};
pub use budget::{CostBudget, Standing, Window};
pub use layer::{CostBuilder, CostLayer, Estimate, DEFAULT_MAX_OUTPUT};
pub use price::{Money, Price, Prices};
pub use service::{Cost, ResponseFuture};
