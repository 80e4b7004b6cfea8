//! Atomic file sink: puts the current version of a credential in a file the
//! agent reads, so that a reader sees either the old or the new content,
//! complete, and never anything else.
//!
//! # The recipe (see `design/references.md`, "File delivery")
//! 1. Walk from the delivery root down to the file's directory one component
//!    at a time with `openat(dirfd, name, O_DIRECTORY|O_NOFOLLOW)`. A symlink
//!    planted anywhere below the root is refused, so nothing is ever written
//!    outside the root, even by a daemon running as root. Missing directories
//!    are created: the agent's directory (the first component below the root
//!    when it is named after the agent, else the file's own directory) and
//!    everything below it get 0750 and the agent's uid/gid; directories above
//!    it get 0755 and stay the daemon's. A directory is configured under a
//!    temp name and then renamed into place, so a crash never leaves one with
//!    the wrong owner.
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
//! directory is kept for readers mid-read; older ones are pruned.
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
//! # Not here (yet)
//! An in-place mode (write + fsync of the same inode) for single-file bind
//! mounts, which a rename breaks; its trade-off is that readers can see a
//! partial file.

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

/// Default file mode: owner read only.
pub const DEFAULT_MODE: u32 = 0o400;
/// Files hold secrets: owner read/write, group read at most.
pub const MAX_MODE: u32 = 0o640;

/// One `deliver = [{ type = "file", ... }]` entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Absolute, or relative to the one delivery root; after `check`,
    /// absolute and inside a delivery root. For a keypair this is a
    /// directory holding `..data` and the bundle's links.
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<FileFormat>,
    /// Octal, as a string (`"0440"`); default 0400, never wider than 0640.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Variable name for `format = "env"`; `check` fills in the default
    /// (the credential's name upper-cased, `-` → `_`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    Raw,
    Json,
    Env,
}

impl FileFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            FileFormat::Raw => "raw",
            FileFormat::Json => "json",
            FileFormat::Env => "env",
        }
    }
}

impl FileConfig {
    pub fn new(path: impl Into<PathBuf>, format: FileFormat) -> Self {
        Self {
            path: path.into(),
            format: Some(format),
            mode: None,
            env_name: None,
        }
    }

    pub fn format(&self) -> FileFormat {
        self.format.unwrap_or(FileFormat::Raw)
    }

    /// The mode; `None` when it is not octal.
    pub fn mode(&self) -> Option<u32> {
        let Some(m) = self.mode.as_deref() else {
            return Some(DEFAULT_MODE);
        };
        (!m.is_empty() && m.len() <= 4 && m.bytes().all(|b| (b'0'..=b'7').contains(&b)))
            .then(|| u32::from_str_radix(m, 8).ok())
            .flatten()
    }

    /// A valid path: absolute as written, or under the one delivery root.
    /// `roots` hold normalised paths, so normalising onto the root is the
    /// same as `normalize(&root.join(path))` without the second buffer.
    fn resolve(roots: &[PathBuf], written: &Path) -> PathBuf {
        match roots {
            [root] if !written.is_absolute() => {
                let mut out =
                    PathBuf::with_capacity(root.as_os_str().len() + 1 + written.as_os_str().len());
                out.push(root);
                normalize_onto(out, written)
            }
            _ => normalize(written),
        }
    }

    /// The path: never `..`; absolute, or relative to the single delivery
    /// root; inside a delivery root; used by this sink only.
    fn check_path(&mut self, v: &mut Validator<'_>, p: Loc<'_>, scope: &mut SinkScope<'_, '_>) {
        let Some(roots) = scope.roots else { return };
        if roots.is_empty() {
            if scope.first_to_miss_roots() {
                v.err(
                    p,
                    "file sinks need `daemon.delivery_roots`: set it to the directories keyturn may write secrets under",
                );
            }
            return;
        }
        let written = self.path.as_path();
        let text = written.display();
        if written.as_os_str().is_empty() {
            v.err(p, "delivery path must not be empty");
            return;
        }
        // `..` is refused outright rather than normalised away: with
        // symlinks in play, `a/../b` need not be where it looks.
        if written.components().any(|c| c == Component::ParentDir) {
            v.err(
                p,
                format!("delivery path `{text}` contains `..`; write the path without it"),
            );
            return;
        }
        if !written.is_absolute() && roots.len() != 1 {
            v.err(
                p,
                format!(
                    "delivery path `{text}` is relative, which is only allowed with exactly one delivery root; there are {} ({}), so write an absolute path",
                    roots.len(),
                    list(roots.iter().map(|r| r.display().to_string()))
                ),
            );
            return;
        }
        let resolved = Self::resolve(roots, written);
        if !roots
            .iter()
            .any(|r| resolved.starts_with(r) && resolved != *r)
        {
            v.err(
                p,
                format!(
                    "delivery path `{}` is outside every delivery root ({})",
                    resolved.display(),
                    list(roots.iter().map(|r| r.display().to_string()))
                ),
            );
            return;
        }
        if scope.claim(v, p, "path", &resolved) {
            self.path = resolved;
        }
    }
}

impl SinkPlugin for FileConfig {
    fn check(&mut self, v: &mut Validator<'_>, p: Loc<'_>, scope: &mut SinkScope<'_, '_>) {
        self.check_path(v, p.key("path"), scope);
        if self.mode.is_some() {
            let at = p.key("mode");
            let text = self.mode.as_deref().unwrap_or_default();
            match self.mode() {
                None => v.err(
                    at,
                    format!(
                        "invalid file mode `{text}`: write octal digits as a string, e.g. \"0440\""
                    ),
                ),
                Some(mode) if mode & !MAX_MODE != 0 => v.err(
                    at,
                    format!(
                        "file mode {mode:04o} is wider than 0640: secrets may be readable by owner and group only, never by others or executable"
                    ),
                ),
                Some(_) => {}
            }
        }
        match &self.env_name {
            Some(n) if !is_env_name(n) => {
                v.err(
                    p.key("env_name"),
                    format!("invalid env_name `{n}`: it must match [A-Z_][A-Z0-9_]*"),
                );
            }
            Some(_) => {}
            // Only an env file uses the name, so a credential name that
            // makes a bad variable name matters only there.
            None if self.format() == FileFormat::Env => {
                let cred = scope.credential;
                let derived = cred.to_ascii_uppercase().replace('-', "_");
                if !is_env_name(&derived) {
                    v.err(
                        p.key("format"),
                        format!(
                            "the variable name derived from credential `{cred}` is `{derived}`, which does not match [A-Z_][A-Z0-9_]*; set env_name"
                        ),
                    );
                }
                self.env_name = Some(derived);
            }
            None => {}
        }
    }

