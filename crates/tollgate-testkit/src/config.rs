//! How the simulated provider behaves: its limits, its pace, its faults.

use std::time::Duration;

/// Faults the provider injects into a share of requests, drawn at random (seeded), before
/// any quota is spent: a faulted request costs no quota, like a failure in front of the
/// model. A request can also ask for one with the header `x-testkit-fault`.
///
/// | `x-testkit-fault` | what happens |
/// | --- | --- |
/// | `500`, `503`, `529`, any status | that status, with an OpenAI error body |
/// | `reset` | the connection is closed without an answer |
/// | `slow` or `slow=250ms` | the answer waits (default [`Faults::slow_first_byte`]) before its first byte |
/// | `cut` | the body stops halfway and the connection is closed |
/// | `malformed` | a 200 whose JSON (or SSE event) is broken |
/// | `429` | a 429 `rate_limit_exceeded` with `Retry-After: 1` and `retry-after-ms: 100`, as a provider over a quota the caller cannot see answers |
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Faults {
    /// Share of requests answered 500 or 503 (half each).
    pub server_error_rate: f64,
    /// Share of requests answered 503 alone, as a provider that is down answers.
    pub unavailable_rate: f64,
    /// Share of connections closed without an answer.
    pub reset_rate: f64,
    /// Share of answers delayed by [`slow_first_byte`](Self::slow_first_byte).
    pub slow_rate: f64,
    /// The delay of a slow answer.
    pub slow_first_byte: Duration,
    /// Share of answers cut halfway through the body.
    pub cut_rate: f64,
    /// Share of answers with broken JSON.
    pub malformed_rate: f64,
    /// Share of requests answered 429 with a short `retry-after-ms` (100 ms), as a
    /// provider over a quota shared with callers the gateway cannot see.
    pub rate_limited_rate: f64,
}

/// The provider's settings. Build one with [`Provider::builder`](crate::Provider::builder).
#[derive(Clone, Debug)]
pub struct ProviderConfig {
    pub(crate) rpm: Option<u64>,
    pub(crate) tpm: Option<u64>,
    pub(crate) burst: Option<u64>,
    pub(crate) window: Duration,
    pub(crate) completion_tokens: u64,
    pub(crate) chunk_delay: Duration,
    pub(crate) tokens_per_chunk: u64,
    pub(crate) latency: Duration,
    pub(crate) faults: Faults,
    pub(crate) seed: u64,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self {
            rpm: None,
            tpm: None,
            burst: None,
            window: Duration::from_secs(60),
            completion_tokens: 16,
            chunk_delay: Duration::ZERO,
            tokens_per_chunk: 1,
            latency: Duration::ZERO,
            faults: Faults::default(),
            seed: 0x7011_6a7e,
        }
    }
}
