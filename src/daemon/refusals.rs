//! Refusals on the agents' socket are audited, but any local user can ask
//! to be refused as fast as the daemon answers, and each audit record is
//! fsynced and hash-chained: unbounded, that fills the state volume and
//! buries the real records. So refusals are audited per peer uid and event
//! at most [`AUDITED_PER_WINDOW`] per [`WINDOW`] (the first of each kind
//! always is); the rest are counted, and one summary record says how many
//! more there were when the window ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::audit::{Actor, AuditEvent, Outcome};
use crate::rotation::Engine;

/// Refusals audited one by one, per uid and event, in each window.
pub(super) const AUDITED_PER_WINDOW: u32 = 10;
/// The window over which refusals are counted.
pub(super) const WINDOW: Duration = Duration::from_secs(60);
/// Windows kept before ended ones are pruned (uids are few; this bounds
/// the map whatever happens).
const MAX_TRACKED: usize = 4096;

/// What to do with one refusal.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Audit it.
    Record,
    /// Count it only; when `summary_at` is set, the caller arranges for
    /// [`Refusals::take`] at that time and audits the count.
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
pub(super) struct Refusals {
    windows: Mutex<HashMap<(u32, &'static str), Window>>,
}

impl Refusals {
    pub(super) fn check(&self, uid: u32, event: &'static str, now: Instant) -> Verdict {
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
    pub(super) fn take(&self, uid: u32, event: &'static str) -> u64 {
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

/// Audits the refusal `ev` of a peer of `uid` through `engine`, at most
/// [`AUDITED_PER_WINDOW`] per uid and event in each window; the rest are
/// counted and summarized in one record when the window ends. True when
/// this one was audited (log it then).
pub(super) async fn audit(
    refusals: &Arc<Refusals>,
    engine: &Engine,
    uid: u32,
    event: &'static str,
    ev: AuditEvent,
) -> bool {
    match refusals.check(uid, event, Instant::now()) {
        Verdict::Record => {
            if let Err(e) = engine.record(ev).await {
                tracing::error!(error = %e, event, "cannot audit a refusal");
            }
            true
        }
        Verdict::Count { summary_at: None } => false,
        Verdict::Count {
            summary_at: Some(at),
        } => {
            let (engine, refusals, actor) = (engine.clone(), Arc::clone(refusals), ev.actor);
            tokio::spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                let more = refusals.take(uid, event);
                let mut summary = AuditEvent::new(event, actor, Outcome::Refused);
                summary.detail = Some(format!(
                    "and {more} more refusals from uid {uid} in the last {}, not recorded one by one",
                    humantime::format_duration(WINDOW)
                ));
                if let Err(e) = engine.record(summary).await {
                    tracing::error!(error = %e, event, "cannot audit a summary of refusals");
                }
            });
            false
        }
    }
}

/// The task manager's records: its policy refusals (`task.refused`, asked
/// for by an agent as often as it likes) are audited like the sockets'
/// refusals, the rest as they come.
pub(super) struct TaskAudit {
    pub engine: Engine,
    pub refusals: Arc<Refusals>,
}

#[async_trait::async_trait]
impl crate::tasks::manager::TaskRecorder for TaskAudit {
    async fn record(&self, ev: AuditEvent) {
        if let (Actor::Peer { uid, .. }, Outcome::Refused) = (&ev.actor, ev.outcome)
            && ev.event == "task.refused"
        {
            let uid = *uid;
            audit(&self.refusals, &self.engine, uid, "task.refused", ev).await;
            return;
        }
        let name = ev.event.clone();
        if let Err(e) = self.engine.record(ev).await {
            tracing::error!(event = %name, error = %e, "cannot write to the audit log");
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
