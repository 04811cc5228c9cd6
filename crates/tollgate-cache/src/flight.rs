//! Single-flight: concurrent identical requests make one upstream call.
//!
//! The first request for a key leads: it calls upstream while the others wait for its
//! outcome. A leader that fails, or whose caller goes away (its guard is dropped), marks the
//! flight abandoned; the waiters wake, the first of them to come back becomes the new
//! leader, and the rest follow it — nobody hangs, and nobody stampedes upstream. (moka's
//! `get_with`, for one, blocks waiters while the leader is not being polled, moka#240; this is why
//! the cache keeps its own flights.)
//!
//! ```
//! use std::sync::Arc;
//! use tollgate_cache::flight::{Joined, SingleFlight};
//! use tollgate_cache::key::CacheKey;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let flights: SingleFlight<Arc<str>> = SingleFlight::new();
//! let key = CacheKey([7; 32]);
//! match flights.join(key).await {
//!     Joined::Leader(guard) => guard.complete(Arc::from("the answer")),
//!     Joined::Done(_) => unreachable!("nobody else is in flight"),
//! }
//! # }
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use crate::key::{CacheKey, KeyHash};

enum State<V> {
    Running,
    Done(V),
    Abandoned,
}

struct Flight<V> {
    state: Mutex<State<V>>,
    notify: Notify,
}

type Flights<V> = Arc<Mutex<HashMap<CacheKey, Arc<Flight<V>>, KeyHash>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a map operation or a state assignment: a panic elsewhere
    // cannot leave them half-done.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The flights in progress, by key. Cheap to clone; clones share the flights.
pub struct SingleFlight<V> {
    flights: Flights<V>,
}

impl<V> Clone for SingleFlight<V> {
    fn clone(&self) -> Self {
        Self {
            flights: Arc::clone(&self.flights),
        }
    }
}

impl<V> std::fmt::Debug for SingleFlight<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleFlight")
            .field("in_flight", &lock(&self.flights).len())
            .finish()
    }
}

impl<V: Clone> Default for SingleFlight<V> {
    fn default() -> Self {
        Self::new()
    }
}

/// What joining a flight gives.
#[derive(Debug)]
pub enum Joined<V> {
    /// Nobody was in flight for the key: call upstream, then complete or abandon.
    Leader(Leader<V>),
    /// Another request's outcome.
    Done(V),
}

/// The leader's duty: finish the flight. Dropped without finishing, it abandons it.
pub struct Leader<V> {
    flights: Flights<V>,
    key: CacheKey,
    flight: Arc<Flight<V>>,
    finished: bool,
}

impl<V> std::fmt::Debug for Leader<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leader").field("key", &self.key).finish()
    }
}

impl<V: Clone> SingleFlight<V> {
    /// No flights.
    pub fn new() -> Self {
        Self {
            flights: Arc::new(Mutex::new(HashMap::default())),
        }
    }

    /// How many keys are in flight.
    pub fn in_flight(&self) -> usize {
        lock(&self.flights).len()
    }

    /// Leads the flight for `key`, or waits for the one in progress.
    pub async fn join(&self, key: CacheKey) -> Joined<V> {
        loop {
            let flight = {
                let mut flights = lock(&self.flights);
                match flights.get(&key) {
                    Some(f) => Arc::clone(f),
                    None => {
                        let flight = Arc::new(Flight {
                            state: Mutex::new(State::Running),
                            notify: Notify::new(),
                        });
                        flights.insert(key, Arc::clone(&flight));
                        return Joined::Leader(Leader {
                            flights: Arc::clone(&self.flights),
                            key,
                            flight,
                            finished: false,
                        });
                    }
                }
            };
            // Register for the wake-up before looking, so a finish in between is not missed.
            let notified = flight.notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            loop {
                match &*lock(&flight.state) {
                    State::Done(v) => return Joined::Done(v.clone()),
                    State::Abandoned => break,
                    State::Running => {}
                }
                notified.as_mut().await;
                notified.set(flight.notify.notified());
                notified.as_mut().enable();
            }
            // Abandoned: come back round; the first one back leads.
        }
    }
}

impl<V> Leader<V> {
    fn finish(&mut self, state: State<V>) {
        self.finished = true;
        *lock(&self.flight.state) = state;
        {
            let mut flights = lock(&self.flights);
            if flights
                .get(&self.key)
                .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
            {
                flights.remove(&self.key);
            }
        }
        self.flight.notify.notify_waiters();
    }

    /// Hands `value` to every waiter.
    pub fn complete(mut self, value: V) {
        self.finish(State::Done(value));
    }

    /// Gives the flight up (the answer is not to be shared); a waiter takes over.
    pub fn abandon(mut self) {
        self.finish(State::Abandoned);
    }
}

impl<V> Drop for Leader<V> {
    fn drop(&mut self) {
        if !self.finished {
            self.finish(State::Abandoned);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    const KEY: CacheKey = CacheKey([1; 32]);

    /// 100 identical requests; the leader takes `delay`, and the first `cancel` leaders
    /// are cancelled before they finish. Returns (upstream calls, answers).
    async fn run(cancel: u32) -> (u32, u32) {
        let flights: SingleFlight<u32> = SingleFlight::new();
        let calls = Arc::new(AtomicU32::new(0));
        let answers = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (flights, calls, answers) =
                (flights.clone(), Arc::clone(&calls), Arc::clone(&answers));
            tasks.push(tokio::spawn(async move {
                match flights.join(KEY).await {
                    Joined::Done(v) => {
                        assert_eq!(v, 42);
                        answers.fetch_add(1, Ordering::SeqCst);
                    }
                    Joined::Leader(guard) => {
                        let n = calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        if n < cancel {
                            drop(guard); // the caller went away mid-call
                            return;
                        }
                        guard.complete(42);
                        answers.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(flights.in_flight(), 0);
        (calls.load(Ordering::SeqCst), answers.load(Ordering::SeqCst))
    }

    #[tokio::test(start_paused = true)]
    async fn a_hundred_identical_requests_make_one_upstream_call() {
        assert_eq!(run(0).await, (1, 100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_leader_is_replaced_by_one_waiter_and_nobody_hangs() {
        // The first leader goes away: one waiter takes over, the other 98 follow it.
        assert_eq!(run(1).await, (2, 99));
        // Three leaders in a row go away: still one call at a time, and all the rest answered.
        assert_eq!(run(3).await, (4, 97));
    }

    #[tokio::test(start_paused = true)]
    async fn different_keys_fly_separately() {
        let flights: SingleFlight<u32> = SingleFlight::new();
        let a = flights.join(CacheKey([1; 32])).await;
        let b = flights.join(CacheKey([2; 32])).await;
        assert!(matches!((&a, &b), (Joined::Leader(_), Joined::Leader(_))));
        assert_eq!(flights.in_flight(), 2);
        drop((a, b));
        assert_eq!(flights.in_flight(), 0);
    }
}
