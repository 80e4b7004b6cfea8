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
//!   pipe). The last ~2 KiB of stderr go into the error message, with every
//!   occurrence of the secret — and of each of its lines, for multi-line
//!   values such as PEM keys — replaced by `[REDACTED]`.

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
/// Lines of a multi-line secret shorter than this are not redacted on their
/// own: a line like `-----` or `}` would shred the message and reveals nothing.
const MIN_REDACTED_LINE: usize = 8;
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
        let mut child = cmd.spawn().map_err(|e| {
            PluginError::new(
                ErrorKind::Invalid,
                format!("{ctx}: cannot start the hook: {e}"),
            )
        })?;
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
        let with_stderr = |m: String| {
            if stderr.is_empty() {
                m
            } else {
                format!("{m}; stderr: {stderr}")
            }
        };

        let status = match status {
            None => {
                return Err(PluginError::new(
                    ErrorKind::Transient,
                    with_stderr(format!(
                        "{ctx}: the hook timed out after {} and was killed",
                        humantime::format_duration(self.timeout)
                    )),
                ));
            }
            Some(Err(e)) => {
                return Err(PluginError::new(
                    ErrorKind::Transient,
                    format!("{ctx}: waiting for the hook: {e}"),
                ));
            }
            Some(Ok(status)) => status,
        };
        if status.success() {
            return Ok(());
        }
        use std::os::unix::process::ExitStatusExt;
        let (kind, what) = match (status.code(), status.signal()) {
            (Some(EX_TEMPFAIL), _) => (
                ErrorKind::Transient,
                format!("exited with {EX_TEMPFAIL} (EX_TEMPFAIL)"),
            ),
            (Some(code), _) => (ErrorKind::Invalid, format!("exited with {code}")),
            (None, Some(sig)) => (ErrorKind::Transient, format!("was killed by signal {sig}")),
            (None, None) => (ErrorKind::Transient, format!("ended with {status}")),
        };
        Err(PluginError::new(
            kind,
            with_stderr(format!("{ctx}: the hook {what}")),
        ))
    }
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
        // The window may start inside an occurrence that redaction would no
        // longer recognise: drop as much as a secret is long.
        kept = &kept[secret.len().min(kept.len())..];
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

/// Replaces every occurrence of `secret`, and of each of its lines that is at
/// least [`MIN_REDACTED_LINE`] bytes long, with `[REDACTED]`.
fn redact(text: &[u8], secret: &[u8]) -> Vec<u8> {
    if secret.is_empty() {
        return text.to_vec();
    }
    let mut needles: Vec<&[u8]> = vec![secret];
    for line in secret.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let line = line.trim_ascii();
        if line.len() >= MIN_REDACTED_LINE && !needles.contains(&line) {
            needles.push(line);
        }
    }
    // Longest first, so the whole secret goes before its parts.
    needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
    let mut out = text.to_vec();
    for n in needles {
        out = replace_all(&out, n, b"[REDACTED]");
    }
    out
}

fn replace_all(hay: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
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

    #[tokio::test]
    async fn failure_carries_redacted_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let hook = script(
            dir.path(),
            r#"s=$(cat)
echo "rejected password '$s' for $KEYTURN_AGENT" >&2
printf 'second line %s\n' "$s" >&2
exit 3"#,
        );
        let t = target(hook, vec![], Duration::from_secs(10));
        let canary = "canary-3f9d0c71";
        let e = t
            .set(&key(), 2, &SecretValue::from_string(canary.into()))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        assert!(!e.message.contains(canary), "{e}");
        assert!(
            e.message
                .contains("rejected password '[REDACTED]' for hook-bot"),
            "{e}"
        );
        assert!(e.message.contains("second line [REDACTED]"), "{e}");
        assert!(e.message.contains("exited with 3"), "{e}");
        assert!(e.message.contains("set version 2 of hook-bot/api"), "{e}");
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
        assert!(e.message.contains("[REDACTED]"), "{e}");
    }

    #[tokio::test]
    async fn large_output_is_bounded_and_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let hook = script(
            dir.path(),
            "cat >/dev/null; head -c 2000000 /dev/zero; head -c 100000 /dev/zero | tr '\\0' a >&2; echo END >&2; exit 1",
        );
        let t = target(hook, vec![], Duration::from_secs(10));
        let e = t
            .test(&key(), 1, &SecretValue::from_string("pw".into()))
            .await
            .unwrap_err();
        assert!(
            e.message.ends_with("aaaaEND"),
            "{}",
            &e.message[e.message.len() - 20..]
        );
        assert!(e.message.len() < STDERR_TAIL + 300, "{}", e.message.len());
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
        t2.truncated = false;
        assert!(render_stderr(&t2, b"SECRETVALUE1").contains("CRETVALUE1"));
        assert!(tail.truncated && tail.buf.len() <= 2 * STDERR_WINDOW);
    }
}
