//! The `vault_token` and `aws_sts` task issuers end to end: the real daemon,
//! `keyturn task start/end` on the agents' socket, and the real systems —
//! the OpenBao of scripts/services.sh, and a private moto with IAM enforced
//! (the shared one accepts any credentials, so it cannot refuse a call).
//! Each test also follows its task through `keyturn status`, `/metrics` and
//! the identity surface, from start to end, and greps everything keyturn
//! wrote or printed for the task's secrets.
//!
//! (tests/tasks_e2e.rs covers the `postgres` issuer the same way, with TTL
//! and `kill -9`; the issuers' own tests cover each system in detail.)

mod common;

use std::collections::BTreeMap;

use common::{
    Env, audit_records, block_on, bot_task_args, end_bot_task, free_port, http_get, need,
    read_tree, server_test, start_bot_task, status_doc, task_env,
};
use macro_rules_attribute::apply;

fn suffix() -> String {
    hex::encode(rand::random::<[u8; 6]>())
}

/// [`task_env`] with `issuer` (its `[issuers.NAME]` table) and the policy
/// `invoicing`: `bot`'s tasks for `acme`, at most 1h, `default_ttl` when
/// not asked, granted `low_grant` (`levels.low.grants.NAME = ...`) at low
/// sensitivity; `/metrics` on `port`.
fn env(issuer: &str, default_ttl: &str, low_grant: &str, port: u16) -> Env {
    task_env(
        &format!(
            r#"
{issuer}
[policies.invoicing]
agents = ["bot"]
tenants = ["acme"]
max_ttl = "1h"
default_ttl = "{default_ttl}"
levels.low.grants.{low_grant}
"#
        ),
        &format!("listen = \"127.0.0.1:{port}\""),
    )
}

/// The task's attribution, as `start_bot_task` asks for it: what the
/// issuers put in their credential's metadata or tags.
fn attribution(id: &str) -> [(&'static str, &str); 6] {
    [
        ("task_id", id),
        ("agent", "bot"),
        ("tenant", "acme"),
        ("use_case", "month-end"),
        ("run_id", "run-77"),
        ("initiator", "alice@example.com"),
    ]
}

/// The credential file of `issuer` in a task start answer; the secrets are
/// in it, not in the answer.
fn credential_file(started: &serde_json::Value, issuer: &str) -> serde_json::Value {
    let c = &started["credentials"][issuer];
    assert!(
        c["secret"].as_object().is_none_or(|m| m.is_empty()),
        "{started}"
    );
    let file = c["file"].as_str().expect("a credential file");
    serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap()
}

/// What `status`, `/metrics` and the surface say of the agent's tasks.
struct Seen {
    /// `status --json`'s tasks.
    tasks: Vec<serde_json::Value>,
    /// `keyturn status` as printed.
    table: String,
    metrics: String,
    /// The surface's tasks of `bot`.
    surface: Vec<serde_json::Value>,
    /// Everything as printed, for the secret greps.
    printed: String,
}

impl Seen {
    /// Asserts that `id` is the one task shown, by status, its table and
    /// /metrics, with its one item from `issuer`.
    fn assert_one_live(&self, id: &str, issuer: &str) {
        assert_eq!(self.tasks.len(), 1, "{:?}", self.tasks);
        assert_eq!(self.tasks[0]["task"], id);
        assert_eq!(self.tasks[0]["items"][0]["issuer"], issuer);
        assert!(
            self.table
                .lines()
                .any(|l| l.starts_with("bot") && l.contains(id) && l.contains(issuer)),
            "{}",
            self.table
        );
        for line in [
            format!("keyturn_tasks_active{{agent=\"bot\",issuer=\"{issuer}\"}} 1\n"),
            format!("keyturn_task_starts_total{{issuer=\"{issuer}\",result=\"ok\"}} 1\n"),
        ] {
            self.assert_metric(&line);
        }
    }

    /// Asserts that the task `id`, its one item from `issuer` revoked and
    /// verified, is shown nowhere any more: not by status, its table, the
    /// surface, nor as active in /metrics.
    fn assert_ended(&self, id: &str, issuer: &str) {
        assert!(self.tasks.is_empty(), "{:?}", self.tasks);
        assert!(!self.table.contains(id), "{}", self.table);
        assert!(
            !self.metrics.contains("keyturn_tasks_active{"),
            "{}",
            self.metrics
        );
        self.assert_metric(&format!(
            "keyturn_task_revocations_total{{issuer=\"{issuer}\",result=\"verified\"}} 1\n"
        ));
        assert!(self.surface.is_empty(), "{:?}", self.surface);
    }

    /// Asserts that /metrics has `line`.
    fn assert_metric(&self, line: &str) {
        assert!(
            self.metrics.contains(line),
            "missing {line:?} in\n{}",
            self.metrics
        );
    }
}

fn seen(env: &Env, port: u16) -> Seen {
    let doc = status_doc(env);
    let table = String::from_utf8_lossy(&env.cli_ok(&["status"]).stdout).into_owned();
    let metrics = http_get(port, "/metrics");
    let surface: serde_json::Value =
        serde_json::from_slice(&env.cli_ok(&["surface", "--json"]).stdout).unwrap();
    let surface_text = String::from_utf8_lossy(&env.cli_ok(&["surface"]).stdout).into_owned();
    let bot_tasks = surface["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent"] == "bot")
        .and_then(|a| a["tasks"].as_array().cloned())
        .unwrap_or_default();
    Seen {
        tasks: doc["tasks"]
            .as_array()
            .expect("tasks while the daemon runs")
            .clone(),
        printed: format!("{doc}\n{table}\n{metrics}\n{surface}\n{surface_text}"),
        table,
        metrics,
        surface: bot_tasks,
    }
}

