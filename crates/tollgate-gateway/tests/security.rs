//! The security pass, as tests against the real binary: secrets never leave (logs,
//! metrics, pages, error bodies, Redis), credentials go only where they belong, no
//! request can point the gateway elsewhere, and admin endpoints want the admin key.

use std::convert::Infallible;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use serde_json::json;
use tollgate_integration_tests::{client, post, Answer, HttpClient};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

const TENANT_KEY: &str = "vk-tenant-secret-4f1d9a";
const WRONG_KEY: &str = "vk-wrong-secret-77c2e0";
const PROVIDER_A: &str = "sk-provider-a-secret-91b3";
const PROVIDER_B: &str = "sk-provider-b-secret-0c5e";
const ADMIN_KEY: &str = "adm-secret-3e8f21";

/// What an upstream saw: each request's path and headers, as text.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// An OpenAI-like upstream that records what reaches it; when `fails`, it answers 503 to
/// a body that asks it to (`"fail here"`); else a small chat completion with usage.
async fn upstream(fails: bool) -> (String, Seen) {
    let seen = Seen::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((io, _)) = listener.accept().await else {
                return;
            };
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let s = Arc::clone(&s);
                    async move {
                        let headers = format!("{:?}", req.headers());
                        let path = req.uri().path().to_owned();
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        s.lock().unwrap().push((
                            path,
                            format!("{headers}\n{}", String::from_utf8_lossy(&body)),
                        ));
                        let fail = fails && String::from_utf8_lossy(&body).contains("fail here");
                        let answer = json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o",
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}});
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(if fail { 503 } else { 200 })
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(answer.to_string())))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), seen)
}

