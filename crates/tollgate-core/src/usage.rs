//! Token usage, read from responses as they pass.
//!
//! [`UsageScanner`] is fed a response body frame by frame and never holds the stream:
//!
//! - **SSE** (`text/event-stream`): it keeps only the current unfinished line and event,
//!   and parses an event's JSON only when it mentions usage. It understands OpenAI's usage
//!   chunk (`stream_options.include_usage`), the Responses API's `response.completed`,
//!   Anthropic's `message_start` / `message_delta` (input from the first, cumulative output
//!   from the last) and Gemini's `usageMetadata`.
//! - **JSON**: a plain response is bounded, so the scanner keeps the frames (reference
//!   counted, not copied) up to a cap and parses them once at the end.
//!
//! ```
//! use bytes::Bytes;
//! use tollgate_core::usage::{Usage, UsageScanner};
//!
//! let mut scanner = UsageScanner::sse();
//! scanner.feed(&Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n"));
//! scanner.feed(&Bytes::from_static(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,"));
//! scanner.feed(&Bytes::from_static(b"\"completion_tokens\":2,\"total_tokens\":11}}\n\ndata: [DONE]\n\n"));
//! assert_eq!(scanner.finish(), Some(Usage { input_tokens: 9, output_tokens: 2, total_tokens: 11, cached_input_tokens: 0 }));
//! ```

use std::collections::VecDeque;

use bytes::Bytes;
use http::HeaderMap;
use serde::Deserialize;
use serde_json::Value;

use crate::usage_fields::{Details, Event, Obj};

/// The default cap on a JSON response body kept to read its usage: 16 MiB. Larger bodies
/// are passed on untouched and yield no usage.
pub const DEFAULT_JSON_LIMIT: usize = 16 * 1024 * 1024;

/// The longest SSE line or event the scanner keeps; longer ones are skipped.
const MAX_SSE_EVENT: usize = 1024 * 1024;

/// Tokens a call used, in one shape whichever provider reported them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Usage {
    /// Prompt tokens, cached ones included (OpenAI `prompt_tokens`; Anthropic
    /// `input_tokens` plus its cache-creation and cache-read tokens; Gemini
    /// `promptTokenCount`).
    pub input_tokens: u64,
    /// Generated tokens, reasoning included (OpenAI `completion_tokens`; Anthropic
    /// `output_tokens`; Gemini `candidatesTokenCount` plus `thoughtsTokenCount`).
    pub output_tokens: u64,
    /// The total, as reported, or input plus output when not reported.
    pub total_tokens: u64,
    /// Of the input, how many were served from the provider's prompt cache.
    pub cached_input_tokens: u64,
}

impl Usage {
    /// Reads usage from a whole JSON response body.
    pub fn from_json_bytes(body: &[u8]) -> Option<Usage> {
        let mut partial = Partial::default();
        if !partial.merge_json(body) {
            return None;
        }
        partial.finish()
    }

    /// Reads usage from a parsed JSON response (or one SSE event's JSON).
    pub fn from_json(v: &Value) -> Option<Usage> {
        let mut partial = Partial::default();
        partial.merge_event(v);
        partial.finish()
    }
}

/// Usage seen so far; fields present later replace earlier ones (counts in streams are
/// cumulative).
#[derive(Clone, Copy, Debug, Default)]
struct Partial {
    input: Option<u64>,
    output: Option<u64>,
    total: Option<u64>,
    cached: Option<u64>,
}

impl Partial {
    fn merge_event(&mut self, v: &Value) {
        if let Ok(Obj::Is(event)) = Obj::<Event>::deserialize(v) {
            self.merge(&event);
        }
    }

    /// Reads `bytes` (an answer, or one SSE event's data) and merges its usage; false when
    /// it is not JSON.
    fn merge_json(&mut self, bytes: &[u8]) -> bool {
        match serde_json::from_slice::<Obj<Event>>(bytes) {
            Ok(Obj::Is(event)) => {
                self.merge(&event);
                true
            }
            Ok(_) => true,
            Err(_) => false,
        }
    }

