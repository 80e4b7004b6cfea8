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
    #[error("control socket {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("protocol error on {}: {message}", path.display())]
    Protocol { path: PathBuf, message: String },
    #[error(
        "the daemon on {} closed the connection before answering (did it stop? see `keyturn status` and the daemon's log)",
        path.display()
    )]
    Closed { path: PathBuf },
}

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
/// [`CONNECT_TIMEOUT`]; waiting for the answer does not, because
/// `rotate --wait` may legitimately take long.
pub async fn call(path: &Path, req: &Request) -> Result<Response, ClientError> {
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
