//! [`BatchLayer`] and its builder.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tollgate_core::clock::{Clock, SharedClock};
use tower::Layer;

use crate::service::{Batch, Group};

/// Counts an input's tokens (for the batch's token cap and each caller's share of usage).
pub(crate) type Counter = Arc<dyn Fn(&str) -> u64 + Send + Sync>;

pub(crate) struct Settings {
    pub(crate) max_delay: Duration,
    pub(crate) max_items: usize,
    pub(crate) max_input_tokens: u64,
    pub(crate) count: Counter,
    pub(crate) clock: SharedClock,
    pub(crate) body_limit: usize,
}

/// Gathers concurrent embeddings requests into one provider call; see the
/// [crate docs](crate).
#[derive(Clone)]
pub struct BatchLayer {
    pub(crate) settings: Arc<Settings>,
    pub(crate) groups: Arc<Mutex<HashMap<String, Group>>>,
}

impl std::fmt::Debug for BatchLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchLayer")
            .field("max_delay", &self.settings.max_delay)
            .field("max_items", &self.settings.max_items)
            .finish_non_exhaustive()
    }
}

impl BatchLayer {
    /// A builder: 5 ms, 2,048 items, 300,000 input tokens, a token every four bytes.
    pub fn builder() -> BatchBuilder {
        BatchBuilder {
            max_delay: Duration::from_millis(5),
            max_items: 2048,
            max_input_tokens: 300_000,
            count: Arc::new(|text: &str| (text.len() as u64).div_ceil(4).max(1)),
            clock: SharedClock::default(),
            body_limit: tollgate_core::facts::DEFAULT_BODY_LIMIT,
        }
    }
}

impl<S> Layer<S> for BatchLayer {
    type Service = Batch<S>;
    fn layer(&self, inner: S) -> Batch<S> {
        Batch {
            inner,
            settings: Arc::clone(&self.settings),
            groups: Arc::clone(&self.groups),
        }
    }
}

/// Builds a [`BatchLayer`].
pub struct BatchBuilder {
    max_delay: Duration,
    max_items: usize,
    max_input_tokens: u64,
    count: Counter,
    clock: SharedClock,
    body_limit: usize,
}

impl std::fmt::Debug for BatchBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchBuilder")
            .field("max_delay", &self.max_delay)
            .field("max_items", &self.max_items)
            .field("max_input_tokens", &self.max_input_tokens)
            .finish_non_exhaustive()
    }
}

impl BatchBuilder {
    /// How long the first request of a group waits for others (5 ms by default).
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.max_delay = d;
        self
    }

    /// The most inputs in one call (2,048 by default, the OpenAI limit; at least 1).
    pub fn max_items(mut self, n: usize) -> Self {
        self.max_items = n.clamp(1, 2048);
        self
    }

    /// The most input tokens in one call (300,000 by default, OpenAI's).
    pub fn max_input_tokens(mut self, n: u64) -> Self {
        self.max_input_tokens = n.max(1);
        self
    }

    /// How an input's tokens are counted (a token every four bytes by default; give
    /// the model's encoding, `tollgate_tpm`'s counter, for exact shares of `usage`).
    pub fn count(mut self, f: impl Fn(&str) -> u64 + Send + Sync + 'static) -> Self {
        self.count = Arc::new(f);
        self
    }

    /// The clock the window is kept on (tokio's by default).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = SharedClock::new(clock);
        self
    }

    /// The largest request body read (the core default).
    pub fn body_limit(mut self, n: usize) -> Self {
        self.body_limit = n;
        self
    }

    /// The layer.
    pub fn build(self) -> BatchLayer {
        BatchLayer {
            settings: Arc::new(Settings {
                max_delay: self.max_delay,
                max_items: self.max_items,
                max_input_tokens: self.max_input_tokens,
                count: self.count,
                clock: self.clock,
                body_limit: self.body_limit,
            }),
            groups: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}
