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
use macro_rules_attribute::apply;

const IDP: &str = "https://idp.corp.test";
const API: &str = "https://api.example.test";
/// Tenant `partner`'s identity provider; the tenant has its own signing key.
const PARTNER_IDP: &str = "https://idp.partner.test";

/// Runs the client; every output is kept for the canary grep. Its files
/// live in the test's directory: the stand-in identity provider's key and
/// JWKS in `idp/`, the tokens under `client/`; paths given to its methods
/// are relative to that directory.
struct Client {
    python: String,
    script: PathBuf,
    dir: PathBuf,
    outputs: Vec<u8>,
    /// The daemon's output, whose end a failure shows.
    daemon_log: Option<PathBuf>,
}

/// An agent as client.py authenticates it (RFC 7523 assertions signed by
/// the key keyturn delivered to it) to the issuer at `metadata`.
struct Agent {
    name: &'static str,
    key: String,
    metadata: String,
}

/// `name` authenticating to the issuer at `metadata`, once keyturn has
/// delivered its key.
fn agent(env: &Env, name: &'static str, metadata: &str) -> Agent {
    let key = env.root().join(format!("{name}/auth/private.pem"));
    wait_for(std::time::Duration::from_secs(30), || {
        key.exists().then_some(())
    })
    .unwrap_or_else(|| panic!("{} was never delivered", key.display()));
    Agent {
        name,
        key: key.display().to_string(),
        metadata: metadata.to_owned(),
    }
}

/// An RFC 8693 exchange for the audience `API`: what is asked, and what
/// client.py checks of the issued token besides every check it always does.
struct Exchange<'a> {
    subject_token_file: &'a str,
    scope: &'a str,
    expect_sub: &'a str,
    expect_scope: &'a str,
    /// The whole `act` claim (JSON).
    expect_act: &'a str,
    expect_tenant: &'a str,
    /// Seconds.
    max_lifetime: u32,
    /// Where the issued token is written for later steps.
    token_out: &'a str,
}

