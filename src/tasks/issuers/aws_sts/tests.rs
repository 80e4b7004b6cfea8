//! The `aws_sts` issuer's tests: pure ones, then those against a private
//! moto with IAM enforced (`--features real-servers`).
//!
//! Why a private moto: the shared one of `scripts/services.sh` accepts any
//! credentials, so it cannot show a call being refused. Each real-server
//! test here starts its own `moto.server` (from `KEYTURN_TEST_PYTHON`, the
//! services' venv) on a free loopback port, creates an IAM user for keyturn
//! and a role for the tasks (boto3, while moto does not authenticate yet),
//! then turns IAM enforcement on (`POST /moto-api/reset-auth` with `0`:
//! every later request is authenticated and authorised). The server is
//! killed when the test ends. moto records every request it received
//! (`MOTO_ENABLE_RECORDING`) into the test's temp dir: that is how the tests
//! read the AssumeRole request as STS received it.
//!
//! What moto does and does not do (moto 5.2.5, `moto/iam/access_control.py`,
//! `moto/sts/models.py`): it authorises an assumed-role session with the
//! role's own policies (inline and attached) only. It does **not** apply the
//! session policy, and it ignores `Tags`, `SourceIdentity` and
//! `TransitiveTagKeys` (it stores none of them). So the tests show the
//! refusal with a call outside both the session policy and the role's
//! policy, and check the session policy, tags, source identity and duration
//! in the request moto received; the duration also in the expiration moto
//! answered.
//!
//! Two more moto gaps met here: it recomputes the SigV4 signature of a form
//! body that holds a space (`%20` from the Rust SDK) differently and answers
//! `SignatureDoesNotMatch`, so the attribution of these tests has no space
//! (the pure tests cover the mapping of spaces); and it wraps an STS error in
//! `<Errors>` (EC2's format), which the SDK cannot read, so a refusal reaches
//! keyturn as an HTTP 403 without a code (still `unauthorized`).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use macro_rules_attribute::apply;

use super::*;
use crate::config::validate::{Anchor, Issue};
use crate::tasks::issuers::test_support::{
    assert_error, assert_not_revoked, assert_revoked_now, attribution as task, attribution_fields,
    in_an_hour, issue, located, request,
};
use crate::test_support::server_test;

// -- pure ------------------------------------------------------------------

fn unique_task() -> String {
    let n: u64 = rand::random();
    format!("t{n:016x}")
}

const POLICY: &str = r#"{
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "secretsmanager:ListSecrets", "Resource": "*"}]
}"#;

fn grant_issues(grant: serde_json::Value) -> Vec<Issue> {
    let config = StsIssuerConfig::default();
    let grant = Grant(grant);
    let policies = Loc::top("policies");
    Validator::issues_of(|v| config.check_grant(&grant, v, policies.key("p").key("low").key("sts")))
}

fn config_issues(mut config: StsIssuerConfig) -> Vec<Issue> {
    let issuers = Loc::top("issuers");
    Validator::issues_of(|v| config.check(v, issuers.key("sts")))
}

#[test]
fn a_good_config_and_grant_have_no_issues() {
    let config = StsIssuerConfig {
        region: Some("eu-west-1".into()),
        endpoint_url: Some("https://sts.eu-west-1.amazonaws.com".into()),
        profile: Some("keyturn".into()),
        timeout: Some("10s".into()),
        revoke_with_deny_policy: true,
        iam_endpoint_url: Some("https://iam.amazonaws.com".into()),
    };
    assert_eq!(config_issues(config), vec![]);
    assert_eq!(config_issues(StsIssuerConfig::default()), vec![]);
    let grant = serde_json::json!({
        "role_arn": "arn:aws:iam::123456789012:role/agents/invoice-tasks",
        "session_policy": POLICY,
        "external_id": "keyturn-acme",
    });
    assert_eq!(grant_issues(grant), vec![]);
    let from_file = serde_json::json!({
        "role_arn": "arn:aws-us-gov:iam::123456789012:role/x",
        "session_policy_file": "/etc/keyturn/policies/low.json",
    });
    assert_eq!(grant_issues(from_file), vec![]);
}

#[test]
fn config_checks_report_every_problem_located() {
    let issues = config_issues(StsIssuerConfig {
        region: Some(" ".into()),
        endpoint_url: Some("sts.amazonaws.com".into()),
        profile: None,
        timeout: Some("0s".into()),
        revoke_with_deny_policy: false,
        iam_endpoint_url: Some("https://iam.amazonaws.com".into()),
    });
    let got = located(&issues);
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(got[0].0, "issuers.sts.region");
    assert!(got[0].1.contains("region must not be empty"), "{got:?}");
    assert_eq!(got[1].0, "issuers.sts.endpoint_url");
    assert!(got[1].1.contains("it has no scheme"), "{got:?}");
    assert_eq!(got[2].0, "issuers.sts.iam_endpoint_url");
    assert_eq!(issues[2].anchor, Anchor::Key);
    assert!(
        got[2]
            .1
            .contains("only with revoke_with_deny_policy = true"),
        "{got:?}"
    );
    assert_eq!(got[3].0, "issuers.sts.timeout");
    assert!(got[3].1.contains("is zero"), "{got:?}");

    let got = located(&config_issues(StsIssuerConfig {
        revoke_with_deny_policy: true,
        iam_endpoint_url: Some("iam".into()),
        ..StsIssuerConfig::default()
    }));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "issuers.sts.iam_endpoint_url");
    assert!(got[0].1.contains("invalid URL"), "{got:?}");
}

