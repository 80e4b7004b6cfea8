//! The commands agents run, over the agents' socket: `keyturn task`,
//! `keyturn token exchange` and `keyturn ack`. An agent may not be able to
//! read the config (it is read leniently, for the socket's path) and is
//! not in the control socket's group.

use super::*;

/// `keyturn task`: run by an agent (or by an operator `--as` one), talking to
/// the agents' socket.
pub(super) async fn task(
    path: &Path,
    command: TaskCommand,
    socket: Option<PathBuf>,
    as_agent: Option<String>,
    signer: Option<AssertionSigner>,
) -> u8 {
    use crate::api::protocol::TaskStartArgs;
    let as_agent = match as_agent.map(crate::model::AgentId::new).transpose() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("keyturn: --as: {e}");
            return EXIT_USAGE;
        }
    };
    let assertion = match signer.map(|s| s.sign(path)).transpose() {
        Ok(a) => a,
        Err(code) => return code,
    };
    let socket = socket.unwrap_or_else(|| agent_socket_of(path));
    let req = match command {
        TaskCommand::Start {
            tenant,
            use_case,
            run_id,
            initiator,
            sensitivity,
            ttl,
        } => {
            let ttl_seconds = match ttl.as_deref().map(humantime::parse_duration).transpose() {
                Ok(t) => t.map(|d| d.as_secs()),
                Err(e) => {
                    eprintln!("keyturn: --ttl: {e} (write e.g. 15m)");
                    return EXIT_USAGE;
                }
            };
            Request::TaskStart {
                as_agent,
                assertion,
                task: TaskStartArgs {
                    tenant,
                    use_case,
                    run_id,
                    initiator,
                    sensitivity,
                    ttl_seconds,
                },
            }
        }
        TaskCommand::End { task } => Request::TaskEnd {
            as_agent,
            assertion,
            task,
        },
        TaskCommand::List => Request::TaskList {
            as_agent,
            assertion,
        },
    };
    let body = match call_agents_socket(&socket, &req, "", EXIT_USAGE).await {
        Ok(body) => body,
        Err(code) => return code,
    };
    // JSON always: the output is for the agent's code as much as for people.
    match body {
        ResponseBody::TaskStarted(t) => {
            println!("{}", serde_json::to_string_pretty(&t).unwrap_or_default())
        }
        ResponseBody::TaskEnded(t) => {
            println!("{}", serde_json::to_string_pretty(&t).unwrap_or_default())
        }
        ResponseBody::Tasks(t) => {
            println!("{}", serde_json::to_string_pretty(&t).unwrap_or_default())
        }
        _ => return unexpected(),
    }
    0
}

/// Reads a token from `path` (`-`: stdin), without its trailing newline;
/// `flag` and `what` name it in errors.
fn read_token(path: &Path, flag: &str, what: &str) -> Result<crate::model::SecretValue, String> {
    use std::io::Read as _;
    let mut bytes = zeroize::Zeroizing::new(Vec::new());
    let read = if path == Path::new("-") {
        std::io::stdin().read_to_end(&mut bytes)
    } else {
        std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut bytes))
    };
    read.map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    let len = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    if len == 0 {
        return Err(format!(
            "{flag} {}: the file is empty; it must hold {what}",
            path.display()
        ));
    }
    Ok(crate::model::SecretValue::new(bytes[..len].to_vec()))
}

/// `keyturn token exchange`: RFC 8693 over the agents' socket, as the
/// calling uid's agent (or `--as` one).
pub(super) async fn token_exchange(path: &Path, args: ExchangeArgs) -> u8 {
    let as_agent = match args.as_agent.map(crate::model::AgentId::new).transpose() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("keyturn: --as: {e}");
            return EXIT_USAGE;
        }
    };
    let tokens = read_token(
        &args.subject_token_file,
        "--subject-token-file",
        "the human's access token",
    )
    .and_then(|subject| {
        let actor = args
            .actor_token_file
            .as_deref()
            .map(|p| read_token(p, "--actor-token-file", "the agent's assertion"))
            .transpose()?;
        Ok((subject, actor))
    });
    let (subject_token, actor_token) = match tokens {
        Ok(t) => t,
        Err(e) => {
            eprintln!("keyturn: {e}");
            return EXIT_USAGE;
        }
    };
    let socket = args.socket.unwrap_or_else(|| agent_socket_of(path));
    let req = Request::TokenExchange {
        as_agent,
        exchange: crate::api::protocol::TokenExchangeArgs {
            subject_token: crate::api::protocol::WireSecret(subject_token),
            subject_token_type: args.subject_token_type,
            requested_token_type: None,
            scope: args.scope,
            audience: args.audience,
            resource: args.resource,
            task_id: args.task,
            actor_token: actor_token.map(crate::api::protocol::WireSecret),
        },
    };
    // A refusal: the OAuth error code and why (never a token).
    match call_agents_socket(&socket, &req, "token exchange refused: ", EXIT_FAILED).await {
        Ok(ResponseBody::TokenExchanged(t)) => {
            println!("{}", serde_json::to_string_pretty(&t).unwrap_or_default());
            0
        }
        Ok(_) => unexpected(),
        Err(code) => code,
    }
}

