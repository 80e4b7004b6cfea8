//! `keyturn watch`: a small supervisor for an agent that cannot reload by
//! itself. It runs the agent's command and, each time a delivered file gets a
//! new version, signals it (SIGHUP unless told otherwise) or restarts it.
//!
//! ```text
//! keyturn watch --file /run/keyturn/agents/bot/db.json [--signal SIGUSR1 | --restart] [--drain 10s] -- /usr/bin/bot --serve
//! ```
//!
//! - **Seeing a new version.** inotify watches each file's *directory*: the
//!   file sink replaces a file by renaming a new one over it (and a bundle by
//!   swapping its `..data` link), which a watch on the file itself would
//!   lose after the first rename. Any event there arms a debounce timer; when
//!   the directory has been quiet for `--debounce` (at most
//!   [`MAX_DEBOUNCE_FACTOR`] × that after the first event, so a steady stream
//!   of changes still gets through) every file is fingerprinted and compared
//!   with what the child was last given. Only a new file counts (a new inode
//!   renamed over it, or a write in place: size, mtime): a temp file, an
//!   unrelated file, or a chmod, chown or read of the file itself does
//!   nothing (the ctime was compared once: a reload re-owning every
//!   delivered file restarted every wrapped agent; black-box finding). watch never opens the files (see [`Fingerprint`]). A
//!   directory deleted or moved away (an agent's directory removed and made
//!   again by the next delivery) is watched again as soon as it exists.
//! - **Acting.** `--signal SIG` (one of the signals the `signal` sink may
//!   send) goes to the child's process group. `--restart` sends SIGTERM to
//!   the group, waits up to `--drain` for the child to exit, SIGKILLs the
//!   group if it has not, and starts the command again; changes seen during a
//!   restart are checked once the new child runs (it read the files after they
//!   were fingerprinted, so only a later version makes another restart).
//! - **The child** runs with watch's environment, stdio and working
//!   directory, in its own process group, so that a wrapper script's own
//!   children hear the same signals and a restart leaves none behind.
//! - **Signals to watch** — SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1,
//!   SIGUSR2, SIGWINCH — are forwarded to the child's group. After SIGINT,
//!   SIGQUIT or SIGTERM watch only waits for the child: no more restarts.
//! - **Exit status**: the child's, or 128 + the signal that killed it, like a
//!   shell. watch exits as soon as its child exits by itself (not during a
//!   restart). 126/127 when the command cannot be started, 64 for bad usage.
//!
//! The process code of [`crate::process`] is for short programs keyturn runs
//! on its own behalf (cleared environment, captured output, a timeout); a
//! supervised agent needs the opposite on each count, so only the idea of the
//! own process group is shared.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use futures::StreamExt;
use inotify::{EventMask, Inotify, WatchMask};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use crate::sinks::signal::SIGNALS;

/// How much longer than `--debounce` a burst may delay the action.
pub const MAX_DEBOUNCE_FACTOR: u32 = 8;
/// Signals forwarded to the child's process group.
pub const FORWARDED: &[Signal] = &[
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];
/// After one of these, watch is stopping: it only waits for the child.
const STOPPING: &[Signal] = &[Signal::SIGINT, Signal::SIGQUIT, Signal::SIGTERM];

/// What to do when a file changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Signal(Signal),
    Restart { drain: Duration },
}

/// A parsed `keyturn watch` invocation.
#[derive(Debug, Clone)]
pub struct Watch {
    pub files: Vec<PathBuf>,
    pub action: Action,
    pub debounce: Duration,
    pub command: Vec<OsString>,
}

/// Exit codes beyond the child's own.
pub const EXIT_USAGE: u8 = 64;
pub const EXIT_CANNOT_EXECUTE: u8 = 126;
pub const EXIT_NOT_FOUND: u8 = 127;

