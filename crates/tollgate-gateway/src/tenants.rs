//! Who is calling: virtual keys, and each tenant's own limits in front of the models.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, AUTHORIZATION};
use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tollgate::policy::{LimitMode, PolicyError};
use tollgate::ratelimit::{Limit, Quota, RateLimitLayer};
use tollgate::tpm::{Budget, TokenQuota, TpmLayer};
use tollgate_core::wait::{Mode, Priority, Share};

use crate::config::{parse_hash, BudgetRate, Config, PriceConfig, TenantConfig};

/// A live request's priority when its tenant names none; background jobs wait at 0.
pub(crate) const LIVE_PRIORITY: u8 = 1;

/// One tenant, ready to serve.
pub(crate) struct Tenant {
    pub(crate) name: Arc<str>,
    config: TenantConfig,
    key_hash: Option<[u8; 32]>,
    pub(crate) priority: Priority,
    /// Its flow in the models' fair share.
    pub(crate) share: Share,
    /// The `models` entries it may use (aliases resolved); `None`: all.
    models: Option<HashSet<String>>,
    pub(crate) rate: Option<RateLimitLayer>,
    pub(crate) tokens: Option<TpmLayer>,
    /// Its cost budget.
    pub(crate) cost: Option<tollgate_cost::CostLayer>,
    /// Its requests (and streams) in flight.
    pub(crate) concurrency: Option<tollgate_concurrency::ConcurrencyLayer>,
    anonymous: bool,
}

impl std::fmt::Debug for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key, nor its hash.
        f.debug_struct("Tenant")
            .field("name", &self.name)
            .field("priority", &self.priority)
            .finish_non_exhaustive()
    }
}

impl Tenant {
    /// Whether it is an open gateway's caller of no configured tenant.
    pub(crate) fn is_anonymous(&self) -> bool {
        self.anonymous
    }

    /// Whether it may use the `models` entry `model`.
    pub(crate) fn may_use(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|m| m.contains(model))
    }

    fn build(
        name: &str,
        t: &TenantConfig,
        cfg: &Config,
        store: Option<&Shared>,
    ) -> Result<Self, PolicyError> {
        let at = format!("tenants.{name}");
        let key_hash = match (&t.key_sha256, &t.key_env) {
            (Some(h), _) => parse_hash(h),
            (None, Some(var)) => {
                let key = std::env::var(var)
                    .map_err(|_| PolicyError::new(format!("{at}.key_env: `{var}` is not set")))?;
                if key.is_empty() {
                    return Err(PolicyError::new(format!("{at}.key_env: `{var}` is empty")));
                }
                Some(sha256(key.as_bytes()))
            }
            (None, None) => None,
        };
        let mode = match t.mode {
            LimitMode::Refuse => Mode::Refuse,
            LimitMode::Wait => {
                Mode::Refuse.wait(t.max_wait.map_or(Duration::from_secs(30), |d| d.0))
            }
        };
        let rate = t.requests.map(|r| {
            let count = u32::try_from(r.count).unwrap_or(u32::MAX).max(1);
            let limit = Limit::new(format!("tenant:{name}:requests"), Quota::per(count, r.per));
            let mut b = RateLimitLayer::builder().limit(limit).mode(mode);
            if let Some(s) = store {
                b = b.store(s.redis.clone(), s.on_failure);
            }
            b.build()
        });
        let tokens = t.tokens.map(|r| {
            let budget = Budget::new(
                format!("tenant:{name}:tokens"),
                TokenQuota::per(r.count, r.per),
            );
            let mut b = TpmLayer::builder()
                .budget(budget)
                .body_limit(cfg.body_limit())
                .mode(mode);
            if let Some(s) = store {
                b = b.store(s.redis.clone(), s.on_failure);
            }
            b.build()
        });
        let models = t.models.as_ref().map(|list| {
            list.iter()
                .filter_map(|m| cfg.route(m).map(|(name, _)| name.to_owned()))
                .collect()
        });
        Ok(Self {
            name: Arc::from(name),
            config: t.clone(),
            key_hash,
            priority: Priority(t.priority.unwrap_or(LIVE_PRIORITY)),
            share: Share::new(name, t.weight.unwrap_or(1)),
            models,
            rate,
            tokens,
            cost: t.budget.map(|b| cost_layer(name, b, cfg, store)),
            concurrency: t.concurrency.map(|n| {
                tollgate_concurrency::ConcurrencyLayer::builder()
                    .limit(tollgate_concurrency::InFlight::new(
                        format!("tenant:{name}:concurrency"),
                        n,
                    ))
                    .mode(mode)
                    .build()
            }),
            anonymous: false,
        })
    }
}

