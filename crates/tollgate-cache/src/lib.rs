//! A response cache for LLM API calls.
//!
//! **Status: not built yet.** This crate holds only its documentation until the cache
//! issue lands; nothing here works yet, and nothing pretends to.
//!
//! What it will hold:
//!
//! - `CacheLayer`: the key is a cryptographic hash of the method, the path, the canonical
//!   JSON body and the partition (the tenant or API key by default, so one tenant never
//!   receives another's answer).
//! - Storage in `moka` with TTLs and a size bound, behind a store trait the Redis store
//!   also implements; single-flight for identical requests in flight.
//! - Streamed answers recorded as they pass and replayed as SSE on a hit.
