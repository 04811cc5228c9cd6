//! Redis-backed stores for Tollgate, so many instances share one quota.
//!
//! [`RedisStore`] implements `tollgate-core`'s [`RateStore`] and [`TokenStore`], and (with
//! the `cache` feature, on by default) `tollgate-cache`'s `CacheStore`; [`PooledStore`]
//! wraps it so that each instance borrows slices of the quotas and spends them in process
//! (one Redis call per hundred decisions instead of one per decision):
//!
//! - **One round trip per decision.** Each decision is one Lua script call (`EVALSHA`;
//!   the script is loaded again by itself after a `NOSCRIPT`, when Redis restarted). The
//!   time is the Redis server's (`TIME`), so the instances' clocks do not matter.
//! - **The GCRA limiter** takes a cell from every limit of a request or from none; **the
//!   token budget** reserves from every budget or from none, holds what it reserved out of
//!   the refill until it is settled with the real usage, and never lets instances overshoot
//!   together.
//! - **Keys** are namespaced (`{tollgate}:rl:…`, `{tollgate}:tk:…`, `{tollgate}:c:…`),
//!   hashed (SHA-256: no tenant id or API key appears in Redis), and expire when idle. The
//!   namespace is a Redis Cluster hash tag, so all the keys of one decision live in one
//!   slot (the price: a namespace lives on one shard; give each service its own).
//! - **Connection:** redis-rs's `ConnectionManager`, one multiplexed connection shared by
//!   every task, reconnecting by itself; created lazily, so an application starts while
//!   Redis is down. Every call has a timeout (50 ms by default); a call that fails or times
//!   out is a [`StoreError`], and the layer applies its [`OnStoreFailure`](tollgate_core::store::OnStoreFailure) policy.
//!
//! It also implements [`CostStore`](tollgate_core::store::CostStore), so cost budgets in
//! dollars per day or month are shared by every instance (one script call to hold, one
//! to settle; a key per budget and window, expiring a day after the window ends).
//!
//! With the `jobs` feature, [`RedisJobStore`] keeps a gateway's jobs (`tollgate-core`'s
//! `JobStore`) in a Redis Stream with a consumer group, so many gateway instances share
//! one queue and take over the work of an instance that died (`XAUTOCLAIM` after the
//! lease).
//!
//! Hand it to the layers with `RateLimitBuilder::store`, `TpmBuilder::store` and
//! `CacheBuilder::store`, or write `store: redis://…` in a policy file.
//!
//! **Holds end.** Every reservation is a hold with a deadline ([`RedisStore::max_hold`],
//! 10 minutes by default): a settlement that never arrives (the process killed with
//! requests in flight, or Redis away when it tried three times) is released as fully
//! spent at the deadline, not held for ever. Known limit: a pooled instance that dies
//! keeps its unspent slices until the bucket's key expires.
//!
//! Why redis-rs and not fred: both are maintained and async; redis-rs is the one most
//! Rust services already link, its `ConnectionManager` and `Script` are exactly the two
//! pieces needed, and it builds with fewer dependencies for this use.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tollgate_core::key::Key;
//! use tollgate_core::store::{RateCell, RateDecision, RateStore};
//! use tollgate_redis::RedisStore;
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = RedisStore::open("redis://127.0.0.1:6379")?.namespace("my-gateway");
//! // 60 a minute, 10 at once, for tenant acme: one round trip.
//! let cells: Arc<[RateCell]> = Arc::new([RateCell {
//!     key: Key::new("rpm:tenant:acme"),
//!     interval: Duration::from_secs(1),
//!     burst: 10,
//! }]);
//! match store.acquire(cells).await? {
//!     RateDecision::Admitted => println!("go"),
//!     RateDecision::Denied { retry_after, .. } => println!("wait {retry_after:?}"),
//! }
//! # Ok(()) }
//! ```
//!
//! Tests of this crate read `REDIS_URL`; without it they skip with a message, unless
//! `TOLLGATE_REQUIRE_REDIS=1` is set (as CI does), in which case they fail.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

#[cfg(feature = "cache")]
mod cache;
mod cost;
#[cfg(feature = "jobs")]
mod jobs;
mod pooled;
mod scripts;

