//! Backoff and jitter stay inside their bounds, whatever the settings.

use std::time::Duration;

use proptest::prelude::*;
use tollgate_retry::{Backoff, Jitter};

proptest! {
    #[test]
    fn waits_stay_inside_their_bounds(
        base_ms in 1u64..5_000,
        factor in 1.0f64..5.0,
        cap_ms in 1u64..120_000,
        retry in 0u32..100,
        previous_ms in 0u64..200_000,
        seed in any::<u64>(),
    ) {
        let cap = Duration::from_millis(cap_ms);
        let base = Duration::from_millis(base_ms);
        let mut rng = fastrand::Rng::with_seed(seed);
        for jitter in [Jitter::Full, Jitter::Decorrelated, Jitter::None] {
            let b = Backoff { base, factor, cap, jitter };
            let ceiling = b.ceiling(retry);
            prop_assert!(ceiling <= cap);
            prop_assert!(b.ceiling(retry + 1) >= ceiling, "the ceiling never shrinks");
            let w = b.wait(retry, Duration::from_millis(previous_ms), &mut rng);
            match jitter {
                Jitter::None => prop_assert_eq!(w, ceiling),
                Jitter::Full => prop_assert!(w <= ceiling),
                Jitter::Decorrelated => {
                    let hi = Duration::from_millis(previous_ms).max(base).saturating_mul(3).min(cap);
                    prop_assert!(w >= base.min(cap) && w <= hi.max(base.min(cap)), "{w:?} outside [{base:?}, {hi:?}]");
                }
            }
        }
    }
}
