//! Which failed attempts of a revocation item are audited. An item that
//! cannot be done (a symlink the agent planted, a target that stays down)
//! is retried for as long as it takes, at most every `retry.max_delay`;
//! one `revocation.failed` record per attempt buried the audit log (610 in
//! ten minutes at a 2 s cap). So a failure is audited when it is the
//! item's first, or its error is one not audited for the item in the last
//! [`SUMMARY_EVERY`], and otherwise once per [`SUMMARY_EVERY`] with how many
//! attempts failed since the last record. "Not audited lately" rather than
//! "changed": a server that is down answers "connection closed" and
//! "connection reset" by turns, and each turn was a change (a record per
//! attempt again).
//! Every attempt is still persisted (status shows the count and the last
//! error), and logged: as a warning when it is audited, at debug level
//! otherwise. Kept in memory, and seeded at a start with each
//! pending item's persisted last error, as audited then ([`Quiet::seed`]):
//! black-box finding, an error that stayed the same was audited again at
//! every restart (13 times in 14 minutes of restarts).

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};

use crate::model::AgentId;

/// At most one record per item in this long while its error stays the same.
pub(super) const SUMMARY_EVERY: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// What to do with one failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Audit it; `Some(n)`: `n` earlier failed attempts were not (their
    /// count goes in the record).
    Audit(Option<u32>),
    /// Persist and log it only.
    Quiet,
}

/// The most distinct errors of one item remembered as audited lately.
const RECENT_ERRORS: usize = 8;

#[derive(Debug)]
struct Last {
    /// The errors audited for the item since the last summary, newest last
    /// (at most [`RECENT_ERRORS`]).
    recent: Vec<String>,
    audited_at: DateTime<Utc>,
    /// Failed attempts since the last audited one.
    unaudited: u32,
    /// A "revoked again" record was written since the last audited failure.
    again_audited: bool,
    /// Seeded at a start from the state, no failure seen in this process.
    seeded: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Quiet(Mutex<HashMap<(AgentId, String), Last>>);

impl Quiet {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(AgentId, String), Last>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A failed attempt of `item` of `agent` with `error`, at `now`.
    pub(crate) fn failed(
        &self,
        agent: &AgentId,
        item: &str,
        error: &str,
        now: DateTime<Utc>,
    ) -> Verdict {
        let mut map = self.map();
        let key = (agent.clone(), item.to_owned());
        let fresh = |unaudited| Last {
            recent: vec![error.to_owned()],
            audited_at: now,
            unaudited,
            again_audited: false,
            seeded: false,
        };
        if let Some(last) = map.get_mut(&key) {
            last.seeded = false;
        }
        match map.get_mut(&key) {
            Some(last) if now - last.audited_at >= SUMMARY_EVERY => {
                let skipped = last.unaudited;
                *last = fresh(0);
                Verdict::Audit((skipped > 0).then_some(skipped))
            }
            Some(last) if last.recent.iter().any(|e| e == error) => {
                last.unaudited += 1;
                Verdict::Quiet
            }
            Some(last) => {
                let skipped = last.unaudited;
                if last.recent.len() == RECENT_ERRORS {
                    last.recent.remove(0);
                }
                last.recent.push(error.to_owned());
                last.unaudited = 0;
                last.again_audited = false;
                Verdict::Audit((skipped > 0).then_some(skipped))
            }
            None => {
                map.insert(key, fresh(0));
                Verdict::Audit(None)
            }
        }
    }

    /// Whether the repeated revocation of `item` (it did not verify last
    /// time) is audited, and its note: once after each audited failure,
    /// and on the first round after a restart (no failure seen in this
    /// process: the daemon may have stopped between an audited
    /// verification and its write to the state, so "not verified yet"
    /// would contradict the audit log).
    pub(super) fn again(&self, agent: &AgentId, item: &str) -> Option<&'static str> {
        match self.map().get_mut(&(agent.clone(), item.to_owned())) {
            Some(last) if last.again_audited => None,
            Some(last) if last.seeded => {
                last.again_audited = true;
                Some("again after a restart: revoked before it, its verification not in the state")
            }
            Some(last) => {
                last.again_audited = true;
                Some("again: not verified yet")
            }
            None => {
                Some("again after a restart: revoked before it, its verification not in the state")
            }
        }
    }

