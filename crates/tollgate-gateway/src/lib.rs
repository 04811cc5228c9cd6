//! `tollgate`, the gateway: one OpenAI-compatible endpoint in front of every provider
//! quota a team shares.
//!
//! Every application of a team sends its model calls here. The gateway knows who is
//! calling (virtual keys, stored as SHA-256 hashes), holds each tenant to its own limits
//! (requests, tokens, requests in flight) before any work is done, and sends the call
//! through the model's Tollgate stack — cache, failover, and per backend retry, rate limit
//! and token budget — to the provider, with the provider's credentials in place of the
//! caller's.
//!
//! ```text
//! client ─▶ tollgate ─ tenant: key → limits (refuse: 429 + Retry-After) ─▶ model's policy
//!                       cache → failover → per backend: retry → rate limit → tokens → provider
//! ```
//!
//! The binary: `tollgate serve --config gateway.yaml`, `tollgate check --config
//! gateway.yaml`. The same from code:
//!
//! ```no_run
//! use tollgate_gateway::{Config, Gateway};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::from_yaml(r#"
//! open: true
//! models:
//!   gpt-4o-mini:
//!     primary: { url: "https://api.openai.com", api_key_env: OPENAI_API_KEY }
//!     rate_limit: { requests: 500/min, tokens: 200k/min, mode: wait, max_wait: 30s }
//! "#)?;
//! let gateway = Gateway::new(config)?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:4000").await?;
//! gateway.serve(listener, tollgate_gateway::shutdown_signal()).await?;
//! # Ok(()) }
//! ```
//!
//! # Endpoints
//!
//! - `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/responses`,
//!   and Anthropic's `/v1/messages`: routed by the body's `model` to that model's stack;
//!   streams pass through as they come.
//! - `GET /v1/models`, `GET /v1/models/{model}`: the names the caller may use.
//! - `GET /metrics`: Prometheus text — every layer's `tollgate_*` metrics, the
//!   OpenTelemetry GenAI client metrics (`gen_ai_client_token_usage`,
//!   `gen_ai_client_operation_duration_seconds`,
//!   `gen_ai_server_time_to_first_token_seconds`), `tollgate_gateway_requests_total` and
//!   `tollgate_gateway_overhead_seconds` (time to the answer's head minus the providers'
//!   time to theirs and the time spent waiting for quota in the limiters' queues).
//! - `GET /healthz` (alive), `GET /readyz` (config loaded, every Redis store answering).
//! - `POST /admin/reload` with the admin key: reads the config file again.
//! - `GET /v1/jobs/{id}`, `POST /v1/jobs/{id}/cancel`: background jobs. With `jobs:` in
//!   the config, a model request sent with `Prefer: respond-async` is stored on disk
//!   (redb, through `tollgate-jobs`) and answered `202 Accepted` with `Location:
//!   /v1/jobs/{id}`; workers run it through the same path as a live request — the
//!   tenant's limits, the model's stack — at priority 0, behind every live request
//!   (default priority 1), so jobs take the quota live traffic leaves. A job whose gateway
//!   died mid-call is taken over after its lease, and its answer is recorded once. Only
//!   the tenant that submitted a job sees it. `POST /v1/responses` with `background:
//!   true` is the Responses API's own way to ask the same: a `queued` response object
//!   comes back, and `GET /v1/responses/{id}` (and `…/cancel`) follow it.
//! - The OpenAI Batch API on the same jobs: `/v1/files` (upload, read, content, delete)
//!   and `/v1/batches` (create, read, list, cancel); see the `batches` module's docs.
//! - `GET /dashboard`: the live page — per model, requests and tokens per minute over the
//!   last 15 minutes with each limit drawn, the quota left, provider 429s against waits and
//!   refusals, cache hits, retries, failovers, wait percentiles; per tenant, usage against
//!   its limits; the last 100 requests, filterable. Fed by `GET /api/stats` (JSON) and
//!   `GET /api/stats/stream` (server-sent events, once a second). Behind the admin key when
//!   one is configured (as a bearer token, or as HTTP Basic's password, which a browser
//!   asks for). No key or prompt text is on it.
//!
//! # Alerts
//!
//! `alerts.rules` in the config watch the same statistics — `limited_for` (a model has
//! been rate-limited for N: 429s from its providers, waits past a threshold, or
//! refusals, in every 10-second interval), `cooling`, `quota_used`, `error_rate` — and
//! send `alert.firing` once and `alert.resolved` once to every sink of `alerts.sinks`: a
//! JSON webhook signed per Standard Webhooks, or a Slack, DingTalk or WeCom text payload.
//! Deliveries are retried with backoff, off the request path, through a bounded queue
//! (`tollgate_alerts_dropped_total` counts what a full queue drops).
//!
//! Every error a client sees is in OpenAI's shape: 401 for a missing or unknown key, 403
//! for a model the key may not use, 404 for an unknown model or path, 413 for a body over
//! `body_limit`, 400 for a body that is not JSON or names no model, 429 only for limits,
//! 502/504 when the provider cannot be reached or does not answer in time.
//!
//! # The access log
//!
//! One JSON line per request on the `tollgate::access` target, written when the answer's
//! body has ended (or was cut): request id (`x-request-id` taken when sane, else made;
//! returned to the caller and forwarded to the provider), tenant, model, backend, cache
//! result, attempts and retries, time upstream, time queued for quota, tokens, status,
//! bytes, time to first byte, latency, and how it ended. Keys are never logged.
//!
//! # Reloads and shutdown
//!
//! SIGHUP (or `POST /admin/reload`) reads the config file again. A file that does not read
//! or build is refused with a log line and the old config keeps serving. Models whose
//! policy did not change keep their stack (quotas, cache, backend health), tenants whose
//! entry did not change keep their counters and requests in flight; what changed applies
//! to the next request, and no connection is dropped. `listen` and the connection
//! timeouts are read once, at start.
//!
//! SIGTERM or ctrl-c stops accepting, lets requests and streams in flight finish for up to
//! `shutdown_grace`, then exits.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod access;
mod alerts;
mod app;
mod batches;
pub mod config;
mod jobs;
mod stats;
mod tenants;
mod upstream;

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tollgate::policy::PolicyError;

