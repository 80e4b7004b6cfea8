//! One timer heap for every credential.
//!
//! A binary min-heap of `(deadline, generation, key)`. Rescheduling a key does
//! not search the heap: it bumps the key's generation and pushes a new entry;
//! stale entries are dropped when they reach the top. Memory stays at about two
//! entries per key in the worst case.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::Hash;

use chrono::{DateTime, Utc};

#[derive(Debug)]
pub struct TimerHeap<K: Clone + Eq + Hash + Ord> {
    heap: BinaryHeap<Reverse<(DateTime<Utc>, u64, K)>>,
    live: HashMap<K, (DateTime<Utc>, u64)>,
    next_gen: u64,
}

impl<K: Clone + Eq + Hash + Ord> Default for TimerHeap<K> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
            live: HashMap::new(),
            next_gen: 0,
        }
    }
}

impl<K: Clone + Eq + Hash + Ord> TimerHeap<K> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets (or moves) the deadline of `key`.
    pub fn schedule(&mut self, key: K, at: DateTime<Utc>) {
        self.next_gen += 1;
        let generation = self.next_gen;
        self.live.insert(key.clone(), (at, generation));
        self.heap.push(Reverse((at, generation, key)));
        // Keep stale entries bounded when a few keys are rescheduled often.
        if self.heap.len() > 2 * self.live.len() + 64 {
            self.compact();
        }
    }

    /// Removes `key`'s deadline, if any.
    pub fn cancel(&mut self, key: &K) {
        self.live.remove(key);
    }

    pub fn deadline(&self, key: &K) -> Option<DateTime<Utc>> {
        self.live.get(key).map(|(at, _)| *at)
    }

    /// The earliest live deadline.
    pub fn next_deadline(&mut self) -> Option<DateTime<Utc>> {
        self.drop_stale_top();
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Removes and returns every key due at or before `now`, earliest first.
    pub fn pop_due(&mut self, now: DateTime<Utc>) -> Vec<K> {
        self.pop_due_limit(now, usize::MAX)
    }

    /// Like `pop_due`, but at most `max` keys; the rest stay queued in order.
    pub fn pop_due_limit(&mut self, now: DateTime<Utc>, max: usize) -> Vec<K> {
        let mut due = Vec::new();
        while due.len() < max {
            self.drop_stale_top();
            match self.heap.peek() {
                Some(Reverse((at, _, _))) if *at <= now => {
                    let Reverse((_, _, key)) = self.heap.pop().expect("peeked");
                    self.live.remove(&key);
                    due.push(key);
                }
                _ => break,
            }
        }
        due
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    fn is_live(&self, generation: u64, key: &K) -> bool {
        self.live.get(key).is_some_and(|(_, g)| *g == generation)
    }

    fn drop_stale_top(&mut self) {
        while let Some(Reverse((_, generation, key))) = self.heap.peek() {
            if self.is_live(*generation, key) {
                return;
            }
            self.heap.pop();
        }
    }

    fn compact(&mut self) {
        let live = &self.live;
        self.heap
            .retain(|Reverse((_, g, k))| live.get(k).is_some_and(|(_, lg)| lg == g));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
    }

    #[test]
    fn pops_in_deadline_order_only_when_due() {
        let mut h = TimerHeap::new();
        h.schedule("b", t(20));
        h.schedule("a", t(10));
        h.schedule("c", t(30));
        assert_eq!(h.next_deadline(), Some(t(10)));
        assert!(h.pop_due(t(5)).is_empty());
        assert_eq!(h.pop_due(t(20)), vec!["a", "b"]);
        assert_eq!(h.len(), 1);
        assert_eq!(h.next_deadline(), Some(t(30)));
    }

    #[test]
    fn pop_due_limit_leaves_the_rest_in_order() {
        let mut h = TimerHeap::new();
        for i in 0..10 {
            h.schedule(i, t(i));
        }
        assert_eq!(h.pop_due_limit(t(100), 3), vec![0, 1, 2]);
        assert_eq!(h.pop_due_limit(t(4), 100), vec![3, 4]);
        assert_eq!(h.len(), 5);
    }

    #[test]
    fn rescheduling_replaces_the_old_deadline() {
        let mut h = TimerHeap::new();
        h.schedule("a", t(10));
        h.schedule("a", t(50));
        assert_eq!(h.next_deadline(), Some(t(50)));
        assert!(h.pop_due(t(10)).is_empty());
        assert_eq!(h.pop_due(t(50)), vec!["a"]);
        assert!(h.is_empty());
    }

    #[test]
    fn cancel_removes_and_stale_entries_stay_bounded() {
        let mut h = TimerHeap::new();
        h.schedule("a", t(10));
        h.cancel(&"a");
        assert_eq!(h.next_deadline(), None);
        for i in 0..10_000 {
            h.schedule("x", t(i));
        }
        assert!(h.heap.len() < 200, "heap grew to {}", h.heap.len());
        assert_eq!(h.pop_due(t(1_000_000)), vec!["x"]);
    }
}
