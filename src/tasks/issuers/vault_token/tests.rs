//! Config and grant checks (no server), and the issuer against the real
//! OpenBao of `scripts/services.sh` (KEYTURN_TEST_BAO_ADDR / _TOKEN, root
//! token). Every server test makes its own policies, paths and token role
//! with a random suffix, so they run in parallel with everyone's.

use macro_rules_attribute::apply;

use super::*;
use crate::config::validate::{Context, Issue};
use crate::model::RotationId;
use crate::tasks::issuers::IssuerConfig;
use crate::tasks::issuers::test_support::{
    assert_not_revoked, assert_revoked_now, attribution, attribution_fields, eventually,
    in_an_hour, issue, located, request,
};
use crate::test_support::server_test;
use serde_json::json;
use vaultrs::api::token::requests::{SetTokenRoleRequest, SetTokenRoleRequestBuilder};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};

const NEED_SERVICES: &str =
    "start the test services: `bash scripts/services.sh start` (or run `bash scripts/test.sh`)";

fn bao() -> (String, String) {
    let addr = std::env::var("KEYTURN_TEST_BAO_ADDR").expect(NEED_SERVICES);
    let token = std::env::var("KEYTURN_TEST_BAO_TOKEN").expect(NEED_SERVICES);
    (addr, token)
}

/// A plain client: the root's, or an agent's with its task token.
fn client(token: &str) -> VaultClient {
    let (addr, _) = bao();
    VaultClient::new(
        VaultClientSettingsBuilder::default()
            .address(addr)
            .token(token)
            .build()
            .unwrap(),
    )
    .unwrap()
}

fn root() -> VaultClient {
    client(&bao().1)
}

fn suffix() -> String {
    RotationId::generate().as_str()[..12].to_owned()
}

/// A task with an id of its own.
fn fresh_task() -> TaskAttribution {
    attribution(&format!("t{}", suffix()))
}

/// Issues `task` a token with `grant` for a minute: what was issued, and the
/// token.
async fn issue_token(
    issuer: &dyn TaskIssuer,
    task: &TaskAttribution,
    grant: &Grant,
) -> (Issued, String) {
    let issued = issue(issuer, task, grant, Duration::from_secs(60))
        .await
        .unwrap();
    let token = issued.secret["token"].expose_str().unwrap().to_owned();
    (issued, token)
}

/// What a task's token sees at a KV path: the value, or the HTTP status.
async fn read_as(token: &str, path: &str) -> Result<String, Option<u16>> {
    vaultrs::kv2::read::<serde_json::Value>(&client(token), "secret", path)
        .await
        .map(|v| v["value"].as_str().unwrap_or_default().to_owned())
        .map_err(|e| http_status(&e))
}

/// The server's view of a token, through the root token; `None` once the
/// server no longer knows the accessor.
async fn lookup(accessor: &str) -> Option<vaultrs::api::token::responses::LookupTokenResponse> {
    match vaultrs::token::lookup_accessor(&root(), accessor).await {
        Ok(r) => Some(r),
        Err(e) if unknown_accessor(&e) => None,
        Err(e) => panic!("lookup-accessor: {e}"),
    }
}

/// Two KV secrets, `a` and `b`, and a policy that may read `a` only.
struct Fixture {
    dir: tempfile::TempDir,
    suffix: String,
    policy: String,
    a: String,
    b: String,
}

