//! Waiting for capacity, shared by every Tollgate limit that can wait: a bounded queue
//! ordered by [`Priority`], then arrival, that releases one waiter per free unit of
//! capacity instead of waking all of them to race.
//!
//! A limit describes what it admits through [`Admit`]: a *ticket* (the keys a request
//! draws on, and how much from each), an all-or-nothing `try_admit`, a `refund` for a
//! ticket granted to a caller who then went away, and whether two tickets draw on a
//! common bucket. [`WaitQueue::admit`] then decides for each request: admitted now,
//! refused now (in [`Mode::Refuse`], or when the wait would pass `max_wait`, or the queue
//! is full), or an [`Acquire`] future that completes when the request is admitted.
//!
//! The rules the queue keeps:
//!
//! - A waiter is never overtaken by a later one that shares a bucket with it, unless the
//!   later one has a higher priority; a waiter never blocks one whose buckets it does not
//!   share.
//! - Only the first waiter in line for a set of buckets holds a timer (for the moment its
//!   capacity frees); when it is admitted, the next in line is woken, and nobody else.
//! - A waiter whose future is dropped leaves the queue; if it had already been granted its
//!   capacity, that capacity is given back.
//! - Time comes from the [`Clock`](crate::clock::Clock), so paused-clock tests drive it.
//! - Among waiters of one priority, requests with a [`Share`] are served by start-time
//!   fair queueing: each request gets a start tag, the later of the queue's virtual time
//!   and its flow's last finish tag, and a finish tag, start + cost ÷ weight; waiters go
//!   in start-tag order, and virtual time is the start tag of the last one served. So
//!   flows that all wait get capacity in proportion to their weights (in requests, or in
//!   tokens for a token budget); a flow alone gets all of it (work-conserving); a flow
//!   that was idle starts at the current virtual time — no credit for the time away, so it
//!   cannot burst past the others, and no debt, so it is served within about one request
//!   of each other flow. Requests without a share are one flow of weight 1: among
//!   themselves, arrival order.

mod fair;
mod priority;
mod queue;
mod share;

pub(crate) use fair::{Fair, Slot, Tagged};
pub use priority::{
    priority_fn, ExtensionPriority, HeaderPriority, Priority, PriorityExtractor, PriorityFn,
};
pub use queue::{Acquire, Admission, WaitQueue};
pub use share::{ExtensionShare, FairShare, Share, ShareExtractor};

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::refusal::{Reason, Refusal};

/// How long one request waited for capacity, summed over every limit it passed. Put an
/// `Arc<WaitReport>` in a request's extensions and the rate limiter and the token budget
/// add the time it spent in their wait queues: a gateway takes it from its own time when
/// it reports its overhead.
#[derive(Debug, Default)]
pub struct WaitReport {
    nanos: AtomicU64,
}

impl WaitReport {
    /// Adds a wait.
    pub fn add(&self, waited: Duration) {
        let ns = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(ns, Ordering::Relaxed);
    }

    /// The waits so far.
    pub fn total(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }

    /// Adds `waited` to the report `req` carries, if it carries one.
    pub fn note<B>(req: &http::Request<B>, waited: Duration) {
        if let Some(r) = req.extensions().get::<std::sync::Arc<WaitReport>>() {
            r.add(waited);
        }
    }
}

/// Refuse at once, or wait up to a bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Over the limit, answer at once with a [`Refusal`].
    Refuse,
    /// Over the limit, wait in a prioritised queue; refuse at once when the wait would be
    /// longer than `max_wait` or the queue holds `max_queue` requests.
    Wait {
        /// The longest a request may wait.
        max_wait: Duration,
        /// The most requests that may wait at once.
        max_queue: usize,
    },
}

/// How many requests may wait at once unless a layer is told otherwise.
pub const DEFAULT_MAX_QUEUE: usize = 1024;

impl Mode {
    /// Wait up to `max_wait`, keeping the queue bound already set ([`DEFAULT_MAX_QUEUE`]
    /// when coming from [`Mode::Refuse`]).
    pub fn wait(self, max_wait: Duration) -> Mode {
        let max_queue = match self {
            Mode::Wait { max_queue, .. } => max_queue,
            Mode::Refuse => DEFAULT_MAX_QUEUE,
        };
        Mode::Wait {
            max_wait,
            max_queue,
        }
    }

    /// The latest a request that arrives at `now` may be admitted: `now + max_wait` in
    /// wait mode, `None` (at once or never) in refuse mode.
    pub fn deadline(self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        match self {
            Mode::Wait { max_wait, .. } => Some(crate::clock::later(now, max_wait)),
            Mode::Refuse => None,
        }
    }

    /// In wait mode, at most `n` waiters; refuse mode is left as it is.
    pub fn max_queue(self, n: usize) -> Mode {
        match self {
            Mode::Wait { max_wait, .. } => Mode::Wait {
                max_wait,
                max_queue: n,
            },
            Mode::Refuse => Mode::Refuse,
        }
    }
}

/// A limit said no.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denial {
    /// Passes after this long (if nothing else takes the capacity first).
    Wait(Duration),
    /// Never passes: the request needs more than the limit can ever hold.
    Never,
    /// Passes when something in flight ends, at a moment nobody can say (a concurrency
    /// limit): a waiter holds no timer and is woken by [`WaitQueue::dispatch`] when the
    /// capacity comes back; refused at once in refuse mode.
    Held,
}

impl Denial {
    /// Whether `self` is further from passing than `other`.
    pub fn is_worse_than(self, other: Denial) -> bool {
        match (self, other) {
            (Denial::Never, _) => true,
            (_, Denial::Never) => false,
            (Denial::Held, _) => true,
            (_, Denial::Held) => false,
            (Denial::Wait(a), Denial::Wait(b)) => a > b,
        }
    }
}

/// What a set of limits admits, as the [`WaitQueue`] sees it.
pub trait Admit: Send + Sync + 'static {
    /// What one request draws on: its keys, and how much from each.
    type Ticket: Send + Sync + 'static;

    /// Takes what `ticket` needs from every limit, or nothing. On refusal: the index of the
    /// limit that binds (the one furthest from passing), and how far it is.
    fn try_admit(&self, ticket: &Self::Ticket) -> Result<(), (usize, Denial)>;

    /// Gives back everything a granted `ticket` took.
    fn refund(&self, ticket: &Self::Ticket);

    /// Whether two tickets draw on a common bucket, so one must not overtake the other.
    fn shares(&self, a: &Self::Ticket, b: &Self::Ticket) -> bool;

    /// About how much longer each waiter ahead makes the wait for `ticket` (used to refuse
    /// at once what could not pass within `max_wait`).
    fn pace(&self, ticket: &Self::Ticket) -> Duration;

    /// The refusal of `ticket` by the limit at `binding`.
    fn refusal(
        &self,
        ticket: &Self::Ticket,
        binding: usize,
        wait: Option<Duration>,
        reason: Reason,
    ) -> Refusal;

    /// Told when a ticket is admitted after waiting `waited` on the limit at `binding`
    /// (for metrics and logs).
    fn waited(&self, _binding: usize, _waited: Duration) {}

    /// What `ticket` costs its flow in the fair share ([`Share`]): 1 (a request) by
    /// default; a token budget says its tokens, so a flow of large prompts spends its
    /// share in tokens.
    fn cost(&self, _ticket: &Self::Ticket) -> u64 {
        1
    }
}