    /// At a start: `item` of `agent` failed last with `error` (persisted),
    /// taken as audited at `now`, so that the same error is not audited
    /// again before [`SUMMARY_EVERY`] has passed.
    pub(crate) fn seed(&self, agent: &AgentId, item: &str, error: &str, now: DateTime<Utc>) {
        self.map()
            .entry((agent.clone(), item.to_owned()))
            .or_insert_with(|| Last {
                recent: vec![error.to_owned()],
                audited_at: now,
                unaudited: 0,
                again_audited: false,
                seeded: true,
            });
    }

    /// `item` is done (revoked or verified): a later failure is a first one.
    pub(crate) fn done(&self, agent: &AgentId, item: &str) {
        self.map().remove(&(agent.clone(), item.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Black-box finding: the same error was audited again at every
    /// restart. Seeded from the state, it waits its hour; another error
    /// is still audited at once, and the first "again" after the start
    /// says it follows a restart.
    #[test]
    fn a_seeded_error_is_not_audited_again_before_its_hour() {
        let q = Quiet::default();
        let a = AgentId::new("bot").unwrap();
        let t0 = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let at = |s: i64| t0 + chrono::TimeDelta::seconds(s);
        q.seed(&a, "tasks", "2 task(s) not ended", at(0));
        assert!(q.again(&a, "tasks").unwrap().contains("after a restart"));
        assert_eq!(
            q.failed(&a, "tasks", "2 task(s) not ended", at(5)),
            Verdict::Quiet
        );
        assert_eq!(
            q.failed(&a, "tasks", "2 task(s) not ended", at(3600)),
            Verdict::Audit(Some(1))
        );
        q.seed(&a, "db/target", "connection refused", at(0));
        assert_eq!(
            q.failed(&a, "db/target", "timed out", at(10)),
            Verdict::Audit(None)
        );
        // A seed never overrides what this process saw.
        q.seed(&a, "db/target", "connection refused", at(20));
        assert_eq!(
            q.failed(&a, "db/target", "other", at(30)),
            Verdict::Audit(None)
        );
    }

    #[test]
    fn the_first_failure_a_changed_error_and_an_hourly_summary_are_audited() {
        let q = Quiet::default();
        let a = AgentId::new("bot").unwrap();
        let t0 = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let at = |s: i64| t0 + chrono::TimeDelta::seconds(s);
        assert_eq!(
            q.failed(&a, "db/sink:0", "symlink", at(0)),
            Verdict::Audit(None)
        );
        assert_eq!(q.again(&a, "db/sink:0"), Some("again: not verified yet"));
        // No failure seen in this process: the first round after a restart.
        assert!(
            q.again(&a, "db/other")
                .is_some_and(|n| n.starts_with("again after a restart"))
        );
        for s in 1..=600 {
            assert_eq!(q.failed(&a, "db/sink:0", "symlink", at(s)), Verdict::Quiet);
            assert_eq!(q.again(&a, "db/sink:0"), None);
        }
        // Another item is on its own.
        assert_eq!(
            q.failed(&a, "db/target", "down", at(601)),
            Verdict::Audit(None)
        );
        // The error changed: audited, with the count of those not.
        assert_eq!(
            q.failed(&a, "db/sink:0", "not a directory", at(602)),
            Verdict::Audit(Some(600))
        );
        assert!(q.again(&a, "db/sink:0").is_some());
        assert_eq!(
            q.failed(&a, "db/sink:0", "not a directory", at(603)),
            Verdict::Quiet
        );
        // Black-box finding: a server that is down answers two errors by
        // turns; each turn is not a change worth a record.
        for s in 604..=700 {
            let e = if s % 2 == 0 {
                "symlink"
            } else {
                "not a directory"
            };
            assert_eq!(q.failed(&a, "db/sink:0", e, at(s)), Verdict::Quiet, "{s}");
        }
        // A third error is new, then quiet too.
        assert_eq!(
            q.failed(&a, "db/sink:0", "no space", at(701)),
            Verdict::Audit(Some(98))
        );
        assert_eq!(
            q.failed(&a, "db/sink:0", "symlink", at(702)),
            Verdict::Quiet
        );
        // An hour after the last record: a summary.
        assert_eq!(
            q.failed(&a, "db/sink:0", "not a directory", at(701 + 3600)),
            Verdict::Audit(Some(1))
        );
        // Done, then failing again: a first failure.
        q.done(&a, "db/sink:0");
        assert_eq!(
            q.failed(&a, "db/sink:0", "not a directory", at(4300)),
            Verdict::Audit(None)
        );
    }
}
