//! Scenario `gateway`: the real `tollgate` binary as its own process in front of the
//! simulated provider, under a closed-loop load over loopback, side by side in one run
//! with (a) the provider direct and (b) a minimal hyper pass-through proxy (this binary
//! again, as its own process: the floor, what one more HTTP hop costs).
//!
//! CPU per request is read from `/proc/<pid>/stat` (utime + stime) of the gateway's and
//! the proxy's processes over their rounds; latency added is each side's percentile minus
//! the direct one's, at concurrency 1 and 64. `--target URL --target-pid PID` measures
//! another gateway (any OpenAI-compatible proxy in front of the same provider) instead.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::Request;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_testkit::Provider;

use crate::load::{self, Outcome, Plan};
use crate::report;
use crate::Args;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The key of the one tenant the bench's gateway knows.
const KEY: &str = "sk-bench-tenant";

/// The model's policy: `overhead`'s (every layer, limits far above the load), or the
/// `--policy` file's; `http://placeholder` stands for the provider's URL.
fn config(listen: &str, provider: &str, policy: &str) -> String {
    use std::fmt::Write;
    let digest = sha256_hex(KEY);
    let mut s = format!("listen: {listen}\nmodels:\n  gpt-4o-mini:\n");
    for line in policy.replace("http://placeholder", provider).lines() {
        let _ = writeln!(s, "    {line}");
    }
    let _ = write!(s, "tenants:\n  bench: {{ key_sha256: \"{digest}\" }}\n");
    s
}

pub(crate) fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A 1 KB chat request, distinct per `i` (every one a cache miss).
fn body(i: u64) -> Bytes {
    let filler = "lorem ipsum dolor sit amet ".repeat(36);
    Bytes::from(format!(
        r#"{{"model":"gpt-4o-mini","max_tokens":16,"messages":[{{"role":"user","content":"Number {i}: {filler}"}}]}}"#
    ))
}

/// Clock ticks per second of `/proc/<pid>/stat`'s times.
pub(crate) fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of `pid`, in ticks.
pub(crate) fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is rest[0]; utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A child process, stopped when dropped.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.0.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .stderr(Stdio::null())
            .status();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn free_addr() -> Result<std::net::SocketAddr, BoxError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

pub(crate) async fn wait_listening(
    addr: std::net::SocketAddr,
    child: &mut Proc,
    what: &str,
) -> Result<(), BoxError> {
    for _ in 0..300 {
        if let Ok(Some(status)) = child.0.try_wait() {
            return Err(format!("{what} exited at start: {status}").into());
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("{what} did not listen on {addr} within 6 s").into())
}

/// The `tollgate` binary: `--gateway-bin`, or the one beside this one (`cargo build
/// --release -p tollgate-gateway`).
pub(crate) fn gateway_bin(args: &Args) -> Result<std::path::PathBuf, BoxError> {
    if let Some(p) = &args.gateway_bin {
        return Ok(p.clone());
    }
    let me = std::env::current_exe()?;
    let bin = me.with_file_name("tollgate");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!(
            "no gateway binary at {}: build it first with `cargo build --release -p tollgate-gateway`",
            bin.display()
        )
        .into())
    }
}

/// Starts `tollgate serve --config path` (see [`gateway_bin`]) and waits until it
/// listens on `addr`.
pub(crate) async fn serve(
    args: &Args,
    path: &std::path::Path,
    addr: std::net::SocketAddr,
) -> Result<Proc, BoxError> {
    let mut child = Proc(
        Command::new(gateway_bin(args)?)
            .args(["serve", "--config"])
            .arg(path)
            .env("TOLLGATE_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    );
    wait_listening(addr, &mut child, "the gateway").await?;
    Ok(child)
}

/// One side of the comparison.
struct Side {
    name: &'static str,
    url: String,
    pid: Option<u32>,
    ok: u64,
    errors: u64,
    ticks: u64,
    busy: Duration,
    c1: Histogram<u64>,
    c64: Histogram<u64>,
    first_error: Option<String>,
}

impl Side {
    fn new(name: &'static str, url: String, pid: Option<u32>) -> Self {
        let h = || {
            Histogram::new_with_bounds(1, 60_000_000, 3)
                .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
        };
        Self {
            name,
            url,
            pid,
            ok: 0,
            errors: 0,
            ticks: 0,
            busy: Duration::ZERO,
            c1: h(),
            c64: h(),
            first_error: None,
        }
    }

    fn add(&mut self, o: Outcome, concurrency: usize, ticks: u64) {
        self.ok += o.ok;
        self.errors += o.errors;
        self.ticks += ticks;
        if concurrency == 1 {
            let _ = self.c1.add(&o.latency_us);
        } else {
            self.busy += o.elapsed;
            let _ = self.c64.add(&o.latency_us);
        }
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }

    fn cpu_us_per_req(&self, tick_s: f64) -> Option<f64> {
        self.pid?;
        Some(self.ticks as f64 * tick_s * 1e6 / self.ok.max(1) as f64)
    }
}

async fn drive(
    client: &Client<HttpConnector, Full<Bytes>>,
    side: &Side,
    plan: Plan,
    offset: u64,
) -> (Outcome, u64) {
    let before = side.pid.and_then(cpu_ticks);
    let (client, url) = (client.clone(), side.url.clone());
    let outcome = load::run(plan, move |i| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let req = Request::post(url.as_str())
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {KEY}"))
                .body(Full::new(body(offset + i)))
                .map_err(|e| e.to_string())?;
            load::send(client, req).await
        }
    })
    .await;
    let after = side.pid.and_then(cpu_ticks);
    let ticks = match (before, after) {
        (Some(b), Some(a)) => a.saturating_sub(b),
        _ => 0,
    };
    (outcome, ticks)
}

