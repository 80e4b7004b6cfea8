//! The control socket: server and client.
//!
//! The daemon listens on a Unix socket (mode 0660, group configurable) and
//! speaks the line protocol of [`super::protocol`]. Access is checked twice:
//! the kernel refuses `connect` to anyone without write permission on the
//! socket file, and every accepted connection is checked again with
//! `SO_PEERCRED` (root, the daemon's own uid, or a member of the socket's
//! group). The second check matters when an operator loosens the file mode or
//! the socket is passed around; a refused peer gets one `forbidden` answer
//! saying how to get access, and the refusal goes to the audit log through
//! [`ControlHandler::refused`]. A peer the kernel refuses never reaches the
//! daemon, so only its client knows (it exits 77 and names the group).
//!
//! Every connection runs in its own task on the caller's `TaskTracker`, so the
//! daemon's shutdown (cancel, then wait for the tracker) lets requests already
//! being handled finish while no new ones are accepted.
//!
//! The agents' socket ([`bind_agent`], mode 0666) is served by the same
//! code with one difference: anyone may connect, and only
//! [`AGENT_COMMANDS`] are served there. An `ack` is authorized per request
//! by the peer's uid (root, the daemon's, or the agent's configured `uid`),
//! by the handler, on either socket; task commands and `token_exchange` are
//! for the peer's agent (its uid), or any agent named with `as` by a
//! privileged peer.
//!
//! Because anyone may connect to the agents' socket, it is bounded
//! ([`ConnectionLimits`]) so that no local user can use up the daemon's file
//! descriptors (and with them the control socket): at most `max`
//! connections, at most `per_uid` of them from one uid. A new connection
//! over either bound closes the oldest connection not being served a
//! request (idle, or still sending its line) of that uid, or of anyone when
//! the socket is full; when every one is being served, the new one gets an
//! `unavailable` answer and is closed. The control socket is bounded the
//! same way, with a larger share
//! ([`ConnectionLimits::control_for_nofile`]): only root, the daemon's
//! user and the socket's group reach it, but one member of the group must
//! not be able to take the descriptors rotations need.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::protocol::{
    AGENT_COMMANDS, AckResult, AgentLifecycle, ApiError, COMMANDS, DecommissionResult, Request,
    Response, ResponseBody, RotateResult, Selector, StatusRow, WireSecret, parse_request,
};
use crate::audit::Actor;
use crate::model::{AgentId, CredentialKey};

mod bind;
mod peer;
mod registry;

use bind::RemoveSocketOnDrop;
pub use bind::{bind, bind_agent, resolve_group};
pub use peer::{PeerCred, peer_allowed};
use peer::{peer_of, supplementary_groups};
pub use registry::{ConnectionLimits, MAX_AGENT_CONNECTIONS, MAX_CONTROL_CONNECTIONS};
use registry::{Registry, Unregister};

/// Longest request line accepted (without its newline).
pub const MAX_REQUEST_LINE: usize = 64 * 1024;
/// How long a connection may take to send one complete request line.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long writing one response may take before the client is given up on
/// (a client that never reads would otherwise hold a task through shutdown).
const RESPONSE_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `call` waits for the daemon to accept the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the daemon does for the socket; the socket layer only parses, checks
/// peers and frames responses.
#[async_trait]
pub trait ControlHandler: Send + Sync + 'static {
    async fn status(&self) -> Vec<StatusRow>;
    async fn rotate(
        &self,
        actor: Actor,
        selector: Selector,
        wait: bool,
    ) -> Result<Vec<RotateResult>, ApiError>;
    /// Record a refused connection in the audit log (rate-limited per
    /// uid); true when this one was recorded (log it then).
    async fn refused(&self, peer: PeerCred, reason: String) -> bool;
    /// Decommission `agent` (see `crate::revocation`).
    async fn decommission(
        &self,
        actor: Actor,
        agent: AgentId,
        reason: String,
        by: Option<String>,
    ) -> Result<DecommissionResult, ApiError>;
    /// Agents decommissioning, decommissioned or orphaned.
    async fn agents(&self) -> Vec<AgentLifecycle>;
    /// The identity surface.
    async fn surface(
        &self,
        unused_after: std::time::Duration,
    ) -> Result<crate::surface::Surface, ApiError>;
    /// `peer` acknowledges `version` of `key`. The handler decides whether
    /// the peer may (and audits a refusal).
    async fn ack(
        &self,
        peer: PeerCred,
        key: CredentialKey,
        version: u64,
    ) -> Result<AckResult, ApiError>;
    /// A task command (`task_start`, `task_end`, `task_list`) from `peer`.
    /// `privileged`: the peer may use the control socket (root, the
    /// daemon's uid, the socket's group), so it may act for any agent with
    /// `as`. The handler maps the peer to its agent and audits refusals.
    async fn task(
        &self,
        peer: PeerCred,
        privileged: bool,
        request: TaskCommand,
    ) -> Result<ResponseBody, ApiError>;
    /// Every agent's tasks not ended (for `keyturn status`).
    async fn tasks(&self) -> Result<Vec<crate::api::protocol::TaskView>, ApiError>;
    /// An RFC 8693 token exchange for the peer's agent (`privileged` and
    /// `as_agent` as for [`Self::task`]); the handler audits refusals.
    async fn token_exchange(
        &self,
        peer: PeerCred,
        privileged: bool,
        as_agent: Option<AgentId>,
        exchange: crate::api::protocol::TokenExchangeArgs,
    ) -> Result<ResponseBody, ApiError>;
}

/// A task command as the socket read it.
#[derive(Debug, Clone)]
pub enum TaskCommand {
    Start {
        as_agent: Option<AgentId>,
        assertion: Option<WireSecret>,
        task: crate::api::protocol::TaskStartArgs,
    },
    End {
        as_agent: Option<AgentId>,
        assertion: Option<WireSecret>,
        task: String,
    },
    List {
        as_agent: Option<AgentId>,
        assertion: Option<WireSecret>,
    },
}

impl TaskCommand {
    /// `as` and the assertion, whichever command it is.
    pub fn auth(&self) -> (Option<&AgentId>, Option<&WireSecret>) {
        match self {
            TaskCommand::Start {
                as_agent,
                assertion,
                ..
            }
            | TaskCommand::End {
                as_agent,
                assertion,
                ..
            }
            | TaskCommand::List {
                as_agent,
                assertion,
            } => (as_agent.as_ref(), assertion.as_ref()),
        }
    }
}

