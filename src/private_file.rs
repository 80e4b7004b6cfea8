//! Files only the daemon's user may read (the state database, the audit
//! log): their directory is created 0700 and the file 0600 from the first
//! byte, whatever the umask, and never through a symlink.

use std::fs::{DirBuilder, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Creates `path`'s parent directory, and any missing above it, mode 0700;
/// one that exists is left as it is.
pub(crate) fn create_parent(path: &Path) -> io::Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) if !parent.exists() => {
            DirBuilder::new().recursive(true).mode(0o700).create(parent)
        }
        _ => Ok(()),
    }
}

/// Options that create the file 0600 if missing and refuse a symlink as its
/// last component; the caller adds the access it needs.
pub(crate) fn open_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW);
    options
}
