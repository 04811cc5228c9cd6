//! Micro-batching of embeddings requests: many small requests, one provider call.
//!
//! A provider counts an embeddings request whose `input` is an array of up to 2,048 items
//! as **one request** against its RPM. An application that embeds documents one at a time
//! spends a request per text. [`BatchLayer`] gathers the concurrent `/v1/embeddings`
//! requests of one model and the same parameters (`dimensions`, `encoding_format`,
//! `user` — everything in the body but `input` — and the same credentials) that arrive
//! within `max_delay`, sends them as one request with the inputs in order, and hands each
//! caller exactly its own part of the answer: its vectors, `index` from 0, and its share
//! of `usage` (by its inputs' token counts; exact when the counter is the provider's
//! encoding).
//!
//! - A group is sent at `max_delay` after its first request, or at once when the next
//!   request would take it past `max_items` (≤ 2,048) or `max_input_tokens` (the
//!   provider's per-request input limit).
//! - One caller's array input stays together. A request alone in its window is sent as
//!   it came, and its answer handed back as it is.
//! - A caller that goes away while waiting leaves the batch without breaking it.
//! - An upstream error reaches every member of the batch. A 400 for one bad input is
//!   not retried without it: the error does not say which input, and finding it would
//!   cost up to one call per member — a caller that needs that sends alone.
//! - Token arrays as input, and anything not `/v1/embeddings`, pass through untouched.
//!
//! Place it outside the rate limiter and the token budget: a batch is then one request
//! for the limiter and its total for the budget.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tollgate_batch::BatchLayer;
//!
//! let layer = BatchLayer::builder()
//!     .max_delay(Duration::from_millis(5))
//!     .max_items(2048)
//!     .build();
//! # let _ = layer;
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod layer;
mod service;

pub use layer::{BatchBuilder, BatchLayer};
pub use service::{Batch, BatchBody, BatchError, ResponseFuture};