/// A bound, permission-set control socket, ready for [`serve`].
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// The group that owns the socket file (the configured one, or the
    /// daemon's own when none is configured).
    gid: u32,
    /// The group's name for messages (`add the user to group X`).
    group_name: String,
    /// Removes the socket file when the socket is dropped, served or not
    /// (a start that fails after binding leaves no file behind): only the
    /// file it created (device and inode), never one a later daemon put at
    /// the same path.
    remove: RemoveSocketOnDrop,
    /// The agents' socket: anyone connects, only agent commands are served.
    agent: bool,
    /// The bound on connections (the agents' socket's).
    connections: Option<ConnectionLimits>,
}

impl ControlSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn gid(&self) -> u32 {
        self.gid
    }
}

/// Per-server limits; tests shorten them.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_line: usize,
    read_timeout: Duration,
    write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_line: MAX_REQUEST_LINE,
            read_timeout: REQUEST_READ_TIMEOUT,
            write_timeout: RESPONSE_WRITE_TIMEOUT,
        }
    }
}

struct Server {
    handler: Arc<dyn ControlHandler>,
    agent: bool,
    daemon_uid: u32,
    sock_gid: u32,
    group_name: String,
    path: PathBuf,
    limits: Limits,
}

/// Accepts connections until `cancel`, each handled in its own task on
/// `tracker`. Returns once it stops accepting (the socket file is removed
/// then); the caller waits on `tracker` for in-flight requests.
pub async fn serve(
    sock: ControlSocket,
    handler: Arc<dyn ControlHandler>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    serve_with(sock, handler, cancel, tracker, Limits::default()).await
}

async fn serve_with(
    sock: ControlSocket,
    handler: Arc<dyn ControlHandler>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    limits: Limits,
) {
    let ControlSocket {
        listener,
        path,
        gid,
        group_name,
        remove,
        agent,
        connections,
    } = sock;
    let _remove = remove;
    let server = Arc::new(Server {
        handler,
        agent,
        daemon_uid: nix::unistd::geteuid().as_raw(),
        sock_gid: gid,
        group_name,
        path,
        limits,
    });
    let which = if server.agent {
        "agents' socket listening"
    } else {
        "control socket listening"
    };
    match connections {
        Some(c) => {
            info!(socket = %server.path.display(), gid = server.sock_gid, max_connections = c.max, max_connections_per_uid = c.per_uid, "{which}")
        }
        None => info!(socket = %server.path.display(), gid = server.sock_gid, "{which}"),
    }
    let registry = Arc::new(Mutex::new(Registry::default()));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, _)) => {
                let Some(peer) = peer_of(&stream) else {
                    continue;
                };
                let Some(limits) = connections else {
                    tracker.spawn(handle_connection(
                        stream,
                        peer,
                        Arc::clone(&server),
                        cancel.clone(),
                        Arc::default(),
                    ));
                    continue;
                };
                let admitted = registry
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .admit(peer.uid, limits, &cancel);
                let Some((id, close, serving)) = admitted else {
                    turn_away(&stream, &server.path);
                    continue;
                };
                let unregister = Unregister {
                    registry: Arc::clone(&registry),
                    id,
                };
                let server = Arc::clone(&server);
                tracker.spawn(async move {
                    handle_connection(stream, peer, server, close, serving).await;
                    drop(unregister);
                });
            }
            Err(e) => {
                // EMFILE and friends: pause instead of spinning on the error.
                warn!(socket = %server.path.display(), error = %e, "accepting a control connection failed");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
    debug!(socket = %server.path.display(), "socket stopped accepting");
}

/// The `cmd` of a request line that is a JSON object, whatever else it holds.
fn command_name(text: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Cmd {
        cmd: String,
    }
    serde_json::from_str::<Cmd>(text).ok().map(|c| c.cmd)
}

impl Server {
    async fn authorize(&self, peer: &PeerCred) -> bool {
        // On the agents' socket every request is authorized on its own.
        if self.agent || peer_allowed(peer, self.daemon_uid, self.sock_gid, &[]) {
            return true;
        }
        let groups = supplementary_groups(peer).await.unwrap_or_default();
        peer_allowed(peer, self.daemon_uid, self.sock_gid, &groups)
    }

    /// Whether `peer` may act for any agent (`as`): on the control socket
    /// every peer that got here; on the agents' socket, only those the
    /// control socket would admit.
    async fn privileged(&self, peer: &PeerCred) -> bool {
        if self.agent {
            let groups = supplementary_groups(peer).await.unwrap_or_default();
            peer_allowed(peer, self.daemon_uid, self.sock_gid, &groups)
        } else {
            true
        }
    }

    async fn task(&self, peer: &PeerCred, command: TaskCommand) -> Response {
        let privileged = self.privileged(peer).await;
        info!(uid = peer.uid, pid = peer.pid, ?command, "task request");
        self.handler.task(*peer, privileged, command).await.into()
    }

    /// The agents' socket's answer to a command only the control socket serves.
    fn not_served(&self, cmd: &str) -> ApiError {
        ApiError::forbidden(format!(
            "the agent socket {} serves only {}; `{cmd}` needs the control socket",
            self.path.display(),
            AGENT_COMMANDS.join(", "),
        ))
    }

    fn refusal_message(&self, peer: &PeerCred) -> String {
        format!(
            "uid {} is not allowed to use the keyturn control socket {}: {}",
            peer.uid,
            self.path.display(),
            access_advice(Some(&self.group_name))
        )
    }

