//! Small pieces every Tollgate service shares.

/// The service `poll_ready` made ready, to go with the request being called; a clone
/// stays behind for the next request (tower's rule for a service that is called from a
/// future: the ready one must be the one called).
///
/// ```
/// let mut svc = vec![1];
/// let ready = tollgate_core::service::take_ready(&mut svc);
/// assert_eq!(ready, svc);
/// ```
pub fn take_ready<S: Clone>(svc: &mut S) -> S {
    let fresh = svc.clone();
    std::mem::replace(svc, fresh)
}
