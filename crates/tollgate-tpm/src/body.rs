//! The response body: watched as it passes, settled when it ends.

use std::sync::Arc;

use bytes::Bytes;
use http_body::Body;
use tollgate_core::body::{Watched, Watcher};
use tollgate_core::key::Key;
use tollgate_core::store::{TokenCell, TokenStore};
use tollgate_core::usage::{Usage, UsageReport, UsageScanner};
use tollgate_core::wait::WaitQueue;

use crate::budget::{Budgets, ProviderView};
use tollgate_core::usage_chunk::UsageChunkFilter;

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

/// The body of a response that passed a [`Tpm`](crate::Tpm) service: core's
/// [`Watched`] body with the budget's [`Settling`] watcher on it, or none (answers that
/// settle before their body: refusals, errors). It reads the provider's `usage` as frames
/// pass (never holding the stream) and settles the reservation when the body ends; for a
/// stream the caller did not ask usage for, it drops the usage-only chunk the layer asked
/// for on the caller's behalf.
///
/// A body that fails midway, or is dropped before its end, keeps its reservation: the
/// provider will have counted at least part of it, and nobody can say how much.
pub type TpmBody<B> = Watched<B, Settling>;

/// What the token budget does as an answer passes: reads `usage`, settles when the answer
/// is complete, and strips the usage chunk it asked for on the caller's behalf.
pub struct Settling {
    report: Option<Arc<UsageReport>>,
    scanner: Option<UsageScanner>,
    filter: Option<UsageChunkFilter>,
    settlement: Option<Settlement>,
}

impl std::fmt::Debug for Settling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settling")
            .field("strips_usage", &self.filter.is_some())
            .finish_non_exhaustive()
    }
}

/// An answer that settles nothing as it passes.
pub(crate) fn passthrough<B: Body>(inner: B) -> TpmBody<B> {
    Watched::new(inner, None)
}

/// An answer that settles `settlement` with the usage `scanner` reads; `strip` drops the
/// usage-only chunk of a stream.
pub(crate) fn settling<B: Body>(
    inner: B,
    scanner: UsageScanner,
    strip: bool,
    settlement: Settlement,
    report: Option<Arc<UsageReport>>,
) -> TpmBody<B> {
    let watcher = Settling {
        report,
        scanner: Some(scanner),
        filter: strip.then(UsageChunkFilter::default),
        settlement: Some(settlement),
    };
    Watched::new(inner, Some(watcher))
}

impl Watcher for Settling {
    fn data(&mut self, chunk: Bytes) -> Bytes {
        if let Some(s) = self.scanner.as_mut() {
            s.feed(&chunk);
        }
        match self.filter.as_mut() {
            Some(f) => f.push(&chunk),
            None => chunk,
        }
    }

    fn complete(&mut self) -> Bytes {
        // Settle with the usage read, or keep the reservation when none was.
        if let (Some(settlement), Some(scanner)) = (self.settlement.take(), self.scanner.take()) {
            let usage = scanner.finish();
            if let (Some(report), Some(u)) = (&self.report, usage) {
                report.record(u);
            }
            settlement.settle(usage);
        }
        self.filter
            .take()
            .map_or_else(Bytes::new, |mut f| f.finish())
    }

    // A failure keeps the reservation: dropping the settlement unsettled does that.

    fn edits(&self) -> bool {
        self.filter.is_some()
    }
}
