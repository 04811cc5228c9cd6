//! The policy file: a whole strategy in YAML or TOML, and the stack it builds.
//!
//! ```yaml
//! primary:
//!   url: https://api.openai.com
//!   model: gpt-4o
//!   api_key_env: OPENAI_API_KEY
//! fallbacks:
//!   - name: mini
//!     url: https://api.openai.com
//!     model: gpt-4o-mini
//! rate_limit:
//!   requests: 500/min
//!   tokens: 30k/min
//!   mode: wait
//!   max_wait: 30s
//! retry:
//!   max_retries: 3
//! cache:
//!   ttl: 10m
//! ```
//!
//! Every section but `primary` may be left out, and a section left out is a layer left out
//! of the stack: no `retry:`, no retries. The one exception is the quota: without
//! `rate_limit:` each backend **learns** its provider's requests and tokens quotas from the
//! `x-ratelimit-*` headers of its answers, starting slow (one request first) until an
//! answer states them, and waits its turn (up to 30 s); a quota that is given is an upper
//! bound the provider's may only lower (`learn: false` keeps exactly the quotas given).
//! So `primary` and `retry` alone pass a burst at the provider's pace with no 429 shown.
//! A learned quota is learned by each instance in process; to share one quota between
//! instances through `store: redis://…`, state it.
//! `examples/tollgate.yaml` in the repository is a full, annotated policy, and
//! [`Policy::describe`] writes out what each backend will do.
//!
//! **Strict.** An unknown field is an error, so a typo (`max_retires`) never silently
//! means "the default". A bad value names the field, the line and what was expected.
//! Durations are written `30s`, `500ms`, `1m30s`; rates `3000/min`, `10/s`, `100k/h`;
//! sizes `256MiB`.
//!
//! **The YAML parser** is [`serde-saphyr`](https://docs.rs/serde-saphyr): pure Rust over
//! the `granit-parser` YAML 1.2 parser, no `unsafe`, built to never panic on bad input,
//! with line and column in every error, and maintained. `serde_yaml` is deprecated;
//! its fork `serde_yml` is itself deprecated now and only forwards to another crate; the
//! `serde_norway` fork keeps `unsafe-libyaml`, a machine translation of the C libyaml.
//! TOML goes through the `toml` crate.

mod build;
mod describe;
mod units;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;

pub use build::{BackendLayers, BoxBody, PolicyService};
pub use units::{Dur, KeySpec, Rate, Size};

/// A whole strategy: backends, limits, retries, cache, failover and store.
///
/// In a file, the backends are either `primary` and `fallbacks`, or `backends:` — a group
/// of equal backends of one model (several keys, regions or hosts, each with its own
/// `weight`, `rate_limit` and credentials), balanced by their room unless
/// `failover.strategy` says otherwise — with `fallbacks` (other models) tried after the
/// group. The first of `backends` becomes [`primary`](Self::primary), the rest lead
/// [`fallbacks`](Self::fallbacks).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(try_from = "PolicyFile")]
pub struct Policy {
    /// The backend tried first.
    pub primary: BackendConfig,
    /// Backends tried, by priority, when the primary fails or would wait too long.
    pub fallbacks: Vec<BackendConfig>,
    /// Limits per backend, mirroring the provider's (each backend may set its own). Left
    /// out, each backend learns its provider's quotas from the answers' `x-ratelimit-*`
    /// headers ([`RateLimitConfig::default`]).
    pub rate_limit: Option<RateLimitConfig>,
    /// Retries per backend.
    pub retry: Option<RetryConfig>,
    /// The response cache in front of everything.
    pub cache: Option<CacheConfig>,
    /// When backends are set aside and what happens when all are.
    pub failover: FailoverConfig,
    /// Where limits, budgets and cache entries are kept.
    pub store: Store,
    /// The largest request body read (10 MiB by default); larger ones get 413.
    pub body_limit: Option<Size>,
}

/// A policy as written: `primary` and `fallbacks`, or a `backends` group (see [`Policy`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    primary: Option<BackendConfig>,
    #[serde(default)]
    backends: Vec<BackendConfig>,
    #[serde(default)]
    fallbacks: Vec<BackendConfig>,
    #[serde(default)]
    rate_limit: Option<RateLimitConfig>,
    #[serde(default)]
    retry: Option<RetryConfig>,
    #[serde(default)]
    cache: Option<CacheConfig>,
    #[serde(default)]
    failover: FailoverConfig,
    #[serde(default)]
    store: Store,
    #[serde(default)]
    body_limit: Option<Size>,
}

