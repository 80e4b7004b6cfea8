//! The `keyturn` commands. Each returns an exit code:
//! 0 success, 1 the operation failed, 64 bad config or usage (EX_USAGE),
//! 69 the daemon is not reachable, or `check --online` found a vault or
//! target it cannot use (EX_UNAVAILABLE), 77 the user may not use the
//! control socket (EX_NOPERM).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

use crate::api::client::{ClientError, call};
use crate::api::protocol::{
    ApiErrorKind, Request, Response, ResponseBody, RotateOutcome, parse_selector,
};
use crate::config::{self, ClientPaths, Config, ConfigErrors};
use crate::telemetry;
use tables::{render_agents_table, render_status_json, render_status_table};

pub use args::{AuditCommand, Cli, Command, ExchangeArgs, TaskCommand, TokenCommand, WatchArgs};
use audit::audit_verify;
use offline::{offline_decommissions, offline_tasks};

mod agent;
mod args;
mod audit;
mod completions;
mod manpages;
mod offline;
mod online;
pub mod screen;
mod tables;

pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 64;
pub const EXIT_UNAVAILABLE: u8 = 69;
pub const EXIT_NOPERM: u8 = 77;
/// `decommission --wait --timeout` ran out before the revocation was done.
pub const EXIT_TEMPFAIL: u8 = 75;
/// `decommission` of an agent neither the config nor state knows (EX_NOUSER).
pub const EXIT_NO_AGENT: u8 = 67;

/// An empty `KEYTURN_CONFIG` (`Environment=KEYTURN_CONFIG=` in a unit,
/// `KEYTURN_CONFIG= keyturn status`) counts as unset, as it does for
/// completions: clap took it for an empty `--config` the user never typed
/// ("a value is required for '--config'"). So does an empty
/// `KEYTURN_AGENT_SOCKET` (the same message about `--socket`).
fn unset_empty_config_variable() {
    for var in ["KEYTURN_CONFIG", "KEYTURN_AGENT_SOCKET"] {
        if std::env::var_os(var).is_some_and(|v| v.is_empty()) {
            // SAFETY: called first thing in main, before any other thread
            // (the async runtime, the writer threads) exists.
            unsafe { std::env::remove_var(var) };
        }
    }
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    ignore_early_hangups();
    // A TAB in a shell with `keyturn completions` loaded: answer and exit.
    completions::answer_if_asked();
    unset_empty_config_variable();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Daemon | Command::Watch(_)) {
        end_quietly_on_a_closed_pipe();
        fail_cleanly_when_output_cannot_be_written();
    }
    if let Command::Completions { shell } = cli.command {
        let mut out = std::io::stdout().lock();
        return match completions::write_script(shell, &mut out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("keyturn: writing the completion script: {e}");
                ExitCode::from(EXIT_FAILED)
            }
        };
    }
    let level = match cli.command {
        // Client commands stay quiet unless asked.
        Command::Daemon | Command::Watch(_) => cli.log_level.clone(),
        _ if cli.log_level == "info" => "warn".to_string(),
        _ => cli.log_level.clone(),
    };
    telemetry::init(cli.log_format, &level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyturn: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let online_check = matches!(cli.command, Command::Check { online: true, .. });
    let code = runtime.block_on(run(cli));
    if online_check {
        // A probe given up at `--timeout` may still be logging in on the
        // blocking pool; shutting the runtime down under it made tokio
        // panic there (a backtrace after the report). Nothing is left to
        // do: the report is out.
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        std::process::exit(i32::from(code));
    }
    // Blocking tasks (SQLite, file writes) are bounded; do not wait forever on them.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    ExitCode::from(code)
}

/// A SIGHUP's default action ends the process, and the daemon takes it
/// over only once it runs (parsing the command line and building the
/// runtime come first): one sent in those first milliseconds (a reload
/// sent as the daemon is started) killed it. Ignored from the first
/// instruction of the daemon on; the daemon's own handler replaces this
/// (and programs it starts get the default action back at exec).
fn ignore_early_hangups() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    if std::env::args_os().any(|a| a == "daemon") {
        // SAFETY: at start-up, before any thread exists; SIG_IGN installs
        // no handler.
        let _ = unsafe { signal(Signal::SIGHUP, SigHandler::SigIgn) };
    }
}

/// A client command whose output goes to a pipe its reader has closed
/// (`keyturn status | head -3`) ends quietly, killed by SIGPIPE as any Unix
/// tool is. Rust ignores SIGPIPE, so a print would panic on the closed pipe
/// instead. The daemon and `watch` keep ignoring it: they write to sockets
/// and pipes whose readers may go away, and must see EPIPE as an error.
fn end_quietly_on_a_closed_pipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: at start-up, before any thread exists; SIG_DFL installs no
    // handler.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

