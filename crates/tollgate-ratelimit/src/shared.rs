//! The state every clone of a rate-limited service shares: the limits, as the core wait
//! queue sees them.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tollgate_core::key::Key;
use tollgate_core::meter::take_all;
use tollgate_core::refusal::{LimitKind, QuotaState, Reason, Refusal};
use tollgate_core::wait::{Admit, Denial, PriorityExtractor, ShareExtractor, WaitQueue};

use crate::limit::ActiveLimit;

/// The limits and their wait queue, shared by every clone of the service.
pub(crate) type Shared = WaitQueue<Limits>;

/// A request's keys, one per limit, and whether it is background work (the lowest
/// priority, which leaves the layer's reserve to the others).
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    list: KeyList,
    pub(crate) background: bool,
}

/// One limit is the common case: its key is kept inline, with no allocation.
#[derive(Clone, Debug)]
enum KeyList {
    One([Key; 1]),
    Many(Vec<Key>),
}

impl std::ops::Deref for Keys {
    type Target = [Key];
    fn deref(&self) -> &[Key] {
        match &self.list {
            KeyList::One(k) => k,
            KeyList::Many(v) => v,
        }
    }
}

impl FromIterator<Key> for Keys {
    fn from_iter<I: IntoIterator<Item = Key>>(iter: I) -> Self {
        let mut iter = iter.into_iter();
        let list = match (iter.next(), iter.next()) {
            (Some(a), None) => KeyList::One([a]),
            (first, second) => KeyList::Many(first.into_iter().chain(second).chain(iter).collect()),
        };
        Keys {
            list,
            background: false,
        }
    }
}

/// A layer's limits: one cell from each per request.
pub(crate) struct Limits {
    pub(crate) limits: Vec<ActiveLimit>,
    pub(crate) priority: Arc<dyn PriorityExtractor>,
    pub(crate) share: Arc<dyn ShareExtractor>,
    /// The cells of each limit's burst that background requests (priority 0) leave to
    /// the others.
    pub(crate) reserve: u32,
    /// Some limit reads the answers (adaptive or learning): requests keep their keys.
    pub(crate) watches_answers: bool,
}

impl fmt::Debug for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limits")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Limits {
    pub(crate) fn new(
        limits: Vec<ActiveLimit>,
        priority: Arc<dyn PriorityExtractor>,
        share: Arc<dyn ShareExtractor>,
        reserve: u32,
    ) -> Self {
        let watches_answers = limits
            .iter()
            .any(|l| l.limit.is_adaptive() || l.limit.learns());
        Self {
            limits,
            priority,
            share,
            reserve,
            watches_answers,
        }
    }

    /// Whether a limit's quota is zero (every request refused as too large).
    pub(crate) fn any_closed(&self) -> bool {
        self.limits
            .iter()
            .any(|l| l.quota().is_some_and(|q| q.is_closed()))
    }

    pub(crate) fn count_admitted(&self) {
        for l in &self.limits {
            l.metrics.admitted();
        }
    }
}

impl Admit for Limits {
    type Ticket = Keys;

    /// Takes a cell from every limit, or from none. On a refusal it still asks the other
    /// limits (giving back at once what they grant), so the wait it reports is the time
    /// until *all* of them would admit.
    fn try_admit(&self, keys: &Keys) -> Result<(), (usize, Denial)> {
        // `i` stays below both lengths.
        take_all(
            self.limits.len().min(keys.len()),
            |i| {
                let reserve = if keys.background { self.reserve } else { 0 };
                self.limits[i].check(&keys[i], reserve)
            },
            |i| self.limits[i].refund(&keys[i]),
        )
    }

    fn refund(&self, keys: &Keys) {
        for (l, k) in self.limits.iter().zip(keys.iter()) {
            l.refund(k);
        }
    }

    fn shares(&self, a: &Keys, b: &Keys) -> bool {
        a.iter().zip(b.iter()).any(|(x, y)| x == y)
    }

    fn pace(&self, _: &Keys) -> Duration {
        self.limits
            .iter()
            .filter_map(|l| l.quota().map(|q| q.interval()))
            .max()
            .unwrap_or(Duration::ZERO)
    }

    fn refusal(&self, keys: &Keys, i: usize, wait: Option<Duration>, reason: Reason) -> Refusal {
        let Some(active) = self.limits.get(i) else {
            return Refusal::new(LimitKind::Requests, "ratelimit", wait).with_reason(reason);
        };
        let limit = &active.limit;
        active.metrics.refused(reason);
        tracing::debug!(
            limit = %limit.name(),
            reason = crate::metrics::reason_label(reason),
            retry_after_ms = wait.map(|w| w.as_millis() as u64),
            "rate limit refused a request"
        );
        let mut refusal = Refusal::new(LimitKind::Requests, Arc::clone(limit.name_arc()), wait)
            .with_reason(reason);
        // A learning limit that knows no quota yet states none.
        if let Some(q) = active.quota() {
            refusal = refusal.with_quota(QuotaState {
                limit: u64::from(q.burst_size()),
                window: q.window(),
                remaining: 0,
            });
        }
        if let Some(key) = keys.get(i) {
            refusal = refusal.with_key(key.clone());
        }
        refusal
    }

    fn waited(&self, binding: usize, waited: Duration) {
        if let Some(active) = self.limits.get(binding) {
            active.metrics.waited(waited);
            tracing::debug!(
                limit = %active.limit.name(),
                waited_ms = waited.as_millis() as u64,
                "rate limit admitted a request after a wait"
            );
        }
    }
}
