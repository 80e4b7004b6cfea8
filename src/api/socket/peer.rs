//! Who is on the other end of a socket connection (`SO_PEERCRED`), and
//! the access policy of the control socket.

use std::fmt;

use tokio::net::UnixStream;
use tracing::warn;

use crate::audit::Actor;

/// The peer's credentials as the kernel reported them at `connect` time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
}

impl PeerCred {
    /// The audit actor for requests from this peer.
    pub fn actor(&self) -> Actor {
        Actor::Peer {
            uid: self.uid,
            gid: self.gid,
            pid: self.pid,
        }
    }
}

impl fmt::Display for PeerCred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid={} gid={} pid={}", self.uid, self.gid, self.pid)
    }
}

/// The access policy: root, the daemon's own user, the socket's group as
/// primary group, or the socket's group among the supplementary groups.
pub fn peer_allowed(
    peer: &PeerCred,
    daemon_uid: u32,
    sock_gid: u32,
    supplementary: &[u32],
) -> bool {
    peer.uid == 0
        || peer.uid == daemon_uid
        || peer.gid == sock_gid
        || supplementary.contains(&sock_gid)
}

/// Reads the supplementary groups from a `/proc/<pid>/status` text, but only
/// if the process still runs as `uid` (guards against the pid having been
/// reused by another user's process since `connect`). `None` when anything is
/// off; the caller then treats the peer as not a member.
pub(super) fn groups_from_proc_status(status: &str, uid: u32) -> Option<Vec<u32>> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::split_whitespace)
    };
    let mut uids = field("Uid:")?;
    if !uids.any(|u| u.parse::<u32>() == Ok(uid)) {
        return None;
    }
    field("Groups:")?.map(|g| g.parse::<u32>().ok()).collect()
}

pub(super) async fn supplementary_groups(peer: &PeerCred) -> Option<Vec<u32>> {
    if peer.pid <= 0 {
        return None;
    }
    let status = tokio::fs::read_to_string(format!("/proc/{}/status", peer.pid))
        .await
        .ok()?;
    groups_from_proc_status(&status, peer.uid)
}

/// The peer's credentials, or `None` (logged) when they cannot be read.
pub(super) fn peer_of(stream: &UnixStream) -> Option<PeerCred> {
    match stream.peer_cred() {
        Ok(c) => Some(PeerCred {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid().unwrap_or(0),
        }),
        Err(e) => {
            warn!(error = %e, "cannot read the credentials of a control connection; closing it");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supplementary_groups_are_read_from_proc_status() {
        let status = "Name:\tbash\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nGroups:\t4 27 991 \n";
        assert_eq!(
            groups_from_proc_status(status, 1000),
            Some(vec![4, 27, 991])
        );
        // The pid now belongs to another user: not trusted.
        assert_eq!(groups_from_proc_status(status, 1001), None);
        // Malformed or missing lines: not a member of anything.
        assert_eq!(
            groups_from_proc_status("Uid:\t1000\nGroups:\tx\n", 1000),
            None
        );
        assert_eq!(groups_from_proc_status("Uid:\t1000\n", 1000), None);
        assert_eq!(groups_from_proc_status("Groups:\t1\n", 1000), None);
        assert_eq!(
            groups_from_proc_status("Uid:\t7\nGroups:\n", 7),
            Some(vec![])
        );
        // And the real file of this very process parses.
        let me = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(groups_from_proc_status(&me, nix::unistd::getuid().as_raw()).is_some());
    }
}
