//! What the gateway serves: its routes, the request path through them, and the loaded
//! config that a reload swaps whole.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::Router;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use metrics_exporter_prometheus::PrometheusHandle;
use tollgate::policy::{BoxBody, Policy, PolicyError, PolicyService, Store};
use tollgate_core::body::Watched;
use tollgate_core::facts::{buffer_with_facts, ApiKind, ReplayBody};
use tollgate_core::response::{error_response, openai_error};
use tollgate_core::usage::{UsageReport, UsageScanner};
use tollgate_core::wait::WaitReport;
use tollgate_core::BoxError;
use tower::{Layer, ServiceExt};

use crate::access::{AccessLog, Entry};
use crate::config::Config;
use crate::stats::{Recent, Stats};
use crate::tenants::{bearer, sha256, Denied, Shared, Tenant, Tenants};
use crate::upstream::{Trace, Upstream, UpstreamTimeout};

/// One model's stack.
struct Route {
    /// The name in `models` (an alias's route carries its model's name).
    name: String,
    policy: Policy,
    svc: PolicyService<ReplayBody>,
    /// Each backend's limiter and budget, for the dashboard.
    layers: Vec<tollgate::policy::BackendLayers>,
    /// Its embeddings batching, unless the config turns it off for this model.
    batch: Option<tollgate_batch::BatchLayer>,
}

/// A config, built.
pub(crate) struct Loaded {
    pub(crate) config: Config,
    pub(crate) tenants: Tenants,
    /// By every name a client may send: models and aliases.
    routes: HashMap<String, Arc<Route>>,
    upstream: Upstream,
    admin_key: Option<[u8; 32]>,
    /// The Redis stores to ask for readiness.
    stores: Vec<tollgate_redis::RedisStore>,
    created: u64,
    /// Background jobs, when configured.
    pub(crate) jobs: Option<Arc<crate::jobs::Jobs>>,
}

impl Loaded {
    /// Builds `config`, reusing from `old` every model stack and tenant whose config did
    /// not change, so that their quotas, caches, health and requests in flight carry over.
    pub(crate) fn build(config: Config, old: Option<&Loaded>) -> Result<Self, PolicyError> {
        let timeout = config
            .timeouts
            .upstream
            .map_or(std::time::Duration::from_secs(300), |d| d.0);
        let upstream = match old {
            Some(o) if o.config.timeouts.upstream == config.timeouts.upstream => o.upstream.clone(),
            _ => Upstream::new(timeout),
        };
        let shared = Shared::open(&config.store)?;
        let mut routes: HashMap<String, Arc<Route>> = HashMap::new();
        let mut stores = Vec::new();
        for (name, policy) in &config.models {
            let policy = resolved(name, policy, &config);
            if let Store::Redis(r) = &policy.store {
                let (store, _) = r.open().map_err(|e| e.context(&format!("models.{name}")))?;
                stores.push(store);
            }
            let reused = old
                .and_then(|o| o.routes.get(name))
                .filter(|r| r.name == *name && r.policy == policy && !reads_env(&policy));
            let route = match reused {
                Some(r) => Arc::clone(r),
                None => {
                    let (svc, layers) = policy
                        .build_observed::<_, _, ReplayBody>(upstream.clone())
                        .map_err(|e| e.context(&format!("models.{name}")))?;
                    Arc::new(Route {
                        name: name.clone(),
                        batch: config.batching.layer_for(name),
                        policy,
                        svc,
                        layers,
                    })
                }
            };
            routes.insert(name.clone(), route);
        }
        for (alias, target) in &config.aliases {
            if let Some(r) = routes.get(target).cloned() {
                routes.insert(alias.clone(), r);
            }
        }
        if let Store::Redis(r) = &config.store {
            stores.push(r.open()?.0);
        }
        let tenants = Tenants::build(&config, old.map(|o| &o.tenants), shared.as_ref())?;
        let admin_key = match &config.admin_key_env {
            Some(var) => {
                let key = std::env::var(var)
                    .ok()
                    .filter(|k| !k.is_empty())
                    .ok_or_else(|| {
                        PolicyError::new(format!("admin_key_env: `{var}` is not set"))
                    })?;
                Some(sha256(key.as_bytes()))
            }
            None => None,
        };
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // One store per file: a reload that keeps the path keeps the open store (a file
        // is opened once per process).
        let jobs = match (&config.jobs, old.and_then(|o| o.jobs.as_ref())) {
            (None, _) => None,
            (Some(j), Some(old))
                if old.path == j.path && old.shared.0 == j.store && old.shared.1 == j.namespace =>
            {
                Some(Arc::clone(old))
            }
            (Some(j), _) => Some(Arc::new(crate::jobs::Jobs::open(j)?)),
        };
        if let Some(r) = jobs.as_ref().and_then(|j| j.redis.clone()) {
            stores.push(r);
        }
        Ok(Self {
            config,
            tenants,
            routes,
            upstream,
            admin_key,
            stores,
            created,
            jobs,
        })
    }

    /// How many tenants and model names it serves.
    pub(crate) fn counts(&self) -> (usize, usize) {
        (self.tenants.len(), self.routes.len())
    }
}

/// A policy whose credentials come from the environment is built anew on each reload, so
/// that a rotated key is picked up.
fn reads_env(p: &Policy) -> bool {
    std::iter::once(&p.primary)
        .chain(&p.fallbacks)
        .any(|b| b.api_key_env.is_some())
}

