//! Files that say what keyturn runs as its user: the config files and
//! `agents.d`, hook programs (`command` targets) and `exec` sink programs.
//! Whoever can change one of them, or the directory it is in, runs code as
//! the daemon's user (often root), with each new secret on its stdin. As
//! sshd's StrictModes and sudo do, keyturn refuses a file, or a directory
//! on its way from `/`, that another user owns or can write.
//!
//! Black-box finding: a hook program of mode 0777, and an `agents.d` file
//! `nobody` wrote in a 0777 directory, were accepted by `check` and
//! `check --online`, and the daemon ran them as root with the secret.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The name of the system user the packaged unit runs the daemon as
/// (`User=keyturn`, `systemd/keyturn.sysusers.conf`).
const SERVICE_USER: &str = "keyturn";

/// The uid and gid of [`SERVICE_USER`] on this host, when it has one.
/// Trusted besides the running user so that `sudo keyturn check` judges a
/// config or hook the daemon's user owns as the daemon (running as that
/// user) does: a black-box run found root's `check` refusing files the
/// service accepted.
fn service_ids() -> Option<(u32, u32)> {
    static IDS: std::sync::OnceLock<Option<(u32, u32)>> = std::sync::OnceLock::new();
    *IDS.get_or_init(|| {
        nix::unistd::User::from_name(SERVICE_USER)
            .ok()
            .flatten()
            .map(|u| (u.uid.as_raw(), u.gid.as_raw()))
    })
}

/// Owners keyturn trusts: root, the user it runs as and the service user
/// (`service`: [`service_ids`]).
fn trusted_owner(uid: u32, service: Option<(u32, u32)>) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw() || service.is_some_and(|(u, _)| u == uid)
}

/// Groups whose members may write: root's, the daemon's own and the
/// service user's.
fn trusted_group(gid: u32, service: Option<(u32, u32)>) -> bool {
    gid == 0 || gid == nix::unistd::getegid().as_raw() || service.is_some_and(|(_, g)| g == gid)
}

/// Why `m` (the metadata of `at`, a file or a directory on the way to one)
/// lets someone other than root and keyturn's user change it; `None` when
/// it does not. A sticky directory others may write (`/tmp`) is fine: they
/// cannot rename or remove what is not theirs.
fn why_not(at: &Path, m: &std::fs::Metadata, service: Option<(u32, u32)>) -> Option<String> {
    let mode = m.mode() & 0o7777;
    if !trusted_owner(m.uid(), service) {
        return Some(format!(
            "{} belongs to uid {}, not to root, the user {SERVICE_USER} or the user running keyturn",
            at.display(),
            m.uid()
        ));
    }
    let sticky_dir = m.is_dir() && mode & 0o1000 != 0;
    if mode & 0o002 != 0 && !sticky_dir {
        return Some(format!(
            "{} is writable by every user (mode {mode:04o})",
            at.display()
        ));
    }
    if mode & 0o020 != 0 && !trusted_group(m.gid(), service) && !sticky_dir {
        return Some(format!(
            "{} is writable by group {} (mode {mode:04o})",
            at.display(),
            m.gid()
        ));
    }
    None
}

/// Why `path` (which exists) is not to be trusted with what keyturn runs:
/// it, the directory it is named in, or a directory on its real path, is
/// another user's or writable by others. `None` when it can be trusted or
/// cannot be examined (a missing file is reported where it is opened).
pub fn untrusted(path: &Path) -> Option<String> {
    let real = std::fs::canonicalize(path).ok()?;
    let mut places: Vec<PathBuf> = real.ancestors().map(Path::to_path_buf).collect();
    // The directory the name itself is in, when a symlink leads elsewhere:
    // whoever may write it may point the name at another program.
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && let Ok(parent) = std::fs::canonicalize(parent)
        && !places.contains(&parent)
    {
        places.extend(parent.ancestors().map(Path::to_path_buf));
    }
    places.dedup();
    for at in &places {
        let Ok(m) = std::fs::metadata(at) else {
            continue;
        };
        if let Some(why) = why_not(at, &m, service_ids()) {
            return Some(format!(
                "{why}: another user could change what keyturn runs as its user; make it root's (or keyturn's) and writable by its owner only (chown root, chmod go-w)"
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_file_others_can_change_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("hook.sh");
        std::fs::write(&f, "#!/bin/sh\n").unwrap();
        chmod(&f, 0o755);
        assert_eq!(untrusted(&f), None);
        chmod(&f, 0o777);
        let why = untrusted(&f).expect("a 0777 program is refused");
        assert!(why.contains("writable by every user (mode 0777)"), "{why}");
        chmod(&f, 0o755);
        // Its directory writable by all, not sticky: refused.
        chmod(dir.path(), 0o777);
        let why = untrusted(&f).expect("a program in a 0777 directory is refused");
        assert!(why.contains(&dir.path().display().to_string()), "{why}");
        // Sticky (as /tmp): others cannot replace it.
        chmod(dir.path(), 0o1777);
        assert_eq!(untrusted(&f), None);
        chmod(dir.path(), 0o700);
        // Another user's.
        crate::test_support::assert_root("chown to another user");
        std::os::unix::fs::chown(&f, Some(65534), None).unwrap();
        let why = untrusted(&f).expect("nobody's program is refused");
        assert!(why.contains("belongs to uid 65534"), "{why}");
        std::os::unix::fs::chown(&f, Some(0), Some(65534)).unwrap();
        chmod(&f, 0o775);
        let why = untrusted(&f).expect("writable by another group");
        assert!(why.contains("writable by group 65534"), "{why}");
    }

    /// `sudo keyturn check` refused a hook owned by the `keyturn` user that
    /// the service (running as that user) accepts: the service user's files
    /// are trusted whoever judges them.
    #[test]
    fn the_service_users_files_are_trusted_by_root_too() {
        crate::test_support::assert_root("chown to another user");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("hook.sh");
        std::fs::write(&f, "#!/bin/sh\n").unwrap();
        chmod(&f, 0o775);
        std::os::unix::fs::chown(&f, Some(65534), Some(65534)).unwrap();
        let m = std::fs::metadata(&f).unwrap();
        let why = why_not(&f, &m, None).expect("another user's hook is refused");
        assert!(why.contains("belongs to uid 65534"), "{why}");
        // The same file when 65534 is keyturn's service user: its own, and
        // its group's write is the service's group.
        assert_eq!(why_not(&f, &m, Some((65534, 65534))), None);
        // Another group's write still is not.
        std::os::unix::fs::chown(&f, None, Some(65533)).unwrap();
        let m = std::fs::metadata(&f).unwrap();
        let why = why_not(&f, &m, Some((65534, 65534))).expect("another group may write");
        assert!(why.contains("writable by group 65533"), "{why}");
    }

    #[test]
    fn a_symlink_in_a_directory_others_can_write_is_not_trusted() {
        let safe = tempfile::tempdir().unwrap();
        let open = tempfile::tempdir().unwrap();
        let f = safe.path().join("hook.sh");
        std::fs::write(&f, "#!/bin/sh\n").unwrap();
        chmod(&f, 0o755);
        let link = open.path().join("hook");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        assert_eq!(untrusted(&link), None);
        chmod(open.path(), 0o777);
        assert!(untrusted(&link).is_some());
    }
}
