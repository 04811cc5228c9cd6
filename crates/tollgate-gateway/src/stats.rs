//! What the dashboard shows and the alerts watch: per model and per tenant, counts in
//! 10-second buckets over the last 15 minutes, totals since start, the provider's quota
//! as its last answer stated it, wait times, and the last 100 requests.
//!
//! Fed by the access log as each request ends (one short lock per request), read by
//! `GET /api/stats` and its stream. Time is tokio's, so tests on a paused clock drive it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::time::Instant;

use tollgate::policy::BackendLayers;

use crate::config::Config;

/// The width of one bucket.
pub(crate) const BUCKET: Duration = Duration::from_secs(10);
/// How many buckets are kept: 15 minutes.
pub(crate) const BUCKETS: usize = 90;
/// Requests kept for the log.
const RECENT: usize = 100;
/// Waits kept for the percentiles, per model.
const WAITS: usize = 1000;

/// Counts of one bucket (or totals).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) requests: u64,
    pub(crate) tokens: u64,
    pub(crate) input_tokens: u64,
    pub(crate) output_tokens: u64,
    /// 429s the providers answered (absorbed by retries and failover, or not).
    pub(crate) provider_429: u64,
    /// Requests that waited for quota instead.
    pub(crate) waited: u64,
    /// Requests refused for a limit (429 from the gateway).
    pub(crate) refused: u64,
    pub(crate) cache_hits: u64,
    /// Tokens a cache hit did not spend.
    pub(crate) tokens_saved: u64,
    pub(crate) retries: u64,
    /// Requests served by a backend other than the model's primary.
    pub(crate) failovers: u64,
    /// Answers 500 and above.
    pub(crate) errors: u64,
    /// The longest wait for quota, in milliseconds.
    pub(crate) max_wait_ms: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.requests += o.requests;
        self.tokens += o.tokens;
        self.input_tokens += o.input_tokens;
        self.output_tokens += o.output_tokens;
        self.provider_429 += o.provider_429;
        self.waited += o.waited;
        self.refused += o.refused;
        self.cache_hits += o.cache_hits;
        self.tokens_saved += o.tokens_saved;
        self.retries += o.retries;
        self.failovers += o.failovers;
        self.errors += o.errors;
        self.max_wait_ms = self.max_wait_ms.max(o.max_wait_ms);
    }
}

/// One request as the access log records it, for the page's log.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Recent {
    pub(crate) at_ms: u64,
    pub(crate) request_id: String,
    pub(crate) tenant: String,
    pub(crate) model: String,
    pub(crate) backend: Option<String>,
    pub(crate) cache: Option<String>,
    pub(crate) retries: u32,
    pub(crate) input_tokens: Option<u64>,
    pub(crate) output_tokens: Option<u64>,
    pub(crate) status: u16,
    pub(crate) latency_ms: u64,
    pub(crate) outcome: &'static str,
}

/// What one ended request adds.
#[derive(Debug)]
pub(crate) struct Ended {
    pub(crate) recent: Recent,
    pub(crate) counts: Counts,
    pub(crate) waited: Duration,
    /// The provider's quota as its last answer stated it: (remaining, limit) for
    /// requests and tokens.
    pub(crate) provider_requests: Option<(u64, u64)>,
    pub(crate) provider_tokens: Option<(u64, u64)>,
}

#[derive(Debug, Default)]
struct Series {
    /// (bucket number, counts), oldest first, at most [`BUCKETS`].
    buckets: VecDeque<(u64, Counts)>,
    totals: Counts,
}

impl Series {
    fn add(&mut self, bucket: u64, c: &Counts) {
        self.totals.add(c);
        match self.buckets.back_mut() {
            Some((b, counts)) if *b == bucket => counts.add(c),
            _ => {
                self.buckets.push_back((bucket, *c));
                while self.buckets.len() > BUCKETS {
                    self.buckets.pop_front();
                }
            }
        }
    }

