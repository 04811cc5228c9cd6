//! The kit every metered limit is built from: the rate limiter (requests), the token
//! budget (tokens), and any third meter (money, say) are thin users of it.
//!
//! | piece | what it is |
//! | --- | --- |
//! | [`Meter`] | one limit's definition: a name, a quota, whose bucket a request draws from, and whether it follows or learns the provider's own count |
//! | [`MeterQuota`] | what a meter's quota must be able to do: stand unbounded for a learned meter, and be split between instances |
//! | [`Knobs`] | the builder settings every metered layer has: refuse or wait, the queue bound, priorities, the clock, housekeeping, a shared store and its failure policy |
//! | [`Guarded`], [`MeterStore`], [`Ask`] | one guarded store call: ask the shared store, wait out its `retry_after` within `max_wait`, and on failure go by the policy (this instance's share in process, or a 503) with a recovery probe |
//! | [`take_all`] | all or none across a layer's meters, reporting the one furthest from passing |
//!
//! The learning state (slow start, pauses, the quota in force) is
//! [`Learner`](crate::learn::Learner); the wait queue is [`crate::wait`].
//!
//! A meter of its own is a quota type, an [`Admit`](crate::wait::Admit) over its ledgers
//! and a layer that asks [`Ask`] before the queue:
//!
//! ```
//! use std::time::Duration;
//! use tollgate_core::key::Header;
//! use tollgate_core::meter::{Meter, MeterQuota};
//!
//! /// Cents per day.
//! #[derive(Clone, Copy, Debug)]
//! struct Cents(u64);
//!
//! impl MeterQuota for Cents {
//!     fn unbounded() -> Self {
//!         Cents(u64::MAX)
//!     }
//!     fn share(self, instances: u32) -> Self {
//!         Cents(self.0 / u64::from(instances.max(1)))
//!     }
//! }
//!
//! let spend = Meter::new("daily-spend", Cents(50_00)).keyed_by(Header::new("x-tenant-id"));
//! assert_eq!(spend.name(), "daily-spend");
//! assert_eq!(spend.quota().share(2).0, 25_00);
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

use crate::clock::{later, Clock, SharedClock, Sleep};
use crate::key::{Global, Key, KeyExtractor, RequestHead};
use crate::refusal::Reason;
use crate::store::{
    CostCell, CostDecision, CostStore, OnStoreFailure, RateCell, RateDecision, RateStore,
    StoreError, StoreFuture, StoreHealth, TokenCell, TokenDecision, TokenStore,
};
use crate::wait::{
    Denial, ExtensionPriority, ExtensionShare, Fair, Mode, Priority, PriorityExtractor, Share,
    ShareExtractor, Slot, Tagged,
};

/// What a [`Meter`]'s quota must be able to do.
pub trait MeterQuota: Copy + fmt::Debug + Send + Sync + 'static {
    /// A quota no request reaches: the placeholder of a meter whose quota is learned.
    fn unbounded() -> Self;
    /// This quota split between `instances` (at least one): what each instance keeps in
    /// process when a shared store cannot answer.
    fn share(self, instances: u32) -> Self;
}

/// One metered limit: a name (for headers, logs and metrics — never the key), a quota,
/// and the key extractor that says whose bucket a request draws from.
///
/// A request whose key the extractor cannot name draws from one shared bucket, `unkeyed`,
/// so leaving out a tenant header never escapes a per-tenant limit. Chain extractors with
/// [`KeyExtractor::or`] to choose another fallback.
#[derive(Clone)]
pub struct Meter<Q> {
    name: Arc<str>,
    quota: Q,
    extractor: Arc<dyn KeyExtractor>,
    adaptive: bool,
    learn: bool,
    configured: bool,
}

impl<Q: fmt::Debug> fmt::Debug for Meter<Q> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Meter")
            .field("name", &self.name)
            .field("quota", &self.quota)
            .field("adaptive", &self.adaptive)
            .field("learn", &self.learn)
            .field("configured", &self.configured)
            .finish_non_exhaustive()
    }
}

impl<Q: MeterQuota> Meter<Q> {
    /// A meter every request shares (keyed by [`Global`]) until
    /// [`keyed_by`](Self::keyed_by) says otherwise.
    pub fn new(name: impl Into<Arc<str>>, quota: Q) -> Self {
        Self {
            name: name.into(),
            quota,
            extractor: Arc::new(Global),
            adaptive: false,
            learn: false,
            configured: true,
        }
    }

