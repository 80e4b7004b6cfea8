//! Delivering a followed version through the credential's sinks, and what
//! a restore of its missing files does for a followed credential.

use super::*;

impl Inner {
    /// What a restore of `entry`'s missing files (see `restore.rs`) does
    /// for a followed credential whose current version here is `version`:
    /// version and value stay paired. When the vault's current version is
    /// still the one delivered as `version`, that value is restored under
    /// that number ([`FollowRestore::Same`]). When the vault moved on while
    /// nothing watched (the follower was down), its current version is
    /// delivered once, as a new version, to every sink, as a poll would.
    /// When it holds no current version (its rotator destroyed the
    /// credential, or is making its first one), nothing is restored: the
    /// follow loop's check decides. The caller holds the follow lock, or
    /// runs before the follow loops do.
    pub(in crate::rotation) async fn follow_restore(
        &self,
        entry: &CredEntry,
        version: crate::model::VersionNo,
    ) -> Result<FollowRestore, PluginError> {
        let key = entry.key().clone();
        let row = self
            .load(move |s| Ok(s.versions(&key)?.into_iter().find(|v| v.version == version)))
            .await?;
        let primary = &entry.primary().config.name;
        let delivered = row.as_ref().and_then(|v| {
            VaultRefs::decode(&v.vault_version, primary)
                .get(primary)
                .cloned()
        });
        let key = entry.key();
        if row.as_ref().is_some_and(|v| v.stage == Stage::Retired) {
            tracing::info!(agent = %key.agent, credential = %key.credential, version, "a delivered file is missing; not restored: its version was revoked (its rotator destroyed the credential)");
            return Ok(FollowRestore::Handled(0));
        }
        let path = entry.vault_path();
        let item = VaultItem { key, path: &path };
        let current = entry
            .primary()
            .vault
            .read(item, Select::Stage(Stage::Current))
            .await?;
        match current {
            Some(mut stored) if Some(&stored.version) == delivered.as_ref() => {
                if let Some(row) = row {
                    stored.rotation = Some(row.rotation);
                }
                Ok(FollowRestore::Same(stored))
            }
            Some(stored) => {
                tracing::info!(agent = %key.agent, credential = %key.credential, version, vault_version = %stored.version, "a delivered file is missing and the vault holds a newer version: delivering that one");
                let memory = self.follow.memory.clone();
                self.follow_deliver(entry, stored, &memory).await?;
                Ok(FollowRestore::Handled(
                    entry
                        .sinks
                        .iter()
                        .filter(|s| s.delivered_path().is_some())
                        .count(),
                ))
            }
            None => {
                tracing::info!(agent = %key.agent, credential = %key.credential, version, "a delivered file is missing and the vault holds no current version; the follow loop checks whether its rotator destroyed the credential");
                Ok(FollowRestore::Handled(0))
            }
        }
    }

    /// Delivers `stored` through every sink of `entry`, audited like the
    /// deliver step, and records it in state.
    pub(super) async fn follow_deliver(
        &self,
        entry: &CredEntry,
        stored: StoredVersion,
        memory: &Memory,
    ) -> Result<(), PluginError> {
        let key = entry.key();
        let before = self.cred_row(key);
        let version = before.current_version.unwrap_or(0) + 1;
        let revoked = lock(memory).get(key).is_some_and(|s| s.revoked);
        let rotation = stored.rotation.clone().unwrap_or_else(RotationId::generate);
        let kind = generators::kind_of(&entry.policy.generate);
        let value = stored.value;
        let now = self.now();
        let notice = Notice {
            key: key.clone(),
            tenant: entry.agent.tenant.clone(),
            owner: entry.agent.owner.clone(),
            version,
            rotation: rotation.clone(),
            rotated_at: now,
            expires_hint: None,
            kind,
            public: generators::public_part(kind, &value),
            login: None,
            // A revoked version is not a previous one: nothing of it works.
            previous_version: before.current_version.filter(|_| !revoked),
            grace_until: before
                .current_version
                .filter(|_| !revoked)
                .map(|_| now + chrono::Duration::from_std(entry.policy.grace).unwrap_or_default()),
            file: entry
                .sinks
                .iter()
                .find_map(|s| s.delivered_path())
                .map(Into::into),
        };
        // Audited like the deliver step; the consumers that must ack are
        // awaited the same way (a follower retires nothing, so they are
        // reported, never waited for).
        let (mut writes, failed) = match self.deliver_to_sinks(entry, &notice, &value).await {
            Ok(w) => (w, None),
            Err(e) => (Vec::new(), Some(e.plugin_error())),
        };
        let row = match &failed {
            None => {
                writes.push(Write::Version(VersionRow {
                    key: key.clone(),
                    version,
                    rotation,
                    stage: Stage::Current,
                    vault_version: VaultRefs(vec![(
                        entry.primary().config.name.clone(),
                        stored.version.clone(),
                    )])
                    .encode(),
                    created_at: now,
                    public: notice.public.clone(),
                }));
                // The version delivered before is in its grace period (a
                // revoked one is not: nothing of it works any more).
                let previous = before.current_version.filter(|_| !revoked);
                writes.push(Write::RetireOthers(Restage {
                    key: key.clone(),
                    except: [version].into_iter().chain(previous).collect(),
                    from: vec![Stage::Current, Stage::Previous],
                    to: Stage::Retired,
                }));
                if let Some(previous) = previous {
                    writes.push(Write::VersionStage {
                        key: key.clone(),
                        version: previous,
                        stage: Stage::Previous,
                    });
                }
                writes.push(Write::PruneHistory(key.clone()));
                writes.push(Write::Holding {
                    key: key.clone(),
                    footprint: Footprint::holding(entry).to_json(),
                });
                CredentialRow {
                    key: key.clone(),
                    current_version: Some(version),
                    last_rotated_at: Some(now),
                    next_due: None,
                    consecutive_failures: 0,
                    failing_since: None,
                    last_error: None,
                }
            }
            Some(e) => {
                let mut row = CredentialRow {
                    last_error: Some(format!("follow: {}", e.message)),
                    ..before
                };
                count_check_failure(&mut row, now, &self.catalog().config.daemon.retry);
                row
            }
        };
        writes.push(Write::Credential(row.clone()));
        self.persist(writes).await?;
        if let Some(l) = self.live().get_mut(key) {
            l.row = Some(row.into());
            l.follow_revoked &= failed.is_some();
        }
        // The row now records this delivery, not a vault failure.
        if let Some(s) = lock(memory).get_mut(key) {
            s.vault_failed = None;
        }
        match failed {
            None => {
                tracing::info!(agent = %key.agent, credential = %key.credential, version, vault_version = %stored.version, "follow: delivered a new version");
                let mut seen = lock(memory);
                let s = seen.entry(key.clone()).or_default();
                s.delivered = Some(stored.version);
                s.revoked = false;
                s.retire_at = notice.grace_until.filter(|_| !revoked);
                Ok(())
            }
            Some(e) => Err(e),
        }
    }
}
