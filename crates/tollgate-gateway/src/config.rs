//! The gateway's config file: where it listens, the models it serves (each a Tollgate
//! [`Policy`]), the tenants allowed in and their limits, and the store.
//!
//! YAML or TOML, strict as the policy file is: an unknown field is an error, and a bad
//! value names its field, line and column.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use tollgate::policy::{self, Dur, LimitMode, Policy, PolicyError, Rate, Size, Store};

/// The whole gateway config.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The address to listen on (`127.0.0.1:4000` by default). HTTP/1.1 and h2c (HTTP/2
    /// without TLS, prior knowledge) on the same port.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The largest request body read (1 MiB by default); a larger one is a 413.
    #[serde(default)]
    pub body_limit: Option<Size>,
    /// How long a client may take and a provider may keep us waiting.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// On SIGTERM or ctrl-c: how long requests and streams in flight may take to finish
    /// (30 s by default).
    #[serde(default)]
    pub shutdown_grace: Option<Dur>,
    /// The model names clients send, each mapped to the policy that serves it.
    pub models: BTreeMap<String, Policy>,
    /// More names for a model of `models`, served by the very same stack — and so sharing
    /// its quota, cache and health (`gpt-4o-2024-08-06: gpt-4o`).
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
    /// The tenants, by name.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    /// No keys: every request is let in, its tenant named by the `tenant_header` (the
    /// limits of a tenant of that name apply; others have none). Must be said explicitly.
    #[serde(default)]
    pub open: bool,
    /// Where an open gateway reads the tenant's name (`x-tenant-id` by default).
    #[serde(default)]
    pub tenant_header: Option<String>,
    /// Where limits, budgets and cache entries are kept, for every model whose policy
    /// names no store of its own and for the tenants' limits: `memory` (the default) or a
    /// `redis://` URL, so that many gateway instances share one quota.
    #[serde(default)]
    pub store: Store,
    /// The environment variable holding the admin key, which `POST /admin/reload` needs.
    /// Without it the admin endpoint is off.
    #[serde(default)]
    pub admin_key_env: Option<String>,
    /// Alert rules and where their events go.
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// Embeddings batching: concurrent `/v1/embeddings` requests of one model and the same
    /// parameters within `max_delay` (5 ms) go as one provider call — one request of the
    /// model's quota instead of one each. On for every model but those in `off`.
    #[serde(default)]
    pub batching: BatchingConfig,
    /// What each model's tokens cost, in dollars per million (`input`, `output`,
    /// `cached_input`), for tenants' `budget`s. A model without a price is not counted.
    #[serde(default)]
    pub prices: BTreeMap<String, PriceConfig>,
    /// Background jobs (`Prefer: respond-async`): where they are kept, and how many run
    /// at once. Without it, the preference is ignored and requests are answered at once.
    #[serde(default)]
    pub jobs: Option<JobsConfig>,
}

/// See [`Config::batching`].
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchingConfig {
    /// How long the first request of a batch waits for others (5 ms).
    pub max_delay: Option<Dur>,
    /// Models whose embeddings go one by one, as sent.
    pub off: Vec<String>,
}

impl BatchingConfig {
    /// The batching layer of `model`, unless it is off.
    pub(crate) fn layer_for(&self, model: &str) -> Option<tollgate_batch::BatchLayer> {
        if self.off.iter().any(|m| m == model) {
            return None;
        }
        let exact = tollgate::tpm::estimate::Encoding::for_model(model);
        Some(
            tollgate_batch::BatchLayer::builder()
                .max_delay(
                    self.max_delay
                        .map_or(std::time::Duration::from_millis(5), |d| d.0),
                )
                .count(move |text| {
                    exact
                        .and_then(|e| e.count(text))
                        .unwrap_or_else(|| (text.len() as u64).div_ceil(4).max(1))
                })
                .build(),
        )
    }
}

/// A model's price, in US dollars per million tokens.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// Input (prompt) tokens.
    pub input: f64,
    /// Output (generated) tokens.
    pub output: f64,
    /// Input served from the provider's prompt cache (the input price by default).
    #[serde(default)]
    pub cached_input: Option<f64>,
}

