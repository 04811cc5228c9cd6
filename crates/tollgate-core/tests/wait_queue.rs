//! The wait queue's contract, with an admitter whose capacity the test hands out by hand.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tollgate_core::clock::SharedClock;
use tollgate_core::refusal::{LimitKind, Reason, Refusal};
use tollgate_core::wait::{Admission, Admit, Denial, Mode, Priority, WaitQueue};

/// Capacity per bucket, given out by the test; a bucket without capacity says "a second".
#[derive(Default)]
struct Slots {
    free: Mutex<HashMap<&'static str, u32>>,
}

impl Slots {
    fn give(&self, bucket: &'static str, n: u32) {
        *self.free.lock().unwrap().entry(bucket).or_default() += n;
    }
    fn free(&self, bucket: &'static str) -> u32 {
        self.free.lock().unwrap().get(bucket).copied().unwrap_or(0)
    }
}

impl Admit for Slots {
    type Ticket = &'static str;
    fn try_admit(&self, t: &&'static str) -> Result<(), (usize, Denial)> {
        let mut free = self.free.lock().unwrap();
        match free.get_mut(t) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Ok(())
            }
            _ => Err((0, Denial::Wait(Duration::from_secs(1)))),
        }
    }
    fn refund(&self, t: &&'static str) {
        *self.free.lock().unwrap().entry(t).or_default() += 1;
    }
    fn shares(&self, a: &&'static str, b: &&'static str) -> bool {
        a == b
    }
    fn pace(&self, _: &&'static str) -> Duration {
        Duration::from_secs(1)
    }
    fn refusal(
        &self,
        _: &&'static str,
        _: usize,
        wait: Option<Duration>,
        reason: Reason,
    ) -> Refusal {
        Refusal::new(LimitKind::Requests, "slots", wait).with_reason(reason)
    }
}

fn queue(max_wait: Duration, max_queue: usize) -> Arc<WaitQueue<Slots>> {
    Arc::new(WaitQueue::new(
        Slots::default(),
        Mode::Wait {
            max_wait,
            max_queue,
        },
        SharedClock::default(),
    ))
}

fn wait(a: Admission<Slots>) -> tollgate_core::wait::Acquire<Slots> {
    match a {
        Admission::Wait(acq) => acq,
        Admission::Now => panic!("admitted at once"),
        Admission::Refused(r) => panic!("refused: {r}"),
    }
}

#[tokio::test(start_paused = true)]
async fn waiters_of_one_bucket_go_in_priority_then_arrival_order_and_others_pass() {
    let q = queue(Duration::from_secs(60), 10);
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (name, prio) in [("a1", 0), ("a2", 0), ("a-urgent", 5)] {
        let acq = wait(q.admit("a", Priority(prio)));
        let order = Arc::clone(&order);
        tasks.push(tokio::spawn(async move {
            acq.await.unwrap();
            order.lock().unwrap().push(name);
        }));
    }
    // Bucket b has capacity: it does not queue behind bucket a.
    q.admitter().give("b", 1);
    assert!(matches!(q.admit("b", Priority(0)), Admission::Now));
    assert_eq!(q.waiting(), 3);
    for _ in 0..3 {
        q.admitter().give("a", 1);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), ["a-urgent", "a1", "a2"]);
    assert_eq!(q.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_newcomer_does_not_overtake_a_waiter_even_when_capacity_appears() {
    let q = queue(Duration::from_secs(60), 10);
    let first = wait(q.admit("a", Priority(0)));
    q.admitter().give("a", 1);
    // The free slot belongs to the waiter, not to the newcomer.
    let second = wait(q.admit("a", Priority(0)));
    first.await.unwrap();
    drop(second);
    assert_eq!(q.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_granted_waiter_dropped_gives_its_capacity_back() {
    let q = queue(Duration::from_secs(60), 10);
    let first = wait(q.admit("a", Priority(0)));
    q.admitter().give("a", 1);
    // The second arrival's dispatch grants the slot to the first, which is never polled.
    let second = wait(q.admit("a", Priority(0)));
    assert_eq!(q.admitter().free("a"), 0);
    drop(first);
    // Given back, and passed on at once to the next in line.
    second.await.unwrap();
    assert_eq!(q.admitter().free("a"), 0);
    assert_eq!(q.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn max_wait_and_max_queue_refuse_at_once() {
    let q = queue(Duration::from_millis(2500), 2);
    let a = wait(q.admit("a", Priority(0))); // waits ~1 s
    let b = wait(q.admit("a", Priority(0))); // ~2 s
    match q.admit("a", Priority(0)) {
        Admission::Refused(r) => assert_eq!(r.reason(), Reason::WaitTooLong),
        _ => panic!("a third would wait ~3 s, past 2.5 s"),
    }
    match q.admit("c", Priority(0)) {
        Admission::Refused(r) => assert_eq!(r.reason(), Reason::QueueFull),
        _ => panic!("the queue holds two"),
    }
    // Nobody hands out capacity: the waiters give up at their deadline.
    let r = a.await.unwrap_err();
    assert_eq!(r.reason(), Reason::WaitTooLong);
    assert!(b.await.is_err());
    assert_eq!(q.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn refuse_mode_never_queues() {
    let q = Arc::new(WaitQueue::new(
        Slots::default(),
        Mode::Refuse,
        SharedClock::default(),
    ));
    match q.admit("a", Priority(9)) {
        Admission::Refused(r) => assert_eq!(r.reason(), Reason::OverLimit),
        _ => panic!("refuse mode refuses"),
    }
    q.admitter().give("a", 1);
    assert!(matches!(q.admit("a", Priority(0)), Admission::Now));
}
