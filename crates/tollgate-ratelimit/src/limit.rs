//! One limit: a name, a quota and who it counts against.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock as _;
use governor::nanos::Nanos;
use tokio::time::Instant;
use tollgate_core::clock::SharedClock;
use tollgate_core::headers::LimitState as ProviderLimit;
use tollgate_core::key::{Global, Key, KeyExtractor, RequestHead};
use tollgate_core::wait::Denial;

use crate::gov::{GovClock, Limiter, Store};
use crate::metrics::LimitMetrics;
use crate::quota::Quota;

/// One limit of a [`RateLimitLayer`](crate::RateLimitLayer): a name (for headers, logs
/// and metrics — never the key), a [`Quota`], and the key extractor that says whose
/// bucket a request draws from.
///
/// A request whose key the extractor cannot name draws from one shared bucket, `unkeyed`,
/// so leaving out a tenant header never escapes a per-tenant limit. Chain extractors with
/// [`KeyExtractor::or`] to choose another fallback.
///
/// This layer counts requests and never reads bodies, so a limit keyed by
/// [`Model`](tollgate_core::key::Model) needs the request facts put there by a layer
/// outside it that buffers the body (`tollgate_core::facts::buffer_request`); without them
/// every request falls to `unkeyed`.
///
/// ```
/// use tollgate_core::key::{ApiKey, Header, KeyExtractor};
/// use tollgate_ratelimit::{Limit, Quota};
///
/// let per_tenant = Limit::new("tenant-rpm", Quota::per_minute(600))
///     .keyed_by(Header::new("x-tenant-id").or(ApiKey));
/// let everyone = Limit::new("global-rpm", Quota::per_minute(3000)); // one global bucket
/// # let _ = (per_tenant, everyone);
/// ```
#[derive(Clone)]
pub struct Limit {
    pub(crate) name: Arc<str>,
    pub(crate) quota: Quota,
    pub(crate) extractor: Arc<dyn KeyExtractor>,
    pub(crate) adaptive: bool,
}

impl fmt::Debug for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limit")
            .field("name", &self.name)
            .field("quota", &self.quota)
            .field("adaptive", &self.adaptive)
            .finish_non_exhaustive()
    }
}

impl Limit {
    /// A limit every request shares (keyed by [`Global`]) until
    /// [`keyed_by`](Self::keyed_by) says otherwise.
    pub fn new(name: impl Into<Arc<str>>, quota: Quota) -> Self {
        Self {
            name: name.into(),
            quota,
            extractor: Arc::new(Global),
            adaptive: false,
        }
    }

    /// Whose bucket a request draws from.
    pub fn keyed_by(mut self, extractor: impl KeyExtractor) -> Self {
        self.extractor = Arc::new(extractor);
        self
    }

    /// Follows the provider's own count: when a response carries
    /// `x-ratelimit-remaining-requests` (and `-reset-requests`), this limit never allows
    /// more than the provider says is left, so it slows down before the provider starts
    /// refusing. Mark the limit that mirrors the provider's quota (the global one in a
    /// client stack, or one keyed by API key); the provider's view wins only where it is
    /// stricter than the configured quota.
    pub fn adaptive(mut self) -> Self {
        self.adaptive = true;
        self
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The quota.
    pub fn quota(&self) -> Quota {
        self.quota
    }
}

/// A limit with its running state.
pub(crate) struct ActiveLimit {
    pub(crate) limit: Limit,
    pub(crate) metrics: LimitMetrics,
    /// `None` for a closed (zero) quota.
    limiter: Option<Limiter>,
    store: Store,
    clock: GovClock,
    /// governor's own start reading, which its arrival times are relative to.
    start: Nanos,
}

impl fmt::Debug for ActiveLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActiveLimit")
            .field("limit", &self.limit)
            .field("keys", &self.len())
            .finish()
    }
}

impl ActiveLimit {
    pub(crate) fn new(limit: Limit, clock: SharedClock) -> Self {
        let clock = GovClock::new(clock);
        let store = Store::default();
        // governor reads the clock once when it is built; read it just before, so the
        // arrival times it stores can be related to our clock (off by the nanoseconds
        // between the two reads at most, and exactly right on a paused clock).
        let start = clock.now();
        let limiter = limit
            .quota
            .governor()
            .map(|q| Limiter::new(q, store.clone(), clock.clone()));
        Self {
            metrics: LimitMetrics::new(&limit.name),
            limit,
            limiter,
            store,
            clock,
            start,
        }
    }

    pub(crate) fn key_for(&self, head: &RequestHead<'_>) -> Key {
        self.limit
            .extractor
            .extract(head)
            .unwrap_or_else(|| Key::new("unkeyed"))
    }

    /// Takes one cell for `key`, or says how long until one is free.
    pub(crate) fn check(&self, key: &Key) -> Result<(), Denial> {
        let Some(limiter) = &self.limiter else {
            return Err(Denial::Never);
        };
        limiter
            .check_key(key)
            .map_err(|not_until| Denial::Wait(not_until.wait_time_from(self.clock.now())))
    }

    /// Gives back one cell taken from `key`.
    pub(crate) fn refund(&self, key: &Key) {
        if self.limiter.is_some() {
            self.store.refund(key, self.limit.quota.interval());
        }
    }

    /// Folds the provider's view of its quota into `key`'s state: never more admissions now
    /// than the provider says remain, and when none remain, the next not before the
    /// provider's own pace allows.
    pub(crate) fn follow_provider(&self, key: &Key, provider: &ProviderLimit, now: Instant) {
        let (Some(_), Some(remaining)) = (&self.limiter, provider.remaining) else {
            return;
        };
        let burst = u64::from(self.limit.quota.burst_size());
        if remaining >= burst {
            return;
        }
        let t = self.limit.quota.interval();
        let now_rel = self.clock.to_nanos(now).saturating_sub(self.start);
        let mut floor = Duration::from(now_rel) + t.saturating_mul((burst - remaining) as u32);
        if remaining == 0 {
            if let Some(reset) = provider.reset {
                let cells = provider
                    .limit
                    .filter(|&l| l > 0)
                    .unwrap_or(burst)
                    .min(u64::from(u32::MAX));
                let per_cell = reset / cells.max(1) as u32;
                let tau = t.saturating_mul((burst - 1) as u32);
                floor = floor.max(Duration::from(now_rel) + tau + per_cell);
            }
        }
        self.store.raise_to(key, Nanos::from(floor));
    }

    /// Drops the keys whose state is no different from a fresh one.
    pub(crate) fn retain_recent(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// How many keys are held.
    pub(crate) fn len(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }
}
