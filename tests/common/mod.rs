//! Test harness: runs the real `keyturn` binary against a config in a temp
//! directory, with a real NOTIFY_SOCKET the test reads, and runs CLI commands.
#![allow(dead_code)]

pub mod crash;
pub mod proxy;
// `#[apply(server_test!)]`, as in the unit tests: one definition for both
// (not every test binary uses it, as with the rest of this module).
#[allow(unused_macros)]
#[path = "../../src/test_support/server_test.rs"]
mod server_test;
#[allow(unused_imports)]
pub(crate) use server_test::server_test;

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_keyturn")
}

/// A value that must never show up in any output: tests grep for it.
pub const CANARY_PREFIX: &str = "kt_canary_";

/// `{dir}/hook.sh` with `script` in it, executable.
pub fn write_hook(env: &Env, script: &str) -> std::path::PathBuf {
    let p = env.path().join("hook.sh");
    std::fs::write(&p, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// The `[agents.NAME]` table (owner, tenant, tier) of a test agent, for a
/// config that adds its credentials after it.
pub fn agent_table(name: &str) -> String {
    agent_table_in(name, "high")
}

/// [`agent_table`] with another tier.
pub fn agent_table_in(name: &str, tier: &str) -> String {
    format!(
        "[agents.{name}]\nowner = \"alice@example.com\"\ntenant = \"acme\"\ntier = \"{tier}\"\n"
    )
}

/// A temp directory with a config whose paths all point inside it.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    daemon_extra: String,
}

impl Env {
    /// `credentials` is TOML appended after the `[daemon]`/`[vaults]` header;
    /// `{root}` in it is replaced by the delivery root and `{dir}` by the
    /// temp directory (for token files and the like the test writes there).
    /// `{dir}` is replaced in `daemon_extra` too.
    pub fn new(credentials: &str) -> Env {
        Self::with_daemon(credentials, "")
    }

    pub fn with_daemon(credentials: &str, daemon_extra: &str) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("agents");
        std::fs::create_dir_all(&root).unwrap();
        let config = dir.path().join("keyturn.toml");
        let env = Env {
            dir,
            config,
            daemon_extra: daemon_extra.to_owned(),
        };
        env.write_credentials(credentials);
        env
    }

    /// Rewrites the config with the same header and these credentials
    /// (then `Daemon::reload`, or a restart, makes the daemon read it).
    pub fn write_credentials(&self, credentials: &str) {
        let d = self.dir.path().display();
        let root = self.root();
        let text = format!(
            r#"[daemon]
state_dir = "{d}/state"
socket = "{d}/control.sock"
delivery_roots = ["{d}/agents"]
drain_timeout = "10s"
catch_up_spread = "1s"
retry = {{ initial_delay = "50ms", max_delay = "500ms", max_attempts = 3 }}
{daemon_extra}

[vaults.local]
type = "local"

{creds}
"#,
            daemon_extra = self.daemon_extra.replace("{dir}", &d.to_string()),
            creds = credentials
                .replace("{root}", &root.display().to_string())
                .replace("{dir}", &d.to_string())
        );
        std::fs::write(&self.config, text).unwrap();
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("agents")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn audit_log(&self) -> PathBuf {
        self.state_dir().join("audit.log")
    }

    /// Runs a CLI command against this config.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("KEYTURN_CONFIG")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .output()
            .expect("run keyturn")
    }

    /// [`cli`](Self::cli), asserting that the command succeeded (its stderr
    /// says why not).
    pub fn cli_ok(&self, args: &[&str]) -> Output {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "keyturn {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn start(&self) -> Daemon {
        self.start_with(&[])
    }

    /// Starts the daemon and waits for READY=1 on a test NOTIFY_SOCKET.
    pub fn start_with(&self, env: &[(&str, &str)]) -> Daemon {
        let d = self.spawn(env);
        d.wait_ready();
        d
    }

    /// Starts the daemon without waiting for READY.
    pub fn spawn(&self, env: &[(&str, &str)]) -> Daemon {
        self.spawn_command(env, |_| {})
    }

    /// [`spawn`](Self::spawn), with `adjust` applied to the command last
    /// (e.g. a `pre_exec` that sets resource limits).
    pub fn spawn_command(&self, env: &[(&str, &str)], adjust: impl FnOnce(&mut Command)) -> Daemon {
        self.spawn_inner(env, &[], None, adjust)
    }

    /// [`spawn`](Self::spawn) through `wrapper` (a sandbox: a program and
    /// its arguments, which end by running the rest of the command line):
    /// the command is `wrapper... keyturn daemon ...`. The wrapper writes
    /// the daemon's pid to `pid_file`, which [`Daemon::pid`] (and so every
    /// signal) uses, as the daemon need not be the wrapper's own process.
    pub fn spawn_wrapped(
        &self,
        env: &[(&str, &str)],
        wrapper: &[String],
        pid_file: &Path,
    ) -> Daemon {
        self.spawn_inner(env, wrapper, Some(pid_file.to_owned()), |_| {})
    }

    fn spawn_inner(
        &self,
        env: &[(&str, &str)],
        wrapper: &[String],
        pid_file: Option<PathBuf>,
        adjust: impl FnOnce(&mut Command),
    ) -> Daemon {
        let notify_path = self
            .dir
            .path()
            .join(format!("notify-{}.sock", rand_suffix()));
        let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let log = self
            .dir
            .path()
            .join(format!("daemon-{}.log", rand_suffix()));
        let log_file = std::fs::File::create(&log).unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(bin());
                cmd
            }
            None => Command::new(bin()),
        };
        cmd.args(["daemon", "--log-level", "trace", "--config"])
            .arg(&self.config)
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("KEYTURN_LOG")
            .env_remove("FAILPOINTS")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        adjust(&mut cmd);
        let child = cmd.spawn().expect("spawn keyturn daemon");
        Daemon {
            child: Some(child),
            notify,
            log,
            messages: Default::default(),
            pid_file,
        }
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