#[test]
fn grant_checks_report_every_problem_located() {
    let at = "policies.p.low.sts";
    let issues = grant_issues(serde_json::json!({
        "role_arn": "arn:aws:iam::12345:user/bob",
        "session_policy": POLICY,
        "session_policy_file": "/etc/keyturn/p.json",
        "external_id": "no spaces please",
    }));
    let got = located(&issues);
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[0].0, format!("{at}.role_arn"));
    assert!(
        got[0].1.contains("the account must be 12 digits")
            && got[0].1.contains("arn:aws:iam::123456789012:role/"),
        "{got:?}"
    );
    assert_eq!(got[1].0, format!("{at}.session_policy_file"));
    assert_eq!(issues[1].anchor, Anchor::Key);
    assert!(got[1].1.contains("not both"), "{got:?}");
    assert_eq!(got[2].0, format!("{at}.external_id"));
    assert!(got[2].1.contains("contains ' '"), "{got:?}");

    let got = located(&grant_issues(serde_json::json!({
        "role_arn": "arn:aws:iam::123456789012:role/x",
    })));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, at);
    assert!(got[0].1.contains("a session policy is required"), "{got:?}");

    let got = located(&grant_issues(serde_json::json!({
        "role_arn": "arn:aws:iam::123456789012:role/x",
        "session_policy_file": "policies/low.json",
    })));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, format!("{at}.session_policy_file"));
    assert!(got[0].1.contains("absolute path"), "{got:?}");

    // Unknown keys and a missing role_arn: the grant does not deserialize.
    for (grant, what) in [
        (
            serde_json::json!({"role_arn": "arn:aws:iam::123456789012:role/x", "session_policy": POLICY, "policy_arns": []}),
            "unknown field `policy_arns`",
        ),
        (
            serde_json::json!({"session_policy": POLICY}),
            "missing field `role_arn`",
        ),
    ] {
        let got = located(&grant_issues(grant));
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, at);
        assert!(got[0].1.contains(what), "{got:?}");
    }
}

#[test]
fn session_policies_are_checked_as_sts_counts_them() {
    let at = "policies.p.low.sts.session_policy";
    let with_policy = |p: &str| {
        located(&grant_issues(serde_json::json!({
            "role_arn": "arn:aws:iam::123456789012:role/x",
            "session_policy": p,
        })))
    };
    let got = with_policy("{\"Statement\": [");
    assert_eq!(got, vec![(at.to_owned(), got[0].1.clone())]);
    assert!(got[0].1.contains("not valid JSON"), "{got:?}");
    let got = with_policy("[1, 2]");
    assert!(got[0].1.contains("must be a JSON object"), "{got:?}");
    let got = with_policy("{\"Version\": \"2012-10-17\"}");
    assert!(got[0].1.contains("no \"Statement\""), "{got:?}");
    let got = with_policy("{\"Statement\": [], \"Sid\": \"\u{0100}\"}");
    assert!(got[0].1.contains("U+0100"), "{got:?}");

    // The limit counts the packed text: whitespace is free.
    let packed_len = |n: usize| {
        // {"Statement":[],"X":"aaa…"} is 23 characters plus n.
        format!(
            "{{\n  \"Statement\": [ ],\n  \"X\": \"{}\"\n}}",
            "a".repeat(n)
        )
    };
    let fits = packed_len(MAX_POLICY_CHARS - 23);
    assert_eq!(pack_policy(&fits).unwrap().len(), MAX_POLICY_CHARS);
    assert_eq!(with_policy(&fits), vec![]);
    let got = with_policy(&packed_len(MAX_POLICY_CHARS - 22));
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].1.contains("2049 characters") && got[0].1.contains("at most 2048"),
        "{got:?}"
    );
}

#[test]
fn the_registry_reads_type_aws_sts() {
    #[derive(serde::Deserialize)]
    struct Doc {
        issuers: BTreeMap<String, super::super::IssuerConfig>,
    }
    let doc: Doc = toml::from_str(
        "[issuers.cloud]\ntype = \"aws_sts\"\nregion = \"eu-west-1\"\nendpoint_url = \"http://127.0.0.1:5000\"\n",
    )
    .expect("parses");
    let super::super::IssuerConfig::AwsSts(c) = &doc.issuers["cloud"] else {
        panic!("`type = \"aws_sts\"` is the aws_sts issuer")
    };
    assert_eq!(c.region.as_deref(), Some("eu-west-1"));
    assert_eq!(c.endpoint_url.as_deref(), Some("http://127.0.0.1:5000"));
    let e = toml::from_str::<Doc>("[issuers.cloud]\ntype = \"aws_sts\"\nrole = \"x\"\n")
        .err()
        .expect("an unknown key is refused");
    assert!(e.to_string().contains("unknown field `role`"), "{e}");
}

#[test]
fn attribution_is_sanitised_deterministically_into_sts_patterns() {
    // Tag values: letters, digits, space and _.:/=+-@ stay.
    assert_eq!(
        tag_value("alice@example.com run:1/2=3+4-5_6."),
        "alice@example.com run:1/2=3+4-5_6."
    );
    assert_eq!(tag_value("José <ops>; \"x\""), "Jos_ _ops__ _x_");
    assert_eq!(tag_value(""), "");
    assert_eq!(tag_value(&"é".repeat(300)), "_".repeat(256));
    assert_eq!(tag_value(&"a".repeat(300)).len(), 256);

    // SourceIdentity: [\w+=,.@-], 2..=64.
    assert_eq!(source_identity("alice@example.com"), "alice@example.com");
    assert_eq!(source_identity("Bob Smith (ops)"), "Bob_Smith__ops_");
    assert_eq!(source_identity("a"), "a_");
    assert_eq!(source_identity(""), "__");
    assert_eq!(source_identity(&"x".repeat(100)), "x".repeat(64));

    // RoleSessionName: keyturn-<task_id>, at most 64.
    assert_eq!(session_name("0123abcd"), "keyturn-0123abcd");
    assert_eq!(session_name(&"a".repeat(32)).len(), 40);
    assert_eq!(session_name(&"a/b".repeat(40)).len(), 64);
    assert!(session_name("a/b").ends_with("a_b"));

    let tags = session_tags(&TaskAttribution {
        use_case: "month-end close (EU)".into(),
        ..task("t1")
    });
    let keys: Vec<&str> = tags.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        keys,
        [
            "task_id",
            "agent",
            "tenant",
            "use_case",
            "run_id",
            "initiator",
            "sensitivity"
        ]
    );
    assert_eq!(tags[3].1, "month-end close _EU_");
    assert_eq!(tags[5].1, "alice@example.com");
}

