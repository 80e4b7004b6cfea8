//! The token service seen by an independent client (issue 16's acceptance):
//! `tests/oauth_client/client.py`, written in Python against the RFCs with
//! PyJWT and authlib, which share no code with keyturn, talks to the real
//! daemon over HTTP. It discovers the endpoints (RFC 8414), exchanges a
//! human's token for a delegated one (RFC 8693) authenticating with two
//! RFC 7523 assertions signed by the agent's delivered key, and validates
//! the issued token against the JWKS; then keyturn rotates the signing key
//! and the old token still validates while a new one carries the new `kid`;
//! then introspection (RFC 7662) and revocation (RFC 7009); then the agent
//! is decommissioned and its live token is inactive at once, the
//! decommission's `tokens` item verified within the SLA. No token may
//! appear in the daemon's output, the audit log or the state files.
//!
//! Needs the Python of the test services' venv (`KEYTURN_TEST_PYTHON`,
//! from `scripts/services.sh start`, which installs PyJWT and authlib).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;

const IDP: &str = "https://idp.corp.test";
const API: &str = "https://api.example.test";
/// Tenant `partner`'s identity provider; the tenant has its own signing key.
const PARTNER_IDP: &str = "https://idp.partner.test";

/// Runs the client; every output is kept for the canary grep.
struct Client {
    python: String,
    script: PathBuf,
    outputs: Vec<u8>,
    /// The daemon's output, whose end a failure shows.
    daemon_log: Option<PathBuf>,
}

impl Client {
    fn new() -> Client {
        let python = need("KEYTURN_TEST_PYTHON");
        // Never a silent skip: a venv without the libraries is a setup error.
        let probe = Command::new(&python)
            .args(["-c", "import jwt, authlib, joserfc, cryptography"])
            .output()
            .unwrap_or_else(|e| panic!("run {python}: {e}"));
        assert!(
            probe.status.success(),
            "{python} lacks PyJWT or authlib: run `bash scripts/services.sh start` (it installs them into its venv): {}",
            String::from_utf8_lossy(&probe.stderr)
        );
        Client {
            python,
            script: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oauth_client/client.py"),
            outputs: Vec::new(),
            daemon_log: None,
        }
    }

    fn run(&mut self, args: &[&str]) -> Output {
        let out = Command::new(&self.python)
            .arg(&self.script)
            .args(args)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .output()
            .expect("run client.py");
        self.outputs.extend_from_slice(&out.stdout);
        self.outputs.extend_from_slice(&out.stderr);
        out
    }