/// A line on stderr that cannot fail: `eprintln!` panics when stderr is
/// gone (a closed pipe, a full disk), and `watch` must keep supervising
/// its agent whatever happened to its own output.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `SIGHUP`, `HUP` or `hup` → SIGHUP, if it is one a consumer may be sent.
pub fn parse_signal(name: &str) -> Result<Signal, String> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    SIGNALS
        .iter()
        .copied()
        .find(|s| s.as_str() == full)
        .ok_or_else(|| {
            let names: Vec<&str> = SIGNALS.iter().map(|s| s.as_str()).collect();
            format!(
                "unknown signal `{name}`; expected one of {}",
                names.join(", ")
            )
        })
}

/// What a file was when last looked at: which inode, its size and its
/// modification time (not its ctime, which a chmod or chown moves too).
/// Every delivery of the file sink is a new inode (renamed over the old
/// one) or, in place, a new mtime. watch never opens the file:
/// it holds a secret watch has no use for, and a file sink with
/// `ack = "open"` would count watch's read as the agent's acknowledgement.
#[derive(Clone, PartialEq, Eq)]
enum Fingerprint {
    Missing,
    Meta {
        dev: u64,
        ino: u64,
        size: u64,
        mtime_ns: i128,
    },
}

fn fingerprint(path: &Path) -> Fingerprint {
    // Follows symlinks: a bundle's files point into the `..data` swapped in.
    match std::fs::metadata(path) {
        Ok(m) => Fingerprint::Meta {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        },
        Err(_) => Fingerprint::Missing,
    }
}

fn fingerprints(files: &[PathBuf]) -> Vec<Fingerprint> {
    files.iter().map(|f| fingerprint(f)).collect()
}

/// The exit code a shell would report for `status`.
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => (code & 0xff) as u8,
        (None, Some(sig)) => (128 + sig).min(255) as u8,
        _ => 1,
    }
}

fn spawn(command: &[OsString]) -> Result<Child, u8> {
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..])
        // Own group: signals and a restart reach what a wrapper started too.
        .process_group(0)
        .kill_on_drop(true);
    cmd.spawn().map_err(|e| {
        say!(
            "keyturn watch: cannot run {}: {e}",
            Path::new(&command[0]).display()
        );
        match e.kind() {
            std::io::ErrorKind::NotFound => EXIT_NOT_FOUND,
            _ => EXIT_CANNOT_EXECUTE,
        }
    })
}

fn signal_group(pid: Option<u32>, sig: Signal) {
    let Some(pid) = pid else { return };
    let Ok(pid) = i32::try_from(pid) else { return };
    if let Err(e) = killpg(Pid::from_raw(pid), sig) {
        // ESRCH: the group is gone (it exited); nothing to tell.
        if e != nix::errno::Errno::ESRCH {
            tracing::warn!(pid, signal = %sig, error = %e, "cannot signal the child");
        }
    }
}

/// What watch asks inotify for on each directory.
fn dir_mask() -> WatchMask {
    WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::ATTRIB
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
}

/// `files`, with a key pair bundle's directory (a file sink's `path` for
/// a key pair: it holds `..data`) replaced by the files in it: a rotation
/// swaps `..data` inside the directory, which watching its parent never
/// saw (black-box finding: `--file` naming the sink's `path` never fired).
fn bundle_files(files: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let members = std::fs::symlink_metadata(f.join("..data"))
            .ok()
            .and_then(|_| std::fs::read_dir(f).ok())
            .map(|entries| {
                let mut names: Vec<PathBuf> = entries
                    .flatten()
                    .filter(|e| !e.file_name().as_encoded_bytes().starts_with(b"."))
                    .map(|e| e.path())
                    .collect();
                names.sort();
                names
            })
            .filter(|names| !names.is_empty());
        match members {
            Some(names) => out.extend(names),
            None => out.push(f.clone()),
        }
    }
    out
}

