//! The cache key: a SHA-256 of what makes two requests the same question.
//!
//! Hashed, in order: the method, the path, the partition (the tenant or API key, so one
//! tenant never receives another's answer), and the request's JSON in canonical form —
//! object keys sorted, insignificant whitespace gone — without the top-level fields that
//! do not change the answer (`user` by default). `{"b":1,"a":2}` and `{ "a": 2, "b": 1 }`
//! are the same question; a different model, message or tenant is not. Non-JSON bodies
//! are hashed as bytes.
//!
//! SHA-256 rather than BLAKE3: it is already in the dependency tree (`tollgate-core` hashes
//! API keys with it), it is pure Rust, and at the sizes of LLM requests BLAKE3's speed
//! advantage is small next to walking the JSON. The canonical JSON is written into a
//! buffer kept per thread and hashed in one call: fed to the hasher as serde_json writes
//! it (a call for every key, quote and comma), it cost more than the copy.
//!
//! ```
//! use bytes::Bytes;
//! use http::{HeaderMap, Method};
//! use tollgate_core::facts::RequestFacts;
//! use tollgate_cache::key::KeyRules;
//!
//! let facts = |body: &'static str| {
//!     RequestFacts::parse("/v1/chat/completions", &HeaderMap::new(), Bytes::from(body)).unwrap()
//! };
//! let rules = KeyRules::default();
//! let a = rules.key(&Method::POST, "/v1/chat/completions", "tenant:acme", &facts(r#"{"model":"m","user":"u1","messages":[]}"#));
//! let b = rules.key(&Method::POST, "/v1/chat/completions", "tenant:acme", &facts(r#"{ "messages": [], "model": "m" }"#));
//! assert_eq!(a, b);
//! ```

use std::cell::RefCell;

use http::Method;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tollgate_core::facts::RequestFacts;

pub use tollgate_core::store::CacheKey;

/// The hasher of the maps keyed by [`CacheKey`] (the store's and the flights'): a key's
/// `Hash` writes eight of its SHA-256 bytes, already uniform and out of a caller's
/// control, so they are taken as the hash as they are. SipHash over them again cost more
/// than the lookups it served.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not reached for a `CacheKey` (it writes one `u64`); folded in all the same.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

/// Builds [`KeyHasher`]s.
pub(crate) type KeyHash = std::hash::BuildHasherDefault<KeyHasher>;

/// What goes into a key.
#[derive(Clone, Debug)]
pub struct KeyRules {
    excluded: Vec<String>,
}

impl Default for KeyRules {
    /// Excludes `user` (an end-user id for the provider's abuse monitoring: it does not
    /// change the answer).
    fn default() -> Self {
        Self {
            excluded: vec!["user".to_owned()],
        }
    }
}

