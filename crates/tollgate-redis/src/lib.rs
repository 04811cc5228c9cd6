//! Redis-backed stores for Tollgate, so many instances share one quota.
//!
//! **Status: not built yet.** This crate holds only its documentation until the Redis
//! issue lands; nothing here works yet, and nothing pretends to.
//!
//! What it will hold:
//!
//! - Stores behind `tollgate-core`'s store traits for the GCRA limiter, the token budget
//!   and the response cache: one Lua script call per decision, timed by the Redis server's
//!   clock, with keys that are namespaced, hashed and expiring.
//! - A stated behaviour when Redis is unreachable: fail closed, or fail open with a local
//!   per-instance share of the quota; automatic recovery.
//! - A pooled mode in which each instance borrows a slice of the quota and spends it
//!   locally.
//!
//! Tests of this crate read `REDIS_URL`; without it they skip with a message, unless
//! `TOLLGATE_REQUIRE_REDIS=1` is set (as CI does), in which case they fail.
