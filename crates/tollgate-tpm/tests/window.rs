//! The budget's guarantee, whatever the traffic: the tokens actually used by requests
//! admitted in any span of time never exceed capacity + rate × span — with random prompt
//! sizes, random actual usage (at most the reservation, as `max_tokens` guarantees) and
//! settlements that arrive later, in random order.

mod common;

use std::time::Duration;

use common::{chat, drain, fake_provider, now};
use proptest::prelude::*;
use tollgate_core::clock::ManualClock;
use tollgate_tpm::estimate::Estimator;
use tollgate_tpm::{Budget, TokenQuota, TpmLayer};
use tower::{Layer, Service};

/// Runs `steps` — (gap in ms, prompt words, max_tokens, % of max_tokens used, steps
/// until the answer is read) — and checks the bound over every span.
fn check(capacity: u64, steps: &[(u64, usize, u64, u8, usize)]) -> Result<(), String> {
    let clock = ManualClock::new();
    let window = Duration::from_secs(60);
    let layer = TpmLayer::builder()
        .budget(Budget::new("tpm", TokenQuota::per(capacity, window)))
        .estimator(Estimator::default())
        .clock(clock.clone())
        .housekeeping(None)
        .build();
    let mut svc = layer.layer(fake_provider());
    let rate = capacity as f64 / window.as_secs_f64();
    let mut t = 0u64; // ms
    let mut admitted: Vec<(u64, u64)> = Vec::new(); // (ms, actual)
    let mut pending: Vec<(
        usize,
        tollgate_tpm::TpmBody<http_body_util::Full<bytes::Bytes>>,
    )> = Vec::new();
    for &(gap, words, max_tokens, used_pct, settle_after) in steps {
        clock.advance(Duration::from_millis(gap));
        t += gap;
        for (left, _) in pending.iter_mut() {
            *left = left.saturating_sub(1);
        }
        // The prompt is 8 + words tokens; the test reports at most that plus the cap.
        let actual = 7 + words as u64 + max_tokens * u64::from(used_pct) / 100;
        let _ = now(std::future::poll_fn(|cx| {
            Service::<http::Request<http_body_util::Full<bytes::Bytes>>>::poll_ready(&mut svc, cx)
        }));
        if let Ok(res) = now(svc.call(chat(words, max_tokens, actual))) {
            admitted.push((t, actual));
            let body = res.into_body();
            if settle_after == 0 {
                drain(body);
            } else {
                pending.push((settle_after, body));
            }
        }
        // Bodies whose time has come are read to their end, settling them.
        let (done, keep): (Vec<_>, Vec<_>) = pending.into_iter().partition(|(left, _)| *left == 0);
        for (_, body) in done {
            drain(body);
        }
        pending = keep;
    }
    for i in 0..admitted.len() {
        let mut used = 0;
        for j in i..admitted.len() {
            used += admitted[j].1;
            let span = (admitted[j].0 - admitted[i].0) as f64 / 1000.0;
            let bound = capacity as f64 + rate * span + 1.0;
            if used as f64 > bound {
                return Err(format!("{used} used in {span} s; bound {bound}"));
            }
        }
    }
    Ok(())
}

proptest! {
    // 64 cases by default; PROPTEST_CASES raises it for a longer search.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
        ..ProptestConfig::default()
    })]

    #[test]
    fn used_tokens_never_exceed_capacity_plus_rate_in_any_window(
        capacity in 200u64..2000,
        steps in prop::collection::vec((0u64..3000, 1usize..120, 1u64..300, 0u8..=100, 0usize..4), 1..60),
    ) {
        prop_assert_eq!(check(capacity, &steps), Ok(()));
    }
}

/// Found by the property: a reservation refunded after the bucket had refilled as if it
/// were gone let the next minute use more than a provider counting actual usage would.
/// The ledger now holds in-flight reservations out of the refill.
#[test]
fn refunds_after_a_refill_do_not_count_twice() {
    let steps = [
        (0, 1, 18, 0, 1),
        (1282, 13, 235, 87, 0),
        (2667, 77, 137, 86, 2),
        (1253, 34, 133, 49, 2),
        (1653, 28, 127, 3, 0),
        (2464, 87, 19, 30, 1),
        (957, 46, 290, 8, 0),
        (2389, 85, 186, 2, 3),
        (2487, 92, 78, 33, 2),
        (1574, 85, 148, 98, 0),
        (2488, 96, 153, 17, 0),
        (1201, 21, 180, 95, 1),
        (1454, 48, 117, 70, 3),
        (2809, 40, 184, 89, 0),
        (443, 36, 29, 30, 3),
        (1489, 86, 49, 100, 1),
        (1157, 110, 24, 71, 0),
        (2862, 84, 21, 37, 0),
        (1639, 29, 41, 59, 1),
        (811, 61, 278, 84, 1),
        (1140, 108, 67, 70, 3),
        (2997, 79, 242, 25, 1),
        (1209, 22, 175, 10, 2),
        (1756, 116, 30, 67, 1),
        (2188, 11, 22, 60, 3),
        (702, 68, 7, 31, 2),
        (2522, 99, 127, 5, 1),
        (2550, 7, 136, 23, 2),
        (1052, 114, 67, 2, 1),
        (2730, 17, 239, 60, 3),
        (2731, 38, 167, 13, 1),
        (1468, 73, 8, 95, 1),
        (956, 9, 4, 62, 1),
        (1571, 89, 228, 99, 0),
        (1048, 40, 18, 42, 1),
        (2394, 115, 221, 32, 0),
        (2317, 98, 64, 98, 0),
        (2337, 30, 163, 95, 1),
    ];
    assert_eq!(check(1174, &steps), Ok(()));
}
