//! The batch layer on an HTTP client to the simulated provider, over loopback, on a
//! paused clock: concurrent single-text requests become one call, each caller gets what
//! it would have got alone.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tollgate_batch::BatchLayer;
use tollgate_core::facts::ReplayBody;
use tollgate_testkit::tokens::Vocab;
use tollgate_testkit::Provider;
use tower::{Layer, ServiceExt};

/// Its error is the client's own (a `BoxError` there meets rustc's higher-ranked check
/// in the futures polled together below).
type Upstream = tower::util::BoxCloneSyncService<
    Request<ReplayBody>,
    Response<hyper::body::Incoming>,
    hyper_util::client::legacy::Error,
>;

fn client(base: String) -> Upstream {
    let http = Client::builder(TokioExecutor::new()).build_http::<ReplayBody>();
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |mut req: Request<ReplayBody>| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let path = req.uri().path().to_owned();
            *req.uri_mut() = format!("{base}{path}").parse().expect("a URI");
            http.request(req).await
        }
    }))
}

fn embed(input: Value) -> Request<Full<Bytes>> {
    let body = json!({"model": "text-embedding-3-small", "input": input});
    Request::post("/v1/embeddings")
        .header("authorization", "Bearer sk-test")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn text(i: usize) -> String {
    format!("document number {i} says {}", "something ".repeat(i % 7))
}

fn layer(max_items: usize) -> BatchLayer {
    BatchLayer::builder()
        .max_delay(Duration::from_millis(5))
        .max_items(max_items)
        .count(|t| Vocab::Cl100k.count(t))
        .build()
}

async fn json_of<B>(res: Response<B>) -> (u16, Value)
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(start_paused = true)]
async fn sixty_four_single_texts_become_one_call_and_each_gets_what_it_would_alone() {
    let provider = Provider::builder().spawn().await.unwrap();
    let svc = layer(2048).layer(client(provider.url()));
    let answers = futures_util::future::join_all((0..64).map(|i| {
        let svc = svc.clone();
        async move { json_of(svc.oneshot(embed(json!(text(i)))).await.unwrap()).await }
    }))
    .await;
    assert_eq!(provider.stats().requests, 1, "one upstream call");
    // The same requests alone, straight to the provider.
    let direct = client(provider.url());
    for (i, (status, got)) in answers.iter().enumerate() {
        assert_eq!(*status, 200);
        let (_, alone) = json_of(
            direct
                .clone()
                .oneshot(embed_replay(json!(text(i))))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            got["data"], alone["data"],
            "caller {i}'s vectors, indexed from 0"
        );
        assert_eq!(
            got["usage"]["prompt_tokens"], alone["usage"]["prompt_tokens"],
            "caller {i}'s usage"
        );
    }
}

fn embed_replay(input: Value) -> Request<ReplayBody> {
    let (parts, body) = embed(input).into_parts();
    Request::from_parts(parts, body)
}

#[tokio::test(start_paused = true)]
async fn an_array_input_stays_together_and_a_caller_who_leaves_does_not_break_the_batch() {
    let provider = Provider::builder().spawn().await.unwrap();
    let svc = layer(2048).layer(client(provider.url()));
    let array = svc
        .clone()
        .oneshot(embed(json!([text(1), text(2), text(3)])));
    let single = svc.clone().oneshot(embed(json!(text(4))));
    // This one goes away before the window closes.
    let gone = tokio::spawn({
        let svc = svc.clone();
        async move { svc.oneshot(embed(json!(text(5)))).await.map(|_| ()) }
    });
    tokio::task::yield_now().await;
    gone.abort();
    let ((s1, a), (s2, b)) =
        futures_util::future::join(async { json_of(array.await.unwrap()).await }, async {
            json_of(single.await.unwrap()).await
        })
        .await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(a["data"].as_array().unwrap().len(), 3);
    assert_eq!(a["data"][2]["index"], 2);
    assert_eq!(b["data"].as_array().unwrap().len(), 1);
    assert_eq!(b["data"][0]["index"], 0);
    assert_eq!(provider.stats().requests, 1);
}