/// Dollars per window: `10/day`, `300/month`, `5/1h`.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(try_from = "String")]
pub struct BudgetRate {
    /// The amount.
    pub dollars: f64,
    /// The window.
    pub window: tollgate_cost::Window,
}

impl TryFrom<String> for BudgetRate {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a budget such as `10/day`, `300/month` or `5/1h`");
        let (amount, window) = s.split_once('/').ok_or_else(bad)?;
        let dollars: f64 = amount
            .trim()
            .trim_start_matches('$')
            .parse()
            .map_err(|_| bad())?;
        if !dollars.is_finite() || dollars < 0.0 {
            return Err(bad());
        }
        let window = tollgate_cost::Window::parse(window).ok_or_else(bad)?;
        Ok(Self { dollars, window })
    }
}

/// Background jobs: model requests answered later, kept on disk (or in Redis) until
/// they are.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    /// The embedded store's file (created when missing). The Batch API's files are kept
    /// beside it, in `<path>.files/` — with `store`, too: instances that share a Redis
    /// job store must share that directory (a shared volume) for the files API.
    pub path: String,
    /// `redis://host:port/db`: keep jobs and their queue in Redis instead of `path`, so
    /// many gateway instances share them and take over the work of one that died.
    #[serde(default)]
    pub store: Option<String>,
    /// The Redis key namespace of the jobs (`tollgate` by default).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Jobs run at once (4 by default).
    #[serde(default)]
    pub workers: Option<u32>,
    /// How long a worker's claim on a job holds unless renewed (5 min by default): a
    /// worker renews it every third of it while its call runs, and a job whose gateway
    /// died mid-call is taken over once it runs out.
    #[serde(default)]
    pub lease: Option<Dur>,
    /// The environment variable holding the Standard Webhooks secret that job callbacks
    /// (`x-tollgate-callback-url`) are signed with.
    #[serde(default)]
    pub callback_secret_env: Option<String>,
}

/// Alert rules, and the sinks every rule's events go to.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertsConfig {
    /// The rules.
    pub rules: Vec<RuleConfig>,
    /// Where events go: webhooks.
    pub sinks: Vec<SinkConfig>,
}

/// What a rule watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    /// A model has been limited — its providers answered 429, or its requests waited
    /// past `wait_over` or were refused — in every 10-second interval for `for`.
    LimitedFor,
    /// A backend was put aside (a cooldown began); resolved when none began for its
    /// cooldown.
    Cooling,
    /// A model or a tenant used over `over_percent` of a limit in every 10-second
    /// interval for `for`.
    QuotaUsed,
    /// More than `over_percent` of a model's answers were 5xx over `window`.
    ErrorRate,
}

/// One alert rule.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Its name in events (the kind and subject by default).
    #[serde(default)]
    pub name: Option<String>,
    /// What it watches.
    pub when: RuleKind,
    /// The model it watches (every model when left out).
    #[serde(default)]
    pub model: Option<String>,
    /// `quota_used`: the tenant it watches instead of a model.
    #[serde(default)]
    pub tenant: Option<String>,
    /// `cooling`: the backend it watches (every backend when left out).
    #[serde(default)]
    pub backend: Option<String>,
    /// How long the condition must hold (`limited_for`, `quota_used`; 5 minutes by
    /// default).
    #[serde(default, rename = "for")]
    pub for_: Option<Dur>,
    /// `limited_for`: a wait longer than this counts as limited (1 s by default).
    #[serde(default)]
    pub wait_over: Option<Dur>,
    /// `quota_used` (90 by default), `error_rate` (5 by default): the threshold, in percent.
    #[serde(default)]
    pub over_percent: Option<f64>,
    /// `error_rate`: the window (5 minutes by default).
    #[serde(default)]
    pub window: Option<Dur>,
}

/// The body an alert is sent as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkFormat {
    /// The event as JSON, signed per Standard Webhooks when a secret is given.
    #[default]
    Json,
    /// Slack's incoming webhook: `{"text": …}`.
    Slack,
    /// DingTalk's robot: `{"msgtype": "text", "text": {"content": …}}`.
    Dingtalk,
    /// WeCom's (WeChat Work) robot: the same shape as DingTalk's.
    Wecom,
}

