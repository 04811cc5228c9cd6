//! Dropping the usage-only chunk from an OpenAI stream the caller did not ask usage for.
//!
//! When the caller streams without `stream_options.include_usage`, a layer that needs the
//! count (the token budget settling, a gateway's access log) asks for it anyway with
//! [`RequestFacts::with_usage_requested`](crate::facts::RequestFacts::with_usage_requested)
//! and removes with [`UsageChunkFilter`], from what the caller sees, the chunk
//! that carries only usage (`"choices": []` and a `usage` object), and the `"usage": null`
//! that asking puts on every other chunk — so the caller sees the stream it would have
//! seen without Tollgate. Every other byte passes unchanged; only the unfinished event is
//! held back, never the stream.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

/// The longest event held while waiting for its end; a longer one is passed on as it is.
const MAX_EVENT: usize = 1024 * 1024;

/// Splits a byte stream into SSE events and drops the usage-only ones.
#[derive(Debug, Default)]
pub struct UsageChunkFilter {
    pending: BytesMut,
}

/// Where the first event in `buf` ends (just past its blank line), if it has ended.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(p) = memchr::memchr2(b'\n', b'\r', &buf[i..]) {
        let at = i + p;
        let rest = &buf[at..];
        for sep in [&b"\r\n\r\n"[..], b"\n\n", b"\r\r"] {
            if rest.starts_with(sep) {
                return Some(at + sep.len());
            }
        }
        i = at + 1;
    }
    None
}

/// Whether an event is OpenAI's usage-only chunk.
fn is_usage_only(event: &[u8]) -> bool {
    if memchr::memmem::find(event, b"\"usage\"").is_none() {
        return false;
    }
    let mut data = Vec::new();
    for line in event.split(|&b| b == b'\n' || b == b'\r') {
        if let Some(v) = line.strip_prefix(b"data:") {
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(v.strip_prefix(b" ").unwrap_or(v));
        }
    }
    let Ok(v) = serde_json::from_slice::<Value>(&data) else {
        return false;
    };
    v.get("choices")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
        && v.get("usage").is_some_and(Value::is_object)
}

/// The event without its `"usage": null` member, or `None` when it has none.
///
/// Found in the bytes rather than by re-serialising, so everything else stays byte for
/// byte (key order, spacing, escapes). A match counts only where a member may start — right
/// after `{` or `,`, spaces aside — so the same characters inside a string (where their
/// quotes would be escaped) are never touched. OpenAI's chunks carry `usage` at the top
/// level only.
fn strip_null_usage(event: &[u8]) -> Option<BytesMut> {
    const NAME: &[u8] = b"\"usage\"";
    let is_space = |b: &u8| matches!(b, b' ' | b'\t');
    let mut from = 0;
    while let Some(p) = memchr::memmem::find(&event[from..], NAME) {
        let at = from + p;
        from = at + NAME.len();
        // What comes before: `{` or `,`, spaces aside.
        let before = event[..at].iter().rposition(|b| !is_space(b));
        let Some(before) = before.filter(|&i| matches!(event[i], b'{' | b',')) else {
            continue;
        };
        // What comes after: `: null`, spaces aside.
        let mut i = from;
        let skip = |mut i: usize| {
            while event.get(i).is_some_and(is_space) {
                i += 1;
            }
            i
        };
        i = skip(i);
        if event.get(i) != Some(&b':') {
            continue;
        }
        i = skip(i + 1);
        if !event[i..].starts_with(b"null") {
            continue;
        }
        let end = skip(i + 4);
        let (cut_from, cut_to) = if event[before] == b',' {
            // `, "usage": null` goes, from its comma.
            (before, end)
        } else if event.get(end) == Some(&b',') {
            // `{"usage": null, …`: the member and the comma after it.
            (before + 1, skip(end + 1))
        } else {
            // `{"usage": null}`.
            (before + 1, end)
        };
        let mut out = BytesMut::with_capacity(event.len());
        out.extend_from_slice(&event[..cut_from]);
        out.extend_from_slice(&event[cut_to..]);
        return Some(out);
    }
    None
}

impl UsageChunkFilter {
    /// Feeds a frame; returns what the caller should see of it now (possibly nothing).
    pub fn push(&mut self, chunk: &Bytes) -> Bytes {
        self.pending.extend_from_slice(chunk);
        let mut out = BytesMut::new();
        while let Some(end) = event_end(&self.pending) {
            let event = self.pending.split_to(end);
            if is_usage_only(&event) {
                continue;
            }
            match strip_null_usage(&event) {
                Some(stripped) => out.extend_from_slice(&stripped),
                None => out.extend_from_slice(&event),
            }
        }
        if self.pending.len() > MAX_EVENT {
            // Not an event we could recognise anyway: let it through.
            out.extend_from_slice(&self.pending.split());
        }
        out.freeze()
    }

    /// The stream ended: whatever is held goes out (an unfinished last event is the
    /// caller's to see, as it was sent).
    pub fn finish(&mut self) -> Bytes {
        let rest = self.pending.split();
        if is_usage_only(&rest) {
            Bytes::new()
        } else {
            strip_null_usage(&rest).unwrap_or(rest).freeze()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
        data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1,\"total_tokens\":6}}\n\n\
        data: [DONE]\n\n";

    fn run(stream: &str, split: usize) -> String {
        let mut f = UsageChunkFilter::default();
        let mut out = Vec::new();
        for part in stream.as_bytes().chunks(split.max(1)) {
            out.extend_from_slice(&f.push(&Bytes::copy_from_slice(part)));
        }
        out.extend_from_slice(&f.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_usage_chunk_and_null_usages_go_and_everything_else_stays_byte_for_byte() {
        let want = STREAM
            .replace(
                "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1,\"total_tokens\":6}}\n\n",
                "",
            )
            .replace(",\"usage\":null", "");
        for split in [1, 2, 3, 7, 50, 1000] {
            assert_eq!(run(STREAM, split), want, "split {split}");
        }
        let crlf = STREAM.replace('\n', "\r\n");
        assert_eq!(run(&crlf, 5), want.replace('\n', "\r\n"));
    }

    #[test]
    fn chunks_with_choices_keep_their_usage() {
        let s = "data: {\"choices\":[{\"delta\":{}}],\"usage\":{\"total_tokens\":6}}\n\n";
        assert_eq!(run(s, 4), s);
    }

    #[test]
    fn a_null_usage_goes_wherever_it_stands_and_only_as_a_member() {
        for (event, want) in [
            (r#"data: {"usage":null,"id":1}"#, r#"data: {"id":1}"#),
            (r#"data: { "usage" : null , "id":1}"#, r#"data: {"id":1}"#),
            (r#"data: {"id":1, "usage": null}"#, r#"data: {"id":1}"#),
            (r#"data: {"usage":null}"#, r#"data: {}"#),
            // In a string, the quotes are escaped: not a member, left alone.
            (
                r#"data: {"c":"say \"usage\":null","usage":null}"#,
                r#"data: {"c":"say \"usage\":null"}"#,
            ),
            (
                r#"data: {"usage":{"total_tokens":1},"choices":[{}]}"#,
                r#"data: {"usage":{"total_tokens":1},"choices":[{}]}"#,
            ),
        ] {
            assert_eq!(
                run(&format!("{event}\n\n"), 3),
                format!("{want}\n\n"),
                "{event}"
            );
        }
    }

    #[test]
    fn an_unfinished_tail_is_passed_on() {
        assert_eq!(
            run("data: {\"choices\":[{\"delta\":", 3),
            "data: {\"choices\":[{\"delta\":"
        );
    }
}
