//! Refusals on the agents' socket are audited, but any local user can ask
//! to be refused as fast as the daemon answers, and each audit record is
//! fsynced and hash-chained: unbounded, that fills the state volume and
//! buries the real records. So refusals are audited per peer uid and event
//! at most [`crate::api::refusals::AUDITED_PER_WINDOW`] per [`WINDOW`]
//! ([`Refusals`]); one summary record says how many more there were when
//! the window ends.

use std::sync::Arc;
use std::time::Instant;

pub(super) use crate::api::refusals::{Refusals, Verdict, WINDOW};
use crate::audit::{Actor, AuditEvent, Outcome};
use crate::rotation::Engine;

/// The key of refusals of unauthenticated requests on the HTTP listener
/// (the token service's), which has no peer uid: all of them share one
/// allowance. Not a uid (`(uid_t)-1`).
pub(super) const HTTP_LISTENER: u32 = u32::MAX;

/// Who a summary counts the refusals of.
fn whose(uid: u32) -> String {
    if uid == HTTP_LISTENER {
        "unauthenticated clients of the HTTP listener".to_owned()
    } else {
        format!("uid {uid}")
    }
}

/// Audits the refusal `ev` of a peer of `uid` through `engine`, at most
/// [`crate::api::refusals::AUDITED_PER_WINDOW`] per uid and event in each
/// window; the rest are counted and summarized in one record when the
/// window ends. True when this one was audited (log it then).
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
            let summaries = refusals.summaries.clone();
            summaries.spawn(async move {
                // At the window's end, or at once when the daemon stops.
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = refusals.stopping.cancelled() => {}
                }
                let over = WINDOW.saturating_sub(at.saturating_duration_since(Instant::now()));
                let over = std::time::Duration::from_secs(over.as_secs().max(1));
                let more = refusals.take(uid, event);
                let mut summary = AuditEvent::new(event, actor, Outcome::Refused);
                summary.detail = Some(format!(
                    "and {more} more refusals from {} in the last {}, not recorded one by one",
                    whose(uid),
                    humantime::format_duration(over)
                ));
                if let Err(e) = engine.record(summary).await {
                    tracing::error!(error = %e, event, "cannot audit a summary of refusals");
                }
            });
            false
        }
    }
}

/// Tells the summaries still waiting for their window's end now: the
/// daemon stops, and the audit log closes after this (bounded: a stuck
/// writer costs the summaries, not the stop).
pub(super) async fn flush(refusals: &Refusals) {
    refusals.stopping.cancel();
    refusals.summaries.close();
    if tokio::time::timeout(std::time::Duration::from_secs(5), refusals.summaries.wait())
        .await
        .is_err()
    {
        tracing::warn!("summaries of refusals not audited before the stop");
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
