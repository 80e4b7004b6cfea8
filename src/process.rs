//! Running a program on keyturn's behalf: the `command` target's hook and
//! the `exec` sink's program share this runner, so both follow one policy.
//!
//! - The program runs with a cleared environment (only `PATH`, the
//!   daemon's, plus what the caller sets), in `/`, in its own process group.
//! - The secret, when the caller passes one, arrives on stdin followed by
//!   EOF; otherwise stdin is `/dev/null`. It is never in argv or the
//!   environment, which other local users can read via /proc.
//! - On timeout the whole group is killed (SIGKILL). Processes the program
//!   leaves behind holding its stdout/stderr are killed too, after a short
//!   grace, so they cannot hold the caller open. Every kill happens before
//!   the program is reaped: until then its pid, the group's id, cannot be
//!   given to another process group.
//! - stdout is read and discarded (so a chatty program never blocks on a
//!   full pipe). The last ~2 KiB of stderr are kept, with the secret
//!   redacted in every common encoding and every run of 8 bytes or more of
//!   it (see [`redact`]); callers log them at warn level and keep them out
//!   of errors, which reach the state database, the audit log and `status`.
//! - [`outcome`] turns how the program ended into the caller's error: exit
//!   75 (`EX_TEMPFAIL`), a signal or a timeout is transient, any other
//!   non-zero status is `invalid`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::config::validate::{Loc, Validator, is_env_name};
use crate::model::{ErrorKind, PluginError};

/// Exit status a program uses to ask for a retry (sysexits.h `EX_TEMPFAIL`).
pub const EX_TEMPFAIL: i32 = 75;
/// How much of stderr is kept for the log.
pub(crate) const STDERR_TAIL: usize = 2048;
/// How much stderr we keep while reading; more than the tail so redaction sees
/// a secret that straddles the tail's start.
const STDERR_WINDOW: usize = 16 * 1024;
/// After the program exits, how long its pipes may stay open (a leftover child).
const PIPE_GRACE: Duration = Duration::from_millis(500);
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// `program args...` with a cleared environment but `PATH` and `env`, in
/// `/`, in its own process group, killed if the caller's future is dropped.
/// The caller adds its `KEYTURN_*` variables (set after `env`, they win).
pub fn command(
    program: &Path,
    args: &[String],
    env: &BTreeMap<String, String>,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
        )
        .envs(env)
        .current_dir("/")
        // Own group: a timeout kills the program and everything it started.
        .process_group(0)
        // If the caller's future is dropped (shutdown), do not leave it running.
        .kill_on_drop(true);
    // Nor if the daemon dies (`kill -9`): the program is killed with it, and
    // what it started is killed at the next start (see [`end_leftover_groups`]).
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The daemon died before the line above: no signal will come.
            if std::os::unix::process::parent_id() != parent {
                return Err(std::io::Error::other("keyturn exited"));
            }
            Ok(())
        });
    }
    cmd
}

/// Where the process group of each program running now is recorded (a file
/// named by the group's id, holding the daemon's session id): set by
/// [`end_leftover_groups`] at the daemon's start.
static GROUPS_DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// At the daemon's start, before any step runs: kills every process group a
/// program of the previous run left (that daemon was killed with -9; its
/// program died with it, what the program started did not, and would go
/// on to finish a `set` after a `revoke`, or beside a replayed `set`), and
/// waits (up to 5 s for them all) until no process of any of them runs. A
/// process that ended and waits to be reaped (a zombie, under a parent that
/// does not reap) runs nothing: black-box finding, each group holding one
/// kept the start waiting, one group after another. From now on `dir`
/// records the groups of the programs this daemon runs. Returns how many
/// were found.
pub fn end_leftover_groups(dir: &Path) -> std::io::Result<usize> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut killed = std::collections::HashSet::new();
    let mut records = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let pgid = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok());
        let session = std::fs::read_to_string(entry.path())
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok());
        if let (Some(pgid), Some(session)) = (pgid.filter(|p| *p > 1), session) {
            let g = Pid::from_raw(pgid);
            // A live leader in another session: the id was given to another
            // group since (ours was killed with the daemon), not ours.
            let reused = nix::unistd::getsid(Some(g)).is_ok_and(|s| s.as_raw() != session);
            if reused {
                tracing::info!(
                    pgid,
                    "a program's process group recorded by the previous run is gone (its id is in use by another)"
                );
            } else if !running_in(&std::iter::once(pgid).collect()).is_empty()
                && killpg(g, Signal::SIGKILL).is_ok()
            {
                killed.insert(pgid);
                tracing::warn!(
                    pgid,
                    "processes a program of the previous run started were still running: killed"
                );
            }
        }
        records.push(entry.path());
    }
    let found = killed.len();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !killed.is_empty() && std::time::Instant::now() < deadline {
        killed = running_in(&killed);
        if !killed.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Removed once they are gone (or the wait is over): a start cut short
    // before then kills them again at the next.
    for record in records {
        std::fs::remove_file(record)?;
    }
    let _ = GROUPS_DIR.set(dir.to_owned());
    Ok(found)
}

