//! Reading a config file: parse, deserialize section by section, validate,
//! and locate every error (file:line:col and TOML path).
//!
//! The steps, and why they are separate:
//! 1. `toml_edit::Document` parses the text and keeps the byte span of
//!    every key and value. A syntax error (including a duplicate key or
//!    table) stops here: it is the one error reported, at its position.
//! 2. Each section (the daemon table, each tier, vault, agent and credential)
//!    is deserialized on its own into the [`raw`](super::raw) structs, so one
//!    bad section does not hide the errors in the others. `serde_path_to_error`
//!    says where inside the section a problem is.
//! 3. [`validate`](super::validate) checks meaning (ids, references,
//!    durations, paths, ...) purely and reports every issue by TOML path.
//! 4. Each issue's path is looked up in the document to get a line and
//!    column; the list is sorted by position.
//!
//! A valid config takes a fast path instead (each file in one serde pass,
//! no spans kept); steps 1, 2 and 4 are the slow path, in `located.rs`,
//! taken when the fast one finds any problem.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Config;
use super::lines::LineIndex;
use super::raw::{
    Parsed, RawAgent, RawAgentEntry, RawAlertRules, RawConfig, RawCredential, RawDaemon, RawTier,
};
use super::validate::{self, Context, normalize};

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when unknown (e.g. the file cannot be read).
    pub line: usize,
    pub column: usize,
    /// Dotted TOML path, e.g. `agents.invoice-bot.credentials.db.schedule`;
    /// empty for a syntax error or a file that cannot be read.
    pub toml_path: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Line 0: about the whole file (it cannot be read), not a place in it.
        if self.line == 0 {
            write!(f, "{}: ", self.file.display())?;
        } else {
            write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        }
        if !self.toml_path.is_empty() {
            write!(f, "{}: ", self.toml_path)?;
        }
        f.write_str(&self.message)
    }
}

/// All problems found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for e in &self.0 {
            writeln!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl ConfigErrors {
    /// Where the errors are, for the summary line after them: `config`
    /// (what `--config` named), or the files they are in when others are
    /// among them (black-box finding: errors in `agents.d/*.toml` were
    /// summed up as "N error(s) in keyturn.toml").
    pub fn files(&self, config: &Path) -> String {
        let mut files: Vec<&Path> = self.0.iter().map(|e| e.file.as_path()).collect();
        files.sort();
        files.dedup();
        match files.as_slice() {
            [] => config.display().to_string(),
            [one] if *one == config || one.file_name() == config.file_name() => {
                config.display().to_string()
            }
            many => many
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

/// The directory beside the config file that holds agents, one or more per
/// `*.toml` file: the convention for files dropped by config management.
pub const AGENTS_DIR: &str = "agents.d";
/// The main file's name when `--config` names a directory.
pub const MAIN_FILE: &str = "keyturn.toml";

/// One file of a config, as read.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: PathBuf,
    pub text: String,
    /// The main file (daemon, tiers, vaults, and agents too if it likes);
    /// otherwise a file of `agents.d`, which holds agents only.
    pub main: bool,
}

/// Reads and validates a config: `path` is the main file (`keyturn.toml`),
/// read together with every `agents.d/*.toml` beside it, or a directory
/// holding either or both.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let (source, files) = read_sources(path)?;
    load_sources(&source, &files)
}

/// Validates one file's text as if read from `file` (relative paths in the
/// text resolve against `file`'s directory, made absolute with the current
/// directory when `file` is relative). No `agents.d` is read.
pub fn load_str(file: &Path, text: &str) -> Result<Config, ConfigErrors> {
    let files = [SourceFile {
        path: file.to_path_buf(),
        text: text.to_owned(),
        main: true,
    }];
    load_sources(file, &files)
}

/// The main file of the config `path` names: `path` itself, or the
/// directory's `keyturn.toml`.
pub fn main_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(MAIN_FILE)
    } else {
        path.to_path_buf()
    }
}

/// The files of the config `path` names, in the order they are merged: the
/// main file first, then `agents.d/*.toml` by name.
pub fn read_sources(path: &Path) -> Result<(PathBuf, Vec<SourceFile>), ConfigErrors> {
    let cannot = |file: &Path, what: &str, e: &dyn std::fmt::Display| {
        ConfigErrors(vec![ConfigError {
            file: file.to_path_buf(),
            line: 0,
            column: 0,
            toml_path: String::new(),
            message: format!("{what}: {e}"),
        }])
    };
    // The packaged unit's `ExecStartPre=keyturn check` runs as user
    // `keyturn`: a root-only file dropped by config management stops it.
    let unreadable = |file: &Path, e: &std::io::Error| {
        let mut errors = cannot(file, "cannot read config file", e);
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            errors.0[0].message.push_str(&format!(
                " (keyturn runs as uid {}: make the file readable by it, e.g. \
                 `chgrp keyturn {f} && chmod 0640 {f}`, as the package makes /etc/keyturn)",
                nix::unistd::geteuid(),
                f = file.display()
            ));
        }
        errors
    };
    let (dir, main, main_required) = if path.is_dir() {
        (path.to_path_buf(), path.join(MAIN_FILE), false)
    } else {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        (dir, path.to_path_buf(), true)
    };
    let mut files = Vec::new();
    let untrusted = |file: &Path| match super::trust::untrusted(file) {
        Some(why) => Err(cannot(file, "cannot use config file", &with_user_note(why))),
        None => Ok(()),
    };
    let read = read_text(&main);
    if read.is_ok() {
        untrusted(&main)?;
    }
    match read {
        // Nothing at all, not even a comment: a file cut off while written
        // (config management, a full disk), which would otherwise be
        // taken as "every default, no agents" and, on a reload, drop every
        // credential at once.
        Ok(Ok(text)) if text.trim().is_empty() => {
            return Err(ConfigErrors(vec![ConfigError {
                file: main.clone(),
                line: 1,
                column: 1,
                toml_path: String::new(),
                message: "the file is empty (cut off while it was written?): a config with every default needs at least a comment; or remove the file".to_owned(),
            }]));
        }
        Ok(Ok(text)) => files.push(SourceFile {
            path: main.clone(),
            text,
            main: true,
        }),
        Ok(Err(not_utf8)) => return Err(ConfigErrors(vec![not_utf8])),
        Err(e) if main_required || e.kind() != std::io::ErrorKind::NotFound => {
            return Err(unreadable(&main, &e));
        }
        Err(_) => {}
    }
    let agents_dir = dir.join(AGENTS_DIR);
    if let Ok(meta) = std::fs::metadata(&agents_dir)
        && meta.is_dir()
    {
        refuse_world_writable(&agents_dir, &meta)
            .map_err(|e| cannot(&agents_dir, "cannot use the directory", &e))?;
        if let Some(why) = super::trust::untrusted(&agents_dir) {
            return Err(cannot(
                &agents_dir,
                "cannot use the directory",
                &with_user_note(why),
            ));
        }
    }
    match std::fs::read_dir(&agents_dir) {
        Ok(entries) => {
            let mut paths: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let name = p.file_name().unwrap_or_default().to_string_lossy();
                    // Editors' and package managers' leftovers are not config.
                    !name.starts_with('.') && p.extension().is_some_and(|x| x == "toml")
                })
                .collect();
            paths.sort();
            let mut empty = Vec::new();
            for p in paths {
                let text = read_text(&p)
                    .map_err(|e| unreadable(&p, &e))?
                    .map_err(|not_utf8| ConfigErrors(vec![not_utf8]))?;
                untrusted(&p)?;
                // As the main file: a file cut off while it was written
                // would drop its agents (orphaned on a reload).
                if text.trim().is_empty() {
                    empty.push(ConfigError {
                        file: p,
                        line: 1,
                        column: 1,
                        toml_path: String::new(),
                        message: "the file is empty (cut off while it was written?): its agents would be dropped; a file without agents needs at least a comment; or remove the file".to_owned(),
                    });
                    continue;
                }
                files.push(SourceFile {
                    path: p,
                    text,
                    main: false,
                });
            }
            if !empty.is_empty() {
                return Err(ConfigErrors(empty));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(cannot(&agents_dir, "cannot read the directory", &e)),
    }
    if files.is_empty() {
        return Err(cannot(
            &main,
            "cannot read config file",
            &format_args!(
                "there is neither {} nor {}",
                main.display(),
                agents_dir.display()
            ),
        ));
    }
    Ok((main, files))
}

/// The largest config file read (the main file or one in `agents.d`): a
/// config of 20,000 credentials is a few MiB.
pub const MAX_CONFIG_FILE: u64 = 64 << 20;

