//! `command`: a hook program applies, tests, retires and revokes the value at
//! any system keyturn has no plug-in for.
//!
//! The contract with the hook:
//! - It is run as `program args...` for every step, in `/`, with a cleared
//!   environment: only `PATH` (the daemon's), the configured `env`, and
//!   `KEYTURN_STEP` (`set` | `test` | `retire` | `revoke`), `KEYTURN_AGENT`,
//!   `KEYTURN_CREDENTIAL`, `KEYTURN_VERSION` (absent for `revoke`; the
//!   previous version for `retire`). keyturn's variables win over configured ones.
//! - The secret arrives on stdin (for `set` and `test`), followed by EOF;
//!   stdin is empty for `retire` and `revoke`. It is never in argv or the
//!   environment, which other local users can read via /proc.
//! - Exit 0 is success. Exit 75 (`EX_TEMPFAIL`) means "try again later"
//!   (a transient error the engine retries with backoff); death by a signal
//!   is transient too. Any other status is `invalid`: the hook rejected the
//!   request, and retrying the same request will not help until someone acts.
//! - The hook runs in its own process group. On timeout the whole group is
//!   killed (SIGKILL) and the step fails as transient. Processes the hook
//!   leaves behind holding its stdout/stderr are killed too, after a short
//!   grace, so they cannot hold the step open. Every kill happens before
//!   the hook is reaped: until then its pid, the group's id, cannot be given
//!   to another process group.
//! - stdout is read and discarded (so a chatty hook never blocks on a full
//!   pipe). A failed step's error carries only how the hook ended: that error
//!   reaches the state database, the audit log and `keyturn status`. The last
//!   ~2 KiB of stderr go to the daemon's log at warn level, with the secret
//!   redacted in every common encoding and every run of 8 bytes or more of
//!   it (see `redact` below).

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{Target, TargetPlugin};
use crate::config::validate::{Loc, Validator, duration_value, is_env_name};
use crate::model::{CredentialKey, ErrorKind, PluginError, SecretValue, VersionNo};

/// Exit status a hook uses to ask for a retry (sysexits.h `EX_TEMPFAIL`).
pub const EX_TEMPFAIL: i32 = 75;
/// How much of stderr the error message carries.
const STDERR_TAIL: usize = 2048;
/// How much stderr we keep while reading; more than the tail so redaction sees
/// a secret that straddles the tail's start.
const STDERR_WINDOW: usize = 16 * 1024;
/// After the hook exits, how long its pipes may stay open (a leftover child).
const PIPE_GRACE: Duration = Duration::from_millis(500);
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Default time a hook may take for one step.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// `target = { type = "command", ... }`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    pub program: PathBuf,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Extra environment for the hook (never the secret: that is on stdin).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

impl CommandConfig {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            timeout: None,
            env: BTreeMap::new(),
        }
    }

    pub fn timeout(&self) -> Duration {
        duration_value(self.timeout.as_deref(), DEFAULT_TIMEOUT)
    }
}

impl TargetPlugin for CommandConfig {
    fn check(&mut self, v: &mut Validator<'_>, p: Loc<'_>) {
        v.resolve_path(p.key("program"), &mut self.program);
        v.timeout(&p, &self.timeout, DEFAULT_TIMEOUT);
        let env = p.key("env");
        for k in self.env.keys() {
            let why = if k.starts_with("KEYTURN_") {
                Some("`KEYTURN_*` variables are set by keyturn for each step")
            } else if !is_env_name(k) {
                Some("use upper-case letters, digits and `_`, not starting with a digit")
            } else {
                None
            };
            if let Some(why) = why {
                v.err_key(
                    env.key(k),
                    format!("invalid environment variable `{k}`: {why}"),
                );
            }
        }
    }

    fn build(&self) -> Result<Option<Arc<dyn Target>>, PluginError> {
        Ok(Some(Arc::new(CommandTarget::new(self.clone()))))
    }
}

#[derive(Debug)]
pub struct CommandTarget {
    s: CommandConfig,
    timeout: Duration,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Set,
    Test,
    Retire,
    Revoke,
}

