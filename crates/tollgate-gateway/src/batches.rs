//! The OpenAI Batch API over the job store: `POST /v1/files` (a JSONL file, streamed to
//! disk), `GET /v1/files/{id}`, `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`;
//! `POST /v1/batches`, `GET /v1/batches/{id}`, `GET /v1/batches`, `POST
//! /v1/batches/{id}/cancel`.
//!
//! A batch's lines become jobs (one transaction for them all) and run as every job does:
//! through the gateway's live path, at priority 0, with the quotas live traffic leaves.
//! A malformed line fails that line (in the error file), not the batch; an endpoint the
//! gateway does not serve, or a model it does not know, fails the batch at validation.
//! The output file holds the 2xx answers, the error file the rest, each line
//! `{id, custom_id, response: {status_code, request_id, body}, error}` as OpenAI writes
//! them.
//!
//! Files and batches are kept beside the job store (`<jobs path>.files/`); each file's
//! metadata is a small JSON file next to it.

use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::extract::Multipart;
use bytes::Bytes;
use http::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tollgate_core::store::{Job, JobState};

use crate::jobs::Jobs;
use crate::stats::Stats;

/// The largest file accepted.
pub(crate) const MAX_FILE: u64 = 200 * 1024 * 1024;
/// The most lines in a batch.
pub(crate) const MAX_LINES: usize = 50_000;

/// The endpoints a batch may run.
const ENDPOINTS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
];

/// Where files and batches are kept.
pub(crate) fn dir(jobs: &Jobs) -> PathBuf {
    PathBuf::from(format!("{}.files", jobs.path))
}

fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..)
    )
}

/// An error in OpenAI's shape.
pub(crate) type Refusal = Response<Body>;

fn refusal(status: StatusCode, code: &str, message: &str) -> Refusal {
    tollgate_core::response::openai_error::<Body>(status, "invalid_request_error", code, message)
}

fn io_error(e: impl std::fmt::Display) -> Refusal {
    tollgate_core::response::openai_error::<Body>(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "file_store_unavailable",
        &e.to_string(),
    )
}

async fn read_meta(path: &Path) -> Option<Value> {
    let text = tokio::fs::read_to_string(path).await.ok()?;
    serde_json::from_str(&text).ok()
}

async fn write_meta(path: &Path, v: &Value) -> Result<(), Refusal> {
    // Written whole, then renamed: a reader never sees half of it.
    let tmp = path.with_extension("tmp");
    tokio::fs::write(&tmp, v.to_string())
        .await
        .map_err(io_error)?;
    tokio::fs::rename(&tmp, path).await.map_err(io_error)
}

/// The file object as OpenAI shows it (without the tenant).
fn public(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("tenant");
        o.remove("custom_ids");
        o.remove("line_errors");
        o.remove("expires_at_ms");
    }
    v
}

/// The tenant's file `id`: its metadata and content paths.
pub(crate) async fn file(jobs: &Jobs, tenant: &str, id: &str) -> Result<(Value, PathBuf), Refusal> {
    let not_found = || {
        refusal(
            StatusCode::NOT_FOUND,
            "file_not_found",
            &format!("No such File object: {id}"),
        )
    };
    if !id.starts_with("file-") || !id[5..].bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(not_found());
    }
    let d = dir(jobs);
    let meta = read_meta(&d.join(format!("{id}.json")))
        .await
        .ok_or_else(not_found)?;
    if meta["tenant"] != tenant {
        return Err(not_found());
    }
    Ok((meta, d.join(format!("{id}.jsonl"))))
}

/// Stores a file of `bytes` for `tenant`; its object.
async fn store_file(
    jobs: &Jobs,
    tenant: &str,
    filename: &str,
    purpose: &str,
    content: &[u8],
) -> Result<Value, Refusal> {
    let d = dir(jobs);
    tokio::fs::create_dir_all(&d).await.map_err(io_error)?;
    let id = new_id("file");
    tokio::fs::write(d.join(format!("{id}.jsonl")), content)
        .await
        .map_err(io_error)?;
    let meta = json!({"id": id, "object": "file", "bytes": content.len(), "created_at": Stats::now_ms() / 1000,
                      "filename": filename, "purpose": purpose, "tenant": tenant});
    write_meta(&d.join(format!("{id}.json")), &meta).await?;
    Ok(meta)
}

