//! Request facts: the body buffered once, the JSON parsed once, the fields every layer
//! needs.
//!
//! The first Tollgate layer that needs the body calls [`buffer_request`]: it reads the
//! body up to a cap into [`Bytes`], parses the JSON once and puts a [`RequestFacts`] in
//! the request's extensions. Every later layer finds the facts there and reuses them, so
//! the body is read once and parsed once however many layers look at it; and because the
//! facts hold the body, retry and failover can replay it.
//!
//! Shapes understood: OpenAI chat completions, completions, embeddings and the Responses
//! API, Anthropic messages and Gemini's `generateContent`. Anything else that is JSON
//! still yields facts (with [`ApiKind::Unknown`] and, perhaps, no model). A body that is
//! not JSON at all is an error only when the request says it is JSON (or says nothing);
//! other content types (gRPC, forms) yield facts with no JSON.
//!
//! ```
//! use bytes::Bytes;
//! use http::Request;
//! use http_body_util::Full;
//! use tollgate_core::facts::{buffer_request, ApiKind, RequestFacts, DEFAULT_BODY_LIMIT};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let body = r#"{"model":"gpt-4o","stream":true,"max_tokens":64,
//!                "messages":[{"role":"user","content":"Hi"}]}"#;
//! let req = Request::post("/v1/chat/completions")
//!     .body(Full::new(Bytes::from(body)))
//!     .unwrap();
//!
//! let req = buffer_request(req, DEFAULT_BODY_LIMIT).await.unwrap();
//! let facts = RequestFacts::get(&req).unwrap();
//! assert_eq!(facts.kind(), ApiKind::ChatCompletions);
//! assert_eq!(facts.model(), Some("gpt-4o"));
//! assert!(facts.is_stream());
//! assert_eq!(facts.max_output_tokens(), Some(64));
//! assert_eq!(facts.prompt().texts, ["Hi", "user"]);
//! # }
//! ```

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use serde_json::Value;

use crate::body::RequestBody;
use crate::response::openai_error;
use crate::BoxError;

/// The default cap on a buffered request body: 10 MiB, room for a long prompt with a few
/// inline images.
pub const DEFAULT_BODY_LIMIT: usize = 10 * 1024 * 1024;

/// The body type of a request after [`buffer_request`]: the buffered bytes, replayable.
pub type ReplayBody = Full<Bytes>;

/// Which API a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ApiKind {
    /// OpenAI `POST /v1/chat/completions` (and compatible servers).
    ChatCompletions,
    /// OpenAI `POST /v1/completions`.
    Completions,
    /// OpenAI `POST /v1/embeddings`.
    Embeddings,
    /// OpenAI `POST /v1/responses`.
    Responses,
    /// Anthropic `POST /v1/messages`.
    AnthropicMessages,
    /// Gemini `:generateContent` / `:streamGenerateContent`.
    GeminiGenerate,
    /// Anything else.
    Unknown,
}

impl ApiKind {
    fn from_path(path: &str) -> Option<Self> {
        let path = path.trim_end_matches('/');
        Some(if path.ends_with("/chat/completions") {
            Self::ChatCompletions
        } else if path.ends_with("/completions") {
            Self::Completions
        } else if path.ends_with("/embeddings") {
            Self::Embeddings
        } else if path.ends_with("/responses") {
            Self::Responses
        } else if path.ends_with("/messages") {
            Self::AnthropicMessages
        } else if path.ends_with(":generateContent") || path.ends_with(":streamGenerateContent") {
            Self::GeminiGenerate
        } else {
            return None;
        })
    }

    fn from_shape(obj: &serde_json::Map<String, Value>) -> Self {
        if obj.contains_key("messages") {
            if obj.contains_key("system") || !obj.contains_key("model") {
                // `system` at the top is Anthropic's; OpenAI puts it in `messages`.
                Self::AnthropicMessages
            } else {
                Self::ChatCompletions
            }
        } else if obj.contains_key("contents") {
            Self::GeminiGenerate
        } else if obj.contains_key("prompt") {
            Self::Completions
        } else if obj.contains_key("input") {
            let embedding_model = obj
                .get("model")
                .and_then(Value::as_str)
                .is_some_and(|m| m.contains("embed"));
            if embedding_model && !obj.contains_key("instructions") {
                Self::Embeddings
            } else {
                Self::Responses
            }
        } else {
            Self::Unknown
        }
    }