/// The groups of `groups` with a process that runs (alive and not a
/// zombie), from `/proc/PID/stat` (its state, then its group, after the
/// command name in parentheses).
fn running_in(groups: &std::collections::HashSet<i32>) -> std::collections::HashSet<i32> {
    let mut running = std::collections::HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        // No /proc: as far as can be told, they all run.
        return groups.clone();
    };
    for p in procs.flatten() {
        let name = p.file_name();
        if !name
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(p.path().join("stat")) else {
            continue; // gone meanwhile
        };
        let Some((_, after)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = after.split_whitespace();
        let (Some(state), Some(_ppid), Some(pgrp)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if let Ok(pgrp) = pgrp.parse::<i32>()
            && groups.contains(&pgrp)
            && !matches!(state, "Z" | "X" | "x")
        {
            running.insert(pgrp);
        }
    }
    running
}

/// The record of a running program's process group (see [`GROUPS_DIR`]),
/// removed when dropped, once the group is killed or its leader reaped.
struct GroupRecord(Option<std::path::PathBuf>);

impl GroupRecord {
    fn new(pgid: Option<Pid>) -> GroupRecord {
        let (Some(dir), Some(g)) = (GROUPS_DIR.get(), pgid) else {
            return GroupRecord(None);
        };
        let path = dir.join(g.as_raw().to_string());
        let session = nix::unistd::getsid(None).map(|s| s.as_raw()).unwrap_or(0);
        if let Err(e) = std::fs::write(&path, session.to_string()) {
            tracing::warn!(path = %path.display(), error = %e, "cannot record a program's process group: it would outlive a daemon killed with -9");
            return GroupRecord(None);
        }
        GroupRecord(Some(path))
    }
}

impl Drop for GroupRecord {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Reports what cannot be run of a program's configured `program`, `args`
/// and `env` (under `at`, the table naming them): a NUL byte, which no
/// `execve` can pass (black-box finding: `args = ["a\u0000b"]` passed
/// `check`, then every step failed "nul byte found in provided data"), and
/// bad `env` names ([`check_env`]).
pub(crate) fn check_command(
    v: &mut Validator<'_>,
    at: Loc<'_>,
    program: &Path,
    args: &[String],
    env: &BTreeMap<String, String>,
) {
    use std::os::unix::ffi::OsStrExt;
    const NUL: &str = "contains a NUL byte, which a program cannot be given";
    if program.as_os_str().as_bytes().contains(&0) {
        v.err(at.key("program"), format!("the program's path {NUL}"));
    }
    for (i, a) in args.iter().enumerate() {
        if a.contains('\0') {
            v.err(at.key("args").index(i), format!("the argument {NUL}"));
        }
    }
    for (k, value) in env {
        if value.contains('\0') {
            v.err(at.key("env").key(k), format!("the value of `{k}` {NUL}"));
        }
    }
    check_env(v, at.key("env"), env);
}

/// Reports bad names in a program's configured `env` at `at`: each must be
/// a variable name and must not be one of the `KEYTURN_*` keyturn sets.
fn check_env(v: &mut Validator<'_>, at: Loc<'_>, env: &BTreeMap<String, String>) {
    for k in env.keys() {
        let why = if k.starts_with("KEYTURN_") {
            Some("`KEYTURN_*` variables are set by keyturn for each step")
        } else if !is_env_name(k) {
            Some("use upper-case letters, digits and `_`, not starting with a digit")
        } else {
            None
        };
        if let Some(why) = why {
            v.err_key(
                at.key(k),
                format!("invalid environment variable `{k}`: {why}"),
            );
        }
    }
}

/// Checks that `program` exists and is an executable file (running it
/// would have side effects). `ctx` starts the error message.
pub async fn check_executable(ctx: &str, program: &Path) -> Result<(), PluginError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = tokio::fs::metadata(program)
        .await
        .map_err(|e| PluginError::io(ctx, &e))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(PluginError::new(
            ErrorKind::Invalid,
            format!("{ctx}: {} is not an executable file", program.display()),
        ));
    }
    refuse_untrusted(ctx, program)
}

