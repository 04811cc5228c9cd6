//! One access line per request, and the gateway's own metrics, written when the answer's
//! body has ended (so a stream's tokens and its full time are in them) or was cut short.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tollgate_core::body::Watcher;
use tollgate_core::usage::{UsageReport, UsageScanner};
use tollgate_core::usage_chunk::UsageChunkFilter;
use tollgate_core::wait::WaitReport;

use crate::stats::{Counts, Ended, Recent, Stats};
use crate::upstream::Trace;

/// What is known of a request when its answer's head goes out.
pub(crate) struct Entry {
    pub(crate) request_id: String,
    pub(crate) tenant: Arc<str>,
    pub(crate) model: String,
    pub(crate) operation: &'static str,
    pub(crate) stream: bool,
    pub(crate) status: u16,
    pub(crate) backend: Option<String>,
    pub(crate) cache: Option<String>,
    pub(crate) start: Instant,
    pub(crate) head: Duration,
    pub(crate) trace: Arc<Trace>,
    /// The usage the model's token budget settled with, when one did.
    pub(crate) report: Arc<UsageReport>,
    /// The time it waited in the limiters' queues (the tenant's and the model's).
    pub(crate) waits: Arc<WaitReport>,
    pub(crate) stats: Stats,
    /// The model's primary backend, to tell a failover.
    pub(crate) primary: String,
    /// The `models` entry serving it (the request may have named an alias).
    pub(crate) route: String,
}

/// Watches an answer's body to its end: counts its usage, times its first chunk, holds the
/// tenant's place among its requests in flight, then writes the access line.
pub(crate) struct AccessLog {
    entry: Entry,
    usage: UsageScanner,
    /// Drops the usage chunk the gateway asked for on a caller's behalf.
    filter: Option<UsageChunkFilter>,
    first_chunk: Option<Duration>,
    bytes: u64,
    done: bool,
}

impl AccessLog {
    pub(crate) fn new(entry: Entry, usage: UsageScanner, strip_usage: bool) -> Self {
        // The gateway's own share of the time to the head: what it did, without the
        // providers' time to their heads and the waits for quota.
        let overhead = entry
            .head
            .saturating_sub(entry.trace.upstream())
            .saturating_sub(entry.waits.total());
        metrics::histogram!("tollgate_gateway_overhead_seconds", "model" => entry.model.clone())
            .record(overhead.as_secs_f64());
        let waited = entry.waits.total();
        if !waited.is_zero() {
            // It waited for quota until its head: the model was limited that long.
            let now = tokio::time::Instant::now();
            let from = now.checked_sub(waited).unwrap_or(now);
            entry.stats.limited(&entry.route, from, now, Some(waited));
        }
        Self {
            entry,
            usage,
            filter: strip_usage.then(UsageChunkFilter::default),
            first_chunk: None,
            bytes: 0,
            done: false,
        }
    }

