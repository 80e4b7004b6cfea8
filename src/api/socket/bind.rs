//! Binding the sockets: stale files replaced, live ones refused, mode and
//! group set, and the file removed when the server ends.

use std::fmt;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tracing::{info, warn};

use super::{ConnectionLimits, ControlSocket, group_name};

pub(super) fn io_context(e: io::Error, what: impl fmt::Display) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Resolves a group name, or a numeric gid given as a string.
pub fn resolve_group(group: &str) -> io::Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("control socket group `{group}` does not exist (create it or use a gid)"),
        )),
        Err(e) => Err(io::Error::other(format!(
            "looking up control socket group `{group}`: {e}"
        ))),
    }
}

/// Removes a leftover socket file nobody accepts on; refuses to touch
/// anything else.
pub(super) fn clear_stale_socket(path: &Path) -> io::Result<()> {
    let shown = path.display();
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_context(e, format_args!("control socket {shown}"))),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{shown} exists and is not a socket; refusing to replace it \
                 (remove it or set another `daemon.socket`)"
            ),
        ));
    }
    // A blocking connect is fine here: it is a local socket and this runs
    // once at start-up, before anything else is served.
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another keyturn is running on {shown}"),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            info!(socket = %shown, "removing stale control socket");
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_context(
                    e,
                    format_args!("removing stale control socket {shown}"),
                )),
            }
        }
        Err(e) => Err(io_context(
            e,
            format_args!("checking whether a daemon listens on {shown}"),
        )),
    }
}

/// Binds the control socket at `path`: creates the parent directory (0750,
/// the socket's group) if missing, replaces a stale socket, refuses a live one or a non-socket,
/// then sets mode 0660 and, if `group` is given (name or numeric gid), its
/// group. Must be called inside a Tokio runtime.
pub fn bind(path: &Path, group: Option<&str>) -> io::Result<ControlSocket> {
    let shown = path.display();
    // Resolve the group first: a typo should fail before the filesystem changes.
    let wanted_gid = group.map(resolve_group).transpose()?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.exists()
    {
        // 0750 and the socket's group: its members must reach the socket.
        crate::private_file::create_shared_dir(parent, 0o750, wanted_gid).map_err(|e| {
            io_context(
                e,
                format_args!("creating control socket directory {}", parent.display()),
            )
        })?;
    }
    clear_stale_socket(path)?;
    let listener = UnixListener::bind(path)
        .map_err(|e| io_context(e, format_args!("binding control socket {shown}")))?;
    // From here on a failure must not leave our socket file behind.
    let finish = || -> io::Result<ControlSocket> {
        // The socket is created under the umask; chmod sets the mode we mean.
        // The window in between is covered by the parent directory's 0750.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(|e| io_context(e, format_args!("setting mode 0660 on {shown}")))?;
        if let Some(gid) = wanted_gid {
            nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid))).map_err(|e| {
                io_context(
                    io::Error::from(e),
                    format_args!("setting group {gid} on {shown}"),
                )
            })?;
        }
        let meta = std::fs::metadata(path)
            .map_err(|e| io_context(e, format_args!("control socket {shown}")))?;
        let gid = meta.gid();
        let group_name = match group {
            Some(g) if g.parse::<u32>().is_err() => g.to_owned(),
            _ => group_name(gid),
        };
        Ok(ControlSocket {
            listener,
            path: path.to_owned(),
            gid,
            group_name,
            remove: RemoveSocketOnDrop {
                path: path.to_owned(),
                file_id: (meta.dev(), meta.ino()),
            },
            agent: false,
            connections: Some(ConnectionLimits::control_for_this_process()),
        })
    };
    finish().inspect_err(|_| {
        let _ = std::fs::remove_file(path);
    })
}

/// Binds the agents' socket at `path`, mode 0666: agents are not in the
/// control socket's group, and every request on it is authorized by the
/// peer's uid. A missing parent directory is created 0755; an existing one
/// that others cannot traverse (the control socket's 0750 directory, when
/// the agent socket is beside it) is opened to traversal (o+x, never
/// listing) if the daemon owns it, else it is left alone with a warning.
pub fn bind_agent(path: &Path) -> io::Result<ControlSocket> {
    let shown = path.display();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            crate::private_file::create_shared_dir(parent, 0o755, None).map_err(|e| {
                io_context(
                    e,
                    format_args!("creating agent socket directory {}", parent.display()),
                )
            })?;
        }
        let meta = std::fs::metadata(parent).map_err(|e| {
            io_context(
                e,
                format_args!("agent socket directory {}", parent.display()),
            )
        })?;
        let mode = meta.permissions().mode();
        if mode & 0o001 == 0 {
            if meta.uid() == nix::unistd::geteuid().as_raw() {
                std::fs::set_permissions(parent, std::fs::Permissions::from_mode(mode | 0o001))
                    .map_err(|e| {
                        io_context(e, format_args!("letting agents reach {}", parent.display()))
                    })?;
                info!(dir = %parent.display(), "agent socket directory opened to traversal (o+x) so agents reach the agent socket");
            } else {
                warn!(dir = %parent.display(), "agents cannot traverse the agent socket's directory; `keyturn ack` from an agent will fail");
            }
        }
    }
    clear_stale_socket(path)?;
    let listener = UnixListener::bind(path)
        .map_err(|e| io_context(e, format_args!("binding agent socket {shown}")))?;
    let finish = || -> io::Result<ControlSocket> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
            .map_err(|e| io_context(e, format_args!("setting mode 0666 on {shown}")))?;
        let meta = std::fs::metadata(path)
            .map_err(|e| io_context(e, format_args!("agent socket {shown}")))?;
        Ok(ControlSocket {
            listener,
            path: path.to_owned(),
            gid: meta.gid(),
            group_name: group_name(meta.gid()),
            remove: RemoveSocketOnDrop {
                path: path.to_owned(),
                file_id: (meta.dev(), meta.ino()),
            },
            agent: true,
            connections: Some(ConnectionLimits::for_this_process()),
        })
    };
    finish().inspect_err(|_| {
        let _ = std::fs::remove_file(path);
    })
}

/// Removes the socket file when `serve` ends, however it ends (including its
/// future being dropped), but only if the file is still the one we bound.
#[derive(Debug)]
pub(super) struct RemoveSocketOnDrop {
    pub(super) path: PathBuf,
    pub(super) file_id: (u64, u64),
}

impl Drop for RemoveSocketOnDrop {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.file_id
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