#[test]
fn ttls_outside_sts_session_bounds_are_refused() {
    for early in [false, true] {
        assert_eq!(session_seconds(Duration::from_secs(900), early), Ok(900));
        assert_eq!(
            session_seconds(Duration::from_secs(43_200), early),
            Ok(43_200)
        );
        assert!(session_seconds(Duration::from_secs(43_201), early).is_err());
    }
    // With early revocation a short TTL gets STS's minimum; keyturn ends it.
    assert_eq!(session_seconds(Duration::from_secs(60), true), Ok(900));
    let short = session_seconds(Duration::from_secs(899), false).unwrap_err();
    assert!(
        short.contains("899s") && short.contains("900s") && short.contains("at least 15m"),
        "{short}"
    );
    let long = session_seconds(Duration::from_secs(43_201), false).unwrap_err();
    assert!(long.contains("43200s"), "{long}");
}

/// Nothing listens at STS's endpoint: `AssumeRole` was never sent, so no
/// session exists and the failed start ends at once.
#[tokio::test]
async fn an_issue_that_cannot_connect_left_nothing() {
    let issuer = StsIssuer::with_credentials(
        StsIssuerConfig {
            region: Some("us-east-1".into()),
            endpoint_url: Some("http://127.0.0.1:9".into()),
            timeout: Some("5s".into()),
            ..StsIssuerConfig::default()
        },
        aws_sdk_sts::config::Credentials::new("AKIDEXAMPLE", "not-a-secret", None, None, "test"),
    );
    let t = task("unreached");
    let grant = Grant(serde_json::json!({
        "role_arn": "arn:aws:iam::123456789012:role/x",
        "session_policy": POLICY,
    }));
    let e = issuer
        .issue(&request(&t, &grant, Duration::from_secs(900)))
        .await
        .expect_err("nothing listens on port 9");
    assert!(e.nothing_left, "{e}");
    assert_eq!(e.error.kind, ErrorKind::Transient, "{e}");
}

/// A session asked for once the start took a while ends with the task,
/// not a TTL later than its start; never under STS's shortest.
#[test]
fn the_session_is_cut_to_end_with_the_task() {
    let now = SystemTime::now();
    let at = |s: u64| now + Duration::from_secs(s);
    assert_eq!(until_expiry(3600, at(3600), now), 3600);
    assert_eq!(
        until_expiry(3600, at(3590) + Duration::from_millis(1), now),
        3591,
        "rounded up"
    );
    assert_eq!(until_expiry(3600, at(7200), now), 3600, "never longer");
    assert_eq!(until_expiry(900, at(899), now), 900, "STS's shortest");
    assert_eq!(until_expiry(900, now - Duration::from_secs(5), now), 900);
    let call = Duration::from_secs(30);
    assert_eq!(
        unrecorded_session_end(at(3600), call, now),
        at(3631),
        "the task's expiry, and the call"
    );
    assert_eq!(unrecorded_session_end(at(60), call, now), now + MIN_SESSION);
    assert_eq!(
        unrecorded_session_end(at(100_000), call, now),
        now + MAX_SESSION
    );
}

#[tokio::test]
async fn a_short_ttl_is_refused_before_anything_is_minted() {
    // Nothing listens there: the refusal comes before any call.
    let issuer = StsIssuer::new(StsIssuerConfig {
        region: Some("us-east-1".into()),
        endpoint_url: Some("http://127.0.0.1:9".into()),
        ..StsIssuerConfig::default()
    });
    let t = task("t1");
    let grant = Grant(serde_json::json!({
        "role_arn": "arn:aws:iam::123456789012:role/x",
        "session_policy": POLICY,
    }));
    let e = issue(&issuer, &t, &grant, Duration::from_secs(300))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Invalid);
    assert!(
        e.message.contains("task t1")
            && e.message.contains("role arn:aws:iam::123456789012:role/x")
            && e.message.contains("below STS's shortest session"),
        "{e}"
    );
}

#[tokio::test]
async fn revoke_and_verify_follow_the_session_expiry() {
    let issuer = StsIssuer::new(StsIssuerConfig::default());
    let t = task("t1");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let handle = |expires| {
        StsHandle {
            role_arn: "arn:aws:iam::123456789012:role/x".into(),
            assumed_role_id: "AROAEXAMPLE:keyturn-t1".into(),
            access_key_id: "ASIAEXAMPLE".into(),
            expires,
        }
        .encode()
    };
    let live = handle(now + 600);
    assert_eq!(StsHandle::decode(&live).unwrap().expires, now + 600);
    assert_eq!(
        issuer.revoke(&t, Some(&live), in_an_hour()).await.unwrap(),
        Revoked::ExpiresAt(UNIX_EPOCH + Duration::from_secs(now + 600))
    );
    assert!(!issuer.verify_revoked(&t, Some(&live)).await.unwrap());
    let ended = handle(now - 1);
    assert_eq!(
        issuer.revoke(&t, Some(&ended), in_an_hour()).await.unwrap(),
        Revoked::Now
    );
    assert!(issuer.verify_revoked(&t, Some(&ended)).await.unwrap());
    // Twice is harmless.
    assert_eq!(
        issuer.revoke(&t, Some(&ended), in_an_hour()).await.unwrap(),
        Revoked::Now
    );

    // No handle: no claim that it is over. Defect: the bound was STS's
    // longest session (12 h) whatever the task, so a start that failed
    // with a lost answer stayed `ending`, and overdue, for 12 hours. The
    // session was asked for the time left until the task's expiry (at
    // least STS's shortest), by a call of at most `timeout`.
    let ends = in_an_hour();
    let call = StsIssuerConfig::default().timeout() + Duration::from_secs(1);
    assert_eq!(
        issuer.revoke(&t, None, ends).await.unwrap(),
        Revoked::ExpiresAt(ends + call)
    );
    let before = SystemTime::now();
    let Revoked::ExpiresAt(at) = issuer
        .revoke(&t, None, before + Duration::from_secs(60))
        .await
        .unwrap()
    else {
        panic!("without a handle the session may live");
    };
    assert!(
        at >= before + MIN_SESSION && at <= SystemTime::now() + MIN_SESSION,
        "STS's shortest session: {at:?}"
    );
    assert!(!issuer.verify_revoked(&t, None).await.unwrap());

    let e = issuer
        .revoke(&t, Some("ASIAEXAMPLE"), in_an_hour())
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Fatal);
    assert!(
        e.message.contains("task t1") && e.message.contains("handle"),
        "{e}"
    );
}

