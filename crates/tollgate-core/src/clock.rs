//! One place to take time from.
//!
//! Everything in Tollgate that waits or counts asks a [`Clock`] for the time and for
//! sleeps, so tests can run on a paused or driven clock and finish in milliseconds.
//!
//! - [`TokioClock`] (the default) reads [`tokio::time::Instant`] and sleeps on tokio's
//!   timer, so `tokio::time::pause()` and `#[tokio::test(start_paused = true)]` work end
//!   to end. Its wall clock is anchored at creation and moves with tokio's clock, so a
//!   paused test also sees a paused `SystemTime` when it turns an HTTP date into a wait.
//! - [`ManualClock`] moves only when a test calls [`ManualClock::advance`]; sleeps
//!   complete when the clock passes their deadline. It needs no runtime at all.
//!
//! ```
//! use std::time::Duration;
//! use tollgate_core::clock::{Clock, ManualClock};
//!
//! let clock = ManualClock::new();
//! let start = clock.now();
//! clock.advance(Duration::from_secs(5));
//! assert_eq!(clock.now() - start, Duration::from_secs(5));
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// `at + d`, or a time about a century away when that sum would overflow (a `max_wait`
/// of `Duration::MAX`, a store's absurd wait): to every caller a wait that long means
/// "not in this process's life", and no setting or input may make the sum panic, as
/// `Instant + Duration` does.
pub fn later(at: Instant, d: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    at.checked_add(d)
        .or_else(|| at.checked_add(CENTURY))
        .unwrap_or(at)
}

/// A boxed sleep returned by [`Clock::sleep_until`].
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A source of time and sleeps.
pub trait Clock: fmt::Debug + Send + Sync + 'static {
    /// The monotonic time now.
    fn now(&self) -> Instant;

    /// The wall-clock time now, used to turn HTTP dates and RFC 3339 timestamps into waits.
    fn system_now(&self) -> SystemTime;

    /// A future that completes when the clock reaches `deadline`.
    fn sleep_until(&self, deadline: Instant) -> Sleep;

    /// A future that completes after `duration` has passed on this clock.
    fn sleep(&self, duration: Duration) -> Sleep {
        self.sleep_until(later(self.now(), duration))
    }
}

/// A cheaply cloned handle to any [`Clock`]; the type layers store.
///
/// `SharedClock::default()` is a [`TokioClock`].
#[derive(Clone, Debug)]
pub struct SharedClock(Arc<dyn Clock>);

impl SharedClock {
    /// Wraps a clock.
    pub fn new(clock: impl Clock) -> Self {
        Self(Arc::new(clock))
    }
}

impl Default for SharedClock {
    fn default() -> Self {
        Self::new(TokioClock::new())
    }
}

impl Clock for SharedClock {
    fn now(&self) -> Instant {
        self.0.now()
    }
    fn system_now(&self) -> SystemTime {
        self.0.system_now()
    }
    fn sleep_until(&self, deadline: Instant) -> Sleep {
        self.0.sleep_until(deadline)
    }
}

/// The clock of tokio's timer: real time normally, paused or auto-advancing time under
/// `tokio::time::pause()`.
#[derive(Clone, Copy, Debug)]
pub struct TokioClock {
    anchor: Instant,
    anchor_system: SystemTime,
}

