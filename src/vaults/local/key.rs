//! The vault key: from the systemd credential, else the key file (created 0600 on first start).

use super::*;

/// The 32-byte vault key. Zeroized on drop; prints as `LocalKey([redacted])`.
#[derive(Clone)]
pub struct LocalKey(pub(super) Zeroizing<[u8; KEY_LEN]>);

impl LocalKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// A fresh key from the OS CSPRNG.
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        OsRng.fill_bytes(&mut *key);
        Self(key)
    }

    pub(super) fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&*self.0).into())
    }
}

impl fmt::Debug for LocalKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LocalKey([redacted])")
    }
}

/// Loads the vault key, from `$CREDENTIALS_DIRECTORY/<key_credential>` when
/// systemd passed it, else from `key_file` (created on first start). With
/// `required` (the config names the credential) only the credential will
/// do: missing, it is an error. `sealed_db`: the vault's database, when it
/// exists; a key file missing beside it is an error, not a new key (which
/// could not open it, and would stand where the lost one should be restored).
pub fn load_key(
    key_file: &Path,
    key_credential: &str,
    required: bool,
    sealed_db: Option<&Path>,
) -> Result<LocalKey, PluginError> {
    let credentials_dir = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    load_key_from(
        key_file,
        key_credential,
        required,
        credentials_dir.as_deref(),
        sealed_db,
    )
}

/// [`load_key`] with the credentials directory passed in, so tests never
/// touch the process environment.
pub fn load_key_from(
    key_file: &Path,
    key_credential: &str,
    required: bool,
    credentials_dir: Option<&Path>,
    sealed_db: Option<&Path>,
) -> Result<LocalKey, PluginError> {
    let credentials_dir = credentials_dir.filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = credentials_dir
        && let Some(key) = read_credential(dir, key_credential)?
    {
        return Ok(key);
    }
    // A credential the config names is the key. Falling back to the key
    // file would make a new key that nobody backed up, and values sealed
    // under it would be lost with the state directory.
    if required {
        let why = match credentials_dir {
            Some(dir) => format!("{} has no such file", dir.display()),
            None => "$CREDENTIALS_DIRECTORY is not set".to_owned(),
        };
        return Err(PluginError::new(
            ErrorKind::Invalid,
            format!(
                "local vault key_credential `{key_credential}` is missing: {why}; pass it with LoadCredential={key_credential}:/path/to/key in the unit, or remove key_credential to use key_file {}",
                key_file.display()
            ),
        ));
    }
    // Two attempts: if another process creates the file between our failed
    // read and our O_EXCL create, the second read picks its key up.
    for _ in 0..2 {
        if let Some(key) = read_key_file(key_file)? {
            return Ok(key);
        }
        if let Some(db) = sealed_db {
            return Err(missing_key_of_sealed_db(key_file, db));
        }
        if let Some(key) = create_key_file(key_file)? {
            return Ok(key);
        }
    }
    Err(PluginError::new(
        ErrorKind::Transient,
        format!(
            "local vault key file {}: appears and disappears while being read",
            key_file.display()
        ),
    ))
}

/// The key file is gone but the database it sealed is there.
pub(super) fn missing_key_of_sealed_db(key_file: &Path, db: &Path) -> PluginError {
    PluginError::new(
        ErrorKind::Fatal,
        format!(
            "the key file {} is missing but the database {} exists, sealed with that key; \
             restore the key file from your backup (a new key cannot open it; \
             to start over without the values it holds, move the database away)",
            key_file.display(),
            db.display()
        ),
    )
}

/// The key in the systemd credential, or `None` when it is not there.
pub(super) fn read_credential(dir: &Path, name: &str) -> Result<Option<LocalKey>, PluginError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(PluginError::new(
            ErrorKind::Invalid,
            format!("local vault key_credential {name:?} is not a valid credential name"),
        ));
    }
    let path = dir.join(name);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(PluginError::io(
                format!("local vault key credential {}", path.display()),
                &e,
            ));
        }
    };
    // systemd owns the credentials directory and its modes; no mode check.
    let raw = read_bounded(file, &path)?;
    parse_key(&raw, &path).map(Some)
}

/// The key in `path`, `None` when the file does not exist. Refuses a symlink,
/// a non-regular file and a file group or others can access.
pub(super) fn read_key_file(path: &Path) -> Result<Option<LocalKey>, PluginError> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(PluginError::new(
                ErrorKind::Invalid,
                format!(
                    "local vault key file {} is a symlink; refusing it (point key_file at the real file)",
                    path.display()
                ),
            ));
        }
        Err(e) => {
            return Err(PluginError::io(
                format!("local vault key file {}", path.display()),
                &e,
            ));
        }
    };
    let meta = file
        .metadata()
        .map_err(|e| PluginError::io(format!("local vault key file {}", path.display()), &e))?;
    if !meta.file_type().is_file() {
        return Err(PluginError::new(
            ErrorKind::Invalid,
            format!(
                "local vault key file {} is not a regular file",
                path.display()
            ),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PluginError::new(
            ErrorKind::Invalid,
            format!(
                "local vault key file {} has mode {mode:04o}: group and others must have no access (chmod 600 it)",
                path.display()
            ),
        ));
    }
    let raw = read_bounded(file, path)?;
    parse_key(&raw, path).map(Some)
}

