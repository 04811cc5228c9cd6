//! Alerts: rules over the gateway's statistics, and webhooks their events go to.
//!
//! Every second the [`Evaluator`] reads the statistics' complete 10-second buckets and
//! decides, per rule and subject (a model, a tenant, a backend), whether the rule fires or
//! resolves. Each alert sends one `alert.firing` event, nothing more while it stays
//! firing, and one `alert.resolved`. Events go into a bounded queue (a full queue drops
//! the event and counts it in `tollgate_alerts_dropped_total`): a request never waits for
//! an alert. A delivery task POSTs each event to every sink, retrying with backoff (1, 2,
//! 4, 8 s) when a receiver fails.
//!
//! JSON sinks get `{"type", "timestamp", "data"}`, signed per the Standard Webhooks
//! scheme when a secret is configured: `webhook-id`, `webhook-timestamp` and
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">` (a `whsec_`
//! secret's key is the base64 after the prefix). Slack, DingTalk and WeCom sinks get their
//! text payloads.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::{Config, RuleConfig, RuleKind, SinkConfig, SinkFormat};
use crate::stats::{Counts, Stats, BUCKET};

/// One alert event.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub(crate) struct Event {
    /// `alert.firing` or `alert.resolved`.
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    pub(crate) rule: String,
    pub(crate) when: &'static str,
    /// The model, tenant or backend.
    pub(crate) subject: String,
    pub(crate) summary: String,
    /// When the alert began firing (unix ms).
    pub(crate) since_ms: u64,
    pub(crate) at_ms: u64,
}

fn kind_name(k: RuleKind) -> &'static str {
    match k {
        RuleKind::LimitedFor => "limited_for",
        RuleKind::Cooling => "cooling",
        RuleKind::QuotaUsed => "quota_used",
        RuleKind::ErrorRate => "error_rate",
    }
}

/// Buckets a duration spans (at least one).
fn spans(d: Duration) -> u64 {
    d.as_secs().div_ceil(BUCKET.as_secs()).max(1)
}

/// Which rules fire, and the cooldown counts seen.
#[derive(Debug, Default)]
pub(crate) struct Evaluator {
    /// (rule, subject) → (since (unix ms), what it said).
    firing: HashMap<(String, String), (u64, String)>,
    /// backend → (cooldowns seen, bucket of the last new one).
    cooldowns: HashMap<String, (f64, Option<u64>)>,
    /// tenant → the share of its cost budget spent in the window in force, in percent.
    spend: HashMap<String, f64>,
}