    /// A meter whose quota nobody configured: it is **learned** from the provider's
    /// answers and followed. Until the first answer states it, the meter **starts slow**
    /// — one request goes (twice as many every two seconds that no answer comes), the
    /// others wait and are released the moment it is known — and after a 429 with a hint
    /// every request waits the hint out. A provider that states no quota is not limited.
    /// Put it in wait mode: in refuse mode the requests slow start holds back are refused
    /// with the time instead.
    ///
    /// The learned quota is the provider's for the whole meter (mark the one that mirrors
    /// the provider's quota: global, or keyed by API key), and this process's: a shared
    /// store is asked for the configured quota, which a learned meter does not have, so
    /// keep learned meters in a layer without one and state a quota to share it.
    pub fn learned(name: impl Into<Arc<str>>) -> Self {
        Self {
            learn: true,
            adaptive: true,
            configured: false,
            ..Self::new(name, Q::unbounded())
        }
    }

    /// Also learns the provider's quota, as [`learned`](Self::learned) does, keeping the
    /// configured quota as an upper bound: the provider's is adopted where it is stricter.
    /// A configured meter does not start slow. Implies [`adaptive`](Self::adaptive).
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

    /// Follows the provider's own count (`x-ratelimit-remaining-*` and `-reset-*`): never
    /// more than the provider says is left, so the meter slows down before the provider
    /// starts refusing. Mark the meter that mirrors the provider's quota; the provider's
    /// view wins only where it is stricter than the configured quota.
    pub fn adaptive(mut self) -> Self {
        self.adaptive = true;
        self
    }

    /// This meter at `instances`' share of its quota ([`MeterQuota::share`]).
    pub fn shared_by(mut self, instances: u32) -> Self {
        if instances > 1 {
            self.quota = self.quota.share(instances);
        }
        self
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name, to hand on without copying it.
    pub fn name_arc(&self) -> &Arc<str> {
        &self.name
    }

    /// The configured quota (unbounded for a [`learned`](Self::learned) meter).
    pub fn quota(&self) -> Q {
        self.quota
    }

    /// Whether it follows the provider's count.
    pub fn is_adaptive(&self) -> bool {
        self.adaptive
    }

    /// Whether it learns the provider's quota.
    pub fn learns(&self) -> bool {
        self.learn
    }

    /// Whether a quota was configured (a [`learned`](Self::learned) meter has none).
    pub fn is_configured(&self) -> bool {
        self.configured
    }

    /// Whose bucket `head` draws from: the extractor's key, or `unkeyed`.
    pub fn key_for(&self, head: &RequestHead<'_>) -> Key {
        self.extractor
            .extract(head)
            .unwrap_or_else(|| Key::new("unkeyed"))
    }
}

/// How soon a set of limits would take a request, read without taking anything: what a
/// balancer asks each backend before it chooses one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Headroom {
    /// The share of the tightest limit's burst free now, from 0 (nothing left) to 1.
    pub left: f64,
    /// How long until it admits one request (zero when it would now).
    pub ready_in: Duration,
}

impl Headroom {
    /// Room for everything, now: a backend with no limit.
    pub const FULL: Headroom = Headroom {
        left: 1.0,
        ready_in: Duration::ZERO,
    };

    /// The tighter of two: the less left, the longer wait.
    pub fn min(self, other: Headroom) -> Headroom {
        Headroom {
            left: self.left.min(other.left),
            ready_in: self.ready_in.max(other.ready_in),
        }
    }
}

/// A layer whose limits a balancer can read: how much room they have now for `req`.
pub trait Capacity: Send + Sync + 'static {
    /// The room for a request like `req` (its key, its model), read without taking any.
    fn headroom(&self, req: &RequestHead<'_>) -> Headroom;
}

/// Takes from each of `n` meters, all or none: `take(i)` asks meter `i`, `give_back(i)`
/// returns what it granted. On a refusal the others are still asked (and what they grant
/// given back at once), so the wait reported is the time until *all* would admit; the
/// index is the meter furthest from passing.
pub fn take_all(
    n: usize,
    mut take: impl FnMut(usize) -> Result<(), Denial>,
    mut give_back: impl FnMut(usize),
) -> Result<(), (usize, Denial)> {
    let mut denied: Option<(usize, Denial)> = None;
    for i in 0..n {
        match take(i) {
            Ok(()) if denied.is_some() => give_back(i),
            Ok(()) => {}
            Err(d) => {
                if denied.is_none() {
                    (0..i).for_each(&mut give_back);
                }
                denied = Some(match denied {
                    Some(prev) if !d.is_worse_than(prev.1) => prev,
                    _ => (i, d),
                });
            }
        }
    }
    denied.map_or(Ok(()), Err)
}

