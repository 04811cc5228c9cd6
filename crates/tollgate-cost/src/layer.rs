//! [`CostLayer`] and its builder.

use std::sync::Arc;
use std::time::SystemTime;

use tollgate_core::clock::{Clock, SharedClock};
use tollgate_core::facts::RequestFacts;
use tollgate_core::key::Key;
use tollgate_core::meter::Guarded;
use tollgate_core::store::{CostStore, OnStoreFailure};
use tower::Layer;

use crate::budget::{CostBudget, Ledger, Standing};
use crate::price::Prices;
use crate::service::Cost;

/// What a request will use, before it is sent: its prompt tokens and the most it may
/// generate.
pub type Estimate = Arc<dyn Fn(&RequestFacts) -> (u64, u64) + Send + Sync>;

/// The output a request that states no `max_tokens` is assumed to reach, for the default
/// estimate.
pub const DEFAULT_MAX_OUTPUT: u64 = 1024;

pub(crate) struct Shared {
    pub(crate) ledgers: Vec<Ledger>,
    /// The shared store behind its guard, if any.
    pub(crate) remote: Option<Arc<Guarded<dyn CostStore>>>,
    pub(crate) prices: Prices,
    pub(crate) estimate: Estimate,
    pub(crate) clock: SharedClock,
    pub(crate) body_limit: usize,
}

impl Shared {
    pub(crate) fn now(&self) -> SystemTime {
        self.clock.system_now()
    }
}

/// Cost budgets over a service calling LLM APIs; see the [crate docs](crate).
#[derive(Clone)]
pub struct CostLayer {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for CostLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CostLayer")
            .field("budgets", &self.shared.ledgers.len())
            .finish_non_exhaustive()
    }
}

impl CostLayer {
    /// A builder.
    pub fn builder() -> CostBuilder {
        CostBuilder {
            budgets: Vec::new(),
            prices: Prices::new(),
            estimate: None,
            clock: SharedClock::default(),
            body_limit: tollgate_core::facts::DEFAULT_BODY_LIMIT,
            store: None,
        }
    }

    /// Where `key` stands in the budget named `budget` now.
    pub fn standing(&self, budget: &str, key: &Key) -> Option<Standing> {
        let now = self.shared.now();
        self.shared
            .ledgers
            .iter()
            .find(|l| l.budget.name() == budget)
            .map(|l| l.standing(key, now))
    }

    /// Whether the budgets are kept in a shared store (every instance spends one).
    pub fn is_shared(&self) -> bool {
        self.shared.remote.is_some()
    }

    /// Where `key` stands in the budget named `budget`, summed over every instance: read
    /// from the shared store when the layer has one (one round trip), else
    /// [`standing`](Self::standing). When the store cannot answer, this instance's own
    /// account is given.
    pub async fn standing_shared(&self, budget: &str, key: &Key) -> Option<Standing> {
        let now = self.shared.now();
        let ledger = self
            .shared
            .ledgers
            .iter()
            .find(|l| l.budget.name() == budget)?;
        if let Some(guard) = &self.shared.remote {
            let cells: Arc<[tollgate_core::store::CostCell]> = Arc::from([ledger.cell(key, now)]);
            match guard.store().standing(cells).await {
                Ok(all) => {
                    if let Some(pair) = all.first() {
                        return Some(ledger.standing_of(*pair, now));
                    }
                }
                Err(e) => tracing::debug!(error = %e, "a cost budget's standing could not be read"),
            }
        }
        Some(ledger.standing(key, now))
    }

    /// Drops the accounts of windows that are over (call it now and then; they are a few
    /// words each).
    pub fn retain_recent(&self) {
        let now = self.shared.now();
        for l in &self.shared.ledgers {
            l.retain_recent(now);
        }
    }
}

impl<S> Layer<S> for CostLayer {
    type Service = Cost<S>;
    fn layer(&self, inner: S) -> Cost<S> {
        Cost {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// Builds a [`CostLayer`].
pub struct CostBuilder {
    budgets: Vec<CostBudget>,
    prices: Prices,
    estimate: Option<Estimate>,
    clock: SharedClock,
    body_limit: usize,
    store: Option<(Arc<dyn CostStore>, OnStoreFailure)>,
}

impl std::fmt::Debug for CostBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CostBuilder")
            .field("budgets", &self.budgets)
            .finish_non_exhaustive()
    }
}

impl CostBuilder {
    /// Adds a budget: a request passes only when every budget holds its estimate.
    pub fn budget(mut self, budget: CostBudget) -> Self {
        self.budgets.push(budget);
        self
    }

    /// The price table.
    pub fn prices(mut self, prices: Prices) -> Self {
        self.prices = prices;
        self
    }

    /// How a request's tokens are estimated before it is sent: `(prompt, most output)`.
    /// By default a token every four bytes of the body, and its `max_tokens` (or
    /// [`DEFAULT_MAX_OUTPUT`]); give the token budget's exact estimator
    /// (`tollgate_tpm::estimate::Estimator`) where it is at hand.
    pub fn estimate(
        mut self,
        f: impl Fn(&RequestFacts) -> (u64, u64) + Send + Sync + 'static,
    ) -> Self {
        self.estimate = Some(Arc::new(f));
        self
    }

    /// The clock whose wall time places windows (tokio's by default, so a paused clock
    /// moves it).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = SharedClock::new(clock);
        self
    }

    /// The largest request body read to estimate it (the core default otherwise); larger
    /// ones are refused with a 413.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// Keeps the budgets in a shared store (Redis, from `tollgate-redis`), so every
    /// instance spends one budget: one store call to hold, one to settle. When the store
    /// cannot answer, `on_failure` says what happens: `Closed` refuses (a 503);
    /// `Open { instances }` goes on in process at this instance's share of each budget.
    /// `standing` then reports this instance's spend.
    pub fn store(mut self, store: impl CostStore, on_failure: OnStoreFailure) -> Self {
        self.store = Some((Arc::new(store), on_failure));
        self
    }

    /// The layer.
    pub fn build(self) -> CostLayer {
        let estimate = self.estimate.unwrap_or_else(|| {
            Arc::new(|facts: &RequestFacts| {
                (
                    (facts.body().len() as u64).div_ceil(4),
                    facts.max_output_tokens().unwrap_or(DEFAULT_MAX_OUTPUT),
                )
            })
        });
        let share = match self.store {
            Some((_, OnStoreFailure::Open { instances })) => u64::from(instances.max(1)),
            _ => 1,
        };
        let now = self.clock.now();
        let remote = self
            .store
            .map(|(store, on_failure)| Arc::new(Guarded::new(store, on_failure, now, "cost")));
        CostLayer {
            shared: Arc::new(Shared {
                // In process, each budget at this instance's share (the whole without a
                // store, or failing closed).
                ledgers: self
                    .budgets
                    .into_iter()
                    .map(|b| Ledger::new(b.shared_by(share)))
                    .collect(),
                remote,
                prices: self.prices,
                estimate,
                clock: self.clock,
                body_limit: self.body_limit,
            }),
        }
    }
}
