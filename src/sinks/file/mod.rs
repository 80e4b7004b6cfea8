//! Atomic file sink: puts the current version of a credential in a file the
//! agent reads, so that a reader sees either the old or the new content,
//! complete, and never anything else (unless the operator trades that for
//! a stable inode: see "In place" below).
//!
//! # The recipe (see `design/references.md`, "File delivery")
//! 1. Walk from the delivery root down to the file's directory one component
//!    at a time with `openat(dirfd, name, O_DIRECTORY|O_NOFOLLOW)`. A symlink
//!    planted anywhere below the root is refused, so nothing is ever written
//!    outside the root, even by a daemon running as root. Missing directories
//!    are created: the agent's directory (the first component below the root
//!    when it is named after the agent, else the directory holding the file
//!    or the bundle) and
//!    everything below it get 0750 and the agent's uid/gid; directories above
//!    it get 0755 and stay the daemon's. A directory is configured under a
//!    temp name and then renamed into place, so a crash never leaves one with
//!    the wrong owner. An existing directory is used only when root or the
//!    daemon owns it, or (from the agent's directory down) the agent; a
//!    missing delivery root is created 0755 whatever the umask.
//! 2. In that directory, create `.NAME.tmp.<random>` with
//!    `O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC`, `fchmod` it to the exact mode
//!    (the umask cannot narrow it) and `fchown` it *before* writing a byte, so
//!    the secret is never readable by anyone it should not be.
//! 3. Write, `fsync`, `renameat` over the target, `fsync` the directory.
//!
//! # Bundles (Ed25519 keypairs)
//! A keypair is two files that must change together, so `path` is a directory
//! laid out like the Kubernetes atomic writer: each delivery writes a new
//! `..YYYYMMDDTHHMMSS.<version>.<random>` directory holding `private.pem`,
//! `public.pem` and `meta.json`, then swaps the `..data` symlink to it with one
//! `rename`. The top-level `private.pem`, `public.pem` and `meta.json` are
//! links through `..data`. A reader that wants a consistent pair resolves
//! `..data` once and reads both files from that directory. One previous
//! directory is kept for readers mid-read; older ones are pruned, and the
//! previous one goes when its version is retired (`Sink::retire_previous`),
//! so a retired private key does not wait for the next delivery to leave.
//!
//! # Idempotence and clean-up
//! Delivering a version the file already holds (same bytes, mode and owner)
//! does nothing, so an agent watching the file is not woken for nothing.
//!
//! A temp file holds a full secret, so one left by a crash (`kill -9`
//! between create and rename) must not outlive the crash. Temp names carry
//! a token drawn once per process (`.NAME.tmp.<token><random>`, 16 hex
//! digits), so a temp of another process is known dead: it cannot be in use,
//! since two daemons never share a state directory. `preflight` (start-up and
//! reload) removes, along the sink's path, every `.NAME.tmp.*` of another
//! process whatever its age, and this process's own once older than
//! [`STALE_TEMP_AGE`] (a delivery in flight holds a younger one). A
//! single-file delivery also removes this process's temps older than that in
//! its directory (looking at most once a minute per directory). A bundle's
//! unswapped timestamped directory of an earlier process is removed by
//! preflight too.
//!
//! # In place (`atomic = false`)
//! A container that bind-mounts one file sees the inode that was there at
//! mount time; a rename puts a new inode at the name and the container keeps
//! reading the old one forever. With `atomic = false` a single-file delivery
//! opens the existing file (`O_NOFOLLOW`, every directory walked as above),
//! checks on the descriptor that it is a regular file with one link (a hard
//! link would carry the write elsewhere), sets mode and owner, truncates,
//! writes and fsyncs: same inode, new content. The price is the guarantee in
//! the first line of this doc: a reader can see an empty or partial file
//! during the write, so readers must retry on a parse or auth error. A missing
//! file is still created the atomic way. Keypairs (bundle directories) are
//! refused by `check`: their files must change together.
//!
//! # Acknowledgements (`ack`)
//! With `ack = "explicit"` a delivery is `Sent` and the consumer acks with
//! `keyturn ack`. With `ack = "open"` the consumer acks by opening the file
//! after it is in place: see `ack.rs`.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::{Gid, Uid, UnlinkatFlags};
use serde::Serialize;
use zeroize::Zeroizing;

