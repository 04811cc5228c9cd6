//! The provider's own accounting: a token bucket per key and per limit, written apart from
//! Tollgate's limiters so that it judges them fairly.
//!
//! Like OpenAI's, a bucket holds a minute's quota and refills continuously, so
//! `x-ratelimit-reset-*` is the time until it is full again. A bucket may hold less than
//! its window's quota (a burst), as providers that quantise minute limits into shorter
//! windows do; `x-ratelimit-limit-*` still says the window's quota.

use std::time::Duration;

use tokio::time::Instant;

/// A bucket holding up to `capacity`, refilling `limit` per `window`.
#[derive(Clone, Debug)]
pub(crate) struct Bucket {
    /// The window's quota, as the headers state it.
    limit: u64,
    capacity: f64,
    level: f64,
    per_sec: f64,
    last: Instant,
}

impl Bucket {
    pub(crate) fn new(capacity: u64, window: Duration, now: Instant) -> Self {
        Self::with_burst(capacity, window, capacity, now)
    }

    /// `limit` per `window`, holding at most `burst` at once.
    pub(crate) fn with_burst(limit: u64, window: Duration, burst: u64, now: Instant) -> Self {
        let capacity = burst.min(limit).max(1) as f64;
        Self {
            limit,
            capacity,
            level: capacity,
            per_sec: limit as f64 / window.as_secs_f64().max(1e-9),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.level = (self.level + dt * self.per_sec).min(self.capacity);
        self.last = now;
    }

    /// How long until `n` can be taken: zero when it can now, `None` when never.
    pub(crate) fn wait_for(&mut self, n: u64, now: Instant) -> Option<Duration> {
        self.refill(now);
        let n = n as f64;
        if n > self.capacity {
            return None;
        }
        if self.level >= n {
            return Some(Duration::ZERO);
        }
        Some(Duration::from_secs_f64((n - self.level) / self.per_sec))
    }

    /// Takes `n`, which [`wait_for`](Self::wait_for) said is available.
    pub(crate) fn take(&mut self, n: u64) {
        self.level -= n as f64;
    }

    /// The window's quota, as the headers and error messages state it.
    pub(crate) fn capacity(&self) -> u64 {
        self.limit
    }

    pub(crate) fn remaining(&self) -> u64 {
        self.level.max(0.0).floor() as u64
    }

    /// Time until the bucket is full again.
    pub(crate) fn reset(&self) -> Duration {
        Duration::from_secs_f64(((self.capacity - self.level).max(0.0)) / self.per_sec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_a_windows_quota_and_refills_continuously() {
        let t0 = Instant::now();
        let mut b = Bucket::new(60, Duration::from_secs(60), t0);
        for _ in 0..60 {
            assert_eq!(b.wait_for(1, t0), Some(Duration::ZERO));
            b.take(1);
        }
        assert_eq!(b.wait_for(1, t0), Some(Duration::from_secs(1)));
        assert_eq!(b.reset(), Duration::from_secs(60));
        let t1 = t0 + Duration::from_millis(1500);
        assert_eq!(b.wait_for(1, t1), Some(Duration::ZERO));
        assert_eq!(b.remaining(), 1);
        let t2 = t0 + Duration::from_secs(3600);
        b.wait_for(0, t2);
        assert_eq!(b.remaining(), 60, "never more than the capacity");
    }

    #[test]
    fn a_burst_smaller_than_the_window_refills_at_the_windows_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::with_burst(600, Duration::from_secs(60), 10, t0);
        for _ in 0..10 {
            assert_eq!(b.wait_for(1, t0), Some(Duration::ZERO));
            b.take(1);
        }
        assert_eq!(b.wait_for(1, t0), Some(Duration::from_millis(100)));
        assert_eq!(
            b.capacity(),
            600,
            "the headers still say the minute's quota"
        );
        assert_eq!(
            b.reset(),
            Duration::from_secs(1),
            "ten cells at ten a second"
        );
    }

    #[test]
    fn a_cost_above_capacity_never_passes() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000, Duration::from_secs(60), t0);
        assert_eq!(b.wait_for(1001, t0), None);
        assert_eq!(b.wait_for(1000, t0), Some(Duration::ZERO));
    }
}
