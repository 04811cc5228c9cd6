//! Go-style durations, as OpenAI writes them in `x-ratelimit-reset-*` (`6m0s`, `1s`,
//! `20ms`, `8.64s`).
//!
//! Written by hand: the general duration crates (humantime among them) reject Go's
//! fractional units (`1.5s`) or its unit spellings (`µs`), and the format is small.
//!
//! ```
//! use std::time::Duration;
//! use tollgate_core::duration::{format_go_duration, parse_go_duration};
//!
//! assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
//! assert_eq!(parse_go_duration("1h2m3.5s"), Some(Duration::from_millis(3_723_500)));
//! assert_eq!(format_go_duration(Duration::from_millis(8_640)), "8.64s");
//! assert_eq!(parse_go_duration("-1s"), None);
//! ```

use std::time::Duration;

/// The longest duration any hint is taken to mean; longer values are clamped to it.
///
/// A day is far past any provider's reset window, so clamping keeps "very long" meaning
/// "very long" without letting an absurd value overflow arithmetic further on.
pub const MAX_HINT: Duration = Duration::from_secs(24 * 60 * 60);

const NANOS_PER_UNIT: &[(&str, u128)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("\u{b5}s", 1_000),  // µ (micro sign), as Go writes it
    ("\u{3bc}s", 1_000), // μ (Greek small letter mu), which Go also accepts
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60 * 1_000_000_000),
    ("h", 3600 * 1_000_000_000),
];

/// Parses a Go duration string (`"300ms"`, `"1.5h"`, `"2h45m"`, `"0"`).
///
/// Returns `None` for garbage, for negative durations and for an empty string; values
/// beyond [`MAX_HINT`] are clamped to it. Surrounding whitespace is ignored.
pub fn parse_go_duration(input: &str) -> Option<Duration> {
    let s = input.trim();
    let s = s.strip_prefix('+').unwrap_or(s);
    if s.is_empty() || s.starts_with('-') {
        return None;
    }
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let max = MAX_HINT.as_nanos();
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        // The number: digits, optionally a '.' and more digits; at least one digit.
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, after_int) = rest.split_at(int_len);
        let (frac_part, after_num) = match after_int.strip_prefix('.') {
            Some(tail) => {
                let n = tail.bytes().take_while(u8::is_ascii_digit).count();
                tail.split_at(n)
            }
            None => ("", after_int),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return None;
        }
        // The unit: the longest known unit at this position.
        let unit_len = after_num
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(after_num.len(), |(i, _)| i);
        let unit = &after_num[..unit_len];
        let per = NANOS_PER_UNIT
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, n)| *n)?;
        // Integer part, saturating: anything past the clamp is the clamp.
        let mut value: u128 = 0;
        for b in int_part.bytes() {
            value = value
                .saturating_mul(10)
                .saturating_add(u128::from(b - b'0'));
        }
        let mut nanos = value.saturating_mul(per);
        // Fraction: only the digits that can still matter at nanosecond precision.
        let mut scale = per;
        for b in frac_part.bytes().take(20) {
            scale /= 10;
            if scale == 0 {
                break;
            }
            nanos = nanos.saturating_add(u128::from(b - b'0') * scale);
        }
        total = total.saturating_add(nanos);
        rest = &after_num[unit_len..];
    }
    let total = total.min(max);
    let secs = u64::try_from(total / 1_000_000_000).ok()?;
    // The remainder is below 1e9, so it fits a u32.
    let sub = u32::try_from(total % 1_000_000_000).ok()?;
    Some(Duration::new(secs, sub))
}

/// Formats a duration the way Go's `time.Duration.String` does: `"6m0s"`, `"1h0m0s"`,
/// `"1.5s"`, `"20ms"`, `"0s"`.
pub fn format_go_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        return format!("{}\u{b5}s", fixed(nanos, 1_000));
    }
    if nanos < 1_000_000_000 {
        return format!("{}ms", fixed(nanos, 1_000_000));
    }
    let hours = nanos / 3_600_000_000_000;
    let minutes = (nanos / 60_000_000_000) % 60;
    let seconds = fixed(nanos % 60_000_000_000, 1_000_000_000);
    if hours > 0 {
        format!("{hours}h{minutes}m{seconds}s")
    } else if minutes > 0 {
        format!("{minutes}m{seconds}s")
    } else {
        format!("{seconds}s")
    }
}

/// `value / unit` as a decimal with trailing zeros of the fraction removed.
fn fixed(value: u128, unit: u128) -> String {
    let int = value / unit;
    let frac = value % unit;
    if frac == 0 {
        return int.to_string();
    }
    let width = unit.ilog10() as usize;
    let digits = format!("{frac:0width$}");
    format!("{int}.{}", digits.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_openai_sends() {
        let cases = [
            ("6m0s", Duration::from_secs(360)),
            ("1s", Duration::from_secs(1)),
            ("20ms", Duration::from_millis(20)),
            ("8.64s", Duration::from_millis(8640)),
            ("0s", Duration::ZERO),
            ("0", Duration::ZERO),
            ("1h30m", Duration::from_secs(5400)),
            ("1.5h", Duration::from_secs(5400)),
            ("250us", Duration::from_micros(250)),
            ("250\u{b5}s", Duration::from_micros(250)),
            ("250\u{3bc}s", Duration::from_micros(250)),
            ("17ns", Duration::from_nanos(17)),
            (".5s", Duration::from_millis(500)),
            ("2.s", Duration::from_secs(2)),
            (" 1m ", Duration::from_secs(60)),
            ("+3s", Duration::from_secs(3)),
        ];
        for (input, want) in cases {
            assert_eq!(parse_go_duration(input), Some(want), "{input:?}");
        }
    }

    #[test]
    fn rejects_garbage_and_negatives() {
        for input in [
            "", "-1s", "s", "1", "12", "1x", "1s2", "abc", ".s", "1..5s", "1 s", "1m-2s", "\u{0}",
        ] {
            assert_eq!(parse_go_duration(input), None, "{input:?}");
        }
    }

    #[test]
    fn clamps_absurd_values() {
        assert_eq!(parse_go_duration("1000000h"), Some(MAX_HINT));
        assert_eq!(
            parse_go_duration("99999999999999999999999999999999999999999h"),
            Some(MAX_HINT)
        );
    }

    #[test]
    fn formats_like_go() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(17), "17ns"),
            (Duration::from_nanos(1_500), "1.5\u{b5}s"),
            (Duration::from_millis(20), "20ms"),
            (Duration::from_micros(20_500), "20.5ms"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_millis(8640), "8.64s"),
            (Duration::from_secs(360), "6m0s"),
            (Duration::from_millis(90_500), "1m30.5s"),
            (Duration::from_secs(3600), "1h0m0s"),
            (Duration::from_secs(3723), "1h2m3s"),
        ];
        for (d, want) in cases {
            assert_eq!(format_go_duration(d), want, "{d:?}");
        }
    }
}
