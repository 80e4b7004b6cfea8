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
//!   it. The runner and its redaction are shared with the `exec` sink: see
//!   [`crate::process`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{Target, TargetPlugin};
use crate::config::validate::{Loc, Validator, duration_value};
use crate::model::{CredentialKey, PluginError, SecretValue, VersionNo};
use crate::process::{self, Ran};

pub use crate::process::EX_TEMPFAIL;

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

    /// The same program, arguments and environment: the same system (the
    /// timeout does not move the value).
    pub fn same_place(&self, other: &CommandConfig) -> bool {
        self.program == other.program && self.args == other.args && self.env == other.env
    }
}

impl TargetPlugin for CommandConfig {
    fn check(&mut self, v: &mut Validator<'_>, p: Loc<'_>) {
        v.resolve_path(p.key("program"), &mut self.program);
        v.timeout(&p, &self.timeout, DEFAULT_TIMEOUT);
        process::check_command(v, p, &self.program, &self.args, &self.env);
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
        let mut cmd = process::command(&self.s.program, &self.s.args, &self.s.env);
        cmd.env("KEYTURN_STEP", step.as_str())
            .env("KEYTURN_AGENT", key.agent.as_str())
            .env("KEYTURN_CREDENTIAL", key.credential.as_str())
            .env_remove("KEYTURN_VERSION");
        if let Some(v) = version {
            cmd.env("KEYTURN_VERSION", v.to_string());
        }
        let secret = secret.map(SecretValue::expose);
        process::run(cmd, secret, secret.unwrap_or_default(), self.timeout).await
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
        process::refuse_untrusted(&ctx, &self.s.program)?;
        let ran = self.exec(step, key, version, secret).await;
        process::outcome(ran, self.timeout, &ctx, "hook", |stderr| {
            tracing::warn!(
                agent = %key.agent,
                credential = %key.credential,
                step = step.as_str(),
                hook = %self.s.program.display(),
                stderr = ?stderr,
                "hook failed; the end of its stderr, secret redacted"
            );
        })
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
        let ctx = format!("{}: check", self.describe());
        process::check_executable(&ctx, &self.s.program).await
    }

    fn check_caveat(&self) -> Option<&'static str> {
        Some("the program is executable; not run (running it is a step that changes the target)")
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::model::ErrorKind;
    use crate::test_support::{died, proc_state, shell_script};
    use std::path::Path;

    fn key() -> CredentialKey {
        crate::test_support::key("hook-bot", "api")
    }

    fn script(dir: &Path, body: &str) -> PathBuf {
        shell_script(dir, "hook.sh", body)
    }

    fn target(program: PathBuf, args: Vec<String>, timeout: Duration) -> CommandTarget {
        CommandTarget::new(CommandConfig {
            args,
            timeout: Some(format!("{}ms", timeout.as_millis())),
            env: [("HOOK_MODE".to_owned(), "strict".to_owned())].into(),
            ..CommandConfig::new(program)
        })
    }

    /// Black-box finding: a hook of mode 0777 (or in a directory every
    /// user can write) was run as root with the secret on its stdin.
    #[tokio::test]
    async fn a_hook_another_user_could_change_is_not_run() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ran = dir.path().join("ran");
        let hook = script(dir.path(), &format!("touch {}", ran.display()));
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o777)).unwrap();
        let t = target(hook.clone(), vec![], Duration::from_secs(10));
        let v = SecretValue::from_string("canary-untrusted".into());
        let err = t.set(&key(), 1, &v).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid);
        assert!(
            err.message.contains("not run") && err.message.contains("mode 0777"),
            "{err}"
        );
        let err = t.check().await.unwrap_err();
        assert!(err.message.contains("mode 0777"), "{err}");
        assert!(!ran.exists(), "the hook ran");
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        t.set(&key(), 1, &v).await.unwrap();
        assert!(ran.exists());
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

    /// Defect: a step dropped at shutdown (past `drain_timeout`) killed
    /// the hook but not what it started, which went on to apply a value
    /// after the daemon was gone. The whole group goes.
    #[tokio::test]
    async fn a_dropped_step_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("bg.pid");
        let hook = script(
            dir.path(),
            &format!(
                "cat >/dev/null\nsleep 30 & echo $! > {}\nwait",
                pidfile.display()
            ),
        );
        let t = target(hook, vec![], Duration::from_secs(60));
        let (k, value) = (key(), SecretValue::from_string("x".into()));
        let set = t.set(&k, 1, &value);
        let dropped = tokio::time::timeout(Duration::from_millis(500), set).await;
        assert!(dropped.is_err(), "the step was still running");
        let bg: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(died(bg).await, "background child {bg} survived the drop");
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
        assert!(died(bg).await, "background child {bg} survived the timeout");
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
        assert!(died(bg).await, "the child holding stderr survived");
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
        let (_guard, logs) = crate::test_support::capture_logs();
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
        assert!(tail.len() < process::STDERR_TAIL + 300, "{}", tail.len());
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
}
