//! From a [`Policy`] to the documented stack.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION};
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use tollgate_cache::key::KeyRules;
use tollgate_cache::{CacheBody, CacheLayer};
use tollgate_core::body::AnswerBody;
use tollgate_core::facts::{ReplayBody, DEFAULT_BODY_LIMIT};
use tollgate_core::meter::{Meter, MeterQuota};
use tollgate_core::wait::Mode;
use tollgate_core::BoxError;
use tollgate_failover::{AllCooling, Backend, Cooldown, Failover, FailoverBody};
use tollgate_ratelimit::{Quota, RateLimitLayer};
use tollgate_retry::{Backoff, Jitter, RequestBody, RetryBody, RetryLayer};
use tollgate_tpm::{TokenQuota, TpmBody, TpmLayer};
use tower::util::{BoxCloneSyncService, Either, MapErr, MapRequest, MapResponse};
use tower::{Layer, Service};

use super::{
    BackendConfig, CacheConfig, JitterSpec, LimitMode, Partition, Policy, PolicyError,
    RateLimitConfig, RetryConfig, Store,
};
use crate::BaseUrlLayer;

/// The body every layer of a policy's stack hands on: boxed, so that layers left out of
/// the policy change no type.
pub type BoxBody = UnsyncBoxBody<Bytes, BoxError>;

/// The service a [`Policy`] builds: requests with a body of type `B` in, answers with a
/// [`BoxBody`] out; errors are Tollgate's (a [`Refusal`](tollgate_core::refusal::Refusal),
/// say) or the client's.
pub type PolicyService<B> = BoxCloneSyncService<Request<B>, Response<BoxBody>, BoxError>;

fn boxed<B>(body: B) -> BoxBody
where
    B: AnswerBody,
{
    body.map_err(Into::into).boxed_unsync()
}

fn box_request<B>(req: Request<B>) -> Request<BoxBody>
where
    B: AnswerBody,
{
    req.map(boxed)
}

fn box_response<B>(res: Response<B>) -> Response<BoxBody>
where
    B: AnswerBody,
{
    res.map(boxed)
}

impl Policy {
    /// Builds the stack of DESIGN.md's request path around `client`, the HTTP client every
    /// backend is reached through (hyper's, reqwest's behind a tower adapter, a test
    /// double):
    ///
    /// ```text
    /// cache → failover → per backend: retry → rate limit → token budget → base URL → client
    /// ```
    ///
    /// Each backend gets its own retry, limiter and budget (its own quota); the cache and
    /// failover are shared. Every clone of the returned service shares all of it.
    ///
    /// Fails when the policy names something this build cannot provide: an API key
    /// variable that is not set, or a store this build has no support for.
    pub fn build<C, ResB, B>(&self, client: C) -> Result<PolicyService<B>, PolicyError>
    where
        C: Service<Request<BoxBody>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
        C::Future: Send + 'static,
        C::Error: Into<BoxError>,
        ResB: AnswerBody,
        B: AnswerBody,
    {
        self.build_observed(client).map(|(svc, _)| svc)
    }

