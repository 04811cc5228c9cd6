//! Metrics through the `metrics` facade, with every key built once per budget: the request
//! path allocates nothing for them. Labels name the budget, never the key.

use std::sync::Arc;

use metrics::{Key, Label, Level, Metadata, SharedString};
use tollgate_core::refusal::Reason;

static META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

const REASONS: [&str; 4] = ["over_limit", "wait_too_long", "queue_full", "too_large"];

/// The keys of one budget's metrics.
#[derive(Debug)]
pub(crate) struct BudgetMetrics {
    reserved: Key,
    settled: Key,
    refunded: Key,
    charged: Key,
    refused: [Key; 4],
    refused_tokens: Key,
    learned_limit: Key,
}

fn key(name: &'static str, budget: &Arc<str>, extra: Option<(&'static str, &'static str)>) -> Key {
    let mut labels = vec![Label::new(
        "budget",
        SharedString::from_shared(Arc::clone(budget)),
    )];
    if let Some((k, v)) = extra {
        labels.push(Label::from_static_parts(k, v));
    }
    Key::from_parts(name, labels)
}

fn add(key: &Key, n: u64) {
    if n > 0 {
        metrics::with_recorder(|r| r.register_counter(key, &META).increment(n));
    }
}

impl BudgetMetrics {
    pub(crate) fn new(budget: &Arc<str>) -> Self {
        Self {
            reserved: key("tollgate_tpm_reserved_tokens_total", budget, None),
            settled: key("tollgate_tpm_settled_tokens_total", budget, None),
            refunded: key("tollgate_tpm_refunded_tokens_total", budget, None),
            charged: key("tollgate_tpm_charged_tokens_total", budget, None),
            refused: REASONS
                .map(|r| key("tollgate_tpm_refused_total", budget, Some(("reason", r)))),
            refused_tokens: key("tollgate_tpm_refused_tokens_total", budget, None),
            learned_limit: key("tollgate_tpm_learned_limit", budget, None),
        }
    }

    pub(crate) fn reserved(&self, tokens: u64) {
        add(&self.reserved, tokens);
    }

    pub(crate) fn settled(&self, actual: u64, refunded: u64, charged: u64) {
        add(&self.settled, actual);
        add(&self.refunded, refunded);
        add(&self.charged, charged);
    }

    /// A token quota learned from the provider, per minute.
    pub(crate) fn learned(&self, per_minute: u64) {
        metrics::with_recorder(|r| {
            r.register_gauge(&self.learned_limit, &META)
                .set(per_minute as f64)
        });
    }

    pub(crate) fn refused(&self, reason: Reason, tokens: u64) {
        let i = match reason {
            Reason::OverLimit => 0,
            Reason::WaitTooLong => 1,
            Reason::QueueFull => 2,
            _ => 3,
        };
        add(&self.refused[i], 1);
        add(&self.refused_tokens, tokens);
    }
}
