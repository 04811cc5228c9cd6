//! Background jobs: `Prefer: respond-async` on a model request stores it (durably, in
//! the embedded [`FileStore`], or in Redis with [`RedisJobStore`]) and answers `202 Accepted` with `Location: /v1/jobs/{id}`;
//! workers run the stored requests through the very path a live request takes — the
//! tenant's limits, the model's stack, the access log — at priority 0, behind every live
//! request (whose default priority is 1), so job work takes the quota live traffic
//! leaves. `GET /v1/jobs/{id}` tells where a job stands and, once answered, gives the
//! answer; `POST /v1/jobs/{id}/cancel` cancels one not yet answered.
//!
//! A job whose gateway died mid-call is claimed again once its lease runs out (`jobs.lease`,
//! 5 minutes by default): it may reach the provider twice then, and only then; its answer
//! is recorded once. A worker alive renews its lease every third of it while the call
//! runs, so a slow call is never taken over; a gateway cut off from its store for longer
//! than a lease may lose its claim, and then its answer is not recorded.
//!
//! **How jobs and live traffic share a quota.** Jobs wait in the models' queues at
//! priority 0, behind every live request, and a model's stated request quota keeps a
//! tenth of its burst (`rate_limit.reserve`) that a job may not take: a job passes only
//! while that many cells stay. So jobs take every cell live traffic leaves beyond the
//! reserve, and a live request finds the burst it would find without them. Priority
//! alone is not enough: jobs then keep the bucket empty, and every live request waits for
//! the next cell (`tollgate-bench jobs`: live p99 × 1.21 without the reserve, × 1.00 with
//! it). Not covered: a quota learned from the provider (unknown when the config is read)
//! and token budgets keep no reserve — there a job still waits behind live requests, but
//! may spend tokens a live request would have found.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use tollgate::policy::PolicyError;
use tollgate_core::store::{Job, JobState, JobStore};
use tollgate_jobs::FileStore;
use tollgate_redis::{RedisJobStore, RedisStore};

use crate::app::{Caller, Shared0};
use crate::config::JobsConfig;
use crate::stats::Stats;

/// The largest answer a job keeps.
const MAX_ANSWER: usize = 32 * 1024 * 1024;

/// The jobs of a gateway: the store and its workers' settings.
pub(crate) struct Jobs {
    pub(crate) store: Arc<dyn JobStore>,
    pub(crate) path: String,
    /// `jobs.store` and `jobs.namespace`, as configured.
    pub(crate) shared: (Option<String>, Option<String>),
    /// The Redis the jobs are kept in, for the readiness check.
    pub(crate) redis: Option<RedisStore>,
    pub(crate) lease: Duration,
    /// Wakes an idle worker when a job is submitted.
    pub(crate) submitted: tokio::sync::Notify,
    /// The Standard Webhooks secret callbacks are signed with.
    pub(crate) callback_secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Jobs {
    pub(crate) fn open(cfg: &JobsConfig) -> Result<Self, PolicyError> {
        let (store, redis): (Arc<dyn JobStore>, _) = match &cfg.store {
            Some(url) => {
                let redis = RedisStore::open(url)
                    .map_err(|e| PolicyError::new(format!("jobs.store `{url}`: {e}")))?;
                let redis = match &cfg.namespace {
                    Some(ns) => redis.namespace(ns),
                    None => redis,
                };
                (Arc::new(RedisJobStore::new(&redis)), Some(redis))
            }
            None => (
                Arc::new(
                    FileStore::open(&cfg.path)
                        .map_err(|e| PolicyError::new(format!("jobs.path: {e}")))?,
                ),
                None,
            ),
        };
        Ok(Self {
            store,
            redis,
            shared: (cfg.store.clone(), cfg.namespace.clone()),
            path: cfg.path.clone(),
            lease: cfg.lease.map_or(Duration::from_secs(300), |d| d.0),
            submitted: tokio::sync::Notify::new(),
            callback_secret: match &cfg.callback_secret_env {
                Some(var) => Some(crate::alerts::secret_key(&std::env::var(var).map_err(
                    |_| PolicyError::new(format!("jobs.callback_secret_env: `{var}` is not set")),
                )?)),
                None => None,
            },
        })
    }

    /// Stores a request to run later; its id starts with `prefix` (`job`, or `resp` for
    /// a background response).
    pub(crate) async fn submit(
        &self,
        prefix: &str,
        tenant: &str,
        path: &str,
        body: &Bytes,
        callback: Option<String>,
    ) -> Result<Job, String> {
        let job = Job {
            id: format!(
                "{prefix}_{:016x}{:016x}",
                fastrand::u64(..),
                fastrand::u64(..)
            ),
            tenant: tenant.to_owned(),
            path: path.to_owned(),
            body: String::from_utf8_lossy(body).into_owned(),
            state: JobState::Queued,
            status: None,
            response: None,
            created_ms: Stats::now_ms(),
            started_ms: None,
            finished_ms: None,
            claims: 0,
            lease_until_ms: None,
            callback,
            deadline_ms: None,
        };
        self.store
            .enqueue(job.clone())
            .await
            .map_err(|e| e.to_string())?;
        self.submitted.notify_one();
        Ok(job)
    }
}

/// Whether the request prefers an asynchronous answer (RFC 7240 `Prefer: respond-async`).
pub(crate) fn prefers_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| {
            p.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("respond-async"))
        })
}

