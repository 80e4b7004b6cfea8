//! `keyturn check --online` for a local vault: is the key there, and does it
//! open the database?
//!
//! It must change nothing. `open` creates a missing key file and database,
//! so it is not used: run by root before the daemon's first start, it would
//! leave a root-owned key that the daemon's user cannot read. The database
//! is opened read-only, as `keyturn status` opens the state database.

use super::key::{read_credential, read_key_file};
use super::*;

impl LocalConfig {
    /// The probe itself (blocking file I/O). `Ok(Some(note))`: nothing
    /// wrong, but something was not there to check yet.
    pub(super) fn probe_files(&self, name: &str) -> Result<Option<String>, PluginError> {
        let (dir, key_file, key_credential) = self.checked_paths(name)?;
        let db = dir.join(DB_FILE);
        let db_exists = std::fs::symlink_metadata(&db).is_ok();

        let credentials_dir = std::env::var_os("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty());
        let key = if self.key_credential_required {
            if credentials_dir.is_none() {
                // Run from a shell, not the unit: systemd hands the
                // credential to the service only. Not a failure of the vault.
                return Ok(Some(format!(
                    "key not checked: it is the systemd credential `{key_credential}`, \
                     which only the service gets (run this under the unit's \
                     LoadCredential= to check it)"
                )));
            }
            // Never creates anything: a required credential is the key or an error.
            Some(load_key(key_file, key_credential, true, None)?)
        } else {
            let from_credential = match &credentials_dir {
                Some(d) => read_credential(Path::new(d), key_credential)?,
                None => None,
            };
            match from_credential {
                Some(key) => Some(key),
                None => read_key_file(key_file)?,
            }
        };
        let Some(key) = key else {
            if db_exists {
                let e = super::key::missing_key_of_sealed_db(key_file, &db);
                return Err(PluginError::new(
                    e.kind,
                    format!("local vault {name}: {}", e.message),
                ));
            }
            for wanted in [key_file.parent().unwrap_or(Path::new(".")), dir] {
                creatable(name, wanted)?;
            }
            return Ok(Some(format!(
                "not created yet: the daemon makes the key {} and the database {} at its first start",
                key_file.display(),
                db.display()
            )));
        };
        if !db_exists {
            return Ok(Some(format!(
                "key read; the database {} is not created yet (the daemon makes it at its first start)",
                db.display()
            )));
        }
        let fail = |what: &str, e: rusqlite::Error| {
            PluginError::new(
                sql_kind(&e),
                format!("local vault {name}: {what} {}: {e}", db.display()),
            )
        };
        let conn = Connection::open_with_flags(
            &db,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| fail("opening", e))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| fail("configuring", e))?;
        let sealed: Option<Vec<u8>> = conn
            .query_row("SELECT value FROM meta WHERE name = 'key_check'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| fail("reading the key check in", e))?;
        match sealed {
            Some(value) if !key_check_opens(&value, &key.cipher()) => Err(PluginError::new(
                ErrorKind::Fatal,
                format!("local vault {name}: {WRONG_KEY} ({})", db.display()),
            )),
            Some(_) => Ok(None),
            None => Ok(Some(format!(
                "key read; the database {} has no key check yet (the daemon seals one at its next start)",
                db.display()
            ))),
        }
    }
}

/// `Ok` if `dir` exists as a directory or could be created: its nearest
/// existing ancestor is a directory (whether the daemon's user may write
/// there is for the daemon to find out; this may run as another user).
fn creatable(name: &str, dir: &Path) -> Result<(), PluginError> {
    let mut at = dir;
    loop {
        match std::fs::metadata(at) {
            Ok(m) if m.is_dir() => return Ok(()),
            Ok(_) => {
                return Err(PluginError::new(
                    ErrorKind::Invalid,
                    format!(
                        "local vault {name}: {} cannot be created: {} is not a directory",
                        dir.display(),
                        at.display()
                    ),
                ));
            }
            // ENOTDIR: an ancestor is not a directory; walking up finds it.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                match at.parent() {
                    Some(p) if !p.as_os_str().is_empty() => at = p,
                    _ => return Ok(()),
                }
            }
            Err(e) => {
                return Err(PluginError::io(
                    format!("local vault {name}: {}", at.display()),
                    &e,
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn config(root: &Path) -> LocalConfig {
        LocalConfig {
            dir: Some(root.join("vaults/v")),
            key_file: Some(root.join("keys/v.key")),
            key_credential: Some("keyturn-v-vault-key".into()),
            ..LocalConfig::default()
        }
    }

    fn names(root: &Path) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        found.sort();
        found
    }

    #[test]
    fn the_daemon_makes_no_new_key_beside_a_sealed_database() {
        use crate::vaults::VaultPlugin;
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path());
        // The first start makes the key and the database.
        drop(cfg.open("v").unwrap());
        let key_file = tmp.path().join("keys/v.key");
        let key = std::fs::read(&key_file).unwrap();
        std::fs::remove_file(&key_file).unwrap();

        let e = cfg
            .open("v")
            .err()
            .expect("a missing key beside its database is refused");
        assert_eq!(e.kind, ErrorKind::Fatal, "{e}");
        assert!(
            e.message.contains("restore the key file from your backup"),
            "{e}"
        );
        assert!(
            !key_file.exists(),
            "a new key was made where the lost one belongs"
        );
        // So the probe still says what to do.
        let e = cfg.probe_files("v").unwrap_err();
        assert!(e.message.contains("restore the key file"), "{e}");

        // Restored, it opens.
        std::fs::write(&key_file, &key).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        cfg.open("v").unwrap();
    }

    #[test]
    fn a_vault_never_started_is_ok_and_nothing_is_created() {
        let tmp = tempfile::tempdir().unwrap();
        let note = config(tmp.path()).probe_files("v").unwrap().unwrap();
        assert!(note.contains("not created yet"), "{note}");
        assert!(names(tmp.path()).is_empty(), "the probe created files");

        // A vault directory under a regular file can never be created.
        std::fs::write(tmp.path().join("vaults"), b"").unwrap();
        let e = config(tmp.path()).probe_files("v").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        assert!(e.message.contains("is not a directory"), "{e}");
    }

    #[test]
    fn a_key_only_the_service_gets_is_not_checked_from_a_shell() {
        // The test process is not a systemd service.
        assert!(std::env::var_os("CREDENTIALS_DIRECTORY").is_none());
        let tmp = tempfile::tempdir().unwrap();
        let cfg = LocalConfig {
            key_credential_required: true,
            ..config(tmp.path())
        };
        let note = cfg.probe_files("v").unwrap().unwrap();
        assert!(note.contains("`keyturn-v-vault-key`"), "{note}");
        assert!(note.contains("not checked"), "{note}");
        assert!(names(tmp.path()).is_empty());
    }

    #[test]
    fn an_opened_vault_is_ok_and_a_wrong_or_lost_key_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path());
        drop(cfg.open("v").unwrap());
        assert_eq!(cfg.probe_files("v").unwrap(), None);
        let key_file = cfg.key_file.clone().unwrap();
        let good = std::fs::read(&key_file).unwrap();

        // Readable by others: refused, as the daemon refuses it.
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = cfg.probe_files("v").unwrap_err();
        assert!(e.message.contains("chmod 600"), "{e}");

        // Another key: it does not open the key check.
        std::fs::write(&key_file, [b'a'; 64]).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = cfg.probe_files("v").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Fatal, "{e}");
        assert!(
            e.message.contains("the key does not open this vault"),
            "{e}"
        );
        assert!(!e.message.contains("aaaa"), "{e}");

        // The key file gone, the database still there: restore from backup,
        // and nothing was created in its place.
        std::fs::remove_file(&key_file).unwrap();
        let e = cfg.probe_files("v").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Fatal, "{e}");
        assert!(e.message.contains("restore the key file"), "{e}");
        assert!(!key_file.exists());

        std::fs::write(&key_file, &good).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(cfg.probe_files("v").unwrap(), None);
    }
}
