//! The layer's rules on a paused clock, with fake providers.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use common::{chat, drain, fake_provider};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tollgate_core::facts::ReplayBody;
use tollgate_core::key::{Header, Key};
use tollgate_core::refusal::{Reason, Refusal};
use tollgate_tpm::estimate::Estimator;
use tollgate_tpm::{Budget, TokenQuota, TpmLayer};
use tower::{Layer, ServiceExt};

fn refusal(e: tollgate_core::BoxError) -> Refusal {
    *e.downcast::<Refusal>().expect("a refusal")
}

#[tokio::test(start_paused = true)]
async fn a_request_larger_than_the_budget_is_refused_as_never_passing() {
    let layer = TpmLayer::new(Budget::new("tpm", TokenQuota::per_minute(100)));
    let svc = layer.layer(fake_provider());
    let r = refusal(svc.oneshot(chat(10, 500, 0)).await.unwrap_err());
    assert_eq!(r.reason(), Reason::TooLarge);
    assert_eq!(r.retry_after(), None);
    assert_eq!(r.limit(), "tpm");
}

#[tokio::test(start_paused = true)]
async fn wait_mode_waits_for_the_tokens_to_refill() {
    // Each request reserves its estimate and uses all of it; the budget holds six a
    // minute, refilled continuously: one every 10 s once the first six are through.
    let cost = {
        let (parts, body) = chat(10, 83, 0).into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let facts =
            tollgate_core::facts::RequestFacts::parse(parts.uri.path(), &parts.headers, bytes)
                .unwrap();
        Estimator::default().estimate(&facts).total()
    };
    let layer = TpmLayer::builder()
        .budget(Budget::new("tpm", TokenQuota::per_minute(6 * cost)))
        .wait(Duration::from_secs(60))
        .build();
    let svc = layer.layer(fake_provider());
    let start = Instant::now();
    for i in 0..8u64 {
        let mut req = chat(10, 83, cost);
        let waits = std::sync::Arc::new(tollgate_core::wait::WaitReport::default());
        req.extensions_mut().insert(std::sync::Arc::clone(&waits));
        let before = Instant::now();
        let res = svc.clone().oneshot(req).await.unwrap();
        drain(res.into_body());
        let t = Instant::now() - start;
        // Six fit in the first minute's bucket; then one every 10 s.
        let want = Duration::from_secs(i.saturating_sub(5) * 10);
        assert!(
            t >= want && t <= want + Duration::from_millis(5),
            "request {i} at {t:?}"
        );
        // The request's own wait is reported to whoever asked (a gateway's overhead).
        assert_eq!(waits.total(), Instant::now() - before, "request {i}");
    }
}

#[tokio::test(start_paused = true)]
async fn several_budgets_are_all_or_nothing() {
    let layer = TpmLayer::builder()
        .budget(
            Budget::new("tenant", TokenQuota::per_minute(150)).keyed_by(Header::new("x-tenant-id")),
        )
        .budget(Budget::new("global", TokenQuota::per_minute(250)))
        .estimator(Estimator::default())
        .build();
    let svc = layer.layer(fake_provider());
    let with_tenant = |t: &str| {
        let mut r = chat(10, 83, 100);
        r.headers_mut().insert("x-tenant-id", t.parse().unwrap());
        r
    };
    drain(
        svc.clone()
            .oneshot(with_tenant("a"))
            .await
            .unwrap()
            .into_body(),
    );
    // Tenant a has 50 left: refused by its own budget, taking nothing from the global one.
    assert_eq!(
        refusal(svc.clone().oneshot(with_tenant("a")).await.unwrap_err()).limit(),
        "tenant"
    );
    drain(
        svc.clone()
            .oneshot(with_tenant("b"))
            .await
            .unwrap()
            .into_body(),
    );
    assert_eq!(layer.available("global", &Key::global()), Some(50));
    assert_eq!(
        refusal(svc.clone().oneshot(with_tenant("c")).await.unwrap_err()).limit(),
        "global"
    );
    assert_eq!(layer.available("tenant", &Key::new("tenant:c")), Some(150));
}

#[tokio::test(start_paused = true)]
async fn anthropic_streams_settle_with_input_and_final_output() {
    let anthropic = tower::service_fn(|_: Request<ReplayBody>| async {
        let sse = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":40,\"output_tokens\":1}}}\n\n\
                   event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":12}}\n\n";
        Ok::<_, Infallible>(
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Full::new(Bytes::from_static(sse.as_bytes())))
                .unwrap(),
        )
    });
    let layer = TpmLayer::builder()
        .budget(Budget::new("tpm", TokenQuota::per_minute(10_000)))
        .estimator(Estimator::default().default_output(1000))
        .build();
    let svc = layer.layer(anthropic);
    let req = Request::post("/v1/messages")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"claude-sonnet-4","max_tokens":500,"stream":true,"messages":[{"role":"user","content":"Hello"}]}"#,
        )))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(
        body.starts_with(b"event: message_start"),
        "Anthropic streams pass untouched"
    );
    assert_eq!(layer.available("tpm", &Key::global()), Some(10_000 - 52));
}

