//! Scenario `failover`: a primary that answers 503 for a while and then recovers, and a
//! fallback; no request should fail, and traffic should return to the primary soon after
//! it recovers.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tollgate_core::facts::ReplayBody;
use tollgate_failover::{Backend, Cooldown, Failover, X_TOLLGATE_BACKEND};
use tower::util::BoxCloneSyncService;
use tower::{service_fn, ServiceExt};

use crate::load::{self, Plan};
use crate::report;
use crate::Args;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Svc = BoxCloneSyncService<Request<ReplayBody>, Response<Full<Bytes>>, Infallible>;

fn answer(status: u16) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from_static(
        br#"{"choices":[],"usage":{"total_tokens":1}}"#,
    )));
    *res.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    res
}

pub(crate) async fn run(args: &Args) -> Result<(), BoxError> {
    let (outage, total) = if args.quick {
        (Duration::from_secs(2), Duration::from_secs(5))
    } else {
        (Duration::from_secs(5), Duration::from_secs(15))
    };
    let start = Instant::now();
    let recovered_at = start + outage;
    // Each answer takes a millisecond, like a very fast model.
    let primary: Svc =
        BoxCloneSyncService::new(service_fn(move |_: Request<ReplayBody>| async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok::<_, Infallible>(answer(if Instant::now() < recovered_at {
                503
            } else {
                200
            }))
        }));
    let fallback: Svc = BoxCloneSyncService::new(service_fn(|_: Request<ReplayBody>| async {
        tokio::time::sleep(Duration::from_millis(1)).await;
        Ok::<_, Infallible>(answer(200))
    }));
    let cooldown = Cooldown {
        failures: 3,
        window: Duration::from_secs(10),
        duration: Duration::from_millis(500),
        ..Cooldown::default()
    };
    let svc = Failover::builder()
        .backend(Backend::new("primary", primary))
        .backend(
            Backend::new("fallback", fallback)
                .model("gpt-4o-mini")
                .priority(1),
        )
        .cooldown(cooldown)
        .build();
    let served: Arc<Mutex<Vec<(Duration, bool)>>> = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&served);
    let plan = Plan {
        concurrency: 20,
        warmup: 0,
        requests: u64::MAX,
        max_duration: total,
    };
    let body =
        Bytes::from_static(br#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}]}"#);
    let out = load::run(plan, move |_| {
        let (svc, log, body) = (svc.clone(), Arc::clone(&log), body.clone());
        async move {
            let res = svc
                .oneshot(
                    Request::post("/v1/chat/completions")
                        .body(Full::new(body))
                        .map_err(|e| e.to_string())?,
                )
                .await
                .map_err(|e| e.to_string())?;
            let status = res.status();
            let by_primary = res
                .headers()
                .get(X_TOLLGATE_BACKEND)
                .is_some_and(|v| v == "primary");
            let _ = res.into_body().collect().await;
            if let Ok(mut l) = log.lock() {
                l.push((start.elapsed(), by_primary));
            }
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("status {status}"))
            }
        }
    })
    .await;
    let served = served.lock().map(|v| v.clone()).unwrap_or_default();
    let by_primary = served.iter().filter(|(_, p)| *p).count();
    let share = by_primary as f64 / served.len().max(1) as f64;
    let recovery = served
        .iter()
        .filter(|(t, p)| *p && *t >= outage)
        .map(|(t, _)| *t - outage)
        .min();
    let recovery_ms = recovery.map_or(-1.0, |d| d.as_secs_f64() * 1000.0);
    report::table(
        &format!("failover: primary answers 503 for {outage:?} of {total:?}, then recovers; 20 concurrent callers"),
        &[
            ("requests", format!("{} ok, {} failed", out.ok, out.errors)),
            ("served by primary", format!("{by_primary} ({:.1}%)", share * 100.0)),
            ("served by fallback", format!("{}", served.len() - by_primary)),
            ("back on the primary", format!("{recovery_ms:.0} ms after it recovered (cooldown 500 ms, then one trial)")),
        ],
    );
    report::result_line(
        "failover",
        &[
            ("failed", out.errors.to_string()),
            ("primary_share", format!("{share:.3}")),
            ("recovery_ms", format!("{recovery_ms:.0}")),
        ],
    );
    Ok(())
}
