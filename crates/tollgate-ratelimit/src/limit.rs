//! One limit: a name, a quota and who it counts against.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use governor::clock::Clock as _;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use tokio::time::Instant;
use tollgate_core::clock::{later, SharedClock};
use tollgate_core::headers::LimitState as ProviderLimit;
use tollgate_core::key::{Global, Key, KeyExtractor, RequestHead};
use tollgate_core::learn::{LearnedQuota, SlowStart};
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
    /// Adopts the provider's stated quota (within the configured one).
    pub(crate) learn: bool,
    /// Whether `quota` was given; a learned limit without one starts slow.
    pub(crate) configured: bool,
}

impl fmt::Debug for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limit")
            .field("name", &self.name)
            .field("quota", &self.quota)
            .field("adaptive", &self.adaptive)
            .field("learn", &self.learn)
            .field("configured", &self.configured)
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
            learn: false,
            configured: true,
        }
    }

    /// A limit whose quota nobody configured: it is **learned** from the provider's
    /// answers (`x-ratelimit-limit-requests`, `-remaining-`, `-reset-`, or Anthropic's
    /// `anthropic-ratelimit-requests-*`), the bucket's size included, and paced to.
    ///
    /// Until the first answer says what the quota is, the limit **starts slow**: one
    /// request goes (twice as many every two seconds that no answer comes), the others
    /// wait in the queue and are released the moment it is known — TCP's slow start
    /// applied to a quota. A provider that sends no quota headers is not limited. After a
    /// 429 with a hint, every request waits the hint out, so concurrent requests do not
    /// each discover the same 429. Put it in wait mode: in refuse mode the requests slow
    /// start holds back are refused with the time instead.
    ///
    /// The learned quota is the provider's for the whole limit (mark the limit that
    /// mirrors the provider's quota: global, or keyed by API key); see
    /// [`RateLimitLayer::quota`](crate::RateLimitLayer::quota) and the gauges
    /// `tollgate_ratelimit_learned_limit` and `tollgate_ratelimit_learned_burst`.
    ///
    /// A learned quota is this process's: a shared store
    /// ([`RateLimitBuilder::store`](crate::RateLimitBuilder::store)) is asked for the
    /// configured quota, which a learned limit does not have, so keep learned limits in a
    /// layer without one (the policy file does) and state a quota to share it.
    pub fn learned(name: impl Into<Arc<str>>) -> Self {
        Self {
            learn: true,
            adaptive: true,
            configured: false,
            ..Self::new(name, Quota::unbounded())
        }
    }

    /// Also learns the provider's quota, as [`learned`](Self::learned) does, keeping the
    /// configured quota as an upper bound: the provider's is adopted where it is stricter
    /// (a lower rate, a smaller burst). A configured limit does not start slow. Implies
    /// [`adaptive`](Self::adaptive).
    pub fn learn(mut self) -> Self {
        self.learn = true;
        self.adaptive = true;
        self
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

    /// The configured quota (unbounded for a [`learned`](Self::learned) limit).
    pub fn quota(&self) -> Quota {
        self.quota
    }
}

/// A GCRA limiter for one quota, with its keyed state.
///
/// governor keeps each key's theoretical arrival time relative to the moment its limiter
/// was built, so the state belongs to that limiter: a learning limit that adopts a new
/// quota builds a new one with a fresh store, and the provider's `remaining` (followed on
/// every answer) sets the new state right at once.
struct Gcra {
    quota: Quota,
    /// `None` for a closed (zero) quota.
    limiter: Option<Limiter>,
    store: Store,
    /// governor's own start reading, which its arrival times are relative to.
    start: Nanos,
}

impl Gcra {
    fn new(quota: Quota, clock: &GovClock) -> Self {
        let store = Store::default();
        // governor reads the clock once when it is built; read it just before, so the
        // arrival times it stores can be related to our clock (off by the nanoseconds
        // between the two reads at most, and exactly right on a paused clock).
        let start = clock.now();
        Self {
            quota,
            limiter: quota
                .governor()
                .map(|q| Limiter::new(q, store.clone(), clock.clone())),
            store,
            start,
        }
    }
}

/// What a learning limit knows: slow start and pauses, and the quota in force (`None`
/// until one is known).
struct Learning {
    start: SlowStart,
    gcra: Option<Arc<Gcra>>,
}

/// The limiter of a limit: one fixed quota, or one that learns.
enum Cell {
    Fixed(Gcra),
    Learning(Mutex<Learning>),
}