/// The settings every metered layer's builder has: refuse or wait (and the queue's bound),
/// where priorities come from, the clock, how often idle keys are dropped, and a shared
/// store with its failure policy.
pub struct Knobs<S: ?Sized> {
    /// Refuse at once, or wait up to a bound.
    pub mode: Mode,
    /// Where a waiting request's priority comes from.
    pub priority: Arc<dyn PriorityExtractor>,
    /// Where a waiting request's fair-share flow comes from.
    pub share: Arc<dyn ShareExtractor>,
    /// The clock to count and wait on.
    pub clock: SharedClock,
    /// How often idle keys are dropped (`None`: never by itself).
    pub housekeeping: Option<Duration>,
    /// The shared store, and what to do when it cannot answer.
    pub store: Option<(Arc<S>, OnStoreFailure)>,
}

impl<S: ?Sized> fmt::Debug for Knobs<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Knobs")
            .field("mode", &self.mode)
            .field("housekeeping", &self.housekeeping)
            .field("store", &self.store.as_ref().map(|(_, policy)| policy))
            .finish_non_exhaustive()
    }
}

impl<S: ?Sized> Default for Knobs<S> {
    /// Refuse mode, priorities from the request's extensions, tokio's clock, idle keys
    /// dropped every 60 s, no store.
    fn default() -> Self {
        Self {
            mode: Mode::Refuse,
            priority: Arc::new(ExtensionPriority),
            share: Arc::new(ExtensionShare),
            clock: SharedClock::default(),
            housekeeping: Some(Duration::from_secs(60)),
            store: None,
        }
    }
}

impl<S: ?Sized + Send + Sync + 'static> Knobs<S> {
    /// How many instances share the store's quota when it fails open (1 without a store,
    /// or failing closed): the meters in process keep that share.
    pub fn share(&self) -> u32 {
        match self.store {
            Some((_, OnStoreFailure::Open { instances })) => instances.max(1),
            _ => 1,
        }
    }

    /// The store behind its guard, its failures logged as `what`'s.
    pub fn guarded(&self, what: &'static str) -> Option<Arc<Guarded<S>>> {
        let now = self.clock.now();
        self.store.as_ref().map(|(store, on_failure)| {
            Arc::new(Guarded::new(Arc::clone(store), *on_failure, now, what))
        })
    }

    /// Starts the housekeeping task for `target`, if one is asked for; see
    /// [`spawn_periodic`](crate::clock::spawn_periodic).
    pub fn spawn_housekeeping<T: Send + Sync + 'static>(&self, target: &Arc<T>, tick: fn(&T)) {
        if let Some(period) = self.housekeeping {
            crate::clock::spawn_periodic(target, self.clock.clone(), period, tick);
        }
    }
}

/// A shared store a meter asks: one call per decision over the request's cells.
pub trait MeterStore: Send + Sync + 'static {
    /// One bucket a decision draws on.
    type Cell: Send + Sync + 'static;
    /// The store's own answer.
    type Decision: Send + 'static;
    /// What the store grants (the rate store: nothing; the token store: a hold to settle).
    type Grant: Send + 'static;
    /// Takes `cost` from every cell, or nothing.
    fn take(
        &self,
        cells: Arc<[Self::Cell]>,
        cost: u64,
    ) -> StoreFuture<Result<Self::Decision, StoreError>>;
    /// The store's answer, as a meter sees it.
    fn verdict(decision: Self::Decision) -> StoreVerdict<Self::Grant>;
    /// The bucket a cell names: requests asking for the same buckets wait in one line.
    fn cell_key(cell: &Self::Cell) -> &Key;
}

/// A store's answer, as a meter sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreVerdict<G> {
    /// Taken from every cell.
    Granted(G),
    /// Nothing taken: the cell at `binding` binds, and all would admit after
    /// `retry_after` (`None`: never, the cost is more than a cell holds).
    Denied {
        /// The binding cell's index.
        binding: usize,
        /// How long until every cell would admit.
        retry_after: Option<Duration>,
    },
}

