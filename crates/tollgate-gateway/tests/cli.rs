//! The `tollgate` binary as a user runs it: `check`, `--version`, and `serve` with its
//! signals (SIGHUP reloads, SIGTERM drains).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::json;
use tollgate_integration_tests::{chat, client, post, sse_events};
use tollgate_testkit::Provider;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_prints_each_models_stack_and_a_bad_file_fails_with_field_and_line() {
    let good = temp_file(
        "good.yaml",
        "open: true\nmodels:\n  gpt-4o:\n    primary: { url: \"https://api.openai.com\" }\n    retry: { max_retries: 2 }\naliases: { gpt-4o-latest: gpt-4o }\n",
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("model gpt-4o (also: gpt-4o-latest)"),
        "{stdout}"
    );
    assert!(stdout.contains("retry: up to 2 retries"), "{stdout}");

    let bad = temp_file(
        "bad.yaml",
        "open: true\nmodels:\n  gpt-4o:\n    primary: { url: \"https://api.openai.com\" }\n    retry: { max_retries: lots }\n",
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("line 5"), "{stderr}");
    assert!(
        stderr.contains("models.gpt-4o.retry.max_retries"),
        "{stderr}"
    );

    // The annotated reference reads.
    let reference = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/gateway.yaml");
    let out = Command::new(BIN)
        .args(["check", "--config", reference])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("tollgate "));
}

fn kill(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test]
async fn serve_reloads_on_sighup_and_drains_a_stream_on_sigterm() {
    let provider = Provider::builder()
        .chunk_delay(Duration::from_millis(25))
        .completion_tokens(30)
        .tokens_per_chunk(1)
        .spawn()
        .await
        .unwrap();
    let port = free_port();
    let yaml = format!(
        "listen: 127.0.0.1:{port}\nopen: true\nmodels:\n  gpt-4o:\n    primary: {{ url: \"{}\" }}\n",
        provider.url()
    );
    let path = temp_file("serve.yaml", &yaml);
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Its log is JSON lines on stdout; read them on a thread.
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = std::sync::Arc::clone(&lines);
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        })
    };
    let base = format!("http://127.0.0.1:{port}");
    let http = client();
    let mut up = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "the gateway listens");
    let url = format!("{base}/v1/chat/completions");
    let mut other = chat("x");
    other["model"] = json!("gpt-4o-mini");
    assert_eq!(
        post(&http, &url, "k", &other, &[]).await.unwrap().status,
        404
    );

    // SIGHUP: the file now names a second model.
    std::fs::write(
        &path,
        format!(
            "{yaml}  gpt-4o-mini:\n    primary: {{ url: \"{}\" }}\n",
            provider.url()
        ),
    )
    .unwrap();
    kill(pid, "HUP");
    let mut served = false;
    for _ in 0..100 {
        if post(&http, &url, "k", &other, &[]).await.unwrap().status == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "the reloaded config serves the new model");

    // SIGTERM with a stream in flight: it completes, then the process exits 0.
    let mut body = chat("drain me");
    body["stream"] = json!(true);
    let req = Request::post(&url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let res = http.request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    kill(pid, "TERM");
    let rest = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        sse_events(&rest).last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    reader.join().unwrap();

    let lines = lines.lock().unwrap();
    let access: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "tollgate::access")
        .collect();
    assert!(access.len() >= 3, "{lines:?}");
    let last = access.last().unwrap();
    let f = &last["fields"];
    assert_eq!(f["model"], "gpt-4o");
    assert_eq!(f["status"], 200);
    assert_eq!(f["outcome"], "complete");
    assert_eq!(
        f["output_tokens"], 30,
        "a stream's tokens are in its line: {last}"
    );
    assert!(f["request_id"].as_str().unwrap().starts_with("req_"));
    assert!(lines.iter().any(|l| l.contains("config reloaded")));
    assert!(lines.iter().any(|l| l.contains("every connection drained")));
}

