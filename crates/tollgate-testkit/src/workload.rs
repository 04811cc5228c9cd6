//! A realistic burst of chat requests: several tenants, part of them repeated, part of
//! them streamed, with prompts of a few hundred tokens. The demo and the benchmarks send
//! the same burst, so their figures describe the same work.

use std::time::Duration;

use serde_json::{json, Value};

/// One request of a burst.
#[derive(Clone, Debug)]
pub struct Call {
    /// Its place in the burst, from 0.
    pub index: usize,
    /// The tenant sending it (the `x-tenant-id` header).
    pub tenant: String,
    /// The JSON body.
    pub body: Value,
    /// Whether it asks for a stream.
    pub stream: bool,
    /// Whether it repeats an earlier request of the same tenant, word for word.
    pub repeat: bool,
    /// When it is sent, from the start of the burst.
    pub at: Duration,
}

/// The shape of a burst.
#[derive(Clone, Debug)]
pub struct Burst {
    /// Requests in all (400).
    pub requests: usize,
    /// Distinct tenants (5).
    pub tenants: usize,
    /// The share that repeats an earlier request of its tenant (0.25).
    pub repeat_share: f64,
    /// The share that streams (one in three).
    pub stream_share: f64,
    /// Words per prompt, about one token each (350).
    pub prompt_words: usize,
    /// `max_tokens` of each request (200): what a budget reserves before the call.
    pub max_tokens: u64,
    /// The time over which requests arrive, evenly (2 s).
    pub spread: Duration,
    /// The seed, so that every run sends the same burst.
    pub seed: u64,
}

impl Default for Burst {
    fn default() -> Self {
        Self {
            requests: 400,
            tenants: 5,
            repeat_share: 0.25,
            stream_share: 1.0 / 3.0,
            prompt_words: 350,
            max_tokens: 200,
            spread: Duration::from_secs(2),
            seed: 42,
        }
    }
}

/// Common words that are one token each in o200k_base and cl100k_base.
const WORDS: &[&str] = &[
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "then", "runs", "back",
    "home", "to", "see", "what", "is", "new", "in", "town", "today", "with", "his", "friends",
    "who", "live", "near", "river", "by", "old", "mill", "where", "they", "play", "all", "day",
    "long", "until", "sun", "goes", "down", "night", "comes", "stars", "shine", "bright", "above",
    "hills", "trees", "wind", "blows", "soft", "cold", "air", "from", "north", "sea", "waves",
    "crash", "on", "rocks", "below", "birds", "sing",
];

impl Burst {
    /// The requests, in the order they are sent.
    pub fn calls(&self) -> Vec<Call> {
        let mut rng = fastrand::Rng::with_seed(self.seed);
        let tenants = self.tenants.max(1);
        let mut asked: Vec<Vec<Value>> = vec![Vec::new(); tenants];
        let mut calls = Vec::with_capacity(self.requests);
        for index in 0..self.requests {
            let t = index % tenants;
            let stream_draw = rng.f64() < self.stream_share;
            let repeat = !asked[t].is_empty() && rng.f64() < self.repeat_share;
            // A repeat is the same request word for word, stream or not, as a user
            // asking the same question again sends it.
            let body = if repeat {
                asked[t][rng.usize(..asked[t].len())].clone()
            } else {
                let prompt: Vec<&str> = (0..self.prompt_words)
                    .map(|_| WORDS[rng.usize(..WORDS.len())])
                    .collect();
                let mut body = json!({
                    "model": "gpt-4o-mini",
                    "messages": [
                        {"role": "system", "content": format!("You answer questions for tenant {t}.")},
                        {"role": "user", "content": format!("Question {index}: {}", prompt.join(" "))},
                    ],
                    "max_tokens": self.max_tokens,
                });
                if stream_draw {
                    body["stream"] = json!(true);
                    body["stream_options"] = json!({"include_usage": true});
                }
                asked[t].push(body.clone());
                body
            };
            let stream = body["stream"] == json!(true);
            let at = self
                .spread
                .mul_f64(index as f64 / self.requests.max(1) as f64);
            calls.push(Call {
                index,
                tenant: format!("tenant-{t}"),
                body,
                stream,
                repeat,
                at,
            });
        }
        calls
    }
}