pub struct Daemon {
    child: Option<Child>,
    notify: UnixDatagram,
    pub log: PathBuf,
    messages: std::cell::RefCell<Vec<String>>,
    /// Where a wrapper wrote the daemon's pid ([`Env::spawn_wrapped`]).
    pid_file: Option<PathBuf>,
}

impl Daemon {
    /// Every sd_notify datagram received so far (reads pending ones first).
    pub fn notifications(&self) -> Vec<String> {
        self.drain_notify(Duration::from_millis(0));
        self.messages.borrow().clone()
    }

    fn drain_notify(&self, wait: Duration) {
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 4096];
        loop {
            match self.notify.recv(&mut buf) {
                Ok(n) => self
                    .messages
                    .borrow_mut()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(_) => {
                    if Instant::now() >= deadline {
                        return;
                    }
                }
            }
        }
    }

    /// Waits until a notification containing `needle` arrives.
    pub fn wait_notify(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self
                .messages
                .borrow()
                .iter()
                .any(|m| m.lines().any(|l| l == needle || l.starts_with(needle)))
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.drain_notify(Duration::from_millis(100));
        }
    }

    /// SIGHUP, and wait until the daemon is ready again (reloaded, or
    /// kept the old config).
    pub fn reload(&self) {
        let ready = |d: &Daemon| {
            d.notifications()
                .iter()
                .flat_map(|m| m.lines().map(str::to_owned).collect::<Vec<_>>())
                .filter(|l| l == "READY=1")
                .count()
        };
        let before = ready(self);
        self.signal(libc::SIGHUP);
        if wait_for(Duration::from_secs(30), || {
            (ready(self) > before).then_some(())
        })
        .is_none()
        {
            panic!(
                "daemon did not become ready after SIGHUP; log:\n{}",
                self.log_text()
            );
        }
    }

    pub fn wait_ready(&self) {
        if !self.wait_notify("READY=1", Duration::from_secs(30)) {
            panic!("daemon did not become ready; log:\n{}", self.log_text());
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        if let Some(file) = &self.pid_file {
            return wait_for(Duration::from_secs(30), || {
                std::fs::read_to_string(file).ok()?.trim().parse().ok()
            })
            .unwrap_or_else(|| panic!("the wrapper wrote no pid to {}", file.display()));
        }
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the daemon this harness started (its child, or
        // the process its wrapper named); no memory is involved.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait; asserts a clean exit.
    pub fn stop(mut self) -> String {
        self.signal(libc::SIGTERM);
        let status = self
            .wait_exit(Duration::from_secs(30))
            .expect("daemon did not stop on SIGTERM");
        let log = self.log_text();
        assert!(status.success(), "daemon exited with {status}; log:\n{log}");
        log
    }

    /// SIGKILL (the daemon, and its wrapper if any) and reap.
    pub fn kill9(self) {
        drop(self);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A wrapped daemon is not the child, and one that changed its
            // uid lost the wrapper's parent-death signal: kill it by pid.
            if let Some(pid) = self
                .pid_file
                .as_ref()
                .and_then(|f| std::fs::read_to_string(f).ok())
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                // SAFETY: kill(2) on the daemon this harness started.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` until it returns Some or the timeout passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of the environment variable `var`, which the test services
/// (`scripts/services.sh start`, its env file sourced) set; a missing one
/// fails the test saying so.
pub fn need(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: start the test services: `bash scripts/services.sh start` (or run `bash scripts/test.sh`)")
    })
}

/// The `[vaults.bao]` table of the test OpenBao at `address` (the server's
/// own, or a proxy's), its token read from `{dir}/bao-token` (see
/// [`write_bao_token`]).
pub fn bao_table(address: &str) -> String {
    format!(
        "[vaults.bao]\ntype = \"vault\"\naddress = \"{address}\"\ntoken_file = \"{{dir}}/bao-token\"\ntimeout = \"5s\"\n"
    )
}

/// Writes the test OpenBao's root token to `{dir}/bao-token` (mode 0600).
pub fn write_bao_token(env: &Env) {
    use std::os::unix::fs::PermissionsExt;
    let token = env.path().join("bao-token");
    std::fs::write(&token, need("KEYTURN_TEST_BAO_TOKEN")).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A plain client of the test OpenBao (`KEYTURN_TEST_BAO_*`), with its root token.
pub fn bao_client() -> vaultrs::client::VaultClient {
    vaultrs::client::VaultClient::new(
        vaultrs::client::VaultClientSettingsBuilder::default()
            .address(need("KEYTURN_TEST_BAO_ADDR"))
            .token(need("KEYTURN_TEST_BAO_TOKEN"))
            .build()
            .unwrap(),
    )
    .unwrap()
}

/// The Azure Key Vault stub's default `--client-id` / `--client-secret`
/// (see the stub's header), and the tenant its tokens name.
pub const STUB_CLIENT_ID: &str = "keyturn-test-client";
pub const STUB_CLIENT_SECRET: &str = "keyturn-test-secret";
pub const TENANT: &str = "00000000-0000-0000-0000-000000000001";

/// The `[vaults.NAME]` table of the test Azure Key Vault stub
/// (`KEYTURN_TEST_AZURE_*`), its client secret in `client_secret_file`.
pub fn azure_stub_table(name: &str, client_secret_file: &Path) -> String {
    let url = need("KEYTURN_TEST_AZURE_URL");
    format!(
        r#"
[vaults.{name}]
type = "azure_key_vault"
vault_url = "{url}"
auth = "client_secret"
tenant_id = "{TENANT}"
client_id = "{STUB_CLIENT_ID}"
client_secret_file = "{}"
authority_host = "{url}"
ca_file = "{}"
verify_challenge_resource = false
timeout = "10s"
"#,
        client_secret_file.display(),
        need("KEYTURN_TEST_AZURE_CA"),
    )
}

/// keyturn's vault on the test AWS (moto, `KEYTURN_TEST_AWS_ENDPOINT`), named `aws-reader`.
pub async fn aws_vault() -> keyturn::vaults::aws::AwsVault {
    keyturn::vaults::aws::AwsVault::connect(
        "aws-reader",
        &keyturn::vaults::aws::AwsConfig {
            endpoint_url: Some(need("KEYTURN_TEST_AWS_ENDPOINT")),
            region: Some("us-east-1".into()),
            ..keyturn::vaults::aws::AwsConfig::default()
        },
    )
    .await
    .unwrap()
}

/// A free loopback port (bound, then released for the daemon to listen on).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `status --json`'s credential rows.
pub fn status_json(env: &Env) -> Vec<serde_json::Value> {
    let doc = status_doc(env);
    serde_json::from_value(doc["credentials"].clone()).expect("status --json has credentials")
}

/// `status --json` whole: `{"credentials": [...], "tasks": [...]}`.
pub fn status_doc(env: &Env) -> serde_json::Value {
    let out = env.cli(&["status", "--json"]);
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

/// Reads every byte of every file below `dir` (for canary greps).
pub fn read_tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let mut buf = Vec::new();
                if let Ok(mut f) = std::fs::File::open(&p) {
                    let _ = f.read_to_end(&mut buf);
                }
                out.push((p, buf));
            }
        }
    }
    out
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `status --json`'s row for `agent/cred`.
pub fn row<'a>(rows: &'a [serde_json::Value], agent: &str, cred: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["agent"] == agent && r["credential"] == cred)
        .unwrap_or_else(|| panic!("no status row for {agent}/{cred} in {rows:?}"))
}