impl Fixture {
    async fn new() -> Self {
        let suffix = suffix();
        let (a, b) = (format!("kt-{suffix}/a"), format!("kt-{suffix}/b"));
        let policy = format!("kt-task-{suffix}");
        let root = root();
        vaultrs::sys::policy::set(
            &root,
            &policy,
            &format!(r#"path "secret/data/{a}" {{ capabilities = ["read"] }}"#),
        )
        .await
        .unwrap();
        for (path, value) in [(&a, "alpha"), (&b, "bravo")] {
            vaultrs::kv2::set(&root, "secret", path, &json!({ "value": value }))
                .await
                .unwrap();
        }
        Fixture {
            dir: tempfile::tempdir().unwrap(),
            suffix,
            policy,
            a,
            b,
        }
    }

    /// An issuer logging in with `token` (from a token file).
    fn issuer(&self, token: &str, token_role: Option<&str>) -> Arc<dyn TaskIssuer> {
        let file = self.dir.path().join(format!("token-{}", suffix()));
        std::fs::write(&file, format!("{token}\n")).unwrap();
        TokenIssuerConfig {
            address: bao().0,
            token_file: Some(file),
            token_role: token_role.map(str::to_owned),
            timeout: Some("5s".into()),
            ..TokenIssuerConfig::default()
        }
        .build()
        .unwrap()
    }

    fn grant(&self) -> Grant {
        Grant(json!({ "policies": [self.policy] }))
    }

    /// The token role `kt-role-SUFFIX` (orphans with at most the fixture's
    /// policy, then as `more` sets it) and keyturn's own policy
    /// `kt-keyturn-SUFFIX` to mint through it (`plain`: through plain
    /// `auth/token/create` too) and revoke and look up by accessor:
    /// `(role, policy)`.
    async fn token_role(
        &self,
        plain: bool,
        more: impl FnOnce(&mut SetTokenRoleRequestBuilder),
    ) -> (String, String) {
        let root = root();
        let role = format!("kt-role-{}", self.suffix);
        let own_policy = format!("kt-keyturn-{}", self.suffix);
        let mut paths = vec![format!("auth/token/create/{role}")];
        if plain {
            paths.push("auth/token/create".to_owned());
        }
        paths
            .extend(["auth/token/revoke-accessor", "auth/token/lookup-accessor"].map(String::from));
        let rules: Vec<String> = paths
            .iter()
            .map(|p| format!(r#"path "{p}" {{ capabilities = ["update"] }}"#))
            .collect();
        vaultrs::sys::policy::set(&root, &own_policy, &rules.join("\n"))
            .await
            .unwrap();
        let mut builder = SetTokenRoleRequest::builder();
        builder
            .allowed_policies(vec![self.policy.clone()])
            .orphan(true);
        more(&mut builder);
        vaultrs::token::role::set(&root, &role, Some(&mut builder))
            .await
            .unwrap();
        (role, own_policy)
    }

    /// Deletes what [`Fixture::token_role`] made.
    async fn drop_token_role(&self, role: &str, own_policy: &str) {
        let root = root();
        vaultrs::token::role::delete(&root, role).await.unwrap();
        vaultrs::sys::policy::delete(&root, own_policy)
            .await
            .unwrap();
    }

    async fn cleanup(self) {
        let root = root();
        for path in [&self.a, &self.b] {
            vaultrs::kv2::delete_metadata(&root, "secret", path)
                .await
                .unwrap();
        }
        vaultrs::sys::policy::delete(&root, &self.policy)
            .await
            .unwrap();
    }
}

// ---------------------------------------------------------------------------
// Against the real OpenBao
// ---------------------------------------------------------------------------

#[apply(server_test!)]
async fn the_token_has_exactly_the_grant_and_ttl_and_is_revoked_at_revoke() {
    let f = Fixture::new().await;
    let issuer = f.issuer(&bao().1, None);
    let task = fresh_task();
    let grant = f.grant();
    let req = request(&task, &grant, Duration::from_secs(120));
    let issued = issuer.issue(&req).await.unwrap();
    let token = issued.secret["token"].expose_str().unwrap().to_owned();

    // What the agent is told.
    assert_eq!(issued.handle, issued.public["accessor"]);
    assert_eq!(issued.public["address"], bao().0);
    assert_eq!(issued.public["expires_at"], rfc3339(issued.expires_at));
    assert_eq!(
        issued.public.keys().collect::<Vec<_>>(),
        ["accessor", "address", "expires_at"]
    );
    assert!(issued.expires_at <= req.expires_at);
    assert!(req.expires_at.duration_since(issued.expires_at).unwrap() < Duration::from_secs(2));

    // What the server holds.
    let info = lookup(&issued.handle).await.expect("the token exists");
    assert_eq!(info.policies, [f.policy.as_str()], "exactly the grant's");
    let expire_time = chrono::DateTime::parse_from_rfc3339(info.expire_time.as_deref().unwrap())
        .unwrap()
        .with_timezone(&chrono::Utc);
    let asked = chrono::DateTime::<chrono::Utc>::from(req.expires_at);
    assert!(
        (expire_time - asked).num_milliseconds().abs() <= 1000,
        "server expiry {expire_time} vs asked {asked}"
    );
    assert!(expire_time <= asked, "never past the task's expiry");
    assert_eq!(
        info.explicit_max_ttl, info.creation_ttl,
        "cannot be extended"
    );
    assert!(
        (119..=120).contains(&info.creation_ttl),
        "{}",
        info.creation_ttl
    );
    assert_eq!(info.renewable, Some(false));
    assert_eq!(info.num_uses, 0, "unlimited when the grant does not say");
    assert_eq!(info.path, "auth/token/create");
    assert_eq!(
        info.display_name,
        format!("token-keyturn-invoice-bot-{}", task.task_id)
    );
    let meta: BTreeMap<String, String> = info.meta.unwrap().into_iter().collect();
    assert_eq!(meta, attribution_fields(&task));

    // What the token can do.
    assert_eq!(read_as(&token, &f.a).await, Ok("alpha".to_owned()));
    assert_eq!(read_as(&token, &f.b).await, Err(Some(403)));
    assert_not_revoked(&*issuer, &task, Some(&issued.handle)).await;

    // Revoked: the server forgets it and it no longer works.
    assert_revoked_now(&*issuer, &task, Some(&issued.handle)).await;
    assert!(lookup(&issued.handle).await.is_none());
    assert_eq!(read_as(&token, &f.a).await, Err(Some(403)));
    // Twice is harmless.
    assert_revoked_now(&*issuer, &task, Some(&issued.handle)).await;
    f.cleanup().await;
}

#[apply(server_test!)]
async fn num_uses_is_honoured() {
    let f = Fixture::new().await;
    let issuer = f.issuer(&bao().1, None);
    let task = fresh_task();
    let grant = Grant(json!({ "policies": [f.policy], "num_uses": 2, "token_type": "service" }));
    let (issued, token) = issue_token(&*issuer, &task, &grant).await;
    assert_eq!(lookup(&issued.handle).await.unwrap().num_uses, 2);
    assert_eq!(read_as(&token, &f.a).await, Ok("alpha".to_owned()));
    assert_eq!(read_as(&token, &f.a).await, Ok("alpha".to_owned()));
    assert_eq!(read_as(&token, &f.a).await, Err(Some(403)), "third use");
    // Used up is gone (the server revokes it in the background: look a few
    // times), and revoking it is still fine.
    let (by, task_ref, handle) = (&issuer, &task, issued.handle.as_str());
    let gone =
        eventually(move || async move { by.verify_revoked(task_ref, Some(handle)).await.unwrap() })
            .await;
    assert!(gone, "a used-up token is still found by its accessor");
    assert_eq!(
        issuer
            .revoke(&task, Some(&issued.handle), in_an_hour())
            .await
            .unwrap(),
        Revoked::Now
    );
    f.cleanup().await;
}

/// Why `token_role` is recommended: a token minted through an `orphan`
/// role outlives keyturn's own token; one minted with plain
/// `auth/token/create` is its child and dies with it.
#[apply(server_test!)]
async fn tokens_of_a_token_role_are_orphans_that_outlive_keyturns_own_token() {
    let f = Fixture::new().await;
    let root = root();
    let (role, own_policy) = f
        .token_role(true, |b| {
            b.renewable(false).token_explicit_max_ttl("1h");
        })
        .await;
    // keyturn's own token: not root, a child of the test's root token. It
    // holds the task policy too, which plain create requires.
    let own = vaultrs::token::new(
        &root,
        Some(
            vaultrs::api::token::requests::CreateTokenRequest::builder()
                .policies(vec![own_policy.clone(), f.policy.clone()])
                .ttl("10m"),
        ),
    )
    .await
    .unwrap();
    let via_role = f.issuer(&own.client_token, Some(&role));
    let plain = f.issuer(&own.client_token, None);
    let task = fresh_task();
    let grant = f.grant();
    let req = request(&task, &grant, Duration::from_secs(300));
    let orphan = via_role.issue(&req).await.unwrap();
    let child = plain.issue(&req).await.unwrap();
    let orphan_info = lookup(&orphan.handle).await.unwrap();
    assert!(orphan_info.orphan);
    assert_eq!(orphan_info.path, format!("auth/token/create/{role}"));
    assert_eq!(orphan_info.policies, [f.policy.as_str()]);
    assert!(!lookup(&child.handle).await.unwrap().orphan);

    // The role's allowed_policies bound what a grant may get.
    let other = Grant(json!({ "policies": [f.policy, format!("kt-other-{}", f.suffix)] }));
    let e = via_role
        .issue(&request(&task, &other, Duration::from_secs(60)))
        .await
        .expect_err("a policy outside the role's allowed_policies is refused");
    // The server refused the create request (400): no token exists, and
    // the task manager ends the task at once rather than wait for one.
    assert!(e.nothing_left, "{e}");
    let e = e.error;
    assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
    assert!(e.message.starts_with("issuer vault_token ("), "{e}");
    assert!(e.message.contains(&task.task_id), "{e}");
    assert!(!e.message.contains(&own.client_token));

    // keyturn's own token ends (its AppRole max TTL, or an operator).
    vaultrs::token::revoke(&root, &own.client_token)
        .await
        .unwrap();
    let orphan_token = orphan.secret["token"].expose_str().unwrap();
    let child_token = child.secret["token"].expose_str().unwrap();
    assert_eq!(read_as(orphan_token, &f.a).await, Ok("alpha".to_owned()));
    assert!(lookup(&orphan.handle).await.is_some());
    // Child revocation may finish in the background.
    let child_handle = child.handle.as_str();
    let child_gone = eventually(move || async move { lookup(child_handle).await.is_none() }).await;
    assert!(child_gone, "the child died with keyturn's token");
    assert_eq!(read_as(child_token, &f.a).await, Err(Some(403)));

    vaultrs::token::revoke_accessor(&root, &orphan.handle)
        .await
        .unwrap();
    f.drop_token_role(&role, &own_policy).await;
    f.cleanup().await;
}

/// Defect: a token role that shortens the token (an explicit max TTL
/// below the task's, `token_num_uses`) was accepted silently, and the task
/// outlived its token. A start refuses such a token (revoked at once,
/// naming the role's setting), and `check --online` reads the role and
/// says so before any start.
#[apply(server_test!)]
async fn a_token_role_that_cuts_the_token_short_is_refused_at_start_and_by_check() {
    type Setting = fn(&mut SetTokenRoleRequestBuilder);
    let f = Fixture::new().await;
    let grant = f.grant();
    let ten_minutes = Duration::from_secs(600);
    let cases: [(&str, Setting); 2] = [
        ("token_explicit_max_ttl", |b| {
            b.token_explicit_max_ttl("5m");
        }),
        ("token_num_uses", |b| {
            b.token_num_uses(5u64);
        }),
    ];
    for (setting, more) in cases {
        let (role, own_policy) = f.token_role(false, more).await;
        let issuer = f.issuer(&bao().1, Some(&role));
        let task = fresh_task();
        let e = issuer
            .issue(&request(&task, &grant, ten_minutes))
            .await
            .expect_err("a token cut short is refused");
        // Made, then revoked at once: nothing is left of it.
        assert!(e.nothing_left, "{e}");
        let e = e.error;
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        for says in [
            format!("token role `{role}`"),
            setting.to_owned(),
            "it was revoked".to_owned(),
        ] {
            assert!(e.message.contains(&says), "{setting}: {says} missing: {e}");
        }
        let e = issuer
            .check_grant(&grant, ten_minutes)
            .await
            .expect_err("check --online refuses the role");
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        assert!(e.message.contains(setting), "{e}");
        f.drop_token_role(&role, &own_policy).await;
    }
    // A role whose limits the level fits: both accept; a longer level not.
    let (role, own_policy) = f
        .token_role(false, |b| {
            b.token_explicit_max_ttl("1h");
        })
        .await;
    let issuer = f.issuer(&bao().1, Some(&role));
    assert_eq!(
        issuer
            .check_grant(&grant, Duration::from_secs(3600))
            .await
            .unwrap(),
        None
    );
    let e = issuer
        .check_grant(&grant, Duration::from_secs(7200))
        .await
        .unwrap_err();
    assert!(e.message.contains("token_explicit_max_ttl (3600s)"), "{e}");
    let task = fresh_task();
    let issued = issuer
        .issue(&request(&task, &grant, ten_minutes))
        .await
        .unwrap();
    assert_revoked_now(&*issuer, &task, Some(&issued.handle)).await;
    // Defect (black-box): a grant of a policy the role does not allow
    // passed `check --online`, and every start then failed.
    let other = Grant(json!({ "policies": [format!("kt-not-in-role-{}", f.suffix)] }));
    let e = issuer
        .check_grant(&other, Duration::from_secs(600))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
    assert!(
        e.message.contains("its allowed_policies") && e.message.contains("kt-not-in-role-"),
        "{e}"
    );
    f.drop_token_role(&role, &own_policy).await;
    f.cleanup().await;
}

/// The issuer logs in like the `vault` vault does (the same session code):
/// AppRole on first use, the role's policies on keyturn's own token.
#[apply(server_test!)]
async fn approle_login_then_issue_through_a_token_role() {
    let f = Fixture::new().await;
    let root = root();
    let mount = format!("approle-{}", f.suffix);
    vaultrs::sys::auth::enable(&root, &mount, "approle", None)
        .await
        .unwrap();
    let (role, own_policy) = f.token_role(false, |_| {}).await;
    vaultrs::auth::approle::role::set(
        &root,
        &mount,
        "keyturn",
        Some(
            vaultrs::api::auth::approle::requests::SetAppRoleRequest::builder()
                .token_ttl("1m")
                .token_policies(vec![own_policy.clone()]),
        ),
    )
    .await
    .unwrap();
    let (role_id, secret_id) = crate::test_support::approle_ids(&root, &mount).await;
    let (role_file, secret_file) = (f.dir.path().join("role-id"), f.dir.path().join("secret-id"));
    std::fs::write(&role_file, &role_id).unwrap();
    std::fs::write(&secret_file, &secret_id).unwrap();
    let issuer = TokenIssuerConfig {
        address: bao().0,
        approle: Some(AppRoleConfig {
            mount: Some(mount.clone()),
            role_id_file: role_file,
            secret_id_file: secret_file,
        }),
        token_role: Some(role.clone()),
        ..TokenIssuerConfig::default()
    }
    .build()
    .unwrap();
    issuer.check().await.unwrap();
    let task = fresh_task();
    let grant = f.grant();
    let (issued, token) = issue_token(&*issuer, &task, &grant).await;
    assert_eq!(read_as(&token, &f.a).await, Ok("alpha".to_owned()));
    assert!(lookup(&issued.handle).await.unwrap().orphan);
    assert_revoked_now(&*issuer, &task, Some(&issued.handle)).await;
    assert_eq!(read_as(&token, &f.a).await, Err(Some(403)));

    vaultrs::sys::auth::disable(&root, &mount).await.unwrap();
    f.drop_token_role(&role, &own_policy).await;
    f.cleanup().await;
}

#[apply(server_test!)]
async fn check_looks_up_keyturns_own_token() {
    let f = Fixture::new().await;
    f.issuer(&bao().1, None).check().await.unwrap();
    let canary = format!("kt-canary-{}", suffix());
    let e = f.issuer(&canary, None).check().await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unauthorized, "{e}");
    assert!(e.message.contains("auth/token/lookup-self"), "{e}");
    assert!(!e.message.contains(&canary), "{e}");
    f.cleanup().await;
}

/// No secret in errors, logs, `Debug`, the handle or `public`: the real
/// token, keyturn's own (root) token, and a canary standing in for it.
#[apply(server_test!)]
async fn no_secret_in_errors_debug_handle_or_public() {
    let f = Fixture::new().await;
    // Everything logged, down to vaultrs's and the HTTP client's traces.
    let (guard, logs) = crate::test_support::capture_logs();
    let issuer = f.issuer(&bao().1, None);
    let task = fresh_task();
    let grant = f.grant();
    let (issued, token) = issue_token(&*issuer, &task, &grant).await;
    assert!(token.len() > 20, "a real token");
    let shown = format!("{issued:?}");
    assert!(!shown.contains(&token), "{shown}");
    assert!(shown.contains("[redacted]"), "{shown}");
    assert!(!issued.handle.contains(&token));
    for v in issued.public.values() {
        assert!(!v.contains(&token));
    }
    issuer
        .revoke(&task, Some(&issued.handle), in_an_hour())
        .await
        .unwrap();

    // keyturn's own token refused: every call's error, without it.
    let canary = format!("kt-canary-{}", suffix());
    let wrong = f.issuer(&canary, None);
    let errors = [
        wrong
            .issue(&request(&task, &grant, Duration::from_secs(60)))
            .await
            .unwrap_err()
            .error,
        wrong
            .revoke(&task, Some(&issued.handle), in_an_hour())
            .await
            .unwrap_err(),
        wrong
            .verify_revoked(&task, Some(&issued.handle))
            .await
            .unwrap_err(),
        wrong.check().await.unwrap_err(),
    ];
    for e in errors {
        assert_eq!(e.kind, ErrorKind::Unauthorized, "{e}");
        let all = format!("{e} {e:?}");
        assert!(!all.contains(&canary), "{all}");
        assert!(!all.contains(&token), "{all}");
    }
    let config = TokenIssuerConfig {
        address: bao().0,
        token_env: Some("KEYTURN_TEST_BAO_TOKEN".into()),
        ..TokenIssuerConfig::default()
    };
    assert!(!format!("{config:?}").contains(&bao().1));
    drop(guard);
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        logs.contains("auth/token/create"),
        "the capture works: {logs}"
    );
    assert!(!logs.contains(&token), "{logs}");
    assert!(!logs.contains(&canary), "{logs}");
    assert!(!logs.contains(&bao().1), "{logs}");
    f.cleanup().await;
}

// ---------------------------------------------------------------------------
// Without a server
// ---------------------------------------------------------------------------

/// An issuer whose token file does not exist: anything that reaches for the
/// server fails, so the checks below prove they come first.
fn offline() -> Arc<dyn TaskIssuer> {
    TokenIssuerConfig {
        address: "http://127.0.0.1:9".into(),
        token_file: Some("/nonexistent/keyturn/token".into()),
        max_ttl: Some("10m".into()),
        ..TokenIssuerConfig::default()
    }
    .build()
    .expect("build does no I/O")
}

/// Nothing listens at the address: the create request was never sent, so
/// no token exists and the failed start ends at once.
#[tokio::test]
async fn an_issue_that_cannot_connect_left_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "kt-not-a-real-token").unwrap();
    let issuer = TokenIssuerConfig {
        address: "http://127.0.0.1:9".into(),
        token_file: Some(token),
        max_ttl: Some("10m".into()),
        ..TokenIssuerConfig::default()
    }
    .build()
    .unwrap();
    let task = fresh_task();
    let grant = Grant(json!({ "policies": ["read-a"] }));
    let e = issuer
        .issue(&request(&task, &grant, Duration::from_secs(60)))
        .await
        .expect_err("nothing listens on port 9");
    assert!(e.nothing_left, "{e}");
    assert!(e.error.message.contains("cannot reach"), "{e}");
}

