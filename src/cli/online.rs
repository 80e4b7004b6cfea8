//! `keyturn check --online`: after the config validates, log in to every
//! configured vault and every credential's target and use each once, as the
//! daemon would, changing nothing; read every alert sink's key file. One line per item; any failure makes the
//! command exit 69 (EX_UNAVAILABLE: a service it needs is unavailable).
//!
//! The checks are the plug-ins' own ([`crate::vaults::VaultPlugin::probe`],
//! [`crate::targets::Target::check`]); this module only runs them
//! concurrently, each under a timeout, and reports. Plug-in error messages
//! never hold a secret value (the plug-in rule), so they are printed as
//! they are, control characters replaced.

use std::time::Duration;

use futures::stream::{self, StreamExt};

use crate::config::Config;
use crate::model::{ErrorKind, PluginError};

/// Target checks running at once (each opens a connection, and a config
/// may hold thousands of credentials with a target).
const CONCURRENT_TARGETS: usize = 16;

/// One thing checked.
#[derive(Debug)]
pub struct Probed {
    /// `vault`, `issuer`, `alert`, `target` or `sink` (an exec sink's program).
    pub what: &'static str,
    /// The vault's name, or the credential `agent/credential` of a target.
    pub name: String,
    /// The vault's `type`, or the target as it describes itself (`postgres:app`).
    pub kind: String,
    /// `Ok(note)`: it works (the note says what was not checked).
    pub outcome: Result<Option<String>, PluginError>,
}

/// Checks every vault and every task issuer (all at once), every alert
/// sink (its key file), and every credential's target
/// ([`CONCURRENT_TARGETS`] at once), each bounded by `timeout`. In config
/// order: vaults by name, issuers by name, alert sinks by name, then
/// targets by credential.
pub async fn probe_all(cfg: &Config, timeout: Duration) -> Vec<Probed> {
    let mut vaults: Vec<_> = cfg.vaults.iter().collect();
    vaults.sort_by(|a, b| a.0.cmp(b.0));
    let vault_checks = vaults.into_iter().map(|(name, v)| async move {
        Probed {
            what: "vault",
            name: name.clone(),
            kind: v.spec.type_name(),
            outcome: bounded(timeout, v.spec.plugin().probe(name)).await,
        }
    });
    let issuer_checks = cfg.issuers.iter().map(|(name, i)| async move {
        Probed {
            what: "issuer",
            name: name.clone(),
            kind: i.type_name(),
            outcome: match i.plugin().build() {
                Ok(issuer) => bounded(timeout, check_issuer(cfg, name, &*issuer)).await,
                Err(e) => Err(e),
            },
        }
    });
    // Building an alert sink reads its key file; the receiver is not
    // contacted (a test alert would page someone).
    let alert_checks: Vec<Probed> = cfg
        .alerts
        .iter()
        .map(|(name, a)| Probed {
            what: "alert",
            name: name.clone(),
            kind: a.type_name(),
            outcome: a
                .clone()
                .build(name)
                .map(|_| Some("key read; the receiver is not contacted".into())),
        })
        .collect();
    let mut creds: Vec<_> = cfg
        .credentials()
        .filter(|(_, c)| !c.target.is_none())
        .collect();
    creds.sort_by(|a, b| a.1.key.cmp(&b.1.key));
    let target_checks = creds.into_iter().map(|(_, c)| async move {
        let name = c.key.to_string();
        match c.target.build() {
            Ok(Some(target)) => Probed {
                what: "target",
                name,
                kind: target.describe(),
                outcome: bounded(timeout, async {
                    target
                        .check()
                        .await
                        .map(|()| target.check_caveat().map(str::to_owned))
                })
                .await,
            },
            Ok(None) => Probed {
                what: "target",
                name,
                kind: c.target.type_name(),
                outcome: Ok(Some("nothing to check".into())),
            },
            Err(e) => Probed {
                what: "target",
                name,
                kind: c.target.type_name(),
                outcome: Err(e),
            },
        }
    });
    let (mut out, issuers, targets) = tokio::join!(
        futures::future::join_all(vault_checks),
        futures::future::join_all(issuer_checks),
        stream::iter(target_checks)
            .buffered(CONCURRENT_TARGETS)
            .collect::<Vec<_>>()
    );
    out.extend(issuers);
    out.extend(alert_checks);
    out.extend(targets);
    // An exec sink's program is there and may be run (black-box finding:
    // a missing one passed, and every delivery then failed). Not run.
    let mut creds: Vec<_> = cfg.credentials().collect();
    creds.sort_by(|a, b| a.1.key.cmp(&b.1.key));
    for (_, c) in creds {
        for sink in &c.deliver {
            if let crate::sinks::SinkConfig::Exec(e) = sink {
                let ctx = format!("exec:{}", e.program.display());
                out.push(Probed {
                    what: "sink",
                    name: c.key.to_string(),
                    kind: ctx.clone(),
                    outcome: crate::process::check_executable(&ctx, &e.program)
                        .await
                        .map(|()| Some("the program is executable; not run".into())),
                });
            }
        }
    }
    out
}