    /// The last [`BUCKETS`] buckets up to `now`, empty ones included (and those before
    /// the start, as the gateway has not run 15 minutes yet), oldest first.
    fn window(&self, now: u64) -> Vec<(i64, Counts)> {
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        (now - (BUCKETS as i64 - 1)..=now)
            .map(|b| {
                let c = self
                    .buckets
                    .iter()
                    .find(|(x, _)| i64::try_from(*x).is_ok_and(|x| x == b))
                    .map_or_else(Counts::default, |(_, c)| *c);
                (b, c)
            })
            .collect()
    }

    /// The counts of the buckets within the last `span` up to `now`.
    fn recent(&self, now: u64, span: u64) -> Counts {
        let mut out = Counts::default();
        for (b, c) in &self.buckets {
            if *b + span > now {
                out.add(c);
            }
        }
        out
    }
}

#[derive(Debug, Default)]
struct ModelState {
    series: Series,
    waits_ms: VecDeque<u64>,
    in_flight: u64,
    provider_requests: Option<(u64, u64)>,
    provider_tokens: Option<(u64, u64)>,
    /// Requests served, by backend.
    backends: BTreeMap<String, u64>,
    /// When the model was limited: a provider's 429 until its Retry-After, a refusal
    /// until its retry time, a wait for quota over its length. Newest last.
    limited: VecDeque<Span>,
}

/// A stretch of time a model was limited.
#[derive(Clone, Copy, Debug)]
struct Span {
    from: Instant,
    to: Instant,
    /// For a wait: how long it was (a rule counts only waits past its threshold).
    wait: Option<Duration>,
}

/// `now + wait`, with the wait capped at a day: a provider's `Retry-After` is outside
/// input, and an `Instant` overflowed panics.
pub(crate) fn until(now: Instant, wait: Duration) -> Instant {
    let wait = wait.min(Duration::from_secs(86_400));
    now.checked_add(wait).unwrap_or(now)
}

/// Spans kept per model.
const SPANS: usize = 4096;

#[derive(Debug, Default)]
struct Inner {
    models: HashMap<String, ModelState>,
    tenants: HashMap<String, Series>,
    recent: VecDeque<Recent>,
}

/// Buckets per model and per tenant, for the alert rules.
#[derive(Debug, Default)]
pub(crate) struct Buckets {
    pub(crate) models: HashMap<String, Vec<Counts>>,
    pub(crate) tenants: HashMap<String, Vec<Counts>>,
}

/// The gateway's statistics. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Stats {
    inner: Arc<Mutex<Inner>>,
    started: Instant,
    started_wall: SystemTime,
}

impl Stats {
    pub(crate) fn new() -> Self {
        Self {
            inner: Arc::default(),
            started: Instant::now(),
            started_wall: SystemTime::now(),
        }
    }

    /// The bucket `now` falls in.
    pub(crate) fn bucket(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_secs() / BUCKET.as_secs()
    }

    /// The wall-clock time a bucket starts at (before the start for a negative one).
    fn wall_ms(&self, bucket: i64) -> u64 {
        let start = self
            .started_wall
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        u64::try_from(start + bucket * BUCKET.as_millis() as i64).unwrap_or(0)
    }

    pub(crate) fn now_ms() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> Option<T> {
        // A poisoned lock means a panic elsewhere: the statistics are not worth a second.
        self.inner.lock().ok().map(|mut i| f(&mut i))
    }

    /// A request for `model` went in.
    pub(crate) fn started(&self, model: &str) {
        self.with(|i| {
            i.models.entry(model.to_owned()).or_default().in_flight += 1;
        });
    }

    /// A request that went in ended.
    pub(crate) fn ended(&self, e: Ended) {
        let bucket = self.bucket(Instant::now());
        self.with(|i| {
            let m = i.models.entry(e.recent.model.clone()).or_default();
            m.in_flight = m.in_flight.saturating_sub(1);
            Self::count(m, bucket, &e);
            let tenant = e.recent.tenant.clone();
            i.tenants.entry(tenant).or_default().add(bucket, &e.counts);
            i.recent.push_back(e.recent);
            while i.recent.len() > RECENT {
                i.recent.pop_front();
            }
        });
    }

