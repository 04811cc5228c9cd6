//! The resolved stack of a policy, written out: what each backend will do, with every
//! default filled in and every inherited section said to be inherited.

use std::fmt::Write;
use std::time::Duration;

use tollgate_core::duration::format_go_duration;

use super::{
    BackendConfig, FailureMode, JitterSpec, KeySpec, LimitMode, Partition, Policy, RateLimitConfig,
    Store,
};

fn d(x: Duration) -> String {
    format_go_duration(x)
}

fn key(k: Option<&KeySpec>) -> String {
    match k {
        None | Some(KeySpec::Global) => "global".to_owned(),
        Some(KeySpec::ApiKey) => "api_key".to_owned(),
        Some(KeySpec::Model) => "model".to_owned(),
        Some(KeySpec::Header(h)) => format!("header:{h}"),
    }
}

fn mode(p: &RateLimitConfig) -> String {
    match p.mode {
        LimitMode::Refuse => "refuse at once with 429".to_owned(),
        LimitMode::Wait => format!(
            "wait up to {} (queue {})",
            d(p.max_wait.map_or(super::build::DEFAULT_MAX_WAIT, |w| w.0)),
            p.max_queue.unwrap_or(1024)
        ),
    }
}

impl Policy {
    /// The stack this policy builds, written out for a person: each backend in the order
    /// it is tried with its resolved limits (its own, or the top-level ones it inherits,
    /// said as such), retries, the cache, failover and the store, every default filled in.
    ///
    /// ```
    /// let policy = tollgate::policy::Policy::from_yaml(r#"
    /// primary:    { url: "https://api.openai.com", model: gpt-4o }
    /// fallbacks:  [ { name: mini, url: "https://api.openai.com", model: gpt-4o-mini } ]
    /// rate_limit: { requests: 500/min }
    /// "#).unwrap();
    /// let text = policy.describe();
    /// assert!(text.contains("mini"));
    /// assert!(text.contains("500/1m0s"));
    /// assert!(text.contains("inherited from the top-level rate_limit"));
    /// // No token quota given: learned from the provider.
    /// assert!(text.contains("tokens: learned from the provider"));
    /// ```
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let _ = self.write_description(&mut out);
        out
    }

    fn write_description(&self, out: &mut String) -> std::fmt::Result {
        match &self.cache {
            None => writeln!(out, "cache: none")?,
            Some(c) => {
                let partition = match &c.partition {
                    None => "header:x-tenant-id, else the hashed API key".to_owned(),
                    Some(Partition::Shared) => "shared by everyone".to_owned(),
                    Some(Partition::By(k)) => key(Some(k)),
                };
                let exclude = c.exclude.clone().unwrap_or_else(|| vec!["user".to_owned()]);
                writeln!(
                    out,
                    "cache: ttl {}, at most {} bytes, partitioned by {partition}, key leaves out {exclude:?}{}",
                    d(c.ttl.map_or(Duration::from_secs(600), |t| t.0)),
                    c.max_size.map_or(256 << 20, |s| s.0),
                    if c.deterministic_only { ", deterministic requests only" } else { "" }
                )?;
            }
        }
        let f = &self.failover;
        writeln!(
            out,
            "failover: {} failures within {} set a backend aside for {} (or its Retry-After), then one trial; with every backend away: {}",
            f.failures.unwrap_or(3),
            d(f.window.map_or(Duration::from_secs(30), |w| w.0)),
            d(f.cooldown.map_or(Duration::from_secs(30), |w| w.0)),
            match f.wait_when_all_cooling {
                Some(w) => format!("wait up to {} for the first back", d(w.0)),
                None => "answer at once with the time until one is back".to_owned(),
            }
        )?;
        let sticky = f.sticky.as_ref().map_or(String::new(), |k| {
            format!(", each {} kept on one while it has room", key(Some(k)))
        });
        match f.strategy.unwrap_or_default() {
            super::StrategyConfig::Ordered => writeln!(out, "backends, in the order tried:")?,
            super::StrategyConfig::Balanced => writeln!(
                out,
                "backends: those of the first one's model balanced, the one with the most room for its weight first{sticky}; the others after, in this order:"
            )?,
            super::StrategyConfig::Weighted => writeln!(
                out,
                "backends: those of the first one's model drawn by their weights{sticky}; the others after, in this order:"
            )?,
        }
        let mut backends: Vec<(usize, &BackendConfig)> = self.backends().collect();
        backends.sort_by_key(|(i, b)| (*i > 0, b.priority.unwrap_or(*i as u32)));
        for (n, (i, b)) in backends.into_iter().enumerate() {
            self.describe_backend(out, n + 1, i, b)?;
        }
        match &self.store {
            Store::Memory => writeln!(out, "store: memory (this process)")?,
            Store::Redis(r) => writeln!(
                out,
                "store: redis {} ({}), timeout {}{}",
                r.url,
                match r.on_failure {
                    FailureMode::Closed => "fails closed: 503 while Redis is away".to_owned(),
                    FailureMode::Open => format!(
                        "fails open at 1/{} of each quota while Redis is away",
                        r.instances.unwrap_or(1)
                    ),
                },
                d(r.timeout.map_or(Duration::from_millis(50), |t| t.0)),
                if r.pooled { ", pooled" } else { "" }
            )?,
        }
        Ok(())
    }

    fn describe_backend(
        &self,
        out: &mut String,
        n: usize,
        i: usize,
        b: &BackendConfig,
    ) -> std::fmt::Result {
        write!(out, "  {n}. {} → {}", b.name_or(i), b.url)?;
        if let Some(m) = &b.model {
            write!(out, ", model rewritten to {m}")?;
        }
        if let Some(w) = b.weight.filter(|_| {
            self.failover.strategy.unwrap_or_default() != super::StrategyConfig::Ordered
        }) {
            write!(out, ", weight {w}")?;
        }
        let mut sent: Vec<&str> = b.headers.keys().map(String::as_str).collect();
        if b.api_key_env.is_some() {
            sent.push(b.api_key_header.as_deref().unwrap_or("authorization"));
        }
        if !sent.is_empty() {
            write!(out, ", sends its own {}", sent.join(", "))?;
        }
        if let Some(var) = &b.api_key_env {
            write!(out, " (key from ${var})")?;
        }
        writeln!(out)?;
        match &self.retry {
            None => writeln!(out, "     retry: none")?,
            Some(r) => writeln!(
                out,
                "     retry: up to {} retries, backoff {} ×{} up to {}, jitter {}, server hints up to {}{}",
                r.max_retries.unwrap_or(3),
                d(r.backoff.map_or(Duration::from_millis(500), |x| x.0)),
                r.factor.unwrap_or(2.0),
                d(r.max_backoff.map_or(Duration::from_secs(8), |x| x.0)),
                match r.jitter {
                    JitterSpec::Full => "full",
                    JitterSpec::Decorrelated => "decorrelated",
                    JitterSpec::None => "none",
                },
                d(r.max_server_wait.map_or(Duration::from_secs(120), |x| x.0)),
                r.deadline
                    .map_or(String::new(), |x| format!(", deadline {}", d(x.0)))
            )?,
        }
        let learned = RateLimitConfig::default();
        let (l, whence) = match (&b.rate_limit, &self.rate_limit) {
            (Some(own), _) => (own, "its own"),
            (None, Some(top)) => (top, "inherited from the top-level rate_limit"),
            (None, None) => (&learned, "no rate_limit given: learned"),
        };
        let follow = if l.learns() {
            ", the provider's own quota adopted where stricter"
        } else if l.adaptive {
            ", following the provider's x-ratelimit-* headers"
        } else {
            ""
        };
        let unknown = "learned from the provider's x-ratelimit-* headers (one request first, the rest once an answer states it)";
        match (l.requests, l.learns()) {
            (Some(r), _) => writeln!(
                out,
                "     requests: {r} (burst {}) per {} key, {}{follow} [{whence}]",
                l.burst.map_or(r.count, u64::from),
                key(l.key.as_ref()),
                mode(l),
            )?,
            (None, true) => writeln!(
                out,
                "     requests: {unknown}, per {} key, {} [{whence}]",
                key(l.key.as_ref()),
                mode(l),
            )?,
            (None, false) => writeln!(out, "     requests: no limit [{whence}]")?,
        }
        match (l.tokens, l.learns()) {
            (Some(t), _) => writeln!(
                out,
                "     tokens: {t} per {} key, reserved before the call and settled to the real usage, {}{follow} [{whence}]",
                key(l.key.as_ref()),
                mode(l),
            )?,
            (None, true) => writeln!(
                out,
                "     tokens: {unknown}, reserved before the call and settled to the real usage, {} [{whence}]",
                mode(l),
            )?,
            (None, false) => writeln!(out, "     tokens: no limit [{whence}]")?,
        }
        Ok(())
    }
}