/// The issuer reaches its system, and accepts there every policy level's
/// grant of it (the checks a start runs at the system): every grant's
/// problem, each named by where the grant is.
async fn check_issuer(
    cfg: &Config,
    name: &str,
    issuer: &dyn crate::tasks::issuers::TaskIssuer,
) -> Result<Option<String>, PluginError> {
    issuer.check().await?;
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let mut kind = ErrorKind::Invalid;
    for p in cfg.policies.values() {
        for (level, l) in &p.levels {
            let Some(grant) = l.grants.get(name) else {
                continue;
            };
            let at = format!("policies.{}.levels.{level}.grants.{name}", p.name);
            match issuer.check_grant(grant, l.max_ttl).await {
                Ok(None) => {}
                Ok(Some(note)) => notes.push(note),
                Err(e) => {
                    kind = e.kind;
                    problems.push(format!("{at}: {}", e.message));
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(PluginError::new(kind, problems.join("; ")));
    }
    notes.dedup();
    Ok((!notes.is_empty()).then(|| notes.join("; ")))
}

/// `check` cut off after `timeout`, as an error that says so.
async fn bounded(
    timeout: Duration,
    check: impl std::future::Future<Output = Result<Option<String>, PluginError>>,
) -> Result<Option<String>, PluginError> {
    tokio::time::timeout(timeout, check)
        .await
        .unwrap_or_else(|_| {
            Err(PluginError::new(
                ErrorKind::Transient,
                format!("no answer within {}", humantime::format_duration(timeout)),
            ))
        })
}

/// What an operator can do about a failure of this kind.
fn advice(e: &PluginError) -> &'static str {
    if e.message.starts_with("no answer within") {
        return "check the address, that the service is up, and firewalls; or raise --timeout";
    }
    if e.message.contains("invalid peer certificate") {
        return "check the CA file the config names and the host name it connects to";
    }
    match e.kind {
        ErrorKind::Unauthorized => {
            "check the credentials it uses (token, keys, client secret, password) and their permissions"
        }
        ErrorKind::Transient | ErrorKind::Throttled => {
            "check the address and that the service is up and reachable from this host"
        }
        ErrorKind::NotFound => "check the names and paths the config gives it",
        ErrorKind::Invalid => "fix the config or the remote setup as the message says",
        ErrorKind::Conflict => "try again",
        ErrorKind::Fatal => "this will not fix itself; see the message",
    }
}

/// One line per item: `vault  bao  vault  ok`, or `FAILED (kind): message;
/// advice`. Names and kinds are padded to line up.
pub fn render(items: &[Probed]) -> String {
    use super::screen::clean;
    let name_w = items
        .iter()
        .map(|i| i.name.chars().count())
        .max()
        .unwrap_or(0);
    let kind_w = items
        .iter()
        .map(|i| i.kind.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for i in items {
        let result = match &i.outcome {
            Ok(None) => "ok".to_owned(),
            Ok(Some(note)) => format!("ok ({})", clean(note)),
            Err(e) => format!(
                "FAILED ({}): {}; {}",
                e.kind.as_str(),
                clean(&e.message),
                advice(e)
            ),
        };
        out.push_str(&format!(
            "{:<6}  {:<name_w$}  {:<kind_w$}  {result}\n",
            i.what,
            clean(&i.name),
            clean(&i.kind),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_item_is_one_aligned_line_with_advice_on_failure() {
        let items = vec![
            Probed {
                what: "vault",
                name: "bao".into(),
                kind: "vault".into(),
                outcome: Ok(None),
            },
            Probed {
                what: "target",
                name: "bot/db".into(),
                kind: "postgres:app".into(),
                outcome: Err(PluginError::new(
                    ErrorKind::Unauthorized,
                    "postgres:app: check: password authentication failed\nfor user",
                )),
            },
            Probed {
                what: "vault",
                name: "aws".into(),
                kind: "aws_secrets_manager".into(),
                outcome: Ok(Some("not created yet".into())),
            },
        ];
        let text = render(&items);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], "vault   bao     vault                ok");
        assert!(
            lines[1].starts_with("target  bot/db  postgres:app         FAILED (unauthorized): postgres:app: check: password authentication failed for user; check the credentials"),
            "{text}"
        );
        assert!(lines[2].ends_with("ok (not created yet)"), "{text}");
    }

    #[tokio::test]
    async fn a_check_that_hangs_fails_after_the_timeout() {
        let started = std::time::Instant::now();
        let r = bounded(Duration::from_millis(100), std::future::pending()).await;
        let e = r.unwrap_err();
        assert!(
            e.message.contains("no answer within 100ms"),
            "{}",
            e.message
        );
        assert!(advice(&e).contains("--timeout"));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
