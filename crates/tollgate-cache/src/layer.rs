//! [`CacheLayer`] and the [`Cache`] service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_TYPE};
use http::{HeaderMap, Request, Response};
use serde_json::Value;
use tollgate_core::body::{AnswerBody, CallerBody};
use tollgate_core::clock::{Clock, SharedClock};
use tollgate_core::duration::parse_go_duration;
use tollgate_core::facts::{buffer_with_facts, ReplayBody, RequestFacts, DEFAULT_BODY_LIMIT};
use tollgate_core::key::{ApiKey, Header, KeyExtractor, RequestHead};
use tollgate_core::BoxError;
use tower::{Layer, Service};

use crate::body::{CacheBody, Recording};
use crate::flight::{Joined, SingleFlight};
use crate::key::KeyRules;
use crate::store::{CacheStore, MemoryStore, Stored};

/// `x-tollgate-cache`: `hit`, `miss` or `bypass`, on every answer through the cache.
pub const X_TOLLGATE_CACHE: HeaderName = HeaderName::from_static("x-tollgate-cache");
/// `x-tollgate-cache-ttl`: a request's own TTL (`30s`, `5m`, or seconds), at most the
/// longest TTL the layer is configured with.
pub const X_TOLLGATE_CACHE_TTL: HeaderName = HeaderName::from_static("x-tollgate-cache-ttl");

struct Config {
    store: Arc<dyn CacheStore>,
    flights: SingleFlight<Arc<Stored>>,
    rules: KeyRules,
    partition: Option<Arc<dyn KeyExtractor>>,
    ttl: Duration,
    ttl_for_model: Vec<(String, Duration)>,
    ttl_for_path: Vec<(String, Duration)>,
    max_ttl: Duration,
    max_entry_bytes: usize,
    max_request_bytes: usize,
    body_limit: usize,
    deterministic_only: bool,
}

/// Answers identical requests from a cache; see the [crate docs](crate). Every service it
/// makes shares one store and one set of flights.
#[derive(Clone)]
pub struct CacheLayer {
    config: Arc<Config>,
}

impl fmt::Debug for CacheLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheLayer")
            .field("ttl", &self.config.ttl)
            .field("partitioned", &self.config.partition.is_some())
            .finish_non_exhaustive()
    }
}

impl CacheLayer {
    /// A cache with the defaults: 10-minute TTL, 256 MiB, partitioned by tenant
    /// (`x-tenant-id`) or API key, every 2xx answer cached.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder.
    pub fn builder() -> CacheBuilder {
        CacheBuilder {
            store: None,
            rules: KeyRules::default(),
            partition: Some(Arc::new(Header::new("x-tenant-id").or(ApiKey))),
            ttl: Duration::from_secs(600),
            ttl_for_model: Vec::new(),
            ttl_for_path: Vec::new(),
            max_bytes: 256 * 1024 * 1024,
            max_entry_bytes: 4 * 1024 * 1024,
            max_request_bytes: 1024 * 1024,
            body_limit: DEFAULT_BODY_LIMIT,
            deterministic_only: false,
            clock: SharedClock::default(),
        }
    }
}

impl Default for CacheLayer {
    fn default() -> Self {
        Self::new()
    }
}

/// Builds a [`CacheLayer`].
pub struct CacheBuilder {
    store: Option<Arc<dyn CacheStore>>,
    rules: KeyRules,
    partition: Option<Arc<dyn KeyExtractor>>,
    ttl: Duration,
    ttl_for_model: Vec<(String, Duration)>,
    ttl_for_path: Vec<(String, Duration)>,
    max_bytes: u64,
    max_entry_bytes: usize,
    max_request_bytes: usize,
    body_limit: usize,
    deterministic_only: bool,
    clock: SharedClock,
}

impl fmt::Debug for CacheBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl CacheBuilder {
    /// How long answers are kept (10 minutes by default).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long answers from models whose name starts with `prefix` are kept (the longest
    /// matching prefix wins).
    pub fn ttl_for_model(mut self, prefix: impl Into<String>, ttl: Duration) -> Self {
        self.ttl_for_model.push((prefix.into(), ttl));
        self
    }

    /// How long answers to requests whose path starts with `prefix` are kept (the longest
    /// matching prefix wins; a model rule wins over a path rule).
    pub fn ttl_for_path(mut self, prefix: impl Into<String>, ttl: Duration) -> Self {
        self.ttl_for_path.push((prefix.into(), ttl));
        self
    }