impl Evaluator {
    /// The events of this evaluation.
    pub(crate) fn evaluate(&mut self, config: &Config, stats: &Stats, metrics: &str) -> Vec<Event> {
        let now = stats.current_bucket();
        let mut events = Vec::new();
        let cooldowns =
            crate::stats::labelled(metrics, "tollgate_failover_cooldowns_total", "backend");
        for (backend, n) in &cooldowns {
            let seen = self.cooldowns.entry(backend.clone()).or_insert((0.0, None));
            if *n > seen.0 {
                *seen = (*n, Some(now));
            }
        }
        for rule in &config.alerts.rules {
            for (subject, on, off, summary) in self.conditions(rule, config, stats, now) {
                let name = rule
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("{}:{subject}", kind_name(rule.when)));
                let key = (name.clone(), subject.clone());
                let at_ms = Stats::now_ms();
                match (self.firing.get(&key).map(|f| f.0), on, off) {
                    (None, true, _) => {
                        self.firing.insert(key, (at_ms, summary.clone()));
                        events.push(Event {
                            kind: "alert.firing",
                            rule: name,
                            when: kind_name(rule.when),
                            subject,
                            summary,
                            since_ms: at_ms,
                            at_ms,
                        });
                    }
                    (Some(since), _, true) => {
                        self.firing.remove(&key);
                        events.push(Event {
                            kind: "alert.resolved",
                            rule: name,
                            when: kind_name(rule.when),
                            subject: subject.clone(),
                            summary: format!("resolved: {subject}"),
                            since_ms: since,
                            at_ms,
                        });
                    }
                    _ => {}
                }
            }
        }
        events
    }

    /// Each tenant's spend as a share of its budget (percent), for `quota_used`.
    pub(crate) fn set_spend(&mut self, spend: HashMap<String, f64>) {
        self.spend = spend;
    }

    /// The alerts firing now, oldest first: for the dashboard.
    pub(crate) fn firing(&self) -> Vec<serde_json::Value> {
        let mut all: Vec<_> = self
            .firing
            .iter()
            .map(|((rule, subject), (since, summary))| {
                serde_json::json!({"rule": rule, "subject": subject, "since_ms": since, "summary": summary})
            })
            .collect();
        all.sort_by_key(|v| v["since_ms"].as_u64());
        all
    }

    /// Per subject: (fires, resolves, summary).
    fn conditions(
        &self,
        rule: &RuleConfig,
        config: &Config,
        stats: &Stats,
        now: u64,
    ) -> Vec<(String, bool, bool, String)> {
        let model_wanted = |m: &str| {
            rule.model
                .as_deref()
                .and_then(|r| config.route(r).map(|(n, _)| n))
                .is_none_or(|r| r == m)
        };
        match rule.when {
            RuleKind::LimitedFor => {
                let d = rule.for_.map_or(Duration::from_secs(300), |d| d.0);
                let k = spans(d);
                let wait_over = rule.wait_over.map_or(1000, |d| d.0.as_millis() as u64);
                let limited =
                    |c: &Counts| c.provider_429 > 0 || c.refused > 0 || c.max_wait_ms > wait_over;
                if now < k {
                    return Vec::new();
                }
                let spans = stats.limited_buckets(now - k, now, Duration::from_millis(wait_over));
                stats
                    .buckets(now - k, now)
                    .models
                    .into_iter()
                    .filter(|(m, _)| model_wanted(m))
                    .map(|(m, b)| {
                        // Limited in a bucket: a 429, a refusal or a long wait counted in
                        // it, or a span of limitation (a Retry-After, a wait) over it.
                        let flags: Vec<bool> = b
                            .iter()
                            .enumerate()
                            .map(|(i, c)| limited(c) || spans.get(&m).and_then(|s| s.get(i)).copied().unwrap_or(false))
                            .collect();
                        let on = flags.iter().all(|f| *f);
                        let off = flags.last().is_some_and(|f| !*f);
                        let t: u64 = b.iter().map(|c| c.provider_429).sum();
                        let r: u64 = b.iter().map(|c| c.refused).sum();
                        let summary = format!(
                            "{m} has been rate-limited for {} s: {t} 429s from providers, {r} requests refused",
                            d.as_secs()
                        );
                        (m, on, off, summary)
                    })
                    .collect()
            }
            RuleKind::QuotaUsed => {
                let d = rule.for_.map_or(Duration::from_secs(300), |d| d.0);
                let k = spans(d);
                let over = rule.over_percent.unwrap_or(90.0);
                if now < k {
                    return Vec::new();
                }
                let per_min = 60.0 / BUCKET.as_secs_f64();
                let rate = |r: Option<tollgate::policy::Rate>| {
                    r.map(|r| r.count as f64 * 60.0 / r.per.as_secs_f64())
                };
                let used = |c: &Counts, rpm: Option<f64>, tpm: Option<f64>| {
                    let a = rpm.map_or(0.0, |l| c.requests as f64 * per_min / l * 100.0);
                    let b = tpm.map_or(0.0, |l| c.tokens as f64 * per_min / l * 100.0);
                    a.max(b)
                };
                let buckets = stats.buckets(now - k, now);
                let mut out = Vec::new();
                if let Some(t) = &rule.tenant {
                    let cfg = config.tenants.get(t);
                    let (rpm, tpm) = (
                        rate(cfg.and_then(|c| c.requests)),
                        rate(cfg.and_then(|c| c.tokens)),
                    );
                    let b = buckets
                        .tenants
                        .get(t)
                        .cloned()
                        .unwrap_or_else(|| vec![Counts::default(); k as usize]);
                    if let Some(&spent) = self.spend.get(t) {
                        // A budget only fills until its window starts again: over it
                        // now is over it, whatever `for` says.
                        let rates_on = (rpm.is_some() || tpm.is_some())
                            && b.iter().all(|c| used(c, rpm, tpm) >= over);
                        let on = spent >= over || rates_on;
                        let off = spent < over && b.last().is_none_or(|c| used(c, rpm, tpm) < over);
                        let summary = if spent >= over {
                            format!("{t} has spent {spent:.0}% of its budget (over {over}%)")
                        } else {
                            format!("{t} has used over {over}% of a limit for {} s", d.as_secs())
                        };
                        return vec![(t.clone(), on, off, summary)];
                    }
                    out.push((t.clone(), b, rpm, tpm));
                } else {
                    for (m, b) in buckets.models {
                        if !model_wanted(&m) {
                            continue;
                        }
                        let limits = config.models.get(&m).and_then(|p| p.rate_limit.as_ref());
                        let (rpm, tpm) = (
                            rate(limits.and_then(|l| l.requests)),
                            rate(limits.and_then(|l| l.tokens)),
                        );
                        out.push((m, b, rpm, tpm));
                    }
                }
                out.into_iter()
                    .filter(|(_, _, rpm, tpm)| rpm.is_some() || tpm.is_some())
                    .map(|(s, b, rpm, tpm)| {
                        let on = b.iter().all(|c| used(c, rpm, tpm) >= over);
                        let off = b.last().is_some_and(|c| used(c, rpm, tpm) < over);
                        let summary =
                            format!("{s} has used over {over}% of a limit for {} s", d.as_secs());
                        (s, on, off, summary)
                    })
                    .collect()
            }
            RuleKind::ErrorRate => {
                let w = spans(rule.window.map_or(Duration::from_secs(300), |d| d.0));
                let over = rule.over_percent.unwrap_or(5.0);
                if now < w {
                    return Vec::new();
                }
                stats
                    .buckets(now - w, now)
                    .models
                    .into_iter()
                    .filter(|(m, _)| model_wanted(m))
                    .map(|(m, b)| {
                        let requests: u64 = b.iter().map(|c| c.requests).sum();
                        let errors: u64 = b.iter().map(|c| c.errors).sum();
                        let pct = if requests > 0 {
                            errors as f64 * 100.0 / requests as f64
                        } else {
                            0.0
                        };
                        let summary =
                            format!("{m}: {pct:.1}% of answers were 5xx ({errors} of {requests})");
                        (m, pct > over, pct <= over, summary)
                    })
                    .collect()
            }
            RuleKind::Cooling => {
                let hold = spans(rule.for_.map_or(Duration::from_secs(30), |d| d.0));
                self.cooldowns
                    .iter()
                    .filter(|(b, _)| {
                        rule.backend
                            .as_deref()
                            .is_none_or(|want| want == b.as_str())
                    })
                    .map(|(b, (_, last))| {
                        let on = last.is_some_and(|l| now.saturating_sub(l) < hold);
                        let summary = format!("backend {b} was put aside (cooling down)");
                        (b.clone(), on, !on, summary)
                    })
                    .collect()
            }
        }
    }
}