/// The handle recorded before AssumeRole names the role the session is
/// asked of. Without a deny policy it is waited for as a session without a
/// handle; it never reads as a recorded session, nor a recorded one as it.
#[tokio::test]
async fn a_handle_recorded_before_the_call_names_the_role_asked_of() {
    let issuer = StsIssuer::new(StsIssuerConfig::default());
    let t = task("t1");
    let role = "arn:aws:iam::123456789012:role/x";
    let grant = Grant(serde_json::json!({"role_arn": role}));
    let asked = issuer
        .handle_before_issue(&request(&t, &grant, Duration::from_secs(900)))
        .expect("the role is known before the call");
    assert_eq!(
        SessionHandle::decode(&asked).unwrap(),
        SessionHandle::Asked(AskedHandle {
            asked_of: role.into()
        })
    );
    let recorded = StsHandle {
        role_arn: role.into(),
        assumed_role_id: "AROAEXAMPLE:keyturn-t1".into(),
        access_key_id: "ASIAEXAMPLE".into(),
        expires: 1,
    };
    assert_eq!(
        SessionHandle::decode(&recorded.encode()).unwrap(),
        SessionHandle::Session(recorded)
    );
    assert!(SessionHandle::decode(r#"{"asked_of":"x","more":1}"#).is_err());
    let shown = issuer.object(&t, Some(&asked));
    assert!(
        shown.contains(role) && shown.contains("keyturn-t1") && shown.contains("not recorded"),
        "{shown}"
    );

    let ends = in_an_hour();
    let call = StsIssuerConfig::default().timeout() + Duration::from_secs(1);
    assert_eq!(
        issuer.revoke(&t, Some(&asked), ends).await.unwrap(),
        Revoked::ExpiresAt(ends + call)
    );
    assert!(!issuer.verify_revoked(&t, Some(&asked)).await.unwrap());

    // A grant it cannot read names nothing (the issue refuses it anyway).
    let bad = Grant(serde_json::json!({"role": role}));
    assert_eq!(
        issuer.handle_before_issue(&request(&t, &bad, Duration::from_secs(900))),
        None
    );
}

#[test]
fn the_deny_policy_lists_revoked_sessions_until_they_expire() {
    let a = "AROAEXAMPLE:keyturn-a";
    let b = "AROAEXAMPLE:keyturn-b";
    let now = 1_000_000;
    // Both expire in the same 5-minute bucket (ending at 1,000,800).
    let doc = deny_policy_with(None, a, now + 700, now)
        .unwrap()
        .expect("a new policy");
    assert!(deny_policy_lists(&doc, a).unwrap());
    assert!(!deny_policy_lists(&doc, b).unwrap());
    let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(
        v["Statement"],
        serde_json::json!([{
            "Sid": "KeyturnRevokedUntil1000800",
            "Effect": "Deny",
            "Action": "*",
            "Resource": "*",
            "Condition": {"StringEquals": {"aws:userid": [a]}},
        }])
    );
    // Listed already: nothing to write.
    assert_eq!(deny_policy_with(Some(&doc), a, now + 700, now), Ok(None));
    // Same bucket: one more user id in the same statement.
    let doc = deny_policy_with(Some(&doc), b, now + 650, now)
        .unwrap()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(
        v["Statement"][0]["Condition"]["StringEquals"]["aws:userid"],
        serde_json::json!([a, b])
    );

    // Once its bucket has passed, a statement goes; other statements stay.
    let with_foreign = serde_json::json!({"Version": "2012-10-17", "Statement": [
        v["Statement"][0].clone(),
        {"Sid": "Ops", "Effect": "Deny", "Action": "s3:*", "Resource": "*"},
    ]})
    .to_string();
    let later = now + 800;
    let c = "AROAEXAMPLE:keyturn-c";
    let doc = deny_policy_with(Some(&with_foreign), c, later + 900, later)
        .unwrap()
        .unwrap();
    assert!(!deny_policy_lists(&doc, a).unwrap() && !deny_policy_lists(&doc, b).unwrap());
    assert!(deny_policy_lists(&doc, c).unwrap());
    let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(v["Statement"][0]["Sid"], "Ops");
    assert_eq!(v["Statement"].as_array().unwrap().len(), 2);

    // AWS answers the document URL-encoded; moto plain.
    let encoded = "%7B%22Statement%22%3A%5B%5D%7D";
    assert_eq!(decode_policy_document(encoded), "{\"Statement\":[]}");
    assert_eq!(decode_policy_document("{\"a\": 1}"), "{\"a\": 1}");
    assert!(deny_policy_with(Some("not json"), a, now + 1, now).is_err());
    assert_eq!(role_name("arn:aws:iam::123456789012:role/agents/x"), "x");
}

// -- real server (a private moto with IAM enforced) --------------------------

#[path = "../../../../tests/fixtures/private_moto.rs"]
mod private_moto;
use private_moto::PrivateMoto;

/// What the setup made in a private moto.
#[derive(serde::Deserialize)]
struct Setup {
    /// keyturn's own IAM user: may assume the task role and read and
    /// write its inline policies.
    access_key_id: String,
    secret_access_key: String,
    /// keyturn's user as set up before `iam:GetRole` was asked for.
    without_get_role_access_key_id: String,
    without_get_role_secret_access_key: String,
    /// A user without any permission.
    powerless_access_key_id: String,
    powerless_secret_access_key: String,
    /// The task role: its own policy allows secretsmanager:ListSecrets and
    /// secretsmanager:DescribeSecret; its trust policy lets anyone in the
    /// account assume, tag and set the source identity.
    role_arn: String,
}

/// What these tests make of a private moto.
trait MotoExt {
    fn config(&self) -> StsIssuerConfig;
    fn issuer(&self, access_key_id: &str, secret_access_key: &str) -> StsIssuer;
    /// An issuer with `revoke_with_deny_policy`, IAM at this moto.
    fn denying_issuer(&self, access_key_id: &str, secret_access_key: &str) -> StsIssuer;
    fn assume_role_requests(&self) -> Vec<BTreeMap<String, String>>;
}

impl MotoExt for PrivateMoto {
    fn config(&self) -> StsIssuerConfig {
        StsIssuerConfig {
            region: Some("us-east-1".into()),
            endpoint_url: Some(self.url.clone()),
            ..StsIssuerConfig::default()
        }
    }

    fn issuer(&self, access_key_id: &str, secret_access_key: &str) -> StsIssuer {
        StsIssuer::with_credentials(self.config(), credentials(access_key_id, secret_access_key))
    }

    fn denying_issuer(&self, access_key_id: &str, secret_access_key: &str) -> StsIssuer {
        let config = StsIssuerConfig {
            revoke_with_deny_policy: true,
            iam_endpoint_url: Some(self.url.clone()),
            ..self.config()
        };
        StsIssuer::with_credentials(config, credentials(access_key_id, secret_access_key))
    }

    /// The form parameters of every `Action=AssumeRole` request received.
    fn assume_role_requests(&self) -> Vec<BTreeMap<String, String>> {
        self.requests("AssumeRole")
    }
}

/// Static credentials of an IAM user.
fn credentials(access_key_id: &str, secret_access_key: &str) -> aws_sdk_sts::config::Credentials {
    aws_sdk_sts::config::Credentials::new(access_key_id, secret_access_key, None, None, "test")
}

/// Asserts that moto refuses a call of the session's client now.
async fn assert_refused_now(sm: &aws_sdk_secretsmanager::Client) {
    let refused = sm
        .list_secrets()
        .send()
        .await
        .expect_err("refused after revoke");
    let body = forbidden(&refused);
    assert!(body.contains("<Code>AccessDenied</Code>"), "{body}");
}

/// The issued session's credentials, as the task's SDK clients sign with them.
fn session_credentials(issued: &Issued) -> aws_sdk_sts::config::Credentials {
    aws_sdk_sts::config::Credentials::new(
        issued.public["access_key_id"].clone(),
        issued.secret["secret_access_key"]
            .expose_str()
            .unwrap()
            .to_owned(),
        Some(
            issued.secret["session_token"]
                .expose_str()
                .unwrap()
                .to_owned(),
        ),
        None,
        "task",
    )
}

/// A Secrets Manager client signing with the issued session.
fn secrets_client(moto: &PrivateMoto, issued: &Issued) -> aws_sdk_secretsmanager::Client {
    let conf = aws_sdk_secretsmanager::Config::builder()
        .behavior_version(aws_sdk_secretsmanager::config::BehaviorVersion::latest())
        .region(aws_sdk_secretsmanager::config::Region::new("us-east-1"))
        .endpoint_url(&moto.url)
        .credentials_provider(session_credentials(issued))
        .build();
    aws_sdk_secretsmanager::Client::from_conf(conf)
}

/// An STS client signing with the issued session.
fn sts_client(moto: &PrivateMoto, issued: &Issued) -> aws_sdk_sts::Client {
    let conf = aws_sdk_sts::Config::builder()
        .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
        .region(aws_sdk_sts::config::Region::new("us-east-1"))
        .endpoint_url(&moto.url)
        .credentials_provider(session_credentials(issued))
        .build();
    aws_sdk_sts::Client::from_conf(conf)
}

impl Setup {
    /// A grant of the task role, with [`POLICY`] as the session policy.
    fn grant(&self) -> Grant {
        Grant(serde_json::json!({
            "role_arn": self.role_arn,
            "session_policy": POLICY,
            "external_id": "keyturn-acme",
        }))
    }
}

/// The body of moto's answer to a refused call, which must be an HTTP 403.
fn forbidden<E>(refused: &aws_sdk_secretsmanager::error::SdkError<E>) -> String {
    let raw = refused.raw_response().expect("an HTTP answer");
    let body = String::from_utf8_lossy(raw.body().bytes().unwrap_or_default()).into_owned();
    assert_eq!(raw.status().as_u16(), 403, "{body}");
    body
}

/// A start that got to STS late (the task's expiry 1,000 s away, its TTL
/// 1,200 s): the session ends with the task, not a TTL after the call,
/// which `revoke` without a handle relies on.
#[apply(server_test!)]
async fn a_session_asked_for_late_ends_with_the_task_real_server() {
    let (moto, setup): (PrivateMoto, Setup) = PrivateMoto::start();
    let issuer = moto.issuer(&setup.access_key_id, &setup.secret_access_key);
    let grant = setup.grant();
    let ends = SystemTime::now() + Duration::from_secs(1000);
    let late = issuer
        .issue(&IssueRequest {
            task: &task(&unique_task()),
            grant: &grant,
            ttl: Duration::from_secs(1200),
            expires_at: ends,
        })
        .await
        .expect("issue");
    let slack = Duration::from_secs(2);
    assert!(
        late.expires_at <= ends + slack && late.expires_at + slack >= ends,
        "expires {:?}, the task at {ends:?}",
        late.expires_at
    );
}

#[apply(server_test!)]
async fn issued_session_works_for_the_allowed_call_and_is_refused_outside_real_server() {
    let (moto, setup): (PrivateMoto, Setup) = PrivateMoto::start();
    let issuer = moto.issuer(&setup.access_key_id, &setup.secret_access_key);
    issuer.check().await.expect("check");
    let t = TaskAttribution {
        // Characters STS refuses in a tag value and a source identity (no
        // space: see the module docs).
        initiator: "Alice.Example<alice@example.com>".into(),
        use_case: "month-end-close(EU)".into(),
        ..task(&unique_task())
    };
    let ttl = Duration::from_secs(1200);
    let before = SystemTime::now();
    let issued = issue(&issuer, &t, &setup.grant(), ttl)
        .await
        .expect("issue");
    let after = SystemTime::now();

    // The duration: moto's expiration is now + DurationSeconds.
    let slack = Duration::from_secs(2);
    assert!(
        issued.expires_at + slack >= before + ttl && issued.expires_at <= after + ttl + slack,
        "expires {:?}, issued between {before:?} and {after:?}",
        issued.expires_at
    );
    assert_eq!(
        issued.public["expiration"],
        humantime::format_rfc3339_seconds(issued.expires_at).to_string()
    );
    assert_eq!(issued.public["region"], "us-east-1");
    let session = format!("keyturn-{}", t.task_id);
    assert_eq!(
        issued.public["assumed_role_arn"],
        format!("arn:aws:sts::123456789012:assumed-role/invoice-tasks/{session}")
    );
    let h = StsHandle::decode(&issued.handle).expect("handle");
    assert_eq!(h.role_arn, setup.role_arn);
    assert_eq!(h.access_key_id, issued.public["access_key_id"]);
    assert!(h.assumed_role_id.ends_with(&format!(":{session}")), "{h:?}");
    assert_eq!(h.expires_at(), issued.expires_at);

    // The session is who STS says it is (GetCallerIdentity needs no permission).
    let me = sts_client(&moto, &issued)
        .get_caller_identity()
        .send()
        .await
        .expect("GetCallerIdentity with the session");
    assert_eq!(me.arn(), Some(issued.public["assumed_role_arn"].as_str()));
    assert_eq!(me.user_id(), Some(h.assumed_role_id.as_str()));

    // The allowed call works; a call outside the session policy (and the
    // role's policy: moto enforces only that one) is refused.
    let sm = secrets_client(&moto, &issued);
    sm.list_secrets()
        .send()
        .await
        .expect("ListSecrets is allowed");
    let refused = sm
        .create_secret()
        .name(format!("keyturn-sts-{}", t.task_id))
        .secret_string("canary-not-a-secret")
        .send()
        .await
        .expect_err("CreateSecret is outside the session policy");
    // moto answers a JSON-protocol service in XML here, which the SDK
    // cannot parse into a code: read moto's answer as it is.
    let body = forbidden(&refused);
    assert!(
        body.contains("<Code>AccessDenied</Code>")
            && body.contains(&format!(
                "{} is not authorized to perform: secretsmanager:CreateSecret",
                issued.public["assumed_role_arn"]
            )),
        "{body}"
    );

    // What STS received: the session policy, duration, tags, source
    // identity, session name, external id (moto keeps none of the tags).
    let requests = moto.assume_role_requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let r = &requests[0];
    assert_eq!(r["RoleArn"], setup.role_arn);
    assert_eq!(r["RoleSessionName"], session);
    assert_eq!(r["DurationSeconds"], "1200");
    assert_eq!(r["Policy"], pack_policy(POLICY).unwrap());
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&r["Policy"]).unwrap(),
        serde_json::from_str::<serde_json::Value>(POLICY).unwrap()
    );
    assert_eq!(r["SourceIdentity"], "Alice.Example_alice@example.com_");
    assert_eq!(r["ExternalId"], "keyturn-acme");
    let mut tags = BTreeMap::new();
    for n in 1.. {
        let Some(key) = r.get(&format!("Tags.member.{n}.Key")) else {
            break;
        };
        tags.insert(key.clone(), r[&format!("Tags.member.{n}.Value")].clone());
    }
    let expected = attribution_fields(&TaskAttribution {
        use_case: "month-end-close_EU_".into(),
        initiator: "Alice.Example_alice@example.com_".into(),
        ..t.clone()
    });
    assert_eq!(tags, expected);
    assert!(
        !r.keys().any(|k| k.starts_with("TransitiveTagKeys")),
        "no transitive tags: {r:?}"
    );

    // Revoke cannot end an STS session early: it says when it ends.
    assert_eq!(
        issuer
            .revoke(&t, Some(&issued.handle), in_an_hour())
            .await
            .unwrap(),
        Revoked::ExpiresAt(issued.expires_at)
    );
    assert_not_revoked(&issuer, &t, Some(&issued.handle)).await;
}