    /// [`build`](Self::build), also handing back each backend's limiter and budget (the
    /// very layers in the stack: clones share their state), so that a program can show
    /// what they hold — requests waiting, the quota in force, learned or stated.
    pub fn build_observed<C, ResB, B>(
        &self,
        client: C,
    ) -> Result<(PolicyService<B>, Vec<BackendLayers>), PolicyError>
    where
        C: Service<Request<BoxBody>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
        C::Future: Send + 'static,
        C::Error: Into<BoxError>,
        ResB: AnswerBody,
        B: AnswerBody,
    {
        let mut observed = Vec::new();
        let shared = shared_store(&self.store)?;
        let body_limit = self.body_limit.map_or(DEFAULT_BODY_LIMIT, |s| {
            usize::try_from(s.0).unwrap_or(usize::MAX)
        });
        let mut failover = Failover::builder().body_limit(body_limit);
        for (i, b) in self.backends() {
            let name = b.name_or(i);
            let (svc, layers) =
                self.backend_stack(&name, b, client.clone(), body_limit, shared.as_ref())?;
            let mut backend = Backend::new(name.clone(), svc)
                .priority(b.priority.unwrap_or(i as u32).max(u32::from(i > 0)))
                .weight(b.weight.unwrap_or(1));
            if let Some(limit) = &layers.rate_limit {
                backend = backend.capacity(limit.clone());
            }
            observed.push(layers);
            if let Some(m) = &b.model {
                backend = backend.model(m.clone());
            }
            for (k, v) in &b.headers {
                let (k, v) = header(&name, k, v)?;
                backend = backend.header(k, v);
            }
            if let Some(var) = &b.api_key_env {
                let key = std::env::var(var).map_err(|_| {
                    PolicyError::new(format!("backend `{name}`: api_key_env `{var}` is not set"))
                })?;
                let (k, v) = match &b.api_key_header {
                    Some(h) => {
                        let (k, mut v) = header(&name, h, &key)?;
                        v.set_sensitive(true);
                        (k, v)
                    }
                    None => header(&name, AUTHORIZATION.as_str(), &format!("Bearer {key}"))?,
                };
                backend = backend.header(k, v);
            }
            failover = failover.backend(backend);
        }
        let f = &self.failover;
        let defaults = Cooldown::default();
        failover = failover
            .cooldown(Cooldown {
                failures: f.failures.unwrap_or(defaults.failures),
                window: f.window.map_or(defaults.window, |d| d.0),
                duration: f.cooldown.map_or(defaults.duration, |d| d.0),
                long_hint: defaults.long_hint,
            })
            .all_cooling(match f.wait_when_all_cooling {
                Some(d) => AllCooling::Wait(d.0),
                None => AllCooling::Refuse,
            })
            .on_context_length(f.on_context_length)
            .strategy(match f.strategy.unwrap_or_default() {
                super::StrategyConfig::Ordered => tollgate_failover::Strategy::Ordered,
                super::StrategyConfig::Balanced => tollgate_failover::Strategy::Balanced,
                super::StrategyConfig::Weighted => tollgate_failover::Strategy::Weighted,
            });
        if let Some(key) = &f.sticky {
            failover = failover.sticky(key.extractor());
        }
        failover = failover
            // A backend whose provider said "later" is waited for as long as its own
            // limiter would wait.
            .wait_for_quota(
                self.rate_limit
                    .as_ref()
                    .and_then(|r| r.max_wait)
                    .map_or(DEFAULT_MAX_WAIT, |d| d.0),
            );
        let failover = failover.build();

        let svc = match &self.cache {
            Some(c) => BoxCloneSyncService::new(MapResponse::new(
                cache_layer(c, body_limit, shared.as_ref()).layer(failover),
                box_response::<CacheBody<FailoverBody<BoxBody>>>,
            )),
            None => BoxCloneSyncService::new(MapResponse::new(
                failover,
                box_response::<FailoverBody<BoxBody>>,
            )),
        };
        Ok((svc, observed))
    }

    /// One backend's stack, retry → rate limit → token budget → base URL → `client`, as
    /// one concrete type: a layer the policy leaves out is the other side of an
    /// [`Either`], not a box, so cloning the stack for a call (which every layer does)
    /// allocates nothing.
    fn backend_stack<C, ResB>(
        &self,
        name: &str,
        b: &BackendConfig,
        client: C,
        body_limit: usize,
        shared: Option<&SharedStore>,
    ) -> Result<
        (
            impl Service<
                    Request<ReplayBody>,
                    Response = Response<BoxBody>,
                    Error = BoxError,
                    Future: Send + 'static,
                > + Clone
                + Send
                + Sync
                + 'static,
            BackendLayers,
        ),
        PolicyError,
    >
    where
        C: Service<Request<BoxBody>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
        C::Future: Send + 'static,
        C::Error: Into<BoxError>,
        ResB: AnswerBody,
    {
        let base = BaseUrlLayer::new(&b.url)
            .map_err(|e| PolicyError::new(format!("url `{}`: {e}", b.url)))?;
        let svc = MapResponse::new(
            MapErr::new(base.layer(client), Into::<BoxError>::into),
            box_response::<ResB>,
        );
        let learned = RateLimitConfig::default();
        let limits = b
            .rate_limit
            .as_ref()
            .or(self.rate_limit.as_ref())
            .unwrap_or(&learned);
        let mut layers = BackendLayers {
            name: name.to_owned(),
            rate_limit: None,
            tokens: None,
        };
        let svc = match (limits.tokens.is_some() || limits.learns())
            .then(|| tpm_layer(name, limits, body_limit, shared))
        {
            Some(tpm) => Either::Left(MapResponse::new(
                {
                    layers.tokens = Some(tpm.clone());
                    tpm
                }
                .layer(MapRequest::new(svc, box_request::<ReplayBody>)),
                box_response::<TpmBody<BoxBody>>,
            )),
            None => Either::Right(svc),
        };
        let svc = match (limits.requests.is_some() || limits.learns())
            .then(|| rate_limit_layer(name, limits, shared))
        {
            Some(limit) => {
                layers.rate_limit = Some(limit.clone());
                Either::Left(limit.layer(svc))
            }
            None => Either::Right(svc),
        };
        let svc = match self.retry.as_ref().map(|r| retry_layer(r, body_limit)) {
            Some(retry) => Either::Left(MapResponse::new(
                retry.layer(MapRequest::new(svc, box_request::<RequestBody<BoxBody>>)),
                box_response::<RetryBody<BoxBody>>,
            )),
            None => Either::Right(svc),
        };
        Ok((MapRequest::new(svc, box_request::<ReplayBody>), layers))
    }
}