pub(crate) async fn run(args: &Args) -> Result<(), BoxError> {
    let provider = Provider::builder().spawn().await?;
    let me = std::env::current_exe()?;

    // (b) the pass-through proxy: this binary, as its own process.
    let proxy_addr = free_addr()?;
    let mut proxy = Proc(
        Command::new(&me)
            .args([
                "proxy",
                "--listen",
                &proxy_addr.to_string(),
                "--upstream",
                &provider.url(),
            ])
            .stdout(Stdio::null())
            .spawn()?,
    );
    wait_listening(proxy_addr, &mut proxy, "the pass-through proxy").await?;

    // The gateway: ours, started here, or the one named by --target.
    let mut ours = None;
    let (gateway_url, gateway_pid) = match (&args.target, args.target_pid) {
        (Some(url), pid) => (url.trim_end_matches('/').to_owned(), pid),
        (None, _) => {
            let addr = free_addr()?;
            let dir =
                std::env::temp_dir().join(format!("tollgate-bench-gw-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let path = dir.join("gateway.yaml");
            let policy = match &args.policy {
                Some(p) => std::fs::read_to_string(p)?,
                None => crate::overhead::POLICY.to_owned(),
            };
            std::fs::write(&path, config(&addr.to_string(), &provider.url(), &policy))?;
            let child = serve(args, &path, addr).await?;
            let pid = child.0.id();
            ours = Some(child);
            (format!("http://{addr}"), Some(pid))
        }
    };

    let path = "/v1/chat/completions";
    let mut sides = [
        Side::new("direct", format!("{}{path}", provider.url()), None),
        Side::new(
            "proxy",
            format!("http://{proxy_addr}{path}"),
            Some(proxy.0.id()),
        ),
        Side::new("gateway", format!("{gateway_url}{path}"), gateway_pid),
    ];
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(128)
        .build_http::<Full<Bytes>>();
    let total = args
        .requests
        .unwrap_or(if args.quick { 20_000 } else { 200_000 });
    let rounds: u64 = if args.quick { 2 } else { 4 };
    let per_round = (total / rounds).max(1);
    let c1_requests = (per_round / 20).max(200);
    let mut offset = 0u64;
    for round in 0..rounds {
        for side in sides.iter_mut() {
            for (concurrency, requests) in [(1usize, c1_requests), (64, per_round)] {
                let plan = Plan {
                    concurrency,
                    warmup: if round == 0 { 500 } else { 0 },
                    requests,
                    max_duration: Duration::from_secs(if args.quick { 10 } else { 60 }),
                };
                offset += 10_000_000;
                let (o, ticks) = drive(&client, side, plan, offset).await;
                side.add(o, concurrency, ticks);
            }
        }
    }
    drop(ours);
    drop(proxy);
    provider.shutdown().await;

    let tick_s = 1.0 / clock_ticks();
    let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as i64;
    let [direct, proxy_side, gw] = &sides;
    let cpu_gw = gw.cpu_us_per_req(tick_s);
    let cpu_proxy = proxy_side.cpu_us_per_req(tick_s).unwrap_or(0.0);
    let ratio = cpu_gw.map(|g| g / cpu_proxy.max(1e-9));
    let rps = gw.ok as f64 / gw.busy.as_secs_f64().max(1e-9);
    let row = |s: &Side| {
        format!(
            "{} ok, {} failed; c=1 p50 {} µs p99 {} µs; c=64 p50 {} µs p99 {} µs, {:.0} req/s; cpu {}",
            s.ok,
            s.errors,
            q(&s.c1, 0.5),
            q(&s.c1, 0.99),
            q(&s.c64, 0.5),
            q(&s.c64, 0.99),
            s.ok as f64 / s.busy.as_secs_f64().max(1e-9),
            s.cpu_us_per_req(tick_s)
                .map_or("not measured".to_owned(), |c| format!("{c:.1} µs/req")),
        )
    };
    let added = |s: &Side, p: f64| {
        (
            q(&s.c1, p) - q(&direct.c1, p),
            q(&s.c64, p) - q(&direct.c64, p),
        )
    };
    let (gw50_1, gw50_64) = added(gw, 0.5);
    let (gw99_1, gw99_64) = added(gw, 0.99);
    let (px50_1, px50_64) = added(proxy_side, 0.5);
    report::table(
        &format!("gateway: {} vs a hyper pass-through vs direct, 1 KB chat requests, all cache misses, {rounds} alternating rounds", if args.target.is_some() { "the target" } else { "the tollgate binary (full policy, keyed tenant)" }),
        &[
            ("direct", row(direct)),
            ("proxy", row(proxy_side)),
            ("gateway", row(gw)),
            ("cpu ratio", ratio.map_or("not measured (give --target-pid)".to_owned(), |r| format!("{r:.2} (gateway ÷ proxy; goal ≤ 2.0)"))),
            ("added c=1", format!("gateway p50 {gw50_1} µs, p99 {gw99_1} µs; proxy p50 {px50_1} µs")),
            ("added c=64", format!("gateway p50 {gw50_64} µs, p99 {gw99_64} µs (goal ≤ 1000); proxy p50 {px50_64} µs")),
        ],
    );
    for s in &sides {
        if let Some(e) = &s.first_error {
            println!("first error ({}): {e}", s.name);
        }
    }
    report::result_line(
        "gateway",
        &[
            (
                "cpu_us_per_req",
                cpu_gw.map_or("n/a".to_owned(), |c| format!("{c:.1}")),
            ),
            ("proxy_cpu_us_per_req", format!("{cpu_proxy:.1}")),
            (
                "cpu_ratio",
                ratio.map_or("n/a".to_owned(), |r| format!("{r:.2}")),
            ),
            ("p50_added_us", gw50_64.to_string()),
            ("p99_added_us", gw99_64.to_string()),
            ("p50_added_c1_us", gw50_1.to_string()),
            ("p99_added_c1_us", gw99_1.to_string()),
            ("rps", format!("{rps:.0}")),
            (
                "errors",
                sides.iter().map(|s| s.errors).sum::<u64>().to_string(),
            ),
        ],
    );
    let errors: u64 = sides.iter().map(|s| s.errors).sum();
    if errors > 0 {
        return Err(format!("{errors} requests failed").into());
    }
    Ok(())
}

/// The hidden `proxy` scenario: a minimal hyper HTTP/1.1 pass-through to `--upstream`,
/// until SIGTERM — the floor the gateway is compared with.
pub(crate) async fn proxy(args: &Args) -> Result<(), BoxError> {
    use hyper::body::Incoming;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    let listen = args.listen.clone().ok_or("proxy needs --listen")?;
    let upstream: http::Uri = args
        .upstream
        .clone()
        .ok_or("proxy needs --upstream")?
        .parse()?;
    let authority = upstream
        .authority()
        .ok_or("--upstream needs a host")?
        .clone();
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(128)
        .build_http();
    let listener = tokio::net::TcpListener::bind(listen.as_str()).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (client, authority) = (client.clone(), authority.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |mut req: Request<Incoming>| {
                let client = client.clone();
                let path = req
                    .uri()
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_owned();
                let uri = http::Uri::builder()
                    .scheme("http")
                    .authority(authority.clone())
                    .path_and_query(path)
                    .build();
                // A path that makes no URI goes to the upstream's root (and its 404).
                if let Ok(uri) = uri {
                    *req.uri_mut() = uri;
                }
                req.headers_mut().remove(http::header::HOST);
                // The client's own error type: a boxed one trips rustc's higher-ranked
                // `Send` check in the spawned connection.
                client.request(req)
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