/// One webhook.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Where to POST.
    pub url: String,
    /// The body's shape.
    #[serde(default)]
    pub format: SinkFormat,
    /// The environment variable holding the Standard Webhooks secret (`whsec_…`, or any
    /// string): each request is signed (`webhook-id`, `webhook-timestamp`,
    /// `webhook-signature`).
    #[serde(default)]
    pub secret_env: Option<String>,
}

/// Timeouts.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// How long a client may take to send a request's headers, and how long an idle
    /// HTTP/1.1 connection waits for its next request (10 s by default).
    pub header_read: Option<Dur>,
    /// How long an idle HTTP/2 connection is kept: pinged after this long with nothing
    /// sent, closed when the ping is not answered within it (60 s by default).
    pub idle: Option<Dur>,
    /// How long a provider may be silent, per attempt: before its answer starts, and
    /// between two parts of it (300 s by default). A stream may run as long as it keeps
    /// sending; one silent longer ends with an `event: error` (`stream_interrupted`), and
    /// a non-streamed answer cut so is asked again.
    pub upstream: Option<Dur>,
}

/// One tenant: how it proves who it is, what it may use and how much. Every field may be
/// left out.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantConfig {
    /// The SHA-256 of its virtual key, in hex (`printf %s "$KEY" | sha256sum`): the file
    /// never holds the key itself.
    pub key_sha256: Option<String>,
    /// Or: the environment variable holding its key.
    pub key_env: Option<String>,
    /// Its requests per window (`600/min`), across all models.
    pub requests: Option<Rate>,
    /// Its tokens per window (`100k/min`), estimated before and settled after, across
    /// all models.
    pub tokens: Option<Rate>,
    /// How many of its requests (and streams) may be in flight at once.
    pub concurrency: Option<u32>,
    /// Its place in the models' wait queues, 0–255, higher first (1 by default; background
    /// jobs wait at 0, behind every live request of a higher priority).
    pub priority: Option<u8>,
    /// Its weight in the models' fair share (1 by default): while tenants of one priority
    /// wait for a model's quota, each gets cells (and tokens) in proportion to its weight;
    /// a tenant alone gets all of it.
    pub weight: Option<u32>,
    /// Its spend per window, in US dollars: `10/day`, `300/month` (calendar windows in
    /// UTC) or `5/1h`; priced by the top-level `prices`. Over it: a 429 `budget_exceeded`
    /// until the window starts again. Kept in the gateway's `store` when it names Redis:
    /// every instance spends one budget, and `/api/stats`, the dashboard and the
    /// `quota_used` alert read what all of them spent (once a second).
    pub budget: Option<BudgetRate>,
    /// The models (names or aliases) it may use; all when left out.
    pub models: Option<Vec<String>>,
    /// `refuse` (the default: a 429 with `Retry-After` at once) or `wait` over its limits.
    pub mode: LimitMode,
    /// In `wait` mode, the longest a request waits for the tenant's limits (30 s).
    pub max_wait: Option<Dur>,
}

