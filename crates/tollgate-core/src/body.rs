//! When a response body is over: the one rule every Tollgate body wrapper follows.
//!
//! A layer that acts when an answer ends — the token budget settling with the real
//! `usage`, the cache storing what it recorded — wraps the body and watches its frames
//! pass. It must not wait for `poll_frame` to yield `None`: a server that knows the body's
//! length (hyper writing a `Content-Length` answer, the normal case for every non-streamed
//! JSON answer) stops polling as soon as that many bytes are out, and never asks for the
//! `None`. So a body is over when **either**
//!
//! - `poll_frame` yields `None`, **or**
//! - after a frame, the inner body's `is_end_stream()` is true, **or** the frames so far
//!   add up to the exact length its `size_hint` promised when the watch began.
//!
//! [`EndWatch`] says this once. A wrapper polls its inner body through
//! [`EndWatch::poll_frame`], acts when it is told a frame was the [`last`](Polled::Frame),
//! and reports `is_end_stream()` as its inner body does once it has acted — never `false`
//! for ever while it waits to be polled again.
//!
//! [`Watched`] is that wrapper, written once: every layer that watches an answer (the
//! budget settling, the cache recording, failover guarding a stream) is a [`Watcher`] —
//! what to do with each chunk, at the end, and on a failure — over the live answer or
//! frames kept from an earlier one.
//!
//! ```
//! use std::pin::pin;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tollgate_core::body::{EndWatch, Polled};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let mut body = pin!(Full::new(Bytes::from_static(b"{\"usage\":{}}")));
//! let mut watch = EndWatch::new(&*body);
//! let polled = std::future::poll_fn(|cx| watch.poll_frame(body.as_mut(), cx)).await;
//! // The only frame is the last one: act now, a server may never poll again.
//! assert!(matches!(polled, Polled::Frame { last: true, .. }));
//! assert!(watch.is_complete());
//! # }
//! ```

use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame};

/// What one poll of a watched body gave.
#[derive(Debug)]
pub enum Polled<D, E> {
    /// A frame; `last` is true when the body is complete with it (act now: the server may
    /// not poll again). Reported `true` once.
    Frame {
        /// The frame, to hand on.
        frame: Frame<D>,
        /// The body is complete with this frame.
        last: bool,
    },
    /// The body failed.
    Error(E),
    /// `poll_frame` yielded `None`. `first` is true when this is how the body's end was
    /// first seen (no earlier frame was reported `last`).
    End {
        /// The end was not seen before.
        first: bool,
    },
}

/// Watches a body for its end; see the [module docs](self).
#[derive(Clone, Copy, Debug, Default)]
pub struct EndWatch {
    /// Bytes still to come, when the body promised an exact length.
    remaining: Option<u64>,
    /// The body's content is complete (its last frame passed, or it was empty).
    complete: bool,
    /// `poll_frame` yielded `None` or an error: nothing more to poll.
    done: bool,
}

impl EndWatch {
    /// Starts watching `body`, before its first frame is polled.
    pub fn new<B: Body>(body: &B) -> Self {
        let remaining = body.size_hint().exact();
        Self {
            remaining,
            complete: body.is_end_stream() || remaining == Some(0),
            done: false,
        }
    }

    /// The body's content is complete: its last frame passed (or it had none).
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Polls `body` (the body [`new`](Self::new) was given) for its next frame.
    pub fn poll_frame<B>(
        &mut self,
        mut body: Pin<&mut B>,
        cx: &mut Context<'_>,
    ) -> Poll<Polled<B::Data, B::Error>>
    where
        B: Body,
    {
        if self.done {
            return Poll::Ready(Polled::End { first: false });
        }
        match ready!(body.as_mut().poll_frame(cx)) {
            None => {
                self.done = true;
                let first = !self.complete;
                self.complete = true;
                Poll::Ready(Polled::End { first })
            }
            Some(Err(e)) => {
                self.done = true;
                Poll::Ready(Polled::Error(e))
            }
            Some(Ok(frame)) => {
                if let (Some(data), Some(left)) = (frame.data_ref(), self.remaining.as_mut()) {
                    *left = left.saturating_sub(data.remaining() as u64);
                }
                let ends = body.is_end_stream() || self.remaining == Some(0);
                let last = ends && !self.complete;
                self.complete |= ends;
                Poll::Ready(Polled::Frame { frame, last })
            }
        }
    }
}

