//! 2xx JSON answers that break off or are not JSON, from the simulated provider over
//! loopback through a real HTTP client: the retry layer reads them whole before passing
//! them on, so it asks again instead of handing the caller a broken 200; and past every
//! attempt the caller gets a 502 in OpenAI's shape, never the broken body.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_core::unavailable::BrokenAnswer;
use tollgate_retry::{Backoff, Jitter, RequestBody, RetryLayer};
use tollgate_testkit::{Provider, FAULT_HEADER};
use tower::{Layer, ServiceExt};

type Upstream = tower::util::BoxCloneSyncService<
    Request<RequestBody<Full<Bytes>>>,
    Response<hyper::body::Incoming>,
    tollgate_core::BoxError,
>;

/// The client to `provider`, asking it for the fault of `faults[n]` on its n-th call (none
/// past the list); counts the calls.
fn client(provider: &Provider, faults: &[&'static str]) -> (Upstream, Arc<AtomicUsize>) {
    let http = Client::builder(TokioExecutor::new()).build_http::<RequestBody<Full<Bytes>>>();
    let base = provider.url();
    let faults: Arc<Mutex<Vec<&'static str>>> = Arc::new(Mutex::new(faults.to_vec()));
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    let svc = tower::service_fn(move |mut req: Request<RequestBody<Full<Bytes>>>| {
        let (http, base, faults) = (http.clone(), base.clone(), Arc::clone(&faults));
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            *req.uri_mut() = format!("{base}{}", req.uri().path()).parse()?;
            if let Some(f) = faults.lock().unwrap().get(n) {
                req.headers_mut()
                    .insert(FAULT_HEADER, HeaderValue::from_static(f));
            }
            Ok::<_, tollgate_core::BoxError>(http.request(req).await?)
        }
    });
    (tower::util::BoxCloneSyncService::new(svc), calls)
}

fn chat(stream: bool) -> Request<Full<Bytes>> {
    let body = serde_json::json!({"model": "gpt-4o", "stream": stream,
        "messages": [{"role": "user", "content": "Hello there"}]});
    Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sk-test")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn layer() -> RetryLayer {
    RetryLayer::builder()
        .backoff(Backoff {
            jitter: Jitter::None,
            ..Backoff::default()
        })
        .max_retries(2)
        .build()
}

#[tokio::test(start_paused = true)]
async fn a_cut_or_malformed_answer_is_asked_again_and_the_caller_gets_a_whole_one() {
    for fault in ["cut", "malformed"] {
        let provider = Provider::builder().spawn().await.unwrap();
        let (upstream, calls) = client(&provider, &[fault]);
        let res = layer().layer(upstream).oneshot(chat(false)).await.unwrap();
        assert_eq!(res.status(), 200);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{fault}: the caller got a broken body: {e}"));
        assert_eq!(v["object"], "chat.completion", "{fault}");
        assert_eq!(calls.load(Ordering::SeqCst), 2, "{fault}: asked again once");
    }
}

#[tokio::test(start_paused = true)]
async fn past_every_attempt_the_caller_gets_a_502_not_the_broken_body() {
    let provider = Provider::builder().spawn().await.unwrap();
    let (upstream, calls) = client(&provider, &["malformed", "cut", "malformed"]);
    let err = layer()
        .layer(upstream)
        .oneshot(chat(false))
        .await
        .unwrap_err();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the first try and two retries"
    );
    assert!(
        tollgate_core::error::find::<BrokenAnswer>(err.as_ref()).is_some(),
        "{err}"
    );
    let res: Response<Bytes> = tollgate_core::response::error_response(err.as_ref()).unwrap();
    assert_eq!(res.status(), 502);
    let v: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
    assert_eq!(v["error"]["code"], "upstream_answer_broken");
}

/// A stream is not held back to be checked: it is passed on as it comes (a stream cut
/// midway is the caller's to see, as an error once its first bytes are out).
#[tokio::test(start_paused = true)]
async fn a_streamed_answer_is_passed_on_unchecked() {
    // Chunks 20 ms apart, so the head is out before the cut.
    let provider = Provider::builder()
        .chunk_delay(std::time::Duration::from_millis(20))
        .spawn()
        .await
        .unwrap();
    let (upstream, calls) = client(&provider, &["cut"]);
    let res = layer().layer(upstream).oneshot(chat(true)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(tollgate_core::headers::is_event_stream(res.headers()));
    // However the cut shows (an error, or an early end), the caller sees the stream the
    // provider sent: half of it, no `[DONE]`.
    let seen = match res.into_body().collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(_) => String::new(),
    };
    assert!(!seen.contains("[DONE]"), "{seen}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// An answer of many frames, from a service that answers at once: (calls, the layer's
/// answer or error).
async fn frames(chunks: Vec<Bytes>) -> (usize, Result<Bytes, String>) {
    use tollgate_testkit::body::ScriptedBody;
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    let svc = tower::service_fn(move |_: Request<RequestBody<Full<Bytes>>>| {
        seen.fetch_add(1, Ordering::SeqCst);
        let body = ScriptedBody::new(chunks.clone(), std::time::Duration::ZERO, None);
        let res = Response::builder()
            .header("content-type", "application/json; charset=utf-8")
            .body(body)
            .unwrap();
        std::future::ready(Ok::<_, tollgate_core::BoxError>(res))
    });
    let out = match layer().layer(svc).oneshot(chat(false)).await {
        Ok(res) => res
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    (calls.load(Ordering::SeqCst), out)
}

#[tokio::test(start_paused = true)]
async fn an_answer_in_many_frames_is_joined_checked_and_passed_on_whole() {
    let parts = ["{\"object\":", "\"chat.completion\",", "\"choices\":[]}"];
    let (calls, out) = frames(
        parts
            .iter()
            .map(|p| Bytes::from_static(p.as_bytes()))
            .collect(),
    )
    .await;
    assert_eq!(calls, 1);
    assert_eq!(out.unwrap(), Bytes::from(parts.concat()));
    // The same frames without their end are not JSON: asked again, every time.
    let (calls, out) = frames(vec![Bytes::from_static(b"{\"object\":"); 2]).await;
    assert_eq!(calls, 3);
    assert!(out.unwrap_err().contains("not JSON"));
}

/// Past the 8 MiB the check reads, an answer streams on as it comes, every byte of it,
/// unchecked (it is not asked again, however it ends).
#[tokio::test(start_paused = true)]
async fn an_answer_past_the_cap_streams_on_unchecked() {
    let mib = Bytes::from(vec![b' '; 1 << 20]);
    let mut chunks = vec![Bytes::from_static(b"[")];
    chunks.extend(std::iter::repeat_n(mib, 9));
    let (calls, out) = frames(chunks).await;
    assert_eq!(calls, 1);
    assert_eq!(
        out.unwrap().len(),
        1 + 9 * (1 << 20),
        "every byte, the unclosed `[` too"
    );
}
