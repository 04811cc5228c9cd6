//! Token budgets: a ledger per key that can reserve, give back and charge.
//!
//! governor cannot give cells back or charge after the fact (governor#152), and a token
//! budget must do both, so each budget keeps its own ledger: a bucket per key that holds
//! up to a window's tokens and refills continuously. Reserving takes the estimate;
//! settling gives back what was over-reserved or takes what was under-reserved (a bucket
//! may go below zero: a debt the next requests wait out). A key whose bucket is full is
//! indistinguishable from a key never seen, so idle keys are dropped.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tollgate_core::clock::{Clock, SharedClock};
use tollgate_core::headers::LimitState;
use tollgate_core::key::Key;
use tollgate_core::learn::Learner;
use tollgate_core::meter::{take_all, Meter, MeterQuota};
use tollgate_core::refusal::{LimitKind, QuotaState, Reason, Refusal};
use tollgate_core::wait::{Admit, Denial};

/// Tokens per interval.
///
/// `TokenQuota::per_minute(100_000)` lets 100,000 tokens through a minute, refilled
/// continuously, all of them at once when idle (as providers' TPM buckets do). A zero
/// quota lets nothing through.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenQuota {
    capacity: u64,
    window: Duration,
}

impl TokenQuota {
    /// `n` tokens per minute.
    pub fn per_minute(n: u64) -> Self {
        Self::per(n, Duration::from_secs(60))
    }

    /// `n` tokens per `window` (a zero window is taken as one nanosecond).
    pub fn per(n: u64, window: Duration) -> Self {
        Self {
            capacity: n,
            window: window.max(Duration::from_nanos(1)),
        }
    }

    /// The most tokens at once.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// This quota split between `instances`: the capacity divided by it, over the same
    /// window. The share each instance keeps in process when a shared store cannot
    /// answer.
    pub fn share(self, instances: u32) -> Self {
        Self {
            capacity: self.capacity / u64::from(instances.max(1)),
            window: self.window,
        }
    }

    fn per_sec(&self) -> f64 {
        self.capacity as f64 / self.window.as_secs_f64()
    }
}

/// One token budget: core's metered limit ([`Meter`]) over a [`TokenQuota`] — a name (for
/// headers, logs and metrics, never the key), the quota, and whose bucket a request draws
/// from (a global one by default). A request whose key cannot be named draws from one
/// shared `unkeyed` bucket.
///
/// [`Budget::learned`] learns the quota from `x-ratelimit-limit-tokens` and the rest (or
/// Anthropic's `anthropic-ratelimit-tokens-*`); see
/// [`TpmLayer::quota`](crate::TpmLayer::quota) and the gauge `tollgate_tpm_learned_limit`.
/// [`Budget::adaptive`] follows `x-ratelimit-remaining-tokens` / `-reset-tokens` /
/// `-limit-tokens`: the budget never holds more than the provider says is left, and when
/// the provider refills more slowly than the budget would, it holds back enough that it
/// never gets ahead of the provider before the provider's reset.
///
/// ```
/// use tollgate_core::key::Header;
/// use tollgate_tpm::{Budget, TokenQuota};
///
/// let per_tenant = Budget::new("tenant-tpm", TokenQuota::per_minute(40_000))
///     .keyed_by(Header::new("x-tenant-id"));
/// assert_eq!(per_tenant.quota().capacity(), 40_000);
/// ```
pub type Budget = Meter<TokenQuota>;

impl MeterQuota for TokenQuota {
    fn unbounded() -> Self {
        TokenQuota::per_minute(u64::MAX / 2)
    }
    fn share(self, instances: u32) -> Self {
        TokenQuota::share(self, instances)
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Tokens available now (below zero while in debt).
    level: f64,
    /// Tokens reserved by requests still in flight. The bucket never refills above
    /// `capacity − held`: a reservation that comes back unused must not land on top of a
    /// bucket that refilled as if the reservation were gone.
    held: f64,
    last: Instant,
}

/// A budget with its ledger.
pub(crate) struct Ledger {
    pub(crate) budget: Budget,
    pub(crate) metrics: crate::metrics::BudgetMetrics,
    clock: SharedClock,
    buckets: Mutex<HashMap<Key, Bucket>>,
    /// For budgets that learn.
    learning: Option<Mutex<Learner<TokenQuota>>>,
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger")
            .field("budget", &self.budget)
            .field("keys", &self.len())
            .finish()
    }
}

impl Ledger {
    pub(crate) fn new(budget: Budget, clock: SharedClock) -> Self {
        let learning = budget.learns().then(|| {
            let configured = budget.is_configured().then(|| budget.quota());
            Mutex::new(Learner::new(configured, clock.now()))
        });
        Self {
            metrics: crate::metrics::BudgetMetrics::new(budget.name_arc()),
            budget,
            clock,
            buckets: Mutex::new(HashMap::new()),
            learning,
        }
    }

