//! The AWS Secrets Manager vault's tests: pure ones, then those against moto
//! (`scripts/services.sh`, `--features real-servers`).

use std::sync::Arc;

use super::*;
use macro_rules_attribute::apply;

use crate::test_support::{secret, server_test};
use crate::vaults::contract::{assert_error, item, stage_and_promote, stage_new};

const NO_SERVICES: &str =
    "start the test services: `bash scripts/services.sh start` (or run `bash scripts/test.sh`)";

fn endpoint() -> String {
    std::env::var("KEYTURN_TEST_AWS_ENDPOINT")
        .unwrap_or_else(|_| panic!("KEYTURN_TEST_AWS_ENDPOINT is not set: {NO_SERVICES}"))
}

fn settings() -> AwsConfig {
    AwsConfig {
        endpoint_url: Some(endpoint()),
        region: Some(
            std::env::var("AWS_REGION")
                .unwrap_or_else(|_| panic!("AWS_REGION is not set: {NO_SERVICES}")),
        ),
        secret_prefix: Some("keyturn-test/".into()),
        ..AwsConfig::default()
    }
}

async fn vault() -> AwsVault {
    AwsVault::connect("aws-test", &settings())
        .await
        .expect("connect")
}

/// A unique path per test run, so tests can share one moto server.
fn unique_path(test: &str) -> String {
    format!("{test}/{}", RotationId::generate())
}

async fn by_stage(v: &AwsVault, it: VaultItem<'_>, stage: Stage) -> Option<StoredVersion> {
    v.read(it, Select::Stage(stage))
        .await
        .expect("read by stage")
}

async fn by_version(v: &AwsVault, it: VaultItem<'_>, r: &VersionRef) -> Option<StoredVersion> {
    v.read(it, Select::Version(r))
        .await
        .expect("read by version")
}

/// The raw staging labels, straight from the server.
async fn raw_labels(v: &AwsVault, path: &str) -> Labels {
    v.labels("test", &v.secret_id(path))
        .await
        .expect("describe")
        .expect("secret exists")
}

fn sorted(mut labels: Vec<String>) -> Vec<String> {
    labels.sort();
    labels
}

async fn contract_subject() -> (AwsVault, String, ()) {
    (vault().await, unique_path("contract"), ())
}

crate::vaults::contract::vault_contract! {
    #[cfg_attr(
        not(feature = "real-servers"),
        ignore = "needs the test servers: scripts/services.sh start, then --features real-servers"
    )]
    open = contract_subject,
}

// -- pure ---------------------------------------------------------------

#[test]
fn service_errors_map_to_kinds() {
    use ErrorKind::*;
    let cases: &[(Option<&str>, u16, Option<&str>, ErrorKind)] = &[
        (
            Some("ThrottlingException"),
            400,
            Some("Rate exceeded"),
            Throttled,
        ),
        (None, 429, None, Throttled),
        (Some("SomethingNew"), 400, Some("Rate exceeded"), Throttled),
        (Some("AccessDeniedException"), 400, None, Unauthorized),
        (Some("UnrecognizedClientException"), 400, None, Unauthorized),
        (None, 403, None, Unauthorized),
        (Some("ResourceNotFoundException"), 400, None, NotFound),
        (Some("ResourceExistsException"), 400, None, Conflict),
        (Some("InvalidRequestException"), 400, None, Invalid),
        (Some("InvalidParameterException"), 400, None, Invalid),
        (Some("InternalServiceError"), 500, None, Transient),
        (None, 503, None, Transient),
        (Some("SomethingNew"), 400, None, Invalid),
        // STS and IAM (the aws_sts task issuer).
        (Some("AccessDenied"), 403, None, Unauthorized),
        (Some("ExpiredTokenException"), 400, None, Unauthorized),
        (Some("MalformedPolicyDocument"), 400, None, Invalid),
        (Some("PackedPolicyTooLarge"), 400, None, Invalid),
        (Some("ValidationError"), 400, None, Invalid),
        (Some("LimitExceeded"), 409, None, Invalid),
        (Some("NoSuchEntity"), 404, None, NotFound),
        (Some("ConcurrentModification"), 409, None, Conflict),
        (Some("EntityTemporarilyUnmodifiable"), 409, None, Transient),
        (Some("ServiceFailure"), 500, None, Transient),
    ];
    for (code, status, message, kind) in cases {
        assert_eq!(
            classify_service(*code, *status, *message),
            *kind,
            "{code:?} {status}"
        );
    }
    assert!(classify_service(Some("ThrottlingException"), 400, None).is_retryable());
}

