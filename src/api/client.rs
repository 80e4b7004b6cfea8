//! The control socket's client: one request, one answer, and an error that
//! tells the operator what to do when there is no answer.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::protocol::{Request, Response};
use super::socket::{CONNECT_TIMEOUT, access_advice, group_name};

/// Why `call` could not get an answer; the text tells the operator what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no keyturn daemon is listening on {} (is it running? is --config pointing at its config?)",
        path.display()
    )]
    NotListening { path: PathBuf },
    #[error("permission denied on {}: {}", path.display(), access_advice(group.as_deref()))]
    PermissionDenied {
        path: PathBuf,
        /// The name (or gid) of the socket file's group, when its metadata
        /// can be read.
        group: Option<String>,
    },
    #[error(
        "timed out after {}s connecting to {}: the daemon is not accepting connections",
        CONNECT_TIMEOUT.as_secs(),
        path.display()
    )]
    ConnectTimeout { path: PathBuf },
    // Not "control socket": the agents' socket gives this too (black-box
    // finding: a `task end` cut off named agent.sock the control socket).
    #[error("socket {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("protocol error on {}: {message}", path.display())]
    Protocol { path: PathBuf, message: String },
    #[error(
        "the daemon on {} closed the connection before answering (did it stop? see `keyturn status` and the daemon's log)",
        path.display()
    )]
    Closed { path: PathBuf },
    #[error(
        "no answer from the daemon on {} within {secs}s: it is overloaded or stuck (stopped, or its disk full: see its log; `systemctl status keyturn`); try again",
        path.display()
    )]
    AnswerTimeout { path: PathBuf, secs: u64 },
}

/// How long a request waits for its answer, but `rotate --wait`, which
/// lasts as long as the rotation: an agent's `ack` or `task` call must not
/// hang for ever on a wedged daemon (a stopped process, a full disk).
pub const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// How long a request the daemon answers from memory waits (`ping`,
/// `status`, `agents`, `tasks`, `surface`). Black-box finding: `status` on
/// a stopped daemon (`kill -STOP`) hung for [`ANSWER_TIMEOUT`], where an
/// operator looking at a wedged daemon wants an answer: `status` then
/// shows the state stored.
pub const QUICK_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

pub(super) fn connect_error(path: &Path, e: io::Error) -> ClientError {
    let path = path.to_owned();
    match e.kind() {
        // A missing file, or a stale socket file nobody accepts on.
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            ClientError::NotListening { path }
        }
        io::ErrorKind::PermissionDenied => {
            let group = std::fs::metadata(&path).ok().map(|m| group_name(m.gid()));
            ClientError::PermissionDenied { path, group }
        }
        _ => ClientError::Io { path, source: e },
    }
}

/// Sends one request and returns the daemon's response (which may itself be
/// an error, e.g. `forbidden` or `not_found`). Connecting times out after
/// [`CONNECT_TIMEOUT`]; waiting for the answer after [`ANSWER_TIMEOUT`],
/// but for `rotate --wait`, which may legitimately take long.
pub async fn call(path: &Path, req: &Request) -> Result<Response, ClientError> {
    let limit = match req {
        Request::Rotate { wait: true, .. } => return exchange(path, req).await,
        Request::Ping {}
        | Request::Status {}
        | Request::Agents {}
        | Request::Tasks {}
        | Request::Surface { .. } => QUICK_ANSWER_TIMEOUT,
        _ => ANSWER_TIMEOUT,
    };
    tokio::time::timeout(limit, exchange(path, req))
        .await
        .map_err(|_| ClientError::AnswerTimeout {
            path: path.to_owned(),
            secs: limit.as_secs(),
        })?
}

async fn exchange(path: &Path, req: &Request) -> Result<Response, ClientError> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(path))
        .await
        .map_err(|_| ClientError::ConnectTimeout {
            path: path.to_owned(),
        })?
        .map_err(|e| connect_error(path, e))?;
    let (read_half, mut write_half) = stream.into_split();

    let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Protocol {
        path: path.to_owned(),
        message: format!("encoding the request: {e}"),
    })?;
    line.push(b'\n');
    // If the daemon refused us it answers and closes without reading, so a
    // failed write is not the end: the answer may already be waiting.
    let write_err = write_half.write_all(&line).await.err();

    let mut reader = BufReader::new(read_half);
    let mut answer = Vec::new();
    let read = reader.read_until(b'\n', &mut answer).await;
    match (read, write_err) {
        (Ok(n), _) if n > 0 => serde_json::from_slice(&answer).map_err(|e| ClientError::Protocol {
            path: path.to_owned(),
            message: format!("invalid response from the daemon: {e}"),
        }),
        (_, Some(e)) | (Err(e), None) => Err(ClientError::Io {
            path: path.to_owned(),
            source: e,
        }),
        (Ok(_), None) => Err(ClientError::Closed {
            path: path.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Defect (black-box): an agent's `keyturn ack` hung for ever on a
    /// daemon that accepted but never answered (stopped with SIGSTOP).
    #[tokio::test(start_paused = true)]
    async fn a_daemon_that_never_answers_is_given_up_on_but_rotate_wait_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wedged.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                open.push(s);
            }
        });
        let ack = Request::Ack {
            agent: crate::model::AgentId::new("bot").unwrap(),
            credential: crate::model::CredentialId::new("db").unwrap(),
            version: 1,
        };
        let started = tokio::time::Instant::now();
        let err = call(&path, &ack).await.unwrap_err();
        assert!(matches!(err, ClientError::AnswerTimeout { .. }), "{err:?}");
        assert_eq!(started.elapsed(), ANSWER_TIMEOUT);
        assert!(
            err.to_string().contains("no answer from the daemon"),
            "{err}"
        );
        // What the daemon answers from memory is given up on sooner
        // (black-box finding: `status` on a stopped daemon hung).
        for quick in [Request::Ping {}, Request::Status {}] {
            let started = tokio::time::Instant::now();
            let err = call(&path, &quick).await.unwrap_err();
            assert!(
                matches!(err, ClientError::AnswerTimeout { secs: 15, .. }),
                "{err:?}"
            );
            assert_eq!(started.elapsed(), QUICK_ANSWER_TIMEOUT);
        }

        let wait = Request::Rotate {
            selector: crate::api::protocol::Selector::All,
            wait: true,
        };
        let waiting = tokio::time::timeout(10 * ANSWER_TIMEOUT, call(&path, &wait)).await;
        assert!(waiting.is_err(), "rotate --wait waits as long as it takes");
        held.abort();
    }
}
