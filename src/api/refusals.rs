//! How often a refusal is told. Anyone who can reach a socket or the HTTP
//! listener can ask to be refused as fast as the daemon answers; told one
//! by one, refusals would fill the state volume (the audit log: each record
//! fsynced and hash-chained) or drown the log (journald's rate limit then
//! drops the daemon's real warnings). So refusals are told per key (a peer
//! uid; 0 where there is none) and event at most [`AUDITED_PER_WINDOW`] per
//! [`WINDOW`] (the first of each kind always is); the rest are counted, and
//! the caller tells how many more there were when the window ends.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Refusals told one by one, per key and event, in each window.
pub(crate) const AUDITED_PER_WINDOW: u32 = 10;
/// The window over which refusals are counted.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// Windows kept before ended ones are pruned (uids are few; this bounds
/// the map whatever happens).
const MAX_TRACKED: usize = 4096;

/// What to do with one refusal.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Tell it (audit it, log it).
    Record,
    /// Count it only; when `summary_at` is set, the caller arranges for
    /// [`Refusals::take`] at that time and tells the count.
    Count { summary_at: Option<Instant> },
}

#[derive(Debug)]
struct Window {
    started: Instant,
    recorded: u32,
    /// Counted, not yet summarized.
    counted: u64,
    /// A summary is scheduled.
    summary_due: bool,
}

/// Per (uid, event) counts of refusals.
#[derive(Default)]
pub(crate) struct Refusals {
    windows: Mutex<HashMap<(u32, &'static str), Window>>,
    /// The summaries waiting for their window's end, and what tells them
    /// the daemon stops (they are told then, not lost).
    pub(crate) summaries: tokio_util::task::TaskTracker,
    pub(crate) stopping: tokio_util::sync::CancellationToken,
}

impl Refusals {
    pub(crate) fn check(&self, uid: u32, event: &'static str, now: Instant) -> Verdict {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() >= MAX_TRACKED {
            windows.retain(|_, w| w.summary_due || now.duration_since(w.started) < WINDOW);
        }
        let w = windows.entry((uid, event)).or_insert(Window {
            started: now,
            recorded: 0,
            counted: 0,
            summary_due: false,
        });
        if now.duration_since(w.started) >= WINDOW {
            w.started = now;
            w.recorded = 0;
        }
        if w.recorded < AUDITED_PER_WINDOW {
            w.recorded += 1;
            return Verdict::Record;
        }
        w.counted += 1;
        if w.summary_due {
            return Verdict::Count { summary_at: None };
        }
        w.summary_due = true;
        Verdict::Count {
            summary_at: Some(w.started + WINDOW),
        }
    }

    /// The refusals counted since the last summary (the summary is taken).
    pub(crate) fn take(&self, uid: u32, event: &'static str) -> u64 {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        match windows.get_mut(&(uid, event)) {
            Some(w) => {
                w.summary_due = false;
                std::mem::take(&mut w.counted)
            }
            None => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_refusals_is_audited_a_few_times_and_summarized() {
        let r = Refusals::default();
        let t0 = Instant::now();
        for _ in 0..AUDITED_PER_WINDOW {
            assert_eq!(r.check(65534, "ack.refused", t0), Verdict::Record);
        }
        // Another uid, another event: each has its own allowance.
        assert_eq!(r.check(65533, "ack.refused", t0), Verdict::Record);
        assert_eq!(r.check(65534, "task.refused", t0), Verdict::Record);
        assert_eq!(
            r.check(65534, "ack.refused", t0),
            Verdict::Count {
                summary_at: Some(t0 + WINDOW)
            }
        );
        for _ in 0..99 {
            assert_eq!(
                r.check(65534, "ack.refused", t0 + Duration::from_secs(1)),
                Verdict::Count { summary_at: None }
            );
        }
        assert_eq!(r.take(65534, "ack.refused"), 100);
        assert_eq!(r.take(65534, "ack.refused"), 0);
        // A new window audits again.
        let t1 = t0 + WINDOW;
        assert_eq!(r.check(65534, "ack.refused", t1), Verdict::Record);
    }
}