/// One backend's limiter and budget as a policy built them (see
/// [`Policy::build_observed`]): clones of the layers in the stack, sharing their state.
#[derive(Clone, Debug)]
pub struct BackendLayers {
    /// The backend's name.
    pub name: String,
    /// Its requests limiter, when it has one (stated or learned).
    pub rate_limit: Option<RateLimitLayer>,
    /// Its token budget, when it has one (stated or learned).
    pub tokens: Option<TpmLayer>,
}

fn header(backend: &str, k: &str, v: &str) -> Result<(HeaderName, HeaderValue), PolicyError> {
    let name = HeaderName::from_bytes(k.as_bytes());
    let value = HeaderValue::from_str(v);
    match (name, value) {
        (Ok(n), Ok(mut v)) => {
            if n == AUTHORIZATION {
                v.set_sensitive(true);
            }
            Ok((n, v))
        }
        _ => Err(PolicyError::new(format!(
            "backend `{backend}`: header `{k}` is not a valid header"
        ))),
    }
}

pub(super) const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(30);

/// A meter as the policy states it: its quota (learned too when `learn` is on), or none
/// (learned), keyed and adaptive as asked.
fn meter<Q: MeterQuota>(name: String, quota: Option<Q>, p: &RateLimitConfig) -> Meter<Q> {
    let mut meter = match quota {
        Some(q) if p.learns() => Meter::new(name, q).learn(),
        Some(q) => Meter::new(name, q),
        None => Meter::learned(name),
    };
    if let Some(key) = &p.key {
        meter = meter.keyed_by(key.extractor());
    }
    if p.adaptive {
        meter = meter.adaptive();
    }
    meter
}

/// Refuse, or wait up to the policy's `max_wait` with its queue bound.
fn mode(p: &RateLimitConfig) -> Mode {
    let mode = match p.mode {
        LimitMode::Refuse => Mode::Refuse,
        LimitMode::Wait => Mode::Refuse.wait(p.max_wait.map_or(DEFAULT_MAX_WAIT, |d| d.0)),
    };
    p.max_queue.map_or(mode, |n| mode.max_queue(n))
}

fn rate_limit_layer(
    backend: &str,
    p: &RateLimitConfig,
    shared: Option<&SharedStore>,
) -> RateLimitLayer {
    // Named by backend: each backend's quota is its own, in Redis too.
    let quota = p.requests.map(|r| {
        let count = u32::try_from(r.count).unwrap_or(u32::MAX);
        Quota::per(count, r.per).burst(p.burst.unwrap_or(count))
    });
    let limit = meter(format!("{backend}:requests"), quota, p);
    let mut builder = RateLimitLayer::builder()
        .limit(limit)
        .mode(mode(p))
        .reserve(p.reserve.unwrap_or(0));
    if let Some(every) = p.housekeeping {
        builder = builder.housekeeping(Some(every.0));
    }
    // A shared store holds a stated quota; one still to be learned is learned by each
    // instance in process (a store asked for "no bound" would bound nothing).
    if let (Some(store), Some(_)) = (shared, p.requests) {
        builder = store.rate(builder);
    }
    builder.build()
}

fn tpm_layer(
    backend: &str,
    p: &RateLimitConfig,
    body_limit: usize,
    shared: Option<&SharedStore>,
) -> TpmLayer {
    let quota = p.tokens.map(|t| TokenQuota::per(t.count, t.per));
    let budget = meter(format!("{backend}:tokens"), quota, p);
    let mut builder = TpmLayer::builder()
        .budget(budget)
        .body_limit(body_limit)
        .mode(mode(p));
    if let Some(every) = p.housekeeping {
        builder = builder.housekeeping(Some(every.0));
    }
    if let (Some(store), Some(_)) = (shared, p.tokens) {
        builder = store.tokens(builder);
    }
    builder.build()
}

fn retry_layer(p: &RetryConfig, body_limit: usize) -> RetryLayer {
    let d = Backoff::default();
    let backoff = Backoff {
        base: p.backoff.map_or(d.base, |x| x.0),
        factor: p.factor.unwrap_or(d.factor),
        cap: p.max_backoff.map_or(d.cap, |x| x.0),
        jitter: match p.jitter {
            JitterSpec::Full => Jitter::Full,
            JitterSpec::Decorrelated => Jitter::Decorrelated,
            JitterSpec::None => Jitter::None,
        },
    };
    let mut b = RetryLayer::builder()
        .backoff(backoff)
        .body_limit(body_limit)
        .deadline(p.deadline.map(|d| d.0));
    if let Some(n) = p.max_retries {
        b = b.max_retries(n);
    }
    if let Some(w) = p.max_server_wait {
        b = b.max_server_wait(w.0);
    }
    b.build()
}