/// Asserts that no output, state file, log or audit record of `env` holds
/// any of `secrets`.
fn assert_nowhere(env: &Env, printed: &[&str], daemon_log: &str, secrets: &[&str]) {
    let mut places: Vec<(String, Vec<u8>)> = read_tree(&env.state_dir())
        .into_iter()
        .map(|(p, b)| (p.display().to_string(), b))
        .collect();
    places.push(("daemon log".into(), daemon_log.as_bytes().to_vec()));
    for (i, p) in printed.iter().enumerate() {
        places.push((format!("output {i}"), p.as_bytes().to_vec()));
    }
    for s in secrets {
        assert!(s.len() >= 16, "a secret to look for: {s:?}");
        for (place, bytes) in &places {
            assert!(
                !common::contains(bytes, s.as_bytes()),
                "a task secret in {place}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// vault_token, against the OpenBao of the test services
// ---------------------------------------------------------------------------

/// A policy that may read `kt-<suffix>/a` and not `kt-<suffix>/b`, both
/// written; removed on drop.
struct Bao {
    addr: String,
    root: String,
    policy: String,
    a: String,
    b: String,
}

fn bao_client(addr: &str, token: &str) -> vaultrs::client::VaultClient {
    vaultrs::client::VaultClient::new(
        vaultrs::client::VaultClientSettingsBuilder::default()
            .address(addr)
            .token(token)
            .build()
            .unwrap(),
    )
    .unwrap()
}

/// The HTTP status of a failed OpenBao call.
fn status_of(e: &vaultrs::error::ClientError) -> Option<u16> {
    match e {
        vaultrs::error::ClientError::APIError { code, .. } => Some(*code),
        vaultrs::error::ClientError::RestClientError {
            source: rustify::errors::ClientError::ServerResponseError { code, .. },
        } => Some(*code),
        _ => None,
    }
}

impl Bao {
    fn new() -> Bao {
        let s = suffix();
        let bao = Bao {
            addr: need("KEYTURN_TEST_BAO_ADDR"),
            root: need("KEYTURN_TEST_BAO_TOKEN"),
            policy: format!("kt-e2e-task-{s}"),
            a: format!("kt-e2e-{s}/a"),
            b: format!("kt-e2e-{s}/b"),
        };
        let root = bao.client(&bao.root);
        block_on(async {
            vaultrs::sys::policy::set(
                &root,
                &bao.policy,
                &format!(
                    r#"path "secret/data/{}" {{ capabilities = ["read"] }}"#,
                    bao.a
                ),
            )
            .await
            .unwrap();
            for (path, value) in [(&bao.a, "alpha"), (&bao.b, "bravo")] {
                vaultrs::kv2::set(
                    &root,
                    "secret",
                    path,
                    &serde_json::json!({ "value": value }),
                )
                .await
                .unwrap();
            }
        });
        bao
    }

    fn client(&self, token: &str) -> vaultrs::client::VaultClient {
        bao_client(&self.addr, token)
    }

    /// What `token` reads at a KV path: the value, or the HTTP status.
    fn read_as(&self, token: &str, path: &str) -> Result<String, Option<u16>> {
        block_on(vaultrs::kv2::read::<serde_json::Value>(
            &self.client(token),
            "secret",
            path,
        ))
        .map(|v| v["value"].as_str().unwrap_or_default().to_owned())
        .map_err(|e| status_of(&e))
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        let root = self.client(&self.root);
        block_on(async {
            let _ = vaultrs::sys::policy::delete(&root, &self.policy).await;
            for p in [&self.a, &self.b] {
                let _ = vaultrs::kv2::delete_metadata(&root, "secret", p).await;
            }
        });
    }
}

/// [`env`] with the `vault_token` issuer `bao` on `bao`'s server, its
/// token in `{dir}/bao-token`, granting `policies` (a TOML list's items)
/// at low sensitivity, tasks of 5 minutes by default.
fn bao_env(bao: &Bao, policies: &str, port: u16) -> Env {
    env(
        &format!(
            r#"
[issuers.bao]
type = "vault_token"
address = "{addr}"
token_file = "{{dir}}/bao-token"
timeout = "5s"
"#,
            addr = bao.addr,
        ),
        "5m",
        &format!("bao = {{ policies = [{policies}] }}"),
        port,
    )
}

#[apply(server_test!)]
fn a_vault_token_task_has_exactly_its_grant_and_is_revoked_at_end() {
    let bao = Bao::new();
    let port = free_port();
    let env = bao_env(&bao, &format!("\"{}\"", bao.policy), port);
    std::fs::write(env.path().join("bao-token"), &bao.root).unwrap();
    let daemon = env.start();

    let started = start_bot_task(&env, "low", &["--ttl", "10m"]);
    let id = started["task"].as_str().unwrap().to_owned();
    let cred = credential_file(&started, "bao");
    let token = cred["token"].as_str().unwrap().to_owned();
    let accessor = cred["accessor"].as_str().unwrap().to_owned();
    assert_eq!(cred["address"], bao.addr.as_str());
    assert_eq!(started["items"][0]["handle"], accessor.as_str());

    // At the server: exactly the grant's policies, the task's TTL (not
    // renewable past it), the attribution in its metadata.
    let root = bao.client(&bao.root);
    let info = block_on(vaultrs::token::lookup_accessor(&root, &accessor)).expect("the token");
    assert_eq!(info.policies, [bao.policy.as_str()], "exactly the grant's");
    assert!(
        (598..=600).contains(&info.creation_ttl),
        "TTL {}",
        info.creation_ttl
    );
    assert_eq!(info.explicit_max_ttl, info.creation_ttl);
    assert_eq!(info.renewable, Some(false));
    let meta = info.meta.unwrap_or_default();
    for (k, v) in attribution(&id) {
        assert_eq!(meta.get(k).map(String::as_str), Some(v), "{meta:?}");
    }
    // As the agent: the allowed path reads, the other is refused.
    assert_eq!(bao.read_as(&token, &bao.a), Ok("alpha".to_owned()));
    assert_eq!(bao.read_as(&token, &bao.b), Err(Some(403)));

    // status, /metrics and the surface show the task and its credential.
    let live = seen(&env, port);
    live.assert_one_live(&id, "bao");
    assert_eq!(live.tasks[0]["state"], "live");
    live.assert_metric("keyturn_task_revocation_overdue 0\n");
    assert_eq!(live.surface.len(), 1, "{:?}", live.surface);
    assert_eq!(live.surface[0]["task"], id.as_str());
    assert_eq!(
        live.surface[0]["credentials"][0]["object"],
        format!("token accessor {accessor}")
    );

    // `task end`: revoked at once, and the server says so.
    end_bot_task(&env, &id);
    let self_lookup = block_on(vaultrs::token::lookup_self(&bao.client(&token)))
        .expect_err("lookup-self with an ended task's token");
    assert_eq!(status_of(&self_lookup), Some(403), "{self_lookup}");
    assert_eq!(bao.read_as(&token, &bao.a), Err(Some(403)));

    // ... and the task is gone from status, /metrics and the surface.
    let after = seen(&env, port);
    after.assert_ended(&id, "bao");

    let records = audit_records(&env);
    let issued = records
        .iter()
        .find(|r| r["event"] == "task.issued")
        .expect("a task.issued record");
    assert!(issued["detail"].as_str().unwrap().contains(&accessor));
    let log = daemon.stop();
    assert_nowhere(&env, &[&live.printed, &after.printed], &log, &[&token]);
}

/// Defect: a start whose token the server refused (a grant wider than
/// keyturn's own token) left the task `ending`, its token waited for until
/// an hour later, overdue from the task's TTL on. The server refusing the
/// create request means there is no token: the failed start ends at once.
#[apply(server_test!)]
fn a_vault_token_start_the_server_refuses_ends_at_once() {
    let bao = Bao::new();
    let s = suffix();
    let create = format!("kt-e2e-create-{s}");
    let root = bao.client(&bao.root);
    // keyturn's own token may create tokens with its own policies only.
    let own = block_on(async {
        vaultrs::sys::policy::set(
            &root,
            &create,
            r#"path "auth/token/create" { capabilities = ["update"] }"#,
        )
        .await
        .unwrap();
        vaultrs::token::new(
            &root,
            Some(
                vaultrs::api::token::requests::CreateTokenRequest::builder()
                    .policies(vec![create.clone(), bao.policy.clone()])
                    .ttl("10m"),
            ),
        )
        .await
        .unwrap()
    });
    let port = free_port();
    let env = bao_env(
        &bao,
        &format!("\"{}\", \"kt-e2e-not-held-{s}\"", bao.policy),
        port,
    );
    std::fs::write(env.path().join("bao-token"), &own.client_token).unwrap();
    let daemon = env.start();

    let out = env.cli(&bot_task_args("low"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the start succeeded");
    assert!(
        stderr.contains("issuer `bao`") || stderr.contains("issuer bao"),
        "{stderr}"
    );
    assert!(stderr.contains("400"), "the server's refusal: {stderr}");

    // Ended at once: nothing shown, active or overdue.
    let after = seen(&env, port);
    assert!(after.tasks.is_empty(), "{:?}", after.tasks);
    assert!(after.surface.is_empty(), "{:?}", after.surface);
    assert!(
        !after.metrics.contains("keyturn_tasks_active{"),
        "{}",
        after.metrics
    );
    after.assert_metric("keyturn_task_revocation_overdue 0\n");
    after.assert_metric("keyturn_task_starts_total{issuer=\"bao\",result=\"failed\"} 1\n");
    let records = audit_records(&env);
    let ended = records
        .iter()
        .find(|r| r["event"] == "task.ended")
        .unwrap_or_else(|| panic!("no task.ended record in {records:?}"));
    assert!(
        ended["detail"].to_string().contains("start_failed"),
        "{ended}"
    );
    daemon.stop();
    block_on(async {
        let _ = vaultrs::token::revoke(&root, &own.client_token).await;
        let _ = vaultrs::sys::policy::delete(&root, &create).await;
    });
}

// ---------------------------------------------------------------------------
// aws_sts, against a private moto with IAM enforced
// ---------------------------------------------------------------------------

/// A moto server of this test alone (tests/fixtures/private_moto.rs, shared
/// with the issuer's unit tests): keyturn's IAM user, and the role
/// `invoice-tasks` whose own policy allows secretsmanager:ListSecrets and
/// DescribeSecret; every request it receives is recorded.
#[path = "fixtures/private_moto.rs"]
mod private_moto;
use private_moto::PrivateMoto;

#[derive(serde::Deserialize)]
struct MotoSetup {
    access_key_id: String,
    secret_access_key: String,
    role_arn: String,
}

/// A Secrets Manager client of `moto` signing with a task's session credential.
fn secrets_as(moto: &PrivateMoto, cred: &serde_json::Value) -> aws_sdk_secretsmanager::Client {
    let creds = aws_sdk_secretsmanager::config::Credentials::new(
        cred["access_key_id"].as_str().unwrap(),
        cred["secret_access_key"].as_str().unwrap(),
        Some(cred["session_token"].as_str().unwrap().to_owned()),
        None,
        "task",
    );
    aws_sdk_secretsmanager::Client::from_conf(
        aws_sdk_secretsmanager::Config::builder()
            .behavior_version(aws_sdk_secretsmanager::config::BehaviorVersion::latest())
            .region(aws_sdk_secretsmanager::config::Region::new("us-east-1"))
            .endpoint_url(&moto.url)
            .credentials_provider(creds)
            .build(),
    )
}

/// The session policy of the test's grant: ListSecrets only.
const SESSION_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"secretsmanager:ListSecrets","Resource":"*"}]}"#;

/// moto answers a refused Secrets Manager call in XML, which the SDK cannot
/// read into a code: the HTTP status and body as received.
fn refusal<E>(e: &aws_sdk_secretsmanager::error::SdkError<E>) -> (u16, String) {
    let raw = e.raw_response().expect("an HTTP answer");
    (
        raw.status().as_u16(),
        String::from_utf8_lossy(raw.body().bytes().unwrap_or_default()).into_owned(),
    )
}

#[apply(server_test!)]
fn an_aws_sts_task_works_within_its_session_policy_and_is_revoked_at_end() {
    let (moto, setup): (PrivateMoto, MotoSetup) = PrivateMoto::start();
    let port = free_port();
    let env = env(
        &format!(
            r#"
[issuers.sts]
type = "aws_sts"
region = "us-east-1"
endpoint_url = "{url}"
revoke_with_deny_policy = true
iam_endpoint_url = "{url}"
timeout = "10s"
"#,
            url = moto.url,
        ),
        "30m",
        &format!(
            "sts = {{ role_arn = \"{}\", session_policy = '{SESSION_POLICY}' }}",
            setup.role_arn
        ),
        port,
    );
    // keyturn's own AWS credentials come from the environment, as in a
    // systemd unit's `Environment=` or credentials file.
    let daemon = env.start_with(&[
        ("AWS_ACCESS_KEY_ID", setup.access_key_id.as_str()),
        ("AWS_SECRET_ACCESS_KEY", setup.secret_access_key.as_str()),
    ]);

    let started = start_bot_task(&env, "low", &["--ttl", "20m"]);
    let id = started["task"].as_str().unwrap().to_owned();
    let cred = credential_file(&started, "sts");
    let session = format!("keyturn-{id}");
    assert_eq!(
        cred["assumed_role_arn"],
        format!("arn:aws:sts::123456789012:assumed-role/invoice-tasks/{session}")
    );

    // The allowed call works; one outside the session policy (and the
    // role's: moto enforces only the role's policies, see
    // src/tasks/issuers/aws_sts/tests.rs) is refused.
    let sm = secrets_as(&moto, &cred);
    block_on(sm.list_secrets().send()).expect("ListSecrets is allowed");
    let refused = block_on(
        sm.create_secret()
            .name(format!("kt-e2e-{id}"))
            .secret_string("not-a-secret")
            .send(),
    )
    .expect_err("CreateSecret is outside the session policy");
    let (status, body) = refusal(&refused);
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("<Code>AccessDenied</Code>")
            && body.contains("is not authorized to perform: secretsmanager:CreateSecret"),
        "{body}"
    );

    // What STS was asked: the session policy, the TTL as the duration,
    // the attribution as session tags and the initiator as source identity.
    let asked = moto.requests("AssumeRole");
    assert_eq!(asked.len(), 1, "{asked:?}");
    let r = &asked[0];
    assert_eq!(r["RoleArn"], setup.role_arn);
    assert_eq!(r["RoleSessionName"], session);
    assert_eq!(r["DurationSeconds"], "1200");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&r["Policy"]).unwrap(),
        serde_json::from_str::<serde_json::Value>(SESSION_POLICY).unwrap()
    );
    assert_eq!(r["SourceIdentity"], "alice@example.com");
    let mut tags = BTreeMap::new();
    for n in 1.. {
        let Some(key) = r.get(&format!("Tags.member.{n}.Key")) else {
            break;
        };
        tags.insert(key.as_str(), r[&format!("Tags.member.{n}.Value")].as_str());
    }
    for (k, v) in attribution(&id).into_iter().chain([("sensitivity", "low")]) {
        assert_eq!(tags.get(k).copied(), Some(v), "{tags:?}");
    }
    // The expiry STS answered is the asked duration away.
    let expires = chrono::DateTime::parse_from_rfc3339(cred["expiration"].as_str().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc);
    let started_at = chrono::DateTime::parse_from_rfc3339(started["started_at"].as_str().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc);
    let lasts = (expires - started_at).num_seconds();
    assert!((1195..=1205).contains(&lasts), "{lasts} s");

    // status, /metrics and the surface show the task and its session.
    let live = seen(&env, port);
    live.assert_one_live(&id, "sts");
    let object = live.surface[0]["credentials"][0]["object"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        object.starts_with(&format!("STS session {session} of {}", setup.role_arn))
            && object.contains(cred["access_key_id"].as_str().unwrap()),
        "{object}"
    );

    // `task end`: the deny policy ends the session at once.
    end_bot_task(&env, &id);
    let after_end = block_on(sm.list_secrets().send()).expect_err("refused after the end");
    let (status, body) = refusal(&after_end);
    assert_eq!(status, 403, "{body}");

    let after = seen(&env, port);
    after.assert_ended(&id, "sts");

    let log = daemon.stop();
    assert_nowhere(
        &env,
        &[&live.printed, &after.printed],
        &log,
        &[
            cred["secret_access_key"].as_str().unwrap(),
            cred["session_token"].as_str().unwrap(),
            &setup.secret_access_key,
        ],
    );
}