    async fn dispatch(&self, peer: &PeerCred, line: &[u8]) -> Response {
        let Ok(text) = std::str::from_utf8(line) else {
            return Response::Error(ApiError::bad_request("request is not valid UTF-8"));
        };
        // Black-box finding: a `rotate` on the agents' socket was answered
        // with the request's schema (what its selector lacked) as if it
        // could be served there. A command this socket does not serve is
        // refused by its name alone, before its fields are read.
        if self.agent
            && let Some(cmd) = command_name(text)
            && !AGENT_COMMANDS.contains(&cmd.as_str())
            && COMMANDS.contains(&cmd.as_str())
        {
            return Response::Error(self.not_served(&cmd));
        }
        let request = match parse_request(text) {
            Ok(r) => r,
            Err(e) => {
                debug!(uid = peer.uid, pid = peer.pid, error = %e, "bad control request");
                return Response::Error(e);
            }
        };
        debug!(
            uid = peer.uid,
            pid = peer.pid,
            cmd = request.cmd(),
            "control request"
        );
        if self.agent && !AGENT_COMMANDS.contains(&request.cmd()) {
            return Response::Error(self.not_served(request.cmd()));
        }
        match request {
            Request::Ping {} => Response::Ok(ResponseBody::Pong {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            }),
            Request::Status {} => Response::Ok(ResponseBody::Status(self.handler.status().await)),
            Request::Rotate { selector, wait } => {
                info!(uid = peer.uid, pid = peer.pid, selector = %selector, wait, "rotation requested");
                self.handler
                    .rotate(peer.actor(), selector, wait)
                    .await
                    .map(ResponseBody::Rotate)
                    .into()
            }
            Request::Decommission { agent, reason, by } => {
                info!(uid = peer.uid, pid = peer.pid, agent = %agent, "decommission requested");
                self.handler
                    .decommission(peer.actor(), agent, reason, by)
                    .await
                    .map(|d| ResponseBody::Decommission(Box::new(d)))
                    .into()
            }
            Request::Agents {} => Response::Ok(ResponseBody::Agents(self.handler.agents().await)),
            Request::Surface {
                unused_after_seconds,
            } => self
                .handler
                .surface(std::time::Duration::from_secs(
                    unused_after_seconds.unwrap_or(30 * 86_400),
                ))
                .await
                .map(|s| ResponseBody::Surface(Box::new(s)))
                .into(),
            Request::TaskStart {
                as_agent,
                assertion,
                task,
            } => {
                let command = TaskCommand::Start {
                    as_agent,
                    assertion,
                    task,
                };
                self.task(peer, command).await
            }
            Request::TaskEnd {
                as_agent,
                assertion,
                task,
            } => {
                let command = TaskCommand::End {
                    as_agent,
                    assertion,
                    task,
                };
                self.task(peer, command).await
            }
            Request::TaskList {
                as_agent,
                assertion,
            } => {
                let command = TaskCommand::List {
                    as_agent,
                    assertion,
                };
                self.task(peer, command).await
            }
            Request::Tasks {} => self.handler.tasks().await.map(ResponseBody::Tasks).into(),
            Request::TokenExchange { as_agent, exchange } => {
                let privileged = self.privileged(peer).await;
                // The parameters only: the tokens never reach the log.
                info!(uid = peer.uid, pid = peer.pid, as_agent = ?as_agent, scope = ?exchange.scope, "token exchange request");
                self.handler
                    .token_exchange(*peer, privileged, as_agent, exchange)
                    .await
                    .into()
            }
            Request::Ack {
                agent,
                credential,
                version,
            } => {
                let key = CredentialKey::new(agent, credential);
                info!(uid = peer.uid, pid = peer.pid, credential = %key, version, "ack");
                self.handler
                    .ack(*peer, key, version)
                    .await
                    .map(ResponseBody::Ack)
                    .into()
            }
        }
    }
}

/// Answers with `error` just before the connection is closed: best effort,
/// as there is nothing left to do if the client does not read it.
async fn write_last_error<W: AsyncWrite + Unpin>(w: &mut W, error: ApiError, timeout: Duration) {
    let _ = write_response(w, &Response::Error(error), timeout).await;
}

/// Writes `response` as one line; returns its length.
async fn write_response<W: AsyncWrite + Unpin>(
    w: &mut W,
    response: &Response,
    timeout: Duration,
) -> io::Result<usize> {
    let mut bytes = serde_json::to_vec(response).unwrap_or_else(|e| {
        // Our own types always serialize; keep the connection honest anyway.
        serde_json::to_vec(&Response::Error(ApiError::internal(format!(
            "encoding the response failed: {e}"
        ))))
        .unwrap_or_default()
    });
    bytes.push(b'\n');
    tokio::time::timeout(timeout, async {
        w.write_all(&bytes).await?;
        w.flush().await
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client did not read the response"))??;
    Ok(bytes.len())
}

enum Line {
    /// A complete line in the buffer; `true` if the client also closed its
    /// side (a last request without a trailing newline).
    Complete {
        last: bool,
    },
    TooLong,
    Eof,
}

/// Reads one line of at most `max` bytes (newline excluded) into `buf`,
/// without ever buffering more than `max + 1` bytes of it.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<Line> {
    let n = r.take(max as u64 + 1).read_until(b'\n', buf).await?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        return Ok(Line::Complete { last: false });
    }
    if buf.len() > max {
        Ok(Line::TooLong)
    } else {
        Ok(Line::Complete { last: true })
    }
}

/// Tells a connection the bounded socket has no room (every connection is
/// being served) and closes it, without waiting on the client.
fn turn_away(stream: &UnixStream, path: &Path) {
    debug!(socket = %path.display(), "every connection is being served; turning a new one away");
    let error = ApiError::unavailable(format!(
        "the socket {} is at its connection limit (every connection is being served); try again in a moment",
        path.display()
    ));
    if let Ok(mut line) = serde_json::to_vec(&Response::Error(error)) {
        line.push(b'\n');
        // A fresh connection's send buffer is empty: this does not block.
        let _ = stream.try_write(&line);
    }
}

