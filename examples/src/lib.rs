//! Runnable examples of Tollgate, one file each at the top of this folder:
//!
//! | example | what it shows |
//! | --- | --- |
//! | `demo` | the main job: a burst from five tenants through the stack `tollgate.yaml` describes, against simulated providers with limits, faults and an outage, beside the naive retry loop |
//! | `simulated_provider` | the simulated provider's limits and headers, read with `tollgate-core` |
//! | `axum_tenant_limit` | an axum server limiting each tenant in refuse mode: 429 with `Retry-After` and `RateLimit` |
//! | `client_wait` | a client in wait mode against the simulated provider: no 429 reaches the caller, where a naive client gets 70 |
//!
//! Run one with `cargo run --example NAME` from the workspace root (`--release` for the
//! demo). `tollgate.yaml` here is the annotated policy the demo builds its stack from. This library holds no
//! code; it exists because a Cargo package needs a library or binary beside its examples.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
