//! The retry layer on a paused clock, against scripted providers.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tollgate_core::refusal::{LimitKind, Reason, Refusal};
use tollgate_retry::{Backoff, DeadlineExceeded, Jitter, RequestBody, RetryLayer, TpsBudget};
use tollgate_testkit::body::ScriptedBody;
use tower::{Layer, ServiceExt};

type Answer = Result<Response<Full<Bytes>>, tollgate_core::BoxError>;
type Script = Arc<Mutex<Vec<Answer>>>;
type Attempt = Request<RequestBody<Full<Bytes>>>;

/// What the scripted provider is.
trait Provider:
    tower::Service<
        Attempt,
        Response = Response<Full<Bytes>>,
        Error = tollgate_core::BoxError,
        Future = std::future::Ready<Answer>,
    > + Clone
    + Send
    + 'static
{
}
impl<T> Provider for T where
    T: tower::Service<
            Attempt,
            Response = Response<Full<Bytes>>,
            Error = tollgate_core::BoxError,
            Future = std::future::Ready<Answer>,
        > + Clone
        + Send
        + 'static
{
}

/// A provider that answers from a script, then 200s; counts its calls.
fn scripted(script: Vec<Answer>) -> (impl Provider, Arc<AtomicU32>) {
    let calls = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&calls);
    let script: Script = Arc::new(Mutex::new(script.into_iter().rev().collect()));
    let svc = tower::service_fn(move |_req: Request<RequestBody<Full<Bytes>>>| {
        seen.fetch_add(1, Ordering::SeqCst);
        let next = script.lock().unwrap().pop();
        std::future::ready(next.unwrap_or_else(|| Ok(Response::new(Full::new(Bytes::from("ok"))))))
    });
    (svc, calls)
}