#[test]
fn labels_map_to_stages() {
    let l = |ls: &[&str]| ls.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(stage_of(&l(&[AWSPENDING])), Some(Stage::Pending));
    // A secret's first version: pending for keyturn until promoted.
    assert_eq!(
        stage_of(&l(&[AWSCURRENT, AWSPENDING])),
        Some(Stage::Pending)
    );
    assert_eq!(stage_of(&l(&[AWSCURRENT])), Some(Stage::Current));
    assert_eq!(stage_of(&l(&[AWSPREVIOUS])), Some(Stage::Previous));
    assert_eq!(stage_of(&l(&[])), None);
    assert_eq!(stage_of(&l(&["custom"])), None);
}

#[test]
fn scrub_removes_the_value() {
    let v = secret("canary-7d1e");
    let text = scrub(
        "Value 'canary-7d1e' at 'secretString' is bad".into(),
        Some(&v),
    );
    assert!(!text.contains("canary-7d1e"), "{text}");
    assert!(text.contains("[redacted]"));
    assert_eq!(scrub("plain".into(), None), "plain");
}

#[tokio::test]
async fn connect_refuses_a_bad_budget() {
    let s = AwsConfig {
        region: Some("us-east-1".into()),
        write_budget: Some(0.0),
        ..AwsConfig::default()
    };
    let e = AwsVault::connect("bad", &s).await.unwrap_err();
    assert_error(&e, ErrorKind::Invalid, &["bad", "write_budget"], &[]);
}

// -- real server (moto) ---------------------------------------------------

#[apply(server_test!)]
async fn stages_are_staging_labels_real_server() {
    let v = vault().await;
    let path = unique_path("full-cycle");
    let it = item(&path);

    // First rotation: creates the secret; the version is pending.
    let r1 = RotationId::generate();
    let v1 = v.stage(it.pending(&r1, &secret("one"))).await.unwrap();
    assert_eq!(v1.0, r1.as_str(), "the VersionId is the rotation id");
    v.promote(it, &v1).await.unwrap();
    assert_eq!(
        sorted(raw_labels(&v, &path).await[&v1.0].clone()),
        vec![AWSCURRENT]
    );

    // Second rotation: the server moved AWSPREVIOUS itself (moto as AWS does).
    let v2 = stage_and_promote(&v, &path, "two").await;
    let labels = raw_labels(&v, &path).await;
    assert_eq!(labels[&v1.0], vec![AWSPREVIOUS]);
    assert_eq!(labels[&v2.0], vec![AWSCURRENT]);

    // Third rotation: the old previous loses its label when the old
    // current becomes previous.
    let v3 = stage_and_promote(&v, &path, "three").await;
    let labels = raw_labels(&v, &path).await;
    // Unlabeled: AWS leaves it out of DescribeSecret, moto lists it bare.
    assert!(labels.get(&v1.0).is_none_or(|l| l.is_empty()), "{labels:?}");
    assert_eq!(labels[&v2.0], vec![AWSPREVIOUS]);
    assert_eq!(labels[&v3.0], vec![AWSCURRENT]);

    v.destroy(it).await.unwrap();
}

#[apply(server_test!)]
async fn a_stage_replay_writes_nothing_real_server() {
    let v = vault().await;
    let path = unique_path("stage-replay");
    let it = item(&path);

    let r1 = RotationId::generate();
    let first = v.stage(it.pending(&r1, &secret("first"))).await.unwrap();
    assert_eq!(v.writes_issued(), 2, "CreateSecret + PutSecretValue");
    v.stage(it.pending(&r1, &secret("second"))).await.unwrap();
    assert_eq!(v.writes_issued(), 2, "a replay writes nothing");
    assert_eq!(raw_labels(&v, &path).await.len(), 1, "still one version");

    // Replay of a later rotation on an existing secret, too.
    v.promote(it, &first).await.unwrap();
    let r2 = RotationId::generate();
    v.stage(it.pending(&r2, &secret("a"))).await.unwrap();
    let writes = v.writes_issued();
    v.stage(it.pending(&r2, &secret("b"))).await.unwrap();
    assert_eq!(v.writes_issued(), writes);
    assert_eq!(raw_labels(&v, &path).await.len(), 2);
    v.destroy(it).await.unwrap();
}