impl Step {
    fn as_str(self) -> &'static str {
        match self {
            Step::Set => "set",
            Step::Test => "test",
            Step::Retire => "retire",
            Step::Revoke => "revoke",
        }
    }
}

impl CommandTarget {
    pub fn new(s: CommandConfig) -> Self {
        Self {
            timeout: s.timeout(),
            s,
        }
    }

    /// Starts the hook, feeds it the secret, waits for it within the
    /// timeout and collects its stderr. Err: it could not be started.
    async fn exec(
        &self,
        step: Step,
        key: &CredentialKey,
        version: Option<VersionNo>,
        secret: Option<&SecretValue>,
    ) -> std::io::Result<Ran> {
        let mut cmd = tokio::process::Command::new(&self.s.program);
        cmd.args(&self.s.args)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
            )
            .envs(&self.s.env)
            .env("KEYTURN_STEP", step.as_str())
            .env("KEYTURN_AGENT", key.agent.as_str())
            .env("KEYTURN_CREDENTIAL", key.credential.as_str())
            .env_remove("KEYTURN_VERSION")
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own group: a timeout kills the hook and everything it started.
            .process_group(0)
            // If this future is dropped (shutdown), do not leave it running.
            .kill_on_drop(true);
        if let Some(v) = version {
            cmd.env("KEYTURN_VERSION", v.to_string());
        }
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
        let mut stdin = child.stdin.take();
        let feed = async move {
            if let (Some(w), Some(s)) = (stdin.as_mut(), secret) {
                // A hook that does not read stdin may exit first: EPIPE is fine.
                let _ = w.write_all(s.expose()).await;
                let _ = w.flush().await;
            }
            drop(stdin); // EOF
        };