/// Where events go: a bounded queue in front of the delivery task.
#[derive(Clone, Debug)]
pub(crate) struct Notifier {
    tx: mpsc::Sender<Event>,
}

/// Events queued at most; more are dropped (and counted).
const QUEUE: usize = 256;

impl Notifier {
    /// A notifier and the receiving end the delivery task reads.
    pub(crate) fn new() -> (Self, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Self { tx }, rx)
    }

    /// Queues `event`; never waits. `false` when the queue was full and it was dropped.
    pub(crate) fn send(&self, event: Event) -> bool {
        match self.tx.try_send(event) {
            Ok(()) => true,
            Err(_) => {
                metrics::counter!("tollgate_alerts_dropped_total").increment(1);
                tracing::warn!("an alert was dropped: the alert queue is full");
                false
            }
        }
    }
}

/// The waits between a delivery's attempts.
pub(crate) const BACKOFF: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];

pub(crate) type Sender = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The client every webhook (alert or job callback) goes out through: one pool, its TLS
/// roots read once for the process.
pub(crate) fn sender() -> Sender {
    static SENDER: std::sync::OnceLock<Sender> = std::sync::OnceLock::new();
    SENDER
        .get_or_init(|| {
            let mut http = HttpConnector::new();
            http.enforce_http(false);
            http.set_connect_timeout(Some(Duration::from_secs(5)));
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_webpki_roots()
                .https_or_http()
                .enable_http1()
                .wrap_connector(http);
            Client::builder(TokioExecutor::new()).build(https)
        })
        .clone()
}