    /// True for APIs whose output costs tokens (everything but embeddings).
    pub fn generates(&self) -> bool {
        !matches!(self, Self::Embeddings)
    }
}

/// What went wrong while reading a request's facts.
#[derive(Debug)]
#[non_exhaustive]
pub enum FactsError {
    /// The body is larger than the cap. Becomes `413 Payload Too Large`.
    TooLarge {
        /// The cap, in bytes.
        limit: usize,
    },
    /// The body could not be read (the client went away, a transport error).
    Body(BoxError),
    /// The request says it is JSON, and it is not.
    MalformedJson(serde_json::Error),
    /// The request has no body, and needs one: it says it is JSON, or it is sent to a
    /// model endpoint (`/v1/chat/completions`, `/v1/embeddings`, …).
    EmptyBody,
}

impl FactsError {
    /// The status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Body(_) | Self::MalformedJson(_) | Self::EmptyBody => StatusCode::BAD_REQUEST,
        }
    }

    /// A response in OpenAI's error shape.
    pub fn to_response<B: From<Bytes>>(&self) -> Response<B> {
        let code = match self {
            Self::TooLarge { .. } => "request_too_large",
            Self::Body(_) => "body_read_error",
            Self::MalformedJson(_) => "invalid_json",
            Self::EmptyBody => "empty_body",
        };
        openai_error(
            self.status(),
            "invalid_request_error",
            code,
            &self.to_string(),
        )
    }
}

impl fmt::Display for FactsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { limit } => {
                write!(f, "request body is larger than the {limit}-byte limit")
            }
            Self::Body(e) => write!(f, "could not read the request body: {e}"),
            Self::MalformedJson(e) => write!(f, "request body is not valid JSON: {e}"),
            Self::EmptyBody => f.write_str("request body is empty; a JSON body is required"),
        }
    }
}

impl std::error::Error for FactsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Body(e) => Some(&**e),
            Self::MalformedJson(e) => Some(e),
            Self::TooLarge { .. } | Self::EmptyBody => None,
        }
    }
}

/// The facts of one request. Immutable and cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct RequestFacts {
    inner: Arc<Inner>,
}

struct Inner {
    body: Bytes,
    json: Option<Value>,
    kind: ApiKind,
    model: Option<String>,
    stream: bool,
    include_usage: bool,
    max_output_tokens: Option<u64>,
    choices: u32,
}

impl fmt::Debug for RequestFacts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("RequestFacts")
            .field("kind", &i.kind)
            .field("model", &i.model)
            .field("stream", &i.stream)
            .field("include_usage", &i.include_usage)
            .field("max_output_tokens", &i.max_output_tokens)
            .field("choices", &i.choices)
            .field("body_len", &i.body.len())
            .finish()
    }
}

/// A request without a `Content-Type` is read as JSON, as OpenAI's API reads it.
fn is_json_content_type(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_none() || crate::headers::is_json(headers)
}

impl RequestFacts {
    /// Parses the facts of a request whose body is already in memory.
    ///
    /// `path` (the URI path) decides the [`ApiKind`] when it names a known endpoint; the
    /// body's shape decides otherwise.
    ///
    /// A body that is empty (or only white space) is refused with
    /// [`FactsError::EmptyBody`] when the request says it is JSON or goes to a model
    /// endpoint: sent on, it would spend a quota cell on a certain 400.
    pub fn parse(path: &str, headers: &HeaderMap, body: Bytes) -> Result<Self, FactsError> {
        let json_type = is_json_content_type(headers);
        let json = if body.iter().all(u8::is_ascii_whitespace) {
            if json_type
                && (headers.contains_key(CONTENT_TYPE) || ApiKind::from_path(path).is_some())
            {
                return Err(FactsError::EmptyBody);
            }
            None
        } else if !json_type {
            None
        } else {
            Some(serde_json::from_slice::<Value>(&body).map_err(FactsError::MalformedJson)?)
        };
        let kind = ApiKind::from_path(path).unwrap_or_else(|| {
            json.as_ref()
                .and_then(Value::as_object)
                .map_or(ApiKind::Unknown, ApiKind::from_shape)
        });
        Ok(Self::from_parts(body, json, kind))
    }

