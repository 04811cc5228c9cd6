//! Failover across ordered LLM backends.
//!
//! **Status: not built yet.** This crate holds only its documentation until the failover
//! issue lands; nothing here works yet, and nothing pretends to.
//!
//! What it will hold:
//!
//! - `FailoverLayer` / `Failover`: an ordered list of backends, each its own service stack
//!   with its own credentials, limits and retries; a request moves on after a 429, a
//!   Tollgate refusal, a 5xx, a timeout or a connect error, with the `model` rewritten for
//!   each backend.
//! - Cooldown of a failing backend (for the server's hint when it gives one), a half-open
//!   trial, and recovery, shared by every clone of the service.
//! - Failover only before the first byte of a streamed answer reaches the caller.
