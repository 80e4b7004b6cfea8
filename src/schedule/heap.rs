//! One timer heap for every credential.
//!
//! Timers are addressed by a dense `u32` slot (the engine gives each
//! credential an index and each kind of job a slot of it). A binary min-heap
//! holds `(deadline, slot, generation)`; rescheduling a slot does not search
//! the heap: it bumps the slot's generation and pushes a new entry, and stale
//! entries are dropped when they reach the top.
//!
//! A slot's generation only ever moves forward, also across `cancel`: an
//! entry is live only while its generation is the slot's current one *and*
//! the slot holds a timer. (Resetting the generation on cancel once let a
//! stale entry match the next `schedule`, which put a credential on two
//! interleaved schedules after every manual rotation; the model test below
//! finds that within a few cases.) Memory stays at about two
//! 16-byte heap entries plus one 16-byte slot per timer: at 100k credentials
//! with two timers each that is a few MB, where a map keyed by credential
//! (two `Arc<str>` ids per key, in the heap and in a hash map) took 34 MB.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use chrono::{DateTime, Utc};

/// A deadline of the heap: milliseconds since the Unix epoch (the engine
/// keeps every time at millisecond precision).
fn millis(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

fn from_millis(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// A slot's current deadline, valid while `armed`.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    at: i64,
    /// Bumped by every `schedule`, never reset: heap entries of older
    /// generations are stale whatever happens to the slot later.
    generation: u32,
    armed: bool,
}

#[derive(Debug, Default)]
pub struct TimerHeap {
    /// `(deadline, slot, generation)`: equal deadlines pop in slot order.
    heap: BinaryHeap<Reverse<(i64, u32, u32)>>,
    slots: Vec<Slot>,
    live: usize,
}

impl TimerHeap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes room for slots `0..n` without the slack of doubling.
    pub fn reserve_slots(&mut self, n: usize) {
        self.slots.reserve_exact(n.saturating_sub(self.slots.len()));
    }

    /// Sets (or moves) the deadline of `slot`.
    pub fn schedule(&mut self, slot: u32, at: DateTime<Utc>) {
        let i = slot as usize;
        if i >= self.slots.len() {
            self.slots.resize(i + 1, Slot::default());
        }
        let s = &mut self.slots[i];
        if !s.armed {
            self.live += 1;
        }
        // A wrapped generation could only match a stale entry that survived
        // 2^32 reschedules of its slot, and `compact` keeps stale entries far
        // fewer than that.
        s.generation = s.generation.wrapping_add(1);
        s.armed = true;
        s.at = millis(at);
        self.heap.push(Reverse((s.at, slot, s.generation)));
        // Keep stale entries bounded: every rotation reschedules its
        // credential, so without this the heap of a busy daemon would hold
        // several dead entries per timer.
        if self.heap.len() > self.live + self.live / 4 + 64 {
            self.compact();
        }
    }

    /// Removes `slot`'s deadline, if any.
    pub fn cancel(&mut self, slot: u32) {
        if let Some(s) = self.slots.get_mut(slot as usize)
            && s.armed
        {
            s.armed = false;
            self.live -= 1;
        }
    }

    pub fn deadline(&self, slot: u32) -> Option<DateTime<Utc>> {
        self.slots
            .get(slot as usize)
            .filter(|s| s.armed)
            .map(|s| from_millis(s.at))
    }

    /// The earliest live deadline.
    pub fn next_deadline(&mut self) -> Option<DateTime<Utc>> {
        self.drop_stale_top();
        self.heap.peek().map(|Reverse((at, _, _))| from_millis(*at))
    }

    /// Removes and returns every slot due at or before `now`, earliest first.
    pub fn pop_due(&mut self, now: DateTime<Utc>) -> Vec<u32> {
        self.pop_due_limit(now, usize::MAX)
    }

    /// Like `pop_due`, but at most `max` slots; the rest stay queued in order.
    pub fn pop_due_limit(&mut self, now: DateTime<Utc>, max: usize) -> Vec<u32> {
        let now = millis(now);
        let mut due = Vec::new();
        while due.len() < max {
            self.drop_stale_top();
            match self.heap.peek() {
                Some(Reverse((at, _, _))) if *at <= now => {
                    let Reverse((_, slot, _)) = self.heap.pop().expect("peeked");
                    self.cancel(slot);
                    due.push(slot);
                }
                _ => break,
            }
        }
        due
    }

    /// Number of live timers.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    fn drop_stale_top(&mut self) {
        while let Some(Reverse((_, slot, generation))) = self.heap.peek() {
            if is_live(&self.slots, *slot, *generation) {
                return;
            }
            self.heap.pop();
        }
    }

    fn compact(&mut self) {
        let slots = &self.slots;
        self.heap
            .retain(|Reverse((_, slot, generation))| is_live(slots, *slot, *generation));
        // A burst (every credential due at once) leaves capacity behind.
        let len = self.heap.len();
        if self.heap.capacity() > 2 * len + 1024 {
            self.heap.shrink_to(len + len / 4 + 64);
        }
    }
}