/// `policy` as the gateway builds it: the gateway's store where the policy names none,
/// the gateway's body cap where it gives none, and backend names that say which model they
/// serve, so that two models' quotas never share a name (in Redis, in metrics).
pub(crate) fn resolved(model: &str, policy: &Policy, config: &Config) -> Policy {
    let mut p = policy.clone();
    if p.store == Store::Memory {
        p.store = config.store.clone();
    }
    if p.body_limit.is_none() {
        p.body_limit = Some(tollgate::policy::Size(config.body_limit() as u64));
    }
    if p.primary.name.is_none() {
        p.primary.name = Some(model.to_owned());
    }
    for (i, f) in p.fallbacks.iter_mut().enumerate() {
        if f.name.is_none() {
            f.name = Some(format!("{model}-fallback-{}", i + 1));
        }
    }
    if config.jobs.is_some() {
        // Jobs run at priority 0: keep a tenth of each stated burst for live traffic, so
        // that a live request finds the burst it would find without the jobs.
        let keep = |r: &mut tollgate::policy::RateLimitConfig| {
            if let (None, Some(rate)) = (r.reserve, r.requests) {
                let burst = r
                    .burst
                    .unwrap_or(u32::try_from(rate.count).unwrap_or(u32::MAX));
                r.reserve = Some(burst / 10);
            }
        };
        if let Some(r) = p.rate_limit.as_mut() {
            keep(r);
        }
        if let Some(r) = p.primary.rate_limit.as_mut() {
            keep(r);
        }
        for f in &mut p.fallbacks {
            if let Some(r) = f.rate_limit.as_mut() {
                keep(r);
            }
        }
    }
    p
}

/// The name a model's primary backend has in the gateway (see [`resolved`]).
pub(crate) fn primary_name(model: &str, policy: Option<&Policy>) -> String {
    policy
        .and_then(|p| p.primary.name.clone())
        .unwrap_or_else(|| model.to_owned())
}

/// The gateway's shared state.
pub(crate) struct Shared0 {
    pub(crate) stats: Stats,
    /// Becomes true when a shutdown begins: endless answers (the stats stream) end then,
    /// so that they do not hold the drain to its grace.
    pub(crate) stopping: tokio::sync::watch::Sender<bool>,
    /// The alerts firing now, as the evaluator last saw them.
    pub(crate) firing: std::sync::Mutex<Vec<serde_json::Value>>,
    pub(crate) loaded: ArcSwap<Loaded>,
    pub(crate) path: Option<PathBuf>,
    pub(crate) metrics: PrometheusHandle,
    /// One reload at a time.
    pub(crate) reloading: tokio::sync::Mutex<()>,
    /// Each tenant's standing in its cost budget, summed over every instance when the
    /// budget is kept in Redis: read once a second ([`refresh_spend`]).
    pub(crate) spend: std::sync::Mutex<HashMap<String, tollgate_cost::Standing>>,
}

type St = State<Arc<Shared0>>;

/// The budget a tenant's cost layer keeps, and the key it keeps it under.
fn budget_of(name: &str) -> (String, tollgate_core::key::Key) {
    (
        format!("tenant:{name}:budget"),
        tollgate_core::key::Key::global(),
    )
}

/// Reads the standing of every tenant whose cost budget is kept in Redis (one round trip
/// a tenant) into [`Shared0::spend`], for the dashboard and the alerts.
pub(crate) async fn refresh_spend(s: &Shared0) {
    let loaded = s.loaded.load_full();
    // Every tenant's read at once: they share one multiplexed connection, so a thousand
    // tenants cost about one round trip, not a thousand in a row.
    let reads = loaded.config.tenants.keys().filter_map(|name| {
        let cost = loaded
            .tenants
            .by_name(name)
            .and_then(|t| t.cost.clone())
            .filter(tollgate_cost::CostLayer::is_shared)?;
        Some(async move {
            let (budget, key) = budget_of(name);
            cost.standing_shared(&budget, &key)
                .await
                .map(|st| (name.clone(), st))
        })
    });
    let fresh: HashMap<String, tollgate_cost::Standing> = futures_util::future::join_all(reads)
        .await
        .into_iter()
        .flatten()
        .collect();
    if let Ok(mut spend) = s.spend.lock() {
        *spend = fresh;
    }
}

/// A tenant's standing in its cost budget: kept in Redis, the last read of every
/// instance's spend (this instance's own before the first read); in process, as it is now.
fn standing(s: &Shared0, loaded: &Loaded, name: &str) -> Option<tollgate_cost::Standing> {
    let tenant = loaded.tenants.by_name(name)?;
    let cost = tenant.cost.as_ref()?;
    if cost.is_shared() {
        if let Some(st) = s.spend.lock().ok().and_then(|m| m.get(name).copied()) {
            return Some(st);
        }
    }
    let (budget, key) = budget_of(name);
    cost.standing(&budget, &key)
}