    fn from_parts(body: Bytes, json: Option<Value>, kind: ApiKind) -> Self {
        let obj = json.as_ref().and_then(Value::as_object);
        let field = |name: &str| obj.and_then(|o| o.get(name));
        let model = field("model").and_then(Value::as_str).map(str::to_owned);
        let stream = field("stream").and_then(Value::as_bool).unwrap_or(false);
        let include_usage = field("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let max_output_tokens = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
            .into_iter()
            .find_map(|name| field(name).and_then(Value::as_u64))
            .or_else(|| {
                field("generationConfig")
                    .and_then(|g| g.get("maxOutputTokens"))
                    .and_then(Value::as_u64)
            });
        let choices = field("n")
            .and_then(Value::as_u64)
            .map_or(1, |n| n.clamp(1, 128) as u32);
        Self {
            inner: Arc::new(Inner {
                body,
                json,
                kind,
                model,
                stream,
                include_usage,
                max_output_tokens,
                choices,
            }),
        }
    }

    /// The facts a layer put in `req`'s extensions, if any.
    pub fn get<B>(req: &Request<B>) -> Option<&RequestFacts> {
        req.extensions().get::<RequestFacts>()
    }

    /// The buffered body, cheap to clone.
    pub fn body(&self) -> &Bytes {
        &self.inner.body
    }

    /// The parsed JSON body, when the body is JSON.
    pub fn json(&self) -> Option<&Value> {
        self.inner.json.as_ref()
    }

    /// Which API the request is for.
    pub fn kind(&self) -> ApiKind {
        self.inner.kind
    }

    /// The `model` field.
    pub fn model(&self) -> Option<&str> {
        self.inner.model.as_deref()
    }

    /// True when the request asks for a streamed (SSE) answer.
    pub fn is_stream(&self) -> bool {
        self.inner.stream
    }

    /// True when a streamed chat request asked for the usage chunk
    /// (`stream_options.include_usage`).
    pub fn include_usage(&self) -> bool {
        self.inner.include_usage
    }

    /// The most the request may generate per choice: `max_completion_tokens`, else
    /// `max_tokens`, else `max_output_tokens` (Responses API), else Gemini's
    /// `generationConfig.maxOutputTokens`.
    pub fn max_output_tokens(&self) -> Option<u64> {
        self.inner.max_output_tokens
    }

    /// How many choices the request asks for (`n`, 1 when absent, at most 128).
    pub fn choices(&self) -> u32 {
        self.inner.choices
    }

    /// The text a provider will count as the prompt, gathered from the JSON without
    /// copying strings (tool definitions are serialized, since providers count them as
    /// text).
    pub fn prompt(&self) -> Prompt<'_> {
        let mut prompt = Prompt::default();
        if let Some(obj) = self.json().and_then(Value::as_object) {
            for name in ["system", "instructions", "systemInstruction"] {
                if let Some(v) = obj.get(name) {
                    prompt.walk(v);
                }
            }
            for name in ["messages", "contents"] {
                if let Some(Value::Array(items)) = obj.get(name) {
                    for item in items {
                        prompt.messages += 1;
                        prompt.walk(item);
                    }
                }
            }
            for name in ["prompt", "input", "suffix"] {
                if let Some(v) = obj.get(name) {
                    prompt.input(v);
                }
            }
            for name in ["tools", "functions", "response_format"] {
                if let Some(v) = obj.get(name) {
                    prompt.texts.push(Cow::Owned(v.to_string()));
                }
            }
        }
        prompt
    }