/// Waits (up to 30 s) until `status` shows a `last_error` containing
/// `needle` for `agent/cred`, and returns it.
pub fn wait_last_error(env: &Env, agent: &str, cred: &str, needle: &str) -> String {
    wait_for(Duration::from_secs(30), || {
        let rows = status_json(env);
        row(&rows, agent, cred)["last_error"]
            .as_str()
            .filter(|e| e.contains(needle))
            .map(str::to_owned)
    })
    .unwrap_or_else(|| panic!("no last_error with {needle:?} for {agent}/{cred} in status"))
}

/// The current version `status` shows for `agent/cred`.
pub fn version_of(env: &Env, agent: &str, cred: &str) -> Option<u64> {
    // No row yet (a reload not applied yet) is no version yet.
    status_json(env)
        .iter()
        .find(|r| r["agent"] == agent && r["credential"] == cred)
        .and_then(|r| r["version"].as_u64())
}

/// Waits until `agent/cred` is at version `v` or later.
pub fn wait_version(env: &Env, agent: &str, cred: &str, v: u64) {
    wait_for(Duration::from_secs(30), || {
        (version_of(env, agent, cred) >= Some(v)).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{agent}/{cred} never reached version {v}: {:?}",
            status_json(env)
        )
    });
}

/// The key of credential `cred` of the agent `bot`, the agent of most tests.
pub fn bot_key(cred: &str) -> keyturn::model::CredentialKey {
    keyturn::model::CredentialKey::new(
        keyturn::model::AgentId::new("bot").unwrap(),
        keyturn::model::CredentialId::new(cred).unwrap(),
    )
}