impl MeterStore for dyn RateStore {
    type Cell = RateCell;
    type Decision = RateDecision;
    type Grant = ();
    fn take(
        &self,
        cells: Arc<[RateCell]>,
        _cost: u64,
    ) -> StoreFuture<Result<RateDecision, StoreError>> {
        self.acquire(cells)
    }
    fn cell_key(cell: &RateCell) -> &Key {
        &cell.key
    }
    fn verdict(decision: RateDecision) -> StoreVerdict<()> {
        match decision {
            RateDecision::Admitted => StoreVerdict::Granted(()),
            RateDecision::Denied {
                binding,
                retry_after,
            } => StoreVerdict::Denied {
                binding,
                retry_after: Some(retry_after),
            },
        }
    }
}

impl MeterStore for dyn TokenStore {
    type Cell = TokenCell;
    type Decision = TokenDecision;
    type Grant = u64;
    fn take(
        &self,
        cells: Arc<[TokenCell]>,
        cost: u64,
    ) -> StoreFuture<Result<TokenDecision, StoreError>> {
        self.reserve(cells, cost)
    }
    fn cell_key(cell: &TokenCell) -> &Key {
        &cell.key
    }
    fn verdict(decision: TokenDecision) -> StoreVerdict<u64> {
        match decision {
            TokenDecision::Reserved { hold } => StoreVerdict::Granted(hold),
            TokenDecision::Denied {
                binding,
                retry_after,
            } => StoreVerdict::Denied {
                binding,
                retry_after,
            },
        }
    }
}

impl MeterStore for dyn CostStore {
    type Cell = CostCell;
    type Decision = CostDecision;
    type Grant = ();
    fn take(
        &self,
        cells: Arc<[CostCell]>,
        cost: u64,
    ) -> StoreFuture<Result<CostDecision, StoreError>> {
        self.hold(cells, cost)
    }
    fn cell_key(cell: &CostCell) -> &Key {
        &cell.key
    }
    fn verdict(decision: CostDecision) -> StoreVerdict<()> {
        match decision {
            CostDecision::Held => StoreVerdict::Granted(()),
            // When the window starts again is the layer's to say (its clock's wall time):
            // the store says only that it has not enough now.
            CostDecision::Denied { binding } => StoreVerdict::Denied {
                binding,
                retry_after: None,
            },
        }
    }
}

/// A shared store behind its guard: whether it answers ([`StoreHealth`], shared by every
/// request of the layer, with a recovery probe half a second after a failure) and what to
/// do when it cannot.
pub struct Guarded<S: ?Sized> {
    store: Arc<S>,
    on_failure: OnStoreFailure,
    health: StoreHealth,
    what: &'static str,
    /// Until when the store's last answer said it has no room (a denial's
    /// `retry_after`); cleared by a grant. What a balancer reads of the shared quota,
    /// at no extra call.
    denied_until: std::sync::Mutex<Option<Instant>>,
    /// This instance's waiters for the store, in line (see [`Ask::in_line`]).
    line: std::sync::Mutex<Line>,
}

/// This instance's requests waiting for a shared store's cells, in order: by priority,
/// then by the fair share's start tags, then arrival — the order of the in-process
/// [`WaitQueue`](crate::wait::WaitQueue). One lane per set of buckets; only the first of a
/// lane asks the store, so the next cell this instance is given goes to it.
#[derive(Default)]
struct Line {
    fair: Fair,
    /// Each lane's waiters, and the waker of each one waiting for its turn.
    lanes: std::collections::HashMap<u64, std::collections::BTreeMap<Slot, Option<Waker>>>,
    waiting: usize,
}

impl<S: ?Sized> fmt::Debug for Guarded<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guarded")
            .field("what", &self.what)
            .field("on_failure", &self.on_failure)
            .finish_non_exhaustive()
    }
}

impl<S: ?Sized> Guarded<S> {
    /// `store`, healthy as of `now`; its failures are logged as `what`'s.
    pub fn new(
        store: Arc<S>,
        on_failure: OnStoreFailure,
        now: Instant,
        what: &'static str,
    ) -> Self {
        Self {
            store,
            on_failure,
            health: StoreHealth::new(now),
            denied_until: std::sync::Mutex::new(None),
            line: std::sync::Mutex::new(Line::default()),
            what,
        }
    }