use super::{Delivered, Notice, Sink, SinkContext, SinkPlugin};
use crate::config::validate::{
    Loc, SinkScope, Validator, is_env_name, list, normalize, normalize_onto,
};
use crate::model::{CredentialKey, ErrorKind, PluginError, SecretValue, ValueKind};

mod ack;
mod bundle;
mod config;
mod fs;
#[cfg(test)]
mod tests;
mod upkeep;
mod write;

pub use config::{DEFAULT_MODE, FileAck, FileConfig, FileFormat, MAX_MODE};
use fs::*;
use write::*;

/// This process's temp files older than this are leftovers of a failed
/// delivery (no delivery takes a minute) and are removed; other processes'
/// are removed at any age.
pub const STALE_TEMP_AGE: Duration = Duration::from_secs(60);

/// Drawn once per process and written into every temp name: it tells this
/// process's temps (maybe in use) from a dead process's (crash leftovers).
fn process_token() -> u32 {
    static TOKEN: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *TOKEN.get_or_init(rand::random)
}

/// Whose temp `suffix` (what follows `.tmp.`, or a bundle directory's last
/// dot) is: `Some(true)` this process's, `Some(false)` another's, `None`
/// not a name keyturn makes.
fn temp_owner(suffix: &[u8]) -> Option<bool> {
    if suffix.len() != 16 || !suffix.iter().all(u8::is_ascii_hexdigit) {
        // Names of earlier keyturn versions (8 or 16 digits without a
        // token) are another process's too.
        return (suffix.len() == 8 && suffix.iter().all(u8::is_ascii_hexdigit)).then_some(false);
    }
    let token = std::str::from_utf8(&suffix[..8])
        .ok()
        .and_then(|t| u32::from_str_radix(t, 16).ok())?;
    Some(token == process_token())
}

/// Mode of the agent's directory and of everything keyturn creates below it.
const AGENT_DIR_MODE: u32 = 0o750;
/// Mode of directories keyturn creates between the root and the agent's directory.
const SHARED_DIR_MODE: u32 = 0o755;

/// The bundle's symlink to its current timestamped directory.
const DATA_LINK: &str = "..data";
/// Built next to `..data`, then renamed over it: the atomic swap.
const DATA_LINK_TMP: &str = "..data_tmp";
/// The files of a bundle, each also a top-level link `NAME -> ..data/NAME`.
const BUNDLE_FILES: [&str; 3] = ["private.pem", "public.pem", "meta.json"];

/// Delivers one credential to one file (or bundle directory) below a delivery root.
pub struct FileSink {
    inner: Inner,
    /// `ack = "explicit"` or `"open"`; the state of the open watch (boxed:
    /// most sinks have none, and there may be 100k sinks).
    ack: Option<FileAck>,
    open_ack: Option<Box<ack::OpenAck>>,
}

/// Everything a blocking task needs; each task gets its own copy (a few
/// small strings, once per delivery), so a sink is one allocation.
///
/// One per delivery path, so at 100k credentials every byte here counts: the
/// root and the components below it are views into `cfg.path`, not copies,
/// and the strings are boxed (no spare capacity).
#[derive(Clone)]
struct Inner {
    cfg: Spec,
    /// `cfg.path[..root_len]` is the delivery root that contains it; the
    /// rest is at least one plain name.
    root_len: u32,
}

/// The [`FileConfig`] as the sink keeps it.
#[derive(Clone)]
struct Spec {
    path: Box<Path>,
    format: FileFormat,
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
    /// [`SinkContext::former_uid`].
    former_uid: Option<u32>,
    env_name: Box<str>,
    /// `false`: rewrite the file in place (see the module doc).
    atomic: bool,
}

/// Deliveries to one path run one at a time (a bundle swap is several
/// syscalls; two at once would race on `..data_tmp`). The engine already runs
/// one job per credential at a time; these locks also cover two sinks for the
/// same path (an old and a new catalog across a reload). A path hashes to one
/// of a fixed set of locks, so a sink carries no lock of its own (100k
/// sinks, 100k mutexes otherwise); two paths sharing a lock only wait for
/// each other's short critical section.
fn delivery_lock(path: &Path) -> &'static tokio::sync::Mutex<()> {
    static LOCKS: std::sync::LazyLock<Vec<tokio::sync::Mutex<()>>> =
        std::sync::LazyLock::new(|| (0..256).map(|_| tokio::sync::Mutex::new(())).collect());
    // FNV-1a: stable and cheap; the spread only has to be even.
    let h = path
        .as_os_str()
        .as_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        });
    &LOCKS[(h % LOCKS.len() as u64) as usize]
}

