//! The OpenAI-compatible endpoints: parsing, accounting, answers and faults.

use crate::Faults;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::time::Instant;
use tollgate_core::duration::format_go_duration;

use crate::body::{full, ProviderBody, ScriptedBody};
use crate::config::ProviderConfig;
use crate::limits::Bucket;
use crate::stats::Stats;
use crate::tokens;

/// Requests larger than this are answered 413.
const MAX_REQUEST_BODY: usize = 8 * 1024 * 1024;

/// The header a request uses to ask for a fault.
pub const FAULT_HEADER: &str = "x-testkit-fault";
/// The header a request uses to set how many tokens the answer has (capped by
/// `max_tokens`).
pub const COMPLETION_TOKENS_HEADER: &str = "x-testkit-completion-tokens";

/// The connection is closed without an answer (a `reset` fault).
#[derive(Debug)]
pub(crate) struct ResetFault;

impl std::fmt::Display for ResetFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the simulated provider reset this connection")
    }
}

impl std::error::Error for ResetFault {}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Status(StatusCode),
    Reset,
    Slow(Duration),
    Cut,
    Malformed,
}

struct KeyState {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    stats: Stats,
}

/// One limit's state after a decision, for the `x-ratelimit-*` headers.
#[derive(Clone, Copy)]
struct LimitSnapshot {
    limit: u64,
    remaining: u64,
    reset: Duration,
}

#[derive(Default)]
struct Snapshot {
    requests: Option<LimitSnapshot>,
    tokens: Option<LimitSnapshot>,
}

struct Refused {
    kind: &'static str,
    wait: Option<Duration>,
    limit: u64,
    requested: u64,
}

pub(crate) struct State {
    config: ProviderConfig,
    /// The faults in force: the configured ones until [`crate::Provider::set_faults`].
    faults: Mutex<Faults>,
    keys: Mutex<HashMap<String, KeyState>>,
    rng: Mutex<fastrand::Rng>,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section below leaves the data consistent, so a poisoned lock (a
    // panic elsewhere in a test) is still safe to use.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    pub(crate) fn set_faults(&self, faults: Faults) {
        *lock(&self.faults) = faults;
    }

    pub(crate) fn new(config: ProviderConfig) -> Self {
        let rng = fastrand::Rng::with_seed(config.seed);
        Self {
            faults: Mutex::new(config.faults.clone()),
            config,
            keys: Mutex::new(HashMap::new()),
            rng: Mutex::new(rng),
            next_id: AtomicU64::new(1),
        }
    }

    fn with_key<R>(&self, key: &str, f: impl FnOnce(&mut KeyState) -> R) -> R {
        let mut keys = lock(&self.keys);
        let now = Instant::now();
        let cfg = &self.config;
        let state = keys.entry(key.to_owned()).or_insert_with(|| KeyState {
            requests: cfg
                .rpm
                .map(|n| Bucket::with_burst(n, cfg.window, cfg.burst.unwrap_or(n), now)),
            tokens: cfg.tpm.map(|n| Bucket::new(n, cfg.window, now)),
            stats: Stats::default(),
        });
        f(state)
    }

    pub(crate) fn stats(&self) -> Stats {
        let keys = lock(&self.keys);
        let mut total = Stats::default();
        for k in keys.values() {
            total.add(&k.stats);
        }
        total
    }

    pub(crate) fn key_stats(&self, key: &str) -> Stats {
        lock(&self.keys)
            .get(key)
            .map(|k| k.stats)
            .unwrap_or_default()
    }

    pub(crate) fn all_key_stats(&self) -> HashMap<String, Stats> {
        lock(&self.keys)
            .iter()
            .map(|(k, v)| (k.clone(), v.stats))
            .collect()
    }

