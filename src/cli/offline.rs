//! What `status`, `tasks` and `decommission` show from the state and the
//! task store when the daemon is not running. They need only the state
//! directory, so that `status` still shows what is stored when the config
//! does not validate (a bad config is a common reason the daemon is down);
//! the config, when valid, adds each credential's vault and schedule.

use std::path::Path;

use crate::api::protocol::StatusRow;
use crate::config::{Config, CredentialConfig};
use crate::state::{SqliteStore, StateStore};

/// The tasks not ended, from the task store, when the daemon is not running.
pub(super) fn offline_tasks(state_dir: &Path) -> Option<Vec<crate::api::protocol::TaskView>> {
    let dir = state_dir.join("tasks");
    match crate::tasks::store::TaskStore::open_read_only(&dir) {
        Ok(Some(store)) => match store.list(None, 0) {
            Ok(rows) => Some(
                rows.iter()
                    .map(crate::api::protocol::TaskView::of)
                    .collect(),
            ),
            Err(e) => {
                eprintln!("keyturn: {e}");
                None
            }
        },
        Ok(None) => Some(Vec::new()),
        Err(e) => {
            eprintln!("keyturn: {e}");
            None
        }
    }
}

/// The decommissions stored in the state database, with their items, when
/// the daemon is not running (none when it cannot be read).
pub(super) fn offline_decommissions(state_dir: &Path) -> Vec<crate::revocation::Decom> {
    let db = crate::daemon::state_db_in(state_dir);
    let Some(store) = db
        .exists()
        .then(|| SqliteStore::open_read_only(&db).ok())
        .flatten()
    else {
        return Vec::new();
    };
    stored_decommissions(&store)
}

/// Every decommission `store` holds, with its items.
fn stored_decommissions(store: &SqliteStore) -> Vec<crate::revocation::Decom> {
    store
        .decommissions()
        .unwrap_or_default()
        .into_iter()
        .map(|row| {
            let items = store.revocations(&row.agent).unwrap_or_default();
            crate::revocation::Decom { row, items }
        })
        .collect()
}

/// `status` with no daemon answering (`e` says why): the rows stored, and
/// the exit code once they are shown, or the exit code at once when there
/// is nothing stored to show. A config that does not validate is a likely
/// reason the daemon is down: its errors are printed first, as a warning,
/// and the state is shown anyway (from the state directory its `[daemon]`
/// table names, else the default), with exit 64.
pub(super) fn status_offline(
    client: &super::ClientConfig,
    path: &Path,
    e: &crate::api::client::ClientError,
) -> Result<(Vec<StatusRow>, u8), u8> {
    let state_dir = client.paths().state_dir;
    let (cfg, code) = match client {
        super::ClientConfig::Valid(cfg) => (Some(&**cfg), 0),
        super::ClientConfig::Invalid { errors, .. } => {
            eprint!("{errors}");
            eprintln!(
                "keyturn: warning: {} is INVALID ({} error(s) above): the daemon will not start with it",
                path.display(),
                errors.0.len()
            );
            (None, super::EXIT_USAGE)
        }
    };
    match offline_status(&state_dir, cfg) {
        Some(rows) => {
            eprintln!(
                "keyturn: {e}; showing the state stored in {}{}",
                state_dir.display(),
                if cfg.is_none() {
                    " (as stored: the config's vaults and schedules are not known)"
                } else {
                    ""
                }
            );
            Ok((rows, code))
        }
        None if cfg.is_some() => {
            eprintln!("keyturn: {e}");
            Err(super::EXIT_UNAVAILABLE)
        }
        None => {
            if crate::daemon::state_db_in(&state_dir).exists() {
                eprintln!("keyturn: {e}");
            } else {
                eprintln!("keyturn: {e}; no state database in {}", state_dir.display());
            }
            Err(super::EXIT_USAGE)
        }
    }
}