/// A client command whose output cannot be written (`keyturn status >
/// /dev/full`, a report to a full disk) ends with one line saying so and
/// exit 1, as any failed operation does. `print!` panics on a failed write;
/// without this the user got a panic and a backtrace (exit 101).
fn fail_cleanly_when_output_cannot_be_written() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if let Some(why) = message
            .strip_prefix("failed printing to stdout: ")
            .map(|why| ("its output", why))
            .or_else(|| {
                message
                    .strip_prefix("failed printing to stderr: ")
                    .map(|why| ("its messages", why))
            })
        {
            use std::io::Write as _;
            // Stderr may be what failed: best effort, and no second panic.
            let _ = writeln!(
                std::io::stderr(),
                "keyturn: cannot write {}: {}",
                why.0,
                why.1
            );
            std::process::exit(i32::from(EXIT_FAILED));
        }
        default(info);
    }));
}

async fn run(cli: Cli) -> u8 {
    match cli.command {
        Command::Check { online, timeout } => check(&cli.config, online, timeout).await,
        Command::Daemon => match crate::daemon::run(&cli.config).await {
            Ok(()) => 0,
            Err(crate::daemon::DaemonError::Config(errors))
                if cli.log_format == telemetry::LogFormat::Json
                    && tracing::enabled!(tracing::Level::ERROR) =>
            {
                // One JSON line per error, as every other line of a daemon
                // logging JSON (black-box finding: a log pipeline got the
                // errors that stopped the start as plain text).
                for e in &errors.0 {
                    tracing::error!(error = %e, "config error");
                }
                tracing::error!(errors = errors.0.len(), config = %cli.config.display(), "config errors; not starting");
                EXIT_USAGE
            }
            Err(crate::daemon::DaemonError::Config(errors)) => {
                eprint!("{errors}");
                eprintln!(
                    "keyturn: {} error(s) in {}; not starting",
                    errors.0.len(),
                    errors.files(&cli.config)
                );
                EXIT_USAGE
            }
            Err(e) => {
                // Logs go to stderr: said once, as a log line (its level
                // reaches the journal), unless errors are not logged.
                if tracing::enabled!(tracing::Level::ERROR) {
                    tracing::error!(error = %e, "cannot start");
                } else {
                    eprintln!("keyturn: {e}");
                }
                EXIT_FAILED
            }
        },
        Command::Status { json, wide, color } => {
            let view = match (json, wide) {
                (true, _) => StatusView::Json,
                (_, true) => StatusView::Wide,
                _ => StatusView::Fitted(screen::Screen {
                    width: screen::WIDTH,
                    color: screen::color_for_stdout(color),
                }),
            };
            status(&cli.config, view).await
        }
        Command::Rotate {
            selector,
            wait,
            json,
        } => rotate(&cli.config, &selector, wait, json).await,
        Command::Decommission {
            agent,
            reason,
            by,
            wait,
            timeout,
            json,
        } => decommission(&cli.config, &agent, reason, by, wait, timeout, json).await,
        Command::Surface { unused_after, json } => surface(&cli.config, unused_after, json).await,
        Command::Watch(args) => {
            crate::watch::run(crate::watch::Watch {
                files: args.files,
                action: if args.restart {
                    crate::watch::Action::Restart { drain: args.drain }
                } else {
                    crate::watch::Action::Signal(
                        args.signal.unwrap_or(nix::sys::signal::Signal::SIGHUP),
                    )
                },
                debounce: args.debounce,
                command: args.command,
            })
            .await
        }
        Command::Ack {
            credential,
            version,
            socket,
            json,
        } => agent::ack(&cli.config, &credential, version, socket, json).await,
        Command::Task {
            command,
            socket,
            as_agent,
            key,
            agent,
            audience,
        } => {
            let signer = key.zip(agent).map(|(key, agent)| agent::AssertionSigner {
                key,
                agent,
                audience,
            });
            agent::task(&cli.config, command, socket, as_agent, signer).await
        }
        Command::Token {
            command: TokenCommand::Exchange(args),
        } => agent::token_exchange(&cli.config, args).await,
        Command::Audit {
            command: AuditCommand::Verify,
        } => audit_verify(&cli.config),
        Command::Audit {
            command: AuditCommand::Archive { to, broken },
        } => audit::audit_archive(&cli.config, to.as_deref(), broken),
        // Answered in `main`, before logging and the runtime start.
        Command::Completions { .. } => 0,
        Command::Manpages { dir } => manpages::write(&dir),
    }
}

/// The config, or its errors printed and [`EXIT_USAGE`].
fn located_or_usage(path: &Path, loaded: Result<Config, ConfigErrors>) -> Result<Config, u8> {
    loaded.map_err(|errors| {
        eprint!("{errors}");
        eprintln!(
            "keyturn: {} error(s) in {}",
            errors.0.len(),
            errors.files(path)
        );
        EXIT_USAGE
    })
}

