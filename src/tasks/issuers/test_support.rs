//! Helpers the three issuers' tests share (tests only): the task they issue
//! for, one issuance, the revocation checks and located config issues.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, SystemTime};

use super::{Grant, IssueRequest, Issued, Revoked, TaskAttribution, TaskIssuer};
use crate::config::validate::Issue;
use crate::model::{ErrorKind, PluginError};

/// A task of `invoice-bot` for `acme`, run `run-42` by alice, at `low`.
pub(crate) fn attribution(task_id: &str) -> TaskAttribution {
    TaskAttribution {
        task_id: task_id.to_owned(),
        agent: "invoice-bot".into(),
        tenant: "acme".into(),
        use_case: "month-end-close".into(),
        run_id: "run-42".into(),
        initiator: "alice@example.com".into(),
        sensitivity: "low".into(),
    }
}

/// Each field of `task` by its name, as an issuer tags its credential.
pub(crate) fn attribution_fields(task: &TaskAttribution) -> BTreeMap<String, String> {
    serde_json::from_value(serde_json::to_value(task).unwrap()).unwrap()
}

/// The request for `task` with `grant`, the credential to end `ttl` from now.
pub(crate) fn request<'a>(
    task: &'a TaskAttribution,
    grant: &'a Grant,
    ttl: Duration,
) -> IssueRequest<'a> {
    IssueRequest {
        task,
        grant,
        ttl,
        expires_at: SystemTime::now() + ttl,
    }
}

/// Issues for `task` with `grant`, the credential to end `ttl` from now.
pub(crate) async fn issue(
    issuer: &dyn TaskIssuer,
    task: &TaskAttribution,
    grant: &Grant,
    ttl: Duration,
) -> Result<Issued, PluginError> {
    issuer
        .issue(&request(task, grant, ttl))
        .await
        .map_err(|e| e.error)
}

/// A task's expiry an hour from now, for `revoke`.
pub(crate) fn in_an_hour() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

/// Asserts that `verify_revoked` still finds the credential in force.
pub(crate) async fn assert_not_revoked(
    issuer: &dyn TaskIssuer,
    task: &TaskAttribution,
    handle: Option<&str>,
) {
    assert!(
        !issuer.verify_revoked(task, handle).await.unwrap(),
        "{} is revoked already",
        issuer.object(task, handle)
    );
}

/// Asserts that `revoke` ends the credential now and `verify_revoked` then
/// finds it gone.
pub(crate) async fn assert_revoked_now(
    issuer: &dyn TaskIssuer,
    task: &TaskAttribution,
    handle: Option<&str>,
) {
    assert_eq!(
        issuer.revoke(task, handle, in_an_hour()).await.unwrap(),
        Revoked::Now
    );
    assert!(
        issuer.verify_revoked(task, handle).await.unwrap(),
        "{} is not revoked",
        issuer.object(task, handle)
    );
}

/// Whether `done` turns true within five seconds (asked every 100 ms), for
/// what a server finishes in the background.
pub(crate) async fn eventually<F: Future<Output = bool>>(mut done: impl FnMut() -> F) -> bool {
    for _ in 0..50 {
        if done().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// `(TOML path, message)` of each issue.
pub(crate) fn located(issues: &[Issue]) -> Vec<(String, String)> {
    issues
        .iter()
        .map(|i| (i.path.to_string(), i.message.clone()))
        .collect()
}

/// Asserts that `e` is of `kind` and its message contains `text`.
pub(crate) fn assert_error(e: &PluginError, kind: ErrorKind, text: &str) {
    assert_eq!(e.kind, kind, "{e}");
    assert!(e.message.contains(text), "{e}");
}