fn cache_layer(p: &CacheConfig, body_limit: usize, shared: Option<&SharedStore>) -> CacheLayer {
    let mut b = CacheLayer::builder()
        .body_limit(body_limit)
        .deterministic_only(p.deterministic_only);
    if let Some(ttl) = p.ttl {
        b = b.ttl(ttl.0);
    }
    if let Some(size) = p.max_size {
        b = b.max_bytes(size.0);
    }
    if let Some(fields) = &p.exclude {
        b = b.key_rules(
            fields
                .iter()
                .fold(KeyRules::none(), |rules, f| rules.exclude(f.clone())),
        );
    }
    if let Some(store) = shared {
        b = store.cache(b);
    }
    match &p.partition {
        Some(Partition::Shared) => b = b.shared_across_tenants(),
        Some(Partition::By(key)) => b = b.partition_by(key.extractor()),
        None => {}
    }
    b.build()
}

/// The shared store a policy names, ready to hand to each layer.
#[cfg(feature = "redis")]
struct SharedStore {
    redis: tollgate_redis::RedisStore,
    pooled: Option<tollgate_redis::PooledStore>,
    on_failure: tollgate_core::store::OnStoreFailure,
}

#[cfg(feature = "redis")]
impl SharedStore {
    fn rate(
        &self,
        b: tollgate_ratelimit::RateLimitBuilder,
    ) -> tollgate_ratelimit::RateLimitBuilder {
        match &self.pooled {
            Some(p) => b.store(p.clone(), self.on_failure),
            None => b.store(self.redis.clone(), self.on_failure),
        }
    }
    fn tokens(&self, b: tollgate_tpm::TpmBuilder) -> tollgate_tpm::TpmBuilder {
        match &self.pooled {
            Some(p) => b.store(p.clone(), self.on_failure),
            None => b.store(self.redis.clone(), self.on_failure),
        }
    }
    fn cache(&self, b: tollgate_cache::CacheBuilder) -> tollgate_cache::CacheBuilder {
        b.store(self.redis.clone())
    }
}

#[cfg(feature = "redis")]
impl super::RedisConfig {
    /// The Redis store this section names (its namespace and timeout set), and what a
    /// layer does when it cannot answer. Connects lazily, on the first call.
    pub fn open(
        &self,
    ) -> Result<
        (
            tollgate_redis::RedisStore,
            tollgate_core::store::OnStoreFailure,
        ),
        PolicyError,
    > {
        use tollgate_core::store::OnStoreFailure;
        let mut redis = tollgate_redis::RedisStore::open(&self.url)
            .map_err(|e| PolicyError::new(format!("store `{}`: {e}", self.url)))?;
        if let Some(ns) = &self.namespace {
            redis = redis.namespace(ns);
        }
        if let Some(t) = self.timeout {
            redis = redis.timeout(t.0);
        }
        let on_failure = match self.on_failure {
            super::FailureMode::Closed => OnStoreFailure::Closed,
            super::FailureMode::Open => OnStoreFailure::Open {
                instances: self.instances.unwrap_or(1),
            },
        };
        Ok((redis, on_failure))
    }
}

#[cfg(feature = "redis")]
fn shared_store(store: &Store) -> Result<Option<SharedStore>, PolicyError> {
    let Store::Redis(r) = store else {
        return Ok(None);
    };
    let (redis, on_failure) = r.open()?;
    let pooled = r
        .pooled
        .then(|| tollgate_redis::PooledStore::new(redis.clone()));
    Ok(Some(SharedStore {
        redis,
        pooled,
        on_failure,
    }))
}

/// Without the `redis` feature there is no shared store to hand out.
#[cfg(not(feature = "redis"))]
enum SharedStore {}

#[cfg(not(feature = "redis"))]
impl SharedStore {
    fn rate(
        &self,
        _: tollgate_ratelimit::RateLimitBuilder,
    ) -> tollgate_ratelimit::RateLimitBuilder {
        match *self {}
    }
    fn tokens(&self, _: tollgate_tpm::TpmBuilder) -> tollgate_tpm::TpmBuilder {
        match *self {}
    }
    fn cache(&self, _: tollgate_cache::CacheBuilder) -> tollgate_cache::CacheBuilder {
        match *self {}
    }
}

#[cfg(not(feature = "redis"))]
fn shared_store(store: &Store) -> Result<Option<SharedStore>, PolicyError> {
    match store {
        Store::Memory => Ok(None),
        Store::Redis(r) => Err(PolicyError::new(format!(
            "store `{}`: this build of tollgate has no `redis` feature",
            r.url
        ))),
    }
}