#[tokio::test(start_paused = true)]
async fn adaptive_budgets_follow_the_providers_remaining_tokens() {
    let provider = tower::service_fn(|_: Request<ReplayBody>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .header("x-ratelimit-remaining-tokens", "300")
                .body(Full::new(Bytes::from_static(
                    br#"{"usage":{"total_tokens":100}}"#,
                )))
                .unwrap(),
        )
    });
    // A window of a year: no refill to speak of while the test runs.
    let year = Duration::from_secs(365 * 24 * 3600);
    let layer = TpmLayer::new(Budget::new("tpm", TokenQuota::per(100_000, year)).adaptive());
    let svc = layer.layer(provider);
    drain(svc.oneshot(chat(10, 83, 100)).await.unwrap().into_body());
    // Reserved more than the 100 used; the refund must not lift it above the provider's 300.
    assert_eq!(layer.available("tpm", &Key::global()), Some(300));
}

#[tokio::test(start_paused = true)]
async fn idle_keys_are_dropped() {
    let layer = TpmLayer::builder()
        .budget(
            Budget::new("tpm", TokenQuota::per_minute(60_000)).keyed_by(Header::new("x-tenant-id")),
        )
        .housekeeping(None)
        .build();
    let svc = layer.layer(fake_provider());
    for i in 0..10_000 {
        let mut r = chat(1, 10, 18);
        r.headers_mut()
            .insert("x-tenant-id", i.to_string().parse().unwrap());
        drain(svc.clone().oneshot(r).await.unwrap().into_body());
    }
    assert_eq!(layer.keys(), 10_000);
    layer.retain_recent();
    assert_eq!(layer.keys(), 10_000, "still refilling");
    tokio::time::advance(Duration::from_secs(1)).await;
    layer.retain_recent();
    assert_eq!(layer.keys(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_cap_is_refused_before_any_token_is_taken() {
    let layer = TpmLayer::builder()
        .budget(Budget::new("tpm", TokenQuota::per_minute(1000)))
        .body_limit(64)
        .build();
    let err = layer
        .layer(fake_provider())
        .oneshot(chat(100, 10, 0))
        .await
        .unwrap_err();
    assert!(err.is::<tollgate_core::facts::FactsError>());
    assert_eq!(layer.available("tpm", &Key::global()), Some(1000));
}

#[tokio::test(start_paused = true)]
async fn adaptive_budgets_never_run_ahead_of_a_slower_provider() {
    // The provider has 0 of 1000 tokens left, full again in 60 s: it refills ~16.7 a
    // second. Our budget would refill 1000 a second. After the answer, our budget must
    // not hold more than the provider's would, at any moment before its reset.
    let provider = tower::service_fn(|_: Request<ReplayBody>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .header("x-ratelimit-limit-tokens", "1000")
                .header("x-ratelimit-remaining-tokens", "0")
                .header("x-ratelimit-reset-tokens", "1m0s")
                .body(Full::new(Bytes::from_static(
                    br#"{"usage":{"total_tokens":100}}"#,
                )))
                .unwrap(),
        )
    });
    let layer = TpmLayer::new(
        Budget::new("tpm", TokenQuota::per(60_000, Duration::from_secs(60))).adaptive(),
    );
    let svc = layer.layer(provider);
    drain(svc.oneshot(chat(10, 83, 100)).await.unwrap().into_body());
    let mut at = 0u64;
    for secs in [0u64, 1, 10, 30, 59] {
        tokio::time::advance(Duration::from_secs(secs - at)).await;
        at = secs;
        let ours = layer.available("tpm", &Key::global()).unwrap() as f64;
        let providers = 1000.0 * secs as f64 / 60.0;
        assert!(
            ours <= providers + 1.0,
            "at {secs} s: ours {ours}, the provider's {providers}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn under_reserved_requests_are_charged_the_difference() {
    let year = Duration::from_secs(365 * 24 * 3600);
    let layer = TpmLayer::new(Budget::new("tpm", TokenQuota::per(10_000, year)));
    let svc = layer.layer(fake_provider());
    // Reserves its estimate (about 100), but the provider reports 2500 used.
    drain(svc.oneshot(chat(10, 83, 2500)).await.unwrap().into_body());
    assert_eq!(layer.available("tpm", &Key::global()), Some(10_000 - 2500));
}

#[tokio::test(start_paused = true)]
async fn an_answer_without_usage_keeps_the_whole_reservation() {
    let silent = tower::service_fn(|_: Request<ReplayBody>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
            br#"{"choices":[]}"#,
        ))))
    });
    let year = Duration::from_secs(365 * 24 * 3600);
    let layer = TpmLayer::new(Budget::new("tpm", TokenQuota::per(10_000, year)));
    let svc = layer.layer(silent);
    let req = chat(10, 83, 0);
    let reserved = {
        let (parts, body) = chat(10, 83, 0).into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let facts =
            tollgate_core::facts::RequestFacts::parse(parts.uri.path(), &parts.headers, bytes)
                .unwrap();
        Estimator::default().estimate(&facts).total() as i64
    };
    drain(svc.oneshot(req).await.unwrap().into_body());
    assert_eq!(
        layer.available("tpm", &Key::global()),
        Some(10_000 - reserved)
    );
}