/// A job as the API shows it.
pub(crate) fn to_json(job: &Job) -> serde_json::Value {
    let secs = |ms: Option<u64>| ms.map(|m| m / 1000);
    let state = match job.state {
        JobState::Queued => "queued",
        JobState::InProgress => "in_progress",
        JobState::Completed => "completed",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        JobState::Expired => "expired",
        _ => "unknown",
    };
    let response = match (job.status, &job.response) {
        (Some(status), Some(body)) => serde_json::json!({
            "status_code": status,
            // JSON when it is (an answer), else the text (a stream's events).
            "body": serde_json::from_str::<serde_json::Value>(body)
                .unwrap_or_else(|_| serde_json::Value::String(body.clone())),
        }),
        _ => serde_json::Value::Null,
    };
    serde_json::json!({
        "id": job.id,
        "object": "job",
        "status": state,
        "endpoint": job.path,
        "created_at": job.created_ms / 1000,
        "started_at": secs(job.started_ms),
        "completed_at": secs(job.finished_ms),
        "attempts": job.claims,
        "response": response,
    })
}

/// A background response (`POST /v1/responses` with `background: true`) as OpenAI shows
/// one: `queued` → `in_progress` → `completed` (the provider's response, under the id
/// the gateway gave), `failed` (with the provider's error) or `cancelled`.
pub(crate) fn to_response_json(job: &Job) -> serde_json::Value {
    let model = serde_json::from_str::<serde_json::Value>(&job.body)
        .ok()
        .and_then(|v| v.get("model").cloned())
        .unwrap_or(serde_json::Value::Null);
    let base = |status: &str| {
        serde_json::json!({
            "id": job.id, "object": "response", "status": status, "background": true,
            "model": model, "created_at": job.created_ms / 1000,
        })
    };
    let answer = job
        .response
        .as_deref()
        .and_then(|b| serde_json::from_str::<serde_json::Value>(b).ok());
    match job.state {
        JobState::Queued => base("queued"),
        JobState::InProgress => base("in_progress"),
        JobState::Cancelled => base("cancelled"),
        JobState::Completed => match answer {
            Some(serde_json::Value::Object(mut o)) => {
                o.insert("id".into(), serde_json::Value::String(job.id.clone()));
                o.insert("background".into(), serde_json::Value::Bool(true));
                serde_json::Value::Object(o)
            }
            _ => base("completed"),
        },
        _ => {
            let mut v = base("failed");
            v["error"] = answer.and_then(|a| a.get("error").cloned()).unwrap_or(
                serde_json::json!({"message": "the request failed", "code": job.status}),
            );
            v
        }
    }
}

/// The request header naming the URL a job is POSTed to once it is over.
pub(crate) const CALLBACK_HEADER: &str = "x-tollgate-callback-url";

/// The callback URL a request names, when it is an http(s) URL.
pub(crate) fn callback_url(headers: &HeaderMap) -> Result<Option<String>, String> {
    let Some(v) = headers.get(CALLBACK_HEADER) else {
        return Ok(None);
    };
    let url = v
        .to_str()
        .map_err(|_| "the callback URL is not text".to_owned())?;
    let ok = url.parse::<http::Uri>().is_ok_and(|u| {
        matches!(u.scheme_str(), Some("http") | Some("https")) && u.host().is_some()
    });
    if ok {
        Ok(Some(url.to_owned()))
    } else {
        Err(format!("`{url}` is not an http:// or https:// URL"))
    }
}