#[tokio::test]
async fn without_a_handle_revoke_says_when_the_token_ends_at_the_latest() {
    let issuer = offline();
    let task = fresh_task();
    let before = SystemTime::now();
    let Revoked::ExpiresAt(at) = issuer.revoke(&task, None, in_an_hour()).await.unwrap() else {
        panic!("nothing to revoke without an accessor");
    };
    assert!(at >= before + Duration::from_secs(600), "now + max_ttl");
    assert!(at <= SystemTime::now() + Duration::from_secs(600));
    // Defect: it was now + max_ttl even for a task ending sooner, so a
    // failed start stayed `expiring`, and overdue, long after the task's
    // expiry. The token's TTL was the time left until the task's expiry.
    let task_ends = SystemTime::now() + Duration::from_secs(30);
    assert_eq!(
        issuer.revoke(&task, None, task_ends).await.unwrap(),
        Revoked::ExpiresAt(task_ends)
    );
    let e = issuer.verify_revoked(&task, None).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Invalid);
    assert!(e.message.contains("no accessor was recorded"), "{e}");
    for bad in ["", "a/../b", "x y", "abc\n"] {
        let e = issuer
            .revoke(&task, Some(bad), in_an_hour())
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{bad:?}: {e}");
        assert!(e.message.contains("not a token accessor"), "{e}");
    }
    assert_eq!(issuer.describe(), "vault_token:http://127.0.0.1:9");
}

