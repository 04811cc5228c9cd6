//! What the provider has seen, for tests to assert on.

use serde::Serialize;

/// Counters for one API key, or for all of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Requests received (every one, whatever its answer).
    pub requests: u64,
    /// Answered 200.
    pub ok: u64,
    /// Answered 429 for being over RPM or TPM.
    pub rate_limited: u64,
    /// Faults injected (errors, resets, cuts, malformed bodies; slow answers not counted).
    pub faults: u64,
    /// Answered 4xx for a bad request.
    pub bad_requests: u64,
    /// Prompt tokens of the requests answered 200.
    pub prompt_tokens: u64,
    /// Completion tokens of the answers sent with 200.
    pub completion_tokens: u64,
}

impl Stats {
    /// Prompt plus completion tokens served: what TPM counts.
    pub fn tokens_served(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    pub(crate) fn add(&mut self, other: &Stats) {
        self.requests += other.requests;
        self.ok += other.ok;
        self.rate_limited += other.rate_limited;
        self.faults += other.faults;
        self.bad_requests += other.bad_requests;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
    }
}
