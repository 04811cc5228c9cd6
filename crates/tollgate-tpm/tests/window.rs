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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn used_tokens_never_exceed_capacity_plus_rate_in_any_window(
        capacity in 200u64..2000,
        steps in prop::collection::vec((0u64..3000, 1usize..120, 1u64..300, 0u8..=100, 0usize..4), 1..60),
    ) {
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
        let mut pending: Vec<(usize, tollgate_tpm::TpmBody<http_body_util::Full<bytes::Bytes>>)> = Vec::new();
        for (gap, words, max_tokens, used_pct, settle_after) in steps {
            clock.advance(Duration::from_millis(gap));
            t += gap;
            for (left, _) in pending.iter_mut() {
                *left = left.saturating_sub(1);
            }
            // The prompt is exact: 3 + 3 + "user" + words; actual ≤ prompt + max_tokens.
            let prompt = 7 + words as u64;
            let actual = prompt + max_tokens * u64::from(used_pct) / 100;
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
            for (_, body) in done { drain(body); }
            pending = keep;
        }
        for i in 0..admitted.len() {
            let mut used = 0;
            for j in i..admitted.len() {
                used += admitted[j].1;
                let span = (admitted[j].0 - admitted[i].0) as f64 / 1000.0;
                let bound = capacity as f64 + rate * span + 1.0;
                prop_assert!(used as f64 <= bound, "{used} used in {span} s; bound {bound}");
            }
        }
    }
}
