//! Quotas in the units people think in.

use std::num::NonZeroU32;
use std::time::Duration;

/// How many requests pass per interval, and how many may pass at once.
///
/// `Quota::per_minute(3000)` allows 3000 requests a minute, refilled one every 20 ms, and
/// (like governor's quotas and OpenAI's buckets) lets a whole minute's worth through at
/// once when the limit has been idle. State a smaller burst apart:
/// `Quota::per_minute(3000).burst(50)`.
///
/// A quota of zero (`Quota::per_minute(0)`) lets nothing through: every request is
/// refused as one that can never pass. It is never a panic.
///
/// ```
/// use std::time::Duration;
/// use tollgate_ratelimit::Quota;
///
/// let q = Quota::per_second(50).burst(10);
/// assert_eq!(q.interval(), Duration::from_millis(20));
/// assert_eq!(q.burst_size(), 10);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// `None` when closed (a zero quota).
    inner: Option<governor::Quota>,
}

impl Quota {
    fn every(count: u32, per: Duration) -> Self {
        let inner = NonZeroU32::new(count).and_then(|n| {
            let interval = per / n.get();
            governor::Quota::with_period(interval.max(Duration::from_nanos(1)))
                .map(|q| q.allow_burst(n))
        });
        Self { inner }
    }

    /// `n` requests per second, all of them allowed at once.
    pub fn per_second(n: u32) -> Self {
        Self::every(n, Duration::from_secs(1))
    }

    /// `n` requests per minute, all of them allowed at once.
    pub fn per_minute(n: u32) -> Self {
        Self::every(n, Duration::from_secs(60))
    }

    /// `n` requests per hour, all of them allowed at once.
    pub fn per_hour(n: u32) -> Self {
        Self::every(n, Duration::from_secs(3600))
    }

    /// `n` requests per `window`, all of them allowed at once.
    pub fn per(n: u32, window: Duration) -> Self {
        Self::every(n, window)
    }

    /// At most `n` requests at once; the rate stays as it was. Zero closes the quota.
    pub fn burst(self, n: u32) -> Self {
        Self {
            inner: self
                .inner
                .and_then(|q| NonZeroU32::new(n).map(|n| q.allow_burst(n))),
        }
    }

    /// This quota split between `instances`: the rate and the burst divided by it (the
    /// burst at least one). The share each instance keeps in process when a shared store
    /// cannot answer.
    pub fn share(self, instances: u32) -> Self {
        let n = instances.max(1);
        match self.inner {
            None => self,
            Some(q) => {
                let interval = q.replenish_interval().saturating_mul(n);
                let burst = (q.burst_size().get() / n).max(1);
                Self {
                    inner: governor::Quota::with_period(interval)
                        .and_then(|q| NonZeroU32::new(burst).map(|b| q.allow_burst(b))),
                }
            }
        }
    }

    /// No bound worth the name (a cell a nanosecond, `u32::MAX` at once): the ceiling of a
    /// limit whose quota is learned.
    pub(crate) fn unbounded() -> Self {
        Self::with_interval(Duration::from_nanos(1), u32::MAX)
    }

    /// One cell every `interval`, `burst` at once.
    pub(crate) fn with_interval(interval: Duration, burst: u32) -> Self {
        Self {
            inner: governor::Quota::with_period(interval.max(Duration::from_nanos(1)))
                .and_then(|q| NonZeroU32::new(burst).map(|b| q.allow_burst(b))),
        }
    }

    /// The time between two cells: the rate.
    pub fn interval(&self) -> Duration {
        self.inner.map_or(Duration::MAX, |q| q.replenish_interval())
    }

    /// How many requests may pass at once.
    pub fn burst_size(&self) -> u32 {
        self.inner.map_or(0, |q| q.burst_size().get())
    }

    /// The time to refill a whole burst: the window of `RateLimit-Policy`.
    pub fn window(&self) -> Duration {
        self.inner
            .map_or(Duration::ZERO, |q| q.burst_size_replenished_in())
    }

    /// True for a zero quota, which lets nothing through.
    pub fn is_closed(&self) -> bool {
        self.inner.is_none()
    }

    pub(crate) fn governor(&self) -> Option<governor::Quota> {
        self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_mean_what_they_say() {
        let q = Quota::per_minute(3000);
        assert_eq!(q.interval(), Duration::from_millis(20));
        assert_eq!(q.burst_size(), 3000);
        assert_eq!(q.window(), Duration::from_secs(60));
        let h = Quota::per_hour(60).burst(5);
        assert_eq!(h.interval(), Duration::from_secs(60));
        assert_eq!(h.burst_size(), 5);
        assert_eq!(h.window(), Duration::from_secs(300));
        assert_eq!(
            Quota::per(10, Duration::from_secs(5)).interval(),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn zero_closes_instead_of_panicking() {
        assert!(Quota::per_second(0).is_closed());
        assert!(Quota::per_second(5).burst(0).is_closed());
        assert_eq!(Quota::per_minute(0).burst_size(), 0);
        // Absurd rates are clamped to one cell per nanosecond rather than overflowing.
        assert!(!Quota::per(u32::MAX, Duration::from_nanos(1)).is_closed());
    }
}