    fn merge(&mut self, event: &Event) {
        let Some(u) = event.counts() else { return };
        let sum = |ks: &[Option<u64>]| {
            ks.iter().flatten().fold(None, |acc: Option<u64>, x| {
                Some(acc.unwrap_or(0).saturating_add(*x))
            })
        };
        // OpenAI chat/completions/embeddings.
        if let Some(p) = u.prompt_tokens {
            self.input = Some(p);
        }
        if let Some(c) = u.completion_tokens {
            self.output = Some(c);
        }
        // Anthropic and the Responses API.
        if let Some(i) = sum(&[
            u.input_tokens,
            u.cache_creation_input_tokens,
            u.cache_read_input_tokens,
        ]) {
            self.input = Some(i);
        }
        if let Some(o) = u.output_tokens {
            self.output = Some(o);
        }
        // Gemini.
        if let Some(p) = u.prompt_token_count {
            self.input = Some(p);
        }
        if let Some(o) = sum(&[u.candidates_token_count, u.thoughts_token_count]) {
            self.output = Some(o);
        }
        if let Some(t) = u.total_tokens.or(u.total_token_count) {
            self.total = Some(t);
        }
        let details = |d: &Obj<Details>| match d {
            Obj::Is(d) => d.cached_tokens,
            _ => None,
        };
        let cached = u
            .cache_read_input_tokens
            .or(u.cached_content_token_count)
            .or_else(|| details(&u.prompt_tokens_details))
            .or_else(|| details(&u.input_tokens_details));
        if let Some(c) = cached {
            self.cached = Some(c);
        }
    }

    fn finish(self) -> Option<Usage> {
        if self.input.is_none() && self.output.is_none() && self.total.is_none() {
            return None;
        }
        let input = self.input.unwrap_or(0);
        let output = self.output.unwrap_or(0);
        Some(Usage {
            input_tokens: input,
            output_tokens: output,
            total_tokens: self
                .total
                .unwrap_or(input.saturating_add(output))
                .max(input.saturating_add(output)),
            cached_input_tokens: self.cached.unwrap_or(0),
        })
    }
}

/// Where a layer that reads an answer's usage reports it, for code outside the stack that
/// wants it too (a gateway's access log): put an `Arc<UsageReport>` in the request's
/// extensions, and the token budget records the usage it settles with there — also the
/// usage of a stream whose usage chunk it asked for and hid from the caller.
#[derive(Debug, Default)]
pub struct UsageReport {
    usage: std::sync::Mutex<Option<Usage>>,
}

impl UsageReport {
    /// Records `usage` (the last report wins).
    pub fn record(&self, usage: Usage) {
        if let Ok(mut u) = self.usage.lock() {
            *u = Some(usage);
        }
    }

    /// The usage recorded, if any.
    pub fn get(&self) -> Option<Usage> {
        self.usage.lock().ok().and_then(|u| *u)
    }
}

/// Reads usage from a response body fed frame by frame. See the [module docs](self).
#[derive(Debug)]
pub struct UsageScanner {
    mode: Mode,
    partial: Partial,
}

#[derive(Debug)]
enum Mode {
    Sse(SseState),
    Json {
        frames: VecDeque<Bytes>,
        len: usize,
        limit: usize,
        overflowed: bool,
    },
}

#[derive(Debug, Default)]
struct SseState {
    /// The unfinished line.
    line: Vec<u8>,
    /// The `data` of the event being assembled.
    data: Vec<u8>,
    /// The current line or event grew past the cap: skip it.
    skipping_line: bool,
    skipping_event: bool,
    /// The previous chunk ended in `\r`, so a leading `\n` ends nothing new.
    after_cr: bool,
}

