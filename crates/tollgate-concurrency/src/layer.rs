//! [`ConcurrencyLayer`], its builder, and the places it counts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tollgate_core::key::{Global, Key, KeyExtractor, RequestHead};
use tollgate_core::meter::Knobs;
use tollgate_core::refusal::{LimitKind, QuotaState, Reason, Refusal};
use tollgate_core::wait::{Admit, Denial, WaitQueue};
use tower::Layer;

use crate::service::Concurrency;

/// A limit on requests in flight: a name (for headers, logs and errors — never the key),
/// how many at once, and whose places a request takes (one global pool by default).
#[derive(Clone)]
pub struct InFlight {
    name: Arc<str>,
    max: u32,
    key: Arc<dyn KeyExtractor>,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("name", &self.name)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl InFlight {
    /// At most `max` requests in flight at once (0 lets none through).
    pub fn new(name: impl Into<Arc<str>>, max: u32) -> Self {
        Self {
            name: name.into(),
            max,
            key: Arc::new(Global),
        }
    }

    /// `max` per key `extractor` names (a request it cannot name takes the places of
    /// `unkeyed`).
    pub fn keyed_by(mut self, extractor: impl KeyExtractor) -> Self {
        self.key = Arc::new(extractor);
        self
    }

    pub(crate) fn key_for(&self, head: &RequestHead<'_>) -> Key {
        self.key
            .extract(head)
            .unwrap_or_else(|| Key::new("unkeyed"))
    }
}

/// The places taken, per key: what the wait queue admits against.
pub(crate) struct Places {
    pub(crate) limit: InFlight,
    taken: Mutex<HashMap<Key, u32>>,
}

impl Places {
    fn taken(&self) -> std::sync::MutexGuard<'_, HashMap<Key, u32>> {
        // Each section is an addition; a panic elsewhere leaves the map whole.
        self.taken.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Places `key` holds now.
    pub(crate) fn held(&self, key: &Key) -> u32 {
        self.taken().get(key).copied().unwrap_or(0)
    }

    /// Gives one place of `key` back.
    pub(crate) fn release(&self, key: &Key) {
        let mut taken = self.taken();
        if let Some(n) = taken.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                taken.remove(key);
            }
        }
    }
}

impl Admit for Places {
    type Ticket = Key;

    fn try_admit(&self, key: &Key) -> Result<(), (usize, Denial)> {
        if self.limit.max == 0 {
            return Err((0, Denial::Never));
        }
        let mut taken = self.taken();
        let n = taken.entry(key.clone()).or_insert(0);
        if *n < self.limit.max {
            *n += 1;
            Ok(())
        } else {
            Err((0, Denial::Held))
        }
    }

    fn refund(&self, key: &Key) {
        self.release(key);
    }

    fn shares(&self, a: &Key, b: &Key) -> bool {
        a == b
    }

    fn pace(&self, _: &Key) -> Duration {
        Duration::ZERO
    }

    fn refusal(&self, key: &Key, _: usize, _: Option<Duration>, reason: Reason) -> Refusal {
        // When a place frees nobody can say; a second is a fair time to try again.
        let retry = (reason != Reason::TooLarge).then_some(Duration::from_secs(1));
        Refusal::new(LimitKind::Concurrency, Arc::clone(&self.limit.name), retry)
            .with_reason(reason)
            .with_key(key.clone())
            .with_quota(QuotaState {
                limit: u64::from(self.limit.max),
                window: Duration::from_secs(1),
                remaining: 0,
            })
    }
}

/// Limits requests in flight; see the [crate docs](crate).
#[derive(Clone)]
pub struct ConcurrencyLayer {
    pub(crate) queue: Arc<WaitQueue<Places>>,
    pub(crate) knobs: Arc<Knobs<()>>,
}

impl std::fmt::Debug for ConcurrencyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConcurrencyLayer")
            .field("limit", &self.queue.admitter().limit)
            .finish_non_exhaustive()
    }
}

impl ConcurrencyLayer {
    /// At most `limit`'s places in flight, refusing past them.
    pub fn new(limit: InFlight) -> Self {
        Self::builder().limit(limit).build()
    }

    /// A builder: the limit, refuse or wait, priorities, fair share, a clock.
    pub fn builder() -> ConcurrencyBuilder {
        ConcurrencyBuilder {
            limit: InFlight::new("concurrency", u32::MAX),
            knobs: Knobs::default(),
        }
    }

    /// Requests of `key` in flight now.
    pub fn in_flight(&self, key: &Key) -> u32 {
        self.queue.admitter().held(key)
    }

    /// Requests waiting for a place now.
    pub fn waiting(&self) -> usize {
        self.queue.waiting()
    }
}

impl<S> Layer<S> for ConcurrencyLayer {
    type Service = Concurrency<S>;
    fn layer(&self, inner: S) -> Concurrency<S> {
        Concurrency {
            inner,
            queue: Arc::clone(&self.queue),
            knobs: Arc::clone(&self.knobs),
        }
    }
}

/// Builds a [`ConcurrencyLayer`].
pub struct ConcurrencyBuilder {
    limit: InFlight,
    knobs: Knobs<()>,
}

impl std::fmt::Debug for ConcurrencyBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConcurrencyBuilder")
            .field("limit", &self.limit)
            .field("knobs", &self.knobs)
            .finish()
    }
}

impl ConcurrencyBuilder {
    /// The limit (one per layer; stack layers for several).
    pub fn limit(mut self, limit: InFlight) -> Self {
        self.limit = limit;
        self
    }

    tollgate_core::meter_wait_methods!("limit");

    /// The layer.
    pub fn build(self) -> ConcurrencyLayer {
        let places = Places {
            limit: self.limit,
            taken: Mutex::new(HashMap::new()),
        };
        ConcurrencyLayer {
            queue: Arc::new(WaitQueue::new(
                places,
                self.knobs.mode,
                self.knobs.clock.clone(),
            )),
            knobs: Arc::new(self.knobs),
        }
    }
}
