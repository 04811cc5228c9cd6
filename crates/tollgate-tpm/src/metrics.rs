//! Metrics through the `metrics` facade, labelled by budget name, never by key.

use tollgate_core::refusal::Reason;

pub(crate) fn reserved(budget: &str, tokens: u64) {
    metrics::counter!("tollgate_tpm_reserved_tokens_total", "budget" => budget.to_owned())
        .increment(tokens);
}

pub(crate) fn settled(budget: &str, actual: u64, refunded: u64, charged: u64) {
    metrics::counter!("tollgate_tpm_settled_tokens_total", "budget" => budget.to_owned())
        .increment(actual);
    if refunded > 0 {
        metrics::counter!("tollgate_tpm_refunded_tokens_total", "budget" => budget.to_owned())
            .increment(refunded);
    }
    if charged > 0 {
        metrics::counter!("tollgate_tpm_charged_tokens_total", "budget" => budget.to_owned())
            .increment(charged);
    }
}

pub(crate) fn refused(budget: &str, reason: Reason, tokens: u64) {
    let reason = match reason {
        Reason::OverLimit => "over_limit",
        Reason::WaitTooLong => "wait_too_long",
        Reason::QueueFull => "queue_full",
        _ => "too_large",
    };
    metrics::counter!("tollgate_tpm_refused_total", "budget" => budget.to_owned(), "reason" => reason).increment(1);
    metrics::counter!("tollgate_tpm_refused_tokens_total", "budget" => budget.to_owned())
        .increment(tokens);
}