/// Reads at most `MAX_KEY_SOURCE + 1` bytes of a key (see [`read_capped`]).
pub(super) fn read_bounded(file: File, path: &Path) -> Result<Zeroizing<Vec<u8>>, PluginError> {
    read_capped(file, MAX_KEY_SOURCE)
        .map_err(|e| PluginError::io(format!("local vault key {}", path.display()), &e))
}

/// Reads a secret of at most `max` bytes (one more is read, to tell "too
/// large" apart) into one zeroized buffer allocated at its full size up
/// front. `read_to_end` would grow the buffer (each reallocation leaves a
/// copy of what was read so far in freed memory, never zeroized) and reads
/// through a stack probe buffer; here every byte lands in its final place.
pub(crate) fn read_capped<R: Read>(mut r: R, max: usize) -> std::io::Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(vec![0u8; max + 1]);
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    // Shrinking keeps the allocation (and zeroizes the dropped tail on drop,
    // since `Zeroizing<Vec>` wipes the whole capacity).
    buf.truncate(filled);
    Ok(buf)
}

/// Accepts 32 raw bytes, or 64 hex characters with an optional final newline.
pub(super) fn parse_key(raw: &[u8], path: &Path) -> Result<LocalKey, PluginError> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    if raw.len() == KEY_LEN {
        key.copy_from_slice(raw);
        return Ok(LocalKey(key));
    }
    let text = raw
        .strip_suffix(b"\r\n")
        .or_else(|| raw.strip_suffix(b"\n"))
        .unwrap_or(raw);
    // The decode error is not shown: it would quote a character of the key.
    if text.len() == 2 * KEY_LEN && hex::decode_to_slice(text, &mut *key).is_ok() {
        return Ok(LocalKey(key));
    }
    let found = if raw.len() > MAX_KEY_SOURCE {
        format!("more than {MAX_KEY_SOURCE} bytes")
    } else {
        format!("{} bytes", raw.len())
    };
    Err(PluginError::new(
        ErrorKind::Invalid,
        format!(
            "local vault key {} has the wrong length or format: expected 32 raw bytes or 64 hex characters, found {found}",
            path.display()
        ),
    ))
}

/// Creates `path` holding a new key as 64 hex characters and a newline, mode
/// 0600, durably. `None` if someone else created the file first.
///
/// The key is written to a temp file next to `path` and linked into place
/// (a link never replaces an existing file): a crash at any point leaves
/// either no key file or a complete one, never an empty or partial one that
/// every later start would refuse. A crash can leave the temp file behind
/// (`NAME.tmp.<random>`, 0600): it holds a key that never sealed anything,
/// and may be deleted.
pub(super) fn create_key_file(path: &Path) -> Result<Option<LocalKey>, PluginError> {
    let ctx = || format!("local vault key file {}", path.display());
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .map_err(|e| PluginError::io(format!("{}: creating its directory", ctx()), &e))?;
    let file_name = path.file_name().ok_or_else(|| {
        PluginError::new(ErrorKind::Invalid, format!("{}: not a file name", ctx()))
    })?;
    // Unique per attempt: two processes creating the key at once each
    // link their own file, and the one that loses reads the winner's.
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(".tmp.{:016x}", OsRng.next_u64()));
    let tmp = parent.join(tmp_name);

    let key = LocalKey::generate();
    let mut text = Zeroizing::new([0u8; 2 * KEY_LEN + 1]);
    hex::encode_to_slice(&key.0[..], &mut text[..2 * KEY_LEN])
        .map_err(|_| PluginError::new(ErrorKind::Fatal, format!("{}: hex encoding", ctx())))?;
    text[2 * KEY_LEN] = b'\n';

    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(|e| PluginError::io(format!("{}: creating {}", ctx(), tmp.display()), &e))?;
    fail::fail_point!(KEY_CRASH_POINT, |_| Err(PluginError::new(
        ErrorKind::Fatal,
        "failpoint"
    )));
    let linked = file
        .write_all(&*text)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::hard_link(&tmp, path));
    drop(file);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(None),
        Err(e) => return Err(PluginError::io(format!("{}: writing it", ctx()), &e)),
    }
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| PluginError::io(format!("{}: syncing its directory", ctx()), &e))?;
    tracing::info!(key_file = %path.display(), "created a new local vault key");
    Ok(Some(key))
}

// ---------------------------------------------------------------------------
// Vault
// ---------------------------------------------------------------------------
