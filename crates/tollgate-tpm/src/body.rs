//! The response body: watched as it passes, settled when it ends.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tollgate_core::body::{EndWatch, Polled};
use tollgate_core::key::Key;
use tollgate_core::store::{TokenCell, TokenStore};
use tollgate_core::usage::{Usage, UsageScanner};
use tollgate_core::wait::WaitQueue;
use tollgate_core::BoxError;

use crate::budget::{Budgets, ProviderView};
use crate::sse::UsageChunkFilter;

/// A reservation waiting for the real count.
#[derive(Debug)]
pub(crate) struct Settlement {
    pub(crate) queue: Arc<WaitQueue<Budgets>>,
    pub(crate) keys: Vec<Key>,
    pub(crate) reserved: u64,
    /// The provider's view, for adaptive budgets: applied again after settling, so a
    /// refund never lifts a budget above it.
    pub(crate) provider: Option<ProviderView>,
    /// Settled already.
    pub(crate) done: bool,
    /// Reserved in a shared store rather than in process: settled there.
    pub(crate) remote: Option<RemoteHold>,
}

/// A reservation held in a shared store.
#[derive(Clone)]
pub(crate) struct RemoteHold {
    pub(crate) store: Arc<dyn TokenStore>,
    pub(crate) cells: Arc<[TokenCell]>,
    pub(crate) hold: u64,
}

impl std::fmt::Debug for RemoteHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteHold")
            .field("cells", &self.cells)
            .finish()
    }
}

impl RemoteHold {
    /// Settles in the store, off the request's path: a few tries, because a settlement
    /// that never arrives leaves its tokens held in the store (see the crate docs).
    fn settle(&self, reserved: u64, used: u64) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                reserved,
                used,
                "no runtime to settle a shared reservation on; its tokens stay held"
            );
            return;
        };
        let (store, cells, hold) = (Arc::clone(&self.store), Arc::clone(&self.cells), self.hold);
        runtime.spawn(async move {
            for attempt in 0..3u32 {
                match store.settle(Arc::clone(&cells), hold, reserved, used).await {
                    Ok(()) => return,
                    Err(e) if attempt == 2 => {
                        tracing::warn!(error = %e, reserved, used, "a shared reservation could not be settled; its tokens stay held");
                    }
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100 << attempt)).await,
                }
            }
        });
    }
}

impl Drop for Settlement {
    /// A reservation never settled (the body was cut, or dropped before its end) stands:
    /// it is released as fully used.
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            match &self.remote {
                Some(hold) => hold.settle(self.reserved, self.reserved),
                None => self
                    .queue
                    .admitter()
                    .settle(&self.keys, self.reserved, self.reserved),
            }
        }
    }
}

impl Settlement {
    /// Settles with what the provider reported; without a report, the reservation stands.
    pub(crate) fn settle(self, usage: Option<Usage>) {
        let Some(u) = usage else {
            tracing::debug!(
                reserved = self.reserved,
                "no usage in the response: the reservation stands"
            );
            return;
        };
        self.settle_at(u.total_tokens);
    }

    /// Settles as if the request cost `actual` tokens.
    pub(crate) fn settle_at(mut self, actual: u64) {
        // Settled here, not again as the value is dropped.
        self.done = true;
        let budgets = self.queue.admitter();
        match &self.remote {
            Some(hold) => hold.settle(self.reserved, actual),
            None => {
                budgets.settle(&self.keys, self.reserved, actual);
                if let Some(view) = &self.provider {
                    budgets.follow_provider(&self.keys, view);
                }
            }
        }
        for l in &budgets.ledgers {
            l.metrics.settled(
                actual,
                self.reserved.saturating_sub(actual),
                actual.saturating_sub(self.reserved),
            );
        }
    }
}

pin_project! {
    /// The body of a response that passed a [`Tpm`](crate::Tpm) service. It reads the
    /// provider's `usage` as frames pass (never holding the stream) and settles the
    /// reservation when the body ends; for a stream the caller did not ask usage for, it
    /// drops the usage-only chunk the layer asked for on the caller's behalf.
    ///
    /// A body that fails midway, or is dropped before its end, keeps its reservation: the
    /// provider will have counted at least part of it, and nobody can say how much.
    pub struct TpmBody<B> {
        #[pin]
        inner: B,
        watch: EndWatch,
        scanner: Option<UsageScanner>,
        filter: Option<UsageChunkFilter>,
        settlement: Option<Settlement>,
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for TpmBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmBody")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<B: Body> TpmBody<B> {
    pub(crate) fn passthrough(inner: B) -> Self {
        Self {
            watch: EndWatch::new(&inner),
            inner,
            scanner: None,
            filter: None,
            settlement: None,
        }
    }

    pub(crate) fn settling(
        inner: B,
        scanner: UsageScanner,
        filter: bool,
        settlement: Settlement,
    ) -> Self {
        let watch = EndWatch::new(&inner);
        let mut body = Self {
            inner,
            watch,
            scanner: Some(scanner),
            filter: filter.then(UsageChunkFilter::default),
            settlement: Some(settlement),
        };
        if watch.is_complete() {
            // An empty answer: a server may never poll it, so settle now.
            body.settle();
        }
        body
    }

    /// The body is complete: settle with the usage read (or keep the reservation).
    fn settle(&mut self) {
        settle(&mut self.settlement, &mut self.scanner);
    }
}

/// Settles with the usage read, or keeps the reservation when none was; once.
fn settle(settlement: &mut Option<Settlement>, scanner: &mut Option<UsageScanner>) {
    if let (Some(settlement), Some(scanner)) = (settlement.take(), scanner.take()) {
        settlement.settle(scanner.finish());
    }
}

impl<B> Body for TpmBody<B>
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
        let mut this = self.project();
        loop {
            match ready!(this.watch.poll_frame(this.inner.as_mut(), cx)) {
                Polled::Frame { frame, last } => {
                    let Some(data) = frame.data_ref() else {
                        return Poll::Ready(Some(Ok(frame)));
                    };
                    if let Some(s) = this.scanner.as_mut() {
                        s.feed(data);
                    }
                    if last {
                        // Complete: settle now, as a server that knows the length will
                        // not poll for the end.
                        settle(this.settlement, this.scanner);
                    }
                    let Some(f) = this.filter.as_mut() else {
                        return Poll::Ready(Some(Ok(frame)));
                    };
                    let mut out = f.push(data);
                    if last {
                        out = join(out, f.finish());
                        this.filter.take();
                    }
                    if !out.is_empty() || last {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Polled::Error(e) => {
                    // Cut midway: the reservation stands (dropping the settlement keeps it).
                    this.settlement.take();
                    this.scanner.take();
                    return Poll::Ready(Some(Err(e.into())));
                }
                Polled::End { .. } => {
                    settle(this.settlement, this.scanner);
                    if let Some(tail) = this.filter.as_mut().map(UsageChunkFilter::finish) {
                        this.filter.take();
                        if !tail.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(tail))));
                        }
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // A pending settlement must see the end, so never claim it early; once settled
        // (on the last frame), the inner body says.
        self.settlement.is_none() && self.filter.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.filter.is_some() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

/// `a` then `b`, copying only when both have bytes.
fn join(a: Bytes, b: Bytes) -> Bytes {
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
