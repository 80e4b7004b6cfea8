//! Single-file deliveries (raw, json, env): rendering, the atomic write and the in-place one.

use super::*;

impl Inner {
    /// Writes a single-file format (raw, json, env).
    pub(super) fn deliver_file(
        &self,
        notice: &Notice,
        value: &SecretValue,
    ) -> Result<(), PluginError> {
        let contents = self.render(notice, value)?;
        let depth = self.rel_len() - 1;
        let agent_depth = self.agent_dir_depth(notice.key.agent.as_str(), depth);
        let dir = self.walk(depth, Some(agent_depth))?.ok_or_else(|| {
            self.err(ErrorKind::Transient, "directory vanished while creating it")
        })?;
        // Leftovers of a failed earlier delivery hold an old value; they are
        // not a reason to fail this one.
        if let Err(e) = self.sweep_own_stale(&dir) {
            tracing::warn!(path = %self.path().display(), error = %e, "file sink: could not remove stale temp files");
        }
        self.clear_other_layout(&dir, false)?;
        let dir_shown = self.shown(depth);
        if self.cfg.atomic {
            self.write_file_at(&dir, self.file_name(), &contents, &dir_shown)
        } else {
            self.write_file_in_place(&dir, &contents, &dir_shown)
        }
    }

    /// Makes way for a delivery whose layout is not the one at the path: a
    /// credential whose `generate.kind` changed between a keypair and a
    /// single value (a reload, or an edit while the daemon was down) keeps
    /// its path, and what keyturn delivered there before is the other
    /// layout. That is removed as a decommission removes it (a bundle only
    /// when `..data` and its links are keyturn's), so the new one can take
    /// its place; without this the delivery failed at every retry. Not
    /// atomic: for a moment neither is there (the agent must change how it
    /// reads the path anyway). A bundle holding anything keyturn did not
    /// put there is refused whole, and anything else at the path is left
    /// for the delivery to refuse. `bundle`: this delivery writes a bundle.
    pub(super) fn clear_other_layout(
        &self,
        dir: &OwnedFd,
        bundle: bool,
    ) -> Result<(), PluginError> {
        let name = self.file_name();
        let shown = self.path();
        let other = match stat_nofollow(dir, name) {
            Ok(Some(st)) if bundle => is_type(&st, SFlag::S_IFREG),
            Ok(Some(st)) if is_type(&st, SFlag::S_IFDIR) => {
                let held = open_dir(Some(dir.as_raw_fd()), name)
                    .map_err(|e| self.refuse_component(dir, self.rel_len(), e))?;
                if self.current_data_dir(&held)?.is_none() {
                    return Ok(());
                }
                let names = list_dir(&held)
                    .map_err(|e| self.sys(format_args!("list {}", shown.display()), e))?;
                let ours = |n: &OsString| {
                    n.as_bytes().starts_with(b"..")
                        || BUNDLE_FILES.iter().any(|f| f.as_bytes() == n.as_bytes())
                };
                if let Some(foreign) = names.iter().find(|n| !ours(n)) {
                    return Err(self.err(
                        ErrorKind::Invalid,
                        format_args!(
                            "{} is a keypair bundle keyturn delivered, and holds {foreign:?}, which keyturn did not put there; the credential now makes a single value (its generate.kind changed): move that file away, or give the file sink another path",
                            shown.display()
                        ),
                    ));
                }
                true
            }
            Ok(_) => false,
            Err(e) => return Err(self.sys(format_args!("inspect {}", shown.display()), e)),
        };
        if !other {
            return Ok(());
        }
        let (was, now) = if bundle {
            ("a single file", "a keypair bundle")
        } else {
            ("a keypair bundle", "a single file")
        };
        tracing::info!(path = %shown.display(), "file sink: the path holds {was} (the credential's generate.kind changed); replacing it with {now}");
        self.retract()
    }