fn status(
    code: u16,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Response<Full<Bytes>>, tollgate_core::BoxError> {
    let mut b = Response::builder().status(code);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    Ok(b.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
}

fn req() -> Request<Full<Bytes>> {
    Request::post("/v1/chat/completions")
        .body(Full::new(Bytes::from_static(b"{\"model\":\"m\"}")))
        .unwrap()
}

fn no_jitter() -> Backoff {
    Backoff {
        jitter: Jitter::None,
        ..Backoff::default()
    }
}

/// Sends one request; returns (status, calls, elapsed on the paused clock).
async fn run(
    layer: RetryLayer,
    script: Vec<Result<Response<Full<Bytes>>, tollgate_core::BoxError>>,
) -> (Result<u16, String>, u32, Duration) {
    let (svc, calls) = scripted(script);
    let start = Instant::now();
    let res = layer.layer(svc).oneshot(req()).await;
    (
        res.map(|r| r.status().as_u16()).map_err(|e| e.to_string()),
        calls.load(Ordering::SeqCst),
        start.elapsed(),
    )
}

#[tokio::test(start_paused = true)]
async fn each_header_form_sets_the_wait_exactly() {
    let l = || RetryLayer::builder().backoff(no_jitter()).build();
    let (r, calls, took) = run(l(), vec![status(429, &[("retry-after-ms", "1500")], "")]).await;
    assert_eq!((r, calls, took), (Ok(200), 2, Duration::from_millis(1500)));

    let (_, _, took) = run(l(), vec![status(503, &[("retry-after", "7")], "")]).await;
    assert_eq!(took, Duration::from_secs(7));

    // retry-after-ms wins over Retry-After.
    let h = [("retry-after", "9"), ("retry-after-ms", "2000")];
    let (_, _, took) = run(l(), vec![status(429, &h, "")]).await;
    assert_eq!(took, Duration::from_millis(2000));

    // A hint shorter than the backoff: the backoff (the larger), never less than the hint.
    let (_, _, took) = run(l(), vec![status(429, &[("retry-after-ms", "20")], "")]).await;
    assert_eq!(took, Duration::from_millis(500));

    // An HTTP date, relative to the (paused) clock's wall time.
    let at = SystemTime::now() + Duration::from_secs(30);
    let date = httpdate_string(at);
    let (_, _, took) = run(l(), vec![status(429, &[("retry-after", &date)], "")]).await;
    assert!(
        took > Duration::from_secs(28) && took <= Duration::from_secs(30),
        "{took:?}"
    );

    // For a 429 with no Retry-After: the reset of the exhausted limit.
    let h = [
        ("x-ratelimit-remaining-requests", "5"),
        ("x-ratelimit-reset-requests", "2s"),
        ("x-ratelimit-remaining-tokens", "0"),
        ("x-ratelimit-reset-tokens", "6.5s"),
    ];
    let (_, _, took) = run(l(), vec![status(429, &h, "")]).await;
    assert_eq!(took, Duration::from_millis(6500));

    // No hint: the backoff (500 ms, then 1 s without jitter).
    let (_, calls, took) = run(l(), vec![status(500, &[], ""), status(502, &[], "")]).await;
    assert_eq!((calls, took), (3, Duration::from_millis(1500)));
}

fn httpdate_string(t: SystemTime) -> String {
    // RFC 9110 IMF-fixdate, written by hand to keep the test free of a date crate.
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(mo - 1) as usize];
    format!("{wd}, {d:02} {mon} {y} {h:02}:{m:02}:{s:02} GMT")
}

#[tokio::test(start_paused = true)]
async fn answers_no_wait_fixes_come_back_after_one_attempt() {
    let l = || RetryLayer::builder().backoff(no_jitter()).build();
    for (code, headers, body) in [
        (400, vec![], ""),
        (401, vec![], ""),
        (404, vec![], ""),
        (
            429,
            vec![],
            r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#,
        ),
        (503, vec![("x-should-retry", "false")], ""),
    ] {
        let (r, calls, took) = run(l(), vec![status(code, &headers, body)]).await;
        assert_eq!(
            (r, calls, took),
            (Ok(code), 1, Duration::ZERO),
            "{code} {headers:?} {body}"
        );
    }
    // x-should-retry: true makes even a 400 worth another try.
    let (r, calls, _) = run(l(), vec![status(400, &[("x-should-retry", "true")], "")]).await;
    assert_eq!((r, calls), (Ok(200), 2));
}

#[tokio::test(start_paused = true)]
async fn a_hint_longer_than_max_server_wait_is_returned_at_once() {
    let l = RetryLayer::builder()
        .max_server_wait(Duration::from_secs(60))
        .build();
    let (r, calls, took) = run(l, vec![status(429, &[("retry-after", "3600")], "")]).await;
    assert_eq!((r, calls, took), (Ok(429), 1, Duration::ZERO));
}

#[tokio::test(start_paused = true)]
async fn max_retries_then_the_last_answer() {
    let l = RetryLayer::builder()
        .backoff(no_jitter())
        .max_retries(2)
        .build();
    let (r, calls, _) = run(
        l,
        vec![
            status(503, &[], ""),
            status(503, &[], ""),
            status(504, &[], ""),
        ],
    )
    .await;
    assert_eq!((r, calls), (Ok(504), 3));
}

#[tokio::test(start_paused = true)]
async fn refusals_wait_their_time_and_never_passing_ones_are_not_retried() {
    let l = || RetryLayer::builder().build();
    let refused = Refusal::new(LimitKind::Tokens, "tpm", Some(Duration::from_millis(2500)));
    let (r, calls, took) = run(l(), vec![Err(Box::new(refused))]).await;
    assert_eq!((r, calls, took), (Ok(200), 2, Duration::from_millis(2500)));
    let never = Refusal::new(LimitKind::Tokens, "tpm", None);
    let (r, calls, _) = run(l(), vec![Err(Box::new(never))]).await;
    assert_eq!(calls, 1);
    assert!(r.is_err());
}

#[tokio::test(start_paused = true)]
async fn a_limiter_refusing_past_its_max_wait_is_not_waited_out_here() {
    // The limiter said the wait is longer than the user allows: retrying after it would
    // wait that long anyway, and would keep failover from moving on.
    let too_long = Refusal::new(LimitKind::Requests, "rpm", Some(Duration::from_secs(30)))
        .with_reason(Reason::WaitTooLong);
    let (r, calls, took) = run(RetryLayer::builder().build(), vec![Err(Box::new(too_long))]).await;
    assert_eq!((calls, took), (1, Duration::ZERO));
    assert!(r.unwrap_err().contains("longer than allowed"));
}

#[tokio::test(start_paused = true)]
async fn transport_errors_are_retried_with_backoff() {
    let l = RetryLayer::builder().backoff(no_jitter()).build();
    let reset: tollgate_core::BoxError =
        Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
    let (r, calls, took) = run(l, vec![Err(reset)]).await;
    assert_eq!((r, calls, took), (Ok(200), 2, Duration::from_millis(500)));
}

#[tokio::test(start_paused = true)]
async fn the_budget_stops_a_retry_storm() {
    // The provider answers 503 to everything. Without a budget each request makes 4
    // attempts; with one allowing 10% extra, retries stay a small, bounded share.
    async fn attempts(budget: Option<TpsBudget>) -> u32 {
        // Short, fixed backoffs: the whole run spans a few seconds of the paused clock, so
        // the budget's floor of one retry a second adds a handful, not hundreds (with
        // jittered 0.5–8 s waits it spanned an hour and let the floor dominate).
        let backoff = Backoff {
            base: Duration::from_millis(1),
            cap: Duration::from_millis(1),
            ..no_jitter()
        };
        let layer = RetryLayer::builder()
            .budget(budget)
            .backoff(backoff)
            .build();
        let calls = Arc::new(AtomicU32::new(0));
        let seen = Arc::clone(&calls);
        let svc = layer.layer(tower::service_fn(
            move |_: Request<RequestBody<Full<Bytes>>>| {
                seen.fetch_add(1, Ordering::SeqCst);
                std::future::ready(status(503, &[], ""))
            },
        ));
        for _ in 0..500 {
            let _ = svc.clone().oneshot(req()).await;
        }
        calls.load(Ordering::SeqCst)
    }
    assert_eq!(
        attempts(None).await,
        2000,
        "a storm: every request retried 3 times"
    );
    let with_budget = attempts(Some(TpsBudget::new(Duration::from_secs(10), 1, 0.1))).await;
    assert!(
        with_budget > 500 && with_budget <= 625,
        "{with_budget} attempts for 500 requests"
    );
}

#[tokio::test(start_paused = true)]
async fn the_deadline_is_never_overrun() {
    // Hints of 5 s each: a fourth attempt would end past 12 s, so it is not made.
    let l = RetryLayer::builder()
        .deadline(Some(Duration::from_secs(12)))
        .max_retries(10)
        .build();
    let script = (0..10)
        .map(|_| status(503, &[("retry-after", "5")], ""))
        .collect();
    let (r, calls, took) = run(l, script).await;
    assert_eq!((r, calls, took), (Ok(503), 3, Duration::from_secs(10)));

    // An attempt that hangs is cut at the deadline itself.
    let l = RetryLayer::builder()
        .deadline(Some(Duration::from_secs(12)))
        .build();
    let hangs = tower::service_fn(|_: Request<RequestBody<Full<Bytes>>>| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    });
    let start = Instant::now();
    let err = l.layer(hangs).oneshot(req()).await.unwrap_err();
    assert!(err.is::<DeadlineExceeded>());
    assert_eq!(start.elapsed(), Duration::from_secs(12));
}

