//! Which backend a request tries first: the order of a round.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tollgate_core::key::{KeyExtractor, RequestHead};
use tollgate_core::meter::Headroom;

/// How a request's backends are ordered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Strategy {
    /// By priority, the first that can take it (failover: a second backend's quota
    /// waits until the first has refused).
    #[default]
    Ordered,
    /// Quota-aware: the backend whose limits admit now and have the most room left for
    /// their weight goes first. Among those that admit, two are drawn at random in
    /// proportion to their weights and the one with more room per weight wins (the power
    /// of two choices: no herd onto one backend between two reads of its state); the
    /// others follow by room, then those not ready by when they are. A backend without
    /// a [`Capacity`](tollgate_core::meter::Capacity) counts as full.
    Balanced,
    /// Fixed shares: the first backend is drawn in proportion to the weights (70/30 for a
    /// migration), the others follow by priority.
    Weighted,
}

/// What a round knows of one backend before it tries any.
pub(crate) struct Candidate {
    pub(crate) index: usize,
    pub(crate) weight: u32,
    pub(crate) room: Headroom,
    /// The rendezvous hash of the request's sticky key and this backend.
    pub(crate) affinity: Option<u64>,
}

/// A sticky key's rendezvous hash with `backend`, scaled by its weight: the backend with
/// the highest keeps the key while it has room (and only the keys it had move when a
/// backend is added or removed).
pub(crate) fn affinity(key: &str, backend: &str, weight: u32) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (key, backend).hash(&mut h);
    let x = h.finish();
    // Weighted rendezvous: the top of the draws of `weight` tickets.
    (1..weight.max(1)).fold(x, |best, i| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (key, backend, i).hash(&mut h);
        best.max(h.finish())
    })
}

/// The sticky key of a request, if the builder named an extractor.
pub(crate) fn sticky_key(
    extractor: &Option<Arc<dyn KeyExtractor>>,
    head: &RequestHead<'_>,
) -> Option<String> {
    extractor
        .as_ref()
        .and_then(|e| e.extract(head))
        .map(|k| k.as_str().to_owned())
}

/// A weighted draw among `cands` (by their weights).
fn draw(cands: &[&Candidate]) -> Option<usize> {
    let total: u64 = cands.iter().map(|c| u64::from(c.weight.max(1))).sum();
    if total == 0 {
        return None;
    }
    let mut ticket = fastrand::u64(..total);
    for (i, c) in cands.iter().enumerate() {
        let w = u64::from(c.weight.max(1));
        if ticket < w {
            return Some(i);
        }
        ticket -= w;
    }
    None
}

/// The order in which a round tries `cands` (given in priority order).
pub(crate) fn order(strategy: Strategy, mut cands: Vec<Candidate>) -> Vec<usize> {
    // A sticky key's backend goes first while it has room.
    let sticky = cands
        .iter()
        .filter(|c| c.affinity.is_some())
        .max_by_key(|c| c.affinity)
        .filter(|c| c.room.ready_in.is_zero() && c.room.left > 0.0)
        .map(|c| c.index);
    let mut out: Vec<usize> = Vec::with_capacity(cands.len());
    if let Some(s) = sticky {
        out.push(s);
        cands.retain(|c| c.index != s);
    }
    match strategy {
        Strategy::Ordered => out.extend(cands.iter().map(|c| c.index)),
        Strategy::Weighted => {
            let all: Vec<&Candidate> = cands.iter().collect();
            if let Some(first) = draw(&all).map(|i| all[i].index) {
                out.push(first);
                out.extend(cands.iter().map(|c| c.index).filter(|&i| i != first));
            }
        }
        Strategy::Balanced => {
            // Room left, counted `weight` times.
            let score = |c: &Candidate| c.room.left * f64::from(c.weight.max(1));
            let ready: Vec<&Candidate> = cands
                .iter()
                .filter(|c| c.room.ready_in.is_zero() && c.room.left > 0.0)
                .collect();
            // Two draws by weight; the one with more room for its weight goes first.
            let first = match (draw(&ready), draw(&ready)) {
                (Some(a), Some(b)) => Some(if score(ready[b]) > score(ready[a]) {
                    ready[b].index
                } else {
                    ready[a].index
                }),
                (Some(a), None) | (None, Some(a)) => Some(ready[a].index),
                (None, None) => None,
            };
            if let Some(f) = first {
                out.push(f);
            }
            let mut rest: Vec<&Candidate> =
                cands.iter().filter(|c| Some(c.index) != first).collect();
            rest.sort_by(|a, b| {
                let wait = |c: &Candidate| {
                    if c.room.left > 0.0 {
                        c.room.ready_in
                    } else {
                        c.room.ready_in.max(Duration::from_nanos(1))
                    }
                };
                wait(a).cmp(&wait(b)).then(score(b).total_cmp(&score(a)))
            });
            out.extend(rest.iter().map(|c| c.index));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(index: usize, weight: u32, left: f64, ready_ms: u64) -> Candidate {
        Candidate {
            index,
            weight,
            room: Headroom {
                left,
                ready_in: Duration::from_millis(ready_ms),
            },
            affinity: None,
        }
    }

    #[test]
    fn balanced_puts_the_backend_with_room_first_and_the_one_not_ready_last() {
        for _ in 0..100 {
            let o = order(
                Strategy::Balanced,
                vec![cand(0, 1, 0.0, 500), cand(1, 1, 0.8, 0), cand(2, 1, 0.1, 0)],
            );
            assert_eq!(o.len(), 3);
            assert_eq!(*o.last().unwrap(), 0, "{o:?}");
        }
        // The one with more room wins the two draws whenever both are drawn.
        let firsts = (0..1000)
            .filter(|_| {
                order(
                    Strategy::Balanced,
                    vec![cand(0, 1, 0.9, 0), cand(1, 1, 0.1, 0)],
                )[0] == 0
            })
            .count();
        assert!(firsts > 650, "{firsts}");
    }

    #[test]
    fn weighted_draws_in_proportion() {
        let firsts = (0..4000)
            .filter(|_| {
                order(
                    Strategy::Weighted,
                    vec![cand(0, 3, 1.0, 0), cand(1, 1, 1.0, 0)],
                )[0] == 0
            })
            .count();
        assert!((2850..=3150).contains(&firsts), "{firsts} of 4000");
    }

    #[test]
    fn a_sticky_key_keeps_its_backend_while_it_has_room() {
        let with = |left: f64| {
            let mut c = vec![cand(0, 1, 1.0, 0), cand(1, 1, left, 0)];
            c[0].affinity = Some(1);
            c[1].affinity = Some(2);
            order(Strategy::Balanced, c)
        };
        assert!((0..100).all(|_| with(0.5)[0] == 1));
        assert!((0..100).all(|_| with(0.0)[0] == 0), "no room: it moves");
        assert_ne!(affinity("tenant:a", "k1", 1), affinity("tenant:a", "k2", 1));
    }
}