/// The body of `event` for `sink`.
pub(crate) fn payload(event: &Event, sink: &SinkConfig) -> Bytes {
    let text = match event.kind {
        "alert.firing" => format!("[tollgate] FIRING {}: {}", event.rule, event.summary),
        _ => format!("[tollgate] RESOLVED {}: {}", event.rule, event.summary),
    };
    let body = match sink.format {
        SinkFormat::Json => serde_json::json!({
            "type": event.kind,
            "timestamp": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            "data": event,
        }),
        SinkFormat::Slack => serde_json::json!({ "text": text }),
        SinkFormat::Dingtalk | SinkFormat::Wecom => {
            serde_json::json!({ "msgtype": "text", "text": { "content": text } })
        }
    };
    Bytes::from(body.to_string())
}

/// The headers of one webhook message: its content type and, with a secret, the Standard
/// Webhooks `webhook-id`, `webhook-timestamp` and `webhook-signature`.
pub(crate) fn signed_headers(secret: Option<&[u8]>, body: &[u8]) -> Vec<(&'static str, String)> {
    let mut headers = vec![("content-type", "application/json".to_owned())];
    if let Some(key) = secret {
        let id = format!("msg_{}", crate::app::random_hex());
        let ts = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .to_string();
        headers.push(("webhook-signature", sign(key, &id, &ts, body)));
        headers.push(("webhook-id", id));
        headers.push(("webhook-timestamp", ts));
    }
    headers
}

/// The Standard Webhooks signature of one message.
pub(crate) fn sign(key: &[u8], id: &str, ts: &str, body: &[u8]) -> String {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(key) else {
        // HMAC takes a key of any length; this cannot happen.
        return String::new();
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(body);
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("v1,{sig}")
}

/// A secret's HMAC key: the base64 after `whsec_`, or the bytes as they are.
pub(crate) fn secret_key(secret: &str) -> Vec<u8> {
    use base64::Engine;
    secret
        .strip_prefix("whsec_")
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec())
}

/// POSTs `event` to `sink`, retrying on failure; `true` once a 2xx came back.
pub(crate) async fn deliver(client: &Sender, event: &Event, sink: &SinkConfig) -> bool {
    let secret = sink
        .secret_env
        .as_ref()
        .and_then(|v| std::env::var(v).ok())
        .map(|s| secret_key(&s));
    let sent = post_signed(client, &sink.url, payload(event, sink), secret.as_deref()).await;
    let result = if sent { "ok" } else { "failed" };
    metrics::counter!("tollgate_alerts_sent_total", "result" => result).increment(1);
    sent
}

