//! Versions ending on a follower: the grace period of the version
//! delivered before the current one ends as on the rotator, and a
//! credential its rotator destroyed is revoked here.

use super::*;

impl Inner {
    /// `entry`'s vault holds no current version though `delivered` was
    /// delivered (the caller holds its follow lock). When that version is
    /// gone too, every version is: its rotator destroyed the credential,
    /// which only a decommission there does, and what was delivered here
    /// is taken back ([`Self::follow_revoke`]). A version still there
    /// (nothing current for a moment) is left to the next check.
    pub(super) async fn follow_gone(
        &self,
        entry: &CredEntry,
        delivered: &VersionRef,
        memory: &Memory,
    ) -> Result<(), PluginError> {
        let path = entry.vault_path();
        let item = VaultItem {
            key: entry.key(),
            path: &path,
        };
        let gone = entry.primary().vault.gone(item, delivered).await;
        match gone {
            Err(e) => {
                let w = self.vault_failed(entry, &e, VaultFailed::Own, memory);
                self.persist_follow(vec![w]).await;
                Err(e)
            }
            Ok(false) => {
                let w = self.vault_recovered(entry.key(), None, memory);
                self.persist_follow(w.into_iter().collect()).await;
                Ok(())
            }
            Ok(true) => self.follow_revoke(entry, memory).await,
        }
    }

    /// The rotator destroyed every version of `entry` (a decommission
    /// there; the caller holds its follow lock): the value the agents here
    /// hold is revoked. Every file (or bundle) delivered is removed, the
    /// acks awaited are forgotten, the versions recorded are retired, and
    /// `status` shows the credential `revoked`, audited as `follow.revoked`.
    /// A file that cannot be removed fails the check (shown on the row,
    /// retried by the next one). A version the vault holds later (the
    /// credential made anew there) is delivered as usual and ends this.
    async fn follow_revoke(&self, entry: &CredEntry, memory: &Memory) -> Result<(), PluginError> {
        let key = entry.key();
        let name = &entry.primary().config.name;
        let path = entry.vault_path();
        let mut removed = Vec::new();
        let mut failed = None;
        for sink in entry.sinks.iter().filter(|s| s.delivered_path().is_some()) {
            match sink.retract(key).await {
                Ok(()) => removed.push(sink.describe()),
                Err(e) => {
                    failed.get_or_insert_with(|| {
                        PluginError::new(e.kind, format!("sink {}: {}", sink.describe(), e.message))
                    });
                }
            }
        }
        let before = self.cred_row(key);
        let why = format!(
            "vault {name} holds no version of {path} any more: its rotator destroyed the credential (decommissioned there)"
        );
        let detail = if removed.is_empty() {
            format!("{why}; no delivered file to remove")
        } else {
            format!("{why}; removed {}", removed.join(", "))
        };
        let mut ev = self.audit_event(
            entry,
            None,
            "follow.revoked",
            if failed.is_none() {
                Outcome::Ok
            } else {
                Outcome::Failed
            },
            Some(detail),
            failed.as_ref().map(|e| e.message.clone()),
        );
        ev.version = before.current_version;
        let head = self.audit(ev).await?;
        if let Some(e) = failed {
            let mut row = CredentialRow {
                last_error: Some(format!("follow: revoking: {}", e.message)),
                ..before
            };
            count_check_failure(&mut row, self.now(), &self.catalog().config.daemon.retry);
            if let Some(l) = self.live().get_mut(key) {
                l.row = Some(row.clone().into());
            }
            lock(memory).entry(key.clone()).or_default().vault_failed = Some(VaultFailed::Own);
            self.persist(vec![head, Write::Credential(row)]).await?;
            return Err(e);
        }
        self.drop_awaited(key);
        self.forget_delivery(key);
        let row = CredentialRow {
            consecutive_failures: 0,
            failing_since: None,
            last_error: None,
            ..before
        };
        self.persist(vec![
            head,
            Write::AwaitAcks {
                key: key.clone(),
                version: 0,
                consumers: Vec::new(),
            },
            // The version delivered last stays the row's current one, its
            // stage retired: how state remembers the revocation.
            Write::RetireOthers(Restage {
                key: key.clone(),
                except: Vec::new(),
                from: vec![Stage::Current, Stage::Previous],
                to: Stage::Retired,
            }),
            Write::Credential(row.clone()),
        ])
        .await?;
        self.ack_changed.notify_waiters();
        if let Some(l) = self.live().get_mut(key) {
            l.row = Some(row.into());
            l.follow_revoked = true;
        }
        {
            let mut seen = lock(memory);
            let s = seen.entry(key.clone()).or_default();
            s.revoked = true;
            s.vault_failed = None;
            s.retire_at = None;
        }
        tracing::warn!(agent = %key.agent, credential = %key.credential, vault = %name, path = %path, files = removed.len(), "follow: the rotator destroyed the credential (decommissioned there): the delivered files are removed, and status shows it revoked");
        Ok(())
    }

    /// Ends the grace period of the version delivered before the current
    /// one, for each of `entries` whose grace is over: what a sink kept of
    /// it (a bundle's previous directory and private key) is removed, and
    /// its version is recorded retired, as the rotator's retire step does
    /// at the same time (a follower retires nothing in the vault). A
    /// failure is logged and tried again at the next poll.
    pub(super) async fn follow_retire_due(&self, entries: &[Arc<CredEntry>], memory: &Memory) {
        let now = self.now();
        let due: Vec<&Arc<CredEntry>> = {
            let seen = lock(memory);
            entries
                .iter()
                .filter(|e| {
                    seen.get(e.key())
                        .and_then(|s| s.retire_at)
                        .is_some_and(|at| at <= now)
                })
                .collect()
        };
        for entry in due {
            let key = entry.key();
            let _checking = self.follow_lock(key).lock_owned().await;
            // A delivery or a revocation meanwhile decided anew.
            if lock(memory)
                .get(key)
                .and_then(|s| s.retire_at)
                .is_none_or(|at| at > now)
            {
                continue;
            }
            let mut failed = None;
            for sink in entry.sinks.iter() {
                if let Err(e) = sink.retire_previous(key).await {
                    failed.get_or_insert((sink.describe(), e));
                }
            }
            if let Some((sink, e)) = failed {
                tracing::warn!(agent = %key.agent, credential = %key.credential, sink = %sink, error = %e, "follow: removing what a sink kept of the previous version failed; retried at the next poll");
                continue;
            }
            let Some(current) = self.cred_row(key).current_version else {
                continue;
            };
            let retired = self
                .persist(vec![Write::RetireOthers(Restage {
                    key: key.clone(),
                    except: vec![current],
                    from: vec![Stage::Previous],
                    to: Stage::Retired,
                })])
                .await;
            match retired {
                Ok(()) => {
                    if let Some(s) = lock(memory).get_mut(key) {
                        s.retire_at = None;
                    }
                    tracing::debug!(agent = %key.agent, credential = %key.credential, "follow: the previous version's grace period ended");
                }
                Err(e) => {
                    tracing::warn!(agent = %key.agent, credential = %key.credential, error = %e, "follow: recording the end of the previous version's grace failed; retried at the next poll")
                }
            }
        }
    }
}
