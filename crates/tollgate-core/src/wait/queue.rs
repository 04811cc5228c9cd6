//! The queue itself. See the [module docs](super).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

use super::{Admit, Denial, Fair, Mode, Priority, Share, Slot, Tagged};
use crate::clock::{Clock, SharedClock, Sleep};
use crate::refusal::{LimitKind, Reason, Refusal};

/// Limits and the requests waiting on them. Share it in an `Arc`.
pub struct WaitQueue<A: Admit> {
    admit: A,
    mode: Mode,
    clock: SharedClock,
    queue: Mutex<Queue<A::Ticket>>,
    /// Requests in the queue, readable without the lock.
    waiting: AtomicUsize,
}

impl<A: Admit + fmt::Debug> fmt::Debug for WaitQueue<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WaitQueue")
            .field("admit", &self.admit)
            .field("mode", &self.mode)
            .field("waiting", &self.waiting())
            .finish_non_exhaustive()
    }
}

/// What happens to a request on arrival.
#[derive(Debug)]
pub enum Admission<A: Admit> {
    /// Admitted now: what it needed has been taken.
    Now,
    /// It must wait: the future completes when it is admitted, or refused.
    Wait(Acquire<A>),
    /// Refused now.
    Refused(Refusal),
}

struct Entry<T> {
    ticket: Arc<T>,
    granted: bool,
    /// First in line for its buckets: it holds the timer for when capacity frees.
    head: bool,
    ready_at: Option<Instant>,
    waker: Option<Waker>,
    /// The limit that holds it back.
    binding: usize,
    /// Its tags in the fair share.
    tags: Tagged,
}

struct Queue<T> {
    entries: BTreeMap<Slot, Entry<T>>,
    fair: Fair,
}

impl<T> Queue<T> {
    /// A waiter was served: the fair share's virtual time moves on.
    fn served(&mut self, start: u128) {
        self.fair.served(start, self.entries.len());
    }
}