#[tokio::test(start_paused = true)]
async fn a_stream_is_retried_before_its_first_byte_and_not_after() {
    let calls = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&calls);
    let svc = tower::service_fn(move |_: Request<RequestBody<Full<Bytes>>>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                // Fails before any byte: the connection drops.
                return Err(tollgate_core::BoxError::from(std::io::Error::from(
                    std::io::ErrorKind::ConnectionReset,
                )));
            }
            Ok(Response::builder()
                .header("content-type", "text/event-stream")
                .body(ScriptedBody::new(
                    // One chunk, then the stream breaks.
                    vec![Bytes::from_static(b"data: {\"choices\":[]}\n\n"); 2],
                    Duration::ZERO,
                    Some(1),
                ))
                .unwrap())
        }
    });
    let res = RetryLayer::new().layer(svc).oneshot(req()).await.unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "retried before the first byte"
    );
    // The stream breaks after its first chunk: the caller sees it, nobody retries.
    assert!(res.into_body().collect().await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_cap_is_sent_once() {
    let l = RetryLayer::builder().body_limit(8).build();
    let (svc, calls) = scripted(vec![status(503, &[], "")]);
    let big = Request::post("/")
        .body(Full::new(Bytes::from(vec![b'x'; 100])))
        .unwrap();
    let res = l.layer(svc).oneshot(big).await.unwrap();
    assert_eq!(
        (res.status().as_u16(), calls.load(Ordering::SeqCst)),
        (503, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn the_replayed_body_is_the_same_on_every_attempt() {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&bodies);
    let calls = Arc::new(AtomicU32::new(0));
    let n = Arc::clone(&calls);
    let svc = tower::service_fn(move |req: Request<RequestBody<Full<Bytes>>>| {
        let (seen, first) = (Arc::clone(&seen), n.fetch_add(1, Ordering::SeqCst) == 0);
        async move {
            let b = req.into_body().collect().await?.to_bytes();
            seen.lock().unwrap().push(b);
            let code = if first { 503 } else { 200 };
            Ok::<_, tollgate_core::BoxError>(
                Response::builder()
                    .status(code)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
        }
    });
    let res = RetryLayer::new().layer(svc).oneshot(req()).await.unwrap();
    assert_eq!(res.status(), 200);
    let bodies = bodies.lock().unwrap();
    assert_eq!(bodies.len(), 2);
    assert_eq!(bodies[0], bodies[1]);
    assert_eq!(bodies[0], Bytes::from_static(b"{\"model\":\"m\"}"));
}

#[tokio::test(start_paused = true)]
async fn grpc_resource_exhausted_waits_for_the_pushback_and_negative_means_stop() {
    let l = || {
        RetryLayer::builder()
            .classifier(tollgate_retry::GrpcClassifier)
            .build()
    };
    let exhausted = |pushback: &str| {
        status(
            200,
            &[
                ("content-type", "application/grpc"),
                ("grpc-status", "8"),
                ("grpc-retry-pushback-ms", pushback),
            ],
            "",
        )
    };
    let (r, calls, took) = run(l(), vec![exhausted("750")]).await;
    assert_eq!((r, calls, took), (Ok(200), 2, Duration::from_millis(750)));
    let (_, calls, _) = run(l(), vec![exhausted("-1")]).await;
    assert_eq!(calls, 1, "a negative pushback means do not retry");
    let invalid_argument = status(200, &[("grpc-status", "3")], "");
    let (_, calls, _) = run(l(), vec![invalid_argument]).await;
    assert_eq!(calls, 1);
}
