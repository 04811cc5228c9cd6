//! [`TpmLayer`], its builder, and the [`Tpm`] service.

use std::fmt;
use std::sync::Arc;

use tollgate_core::facts::DEFAULT_BODY_LIMIT;
use tollgate_core::key::Key;
use tollgate_core::wait::{PriorityExtractor, ShareExtractor, WaitQueue};
use tower::Layer;

use crate::budget::{Budget, Budgets, Ledger, TokenQuota};
use crate::estimate::Estimator;
use crate::service::Tpm;
use tollgate_core::meter::{Guarded, Knobs};
use tollgate_core::store::TokenStore;

pub(crate) struct Shared {
    pub(crate) queue: Arc<WaitQueue<Budgets>>,
    pub(crate) estimator: Estimator,
    pub(crate) priority: Arc<dyn PriorityExtractor>,
    pub(crate) share: Arc<dyn ShareExtractor>,
    pub(crate) body_limit: usize,
    pub(crate) adaptive: bool,
    /// Some budget learns its quota from the provider.
    pub(crate) learn: bool,
    pub(crate) remote: Option<Remote>,
}

/// The shared store of a layer behind its guard, and each budget's whole quota as the
/// store keeps it (the ledgers in process hold only this instance's share when failing
/// open).
pub(crate) struct Remote {
    pub(crate) guard: Arc<Guarded<dyn TokenStore>>,
    pub(crate) quotas: Vec<TokenQuota>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("budgets", self.queue.admitter())
            .field("estimator", &self.estimator)
            .finish_non_exhaustive()
    }
}

/// Applies one or more token [`Budget`]s to every request; see the [crate docs](crate).
/// Every service it makes, and every clone of those, draws on the same budgets.
#[derive(Clone, Debug)]
pub struct TpmLayer {
    shared: Arc<Shared>,
}

impl TpmLayer {
    /// One budget, refusing what is over it.
    pub fn new(budget: Budget) -> Self {
        Self::builder().budget(budget).build()
    }

    /// A builder.
    pub fn builder() -> TpmBuilder {
        TpmBuilder {
            budgets: Vec::new(),
            estimator: Estimator::default(),
            body_limit: DEFAULT_BODY_LIMIT,
            knobs: Knobs::default(),
        }
    }

    /// Tokens the budget named `budget` holds for `key` now (negative while in debt), or
    /// `None` when there is no such budget.
    pub fn available(&self, budget: &str, key: &Key) -> Option<i64> {
        self.ledger(budget).map(|l| l.available(key))
    }

    fn ledger(&self, budget: &str) -> Option<&Ledger> {
        self.shared
            .queue
            .admitter()
            .ledgers
            .iter()
            .find(|l| l.budget.name() == budget)
    }

    /// The quota in force for the budget named `budget`: the configured one, or the one a
    /// learning budget ([`Budget::learned`], [`Budget::learn`]) took from the provider's
    /// answers; `None` for a budget of another name, or one that knows no quota yet.
    pub fn quota(&self, budget: &str) -> Option<TokenQuota> {
        self.ledger(budget).and_then(Ledger::quota)
    }

    /// How many keys the budgets hold state for.
    pub fn keys(&self) -> usize {
        self.shared
            .queue
            .admitter()
            .ledgers
            .iter()
            .map(Ledger::len)
            .sum()
    }

    /// How many requests are waiting for tokens now.
    pub fn waiting(&self) -> usize {
        self.shared.queue.waiting()
    }

    /// Drops the state of every key whose bucket is full again (the layer does this on a
    /// schedule by itself; see [`TpmBuilder::housekeeping`]).
    pub fn retain_recent(&self) {
        for l in &self.shared.queue.admitter().ledgers {
            l.retain_recent();
        }
    }
}

impl<S> Layer<S> for TpmLayer {
    type Service = Tpm<S>;
    fn layer(&self, inner: S) -> Tpm<S> {
        Tpm::new(inner, Arc::clone(&self.shared))
    }
}

/// Builds a [`TpmLayer`].
pub struct TpmBuilder {
    budgets: Vec<Budget>,
    estimator: Estimator,
    body_limit: usize,
    knobs: Knobs<dyn TokenStore>,
}

impl fmt::Debug for TpmBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TpmBuilder")
            .field("budgets", &self.budgets)
            .field("knobs", &self.knobs)
            .finish_non_exhaustive()
    }
}

impl TpmBuilder {
    /// Adds a budget. A request passes only when every budget holds its estimate, and
    /// takes from none of them when one refuses.
    pub fn budget(mut self, budget: Budget) -> Self {
        self.budgets.push(budget);
        self
    }

    /// How requests are estimated (exact counting and a 1024-token default output
    /// unless changed).
    pub fn estimator(mut self, estimator: Estimator) -> Self {
        self.estimator = estimator;
        self
    }

    tollgate_core::meter_builder_methods!(TokenStore, "budget");

    /// The largest request body the layer buffers to estimate (10 MiB by default); larger
    /// ones are refused with 413.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// The layer.
    pub fn build(self) -> TpmLayer {
        let knobs = self.knobs;
        let adaptive = self.budgets.iter().any(Budget::is_adaptive);
        let learn = self.budgets.iter().any(Budget::learns);
        let share = knobs.share();
        let quotas: Vec<TokenQuota> = self.budgets.iter().map(Budget::quota).collect();
        let ledgers = self
            .budgets
            .into_iter()
            .map(|b| Ledger::new(b.shared_by(share), knobs.clock.clone()))
            .collect();
        let queue = Arc::new(WaitQueue::new(
            Budgets { ledgers },
            knobs.mode,
            knobs.clock.clone(),
        ));
        knobs.spawn_housekeeping(&queue, |q: &WaitQueue<Budgets>| {
            for l in &q.admitter().ledgers {
                l.retain_recent();
            }
        });
        TpmLayer {
            shared: Arc::new(Shared {
                queue,
                estimator: self.estimator,
                priority: Arc::clone(&knobs.priority),
                share: Arc::clone(&knobs.share),
                body_limit: self.body_limit,
                adaptive,
                learn,
                remote: knobs.guarded("tpm").map(|guard| Remote { guard, quotas }),
            }),
        }
    }
}