fn lock<T>(m: &Mutex<Queue<T>>) -> MutexGuard<'_, Queue<T>> {
    // The critical sections call only `Admit` methods, which must not panic; and each
    // leaves the queue consistent, so a poisoned lock is still sound to use.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<A: Admit> WaitQueue<A> {
    /// A queue over `admit`, deciding by `mode`, timed by `clock`.
    pub fn new(admit: A, mode: Mode, clock: SharedClock) -> Self {
        Self {
            admit,
            mode,
            clock,
            queue: Mutex::new(Queue {
                entries: BTreeMap::new(),
                fair: Fair::default(),
            }),
            waiting: AtomicUsize::new(0),
        }
    }

    /// The limits.
    pub fn admitter(&self) -> &A {
        &self.admit
    }

    /// Refuse or wait.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The clock.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    fn refused(
        &self,
        ticket: &A::Ticket,
        (binding, denial): (usize, Denial),
        max_wait: Option<Duration>,
    ) -> Option<Refusal> {
        match denial {
            Denial::Never => Some(self.admit.refusal(ticket, binding, None, Reason::TooLarge)),
            Denial::Held => match max_wait {
                None => Some(self.admit.refusal(ticket, binding, None, Reason::OverLimit)),
                Some(_) => None,
            },
            Denial::Wait(w) => match max_wait {
                None => Some(
                    self.admit
                        .refusal(ticket, binding, Some(w), Reason::OverLimit),
                ),
                Some(max) if w > max => {
                    Some(
                        self.admit
                            .refusal(ticket, binding, Some(w), Reason::WaitTooLong),
                    )
                }
                Some(_) => None,
            },
        }
    }

    /// Capacity changed outside the queue — a quota was learned, slow start ended — so hands
    /// it to the waiters now rather than at their next timer.
    pub fn dispatch(&self) {
        if self.waiting() == 0 {
            return;
        }
        let now = self.clock.now();
        let mut wakers = Vec::new();
        lock(&self.queue).dispatch(&self.admit, now, None, &mut wakers);
        for w in wakers {
            w.wake();
        }
    }

    /// Decides what happens to a request with this ticket and priority.
    pub fn admit(self: &Arc<Self>, ticket: A::Ticket, priority: Priority) -> Admission<A> {
        self.admit_shared(ticket, priority, None)
    }

    /// [`admit`](Self::admit) for a request of a flow with a [`Share`]: among waiters of
    /// the same priority, capacity goes to the flows in proportion to their weights, each
    /// request costing [`Admit::cost`].
    pub fn admit_shared(
        self: &Arc<Self>,
        ticket: A::Ticket,
        priority: Priority,
        share: Option<Share>,
    ) -> Admission<A> {
        let (max_wait, max_queue) = match self.mode {
            Mode::Refuse => {
                return match self.admit.try_admit(&ticket) {
                    Ok(()) => Admission::Now,
                    Err(denied) => match self.refused(&ticket, denied, None) {
                        Some(r) => Admission::Refused(r),
                        None => Admission::Now, // unreachable: refuse mode refuses every denial
                    },
                };
            }
            Mode::Wait {
                max_wait,
                max_queue,
            } => (max_wait, max_queue),
        };
        // Nobody waiting: no order to keep, so no lock to take — unless the request has a
        // fair share, whose flow is charged for what it takes even then (a flow that
        // just took the burst must not also be first in line next).
        if self.waiting() == 0 && share.is_none() {
            match self.admit.try_admit(&ticket) {
                Ok(()) => return Admission::Now,
                Err(denied) => {
                    if let Some(r) = self.refused(&ticket, denied, Some(max_wait)) {
                        return Admission::Refused(r);
                    }
                }
            }
        }
        let now = self.clock.now();
        let ticket = Arc::new(ticket);
        let mut wakers = Vec::new();
        let cost = self.admit.cost(&ticket);
        let result = {
            let mut q = lock(&self.queue);
            let tags = q.fair.tag(priority, share, cost);
            let (slot, start) = (tags.slot, tags.slot.start);
            let ahead: Vec<&Entry<A::Ticket>> = q
                .entries
                .range(..slot)
                .filter(|(_, e)| !e.granted && self.admit.shares(&e.ticket, &ticket))
                .map(|(_, e)| e)
                .collect();
            // The wait this request faces: its own when nobody is ahead of it, else the
            // first in line's and one pace for every waiter ahead.
            let (binding, estimate) = if ahead.is_empty() {
                match self.admit.try_admit(&ticket) {
                    Ok(()) => {
                        q.served(start);
                        return Admission::Now;
                    }
                    Err(denied) => {
                        if let Some(r) = self.refused(&ticket, denied, Some(max_wait)) {
                            q.fair.untag(&tags);
                            return Admission::Refused(r);
                        }
                        match denied {
                            (i, Denial::Wait(w)) => (i, w),
                            (i, Denial::Never) => (i, Duration::MAX),
                            // Nobody can say when; `max_wait` bounds it as it waits.
                            (i, Denial::Held) => (i, Duration::ZERO),
                        }
                    }
                }
            } else {
                let first = ahead
                    .iter()
                    .filter_map(|e| e.ready_at)
                    .min()
                    .map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
                let binding = ahead.first().map_or(0, |e| e.binding);
                let pace = self.admit.pace(&ticket);
                (
                    binding,
                    first.saturating_add(pace.saturating_mul(ahead.len() as u32)),
                )
            };
            if estimate > max_wait {
                q.fair.untag(&tags);
                Err(self
                    .admit
                    .refusal(&ticket, binding, Some(estimate), Reason::WaitTooLong))
            } else if q.entries.len() >= max_queue {
                q.fair.untag(&tags);
                Err(self
                    .admit
                    .refusal(&ticket, binding, Some(estimate), Reason::QueueFull))
            } else {
                q.entries.insert(
                    slot,
                    Entry {
                        ticket,
                        granted: false,
                        head: false,
                        ready_at: None,
                        waker: None,
                        binding,
                        tags,
                    },
                );
                self.waiting.fetch_add(1, Ordering::AcqRel);
                q.dispatch(&self.admit, now, Some(slot), &mut wakers);
                Ok(slot)
            }
        };
        for w in wakers {
            w.wake();
        }
        match result {
            Err(r) => Admission::Refused(r),
            Ok(slot) => Admission::Wait(Acquire {
                queue: Arc::clone(self),
                slot,
                enqueued_at: now,
                deadline: crate::clock::later(now, max_wait),
                sleep: None,
                done: false,
            }),
        }
    }
}