/// Refuses to run `program` when another user could have changed it (see
/// [`crate::config::trust`]): it would run as keyturn's user, often with a
/// secret on its stdin.
pub fn refuse_untrusted(ctx: &str, program: &Path) -> Result<(), PluginError> {
    match crate::config::trust::untrusted(program) {
        Some(why) => Err(PluginError::new(
            ErrorKind::Invalid,
            format!("{ctx}: not run: {why}"),
        )),
        None => Ok(()),
    }
}

/// How a program ended: `status` is None when it timed out and was killed;
/// `stderr` is the end of what it printed there, redacted.
pub struct Ran {
    pub status: Option<std::io::Result<std::process::ExitStatus>>,
    pub stderr: String,
}

/// What the caller returns for a run: Ok on exit 0. Otherwise the error
/// says `{ctx}: the {who} ...` and how it ended (`exited with 3`, `timed out
/// after 30s and was killed`, ...), nothing it printed: the error reaches
/// the state database, the audit log and `keyturn status`, and what a
/// program prints is not under keyturn's control. Its stderr tail, already
/// redacted, is handed to `log_stderr` (the caller logs it at warn level
/// with its own fields). Exit 75 (`EX_TEMPFAIL`), a signal, a timeout and a
/// failed wait are transient; any other status, or a program that cannot be
/// started, is `invalid`.
pub fn outcome(
    ran: std::io::Result<Ran>,
    timeout: Duration,
    ctx: &str,
    who: &str,
    log_stderr: impl FnOnce(&str),
) -> Result<(), PluginError> {
    use std::os::unix::process::ExitStatusExt;
    let ran = ran.map_err(|e| {
        PluginError::new(
            ErrorKind::Invalid,
            format!("{ctx}: cannot start the {who}: {e}"),
        )
    })?;
    let (kind, what) = match &ran.status {
        None => (
            ErrorKind::Transient,
            format!(
                "timed out after {} and was killed",
                humantime::format_duration(timeout)
            ),
        ),
        Some(Err(e)) => (
            ErrorKind::Transient,
            format!("could not be waited for: {e}"),
        ),
        Some(Ok(status)) if status.success() => return Ok(()),
        Some(Ok(status)) => match (status.code(), status.signal()) {
            (Some(EX_TEMPFAIL), _) => (
                ErrorKind::Transient,
                format!("exited with {EX_TEMPFAIL} (EX_TEMPFAIL)"),
            ),
            (Some(code), _) => (ErrorKind::Invalid, format!("exited with {code}")),
            (None, Some(sig)) => (ErrorKind::Transient, format!("was killed by signal {sig}")),
            (None, None) => (ErrorKind::Transient, format!("ended with {status}")),
        },
    };
    let mut message = format!("{ctx}: the {who} {what}");
    if !ran.stderr.is_empty() {
        log_stderr(&ran.stderr);
        message.push_str(" (its stderr is in the daemon's log)");
    }
    Err(PluginError::new(kind, message))
}

