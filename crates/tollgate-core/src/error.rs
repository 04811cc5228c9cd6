//! Looking through an error's `source()` chain, as every layer must: a [`Refusal`] or a
//! [`FactsError`] arrives wrapped by the layers it passed (tower's buffer, hyper's client,
//! a boxed service), and is still what it is.
//!
//! ```
//! use std::time::Duration;
//! use tollgate_core::error::find;
//! use tollgate_core::refusal::{LimitKind, Refusal};
//! use tollgate_core::BoxError;
//!
//! let e: BoxError = Refusal::new(LimitKind::Requests, "rpm", Some(Duration::from_secs(1))).into();
//! assert_eq!(find::<Refusal>(&*e).map(Refusal::limit), Some("rpm"));
//! assert!(find::<std::io::Error>(&*e).is_none());
//! ```
//!
//! [`Refusal`]: crate::refusal::Refusal
//! [`FactsError`]: crate::facts::FactsError

use std::error::Error;

/// `err`, then its source, its source's source, and so on.
pub fn chain<'a>(
    err: &'a (dyn Error + 'static),
) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(err), |&e| e.source())
}

/// The first error of type `T` in `err`'s chain ([`chain`]).
pub fn find<'a, T: Error + 'static>(err: &'a (dyn Error + 'static)) -> Option<&'a T> {
    chain(err).find_map(|e| e.downcast_ref::<T>())
}
