//! One poll of a followed vault: the change index (or each credential's
//! own mark), the safety-net sweep, the versions delivered before a
//! restart, and the check of one credential that delivers what changed.

use super::*;

impl Inner {
    /// One poll of one vault: finds the followed credentials whose current
    /// version may have changed and checks (and delivers) each.
    pub(super) async fn follow_once(
        &self,
        p: &mut Poller,
        memory: &Memory,
    ) -> Result<(), PluginError> {
        self.load_delivered(&p.entries, memory).await?;
        let mut new_index_mark = None;
        let index_read = match self.poll_index(p, &mut new_index_mark).await {
            Ok(read) => read,
            Err(e) => {
                // Every credential of the group missed this poll.
                self.vault_failed_all(&p.entries, &e, memory).await;
                return Err(e);
            }
        };
        let vault = p.handle.vault.clone();
        let polls = p.polls;
        p.polls += 1;
        let mut check: Vec<(usize, Option<CurrentMark>)> = Vec::new();
        let mut first_error = None;
        // Credentials to check by their own mark (metadata, no value).
        let mut by_mark: Vec<usize> = Vec::new();
        // Credentials whose own mark says nothing is current any more.
        let mut gone: Vec<usize> = Vec::new();
        match index_read {
            Some(changed) => {
                let first = p.index_mark.is_none();
                let sweep = sweep_pick(polls, p.entries.len());
                let mut seen = lock(memory);
                for (i, e) in p.entries.iter().enumerate() {
                    let listed = changed.as_ref().map(|m| m.get(&*e.vault_path()).cloned());
                    let s = seen.entry(e.key().clone()).or_default();
                    let due = match listed {
                        // (After a revocation a vault may hand out the
                        // refs of the destroyed versions again: KV v2
                        // numbers from 1 after its metadata is deleted.)
                        Some(Some(r)) => {
                            s.listed = true;
                            s.revoked || Some(&r) != s.delivered.as_ref()
                        }
                        // Not in the index: rotated before it existed, or
                        // by a keyturn that does not write it; or it left
                        // the index, which its rotator's decommission does
                        // once it destroyed every version.
                        Some(None) => {
                            let left = std::mem::take(&mut s.listed);
                            first || (left && s.delivered.is_some() && !s.revoked)
                        }
                        None => false,
                    };
                    if due {
                        check.push((i, None));
                    } else if sweep == Some(i) {
                        by_mark.push(i);
                    }
                }
            }
            None => by_mark.extend(0..p.entries.len()),
        }
        for i in by_mark {
            let e = &p.entries[i];
            let item = VaultItem {
                key: e.key(),
                path: &e.vault_path(),
            };
            let marked = vault.current_mark(item).await;
            self.note_own_read(e, marked.as_ref().err(), memory).await;
            match marked {
                Ok(mark) => {
                    let mut seen = lock(memory);
                    let s = seen.entry(e.key().clone()).or_default();
                    if mark.is_none() {
                        s.mark = None;
                        // Nothing is current where a version was delivered:
                        // its rotator may have destroyed the credential.
                        if s.delivered.is_some() && !s.revoked {
                            gone.push(i);
                        }
                    } else if mark != s.mark {
                        check.push((i, mark));
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        for (i, mark) in check {
            let entry = p.entries[i].clone();
            let mark = match mark {
                Some(m) => Some(m),
                // Listed by the index: its mark too, read before the value,
                // so that the safety-net sweep need not read the value again.
                None => {
                    let item = VaultItem {
                        key: entry.key(),
                        path: &entry.vault_path(),
                    };
                    let marked = vault.current_mark(item).await;
                    self.note_own_read(&entry, marked.as_ref().err(), memory)
                        .await;
                    match marked {
                        Ok(m) => m,
                        Err(e) => {
                            first_error.get_or_insert(e);
                            continue;
                        }
                    }
                }
            };
            let checked = self.follow_check(&entry, memory).await;
            if checked.is_ok() && mark.is_some() {
                // Checked at this mark (or later): not again until it moves.
                lock(memory).entry(entry.key().clone()).or_default().mark = mark;
            }
            if let Err(e) = checked {
                tracing::warn!(agent = %entry.key().agent, credential = %entry.key().credential, error = %e, "follow: delivery failed; retried at the next poll");
                first_error.get_or_insert(e);
            }
        }
        for i in gone {
            let entry = &p.entries[i];
            if let Err(e) = self.follow_check(entry, memory).await {
                tracing::warn!(agent = %entry.key().agent, credential = %entry.key().credential, error = %e, "follow: checking a credential with no current version failed; retried at the next poll");
                first_error.get_or_insert(e);
            }
        }
        // The vault answered the poll: what only a failed poll recorded is
        // over (a credential that failed on its own reads since is not).
        self.vault_recovered_all(&p.entries, memory).await;
        match first_error {
            // The index is taken as read only when everything it listed
            // was delivered; otherwise the next poll reads it again.
            None => {
                if new_index_mark.is_some() {
                    p.index_mark = new_index_mark;
                }
                if polls > 0 {
                    self.warn_never_written(p, memory);
                }
                Ok(())
            }
            Some(e) => Err(e),
        }
    }

    /// Black-box finding: a follower whose path nothing writes (a typo, a
    /// rotator never started) waited in silence: no error, `status` said
    /// `follow` as for a credential in step. After a second poll that the
    /// vault answered, each such credential is warned of once (status shows
    /// it `follow:waiting` meanwhile).
    fn warn_never_written(&self, p: &Poller, memory: &Memory) {
        let mut seen = lock(memory);
        for e in &p.entries {
            let s = seen.entry(e.key().clone()).or_default();
            if s.loaded && s.delivered.is_none() && !s.revoked && !s.warned_empty {
                s.warned_empty = true;
                tracing::warn!(
                    agent = %e.key().agent,
                    credential = %e.key().credential,
                    vault = %e.primary().config.name,
                    path = %e.vault_path(),
                    "follow: the vault holds no current version of this credential: nothing to deliver yet. Its rotator writes it there: check that one runs, and that both name the same vault and path (a typo?)"
                );
            }
        }
    }

    /// The part of a poll that reads for the whole group: the change
    /// index's mark, and the index itself when the mark moved
    /// (`new_index_mark`). `None`: no index (yet), poll each credential;
    /// `Some(None)`: the index is unchanged.
    async fn poll_index(
        &self,
        p: &Poller,
        new_index_mark: &mut Option<CurrentMark>,
    ) -> Result<Option<Option<BTreeMap<String, VersionRef>>>, PluginError> {
        let Some(path) = &p.index else {
            return Ok(None);
        };
        let vault = p.handle.vault.as_ref();
        let mark = vault.current_mark(change_index::item(path)).await?;
        Ok(if mark.is_some() && mark == p.index_mark {
            Some(None)
        } else if mark.is_some() {
            let map = change_index::read(vault, path).await?;
            *new_index_mark = mark;
            Some(map)
        } else {
            None
        })
    }

    /// The version each credential was last given, from state, once.
    pub(super) async fn load_delivered(
        &self,
        entries: &[Arc<CredEntry>],
        memory: &Memory,
    ) -> Result<(), PluginError> {
        let todo: Vec<(CredentialKey, String, Duration)> = {
            let seen = lock(memory);
            entries
                .iter()
                .filter(|e| !seen.get(e.key()).is_some_and(|s| s.loaded))
                .map(|e| {
                    (
                        e.key().clone(),
                        e.primary().config.name.clone(),
                        e.policy.grace,
                    )
                })
                .collect()
        };
        if todo.is_empty() {
            return Ok(());
        }
        let found = self
            .load(move |s| {
                let mut out = Vec::with_capacity(todo.len());
                for (key, primary, grace) in todo {
                    let row = s.credential(&key)?;
                    let failing = row.as_ref().is_some_and(|r| r.consecutive_failures > 0);
                    let delivered_at = row.as_ref().and_then(|r| r.last_rotated_at);
                    let current = row.and_then(|r| r.current_version);
                    let versions = match current {
                        None => Vec::new(),
                        Some(_) => s.versions(&key)?,
                    };
                    let cur = versions.iter().find(|v| Some(v.version) == current);
                    let vref = cur.and_then(|v| {
                        VaultRefs::decode(&v.vault_version, &primary)
                            .get(&primary)
                            .cloned()
                    });
                    // The version delivered last, retired: revoked by its
                    // rotator (see `follow_revoke`).
                    let revoked = cur.is_some_and(|v| v.stage == Stage::Retired);
                    // A previous version still in its grace period.
                    let retire_at = versions
                        .iter()
                        .any(|v| v.stage == Stage::Previous)
                        .then_some(delivered_at)
                        .flatten()
                        .map(|at| at + chrono::Duration::from_std(grace).unwrap_or_default());
                    out.push((key, vref, failing, revoked, retire_at));
                }
                Ok(out)
            })
            .await?;
        {
            let mut live = self.live();
            for (key, _, _, revoked, _) in &found {
                if let Some(l) = live.get_mut(key) {
                    l.follow_revoked = *revoked;
                }
            }
        }
        let mut seen = lock(memory);
        for (key, vref, failing, revoked, retire_at) in found {
            let s = seen.entry(key).or_default();
            s.loaded = true;
            s.delivered = vref;
            s.revoked = revoked;
            s.retire_at = retire_at.filter(|_| !revoked);
            // A failure recorded before a restart: the first poll that
            // reaches the vault clears it (or records it again).
            if failing {
                s.vault_failed.get_or_insert(VaultFailed::Poll);
            }
        }
        Ok(())
    }

    /// Reads the credential's current version and delivers it unless it
    /// was delivered already.
    pub(super) async fn follow_check(
        &self,
        entry: &CredEntry,
        memory: &Memory,
    ) -> Result<(), PluginError> {
        let _checking = self.follow_lock(entry.key()).lock_owned().await;
        let vault = &entry.primary().vault;
        let path = entry.vault_path();
        let item = VaultItem {
            key: entry.key(),
            path: &path,
        };
        let read = vault.read(item, Select::Stage(Stage::Current)).await;
        let stored = match read {
            Ok(stored) => stored,
            Err(e) => {
                let w = self.vault_failed(entry, &e, VaultFailed::Own, memory);
                self.persist_follow(vec![w]).await;
                return Err(e);
            }
        };
        let delivered = lock(memory)
            .get(entry.key())
            .and_then(|s| s.delivered.clone());
        let revoked = lock(memory).get(entry.key()).is_some_and(|s| s.revoked);
        match stored {
            // The delivery records the outcome in the row either way.
            // Anything current after a revocation is the credential made
            // anew (its refs may be the destroyed versions' again).
            Some(stored) if revoked || delivered.as_ref() != Some(&stored.version) => {
                self.follow_deliver(entry, stored, memory).await
            }
            None if let Some(delivered) = delivered.filter(|_| !revoked) => {
                self.follow_gone(entry, &delivered, memory).await
            }
            _ => {
                let w = self.vault_recovered(entry.key(), None, memory);
                self.persist_follow(w.into_iter().collect()).await;
                self.restore_if_missing(entry);
                Ok(())
            }
        }
    }

    /// A file of `entry` missing while its vault still holds the version
    /// delivered (deleted since, or not restorable at the start because
    /// the vault was down): restored now, as a job of its own (it takes
    /// the follow lock once this check lets go of it). On a follower the
    /// "next rotation" is another host's, up to a period away.
    pub(super) fn restore_if_missing(&self, entry: &CredEntry) {
        // (Not one its rotator destroyed: its files were removed on purpose.)
        if entry.sinks.iter().any(|s| s.delivered_path().is_some())
            && !self.leaving(entry)
            && !self
                .live()
                .get(entry.key())
                .is_some_and(|l| l.follow_revoked)
            && !super::super::restore::gone_sinks(entry).is_empty()
            && !self.cancel.is_cancelled()
            && let Some(me) = self.me.upgrade()
        {
            me.spawn_job(
                entry.key().clone(),
                crate::rotation::table::Job::Restore,
                None,
            );
        }
    }
}
