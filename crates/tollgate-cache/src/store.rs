//! Where answers are kept: the store trait (in `tollgate-core`, with every store trait),
//! and the in-memory store on `quick_cache`.

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

/// What an entry weighs against the store's bound: its bytes, and a little for the
/// entry itself.
#[derive(Clone, Copy, Debug)]
struct Weigh;

impl quick_cache::Weighter<CacheKey, Entry> for Weigh {
    fn weight(&self, _key: &CacheKey, e: &Entry) -> u64 {
        e.value.size() as u64 + 256
    }
}

/// Counts evictions (the store being full), not removals of expired entries.
#[derive(Clone, Copy, Debug, Default)]
struct CountEvictions;

impl quick_cache::Lifecycle<CacheKey, Entry> for CountEvictions {
    type RequestState = ();
    fn begin_request(&self) {}
    fn on_evict(&self, _: &mut (), _key: CacheKey, _value: Entry) {
        metrics::counter!("tollgate_cache_evictions_total").increment(1);
    }
}

type Inner = quick_cache::sync::Cache<CacheKey, Entry, Weigh, crate::key::KeyHash, CountEvictions>;

/// The in-memory store: `quick_cache` (sharded CLOCK-Pro), bounded in bytes by a weigher.
/// Expiry is kept on the core clock (so a paused clock drives it): an expired entry is
/// dropped when it is next asked for, and otherwise takes its place in the bound until
/// newer entries push it out, so memory never exceeds the bound.
///
/// Chosen over `moka` by measurement (`tollgate-bench overhead --quick --policy` with
/// `primary` and `cache` only, every request a miss, two runs each, 2026-12-01): moka
/// 0.36 and 0.43 of the bare client's throughput, quick_cache 0.46 and 0.46; and fewer
/// instructions per request in `stack-cost`. moka's time-to-live and its housekeeping are
/// not needed: expiry is already kept on the core clock.
#[derive(Clone)]
pub struct MemoryStore {
    cache: Arc<Inner>,
    clock: SharedClock,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.cache.len())
            .field("bytes", &self.cache.weight())
            .finish()
    }
}

impl MemoryStore {
    /// A store holding at most `max_bytes` of bodies (and a little per entry), each entry
    /// until the TTL it was stored with passes on `clock`.
    pub fn new(max_bytes: u64, clock: SharedClock) -> Self {
        // A guess at the count (quick_cache sizes its tables from it): entries of ~2 KiB.
        let estimated = usize::try_from(max_bytes / 2048)
            .unwrap_or(usize::MAX)
            .clamp(16, 1 << 20);
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity(estimated)
            .weight_capacity(max_bytes.max(1))
            .build();
        let cache = match options {
            Ok(options) => Inner::with_options(options, Weigh, Default::default(), CountEvictions),
            // Only a zero estimate or capacity is refused, and neither is passed.
            Err(_) => Inner::with(
                16,
                max_bytes.max(1),
                Weigh,
                Default::default(),
                CountEvictions,
            ),
        };
        Self {
            cache: Arc::new(cache),
            clock,
        }
    }

    /// Entries held.
    pub fn entries(&self) -> u64 {
        self.cache.len() as u64
    }
}

impl CacheStore for MemoryStore {
    fn get(&self, key: &CacheKey) -> StoreFuture<Option<Arc<Stored>>> {
        Box::pin(std::future::ready(self.get_now(key).flatten()))
    }

    fn put(&self, key: CacheKey, value: Arc<Stored>, ttl: Duration) -> StoreFuture<()> {
        self.put_now(key, &value, ttl);
        Box::pin(std::future::ready(()))
    }

    fn get_now(&self, key: &CacheKey) -> Option<Option<Arc<Stored>>> {
        let found = self.cache.get(key).and_then(|e| {
            if self.clock.now() < e.expires {
                Some(e.value)
            } else {
                self.cache.remove(key);
                None
            }
        });
        Some(found)
    }

    fn put_now(&self, key: CacheKey, value: &Arc<Stored>, ttl: Duration) -> bool {
        let expires = later(self.clock.now(), ttl);
        metrics::counter!("tollgate_cache_stored_bytes_total").increment(value.size() as u64);
        self.cache.insert(
            key,
            Entry {
                value: Arc::clone(value),
                expires,
            },
        );
        true
    }
}