#[cfg(feature = "cache")]
pub use cache::{decode_entry, encode_entry};
#[cfg(feature = "jobs")]
pub use jobs::RedisJobStore;
pub use pooled::PooledStore;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use sha2::{Digest, Sha256};
use tollgate_core::key::Key;
use tollgate_core::store::{
    RateCell, RateDecision, RateStore, StoreError, StoreFuture, TokenCell, TokenDecision,
    TokenStore,
};

/// The default time a call may take before it counts as a failure.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);

/// Limits, budgets and cache entries in Redis; see the [crate docs](crate). Cheap to
/// clone: clones share the connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    namespace: Arc<str>,
    timeout: Duration,
    max_hold: Duration,
    /// Names this process's holds apart from every other's.
    nonce: u64,
    next_hold: Arc<std::sync::atomic::AtomicU64>,
    scripts: Arc<Scripts>,
    #[cfg(feature = "cache")]
    max_entry_bytes: usize,
}

struct Scripts {
    gcra: Script,
    borrow: Script,
    token_borrow: Script,
    reserve: Script,
    settle: Script,
    cost_hold: Script,
    cost_settle: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("namespace", &self.namespace)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store on the Redis at `url` (`redis://host:port/db`, `rediss://` for TLS where
    /// the redis crate is built with it). Does not connect yet: the first call does, and
    /// the connection comes back by itself after Redis restarts.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(StoreError::new)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(250)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let conn =
            ConnectionManager::new_lazy_with_config(client, config).map_err(StoreError::new)?;
        Ok(Self {
            conn,
            namespace: "{tollgate}".into(),
            timeout: DEFAULT_TIMEOUT,
            max_hold: Duration::from_secs(600),
            nonce: {
                use std::hash::{BuildHasher, Hasher};
                // std's RandomState is seeded from the OS: a process's own random number.
                let mut h = std::hash::RandomState::new().build_hasher();
                h.write_u32(std::process::id());
                h.finish()
            },
            next_hold: Arc::new(std::sync::atomic::AtomicU64::new(1)),
            scripts: Arc::new(Scripts {
                gcra: Script::new(scripts::GCRA),
                borrow: Script::new(scripts::BORROW),
                token_borrow: Script::new(&scripts::token_borrow()),
                reserve: Script::new(&scripts::reserve()),
                settle: Script::new(&scripts::settle()),
                cost_hold: Script::new(cost::HOLD),
                cost_settle: Script::new(cost::SETTLE),
            }),
            #[cfg(feature = "cache")]
            max_entry_bytes: 4 * 1024 * 1024,
        })
    }

    /// The prefix of every key, written as a Redis Cluster hash tag (`{tollgate}` by
    /// default): services that must not share quotas use different namespaces.
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = format!("{{{namespace}}}").into();
        self
    }

    /// The longest a call may take (50 ms by default) before it counts as a failure.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The longest a reservation is held for a request that never settles it (10 min by
    /// default): a process that died, or a settlement that could not reach Redis. Past
    /// it, the hold is released as fully spent.
    pub fn max_hold(mut self, d: Duration) -> Self {
        self.max_hold = d;
        self
    }

    /// Asks Redis whether it answers (`PING`), within the store's timeout: a gateway's
    /// readiness check.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let pong: String =
            Self::timed(self.timeout, redis::cmd("PING").query_async(&mut conn)).await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(StoreError::new(format!("PING answered `{pong}`")))
        }
    }

    /// The sorted-set member naming hold `hold` of `amount` tokens.
    fn hold_member(&self, hold: u64, amount: u64) -> String {
        format!("{:016x}{hold:016x}:{amount}", self.nonce)
    }

    /// The Redis key of `key` for `kind`: the namespace, the kind, and 128 bits of the
    /// key's SHA-256.
    fn redis_key(&self, kind: &str, key: &str) -> String {
        let digest = Sha256::digest(key.as_bytes());
        let mut out = String::with_capacity(self.namespace.len() + kind.len() + 36);
        out.push_str(&self.namespace);
        out.push(':');
        out.push_str(kind);
        out.push(':');
        for b in &digest[..16] {
            let _ = write!(out, "{b:02x}");
        }
        out
    }

    /// Runs `call` with the store's timeout.
    async fn timed<T>(
        timeout: Duration,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::new(e)),
            Err(_) => Err(StoreError::new(format!(
                "no answer within {} ms",
                timeout.as_millis()
            ))),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// How long a token bucket's key outlives its last use: two windows, and at least ten
