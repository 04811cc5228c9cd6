//! Budgets: an amount of money per window, per key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tollgate_core::key::{Key, KeyExtractor, RequestHead};

use crate::price::Money;

/// The window a budget's spend is counted over. Day and month are calendar windows in
/// UTC — a day's budget starts again at 00:00 UTC, a month's on the 1st — because budgets
/// are set against invoices and the question "when does it reset?" then has one answer
/// for everyone, stated in `Retry-After`; a rolling window would free money a little at a
/// time, at moments nobody can predict. `Every` is a fixed window of any length, aligned
/// to the Unix epoch (an hour, a week of 7 × 24 h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Window {
    /// A calendar day in UTC.
    Day,
    /// A calendar month in UTC.
    Month,
    /// A fixed window of this length since the Unix epoch.
    Every(Duration),
}

impl Window {
    /// The window `now` falls in: its start and its end, in seconds since the epoch.
    pub fn bounds(&self, now: SystemTime) -> (u64, u64) {
        let t = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        match self {
            Window::Day => {
                let start = t - t % 86_400;
                (start, start + 86_400)
            }
            Window::Month => {
                let (y, m, _) = civil(t / 86_400);
                let start = days_from_civil(y, m, 1) * 86_400;
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (start, days_from_civil(ny, nm, 1) * 86_400)
            }
            Window::Every(d) => {
                let len = d.as_secs().max(1);
                let start = t - t % len;
                (start, start + len)
            }
        }
    }

    /// Reads `day`, `month`, or a duration in seconds, minutes, hours or weeks
    /// (`1h`, `7d` as `168h`).
    pub fn parse(s: &str) -> Option<Window> {
        match s.trim() {
            "day" | "d" | "1d" => Some(Window::Day),
            "month" | "mo" => Some(Window::Month),
            other => {
                let (n, unit) = other.split_at(other.find(|c: char| !c.is_ascii_digit())?);
                let n: u64 = if n.is_empty() { 1 } else { n.parse().ok()? };
                let secs = match unit {
                    "s" => 1,
                    "m" | "min" => 60,
                    "h" | "hour" => 3600,
                    "w" | "week" => 7 * 86_400,
                    _ => return None,
                };
                (n > 0).then(|| Window::Every(Duration::from_secs(n * secs)))
            }
        }
    }
}

/// (year, month, day) of the `days`-th day since 1970-01-01 (H. Hinnant's civil-from-days;
/// written out here because it is ten lines, and no date crate is needed otherwise).
fn civil(days: u64) -> (i64, u32, u32) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days since 1970-01-01 of (year, month, day); the inverse of [`civil`].
fn days_from_civil(y: i64, m: u32, d: u32) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    u64::try_from(era * 146_097 + doe - 719_468).unwrap_or(0)
}

/// A cost budget: a name (for headers, logs and errors, never the key), an amount per
/// window, and whose budget a request spends (the key extractor; one global budget by
/// default).
#[derive(Clone)]
pub struct CostBudget {
    pub(crate) name: Arc<str>,
    /// What this instance may spend in process (its share, with a store failing open).
    pub(crate) amount: Money,
    /// The whole budget: what the shared store holds every instance to.
    pub(crate) whole: Money,
    pub(crate) window: Window,
    key: Option<Arc<dyn KeyExtractor>>,
}

impl std::fmt::Debug for CostBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CostBudget")
            .field("name", &self.name)
            .field("amount", &self.amount)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl CostBudget {
    /// `amount` per `window`, named `name`.
    pub fn new(name: impl Into<Arc<str>>, amount: Money, window: Window) -> Self {
        Self {
            name: name.into(),
            amount,
            whole: amount,
            window,
            key: None,
        }
    }

    /// One budget per key `extractor` names (a request it cannot name spends the budget
    /// `unkeyed`).
    pub fn keyed_by(mut self, extractor: impl KeyExtractor) -> Self {
        self.key = Some(Arc::new(extractor));
        self
    }

    /// This budget at `instances`' share of its amount.
    pub(crate) fn shared_by(mut self, instances: u64) -> Self {
        self.amount = Money::from_nanos(self.amount.nanos() / instances.max(1));
        self
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn key_for(&self, head: &RequestHead<'_>) -> Key {
        match &self.key {
            None => Key::global(),
            Some(k) => k.extract(head).unwrap_or_else(|| Key::new("unkeyed")),
        }
    }
}

/// One key's spend in the window in force.
#[derive(Clone, Copy, Debug, Default)]
struct Account {
    window_start: u64,
    spent: Money,
    held: Money,
}

/// Where one key of a budget stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Standing {
    /// Settled spend in the window in force.
    pub spent: Money,
    /// Reserved for requests not yet settled.
    pub held: Money,
    /// The budget per window.
    pub amount: Money,
    /// Until the window ends.
    pub resets_in: Duration,
}

/// A budget with its accounts.
pub(crate) struct Ledger {
    pub(crate) budget: CostBudget,
    accounts: Mutex<HashMap<Key, Account>>,
}

impl Ledger {
    pub(crate) fn new(budget: CostBudget) -> Self {
        Self {
            budget,
            accounts: Mutex::new(HashMap::new()),
        }
    }