    fn count(m: &mut ModelState, bucket: u64, e: &Ended) {
        m.series.add(bucket, &e.counts);
        if e.counts.waited > 0 {
            m.waits_ms.push_back(e.waited.as_millis() as u64);
            while m.waits_ms.len() > WAITS {
                m.waits_ms.pop_front();
            }
        }
        if e.provider_requests.is_some() {
            m.provider_requests = e.provider_requests;
        }
        if e.provider_tokens.is_some() {
            m.provider_tokens = e.provider_tokens;
        }
        if let Some(b) = &e.recent.backend {
            *m.backends.entry(b.clone()).or_default() += 1;
        }
    }

    /// A request refused before it reached a model (401, 400, a tenant's limit...), or
    /// by the model's own limits.
    pub(crate) fn refused(&self, recent: Recent, limited: bool, started: bool) {
        let bucket = self.bucket(Instant::now());
        self.with(|i| {
            if started {
                if let Some(m) = i.models.get_mut(&recent.model) {
                    m.in_flight = m.in_flight.saturating_sub(1);
                }
            }
            let counts = Counts {
                requests: 1,
                refused: u64::from(limited),
                ..Counts::default()
            };
            if let Some(m) = i.models.get_mut(&recent.model) {
                m.series.add(bucket, &counts);
            }
            if recent.tenant != "-" {
                i.tenants
                    .entry(recent.tenant.clone())
                    .or_default()
                    .add(bucket, &counts);
            }
            i.recent.push_back(recent);
            while i.recent.len() > RECENT {
                i.recent.pop_front();
            }
        });
    }

    /// The model was limited from `from` to `to` (`wait`: a wait of that length).
    pub(crate) fn limited(&self, model: &str, from: Instant, to: Instant, wait: Option<Duration>) {
        let oldest = Instant::now().checked_sub(BUCKET * BUCKETS as u32);
        self.with(|i| {
            let m = i.models.entry(model.to_owned()).or_default();
            m.limited.push_back(Span { from, to, wait });
            while m.limited.len() > SPANS
                || m.limited
                    .front()
                    .is_some_and(|s| oldest.is_some_and(|o| s.to < o))
            {
                m.limited.pop_front();
            }
        });
    }

    /// Per model, for buckets `from..to`: whether the model was limited at some time in
    /// each (waits count when longer than `wait_over`).
    pub(crate) fn limited_buckets(
        &self,
        from: u64,
        to: u64,
        wait_over: Duration,
    ) -> HashMap<String, Vec<bool>> {
        let start = |b: u64| self.started + BUCKET * u32::try_from(b).unwrap_or(u32::MAX);
        self.with(|i| {
            i.models
                .iter()
                .map(|(name, m)| {
                    let flags = (from..to)
                        .map(|b| {
                            let (lo, hi) = (start(b), start(b + 1));
                            m.limited.iter().any(|s| {
                                s.from < hi && s.to >= lo && s.wait.is_none_or(|w| w > wait_over)
                            })
                        })
                        .collect();
                    (name.clone(), flags)
                })
                .collect()
        })
        .unwrap_or_default()
    }

    /// The bucket being filled now.
    pub(crate) fn current_bucket(&self) -> u64 {
        self.bucket(Instant::now())
    }

    /// For the alert rules: the counts of buckets `from..to` (complete ones), oldest
    /// first, per model and per tenant.
    pub(crate) fn buckets(&self, from: u64, to: u64) -> Buckets {
        let pick = |s: &Series| -> Vec<Counts> {
            (from..to)
                .map(|b| {
                    s.buckets
                        .iter()
                        .find(|(x, _)| *x == b)
                        .map_or_else(Counts::default, |(_, c)| *c)
                })
                .collect()
        };
        self.with(|i| Buckets {
            models: i
                .models
                .iter()
                .map(|(k, m)| (k.clone(), pick(&m.series)))
                .collect(),
            tenants: i
                .tenants
                .iter()
                .map(|(k, s)| (k.clone(), pick(s)))
                .collect(),
        })
        .unwrap_or_default()
    }

