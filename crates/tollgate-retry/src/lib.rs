//! A retry policy for LLM API calls that obeys the server.
//!
//! **Status: not built yet.** This crate holds only its documentation until the retry
//! issue lands; nothing here works yet, and nothing pretends to.
//!
//! What it will hold:
//!
//! - A `tower::retry::Policy` and a `RetryLayer` that retry 429, 408, 5xx, 529, connection
//!   errors and Tollgate refusals, and return everything else at once; a gRPC flavour.
//! - Waits that follow the server's hint (`retry-after-ms`, `Retry-After`,
//!   `x-ratelimit-reset-*`, `grpc-retry-pushback-ms`, all parsed by `tollgate-core`),
//!   otherwise exponential backoff with jitter; caps on attempts, on the whole request's
//!   time and on the share of traffic spent on retries.
//! - Replay of buffered request bodies; a streamed response is retried only before its
//!   first byte reaches the caller.
