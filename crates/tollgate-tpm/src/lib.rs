//! A tokens-per-interval budget for tower services calling LLM APIs.
//!
//! **Status: not built yet.** This crate holds only its documentation until the TPM
//! issue lands; nothing here works yet, and nothing pretends to.
//!
//! What it will hold:
//!
//! - `TpmLayer`: before the call, estimate the request's cost (prompt tokens counted with
//!   the model's tokenizer, plus the most it may generate) and reserve it from one or more
//!   keyed budgets, all or nothing; refuse or wait like the rate limiter.
//! - After the call, read the real `usage` from the response body as it passes (JSON or
//!   SSE, never buffering the stream, using `tollgate-core`'s usage scanners) and settle:
//!   give back what was over-reserved, take what was under-reserved.
//! - An adaptive mode that reads `x-ratelimit-remaining-tokens` / `-reset-tokens`.
