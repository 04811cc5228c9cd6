//! Requests-per-interval limiting for tower services.
//!
//! **Status: not built yet.** This crate holds only its documentation until the
//! rate-limiter issue lands; nothing here works yet, and nothing pretends to.
//!
//! What it will hold:
//!
//! - `RateLimitLayer` / `RateLimit<S>`: GCRA through [`governor`], with quotas written in
//!   the units people think in (`Quota::per_minute(3000)`, burst stated apart), keyed by
//!   the key extractors of `tollgate-core` (tenant, API key, model, global, closure).
//!   Several limits can apply to one request; a request passes only when all admit it.
//! - Two modes: **refuse** (the core refusal: a 429 with `Retry-After` and `RateLimit`
//!   headers on a server, a typed error in a client stack) and **wait** (a bounded,
//!   prioritised queue, up to `max_wait`, released in order rather than all at once).
//! - State shared by every clone of the service, bounded memory for many keys, and an
//!   adaptive mode that reads the provider's `x-ratelimit-remaining-requests`.
//!
//! [`governor`]: https://docs.rs/governor