impl Default for TenantConfig {
    /// No key, no limits, every model, the default priority, refusing over its limits.
    fn default() -> Self {
        Self {
            key_sha256: None,
            key_env: None,
            requests: None,
            tokens: None,
            concurrency: None,
            priority: None,
            weight: None,
            budget: None,
            models: None,
            mode: LimitMode::Refuse,
            max_wait: None,
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:4000".to_owned()
}

/// The default request body cap.
pub const DEFAULT_BODY_LIMIT: u64 = 1024 * 1024;

impl Config {
    /// A gateway without keys (`open: true`) serving `models`, every other setting at its
    /// default: for a gateway embedded in a program (a demo, a test) that builds its
    /// policies in code.
    pub fn open(models: BTreeMap<String, Policy>) -> Self {
        Self {
            listen: default_listen(),
            body_limit: None,
            timeouts: Timeouts::default(),
            shutdown_grace: None,
            models,
            aliases: BTreeMap::new(),
            tenants: BTreeMap::new(),
            open: true,
            tenant_header: None,
            store: Store::Memory,
            admin_key_env: None,
            alerts: AlertsConfig::default(),
            jobs: None,
            batching: BatchingConfig::default(),
            prices: BTreeMap::new(),
        }
    }

    /// Reads a config from YAML.
    pub fn from_yaml(text: &str) -> Result<Self, PolicyError> {
        policy::parse_yaml::<Config>(text)?.checked()
    }

    /// Reads a config from TOML.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        policy::parse_toml::<Config>(text)?.checked()
    }

    /// Reads a config file: TOML if its name ends in `.toml`, YAML otherwise.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, PolicyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| PolicyError::new(format!("{}: {e}", path.display())))?;
        let read = if path.extension().is_some_and(|e| e == "toml") {
            Self::from_toml(&text)
        } else {
            Self::from_yaml(&text)
        };
        read.map_err(|e| e.context(&path.display().to_string()))
    }

    /// The address to listen on.
    pub fn listen_addr(&self) -> Result<SocketAddr, PolicyError> {
        self.listen.parse().map_err(|_| {
            PolicyError::new(format!(
                "listen: `{}` is not an address: write it as host:port, like 127.0.0.1:4000",
                self.listen
            ))
        })
    }

    /// The request body cap in bytes.
    pub fn body_limit(&self) -> usize {
        usize::try_from(self.body_limit.map_or(DEFAULT_BODY_LIMIT, |s| s.0)).unwrap_or(usize::MAX)
    }

    /// The shutdown grace.
    pub fn shutdown_grace(&self) -> Duration {
        self.shutdown_grace.map_or(Duration::from_secs(30), |d| d.0)
    }

    /// The policy serving `model` (a name of `models` or an alias), with the name of the
    /// `models` entry.
    pub fn route(&self, model: &str) -> Option<(&str, &Policy)> {
        let name = self.aliases.get(model).map_or(model, String::as_str);
        self.models
            .get_key_value(name)
            .map(|(k, p)| (k.as_str(), p))
    }

    /// The checks serde cannot make.
    fn checked(self) -> Result<Self, PolicyError> {
        self.listen_addr()?;
        if self.models.is_empty() {
            return Err(PolicyError::new(
                "models: the gateway serves no model: name at least one, with its policy",
            ));
        }
        for (name, p) in &self.models {
            p.check()
                .map_err(|e| e.context(&format!("models.{name}")))?;
        }
        for (alias, target) in &self.aliases {
            if self.models.contains_key(alias) {
                return Err(PolicyError::new(format!(
                    "aliases.{alias}: `{alias}` is a model of `models` already"
                )));
            }
            if !self.models.contains_key(target) {
                return Err(PolicyError::new(format!(
                    "aliases.{alias}: `{target}` is not a model of `models`"
                )));
            }
        }
        if !self.open && self.tenants.is_empty() {
            return Err(PolicyError::new(
                "tenants: no tenant can get in: give at least one a key, or say `open: true` for a gateway without keys",
            ));
        }
        for (name, t) in &self.tenants {
            let at = format!("tenants.{name}");
            match (&t.key_sha256, &t.key_env, self.open) {
                (Some(_), Some(_), _) => {
                    return Err(PolicyError::new(format!(
                        "{at}: give `key_sha256` or `key_env`, not both"
                    )))
                }
                (None, None, false) => {
                    return Err(PolicyError::new(format!(
                        "{at}: no key: give `key_sha256` (the hex SHA-256 of the key) or `key_env`"
                    )))
                }
                (Some(h), None, _) if parse_hash(h).is_none() => {
                    return Err(PolicyError::new(format!(
                        "{at}.key_sha256: not a SHA-256 in hex (64 characters 0-9a-f)"
                    )))
                }
                _ => {}
            }
            if t.concurrency == Some(0) {
                return Err(PolicyError::new(format!(
                    "{at}.concurrency: 0 would let nothing through"
                )));
            }
            for m in t.models.iter().flatten() {
                if self.route(m).is_none() {
                    return Err(PolicyError::new(format!(
                        "{at}.models: `{m}` is not a model of `models` or `aliases`"
                    )));
                }
            }
        }
        for (i, r) in self.alerts.rules.iter().enumerate() {
            let at = format!("alerts.rules[{i}]");
            if let Some(m) = &r.model {
                if self.route(m).is_none() {
                    return Err(PolicyError::new(format!(
                        "{at}.model: `{m}` is not a model of `models`"
                    )));
                }
            }
            if let Some(t) = &r.tenant {
                if !self.tenants.contains_key(t) {
                    return Err(PolicyError::new(format!(
                        "{at}.tenant: `{t}` is not a tenant"
                    )));
                }
            }
            if r.over_percent.is_some_and(|p| !(p.is_finite() && p > 0.0)) {
                return Err(PolicyError::new(format!(
                    "{at}.over_percent: a percentage above 0"
                )));
            }
        }
        for (i, sink) in self.alerts.sinks.iter().enumerate() {
            let ok = sink.url.parse::<http::Uri>().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http") | Some("https")) && u.host().is_some()
            });
            if !ok {
                return Err(PolicyError::new(format!(
                    "alerts.sinks[{i}].url: `{}` must be an http:// or https:// URL",
                    sink.url
                )));
            }
        }
        if let Some(h) = &self.tenant_header {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(PolicyError::new(format!(
                    "tenant_header: `{h}` is not a header name"
                )));
            }
        }
        Ok(self)
    }
}