    /// Takes one request and `tokens` tokens, both or neither.
    fn admit(&self, key: &str, tokens: u64) -> (Snapshot, Result<(), Refused>) {
        let now = Instant::now();
        self.with_key(key, |k| {
            let req_wait = k.requests.as_mut().map(|b| b.wait_for(1, now));
            let tok_wait = k.tokens.as_mut().map(|b| b.wait_for(tokens, now));
            let refused = match (req_wait, tok_wait) {
                (_, Some(None)) => Some(Refused {
                    kind: "tokens",
                    wait: None,
                    limit: k.tokens.as_ref().map_or(0, Bucket::capacity),
                    requested: tokens,
                }),
                (Some(Some(r)), t) if !r.is_zero() && r >= t.flatten().unwrap_or_default() => {
                    Some(Refused {
                        kind: "requests",
                        wait: Some(r),
                        limit: k.requests.as_ref().map_or(0, Bucket::capacity),
                        requested: 1,
                    })
                }
                (_, Some(Some(t))) if !t.is_zero() => Some(Refused {
                    kind: "tokens",
                    wait: Some(t),
                    limit: k.tokens.as_ref().map_or(0, Bucket::capacity),
                    requested: tokens,
                }),
                _ => None,
            };
            if refused.is_none() {
                if let Some(b) = k.requests.as_mut() {
                    b.take(1);
                }
                if let Some(b) = k.tokens.as_mut() {
                    b.take(tokens);
                }
            }
            let snap = |b: &Option<Bucket>| {
                b.as_ref().map(|b| LimitSnapshot {
                    limit: b.capacity(),
                    remaining: b.remaining(),
                    reset: b.reset(),
                })
            };
            let snapshot = Snapshot {
                requests: snap(&k.requests),
                tokens: snap(&k.tokens),
            };
            (snapshot, refused.map_or(Ok(()), Err))
        })
    }

    fn pick_fault(&self, headers: &HeaderMap) -> Option<Fault> {
        if let Some(asked) = headers.get(FAULT_HEADER).and_then(|v| v.to_str().ok()) {
            return parse_fault(asked.trim(), lock(&self.faults).slow_first_byte);
        }
        let f = lock(&self.faults).clone();
        let mut rng = lock(&self.rng);
        let mut u = rng.f64();
        let mut hit = |share: f64| {
            if u < share {
                true
            } else {
                u -= share;
                false
            }
        };
        if hit(f.reset_rate) {
            Some(Fault::Reset)
        } else if hit(f.server_error_rate) {
            let status = if rng.bool() {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            Some(Fault::Status(status))
        } else if hit(f.unavailable_rate) {
            Some(Fault::Status(StatusCode::SERVICE_UNAVAILABLE))
        } else if hit(f.slow_rate) {
            Some(Fault::Slow(f.slow_first_byte))
        } else if hit(f.cut_rate) {
            Some(Fault::Cut)
        } else if hit(f.malformed_rate) {
            Some(Fault::Malformed)
        } else if hit(f.rate_limited_rate) {
            Some(Fault::Status(StatusCode::TOO_MANY_REQUESTS))
        } else {
            None
        }
    }
}

fn parse_fault(s: &str, default_slow: Duration) -> Option<Fault> {
    match s {
        "reset" => Some(Fault::Reset),
        "cut" => Some(Fault::Cut),
        "malformed" => Some(Fault::Malformed),
        "slow" => Some(Fault::Slow(default_slow)),
        _ => {
            if let Some(d) = s.strip_prefix("slow=") {
                return tollgate_core::duration::parse_go_duration(d).map(Fault::Slow);
            }
            let code: u16 = s.parse().ok()?;
            StatusCode::from_u16(code)
                .ok()
                .filter(|c| c.is_client_error() || c.is_server_error())
                .map(Fault::Status)
        }
    }
}

/// The API key a request is accounted under (raw: this is a test tool).
fn api_key(headers: &HeaderMap) -> String {
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    bearer
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
        .unwrap_or_else(|| "anonymous".to_owned())
}

fn error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response<ProviderBody> {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    let mut res = Response::new(full(body.to_string()));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

fn set_limit_headers(h: &mut HeaderMap, snap: &Snapshot) {
    for (what, s) in [("requests", snap.requests), ("tokens", snap.tokens)] {
        let Some(s) = s else { continue };
        let mut put = |name: String, value: String| {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                h.insert(n, v);
            }
        };
        put(format!("x-ratelimit-limit-{what}"), s.limit.to_string());
        put(
            format!("x-ratelimit-remaining-{what}"),
            s.remaining.to_string(),
        );
        put(
            format!("x-ratelimit-reset-{what}"),
            format_go_duration(round_ms(s.reset)),
        );
    }
}

/// Durations in headers are written to the millisecond, as OpenAI does.
fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_nanos().div_ceil(1_000_000) as u64)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What a parsed request asks for.
struct Job {
    model: String,
    kind: JobKind,
    prompt_tokens: u64,
    /// Tokens per choice.
    completion_tokens: u64,
    choices: u64,
    finish_reason: &'static str,
    stream: bool,
    include_usage: bool,
}