/// Staging over the abandoned first version takes two calls: the put that
/// moves AWSCURRENT along with AWSPENDING (AWS then labels the abandoned
/// version AWSPREVIOUS), and the removal of that AWSPREVIOUS. A crash
/// between them is mended by the replay, and nothing reads as current or
/// previous until a promote.
#[apply(server_test!)]
async fn staging_over_the_abandoned_first_version_survives_a_crash_between_its_calls_real_server() {
    let v = vault().await;
    let path = unique_path("first-abandoned");
    let it = item(&path);
    let secret_id = v.secret_id(&path);
    let one = stage_new(&v, &path, "one").await.unwrap();
    let labels = raw_labels(&v, &path).await;
    assert_eq!(sorted(labels[&one.0].clone()), [AWSCURRENT, AWSPENDING]);

    // The first call of a second rotation's stage, then the crash.
    let r2 = RotationId::generate();
    v.client
        .put_secret_value()
        .secret_id(&secret_id)
        .client_request_token(r2.as_str())
        .version_stages(AWSPENDING)
        .version_stages(AWSCURRENT)
        .secret_string("two")
        .send()
        .await
        .unwrap();
    let labels = raw_labels(&v, &path).await;
    assert_eq!(labels[&one.0], [AWSPREVIOUS], "what AWS does on its own");

    let two = v.stage(it.pending(&r2, &secret("two"))).await.unwrap();
    let labels = raw_labels(&v, &path).await;
    assert!(
        labels.get(&one.0).is_none_or(|l| l.is_empty()),
        "{labels:?}"
    );
    assert_eq!(sorted(labels[&two.0].clone()), [AWSCURRENT, AWSPENDING]);
    for stage in [Stage::Current, Stage::Previous] {
        let read = v.read(it, Select::Stage(stage)).await.unwrap();
        assert!(read.is_none(), "{stage:?} before any promote: {read:?}");
    }
    v.promote(it, &two).await.unwrap();
    let current = v.read(it, Select::Stage(Stage::Current)).await.unwrap();
    assert_eq!(current.unwrap().value.expose(), b"two");
    let previous = v.read(it, Select::Stage(Stage::Previous)).await.unwrap();
    assert!(
        previous.is_none(),
        "the abandoned value is nobody's previous"
    );
    v.destroy(it).await.unwrap();
}

#[apply(server_test!)]
async fn promote_replay_and_resume_real_server() {
    let v = vault().await;
    let path = unique_path("promote-replay");
    let it = item(&path);
    let secret_id = v.secret_id(&path);

    let v1 = stage_and_promote(&v, &path, "one").await;
    let writes = v.writes_issued();
    v.promote(it, &v1).await.unwrap();
    assert_eq!(
        v.writes_issued(),
        writes,
        "promoting the current version writes nothing"
    );

    // A crash between promote's two writes: AWSCURRENT moved, AWSPENDING
    // still on the version. The replay finishes the job.
    let v2 = stage_new(&v, &path, "two").await.unwrap();
    v.move_label("test", &secret_id, AWSCURRENT, Some(&v2.0), Some(&v1.0))
        .await
        .unwrap();
    assert_eq!(by_version(&v, it, &v2).await.unwrap().stage, Stage::Pending);
    // Defect (black-box): the replay reported no current version before
    // it, which the engine audits as the previous value deleted out of
    // band (`vault.current_gone`). It is its own version, half promoted.
    let before = v
        .promote_from(
            it,
            Promote {
                version: &v2,
                expected: Some(&v1),
            },
        )
        .await
        .unwrap();
    assert_eq!(before, Some(v2.clone()));
    let labels = raw_labels(&v, &path).await;
    assert_eq!(labels[&v2.0], vec![AWSCURRENT]);
    assert_eq!(labels[&v1.0], vec![AWSPREVIOUS]);
    assert_eq!(
        by_stage(&v, it, Stage::Current)
            .await
            .unwrap()
            .value
            .expose(),
        b"two"
    );

    v.destroy(it).await.unwrap();
}

#[apply(server_test!)]
async fn retire_names_the_secret_and_writes_once_real_server() {
    let v = vault().await;
    let path = unique_path("retire");
    let it = item(&path);

    let v1 = stage_and_promote(&v, &path, "one").await;
    let v2 = stage_and_promote(&v, &path, "two").await;
    // The current version cannot be retired.
    let e = v.retire(it, &v2).await.unwrap_err();
    let names = ["aws-test", &v.secret_id(&path)];
    assert_error(&e, ErrorKind::Invalid, &names, &[]);

    v.retire(it, &v1).await.unwrap();
    let writes = v.writes_issued();
    v.retire(it, &v1).await.unwrap();
    assert_eq!(v.writes_issued(), writes, "retiring twice writes nothing");
    v.destroy(it).await.unwrap();
}

#[apply(server_test!)]
async fn destroy_deletes_the_secret_real_server() {
    let v = vault().await;
    let path = unique_path("destroy");
    stage_and_promote(&v, &path, "one").await;
    v.destroy(item(&path)).await.unwrap();
    assert!(
        v.labels("test", &v.secret_id(&path))
            .await
            .unwrap()
            .is_none()
    );
}

