//! Which waiting request goes first.

use std::fmt;

use crate::key::RequestHead;
use http::header::HeaderName;

/// A request's priority in the wait queue: higher goes first; equal priorities go in
/// arrival order. Put it in a request's extensions, or read it from a header with
/// [`HeaderPriority`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Priority(pub u8);

/// Reads a request's [`Priority`].
pub trait PriorityExtractor: Send + Sync + 'static {
    /// The priority of this request.
    fn priority(&self, req: &RequestHead<'_>) -> Priority;
}

/// The [`Priority`] in the request's extensions, or the lowest (0) when there is none. The
/// default.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExtensionPriority;

impl PriorityExtractor for ExtensionPriority {
    fn priority(&self, req: &RequestHead<'_>) -> Priority {
        req.extensions()
            .get::<Priority>()
            .copied()
            .unwrap_or_default()
    }
}

/// The priority from a header holding a number from 0 to 255 (`x-priority: 10`); a missing
/// or unreadable header is 0. The extension, when present, wins: code that set it knows
/// better than a client.
#[derive(Clone, Debug)]
pub struct HeaderPriority {
    name: HeaderName,
}

impl HeaderPriority {
    /// Reads the header `name`.
    pub fn new(name: HeaderName) -> Self {
        Self { name }
    }
}

impl PriorityExtractor for HeaderPriority {
    fn priority(&self, req: &RequestHead<'_>) -> Priority {
        if let Some(p) = req.extensions().get::<Priority>() {
            return *p;
        }
        req.headers()
            .get(&self.name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u8>().ok())
            .map_or_else(Priority::default, Priority)
    }
}

/// A priority extractor from a closure. Built by [`priority_fn`].
#[derive(Clone, Copy)]
pub struct PriorityFn<F>(F);

impl<F> fmt::Debug for PriorityFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PriorityFn").finish_non_exhaustive()
    }
}

/// A priority extractor from a closure.
pub fn priority_fn<F>(f: F) -> PriorityFn<F>
where
    F: Fn(&RequestHead<'_>) -> Priority + Send + Sync + 'static,
{
    PriorityFn(f)
}

impl<F> PriorityExtractor for PriorityFn<F>
where
    F: Fn(&RequestHead<'_>) -> Priority + Send + Sync + 'static,
{
    fn priority(&self, req: &RequestHead<'_>) -> Priority {
        (self.0)(req)
    }
}
