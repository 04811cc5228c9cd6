//! Macros the layer crates share, so that what every one of them has is written once (as
//! tower-http does with its own `define_inner_service_accessors!`).

/// Writes `get_ref`, `get_mut` and `into_inner` for a service that keeps the service it
/// wraps in a field named `inner`.
///
/// ```
/// struct Wrapper<S> {
///     inner: S,
/// }
///
/// impl<S> Wrapper<S> {
///     tollgate_core::inner_service_accessors!();
/// }
///
/// let mut w = Wrapper { inner: 7 };
/// *w.get_mut() += 1;
/// assert_eq!((*w.get_ref(), w.into_inner()), (8, 8));
/// ```
#[macro_export]
macro_rules! inner_service_accessors {
    () => {
        /// The inner service.
        pub fn get_ref(&self) -> &S {
            &self.inner
        }

        /// The inner service, mutably.
        pub fn get_mut(&mut self) -> &mut S {
            &mut self.inner
        }

        /// Unwraps the inner service.
        pub fn into_inner(self) -> S {
            self.inner
        }
    };
}

/// Writes the builder methods of a limit that can wait — `refuse`, `wait`, `mode`,
/// `max_queue`, `priority`, `share`, `clock` and `housekeeping` — for a builder that keeps
/// a [`Knobs`](crate::meter::Knobs) in a field named `knobs`; [`meter_builder_methods!`](crate::meter_builder_methods)
/// adds `store`. `$what` names what is limited in the docs.
#[macro_export]
macro_rules! meter_wait_methods {
    ($what:literal) => {
        #[doc = concat!("Over a ", $what, ", refuse at once (the default).")]
        pub fn refuse(mut self) -> Self {
            self.knobs.mode = $crate::wait::Mode::Refuse;
            self
        }

        #[doc = concat!("Over a ", $what, ", wait — up to `max_wait`, beyond which the request is")]
        /// refused at once, so a failover layer above can move on. At most 1024 requests
        /// wait at once unless [`max_queue`](Self::max_queue) says otherwise.
        pub fn wait(mut self, max_wait: ::std::time::Duration) -> Self {
            self.knobs.mode = self.knobs.mode.wait(max_wait);
            self
        }

        /// Refuse or wait, as `mode` says (the two methods above in one).
        pub fn mode(mut self, mode: $crate::wait::Mode) -> Self {
            self.knobs.mode = mode;
            self
        }

        /// In wait mode, the most requests that may wait at once; more are refused.
        pub fn max_queue(mut self, n: usize) -> Self {
            self.knobs.mode = self.knobs.mode.max_queue(n);
            self
        }

        /// Where a waiting request's [`Priority`]($crate::wait::Priority) comes from (by
        /// default the request's extensions).
        pub fn priority(mut self, extractor: impl $crate::wait::PriorityExtractor) -> Self {
            self.knobs.priority = ::std::sync::Arc::new(extractor);
            self
        }

        /// Where a waiting request's fair-share flow ([`Share`]($crate::wait::Share)) comes
        /// from (by default the request's extensions): among waiters of one priority,
        /// flows are served in proportion to their weights. See
        /// [`FairShare`]($crate::wait::FairShare) for a flow per key with weights.
        pub fn share(mut self, extractor: impl $crate::wait::ShareExtractor) -> Self {
            self.knobs.share = ::std::sync::Arc::new(extractor);
            self
        }

        /// The clock to wait and count on (tokio's by default).
        pub fn clock(mut self, clock: impl $crate::clock::Clock) -> Self {
            self.knobs.clock = $crate::clock::SharedClock::new(clock);
            self
        }

        /// How often idle keys are dropped, by a background task on the tokio runtime the
        /// layer is built in (every 60 s by default; `None` to leave it to the layer's
        /// `retain_recent`). Without a runtime at build time, no task is started. The task
        /// holds no strong reference and ends when the layer and its services are gone.
        pub fn housekeeping(mut self, every: Option<::std::time::Duration>) -> Self {
            self.knobs.housekeeping = every;
            self
        }
    };
}

/// Writes the builder methods every metered layer has — `refuse`, `wait`, `mode`, `max_queue`,
/// `priority`, `share`, `clock`, `housekeeping` and `store` — for a builder that keeps a
/// [`Knobs`](crate::meter::Knobs) in a field named `knobs`. `$store` is the store trait
/// (`RateStore`, `TokenStore`, or a third meter's), `$what` names what is metered in the
/// docs ("limit", "budget").
///
/// ```
/// use tollgate_core::meter::Knobs;
/// use tollgate_core::store::RateStore;
///
/// struct MyBuilder {
///     knobs: Knobs<dyn RateStore>,
/// }
///
/// impl MyBuilder {
///     tollgate_core::meter_builder_methods!(RateStore, "limit");
/// }
///
/// let b = MyBuilder { knobs: Knobs::default() }.wait(std::time::Duration::from_secs(5)).max_queue(8);
/// assert_eq!(
///     b.knobs.mode,
///     tollgate_core::wait::Mode::Wait { max_wait: std::time::Duration::from_secs(5), max_queue: 8 }
/// );
/// ```
#[macro_export]
macro_rules! meter_builder_methods {
    ($store:ident, $what:literal) => {
        $crate::meter_wait_methods!($what);

        #[doc = concat!("Keeps the ", $what, "s in a shared store (Redis, from `tollgate-redis`), so")]
        /// that every instance draws on one quota: one store call per decision.
        ///
        /// When the store fails or is slower than its timeout, `on_failure` says what
        /// happens: [`OnStoreFailure::Closed`]($crate::store::OnStoreFailure::Closed)
        /// refuses with a [`StoreError`]($crate::store::StoreError) (a 503 through
        /// `ErrorResponseLayer`);
        /// [`OnStoreFailure::Open`]($crate::store::OnStoreFailure::Open) goes on in process
        /// at this instance's share (each quota divided by the instance count), so an
        /// outage can never multiply the quota. The store is asked again half a second
        /// after a failure, and everything goes back to it once it answers.
        ///
        /// In wait mode a request waits out the store's exact `retry_after` (up to
        /// `max_wait`) and asks again, in line: this instance's waiters for the same
        /// buckets keep the order of the in-process queue — priority, then the fair share
        /// by weight — and only the first of them asks the store, so each cell the store
        /// gives this instance goes to the one that order says
        /// ([`Ask::in_line`]($crate::meter::Ask::in_line)). Across instances the shared
        /// quota holds, but the store's next cell goes to whichever instance asks first:
        /// priorities and weights order each instance's own waiters, not the instances.
        /// `max_queue` applies only to the in-process fallback.
        pub fn store(
            mut self,
            store: impl $crate::store::$store,
            on_failure: $crate::store::OnStoreFailure,
        ) -> Self {
            self.knobs.store = Some((::std::sync::Arc::new(store), on_failure));
            self
        }
    };
}
