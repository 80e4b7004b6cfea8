//! The settings that are valid only on a host that has what they name:
//! the audit key file, the follow nudge key file and every alert sink's
//! key file must load (a regular file, mode 0600 or tighter, long enough),
//! `socket_group` must exist, and what is already at the state directory,
//! the audit log and a local vault's directory must be of the right kind.
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
    if let Some(path) = &d.audit_key_file {
        match crate::audit::AuditKey::load_from(Some(path), None) {
            Err(e) => issues.push(Issue::at(p.key("audit_key_file"), with_user_hint(path, e))),
            Ok(Some(key)) => {
                if let Err(e) = crate::audit::key_matches_tail(&d.audit_log, &key) {
                    issues.push(Issue::at(p.key("audit_key_file"), e));
                }
            }
            Ok(None) => {}
        }
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
    // Made at the first start when missing; something else there stops it.
    if let Some(why) = not_a("directory", &d.state_dir) {
        issues.push(Issue::at(p.key("state_dir"), why));
    } else if let Some(why) =
        every_user_writes(&d.state_dir).or_else(|| every_user_writes(&d.state_dir.join("hooks")))
    {
        issues.push(Issue::at(p.key("state_dir"), why));
    }
    if let Some(why) = not_usable(&d.state_dir, true) {
        issues.push(Issue::at(p.key("state_dir"), why));
    }
    if let Some(why) = not_usable(&d.audit_log, false) {
        issues.push(Issue::at(p.key("audit_log"), why));
    }
    if let Ok(m) = std::fs::metadata(&d.audit_log)
        && m.is_dir()
    {
        issues.push(Issue::at(
            p.key("audit_log"),
            format!(
                "{} is a directory: audit_log names the log file itself",
                d.audit_log.display()
            ),
        ));
    }
    issues
}

/// Why `path`, which exists, is not a `kind` (a directory) keyturn can use
/// there; `None` when it is one or is missing (then it is made).
fn not_a(kind: &str, path: &Path) -> Option<String> {
    let m = std::fs::metadata(path).ok()?;
    (!m.is_dir()).then(|| {
        format!(
            "{} exists and is not a {kind}: move it away or name another place",
            path.display()
        )
    })
}

/// Why `dir`, when it exists, is no place for keyturn's state: every user
/// may write it (`o+w`). The state directory holds the vault key, the
/// databases and the records of the process groups the daemon ends at its
/// start (`hooks/`): black-box finding, a local user replaced `hooks/` in a
/// 0777 state directory and the daemon, as root, killed a process group of
/// their choosing. Refused as a config or `agents.d` every user may write.
fn every_user_writes(dir: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::symlink_metadata(dir).ok()?;
    (m.is_dir() && m.permissions().mode() & 0o002 != 0).then(|| {
        format!(
            "{} is writable by every user (mode {:o}): it holds keyturn's keys and databases; make it writable by keyturn's user only (chmod o-w, e.g. chmod 0700)",
            dir.display(),
            m.permissions().mode() & 0o7777
        )
    })
}