#[apply(server_test!)]
async fn binary_values_round_trip_real_server() {
    let v = vault().await;
    let path = unique_path("binary");
    let it = item(&path);
    let bytes = SecretValue::new(vec![0, 159, 146, 150, 255]);
    let r = v
        .stage(it.pending(&RotationId::generate(), &bytes))
        .await
        .unwrap();
    assert_eq!(by_version(&v, it, &r).await.unwrap().value, bytes);
    v.destroy(it).await.unwrap();
}

#[apply(server_test!)]
async fn write_budget_real_server() {
    let v = Arc::new(
        AwsVault::connect(
            "aws-budget",
            &AwsConfig {
                write_budget: Some(5.0),
                ..settings()
            },
        )
        .await
        .unwrap(),
    );
    let start = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    // 10 first stages = 10 × (CreateSecret + PutSecretValue) = 20 writes.
    for _ in 0..10 {
        let v = v.clone();
        tasks.spawn(async move {
            let path = unique_path("budget");
            stage_new(&*v, &path, "x").await.unwrap();
            path
        });
    }
    let mut paths = Vec::new();
    while let Some(p) = tasks.join_next().await {
        paths.push(p.unwrap());
    }
    let elapsed = start.elapsed();
    assert_eq!(v.writes_issued(), 20);
    // 20 writes spaced 200 ms apart: at least 19 × 200 ms.
    assert!(elapsed >= Duration::from_millis(3700), "{elapsed:?}");
    // Reads are not budgeted.
    let before = std::time::Instant::now();
    for p in &paths {
        assert!(by_stage(&v, item(p), Stage::Pending).await.is_some());
    }
    assert_eq!(v.writes_issued(), 20);
    assert!(
        before.elapsed() < Duration::from_secs(2),
        "{:?}",
        before.elapsed()
    );
    for p in &paths {
        v.destroy(item(p)).await.unwrap();
    }
}

/// A one-trick HTTP server that answers every request with `status` and
/// a Secrets Manager error body; returns its URL.
async fn scripted_server(status: u16, code: &'static str, message: &'static str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                // Read the request head and body (small; one read is not
                // guaranteed to get all of it, but the answer does not
                // depend on it), then answer and close.
                let mut buf = [0u8; 16384];
                let _ = conn.read(&mut buf).await;
                let body = format!(r#"{{"__type":"{code}","message":"{message}"}}"#);
                let reply = format!(
                    "HTTP/1.1 {status} Scripted\r\ncontent-type: application/x-amz-json-1.1\r\n\
                     x-amzn-errortype: {code}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    url
}

#[apply(server_test!)]
async fn service_errors_reach_the_engine_with_their_kind() {
    let cases = [
        (
            400,
            "ThrottlingException",
            "Rate exceeded",
            ErrorKind::Throttled,
        ),
        (503, "ServiceUnavailable", "try later", ErrorKind::Transient),
        (
            400,
            "AccessDeniedException",
            "not allowed",
            ErrorKind::Unauthorized,
        ),
        (
            400,
            "InvalidRequestException",
            "bad request",
            ErrorKind::Invalid,
        ),
    ];
    for (status, code, message, kind) in cases {
        let url = scripted_server(status, code, message).await;
        // The test credentials, so the request is signed and sent.
        let v = AwsVault::connect(
            "aws-scripted",
            &AwsConfig {
                endpoint_url: Some(url),
                ..settings()
            },
        )
        .await
        .unwrap();
        let e = stage_new(&v, "agents/bot/db", "canary-0c4d")
            .await
            .unwrap_err();
        assert_error(&e, kind, &[code, "aws-scripted"], &["canary-0c4d"]);
        assert_eq!(
            v.writes_issued(),
            0,
            "DescribeSecret failed first: no write"
        );
    }
}

#[apply(server_test!)]
async fn wrong_endpoint_is_transient_with_a_clear_message() {
    // The test credentials (so the request gets as far as connecting),
    // and an endpoint where nothing listens.
    let v = AwsVault::connect(
        "aws-down",
        &AwsConfig {
            endpoint_url: Some("http://127.0.0.1:1".into()),
            timeout: Some("3s".into()),
            ..settings()
        },
    )
    .await
    .unwrap();
    let e = v
        .read(item("agents/bot/db"), Select::Stage(Stage::Current))
        .await
        .unwrap_err();
    let names = ["aws-down", "read", "agents/bot/db", "127.0.0.1:1"];
    assert_error(&e, ErrorKind::Transient, &names, &[]);
    let e = v.check().await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Transient, "{e}");
    let e = stage_new(&v, "agents/bot/db", "canary-51b0")
        .await
        .unwrap_err();
    assert_error(&e, ErrorKind::Transient, &[], &["canary-51b0"]);
}