impl TryFrom<PolicyFile> for Policy {
    type Error = String;

    fn try_from(f: PolicyFile) -> Result<Self, String> {
        let mut failover = f.failover;
        let mut group = f.backends.into_iter();
        let (primary, fallbacks) = match (f.primary, group.next()) {
            (Some(p), None) => (p, f.fallbacks),
            (None, Some(first)) => {
                // A group of equal backends is balanced unless the file says otherwise.
                failover.strategy.get_or_insert(StrategyConfig::Balanced);
                (first, group.chain(f.fallbacks).collect())
            }
            (Some(_), Some(_)) => {
                return Err("set `primary` (and `fallbacks`) or `backends`, not both".into())
            }
            (None, None) => {
                return Err("no backend: set `primary` (and `fallbacks`) or `backends`".into())
            }
        };
        Ok(Policy {
            primary,
            fallbacks,
            rate_limit: f.rate_limit,
            retry: f.retry,
            cache: f.cache,
            failover,
            store: f.store,
            body_limit: f.body_limit,
        })
    }
}

/// One backend: where it is, which model it serves, its credentials.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Its name in headers, metrics and logs (`primary`, or `fallback-N`, by default).
    #[serde(default)]
    pub name: Option<String>,
    /// Its base URL: `https://api.openai.com`, or with a path prefix
    /// (`http://127.0.0.1:8080/openai`); the request's path is appended.
    pub url: String,
    /// The model it is asked for; the request's `model` is rewritten to it.
    #[serde(default)]
    pub model: Option<String>,
    /// Its place among the fallbacks: lower goes first (their order in the file, by
    /// default). The primary always goes first.
    #[serde(default)]
    pub priority: Option<u32>,
    /// Its weight for the `balanced` and `weighted` strategies (1 by default).
    #[serde(default)]
    pub weight: Option<u32>,
    /// Headers sent to it alone.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// An environment variable holding its API key, sent as `Authorization: Bearer`.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// The header the key of `api_key_env` goes in instead, as it is (`x-api-key`, as
    /// Anthropic asks).
    #[serde(default)]
    pub api_key_header: Option<String>,
    /// Its own limits, instead of the top-level `rate_limit`.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
}

/// Whether a limit makes a request wait for its turn or refuses it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitMode {
    /// Wait in a bounded queue, up to `max_wait` (the default: right for clients).
    #[default]
    Wait,
    /// Refuse at once with the time until it would pass (right for gateways).
    Refuse,
}

/// The rate limit and token budget of a backend.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests per window: `600/min`.
    #[serde(default)]
    pub requests: Option<Rate>,
    /// Tokens per window: `100k/min`.
    #[serde(default)]
    pub tokens: Option<Rate>,
    /// Requests that may go at once. By default the whole window's count, as providers'
    /// own buckets allow.
    #[serde(default)]
    pub burst: Option<u32>,
    /// Whose quota: `global` (the default: the provider's quota is the account's),
    /// `api_key`, `model` or `header:NAME`.
    #[serde(default)]
    pub key: Option<KeySpec>,
    /// `wait` (the default) or `refuse`.
    #[serde(default)]
    pub mode: LimitMode,
    /// The longest a request waits for its turn (30 s by default). A request that would
    /// wait longer is refused at once, so failover can move on.
    #[serde(default)]
    pub max_wait: Option<Dur>,
    /// The most requests waiting at once (1024 by default).
    #[serde(default)]
    pub max_queue: Option<usize>,
    /// Follow the provider's `x-ratelimit-*` headers too, when they say less is left.
    #[serde(default)]
    pub adaptive: bool,
    /// Learn the provider's quota from its `x-ratelimit-*` headers (true by default): a
    /// quota left out here (`requests`, `tokens`) is learned, starting slow until the first
    /// answer states it; a quota given is an upper bound the provider's may only lower.
    /// `false`: exactly the quotas given, and no limit where none is given.
    #[serde(default)]
    pub learn: Option<bool>,
    /// Cells of the request burst kept for requests above priority 0: a request of
    /// priority 0 (the default priority, and the gateway's background jobs) passes only
    /// while this many more stay for the others. None by default; a gateway with `jobs`
    /// keeps a tenth of a stated burst.
    #[serde(default)]
    pub reserve: Option<u32>,
    /// How often the state of keys idle long enough to be back at a full quota is dropped
    /// (60 s by default): what bounds the memory of a limit keyed by `header:NAME` or
    /// `api_key` whatever the number of keys seen.
    #[serde(default)]
    pub housekeeping: Option<Dur>,
}

