//! The `signal` sink: tells a running consumer to re-read its credentials
//! by sending it a signal (SIGHUP unless configured otherwise).
//!
//! ```toml
//! deliver = [
//!   { type = "file", path = "invoice-bot/db", format = "json" },
//!   { type = "signal", pid_file = "/run/invoice-bot.pid", signal = "SIGHUP", coalesce = "2s" },
//! ]
//! ```
//!
//! The consumer is named by a pid file or by a systemd service's `MainPID`
//! (`systemctl show`). The sink never touches the value: it only says
//! "look again", so it runs after the sinks that write (the catalog orders a
//! credential's sinks by [`Sink::only_notifies`]).
//!
//! **Coalescing.** A consumer holding several credentials would otherwise be
//! signalled once per credential when they rotate together, and a reload
//! per signal is the thrash operators complain about. Deliveries to one
//! consumer (same target, signal and uid) join a window that the first of them
//! opens; when it closes one signal goes, and every delivery of the window
//! returns its outcome. A delivery therefore takes up to `coalesce` longer;
//! the files it follows were written before it started waiting.
//!
//! **Who may be signalled.** Only a process whose real, effective and saved
//! uids are all the agent's `uid` (the daemon's own when the agent has
//! none): a pid file is an input anyone able to write it controls, and a
//! root daemon must not become a way to signal arbitrary processes. The
//! check and the `kill` are two calls, so a pid reused in between by a
//! process of the same uid could receive the signal; that is the limit of
//! pid-based signalling.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::{Delivered, Notice, Sink, SinkContext, SinkPlugin};
use crate::config::validate::{Loc, SinkScope, Validator, Zero, duration_value, list};
use crate::model::{CredentialKey, ErrorKind, PluginError, SecretValue};

mod coalesce;
mod config;
#[cfg(test)]
mod tests;

use coalesce::Coalescer;
pub use config::{DEFAULT_COALESCE, MAX_COALESCE, SIGNALS, SignalConfig};

/// How the consumer is found.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Target {
    PidFile(PathBuf),
    Unit(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::PidFile(p) => write!(f, "pid file {}", p.display()),
            Target::Unit(u) => write!(f, "unit {u}"),
        }
    }
}

/// One window per consumer and signal, shared by every signal sink of the
/// process: the credentials that deliver to one consumer are separate
/// sinks, built separately, so the window cannot live in any one of them.
/// The uid allowed is part of the key: a delivery of another agent must
/// not ride on a send whose uid check was not its own.
static WINDOWS: LazyLock<Coalescer<(Target, Signal, u32)>> = LazyLock::new(Coalescer::default);

pub struct SignalSink {
    target: Target,
    signal: Signal,
    coalesce: Duration,
    /// The only uid whose processes this sink signals.
    uid: u32,
    /// Whether `uid` is the agent's (else the daemon's: the agent has none).
    uid_is_agents: bool,
}

impl SignalSink {
    fn new(cfg: SignalConfig, ctx: &SinkContext<'_>) -> Self {
        let signal = cfg.signal();
        let coalesce = cfg.coalesce();
        let target = match (cfg.pid_file, cfg.unit) {
            (Some(p), _) => Target::PidFile(p),
            (None, Some(u)) => Target::Unit(u),
            (None, None) => unreachable!("check requires pid_file or unit"),
        };
        Self {
            target,
            signal,
            coalesce,
            uid: ctx.uid.unwrap_or_else(|| nix::unistd::geteuid().as_raw()),
            uid_is_agents: ctx.uid.is_some(),
        }
    }

