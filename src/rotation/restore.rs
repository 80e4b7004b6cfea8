//! Files that went missing while the daemon was down come back at start.
//!
//! A delivered file can disappear without a rotation: `/run` is a tmpfs
//! emptied by every reboot, and an agent (or an operator) may delete its
//! file. Nothing would deliver the credential again before its next
//! rotation, a whole period later, while `status` said all was well. So at
//! start-up, before the scheduler, the follow loops or the sockets serve,
//! every credential whose current version was delivered gets that version
//! delivered again to each file sink whose file is gone: each as a job
//! that holds the credential (as after a reload, below), so nothing can
//! race an older version over a newer one, and the start waits for them
//! a bounded time only (a vault that never answers holds up its own
//! credentials, not the daemon).
//!
//! Not for an agent being or already decommissioned: its files were
//! retracted on purpose. The daemon calls this after the stored
//! decommissions have stopped their agents, and an agent whose config
//! declares a decommission (which may be decided while this runs) is left
//! out as well.
//!
//! The value is read back from the vault, as a rotation's deliver step
//! reads it; each restored file is audited as a `delivery` with the detail
//! `restored`. A failure is logged and leaves the file to the next
//! rotation: it does not stop the daemon from starting.
//!
//! Only file sinks: a webhook, signal or exec at start-up would tell an
//! agent of a version it already had.
//!
//! # After a reload
//! A reload can add a file sink (or move one to a new path) to a credential
//! that already has a version: nothing would write that file before the
//! next rotation either, and a file already at its path is one a removed
//! sink (or a credential renamed away) left: an older version, or another
//! credential's. So a sink a reload added is restored whatever is at its
//! path, and a reload runs the same check on every
//! credential, each as a job of its own ([`Job::Restore`]): it holds the
//! credential like a rotation or a retire does, so it never races one. A
//! reload that finds another job running leaves the restore to run right
//! after it (a rotation started before the reload delivers only to the
//! sinks it started with); a rotation asked for meanwhile starts when the
//! restore ends. A followed credential's restore holds the lock its
//! follow checks hold.

use std::sync::Arc;

use super::attempt::notice_for;
use super::catalog::{Catalog, CredEntry};
use super::engine::{Inner, chrono_dur};
use super::follow::FollowRestore;
use super::step::Step;
use super::table::Job;
use crate::audit::{Actor, AuditEvent, Outcome};
use crate::generators;
use crate::model::{PluginError, RotationId, Stage, VersionNo};
use crate::sinks::{Notice, Sink};
use crate::state::Write;

/// What a restore did: files restored, the audit head after its last
/// record, and whether a sink's delivery failed.
type Restored = (usize, Option<crate::state::AuditHead>, bool);
use crate::vaults::{Select, VaultItem};

/// How long the start waits for the restores of missing files (each a
/// job: one a vault holds up goes on in the background).
pub(super) const RESTORE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The sinks of `entry` whose files are gone.
pub(super) fn gone_sinks(entry: &CredEntry) -> Vec<Arc<dyn Sink>> {
    entry
        .sinks
        .iter()
        .filter(|s| file_gone(s.as_ref()))
        .cloned()
        .collect()
}

/// Whether the file a sink delivers to is gone: nothing at the path, a
/// bundle missing part of its pair, or something in its place that no
/// delivery writes (a symlink, a directory that is no bundle, a FIFO).
/// Black-box finding: a directory planted where a file was delivered was
/// taken for the file, so the agent had none until the next rotation,
/// with nothing audited and `status` saying all was well; "gone", the
/// restore's delivery is refused and audited as a failed delivery, naming
/// what is in the way.
fn file_gone(sink: &dyn Sink) -> bool {
    sink.delivered_path()
        .is_some_and(|p| match std::fs::symlink_metadata(p) {
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
            Ok(m) if m.is_file() => false,
            Ok(m) if m.is_dir() => {
                std::fs::symlink_metadata(p.join("..data")).is_err() || bundle_broken(p)
            }
            Ok(_) => true,
        })
}