#[apply(server_test!)]
async fn refusals_map_to_kinds_and_name_the_task_real_server() {
    let (moto, setup): (PrivateMoto, Setup) = PrivateMoto::start();
    let t = task(&unique_task());

    // A user that may not assume the role.
    let powerless = moto.issuer(
        &setup.powerless_access_key_id,
        &setup.powerless_secret_access_key,
    );
    let e = issue(&powerless, &t, &setup.grant(), Duration::from_secs(900))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unauthorized, "{e}");
    assert!(
        e.message.contains(&format!("task {}", t.task_id))
            && e.message.contains(&setup.role_arn)
            && e.message.contains("AssumeRole")
            && e.message.contains("HTTP 403"),
        "{e}"
    );

    // Credentials moto does not know.
    let stranger = moto.issuer("AKIAUNKNOWNUNKNOWN00", "not-a-key");
    let e = stranger.check().await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unauthorized, "{e}");
    assert!(e.message.contains("check (GetCallerIdentity)"), "{e}");
    assert!(!e.message.contains("not-a-key"), "{e}");

    // A session policy file that is gone.
    let keyturn = moto.issuer(&setup.access_key_id, &setup.secret_access_key);
    let missing = Grant(serde_json::json!({
        "role_arn": setup.role_arn,
        "session_policy_file": moto.dir.path().join("gone.json"),
    }));
    let e = issue(&keyturn, &t, &missing, Duration::from_secs(900))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    assert!(e.message.contains("gone.json"), "{e}");

    // The same policy from a file is sent as from the grant.
    let file = moto.dir.path().join("low.json");
    std::fs::write(&file, POLICY).unwrap();
    let from_file = Grant(serde_json::json!({
        "role_arn": setup.role_arn,
        "session_policy_file": file,
    }));
    issue(&keyturn, &t, &from_file, Duration::from_secs(900))
        .await
        .expect("issue with a policy file");
    let requests = moto.assume_role_requests();
    let last = requests.last().expect("an AssumeRole request");
    assert_eq!(last["Policy"], pack_policy(POLICY).unwrap());
    assert_eq!(last["DurationSeconds"], "900");
}

