//! Rotation health: the alert conditions that are true now about rotation
//! itself, read from the engine's live view (never from state).
//!
//! - `KeyturnRotationFailing`: `failures_warning` rotations in a row failed
//!   (warning), `failures_critical` (critical). It began at the first
//!   failure of the run (`failing_since`, persisted with the count), and it
//!   is gone once a rotation succeeds. On a followed credential the same
//!   counts apply to its failed checks (a poll or nudged check that could
//!   not read the vault, a delivery that failed), counted at the pace of a
//!   rotation's failures (`follow::count_check_failure`), and the alert
//!   carries `mode="follow"`; it is gone once a check succeeds.
//! - `KeyturnCredentialExpiring` (critical): less than
//!   `expiry_critical_before` is left before the current version reaches
//!   the credential's `max_age`. Began at `max_age - lead` after the
//!   version was delivered.
//! - `KeyturnCredentialExpired` (critical): the current version is older
//!   than `max_age`. It replaces the expiring alert.
//! - `KeyturnAckHoldouts` (warning): consumers that had not acknowledged
//!   the current version when its grace period ended (the previous version
//!   was retired under them). Began at the grace deadline; gone once they
//!   acknowledge or a newer version is delivered.
//!
//! Every `since` is derived from persisted facts (the delivery time of the
//! current version, the first failure of a run), so it is the same from
//! one evaluation to the next and after a restart.
//!
//! Followed credentials (`mode = "follow"`) do not rotate here, but a
//! follower that cannot follow leaves its agents on a version the rotator
//! will retire: it raises the failing alert like a rotation, labelled
//! `mode="follow"` (every alert of a followed credential is), and no
//! holdout alert (its consumers are reported, never waited for). `max_age`
//! works on them, counted from when this keyturn delivered the version, so
//! a follower notices a rotator that stopped; a follower has no period, so
//! `expiry_critical_before = "period"` gives it only the expired alert.
//!
//! Cheap by design, because the alert loop asks every few seconds and
//! after rotations: one pass over the catalog with one lookup in the live
//! table per credential, nothing allocated for a healthy credential, and
//! no pass at all while nothing changed ([`HealthCache`]): the answer
//! depends on the live table, the awaited acks, the retired agents and the
//! catalog, and on the clock only through `next_change`.

use chrono::{DateTime, Utc};

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use super::catalog::{Catalog, CredEntry};
use super::engine::{Engine, Inner, chrono_dur};
use super::table::LiveRow;
use crate::alerts::{Alert, ConditionSource, Conditions, Severity};
use crate::config::AlertRules;

/// The `alertname` of each rotation-health condition.
pub const ROTATION_FAILING: &str = "KeyturnRotationFailing";
pub const CREDENTIAL_EXPIRING: &str = "KeyturnCredentialExpiring";
pub const CREDENTIAL_EXPIRED: &str = "KeyturnCredentialExpired";
pub const ACK_HOLDOUTS: &str = "KeyturnAckHoldouts";

impl Engine {
    /// The rotation-health conditions true at `now`, and the next time one
    /// starts by the clock alone (a credential reaching the expiring
    /// threshold or its `max_age`).
    pub fn health_conditions(&self, now: DateTime<Utc>) -> Conditions {
        self.inner.health_conditions(now)
    }
}

/// The engine's rotation health as a [`ConditionSource`] for the alert loop.
#[derive(Clone)]
pub struct RotationHealth(pub Engine);

impl ConditionSource for RotationHealth {
    fn conditions(&self, now: DateTime<Utc>) -> Conditions {
        self.0.health_conditions(now)
    }
}

/// The last answer of the health pass, and what it was computed from.
pub(super) struct HealthCache {
    /// [`Inner::changes`] read before the pass.
    changes: u64,
    /// Weak: compared, never used, and not keeping a replaced catalog's
    /// entries alive (its address is not reused while this is held).
    catalog: Weak<Catalog>,
    conditions: Conditions,
}

