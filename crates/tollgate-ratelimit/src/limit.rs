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
use tollgate_core::key::Key;
use tollgate_core::learn::{LearnedQuota, Learner};
use tollgate_core::meter::{Headroom, Meter, MeterQuota};
use tollgate_core::wait::Denial;

use crate::gov::{GovClock, Limiter, Store};
use crate::metrics::LimitMetrics;
use crate::quota::Quota;

/// One limit of a [`RateLimitLayer`](crate::RateLimitLayer): core's metered limit
/// ([`Meter`]) over a request [`Quota`] — a name (for headers, logs and metrics, never the
/// key), the quota, and the key extractor that says whose bucket a request draws from.
///
/// A request whose key the extractor cannot name draws from one shared bucket, `unkeyed`,
/// so leaving out a tenant header never escapes a per-tenant limit. Chain extractors with
/// [`KeyExtractor::or`](tollgate_core::key::KeyExtractor::or) to choose another fallback.
///
/// This layer counts requests and never reads bodies, so a limit keyed by
/// [`Model`](tollgate_core::key::Model) needs the request facts put there by a layer
/// outside it that buffers the body (`tollgate_core::facts::buffer_request`); without them
/// every request falls to `unkeyed`.
///
/// [`Limit::learned`] learns the quota from `x-ratelimit-limit-requests`, `-remaining-`,
/// `-reset-` (or Anthropic's `anthropic-ratelimit-requests-*`), the bucket's size
/// included; see [`RateLimitLayer::quota`](crate::RateLimitLayer::quota) and the gauges
/// `tollgate_ratelimit_learned_limit` and `tollgate_ratelimit_learned_burst`.
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
pub type Limit = Meter<Quota>;

impl MeterQuota for Quota {
    fn unbounded() -> Self {
        Quota::unbounded()
    }
    fn share(self, instances: u32) -> Self {
        Quota::share(self, instances)
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

impl Gcra {
    /// The room `key` has now, read from governor's state without taking a cell: the
    /// share of the burst free, and the time until one cell is (the same arithmetic as
    /// [`check_leaving`](Self::check_leaving)).
    fn headroom(&self, key: &Key, now: Nanos) -> Headroom {
        use governor::state::StateStore as _;
        if self.limiter.is_none() {
            return Headroom {
                left: 0.0,
                ready_in: Duration::MAX,
            };
        }
        let t = Nanos::from(self.quota.interval().max(Duration::from_nanos(1)));
        let burst = u64::from(self.quota.burst_size().max(1));
        let tau = t * (burst - 1);
        let t0 = now.saturating_sub(self.start);
        let tat = self
            .store
            .measure_and_replace(key, |tat| {
                let tat = tat.unwrap_or(t0);
                Ok::<_, ()>((tat, tat))
            })
            .unwrap_or(t0);
        // Cells taken but not yet come back, in emission intervals.
        let owed = u64::from(tat.saturating_sub(t0)) as f64 / u64::from(t) as f64;
        Headroom {
            left: ((burst as f64 - owed) / burst as f64).clamp(0.0, 1.0),
            ready_in: Duration::from(tat.saturating_sub(tau).saturating_sub(t0)),
        }
    }

    /// governor's GCRA test with `reserve` cells more demanded than taken, in one step
    /// on the key's state: the cell is taken only when `reserve + 1` could be. governor
    /// has no such call (its `check_key_n` takes all n), so it is written here on the same
    /// state and arithmetic (`gcra.rs`: emission interval t, tolerance t × (burst − 1)).
    fn check_leaving(&self, key: &Key, reserve: u32, now: Nanos) -> Result<(), Denial> {
        use governor::state::StateStore as _;
        let t = Nanos::from(self.quota.interval().max(Duration::from_nanos(1)));
        let tau = t * u64::from(self.quota.burst_size().saturating_sub(1));
        let extra = t * u64::from(reserve);
        let t0 = now.saturating_sub(self.start);
        self.store.measure_and_replace(key, |tat| {
            let tat = tat.unwrap_or(t0);
            let earliest = (tat + extra).saturating_sub(tau);
            if t0 < earliest {
                Err(Denial::Wait(Duration::from(earliest.saturating_sub(t0))))
            } else {
                Ok(((), tat.max(t0) + t))
            }
        })
    }
}

/// The limiter of a limit: one fixed quota, or one that learns.
enum Cell {
    Fixed(Gcra),
    Learning(Mutex<Learner<Arc<Gcra>>>),
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
        let gcra = Gcra::new(limit.quota(), &clock);
        let cell = if limit.learns() {
            let configured = limit.is_configured().then(|| Arc::new(gcra));
            Cell::Learning(Mutex::new(Learner::new(configured, now)))
        } else {
            Cell::Fixed(gcra)
        };
        Self {
            metrics: LimitMetrics::new(limit.name_arc()),
            limit,
            cell,
            clock,
        }
    }

    fn learning(&self) -> Option<MutexGuard<'_, Learner<Arc<Gcra>>>> {
        match &self.cell {
            // Each section is a few assignments; a panic elsewhere leaves it whole.
            Cell::Learning(m) => Some(m.lock().unwrap_or_else(PoisonError::into_inner)),
            Cell::Fixed(_) => None,
        }
    }

    /// The limiter in force now (`None` while a learning limit knows no quota).
    fn gcra(&self) -> Option<Arc<Gcra>> {
        self.learning().and_then(|l| l.quota().cloned())
    }

