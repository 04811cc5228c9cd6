//! Two instances of the same policy with `store: redis://…` share one quota and one cache
//! (real Redis: `REDIS_URL`; skipped with a message when absent, required in CI).

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate::core::refusal::Refusal;
use tollgate::policy::{BoxBody, Policy, PolicyService};
use tollgate_testkit::Provider;
use tower::ServiceExt;

fn instance(yaml: &str, provider: &Provider) -> PolicyService<Full<Bytes>> {
    let mut policy = Policy::from_yaml(yaml).unwrap();
    policy.primary.url = provider.url();
    let client: Client<HttpConnector, BoxBody> = Client::builder(TokioExecutor::new()).build_http();
    policy.build(client).unwrap()
}

fn chat(tenant: &str, q: &str) -> Request<Full<Bytes>> {
    let body = serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": q}]});
    Request::post("/v1/chat/completions")
        .header("x-tenant-id", tenant)
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn namespace() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("it-{}-{nanos}", std::process::id())
}

fn policy(url: &str, pooled: bool) -> String {
    format!(
        r#"
primary:    {{ url: "http://placeholder" }}
rate_limit: {{ requests: 6/min, tokens: 100k/min, mode: refuse }}
cache:      {{ ttl: 1m, partition: "header:x-tenant-id" }}
store:      {{ url: "{url}", namespace: "{ns}", timeout: 1s, pooled: {pooled} }}
"#,
        ns = namespace()
    )
}

#[tokio::test]
async fn two_pooled_instances_share_one_quota() {
    let Some(url) = tollgate_testkit::redis::redis_url("two_pooled_instances_share_one_quota")
    else {
        return;
    };
    let yaml = policy(&url, true);
    let provider = Provider::builder().spawn().await.unwrap();
    let (a, b) = (instance(&yaml, &provider), instance(&yaml, &provider));
    let mut admitted = 0;
    for i in 0..12 {
        let svc = if i % 3 == 0 { &a } else { &b };
        if let Ok(res) = svc.clone().oneshot(chat("acme", &format!("p{i}"))).await {
            res.into_body().collect().await.unwrap();
            admitted += 1;
        }
    }
    // Slices shrink to single cells as the quota runs out: neither instance strands any.
    assert_eq!(admitted, 6);
    assert_eq!(provider.stats().requests, 6);
}

#[tokio::test]
async fn two_instances_share_one_quota_and_one_cache() {
    let Some(url) =
        tollgate_testkit::redis::redis_url("two_instances_share_one_quota_and_one_cache")
    else {
        return;
    };
    let yaml = policy(&url, false);
    let provider = Provider::builder().spawn().await.unwrap();
    let (a, b) = (instance(&yaml, &provider), instance(&yaml, &provider));

    // Six a minute in all, whichever instance they reach.
    let mut admitted = 0;
    let mut refused = 0;
    for i in 0..10 {
        let svc = if i % 2 == 0 { &a } else { &b };
        match svc.clone().oneshot(chat("acme", &format!("q{i}"))).await {
            Ok(res) => {
                assert_eq!(res.status(), 200);
                res.into_body().collect().await.unwrap();
                admitted += 1;
            }
            Err(e) => {
                let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&*e);
                let mut found = false;
                while let Some(err) = cur {
                    found |= err.is::<Refusal>();
                    cur = err.source();
                }
                assert!(found, "a refusal, not {e}");
                refused += 1;
            }
        }
    }
    assert_eq!((admitted, refused), (6, 4));

    // An answer one instance cached is a hit for the other, for the same tenant only.
    let res = a.clone().oneshot(chat("acme", "q0")).await.unwrap();
    assert_eq!(
        res.headers()["x-tollgate-cache"],
        "hit",
        "instance a's own answer"
    );
    let res = b.clone().oneshot(chat("acme", "q0")).await.unwrap();
    assert_eq!(
        res.headers()["x-tollgate-cache"],
        "hit",
        "written by a, read by b"
    );
    let before = provider.stats().requests;
    let res = b.clone().oneshot(chat("globex", "q0")).await;
    // Another tenant misses (and, the quota being spent, is refused upstream of the
    // cache): it never reads acme's answer.
    if let Ok(res) = res {
        assert_ne!(res.headers()["x-tollgate-cache"], "hit");
    }
    assert!(provider.stats().requests <= before + 1);
}