pub use config::Config;

use crate::app::{Loaded, Shared0};

/// A running gateway's state: its config, built, and what serves it. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared0>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let loaded = self.shared.loaded.load();
        let (tenants, models) = loaded.counts();
        f.debug_struct("Gateway")
            .field("tenants", &tenants)
            .field("model_names", &models)
            .field("path", &self.shared.path)
            .finish()
    }
}

/// The process's Prometheus recorder, installed once: the `metrics` facade has one global
/// recorder, and every gateway of the process renders it.
fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // The OpenTelemetry GenAI semantic conventions' bucket boundaries.
            let tokens = [
                1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0,
                1048576.0, 4194304.0,
            ];
            let seconds = [
                0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96,
                81.92,
            ];
            let overhead = [
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full("gen_ai_client_token_usage".into()), &tokens)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("tollgate_gateway_overhead_seconds".into()),
                        &overhead,
                    )
                })
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds));
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // A recorder built by hand keeps every histogram sample until something drains
            // it; without a scrape of /metrics that was about 100 bytes per request,
            // forever (found by `tollgate-bench soak`). Drain on the exporter's own
            // schedule, on a thread so it runs with or without a tokio runtime.
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new()
                .name("tollgate-metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    upkeep.run_upkeep();
                });
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed: /metrics shows only what it does not take");
            }
            handle
        })
        .clone()
}

impl Gateway {
    /// A gateway for `config`. Fails when a model's policy cannot be built (an API key
    /// variable not set, say) or a tenant's key variable is not set.
    pub fn new(config: Config) -> Result<Self, PolicyError> {
        Self::with_path(config, None)
    }

    /// A gateway for the config file at `path`, which a reload reads again.
    pub fn from_path(path: impl Into<PathBuf>) -> Result<Self, PolicyError> {
        let path = path.into();
        let config = Config::from_path(&path)?;
        Self::with_path(config, Some(path))
    }

