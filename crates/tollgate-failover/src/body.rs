//! The answer's body: passed through (or, for a 400 whose error code was read, replayed),
//! and for SSE, ended with a clear error event when the backend fails midway — failover
//! is no longer possible once bytes reached the caller.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use http_body::Body;
use tollgate_core::body::{Watched, Watcher};
use tollgate_core::BoxError;

/// The body of an answer through [`Failover`](crate::Failover): core's [`Watched`] body,
/// with a [`StreamGuard`] on a server-sent-event stream.
pub type FailoverBody<B> = Watched<B, StreamGuard>;

/// Ends an SSE stream that breaks after its first byte with an OpenAI-shaped `error`
/// event (code `stream_interrupted`) instead of a cut connection, so a client's SDK sees
/// why; the stream cannot move to another backend once the caller has bytes.
#[derive(Debug)]
pub struct StreamGuard {
    backend: Arc<str>,
}

impl Watcher for StreamGuard {
    fn complete(&mut self) -> Bytes {
        Bytes::new()
    }

    fn failed(&mut self, e: BoxError) -> Result<Bytes, BoxError> {
        tracing::debug!(backend = %self.backend, error = %e, "stream broke after its first byte; ending it with an error event");
        let event = serde_json::json!({"error": {
            "message": format!("the upstream stream from backend {} broke: {e}", self.backend),
            "type": "upstream_error", "param": null, "code": "stream_interrupted"}});
        Ok(Bytes::from(format!("event: error\ndata: {event}\n\n")))
    }

    // It may add an event, so the length is not known.
    fn edits(&self) -> bool {
        true
    }
}

/// A backend's answer as it streams (`sse`: guarded by a [`StreamGuard`]).
pub(crate) fn stream<B: Body>(inner: B, sse: bool, backend: Arc<str>) -> FailoverBody<B> {
    Watched::new(inner, sse.then_some(StreamGuard { backend }))
}

/// An answer read whole (a 400 whose error code was looked at), replayed.
pub(crate) fn read<B>(bytes: Bytes) -> FailoverBody<B> {
    Watched::stored(VecDeque::from([bytes]))
}