/// The canary: the issued secret access key and session token, and
/// keyturn's own secret key, appear in no error, `Debug`, handle, public
/// field or description.
#[apply(server_test!)]
async fn no_secret_in_errors_debug_handle_or_public_real_server() {
    let (moto, setup): (PrivateMoto, Setup) = PrivateMoto::start();
    let issuer = moto.issuer(&setup.access_key_id, &setup.secret_access_key);
    let t = task(&unique_task());
    let issued = issue(&issuer, &t, &setup.grant(), Duration::from_secs(900))
        .await
        .expect("issue");
    let secrets: Vec<String> = issued
        .secret
        .values()
        .map(|v| v.expose_str().unwrap().to_owned())
        .chain([setup.secret_access_key.clone()])
        .collect();
    assert_eq!(secrets.len(), 3);
    assert!(secrets.iter().all(|s| s.len() >= 16), "real secrets");

    // Errors after the issuance: the session asks for what it may not do
    // through keyturn's own issuer code paths (a refused AssumeRole with the
    // session's credentials), and a bad handle.
    let as_session = StsIssuer::with_credentials(
        moto.config(),
        aws_sdk_sts::config::Credentials::new(
            issued.public["access_key_id"].clone(),
            secrets[0].clone(),
            Some(secrets[1].clone()),
            None,
            "task",
        ),
    );
    let grant = setup.grant();
    let refused = as_session
        .issue(&request(&t, &grant, Duration::from_secs(900)))
        .await
        .unwrap_err();
    // STS refused AssumeRole (403): no session, nothing to wait for.
    assert!(refused.nothing_left, "{refused}");
    let refused = refused.error;
    assert_eq!(refused.kind, ErrorKind::Unauthorized, "{refused}");
    let bad_handle = issuer
        .revoke(&t, Some("{"), in_an_hour())
        .await
        .unwrap_err();

    let texts = [
        format!("{issued:?}"),
        issued.handle.clone(),
        format!("{:?}", issued.public),
        format!("{issuer:?}"),
        format!("{as_session:?}"),
        issuer.describe(),
        refused.to_string(),
        format!("{refused:?}"),
        bad_handle.to_string(),
    ];
    for text in &texts {
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "a secret leaked into: {text}");
        }
    }
    assert!(texts[0].contains("[redacted]"), "{}", texts[0]);
}