/// Status from the state database when the daemon is not running: the
/// credentials of `cfg`, or without a valid config every credential the
/// state holds (their vault shown as `?`, their next time as stored).
pub(super) fn offline_status(state_dir: &Path, cfg: Option<&Config>) -> Option<Vec<StatusRow>> {
    let db = crate::daemon::state_db_in(state_dir);
    if !db.exists() {
        return None;
    }
    // Exists but cannot be read: say why, or the operator sees only that
    // no daemon answered.
    let unreadable = |e: &dyn std::fmt::Display| {
        eprintln!(
            "keyturn: cannot read the stored state: {e}. Permission denied: run this as root or the daemon's user; \
             a damaged database (\"malformed\"): restore {} from a backup",
            db.display()
        )
    };
    let store = SqliteStore::open_read_only(&db)
        .map_err(|e| unreadable(&e))
        .ok()?;
    let snapshot = store.snapshot().map_err(|e| unreadable(&e)).ok()?;
    let decoms = stored_decommissions(&store);
    // An agent decommissioned (or being so) is not rotated any more.
    let leaving: std::collections::HashMap<&crate::model::AgentId, &'static str> = decoms
        .iter()
        .map(|d| {
            let label = if d.complete() {
                "decommissioned"
            } else {
                "decommissioning"
            };
            (&d.row.agent, label)
        })
        .collect();
    let credentials: Vec<(&crate::model::CredentialKey, Option<&CredentialConfig>)> = match cfg {
        Some(cfg) => cfg.credentials().map(|(_, c)| (&c.key, Some(c))).collect(),
        None => snapshot
            .credentials
            .iter()
            .map(|r| &r.key)
            .chain(snapshot.unfinished.iter().map(|r| &r.key))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|key| (key, None))
            .collect(),
    };
    let followed = |c: Option<&CredentialConfig>| c.is_some_and(|c| c.follow.is_some());
    let mut rows: Vec<StatusRow> = credentials
        .into_iter()
        .map(|(key, c)| {
            let row = snapshot.credentials.iter().find(|r| r.key == *key);
            // A decommissioned agent's rotations are over, whatever step
            // they stopped at.
            let unfinished = snapshot
                .unfinished
                .iter()
                .find(|r| r.key == *key)
                .filter(|_| !leaving.contains_key(&key.agent))
                // Waiting to retire after a first version: nothing to
                // retire, nothing to show.
                .filter(|r| {
                    r.step != crate::rotation::Step::Retire || r.previous_version.is_some()
                });
            let (awaiting_ack, holdouts) = offline_acks(&snapshot, key);
            // A `keyturn rotate` stored (waiting for the current version's
            // acks, or not begun when the daemon stopped): shown as asked
            // for, which it resumes as after a start, not as the
            // retirement it waits on.
            let requested = !followed(c)
                && !leaving.contains_key(&key.agent)
                && snapshot.requests.iter().any(|q| q.key == *key);
            // A followed credential whose rotator destroyed it: the version
            // it delivered last is recorded retired (see `rotation::follow`).
            let revoked = followed(c)
                && row.and_then(|r| r.current_version).is_some_and(|cv| {
                    store.versions(key).is_ok_and(|vs| {
                        vs.iter()
                            .any(|v| v.version == cv && v.stage == crate::model::Stage::Retired)
                    })
                });
            // Once promoted (the rotation is at its delivery), the new
            // version is current in the vault, as the daemon shows it
            // (black-box finding: offline status showed the one before).
            let version = unfinished
                .filter(|r| r.step == crate::rotation::Step::Deliver)
                .map(|r| r.version)
                .or_else(|| row.and_then(|r| r.current_version));
            StatusRow {
                agent: key.agent.clone(),
                credential: key.credential.clone(),
                vault: c.map_or_else(|| "?".to_owned(), CredentialConfig::vault_label),
                version,
                stage: version.map(|_| {
                    if revoked {
                        crate::api::protocol::ShownStage::Revoked
                    } else {
                        crate::api::protocol::ShownStage::Current
                    }
                }),
                last_rotated: row.and_then(|r| r.last_rotated_at),
                next_due: offline_next_due(c, row, unfinished)
                    .filter(|_| !leaving.contains_key(&key.agent)),
                state: match unfinished {
                    _ if let Some(label) = leaving.get(&key.agent) => (*label).into(),
                    // Not `rotating` (black-box finding: with no daemon,
                    // that read as rotations running): asked for, and it
                    // begins at the next start.
                    _ if requested => "requested".into(),
                    // Parked after a failed attempt, as the daemon shows it.
                    Some(r) if r.last_error.is_some() => "failed".into(),
                    Some(r) if r.step == crate::rotation::Step::Retire => "retiring".into(),
                    Some(_) => "interrupted".into(),
                    None if row.is_some_and(|r| r.consecutive_failures > 0) => "failed".into(),
                    None if revoked => "revoked".into(),
                    None => "stopped".into(),
                },
                step: if requested && !awaiting_ack.is_empty() {
                    Some("awaiting_ack".to_owned())
                } else if requested {
                    None
                } else {
                    unfinished.map(|r| r.step.to_string())
                },
                // The requested rotation has no id until it begins.
                rotation: unfinished.filter(|_| !requested).map(|r| r.id.to_string()),
                last_error: unfinished
                    .and_then(|r| r.last_error.clone())
                    .or_else(|| row.and_then(|r| r.last_error.clone())),
                awaiting_ack,
                holdouts,
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.agent, &a.credential).cmp(&(&b.agent, &b.credential)));
    crate::revocation::show_revoked(&mut rows, |agent| {
        decoms.iter().find(|d| d.row.agent == *agent)
    });
    Some(rows)
}