    /// New facts for a body rewritten by `edit` (a model swapped by failover, say). The
    /// original facts, and the caller's copy of the body, are left as they were.
    ///
    /// Returns `None` when the body is not JSON.
    pub fn rewrite(&self, edit: impl FnOnce(&mut Value)) -> Option<Self> {
        let mut json = self.json()?.clone();
        edit(&mut json);
        // Serializing a `Value` cannot fail: its map keys are always strings.
        let body = Bytes::from(serde_json::to_vec(&json).ok()?);
        Some(Self::from_parts(body, Some(json), self.kind()))
    }

    /// The facts of this request asking for its usage chunk, for a streamed chat request
    /// that did not (`stream_options.include_usage: true` added); `None` when it needs no
    /// change or cannot take one (a `stream_options` that is not an object).
    pub fn with_usage_requested(&self) -> Option<RequestFacts> {
        if self.kind() != ApiKind::ChatCompletions || !self.is_stream() || self.include_usage() {
            return None;
        }
        let options = self.json()?.get("stream_options");
        if options.is_some_and(|o| !o.is_object()) {
            return None;
        }
        self.rewrite(|v| {
            if let Some(obj) = v.as_object_mut() {
                let options = obj
                    .entry("stream_options")
                    .or_insert_with(|| Value::Object(serde_json::Map::new()));
                if let Some(o) = options.as_object_mut() {
                    o.insert("include_usage".to_owned(), Value::Bool(true));
                }
            }
        })
    }

    /// Puts these facts and their body into `parts`, fixing `Content-Length`.
    pub fn into_request(self, mut parts: http::request::Parts) -> Request<ReplayBody> {
        let body = self.body().clone();
        parts.headers.remove(TRANSFER_ENCODING);
        // Every layer that buffers hands the request on through here; most find it as the
        // last one left it, so only what differs is written (each write allocates).
        let length_is_right = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            == Some(body.len());
        if !length_is_right {
            parts
                .headers
                .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let same = parts
            .extensions
            .get::<RequestFacts>()
            .is_some_and(|f| Arc::ptr_eq(&f.inner, &self.inner));
        if !same {
            parts.extensions.insert(self);
        }
        Request::from_parts(parts, Full::new(body))
    }
}

/// The prompt of a request, as the provider will count it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prompt<'a> {
    /// Text segments: roles, names, contents, tool arguments and definitions. Messages come
    /// in order; the fields of one message in the JSON map's (sorted) key order.
    pub texts: Vec<Cow<'a, str>>,
    /// How many messages (chat, Anthropic, Gemini) or input items (Responses API).
    pub messages: usize,
    /// Tokens given directly as token ids (completions and embeddings accept them).
    pub token_ids: u64,
    /// Images, audio and files: parts whose cost is not text.
    pub media: usize,
}

/// Keys whose values are identifiers, formats or binary payloads, not prompt text.
const NOT_TEXT: &[&str] = &[
    "type",
    "id",
    "call_id",
    "tool_call_id",
    "cache_control",
    "detail",
    "media_type",
    "mime_type",
    "mimeType",
    "format",
    "url",
    "data",
    "status",
];

/// Objects with these `type`s are media, counted in [`Prompt::media`].
const MEDIA_TYPES: &[&str] = &[
    "image_url",
    "image",
    "input_image",
    "input_audio",
    "audio",
    "file",
    "input_file",
    "document",
];

