//! Response bodies the provider plays out: whole, paced, or cut short.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use tokio::time::Sleep;

/// The error of a body the provider cut short on purpose.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every response body of the provider.
pub(crate) type ProviderBody = BoxBody<Bytes, BoxError>;

pub(crate) fn full(bytes: impl Into<Bytes>) -> ProviderBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Chunks sent one after another, `delay` apart, and optionally cut (the body fails, so
/// the connection is closed mid-message) after `cut_after` of them: the provider's own
/// streams, and a scripted upstream body for a layer's tests.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::BodyExt;
/// use tollgate_testkit::body::ScriptedBody;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let cut = ScriptedBody::new(vec![Bytes::from_static(b"data: 1\n\n"); 3], Default::default(), Some(1));
/// assert!(cut.collect().await.is_err());
/// # }
/// ```
pub struct ScriptedBody {
    chunks: VecDeque<Bytes>,
    delay: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    cut_after: Option<usize>,
    sent: usize,
}

impl ScriptedBody {
    /// `chunks`, `delay` apart (on tokio's clock), failing after `cut_after` of them.
    pub fn new(chunks: Vec<Bytes>, delay: Duration, cut_after: Option<usize>) -> Self {
        Self {
            chunks: chunks.into(),
            delay,
            sleep: None,
            cut_after,
            sent: 0,
        }
    }

    pub(crate) fn boxed(self) -> ProviderBody {
        BoxBody::new(self)
    }
}

impl std::fmt::Debug for ScriptedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedBody")
            .field("chunks", &self.chunks.len())
            .field("cut_after", &self.cut_after)
            .finish_non_exhaustive()
    }
}

impl Body for ScriptedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.cut_after == Some(this.sent) {
            this.cut_after = None;
            this.chunks.clear();
            return Poll::Ready(Some(Err(
                "the simulated provider cut this body short".into()
            )));
        }
        if this.chunks.is_empty() {
            return Poll::Ready(None);
        }
        if this.sent > 0 && !this.delay.is_zero() {
            let delay = this.delay;
            let sleep = this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
            ready!(sleep.as_mut().poll(cx));
            this.sleep = None;
        }
        this.sent += 1;
        Poll::Ready(this.chunks.pop_front().map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.cut_after.is_none()
    }
}