    /// Runs `args`, asserting success; its JSON line.
    fn ok(&mut self, args: &[&str]) -> serde_json::Value {
        let out = self.run(args);
        if !out.status.success() {
            let log = self
                .daemon_log
                .as_ref()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "{}\n--- the daemon's last lines:\n{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "client.py {} printed no JSON ({e}): {}",
                args[0],
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Runs `args`, asserting a refusal; its stderr.
    fn fails(&mut self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "client.py {} succeeded where it must fail: {}",
            args[0],
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

fn config(port: u16) -> String {
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    format!(
        r#"
[agents.bot]
owner = "alice@example.com"
tenant = "acme"
tier = "high"
uid = {uid}
gid = {gid}
auth_key = "auth"

[agents.bot.credentials.auth]
vault = "local"
every = "1h"
generate = {{ kind = "ed25519" }}
deliver = [{{ type = "file", path = "{{root}}/bot/auth" }}]

# Another agent, which introspects bot's tokens once bot is decommissioned.
[agents.auditor]
owner = "alice@example.com"
tenant = "acme"
tier = "high"
auth_key = "auth"

[agents.auditor.credentials.auth]
vault = "local"
every = "1h"
generate = {{ kind = "ed25519" }}
deliver = [{{ type = "file", path = "{{root}}/auditor/auth" }}]
[agents.pbot]
owner = "bob@partner.test"
tenant = "partner"
tier = "high"
auth_key = "auth"

[agents.pbot.credentials.auth]
vault = "local"
every = "1h"
generate = {{ kind = "ed25519" }}
deliver = [{{ type = "file", path = "{{root}}/pbot/auth" }}]

[agents.keyturn]
owner = "alice@example.com"
tenant = "acme"
tier = "high"

[agents.keyturn.credentials.signer]
vault = "local"
every = "24h"
grace = "1h"
generate = {{ kind = "ed25519" }}

[agents.keyturn.credentials.partner_signer]
vault = "local"
every = "24h"
grace = "1h"
generate = {{ kind = "ed25519" }}

[token_service]
issuer = "http://127.0.0.1:{port}"
signing_credential = "keyturn/signer"

[token_service.tenants.partner]
signing_credential = "keyturn/partner_signer"

[token_service.subject_issuers.partner]
issuer = "{PARTNER_IDP}"
audience = "keyturn"
algorithms = ["ES256"]
jwks_file = "{{dir}}/idp/jwks.json"
tenant = "partner"

[token_service.clients.pbot]
scopes = ["reports:read"]
audiences = ["{API}"]

[token_service.subject_issuers.corp]
issuer = "{IDP}"
audience = "keyturn"
algorithms = ["ES256"]
jwks_file = "{{dir}}/idp/jwks.json"
tenant = "acme"

[token_service.clients.bot]
scopes = ["invoices:read", "invoices:write", "reports:read"]
audiences = ["{API}"]
ttl = "2m"
"#
    )
}

#[cfg_attr(
    not(feature = "real-servers"),
    ignore = "needs the test services' Python venv: scripts/services.sh start, then --features real-servers"
)]
#[test]
fn a_python_client_exchanges_and_validates_across_a_signing_key_rotation() {
    let mut client = Client::new();
    let port = free_port();
    let env = Env::with_daemon(&config(port), &format!("listen = \"127.0.0.1:{port}\""));
    let dir = env.path().to_owned();
    let p = |rel: &str| dir.join(rel).display().to_string();
    // The identity provider's keys exist before the daemon loads them.
    client.ok(&["idp-init", &p("idp")]);
    std::fs::create_dir(dir.join("client")).unwrap();

    let daemon = env.start();
    client.daemon_log = Some(daemon.log.clone());
    let key = env.root().join("bot/auth/private.pem");
    wait_for(std::time::Duration::from_secs(30), || {
        key.exists().then_some(())
    })
    .unwrap_or_else(|| panic!("{} was never delivered", key.display()));
    let key = key.display().to_string();
    wait_version(&env, "keyturn", "signer", 1);
    let v1 = version_of(&env, "keyturn", "signer").unwrap().to_string();
    let metadata = format!("http://127.0.0.1:{port}/.well-known/oauth-authorization-server");

    // Alice holds invoices read and write and email; bot may have invoices
    // and reports; the request names invoices:read, reports:read and email.
    // Only invoices:read is in all three.
    client.ok(&[
        "subject",
        &p("idp"),
        "--sub",
        "alice",
        "--scope",
        "invoices:read invoices:write email",
        "--aud",
        "keyturn",
        "--iss",
        IDP,
        "--out",
        &p("client/subject-1.jwt"),
    ]);
    let exchange = |client: &mut Client, subject: &str, out: &str, expect_act: &str| {
        client.ok(&[
            "exchange",
            "--metadata",
            &metadata,
            "--agent",
            "bot",
            "--key",
            &key,
            "--subject-token-file",
            &p(subject),
            "--audience",
            API,
            "--scope",
            "invoices:read reports:read email",
            "--expect-sub",
            "alice",
            "--expect-scope",
            "invoices:read",
            "--expect-act",
            expect_act,
            "--expect-tenant",
            "acme",
            "--max-lifetime",
            "120",
            "--token-out",
            &p(out),
        ])
    };
    let first = exchange(
        &mut client,
        "client/subject-1.jwt",
        "client/token-1.jwt",
        r#"{"sub":"bot"}"#,
    );
    assert_eq!(first["kid"], v1.as_str(), "{first}");
    assert_eq!(first["claims"]["iss"], format!("http://127.0.0.1:{port}"));
    assert_eq!(first["claims"]["aud"], API, "{first}");
    assert_eq!(first["claims"]["client_id"], "bot", "{first}");
    assert_eq!(first["jwks_kids"], serde_json::json!([v1]), "{first}");
    // The validator can fail: a token for the API is no token for another.
    let wrong = client.fails(&[
        "validate",
        "--metadata",
        &metadata,
        "--token-file",
        &p("client/token-1.jwt"),
        "--audience",
        "https://elsewhere.test",
    ]);
    assert!(wrong.contains("InvalidAudienceError"), "{wrong}");

    // keyturn rotates its signing key like any credential.
    env.cli_ok(&["rotate", "keyturn/signer", "--wait"]);
    let v2 = version_of(&env, "keyturn", "signer").unwrap().to_string();
    assert_ne!(v1, v2);
    // The old token still validates: its key is still published.
    let old = client.ok(&[
        "validate",
        "--metadata",
        &metadata,
        "--token-file",
        &p("client/token-1.jwt"),
        "--audience",
        API,
        "--expect-kid",
        &v1,
    ]);
    assert_eq!(old["jwks_kids"], serde_json::json!([v2, v1]), "{old}");
    assert_eq!(old["claims"]["jti"], first["claims"]["jti"], "{old}");
    // A new exchange is signed by the new key, and an `act` already in the
    // subject token is nested under the agent, never dropped.
    client.ok(&[
        "subject",
        &p("idp"),
        "--sub",
        "alice",
        "--scope",
        "invoices:read invoices:write email",
        "--aud",
        "keyturn",
        "--iss",
        IDP,
        "--act",
        r#"{"sub":"planner"}"#,
        "--out",
        &p("client/subject-2.jwt"),
    ]);
    let second = exchange(
        &mut client,
        "client/subject-2.jwt",
        "client/token-2.jwt",
        r#"{"sub":"bot","act":{"sub":"planner"}}"#,
    );
    assert_eq!(second["kid"], v2.as_str(), "{second}");
    assert_ne!(second["claims"]["jti"], first["claims"]["jti"]);

    // Introspection says what the token says; revocation ends it.
    let active = client.ok(&[
        "introspect",
        "--metadata",
        &metadata,
        "--agent",
        "bot",
        "--key",
        &key,
        "--token-file",
        &p("client/token-2.jwt"),
        "--audience",
        API,
        "--expect-active",
        "true",
    ]);
    assert_eq!(active["act"]["act"]["sub"], "planner", "{active}");
    assert_eq!(active["scope"], "invoices:read", "{active}");
    assert_eq!(active["tenant"], "acme", "{active}");
    client.ok(&[
        "revoke",
        "--metadata",
        &metadata,
        "--agent",
        "bot",
        "--key",
        &key,
        "--token-file",
        &p("client/token-2.jwt"),
    ]);
    let inactive = client.ok(&[
        "introspect",
        "--metadata",
        &metadata,
        "--agent",
        "bot",
        "--key",
        &key,
        "--token-file",
        &p("client/token-2.jwt"),
        "--expect-active",
        "false",
    ]);
    assert_eq!(inactive, serde_json::json!({"active": false}));
    // The first token was not revoked with it.
    client.ok(&[
        "introspect",
        "--metadata",
        &metadata,
        "--agent",
        "bot",
        "--key",
        &key,
        "--token-file",
        &p("client/token-1.jwt"),
        "--audience",
        API,
        "--expect-active",
        "true",
    ]);

    // Tenant `partner` has its own key: its issuer (RFC 8414 3.1 metadata
    // under the tenant's path), its kids, its JWKS.
    let pkey = env.root().join("pbot/auth/private.pem");
    wait_for(std::time::Duration::from_secs(30), || {
        pkey.exists().then_some(())
    })
    .unwrap_or_else(|| panic!("{} was never delivered", pkey.display()));
    let pkey = pkey.display().to_string();
    wait_version(&env, "keyturn", "partner_signer", 1);
    let pv = version_of(&env, "keyturn", "partner_signer").unwrap();
    let partner_metadata =
        format!("http://127.0.0.1:{port}/.well-known/oauth-authorization-server/tenants/partner");
    client.ok(&[
        "subject",
        &p("idp"),
        "--sub",
        "bob",
        "--scope",
        "reports:read email",
        "--aud",
        "keyturn",
        "--iss",
        PARTNER_IDP,
        "--out",
        &p("client/subject-p.jwt"),
    ]);
    let partner = client.ok(&[
        "exchange",
        "--metadata",
        &partner_metadata,
        "--agent",
        "pbot",
        "--key",
        &pkey,
        "--subject-token-file",
        &p("client/subject-p.jwt"),
        "--audience",
        API,
        "--scope",
        "reports:read",
        "--expect-sub",
        "bob",
        "--expect-scope",
        "reports:read",
        "--expect-act",
        r#"{"sub":"pbot"}"#,
        "--expect-tenant",
        "partner",
        "--max-lifetime",
        "300",
        "--token-out",
        &p("client/token-p.jwt"),
    ]);
    let pkid = format!("partner.{pv}");
    assert_eq!(partner["kid"], pkid.as_str(), "{partner}");
    assert_eq!(partner["jwks_kids"], serde_json::json!([pkid]), "{partner}");
    assert_eq!(
        partner["claims"]["iss"],
        format!("http://127.0.0.1:{port}/tenants/partner")
    );
    // A resource server of the default issuer does not trust it.
    let foreign = client.fails(&[
        "validate",
        "--metadata",
        &metadata,
        "--token-file",
        &p("client/token-p.jwt"),
        "--audience",
        API,
    ]);
    assert!(foreign.contains("publishes no key"), "{foreign}");
    // Decommissioning bot makes the token it still holds inactive at once
    // (another agent asks), and its report counts the tokens item in the SLA.
    let auditor = env.root().join("auditor/auth/private.pem");
    wait_for(std::time::Duration::from_secs(30), || {
        auditor.exists().then_some(())
    })
    .unwrap_or_else(|| panic!("{} was never delivered", auditor.display()));
    let auditor = auditor.display().to_string();
    let introspect_as_auditor = |client: &mut Client, file: &str, active: &str| {
        client.ok(&[
            "introspect",
            "--metadata",
            &metadata,
            "--agent",
            "auditor",
            "--key",
            &auditor,
            "--token-file",
            &p(file),
            "--audience",
            API,
            "--expect-active",
            active,
        ])
    };
    introspect_as_auditor(&mut client, "client/token-1.jwt", "true");
    let decided: serde_json::Value = serde_json::from_slice(
        &env.cli_ok(&["decommission", "bot", "--reason", "retired", "--json"])
            .stdout,
    )
    .expect("decommission --json");
    let epoch = decided["agent"]["tokens"]["issued_up_to"]
        .as_str()
        .unwrap_or_else(|| panic!("no tokens item in {decided}"))
        .to_owned();
    let inactive = introspect_as_auditor(&mut client, "client/token-1.jwt", "false");
    assert_eq!(inactive, serde_json::json!({"active": false}));
    let done: serde_json::Value = serde_json::from_slice(
        &env.cli_ok(&[
            "decommission",
            "bot",
            "--reason",
            "retired",
            "--wait",
            "--json",
        ])
        .stdout,
    )
    .expect("decommission --wait --json");
    let row = &done["agent"];
    assert_eq!(row["state"], "decommissioned", "{done}");
    let tokens = &row["tokens"];
    assert_eq!(tokens["issued_up_to"], epoch.as_str(), "{done}");
    let to_verified = tokens["to_verified_ms"].as_i64().expect("verified");
    let sla_ms = row["sla_seconds"].as_i64().unwrap() * 1000;
    assert!(
        (0..=sla_ms).contains(&to_verified),
        "tokens verified {to_verified} ms after the decision, SLA {sla_ms} ms: {done}"
    );
    // The table says it too.
    let table = String::from_utf8(
        env.cli_ok(&["decommission", "bot", "--reason", "retired"])
            .stdout,
    )
    .unwrap();
    assert!(
        table.contains(&format!(
            "bot tokens issued up to {}Z: inactive, verified +",
            &epoch[..19]
        )),
        "{table}"
    );
    let records = audit_records(&env);
    assert!(
        records.iter().any(|r| r["event"] == "revocation.verified"
            && r["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("item=tokens "))),
        "no verified tokens item in the audit log"
    );
    let verified = records
        .iter()
        .find(|r| r["event"] == "decommission.verified" && r["agent"] == "bot")
        .expect("the decommission completed");
    let detail = verified["detail"].as_str().unwrap();
    assert!(
        detail.contains(" met ") && detail.contains("tokens: decision→verified"),
        "{detail}"
    );

    // Canaries: no token, nor its signature alone, anywhere keyturn writes,
    // nor in what the client printed.
    let log = daemon.stop();
    let mut outputs: Vec<(String, Vec<u8>)> = vec![
        ("daemon output".into(), log.into_bytes()),
        ("client output".into(), client.outputs.clone()),
    ];
    for (path, bytes) in read_tree(&env.state_dir()) {
        outputs.push((path.display().to_string(), bytes));
    }
    assert!(
        outputs.iter().any(|(name, _)| name.ends_with("audit.log")),
        "no audit log among {:?}",
        outputs.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    let audit = audit_records(&env);
    assert!(!audit.is_empty(), "the audit log is empty");
    for file in [
        "client/subject-1.jwt",
        "client/subject-2.jwt",
        "client/token-1.jwt",
        "client/token-2.jwt",
        "client/subject-p.jwt",
        "client/token-p.jwt",
    ] {
        let token = std::fs::read_to_string(dir.join(file)).unwrap();
        let token = token.trim();
        let signature = token.rsplit('.').next().unwrap();
        assert!(signature.len() >= 40, "{file}: a short signature part");
        for (name, bytes) in &outputs {
            assert!(
                !contains(bytes, token.as_bytes()),
                "{file}'s token appears in {name}"
            );
            assert!(
                !contains(bytes, signature.as_bytes()),
                "{file}'s signature appears in {name}"
            );
        }
    }
}

/// Client authentication by peer uid (issue 16): `keyturn token exchange`,
/// run by the agent's uid (the test's), exchanges over the agents' socket
/// with no assertion at all; the independent client validates the token
/// against the JWKS and introspects it active. A uid that is no agent's is
/// refused and audited; no token appears anywhere but the CLI's stdout.
#[cfg_attr(
    not(feature = "real-servers"),
    ignore = "needs the test services' Python venv: scripts/services.sh start, then --features real-servers"
)]
#[test]
fn the_cli_exchanges_over_the_agents_socket_authenticated_by_peer_uid() {
    use std::io::Write as _;
    let mut client = Client::new();
    let port = free_port();
    let env = Env::with_daemon(&config(port), &format!("listen = \"127.0.0.1:{port}\""));
    let dir = env.path().to_owned();
    let p = |rel: &str| dir.join(rel).display().to_string();
    client.ok(&["idp-init", &p("idp")]);
    std::fs::create_dir(dir.join("client")).unwrap();
    let daemon = env.start();
    client.daemon_log = Some(daemon.log.clone());
    let key = env.root().join("bot/auth/private.pem");
    wait_for(std::time::Duration::from_secs(30), || {
        key.exists().then_some(())
    })
    .unwrap_or_else(|| panic!("{} was never delivered", key.display()));
    let key = key.display().to_string();
    wait_version(&env, "keyturn", "signer", 1);
    let metadata = format!("http://127.0.0.1:{port}/.well-known/oauth-authorization-server");
    client.ok(&[
        "subject",
        &p("idp"),
        "--sub",
        "alice",
        "--scope",
        "invoices:read invoices:write email",
        "--aud",
        "keyturn",
        "--iss",
        IDP,
        "--out",
        &p("client/subject.jwt"),
    ]);
    let mut cli_outputs: Vec<u8> = Vec::new();

    // The test's uid is bot's: the CLI finds the agents' socket in the config.
    let out = env.cli(&[
        "token",
        "exchange",
        "--subject-token-file",
        &p("client/subject.jwt"),
        "--scope",
        "invoices:read reports:read email",
        "--audience",
        API,
    ]);
    cli_outputs.extend_from_slice(&out.stderr);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut keys: Vec<&String> = answer.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "access_token",
            "expires_in",
            "issued_token_type",
            "scope",
            "token_type"
        ]
    );
    assert_eq!(answer["scope"], "invoices:read", "{}", answer["scope"]);
    assert_eq!(answer["token_type"], "Bearer");
    assert_eq!(
        answer["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    // No actor token: the client's TTL (2m) applies.
    let expires_in = answer["expires_in"].as_u64().unwrap();
    assert!((100..=120).contains(&expires_in), "{expires_in}");
    let token = answer["access_token"].as_str().unwrap().to_owned();
    std::fs::write(dir.join("client/token.jwt"), &token).unwrap();

    // The independent client: valid against the JWKS, active.
    let valid = client.ok(&[
        "validate",
        "--metadata",
        &metadata,
        "--token-file",
        &p("client/token.jwt"),
        "--audience",
        API,
    ]);
    assert_eq!(valid["claims"]["sub"], "alice", "{valid}");
    assert_eq!(valid["claims"]["act"], serde_json::json!({"sub": "bot"}));
    assert_eq!(valid["claims"]["client_id"], "bot", "{valid}");
    assert_eq!(valid["claims"]["scope"], "invoices:read", "{valid}");
    let active = client.ok(&[
        "introspect",
        "--metadata",
        &metadata,
        "--agent",
        "bot",
        "--key",
        &key,
        "--token-file",
        &p("client/token.jwt"),
        "--audience",
        API,
        "--expect-active",
        "true",
    ]);
    assert_eq!(active["client_id"], "bot", "{active}");

    // The same error codes: a scope nobody holds.
    let out = env.cli(&[
        "token",
        "exchange",
        "--subject-token-file",
        &p("client/subject.jwt"),
        "--scope",
        "admin",
        "--audience",
        API,
    ]);
    cli_outputs.extend_from_slice(&out.stdout);
    cli_outputs.extend_from_slice(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid_scope"),
        "{out:?}"
    );

    // A uid that is no agent's is refused (the agents' socket is open to
    // all), with `--as` too; the subject token comes on stdin.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(env.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = env.path().join("agent.sock");
    let subject = std::fs::read(dir.join("client/subject.jwt")).unwrap();
    for extra in [vec![], vec!["--as", "bot"]] {
        let mut child = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin())
            .args([
                "token",
                "exchange",
                "--subject-token-file",
                "-",
                "--audience",
                API,
            ])
            .args(&extra)
            .arg("--socket")
            .arg(&socket)
            .arg("--config")
            .arg("/nonexistent.toml")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&subject).unwrap();
        let out = child.wait_with_output().unwrap();
        cli_outputs.extend_from_slice(&out.stdout);
        cli_outputs.extend_from_slice(&out.stderr);
        assert_eq!(out.status.code(), Some(77), "{extra:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("invalid_client"),
            "{out:?}"
        );
    }

    // Audited: issued as authenticated by peer uid, and the refusals.
    let audit = audit_records(&env);
    let tokens: Vec<&serde_json::Value> = audit
        .iter()
        .filter(|r| r["event"] == "oauth.token")
        .collect();
    // SAFETY: getuid cannot fail and touches no memory.
    let uid = unsafe { libc::getuid() };
    assert!(
        tokens.iter().any(|r| r["outcome"] == "ok"
            && r["agent"] == "bot"
            && r["detail"]
                .as_str()
                .unwrap_or_default()
                .contains(&format!("authenticated by peer uid={uid}"))),
        "{tokens:?}"
    );
    let refused = tokens
        .iter()
        .filter(|r| r["outcome"] == "refused" && r.to_string().contains("uid=65534"))
        .count();
    assert_eq!(refused, 2, "{tokens:?}");

    // Canaries: neither token, nor a signature, anywhere but that stdout.
    let log = daemon.stop();
    let mut outputs: Vec<(String, Vec<u8>)> = vec![
        ("daemon output".into(), log.into_bytes()),
        ("the CLI's stderr and refusals".into(), cli_outputs),
    ];
    for (path, bytes) in read_tree(&env.state_dir()) {
        outputs.push((path.display().to_string(), bytes));
    }
    let subject = String::from_utf8(subject).unwrap();
    for t in [token.as_str(), subject.trim()] {
        let signature = t.rsplit('.').next().unwrap();
        assert!(signature.len() >= 40);
        for (name, bytes) in &outputs {
            assert!(!contains(bytes, t.as_bytes()), "a token appears in {name}");
            assert!(
                !contains(bytes, signature.as_bytes()),
                "a token's signature appears in {name}"
            );
        }
    }
}

/// The listener has no TLS: a non-loopback `listen` with a token service
/// is a start-up error that says what to do, not tokens in the clear.
#[test]
fn the_token_service_refuses_a_listener_off_loopback() {
    let port = free_port();
    let env = Env::with_daemon(&config(port), &format!("listen = \"0.0.0.0:{port}\""));
    let mut daemon = env.spawn(&[]);
    let status = daemon
        .wait_exit(std::time::Duration::from_secs(20))
        .expect("the daemon refuses to start");
    assert!(!status.success());
    let log = daemon.log_text();
    assert!(
        log.contains("needs [daemon] listen on a loopback address")
            && log.contains("put a TLS proxy in front"),
        "{log}"
    );
}

/// `[token_service]` follows SIGHUP like the rest of the config: added, it
/// is served at once; changed, the new one answers; removed, its routes
/// answer 404. No Python needed: the metadata and JWKS say which is served.
#[test]
fn a_reload_starts_changes_and_stops_the_token_service() {
    let port = free_port();
    let agents = r#"
[agents.keyturn]
owner = "alice@example.com"
tenant = "acme"
tier = "high"

[agents.keyturn.credentials.signer]
vault = "local"
every = "24h"
generate = { kind = "ed25519" }
"#;
    let service = |issuer: &str| {
        format!(
            "{agents}\n[token_service]\nissuer = \"{issuer}\"\nsigning_credential = \"keyturn/signer\"\n\n[token_service.clients.keyturn]\nscopes = [\"a\"]\naudiences = [\"{API}\"]\n"
        )
    };
    let env = Env::with_daemon(agents, &format!("listen = \"127.0.0.1:{port}\""));
    let daemon = env.start();
    wait_version(&env, "keyturn", "signer", 1);
    let metadata = "/.well-known/oauth-authorization-server";
    let status = |path: &str| {
        let r = http_get(port, path);
        r.split_whitespace().nth(1).unwrap_or_default().to_owned()
    };
    assert_eq!(status(metadata), "404");
    assert_eq!(status("/.well-known/jwks.json"), "404");

    let first = format!("http://127.0.0.1:{port}");
    env.write_credentials(&service(&first));
    daemon.reload();
    let r = http_get(port, metadata);
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains(&format!("\"issuer\":\"{first}\"")), "{r}");
    let jwks = http_get(port, "/.well-known/jwks.json");
    assert!(jwks.contains("\"kid\":\"1\""), "{jwks}");

    let second = format!("http://localhost:{port}");
    env.write_credentials(&service(&second));
    daemon.reload();
    let r = http_get(port, metadata);
    assert!(r.contains(&format!("\"issuer\":\"{second}\"")), "{r}");
    // The same config again changes nothing (and logs no reload of it).
    daemon.reload();

    env.write_credentials(agents);
    daemon.reload();
    assert_eq!(status(metadata), "404");
    let log = daemon.stop();
    assert_eq!(
        log.matches("token service: reloaded").count(),
        3,
        "added, changed, removed: {log}"
    );
}
