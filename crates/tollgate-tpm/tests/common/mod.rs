//! Shared helpers: a fake provider whose usage the test chooses, and a way to drive
//! services and bodies that are ready at once without a runtime.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::Full;
use serde_json::json;
use tollgate_core::facts::ReplayBody;
use tower::Service;

/// What the fake provider answers.
pub type Answer = Result<Response<Full<Bytes>>, Infallible>;

/// Answers JSON whose `usage.total_tokens` is the request's `x-actual` header (prompt 0).
pub fn fake_provider() -> impl Service<
    Request<ReplayBody>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = std::future::Ready<Answer>,
> + Clone
       + Send
       + 'static {
    tower::service_fn(|req: Request<ReplayBody>| {
        let actual: u64 = req
            .headers()
            .get("x-actual")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let body = json!({"choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": actual, "total_tokens": actual}});
        std::future::ready(Ok::<_, Infallible>(
            Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap(),
        ))
    })
}

/// A chat request of `words` words capped at `max_tokens`, which the fake provider will
/// say used `actual` tokens.
pub fn chat(words: usize, max_tokens: u64, actual: u64) -> Request<Full<Bytes>> {
    let content = "word ".repeat(words);
    let body = json!({"model": "gpt-4o", "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]});
    Request::post("/v1/chat/completions")
        .header("x-actual", actual.to_string())
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// Polls a future once; everything in these tests is ready at once.
pub fn now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("expected to be ready at once"),
    }
}

/// Reads a body that is ready at once to its end.
pub fn drain<B: Body + Unpin>(mut b: B) -> Vec<u8>
where
    B::Data: bytes::Buf,
{
    let mut out = Vec::new();
    loop {
        match std::pin::Pin::new(&mut b).poll_frame(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Some(Ok(f))) => {
                if let Ok(mut d) = f.into_data() {
                    use bytes::Buf;
                    while d.has_remaining() {
                        let c = d.chunk().to_vec();
                        d.advance(c.len());
                        out.extend(c);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => return out,
            Poll::Pending => panic!("expected the body to be ready"),
        }
    }
}
