//! The layer behind a real hyper server with a real client: places held for as long as a
//! streamed answer runs, refused or waited for past the limit, given back when a stream
//! ends or its client goes away.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Either, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;
use tollgate_concurrency::{ConcurrencyLayer, InFlight};
use tollgate_core::key::{Header, Key};
use tower::{Layer, ServiceExt};

/// A streamed answer the test feeds: it ends when its sender is dropped.
struct Chan(mpsc::Receiver<Bytes>);

impl Body for Chan {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

/// The senders of the answers in flight, by the request's `x-stream` header.
type Streams = Arc<Mutex<HashMap<String, mpsc::Sender<Bytes>>>>;

/// Serves `layer` over a handler that streams each answer until the test ends it; the
/// address and the streams.
async fn serve(layer: ConcurrencyLayer) -> (std::net::SocketAddr, Streams) {
    let streams = Streams::default();
    let s = Arc::clone(&streams);
    let handler = tower::service_fn(move |req: Request<hyper::body::Incoming>| {
        let s = Arc::clone(&s);
        async move {
            let name = req.headers()["x-stream"].to_str().unwrap().to_owned();
            // `x-stream: sized`: a whole answer with a Content-Length, as JSON is sent.
            if name == "sized" {
                return Ok::<_, Infallible>(Response::new(Either::Right(Full::new(
                    Bytes::from_static(b"{\"ok\":true}"),
                ))));
            }
            let (tx, rx) = mpsc::channel(4);
            tx.send(Bytes::from_static(b"first ")).await.unwrap();
            s.lock().unwrap().insert(name, tx);
            Ok::<_, Infallible>(Response::new(Either::Left(Chan(rx))))
        }
    });
    let svc = layer.layer(handler);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (io, _) = listener.accept().await.unwrap();
            let svc = svc.clone();
            tokio::spawn(async move {
                // Refusals become their 429s, as a server's error layer makes them.
                let svc = tower::service_fn(move |req| {
                    let call = svc.clone().oneshot(req);
                    async move {
                        Ok::<_, Infallible>(match call.await {
                            Ok(res) => res.map(|b| b.boxed_unsync()),
                            Err(e) => {
                                let r = e.downcast::<tollgate_core::refusal::Refusal>().unwrap();
                                r.to_response::<Full<Bytes>>().map(|b| {
                                    b.map_err(|e| -> tollgate_core::BoxError { match e {} })
                                        .boxed_unsync()
                                })
                            }
                        })
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(
                        TokioIo::new(io),
                        hyper_util::service::TowerToHyperService::new(svc),
                    )
                    .await;
            });
        }
    });
    (addr, streams)
}

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn client() -> Http {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn open(
    http: &Http,
    addr: std::net::SocketAddr,
    tenant: &str,
    stream: &str,
) -> Response<hyper::body::Incoming> {
    let req = Request::get(format!("http://{addr}/"))
        .header("x-tenant-id", tenant)
        .header("x-stream", stream)
        .body(Full::new(Bytes::new()))
        .unwrap();
    http.request(req).await.unwrap()
}

/// Waits (polling, bounded) until `f` holds.
async fn until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..2000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("never: {what}");
}

fn tenant(name: &str) -> Key {
    Key::prefixed("tenant", name)
}

#[tokio::test]
async fn a_place_is_held_until_the_stream_ends_and_past_the_limit_a_request_is_refused() {
    let layer = ConcurrencyLayer::builder()
        .limit(InFlight::new("streams", 2).keyed_by(Header::new("x-tenant-id")))
        .build();
    let (addr, streams) = serve(layer.clone()).await;
    let http = client();
    let one = open(&http, addr, "a", "one").await;
    let two = open(&http, addr, "a", "two").await;
    assert_eq!((one.status().as_u16(), two.status().as_u16()), (200, 200));
    assert_eq!(
        layer.in_flight(&tenant("a")),
        2,
        "both streams hold their place"
    );
    let third = open(&http, addr, "a", "three").await;
    assert_eq!(third.status(), 429);
    assert_eq!(third.headers()["retry-after"], "1");
    let body = third.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("concurrency"),
        "{body:?}"
    );
    let other = open(&http, addr, "b", "b1").await;
    assert_eq!(other.status(), 200, "another tenant's places are its own");
    // The first stream ends: its place comes back once the client has read it to the end.
    streams.lock().unwrap().remove("one");
    let read = one.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(read, "first ");
    until("the ended stream's place is back", || {
        layer.in_flight(&tenant("a")) == 1
    })
    .await;
    let four = open(&http, addr, "a", "four").await;
    assert_eq!(four.status(), 200);
    drop((two, four, other));
}

#[tokio::test]
async fn in_wait_mode_a_request_takes_the_place_the_moment_a_stream_ends() {
    let layer = ConcurrencyLayer::builder()
        .limit(InFlight::new("streams", 1).keyed_by(Header::new("x-tenant-id")))
        .wait(Duration::from_secs(60))
        .build();
    let (addr, streams) = serve(layer.clone()).await;
    let http = client();
    let one = open(&http, addr, "a", "one").await;
    assert_eq!(one.status(), 200);
    let waiting = {
        let http = http.clone();
        tokio::spawn(async move { open(&http, addr, "a", "two").await.status() })
    };
    until("the second request waits", || layer.waiting() == 1).await;
    assert!(!waiting.is_finished());
    streams.lock().unwrap().remove("one");
    one.into_body().collect().await.unwrap();
    assert_eq!(waiting.await.unwrap(), 200, "it took the freed place");
    assert_eq!(layer.waiting(), 0);
}

#[tokio::test]
async fn a_client_that_goes_away_mid_stream_gives_its_place_back() {
    let layer = ConcurrencyLayer::builder()
        .limit(InFlight::new("streams", 1).keyed_by(Header::new("x-tenant-id")))
        .build();
    let (addr, streams) = serve(layer.clone()).await;
    let http = client();
    let mut one = open(&http, addr, "a", "one").await;
    // Read the first chunk, then hang up with the stream still running.
    let first = one.body_mut().frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "first ");
    drop(one);
    drop(http);
    until("the dropped stream's place is back", || {
        layer.in_flight(&tenant("a")) == 0
    })
    .await;
    let again = open(&client(), addr, "a", "two").await;
    assert_eq!(again.status(), 200);
    assert!(
        streams.lock().unwrap().contains_key("one"),
        "the server never ended it"
    );
}

#[tokio::test]
async fn a_zero_limit_lets_nothing_through_and_never_asks_to_retry() {
    let layer = ConcurrencyLayer::new(InFlight::new("closed", 0));
    let svc = layer.layer(tower::service_fn(|_: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    }));
    let e = svc.oneshot(Request::new(())).await.unwrap_err();
    let r = e.downcast::<tollgate_core::refusal::Refusal>().unwrap();
    assert_eq!(r.retry_after(), None);
}

#[tokio::test]
async fn a_sized_answer_gives_its_place_back_at_its_last_byte() {
    let layer = ConcurrencyLayer::builder()
        .limit(InFlight::new("answers", 1).keyed_by(Header::new("x-tenant-id")))
        .build();
    let (addr, _streams) = serve(layer.clone()).await;
    let http = client();
    for _ in 0..3 {
        // The server stops polling a sized body at its last byte; that end must free the
        // place, or the next request of the tenant is refused.
        let res = open(&http, addr, "a", "sized").await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-length"], "11");
        assert_eq!(
            res.into_body().collect().await.unwrap().to_bytes(),
            "{\"ok\":true}"
        );
        until("the sized answer's place is back", || {
            layer.in_flight(&tenant("a")) == 0
        })
        .await;
    }
}