    fn line(&self) -> std::sync::MutexGuard<'_, Line> {
        // Each critical section leaves the line whole.
        self.line
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether anyone of this instance waits in `lane`.
    fn lane_busy(&self, lane: u64) -> bool {
        self.line().lanes.get(&lane).is_some_and(|l| !l.is_empty())
    }

    /// Takes a place in `lane`.
    fn join(&self, lane: u64, priority: Priority, share: Option<Share>, cost: u64) -> Tagged {
        let mut line = self.line();
        let tags = line.fair.tag(priority, share, cost);
        line.lanes.entry(lane).or_default().insert(tags.slot, None);
        line.waiting += 1;
        tags
    }

    /// Whether `slot` is first in `lane`; if not, `waker` is woken when it is.
    fn first(&self, lane: u64, slot: Slot, waker: &Waker) -> bool {
        let mut line = self.line();
        let Some(l) = line.lanes.get_mut(&lane) else {
            return true;
        };
        if l.keys().next().is_none_or(|first| *first == slot) {
            return true;
        }
        if let Some(w) = l.get_mut(&slot) {
            if !w.as_ref().is_some_and(|w| w.will_wake(waker)) {
                *w = Some(waker.clone());
            }
        }
        false
    }

    /// Leaves `lane`, served or not, and wakes whoever is first now.
    fn leave(&self, lane: u64, tags: &Tagged, served: bool) {
        let woken = {
            let mut line = self.line();
            let mut woken = None;
            let mut left = false;
            if let Some(l) = line.lanes.get_mut(&lane) {
                left = l.remove(&tags.slot).is_some();
                woken = l.values_mut().next().and_then(Option::take);
                if l.is_empty() {
                    line.lanes.remove(&lane);
                }
            }
            if left {
                line.waiting -= 1;
            }
            let waiting = line.waiting;
            if served {
                line.fair.served(tags.slot.start, waiting);
            } else {
                line.fair.untag(tags);
            }
            woken
        };
        if let Some(w) = woken {
            w.wake();
        }
    }

    /// A request of `share` served at once, with nobody in line: its flow is charged, so
    /// a flow that just took the burst is not also first in line next.
    fn charge(&self, priority: Priority, share: Share, cost: u64) {
        let mut line = self.line();
        let tags = line.fair.tag(priority, Some(share), cost);
        let waiting = line.waiting;
        line.fair.served(tags.slot.start, waiting);
    }