/// Why this user cannot use `path` (a directory when `dir`, else a file):
/// it exists and may not be read and written (and searched), or it is
/// missing and the nearest directory above it that exists may not be
/// written, so the start cannot make it. Black-box finding: `check` as the
/// daemon's user passed a state directory only root could open, and the
/// start then failed on it.
fn not_usable(path: &Path, dir: bool) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let may = |p: &Path, mode: libc::c_int| {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
            return true;
        };
        // SAFETY: a valid NUL-terminated path; access(2) only reads it.
        unsafe { libc::access(c.as_ptr(), mode) == 0 }
    };
    let user = || {
        // SAFETY: geteuid cannot fail.
        let uid = unsafe { libc::geteuid() };
        format!("uid {uid}")
    };
    match std::fs::metadata(path) {
        Ok(m) => {
            let mode = if dir && m.is_dir() {
                libc::R_OK | libc::W_OK | libc::X_OK
            } else if !dir && m.is_file() {
                libc::R_OK | libc::W_OK
            } else {
                return None; // the wrong kind: said elsewhere
            };
            (!may(path, mode)).then(|| {
                format!(
                    "{} may not be {} by this user ({}): run keyturn (and `keyturn check`) as the user that owns it, or give that user the {} (e.g. chown -R keyturn: for the packaged unit)",
                    path.display(),
                    if dir { "read, written and searched" } else { "read and written" },
                    user(),
                    if dir { "directory" } else { "file" }
                )
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let above = path.ancestors().skip(1).find(|a| {
                !a.as_os_str().is_empty() && std::fs::metadata(a).is_ok_and(|m| m.is_dir())
            })?;
            (!may(above, libc::W_OK | libc::X_OK)).then(|| {
                format!(
                    "{} is missing and this user ({}) may not create it in {}: make it (owned by keyturn's user) or run keyturn as a user that may",
                    path.display(),
                    user(),
                    above.display()
                )
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Some(format!(
            "{} cannot be reached by this user ({}): {e}; run keyturn (and `keyturn check`) as the user that owns it",
            path.display(),
            user()
        )),
        Err(_) => None,
    }
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
    let issues = host_problems(cfg);
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

/// [`check_host`]'s problems, by TOML path, not located.
pub(super) fn host_problems(cfg: &Config) -> Vec<Issue> {
    let mut issues = host_issues(&cfg.daemon);
    // A local vault's directory, made at the first start when missing.
    for (name, vault) in &cfg.vaults {
        if let crate::vaults::VaultSpec::Local(l) = &vault.spec
            && let Some(why) = l.dir.as_deref().and_then(|d| not_a("directory", d))
        {
            issues.push(Issue::at(
                TomlPath::root().key("vaults").key(name).key("dir"),
                why,
            ));
        }
    }
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
    // Each hook and exec program that exists: nobody but root and
    // keyturn's user can change it (see `trust`). A missing one is
    // `check --online`'s to report (it may be installed after the config).
    for (agent, c) in cfg.credentials() {
        let at = TomlPath::root()
            .key("agents")
            .key(agent.id.as_str())
            .key("credentials")
            .key(c.key.credential.as_str());
        let mut programs = Vec::new();
        if let crate::targets::TargetConfig::Command(h) = &c.target {
            programs.push((at.clone().key("target").key("program"), &h.program));
        }
        for (i, sink) in c.deliver.iter().enumerate() {
            if let crate::sinks::SinkConfig::Exec(e) = sink {
                programs.push((
                    at.clone().key("deliver").index(i).key("program"),
                    &e.program,
                ));
            }
        }
        for (path, program) in programs {
            if let Some(why) = super::trust::untrusted(program) {
                issues.push(Issue::at(
                    path,
                    format!("program {}: {why}", program.display()),
                ));
            }
        }
    }
    issues
}

/// [`load_file`](super::load_file), then [`check_host`]: what `keyturn
/// check` accepts is what the daemon starts with. A config with errors
/// gets the host checks of its settings that have none among them.
pub fn load_checked(path: &Path) -> Result<Config, ConfigErrors> {
    let cfg = super::load::load_file_with_host(path, host_problems)?;
    check_host(&cfg)?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Black-box finding: `check` listed a missing audit key file and an
    /// unknown socket group only after every other error was fixed. They
    /// come with the others now; a setting that has an error of its own
    /// is not checked on the host (it holds no value from the file).
    #[test]
    fn host_problems_are_listed_with_the_configs_other_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let main = tmp.path().join("keyturn.toml");
        let text = format!(
            "[daemon]\nstate_dir = \"{d}/state\"\nsocket_group = \"no-such-group-kt\"\n\
             audit_key_file = \"{d}/keys/missing\"\n\
             [vaults.local]\ntype = \"local\"\n\
             [agents.bot]\nowner = \"a@b.c\"\ntenant = \"acme\"\ntier = \"bogus\"\n\
             [agents.bot.credentials.db]\nvault = \"local\"\nevery = \"1h\"\n\
             generate = {{ kind = \"password\", length = 24 }}\n",
            d = tmp.path().display(),
        );
        std::fs::write(&main, &text).unwrap();
        let errors = load_checked(&main).unwrap_err().0;
        let paths: Vec<&str> = errors.iter().map(|e| e.toml_path.as_str()).collect();
        assert!(paths.contains(&"agents.bot.tier"), "{errors:?}");
        assert!(paths.contains(&"daemon.socket_group"), "{errors:?}");
        assert!(paths.contains(&"daemon.audit_key_file"), "{errors:?}");
        assert!(errors.iter().all(|e| e.line > 0), "located: {errors:?}");

        // A setting with its own error is not checked on the host too.
        std::fs::write(
            &main,
            text.replace("socket_group = \"no-such-group-kt\"", "socket_group = 7"),
        )
        .unwrap();
        let errors = load_checked(&main).unwrap_err().0;
        let on_group = errors
            .iter()
            .filter(|e| e.toml_path == "daemon.socket_group")
            .count();
        assert_eq!(on_group, 1, "{errors:?}");
    }

    /// Black-box finding: a hook program every user could write passed
    /// `check` (and the daemon ran it as root with the secret). Named,
    /// located at the credential's `target.program`.
    #[test]
    fn a_hook_program_every_user_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let hook = tmp.path().join("hook.sh");
        std::fs::write(&hook, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o777)).unwrap();
        let main = tmp.path().join("keyturn.toml");
        let text = format!(
            "[daemon]\nstate_dir = \"{d}/state\"\n[vaults.local]\ntype = \"local\"\n\
             [agents.bot]\nowner = \"a@b.c\"\ntenant = \"acme\"\ntier = \"high\"\n\
             [agents.bot.credentials.db]\nvault = \"local\"\nevery = \"1h\"\n\
             generate = {{ kind = \"password\", length = 24 }}\n\
             target = {{ type = \"command\", program = \"{h}\" }}\n",
            d = tmp.path().display(),
            h = hook.display()
        );
        std::fs::write(&main, &text).unwrap();
        let cfg = crate::config::load_str(&main, &text).unwrap();
        let e = check_host(&cfg).unwrap_err().0;
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].toml_path, "agents.bot.credentials.db.target.program");
        assert!(e[0].message.contains("mode 0777"), "{}", e[0]);
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        check_host(&cfg).unwrap();
    }

    /// Defect (black-box): `check` passed a `state_dir` that is a file, an
    /// `audit_log` that is a directory and a local vault `dir` that is a
    /// file; the daemon then did not start. All three are named, located.
    #[test]
    fn what_is_in_the_way_of_the_state_the_log_and_a_vault_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        let main = tmp.path().join("keyturn.toml");
        let text = format!(
            "[daemon]\nstate_dir = \"{f}\"\naudit_log = \"{d}\"\n[vaults.local]\ntype = \"local\"\ndir = \"{f}\"\n",
            f = file.display(),
            d = tmp.path().display()
        );
        std::fs::write(&main, &text).unwrap();
        let cfg = crate::config::load_str(&main, &text).unwrap();
        let e = check_host(&cfg).unwrap_err().0;
        let at: Vec<(&str, usize)> = e.iter().map(|e| (e.toml_path.as_str(), e.line)).collect();
        assert_eq!(
            at,
            [
                ("daemon.state_dir", 2),
                ("daemon.audit_log", 3),
                ("vaults.local.dir", 6)
            ],
            "{e:?}"
        );
        assert!(e[0].message.contains("is not a directory"), "{}", e[0]);
        assert!(e[1].message.contains("is a directory"), "{}", e[1]);
    }

    /// Black-box finding: a 0777 state directory was taken, and a local
    /// user who replaced its `hooks/` had the daemon kill a process group
    /// of their choosing at its start. A state directory, or its `hooks/`,
    /// writable by every user is refused.
    #[test]
    fn a_state_directory_every_user_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let main = tmp.path().join("keyturn.toml");
        let text = format!("[daemon]\nstate_dir = \"{}\"\n", state.display());
        std::fs::write(&main, &text).unwrap();
        let cfg = crate::config::load_str(&main, &text).unwrap();
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        mode(&state, 0o700);
        check_host(&cfg).unwrap();
        for (dir, m) in [(state.clone(), 0o777), (state.join("hooks"), 0o1777)] {
            if dir != state {
                mode(&state, 0o700);
                std::fs::create_dir(&dir).unwrap();
            }
            mode(&dir, m);
            let e = check_host(&cfg).unwrap_err().0;
            assert_eq!(e.len(), 1, "{e:?}");
            assert_eq!(
                (e[0].toml_path.as_str(), e[0].line),
                ("daemon.state_dir", 2)
            );
            assert!(
                e[0].message
                    .starts_with(&format!("{} is writable by every user", dir.display())),
                "{}",
                e[0]
            );
        }
    }
}