    fn learning(&self) -> Option<MutexGuard<'_, Learner<TokenQuota>>> {
        self.learning
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The quota in force: the configured one, or the one learned; `None` while a
    /// learning budget knows none.
    pub(crate) fn quota(&self) -> Option<TokenQuota> {
        match self.learning() {
            None => Some(self.budget.quota()),
            Some(l) => l.quota().copied(),
        }
    }

    /// An answer stated (or did not state) the provider's token quota, or was a 429 with a
    /// hint. Returns whether waiters should be tried again now.
    pub(crate) fn answered(
        &self,
        state: &LimitState,
        success: bool,
        pause: Option<Instant>,
    ) -> bool {
        let Some(mut l) = self.learning() else {
            return false;
        };
        l.answered(state, success, pause, |seen, current| {
            // A token bucket holds the window's quota (providers' do); what is left of it
            // now comes from `remaining`, followed on every answer.
            let mut q = TokenQuota::per(seen.limit, seen.window);
            let configured = self.budget.quota();
            if self.budget.is_configured() && configured.capacity < q.capacity {
                q = configured;
            }
            if current == Some(&q) {
                return None;
            }
            tracing::info!(budget = %self.budget.name(), per_minute = seen.limit, "learned the provider's token quota");
            self.metrics.learned(q.capacity);
            Some(q)
        })
    }

