//! The dashboard in a real browser: Debian's Chromium, headless, driven over the WebDriver
//! protocol by chromedriver. Known traffic goes through the gateway; the page must show
//! the gateway's own counts, a curve point and the limit line; a screenshot is saved as
//! `dashboard.png` in Cargo's scratch directory for tests (`target/tmp/`).
//!
//! Skips (with a line saying so) on a machine without `chromium` and `chromedriver`,
//! unless `TOLLGATE_REQUIRE_BROWSER=1` (as `.ci/run` sets it, after installing them).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tollgate_gateway::{Config, Gateway};
use tollgate_integration_tests::{chat, client, post, HttpClient};
use tollgate_testkit::Provider;

const CHROMIUM: &str = "/usr/bin/chromium";

fn find(name: &str) -> Option<String> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .ok()?;
    let path = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!path.is_empty()).then_some(path)
}

struct Driver {
    child: Child,
    base: String,
    http: HttpClient,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn call(&self, method: http::Method, path: &str, body: Option<Value>) -> Value {
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                body.map_or_else(String::new, |b| b.to_string()),
            )))
            .unwrap();
        let res = self.http.request(req).await.unwrap();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    }

    async fn script(&self, session: &str, script: &str) -> Value {
        let v = self
            .call(
                http::Method::POST,
                &format!("/session/{session}/execute/sync"),
                Some(json!({"script": script, "args": []})),
            )
            .await;
        v["value"].clone()
    }
}

async fn start_driver(path: &str) -> Driver {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = Command::new(path)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Driver {
        child,
        base: format!("http://127.0.0.1:{port}"),
        http: client(),
    }
}

async fn serve(gateway: Gateway) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { gateway.serve(listener, std::future::pending()).await });
    addr
}

#[tokio::test]
async fn the_dashboard_shows_the_gateways_counts_curves_and_limits_in_a_browser() {
    let required = std::env::var("TOLLGATE_REQUIRE_BROWSER").is_ok_and(|v| v == "1");
    let (Some(driver_path), true) = (
        find("chromedriver"),
        std::path::Path::new(CHROMIUM).exists(),
    ) else {
        assert!(
            !required,
            "TOLLGATE_REQUIRE_BROWSER=1 but chromium or chromedriver is missing"
        );
        eprintln!(
            "skipping the browser test: install chromium and chromium-driver (apt-get) to run it"
        );
        return;
    };
    let provider = Provider::builder().spawn().await.unwrap();
    let config = Config::from_yaml(&format!(
        r#"
open: true
models:
  gpt-4o-mini:
    primary: {{ url: "{}" }}
    rate_limit: {{ requests: 120/min, tokens: 20k/min, mode: wait, max_wait: 30s }}
    cache: {{ ttl: 10m }}
tenants:
  acme: {{ requests: 300/min }}
"#,
        provider.url()
    ))
    .unwrap();
    let addr = serve(Gateway::new(config).unwrap()).await;
    let http = client();
    let url = format!("http://{addr}/v1/chat/completions");
    // Known traffic: six questions, two of them asked twice (two cache hits).
    for q in ["a", "b", "c", "d", "e", "f", "a", "b"] {
        let mut body = chat(&format!("question {q}"));
        body["model"] = json!("gpt-4o-mini");
        let a = post(&http, &url, "k", &body, &[("x-tenant-id", "acme")])
            .await
            .unwrap();
        assert_eq!(a.status, 200);
    }

    let driver = start_driver(&driver_path).await;
    let profile = std::env::temp_dir().join(format!("tollgate-chromium-{}", std::process::id()));
    let session = driver
        .call(
            http::Method::POST,
            "/session",
            Some(json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-background-networking", "--disable-component-update",
                             "--disable-sync", "--disable-quic", "--window-size=1400,1700",
                             format!("--user-data-dir={}", profile.display())]
                }
            }}})),
        )
        .await;
    let id = session["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no WebDriver session: {session}"))
        .to_owned();
    driver
        .call(
            http::Method::POST,
            &format!("/session/{id}/url"),
            Some(json!({"url": format!("http://{addr}/dashboard")})),
        )
        .await;

    // The page renders from /api/stats, then once a second from the stream.
    let deadline = Instant::now() + Duration::from_secs(20);
    let shown = loop {
        let v = driver
            .script(
                &id,
                r#"const q = (s) => document.querySelector(`[data-model="gpt-4o-mini"][data-stat="${s}"]`);
                   if (!document.body.dataset.updated || !q("requests")) return null;
                   return { requests: q("requests").textContent, cache_hits: q("cache_hits").textContent,
                            tokens: q("tokens").textContent,
                            points: document.querySelectorAll('svg[data-chart="rpm"] circle.point').length,
                            last_x: Math.max(0, ...[...document.querySelectorAll('svg[data-chart="rpm"] circle.point')].map((c) => +c.getAttribute("cx"))),
                            limit_lines: document.querySelectorAll('svg line.limit').length,
                            rows: document.querySelectorAll('#recent tr.req').length,
                            tenant: document.querySelector('[data-tenant="acme"] [data-stat="requests"]')?.textContent };"#,
            )
            .await;
        if !v.is_null() || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!shown.is_null(), "the page never rendered");

    // The gateway's own counters, for comparison.
    let stats = {
        let req = Request::get(format!("http://{addr}/api/stats"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let res = http.request(req).await.unwrap();
        let v: Value =
            serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
        v
    };
    let totals = &stats["models"][0]["totals"];
    assert_eq!(totals["requests"], 8);
    assert_eq!(totals["cache_hits"], 2);
    assert_eq!(shown["requests"], "8", "{shown}");
    assert_eq!(shown["cache_hits"], "2", "{shown}");
    assert_eq!(
        shown["tokens"].as_str().unwrap(),
        totals["tokens"].to_string(),
        "{shown}"
    );
    assert_eq!(shown["tenant"], "8", "{shown}");
    assert_eq!(shown["rows"], 8, "every request in the log: {shown}");
    assert!(
        shown["points"].as_u64().unwrap() >= 1,
        "a curve point: {shown}"
    );
    assert!(
        shown["last_x"].as_f64().unwrap() > 550.0,
        "the point is at now, the right end: {shown}"
    );
    assert_eq!(
        shown["limit_lines"], 2,
        "the RPM and TPM limits drawn: {shown}"
    );

    let shot = driver
        .call(
            http::Method::GET,
            &format!("/session/{id}/screenshot"),
            None,
        )
        .await;
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["value"].as_str().unwrap())
        .unwrap();
    // Cargo's scratch directory for integration tests: it exists wherever the target
    // directory is (`CARGO_TARGET_DIR` may put it outside the checkout).
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&out, &png).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    eprintln!("dashboard screenshot: {}", out.display());
    driver
        .call(http::Method::DELETE, &format!("/session/{id}"), None)
        .await;
    let _ = std::fs::remove_dir_all(&profile);
}