pub(crate) fn router(state: Arc<Shared0>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(proxy))
        .route("/v1/completions", post(proxy))
        .route("/v1/embeddings", post(proxy))
        .route("/v1/responses", post(proxy))
        .route("/v1/messages", post(proxy))
        .route("/v1/models", get(models))
        .route("/v1/models/{model}", get(model))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/admin/reload", post(reload))
        .route(
            "/v1/files",
            post(upload_file).layer(axum::extract::DefaultBodyLimit::max(
                usize::try_from(crate::batches::MAX_FILE).unwrap_or(usize::MAX) + 64 * 1024,
            )),
        )
        .route("/v1/files/{id}", get(get_file).delete(delete_file))
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/batches", post(create_batch).get(list_batches))
        .route("/v1/batches/{id}", get(get_batch))
        .route("/v1/batches/{id}/cancel", post(cancel_batch))
        .route("/v1/responses/{id}", get(background_response))
        .route(
            "/v1/responses/{id}/cancel",
            post(cancel_background_response),
        )
        .route("/v1/jobs/{id}", get(job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/dashboard", get(dashboard))
        .route("/api/stats", get(api_stats))
        .route("/api/stats/stream", get(api_stats_stream))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

fn error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response<Body> {
    openai_error::<Body>(status, kind, code, message)
}

async fn not_found(req: Request<Body>) -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown_url",
        &format!("Invalid URL ({} {})", req.method(), req.uri().path()),
    )
}

async fn method_not_allowed(req: Request<Body>) -> Response<Body> {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        &format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

async fn healthz() -> Response<Body> {
    json(StatusCode::OK, serde_json::json!({"status": "ok"}))
}

async fn readyz(State(s): St) -> Response<Body> {
    let loaded = s.loaded.load_full();
    for store in &loaded.stores {
        if let Err(e) = store.ping().await {
            return json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "unavailable", "reason": format!("store: {e}")}),
            );
        }
    }
    json(StatusCode::OK, serde_json::json!({"status": "ready"}))
}

async fn metrics(State(s): St) -> Response<Body> {
    let mut res = Response::new(Body::from(s.metrics.render()));
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    res
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    let mut res = Response::new(Body::from(v.to_string()));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

fn model_object(name: &str, loaded: &Loaded) -> serde_json::Value {
    serde_json::json!({"id": name, "object": "model", "created": loaded.created, "owned_by": "tollgate"})
}

/// `GET /v1/models`: the names a tenant may send (every name for an open gateway).
async fn models(State(s): St, headers: HeaderMap) -> Response<Body> {
    let loaded = s.loaded.load_full();
    let tenant = match loaded.tenants.identify(&headers) {
        Ok(t) => t,
        Err(d) => return denied(d),
    };
    let mut names: Vec<&String> = loaded
        .routes
        .iter()
        .filter(|(_, r)| tenant.may_use(&r.name))
        .map(|(n, _)| n)
        .collect();
    names.sort();
    let data: Vec<_> = names.iter().map(|n| model_object(n, &loaded)).collect();
    json(
        StatusCode::OK,
        serde_json::json!({"object": "list", "data": data}),
    )
}

async fn model(State(s): St, Path(name): Path<String>, headers: HeaderMap) -> Response<Body> {
    let loaded = s.loaded.load_full();
    let tenant = match loaded.tenants.identify(&headers) {
        Ok(t) => t,
        Err(d) => return denied(d),
    };
    match loaded.routes.get(&name) {
        Some(r) if tenant.may_use(&r.name) => json(StatusCode::OK, model_object(&name, &loaded)),
        _ => no_model(&name),
    }
}

fn no_model(name: &str) -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "model_not_found",
        &format!("The model `{name}` does not exist or you do not have access to it."),
    )
}

fn denied(d: Denied) -> Response<Body> {
    let message = match d {
        Denied::Missing => "You didn't provide an API key. Send it as `Authorization: Bearer KEY`.",
        Denied::Unknown => "Incorrect API key provided.",
    };
    error(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        "invalid_api_key",
        message,
    )
}

/// `POST /admin/reload`: reads the config file again; behind the admin key.
async fn reload(State(s): St, headers: HeaderMap) -> Response<Body> {
    let loaded = s.loaded.load_full();
    let Some(admin) = loaded.admin_key else {
        return error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "unknown_url",
            "the admin endpoint is off: set `admin_key_env` in the config",
        );
    };
    use subtle::ConstantTimeEq;
    let given = bearer(&headers).map(|k| sha256(k.as_bytes()));
    if !given.is_some_and(|g| bool::from(g.ct_eq(&admin))) {
        return denied(Denied::Unknown);
    }
    match crate::reload(&s).await {
        Ok(()) => json(StatusCode::OK, serde_json::json!({"status": "reloaded"})),
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_config",
            &format!("the new config is refused, the old one keeps serving: {e}"),
        ),
    }
}

/// The dashboard and its data are behind the admin key when one is configured: as a
/// bearer token, or as the password of HTTP Basic auth (what a browser asks for and then
/// sends with every request of the page, its event stream included).
fn admin_guard(loaded: &Loaded, headers: &HeaderMap) -> Option<Response<Body>> {
    use base64::Engine;
    use subtle::ConstantTimeEq;
    let admin = loaded.admin_key?;
    let auth = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let given = match auth.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("basic") => {
            base64::engine::general_purpose::STANDARD
                .decode(rest.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.split_once(':').map(|(_, p)| p.to_owned()))
        }
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => {
            Some(rest.trim().to_owned())
        }
        _ => None,
    };
    if given.is_some_and(|k| bool::from(sha256(k.as_bytes()).ct_eq(&admin))) {
        return None;
    }
    let mut res = error(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        "invalid_api_key",
        "the dashboard needs the admin key",
    );
    res.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"tollgate\", charset=\"UTF-8\""),
    );
    Some(res)
}

const DASHBOARD: &str = include_str!("dashboard.html");

/// `GET /dashboard`: the live page (HTML, CSS and JS in one file, no build step).
async fn dashboard(State(s): St, headers: HeaderMap) -> Response<Body> {
    if let Some(res) = admin_guard(&s.loaded.load(), &headers) {
        return res;
    }
    let mut res = Response::new(Body::from(DASHBOARD));
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    res.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    res
}

