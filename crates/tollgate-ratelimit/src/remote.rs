//! Limits kept in a shared store (Redis), with this instance's share in process for when
//! the store cannot answer: core's guarded store call, over the limits' cells.

use std::sync::Arc;

use tollgate_core::key::Key;
use tollgate_core::meter::Guarded;
use tollgate_core::store::{RateCell, RateStore};

use crate::quota::Quota;
use crate::shared::{Keys, Limits};

/// The shared store of a layer, and each limit's whole quota as the store keeps it (the
/// limits in process hold only this instance's share when failing open).
#[derive(Debug)]
pub(crate) struct Remote {
    pub(crate) guard: Arc<Guarded<dyn RateStore>>,
    pub(crate) quotas: Vec<Quota>,
}

/// The cells of a request: one per limit, named by the limit and the key.
pub(crate) fn cells(remote: &Remote, limits: &Limits, keys: &Keys) -> Arc<[RateCell]> {
    limits
        .limits
        .iter()
        .zip(&remote.quotas)
        .zip(keys.iter())
        .map(|((l, q), k)| RateCell {
            key: Key::prefixed(l.limit.name(), k.as_str()),
            interval: q.interval(),
            burst: q.burst_size(),
        })
        .collect()
}