#[derive(Clone, PartialEq)]
enum JobKind {
    Chat,
    /// One seed per input, from its text: an input's vector is the same whichever
    /// request, and wherever in it, it comes (so a batch can be checked against single
    /// calls).
    Embeddings {
        seeds: Vec<u64>,
        /// `encoding_format: base64`: each vector as the base64 of its little-endian
        /// `f32`s, as OpenAI sends it.
        base64: bool,
    },
}

/// An input's vector: eight numbers from its seed, as floats or as OpenAI's base64 of
/// little-endian `f32`s.
fn embedding(seed: u64, base64: bool) -> Value {
    let v = (0..8u64).map(|d| (seed.wrapping_add(d * 7) % 17) as f32 / 17.0);
    if base64 {
        use base64::Engine as _;
        let bytes: Vec<u8> = v.flat_map(f32::to_le_bytes).collect();
        Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
    } else {
        v.map(f64::from).collect()
    }
}

fn bad_request(message: &str) -> Response<ProviderBody> {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "invalid_request",
        message,
    )
}

fn parse_job(
    config: &ProviderConfig,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Job, String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| format!("We could not parse the JSON body of your request: {e}"))?;
    let model = v
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| String::from("you must provide a model parameter"))?
        .to_owned();
    if path == "/v1/embeddings" {
        let input = v
            .get("input")
            .ok_or_else(|| String::from("'input' is a required property"))?;
        let prompt_tokens = tokens::embedding_input(tokens::Vocab::for_model(&model), input)
            .ok_or_else(|| String::from("'input' is invalid"))?;
        // FNV-1a of the input's JSON.
        let seed = |v: &Value| {
            v.to_string()
                .bytes()
                .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                })
        };
        let seeds = match input {
            Value::Array(items) if items.iter().all(|i| !i.is_number()) => {
                items.iter().map(seed).collect()
            }
            other => vec![seed(other)],
        };
        let base64 = match v.get("encoding_format").and_then(Value::as_str) {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(format!(
                    "'{other}' is not one of ['float', 'base64'] - 'encoding_format'"
                ))
            }
        };
        return Ok(Job {
            model,
            kind: JobKind::Embeddings { seeds, base64 },
            prompt_tokens,
            completion_tokens: 0,
            choices: 1,
            finish_reason: "stop",
            stream: false,
            include_usage: false,
        });
    }
    let messages = v
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| String::from("'messages' must be a non-empty array"))?;
    let cap = v
        .get("max_completion_tokens")
        .or_else(|| v.get("max_tokens"))
        .and_then(Value::as_u64);
    let wanted = headers
        .get(COMPLETION_TOKENS_HEADER)
        .and_then(|h| h.to_str().ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(config.completion_tokens);
    let (completion_tokens, finish_reason) = match cap {
        Some(cap) if cap < wanted => (cap, "length"),
        _ => (wanted, "stop"),
    };
    let prompt_tokens = tokens::chat_prompt(tokens::Vocab::for_model(&model), messages);
    Ok(Job {
        model,
        kind: JobKind::Chat,
        prompt_tokens,
        completion_tokens,
        choices: v.get("n").and_then(Value::as_u64).unwrap_or(1).clamp(1, 16),
        finish_reason,
        stream: v.get("stream").and_then(Value::as_bool).unwrap_or(false),
        include_usage: v
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

impl Job {
    fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens * self.choices
    }

    fn usage(&self) -> Value {
        let completion = self.completion_tokens * self.choices;
        if matches!(self.kind, JobKind::Embeddings { .. }) {
            return json!({"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens});
        }
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    fn answer_json(&self, id: &str) -> Value {
        match &self.kind {
            JobKind::Embeddings { seeds, base64 } => json!({
                "object": "list",
                "model": self.model,
                "data": seeds.iter().enumerate().map(|(i, s)| json!({
                    "object": "embedding",
                    "index": i,
                    "embedding": embedding(*s, *base64),
                })).collect::<Vec<_>>(),
                "usage": self.usage(),
            }),
            JobKind::Chat => {
                let content: String = tokens::answer_pieces(self.completion_tokens).collect();
                json!({
                    "id": id,
                    "object": "chat.completion",
                    "created": unix_now(),
                    "model": self.model,
                    "choices": (0..self.choices).map(|i| json!({
                        "index": i,
                        "message": {"role": "assistant", "content": content, "refusal": null},
                        "logprobs": null,
                        "finish_reason": self.finish_reason,
                    })).collect::<Vec<_>>(),
                    "usage": self.usage(),
                })
            }
        }
    }

    /// The SSE events of a streamed answer, `per_chunk` tokens to a content event.
    fn sse_events(&self, id: &str, per_chunk: u64) -> Vec<Bytes> {
        let created = unix_now();
        let usage_null = self.include_usage;
        let chunk = |choices: Value| {
            let mut c = json!({
                "id": id, "object": "chat.completion.chunk", "created": created,
                "model": self.model, "choices": choices,
            });
            if usage_null {
                c["usage"] = Value::Null;
            }
            Bytes::from(format!("data: {c}\n\n"))
        };
        let mut events = Vec::new();
        for i in 0..self.choices {
            events.push(chunk(
                json!([{"index": i, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": null, "finish_reason": null}]),
            ));
            let pieces: Vec<&str> = tokens::answer_pieces(self.completion_tokens).collect();
            for group in pieces.chunks(per_chunk.max(1) as usize) {
                events.push(chunk(
                    json!([{"index": i, "delta": {"content": group.concat()},
                                          "logprobs": null, "finish_reason": null}]),
                ));
            }
            events.push(chunk(json!([{"index": i, "delta": {}, "logprobs": null,
                                      "finish_reason": self.finish_reason}])));
        }
        if self.include_usage {
            let c = json!({
                "id": id, "object": "chat.completion.chunk", "created": created,
                "model": self.model, "choices": [], "usage": self.usage(),
            });
            events.push(Bytes::from(format!("data: {c}\n\n")));
        }
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
        events
    }
}

impl State {
    fn count(&self, key: &str, f: impl FnOnce(&mut Stats)) {
        self.with_key(key, |k| f(&mut k.stats));
    }

    pub(crate) async fn handle(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<ProviderBody>, ResetFault> {
        let key = api_key(req.headers());
        let (parts, body) = req.into_parts();
        let path = parts.uri.path();

        if parts.method == Method::GET && path == "/testkit/stats" {
            let body = json!({"total": self.stats(), "keys": self.all_key_stats()});
            let mut res = Response::new(full(body.to_string()));
            res.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return Ok(res);
        }

        self.count(&key, |s| s.requests += 1);
        let known = matches!(path, "/v1/chat/completions" | "/v1/embeddings");
        if !known {
            self.count(&key, |s| s.bad_requests += 1);
            return Ok(error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "unknown_url",
                &format!("Unknown request URL: {} {path}", parts.method),
            ));
        }
        if parts.method != Method::POST {
            self.count(&key, |s| s.bad_requests += 1);
            return Ok(error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method_not_allowed",
                "Only POST is supported here",
            ));
        }
        let bytes = match Limited::new(body, MAX_REQUEST_BODY).collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) => {
                self.count(&key, |s| s.bad_requests += 1);
                let status = if e.is::<http_body_util::LengthLimitError>() {
                    StatusCode::PAYLOAD_TOO_LARGE
                } else {
                    StatusCode::BAD_REQUEST
                };
                return Ok(error(
                    status,
                    "invalid_request_error",
                    "body",
                    &e.to_string(),
                ));
            }
        };

        let fault = self.pick_fault(&parts.headers);
        match fault {
            Some(Fault::Reset) => {
                self.count(&key, |s| s.faults += 1);
                return Err(ResetFault);
            }
            Some(Fault::Status(StatusCode::TOO_MANY_REQUESTS)) => {
                self.count(&key, |s| s.rate_limited += 1);
                let mut res = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "requests",
                    "rate_limit_exceeded",
                    "Rate limit reached (the simulated provider answered 429 on purpose).",
                );
                let h = res.headers_mut();
                h.insert("retry-after-ms", HeaderValue::from_static("100"));
                h.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
                return Ok(res);
            }
            Some(Fault::Status(status)) => {
                self.count(&key, |s| s.faults += 1);
                let reason = status.canonical_reason().unwrap_or("error");
                return Ok(error(
                    status,
                    "server_error",
                    "injected_fault",
                    &format!("The simulated provider answered {status} on purpose ({reason})."),
                ));
            }
            Some(Fault::Slow(d)) => tokio::time::sleep(d).await,
            _ => {}
        }

        let job = match parse_job(&self.config, path, &parts.headers, &bytes) {
            Ok(job) => job,
            Err(message) => {
                self.count(&key, |s| s.bad_requests += 1);
                return Ok(bad_request(&message));
            }
        };

        let (snapshot, admitted) = self.admit(&key, job.total_tokens());
        if let Err(r) = admitted {
            self.count(&key, |s| s.rate_limited += 1);
            return Ok(rate_limited(&job, &r, &snapshot));
        }

        if !self.config.latency.is_zero() {
            tokio::time::sleep(self.config.latency).await;
        }

        let cut = fault == Some(Fault::Cut);
        let malformed = fault == Some(Fault::Malformed);
        self.count(&key, |s| {
            if cut || malformed {
                s.faults += 1;
            } else {
                s.ok += 1;
                s.prompt_tokens += job.prompt_tokens;
                s.completion_tokens += job.completion_tokens * job.choices;
            }
        });

        let id = format!("chatcmpl-{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let mut res = if job.stream {
            let mut events = job.sse_events(&id, self.config.tokens_per_chunk);
            if malformed {
                let mid = events.len() / 2;
                events[mid] =
                    Bytes::from_static(b"data: {\"id\": \"chatcmpl-broken\", \"choices\": [\n\n");
            }
            let cut_after = cut.then_some(events.len() / 2);
            let mut res = Response::new(
                ScriptedBody::new(events, self.config.chunk_delay, cut_after).boxed(),
            );
            res.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream; charset=utf-8"),
            );
            res
        } else {
            let body = Bytes::from(job.answer_json(&id).to_string());
            let mut res = if malformed {
                Response::new(full(body.slice(..body.len() / 2)))
            } else if cut {
                let len = body.len();
                let halves = vec![body.slice(..len / 2), body.slice(len / 2..)];
                let mut res =
                    Response::new(ScriptedBody::new(halves, Duration::ZERO, Some(1)).boxed());
                res.headers_mut()
                    .insert(CONTENT_LENGTH, HeaderValue::from(len));
                res
            } else {
                Response::new(full(body))
            };
            res.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            res
        };
        let h = res.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&id) {
            h.insert("x-request-id", v);
        }
        set_limit_headers(h, &snapshot);
        Ok(res)
    }
}

fn rate_limited(job: &Job, r: &Refused, snapshot: &Snapshot) -> Response<ProviderBody> {
    let per = if r.kind == "requests" {
        "requests per min (RPM)"
    } else {
        "tokens per min (TPM)"
    };
    let message = match r.wait {
        Some(wait) => format!(
            "Rate limit reached for {} on {per}: Limit {}, Requested {}. Please try again in {}.",
            job.model,
            r.limit,
            r.requested,
            format_go_duration(round_ms(wait)),
        ),
        None => format!(
            "Request too large for {} on {per}: Limit {}, Requested {}.",
            job.model, r.limit, r.requested,
        ),
    };
    let code = if r.wait.is_some() {
        "rate_limit_exceeded"
    } else {
        "request_too_large"
    };
    let mut res = error(StatusCode::TOO_MANY_REQUESTS, r.kind, code, &message);
    let h = res.headers_mut();
    match r.wait {
        Some(wait) => {
            let ms = wait.as_nanos().div_ceil(1_000_000) as u64;
            h.insert("retry-after-ms", HeaderValue::from(ms));
            h.insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(ms.div_ceil(1000)),
            );
        }
        None => {
            h.insert("x-should-retry", HeaderValue::from_static("false"));
        }
    }
    set_limit_headers(h, snapshot);
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_asked_by_header() {
        let d = Duration::from_millis(100);
        assert_eq!(parse_fault("reset", d), Some(Fault::Reset));
        assert_eq!(parse_fault("slow", d), Some(Fault::Slow(d)));
        assert_eq!(
            parse_fault("slow=2s", d),
            Some(Fault::Slow(Duration::from_secs(2)))
        );
        assert_eq!(
            parse_fault("529", d),
            Some(Fault::Status(StatusCode::from_u16(529).unwrap()))
        );
        assert_eq!(parse_fault("200", d), None, "a success is not a fault");
        assert_eq!(parse_fault("nonsense", d), None);
    }

    #[test]
    fn random_faults_follow_their_rates() {
        let config = ProviderConfig {
            faults: crate::Faults {
                server_error_rate: 0.2,
                reset_rate: 0.1,
                ..Default::default()
            },
            ..Default::default()
        };
        let state = State::new(config);
        let n = 10_000;
        let (mut errors, mut resets) = (0, 0);
        for _ in 0..n {
            match state.pick_fault(&HeaderMap::new()) {
                Some(Fault::Status(_)) => errors += 1,
                Some(Fault::Reset) => resets += 1,
                None => {}
                other => panic!("unexpected fault {other:?}"),
            }
        }
        assert!((1800..2200).contains(&errors), "{errors}");
        assert!((850..1150).contains(&resets), "{resets}");
    }

    #[tokio::test(start_paused = true)]
    async fn requests_and_tokens_are_admitted_together_or_not_at_all() {
        let config = ProviderConfig {
            rpm: Some(10),
            tpm: Some(100),
            ..Default::default()
        };
        let state = State::new(config);
        let (_, ok) = state.admit("k", 90);
        assert!(ok.is_ok());
        let (snap, refused) = state.admit("k", 20);
        let r = refused.err().unwrap();
        assert_eq!(r.kind, "tokens");
        assert_eq!(
            snap.requests.unwrap().remaining,
            9,
            "a refused request spends nothing"
        );
        // 10 tokens short at 100 per minute: 6 seconds.
        assert_eq!(r.wait, Some(Duration::from_secs(6)));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(state.admit("k", 20).1.is_ok());
        let (_, never) = state.admit("k", 101);
        assert_eq!(never.err().unwrap().wait, None);
    }
}