/// Serves one connection until EOF, an error, or `cancel` between requests;
/// `serving` is set while a request line is being answered.
async fn handle_connection(
    stream: UnixStream,
    peer: PeerCred,
    server: Arc<Server>,
    cancel: CancellationToken,
    serving: Arc<AtomicBool>,
) {
    let limits = server.limits;
    let (read_half, mut write_half) = stream.into_split();

    if !server.authorize(&peer).await {
        let reason = server.refusal_message(&peer);
        if server.handler.refused(peer, reason.clone()).await {
            warn!(uid = peer.uid, gid = peer.gid, pid = peer.pid, socket = %server.path.display(), "refused control connection");
        }
        write_last_error(
            &mut write_half,
            ApiError::forbidden(reason),
            limits.write_timeout,
        )
        .await;
        let _ = write_half.shutdown().await;
        return;
    }

    let mut reader = BufReader::new(read_half);
    let mut buf = Vec::with_capacity(1024);
    loop {
        buf.clear();
        // Between requests, cancellation closes the connection; a request
        // already read is always answered (the select is not around dispatch).
        let read = tokio::select! {
            _ = cancel.cancelled() => break,
            r = tokio::time::timeout(limits.read_timeout, read_line(&mut reader, &mut buf, limits.max_line)) => r,
        };
        let line = match read {
            Err(_) => {
                let error = ApiError::bad_request(format!(
                    "no complete request line within {}; closing",
                    humantime::format_duration(limits.read_timeout)
                ));
                write_last_error(&mut write_half, error, limits.write_timeout).await;
                break;
            }
            Ok(Err(e)) => {
                debug!(uid = peer.uid, error = %e, "control connection read failed");
                break;
            }
            Ok(Ok(line)) => line,
        };
        let last = match line {
            Line::Eof => break,
            Line::TooLong => {
                warn!(
                    uid = peer.uid,
                    pid = peer.pid,
                    "control request longer than {} bytes; closing",
                    limits.max_line
                );
                let error = ApiError::bad_request(format!(
                    "request line longer than {} bytes; closing the connection",
                    limits.max_line
                ));
                write_last_error(&mut write_half, error, limits.write_timeout).await;
                break;
            }
            Line::Complete { last } => last,
        };
        if buf.iter().all(u8::is_ascii_whitespace) {
            // Blank lines (e.g. a trailing `\n` from `echo`) are not requests.
            if last {
                break;
            }
            continue;
        }
        serving.store(true, Ordering::Release);
        let response = server.dispatch(&peer, &buf).await;
        let written = write_response(&mut write_half, &response, limits.write_timeout).await;
        serving.store(false, Ordering::Release);
        drop(response);
        match written {
            // A status of every credential is tens of MB of heap, freed now.
            Ok(bytes) => crate::memory::freed(crate::memory::Freed::Response(bytes)),
            Err(e) => {
                debug!(uid = peer.uid, error = %e, "writing a control response failed");
                break;
            }
        }
        if last {
            break;
        }
    }
    let _ = write_half.shutdown().await;
}

/// What to do about a refusal, naming the socket's group. The daemon's own
/// group is often `root` when no `daemon.socket_group` is set; joining it
/// is not advice to give, so that case says to configure a group instead.
pub(super) fn access_advice(group: Option<&str>) -> String {
    match group {
        Some("root" | "0") => "the socket's group is `root`, so only root may use it: \
             run as root, or set `daemon.socket_group` to a group for operators \
             (e.g. keyturn) and add the user to it"
            .to_owned(),
        Some(g) => format!(
            "run as root, or add the user to the socket's group `{g}` \
             (usermod -aG {g} USER) and log in again"
        ),
        None => "run as root or as a member of the socket's group \
             (the socket's directory cannot be read to say which)"
            .to_owned(),
    }
}