    fn with_path(config: Config, path: Option<PathBuf>) -> Result<Self, PolicyError> {
        let metrics = prometheus();
        let loaded = Loaded::build(config, None)?;
        Ok(Self {
            shared: Arc::new(Shared0 {
                stats: stats::Stats::new(),
                stopping: tokio::sync::watch::Sender::new(false),
                firing: std::sync::Mutex::new(Vec::new()),
                loaded: ArcSwap::from_pointee(loaded),
                path,
                metrics,
                reloading: tokio::sync::Mutex::new(()),
                spend: std::sync::Mutex::new(std::collections::HashMap::new()),
            }),
        })
    }

    /// The config in force.
    pub fn config(&self) -> Config {
        self.shared.loaded.load().config.clone()
    }

    /// Serves the new `config` from the next request on; on an error the old one keeps
    /// serving.
    pub async fn replace(&self, config: Config) -> Result<(), PolicyError> {
        let _one = self.shared.reloading.lock().await;
        let old = self.shared.loaded.load_full();
        let new = Loaded::build(config, Some(&old))?;
        self.shared.loaded.store(Arc::new(new));
        Ok(())
    }

    /// Reads the config file again and serves it (see [`replace`](Self::replace)). A
    /// gateway built from a [`Config`] has no file to read: an error.
    pub async fn reload(&self) -> Result<(), PolicyError> {
        reload(&self.shared).await
    }

    /// The gateway as an axum [`Router`](axum::Router), to serve as you like.
    pub fn router(&self) -> axum::Router {
        app::router(Arc::clone(&self.shared))
    }

    /// Serves on `listener` (HTTP/1.1 and h2c) until `shutdown` completes, then stops
    /// accepting and lets connections finish for up to the config's `shutdown_grace`.
    /// SIGHUP reloads the config file on Unix.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let config = self.config();
        let header_read = config
            .timeouts
            .header_read
            .map_or(Duration::from_secs(10), |d| d.0);
        let idle = config
            .timeouts
            .idle
            .map_or(Duration::from_secs(60), |d| d.0);
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(idle)
            .keep_alive_timeout(idle);
        let graceful = GracefulShutdown::new();
        let router = self.router();
        let hangups = self.watch_hangups();
        let alerting = self.start_alerts();
        let workers: Vec<_> = (0..config
            .jobs
            .as_ref()
            .map_or(0, |j| j.workers.unwrap_or(4).max(1)))
            .map(|_| tokio::spawn(jobs::work(Arc::clone(&self.shared))))
            .collect();
        tracing::info!(addr = %listener.local_addr()?, "tollgate is serving");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, _) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors, say: wait a little, go on.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let svc = TowerToHyperService::new(router.clone());
                    let conn = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .into_owned();
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                    });
                }
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        self.shared.stopping.send_replace(true);
        if let Some(h) = hangups {
            h.abort();
        }
        for task in alerting {
            task.abort();
        }
        // A job a worker is running is left in progress: it is taken over, once its lease
        // runs out, by the next gateway on the same store.
        for w in workers {
            w.abort();
        }
        let grace = config.shutdown_grace();
        tracing::info!(
            grace_s = grace.as_secs_f64(),
            "shutting down: draining connections"
        );
        match tokio::time::timeout(grace, graceful.shutdown()).await {
            Ok(()) => tracing::info!("every connection drained"),
            Err(_) => tracing::warn!("shutdown grace over with connections still open"),
        }
        Ok(())
    }

    /// Once a second, the tenants' spend read from a shared store and the alert rules'
    /// evaluation; and the deliveries of their events.
    fn start_alerts(&self) -> [tokio::task::JoinHandle<()>; 2] {
        let (notifier, rx) = alerts::Notifier::new();
        let shared = Arc::clone(&self.shared);
        let deliveries = tokio::spawn(alerts::run_deliveries(rx, move || {
            shared.loaded.load().config.alerts.sinks.clone()
        }));
        let shared = Arc::clone(&self.shared);
        let evaluating = tokio::spawn(async move {
            let mut evaluator = alerts::Evaluator::default();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                app::refresh_spend(&shared).await;
                let loaded = shared.loaded.load_full();
                let rules = &loaded.config.alerts.rules;
                if rules.is_empty() {
                    continue;
                }
                // Only the cooling rule reads the layers' metrics.
                let metrics = if rules.iter().any(|r| r.when == config::RuleKind::Cooling) {
                    shared.metrics.render()
                } else {
                    String::new()
                };
                evaluator.set_spend(app::spend_percent(&shared, &loaded));
                for event in evaluator.evaluate(&loaded.config, &shared.stats, &metrics) {
                    notifier.send(event);
                }
                if let Ok(mut f) = shared.firing.lock() {
                    *f = evaluator.firing();
                }
            }
        });
        [deliveries, evaluating]
    }

    #[cfg(unix)]
    fn watch_hangups(&self) -> Option<tokio::task::JoinHandle<()>> {
        use tokio::signal::unix::{signal, SignalKind};
        let shared = Arc::clone(&self.shared);
        shared.path.as_ref()?;
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "SIGHUP cannot be watched: reload with POST /admin/reload");
                return None;
            }
        };
        Some(tokio::spawn(async move {
            while hup.recv().await.is_some() {
                if let Err(e) = reload(&shared).await {
                    tracing::error!(error = %e, "reload refused: the old config keeps serving");
                }
            }
        }))
    }

    #[cfg(not(unix))]
    fn watch_hangups(&self) -> Option<tokio::task::JoinHandle<()>> {
        None
    }
}

