//! Pooled mode: each instance borrows small slices of the quota from Redis and spends them
//! in process, so most decisions never leave it, while Redis still counts every cell.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tollgate_core::store::{RateCell, RateDecision, RateStore, StoreError, StoreFuture};

use crate::RedisStore;

/// A [`RateStore`] that borrows cells from Redis in slices and spends them in process
/// (the approach TensorZero documents for its rate limits).
///
/// - **The global quota holds.** Redis counts a cell when it is lent, so the instances
///   together never spend more than the quota; cells are spent at most `lease` after
///   they were lent, which is all that pooling shifts.
/// - **Most decisions stay local.** A request is admitted from the local slices of its
///   buckets; only an empty slice costs a round trip, and only one task per instance
///   borrows at a time. A refusal from Redis is remembered until its wait has passed, so
///   the requests behind it are refused locally too.
/// - **Slices shrink as the quota runs out**: Redis lends at most a quarter of what a
///   bucket has left (at least one cell), up to `slice`, so no instance sits on what the
///   others need; cells not spent within the lease are given back on the next borrow.
#[derive(Clone)]
pub struct PooledStore {
    redis: RedisStore,
    slice: u32,
    lease: Duration,
    state: Arc<Mutex<HashMap<String, Pool>>>,
    borrowing: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for PooledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledStore")
            .field("slice", &self.slice)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Pool {
    cells: u32,
    lease_end: Option<Instant>,
    refused_until: Option<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the map consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

enum Local {
    Admitted,
    Refused(usize, Duration),
    Borrow,
}

impl PooledStore {
    /// Pooled decisions over `redis`: slices of at most 100 cells, kept 250 ms.
    pub fn new(redis: RedisStore) -> Self {
        Self {
            redis,
            slice: 100,
            lease: Duration::from_millis(250),
            state: Arc::default(),
            borrowing: Arc::default(),
        }
    }

    /// The most cells borrowed at once per bucket.
    pub fn slice(mut self, cells: u32) -> Self {
        self.slice = cells.max(1);
        self
    }

    /// How long borrowed cells may be spent before they go back.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    fn local(&self, keys: &[String], now: Instant) -> Local {
        let mut state = lock(&self.state);
        let mut refused: Option<(usize, Duration)> = None;
        let mut all_have = true;
        for (i, k) in keys.iter().enumerate() {
            let Some(pool) = state.get_mut(k) else {
                all_have = false;
                continue;
            };
            if let Some(until) = pool.refused_until {
                if until > now {
                    let wait = until - now;
                    if refused.is_none_or(|(_, w)| wait > w) {
                        refused = Some((i, wait));
                    }
                } else {
                    pool.refused_until = None;
                }
            }
            all_have &= pool.cells > 0 && pool.lease_end.is_some_and(|end| end > now);
        }
        if let Some((i, wait)) = refused {
            return Local::Refused(i, wait);
        }
        if !all_have {
            return Local::Borrow;
        }
        for k in keys {
            if let Some(pool) = state.get_mut(k) {
                pool.cells -= 1;
            }
        }
        Local::Admitted
    }

    async fn borrow(
        &self,
        cells: &[RateCell],
        keys: &[String],
    ) -> Result<RateDecision, StoreError> {
        let _one_at_a_time = self.borrowing.lock().await;
        let now = Instant::now();
        // Another task may have borrowed while this one waited.
        match self.local(keys, now) {
            Local::Admitted => return Ok(RateDecision::Admitted),
            Local::Refused(binding, retry_after) => {
                return Ok(RateDecision::Denied {
                    binding,
                    retry_after,
                })
            }
            Local::Borrow => {}
        }
        let mut inv = self.redis.scripts.borrow.prepare_invoke();
        let mut wanted = Vec::with_capacity(keys.len());
        {
            let mut state = lock(&self.state);
            // Forget idle buckets once there are many: nothing lent, nothing refused.
            if state.len() > 10_000 {
                state.retain(|_, p| p.cells > 0 || p.refused_until.is_some_and(|u| u > now));
            }
            for (c, k) in cells.iter().zip(keys) {
                let pool = state.entry(k.clone()).or_default();
                let valid = pool.lease_end.is_some_and(|end| end > now);
                let (want, back) = if valid && pool.cells > 0 {
                    (0, 0)
                } else {
                    (self.slice, std::mem::take(&mut pool.cells))
                };
                wanted.push(want > 0);
                inv.key(k)
                    .arg(crate::micros(c.interval))
                    .arg(c.burst.max(1))
                    .arg(want)
                    .arg(back);
            }
        }
        let mut conn = self.redis.conn.clone();
        let answer: Vec<i64> =
            RedisStore::timed(self.redis.timeout, inv.invoke_async(&mut conn)).await?;
        let (ok, binding, wait) = match answer.as_slice() {
            [ok, binding, wait, ..] => (*ok, *binding, *wait),
            _ => {
                return Err(StoreError::new(
                    "an unexpected answer from the borrow script",
                ))
            }
        };
        let mut state = lock(&self.state);
        if ok != 1 {
            let binding = usize::try_from(binding).unwrap_or(0);
            let retry_after = Duration::from_micros(u64::try_from(wait).unwrap_or(0));
            if let Some(pool) = keys.get(binding).and_then(|k| state.get_mut(k)) {
                pool.refused_until = Some(now + retry_after);
            }
            return Ok(RateDecision::Denied {
                binding,
                retry_after,
            });
        }
        for ((k, wanted), grant) in keys.iter().zip(&wanted).zip(answer.iter().skip(3)) {
            let pool = state.entry(k.clone()).or_default();
            if *wanted {
                pool.cells = u32::try_from(*grant).unwrap_or(0);
                pool.lease_end = Some(now + self.lease);
            }
            // One cell of every bucket is this request's.
            pool.cells = pool.cells.saturating_sub(1);
        }
        Ok(RateDecision::Admitted)
    }
}

impl RateStore for PooledStore {
    fn acquire(&self, cells: Arc<[RateCell]>) -> StoreFuture<Result<RateDecision, StoreError>> {
        let keys: Vec<String> = cells
            .iter()
            .map(|c| self.redis.redis_key("rl", c.key.as_str()))
            .collect();
        match self.local(&keys, Instant::now()) {
            Local::Admitted => Box::pin(std::future::ready(Ok(RateDecision::Admitted))),
            Local::Refused(binding, retry_after) => {
                Box::pin(std::future::ready(Ok(RateDecision::Denied {
                    binding,
                    retry_after,
                })))
            }
            Local::Borrow => {
                let this = self.clone();
                Box::pin(async move { this.borrow(&cells, &keys).await })
            }
        }
    }
}
