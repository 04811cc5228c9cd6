//! The fair share's bookkeeping, shared by the in-process [`WaitQueue`](super::WaitQueue)
//! and the order a shared store's waiters keep in one instance ([`crate::meter::Ask`]):
//! each waiter's place (priority, then its start tag in start-time fair queueing, then
//! arrival), and each flow's last finish tag.

use std::cmp::Reverse;
use std::collections::HashMap;

use super::{Priority, Share};

/// A waiter's place: by priority, then by its start tag in the fair share (which is
/// arrival order for requests without a [`Share`]: they are one flow), then arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Slot {
    priority: Reverse<Priority>,
    pub(crate) start: u128,
    seq: u64,
}

/// A waiter's tags: its place, its flow, and its finish tag there.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tagged {
    pub(crate) slot: Slot,
    pub(crate) flow: u64,
    pub(crate) finish: u128,
}

/// Virtual time per unit of cost at weight 1.
const UNIT: u128 = 1 << 32;

/// The flow of requests without a share.
const UNSHARED: u64 = u64::MAX;

/// Virtual time and the flows' tags.
#[derive(Debug, Default)]
pub(crate) struct Fair {
    next_seq: u64,
    /// The start tag of the last waiter served.
    vtime: u128,
    /// Each flow's last finish tag; a flow whose tag is behind `vtime` is idle and starts
    /// again at `vtime` (no credit for having been away, no debt).
    flows: HashMap<u64, u128>,
}

impl Fair {
    /// Tags a new waiter of `priority` and `share` costing `cost`: its place, and its
    /// flow's tag advanced.
    pub(crate) fn tag(&mut self, priority: Priority, share: Option<Share>, cost: u64) -> Tagged {
        let (flow, weight) = share.map_or((UNSHARED, 1), |s| (s.flow(), s.weight()));
        let last = self.flows.get(&flow).copied().unwrap_or(0);
        let start = last.max(self.vtime);
        let finish = start.saturating_add(u128::from(cost.max(1)) * UNIT / u128::from(weight));
        self.flows.insert(flow, finish);
        let seq = self.next_seq;
        self.next_seq += 1;
        Tagged {
            slot: Slot {
                priority: Reverse(priority),
                start,
                seq,
            },
            flow,
            finish,
        }
    }

    /// A waiter left without being served: its flow gives back its tag when it was the
    /// flow's last.
    pub(crate) fn untag(&mut self, t: &Tagged) {
        if self.flows.get(&t.flow) == Some(&t.finish) {
            self.flows.insert(t.flow, t.slot.start);
        }
    }

    /// A waiter was served: virtual time moves to its start tag, and idle flows are
    /// forgotten now and then (`waiting`: how many wait now).
    pub(crate) fn served(&mut self, start: u128, waiting: usize) {
        self.vtime = self.vtime.max(start);
        if self.flows.len() > 64 + 2 * waiting {
            let v = self.vtime;
            self.flows.retain(|_, f| *f > v);
        }
    }
}
