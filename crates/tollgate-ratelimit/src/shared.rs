//! The state every clone of a rate-limited service shares: the limits, and the queue of
//! waiting requests.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;
use tollgate_core::clock::{Clock, SharedClock, Sleep};
use tollgate_core::key::Key;
use tollgate_core::refusal::{LimitKind, Quota as QuotaInfo, Reason, Refusal};

use crate::limit::{ActiveLimit, Denial};
use crate::priority::{Priority, PriorityExtractor};

/// Refuse at once, or wait up to a bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Over the limit, answer at once with a [`Refusal`].
    Refuse,
    /// Over the limit, wait in a prioritised queue for a cell; refuse at once when the
    /// wait would be longer than `max_wait` or the queue holds `max_queue` requests.
    Wait {
        /// The longest a request may wait.
        max_wait: Duration,
        /// The most requests that may wait at once.
        max_queue: usize,
    },
}

pub(crate) struct Shared {
    pub(crate) limits: Vec<ActiveLimit>,
    pub(crate) mode: Mode,
    pub(crate) clock: SharedClock,
    pub(crate) priority: Arc<dyn PriorityExtractor>,
    pub(crate) adaptive: bool,
    queue: Mutex<Queue>,
    /// Requests in the queue, readable without the lock.
    waiting: AtomicUsize,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("limits", &self.limits)
            .field("mode", &self.mode)
            .field("waiting", &self.waiting.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A request's keys, one per limit. One limit is the common case: its key is kept inline,
/// with no allocation.
#[derive(Clone, Debug)]
pub(crate) enum Keys {
    One([Key; 1]),
    Many(Vec<Key>),
}

impl std::ops::Deref for Keys {
    type Target = [Key];
    fn deref(&self) -> &[Key] {
        match self {
            Keys::One(k) => k,
            Keys::Many(v) => v,
        }
    }
}

impl FromIterator<Key> for Keys {
    fn from_iter<I: IntoIterator<Item = Key>>(iter: I) -> Self {
        let mut iter = iter.into_iter();
        match (iter.next(), iter.next()) {
            (Some(a), None) => Keys::One([a]),
            (first, second) => Keys::Many(first.into_iter().chain(second).chain(iter).collect()),
        }
    }
}

/// What happens to a request on arrival.
pub(crate) enum Admission {
    Now,
    Wait(Acquire),
    Refused(Refusal),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Slot {
    priority: Reverse<Priority>,
    seq: u64,
}

struct Entry {
    keys: Arc<[Key]>,
    granted: bool,
    /// First in line for its keys: it holds the timer for when a cell frees.
    head: bool,
    ready_at: Option<Instant>,
    waker: Option<Waker>,
    /// The limit that made it wait, for metrics and refusals.
    binding: usize,
}

#[derive(Default)]
struct Queue {
    entries: BTreeMap<Slot, Entry>,
    next_seq: u64,
}

fn lock(m: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    // Each critical section leaves the queue consistent before it can panic (it calls no
    // user code), so a poisoned lock is still sound to use.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn shares(a: &[Key], b: &[Key]) -> bool {
    a.iter().zip(b).any(|(x, y)| x == y)
}

impl Shared {
    pub(crate) fn new(
        limits: Vec<ActiveLimit>,
        mode: Mode,
        clock: SharedClock,
        priority: Arc<dyn PriorityExtractor>,
    ) -> Self {
        let adaptive = limits.iter().any(|l| l.limit.adaptive);
        Self {
            limits,
            mode,
            clock,
            priority,
            adaptive,
            queue: Mutex::new(Queue::default()),
            waiting: AtomicUsize::new(0),
        }
    }

    /// Takes a cell from every limit, or from none. On a refusal it still asks the other
    /// limits (giving back at once what they grant), so the wait it reports is the time
    /// until *all* of them would admit.
    pub(crate) fn try_admit(&self, keys: &[Key]) -> Result<(), (usize, Denial)> {
        let mut denied: Option<(usize, Denial)> = None;
        for (i, (limit, key)) in self.limits.iter().zip(keys).enumerate() {
            match limit.check(key) {
                Ok(()) if denied.is_some() => limit.refund(key),
                Ok(()) => {}
                Err(d) => {
                    if denied.is_none() {
                        for (l, k) in self.limits[..i].iter().zip(keys) {
                            l.refund(k);
                        }
                    }
                    denied = Some(match denied {
                        Some(prev) if worse(prev.1, d) => prev,
                        _ => (i, d),
                    });
                }
            }
        }
        denied.map_or(Ok(()), Err)
    }

    pub(crate) fn refund(&self, keys: &[Key]) {
        for (l, k) in self.limits.iter().zip(keys) {
            l.refund(k);
        }
    }

    pub(crate) fn refusal(
        &self,
        i: usize,
        key: &Key,
        wait: Option<Duration>,
        reason: Reason,
    ) -> Refusal {
        let limit = &self.limits[i].limit;
        let q = limit.quota;
        self.limits[i].metrics.refused(reason);
        tracing::debug!(
            limit = %limit.name,
            reason = crate::metrics::reason_label(reason),
            retry_after_ms = wait.map(|w| w.as_millis() as u64),
            "rate limit refused a request"
        );
        Refusal::new(LimitKind::Requests, Arc::clone(&limit.name), wait)
            .with_key(key.clone())
            .with_reason(reason)
            .with_quota(QuotaInfo {
                limit: u64::from(q.burst_size()),
                window: q.window(),
                remaining: 0,
            })
    }

    pub(crate) fn count_admitted(&self) {
        for l in &self.limits {
            l.metrics.admitted();
        }
    }

    /// Decides what happens to a request with these keys and priority.
    pub(crate) fn admit(self: &Arc<Self>, keys: Keys, priority: Priority) -> Admission {
        let (max_wait, max_queue) = match self.mode {
            Mode::Refuse => {
                return match self.try_admit(&keys) {
                    Ok(()) => Admission::Now,
                    Err((i, Denial::Wait(w))) => {
                        Admission::Refused(self.refusal(i, &keys[i], Some(w), Reason::OverLimit))
                    }
                    Err((i, Denial::Never)) => {
                        Admission::Refused(self.refusal(i, &keys[i], None, Reason::TooLarge))
                    }
                };
            }
            Mode::Wait {
                max_wait,
                max_queue,
            } => (max_wait, max_queue),
        };
        if self.waiting.load(Ordering::Acquire) == 0 {
            match self.try_admit(&keys) {
                Ok(()) => return Admission::Now,
                Err((i, Denial::Never)) => {
                    return Admission::Refused(self.refusal(i, &keys[i], None, Reason::TooLarge))
                }
                Err((i, Denial::Wait(w))) => {
                    if w > max_wait {
                        return Admission::Refused(self.refusal(
                            i,
                            &keys[i],
                            Some(w),
                            Reason::WaitTooLong,
                        ));
                    }
                }
            }
        }
        let now = self.clock.now();
        let keys: Arc<[Key]> = keys.iter().cloned().collect();
        let mut wakers = Vec::new();
        let result = {
            let mut q = lock(&self.queue);
            let ahead: Vec<&Entry> = q
                .entries
                .iter()
                .filter(|(slot, e)| {
                    !e.granted && slot.priority.0 >= priority && shares(&e.keys, &keys)
                })
                .map(|(_, e)| e)
                .collect();
            // The wait this request faces: its own, or behind the ones ahead of it for the
            // same keys, one cell each.
            let (binding, estimate) = if ahead.is_empty() {
                match self.try_admit(&keys) {
                    Ok(()) => return Admission::Now,
                    Err((i, Denial::Never)) => {
                        return Admission::Refused(self.refusal(
                            i,
                            &keys[i],
                            None,
                            Reason::TooLarge,
                        ))
                    }
                    // Nobody ahead, and no cell now: wait for it in the queue.
                    Err((i, Denial::Wait(w))) => (i, w),
                }
            } else {
                let first = ahead
                    .iter()
                    .filter_map(|e| e.ready_at)
                    .min()
                    .map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
                let (i, per) = self
                    .limits
                    .iter()
                    .enumerate()
                    .map(|(i, l)| (i, l.limit.quota.interval()))
                    .max_by_key(|(_, d)| *d)
                    .unwrap_or((0, Duration::ZERO));
                (i, first + per.saturating_mul(ahead.len() as u32))
            };
            if estimate > max_wait {
                Err(self.refusal(binding, &keys[binding], Some(estimate), Reason::WaitTooLong))
            } else if q.entries.len() >= max_queue {
                Err(self.refusal(binding, &keys[binding], Some(estimate), Reason::QueueFull))
            } else {
                let slot = Slot {
                    priority: Reverse(priority),
                    seq: q.next_seq,
                };
                q.next_seq += 1;
                q.entries.insert(
                    slot,
                    Entry {
                        keys,
                        granted: false,
                        head: false,
                        ready_at: None,
                        waker: None,
                        binding,
                    },
                );
                self.waiting.fetch_add(1, Ordering::AcqRel);
                q.dispatch(self, now, Some(slot), &mut wakers);
                Ok(slot)
            }
        };
        for w in wakers {
            w.wake();
        }
        match result {
            Err(r) => Admission::Refused(r),
            Ok(slot) => Admission::Wait(Acquire {
                shared: Arc::clone(self),
                slot,
                enqueued_at: now,
                deadline: now + max_wait,
                sleep: None,
                done: false,
            }),
        }
    }

    /// Requests waiting now.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

/// Which denial is further from passing.
fn worse(a: Denial, b: Denial) -> bool {
    match (a, b) {
        (Denial::Never, _) => true,
        (_, Denial::Never) => false,
        (Denial::Wait(x), Denial::Wait(y)) => x >= y,
    }
}

impl Queue {
    /// Hands out free cells in queue order: priority first, then arrival. For each set of
    /// keys only the first waiter in line is tried (no waiter overtakes another with the
    /// same keys, and a waiter never blocks one whose keys it does not share). A waiter
    /// that is granted a cell, or becomes first in line, is woken; nobody else is, so
    /// waiters are released one by one rather than all woken to race.
    fn dispatch(
        &mut self,
        shared: &Shared,
        now: Instant,
        current: Option<Slot>,
        wakers: &mut Vec<Waker>,
    ) {
        let mut blocked: Vec<Arc<[Key]>> = Vec::new();
        for (slot, e) in self.entries.iter_mut() {
            if e.granted {
                continue;
            }
            if blocked.iter().any(|b| shares(b, &e.keys)) {
                e.head = false;
                continue;
            }
            let woke_needed = match shared.try_admit(&e.keys) {
                Ok(()) => {
                    e.granted = true;
                    true
                }
                Err((i, denial)) => {
                    let was_head = e.head;
                    e.head = true;
                    e.binding = i;
                    e.ready_at = match denial {
                        Denial::Wait(w) => Some(now + w),
                        Denial::Never => None,
                    };
                    blocked.push(Arc::clone(&e.keys));
                    !was_head
                }
            };
            if woke_needed && Some(*slot) != current {
                if let Some(w) = e.waker.take() {
                    wakers.push(w);
                }
            }
        }
    }
}

/// Waits in the queue for a cell. Dropped before it completes, it leaves the queue and
/// gives back any cell it was granted.
pub(crate) struct Acquire {
    shared: Arc<Shared>,
    slot: Slot,
    enqueued_at: Instant,
    deadline: Instant,
    sleep: Option<(Instant, Sleep)>,
    done: bool,
}

impl std::fmt::Debug for Acquire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acquire")
            .field("deadline", &self.deadline)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

enum Step {
    Done(Result<usize, Refusal>),
    SleepUntil(Instant),
}

impl Acquire {
    fn finish(&mut self) {
        self.done = true;
        self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Future for Acquire {
    type Output = Result<Duration, Refusal>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.done {
            return Poll::Ready(Err(Refusal::new(
                LimitKind::Requests,
                "polled after completion",
                None,
            )));
        }
        loop {
            let shared = Arc::clone(&self.shared);
            let now = shared.clock.now();
            let mut wakers = Vec::new();
            let step = {
                let mut q = lock(&shared.queue);
                let granted = q.entries.get(&self.slot).is_some_and(|e| e.granted);
                if !granted {
                    q.dispatch(&shared, now, Some(self.slot), &mut wakers);
                }
                match q.entries.get_mut(&self.slot) {
                    None => Step::Done(Err(Refusal::new(LimitKind::Requests, "queue", None))),
                    Some(e) if e.granted => {
                        let binding = e.binding;
                        q.entries.remove(&self.slot);
                        Step::Done(Ok(binding))
                    }
                    Some(e) if now >= self.deadline => {
                        let (binding, keys) = (e.binding, Arc::clone(&e.keys));
                        let wait = e.ready_at.map(|t| t.saturating_duration_since(now));
                        q.entries.remove(&self.slot);
                        // Whoever was behind may now be first in line.
                        q.dispatch(&shared, now, None, &mut wakers);
                        Step::Done(Err(shared.refusal(
                            binding,
                            &keys[binding],
                            wait.or(Some(Duration::ZERO)),
                            Reason::WaitTooLong,
                        )))
                    }
                    Some(e) => {
                        if !e.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            e.waker = Some(cx.waker().clone());
                        }
                        let until = if e.head {
                            e.ready_at.map_or(self.deadline, |t| t.min(self.deadline))
                        } else {
                            self.deadline
                        };
                        Step::SleepUntil(until)
                    }
                }
            };
            for w in wakers {
                w.wake();
            }
            match step {
                Step::Done(result) => {
                    self.finish();
                    let waited = now.saturating_duration_since(self.enqueued_at);
                    if let Ok(binding) = result {
                        let limit = &shared.limits[binding];
                        limit.metrics.waited(waited);
                        tracing::debug!(
                            limit = %limit.limit.name,
                            waited_ms = waited.as_millis() as u64,
                            "rate limit admitted a request after a wait"
                        );
                    }
                    return Poll::Ready(result.map(|_| waited));
                }
                Step::SleepUntil(until) => {
                    if self.sleep.as_ref().map(|(t, _)| *t) != Some(until) {
                        let sleep = shared.clock.sleep_until(until);
                        self.sleep = Some((until, sleep));
                    }
                    let Some((_, sleep)) = self.sleep.as_mut() else {
                        return Poll::Pending;
                    };
                    match sleep.as_mut().poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(()) => {
                            self.sleep = None;
                            continue;
                        }
                    }
                }
            }
        }
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let now = self.shared.clock.now();
        let mut wakers = Vec::new();
        {
            let mut q = lock(&self.shared.queue);
            if let Some(e) = q.entries.remove(&self.slot) {
                if e.granted {
                    self.shared.refund(&e.keys);
                }
            }
            q.dispatch(&self.shared, now, None, &mut wakers);
        }
        self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
        for w in wakers {
            w.wake();
        }
    }
}