thread_local! {
    /// Where a request's canonical JSON is written before it is hashed; reused, so a key
    /// allocates nothing once the thread has seen a request of the size.
    static CANONICAL: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A buffer this large is given back after use rather than kept for the thread's life.
const KEEP_BUFFER: usize = 64 * 1024;

impl KeyRules {
    /// No field excluded.
    pub fn none() -> Self {
        Self {
            excluded: Vec::new(),
        }
    }

    /// Also leaves the top-level field `name` out of the key.
    pub fn exclude(mut self, name: impl Into<String>) -> Self {
        self.excluded.push(name.into());
        self
    }

    /// The key of a request.
    pub fn key(
        &self,
        method: &Method,
        path: &str,
        partition: &str,
        facts: &RequestFacts,
    ) -> CacheKey {
        let mut h = Sha256::new();
        // Lengths first, so no two different triples can run together into one string.
        for part in [method.as_str(), path, partition] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        let Some(json) = facts.json() else {
            h.update(b"raw:");
            h.update(facts.body());
            return CacheKey(h.finalize().into());
        };
        CANONICAL.with_borrow_mut(|buf| {
            buf.clear();
            // Writing to a `Vec` cannot fail, and a `Value` always serializes.
            match json {
                Value::Object(obj) => {
                    // serde_json's map is ordered by key, so writing it is canonical:
                    // sorted keys at every depth, no whitespace.
                    buf.push(b'{');
                    for (k, v) in obj {
                        if self.excluded.iter().any(|e| e == k) {
                            continue;
                        }
                        if buf.len() > 1 {
                            buf.push(b',');
                        }
                        let _ = serde_json::to_writer(&mut *buf, k);
                        buf.push(b':');
                        let _ = serde_json::to_writer(&mut *buf, v);
                    }
                    buf.push(b'}');
                }
                other => {
                    let _ = serde_json::to_writer(&mut *buf, other);
                }
            }
            h.update(&buf[..]);
            if buf.capacity() > KEEP_BUFFER {
                *buf = Vec::new();
            }
        });
        CacheKey(h.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::HeaderMap;

    fn facts(body: &str) -> RequestFacts {
        RequestFacts::parse(
            "/v1/chat/completions",
            &HeaderMap::new(),
            Bytes::from(body.to_owned()),
        )
        .unwrap()
    }

    fn key(rules: &KeyRules, partition: &str, body: &str) -> CacheKey {
        rules.key(
            &Method::POST,
            "/v1/chat/completions",
            partition,
            &facts(body),
        )
    }

    #[test]
    fn key_order_and_whitespace_do_not_matter_at_any_depth() {
        let r = KeyRules::default();
        let a = key(
            &r,
            "t",
            r#"{"model":"m","messages":[{"role":"user","content":"Hi"}],"temperature":0}"#,
        );
        let b = key(&r, "t", "{\n \"temperature\": 0,\n \"messages\": [ { \"content\": \"Hi\", \"role\": \"user\" } ],\n \"model\": \"m\" }");
        assert_eq!(a, b);
    }

    #[test]
    fn what_changes_the_answer_changes_the_key() {
        let r = KeyRules::default();
        let base = r#"{"model":"m","messages":[{"role":"user","content":"Hi"}]}"#;
        let k = key(&r, "tenant:a", base);
        assert_ne!(k, key(&r, "tenant:b", base), "another tenant");
        assert_ne!(
            k,
            key(&r, "tenant:a", &base.replace("\"m\"", "\"m2\"")),
            "another model"
        );
        assert_ne!(
            k,
            key(&r, "tenant:a", &base.replace("Hi", "Hello")),
            "another message"
        );
        assert_ne!(
            k,
            key(&r, "tenant:a", &base.replace("}]}", "}],\"stream\":true}")),
            "streamed"
        );
        assert_ne!(
            k,
            r.key(&Method::POST, "/v1/completions", "tenant:a", &facts(base)),
            "another path"
        );
        // Array order is meaning, not formatting.
        let two = r#"{"model":"m","messages":[{"role":"user","content":"A"},{"role":"user","content":"B"}]}"#;
        let swapped = r#"{"model":"m","messages":[{"role":"user","content":"B"},{"role":"user","content":"A"}]}"#;
        assert_ne!(key(&r, "t", two), key(&r, "t", swapped));
    }

    #[test]
    fn excluded_fields_do_not_count_and_can_be_chosen() {
        let with_user = r#"{"model":"m","user":"u-1","metadata":{"run":1}}"#;
        let other_user = r#"{"model":"m","user":"u-2","metadata":{"run":2}}"#;
        let d = KeyRules::default();
        assert_ne!(
            key(&d, "t", with_user),
            key(&d, "t", other_user),
            "metadata counts by default"
        );
        let r = KeyRules::default().exclude("metadata");
        assert_eq!(key(&r, "t", with_user), key(&r, "t", other_user));
        let strict = KeyRules::none();
        assert_ne!(
            key(&strict, "t", with_user),
            key(&strict, "t", &with_user.replace("u-1", "u-9"))
        );
    }

    #[test]
    fn parts_cannot_run_together() {
        let r = KeyRules::default();
        let f = facts(r#"{"model":"m"}"#);
        assert_ne!(
            r.key(&Method::POST, "/ab", "c", &f),
            r.key(&Method::POST, "/a", "bc", &f)
        );
    }
}