impl Client {
    fn new(dir: &Path) -> Client {
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
            dir: dir.to_owned(),
            outputs: Vec::new(),
            daemon_log: None,
        }
    }

    /// `rel` in the test's directory, as an argument.
    fn path(&self, rel: &str) -> String {
        self.dir.join(rel).display().to_string()
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

    /// The stand-in identity provider's key and JWKS, in `idp/`.
    fn idp_init(&mut self) {
        let idp = self.path("idp");
        self.ok(&["idp-init", &idp]);
    }

    /// A subject token from the stand-in identity provider, as issuer `iss`,
    /// for `sub` holding `scope`, with audience keyturn and, if given, an
    /// `act` claim (JSON) it already carries; written to `out`.
    fn subject(&mut self, iss: &str, sub: &str, scope: &str, act: Option<&str>, out: &str) {
        let (idp, out) = (self.path("idp"), self.path(out));
        let mut args = vec![
            "subject", &idp, "--sub", sub, "--scope", scope, "--aud", "keyturn", "--iss", iss,
        ];
        if let Some(act) = act {
            args.extend(["--act", act]);
        }
        args.extend(["--out", &out]);
        self.ok(&args);
    }

    /// Runs client.py's `command` as `agent` (the arguments every
    /// authenticated command takes), then `rest`; its JSON line.
    fn ok_as(&mut self, command: &str, agent: &Agent, rest: &[&str]) -> serde_json::Value {
        let mut args = vec![
            command,
            "--metadata",
            &agent.metadata,
            "--agent",
            agent.name,
            "--key",
            &agent.key,
        ];
        args.extend_from_slice(rest);
        self.ok(&args)
    }

    /// `agent` exchanges a subject token (RFC 8693); the client's summary of
    /// the issued token (its kid, claims and the JWKS's kids).
    fn exchange(&mut self, agent: &Agent, x: &Exchange) -> serde_json::Value {
        let (subject, token_out) = (self.path(x.subject_token_file), self.path(x.token_out));
        let max_lifetime = x.max_lifetime.to_string();
        self.ok_as(
            "exchange",
            agent,
            &[
                "--subject-token-file",
                &subject,
                "--audience",
                API,
                "--scope",
                x.scope,
                "--expect-sub",
                x.expect_sub,
                "--expect-scope",
                x.expect_scope,
                "--expect-act",
                x.expect_act,
                "--expect-tenant",
                x.expect_tenant,
                "--max-lifetime",
                &max_lifetime,
                "--token-out",
                &token_out,
            ],
        )
    }

    /// The arguments of `validate`: the token in `token_file` against the
    /// JWKS of the issuer at `metadata`, for `audience`.
    fn validate_args(&self, metadata: &str, token_file: &str, audience: &str) -> Vec<String> {
        ["validate", "--metadata", metadata, "--token-file"]
            .into_iter()
            .map(str::to_owned)
            .chain([self.path(token_file), "--audience".into(), audience.into()])
            .collect()
    }

    /// Validates the token in `token_file` (and its `kid`, if given); the
    /// client's summary of it.
    fn validate(
        &mut self,
        metadata: &str,
        token_file: &str,
        audience: &str,
        expect_kid: Option<&str>,
    ) -> serde_json::Value {
        let mut args = self.validate_args(metadata, token_file, audience);
        if let Some(kid) = expect_kid {
            // One argument: a kid may begin with `-` (base64url), which
            // argparse would take for an option.
            args.push(format!("--expect-kid={kid}"));
        }
        self.ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Validating the token in `token_file` fails; why, as client.py says.
    fn validate_fails(&mut self, metadata: &str, token_file: &str, audience: &str) -> String {
        let args = self.validate_args(metadata, token_file, audience);
        self.fails(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// `agent` introspects the token in `token_file` (RFC 7662); client.py
    /// checks it is `active` or not (an active one's fields against the
    /// token's, validated for `API`); the introspection response.
    fn introspect(&mut self, agent: &Agent, token_file: &str, active: bool) -> serde_json::Value {
        let token_file = self.path(token_file);
        let active = if active { "true" } else { "false" };
        let rest = [
            "--token-file",
            &token_file,
            "--audience",
            API,
            "--expect-active",
            active,
        ];
        self.ok_as("introspect", agent, &rest)
    }

    /// `agent` revokes the token in `token_file` (RFC 7009).
    fn revoke(&mut self, agent: &Agent, token_file: &str) {
        let token_file = self.path(token_file);
        self.ok_as("revoke", agent, &["--token-file", &token_file]);
    }
}

/// The daemon on `config(port)`, serving the token service, with the
/// client ready: the identity provider's keys made before the daemon loads
/// them, bot's key delivered, keyturn's signer at version 1.
struct Setup {
    client: Client,
    env: Env,
    daemon: Daemon,
    /// The default issuer, `http://127.0.0.1:PORT`.
    issuer: String,
    /// Its RFC 8414 metadata URL.
    metadata: String,
    /// bot, authenticating to the default issuer.
    bot: Agent,
}

impl Setup {
    fn start() -> Setup {
        let port = free_port();
        let env = Env::with_daemon(&config(port), &format!("listen = \"127.0.0.1:{port}\""));
        let mut client = Client::new(env.path());
        client.idp_init();
        std::fs::create_dir(env.path().join("client")).unwrap();
        let daemon = env.start();
        client.daemon_log = Some(daemon.log.clone());
        let issuer = format!("http://127.0.0.1:{port}");
        let metadata = format!("{issuer}/.well-known/oauth-authorization-server");
        let bot = agent(&env, "bot", &metadata);
        wait_version(&env, "keyturn", "signer", 1);
        Setup {
            client,
            env,
            daemon,
            issuer,
            metadata,
            bot,
        }
    }
}

/// Canaries: no token of `tokens` (named for the message), nor its
/// signature part alone, appears in the daemon's output (the daemon is
/// stopped to read it all), in `seen` (what else the test watched) or in
/// any file keyturn keeps under its state directory, the audit log among
/// them.
fn assert_no_token_anywhere(
    env: &Env,
    daemon: Daemon,
    seen: (&str, Vec<u8>),
    tokens: &[(&str, String)],
) {
    let log = daemon.stop();
    let mut outputs: Vec<(String, Vec<u8>)> = vec![
        ("daemon output".into(), log.into_bytes()),
        (seen.0.into(), seen.1),
    ];
    for (path, bytes) in read_tree(&env.state_dir()) {
        outputs.push((path.display().to_string(), bytes));
    }
    assert!(
        outputs.iter().any(|(name, _)| name.ends_with("audit.log")),
        "no audit log among {:?}",
        outputs.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    assert!(!audit_records(env).is_empty(), "the audit log is empty");
    for (what, token) in tokens {
        let token = token.trim();
        let signature = token.rsplit('.').next().unwrap();
        assert!(signature.len() >= 40, "{what}: a short signature part");
        for (name, bytes) in &outputs {
            assert!(
                !contains(bytes, token.as_bytes()),
                "{what} appears in {name}"
            );
            assert!(
                !contains(bytes, signature.as_bytes()),
                "{what}'s signature appears in {name}"
            );
        }
    }
}

/// An agent that authenticates to keyturn with the Ed25519 key `auth`
/// keyturn delivers to it (under `{root}/NAME/auth`); `extra` goes into its
/// `[agents.NAME]` table.
fn agent_with_key(name: &str, owner: &str, tenant: &str, extra: &str) -> String {
    format!(
        r#"
[agents.{name}]
owner = "{owner}"
tenant = "{tenant}"
tier = "high"
auth_key = "auth"
{extra}
[agents.{name}.credentials.auth]
vault = "local"
every = "1h"
generate = {{ kind = "ed25519" }}
deliver = [{{ type = "file", path = "{{root}}/{name}/auth" }}]
"#
    )
}

/// One of keyturn's own signing keys, `[agents.keyturn.credentials.NAME]`.
fn signing_key(name: &str) -> String {
    format!(
        r#"
[agents.keyturn.credentials.{name}]
vault = "local"
every = "24h"
grace = "1h"
generate = {{ kind = "ed25519" }}
"#
    )
}

/// A subject token issuer of the token service. Both are the one stand-in
/// identity provider, whose JWKS client.py writes to `{dir}/idp`.
fn subject_issuer(name: &str, issuer: &str, tenant: &str) -> String {
    format!(
        r#"
[token_service.subject_issuers.{name}]
issuer = "{issuer}"
audience = "keyturn"
algorithms = ["ES256"]
jwks_file = "{{dir}}/idp/jwks.json"
tenant = "{tenant}"
"#
    )
}

fn config(port: u16) -> String {
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let bot = agent_with_key(
        "bot",
        "alice@example.com",
        "acme",
        &format!("uid = {uid}\ngid = {gid}\n"),
    );
    // Another client of acme, which introspects bot's tokens once bot is
    // decommissioned.
    let auditor = agent_with_key("auditor", "alice@example.com", "acme", "");
    let pbot = agent_with_key("pbot", "bob@partner.test", "partner", "");
    let keyturn = agent_table("keyturn");
    let (signer, partner_signer) = (signing_key("signer"), signing_key("partner_signer"));
    let partner_idp = subject_issuer("partner", PARTNER_IDP, "partner");
    let corp_idp = subject_issuer("corp", IDP, "acme");
    format!(
        r#"{bot}{auditor}{pbot}
{keyturn}{signer}{partner_signer}
[token_service]
issuer = "http://127.0.0.1:{port}"
signing_credential = "keyturn/signer"

[token_service.tenants.partner]
signing_credential = "keyturn/partner_signer"
{partner_idp}
[token_service.clients.pbot]
scopes = ["reports:read"]
audiences = ["{API}"]
{corp_idp}
[token_service.clients.bot]
scopes = ["invoices:read", "invoices:write", "reports:read"]
audiences = ["{API}"]
ttl = "2m"

# A client of tenant acme: it may introspect acme's tokens (RFC 7662 4).
[token_service.clients.auditor]
scopes = ["reports:read"]
audiences = ["{API}"]
"#
    )
}

#[apply(server_test!)]
fn a_python_client_exchanges_and_validates_across_a_signing_key_rotation() {
    let Setup {
        mut client,
        env,
        daemon,
        issuer,
        metadata,
        bot,
    } = Setup::start();
    let v1 = version_of(&env, "keyturn", "signer").unwrap().to_string();

    // Alice holds invoices read and write and email; bot may have invoices
    // and reports; the request names invoices:read, reports:read and email.
    // Only invoices:read is in all three.
    let alice_holds = "invoices:read invoices:write email";
    client.subject(IDP, "alice", alice_holds, None, "client/subject-1.jwt");
    let exchange = |client: &mut Client, subject_token_file, token_out, expect_act| {
        client.exchange(
            &bot,
            &Exchange {
                subject_token_file,
                scope: "invoices:read reports:read email",
                expect_sub: "alice",
                expect_scope: "invoices:read",
                expect_act,
                expect_tenant: "acme",
                max_lifetime: 120,
                token_out,
            },
        )
    };
    let first = exchange(
        &mut client,
        "client/subject-1.jwt",
        "client/token-1.jwt",
        r#"{"sub":"bot"}"#,
    );
    // The kid is the key's RFC 7638 thumbprint, not its version number.
    let kid1 = first["kid"].as_str().expect("a kid").to_owned();
    assert_eq!(kid1.len(), 43, "{first}");
    assert_ne!(kid1, v1);
    assert_eq!(first["claims"]["iss"], issuer.as_str());
    assert_eq!(first["claims"]["aud"], API, "{first}");
    assert_eq!(first["claims"]["client_id"], "bot", "{first}");
    assert_eq!(first["jwks_kids"], serde_json::json!([kid1]), "{first}");
    // The validator can fail: a token for the API is no token for another.
    let wrong = client.validate_fails(&metadata, "client/token-1.jwt", "https://elsewhere.test");
    assert!(wrong.contains("InvalidAudienceError"), "{wrong}");

    // keyturn rotates its signing key like any credential.
    env.cli_ok(&["rotate", "keyturn/signer", "--wait"]);
    let v2 = version_of(&env, "keyturn", "signer").unwrap().to_string();
    assert_ne!(v1, v2);
    // The old token still validates: its key is still published.
    let old = client.validate(&metadata, "client/token-1.jwt", API, Some(&kid1));
    let kid2 = old["jwks_kids"][0].as_str().expect("two kids").to_owned();
    assert_eq!(old["jwks_kids"], serde_json::json!([kid2, kid1]), "{old}");
    assert_eq!(old["claims"]["jti"], first["claims"]["jti"], "{old}");
    // A new exchange is signed by the new key, and an `act` already in the
    // subject token is nested under the agent, never dropped.
    let planner = Some(r#"{"sub":"planner"}"#);
    client.subject(IDP, "alice", alice_holds, planner, "client/subject-2.jwt");
    let second = exchange(
        &mut client,
        "client/subject-2.jwt",
        "client/token-2.jwt",
        r#"{"sub":"bot","act":{"sub":"planner"}}"#,
    );
    assert_eq!(second["kid"], kid2.as_str(), "{second}");
    assert_ne!(second["claims"]["jti"], first["claims"]["jti"]);

    // Introspection says what the token says; revocation ends it.
    let active = client.introspect(&bot, "client/token-2.jwt", true);
    assert_eq!(active["act"]["act"]["sub"], "planner", "{active}");
    assert_eq!(active["scope"], "invoices:read", "{active}");
    assert_eq!(active["tenant"], "acme", "{active}");
    client.revoke(&bot, "client/token-2.jwt");
    let inactive = client.introspect(&bot, "client/token-2.jwt", false);
    assert_eq!(inactive, serde_json::json!({"active": false}));
    // The first token was not revoked with it.
    client.introspect(&bot, "client/token-1.jwt", true);

    // Tenant `partner` has its own key: its issuer (RFC 8414 3.1 metadata
    // under the tenant's path), its kids, its JWKS.
    let partner_metadata = format!("{metadata}/tenants/partner");
    let pbot = agent(&env, "pbot", &partner_metadata);
    wait_version(&env, "keyturn", "partner_signer", 1);
    let bob_holds = "reports:read email";
    client.subject(PARTNER_IDP, "bob", bob_holds, None, "client/subject-p.jwt");
    let partner = client.exchange(
        &pbot,
        &Exchange {
            subject_token_file: "client/subject-p.jwt",
            scope: "reports:read",
            expect_sub: "bob",
            expect_scope: "reports:read",
            expect_act: r#"{"sub":"pbot"}"#,
            expect_tenant: "partner",
            max_lifetime: 300,
            token_out: "client/token-p.jwt",
        },
    );
    let pkid = partner["kid"].as_str().expect("a kid").to_owned();
    assert!(pkid != kid1 && pkid != kid2, "{partner}");
    assert_eq!(partner["jwks_kids"], serde_json::json!([pkid]), "{partner}");
    assert_eq!(
        partner["claims"]["iss"],
        format!("{issuer}/tenants/partner")
    );
    // A resource server of the default issuer does not trust it.
    let foreign = client.validate_fails(&metadata, "client/token-p.jwt", API);
    assert!(foreign.contains("publishes no key"), "{foreign}");
    // Decommissioning bot makes the token it still holds inactive at once
    // (another agent asks), and its report counts the tokens item in the SLA.
    let auditor = agent(&env, "auditor", &metadata);
    client.introspect(&auditor, "client/token-1.jwt", true);
    let decided: serde_json::Value = serde_json::from_slice(
        &env.cli_ok(&["decommission", "bot", "--reason", "retired", "--json"])
            .stdout,
    )
    .expect("decommission --json");
    let epoch = decided["agent"]["tokens"]["issued_up_to"]
        .as_str()
        .unwrap_or_else(|| panic!("no tokens item in {decided}"))
        .to_owned();
    let inactive = client.introspect(&auditor, "client/token-1.jwt", false);
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
    let tokens: Vec<(&str, String)> = [
        "client/subject-1.jwt",
        "client/subject-2.jwt",
        "client/token-1.jwt",
        "client/token-2.jwt",
        "client/subject-p.jwt",
        "client/token-p.jwt",
    ]
    .into_iter()
    .map(|file| (file, std::fs::read_to_string(client.path(file)).unwrap()))
    .collect();
    let seen = ("client output", client.outputs.clone());
    assert_no_token_anywhere(&env, daemon, seen, &tokens);
}

/// Client authentication by peer uid (issue 16): `keyturn token exchange`,
/// run by the agent's uid (the test's), exchanges over the agents' socket
/// with no assertion at all; the independent client validates the token
/// against the JWKS and introspects it active. A uid that is no agent's is
/// refused and audited; no token appears anywhere but the CLI's stdout.
#[apply(server_test!)]
fn the_cli_exchanges_over_the_agents_socket_authenticated_by_peer_uid() {
    use std::io::Write as _;
    let Setup {
        mut client,
        env,
        daemon,
        metadata,
        bot,
        ..
    } = Setup::start();
    let alice_holds = "invoices:read invoices:write email";
    client.subject(IDP, "alice", alice_holds, None, "client/subject.jwt");
    // `keyturn token exchange` of that subject token for `scope`.
    let subject_file = client.path("client/subject.jwt");
    let cli_exchange = |scope: &str| {
        env.cli(&[
            "token",
            "exchange",
            "--subject-token-file",
            &subject_file,
            "--scope",
            scope,
            "--audience",
            API,
        ])
    };
    let mut cli_outputs: Vec<u8> = Vec::new();

    // The test's uid is bot's: the CLI finds the agents' socket in the config.
    let out = cli_exchange("invoices:read reports:read email");
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
    // RFC 8693 2.2.1's fields, and no other.
    let mut fields: Vec<&str> = answer
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort();
    let rfc_8693 = "access_token expires_in issued_token_type scope token_type";
    assert_eq!(fields.join(" "), rfc_8693);
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
    std::fs::write(client.path("client/token.jwt"), &token).unwrap();

    // The independent client: valid against the JWKS, active.
    let valid = client.validate(&metadata, "client/token.jwt", API, None);
    assert_eq!(valid["claims"]["sub"], "alice", "{valid}");
    assert_eq!(valid["claims"]["act"], serde_json::json!({"sub": "bot"}));
    assert_eq!(valid["claims"]["client_id"], "bot", "{valid}");
    assert_eq!(valid["claims"]["scope"], "invoices:read", "{valid}");
    let active = client.introspect(&bot, "client/token.jwt", true);
    assert_eq!(active["client_id"], "bot", "{active}");

    // With the agent's own assertion as actor token: the token never
    // outlives it, and it is single-use.
    client.ok_as(
        "assertion",
        &bot,
        &[
            "--lifetime",
            "45",
            "--out",
            &client.path("client/actor.jwt"),
        ],
    );
    let actor_file = client.path("client/actor.jwt");
    let with_actor = || {
        env.cli(&[
            "token",
            "exchange",
            "--subject-token-file",
            &subject_file,
            "--actor-token-file",
            &actor_file,
            "--audience",
            API,
        ])
    };
    let out = with_actor();
    cli_outputs.extend_from_slice(&out.stderr);
    assert!(out.status.success(), "{out:?}");
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let expires_in = answer["expires_in"].as_u64().unwrap();
    assert!((30..=45).contains(&expires_in), "{expires_in}");
    let capped = answer["access_token"].as_str().unwrap().to_owned();
    let out = with_actor();
    cli_outputs.extend_from_slice(&out.stdout);
    cli_outputs.extend_from_slice(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid_request"),
        "a replayed actor token: {out:?}"
    );

    // The same error codes: a scope nobody holds.
    let out = cli_exchange("admin");
    cli_outputs.extend_from_slice(&out.stdout);
    cli_outputs.extend_from_slice(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid_scope"),
        "{out:?}"
    );

    // An agent the config does not know is a refused client (77), as the
    // README says of `invalid_client`; it exited 1.
    let out = env.cli(&[
        "token",
        "exchange",
        "--subject-token-file",
        &subject_file,
        "--audience",
        API,
        "--as",
        "nosuch",
    ]);
    cli_outputs.extend_from_slice(&out.stdout);
    cli_outputs.extend_from_slice(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid_client"),
        "{out:?}"
    );

    // A uid that is no agent's is refused (the agents' socket is open to
    // all), with `--as` too; the subject token comes on stdin.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(env.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = env.path().join("agent.sock");
    let subject = std::fs::read(&subject_file).unwrap();
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

    // Counted with the listener's token requests, under their own endpoint.
    let port: u16 = metadata
        .trim_start_matches("http://127.0.0.1:")
        .split('/')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the listener's port");
    let metrics = http_get(port, "/metrics");
    for (result, n) in [
        ("ok", 2),
        ("invalid_request", 1),
        ("invalid_scope", 1),
        ("invalid_client", 3),
    ] {
        let line = format!(
            "keyturn_oauth_requests_total{{endpoint=\"token_socket\",result=\"{result}\"}} {n}"
        );
        assert!(metrics.contains(&line), "no `{line}` in:\n{metrics}");
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
    let actor = std::fs::read_to_string(&actor_file).unwrap();
    let tokens = [
        ("the issued token", token),
        ("the token capped by the actor token", capped),
        ("the actor token", actor),
        ("the subject token", String::from_utf8(subject).unwrap()),
    ];
    let seen = ("the CLI's stderr and refusals", cli_outputs);
    assert_no_token_anywhere(&env, daemon, seen, &tokens);
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
    let agents = &format!(
        r#"{}
[agents.keyturn.credentials.signer]
vault = "local"
every = "24h"
generate = {{ kind = "ed25519" }}
"#,
        agent_table("keyturn")
    );
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
    // Never cached, not even while off: a cached 404 would outlive the
    // reload below that turns the service on.
    let no_store = |path: &str| {
        let r = http_get(port, path).to_ascii_lowercase();
        assert!(r.contains("cache-control: no-store"), "{path}: {r}");
    };
    no_store(metadata);
    no_store("/.well-known/jwks.json");

    let first = format!("http://127.0.0.1:{port}");
    env.write_credentials(&service(&first));
    daemon.reload();
    let r = http_get(port, metadata);
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains(&format!("\"issuer\":\"{first}\"")), "{r}");
    let jwks = http_get(port, "/.well-known/jwks.json");
    // One key, its kid its thumbprint (43 base64url characters).
    assert!(
        jwks.matches("\"kid\":\"").count() == 1 && !jwks.contains("\"kid\":\"1\""),
        "{jwks}"
    );

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
    no_store(metadata);
    let log = daemon.stop();
    assert_eq!(
        log.matches("token service: reloaded").count(),
        3,
        "added, changed, removed: {log}"
    );
}

/// `POST path` of a form on the daemon's HTTP listener at `port`: the
/// whole response, head and body.
fn http_post_form(port: u16, path: &str, form: &[(&str, &str)]) -> String {
    use std::io::{Read, Write};
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A fresh RFC 7523 client assertion of `agent` for `issuer`, signed with
/// `pem` (PKCS#8).
fn client_assertion(agent: &str, issuer: &str, pem: &[u8]) -> String {
    let key = jsonwebtoken::EncodingKey::from_ed_pem(pem).unwrap();
    let now = jsonwebtoken::get_current_timestamp();
    let jti = format!("{:x}", rand::random::<u128>());
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
        &serde_json::json!({
            "iss": agent, "sub": agent, "aud": issuer,
            "iat": now, "exp": now + 60, "jti": jti,
        }),
        &key,
    )
    .unwrap()
}

/// bb7 #6: a decommission the config dates in the future is not one yet:
/// until its `at` the agent authenticates to the token service as before
/// (as the rest of keyturn has not acted on it either); once `at` has come
/// it is refused, with everything else the decommission does.
#[test]
fn a_decommission_dated_later_takes_the_token_service_when_it_comes() {
    let port = free_port();
    let issuer = format!("http://127.0.0.1:{port}");
    let config = |extra: &str| {
        format!(
            "{}{}{}\n[token_service]\nissuer = \"{issuer}\"\nsigning_credential = \"keyturn/signer\"\n\n[token_service.clients.bot]\nscopes = [\"a\"]\naudiences = [\"{API}\"]\n",
            agent_with_key("bot", "alice@example.com", "acme", extra),
            agent_table("keyturn"),
            signing_key("signer"),
        )
    };
    let env = Env::with_daemon(&config(""), &format!("listen = \"127.0.0.1:{port}\""));
    let daemon = env.start();
    let key = env.root().join("bot/auth/private.pem");
    wait_for(std::time::Duration::from_secs(30), || {
        key.exists().then_some(())
    })
    .expect("bot's key is delivered");
    // Read now: the decommission retracts the file.
    let key = std::fs::read(&key).unwrap();
    let introspect = || {
        let assertion = client_assertion("bot", &issuer, &key);
        http_post_form(
            port,
            "/oauth/introspect",
            &[
                ("token", "not-a-token"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", &assertion),
            ],
        )
    };
    let before = introspect();
    assert!(before.starts_with("HTTP/1.1 200"), "{before}");

    // Whole seconds, as written in the config.
    let at =
        chrono::SubsecRound::trunc_subsecs(chrono::Utc::now() + chrono::Duration::seconds(15), 0);
    env.write_credentials(&config(&format!(
        "decommissioned = {{ at = \"{}\", reason = \"planned retirement\" }}\n",
        at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )));
    daemon.reload();
    // Accepted as before for a while (the new config is in effect: a
    // wrongly early refusal would come within this time).
    for _ in 0..10 {
        let r = introspect();
        assert!(
            r.starts_with("HTTP/1.1 200") && r.contains("\"active\":false"),
            "refused before its decommission's `at`: {r}"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    assert!(
        chrono::Utc::now() < at,
        "the reload took longer than the decommission's delay: nothing shown"
    );
    assert!(
        !audit_records(&env)
            .iter()
            .any(|r| r["event"] == "decommission.decided"),
        "nothing decided before `at`"
    );
    // Once `at` has come: decided, and refused by the token service.
    let refused = wait_for(std::time::Duration::from_secs(60), || {
        let r = introspect();
        r.starts_with("HTTP/1.1 401").then_some(r)
    })
    .expect("refused once `at` has come");
    assert!(chrono::Utc::now() >= at);
    assert!(refused.contains("decommissioned"), "{refused}");
    daemon.stop();
}

/// Black-box finding: `check` said ok of a config whose token service
/// signs with a credential of a decommissioned agent (its keys destroyed),
/// while every exchange failed with `server_error`. It warns.
#[test]
fn check_warns_of_a_signing_credential_of_a_decommissioned_agent() {
    let port = free_port();
    let issuer = format!("http://127.0.0.1:{port}");
    let config = format!(
        "{}{}\n[token_service]\nissuer = \"{issuer}\"\nsigning_credential = \"keyturn/signer\"\n\n[token_service.clients.bot]\nscopes = [\"a\"]\naudiences = [\"{API}\"]\n",
        agent_with_key("bot", "alice@example.com", "acme", ""),
        agent_table("keyturn") + &signing_key("signer"),
    );
    let env = Env::with_daemon(&config, &format!("listen = \"127.0.0.1:{port}\""));
    let daemon = env.start();
    let quiet = env.cli_ok(&["check"]);
    assert!(
        !String::from_utf8_lossy(&quiet.stderr).contains("warning"),
        "{quiet:?}"
    );
    env.cli_ok(&["decommission", "keyturn", "--reason", "retired", "--wait"]);
    let out = env.cli_ok(&["check"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "warning: token_service.signing_credential = \"keyturn/signer\": agent keyturn is decommissioned"
        ),
        "{stderr}"
    );
    daemon.stop();
}

/// Black-box finding: `check` said ok of a subject issuer whose
/// `jwks_file` did not exist (no token of it would be accepted). It warns,
/// naming the setting; once the file is there, it says nothing.
#[test]
fn check_warns_of_a_jwks_file_it_cannot_read() {
    let port = free_port();
    let env = Env::with_daemon(&config(port), &format!("listen = \"127.0.0.1:{port}\""));
    let out = env.cli_ok(&["check"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: token_service.subject_issuers.corp.jwks_file")
            && stderr.contains("No such file"),
        "{stderr}"
    );
    let idp = env.path().join("idp");
    std::fs::create_dir_all(&idp).unwrap();
    std::fs::write(idp.join("jwks.json"), "{\"keys\": []}").unwrap();
    let out = env.cli_ok(&["check"]);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("jwks_file"),
        "{out:?}"
    );
}
