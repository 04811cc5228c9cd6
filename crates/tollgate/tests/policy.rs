//! Reading policy files: the annotated example, both formats, and the errors users see.

use std::time::Duration;

use tollgate::policy::{KeySpec, LimitMode, Partition, Policy, Rate, Store};

const EXAMPLE: &str = include_str!("../../../examples/tollgate.yaml");

#[test]
fn the_annotated_example_reads() {
    let p = Policy::from_yaml(EXAMPLE).unwrap();
    assert_eq!(p.primary.model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(p.fallbacks.len(), 1);
    assert_eq!(p.fallbacks[0].priority, Some(1));
    let rl = p.rate_limit.as_ref().unwrap();
    assert_eq!(
        rl.requests,
        Some(Rate {
            count: 600,
            per: Duration::from_secs(60)
        })
    );
    assert_eq!(
        rl.tokens,
        Some(Rate {
            count: 100_000,
            per: Duration::from_secs(60)
        })
    );
    assert_eq!(rl.key, Some(KeySpec::Global));
    assert_eq!(rl.mode, LimitMode::Wait);
    assert_eq!(rl.max_wait.unwrap().0, Duration::from_secs(30));
    let fb = p.fallbacks[0].rate_limit.as_ref().unwrap();
    assert_eq!(fb.requests.unwrap().count, 600);
    assert_eq!(p.retry.as_ref().unwrap().max_retries, Some(3));
    let cache = p.cache.as_ref().unwrap();
    assert_eq!(
        cache.partition,
        Some(Partition::By(KeySpec::Header(
            http::HeaderName::from_static("x-tenant-id")
        )))
    );
    assert_eq!(cache.max_size.unwrap().0, 64 << 20);
    assert_eq!(
        p.failover.wait_when_all_cooling.unwrap().0,
        Duration::from_secs(5)
    );
    assert_eq!(p.store, Store::Memory);
}

#[test]
fn toml_reads_the_same_policy() {
    let p = Policy::from_toml(
        r#"
store = "redis://127.0.0.1:6379/0"

[primary]
url = "http://127.0.0.1:8080"
model = "gpt-4o"

[[fallbacks]]
name = "mini"
url = "http://127.0.0.1:8081"
model = "gpt-4o-mini"

[rate_limit]
requests = "3000/min"
tokens = "250k/min"
mode = "refuse"
key = "header:x-tenant-id"

[retry]
max_retries = 5
backoff = "100ms"
"#,
    )
    .unwrap();
    assert_eq!(p.fallbacks[0].name.as_deref(), Some("mini"));
    let rl = p.rate_limit.unwrap();
    assert_eq!(rl.mode, LimitMode::Refuse);
    assert_eq!(rl.tokens.unwrap().count, 250_000);
    assert_eq!(
        p.retry.unwrap().backoff.unwrap().0,
        Duration::from_millis(100)
    );
    match p.store {
        Store::Redis(r) => assert_eq!(r.url, "redis://127.0.0.1:6379/0"),
        Store::Memory => panic!("a redis store"),
    }
}

/// The error for `text`, which must not read.
fn yaml_err(text: &str) -> tollgate::policy::PolicyError {
    Policy::from_yaml(text).expect_err("should not read")
}

#[test]
fn an_unknown_field_is_an_error_with_its_line() {
    let e = yaml_err("primary:\n  url: http://h\nretry:\n  max_retires: 3\n");
    assert_eq!(e.line(), Some(4), "{e}");
    assert!(e.message().contains("max_retires"), "{e}");
    let e = yaml_err("primary:\n  url: http://h\nrate_limits:\n  requests: 10/s\n");
    assert_eq!(e.line(), Some(3), "{e}");
    assert!(e.message().contains("rate_limits"), "{e}");
}

#[test]
fn a_bad_value_names_the_field_the_line_and_what_was_expected() {
    let e = yaml_err("primary:\n  url: http://h\nrate_limit:\n  requests: 600\n");
    assert_eq!(e.line(), Some(4), "{e}");
    assert!(e.message().contains("rate_limit.requests"), "{e}");
    assert!(
        e.message().contains("600/min"),
        "the message shows the form: {e}"
    );

    let e = yaml_err("primary:\n  url: http://h\nretry:\n  backoff: soon\n");
    assert_eq!(e.line(), Some(4), "{e}");
    assert!(e.message().contains("retry.backoff"), "{e}");

    let e = yaml_err("primary:\n  url: http://h\nrate_limit:\n  mode: maybe\n");
    assert_eq!(e.line(), Some(4), "{e}");
    assert!(e.message().contains("rate_limit.mode"), "{e}");

    let e = yaml_err("primary:\n  url: http://h\nstore: postgres://db\n");
    assert_eq!(e.line(), Some(3), "{e}");
    assert!(e.message().contains("store"), "{e}");

    let e = Policy::from_toml("[primary]\nurl = \"http://h\"\n[retry]\nmax_retries = \"lots\"\n")
        .unwrap_err();
    assert_eq!(e.line(), Some(4), "{e}");
    assert!(e.message().contains("retry.max_retries"), "{e}");
}

#[test]
fn values_that_parse_but_make_no_sense_are_refused() {
    assert!(yaml_err("fallbacks: []\n").message().contains("primary"));
    assert!(yaml_err("primary: { url: \"ftp://h\" }\n")
        .message()
        .contains("http"));
    assert!(yaml_err(
        "primary: { url: \"http://h\" }\nfallbacks: [ { name: primary, url: \"http://g\" } ]\n"
    )
    .message()
    .contains("two backends"));
    assert!(
        yaml_err("primary: { url: \"http://h\", headers: { \"bad header\": x } }\n")
            .message()
            .contains("header")
    );
    assert!(
        yaml_err("primary: { url: \"http://h\" }\nretry: { factor: 0.5 }\n")
            .message()
            .contains("factor")
    );
}

#[test]
fn a_backends_group_is_balanced_with_its_fallbacks_after_it() {
    use tollgate::policy::StrategyConfig;
    let p = Policy::from_yaml(
        r#"
backends:
  - { name: key-a, url: "http://a", api_key_env: KEY_A, weight: 3 }
  - { name: key-b, url: "http://b", api_key_env: KEY_B, rate_limit: { requests: 60/min } }
fallbacks: [ { name: mini, url: "http://a", model: gpt-4o-mini } ]
"#,
    )
    .unwrap();
    assert_eq!(p.primary.name.as_deref(), Some("key-a"));
    assert_eq!(p.primary.weight, Some(3));
    let rest: Vec<_> = p.fallbacks.iter().map(|b| b.name.as_deref()).collect();
    assert_eq!(
        rest,
        [Some("key-b"), Some("mini")],
        "the group, then the fallbacks"
    );
    assert!(p.fallbacks[0].rate_limit.is_some());
    assert_eq!(p.failover.strategy, Some(StrategyConfig::Balanced));
    let said = p.describe();
    assert!(
        said.contains("balanced") && said.contains("key-a → http://a, weight 3"),
        "{said}"
    );

    // The file's own strategy wins; primary and fallbacks stay ordered by default.
    let weighted = Policy::from_yaml(
        "backends: [ { url: \"http://a\" }, { name: b, url: \"http://b\" } ]\nfailover: { strategy: weighted }\n",
    )
    .unwrap();
    assert_eq!(weighted.failover.strategy, Some(StrategyConfig::Weighted));
    let plain = Policy::from_yaml("primary: { url: \"http://a\" }\n").unwrap();
    assert_eq!(plain.failover.strategy, None);

    // One of the two forms, never both, never neither; an entry is checked like any.
    let both = yaml_err("primary: { url: \"http://a\" }\nbackends: [ { url: \"http://b\" } ]\n");
    assert!(both.message().contains("not both"), "{both}");
    let none = yaml_err("backends: []\n");
    assert!(none.message().contains("no backend"), "{none}");
    let bad = yaml_err("backends:\n  - { url: \"http://a\", wieght: 2 }\n");
    assert_eq!(bad.line(), Some(2), "{bad}");
    assert!(bad.message().contains("wieght"), "{bad}");
}

#[test]
fn garbage_never_panics() {
    for text in [
        "",
        ":",
        "- - -",
        "primary: [",
        "{{{{",
        "primary: !!binary AAAA",
        "\u{0}",
        "a: &x [*x]",
    ] {
        let _ = Policy::from_yaml(text);
        let _ = Policy::from_toml(text);
    }
}

mod build {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::{BodyExt, Full};
    use tollgate::core::refusal::Refusal;
    use tollgate::policy::{BoxBody, Policy};
    use tower::{service_fn, ServiceExt};

    /// An upstream that echoes where it was sent and with which credentials.
    fn echo() -> impl tower::Service<
        Request<BoxBody>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
           + Send
           + Sync
           + 'static {
        service_fn(|req: Request<BoxBody>| async move {
            let auth = req
                .headers()
                .get("authorization")
                .map(|v| v.to_str().unwrap_or("").to_owned())
                .unwrap_or_default();
            let body = serde_json::json!({
                "uri": req.uri().to_string(),
                "auth": auth,
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
            });
            Ok(Response::new(Full::new(Bytes::from(body.to_string()))))
        })
    }

    fn chat() -> Request<Full<Bytes>> {
        Request::post("/v1/chat/completions")
            .body(Full::new(Bytes::from_static(
                br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
            )))
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_keyed_limit_drops_idle_keys_on_the_housekeeping_the_policy_sets() {
        let policy = Policy::from_yaml(
            "primary: { url: \"http://h\" }\nrate_limit: { requests: 60/min, key: \"header:x-user\", learn: false, housekeeping: 2s }\n",
        )
        .unwrap();
        let (svc, layers) = policy.build_observed::<_, _, Full<Bytes>>(echo()).unwrap();
        let limiter = layers[0].rate_limit.clone().unwrap();
        for user in ["a", "b", "c"] {
            let mut req = chat();
            req.headers_mut().insert("x-user", user.parse().unwrap());
            assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 200);
        }
        assert_eq!(limiter.keys(), 3);
        // One cell comes back in 1 s; the 2 s housekeeping then finds every key as good as
        // new and drops it.
        tokio::time::sleep(std::time::Duration::from_millis(4100)).await;
        assert_eq!(limiter.keys(), 0);
    }

    #[tokio::test]
    async fn requests_go_to_the_backend_url_with_its_own_credentials() {
        std::env::set_var("TOLLGATE_TEST_KEY_A", "sk-from-env");
        let policy = Policy::from_yaml("primary: { url: \"http://10.9.8.7:1234/openai/\", api_key_env: TOLLGATE_TEST_KEY_A }\n").unwrap();
        let svc = policy.build(echo()).unwrap();
        let res = svc.oneshot(chat()).await.unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(v["uri"], "http://10.9.8.7:1234/openai/v1/chat/completions");
        assert_eq!(v["auth"], "Bearer sk-from-env");
    }

    #[tokio::test]
    async fn a_missing_key_variable_or_an_unbuilt_store_is_a_clear_error() {
        let policy = Policy::from_yaml(
            "primary: { url: \"http://h\", api_key_env: TOLLGATE_TEST_UNSET_VARIABLE }\n",
        )
        .unwrap();
        let err = policy.build::<_, _, Full<Bytes>>(echo()).err().unwrap();
        assert!(
            err.message().contains("TOLLGATE_TEST_UNSET_VARIABLE"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refuse_mode_refuses_past_the_quota_with_the_time_to_wait() {
        let policy = Policy::from_yaml(
            "primary: { url: \"http://h\" }\nrate_limit: { requests: 2/min, mode: refuse }\n",
        )
        .unwrap();
        let svc = policy.build(echo()).unwrap();
        for _ in 0..2 {
            assert_eq!(svc.clone().oneshot(chat()).await.unwrap().status(), 200);
        }
        let err = svc.clone().oneshot(chat()).await.unwrap_err();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&*err);
        let mut refusal = None;
        while let Some(e) = cur {
            if let Some(r) = e.downcast_ref::<Refusal>() {
                refusal = Some(r.clone());
            }
            cur = e.source();
        }
        let refusal = refusal.expect("a Refusal in the error chain");
        assert_eq!(
            refusal.retry_after(),
            Some(std::time::Duration::from_secs(30))
        );
    }
}

#[test]
fn describe_lists_each_backend_with_its_resolved_limits_and_where_they_come_from() {
    let policy = Policy::from_yaml(
        r#"
primary:    { url: "https://api.openai.com", model: gpt-4o }
fallbacks:
  - { name: mini, url: "https://api.openai.com", model: gpt-4o-mini }
  - { name: own, url: "https://example.com", rate_limit: { requests: 100/min, mode: refuse } }
rate_limit: { requests: 500/min, tokens: 30k/min, key: "header:x-tenant-id", max_wait: 10s }
retry:      { max_retries: 2 }
cache:      { ttl: 5m }
"#,
    )
    .unwrap();
    let text = policy.describe();
    println!("{text}");
    let line = |starts: &str| {
        let at = text
            .find(starts)
            .unwrap_or_else(|| panic!("{starts} in {text}"));
        text[at..].lines().take(4).collect::<Vec<_>>().join("\n")
    };
    let mini = line("2. mini");
    assert!(mini.contains("model rewritten to gpt-4o-mini"), "{mini}");
    assert!(
        mini.contains("requests: 500/1m0s (burst 500) per header:x-tenant-id key, wait up to 10s (queue 1024), the provider's own quota adopted where stricter [inherited from the top-level rate_limit]"),
        "a fallback without its own limits shows the ones it takes: {mini}"
    );
    assert!(mini.contains("tokens: 30000/1m0s"), "{mini}");
    let own = line("3. own");
    assert!(
        own.contains(
            "requests: 100/1m0s (burst 100) per global key, refuse at once with 429, the provider's own quota adopted where stricter [its own]"
        ),
        "{own}"
    );
    assert!(
        own.contains("tokens: learned from the provider"),
        "its own limits replace the top-level ones whole; the token quota it left out is learned: {own}"
    );
    assert!(text.contains("retry: up to 2 retries"), "{text}");
    assert!(text.contains("cache: ttl 5m0s"), "{text}");
    assert!(text.contains("store: memory"), "{text}");

    // Nothing said of limits: both learned; `learn: false` and no quota: no limit.
    let bare = Policy::from_yaml("primary: { url: \"https://api.openai.com\" }\n").unwrap();
    let text = bare.describe();
    assert!(
        text.contains("requests: learned from the provider's x-ratelimit-* headers"),
        "{text}"
    );
    assert!(text.contains("wait up to 30s"), "{text}");
    let exact = Policy::from_yaml(
        "primary: { url: \"https://api.openai.com\" }\nrate_limit: { requests: 10/s, learn: false }\n",
    )
    .unwrap();
    let text = exact.describe();
    assert!(
        text.contains(
            "requests: 10/1s (burst 10) per global key, wait up to 30s (queue 1024) [inherited"
        ),
        "{text}"
    );
    assert!(text.contains("tokens: no limit"), "{text}");
}
