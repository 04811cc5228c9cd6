//! Whose share a waiting request draws on, and how large that share is.

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::key::{Key, KeyExtractor, RequestHead};

/// A request's flow in the wait queue's fair share: who it is for (a tenant, an API key)
/// and that flow's weight. When requests of several flows wait for the same limit, each
/// flow is granted capacity in proportion to its weight (start-time fair queueing:
/// [`WaitQueue`](super::WaitQueue)); a flow alone gets all of it. Put it in a request's
/// extensions, or derive it with [`FairShare`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    flow: u64,
    weight: u32,
}

impl Share {
    /// The flow named `flow` (hashed: any `Hash` name), of `weight` (0 counts as 1).
    pub fn new(flow: impl Hash, weight: u32) -> Self {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        flow.hash(&mut h);
        Self {
            flow: h.finish(),
            weight: weight.max(1),
        }
    }

    /// The flow's id.
    pub fn flow(&self) -> u64 {
        self.flow
    }

    /// The flow's weight (at least 1).
    pub fn weight(&self) -> u32 {
        self.weight
    }
}

/// Reads a request's [`Share`]; `None` puts it in the one flow of every request without
/// a share.
pub trait ShareExtractor: Send + Sync + 'static {
    /// The share of this request.
    fn share(&self, req: &RequestHead<'_>) -> Option<Share>;
}

/// The [`Share`] in the request's extensions, if any. The default.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExtensionShare;

impl ShareExtractor for ExtensionShare {
    fn share(&self, req: &RequestHead<'_>) -> Option<Share> {
        req.extensions().get::<Share>().copied()
    }
}

/// Fair share by a key — each tenant its own flow — with a weight per key (1 unless
/// named). A [`Share`] in the request's extensions wins.
///
/// ```
/// use tollgate_core::key::Header;
/// use tollgate_core::wait::FairShare;
///
/// // acme gets three cells for every one of any other tenant while they all wait.
/// let share = FairShare::by(Header::new("x-tenant-id")).weight("acme", 3);
/// # let _ = share;
/// ```
#[derive(Clone)]
pub struct FairShare {
    key: Arc<dyn KeyExtractor>,
    weights: HashMap<String, u32>,
}

impl fmt::Debug for FairShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FairShare")
            .field("weights", &self.weights.len())
            .finish_non_exhaustive()
    }
}

impl FairShare {
    /// One flow per key `key` names; a request it cannot name shares the flow `unkeyed`.
    pub fn by(key: impl KeyExtractor) -> Self {
        Self {
            key: Arc::new(key),
            weights: HashMap::new(),
        }
    }

    /// The weight of the flow of `key` (1 unless said; 0 counts as 1): the key as the
    /// extractor names it (`tenant:acme` for [`Header`](crate::key::Header)), or its value
    /// alone (`acme`).
    pub fn weight(mut self, key: impl AsRef<str>, weight: u32) -> Self {
        self.weights.insert(key.as_ref().to_owned(), weight.max(1));
        self
    }
}

impl ShareExtractor for FairShare {
    fn share(&self, req: &RequestHead<'_>) -> Option<Share> {
        if let Some(s) = req.extensions().get::<Share>() {
            return Some(*s);
        }
        let key = self.key.extract(req).unwrap_or_else(|| Key::new("unkeyed"));
        let name = key.as_str();
        let weight = self
            .weights
            .get(name)
            .or_else(|| {
                name.split_once(':')
                    .and_then(|(_, value)| self.weights.get(value))
            })
            .copied()
            .unwrap_or(1);
        Some(Share::new(key.as_str(), weight))
    }
}