impl Default for RateLimitConfig {
    /// What a backend gets when the policy says nothing of limits: both quotas learned from
    /// the provider, waiting (up to 30 s) rather than refusing.
    fn default() -> Self {
        Self {
            requests: None,
            tokens: None,
            burst: None,
            key: None,
            mode: LimitMode::Wait,
            max_wait: None,
            max_queue: None,
            adaptive: false,
            learn: None,
            reserve: None,
            housekeeping: None,
        }
    }
}

impl RateLimitConfig {
    /// Whether quotas are learned from the provider (the default).
    pub fn learns(&self) -> bool {
        self.learn.unwrap_or(true)
    }
}

/// How backoff waits are spread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JitterSpec {
    /// Uniform in `[0, backoff]` (the default).
    #[default]
    Full,
    /// Uniform in `[base, 3 × previous]`.
    Decorrelated,
    /// None: every client wakes together.
    None,
}

/// Retries of one backend.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Retries after the first attempt (3 by default).
    #[serde(default)]
    pub max_retries: Option<u32>,
    /// The first backoff (500 ms by default).
    #[serde(default)]
    pub backoff: Option<Dur>,
    /// Growth per retry (2 by default).
    #[serde(default)]
    pub factor: Option<f64>,
    /// The longest backoff (8 s by default).
    #[serde(default)]
    pub max_backoff: Option<Dur>,
    /// How backoff waits are spread.
    #[serde(default)]
    pub jitter: JitterSpec,
    /// The longest server hint obeyed; a longer `Retry-After` ends the retries.
    #[serde(default)]
    pub max_server_wait: Option<Dur>,
    /// The most time spent on one request, retries and waits included.
    #[serde(default)]
    pub deadline: Option<Dur>,
}

/// The response cache.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// How long an answer is kept (10 min by default).
    #[serde(default)]
    pub ttl: Option<Dur>,
    /// The most bytes kept in memory (256 MiB by default).
    #[serde(default)]
    pub max_size: Option<Size>,
    /// Whose cache a request reads: `header:NAME`, `api_key`, `model`, or `shared` for one
    /// cache for everyone. By default the `x-tenant-id` header, else the hashed API key.
    #[serde(default)]
    pub partition: Option<Partition>,
    /// Top-level request fields left out of the key (`[user]` by default).
    #[serde(default)]
    pub exclude: Option<Vec<String>>,
    /// Cache only `temperature: 0` or seeded requests.
    #[serde(default)]
    pub deterministic_only: bool,
}

/// Whose cache a request reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Partition {
    /// One cache for everyone.
    Shared,
    /// Per key.
    By(KeySpec),
}

impl<'de> Deserialize<'de> for Partition {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim() == "shared" {
            return Ok(Partition::Shared);
        }
        s.parse()
            .map(Partition::By)
            .map_err(serde::de::Error::custom)
    }
}

/// When backends are set aside.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverConfig {
    /// Failures within `window` that set a backend aside (3).
    #[serde(default)]
    pub failures: Option<u32>,
    /// The window failures are counted over (30 s).
    #[serde(default)]
    pub window: Option<Dur>,
    /// How long a backend is set aside without a server hint (30 s).
    #[serde(default)]
    pub cooldown: Option<Dur>,
    /// With every backend set aside, wait this long for the first one back; refuse at
    /// once when left out.
    #[serde(default)]
    pub wait_when_all_cooling: Option<Dur>,
    /// Move on when a backend says the prompt is too long for its context.
    #[serde(default)]
    pub on_context_length: bool,
    /// How each request's backends are ordered: `ordered` (by priority, the next only
    /// when one could not take it), `balanced` (the one whose limits have the most room
    /// for their weight goes first, so every key's quota is used) or `weighted` (fixed
    /// shares by weight, e.g. for a migration). Left out: `balanced` for a `backends:`
    /// group, `ordered` otherwise.
    #[serde(default)]
    pub strategy: Option<StrategyConfig>,
    /// With `balanced` or `weighted`: keep each key's requests (`header:x-tenant-id`, a
    /// conversation header, `api_key`) on one backend while it has room, so the
    /// provider's prompt cache keeps being hit. The cost: that key's load is not spread,
    /// and it moves on only when its backend has no room left.
    #[serde(default)]
    pub sticky: Option<KeySpec>,
}

