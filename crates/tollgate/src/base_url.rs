//! Sends each request to one backend's base URL.

use std::task::{Context, Poll};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Uri};
use tower::{Layer, Service};

/// Points every request at a base URL: its scheme and authority replace the request's, and
/// its path is put before the request's (`http://10.0.0.5:8080/openai` + `/v1/chat/completions`
/// → `http://10.0.0.5:8080/openai/v1/chat/completions`). The `Host` header a caller sent,
/// for the gateway it spoke to, is removed so the client sets the backend's.
///
/// Written here because neither tower nor tower-http has a layer that rebases a URI.
#[derive(Clone, Debug)]
pub struct BaseUrlLayer {
    scheme: Scheme,
    authority: Authority,
    // Shared: the service is cloned for every request by the layers above it.
    prefix: std::sync::Arc<str>,
}

/// A bad base URL.
#[derive(Debug)]
pub struct BadBaseUrl(&'static str);

impl std::fmt::Display for BadBaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for BadBaseUrl {}

impl BaseUrlLayer {
    /// The layer for `base`, an absolute `http://` or `https://` URL without a query.
    pub fn new(base: &str) -> Result<Self, BadBaseUrl> {
        let uri: Uri = base.parse().map_err(|_| BadBaseUrl("not a URL"))?;
        let parts = uri.into_parts();
        let scheme = parts.scheme.ok_or(BadBaseUrl("no scheme"))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(BadBaseUrl("the scheme must be http or https"));
        }
        let authority = parts.authority.ok_or(BadBaseUrl("no host"))?;
        let pq = parts.path_and_query;
        if pq.as_ref().and_then(PathAndQuery::query).is_some() {
            return Err(BadBaseUrl("a base URL takes no query"));
        }
        let prefix = pq
            .as_ref()
            .map_or("", PathAndQuery::path)
            .trim_end_matches('/')
            .into();
        Ok(Self {
            scheme,
            authority,
            prefix,
        })
    }
}

impl<S> Layer<S> for BaseUrlLayer {
    type Service = BaseUrl<S>;

    fn layer(&self, inner: S) -> BaseUrl<S> {
        BaseUrl {
            base: self.clone(),
            inner,
        }
    }
}

/// The service of [`BaseUrlLayer`].
#[derive(Clone, Debug)]
pub struct BaseUrl<S> {
    base: BaseUrlLayer,
    inner: S,
}

impl<S> BaseUrl<S> {
    tollgate_core::inner_service_accessors!();
}

impl<S, B> Service<Request<B>> for BaseUrl<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        let base = &self.base;
        if base.prefix.is_empty() && req.uri().path_and_query().is_some() {
            // The usual case: the request's own path is moved into the new URI, not
            // parsed and copied again. A scheme, an authority and a path that are each
            // valid always join into a valid URI.
            let mut parts = std::mem::take(req.uri_mut()).into_parts();
            parts.scheme = Some(base.scheme.clone());
            parts.authority = Some(base.authority.clone());
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        } else {
            let pq = req.uri().path_and_query().map_or("/", PathAndQuery::as_str);
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(base.scheme.clone());
            parts.authority = Some(base.authority.clone());
            parts.path_and_query = PathAndQuery::try_from(format!("{}{pq}", base.prefix)).ok();
            // Both halves were valid URI parts, so their join is too; keep the request's
            // URI if it somehow is not, rather than panic.
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
        req.headers_mut().remove(http::header::HOST);
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::{service_fn, ServiceExt};

    async fn rebased(base: &str, path: &str) -> String {
        let svc = BaseUrlLayer::new(base)
            .unwrap()
            .layer(service_fn(|r: Request<()>| async move {
                Ok::<_, Infallible>((r.uri().to_string(), r.headers().contains_key("host")))
            }));
        let req = Request::post(path)
            .header("host", "gateway.local")
            .body(())
            .unwrap();
        let (uri, host) = svc.oneshot(req).await.unwrap();
        assert!(!host, "the caller's Host header must not reach the backend");
        uri
    }

    #[tokio::test]
    async fn joins_base_and_path() {
        assert_eq!(
            rebased("http://127.0.0.1:9/", "/v1/chat/completions?x=1").await,
            "http://127.0.0.1:9/v1/chat/completions?x=1"
        );
        assert_eq!(
            rebased("https://api.example/openai/", "/v1/embeddings").await,
            "https://api.example/openai/v1/embeddings"
        );
        assert_eq!(
            rebased("http://h:1", "http://other:2/v1/x").await,
            "http://h:1/v1/x"
        );
    }

    #[test]
    fn refuses_bad_bases() {
        for bad in ["", "/v1", "ftp://h/", "http://h/?q=1", "not a url"] {
            assert!(BaseUrlLayer::new(bad).is_err(), "{bad}");
        }
    }
}
