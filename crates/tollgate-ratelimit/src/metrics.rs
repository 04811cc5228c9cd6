//! Metrics through the `metrics` facade, with every key built once per limit: the admit
//! path registers against pre-built keys and allocates nothing. Labels name the limit,
//! never the key.

use std::sync::Arc;
use std::time::Duration;

use metrics::{Key, Label, Level, Metadata, SharedString};
use tollgate_core::refusal::Reason;

static META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// The keys of one limit's metrics.
#[derive(Debug)]
pub(crate) struct LimitMetrics {
    admitted: Key,
    refused: [Key; 4],
    waited: Key,
    wait_seconds: Key,
    learned_limit: Key,
    learned_burst: Key,
}

fn key(name: &'static str, limit: &Arc<str>, extra: Option<(&'static str, &'static str)>) -> Key {
    let mut labels = vec![Label::new(
        "limit",
        SharedString::from_shared(Arc::clone(limit)),
    )];
    if let Some((k, v)) = extra {
        labels.push(Label::from_static_parts(k, v));
    }
    Key::from_parts(name, labels)
}

const REASONS: [&str; 4] = ["over_limit", "wait_too_long", "queue_full", "too_large"];

fn reason_index(reason: Reason) -> usize {
    match reason {
        Reason::OverLimit => 0,
        Reason::WaitTooLong => 1,
        Reason::QueueFull => 2,
        _ => 3,
    }
}

pub(crate) fn reason_label(reason: Reason) -> &'static str {
    REASONS[reason_index(reason)]
}

impl LimitMetrics {
    pub(crate) fn new(limit: &Arc<str>) -> Self {
        Self {
            admitted: key("tollgate_ratelimit_admitted_total", limit, None),
            refused: REASONS.map(|r| {
                key(
                    "tollgate_ratelimit_refused_total",
                    limit,
                    Some(("reason", r)),
                )
            }),
            waited: key("tollgate_ratelimit_waited_total", limit, None),
            wait_seconds: key("tollgate_ratelimit_wait_seconds", limit, None),
            learned_limit: key("tollgate_ratelimit_learned_limit", limit, None),
            learned_burst: key("tollgate_ratelimit_learned_burst", limit, None),
        }
    }

    pub(crate) fn admitted(&self) {
        metrics::with_recorder(|r| r.register_counter(&self.admitted, &META).increment(1));
    }

    pub(crate) fn refused(&self, reason: Reason) {
        let key = &self.refused[reason_index(reason)];
        metrics::with_recorder(|r| r.register_counter(key, &META).increment(1));
    }

    pub(crate) fn waited(&self, wait: Duration) {
        metrics::with_recorder(|r| {
            r.register_counter(&self.waited, &META).increment(1);
            r.register_histogram(&self.wait_seconds, &META)
                .record(wait.as_secs_f64());
        });
    }

    /// A quota learned from the provider: requests per minute, and at once.
    pub(crate) fn learned(&self, per_minute: u64, burst: u64) {
        metrics::with_recorder(|r| {
            r.register_gauge(&self.learned_limit, &META)
                .set(per_minute as f64);
            r.register_gauge(&self.learned_burst, &META)
                .set(burst as f64);
        });
    }
}