/// The config as a client command sees it. An invalid file does not stop
/// `status`, `rotate` or `audit verify`: the daemon keeps serving the config
/// it last loaded, and an operator must be able to ask it what that is.
enum ClientConfig {
    Valid(Box<Config>),
    /// The file does not validate; its `[daemon]` table still names the paths.
    Invalid {
        paths: ClientPaths,
        errors: ConfigErrors,
    },
}

impl ClientConfig {
    fn paths(&self) -> ClientPaths {
        match self {
            ClientConfig::Valid(cfg) => ClientPaths::of(cfg),
            ClientConfig::Invalid { paths, .. } => paths.clone(),
        }
    }

    /// No daemon answered and the file is invalid: the file is the problem
    /// to fix first, so say everything that is wrong with it.
    fn unreachable_and_invalid(&self, path: &Path, e: &ClientError) -> Option<u8> {
        let ClientConfig::Invalid { errors, .. } = self else {
            return None;
        };
        eprint!("{errors}");
        eprintln!(
            "keyturn: {} error(s) in {}, and {e}",
            errors.0.len(),
            errors.files(path)
        );
        Some(EXIT_USAGE)
    }
}

fn load_for_client(path: &Path) -> Result<ClientConfig, u8> {
    let errors = match config::load_file(path) {
        Ok(cfg) => return Ok(ClientConfig::Valid(Box::new(cfg))),
        Err(errors) => errors,
    };
    let paths = ClientPaths::lenient_at(path);
    match paths {
        Some(paths) => {
            eprintln!(
                "keyturn: warning: {} does not validate ({} error(s); `keyturn check` lists them); a running daemon keeps the config it last loaded",
                path.display(),
                errors.0.len()
            );
            Ok(ClientConfig::Invalid { paths, errors })
        }
        None => {
            eprint!("{errors}");
            eprintln!(
                "keyturn: {} error(s) in {}",
                errors.0.len(),
                errors.files(path)
            );
            Err(EXIT_USAGE)
        }
    }
}

async fn check(path: &Path, online: bool, timeout: std::time::Duration) -> u8 {
    // What the daemon's start checks on this host too (key files, group).
    let cfg = match located_or_usage(path, config::host::load_checked(path)) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    // Not a config error, but the start would stop on it: so would the
    // unit's `ExecStartPre=keyturn check`, rather than a restart loop. Said
    // before the summary, which would read "ok" (black-box finding).
    if let Err(e) = crate::state::space::room_to_start(&cfg) {
        eprintln!("keyturn: the daemon would not start: {e}");
        return EXIT_FAILED;
    }
    // A state database a newer keyturn migrated: the start refuses it
    // (black-box finding: `check` passed, and the unit's ExecStartPre let a
    // restart loop through).
    let state_db = crate::daemon::state_db_path(&cfg);
    if state_db.exists()
        && let Err(e @ crate::state::StateError::TooNew { .. }) =
            crate::state::SqliteStore::open_read_only(&state_db)
    {
        eprintln!("keyturn: the daemon would not start: {e}");
        return EXIT_FAILED;
    }
    if let Some(why) = audit_key_missing(&cfg) {
        // Under systemd (its credentials passed) the start would see what
        // this run sees; by hand, the unit may pass the key.
        if std::env::var_os("CREDENTIALS_DIRECTORY").is_some() {
            eprintln!("keyturn: the daemon would not start: {why}");
            return EXIT_FAILED;
        }
        eprintln!(
            "keyturn: warning: {why}; unless the unit passes it, the daemon refuses to start"
        );
    }
    println!("{}", config::summary(&cfg));
    warn_stranded_tasks(&cfg).await;
    warn_decommissioned_signers(&cfg);
    warn_unreadable_jwks_files(&cfg);
    warn_undone_decommissions(&cfg);
    warn_world_readable_secret_files(&cfg);
    warn_unusable_webhook_keys(&cfg);
    warn_task_credentials_outliving_sla(&cfg);
    warn_missing_postgres_files(&cfg);
    warn_unknown_agent_ids(&cfg);
    if !online {
        return 0;
    }
    let items = online::probe_all(&cfg, timeout).await;
    if items.is_empty() {
        println!("no vaults or targets to check online");
    }
    print!("{}", online::render(&items));
    let failed = items.iter().filter(|i| i.outcome.is_err()).count();
    if failed == 0 {
        0
    } else {
        eprintln!(
            "keyturn: {failed} of {} online check(s) failed",
            items.len()
        );
        EXIT_UNAVAILABLE
    }
}