/// A tenant's cost budget: `budget` at the config's prices (a model's aliases at its
/// price), each request estimated exactly as the token budget does; in the gateway's
/// store when it names Redis.
fn cost_layer(
    name: &str,
    budget: BudgetRate,
    cfg: &Config,
    store: Option<&Shared>,
) -> tollgate_cost::CostLayer {
    use tollgate_cost::{CostBudget, CostLayer, Money, Price, Prices};
    let price = |p: &PriceConfig| {
        let price = Price::per_million(p.input, p.output);
        match p.cached_input {
            Some(c) => price.cached_input(c),
            None => price,
        }
    };
    let mut prices = Prices::new();
    for (model, p) in &cfg.prices {
        prices = prices.model(model.clone(), price(p));
    }
    for (alias, target) in &cfg.aliases {
        if let Some(p) = cfg.prices.get(target) {
            prices = prices.model(alias.clone(), price(p));
        }
    }
    let estimator = tollgate::tpm::estimate::Estimator::default();
    let mut b = CostLayer::builder();
    if let Some(s) = store {
        // The gateway's store: every instance spends the tenant's one budget.
        b = b.store(s.redis.clone(), s.on_failure);
    }
    b.prices(prices)
        .budget(CostBudget::new(
            format!("tenant:{name}:budget"),
            Money::dollars(budget.dollars),
            budget.window,
        ))
        .estimate(move |facts| {
            let e = estimator.estimate(facts);
            (e.prompt_tokens, e.max_output_tokens)
        })
        .body_limit(cfg.body_limit())
        .build()
}

/// The tenants' store, when the config names Redis.
#[derive(Clone)]
pub(crate) struct Shared {
    redis: tollgate_redis::RedisStore,
    on_failure: tollgate_core::store::OnStoreFailure,
}

impl Shared {
    pub(crate) fn open(store: &tollgate::policy::Store) -> Result<Option<Self>, PolicyError> {
        match store {
            tollgate::policy::Store::Redis(r) => {
                let (redis, on_failure) = r.open()?;
                Ok(Some(Self { redis, on_failure }))
            }
            _ => Ok(None),
        }
    }
}

/// Every tenant of a config.
pub(crate) struct Tenants {
    by_hash: HashMap<[u8; 32], Arc<Tenant>>,
    by_name: HashMap<String, Arc<Tenant>>,
    open: bool,
    header: HeaderName,
    /// An open gateway's caller without a tenant of the config: no limits, every model.
    anonymous: Arc<Tenant>,
}

/// Why a request was not let in.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Denied {
    /// No key given.
    Missing,
    /// A key no tenant has.
    Unknown,
}

impl Tenants {
    /// Builds them, reusing the tenants of `old` whose config did not change, so their
    /// counters and requests in flight carry over a reload.
    pub(crate) fn build(
        cfg: &Config,
        old: Option<&Tenants>,
        store: Option<&Shared>,
    ) -> Result<Self, PolicyError> {
        let mut by_hash = HashMap::new();
        let mut by_name = HashMap::new();
        for (name, t) in &cfg.tenants {
            let tenant = match old.and_then(|o| o.by_name.get(name)) {
                Some(prev) if prev.config == *t && t.key_env.is_none() => Arc::clone(prev),
                _ => Arc::new(Tenant::build(name, t, cfg, store)?),
            };
            if let Some(h) = tenant.key_hash {
                if by_hash.insert(h, Arc::clone(&tenant)).is_some() {
                    return Err(PolicyError::new(format!(
                        "tenants.{name}: its key is another tenant's key too"
                    )));
                }
            }
            by_name.insert(name.clone(), tenant);
        }
        let header = cfg
            .tenant_header
            .as_deref()
            .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok())
            .unwrap_or(HeaderName::from_static("x-tenant-id"));
        let anonymous = Arc::new(Tenant {
            name: Arc::from("anonymous"),
            config: TenantConfig::default(),
            key_hash: None,
            priority: Priority(LIVE_PRIORITY),
            share: Share::new("anonymous", 1),
            models: None,
            rate: None,
            tokens: None,
            cost: None,
            concurrency: None,
            anonymous: true,
        });
        Ok(Self {
            by_hash,
            by_name,
            open: cfg.open,
            header,
            anonymous,
        })
    }

    /// The tenant a request comes from.
    ///
    /// With keys: the bearer token (`Authorization: Bearer …`, or Anthropic's
    /// `x-api-key`) is hashed with SHA-256 and the hash looked up; the found tenant's hash
    /// is then compared with it in constant time. A lookup by hash tells a timing observer
    /// nothing about the key itself, so no key can be guessed byte by byte.
    pub(crate) fn identify(&self, headers: &HeaderMap) -> Result<Arc<Tenant>, Denied> {
        if self.open {
            let name = headers.get(&self.header).and_then(|v| v.to_str().ok());
            return Ok(name
                .and_then(|n| self.by_name.get(n.trim()))
                .map_or_else(|| Arc::clone(&self.anonymous), Arc::clone));
        }
        let key = bearer(headers).ok_or(Denied::Missing)?;
        let hash = sha256(key.as_bytes());
        let tenant = self.by_hash.get(&hash).ok_or(Denied::Unknown)?;
        match tenant.key_hash {
            Some(h) if bool::from(h.ct_eq(&hash)) => Ok(Arc::clone(tenant)),
            _ => Err(Denied::Unknown),
        }
    }

    /// The tenant of that name (an open gateway's unnamed callers are `anonymous`).
    pub(crate) fn by_name(&self, name: &str) -> Option<Arc<Tenant>> {
        match self.by_name.get(name) {
            Some(t) => Some(Arc::clone(t)),
            None if self.open && name == "anonymous" => Some(Arc::clone(&self.anonymous)),
            None => None,
        }
    }

    /// How many tenants there are.
    pub(crate) fn len(&self) -> usize {
        self.by_name.len()
    }
}