impl<T> Queue<T> {
    /// Hands out free capacity in queue order. For each set of buckets only the first
    /// waiter in line is tried; a waiter that is granted, or becomes first in line, is
    /// woken (unless it is the one polling, `current`), and nobody else is.
    fn dispatch<A: Admit<Ticket = T>>(
        &mut self,
        admit: &A,
        now: Instant,
        current: Option<Slot>,
        wakers: &mut Vec<Waker>,
    ) {
        let mut blocked: Vec<Arc<T>> = Vec::new();
        let mut served = None;
        for (slot, e) in self.entries.iter_mut() {
            if e.granted {
                continue;
            }
            if blocked.iter().any(|b| admit.shares(b, &e.ticket)) {
                e.head = false;
                continue;
            }
            let wake = match admit.try_admit(&e.ticket) {
                Ok(()) => {
                    e.granted = true;
                    served = served.max(Some(slot.start));
                    true
                }
                Err((i, denial)) => {
                    let was_head = e.head;
                    e.head = true;
                    e.binding = i;
                    e.ready_at = match denial {
                        Denial::Wait(w) => Some(crate::clock::later(now, w)),
                        Denial::Never | Denial::Held => None,
                    };
                    blocked.push(Arc::clone(&e.ticket));
                    !was_head
                }
            };
            if wake && Some(*slot) != current {
                if let Some(w) = e.waker.take() {
                    wakers.push(w);
                }
            }
        }
        if let Some(start) = served {
            self.served(start);
        }
    }
}

/// Waits in a [`WaitQueue`] until admitted. Dropped before it completes, it leaves the
/// queue and gives back whatever it was granted. Resolves to the time waited, or to the
/// refusal when `max_wait` passes first.
pub struct Acquire<A: Admit> {
    queue: Arc<WaitQueue<A>>,
    slot: Slot,
    enqueued_at: Instant,
    deadline: Instant,
    sleep: Option<(Instant, Sleep)>,
    done: bool,
}

impl<A: Admit> fmt::Debug for Acquire<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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

impl<A: Admit> Future for Acquire<A> {
    type Output = Result<Duration, Refusal>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.done {
            return Poll::Ready(Err(Refusal::new(LimitKind::Requests, "wait queue", None)));
        }
        loop {
            let shared = Arc::clone(&self.queue);
            let now = shared.clock.now();
            let mut wakers = Vec::new();
            let step = {
                let mut q = lock(&shared.queue);
                let granted = q.entries.get(&self.slot).is_some_and(|e| e.granted);
                if !granted {
                    q.dispatch(&shared.admit, now, Some(self.slot), &mut wakers);
                }
                match q.entries.get_mut(&self.slot) {
                    // Only this future removes its entry, so it is there until it is done.
                    None => Step::Done(Err(Refusal::new(LimitKind::Requests, "wait queue", None))),
                    Some(e) if e.granted => {
                        let binding = e.binding;
                        q.entries.remove(&self.slot);
                        Step::Done(Ok(binding))
                    }
                    Some(e) if now >= self.deadline => {
                        let (binding, ticket) = (e.binding, Arc::clone(&e.ticket));
                        let wait = e.ready_at.map(|t| t.saturating_duration_since(now));
                        let tags = e.tags;
                        q.entries.remove(&self.slot);
                        q.fair.untag(&tags);
                        // Whoever was behind may now be first in line.
                        q.dispatch(&shared.admit, now, None, &mut wakers);
                        Step::Done(Err(shared.admit.refusal(
                            &ticket,
                            binding,
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
                    self.done = true;
                    shared.waiting.fetch_sub(1, Ordering::AcqRel);
                    let waited = now.saturating_duration_since(self.enqueued_at);
                    if let Ok(binding) = result {
                        shared.admit.waited(binding, waited);
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

impl<A: Admit> Drop for Acquire<A> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let now = self.queue.clock.now();
        let mut wakers = Vec::new();
        {
            let mut q = lock(&self.queue.queue);
            if let Some(e) = q.entries.remove(&self.slot) {
                if e.granted {
                    self.queue.admit.refund(&e.ticket);
                } else {
                    q.fair.untag(&e.tags);
                }
            }
            q.dispatch(&self.queue.admit, now, None, &mut wakers);
        }
        self.queue.waiting.fetch_sub(1, Ordering::AcqRel);
        for w in wakers {
            w.wake();
        }
    }
}