/// Warns of each credential of a task not ended that this config could not
/// revoke (its issuer removed, or pointed at another system than the one
/// that minted it), from the task store when it can be read: a reload with
/// this config leaves those tasks unrevoked until the issuer is back.
async fn warn_stranded_tasks(cfg: &Config) {
    let dir = cfg.daemon.state_dir.join("tasks");
    let Ok(Some(store)) = crate::tasks::store::TaskStore::open_read_only(&dir) else {
        return;
    };
    let Ok(mut tasks) = store.list(None, 0) else {
        return;
    };
    if tasks.is_empty() {
        return;
    }
    let mut issuers = std::collections::BTreeMap::new();
    for (name, issuer) in &cfg.issuers {
        match issuer.plugin().build() {
            Ok(built) => {
                issuers.insert(name.clone(), built);
            }
            // Not buildable here (an environment variable of the daemon's,
            // say): nothing to say about its tasks.
            Err(_) => tasks
                .iter_mut()
                .for_each(|t| t.items.retain(|i| &i.issuer != name)),
        }
    }
    let now = chrono::Utc::now().timestamp_millis();
    for line in crate::tasks::manager::stranded(&tasks, &issuers, now).await {
        eprintln!("keyturn: warning: {line}");
    }
}

/// Warns of an agent's `uid` or `gid` that no user or group of this host
/// has: its files are owned by the number, so a typo goes unnoticed until
/// the agent cannot read them (black-box finding). Only a warning: the
/// agent may run in a container whose users this host does not list.
fn warn_unknown_agent_ids(cfg: &Config) {
    use nix::unistd::{Gid, Group, Uid, User};
    for (id, agent) in &cfg.agents {
        if let Some(uid) = agent.uid
            && matches!(User::from_uid(Uid::from_raw(uid)), Ok(None))
        {
            eprintln!(
                "keyturn: warning: agents.{id}.uid = {uid}: no user of this host has it; the agent's files are owned by that number, readable only by a process running as it (a container's user, say)"
            );
        }
        if let Some(gid) = agent.gid
            && matches!(Group::from_gid(Gid::from_raw(gid)), Ok(None))
        {
            eprintln!(
                "keyturn: warning: agents.{id}.gid = {gid}: no group of this host has it; the agent's files belong to that number"
            );
        }
    }
}

/// Warns of a postgres target's `admin_dsn_file` or `ssl_root_cert` that
/// does not exist: both are read at every step (so they may be put there
/// after the config), and until they are, every rotation of the
/// credential fails. Black-box finding: `check` said ok of a CA file that
/// did not exist, and the first rotation failed.
fn warn_missing_postgres_files(cfg: &Config) {
    for (agent, c) in cfg.credentials() {
        let crate::targets::TargetConfig::Postgres(p) = &c.target else {
            continue;
        };
        let files = [
            ("admin_dsn_file", Some(&p.admin_dsn_file)),
            ("ssl_root_cert", p.ssl_root_cert.as_ref()),
        ];
        for (key, path) in files {
            let Some(path) = path else { continue };
            if let Err(e) = std::fs::metadata(path) {
                eprintln!(
                    "keyturn: warning: agents.{}.credentials.{}.target.{key}: {}: {e}; every rotation of the credential fails until it is there",
                    agent.id,
                    c.key.credential,
                    path.display()
                );
            }
        }
    }
}

/// Warns of each agent whose policies grant task credentials of an issuer
/// that cannot end them early (an `aws_sts` issuer without
/// `revoke_with_deny_policy`) for longer than the agent's revocation SLA:
/// a decommission with such a task open waits for the credential to
/// expire, and breaches the SLA. Black-box finding: `check` said ok, and
/// every such decommission breached.
fn warn_task_credentials_outliving_sla(cfg: &Config) {
    let mut unending = std::collections::BTreeSet::new();
    for (name, issuer) in &cfg.issuers {
        if issuer.plugin().build().is_ok_and(|i| !i.ends_early()) {
            unending.insert(name.as_str());
        }
    }
    let mut said = std::collections::BTreeSet::new();
    for policy in cfg.policies.values() {
        for (level_name, level) in &policy.levels {
            for issuer in level.grants.keys() {
                if !unending.contains(issuer.as_str()) {
                    continue;
                }
                for agent in &policy.agents {
                    let id = crate::model::AgentId::new(agent).ok();
                    let Some(a) = id.and_then(|id| cfg.agents.get(&id)) else {
                        continue;
                    };
                    let sla = cfg.revocation_sla(a);
                    if level.max_ttl <= sla || !said.insert((agent.clone(), issuer.clone())) {
                        continue;
                    }
                    eprintln!(
                        "keyturn: warning: policies.{}.levels.{level_name} grants agent {agent} credentials of issuer {issuer} for up to {} (max_ttl), longer than its revocation SLA of {}, and that issuer cannot end them early: a decommission with such a task open waits for it to expire and breaches the SLA. Set revoke_with_deny_policy = true on issuers.{issuer}, or a max_ttl of at most the SLA",
                        policy.name,
                        humantime::format_duration(level.max_ttl),
                        humantime::format_duration(sla),
                    );
                }
            }
        }
    }
}