struct Gw(std::process::Child);

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn get(http: &HttpClient, url: &str, auth: Option<&str>) -> Answer {
    let mut req = Request::get(url);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let res = http
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

#[tokio::test]
async fn secrets_never_leave_and_credentials_go_only_where_they_belong() {
    let Some(redis) = tollgate_testkit::redis::redis_url("the security pass") else {
        return;
    };
    let (a_url, a_seen) = upstream(true).await;
    let (b_url, b_seen) = upstream(false).await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let ns = format!("sec-{}-{:x}", std::process::id(), fastrand::u64(..));
    let dir = std::env::temp_dir().join(format!("tollgate-security-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            r#"listen: 127.0.0.1:{port}
store: {{ url: "{redis}", namespace: "{ns}" }}
admin_key_env: SEC_ADMIN_KEY
models:
  gpt-4o:
    primary: {{ url: "{a_url}", api_key_env: SEC_PROVIDER_A }}
    fallbacks: [ {{ name: b, url: "{b_url}", api_key_env: SEC_PROVIDER_B }} ]
    rate_limit: {{ requests: 1000/min, learn: false }}
    cache: {{ ttl: 10m }}
tenants:
  acme: {{ key_env: SEC_TENANT_KEY, requests: 1000/min, budget: 100/day }}
prices:
  gpt-4o: {{ input: 2.5, output: 10 }}
"#
        ),
    )
    .unwrap();
    let log = dir.join("gateway.log");
    let _gw = Gw(Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("TOLLGATE_LOG", "debug")
        .env("SEC_ADMIN_KEY", ADMIN_KEY)
        .env("SEC_PROVIDER_A", PROVIDER_A)
        .env("SEC_PROVIDER_B", PROVIDER_B)
        .env("SEC_TENANT_KEY", TENANT_KEY)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap());
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let http = client();
    let base = format!("http://127.0.0.1:{port}");
    let chat = |content: &str| json!({"model": "gpt-4o", "messages": [{"role": "user", "content": content}]});
    let url = format!("{base}/v1/chat/completions");
    let mut bodies = Vec::new();

    // A plain answer, a cache hit, a failover to b, and a stream.
    for content in ["hello", "hello", "fail here, please"] {
        let a = post(&http, &url, TENANT_KEY, &chat(content), &[])
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{:?}", a.body);
        bodies.push(a.body);
    }
    // Nothing in a request can send the gateway elsewhere.
    let mut redirect = chat("where do you go?");
    redirect["base_url"] = json!("http://127.0.0.1:9/");
    redirect["url"] = json!("http://127.0.0.1:9/");
    let a = post(
        &http,
        &url,
        TENANT_KEY,
        &redirect,
        &[
            ("host", "evil.example"),
            ("x-forwarded-host", "evil.example"),
            ("x-tollgate-backend", "evil"),
            ("forwarded", "host=evil.example"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200, "{:?}", a.body);
    bodies.push(a.body);
    // A wrong key: 401, and the key is not echoed.
    let wrong = post(&http, &url, WRONG_KEY, &chat("let me in"), &[])
        .await
        .unwrap();
    assert_eq!(wrong.status, 401);
    bodies.push(wrong.body);
    // Admin endpoints want the admin key.
    for path in ["/api/stats", "/dashboard", "/api/stats/stream"] {
        let none = get(&http, &format!("{base}{path}"), None).await;
        assert_eq!(none.status, 401, "{path} without the admin key");
        let tenant = get(
            &http,
            &format!("{base}{path}"),
            Some(&format!("Bearer {TENANT_KEY}")),
        )
        .await;
        assert_eq!(tenant.status, 401, "{path} with a tenant's key");
        bodies.push(none.body);
    }
    let reload = post(
        &http,
        &format!("{base}/admin/reload"),
        TENANT_KEY,
        &json!({}),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(reload.status, 401);
    bodies.push(reload.body);
    let stats = get(
        &http,
        &format!("{base}/api/stats"),
        Some(&format!("Bearer {ADMIN_KEY}")),
    )
    .await;
    assert_eq!(stats.status, 200);
    let page = get(
        &http,
        &format!("{base}/dashboard"),
        Some(&format!("Bearer {ADMIN_KEY}")),
    )
    .await;
    assert_eq!(page.status, 200);
    let metrics = get(&http, &format!("{base}/metrics"), None).await;
    bodies.extend([stats.body, page.body, metrics.body]);

    // Credentials went only where they belong.
    let a_seen = a_seen.lock().unwrap().clone();
    let b_seen = b_seen.lock().unwrap().clone();
    assert!(
        !a_seen.is_empty() && !b_seen.is_empty(),
        "both backends were asked"
    );
    for (who, seen, own, other) in [
        ("a", &a_seen, PROVIDER_A, PROVIDER_B),
        ("b", &b_seen, PROVIDER_B, PROVIDER_A),
    ] {
        for (path, text) in seen {
            assert!(path.starts_with("/v1/"), "{who} was asked for {path}");
            assert!(text.contains(own), "{who} got its own key");
            assert!(!text.contains(other), "{who} got the other backend's key");
            assert!(!text.contains(TENANT_KEY), "{who} got the caller's key");
            assert!(
                !text.contains("evil"),
                "{who} got the redirect attempt's headers: {text}"
            );
        }
    }
    // No secret anywhere the gateway writes or answers.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut places: Vec<(String, Vec<u8>)> = bodies
        .into_iter()
        .enumerate()
        .map(|(i, b)| (format!("answer {i}"), b.to_vec()))
        .collect();
    places.push(("the log".into(), std::fs::read(&log).unwrap()));
    let keys = Command::new("redis-cli")
        .args(["-u", &redis, "--scan", "--pattern", &format!("{{{ns}}}*")])
        .output()
        .unwrap()
        .stdout;
    let keys = String::from_utf8_lossy(&keys).into_owned();
    assert!(!keys.trim().is_empty(), "the gateway wrote to Redis");
    places.push(("Redis key names".into(), keys.clone().into_bytes()));
    for key in keys.lines().filter(|k| !k.is_empty()) {
        let dump = Command::new("redis-cli")
            .args(["-u", &redis, "--no-raw", "DUMP", key])
            .output()
            .unwrap()
            .stdout;
        places.push((format!("Redis {key}"), dump));
    }
    for (place, bytes) in &places {
        let text = String::from_utf8_lossy(bytes);
        for secret in [TENANT_KEY, WRONG_KEY, PROVIDER_A, PROVIDER_B, ADMIN_KEY] {
            assert!(!text.contains(secret), "{secret} appears in {place}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
