//! A closed-loop load generator: `concurrency` workers, each sending its next request as
//! soon as the previous one is answered, until a request count or a deadline is reached,
//! whichever comes first. Every run is bounded and stops by itself.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// How much load to send.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    pub(crate) concurrency: usize,
    /// Requests sent before measuring, to warm connections and caches.
    pub(crate) warmup: u64,
    pub(crate) requests: u64,
    pub(crate) max_duration: Duration,
}

/// What a run measured.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) ok: u64,
    pub(crate) errors: u64,
    pub(crate) elapsed: Duration,
    /// Latency of successful requests, in microseconds.
    pub(crate) latency_us: Histogram<u64>,
    pub(crate) first_error: Option<String>,
}

impl Outcome {
    pub(crate) fn rps(&self) -> f64 {
        (self.ok + self.errors) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs `plan`, calling `send(i)` for request number `i`.
pub(crate) async fn run<F, Fut>(plan: Plan, send: F) -> Outcome
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let send = Arc::new(send);
    if plan.warmup > 0 {
        let _ = phase(
            plan.concurrency,
            plan.warmup,
            plan.max_duration,
            Arc::clone(&send),
        )
        .await;
    }
    phase(plan.concurrency, plan.requests, plan.max_duration, send).await
}

async fn phase<F, Fut>(concurrency: usize, requests: u64, max: Duration, send: Arc<F>) -> Outcome
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + max;
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency.max(1) {
        let (next, send) = (Arc::clone(&next), Arc::clone(&send));
        workers.push(tokio::spawn(async move {
            // 1 µs to 60 s at 3 significant figures.
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()));
            let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests || Instant::now() >= deadline {
                    break;
                }
                let t = Instant::now();
                match send(i).await {
                    Ok(()) => {
                        ok += 1;
                        let us = t.elapsed().as_micros().min(60_000_000) as u64;
                        hist.saturating_record(us.max(1));
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
            (hist, ok, errors, first_error)
        }));
    }
    let mut out = Outcome {
        ok: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)
            .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!())),
        first_error: None,
    };
    for w in workers {
        match w.await {
            Ok((hist, ok, errors, first_error)) => {
                let _ = out.latency_us.add(&hist);
                out.ok += ok;
                out.errors += errors;
                if out.first_error.is_none() {
                    out.first_error = first_error;
                }
            }
            Err(e) => {
                out.errors += 1;
                out.first_error.get_or_insert(format!("worker failed: {e}"));
            }
        }
    }
    out.elapsed = start.elapsed();
    out
}

/// Polls `f` once with a no-op waker: its output when it is ready at once (the
/// in-process scenarios' services answer without waiting).
pub(crate) fn ready<F: Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    match f
        .as_mut()
        .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// Reads a body that is ready at once to its end.
pub(crate) fn drain<B: http_body::Body<Data = bytes::Bytes> + Unpin>(mut b: B) {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    while let std::task::Poll::Ready(Some(Ok(_))) = std::pin::Pin::new(&mut b).poll_frame(&mut cx) {
    }
}

/// Sends `req` through `svc` and reads the answer to its end: `Ok` for a 2xx.
pub(crate) async fn send<S, ReqB, ResB>(svc: S, req: http::Request<ReqB>) -> Result<(), String>
where
    S: tower::Service<http::Request<ReqB>, Response = http::Response<ResB>>,
    S::Error: std::fmt::Display,
    ResB: http_body::Body,
    ResB::Error: std::fmt::Display,
{
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let res = svc.oneshot(req).await.map_err(|e| e.to_string())?;
    let status = res.status();
    res.into_body().collect().await.map_err(|e| e.to_string())?;
    status
        .is_success()
        .then_some(())
        .ok_or(format!("status {status}"))
}

/// Runs `run` on its own thread, in a runtime on tokio's paused clock (the clock is the
/// whole runtime's, so it cannot be the bench's own): minutes of quota refill pass at
/// once, and the times measured are exact scheduling figures.
pub(crate) fn on_paused_clock<F, Fut>(
    run: F,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>>,
{
    std::thread::spawn(move || -> Result<(), String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(run())
    })
    .join()
    .map_err(|_| "the run on the paused clock panicked")?
    .map_err(Into::into)
}