    fn finish(&mut self, outcome: &'static str) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let e = &self.entry;
        let latency = e.start.elapsed();
        // What the budget settled with, else what passed: a stream whose usage chunk the
        // budget asked for and hid shows its tokens only to the budget.
        let scanned = std::mem::replace(&mut self.usage, UsageScanner::json(0)).finish();
        let usage = e.report.get().or(scanned);
        let (input, output) = usage.map_or((None, None), |u| {
            (Some(u.input_tokens), Some(u.output_tokens))
        });
        let attempts = e.trace.attempts();
        tracing::info!(
            target: "tollgate::access",
            request_id = %e.request_id,
            tenant = %e.tenant,
            model = %e.model,
            backend = e.backend.as_deref().unwrap_or("-"),
            cache = e.cache.as_deref().unwrap_or("-"),
            attempts,
            retries = attempts.saturating_sub(1),
            upstream_ms = e.trace.upstream().as_millis() as u64,
            queue_ms = e.waits.total().as_millis() as u64,
            input_tokens = input,
            output_tokens = output,
            status = e.status,
            stream = e.stream,
            bytes = self.bytes,
            ttfb_ms = self.first_chunk.map(|d| d.as_millis() as u64),
            latency_ms = latency.as_millis() as u64,
            outcome,
            "request"
        );
        let hit = e.cache.as_deref() == Some("hit");
        let (provider_requests, provider_tokens) = e.trace.provider_quota();
        let tokens = usage.map_or(0, |u| u.total_tokens);
        e.stats.ended(Ended {
            recent: Recent {
                at_ms: Stats::now_ms(),
                request_id: e.request_id.clone(),
                tenant: e.tenant.to_string(),
                model: e.route.clone(),
                backend: e.backend.clone(),
                cache: e.cache.clone(),
                retries: attempts.saturating_sub(1),
                input_tokens: input,
                output_tokens: output,
                status: e.status,
                latency_ms: latency.as_millis() as u64,
                outcome,
            },
            counts: Counts {
                requests: 1,
                tokens,
                input_tokens: input.unwrap_or(0),
                output_tokens: output.unwrap_or(0),
                provider_429: u64::from(e.trace.provider_429()),
                waited: u64::from(!e.waits.total().is_zero()),
                refused: 0,
                cache_hits: u64::from(hit),
                tokens_saved: if hit { tokens } else { 0 },
                retries: u64::from(attempts.saturating_sub(1)),
                failovers: u64::from(e.backend.as_ref().is_some_and(|b| *b != e.primary) && !hit),
                errors: u64::from(e.status >= 500),
                max_wait_ms: e.waits.total().as_millis() as u64,
            },
            waited: e.waits.total(),
            provider_requests,
            provider_tokens,
        });
        let model = e.model.clone();
        let tenant = e.tenant.to_string();
        metrics::counter!(
            "tollgate_gateway_requests_total",
            "model" => model.clone(),
            "tenant" => tenant.clone(),
            "status" => e.status.to_string()
        )
        .increment(1);
        let op = e.operation;
        if let Some(u) = usage {
            for (kind, n) in [("input", u.input_tokens), ("output", u.output_tokens)] {
                metrics::histogram!(
                    "gen_ai_client_token_usage",
                    "gen_ai_operation_name" => op,
                    "gen_ai_request_model" => model.clone(),
                    "gen_ai_token_type" => kind,
                    "tollgate_backend" => e.backend.clone().unwrap_or_default(),
                    "tenant" => tenant.clone()
                )
                .record(n as f64);
            }
        }
        metrics::histogram!(
            "gen_ai_client_operation_duration_seconds",
            "gen_ai_operation_name" => op,
            "gen_ai_request_model" => model.clone(),
            "tollgate_backend" => e.backend.clone().unwrap_or_default()
        )
        .record(latency.as_secs_f64());
        if let (true, Some(first)) = (e.stream, self.first_chunk) {
            metrics::histogram!(
                "gen_ai_server_time_to_first_token_seconds",
                "gen_ai_operation_name" => op,
                "gen_ai_request_model" => model,
                "tollgate_backend" => e.backend.clone().unwrap_or_default()
            )
            .record(first.as_secs_f64());
        }
    }
}

impl Watcher for AccessLog {
    fn data(&mut self, chunk: Bytes) -> Bytes {
        if self.first_chunk.is_none() {
            self.first_chunk = Some(self.entry.start.elapsed());
        }
        self.bytes += chunk.len() as u64;
        self.usage.feed(&chunk);
        match self.filter.as_mut() {
            Some(f) => f.push(&chunk),
            None => chunk,
        }
    }

    fn complete(&mut self) -> Bytes {
        self.finish("complete");
        self.filter
            .take()
            .map_or_else(Bytes::new, |mut f| f.finish())
    }

    fn edits(&self) -> bool {
        self.filter.is_some()
    }

    fn failed(&mut self, error: tollgate_core::BoxError) -> Result<Bytes, tollgate_core::BoxError> {
        self.finish("failed");
        Err(error)
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        // The client went away before the end.
        self.finish("cut");
    }
}
