//! Who a request counts against: keys and key extractors.
//!
//! A [`Key`] names the bucket a request draws from — a tenant, an API key, a model, or
//! everyone. A [`KeyExtractor`] reads it from the request. API keys are hashed
//! (SHA-256, first 128 bits) the moment they are read and never kept raw, so they appear
//! in no map, log line or Redis key.
//!
//! ```
//! use http::Request;
//! use tollgate_core::key::{ApiKey, Header, KeyExtractor, RequestHead};
//!
//! let req = Request::builder()
//!     .header("authorization", "Bearer sk-secret")
//!     .body(())
//!     .unwrap();
//! let by_tenant_then_key = Header::new("x-tenant-id").or(ApiKey);
//! let key = by_tenant_then_key.extract(&RequestHead::new(&req)).unwrap();
//! assert!(key.as_str().starts_with("apikey:"));
//! assert!(!key.as_str().contains("sk-secret"));
//! ```

use std::fmt;
use std::sync::Arc;

use http::header::{HeaderName, AUTHORIZATION};
use http::{Extensions, HeaderMap, Method, Request, Uri};
use sha2::{Digest, Sha256};
use smol_str::SmolStr;

use crate::facts::RequestFacts;

/// Header values longer than this are hashed rather than kept, so a hostile header
/// cannot make keys (and the maps that hold them) arbitrarily large.
const MAX_PLAIN_KEY_LEN: usize = 128;

/// The name of the bucket a request draws from. Cheap to clone.
///
/// Keys up to 23 bytes (`tenant:acme`, `model:gpt-4o`) are stored inline and cost no
/// allocation — a key is made for every request, so this matters; longer ones share an
/// `Arc<str>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(SmolStr);

impl Key {
    /// A key from a plain name. Use [`Key::hashed`] for anything secret.
    pub fn new(name: impl AsRef<str>) -> Self {
        Self(SmolStr::new(name))
    }

    /// `prefix:value` as a key, built with one allocation.
    pub fn prefixed(prefix: &str, value: &str) -> Self {
        let len = prefix.len() + 1 + value.len();
        // Up to 23 bytes a SmolStr holds inline: assembled on the stack, no allocation.
        let mut buf = [0u8; 23];
        if len <= buf.len() {
            buf[..prefix.len()].copy_from_slice(prefix.as_bytes());
            buf[prefix.len()] = b':';
            buf[prefix.len() + 1..len].copy_from_slice(value.as_bytes());
            // Two strings and an ASCII colon: always UTF-8.
            if let Ok(s) = std::str::from_utf8(&buf[..len]) {
                return Self(SmolStr::new(s));
            }
        }
        let mut s = String::with_capacity(len);
        s.push_str(prefix);
        s.push(':');
        s.push_str(value);
        Self(SmolStr::from(s))
    }

    /// The key everyone shares.
    pub fn global() -> Self {
        static GLOBAL: std::sync::OnceLock<Key> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(|| Self::new("global")).clone()
    }

    /// `prefix:` followed by the hex of the first 128 bits of SHA-256 of `secret`.
    pub fn hashed(prefix: &str, secret: &[u8]) -> Self {
        let digest = Sha256::digest(secret);
        let mut s = String::with_capacity(prefix.len() + 33);
        s.push_str(prefix);
        s.push(':');
        for b in &digest[..16] {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        Self(SmolStr::from(s))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0.as_str(), f)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A borrowed view of a request's head, whatever its body type; what extractors read.
#[derive(Clone, Copy, Debug)]
pub struct RequestHead<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    extensions: &'a Extensions,
}

impl<'a> RequestHead<'a> {
    /// A view of `req`'s head.
    pub fn new<B>(req: &'a Request<B>) -> Self {
        Self {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            extensions: req.extensions(),
        }
    }

    /// A view of request parts.
    pub fn from_parts(parts: &'a http::request::Parts) -> Self {
        Self {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
            extensions: &parts.extensions,
        }
    }

    /// The method.
    pub fn method(&self) -> &'a Method {
        self.method
    }
    /// The URI.
    pub fn uri(&self) -> &'a Uri {
        self.uri
    }
    /// The headers.
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }
    /// The extensions.
    pub fn extensions(&self) -> &'a Extensions {
        self.extensions
    }
    /// The request facts, when a layer has already buffered and parsed the body.
    pub fn facts(&self) -> Option<&'a RequestFacts> {
        self.extensions.get::<RequestFacts>()
    }
}