#[apply(server_test!)]
async fn revoke_with_deny_policy_ends_the_session_at_once_real_server() {
    let (moto, setup): (PrivateMoto, Setup) = PrivateMoto::start();
    let keyturn_creds = credentials(&setup.access_key_id, &setup.secret_access_key);
    let issuer = moto.denying_issuer(&setup.access_key_id, &setup.secret_access_key);
    let t = task(&unique_task());
    // A TTL below STS's minimum: the session gets 900 s; keyturn ends it at
    // the TTL by revoking it.
    let before = SystemTime::now();
    let issued = issue(&issuer, &t, &setup.grant(), Duration::from_secs(60))
        .await
        .expect("issue");
    assert_eq!(moto.assume_role_requests()[0]["DurationSeconds"], "900");
    assert!(
        issued.expires_at >= before + MIN_SESSION,
        "{:?}",
        issued.expires_at
    );
    let other_task = task(&unique_task());
    let other = issue(
        &issuer,
        &other_task,
        &setup.grant(),
        Duration::from_secs(900),
    )
    .await
    .expect("issue another task");

    let sm = secrets_client(&moto, &issued);
    sm.list_secrets().send().await.expect("works before revoke");
    assert_not_revoked(&issuer, &t, Some(&issued.handle)).await;

    assert_revoked_now(&issuer, &t, Some(&issued.handle)).await;
    assert!(
        !issuer
            .verify_revoked(&other_task, Some(&other.handle))
            .await
            .unwrap(),
        "only the revoked task's session is listed"
    );

    // The session is refused at once.
    assert_refused_now(&sm).await;

    // The deny statement names exactly that session's aws:userid. (moto
    // does not evaluate aws:userid: it would refuse the other task's
    // session as well, so that is checked here in the policy, not by a call.)
    let iam = aws_sdk_iam::Client::from_conf(
        aws_sdk_iam::Config::builder()
            .behavior_version(aws_sdk_iam::config::BehaviorVersion::latest())
            .region(aws_sdk_iam::config::Region::new("us-east-1"))
            .endpoint_url(&moto.url)
            .credentials_provider(keyturn_creds)
            .build(),
    );
    let doc = iam
        .get_role_policy()
        .role_name("invoice-tasks")
        .policy_name(DENY_POLICY_NAME)
        .send()
        .await
        .expect("the deny policy");
    let doc: serde_json::Value =
        serde_json::from_str(&decode_policy_document(doc.policy_document())).unwrap();
    let h = StsHandle::decode(&issued.handle).unwrap();
    let statements = doc["Statement"].as_array().expect("statements");
    assert_eq!(statements.len(), 1, "{doc}");
    assert_eq!(statements[0]["Effect"], "Deny");
    assert_eq!(statements[0]["Action"], "*");
    assert_eq!(
        statements[0]["Condition"]["StringEquals"]["aws:userid"],
        serde_json::json!([h.assumed_role_id])
    );
    assert!(
        h.assumed_role_id
            .ends_with(&format!(":keyturn-{}", t.task_id)),
        "{h:?}"
    );

    // Twice is harmless and writes nothing more.
    assert_eq!(
        issuer
            .revoke(&t, Some(&issued.handle), in_an_hour())
            .await
            .unwrap(),
        Revoked::Now
    );
    let deny_writes = moto
        .requests("PutRolePolicy")
        .into_iter()
        .filter(|r| r["PolicyName"] == DENY_POLICY_NAME)
        .count();
    assert_eq!(deny_writes, 1);
}

