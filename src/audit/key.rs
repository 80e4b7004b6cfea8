//! The audit key: what makes the chain keyed (HMAC-SHA256 instead of a plain
//! SHA-256), so that write access to the log and the state database is not
//! enough to forge a consistent history.
//!
//! Found, in order: `[daemon] audit_key_file`; else the systemd credential
//! [`AUDIT_KEY_CREDENTIAL`] in `$CREDENTIALS_DIRECTORY` (`LoadCredential=` or
//! `LoadCredentialEncrypted=`); else there is none and the chain stays plain.
//! keyturn never creates the key: a missing or unusable key file is an error.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use zeroize::Zeroizing;

use crate::vaults::local::read_capped;

/// The name of the systemd credential holding the key.
pub const AUDIT_KEY_CREDENTIAL: &str = "keyturn-audit-key";
/// Fewest key bytes accepted.
pub const MIN_KEY_LEN: usize = 32;
/// Most key bytes read (a key is 32 random bytes; more is a wrong file).
const MAX_KEY_LEN: usize = 4096;

/// How to make a key, for the errors.
fn how_to_make(path: &Path) -> String {
    let p = path.display();
    format!("make one with `head -c 32 /dev/urandom > {p}; chmod 600 {p}`")
}

/// The audit key. Zeroized on drop; prints as `AuditKey([redacted])`.
#[derive(Clone)]
pub struct AuditKey(Zeroizing<Vec<u8>>);

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditKey([redacted])")
    }
}

impl AuditKey {
    /// A key of at least [`MIN_KEY_LEN`] bytes.
    /// A key of text (printable ASCII, as `openssl rand -hex 32` writes)
    /// counts its characters without the final newline; a key of one byte
    /// value repeated (a zeroed file, a placeholder) is no key.
    pub fn from_bytes(bytes: Zeroizing<Vec<u8>>) -> Result<AuditKey, String> {
        let text = bytes
            .strip_suffix(b"\n")
            .filter(|t| t.iter().all(|b| b.is_ascii_graphic() || *b == b' '));
        match text {
            Some(t) if t.len() < MIN_KEY_LEN => {
                return Err(format!(
                    "holds {} characters of text (not counting the final newline); an audit key needs at least {MIN_KEY_LEN}",
                    t.len()
                ));
            }
            _ if bytes.len() < MIN_KEY_LEN => {
                return Err(format!(
                    "holds {} bytes; an audit key needs at least {MIN_KEY_LEN}",
                    bytes.len()
                ));
            }
            _ => {}
        }
        if bytes.iter().all(|b| *b == bytes[0]) {
            return Err(format!(
                "holds {} times the same byte: not a random key",
                bytes.len()
            ));
        }
        Ok(AuditKey(bytes))
    }

    /// HMAC-SHA256 of `line` under this key, in hex: a keyed record's `prev`.
    pub fn link(&self, line: &[u8]) -> String {
        let mut mac =
            Hmac::<sha2::Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(line);
        hex::encode(mac.finalize().into_bytes())
    }

    /// Loads the key from `key_file`, else from the systemd credential when
    /// `$CREDENTIALS_DIRECTORY` holds it; `None` when neither is given.
    pub fn load(key_file: Option<&Path>) -> Result<Option<AuditKey>, String> {
        let credentials_dir = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        Self::load_from(key_file, credentials_dir.as_deref())
    }

    /// [`load`](Self::load) with the credentials directory passed in, so
    /// tests never touch the process environment.
    pub fn load_from(
        key_file: Option<&Path>,
        credentials_dir: Option<&Path>,
    ) -> Result<Option<AuditKey>, String> {
        if let Some(path) = key_file {
            return read_key_file(path).map(Some);
        }
        let Some(dir) = credentials_dir.filter(|d| !d.as_os_str().is_empty()) else {
            return Ok(None);
        };
        let path = dir.join(AUDIT_KEY_CREDENTIAL);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("audit key credential {}: {e}", path.display())),
        };
        // systemd owns the credentials directory and its modes; no mode check.
        read_key(file, &path, "audit key credential").map(Some)
    }
}

/// The key in `path`: it must exist, be a regular file nobody but its owner
/// can access, and hold at least [`MIN_KEY_LEN`] bytes.
fn read_key_file(path: &Path) -> Result<AuditKey, String> {
    let what = |msg: String| format!("audit key file {}: {msg}", path.display());
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => what(format!(
                "does not exist (keyturn never creates it); {}",
                how_to_make(path)
            )),
            _ if e.raw_os_error() == Some(libc::ELOOP) => {
                what("is a symlink; point audit_key_file at the real file".into())
            }
            _ => what(format!("cannot open: {e}")),
        })?;
    let meta = file
        .metadata()
        .map_err(|e| what(format!("cannot stat: {e}")))?;
    if !meta.file_type().is_file() {
        return Err(what("is not a regular file".into()));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(what(format!(
            "has mode {mode:04o}: group and others must have no access (chmod 600 it)"
        )));
    }
    read_key(file, path, "audit key file")
}