impl<'a> Prompt<'a> {
    /// Text anywhere under a message, skipping identifiers and binary payloads.
    fn walk(&mut self, v: &'a Value) {
        match v {
            Value::String(s) => self.texts.push(Cow::Borrowed(s)),
            Value::Array(items) => items.iter().for_each(|i| self.walk(i)),
            Value::Object(obj) => {
                let ty = obj.get("type").and_then(Value::as_str);
                if ty.is_some_and(|t| MEDIA_TYPES.contains(&t))
                    || obj.contains_key("inlineData")
                    || obj.contains_key("inline_data")
                {
                    self.media += 1;
                    return;
                }
                for (k, v) in obj {
                    if !NOT_TEXT.contains(&k.as_str()) {
                        self.walk(v);
                    }
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }

    /// `prompt` / `input`: a string, token ids, or arrays of either; objects are input
    /// items (Responses API).
    fn input(&mut self, v: &'a Value) {
        match v {
            Value::String(s) => self.texts.push(Cow::Borrowed(s)),
            Value::Number(_) => self.token_ids += 1,
            Value::Array(items) => items.iter().for_each(|i| self.input(i)),
            Value::Object(_) => {
                self.messages += 1;
                self.walk(v);
            }
            Value::Null | Value::Bool(_) => {}
        }
    }

    /// Total bytes of text.
    pub fn text_len(&self) -> usize {
        self.texts.iter().map(|t| t.len()).sum()
    }
}

/// Buffers `req`'s body (up to `limit` bytes), parses its facts once and puts them in the
/// request's extensions; the returned request's body is the buffered bytes.
///
/// When the request already carries facts (an outer layer buffered it), they are reused
/// and the body they hold becomes the request body: the incoming body is dropped unread,
/// and nothing is parsed again. Either way the returned request's `Content-Length` matches
/// its body.
pub async fn buffer_request<B>(
    req: Request<B>,
    limit: usize,
) -> Result<Request<ReplayBody>, FactsError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    buffer_with_facts(req, limit).await.map(|(req, _)| req)
}

/// [`buffer_request`], also handing back the facts it put in (or found in) the request's
/// extensions — for layers that read them at once.
pub async fn buffer_with_facts<B>(
    req: Request<B>,
    limit: usize,
) -> Result<(Request<ReplayBody>, RequestFacts), FactsError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let (parts, body) = req.into_parts();
    if let Some(facts) = parts.extensions.get::<RequestFacts>().cloned() {
        return Ok((facts.clone().into_request(parts), facts));
    }
    let too_large = FactsError::TooLarge { limit };
    if usize::try_from(body.size_hint().lower()).map_or(true, |n| n > limit) {
        return Err(too_large);
    }
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => return Err(too_large),
        Err(e) => return Err(FactsError::Body(e)),
    };
    let facts = RequestFacts::parse(parts.uri.path(), &parts.headers, bytes)?;
    Ok((facts.clone().into_request(parts), facts))
}

