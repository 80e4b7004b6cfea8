//! File-system helpers: plain paths, temp names, descriptors opened without following symlinks.

use super::*;

/// Only plain names: `..` would make "inside the root" a lexical lie, and
/// `.`, `//` or a trailing `/` (which `Path::components` silently normalises)
/// have no business in a configured file path.
pub(super) fn is_plain(p: &Path) -> bool {
    let bytes = p.as_os_str().as_bytes();
    bytes.starts_with(b"/")
        && bytes[1..]
            .split(|b| *b == b'/')
            .all(|seg| !seg.is_empty() && seg != b"." && seg != b"..")
}

/// A root may be written with a trailing `/` or `./`; only `..` disqualifies it.
pub(super) fn is_plain_root(p: &Path) -> bool {
    p.is_absolute() && p.components().all(|c| c != Component::ParentDir)
}

/// `.NAME.tmp.<token><random>`: hidden, and recognisable by `sweep_temps`.
pub(super) fn temp_name(name: &OsStr) -> OsString {
    let mut t = OsString::from(".");
    t.push(name);
    t.push(format!(".tmp.{}", unique_suffix()));
    t
}

/// This process's token and 32 random bits, in 16 hex digits.
pub(super) fn unique_suffix() -> String {
    let random: u32 = rand::random();
    format!("{:08x}{random:08x}", process_token())
}

/// Opens a directory without following a symlink in its last component.
pub(super) fn open_dir(dir: Option<RawFd>, name: &OsStr) -> Result<OwnedFd, Errno> {
    let fd = nix::fcntl::openat(
        dir,
        name,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
        Mode::empty(),
    )?;
    // SAFETY: `openat` just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a delivery root, following symlinks on the way and in its last
/// component: the root is the operator's choice (`/var/run` → `/run`, or a
/// root that is itself a link to a mounted volume). Black-box finding: a
/// root that was a symlink passed `keyturn check`, then every delivery
/// failed "Not a directory", retried as transient.
pub(super) fn open_root_dir(root: &Path) -> Result<OwnedFd, Errno> {
    let fd = nix::fcntl::openat(
        None,
        root,
        OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
        Mode::empty(),
    )?;
    // SAFETY: `openat` just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstatat(AT_SYMLINK_NOFOLLOW)`; `Ok(None)` when the name does not exist.
pub(super) fn stat_nofollow(dir: &OwnedFd, name: &OsStr) -> Result<Option<FileStat>, Errno> {
    match nix::sys::stat::fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(super) fn is_type(st: &FileStat, t: SFlag) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == t.bits()
}

/// Unlinks `name` in `dir`: a file, or an empty directory when `st` (its
/// `stat_nofollow`) says it is one, since `unlinkat` must be told which.
pub(super) fn unlink_entry(dir: &OwnedFd, name: &OsStr, st: &FileStat) -> Result<(), Errno> {
    let flag = if is_type(st, SFlag::S_IFDIR) {
        UnlinkatFlags::RemoveDir
    } else {
        UnlinkatFlags::NoRemoveDir
    };
    nix::unistd::unlinkat(Some(dir.as_raw_fd()), name, flag)
}

pub(super) fn chown_fd(fd: &OwnedFd, owner: Owner) -> Result<(), Errno> {
    if !owner.is_set() {
        return Ok(());
    }
    nix::unistd::fchown(
        fd.as_raw_fd(),
        owner.uid.map(Uid::from_raw),
        owner.gid.map(Gid::from_raw),
    )
}

pub(super) fn fsync_dir(dir: &OwnedFd) -> Result<(), Errno> {
    nix::unistd::fsync(dir.as_raw_fd())
}

/// The entry changes made in one directory and how many of them an fsync
/// has made durable; shared by every delivery into it.
#[derive(Default)]
pub(super) struct DirSync {
    /// Entry changes registered (each counted once it is done).
    changes: std::sync::atomic::AtomicU64,
    /// The count of changes the last successful fsync began after; its
    /// lock is held through an fsync, so callers queue behind it.
    synced: std::sync::Mutex<u64>,
    /// fsyncs done (tests).
    fsyncs: std::sync::atomic::AtomicU64,
}

/// The [`DirSync`] of the directory `(dev, ino)`.
pub(super) fn dir_sync(dev: u64, ino: u64) -> Arc<DirSync> {
    use std::collections::HashMap;
    use std::sync::{LazyLock, Mutex};
    // One entry per delivery directory the daemon has written into: bounded
    // by the configured paths (an inode reused by another directory just
    // shares the counters, which stay correct for it).
    type ByInode = HashMap<(u64, u64), Arc<DirSync>>;
    static DIRS: LazyLock<Mutex<ByInode>> = LazyLock::new(Default::default);
    DIRS.lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry((dev, ino))
        .or_default()
        .clone()
}

/// Makes an entry change just done in `dir` (a rename) durable, sharing the
/// fsync with concurrent deliveries into the same directory. An fsync of a
/// directory makes durable every change made in it before the fsync began
/// (it acts on the inode, whichever descriptor names it). So a caller
/// registers its change, then waits for the directory's fsync lock: if an
/// fsync that began after its change has succeeded meanwhile, it is done
/// without one; otherwise it fsyncs, covering every change registered so far.
pub(super) fn fsync_dir_after_change(dir: &OwnedFd) -> Result<(), Errno> {
    use std::sync::atomic::Ordering;
    let st = nix::sys::stat::fstat(dir.as_raw_fd())?;
    let shared = dir_sync(st.st_dev, st.st_ino);
    let mine = shared.changes.fetch_add(1, Ordering::SeqCst) + 1;
    // Other rotations running may be about to deliver here too: give them
    // the time of a few fsyncs to join this one (as the group-commit
    // writers do), on this blocking thread.
    if crate::group_commit::BUSY.load(Ordering::Relaxed) > 1 {
        std::thread::sleep(crate::group_commit::FSYNC_LINGER);
    }
    let mut synced = shared.synced.lock().unwrap_or_else(|p| p.into_inner());
    if *synced >= mine {
        return Ok(());
    }
    let upto = shared.changes.load(Ordering::SeqCst);
    fsync_dir(dir)?;
    shared.fsyncs.fetch_add(1, Ordering::Relaxed);
    *synced = upto;
    Ok(())
}

pub(super) fn ignore_enoent(e: Errno) -> Result<(), Errno> {
    if e == Errno::ENOENT { Ok(()) } else { Err(e) }
}

/// `renameat2(RENAME_NOREPLACE)`: fails with EEXIST instead of replacing.
pub(super) fn rename_noreplace(dir: RawFd, from: &OsStr, to: &OsStr) -> Result<(), Errno> {
    let from = std::ffi::CString::new(from.as_bytes()).map_err(|_| Errno::EINVAL)?;
    let to = std::ffi::CString::new(to.as_bytes()).map_err(|_| Errno::EINVAL)?;
    // SAFETY: both strings are NUL-terminated and outlive the call.
    let res =
        unsafe { libc::renameat2(dir, from.as_ptr(), dir, to.as_ptr(), libc::RENAME_NOREPLACE) };
    Errno::result(res).map(drop)
}

/// The names in a directory (without `.` and `..`), read through a fresh
/// descriptor so the caller's stays usable. (libc directly: nix's `dir`
/// feature is not enabled in this crate.)
/// The temp-like entries (`.*.tmp.*`) of `dir`, listed once per directory
/// state. Preflight of every sink sweeps every directory on its path, so with
/// many sinks under one tree the same directories would be listed again and
/// again (100k sinks: ~10^8 entries read). The listing is cached by device,
/// inode and modification time: any entry added or removed since changes the
/// mtime and forces a fresh listing, so a cached answer is never stale.
pub(super) fn temp_candidates(dir: &OwnedFd) -> Result<Arc<Vec<OsString>>, Errno> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    type Listing = ((i64, i64), Arc<Vec<OsString>>);
    static CACHE: OnceLock<Mutex<HashMap<(u64, u64), Listing>>> = OnceLock::new();
    let st = nix::sys::stat::fstat(dir.as_raw_fd())?;
    let id = (st.st_dev, st.st_ino);
    let mtime = (st.st_mtime, st.st_mtime_nsec);
    let cache = CACHE.get_or_init(Default::default);
    if let Some((m, names)) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&id)
        && *m == mtime
    {
        return Ok(names.clone());
    }
    let mut names: Vec<OsString> = list_dir(dir)?
        .into_iter()
        .filter(|n| {
            let b = n.as_bytes();
            b.starts_with(b".") && b.windows(5).any(|w| w == b".tmp.")
        })
        .collect();
    // The filter reuses the listing's buffer (one slot per entry of the
    // directory); cached for every directory, that was ~3 MB at 100k sinks.
    names.shrink_to_fit();
    let names = Arc::new(names);
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, (mtime, names.clone()));
    Ok(names)
}