impl UsageScanner {
    /// A scanner for an SSE body.
    pub fn sse() -> Self {
        Self {
            mode: Mode::Sse(SseState::default()),
            partial: Partial::default(),
        }
    }

    /// A scanner for a JSON body, keeping at most `limit` bytes.
    pub fn json(limit: usize) -> Self {
        Self {
            mode: Mode::Json {
                frames: VecDeque::new(),
                len: 0,
                limit,
                overflowed: false,
            },
            partial: Partial::default(),
        }
    }

    /// The scanner the response's `Content-Type` calls for: SSE for
    /// `text/event-stream`, JSON (with [`DEFAULT_JSON_LIMIT`]) otherwise.
    pub fn for_response(headers: &HeaderMap) -> Self {
        if crate::headers::is_event_stream(headers) {
            Self::sse()
        } else {
            Self::json(DEFAULT_JSON_LIMIT)
        }
    }

    /// Feeds one frame of the body.
    pub fn feed(&mut self, chunk: &Bytes) {
        match &mut self.mode {
            Mode::Json {
                frames,
                len,
                limit,
                overflowed,
            } => {
                if *overflowed {
                    return;
                }
                *len = len.saturating_add(chunk.len());
                if *len > *limit {
                    *overflowed = true;
                    frames.clear();
                } else if !chunk.is_empty() {
                    frames.push_back(chunk.clone());
                }
            }
            Mode::Sse(state) => state.feed(chunk, &mut self.partial),
        }
    }

    /// The usage seen so far in an SSE stream (for a JSON body, nothing until
    /// [`finish`](Self::finish)).
    pub fn usage_so_far(&self) -> Option<Usage> {
        self.partial.finish()
    }

    /// Ends the body and returns the usage it reported, if any.
    pub fn finish(mut self) -> Option<Usage> {
        match &mut self.mode {
            Mode::Json {
                frames, overflowed, ..
            } => {
                if *overflowed {
                    return None;
                }
                // One frame (the usual case) is parsed where it lies; several are joined
                // first, because parsing from a slice is several times faster than from a
                // reader.
                let frames = std::mem::take(frames);
                let joined;
                let bytes: &[u8] = match frames.len() {
                    0 => return None,
                    1 => &frames[0],
                    _ => {
                        joined = frames
                            .iter()
                            .flat_map(|f| f.iter().copied())
                            .collect::<Vec<u8>>();
                        &joined
                    }
                };
                if !self.partial.merge_json(bytes) {
                    return None;
                }
            }
            Mode::Sse(state) => {
                // A stream that ends without the final blank line still ends its event.
                if !state.line.is_empty() {
                    let line = std::mem::take(&mut state.line);
                    state.line_done(&line, &mut self.partial);
                }
                state.dispatch(&mut self.partial);
            }
        }
        self.partial.finish()
    }
}

impl SseState {
    fn feed(&mut self, chunk: &[u8], partial: &mut Partial) {
        let mut rest = chunk;
        if self.after_cr {
            self.after_cr = false;
            if let Some(tail) = rest.strip_prefix(b"\n") {
                rest = tail;
            }
        }
        while let Some(pos) = memchr::memchr2(b'\n', b'\r', rest) {
            let (head, tail) = rest.split_at(pos);
            let skipped = self.skipping_line;
            if !skipped && self.line.len() + head.len() <= MAX_SSE_EVENT {
                self.line.extend_from_slice(head);
                let line = std::mem::take(&mut self.line);
                self.line_done(&line, partial);
                self.line = line;
                self.line.clear();
            } else {
                // The line was too long: drop it, and the event it belongs to.
                self.line.clear();
                self.skipping_event = true;
                self.data.clear();
            }
            self.skipping_line = false;
            // `\r\n` is one line ending; a `\r` at the end of the chunk may be too.
            rest = if tail[0] == b'\r' {
                match tail.get(1) {
                    Some(b'\n') => &tail[2..],
                    Some(_) => &tail[1..],
                    None => {
                        self.after_cr = true;
                        &tail[1..]
                    }
                }
            } else {
                &tail[1..]
            };
        }
        if self.skipping_line {
            return;
        }
        if self.line.len() + rest.len() > MAX_SSE_EVENT {
            self.line.clear();
            self.skipping_line = true;
        } else {
            self.line.extend_from_slice(rest);
        }
    }