/// Sends `req` to the agents' socket. A refusal is reported on stderr
/// (`refused` before the daemon's message) and becomes the exit code:
/// 77 forbidden, 69 unavailable, `bad_request` for a bad request, else 1.
async fn call_agents_socket(
    socket: &Path,
    req: &Request,
    refused: &str,
    bad_request: u8,
) -> Result<ResponseBody, u8> {
    match call(socket, req).await {
        Ok(Response::Ok(body)) => Ok(body),
        Ok(Response::Error(e)) => {
            eprintln!("keyturn: {refused}{}", e.message);
            Err(match e.kind {
                ApiErrorKind::Forbidden => EXIT_NOPERM,
                ApiErrorKind::Unavailable => EXIT_UNAVAILABLE,
                ApiErrorKind::BadRequest => bad_request,
                _ => EXIT_FAILED,
            })
        }
        Err(e) => {
            eprintln!("keyturn: {e}");
            Err(match e {
                ClientError::PermissionDenied { .. } => EXIT_NOPERM,
                _ => EXIT_UNAVAILABLE,
            })
        }
    }
}

/// `keyturn task --key PATH --agent NAME [--audience AUD]`: the agent
/// proves who it is with a fresh assertion signed by its own key.
pub(super) struct AssertionSigner {
    pub(super) key: PathBuf,
    pub(super) agent: String,
    pub(super) audience: Option<String>,
}

impl AssertionSigner {
    /// How long a signed assertion lives: enough to reach the daemon, and
    /// it is single-use anyway.
    const LIFETIME_SECS: i64 = 60;

    fn sign(self, config: &Path) -> Result<crate::api::protocol::WireSecret, u8> {
        if let Err(e) = crate::model::AgentId::new(&self.agent) {
            eprintln!("keyturn: --agent: {e}");
            return Err(EXIT_USAGE);
        }
        let private = match std::fs::read(&self.key) {
            Ok(bytes) => crate::model::SecretValue::new(bytes),
            Err(e) => {
                eprintln!("keyturn: --key {}: {e}", self.key.display());
                return Err(EXIT_USAGE);
            }
        };
        let audience = self.audience.unwrap_or_else(|| {
            crate::config::ClientPaths::lenient_at(config).map_or_else(
                || crate::auth::DEFAULT_AUDIENCE.to_owned(),
                |p| p.assertion_audience,
            )
        });
        crate::auth::sign(&private, &self.agent, &audience, Self::LIFETIME_SECS)
            .map(crate::api::protocol::WireSecret)
            .map_err(|e| {
                eprintln!("keyturn: --key {}: {e}", self.key.display());
                EXIT_USAGE
            })
    }
}

/// The agents' socket named by the config at `path` (read leniently: an
/// agent may not be able to read it), else the default.
fn agent_socket_of(path: &Path) -> PathBuf {
    crate::config::ClientPaths::lenient_at(path).map_or_else(
        || {
            let default = PathBuf::from(crate::config::validate::DEFAULT_AGENT_SOCKET);
            // There but unreadable (an agent's uid, a 0600 config): say so,
            // or a socket the config moved looks like a daemon that is down.
            if let Err(e) = std::fs::File::open(path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                eprintln!(
                    "keyturn: cannot read {} ({e}); trying the default agents' socket {}: \
                     pass --socket (or set KEYTURN_AGENT_SOCKET) when the config names another",
                    path.display(),
                    default.display()
                );
            }
            default
        },
        |p| p.agent_socket,
    )
}

/// `keyturn ack`: usually run by an agent, which may not be able to read
/// the config (it is only read for the socket's path) and is not in the
/// control socket's group (it talks to the agents' socket).
pub(super) async fn ack(
    path: &Path,
    credential: &str,
    version: u64,
    socket: Option<PathBuf>,
    json: bool,
) -> u8 {
    let key = match parse_selector(credential) {
        Ok(crate::api::protocol::Selector::Credential(k)) => k,
        Ok(_) => {
            eprintln!("keyturn: `{credential}`: expected AGENT/CREDENTIAL");
            return EXIT_USAGE;
        }
        Err(e) => {
            eprintln!("keyturn: {e}");
            return EXIT_USAGE;
        }
    };
    let socket = socket.unwrap_or_else(|| agent_socket_of(path));
    let req = Request::Ack {
        agent: key.agent,
        credential: key.credential,
        version,
    };
    let result = match call_agents_socket(&socket, &req, "", EXIT_FAILED).await {
        Ok(ResponseBody::Ack(r)) => r,
        Ok(_) => return unexpected(),
        Err(code) => return code,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&result).unwrap_or_default()
        );
    } else {
        let what = if result.acknowledged.is_empty() {
            "already acknowledged".to_owned()
        } else {
            format!("acknowledged ({})", result.acknowledged.join(", "))
        };
        let rest = if result.awaiting.is_empty() {
            if result.retiring {
                "; the previous version is being retired".to_owned()
            } else {
                String::new()
            }
        } else {
            format!("; still awaiting {}", result.awaiting.join(", "))
        };
        println!(
            "{}/{} version {}: {what}{rest}",
            result.agent, result.credential, result.version
        );
    }
    0
}