    /// Finds the consumer, checks whose it is, signals it.
    async fn send(&self) -> Result<(), PluginError> {
        let pid = match &self.target {
            Target::PidFile(path) => read_pid_file(path)?,
            Target::Unit(unit) => main_pid(unit).await?,
        };
        if let Some(which) = never_signalled(pid) {
            return Err(PluginError::new(
                ErrorKind::Invalid,
                format!(
                    "{} names pid {pid}, {which}; refusing to signal it (a stale pid file whose pid was reused, or one pointing at the wrong process: have the consumer write its own pid there)",
                    self.target
                ),
            ));
        }
        let uids = process_uids(pid).map_err(|e| self.stale(pid, e))?;
        if let Some(other) = uids.iter().find(|&&u| u != self.uid) {
            return Err(PluginError::new(
                ErrorKind::Unauthorized,
                format!(
                    "{} names pid {pid}, a process of uid {other}, not of uid {} ({}); refusing to signal it",
                    self.target,
                    self.uid,
                    if self.uid_is_agents {
                        "the agent's"
                    } else {
                        "the daemon's: the agent has no `uid`"
                    }
                ),
            ));
        }
        nix::sys::signal::kill(Pid::from_raw(pid), self.signal).map_err(|e| match e {
            Errno::ESRCH => self.stale(pid, e),
            // The shipped unit runs as user keyturn without CAP_KILL, which
            // a signal to another user's process takes.
            Errno::EPERM => PluginError::new(
                ErrorKind::Unauthorized,
                format!(
                    "sending {} to pid {pid} ({}, uid {}) is not permitted: the daemon needs CAP_KILL to signal another user's process (systemd: add the drop-in signal-sink.conf, installed as /usr/share/doc/keyturn/examples/systemd/signal-sink.conf, in the source tree systemd/examples/)",
                    self.signal, self.target, self.uid
                ),
            ),
            e => PluginError::new(
                ErrorKind::Transient,
                format!(
                    "sending {} to pid {pid} ({}) failed: {e}",
                    self.signal, self.target
                ),
            ),
        })
    }

    fn stale(&self, pid: i32, e: Errno) -> PluginError {
        PluginError::new(
            ErrorKind::Transient,
            format!(
                "{} names pid {pid}, which is not running ({e}): a stale pid file, or the process is restarting",
                self.target
            ),
        )
    }
}

#[async_trait]
impl Sink for SignalSink {
    fn kind(&self) -> &'static str {
        "signal"
    }

    fn describe(&self) -> String {
        match &self.target {
            Target::PidFile(p) => format!("signal:{}:{}", self.signal, p.display()),
            Target::Unit(u) => format!("signal:{}:{u}", self.signal),
        }
    }

    async fn deliver(
        &self,
        _notice: &Notice,
        _value: &SecretValue,
    ) -> Result<Delivered, PluginError> {
        WINDOWS
            .join(
                (self.target.clone(), self.signal, self.uid),
                self.coalesce,
                || self.send(),
            )
            .await?;
        // The consumer was told; whether it re-read is its own affair: a
        // signal counts as acknowledged (nothing awaits an ack from it).
        Ok(Delivered::Acknowledged)
    }

    async fn retract(&self, _key: &CredentialKey) -> Result<(), PluginError> {
        Ok(())
    }

    /// Nothing to check ahead: the consumer may start after the daemon,
    /// and a missing one is reported by the delivery that needs it.
    async fn preflight(&self) -> Result<(), PluginError> {
        Ok(())
    }

    fn only_notifies(&self) -> bool {
        true
    }
}

/// The most a pid file holds (a pid, a newline, some spaces).
const MAX_PID_FILE: usize = 64;

