//! Files only the daemon's user may read (the state database, the audit
//! log): their directory is created 0700 and the file 0600 from the first
//! byte, whatever the umask, and never through a symlink. Also the one way
//! to create a directory others must reach ([`create_shared_dir`]).

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

/// Creates `dir` with exactly `mode` (and group `gid`, when given), and any
/// missing directory above it 0755, for directories others must reach (the
/// control socket's, a delivery root). Modes are set after creation, so the
/// umask (`UMask=0077` in the unit) cannot narrow them; a directory that
/// exists, or that someone else makes meanwhile, is left as it is.
pub(crate) fn create_shared_dir(dir: &Path, mode: u32, gid: Option<u32>) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    for d in missing.into_iter().rev() {
        match DirBuilder::new().mode(0o700).create(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
        let mode = if d == dir {
            if let Some(gid) = gid {
                nix::unistd::chown(d, None, Some(nix::unistd::Gid::from_raw(gid)))?;
            }
            mode
        } else {
            0o755
        };
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
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