    fn build(self: Box<Self>, ctx: &SinkContext<'_>) -> Result<Arc<dyn Sink>, PluginError> {
        Ok(Arc::new(FileSink::new(*self, ctx)?))
    }
}

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
    env_name: Box<str>,
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
            env_name: env_name.into_boxed_str(),
        };
        Ok(FileSink {
            inner: Inner { cfg, root_len },
        })
    }

    /// The path this sink delivers to.
    pub fn path(&self) -> &Path {
        &self.inner.cfg.path
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
    fn describe(&self) -> String {
        format!("file:{}", self.inner.cfg.path.display())
    }

    async fn deliver(
        &self,
        notice: &Notice,
        value: &SecretValue,
    ) -> Result<Delivered, PluginError> {
        let notice = notice.clone();
        let value = value.clone();
        self.blocking(move |inner| {
            if notice.kind == ValueKind::Ed25519 {
                inner.deliver_bundle(&notice, &value)
            } else {
                inner.deliver_file(&notice, &value)
            }
        })
        .await?;
        Ok(Delivered::Acknowledged)
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
            format!("file sink {}: {what}: {io}", self.path().display()),
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
    /// (`/var/run` → `/run`); only what is below it is held to the no-symlink rule.
    fn open_root(&self) -> Result<OwnedFd, PluginError> {
        match open_dir(None, self.root().as_os_str()) {
            Ok(fd) => Ok(fd),
            Err(Errno::ENOENT) => {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(SHARED_DIR_MODE)
                    .create(self.root())
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
                open_dir(None, self.root().as_os_str()).map_err(|e| {
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
            cur = next;
        }
        Ok(Some(cur))
    }

    /// How many components down the agent's directory is: the first one when
    /// it is named after the agent, else `holder`, the depth of the directory
    /// holding the file(s) (the file's parent, or a bundle's own directory).
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

    /// Writes a single-file format (raw, json, env).
    fn deliver_file(&self, notice: &Notice, value: &SecretValue) -> Result<(), PluginError> {
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
        self.write_file_at(
            &dir,
            self.file_name(),
            &contents,
            self.shown(depth).as_path(),
        )
    }

    /// The bytes of a single-file delivery. They contain the secret, hence the
    /// zeroized buffer.
    fn render(
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
    fn write_file_at(
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
        match stat_nofollow(dir, name) {
            Ok(None) => {}
            Ok(Some(st)) if is_type(&st, SFlag::S_IFREG) => {
                if self.already_holds(dir, name, contents) {
                    return Ok(());
                }
            }
            Ok(Some(st)) => {
                let what = if is_type(&st, SFlag::S_IFLNK) {
                    "a symlink"
                } else if is_type(&st, SFlag::S_IFDIR) {
                    "a directory"
                } else {
                    "not a regular file"
                };
                return Err(self.err(
                    ErrorKind::Invalid,
                    format_args!("{} is {what}; refusing to replace it", shown.display()),
                ));
            }
            Err(e) => return Err(self.sys(format_args!("inspect {}", shown.display()), e)),
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
        fsync_dir(dir).map_err(|e| self.sys(format_args!("fsync {}", dir_shown.display()), e))
    }

    /// Whether `name` already has exactly these bytes, mode and owner, so a
    /// repeated delivery of one version leaves the file (and its watchers) alone.
    /// Any doubt answers "no" and the file is rewritten.
    fn already_holds(&self, dir: &OwnedFd, name: &OsStr, contents: &[u8]) -> bool {
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

    /// Writes an Ed25519 keypair as a bundle (see the module doc).
    fn deliver_bundle(&self, notice: &Notice, value: &SecretValue) -> Result<(), PluginError> {
        let public = notice.public.as_deref().ok_or_else(|| {
            self.err(
                ErrorKind::Invalid,
                "an ed25519 delivery needs the public key",
            )
        })?;
        let depth = self.rel_len();
        let agent_depth = self.agent_dir_depth(notice.key.agent.as_str(), depth);
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
    fn current_data_dir(&self, bundle: &OwnedFd) -> Result<Option<String>, PluginError> {
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
    fn check_link(&self, bundle: &OwnedFd, link: &str) -> Result<(), PluginError> {
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
    fn remove_data_link_tmp(&self, bundle: &OwnedFd) -> Result<(), PluginError> {
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
    fn remove_data_dir(&self, bundle: &OwnedFd, name: &OsStr) -> Result<(), PluginError> {
        let shown = self.path().join(name);
        match stat_nofollow(bundle, name) {
            Ok(Some(st)) if is_type(&st, SFlag::S_IFDIR) => {}
            Ok(_) => return Ok(()), // gone, or not a directory: not ours to remove
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
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(e) => {
                    return Err(self.sys(format_args!("remove {}", shown.join(&n).display()), e));
                }
            }
        }
        match nix::unistd::unlinkat(Some(bundle.as_raw_fd()), name, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(self.sys(format_args!("remove {}", shown.display()), e)),
        }
    }

    /// Removes what was delivered: the file, or the bundle's links, `..data`
    /// and every `..` directory (then the bundle directory if it is empty).
    /// Missing is fine: retracting twice is a no-op.
    fn retract(&self) -> Result<(), PluginError> {
        let depth = self.rel_len() - 1;
        let Some(dir) = self.walk(depth, None)? else {
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
        if is_type(&st, SFlag::S_IFREG) {
            nix::unistd::unlinkat(Some(dfd), name, UnlinkatFlags::NoRemoveDir)
                .or_else(ignore_enoent)
                .map_err(|e| self.sys(format_args!("remove {}", shown.display()), e))?;
        } else if is_type(&st, SFlag::S_IFDIR) {
            let bundle = open_dir(Some(dfd), name)
                .map_err(|e| self.refuse_component(&dir, self.rel_len(), e))?;
            self.retract_bundle(&bundle)?;
            match nix::unistd::unlinkat(Some(dfd), name, UnlinkatFlags::RemoveDir) {
                // Something we did not put there is left; keep it (and the directory).
                Ok(()) | Err(Errno::ENOENT) | Err(Errno::ENOTEMPTY) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(self.sys(format_args!("remove {}", shown.display()), e)),
            }
        } else {
            return Err(self.err(
                ErrorKind::Invalid,
                format_args!(
                    "{} is not a file or bundle keyturn delivered; refusing to remove it",
                    shown.display()
                ),
            ));
        }
        // Our own temp files would otherwise outlive the credential.
        self.sweep_temps(&dir, name, true)?;
        fsync_dir(&dir).map_err(|e| self.sys("fsync directory", e))
    }

    fn retract_bundle(&self, bundle: &OwnedFd) -> Result<(), PluginError> {
        let bfd = bundle.as_raw_fd();
        // Check first, so a foreign file is refused before anything is removed.
        self.current_data_dir(bundle)?;
        for link in BUNDLE_FILES {
            self.check_link(bundle, link)?;
        }
        for link in BUNDLE_FILES.into_iter().chain([DATA_LINK]) {
            nix::unistd::unlinkat(Some(bfd), link, UnlinkatFlags::NoRemoveDir)
                .or_else(ignore_enoent)
                .map_err(|e| self.sys(format_args!("remove {link}"), e))?;
        }
        self.remove_data_link_tmp(bundle)?;
        fsync_dir(bundle).map_err(|e| self.sys("fsync bundle directory", e))?;
        let names = list_dir(bundle).map_err(|e| self.sys("list bundle directory", e))?;
        for n in names {
            if n.as_bytes().starts_with(b"..") {
                self.remove_data_dir(bundle, &n)?;
            }
        }
        fsync_dir(bundle).map_err(|e| self.sys("fsync bundle directory", e))
    }

    /// Checks delivery can work and removes stale temp files along the path.
    fn preflight(&self) -> Result<(), PluginError> {
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

    /// A crash mid-delivery leaves a bundle's `..data_tmp` and its new
    /// timestamped directory (with the new private key) behind. Every
    /// timestamped directory of another process but the current one is
    /// dead: the kept previous one is only for readers mid-read across a
    /// swap, and none is mid-read across a restart.
    fn sweep_bundle(&self, bundle: &OwnedFd) -> Result<(), PluginError> {
        self.remove_data_link_tmp(bundle)?;
        let current = self.current_data_dir(bundle)?;
        let names = list_dir(bundle).map_err(|e| self.sys("list bundle directory", e))?;
        for n in names {
            let b = n.as_bytes();
            let dead = b.starts_with(b"..")
                && n != DATA_LINK
                && n != DATA_LINK_TMP
                && current.as_deref().is_none_or(|c| c.as_bytes() != b)
                && b.rsplit(|c| *c == b'.').next().and_then(temp_owner) == Some(false);
            if dead {
                self.remove_data_dir(bundle, &n)?;
                tracing::info!(path = %self.path().display(), dir = ?n, "file sink: removed a bundle directory left by an earlier process");
            }
        }
        Ok(())
    }

    fn check_writable(&self, dir: &OwnedFd, depth: usize) -> Result<(), PluginError> {
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
    fn sweep_own_stale(&self, dir: &OwnedFd) -> Result<(), PluginError> {
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
            let flag = if is_type(&st, SFlag::S_IFDIR) {
                UnlinkatFlags::RemoveDir
            } else {
                UnlinkatFlags::NoRemoveDir
            };
            match nix::unistd::unlinkat(Some(dir.as_raw_fd()), n.as_os_str(), flag) {
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
    fn sweep_temps(&self, dir: &OwnedFd, name: &OsStr, all: bool) -> Result<(), PluginError> {
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
            let flag = if is_type(&st, SFlag::S_IFDIR) {
                UnlinkatFlags::RemoveDir
            } else {
                UnlinkatFlags::NoRemoveDir
            };
            match nix::unistd::unlinkat(Some(dir.as_raw_fd()), n.as_os_str(), flag) {
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

/// Appends `'bytes'` and a newline, quoted for POSIX sh: a `'` inside becomes
/// close-quote, escaped quote, reopen.
fn push_sh_quoted(buf: &mut Vec<u8>, bytes: &[u8]) {
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
struct JsonDoc<'a> {
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
struct BundleMeta<'a> {
    version: u64,
    rotation: &'a str,
    rotated_at: String,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Only plain names: `..` would make "inside the root" a lexical lie, and
/// `.`, `//` or a trailing `/` (which `Path::components` silently normalises)
/// have no business in a configured file path.
fn is_plain(p: &Path) -> bool {
    let bytes = p.as_os_str().as_bytes();
    bytes.starts_with(b"/")
        && bytes[1..]
            .split(|b| *b == b'/')
            .all(|seg| !seg.is_empty() && seg != b"." && seg != b"..")
}

/// A root may be written with a trailing `/` or `./`; only `..` disqualifies it.
fn is_plain_root(p: &Path) -> bool {
    p.is_absolute() && p.components().all(|c| c != Component::ParentDir)
}

/// `.NAME.tmp.<token><random>`: hidden, and recognisable by `sweep_temps`.
fn temp_name(name: &OsStr) -> OsString {
    let mut t = OsString::from(".");
    t.push(name);
    t.push(format!(".tmp.{}", unique_suffix()));
    t
}

/// This process's token and 32 random bits, in 16 hex digits.
fn unique_suffix() -> String {
    let random: u32 = rand::random();
    format!("{:08x}{random:08x}", process_token())
}

/// Opens a directory without following a symlink in its last component.
fn open_dir(dir: Option<RawFd>, name: &OsStr) -> Result<OwnedFd, Errno> {
    let fd = nix::fcntl::openat(
        dir,
        name,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
        Mode::empty(),
    )?;
    // SAFETY: `openat` just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstatat(AT_SYMLINK_NOFOLLOW)`; `Ok(None)` when the name does not exist.
fn stat_nofollow(dir: &OwnedFd, name: &OsStr) -> Result<Option<FileStat>, Errno> {
    match nix::sys::stat::fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn is_type(st: &FileStat, t: SFlag) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == t.bits()
}

fn chown_fd(fd: &OwnedFd, owner: Owner) -> Result<(), Errno> {
    if !owner.is_set() {
        return Ok(());
    }
    nix::unistd::fchown(
        fd.as_raw_fd(),
        owner.uid.map(Uid::from_raw),
        owner.gid.map(Gid::from_raw),
    )
}

fn fsync_dir(dir: &OwnedFd) -> Result<(), Errno> {
    nix::unistd::fsync(dir.as_raw_fd())
}

fn ignore_enoent(e: Errno) -> Result<(), Errno> {
    if e == Errno::ENOENT { Ok(()) } else { Err(e) }
}

/// `renameat2(RENAME_NOREPLACE)`: fails with EEXIST instead of replacing.
fn rename_noreplace(dir: RawFd, from: &OsStr, to: &OsStr) -> Result<(), Errno> {
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
fn temp_candidates(dir: &OwnedFd) -> Result<Arc<Vec<OsString>>, Errno> {
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

fn list_dir(dir: &OwnedFd) -> Result<Vec<OsString>, Errno> {
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
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use chrono::TimeZone;

    use super::*;
    use crate::model::{AgentId, CredentialId, RotationId};

    const AGENT: &str = "invoice-bot";

    fn cfg(path: &Path, format: FileFormat) -> FileConfig {
        FileConfig {
            env_name: Some("DB".into()),
            ..FileConfig::new(path, format)
        }
    }

    /// A sink writing as the daemon's own user.
    fn new_sink(cfg: FileConfig, roots: &[PathBuf]) -> Result<FileSink, PluginError> {
        FileSink::new(
            cfg,
            &SinkContext {
                delivery_roots: roots,
                uid: None,
                gid: None,
            },
        )
    }

    fn sink(root: &Path, path: &Path, format: FileFormat) -> FileSink {
        new_sink(cfg(path, format), &[root.to_path_buf()]).expect("valid sink")
    }

    fn notice(version: u64, kind: ValueKind, public: Option<&str>) -> Notice {
        Notice {
            key: CredentialKey::new(
                AgentId::new(AGENT).unwrap(),
                CredentialId::new("db").unwrap(),
            ),
            tenant: "acme".into(),
            owner: "alice@example.com".into(),
            version,
            rotation: RotationId::parse(&format!("{version:032x}")).unwrap(),
            rotated_at: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
            expires_hint: None,
            kind,
            public: public.map(str::to_owned),
            login: None,
        }
    }

    fn secret(s: &str) -> SecretValue {
        SecretValue::from_string(s.to_owned())
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn mode_of(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[tokio::test]
    async fn raw_is_the_value_bytes_exactly() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join(AGENT).join("db");
        let s = sink(root.path(), &path, FileFormat::Raw);
        let got = s
            .deliver(
                &notice(1, ValueKind::Password, None),
                &secret("pa ss\n'x\""),
            )
            .await
            .unwrap();
        assert_eq!(got, Delivered::Acknowledged);
        assert_eq!(std::fs::read(&path).unwrap(), b"pa ss\n'x\"");
        assert_eq!(mode_of(&path), 0o400);
        // Only the file: no temp file left behind.
        assert_eq!(entries(&root.path().join(AGENT)), vec!["db"]);
    }

    #[tokio::test]
    async fn json_has_every_documented_field() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join(AGENT).join("db.json");
        let s = sink(root.path(), &path, FileFormat::Json);
        let mut n = notice(7, ValueKind::Password, Some("ssh-ed25519 AAAA"));
        n.expires_hint = Some(Utc.with_ymd_and_hms(2026, 1, 3, 0, 0, 0).unwrap());
        s.deliver(&n, &secret("p\"w\\d")).await.unwrap();
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            doc,
            serde_json::json!({
                "value": "p\"w\\d",
                "version": 7,
                "rotation": format!("{:032x}", 7),
                "rotated_at": "2026-01-02T03:04:05Z",
                "expires_hint": "2026-01-03T00:00:00Z",
                "agent": AGENT,
                "credential": "db",
                "public": "ssh-ed25519 AAAA",
            })
        );
        // Without a public key there is no "public" field and the hint is null.
        s.deliver(&notice(8, ValueKind::Password, None), &secret("x"))
            .await
            .unwrap();
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert!(doc.get("public").is_none());
        assert_eq!(doc["expires_hint"], serde_json::Value::Null);
        assert_eq!(doc["version"], 8);
    }

    #[tokio::test]
    async fn env_quotes_single_quotes_and_sources_back() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join(AGENT).join("db.env");
        let s = sink(root.path(), &path, FileFormat::Env);
        let value = "it's $HOME `x` \"q\"";
        s.deliver(&notice(3, ValueKind::Password, None), &secret(value))
            .await
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text, "DB='it'\\''s $HOME `x` \"q\"'\nDB_VERSION=3\n",
            "exact env content"
        );
        // A POSIX shell reads back exactly the value and the version.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(r#". "$1"; printf '%s|%s' "$DB" "$DB_VERSION""#)
            .arg("sh")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{value}|3"));
    }

    /// With alternating users the user name changes with the version, so it
    /// is delivered next to the password, in json and env alike.
    #[tokio::test]
    async fn the_login_name_is_delivered_with_the_value() {
        let root = tempfile::tempdir().unwrap();
        let mut n = notice(4, ValueKind::Password, None);
        n.login = Some("bot's_clone".into());

        let json = root.path().join(AGENT).join("db.json");
        sink(root.path(), &json, FileFormat::Json)
            .deliver(&n, &secret("pw"))
            .await
            .unwrap();
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert_eq!(doc["username"], "bot's_clone");
        assert_eq!(doc["value"], "pw");

        let env = root.path().join(AGENT).join("db.env");
        sink(root.path(), &env, FileFormat::Env)
            .deliver(&n, &secret("pw"))
            .await
            .unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(r#". "$1"; printf '%s|%s|%s' "$DB" "$DB_VERSION" "$DB_USERNAME""#)
            .arg("sh")
            .arg(&env)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), "pw|4|bot's_clone");
    }

    /// The umask is per process, so this briefly changes it for every test
    /// running at the same time; the sink's own tests do not depend on it
    /// (that is the point), and the window is one delivery long.
    #[tokio::test]
    async fn mode_is_exact_whatever_the_umask() {
        for umask in [0o077, 0o000] {
            let root = tempfile::tempdir().unwrap();
            let path = root.path().join("tenant").join(AGENT).join("db");
            let mut c = cfg(&path, FileFormat::Raw);
            c.mode = Some("0440".into());
            let s = new_sink(c, &[root.path().to_path_buf()]).unwrap();
            let old = nix::sys::stat::umask(Mode::from_bits_truncate(umask));
            let res = s
                .deliver(&notice(1, ValueKind::Password, None), &secret("v"))
                .await;
            nix::sys::stat::umask(old);
            res.unwrap();
            assert_eq!(mode_of(&path), 0o440, "file mode with umask {umask:o}");
            // The agent directory is the file's parent here (the first
            // component is not named after the agent): 0750; above it 0755.
            assert_eq!(mode_of(&root.path().join("tenant").join(AGENT)), 0o750);
            assert_eq!(mode_of(&root.path().join("tenant")), 0o755);
        }
    }

    #[tokio::test]
    async fn owner_is_set_on_file_and_agent_dir() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "chown needs root (as CI runs the suite)"
        );
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join(AGENT).join("sub").join("db");
        let c = cfg(&path, FileFormat::Raw);
        let roots = [root.path().to_path_buf()];
        let ctx = SinkContext {
            delivery_roots: &roots,
            uid: Some(1234),
            gid: Some(1234),
        };
        let s = FileSink::new(c, &ctx).unwrap();
        s.deliver(&notice(1, ValueKind::Password, None), &secret("v"))
            .await
            .unwrap();
        for p in [
            path.clone(),
            root.path().join(AGENT),
            root.path().join(AGENT).join("sub"),
        ] {
            let m = std::fs::metadata(&p).unwrap();
            assert_eq!((m.uid(), m.gid()), (1234, 1234), "{}", p.display());
        }
        assert_eq!(mode_of(&root.path().join(AGENT)), 0o750);
        assert_eq!(mode_of(&root.path().join(AGENT).join("sub")), 0o750);
        // The root itself is not the agent's.
        assert_eq!(std::fs::metadata(root.path()).unwrap().uid(), 0);
    }

    #[tokio::test]
    async fn same_version_twice_leaves_the_file_alone() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join(AGENT).join("db");
        let s = sink(root.path(), &path, FileFormat::Json);
        let n = notice(4, ValueKind::Password, None);
        s.deliver(&n, &secret("v4")).await.unwrap();
        let ino = std::fs::metadata(&path).unwrap().ino();
        s.deliver(&n, &secret("v4")).await.unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().ino(),
            ino,
            "not rewritten"
        );
        s.deliver(&notice(5, ValueKind::Password, None), &secret("v5"))
            .await
            .unwrap();
        assert_ne!(
            std::fs::metadata(&path).unwrap().ino(),
            ino,
            "new version replaces"
        );
    }

    /// Each symlink case: the delivery is refused as Invalid, the message
    /// names the symlink, and nothing appears where the symlink points.
    async fn assert_symlink_refused(root: &Path, path: &Path, link: &Path, outside: &Path) {
        let s = sink(root, path, FileFormat::Raw);
        let before = entries(outside);
        let err = s
            .deliver(
                &notice(1, ValueKind::Password, None),
                &secret("canary-sym-81c2"),
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
        assert!(err.message.contains("symlink"), "{err}");
        assert!(err.message.contains(&link.display().to_string()), "{err}");
        assert!(!err.message.contains("canary"), "{err}");
        assert_eq!(entries(outside), before, "nothing written outside the root");
        let err = s.preflight().await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid, "preflight: {err}");
    }

    #[tokio::test]
    async fn symlink_at_the_target_file_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let dir = root.path().join(AGENT);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("db");
        symlink(outside.path().join("stolen"), &path).unwrap();
        assert_symlink_refused(root.path(), &path, &path, outside.path()).await;
        assert!(
            std::fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        // Retract refuses it too (it is not something keyturn delivered).
        let s = sink(root.path(), &path, FileFormat::Raw);
        assert_eq!(
            s.retract(&notice(1, ValueKind::Password, None).key)
                .await
                .unwrap_err()
                .kind,
            ErrorKind::Invalid
        );
    }

    #[tokio::test]
    async fn symlink_at_the_parent_dir_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let parent = root.path().join(AGENT);
        symlink(outside.path(), &parent).unwrap();
        let path = parent.join("db");
        assert_symlink_refused(root.path(), &path, &parent, outside.path()).await;
    }

    #[tokio::test]
    async fn symlink_at_an_intermediate_dir_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let tenant = root.path().join("acme");
        symlink(outside.path(), &tenant).unwrap();
        let path = tenant.join(AGENT).join("db");
        assert_symlink_refused(root.path(), &path, &tenant, outside.path()).await;
    }

    #[tokio::test]
    async fn a_directory_at_a_single_file_target_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join(AGENT).join("db");
        std::fs::create_dir_all(&path).unwrap();
        let s = sink(root.path(), &path, FileFormat::Raw);
        let err = s
            .deliver(&notice(1, ValueKind::Password, None), &secret("v"))
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid);
        assert!(err.message.contains("is a directory"), "{err}");
    }

    #[test]
    fn construction_rejects_paths_outside_the_root() {
        let roots = vec![PathBuf::from("/run/keyturn/agents")];
        let bad = [
            "relative/db",
            "/run/keyturn/agents/../etc/shadow",
            "/run/keyturn/agents/a/../../x",
            "/run/keyturn/agents/a//db",
            "/run/keyturn/agents/a/db/",
            "/run/keyturn/agents/./a/db",
            "/run/keyturn/other/db",
            "/run/keyturn/agentsX/db",
            "/run/keyturn/agents",
            "/etc/shadow",
        ];
        for p in bad {
            let err = new_sink(cfg(Path::new(p), FileFormat::Raw), &roots).unwrap_err();
            assert_eq!(err.kind, ErrorKind::Invalid, "{p}: {err}");
        }
        let ok = new_sink(
            cfg(Path::new("/run/keyturn/agents/a/db"), FileFormat::Raw),
            &roots,
        )
        .unwrap();
        assert_eq!(ok.describe(), "file:/run/keyturn/agents/a/db");
        // A root with `..` in it is never a match.
        let err = new_sink(
            cfg(Path::new("/run/keyturn/x/db"), FileFormat::Raw),
            &[PathBuf::from("/run/keyturn/agents/..")],
        )
        .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid);
        // A bad env name or mode.
        let mut c = cfg(Path::new("/run/keyturn/agents/a/db"), FileFormat::Env);
        c.env_name = Some("1BAD-NAME".into());
        assert!(new_sink(c, &roots).is_err());
        let mut c = cfg(Path::new("/run/keyturn/agents/a/db"), FileFormat::Raw);
        c.mode = Some("4755".into());
        assert!(new_sink(c, &roots).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_never_see_a_partial_file() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join(AGENT).join("db.json");
        let s = sink(root.path(), &path, FileFormat::Json);
        // Large enough that a non-atomic write would be seen half done.
        let values = ["a".repeat(64 * 1024), "b".repeat(64 * 1024)];
        s.deliver(&notice(1, ValueKind::Password, None), &secret(&values[0]))
            .await
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicUsize::new(0));
        let reader = {
            let (stop, reads, path, values) =
                (stop.clone(), reads.clone(), path.clone(), values.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let bytes = std::fs::read(&path).expect("the file is always there");
                    let doc: serde_json::Value =
                        serde_json::from_slice(&bytes).expect("a complete json document");
                    let version = doc["version"].as_u64().unwrap();
                    let expect = &values[((version - 1) % 2) as usize];
                    assert_eq!(
                        doc["value"].as_str().unwrap(),
                        expect.as_str(),
                        "version {version}"
                    );
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        for version in 2..=201u64 {
            let value = &values[((version - 1) % 2) as usize];
            s.deliver(&notice(version, ValueKind::Password, None), &secret(value))
                .await
                .unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().expect("reader saw only complete versions");
        assert!(reads.load(Ordering::Relaxed) > 0);
        assert_eq!(entries(&root.path().join(AGENT)), vec!["db.json"]);
    }

    fn pem(kind: &str, version: u64) -> String {
        format!("-----BEGIN {kind}-----\nversion-{version}\n-----END {kind}-----\n")
    }

    fn timestamped_dirs(bundle: &Path) -> Vec<String> {
        entries(bundle)
            .into_iter()
            .filter(|n| n.starts_with("..") && n != DATA_LINK)
            .collect()
    }

    #[tokio::test]
    async fn bundle_swaps_data_and_prunes_old_dirs() {
        let root = tempfile::tempdir().unwrap();
        let bundle = root.path().join(AGENT).join("signing");
        let mut c = cfg(&bundle, FileFormat::Raw);
        c.mode = Some("0440".into());
        let s = new_sink(c, &[root.path().to_path_buf()]).unwrap();
        for version in 1..=4u64 {
            let public = pem("PUBLIC KEY", version);
            s.deliver(
                &notice(version, ValueKind::Ed25519, Some(&public)),
                &secret(&pem("PRIVATE KEY", version)),
            )
            .await
            .unwrap();
            let data = std::fs::read_link(bundle.join(DATA_LINK)).unwrap();
            let data = data.to_str().unwrap();
            assert!(
                data.starts_with("..") && data.contains(&format!(".{version}.")),
                "{data}"
            );
            assert_eq!(
                std::fs::read_to_string(bundle.join("private.pem")).unwrap(),
                pem("PRIVATE KEY", version)
            );
            assert_eq!(
                std::fs::read_to_string(bundle.join("public.pem")).unwrap(),
                public
            );
            let meta: serde_json::Value =
                serde_json::from_slice(&std::fs::read(bundle.join("meta.json")).unwrap()).unwrap();
            assert_eq!(meta["version"], version);
            assert!(
                !meta.to_string().contains("PRIVATE"),
                "no secret in meta.json"
            );
            assert_eq!(mode_of(&bundle.join(data).join("private.pem")), 0o440);
            assert_eq!(mode_of(&bundle.join(data)), 0o750);
            let dirs = timestamped_dirs(&bundle);
            assert!(dirs.len() <= 2, "old dirs pruned: {dirs:?}");
            assert!(dirs.iter().any(|d| d == data));
        }
        for link in BUNDLE_FILES {
            assert_eq!(
                std::fs::read_link(bundle.join(link)).unwrap(),
                PathBuf::from(format!("..data/{link}"))
            );
        }
        assert_eq!(mode_of(&root.path().join(AGENT)), 0o750, "agent dir");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bundle_readers_never_mix_versions() {
        let root = tempfile::tempdir().unwrap();
        let bundle = root.path().join(AGENT).join("signing");
        let s = sink(root.path(), &bundle, FileFormat::Raw);
        let deliver = |v: u64| {
            let public = pem("PUBLIC KEY", v);
            (
                notice(v, ValueKind::Ed25519, Some(&public)),
                secret(&pem("PRIVATE KEY", v)),
            )
        };
        let (n, v) = deliver(1);
        s.deliver(&n, &v).await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let pairs = Arc::new(AtomicUsize::new(0));
        let reader = {
            let (stop, pairs, bundle) = (stop.clone(), pairs.clone(), bundle.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // A consistent reader resolves `..data` once, then reads the
                    // pair from that directory; a pruned directory means retry.
                    let Ok(dir) = std::fs::canonicalize(bundle.join(DATA_LINK)) else {
                        continue;
                    };
                    let (Ok(private), Ok(public)) = (
                        std::fs::read_to_string(dir.join("private.pem")),
                        std::fs::read_to_string(dir.join("public.pem")),
                    ) else {
                        continue;
                    };
                    let version = |s: &str| s.lines().nth(1).map(str::to_owned);
                    assert!(version(&private).is_some(), "complete private key");
                    assert_eq!(version(&private), version(&public), "a matched pair");
                    // Through the top-level links each file is always complete.
                    let linked = std::fs::read_to_string(bundle.join("private.pem")).unwrap();
                    assert!(linked.ends_with("-----END PRIVATE KEY-----\n"), "{linked}");
                    pairs.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        for version in 2..=60u64 {
            let (n, v) = deliver(version);
            s.deliver(&n, &v).await.unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().expect("reader saw only matched pairs");
        assert!(pairs.load(Ordering::Relaxed) > 0);
        assert!(timestamped_dirs(&bundle).len() <= 2);
    }

    #[tokio::test]
    async fn bundle_refuses_links_it_did_not_make() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let bundle = root.path().join(AGENT).join("signing");
        std::fs::create_dir_all(&bundle).unwrap();
        symlink(outside.path(), bundle.join(DATA_LINK)).unwrap();
        let s = sink(root.path(), &bundle, FileFormat::Raw);
        let public = pem("PUBLIC KEY", 1);
        let err = s
            .deliver(
                &notice(1, ValueKind::Ed25519, Some(&public)),
                &secret("canary-bundle-19d0"),
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
        assert!(!err.message.contains("canary"));
        assert!(entries(outside.path()).is_empty());
        assert!(
            timestamped_dirs(&bundle).is_empty(),
            "nothing written before the check"
        );

        std::fs::remove_file(bundle.join(DATA_LINK)).unwrap();
        symlink(outside.path().join("x"), bundle.join("private.pem")).unwrap();
        let err = s
            .deliver(&notice(1, ValueKind::Ed25519, Some(&public)), &secret("v"))
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
        assert!(err.message.contains("private.pem"), "{err}");
        assert!(entries(outside.path()).is_empty());
    }

    /// A temp name of this process (`ours`) or of another one.
    fn temp_of(name: &str, ours: bool) -> String {
        let token = if ours {
            process_token()
        } else {
            process_token() ^ 0x5a5a_5a5a
        };
        format!(".{name}.tmp.{token:08x}0badcafe")
    }

    fn touch_aged(path: &Path, age: Duration) {
        let f = std::fs::File::create(path).unwrap();
        f.set_modified(std::time::SystemTime::now() - age).unwrap();
    }

    #[tokio::test]
    async fn preflight_removes_dead_temp_files_only() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(AGENT);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("db");
        let minutes = Duration::from_secs(120);
        // Another process's temp is a crash leftover, however young.
        let dead_old = dir.join(temp_of("db", false));
        touch_aged(&dead_old, minutes);
        let dead_young = dir.join(format!(".db.tmp.{:08x}00000001", process_token() ^ 1));
        touch_aged(&dead_young, Duration::ZERO);
        // An earlier keyturn's name (no token).
        let legacy = dir.join(".db.tmp.0123abcd");
        touch_aged(&legacy, Duration::ZERO);
        // This process's: in use while young, a leftover when old.
        let mine_young = dir.join(temp_of("db", true));
        touch_aged(&mine_young, Duration::ZERO);
        let mine_old = dir.join(format!(".db.tmp.{:08x}00000002", process_token()));
        touch_aged(&mine_old, minutes);
        // Not ours: another file's temp, and a name keyturn never makes.
        let other = dir.join(temp_of("other", false));
        touch_aged(&other, minutes);
        let foreign = dir.join(".db.tmp.editor-backup");
        touch_aged(&foreign, minutes);
        // A directory temp left by a crash while creating the agent dir.
        let dead_dir = root.path().join(temp_of(AGENT, false));
        std::fs::create_dir(&dead_dir).unwrap();

        sink(root.path(), &path, FileFormat::Raw)
            .preflight()
            .await
            .unwrap();
        for gone in [&dead_old, &dead_young, &legacy, &mine_old, &dead_dir] {
            assert!(!gone.exists(), "{} was left", gone.display());
        }
        assert!(
            mine_young.exists(),
            "a young temp of this process may be in use"
        );
        assert!(
            other.exists(),
            "another sink's temp file is not this sink's"
        );
        assert!(
            foreign.exists(),
            "a name keyturn does not make is left alone"
        );
    }

    #[tokio::test]
    async fn a_delivery_removes_this_processs_stale_temp_files_in_its_directory() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(AGENT);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("db");
        // Left by a failed delivery of this process a while ago, to this
        // file and to another one in the same directory.
        let mine_old = dir.join(temp_of("db", true));
        touch_aged(&mine_old, Duration::from_secs(120));
        let mine_other = dir.join(format!(".other.tmp.{:08x}00000003", process_token()));
        touch_aged(&mine_other, Duration::from_secs(120));
        // In use (young), and another process's (preflight's job).
        let mine_young = dir.join(format!(".db.tmp.{:08x}00000004", process_token()));
        touch_aged(&mine_young, Duration::ZERO);
        let dead = dir.join(temp_of("db", false));
        touch_aged(&dead, Duration::from_secs(120));
        let s = sink(root.path(), &path, FileFormat::Raw);
        s.deliver(&notice(1, ValueKind::Password, None), &secret("v1"))
            .await
            .unwrap();
        assert!(!mine_old.exists() && !mine_other.exists());
        assert!(mine_young.exists(), "a young temp may be in use");
        assert!(dead.exists(), "left to preflight");
        s.preflight().await.unwrap();
        assert!(!dead.exists());
    }

    #[tokio::test]
    async fn preflight_removes_a_bundle_directory_left_by_a_crash() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join(AGENT).join("signing");
        let s = sink(root.path(), &path, FileFormat::Raw);
        s.deliver(
            &notice(1, ValueKind::Ed25519, Some(&pem("PUBLIC KEY", 1))),
            &secret(&pem("PRIVATE KEY", 1)),
        )
        .await
        .unwrap();
        let current = timestamped_dirs(&path);
        assert_eq!(current.len(), 1);
        // What a kill -9 between writing version 2 and the swap leaves.
        let left = path.join(format!(
            "..20260101T000000.2.{:08x}00000000",
            process_token() ^ 7
        ));
        std::fs::create_dir(&left).unwrap();
        std::fs::write(left.join("private.pem"), pem("PRIVATE KEY", 2)).unwrap();
        std::os::unix::fs::symlink(left.file_name().unwrap(), path.join("..data_tmp")).unwrap();
        s.preflight().await.unwrap();
        assert_eq!(
            timestamped_dirs(&path),
            current,
            "only the current one stays"
        );
        assert!(!path.join("..data_tmp").exists());
        assert_eq!(
            std::fs::read_to_string(path.join("private.pem")).unwrap(),
            pem("PRIVATE KEY", 1)
        );
    }

    #[tokio::test]
    async fn preflight_passes_on_a_fresh_root() {
        let root = tempfile::tempdir().unwrap();
        let root_path = root.path().join("not-yet");
        let s = sink(
            &root_path,
            &root_path.join(AGENT).join("db"),
            FileFormat::Raw,
        );
        s.preflight().await.unwrap();
        assert!(root_path.is_dir(), "preflight creates the delivery root");
        assert!(entries(&root_path).is_empty(), "but nothing below it");
    }

    #[tokio::test]
    async fn retract_removes_everything_and_twice_is_fine() {
        let root = tempfile::tempdir().unwrap();
        let key = notice(1, ValueKind::Password, None).key;

        let path = root.path().join(AGENT).join("db");
        let s = sink(root.path(), &path, FileFormat::Env);
        s.deliver(&notice(1, ValueKind::Password, None), &secret("v"))
            .await
            .unwrap();
        s.retract(&key).await.unwrap();
        assert!(entries(&root.path().join(AGENT)).is_empty());
        s.retract(&key).await.unwrap();

        let bundle = root.path().join(AGENT).join("signing");
        let b = sink(root.path(), &bundle, FileFormat::Raw);
        for v in 1..=3 {
            let public = pem("PUBLIC KEY", v);
            b.deliver(
                &notice(v, ValueKind::Ed25519, Some(&public)),
                &secret(&pem("PRIVATE KEY", v)),
            )
            .await
            .unwrap();
        }
        b.retract(&key).await.unwrap();
        assert!(
            !bundle.exists(),
            "bundle directory and all it held are gone"
        );
        b.retract(&key).await.unwrap();
        // Never delivered at all: also fine.
        let never = sink(
            root.path(),
            &root.path().join("nobody").join("x"),
            FileFormat::Raw,
        );
        never.retract(&key).await.unwrap();
    }

    #[tokio::test]
    async fn error_messages_never_carry_the_value() {
        let root = tempfile::tempdir().unwrap();
        let canary = "canary-err-3b7d";
        let n = notice(1, ValueKind::Password, None);

        // A NUL byte cannot be put in an env file.
        let s = sink(
            root.path(),
            &root.path().join(AGENT).join("db.env"),
            FileFormat::Env,
        );
        let v = SecretValue::new(format!("{canary}\0").into_bytes());
        let err = s.deliver(&n, &v).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid);
        assert!(!format!("{err} {err:?}").contains(canary));

        // Non-UTF-8 cannot be json.
        let s = sink(
            root.path(),
            &root.path().join(AGENT).join("db.json"),
            FileFormat::Json,
        );
        let mut bytes = canary.as_bytes().to_vec();
        bytes.push(0xff);
        let err = s.deliver(&n, &SecretValue::new(bytes)).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid);
        assert!(!format!("{err} {err:?}").contains(canary));

        // An ed25519 notice without its public key.
        let s = sink(
            root.path(),
            &root.path().join(AGENT).join("sig"),
            FileFormat::Raw,
        );
        let err = s
            .deliver(&notice(1, ValueKind::Ed25519, None), &secret(canary))
            .await
            .unwrap_err();
        assert!(!format!("{err} {err:?}").contains(canary));

        // An I/O failure mid-way (a file where a directory must be).
        std::fs::write(root.path().join("blocker"), b"").unwrap();
        let s = sink(
            root.path(),
            &root.path().join("blocker").join("db"),
            FileFormat::Raw,
        );
        let err = s.deliver(&n, &secret(canary)).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid, "{err}");
        assert!(err.message.contains("not a directory"), "{err}");
        assert!(!format!("{err} {err:?}").contains(canary));
    }

    #[test]
    fn resolving_onto_the_root_is_normalizing_the_join() {
        let roots = [PathBuf::from("/run/kt")];
        for rel in ["a/x", "./a//x/.", "a/./x/"] {
            assert_eq!(
                FileConfig::resolve(&roots, Path::new(rel)),
                normalize(&roots[0].join(rel)),
                "{rel}"
            );
        }
        assert_eq!(
            FileConfig::resolve(&roots, Path::new("/run/kt/./a")),
            PathBuf::from("/run/kt/a")
        );
    }
}