/// Each tenant with a budget: the share of it spent in the window in force, in percent.
pub(crate) fn spend_percent(s: &Shared0, loaded: &Loaded) -> HashMap<String, f64> {
    loaded
        .config
        .tenants
        .keys()
        .filter_map(|name| {
            let st = standing(s, loaded, name)?;
            let budget = st.amount.nanos().max(1) as f64;
            Some((name.clone(), st.spent.nanos() as f64 * 100.0 / budget))
        })
        .collect()
}

fn stats_json(s: &Shared0) -> serde_json::Value {
    let loaded = s.loaded.load_full();
    let layers: HashMap<String, Vec<tollgate::policy::BackendLayers>> = loaded
        .config
        .models
        .keys()
        .filter_map(|m| loaded.routes.get(m).map(|r| (m.clone(), r.layers.clone())))
        .collect();
    let mut v = s
        .stats
        .snapshot(&loaded.config, &s.metrics.render(), &layers);
    // Each tenant's spend against its budget.
    if let Some(tenants) = v.get_mut("tenants").and_then(|t| t.as_array_mut()) {
        for t in tenants {
            let name = t["name"].as_str().unwrap_or_default().to_owned();
            if let Some(st) = standing(s, &loaded, &name) {
                t["spend"] = serde_json::json!({
                    "spent_usd": st.spent.as_dollars(),
                    "held_usd": st.held.as_dollars(),
                    "budget_usd": st.amount.as_dollars(),
                    "resets_in_s": st.resets_in.as_secs(),
                });
            }
        }
    }
    let firing = s.firing.lock().map(|f| f.clone()).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("alerts".into(), serde_json::Value::Array(firing));
    }
    v
}

/// `GET /api/stats`: what the page shows, as JSON.
async fn api_stats(State(s): St, headers: HeaderMap) -> Response<Body> {
    if let Some(res) = admin_guard(&s.loaded.load(), &headers) {
        return res;
    }
    json(StatusCode::OK, stats_json(&s))
}

/// `GET /api/stats/stream`: the same, as server-sent events once a second.
async fn api_stats_stream(State(s): St, headers: HeaderMap) -> Response<Body> {
    if let Some(res) = admin_guard(&s.loaded.load(), &headers) {
        return res;
    }
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let stopping = s.stopping.subscribe();
    let events = futures_util::stream::unfold(
        (s, tick, stopping),
        |(s, mut tick, mut stopping)| async move {
            if *stopping.borrow() {
                return None;
            }
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopping.changed() => return None,
            }
            let event = format!("event: stats\ndata: {}\n\n", stats_json(&s));
            Some((
                Ok::<_, std::convert::Infallible>(event),
                (s, tick, stopping),
            ))
        },
    );
    let mut res = Response::new(Body::from_stream(events));
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    res.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    res
}

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static TENANT: HeaderName = HeaderName::from_static("x-tenant-id");

/// 128 random bits in hex, for the ids the gateway makes (requests, jobs, files,
/// webhook messages): unique, not secret.
pub(crate) fn random_hex() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// The caller's request id when it is a sane one, or a new one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| format!("req_{}", random_hex()), str::to_owned)
}

/// The request headers a provider must not see: the caller's credentials in every
/// provider's spelling (the backend's own replace them), what names the gateway's
/// connection, and compression (usage is read from the answer as it passes). The last
/// hop (`Upstream`) drops the gateway's own `x-tollgate-*` headers and the caller's
/// network's (`forwarded`, `x-forwarded-*`) once every layer has read them.
const STRIPPED_REQUEST: &[&str] = &[
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "host",
    "connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "accept-encoding",
];

/// The hop-by-hop headers of an answer, which the gateway's own connection sets.
const STRIPPED_RESPONSE: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

fn operation(kind: ApiKind) -> &'static str {
    match kind {
        ApiKind::Completions => "text_completion",
        ApiKind::Embeddings => "embeddings",
        ApiKind::GeminiGenerate => "generate_content",
        _ => "chat",
    }
}

/// The model endpoints: who is calling, what they ask for, their limits, then the model's
/// stack.
async fn proxy(State(s): St, req: Request<Body>) -> Response<Body> {
    let start = Instant::now();
    let id = request_id(req.headers());
    let mut res = serve(&s, req, start, &id, Caller::Live).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(REQUEST_ID.clone(), v);
    }
    res
}

/// A response the gateway gives itself, logged and counted as such. `started`: the
/// request had entered the model's stack (and counts as in flight until now).
fn refused(
    s: &Shared0,
    res: Response<Body>,
    who: (&str, &str),
    id: &str,
    start: Instant,
    started: bool,
) -> Response<Body> {
    let (tenant, model) = who;
    let status = res.status().as_u16();
    let latency_ms = start.elapsed().as_millis() as u64;
    tracing::info!(
        target: "tollgate::access",
        request_id = %id,
        tenant,
        model,
        status,
        latency_ms,
        outcome = "refused",
        "request"
    );
    metrics::counter!(
        "tollgate_gateway_requests_total",
        "model" => model.to_owned(),
        "tenant" => tenant.to_owned(),
        "status" => status.to_string()
    )
    .increment(1);
    let recent = Recent {
        at_ms: Stats::now_ms(),
        request_id: id.to_owned(),
        tenant: tenant.to_owned(),
        model: model.to_owned(),
        backend: None,
        cache: None,
        retries: 0,
        input_tokens: None,
        output_tokens: None,
        status,
        latency_ms,
        outcome: "refused",
    };
    if started && status == 429 {
        // The model's own limits refused it: limited until the time it gave.
        let wait = tollgate_core::headers::retry_after(res.headers(), std::time::SystemTime::now())
            .unwrap_or(std::time::Duration::from_secs(1));
        let now = tokio::time::Instant::now();
        s.stats
            .limited(&recent.model, now, crate::stats::until(now, wait), None);
    }
    s.stats.refused(recent, status == 429, started);
    res
}