/// Starts `cmd` (from [`command`]), writes `stdin` to it (`None`: stdin is
/// `/dev/null`), waits for it within `timeout` and collects its stderr with
/// `secret` redacted. Err: it could not be started.
pub async fn run(
    mut cmd: tokio::process::Command,
    stdin: Option<&[u8]>,
    secret: &[u8],
    timeout: Duration,
) -> std::io::Result<Ran> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    // The leader's pid is the group's id. It stays reserved as long as
    // the leader is not reaped (a zombie keeps it), so every killpg below
    // happens before `child.wait()` reaps it: a group id that the kernel
    // handed out again to an unrelated process group would otherwise be
    // killed instead.
    let pgid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(Pid::from_raw);
    let kill_group = || {
        if let Some(g) = pgid {
            // ESRCH: the group is already gone, which is what we want.
            let _ = killpg(g, Signal::SIGKILL);
        }
    };
    // Declared after `child`, so dropped before it: the group is killed
    // while its leader is still unreaped.
    let mut group_guard = GroupGuard(pgid);
    let record = GroupRecord::new(pgid);
    let mut exited = tokio::task::spawn_blocking(move || {
        if let Some(pid) = pgid {
            exited_unreaped(pid);
        }
    });

    let stderr_tail = Arc::new(Mutex::new(Tail::default()));
    let stderr_task = child
        .stderr
        .take()
        .map(|r| tokio::spawn(read_tail(r, stderr_tail.clone())));
    let stdout_task = child.stdout.take().map(|r| tokio::spawn(discard(r)));
    let input = stdin;
    let mut stdin = child.stdin.take();
    let feed = async move {
        if let (Some(w), Some(input)) = (stdin.as_mut(), input) {
            // A program that does not read stdin may exit first: EPIPE is fine.
            let _ = w.write_all(input).await;
            let _ = w.flush().await;
        }
        drop(stdin); // EOF
    };

    let timed_out = tokio::time::timeout(timeout, async {
        let _ = tokio::join!(feed, &mut exited);
    })
    .await
    .is_err();
    if timed_out {
        kill_group();
        let _ = exited.await;
    }
    // Let the readers see EOF; a leftover grandchild holding the pipes is
    // killed with the group rather than holding the caller open.
    for task in [stderr_task, stdout_task].into_iter().flatten() {
        let handle = task.abort_handle();
        if tokio::time::timeout(PIPE_GRACE, task).await.is_err() {
            kill_group();
            handle.abort();
        }
    }
    // Only now is the leader reaped (and its pid free for reuse).
    group_guard.0 = None;
    let status = child.wait().await;
    // What it started and left running is no longer waited for, see
    // `end_leftover_groups`: killed with the group above, or let be.
    drop(record);
    let status = (!timed_out).then_some(status);
    let stderr = {
        let tail = stderr_tail.lock().unwrap_or_else(|p| p.into_inner());
        render_stderr(&tail, secret)
    };
    Ok(Ran { status, stderr })
}

/// Kills the program's process group when the caller's future is dropped
/// mid-run (a shutdown past `drain_timeout`): `kill_on_drop` kills the
/// leader only, and what it started would go on to finish its step after
/// the daemon is gone (a late `set` of a version since replaced).
struct GroupGuard(Option<Pid>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(g) = self.0 {
            // ESRCH: the group is already gone.
            let _ = killpg(g, Signal::SIGKILL);
        }
    }
}

/// The last bytes of a stream, bounded.
#[derive(Default)]
struct Tail {
    buf: Vec<u8>,
    /// Bytes were dropped from the front.
    truncated: bool,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        if self.buf.len() > 2 * STDERR_WINDOW {
            let cut = self.buf.len() - STDERR_WINDOW;
            self.buf.drain(..cut);
            self.truncated = true;
        }
    }
}

/// Blocks until the child `pid` has exited, leaving it unreaped (`WNOWAIT`):
/// its pid, and so its process group's id, stays reserved until
/// `Child::wait` reaps it.
fn exited_unreaped(pid: Pid) {
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
    // EINTR: try again; anything else (ECHILD: already reaped, by a dropped
    // `Child`'s kill-on-drop) means there is nothing left to wait for.
    while let Err(nix::errno::Errno::EINTR) =
        waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT)
    {}
}