impl Inner {
    pub(super) fn health_conditions(&self, now: DateTime<Utc>) -> Conditions {
        let catalog = self.catalog();
        // Read before the locks: a change made after this moves the count
        // again, so the next call passes anew.
        let changes = self.changes.load(Ordering::Acquire);
        let mut cache = self.health_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.as_ref()
            && c.changes == changes
            && std::ptr::eq(c.catalog.as_ptr(), Arc::as_ptr(&catalog))
            && c.conditions.next_change.is_none_or(|t| now < t)
        {
            return c.conditions.clone();
        }
        let conditions = self.health_pass(&catalog, now);
        *cache = Some(HealthCache {
            changes,
            catalog: Arc::downgrade(&catalog),
            conditions: conditions.clone(),
        });
        conditions
    }

    fn health_pass(&self, catalog: &Catalog, now: DateTime<Utc>) -> Conditions {
        let rules = catalog.config.alert_rules;
        let mut out = Conditions::default();
        // Lock order as in `status`: the live table, then the acks. Read
        // only: these locks do not count as changes.
        let live = self.table.lock().unwrap_or_else(|p| p.into_inner());
        for entry in catalog.creds.values() {
            // A decommissioned agent's credentials are not rotated any more:
            // neither their failures nor their age are a rotation problem
            // (the revocation SLA has alerts of its own).
            if self.is_retired(&entry.key().agent) {
                continue;
            }
            let cfg = &entry.policy;
            let Some(l) = live.get(entry.key()) else {
                continue;
            };
            // Destroyed by its rotator: nothing of it is live to age.
            if l.follow_revoked && l.row.as_ref().is_none_or(|r| r.consecutive_failures == 0) {
                continue;
            }
            let Some(row) = l.row.as_ref() else {
                continue;
            };
            if row.consecutive_failures >= rules.failures_warning.max(1) {
                out.firing.push(failing(entry, row, &rules, now));
            }
            if let (Some(max_age), Some(last)) = (cfg.max_age, row.last_rotated_at) {
                age_conditions(entry, row, last, max_age, &rules, now, &mut out);
            }
        }
        if rules.holdouts {
            let acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
            for (key, awaited) in acks.iter() {
                if !awaited.retired_with_holdouts {
                    continue;
                }
                let mut outstanding = awaited.outstanding().peekable();
                if outstanding.peek().is_none() {
                    continue;
                }
                let Some(entry) = catalog.creds.get(key) else {
                    continue;
                };
                if self.is_retired(&key.agent) {
                    continue;
                }
                let Some(delivered) = live
                    .get(key)
                    .and_then(|l| l.row.as_ref())
                    .and_then(|r| r.last_rotated_at)
                else {
                    continue;
                };
                if entry.policy.follow.is_some() {
                    continue;
                }
                let names: Vec<String> = outstanding.map(|c| c.label()).collect();
                let since = delivered
                    .checked_add_signed(chrono_dur(entry.policy.grace))
                    .unwrap_or(delivered);
                out.firing.push(alert(
                    entry,
                    ACK_HOLDOUTS,
                    Severity::Warning,
                    since,
                    format!(
                        "{}: {} consumer(s) never acknowledged version {}",
                        entry.key(),
                        names.len(),
                        awaited.version
                    ),
                    format!(
                        "The grace period of version {} of {} ended at {since} with these consumers not having acknowledged it: {}. The previous version was retired, so they may still be using a value that no longer works. Check that they reloaded, then acknowledge with `keyturn ack`.",
                        awaited.version,
                        entry.key(),
                        names.join(", ")
                    ),
                ));
            }
        }
        out
    }
}

