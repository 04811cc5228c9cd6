//! `ServiceBuilder::new().tollgate_cache(ttl).tollgate_retry()`.

use tower::layer::util::Stack;
use tower::ServiceBuilder;

mod sealed {
    /// Only tower's `ServiceBuilder` implements [`ServiceBuilderExt`](super::ServiceBuilderExt),
    /// so methods can be added to it without breaking anyone.
    pub trait Sealed<L> {}
    impl<L> Sealed<L> for tower::ServiceBuilder<L> {}
}

/// Tollgate's layers as [`ServiceBuilder`] methods taking the layer's arguments, in the
/// manner of tower-http's `ServiceBuilderExt` (`.timeout(duration)`). Each builds the
/// layer with its defaults otherwise; for every other setting, build the layer with its
/// own builder and pass it to `.layer(..)`. The outermost call is the first a request
/// meets, as with every `ServiceBuilder`.
///
/// Sealed, as tower-http's is: only `ServiceBuilder` implements it.
pub trait ServiceBuilderExt<L>: sealed::Sealed<L> + Sized {
    /// The response cache, answers kept for `ttl`: a hit is answered at once and spends no
    /// quota.
    #[cfg(feature = "cache")]
    fn tollgate_cache(
        self,
        ttl: std::time::Duration,
    ) -> ServiceBuilder<Stack<tollgate_cache::CacheLayer, L>>;

    /// Failover from the wrapped service (the primary) to `fallbacks`.
    #[cfg(feature = "failover")]
    fn tollgate_failover<S: Clone>(
        self,
        fallbacks: Vec<tollgate_failover::Backend<S>>,
    ) -> ServiceBuilder<Stack<tollgate_failover::FailoverLayer<S>, L>>;

    /// Retries that obey the server's hints, with the defaults of
    /// [`RetryLayer::new`](tollgate_retry::RetryLayer::new).
    #[cfg(feature = "retry")]
    fn tollgate_retry(self) -> ServiceBuilder<Stack<tollgate_retry::RetryLayer, L>>;

    /// A GCRA rate limit per key, refusing or waiting as `mode` says.
    #[cfg(feature = "ratelimit")]
    fn tollgate_rate_limit(
        self,
        limit: tollgate_ratelimit::Limit,
        mode: tollgate_core::wait::Mode,
    ) -> ServiceBuilder<Stack<tollgate_ratelimit::RateLimitLayer, L>>;

    /// A token budget, reserved before the call and settled from `usage`, refusing or
    /// waiting as `mode` says.
    #[cfg(feature = "tpm")]
    fn tollgate_tpm(
        self,
        budget: tollgate_tpm::Budget,
        mode: tollgate_core::wait::Mode,
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
        ttl: std::time::Duration,
    ) -> ServiceBuilder<Stack<tollgate_cache::CacheLayer, L>> {
        self.layer(tollgate_cache::CacheLayer::builder().ttl(ttl).build())
    }

    #[cfg(feature = "failover")]
    fn tollgate_failover<S: Clone>(
        self,
        fallbacks: Vec<tollgate_failover::Backend<S>>,
    ) -> ServiceBuilder<Stack<tollgate_failover::FailoverLayer<S>, L>> {
        self.layer(tollgate_failover::FailoverLayer::new(fallbacks))
    }

    #[cfg(feature = "retry")]
    fn tollgate_retry(self) -> ServiceBuilder<Stack<tollgate_retry::RetryLayer, L>> {
        self.layer(tollgate_retry::RetryLayer::new())
    }

    #[cfg(feature = "ratelimit")]
    fn tollgate_rate_limit(
        self,
        limit: tollgate_ratelimit::Limit,
        mode: tollgate_core::wait::Mode,
    ) -> ServiceBuilder<Stack<tollgate_ratelimit::RateLimitLayer, L>> {
        self.layer(
            tollgate_ratelimit::RateLimitLayer::builder()
                .limit(limit)
                .mode(mode)
                .build(),
        )
    }

    #[cfg(feature = "tpm")]
    fn tollgate_tpm(
        self,
        budget: tollgate_tpm::Budget,
        mode: tollgate_core::wait::Mode,
    ) -> ServiceBuilder<Stack<tollgate_tpm::TpmLayer, L>> {
        self.layer(
            tollgate_tpm::TpmLayer::builder()
                .budget(budget)
                .mode(mode)
                .build(),
        )
    }

    fn tollgate_error_responses(
        self,
    ) -> ServiceBuilder<Stack<tollgate_core::response::ErrorResponseLayer, L>> {
        self.layer(tollgate_core::response::ErrorResponseLayer::new())
    }
}