fn read_key(file: File, path: &Path, what: &str) -> Result<AuditKey, String> {
    let bytes = read_capped(file, MAX_KEY_LEN)
        .map_err(|e| format!("{what} {}: cannot read: {e}", path.display()))?;
    if bytes.len() > MAX_KEY_LEN {
        return Err(format!(
            "{what} {}: longer than {MAX_KEY_LEN} bytes; is it the right file?",
            path.display()
        ));
    }
    AuditKey::from_bytes(bytes)
        .map_err(|e| format!("{what} {}: {e}; {}", path.display(), how_to_make(path)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef-canary";

    fn write(path: &Path, bytes: &[u8], mode: u32) {
        std::fs::write(path, bytes).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn the_key_file_comes_first_then_the_credential() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.key");
        write(&file, KEY, 0o600);
        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        let other = b"another key, from the credential!!";
        write(&creds.join(AUDIT_KEY_CREDENTIAL), other, 0o644);

        let from_file = AuditKey::load_from(Some(&file), Some(&creds))
            .unwrap()
            .unwrap();
        let expected = AuditKey::from_bytes(Zeroizing::new(KEY.to_vec())).unwrap();
        assert_eq!(from_file.link(b"x"), expected.link(b"x"));
        let from_cred = AuditKey::load_from(None, Some(&creds)).unwrap().unwrap();
        let expected = AuditKey::from_bytes(Zeroizing::new(other.to_vec())).unwrap();
        assert_eq!(from_cred.link(b"x"), expected.link(b"x"));
        assert_ne!(from_file.link(b"x"), from_cred.link(b"x"));
        // Neither: no key, a plain chain.
        assert!(AuditKey::load_from(None, None).unwrap().is_none());
        assert!(
            AuditKey::load_from(None, Some(dir.path()))
                .unwrap()
                .is_none()
        );
        assert_eq!(format!("{from_file:?}"), "AuditKey([redacted])");
    }

    #[test]
    fn the_link_is_hmac_sha256() {
        // RFC 4231 test case 2 (a short key, allowed only here).
        let key = AuditKey(Zeroizing::new(b"Jefe".to_vec()));
        assert_eq!(
            key.link(b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn unusable_key_files_are_refused_with_how_to_fix_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.key");
        let err = |path: &Path| AuditKey::load_from(Some(path), None).unwrap_err();

        let missing = err(&file);
        assert!(missing.contains("does not exist"), "{missing}");
        assert!(missing.contains("head -c 32 /dev/urandom >"), "{missing}");
        assert!(!file.exists(), "never created");

        write(&file, KEY, 0o640);
        let loose = err(&file);
        assert!(
            loose.contains("mode 0640") && loose.contains("chmod 600"),
            "{loose}"
        );

        write(&file, &KEY[..31], 0o600);
        let short = err(&file);
        assert!(short.contains("holds 31 bytes"), "{short}");
        assert!(short.contains("chmod 600"), "{short}");

        let huge = vec![7u8; MAX_KEY_LEN + 1];
        write(&file, &huge, 0o400);
        assert!(err(&file).contains("longer than"));

        assert!(err(dir.path()).contains("not a regular file"));

        // A symlink to a good key: refused, as every key file is.
        let real = dir.path().join("real.key");
        write(&real, KEY, 0o600);
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(err(&link).contains("is a symlink"), "{}", err(&link));
        // A FIFO does not hang the load.
        let fifo = dir.path().join("fifo.key");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(err(&fifo).contains("not a regular file"), "{}", err(&fifo));
        // A zeroed file, and 31 characters of text with a newline.
        write(&file, &[0u8; 32], 0o600);
        assert!(
            err(&file).contains("32 times the same byte"),
            "{}",
            err(&file)
        );
        write(&file, b"0123456789abcdef0123456789abcde\n", 0o600);
        assert!(
            err(&file).contains("holds 31 characters of text"),
            "{}",
            err(&file)
        );
        // 32 of them with a newline, and 32 random-looking bytes ending in one, are keys.
        write(&file, b"0123456789abcdef0123456789abcdef\n", 0o600);
        assert!(AuditKey::load_from(Some(&file), None).is_ok());
        let mut binary = vec![0xffu8; 31];
        binary.push(b'\n');
        write(&file, &binary, 0o600);
        assert!(AuditKey::load_from(Some(&file), None).is_ok());

        write(&file, KEY, 0o600);
        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        write(&creds.join(AUDIT_KEY_CREDENTIAL), b"short", 0o600);
        let e = AuditKey::load_from(None, Some(&creds)).unwrap_err();
        assert!(
            e.contains("audit key credential") && e.contains("holds 5 bytes"),
            "{e}"
        );

        // No error names the key.
        for e in [missing, loose, short] {
            assert!(
                !e.contains("canary") && !e.contains("0123456789abcdef"),
                "{e}"
            );
        }
    }
}
