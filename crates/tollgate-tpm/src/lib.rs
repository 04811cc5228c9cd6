//! A tokens-per-interval budget for tower services calling LLM APIs.
//!
//! **Status: partly built.** [`estimate`] — what a request will cost before it is sent,
//! counted exactly for OpenAI encodings — works and is tested. The budget layer itself is
//! not built yet; nothing here pretends to limit anything.
//!
//! What the layer will add:
//!
//! - `TpmLayer`: reserve the estimate from one or more keyed budgets, all or nothing;
//!   refuse or wait in `tollgate-core`'s wait queue, like the rate limiter.
//! - After the call, read the real `usage` from the response body as it passes (JSON or
//!   SSE, never buffering the stream, using `tollgate-core`'s usage scanner) and settle:
//!   give back what was over-reserved, take what was under-reserved.
//! - An adaptive mode that reads `x-ratelimit-remaining-tokens` / `-reset-tokens`.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod body;
mod budget;
pub mod estimate;
mod layer;
mod metrics;
mod sse;

pub use body::TpmBody;
pub use budget::{Budget, TokenQuota};
pub use layer::{ResponseFuture, Tpm, TpmBuilder, TpmLayer};
pub use tollgate_core::wait::{HeaderPriority, Mode, Priority, PriorityExtractor};
