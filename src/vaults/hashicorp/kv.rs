//! KV v2 calls: reading and writing versions, the pending slot, promote plans.

use super::*;

impl HashicorpVault {
    pub(super) fn location(&self, path: &str) -> String {
        format!("{}/{path}", self.mount)
    }

    pub(super) fn pending_path(path: &str) -> String {
        format!("{PENDING_PREFIX}/{path}")
    }

    // -----------------------------------------------------------------------
    // KV v2 calls (one HTTP request each)
    // -----------------------------------------------------------------------

    /// Reads the latest (`None`) or a given version. `Ok(None)` on 404
    /// (absent, deleted or destroyed).
    pub(super) async fn read_kv(
        &self,
        step: &str,
        path: &str,
        version: Option<u64>,
    ) -> Result<Option<KvVersion>, PluginError> {
        let location = self.location(path);
        let res = self
            .conn
            .call(step, &location, |c| async move {
                let endpoint = ReadSecretRequest::builder()
                    .mount(self.mount.as_str())
                    .path(path)
                    .version(version)
                    .build()
                    .map_err(endpoint_error)?;
                vaultrs::api::exec_with_result(&*c, endpoint).await
            })
            .await;
        let res: ReadSecretResponse = match res {
            Ok(r) => r,
            Err(e) if e.kind == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let number = res.metadata.version;
        let malformed = |what: &str| {
            let message = format!("version {number} has {what}");
            self.conn.err(ErrorKind::Fatal, step, &location, message)
        };
        let data = match res.data {
            Value::Object(map) => map,
            // A deleted version can come back as `data: null`.
            Value::Null => return Ok(None),
            _ => return Err(malformed("data that is not a map")),
        };
        let rotation = match data.get(ROTATION_KEY) {
            None => None,
            Some(Value::String(s)) => Some(
                RotationId::parse(s)
                    .ok_or_else(|| malformed(&format!("a malformed {ROTATION_KEY}")))?,
            ),
            Some(_) => {
                return Err(malformed(&format!("a {ROTATION_KEY} that is not a string")));
            }
        };
        Ok(Some(KvVersion {
            number,
            rotation,
            data,
        }))
    }

    pub(super) async fn read_meta(
        &self,
        step: &str,
        path: &str,
    ) -> Result<Option<ReadSecretMetadataResponse>, PluginError> {
        let location = self.location(path);
        match self
            .conn
            .call(step, &location, |c| async move {
                vaultrs::kv2::read_metadata(&*c, &self.mount, path).await
            })
            .await
        {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `{field: value, keyturn_rotation: rotation}` with `cas`; returns
    /// the new version number.
    pub(super) async fn write_kv(
        &self,
        step: &str,
        path: &str,
        cas: u64,
        rotation: &RotationId,
        value: &SecretValue,
    ) -> Result<u64, PluginError> {
        let location = self.location(path);
        let text = value.expose_str().ok_or_else(|| {
            self.conn.err(
                ErrorKind::Invalid,
                step,
                &location,
                "the value is not UTF-8 text; KV v2 stores strings",
            )
        })?;
        let cas = u32::try_from(cas).map_err(|_| {
            self.conn.err(
                ErrorKind::Fatal,
                step,
                &location,
                "version number beyond u32",
            )
        })?;
        let mut map = Map::new();
        map.insert(self.field.clone(), Value::String(text.to_owned()));
        map.insert(
            ROTATION_KEY.to_owned(),
            Value::String(rotation.as_str().to_owned()),
        );
        let data = Value::Object(map);
        let res = self
            .conn
            .call(step, &location, |c| {
                let data = data.clone();
                async move {
                    let endpoint = SetSecretRequest::builder()
                        .mount(self.mount.as_str())
                        .path(path)
                        .data(data)
                        .options(SetSecretRequestOptions { cas })
                        .build()
                        .map_err(endpoint_error)?;
                    vaultrs::api::exec_with_result(&*c, endpoint).await
                }
            })
            .await;
        // Best effort: drop our JSON copy of the value promptly.
        wipe_json(data);
        Ok(res?.version)
    }

    pub(super) async fn destroy_versions(
        &self,
        step: &str,
        path: &str,
        versions: Vec<u64>,
    ) -> Result<(), PluginError> {
        // The endpoint's own path: a refusal names what the policy lacks
        // (`update` on `<mount>/destroy/...`), not the data path.
        let location = format!("{}/destroy/{path}", self.mount);
        self.conn.call(step, &location, |c| {
            let versions = versions.clone();
            async move { vaultrs::kv2::destroy_versions(&*c, &self.mount, path, versions).await }
        })
        .await
    }

    pub(super) async fn delete_all(&self, step: &str, path: &str) -> Result<(), PluginError> {
        let location = format!("{}/metadata/{path}", self.mount);
        match self
            .conn
            .call(step, &location, |c| async move {
                vaultrs::kv2::delete_metadata(&*c, &self.mount, path).await
            })
            .await
        {
            Err(e) if e.kind == ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// The latest version number of `path` (0 when it has none), and that
    /// version's data when it can be read.
    pub(super) async fn latest(
        &self,
        step: &str,
        path: &str,
    ) -> Result<(u64, Option<KvVersion>), PluginError> {
        if let Some(v) = self.read_kv(step, path, None).await? {
            return Ok((v.number, Some(v)));
        }
        // 404: no such path, or its latest version is deleted/destroyed; the
        // metadata has the number a cas write must name.
        let current = self
            .read_meta(step, path)
            .await?
            .map_or(0, |m| m.current_version);
        Ok((current, None))
    }

    pub(super) fn to_stored(
        &self,
        step: &str,
        path: &str,
        mut v: KvVersion,
        stage: Stage,
    ) -> Result<StoredVersion, PluginError> {
        let reference = v.reference();
        let problem = match v.data.remove(&self.field) {
            Some(Value::String(s)) => Ok(SecretValue::from_string(s)),
            Some(_) => Err("is not a string"),
            None => Err("is missing"),
        };
        let value = problem.map_err(|what| {
            let message = format!("version {}: field {:?} {what}", v.number, self.field);
            self.conn
                .err(ErrorKind::Invalid, step, &self.location(path), message)
        })?;
        wipe_json(Value::Object(v.data));
        Ok(StoredVersion {
            version: reference,
            rotation: v.rotation,
            stage,
            value,
        })
    }

    pub(super) fn parse_ref(
        &self,
        step: &str,
        path: &str,
        v: &VersionRef,
    ) -> Result<Ref, PluginError> {
        Ref::parse(v).ok_or_else(|| {
            self.conn.err(
                ErrorKind::Invalid,
                step,
                &self.location(path),
                format!("{v:?} is not a version reference of this vault (a rotation id or kv-<N>)"),
            )
        })
    }

    /// Reads the previous version (latest − 1) when its data is still there.
    pub(super) async fn read_previous(
        &self,
        step: &str,
        path: &str,
        latest: u64,
    ) -> Result<Option<KvVersion>, PluginError> {
        if latest < 2 {
            return Ok(None);
        }
        self.read_kv(step, path, Some(latest - 1)).await
    }

    /// The number of the version `target` names among those before
    /// `latest - 1` whose data is not destroyed, newest first: where the
    /// previous version is when the path was written by someone else after
    /// the current one. Reads at most [`MAX_OLDER_READS`] versions.
    pub(super) async fn find_older(
        &self,
        step: &str,
        path: &str,
        latest: u64,
        target: &Ref,
    ) -> Result<Option<u64>, PluginError> {
        if latest < 3 {
            return Ok(None);
        }
        let Some(meta) = self.read_meta(step, path).await? else {
            return Ok(None);
        };
        let mut live: Vec<u64> = meta
            .versions
            .iter()
            .filter(|(_, m)| !m.destroyed)
            .filter_map(|(n, _)| n.parse().ok())
            .filter(|n| *n + 1 < latest)
            .collect();
        if let Ref::Kv(n) = target {
            // Named by number: only that one can be it.
            live.retain(|v| v == n);
        }
        live.sort_unstable_by(|a, b| b.cmp(a));
        for n in live.into_iter().take(MAX_OLDER_READS) {
            if let Some(v) = self.read_kv(step, path, Some(n)).await?
                && v.is(target)
            {
                return Ok(Some(n));
            }
        }
        Ok(None)
    }

    // -----------------------------------------------------------------------
    // Promote, in two halves so tests can put a writer between them
    // -----------------------------------------------------------------------

    /// `expected`: see [`Vault::promote_from`].
    pub(super) async fn plan_promote(
        &self,
        path: &str,
        target: &Ref,
        expected: Option<&VersionRef>,
    ) -> Result<PromotePlan, PluginError> {
        const STEP: &str = "promote";
        let pending_path = Self::pending_path(path);
        let slot = match target {
            Ref::Rotation(_) => self.read_kv(STEP, &pending_path, None).await?,
            Ref::Kv(_) => None,
        };
        let clear_slot = slot.as_ref().is_some_and(|s| s.is(target));
        let refuse = |kind, why: &str| {
            let message = format!("version {} {why}", ref_text(target));
            self.conn.err(kind, STEP, &self.location(path), message)
        };
        let (latest, latest_data) = self.latest(STEP, path).await?;
        let before = latest_data.as_ref().map(KvVersion::reference);
        // The engine retired everything older than `expected`; when that
        // is what is current, the version that becomes retired now (the one
        // before it) has no data left to destroy.
        let retire_older = expected.is_none() || before.as_ref() != expected;
        if latest_data.as_ref().is_some_and(|v| v.is(target)) {
            return Ok(PromotePlan {
                before,
                clear_slot,
                // A replay: what was current before this version is not
                // known here, so the clean-up is done again (a no-op).
                retire_older: self
                    .older_to_destroy(STEP, path, latest.saturating_sub(2), expected)
                    .await?,
                action: PromoteAction::Done,
            });
        }
        let (source, rotation) = if let Some(slot) = slot.filter(|s| s.is(target)) {
            let rotation = slot.rotation.clone();
            (
                self.to_stored(STEP, &pending_path, slot, Stage::Pending)?,
                rotation,
            )
        } else if let Some(prev) = self
            .read_previous(STEP, path, latest)
            .await?
            .filter(|p| p.is(target))
        {
            // A rollback: the previous value becomes current again.
            let rotation = prev.rotation.clone();
            (self.to_stored(STEP, path, prev, Stage::Previous)?, rotation)
        } else {
            return Err(refuse(
                ErrorKind::NotFound,
                "is not pending, current or previous (never staged here, or already retired)",
            ));
        };
        let Some(rotation) = rotation else {
            return Err(refuse(
                ErrorKind::Invalid,
                "was not written by keyturn; only keyturn's versions can be promoted",
            ));
        };
        // The write makes `latest + 1` current; the one before the new
        // previous is `latest - 1`.
        let retire_older = if retire_older {
            self.older_to_destroy(STEP, path, latest.saturating_sub(1), expected)
                .await?
        } else {
            None
        };
        Ok(PromotePlan {
            before,
            clear_slot,
            retire_older,
            action: PromoteAction::Write {
                cas: latest,
                rotation,
                value: source.value,
            },
        })
    }

    /// KV version `n`, when its data is to be destroyed by a promote's
    /// clean-up: keyturn wrote it and it is not `expected` (what keyturn
    /// holds current, which becomes the previous and lives through its
    /// grace). Black-box finding: after someone else wrote the path, the
    /// clean-up destroyed whatever sat two versions back: keyturn's previous
    /// value within its grace, or the other writer's data.
    async fn older_to_destroy(
        &self,
        step: &str,
        path: &str,
        n: u64,
        expected: Option<&VersionRef>,
    ) -> Result<Option<u64>, PluginError> {
        if n == 0 {
            return Ok(None);
        }
        Ok(self
            .read_kv(step, path, Some(n))
            .await?
            .filter(|v| v.rotation.is_some() && expected != Some(&v.reference()))
            .map(|v| v.number))
    }

    /// Carries out `plan`; returns what was current before it.
    pub(super) async fn commit_promote(
        &self,
        path: &str,
        plan: PromotePlan,
    ) -> Result<Option<VersionRef>, PluginError> {
        const STEP: &str = "promote";
        if let PromoteAction::Write {
            cas,
            rotation,
            value,
        } = plan.action
        {
            self.write_kv(STEP, path, cas, &rotation, &value).await?;
        }
        // The clean-up a crash may have interrupted; both calls are idempotent.
        // The version before the new previous is retired: destroy its data
        // (destroying a missing or destroyed version is a no-op in KV v2).
        if let Some(older) = plan.retire_older {
            self.destroy_versions(STEP, path, vec![older]).await?;
        }
        if plan.clear_slot {
            self.delete_all(STEP, &Self::pending_path(path)).await?;
        }
        Ok(plan.before)
    }
}

/// An endpoint builder's error, as the client error a call returns.
pub(crate) fn endpoint_error(e: impl std::error::Error + Send + Sync + 'static) -> ClientError {
    ClientError::RestClientError {
        source: rustify::errors::ClientError::EndpointBuildError { source: e.into() },
    }
}
