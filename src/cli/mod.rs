//! The `keyturn` commands. Each returns an exit code:
//! 0 success, 1 the operation failed, 64 bad config or usage (EX_USAGE),
//! 69 the daemon is not reachable, or `check --online` found a vault or
//! target it cannot use (EX_UNAVAILABLE), 77 the user may not use the
//! control socket (EX_NOPERM).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use clap_complete::engine::ArgValueCompleter;

use crate::api::client::{ClientError, call};
use crate::api::protocol::{
    ApiErrorKind, Request, Response, ResponseBody, RotateOutcome, StatusRow, parse_selector,
};
use crate::audit::{AuditKey, VerifyReport, verify_file_keyed};
use crate::config::{self, ClientPaths, Config, ConfigErrors, DEFAULT_CONFIG_PATH};
use crate::state::{SqliteStore, StateStore};
use crate::telemetry::{self, LogFormat};
use tables::{render_agents_table, render_status_table};

mod agent;
mod completions;
mod manpages;
mod online;
pub mod screen;
mod tables;

pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 64;
pub const EXIT_UNAVAILABLE: u8 = 69;
pub const EXIT_NOPERM: u8 = 77;
/// `decommission` of an agent neither the config nor state knows (EX_NOUSER).
pub const EXIT_NO_AGENT: u8 = 67;

