//! `[daemon]`: paths, limits, retry, and the places that must stay apart.

use super::*;

/// The longest path a Unix socket can be bound at (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

impl Validator<'_> {
    pub(super) fn path_setting(&mut self, path: Loc<'_>, text: &str) -> PathBuf {
        if text.trim().is_empty() {
            self.err(path, "path must not be empty");
        }
        self.unexpanded(path, text);
        self.ctx.resolve(text)
    }

    /// `task_root` is not in an agent's directory (a directory right below
    /// a delivery root named after an agent): every agent's task
    /// directories would be made in it, where that agent may rename them.
    pub(super) fn task_root_beside_agents(
        &mut self,
        p: &Loc<'_>,
        daemon: &DaemonConfig,
        scope: &Scope<'_>,
    ) {
        let Some(task_root) = &daemon.task_root else {
            return;
        };
        for r in &daemon.delivery_roots {
            if let Some(Component::Normal(first)) = task_root
                .strip_prefix(r)
                .ok()
                .and_then(|rest| rest.components().next())
                && let Some(agent) = first.to_str()
                && scope.agent_names.contains_key(agent)
            {
                self.err(
                    p.key("task_root"),
                    format!(
                        "task_root {} is in the delivery directory of agent `{agent}` ({}): every agent's task directories would be made in it; put it beside the agents' directories, e.g. \"{}\"",
                        task_root.display(),
                        r.join(agent).display(),
                        r.join("tasks").display()
                    ),
                );
                return;
            }
        }
    }

    pub(super) fn daemon(&mut self, p: &Loc<'_>, d: &RawDaemon) -> DaemonConfig {
        let state_dir = match &d.state_dir {
            Some(s) => self.path_setting(p.key("state_dir"), s),
            None => PathBuf::from(DEFAULT_STATE_DIR),
        };
        let socket = match &d.socket {
            Some(s) => self.path_setting(p.key("socket"), s),
            None => PathBuf::from(DEFAULT_SOCKET),
        };
        let agent_socket = match &d.agent_socket {
            Some(s) => self.path_setting(p.key("agent_socket"), s),
            None => socket.with_file_name("agent.sock"),
        };
        // A Unix socket's path is at most 107 bytes (sun_path, with its
        // NUL): a longer one fails only when the daemon binds it.
        for (key, path, given) in [
            ("socket", &socket, d.socket.is_some()),
            ("agent_socket", &agent_socket, d.agent_socket.is_some()),
        ] {
            let len = path.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                let at = if given { p.key(key) } else { p.key("socket") };
                self.err(
                    at,
                    format!(
                        "{key} path {} is {len} bytes: a Unix socket's path is at most {MAX_SOCKET_PATH} bytes; choose a shorter one",
                        path.display()
                    ),
                );
            }
        }
        if agent_socket == socket {
            self.err(
                p.key("agent_socket"),
                "agent_socket must not be the control socket: agents reach it without the socket's group",
            );
        }
        if let Some(g) = &d.socket_group
            && g.trim().is_empty()
        {
            self.err(p.key("socket_group"), "socket_group must not be empty");
        }
        let listen = d
            .listen
            .as_ref()
            .and_then(|l| match l.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(e) => {
                    self.err(
                        p.key("listen"),
                        format!(
                            "invalid listen address `{l}`: {e} (write e.g. \"127.0.0.1:9464\")"
                        ),
                    );
                    None
                }
            });
        let delivery_roots: Vec<PathBuf> = d
            .delivery_roots
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| self.path_setting(p.key("delivery_roots").index(i), r))
            .collect();
        self.roots_apart_from_state(p, &delivery_roots, &state_dir);
        let audit_log = match &d.audit_log {
            Some(s) => {
                let log = self.path_setting(p.key("audit_log"), s);
                self.log_apart(p, &log, &state_dir, &delivery_roots);
                log
            }
            None => state_dir.join("audit.log"),
        };
        let audit_key_file = d.audit_key_file.as_ref().map(|s| {
            let key = self.path_setting(p.key("audit_key_file"), s);
            self.key_apart_from_log(p, &key, &state_dir, &audit_log);
            key
        });
        let follow_nudge_key_file = d.follow_nudge_key_file.as_ref().map(|s| {
            let key = self.path_setting(p.key("follow_nudge_key_file"), s);
            if d.listen.is_none() {
                self.err(
                    p.key("follow_nudge_key_file"),
                    "follow_nudge_key_file enables POST /v1/follow/nudge on the HTTP listener, but there is no `listen` address (write e.g. listen = \"0.0.0.0:9464\")",
                );
            }
            key
        });
        let drain_timeout = self.duration_or(
            p.key("drain_timeout"),
            d.drain_timeout.as_ref(),
            DEFAULT_DRAIN_TIMEOUT,
            Zero::Rejected,
        );
        let max_concurrent_rotations = d
            .max_concurrent_rotations
            .unwrap_or(DEFAULT_MAX_CONCURRENT_ROTATIONS);
        if max_concurrent_rotations == 0 {
            self.err(
                p.key("max_concurrent_rotations"),
                "max_concurrent_rotations must be at least 1",
            );
        } else if max_concurrent_rotations > MAX_CONCURRENCY {
            self.err(
                p.key("max_concurrent_rotations"),
                format!("max_concurrent_rotations is at most {MAX_CONCURRENCY}"),
            );
        }
        let catch_up_spread = self.duration_or(
            p.key("catch_up_spread"),
            d.catch_up_spread.as_ref(),
            DEFAULT_CATCH_UP_SPREAD,
            Zero::Allowed,
        );
        let retry = self.retry(&p.key("retry"), d);
        let task_root = d.task_root.as_ref().map(|s| {
            let root = self.path_setting(p.key("task_root"), s);
            if let Some(r) = delivery_roots.iter().find(|r| root == **r) {
                self.err(
                    p.key("task_root"),
                    format!(
                        "task_root {} is a delivery root itself, so <task_root>/<agent> would be each agent's own delivery directory; give tasks a directory of their own in it, e.g. \"{}\"",
                        root.display(),
                        r.join("tasks").display()
                    ),
                );
            } else if !delivery_roots.iter().any(|r| root.starts_with(r)) {
                self.err(
                    p.key("task_root"),
                    format!(
                        "task_root {} is not inside a delivery root ({}); task credentials are delivered like the other files: put it under one, e.g. \"{}\"",
                        root.display(),
                        if delivery_roots.is_empty() { "none is configured".to_owned() } else { delivery_roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ") },
                        delivery_roots.first().map(|r| r.join("tasks").display().to_string()).unwrap_or_else(|| "/run/keyturn/agents/tasks".to_owned())
                    ),
                );
            }
            root
        });
        let assertion_audience = match &d.assertion_audience {
            Some(a) if a.trim().is_empty() || a.trim() != a => {
                self.err(
                    p.key("assertion_audience"),
                    "assertion_audience must be a non-empty name without surrounding spaces (default \"keyturn\")",
                );
                a.clone()
            }
            Some(a) => a.clone(),
            None => crate::auth::DEFAULT_AUDIENCE.to_owned(),
        };
        DaemonConfig {
            state_dir,
            socket,
            socket_group: d.socket_group.clone(),
            agent_socket,
            listen,
            delivery_roots,
            audit_log,
            audit_key_file,
            follow_nudge_key_file,
            drain_timeout,
            max_concurrent_rotations,
            catch_up_spread,
            retry,
            task_root,
            assertion_audience,
        }
    }

    /// A sink writes anything it likes below a delivery root (as root), so
    /// a root must neither hold the state directory (vault keys, vault and
    /// state databases, the audit log) nor lie inside it.
    pub(super) fn roots_apart_from_state(
        &mut self,
        p: &Loc<'_>,
        roots: &[PathBuf],
        state_dir: &Path,
    ) {
        for (i, root) in roots.iter().enumerate() {
            let how = if root == state_dir {
                "the same directory"
            } else if state_dir.starts_with(root) {
                "the root contains it"
            } else if root.starts_with(state_dir) {
                "the root is inside it"
            } else {
                continue;
            };
            self.err(
                p.key("delivery_roots").index(i),
                format!(
                    "delivery root `{}` overlaps the state directory `{}` ({how}), where keyturn keeps its keys and databases; choose a delivery root outside it (e.g. /run/keyturn/agents)",
                    root.display(),
                    state_dir.display()
                ),
            );
        }
    }

    /// The audit log is a file of its own: not one of keyturn's files in
    /// the state directory (`state.db` took the audit records at byte 0),
    /// not below a delivery root (a sink renamed a secret over it, and
    /// sinks write anything there as root). Black-box finding: both passed
    /// the check and destroyed the log.
    fn log_apart(&mut self, p: &Loc<'_>, log: &Path, state_dir: &Path, roots: &[PathBuf]) {
        let why = if let Ok(rest) = log.strip_prefix(state_dir) {
            let name = rest.to_string_lossy();
            let ours = rest.components().count() != 1
                || name.starts_with("state.db")
                || name.ends_with("-vault.key")
                || ["keyturn.lock", "hooks", "alerts", "tasks", "vaults"].contains(&&*name);
            ours.then(|| {
                format!(
                    "is one of keyturn's own places in the state directory `{}`; write a file name directly in it other than keyturn's (e.g. the default, audit.log), or a path elsewhere",
                    state_dir.display()
                )
            })
        } else {
            roots.iter().find(|r| log.starts_with(r)).map(|r| {
                format!(
                    "is below the delivery root `{}`, where sinks write secrets (and replace files) as root; keep it elsewhere (e.g. the default, in the state directory)",
                    r.display()
                )
            })
        };
        if let Some(why) = why {
            self.err(
                p.key("audit_log"),
                format!("audit_log `{}` {why}", log.display()),
            );
        }
    }

    /// The audit key keys the chain against whoever can write the log and
    /// the state database: kept beside them it would protect nothing.
    pub(super) fn key_apart_from_log(
        &mut self,
        p: &Loc<'_>,
        key: &Path,
        state_dir: &Path,
        audit_log: &Path,
    ) {
        let audit_dir = audit_log.parent().unwrap_or(Path::new("/"));
        let inside = if key.starts_with(state_dir) {
            format!("the state directory `{}`", state_dir.display())
        } else if key.starts_with(audit_dir) {
            format!("the audit log's directory `{}`", audit_dir.display())
        } else {
            return;
        };
        self.err(
            p.key("audit_key_file"),
            format!(
                "audit_key_file `{}` is inside {inside}: whoever can write the audit log and the state database could read or replace it, and the key is there to stop them; keep it elsewhere (e.g. /etc/keyturn/audit.key) or pass it as the systemd credential keyturn-audit-key (LoadCredentialEncrypted=)",
                key.display()
            ),
        );
    }

    pub(super) fn retry(&mut self, p: &Loc<'_>, d: &RawDaemon) -> RetryConfig {
        let default = RetryConfig::default();
        let Some(r) = &d.retry else {
            return default;
        };
        let initial_delay = self.duration_or(
            p.key("initial_delay"),
            r.initial_delay.as_ref(),
            default.initial_delay,
            Zero::Rejected,
        );
        let max_delay = self.duration_or(
            p.key("max_delay"),
            r.max_delay.as_ref(),
            default.max_delay,
            Zero::Rejected,
        );
        if initial_delay > max_delay {
            self.err(
                p.key(if r.max_delay.is_some() {
                    "max_delay"
                } else {
                    "initial_delay"
                }),
                format!(
                    "initial_delay ({}) is longer than max_delay ({})",
                    humantime::format_duration(initial_delay),
                    humantime::format_duration(max_delay)
                ),
            );
        }
        let max_attempts = r.max_attempts.unwrap_or(default.max_attempts);
        if max_attempts == 0 {
            self.err(p.key("max_attempts"), "max_attempts must be at least 1");
        }
        RetryConfig {
            initial_delay,
            max_delay,
            max_attempts,
        }
    }
}
