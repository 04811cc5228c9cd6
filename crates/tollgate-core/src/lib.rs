//! The shared vocabulary of Tollgate, the tower middleware for rate-limited LLM APIs.
//!
//! Every Tollgate layer speaks these types; each also works alone, computing what it
//! needs when an outer layer has not.
//!
//! | module | what it holds |
//! | --- | --- |
//! | [`error`] | an error's `source()` chain, searched for a Tollgate error however it was wrapped |
//! | [`facts`] | the request body buffered once (with a cap), the JSON parsed once, and the fields layers need: model, `stream`, `max_tokens`, the prompt; `buffer_for_replay`, the mode that sends an over-cap body once instead of refusing it |
//! | [`key`] | who a request counts against: [`Key`](key::Key) and [`KeyExtractor`](key::KeyExtractor) (tenant header, hashed API key, model, global, closure) |
//! | [`headers`] | rate-limit headers read (`retry-after-ms`, `Retry-After`, `x-ratelimit-*`, `anthropic-ratelimit-*`, `grpc-retry-pushback-ms`) and written (`Retry-After`, IETF `RateLimit`) |
//! | [`duration`] | Go-style durations (`6m0s`), as OpenAI writes resets |
//! | [`usage`] | token usage from JSON bodies and, frame by frame, from SSE streams |
//! | [`meter`] | the kit every metered limit is built from: one definition of a limit, the builder knobs, the guarded store call, all-or-none across meters |
//! | [`learn`] | a provider's quota learned from its headers, and slow start until it is known |
//! | [`refusal`] | the typed error a limit returns, and its 429 response |
//! | [`unavailable`] | every backend away for its own failures: a 503 with `Retry-After`, never a 429 |
//! | [`response`] | errors in OpenAI's error shape; the layer that turns Tollgate errors into responses |
//! | [`body`] | when a response body is over, as every body wrapper must see it (a server that knows the length stops polling early); `Watched`, the one wrapper for layers that act at an answer's end; `RequestBody`, a request that can be sent again (or once, over the cap) |
//! | [`clock`] | one place to take time from: tokio's (pausable) clock or a manual one |
//! | [`service`] | what every Tollgate service does alike: take the ready service for a call |
//! | [`wait`] | the bounded, prioritised wait queue every limit that can wait shares |
//!
//! # Example
//!
//! A server-side check written with the core types alone: buffer the body, key the
//! request by API key, and refuse with a proper 429.
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tollgate_core::facts::{buffer_request, RequestFacts, DEFAULT_BODY_LIMIT};
//! use tollgate_core::key::{ApiKey, KeyExtractor, RequestHead};
//! use tollgate_core::refusal::{LimitKind, Refusal};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let req = Request::post("/v1/chat/completions")
//!     .header("authorization", "Bearer sk-test")
//!     .body(Full::new(Bytes::from_static(br#"{"model":"gpt-4o","messages":[]}"#)))
//!     .unwrap();
//! let req = buffer_request(req, DEFAULT_BODY_LIMIT).await.unwrap();
//!
//! let key = ApiKey.extract(&RequestHead::new(&req)).unwrap();
//! let model = RequestFacts::get(&req).and_then(|f| f.model()).unwrap_or("unknown");
//! let refusal = Refusal::new(LimitKind::Requests, format!("rpm:{model}"), Some(Duration::from_secs(1)))
//!     .with_key(key);
//! let res: Response<Full<Bytes>> = refusal.to_response();
//! assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
//! # }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod macros;

pub mod body;
pub mod clock;
pub mod duration;
pub mod error;
pub mod facts;
pub mod headers;
pub mod key;
pub mod learn;
pub mod meter;
pub mod refusal;
pub mod response;
pub mod service;
pub mod store;
pub mod unavailable;
pub mod usage;
pub mod usage_chunk;
mod usage_fields;
pub mod wait;

/// The boxed error type of tower stacks.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