/// POSTs the finished job to its callback URL, signed per Standard Webhooks when a
/// secret is configured; off the worker's path, retried as alerts are.
async fn callback(jobs: &Jobs, id: &str) {
    let Ok(Some(job)) = jobs.store.get(id).await else {
        return;
    };
    let Some(url) = job.callback.clone() else {
        return;
    };
    let body = Bytes::from(
        serde_json::json!({"type": "job.finished", "timestamp": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(), "data": to_json(&job)})
            .to_string(),
    );
    let secret = jobs.callback_secret.clone();
    tokio::spawn(async move {
        crate::alerts::post_signed(&crate::alerts::sender(), &url, body, secret.as_deref()).await;
    });
}

/// One worker: claims a job, runs it, records its answer; waits when there is none.
pub(crate) async fn work(shared: Arc<Shared0>) {
    loop {
        let loaded = shared.loaded.load_full();
        let Some(jobs) = loaded.jobs.clone() else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        match jobs.store.claim(Stats::now_ms(), jobs.lease).await {
            Ok(Some(job)) => {
                let (id, claim) = (job.id.clone(), job.claims);
                tokio::select! {
                    () = run(&shared, &jobs, job) => {}
                    () = keep_lease(&jobs, &id, claim) => {}
                }
            }
            Ok(None) => {
                tokio::select! {
                    () = jobs.submitted.notified() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the job store could not be read");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Renews a running job's lease every third of it, so a call that runs long is not
/// taken over by another worker while this one lives. Never ends: the job's run does.
async fn keep_lease(jobs: &Jobs, id: &str, claim: u32) {
    let every = (jobs.lease / 3).max(Duration::from_millis(10));
    let mut renewing = true;
    loop {
        tokio::time::sleep(every).await;
        if !renewing {
            continue;
        }
        match jobs
            .store
            .renew(id, claim, Stats::now_ms(), jobs.lease)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                // Cancelled, or taken over after this worker lost the store for a lease:
                // its answer will not be recorded.
                tracing::info!(job = %id, "the job's claim is no longer in force");
                renewing = false;
            }
            Err(e) => tracing::warn!(job = %id, error = %e, "a job's lease could not be renewed"),
        }
    }
}

async fn run(shared: &Shared0, jobs: &Jobs, job: Job) {
    let loaded = shared.loaded.load_full();
    let finish = |state, status: u16, body: String| {
        let (id, claim) = (job.id.clone(), job.claims);
        async move {
            match jobs
                .store
                .finish(&id, claim, state, status, body, Stats::now_ms())
                .await
            {
                Ok(true) => callback(jobs, &id).await,
                Ok(false) => {
                    tracing::info!(job = %id, "the job was cancelled or taken over: its answer is not recorded")
                }
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "a job's answer could not be recorded; it will run again")
                }
            }
        }
    };
    if job.deadline_ms.is_some_and(|d| d <= Stats::now_ms()) {
        // Its window ran out while it queued: ended without a call.
        if let Err(e) = jobs.store.expire(&job.id, Stats::now_ms()).await {
            tracing::warn!(job = %job.id, error = %e, "an expired job could not be ended");
        }
        return;
    }
    let Some(tenant) = loaded.tenants.by_name(&job.tenant) else {
        let body = serde_json::json!({"error": {"message": format!("the tenant `{}` is no longer configured", job.tenant), "type": "invalid_request_error", "code": "tenant_gone"}});
        return finish(JobState::Failed, 403, body.to_string()).await;
    };
    // A refusal for a limit is waited out within the lease, then tried again.
    let patience = jobs.lease / 2;
    let started = tokio::time::Instant::now();
    loop {
        let req = Request::post(job.path.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(job.body.clone()));
        let Ok(req) = req else {
            return finish(
                JobState::Failed,
                400,
                "the stored request does not build".into(),
            )
            .await;
        };
        let res = crate::app::serve(
            shared,
            req,
            std::time::Instant::now(),
            &job.id,
            Caller::Job(Arc::clone(&tenant)),
        )
        .await;
        let status = res.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            let wait =
                tollgate_core::headers::retry_after(res.headers(), std::time::SystemTime::now())
                    .unwrap_or(Duration::from_secs(1))
                    .max(Duration::from_millis(100));
            if started.elapsed() + wait < patience {
                tokio::time::sleep(wait).await;
                continue;
            }
        }
        let body = match Limited::new(res.into_body(), MAX_ANSWER).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                // The answer broke off: run it again, as after a crash.
                tracing::warn!(job = %job.id, error = %e, "a job's answer broke off");
                return;
            }
        };
        let state = if status.is_success() {
            JobState::Completed
        } else {
            JobState::Failed
        };
        return finish(
            state,
            status.as_u16(),
            String::from_utf8_lossy(&body).into_owned(),
        )
        .await;
    }
}
