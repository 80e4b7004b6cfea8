//! Retracting what was delivered, preflight, and sweeping stale temp files.

use super::*;

impl Inner {
    /// Removes what was delivered: the file, or what keyturn put in the
    /// bundle (its links, `..data` and every `..` directory), then the
    /// bundle directory if nothing else is left in it. The agent owns its
    /// directory, so what is at the path may be its own: a symlink or any
    /// other non-directory in place of the file is removed as a name (never
    /// followed: what it points to is left alone), and what the agent put
    /// in a bundle stays, reported by [`Inner::retracted`]. Missing is
    /// fine: retracting twice is a no-op.
    pub(super) fn retract(&self) -> Result<(), PluginError> {
        let depth = self.rel_len() - 1;
        let Some(dir) = self.walk_to_remove(depth)? else {
            return Ok(());
        };
        let name = self.file_name();
        let shown = self.path();
        let st = match stat_nofollow(&dir, name) {
            Ok(Some(st)) => st,
            Ok(None) => return Ok(()),
            Err(e) => return Err(self.sys(format_args!("inspect {}", shown.display()), e)),
        };
        let dfd = dir.as_raw_fd();
        if is_type(&st, SFlag::S_IFDIR) {
            let bundle = open_dir(Some(dfd), name)
                .map_err(|e| self.refuse_component(&dir, self.rel_len(), e))?;
            self.retract_bundle(&bundle)?;
            match nix::unistd::unlinkat(Some(dfd), name, UnlinkatFlags::RemoveDir) {
                // Something keyturn did not put there is left; keep it (and the directory).
                Ok(()) | Err(Errno::ENOENT) | Err(Errno::ENOTEMPTY) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(self.sys(format_args!("remove {}", shown.display()), e)),
            }
        } else {
            if !is_type(&st, SFlag::S_IFREG) {
                tracing::warn!(path = %shown.display(), "file sink: what is at the path is not the file keyturn delivered (a symlink or special file, put there by someone else); removing the name itself, never what it points to");
            }
            // `unlinkat` removes the name in this directory: it never follows a link.
            nix::unistd::unlinkat(Some(dfd), name, UnlinkatFlags::NoRemoveDir)
                .or_else(ignore_enoent)
                .map_err(|e| self.sys(format_args!("remove {}", shown.display()), e))?;
        }
        // Our own temp files would otherwise outlive the credential.
        self.sweep_temps(&dir, name, true)?;
        fsync_dir(&dir).map_err(|e| self.sys("fsync directory", e))
    }

    /// Checks that nothing keyturn delivered is left at the path (a
    /// retraction's proof), never following a link. `Ok` says how, naming
    /// what was kept in a bundle directory because keyturn did not put it
    /// there; `Err` says what is still there.
    pub(super) fn retracted(&self) -> Result<String, PluginError> {
        let shown = self.path();
        let gone = || Ok(format!("{} is gone", shown.display()));
        let still = |what: &Path| {
            Err(self.err(
                ErrorKind::Transient,
                format_args!("{} is still there", what.display()),
            ))
        };
        let Some(dir) = self.walk_to_remove(self.rel_len() - 1)? else {
            return gone();
        };
        let name = self.file_name();
        match stat_nofollow(&dir, name) {
            Ok(None) => return gone(),
            Ok(Some(st)) if is_type(&st, SFlag::S_IFDIR) => {}
            Ok(Some(_)) => return still(shown),
            Err(e) => return Err(self.sys(format_args!("inspect {}", shown.display()), e)),
        }
        let bundle = open_dir(Some(dir.as_raw_fd()), name)
            .map_err(|e| self.refuse_component(&dir, self.rel_len(), e))?;
        let names = list_dir(&bundle).map_err(|e| self.sys("list bundle directory", e))?;
        let mut kept = Vec::new();
        for n in names {
            if let Some(left) = self.keyturns_left(&bundle, &n)? {
                return still(&shown.join(left));
            }
            kept.push(n.to_string_lossy().into_owned());
        }
        Ok(if kept.is_empty() {
            format!("{} is empty", shown.display())
        } else {
            format!(
                "what keyturn delivered to {} is gone; kept {} entr{} keyturn did not put there ({}): the agent's own, remove by hand if unwanted",
                shown.display(),
                kept.len(),
                if kept.len() == 1 { "y" } else { "ies" },
                kept.join(", ")
            )
        })
    }

