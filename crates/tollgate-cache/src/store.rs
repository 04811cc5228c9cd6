//! Where answers are kept: the store trait (in `tollgate-core`, with every store trait),
//! and the in-memory store on `moka`.

use std::sync::Arc;
use std::time::Duration;
use tollgate_core::clock::later;

use tokio::time::Instant;
use tollgate_core::clock::{Clock, SharedClock};

use tollgate_core::store::CacheKey;

pub use tollgate_core::store::{CacheStore, StoreFuture, Stored};

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
    fn get(&self, key: &CacheKey) -> StoreFuture<Option<Arc<Stored>>> {
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

    fn put(&self, key: CacheKey, value: Arc<Stored>, ttl: Duration) -> StoreFuture<()> {
        let expires = later(self.clock.now(), ttl);
        metrics::counter!("tollgate_cache_stored_bytes_total").increment(value.size() as u64);
        self.cache.insert(key, Entry { value, expires });
        Box::pin(std::future::ready(()))
    }
}
