//! The state directory's lock: one daemon per state directory.
//!
//! The daemon locks the directory itself (flock(2) on its descriptor) and
//! `<state_dir>/keyturn.lock`. The directory's lock is what counts: a lock
//! on a file alone is lost when the file is deleted (a cleanup, an
//! operator), and a second daemon would create a new one and share the
//! state and the audit chain. The file is locked too (an older keyturn
//! locks only it, and must not run beside this one). Nothing is written:
//! the holder's pid, for a refusal and the CLI's hints, is the kernel's
//! (`/proc/locks`).

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

const LOCK_FILE: &str = "keyturn.lock";

/// Held for the daemon's life; dropping it (or the process ending, even by
/// kill -9) releases the directory.
#[derive(Debug)]
pub struct StateLock {
    _dir: File,
    _file: File,
}

/// Locks `state_dir` for this process, or says who holds it and what to do.
pub fn acquire(state_dir: &Path) -> Result<StateLock, String> {
    let refused = || {
        let pid = holder_pid(state_dir)
            .map(|pid| format!(" (pid {pid})"))
            .unwrap_or_default();
        format!(
            "another keyturn daemon{pid} is using {}: two daemons must never share a state directory. \
             Stop it first (`systemctl stop keyturn`), or give this one another daemon.state_dir",
            state_dir.display()
        )
    };
    let dir =
        File::open(state_dir).map_err(|e| format!("cannot open {}: {e}", state_dir.display()))?;
    if !lock_held_briefly(&dir) {
        return Err(refused());
    }
    let path = state_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    if !lock_held_briefly(&file) {
        return Err(refused());
    }
    Ok(StateLock {
        _dir: dir,
        _file: file,
    })
}

/// A daemon holds `state_dir`: `Some` with its pid when the lock file names
/// it. `None` when nothing holds it, or when this process may not look (the
/// directory is the daemon user's, mode 0700).
pub fn held(state_dir: &Path) -> Option<Holder> {
    let dir = File::open(state_dir).ok()?;
    let dir_held = !try_lock(&dir, libc::LOCK_SH);
    let file_held = File::open(state_dir.join(LOCK_FILE))
        .map(|f| !try_lock(&f, libc::LOCK_SH))
        .unwrap_or(false);
    // The probe's shared locks go with the descriptors, here.
    (dir_held || file_held).then(|| Holder {
        pid: holder_pid(state_dir),
    })
}

/// Who holds a state directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    pub pid: Option<u32>,
}

/// The pid the kernel lists as holding an flock on `state_dir` or its lock
/// file (`/proc/locks`: `N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE ...`,
/// the device in hex), if any.
fn holder_pid(state_dir: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let ids: Vec<String> = [state_dir.to_path_buf(), state_dir.join(LOCK_FILE)]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| {
            let dev = m.dev();
            format!(
                "{:02x}:{:02x}:{}",
                libc::major(dev),
                libc::minor(dev),
                m.ino()
            )
        })
        .collect();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let at = f.iter().position(|w| *w == "FLOCK")?;
        let (pid, id) = (f.get(at + 3)?, f.get(at + 4)?);
        ids.iter()
            .any(|i| i == id)
            .then(|| pid.parse().ok())
            .flatten()
            .filter(|&pid: &u32| pid > 0)
    })
}

/// An exclusive lock, tried for up to half a second: [`held`]'s probe (a
/// `keyturn status` while the daemon restarts) holds a shared lock for an
/// instant, and must not make a start fail. A daemon holds it for its life.
fn lock_held_briefly(file: &File) -> bool {
    for _ in 0..25 {
        if try_lock(file, libc::LOCK_EX) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

/// A non-blocking flock(2); false when another descriptor holds a
/// conflicting lock (or the call fails).
fn try_lock(file: &File, how: libc::c_int) -> bool {
    // SAFETY: flock on a valid, owned file descriptor.
    unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(held(dir.path()), None);
        let lock = acquire(dir.path()).unwrap();
        let e = acquire(dir.path()).unwrap_err();
        assert!(
            e.contains(&format!(
                "another keyturn daemon (pid {})",
                std::process::id()
            )),
            "{e}"
        );
        assert!(e.contains("Stop it first"), "{e}");
        assert_eq!(
            held(dir.path()),
            Some(Holder {
                pid: Some(std::process::id())
            })
        );
        drop(lock);
        assert_eq!(held(dir.path()), None);
        acquire(dir.path()).expect("free again once the holder is gone");
    }

    #[test]
    fn the_lock_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let lock = acquire(dir.path()).unwrap();
        assert_eq!(std::fs::read(dir.path().join(LOCK_FILE)).unwrap(), b"");
        drop(lock);
        acquire(dir.path()).unwrap();
        assert_eq!(std::fs::read(dir.path().join(LOCK_FILE)).unwrap(), b"");
    }

    #[test]
    fn deleting_the_lock_file_does_not_free_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _lock = acquire(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join(LOCK_FILE)).unwrap();
        let e = acquire(dir.path()).unwrap_err();
        assert!(e.contains("another keyturn daemon"), "{e}");
        assert!(held(dir.path()).is_some());
    }

    #[test]
    fn a_lock_file_held_alone_still_refuses() {
        // An older keyturn locks only the file.
        let dir = tempfile::tempdir().unwrap();
        let old = File::create(dir.path().join(LOCK_FILE)).unwrap();
        assert!(try_lock(&old, libc::LOCK_EX));
        let e = acquire(dir.path()).unwrap_err();
        assert!(e.contains("another keyturn daemon"), "{e}");
        assert_eq!(
            held(dir.path()),
            Some(Holder {
                pid: Some(std::process::id())
            })
        );
    }
}