fn failing(entry: &CredEntry, row: &LiveRow, rules: &AlertRules, now: DateTime<Utc>) -> Alert {
    let n = row.consecutive_failures;
    let severity = match rules.failures_critical {
        Some(c) if n >= c => Severity::Critical,
        _ => Severity::Warning,
    };
    // Only rows written before failures had a start lack one; the
    // migration gave those a time, so this is a fallback of last resort.
    let since = row.failing_since.or(row.last_rotated_at).unwrap_or(now);
    let last_error = row.last_error.as_deref().unwrap_or("(not recorded)");
    let key = entry.key();
    // One failure (a `failures_warning` of 1) reads as one, not "1 times".
    let (checks, rotations, times) = if n == 1 {
        (
            "a check".to_owned(),
            "a rotation".to_owned(),
            "once".to_owned(),
        )
    } else {
        (
            format!("{n} checks in a row"),
            format!("{n} rotations in a row"),
            format!("{n} times in a row"),
        )
    };
    let (summary, description) = if entry.policy.follow.is_some() {
        (
            format!("{key}: following is failing, {checks} failed"),
            format!(
                "Following {key} (another keyturn rotates it) has failed {times} since {since}: this host cannot read the credential's vault or deliver what it read, so its agents keep the version they have, which stops working once the rotator retires it. keyturn keeps polling. Last error: {last_error}. See `keyturn status` on this host; a check that succeeds resolves this alert."
            ),
        )
    } else {
        (
            format!("{key}: {rotations} failed"),
            format!(
                "Rotating {key} has failed {times} since {since}; keyturn keeps retrying. Last error: {last_error}. See `keyturn status` and the audit log; a success resolves this alert."
            ),
        )
    };
    alert(
        entry,
        ROTATION_FAILING,
        severity,
        since,
        summary,
        description,
    )
}

/// The expiring and expired conditions of a credential whose current
/// version was delivered at `last`, and when the next of them starts.
fn age_conditions(
    entry: &CredEntry,
    row: &LiveRow,
    last: DateTime<Utc>,
    max_age: std::time::Duration,
    rules: &AlertRules,
    now: DateTime<Utc>,
    out: &mut Conditions,
) {
    // An absurd `max_age` (centuries) never expires rather than overflowing.
    let Some(expires) = last.checked_add_signed(chrono_dur(max_age)) else {
        return;
    };
    let version = row.current_version.map_or_else(
        || "the current version".to_owned(),
        |v| format!("version {v}"),
    );
    let max_age_text = humantime::format_duration(max_age);
    let follow_note = if entry.policy.follow.is_some() {
        " This credential is followed: another keyturn rotates it, and this host has not seen a newer version."
    } else {
        ""
    };
    if now >= expires {
        out.firing.push(alert(
            entry,
            CREDENTIAL_EXPIRED,
            Severity::Critical,
            expires,
            format!("{}: {version} is older than max_age ({max_age_text})", entry.key()),
            format!(
                "{version} of {}, delivered at {last}, reached its max_age of {max_age_text} at {expires}.{follow_note} Rotate it now (`keyturn rotate`) or fix what stops rotation (`keyturn status`, the audit log).",
                entry.key()
            ),
        ));
        return;
    }
    let lead = rules
        .expiry_critical_before
        .for_period(entry.policy.rotation_period());
    let expiring_at = lead.map(|l| {
        expires
            .checked_sub_signed(chrono_dur(l))
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    });
    match (expiring_at, lead) {
        (Some(at), Some(lead)) if now >= at => {
            let lead = humantime::format_duration(lead);
            out.firing.push(alert(
                entry,
                CREDENTIAL_EXPIRING,
                Severity::Critical,
                at,
                format!(
                    "{}: {version} expires at {expires}, less than {lead} from now",
                    entry.key()
                ),
                format!(
                    "{version} of {}, delivered at {last}, reaches its max_age of {max_age_text} at {expires}; less than {lead} is left.{follow_note} Rotate it (`keyturn rotate`) or fix what stops rotation (`keyturn status`, the audit log) before then.",
                    entry.key()
                ),
            ));
            next_change(out, expires);
        }
        (Some(at), _) => next_change(out, at),
        (None, _) => next_change(out, expires),
    }
}

fn next_change(out: &mut Conditions, at: DateTime<Utc>) {
    if out.next_change.is_none_or(|n| at < n) {
        out.next_change = Some(at);
    }
}

fn alert(
    entry: &CredEntry,
    name: &str,
    severity: Severity,
    since: DateTime<Utc>,
    summary: String,
    description: String,
) -> Alert {
    Alert {
        name: name.to_owned(),
        severity,
        agent: Some(entry.key().agent.to_string()),
        credential: Some(entry.key().credential.to_string()),
        tenant: Some(entry.agent.tenant.clone()),
        tier: Some(entry.agent.tier.clone()),
        mode: entry.policy.follow.is_some().then(|| "follow".to_owned()),
        summary,
        description,
        since,
    }
}