    /// The bytes of a single-file delivery. They contain the secret, hence the
    /// zeroized buffer.
    pub(super) fn render(
        &self,
        notice: &Notice,
        value: &SecretValue,
    ) -> Result<Zeroizing<Vec<u8>>, PluginError> {
        match self.cfg.format {
            FileFormat::Raw => Ok(Zeroizing::new(value.expose().to_vec())),
            FileFormat::Json => {
                let text = value.expose_str().ok_or_else(|| {
                    self.err(ErrorKind::Invalid, "format json needs a UTF-8 value")
                })?;
                let doc = JsonDoc {
                    value: text,
                    version: notice.version,
                    rotation: notice.rotation.as_str(),
                    rotated_at: rfc3339(notice.rotated_at),
                    expires_hint: notice.expires_hint.map(rfc3339),
                    agent: notice.key.agent.as_str(),
                    credential: notice.key.credential.as_str(),
                    public: notice.public.as_deref(),
                    username: notice.login.as_deref(),
                };
                // Sized up front for the worst escaping (`\u00XX` per byte) so
                // the buffer never reallocates and leaves an unwiped copy behind.
                let public_len = notice.public.as_ref().map_or(0, String::len);
                let mut buf =
                    Zeroizing::new(Vec::with_capacity(6 * (text.len() + public_len) + 512));
                serde_json::to_writer(&mut *buf, &doc)
                    .map_err(|e| self.err(ErrorKind::Fatal, format_args!("encode json: {e}")))?;
                buf.push(b'\n');
                Ok(buf)
            }
            FileFormat::Env => {
                let bytes = value.expose();
                if bytes.contains(&0) {
                    return Err(self.err(
                        ErrorKind::Invalid,
                        "format env cannot hold a value with a NUL byte",
                    ));
                }
                let name = self.cfg.env_name.as_bytes();
                let quotes = bytes.iter().filter(|b| **b == b'\'').count();
                // Sized up front so the buffer never reallocates and leaves an
                // unwiped copy of the value behind.
                let login_len = notice
                    .login
                    .as_ref()
                    .map_or(0, |l| name.len() + 4 * l.len());
                let mut buf = Zeroizing::new(Vec::with_capacity(
                    2 * name.len() + bytes.len() + 3 * quotes + login_len + 64,
                ));
                buf.extend_from_slice(name);
                buf.push(b'=');
                push_sh_quoted(&mut buf, bytes);
                buf.extend_from_slice(name);
                buf.extend_from_slice(format!("_VERSION={}\n", notice.version).as_bytes());
                if let Some(login) = &notice.login {
                    buf.extend_from_slice(name);
                    buf.extend_from_slice(b"_USERNAME=");
                    push_sh_quoted(&mut buf, login.as_bytes());
                }
                Ok(buf)
            }
        }
    }