impl TokioClock {
    /// A tokio clock whose wall time starts at the real wall time now.
    pub fn new() -> Self {
        Self {
            anchor: Instant::now(),
            anchor_system: SystemTime::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn system_now(&self) -> SystemTime {
        self.anchor_system + Instant::now().saturating_duration_since(self.anchor)
    }
    fn sleep_until(&self, deadline: Instant) -> Sleep {
        Box::pin(tokio::time::sleep_until(deadline))
    }
}

/// A clock that moves only when told to. Clones share the same time.
#[derive(Clone, Debug)]
pub struct ManualClock {
    inner: Arc<ManualInner>,
}

#[derive(Debug)]
struct ManualInner {
    state: Mutex<ManualState>,
    next_id: AtomicU64,
}

#[derive(Debug)]
struct ManualState {
    now: Instant,
    system: SystemTime,
    sleepers: HashMap<u64, (Instant, Waker)>,
}

impl ManualClock {
    /// A manual clock starting at the current instant and wall time.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(ManualInner {
                state: Mutex::new(ManualState {
                    now: Instant::now(),
                    system: SystemTime::now(),
                    sleepers: HashMap::new(),
                }),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, ManualState> {
        // A panic while holding this lock cannot leave the state half-written (every
        // critical section is a few assignments), so a poisoned lock is still usable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves the clock forward by `by` and wakes every sleep whose deadline has passed.
    pub fn advance(&self, by: Duration) {
        let wakers: Vec<Waker> = {
            let mut state = self.state();
            state.now += by;
            state.system += by;
            let now = state.now;
            let due: Vec<u64> = state
                .sleepers
                .iter()
                .filter(|(_, (deadline, _))| *deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            due.into_iter()
                .filter_map(|id| state.sleepers.remove(&id).map(|(_, w)| w))
                .collect()
        };
        for waker in wakers {
            waker.wake();
        }
    }

    /// How many sleeps are waiting on this clock (useful to assert that a caller waits).
    pub fn sleepers(&self) -> usize {
        self.state().sleepers.len()
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.state().now
    }
    fn system_now(&self) -> SystemTime {
        self.state().system
    }
    fn sleep_until(&self, deadline: Instant) -> Sleep {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        Box::pin(ManualSleep {
            clock: self.clone(),
            id,
            deadline,
        })
    }
}

struct ManualSleep {
    clock: ManualClock,
    id: u64,
    deadline: Instant,
}

impl Future for ManualSleep {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.clock.state();
        if state.now >= self.deadline {
            state.sleepers.remove(&self.id);
            Poll::Ready(())
        } else {
            state
                .sleepers
                .insert(self.id, (self.deadline, cx.waker().clone()));
            Poll::Pending
        }
    }
}

impl Drop for ManualSleep {
    fn drop(&mut self) {
        self.clock.state().sleepers.remove(&self.id);
    }
}

/// Runs `tick(&target)` every `every` (at least 1 ms) on the clock, in a task on the tokio
/// runtime current at the call, for as long as `target` is alive: the task holds only a
/// weak reference and ends at its first tick after the last strong one is dropped.
/// Returns `false`, and starts nothing, outside a tokio runtime.
///
/// Layers use it to drop the state of idle keys.
pub fn spawn_periodic<T: Send + Sync + 'static>(
    target: &Arc<T>,
    clock: SharedClock,
    every: Duration,
    tick: fn(&T),
) -> bool {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return false;
    };
    let weak = Arc::downgrade(target);
    let every = every.max(Duration::from_millis(1));
    handle.spawn(async move {
        loop {
            clock.sleep(every).await;
            let Some(target) = weak.upgrade() else { return };
            tick(&target);
        }
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Poll;

    fn poll_once(fut: &mut Sleep) -> Poll<()> {
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        fut.as_mut().poll(&mut cx)
    }

    #[test]
    fn later_never_panics_and_is_exact_when_it_can_be() {
        let now = Instant::now();
        assert_eq!(
            later(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        let far = later(now, Duration::MAX);
        assert!(far > now + Duration::from_secs(50 * 365 * 24 * 3600));
    }

    #[test]
    fn manual_sleep_completes_only_when_advanced_past_deadline() {
        let clock = ManualClock::new();
        let mut sleep = clock.sleep(Duration::from_millis(100));
        assert!(poll_once(&mut sleep).is_pending());
        assert_eq!(clock.sleepers(), 1);
        clock.advance(Duration::from_millis(99));
        assert!(poll_once(&mut sleep).is_pending());
        clock.advance(Duration::from_millis(1));
        assert!(poll_once(&mut sleep).is_ready());
        assert_eq!(clock.sleepers(), 0);
    }

    #[test]
    fn dropped_sleep_leaves_no_sleeper_behind() {
        let clock = ManualClock::new();
        let mut sleep = clock.sleep(Duration::from_secs(1));
        assert!(poll_once(&mut sleep).is_pending());
        drop(sleep);
        assert_eq!(clock.sleepers(), 0);
    }

    #[test]
    fn manual_wall_clock_moves_with_the_monotonic_clock() {
        let clock = ManualClock::new();
        let t0 = clock.system_now();
        clock.advance(Duration::from_secs(30));
        assert_eq!(
            clock.system_now().duration_since(t0).ok(),
            Some(Duration::from_secs(30))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time_for_both_clocks() {
        let clock = SharedClock::default();
        let (t0, w0) = (clock.now(), clock.system_now());
        clock.sleep(Duration::from_secs(3600)).await;
        assert_eq!(clock.now() - t0, Duration::from_secs(3600));
        let wall = clock.system_now().duration_since(w0).unwrap_or_default();
        assert_eq!(wall, Duration::from_secs(3600));
    }
}
