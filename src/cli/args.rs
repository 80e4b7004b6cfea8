//! The command line: every command, its arguments and their help.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use clap_complete::engine::ArgValueCompleter;

use super::{completions, screen};
use crate::config::DEFAULT_CONFIG_PATH;
use crate::telemetry::LogFormat;

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
    #[arg(long, global = true, default_value = "info", value_parser = parse_log_filter)]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the config; exit 0 with a summary, 64 with every error, or 1
    /// when this host would stop the daemon's start (too little free space).
    Check {
        /// Then log in to every vault and every credential's target and use
        /// each once, changing nothing; one line per item; exit 69 if any
        /// fails.
        #[arg(long)]
        online: bool,
        /// How long each online check may take.
        #[arg(long, value_parser = more_than_zero, default_value = "5s", requires = "online")]
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
        /// Wait until every item is revoked and verified; exit 69 if the
        /// daemon stops first (the decision is recorded: the revocation
        /// resumes when it runs again).
        #[arg(long)]
        wait: bool,
        /// With --wait: stop waiting after this long (e.g. `5m`) and exit 75,
        /// naming what is still pending (the revocation goes on).
        #[arg(long, requires = "wait", value_parser = parse_wait_timeout)]
        timeout: Option<std::time::Duration>,
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
    /// options, and the agent ids and AGENT/CREDENTIALs of the config (it
    /// asks `keyturn` at each TAB). Bash: `keyturn completions bash >
    /// /usr/share/bash-completion/completions/keyturn` (where the package
    /// puts it), or `source <(keyturn completions bash)` in ~/.bashrc.
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
    pub(super) subject_token_file: PathBuf,
    /// Its RFC 8693 type.
    #[arg(long, value_name = "URI", default_value = crate::oauth::exchange::TOKEN_TYPE_ACCESS_TOKEN)]
    pub(super) subject_token_type: String,
    /// The agent's own `private_key_jwt` assertion, as a file (optional:
    /// the calling uid is the actor; if given, the token never outlives it
    /// and it is single-use).
    #[arg(long, value_name = "PATH")]
    pub(super) actor_token_file: Option<PathBuf>,
    /// The scopes wanted, space-delimited (default: all that the human
    /// and the agent both have).
    #[arg(long)]
    pub(super) scope: Option<String>,
    /// Where the token will be used (repeat for several).
    #[arg(long, value_name = "AUD")]
    pub(super) audience: Vec<String>,
    /// A resource URI the token is for (repeat for several).
    #[arg(long, value_name = "URI")]
    pub(super) resource: Vec<String>,
    /// One of the agent's live tasks: the token carries its attribution
    /// and ends with it.
    #[arg(long, value_name = "ID")]
    pub(super) task: Option<String>,
    /// Act for this agent (root and the control socket's group; audited).
    #[arg(long = "as", value_name = "AGENT", add = ArgValueCompleter::new(completions::agents))]
    pub(super) as_agent: Option<String>,
    /// The socket (default: `daemon.agent_socket` of the config if it
    /// can be read, else /run/keyturn/agent.sock).
    #[arg(long, env = "KEYTURN_AGENT_SOCKET")]
    pub(super) socket: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain; name every bad record (the first 100, the rest counted).
    Verify,
    /// Move the audit log aside and start a new one whose first record
    /// (`audit.archived`) carries on its chain. The daemon must be stopped.
    /// A log that does not verify (or is gone) is archived only with
    /// `--broken`: the new log then links to the last record the state
    /// database vouches for, and records what was wrong.
    Archive {
        /// Where the old log goes (default: the log's path with the UTC
        /// time appended, e.g. audit.log.20261208T010203Z). Never over an
        /// existing file.
        #[arg(long, value_name = "PATH")]
        to: Option<PathBuf>,
        /// Archive a log that does not verify, or start a new log where
        /// it is missing (see the runbook KeyturnAuditChainBroken).
        #[arg(long)]
        broken: bool,
    },
}

/// A duration that is more than zero (`check --online --timeout 0s` would
/// only fail every item).
fn more_than_zero(s: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be more than zero, e.g. 5s".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// A `decommission --wait --timeout`: a duration above zero (a zero wait
/// would stop before the first look).
fn parse_wait_timeout(s: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => {
            Err("must be above zero (leave --timeout out to wait until done)".into())
        }
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// A `--log-level` that is a valid tracing filter (a typo used to be
/// warned about and replaced by `info`, easy to miss in a unit's journal).
fn parse_log_filter(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(s)
        .map(|_| s.to_owned())
        .map_err(|e| format!("{e}: a tracing filter, e.g. `info`, `debug` or `keyturn=debug,info`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Black-box finding: a `--log-level` typo was only warned about (and
    /// the daemon ran at `info`); it is a usage error now, naming the value.
    #[test]
    fn a_log_level_that_is_no_filter_is_a_usage_error() {
        let e =
            Cli::try_parse_from(["keyturn", "--log-level", "keyturn=bogus", "status"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(e.to_string().contains("keyturn=bogus"), "{e}");
        for ok in [
            "info",
            "debug",
            "keyturn=debug,info",
            "warn,keyturn::oauth=trace",
        ] {
            let cli = Cli::try_parse_from(["keyturn", "--log-level", ok, "status"]).unwrap();
            assert_eq!(cli.log_level, ok);
        }
    }
}