/// See [`FailoverConfig::strategy`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrategyConfig {
    /// By priority.
    #[default]
    Ordered,
    /// Quota-aware.
    Balanced,
    /// Fixed shares by weight.
    Weighted,
}

/// Where limits, budgets and cache entries are kept: `memory`, a `redis://` URL, or a
/// map with the URL and what to do when Redis cannot answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Store {
    /// In this process (the default).
    #[default]
    Memory,
    /// In Redis, shared by every instance.
    Redis(RedisConfig),
}

/// What each layer does when Redis cannot answer in time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Refuse with a 503: nothing passes uncounted (the default).
    #[default]
    Closed,
    /// Go on with this instance's share of every quota (quota ÷ `instances`).
    Open,
}

/// A Redis store.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`.
    pub url: String,
    /// `closed` (the default) or `open`.
    #[serde(default)]
    pub on_failure: FailureMode,
    /// How many instances share the quotas: with `on_failure: open`, each keeps
    /// quota ÷ instances while Redis is away. Required with `open`.
    #[serde(default)]
    pub instances: Option<u32>,
    /// The longest a Redis call may take (50 ms by default).
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// The key prefix, a Redis Cluster hash tag (`tollgate` by default).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Borrow slices of each quota and spend them in process, so most decisions never
    /// reach Redis (the global quota still holds).
    #[serde(default)]
    pub pooled: bool,
}

impl<'de> Deserialize<'de> for Store {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Name(String),
            Redis(RedisConfig),
        }
        let redis_url = |s: &str| s.starts_with("redis://") || s.starts_with("rediss://");
        match Repr::deserialize(d)? {
            Repr::Name(s) if s.trim() == "memory" => Ok(Store::Memory),
            Repr::Name(s) if redis_url(s.trim()) => Ok(Store::Redis(RedisConfig {
                url: s.trim().to_owned(),
                on_failure: FailureMode::Closed,
                instances: None,
                timeout: None,
                namespace: None,
                pooled: false,
            })),
            Repr::Redis(r) if redis_url(r.url.trim()) => Ok(Store::Redis(r)),
            Repr::Name(s) | Repr::Redis(RedisConfig { url: s, .. }) => Err(serde::de::Error::custom(format!(
                "`{s}` is not a store: expected `memory`, a `redis://` URL, or {{ url: redis://…, on_failure: closed|open, instances: N }}"
            ))),
        }
    }
}

/// A policy that could not be read or built.
#[derive(Debug)]
pub struct PolicyError {
    message: String,
    line: Option<u64>,
    column: Option<u64>,
}

impl PolicyError {
    /// An error with a message and no place in a file.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            line: None,
            column: None,
        }
    }

    /// The same error, its message led by `context` (`models.gpt-4o: …`).
    pub fn context(mut self, context: &str) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// What is wrong.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The line (from 1) it is on, when known.
    pub fn line(&self) -> Option<u64> {
        self.line
    }

    /// The column (from 1) it is at, when known.
    pub fn column(&self) -> Option<u64> {
        self.column
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "line {l}, column {c}: {}", self.message),
            (Some(l), None) => write!(f, "line {l}: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for PolicyError {}

/// Reads any strict config type from YAML with the policy file's errors: the field, its
/// line and column, and what was expected. The gateway's config file is read this way, so
/// its errors are as good as a policy's.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, PolicyError> {
    let mut path = Vec::new();
    let result = serde_saphyr::with_deserializer_from_str(text, |de| {
        let mut track = serde_path_to_error::Track::new();
        let tracked = serde_path_to_error::Deserializer::new(de, &mut track);
        let r = T::deserialize(tracked);
        path = vec![track.path().to_string()];
        r
    });
    result.map_err(|e| {
        let loc = e.location();
        let field = path.pop().filter(|p| p != ".");
        let message = plain_message(&e.to_string());
        let message = match field {
            Some(f) => format!("{f}: {message}"),
            None => message,
        };
        PolicyError {
            message,
            line: loc.map(|l| l.line()),
            column: loc.map(|l| l.column()),
        }
    })
}