/// The parent directory of each file, once each.
fn parent_dirs(files: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for f in files {
        let dir = match f.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    dirs
}

/// Watches the parent directory of each file; the directories must exist.
fn watch_dirs(dirs: &[PathBuf]) -> Result<Inotify, String> {
    let inotify = Inotify::init().map_err(|e| format!("inotify: {e}"))?;
    for dir in dirs {
        inotify
            .watches()
            .add(dir, dir_mask())
            .map_err(|e| format!("cannot watch the directory {}: {e}", dir.display()))?;
    }
    Ok(inotify)
}

/// How often watch tries to watch a directory again after it was deleted
/// or moved away (until the file sink makes it again).
const REWATCH_EVERY: Duration = Duration::from_millis(500);

/// Runs `keyturn watch`; returns the exit code.
pub async fn run(mut w: Watch) -> u8 {
    if w.command.is_empty() {
        say!("keyturn watch: no command given (after `--`)");
        return EXIT_USAGE;
    }
    w.files = bundle_files(&w.files);
    let dirs = parent_dirs(&w.files);
    let inotify = match watch_dirs(&dirs) {
        Ok(i) => i,
        Err(e) => {
            say!("keyturn watch: {e}");
            return EXIT_USAGE;
        }
    };
    let mut events = match inotify.into_event_stream(vec![0u8; 16 * 1024]) {
        Ok(s) => s,
        Err(e) => {
            say!("keyturn watch: inotify: {e}");
            return crate::cli::EXIT_FAILED;
        }
    };
    // Signal handlers first, so that nothing sent from here on is lost.
    let (sig_tx, mut sig_rx) = mpsc::unbounded_channel();
    for &sig in FORWARDED {
        let mut stream = match tokio::signal::unix::signal((sig as i32).into()) {
            Ok(s) => s,
            Err(e) => {
                say!("keyturn watch: cannot handle {sig}: {e}");
                return crate::cli::EXIT_FAILED;
            }
        };
        let tx = sig_tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(sig).is_err() {
                    break;
                }
            }
        });
    }
    drop(sig_tx);

    let mut seen = fingerprints(&w.files);
    let mut child = match spawn(&w.command) {
        Ok(c) => c,
        Err(code) => return code,
    };
    tracing::info!(pid = %shown(child.id()), "started the command");
    let quiet = w.debounce;
    let max_wait = w.debounce * MAX_DEBOUNCE_FACTOR;
    // Some((first event, deadline)) while a burst is being gathered.
    let mut burst: Option<(Instant, Instant)> = None;
    let mut restarting = false;
    let mut stopping = false;
    let mut kill_at: Option<Instant> = None;
    // A watched directory was deleted or moved away: its watch is gone, and
    // the directory the file sink makes again must be watched anew.
    let mut rewatch_at: Option<Instant> = None;
    loop {
        let pid = child.id();
        let debounce_at = burst.map(|(_, at)| at);
        tokio::select! {
            status = child.wait() => {
                let status = match status {
                    Ok(s) => s,
                    Err(e) => {
                        say!("keyturn watch: cannot wait for the child: {e}");
                        return crate::cli::EXIT_FAILED;
                    }
                };
                kill_at = None;
                if restarting && !stopping {
                    restarting = false;
                    // Fingerprint before the start: the new child reads these
                    // versions or later ones, never earlier.
                    seen = fingerprints(&w.files);
                    child = match spawn(&w.command) {
                        Ok(c) => c,
                        Err(code) => return code,
                    };
                    tracing::info!(pid = %shown(child.id()), "restarted the command");
                    continue;
                }
                tracing::info!(code = exit_code(status), "the command exited");
                return exit_code(status);
            }
            Some(sig) = sig_rx.recv() => {
                if STOPPING.contains(&sig) {
                    stopping = true;
                }
                signal_group(pid, sig);
            }
            ev = events.next() => match ev {
                Some(Ok(ev)) => {
                    if ev.mask.intersects(EventMask::IGNORED | EventMask::DELETE_SELF | EventMask::MOVE_SELF) {
                        rewatch_at.get_or_insert_with(Instant::now);
                    }
                    let now = Instant::now();
                    let first = burst.map_or(now, |(first, _)| first);
                    burst = Some((first, (now + quiet).min(first + max_wait)));
                }
                Some(Err(e)) => {
                    // An overflowed queue (IN_Q_OVERFLOW arrives as an event,
                    // not an error) or a read error: look at the files anyway.
                    tracing::warn!(error = %e, "inotify");
                    let now = Instant::now();
                    burst.get_or_insert((now, now));
                }
                None => {
                    say!("keyturn watch: the inotify stream ended");
                    return crate::cli::EXIT_FAILED;
                }
            },
            _ = sleep_until(rewatch_at.unwrap_or_else(Instant::now)), if rewatch_at.is_some() => {
                let mut watches = events.watches();
                let missing: Vec<&PathBuf> = dirs
                    .iter()
                    .filter(|d| watches.add(d, dir_mask()).is_err())
                    .collect();
                if missing.is_empty() {
                    tracing::info!("watching the files' directories again");
                    rewatch_at = None;
                    // What changed while nothing was watched is looked at now.
                    let now = Instant::now();
                    burst.get_or_insert((now, now));
                } else {
                    rewatch_at = Some(Instant::now() + REWATCH_EVERY);
                }
            }
            _ = sleep_until(debounce_at.unwrap_or_else(Instant::now)), if debounce_at.is_some() && !restarting && !stopping => {
                burst = None;
                let now_seen = fingerprints(&w.files);
                let changed = now_seen
                    .iter()
                    .zip(&seen)
                    .any(|(new, old)| new != old && *new != Fingerprint::Missing);
                if !changed {
                    continue;
                }
                seen = now_seen;
                match w.action {
                    Action::Signal(sig) => {
                        tracing::info!(pid = %shown(pid), signal = %sig, "a file changed: signalling the command");
                        signal_group(pid, sig);
                    }
                    Action::Restart { drain } => {
                        tracing::info!(pid = %shown(pid), drain = ?drain, "a file changed: restarting the command");
                        restarting = true;
                        kill_at = Some(Instant::now() + drain);
                        signal_group(pid, Signal::SIGTERM);
                    }
                }
            }
            _ = sleep_until(kill_at.unwrap_or_else(Instant::now)), if kill_at.is_some() => {
                kill_at = None;
                tracing::warn!(pid = %shown(pid), "the command did not exit within the drain time: killing it");
                signal_group(pid, Signal::SIGKILL);
            }
        }
    }
}