/// Reads the [`Key`] a request counts against.
///
/// `None` means this extractor cannot name a key for the request (no such header, say);
/// combine extractors with [`KeyExtractor::or`], and see each layer's docs for what it
/// does with a request no extractor can key.
pub trait KeyExtractor: Send + Sync + 'static {
    /// The key for this request, if this extractor can tell.
    fn extract(&self, req: &RequestHead<'_>) -> Option<Key>;

    /// This extractor, or `other` when this one yields nothing.
    fn or<E: KeyExtractor>(self, other: E) -> Or<Self, E>
    where
        Self: Sized,
    {
        Or(self, other)
    }
}

impl<T: KeyExtractor + ?Sized> KeyExtractor for Arc<T> {
    fn extract(&self, req: &RequestHead<'_>) -> Option<Key> {
        (**self).extract(req)
    }
}

impl<T: KeyExtractor + ?Sized> KeyExtractor for Box<T> {
    fn extract(&self, req: &RequestHead<'_>) -> Option<Key> {
        (**self).extract(req)
    }
}

/// Every request shares one key, [`Key::global`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Global;

impl KeyExtractor for Global {
    fn extract(&self, _: &RequestHead<'_>) -> Option<Key> {
        Some(Key::global())
    }
}

/// The tenant named by a header (`x-tenant-id: acme` becomes `tenant:acme`).
///
/// Empty or non-visible-ASCII values yield nothing; values over 128 bytes are hashed.
#[derive(Clone, Debug)]
pub struct Header {
    name: HeaderName,
}

impl Header {
    /// Reads the tenant from the header `name`.
    ///
    /// # Panics
    ///
    /// When `name` is not a valid header name; use [`Header::from_name`] with a name you
    /// have already parsed to avoid that.
    pub fn new(name: &'static str) -> Self {
        Self {
            name: HeaderName::from_static(name),
        }
    }

    /// Reads the tenant from the header `name`.
    pub fn from_name(name: HeaderName) -> Self {
        Self { name }
    }
}

impl KeyExtractor for Header {
    fn extract(&self, req: &RequestHead<'_>) -> Option<Key> {
        let value = req.headers().get(&self.name)?.to_str().ok()?.trim();
        if value.is_empty() {
            return None;
        }
        if value.len() > MAX_PLAIN_KEY_LEN {
            return Some(Key::hashed("tenant", value.as_bytes()));
        }
        Some(Key::prefixed("tenant", value))
    }
}

/// The caller's API key, hashed: from `Authorization: Bearer …`, `x-api-key`
/// (Anthropic), `api-key` (Azure OpenAI) or `x-goog-api-key` (Gemini), in that order.
#[derive(Clone, Copy, Debug, Default)]
pub struct ApiKey;

impl ApiKey {
    fn raw(headers: &HeaderMap) -> Option<&[u8]> {
        if let Some(v) = headers.get(AUTHORIZATION) {
            let v = v.as_bytes();
            let scheme = b"bearer ";
            if v.len() > scheme.len() && v[..scheme.len()].eq_ignore_ascii_case(scheme) {
                return non_empty(v[scheme.len()..].trim_ascii());
            }
        }
        ["x-api-key", "api-key", "x-goog-api-key"]
            .into_iter()
            .find_map(|name| non_empty(headers.get(name)?.as_bytes().trim_ascii()))
    }
}

fn non_empty(b: &[u8]) -> Option<&[u8]> {
    (!b.is_empty()).then_some(b)
}

impl KeyExtractor for ApiKey {
    fn extract(&self, req: &RequestHead<'_>) -> Option<Key> {
        Self::raw(req.headers()).map(|raw| Key::hashed("apikey", raw))
    }
}

/// The request's `model`, from the [`RequestFacts`] (`model:gpt-4o`).
///
/// Yields nothing when the facts are absent: layers that key by model buffer the body
/// first.
#[derive(Clone, Copy, Debug, Default)]
pub struct Model;

impl KeyExtractor for Model {
    fn extract(&self, req: &RequestHead<'_>) -> Option<Key> {
        let model = req.facts()?.model()?;
        if model.len() > MAX_PLAIN_KEY_LEN {
            return Some(Key::hashed("model", model.as_bytes()));
        }
        Some(Key::prefixed("model", model))
    }
}

/// The first of two extractors that yields a key. Built by [`KeyExtractor::or`].
#[derive(Clone, Copy, Debug)]
pub struct Or<A, B>(A, B);

impl<A: KeyExtractor, B: KeyExtractor> KeyExtractor for Or<A, B> {
    fn extract(&self, req: &RequestHead<'_>) -> Option<Key> {
        self.0.extract(req).or_else(|| self.1.extract(req))
    }
}

/// An extractor from a closure. Built by [`key_fn`].
#[derive(Clone, Copy)]
pub struct KeyFn<F>(F);

impl<F> fmt::Debug for KeyFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFn").finish_non_exhaustive()
    }
}