/// Whether a newly stated quota differs enough from the one in force to adopt it: another
/// rate, or a burst off by more than one (the headers state the bucket's level in whole
/// cells, so its size read from them wobbles by one).
fn differs(now: Quota, seen: Quota) -> bool {
    now.interval() != seen.interval() || now.burst_size().abs_diff(seen.burst_size()) > 1
}

/// A limit with its running state.
pub(crate) struct ActiveLimit {
    pub(crate) limit: Limit,
    pub(crate) metrics: LimitMetrics,
    cell: Cell,
    clock: GovClock,
}

impl fmt::Debug for ActiveLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActiveLimit")
            .field("limit", &self.limit)
            .field("keys", &self.len())
            .finish()
    }
}

/// What one answer said, for a limit to follow or learn from.
pub(crate) struct Answer<'a> {
    pub(crate) state: &'a ProviderLimit,
    /// The answer was a 429.
    pub(crate) rate_limited: bool,
    /// The answer was a success (2xx): only such an answer without quota headers says
    /// there is no quota to learn; an error page may simply not carry them.
    pub(crate) success: bool,
    /// The server's hint of when to come back.
    pub(crate) hint: Option<Duration>,
}

impl ActiveLimit {
    pub(crate) fn new(limit: Limit, clock: SharedClock) -> Self {
        let now = tollgate_core::clock::Clock::now(&clock);
        let clock = GovClock::new(clock);
        let gcra = Gcra::new(limit.quota, &clock);
        let cell = if limit.learn {
            Cell::Learning(Mutex::new(Learning {
                start: if limit.configured {
                    SlowStart::known()
                } else {
                    SlowStart::unknown(now)
                },
                gcra: limit.configured.then(|| Arc::new(gcra)),
            }))
        } else {
            Cell::Fixed(gcra)
        };
        Self {
            metrics: LimitMetrics::new(&limit.name),
            limit,
            cell,
            clock,
        }
    }

    pub(crate) fn key_for(&self, head: &RequestHead<'_>) -> Key {
        self.limit
            .extractor
            .extract(head)
            .unwrap_or_else(|| Key::new("unkeyed"))
    }