    /// What `GET /api/stats` answers.
    pub(crate) fn snapshot(
        &self,
        config: &Config,
        metrics: &str,
        layers: &HashMap<String, Vec<BackendLayers>>,
    ) -> serde_json::Value {
        use serde_json::json;
        let now = self.bucket(Instant::now());
        let per_min = 60.0 / BUCKET.as_secs_f64();
        let cooldowns = labelled(metrics, "tollgate_failover_cooldowns_total", "backend");
        let cooling_until = labelled(
            metrics,
            "tollgate_failover_cooling_until_seconds",
            "backend",
        );
        let now_s = Self::now_ms() as f64 / 1000.0;
        let data = self.with(|i| {
            let mut names: Vec<&String> = config.models.keys().collect();
            for k in i.models.keys() {
                if !names.contains(&k) {
                    names.push(k);
                }
            }
            let models: Vec<_> = names
                .into_iter()
                .map(|name| {
                    let empty = ModelState::default();
                    let m = i.models.get(name).unwrap_or(&empty);
                    let policy = config.models.get(name);
                    let limits = policy.and_then(|p| p.rate_limit.as_ref());
                    let rpm = limits
                        .and_then(|l| l.requests)
                        .map(|r| r.count as f64 * 60.0 / r.per.as_secs_f64());
                    let tpm = limits
                        .and_then(|l| l.tokens)
                        .map(|r| r.count as f64 * 60.0 / r.per.as_secs_f64());
                    // Each backend's quota in force (stated, or learned from its provider)
                    // and requests waiting, from the layers themselves.
                    let observed: Vec<(String, Option<f64>, Option<f64>, usize)> = layers
                        .get(name)
                        .map(|ls| ls.iter().map(observe).collect())
                        .unwrap_or_default();
                    let primary = crate::app::primary_name(name, policy);
                    let first = observed.iter().find(|o| o.0 == primary);
                    let learned_rpm = first.and_then(|o| o.1);
                    let learned_tpm = first.and_then(|o| o.2);
                    let queue: usize = observed.iter().map(|o| o.3).sum();
                    let series: Vec<_> = m
                        .series
                        .window(now)
                        .into_iter()
                        .map(|(b, c)| {
                            json!({"t": self.wall_ms(b), "rpm": c.requests as f64 * per_min, "tpm": c.tokens as f64 * per_min,
                                   "provider_429": c.provider_429, "waited": c.waited, "refused": c.refused})
                        })
                        .collect();
                    let minute = m.series.recent(now, 6);
                    let left = |limit: Option<f64>, used: u64, provider: Option<(u64, u64)>| {
                        match (provider, limit) {
                            (Some((rem, lim)), _) if lim > 0 => Some(json!({"share": rem as f64 / lim as f64, "source": "provider"})),
                            (_, Some(l)) if l > 0.0 => Some(json!({"share": (1.0 - used as f64 / l).max(0.0), "source": "limit"})),
                            _ => None,
                        }
                    };
                    let mut waits: Vec<u64> = m.waits_ms.iter().copied().collect();
                    waits.sort_unstable();
                    let pct = |p: f64| -> Option<u64> {
                        if waits.is_empty() { return None; }
                        let i = ((waits.len() as f64 - 1.0) * p).round() as usize;
                        waits.get(i).copied()
                    };
                    let t = m.series.totals;
                    let served = t.requests.saturating_sub(t.refused);
                    let mut names: Vec<&String> = observed.iter().map(|o| &o.0).collect();
                    for b in m.backends.keys() {
                        if !names.contains(&b) {
                            names.push(b);
                        }
                    }
                    let backends: Vec<_> = names
                        .into_iter()
                        .map(|b| {
                            // Cooling now: when it is back (Unix ms).
                            let back = cooling_until
                                .get(b)
                                .filter(|t| **t > now_s)
                                .map(|t| (*t * 1000.0) as u64);
                            let o = observed.iter().find(|o| &o.0 == b);
                            json!({"name": b, "served": m.backends.get(b).copied().unwrap_or(0),
                                   "rpm": o.and_then(|o| o.1), "tpm": o.and_then(|o| o.2), "waiting": o.map_or(0, |o| o.3),
                                   "cooldowns": cooldowns.get(b).copied().unwrap_or(0.0), "cooling_until_ms": back})
                        })
                        .collect();
                    json!({
                        "name": name,
                        "limits": {"rpm": rpm.or(learned_rpm), "tpm": tpm.or(learned_tpm),
                                   "learned": rpm.is_none() && learned_rpm.is_some()},
                        "series": series,
                        "totals": t,
                        "last_minute": minute,
                        "quota_left": {"requests": left(rpm.or(learned_rpm), minute.requests, m.provider_requests),
                                       "tokens": left(tpm.or(learned_tpm), minute.tokens, m.provider_tokens)},
                        "in_flight": m.in_flight,
                        "queue": queue,
                        "wait_ms": {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99), "count": m.waits_ms.len()},
                        "cache_hit_rate": if served > 0 { t.cache_hits as f64 / served as f64 } else { 0.0 },
                        "backends": backends,
                    })
                })
                .collect();
            let mut tenant_names: Vec<&String> = config.tenants.keys().collect();
            for k in i.tenants.keys() {
                if !tenant_names.contains(&k) {
                    tenant_names.push(k);
                }
            }
            let tenants: Vec<_> = tenant_names
                .into_iter()
                .map(|name| {
                    let empty = Series::default();
                    let s = i.tenants.get(name).unwrap_or(&empty);
                    let t = config.tenants.get(name);
                    let per = |r: Option<tollgate::policy::Rate>| r.map(|r| r.count as f64 * 60.0 / r.per.as_secs_f64());
                    let minute = s.recent(now, 6);
                    json!({
                        "name": name,
                        "limits": {"rpm": per(t.and_then(|t| t.requests)), "tpm": per(t.and_then(|t| t.tokens)),
                                   "concurrency": t.and_then(|t| t.concurrency)},
                        "last_minute": minute,
                        "totals": s.totals,
                    })
                })
                .collect();
            let recent: Vec<_> = i.recent.iter().rev().cloned().collect();
            json!({"models": models, "tenants": tenants, "recent": recent})
        });
        let mut out = data.unwrap_or_else(|| json!({}));
        if let Some(o) = out.as_object_mut() {
            o.insert("now_ms".into(), json!(Self::now_ms()));
            o.insert("bucket_seconds".into(), json!(BUCKET.as_secs()));
            o.insert(
                "window_seconds".into(),
                json!(BUCKET.as_secs() * BUCKETS as u64),
            );
        }
        out
    }
}