/// minutes, so a reservation still in flight finds its hold.
fn token_ttl_ms(cells: &[TokenCell]) -> u64 {
    let longest = cells.iter().map(|c| c.window).max().unwrap_or_default();
    u64::try_from((longest * 2).max(Duration::from_secs(600)).as_millis()).unwrap_or(u64::MAX)
}

impl RateStore for RedisStore {
    fn acquire(&self, cells: Arc<[RateCell]>) -> StoreFuture<Result<RateDecision, StoreError>> {
        let this = self.clone();
        Box::pin(async move {
            let mut inv = this.scripts.gcra.prepare_invoke();
            for c in cells.iter() {
                inv.key(this.redis_key("rl", c.key.as_str()))
                    .arg(micros(c.interval))
                    .arg(c.burst.max(1));
            }
            let mut conn = this.conn.clone();
            let (ok, binding, wait): (i64, i64, i64) =
                Self::timed(this.timeout, inv.invoke_async(&mut conn)).await?;
            Ok(if ok == 1 {
                RateDecision::Admitted
            } else {
                RateDecision::Denied {
                    binding: usize::try_from(binding).unwrap_or(0),
                    retry_after: Duration::from_micros(u64::try_from(wait).unwrap_or(0)),
                }
            })
        })
    }
}

impl TokenStore for RedisStore {
    fn reserve(
        &self,
        cells: Arc<[TokenCell]>,
        amount: u64,
    ) -> StoreFuture<Result<TokenDecision, StoreError>> {
        let this = self.clone();
        Box::pin(async move {
            let hold = this
                .next_hold
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut inv = this.scripts.reserve.prepare_invoke();
            inv.arg(amount)
                .arg(token_ttl_ms(&cells))
                .arg(this.hold_member(hold, amount))
                .arg(micros(this.max_hold));
            for c in cells.iter() {
                inv.key(this.redis_key("tk", c.key.as_str()))
                    .key(this.redis_key("tkh", c.key.as_str()))
                    .arg(c.capacity)
                    .arg(micros(c.window));
            }
            let mut conn = this.conn.clone();
            let (ok, binding, wait): (i64, i64, i64) =
                Self::timed(this.timeout, inv.invoke_async(&mut conn)).await?;
            Ok(if ok == 1 {
                TokenDecision::Reserved { hold }
            } else {
                TokenDecision::Denied {
                    binding: usize::try_from(binding).unwrap_or(0),
                    retry_after: u64::try_from(wait).ok().map(Duration::from_micros),
                }
            })
        })
    }

    fn settle(
        &self,
        cells: Arc<[TokenCell]>,
        hold: u64,
        reserved: u64,
        used: u64,
    ) -> StoreFuture<Result<(), StoreError>> {
        let this = self.clone();
        Box::pin(async move {
            let mut inv = this.scripts.settle.prepare_invoke();
            inv.arg(reserved)
                .arg(used)
                .arg(token_ttl_ms(&cells))
                .arg(this.hold_member(hold, reserved));
            for c in cells.iter() {
                inv.key(this.redis_key("tk", c.key.as_str()))
                    .key(this.redis_key("tkh", c.key.as_str()))
                    .arg(c.capacity)
                    .arg(micros(c.window));
            }
            let mut conn = this.conn.clone();
            let _: i64 = Self::timed(this.timeout, inv.invoke_async(&mut conn)).await?;
            Ok(())
        })
    }
}

/// The Redis key a store uses for `key` of `kind` (`rl`, `tk` or `c`), for tests and for
/// operators looking for one.
pub fn key_for(store: &RedisStore, kind: &str, key: &Key) -> String {
    store.redis_key(kind, key.as_str())
}
