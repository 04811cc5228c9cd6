//! Tower middleware for programs that call rate-limited LLM APIs, and for the gateways in
//! front of them.
//!
//! **Status: the facade is not built yet.** Today this crate holds only its documentation;
//! the shared vocabulary lives in `tollgate-core` and the simulated provider in
//! `tollgate-testkit`.
//!
//! What it will hold: each layer re-exported behind a Cargo feature (`ratelimit`, `tpm`,
//! `retry`, `cache`, `failover`, `redis`), a `ServiceBuilder` extension so a stack reads
//! `ServiceBuilder::new().tollgate_cache(..).tollgate_retry(..)`, and a serde `Policy` type
//! that builds the documented stack from a YAML or TOML policy file.
