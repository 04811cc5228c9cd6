//! The answer's body: passed through (or, for a 400 whose error code was read, replayed),
//! and for SSE, ended with a clear error event when the backend fails midway — failover
//! is no longer possible once bytes reached the caller.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tollgate_core::BoxError;

pin_project! {
    /// The body of an answer through [`Failover`](crate::Failover).
    pub struct FailoverBody<B> {
        #[pin]
        inner: Option<B>,
        read: Option<Bytes>,
        sse: bool,
        ended: bool,
        backend: Arc<str>,
    }
}

impl<B> std::fmt::Debug for FailoverBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailoverBody")
            .field("sse", &self.sse)
            .finish_non_exhaustive()
    }
}

impl<B> FailoverBody<B> {
    pub(crate) fn stream(inner: B, sse: bool, backend: Arc<str>) -> Self {
        Self {
            inner: Some(inner),
            read: None,
            sse,
            ended: false,
            backend,
        }
    }

    pub(crate) fn read(bytes: Bytes, backend: Arc<str>) -> Self {
        Self {
            inner: None,
            read: Some(bytes),
            sse: false,
            ended: false,
            backend,
        }
    }
}

impl<B> Body for FailoverBody<B>
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
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        let Some(inner) = this.inner.as_pin_mut() else {
            *this.ended = true;
            return Poll::Ready(this.read.take().map(|b| Ok(Frame::data(b))));
        };
        match ready!(inner.poll_frame(cx)) {
            Some(Err(e)) if *this.sse => {
                let e: BoxError = e.into();
                *this.ended = true;
                tracing::debug!(backend = %this.backend, error = %e, "stream broke after its first byte; ending it with an error event");
                let event = serde_json::json!({"error": {
                    "message": format!("the upstream stream from backend {} broke: {e}", this.backend),
                    "type": "upstream_error", "param": null, "code": "stream_interrupted"}});
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(format!(
                    "event: error\ndata: {event}\n\n"
                ))))))
            }
            other => Poll::Ready(other.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.as_ref().is_some_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.inner, &self.read) {
            (None, Some(b)) => SizeHint::with_exact(b.len() as u64),
            (Some(b), _) if !self.sse => b.size_hint(),
            _ => SizeHint::default(),
        }
    }
}