/// The caller's key: `Authorization: Bearer KEY` or `x-api-key: KEY`.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        let (scheme, key) = v.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| key.trim())
            .filter(|k| !k.is_empty());
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::from_yaml(&format!(
            r#"
models:
  m: {{ primary: {{ url: "http://127.0.0.1:9" }} }}
  n: {{ primary: {{ url: "http://127.0.0.1:9" }} }}
aliases: {{ m2: m }}
{extra}
"#
        ))
        .unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn a_key_is_found_by_its_hash_and_nothing_else_gets_in() {
        // sha256("foo")
        let cfg = config(
            "tenants:\n  acme: { key_sha256: 2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae, models: [m2] }",
        );
        let t = Tenants::build(&cfg, None, None).unwrap();
        let acme = t
            .identify(&headers(&[("authorization", "Bearer foo")]))
            .unwrap();
        assert_eq!(&*acme.name, "acme");
        assert!(acme.may_use("m"), "an alias allows its model");
        assert!(!acme.may_use("n"));
        assert_eq!(
            t.identify(&headers(&[("x-api-key", "foo")])).unwrap().name,
            acme.name
        );
        assert_eq!(
            t.identify(&headers(&[("authorization", "Bearer fooo")]))
                .unwrap_err(),
            Denied::Unknown
        );
        assert_eq!(t.identify(&headers(&[])).unwrap_err(), Denied::Missing);
        assert_eq!(
            t.identify(&headers(&[("authorization", "Basic Zm9v")]))
                .unwrap_err(),
            Denied::Missing
        );
        assert!(
            !format!("{acme:?}").contains("2c26"),
            "no hash in debug output"
        );
    }

    #[test]
    fn an_open_gateway_names_tenants_by_header() {
        let cfg = config("open: true\ntenants:\n  big: { concurrency: 1 }");
        let t = Tenants::build(&cfg, None, None).unwrap();
        let big = t.identify(&headers(&[("x-tenant-id", "big")])).unwrap();
        assert_eq!(&*big.name, "big");
        assert!(big.concurrency.is_some());
        assert_eq!(&*t.identify(&headers(&[])).unwrap().name, "anonymous");
    }

    #[test]
    fn a_reload_keeps_unchanged_tenants_and_their_state() {
        let cfg = config("open: true\ntenants:\n  a: { concurrency: 1 }\n  b: { concurrency: 1 }");
        let old = Tenants::build(&cfg, None, None).unwrap();
        let cfg2 = config("open: true\ntenants:\n  a: { concurrency: 1 }\n  b: { concurrency: 2 }");
        let new = Tenants::build(&cfg2, Some(&old), None).unwrap();
        // The same tenant, so the same places: a's requests in flight still count.
        assert!(Arc::ptr_eq(&new.by_name["a"], &old.by_name["a"]));
        assert!(!Arc::ptr_eq(&new.by_name["b"], &old.by_name["b"]));
    }
}