/// The server and namespace an accessor belongs to: another address or
/// namespace is another system, where the accessor is unknown.
#[tokio::test]
async fn the_origin_is_the_address_and_namespace() {
    let origin = |address: &str, namespace: Option<&str>| {
        let issuer = TokenIssuerConfig {
            address: address.into(),
            namespace: namespace.map(str::to_owned),
            token_file: Some("/nonexistent/keyturn/token".into()),
            ..TokenIssuerConfig::default()
        }
        .build()
        .unwrap();
        async move { issuer.origin().await.unwrap().unwrap() }
    };
    let a = origin("https://Bao.example.com:8200/", None).await;
    assert_eq!(a, "https://bao.example.com:8200");
    assert_eq!(origin("https://bao.example.com:8200", Some("")).await, a);
    assert_ne!(origin("https://bao2.example.com:8200", None).await, a);
    assert_eq!(
        origin("https://bao.example.com:8200", Some("/team-a/")).await,
        "https://bao.example.com:8200 namespace team-a"
    );
    assert_ne!(
        origin("https://bao.example.com:8200", Some("team-b")).await,
        origin("https://bao.example.com:8200", Some("team-a")).await
    );
}

#[tokio::test]
async fn issue_refuses_bad_grants_and_ttls_before_calling_the_server() {
    let issuer = offline();
    let task = fresh_task();
    let good = Grant(json!({ "policies": ["read-a"] }));
    let cases = [
        (
            Grant(json!({ "policies": ["read-a"], "token_type": "batch" })),
            Duration::from_secs(60),
            "cannot be revoked one by one",
        ),
        (
            Grant(json!({ "policies": [] })),
            Duration::from_secs(60),
            "policies must not be empty",
        ),
        (
            Grant(json!({ "policies": ["read-a"], "period": "1h" })),
            Duration::from_secs(60),
            "unknown field `period`",
        ),
        (
            good.clone(),
            Duration::from_secs(601),
            "longer than this issuer's max_ttl (600s)",
        ),
    ];
    for (grant, ttl, why) in cases {
        let e = issuer
            .issue(&request(&task, &grant, ttl))
            .await
            .unwrap_err();
        assert!(e.nothing_left, "{e}");
        let e = e.error;
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        assert!(e.message.contains(why), "{why}: {e}");
        assert!(e.message.contains(&task.task_id), "{e}");
    }
    let past = IssueRequest {
        task: &task,
        grant: &good,
        ttl: Duration::from_secs(60),
        expires_at: SystemTime::now() - Duration::from_secs(1),
    };
    let e = issuer.issue(&past).await.unwrap_err();
    assert!(e.nothing_left, "{e}");
    assert!(e.error.message.contains("expiry has passed"), "{e}");
    // The good grant does reach for the server (and its missing token file).
    let e = issuer
        .issue(&request(&task, &good, Duration::from_secs(60)))
        .await
        .unwrap_err();
    assert!(e.nothing_left, "no request was sent: {e}");
    let e = e.error;
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    assert!(e.message.contains("/nonexistent/keyturn/token"), "{e}");
}

