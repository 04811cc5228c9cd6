//! Money and prices.

use std::collections::HashMap;
use std::fmt;

use tollgate_core::usage::Usage;

/// An amount of US dollars, kept in nanodollars (10⁻⁹ $): every price of a million
/// tokens written to three decimals of a dollar is a whole number of nanodollars a token,
/// so sums are exact.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(u64);

impl Money {
    /// Nothing.
    pub const ZERO: Money = Money(0);

    /// `dollars` US dollars (negative or not finite: nothing), to the nanodollar.
    pub fn dollars(dollars: f64) -> Self {
        if dollars.is_finite() && dollars > 0.0 {
            Money((dollars * 1e9).round().min(u64::MAX as f64) as u64)
        } else {
            Money(0)
        }
    }

    /// `n` nanodollars.
    pub fn from_nanos(n: u64) -> Self {
        Money(n)
    }

    /// In nanodollars.
    pub fn nanos(self) -> u64 {
        self.0
    }

    /// In millionths of a dollar, rounded up (what the `RateLimit` headers state).
    pub fn micros(self) -> u64 {
        self.0.div_ceil(1000)
    }

    /// In dollars.
    pub fn as_dollars(self) -> f64 {
        self.0 as f64 / 1e9
    }

    /// `self + other`, saturating.
    pub fn plus(self, other: Money) -> Money {
        Money(self.0.saturating_add(other.0))
    }

    /// `self − other`, at least zero.
    pub fn minus(self, other: Money) -> Money {
        Money(self.0.saturating_sub(other.0))
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${:.6}", self.as_dollars())
    }
}

/// What a model's tokens cost, in dollars per million.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Price {
    input: u64,
    output: u64,
    cached_input: u64,
}

impl Price {
    /// `input` and `output` dollars per million tokens; cached input at the input price
    /// unless [`cached_input`](Self::cached_input) says otherwise.
    pub fn per_million(input: f64, output: f64) -> Self {
        let input = per_token(input);
        Self {
            input,
            output: per_token(output),
            cached_input: input,
        }
    }

    /// Cached input (the provider's prompt cache) at `dollars` per million tokens.
    pub fn cached_input(mut self, dollars: f64) -> Self {
        self.cached_input = per_token(dollars);
        self
    }

    /// What `usage` costs: uncached input, cached input and output, each at its price.
    pub fn cost(&self, usage: &Usage) -> Money {
        let cached = usage.cached_input_tokens.min(usage.input_tokens);
        let fresh = usage.input_tokens - cached;
        Money(
            fresh
                .saturating_mul(self.input)
                .saturating_add(cached.saturating_mul(self.cached_input))
                .saturating_add(usage.output_tokens.saturating_mul(self.output)),
        )
    }

    /// The most a request of `input` tokens that may generate `max_output` can cost.
    pub fn estimate(&self, input: u64, max_output: u64) -> Money {
        Money(
            input
                .saturating_mul(self.input)
                .saturating_add(max_output.saturating_mul(self.output)),
        )
    }
}

/// Dollars per million tokens → nanodollars per token.
fn per_token(dollars_per_million: f64) -> u64 {
    Money::dollars(dollars_per_million / 1e6).nanos()
}

/// A price per model: the request's `model` picks its line; a model without one costs
/// [`default`](Self::default)'s price, or nothing (and is not counted) when there is none.
#[derive(Clone, Debug, Default)]
pub struct Prices {
    models: HashMap<String, Price>,
    default: Option<Price>,
}

impl Prices {
    /// No prices.
    pub fn new() -> Self {
        Self::default()
    }

    /// `model` costs `price`.
    pub fn model(mut self, model: impl Into<String>, price: Price) -> Self {
        self.models.insert(model.into(), price);
        self
    }

    /// Models without a line cost `price`.
    pub fn default_price(mut self, price: Price) -> Self {
        self.default = Some(price);
        self
    }

    /// The price of `model`.
    pub fn get(&self, model: Option<&str>) -> Option<&Price> {
        model
            .and_then(|m| self.models.get(m))
            .or(self.default.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_is_exact_to_the_nanodollar() {
        // gpt-4o: $2.50 in, $10 out, $1.25 cached, per million.
        let p = Price::per_million(2.5, 10.0).cached_input(1.25);
        let u = Usage {
            input_tokens: 1200,
            output_tokens: 300,
            total_tokens: 1500,
            cached_input_tokens: 200,
        };
        // 1000 × 2.5 + 200 × 1.25 + 300 × 10 = 5750 millionths of a dollar.
        assert_eq!(p.cost(&u), Money::dollars(0.00575));
        assert_eq!(p.cost(&u).nanos(), 5_750_000);
        assert_eq!(p.estimate(1200, 300).micros(), 6000);
        assert_eq!(Money::dollars(-1.0), Money::ZERO);
        assert_eq!(Money::dollars(f64::NAN), Money::ZERO);
        assert_eq!(format!("{}", Money::dollars(1.5)), "$1.500000");
    }

    #[test]
    fn a_model_without_a_price_takes_the_default_or_none() {
        let p = Prices::new().model("a", Price::per_million(1.0, 2.0));
        assert!(p.get(Some("a")).is_some());
        assert!(p.get(Some("b")).is_none());
        assert!(p.get(None).is_none());
        let p = p.default_price(Price::per_million(3.0, 3.0));
        assert_eq!(p.get(Some("b")), Some(&Price::per_million(3.0, 3.0)));
    }
}
