//! Pooled mode: each instance borrows small slices of the quota from Redis and spends them
//! in process, so most decisions never leave it, while Redis still counts every cell.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tollgate_core::clock::later;

use tokio::time::Instant;
use tollgate_core::key::Key;
use tollgate_core::store::{
    RateCell, RateDecision, RateStore, StoreError, StoreFuture, TokenCell, TokenDecision,
    TokenStore,
};

use crate::RedisStore;

/// A [`RateStore`] and [`TokenStore`] that borrows cells and tokens from Redis in slices
/// and spends them in process (the approach TensorZero documents for its rate limits).
///
/// - **The global quota holds.** Redis counts a cell when it is lent, so the instances
///   together never spend more than the quota; cells are spent at most `lease` after
///   they were lent, which is all that pooling shifts.
/// - **Most decisions stay local.** A request is admitted from the local slices of its
///   buckets; only an empty slice costs a round trip, and only one task per instance
///   borrows at a time. A refusal from Redis is remembered until its wait has passed, so
///   the requests behind it are refused locally too.
/// - **Slices shrink as the quota runs out**: Redis lends at most a quarter of what a
///   bucket has left (at least one cell, or the request's tokens), up to `slice` or
///   `token_slice`, so no instance sits on what the others need; what a lease left
///   unspent is given back on the next borrow.
/// - **Budgets** settle in process: a refund goes back to the slice, an overrun is taken
///   from it, and Redis hears of both at the next give-back. Tokens of requests still in
///   flight stay held in Redis across a give-back.
#[derive(Clone)]
pub struct PooledStore {
    redis: RedisStore,
    slice: u32,
    token_slice: u64,
    lease: Duration,
    state: Arc<Shards>,
    tokens: Arc<Mutex<HashMap<Key, TokenPool>>>,
    /// One borrow at a time per shard of buckets (and one for budgets): a task finding
    /// its slice empty waits for the borrow in flight rather than borrowing again.
    borrowing: Arc<[tokio::sync::Mutex<()>]>,
    borrowing_tokens: Arc<tokio::sync::Mutex<()>>,
}

/// A token bucket's slice in process.
///
/// `lent` is what Redis holds for this instance: reservations in flight, free tokens, and
/// tokens spent since the last give-back. At a give-back, the part not in flight goes
/// back: its free tokens return to the bucket, the spent ones stay spent.
#[derive(Debug, Default)]
struct TokenPool {
    lent: u64,
    in_flight: u64,
    /// Negative after a request used more than it reserved.
    free: i64,
    lease_end: Option<Instant>,
    refused_until: Option<Instant>,
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

/// The cell pools, in shards: a decision locks only its own buckets' shards, so the
/// runtime's threads rarely wait on one another.
struct Shards {
    maps: Box<[Mutex<HashMap<Key, Pool>>]>,
    hasher: std::hash::RandomState,
}

type Guards<'a> = Vec<(usize, MutexGuard<'a, HashMap<Key, Pool>>)>;

impl Shards {
    fn new() -> Self {
        Self {
            maps: (0..32).map(|_| Mutex::default()).collect(),
            hasher: std::hash::RandomState::new(),
        }
    }

    fn shard(&self, key: &Key) -> usize {
        use std::hash::BuildHasher;
        (self.hasher.hash_one(key) as usize) % self.maps.len()
    }

