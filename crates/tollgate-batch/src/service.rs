//! [`Batch`], the service: join a group, or go alone.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, Limited};
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;
use tollgate_core::body::CallerBody;
use tollgate_core::clock::Clock;
use tollgate_core::facts::{buffer_with_facts, ReplayBody};
use tollgate_core::BoxError;
use tower::{Service, ServiceExt};

use crate::layer::Settings;

/// The body of an answer through [`Batch`].
pub type BatchBody = UnsyncBoxBody<Bytes, BoxError>;

/// The future of [`Batch`]: boxed, because it may wait for its group.
pub type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<BatchBody>, BoxError>> + Send>>;

/// The largest batched answer read (vectors of 2,048 inputs at 3,072 dimensions in JSON).
const MAX_ANSWER: usize = 256 * 1024 * 1024;

/// A batch's call failed before it had an answer: the error, shared by every member.
#[derive(Clone, Debug)]
pub struct BatchError(Arc<dyn std::error::Error + Send + Sync>);

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the batched embeddings call failed: {}", self.0)
    }
}

impl std::error::Error for BatchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

type Outcome = Result<Response<BatchBody>, BatchError>;

/// One caller in a group: its inputs, their tokens, and where its answer goes.
pub(crate) struct Member {
    texts: Vec<Value>,
    tokens: u64,
    /// Its request as it came, to send as it is when it is alone.
    alone: Request<ReplayBody>,
    tx: oneshot::Sender<Outcome>,
}

/// Requests of one model and one set of parameters, gathering until sent.
pub(crate) struct Group {
    id: u64,
    /// The body without `input`: the same for every member.
    base: Map<String, Value>,
    members: Vec<Member>,
    items: usize,
    tokens: u64,
}

static NEXT_GROUP: AtomicU64 = AtomicU64::new(1);

/// A service that batches embeddings requests. Built by [`BatchLayer`](crate::BatchLayer).
#[derive(Clone)]
pub struct Batch<S> {
    pub(crate) inner: S,
    pub(crate) settings: Arc<Settings>,
    pub(crate) groups: Arc<Mutex<HashMap<String, Group>>>,
}

impl<S> std::fmt::Debug for Batch<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").finish_non_exhaustive()
    }
}

impl<S> Batch<S> {
    tollgate_core::inner_service_accessors!();
}

fn boxed<E: Into<BoxError>>(e: E) -> BoxError {
    e.into()
}

fn full(bytes: Bytes) -> BatchBody {
    Full::new(bytes).map_err(|e| match e {}).boxed_unsync()
}

/// The inputs a request may be batched with: strings (one, or an array of them).
fn texts(input: Option<&Value>) -> Option<Vec<Value>> {
    match input? {
        Value::String(_) => Some(vec![input?.clone()]),
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_string) => {
            Some(items.clone())
        }
        _ => None,
    }
}

impl<S, B, ResB> Service<Request<B>> for Batch<S>
where
    S: Service<Request<ReplayBody>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: CallerBody,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<BatchBody>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(boxed)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (settings, groups) = (Arc::clone(&self.settings), Arc::clone(&self.groups));
        let svc = tollgate_core::service::take_ready(&mut self.inner);
        Box::pin(async move {
            let (req, facts) = buffer_with_facts(req, settings.body_limit).await?;
            let parsed = (req.uri().path() == "/v1/embeddings")
                .then(|| serde_json::from_slice::<Value>(facts.body()).ok())
                .flatten();
            let Some(Value::Object(mut base)) = parsed else {
                return alone(svc, req).await;
            };
            let Some(texts) = texts(base.get("input")) else {
                return alone(svc, req).await;
            };
            base.remove("input");
            let tokens = texts
                .iter()
                .map(|t| (settings.count)(t.as_str().unwrap_or_default()))
                .sum();
            // One group per credentials, path and parameters.
            let auth = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default();
            let key = format!("{auth}\n{}", Value::Object(base.clone()));
            let (tx, rx) = oneshot::channel();
            let member = Member {
                texts,
                tokens,
                alone: req,
                tx,
            };
            join(&settings, &groups, key, base, member, svc);
            match rx.await {
                Ok(Ok(res)) => Ok(res),
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err("the batch this request was in was lost".into()),
            }
        })
    }
}

/// Sends `req` as it came, its answer as it is.
async fn alone<S, ResB>(svc: S, req: Request<ReplayBody>) -> Result<Response<BatchBody>, BoxError>
where
    S: Service<Request<ReplayBody>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let res = svc.oneshot(req).await.map_err(boxed)?;
    Ok(res.map(|b| b.map_err(boxed).boxed_unsync()))
}

