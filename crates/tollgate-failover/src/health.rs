//! Each backend's health: failures in a window, cooldown, a half-open trial, recovery.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tollgate_core::clock::later;

use tokio::time::Instant;

/// When a backend is set aside, and for how long.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cooldown {
    /// This many failures within [`window`](Self::window) set a backend aside (3).
    pub failures: u32,
    /// The window failures are counted over (30 s).
    pub window: Duration,
    /// How long a backend is set aside when the server gave no hint (30 s).
    pub duration: Duration,
    /// A 429 or 503 whose `Retry-After` is at least this long sets the backend aside at
    /// once, for the hint (5 s).
    pub long_hint: Duration,
}

impl Default for Cooldown {
    fn default() -> Self {
        Self {
            failures: 3,
            window: Duration::from_secs(30),
            duration: Duration::from_secs(30),
            long_hint: Duration::from_secs(5),
        }
    }
}

#[derive(Debug)]
enum State {
    Healthy {
        failures: Vec<Instant>,
    },
    Cooling {
        until: Instant,
        /// Set aside because its provider said 429: its quota, not an outage.
        limited: bool,
    },
    /// Cooled down: one trial request decides.
    Trial {
        in_flight: bool,
    },
}

/// One backend's health, shared by every clone of the service.
#[derive(Debug)]
pub(crate) struct Health {
    state: Mutex<State>,
}

/// What a backend may do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Take traffic.
    Open,
    /// Take this one request as its trial.
    Trial,
    /// Set aside until then; `true` when for its provider's 429s (a limit), `false` for
    /// errors (an outage).
    Cooling(Instant, bool),
    /// A trial is in flight; others skip it for now.
    Busy,
}

impl Health {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(State::Healthy {
                failures: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Each section assigns a small state; a panic elsewhere leaves it whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn gate(&self, now: Instant) -> Gate {
        let mut s = self.lock();
        match &mut *s {
            State::Healthy { .. } => Gate::Open,
            State::Cooling { until, limited } if now < *until => Gate::Cooling(*until, *limited),
            State::Cooling { .. } => {
                *s = State::Trial { in_flight: true };
                Gate::Trial
            }
            State::Trial { in_flight: true } => Gate::Busy,
            State::Trial { in_flight } => {
                *in_flight = true;
                Gate::Trial
            }
        }
    }

    /// The backend answered well: healthy again.
    pub(crate) fn success(&self) {
        *self.lock() = State::Healthy {
            failures: Vec::new(),
        };
    }

    /// The backend failed (`limited`: its provider answered 429). Returns the cooldown it
    /// entered, if it did.
    pub(crate) fn failure(
        &self,
        now: Instant,
        hint: Option<Duration>,
        limited: bool,
        rules: &Cooldown,
    ) -> Option<Duration> {
        let mut s = self.lock();
        let cool = |d: Duration| {
            (
                State::Cooling {
                    until: later(now, d),
                    limited,
                },
                Some(d),
            )
        };
        let (next, entered) = match &mut *s {
            // A failed trial: back to cooling.
            State::Trial { .. } | State::Cooling { .. } => cool(hint.unwrap_or(rules.duration)),
            State::Healthy { failures } => {
                if let Some(h) = hint.filter(|h| *h >= rules.long_hint) {
                    cool(h)
                } else {
                    failures.retain(|t| now.saturating_duration_since(*t) < rules.window);
                    failures.push(now);
                    if failures.len() as u32 >= rules.failures.max(1) {
                        // A provider that says when its quota is back is believed: it is
                        // away until then, not for a whole cooldown. Errors cool for at
                        // least the cooldown.
                        cool(match hint {
                            Some(h) if limited => h,
                            Some(h) => h.max(rules.duration),
                            None => rules.duration,
                        })
                    } else {
                        return None;
                    }
                }
            }
        };
        *s = next;
        entered
    }

    /// A trial that never finished (the caller went away) leaves the backend trial-ready.
    pub(crate) fn trial_abandoned(&self) {
        if let State::Trial { in_flight } = &mut *self.lock() {
            *in_flight = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_in_a_window_cool_a_backend_then_one_trial_decides() {
        let h = Health::new();
        let rules = Cooldown::default();
        let t0 = Instant::now();
        assert_eq!(h.failure(t0, None, false, &rules), None);
        assert_eq!(
            h.failure(t0 + Duration::from_secs(1), None, false, &rules),
            None
        );
        assert_eq!(
            h.failure(t0 + Duration::from_secs(2), None, false, &rules),
            Some(Duration::from_secs(30))
        );
        let t = t0 + Duration::from_secs(2);
        assert_eq!(
            h.gate(t + Duration::from_secs(29)),
            Gate::Cooling(t + Duration::from_secs(30), false)
        );
        assert_eq!(h.gate(t + Duration::from_secs(30)), Gate::Trial);
        assert_eq!(
            h.gate(t + Duration::from_secs(30)),
            Gate::Busy,
            "one trial at a time"
        );
        h.success();
        assert_eq!(h.gate(t + Duration::from_secs(31)), Gate::Open);
    }

    #[test]
    fn old_failures_fall_out_of_the_window() {
        let h = Health::new();
        let rules = Cooldown::default();
        let t0 = Instant::now();
        h.failure(t0, None, false, &rules);
        h.failure(t0 + Duration::from_secs(1), None, false, &rules);
        assert_eq!(
            h.failure(t0 + Duration::from_secs(40), None, false, &rules),
            None
        );
        assert_eq!(h.gate(t0 + Duration::from_secs(40)), Gate::Open);
    }

    #[test]
    fn a_long_hint_cools_at_once_for_the_hint_and_a_failed_trial_cools_again() {
        let h = Health::new();
        let rules = Cooldown::default();
        let t0 = Instant::now();
        assert_eq!(
            h.failure(t0, Some(Duration::from_secs(60)), false, &rules),
            Some(Duration::from_secs(60))
        );
        assert_eq!(h.gate(t0 + Duration::from_secs(60)), Gate::Trial);
        assert_eq!(
            h.failure(t0 + Duration::from_secs(60), None, false, &rules),
            Some(Duration::from_secs(30))
        );
        assert!(matches!(
            h.gate(t0 + Duration::from_secs(61)),
            Gate::Cooling(..)
        ));
    }
}
