//! The settings that are valid only on a host that has what they name:
//! the audit key file, the follow nudge key file and every alert sink's
//! key file must load (a regular file, mode 0600 or tighter, long enough),
//! and `socket_group` must exist.
//!
//! These need I/O, so they are not part of the pure validation. But a
//! config that passes `keyturn check` must not stop the next start, so this
//! one function is run by `keyturn check`, by the daemon at start (before
//! it touches the state directory) and by every reload (on the settings as
//! written, before the restart-only ones are put back to the running
//! values: a reload that would leave the next start failing is refused).
//! Each problem is a config error located at its setting.

use std::path::Path;

use super::load::{ConfigError, ConfigErrors};
use super::located::locate_issues;
use super::validate::{Issue, TomlPath};
use super::{Config, DaemonConfig};

/// The problems of `d`'s host-dependent settings, by TOML path.
pub fn host_issues(d: &DaemonConfig) -> Vec<Issue> {
    let p = TomlPath::root().key("daemon");
    let mut issues = Vec::new();
    if let Some(path) = &d.audit_key_file
        && let Err(e) = crate::audit::AuditKey::load_from(Some(path), None)
    {
        issues.push(Issue::at(p.key("audit_key_file"), with_user_hint(path, e)));
    }
    if let Some(path) = &d.follow_nudge_key_file
        && let Err(e) = crate::sinks::webhook::read_key_file(path)
    {
        issues.push(Issue::at(
            p.key("follow_nudge_key_file"),
            with_user_hint(path, e.to_string()),
        ));
    }
    if let Some(group) = &d.socket_group
        && let Err(e) = crate::api::socket::resolve_group(group)
    {
        issues.push(Issue::at(p.key("socket_group"), e.to_string()));
    }
    issues
}

/// A key file this user may not open may still be fine for the daemon's
/// user: say so rather than leave the operator guessing.
fn with_user_hint(path: &Path, message: String) -> String {
    match std::fs::File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => format!(
            "{message} (run `keyturn check` as the daemon's user, who must be able to read it)"
        ),
        _ => message,
    }
}

/// [`host_issues`] of `cfg`, located in its main file (where `[daemon]`
/// is); `Ok` when there are none.
pub fn check_host(cfg: &Config) -> Result<(), ConfigErrors> {
    let mut issues = host_issues(&cfg.daemon);
    // Each alert sink's key file loads (missing, or readable by others,
    // stops the start as surely as the daemon's own key files).
    for (name, sink) in &cfg.alerts {
        if let Err(e) = sink.clone().build(name) {
            issues.push(Issue::at(
                TomlPath::root().key("alerts").key(name),
                e.message,
            ));
        }
    }
    if issues.is_empty() {
        return Ok(());
    }
    let located = match super::load::read_config_string(&cfg.source) {
        Ok(text) => locate_issues(&cfg.source, &text, issues),
        // Read a moment ago, gone now: the issues, not located.
        Err(_) => issues
            .into_iter()
            .map(|issue| ConfigError {
                file: cfg.source.clone(),
                line: 0,
                column: 0,
                toml_path: issue.path.to_string(),
                message: issue.message,
            })
            .collect(),
    };
    Err(ConfigErrors(located))
}

/// [`load_file`](super::load_file), then [`check_host`]: what `keyturn
/// check` accepts is what the daemon starts with.
pub fn load_checked(path: &Path) -> Result<Config, ConfigErrors> {
    let cfg = super::load_file(path)?;
    check_host(&cfg)?;
    Ok(cfg)
}