/// The least time in which any client could have been served what `stats` counts by a
/// provider with these limits per `window`, whose buckets start full (a window's worth) and
/// refill continuously, as the simulated provider's do: what is beyond each bucket, at its
/// refill rate, whichever limit takes longer.
pub fn quota_floor(stats: &crate::Stats, rpm: u64, tpm: u64, window: Duration) -> Duration {
    let over = |used: u64, per_window: u64| {
        if per_window == 0 {
            return 0.0;
        }
        used.saturating_sub(per_window) as f64 * window.as_secs_f64() / per_window as f64
    };
    Duration::from_secs_f64(over(stats.ok, rpm).max(over(stats.tokens_served(), tpm)))
}

/// The demo's primary provider: 600 RPM, 100k TPM, 80-token answers after 150 ms,
/// streamed 8 tokens every 15 ms, and 2% of answers 500 or 503 (seeded). The demo and the
/// `goodput` benchmark both use it, so their figures describe the same provider.
pub fn demo_primary() -> crate::ProviderBuilder {
    crate::Provider::builder()
        .rpm(DEMO_RPM)
        .tpm(DEMO_TPM)
        .completion_tokens(80)
        .latency(Duration::from_millis(150))
        .chunk_delay(Duration::from_millis(15))
        .tokens_per_chunk(8)
        .faults(demo_faults())
        .seed(7)
}

/// The demo's fallback: the primary's limits, a little slower, no faults.
pub fn demo_fallback() -> crate::ProviderBuilder {
    demo_primary()
        .latency(Duration::from_millis(250))
        .faults(crate::Faults::default())
}

/// The demo primary's faults outside its outage.
pub fn demo_faults() -> crate::Faults {
    crate::Faults {
        server_error_rate: 0.02,
        ..crate::Faults::default()
    }
}

/// The demo providers' requests per minute.
pub const DEMO_RPM: u64 = 600;
/// The demo providers' tokens per minute.
pub const DEMO_TPM: u64 = 100_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_the_same_every_time_with_its_shares() {
        let b = Burst::default();
        let (one, two) = (b.calls(), b.calls());
        assert_eq!(one.len(), 400);
        assert!(one
            .iter()
            .zip(&two)
            .all(|(a, b)| a.body == b.body && a.at == b.at));
        let repeats = one.iter().filter(|c| c.repeat).count();
        let streams = one.iter().filter(|c| c.stream).count();
        assert!((70..=130).contains(&repeats), "{repeats}");
        assert!((100..=170).contains(&streams), "{streams}");
        assert!(one.last().unwrap().at < b.spread);
        let no_repeats = Burst {
            repeat_share: 0.0,
            ..b
        }
        .calls();
        assert!(no_repeats.iter().all(|c| !c.repeat));
    }

    #[test]
    fn the_floor_is_what_is_beyond_the_bucket_at_the_refill_rate() {
        let minute = Duration::from_secs(60);
        let stats = crate::Stats {
            ok: 700,
            prompt_tokens: 90_000,
            completion_tokens: 30_000,
            ..Default::default()
        };
        // 100 requests beyond 600 at 10/s: 10 s; 20k tokens beyond 100k at 1,667/s: 12 s.
        assert_eq!(
            quota_floor(&stats, 600, 100_000, minute),
            Duration::from_secs(12)
        );
        assert_eq!(
            quota_floor(&stats, 600, 1_000_000, minute),
            Duration::from_secs(10)
        );
        assert_eq!(quota_floor(&stats, 1000, 1_000_000, minute), Duration::ZERO);
    }

    #[test]
    fn prompts_are_about_a_token_a_word() {
        let calls = Burst {
            requests: 5,
            ..Burst::default()
        }
        .calls();
        let text = calls[0].body["messages"][1]["content"].as_str().unwrap();
        let n = crate::tokens::count(text);
        assert!((350..=370).contains(&n), "{n}");
    }
}