/// A request body a Tollgate layer can take: any data that can cross threads, an error
/// that boxes. Written once so that every layer's bounds say it in one line.
pub trait CallerBody: Body<Data: Send, Error: Into<crate::BoxError>> + Send + 'static {}

impl<T> CallerBody for T where T: Body<Data: Send, Error: Into<crate::BoxError>> + Send + 'static {}

/// A body of `Bytes` as the layers see it (an answer, or a request already in bytes):
/// across threads, an error that boxes.
pub trait AnswerBody:
    Body<Data = bytes::Bytes, Error: Into<crate::BoxError>> + Send + 'static
{
}

impl<T> AnswerBody for T where
    T: Body<Data = bytes::Bytes, Error: Into<crate::BoxError>> + Send + 'static
{
}

pin_project_lite::pin_project! {
    /// Where an answer's bytes come from: the live body, or frames kept from an earlier
    /// answer (a cache hit, an error body read whole).
    #[project = SourceProj]
    enum Source<B> {
        /// Frames kept, handed out in order (`frames`: what is left to hand out).
        Stored {
            frames: std::collections::VecDeque<bytes::Bytes>,
        },
        /// The live body.
        Live {
            #[pin]
            body: B,
        },
    }
}

impl<B> Body for Source<B>
where
    B: Body<Data = bytes::Bytes>,
    B::Error: Into<crate::BoxError>,
{
    type Data = bytes::Bytes;
    type Error = crate::BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<FrameResult>> {
        match self.project() {
            SourceProj::Stored { frames } => {
                Poll::Ready(frames.pop_front().map(|f| Ok(Frame::data(f))))
            }
            SourceProj::Live { body } => body.poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Source::Stored { frames } => frames.is_empty(),
            Source::Live { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Source::Stored { frames } => {
                http_body::SizeHint::with_exact(frames.iter().map(|f| f.len() as u64).sum())
            }
            Source::Live { body } => body.size_hint(),
        }
    }
}

/// What one poll of a Tollgate body yields.
pub type FrameResult = Result<Frame<bytes::Bytes>, crate::BoxError>;

/// What a layer does as an answer passes through [`Watched`]. The watcher is dropped once
/// it has seen the end or a failure — and when the body is dropped before either, so a
/// watcher's `Drop` is where "cut short" is handled (a reservation that stands, a flight
/// abandoned).
pub trait Watcher {
    /// A chunk of data passed; returns what to hand on in its place (the chunk itself,
    /// unless the watcher [`edits`](Self::edits) the stream).
    fn data(&mut self, chunk: bytes::Bytes) -> bytes::Bytes {
        chunk
    }

    /// The answer is complete (its last chunk passed, or it had none); called once.
    /// Returns bytes to send after the last chunk (an editing watcher's tail), usually
    /// none.
    fn complete(&mut self) -> bytes::Bytes;

    /// The answer failed midway. `Ok(bytes)` ends it cleanly with them instead (an SSE
    /// error event, say); `Err` hands the error on (the default).
    fn failed(&mut self, error: crate::BoxError) -> Result<bytes::Bytes, crate::BoxError> {
        Err(error)
    }

    /// Whether the watcher changes the bytes, so the length is no longer known (and an
    /// edit that leaves nothing of a chunk sends nothing for it).
    fn edits(&self) -> bool {
        false
    }
}

/// A watcher that does nothing: the body passes through as it is.
impl Watcher for std::convert::Infallible {
    fn complete(&mut self) -> bytes::Bytes {
        match *self {}
    }
}

pin_project_lite::pin_project! {
    /// An answer's body with a [`Watcher`] on it (or none: passed through as it is). It
    /// follows the one rule of the [module docs](self): the watcher hears of the end on
    /// the last frame, not only at `None`; it never reports `is_end_stream()` while the
    /// watcher still waits for the end, and reports the source's once it has seen it.
    pub struct Watched<B, W> {
        #[pin]
        source: Source<B>,
        watch: EndWatch,
        watcher: Option<W>,
        // Bytes to send before anything else: the tail of an answer that was complete
        // before its first poll.
        tail: Option<bytes::Bytes>,
        // A watcher ended the body early (a failure turned into a last frame).
        ended: bool,
    }
}

impl<B: fmt::Debug, W> fmt::Debug for Watched<B, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watched")
            .field("source", &self.source)
            .field("watching", &self.watcher.is_some())
            .finish_non_exhaustive()
    }
}

impl<B: fmt::Debug> fmt::Debug for Source<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Stored { frames } => f
                .debug_struct("Stored")
                .field("frames", &frames.len())
                .finish(),
            Source::Live { body } => f.debug_tuple("Live").field(body).finish(),
        }
    }
}