/// `POST /v1/files`: the `file` field streamed to disk, up to [`MAX_FILE`].
pub(crate) async fn upload(
    jobs: &Jobs,
    tenant: &str,
    mut form: Multipart,
) -> Result<Value, Refusal> {
    let d = dir(jobs);
    tokio::fs::create_dir_all(&d).await.map_err(io_error)?;
    let id = new_id("file");
    let path = d.join(format!("{id}.jsonl"));
    let (mut purpose, mut filename, mut bytes) = (None, None, None);
    while let Some(mut field) = form
        .next_field()
        .await
        .map_err(|e| refusal(StatusCode::BAD_REQUEST, "invalid_multipart", &e.to_string()))?
    {
        match field.name() {
            Some("purpose") => {
                purpose = Some(field.text().await.map_err(|e| {
                    refusal(StatusCode::BAD_REQUEST, "invalid_multipart", &e.to_string())
                })?);
            }
            Some("file") => {
                filename = field.file_name().map(str::to_owned);
                let mut out = tokio::fs::File::create(&path).await.map_err(io_error)?;
                let mut n: u64 = 0;
                while let Some(chunk) = field.chunk().await.map_err(|e| {
                    refusal(StatusCode::BAD_REQUEST, "invalid_multipart", &e.to_string())
                })? {
                    n += chunk.len() as u64;
                    if n > MAX_FILE {
                        drop(out);
                        let _ = tokio::fs::remove_file(&path).await;
                        return Err(refusal(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "file_too_large",
                            &format!("files are limited to {MAX_FILE} bytes"),
                        ));
                    }
                    out.write_all(&chunk).await.map_err(io_error)?;
                }
                out.flush().await.map_err(io_error)?;
                bytes = Some(n);
            }
            _ => {}
        }
    }
    let Some(bytes) = bytes else {
        return Err(refusal(
            StatusCode::BAD_REQUEST,
            "missing_file",
            "the form has no `file` field",
        ));
    };
    let purpose = purpose.unwrap_or_default();
    if purpose != "batch" {
        let _ = tokio::fs::remove_file(&path).await;
        return Err(refusal(
            StatusCode::BAD_REQUEST,
            "invalid_purpose",
            "this gateway takes files with `purpose=batch`",
        ));
    }
    let meta = json!({"id": id, "object": "file", "bytes": bytes, "created_at": Stats::now_ms() / 1000,
                      "filename": filename.unwrap_or_else(|| "upload.jsonl".into()), "purpose": purpose, "tenant": tenant});
    write_meta(&d.join(format!("{id}.json")), &meta).await?;
    Ok(public(meta))
}

/// `GET /v1/files/{id}/content`, streamed from disk.
pub(crate) async fn content(path: &Path) -> Result<Response<Body>, Refusal> {
    let f = tokio::fs::File::open(path).await.map_err(io_error)?;
    let stream = futures_util::stream::unfold(f, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    let mut res = Response::new(Body::from_stream(stream));
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/jsonl"),
    );
    Ok(res)
}

/// `DELETE /v1/files/{id}`.
pub(crate) async fn delete(jobs: &Jobs, tenant: &str, id: &str) -> Result<Value, Refusal> {
    let (_, path) = file(jobs, tenant, id).await?;
    let _ = tokio::fs::remove_file(&path).await;
    let _ = tokio::fs::remove_file(dir(jobs).join(format!("{id}.json"))).await;
    Ok(json!({"id": id, "object": "file", "deleted": true}))
}

fn batch_path(jobs: &Jobs, id: &str) -> PathBuf {
    dir(jobs).join(format!("{id}.batch.json"))
}