/// Who a request comes from.
pub(crate) enum Caller {
    /// A client: who it is, its key says.
    Live,
    /// A background job of this tenant, run by a worker.
    Job(Arc<Tenant>),
}

pub(crate) async fn serve(
    s: &Shared0,
    req: Request<Body>,
    start: Instant,
    id: &str,
    caller: Caller,
) -> Response<Body> {
    let loaded = s.loaded.load_full();
    let (tenant, job) = match caller {
        Caller::Job(t) => (t, true),
        Caller::Live => match loaded.tenants.identify(req.headers()) {
            Ok(t) => (t, false),
            Err(d) => return refused(s, denied(d), ("-", "-"), id, start, false),
        },
    };
    let (req, facts) = match buffer_with_facts(req, loaded.config.body_limit()).await {
        Ok(r) => r,
        Err(e) => {
            return refused(
                s,
                e.to_response::<Body>(),
                (&tenant.name, "-"),
                id,
                start,
                false,
            )
        }
    };
    let Some(model) = facts.model().map(str::to_owned) else {
        let res = error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "missing_model",
            "you must provide a model parameter",
        );
        return refused(s, res, (&tenant.name, "-"), id, start, false);
    };
    let Some(route) = loaded.routes.get(&model).cloned() else {
        return refused(
            s,
            no_model(&model),
            (&tenant.name, &model),
            id,
            start,
            false,
        );
    };
    if !tenant.may_use(&route.name) {
        let res = error(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            "model_not_allowed",
            &format!("this key may not use the model `{model}`"),
        );
        return refused(s, res, (&tenant.name, &model), id, start, false);
    }
    if !job {
        if let Some(jobs) = &loaded.jobs {
            let callback = match crate::jobs::callback_url(req.headers()) {
                Ok(c) => c,
                Err(e) => {
                    let res = error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request_error",
                        "invalid_callback_url",
                        &e,
                    );
                    return refused(s, res, (&tenant.name, "-"), id, start, false);
                }
            };
            // The Responses API's own way: `background: true`. The gateway runs it in the
            // background itself, so the provider is asked without it.
            let background = facts.kind() == ApiKind::Responses
                && facts
                    .json()
                    .and_then(|v| v.get("background"))
                    .and_then(serde_json::Value::as_bool)
                    == Some(true);
            if background {
                let plain = facts.rewrite(|v| {
                    if let Some(o) = v.as_object_mut() {
                        o.remove("background");
                    }
                });
                let body = plain.as_ref().map_or(facts.body(), |f| f.body());
                return match jobs
                    .submit("resp", &tenant.name, req.uri().path(), body, callback)
                    .await
                {
                    Ok(job) => json(StatusCode::OK, crate::jobs::to_response_json(&job)),
                    Err(e) => job_store_down(&e),
                };
            }
            if crate::jobs::prefers_async(req.headers()) {
                return submit(jobs, &tenant, req.uri().path(), facts.body(), callback).await;
            }
        }
    }
    // Every answer's tokens are counted (the access log, the GenAI metrics): a stream
    // that did not ask for its usage chunk is asked, and the chunk is dropped again on the
    // way back, so the caller sees the stream it asked for.
    let (req, asked_usage) = match facts.with_usage_requested() {
        Some(asked) => {
            let (parts, _) = req.into_parts();
            (asked.into_request(parts), true)
        }
        None => (req, false),
    };
    s.stats.started(&route.name);
    let trace = Arc::new(Trace::for_model(s.stats.clone(), route.name.clone()));
    let stream = facts.is_stream();
    let op = operation(facts.kind());
    let (mut parts, body) = req.into_parts();
    for h in STRIPPED_REQUEST {
        parts.headers.remove(*h);
    }
    // The caller's HTTP version is its hop's: the provider's connection speaks what it
    // negotiated (an HTTP/2 request sent as such to an HTTP/1.1 provider fails).
    let inbound_version = std::mem::replace(&mut parts.version, http::Version::HTTP_11);
    if let Ok(v) = HeaderValue::from_str(id) {
        parts.headers.insert(REQUEST_ID.clone(), v);
    }
    // The tenant as the model's layers see it (the cache's partition, a keyed limit): the
    // authenticated name, never what the caller wrote. An open gateway's caller names
    // itself: an unconfigured name keeps its own partition.
    let named = !loaded.config.open || !tenant.is_anonymous();
    if let (true, Ok(v)) = (named, HeaderValue::from_str(&tenant.name)) {
        parts.headers.insert(TENANT.clone(), v);
    }
    // Background work waits behind every live request.
    parts.extensions.insert(if job {
        tollgate_core::wait::Priority(0)
    } else {
        tenant.priority
    });
    // Tenants share each model's quota by weight; a tenant's jobs are its own flow, so
    // they never take its live requests' turn.
    parts.extensions.insert(if job {
        tollgate_core::wait::Share::new(("job", &*tenant.name), tenant.share.weight())
    } else {
        tenant.share
    });
    parts.extensions.insert(Arc::clone(&trace));
    let report = Arc::new(UsageReport::default());
    parts.extensions.insert(Arc::clone(&report));
    let waits = Arc::new(WaitReport::default());
    parts.extensions.insert(Arc::clone(&waits));
    let req = Request::from_parts(parts, body);
    drop(facts);
    let answer = through_tenant(&tenant, &route, req).await;
    let head = start.elapsed();
    let res = match answer {
        Ok(res) => res,
        Err(e) => {
            let res = error_response::<Body>(&*e).unwrap_or_else(|| upstream_error(&*e));
            return refused(s, res, (&tenant.name, &model), id, start, true);
        }
    };
    let (mut parts, body) = res.into_parts();
    parts.version = inbound_version;
    for h in STRIPPED_RESPONSE {
        parts.headers.remove(*h);
    }
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let entry = Entry {
        request_id: id.to_owned(),
        tenant: Arc::clone(&tenant.name),
        model,
        operation: op,
        stream,
        status: parts.status.as_u16(),
        backend: header("x-tollgate-backend"),
        cache: header("x-tollgate-cache"),
        start,
        head,
        trace,
        report,
        waits,
        stats: s.stats.clone(),
        primary: primary_name(&route.name, Some(&route.policy)),
        route: route.name.clone(),
    };
    let strip = asked_usage && tollgate_core::headers::is_event_stream(&parts.headers);
    if strip {
        parts.headers.remove(http::header::CONTENT_LENGTH);
    }
    let log = AccessLog::new(entry, UsageScanner::for_response(&parts.headers), strip);
    Response::from_parts(parts, Body::new(Watched::new(body, Some(log))))
}

