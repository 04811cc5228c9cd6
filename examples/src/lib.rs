//! Runnable examples of Tollgate, one file each at the top of this folder:
//!
//! | example | what it shows |
//! | --- | --- |
//! | `simulated_provider` | the simulated provider's limits and headers, read with `tollgate-core` |
//!
//! Run one with `cargo run --example NAME` from the workspace root. This library holds no
//! code; it exists because a Cargo package needs a library or binary beside its examples.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
