//! One timer heap for every credential.
//!
//! Timers are addressed by a dense `u32` slot (the engine gives each
//! credential an index and each kind of job a slot of it). A binary min-heap
//! holds `(deadline, generation, slot)`; rescheduling a slot does not search
//! the heap: it bumps the slot's generation and pushes a new entry, and stale
//! entries are dropped when they reach the top. Memory stays at about two
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

/// A slot's current deadline; `generation == 0` means no timer.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    at: i64,
    generation: u32,
}

#[derive(Debug, Default)]
pub struct TimerHeap {
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
        if s.generation == 0 {
            self.live += 1;
        }
        // Never 0 (= no timer). A wrapped generation could only match a
        // stale entry that survived 2^32 reschedules of its slot, and
        // `compact` keeps stale entries far fewer than that.
        s.generation = s.generation.wrapping_add(1).max(1);
        s.at = millis(at);
        self.heap.push(Reverse((s.at, s.generation, slot)));
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
            && s.generation != 0
        {
            s.generation = 0;
            self.live -= 1;
        }
    }

    pub fn deadline(&self, slot: u32) -> Option<DateTime<Utc>> {
        self.slots
            .get(slot as usize)
            .filter(|s| s.generation != 0)
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
                    let Reverse((_, _, slot)) = self.heap.pop().expect("peeked");
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

    fn is_live(&self, generation: u32, slot: u32) -> bool {
        self.slots
            .get(slot as usize)
            .is_some_and(|s| s.generation == generation)
    }

    fn drop_stale_top(&mut self) {
        while let Some(Reverse((_, generation, slot))) = self.heap.peek() {
            if self.is_live(*generation, *slot) {
                return;
            }
            self.heap.pop();
        }
    }

    fn compact(&mut self) {
        let slots = &self.slots;
        self.heap.retain(|Reverse((_, g, s))| {
            slots.get(*s as usize).is_some_and(|l| l.generation == *g)
        });
        // A burst (every credential due at once) leaves capacity behind.
        let len = self.heap.len();
        if self.heap.capacity() > 2 * len + 1024 {
            self.heap.shrink_to(len + len / 4 + 64);
        }
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
    fn deadlines_keep_millisecond_precision() {
        let mut h = TimerHeap::new();
        let at = DateTime::from_timestamp_millis(1_800_000_000_123).unwrap();
        h.schedule(0, at);
        assert_eq!(h.deadline(0), Some(at));
        assert!(h.pop_due(at - chrono::Duration::milliseconds(1)).is_empty());
        assert_eq!(h.pop_due(at), vec![0]);
    }
}