pub(super) fn list_dir(dir: &OwnedFd) -> Result<Vec<OsString>, Errno> {
    let fd = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        ".",
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: `fd` is a fresh directory descriptor; on success `fdopendir`
    // owns it and `closedir` closes it, on failure we close it ourselves.
    let d = unsafe { libc::fdopendir(fd) };
    if d.is_null() {
        let e = Errno::last();
        // SAFETY: `fd` is still ours when `fdopendir` fails.
        unsafe { libc::close(fd) };
        return Err(e);
    }
    let mut names = Vec::new();
    let result = loop {
        Errno::clear();
        // SAFETY: `d` is a valid DIR*; the entry is copied before the next call.
        let entry = unsafe { libc::readdir(d) };
        if entry.is_null() {
            let e = Errno::last();
            break if e == Errno::UnknownErrno {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: `d_name` is a NUL-terminated string inside the entry.
        let name = unsafe { std::ffi::CStr::from_ptr((*entry).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            names.push(OsString::from_vec(name.to_vec()));
        }
    };
    // SAFETY: `d` came from `fdopendir` and is closed once.
    unsafe { libc::closedir(d) };
    result.map(|()| names)
}

#[cfg(test)]
mod dir_sync_tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn queued_deliveries_into_one_directory_share_one_fsync() {
        let root = tempfile::tempdir().unwrap();
        let open = || open_dir(None, root.path().as_os_str()).unwrap();
        let st = nix::sys::stat::fstat(open().as_raw_fd()).unwrap();
        let shared = dir_sync(st.st_dev, st.st_ino);
        assert_eq!(shared.fsyncs.load(Ordering::SeqCst), 0);

        // Alone: one fsync per change.
        fsync_dir_after_change(&open()).unwrap();
        fsync_dir_after_change(&open()).unwrap();
        assert_eq!(shared.fsyncs.load(Ordering::SeqCst), 2);

        // Eight changes registered while an fsync is under way (its lock
        // held here): the first caller's fsync covers all eight.
        let held = shared.synced.lock().unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let dir = open();
                std::thread::spawn(move || fsync_dir_after_change(&dir).unwrap())
            })
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while shared.changes.load(Ordering::SeqCst) < 10 {
            assert!(
                std::time::Instant::now() < deadline,
                "threads never registered"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        drop(held);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(
            shared.fsyncs.load(Ordering::SeqCst),
            3,
            "one fsync for eight"
        );
        assert_eq!(*shared.synced.lock().unwrap(), 10);
    }
}
