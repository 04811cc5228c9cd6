//! The body of an answer through the cache: replayed, recorded, or passed through.

use std::pin::Pin;
use std::sync::Arc;
use std::task::Context;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body::Body;
use tollgate_core::body::{Watched, Watcher};

use crate::flight::Leader;
use crate::key::CacheKey;
use crate::store::{CacheStore, Stored};

/// What the cache does as a miss passes: keeps its frames (up to the entry bound) and,
/// once the answer is complete, stores it and hands it to the requests that waited.
pub struct Recording {
    pub(crate) key: CacheKey,
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) stream: bool,
    pub(crate) ttl: Duration,
    pub(crate) max_bytes: usize,
    pub(crate) store: Arc<dyn CacheStore>,
    pub(crate) leader: Option<Leader<Arc<Stored>>>,
    pub(crate) frames: Vec<Bytes>,
    pub(crate) size: usize,
    pub(crate) too_big: bool,
}

impl std::fmt::Debug for Recording {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recording")
            .field("key", &self.key)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// The frames copied into one allocation of exactly their size, each frame a slice of it.
/// A frame as it arrived is often a slice of the HTTP client's read buffer, many times
/// its size: kept as it is, an entry would hold that whole buffer while the cache counts
/// only the entry's bytes.
fn compact(frames: &[Bytes], size: usize) -> Vec<Bytes> {
    if let [one] = frames {
        // The usual answer, one frame: one allocation of its size.
        return vec![Bytes::copy_from_slice(one)];
    }
    let mut all = bytes::BytesMut::with_capacity(size);
    for f in frames {
        all.extend_from_slice(f);
    }
    let all = all.freeze();
    let mut at = 0;
    frames
        .iter()
        .map(|f| {
            let part = all.slice(at..at + f.len());
            at += f.len();
            part
        })
        .collect()
}

impl Recording {
    fn keep(&mut self, data: &Bytes) {
        if self.too_big {
            return;
        }
        self.size += data.len();
        if self.size > self.max_bytes {
            // Too large to keep: stop recording (the caller still gets every byte).
            self.too_big = true;
            self.frames = Vec::new();
        } else {
            self.frames.push(data.clone());
        }
    }

    /// The body ended whole: store it, and hand it to whoever waited (once).
    fn finish(&mut self) {
        let leader = self.leader.take();
        if self.too_big {
            // Dropping the leader abandons the flight: a waiter calls upstream itself.
            return;
        }
        let stored = Arc::new(Stored {
            status: self.status,
            headers: std::mem::take(&mut self.headers),
            frames: compact(&std::mem::take(&mut self.frames), self.size),
            stream: self.stream,
        });
        // Write it now when the store can (the in-memory one always can), so the very next
        // request hits; a remote store's write that must wait finishes on its own task.
        if !self.store.put_now(self.key, &stored, self.ttl) {
            let store = Arc::clone(&self.store);
            let (key, ttl, value) = (self.key, self.ttl, Arc::clone(&stored));
            let mut write: Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
                Box::pin(async move { store.put(key, value, ttl).await });
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if write.as_mut().poll(&mut cx).is_pending() {
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    handle.spawn(write);
                }
            }
        }
        if let Some(l) = leader {
            l.complete(stored);
        }
    }
}

/// The body of an answer through [`Cache`](crate::Cache): core's [`Watched`] body — a
/// hit replayed from the frames kept, a miss recorded as it passes (the [`Recording`]
/// watcher stores it when it is complete), or a bypass passed through.
pub type CacheBody<B> = Watched<B, Recording>;

/// A hit: the stored frames, replayed.
pub(crate) fn replay<B>(stored: &Stored) -> CacheBody<B> {
    Watched::stored(stored.frames.iter().cloned().collect())
}

/// A miss, recorded as it passes.
pub(crate) fn record<B: Body>(inner: B, recording: Recording) -> CacheBody<B> {
    Watched::new(inner, Some(recording))
}

/// Passed through, neither stored nor replayed.
pub(crate) fn pass<B: Body>(inner: B) -> CacheBody<B> {
    Watched::new(inner, None)
}

impl Watcher for Recording {
    fn data(&mut self, chunk: Bytes) -> Bytes {
        self.keep(&chunk);
        chunk
    }

    fn complete(&mut self) -> Bytes {
        self.finish();
        Bytes::new()
    }

    // A partial answer is never stored: dropped unfinished, the recording abandons the
    // flight.
}