#[tokio::test(start_paused = true)]
async fn an_upstream_error_reaches_every_member() {
    let provider = Provider::builder().spawn().await.unwrap();
    let svc = layer(2048).layer(client(provider.url()));
    // The provider refuses a request without a model: both members get its answer.
    let bad = |t: &str| {
        Request::post("/v1/embeddings")
            .header("authorization", "Bearer sk-test")
            .body(Full::new(Bytes::from(json!({"input": t}).to_string())))
            .unwrap()
    };
    let (a, b) = futures_util::future::join(
        svc.clone().oneshot(bad("one")),
        svc.clone().oneshot(bad("two")),
    )
    .await;
    let ((sa, ea), (sb, eb)) = (json_of(a.unwrap()).await, json_of(b.unwrap()).await);
    assert_eq!((sa, sb), (400, 400));
    assert_eq!(ea, eb);
    assert!(ea["error"]["message"].as_str().unwrap().contains("model"));
    assert_eq!(provider.stats().requests, 1, "one call for both");
}

#[tokio::test(start_paused = true)]
async fn the_item_and_token_caps_split_a_large_group() {
    let provider = Provider::builder().spawn().await.unwrap();
    let svc = layer(16).layer(client(provider.url()));
    let answers = futures_util::future::join_all((0..64).map(|i| {
        let svc = svc.clone();
        async move { json_of(svc.oneshot(embed(json!(text(i)))).await.unwrap()).await }
    }))
    .await;
    assert!(answers
        .iter()
        .all(|(s, a)| *s == 200 && a["data"].as_array().unwrap().len() == 1));
    assert_eq!(provider.stats().requests, 4, "64 inputs at 16 a call");
    let tokens_cap = BatchLayer::builder()
        .max_input_tokens(40)
        .count(|t| Vocab::Cl100k.count(t))
        .build()
        .layer(client(provider.url()));
    let before = provider.stats().requests;
    futures_util::future::join_all((0..8).map(|i| {
        let svc = tokens_cap.clone();
        async move { json_of(svc.oneshot(embed(json!(text(i)))).await.unwrap()).await }
    }))
    .await;
    let calls = provider.stats().requests - before;
    assert!(
        (2..8).contains(&calls),
        "the token cap split 8 texts into {calls} calls"
    );
}

/// `encoding_format: base64` is a parameter like any other: base64 callers are batched
/// among themselves, never with float callers, and each gets the base64 vector it would
/// get alone.
#[tokio::test(start_paused = true)]
async fn base64_callers_batch_together_and_get_their_own_base64_vectors() {
    let provider = Provider::builder().spawn().await.unwrap();
    let svc = layer(2048).layer(client(provider.url()));
    let with = |i: usize, format: &str| {
        let body =
            json!({"model": "text-embedding-3-small", "input": text(i), "encoding_format": format});
        Request::post("/v1/embeddings")
            .header("authorization", "Bearer sk-test")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    };
    let answers = futures_util::future::join_all((0..8).map(|i| {
        let svc = svc.clone();
        let format = if i % 2 == 0 { "base64" } else { "float" };
        async move { json_of(svc.oneshot(with(i, format)).await.unwrap()).await }
    }))
    .await;
    assert_eq!(provider.stats().requests, 2, "one call per encoding");
    let direct = client(provider.url());
    for (i, (status, got)) in answers.iter().enumerate() {
        assert_eq!(*status, 200);
        let base64 = i % 2 == 0;
        assert_eq!(
            got["data"][0]["embedding"].is_string(),
            base64,
            "caller {i}"
        );
        let alone = with(i, if base64 { "base64" } else { "float" });
        let (_, alone) = json_of(direct.clone().oneshot(alone).await.unwrap()).await;
        assert_eq!(got["data"], alone["data"], "caller {i}'s vectors");
    }
}