/// `202 Accepted`: the request is stored, to be answered at `Location`.
async fn submit(
    jobs: &crate::jobs::Jobs,
    tenant: &Tenant,
    path: &str,
    body: &bytes::Bytes,
    callback: Option<String>,
) -> Response<Body> {
    match jobs.submit("job", &tenant.name, path, body, callback).await {
        Ok(job) => {
            let mut res = json(StatusCode::ACCEPTED, crate::jobs::to_json(&job));
            if let Ok(v) = HeaderValue::from_str(&format!("/v1/jobs/{}", job.id)) {
                res.headers_mut().insert(http::header::LOCATION, v);
            }
            res.headers_mut().insert(
                "preference-applied",
                HeaderValue::from_static("respond-async"),
            );
            res
        }
        Err(e) => job_store_down(&e),
    }
}

/// Who calls the Batch API, and the gateway's jobs.
type BatchCaller = (Arc<Loaded>, Arc<Tenant>, Arc<crate::jobs::Jobs>);

/// The caller and the gateway's jobs, for the Batch API; or the response to give.
// The error is the response itself, handed straight back by the handler: boxing it would
// only add an allocation to every refused call.
#[allow(clippy::result_large_err)]
fn batch_caller(s: &Shared0, headers: &HeaderMap) -> Result<BatchCaller, Response<Body>> {
    let loaded = s.loaded.load_full();
    let tenant = loaded.tenants.identify(headers).map_err(denied)?;
    let jobs = loaded.jobs.clone().ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "batches_off",
            "this gateway keeps no jobs: batches need `jobs:` in its config",
        )
    })?;
    Ok((loaded, tenant, jobs))
}

fn answered(r: Result<serde_json::Value, Response<Body>>) -> Response<Body> {
    match r {
        Ok(v) => json(StatusCode::OK, v),
        Err(res) => res,
    }
}

async fn upload_file(
    State(s): St,
    headers: HeaderMap,
    form: axum::extract::Multipart,
) -> Response<Body> {
    match batch_caller(&s, &headers) {
        Ok((_, tenant, jobs)) => answered(crate::batches::upload(&jobs, &tenant.name, form).await),
        Err(res) => res,
    }
}

async fn get_file(State(s): St, Path(id): Path<String>, headers: HeaderMap) -> Response<Body> {
    match batch_caller(&s, &headers) {
        Ok((_, tenant, jobs)) => answered(
            crate::batches::file(&jobs, &tenant.name, &id)
                .await
                .map(|(meta, _)| {
                    let mut m = meta;
                    if let Some(o) = m.as_object_mut() {
                        o.remove("tenant");
                    }
                    m
                }),
        ),
        Err(res) => res,
    }
}

async fn file_content(State(s): St, Path(id): Path<String>, headers: HeaderMap) -> Response<Body> {
    let (_, tenant, jobs) = match batch_caller(&s, &headers) {
        Ok(c) => c,
        Err(res) => return res,
    };
    match crate::batches::file(&jobs, &tenant.name, &id).await {
        Ok((_, path)) => crate::batches::content(&path).await.unwrap_or_else(|r| r),
        Err(res) => res,
    }
}

async fn delete_file(State(s): St, Path(id): Path<String>, headers: HeaderMap) -> Response<Body> {
    match batch_caller(&s, &headers) {
        Ok((_, tenant, jobs)) => answered(crate::batches::delete(&jobs, &tenant.name, &id).await),
        Err(res) => res,
    }
}

async fn create_batch(State(s): St, headers: HeaderMap, body: bytes::Bytes) -> Response<Body> {
    let (loaded, tenant, jobs) = match batch_caller(&s, &headers) {
        Ok(c) => c,
        Err(res) => return res,
    };
    let Ok(req) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_json",
            "the body is not JSON",
        );
    };
    answered(crate::batches::create(&jobs, &tenant, &loaded.config, &req).await)
}