// ---------------------------------------------------------------------------
// Config and grant checks, through the Validator
// ---------------------------------------------------------------------------

fn ctx() -> Context {
    Context {
        source: PathBuf::from("/etc/keyturn/keyturn.toml"),
    }
}

/// `[issuers.bao]` parsed through the registry and checked.
fn checked(toml_text: &str) -> (IssuerConfig, Vec<Issue>) {
    let mut config: IssuerConfig = toml::from_str(toml_text).unwrap();
    let ctx = ctx();
    let mut v = Validator::for_section(&ctx);
    let issuers = Loc::top("issuers");
    config.plugin_mut().check(&mut v, issuers.key("bao"));
    (config, v.into_issues())
}

#[test]
fn a_good_config_is_completed_in_place() {
    let (config, issues) = checked(
        r#"type = "vault_token"
address = "https://bao.example.com:8200/"
approle = { role_id_file = "role-id", secret_id_file = "/etc/keyturn/secret-id" }
ca_file = "ca.pem"
namespace = "team-a"
token_role = "keyturn-tasks"
max_ttl = "4h"
timeout = "10s"
"#,
    );
    assert_eq!(issues, []);
    #[allow(unreachable_patterns)] // other issuers join the registry
    let c = match config {
        IssuerConfig::VaultToken(c) => c,
        _ => panic!("not a vault_token issuer"),
    };
    assert_eq!(c.address, "https://bao.example.com:8200");
    let approle = c.approle.as_ref().unwrap();
    assert_eq!(approle.role_id_file, PathBuf::from("/etc/keyturn/role-id"));
    assert_eq!(c.ca_file, Some(PathBuf::from("/etc/keyturn/ca.pem")));
    assert_eq!(c.max_ttl(), Duration::from_secs(4 * 3600));
    assert_eq!(c.token_role.as_deref(), Some("keyturn-tasks"));
}

