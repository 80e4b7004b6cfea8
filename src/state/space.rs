//! Free space where keyturn keeps its state.
//!
//! A full state volume is survivable while running: every write fails with a
//! transient error, steps are retried and parked, and nothing is lost. Starting
//! on one is not: SQLite maps each database's `-shm` index into memory, and
//! rebuilding it after a crash on a full filesystem (ext4) faults on a page
//! the filesystem cannot back, killing the process with SIGBUS before it can
//! say why. So the daemon checks the space first and refuses to start with
//! a message saying what to free; systemd's restart policy then retries until
//! there is room, and the `keyturn_state_free_bytes` gauge lets an alert fire
//! well before that.

use std::path::Path;

/// Free space below which the daemon does not start: room for both
/// databases' write-ahead logs (each cut back to 1 MiB after a checkpoint;
/// see `state::sqlite::WAL_SIZE_LIMIT`) and some audit records.
pub const MIN_FREE_TO_START: u64 = 4 << 20;

/// Bytes available to an unprivileged writer on the filesystem holding `path`
/// (root may use the reserved blocks too, so this is the cautious figure).
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

/// `Err` with an operator's message when any of `paths` (directories that
/// exist) is on a filesystem with less than [`MIN_FREE_TO_START`] free.
pub fn check_room_to_start(paths: &[&Path]) -> Result<(), String> {
    for path in paths {
        let free = free_bytes(path)
            .map_err(|e| format!("cannot read the free space of {}: {e}", path.display()))?;
        if free < MIN_FREE_TO_START {
            return Err(format!(
                "{} has {} KiB free; keyturn needs at least {} KiB there to start safely (its databases' write-ahead logs and the audit log). Free some space on that filesystem; the state is intact and everything resumes where it stopped",
                path.display(),
                free / 1024,
                MIN_FREE_TO_START / 1024
            ));
        }
    }
    Ok(())
}

/// [`check_room_to_start`] for what `config` starts on: the state
/// directory, the audit log's directory and each local vault's directory,
/// or, for one not made yet, the nearest directory above it that exists
/// (where it will be made). The daemon's start and `keyturn check` (so the
/// unit's `ExecStartPre` fails as the start would) both ask.
pub fn room_to_start(config: &crate::config::Config) -> Result<(), String> {
    let mut dirs: Vec<&Path> = vec![&config.daemon.state_dir];
    dirs.extend(config.daemon.audit_log.parent());
    for v in config.vaults.values() {
        dirs.extend(v.spec.plugin().data_dir());
    }
    let existing: Vec<&Path> = dirs
        .into_iter()
        .filter_map(|d| d.ancestors().find(|a| a.is_dir()))
        .collect();
    check_room_to_start(&existing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_roomy_directory_passes_and_the_figure_is_plausible() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0);
        if free >= MIN_FREE_TO_START {
            check_room_to_start(&[dir.path()]).unwrap();
        }
        let err = check_room_to_start(&[Path::new("/no/such/dir")]).unwrap_err();
        assert!(err.contains("/no/such/dir"), "{err}");
    }
}