async fn get_batch(State(s): St, Path(id): Path<String>, headers: HeaderMap) -> Response<Body> {
    match batch_caller(&s, &headers) {
        Ok((_, tenant, jobs)) => answered(crate::batches::retrieve(&jobs, &tenant.name, &id).await),
        Err(res) => res,
    }
}

async fn cancel_batch(State(s): St, Path(id): Path<String>, headers: HeaderMap) -> Response<Body> {
    match batch_caller(&s, &headers) {
        Ok((_, tenant, jobs)) => answered(crate::batches::cancel(&jobs, &tenant.name, &id).await),
        Err(res) => res,
    }
}

#[derive(serde::Deserialize)]
struct Page {
    limit: Option<usize>,
    after: Option<String>,
}

async fn list_batches(
    State(s): St,
    headers: HeaderMap,
    axum::extract::Query(page): axum::extract::Query<Page>,
) -> Response<Body> {
    match batch_caller(&s, &headers) {
        Ok((_, tenant, jobs)) => answered(
            crate::batches::list(
                &jobs,
                &tenant.name,
                page.limit.unwrap_or(20).clamp(1, 100),
                page.after.as_deref(),
            )
            .await,
        ),
        Err(res) => res,
    }
}

fn job_store_down(e: &str) -> Response<Body> {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "job_store_unavailable",
        &format!("the job could not be stored: {e}"),
    )
}

/// `GET /v1/responses/{id}`: a background response.
async fn background_response(
    State(s): St,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response<Body> {
    match caller_job(&s, &headers, &id).await {
        Ok((_, job)) if job.id.starts_with("resp_") => {
            json(StatusCode::OK, crate::jobs::to_response_json(&job))
        }
        Ok(_) => error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "response_not_found",
            &format!("No response found with id `{id}`."),
        ),
        Err(res) => res,
    }
}

/// `POST /v1/responses/{id}/cancel`.
async fn cancel_background_response(
    State(s): St,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response<Body> {
    let jobs = match caller_job(&s, &headers, &id).await {
        Ok((jobs, job)) if job.id.starts_with("resp_") => jobs,
        Ok(_) => {
            return error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "response_not_found",
                &format!("No response found with id `{id}`."),
            )
        }
        Err(res) => return res,
    };
    match jobs.store.cancel(&id, Stats::now_ms()).await {
        Ok(Some(job)) => json(StatusCode::OK, crate::jobs::to_response_json(&job)),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "response_not_found",
            "no such response",
        ),
        Err(e) => job_store_down(&e.to_string()),
    }
}

/// The caller's job of that id, or the response to give instead.
async fn caller_job(
    s: &Shared0,
    headers: &HeaderMap,
    id: &str,
) -> Result<(Arc<crate::jobs::Jobs>, tollgate_core::store::Job), Response<Body>> {
    let loaded = s.loaded.load_full();
    let tenant = loaded.tenants.identify(headers).map_err(denied)?;
    let not_found = || {
        error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "job_not_found",
            &format!("No job found with id `{id}`."),
        )
    };
    let jobs = loaded.jobs.clone().ok_or_else(not_found)?;
    match jobs.store.get(id).await {
        // Another tenant's job does not exist for this one.
        Ok(Some(job)) if job.tenant == *tenant.name => Ok((jobs, job)),
        Ok(_) => Err(not_found()),
        Err(e) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "job_store_unavailable",
            &e.to_string(),
        )),
    }
}

/// `GET /v1/jobs/{id}`.
async fn job(State(s): St, Path(id): Path<String>, headers: HeaderMap) -> Response<Body> {
    match caller_job(&s, &headers, &id).await {
        Ok((_, job)) => json(StatusCode::OK, crate::jobs::to_json(&job)),
        Err(res) => res,
    }
}

/// `POST /v1/jobs/{id}/cancel`.
async fn cancel_job(State(s): St, Path(id): Path<String>, headers: HeaderMap) -> Response<Body> {
    let (jobs, _) = match caller_job(&s, &headers, &id).await {
        Ok(j) => j,
        Err(res) => return res,
    };
    match jobs.store.cancel(&id, Stats::now_ms()).await {
        Ok(Some(job)) => json(StatusCode::OK, crate::jobs::to_json(&job)),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "job_not_found",
            "no such job",
        ),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "job_store_unavailable",
            &e.to_string(),
        ),
    }
}