    /// Runs `f` on `key`'s account, rolled into the window of `now`. The sections are a
    /// few additions; a panic elsewhere leaves the map whole.
    fn with<T>(&self, key: &Key, now: SystemTime, f: impl FnOnce(&mut Account) -> T) -> T {
        let (start, _) = self.budget.window.bounds(now);
        let mut accounts = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        let a = accounts.entry(key.clone()).or_default();
        if a.window_start != start {
            // A new window: the spend starts again; what is held stays held.
            a.window_start = start;
            a.spent = Money::ZERO;
        }
        f(a)
    }

    /// Holds `cost` for `key` if the budget has it; else how long until the window ends.
    pub(crate) fn hold(&self, key: &Key, cost: Money, now: SystemTime) -> Result<(), Standing> {
        let amount = self.budget.amount;
        let resets_in = self.resets_in(now);
        self.with(key, now, |a| {
            if a.spent.plus(a.held).plus(cost) > amount {
                Err(Standing {
                    spent: a.spent,
                    held: a.held,
                    amount,
                    resets_in,
                })
            } else {
                a.held = a.held.plus(cost);
                Ok(())
            }
        })
    }

    /// Settles a hold of `held` with what the request really cost.
    pub(crate) fn settle(&self, key: &Key, held: Money, cost: Money, now: SystemTime) {
        self.with(key, now, |a| {
            a.held = a.held.minus(held);
            a.spent = a.spent.plus(cost);
        });
    }

    /// The shared store's account of `key` in the window in force: the whole budget,
    /// whatever this instance's share in process.
    pub(crate) fn cell(&self, key: &Key, now: SystemTime) -> tollgate_core::store::CostCell {
        let (window_start, window_end) = self.budget.window.bounds(now);
        tollgate_core::store::CostCell {
            key: Key::prefixed(self.budget.name(), key.as_str()),
            amount: self.budget.whole.nanos(),
            window_start,
            window_end,
        }
    }

    /// Where `key` stands in the store's account `(spent, held)` (nanodollars).
    pub(crate) fn standing_of(&self, (spent, held): (u64, u64), now: SystemTime) -> Standing {
        Standing {
            spent: Money::from_nanos(spent),
            held: Money::from_nanos(held),
            amount: self.budget.whole,
            resets_in: self.resets_in(now),
        }
    }

    pub(crate) fn standing(&self, key: &Key, now: SystemTime) -> Standing {
        let amount = self.budget.amount;
        let resets_in = self.resets_in(now);
        self.with(key, now, |a| Standing {
            spent: a.spent,
            held: a.held,
            amount,
            resets_in,
        })
    }

    fn resets_in(&self, now: SystemTime) -> Duration {
        let (_, end) = self.budget.window.bounds(now);
        let t = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        Duration::from_secs(end).saturating_sub(t)
    }

    /// Drops accounts with nothing held whose window is over.
    pub(crate) fn retain_recent(&self, now: SystemTime) {
        let (start, _) = self.budget.window.bounds(now);
        let mut accounts = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        accounts.retain(|_, a| a.window_start == start || a.held > Money::ZERO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn calendar_windows_in_utc() {
        // 2026-12-01T16:30:00Z.
        let t = at(1_796_142_600);
        let (s, e) = Window::Day.bounds(t);
        assert_eq!((s, e), (1_796_083_200, 1_796_169_600));
        let (s, e) = Window::Month.bounds(t);
        assert_eq!(s, 1_796_083_200, "December starts today");
        assert_eq!(e, 1_798_761_600, "2027-01-01T00:00:00Z");
        // 2024-02-10: a leap February ends on the 29th.
        let (s, e) = Window::Month.bounds(at(1_707_523_200));
        assert_eq!((s, e), (1_706_745_600, 1_709_251_200));
        assert_eq!(Window::parse("day"), Some(Window::Day));
        assert_eq!(Window::parse("month"), Some(Window::Month));
        assert_eq!(
            Window::parse("1h"),
            Some(Window::Every(Duration::from_secs(3600)))
        );
        assert_eq!(Window::parse("0h"), None);
        assert_eq!(Window::parse("fortnight"), None);
    }

    #[test]
    fn holds_never_pass_the_amount_and_a_new_window_starts_at_zero() {
        let l = Ledger::new(CostBudget::new("b", Money::dollars(1.0), Window::Day));
        let k = Key::new("tenant:a");
        let t = at(1_796_142_600);
        assert!(l.hold(&k, Money::dollars(0.6), t).is_ok());
        let refused = l.hold(&k, Money::dollars(0.5), t).unwrap_err();
        assert_eq!(refused.held, Money::dollars(0.6));
        assert_eq!(
            refused.resets_in,
            Duration::from_secs(1_796_169_600 - 1_796_142_600)
        );
        l.settle(&k, Money::dollars(0.6), Money::dollars(0.2), t);
        assert!(l.hold(&k, Money::dollars(0.5), t).is_ok());
        l.settle(&k, Money::dollars(0.5), Money::dollars(0.5), t);
        assert_eq!(l.standing(&k, t).spent, Money::dollars(0.7));
        let tomorrow = at(1_796_169_600);
        assert_eq!(l.standing(&k, tomorrow).spent, Money::ZERO);
        l.retain_recent(at(1_796_169_600 + 86_400));
        assert!(l.accounts.lock().unwrap().is_empty());
    }
}