#[test]
fn every_config_problem_is_reported_at_its_key() {
    let (_, issues) = checked(
        r#"type = "vault_token"
address = "ftp://bao"
token_file = "t"
token_env = "BAO_TOKEN"
namespace = "a b"
token_role = "a/b"
max_ttl = "0s"
timeout = "soon"
"#,
    );
    let got = located(&issues);
    let expect = [
        ("issuers.bao.address", "the scheme must be"),
        ("issuers.bao", "set exactly one way to log in"),
        ("issuers.bao.timeout", "invalid duration `soon`"),
        ("issuers.bao.namespace", "invalid namespace"),
        ("issuers.bao.token_role", "invalid token role `a/b`"),
        ("issuers.bao.max_ttl", "is zero"),
    ];
    assert_eq!(got.len(), expect.len(), "{got:#?}");
    for (path, text) in expect {
        assert!(
            got.iter().any(|(p, m)| p == path && m.contains(text)),
            "{path}: {text} in {got:#?}"
        );
    }
    let (_, issues) = checked(
        "type = \"vault_token\"\naddress = \"http://bao:8200\"\ntoken_file = \"t\"\nmax_ttl = \"500ms\"\n",
    );
    assert_eq!(
        located(&issues),
        [(
            "issuers.bao.max_ttl".to_owned(),
            "max_ttl `500ms` is under a second: token TTLs are whole seconds".to_owned()
        )]
    );
}

