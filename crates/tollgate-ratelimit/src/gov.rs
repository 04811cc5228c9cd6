//! The seams between governor and Tollgate: a governor clock over the core clock, and a
//! shared keyed state store that can give a cell back.

use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock as GovernorClock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::StateStore;
use tokio::time::Instant;
use tollgate_core::clock::{Clock, SharedClock};
use tollgate_core::key::Key;

/// governor's view of the core clock: nanoseconds since the clock's epoch. Because it
/// reads [`SharedClock`], tokio's paused clock (and [`ManualClock`]) drive governor too;
/// governor's own `until_ready` (which sleeps on another timer) is never used.
///
/// [`ManualClock`]: tollgate_core::clock::ManualClock
#[derive(Clone, Debug)]
pub(crate) struct GovClock {
    clock: SharedClock,
    epoch: Instant,
}

impl GovClock {
    pub(crate) fn new(clock: SharedClock) -> Self {
        let epoch = clock.now();
        Self { clock, epoch }
    }

    /// The core clock's reading.
    pub(crate) fn instant(&self) -> Instant {
        self.clock.now()
    }

    pub(crate) fn to_nanos(&self, at: Instant) -> Nanos {
        Nanos::from(at.saturating_duration_since(self.epoch))
    }
}

impl GovernorClock for GovClock {
    type Instant = Nanos;
    fn now(&self) -> Nanos {
        self.to_nanos(self.clock.now())
    }
}

/// A keyed state store shared between the governor limiter and the code that gives cells
/// back. governor cannot refund (governor#152), but its stores expose
/// `measure_and_replace`: moving a key's theoretical arrival time back by one emission
/// interval is exactly the refund of one cell in GCRA, whatever happened in between.
#[derive(Clone, Debug, Default)]
pub(crate) struct Store(Arc<DashMapStateStore<Key>>);

impl StateStore for Store {
    type Key = Key;
    fn measure_and_replace<T, F, E>(&self, key: &Key, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<Key> for Store {
    fn retain_recent(&self, drop_below: Nanos) {
        self.0.retain_recent(drop_below);
    }
    fn shrink_to_fit(&self) {
        ShrinkableKeyedStateStore::shrink_to_fit(&*self.0);
    }
    fn len(&self) -> usize {
        ShrinkableKeyedStateStore::len(&*self.0)
    }
    fn is_empty(&self) -> bool {
        ShrinkableKeyedStateStore::is_empty(&*self.0)
    }
}

impl Store {
    /// Gives back one cell of `interval` to `key`.
    pub(crate) fn refund(&self, key: &Key, interval: Duration) {
        let t = Nanos::from(interval);
        let _ = self.measure_and_replace(key, |tat| {
            Ok::<_, ()>(((), tat.unwrap_or_else(|| Nanos::from(0)).saturating_sub(t)))
        });
    }

    /// Moves `key`'s theoretical arrival time to at least `floor`.
    pub(crate) fn raise_to(&self, key: &Key, floor: Nanos) {
        let _ = self.measure_and_replace(key, |tat| {
            Ok::<_, ()>(((), tat.map_or(floor, |t| t.max(floor))))
        });
    }
}

/// The governor limiter Tollgate uses: keyed by [`Key`], over the shared store, on the
/// core clock.
pub(crate) type Limiter = governor::RateLimiter<Key, Store, GovClock, NoOpMiddleware<Nanos>>;