/// A hex SHA-256.
pub(crate) fn parse_hash(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen: 127.0.0.1:0
models:
  gpt-4o:
    primary: { url: "http://127.0.0.1:9", model: gpt-4o }
aliases: { gpt-4o-latest: gpt-4o }
tenants:
  acme: { key_sha256: "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae", requests: 60/min }
"#;

    #[test]
    fn a_good_file_reads_and_routes_aliases_to_their_model() {
        let c = Config::from_yaml(GOOD).unwrap();
        assert_eq!(c.route("gpt-4o-latest").unwrap().0, "gpt-4o");
        assert!(c.route("gpt-5").is_none());
        assert_eq!(c.tenants["acme"].mode, LimitMode::Refuse);
    }

    #[test]
    fn a_bad_value_names_its_field_and_line() {
        let bad = GOOD.replace("requests: 60/min", "requests: lots");
        let e = Config::from_yaml(&bad).unwrap_err();
        assert_eq!(e.line(), Some(8), "{e}");
        assert!(e.message().contains("tenants.acme.requests"), "{e}");
        let typo = GOOD.replace("aliases:", "alaises:");
        let e = Config::from_yaml(&typo).unwrap_err();
        assert!(e.to_string().contains("alaises"), "{e}");
    }

    #[test]
    fn a_nested_policy_error_names_its_model() {
        let bad = GOOD.replace("http://127.0.0.1:9", "ftp://x");
        let e = Config::from_yaml(&bad).unwrap_err();
        assert!(e.message().starts_with("models.gpt-4o: backend"), "{e}");
    }

    #[test]
    fn keys_and_tenants_are_checked() {
        let e = Config::from_yaml(&GOOD.replace("2c26", "zz26")).unwrap_err();
        assert!(e.message().contains("key_sha256"), "{e}");
        let no_tenants = GOOD.split("tenants:").next().unwrap();
        let e = Config::from_yaml(no_tenants).unwrap_err();
        assert!(e.message().contains("open: true"), "{e}");
        assert!(Config::from_yaml(&format!("{no_tenants}open: true\n")).is_ok());
        let e = Config::from_yaml(&GOOD.replace("gpt-4o-latest: gpt-4o", "x: nope")).unwrap_err();
        assert!(e.message().contains("aliases.x"), "{e}");
    }

    #[test]
    fn toml_reads_the_same() {
        let c = Config::from_toml(
            r#"
open = true
[models.small]
primary = { url = "http://127.0.0.1:9" }
"#,
        )
        .unwrap();
        assert!(c.open);
        assert_eq!(c.body_limit(), 1024 * 1024);
    }
}