/// The pid in `path`: a regular file (not a symlink, which would let
/// whoever can write its directory point it anywhere) holding one
/// positive decimal number. Zero and negatives are refused: `kill` would
/// read them as process groups.
fn read_pid_file(path: &Path) -> Result<i32, PluginError> {
    let shown = path.display();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error().map(Errno::from_raw) {
            // Transient like the other pid file faults: the consumer may
            // be replaced by one that writes its pid file properly.
            Some(Errno::ELOOP) => PluginError::new(
                ErrorKind::Transient,
                format!("pid file {shown} is a symlink; refusing to follow it"),
            ),
            Some(Errno::ENOENT) => PluginError::new(
                ErrorKind::Transient,
                format!("pid file {shown} does not exist: is the process running?"),
            ),
            _ => PluginError::new(
                ErrorKind::Transient,
                format!("cannot open pid file {shown}: {e}"),
            ),
        })?;
    let meta = file
        .metadata()
        .map_err(|e| PluginError::io(format_args!("pid file {shown}"), &e))?;
    if !meta.is_file() {
        return Err(PluginError::new(
            ErrorKind::Transient,
            format!("pid file {shown} is not a regular file"),
        ));
    }
    let mut text = Vec::with_capacity(MAX_PID_FILE);
    std::io::Read::read_to_end(
        &mut std::io::Read::take(&file, MAX_PID_FILE as u64 + 1),
        &mut text,
    )
    .map_err(|e| PluginError::io(format_args!("reading pid file {shown}"), &e))?;
    parse_pid(&text).ok_or_else(|| {
        PluginError::new(
            ErrorKind::Transient,
            format!(
                "pid file {shown} does not hold a pid (one positive decimal number); it may be mid-write"
            ),
        )
    })
}

fn parse_pid(text: &[u8]) -> Option<i32> {
    if text.len() > MAX_PID_FILE {
        return None;
    }
    let t = std::str::from_utf8(text).ok()?.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse::<i32>().ok().filter(|&p| p > 0)
}

/// How long `systemctl show` may take.
const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(10);

/// The unit's `MainPID`, from `systemctl show -p MainPID --value`.
async fn main_pid(unit: &str) -> Result<i32, PluginError> {
    let failed = |why: String| {
        PluginError::new(
            ErrorKind::Transient,
            format!("cannot read the MainPID of unit {unit}: {why}"),
        )
    };
    let out = tokio::time::timeout(
        SYSTEMCTL_TIMEOUT,
        tokio::process::Command::new("systemctl")
            .args(["show", "-p", "MainPID", "--value", "--", unit])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| failed(format!("systemctl took longer than {SYSTEMCTL_TIMEOUT:?}")))?
    .map_err(|e| failed(format!("running systemctl: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(failed(format!(
            "systemctl {}: {}",
            out.status,
            stderr.trim()
        )));
    }
    match parse_pid(&out.stdout) {
        Some(pid) => Ok(pid),
        None => Err(failed("it has no main process (not running?)".to_owned())),
    }
}

/// Why `pid` is never signalled, whatever its uid: keyturn itself (for an
/// agent without `uid` it would pass the uid check, and `SIGTERM` would
/// stop rotation for the whole host), init, or not one process.
fn never_signalled(pid: i32) -> Option<&'static str> {
    if pid <= 0 {
        Some("which is not one process")
    } else if pid == 1 {
        Some("the init process (pid 1)")
    } else if u32::try_from(pid).ok() == Some(std::process::id()) {
        Some("the keyturn daemon itself")
    } else {
        None
    }
}

/// The real, effective and saved uids of `pid` (`Uid:` in
/// `/proc/PID/status`); `ESRCH` when there is no such process, or it has
/// ended and waits for its parent to reap it (a zombie: `kill` succeeds on
/// it, but nothing is there to be told; black-box finding: a dead agent
/// counted as signalled until its parent reaped it).
fn process_uids(pid: i32) -> Result<[u32; 3], Errno> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|_| Errno::ESRCH)?;
    let ended = status
        .lines()
        .find_map(|l| l.strip_prefix("State:"))
        .is_some_and(|state| matches!(state.trim_start().chars().next(), Some('Z' | 'X')));
    if ended {
        return Err(Errno::ESRCH);
    }
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|uids| {
            let mut it = uids.split_whitespace().map(|u| u.parse::<u32>().ok());
            Some([it.next()??, it.next()??, it.next()??])
        })
        .ok_or(Errno::ESRCH)
}