/// Whether a heap entry is the current timer of its slot.
fn is_live(slots: &[Slot], slot: u32, generation: u32) -> bool {
    slots
        .get(slot as usize)
        .is_some_and(|s| s.armed && s.generation == generation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::at_secs as t;

    #[test]
    fn pops_in_deadline_order_only_when_due() {
        let mut h = TimerHeap::new();
        h.schedule(2, t(20));
        h.schedule(1, t(10));
        h.schedule(3, t(30));
        assert_eq!(h.next_deadline(), Some(t(10)));
        assert!(h.pop_due(t(5)).is_empty());
        assert_eq!(h.pop_due(t(20)), vec![1, 2]);
        assert_eq!(h.len(), 1);
        assert_eq!(h.deadline(3), Some(t(30)));
        assert_eq!(h.deadline(1), None, "a popped timer is gone");
        assert_eq!(h.next_deadline(), Some(t(30)));
    }

    #[test]
    fn pop_due_limit_leaves_the_rest_in_order() {
        let mut h = TimerHeap::new();
        for i in 0..10 {
            h.schedule(i, t(i64::from(i)));
        }
        assert_eq!(h.pop_due_limit(t(100), 3), vec![0, 1, 2]);
        assert_eq!(h.pop_due_limit(t(4), 100), vec![3, 4]);
        assert_eq!(h.len(), 5);
    }

    #[test]
    fn rescheduling_replaces_the_old_deadline() {
        let mut h = TimerHeap::new();
        h.schedule(7, t(10));
        h.schedule(7, t(50));
        assert_eq!(h.len(), 1);
        assert_eq!(h.next_deadline(), Some(t(50)));
        assert!(h.pop_due(t(10)).is_empty());
        assert_eq!(h.pop_due(t(50)), vec![7]);
        assert!(h.is_empty());
    }

    #[test]
    fn cancel_removes_and_stale_entries_stay_bounded() {
        let mut h = TimerHeap::new();
        h.schedule(0, t(10));
        h.cancel(0);
        h.cancel(0);
        h.cancel(99);
        assert!(h.is_empty());
        assert_eq!(h.next_deadline(), None);
        for i in 0..10_000 {
            h.schedule(5, t(i));
        }
        assert!(h.heap.len() < 200, "heap grew to {}", h.heap.len());
        assert_eq!(h.pop_due(t(1_000_000)), vec![5]);
    }

    #[test]
    fn a_cancelled_timer_never_comes_back_when_its_slot_is_rescheduled() {
        // What a manual rotation does: the scheduled timer is cancelled, the
        // rotation runs, and its end schedules the next one. The cancelled
        // entry must stay dead, or the slot fires at both deadlines.
        let mut h = TimerHeap::new();
        h.schedule(3, t(10));
        h.cancel(3);
        h.schedule(3, t(50));
        assert_eq!(h.next_deadline(), Some(t(50)));
        assert!(h.pop_due(t(10)).is_empty(), "the cancelled deadline fired");
        // Popping cancels too; the next schedule must not revive either entry.
        assert_eq!(h.pop_due(t(50)), vec![3]);
        h.schedule(3, t(90));
        assert!(h.pop_due(t(89)).is_empty());
        assert_eq!(h.pop_due(t(90)), vec![3]);
        assert!(h.is_empty());
    }

    #[test]
    fn deadlines_keep_millisecond_precision() {
        let mut h = TimerHeap::new();
        let at = DateTime::from_timestamp_millis(1_800_000_000_123).unwrap();
        h.schedule(0, at);
        assert_eq!(h.deadline(0), Some(at));
        assert!(h.pop_due(at - chrono::Duration::milliseconds(1)).is_empty());
        assert_eq!(h.pop_due(at), vec![0]);
    }
}

/// Model-based property tests: random sequences of operations on many slots,
/// checked after every operation against a trivially correct reference (a
/// `BTreeMap` from slot to deadline).
#[cfg(test)]
mod model_tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::test_support::at_ms as t;

    #[derive(Debug, Clone)]
    enum Op {
        Schedule(u32, i64),
        Cancel(u32),
        PopDue(i64, usize),
    }

    fn op(slots: u32) -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..slots, 0..60i64).prop_map(|(s, at)| Op::Schedule(s, at)),
            2 => (0..slots).prop_map(Op::Cancel),
            2 => (0..70i64, 0..6usize).prop_map(|(now, max)| Op::PopDue(now, max)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn the_heap_behaves_like_a_map_from_slot_to_deadline(
            ops in proptest::collection::vec(op(8), 1..120)
        ) {
            let mut heap = TimerHeap::new();
            let mut model: BTreeMap<u32, i64> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Schedule(s, at) => {
                        heap.schedule(s, t(at));
                        model.insert(s, at);
                    }
                    Op::Cancel(s) => {
                        heap.cancel(s);
                        model.remove(&s);
                    }
                    Op::PopDue(now, max) => {
                        let got = heap.pop_due_limit(t(now), max);
                        // Earliest first; equal deadlines in slot order.
                        let mut due: Vec<(i64, u32)> = model
                            .iter()
                            .filter(|(_, at)| **at <= now)
                            .map(|(s, at)| (*at, *s))
                            .collect();
                        due.sort();
                        let want: Vec<u32> = due.into_iter().take(max).map(|(_, s)| s).collect();
                        for s in &want {
                            model.remove(s);
                        }
                        prop_assert_eq!(got, want);
                    }
                }
                prop_assert_eq!(heap.len(), model.len());
                for s in 0..8 {
                    prop_assert_eq!(heap.deadline(s), model.get(&s).map(|at| t(*at)));
                }
                prop_assert_eq!(heap.next_deadline(), model.values().min().map(|at| t(*at)));
            }
            // Whatever is left comes out exactly once each.
            let rest = heap.pop_due(t(1_000_000));
            prop_assert_eq!(rest.len(), model.len());
        }
    }
}