async fn read_tail(mut r: impl AsyncRead + Unpin, tail: Arc<Mutex<Tail>>) {
    let mut chunk = [0u8; 4096];
    while let Ok(n) = r.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        tail.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(&chunk[..n]);
    }
}

async fn discard(mut r: impl AsyncRead + Unpin) {
    let mut chunk = [0u8; 8192];
    while let Ok(n) = r.read(&mut chunk).await {
        if n == 0 {
            break;
        }
    }
}

/// Redacts the secret from what we kept of stderr and returns its last
/// ~[`STDERR_TAIL`] bytes as text, whitespace-trimmed.
fn render_stderr(tail: &Tail, secret: &[u8]) -> String {
    let mut kept: &[u8] = &tail.buf;
    if tail.truncated {
        // The window may start inside an occurrence, and its last few bytes
        // are too short to be recognised (see [`MIN_RUN`]): drop as much as
        // the longest encoding of that many bytes (`\u00XX` per byte).
        kept = &kept[(6 * MIN_RUN).min(kept.len())..];
    }
    let redacted = redact(kept, secret);
    let text = String::from_utf8_lossy(&redacted);
    let text = text.trim();
    if text.len() <= STDERR_TAIL {
        return text.to_owned();
    }
    let mut start = text.len() - STDERR_TAIL;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &text[start..])
}

/// Runs at least this long of the secret (or of one of its encodings) are
/// redacted wherever they appear: a program that prints a cut-off value, one
/// line of a PEM key or a value glued to other text still reveals nothing.
/// Shorter runs are left alone: they would shred the text (every `-----`,
/// every common word) and reveal at most a few bytes.
const MIN_RUN: usize = 8;