    /// Locks the shards of `keys`, in ascending order (so two decisions never wait on
    /// each other in a cycle).
    fn lock(&self, keys: &[Key]) -> Guards<'_> {
        let mut shards: Vec<usize> = keys.iter().map(|k| self.shard(k)).collect();
        shards.sort_unstable();
        shards.dedup();
        shards
            .into_iter()
            .map(|i| (i, lock(&self.maps[i])))
            .collect()
    }

    fn pool<'g>(&self, guards: &'g mut Guards<'_>, key: &Key) -> Option<&'g mut Pool> {
        let shard = self.shard(key);
        guards
            .iter_mut()
            .find(|(i, _)| *i == shard)
            .and_then(|(_, map)| map.get_mut(key))
    }

    fn pool_or_new<'g>(&self, guards: &'g mut Guards<'_>, key: &Key) -> Option<&'g mut Pool> {
        let shard = self.shard(key);
        guards
            .iter_mut()
            .find(|(i, _)| *i == shard)
            .map(|(_, map)| map.entry(key.clone()).or_default())
    }
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
            token_slice: 20_000,
            lease: Duration::from_millis(250),
            state: Arc::new(Shards::new()),
            tokens: Arc::default(),
            borrowing: (0..32).map(|_| tokio::sync::Mutex::new(())).collect(),
            borrowing_tokens: Arc::default(),
        }
    }

    /// The most tokens borrowed at once per budget (20,000 by default; at least the
    /// request's own amount).
    pub fn token_slice(mut self, tokens: u64) -> Self {
        self.token_slice = tokens.max(1);
        self
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

    fn local(&self, keys: &[Key], now: Instant) -> Local {
        let mut guards = self.state.lock(keys);
        let mut refused: Option<(usize, Duration)> = None;
        let mut all_have = true;
        for (i, k) in keys.iter().enumerate() {
            let Some(pool) = self.state.pool(&mut guards, k) else {
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
            if let Some(pool) = self.state.pool(&mut guards, k) {
                pool.cells -= 1;
            }
        }
        Local::Admitted
    }

    async fn borrow(&self, cells: &[RateCell], keys: &[Key]) -> Result<RateDecision, StoreError> {
        let mut shards: Vec<usize> = keys.iter().map(|k| self.state.shard(k)).collect();
        shards.sort_unstable();
        shards.dedup();
        // In ascending order, so two borrows never wait on each other in a cycle.
        let mut _one_at_a_time = Vec::with_capacity(shards.len());
        for i in shards {
            _one_at_a_time.push(self.borrowing[i].lock().await);
        }
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
            let mut guards = self.state.lock(keys);
            // Forget idle buckets once there are many: nothing lent, nothing refused.
            for (_, map) in guards.iter_mut() {
                if map.len() > 1_000 {
                    map.retain(|_, p| p.cells > 0 || p.refused_until.is_some_and(|u| u > now));
                }
            }
            for (c, k) in cells.iter().zip(keys) {
                let Some(pool) = self.state.pool_or_new(&mut guards, k) else {
                    continue;
                };
                let valid = pool.lease_end.is_some_and(|end| end > now);
                let (want, back) = if valid && pool.cells > 0 {
                    (0, 0)
                } else {
                    (self.slice, std::mem::take(&mut pool.cells))
                };
                wanted.push(want > 0);
                inv.key(self.redis.redis_key("rl", k.as_str()))
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
        let mut guards = self.state.lock(keys);
        if ok != 1 {
            let binding = usize::try_from(binding).unwrap_or(0);
            let retry_after = Duration::from_micros(u64::try_from(wait).unwrap_or(0));
            if let Some(pool) = keys
                .get(binding)
                .and_then(|k| self.state.pool(&mut guards, k))
            {
                pool.refused_until = Some(later(now, retry_after));
            }
            return Ok(RateDecision::Denied {
                binding,
                retry_after,
            });
        }
        for ((k, wanted), grant) in keys.iter().zip(&wanted).zip(answer.iter().skip(3)) {
            let Some(pool) = self.state.pool_or_new(&mut guards, k) else {
                continue;
            };
            if *wanted {
                pool.cells = u32::try_from(*grant).unwrap_or(0);
                pool.lease_end = Some(later(now, self.lease));
            }
            // One cell of every bucket is this request's.
            pool.cells = pool.cells.saturating_sub(1);
        }
        Ok(RateDecision::Admitted)
    }
}

impl RateStore for PooledStore {
    fn acquire(&self, cells: Arc<[RateCell]>) -> StoreFuture<Result<RateDecision, StoreError>> {
        // One bucket, the common case: one shard, nothing allocated.
        if let [cell] = &*cells {
            let now = Instant::now();
            let mut map = lock(&self.state.maps[self.state.shard(&cell.key)]);
            if let Some(pool) = map.get_mut(&cell.key) {
                if let Some(until) = pool.refused_until.filter(|u| *u > now) {
                    return Box::pin(std::future::ready(Ok(RateDecision::Denied {
                        binding: 0,
                        retry_after: until - now,
                    })));
                }
                if pool.cells > 0 && pool.lease_end.is_some_and(|end| end > now) {
                    pool.cells -= 1;
                    return Box::pin(std::future::ready(Ok(RateDecision::Admitted)));
                }
            }
        }
        // Local pools are found by the cell's own key; only a borrow hashes it for Redis.
        let keys: Vec<Key> = cells.iter().map(|c| c.key.clone()).collect();
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

enum TokenLocal {
    Reserved,
    Refused(usize, Duration),
    Borrow,
}

impl PooledStore {
    fn tokens_local(&self, keys: &[Key], amount: u64, now: Instant) -> TokenLocal {
        let mut pools = lock(&self.tokens);
        let mut refused: Option<(usize, Duration)> = None;
        let mut all_have = true;
        let need = i64::try_from(amount).unwrap_or(i64::MAX);
        for (i, k) in keys.iter().enumerate() {
            let Some(pool) = pools.get_mut(k) else {
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
            all_have &= pool.free >= need && pool.lease_end.is_some_and(|end| end > now);
        }
        if let Some((i, wait)) = refused {
            return TokenLocal::Refused(i, wait);
        }
        if !all_have {
            return TokenLocal::Borrow;
        }
        for k in keys {
            if let Some(pool) = pools.get_mut(k) {
                pool.free = pool.free.saturating_sub(need);
                pool.in_flight = pool.in_flight.saturating_add(amount);
            }
        }
        TokenLocal::Reserved
    }

    async fn tokens_borrow(
        &self,
        cells: &[TokenCell],
        keys: &[Key],
        amount: u64,
    ) -> Result<TokenDecision, StoreError> {
        let _one_at_a_time = self.borrowing_tokens.lock().await;
        let now = Instant::now();
        match self.tokens_local(keys, amount, now) {
            TokenLocal::Reserved => return Ok(TokenDecision::Reserved { hold: 0 }),
            TokenLocal::Refused(binding, wait) => {
                return Ok(TokenDecision::Denied {
                    binding,
                    retry_after: Some(wait),
                })
            }
            TokenLocal::Borrow => {}
        }
        let need = i64::try_from(amount).unwrap_or(i64::MAX);
        let mut inv = self.redis.scripts.token_borrow.prepare_invoke();
        inv.arg(amount).arg(crate::token_ttl_ms(cells));
        let mut wanted = Vec::with_capacity(keys.len());
        // What is given back, to restore if Redis never hears of it.
        let mut given = Vec::with_capacity(keys.len());
        {
            let mut pools = lock(&self.tokens);
            if pools.len() > 10_000 {
                pools.retain(|_, p| p.lent > 0 || p.refused_until.is_some_and(|u| u > now));
            }
            for (c, k) in cells.iter().zip(keys) {
                let pool = pools.entry(k.clone()).or_default();
                let valid = pool.lease_end.is_some_and(|end| end > now);
                let want = if valid && pool.free >= need {
                    0
                } else {
                    self.token_slice.max(amount)
                };
                // An expired lease, or a slice too small: give back what is not in
                // flight and start again.
                let (back_lent, back_free) = if want > 0 {
                    let back = (pool.lent.saturating_sub(pool.in_flight), pool.free);
                    pool.lent = pool.in_flight;
                    pool.free = 0;
                    back
                } else {
                    (0, 0)
                };
                wanted.push(want > 0);
                given.push((back_lent, back_free));
                inv.key(self.redis.redis_key("tk", k.as_str()))
                    .key(self.redis.redis_key("tkh", k.as_str()))
                    .arg(c.capacity)
                    .arg(crate::micros(c.window))
                    .arg(want)
                    .arg(back_lent)
                    .arg(back_free);
            }
        }
        let mut conn = self.redis.conn.clone();
        let answer: Result<Vec<i64>, StoreError> =
            RedisStore::timed(self.redis.timeout, inv.invoke_async(&mut conn)).await;
        let mut pools = lock(&self.tokens);
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                // Redis may not have taken the give-back: keep it to give again.
                for (k, (lent, free)) in keys.iter().zip(given) {
                    let pool = pools.entry(k.clone()).or_default();
                    pool.lent = pool.lent.saturating_add(lent);
                    pool.free = pool.free.saturating_add(free);
                }
                return Err(e);
            }
        };
        let (ok, binding, wait) = match answer.as_slice() {
            [ok, binding, wait, ..] => (*ok, *binding, *wait),
            _ => {
                return Err(StoreError::new(
                    "an unexpected answer from the borrow script",
                ))
            }
        };
        if ok != 1 {
            let binding = usize::try_from(binding).unwrap_or(0);
            let retry_after = u64::try_from(wait).ok().map(Duration::from_micros);
            if let (Some(wait), Some(pool)) = (
                retry_after,
                keys.get(binding).and_then(|k| pools.get_mut(k)),
            ) {
                pool.refused_until = Some(later(now, wait));
            }
            return Ok(TokenDecision::Denied {
                binding,
                retry_after,
            });
        }
        for ((k, wanted), grant) in keys.iter().zip(&wanted).zip(answer.iter().skip(3)) {
            let pool = pools.entry(k.clone()).or_default();
            if *wanted {
                let grant = u64::try_from(*grant).unwrap_or(0);
                pool.lent = pool.lent.saturating_add(grant);
                pool.free = pool
                    .free
                    .saturating_add(i64::try_from(grant).unwrap_or(i64::MAX));
                pool.lease_end = Some(later(now, self.lease));
            }
            pool.free = pool.free.saturating_sub(need);
            pool.in_flight = pool.in_flight.saturating_add(amount);
        }
        Ok(TokenDecision::Reserved { hold: 0 })
    }
}

impl TokenStore for PooledStore {
    fn reserve(
        &self,
        cells: Arc<[TokenCell]>,
        amount: u64,
    ) -> StoreFuture<Result<TokenDecision, StoreError>> {
        if let Some(i) = cells.iter().position(|c| amount > c.capacity) {
            return Box::pin(std::future::ready(Ok(TokenDecision::Denied {
                binding: i,
                retry_after: None,
            })));
        }
        let keys: Vec<Key> = cells.iter().map(|c| c.key.clone()).collect();
        match self.tokens_local(&keys, amount, Instant::now()) {
            TokenLocal::Reserved => {
                Box::pin(std::future::ready(Ok(TokenDecision::Reserved { hold: 0 })))
            }
            TokenLocal::Refused(binding, wait) => {
                Box::pin(std::future::ready(Ok(TokenDecision::Denied {
                    binding,
                    retry_after: Some(wait),
                })))
            }
            TokenLocal::Borrow => {
                let this = self.clone();
                Box::pin(async move { this.tokens_borrow(&cells, &keys, amount).await })
            }
        }
    }

    /// Settles in process: nothing leaves it until the next give-back.
    fn settle(
        &self,
        cells: Arc<[TokenCell]>,
        _hold: u64,
        reserved: u64,
        used: u64,
    ) -> StoreFuture<Result<(), StoreError>> {
        let mut pools = lock(&self.tokens);
        for c in cells.iter() {
            let pool = pools.entry(c.key.clone()).or_default();
            pool.in_flight = pool.in_flight.saturating_sub(reserved);
            let back = i64::try_from(reserved).unwrap_or(i64::MAX)
                - i64::try_from(used).unwrap_or(i64::MAX);
            pool.free = pool.free.saturating_add(back);
        }
        Box::pin(std::future::ready(Ok(())))
    }
}
