//! The SQL behind each operation: sealing and opening values, stage, read, promote, retire, destroy.

use super::*;

impl Inner {
    pub(super) fn lock(m: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock dropped its transaction, which rolls
        // back: the connection is still consistent, so keep using it.
        m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn err(
        &self,
        kind: ErrorKind,
        op: &str,
        path: &str,
        detail: impl fmt::Display,
    ) -> PluginError {
        PluginError::new(
            kind,
            format!("local vault {}: {op} {path}: {detail}", self.name),
        )
    }

    pub(super) fn sql(
        &self,
        op: &'static str,
        path: &str,
    ) -> impl Fn(rusqlite::Error) -> PluginError + '_ {
        let path = path.to_owned();
        move |e| self.err(sql_kind(&e), op, &path, e)
    }

    pub(super) fn seal(
        &self,
        path: &str,
        version: i64,
        rotation: &str,
        value: &SecretValue,
    ) -> Result<(Vec<u8>, Vec<u8>), PluginError> {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let aad = version_aad(path, version, rotation);
        let ciphertext = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: value.expose(),
                    aad: &aad,
                },
            )
            .map_err(|_| {
                self.err(
                    ErrorKind::Fatal,
                    "stage",
                    path,
                    format!("encrypting version {version} failed"),
                )
            })?;
        Ok((nonce.to_vec(), ciphertext))
    }

    pub(super) fn open_row(
        &self,
        path: &str,
        row: Row,
    ) -> Result<Option<StoredVersion>, PluginError> {
        let v = row.version;
        let corrupt = |what: &str| {
            self.err(
                ErrorKind::Fatal,
                "read",
                path,
                format!("version {v} is corrupt: {what}"),
            )
        };
        let stage = Stage::parse(&row.stage).ok_or_else(|| corrupt("unknown stage"))?;
        if stage == Stage::Retired {
            return Ok(None);
        }
        let (Some(nonce), Some(ciphertext)) = (row.nonce, row.ciphertext) else {
            return Err(corrupt("its value is missing"));
        };
        if nonce.len() != NONCE_LEN {
            return Err(corrupt("bad nonce length"));
        }
        let aad = version_aad(path, v, &row.rotation_id);
        let plaintext = self
            .cipher
            .decrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| {
                self.err(
                    ErrorKind::Fatal,
                    "read",
                    path,
                    format!("cannot decrypt version {v}: wrong key, or the row was tampered with or moved"),
                )
            })?;
        Ok(Some(StoredVersion {
            version: VersionRef(v.to_string()),
            rotation: RotationId::parse(&row.rotation_id),
            stage,
            value: SecretValue::new(plaintext),
        }))
    }

    pub(super) fn stage(
        &self,
        tx: &Connection,
        path: &str,
        rotation: &RotationId,
        value: &SecretValue,
    ) -> Result<VersionRef, PluginError> {
        let sql = self.sql("stage", path);
        let existing: Option<i64> = tx
            .prepare_cached("SELECT version FROM versions WHERE path = ?1 AND rotation_id = ?2")
            .and_then(|mut s| {
                s.query_row(params![path, rotation.as_str()], |r| r.get(0))
                    .optional()
            })
            .map_err(&sql)?;
        if let Some(version) = existing {
            // Idempotent replay: the value stored the first time wins.
            return Ok(VersionRef(version.to_string()));
        }

        // Only one pending per path. Another rotation's pending version is
        // the leftover of a rotation that crashed and was abandoned (the
        // engine never runs two rotations of one credential at once).
        let stale: Vec<i64> = tx
            .prepare_cached(
                "UPDATE versions SET stage = 'retired', nonce = NULL, ciphertext = NULL
                 WHERE path = ?1 AND stage = 'pending' RETURNING version",
            )
            .and_then(|mut s| s.query_map([path], |r| r.get(0))?.collect())
            .map_err(&sql)?;
        for version in &stale {
            tracing::warn!(
                vault = %self.name, path, version, rotation = %rotation,
                "replaced the pending version of an abandoned rotation"
            );
        }

        // max() of both, so a lost counter row can never cause a reuse.
        let version: i64 = tx
            .prepare_cached(
                "SELECT max(coalesce((SELECT last_version FROM paths WHERE path = ?1), 0),
                            coalesce((SELECT max(version) FROM versions WHERE path = ?1), 0)) + 1",
            )
            .and_then(|mut s| s.query_row([path], |r| r.get(0)))
            .map_err(&sql)?;
        tx.prepare_cached(
            "INSERT INTO paths (path, last_version) VALUES (?1, ?2)
             ON CONFLICT (path) DO UPDATE SET last_version = excluded.last_version",
        )
        .and_then(|mut s| s.execute(params![path, version]))
        .map_err(&sql)?;

        let (nonce, ciphertext) = self.seal(path, version, rotation.as_str(), value)?;
        tx.prepare_cached(
            "INSERT INTO versions (path, version, rotation_id, stage, created_at, nonce, ciphertext)
             VALUES (?1, ?2, ?3, 'pending', ?4, ?5, ?6)",
        )
        .and_then(|mut s| {
            s.execute(params![
                path,
                version,
                rotation.as_str(),
                chrono::Utc::now().timestamp_millis(),
                nonce,
                ciphertext
            ])
        })
        .map_err(&sql)?;
        Ok(VersionRef(version.to_string()))
    }

    pub(super) fn read(
        &self,
        path: &str,
        select: Selector,
    ) -> Result<Option<StoredVersion>, PluginError> {
        let sql = self.sql("read", path);
        let conn = Self::lock(&self.reader);
        let map = |r: &rusqlite::Row<'_>| {
            Ok(Row {
                version: r.get(0)?,
                rotation_id: r.get(1)?,
                stage: r.get(2)?,
                nonce: r.get(3)?,
                ciphertext: r.get(4)?,
            })
        };
        let row = match select {
            // Retired versions have no value left to read.
            Selector::Stage(Stage::Retired) => return Ok(None),
            Selector::Stage(stage) => conn
                .prepare_cached(
                    "SELECT version, rotation_id, stage, nonce, ciphertext FROM versions
                     WHERE path = ?1 AND stage = ?2 ORDER BY version DESC LIMIT 1",
                )
                .and_then(|mut s| s.query_row(params![path, stage.as_str()], map).optional()),
            Selector::Version(version) => conn
                .prepare_cached(
                    "SELECT version, rotation_id, stage, nonce, ciphertext FROM versions
                     WHERE path = ?1 AND version = ?2",
                )
                .and_then(|mut s| s.query_row(params![path, version], map).optional()),
        }
        .map_err(&sql)?;
        drop(conn);
        match row {
            Some(row) => self.open_row(path, row),
            None => Ok(None),
        }
    }

    /// The stage of `version`, inside `tx`.
    pub(super) fn stage_of(
        &self,
        tx: &Connection,
        op: &'static str,
        path: &str,
        version: i64,
    ) -> Result<Option<Stage>, PluginError> {
        let stage: Option<String> = tx
            .prepare_cached("SELECT stage FROM versions WHERE path = ?1 AND version = ?2")
            .and_then(|mut s| s.query_row(params![path, version], |r| r.get(0)).optional())
            .map_err(self.sql(op, path))?;
        stage
            .map(|s| {
                Stage::parse(&s).ok_or_else(|| {
                    self.err(
                        ErrorKind::Fatal,
                        op,
                        path,
                        format!("version {version} is corrupt: unknown stage"),
                    )
                })
            })
            .transpose()
    }

    pub(super) fn promote(
        &self,
        tx: &Connection,
        path: &str,
        version: i64,
    ) -> Result<(), PluginError> {
        let sql = self.sql("promote", path);
        match self.stage_of(tx, "promote", path, version)? {
            None => {
                return Err(self.err(
                    ErrorKind::NotFound,
                    "promote",
                    path,
                    format!("version {version} does not exist"),
                ));
            }
            Some(Stage::Current) => return Ok(()),
            Some(Stage::Retired) => {
                return Err(self.err(
                    ErrorKind::Conflict,
                    "promote",
                    path,
                    format!(
                        "version {version} is retired (its value is gone); it cannot become current"
                    ),
                ));
            }
            Some(Stage::Pending | Stage::Previous) => {}
        }
        // Order matters: wipe the old previous (unless it is the version being
        // promoted back, a rollback), then shift current → previous, then
        // make `version` current.
        tx.prepare_cached(
            "UPDATE versions SET stage = 'retired', nonce = NULL, ciphertext = NULL
             WHERE path = ?1 AND stage = 'previous' AND version != ?2",
        )
        .and_then(|mut s| s.execute(params![path, version]))
        .map_err(&sql)?;
        tx.prepare_cached(
            "UPDATE versions SET stage = 'previous' WHERE path = ?1 AND stage = 'current'",
        )
        .and_then(|mut s| s.execute([path]))
        .map_err(&sql)?;
        tx.prepare_cached("UPDATE versions SET stage = 'current' WHERE path = ?1 AND version = ?2")
            .and_then(|mut s| s.execute(params![path, version]))
            .map_err(&sql)?;
        prune_retired(tx, path).map_err(&sql)?;
        Ok(())
    }

    pub(super) fn retire(
        &self,
        tx: &Connection,
        path: &str,
        version: i64,
    ) -> Result<(), PluginError> {
        let sql = self.sql("retire", path);
        match self.stage_of(tx, "retire", path, version)? {
            // Gone (pruned or destroyed) or already retired: nothing to do.
            None | Some(Stage::Retired) => return Ok(()),
            Some(stage @ (Stage::Current | Stage::Pending)) => {
                return Err(self.err(
                    ErrorKind::Invalid,
                    "retire",
                    path,
                    format!(
                        "version {version} is {stage}; only the previous version can be retired"
                    ),
                ));
            }
            Some(Stage::Previous) => {}
        }
        tx.prepare_cached(
            "UPDATE versions SET stage = 'retired', nonce = NULL, ciphertext = NULL
             WHERE path = ?1 AND version = ?2",
        )
        .and_then(|mut s| s.execute(params![path, version]))
        .map_err(&sql)?;
        prune_retired(tx, path).map_err(&sql)?;
        Ok(())
    }

    pub(super) fn destroy(&self, tx: &Connection, path: &str) -> Result<(), PluginError> {
        let sql = self.sql("destroy", path);
        // secure_delete overwrites the deleted cells; the `paths` counter
        // stays so numbers never repeat.
        tx.prepare_cached("DELETE FROM versions WHERE path = ?1")
            .and_then(|mut s| s.execute([path]))
            .map_err(sql)?;
        Ok(())
    }

    pub(super) fn check(&self) -> Result<(), PluginError> {
        let conn = Self::lock(&self.reader);
        conn.prepare_cached("SELECT count(*) FROM meta")
            .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
            .map_err(|e| {
                PluginError::new(
                    sql_kind(&e),
                    format!(
                        "local vault {}: check {}: {e}",
                        self.name,
                        self.db_path.display()
                    ),
                )
            })?;
        Ok(())
    }
}