/// `POST /v1/batches`: validates every line, then queues them all in one transaction.
pub(crate) async fn create(
    jobs: &Jobs,
    tenant: &crate::tenants::Tenant,
    config: &crate::config::Config,
    req: &Value,
) -> Result<Value, Refusal> {
    let input = req["input_file_id"].as_str().unwrap_or_default();
    let endpoint = req["endpoint"].as_str().unwrap_or_default();
    if !ENDPOINTS.contains(&endpoint) {
        return Err(refusal(
            StatusCode::BAD_REQUEST,
            "invalid_endpoint",
            &format!("`{endpoint}` is not an endpoint a batch may run: one of {ENDPOINTS:?}"),
        ));
    }
    // OpenAI takes only `24h`; any duration is taken here (`1h`, `7d`), for operators
    // who run batches under their own deadlines.
    let window = req["completion_window"].as_str().unwrap_or("24h");
    let window_ms = match humantime::parse_duration(window) {
        Ok(d) if !d.is_zero() => u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
        _ => {
            return Err(refusal(
                StatusCode::BAD_REQUEST,
                "invalid_completion_window",
                &format!("`completion_window` must be a duration such as `24h`, not `{window}`"),
            ))
        }
    };
    let (_, path) = file(jobs, &tenant.name, input).await?;
    let f = tokio::fs::File::open(&path).await.map_err(io_error)?;
    let mut lines = tokio::io::BufReader::new(f).lines();
    let id = new_id("batch");
    let now = Stats::now_ms();
    let deadline = now.saturating_add(window_ms);
    let (mut queued, mut custom_ids, mut line_errors) = (Vec::new(), Vec::new(), Vec::new());
    let mut n = 0usize;
    while let Some(line) = lines.next_line().await.map_err(|e| {
        refusal(
            StatusCode::BAD_REQUEST,
            "invalid_file",
            &format!("the file is not text: {e}"),
        )
    })? {
        if line.trim().is_empty() {
            continue;
        }
        n += 1;
        if n > MAX_LINES {
            return Err(refusal(
                StatusCode::BAD_REQUEST,
                "too_many_lines",
                &format!("a batch holds at most {MAX_LINES} lines"),
            ));
        }
        let line = match tollgate_jobs::batch::parse_line(&line, endpoint) {
            Ok(line) => line,
            Err(e) => {
                line_errors
                    .push(json!({"line": n, "custom_id": e.custom_id, "message": e.message}));
                continue;
            }
        };
        let model = line.model.as_str();
        match config.route(model) {
            Some((name, _)) if tenant.may_use(name) => {}
            _ => {
                // An unknown model fails the batch at validation, as OpenAI's does.
                return Err(refusal(StatusCode::BAD_REQUEST, "model_not_found", &format!("line {n}: the model `{model}` does not exist or you do not have access to it")));
            }
        }
        let index = custom_ids.len();
        custom_ids.push(line.custom_id);
        queued.push(Job {
            id: format!("{id}_{index:06}"),
            tenant: tenant.name.to_string(),
            path: endpoint.to_owned(),
            body: line.body,
            state: JobState::Queued,
            status: None,
            response: None,
            created_ms: now,
            started_ms: None,
            finished_ms: None,
            claims: 0,
            lease_until_ms: None,
            callback: None,
            deadline_ms: Some(deadline),
        });
    }
    let total = queued.len() + line_errors.len();
    jobs.store.enqueue_many(queued).await.map_err(io_error)?;
    jobs.submitted.notify_waiters();
    let meta = json!({
        "id": id, "object": "batch", "endpoint": endpoint, "errors": null, "input_file_id": input,
        "completion_window": window, "status": "in_progress", "output_file_id": null, "error_file_id": null,
        "created_at": now / 1000, "in_progress_at": now / 1000, "expires_at": deadline / 1000,
        "expires_at_ms": deadline, "finalizing_at": null,
        "completed_at": null, "failed_at": null, "expired_at": null, "cancelling_at": null, "cancelled_at": null,
        "request_counts": {"total": total, "completed": 0, "failed": line_errors.len()},
        "metadata": req.get("metadata").cloned().unwrap_or(Value::Null),
        "tenant": tenant.name.as_ref(), "custom_ids": custom_ids, "line_errors": line_errors,
    });
    dir_exists(jobs).await?;
    write_meta(&batch_path(jobs, &id), &meta).await?;
    Ok(public(meta))
}

