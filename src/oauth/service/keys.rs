//! The signing keys: each key set's versions and current key read from
//! its vault (cached until the current version changes), the keys it
//! publishes (`GET /.well-known/jwks.json`), and the ledger of the
//! versions that signed tokens not yet expired.

use super::*;

impl TokenService {
    /// The versions of credentials that signed, for key sets other than
    /// `set`, tokens that may be live at `now`: `(credential, version, until)`.
    /// A set never signs with nor publishes one of them, so that a key moved
    /// from one set to another by a reload is never trusted by both (the
    /// tenants would trust each other's tokens).
    fn foreign_uses(&self, set: &KeySet, now: i64) -> Result<Vec<(String, u64, i64)>, String> {
        let own = set.ledger_prefix();
        Ok(self
            .backend
            .token_ledger()
            .signed_under("set:")?
            .into_iter()
            .filter(|(name, _, until)| !name.starts_with(&own) && *until > now)
            .filter_map(|(name, version, until)| {
                let (_, credential) = name.split_once(' ')?;
                Some((credential.to_owned(), version, until))
            })
            .collect())
    }

    /// A key set's versions, from the cache when fresh.
    pub(super) async fn signing_versions(
        &self,
        set: &KeySet,
    ) -> Result<Arc<Vec<VersionRow>>, String> {
        let generation = self.backend.versions_generation();
        let current = self.backend.signing_current(&set.credential);
        if let Some((at, seen, v)) = &*lock(&set.versions_cache)
            && at.elapsed() < self.cache_for
            && *seen == generation
            && current.is_some()
            && v.iter()
                .any(|r| r.stage == crate::model::Stage::Current && Some(r.version) == current)
        {
            return Ok(v.clone());
        }
        let v = Arc::new(self.backend.signing_versions(&set.credential).await?);
        *lock(&set.versions_cache) = Some((std::time::Instant::now(), generation, v.clone()));
        Ok(v)
    }

    /// The keys of a key set that are published: its credential's current
    /// and previous versions and any other (not pending) version that
    /// signed a token not yet expired, each under its thumbprint; under its
    /// legacy kid too while a token that carries it may be live; then the
    /// keys of credentials the set signed with before that signed a token
    /// not yet expired. None while the set's signer is decommissioned.
    pub(super) async fn published(
        &self,
        set: &KeySet,
        now: i64,
    ) -> Result<Vec<PublishedKey>, String> {
        if self.signer_retired(set) {
            return Ok(Vec::new());
        }
        let versions = self.signing_versions(set).await?;
        let ledger = self.backend.token_ledger();
        let uses = ledger.signed_under(&set.ledger_prefix())?;
        let legacy = ledger.signed_until(&set.credential.to_string())?;
        let own = set.ledger_name(&set.credential);
        let live = |name: &str, version: u64| {
            uses.iter()
                .any(|(n, v, until)| n == name && *v == version && *until > now)
        };
        let legacy_live = |version: u64| {
            legacy
                .iter()
                .any(|(v, until)| *v == version && *until > now)
        };
        let foreign = self.foreign_uses(set, now)?;
        let theirs = |credential: &CredentialKey, version: u64| {
            let name = credential.to_string();
            foreign.iter().any(|(c, v, _)| *c == name && *v == version)
        };
        let mut keys: Vec<PublishedKey> = Vec::new();
        let mut publish = |kid: Option<String>, pem: &str| {
            if let Some(kid) = kid
                && !keys.iter().any(|k| k.kid == kid)
            {
                keys.push(PublishedKey {
                    kid,
                    public_pem: pem.to_owned(),
                });
            }
        };
        let accepted = AgentKey::accepted(&versions);
        let mut older: Vec<&VersionRow> = versions
            .iter()
            .filter(|v| !matches!(v.stage, crate::model::Stage::Pending))
            .filter(|v| !accepted.iter().any(|k| k.version == v.version))
            .filter(|v| live(&own, v.version) || legacy_live(v.version))
            .collect();
        older.sort_by_key(|v| std::cmp::Reverse(v.version));
        let shown: Vec<(u64, &str)> = accepted
            .iter()
            .map(|k| (k.version, k.public_pem.as_str()))
            .chain(
                older
                    .iter()
                    .filter_map(|v| Some((v.version, v.public.as_deref()?))),
            )
            .filter(|(version, _)| !theirs(&set.credential, *version))
            .collect();
        for (_, pem) in &shown {
            publish(exchange::ed25519_kid_of_pem(pem), pem);
        }
        for (version, pem) in &shown {
            if legacy_live(*version) {
                publish(Some(set.legacy_kid(*version)), pem);
            }
        }
        // Versions that signed a token still live whose rows state has
        // pruned (it keeps the newest retired versions only): their public
        // keys as the ledger kept them.
        let kept = ledger.public_keys_under(&set.ledger_prefix())?;
        let pruned = |name: &str, credential: &CredentialKey, version: u64, rows: &[VersionRow]| {
            live(name, version)
                && !rows.iter().any(|r| r.version == version)
                && !theirs(credential, version)
        };
        for (name, version, pem) in &kept {
            if *name == own && pruned(name, &set.credential, *version, &versions) {
                publish(exchange::ed25519_kid_of_pem(pem), pem);
            }
        }
        // The credentials the set signed with before (`signing_credential`
        // changed): their keys while a token they signed may be live.
        let mut before: Vec<&str> = uses
            .iter()
            .filter(|(n, _, until)| *n != own && *until > now)
            .map(|(n, _, _)| n.as_str())
            .collect();
        before.sort_unstable();
        before.dedup();
        for name in before {
            let Some(credential) = name
                .strip_prefix(set.ledger_prefix().as_str())
                .and_then(parse_credential)
            else {
                continue;
            };
            if self
                .backend
                .decommissioned_at(credential.agent.as_str())
                .is_some()
            {
                continue;
            }
            let all = self.backend.signing_versions(&credential).await?;
            for (n, version, pem) in &kept {
                if n == name && pruned(name, &credential, *version, &all) {
                    publish(exchange::ed25519_kid_of_pem(pem), pem);
                }
            }
            let mut rows = all;
            rows.retain(|v| {
                !matches!(v.stage, crate::model::Stage::Pending)
                    && live(name, v.version)
                    && !theirs(&credential, v.version)
            });
            rows.sort_by_key(|v| std::cmp::Reverse(v.version));
            for v in &rows {
                if let Some(pem) = v.public.as_deref() {
                    publish(exchange::ed25519_kid_of_pem(pem), pem);
                }
            }
        }
        Ok(keys)
    }