    /// Atomically replaces `name` in `dir` with `contents` (mode and owner from
    /// the config). `dir_shown` is the directory's path, for messages.
    pub(super) fn write_file_at(
        &self,
        dir: &OwnedFd,
        name: &OsStr,
        contents: &[u8],
        dir_shown: &Path,
    ) -> Result<(), PluginError> {
        let shown = dir_shown.join(name);
        let dfd = dir.as_raw_fd();
        // Refusing here is for the operator's benefit; safety does not depend
        // on it: `renameat` replaces a symlink planted later, never follows it.
        if self.existing(dir, name, contents, &shown)? == Existing::Holds {
            return Ok(());
        }

        let tmp = temp_name(name);
        let fd = nix::fcntl::openat(
            Some(dfd),
            tmp.as_os_str(),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_WRONLY,
            Mode::from_bits_truncate(self.cfg.mode),
        )
        .map_err(|e| {
            self.sys(
                format_args!("create temp file in {}", dir_shown.display()),
                e,
            )
        })?;
        // SAFETY: `openat` just returned this descriptor and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let written = (|| -> Result<(), PluginError> {
            // Mode and owner before the first byte: the secret is never
            // readable by anyone but the intended reader, whatever the umask.
            nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(self.cfg.mode))
                .map_err(|e| self.sys("set mode of temp file", e))?;
            chown_fd(&fd, self.owner()).map_err(|e| self.sys("set owner of temp file", e))?;
            let mut file = std::fs::File::from(fd);
            file.write_all(contents).map_err(|e| {
                self.err(ErrorKind::from_io(&e), format_args!("write temp file: {e}"))
            })?;
            file.sync_all().map_err(|e| {
                self.err(ErrorKind::from_io(&e), format_args!("fsync temp file: {e}"))
            })?;
            drop(file);
            crate::rotation::crash_point("sink.file.before_rename");
            nix::fcntl::renameat(Some(dfd), tmp.as_os_str(), Some(dfd), name).map_err(|e| {
                self.sys(format_args!("rename temp file over {}", shown.display()), e)
            })?;
            Ok(())
        })();
        if let Err(e) = written {
            let _ = nix::unistd::unlinkat(Some(dfd), tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
            return Err(e);
        }
        fsync_dir_after_change(dir)
            .map_err(|e| self.sys(format_args!("fsync {}", dir_shown.display()), e))
    }

    /// What is at `name` in `dir`: nothing, a regular file (holding
    /// `contents` already or not), or something a delivery must refuse
    /// (a symlink, a directory, a device...), which is an error.
    fn existing(
        &self,
        dir: &OwnedFd,
        name: &OsStr,
        contents: &[u8],
        shown: &Path,
    ) -> Result<Existing, PluginError> {
        match stat_nofollow(dir, name) {
            Ok(None) => Ok(Existing::Absent),
            Ok(Some(st)) if is_type(&st, SFlag::S_IFREG) => {
                Ok(if self.already_holds(dir, name, contents) {
                    Existing::Holds
                } else {
                    Existing::Stale
                })
            }
            Ok(Some(st)) => {
                let what = if is_type(&st, SFlag::S_IFLNK) {
                    "a symlink"
                } else if is_type(&st, SFlag::S_IFDIR) {
                    "a directory"
                } else {
                    "not a regular file"
                };
                Err(self.err(
                    ErrorKind::Invalid,
                    format_args!("{} is {what}; refusing to replace it", shown.display()),
                ))
            }
            Err(e) => Err(self.sys(format_args!("inspect {}", shown.display()), e)),
        }
    }

    /// `atomic = false`: writes `contents` into the existing file
    /// itself (truncate, write, fsync), so its inode, and a bind mount of
    /// it, stays the same. A missing file is created the atomic way (no one
    /// can have mounted it yet, so nothing is lost, and its first content
    /// is never seen partial). Mode and owner are applied before the first
    /// byte, as in the atomic write.
    pub(super) fn write_file_in_place(
        &self,
        dir: &OwnedFd,
        contents: &[u8],
        dir_shown: &Path,
    ) -> Result<(), PluginError> {
        let name = self.file_name();
        let shown = dir_shown.join(name);
        match self.existing(dir, name, contents, &shown)? {
            Existing::Holds => return Ok(()),
            Existing::Absent => return self.write_file_at(dir, name, contents, dir_shown),
            Existing::Stale => {}
        }
        // O_NOFOLLOW: a symlink swapped in since the check is refused, not
        // followed; O_NONBLOCK: a FIFO swapped in cannot hang the open; and
        // no O_TRUNC: nothing is changed before the checks on the descriptor.
        let fd = nix::fcntl::openat(
            Some(dir.as_raw_fd()),
            name,
            OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ELOOP => self.err(
                ErrorKind::Invalid,
                format_args!("{} is a symlink; refusing to follow it", shown.display()),
            ),
            e => self.sys(format_args!("open {}", shown.display()), e),
        })?;
        // SAFETY: `openat` just returned this descriptor and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let st = nix::sys::stat::fstat(fd.as_raw_fd())
            .map_err(|e| self.sys(format_args!("inspect {}", shown.display()), e))?;
        if !is_type(&st, SFlag::S_IFREG) {
            return Err(self.err(
                ErrorKind::Invalid,
                format_args!(
                    "{} is not a regular file; refusing to write it",
                    shown.display()
                ),
            ));
        }
        // Writing through a name writes every name of the inode. The atomic
        // write cannot be fooled by a hard link (the rename replaces the
        // name); here, a link planted at the path to a file elsewhere would
        // have the secret written, and the other file destroyed, there.
        if st.st_nlink != 1 {
            return Err(self.err(
                ErrorKind::Invalid,
                format_args!(
                    "{} has {} hard links; refusing to write a secret through it in place (remove it and keyturn recreates it)",
                    shown.display(),
                    st.st_nlink
                ),
            ));
        }
        nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(self.cfg.mode))
            .map_err(|e| self.sys(format_args!("set mode of {}", shown.display()), e))?;
        chown_fd(&fd, self.owner())
            .map_err(|e| self.sys(format_args!("set owner of {}", shown.display()), e))?;
        let mut file = std::fs::File::from(fd);
        file.set_len(0).map_err(|e| {
            self.err(
                ErrorKind::from_io(&e),
                format_args!("truncate {}: {e}", shown.display()),
            )
        })?;
        // The descriptor has no O_APPEND and is fresh: this writes from offset 0.
        file.write_all(contents).map_err(|e| {
            self.err(
                ErrorKind::from_io(&e),
                format_args!("write {}: {e}", shown.display()),
            )
        })?;
        file.sync_all().map_err(|e| {
            self.err(
                ErrorKind::from_io(&e),
                format_args!("fsync {}: {e}", shown.display()),
            )
        })
    }

    /// Whether `name` already has exactly these bytes, mode and owner, so a
    /// repeated delivery of one version leaves the file (and its watchers) alone.
    /// Any doubt answers "no" and the file is rewritten.
    pub(super) fn already_holds(&self, dir: &OwnedFd, name: &OsStr, contents: &[u8]) -> bool {
        let Ok(fd) = nix::fcntl::openat(
            Some(dir.as_raw_fd()),
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::empty(),
        ) else {
            return false;
        };
        // SAFETY: `openat` just returned this descriptor and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let Ok(st) = nix::sys::stat::fstat(fd.as_raw_fd()) else {
            return false;
        };
        let owner_ok = self.cfg.uid.is_none_or(|u| u == st.st_uid)
            && self.cfg.gid.is_none_or(|g| g == st.st_gid);
        if !is_type(&st, SFlag::S_IFREG)
            || st.st_mode & 0o7777 != self.cfg.mode
            || !owner_ok
            || st.st_size != contents.len() as i64
        {
            return false;
        }
        let mut current = Zeroizing::new(Vec::with_capacity(contents.len() + 1));
        let mut file = std::fs::File::from(fd);
        match Read::by_ref(&mut file)
            .take(contents.len() as u64 + 1)
            .read_to_end(&mut current)
        {
            Ok(_) => current.as_slice() == contents,
            Err(_) => false,
        }
    }
}

/// What a delivery finds at a single file's path.
#[derive(PartialEq, Eq)]
enum Existing {
    Absent,
    /// A regular file with exactly the bytes, mode and owner to deliver.
    Holds,
    /// A regular file to be replaced or rewritten.
    Stale,
}

/// Appends `'bytes'` and a newline, quoted for POSIX sh: a `'` inside becomes
/// close-quote, escaped quote, reopen.
pub(super) fn push_sh_quoted(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.push(b'\'');
    for &b in bytes {
        if b == b'\'' {
            buf.extend_from_slice(b"'\\''");
        } else {
            buf.push(b);
        }
    }
    buf.extend_from_slice(b"'\n");
}

/// The json format. Field order is the documented one.
#[derive(Serialize)]
pub(super) struct JsonDoc<'a> {
    value: &'a str,
    version: u64,
    rotation: &'a str,
    rotated_at: String,
    expires_hint: Option<String>,
    agent: &'a str,
    credential: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    public: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    username: Option<&'a str>,
}

/// A bundle's `meta.json`: no secret in it.
#[derive(Serialize)]
pub(super) struct BundleMeta<'a> {
    pub(super) version: u64,
    pub(super) rotation: &'a str,
    pub(super) rotated_at: String,
}

pub(super) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}
