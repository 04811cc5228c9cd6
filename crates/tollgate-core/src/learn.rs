//! Learning a provider's quota from its own answers, for limits nobody configured.
//!
//! Quotas differ by tier, model and month, so the common case is a user who does not know
//! theirs. Providers say it on every answer — `x-ratelimit-limit-requests`,
//! `-remaining-`, `-reset-` (and Anthropic's `anthropic-ratelimit-*`) — so a limit can
//! adopt it instead of discovering it one 429 at a time. Two pieces, shared by every
//! limit that learns (the rate limiter and the token budget):
//!
//! - [`LearnedQuota::from_state`] turns one answer's headers into a quota: the window's
//!   count at the window's pace, and the bucket's size (its *burst*), which the headers
//!   give away too: a bucket refilling `limit` per minute with `remaining` left is full
//!   again after `reset`, so it holds `remaining + reset × limit ÷ 1 min`.
//! - [`SlowStart`] is TCP's slow start applied to a quota: until the first answer says
//!   what the quota is, one request goes (more, doubling, if answers are slow to come);
//!   the rest wait, and are released the moment it is known. A provider that sends no
//!   quota headers at all is not limited by guesswork. After a 429 with a hint, every
//!   request waits the hint out ([`SlowStart::pause_until`]), so concurrent requests do not
//!   each discover the same 429.
//! - [`Learner`] holds the two for one meter, with the quota in force: what every answer
//!   does to it (learn, end slow start, pause) is written once, here.
//!
//! ```
//! use std::time::Duration;
//! use tollgate_core::headers::LimitState;
//! use tollgate_core::learn::LearnedQuota;
//!
//! // 600 a minute, 9 left, full again in 100 ms: a bucket of 10.
//! let seen = LimitState { limit: Some(600), remaining: Some(9), reset: Some(Duration::from_millis(100)) };
//! let q = LearnedQuota::from_state(&seen).unwrap();
//! assert_eq!((q.limit, q.burst, q.window), (600, 10, Duration::from_secs(60)));
//! ```

use std::time::Duration;

use tokio::time::Instant;

use crate::clock::later;
use crate::headers::LimitState;

/// The window providers state `x-ratelimit-limit-*` over: a minute (RPM, TPM).
pub const PROVIDER_WINDOW: Duration = Duration::from_secs(60);

/// How long the first requests may go unanswered before slow start lets twice as many
/// through (the first answer may be a long generation).
pub const PROBE_PATIENCE: Duration = Duration::from_secs(2);

/// A quota as a provider's headers state it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LearnedQuota {
    /// The window's count (`x-ratelimit-limit-*`).
    pub limit: u64,
    /// The window it refills over ([`PROVIDER_WINDOW`]).
    pub window: Duration,
    /// How much the bucket holds at once: `limit` unless the headers show a smaller one.
    pub burst: u64,
}