/// Replaces with `[REDACTED]` every place where `text` shows the secret, or
/// a run of at least [`MIN_RUN`] bytes of it, in any of the forms a tool
/// prints a value in: as is, hex (either case), base64 (standard or URL
/// alphabet, padded or not, starting at any of the three byte alignments —
/// `user:SECRET` in an HTTP Basic header shifts it), percent-encoded (any
/// choice of escaped bytes, either case, `+` for space) or JSON-escaped.
///
/// Encodings with one spelling per value (hex, base64) are matched by
/// encoding the secret; those that let the encoder choose what to escape
/// (percent, JSON) by decoding the text into a view that remembers where
/// each byte came from, and searching the secret there.
pub fn redact(text: &[u8], secret: &[u8]) -> Vec<u8> {
    if secret.is_empty() {
        return text.to_vec();
    }
    let mut needles = vec![
        secret.to_vec(),
        hex::encode(secret).into_bytes(),
        hex::encode_upper(secret).into_bytes(),
    ];
    for alphabet in [
        &base64::engine::general_purpose::STANDARD_NO_PAD,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ] {
        for align in 0..3 {
            needles.push(base64_core(alphabet, align, secret));
        }
    }
    // Short needles are found whole; long ones by their MIN_RUN-byte windows.
    let mut grams = std::collections::HashSet::new();
    let mut whole = Vec::new();
    for n in needles.iter().filter(|n| !n.is_empty()) {
        if n.len() < MIN_RUN {
            whole.push(n.as_slice());
        } else {
            grams.extend(n.windows(MIN_RUN));
        }
    }

    let mut hidden = vec![false; text.len()];
    for view in [
        View::raw(text),
        View::percent_decoded(text, false),
        View::percent_decoded(text, true),
        View::json_unescaped(text),
    ] {
        let b = &view.bytes;
        let mut hide = |from: usize, len: usize| {
            let (start, end) = (view.spans[from].0, view.spans[from + len - 1].1);
            hidden[start..end].fill(true);
        };
        for i in 0..b.len() {
            if b.len() - i >= MIN_RUN && grams.contains(&b[i..i + MIN_RUN]) {
                hide(i, MIN_RUN);
            }
            for n in &whole {
                if b[i..].starts_with(n) {
                    hide(i, n.len());
                }
            }
        }
    }

    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if hidden[i] {
            out.extend_from_slice(b"[REDACTED]");
            while i < text.len() && hidden[i] {
                i += 1;
            }
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    out
}

/// The characters of the base64 form of `secret` that depend on it alone,
/// when it starts `align` bytes after a 3-byte boundary of the encoded data:
/// the characters shared with what came before, and the last partial one
/// (and padding), are left out, so the result is found whatever surrounds it.
fn base64_core(engine: &impl base64::Engine, align: usize, secret: &[u8]) -> Vec<u8> {
    let mut shifted = vec![0u8; align];
    shifted.extend_from_slice(secret);
    let encoded = engine.encode(&shifted).into_bytes();
    // Character i covers bits 6i..6i+6 of the data.
    let first = (8 * align).div_ceil(6);
    let end = (8 * shifted.len() / 6).min(encoded.len());
    encoded
        .get(first..end)
        .map(<[u8]>::to_vec)
        .unwrap_or_default()
}

/// `text` decoded by one escaping scheme; `spans[i]` is the range of `text`
/// that `bytes[i]` came from.
struct View {
    bytes: Vec<u8>,
    spans: Vec<(usize, usize)>,
}

impl View {
    fn raw(text: &[u8]) -> View {
        View {
            bytes: text.to_vec(),
            spans: (0..text.len()).map(|i| (i, i + 1)).collect(),
        }
    }

    /// `%XX` (either case) decoded; with `plus_space`, `+` too (HTML forms).
    fn percent_decoded(text: &[u8], plus_space: bool) -> View {
        let mut v = View::with_capacity(text.len());
        let mut i = 0;
        while i < text.len() {
            let hex_byte = text
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match (text[i], hex_byte) {
                (b'%', Some(b)) => {
                    v.push(b, i, i + 3);
                    i += 3;
                }
                (b'+', _) if plus_space => {
                    v.push(b' ', i, i + 1);
                    i += 1;
                }
                (c, _) => {
                    v.push(c, i, i + 1);
                    i += 1;
                }
            }
        }
        v
    }

    /// JSON string escapes decoded: `\"`, `\\`, `\/`, `\b\f\n\r\t` and
    /// `\uXXXX` (surrogate pairs joined), the latter as UTF-8.
    fn json_unescaped(text: &[u8]) -> View {
        let hex4 = |at: usize| {
            text.get(at..at + 4)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u32::from_str_radix(h, 16).ok())
        };
        let mut v = View::with_capacity(text.len());
        let mut i = 0;
        while i < text.len() {
            let simple = match text.get(i + 1) {
                Some(b'"') => Some(b'"'),
                Some(b'\\') => Some(b'\\'),
                Some(b'/') => Some(b'/'),
                Some(b'b') => Some(0x08),
                Some(b'f') => Some(0x0c),
                Some(b'n') => Some(b'\n'),
                Some(b'r') => Some(b'\r'),
                Some(b't') => Some(b'\t'),
                _ => None,
            };
            if text[i] != b'\\' {
                v.push(text[i], i, i + 1);
                i += 1;
            } else if let Some(b) = simple {
                v.push(b, i, i + 2);
                i += 2;
            } else if text.get(i + 1) == Some(&b'u')
                && let Some(hi) = hex4(i + 2)
            {
                // A high surrogate followed by `\uDC00`-`\uDFFF` is one character.
                let low = (text.get(i + 6..i + 8) == Some(b"\\u"))
                    .then(|| hex4(i + 8))
                    .flatten()
                    .filter(|lo| (0xD800..0xDC00).contains(&hi) && (0xDC00..0xE000).contains(lo));
                let (code, len) = match low {
                    Some(lo) => (0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00), 12),
                    None => (hi, 6),
                };
                let mut utf8 = [0u8; 4];
                match char::from_u32(code) {
                    Some(c) => {
                        for b in c.encode_utf8(&mut utf8).bytes() {
                            v.push(b, i, i + len);
                        }
                    }
                    // A lone surrogate: no UTF-8 form, keep the text as is.
                    None => {
                        for (j, &b) in text.iter().enumerate().skip(i).take(len) {
                            v.push(b, j, j + 1);
                        }
                    }
                }
                i += len;
            } else {
                v.push(text[i], i, i + 1);
                i += 1;
            }
        }
        v
    }

    fn with_capacity(n: usize) -> View {
        View {
            bytes: Vec::with_capacity(n),
            spans: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, b: u8, start: usize, end: usize) {
        self.bytes.push(b);
        self.spans.push((start, end));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every common spelling of a secret a tool might print, each once as a
    /// whole and once cut short: all of them must go.
    pub(crate) fn encodings_of(secret: &[u8]) -> Vec<(String, Vec<u8>)> {
        use base64::Engine as _;
        use base64::engine::general_purpose::{
            STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD,
        };
        let pct = |upper: bool, plus: bool| -> Vec<u8> {
            let mut out = Vec::new();
            for &b in secret {
                if b.is_ascii_alphanumeric() {
                    out.push(b);
                } else if b == b' ' && plus {
                    out.push(b'+');
                } else if upper {
                    out.extend_from_slice(format!("%{b:02X}").as_bytes());
                } else {
                    out.extend_from_slice(format!("%{b:02x}").as_bytes());
                }
            }
            out
        };
        let text = String::from_utf8_lossy(secret);
        let json_ascii: String = text
            .chars()
            .map(|c| match c {
                '"' => "\\\"".to_owned(),
                '\\' => "\\\\".to_owned(),
                '/' => "\\/".to_owned(),
                c if c.is_ascii() => c.to_string(),
                c => c
                    .encode_utf16(&mut [0; 2])
                    .iter()
                    .map(|u| format!("\\u{u:04x}"))
                    .collect(),
            })
            .collect();
        let mut all: Vec<(String, Vec<u8>)> = vec![
            ("raw".into(), secret.to_vec()),
            ("hex".into(), hex::encode(secret).into_bytes()),
            ("HEX".into(), hex::encode_upper(secret).into_bytes()),
            ("percent".into(), pct(true, false)),
            ("percent lower".into(), pct(false, false)),
            ("form".into(), pct(true, true)),
            (
                "json".into(),
                serde_json::to_string(&text).unwrap().into_bytes(),
            ),
            ("json ascii".into(), json_ascii.into_bytes()),
        ];
        // HTTP Basic (`user:SECRET`, `ab:SECRET`, `abc:SECRET`): the three
        // alignments, in both alphabets, padded or not.
        for user in ["user", "ab", "abc"] {
            let mut cred = format!("{user}:").into_bytes();
            cred.extend_from_slice(secret);
            for (name, e) in [
                ("base64", STANDARD.encode(&cred)),
                ("base64 nopad", STANDARD_NO_PAD.encode(&cred)),
                ("base64url", URL_SAFE.encode(&cred)),
                ("base64url nopad", URL_SAFE_NO_PAD.encode(&cred)),
            ] {
                all.push((format!("{name} after {user}:"), e.into_bytes()));
            }
        }
        all.push(("base64 alone".into(), STANDARD.encode(secret).into_bytes()));
        // Cut short: the first 2/3 of each form.
        let cut: Vec<_> = all
            .iter()
            .map(|(n, e)| (format!("{n}, cut short"), e[..e.len() * 2 / 3].to_vec()))
            .collect();
        all.extend(cut);
        all
    }

    /// The secret's give-away part in each encoding: what must not survive.
    /// For a cut-short or prefixed form, at least its first 8 bytes' worth.
    fn leaks(secret: &[u8], hay: &[u8]) -> Vec<String> {
        let mut found = Vec::new();
        for (name, enc) in encodings_of(secret) {
            // Any 12-byte window of an encoding that the text still shows.
            // (The forms after `user:` start with the user's base64, which is
            // no secret: those windows are skipped by starting later.)
            let skip = if name.contains("after") { 8 } else { 0 };
            if enc.len() < skip + 12 {
                continue;
            }
            if enc[skip..]
                .windows(12)
                .any(|w| hay.windows(12).any(|h| h == w))
            {
                found.push(name);
            }
        }
        found
    }

    /// Black-box finding: after a `kill -9`, the start waited for each
    /// recorded group that held a zombie (a killed process whose parent
    /// does not reap it, as keyturn's programs' leftovers are under an
    /// init that does not), one group after another. Zombies run nothing:
    /// the groups are killed and waited for together, zombies not counted.
    #[test]
    fn leftover_groups_are_killed_together_and_their_zombies_not_waited_for() {
        use std::os::unix::process::CommandExt as _;
        let dir = tempfile::tempdir().unwrap();
        let session = nix::unistd::getsid(None).unwrap().as_raw();
        // Leaders of groups of their own, children of this test, which
        // reaps them only at the end: killed, they stay zombies.
        let mut children: Vec<std::process::Child> = (0..3)
            .map(|_| {
                std::process::Command::new("sleep")
                    .arg("60")
                    .process_group(0)
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in &children {
            std::fs::write(dir.path().join(c.id().to_string()), session.to_string()).unwrap();
        }
        let started = std::time::Instant::now();
        assert_eq!(end_leftover_groups(dir.path()).unwrap(), 3);
        let took = started.elapsed();
        let groups: std::collections::HashSet<i32> =
            children.iter().map(|c| c.id() as i32).collect();
        assert!(running_in(&groups).is_empty());
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        for c in &mut children {
            use std::os::unix::process::ExitStatusExt as _;
            assert_eq!(c.wait().unwrap().signal(), Some(libc::SIGKILL));
        }
    }

    #[test]
    fn every_encoding_of_the_secret_is_redacted() {
        let secret = "kt_canary_Zq\"9\\/é+ &%x7Lm-Q2wR8vT".as_bytes();
        for (name, enc) in encodings_of(secret) {
            let mut text = b"curl: > Authorization: Basic ".to_vec();
            text.extend_from_slice(&enc);
            text.extend_from_slice(b"\r\n< HTTP/1.1 401 Unauthorized");
            let out = redact(&text, secret);
            let leaked = leaks(secret, &out);
            assert!(
                leaked.is_empty(),
                "{name}: {leaked:?} in {}",
                String::from_utf8_lossy(&out)
            );
            assert!(out.starts_with(b"curl: > Authorization: Basic "), "{name}");
            assert!(out.ends_with(b"< HTTP/1.1 401 Unauthorized"), "{name}");
            assert!(contains_redacted(&out), "{name}");
        }
        // Text without the secret is left alone, however it is spelled.
        let plain = b"error: role \"bot\" password authentication failed (code 28P01) %2F +x";
        assert_eq!(redact(plain, secret), plain.to_vec());
    }

    fn contains_redacted(b: &[u8]) -> bool {
        b.windows(10).any(|w| w == b"[REDACTED]")
    }

    #[test]
    fn redaction_covers_whole_secret_lines_and_window_edges() {
        assert_eq!(
            redact(b"a SECRET b SECRET", b"SECRET"),
            b"a [REDACTED] b [REDACTED]"
        );
        assert_eq!(
            redact(b"x longline1 y", b"short\nlongline1"),
            b"x [REDACTED] y"
        );
        // Short lines are left alone.
        assert_eq!(redact(b"x short y", b"short\nlongline1"), b"x short y");
        // A truncated window that starts mid-secret loses that fragment.
        let mut tail = Tail::default();
        tail.push(&b"z".repeat(2 * STDERR_WINDOW));
        tail.push(b"CRETVALUE1 ");
        let mut t2 = Tail {
            buf: b"CRETVALUE1 end".to_vec(),
            truncated: true,
        };
        assert!(!render_stderr(&t2, b"SECRETVALUE1").contains("CRETVALUE1"));
        // Untruncated, a run of 8 bytes or more of the secret goes too; a
        // shorter one stays (it would shred ordinary text).
        t2.truncated = false;
        assert!(!render_stderr(&t2, b"SECRETVALUE1").contains("CRETVALUE1"));
        t2.buf = b"VALUE1 end".to_vec();
        assert!(render_stderr(&t2, b"SECRETVALUE1").contains("VALUE1 end"));
        assert!(tail.truncated && tail.buf.len() <= 2 * STDERR_WINDOW);
    }
}
