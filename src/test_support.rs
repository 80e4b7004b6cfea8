//! Helpers the unit tests of several modules share (compiled for tests only).

use chrono::{DateTime, Utc};

use crate::model::{AgentId, CredentialId, CredentialKey, SecretValue};
use crate::state::CredentialRow;

// Shared with the tests under `tests/` (`tests/common/mod.rs`).
mod server_test;
pub(crate) use server_test::server_test;
mod stall_proxy;
pub(crate) use stall_proxy::StallProxy;

/// The key of `agent`'s credential `credential` (both valid ids).
pub(crate) fn key(agent: &str, credential: &str) -> CredentialKey {
    CredentialKey::new(
        AgentId::new(agent).unwrap(),
        CredentialId::new(credential).unwrap(),
    )
}

/// The `[agents.NAME]` table (owner, tenant, tier) of a test agent, for a
/// config that adds its credentials after it.
pub(crate) fn agent_table(name: &str) -> String {
    format!("[agents.{name}]\nowner = \"alice@example.com\"\ntenant = \"acme\"\ntier = \"high\"\n")
}

/// `ms` milliseconds after a fixed instant (in 2027): a test clock at the
/// precision the engine keeps.
pub(crate) fn at_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_800_000_000_000 + ms).unwrap()
}

/// [`at_ms`] in whole seconds.
pub(crate) fn at_secs(s: i64) -> DateTime<Utc> {
    at_ms(s * 1000)
}

pub(crate) fn secret(s: &str) -> SecretValue {
    SecretValue::from_string(s.to_owned())
}

/// A test that needs root fails without it, rather than passing without
/// having checked anything: CI runs the suite as root.
pub(crate) fn assert_root(what_needs_it: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "{what_needs_it} needs root (as CI runs the suite)"
    );
}

/// `chattr FLAG PATH` (e2fsprogs), as root: `+i` makes a file immutable
/// (every write and truncate fails), `-i` undoes it.
pub(crate) fn chattr(flag: &str, path: &std::path::Path) {
    assert_root("chattr");
    let out = std::process::Command::new("chattr")
        .arg(flag)
        .arg(path)
        .output()
        .expect("chattr (e2fsprogs) is installed");
    assert!(out.status.success(), "chattr {flag}: {out:?}");
}

/// A credential's state row with every field set (timestamps at the
/// millisecond precision the engine keeps).
pub(crate) fn credential_row(k: &CredentialKey) -> CredentialRow {
    CredentialRow {
        key: k.clone(),
        current_version: Some(3),
        last_rotated_at: Some(at_ms(1_000)),
        next_due: Some(at_ms(21_600_456)),
        consecutive_failures: 2,
        failing_since: Some(at_ms(7_000)),
        last_error: Some("vault bao: connection refused".into()),
    }
}

/// Captures what the code under test logs on this thread (the tests
/// run on a current-thread runtime, so spawned tasks log here too).
pub(crate) fn capture_logs() -> (
    tracing::subscriber::DefaultGuard,
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) {
    let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || LogSink(sink.clone()))
        .finish();
    (tracing::subscriber::set_default(subscriber), buf)
}

struct LogSink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes `body` as an executable `#!/bin/sh` script `dir/name`.
pub(crate) fn shell_script(dir: &std::path::Path, name: &str, body: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// State of `/proc/<pid>`: `None` once the pid is reaped (gone).
pub(crate) fn proc_state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit(')').next()?.trim_start().chars().next()
}

/// Whether process `pid` died within 3 s (reaped, or a zombie until its
/// new parent reaps it).
pub(crate) async fn died(pid: i32) -> bool {
    let gone = || proc_state(pid).is_none_or(|s| s == 'Z');
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while !gone() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    gone()
}

/// An Ed25519 keypair as the generator makes it: PKCS#8 PEM private, SPKI
/// PEM public.
pub(crate) struct Pair {
    pub private: SecretValue,
    pub public: String,
}

pub(crate) fn pair() -> Pair {
    let g = crate::generators::generate(&crate::config::GeneratorConfig::Ed25519).unwrap();
    Pair {
        private: g.value,
        public: g.public.unwrap(),
    }
}

/// The role id and a fresh secret id of the AppRole `keyturn` at `mount`.
pub(crate) async fn approle_ids(
    root: &vaultrs::client::VaultClient,
    mount: &str,
) -> (String, String) {
    let role_id = vaultrs::auth::approle::role::read_id(root, mount, "keyturn")
        .await
        .unwrap()
        .role_id;
    let secret_id = vaultrs::auth::approle::role::secret::generate(root, mount, "keyturn", None)
        .await
        .unwrap()
        .secret_id;
    (role_id, secret_id)
}

/// Reads until the peer closes the connection; panics if it does not
/// within `within`.
pub(crate) async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    within: std::time::Duration,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server must close the connection");
}