    fn line_done(&mut self, line: &[u8], partial: &mut Partial) {
        if line.is_empty() {
            self.dispatch(partial);
            return;
        }
        let Some(value) = line.strip_prefix(b"data") else {
            return; // `event:`, `id:`, `retry:` and comments carry no usage.
        };
        let value = match value {
            [b':', b' ', rest @ ..] => rest,
            [b':', rest @ ..] => rest,
            [] => &[][..],
            _ => return, // a field named `data…` that is not `data`
        };
        if self.skipping_event || self.data.len() + value.len() + 1 > MAX_SSE_EVENT {
            self.skipping_event = true;
            self.data.clear();
            return;
        }
        if !self.data.is_empty() {
            self.data.push(b'\n');
        }
        self.data.extend_from_slice(value);
    }

    fn dispatch(&mut self, partial: &mut Partial) {
        let skipped = std::mem::take(&mut self.skipping_event);
        if !skipped && !self.data.is_empty() && memchr::memmem::find(&self.data, b"sage").is_some()
        {
            // Only events that mention `usage` or `usageMetadata` are parsed.
            partial.merge_json(&self.data);
        }
        self.data.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn usage(i: u64, o: u64, t: u64, c: u64) -> Option<Usage> {
        Some(Usage {
            input_tokens: i,
            output_tokens: o,
            total_tokens: t,
            cached_input_tokens: c,
        })
    }

    #[test]
    fn json_shapes_of_each_provider() {
        let openai = json!({"usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                                      "prompt_tokens_details": {"cached_tokens": 4}}});
        assert_eq!(Usage::from_json(&openai), usage(10, 5, 15, 4));
        let embeddings = json!({"usage": {"prompt_tokens": 8, "total_tokens": 8}});
        assert_eq!(Usage::from_json(&embeddings), usage(8, 0, 8, 0));
        let anthropic = json!({"usage": {"input_tokens": 100, "cache_creation_input_tokens": 20,
                                         "cache_read_input_tokens": 30, "output_tokens": 7}});
        assert_eq!(Usage::from_json(&anthropic), usage(150, 7, 157, 30));
        let responses = json!({"usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7,
                                         "input_tokens_details": {"cached_tokens": 1}}});
        assert_eq!(Usage::from_json(&responses), usage(3, 4, 7, 1));
        let gemini = json!({"usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 6,
                                              "thoughtsTokenCount": 2, "totalTokenCount": 20}});
        assert_eq!(Usage::from_json(&gemini), usage(12, 8, 20, 0));
        assert_eq!(Usage::from_json(&json!({"usage": null})), None);
        assert_eq!(Usage::from_json(&json!({"choices": []})), None);
        assert_eq!(Usage::from_json(&json!([1, 2])), None);
        assert_eq!(Usage::from_json_bytes(b"{not json"), None);
    }

    #[test]
    fn json_scanner_joins_frames_and_respects_its_cap() {
        let body =
            br#"{"id":"x","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        let mut s = UsageScanner::json(1024);
        for part in body.chunks(5) {
            s.feed(&Bytes::copy_from_slice(part));
        }
        assert_eq!(s.finish(), usage(3, 4, 7, 0));

        let mut small = UsageScanner::json(10);
        small.feed(&Bytes::from_static(body));
        assert_eq!(small.finish(), None, "over the cap: no usage, no buffering");
    }

    fn scan_sse(body: &str, split: usize) -> Option<Usage> {
        let mut s = UsageScanner::sse();
        for part in body.as_bytes().chunks(split.max(1)) {
            s.feed(&Bytes::copy_from_slice(part));
        }
        s.finish()
    }

    const OPENAI_STREAM: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\n\
        data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}],\"usage\":null}\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":2,\"total_tokens\":13}}\n\n\
        data: [DONE]\n\n";

    #[test]
    fn openai_stream_at_every_split() {
        for split in 1..OPENAI_STREAM.len() {
            assert_eq!(
                scan_sse(OPENAI_STREAM, split),
                usage(11, 2, 13, 0),
                "split {split}"
            );
        }
    }

    #[test]
    fn crlf_and_cr_line_endings() {
        let crlf = OPENAI_STREAM.replace('\n', "\r\n");
        let cr = OPENAI_STREAM.replace('\n', "\r");
        for split in [1, 2, 3, 7, 64] {
            assert_eq!(scan_sse(&crlf, split), usage(11, 2, 13, 0));
            assert_eq!(scan_sse(&cr, split), usage(11, 2, 13, 0));
        }
    }

    #[test]
    fn anthropic_stream_takes_input_from_start_and_output_from_last_delta() {
        let body = "event: message_start\n\
            data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
            event: content_block_delta\n\
            data: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"Hi\"}}\n\n\
            event: message_delta\n\
            data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n\
            event: message_stop\n\
            data: {\"type\":\"message_stop\"}\n\n";
        for split in [1, 5, 1000] {
            assert_eq!(scan_sse(body, split), usage(25, 15, 40, 0));
        }
    }

    #[test]
    fn gemini_and_responses_streams() {
        let gemini = "data: {\"usageMetadata\":{\"promptTokenCount\":4,\"candidatesTokenCount\":1}}\r\n\r\n\
            data: {\"usageMetadata\":{\"promptTokenCount\":4,\"candidatesTokenCount\":9,\"totalTokenCount\":13}}\r\n\r\n";
        assert_eq!(scan_sse(gemini, 3), usage(4, 9, 13, 0));
        let responses = "event: response.output_text.delta\ndata: {\"delta\":\"x\"}\n\n\
            event: response.completed\n\
            data: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":5,\"output_tokens\":6,\"total_tokens\":11}}}\n\n";
        assert_eq!(scan_sse(responses, 4), usage(5, 6, 11, 0));
    }

    #[test]
    fn multi_line_data_and_missing_final_blank_line() {
        let body = "data: {\"usage\":\ndata: {\"prompt_tokens\":1,\"completion_tokens\":2}}";
        assert_eq!(scan_sse(body, 4), usage(1, 2, 3, 0));
    }

    #[test]
    fn a_stream_without_usage_reports_none() {
        assert_eq!(
            scan_sse("data: {\"choices\":[]}\n\ndata: [DONE]\n\n", 3),
            None
        );
        assert_eq!(scan_sse(": keep-alive\n\n", 1), None);
    }

    #[test]
    fn oversized_lines_are_skipped_not_kept() {
        let huge = format!(
            "data: {{\"pad\":\"{}\"}}\n\n",
            "x".repeat(MAX_SSE_EVENT + 10)
        );
        let body = format!("{huge}{OPENAI_STREAM}");
        let mut s = UsageScanner::sse();
        for part in body.as_bytes().chunks(4096) {
            s.feed(&Bytes::copy_from_slice(part));
            if let Mode::Sse(state) = &s.mode {
                assert!(state.line.capacity() <= 2 * MAX_SSE_EVENT + 4096);
            }
        }
        assert_eq!(s.finish(), usage(11, 2, 13, 0));
    }

    #[test]
    fn for_response_picks_the_mode_from_content_type() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            "text/event-stream; charset=utf-8".parse().unwrap(),
        );
        assert!(matches!(UsageScanner::for_response(&h).mode, Mode::Sse(_)));
        assert!(matches!(
            UsageScanner::for_response(&HeaderMap::new()).mode,
            Mode::Json { .. }
        ));
    }
}