    /// The quota in force: the configured one, or the one learned; `None` while a
    /// learning limit knows none.
    pub(crate) fn quota(&self) -> Option<Quota> {
        match &self.cell {
            Cell::Fixed(g) => Some(g.quota),
            Cell::Learning(_) => self.gcra().map(|g| g.quota),
        }
    }

    /// Takes one cell for `key`, or says how long until one is free. With a `reserve`,
    /// the cell is taken only while `reserve` more stay in the bucket (at most the burst
    /// less one), and the wait is until they do.
    pub(crate) fn check(&self, key: &Key, reserve: u32) -> Result<(), Denial> {
        let check = |g: &Gcra| {
            let Some(limiter) = &g.limiter else {
                return Err(Denial::Never);
            };
            let reserve = reserve.min(g.quota.burst_size().saturating_sub(1));
            if reserve > 0 {
                return g.check_leaving(key, reserve, self.clock.now());
            }
            limiter
                .check_key(key)
                .map_err(|not_until| Denial::Wait(not_until.wait_time_from(self.clock.now())))
        };
        let gcra = match &self.cell {
            Cell::Fixed(g) => return check(g),
            Cell::Learning(_) => match self.learning().map(|mut l| l.admit(self.clock.instant())) {
                Some(Err(wait)) => return Err(Denial::Wait(wait)),
                Some(Ok(Some(g))) => g,
                Some(Ok(None)) | None => return Ok(()),
            },
        };
        let r = check(&gcra);
        if r.is_err() {
            if let Some(mut l) = self.learning() {
                l.released();
            }
        }
        r
    }

    /// The room `key` has now (see [`Gcra::headroom`]); a learning limit paused by a
    /// 429's hint has none until the hint passes, and one that knows no quota yet is not
    /// limited.
    pub(crate) fn headroom(&self, key: &Key) -> Headroom {
        let now = self.clock.now();
        match &self.cell {
            Cell::Fixed(g) => g.headroom(key, now),
            Cell::Learning(_) => {
                let (paused, gcra) = match self.learning() {
                    Some(l) => (l.paused_until(), l.quota().cloned()),
                    None => (None, None),
                };
                let room = gcra.map_or(Headroom::FULL, |g| g.headroom(key, now));
                match paused.map(|p| p.saturating_duration_since(self.clock.instant())) {
                    Some(wait) if !wait.is_zero() => Headroom {
                        left: 0.0,
                        ready_in: room.ready_in.max(wait),
                    },
                    _ => room,
                }
            }
        }
    }

    /// Gives back one cell taken from `key`.
    pub(crate) fn refund(&self, key: &Key) {
        let refund = |g: &Gcra| {
            if g.limiter.is_some() {
                g.store.refund(key, g.quota.interval());
            }
        };
        match &self.cell {
            Cell::Fixed(g) => refund(g),
            Cell::Learning(_) => {
                let gcra = self.learning().and_then(|mut l| {
                    l.released();
                    l.quota().cloned()
                });
                if let Some(g) = gcra {
                    refund(&g);
                }
            }
        }
    }

    /// An answer came for a request of `key`: a learning limit learns the quota it states
    /// (or that there is none) and pauses for a 429's hint; an adaptive one follows what
    /// it says is left. Returns whether waiters should be tried again now.
    pub(crate) fn answered(&self, key: &Key, answer: &Answer<'_>, now: Instant) -> bool {
        let (kick, gcra) = match &self.cell {
            Cell::Fixed(g) => {
                if self.limit.is_adaptive() {
                    self.follow_provider(g, key, answer.state, now);
                }
                return false;
            }
            Cell::Learning(_) => {
                let Some(mut l) = self.learning() else {
                    return false;
                };
                let pause = answer
                    .rate_limited
                    .then(|| {
                        answer.hint.or_else(|| {
                            answer
                                .state
                                .reset
                                .filter(|_| answer.state.remaining == Some(0))
                        })
                    })
                    .flatten()
                    .map(|h| later(now, h));
                let kick = l.answered(answer.state, answer.success, pause, |seen, current| {
                    let q = self.adopt(seen);
                    if current.is_some_and(|g| !differs(g.quota, q)) {
                        return None;
                    }
                    self.metrics.learned(seen.limit, u64::from(q.burst_size()));
                    tracing::info!(limit = %self.limit.name(), per_minute = seen.limit, burst = q.burst_size(), "learned the provider's request quota");
                    Some(Arc::new(Gcra::new(q, &self.clock)))
                });
                (kick, l.quota().cloned())
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
        self.learning().is_some_and(|mut l| l.unanswered())
    }

    /// The quota to adopt for what the provider stated: its own, within the configured one.
    fn adopt(&self, seen: LearnedQuota) -> Quota {
        let count = u32::try_from(seen.limit).unwrap_or(u32::MAX);
        let burst = u32::try_from(seen.burst).unwrap_or(u32::MAX);
        let learned = Quota::per(count, seen.window).burst(burst.max(1));
        if !self.limit.is_configured() {
            return learned;
        }
        let c = self.limit.quota();
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
        let retain = |g: &Gcra| {
            if let Some(l) = &g.limiter {
                l.retain_recent();
                l.shrink_to_fit();
            }
        };
        match &self.cell {
            Cell::Fixed(g) => retain(g),
            Cell::Learning(_) => self.gcra().iter().for_each(|g| retain(g)),
        }
    }

    /// How many keys are held.
    pub(crate) fn len(&self) -> usize {
        match &self.cell {
            Cell::Fixed(g) => g.store.len(),
            Cell::Learning(_) => self.gcra().map_or(0, |g| g.store.len()),
        }
    }
}