        let timed_out = tokio::time::timeout(self.timeout, async {
            let _ = tokio::join!(feed, &mut exited);
        })
        .await
        .is_err();
        if timed_out {
            kill_group();
            let _ = exited.await;
        }
        // Let the readers see EOF; a leftover grandchild holding the pipes is
        // killed with the group rather than holding the step open.
        for task in [stderr_task, stdout_task].into_iter().flatten() {
            let handle = task.abort_handle();
            if tokio::time::timeout(PIPE_GRACE, task).await.is_err() {
                kill_group();
                handle.abort();
            }
        }
        // Only now is the leader reaped (and its pid free for reuse).
        let status = child.wait().await;
        let status = (!timed_out).then_some(status);
        let stderr = {
            let tail = stderr_tail.lock().unwrap_or_else(|p| p.into_inner());
            render_stderr(&tail, secret.map(|s| s.expose()).unwrap_or_default())
        };
        Ok(Ran { status, stderr })
    }

    /// Runs the hook for one step. A failure's error carries the exit status
    /// and a fixed message only: the error reaches the state database, the
    /// audit log and `keyturn status` (readable by the socket's group), and
    /// what a hook prints is not under keyturn's control. Its stderr goes to
    /// the daemon's log instead, at warn level, redacted.
    async fn run(
        &self,
        step: Step,
        key: &CredentialKey,
        version: Option<VersionNo>,
        secret: Option<&SecretValue>,
    ) -> Result<(), PluginError> {
        let ctx = match version {
            Some(v) => format!(
                "{}: {} version {v} of {key}",
                self.describe(),
                step.as_str()
            ),
            None => format!("{}: {} {key}", self.describe(), step.as_str()),
        };
        let ran = self.exec(step, key, version, secret).await.map_err(|e| {
            PluginError::new(
                ErrorKind::Invalid,
                format!("{ctx}: cannot start the hook: {e}"),
            )
        })?;
        use std::os::unix::process::ExitStatusExt;
        let (kind, what) = match ran.status {
            None => (
                ErrorKind::Transient,
                format!(
                    "timed out after {} and was killed",
                    humantime::format_duration(self.timeout)
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
        let mut message = format!("{ctx}: the hook {what}");
        if !ran.stderr.is_empty() {
            tracing::warn!(
                agent = %key.agent,
                credential = %key.credential,
                step = step.as_str(),
                hook = %self.s.program.display(),
                stderr = ?ran.stderr,
                "hook failed; the end of its stderr, secret redacted"
            );
            message.push_str(" (its stderr is in the daemon's log)");
        }
        Err(PluginError::new(kind, message))
    }
}

/// How a hook ended: `status` is None when it timed out and was killed;
/// `stderr` is the end of what it printed there, redacted.
struct Ran {
    status: Option<std::io::Result<std::process::ExitStatus>>,
    stderr: String,
}

#[async_trait]
impl Target for CommandTarget {
    fn describe(&self) -> String {
        format!("command:{}", self.s.program.display())
    }

    async fn set(
        &self,
        key: &CredentialKey,
        version: VersionNo,
        value: &SecretValue,
    ) -> Result<(), PluginError> {
        self.run(Step::Set, key, Some(version), Some(value)).await
    }

    async fn test(
        &self,
        key: &CredentialKey,
        version: VersionNo,
        value: &SecretValue,
    ) -> Result<(), PluginError> {
        self.run(Step::Test, key, Some(version), Some(value)).await
    }

    async fn retire(&self, key: &CredentialKey, previous: VersionNo) -> Result<(), PluginError> {
        self.run(Step::Retire, key, Some(previous), None).await
    }

    async fn revoke(&self, key: &CredentialKey) -> Result<(), PluginError> {
        self.run(Step::Revoke, key, None, None).await
    }

    /// Checks that the program exists and is executable; running it would be
    /// a step with side effects.
    async fn check(&self) -> Result<(), PluginError> {
        use std::os::unix::fs::PermissionsExt;
        let p = &self.s.program;
        let ctx = format!("{}: check", self.describe());
        let meta = tokio::fs::metadata(p)
            .await
            .map_err(|e| PluginError::io(&ctx, &e))?;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            return Err(PluginError::new(
                ErrorKind::Invalid,
                format!("{ctx}: {} is not an executable file", p.display()),
            ));
        }
        Ok(())
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
/// redacted wherever they appear: a hook that prints a cut-off value, one
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
fn redact(text: &[u8], secret: &[u8]) -> Vec<u8> {
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
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    fn key() -> CredentialKey {
        crate::test_support::key("hook-bot", "api")
    }

    fn script(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("hook.sh");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn target(program: PathBuf, args: Vec<String>, timeout: Duration) -> CommandTarget {
        CommandTarget::new(CommandConfig {
            args,
            timeout: Some(format!("{}ms", timeout.as_millis())),
            env: [("HOOK_MODE".to_owned(), "strict".to_owned())].into(),
            ..CommandConfig::new(program)
        })
    }

    #[tokio::test]
    async fn secret_arrives_on_stdin_only_with_the_documented_env() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        // Records argv, env and stdin per step.
        let hook = script(
            dir.path(),
            r#"d="$1/$KEYTURN_STEP"; mkdir -p "$d"
printf '%s\n' "$0" "$@" > "$d/argv"
env > "$d/env"
cat > "$d/stdin""#,
        );
        let t = target(
            hook,
            vec![out.display().to_string(), "--flag".into()],
            Duration::from_secs(10),
        );
        let canary = "canary-9b7e41d2";
        let v = SecretValue::from_string(canary.into());
        t.check().await.unwrap();
        t.set(&key(), 7, &v).await.unwrap();
        t.test(&key(), 7, &v).await.unwrap();
        t.retire(&key(), 6).await.unwrap();
        t.revoke(&key()).await.unwrap();

        let read = |step: &str, f: &str| std::fs::read_to_string(out.join(step).join(f)).unwrap();
        for (step, version, stdin) in [
            ("set", Some("7"), canary),
            ("test", Some("7"), canary),
            ("retire", Some("6"), ""),
            ("revoke", None, ""),
        ] {
            assert_eq!(read(step, "stdin"), stdin, "{step}");
            let env = read(step, "env");
            let argv = read(step, "argv");
            assert!(!env.contains(canary) && !argv.contains(canary), "{step}");
            assert!(
                argv.ends_with(&format!("{}\n--flag\n", out.display())),
                "{argv}"
            );
            let vars: Vec<&str> = env.lines().collect();
            for want in [
                format!("KEYTURN_STEP={step}"),
                "KEYTURN_AGENT=hook-bot".into(),
                "KEYTURN_CREDENTIAL=api".into(),
                "HOOK_MODE=strict".into(),
            ] {
                assert!(
                    vars.contains(&want.as_str()),
                    "{step}: {want} missing in {env}"
                );
            }
            match version {
                Some(v) => assert!(
                    vars.contains(&format!("KEYTURN_VERSION={v}").as_str()),
                    "{env}"
                ),
                None => assert!(!env.contains("KEYTURN_VERSION"), "{env}"),
            }
            assert!(vars.iter().any(|l| l.starts_with("PATH=")), "{env}");
            // The daemon's own environment does not leak through.
            assert!(
                !vars
                    .iter()
                    .any(|l| l.starts_with("HOME=") || l.starts_with("CARGO")),
                "{env}"
            );
        }
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("bg.pid");
        let hook = script(
            dir.path(),
            &format!("sleep 30 & echo $! > {}\nsleep 30", pidfile.display()),
        );
        let t = target(hook, vec![], Duration::from_millis(300));
        let started = std::time::Instant::now();
        let e = t
            .set(&key(), 1, &SecretValue::from_string("x".into()))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient, "{e}");
        assert!(e.message.contains("timed out after 300ms"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let bg: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The backgrounded grandchild died with the group (maybe a zombie
        // until its new parent reaps it).
        let gone = || match std::fs::read_to_string(format!("/proc/{bg}/stat")) {
            Err(_) => true,
            Ok(s) => s
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z')),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while !gone() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone(), "background child {bg} survived the timeout");
    }

    /// State of `/proc/<pid>`: `None` once the pid is reaped (gone).
    fn proc_state(pid: i32) -> Option<char> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        s.rsplit(')').next()?.trim_start().chars().next()
    }

    fn read_pid(path: &Path) -> Option<i32> {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// A hook that exits while a background child still holds its stderr:
    /// the child is killed with the group after the grace, and the group is
    /// killed while the hook (the group's leader) is still unreaped, so its
    /// id cannot have been handed to another process group in between.
    #[tokio::test]
    async fn a_leftover_child_is_killed_before_the_leader_is_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let leader_file = dir.path().join("leader.pid");
        let bg_file = dir.path().join("bg.pid");
        let hook = script(
            dir.path(),
            &format!(
                "cat >/dev/null; sleep 30 & echo $! > {bg}.tmp; mv {bg}.tmp {bg}\necho $$ > {l}.tmp; mv {l}.tmp {l}; exit 0",
                bg = bg_file.display(),
                l = leader_file.display()
            ),
        );
        let t = target(hook, vec![], Duration::from_secs(10));
        let started = std::time::Instant::now();
        let run = tokio::spawn(async move {
            t.set(&key(), 1, &SecretValue::from_string("x".into()))
                .await
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let leader = loop {
            if let Some(p) = read_pid(&leader_file) {
                break p;
            }
            assert!(std::time::Instant::now() < deadline, "the hook never ran");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        // Wait for the leader to exit (a zombie, or already reaped).
        while proc_state(leader).is_some_and(|s| s != 'Z') {
            assert!(
                std::time::Instant::now() < deadline,
                "the hook never exited"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Well within the pipe grace: the leader must still be unreaped.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            proc_state(leader),
            Some('Z'),
            "the hook was reaped while its group could still be signalled"
        );
        run.await.unwrap().unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(proc_state(leader), None, "reaped in the end");
        let bg = read_pid(&bg_file).unwrap();
        let gone = || proc_state(bg).is_none_or(|s| s == 'Z');
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while !gone() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone(), "the child holding stderr survived");
    }

    /// Captures what the code under test logs on this thread (the tests
    /// run on a current-thread runtime, so spawned tasks log here too).
    fn capture_logs() -> (tracing::subscriber::DefaultGuard, Arc<Mutex<Vec<u8>>>) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .finish();
        (tracing::subscriber::set_default(subscriber), buf)
    }

    struct LogSink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for LogSink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn failure_logs_redacted_stderr_and_keeps_it_out_of_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let hook = script(
            dir.path(),
            r#"s=$(cat)
echo "rejected password '$s' for $KEYTURN_AGENT" >&2
printf 'second line %s\n' "$s" >&2
exit 3"#,
        );
        let t = target(hook.clone(), vec![], Duration::from_secs(10));
        let canary = "canary-3f9d0c71";
        let (_guard, logs) = capture_logs();
        let e = t
            .set(&key(), 2, &SecretValue::from_string(canary.into()))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        // The error (state, audit, `status`) has the exit status and a fixed text.
        assert_eq!(
            e.message,
            format!(
                "command:{}: set version 2 of hook-bot/api: the hook exited with 3 \
                 (its stderr is in the daemon's log)",
                hook.display()
            )
        );
        let log = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
        assert!(!log.contains(canary), "{log}");
        let line = log
            .lines()
            .find(|l| l.contains("hook failed"))
            .unwrap_or_else(|| panic!("no hook failure in the log: {log}"));
        assert!(line.contains("WARN"), "{line}");
        assert!(
            line.contains("rejected password '[REDACTED]' for hook-bot"),
            "{line}"
        );
        assert!(line.contains("second line [REDACTED]"), "{line}");
        assert!(
            line.contains("agent=hook-bot") && line.contains("step=\"set\""),
            "{line}"
        );
    }

    #[tokio::test]
    async fn multi_line_secret_is_redacted_line_by_line() {
        let dir = tempfile::tempdir().unwrap();
        // Echo only the second line of the secret, as a parser error would.
        let hook = script(dir.path(), "sed -n 2p >&2; exit 75");
        let t = target(hook, vec![], Duration::from_secs(10));
        let v = SecretValue::from_string(
            "-----BEGIN KEY-----\nMC4CAQAwBQYDK2VwBCIEIcanary\n-----END KEY-----\n".into(),
        );
        let e = t.set(&key(), 1, &v).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient, "EX_TEMPFAIL: {e}");
        assert!(!e.message.contains("canary"), "{e}");
        let ran = t.exec(Step::Set, &key(), Some(1), Some(&v)).await.unwrap();
        assert!(!ran.stderr.contains("canary"), "{}", ran.stderr);
        assert_eq!(ran.stderr, "[REDACTED]");
    }

    #[tokio::test]
    async fn large_output_is_bounded_and_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let hook = script(
            dir.path(),
            "cat >/dev/null; head -c 2000000 /dev/zero; head -c 100000 /dev/zero | tr '\\0' a >&2; echo END >&2; exit 1",
        );
        let t = target(hook, vec![], Duration::from_secs(10));
        let pw = SecretValue::from_string("pw".into());
        let e = t.test(&key(), 1, &pw).await.unwrap_err();
        assert!(e.message.len() < 300, "{}", e.message);
        let ran = t
            .exec(Step::Test, &key(), Some(1), Some(&pw))
            .await
            .unwrap();
        let tail = &ran.stderr;
        assert!(tail.ends_with("aaaaEND"), "{}", &tail[tail.len() - 20..]);
        assert!(tail.len() < STDERR_TAIL + 300, "{}", tail.len());
    }

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

    #[tokio::test]
    async fn missing_program_is_invalid() {
        let t = target("/nonexistent/hook".into(), vec![], Duration::from_secs(1));
        let e = t
            .set(&key(), 1, &SecretValue::from_string("pw".into()))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        assert!(e.message.contains("/nonexistent/hook"), "{e}");
        assert_eq!(t.check().await.unwrap_err().kind, ErrorKind::NotFound);
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
