//! Where answers are kept: a store trait, and the in-memory store on `moka`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tollgate_core::clock::later;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::time::Instant;
use tollgate_core::clock::{Clock, SharedClock};

use crate::key::CacheKey;

/// A stored answer: its status, the headers worth replaying, and its body as the frames
/// it arrived in (so a stream replays event by event).
#[derive(Clone, Debug)]
pub struct Stored {
    /// The status (always 2xx).
    pub status: StatusCode,
    /// `content-type` and the like; never per-request headers such as rate-limit state.
    pub headers: HeaderMap,
    /// The body's frames.
    pub frames: Vec<Bytes>,
    /// Whether it was a streamed (SSE) answer.
    pub stream: bool,
}

impl Stored {
    /// The body's size in bytes.
    pub fn size(&self) -> usize {
        self.frames.iter().map(Bytes::len).sum()
    }
}

/// A boxed future, for store methods.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Keeps answers for a time. The in-memory [`MemoryStore`] is the default; a Redis store
/// implements the same trait so instances share one cache.
pub trait CacheStore: Send + Sync + 'static {
    /// The answer stored under `key`, unless it has expired.
    fn get<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, Option<Arc<Stored>>>;
    /// Stores `value` under `key` for `ttl`.
    fn put(&self, key: CacheKey, value: Arc<Stored>, ttl: Duration) -> StoreFuture<'_, ()>;
}

#[derive(Clone)]
struct Entry {
    value: Arc<Stored>,
    expires: Instant,
}

/// The in-memory store: `moka`, bounded in bytes by a weigher. Expiry is checked on the
/// core clock (so a paused clock drives it); moka's own time-to-live, set to the longest
/// TTL in use, only frees memory behind it.
#[derive(Clone)]
pub struct MemoryStore {
    cache: moka::sync::Cache<CacheKey, Entry>,
    clock: SharedClock,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.cache.entry_count())
            .field("bytes", &self.cache.weighted_size())
            .finish()
    }
}

impl MemoryStore {
    /// A store holding at most `max_bytes` of bodies, keeping entries at most `max_ttl`.
    pub fn new(max_bytes: u64, max_ttl: Duration, clock: SharedClock) -> Self {
        let cache = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &CacheKey, e: &Entry| {
                u32::try_from(e.value.size() + 256).unwrap_or(u32::MAX)
            })
            .time_to_live(max_ttl.max(Duration::from_secs(1)))
            .eviction_listener(|_k, _v, cause| {
                if cause.was_evicted() {
                    metrics::counter!("tollgate_cache_evictions_total").increment(1);
                }
            })
            .build();
        Self { cache, clock }
    }

    /// Entries held (moka's count, which may lag a little).
    pub fn entries(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }
}

impl CacheStore for MemoryStore {
    fn get<'a>(&'a self, key: &'a CacheKey) -> StoreFuture<'a, Option<Arc<Stored>>> {
        let found = self.cache.get(key).and_then(|e| {
            if self.clock.now() < e.expires {
                Some(e.value)
            } else {
                self.cache.invalidate(key);
                None
            }
        });
        Box::pin(std::future::ready(found))
    }

    fn put(&self, key: CacheKey, value: Arc<Stored>, ttl: Duration) -> StoreFuture<'_, ()> {
        let expires = later(self.clock.now(), ttl);
        metrics::counter!("tollgate_cache_stored_bytes_total").increment(value.size() as u64);
        self.cache.insert(key, Entry { value, expires });
        Box::pin(std::future::ready(()))
    }
}
