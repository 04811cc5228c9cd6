//! The cost layer on an HTTP client to the simulated provider, over loopback: what is
//! charged is the sum of the answers' usage at the model's price, and requests sent
//! together never take a tenant past its budget by more than one request's estimate.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_core::facts::ReplayBody;
use tollgate_core::key::{Header, Key};
use tollgate_core::refusal::{LimitKind, Refusal};
use tollgate_core::usage::Usage;
use tollgate_cost::{CostBudget, CostLayer, Money, Price, Prices, Window};
use tollgate_testkit::Provider;
use tower::{Layer, ServiceExt};

/// Its error is the client's own: a `BoxError` here would meet rustc's "`From` is not
/// general enough" in the spawned tasks (the gateway boxes its futures for the same
/// reason).
type Upstream = tower::util::BoxCloneSyncService<
    Request<ReplayBody>,
    Response<hyper::body::Incoming>,
    hyper_util::client::legacy::Error,
>;

/// An HTTP client service that sends every request to `base`.
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

fn chat(tenant: &str, words: usize, max_tokens: u64) -> Request<Full<Bytes>> {
    let body = serde_json::json!({"model": "gpt-4o", "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "many words ".repeat(words)}]});
    Request::post("/v1/chat/completions")
        .header("x-tenant-id", tenant)
        .header("authorization", "Bearer sk-test")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn gpt_4o() -> Price {
    Price::per_million(2.5, 10.0).cached_input(1.25)
}

fn layer(budget: Money) -> CostLayer {
    CostLayer::builder()
        .prices(Prices::new().model("gpt-4o", gpt_4o()))
        .budget(CostBudget::new("daily", budget, Window::Day).keyed_by(Header::new("x-tenant-id")))
        .build()
}

#[tokio::test]
async fn the_charge_is_the_answers_usage_at_the_models_price() {
    let provider = Provider::builder()
        .completion_tokens(40)
        .spawn()
        .await
        .unwrap();
    let layer = layer(Money::dollars(100.0));
    let svc = layer.layer(client(provider.url()));
    let mut expected = Money::ZERO;
    for i in 0..30 {
        let res = svc
            .clone()
            .oneshot(chat("acme", 5 + i * 7, 64))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let usage = Usage::from_json_bytes(&body).expect("the provider reports usage");
        expected = expected.plus(gpt_4o().cost(&usage));
    }
    let acme = layer
        .standing("daily", &Key::prefixed("tenant", "acme"))
        .unwrap();
    assert_eq!(acme.spent, expected, "to the nanodollar, so to the cent");
    assert_eq!(acme.held, Money::ZERO, "every hold settled");
    assert!(expected > Money::ZERO);
}

#[tokio::test]
async fn a_stream_is_charged_the_usage_of_its_last_chunk() {
    let provider = Provider::builder()
        .completion_tokens(25)
        .spawn()
        .await
        .unwrap();
    let layer = layer(Money::dollars(100.0));
    let svc = layer.layer(client(provider.url()));
    let body = serde_json::json!({"model": "gpt-4o", "max_tokens": 64, "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "stream me some words"}]});
    let req = Request::post("/v1/chat/completions")
        .header("x-tenant-id", "acme")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    let text =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    let usage = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .find_map(|v| Usage::from_json(&v))
        .expect("the stream's usage chunk");
    assert_eq!(usage.output_tokens, 25);
    let acme = layer
        .standing("daily", &Key::prefixed("tenant", "acme"))
        .unwrap();
    assert_eq!(acme.spent, gpt_4o().cost(&usage));
}

#[tokio::test]
async fn requests_sent_together_never_pass_the_budget_by_more_than_one_estimate() {
    let provider = Provider::builder()
        .completion_tokens(40)
        .latency(Duration::from_millis(20))
        .spawn()
        .await
        .unwrap();
    let budget = Money::dollars(0.02);
    let layer = layer(budget);
    let svc = layer.clone().layer(client(provider.url()));
    // One request's hold: its prompt (a token every four bytes) and its 64 tokens out.
    let one = {
        let (_, body) = chat("acme", 40, 64).into_parts();
        let bytes = body.collect().await.unwrap().to_bytes().len() as u64;
        gpt_4o().estimate(bytes.div_ceil(4), 64)
    };
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                match svc.oneshot(chat("acme", 40, 64)).await {
                    Ok(res) => {
                        assert_eq!(res.status(), 200);
                        res.into_body().collect().await.unwrap();
                        true
                    }
                    Err(e) => {
                        let r = e.downcast::<Refusal>().expect("a refusal");
                        assert_eq!(r.kind(), LimitKind::Budget);
                        assert!(r.retry_after().is_some(), "until the day ends");
                        false
                    }
                }
            })
        })
        .collect();
    let mut passed = 0;
    for t in tasks {
        passed += usize::from(t.await.unwrap());
    }
    let acme = layer
        .standing("daily", &Key::prefixed("tenant", "acme"))
        .unwrap();
    assert!(passed > 0 && passed < 200, "{passed} passed");
    assert!(
        acme.spent <= budget.plus(one),
        "spent {} of {budget}, one estimate {one}",
        acme.spent
    );
    assert_eq!(
        provider.stats().requests as usize,
        passed,
        "a refused request never left"
    );
    // Another tenant's budget is its own.
    let res = svc.oneshot(chat("other", 40, 64)).await.unwrap();
    assert_eq!(res.status(), 200);
}