    /// The most bytes the in-memory store holds (256 MiB by default).
    pub fn max_bytes(mut self, n: u64) -> Self {
        self.max_bytes = n;
        self
    }

    /// Answers larger than this are passed on but not stored (4 MiB by default).
    pub fn max_entry_bytes(mut self, n: usize) -> Self {
        self.max_entry_bytes = n;
        self
    }

    /// Requests with bodies larger than this are passed on but never cached, so the work
    /// of hashing stays bounded (1 MiB by default).
    pub fn max_request_bytes(mut self, n: usize) -> Self {
        self.max_request_bytes = n;
        self
    }

    /// Request bodies larger than this are refused with 413 (10 MiB by default).
    pub fn body_limit(mut self, n: usize) -> Self {
        self.body_limit = n;
        self
    }

    /// What makes two requests the same question.
    pub fn key_rules(mut self, rules: KeyRules) -> Self {
        self.rules = rules;
        self
    }

    /// Whose cache a request reads and writes (by default the tenant header `x-tenant-id`,
    /// else the hashed API key; requests with neither share one `anonymous` partition).
    pub fn partition_by(mut self, extractor: impl KeyExtractor) -> Self {
        self.partition = Some(Arc::new(extractor));
        self
    }

    /// One cache for everyone: a tenant may receive an answer first given to another.
    /// Only for data that is not private to anyone.
    pub fn shared_across_tenants(mut self) -> Self {
        self.partition = None;
        self
    }

    /// Caches only requests whose answer is meant to be repeatable: `temperature: 0`, or a
    /// `seed`. Off by default: an answer is a valid answer to the same question however it
    /// was sampled, and FAQ-style traffic gains most from caching; turn it on when callers
    /// expect variety from repeated questions.
    pub fn deterministic_only(mut self, yes: bool) -> Self {
        self.deterministic_only = yes;
        self
    }

    /// Another store (a Redis one, say) instead of the in-memory one.
    pub fn store(mut self, store: impl CacheStore) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// The clock TTLs are kept by.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = SharedClock::new(clock);
        self
    }

    /// The layer.
    pub fn build(self) -> CacheLayer {
        let max_ttl = self
            .ttl_for_model
            .iter()
            .chain(&self.ttl_for_path)
            .map(|(_, t)| *t)
            .chain([self.ttl])
            .max()
            .unwrap_or(self.ttl);
        let store = self
            .store
            .unwrap_or_else(|| Arc::new(MemoryStore::new(self.max_bytes, self.clock.clone())));
        CacheLayer {
            config: Arc::new(Config {
                store,
                flights: SingleFlight::new(),
                rules: self.rules,
                partition: self.partition,
                ttl: self.ttl,
                ttl_for_model: self.ttl_for_model,
                ttl_for_path: self.ttl_for_path,
                max_ttl,
                max_entry_bytes: self.max_entry_bytes,
                max_request_bytes: self.max_request_bytes,
                body_limit: self.body_limit,
                deterministic_only: self.deterministic_only,
            }),
        }
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = Cache<S>;
    fn layer(&self, inner: S) -> Cache<S> {
        Cache {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}

/// The caching service. See the [crate docs](crate).
#[derive(Clone)]
pub struct Cache<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> Cache<S> {
    tollgate_core::inner_service_accessors!();
}

impl<S: fmt::Debug> fmt::Debug for Cache<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// The future of [`Cache`]: boxed, since it buffers, hashes, looks up, may wait for another
/// request's answer, and may call upstream.
pub type ResponseFuture<B> =
    Pin<Box<dyn Future<Output = Result<Response<CacheBody<B>>, BoxError>> + Send>>;

fn wants_no_cache(h: &HeaderMap) -> bool {
    h.get_all(CACHE_CONTROL).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|d| {
                let d = d.trim();
                d.eq_ignore_ascii_case("no-cache") || d.eq_ignore_ascii_case("no-store")
            })
        })
    })
}

fn deterministic(facts: &RequestFacts) -> bool {
    let Some(obj) = facts.json().and_then(Value::as_object) else {
        return false;
    };
    obj.get("temperature").and_then(Value::as_f64) == Some(0.0)
        || obj.get("seed").is_some_and(|s| !s.is_null())
}

fn labelled<B>(mut res: Response<B>, what: &'static str) -> Response<B> {
    res.headers_mut()
        .insert(X_TOLLGATE_CACHE, HeaderValue::from_static(what));
    metrics::counter!("tollgate_cache_requests_total", "result" => what).increment(1);
    res
}