/// Keeps the metadata of only the newest `RETIRED_KEPT` retired versions.
pub(super) fn prune_retired(tx: &Connection, path: &str) -> rusqlite::Result<usize> {
    tx.prepare_cached(
        "DELETE FROM versions WHERE path = ?1 AND stage = 'retired' AND version NOT IN
           (SELECT version FROM versions WHERE path = ?1 AND stage = 'retired'
            ORDER BY version DESC LIMIT ?2)",
    )?
    .execute(params![path, RETIRED_KEPT])
}

/// Associated data for one version: the ciphertext only opens at the path,
/// version and rotation it was sealed for. Length-prefixed, so no two
/// different triples encode alike.
pub(super) fn version_aad(path: &str, version: i64, rotation: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(VERSION_AAD_PREFIX.len() + 24 + path.len() + rotation.len());
    aad.extend_from_slice(VERSION_AAD_PREFIX);
    aad.extend_from_slice(&(path.len() as u64).to_be_bytes());
    aad.extend_from_slice(path.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(&(rotation.len() as u64).to_be_bytes());
    aad.extend_from_slice(rotation.as_bytes());
    aad
}

pub(super) fn sql_kind(e: &rusqlite::Error) -> ErrorKind {
    use rusqlite::ErrorCode as C;
    match e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            C::DatabaseBusy
            | C::DatabaseLocked
            | C::SystemIoFailure
            | C::DiskFull
            | C::OutOfMemory => ErrorKind::Transient,
            C::PermissionDenied | C::ReadOnly | C::CannotOpen => ErrorKind::Unauthorized,
            C::ConstraintViolation => ErrorKind::Conflict,
            _ => ErrorKind::Fatal,
        },
        // Type and conversion errors mean a row does not look like ours.
        _ => ErrorKind::Fatal,
    }
}

/// The path is only a database key here, but a path that would be unsafe in
/// any other vault or as a file name is refused everywhere alike.
pub(super) fn check_path(vault: &str, path: &str) -> Result<(), PluginError> {
    let bad = |why: &str| {
        PluginError::new(
            ErrorKind::Invalid,
            format!("local vault {vault}: path {path:?} {why}"),
        )
    };
    if path.is_empty() {
        return Err(bad("is empty"));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(bad("is too long"));
    }
    if path.starts_with('/') {
        return Err(bad("is absolute"));
    }
    if path.chars().any(|c| c.is_control()) {
        return Err(bad("contains control characters"));
    }
    if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad("has an empty, '.' or '..' component"));
    }
    Ok(())
}

/// The decimal version number of a [`VersionRef`]; only canonical numbers
/// this vault could have handed out are accepted.
pub(super) fn parse_version(vault: &str, path: &str, v: &VersionRef) -> Result<i64, PluginError> {
    match v.0.parse::<i64>() {
        Ok(n) if n >= 1 && n.to_string() == v.0 => Ok(n),
        _ => Err(PluginError::new(
            ErrorKind::Invalid,
            format!(
                "local vault {vault}: {path}: {:?} is not a local vault version number",
                v.0
            ),
        )),
    }
}