/// Whether `dir`, a key pair bundle's directory (it holds `..data`), lost
/// part of the pair: `..data` gone, or a file of the current data without
/// its link beside `..data`, or a link that leads nowhere. Black-box
/// finding: a bundle whose `private.pem` was deleted stayed without it
/// across restarts and reloads, only a whole bundle gone was restored.
fn bundle_broken(dir: &std::path::Path) -> bool {
    let not_found = |r: std::io::Result<std::fs::Metadata>| matches!(r, Err(e) if e.kind() == std::io::ErrorKind::NotFound);
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return false;
    };
    if !meta.is_dir() {
        return false;
    }
    let data = dir.join("..data");
    if std::fs::symlink_metadata(&data).is_err() {
        // Not a bundle (a plain directory is refused by the delivery).
        return false;
    }
    let Ok(current) = std::fs::read_dir(&data) else {
        return true;
    };
    let missing = current
        .flatten()
        .any(|e| not_found(std::fs::metadata(dir.join(e.file_name()))));
    let dangling = std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .filter(|e| !e.file_name().as_encoded_bytes().starts_with(b"."))
            .any(|e| not_found(std::fs::metadata(e.path())))
    });
    missing || dangling
}

impl super::Engine {
    /// Delivers the current version again to every file sink whose file is
    /// gone (see `restore.rs`). Call once at start-up, after the stored
    /// decommissions stopped their agents and before anything else
    /// delivers. Returns how many credentials' restores still run when it
    /// stops waiting for them.
    pub async fn restore_missing_files(&self) -> usize {
        self.inner.restore_missing_files().await
    }
}

impl Inner {
    /// Whether `entry`'s agent is decommissioned, being decommissioned, or
    /// declared so in the config (from its `at` on).
    pub(super) fn leaving(&self, entry: &CredEntry) -> bool {
        let now = self.clock.now();
        entry
            .agent
            .decommissioned
            .as_ref()
            .is_some_and(|d| d.in_effect(now))
            || self.is_retired(&entry.key().agent)
    }