fn replay<B>(stored: &Stored) -> Response<CacheBody<B>> {
    let mut res = Response::new(crate::body::replay(stored));
    *res.status_mut() = stored.status;
    *res.headers_mut() = stored.headers.clone();
    labelled(res, "hit")
}

impl Config {
    fn ttl_for(&self, facts: &RequestFacts, path: &str, headers: &HeaderMap) -> Duration {
        if let Some(asked) = headers
            .get(X_TOLLGATE_CACHE_TTL)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                parse_go_duration(v)
                    .or_else(|| v.trim().parse::<u64>().ok().map(Duration::from_secs))
            })
        {
            return asked.min(self.max_ttl);
        }
        facts
            .model()
            .and_then(|m| {
                self.ttl_for_model
                    .iter()
                    .filter(|(p, _)| m.starts_with(p.as_str()))
                    .max_by_key(|(p, _)| p.len())
            })
            .or_else(|| {
                self.ttl_for_path
                    .iter()
                    .filter(|(p, _)| path.starts_with(p.as_str()))
                    .max_by_key(|(p, _)| p.len())
            })
            .map_or(self.ttl, |(_, t)| *t)
    }
}

impl<S, B, ResB> Service<Request<B>> for Cache<S>
where
    S: Service<Request<ReplayBody>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: CallerBody,
    ResB: AnswerBody,
{
    type Response = Response<CacheBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let config = Arc::clone(&self.config);
        let mut svc = tollgate_core::service::take_ready(&mut self.inner);
        Box::pin(async move {
            let bypass_asked = wants_no_cache(req.headers());
            let (req, facts) = buffer_with_facts(req, config.body_limit).await?;
            let too_big = facts.body().len() > config.max_request_bytes;
            if bypass_asked || too_big || (config.deterministic_only && !deterministic(&facts)) {
                let res = svc.call(req).await.map_err(Into::into)?;
                let (parts, body) = res.into_parts();
                return Ok(labelled(
                    Response::from_parts(parts, crate::body::pass(body)),
                    "bypass",
                ));
            }
            let partition = match &config.partition {
                None => "shared".to_owned(),
                Some(p) => p
                    .extract(&RequestHead::new(&req))
                    .map_or_else(|| "anonymous".to_owned(), |k| k.to_string()),
            };
            let key = config
                .rules
                .key(req.method(), req.uri().path(), &partition, &facts);
            let cached = match config.store.get_now(&key) {
                Some(now) => now,
                None => config.store.get(&key).await,
            };
            if let Some(hit) = cached {
                return Ok(replay(&hit));
            }
            let leader = match config.flights.join(key).await {
                Joined::Done(stored) => return Ok(replay(&stored)),
                Joined::Leader(leader) => leader,
            };
            // A flight may have landed between the lookup and the join.
            let cached = match config.store.get_now(&key) {
                Some(now) => now,
                None => config.store.get(&key).await,
            };
            if let Some(hit) = cached {
                leader.complete(Arc::clone(&hit));
                return Ok(replay(&hit));
            }
            let ttl = config.ttl_for(&facts, req.uri().path(), req.headers());
            // An error drops the leader, abandoning the flight: a waiter takes over.
            let res = svc.call(req).await.map_err(Into::into)?;
            let (parts, body) = res.into_parts();
            let body = if parts.status.is_success() {
                // Sized for the two it may hold: a map grown from empty reserves room for
                // six, and an entry keeps that room (about 0.5 KiB) for its TTL.
                let mut headers = HeaderMap::with_capacity(2);
                for name in [CONTENT_TYPE, CONTENT_ENCODING] {
                    // Copied, not cloned: a value hyper parsed is a slice of its read
                    // buffer, and an entry holding it would keep that whole buffer (KiBs)
                    // alive for its TTL while the cache counts a few bytes.
                    let copy = parts
                        .headers
                        .get(&name)
                        .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok());
                    if let Some(v) = copy {
                        headers.insert(name, v);
                    }
                }
                crate::body::record(
                    body,
                    Recording {
                        key,
                        status: parts.status,
                        headers,
                        stream: facts.is_stream(),
                        ttl,
                        max_bytes: config.max_entry_bytes,
                        store: Arc::clone(&config.store),
                        leader: Some(leader),
                        frames: Vec::new(),
                        size: 0,
                        too_big: false,
                    },
                )
            } else {
                // Errors, 429s and other non-2xx answers are never stored.
                leader.abandon();
                crate::body::pass(body)
            };
            Ok(labelled(Response::from_parts(parts, body), "miss"))
        })
    }
}
