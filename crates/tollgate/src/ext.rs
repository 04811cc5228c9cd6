//! `ServiceBuilder::new().tollgate_cache(..).tollgate_retry(..)`.

use tower::layer::util::Stack;
use tower::ServiceBuilder;

mod sealed {
    /// Only tower's `ServiceBuilder` implements [`ServiceBuilderExt`](super::ServiceBuilderExt),
    /// so methods can be added to it without breaking anyone.
    pub trait Sealed<L> {}
    impl<L> Sealed<L> for tower::ServiceBuilder<L> {}
}

/// Tollgate's layers as [`ServiceBuilder`] methods, in the manner of tower-http's
/// `ServiceBuilderExt`. Each is `.layer(..)` under a name that says what it is; the
/// outermost call is the first a request meets, as with every `ServiceBuilder`.
///
/// Sealed, as tower-http's is: only `ServiceBuilder` implements it.
pub trait ServiceBuilderExt<L>: sealed::Sealed<L> + Sized {
    /// The response cache: a hit is answered at once and spends no quota.
    #[cfg(feature = "cache")]
    fn tollgate_cache(
        self,
        layer: tollgate_cache::CacheLayer,
    ) -> ServiceBuilder<Stack<tollgate_cache::CacheLayer, L>>;

    /// Failover from the wrapped service to fallback backends.
    #[cfg(feature = "failover")]
    fn tollgate_failover<S>(
        self,
        layer: tollgate_failover::FailoverLayer<S>,
    ) -> ServiceBuilder<Stack<tollgate_failover::FailoverLayer<S>, L>>;

    /// Retries that obey the server's hints.
    #[cfg(feature = "retry")]
    fn tollgate_retry(
        self,
        layer: tollgate_retry::RetryLayer,
    ) -> ServiceBuilder<Stack<tollgate_retry::RetryLayer, L>>;

    /// GCRA rate limits per key.
    #[cfg(feature = "ratelimit")]
    fn tollgate_rate_limit(
        self,
        layer: tollgate_ratelimit::RateLimitLayer,
    ) -> ServiceBuilder<Stack<tollgate_ratelimit::RateLimitLayer, L>>;

    /// A tokens-per-minute budget, reserved before the call and settled from `usage`.
    #[cfg(feature = "tpm")]
    fn tollgate_tpm(
        self,
        layer: tollgate_tpm::TpmLayer,
    ) -> ServiceBuilder<Stack<tollgate_tpm::TpmLayer, L>>;

    /// Turns Tollgate's refusals and bad-request errors into HTTP answers (429 with
    /// `Retry-After`, 413, 400), for servers.
    fn tollgate_error_responses(
        self,
    ) -> ServiceBuilder<Stack<tollgate_core::response::ErrorResponseLayer, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    #[cfg(feature = "cache")]
    fn tollgate_cache(
        self,
        layer: tollgate_cache::CacheLayer,
    ) -> ServiceBuilder<Stack<tollgate_cache::CacheLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "failover")]
    fn tollgate_failover<S>(
        self,
        layer: tollgate_failover::FailoverLayer<S>,
    ) -> ServiceBuilder<Stack<tollgate_failover::FailoverLayer<S>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "retry")]
    fn tollgate_retry(
        self,
        layer: tollgate_retry::RetryLayer,
    ) -> ServiceBuilder<Stack<tollgate_retry::RetryLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "ratelimit")]
    fn tollgate_rate_limit(
        self,
        layer: tollgate_ratelimit::RateLimitLayer,
    ) -> ServiceBuilder<Stack<tollgate_ratelimit::RateLimitLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "tpm")]
    fn tollgate_tpm(
        self,
        layer: tollgate_tpm::TpmLayer,
    ) -> ServiceBuilder<Stack<tollgate_tpm::TpmLayer, L>> {
        self.layer(layer)
    }

    fn tollgate_error_responses(
        self,
    ) -> ServiceBuilder<Stack<tollgate_core::response::ErrorResponseLayer, L>> {
        self.layer(tollgate_core::response::ErrorResponseLayer::new())
    }
}
