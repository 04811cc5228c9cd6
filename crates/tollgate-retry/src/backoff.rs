//! How long to wait when the server gives no hint.

use std::time::Duration;

/// How backoff waits are spread.
///
/// **Full** (the default): a uniform draw between zero and the exponential backoff. Of
/// the schemes compared in AWS's "Exponential Backoff and Jitter" study it sends the
/// fewest calls and finishes soonest under contention, because it spreads waiters over the
/// whole window instead of bunching them near its top. **Decorrelated** draws each wait
/// between the base and three times the previous one (capped), which keeps waits from
/// shrinking back to the base after a long one. **None** waits exactly the backoff —
/// every instance wakes together; use it only in tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jitter {
    /// Uniform in `[0, backoff]`.
    Full,
    /// Uniform in `[base, 3 × previous]`, capped.
    Decorrelated,
    /// No jitter.
    None,
}

/// Exponential backoff: `base × factor^attempt`, capped, with [`Jitter`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    /// The first wait (500 ms by default, as openai-python).
    pub base: Duration,
    /// The growth per attempt (2 by default).
    pub factor: f64,
    /// The longest wait (8 s by default, as openai-python).
    pub cap: Duration,
    /// How waits are spread.
    pub jitter: Jitter,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            factor: 2.0,
            cap: Duration::from_secs(8),
            jitter: Jitter::Full,
        }
    }
}

impl Backoff {
    /// The un-jittered wait before retry number `retry` (0 for the first retry).
    pub fn ceiling(&self, retry: u32) -> Duration {
        let f = if self.factor.is_finite() {
            self.factor.max(1.0)
        } else {
            2.0
        };
        let secs = self.base.as_secs_f64() * f.powi(retry.min(64) as i32);
        if !secs.is_finite() || secs >= self.cap.as_secs_f64() {
            self.cap
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The wait before retry number `retry`, given the previous wait, drawing from `rng`.
    pub fn wait(&self, retry: u32, previous: Duration, rng: &mut fastrand::Rng) -> Duration {
        let uniform = |lo: Duration, hi: Duration, rng: &mut fastrand::Rng| {
            if hi <= lo {
                return lo;
            }
            lo + (hi - lo).mul_f64(rng.f64())
        };
        match self.jitter {
            Jitter::None => self.ceiling(retry),
            Jitter::Full => uniform(Duration::ZERO, self.ceiling(retry), rng),
            Jitter::Decorrelated => {
                let hi = previous.max(self.base).saturating_mul(3).min(self.cap);
                uniform(self.base.min(self.cap), hi, rng)
            }
        }
    }
}