/// A child's pid for the log: the number, or `exited` once it is reaped.
fn shown(pid: Option<u32>) -> String {
    pid.map_or_else(|| "exited".to_owned(), |p| p.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_with_or_without_sig_in_any_case() {
        assert_eq!(parse_signal("SIGHUP"), Ok(Signal::SIGHUP));
        assert_eq!(parse_signal("usr1"), Ok(Signal::SIGUSR1));
        assert_eq!(parse_signal("SigTerm"), Ok(Signal::SIGTERM));
        let e = parse_signal("KILL").unwrap_err();
        assert!(
            e.contains("unknown signal `KILL`") && e.contains("SIGHUP"),
            "{e}"
        );
    }

    #[test]
    fn exit_codes_are_a_shells() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
    }

    #[test]
    fn a_fingerprint_changes_with_a_new_file_or_a_write_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db.json");
        assert!(fingerprint(&p) == Fingerprint::Missing);
        std::fs::write(&p, "one").unwrap();
        let a = fingerprint(&p);
        assert!(fingerprint(&p) == a, "nothing happened: no change");
        std::fs::write(dir.path().join("tmp"), "one").unwrap();
        std::fs::rename(dir.path().join("tmp"), &p).unwrap();
        assert!(
            fingerprint(&p) != a,
            "renamed over it, same bytes: a new version"
        );
        let b = fingerprint(&p);
        std::thread::sleep(Duration::from_millis(10));
        std::fs::write(&p, "two").unwrap();
        assert!(fingerprint(&p) != b, "written in place: a new version");
    }
}