/// A gateway process, killed when dropped (a failing test leaves none behind).
struct Gw(std::process::Child);

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `tollgate serve --config path` and waits until it listens on `port`.
async fn serve_binary(path: &std::path::Path, port: u16) -> Gw {
    let child = Gw(Command::new(BIN)
        .args(["serve", "--config"])
        .arg(path)
        .env("TOLLGATE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
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
    child
}

#[tokio::test]
async fn a_job_running_when_the_gateway_is_killed_completes_after_the_restart_recorded_once() {
    // A slow provider: the job is mid-call when the gateway dies.
    let provider = Provider::builder()
        .latency(Duration::from_millis(1500))
        .spawn()
        .await
        .unwrap();
    let port = free_port();
    let dir = fresh_dir("jobs");
    let path = temp_file(
        "jobs.yaml",
        &jobs_yaml(port, &dir, "workers: 1", &provider.url()),
    );
    let mut first = serve_binary(&path, port).await;
    let http = client();
    let base = format!("http://127.0.0.1:{port}");
    let a = post(
        &http,
        &format!("{base}/v1/chat/completions"),
        "k",
        &chat("survive this"),
        &[("prefer", "respond-async")],
    )
    .await
    .unwrap();
    assert_eq!(a.status, 202);
    let id = a.json()["id"].as_str().unwrap().to_owned();
    let job_url = format!("{base}/v1/jobs/{id}");
    let mut seen = serde_json::Value::Null;
    for _ in 0..200 {
        seen = get_json(&http, &job_url).await;
        if seen["status"] == "in_progress" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen["status"], "in_progress", "{seen}");
    // SIGKILL mid-call: nothing of the gateway's survives but its job file.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let mut second = serve_binary(&path, port).await;
    let http = client();
    for _ in 0..400 {
        seen = get_json(&http, &job_url).await;
        if seen["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(seen["status"], "completed", "{seen}");
    assert_eq!(seen["attempts"], 2, "taken over once its lease ran out");
    assert_eq!(seen["response"]["status_code"], 200);
    // At most twice at the provider, and only because a gateway died mid-call (the
    // simulated provider counts a request after its latency, so the cut one may not show).
    let seen_by_provider = provider.stats().requests;
    assert!((1..=2).contains(&seen_by_provider), "{seen_by_provider}");
    kill(second.0.id(), "TERM");
    assert!(second.0.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_batch_interrupted_by_sigkill_finishes_after_the_restart_with_every_line_once() {
    let provider = Provider::builder()
        .latency(Duration::from_millis(300))
        .spawn()
        .await
        .unwrap();
    let port = free_port();
    let dir = fresh_dir("batch");
    let path = temp_file(
        "batch.yaml",
        &jobs_yaml(port, &dir, "workers: 2", &provider.url()),
    );
    let first = serve_binary(&path, port).await;
    let http = client();
    let base = format!("http://127.0.0.1:{port}");
    let batch_url = submit_batch(&http, &base, 20).await;
    // Kill it once some lines are done and others are not.
    let done_before = wait_until_done(&http, &batch_url, 4).await;
    assert!((4..20).contains(&done_before), "{done_before}");
    drop(first); // SIGKILL
    let _second = serve_binary(&path, port).await;
    let http = client();
    expect_every_line_once(&http, &base, &batch_url, 20).await;
    // Only lines in flight at the kill may have reached the provider twice (2 workers).
    let calls = provider.stats().requests;
    assert!((20..=22).contains(&calls), "{calls}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn two_gateways_on_one_redis_finish_a_batch_when_one_is_killed_every_line_once() {
    let Some(redis) = tollgate_testkit::redis::redis_url("two gateways, one job queue") else {
        return;
    };
    let provider = Provider::builder()
        .latency(Duration::from_millis(300))
        .spawn()
        .await
        .unwrap();
    let ports = [free_port(), free_port()];
    let dir = fresh_dir("redis-batch");
    let namespace = format!("cli-jobs-{}-{:x}", std::process::id(), fastrand::u64(..));
    // One Redis queue, and one files directory (a shared volume in production).
    let store = format!("workers: 2, store: \"{redis}\", namespace: \"{namespace}\"");
    let config =
        |port: u16, name: &str| temp_file(name, &jobs_yaml(port, &dir, &store, &provider.url()));
    let (a, b) = (
        config(ports[0], "redis-a.yaml"),
        config(ports[1], "redis-b.yaml"),
    );
    let first = serve_binary(&a, ports[0]).await;
    let _second = serve_binary(&b, ports[1]).await;
    let http = client();
    let base_a = format!("http://127.0.0.1:{}", ports[0]);
    let base_b = format!("http://127.0.0.1:{}", ports[1]);
    let batch_url = submit_batch(&http, &base_a, 30).await;
    let done_before = wait_until_done(&http, &batch_url, 6).await;
    assert!((6..30).contains(&done_before), "{done_before}");
    drop(first); // SIGKILL: its two lines in flight stay pending in the group
    let batch_url = batch_url.replace(&base_a, &base_b);
    expect_every_line_once(&http, &base_b, &batch_url, 30).await;
    // Only the lines the killed instance had in flight may have reached the provider
    // twice: two workers.
    let calls = provider.stats().requests;
    assert!((30..=32).contains(&calls), "{calls}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A free port on loopback.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// An empty directory of this test run's, named `name`.
fn fresh_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// An open gateway on `port` with jobs kept in `dir` (a lease of 1 s, and the settings
/// `jobs`) and one model, `gpt-4o`, at `provider`.
/// A live worker renews its lease every third of it; 3 s leaves a loaded CI machine room
/// for a late renewal, and is what a restarted gateway waits out before taking over.
fn jobs_yaml(port: u16, dir: &std::path::Path, jobs: &str, provider: &str) -> String {
    format!(
        "listen: 127.0.0.1:{port}\nopen: true\njobs: {{ path: \"{}\", lease: 3s, {jobs} }}\nmodels:\n  gpt-4o:\n    primary: {{ url: \"{provider}\" }}\n",
        dir.join("jobs.redb").display(),
    )
}

/// Uploads a batch of `n` chat lines and creates it; the batch's URL.
async fn submit_batch(
    http: &tollgate_integration_tests::HttpClient,
    base: &str,
    n: usize,
) -> String {
    let lines: String = (0..n)
        .map(|i| {
            json!({"custom_id": format!("line-{i}"), "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": format!("line {i}")}]}})
            .to_string()
                + "\n"
        })
        .collect();
    let boundary = "b0undary";
    let form = format!(
        "--{boundary}\r\ncontent-disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\r\n{lines}\r\n--{boundary}--\r\n"
    );
    let req = Request::post(format!("{base}/v1/files"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Full::new(Bytes::from(form)))
        .unwrap();
    let res = http.request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let file: serde_json::Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let b = post(
        http,
        &format!("{base}/v1/batches"),
        "k",
        &json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(b.status, 200, "{:?}", b.body);
    format!("{base}/v1/batches/{}", b.json()["id"].as_str().unwrap())
}

/// Waits until at least `done` lines of the batch are completed; how many are.
async fn wait_until_done(
    http: &tollgate_integration_tests::HttpClient,
    batch_url: &str,
    done: u64,
) -> u64 {
    let mut seen = serde_json::Value::Null;
    for _ in 0..400 {
        seen = get_json(http, batch_url).await;
        if seen["request_counts"]["completed"].as_u64().unwrap_or(0) >= done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    seen["request_counts"]["completed"].as_u64().unwrap_or(0)
}

/// Waits for the batch to complete, then checks its output holds every line once.
async fn expect_every_line_once(
    http: &tollgate_integration_tests::HttpClient,
    base: &str,
    batch_url: &str,
    n: usize,
) {
    let mut seen = serde_json::Value::Null;
    for _ in 0..800 {
        seen = get_json(http, batch_url).await;
        if seen["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(seen["status"], "completed", "{seen}");
    assert_eq!(
        seen["request_counts"],
        json!({"total": n, "completed": n, "failed": 0})
    );
    let out = read_text(
        http,
        &format!(
            "{base}/v1/files/{}/content",
            seen["output_file_id"].as_str().unwrap()
        ),
    )
    .await;
    let mut ids: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["custom_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    ids.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("line-{i}")).collect();
    want.sort();
    assert_eq!(ids, want, "every line once: none lost, none twice");
}

async fn get_json(http: &tollgate_integration_tests::HttpClient, url: &str) -> serde_json::Value {
    serde_json::from_str(&read_text(http, url).await).unwrap()
}

async fn read_text(http: &tollgate_integration_tests::HttpClient, url: &str) -> String {
    let req = Request::get(url).body(Full::new(Bytes::new())).unwrap();
    let res = http.request(req).await.unwrap();
    String::from_utf8_lossy(&res.into_body().collect().await.unwrap().to_bytes()).into_owned()
}