/// Black-box finding: an `aws_sts` issuer without `revoke_with_deny_policy`
/// cannot end a session early, so a decommission with such a task open
/// waits for it to expire and breaches a shorter revocation SLA, every
/// time; `check` said ok. It warns, naming the policy level, the agent,
/// the issuer and both durations; with the deny policy, or a `max_ttl`
/// within the SLA, it says nothing.
#[test]
fn check_warns_of_task_credentials_that_outlive_the_revocation_sla() {
    let issuer = |deny: bool| {
        format!(
            "revocation_sla = \"5m\"\n[issuers.sts]\ntype = \"aws_sts\"\nregion = \"us-east-1\"\nendpoint_url = \"http://127.0.0.1:9\"\nrevoke_with_deny_policy = {deny}\n"
        )
    };
    let grant = format!(
        "sts = {{ role_arn = \"arn:aws:iam::123456789012:role/invoice-tasks\", session_policy = '{SESSION_POLICY}' }}"
    );
    let check = |env: &Env| {
        let out = env.cli(&["check"]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = check(&env(&issuer(false), "10m", &grant, free_port()));
    assert!(
        stderr.contains("warning: policies.invoicing.levels.low grants agent bot credentials of issuer sts for up to 1h (max_ttl), longer than its revocation SLA of 5m"),
        "{stderr}"
    );
    assert!(
        stderr.contains("revoke_with_deny_policy = true"),
        "{stderr}"
    );
    let stderr = check(&env(&issuer(true), "10m", &grant, free_port()));
    assert!(!stderr.contains("revocation SLA"), "{stderr}");
}