/// The consumers of `key`'s current version not heard from, offline:
/// awaited while the previous version still waits to be retired, also past
/// its grace deadline (the daemon is down: nothing retires it before it
/// starts; black-box finding, they were shown as holdouts "retired at the
/// grace deadline"); holdouts once it was retired without their ack.
/// (Only their names: how each acknowledges is the sink's, not in state.)
pub(super) fn offline_acks(
    snapshot: &crate::state::Snapshot,
    key: &crate::model::CredentialKey,
) -> (Vec<String>, Vec<String>) {
    let pending: Vec<&crate::state::AckRow> = snapshot
        .acks
        .iter()
        .filter(|a| a.key == *key && a.acked_at.is_none())
        .collect();
    let waiting = |a: &crate::state::AckRow| {
        snapshot.unfinished.iter().any(|r| {
            r.key == *key && r.step == crate::rotation::Step::Retire && r.version == a.version
        })
    };
    // A first version retires nothing: its consumers are never holdouts.
    let (awaited, holdouts): (Vec<_>, Vec<_>) = pending
        .into_iter()
        .partition(|a| a.version == 1 || waiting(a));
    let names =
        |rows: Vec<&crate::state::AckRow>| rows.into_iter().map(|a| a.consumer.clone()).collect();
    (names(awaited), names(holdouts))
}

/// When `c` is next due, offline: from the config as the daemon computes
/// it at start (a reload may have changed the schedule since the stored
/// time was written). A failed or unfinished rotation keeps the stored
/// time (its retry); a followed credential has none. Without the config
/// (it does not validate), the stored time.
pub(super) fn offline_next_due(
    c: Option<&CredentialConfig>,
    row: Option<&crate::state::CredentialRow>,
    unfinished: Option<&crate::state::RotationRow>,
) -> Option<chrono::DateTime<chrono::Utc>> {
    let row = row?;
    let Some(c) = c else {
        return row.next_due;
    };
    if c.follow.is_some() {
        return None;
    }
    let settled = unfinished.is_none_or(|r| r.step == crate::rotation::Step::Retire)
        && row.consecutive_failures == 0;
    match (row.last_rotated_at, row.current_version) {
        (Some(last), Some(version)) if settled => {
            // The first version is number 1 (as the scheduler has it).
            let offset = crate::schedule::jitter_offset(&c.key, c.jitter);
            c.schedule.next_due(last, offset, version == 1)
        }
        _ => row.next_due,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AgentId, CredentialId, CredentialKey, RotationId};
    use crate::state::{AckRow, RotationRow, Snapshot};

    /// Black-box finding: with the daemon down past the grace deadline,
    /// `status` listed the consumers as holdouts "retired at the grace
    /// deadline", though nothing had retired the previous version (the
    /// daemon does at its next start). Awaited until it is retired.
    #[test]
    fn consumers_are_awaited_until_the_previous_version_is_retired() {
        let key = CredentialKey {
            agent: AgentId::new("bot").unwrap(),
            credential: CredentialId::new("db").unwrap(),
        };
        let long_ago = chrono::Utc::now() - chrono::TimeDelta::hours(3);
        let retiring = RotationRow {
            id: RotationId::generate(),
            key: key.clone(),
            step: crate::rotation::Step::Retire,
            trigger: crate::rotation::Trigger::Manual,
            version: 2,
            vault_version: None,
            previous_version: Some(1),
            previous_vault_version: None,
            started_at: long_ago,
            updated_at: long_ago,
            // Past: the daemon was down at its grace deadline.
            retire_at: Some(long_ago + chrono::TimeDelta::hours(1)),
            attempts: 0,
            last_error: None,
            footprint: None,
            start_record_after: None,
        };
        let ack = AckRow {
            key: key.clone(),
            version: 2,
            consumer: "file:/run/a/db".into(),
            acked_at: None,
        };
        let mut snapshot = Snapshot {
            unfinished: vec![retiring],
            acks: vec![ack],
            ..Snapshot::default()
        };
        assert_eq!(
            offline_acks(&snapshot, &key),
            (vec!["file:/run/a/db".to_owned()], Vec::new())
        );
        // Retired (the rotation is done) without their ack: holdouts.
        snapshot.unfinished.clear();
        assert_eq!(
            offline_acks(&snapshot, &key),
            (Vec::new(), vec!["file:/run/a/db".to_owned()])
        );
    }
}