/// Waits until the only credential of `env` is at `version` in one of
/// `states` (`"idle"`: nothing runs, is parked, or waits to retire).
pub fn wait_settled(env: &Env, version: u64, states: &[&str]) {
    wait_for(Duration::from_secs(60), || {
        let rows = status_json(env);
        let r = &rows[0];
        (r["version"].as_u64() == Some(version) && states.iter().any(|s| r["state"] == *s))
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "never settled at version {version} in {states:?}: {:?}",
            status_json(env)
        )
    });
}

/// The stage of each version of `key` in the state database.
pub fn stages(env: &Env, key: &keyturn::model::CredentialKey) -> Vec<(u64, keyturn::model::Stage)> {
    use keyturn::state::StateStore;
    let state = keyturn::state::SqliteStore::open_read_only(&env.state_dir().join("state.db"))
        .expect("open state");
    state
        .versions(key)
        .unwrap()
        .into_iter()
        .map(|v| (v.version, v.stage))
        .collect()
}

/// The JSON file delivered at `relative` below the delivery root.
pub fn delivered_json(env: &Env, relative: &str) -> serde_json::Value {
    let path = env.root().join(relative);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Files left in the delivery root under the file sink's temp names
/// (`.tmp.`, `..data_tmp`): a crash's leftovers, each may hold a full secret.
pub fn temp_files(env: &Env) -> Vec<PathBuf> {
    read_tree(&env.root())
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| {
            let s = p.to_string_lossy();
            s.contains(".tmp.") || s.contains("..data_tmp")
        })
        .collect()
}

