//! `exec`: runs a program after each delivery, telling it what was delivered.
//!
//! `deliver = [{ type = "exec", program = "/usr/local/bin/reload-bot", args = [...],
//! timeout = "30s", stdin_value = false, env = { ... } }]`
//!
//! The contract with the program (the runner is the `command` target's, see
//! [`crate::process`]):
//! - It is run as `program args...`, in `/`, in its own process group, with
//!   a cleared environment: `PATH` (the daemon's), the configured `env`, and
//!   the notice: `KEYTURN_AGENT`, `KEYTURN_CREDENTIAL`, `KEYTURN_TENANT`,
//!   `KEYTURN_OWNER`, `KEYTURN_VERSION`, `KEYTURN_ROTATION` (the rotation id),
//!   `KEYTURN_ROTATED_AT` (RFC 3339) and, when there is one,
//!   `KEYTURN_LOGIN` (the target decides it), `KEYTURN_PREVIOUS_VERSION`,
//!   `KEYTURN_GRACE_UNTIL` (RFC 3339) and `KEYTURN_FILE` (the path another
//!   sink of the credential delivered to). keyturn's variables win over
//!   configured ones.
//! - The value is never in argv or the environment (other local users can
//!   read both via /proc). With `stdin_value = true` it arrives on stdin,
//!   followed by EOF; otherwise stdin is `/dev/null`.
//! - Exit 0: the delivery is [`Delivered::Acknowledged`] (the program ran
//!   and is the agent's way of taking the value; nothing awaits an ack from
//!   it, see `rotation/acks.rs`). Exit 75 (`EX_TEMPFAIL`),
//!   death by a signal and a timeout are transient (the engine retries);
//!   any other status is `invalid`. On timeout the whole group is killed.
//! - The error carries only how the program ended; the end of its stderr
//!   goes to the daemon's log at warn level with the value redacted (even
//!   without `stdin_value`: the program may read a delivered file).
//!
//! Put it after the sinks it reacts to: sinks deliver in order, and a
//! failed one stops the rest until the engine retries.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{Delivered, Notice, Sink, SinkContext, SinkPlugin};
use crate::config::validate::{Loc, SinkScope, Validator, duration_value};
use crate::model::{CredentialKey, PluginError, SecretValue};
use crate::process;

/// Default time the program may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// One `deliver = [{ type = "exec", ... }]` entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    /// Absolute, or relative to the config file's directory.
    pub program: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    pub timeout: Option<String>,
    /// Write the value to the program's stdin (default: stdin is /dev/null).
    #[serde(default)]
    pub stdin_value: bool,
    /// Extra environment (never the value).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

impl ExecConfig {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            timeout: None,
            stdin_value: false,
            env: BTreeMap::new(),
        }
    }
}

impl SinkPlugin for ExecConfig {
    fn check(&mut self, v: &mut Validator<'_>, p: Loc<'_>, _scope: &mut SinkScope<'_, '_>) {
        v.resolve_path(p.key("program"), &mut self.program);
        v.timeout(&p, &self.timeout, DEFAULT_TIMEOUT);
        process::check_command(v, p, &self.program, &self.args, &self.env);
    }

    fn build(self: Box<Self>, _ctx: &SinkContext<'_>) -> Result<Arc<dyn Sink>, PluginError> {
        Ok(Arc::new(ExecSink {
            timeout: duration_value(self.timeout.as_deref(), DEFAULT_TIMEOUT),
            s: *self,
        }))
    }
}

#[derive(Debug)]
pub struct ExecSink {
    s: ExecConfig,
    timeout: Duration,
}