    /// A request got no answer: during slow start its place goes to another.
    pub(crate) fn unanswered(&self) -> bool {
        self.learning().is_some_and(|mut l| l.unanswered())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Bucket>> {
        // Each critical section below is a few arithmetic steps on one entry; a panic
        // elsewhere cannot leave it half-written.
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on `key`'s bucket, refilled to now; `None` while a learning budget knows no
    /// quota (nothing is counted then).
    fn with<R>(&self, key: &Key, f: impl FnOnce(&mut Bucket, f64, f64) -> R) -> Option<R> {
        let q = self.quota()?;
        Some(self.with_quota(q, key, f))
    }

    fn with_quota<R>(
        &self,
        q: TokenQuota,
        key: &Key,
        f: impl FnOnce(&mut Bucket, f64, f64) -> R,
    ) -> R {
        let now = self.clock.now();
        let cap = q.capacity as f64;
        let mut buckets = self.lock();
        let b = buckets.entry(key.clone()).or_insert(Bucket {
            level: cap,
            held: 0.0,
            last: now,
        });
        let dt = now.saturating_duration_since(b.last).as_secs_f64();
        if b.level < cap - b.held {
            b.level = (b.level + dt * q.per_sec()).min(cap - b.held);
        }
        b.last = now;
        f(b, cap, q.per_sec())
    }

    /// Takes `n` tokens and holds them for a request in flight, or says how long until
    /// they are there.
    pub(crate) fn take(&self, key: &Key, n: u64) -> Result<(), Denial> {
        let quota = match self.learning().map(|mut l| l.admit(self.clock.now())) {
            None => self.budget.quota(),
            Some(Err(wait)) => return Err(Denial::Wait(wait)),
            Some(Ok(Some(q))) => q,
            // Slow start's probe, or a provider that states no quota.
            Some(Ok(None)) => return Ok(()),
        };
        let taken = if n > quota.capacity {
            Err(Denial::Never)
        } else {
            self.with_quota(quota, key, |b, _, rate| {
                let n = n as f64;
                if b.level >= n {
                    b.level -= n;
                    b.held += n;
                    Ok(())
                } else {
                    Err(Denial::Wait(Duration::from_secs_f64((n - b.level) / rate)))
                }
            })
        };
        if taken.is_err() {
            if let Some(mut l) = self.learning() {
                l.released();
            }
        }
        taken
    }

    /// Ends a hold of `reserved` tokens for a request that used `used`: gives back what was
    /// not used, or takes the overrun (the bucket may go below zero).
    pub(crate) fn release(&self, key: &Key, reserved: u64, used: u64) {
        self.with(key, |b, cap, _| {
            b.held = (b.held - reserved as f64).max(0.0);
            b.level += reserved as f64 - used as f64;
            b.level = b.level.min(cap - b.held);
        });
    }

    /// Folds in the provider's view, when stricter: `remaining` tokens now, refilling to
    /// `limit` over `reset`. The bucket is capped so it never holds more than the
    /// provider's would at any moment until its reset: at most `remaining` now, and less
    /// when this budget refills faster than the provider does.
    pub(crate) fn follow(&self, key: &Key, view: &ProviderView) {
        self.with(key, |b, cap, rate| {
            let remaining = view.remaining as f64;
            let mut ceiling = remaining;
            if let Some(reset) = view.reset.filter(|d| !d.is_zero()) {
                let limit = view.limit.map_or(cap, |l| l as f64).max(remaining);
                let provider_rate = (limit - remaining) / reset.as_secs_f64();
                if provider_rate < rate {
                    ceiling += (provider_rate - rate) * reset.as_secs_f64();
                }
            }
            b.level = b.level.min(ceiling);
        });
    }

    /// Tokens available to `key` now (negative while in debt).
    pub(crate) fn available(&self, key: &Key) -> i64 {
        self.with(key, |b, _, _| b.level.floor() as i64)
            .unwrap_or(i64::MAX)
    }

    /// Drops the keys whose bucket is full again.
    pub(crate) fn retain_recent(&self) {
        let now = self.clock.now();
        let Some(q) = self.quota() else {
            return;
        };
        let cap = q.capacity as f64;
        let mut buckets = self.lock();
        buckets.retain(|_, b| {
            let dt = now.saturating_duration_since(b.last).as_secs_f64();
            b.held > 0.0 || b.level + dt * q.per_sec() < cap
        });
        buckets.shrink_to_fit();
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// What one request draws on: a key per budget, and its cost.
#[derive(Clone, Debug)]
pub(crate) struct Ticket {
    pub(crate) keys: Vec<Key>,
    pub(crate) cost: u64,
}

/// A layer's budgets, as the core wait queue sees them.
#[derive(Debug)]
pub(crate) struct Budgets {
    pub(crate) ledgers: Vec<Ledger>,
}

/// What the provider's `x-ratelimit-*-tokens` headers said.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ProviderView {
    pub(crate) remaining: u64,
    pub(crate) reset: Option<Duration>,
    pub(crate) limit: Option<u64>,
}

impl Budgets {
    /// Folds the provider's view into every adaptive budget.
    pub(crate) fn follow_provider(&self, keys: &[Key], view: &ProviderView) {
        for (l, k) in self.ledgers.iter().zip(keys) {
            if l.budget.is_adaptive() {
                l.follow(k, view);
            }
        }
    }

    /// Tells every learning budget what an answer stated (and when to come back after a
    /// 429); returns whether waiters should be tried again now.
    pub(crate) fn answered(
        &self,
        state: &LimitState,
        success: bool,
        pause: Option<Instant>,
    ) -> bool {
        self.ledgers
            .iter()
            .fold(false, |kick, l| l.answered(state, success, pause) | kick)
    }

    /// Whether some budget counts tokens now: one configured, or learned. A budget still
    /// learning (or whose provider states no token quota) counts nothing, so asking a
    /// stream for its usage on the caller's behalf would change the request for nothing.
    pub(crate) fn counting(&self) -> bool {
        self.ledgers.iter().any(|l| l.quota().is_some())
    }

    /// A request got no answer; returns whether waiters should be tried again now.
    pub(crate) fn unanswered(&self) -> bool {
        self.ledgers
            .iter()
            .fold(false, |kick, l| l.unanswered() | kick)
    }

    /// Settles a reservation of `reserved` for a request that used `actual`.
    pub(crate) fn settle(&self, keys: &[Key], reserved: u64, actual: u64) {
        for (l, k) in self.ledgers.iter().zip(keys) {
            l.release(k, reserved, actual);
        }
    }
}

impl Admit for Budgets {
    type Ticket = Ticket;

    fn try_admit(&self, t: &Ticket) -> Result<(), (usize, Denial)> {
        // `i` stays below both lengths.
        take_all(
            self.ledgers.len().min(t.keys.len()),
            |i| self.ledgers[i].take(&t.keys[i], t.cost),
            |i| self.ledgers[i].release(&t.keys[i], t.cost, 0),
        )
    }

    /// A flow of large prompts spends its fair share in tokens.
    fn cost(&self, t: &Ticket) -> u64 {
        t.cost
    }

    fn refund(&self, t: &Ticket) {
        for (l, k) in self.ledgers.iter().zip(&t.keys) {
            l.release(k, t.cost, 0);
        }
    }

    fn shares(&self, a: &Ticket, b: &Ticket) -> bool {
        a.keys.iter().zip(&b.keys).any(|(x, y)| x == y)
    }

    fn pace(&self, t: &Ticket) -> Duration {
        self.ledgers
            .iter()
            .filter_map(|l| l.quota())
            .map(|q| Duration::from_secs_f64(t.cost as f64 / q.per_sec().max(1e-9)))
            .max()
            .unwrap_or(Duration::ZERO)
    }

    fn refusal(&self, t: &Ticket, i: usize, wait: Option<Duration>, reason: Reason) -> Refusal {
        let Some(l) = self.ledgers.get(i) else {
            return Refusal::new(LimitKind::Tokens, "tpm", wait).with_reason(reason);
        };
        l.metrics.refused(reason, t.cost);
        tracing::debug!(budget = %l.budget.name(), tokens = t.cost, ?reason, "token budget refused a request");
        let mut r = Refusal::new(LimitKind::Tokens, Arc::clone(l.budget.name_arc()), wait)
            .with_reason(reason);
        if let Some(q) = l.quota() {
            r = r.with_quota(QuotaState {
                limit: q.capacity,
                window: q.window,
                remaining: t.keys.get(i).map_or(0, |k| l.available(k).max(0) as u64),
            });
        }
        if let Some(k) = t.keys.get(i) {
            r = r.with_key(k.clone());
        }
        r
    }

    fn waited(&self, binding: usize, waited: Duration) {
        if let Some(l) = self.ledgers.get(binding) {
            tracing::debug!(budget = %l.budget.name(), waited_ms = waited.as_millis() as u64, "token budget admitted a request after a wait");
        }
    }
}