    /// The store.
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// Until when the store's last answer said there is no room, if it said so: read
    /// without asking the store again.
    pub fn denied_until(&self) -> Option<Instant> {
        *self
            .denied_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn note_denied(&self, until: Option<Instant>) {
        // An assignment: a panic elsewhere leaves it whole.
        *self
            .denied_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = until;
    }

    /// What happens when the store cannot answer.
    pub fn on_failure(&self) -> OnStoreFailure {
        self.on_failure
    }

    fn without_store<G>(&self, error: Option<StoreError>) -> Asked<G> {
        match self.on_failure {
            OnStoreFailure::Open { .. } => Asked::Local,
            OnStoreFailure::Closed => Asked::Failed(
                error.unwrap_or_else(|| StoreError::new("it failed moments ago; retrying shortly")),
            ),
        }
    }
}

/// What asking the store came to.
#[derive(Debug)]
pub enum Asked<G> {
    /// The store granted it.
    Granted(G),
    /// The store refused it: the cell at `binding`, for `reason`, passing after
    /// `retry_after` (`None`: never).
    Refused {
        /// The binding cell's index.
        binding: usize,
        /// When it would pass.
        retry_after: Option<Duration>,
        /// Why it is refused now rather than waited for.
        reason: Reason,
    },
    /// The store cannot answer and the policy is to go on in process, at this instance's
    /// share.
    Local,
    /// The store cannot answer and the policy is to refuse (a 503 through
    /// `ErrorResponseLayer`).
    Failed(StoreError),
}

/// One guarded store call, as a future: asks the store for `cells` (unless it is down and
/// another request is probing it), waits out a `retry_after` on its own timer when the
/// deadline allows and asks again, and goes by the failure policy when the store fails.
///
/// `C` and `D` are the store's [`MeterStore::Cell`] and [`MeterStore::Decision`], named
/// rather than projected so that the future's `Send` is plain to the compiler inside
/// `async` blocks; [`RateAsk`] and [`TokenAsk`] name the two stores' calls.
pub struct Ask<S: ?Sized, C, D> {
    guard: Arc<Guarded<S>>,
    cells: Arc<[C]>,
    cost: u64,
    clock: SharedClock,
    deadline: Option<Instant>,
    ask: bool,
    pending: Option<StoreFuture<Result<D, StoreError>>>,
    sleep: Option<Sleep>,
    /// The last denial's `retry_after` in this call: the pace cells come back at.
    paced: Option<Duration>,
    /// Its place among this instance's waiters, when it keeps one ([`Ask::in_line`]).
    order: Option<Order>,
    /// The deadline's timer while it waits for its turn.
    turn_sleep: Option<Sleep>,
}

/// A request's place in its lane.
#[derive(Debug)]
struct Order {
    lane: u64,
    priority: Priority,
    share: Option<Share>,
    tags: Option<Tagged>,
}

/// The guarded call to a [`RateStore`].
pub type RateAsk = Ask<dyn RateStore, RateCell, RateDecision>;

/// The guarded call to a [`TokenStore`].
pub type TokenAsk = Ask<dyn TokenStore, TokenCell, TokenDecision>;

/// The guarded call to a [`CostStore`].
pub type CostAsk = Ask<dyn CostStore, CostCell, CostDecision>;

impl<S: ?Sized, C, D> fmt::Debug for Ask<S, C, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ask")
            .field("guard", &self.guard)
            .field("cost", &self.cost)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl<S: MeterStore<Cell = C, Decision = D> + ?Sized, C, D> Ask<S, C, D> {
    /// Asks `guard`'s store for `cost` from each of `cells`; in wait `mode`, waits out
    /// denials up to its `max_wait` from now.
    pub fn new(
        guard: Arc<Guarded<S>>,
        cells: Arc<[C]>,
        cost: u64,
        mode: Mode,
        clock: SharedClock,
    ) -> Self {
        let now = clock.now();
        let ask = guard.health.should_ask(now);
        Self {
            deadline: mode.deadline(now),
            guard,
            cells,
            cost,
            clock,
            ask,
            pending: None,
            sleep: None,
            paced: None,
            order: None,
            turn_sleep: None,
        }
    }

    /// Keeps this instance's order among the store's waiters: a request that must wait
    /// takes its place in line by `priority` and `share` (as in the in-process
    /// [`WaitQueue`](crate::wait::WaitQueue)), and only the first in line for the same
    /// buckets asks the store, so each cell the store gives this instance goes to the one
    /// the order says. Across instances the store's cells still go to whichever asks
    /// first. Only in wait mode: a request that does not wait keeps no order.
    pub fn in_line(mut self, priority: Priority, share: Option<Share>) -> Self {
        if self.deadline.is_some() {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            for c in self.cells.iter() {
                S::cell_key(c).as_str().hash(&mut h);
            }
            self.order = Some(Order {
                lane: h.finish(),
                priority,
                share,
                tags: None,
            });
        }
        self
    }

    /// Leaves the line, if it is in it.
    fn leave(&mut self, served: bool) {
        if let Some(o) = self.order.as_mut() {
            match o.tags.take() {
                Some(t) => self.guard.leave(o.lane, &t, served),
                None => {
                    if let (true, Some(share)) = (served, o.share) {
                        self.guard.charge(o.priority, share, self.cost);
                    }
                }
            }
        }
    }

    /// The cells asked for.
    pub fn cells(&self) -> &Arc<[C]> {
        &self.cells
    }
}

impl<S: ?Sized, C, D> Unpin for Ask<S, C, D> {}

impl<S: MeterStore<Cell = C, Decision = D> + ?Sized, C, D> Future for Ask<S, C, D> {
    type Output = Asked<S::Grant>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            if !this.ask {
                this.leave(false);
                return Poll::Ready(this.guard.without_store(None));
            }
            if let Some(sleep) = this.sleep.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                this.sleep = None;
            }
            if this.pending.is_none() {
                if let Some(waited) = this.wait_for_turn(cx) {
                    return waited;
                }
            }
            let (guard, cells, cost) = (&this.guard, &this.cells, this.cost);
            let fut = this
                .pending
                .get_or_insert_with(|| guard.store.take(Arc::clone(cells), cost));
            let answer = ready!(fut.as_mut().poll(cx));
            this.pending = None;
            let (binding, retry_after) = match answer.map(S::verdict) {
                Ok(StoreVerdict::Granted(g)) => {
                    this.guard.health.answered(this.guard.what);
                    // Granted after waiting for it: the cell just freed is taken, and the
                    // next comes about as far off again. Granted at once: room.
                    let now = this.clock.now();
                    this.guard.note_denied(this.paced.map(|d| later(now, d)));
                    this.leave(true);
                    return Poll::Ready(Asked::Granted(g));
                }
                Ok(StoreVerdict::Denied {
                    binding,
                    retry_after,
                }) => {
                    this.guard.health.answered(this.guard.what);
                    this.guard
                        .note_denied(retry_after.map(|d| later(this.clock.now(), d)));
                    this.paced = retry_after;
                    (binding, retry_after)
                }
                Err(e) => {
                    this.guard
                        .health
                        .failed(this.clock.now(), this.guard.what, &e);
                    this.leave(false);
                    return Poll::Ready(this.guard.without_store(Some(e)));
                }
            };
            let reason = match (retry_after, this.deadline) {
                (None, _) => Reason::TooLarge,
                (Some(_), None) => Reason::OverLimit,
                (Some(wait), Some(deadline)) if later(this.clock.now(), wait) > deadline => {
                    Reason::WaitTooLong
                }
                (Some(wait), Some(_)) => {
                    // It waits: in line, if it keeps an order.
                    if let Some(o) = this.order.as_mut().filter(|o| o.tags.is_none()) {
                        o.tags = Some(this.guard.join(o.lane, o.priority, o.share, this.cost));
                    }
                    this.sleep = Some(this.clock.sleep(wait));
                    continue;
                }
            };
            this.leave(false);
            return Poll::Ready(Asked::Refused {
                binding,
                retry_after,
                reason,
            });
        }
    }
}

