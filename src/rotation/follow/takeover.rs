//! Taking over (see the module docs): a followed credential now rotated
//! here adopts the retirement its dead rotator still owed.

use super::*;

impl Inner {
    /// Arms a retire job now for each of `keys` that is rotated here, has
    /// a version and nothing pending: it may have been followed until now
    /// (see "Taking over"), which the job finds out from state (one read;
    /// a vault read only when the current version was not made here).
    pub(in crate::rotation) fn arm_takeovers(&self, keys: impl IntoIterator<Item = CredentialKey>) {
        let now = self.now();
        let catalog = self.catalog();
        let mut live = self.live();
        for key in keys {
            let rotated_here = catalog
                .creds
                .get(&key)
                .is_some_and(|e| e.policy.follow.is_none());
            if !rotated_here || self.is_retired(&key.agent) {
                continue;
            }
            let Some(l) = live.get(&key) else {
                continue;
            };
            let has_version = l.row.as_ref().is_some_and(|r| r.current_version.is_some());
            if has_version && l.retire_at.is_none() && l.running.is_none() {
                live.schedule(&key, crate::rotation::table::Job::Retire, now);
            }
        }
    }

    /// Takes over what a rotator that died mid-grace owed (see "Taking
    /// over" in the module docs): `entry` is rotated here now, and its
    /// current version was delivered here by following, not made by a
    /// rotation here (`latest`, this keyturn's last rotation of it, is older
    /// or absent). When the vault still holds a previous version, this
    /// records the retire step its rotator would have run as one of this
    /// keyturn's rotations (the rotator's rotation id, the current version,
    /// the vault's previous version), due when that version's grace ends,
    /// counted from this keyturn's delivery of the current one; audited as
    /// `rotation.takeover`. The retire job, or the next rotation (which
    /// retires first), runs it. `None`: nothing to take over.
    pub(in crate::rotation) async fn adopt_takeover(
        &self,
        entry: &CredEntry,
        latest: Option<&RotationRow>,
    ) -> Result<Option<RotationRow>, PluginError> {
        let key = entry.key();
        if entry.policy.follow.is_some() {
            return Ok(None);
        }
        let row = self.cred_row(key);
        let Some(current) = row.current_version else {
            return Ok(None);
        };
        if latest.is_some_and(|r| r.version >= current) {
            return Ok(None);
        }
        let k = key.clone();
        let versions = self.load(move |s| s.versions(&k)).await?;
        // A version revoked by its rotator has nothing left to retire.
        let Some(cur) = versions
            .iter()
            .find(|v| v.version == current && v.stage != Stage::Retired)
        else {
            return Ok(None);
        };
        let primary = entry.primary();
        let name = &primary.config.name;
        let ref_of = |v: &VersionRow| VaultRefs::decode(&v.vault_version, name).get(name).cloned();
        let Some(cur_ref) = ref_of(cur) else {
            return Ok(None);
        };
        let path = entry.vault_path();
        let item = VaultItem { key, path: &path };
        let Some(prev) = primary
            .vault
            .read(item, Select::Stage(Stage::Previous))
            .await?
            .filter(|p| p.version != cur_ref)
        else {
            return Ok(None);
        };
        let previous_version = versions
            .iter()
            .find(|v| v.version < current && ref_of(v).as_ref() == Some(&prev.version))
            .map(|v| v.version);
        // Black-box finding: only the primary vault's previous version was
        // retired; the other vaults of the credential kept it readable
        // until the next rotation here. Each vault's current and previous
        // version, as a rotation records them.
        let mut cur_refs = vec![(primary.vault.describe().to_owned(), cur_ref)];
        let mut prev_refs = vec![(primary.vault.describe().to_owned(), prev.version.clone())];
        for other in entry.vaults.iter().skip(1) {
            let item = VaultItem { key, path: &path };
            let now_current = other
                .vault
                .read(item, Select::Stage(Stage::Current))
                .await?;
            let item = VaultItem { key, path: &path };
            let before = other
                .vault
                .read(item, Select::Stage(Stage::Previous))
                .await?;
            if let Some(before) =
                before.filter(|b| now_current.as_ref().is_none_or(|c| c.version != b.version))
            {
                prev_refs.push((other.vault.describe().to_owned(), before.version.clone()));
            }
            if let Some(c) = now_current {
                cur_refs.push((other.vault.describe().to_owned(), c.version.clone()));
            }
        }
        let in_vaults = prev_refs
            .iter()
            .map(|(v, _)| v.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let now = self.now();
        let delivered = row.last_rotated_at.unwrap_or(now);
        let retire_at =
            delivered + chrono::Duration::from_std(entry.policy.grace).unwrap_or_default();
        let rot = RotationRow {
            id: cur.rotation.clone(),
            key: key.clone(),
            step: Step::Retire,
            trigger: Trigger::Schedule,
            version: current,
            // Keyed as a rotation records them (by the vault's own name).
            vault_version: Some(VaultRefs(cur_refs).encode()),
            previous_version,
            previous_vault_version: Some(VaultRefs(prev_refs).encode()),
            started_at: delivered,
            updated_at: now,
            retire_at: Some(retire_at),
            attempts: 0,
            last_error: None,
            footprint: Some(Footprint::of(entry).to_json()),
            start_record_after: None,
        };
        let head = self
            .audit(self.audit_event(
                entry,
                Some(&rot),
                "rotation.takeover",
                Outcome::Ok,
                Some(format!(
                    "followed until now: the previous version {} (in vault {name}; retired in {in_vaults}), left by its rotator, is retired at {retire_at} when its grace ends",
                    prev.version
                )),
                None,
            ))
            .await?;
        self.persist(vec![Write::Rotation(rot.clone()), head])
            .await?;
        tracing::info!(agent = %key.agent, credential = %key.credential, vault_version = %prev.version, retire_at = %retire_at, "took over from its rotator: the previous version it left in the vault is retired when its grace ends");
        Ok(Some(rot))
    }
}
