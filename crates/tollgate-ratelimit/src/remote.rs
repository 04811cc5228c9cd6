//! Limits kept in a shared store (Redis), with this instance's share in process for when
//! the store cannot answer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tollgate_core::clock::Clock;
use tollgate_core::key::Key;
use tollgate_core::store::{OnStoreFailure, RateCell, RateStore};

use crate::shared::{Keys, Limits};

/// After the store fails, requests go straight to the failure policy for this long; then
/// one is sent to the store again, so recovery follows within a second of its return.
pub(crate) const RETRY_STORE_AFTER: Duration = Duration::from_millis(500);

/// The shared store of a layer, and what to do without it.
pub(crate) struct Remote {
    pub(crate) store: Arc<dyn RateStore>,
    pub(crate) on_failure: OnStoreFailure,
    /// When the store failed last, in ms after `epoch`; 0 when it is healthy.
    down_since_ms: AtomicU64,
    /// Whether a request is probing the store while it is marked down.
    probing: AtomicBool,
    epoch: Instant,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("on_failure", &self.on_failure)
            .finish_non_exhaustive()
    }
}

/// Where a request goes for its cells.
pub(crate) enum Route {
    /// To the store.
    Store,
    /// The store is down: apply the failure policy at once.
    Down,
}

impl Remote {
    pub(crate) fn new(store: Arc<dyn RateStore>, on_failure: OnStoreFailure, now: Instant) -> Self {
        Self {
            store,
            on_failure,
            down_since_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            epoch: now,
        }
    }

    fn ms(&self, now: Instant) -> u64 {
        // Never 0, which means "healthy".
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Whether this request should ask the store: always while it is healthy; once it has
    /// been down for [`RETRY_STORE_AFTER`], one request at a time, to see if it is back.
    pub(crate) fn route(&self, clock: &dyn Clock) -> Route {
        let since = self.down_since_ms.load(Ordering::Acquire);
        if since == 0 {
            return Route::Store;
        }
        let retry_at = since.saturating_add(RETRY_STORE_AFTER.as_millis() as u64);
        if self.ms(clock.now()) >= retry_at
            && self
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return Route::Store;
        }
        Route::Down
    }

    /// The store answered.
    pub(crate) fn answered(&self) {
        if self.down_since_ms.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!("the shared rate-limit store answers again");
        }
        self.probing.store(false, Ordering::Release);
    }

    /// The store failed.
    pub(crate) fn failed(&self, clock: &dyn Clock, error: &dyn std::fmt::Display) {
        let was = self
            .down_since_ms
            .swap(self.ms(clock.now()), Ordering::AcqRel);
        self.probing.store(false, Ordering::Release);
        if was == 0 {
            tracing::warn!(%error, policy = ?self.on_failure, "the shared rate-limit store failed");
        }
    }
}

/// The cells of a request: one per limit, named by the limit and the key.
pub(crate) fn cells(limits: &Limits, keys: &Keys) -> Arc<[RateCell]> {
    limits
        .limits
        .iter()
        .zip(keys.iter())
        .map(|(l, k)| RateCell {
            key: Key::prefixed(&l.limit.name, k.as_str()),
            interval: l.limit.quota.interval(),
            burst: l.limit.quota.burst_size(),
        })
        .collect()
}