/// A backend's (name, requests per minute, tokens per minute, requests waiting), as its
/// layers hold them now.
fn observe(l: &BackendLayers) -> (String, Option<f64>, Option<f64>, usize) {
    let rpm = l.rate_limit.as_ref().and_then(|r| {
        r.quota(&format!("{}:requests", l.name))
            .filter(|q| !q.is_closed() && !q.interval().is_zero())
            .map(|q| 60.0 / q.interval().as_secs_f64())
    });
    let tpm = l.tokens.as_ref().and_then(|t| {
        t.quota(&format!("{}:tokens", l.name))
            .filter(|q| !q.window().is_zero())
            .map(|q| q.capacity() as f64 * 60.0 / q.window().as_secs_f64())
    });
    let waiting = l.rate_limit.as_ref().map_or(0, |r| r.waiting())
        + l.tokens.as_ref().map_or(0, |t| t.waiting());
    (l.name.clone(), rpm, tpm, waiting)
}

/// The values of metric `name` in Prometheus text, by the value of its label `label`
/// (summed over the other labels).
pub(crate) fn labelled(metrics: &str, name: &str, label: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    let want = format!("{label}=\"");
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let Some(rest) = rest.strip_prefix('{') else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Some(start) = labels.find(&want) else {
            continue;
        };
        let v = &labels[start + want.len()..];
        let Some(end) = v.find('"') else { continue };
        if let Ok(x) = value.trim().parse::<f64>() {
            *out.entry(v[..end].to_owned()).or_default() += x;
        }
    }
    out
}