/// An extractor from a closure, the way `tower::service_fn` makes a service.
///
/// ```
/// use tollgate_core::key::{key_fn, Key, KeyExtractor, RequestHead};
///
/// let by_path = key_fn(|req: &RequestHead<'_>| Some(Key::new(req.uri().path())));
/// # let req = http::Request::get("/v1/embeddings").body(()).unwrap();
/// assert_eq!(by_path.extract(&RequestHead::new(&req)).unwrap().as_str(), "/v1/embeddings");
/// ```
pub fn key_fn<F>(f: F) -> KeyFn<F>
where
    F: Fn(&RequestHead<'_>) -> Option<Key> + Send + Sync + 'static,
{
    KeyFn(f)
}

impl<F> KeyExtractor for KeyFn<F>
where
    F: Fn(&RequestHead<'_>) -> Option<Key> + Send + Sync + 'static,
{
    fn extract(&self, req: &RequestHead<'_>) -> Option<Key> {
        (self.0)(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/v1/chat/completions");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn key<E: KeyExtractor>(e: &E, r: &Request<()>) -> Option<String> {
        e.extract(&RequestHead::new(r)).map(|k| k.to_string())
    }

    #[test]
    fn api_keys_are_hashed_and_equal_keys_hash_equal() {
        let a = key(&ApiKey, &req(&[("authorization", "Bearer sk-abc")])).unwrap();
        let b = key(&ApiKey, &req(&[("authorization", "bearer   sk-abc ")])).unwrap();
        let c = key(&ApiKey, &req(&[("x-api-key", "sk-abc")])).unwrap();
        let d = key(&ApiKey, &req(&[("authorization", "Bearer sk-abd")])).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a, c,
            "the same secret is the same caller whichever header carries it"
        );
        assert_ne!(a, d);
        assert!(a.starts_with("apikey:") && a.len() == "apikey:".len() + 32);
        assert!(!a.contains("sk-abc"));
    }

    #[test]
    fn api_key_headers_in_precedence_order() {
        let r = req(&[("api-key", "azure"), ("x-goog-api-key", "gemini")]);
        assert_eq!(
            key(&ApiKey, &r),
            Some(Key::hashed("apikey", b"azure").to_string())
        );
        assert_eq!(key(&ApiKey, &req(&[("authorization", "Basic xyz")])), None);
        assert_eq!(key(&ApiKey, &req(&[("authorization", "Bearer ")])), None);
        assert_eq!(key(&ApiKey, &req(&[])), None);
    }

    #[test]
    fn tenant_header_is_trimmed_bounded_and_optional() {
        let t = Header::new("x-tenant-id");
        assert_eq!(
            key(&t, &req(&[("x-tenant-id", " acme ")])).as_deref(),
            Some("tenant:acme")
        );
        assert_eq!(key(&t, &req(&[("x-tenant-id", "")])), None);
        assert_eq!(key(&t, &req(&[])), None);
        let long = "x".repeat(1000);
        let k = key(&t, &req(&[("x-tenant-id", &long)])).unwrap();
        assert!(k.len() < 64, "long tenant names are hashed: {k}");
    }

    #[test]
    fn prefixed_keys_read_as_prefix_colon_value() {
        assert_eq!(Key::prefixed("tenant", "acme").as_str(), "tenant:acme");
        let long = "é".repeat(200);
        assert_eq!(
            Key::prefixed("tenant", &long).as_str(),
            format!("tenant:{long}")
        );
        assert_eq!(Key::global(), Key::new("global"));
    }

    #[test]
    fn or_falls_back_in_order() {
        let e = Header::new("x-tenant-id").or(ApiKey).or(Global);
        assert_eq!(
            key(&e, &req(&[("x-tenant-id", "a")])).as_deref(),
            Some("tenant:a")
        );
        assert!(key(&e, &req(&[("x-api-key", "k")]))
            .unwrap()
            .starts_with("apikey:"));
        assert_eq!(key(&e, &req(&[])).as_deref(), Some("global"));
    }

    #[test]
    fn model_reads_the_facts() {
        let mut r = req(&[]);
        assert_eq!(key(&Model, &r), None);
        let facts = RequestFacts::parse(
            "/v1/chat/completions",
            r.headers(),
            bytes::Bytes::from_static(br#"{"model":"gpt-4o","messages":[]}"#),
        )
        .unwrap();
        r.extensions_mut().insert(facts);
        assert_eq!(key(&Model, &r).as_deref(), Some("model:gpt-4o"));
    }

    #[test]
    fn extractors_are_usable_as_trait_objects() {
        let e: Arc<dyn KeyExtractor> = Arc::new(Global);
        assert_eq!(key(&e, &req(&[])).as_deref(), Some("global"));
    }
}