/// POSTs `body` (JSON) to `url`, signed per Standard Webhooks when `secret` is given
/// (afresh for each attempt), retrying with [`BACKOFF`]; `true` once a 2xx came back.
pub(crate) async fn post_signed(
    client: &Sender,
    url: &str,
    body: Bytes,
    secret: Option<&[u8]>,
) -> bool {
    for attempt in 0..=BACKOFF.len() {
        if attempt > 0 {
            tokio::time::sleep(BACKOFF[attempt - 1]).await;
        }
        let mut req = Request::post(url);
        for (k, v) in signed_headers(secret, &body) {
            req = req.header(k, v);
        }
        let Ok(req) = req.body(Full::new(body.clone())) else {
            return false;
        };
        match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
            Ok(Ok(res)) if res.status().is_success() => {
                let _ = res.into_body().collect().await;
                return true;
            }
            Ok(Ok(res)) => {
                tracing::warn!(
                    status = res.status().as_u16(),
                    url,
                    attempt,
                    "a webhook receiver refused"
                )
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, url, attempt, "a webhook receiver is unreachable")
            }
            Err(_) => tracing::warn!(url, attempt, "a webhook receiver did not answer"),
        }
    }
    false
}

/// Reads the queue and delivers each event to every sink of the config in force, each
/// delivery on its own task (so a slow receiver holds up no other).
pub(crate) async fn run_deliveries(
    mut rx: mpsc::Receiver<Event>,
    sinks: impl Fn() -> Vec<SinkConfig>,
) {
    let client = sender();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(16));
    while let Some(event) = rx.recv().await {
        tracing::info!(target: "tollgate::alert", kind = event.kind, rule = %event.rule, subject = %event.subject, summary = %event.summary, "alert");
        for sink in sinks() {
            let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
                return;
            };
            let (client, event) = (client.clone(), event.clone());
            tokio::spawn(async move {
                deliver(&client, &event, &sink).await;
                drop(permit);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(rules: &str) -> Config {
        Config::from_yaml(&format!(
            "open: true\nmodels:\n  m:\n    primary: {{ url: \"http://h\" }}\n    rate_limit: {{ requests: 60/min }}\nalerts:\n  rules:\n{rules}"
        ))
        .unwrap()
    }

    fn request(stats: &Stats, c: Counts) {
        stats.started("m");
        stats.ended(crate::stats::ended("m", "t", Counts { requests: 1, ..c }));
    }

    /// Runs the evaluator once a second for `secs`, feeding one request a second made
    /// by `each`; the events it gave.
    async fn run(
        ev: &mut Evaluator,
        cfg: &Config,
        stats: &Stats,
        secs: u64,
        each: impl Fn() -> Counts,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        for _ in 0..secs {
            request(stats, each());
            events.extend(ev.evaluate(cfg, stats, ""));
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        events
    }

    #[tokio::test(start_paused = true)]
    async fn a_model_limited_for_the_rules_time_fires_once_and_resolves_once() {
        let cfg = config("    - { name: m-limited, when: limited_for, model: m, for: 30s }\n");
        let stats = Stats::new();
        let mut ev = Evaluator::default();
        let limited = || Counts {
            provider_429: 1,
            ..Counts::default()
        };
        let fine = Counts::default;
        assert!(
            run(&mut ev, &cfg, &stats, 25, limited).await.is_empty(),
            "not yet 30 s"
        );
        let firing = run(&mut ev, &cfg, &stats, 60, limited).await;
        assert_eq!(firing.len(), 1, "once, however long it stays: {firing:?}");
        assert_eq!(
            (firing[0].kind, firing[0].subject.as_str()),
            ("alert.firing", "m")
        );
        assert!(
            firing[0].summary.contains("429s from providers"),
            "{}",
            firing[0].summary
        );
        let resolved = run(&mut ev, &cfg, &stats, 60, fine).await;
        assert_eq!(resolved.len(), 1, "{resolved:?}");
        assert_eq!(resolved[0].kind, "alert.resolved");
        assert!(run(&mut ev, &cfg, &stats, 60, fine).await.is_empty());
        // A quiet 10-second interval starts the count again: limited for 10 s at a time
        // (two intervals at most), then quiet for 20 s, never fires.
        let mut flicker = Vec::new();
        for round in 0..4 {
            flicker.extend(run(&mut ev, &cfg, &stats, 10, limited).await);
            flicker.extend(run(&mut ev, &cfg, &stats, 20 + round, fine).await);
        }
        assert!(flicker.is_empty(), "never 30 s in a row: {flicker:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn waits_past_the_threshold_count_as_limited_and_short_ones_do_not() {
        let cfg = config("    - { when: limited_for, for: 20s, wait_over: 2s }\n");
        let stats = Stats::new();
        let mut ev = Evaluator::default();
        let short = || Counts {
            waited: 1,
            max_wait_ms: 500,
            ..Counts::default()
        };
        assert!(run(&mut ev, &cfg, &stats, 60, short).await.is_empty());
        let long = || Counts {
            waited: 1,
            max_wait_ms: 2500,
            ..Counts::default()
        };
        let e = run(&mut ev, &cfg, &stats, 40, long).await;
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].rule, "limited_for:m");
    }

    #[tokio::test(start_paused = true)]
    async fn quota_used_and_error_rate() {
        // 60/min allowed; one request a second is 100% of it.
        let cfg = config("    - { when: quota_used, model: m, over_percent: 80, for: 20s }\n    - { when: error_rate, over_percent: 10, window: 20s }\n");
        let stats = Stats::new();
        let mut ev = Evaluator::default();
        let e = run(&mut ev, &cfg, &stats, 40, Counts::default).await;
        assert_eq!(e.iter().map(|e| e.when).collect::<Vec<_>>(), ["quota_used"]);
        let e = run(&mut ev, &cfg, &stats, 40, || Counts {
            errors: 1,
            ..Counts::default()
        })
        .await;
        assert_eq!(
            e.iter().map(|e| (e.when, e.kind)).collect::<Vec<_>>(),
            [("error_rate", "alert.firing")]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_tenant_over_a_share_of_its_budget_fires_once_and_resolves_in_a_new_window() {
        let cfg = Config::from_yaml(
            "open: true\nmodels:\n  m:\n    primary: { url: \"http://h\" }\ntenants:\n  acme: { budget: 10/day }\nalerts:\n  rules:\n    - { when: quota_used, tenant: acme, over_percent: 80 }\n",
        )
        .unwrap();
        let stats = Stats::new();
        let mut ev = Evaluator::default();
        tokio::time::advance(Duration::from_secs(600)).await;
        let at = |ev: &mut Evaluator, pct: f64| {
            ev.set_spend(HashMap::from([("acme".to_owned(), pct)]));
            ev.evaluate(&cfg, &stats, "")
        };
        assert!(at(&mut ev, 50.0).is_empty());
        let e = at(&mut ev, 85.0);
        assert_eq!((e.len(), e[0].kind), (1, "alert.firing"));
        assert!(
            e[0].summary.contains("85% of its budget"),
            "{}",
            e[0].summary
        );
        assert!(at(&mut ev, 90.0).is_empty(), "once");
        let e = at(&mut ev, 0.0);
        assert_eq!((e.len(), e[0].kind), (1, "alert.resolved"), "a new window");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cooldown_fires_and_resolves_after_its_hold() {
        let cfg = config("    - { when: cooling, for: 30s }\n");
        let stats = Stats::new();
        let mut ev = Evaluator::default();
        tokio::time::advance(Duration::from_secs(100)).await;
        let metric = |n: u32| {
            format!("tollgate_failover_cooldowns_total{{backend=\"m\",why=\"5xx\"}} {n}\n")
        };
        assert!(ev.evaluate(&cfg, &stats, &metric(0)).is_empty());
        let e = ev.evaluate(&cfg, &stats, &metric(1));
        assert_eq!((e.len(), e[0].kind), (1, "alert.firing"));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(
            ev.evaluate(&cfg, &stats, &metric(1)).is_empty(),
            "still cooling"
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        let e = ev.evaluate(&cfg, &stats, &metric(1));
        assert_eq!((e.len(), e[0].kind), (1, "alert.resolved"));
    }

    #[test]
    fn the_signature_is_standard_webhooks() {
        // The example of the Standard Webhooks spec's reference implementations.
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_receiver_is_retried_and_the_delivery_is_signed() {
        use std::sync::Mutex;
        std::env::set_var(
            "TOLLGATE_ALERT_TEST_SECRET",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        );
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let sink = SinkConfig {
            url: format!("http://{addr}/hook"),
            format: SinkFormat::Json,
            secret_env: Some("TOLLGATE_ALERT_TEST_SECRET".into()),
        };
        type Got = Arc<Mutex<Vec<(http::HeaderMap, Bytes)>>>;
        let got: Got = Arc::default();
        // Nothing listens at first; the receiver comes up after a while.
        let receiver = {
            let got = Arc::clone(&got);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(2500)).await;
                let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
                async fn hook(
                    axum::extract::State(got): axum::extract::State<Got>,
                    headers: http::HeaderMap,
                    body: Bytes,
                ) -> &'static str {
                    got.lock().unwrap().push((headers, body));
                    "ok"
                }
                let app = axum::Router::new()
                    .route("/hook", axum::routing::post(hook))
                    .with_state(got);
                axum::serve(listener, app).await.unwrap();
            })
        };
        let event = Event {
            kind: "alert.firing",
            rule: "m-limited".into(),
            when: "limited_for",
            subject: "m".into(),
            summary: "m has been rate-limited".into(),
            since_ms: 1,
            at_ms: 1,
        };
        assert!(
            deliver(&sender(), &event, &sink).await,
            "delivered once the receiver is up"
        );
        let got = got.lock().unwrap().clone();
        assert_eq!(got.len(), 1, "one delivery");
        let (headers, body) = &got[0];
        let h = |n: &str| headers[n].to_str().unwrap().to_owned();
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        assert_eq!(
            h("webhook-signature"),
            sign(&key, &h("webhook-id"), &h("webhook-timestamp"), body)
        );
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["type"], "alert.firing");
        assert_eq!(v["data"]["subject"], "m");
        receiver.abort();
    }

    #[test]
    fn text_sinks_get_their_payloads() {
        let e = Event {
            kind: "alert.resolved",
            rule: "r".into(),
            when: "cooling",
            subject: "b".into(),
            summary: "resolved: b".into(),
            since_ms: 0,
            at_ms: 0,
        };
        let sink = |format| SinkConfig {
            url: "http://h".into(),
            format,
            secret_env: None,
        };
        let slack = payload(&e, &sink(SinkFormat::Slack));
        let headers = signed_headers(None, &slack);
        let v: serde_json::Value = serde_json::from_slice(&slack).unwrap();
        assert_eq!(v["text"], "[tollgate] RESOLVED r: resolved: b");
        assert!(
            headers.iter().all(|(k, _)| !k.starts_with("webhook-")),
            "unsigned without a secret"
        );
        let ding = payload(&e, &sink(SinkFormat::Dingtalk));
        let v: serde_json::Value = serde_json::from_slice(&ding).unwrap();
        assert_eq!(v["msgtype"], "text");
        assert!(v["text"]["content"].as_str().unwrap().contains("RESOLVED"));
    }

    #[test]
    fn a_full_queue_drops_and_never_waits() {
        let (n, _rx) = Notifier::new();
        let e = Event {
            kind: "alert.firing",
            rule: "r".into(),
            when: "cooling",
            subject: "s".into(),
            summary: "x".into(),
            since_ms: 0,
            at_ms: 0,
        };
        for _ in 0..QUEUE {
            assert!(n.send(e.clone()));
        }
        assert!(!n.send(e), "dropped, not waited for");
    }
}