/// The name of a group, or its number when it has none.
pub(super) fn group_name(gid: u32) -> String {
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map_or_else(|| gid.to_string(), |g| g.name)
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead as _, Write as _};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::sync::Mutex;

    use super::*;
    use crate::api::client::{ClientError, call, connect_error};
    use crate::api::protocol::{ApiErrorKind, RotateOutcome};
    use crate::model::{AgentId, CredentialId};

    #[derive(Default)]
    struct FakeHandler {
        refused: Mutex<Vec<(PeerCred, String)>>,
        rotations: Mutex<Vec<(Actor, Selector, bool)>>,
        /// How long `rotate` takes, to test draining on shutdown.
        rotate_delay: Duration,
    }

    #[async_trait]
    impl ControlHandler for FakeHandler {
        async fn task(
            &self,
            _peer: PeerCred,
            privileged: bool,
            _request: TaskCommand,
        ) -> Result<ResponseBody, ApiError> {
            // Says what the socket decided, for the dispatch tests.
            if privileged {
                Ok(ResponseBody::Tasks(Vec::new()))
            } else {
                Err(ApiError::forbidden("not privileged"))
            }
        }

        async fn status(&self) -> Vec<StatusRow> {
            vec![StatusRow {
                agent: AgentId::new("bot").unwrap(),
                credential: CredentialId::new("db").unwrap(),
                vault: "local".into(),
                version: Some(2),
                stage: None,
                last_rotated: None,
                next_due: None,
                state: "idle".into(),
                step: None,
                rotation: None,
                last_error: None,
                awaiting_ack: Vec::new(),
                holdouts: Vec::new(),
            }]
        }
        async fn rotate(
            &self,
            actor: Actor,
            selector: Selector,
            wait: bool,
        ) -> Result<Vec<RotateResult>, ApiError> {
            self.rotations
                .lock()
                .unwrap()
                .push((actor, selector.clone(), wait));
            tokio::time::sleep(self.rotate_delay).await;
            match selector {
                Selector::Agent(a) if a.as_str() == "ghost" => {
                    Err(ApiError::not_found("no agent `ghost` is configured"))
                }
                _ => Ok(vec![RotateResult {
                    agent: AgentId::new("bot").unwrap(),
                    credential: CredentialId::new("db").unwrap(),
                    rotation: None,
                    version: Some(3),
                    outcome: if wait {
                        RotateOutcome::Completed
                    } else {
                        RotateOutcome::Started
                    },
                    error: None,
                    note: None,
                }]),
            }
        }
        async fn refused(&self, peer: PeerCred, reason: String) -> bool {
            self.refused.lock().unwrap().push((peer, reason));
            true
        }
        async fn ack(
            &self,
            _peer: PeerCred,
            key: CredentialKey,
            version: u64,
        ) -> Result<AckResult, ApiError> {
            if version != 3 {
                return Err(ApiError::stale(format!("{key}: version 3 awaits acks")));
            }
            Ok(AckResult {
                agent: key.agent,
                credential: key.credential,
                version,
                acknowledged: vec!["file:/run/x".into()],
                awaiting: vec![],
                retiring: true,
            })
        }
        async fn decommission(
            &self,
            _actor: Actor,
            agent: AgentId,
            _reason: String,
            _by: Option<String>,
        ) -> Result<DecommissionResult, ApiError> {
            Err(ApiError::not_found(format!("no agent \"{agent}\"")))
        }
        async fn agents(&self) -> Vec<AgentLifecycle> {
            Vec::new()
        }
        async fn surface(
            &self,
            _unused_after: std::time::Duration,
        ) -> Result<crate::surface::Surface, ApiError> {
            Err(ApiError::unavailable("not in this test"))
        }
        async fn tasks(&self) -> Result<Vec<crate::api::protocol::TaskView>, ApiError> {
            Err(ApiError::unavailable("not in this test"))
        }
        async fn token_exchange(
            &self,
            _peer: PeerCred,
            privileged: bool,
            _as_agent: Option<AgentId>,
            _exchange: crate::api::protocol::TokenExchangeArgs,
        ) -> Result<ResponseBody, ApiError> {
            // Says what the socket decided, for the dispatch tests.
            if privileged {
                Ok(ResponseBody::Tasks(Vec::new()))
            } else {
                Err(ApiError::forbidden("not privileged"))
            }
        }
    }

    struct Running {
        _dir: tempfile::TempDir,
        path: PathBuf,
        cancel: CancellationToken,
        tracker: TaskTracker,
        server: tokio::task::JoinHandle<()>,
    }

    impl Running {
        async fn stop(self) {
            self.cancel.cancel();
            self.server.await.unwrap();
            self.tracker.close();
            self.tracker.wait().await;
        }
    }

    fn start(handler: Arc<FakeHandler>, limits: Limits) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/control.sock");
        let sock = bind(&path, None).unwrap();
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let server = tokio::spawn(serve_with(
            sock,
            handler,
            cancel.clone(),
            tracker.clone(),
            limits,
        ));
        Running {
            _dir: dir,
            path,
            cancel,
            tracker,
            server,
        }
    }

    /// Sends raw bytes on one connection and reads one response line.
    async fn raw_exchange(stream: &mut BufReader<UnixStream>, bytes: &[u8]) -> Response {
        stream.get_mut().write_all(bytes).await.unwrap();
        let mut line = String::new();
        stream.read_line(&mut line).await.unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    fn error_kind(r: Response) -> (ApiErrorKind, String) {
        match r {
            Response::Error(e) => (e.kind, e.message),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn agent_connection_limits_keep_most_descriptors_in_reserve() {
        let l = ConnectionLimits::for_nofile(65536);
        assert_eq!((l.max, l.per_uid), (MAX_AGENT_CONNECTIONS, 64));
        let l = ConnectionLimits::for_nofile(256);
        assert_eq!((l.max, l.per_uid), (32, 8));
        let l = ConnectionLimits::for_nofile(4);
        assert_eq!((l.max, l.per_uid), (1, 1));
    }

    /// Serves `sock` bounded to 4 connections, 2 per uid, with a fake
    /// handler: what stops it, what waits for its connections, its task.
    fn serve_bounded(
        mut sock: ControlSocket,
    ) -> (CancellationToken, TaskTracker, tokio::task::JoinHandle<()>) {
        sock.connections = Some(ConnectionLimits { max: 4, per_uid: 2 });
        let (cancel, tracker) = (CancellationToken::new(), TaskTracker::new());
        let server = tokio::spawn(serve_with(
            sock,
            Arc::new(FakeHandler::default()),
            cancel.clone(),
            tracker.clone(),
            Limits::default(),
        ));
        (cancel, tracker, server)
    }

    #[test]
    fn control_connection_limits_leave_room_for_rotations_and_root() {
        let l = ConnectionLimits::control_for_nofile(65536);
        assert_eq!((l.max, l.per_uid), (MAX_CONTROL_CONNECTIONS, 128));
        let l = ConnectionLimits::control_for_nofile(1024);
        assert_eq!((l.max, l.per_uid), (256, 64));
        let l = ConnectionLimits::control_for_nofile(4);
        assert_eq!((l.max, l.per_uid), (4, 1));
    }

    /// Black-box finding: the control socket had no bound, so a member of
    /// its group holding thousands of idle connections took every
    /// descriptor: `status` went unanswered and rotations failed at
    /// delivery ("Too many open files"). It is bounded like the agents'
    /// socket now: the flood only ever holds its share.
    #[tokio::test]
    async fn the_control_socket_bounds_idle_connections_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/ctl.sock");
        let sock = bind(&path, None).unwrap();
        assert_eq!(
            sock.connections,
            Some(ConnectionLimits::control_for_this_process()),
            "bound by default"
        );
        let (cancel, tracker, server) = serve_bounded(sock);
        let mut idle = Vec::new();
        for _ in 0..20 {
            let mut s = UnixStream::connect(&path).await.unwrap();
            s.write_all(b"{\"cmd\":\"pi").await.unwrap();
            idle.push(s);
        }
        assert!(matches!(
            call(&path, &Request::Status {}).await.unwrap(),
            Response::Ok(ResponseBody::Status(_))
        ));
        for s in &mut idle[..19] {
            crate::test_support::closed_within(s, Duration::from_secs(5)).await;
        }
        cancel.cancel();
        server.await.unwrap();
        tracker.close();
        tracker.wait().await;
    }

    /// One uid opening idle connections to the agents' socket only ever
    /// holds its share: its oldest are closed for its new ones, and a
    /// request on a new connection is answered.
    #[tokio::test]
    async fn the_agent_socket_bounds_connections_per_uid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/agent.sock");
        let sock = bind_agent(&path).unwrap();
        let (cancel, tracker, server) = serve_bounded(sock);
        let mut idle = Vec::new();
        for _ in 0..6 {
            let mut s = UnixStream::connect(&path).await.unwrap();
            // A partial line is not a request being served.
            s.write_all(b"{\"cmd\":").await.unwrap();
            idle.push(s);
        }
        for _ in 0..3 {
            assert!(matches!(
                call(&path, &Request::Ping {}).await.unwrap(),
                Response::Ok(ResponseBody::Pong { .. })
            ));
        }
        // All but the newest were closed for the newer ones.
        for s in &mut idle[..5] {
            crate::test_support::closed_within(s, Duration::from_secs(5)).await;
        }
        cancel.cancel();
        server.await.unwrap();
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn the_agent_socket_is_open_to_all_but_serves_only_ping_and_ack() {
        let dir = tempfile::tempdir().unwrap();
        // Beside a control socket whose directory is 0750: opened to traversal.
        let control = bind(&dir.path().join("run/control.sock"), None).unwrap();
        let path = dir.path().join("run/agent.sock");
        let sock = bind_agent(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o666);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o007, 0o001, "traversal only, no listing");
        let (cancel, tracker) = (CancellationToken::new(), TaskTracker::new());
        let handler = Arc::new(FakeHandler::default());
        let server = tokio::spawn(serve_with(
            sock,
            handler.clone(),
            cancel.clone(),
            tracker.clone(),
            Limits::default(),
        ));
        assert!(matches!(
            call(&path, &Request::Ping {}).await.unwrap(),
            Response::Ok(ResponseBody::Pong { .. })
        ));
        let ack = |version| Request::Ack {
            agent: AgentId::new("bot").unwrap(),
            credential: CredentialId::new("db").unwrap(),
            version,
        };
        match call(&path, &ack(3)).await.unwrap() {
            Response::Ok(ResponseBody::Ack(r)) => {
                assert_eq!(r.acknowledged, vec!["file:/run/x".to_owned()]);
                assert!(r.retiring);
            }
            other => panic!("{other:?}"),
        }
        let (kind, msg) = error_kind(call(&path, &ack(2)).await.unwrap());
        assert_eq!(kind, ApiErrorKind::Stale, "{msg}");
        // Token exchange is served here, for the peer's agent (root is
        // privileged: it may name one with `as`).
        let exchange = Request::TokenExchange {
            as_agent: None,
            exchange: crate::api::protocol::TokenExchangeArgs {
                subject_token: WireSecret(crate::model::SecretValue::from_string(
                    "SUBJECT-CANARY".into(),
                )),
                subject_token_type: "urn:ietf:params:oauth:token-type:access_token".into(),
                requested_token_type: None,
                scope: None,
                audience: vec![],
                resource: vec![],
                task_id: None,
                actor_token: None,
            },
        };
        assert_eq!(
            call(&path, &exchange).await.unwrap(),
            Response::Ok(ResponseBody::Tasks(Vec::new()))
        );
        // `tasks` lists every agent's tasks: operators only.
        for req in [
            Request::Status {},
            Request::Rotate {
                selector: Selector::All,
                wait: false,
            },
            Request::Tasks {},
        ] {
            let (kind, msg) = error_kind(call(&path, &req).await.unwrap());
            assert_eq!(kind, ApiErrorKind::Forbidden, "{msg}");
            assert!(msg.contains("serves only ping, ack"), "{msg}");
        }
        // Black-box finding: one without its fields got the schema's
        // advice, as if the command could be served here.
        let stream = UnixStream::connect(&path).await.unwrap();
        let mut conn = BufReader::new(stream);
        for line in [
            &b"{\"cmd\":\"rotate\"}\n"[..],
            b"{\"cmd\":\"decommission\",\"agent\":\"bot\"}\n",
        ] {
            let (kind, msg) = error_kind(raw_exchange(&mut conn, line).await);
            assert_eq!(kind, ApiErrorKind::Forbidden, "{msg}");
            assert!(msg.contains("needs the control socket"), "{msg}");
        }
        drop(conn);
        assert!(handler.rotations.lock().unwrap().is_empty());
        cancel.cancel();
        server.await.unwrap();
        tracker.close();
        tracker.wait().await;
        assert!(!path.exists(), "the socket file is removed");
        drop(control);
    }

    #[tokio::test]
    async fn ping_status_and_rotate_through_the_client() {
        let handler = Arc::new(FakeHandler::default());
        let srv = start(handler.clone(), Limits::default());
        let mode = std::fs::metadata(&srv.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660);
        let parent_mode = std::fs::metadata(srv.path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            parent_mode & 0o027,
            0,
            "parent must not be world/group-writable"
        );

        let pong = call(&srv.path, &Request::Ping {}).await.unwrap();
        assert_eq!(
            pong,
            Response::Ok(ResponseBody::Pong {
                version: env!("CARGO_PKG_VERSION").into()
            })
        );

        match call(&srv.path, &Request::Status {}).await.unwrap() {
            Response::Ok(ResponseBody::Status(rows)) => {
                assert_eq!(rows.len(), 1);
                assert_eq!(rows[0].credential.as_str(), "db");
            }
            other => panic!("{other:?}"),
        }

        let req = Request::Rotate {
            selector: Selector::All,
            wait: true,
        };
        match call(&srv.path, &req).await.unwrap() {
            Response::Ok(ResponseBody::Rotate(results)) => {
                assert_eq!(results[0].outcome, RotateOutcome::Completed);
                assert_eq!(results[0].version, Some(3));
            }
            other => panic!("{other:?}"),
        }
        // The handler saw who asked: this test process, by SO_PEERCRED.
        {
            let rotations = handler.rotations.lock().unwrap();
            let me = nix::unistd::getpid().as_raw();
            assert_eq!(rotations.len(), 1);
            assert!(
                matches!(rotations[0].0, Actor::Peer { pid, uid, .. } if pid == me && uid == nix::unistd::geteuid().as_raw()),
                "{:?}",
                rotations[0].0
            );
            assert!(rotations[0].2);
        }

        let req = Request::Rotate {
            selector: Selector::Agent(AgentId::new("ghost").unwrap()),
            wait: false,
        };
        let (kind, msg) = error_kind(call(&srv.path, &req).await.unwrap());
        assert_eq!(kind, ApiErrorKind::NotFound);
        assert!(msg.contains("ghost"));

        let path = srv.path.clone();
        srv.stop().await;
        assert!(
            !path.exists(),
            "socket file must be removed when serve ends"
        );
        let err = call(&path, &Request::Ping {}).await.unwrap_err();
        assert!(matches!(err, ClientError::NotListening { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("no keyturn daemon is listening on"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn bad_input_gets_errors_and_the_server_keeps_serving() {
        let handler = Arc::new(FakeHandler::default());
        let srv = start(handler, Limits::default());

        // Several requests on one connection, good and bad mixed.
        let mut conn = BufReader::new(UnixStream::connect(&srv.path).await.unwrap());
        let (kind, msg) = error_kind(raw_exchange(&mut conn, b"{oops\n").await);
        assert_eq!(kind, ApiErrorKind::BadRequest);
        assert!(msg.contains("malformed JSON"), "{msg}");
        let (kind, msg) = error_kind(raw_exchange(&mut conn, b"{\"cmd\":\"reboot\"}\n").await);
        assert_eq!(kind, ApiErrorKind::BadRequest);
        assert!(
            msg.contains("valid commands: ping, status, rotate"),
            "{msg}"
        );
        let (_, msg) = error_kind(raw_exchange(&mut conn, b"\xff\xfe\n").await);
        assert!(msg.contains("UTF-8"), "{msg}");
        // A blank line is skipped, then the ping is answered.
        let r = raw_exchange(&mut conn, b"\n{\"cmd\":\"ping\"}\r\n").await;
        assert!(
            matches!(r, Response::Ok(ResponseBody::Pong { .. })),
            "{r:?}"
        );

        // An oversized line: one error, then the connection is closed.
        let mut big = BufReader::new(UnixStream::connect(&srv.path).await.unwrap());
        let junk = vec![b'a'; MAX_REQUEST_LINE + 10];
        // The server stops reading after 64 KiB + 1; the write may fail once
        // it closes, which is fine.
        let _ = big.get_mut().write_all(&junk).await;
        let mut line = String::new();
        big.read_line(&mut line).await.unwrap();
        let (kind, msg) = error_kind(serde_json::from_str(&line).unwrap());
        assert_eq!(kind, ApiErrorKind::BadRequest);
        assert!(msg.contains("longer than 65536 bytes"), "{msg}");
        let mut rest = String::new();
        // EOF (or a reset because our unread junk was discarded): closed either way.
        let n = big.read_line(&mut rest).await.unwrap_or(0);
        assert_eq!(n, 0);

        // A line exactly at the limit is still read (and rejected only as JSON).
        let mut edge = BufReader::new(UnixStream::connect(&srv.path).await.unwrap());
        let mut exact = vec![b' '; MAX_REQUEST_LINE - 1];
        exact.push(b'x');
        exact.push(b'\n');
        let (_, msg) = error_kind(raw_exchange(&mut edge, &exact).await);
        assert!(msg.contains("malformed JSON"), "{msg}");

        // A last request without a newline is answered before closing.
        let mut tail = BufReader::new(UnixStream::connect(&srv.path).await.unwrap());
        tail.get_mut()
            .write_all(b"{\"cmd\":\"ping\"}")
            .await
            .unwrap();
        tail.get_mut().shutdown().await.unwrap();
        let mut line = String::new();
        tail.read_line(&mut line).await.unwrap();
        assert!(line.contains("\"pong\""), "{line}");

        // The original connection and new ones still work.
        let r = raw_exchange(&mut conn, b"{\"cmd\":\"status\"}\n").await;
        assert!(matches!(r, Response::Ok(ResponseBody::Status(_))), "{r:?}");
        assert!(matches!(
            call(&srv.path, &Request::Ping {}).await.unwrap(),
            Response::Ok(_)
        ));
        srv.stop().await;
    }

    #[tokio::test]
    async fn a_silent_client_is_timed_out() {
        let limits = Limits {
            read_timeout: Duration::from_millis(100),
            ..Limits::default()
        };
        let srv = start(Arc::new(FakeHandler::default()), limits);
        let mut conn = BufReader::new(UnixStream::connect(&srv.path).await.unwrap());
        conn.get_mut().write_all(b"{\"cmd\":").await.unwrap();
        let mut line = String::new();
        conn.read_line(&mut line).await.unwrap();
        let (kind, msg) = error_kind(serde_json::from_str(&line).unwrap());
        assert_eq!(kind, ApiErrorKind::BadRequest);
        assert!(
            msg.contains("no complete request line within 100ms"),
            "{msg}"
        );
        srv.stop().await;
    }

    #[tokio::test]
    async fn shutdown_finishes_in_flight_requests_and_refuses_new_ones() {
        let handler = Arc::new(FakeHandler {
            rotate_delay: Duration::from_millis(300),
            ..FakeHandler::default()
        });
        let srv = start(handler.clone(), Limits::default());
        let path = srv.path.clone();
        let req = Request::Rotate {
            selector: Selector::All,
            wait: true,
        };
        let in_flight = tokio::spawn({
            let path = path.clone();
            async move { call(&path, &req).await }
        });
        // Wait until the handler is inside `rotate`, then shut down.
        while handler.rotations.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let idle = UnixStream::connect(&path).await.unwrap();
        srv.stop().await;
        let answer = in_flight.await.unwrap().unwrap();
        assert!(
            matches!(answer, Response::Ok(ResponseBody::Rotate(_))),
            "{answer:?}"
        );
        // The idle connection was closed by the shutdown, not left hanging.
        let mut idle = BufReader::new(idle);
        let mut line = String::new();
        assert_eq!(idle.read_line(&mut line).await.unwrap_or(0), 0);
        assert!(matches!(
            call(&path, &Request::Ping {}).await,
            Err(ClientError::NotListening { .. })
        ));
    }

    #[tokio::test]
    async fn bind_replaces_stale_sockets_and_refuses_live_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");

        // Stale: a socket file whose listener is gone.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let live = bind(&path, None).unwrap();

        let err = bind(&path, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(
            err.to_string(),
            format!("another keyturn is running on {}", path.display())
        );
        drop(live);

        // Not a socket: never deleted.
        let file = dir.path().join("notes.txt");
        std::fs::write(&file, "keep me").unwrap();
        let err = bind(&file, None).unwrap_err();
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    }

    #[tokio::test]
    async fn bind_sets_the_group_by_name_or_number() {
        crate::test_support::assert_root("chgrp to another group");
        let dir = tempfile::tempdir().unwrap();
        let nogroup = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(65534))
            .ok()
            .flatten()
            .expect("group 65534 (nogroup) exists");
        let by_name = dir.path().join("a.sock");
        let sock = bind(&by_name, Some(&nogroup.name)).unwrap();
        assert_eq!(sock.gid(), 65534);
        assert_eq!(std::fs::metadata(&by_name).unwrap().gid(), 65534);
        let by_number = dir.path().join("b.sock");
        let sock = bind(&by_number, Some("65534")).unwrap();
        assert_eq!(sock.group_name, nogroup.name);
        assert_eq!(std::fs::metadata(&by_number).unwrap().gid(), 65534);

        let err = bind(&dir.path().join("c.sock"), Some("no-such-group-kt")).unwrap_err();
        assert!(
            err.to_string()
                .contains("`no-such-group-kt` does not exist"),
            "{err}"
        );
        assert!(!dir.path().join("c.sock").exists());
    }

    /// A socket directory keyturn creates belongs to the socket's group
    /// (0750), whatever the umask: otherwise the group's members could not
    /// reach the socket inside it.
    #[tokio::test]
    async fn a_created_socket_directory_gets_the_sockets_group() {
        crate::test_support::assert_root("chgrp to another group");
        let dir = tempfile::tempdir().unwrap();
        let sock_dir = dir.path().join("run").join("keyturn");
        let path = sock_dir.join("control.sock");
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let sock = bind(&path, Some("65534"));
        nix::sys::stat::umask(old);
        let sock = sock.unwrap();
        assert_eq!(sock.gid(), 65534);
        let meta = std::fs::metadata(&sock_dir).unwrap();
        assert_eq!(meta.gid(), 65534, "the socket directory's group");
        assert_eq!(meta.mode() & 0o7777, 0o750, "the socket directory's mode");
        // Directories above it are only passed through.
        let above = std::fs::metadata(dir.path().join("run")).unwrap();
        assert_eq!(above.mode() & 0o7777, 0o755);
    }

    #[test]
    fn peer_policy() {
        let peer = |uid, gid| PeerCred { uid, gid, pid: 42 };
        let (daemon, sock_gid) = (990, 991);
        // root and the daemon's own user always get in.
        assert!(peer_allowed(&peer(0, 5), daemon, sock_gid, &[]));
        assert!(peer_allowed(&peer(990, 5), daemon, sock_gid, &[]));
        // The socket's group, as primary or supplementary group.
        assert!(peer_allowed(&peer(1000, 991), daemon, sock_gid, &[]));
        assert!(peer_allowed(
            &peer(1000, 1000),
            daemon,
            sock_gid,
            &[27, 991]
        ));
        // Anyone else is refused.
        assert!(!peer_allowed(&peer(1000, 1000), daemon, sock_gid, &[]));
        assert!(!peer_allowed(
            &peer(1000, 1000),
            daemon,
            sock_gid,
            &[27, 990]
        ));
        assert!(!peer_allowed(
            &peer(65534, 65534),
            daemon,
            sock_gid,
            &[65534]
        ));
    }

    #[test]
    fn client_errors_say_what_to_do() {
        let p = Path::new("/run/keyturn/control.sock");
        let denied = connect_error(p, io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(
            denied.to_string(),
            "permission denied on /run/keyturn/control.sock: run as root or as a member of the \
             socket's group (the socket's directory cannot be read to say which)"
        );
        let denied = ClientError::PermissionDenied {
            path: p.to_owned(),
            group: Some("keyturn".into()),
        };
        assert_eq!(
            denied.to_string(),
            "permission denied on /run/keyturn/control.sock: run as root, or add the user to the \
             socket's group `keyturn` (usermod -aG keyturn USER) and log in again"
        );
        let refused = connect_error(p, io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(
            refused.to_string(),
            "no keyturn daemon is listening on /run/keyturn/control.sock (is it running? is --config pointing at its config?)"
        );
    }

    const CHILD_ENV: &str = "KEYTURN_TEST_PEER_CHILD_SOCKET";

    /// Runs as uid 65534 in a child process started by
    /// `a_peer_of_another_uid_is_refused_and_audited`; does nothing otherwise.
    #[test]
    #[ignore = "helper process for a_peer_of_another_uid_is_refused_and_audited"]
    fn peer_child_client() {
        let Ok(path) = std::env::var(CHILD_ENV) else {
            return;
        };
        let mut s = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        let _ = s.write_all(b"{\"cmd\":\"status\"}\n");
        let mut line = String::new();
        let _ = std::io::BufReader::new(s).read_line(&mut line);
        println!("CHILD-RESPONSE {}", line.trim_end());
    }

    #[tokio::test]
    async fn a_peer_of_another_uid_is_refused_and_audited() {
        use std::os::unix::process::CommandExt;
        crate::test_support::assert_root("starting a client as uid 65534");
        let handler = Arc::new(FakeHandler::default());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let sock = bind(&path, Some("0")).unwrap();
        // Let the kernel admit uid 65534 so that SO_PEERCRED is what refuses it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let server = tokio::spawn(serve(
            sock,
            handler.clone(),
            cancel.clone(),
            tracker.clone(),
        ));

        // Run a copy of this test binary from the tempdir: the checkout may sit
        // under a directory uid 65534 cannot enter (e.g. /root).
        let exe = dir.path().join("child");
        std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
        let mut cmd = std::process::Command::new(&exe);
        cmd.current_dir(dir.path());
        cmd.args([
            "--exact",
            "api::socket::tests::peer_child_client",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path);
        // SAFETY: only async-signal-safe syscalls run between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setgroups(&[])?;
                nix::unistd::setgid(nix::unistd::Gid::from_raw(65534))?;
                nix::unistd::setuid(nix::unistd::Uid::from_raw(65534))?;
                Ok(())
            });
        }
        // ETXTBSY: another test may fork while our copy's write fd is still
        // open in its not-yet-exec'd child; that clears in a moment.
        let out = tokio::task::spawn_blocking(move || {
            let mut tries = 0;
            loop {
                match cmd.output() {
                    Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    other => return other,
                }
            }
        })
        .await
        .unwrap()
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            // libtest prints `test NAME ... ` on the same line first.
            .find_map(|l| l.split_once("CHILD-RESPONSE ").map(|(_, r)| r))
            .unwrap_or_else(|| {
                panic!(
                    "child printed no response: {stdout}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        let (kind, msg) = error_kind(serde_json::from_str(line).unwrap());
        assert_eq!(kind, ApiErrorKind::Forbidden);
        assert!(msg.contains("uid 65534 is not allowed"), "{msg}");
        // The socket's group is root: joining it is not the advice.
        assert!(msg.contains("the socket's group is `root`"), "{msg}");
        assert!(msg.contains("set `daemon.socket_group`"), "{msg}");
        assert!(!msg.contains("add the user to group `root`"), "{msg}");

        let refused = handler.refused.lock().unwrap().clone();
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0.uid, 65534);
        assert_eq!(refused[0].0.gid, 65534);
        assert_eq!(refused[0].1, msg);
        // The refused peer never reached the handler's commands.
        assert!(handler.rotations.lock().unwrap().is_empty());

        cancel.cancel();
        server.await.unwrap();
        tracker.close();
        tracker.wait().await;
    }
}