impl LearnedQuota {
    /// The quota one answer's headers state, or `None` when they state no limit.
    ///
    /// The burst is read from `remaining` and `reset` when both are there (see the
    /// [module docs](self)), rounded up, and kept within `1..=limit`.
    pub fn from_state(state: &LimitState) -> Option<Self> {
        let limit = state.limit.filter(|&l| l > 0)?;
        let burst = match (state.remaining, state.reset) {
            (Some(remaining), Some(reset)) => {
                let refill = reset.as_secs_f64() * limit as f64 / PROVIDER_WINDOW.as_secs_f64();
                // Less a hair, so a level that is exactly whole does not round up past it.
                let size = (remaining as f64 + refill - 0.01).ceil();
                if size.is_finite() && size >= 1.0 {
                    (size as u64).min(limit)
                } else {
                    1
                }
            }
            _ => limit,
        };
        Some(Self {
            limit,
            window: PROVIDER_WINDOW,
            burst,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Nothing known yet: `out` requests are on their way, `allowed` may be.
    Unknown {
        out: u32,
        allowed: u32,
        grow_at: Instant,
    },
    /// Answers came without quota headers: nothing to pace to.
    Open,
    /// A quota is known (configured, or learned).
    Known,
}

/// Slow start and server-hint pauses for a limit that learns; see the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlowStart {
    phase: Phase,
    paused_until: Option<Instant>,
}

impl SlowStart {
    /// For a limit whose quota is not known yet: slow start until the first answer.
    pub fn unknown(now: Instant) -> Self {
        Self {
            phase: Phase::Unknown {
                out: 0,
                allowed: 1,
                grow_at: later(now, PROBE_PATIENCE),
            },
            paused_until: None,
        }
    }

    /// For a limit whose quota is configured: no slow start, only pauses.
    pub fn known() -> Self {
        Self {
            phase: Phase::Known,
            paused_until: None,
        }
    }

    /// Whether nothing is known of the quota yet (slow start).
    pub fn is_unknown(&self) -> bool {
        matches!(self.phase, Phase::Unknown { .. })
    }

    /// Whether the quota is known, so the limit's own quota decides.
    pub fn is_known(&self) -> bool {
        self.phase == Phase::Known
    }

    /// May a request go now? `None`: yes (counted as a probe during slow start);
    /// `Some(wait)`: not before `wait` has passed (or the quota becomes known).
    pub fn admit(&mut self, now: Instant) -> Option<Duration> {
        if let Some(until) = self.paused_until {
            if now < until {
                return Some(until - now);
            }
            self.paused_until = None;
        }
        match &mut self.phase {
            Phase::Unknown {
                out,
                allowed,
                grow_at,
            } => {
                if now >= *grow_at {
                    // No answer yet: let more through, doubling, like TCP's slow start.
                    *allowed = allowed.saturating_mul(2);
                    *grow_at = later(now, PROBE_PATIENCE);
                }
                if out < allowed {
                    *out += 1;
                    None
                } else {
                    Some(grow_at.saturating_duration_since(now))
                }
            }
            Phase::Open | Phase::Known => None,
        }
    }

    /// A request admitted by [`admit`](Self::admit) went no further (it was refunded) or
    /// got no answer (a transport error): its probe is free for another.
    pub fn released(&mut self) {
        if let Phase::Unknown { out, .. } = &mut self.phase {
            *out = out.saturating_sub(1);
        }
    }

    /// An answer stated the quota. Returns whether slow start ended with it.
    pub fn learned(&mut self) -> bool {
        let was = self.phase != Phase::Known;
        self.phase = Phase::Known;
        was
    }

    /// An answer came with no quota headers. During slow start that means there is no
    /// quota to learn: requests go unpaced (a later answer may still state one). Returns
    /// whether slow start ended with it.
    pub fn answered_without_quota(&mut self) -> bool {
        if self.is_unknown() {
            self.phase = Phase::Open;
            true
        } else {
            false
        }
    }

    /// A 429 said when to come back: nobody goes before `until`.
    pub fn pause_until(&mut self, until: Instant) {
        self.paused_until = Some(self.paused_until.map_or(until, |t| t.max(until)));
    }

    /// When requests may go again after a 429's hint, if they are paused.
    pub fn paused_until(&self) -> Option<Instant> {
        self.paused_until
    }
}

/// A learning meter's state: slow start and pauses, and the quota in force — `Q` is
/// whatever the meter counts with (a quota, or a limiter built for one); `None` while no
/// quota is known, when nothing is counted.
#[derive(Debug)]
pub struct Learner<Q> {
    start: SlowStart,
    quota: Option<Q>,
}

impl<Q: Clone> Learner<Q> {
    /// A meter with a `configured` quota (no slow start, only pauses), or none yet (slow
    /// start from `now`).
    pub fn new(configured: Option<Q>, now: Instant) -> Self {
        Self {
            start: if configured.is_some() {
                SlowStart::known()
            } else {
                SlowStart::unknown(now)
            },
            quota: configured,
        }
    }

    /// When requests may go again after a 429's hint, if they are paused.
    pub fn paused_until(&self) -> Option<Instant> {
        self.start.paused_until()
    }

    /// The quota in force, if one is known.
    pub fn quota(&self) -> Option<&Q> {
        self.quota.as_ref()
    }

    /// May a request go now? `Err(wait)`: slow start or a pause holds it back that long.
    /// `Ok(Some(q))`: count it against `q`; `Ok(None)`: count nothing (slow start's probe,
    /// or a provider that states no quota). A request admitted here that the meter then
    /// refuses must be [`released`](Self::released).
    pub fn admit(&mut self, now: Instant) -> Result<Option<Q>, Duration> {
        match self.start.admit(now) {
            Some(wait) => Err(wait),
            None => Ok(self.quota.clone()),
        }
    }

    /// A request admitted by [`admit`](Self::admit) went no further: its probe is free.
    pub fn released(&mut self) {
        self.start.released();
    }

    /// An answer came. `state` is what it said of the quota; `success` whether it was a
    /// 2xx (only such an answer without quota headers says there is no quota to learn —
    /// an error page may simply not carry them); `pause` when a 429's hint lets requests
    /// go again. `adopt` turns a stated quota into the one to keep given the one in force,
    /// or `None` to keep that. Returns whether waiters should be tried again now.
    pub fn answered(
        &mut self,
        state: &LimitState,
        success: bool,
        pause: Option<Instant>,
        adopt: impl FnOnce(LearnedQuota, Option<&Q>) -> Option<Q>,
    ) -> bool {
        let mut kick = false;
        match LearnedQuota::from_state(state) {
            Some(seen) => {
                if let Some(q) = adopt(seen, self.quota.as_ref()) {
                    self.quota = Some(q);
                    kick = true;
                }
                kick |= self.start.learned();
            }
            None if success => kick |= self.start.answered_without_quota(),
            // An error without quota headers says nothing of the quota: its place in slow
            // start goes to another request.
            None => kick |= self.unanswered(),
        }
        if let Some(until) = pause {
            self.start.pause_until(until);
        }
        kick
    }

    /// A request got no answer (a transport error): during slow start its place goes to
    /// another. Returns whether waiters should be tried again now.
    pub fn unanswered(&mut self) -> bool {
        if self.start.is_unknown() {
            self.start.released();
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(limit: u64, remaining: u64, reset_ms: u64) -> LimitState {
        LimitState {
            limit: Some(limit),
            remaining: Some(remaining),
            reset: Some(Duration::from_millis(reset_ms)),
        }
    }

    #[test]
    fn the_bucket_size_is_read_from_remaining_and_reset() {
        let q = |s| LearnedQuota::from_state(&s).unwrap().burst;
        assert_eq!(
            q(state(600, 9, 100)),
            10,
            "OpenAI-style level 9, 0.1 s to full"
        );
        assert_eq!(q(state(600, 9, 40)), 10, "a level of 9.6 is shown as 9");
        assert_eq!(q(state(600, 599, 100)), 600, "the whole minute");
        assert_eq!(q(state(600, 0, 60_000)), 600, "empty, a minute to full");
        assert_eq!(
            q(state(600, 0, 3_600_000)),
            600,
            "never more than the limit"
        );
        assert_eq!(q(state(100_000, 99_000, 600)), 100_000, "tokens alike");
        let no_reset = LimitState {
            limit: Some(60),
            remaining: Some(3),
            reset: None,
        };
        assert_eq!(LearnedQuota::from_state(&no_reset).unwrap().burst, 60);
        assert_eq!(LearnedQuota::from_state(&LimitState::default()), None);
        let zero = LimitState {
            limit: Some(0),
            ..LimitState::default()
        };
        assert_eq!(LearnedQuota::from_state(&zero), None);
    }

    #[test]
    fn slow_start_lets_one_through_then_doubles_while_no_answer_comes() {
        let t0 = Instant::now();
        let mut s = SlowStart::unknown(t0);
        assert_eq!(s.admit(t0), None, "the first request goes");
        assert_eq!(s.admit(t0), Some(PROBE_PATIENCE), "the second waits");
        let t1 = t0 + PROBE_PATIENCE;
        assert_eq!(s.admit(t1), None, "no answer in time: two may be out");
        assert!(s.admit(t1).is_some());
        s.released();
        assert_eq!(
            s.admit(t1),
            None,
            "a probe that got no answer frees its place"
        );
        assert!(s.learned(), "the first answer with a quota ends slow start");
        assert_eq!(s.admit(t1), None);
        assert!(!s.learned());
    }

    #[test]
    fn answers_without_quota_headers_open_it_and_a_hint_pauses_everyone() {
        let t0 = Instant::now();
        let mut s = SlowStart::unknown(t0);
        assert_eq!(s.admit(t0), None);
        assert!(s.answered_without_quota());
        assert_eq!(s.admit(t0), None);
        assert_eq!(s.admit(t0), None, "nothing to pace to");
        s.pause_until(t0 + Duration::from_secs(3));
        s.pause_until(t0 + Duration::from_secs(1));
        assert_eq!(
            s.admit(t0),
            Some(Duration::from_secs(3)),
            "the later hint holds"
        );
        assert_eq!(s.admit(t0 + Duration::from_secs(3)), None);
        assert!(!s.answered_without_quota());
    }
}