/// A config file's bytes. Only a regular file is read, and at most
/// [`MAX_CONFIG_FILE`] of it: a FIFO would block `check`, the start and a
/// reload until something wrote to it, and `/dev/zero` would fill memory.
/// Opened without blocking (a FIFO's open waits for a writer), then
/// checked, so a file swapped in between is caught too.
pub(crate) fn read_config_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file (a directory, FIFO, socket or device): a config file must be a regular file",
        ));
    }
    refuse_world_writable(path, &meta)?;
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0).min(1 << 20));
    file.take(MAX_CONFIG_FILE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_CONFIG_FILE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "over {} MiB: too large for a config file",
                MAX_CONFIG_FILE >> 20
            ),
        ));
    }
    Ok(bytes)
}

/// A config file or `agents.d` that every local user can write: the config
/// says what keyturn runs (hooks, exec sinks) and where secrets go, as the
/// daemon's user (often root), so anyone could take that user over; refused
/// as sshd's StrictModes and sudo refuse such files.
fn refuse_world_writable(path: &Path, meta: &std::fs::Metadata) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.mode() & 0o7777;
    if mode & 0o002 == 0 {
        return Ok(());
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!(
            "writable by every user (mode {mode:04o}): anyone could change what keyturn runs and where it puts secrets; `chmod o-w {}`",
            path.display()
        ),
    ))
}

/// `why` (from [`super::trust::untrusted`]), with a note when this is not
/// root: ownership is judged against the user running the check.
fn with_user_note(why: String) -> String {
    let me = nix::unistd::geteuid();
    if me.is_root() {
        why
    } else {
        format!("{why} (judged as uid {me}: run `keyturn check` as the daemon's user)")
    }
}

/// [`read_config_file`] as UTF-8 text (`InvalidData` when it is not).
pub(crate) fn read_config_string(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_config_file(path)?)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// A config file's text; bytes that are not UTF-8 are an error located at
/// the first of them.
fn read_text(path: &Path) -> std::io::Result<Result<String, ConfigError>> {
    let bytes = read_config_file(path)?;
    Ok(String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let valid = std::str::from_utf8(&e.as_bytes()[..at]).unwrap_or_default();
        let (line, column) = LineIndex::new(valid).line_col(at);
        ConfigError {
            file: path.to_path_buf(),
            line,
            column,
            toml_path: String::new(),
            message: format!(
                "the file is not valid UTF-8 (first bad byte at byte {at}): \
                 TOML files are UTF-8 text; convert it (e.g. iconv -t UTF-8)"
            ),
        }
    }))
}

/// What a file was when it was read: a reload re-reads only files whose
/// signature changed. The change time is part of it: a tool that writes a
/// file in place and puts its modification time back (`cp -p`, `touch -r`)
/// cannot set the change time, which every write and every `utimes` moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSig {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

/// A file modified this recently when it is read may be modified again
/// within the same tick of the filesystem's clock, leaving its size and time
/// as they were: such a signature is not trusted (the file is read again at
/// the next reload), as git does with its index.
const RACY: Duration = Duration::from_secs(2);

impl FileSig {
    /// The signature of `path`, or `None` when it cannot be read or is too
    /// fresh to trust.
    fn of(path: &Path) -> Option<FileSig> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        let age = m.modified().ok()?.elapsed().unwrap_or(Duration::ZERO);
        if age < RACY {
            return None;
        }
        Some(FileSig {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

/// The files a loaded config came from, for the next reload.
#[derive(Debug, Clone, Default)]
pub struct FileSet {
    /// The main file's path, text and signature (small: kept whole, so that
    /// the agents of changed files can be validated against it).
    main: Option<(PathBuf, String, FileSig)>,
    /// Each `agents.d` file: its signature and the agents it defines.
    agents: BTreeMap<PathBuf, (FileSig, Vec<String>)>,
}

impl FileSet {
    /// `names[i]`: the agents `files[i]` defines.
    fn of(files: &[SourceFile], sigs: &[Option<FileSig>], names: Vec<Vec<String>>) -> FileSet {
        let mut set = FileSet::default();
        for ((f, sig), names) in files.iter().zip(sigs).zip(names) {
            // A file whose signature could not be read is read again by the
            // next reload.
            let Some(sig) = sig else { continue };
            if f.main {
                set.main = Some((f.path.clone(), f.text.clone(), *sig));
            } else {
                set.agents.insert(f.path.clone(), (*sig, names));
            }
        }
        set
    }
}

/// The result of reading a config again.
pub enum Reloaded {
    /// Everything was read: the whole config.
    Full(Config, FileSet),
    /// The main file is unchanged and only some agent files changed (or
    /// came or went): `config` holds the main file's sections and the
    /// agents of the files read; the agents named in `kept` come from files
    /// that did not change and were not read, and keep what the running
    /// config has for them.
    Partial {
        config: Config,
        files: FileSet,
        kept: std::collections::HashSet<String>,
        read: usize,
    },
}

/// Reads and validates a config as [`load_file`] does, and says which files
/// it came from (for [`reload`]).
pub fn load_tracked(path: &Path) -> Result<(Config, FileSet), ConfigErrors> {
    let (source, files) = read_sources(path)?;
    let sigs: Vec<Option<FileSig>> = files.iter().map(|f| FileSig::of(&f.path)).collect();
    let (config, names) = load_named(&source, &files)?;
    Ok((config, FileSet::of(&files, &sigs, names)))
}

/// Reads the config `path` again after `previous`, re-reading only the
/// agent files that changed when the main file did not. Anything the
/// partial read cannot vouch for (the main file changed, an agent moved
/// between files, a clash with an unchanged file) is the caller's to retry
/// with [`load_tracked`]; errors of the files read are located as ever.
pub fn reload(path: &Path, previous: &FileSet) -> Result<Reloaded, ConfigErrors> {
    let full = || load_tracked(path).map(|(c, f)| Reloaded::Full(c, f));
    let main_path = main_file(path);
    let Some((prev_main, main_text, prev_sig)) = &previous.main else {
        return full();
    };
    if *prev_main != main_path
        || FileSig::of(&main_path) != Some(*prev_sig)
        || super::trust::untrusted(&main_path).is_some()
    {
        return full();
    }
    let agents_dir = main_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(AGENTS_DIR);
    // A directory made writable by all since: the full load says so.
    if std::fs::metadata(&agents_dir).is_ok_and(|m| refuse_world_writable(&agents_dir, &m).is_err())
        || super::trust::untrusted(&agents_dir).is_some()
    {
        return full();
    }
    let mut now: Vec<PathBuf> = match std::fs::read_dir(&agents_dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                !name.starts_with('.') && p.extension().is_some_and(|x| x == "toml")
            })
            .collect(),
        Err(_) => return full(),
    };
    now.sort();
    let mut files = vec![SourceFile {
        path: main_path.clone(),
        text: main_text.clone(),
        main: true,
    }];
    let mut sigs = vec![Some(*prev_sig)];
    let mut set = FileSet {
        main: previous.main.clone(),
        agents: BTreeMap::new(),
    };
    let mut kept = std::collections::HashSet::new();
    for p in now {
        let sig = FileSig::of(&p);
        match (previous.agents.get(&p), sig) {
            (Some((old, names)), Some(sig)) if *old == sig => {
                kept.extend(names.iter().cloned());
                set.agents.insert(p, (sig, names.clone()));
            }
            _ => {
                if super::trust::untrusted(&p).is_some() {
                    return full();
                }
                let Ok(text) = read_config_string(&p) else {
                    return full();
                };
                // Cut off to nothing: the full load refuses it, naming it
                // (black-box finding: this path took it as "no agents" and
                // orphaned them).
                if text.trim().is_empty() {
                    return full();
                }
                files.push(SourceFile {
                    path: p,
                    text,
                    main: false,
                });
                sigs.push(sig);
            }
        }
    }
    let read = files.len() - 1;
    // A check that refers to another agent (a webhook signed with another
    // credential's value) fails when that agent's file was not read: the
    // whole config says whether the problem is real, and locates it if so.
    let Ok((mut config, names)) = load_named(&main_path, &files) else {
        return full();
    };
    // The main file's own agents are always in `config`; an agent of a file
    // that was read must not also be one of a file that was not.
    if config.agents.keys().any(|a| kept.contains(a.as_str())) {
        return full();
    }
    let changed = FileSet::of(&files, &sigs, names);
    set.agents.extend(changed.agents);
    config.source = main_path;
    Ok(Reloaded::Partial {
        config,
        files: set,
        kept,
        read,
    })
}

/// Validates the files of one config. `source` is the main file's path
/// (relative paths in every file resolve against its directory).
pub fn load_sources(source: &Path, files: &[SourceFile]) -> Result<Config, ConfigErrors> {
    load_named(source, files).map(|(config, _)| config)
}

/// [`load_file`]; a config with errors also gets `host`'s problems with
/// the settings that have none, so that `check` lists every error at once
/// (see [`super::located::load_located_with`]). A config that validates is
/// returned as it is: the caller runs the host checks on it.
pub fn load_file_with_host(
    path: &Path,
    host: super::located::HostCheck,
) -> Result<Config, ConfigErrors> {
    let (source, files) = read_sources(path)?;
    load_named_with(&source, &files, Some(host)).map(|(config, _)| config)
}

/// [`load_sources`], and the agents each file defines.
fn load_named(
    source: &Path,
    files: &[SourceFile],
) -> Result<(Config, Vec<Vec<String>>), ConfigErrors> {
    load_named_with(source, files, None)
}

fn load_named_with(
    source: &Path,
    files: &[SourceFile],
    host: Option<super::located::HostCheck>,
) -> Result<(Config, Vec<Vec<String>>), ConfigErrors> {
    let source = if source.is_absolute() {
        normalize(source)
    } else {
        // The only environment this reads: relative paths in the config
        // must not change meaning if the daemon later changes directory.
        let cwd = std::env::current_dir().unwrap_or_default();
        normalize(&cwd.join(source))
    };
    let ctx = Context { source };
    // Fast path, taken by every valid config (each start and reload): each
    // file in one serde pass, in parallel, no spans kept. Any problem at
    // all, and the files are read again the slow way, which finds every
    // error and locates each one.
    if let Some((raw, names)) = parse_all(files)
        && let Ok(config) = validate::validate(&raw, &ctx)
    {
        return Ok((config, names));
    }
    super::located::load_located_with(files, &ctx, host)
}

/// Every file parsed with the `toml` crate, on up to one scoped thread per
/// core, and merged, with the agents each file defines; `None` at the first
/// problem (the located path then says what it is).
fn parse_all(files: &[SourceFile]) -> Option<(RawConfig, Vec<Vec<String>>)> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, files.len().max(1));
    let mut parsed: Vec<Option<File>> = Vec::with_capacity(files.len());
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|w| {
                s.spawn(move || {
                    files
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| i % threads == w)
                        .map(|(i, f)| (i, parse_one(f)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<(usize, Option<File>)> = workers
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect();
        all.sort_by_key(|(i, _)| *i);
        parsed.extend(all.into_iter().map(|(_, f)| f));
    });
    if parsed.len() != files.len() {
        return None;
    }
    let mut raw = RawConfig::default();
    let mut names = Vec::with_capacity(parsed.len());
    let mut seen = std::collections::HashSet::new();
    for f in parsed {
        let f = f?;
        if f.agents.keys().any(|name| !seen.insert(name.clone())) {
            return None; // an agent in two files
        }
        names.push(f.agents.keys().cloned().collect());
        merge_raw(&mut raw, into_raw(f));
    }
    Some((raw, names))
}

fn parse_one(f: &SourceFile) -> Option<File> {
    if f.main {
        toml::from_str::<File>(&f.text).ok()
    } else {
        toml::from_str::<AgentsFile>(&f.text).ok().map(|a| File {
            daemon: None,
            alert_rules: None,
            tiers: None,
            vaults: BTreeMap::new(),
            agents: a.agents,
            alerts: BTreeMap::new(),
            policies: BTreeMap::new(),
            issuers: BTreeMap::new(),
            token_service: None,
        })
    }
}

/// Adds `more` (one file's sections) to `raw`.
pub(super) fn merge_raw(raw: &mut RawConfig, more: RawConfig) {
    if more.daemon.is_some() {
        raw.daemon = more.daemon;
    }
    if more.tiers.is_some() {
        raw.tiers = more.tiers;
    }
    if more.alert_rules.is_some() {
        raw.alert_rules = more.alert_rules;
    }
    raw.vaults.extend(more.vaults);
    raw.agents.extend(more.agents);
    raw.alerts.extend(more.alerts);
    raw.policies.extend(more.policies);
    raw.issuers.extend(more.issuers);
    raw.subject_issuers.extend(more.subject_issuers);
    if more.token_settings.is_some() {
        raw.token_settings = more.token_settings;
    }
    raw.token_clients.extend(more.token_clients);
    raw.token_tenants.extend(more.token_tenants);
}

/// A one-paragraph description of a loaded config, for `keyturn check`.
pub fn summary(cfg: &Config) -> String {
    let mut s = format!(
        "{}: ok: {} agents, {} credentials, {} vaults, {} tiers\n",
        cfg.source.display(),
        cfg.agents.len(),
        cfg.credential_count(),
        cfg.vaults.len(),
        cfg.tiers.len()
    );
    s.push_str(&format!("state_dir: {}\n", cfg.daemon.state_dir.display()));
    s.push_str(&format!("socket: {}\n", cfg.daemon.socket.display()));
    s.push_str(&format!(
        "agent socket: {}\n",
        cfg.daemon.agent_socket.display()
    ));
    if let Some(listen) = cfg.daemon.listen {
        s.push_str(&format!("listen: {listen}\n"));
    }
    s
}

/// A main file in one serde pass (the fast path).
#[derive(Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    daemon: Option<RawDaemon>,
    alert_rules: Option<RawAlertRules>,
    tiers: Option<BTreeMap<String, RawTier>>,
    #[serde(default)]
    vaults: BTreeMap<String, crate::vaults::VaultSpec>,
    #[serde(default)]
    agents: BTreeMap<String, FileAgent>,
    #[serde(default)]
    alerts: BTreeMap<String, crate::alerts::AlertSinkConfig>,
    #[serde(default)]
    policies: BTreeMap<String, crate::tasks::policy::RawPolicy>,
    #[serde(default)]
    issuers: BTreeMap<String, crate::tasks::issuers::IssuerConfig>,
    token_service: Option<crate::oauth::config::RawTokenService>,
}