/// Buffers `req`'s body for replay, up to `limit` bytes — the mode of a layer that may
/// send a request again (the retry layer): past the cap the request is not refused (as
/// [`buffer_request`] refuses it) but kept as it is, what was read and the rest of the
/// stream, to be sent once and not again. Facts an outer layer put in the extensions are
/// reused: their bytes are replayed.
pub async fn buffer_for_replay<B>(
    req: Request<B>,
    limit: usize,
) -> Result<Request<RequestBody<B>>, BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let (parts, mut body) = req.into_parts();
    if let Some(facts) = parts.extensions.get::<RequestFacts>().cloned() {
        // An outer layer buffered it already: replay its bytes.
        return Ok(Request::from_parts(
            parts,
            RequestBody::replay(facts.body().clone()),
        ));
    }
    if body.size_hint().lower() > limit as u64 {
        tracing::debug!(
            limit,
            "request body over the cap: it is sent once and not retried"
        );
        return Ok(Request::from_parts(
            parts,
            RequestBody::once(std::collections::VecDeque::new(), body),
        ));
    }
    let mut read = std::collections::VecDeque::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Into::into)?;
        if let Ok(data) = frame.into_data() {
            len += data.len();
            read.push_back(data);
            if len > limit {
                tracing::debug!(
                    limit,
                    "request body over the cap: it is sent once and not retried"
                );
                return Ok(Request::from_parts(parts, RequestBody::once(read, body)));
            }
        }
    }
    let mut all = bytes::BytesMut::with_capacity(len);
    for b in read {
        all.extend_from_slice(&b);
    }
    Ok(Request::from_parts(
        parts,
        RequestBody::replay(all.freeze()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sorted<'a>(p: &'a Prompt<'a>) -> Vec<&'a str> {
        let mut v: Vec<&str> = p.texts.iter().map(|t| t.as_ref()).collect();
        v.sort_unstable();
        v
    }

    fn facts(path: &str, body: Value) -> RequestFacts {
        RequestFacts::parse(path, &HeaderMap::new(), Bytes::from(body.to_string())).unwrap()
    }

    #[test]
    fn chat_completions() {
        let f = facts(
            "/v1/chat/completions",
            json!({
                "model": "gpt-4o-mini",
                "max_tokens": 100,
                "max_completion_tokens": 50,
                "n": 3,
                "stream": true,
                "stream_options": {"include_usage": true},
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "name": "ann", "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
                    ]},
                    {"role": "assistant", "tool_calls": [
                        {"id": "call_1", "type": "function",
                         "function": {"name": "lookup", "arguments": "{\"q\":1}"}}
                    ]}
                ],
                "tools": [{"type": "function", "function": {"name": "lookup"}}]
            }),
        );
        assert_eq!(f.kind(), ApiKind::ChatCompletions);
        assert_eq!(f.model(), Some("gpt-4o-mini"));
        assert!(f.is_stream() && f.include_usage());
        assert_eq!(
            f.max_output_tokens(),
            Some(50),
            "max_completion_tokens wins"
        );
        assert_eq!(f.choices(), 3);
        let p = f.prompt();
        assert_eq!(p.messages, 3);
        assert_eq!(p.media, 1);
        let texts = sorted(&p);
        assert_eq!(texts.len(), 9);
        for want in [
            "system",
            "Be brief.",
            "user",
            "ann",
            "What is this?",
            "assistant",
            "lookup",
            "{\"q\":1}",
        ] {
            assert!(texts.contains(&want), "{want} missing from {texts:?}");
        }
        assert!(
            p.texts[8].contains("\"lookup\""),
            "tool definitions count as text"
        );
        assert!(
            !p.texts.iter().any(|t| t.contains("base64")),
            "image data is not text"
        );
    }

    #[test]
    fn completions_and_embeddings_take_strings_or_token_ids() {
        let c = facts(
            "/v1/completions",
            json!({"model": "gpt-3.5-turbo-instruct", "prompt": ["a", "b"], "max_tokens": 7}),
        );
        assert_eq!(c.kind(), ApiKind::Completions);
        assert_eq!(c.prompt().texts, ["a", "b"]);
        assert_eq!(c.max_output_tokens(), Some(7));

        let e = facts(
            "/v1/embeddings",
            json!({"model": "text-embedding-3-small", "input": [[1, 2, 3], [4]]}),
        );
        assert_eq!(e.kind(), ApiKind::Embeddings);
        assert!(!e.kind().generates());
        assert_eq!(e.prompt().token_ids, 4);
        assert!(e.prompt().texts.is_empty());
    }

    #[test]
    fn responses_api() {
        let f = facts(
            "/v1/responses",
            json!({
                "model": "gpt-4.1",
                "instructions": "Talk like a pirate.",
                "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hello"},
                                                        {"type": "input_image", "image_url": "https://x"}]}],
                "max_output_tokens": 300
            }),
        );
        assert_eq!(f.kind(), ApiKind::Responses);
        assert_eq!(f.max_output_tokens(), Some(300));
        let p = f.prompt();
        assert_eq!(p.texts[0], "Talk like a pirate.");
        assert_eq!(sorted(&p), ["Hello", "Talk like a pirate.", "user"]);
        assert_eq!((p.messages, p.media), (1, 1));
        let s = facts("/v1/responses", json!({"model": "gpt-4.1", "input": "Hi"}));
        assert_eq!(s.prompt().texts, ["Hi"]);
    }

    #[test]
    fn anthropic_and_gemini() {
        let a = facts(
            "/v1/messages",
            json!({"model": "claude-sonnet-4", "max_tokens": 1024, "system": "Be kind.",
                   "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi",
                                 "cache_control": {"type": "ephemeral"}}]}]}),
        );
        assert_eq!(a.kind(), ApiKind::AnthropicMessages);
        assert_eq!(sorted(&a.prompt()), ["Be kind.", "Hi", "user"]);
        let g = facts(
            "/v1beta/models/gemini-2.0-flash:generateContent",
            json!({"contents": [{"role": "user", "parts": [{"text": "Hi"},
                                 {"inlineData": {"mimeType": "image/png", "data": "AAAA"}}]}],
                   "generationConfig": {"maxOutputTokens": 256}}),
        );
        assert_eq!(g.kind(), ApiKind::GeminiGenerate);
        assert_eq!(g.model(), None);
        assert_eq!(g.max_output_tokens(), Some(256));
        assert_eq!((g.prompt().texts.len(), g.prompt().media), (2, 1));
    }

    #[test]
    fn kind_from_shape_when_the_path_says_nothing() {
        let k = |v: Value| facts("/proxy", v).kind();
        assert_eq!(
            k(json!({"model": "m", "messages": []})),
            ApiKind::ChatCompletions
        );
        assert_eq!(
            k(json!({"model": "m", "system": "s", "messages": []})),
            ApiKind::AnthropicMessages
        );
        assert_eq!(
            k(json!({"model": "m", "prompt": "p"})),
            ApiKind::Completions
        );
        assert_eq!(
            k(json!({"model": "text-embedding-3-large", "input": "x"})),
            ApiKind::Embeddings
        );
        assert_eq!(
            k(json!({"model": "gpt-4.1", "input": "x"})),
            ApiKind::Responses
        );
        assert_eq!(k(json!({"contents": []})), ApiKind::GeminiGenerate);
        assert_eq!(k(json!({"hello": "world"})), ApiKind::Unknown);
    }

    #[test]
    fn unknown_shapes_yield_facts_not_errors() {
        for body in [
            json!([1, 2, 3]),
            json!("text"),
            json!(42),
            json!({"model": 7, "max_tokens": -1, "n": "x"}),
        ] {
            let f = facts("/v1/chat/completions", body);
            assert_eq!(f.model(), None);
            assert_eq!(f.max_output_tokens(), None);
            assert_eq!(f.choices(), 1);
            assert!(!f.is_stream());
        }
    }

    #[test]
    fn malformed_json_is_an_error_only_for_json_requests() {
        let bad = Bytes::from_static(b"{\"model\": ");
        let err = RequestFacts::parse("/v1/chat/completions", &HeaderMap::new(), bad.clone())
            .unwrap_err();
        assert!(matches!(err, FactsError::MalformedJson(_)));
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);

        let mut grpc = HeaderMap::new();
        grpc.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        let f = RequestFacts::parse("/svc/Method", &grpc, bad).unwrap();
        assert!(f.json().is_none());

        let mut vendor = HeaderMap::new();
        vendor.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/vnd.api+JSON; charset=utf-8"),
        );
        assert!(RequestFacts::parse("/x", &vendor, Bytes::from_static(b"nope")).is_err());

        let empty = RequestFacts::parse("/v1/models", &HeaderMap::new(), Bytes::new()).unwrap();
        assert!(empty.json().is_none());
        // No body where one is needed: refused, not sent on to spend a quota cell.
        let mut json = HeaderMap::new();
        json.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (path, headers) in [
            ("/v1/models", &json),
            ("/v1/chat/completions", &HeaderMap::new()),
        ] {
            let err = RequestFacts::parse(path, headers, Bytes::from_static(b" \n")).unwrap_err();
            assert!(matches!(err, FactsError::EmptyBody), "{path}");
            assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        }
        assert!(RequestFacts::parse("/svc/Method", &grpc, Bytes::new()).is_ok());
    }

    #[test]
    fn rewrite_leaves_the_original_alone() {
        let f = facts(
            "/v1/chat/completions",
            json!({"model": "gpt-4o", "messages": []}),
        );
        let g = f.rewrite(|v| v["model"] = json!("gpt-4o-mini")).unwrap();
        assert_eq!(f.model(), Some("gpt-4o"));
        assert_eq!(g.model(), Some("gpt-4o-mini"));
        assert!(std::str::from_utf8(g.body())
            .unwrap()
            .contains("gpt-4o-mini"));
        assert_eq!(g.kind(), ApiKind::ChatCompletions);
    }
}