/// `keyturn audit verify` succeeds: the audit chain is intact.
pub fn audit_verifies(env: &Env, what: &str) {
    let verify = env.cli(&["audit", "verify"]);
    assert!(
        verify.status.success(),
        "{what}: audit verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

/// Every record of the audit log, parsed.
pub fn audit_records(env: &Env) -> Vec<serde_json::Value> {
    std::fs::read_to_string(env.audit_log())
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("audit records are JSON"))
        .collect()
}

/// What the local vault `name` of `env` holds for `key` (at its default
/// path): the version reference and the value. Open it only while the
/// daemon is stopped.
pub async fn local_vault_value(
    env: &Env,
    name: &str,
    key: &keyturn::model::CredentialKey,
    select: keyturn::vaults::Select<'_>,
) -> Option<(String, Vec<u8>)> {
    let path = format!("agents/{}/{}", key.agent, key.credential);
    local_vault_value_at(env, name, key, &path, select).await
}

/// [`local_vault_value`] at `path` in the vault.
pub async fn local_vault_value_at(
    env: &Env,
    name: &str,
    key: &keyturn::model::CredentialKey,
    path: &str,
    select: keyturn::vaults::Select<'_>,
) -> Option<(String, Vec<u8>)> {
    use keyturn::vaults::Vault;
    let state = env.state_dir();
    let key_file = state.join(format!("{name}-vault.key"));
    let vault_key = keyturn::vaults::local::load_key(
        &key_file,
        &format!("keyturn-{name}-vault-key"),
        false,
        None,
    )
    .expect("vault key");
    let vault =
        keyturn::vaults::local::LocalVault::open(name, &state.join("vaults").join(name), vault_key)
            .expect("open vault");
    let item = keyturn::vaults::VaultItem { key, path };
    vault
        .read(item, select)
        .await
        .expect("vault read")
        .map(|v| (v.version.0, v.value.expose().to_vec()))
}

/// `GET path` on the daemon's HTTP listener at `port`: the whole response,
/// head and body.
pub fn http_get(port: u16, path: &str) -> String {
    http_get_with(port, path, "")
}

/// [`http_get`] with `headers` (each line ending in CRLF) in the request.
pub fn http_get_with(port: u16, path: &str, headers: &str) -> String {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Runs `f` on a fresh single-threaded runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// An env for task tests: the agent `bot` (uid and gid 4242, tenant
/// `acme`), then `config` (issuers, policies; it may start with more keys
/// of `bot`'s table), tasks delivered under `{dir}/agents/tasks`, and
/// `daemon_extra` lines in `[daemon]`.
pub fn task_env(config: &str, daemon_extra: &str) -> Env {
    Env::with_daemon(
        &format!("{}uid = 4242\ngid = 4242\n{config}", agent_table("bot")),
        &format!("task_root = \"{{dir}}/agents/tasks\"\n{daemon_extra}"),
    )
}

/// `keyturn` run as `uid` (and gid), with no supplementary groups, against
/// `socket` and no config file: `args`, then `--socket` and `--config`.
pub fn cli_as_uid(uid: u32, args: &[&str], socket: &Path) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .args(["--clear-groups", "--"])
        .arg(bin())
        .args(args)
        .arg("--socket")
        .arg(socket)
        .args(["--config", "/nonexistent.toml"])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `keyturn task start --as bot` for tenant `acme` (use case `month-end`,
/// run `run-77`, initiator alice) at `sensitivity`, with `extra`
/// arguments: the JSON answer.
pub fn start_bot_task(env: &Env, sensitivity: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = bot_task_args(sensitivity);
    args.extend_from_slice(extra);
    let out = env.cli_ok(&args);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `keyturn task end --as bot id`, checked to answer that the task ended:
/// the JSON answer.
pub fn end_bot_task(env: &Env, id: &str) -> serde_json::Value {
    let out = env.cli_ok(&["task", "end", "--as", "bot", id]);
    let ended: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ended["state"], "ended", "{ended}");
    ended
}

/// The arguments of [`start_bot_task`], for a test that expects a refusal.
pub fn bot_task_args(sensitivity: &str) -> Vec<&str> {
    vec![
        "task",
        "start",
        "--as",
        "bot",
        "--tenant",
        "acme",
        "--use-case",
        "month-end",
        "--run-id",
        "run-77",
        "--initiator",
        "alice@example.com",
        "--sensitivity",
        sensitivity,
    ]
}

/// Starts the PagerDuty Events v2 stub (tests/stubs/) on a free port: its
/// process and base URL.
pub fn start_pagerduty_stub() -> (Child, String) {
    use std::io::{BufRead, BufReader};
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/stubs/pagerduty_events_stub.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args(["--host", "127.0.0.1", "--port", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the PagerDuty stub");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("stub said {line:?}"));
    let base = format!("http://127.0.0.1:{port}");
    (child, base)
}

/// Makes `cmd` run with an open-files limit of `soft` (`hard` at most).
pub fn limit_open_files(cmd: &mut Command, soft: u64, hard: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Copies the files of `dir` whose names start with `prefix` into `to`
/// (created): a database and its `-wal`/`-shm`, with the daemon stopped.
pub fn copy_db_files(dir: &std::path::Path, prefix: &str, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in std::fs::read_dir(dir).unwrap().flatten() {
        if f.file_name().to_string_lossy().starts_with(prefix) {
            std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
        }
    }
}

/// Replaces the files of `dir` starting with `prefix` by those of `from`.
pub fn restore_db_files(dir: &std::path::Path, prefix: &str, from: &std::path::Path) {
    for f in std::fs::read_dir(dir).unwrap().flatten() {
        if f.file_name().to_string_lossy().starts_with(prefix) {
            std::fs::remove_file(f.path()).unwrap();
        }
    }
    copy_db_files(from, prefix, dir);
}
