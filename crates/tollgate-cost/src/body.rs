//! The answer's body: read for its usage as it passes, settled at its end.

use std::sync::Arc;

use bytes::Bytes;
use tollgate_core::body::{Watched, Watcher};
use tollgate_core::key::Key;
use tollgate_core::usage::UsageScanner;

use crate::layer::Shared;
use crate::price::{Money, Price};
use crate::service::Held;

/// The body of an answer through [`Cost`](crate::Cost).
pub type CostBody<B> = Watched<B, Settle>;

/// A hold to settle: with the answer's usage when its body ends, with the whole hold if
/// it is dropped before (the provider counted some of it; nobody can say how much).
pub struct Settle {
    pub(crate) shared: Arc<Shared>,
    pub(crate) place: Held,
    pub(crate) keys: Vec<Key>,
    pub(crate) held: Money,
    pub(crate) price: Price,
    /// What the prompt alone costs.
    pub(crate) prompt: Money,
    pub(crate) scanner: Option<UsageScanner>,
}

impl std::fmt::Debug for Settle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settle")
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

impl Settle {
    /// Settles every budget's hold with `cost`, now.
    pub(crate) fn now(mut self, cost: Money) {
        self.settle(cost);
    }

    fn settle(&mut self, cost: Money) {
        match std::mem::replace(&mut self.place, Held::Local) {
            Held::Local => {
                let now = self.shared.now();
                for (l, k) in self.shared.ledgers.iter().zip(&self.keys) {
                    l.settle(k, self.held, cost, now);
                }
            }
            Held::Store(guard, cells) => {
                // Off the answer's path; a settlement that cannot reach the store leaves
                // the hold until the window's key expires (a day after the window).
                let call = guard.store().settle(cells, self.held.nanos(), cost.nanos());
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        rt.spawn(async move {
                            if let Err(e) = call.await {
                                tracing::warn!(error = %e, "a cost budget's settlement did not reach the store");
                            }
                        });
                    }
                    Err(_) => tracing::warn!("a cost budget's settlement had no runtime to run on"),
                }
            }
        }
        self.held = Money::ZERO;
        self.keys.clear();
    }
}

impl Watcher for Settle {
    fn data(&mut self, chunk: Bytes) -> Bytes {
        if let Some(s) = self.scanner.as_mut() {
            s.feed(&chunk);
        }
        chunk
    }

    fn complete(&mut self) -> Bytes {
        let usage = self.scanner.take().and_then(UsageScanner::finish);
        // No usage in the answer: the hold stands as spent.
        let cost = usage.map_or(self.held, |u| self.price.cost(&u));
        self.settle(cost);
        Bytes::new()
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        if !self.keys.is_empty() {
            let held = self.held;
            self.settle(held);
        }
    }
}