#[test]
fn unknown_keys_are_refused() {
    let e = toml::from_str::<IssuerConfig>(
        "type = \"vault_token\"\naddress = \"http://bao:8200\"\ntoken_file = \"t\"\nmount = \"secret\"\n",
    )
    .unwrap_err();
    assert!(e.to_string().contains("unknown field `mount`"), "{e}");
}

#[test]
fn grants_are_checked_at_their_keys() {
    let (config, _) =
        checked("type = \"vault_token\"\naddress = \"http://bao:8200\"\ntoken_file = \"t\"\n");
    let ctx = ctx();
    let grant_problems = |g: serde_json::Value| {
        let mut v = Validator::for_section(&ctx);
        let policies = Loc::top("policies");
        let level = policies.key("books");
        let low = level.key("low");
        config
            .plugin()
            .check_grant(&Grant(g), &mut v, low.key("bao"));
        located(&v.into_issues())
    };
    assert_eq!(
        grant_problems(json!({ "policies": ["read-a", "team/read-b"], "num_uses": 5 })),
        []
    );
    let got = grant_problems(json!({
        "policies": ["root", "Read-All", "read-a", "read-a", "a,b"],
        "num_uses": 0,
        "token_type": "batch",
    }));
    let at = |k: &str| format!("policies.books.low.bao.{k}");
    let expect = [
        (at("policies"), "the `root` policy is never granted"),
        (at("policies"), "invalid policy name `Read-All`"),
        (at("policies"), "policy `read-a` is listed twice"),
        (at("policies"), "invalid policy name `a,b`"),
        (at("num_uses"), "num_uses = 0 would mean unlimited"),
        (
            at("token_type"),
            "batch tokens cannot be revoked one by one",
        ),
    ];
    assert_eq!(got.len(), expect.len(), "{got:#?}");
    for ((path, message), (want_path, want)) in got.iter().zip(&expect) {
        assert_eq!(path, want_path);
        assert!(message.contains(want), "{message} vs {want}");
    }
    assert_eq!(
        grant_problems(json!({ "policies": [] })),
        [(
            at("policies"),
            "policies must not be empty: list the OpenBao policies the task's token gets"
                .to_owned()
        )]
    );
    let got = grant_problems(json!({ "policies": ["a"], "period": "1h" }));
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].0, "policies.books.low.bao");
    assert!(got[0].1.contains("unknown field `period`"), "{}", got[0].1);
    let got = grant_problems(json!({ "num_uses": 3 }));
    assert!(got[0].1.contains("missing field `policies`"), "{got:#?}");
}