/// A file of `agents.d` in one serde pass: agents only.
#[derive(Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AgentsFile {
    #[serde(default)]
    agents: BTreeMap<String, FileAgent>,
}

#[derive(Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAgent {
    owner: String,
    tenant: String,
    tier: String,
    uid: Option<u32>,
    gid: Option<u32>,
    revocation_sla: Option<String>,
    decommissioned: Option<super::raw::RawDecommissioned>,
    auth_key: Option<String>,
    #[serde(default)]
    credentials: BTreeMap<String, RawCredential>,
}

fn into_raw(f: File) -> RawConfig {
    let token_settings = f
        .token_service
        .as_ref()
        .map(|t| t.settings())
        .filter(|s| *s != Default::default())
        .map(Parsed::Ok);
    let token_service = f.token_service.unwrap_or_default();
    RawConfig {
        daemon: f.daemon.map(Parsed::Ok),
        alert_rules: f.alert_rules.map(Parsed::Ok),
        tiers: f
            .tiers
            .map(|t| t.into_iter().map(|(n, t)| (n, Parsed::Ok(t))).collect()),
        vaults: all_ok(f.vaults),
        agents: f
            .agents
            .into_iter()
            .map(|(name, a)| {
                let entry = RawAgentEntry {
                    agent: Parsed::Ok(RawAgent {
                        owner: a.owner,
                        tenant: a.tenant,
                        tier: a.tier,
                        uid: a.uid,
                        gid: a.gid,
                        revocation_sla: a.revocation_sla,
                        decommissioned: a.decommissioned,
                        auth_key: a.auth_key,
                        credentials: None,
                    }),
                    credentials: a
                        .credentials
                        .into_iter()
                        .map(|(n, c)| (n, Parsed::Ok(c)))
                        .collect(),
                };
                (name, entry)
            })
            .collect(),
        alerts: all_ok(f.alerts),
        policies: all_ok(f.policies),
        issuers: all_ok(f.issuers),
        token_settings,
        token_clients: all_ok(token_service.clients),
        token_tenants: all_ok(token_service.tenants),
        subject_issuers: all_ok(token_service.subject_issuers),
        taken_out: Vec::new(),
    }
}