    /// Delivers the current version again to every file sink whose file
    /// is gone (see the module's doc), each credential as a
    /// [`Job::Restore`] of its own, all at once (up to the rotation
    /// limit), and waits for them up to [`RESTORE_WAIT`]. Returns how many
    /// are still running then: they go on while the daemon starts, and
    /// each holds its credential, so no rotation of it races its restore.
    /// Black-box finding: restored one after another, a vault that
    /// accepted connections and never answered held the start (sockets,
    /// `/healthz`, every other credential's rotations) for its `timeout`
    /// per missing file: a quarter of an hour for 30 files.
    async fn restore_missing_files(self: &Arc<Self>) -> usize {
        let catalog = self.catalog();
        let wanted: Vec<_> = {
            let live = self.live();
            catalog
                .creds
                .values()
                .filter(|e| !self.leaving(e))
                .filter(|e| {
                    let Some(l) = live.get(e.key()) else {
                        return false;
                    };
                    // A rotation that resumes delivers by itself.
                    l.running.is_none()
                        && l.row.as_ref().and_then(|r| r.current_version).is_some()
                        && !gone_sinks(e).is_empty()
                })
                .map(|e| e.key().clone())
                .collect()
        };
        for key in &wanted {
            self.clone().spawn_job(key.clone(), Job::Restore, None);
        }
        let restoring = || {
            let live = self.live();
            wanted
                .iter()
                .filter(|k| {
                    live.get(k)
                        .and_then(|l| l.running.as_ref())
                        .is_some_and(|r| r.job == Job::Restore)
                })
                .count()
        };
        let deadline = tokio::time::Instant::now() + RESTORE_WAIT;
        let mut left = restoring();
        while left > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            left = restoring();
        }
        if left > 0 {
            tracing::warn!(
                credentials = left,
                waited = ?RESTORE_WAIT,
                "restores of missing delivered files still wait for their vaults; the daemon starts meanwhile (each finishes before any rotation of its credential)"
            );
        }
        left
    }

    /// Records the file sinks of `new` that `old` did not have, or wrote
    /// otherwise (another format, mode or owner: the agent's new `uid`
    /// could not read the file of the old one), every one of a credential
    /// `old` lacked, for the restore jobs the reload starts next.
    pub(super) fn note_added_files(&self, old: &Catalog, new: &Catalog) {
        let mut added = self.added_files.lock().unwrap_or_else(|p| p.into_inner());
        for entry in new.creds.values() {
            let before: Vec<String> = old
                .creds
                .get(entry.key())
                .map(|o| o.sinks.iter().filter_map(|s| s.written_as()).collect())
                .unwrap_or_default();
            let paths: Vec<std::path::PathBuf> = entry
                .sinks
                .iter()
                .filter(|s| s.written_as().is_some_and(|w| !before.contains(&w)))
                .filter_map(|s| s.delivered_path())
                .map(std::path::Path::to_path_buf)
                .collect();
            if !paths.is_empty() {
                added.entry(entry.key().clone()).or_default().extend(paths);
            }
        }
        added.retain(|k, _| new.creds.contains_key(k));
    }

    /// The sinks of `entry` to restore: those whose file is gone, and
    /// those a reload added (taken: each is restored once).
    fn sinks_to_restore(&self, entry: &CredEntry) -> Vec<Arc<dyn Sink>> {
        let added = self
            .added_files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(entry.key())
            .unwrap_or_default();
        entry
            .sinks
            .iter()
            .filter(|s| {
                file_gone(s.as_ref())
                    || s.delivered_path()
                        .is_some_and(|p| added.iter().any(|a| a == p))
            })
            .cloned()
            .collect()
    }

    /// After a reload: a [`Job::Restore`] for every credential with a
    /// version whose file sink has no file, or that the reload added (see
    /// the module's doc). The files are looked at on the blocking pool,
    /// off the reload's path.
    pub(super) fn restore_after_reload(self: &Arc<Self>, catalog: Arc<Catalog>) {
        let inner = self.clone();
        let added: std::collections::HashSet<_> = self
            .added_files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        self.tracker.spawn(async move {
            let scan = {
                let inner = inner.clone();
                tokio::task::spawn_blocking(move || {
                    catalog
                        .creds
                        .values()
                        .filter(|e| e.sinks.iter().any(|s| s.delivered_path().is_some()))
                        .filter(|e| {
                            !inner.leaving(e)
                                && (added.contains(e.key()) || !gone_sinks(e).is_empty())
                        })
                        .map(|e| e.key().clone())
                        .collect::<Vec<_>>()
                })
                .await
            };
            let Ok(keys) = scan else { return };
            for key in keys {
                let has_version = inner
                    .live()
                    .get(&key)
                    .is_some_and(|l| l.row.as_ref().is_some_and(|r| r.current_version.is_some()));
                if has_version && !inner.cancel.is_cancelled() {
                    inner.clone().spawn_job(key, Job::Restore, None);
                } else {
                    // No version yet: its first rotation delivers to every sink.
                    inner
                        .added_files
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&key);
                }
            }
        });
    }

    /// The [`Job::Restore`] of one credential: its current version to each
    /// file sink whose file is gone, then what was asked for meanwhile.
    pub(super) async fn run_restore(self: Arc<Self>, entry: Arc<CredEntry>) {
        let key = entry.key().clone();
        let follow_lock = match entry.policy.follow {
            Some(_) => Some(self.follow_lock(&key).lock_owned().await),
            None => None,
        };
        let version = self
            .live()
            .get(&key)
            .and_then(|l| l.row.as_ref()?.current_version);
        let sinks = self.sinks_to_restore(&entry);
        let mut failed = false;
        if let Some(version) = version
            && !sinks.is_empty()
            && !self.leaving(&entry)
        {
            match self.restore_or_log(&entry, version, &sinks).await {
                Ok((restored, head, some_failed)) => {
                    if let Some(head) = head
                        && let Err(e) = self.persist(vec![Write::AuditHead(head)]).await
                    {
                        tracing::warn!(error = %e, "recording the audit head of restored files");
                    }
                    if restored > 0 {
                        tracing::info!(agent = %key.agent, credential = %key.credential, version, files = restored, "restored delivered files (missing, or their sink added or changed by a reload)");
                    }
                    failed = some_failed;
                }
                Err(()) => failed = true,
            }
        }
        drop(follow_lock);
        let next = {
            let mut live = self.live();
            let l = live.entry(&key);
            l.running = None;
            // Black-box finding: a restore its vault did not answer was
            // tried once; with a daily rotation the agent had no file for
            // up to a day. It is tried again after a back-off, doubling.
            l.restore_failures = if failed {
                l.restore_failures.saturating_add(1)
            } else {
                0
            };
            if failed && !self.cancel.is_cancelled() {
                let delay = super::jobs::park_delay(
                    &self.catalog().config.daemon.retry,
                    u32::from(l.restore_failures),
                );
                let (inner, key) = (self.clone(), key.clone());
                self.tracker.spawn(async move {
                    tokio::select! {
                        _ = inner.cancel.cancelled() => {}
                        _ = tokio::time::sleep(delay) => inner.spawn_job(key, Job::Restore, None),
                    }
                });
            }
            // Another reload came meanwhile: look again, with its entry.
            let again = std::mem::take(&mut l.restore_after);
            let rotate = std::mem::take(&mut l.rotate_after_retire);
            // A retire that fell due meanwhile found the credential busy.
            let retire_at = l.retire_at;
            if let Some(at) = retire_at
                && live.deadline(&key, Job::Retire).is_none()
            {
                live.schedule(&key, Job::Retire, at.max(self.now()));
            }
            if self.cancel.is_cancelled() {
                None
            } else if rotate {
                // It delivers to every sink the credential has now.
                Some(Job::Rotate)
            } else {
                again.then_some(Job::Restore)
            }
        };
        if let Some(job) = next {
            self.spawn_job(key, job, None);
        }
    }

    /// [`restore`](Self::restore), a failure logged (the next rotation
    /// delivers the files): how many files it restored, and the audit head.
    async fn restore_or_log(
        &self,
        entry: &CredEntry,
        version: VersionNo,
        sinks: &[Arc<dyn Sink>],
    ) -> Result<Restored, ()> {
        self.restore(entry, version, sinks).await.map_err(|e| {
            tracing::warn!(
                agent = %entry.key().agent,
                credential = %entry.key().credential,
                version,
                error = %e,
                "a delivered file is missing and could not be restored; tried again after a back-off (or delivered by the next rotation)"
            );
        })
    }

    /// Restores `version` of one credential to `sinks`: how many it
    /// restored, the audit head after the last record, and whether a
    /// sink's delivery failed (logged and audited; tried again).
    async fn restore(
        &self,
        entry: &CredEntry,
        version: VersionNo,
        sinks: &[Arc<dyn Sink>],
    ) -> Result<Restored, PluginError> {
        // A follower restores only the version it delivered; what else
        // its vault holds is decided in `follow.rs`.
        let (rot, stored) = if entry.policy.follow.is_some() {
            match self.follow_restore(entry, version).await? {
                FollowRestore::Same(stored) => (None, stored),
                FollowRestore::Handled(n) => return Ok((n, None, false)),
            }
        } else {
            let key = entry.key().clone();
            let latest = self.load(move |s| s.latest_rotation(&key)).await?;
            let rot = match latest {
                Some(r) if r.version == version && matches!(r.step, Step::Done | Step::Retire) => {
                    Some(r)
                }
                // The next version is still being made (or parked, failing, on
                // its way): the current one is the one to have meanwhile.
                Some(r) if matches!(r.step, Step::Create | Step::Set | Step::Test) => None,
                // Promoted and not yet delivered (it resumes now and delivers
                // the new version), or abandoned (a fresh rotation follows).
                Some(_) => return Ok((0, None, false)),
                None => None,
            };
            // Where the current version was made (the config may have moved
            // the credential since: its next rotation makes one at the new place).
            let place = self.place_of(entry, rot.as_ref().and_then(|r| r.footprint.as_deref()));
            let path = place.path;
            let item = VaultItem {
                key: entry.key(),
                path: &path,
            };
            let primary = place.vaults.first().map_or(entry.primary(), |h| h.as_ref());
            let stored = primary
                .vault
                .read(item, Select::Stage(Stage::Current))
                .await?
                .ok_or_else(|| {
                    PluginError::new(
                        crate::model::ErrorKind::NotFound,
                        format!(
                            "vault {} holds no current version at {path}",
                            primary.vault.describe()
                        ),
                    )
                })?;
            // The rotation that made `version`, as the state has it.
            let made_by = match &rot {
                Some(r) => Some(r.id.clone()),
                None => {
                    let key = entry.key().clone();
                    self.load(move |s| s.versions(&key))
                        .await?
                        .into_iter()
                        .find(|v| v.version == version)
                        .map(|v| v.rotation)
                }
            };
            if let (Some(made), Some(holds)) = (&made_by, &stored.rotation)
                && made != holds
            {
                // The vault's current value is not `version` (the vault is
                // ahead of the state, restored from backups taken at
                // different moments, and holds the rotation in flight): a
                // file of it labelled `version` would be wrong. The
                // rotation resumes and delivers what it made.
                tracing::warn!(agent = %entry.key().agent, credential = %entry.key().credential, version, "not restoring the missing file: the vault's current value is not the current version in state; the next rotation delivers");
                return Ok((0, None, false));
            }
            let mut stored = stored;
            if made_by.is_some() {
                stored.rotation = made_by;
            }
            (rot, stored)
        };
        let (rotated_at, next_due) = self
            .live()
            .get(entry.key())
            .and_then(|l| l.row.as_ref().map(|r| (r.last_rotated_at, r.next_due)))
            .unwrap_or((None, None));
        let rotated_at = rotated_at.unwrap_or_else(|| self.now());
        let notice = match &rot {
            Some(rot) => notice_for(entry, rot, &stored.value, rotated_at, next_due),
            None => {
                let kind = generators::kind_of(&entry.policy.generate);
                Notice {
                    key: entry.key().clone(),
                    tenant: entry.agent.tenant.clone(),
                    owner: entry.agent.owner.clone(),
                    version,
                    rotation: stored.rotation.clone().unwrap_or_else(RotationId::generate),
                    rotated_at,
                    // As when it was delivered: due, then its grace.
                    expires_hint: next_due.map(|d| d + chrono_dur(entry.policy.grace)),
                    kind,
                    public: generators::public_part(kind, &stored.value),
                    login: entry.target.as_ref().and_then(|t| t.login_for(version)),
                    previous_version: None,
                    grace_until: None,
                    file: entry
                        .sinks
                        .iter()
                        .find_map(|s| s.delivered_path())
                        .map(Into::into),
                }
            }
        };
        let (mut restored, mut head, mut failed) = (0, None, Vec::new());
        for sink in sinks {
            if self.leaving(entry) {
                break;
            }
            let why = if file_gone(sink.as_ref()) {
                "the file was missing"
            } else {
                "a reload added or changed its sink"
            };
            let rewatch = self.replace_ack_watch(entry.key(), version, sink.as_ref());
            let result = sink.deliver(&notice, &stored.value).await;
            if rewatch {
                self.rewatch(entry.key(), version, sink.as_ref());
            }
            self.metrics.delivery(sink.kind(), result.is_ok());
            let mut ev = AuditEvent::new(
                "delivery",
                Actor::Daemon,
                if result.is_ok() {
                    Outcome::Ok
                } else {
                    Outcome::Failed
                },
            );
            ev.agent = Some(entry.key().agent.clone());
            ev.credential = Some(entry.key().credential.clone());
            ev.tenant = Some(entry.agent.tenant.clone());
            ev.owner = Some(entry.agent.owner.clone());
            ev.rotation = Some(notice.rotation.clone());
            ev.version = Some(version);
            ev.detail = Some(format!("{} (restored: {why})", sink.describe()));
            ev.error = result.as_ref().err().map(ToString::to_string);
            head = Some(self.append(ev).await?);
            match result {
                Ok(_) => restored += 1,
                Err(e) => {
                    tracing::warn!(
                        agent = %entry.key().agent,
                        credential = %entry.key().credential,
                        sink = %sink.describe(),
                        error = %e,
                        "restoring a delivered file failed; tried again after a back-off (or delivered by the next rotation)"
                    );
                    failed.extend(sink.delivered_path().map(std::path::Path::to_path_buf));
                }
            }
        }
        let some_failed = !failed.is_empty();
        if some_failed {
            // Black-box finding: a restore refused by what was at the path
            // (a FIFO, a directory at a bundle's `..data`) was not tried
            // again once that was cleared: the agent had no file until the
            // next rotation. Those sinks are restored again, as added ones.
            self.added_files
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(entry.key().clone())
                .or_default()
                .extend(failed);
        }
        Ok((restored, head, some_failed))
    }
}
