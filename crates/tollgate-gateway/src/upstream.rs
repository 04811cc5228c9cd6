//! The HTTP client every model's stack reaches its providers through: pooled, HTTP/2 where
//! the provider offers it (ALPN), HTTPS through rustls with the Mozilla roots, a timeout
//! to each answer's head, and a per-request record of how long the providers took.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tollgate::policy::BoxBody;
use tollgate_core::BoxError;
use tower::Service;

/// What the providers cost one gateway request: attempts made and time spent waiting for
/// their answers' heads. Put in the request's extensions by the gateway; every attempt
/// (retries, fallbacks) carries a clone of the same record.
#[derive(Debug, Default)]
pub(crate) struct Trace {
    attempts: AtomicU32,
    upstream_ns: AtomicU64,
    /// Attempts a provider answered 429.
    provider_429: AtomicU32,
    /// The provider's quota as its last answer stated it.
    quota: std::sync::Mutex<ProviderQuota>,
    /// Where a provider's 429 is reported as it comes, and for which model.
    limits: Option<(crate::stats::Stats, String)>,
}

/// A provider's (remaining, limit) of requests and of tokens, as an answer stated them.
pub(crate) type ProviderQuota = (Option<(u64, u64)>, Option<(u64, u64)>);

impl Trace {
    /// A record that reports the provider's 429s for `model` to `stats` as they come.
    pub(crate) fn for_model(stats: crate::stats::Stats, model: String) -> Self {
        Self {
            limits: Some((stats, model)),
            ..Self::default()
        }
    }

    pub(crate) fn provider_429(&self) -> u32 {
        self.provider_429.load(Ordering::Relaxed)
    }

    /// (requests, tokens) as (remaining, limit), when the last answer stated them.
    pub(crate) fn provider_quota(&self) -> ProviderQuota {
        self.quota.lock().map_or((None, None), |q| *q)
    }

    fn saw(&self, headers: &http::HeaderMap) {
        let info = tollgate_core::headers::RateLimitInfo::from_headers(
            headers,
            std::time::SystemTime::now(),
        );
        let pair = |s: &tollgate_core::headers::LimitState| s.remaining.zip(s.limit);
        let (r, t) = (pair(&info.requests), pair(&info.tokens));
        if r.is_some() || t.is_some() {
            if let Ok(mut q) = self.quota.lock() {
                *q = (r.or(q.0), t.or(q.1));
            }
        }
    }

    pub(crate) fn attempts(&self) -> u32 {
        self.attempts.load(Ordering::Relaxed)
    }

    pub(crate) fn upstream(&self) -> Duration {
        Duration::from_nanos(self.upstream_ns.load(Ordering::Relaxed))
    }
}

/// The provider did not start its answer within the upstream timeout.
#[derive(Debug)]
pub(crate) struct UpstreamTimeout(pub(crate) Duration);

impl std::fmt::Display for UpstreamTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the provider did not answer within {}",
            humantime::format_duration(self.0)
        )
    }
}

impl std::error::Error for UpstreamTimeout {}

/// The provider fell silent mid-answer for longer than the upstream timeout.
#[derive(Debug)]
pub(crate) struct UpstreamSilent(pub(crate) Duration);

impl std::fmt::Display for UpstreamSilent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the provider sent nothing more of its answer for {}",
            humantime::format_duration(self.0)
        )
    }
}

impl std::error::Error for UpstreamSilent {}

pin_project_lite::pin_project! {
    /// A provider's answer body that ends in an error ([`UpstreamSilent`]) when the provider
    /// sends nothing for the upstream timeout: a stalled answer would otherwise hold its
    /// connection, and its caller, for ever. A non-streamed answer cut so is asked again by
    /// the retry layer; a stream ends with the error event the failover layer writes.
    #[derive(Debug)]
    pub(crate) struct Quiet<B> {
        body: B,
        limit: Duration,
        // Inline: no allocation per answer.
        #[pin]
        timer: tokio::time::Sleep,
    }
}

impl<B> Quiet<B> {
    fn new(body: B, limit: Duration) -> Self {
        Self {
            body,
            limit,
            timer: tokio::time::sleep(limit),
        }
    }
}

impl<B> http_body::Body for Quiet<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        let mut this = self.project();
        match Pin::new(&mut *this.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + *this.limit;
                this.timer.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.timer.poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(UpstreamSilent(*this.limit))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The pooled client with its timeout.
#[derive(Clone, Debug)]
pub(crate) struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, BoxBody>,
    timeout: Duration,
}

impl Upstream {
    pub(crate) fn new(timeout: Duration) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(https);
        Self { client, timeout }
    }
}

impl Service<Request<BoxBody>> for Upstream {
    type Response = Response<Quiet<Incoming>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Quiet<Incoming>>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The pool takes any number of requests; connections are made per request.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<BoxBody>) -> Self::Future {
        let trace = req.extensions_mut().remove::<Arc<Trace>>();
        // The tenant's name is for the gateway's own layers (the cache's partition, keyed
        // limits); a provider has no use for it. Nor for the gateway's own `x-tollgate-*`
        // headers (a cache TTL, a callback URL), nor for what names the caller's network:
        // the gateway is the edge the provider sees.
        let h = req.headers_mut();
        h.remove("x-tenant-id");
        for name in [
            "forwarded",
            "x-forwarded-for",
            "x-forwarded-host",
            "x-forwarded-proto",
            "x-real-ip",
        ] {
            h.remove(name);
        }
        let internal: Vec<http::HeaderName> = h
            .keys()
            .filter(|k| k.as_str().starts_with("x-tollgate-"))
            .cloned()
            .collect();
        for name in internal {
            h.remove(name);
        }
        let call = self.client.request(req);
        let timeout = self.timeout;
        Box::pin(async move {
            let start = Instant::now();
            if let Some(t) = &trace {
                t.attempts.fetch_add(1, Ordering::Relaxed);
            }
            let answer = tokio::time::timeout(timeout, call).await;
            if let Some(t) = &trace {
                let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
                t.upstream_ns.fetch_add(ns, Ordering::Relaxed);
            }
            match answer {
                Ok(Ok(res)) => {
                    if let Some(t) = &trace {
                        if res.status() == http::StatusCode::TOO_MANY_REQUESTS {
                            t.provider_429.fetch_add(1, Ordering::Relaxed);
                            // Limited until the provider's Retry-After (a second without).
                            if let Some((stats, model)) = &t.limits {
                                let wait = tollgate_core::headers::server_hint(
                                    res.headers(),
                                    std::time::SystemTime::now(),
                                )
                                .unwrap_or(Duration::from_secs(1));
                                let now = tokio::time::Instant::now();
                                stats.limited(model, now, crate::stats::until(now, wait), None);
                            }
                        }
                        t.saw(res.headers());
                    }
                    Ok(res.map(|b| Quiet::new(b, timeout)))
                }
                Ok(Err(e)) => Err(Box::new(e) as BoxError),
                Err(_) => Err(Box::new(UpstreamTimeout(timeout)) as BoxError),
            }
        })
    }
}
