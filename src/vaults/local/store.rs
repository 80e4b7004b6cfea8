//! The SQL behind each operation: sealing and opening values, stage, read, promote, retire, destroy.

use super::*;

/// A row's stage and its value, opened.
pub(super) type Opened = (Stage, Zeroizing<Vec<u8>>);

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

    /// Seals `value` for `(path, version, rotation, stage)` under a fresh nonce.
    pub(super) fn seal(
        &self,
        path: &str,
        version: i64,
        rotation: &str,
        stage: Stage,
        value: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>), PluginError> {
        seal_with(
            &self.cipher,
            &version_aad(path, version, rotation, stage),
            value,
        )
        .ok_or_else(|| {
            self.err(
                ErrorKind::Fatal,
                "stage",
                path,
                format!("encrypting version {version} failed"),
            )
        })
    }

    /// The stage and plaintext of `row`, `None` when it is retired. Its
    /// value only opens for the path, version, rotation and stage it was
    /// sealed for: a wrong key or any of them changed since is `Fatal`.
    pub(super) fn unseal(
        &self,
        op: &str,
        path: &str,
        row: &Row,
    ) -> Result<Option<Opened>, PluginError> {
        let v = row.version;
        let corrupt = |what: &str| {
            self.err(
                ErrorKind::Fatal,
                op,
                path,
                format!("version {v} is corrupt: {what}"),
            )
        };
        let stage = Stage::parse(&row.stage).ok_or_else(|| corrupt("unknown stage"))?;
        if stage == Stage::Retired {
            return Ok(None);
        }
        let (Some(nonce), Some(ciphertext)) = (&row.nonce, &row.ciphertext) else {
            return Err(corrupt("its value is missing"));
        };
        if nonce.len() != NONCE_LEN {
            return Err(corrupt("bad nonce length"));
        }
        let aad = version_aad(path, v, &row.rotation_id, stage);
        let plaintext = unseal_with(&self.cipher, &aad, nonce, ciphertext).ok_or_else(|| {
            self.err(
                ErrorKind::Fatal,
                op,
                path,
                format!(
                    "cannot decrypt version {v}: wrong key, or the row was tampered with, moved or given another stage"
                ),
            )
        })?;
        Ok(Some((stage, Zeroizing::new(plaintext))))
    }

    /// The row of `version`, inside `tx` (or through the reader).
    pub(super) fn row(
        &self,
        conn: &Connection,
        op: &'static str,
        path: &str,
        version: i64,
    ) -> Result<Option<Row>, PluginError> {
        conn.prepare_cached(
            "SELECT version, rotation_id, stage, nonce, ciphertext FROM versions
             WHERE path = ?1 AND version = ?2",
        )
        .and_then(|mut s| {
            s.query_row(params![path, version], Row::from_sql)
                .optional()
        })
        .map_err(self.sql(op, path))
    }

    /// Moves `version` (at stage `from`) to `to`, re-sealing its value for
    /// the new stage (the stage is part of the associated data). Every
    /// current or previous row passes through here, so a stage written
    /// into the database by anyone else fails to open.
    pub(super) fn restage(
        &self,
        tx: &Connection,
        path: &str,
        version: i64,
        from: Stage,
        to: Stage,
    ) -> Result<(), PluginError> {
        let row = self.row(tx, "promote", path, version)?;
        let opened = match &row {
            Some(row) => self.unseal("promote", path, row)?,
            None => None,
        };
        let (Some(row), Some((stage, plaintext))) = (row, opened) else {
            return Err(self.err(
                ErrorKind::Fatal,
                "promote",
                path,
                format!("version {version} is corrupt: its {from} value is missing"),
            ));
        };
        if stage != from {
            return Err(self.err(
                ErrorKind::Conflict,
                "promote",
                path,
                format!("version {version} is {stage}, not {from}"),
            ));
        }
        let (nonce, ciphertext) = self.seal(path, version, &row.rotation_id, to, &plaintext)?;
        tx.prepare_cached(
            "UPDATE versions SET stage = ?3, nonce = ?4, ciphertext = ?5
             WHERE path = ?1 AND version = ?2",
        )
        .and_then(|mut s| s.execute(params![path, version, to.as_str(), nonce, ciphertext]))
        .map_err(self.sql("promote", path))?;
        Ok(())
    }

    pub(super) fn open_row(
        &self,
        path: &str,
        row: Row,
    ) -> Result<Option<StoredVersion>, PluginError> {
        let Some((stage, mut plaintext)) = self.unseal("read", path, &row)? else {
            return Ok(None);
        };
        Ok(Some(StoredVersion {
            version: VersionRef(row.version.to_string()),
            rotation: RotationId::parse(&row.rotation_id),
            stage,
            // Moved out, not copied: no second copy to wipe.
            value: SecretValue::new(std::mem::take(&mut *plaintext)),
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

        let (nonce, ciphertext) = self.seal(
            path,
            version,
            rotation.as_str(),
            Stage::Pending,
            value.expose(),
        )?;
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
        let row = match select {
            // Retired versions have no value left to read.
            Selector::Stage(Stage::Retired) => return Ok(None),
            Selector::Stage(stage) => conn
                .prepare_cached(
                    "SELECT version, rotation_id, stage, nonce, ciphertext FROM versions
                     WHERE path = ?1 AND stage = ?2 ORDER BY version DESC LIMIT 1",
                )
                .and_then(|mut s| {
                    s.query_row(params![path, stage.as_str()], Row::from_sql)
                        .optional()
                })
                .map_err(&sql)?,
            Selector::Version(version) => self.row(&conn, "read", path, version)?,
        };
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
        let from = match self.stage_of(tx, "promote", path, version)? {
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
            Some(stage @ (Stage::Pending | Stage::Previous)) => stage,
        };
        // Order matters: wipe the old previous (unless it is the version being
        // promoted back, a rollback), then shift current → previous, then
        // make `version` current.
        tx.prepare_cached(
            "UPDATE versions SET stage = 'retired', nonce = NULL, ciphertext = NULL
             WHERE path = ?1 AND stage = 'previous' AND version != ?2",
        )
        .and_then(|mut s| s.execute(params![path, version]))
        .map_err(&sql)?;
        let current: Vec<i64> = tx
            .prepare_cached("SELECT version FROM versions WHERE path = ?1 AND stage = 'current'")
            .and_then(|mut s| s.query_map([path], |r| r.get(0))?.collect())
            .map_err(&sql)?;
        for old in current {
            self.restage(tx, path, old, Stage::Current, Stage::Previous)?;
        }
        self.restage(tx, path, version, from, Stage::Current)?;
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
/// version, rotation and stage it was sealed for. Length-prefixed, so no
/// two different tuples encode alike. The stage is bound so that a stage
/// changed in the database (the previous version made current again, a
/// silent rollback to a value the target may still accept) fails to open;
/// every stage change re-seals the value (`Inner::restage`).
pub(super) fn version_aad(path: &str, version: i64, rotation: &str, stage: Stage) -> Vec<u8> {
    let stage = stage.as_str();
    let mut aad = aad_of(VERSION_AAD_PREFIX, path, version, rotation, 8 + stage.len());
    aad.extend_from_slice(&(stage.len() as u64).to_be_bytes());
    aad.extend_from_slice(stage.as_bytes());
    aad
}

/// Schema 1's associated data, without the stage: read only to migrate.
pub(super) fn version_aad_v1(path: &str, version: i64, rotation: &str) -> Vec<u8> {
    aad_of(VERSION_AAD_PREFIX_V1, path, version, rotation, 0)
}

/// `prefix`, then path, version and rotation, length-prefixed; `spare`
/// bytes of room for what the caller appends.
fn aad_of(prefix: &[u8], path: &str, version: i64, rotation: &str, spare: usize) -> Vec<u8> {
    let mut aad = Vec::with_capacity(prefix.len() + 24 + path.len() + rotation.len() + spare);
    aad.extend_from_slice(prefix);
    aad.extend_from_slice(&(path.len() as u64).to_be_bytes());
    aad.extend_from_slice(path.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(&(rotation.len() as u64).to_be_bytes());
    aad.extend_from_slice(rotation.as_bytes());
    aad
}

/// `(nonce, ciphertext)` of `value` under a fresh random nonce.
pub(super) fn seal_with(
    cipher: &XChaCha20Poly1305,
    aad: &[u8],
    value: &[u8],
) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut nonce = [0u8; NONCE_LEN];
    OsRng.fill_bytes(&mut nonce);
    let ciphertext = cipher
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: value, aad })
        .ok()?;
    Some((nonce.to_vec(), ciphertext))
}

/// The plaintext, or `None` when it does not open (wrong key, wrong
/// associated data, tampered, or a nonce of the wrong length).
pub(super) fn unseal_with(
    cipher: &XChaCha20Poly1305,
    aad: &[u8],
    nonce: &[u8],
    ciphertext: &[u8],
) -> Option<Vec<u8>> {
    if nonce.len() != NONCE_LEN {
        return None;
    }
    cipher
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .ok()
}

/// Re-seals every value sealed under schema 1's associated data (no stage)
/// for its current stage, inside `conn`'s transaction. A value that does
/// not open is left as it is: reading it reports it, naming the version.
pub(super) fn migrate_v1(conn: &Connection, cipher: &XChaCha20Poly1305) -> rusqlite::Result<usize> {
    type Sealed = (String, i64, String, String, Vec<u8>, Vec<u8>);
    let rows: Vec<Sealed> = conn
        .prepare(
            "SELECT path, version, rotation_id, stage, nonce, ciphertext FROM versions
             WHERE nonce IS NOT NULL AND ciphertext IS NOT NULL",
        )?
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut update = conn.prepare(
        "UPDATE versions SET nonce = ?3, ciphertext = ?4 WHERE path = ?1 AND version = ?2",
    )?;
    let mut migrated = 0;
    for (path, version, rotation, stage, nonce, ciphertext) in rows {
        let Some(stage) = Stage::parse(&stage) else {
            continue;
        };
        let old_aad = version_aad_v1(&path, version, &rotation);
        let Some(plaintext) =
            unseal_with(cipher, &old_aad, &nonce, &ciphertext).map(Zeroizing::new)
        else {
            continue;
        };
        let aad = version_aad(&path, version, &rotation, stage);
        let Some((nonce, ciphertext)) = seal_with(cipher, &aad, &plaintext) else {
            continue;
        };
        update.execute(params![path, version, nonce, ciphertext])?;
        migrated += 1;
    }
    Ok(migrated)
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
