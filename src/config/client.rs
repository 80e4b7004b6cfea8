//! What the client commands (`status`, `rotate`, `audit verify`) need of the
//! config: the control socket, the state directory and the audit log.
//!
//! They take it from the validated config when the file is valid. When it is
//! not — an operator edited it and the reload failed, so the daemon keeps
//! serving the config it last loaded — they still need to reach that daemon
//! and ask what it runs. So the paths are then read from the `[daemon]`
//! table alone, leniently: from the whole file if it is valid TOML, else
//! from the text of that one table.

use std::path::{Path, PathBuf};

use super::Config;
use super::resolve_relative;
use super::validate::{DEFAULT_SOCKET, DEFAULT_STATE_DIR, normalize};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientPaths {
    pub socket: PathBuf,
    pub agent_socket: PathBuf,
    pub state_dir: PathBuf,
    pub audit_log: PathBuf,
    /// `[daemon] audit_key_file`, if set.
    pub audit_key_file: Option<PathBuf>,
    /// The `aud` of agents' JWT assertions (`keyturn task --key`).
    pub assertion_audience: String,
}

impl ClientPaths {
    pub fn of(cfg: &Config) -> ClientPaths {
        ClientPaths {
            socket: cfg.daemon.socket.clone(),
            agent_socket: cfg.daemon.agent_socket.clone(),
            state_dir: cfg.daemon.state_dir.clone(),
            audit_log: cfg.daemon.audit_log.clone(),
            audit_key_file: cfg.daemon.audit_key_file.clone(),
            assertion_audience: cfg.daemon.assertion_audience.clone(),
        }
    }

    /// The paths the config at `path` names, read leniently: `path` is
    /// `keyturn.toml` or the config directory (whose `keyturn.toml` may be
    /// absent: then every path is the default). `None` when the file
    /// cannot be read or its `[daemon]` table cannot be (see [`Self::lenient`]).
    pub fn lenient_at(path: &Path) -> Option<ClientPaths> {
        let main = super::load::main_file(path);
        let text = match super::load::read_config_string(&main) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.is_dir() => String::new(),
            Err(_) => return None,
        };
        ClientPaths::lenient(&main, &text)
    }

    /// The paths `file` (whose text is `text`) names, read as leniently as
    /// described in the module doc. `None` when its `[daemon]` table cannot
    /// be read at all, or names a path that is not a non-empty string.
    pub fn lenient(file: &Path, text: &str) -> Option<ClientPaths> {
        let table = match toml::from_str::<toml::Table>(text) {
            Ok(t) => t,
            Err(_) => toml::from_str::<toml::Table>(&daemon_table_text(text)?).ok()?,
        };
        let daemon = match table.get("daemon") {
            Some(toml::Value::Table(d)) => Some(d),
            Some(_) => return None,
            None => None,
        };
        let setting = |key: &str| -> Option<Option<&str>> {
            match daemon.and_then(|d| d.get(key)) {
                None => Some(None),
                Some(toml::Value::String(s)) if !s.trim().is_empty() => Some(Some(s.as_str())),
                Some(_) => None,
            }
        };
        let source = if file.is_absolute() {
            normalize(file)
        } else {
            normalize(&std::env::current_dir().unwrap_or_default().join(file))
        };
        let resolve = |p: &str| normalize(&resolve_relative(&source, Path::new(p)));
        let socket = setting("socket")?.map_or_else(|| PathBuf::from(DEFAULT_SOCKET), resolve);
        let agent_socket =
            setting("agent_socket")?.map_or_else(|| socket.with_file_name("agent.sock"), resolve);
        let state_dir =
            setting("state_dir")?.map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), resolve);
        let audit_log = setting("audit_log")?.map_or_else(|| state_dir.join("audit.log"), resolve);
        let audit_key_file = setting("audit_key_file")?.map(resolve);
        let assertion_audience = setting("assertion_audience")?
            .unwrap_or(crate::auth::DEFAULT_AUDIENCE)
            .to_owned();
        Some(ClientPaths {
            socket,
            agent_socket,
            state_dir,
            audit_log,
            audit_key_file,
            assertion_audience,
        })
    }
}

/// The `[daemon]` header and the lines up to the next table header.
fn daemon_table_text(text: &str) -> Option<String> {
    let mut lines = text.lines().skip_while(|l| !is_header(l, "daemon"));
    let header = lines.next()?;
    let mut out = String::from(header);
    out.push('\n');
    for l in lines.take_while(|l| !l.trim_start().starts_with('[')) {
        out.push_str(l);
        out.push('\n');
    }
    Some(out)
}

fn is_header(line: &str, name: &str) -> bool {
    let l = line.trim();
    let Some(rest) = l.strip_prefix('[') else {
        return false;
    };
    let Some(rest) = rest.trim_start().strip_prefix(name) else {
        return false;
    };
    let Some(rest) = rest.trim_start().strip_prefix(']') else {
        return false;
    };
    let rest = rest.trim_start();
    rest.is_empty() || rest.starts_with('#')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(text: &str) -> Option<ClientPaths> {
        ClientPaths::lenient(Path::new("/etc/keyturn/keyturn.toml"), text)
    }

    /// A file that does not validate, or has a syntax error outside the
    /// daemon table, still names the socket, state directory and audit log.
    #[test]
    fn the_daemon_table_is_read_around_errors_elsewhere() {
        for (what, text, socket, state_dir, audit_log) in [
            (
                "a file that does not validate",
                "[daemon]\nsocket = \"/run/k/control.sock\"\nstate_dir = \"state\"\n\n[agents.x]\nowner = 42\n",
                "/run/k/control.sock",
                "/etc/keyturn/state",
                "/etc/keyturn/state/audit.log",
            ),
            (
                "a syntax error outside the daemon table",
                "# keyturn\n[ daemon ]  # the daemon\nsocket = \"/run/k.sock\"\naudit_log = \"/var/log/k.log\"\n[agents.x\nowner = \n",
                "/run/k.sock",
                DEFAULT_STATE_DIR,
                "/var/log/k.log",
            ),
        ] {
            let p = paths(text).unwrap_or_else(|| panic!("{what}: no paths"));
            assert_eq!(p.socket, PathBuf::from(socket), "{what}");
            assert_eq!(p.state_dir, PathBuf::from(state_dir), "{what}");
            assert_eq!(p.audit_log, PathBuf::from(audit_log), "{what}");
        }
    }

    #[test]
    fn defaults_apply_without_a_daemon_table() {
        let p = paths("[agents.x]\nowner = 1\n").unwrap();
        assert_eq!(p.socket, PathBuf::from(DEFAULT_SOCKET));
    }

    #[test]
    fn an_unreadable_daemon_table_gives_nothing() {
        assert_eq!(paths("[daemon]\nsocket = \n"), None);
        assert_eq!(paths("[daemon]\nsocket = 7\n"), None);
        assert_eq!(paths("[daemon]\nsocket = \"\"\n"), None);
        assert_eq!(paths("daemon = 3\n"), None);
    }
}