impl fmt::Debug for FileSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileSink")
            .field("path", &self.inner.cfg.path)
            .field("format", &self.inner.cfg.format)
            .finish()
    }
}

impl FileSink {
    /// Checks the configuration without touching the disk: the path is
    /// absolute, made only of plain names (no `..`, no `.`), and strictly
    /// inside one of `delivery_roots`; the mode is a plain permission mode.
    pub fn new(cfg: FileConfig, ctx: &SinkContext<'_>) -> Result<FileSink, PluginError> {
        let delivery_roots = ctx.delivery_roots;
        let path = &cfg.path;
        let format = cfg.format();
        let invalid = |why: &str| {
            PluginError::new(
                ErrorKind::Invalid,
                format!("file sink {}: {why}", path.display()),
            )
        };
        if !path.is_absolute() {
            return Err(invalid("path must be absolute"));
        }
        if !is_plain(path) {
            return Err(invalid("path must not contain '..' or '.' components"));
        }
        let mode = match cfg.mode() {
            Some(m) if m & !0o777 == 0 && m & 0o002 == 0 => m,
            _ => {
                return Err(invalid(&format!(
                    "mode {:?} must be an octal permission mode that is not world-writable",
                    cfg.mode.as_deref().unwrap_or_default()
                )));
            }
        };
        let env_name = cfg.env_name.clone().unwrap_or_default();
        let atomic = cfg.atomic();
        let ack = cfg.ack;
        if format == FileFormat::Env && !is_env_name(&env_name) {
            return Err(invalid(&format!(
                "env_name {env_name:?} is not a valid variable name"
            )));
        }
        // The most specific root wins, so nested roots behave as expected.
        let root = delivery_roots
            .iter()
            .filter(|r| is_plain_root(r))
            .filter(|r| {
                path.strip_prefix(r)
                    .is_ok_and(|rest| !rest.as_os_str().is_empty())
            })
            .max_by_key(|r| r.components().count())
            .ok_or_else(|| {
                invalid(&format!(
                    "path is not inside a delivery root ({})",
                    delivery_roots
                        .iter()
                        .map(|r| r.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        let below = path
            .strip_prefix(root)
            .map_err(|_| invalid("path is not inside its delivery root"))?;
        if below.as_os_str().is_empty() {
            return Err(invalid("path must name a file below the delivery root"));
        }
        // Both are plain (no `.`, `..`, repeated or trailing `/`), so the
        // root is a byte prefix of the path.
        let root_len = u32::try_from(root.as_os_str().len())
            .map_err(|_| invalid("delivery root path is too long"))?;
        if !path
            .as_os_str()
            .as_bytes()
            .starts_with(root.as_os_str().as_bytes())
        {
            return Err(invalid("path is not inside its delivery root"));
        }
        let cfg = Spec {
            path: cfg.path.into_boxed_path(),
            format,
            mode,
            uid: ctx.uid,
            gid: ctx.gid,
            former_uid: ctx.former_uid.filter(|u| ctx.uid != Some(*u)),
            env_name: env_name.into_boxed_str(),
            atomic,
        };
        Ok(FileSink {
            inner: Inner { cfg, root_len },
            ack,
            open_ack: (ack == Some(FileAck::Open)).then(Box::default),
        })
    }

    /// The path this sink delivers to.
    pub fn path(&self) -> &Path {
        &self.inner.cfg.path
    }

    /// Whether what this sink delivered is gone (see [`Inner::retracted`]):
    /// `Ok` says how, `Err` what is still there.
    pub async fn retracted(&self) -> Result<String, PluginError> {
        self.blocking(|inner| inner.retracted()).await
    }

    /// Runs blocking file-system work off the async runtime.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, PluginError> + Send + 'static,
    ) -> Result<T, PluginError> {
        let _serial = delivery_lock(&self.inner.cfg.path).lock().await;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| {
                // Not `{e}`: a panic's message is not ours to vouch for.
                let how = if e.is_panic() {
                    "panicked"
                } else {
                    "was cancelled"
                };
                PluginError::new(
                    ErrorKind::Transient,
                    format!(
                        "file sink {}: delivery task {how}",
                        self.inner.cfg.path.display()
                    ),
                )
            })?
    }
}

#[async_trait]
impl Sink for FileSink {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn describe(&self) -> String {
        format!("file:{}", self.inner.cfg.path.display())
    }

    fn delivered_path(&self) -> Option<&Path> {
        Some(&self.inner.cfg.path)
    }

    fn written_as(&self) -> Option<String> {
        let c = &self.inner.cfg;
        Some(format!(
            "{}\0{:?}\0{:o}\0{:?}\0{:?}\0{}\0{}",
            c.path.display(),
            c.format,
            c.mode,
            c.uid,
            c.gid,
            c.env_name,
            c.atomic
        ))
    }

    async fn deliver(
        &self,
        notice: &Notice,
        value: &SecretValue,
    ) -> Result<Delivered, PluginError> {
        let version = notice.version;
        let watch = self
            .open_ack
            .as_ref()
            .map(|o| o.arm(&self.inner.cfg.path, version));
        let notice = notice.clone();
        let value = value.clone();
        self.blocking(move |inner| {
            if notice.kind == ValueKind::Ed25519 {
                // `check` refuses this pairing; a bundle is never written in place.
                if !inner.cfg.atomic {
                    return Err(inner.err(
                        ErrorKind::Invalid,
                        "an ed25519 keypair cannot be delivered with `atomic = false`",
                    ));
                }
                inner.deliver_bundle(&notice, &value)
            } else {
                inner.deliver_file(&notice, &value)
            }
        })
        .await?;
        match (self.ack, watch, &self.open_ack) {
            (None, ..) => Ok(Delivered::Acknowledged),
            (Some(FileAck::Open), Some(watch), Some(o)) => {
                o.delivered(&self.inner.cfg.path, version, watch);
                Ok(Delivered::Sent)
            }
            (Some(_), ..) => Ok(Delivered::Sent),
        }
    }

    fn awaits_ack(&self) -> bool {
        self.ack.is_some()
    }

    fn ack_watch(
        &self,
        _key: &CredentialKey,
        version: crate::model::VersionNo,
    ) -> Option<super::AckWatch> {
        self.open_ack
            .as_ref()
            .map(|o| o.take(&self.inner.cfg.path, version))
    }

    async fn retire_previous(&self, _key: &CredentialKey) -> Result<(), PluginError> {
        self.blocking(|inner| inner.retire_previous()).await
    }

    async fn retract(&self, _key: &CredentialKey) -> Result<(), PluginError> {
        self.blocking(|inner| inner.retract()).await
    }

    async fn preflight(&self) -> Result<(), PluginError> {
        self.blocking(|inner| inner.preflight()).await
    }
}

/// Who owns the directories and files keyturn creates for an agent.
#[derive(Clone, Copy)]
struct Owner {
    uid: Option<u32>,
    gid: Option<u32>,
}

impl Owner {
    fn is_set(self) -> bool {
        self.uid.is_some() || self.gid.is_some()
    }
}

impl Inner {
    /// The delivery root containing the path.
    fn root(&self) -> &Path {
        let bytes = self.cfg.path.as_os_str().as_bytes();
        Path::new(OsStr::from_bytes(&bytes[..self.root_len as usize]))
    }

    /// The path's components below the root (plain names, at least one).
    fn rel(&self) -> impl Iterator<Item = &OsStr> {
        let bytes = self.cfg.path.as_os_str().as_bytes();
        Path::new(OsStr::from_bytes(&bytes[self.root_len as usize..]))
            .components()
            .filter_map(|c| match c {
                std::path::Component::Normal(n) => Some(n),
                _ => None,
            })
    }

    fn rel_at(&self, i: usize) -> &OsStr {
        self.rel().nth(i).unwrap_or_default()
    }

    fn rel_len(&self) -> usize {
        self.rel().count()
    }
    fn path(&self) -> &Path {
        &self.cfg.path
    }

    fn owner(&self) -> Owner {
        Owner {
            uid: self.cfg.uid,
            gid: self.cfg.gid,
        }
    }

    fn err(&self, kind: ErrorKind, what: impl fmt::Display) -> PluginError {
        PluginError::new(kind, format!("file sink {}: {what}", self.path().display()))
    }

    fn sys(&self, what: impl fmt::Display, e: Errno) -> PluginError {
        let io = std::io::Error::from(e);
        PluginError::new(
            ErrorKind::from_io(&io),
            format!(
                "file sink {}: {what}: {io}{}",
                self.path().display(),
                crate::model::io_hint(&io)
            ),
        )
    }

    /// The path of the first `depth` components below the root, for messages.
    fn shown(&self, depth: usize) -> PathBuf {
        let mut p = self.root().to_path_buf();
        p.extend(self.rel().take(depth));
        p
    }

    /// Opens the delivery root, creating it (0755) when it is missing. The root
    /// itself is the operator's choice and may be reached through symlinks
    /// (`/var/run` → `/run`), or be one; only what is below it is held to the
    /// no-symlink rule.
    fn open_root(&self) -> Result<OwnedFd, PluginError> {
        let root = self.open_root_unchecked()?;
        // Held to the rules of the directories below it (black-box finding:
        // a root of mode 0777, or another user's, was delivered into, and
        // whoever could write it could rename agents' directories away and
        // plant their own).
        self.check_dir_owner(&root, 0, false)?;
        Ok(root)
    }

    fn open_root_unchecked(&self) -> Result<OwnedFd, PluginError> {
        match open_root_dir(self.root()) {
            Ok(fd) => Ok(fd),
            Err(Errno::ENOENT) => {
                crate::private_file::create_shared_dir(self.root(), SHARED_DIR_MODE, None)
                    .map_err(|e| {
                        PluginError::io(
                            format_args!(
                                "file sink {}: create delivery root {}",
                                self.path().display(),
                                self.root().display()
                            ),
                            &e,
                        )
                    })?;
                open_root_dir(self.root()).map_err(|e| {
                    self.sys(
                        format_args!("open delivery root {}", self.root().display()),
                        e,
                    )
                })
            }
            Err(e) => Err(self.sys(
                format_args!("open delivery root {}", self.root().display()),
                e,
            )),
        }
    }

    /// Walks from the root through the first `depth` components, refusing any
    /// that is a symlink or not a directory. With `create`, missing directories
    /// are created (see the module doc for their modes and owner); without it,
    /// a missing one ends the walk with `Ok(None)`.
    /// `create` carries the depth of the agent's directory (see `agent_dir_depth`).
    fn walk(&self, depth: usize, create: Option<usize>) -> Result<Option<OwnedFd>, PluginError> {
        let mut cur = self.open_root()?;
        let agent_depth = create;
        for i in 0..depth {
            let name = self.rel_at(i);
            let next = match open_dir(Some(cur.as_raw_fd()), name) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => match agent_depth {
                    None => return Ok(None),
                    Some(agent_depth) => {
                        let (mode, owner) = if i + 1 >= agent_depth {
                            (AGENT_DIR_MODE, self.owner())
                        } else {
                            (
                                SHARED_DIR_MODE,
                                Owner {
                                    uid: None,
                                    gid: None,
                                },
                            )
                        };
                        self.create_dir(&cur, name, mode, owner, i + 1)?
                    }
                },
                Err(e) => return Err(self.refuse_component(&cur, i + 1, e)),
            };
            // Also one another process made while we were creating it.
            if let Some(agent_depth) = agent_depth {
                self.check_dir_owner(&next, i + 1, i + 1 >= agent_depth)?;
            }
            cur = next;
        }
        Ok(Some(cur))
    }

    /// An existing directory on the way to a delivery is used only when it
    /// belongs to root or the daemon's user, or (the agent's directory and
    /// below, `agents`) to the agent: the owner of a directory can rename
    /// and replace what is in it, so anyone else's would let them swap the
    /// delivered file or read the next one through a file of their own.
    fn check_dir_owner(
        &self,
        dir: &OwnedFd,
        depth: usize,
        agents: bool,
    ) -> Result<(), PluginError> {
        let st = nix::sys::stat::fstat(dir.as_raw_fd())
            .map_err(|e| self.sys(format_args!("inspect {}", self.shown(depth).display()), e))?;
        let daemon = nix::unistd::geteuid().as_raw();
        let agent = self.cfg.uid.filter(|_| agents);
        // Black-box finding: a directory anyone (or its group) can write
        // lets them remove the delivered file and plant their own, which
        // the agent then reads as its credential. The sticky bit (`/tmp`'s
        // 1777) keeps them from touching entries they do not own.
        let mode = st.st_mode & 0o7777;
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(self.err(
                ErrorKind::Invalid,
                format_args!(
                    "existing directory {} is writable by {} (mode {mode:04o}): they could replace the delivered file with their own; refusing to deliver into it (`chmod go-w` it)",
                    self.shown(depth).display(),
                    if mode & 0o002 != 0 { "everyone" } else { "its group" }
                ),
            ));
        }
        let former = self.cfg.former_uid.filter(|_| agents);
        if let Some(a) = agent
            && st.st_uid != a
            && (st.st_uid == 0 || st.st_uid == daemon || former == Some(st.st_uid))
        {
            // Made before the agent had a `uid` (or by root), or under the
            // agent's uid before a reload changed it: the agent's directory
            // is the agent's, as documented, or it cannot reach the files
            // it is given (a 0750 directory of root's).
            match chown_fd(dir, self.owner()) {
                Ok(()) => tracing::info!(
                    directory = %self.shown(depth).display(), uid = a, was = st.st_uid,
                    "the agent's directory is now the agent's (its uid in the config)"
                ),
                Err(e) => tracing::warn!(
                    directory = %self.shown(depth).display(), uid = a, error = %e,
                    "cannot give the agent's directory to the agent: it may not reach its files"
                ),
            }
            return Ok(());
        }
        if st.st_uid == 0 || st.st_uid == daemon || agent == Some(st.st_uid) {
            return Ok(());
        }
        let allowed = match agent {
            Some(a) => format!("root, the daemon (uid {daemon}) or the agent (uid {a})"),
            None => format!("root or the daemon (uid {daemon})"),
        };
        Err(self.err(
            ErrorKind::Invalid,
            format_args!(
                "existing directory {} is owned by uid {}, not by {allowed}; refusing to deliver into it (chown it, or remove it and keyturn recreates it)",
                self.shown(depth).display(),
                st.st_uid
            ),
        ))
    }

    /// How many components down the agent's directory is: the first one when
    /// it is named after the agent, else `holder`, the depth of the directory
    /// holding the file or the bundle directory (its parent).
    fn agent_dir_depth(&self, agent: &str, holder: usize) -> usize {
        if holder >= 1 && self.rel_at(0).as_bytes() == agent.as_bytes() {
            1
        } else {
            holder
        }
    }

    /// Explains why component `depth` could not be opened as a directory.
    fn refuse_component(&self, parent: &OwnedFd, depth: usize, e: Errno) -> PluginError {
        let shown = self.shown(depth);
        let name = self.rel_at(depth - 1);
        match stat_nofollow(parent, name) {
            Ok(Some(st)) if is_type(&st, SFlag::S_IFLNK) => self.err(
                ErrorKind::Invalid,
                format_args!("{} is a symlink; refusing to follow it", shown.display()),
            ),
            Ok(Some(st)) if !is_type(&st, SFlag::S_IFDIR) => self.err(
                ErrorKind::Invalid,
                format_args!("{} is not a directory", shown.display()),
            ),
            _ => self.sys(format_args!("open directory {}", shown.display()), e),
        }
    }

    /// Creates directory `name` in `parent` with exactly `mode` and `owner`:
    /// configured under a temp name, then renamed into place without replacing
    /// anything, so no one ever sees it half set up (even after a crash).
    fn create_dir(
        &self,
        parent: &OwnedFd,
        name: &OsStr,
        mode: u32,
        owner: Owner,
        depth: usize,
    ) -> Result<OwnedFd, PluginError> {
        let shown = self.shown(depth);
        let tmp = temp_name(name);
        let pfd = parent.as_raw_fd();
        nix::sys::stat::mkdirat(Some(pfd), tmp.as_os_str(), Mode::from_bits_truncate(0o700))
            .map_err(|e| self.sys(format_args!("create directory {}", shown.display()), e))?;
        let configured = (|| {
            let fd = open_dir(Some(pfd), &tmp)?;
            nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode))?;
            chown_fd(&fd, owner)?;
            rename_noreplace(pfd, &tmp, name)?;
            Ok(fd)
        })();
        match configured {
            Ok(fd) => {
                fsync_dir(parent).map_err(|e| self.sys("fsync directory", e))?;
                Ok(fd)
            }
            Err(e) => {
                let _ = nix::unistd::unlinkat(Some(pfd), tmp.as_os_str(), UnlinkatFlags::RemoveDir);
                if e == Errno::EEXIST || e == Errno::ENOTEMPTY {
                    // Created meanwhile by someone else: use theirs, same rules.
                    open_dir(Some(pfd), name).map_err(|e| self.refuse_component(parent, depth, e))
                } else {
                    Err(self.sys(format_args!("create directory {}", shown.display()), e))
                }
            }
        }
    }

    fn file_name(&self) -> &OsStr {
        // `new` guarantees at least one component.
        self.rel().last().unwrap_or_default()
    }
}
