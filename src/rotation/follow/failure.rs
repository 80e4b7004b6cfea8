//! A failed read of a followed credential's vault, recorded on its row
//! (shown by `status`, counted as a failure) until a read succeeds: see
//! [`VaultFailed`] for what clears it.

use super::*;

impl Inner {
    /// Records in the row of the followed credential `entry` that a read of
    /// its vault failed with `e` (the caller holds its follow lock): shown
    /// as its last error, and counted as a failure, until a read succeeds.
    /// Returns the row's write.
    pub(super) fn vault_failed(
        &self,
        entry: &CredEntry,
        e: &PluginError,
        why: VaultFailed,
        memory: &Memory,
    ) -> Write {
        let key = entry.key();
        let name = &entry.primary().config.name;
        // Vault plug-ins' errors mostly name their vault already.
        let error = if e.message.starts_with(&format!("vault {name}")) {
            format!("follow: {}", e.message)
        } else {
            format!("follow: vault {name}: {}", e.message)
        };
        let mut row = CredentialRow {
            last_error: Some(error),
            ..self.cred_row(key)
        };
        count_check_failure(&mut row, self.now(), &self.catalog().config.daemon.retry);
        if let Some(l) = self.live().get_mut(key) {
            l.row = Some(row.clone().into());
        }
        lock(memory).entry(key.clone()).or_default().vault_failed = Some(why);
        Write::Credential(row)
    }

    /// Clears the vault failure `key`'s row records, if any (and, with
    /// `only`, if it is of that kind); the caller holds its follow lock.
    pub(super) fn vault_recovered(
        &self,
        key: &CredentialKey,
        only: Option<VaultFailed>,
        memory: &Memory,
    ) -> Option<Write> {
        {
            let mut seen = lock(memory);
            let s = seen.get_mut(key)?;
            if s.vault_failed.is_none() || only.is_some_and(|o| s.vault_failed != Some(o)) {
                return None;
            }
            s.vault_failed = None;
        }
        let row = CredentialRow {
            consecutive_failures: 0,
            failing_since: None,
            last_error: None,
            ..self.cred_row(key)
        };
        if let Some(l) = self.live().get_mut(key) {
            l.row = Some(row.clone().into());
        }
        tracing::info!(agent = %key.agent, credential = %key.credential, "follow: the vault answers again");
        Some(Write::Credential(row))
    }

    /// Records a failed (`Some`) or successful read of `entry`'s own mark.
    pub(super) async fn note_own_read(
        &self,
        entry: &CredEntry,
        failed: Option<&PluginError>,
        memory: &Memory,
    ) {
        let key = entry.key();
        let flagged = lock(memory)
            .get(key)
            .is_some_and(|s| s.vault_failed.is_some());
        if failed.is_none() && !flagged {
            return;
        }
        let _checking = self.follow_lock(key).lock_owned().await;
        let w = match failed {
            Some(e) => Some(self.vault_failed(entry, e, VaultFailed::Own, memory)),
            None => self.vault_recovered(key, None, memory),
        };
        self.persist_follow(w.into_iter().collect()).await;
    }

    /// A poll of the group `entries` failed with `e` before reaching any
    /// credential of its own: each records it.
    pub(super) async fn vault_failed_all(
        &self,
        entries: &[Arc<CredEntry>],
        e: &PluginError,
        memory: &Memory,
    ) {
        let mut writes = Vec::with_capacity(entries.len());
        for entry in entries {
            let _checking = self.follow_lock(entry.key()).lock_owned().await;
            writes.push(self.vault_failed(entry, e, VaultFailed::Poll, memory));
        }
        self.persist_follow(writes).await;
    }

    /// A poll of the group `entries` reached the vault: clears what only
    /// failed polls recorded.
    pub(super) async fn vault_recovered_all(&self, entries: &[Arc<CredEntry>], memory: &Memory) {
        let flagged: Vec<&Arc<CredEntry>> = {
            let seen = lock(memory);
            entries
                .iter()
                .filter(|e| {
                    seen.get(e.key())
                        .is_some_and(|s| s.vault_failed == Some(VaultFailed::Poll))
                })
                .collect()
        };
        let mut writes = Vec::new();
        for entry in flagged {
            let _checking = self.follow_lock(entry.key()).lock_owned().await;
            writes.extend(self.vault_recovered(entry.key(), Some(VaultFailed::Poll), memory));
            // A file that went missing while the vault could not be read
            // (at the start, say) is restored now.
            self.restore_if_missing(entry);
        }
        self.persist_follow(writes).await;
    }

    /// Stores follow failures and recoveries (already in the live view);
    /// a failure to store them is logged, and the next poll writes again.
    pub(super) async fn persist_follow(&self, writes: Vec<Write>) {
        if writes.is_empty() {
            return;
        }
        if let Err(e) = self.persist(writes).await {
            tracing::warn!(error = %e, "follow: could not record a vault failure or recovery in state");
        }
    }
}
