//! [`RateLimitLayer`] and its builder.

use std::sync::Arc;

use tower::Layer;

use tollgate_core::meter::Knobs;

use crate::limit::{ActiveLimit, Limit};
use crate::remote::Remote;
use crate::service::RateLimit;
use crate::shared::{Limits, Shared};
use tollgate_core::store::RateStore;

/// Applies one or more [`Limit`]s to every request; see the [crate docs](crate).
///
/// Every service this layer makes, and every clone of those, draws on the same limits:
/// the state lives in an `Arc` inside the layer.
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    shared: Arc<Shared>,
    remote: Option<Arc<Remote>>,
}

impl RateLimitLayer {
    /// One limit, refusing what is over it.
    pub fn new(limit: Limit) -> Self {
        Self::builder().limit(limit).build()
    }

    /// A builder for several limits, wait mode, priorities, a clock.
    pub fn builder() -> RateLimitBuilder {
        RateLimitBuilder {
            limits: Vec::new(),
            knobs: Knobs::default(),
            reserve: 0,
        }
    }

    /// How many keys the limits hold state for, summed over the limits.
    pub fn keys(&self) -> usize {
        self.shared
            .admitter()
            .limits
            .iter()
            .map(ActiveLimit::len)
            .sum()
    }

    /// The quota in force for the limit named `limit`: the configured one, or the one a
    /// learning limit ([`Limit::learned`], [`Limit::learn`]) took from the provider's
    /// answers; `None` for a limit of another name, or one that knows no quota yet.
    pub fn quota(&self, limit: &str) -> Option<crate::Quota> {
        self.shared
            .admitter()
            .limits
            .iter()
            .find(|l| l.limit.name() == limit)
            .and_then(ActiveLimit::quota)
    }

    /// How many requests are waiting for a cell now.
    pub fn waiting(&self) -> usize {
        self.shared.waiting()
    }

    /// Drops the state of every key that has been idle long enough to be indistinguishable
    /// from a fresh one (governor's `retain_recent`). The layer does this by itself on a
    /// schedule (see [`RateLimitBuilder::housekeeping`]); call it to do it now.
    pub fn retain_recent(&self) {
        for l in &self.shared.admitter().limits {
            l.retain_recent();
        }
    }
}

/// A balancer reads the limits' room for a request: the tightest of them, behind the
/// requests already waiting (each one interval of the limit's quota further off).
impl tollgate_core::meter::Capacity for RateLimitLayer {
    fn headroom(
        &self,
        req: &tollgate_core::key::RequestHead<'_>,
    ) -> tollgate_core::meter::Headroom {
        // With a shared store, the quota is the store's: what its last answer said (no
        // room until then), read without another call.
        if let Some(remote) = &self.remote {
            let now = tollgate_core::clock::Clock::now(self.shared.clock());
            return match remote.guard.denied_until().filter(|t| *t > now) {
                Some(t) => tollgate_core::meter::Headroom {
                    left: 0.0,
                    ready_in: t - now,
                },
                None => tollgate_core::meter::Headroom::FULL,
            };
        }
        let waiting = u32::try_from(self.shared.waiting()).unwrap_or(u32::MAX);
        self.shared
            .admitter()
            .limits
            .iter()
            .map(|l| {
                let mut room = l.headroom(&l.limit.key_for(req));
                if waiting > 0 {
                    let pace = l
                        .quota()
                        .map_or(std::time::Duration::ZERO, |q| q.interval());
                    room.left = 0.0;
                    room.ready_in = room.ready_in.saturating_add(pace.saturating_mul(waiting));
                }
                room
            })
            .fold(
                tollgate_core::meter::Headroom::FULL,
                tollgate_core::meter::Headroom::min,
            )
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit::new(inner, Arc::clone(&self.shared), self.remote.clone())
    }
}

/// Builds a [`RateLimitLayer`].
pub struct RateLimitBuilder {
    limits: Vec<Limit>,
    knobs: Knobs<dyn RateStore>,
    reserve: u32,
}

impl std::fmt::Debug for RateLimitBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitBuilder")
            .field("limits", &self.limits)
            .field("knobs", &self.knobs)
            .field("reserve", &self.reserve)
            .finish()
    }
}

impl RateLimitBuilder {
    /// Adds a limit. A request passes only when every limit admits it, and spends a cell
    /// of none of them when one refuses.
    pub fn limit(mut self, limit: Limit) -> Self {
        self.limits.push(limit);
        self
    }

    tollgate_core::meter_builder_methods!(RateStore, "limit");

    /// Keeps `cells` of each limit's burst for requests above the lowest priority:
    /// a request of priority 0 (the default, and the gateway's background jobs) takes a
    /// cell only while `cells` more stay in the bucket, and otherwise waits (or is
    /// refused) until they do. Live traffic of a higher priority then finds the burst it
    /// would find without the background work, which still takes every cell beyond it.
    /// At most the burst less one is kept; 0 (the default) keeps none. Kept in process:
    /// a shared (Redis) store's decisions do not see it.
    pub fn reserve(mut self, cells: u32) -> Self {
        self.reserve = cells;
        self
    }

    /// The layer.
    pub fn build(self) -> RateLimitLayer {
        let knobs = self.knobs;
        let share = knobs.share();
        let quotas: Vec<_> = self.limits.iter().map(Limit::quota).collect();
        let limits = self
            .limits
            .into_iter()
            .map(|l| ActiveLimit::new(l.shared_by(share), knobs.clock.clone()))
            .collect();
        let shared = Arc::new(Shared::new(
            Limits::new(
                limits,
                Arc::clone(&knobs.priority),
                Arc::clone(&knobs.share),
                self.reserve,
            ),
            knobs.mode,
            knobs.clock.clone(),
        ));
        knobs.spawn_housekeeping(&shared, |s: &Shared| {
            for l in &s.admitter().limits {
                l.retain_recent();
            }
        });
        let remote = knobs
            .guarded("ratelimit")
            .map(|guard| Arc::new(Remote { guard, quotas }));
        RateLimitLayer { shared, remote }
    }
}