async fn dir_exists(jobs: &Jobs) -> Result<(), Refusal> {
    tokio::fs::create_dir_all(dir(jobs)).await.map_err(io_error)
}

/// `GET /v1/batches/{id}`: the batch as it stands; once every line is over, its output
/// and error files are written and it is `completed` (or `cancelled`).
pub(crate) async fn retrieve(jobs: &Jobs, tenant: &str, id: &str) -> Result<Value, Refusal> {
    let not_found = || {
        refusal(
            StatusCode::NOT_FOUND,
            "batch_not_found",
            &format!("No batch found with id `{id}`."),
        )
    };
    if !id.starts_with("batch-") || !id[6..].bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(not_found());
    }
    let path = batch_path(jobs, id);
    let mut meta = read_meta(&path).await.ok_or_else(not_found)?;
    if meta["tenant"] != tenant {
        return Err(not_found());
    }
    if !matches!(meta["status"].as_str(), Some("in_progress" | "cancelling")) {
        return Ok(public(meta));
    }
    let mut lines = jobs.store.list(&format!("{id}_")).await.map_err(io_error)?;
    let now = Stats::now_ms();
    if meta["expires_at_ms"].as_u64().is_some_and(|d| d <= now) {
        // Past its window: what has not run is expired; what finished is kept.
        for job in &mut lines {
            if !job.state.is_final() {
                if let Some(j) = jobs.store.expire(&job.id, now).await.map_err(io_error)? {
                    *job = j;
                }
            }
        }
    }
    let line_errors = meta["line_errors"].as_array().map_or(0, Vec::len);
    let completed = lines
        .iter()
        .filter(|j| j.state == JobState::Completed)
        .count();
    let failed = lines
        .iter()
        .filter(|j| {
            matches!(
                j.state,
                JobState::Failed | JobState::Cancelled | JobState::Expired
            )
        })
        .count()
        + line_errors;
    meta["request_counts"] =
        json!({"total": lines.len() + line_errors, "completed": completed, "failed": failed});
    if lines.iter().all(|j| j.state.is_final()) {
        finalize(jobs, tenant, &mut meta, &lines).await?;
    }
    write_meta(&path, &meta).await?;
    Ok(public(meta))
}