/// Defect: a session whose AssumeRole answer was never recorded (keyturn
/// killed after the call, or the answer lost) was left working until the
/// task's expiry even with `revoke_with_deny_policy`, as `revoke` had no
/// handle. The role it was asked of is recorded before the call, and the
/// session is denied by the `aws:userid` that follows from it.
#[apply(server_test!)]
async fn a_session_whose_answer_was_not_recorded_is_denied_at_once_real_server() {
    let (moto, setup): (PrivateMoto, Setup) = PrivateMoto::start();
    let issuer = moto.denying_issuer(&setup.access_key_id, &setup.secret_access_key);
    let t = task(&unique_task());
    let grant = setup.grant();
    let req = request(&t, &grant, Duration::from_secs(900));
    let asked = issuer.handle_before_issue(&req).expect("a handle before");
    // The session was made; its answer is what keyturn never recorded.
    let session = issuer.issue(&req).await.expect("issue");
    let sm = secrets_client(&moto, &session);
    sm.list_secrets().send().await.expect("works before revoke");
    assert_not_revoked(&issuer, &t, Some(&asked)).await;

    assert_revoked_now(&issuer, &t, Some(&asked)).await;
    assert_refused_now(&sm).await;
    // The statement names the session's own aws:userid, as a recorded
    // handle would have, and outlasts it.
    let recorded = StsHandle::decode(&session.handle).unwrap();
    assert!(
        issuer
            .verify_revoked(&t, Some(&session.handle))
            .await
            .unwrap(),
        "{recorded:?} is not the id denied"
    );
    // Twice is harmless.
    assert_revoked_now(&issuer, &t, Some(&asked)).await;

    // Without iam:GetRole (a policy written for the releases before) the
    // id is not known: the session is waited for, as without a handle.
    let without = moto.denying_issuer(
        &setup.without_get_role_access_key_id,
        &setup.without_get_role_secret_access_key,
    );
    let other = task(&unique_task());
    let asked = without
        .handle_before_issue(&request(&other, &grant, Duration::from_secs(900)))
        .unwrap();
    let ends = in_an_hour();
    let Revoked::ExpiresAt(at) = without.revoke(&other, Some(&asked), ends).await.unwrap() else {
        panic!("denied without knowing the session's id");
    };
    assert!(at > ends, "{at:?}");
    assert!(!without.verify_revoked(&other, Some(&asked)).await.unwrap());
}

/// IAM acts in the account of keyturn's own credentials: a role of another
/// account (in a grant, or in a recorded session after the credentials
/// changed) is not revoked through the same-named role of this one, nor
/// verified by reading that role back.
#[apply(server_test!)]
async fn a_role_of_another_account_is_never_revoked_in_this_one_real_server() {
    let (moto, setup): (PrivateMoto, Setup) = PrivateMoto::start();
    let issuer = moto.denying_issuer(&setup.access_key_id, &setup.secret_access_key);
    // The task role's name, in another account.
    let (_, account) = arn_account(&setup.role_arn);
    let elsewhere = setup.role_arn.replace(account, "210987654321");
    assert_ne!(elsewhere, setup.role_arn);
    let t = task(&unique_task());
    let grant = Grant(serde_json::json!({
        "role_arn": elsewhere,
        "session_policy": POLICY,
    }));
    let e = issue(&issuer, &t, &grant, Duration::from_secs(900))
        .await
        .unwrap_err();
    assert_error(
        &e,
        ErrorKind::Invalid,
        "the role is in account 210987654321",
    );
    assert!(moto.assume_role_requests().is_empty(), "nothing minted");

    let handle = StsHandle {
        role_arn: elsewhere.clone(),
        assumed_role_id: format!("AROAEXAMPLE:keyturn-{}", t.task_id),
        access_key_id: "ASIAEXAMPLE".into(),
        expires: unix_now() + 600,
    }
    .encode();
    let e = issuer
        .revoke(&t, Some(&handle), in_an_hour())
        .await
        .unwrap_err();
    assert_error(
        &e,
        ErrorKind::Invalid,
        "the role is in account 210987654321",
    );
    let e = issuer.verify_revoked(&t, Some(&handle)).await.unwrap_err();
    assert_error(&e, ErrorKind::Invalid, account);
    // Only the role it was asked of recorded (a crash during the start):
    // not denied there, and not retried for ever either, as such a handle
    // has no expiration to stop at: it ends by itself.
    let asked = issuer
        .handle_before_issue(&request(&t, &grant, Duration::from_secs(900)))
        .unwrap();
    let ends = in_an_hour();
    assert!(matches!(
        issuer.revoke(&t, Some(&asked), ends).await.unwrap(),
        Revoked::ExpiresAt(at) if at > ends
    ));
    let e = issuer.verify_revoked(&t, Some(&asked)).await.unwrap_err();
    assert_error(&e, ErrorKind::Invalid, account);
    assert!(
        moto.requests("PutRolePolicy")
            .iter()
            .all(|r| r["PolicyName"] != DENY_POLICY_NAME),
        "no deny policy written to this account's role"
    );
}
