//! Values as people write them: `30s`, `3000/min`, `256MiB`, `header:x-tenant-id`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use tollgate_core::duration::parse_go_duration;

/// A count per window: `3000/min`, `10/s`, `100k/h`, `50/30s`.
///
/// The count may use `_` between digits and end in `k` (thousands) or `M` (millions).
/// The window is `s`, `sec`, `second`, `m`, `min`, `minute`, `h`, `hour`, `d`, `day`, or a
/// duration such as `30s` or `1m30s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// How many.
    pub count: u64,
    /// Per how long.
    pub per: Duration,
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            let n = if parse_count(s.trim()).is_some() {
                s.trim()
            } else {
                "3000"
            };
            format!("`{s}` is not a rate: write it as a count per window, like `{n}/min`, `10/s` or `100k/h`")
        };
        let (count, per) = s.split_once('/').ok_or_else(bad)?;
        let count = parse_count(count.trim()).ok_or_else(bad)?;
        let per = per.trim();
        let per = match per {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hr" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86_400),
            other => parse_go_duration(other).ok_or_else(bad)?,
        };
        if per.is_zero() {
            return Err(format!("`{s}`: the window must be longer than zero"));
        }
        Ok(Rate { count, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            self.count,
            tollgate_core::duration::format_go_duration(self.per)
        )
    }
}

fn parse_count(s: &str) -> Option<u64> {
    let (digits, scale) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1_000),
        b'M' => (&s[..s.len() - 1], 1_000_000),
        _ => (s, 1),
    };
    let digits: String = digits.chars().filter(|c| *c != '_').collect();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(scale)
}

/// A size in bytes: `4096`, `64KiB`, `256MiB`, `1GB` (KB/MB/GB are powers of 1000, KiB/MiB/
/// GiB of 1024).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a size: write it like `4096`, `64KiB` or `256MiB`");
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '_'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let num: String = num.chars().filter(|c| *c != '_').collect();
        let n: u64 = num.parse().map_err(|_| bad())?;
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => return Err(bad()),
        };
        n.checked_mul(scale).map(Size).ok_or_else(bad)
    }
}

/// Whose quota or cache a request belongs to: `global`, `api_key`, `model`, or
/// `header:NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySpec {
    /// One for everyone.
    Global,
    /// The caller's API key (`Authorization: Bearer`, `x-api-key`), hashed.
    ApiKey,
    /// The request's `model`.
    Model,
    /// A header's value, such as a tenant id.
    Header(http::HeaderName),
}

impl FromStr for KeySpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "global" => Ok(KeySpec::Global),
            "api_key" => Ok(KeySpec::ApiKey),
            "model" => Ok(KeySpec::Model),
            other => match other.strip_prefix("header:") {
                Some(name) => http::HeaderName::from_bytes(name.trim().as_bytes())
                    .map(KeySpec::Header)
                    .map_err(|_| format!("`{name}` is not a header name")),
                None => Err(format!(
                    "`{s}` is not a key: expected `global`, `api_key`, `model` or `header:NAME`"
                )),
            },
        }
    }
}

impl KeySpec {
    /// The extractor it names.
    pub fn extractor(&self) -> std::sync::Arc<dyn tollgate_core::key::KeyExtractor> {
        use tollgate_core::key;
        match self {
            KeySpec::Global => std::sync::Arc::new(key::Global),
            KeySpec::ApiKey => std::sync::Arc::new(key::ApiKey),
            KeySpec::Model => std::sync::Arc::new(key::Model),
            KeySpec::Header(name) => std::sync::Arc::new(key::Header::from_name(name.clone())),
        }
    }
}

/// Deserialises any `FromStr` value from a string, keeping its error message.
struct FromStrVisitor<T>(std::marker::PhantomData<T>, &'static str);

impl<T: FromStr<Err = String>> Visitor<'_> for FromStrVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.1)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }
}

macro_rules! from_str_de {
    ($t:ty, $what:literal) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_any(FromStrVisitor(std::marker::PhantomData, $what))
            }
        }
    };
}

from_str_de!(Rate, "a rate such as `3000/min`");
from_str_de!(Size, "a size such as `256MiB`");
from_str_de!(KeySpec, "`global`, `api_key`, `model` or `header:NAME`");

/// A duration written as Go writes them: `30s`, `500ms`, `1m30s`, `2h`. A bare number is
/// refused: its unit would be a guess.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "`{s}` has no unit: write the duration like `30s`, `500ms` or `2m`"
            ));
        }
        parse_go_duration(s.trim()).map(Dur).ok_or_else(|| {
            format!("`{s}` is not a duration: write it like `30s`, `500ms` or `1m30s`")
        })
    }
}

from_str_de!(Dur, "a duration such as `30s`");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_as_people_write_them() {
        let r = |s: &str| s.parse::<Rate>();
        assert_eq!(
            r("3000/min").unwrap(),
            Rate {
                count: 3000,
                per: Duration::from_secs(60)
            }
        );
        assert_eq!(r("10/s").unwrap().per, Duration::from_secs(1));
        assert_eq!(
            r("100k/h").unwrap(),
            Rate {
                count: 100_000,
                per: Duration::from_secs(3600)
            }
        );
        assert_eq!(
            r("1_000 / 30s").unwrap(),
            Rate {
                count: 1000,
                per: Duration::from_secs(30)
            }
        );
        assert_eq!(r("2M/day").unwrap().count, 2_000_000);
        for bad in [
            "3000",
            "/min",
            "x/min",
            "10/fortnight",
            "10/0s",
            "-5/min",
            "99999999999999999999/s",
        ] {
            let err = r(bad).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn sizes_durations_and_keys() {
        assert_eq!("256MiB".parse::<Size>().unwrap(), Size(256 << 20));
        assert_eq!("64KB".parse::<Size>().unwrap(), Size(64_000));
        assert_eq!("4096".parse::<Size>().unwrap(), Size(4096));
        assert!("12 parsecs".parse::<Size>().is_err());
        assert_eq!(
            "1m30s".parse::<Dur>().unwrap(),
            Dur(Duration::from_secs(90))
        );
        assert!("30".parse::<Dur>().unwrap_err().contains("no unit"));
        assert!("soon".parse::<Dur>().is_err());
        assert_eq!(
            "header:X-Tenant-Id".parse::<KeySpec>().unwrap(),
            KeySpec::Header(http::HeaderName::from_static("x-tenant-id"))
        );
        assert_eq!("api_key".parse::<KeySpec>().unwrap(), KeySpec::ApiKey);
        assert!("header:bad header".parse::<KeySpec>().is_err());
        assert!("tenant".parse::<KeySpec>().is_err());
    }
}