    fn learning(&self) -> Option<MutexGuard<'_, Learning>> {
        match &self.cell {
            // Each section is a few assignments; a panic elsewhere leaves it whole.
            Cell::Learning(m) => Some(m.lock().unwrap_or_else(PoisonError::into_inner)),
            Cell::Fixed(_) => None,
        }
    }

    /// The quota in force: the configured one, or the one learned; `None` while a
    /// learning limit knows none.
    pub(crate) fn quota(&self) -> Option<Quota> {
        match &self.cell {
            Cell::Fixed(g) => Some(g.quota),
            Cell::Learning(_) => self
                .learning()
                .and_then(|l| l.gcra.as_ref().map(|g| g.quota)),
        }
    }

    /// Takes one cell for `key`, or says how long until one is free.
    pub(crate) fn check(&self, key: &Key) -> Result<(), Denial> {
        let check = |g: &Gcra| {
            let Some(limiter) = &g.limiter else {
                return Err(Denial::Never);
            };
            limiter
                .check_key(key)
                .map_err(|not_until| Denial::Wait(not_until.wait_time_from(self.clock.now())))
        };
        match &self.cell {
            Cell::Fixed(g) => check(g),
            Cell::Learning(_) => {
                let gcra = {
                    let Some(mut l) = self.learning() else {
                        return Ok(());
                    };
                    if let Some(wait) = l.start.admit(self.clock_now()) {
                        return Err(Denial::Wait(wait));
                    }
                    l.gcra.clone()
                };
                match gcra {
                    Some(g) => {
                        let r = check(&g);
                        if r.is_err() {
                            if let Some(mut l) = self.learning() {
                                l.start.released();
                            }
                        }
                        r
                    }
                    None => Ok(()),
                }
            }
        }
    }

    fn clock_now(&self) -> Instant {
        self.clock.instant()
    }

    /// Gives back one cell taken from `key`.
    pub(crate) fn refund(&self, key: &Key) {
        let gcra = match &self.cell {
            Cell::Fixed(g) => {
                if g.limiter.is_some() {
                    g.store.refund(key, g.quota.interval());
                }
                return;
            }
            Cell::Learning(_) => match self.learning() {
                Some(mut l) => {
                    l.start.released();
                    l.gcra.clone()
                }
                None => None,
            },
        };
        if let Some(g) = gcra.filter(|g| g.limiter.is_some()) {
            g.store.refund(key, g.quota.interval());
        }
    }

    /// An answer came for a request of `key`: a learning limit learns the quota it states
    /// (or that there is none) and pauses for a 429's hint; an adaptive one follows what
    /// it says is left. Returns whether waiters should be tried again now.
    pub(crate) fn answered(&self, key: &Key, answer: &Answer<'_>, now: Instant) -> bool {
        let mut kick = false;
        let gcra = match self.learning() {
            None => match &self.cell {
                Cell::Fixed(g) => {
                    if self.limit.adaptive {
                        self.follow_provider(g, key, answer.state, now);
                    }
                    return false;
                }
                Cell::Learning(_) => return false,
            },
            Some(mut l) => {
                match LearnedQuota::from_state(answer.state) {
                    Some(seen) => {
                        let q = self.adopt(seen);
                        if l.gcra.as_ref().is_none_or(|g| differs(g.quota, q)) {
                            l.gcra = Some(Arc::new(Gcra::new(q, &self.clock)));
                            self.metrics.learned(seen.limit, u64::from(q.burst_size()));
                            tracing::info!(limit = %self.limit.name, per_minute = seen.limit, burst = q.burst_size(), "learned the provider's request quota");
                            kick = true;
                        }
                        kick |= l.start.learned();
                    }
                    None if answer.success => kick |= l.start.answered_without_quota(),
                    None => {
                        // An error without quota headers says nothing of the quota: its
                        // place in slow start goes to another request.
                        if l.start.is_unknown() {
                            l.start.released();
                            kick = true;
                        }
                    }
                }
                if answer.rate_limited {
                    let hint = answer.hint.or_else(|| {
                        answer
                            .state
                            .reset
                            .filter(|_| answer.state.remaining == Some(0))
                    });
                    if let Some(h) = hint {
                        l.start.pause_until(later(now, h));
                    }
                }
                l.gcra.clone()
            }
        };
        if let Some(g) = gcra {
            self.follow_provider(&g, key, answer.state, now);
        }
        kick
    }

    /// A request of a learning limit got no answer (a transport error): during slow
    /// start, its place goes to another. Returns whether waiters should be tried again.
    pub(crate) fn unanswered(&self) -> bool {
        match self.learning() {
            Some(mut l) if l.start.is_unknown() => {
                l.start.released();
                true
            }
            _ => false,
        }
    }

    /// The quota to adopt for what the provider stated: its own, within the configured one.
    fn adopt(&self, seen: LearnedQuota) -> Quota {
        let count = u32::try_from(seen.limit).unwrap_or(u32::MAX);
        let burst = u32::try_from(seen.burst).unwrap_or(u32::MAX);
        let learned = Quota::per(count, seen.window).burst(burst.max(1));
        if !self.limit.configured {
            return learned;
        }
        let c = self.limit.quota;
        if c.is_closed() {
            return c;
        }
        // The slower rate and the smaller burst.
        let interval = c.interval().max(learned.interval());
        let burst = c.burst_size().min(learned.burst_size()).max(1);
        Quota::with_interval(interval, burst)
    }

    /// Folds the provider's view of its quota into `key`'s state: never more admissions now
    /// than the provider says remain, and when none remain, the next not before the
    /// provider's own pace allows.
    fn follow_provider(&self, g: &Gcra, key: &Key, provider: &ProviderLimit, now: Instant) {
        let (Some(_), Some(remaining)) = (&g.limiter, provider.remaining) else {
            return;
        };
        let burst = u64::from(g.quota.burst_size());
        if remaining >= burst {
            return;
        }
        let t = g.quota.interval();
        let now_rel = self.clock.to_nanos(now).saturating_sub(g.start);
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
        g.store.raise_to(key, Nanos::from(floor));
    }

    /// Drops the keys whose state is no different from a fresh one.
    pub(crate) fn retain_recent(&self) {
        let gcra = match &self.cell {
            Cell::Fixed(g) => {
                if let Some(l) = &g.limiter {
                    l.retain_recent();
                    l.shrink_to_fit();
                }
                return;
            }
            Cell::Learning(_) => self.learning().and_then(|l| l.gcra.clone()),
        };
        if let Some(l) = gcra.as_ref().and_then(|g| g.limiter.as_ref()) {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// How many keys are held.
    pub(crate) fn len(&self) -> usize {
        match &self.cell {
            Cell::Fixed(g) => g.store.len(),
            Cell::Learning(_) => self
                .learning()
                .and_then(|l| l.gcra.clone())
                .map_or(0, |g| g.store.len()),
        }
    }
}
