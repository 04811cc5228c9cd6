//! The Tollgate gateway: an OpenAI-compatible proxy built from a policy file.
//!
//! **Status: not built yet.** This crate holds only its documentation; the binary
//! `tollgate` arrives with the gateway issue.
//!
//! What it will hold: a binary that reads a YAML policy, builds the Tollgate stack in
//! front of one or more providers, serves the OpenAI-compatible API, exposes `/metrics`
//! and a live dashboard.