/// [`parse_yaml`] for TOML.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, PolicyError> {
    let de = toml::Deserializer::parse(text).map_err(|e| toml_error(text, &e))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let mut err = toml_error(text, &inner);
        if path != "." {
            err.message = format!("{path}: {}", err.message);
        }
        err
    })
}

impl Policy {
    /// Reads a policy from YAML.
    pub fn from_yaml(text: &str) -> Result<Self, PolicyError> {
        parse_yaml::<Policy>(text)?.checked()
    }

    /// Reads a policy from TOML.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        parse_toml::<Policy>(text)?.checked()
    }

    /// Reads a policy file: TOML if its name ends in `.toml`, YAML otherwise.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, PolicyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| PolicyError::new(format!("{}: {e}", path.display())))?;
        let read = if path.extension().is_some_and(|e| e == "toml") {
            Self::from_toml(&text)
        } else {
            Self::from_yaml(&text)
        };
        read.map_err(|mut e| {
            e.message = format!("{}: {}", path.display(), e.message);
            e
        })
    }

    fn checked(self) -> Result<Self, PolicyError> {
        self.check()?;
        Ok(self)
    }

    /// The checks serde cannot make: values that parse but make no sense together (two
    /// backends of one name, a URL that is not http(s), a header that is not one). The
    /// readers run it; a policy built in code or nested in another file runs it here.
    pub fn check(&self) -> Result<(), PolicyError> {
        let mut names = Vec::new();
        for (i, b) in self.backends() {
            let name = b.name_or(i);
            if names.contains(&name) {
                return Err(PolicyError::new(format!(
                    "two backends are named `{name}`: names must differ"
                )));
            }
            let uri: http::Uri = b.url.parse().map_err(|_| {
                PolicyError::new(format!("backend `{name}`: url `{}` is not a URL", b.url))
            })?;
            if !matches!(uri.scheme_str(), Some("http") | Some("https")) || uri.host().is_none() {
                return Err(PolicyError::new(format!(
                    "backend `{name}`: url `{}` must be http:// or https:// with a host",
                    b.url
                )));
            }
            if let Some(h) = &b.api_key_header {
                if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    return Err(PolicyError::new(format!(
                        "backend `{name}`: api_key_header `{h}` is not a header name"
                    )));
                }
            }
            for (k, v) in &b.headers {
                if http::HeaderName::from_bytes(k.as_bytes()).is_err()
                    || http::HeaderValue::from_str(v).is_err()
                {
                    return Err(PolicyError::new(format!(
                        "backend `{name}`: header `{k}` is not a valid header"
                    )));
                }
            }
            names.push(name);
        }
        if let Store::Redis(r) = &self.store {
            if r.on_failure == FailureMode::Open && r.instances.unwrap_or(0) == 0 {
                return Err(PolicyError::new(
                    "store.instances: `on_failure: open` needs the number of instances sharing the quota, so that each keeps only its share while Redis is away",
                ));
            }
        }
        if let Some(r) = &self.retry {
            if let Some(f) = r.factor {
                if !(f.is_finite() && f >= 1.0) {
                    return Err(PolicyError::new(format!(
                        "retry.factor: {f} must be a number of at least 1"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The backends with their index: 0 for the primary, then the fallbacks in file order.
    pub(crate) fn backends(&self) -> impl Iterator<Item = (usize, &BackendConfig)> {
        std::iter::once(&self.primary)
            .chain(&self.fallbacks)
            .enumerate()
    }
}

impl BackendConfig {
    /// Its name, or the default for its place.
    pub fn name_or(&self, index: usize) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None if index == 0 => "primary".to_owned(),
            None => format!("fallback-{index}"),
        }
    }
}

/// serde-saphyr's message without the location it also gives apart (it is reported once,
/// as the error's line and column).
fn plain_message(msg: &str) -> String {
    let mut m = msg.lines().next().unwrap_or(msg).trim();
    m = m.strip_prefix("error:").unwrap_or(m).trim_start();
    // "line 4 column 13: …"
    if let Some(rest) = m.strip_prefix("line ") {
        if let Some((_, after)) = rest.split_once(": ") {
            m = after;
        }
    }
    m.to_owned()
}

fn toml_error(text: &str, e: &toml::de::Error) -> PolicyError {
    let (line, column) = match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() as u64 + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) as u64 + 1;
            (Some(line), Some(column))
        }
        None => (None, None),
    };
    PolicyError {
        message: e.message().to_owned(),
        line,
        column,
    }
}