/// Named sections that deserialized in one go.
fn all_ok<T>(sections: BTreeMap<String, T>) -> BTreeMap<String, Parsed<T>> {
    sections
        .into_iter()
        .map(|(n, a)| (n, Parsed::Ok(a)))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_summary_names_every_file_the_errors_are_in() {
        let at = |file: &str| ConfigError {
            file: PathBuf::from(file),
            line: 1,
            column: 1,
            toml_path: String::new(),
            message: String::new(),
        };
        let main = Path::new("/etc/keyturn/keyturn.toml");
        let one = ConfigErrors(vec![at("/etc/keyturn/keyturn.toml")]);
        assert_eq!(one.files(Path::new("keyturn.toml")), "keyturn.toml");
        let two = ConfigErrors(vec![
            at("/etc/keyturn/agents.d/b.toml"),
            at("/etc/keyturn/keyturn.toml"),
            at("/etc/keyturn/agents.d/b.toml"),
        ]);
        assert_eq!(
            two.files(main),
            "/etc/keyturn/agents.d/b.toml, /etc/keyturn/keyturn.toml"
        );
        let only = ConfigErrors(vec![at("/etc/keyturn/agents.d/b.toml")]);
        assert_eq!(only.files(main), "/etc/keyturn/agents.d/b.toml");
    }

    use super::*;

    fn errors(text: &str) -> Vec<ConfigError> {
        load_str(Path::new("/etc/keyturn/t.toml"), text)
            .expect_err("should fail")
            .0
    }

    /// `decommissioned` and `revocation_sla` on an agent: typed when good
    /// (a TOML datetime or an RFC 3339 string), every problem located.
    #[test]
    fn decommission_words_are_typed_and_their_errors_located() {
        let base = "[vaults.v]\ntype = \"local\"\n";
        let good = format!(
            "{base}[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\nrevocation_sla = \"5m\"\n\
             decommissioned = {{ at = 2026-12-01T09:00:00Z, reason = \"retired\", by = \"bob\" }}\n\
             [agents.b]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n\
             decommissioned = {{ at = \"2026-12-01T10:00:00+01:00\", reason = \"gone\" }}\n"
        );
        let cfg = load_str(Path::new("/etc/keyturn/t.toml"), &good).unwrap();
        let a = &cfg.agents[&crate::model::AgentId::new("a").unwrap()];
        assert_eq!(a.revocation_sla, Some(std::time::Duration::from_secs(300)));
        assert_eq!(cfg.revocation_sla(a), std::time::Duration::from_secs(300));
        let d = a.decommissioned.as_ref().unwrap();
        assert_eq!(d.at.to_rfc3339(), "2026-12-01T09:00:00+00:00");
        assert_eq!(
            (d.reason.as_str(), d.by.as_deref()),
            ("retired", Some("bob"))
        );
        let b = &cfg.agents[&crate::model::AgentId::new("b").unwrap()];
        assert_eq!(
            b.decommissioned.as_ref().unwrap().at.to_rfc3339(),
            "2026-12-01T09:00:00+00:00"
        );
        // The tier's SLA when the agent has none (built-in low = 24h).
        assert_eq!(
            cfg.revocation_sla(b),
            std::time::Duration::from_secs(86_400)
        );

        let bad = format!(
            "{base}[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\nrevocation_sla = \"soon\"\n\
             decommissioned = {{ at = \"yesterday\", reason = \" \" }}\n\
             [agents.b]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n\
             decommissioned = {{ at = 2026-12-01T09:00:00Z, reason = \"x\", when = 1 }}\n"
        );
        let e = errors(&bad);
        let at = |path: &str| {
            e.iter()
                .find(|e| e.toml_path == path)
                .unwrap_or_else(|| panic!("no error at {path}: {e:?}"))
        };
        assert_eq!(at("agents.a.revocation_sla").line, 7);
        assert!(
            at("agents.a.decommissioned.at")
                .message
                .contains("RFC 3339")
        );
        assert_eq!(at("agents.a.decommissioned.at").line, 8);
        assert!(
            at("agents.a.decommissioned.reason")
                .message
                .contains("reason must not be empty")
        );
        assert!(
            e.iter()
                .any(|e| e.toml_path.starts_with("agents.b") && e.message.contains("when")),
            "{e:?}"
        );
    }

    /// Locating errors is linear in the file: a config with 20,000 errors
    /// (one unknown key per agent) used to rescan the text per error
    /// (quadratic: tens of seconds); it now takes well under a second in a
    /// release build. The bound is loose so that a debug build on a busy
    /// machine passes; the quadratic version needs far longer.
    #[test]
    fn many_errors_are_located_in_linear_time() {
        const AGENTS: usize = 20_000;
        let mut text = String::from("[vaults.v]\ntype = \"local\"\n");
        for i in 0..AGENTS {
            text.push_str(&format!(
                "[agents.a{i}]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\nbogus = 1\n"
            ));
        }
        let started = std::time::Instant::now();
        let e = errors(&text);
        let took = started.elapsed();
        assert_eq!(e.len(), AGENTS);
        assert_eq!(
            (e[AGENTS - 1].line, e[AGENTS - 1].column),
            (2 + 5 * AGENTS, 1)
        );
        assert!(
            took < std::time::Duration::from_secs(10),
            "locating {AGENTS} errors took {took:?}"
        );
    }

    #[test]
    fn invalid_utf8_is_located_at_its_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyturn.toml");
        std::fs::write(&path, b"[daemon]\nstate_dir = \"/var/lib/k\xe9\"\n").unwrap();
        let e = load_file(&path).unwrap_err().0;
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].line, e[0].column), (2, 24), "{}", e[0]);
        assert!(e[0].message.contains("not valid UTF-8"), "{}", e[0]);
        assert!(e[0].message.contains("byte 32"), "{}", e[0]);
    }

    /// Defect (black-box): an `agents.d` file that was a FIFO hung `check`,
    /// the start and a reload (and the control socket with it) until
    /// something wrote to it; a link to `/dev/zero` filled memory.
    #[test]
    fn only_a_regular_file_of_bounded_size_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("keyturn.toml");
        std::fs::write(&main, "[daemon]\n").unwrap();
        let agents = dir.path().join(AGENTS_DIR);
        std::fs::create_dir(&agents).unwrap();
        let fifo = agents.join("a.toml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let started = std::time::Instant::now();
        let e = load_file(&main).unwrap_err().0;
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(
            e[0].to_string().contains("a.toml") && e[0].message.contains("not a regular file"),
            "{}",
            e[0]
        );
        std::fs::remove_file(&fifo).unwrap();
        std::os::unix::fs::symlink("/dev/zero", agents.join("z.toml")).unwrap();
        let e = load_file(&main).unwrap_err().0;
        assert!(e[0].message.contains("not a regular file"), "{}", e[0]);
        std::fs::remove_file(agents.join("z.toml")).unwrap();
        let big = std::fs::File::create(agents.join("big.toml")).unwrap();
        big.set_len(MAX_CONFIG_FILE + 1).unwrap();
        let e = load_file(&main).unwrap_err().0;
        assert!(e[0].message.contains("too large"), "{}", e[0]);
    }

    /// Defect (black-box): an empty config file (cut off by a full disk or
    /// config management) was valid, and a reload onto it dropped every
    /// credential. A file of comments only is still every default.
    #[test]
    fn an_empty_config_file_is_refused_and_a_commented_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("keyturn.toml");
        std::fs::write(&main, " \n\n").unwrap();
        let e = load_file(&main).unwrap_err().0;
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].message.starts_with("the file is empty"), "{}", e[0]);
        std::fs::write(&main, "# every default\n").unwrap();
        load_file(&main).expect("a commented file is a config");

        // Black-box finding: an `agents.d` file cut off to nothing was
        // accepted, and the reload orphaned its agents. Each empty one is
        // named.
        let agents = dir.path().join(AGENTS_DIR);
        std::fs::create_dir(&agents).unwrap();
        for name in ["a.toml", "b.toml", "c.toml"] {
            std::fs::write(agents.join(name), "").unwrap();
        }
        std::fs::write(agents.join("b.toml"), "# no agents here\n").unwrap();
        let e = load_file(&main).unwrap_err().0;
        let named: Vec<_> = e
            .iter()
            .map(|e| e.file.file_name().unwrap().to_owned())
            .collect();
        assert_eq!(named, ["a.toml", "c.toml"], "{e:?}");
        assert!(e[0].message.starts_with("the file is empty"), "{}", e[0]);
        std::fs::write(agents.join("a.toml"), "# none\n").unwrap();
        std::fs::write(agents.join("c.toml"), "\n# none\n").unwrap();
        load_file(&main).expect("commented agents.d files");
    }

    /// Black-box finding: an `agents.d` file `nobody` wrote (in a directory
    /// every user could write) was loaded, its hook run as root.
    #[test]
    fn an_agents_file_another_user_owns_is_refused() {
        crate::test_support::assert_root("chown to another user");
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("keyturn.toml");
        std::fs::write(&main, "# defaults\n").unwrap();
        let agents = dir.path().join(AGENTS_DIR);
        std::fs::create_dir(&agents).unwrap();
        let a = agents.join("a.toml");
        std::fs::write(&a, "# none\n").unwrap();
        let (_, files) = load_tracked(&main).expect("root's files");
        std::os::unix::fs::chown(&a, Some(65534), None).unwrap();
        let e = load_file(&main).unwrap_err().0;
        assert!(
            e[0].file == a && e[0].message.contains("belongs to uid 65534"),
            "{}",
            e[0]
        );
        let Err(e) = reload(&main, &files) else {
            panic!("a reload onto it is refused too")
        };
        assert!(e.0[0].message.contains("uid 65534"), "{}", e.0[0]);
        std::os::unix::fs::chown(&a, Some(0), None).unwrap();
        std::os::unix::fs::chown(&agents, Some(65534), None).unwrap();
        let e = load_file(&main).unwrap_err().0;
        assert!(
            e[0].file == agents && e[0].message.contains("belongs to uid 65534"),
            "{}",
            e[0]
        );
    }

    /// Black-box finding: a config file, or `agents.d`, that every user can
    /// write was accepted, also by a daemon running as root: anyone could
    /// add a hook it runs.
    #[test]
    fn a_config_every_user_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("keyturn.toml");
        std::fs::write(&main, "# defaults\n").unwrap();
        let agents = dir.path().join(AGENTS_DIR);
        std::fs::create_dir(&agents).unwrap();
        let a = agents.join("a.toml");
        std::fs::write(&a, "# none\n").unwrap();
        let (_, files) = load_tracked(&main).expect("0644 files in a 0755 directory");

        mode(&main, 0o666);
        let e = load_file(&main).unwrap_err().0;
        assert!(
            e[0].file == main && e[0].message.contains("writable by every user (mode 0666)"),
            "{}",
            e[0]
        );
        assert!(e[0].message.contains("chmod o-w"), "{}", e[0]);
        mode(&main, 0o644);
        mode(&a, 0o646);
        let e = load_file(&main).unwrap_err().0;
        assert!(
            e[0].file == a && e[0].message.contains("mode 0646"),
            "{}",
            e[0]
        );
        mode(&a, 0o644);
        mode(&agents, 0o1777);
        let e = load_file(&main).unwrap_err().0;
        assert!(
            e[0].file == agents && e[0].message.contains("mode 1777"),
            "{}",
            e[0]
        );
        let Err(e) = reload(&main, &files) else {
            panic!("a reload onto it is refused too")
        };
        assert!(
            e.0[0].message.contains("writable by every user"),
            "{}",
            e.0[0]
        );
        mode(&agents, 0o755);
        load_file(&main).expect("fixed");
    }

    #[test]
    fn headers_nested_too_deep_are_located() {
        let deep_header = format!("[daemon]\n\n[{}]\n", vec!["a"; 200].join("."));
        let deep_inline = format!("x = 1\ny = {}1{}\n", "[".repeat(200), "]".repeat(200));
        for (text, line) in [(deep_header, 3), (deep_inline, 2)] {
            let e = errors(&text);
            assert_eq!(e.len(), 1, "{e:?}");
            // On the line that nests too deep, past its first nesting.
            assert_eq!(e[0].line, line, "{}", e[0]);
            assert!(e[0].column > 5, "{}", e[0]);
        }
    }

    #[test]
    fn syntax_error_is_one_located_error() {
        let e = errors("[daemon]\nstate_dir = \n");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].line, 2);
        assert!(e[0].message.starts_with("TOML syntax error"), "{}", e[0]);
    }

    #[test]
    fn unknown_top_level_key_points_at_the_key() {
        // (`alerts` was the example until [alerts.NAME] became a section.)
        let e = errors("\n[notify.x]\ntype = \"webhook\"\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].line, e[0].column), (2, 2));
        assert_eq!(e[0].toml_path, "notify");
        assert!(e[0].message.contains("unknown key `notify`"));
        assert!(e[0].message.contains("`agents`, `alerts`"), "{}", e[0]);
    }

    #[test]
    fn unknown_key_in_a_tagged_inline_table_is_located_at_the_key() {
        let text = "[daemon]\ndelivery_roots = [\"/run/kt\"]\n[vaults.v]\ntype = \"local\"\n\
[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n\
[agents.a.credentials.c]\nvault = \"v\"\nevery = \"1h\"\ngenerate = { kind = \"ed25519\" }\n\
deliver = [{ type = \"file\", path = \"/run/kt/a/c\", colour = \"red\" }]\n";
        let e = errors(text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].toml_path, "agents.a.credentials.c.deliver[0].colour");
        assert_eq!(e[0].line, 13);
        assert_eq!(
            e[0].column,
            text.lines().nth(12).unwrap().find("colour").unwrap() + 1
        );
        assert!(e[0].message.contains("expected one of"), "{}", e[0].message);
    }

    #[test]
    fn summary_names_the_counts() {
        let cfg = load_str(
            Path::new("/etc/keyturn/t.toml"),
            "[vaults.v]\ntype = \"local\"\n[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n\
[agents.a.credentials.c]\nvault = \"v\"\nevery = \"1h\"\ngenerate = { kind = \"ed25519\" }\n",
        )
        .unwrap();
        let s = summary(&cfg);
        assert!(
            s.contains("1 agents, 1 credentials, 1 vaults, 4 tiers"),
            "{s}"
        );
        assert!(s.contains("state_dir: /var/lib/keyturn"), "{s}");
    }

    fn one_error(extra: &str) -> ConfigError {
        let base = "[vaults.v]\ntype = \"local\"\n[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n";
        let mut e = errors(&format!("{base}{extra}"));
        assert_eq!(e.len(), 1, "{e:?}");
        e.remove(0)
    }

    #[test]
    fn odd_shapes_are_located_errors_in_toml_words() {
        let e = one_error("credentials = 5\n");
        assert_eq!((e.line, e.toml_path.as_str()), (7, "agents.a.credentials"));
        assert!(
            e.message
                .contains("expected a table of named entries, found integer")
        );

        let e = one_error(
            "[agents.a.credentials.c]\nvault = \"v\"\nevery = \"1h\"\ngenerate = \"password\"\n",
        );
        assert_eq!((e.line, e.column), (10, 12));
        assert!(e.message.contains("a table with a `kind` key"), "{e}");
        assert!(!e.message.contains("Raw"), "no Rust type names: {e}");

        let e = one_error(
            "[agents.a.credentials.c]\nvault = \"v\"\nevery = \"1h\"\ngenerate = { kind = \"rsa\" }\n",
        );
        assert_eq!(e.toml_path, "agents.a.credentials.c.generate.kind");
        assert!(
            e.message
                .starts_with("unknown value `rsa`; expected one of `password`"),
            "{e}"
        );

        let e = one_error("[daemon]\nmax_concurrent_rotations = -1\n");
        assert_eq!(
            (e.line, e.toml_path.as_str()),
            (8, "daemon.max_concurrent_rotations")
        );
        assert!(e.message.contains("expected a non-negative integer"), "{e}");

        // Black-box finding: a reload with 2^63 passed the check and
        // panicked the daemon (a semaphore's bound).
        let e = one_error("[daemon]\nmax_concurrent_rotations = 9223372036854775807\n");
        assert_eq!(
            (e.line, e.toml_path.as_str(), e.message.as_str()),
            (
                8,
                "daemon.max_concurrent_rotations",
                "max_concurrent_rotations is at most 1000000"
            )
        );
        let e = one_error("[vaults.w]\ntype = \"local\"\nmax_concurrent = 9223372036854775807\n");
        assert_eq!(
            (e.line, e.toml_path.as_str(), e.message.as_str()),
            (
                9,
                "vaults.w.max_concurrent",
                "max_concurrent is at most 1000000"
            )
        );

        let e = one_error("[vaults.w]\nmax_concurrent = 1\n");
        assert_eq!((e.line, e.toml_path.as_str()), (7, "vaults.w"));
        assert_eq!(e.message, "missing key `type`");
    }

    #[test]
    fn arrays_of_tables_are_located_too() {
        let e = one_error(
            "[daemon]\ndelivery_roots = [\"/run/kt\"]\n[agents.a.credentials.c]\nvault = \"v\"\nevery = \"1h\"\n\
generate = { kind = \"ed25519\" }\n[[agents.a.credentials.c.deliver]]\ntype = \"file\"\npath = \"a/c\"\nextra = 1\n",
        );
        assert_eq!(e.toml_path, "agents.a.credentials.c.deliver[0].extra");
        assert_eq!((e.line, e.column), (16, 1));
    }

    #[test]
    fn a_bad_section_does_not_hide_the_others() {
        // The vault fails to deserialize; the credential that uses it must not
        // also be told the vault is unknown, but its own problem is reported.
        let text = "[vaults.v]\ntype = \"local\"\nmax_concurrent = \"many\"\n\
[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n\
[agents.a.credentials.c]\nvault = \"v\"\nevery = \"0s\"\ngenerate = { kind = \"ed25519\" }\n";
        let e = errors(text);
        let paths: Vec<&str> = e.iter().map(|e| e.toml_path.as_str()).collect();
        assert_eq!(paths, ["vaults.v", "agents.a.credentials.c.every"], "{e:?}");
    }

    /// serde stops at a table's first error; every bad key of one table is
    /// still reported, each where it is, and a key with a bad value is not
    /// reported a second time as missing.
    #[test]
    fn every_bad_key_of_one_table_is_reported_at_once() {
        let text = "[daemon]\nstate_dir = 5\nfoo = 1\nsocket = 7\n\
retry = { initial_delay = 5, zz = 1 }\n\
[vaults.v]\ntype = \"local\"\n\
[agents.a]\nowner = \"o\"\ntier = \"low\"\nbogus = 1\ntenant = 3\n";
        let e = errors(text);
        let got: Vec<(&str, usize, usize)> = e
            .iter()
            .map(|e| (e.toml_path.as_str(), e.line, e.column))
            .collect();
        assert_eq!(
            got,
            [
                ("daemon.state_dir", 2, 13),
                ("daemon.foo", 3, 1),
                ("daemon.socket", 4, 10),
                ("daemon.retry.initial_delay", 5, 27),
                ("daemon.retry.zz", 5, 30),
                ("agents.a.bogus", 11, 1),
                ("agents.a.tenant", 12, 10),
            ],
            "{e:#?}"
        );
        assert!(e[1].message.starts_with("unknown key `foo`"), "{e:#?}");
        assert!(!e.iter().any(|e| e.message.contains("missing")), "{e:#?}");
    }

    /// An error inside an array's element (an unknown sink `type`) does not
    /// hide the other keys' errors in the same table.
    #[test]
    fn an_error_in_a_sink_does_not_hide_the_credentials_other_errors() {
        let text = "[vaults.v]\ntype = \"local\"\n\
[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n\
[agents.a.credentials.c]\nvault = \"v\"\nevery = 5\n\
deliver = [{ type = \"fyle\", path = \"x\" }]\ncolour = 1\n";
        let e = errors(text);
        let paths: Vec<&str> = e.iter().map(|e| e.toml_path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "agents.a.credentials.c.every",
                "agents.a.credentials.c.deliver[0].type",
                "agents.a.credentials.c.colour",
            ],
            "{e:#?}"
        );
        assert!(!e.iter().any(|e| e.message.contains("missing")), "{e:#?}");
    }

    /// Every bad element of one array is reported, each at the position it
    /// has in the file (elements taken out do not shift the others).
    #[test]
    fn every_bad_element_of_one_array_is_reported_where_it_is() {
        let text = "[vaults.v]\ntype = \"local\"\n\
[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n\
[agents.a.credentials.c]\nvault = \"v\"\nevery = \"1h\"\n\
deliver = [\n\
  { type = \"file\", path = \"a\", colour = 1 },\n\
  { type = \"file\", path = \"b\" },\n\
  { type = \"fyle\", path = \"x\" },\n\
  { type = \"file\" },\n\
  { type = \"file\", path = \"e\", atomic = \"yes\" },\n\
]\ncolour = 1\n";
        let e = errors(text);
        let got: Vec<(&str, usize)> = e.iter().map(|e| (e.toml_path.as_str(), e.line)).collect();
        assert_eq!(
            got,
            [
                ("agents.a.credentials.c.deliver[0].colour", 11),
                ("agents.a.credentials.c.deliver[2].type", 13),
                ("agents.a.credentials.c.deliver[3]", 14),
                // A sink's tag buffers its table: serde names the element.
                ("agents.a.credentials.c.deliver[4]", 15),
                ("agents.a.credentials.c.colour", 17),
            ],
            "{e:#?}"
        );
        assert!(e[2].message.contains("missing key `path`"), "{e:#?}");
        assert!(e[3].message.contains("expected a boolean"), "{e:#?}");
    }

    /// An unknown key (a typo) does not hide the table's other errors,
    /// found once the rest of it is read: the first `check` lists them all.
    #[test]
    fn an_unknown_key_does_not_hide_the_tables_other_errors() {
        let text = "[alert_rules]\nfailures_warning = 0\ntypo_key = 1\n\
[vaults.v]\ntype = \"local\"\n\
[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"nosuch\"\ntypo = 1\n";
        let e = errors(text);
        let paths: Vec<&str> = e.iter().map(|e| e.toml_path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "alert_rules.failures_warning",
                "alert_rules.typo_key",
                "agents.a.tier",
                "agents.a.typo",
            ],
            "{e:#?}"
        );
        assert!(e[2].message.contains("unknown tier `nosuch`"), "{e:#?}");
    }

    /// A key of the wrong type does not hide what else is wrong in its
    /// table: the rest is validated as written. What the key taken out
    /// would have decided (the table's own findings) is not reported.
    #[test]
    fn a_type_error_does_not_hide_the_tables_other_errors() {
        let text = "[daemon]\nmax_concurrent_rotations = \"ten\"\ndrain_timeout = \"5 parsecs\"\n\
[vaults.v]\ntype = \"local\"\n\
[agents.a]\nowner = \"o\"\ntenant = 7\ntier = \"nosuch\"\n\
[agents.a.credentials.c]\nvault = \"v\"\ngenerate = { kind = \"password\" }\n\
every = 5\njitter = \"soon\"\n";
        let e = errors(text);
        let paths: Vec<&str> = e.iter().map(|e| e.toml_path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "daemon.max_concurrent_rotations",
                "daemon.drain_timeout",
                "agents.a.tenant",
                "agents.a.tier",
                "agents.a.credentials.c.every",
                "agents.a.credentials.c.jitter",
            ],
            "{e:#?}"
        );
        assert!(e[1].message.contains("invalid duration"), "{e:#?}");
        assert!(e[3].message.contains("unknown tier `nosuch`"), "{e:#?}");
        assert!(e[5].message.contains("soon"), "{e:#?}");

        // What other sections are checked against does not come from a
        // table read without its bad key: no delivery roots is not "outside
        // every delivery root".
        let text = "[daemon]\ndelivery_roots = \"/run/x\"\n\
[vaults.v]\ntype = \"local\"\n\
[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n\
[agents.a.credentials.c]\nvault = \"v\"\ngenerate = { kind = \"password\" }\n\
every = \"1h\"\ndeliver = [{ type = \"file\", path = \"/run/x/a\" }]\n";
        let e = errors(text);
        let paths: Vec<&str> = e.iter().map(|e| e.toml_path.as_str()).collect();
        assert_eq!(paths, ["daemon.delivery_roots"], "{e:#?}");

        // A bad element of `deliver` does not hide the credential's other
        // errors either (what the array's other elements get wrong waits:
        // their positions moved when the bad one was taken out).
        let text = "[daemon]\ndelivery_roots = [\"/run/x\"]\n\
[vaults.v]\ntype = \"local\"\n\
[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n\
[agents.a.credentials.c]\nvault = \"nosuch\"\ngenerate = { kind = \"password\" }\n\
every = \"1h\"\ngrace = \"2h\"\n\
deliver = [{ type = \"file\", path = \"/run/x/a\", mode = 400 }, { type = \"file\", path = \"/etc/b\" }]\n";
        let e = errors(text);
        let paths: Vec<&str> = e.iter().map(|e| e.toml_path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "agents.a.credentials.c.vault",
                "agents.a.credentials.c.grace",
                "agents.a.credentials.c.deliver[0]",
            ],
            "{e:#?}"
        );

        // Nor a bad key inside `generate`, a tagged table.
        let text = "[daemon]\ndelivery_roots = [\"/run/x\"]\n\
[vaults.v]\ntype = \"local\"\n\
[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n\
[agents.a.credentials.c]\nvault = \"nosuch\"\n\
generate = { kind = \"password\", length = \"32\" }\nevery = \"1h\"\n\
deliver = [{ type = \"file\", path = \"/etc/b\" }]\n";
        let e = errors(text);
        let paths: Vec<&str> = e.iter().map(|e| e.toml_path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "agents.a.credentials.c.vault",
                "agents.a.credentials.c.generate",
                "agents.a.credentials.c.deliver[0].path",
            ],
            "{e:#?}"
        );
    }

    /// A missing key is reported beside a bad one in the same table.
    #[test]
    fn a_missing_key_is_reported_beside_a_bad_one() {
        let text = "[vaults.v]\ntype = \"local\"\n[agents.a]\nowner = \"o\"\ntier = 5\n";
        let e = errors(text);
        let got: Vec<(&str, &str)> = e
            .iter()
            .map(|e| (e.toml_path.as_str(), e.message.as_str()))
            .collect();
        assert_eq!(got.len(), 2, "{e:#?}");
        assert_eq!(got[0].0, "agents.a", "{e:#?}");
        assert!(got[0].1.contains("missing key `tenant`"), "{e:#?}");
        assert_eq!(got[1].0, "agents.a.tier", "{e:#?}");

        // A misspelled key is one error: the unknown key, whose message
        // lists the right one, not also the right one as missing.
        let text = "[vaults.v]\ntype = \"local\"\n[agents.a]\nowner = \"o\"\ntier = \"low\"\ntenat = \"t\"\n";
        let e = errors(text);
        assert_eq!(e.len(), 1, "{e:#?}");
        assert_eq!(e[0].toml_path, "agents.a.tenat");
        assert!(e[0].message.contains("`tenant`"), "{e:#?}");
    }

    /// Every missing key of a table is reported at once, not one per
    /// `check`: a missing key is stood in for while the table is read on.
    /// A table that lacks its enum tag does not hide the keys after it.
    #[test]
    fn every_missing_key_of_a_table_is_reported_at_once() {
        let text = "[vaults.v]\ntype = \"local\"\n[vaults.w]\ntype = \"vault\"\n\
[agents.a]\nuid = \"abc\"\n\
[agents.a.credentials.c]\nevery = \"1h\"\n\
[agents.a.credentials.d]\nvault = \"v\"\ngenerate = { length = 5 }\n\
deliver = [{ type = \"file\" }]\n\
[agents.b]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n\
decommissioned = { reason = \"gone\" }\n";
        let e = errors(text);
        let got: Vec<(&str, &str)> = e
            .iter()
            .map(|e| (e.toml_path.as_str(), e.message.as_str()))
            .collect();
        let expected = [
            ("vaults.w", "missing key `address`"),
            ("agents.a", "missing key `owner`"),
            ("agents.a", "missing key `tenant`"),
            ("agents.a", "missing key `tier`"),
            ("agents.a.uid", "invalid type"),
            ("agents.a.credentials.c", "missing key `vault`"),
            ("agents.a.credentials.c", "missing key `generate`"),
            ("agents.a.credentials.d.generate", "missing key `kind`"),
            ("agents.a.credentials.d.deliver[0]", "missing key `path`"),
            ("agents.b.decommissioned", "missing key `at`"),
        ];
        assert_eq!(got.len(), expected.len(), "{e:#?}");
        for (want, (path, message)) in expected.iter().zip(&got) {
            assert_eq!(want.0, *path, "{e:#?}");
            assert!(message.starts_with(want.1), "{e:#?}");
        }
        // Nothing a stand-in got wrong is reported.
        assert!(!e.iter().any(|e| e.message.contains("``")), "{e:#?}");
    }

    /// Black-box finding: a credential whose `generate.kind` (or target
    /// `type`) was unknown was dropped whole, so its other errors (a bad
    /// `every`, a sink without a delivery root) and a second credential's
    /// came only after the kind was fixed.
    #[test]
    fn an_unknown_tag_does_not_hide_the_rest_of_its_credential() {
        let text = "[vaults.v]\ntype = \"local\"\n\
[agents.a]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\nauth_key = \"c\"\n\
[agents.a.credentials.c]\nvault = \"nosuch\"\nevery = \"soon\"\n\
generate = { kind = \"ed2551\", length = 4 }\n\
target = { type = \"postgress\", dsn = \"x\" }\n\
deliver = [{ type = \"file\", path = \"/o/c\", mode = \"0999\" }]\n\
[agents.a.credentials.d]\nvault = \"v\"\nevery = \"1h\"\ngenerate = { kind = \"rsa\" }\n\
grace = \"2h\"\n";
        let e = errors(text);
        let got: Vec<(&str, &str)> = e
            .iter()
            .map(|e| (e.toml_path.as_str(), e.message.as_str()))
            .collect();
        let expected = [
            ("agents.a.credentials.c.vault", "unknown vault `nosuch`"),
            ("agents.a.credentials.c.every", "invalid duration `soon`"),
            (
                "agents.a.credentials.c.generate.kind",
                "unknown value `ed2551`; expected one of `password`",
            ),
            (
                "agents.a.credentials.c.target.type",
                "unknown value `postgress`; expected one of `none`",
            ),
            (
                "agents.a.credentials.c.deliver[0].path",
                "file sinks need `daemon.delivery_roots`",
            ),
            (
                "agents.a.credentials.c.deliver[0].mode",
                "invalid file mode `0999`",
            ),
            (
                "agents.a.credentials.d.generate.kind",
                "unknown value `rsa`",
            ),
            ("agents.a.credentials.d.grace", "grace"),
        ];
        assert_eq!(got.len(), expected.len(), "{got:#?}");
        for (want, (path, message)) in expected.iter().zip(&got) {
            assert_eq!(want.0, *path, "{got:#?}");
            assert!(message.starts_with(want.1), "{got:#?}");
        }
    }

    /// A config directory: `keyturn.toml` and `agents.d/*.toml`.
    fn config_dir(main: Option<&str>, agents: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        if let Some(m) = main {
            std::fs::write(dir.path().join(MAIN_FILE), m).unwrap();
        }
        std::fs::create_dir(dir.path().join(AGENTS_DIR)).unwrap();
        for (name, text) in agents {
            std::fs::write(dir.path().join(AGENTS_DIR).join(name), text).unwrap();
        }
        dir
    }

    const MAIN: &str = "[vaults.v]\ntype = \"local\"\n";

    /// Files written a moment ago are too fresh for a reload to trust their
    /// signature: make them an hour old.
    fn age(dir: &Path) {
        let mut paths = vec![dir.join(MAIN_FILE)];
        paths.extend(
            std::fs::read_dir(dir.join(AGENTS_DIR))
                .unwrap()
                .map(|e| e.unwrap().path()),
        );
        age_files(&paths);
    }

    fn age_files(paths: &[PathBuf]) {
        for p in paths.iter().filter(|p| p.exists()) {
            let f = std::fs::File::options().write(true).open(p).unwrap();
            f.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
                .unwrap();
        }
    }

    fn agent(name: &str, extra: &str) -> String {
        format!(
            "[agents.{name}]\nowner = \"o\"\ntenant = \"t\"\ntier = \"low\"\n\
[agents.{name}.credentials.c]\nvault = \"v\"\nevery = \"1h\"\ngenerate = {{ kind = \"ed25519\" }}\n{extra}"
        )
    }

    #[test]
    fn agents_d_files_are_read_with_the_main_file_given_by_name_or_by_directory() {
        let two = format!("{}{}", agent("b", ""), agent("c", ""));
        let dir = config_dir(
            Some(&format!("{MAIN}{}", agent("a", ""))),
            &[
                ("10-b.toml", &two),
                ("20-d.toml", &agent("d", "")),
                // Not config: another extension, and an editor's leftover.
                ("notes.txt", "not toml at all ["),
                (".20-d.toml.swp", "not toml at all ["),
            ],
        );
        for path in [dir.path().to_path_buf(), dir.path().join(MAIN_FILE)] {
            let cfg = load_file(&path).unwrap_or_else(|e| panic!("{e}"));
            let agents: Vec<String> = cfg.agents.keys().map(|a| a.to_string()).collect();
            assert_eq!(agents, ["a", "b", "c", "d"], "{}", path.display());
            assert_eq!(cfg.credential_count(), 4);
        }
        // A directory of agents alone takes the daemon's defaults... and
        // needs its vault, which only keyturn.toml can declare.
        let only = config_dir(None, &[("a.toml", &agent("a", ""))]);
        let e = load_file(only.path()).unwrap_err().0;
        assert!(e[0].message.contains("unknown vault"), "{e:?}");
        assert!(e[0].file.ends_with("agents.d/a.toml"), "{e:?}");
    }

    /// A file that cannot be read is named, with the reason and no
    /// made-up place in it (no `:0:0`).
    #[test]
    fn an_unreadable_agents_d_file_is_named_without_a_line() {
        let dir = config_dir(Some(MAIN), &[("10-b.toml", &agent("b", ""))]);
        std::fs::create_dir(dir.path().join("agents.d/20-dir.toml")).unwrap();
        let e = load_file(dir.path()).unwrap_err();
        let shown = e.to_string();
        let file = dir.path().join("agents.d/20-dir.toml");
        assert_eq!(
            shown.trim_end(),
            format!(
                "{}: cannot read config file: not a regular file (a directory, FIFO, socket or device): a config file must be a regular file",
                file.display()
            )
        );
    }

    #[test]
    fn errors_are_located_in_the_file_they_are_in() {
        let dir = config_dir(
            Some(MAIN),
            &[
                ("a.toml", &agent("a", "")),
                (
                    "b.toml",
                    &agent("b", "every = \"soon\"\n").replace("every = \"1h\"\n", ""),
                ),
                ("c.toml", "[daemon]\nstate_dir = \"/x\"\n"),
                ("d.toml", &agent("a", "")),
            ],
        );
        let e = load_file(dir.path()).unwrap_err().0;
        let got: Vec<(String, usize, String)> = e
            .iter()
            .map(|e| {
                (
                    e.file.file_name().unwrap().to_string_lossy().into_owned(),
                    e.line,
                    e.toml_path.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "b.toml".to_string(),
                    8,
                    "agents.b.credentials.c.every".to_string()
                ),
                ("c.toml".to_string(), 1, "daemon".to_string()),
                ("d.toml".to_string(), 1, "agents.a".to_string()),
            ],
            "{e:?}"
        );
        assert!(e[1].message.contains("belongs in keyturn.toml"), "{}", e[1]);
        assert!(
            e[2].message.contains("already defined in") && e[2].message.contains("a.toml"),
            "{}",
            e[2]
        );
    }

    #[test]
    fn a_syntax_error_in_any_file_names_that_file() {
        let dir = config_dir(Some(MAIN), &[("a.toml", "[agents.a\n")]);
        let e = load_file(dir.path()).unwrap_err().0;
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].file.ends_with("agents.d/a.toml"));
        assert!(e[0].message.starts_with("TOML syntax error"), "{}", e[0]);
    }

    /// Black-box finding: a clash with a credential in another file said
    /// `(line 1)`, the nearest table of this file. A line is given only
    /// when the other setting is in the same file.
    #[test]
    fn a_clash_with_a_setting_in_another_file_gives_no_line_of_this_one() {
        let dir = config_dir(
            Some(&format!("{MAIN}{}", agent("a", "path = \"shared/x\"\n"))),
            &[("b.toml", &agent("b", "path = \"shared/x\"\n"))],
        );
        let e = load_file(dir.path()).unwrap_err().0;
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].message
                .contains("is also used by `agents.a.credentials.c.path`"),
            "{}",
            e[0]
        );
        assert!(!e[0].message.contains("(line"), "{}", e[0]);
    }

    /// The files of `agents.d` are independent: one that does not parse is
    /// reported beside every other file's errors, not instead of them. A
    /// main file that does not parse leaves nothing the agents could be
    /// checked against: its syntax error and the others' only.
    #[test]
    fn a_syntax_error_in_an_agent_file_does_not_hide_the_other_files_errors() {
        let main = format!("[daemon]\ndrain_timeout = \"abc\"\n{MAIN}");
        let dir = config_dir(
            Some(&main),
            &[
                (
                    "a.toml",
                    &agent("a", "").replace("every = \"1h\"", "every = \"soon\""),
                ),
                ("b.toml", "[agents.b\nowner = \"x\"\n"),
                ("c.toml", &agent("c", "")),
            ],
        );
        let e = load_file(dir.path()).unwrap_err().0;
        let got: Vec<(String, String)> = e
            .iter()
            .map(|e| {
                let name = e.file.file_name().unwrap().to_string_lossy().into_owned();
                (name, e.toml_path.clone())
            })
            .collect();
        assert_eq!(
            got,
            [
                (MAIN_FILE.to_string(), "daemon.drain_timeout".to_string()),
                (
                    "a.toml".to_string(),
                    "agents.a.credentials.c.every".to_string()
                ),
                ("b.toml".to_string(), String::new()),
            ],
            "{e:?}"
        );
        assert!(e[2].message.starts_with("TOML syntax error"), "{}", e[2]);
        assert!(e.iter().all(|e| e.line > 0), "{e:?}");

        std::fs::write(dir.path().join(MAIN_FILE), "[daemon\n").unwrap();
        let e = load_file(dir.path()).unwrap_err().0;
        let files: Vec<String> = e
            .iter()
            .map(|e| e.file.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files, [MAIN_FILE, "b.toml"], "{e:?}");
    }

    #[test]
    fn a_reload_reads_only_changed_agent_files_and_falls_back_to_all() {
        // A file changed within the racy window is read again even with its
        // size and time unchanged.
        let fresh = config_dir(Some(MAIN), &[("a.toml", &agent("a", ""))]);
        let (_, files) = load_tracked(fresh.path()).unwrap();
        match reload(fresh.path(), &files).unwrap() {
            Reloaded::Full(..) => {}
            Reloaded::Partial { .. } => panic!("a fresh main file is not trusted"),
        }

        let dir = config_dir(
            Some(MAIN),
            &[("a.toml", &agent("a", "")), ("b.toml", &agent("b", ""))],
        );
        age(dir.path());
        let (cfg, files) = load_tracked(dir.path()).unwrap();
        assert_eq!(cfg.agents.len(), 2);
        // Nothing changed: nothing read, everything kept.
        match reload(dir.path(), &files).unwrap() {
            Reloaded::Partial {
                config, kept, read, ..
            } => {
                assert_eq!(read, 0);
                assert!(config.agents.is_empty());
                assert_eq!(kept.len(), 2);
            }
            Reloaded::Full(..) => panic!("expected a partial reload"),
        }
        // One file changed and one added: those two are read.
        std::fs::write(
            dir.path().join("agents.d/b.toml"),
            agent("b", "jitter = \"1m\"\n"),
        )
        .unwrap();
        std::fs::write(dir.path().join("agents.d/c.toml"), agent("c", "")).unwrap();
        age_files(&[
            dir.path().join("agents.d/b.toml"),
            dir.path().join("agents.d/c.toml"),
        ]);
        let files = match reload(dir.path(), &files).unwrap() {
            Reloaded::Partial {
                config,
                kept,
                read,
                files,
            } => {
                assert_eq!(read, 2);
                let got: Vec<String> = config.agents.keys().map(|a| a.to_string()).collect();
                assert_eq!(got, ["b", "c"]);
                assert_eq!(kept.into_iter().collect::<Vec<_>>(), ["a"]);
                files
            }
            Reloaded::Full(..) => panic!("expected a partial reload"),
        };
        // An agent defined again in a changed file while its own file did
        // not change: everything is read, and the clash is located.
        std::fs::write(dir.path().join("agents.d/c.toml"), agent("a", "")).unwrap();
        age_files(&[dir.path().join("agents.d/c.toml")]);
        let e = reload(dir.path(), &files).err().expect("a clash").0;
        assert!(e[0].message.contains("already defined"), "{e:?}");
        // The main file changed: everything is read.
        std::fs::write(dir.path().join("agents.d/c.toml"), agent("c", "")).unwrap();
        std::fs::write(dir.path().join(MAIN_FILE), format!("{MAIN}\n# edited\n")).unwrap();
        assert!(matches!(
            reload(dir.path(), &files).unwrap(),
            Reloaded::Full(..)
        ));
    }

    /// Black-box finding: `: > agents.d/b.toml` under a running daemon was
    /// refused by `check` and at start, but a reload took it as "no agents"
    /// and orphaned `b`. Refused, naming the file, as a full load does.
    #[test]
    fn a_reload_onto_an_agents_file_cut_to_nothing_is_refused() {
        let dir = config_dir(
            Some(MAIN),
            &[("a.toml", &agent("a", "")), ("b.toml", &agent("b", ""))],
        );
        age(dir.path());
        let (_, files) = load_tracked(dir.path()).unwrap();
        for (name, text) in [("b.toml", ""), ("new.toml", ""), ("b.toml", " \n")] {
            let path = dir.path().join("agents.d").join(name);
            std::fs::write(&path, text).unwrap();
            age_files(std::slice::from_ref(&path));
            let e = reload(dir.path(), &files)
                .err()
                .unwrap_or_else(|| panic!("{name} = {text:?} is refused"))
                .0;
            assert!(
                e.iter()
                    .any(|e| e.file == path && e.message.starts_with("the file is empty")),
                "{e:?}"
            );
            if name == "new.toml" {
                std::fs::remove_file(&path).unwrap();
            }
        }
    }

    #[test]
    fn a_changed_file_referring_to_an_unchanged_one_reloads_whole() {
        let hook = |timeout: &str| {
            agent(
                "b",
                &format!(
                    "deliver = [{{ type = \"webhook\", url = \"http://127.0.0.1:8080/\", secret_credential = \"a/c\", timeout = \"{timeout}\" }}]\n"
                ),
            )
        };
        let dir = config_dir(
            Some(MAIN),
            &[("a.toml", &agent("a", "")), ("b.toml", &hook("5s"))],
        );
        age(dir.path());
        let (_, files) = load_tracked(dir.path()).unwrap();
        std::fs::write(dir.path().join("agents.d/b.toml"), hook("6s")).unwrap();
        age_files(&[dir.path().join("agents.d/b.toml")]);
        match reload(dir.path(), &files) {
            Ok(Reloaded::Full(config, _)) => assert_eq!(config.agents.len(), 2),
            Ok(Reloaded::Partial { .. }) => panic!("b refers to a, which was not read"),
            Err(e) => panic!("a valid config was refused: {e}"),
        }
        // A real error in the changed file is still located there.
        std::fs::write(
            dir.path().join("agents.d/b.toml"),
            hook("6s").replace("a/c", "a/nope"),
        )
        .unwrap();
        age_files(&[dir.path().join("agents.d/b.toml")]);
        let e = reload(dir.path(), &files)
            .err()
            .expect("an unknown credential")
            .0;
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].file.ends_with("agents.d/b.toml"), "{e:?}");
        assert!(
            e[0].message.contains("unknown credential `a/nope`"),
            "{e:?}"
        );
    }
}