#[derive(Debug, Parser)]
#[command(
    name = "keyturn",
    // The package version and the git revision it was built from (build.rs).
    version = env!("KEYTURN_VERSION"),
    about = "Rotates, stores, delivers and revokes the credentials of software agents"
)]
pub struct Cli {
    /// Config file.
    #[arg(long, short = 'c', global = true, env = "KEYTURN_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Log format: human (default) or json.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Log filter (tracing syntax, e.g. `info` or `keyturn=debug`); `KEYTURN_LOG` overrides.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the config; exit 0 with a summary, or 64 with every error.
    Check {
        /// Then log in to every vault and every credential's target and use
        /// each once, changing nothing; one line per item; exit 69 if any
        /// fails.
        #[arg(long)]
        online: bool,
        /// How long each online check may take.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s", requires = "online")]
        timeout: std::time::Duration,
    },
    /// Run the daemon (systemd: Type=notify).
    Daemon,
    /// Show every credential: version, stage, last rotated, next due, state, last error.
    /// Fits 80 columns (`--wide`: every field in full); colours on a
    /// terminal unless NO_COLOR is set.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Every field in full (absolute times, whole errors), however wide.
        #[arg(long, conflicts_with = "json")]
        wide: bool,
        /// Colour the table: auto (stdout a terminal, NO_COLOR unset or
        /// empty), always or never.
        #[arg(long, value_enum, default_value_t = screen::ColorChoice::Auto)]
        color: screen::ColorChoice,
    },
    /// Rotate now: `AGENT`, `AGENT/CREDENTIAL` or `all`.
    Rotate {
        #[arg(add = ArgValueCompleter::new(completions::selectors))]
        selector: String,
        /// Wait until the rotation has delivered (or failed); exit 1 if it failed.
        #[arg(long)]
        wait: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Retire AGENT for good: stop its rotations and revoke everything it
    /// holds (every version at every vault, the target, delivered files,
    /// awaited acks) within its tier's revocation SLA. Harmless twice.
    Decommission {
        #[arg(add = ArgValueCompleter::new(completions::agents))]
        agent: String,
        /// Why (goes to the audit log).
        #[arg(long)]
        reason: String,
        /// The human who decided (goes to the audit log).
        #[arg(long)]
        by: Option<String>,
        /// Wait until every item is revoked and verified; exit 1 if the
        /// daemon stops first.
        #[arg(long)]
        wait: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The identity surface: every agent with its state and credentials,
    /// totals, and flags (unused, past max_age, no owner, decommissions in
    /// progress, orphaned).
    Surface {
        /// Flag agents with no use observed for this long.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30d")]
        unused_after: std::time::Duration,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run COMMAND and signal or restart it on each new version of a file.
    Watch(WatchArgs),
    /// Acknowledge that this consumer has version VERSION of
    /// AGENT/CREDENTIAL (its previous version may then be retired). Sent to
    /// the agents' socket; allowed for root, the daemon's user and the
    /// agent's configured `uid`.
    Ack {
        /// AGENT/CREDENTIAL.
        #[arg(add = ArgValueCompleter::new(completions::credentials))]
        credential: String,
        version: u64,
        /// The agents' socket (default: `daemon.agent_socket` of the config
        /// if it can be read, else /run/keyturn/agent.sock).
        #[arg(long, env = "KEYTURN_AGENT_SOCKET")]
        socket: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Task-scoped credentials: start a task (its credentials issued for
    /// it alone), end it (revoked at once), list yours. Talks to the agents'
    /// socket as the calling uid's agent; root and the control socket's
    /// group name one with `--as`; an agent whose uid means nothing (in a
    /// container) signs an assertion with its own key: `--key --agent`.
    Task {
        #[command(subcommand)]
        command: TaskCommand,
        /// The socket (default: `daemon.agent_socket` of the config if it
        /// can be read, else /run/keyturn/agent.sock).
        #[arg(long, env = "KEYTURN_AGENT_SOCKET", global = true)]
        socket: Option<PathBuf>,
        /// Act for this agent (root and the control socket's group; audited).
        #[arg(long = "as", value_name = "AGENT", global = true, add = ArgValueCompleter::new(completions::agents))]
        as_agent: Option<String>,
        /// Authenticate as `--agent` with a JWT assertion signed by this
        /// Ed25519 private key (PKCS#8 PEM: the file keyturn delivers for
        /// the agent's `auth_key` credential).
        #[arg(
            long,
            value_name = "PATH",
            global = true,
            requires = "agent",
            conflicts_with = "as_agent"
        )]
        key: Option<PathBuf>,
        /// The agent the `--key` belongs to.
        #[arg(long, value_name = "AGENT", global = true, requires = "key", add = ArgValueCompleter::new(completions::agents))]
        agent: Option<String>,
        /// The assertion's `aud` (default: the config's
        /// `daemon.assertion_audience` if it can be read, else keyturn).
        #[arg(long, value_name = "AUD", global = true, requires = "key")]
        audience: Option<String>,
    },
    /// OAuth token service: `exchange` a human's access token for one
    /// scoped to the calling uid's agent (RFC 8693), over the agents'
    /// socket: the peer's uid authenticates the agent.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Audit log commands.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Print the shell completion script for SHELL. It completes commands,
    /// options and the agent ids of the config (it asks `keyturn` at each
    /// TAB). Bash: `keyturn completions bash > /etc/bash_completion.d/keyturn`,
    /// or `source <(keyturn completions bash)` in ~/.bashrc.
    Completions {
        #[arg(value_enum)]
        shell: completions::Shell,
    },
    /// Write the man pages (keyturn.1 and one keyturn-COMMAND.1 per
    /// command) into DIR; packaging/build.sh runs it. Hidden: not for
    /// operators, who get the pages from the package.
    #[command(hide = true)]
    Manpages {
        /// Created if missing; existing pages are overwritten.
        dir: PathBuf,
    },
}

/// `keyturn watch --file PATH [--signal SIG | --restart] [--drain 10s] -- COMMAND...`
#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// A delivered file to watch (repeat for several); its directory is watched.
    #[arg(long = "file", required = true, value_name = "PATH")]
    pub files: Vec<PathBuf>,
    /// Signal the command's process group on a change (default SIGHUP).
    #[arg(long, value_name = "SIG", value_parser = crate::watch::parse_signal, conflicts_with = "restart")]
    pub signal: Option<nix::sys::signal::Signal>,
    /// Restart the command on a change: SIGTERM, wait up to --drain, SIGKILL, start again.
    #[arg(long)]
    pub restart: bool,
    /// How long a restart waits for the command to exit before SIGKILL.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub drain: std::time::Duration,
    /// A burst of changes closer together than this makes one action.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "250ms")]
    pub debounce: std::time::Duration,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<std::ffi::OsString>,
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Start a task: prints its id and where its credentials are (or, with
    /// no task directory configured, the credentials as JSON).
    Start {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        use_case: String,
        #[arg(long)]
        run_id: String,
        /// The human (or system) who started the run.
        #[arg(long)]
        initiator: String,
        /// The sensitivity level of the policy (e.g. low, high).
        #[arg(long)]
        sensitivity: String,
        /// e.g. 15m (default: the policy's default_ttl).
        #[arg(long)]
        ttl: Option<String>,
    },
    /// End a task now: its credentials are revoked.
    End { task: String },
    /// Your live tasks and the last ended ones.
    List,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Exchange the human's access token (the subject token) for an access
    /// token of the calling uid's agent acting for that human; prints the
    /// RFC 8693 answer as JSON on stdout (the token goes nowhere else).
    Exchange(ExchangeArgs),
}

/// What `keyturn token exchange` sends, as given.
#[derive(Debug, clap::Args)]
pub struct ExchangeArgs {
    /// The subject token: a file holding it, or `-` for stdin.
    #[arg(long, value_name = "PATH")]
    subject_token_file: PathBuf,
    /// Its RFC 8693 type.
    #[arg(long, value_name = "URI", default_value = crate::oauth::exchange::TOKEN_TYPE_ACCESS_TOKEN)]
    subject_token_type: String,
    /// The agent's own `private_key_jwt` assertion, as a file (optional:
    /// the calling uid is the actor; if given, the token never outlives it
    /// and it is single-use).
    #[arg(long, value_name = "PATH")]
    actor_token_file: Option<PathBuf>,
    /// The scopes wanted, space-delimited (default: all that the human
    /// and the agent both have).
    #[arg(long)]
    scope: Option<String>,
    /// Where the token will be used (repeat for several).
    #[arg(long, value_name = "AUD")]
    audience: Vec<String>,
    /// A resource URI the token is for (repeat for several).
    #[arg(long, value_name = "URI")]
    resource: Vec<String>,
    /// One of the agent's live tasks: the token carries its attribution
    /// and ends with it.
    #[arg(long, value_name = "ID")]
    task: Option<String>,
    /// Act for this agent (root and the control socket's group; audited).
    #[arg(long = "as", value_name = "AGENT", add = ArgValueCompleter::new(completions::agents))]
    as_agent: Option<String>,
    /// The socket (default: `daemon.agent_socket` of the config if it
    /// can be read, else /run/keyturn/agent.sock).
    #[arg(long, env = "KEYTURN_AGENT_SOCKET")]
    socket: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain; name the first bad record.
    Verify,
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    // A TAB in a shell with `keyturn completions` loaded: answer and exit.
    completions::answer_if_asked();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Daemon | Command::Watch(_)) {
        end_quietly_on_a_closed_pipe();
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
    let code = runtime.block_on(run(cli));
    // Blocking tasks (SQLite, file writes) are bounded; do not wait forever on them.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    ExitCode::from(code)
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

async fn run(cli: Cli) -> u8 {
    match cli.command {
        Command::Check { online, timeout } => check(&cli.config, online, timeout).await,
        Command::Daemon => match crate::daemon::run(&cli.config).await {
            Ok(()) => 0,
            Err(crate::daemon::DaemonError::Config(errors)) => {
                eprint!("{errors}");
                eprintln!(
                    "keyturn: {} error(s) in {}; not starting",
                    errors.0.len(),
                    cli.config.display()
                );
                EXIT_USAGE
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("keyturn: {e}");
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
            json,
        } => decommission(&cli.config, &agent, reason, by, wait, json).await,
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
        // Answered in `main`, before logging and the runtime start.
        Command::Completions { .. } => 0,
        Command::Manpages { dir } => manpages::write(&dir),
    }
}

fn load(path: &Path) -> Result<Config, u8> {
    config::load_file(path).map_err(|errors| {
        eprint!("{errors}");
        eprintln!("keyturn: {} error(s) in {}", errors.0.len(), path.display());
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
            path.display()
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
            eprintln!("keyturn: {} error(s) in {}", errors.0.len(), path.display());
            Err(EXIT_USAGE)
        }
    }
}

async fn check(path: &Path, online: bool, timeout: std::time::Duration) -> u8 {
    let cfg = match load(path) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    println!("{}", config::summary(&cfg));
    warn_stranded_tasks(&cfg).await;
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
    match call(&client.paths().socket, req).await {
        Ok(Response::Ok(body)) => Ok(body),
        Ok(Response::Error(e)) => {
            eprintln!("keyturn: {}", e.message);
            Err(Failure::Reported(match e.kind {
                ApiErrorKind::Forbidden => EXIT_NOPERM,
                ApiErrorKind::NotFound if matches!(req, Request::Decommission { .. }) => {
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
        Err(e) => match client.unreachable_and_invalid(path, &e) {
            Some(code) => Err(Failure::Reported(code)),
            None => Err(Failure::Unreachable(e)),
        },
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
    let rows = match request(&client, path, &Request::Status {}).await {
        Ok(ResponseBody::Status(rows)) => rows,
        Ok(_) => return unexpected(),
        Err(Failure::Reported(code)) => return code,
        Err(Failure::Unreachable(e)) => {
            let ClientConfig::Valid(cfg) = &client else {
                unreachable!("with an invalid config, an unreachable daemon is Reported");
            };
            match offline_status(cfg) {
                Some(rows) => {
                    eprintln!(
                        "keyturn: {e}; showing the state stored in {}",
                        cfg.daemon.state_dir.display()
                    );
                    online = false;
                    rows
                }
                None => {
                    eprintln!("keyturn: {e}");
                    return EXIT_UNAVAILABLE;
                }
            }
        }
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
    } else if let ClientConfig::Valid(cfg) = &client {
        // The daemon is down: its live tasks' credentials may still work,
        // and it ends them when it is back.
        offline_tasks(cfg)
    } else {
        None
    };
    if let StatusView::Json = view {
        /// `status --json`: every credential, and every task not ended
        /// (`null` when they could not be read).
        #[derive(serde::Serialize)]
        struct StatusJson<'a> {
            credentials: &'a [StatusRow],
            tasks: Option<&'a [crate::api::protocol::TaskView]>,
        }
        let doc = StatusJson {
            credentials: &rows,
            tasks: tasks.as_deref(),
        };
        match serde_json::to_string_pretty(&doc) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("keyturn: {e}");
                return EXIT_FAILED;
            }
        }
        return 0;
    }
    let now = chrono::Utc::now();
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
    // Decommissions and orphans, when the daemon answers; else the
    // decommissions stored (orphans need the daemon's view).
    let agents = if online {
        match request(&client, path, &Request::Agents {}).await {
            Ok(ResponseBody::Agents(agents)) => agents,
            _ => Vec::new(),
        }
    } else if let ClientConfig::Valid(cfg) = &client {
        crate::revocation::lifecycle_rows(&offline_decommissions(cfg), &[], now)
    } else {
        Vec::new()
    };
    if !agents.is_empty() {
        println!();
        match &view {
            StatusView::Fitted(s) => print!("{}", screen::render_agents(&agents, s)),
            _ => print!("{}", render_agents_table(&agents)),
        }
    }
    0
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
    json: bool,
) -> u8 {
    let agent = match crate::model::AgentId::new(agent) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("keyturn: agent id {agent:?} {e}");
            return EXIT_USAGE;
        }
    };
    if reason.trim().is_empty() {
        eprintln!(
            "keyturn: a decommission needs a reason (--reason TEXT): it goes to the audit log"
        );
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
    let mut result = match ask(&client, path, &req).await {
        Ok(ResponseBody::Decommission(r)) => *r,
        Ok(_) => return unexpected(),
        Err(code) => return code,
    };
    if result.already && !json {
        println!("{agent}: already decommissioned; nothing new decided");
    }
    while wait && result.agent.state != "decommissioned" {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        match request(&client, path, &Request::Agents {}).await {
            Ok(ResponseBody::Agents(rows)) => match rows.into_iter().find(|r| r.agent == agent) {
                Some(row) => result.agent = row,
                None => return unexpected(),
            },
            Ok(_) => return unexpected(),
            Err(Failure::Reported(code)) => return code,
            Err(Failure::Unreachable(e)) => {
                // The decision is recorded: say so, not only that the
                // daemon is gone.
                eprintln!("keyturn: {e}");
                eprintln!(
                    "keyturn: the decommission of {agent} was decided and recorded; its revocation resumes when the daemon runs again (`keyturn status` shows it)"
                );
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
    0
}

/// The tasks not ended, from the task store, when the daemon is not running.
fn offline_tasks(cfg: &Config) -> Option<Vec<crate::api::protocol::TaskView>> {
    let dir = cfg.daemon.state_dir.join("tasks");
    match crate::tasks::store::TaskStore::open_read_only(&dir) {
        Ok(Some(store)) => match store.list(None, 0) {
            Ok(rows) => Some(
                rows.iter()
                    .map(crate::api::protocol::TaskView::of)
                    .collect(),
            ),
            Err(e) => {
                eprintln!("keyturn: {e}");
                None
            }
        },
        Ok(None) => Some(Vec::new()),
        Err(e) => {
            eprintln!("keyturn: {e}");
            None
        }
    }
}

/// The decommissions stored in the state database, with their items, when
/// the daemon is not running (none when it cannot be read).
fn offline_decommissions(cfg: &Config) -> Vec<crate::revocation::Decom> {
    let db = crate::daemon::state_db_path(cfg);
    let Some(store) = db
        .exists()
        .then(|| SqliteStore::open_read_only(&db).ok())
        .flatten()
    else {
        return Vec::new();
    };
    stored_decommissions(&store)
}

/// Every decommission `store` holds, with its items.
fn stored_decommissions(store: &SqliteStore) -> Vec<crate::revocation::Decom> {
    store
        .decommissions()
        .unwrap_or_default()
        .into_iter()
        .map(|row| {
            let items = store.revocations(&row.agent).unwrap_or_default();
            crate::revocation::Decom { row, items }
        })
        .collect()
}

/// Status from the state database when the daemon is not running.
fn offline_status(cfg: &Config) -> Option<Vec<StatusRow>> {
    let db = crate::daemon::state_db_path(cfg);
    if !db.exists() {
        return None;
    }
    let store = SqliteStore::open_read_only(&db).ok()?;
    let snapshot = store.snapshot().ok()?;
    let decoms = stored_decommissions(&store);
    // An agent decommissioned (or being so) is not rotated any more.
    let leaving: std::collections::HashMap<&crate::model::AgentId, &'static str> = decoms
        .iter()
        .map(|d| {
            let label = if d.complete() {
                "decommissioned"
            } else {
                "decommissioning"
            };
            (&d.row.agent, label)
        })
        .collect();
    let now = chrono::Utc::now();
    let mut rows: Vec<StatusRow> = cfg
        .credentials()
        .map(|(_, c)| {
            let row = snapshot.credentials.iter().find(|r| r.key == c.key);
            // A decommissioned agent's rotations are over, whatever step
            // they stopped at.
            let unfinished = snapshot
                .unfinished
                .iter()
                .find(|r| r.key == c.key)
                .filter(|_| !leaving.contains_key(&c.key.agent))
                // Waiting to retire after a first version: nothing to
                // retire, nothing to show.
                .filter(|r| {
                    r.step != crate::rotation::Step::Retire || r.previous_version.is_some()
                });
            let (awaiting_ack, holdouts) = offline_acks(&snapshot, &c.key, now);
            // A `keyturn rotate` waiting for the current version's acks:
            // the daemon shows it as a rotation at its first step (and
            // resumes it so after a start), not as the retirement it waits
            // on.
            let requested = c.follow.is_none()
                && !leaving.contains_key(&c.key.agent)
                && snapshot.requests.iter().any(|q| q.key == c.key);
            // A followed credential whose rotator destroyed it: the version
            // it delivered last is recorded retired (see `rotation::follow`).
            let revoked = c.follow.is_some()
                && row.and_then(|r| r.current_version).is_some_and(|cv| {
                    store.versions(&c.key).is_ok_and(|vs| {
                        vs.iter()
                            .any(|v| v.version == cv && v.stage == crate::model::Stage::Retired)
                    })
                });
            StatusRow {
                agent: c.key.agent.clone(),
                credential: c.key.credential.clone(),
                vault: c.vault_label(),
                version: row.and_then(|r| r.current_version),
                stage: row.and_then(|r| r.current_version).map(|_| {
                    if revoked {
                        crate::api::protocol::ShownStage::Revoked
                    } else {
                        crate::api::protocol::ShownStage::Current
                    }
                }),
                last_rotated: row.and_then(|r| r.last_rotated_at),
                next_due: offline_next_due(c, row, unfinished)
                    .filter(|_| !leaving.contains_key(&c.key.agent)),
                state: match unfinished {
                    _ if let Some(label) = leaving.get(&c.key.agent) => (*label).into(),
                    _ if requested => "rotating".into(),
                    // Parked after a failed attempt, as the daemon shows it.
                    Some(r) if r.last_error.is_some() => "failed".into(),
                    Some(r) if r.step == crate::rotation::Step::Retire => "retiring".into(),
                    Some(_) => "interrupted".into(),
                    None if row.is_some_and(|r| r.consecutive_failures > 0) => "failed".into(),
                    None if revoked => "revoked".into(),
                    None => "stopped".into(),
                },
                step: if requested {
                    Some(crate::rotation::Step::Create.to_string())
                } else {
                    unfinished.map(|r| r.step.to_string())
                },
                // The requested rotation has no id until it begins.
                rotation: unfinished.filter(|_| !requested).map(|r| r.id.to_string()),
                last_error: unfinished
                    .and_then(|r| r.last_error.clone())
                    .or_else(|| row.and_then(|r| r.last_error.clone())),
                awaiting_ack,
                holdouts,
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.agent, &a.credential).cmp(&(&b.agent, &b.credential)));
    crate::revocation::show_revoked(&mut rows, |agent| {
        decoms.iter().find(|d| d.row.agent == *agent)
    });
    Some(rows)
}

/// The consumers of `key`'s current version not heard from, offline, as
/// the daemon shows them: awaited while the previous version still waits to
/// be retired and its grace deadline is ahead; holdouts once that deadline
/// has passed or the previous version was retired without their ack.
/// (Only their names: how each acknowledges is the sink's, not in state.)
fn offline_acks(
    snapshot: &crate::state::Snapshot,
    key: &crate::model::CredentialKey,
    now: chrono::DateTime<chrono::Utc>,
) -> (Vec<String>, Vec<String>) {
    let pending: Vec<&crate::state::AckRow> = snapshot
        .acks
        .iter()
        .filter(|a| a.key == *key && a.acked_at.is_none())
        .collect();
    let waiting = |a: &crate::state::AckRow| {
        snapshot.unfinished.iter().any(|r| {
            r.key == *key
                && r.step == crate::rotation::Step::Retire
                && r.version == a.version
                && r.retire_at.is_some_and(|deadline| deadline > now)
        })
    };
    // A first version retires nothing: its consumers are never holdouts.
    let (awaited, holdouts): (Vec<_>, Vec<_>) = pending
        .into_iter()
        .partition(|a| a.version == 1 || waiting(a));
    let names =
        |rows: Vec<&crate::state::AckRow>| rows.into_iter().map(|a| a.consumer.clone()).collect();
    (names(awaited), names(holdouts))
}

/// When `c` is next due, offline: from the config as the daemon computes
/// it at start (a reload may have changed the schedule since the stored
/// time was written). A failed or unfinished rotation keeps the stored
/// time (its retry); a followed credential has none.
fn offline_next_due(
    c: &crate::config::CredentialConfig,
    row: Option<&crate::state::CredentialRow>,
    unfinished: Option<&crate::state::RotationRow>,
) -> Option<chrono::DateTime<chrono::Utc>> {
    if c.follow.is_some() {
        return None;
    }
    let row = row?;
    let settled = unfinished.is_none_or(|r| r.step == crate::rotation::Step::Retire)
        && row.consecutive_failures == 0;
    match (row.last_rotated_at, row.current_version) {
        (Some(last), Some(version)) if settled => {
            // The first version is number 1 (as the scheduler has it).
            let offset = crate::schedule::jitter_offset(&c.key, c.jitter);
            c.schedule.next_due(last, offset, version == 1)
        }
        _ => row.next_due,
    }
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
                RotateOutcome::Completed => "rotated",
                RotateOutcome::Failed => "FAILED",
                RotateOutcome::Skipped => "skipped",
            };
            let version = r
                .version
                .map(|v| format!(" to version {v}"))
                .unwrap_or_default();
            let error = r
                .error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            println!("{}/{}: {outcome}{version}{error}", r.agent, r.credential);
        }
    }
    if results.iter().any(|r| r.outcome == RotateOutcome::Failed) {
        EXIT_FAILED
    } else {
        0
    }
}

fn audit_verify(path: &Path) -> u8 {
    let paths = match load_for_client(path) {
        Ok(c) => c.paths(),
        Err(code) => return code,
    };
    let db = crate::daemon::state_db_in(&paths.state_dir);
    let head = if db.exists() {
        match SqliteStore::open_read_only(&db).and_then(|s| s.audit_head()) {
            Ok(h) => h,
            Err(e) => {
                eprintln!("keyturn: {e}");
                return EXIT_FAILED;
            }
        }
    } else {
        None
    };
    let key = match AuditKey::load(paths.audit_key_file.as_deref()) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("keyturn: cannot load the audit key: {e}");
            return EXIT_FAILED;
        }
    };
    match verify_file_keyed(&paths.audit_log, head.as_ref(), key.as_ref()) {
        // Records the state database knows nothing of: the chain is intact,
        // but a cut tail is a valid shorter chain, so that is not a pass.
        Ok(report) if head.is_none() && report.records > 0 => {
            let why = if db.exists() {
                format!("the state database {} records no audit head", db.display())
            } else {
                format!("there is no state database at {}", db.display())
            };
            eprintln!(
                "keyturn: {}: {} records, chain intact, but the tail was NOT checked: {why}; \
                 records cut off the end cannot be detected without the head it keeps{}",
                paths.audit_log.display(),
                report.records,
                keying(&report)
            );
            EXIT_FAILED
        }
        Ok(report) => {
            let stored = head.as_ref().map_or(0, |h| h.seq);
            let after = report
                .head
                .as_ref()
                .map_or(0, |h| h.seq.saturating_sub(stored));
            let tail = match (&head, after) {
                (None, _) => String::new(),
                (Some(_), 0) => ", tail checked against the state database".to_owned(),
                (Some(_), n) => format!(
                    ", tail checked against the state database; the last {n} record(s) come after \
                     the head it stored (seq {stored}): written while or just before the daemon \
                     stopped, or appended by someone else (the daemon records `audit.unconfirmed` \
                     for them at its next start)"
                ),
            };
            println!(
                "{}: ok, {} records, chain intact{tail}{}",
                paths.audit_log.display(),
                report.records,
                keying(&report)
            );
            0
        }
        Err(e) => {
            eprintln!("keyturn: {e}");
            EXIT_FAILED
        }
    }
}

/// Whether the chain was checked with the audit key, for the report.
fn keying(report: &VerifyReport) -> String {
    match report.keyed_from {
        None if report.records == 0 => String::new(),
        Some(seq) => format!("; keyed (hmac-sha256) from seq {seq}, checked with the audit key"),
        None => "; plain sha-256, not keyed (no audit key: not proof against whoever can write both the log and the state database)".into(),
    }
}
