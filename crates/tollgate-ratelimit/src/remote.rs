//! Limits kept in a shared store (Redis), with this instance's share in process for when
//! the store cannot answer.

use std::sync::Arc;

use tokio::time::Instant;
use tollgate_core::key::Key;
use tollgate_core::store::{OnStoreFailure, RateCell, RateStore, StoreHealth};

use crate::shared::{Keys, Limits};

/// The shared store of a layer, and what to do without it.
pub(crate) struct Remote {
    pub(crate) store: Arc<dyn RateStore>,
    pub(crate) on_failure: OnStoreFailure,
    pub(crate) health: StoreHealth,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("on_failure", &self.on_failure)
            .finish_non_exhaustive()
    }
}

impl Remote {
    pub(crate) fn new(store: Arc<dyn RateStore>, on_failure: OnStoreFailure, now: Instant) -> Self {
        Self {
            store,
            on_failure,
            health: StoreHealth::new(now),
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
