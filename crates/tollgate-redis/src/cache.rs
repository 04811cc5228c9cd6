//! The response cache in Redis: one key per answer, with its TTL, in a compact binary
//! form that is checked on the way back (anything malformed is a miss, never a panic).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use tollgate_core::store::{CacheKey, CacheStore, StoreFuture, Stored};

use crate::RedisStore;

const MAGIC: &[u8; 4] = b"TGC1";

impl RedisStore {
    /// The largest answer the cache stores in Redis (4 MiB by default); larger ones are
    /// not stored. Bound Redis as a whole with its own `maxmemory` and an LRU policy.
    pub fn max_entry_bytes(mut self, n: usize) -> Self {
        self.max_entry_bytes = n;
        self
    }

    fn cache_key(&self, key: &CacheKey) -> String {
        let mut hex = String::with_capacity(64);
        for b in key.0 {
            use std::fmt::Write as _;
            let _ = write!(hex, "{b:02x}");
        }
        format!("{}:c:{hex}", self.namespace)
    }
}

/// A cached answer in the form the cache keeps in Redis: a magic number, the status, the
/// headers and the body's frames, each length-prefixed. Public so tools and fuzzers can
/// read what the cache wrote; [`decode_entry`] reads it back.
pub fn encode_entry(v: &Stored) -> Bytes {
    let mut out = BytesMut::with_capacity(v.size() + 256);
    out.put_slice(MAGIC);
    out.put_u16(v.status.as_u16());
    out.put_u8(u8::from(v.stream));
    out.put_u16(u16::try_from(v.headers.len()).unwrap_or(u16::MAX));
    for (name, value) in v.headers.iter().take(usize::from(u16::MAX)) {
        out.put_u32(name.as_str().len() as u32);
        out.put_slice(name.as_str().as_bytes());
        out.put_u32(value.len() as u32);
        out.put_slice(value.as_bytes());
    }
    out.put_u32(u32::try_from(v.frames.len()).unwrap_or(u32::MAX));
    for f in &v.frames {
        out.put_u32(f.len() as u32);
        out.put_slice(f);
    }
    out.freeze()
}

fn take(buf: &mut Bytes) -> Option<Bytes> {
    if buf.remaining() < 4 {
        return None;
    }
    let n = buf.get_u32() as usize;
    (buf.remaining() >= n).then(|| buf.split_to(n))
}

/// Reads an entry [`encode_entry`] wrote. Anything else — truncated, padded, another
/// format, a status or header that `http` refuses — is `None` (a miss), never a panic.
pub fn decode_entry(mut buf: Bytes) -> Option<Stored> {
    if buf.remaining() < 9 || &buf[..4] != MAGIC {
        return None;
    }
    buf.advance(4);
    let status = StatusCode::from_u16(buf.get_u16()).ok()?;
    let stream = buf.get_u8() == 1;
    let n_headers = buf.get_u16();
    let mut headers = HeaderMap::new();
    for _ in 0..n_headers {
        let name = HeaderName::from_bytes(&take(&mut buf)?).ok()?;
        let value = HeaderValue::from_maybe_shared(take(&mut buf)?).ok()?;
        headers.append(name, value);
    }
    if buf.remaining() < 4 {
        return None;
    }
    let n_frames = buf.get_u32();
    let mut frames = Vec::new();
    for _ in 0..n_frames {
        frames.push(take(&mut buf)?);
    }
    buf.is_empty().then_some(Stored {
        status,
        headers,
        frames,
        stream,
    })
}

/// Misses and failures are both "not cached": a cache that cannot reach Redis answers
/// from upstream (it fails open, the only sensible policy for a cache), and says so in a
/// debug event.
impl CacheStore for RedisStore {
    fn get(&self, key: &CacheKey) -> StoreFuture<Option<Arc<Stored>>> {
        let (mut conn, k, timeout) = (self.conn.clone(), self.cache_key(key), self.timeout);
        Box::pin(async move {
            let got: Result<Option<Vec<u8>>, _> =
                Self::timed(timeout, redis::cmd("GET").arg(&k).query_async(&mut conn)).await;
            match got {
                Ok(Some(bytes)) => decode_entry(Bytes::from(bytes)).map(Arc::new),
                Ok(None) => None,
                Err(e) => {
                    tracing::debug!(error = %e, "cache lookup in Redis failed; treated as a miss");
                    None
                }
            }
        })
    }

    fn put(&self, key: CacheKey, value: Arc<Stored>, ttl: Duration) -> StoreFuture<()> {
        let (mut conn, k, timeout) = (self.conn.clone(), self.cache_key(&key), self.timeout);
        let too_big = value.size() > self.max_entry_bytes;
        Box::pin(async move {
            if too_big || ttl.is_zero() {
                return;
            }
            let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            let cmd = redis::cmd("SET")
                .arg(k)
                .arg(encode_entry(&value).as_ref())
                .arg("PX")
                .arg(ms)
                .to_owned();
            let set: Result<(), _> = Self::timed(timeout, cmd.query_async(&mut conn)).await;
            if let Err(e) = set {
                tracing::debug!(error = %e, "cache store in Redis failed; the answer is not cached");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        let v = Stored {
            status: StatusCode::OK,
            headers,
            frames: vec![
                Bytes::from_static(b"data: {}\n\n"),
                Bytes::from_static(b"data: [DONE]\n\n"),
            ],
            stream: true,
        };
        let back = decode_entry(encode_entry(&v)).unwrap();
        assert_eq!(
            (back.status, back.stream, back.frames.clone()),
            (v.status, v.stream, v.frames.clone())
        );
        assert_eq!(back.headers, v.headers);
        let whole = encode_entry(&v);
        for cut in 0..whole.len() {
            assert!(
                decode_entry(whole.slice(..cut)).is_none(),
                "a cut entry is a miss"
            );
        }
        assert!(decode_entry(Bytes::from_static(b"garbage!!!!!!!!")).is_none());
    }
}
