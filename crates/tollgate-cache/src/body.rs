//! The body of an answer through the cache: replayed, recorded, or passed through.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tollgate_core::body::{EndWatch, Polled};
use tollgate_core::BoxError;

use crate::flight::Leader;
use crate::key::CacheKey;
use crate::store::{CacheStore, Stored};

/// What a recording needs to store the answer once it is complete.
pub(crate) struct Recording {
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

/// The frames copied into one allocation of exactly their size, each frame a slice of it.
/// A frame as it arrived is often a slice of the HTTP client's read buffer, many times
/// its size: kept as it is, an entry would hold that whole buffer while the cache counts
/// only the entry's bytes.
fn compact(frames: &[Bytes], size: usize) -> Vec<Bytes> {
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

    /// The body ended whole: store it, and hand it to whoever waited.
    fn finish(mut self) {
        let leader = self.leader.take();
        if self.too_big {
            // Dropping the leader abandons the flight: a waiter calls upstream itself.
            return;
        }
        let stored = Arc::new(Stored {
            status: self.status,
            headers: std::mem::take(&mut self.headers),
            frames: compact(&self.frames, self.size),
            stream: self.stream,
        });
        // Write it now when the store can (the in-memory one always can), so the very next
        // request hits; a remote store's write that must wait finishes on its own task.
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
        if let Some(l) = leader {
            l.complete(stored);
        }
    }
}

pin_project! {
    /// The body of an answer through [`Cache`](crate::Cache).
    pub struct CacheBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Replay { frames: VecDeque<Bytes> },
        Record { #[pin] inner: B, watch: EndWatch, recording: Option<Recording> },
        Pass { #[pin] inner: B },
    }
}

impl<B> std::fmt::Debug for CacheBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheBody")
    }
}

impl<B> CacheBody<B> {
    pub(crate) fn replay(stored: &Stored) -> Self {
        Self {
            kind: Kind::Replay {
                frames: stored.frames.iter().cloned().collect(),
            },
        }
    }
    pub(crate) fn record(inner: B, recording: Recording) -> Self
    where
        B: Body,
    {
        let watch = EndWatch::new(&inner);
        let mut recording = Some(recording);
        if watch.is_complete() {
            // Nothing to wait for (an empty answer): a server may never poll it.
            if let Some(r) = recording.take() {
                r.finish();
            }
        }
        Self {
            kind: Kind::Record {
                inner,
                watch,
                recording,
            },
        }
    }
    pub(crate) fn pass(inner: B) -> Self {
        Self {
            kind: Kind::Pass { inner },
        }
    }
}

impl<B> Body for CacheBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Replay { frames } => {
                Poll::Ready(frames.pop_front().map(|f| Ok(Frame::data(f))))
            }
            KindProj::Pass { inner } => inner.poll_frame(cx).map_err(Into::into),
            KindProj::Record {
                inner,
                watch,
                recording,
            } => match ready!(watch.poll_frame(inner, cx)) {
                Polled::Frame { frame, last } => {
                    if let (Some(data), Some(r)) = (frame.data_ref(), recording.as_mut()) {
                        r.keep(data);
                    }
                    if last {
                        // Complete: store it now, as a server that knows the length will
                        // not poll for the end.
                        if let Some(r) = recording.take() {
                            r.finish();
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Polled::Error(e) => {
                    // A partial answer is never stored; the flight is abandoned.
                    recording.take();
                    Poll::Ready(Some(Err(e.into())))
                }
                Polled::End { .. } => {
                    if let Some(r) = recording.take() {
                        r.finish();
                    }
                    Poll::Ready(None)
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Replay { frames } => frames.is_empty(),
            Kind::Pass { inner } => inner.is_end_stream(),
            // The recording must see the end, so never claim it early; once it has, the
            // inner body says.
            Kind::Record {
                recording, inner, ..
            } => recording.is_none() && inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Replay { frames } => {
                SizeHint::with_exact(frames.iter().map(|f| f.len() as u64).sum())
            }
            Kind::Pass { inner } | Kind::Record { inner, .. } => inner.size_hint(),
        }
    }
}