/// Reads the config file again and swaps it in.
pub(crate) async fn reload(shared: &Shared0) -> Result<(), PolicyError> {
    let Some(path) = &shared.path else {
        return Err(PolicyError::new(
            "this gateway was built from a config, not a file: there is nothing to read again",
        ));
    };
    let _one = shared.reloading.lock().await;
    let config = Config::from_path(path)?;
    let old = shared.loaded.load_full();
    let new = Loaded::build(config, Some(&old))?;
    let (tenants, models) = new.counts();
    shared.loaded.store(Arc::new(new));
    tracing::info!(tenants, model_names = models, "config reloaded");
    Ok(())
}

/// Completes on ctrl-c, or SIGTERM on Unix: the signal [`Gateway::serve`] usually stops on.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// What `tollgate check` prints: each model's resolved stack, its aliases, and the
/// tenants with their limits.
pub fn describe(config: &Config) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "listen: {}", config.listen);
    let _ = writeln!(
        out,
        "body limit: {} bytes; tenants: {}{}",
        config.body_limit(),
        config.tenants.len(),
        if config.open { " (open: no keys)" } else { "" }
    );
    for (name, policy) in &config.models {
        let aliases: Vec<&str> = config
            .aliases
            .iter()
            .filter(|(_, t)| *t == name)
            .map(|(a, _)| a.as_str())
            .collect();
        let _ = writeln!(
            out,
            "\nmodel {name}{}",
            if aliases.is_empty() {
                String::new()
            } else {
                format!(" (also: {})", aliases.join(", "))
            }
        );
        let p = app::resolved(name, policy, config);
        for line in p.describe().lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    for (name, t) in &config.tenants {
        let limit = |r: Option<tollgate::policy::Rate>| {
            r.map_or("-".to_owned(), |r| {
                format!("{}/{}s", r.count, r.per.as_secs_f64())
            })
        };
        let _ = writeln!(
            out,
            "\ntenant {name}: requests {}, tokens {}, in flight {}, priority {}, models {}",
            limit(t.requests),
            limit(t.tokens),
            t.concurrency.map_or("-".to_owned(), |c| c.to_string()),
            t.priority.unwrap_or(tenants::LIVE_PRIORITY),
            t.models.as_ref().map_or("all".to_owned(), |m| m.join(", ")),
        );
    }
    out
}