impl<B, W> Watched<B, W> {
    /// `frames` kept from an earlier answer, handed out in order, watched by nobody.
    pub fn stored(frames: std::collections::VecDeque<bytes::Bytes>) -> Self {
        Self {
            source: Source::Stored { frames },
            watch: EndWatch::default(),
            watcher: None,
            tail: None,
            ended: false,
        }
    }

    /// Whether a watcher still waits for the end.
    pub fn is_watching(&self) -> bool {
        self.watcher.is_some()
    }
}

impl<B: Body, W: Watcher> Watched<B, W> {
    /// `body` watched by `watcher` (`None`: passed through). A body complete before its
    /// first poll (an empty answer) is complete for the watcher at once: a server may
    /// never poll it.
    pub fn new(body: B, watcher: Option<W>) -> Self {
        Self::over(Source::Live { body }, watcher)
    }

    fn over(source: Source<B>, mut watcher: Option<W>) -> Self {
        let watch = match &source {
            Source::Live { body } => EndWatch::new(body),
            Source::Stored { .. } => EndWatch::default(),
        };
        let mut tail = None;
        if watch.is_complete() {
            if let Some(mut w) = watcher.take() {
                tail = Some(w.complete()).filter(|t| !t.is_empty());
            }
        }
        Self {
            source,
            watch,
            watcher,
            tail,
            ended: false,
        }
    }
}