/// Puts `member` in its group: sends a full group first, starts a new one (and its
/// timer) when there is none.
fn join<S, ResB>(
    settings: &Arc<Settings>,
    groups: &Arc<Mutex<HashMap<String, Group>>>,
    key: String,
    base: Map<String, Value>,
    member: Member,
    svc: S,
) where
    S: Service<Request<ReplayBody>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    // Each section moves a few values; a panic elsewhere leaves the map whole.
    let mut all = groups.lock().unwrap_or_else(PoisonError::into_inner);
    let n = member.texts.len();
    if let Some(g) = all.get_mut(&key) {
        if g.items + n <= settings.max_items
            && g.tokens + member.tokens <= settings.max_input_tokens
        {
            g.items += n;
            g.tokens += member.tokens;
            g.members.push(member);
            if g.items == settings.max_items {
                if let Some(full) = all.remove(&key) {
                    tokio::spawn(send(svc, full));
                }
            }
            return;
        }
        // It would not fit: the group goes now, and this one starts the next.
        if let Some(full) = all.remove(&key) {
            tokio::spawn(send(svc.clone(), full));
        }
    }
    let id = NEXT_GROUP.fetch_add(1, Ordering::Relaxed);
    let group = Group {
        id,
        base,
        items: n,
        tokens: member.tokens,
        members: vec![member],
    };
    all.insert(key.clone(), group);
    drop(all);
    let (settings, groups) = (Arc::clone(settings), Arc::clone(groups));
    tokio::spawn(async move {
        settings.clock.sleep(settings.max_delay).await;
        let due = {
            let mut all = groups.lock().unwrap_or_else(PoisonError::into_inner);
            match all.get(&key) {
                Some(g) if g.id == id => all.remove(&key),
                _ => None,
            }
        };
        if let Some(g) = due {
            send(svc, g).await;
        }
    });
}

/// Sends a group as one request (or its one member's request as it came) and hands each
/// member its part of the answer.
async fn send<S, ResB>(svc: S, group: Group)
where
    S: Service<Request<ReplayBody>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    // Members whose callers went away leave the batch.
    let mut members: Vec<Member> = group
        .members
        .into_iter()
        .filter(|m| !m.tx.is_closed())
        .collect();
    if members.len() <= 1 {
        if let Some(m) = members.pop() {
            let out = alone(svc, m.alone)
                .await
                .map_err(|e| BatchError(Arc::from(e)));
            let _ = m.tx.send(out);
        }
        return;
    }
    let inputs: Vec<Value> = members
        .iter()
        .flat_map(|m| m.texts.iter().cloned())
        .collect();
    let total = inputs.len();
    let mut body = group.base;
    body.insert("input".into(), Value::Array(inputs));
    let (mut parts, _) = match members.first() {
        Some(first) => clone_head(&first.alone),
        None => return,
    };
    parts.headers.remove(http::header::CONTENT_LENGTH);
    let req = Request::from_parts(
        parts,
        Full::new(Bytes::from(Value::Object(body).to_string())),
    );
    let answer = async {
        let res = svc.oneshot(req).await.map_err(boxed)?;
        let (parts, body) = res.into_parts();
        let bytes = Limited::new(body, MAX_ANSWER)
            .collect()
            .await
            .map_err(boxed)?
            .to_bytes();
        Ok::<_, BoxError>((parts, bytes))
    };
    match answer.await {
        Err(e) => {
            let shared: Arc<dyn std::error::Error + Send + Sync> = Arc::from(e);
            for m in members {
                let _ = m.tx.send(Err(BatchError(Arc::clone(&shared))));
            }
        }
        Ok((parts, bytes)) => split(members, total, parts, bytes),
    }
}

/// The request head of `req`, to send the batch under (its URI, method and headers).
fn clone_head(req: &Request<ReplayBody>) -> (http::request::Parts, ()) {
    let mut b = Request::builder()
        .method(req.method().clone())
        .uri(req.uri().clone())
        .version(req.version());
    if let Some(h) = b.headers_mut() {
        *h = req.headers().clone();
    }
    match b.body(()) {
        Ok(r) => r.into_parts(),
        Err(_) => Request::new(()).into_parts(),
    }
}

/// Hands each member its vectors (indexed from 0) and its share of `usage`; an answer
/// that is not a list of `total` vectors reaches every member as it is.
fn split(members: Vec<Member>, total: usize, parts: http::response::Parts, bytes: Bytes) {
    let parsed: Option<Value> = parts
        .status
        .is_success()
        .then(|| serde_json::from_slice(&bytes).ok())
        .flatten();
    let mut data: Vec<Value> = parsed
        .as_ref()
        .and_then(|v| v["data"].as_array().cloned())
        .unwrap_or_default();
    if parsed.is_none() || data.len() != total {
        for m in members {
            let mut res = Response::new(full(bytes.clone()));
            *res.status_mut() = parts.status;
            *res.headers_mut() = parts.headers.clone();
            let _ = m.tx.send(Ok(res));
        }
        return;
    }
    data.sort_by_key(|d| d["index"].as_u64().unwrap_or(u64::MAX));
    let v = parsed.unwrap_or_default();
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
    let counted: u64 = members.iter().map(|m| m.tokens).sum();
    let mut given = 0u64;
    let mut offset = 0usize;
    let last = members.len() - 1;
    for (k, m) in members.into_iter().enumerate() {
        let n = m.texts.len();
        let mine: Vec<Value> = data[offset..offset + n]
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let mut d = d.clone();
                d["index"] = json!(i);
                d
            })
            .collect();
        offset += n;
        // Its share of the prompt tokens: its own count when the counts add up to the
        // provider's, else in proportion (the last member takes the rounding).
        let share = if counted == prompt {
            m.tokens
        } else if k == last {
            prompt.saturating_sub(given)
        } else {
            (u128::from(prompt) * u128::from(m.tokens) / u128::from(counted.max(1))) as u64
        };
        given += share;
        let body = json!({
            "object": "list",
            "data": mine,
            "model": v["model"],
            "usage": {"prompt_tokens": share, "total_tokens": share},
        });
        let mut res = Response::new(full(Bytes::from(body.to_string())));
        *res.status_mut() = parts.status;
        *res.headers_mut() = parts.headers.clone();
        res.headers_mut().remove(http::header::CONTENT_LENGTH);
        let _ = m.tx.send(Ok(res));
    }
}