/// Writes the output and error files of a batch whose lines are all over.
async fn finalize(
    jobs: &Jobs,
    tenant: &str,
    meta: &mut Value,
    lines: &[Job],
) -> Result<(), Refusal> {
    let custom_ids: Vec<String> = meta["custom_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default();
    let (mut out, mut errs) = (String::new(), String::new());
    for (i, job) in lines.iter().enumerate() {
        let custom_id = custom_ids.get(i).cloned().unwrap_or_default();
        let body = job
            .response
            .as_deref()
            .and_then(|b| serde_json::from_str::<Value>(b).ok())
            .unwrap_or(Value::Null);
        let line_id = format!("batch_req_{}", job.id.rsplit('_').next().unwrap_or("0"));
        match (job.state, job.status) {
            (JobState::Completed, Some(status)) => {
                out.push_str(&json!({"id": line_id, "custom_id": custom_id, "response": {"status_code": status, "request_id": job.id, "body": body}, "error": null}).to_string());
                out.push('\n');
            }
            (JobState::Expired, _) => {
                errs.push_str(&json!({"id": line_id, "custom_id": custom_id, "response": null, "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}}).to_string());
                errs.push('\n');
            }
            (JobState::Cancelled, _) => {
                errs.push_str(&json!({"id": line_id, "custom_id": custom_id, "response": null, "error": {"code": "batch_cancelled", "message": "the batch was cancelled before this request ran"}}).to_string());
                errs.push('\n');
            }
            (_, status) => {
                errs.push_str(&json!({"id": line_id, "custom_id": custom_id, "response": {"status_code": status, "request_id": job.id, "body": body}, "error": null}).to_string());
                errs.push('\n');
            }
        }
    }
    for e in meta["line_errors"].as_array().cloned().unwrap_or_default() {
        errs.push_str(&json!({"id": format!("batch_req_line_{}", e["line"]), "custom_id": e["custom_id"], "response": null,
                              "error": {"code": "invalid_request", "message": e["message"]}}).to_string());
        errs.push('\n');
    }
    let now = Stats::now_ms() / 1000;
    if !out.is_empty() {
        let f = store_file(
            jobs,
            tenant,
            "batch_output.jsonl",
            "batch_output",
            out.as_bytes(),
        )
        .await?;
        meta["output_file_id"] = f["id"].clone();
    }
    if !errs.is_empty() {
        let f = store_file(
            jobs,
            tenant,
            "batch_errors.jsonl",
            "batch_output",
            errs.as_bytes(),
        )
        .await?;
        meta["error_file_id"] = f["id"].clone();
    }
    meta["finalizing_at"] = json!(now);
    if meta["status"] == "cancelling" {
        meta["status"] = json!("cancelled");
        meta["cancelled_at"] = json!(now);
    } else if lines.iter().any(|j| j.state == JobState::Expired) {
        meta["status"] = json!("expired");
        meta["expired_at"] = json!(now);
    } else {
        meta["status"] = json!("completed");
        meta["completed_at"] = json!(now);
    }
    Ok(())
}

/// `POST /v1/batches/{id}/cancel`: the lines not yet run are cancelled.
pub(crate) async fn cancel(jobs: &Jobs, tenant: &str, id: &str) -> Result<Value, Refusal> {
    let current = retrieve(jobs, tenant, id).await?;
    if current["status"] != "in_progress" {
        return Ok(current);
    }
    let path = batch_path(jobs, id);
    let mut meta = read_meta(&path)
        .await
        .ok_or_else(|| io_error("the batch vanished"))?;
    let now = Stats::now_ms();
    for job in jobs.store.list(&format!("{id}_")).await.map_err(io_error)? {
        if !job.state.is_final() {
            let _ = jobs.store.cancel(&job.id, now).await;
        }
    }
    meta["status"] = json!("cancelling");
    meta["cancelling_at"] = json!(now / 1000);
    write_meta(&path, &meta).await?;
    retrieve(jobs, tenant, id).await
}

/// `GET /v1/batches`: the tenant's batches, newest first, `limit` at a time after `after`.
pub(crate) async fn list(
    jobs: &Jobs,
    tenant: &str,
    limit: usize,
    after: Option<&str>,
) -> Result<Value, Refusal> {
    let mut all = Vec::new();
    if let Ok(mut rd) = tokio::fs::read_dir(dir(jobs)).await {
        while let Ok(Some(entry)) = rd.next_entry().await {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".batch.json") {
                if let Some(meta) = read_meta(&entry.path()).await {
                    if meta["tenant"] == tenant {
                        all.push((
                            meta["created_at"].as_u64().unwrap_or(0),
                            id.to_owned(),
                            meta,
                        ));
                    }
                }
            }
        }
    }
    all.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
    let start = after
        .and_then(|a| all.iter().position(|(_, id, _)| id == a).map(|i| i + 1))
        .unwrap_or(0);
    let page: Vec<Value> = all
        .iter()
        .skip(start)
        .take(limit)
        .map(|(_, _, m)| public(m.clone()))
        .collect();
    let has_more = all.len() > start + page.len();
    Ok(json!({
        "object": "list",
        "first_id": page.first().map(|m| m["id"].clone()),
        "last_id": page.last().map(|m| m["id"].clone()),
        "has_more": has_more,
        "data": page,
    }))
}