/// Warns of each token service signing credential whose agent state says
/// is decommissioned (its keys destroyed): a daemon with this config signs
/// nothing with it (black-box finding: `check` said ok while every
/// exchange failed with `server_error`).
fn warn_decommissioned_signers(cfg: &Config) {
    let Some(ts) = &cfg.token_service else {
        return;
    };
    let decommissioned: std::collections::BTreeSet<String> =
        offline::offline_decommissions(&cfg.daemon.state_dir)
            .into_iter()
            .map(|d| d.row.agent.to_string())
            .collect();
    let signers = std::iter::once((
        "token_service.signing_credential".to_owned(),
        &ts.signing_credential,
    ))
    .chain(
        ts.tenant_keys
            .iter()
            .map(|(t, k)| (format!("token_service.tenants.{t}.signing_credential"), k)),
    );
    for (at, key) in signers {
        if decommissioned.contains(key.agent.as_str()) {
            eprintln!(
                "keyturn: warning: {at} = \"{key}\": agent {} is decommissioned and its keys destroyed, so nothing is signed with it; name a credential of an active agent",
                key.agent
            );
        }
    }
}

/// An agent the config names as active whose decommission state
/// records: a decommission is for good, so taking its `decommissioned`
/// table out (or putting back an agent removed after its decommission)
/// does not bring it back. Black-box finding: `check` said ok, and the
/// agent silently stayed decommissioned.
fn warn_undone_decommissions(cfg: &Config) {
    let now = chrono::Utc::now();
    for d in offline::offline_decommissions(&cfg.daemon.state_dir) {
        let Some(agent) = cfg.agents.get(&d.row.agent) else {
            continue;
        };
        if agent
            .decommissioned
            .as_ref()
            .is_some_and(|x| x.in_effect(now))
        {
            continue;
        }
        eprintln!(
            "keyturn: warning: agent {} was decommissioned (decided {}): a decommission is for good, so it is never rotated or delivered again whatever the config says; give the agent another name to start it afresh",
            d.row.agent,
            d.row
                .decided_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
    }
}

/// A subject issuer's `jwks_file` that cannot be read now: the daemon
/// starts, but trusts no token of that issuer until the file is there
/// (it reads it again every `refresh`). Black-box finding: `check` said
/// nothing of a file that did not exist.
fn warn_unreadable_jwks_files(cfg: &Config) {
    for (name, issuer) in &cfg.subject_issuers {
        if let crate::oauth::config::JwksSource::File(path) = &issuer.jwks {
            let problem = match std::fs::metadata(path) {
                Ok(m) if m.is_file() => std::fs::File::open(path).err().map(|e| e.to_string()),
                Ok(_) => Some("not a regular file".to_owned()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(why) = problem {
                eprintln!(
                    "keyturn: warning: token_service.subject_issuers.{name}.jwks_file {}: {why}: no token of this issuer is accepted until it can be read",
                    path.display()
                );
            }
        }
    }
}

/// A webhook sink's `secret_file` the daemon cannot sign with (missing,
/// too short, readable by others): every delivery to it fails (black-box
/// finding: `check` and `check --online` said ok, and only the daemon's
/// preflight said why).
fn warn_unusable_webhook_keys(cfg: &Config) {
    let mut seen = std::collections::HashSet::new();
    for agent in cfg.agents.values() {
        for (id, cred) in &agent.credentials {
            for (i, sink) in cred.deliver.iter().enumerate() {
                let crate::sinks::SinkConfig::Webhook(w) = sink else {
                    continue;
                };
                let Some(path) = &w.secret_file else {
                    continue;
                };
                if !seen.insert(path.clone()) {
                    continue;
                }
                if let Err(e) = crate::sinks::webhook::read_key_file(path) {
                    eprintln!(
                        "keyturn: warning: agents.{}.credentials.{id}.deliver[{i}].secret_file: {}; every delivery to that webhook fails until it is fixed",
                        agent.id, e.message
                    );
                }
            }
        }
    }
}

/// The audit log is keyed (HMAC-chained) and this run has no audit key:
/// the start refuses that (black-box finding: `check` passed a config
/// whose `audit_key_file` had been taken out).
fn audit_key_missing(cfg: &Config) -> Option<String> {
    let d = &cfg.daemon;
    if d.audit_key_file.is_some() {
        // Loaded and checked against the log by the host checks.
        return None;
    }
    let seq = crate::audit::keyed_tail(&d.audit_log)?;
    if matches!(crate::audit::AuditKey::load(None), Ok(Some(_))) {
        return None;
    }
    Some(format!(
        "the audit log {} is keyed (hmac-sha256; record seq {seq}) but no audit key is given; {}",
        d.audit_log.display(),
        crate::audit::KEY_HINT
    ))
}

/// Warns of each file holding a secret the daemon logs in with (a vault
/// token, an AppRole secret id, an Azure client secret, a PostgreSQL admin
/// DSN) that every local user can read. Black-box finding: a 0644
/// `token_file` passed `check` silently, where key files must be 0600.
/// (Group-readable is left alone: a 0640 file of a group only the daemon's
/// user is in is a usual set-up.)
fn warn_world_readable_secret_files(cfg: &Config) {
    use crate::targets::TargetConfig;
    use crate::vaults::VaultSpec;
    use std::os::unix::fs::MetadataExt;
    let mut files: Vec<(String, &Path)> = Vec::new();
    for (name, v) in &cfg.vaults {
        match &v.spec {
            VaultSpec::Vault(h) => {
                if let Some(t) = &h.token_file {
                    files.push((format!("vaults.{name}.token_file"), t));
                }
                if let Some(a) = &h.approle {
                    files.push((
                        format!("vaults.{name}.approle.secret_id_file"),
                        &a.secret_id_file,
                    ));
                }
            }
            VaultSpec::AzureKeyVault(a) => {
                if let Some(f) = &a.client_secret_file {
                    files.push((format!("vaults.{name}.client_secret_file"), f));
                }
            }
            _ => {}
        }
    }
    for agent in cfg.agents.values() {
        for (id, cred) in &agent.credentials {
            if let TargetConfig::Postgres(p) = &cred.target {
                files.push((
                    format!("agents.{}.credentials.{id}.target.admin_dsn_file", agent.id),
                    &p.admin_dsn_file,
                ));
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (what, path) in files {
        if !seen.insert(path) {
            continue;
        }
        if let Ok(m) = std::fs::metadata(path)
            && m.mode() & 0o004 != 0
        {
            eprintln!(
                "keyturn: warning: {what} {}: every local user can read it (mode {:04o}), and it holds a secret keyturn logs in with; `chmod o-r` it (0600, or 0640 for a group only keyturn's user is in)",
                path.display(),
                m.mode() & 0o7777
            );
        }
    }
}

/// Why a request to the daemon gave no usable answer.
enum Failure {
    /// Already printed (the daemon's error, or the errors of an invalid
    /// config file when no daemon answered); exit with this code.
    Reported(u8),
    /// No daemon answered, and the config file is valid.
    Unreachable(ClientError),
}

/// Sends `req` to the daemon whose socket the config file at `path` names.
async fn request(
    client: &ClientConfig,
    path: &Path,
    req: &Request,
) -> Result<ResponseBody, Failure> {
    match request_daemon(client, req).await {
        Err(Failure::Unreachable(e)) => match client.unreachable_and_invalid(path, &e) {
            Some(code) => Err(Failure::Reported(code)),
            None => Err(Failure::Unreachable(e)),
        },
        other => other,
    }
}

/// [`request`], but an unreachable daemon is left to the caller even when
/// the config is invalid (`status` then shows the state stored).
async fn request_daemon(client: &ClientConfig, req: &Request) -> Result<ResponseBody, Failure> {
    match call(&client.paths().socket, req).await {
        Ok(Response::Ok(body)) => Ok(body),
        Ok(Response::Error(e)) => {
            eprintln!("keyturn: {}", e.message);
            Err(Failure::Reported(match e.kind {
                ApiErrorKind::Forbidden => EXIT_NOPERM,
                // Names nothing configured: as `decommission` of an unknown
                // agent (black-box finding: `rotate nobody` exited 1, as if
                // a rotation had failed).
                ApiErrorKind::NotFound
                    if matches!(req, Request::Decommission { .. } | Request::Rotate { .. }) =>
                {
                    EXIT_NO_AGENT
                }
                _ => EXIT_FAILED,
            }))
        }
        // The kernel refused the connect: a daemon may well be running, so
        // neither the config's errors nor the stored state are the answer.
        Err(e @ ClientError::PermissionDenied { .. }) => {
            eprintln!("keyturn: {e}");
            Err(Failure::Reported(EXIT_NOPERM))
        }
        Err(e) => {
            if matches!(e, ClientError::NotListening { .. }) {
                hint_held_state_dir(&client.paths());
            }
            Err(Failure::Unreachable(e))
        }
    }
}

/// No daemon listens on the socket the config names, yet one may be
/// running: it holds the config's state directory. Says so, since "is it
/// running?" would mislead.
fn hint_held_state_dir(paths: &ClientPaths) {
    if let Some(holder) = crate::state::lock::held(&paths.state_dir) {
        let pid = holder
            .pid
            .map(|p| format!(" (pid {p})"))
            .unwrap_or_default();
        eprintln!(
            "keyturn: a keyturn daemon{pid} is running on {} but does not listen on {}: \
             it is stopping (finishing the steps in flight) or just starting, \
             or it serves the socket it started with \
             (a changed daemon.socket takes effect when it restarts: `systemctl restart keyturn`)",
            paths.state_dir.display(),
            paths.socket.display()
        );
    }
}

/// [`request`] for commands that need the daemon: a failure is already
/// reported and becomes the exit code.
async fn ask(client: &ClientConfig, path: &Path, req: &Request) -> Result<ResponseBody, u8> {
    match request(client, path, req).await {
        Ok(body) => Ok(body),
        Err(Failure::Reported(code)) => Err(code),
        Err(Failure::Unreachable(e)) => {
            eprintln!("keyturn: {e}");
            Err(EXIT_UNAVAILABLE)
        }
    }
}

/// Prints `value` as pretty JSON.
fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

fn unexpected() -> u8 {
    eprintln!("keyturn: unexpected answer from the daemon (is it the same keyturn version?)");
    EXIT_FAILED
}

/// How `status` prints.
enum StatusView {
    Json,
    /// The full table, as wide as it needs.
    Wide,
    /// Fitted to the screen ([`screen`]).
    Fitted(screen::Screen),
}

async fn status(path: &Path, view: StatusView) -> u8 {
    let client = match load_for_client(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut online = true;
    // The exit code when all is shown: 64 when the daemon is down and the
    // config does not validate (the state is shown, but scripts must see
    // that the config needs fixing before the daemon can start).
    let mut code = 0;
    let state_dir = client.paths().state_dir;
    let rows = match request_daemon(&client, &Request::Status {}).await {
        Ok(ResponseBody::Status(rows)) => rows,
        Ok(_) => return unexpected(),
        Err(Failure::Reported(code)) => return code,
        Err(Failure::Unreachable(e)) => match offline::status_offline(&client, path, &e) {
            Ok((rows, offline_code)) => {
                online = false;
                // A daemon that runs but does not answer is no state to
                // exit 0 on (scripts must see it).
                code = if matches!(e, ClientError::AnswerTimeout { .. }) {
                    offline_code.max(EXIT_UNAVAILABLE)
                } else {
                    offline_code
                };
                rows
            }
            Err(code) => return code,
        },
    };
    // Every agent's tasks not ended, when the daemon answers (the task
    // store is the daemon's while it runs). Asked quietly: a daemon of an
    // older version does not know the command, and its credentials are
    // still worth showing.
    let tasks = if online {
        match call(&client.paths().socket, &Request::Tasks {}).await {
            Ok(Response::Ok(ResponseBody::Tasks(tasks))) => Some(tasks),
            _ => None,
        }
    } else {
        // The daemon is down: its live tasks' credentials may still work,
        // and it ends them when it is back.
        offline_tasks(&state_dir)
    };
    let now = chrono::Utc::now();
    // Decommissions and orphans, when the daemon answers; else the
    // decommissions stored (orphans need the daemon's view).
    let agents = if online {
        match request(&client, path, &Request::Agents {}).await {
            Ok(ResponseBody::Agents(agents)) => agents,
            _ => Vec::new(),
        }
    } else {
        crate::revocation::lifecycle_rows(&offline_decommissions(&state_dir), &[], now)
    };
    if let StatusView::Json = view {
        match render_status_json(&rows, tasks.as_deref(), &agents) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("keyturn: {e}");
                return EXIT_FAILED;
            }
        }
        return code;
    }
    match &view {
        StatusView::Fitted(s) => print!("{}", screen::render_status(&rows, now, s)),
        _ => print!("{}", render_status_table(&rows)),
    }
    if let Some(tasks) = tasks.filter(|t| !t.is_empty()) {
        println!();
        match &view {
            StatusView::Fitted(s) => print!("{}", screen::render_tasks(&tasks, now, s, false)),
            _ => print!(
                "{}",
                screen::render_tasks(
                    &tasks,
                    now,
                    &screen::Screen {
                        width: usize::MAX,
                        color: false
                    },
                    true
                )
            ),
        }
    }
    if !agents.is_empty() {
        println!();
        match &view {
            StatusView::Fitted(s) => print!("{}", screen::render_agents(&agents, s)),
            _ => print!("{}", render_agents_table(&agents)),
        }
    }
    code
}

async fn surface(path: &Path, unused_after: std::time::Duration, json: bool) -> u8 {
    let client = match load_for_client(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let req = Request::Surface {
        unused_after_seconds: Some(unused_after.as_secs()),
    };
    let surface = match ask(&client, path, &req).await {
        Ok(ResponseBody::Surface(s)) => s,
        Ok(_) => return unexpected(),
        Err(code) => return code,
    };
    if json {
        print_json(&surface);
    } else {
        print!("{}", crate::surface::render(&surface));
    }
    0
}

async fn decommission(
    path: &Path,
    agent: &str,
    reason: String,
    by: Option<String>,
    wait: bool,
    timeout: Option<std::time::Duration>,
    json: bool,
) -> u8 {
    let agent = match crate::model::AgentId::new(agent) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("keyturn: agent id {agent:?} {e}");
            return EXIT_USAGE;
        }
    };
    if let Some(problem) = crate::revocation::reason_problem(&reason, by.as_deref()) {
        eprintln!("keyturn: {problem}");
        return EXIT_USAGE;
    }
    let client = match load_for_client(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let req = Request::Decommission {
        agent: agent.clone(),
        reason,
        by,
    };
    let mut result = match request(&client, path, &req).await {
        Ok(ResponseBody::Decommission(r)) => *r,
        Ok(_) => return unexpected(),
        Err(Failure::Reported(code)) => return code,
        Err(Failure::Unreachable(e)) => {
            eprintln!("keyturn: {e}");
            // The daemon had the request and stopped (or hung) before
            // answering: whether the decision was recorded is in the
            // state it left, not in the missing answer.
            if matches!(
                e,
                ClientError::Closed { .. } | ClientError::AnswerTimeout { .. }
            ) {
                let stored = offline_decommissions(&client.paths().state_dir)
                    .into_iter()
                    .any(|d| d.row.agent == agent);
                if stored {
                    eprintln!("{}", recorded_while_down(&agent));
                } else {
                    eprintln!(
                        "keyturn: no decommission of {agent} is stored: the daemon stopped before recording it; ask again once it runs"
                    );
                }
            }
            return EXIT_UNAVAILABLE;
        }
    };
    if result.already && !json {
        if result.agent.state == "decommissioned" {
            println!("{agent}: already decommissioned; nothing new decided");
        } else {
            println!(
                "{agent}: a decommission was already decided (it is {}); nothing new decided",
                result.agent.state
            );
        }
    }
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut timed_out = false;
    while wait && result.agent.state != "decommissioned" {
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            timed_out = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        match request(&client, path, &Request::Agents {}).await {
            Ok(ResponseBody::Agents(rows)) => match rows.into_iter().find(|r| r.agent == agent) {
                Some(row) => result.agent = row,
                None => return unexpected(),
            },
            Ok(_) => return unexpected(),
            Err(Failure::Reported(code)) => return code,
            Err(Failure::Unreachable(_)) => {
                // The decision is recorded: say so, not only that the
                // daemon is gone. Black-box finding: its "no daemon is
                // listening (is --config pointing at its config?)" came
                // first, as if the request had gone to the wrong place.
                eprintln!("keyturn: the daemon stopped while the revocation was awaited");
                eprintln!("{}", recorded_while_down(&agent));
                return EXIT_UNAVAILABLE;
            }
        }
    }
    if json {
        print_json(&result);
    } else {
        print!(
            "{}",
            render_agents_table(std::slice::from_ref(&result.agent))
        );
    }
    if timed_out {
        eprintln!(
            "keyturn: {agent} is still {} after {} ({} of {} item(s) verified); its revocation goes on (`keyturn status` shows it)",
            result.agent.state,
            humantime::format_duration(timeout.unwrap_or_default()),
            result.agent.verified,
            result.agent.items
        );
        return EXIT_TEMPFAIL;
    }
    0
}

/// What `decommission` says when the daemon stopped after recording the
/// decision for `agent`.
fn recorded_while_down(agent: &crate::model::AgentId) -> String {
    format!(
        "keyturn: the decommission of {agent} was decided and recorded; its revocation resumes when the daemon runs again (`keyturn status` shows it)"
    )
}

async fn rotate(path: &Path, selector: &str, wait: bool, json: bool) -> u8 {
    let selector = match parse_selector(selector) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keyturn: {e}");
            return EXIT_USAGE;
        }
    };
    let client = match load_for_client(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let req = Request::Rotate { selector, wait };
    let results = match ask(&client, path, &req).await {
        Ok(ResponseBody::Rotate(results)) => results,
        Ok(_) => return unexpected(),
        Err(code) => return code,
    };
    if json {
        print_json(&results);
    } else {
        for r in &results {
            let outcome = match r.outcome {
                RotateOutcome::Started => "started",
                RotateOutcome::Joined => "already rotating; joined the rotation in flight",
                RotateOutcome::Completed => "rotated",
                RotateOutcome::Failed => "FAILED",
                RotateOutcome::Skipped => "skipped",
            };
            let version = match (r.outcome, r.version) {
                (RotateOutcome::Joined, Some(v)) => format!(" (it makes version {v})"),
                (RotateOutcome::Failed, Some(v)) => format!(" (version {v})"),
                (_, Some(v)) => format!(" to version {v}"),
                (_, None) => String::new(),
            };
            let error = r
                .error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            let note = r
                .note
                .as_deref()
                .map(|n| format!("; {n}"))
                .unwrap_or_default();
            println!(
                "{}/{}: {outcome}{version}{error}{note}",
                r.agent, r.credential
            );
        }
    }
    if results.iter().any(|r| r.outcome == RotateOutcome::Failed) {
        EXIT_FAILED
    } else {
        0
    }
}