/// A request that ended, for tests: `counts` for `model` from `tenant`.
#[cfg(test)]
pub(crate) fn ended(model: &str, tenant: &str, counts: Counts) -> Ended {
    Ended {
        recent: Recent {
            at_ms: 0,
            request_id: "r".into(),
            tenant: tenant.into(),
            model: model.into(),
            backend: Some(model.into()),
            cache: None,
            retries: 0,
            input_tokens: None,
            output_tokens: None,
            status: 200,
            latency_ms: 1,
            outcome: "complete",
        },
        counts,
        waited: Duration::ZERO,
        provider_requests: Some((40, 60)),
        provider_tokens: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn buckets_roll_over_and_the_window_keeps_fifteen_minutes() {
        let s = Stats::new();
        let one = Counts {
            requests: 1,
            tokens: 10,
            ..Counts::default()
        };
        s.started("m");
        s.ended(ended("m", "t", one));
        tokio::time::advance(BUCKET).await;
        s.started("m");
        s.ended(ended("m", "t", one));
        s.started("m");
        s.ended(ended("m", "t", one));
        assert_eq!(s.current_bucket(), 1);
        let b = s.buckets(0, 2);
        assert_eq!(b.models["m"][0].requests, 1);
        assert_eq!(b.models["m"][1].requests, 2);
        assert_eq!(b.tenants["t"][1].tokens, 20);
        tokio::time::advance(BUCKET * BUCKETS as u32).await;
        let now = s.current_bucket();
        assert!(
            s.buckets(now - 5, now).models["m"]
                .iter()
                .all(|c| c.requests == 0),
            "aged out"
        );
        let cfg =
            Config::from_yaml("open: true\nmodels:\n  m: { primary: { url: \"http://h\" } }\n")
                .unwrap();
        let snap = s.snapshot(&cfg, "", &HashMap::new());
        let m = &snap["models"][0];
        assert_eq!(m["series"].as_array().unwrap().len(), BUCKETS);
        assert_eq!(m["totals"]["requests"], 3, "totals never age");
        assert_eq!(m["quota_left"]["requests"]["share"], 40.0 / 60.0);
        assert_eq!(m["quota_left"]["requests"]["source"], "provider");
        assert!(
            m["backends"][0]["cooling_until_ms"].is_null(),
            "not cooling"
        );
        let back = Stats::now_ms() / 1000 + 60;
        let text = format!("tollgate_failover_cooling_until_seconds{{backend=\"m\"}} {back}\n");
        let snap = s.snapshot(&cfg, &text, &HashMap::new());
        assert_eq!(
            snap["models"][0]["backends"][0]["cooling_until_ms"],
            back * 1000,
            "cooling, and when it is back"
        );
    }

    #[test]
    fn an_absurd_retry_after_is_capped_not_a_panic() {
        let now = Instant::now();
        assert_eq!(until(now, Duration::MAX), now + Duration::from_secs(86_400));
    }

    #[test]
    fn labelled_metrics_are_read_from_prometheus_text() {
        let text = "# TYPE x gauge\ntollgate_ratelimit_learned_limit{limit=\"m:requests\"} 600\nother{limit=\"m\"} 1\ntollgate_failover_cooldowns_total{backend=\"b\",why=\"5xx\"} 2\ntollgate_failover_cooldowns_total{backend=\"b\",why=\"429\"} 1\n";
        assert_eq!(
            labelled(text, "tollgate_ratelimit_learned_limit", "limit")["m:requests"],
            600.0
        );
        assert_eq!(
            labelled(text, "tollgate_failover_cooldowns_total", "backend")["b"],
            3.0
        );
    }
}