impl<S: MeterStore<Cell = C, Decision = D> + ?Sized, C, D> Ask<S, C, D> {
    /// Before asking the store: joins a busy lane (so a newcomer does not take the cell
    /// the first in line waits for), and waits while others are ahead — up to the
    /// deadline. `None`: its turn, ask.
    fn wait_for_turn(&mut self, cx: &mut Context<'_>) -> Option<Poll<Asked<S::Grant>>> {
        let o = self.order.as_mut()?;
        if o.tags.is_none() && self.guard.lane_busy(o.lane) {
            o.tags = Some(self.guard.join(o.lane, o.priority, o.share, self.cost));
        }
        let tags = o.tags?;
        if self.guard.first(o.lane, tags.slot, cx.waker()) {
            self.turn_sleep = None;
            return None;
        }
        let deadline = self.deadline?;
        let now = self.clock.now();
        if now < deadline {
            let sleep = self
                .turn_sleep
                .get_or_insert_with(|| self.clock.sleep_until(deadline));
            if sleep.as_mut().poll(cx).is_pending() {
                return Some(Poll::Pending);
            }
        }
        // The deadline passed with others still ahead.
        let retry_after = self
            .guard
            .denied_until()
            .map(|t| t.saturating_duration_since(now))
            .or(self.paced)
            .or(Some(Duration::ZERO));
        self.leave(false);
        Some(Poll::Ready(Asked::Refused {
            binding: 0,
            retry_after,
            reason: Reason::WaitTooLong,
        }))
    }
}

impl<S: ?Sized, C, D> Drop for Ask<S, C, D> {
    fn drop(&mut self) {
        if let Some(o) = self.order.as_mut() {
            if let Some(t) = o.tags.take() {
                self.guard.leave(o.lane, &t, false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_all_gives_back_what_others_granted() {
        use std::cell::RefCell;
        let given = RefCell::new(Vec::new());
        let r = take_all(
            3,
            |i| match i {
                1 => Err(Denial::Wait(Duration::from_secs(2))),
                2 => Err(Denial::Wait(Duration::from_secs(5))),
                _ => Ok(()),
            },
            |i| given.borrow_mut().push(i),
        );
        assert_eq!(r, Err((2, Denial::Wait(Duration::from_secs(5)))));
        assert_eq!(*given.borrow(), vec![0]);
    }

    #[test]
    fn take_all_admits_when_all_admit() {
        assert_eq!(
            take_all(2, |_| Ok(()), |_| panic!("nothing to give back")),
            Ok(())
        );
    }
}
