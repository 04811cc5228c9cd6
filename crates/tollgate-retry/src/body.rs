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

pin_project! {
    /// The body of an answer through [`Retry`](crate::Retry): error answers (400 and up,
    /// of known length up to 64 KiB) are read whole so the classifier can see their error
    /// code; every other body streams through untouched.
    pub struct RetryBody<B> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind<B> {
        Buffered { bytes: Bytes, #[pin] body: Full<Bytes> },
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

    pub(crate) fn streaming(body: B) -> Self {
        Self {
            kind: ResponseKind::Streaming { body },
        }
    }

    /// The whole body of an error answer, when it was read.
    pub fn buffered(&self) -> Option<&Bytes> {
        match &self.kind {
            ResponseKind::Buffered { bytes, .. } => Some(bytes),
            ResponseKind::Streaming { .. } => None,
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
            ResponseKindProj::Streaming { body } => body.poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Buffered { body, .. } => body.is_end_stream(),
            ResponseKind::Streaming { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Buffered { body, .. } => body.size_hint(),
            ResponseKind::Streaming { body } => body.size_hint(),
        }
    }
}