    /// The walk of a retraction (and its proof): [`Inner::walk`] without
    /// creating anything, except for a directory on the way that someone
    /// replaced by a symlink (keyturn never links a directory; the agent
    /// owns its directory and may). Such a link is never followed by the
    /// kernel. When it names a place in the directory that holds it by
    /// plain names only (`sub.moved`, `a/b`: no leading `/`, no `..`),
    /// those names are walked instead, each opened without following a
    /// link: the file keyturn delivered is reached where the link's maker
    /// moved it, and the walk never leaves a directory it already reached
    /// safely. Any other link is refused, saying where it points and what
    /// the operator does about it. `Ok(None)`: nothing is at the path.
    fn walk_to_remove(&self, depth: usize) -> Result<Option<OwnedFd>, PluginError> {
        // A root others may write does not stop a removal: the secret
        // goes all the same.
        let mut cur = self.open_root_unchecked()?;
        for i in 0..depth {
            cur = match open_dir(Some(cur.as_raw_fd()), self.rel_at(i)) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => return Ok(None),
                Err(e) => match self.linked_dir(&cur, i + 1, e)? {
                    Some(fd) => fd,
                    None => return Ok(None),
                },
            };
        }
        Ok(Some(cur))
    }

    /// Component `depth` of the path (in `parent`), which did not open as
    /// a directory: the place a plain symlink there names, walked without
    /// following anything (`Ok(None)` when it is not there), or why not.
    fn linked_dir(
        &self,
        parent: &OwnedFd,
        depth: usize,
        e: Errno,
    ) -> Result<Option<OwnedFd>, PluginError> {
        let name = self.rel_at(depth - 1);
        let shown = self.shown(depth);
        let is_link =
            matches!(stat_nofollow(parent, name), Ok(Some(st)) if is_type(&st, SFlag::S_IFLNK));
        if !is_link {
            return Err(self.refuse_component(parent, depth, e));
        }
        let to = nix::fcntl::readlinkat(Some(parent.as_raw_fd()), name)
            .map(PathBuf::from)
            .map_err(|e| self.sys(format_args!("read the symlink {}", shown.display()), e))?;
        let plain = !to.as_os_str().is_empty()
            && to.components().all(|c| matches!(c, Component::Normal(_)));
        let mut reached: Option<OwnedFd> = None;
        let mut blocked = !plain;
        if plain {
            for c in to.components() {
                let at = reached.as_ref().unwrap_or(parent).as_raw_fd();
                match open_dir(Some(at), c.as_os_str()) {
                    Ok(fd) => reached = Some(fd),
                    // A dangling link: nothing is reachable at the path.
                    Err(Errno::ENOENT) => return Ok(None),
                    Err(_) => {
                        blocked = true;
                        break;
                    }
                }
            }
        }
        if blocked {
            let rest: PathBuf = self.rel().skip(depth).collect();
            return Err(self.err(
                ErrorKind::Invalid,
                format_args!(
                    "{} is a symlink to {}, put in place of a directory by someone else (keyturn never links a directory); keyturn does not follow it{}, so it cannot reach what it delivered below it safely. Check {} by hand and remove it if it is the delivered file, then remove the symlink {}: this item completes once nothing is at the path",
                    shown.display(),
                    to.display(),
                    if plain {
                        " (another symlink or a non-directory is on its way)"
                    } else {
                        " (it leaves the directory that holds it)"
                    },
                    // (`to` replaces the directory when it is absolute.)
                    shown
                        .parent()
                        .unwrap_or(&shown)
                        .join(&to)
                        .join(&rest)
                        .display(),
                    shown.display(),
                ),
            ));
        }
        tracing::warn!(path = %self.path().display(), link = %shown.display(), to = %to.display(), "file sink: a directory on the path was replaced by a symlink within its own directory; reached the delivered file through its plain names, never following a link");
        Ok(reached)
    }

    /// Checks delivery can work and removes stale temp files along the path.
    pub(super) fn preflight(&self) -> Result<(), PluginError> {
        let mut cur = self.open_root()?;
        let depth = self.rel_len() - 1;
        for i in 0..=depth {
            let name = self.rel_at(i);
            self.sweep_temps(&cur, name, false)?;
            if i == depth {
                break;
            }
            cur = match open_dir(Some(cur.as_raw_fd()), name) {
                Ok(fd) => fd,
                // Missing: the first delivery creates it, if this one is writable.
                Err(Errno::ENOENT) => return self.check_writable(&cur, i),
                Err(e) => return Err(self.refuse_component(&cur, i + 1, e)),
            };
        }
        let name = self.file_name();
        match stat_nofollow(&cur, name) {
            Ok(Some(st)) if is_type(&st, SFlag::S_IFLNK) => {
                return Err(self.err(
                    ErrorKind::Invalid,
                    format_args!("{} is a symlink; refusing", self.path().display()),
                ));
            }
            Ok(Some(st)) if is_type(&st, SFlag::S_IFDIR) => {
                let bundle = open_dir(Some(cur.as_raw_fd()), name)
                    .map_err(|e| self.refuse_component(&cur, self.rel_len(), e))?;
                self.sweep_bundle(&bundle)?;
            }
            Ok(_) => {}
            Err(e) => return Err(self.sys(format_args!("inspect {}", self.path().display()), e)),
        }
        self.check_writable(&cur, depth)
    }

    pub(super) fn check_writable(&self, dir: &OwnedFd, depth: usize) -> Result<(), PluginError> {
        nix::unistd::faccessat(
            Some(dir.as_raw_fd()),
            ".",
            nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
            AtFlags::AT_EACCESS,
        )
        .map_err(|e| {
            self.sys(
                format_args!("{} is not writable", self.shown(depth).display()),
                e,
            )
        })
    }

    /// Removes this process's temp files in `dir` (of any file, since the
    /// token says they are ours) older than [`STALE_TEMP_AGE`], at most once
    /// a minute per directory: another process's were removed by preflight
    /// at start-up or reload, and one of this process's only becomes
    /// removable a minute after it was made, so looking more often would
    /// find nothing new (and would list the directory on every delivery).
    pub(super) fn sweep_own_stale(&self, dir: &OwnedFd) -> Result<(), PluginError> {
        use std::collections::HashMap;
        use std::sync::{Mutex, OnceLock};
        use std::time::Instant;
        static SWEPT: OnceLock<Mutex<HashMap<(u64, u64), Instant>>> = OnceLock::new();
        let st = nix::sys::stat::fstat(dir.as_raw_fd())
            .map_err(|e| self.sys("inspect the delivery directory", e))?;
        {
            let mut swept = SWEPT
                .get_or_init(Default::default)
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            match swept.get(&(st.st_dev, st.st_ino)) {
                Some(at) if now.duration_since(*at) < STALE_TEMP_AGE => return Ok(()),
                _ => {
                    swept.insert((st.st_dev, st.st_ino), now);
                }
            }
        }
        let names =
            temp_candidates(dir).map_err(|e| self.sys("list directory for stale temp files", e))?;
        let now = Utc::now().timestamp();
        for n in names.iter() {
            let b = n.as_bytes();
            let ours = b
                .windows(5)
                .rposition(|w| w == b".tmp.")
                .and_then(|i| temp_owner(&b[i + 5..]))
                == Some(true);
            if !ours {
                continue;
            }
            let Ok(Some(st)) = stat_nofollow(dir, n) else {
                continue;
            };
            if now.saturating_sub(st.st_mtime) < STALE_TEMP_AGE.as_secs() as i64 {
                continue;
            }
            match unlink_entry(dir, n, &st) {
                Ok(()) | Err(Errno::ENOENT) => {
                    tracing::info!(path = %self.path().display(), temp = ?n, "file sink: removed a stale temp file");
                }
                Err(e) => return Err(self.sys(format_args!("remove stale temp file {n:?}"), e)),
            }
        }
        Ok(())
    }

    /// Removes the dead `.NAME.tmp.*` entries (files, or empty directories
    /// from `create_dir`) in `dir`: another process's at any age, this
    /// process's once older than [`STALE_TEMP_AGE`]; with `all`, every one
    /// (retract: nothing is delivered to `NAME` any more).
    pub(super) fn sweep_temps(
        &self,
        dir: &OwnedFd,
        name: &OsStr,
        all: bool,
    ) -> Result<(), PluginError> {
        let mut prefix = b".".to_vec();
        prefix.extend_from_slice(name.as_bytes());
        prefix.extend_from_slice(b".tmp.");
        let names =
            temp_candidates(dir).map_err(|e| self.sys("list directory for stale temp files", e))?;
        let now = Utc::now().timestamp();
        for n in names.iter() {
            let Some(ours) = n
                .as_bytes()
                .strip_prefix(prefix.as_slice())
                .and_then(temp_owner)
            else {
                continue;
            };
            let Ok(Some(st)) = stat_nofollow(dir, n) else {
                continue;
            };
            let age = now.saturating_sub(st.st_mtime);
            if ours && !all && age < STALE_TEMP_AGE.as_secs() as i64 {
                continue;
            }
            match unlink_entry(dir, n, &st) {
                Ok(()) => {
                    tracing::info!(path = %self.path().display(), temp = ?n, "file sink: removed a stale temp file");
                }
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(self.sys(format_args!("remove stale temp file {n:?}"), e)),
            }
        }
        Ok(())
    }
}