#[async_trait]
impl Sink for ExecSink {
    fn kind(&self) -> &'static str {
        "exec"
    }

    fn describe(&self) -> String {
        format!("exec:{}", self.s.program.display())
    }

    async fn deliver(
        &self,
        notice: &Notice,
        value: &SecretValue,
    ) -> Result<Delivered, PluginError> {
        let key = &notice.key;
        let ctx = format!(
            "{}: deliver version {} of {key}",
            self.describe(),
            notice.version
        );
        process::refuse_untrusted(&ctx, &self.s.program)?;
        let mut cmd = process::command(&self.s.program, &self.s.args, &self.s.env);
        cmd.env("KEYTURN_AGENT", key.agent.as_str())
            .env("KEYTURN_CREDENTIAL", key.credential.as_str())
            .env("KEYTURN_TENANT", &notice.tenant)
            .env("KEYTURN_OWNER", &notice.owner)
            .env("KEYTURN_VERSION", notice.version.to_string())
            .env("KEYTURN_ROTATION", notice.rotation.as_str())
            .env("KEYTURN_ROTATED_AT", notice.rotated_at.to_rfc3339())
            .env_remove("KEYTURN_LOGIN")
            .env_remove("KEYTURN_PREVIOUS_VERSION")
            .env_remove("KEYTURN_GRACE_UNTIL")
            .env_remove("KEYTURN_FILE");
        if let Some(login) = &notice.login {
            cmd.env("KEYTURN_LOGIN", login);
        }
        if let Some(previous) = notice.previous_version {
            cmd.env("KEYTURN_PREVIOUS_VERSION", previous.to_string());
        }
        if let Some(until) = notice.grace_until {
            cmd.env("KEYTURN_GRACE_UNTIL", until.to_rfc3339());
        }
        if let Some(file) = &notice.file {
            cmd.env("KEYTURN_FILE", file);
        }
        let stdin = self.s.stdin_value.then(|| value.expose());
        let ran = process::run(cmd, stdin, value.expose(), self.timeout).await;
        process::outcome(ran, self.timeout, &ctx, "program", |stderr| {
            tracing::warn!(
                agent = %key.agent,
                credential = %key.credential,
                version = notice.version,
                program = %self.s.program.display(),
                stderr = ?stderr,
                "exec sink failed; the end of its stderr, value redacted"
            );
        })?;
        Ok(Delivered::Acknowledged)
    }

    /// Nothing was placed anywhere.
    async fn retract(&self, _key: &CredentialKey) -> Result<(), PluginError> {
        Ok(())
    }

    /// The program exists and is executable (running it would be a delivery).
    async fn preflight(&self) -> Result<(), PluginError> {
        let ctx = format!("{}: preflight", self.describe());
        process::check_executable(&ctx, &self.s.program).await
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use chrono::TimeZone;

    use super::*;
    use crate::model::{ErrorKind, RotationId, ValueKind};
    use crate::test_support::{died, shell_script};

    fn notice() -> Notice {
        Notice {
            key: crate::test_support::key("exec-bot", "api"),
            tenant: "acme".into(),
            owner: "alice@example.com".into(),
            version: 7,
            previous_version: Some(6),
            rotation: RotationId::parse(&format!("{:032x}", 7)).unwrap(),
            rotated_at: chrono::Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
            expires_hint: None,
            kind: ValueKind::Password,
            public: None,
            login: Some("bot_b".into()),
            grace_until: Some(chrono::Utc.with_ymd_and_hms(2026, 1, 2, 3, 19, 5).unwrap()),
            file: Some("/run/keyturn/agents/exec-bot/api".into()),
        }
    }

    fn script(dir: &Path, body: &str) -> PathBuf {
        shell_script(dir, "on-delivery.sh", body)
    }

    fn sink(
        program: PathBuf,
        args: Vec<String>,
        timeout: &str,
        stdin_value: bool,
    ) -> Arc<dyn Sink> {
        Box::new(ExecConfig {
            args,
            timeout: Some(timeout.into()),
            stdin_value,
            env: [("MODE".to_owned(), "reload".to_owned())].into(),
            ..ExecConfig::new(program)
        })
        .build(&SinkContext {
            delivery_roots: &[],
            uid: None,
            gid: None,
            former_uid: None,
            reader: None,
        })
        .unwrap()
    }

    fn wait_for_file(p: &Path) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(s) = std::fs::read_to_string(p)
                && s.ends_with('\n')
            {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} never written",
                p.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The program sees the notice in its environment and the value only on
    /// stdin, only when asked; /proc shows the value in neither its
    /// environment nor its command line while it runs.
    #[tokio::test]
    async fn notice_in_env_value_on_stdin_only_when_asked_never_in_proc() {
        let canary = "canary-5e0c2a9b";
        for stdin_value in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path().display().to_string();
            let program = script(
                dir.path(),
                r#"echo $$ > "$1/pid.tmp"; mv "$1/pid.tmp" "$1/pid"
while [ ! -e "$1/go" ]; do sleep 0.02; done
env > "$1/env"; readlink /proc/$$/fd/0 > "$1/fd0"; cat > "$1/stdin""#,
            );
            let s = sink(program.clone(), vec![d.clone()], "10s", stdin_value);
            s.preflight().await.unwrap();
            let value = SecretValue::from_string(canary.into());
            let n = notice();
            let run = tokio::spawn(async move { s.deliver(&n, &value).await });
            let pid = tokio::task::spawn_blocking({
                let p = dir.path().join("pid");
                move || wait_for_file(&p)
            })
            .await
            .unwrap();
            let pid = pid.trim();
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
            let environ = String::from_utf8_lossy(&environ).replace('\0', "\n");
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            assert!(environ.contains("KEYTURN_AGENT=exec-bot"), "{environ}");
            assert!(!environ.contains(canary), "{environ}");
            assert!(
                cmdline.contains(&d) && !cmdline.contains(canary),
                "{cmdline}"
            );
            std::fs::write(dir.path().join("go"), "").unwrap();
            assert_eq!(run.await.unwrap().unwrap(), Delivered::Acknowledged);

            let env = std::fs::read_to_string(dir.path().join("env")).unwrap();
            let vars: Vec<&str> = env.lines().collect();
            for want in [
                "KEYTURN_AGENT=exec-bot",
                "KEYTURN_CREDENTIAL=api",
                "KEYTURN_TENANT=acme",
                "KEYTURN_OWNER=alice@example.com",
                "KEYTURN_VERSION=7",
                "KEYTURN_ROTATION=00000000000000000000000000000007",
                "KEYTURN_ROTATED_AT=2026-01-02T03:04:05+00:00",
                "KEYTURN_LOGIN=bot_b",
                "KEYTURN_PREVIOUS_VERSION=6",
                "KEYTURN_GRACE_UNTIL=2026-01-02T03:19:05+00:00",
                "KEYTURN_FILE=/run/keyturn/agents/exec-bot/api",
                "MODE=reload",
            ] {
                assert!(vars.contains(&want), "{want} missing in {env}");
            }
            assert!(vars.iter().any(|l| l.starts_with("PATH=")), "{env}");
            assert!(
                !vars
                    .iter()
                    .any(|l| l.starts_with("HOME=") || l.starts_with("CARGO")),
                "the daemon's environment leaked: {env}"
            );
            assert!(!env.contains(canary), "{env}");
            let stdin = std::fs::read_to_string(dir.path().join("stdin")).unwrap();
            let want = if stdin_value { canary } else { "" };
            assert_eq!(stdin, want, "stdin_value = {stdin_value}");
            let fd0 = std::fs::read_to_string(dir.path().join("fd0")).unwrap();
            assert_eq!(
                fd0.trim() == "/dev/null",
                !stdin_value,
                "stdin is /dev/null exactly when the value is not sent: {fd0}"
            );
        }
    }

    #[tokio::test]
    async fn timeout_kills_the_programs_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let bg_file = dir.path().join("bg.pid");
        let program = script(
            dir.path(),
            &format!(
                "sleep 30 & echo $! > {b}.tmp; mv {b}.tmp {b}\nsleep 30",
                b = bg_file.display()
            ),
        );
        let s = sink(program, vec![], "300ms", false);
        let started = std::time::Instant::now();
        let e = s
            .deliver(&notice(), &SecretValue::from_string("x".into()))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient, "{e}");
        assert!(
            e.message.contains("timed out after 300ms and was killed"),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        let bg: i32 = wait_for_file(&bg_file).trim().parse().unwrap();
        assert!(
            died(bg).await,
            "the program's background child survived the timeout"
        );
    }

    /// A failing program: the error says how it ended and nothing it printed;
    /// the stderr tail is in the log with the value redacted, even though
    /// the value was not on stdin (it read the delivered file, say).
    #[tokio::test]
    async fn failure_says_how_it_ended_and_logs_stderr_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let canary = "canary-71d3e8f0";
        std::fs::write(dir.path().join("delivered"), canary).unwrap();
        let program = script(
            dir.path(),
            &format!(
                "echo \"reload refused: $(cat {}) is stale\" >&2; exit \"$1\"",
                dir.path().join("delivered").display()
            ),
        );
        let (_guard, buf) = crate::test_support::capture_logs();
        let value = SecretValue::from_string(canary.into());
        for (code, kind) in [("3", ErrorKind::Invalid), ("75", ErrorKind::Transient)] {
            let s = sink(program.clone(), vec![code.into()], "10s", false);
            let e = s.deliver(&notice(), &value).await.unwrap_err();
            assert_eq!(e.kind, kind, "{e}");
            let tempfail = if code == "75" { " (EX_TEMPFAIL)" } else { "" };
            assert_eq!(
                e.message,
                format!(
                    "exec:{}: deliver version 7 of exec-bot/api: the program exited with {code}{tempfail} \
                     (its stderr is in the daemon's log)",
                    program.display()
                )
            );
        }
        let log = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        assert!(!log.contains(canary), "{log}");
        let line = log
            .lines()
            .find(|l| l.contains("exec sink failed"))
            .unwrap_or_else(|| panic!("no failure in the log: {log}"));
        assert!(
            line.contains("WARN") && line.contains("agent=exec-bot"),
            "{line}"
        );
        assert!(
            line.contains("reload refused: [REDACTED] is stale"),
            "{line}"
        );
    }

    #[tokio::test]
    async fn a_missing_program_fails_preflight_and_delivery() {
        let s = sink("/nonexistent/reload".into(), vec![], "1s", false);
        assert_eq!(s.preflight().await.unwrap_err().kind, ErrorKind::NotFound);
        let e = s
            .deliver(&notice(), &SecretValue::from_string("pw".into()))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        assert!(e.message.contains("cannot start the program"), "{e}");
    }
}
