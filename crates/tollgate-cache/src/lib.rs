//! A response cache for LLM API calls.
//!
//! **Status: partly built.** Two foundations work and are tested:
//!
//! - [`key`]: the cache key — a SHA-256 of the method, the path, the tenant partition and
//!   the canonical JSON body, without fields that do not change the answer;
//! - [`flight`]: single-flight — concurrent identical requests make one upstream call, and
//!   a leader that fails or is cancelled is replaced by one waiter.
//!
//! The layer itself is not built yet; nothing here caches anything. What it will add:
//! `CacheLayer` over HTTP services, storage in `moka` (TTL per route or model, a size bound
//! through a weigher) behind a store trait the Redis store also implements, 2xx answers
//! only, `Cache-Control: no-cache`/`no-store` bypass, streamed answers recorded as they pass
//! and replayed as SSE, and an `x-tollgate-cache: hit|miss|bypass` header.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod body;
pub mod flight;
pub mod key;
mod layer;
pub mod store;

pub use body::CacheBody;
pub use layer::{
    Cache, CacheBuilder, CacheLayer, ResponseFuture, X_TOLLGATE_CACHE, X_TOLLGATE_CACHE_TTL,
};