/// An error from the model's stack that is not Tollgate's: the provider could not be
/// reached or did not answer in time.
fn upstream_error(e: &(dyn std::error::Error + 'static)) -> Response<Body> {
    let timed_out = tollgate_core::error::chain(e).any(|e| e.is::<UpstreamTimeout>());
    if timed_out {
        return error(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            "upstream_timeout",
            &e.to_string(),
        );
    }
    tracing::warn!(error = %e, "the provider could not be reached");
    error(
        StatusCode::BAD_GATEWAY,
        "server_error",
        "upstream_unreachable",
        &format!("the provider could not be reached: {e}"),
    )
}

type Answer = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Response<BoxBody>, BoxError>> + Send>,
>;

/// The tenant's requests in flight, then its cost budget, then its own limits (requests,
/// then tokens), then the model's stack.
fn through_tenant(tenant: &Arc<Tenant>, route: &Arc<Route>, req: Request<ReplayBody>) -> Answer {
    let Some(places) = &tenant.concurrency else {
        return through_cost(tenant, route, req);
    };
    let (t, r) = (Arc::clone(tenant), Arc::clone(route));
    around(places, move |req| through_cost(&t, &r, req), req)
}

fn through_cost(tenant: &Arc<Tenant>, route: &Arc<Route>, req: Request<ReplayBody>) -> Answer {
    let Some(cost) = &tenant.cost else {
        return through_limits(tenant, route, req);
    };
    let (t, r) = (Arc::clone(tenant), Arc::clone(route));
    around(cost, move |req| through_limits(&t, &r, req), req)
}

/// `layer` around the steps `inner` takes. Their errors pass through the layer wrapped in
/// a concrete type (a `BoxError` there trips rustc's higher-ranked `Send` check, as in
/// [`through_limits`]) and come out as they were.
fn around<L, F, B>(layer: &L, inner: F, req: Request<ReplayBody>) -> Answer
where
    F: Fn(Request<ReplayBody>) -> Answer + Clone + Send + 'static,
    L: tower::Layer<Steps<F>>,
    L::Service: tower::Service<Request<ReplayBody>, Response = Response<B>, Error = BoxError>
        + Send
        + 'static,
    <L::Service as tower::Service<Request<ReplayBody>>>::Future: Send,
    B: http_body::Body<Data = bytes::Bytes, Error = BoxError> + Send + 'static,
{
    use futures_util::TryFutureExt;
    Box::pin(
        layer
            .layer(Steps(inner))
            .oneshot(req)
            .map_ok(|res| res.map(|b| b.boxed_unsync()))
            .map_err(|e| match e.downcast::<Passed>() {
                Ok(p) => p.0,
                Err(e) => e,
            }),
    )
}

/// The steps under a tenant-level layer, as a service.
#[derive(Clone)]
struct Steps<F>(F);

impl<F> tower::Service<Request<ReplayBody>> for Steps<F>
where
    F: Fn(Request<ReplayBody>) -> Answer,
{
    type Response = Response<BoxBody>;
    type Error = Passed;
    type Future = futures_util::future::MapErr<Answer, fn(BoxError) -> Passed>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Passed>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReplayBody>) -> Self::Future {
        use futures_util::TryFutureExt;
        (self.0)(req).map_err(Passed as fn(BoxError) -> Passed)
    }
}

/// An error of the steps under a tenant-level layer, passed through it as it is.
#[derive(Debug)]
struct Passed(BoxError);

impl std::fmt::Display for Passed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Passed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// The tenant's own limits (requests, then tokens), then — for embeddings, unless the
/// model is off — the batching of concurrent requests, then the model's stack (so a batch
/// is one request for the model's limiter and its total for its budget).
///
/// Each arm boxes its future as it is, a concrete type: the limiters' futures are generic
/// over the error type, and one named inside an `async` block trips rustc's higher-ranked
/// `Send` check in an axum handler.
fn through_limits(tenant: &Tenant, route: &Route, req: Request<ReplayBody>) -> Answer {
    use futures_util::TryFutureExt;
    let model = match route
        .batch
        .as_ref()
        .filter(|_| req.uri().path() == "/v1/embeddings")
    {
        Some(batch) => tower::util::Either::Left(batch.layer(route.svc.clone())),
        None => tower::util::Either::Right(route.svc.clone()),
    };
    match (&tenant.rate, &tenant.tokens) {
        (None, None) => Box::pin(model.oneshot(req)),
        (Some(rate), None) => Box::pin(rate.layer(model).oneshot(req).map_err(boxed_error)),
        (None, Some(tokens)) => Box::pin(
            tokens
                .layer(model)
                .oneshot(req)
                .map_ok(boxed_answer)
                .map_err(boxed_error),
        ),
        (Some(rate), Some(tokens)) => Box::pin(
            rate.layer(tokens.layer(model))
                .oneshot(req)
                .map_ok(boxed_answer)
                .map_err(boxed_error),
        ),
    }
}

fn boxed_error<E: Into<BoxError>>(e: E) -> BoxError {
    e.into()
}

fn boxed_answer(res: Response<tollgate::tpm::TpmBody<BoxBody>>) -> Response<BoxBody> {
    res.map(|b| b.map_err(boxed_error).boxed_unsync())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(config: &Config) -> Policy {
        resolved("m", &config.models["m"], config)
    }

    #[test]
    fn with_jobs_a_stated_request_burst_keeps_a_tenth_for_live_traffic() {
        let yaml = |jobs: &str, limit: &str| {
            Config::from_yaml(&format!(
                "open: true\n{jobs}models:\n  m:\n    primary: {{ url: \"http://127.0.0.1:1\" }}\n    rate_limit: {limit}\n"
            ))
            .unwrap()
        };
        let jobs = "jobs: { path: /tmp/x.redb }\n";
        let reserve = |c: &Config| model(c).rate_limit.and_then(|r| r.reserve);
        assert_eq!(reserve(&yaml(jobs, "{ requests: 600/min }")), Some(60));
        assert_eq!(
            reserve(&yaml(jobs, "{ requests: 600/min, burst: 20 }")),
            Some(2)
        );
        assert_eq!(
            reserve(&yaml(jobs, "{ requests: 600/min, reserve: 0 }")),
            Some(0),
            "a stated reserve wins"
        );
        assert_eq!(
            reserve(&yaml(jobs, "{ tokens: 10k/min }")),
            None,
            "a learned request quota keeps none"
        );
        assert_eq!(
            reserve(&yaml("", "{ requests: 600/min }")),
            None,
            "no jobs, no reserve"
        );
    }
}
