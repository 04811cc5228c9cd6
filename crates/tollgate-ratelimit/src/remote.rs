//! Limits kept in a shared store (Redis), with this instance's share in process for when
//! the store cannot answer.

use std::sync::Arc;

use tokio::time::Instant;
use tollgate_core::key::Key;
use tollgate_core::store::{OnStoreFailure, RateCell, RateStore, StoreHealth};

use crate::quota::Quota;
use crate::shared::{Keys, Limits};

/// The shared store of a layer, and what to do without it.
pub(crate) struct Remote {
    pub(crate) store: Arc<dyn RateStore>,
    pub(crate) on_failure: OnStoreFailure,
    pub(crate) health: StoreHealth,
    /// Each limit's whole quota, as the store keeps it: the limits in process hold only
    /// this instance's share when failing open.
    pub(crate) quotas: Vec<Quota>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("on_failure", &self.on_failure)
            .finish_non_exhaustive()
    }
}

impl Remote {
    pub(crate) fn new(
        store: Arc<dyn RateStore>,
        on_failure: OnStoreFailure,
        now: Instant,
        quotas: Vec<Quota>,
    ) -> Self {
        Self {
            store,
            on_failure,
            health: StoreHealth::new(now),
            quotas,
        }
    }
}

/// The cells of a request: one per limit, named by the limit and the key.
pub(crate) fn cells(remote: &Remote, limits: &Limits, keys: &Keys) -> Arc<[RateCell]> {
    limits
        .limits
        .iter()
        .zip(&remote.quotas)
        .zip(keys.iter())
        .map(|((l, q), k)| RateCell {
            key: Key::prefixed(&l.limit.name, k.as_str()),
            interval: q.interval(),
            burst: q.burst_size(),
        })
        .collect()
}