    /// `GET /.well-known/jwks.json` (`tenant` `None`), or a tenant's
    /// `GET /tenants/NAME/jwks.json`: only that key set's keys; 404 for a
    /// tenant without a key of its own.
    pub async fn jwks(&self, tenant: Option<&str>) -> Reply {
        let Some(set) = self.tenant_keys(tenant) else {
            return not_found_tenant();
        };
        match self.published(set, now_secs()).await {
            Ok(keys) => Reply::ok(exchange::jwks_document(&keys)),
            Err(e) => {
                tracing::error!("token service: cannot list the signing keys: {e}");
                Reply::error(&err(
                    "temporarily_unavailable",
                    "the signing keys cannot be read now; retry",
                ))
            }
        }
    }

    /// Whether the agent holding a key set's signing credential is
    /// decommissioned: its keys are destroyed, so the set signs nothing
    /// more, publishes nothing and none of its tokens is active.
    pub(super) fn signer_retired(&self, set: &KeySet) -> bool {
        self.backend
            .decommissioned_at(set.credential.agent.as_str())
            .is_some()
    }

    /// A key set's current signing key and its version, read from the
    /// vault when the current version changed since the last read.
    pub(super) async fn signing_key(
        &self,
        set: &KeySet,
    ) -> Result<(u64, Arc<SigningKey>), ExchangeError> {
        let unavailable = |why: String| {
            tracing::error!("token service: no signing key ({}): {why}", set.credential);
            err(
                "server_error",
                "the token service cannot sign now: the operator must check the signing credential (the daemon's log says why)",
            )
        };
        if self.signer_retired(set) {
            return Err(unavailable(format!(
                "agent {} is decommissioned and its keys destroyed: name another signing_credential and reload",
                set.credential.agent
            )));
        }
        let versions = self.signing_versions(set).await.map_err(unavailable)?;
        let Some(current) = versions
            .iter()
            .find(|v| v.stage == crate::model::Stage::Current)
        else {
            return Err(unavailable(
                "the signing credential has no current version yet".into(),
            ));
        };
        if let Some((v, key)) = &*lock(&set.signing)
            && *v == current.version
        {
            return Ok((*v, key.clone()));
        }
        // Not cached: a version new to this set. One that signed for
        // another set (a reload moved the credential) must not sign here
        // while those tokens may be live.
        let foreign = self
            .foreign_uses(set, now_secs())
            .map_err(|e| unavailable(format!("cannot read the signing key uses: {e}")))?;
        let name = set.credential.to_string();
        if let Some((_, _, until)) = foreign
            .iter()
            .find(|(c, v, _)| *c == name && *v == current.version)
        {
            return Err(unavailable(format!(
                "version {} of {} signed tokens for another key set that may be live for {}s more, \
                 and a key never signs for two sets (they would trust each other's tokens): \
                 rotate it (`keyturn rotate {}`) so this set signs with a version of its own",
                current.version,
                set.credential,
                until - now_secs(),
                set.credential
            )));
        }
        let pem = self
            .backend
            .signing_value(current)
            .await
            .map_err(unavailable)?;
        let key = SigningKey::from_ed25519_pem(&pem).ok_or_else(|| {
            unavailable(format!(
                "version {} of the signing credential is not an Ed25519 private key",
                current.version
            ))
        })?;
        let key = Arc::new(key);
        *lock(&set.signing) = Some((current.version, key.clone()));
        Ok((current.version, key))
    }

    /// Makes sure the ledger keeps `version` of `set`'s credential
    /// published until `exp`.
    pub(super) fn note_signed(&self, set: &KeySet, version: u64, exp: i64) -> Result<(), String> {
        let mut signed = lock(&set.signed);
        if signed.get(&version).is_some_and(|until| *until >= exp) {
            return Ok(());
        }
        let ttl = i64::try_from(set.policy.max_ttl.as_secs()).unwrap_or(i64::MAX);
        let until = exp.saturating_add(ttl);
        // Its public key, kept with the record: the JWKS publishes it from
        // there once state has pruned the version (black-box finding: a
        // credential rotated eleven times took a live token's key away).
        let public = lock(&set.versions_cache).as_ref().and_then(|(_, _, rows)| {
            rows.iter()
                .find(|r| r.version == version)
                .and_then(|r| r.public.clone())
        });
        self.backend.token_ledger().signed(
            &set.ledger_name(&set.credential),
            version,
            until,
            public.as_deref(),
        )?;
        signed.insert(version, until);
        Ok(())
    }
}
