//! Keypair deliveries: a bundle directory swapped atomically through `..data`.

use super::*;

impl Inner {
    /// Writes an Ed25519 keypair as a bundle (see the module doc).
    pub(super) fn deliver_bundle(
        &self,
        notice: &Notice,
        value: &SecretValue,
    ) -> Result<(), PluginError> {
        let public = notice.public.as_deref().ok_or_else(|| {
            self.err(
                ErrorKind::Invalid,
                "an ed25519 delivery needs the public key",
            )
        })?;
        let depth = self.rel_len();
        if let Some(dir) = self.walk(depth - 1, None)? {
            self.clear_other_layout(&dir, true)?;
        }
        // The directory holding the bundle, as a file's parent holds the
        // file: a file sink and a bundle in one directory not named after
        // the agent must agree on whose it is (black-box finding: once the
        // agent had a uid, the file sink gave the directory to the agent
        // and the bundle then refused it as not root's).
        let agent_depth = self
            .agent_dir_depth(notice.key.agent.as_str(), depth - 1)
            .max(1);
        let bundle = self.walk(depth, Some(agent_depth))?.ok_or_else(|| {
            self.err(ErrorKind::Transient, "directory vanished while creating it")
        })?;
        let shown = self.path().to_path_buf();

        // Validate everything that is already there before changing anything.
        let previous = self.current_data_dir(&bundle)?;
        for link in BUNDLE_FILES {
            self.check_link(&bundle, link)?;
        }
        self.remove_data_link_tmp(&bundle)?;

        let stamp = Utc::now().format("%Y%m%dT%H%M%S");
        let new_name = format!("..{stamp}.{}.{}", notice.version, unique_suffix());
        let new_shown = shown.join(&new_name);
        let bfd = bundle.as_raw_fd();
        nix::sys::stat::mkdirat(
            Some(bfd),
            new_name.as_str(),
            Mode::from_bits_truncate(0o700),
        )
        .map_err(|e| self.sys(format_args!("create {}", new_shown.display()), e))?;
        // Filled and swapped in, or removed again: a full disk must not
        // leave an empty directory behind per retry.
        let filled = (|| {
            let data = open_dir(Some(bfd), OsStr::new(&new_name))
                .map_err(|e| self.sys(format_args!("open {}", new_shown.display()), e))?;
            nix::sys::stat::fchmod(data.as_raw_fd(), Mode::from_bits_truncate(AGENT_DIR_MODE))
                .map_err(|e| self.sys(format_args!("set mode of {}", new_shown.display()), e))?;
            chown_fd(&data, self.owner())
                .map_err(|e| self.sys(format_args!("set owner of {}", new_shown.display()), e))?;

            let meta = serde_json::to_vec(&BundleMeta {
                version: notice.version,
                rotation: notice.rotation.as_str(),
                rotated_at: rfc3339(notice.rotated_at),
            })
            .map_err(|e| self.err(ErrorKind::Fatal, format_args!("encode meta.json: {e}")))?;
            self.write_file_at(&data, OsStr::new("private.pem"), value.expose(), &new_shown)?;
            self.write_file_at(
                &data,
                OsStr::new("public.pem"),
                public.as_bytes(),
                &new_shown,
            )?;
            self.write_file_at(&data, OsStr::new("meta.json"), &meta, &new_shown)?;

            // The swap: one rename moves every reader to the new pair at once.
            nix::unistd::symlinkat(new_name.as_str(), Some(bfd), DATA_LINK_TMP)
                .map_err(|e| self.sys(format_args!("create {DATA_LINK_TMP}"), e))?;
            nix::fcntl::renameat(Some(bfd), DATA_LINK_TMP, Some(bfd), DATA_LINK)
                .map_err(|e| self.sys(format_args!("swap {DATA_LINK}"), e))?;
            Ok::<(), PluginError>(())
        })();
        if let Err(e) = filled {
            let _ = self.remove_data_link_tmp(&bundle);
            if let Err(left) = self.remove_data_dir(&bundle, OsStr::new(&new_name)) {
                tracing::warn!(path = %new_shown.display(), error = %left, "file sink: could not remove the directory of a failed delivery");
            }
            return Err(e);
        }
        fsync_dir(&bundle).map_err(|e| self.sys("fsync bundle directory", e))?;

        for link in BUNDLE_FILES {
            let target = format!("{DATA_LINK}/{link}");
            match nix::unistd::symlinkat(target.as_str(), Some(bfd), link) {
                Ok(()) => {}
                Err(Errno::EEXIST) => self.check_link(&bundle, link)?,
                Err(e) => return Err(self.sys(format_args!("create link {link}"), e)),
            }
        }
        fsync_dir(&bundle).map_err(|e| self.sys("fsync bundle directory", e))?;

        // Keep the new directory and the one just replaced (a reader may be
        // mid-read in it); older ones, and crash leftovers, go.
        let keep = [Some(new_name), previous];
        match list_dir(&bundle) {
            Ok(names) => {
                for n in names {
                    let is_old = n.as_bytes().starts_with(b"..")
                        && n != DATA_LINK
                        && n != DATA_LINK_TMP
                        && !keep.iter().flatten().any(|k| k.as_bytes() == n.as_bytes());
                    if is_old && let Err(e) = self.remove_data_dir(&bundle, &n) {
                        tracing::warn!(path = %shown.display(), error = %e, "file sink: could not prune an old bundle directory");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(path = %shown.display(), error = %e, "file sink: could not list the bundle directory to prune it");
            }
        }
        Ok(())
    }

    /// The directory `..data` points to now, after checking it is ours: a
    /// symlink to a `..` name in the same directory.
    pub(super) fn current_data_dir(&self, bundle: &OwnedFd) -> Result<Option<String>, PluginError> {
        let shown = self.path().join(DATA_LINK);
        match stat_nofollow(bundle, OsStr::new(DATA_LINK)) {
            Ok(None) => Ok(None),
            Ok(Some(st)) if is_type(&st, SFlag::S_IFLNK) => {
                let target = nix::fcntl::readlinkat(Some(bundle.as_raw_fd()), DATA_LINK)
                    .map_err(|e| self.sys(format_args!("read {}", shown.display()), e))?;
                match target.to_str() {
                    Some(t)
                        if t.starts_with("..")
                            && t.len() > 2
                            && !t.contains('/')
                            && t != DATA_LINK
                            && t != DATA_LINK_TMP =>
                    {
                        Ok(Some(t.to_owned()))
                    }
                    _ => Err(self.err(
                        ErrorKind::Invalid,
                        format_args!(
                            "{} points to {:?}, not to a bundle directory; refusing",
                            shown.display(),
                            target
                        ),
                    )),
                }
            }
            Ok(Some(_)) => Err(self.err(
                ErrorKind::Invalid,
                format_args!("{} is not a symlink; refusing", shown.display()),
            )),
            Err(e) => Err(self.sys(format_args!("inspect {}", shown.display()), e)),
        }
    }

    /// A top-level bundle link is either missing or exactly `NAME -> ..data/NAME`.
    pub(super) fn check_link(&self, bundle: &OwnedFd, link: &str) -> Result<(), PluginError> {
        let shown = self.path().join(link);
        match stat_nofollow(bundle, OsStr::new(link)) {
            Ok(None) => Ok(()),
            Ok(Some(st)) if is_type(&st, SFlag::S_IFLNK) => {
                let target = nix::fcntl::readlinkat(Some(bundle.as_raw_fd()), link)
                    .map_err(|e| self.sys(format_args!("read {}", shown.display()), e))?;
                if target.as_bytes() == format!("{DATA_LINK}/{link}").as_bytes() {
                    Ok(())
                } else {
                    Err(self.err(
                        ErrorKind::Invalid,
                        format_args!(
                            "{} points to {:?}, not to {DATA_LINK}/{link}; refusing",
                            shown.display(),
                            target
                        ),
                    ))
                }
            }
            Ok(Some(_)) => Err(self.err(
                ErrorKind::Invalid,
                format_args!(
                    "{} is not a link into {DATA_LINK}; refusing",
                    shown.display()
                ),
            )),
            Err(e) => Err(self.sys(format_args!("inspect {}", shown.display()), e)),
        }
    }

    /// Removes a `..data_tmp` left by a crash mid-swap (it is ours: a symlink).
    pub(super) fn remove_data_link_tmp(&self, bundle: &OwnedFd) -> Result<(), PluginError> {
        match stat_nofollow(bundle, OsStr::new(DATA_LINK_TMP)) {
            Ok(None) => Ok(()),
            Ok(Some(st)) if is_type(&st, SFlag::S_IFLNK) => nix::unistd::unlinkat(
                Some(bundle.as_raw_fd()),
                DATA_LINK_TMP,
                UnlinkatFlags::NoRemoveDir,
            )
            .map_err(|e| self.sys(format_args!("remove {DATA_LINK_TMP}"), e)),
            Ok(Some(_)) => Err(self.err(
                ErrorKind::Invalid,
                format_args!("{DATA_LINK_TMP} is not a symlink; refusing"),
            )),
            Err(e) => Err(self.sys(format_args!("inspect {DATA_LINK_TMP}"), e)),
        }
    }

    /// Removes one timestamped bundle directory: only files inside (that is
    /// all keyturn puts there), never following a symlink.
    pub(super) fn remove_data_dir(
        &self,
        bundle: &OwnedFd,
        name: &OsStr,
    ) -> Result<(), PluginError> {
        self.removed_data_dir(bundle, name).map(drop)
    }

    /// [`Self::remove_data_dir`], saying whether the directory is gone now
    /// because of it (not: it was not there, was not a directory, such as a
    /// symlink planted under its name, or held what is not keyturn's).
    pub(super) fn removed_data_dir(
        &self,
        bundle: &OwnedFd,
        name: &OsStr,
    ) -> Result<bool, PluginError> {
        let shown = self.path().join(name);
        match stat_nofollow(bundle, name) {
            Ok(Some(st)) if is_type(&st, SFlag::S_IFDIR) => {}
            Ok(_) => return Ok(false), // gone, or not a directory: not ours to remove
            Err(e) => return Err(self.sys(format_args!("inspect {}", shown.display()), e)),
        }
        let dir = open_dir(Some(bundle.as_raw_fd()), name)
            .map_err(|e| self.sys(format_args!("open {}", shown.display()), e))?;
        let names =
            list_dir(&dir).map_err(|e| self.sys(format_args!("list {}", shown.display()), e))?;
        for n in names {
            match nix::unistd::unlinkat(
                Some(dir.as_raw_fd()),
                n.as_os_str(),
                UnlinkatFlags::NoRemoveDir,
            ) {
                // A directory: keyturn never makes one there; it is left.
                Ok(()) | Err(Errno::ENOENT) | Err(Errno::EISDIR) => {}
                Err(e) => {
                    return Err(self.sys(format_args!("remove {}", shown.join(&n).display()), e));
                }
            }
        }
        match nix::unistd::unlinkat(Some(bundle.as_raw_fd()), name, UnlinkatFlags::RemoveDir) {
            Ok(()) => Ok(true),
            // Not empty: what is left is not keyturn's.
            Err(Errno::ENOENT) | Err(Errno::ENOTEMPTY) | Err(Errno::EEXIST) => Ok(false),
            Err(e) => Err(self.sys(format_args!("remove {}", shown.display()), e)),
        }
    }

    /// The previous version was retired: removes every timestamped
    /// directory of the bundle but the current one, and with it the retired
    /// private key. A single file, or nothing delivered yet: nothing to do.
    pub(super) fn retire_previous(&self) -> Result<(), PluginError> {
        let Some(dir) = self.walk(self.rel_len() - 1, None)? else {
            return Ok(());
        };
        let name = self.file_name();
        match stat_nofollow(&dir, name) {
            Ok(Some(st)) if is_type(&st, SFlag::S_IFDIR) => {}
            Ok(_) => return Ok(()),
            Err(e) => return Err(self.sys(format_args!("inspect {}", self.path().display()), e)),
        }
        let bundle = open_dir(Some(dir.as_raw_fd()), name)
            .map_err(|e| self.refuse_component(&dir, self.rel_len(), e))?;
        let Some(current) = self.current_data_dir(&bundle)? else {
            return Ok(());
        };
        let names = list_dir(&bundle).map_err(|e| self.sys("list bundle directory", e))?;
        for n in names {
            if n.as_bytes().starts_with(b"..")
                && n != DATA_LINK
                && n != DATA_LINK_TMP
                && n.as_bytes() != current.as_bytes()
            {
                self.remove_data_dir(&bundle, &n)?;
            }
        }
        fsync_dir(&bundle).map_err(|e| self.sys("fsync bundle directory", e))
    }

    /// Removes what keyturn puts in a bundle: every non-directory at one
    /// of its names (the links, `..data`, `..data_tmp`, whatever replaced
    /// them: a name is removed, never followed) and every `..` directory
    /// (its files). What else is there is not keyturn's and is left.
    pub(super) fn retract_bundle(&self, bundle: &OwnedFd) -> Result<(), PluginError> {
        let names = list_dir(bundle).map_err(|e| self.sys("list bundle directory", e))?;
        for n in names.iter().filter(|n| keyturns_name(n)) {
            let shown = self.path().join(n);
            match stat_nofollow(bundle, n) {
                Ok(None) => {}
                Ok(Some(st)) if is_type(&st, SFlag::S_IFDIR) => {
                    if n.as_bytes().starts_with(b"..") {
                        self.remove_data_dir(bundle, n)?;
                    }
                }
                Ok(Some(_)) => nix::unistd::unlinkat(
                    Some(bundle.as_raw_fd()),
                    n.as_os_str(),
                    UnlinkatFlags::NoRemoveDir,
                )
                .or_else(ignore_enoent)
                .map_err(|e| self.sys(format_args!("remove {}", shown.display()), e))?,
                Err(e) => return Err(self.sys(format_args!("inspect {}", shown.display()), e)),
            }
        }
        fsync_dir(bundle).map_err(|e| self.sys("fsync bundle directory", e))
    }

    /// What of keyturn's is left at `name` in a bundle (the name, or a file
    /// in it), if anything: a non-directory at one of keyturn's names, or
    /// one in a `..` directory.
    pub(super) fn keyturns_left(
        &self,
        bundle: &OwnedFd,
        name: &OsStr,
    ) -> Result<Option<PathBuf>, PluginError> {
        if !keyturns_name(name) {
            return Ok(None);
        }
        let shown = self.path().join(name);
        match stat_nofollow(bundle, name) {
            Ok(None) => return Ok(None),
            Ok(Some(st)) if !is_type(&st, SFlag::S_IFDIR) => return Ok(Some(name.into())),
            Ok(Some(_)) if !name.as_bytes().starts_with(b"..") => return Ok(None),
            Ok(Some(_)) => {}
            Err(e) => return Err(self.sys(format_args!("inspect {}", shown.display()), e)),
        }
        let dir = open_dir(Some(bundle.as_raw_fd()), name)
            .map_err(|e| self.sys(format_args!("open {}", shown.display()), e))?;
        let names =
            list_dir(&dir).map_err(|e| self.sys(format_args!("list {}", shown.display()), e))?;
        for n in names {
            match stat_nofollow(&dir, &n) {
                Ok(Some(st)) if !is_type(&st, SFlag::S_IFDIR) => {
                    return Ok(Some(Path::new(name).join(n)));
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(self.sys(format_args!("inspect {}", shown.join(&n).display()), e));
                }
            }
        }
        Ok(None)
    }

    /// A crash mid-delivery leaves a bundle's `..data_tmp` and its new
    /// timestamped directory (with the new private key) behind: a
    /// directory of another process of a version not older than the
    /// current one is dead. An older one is the previous pair's, kept as
    /// documented until the previous version is retired (black-box
    /// finding: a reload after a restart removed it while in grace).
    pub(super) fn sweep_bundle(&self, bundle: &OwnedFd) -> Result<(), PluginError> {
        self.remove_data_link_tmp(bundle)?;
        let current = self.current_data_dir(bundle)?;
        let current_version = current
            .as_deref()
            .and_then(|c| data_dir_version(c.as_bytes()));
        let names = list_dir(bundle).map_err(|e| self.sys("list bundle directory", e))?;
        for n in names {
            let b = n.as_bytes();
            let older = matches!(
                (data_dir_version(b), current_version),
                (Some(v), Some(c)) if v < c
            );
            let dead = b.starts_with(b"..")
                && n != DATA_LINK
                && n != DATA_LINK_TMP
                && current.as_deref().is_none_or(|c| c.as_bytes() != b)
                && !older
                && b.rsplit(|c| *c == b'.').next().and_then(temp_owner) == Some(false);
            // Said only when done: a symlink planted under such a name is
            // left, and the log said "removed" at every reload (black-box
            // finding).
            if dead && self.removed_data_dir(bundle, &n)? {
                tracing::info!(path = %self.path().display(), dir = ?n, "file sink: removed a bundle directory left by an earlier process");
            }
        }
        Ok(())
    }
}

/// The version in a timestamped directory's name
/// (`..YYYYMMDDTHHMMSS.<version>.<random>`).
fn data_dir_version(name: &[u8]) -> Option<u64> {
    let rest = name.strip_prefix(b"..")?;
    let mut parts = rest.split(|c| *c == b'.');
    let (_stamp, version) = (parts.next()?, parts.next()?);
    std::str::from_utf8(version).ok()?.parse().ok()
}

/// A name keyturn puts in a bundle: one of its files' links, or a `..`
/// name (`..data`, `..data_tmp`, the timestamped directories).
fn keyturns_name(name: &OsStr) -> bool {
    name.as_bytes().starts_with(b"..")
        || BUNDLE_FILES.iter().any(|f| f.as_bytes() == name.as_bytes())
}
