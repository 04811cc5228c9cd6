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