#[tokio::test(start_paused = true)]
async fn settling_one_request_never_releases_anothers_hold() {
    // A stays in flight holding its reservation; B is reserved and settled. Once the
    // bucket has refilled, what is free must still leave A's hold out. (A settlement used
    // to be released twice, the second time as its value was dropped, which took B's
    // amount off A's hold.)
    let layer = TpmLayer::new(Budget::new("tpm", TokenQuota::per_minute(1000)));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let rx = std::sync::Arc::new(std::sync::Mutex::new(Some(rx)));
    let provider = tower::service_fn(move |req: Request<ReplayBody>| {
        let hold = req.headers().contains_key("x-hold");
        let rx = rx.lock().unwrap().take().filter(|_| hold);
        async move {
            if let Some(rx) = rx {
                let _ = rx.await;
            }
            let body = r#"{"choices":[],"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}}"#;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                body.as_bytes(),
            ))))
        }
    });
    let svc = layer.layer(provider);
    let mut a = chat(10, 300, 0);
    a.headers_mut().insert("x-hold", "1".parse().unwrap());
    let a_reserved = 1000 - {
        let svc = svc.clone();
        let task = tokio::spawn(async move { drain(svc.oneshot(a).await.unwrap().into_body()) });
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        let free = layer.available("tpm", &Key::global()).unwrap();
        drop(task);
        free
    };
    assert!(a_reserved > 300, "A holds its estimate: {a_reserved}");
    drain(
        svc.clone()
            .oneshot(chat(10, 200, 0))
            .await
            .unwrap()
            .into_body(),
    );
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(
        layer.available("tpm", &Key::global()),
        Some(1000 - a_reserved),
        "A's hold is still out of the refill"
    );
    drop(tx);
}

/// What `chat(words, max_tokens, _)` reserves.
async fn estimate(words: usize, max_tokens: u64) -> u64 {
    let (parts, body) = chat(words, max_tokens, 0).into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let facts =
        tollgate_core::facts::RequestFacts::parse(parts.uri.path(), &parts.headers, bytes).unwrap();
    Estimator::default().estimate(&facts).total()
}

#[tokio::test(start_paused = true)]
async fn tenants_of_equal_weight_get_equal_tokens_whatever_their_prompt_size() {
    use std::sync::{Arc, Mutex};
    use tollgate_core::wait::FairShare;
    let (big, small) = (estimate(10, 300).await, estimate(10, 100).await);
    assert!(big > 2 * small, "{big} {small}");
    let layer = TpmLayer::builder()
        .budget(Budget::new(
            "tpm",
            TokenQuota::per(1000, Duration::from_secs(1)),
        ))
        .wait(Duration::from_secs(600))
        .max_queue(10_000)
        .share(FairShare::by(Header::new("x-tenant-id")))
        .build();
    let svc = layer.layer(fake_provider());
    let start = Instant::now();
    // Who was admitted, for how many tokens, when.
    type Log = Arc<Mutex<Vec<(&'static str, u64, Duration)>>>;
    let log = Log::default();
    let mut tasks = Vec::new();
    for (tenant, max_tokens, cost, n) in [("big", 300, big, 100), ("small", 100, small, 300)] {
        for _ in 0..n {
            let (svc, log) = (svc.clone(), Arc::clone(&log));
            let mut req = chat(10, max_tokens, cost);
            req.headers_mut()
                .insert("x-tenant-id", tenant.parse().unwrap());
            tasks.push(tokio::spawn(async move {
                let res = svc.oneshot(req).await.unwrap();
                log.lock()
                    .unwrap()
                    .push((tenant, cost, Instant::now() - start));
                drain(res.into_body());
            }));
            tokio::task::yield_now().await;
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Both wait from the first second until big runs out (about 60 s in): over any 20 s
    // of it, each gets half the tokens though big asks three times as much per request.
    let log = log.lock().unwrap();
    for from in [2u64, 10, 20, 30] {
        let (from, to) = (Duration::from_secs(from), Duration::from_secs(from + 20));
        let tokens = |who: &str| -> u64 {
            log.iter()
                .filter(|(t, _, at)| *t == who && *at >= from && *at < to)
                .map(|(_, c, _)| c)
                .sum()
        };
        let (b, s) = (tokens("big"), tokens("small"));
        let share = b as f64 / (b + s) as f64;
        assert!(
            (0.45..=0.55).contains(&share),
            "big had {b} of {} tokens from {from:?}",
            b + s
        );
    }
}