impl<B, W> Body for Watched<B, W>
where
    B: Body<Data = bytes::Bytes>,
    B::Error: Into<crate::BoxError>,
    W: Watcher,
{
    type Data = bytes::Bytes;
    type Error = crate::BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<FrameResult>> {
        let mut this = self.project();
        if let Some(tail) = this.tail.take() {
            return Poll::Ready(Some(Ok(Frame::data(tail))));
        }
        if *this.ended {
            return Poll::Ready(None);
        }
        let Some(watcher) = this.watcher.as_mut() else {
            return this.source.poll_frame(cx);
        };
        loop {
            match ready!(this.watch.poll_frame(this.source.as_mut(), cx)) {
                Polled::Frame { frame, last } => {
                    let frame = match frame.into_data() {
                        Ok(chunk) => {
                            let mut out = watcher.data(chunk);
                            if last {
                                out = join(out, watcher.complete());
                            }
                            if out.is_empty() && !last && watcher.edits() {
                                continue;
                            }
                            Frame::data(out)
                        }
                        Err(other) => {
                            if last {
                                let tail = watcher.complete();
                                *this.tail = Some(tail).filter(|t| !t.is_empty());
                            }
                            other
                        }
                    };
                    if last {
                        this.watcher.take();
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Polled::Error(e) => {
                    let outcome = watcher.failed(e);
                    this.watcher.take();
                    return Poll::Ready(Some(match outcome {
                        Ok(last) => {
                            *this.ended = true;
                            Ok(Frame::data(last))
                        }
                        Err(e) => Err(e),
                    }));
                }
                Polled::End { .. } => {
                    let tail = watcher.complete();
                    this.watcher.take();
                    return Poll::Ready((!tail.is_empty()).then(|| Ok(Frame::data(tail))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // A watcher must see the end, so never claim it early; once it has, the source
        // says.
        self.ended || (self.watcher.is_none() && self.tail.is_none() && self.source.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.watcher {
            Some(w) if w.edits() => http_body::SizeHint::default(),
            _ => self.source.size_hint(),
        }
    }
}

/// `a` then `b`, copying only when both have bytes.
fn join(a: bytes::Bytes, b: bytes::Bytes) -> bytes::Bytes {
    match (a.is_empty(), b.is_empty()) {
        (_, true) => a,
        (true, false) => b,
        (false, false) => {
            let mut all = bytes::BytesMut::with_capacity(a.len() + b.len());
            all.extend_from_slice(&a);
            all.extend_from_slice(&b);
            all.freeze()
        }
    }
}

pin_project_lite::pin_project! {
    /// A request body that can be sent again: the buffered bytes, replayed on every
    /// attempt — or, for a body over the cap, what was read of it and the rest of the
    /// stream, sent once ([`buffer_for_replay`](crate::facts::buffer_for_replay) makes
    /// it). The retry layer's request body.
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project_lite::pin_project! {
    #[project = RequestKindProj]
    enum RequestKind<B> {
        Replay { #[pin] body: http_body_util::Full<bytes::Bytes> },
        Once { read: std::collections::VecDeque<bytes::Bytes>, #[pin] rest: B },
    }
}

impl<B> RequestBody<B> {
    /// `bytes`, replayable.
    pub fn replay(bytes: bytes::Bytes) -> Self {
        Self {
            kind: RequestKind::Replay {
                body: http_body_util::Full::new(bytes),
            },
        }
    }

    /// `read` and then `rest`, sent once.
    pub fn once(read: std::collections::VecDeque<bytes::Bytes>, rest: B) -> Self {
        Self {
            kind: RequestKind::Once { read, rest },
        }
    }

    /// Whether the body is buffered, so the request can be sent again.
    pub fn is_replayable(&self) -> bool {
        matches!(self.kind, RequestKind::Replay { .. })
    }

    /// Another copy of a replayable body (`None` for one sent once).
    pub fn try_clone(&self) -> Option<Self> {
        match &self.kind {
            RequestKind::Replay { body } => Some(Self {
                kind: RequestKind::Replay { body: body.clone() },
            }),
            RequestKind::Once { .. } => None,
        }
    }
}

impl<B> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestBody")
            .field("replayable", &self.is_replayable())
            .finish()
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = bytes::Bytes>,
    B::Error: Into<crate::BoxError>,
{
    type Data = bytes::Bytes;
    type Error = crate::BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<FrameResult>> {
        match self.project().kind.project() {
            RequestKindProj::Replay { body } => body.poll_frame(cx).map_err(|never| match never {}),
            RequestKindProj::Once { read, rest } => {
                if let Some(chunk) = read.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                rest.poll_frame(cx).map_err(Into::into)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Replay { body } => body.is_end_stream(),
            RequestKind::Once { read, rest } => read.is_empty() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.kind {
            RequestKind::Replay { body } => body.size_hint(),
            RequestKind::Once { read, rest } => {
                let pre: u64 = read.iter().map(|b| b.len() as u64).sum();
                let mut h = http_body::SizeHint::new();
                h.set_lower(rest.size_hint().lower() + pre);
                if let Some(u) = rest.size_hint().upper() {
                    h.set_upper(u + pre);
                }
                h
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body::SizeHint;
    use std::collections::VecDeque;
    use std::pin::pin;

    /// Frames with a length promised or not, and an end flag that says so or not.
    struct Frames {
        frames: VecDeque<Bytes>,
        exact: Option<u64>,
        says_end: bool,
    }

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.frames.pop_front().map(|f| Ok(Frame::data(f))))
        }
        fn is_end_stream(&self) -> bool {
            self.says_end && self.frames.is_empty()
        }
        fn size_hint(&self) -> SizeHint {
            self.exact.map_or_else(SizeHint::new, SizeHint::with_exact)
        }
    }

    fn lasts(body: Frames) -> Vec<bool> {
        let mut body = pin!(body);
        let mut watch = EndWatch::new(&*body);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut out = Vec::new();
        loop {
            match watch.poll_frame(body.as_mut(), &mut cx) {
                Poll::Ready(Polled::Frame { last, .. }) => out.push(last),
                Poll::Ready(Polled::End { first }) => {
                    out.push(first);
                    return out;
                }
                _ => unreachable!(),
            }
        }
    }

    fn frames(n: usize) -> VecDeque<Bytes> {
        (0..n).map(|_| Bytes::from_static(b"abcd")).collect()
    }

    #[test]
    fn the_end_is_seen_on_the_last_frame_when_the_body_says_so_or_its_length_is_reached() {
        // `is_end_stream` after the last frame.
        let said = Frames {
            frames: frames(3),
            exact: None,
            says_end: true,
        };
        assert_eq!(lasts(said), [false, false, true, false]);
        // The promised length reached, though the body never says it ended.
        let length = Frames {
            frames: frames(3),
            exact: Some(12),
            says_end: false,
        };
        assert_eq!(lasts(length), [false, false, true, false]);
        // Neither: only the `None` tells, and it is the first sign.
        let chunked = Frames {
            frames: frames(3),
            exact: None,
            says_end: false,
        };
        assert_eq!(lasts(chunked), [false, false, false, true]);
    }

    #[test]
    fn an_empty_body_is_complete_before_any_poll() {
        let empty = Frames {
            frames: VecDeque::new(),
            exact: Some(0),
            says_end: true,
        };
        assert!(EndWatch::new(&empty).is_complete());
        assert_eq!(lasts(empty), [false]);
    }
}
