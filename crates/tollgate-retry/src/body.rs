//! The bodies a retried request and its answer travel in.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use pin_project_lite::pin_project;
use tollgate_core::BoxError;

/// The largest error body kept for the classifier to read.
pub(crate) const MAX_ERROR_BODY: usize = 64 * 1024;

/// The largest 2xx JSON answer read whole and checked before it is passed on; a larger
/// one streams through as it comes, unchecked.
pub(crate) const MAX_CHECKED_BODY: usize = 8 * 1024 * 1024;

pin_project! {
    /// The body of an answer through [`Retry`](crate::Retry): error answers (400 and up,
    /// of known length up to 64 KiB) are read whole so the classifier can see their error
    /// code; 2xx JSON answers (up to 8 MiB) are read whole and checked, so one that broke
    /// off or is not JSON is asked again rather than passed on; every other body streams
    /// through untouched.
    pub struct RetryBody<B> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind<B> {
        Buffered { bytes: Bytes, #[pin] body: Full<Bytes> },
        // What was read before it grew past the check's cap, then the rest as it comes.
        Prefixed { read: std::collections::VecDeque<Frame<Bytes>>, rest: Pin<Box<B>> },
        Streaming { #[pin] body: B },
    }
}

impl<B> RetryBody<B> {
    pub(crate) fn read(bytes: Bytes) -> Self {
        Self {
            kind: ResponseKind::Buffered {
                body: Full::new(bytes.clone()),
                bytes,
            },
        }
    }

    pub(crate) fn prefixed(
        read: std::collections::VecDeque<Frame<Bytes>>,
        rest: Pin<Box<B>>,
    ) -> Self {
        Self {
            kind: ResponseKind::Prefixed { read, rest },
        }
    }

    pub(crate) fn streaming(body: B) -> Self {
        Self {
            kind: ResponseKind::Streaming { body },
        }
    }

    /// The whole body of an error answer, when it was read.
    pub fn buffered(&self) -> Option<&Bytes> {
        match &self.kind {
            ResponseKind::Buffered { bytes, .. } => Some(bytes),
            ResponseKind::Prefixed { .. } | ResponseKind::Streaming { .. } => None,
        }
    }
}

impl<B> std::fmt::Debug for RetryBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryBody")
            .field("buffered", &self.buffered().is_some())
            .finish()
    }
}

impl<B> Body for RetryBody<B>
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
            ResponseKindProj::Buffered { body, .. } => {
                body.poll_frame(cx).map_err(|never| match never {})
            }
            ResponseKindProj::Prefixed { read, rest } => match read.pop_front() {
                Some(frame) => Poll::Ready(Some(Ok(frame))),
                None => rest.as_mut().poll_frame(cx).map_err(Into::into),
            },
            ResponseKindProj::Streaming { body } => body.poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Buffered { body, .. } => body.is_end_stream(),
            ResponseKind::Prefixed { read, rest } => read.is_empty() && rest.is_end_stream(),
            ResponseKind::Streaming { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Buffered { body, .. } => body.size_hint(),
            ResponseKind::Prefixed { read, rest } => {
                let queued: u64 = read
                    .iter()
                    .filter_map(Frame::data_ref)
                    .map(|d| d.len() as u64)
                    .sum();
                let r = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(r.lower() + queued);
                if let Some(u) = r.upper() {
                    hint.set_upper(u + queued);
                }
                hint
            }
            ResponseKind::Streaming { body } => body.size_hint(),
        }
    }
}

/// Reads a 2xx JSON answer whole and checks it is JSON: a body that breaks off, or is not
/// JSON, is a [`BrokenAnswer`](tollgate_core::unavailable::BrokenAnswer) — an error the
/// retry classifies as a transport failure. Past [`MAX_CHECKED_BODY`] it stops reading
/// and hands on what it read and the rest, unchecked.
pub(crate) async fn checked<B>(body: B) -> Result<RetryBody<B>, BoxError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    use http_body_util::BodyExt;
    use tollgate_core::unavailable::BrokenAnswer;
    // Boxed, so the rest of a body too large to check can be handed on whatever its type.
    let mut body = Box::pin(body);
    // The usual answer is one data frame: kept apart, it needs no queue and no copy.
    let mut first: Option<Bytes> = None;
    let mut more: Vec<Frame<Bytes>> = Vec::new();
    let mut len = 0usize;
    let all = |first: Option<Bytes>, more: Vec<Frame<Bytes>>| {
        first
            .map(Frame::data)
            .into_iter()
            .chain(more)
            .collect::<std::collections::VecDeque<_>>()
    };
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BrokenAnswer::cut)?;
        if let Some(d) = frame.data_ref() {
            len += d.len();
        }
        match frame.into_data() {
            Ok(d) if first.is_none() && more.is_empty() => first = Some(d),
            Ok(d) => more.push(Frame::data(d)),
            Err(trailers) => more.push(trailers),
        }
        if len > MAX_CHECKED_BODY {
            return Ok(RetryBody::prefixed(all(first, more), body));
        }
    }
    if more.is_empty() {
        let whole = first.unwrap_or_default();
        serde_json::from_slice::<serde::de::IgnoredAny>(&whole).map_err(BrokenAnswer::malformed)?;
        return Ok(RetryBody::read(whole));
    }
    let frames = all(first, more);
    let mut joined = bytes::BytesMut::with_capacity(len);
    for f in &frames {
        if let Some(d) = f.data_ref() {
            joined.extend_from_slice(d);
        }
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(&joined).map_err(BrokenAnswer::malformed)?;
    if frames.iter().any(|f| !f.is_data()) {
        // Trailers on a JSON answer are rare: every frame is kept as it came.
        return Ok(RetryBody::prefixed(frames, body));
    }
    Ok(RetryBody::read(joined.freeze()))
}
