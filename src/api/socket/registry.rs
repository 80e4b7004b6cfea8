//! The sockets' bound on open connections: a registry of them by
//! age and by uid, so a new connection over a bound closes the oldest idle one.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tracing::debug;

/// The most connections the agents' socket holds at once, whatever the
/// descriptor limit (an ack or a task request is one short connection).
pub const MAX_AGENT_CONNECTIONS: usize = 256;

/// The most connections the control socket holds at once.
pub const MAX_CONTROL_CONNECTIONS: usize = 512;

/// A socket's bound on open connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once.
    pub max: usize,
    /// Connections open at once from one uid.
    pub per_uid: usize,
}

impl ConnectionLimits {
    /// For a process allowed `nofile` descriptors: at most an eighth of them
    /// (as the HTTP listener), a quarter of that per uid.
    pub fn for_nofile(nofile: u64) -> ConnectionLimits {
        let share = usize::try_from(nofile / 8).unwrap_or(usize::MAX);
        let max = share.clamp(1, MAX_AGENT_CONNECTIONS);
        ConnectionLimits {
            max,
            per_uid: (max / 4).max(1),
        }
    }

    /// The control socket's: reached only by root, the daemon's user and
    /// the socket's group, whose commands may be long (`rotate --wait`), so
    /// a larger share, [`MAX_CONTROL_CONNECTIONS`] at most, a quarter of it
    /// per uid: one member of the group holding idle connections can take
    /// neither the descriptors the daemon needs nor root's way in.
    pub fn control_for_nofile(nofile: u64) -> ConnectionLimits {
        let share = usize::try_from(nofile / 4).unwrap_or(usize::MAX);
        let max = share.clamp(4, MAX_CONTROL_CONNECTIONS);
        ConnectionLimits {
            max,
            per_uid: (max / 4).max(1),
        }
    }

    /// The open-files limit in force.
    fn nofile() -> u64 {
        use nix::sys::resource::{Resource, getrlimit};
        getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
    }

    /// For the open-files limit in force.
    pub(super) fn for_this_process() -> ConnectionLimits {
        ConnectionLimits::for_nofile(Self::nofile())
    }

    /// The control socket's, for the open-files limit in force.
    pub(super) fn control_for_this_process() -> ConnectionLimits {
        ConnectionLimits::control_for_nofile(Self::nofile())
    }
}

/// A connection of a bounded socket, as the registry sees it.
pub(super) struct Registered {
    pub(super) uid: u32,
    /// Closes the connection between requests.
    pub(super) close: CancellationToken,
    /// Set while a request line is being answered.
    pub(super) serving: Arc<AtomicBool>,
}

/// The open connections of a bounded socket, by age.
#[derive(Default)]
pub(super) struct Registry {
    next_id: u64,
    by_age: BTreeMap<u64, Registered>,
    per_uid: HashMap<u32, usize>,
}

impl Registry {
    /// Makes room for a connection from `uid` (closing the oldest one not
    /// being served, of that uid if it holds its share, else of anyone when
    /// full) and registers it; `None` when there is no room to make.
    pub(super) fn admit(
        &mut self,
        uid: u32,
        limits: ConnectionLimits,
        parent: &CancellationToken,
    ) -> Option<(u64, CancellationToken, Arc<AtomicBool>)> {
        let mine = self.per_uid.get(&uid).copied().unwrap_or(0);
        if mine >= limits.per_uid {
            self.evict(Some(uid))?;
        } else if self.by_age.len() >= limits.max {
            self.evict(None)?;
        }
        let id = self.next_id;
        self.next_id += 1;
        let close = parent.child_token();
        let serving = Arc::new(AtomicBool::new(false));
        self.by_age.insert(
            id,
            Registered {
                uid,
                close: close.clone(),
                serving: Arc::clone(&serving),
            },
        );
        *self.per_uid.entry(uid).or_default() += 1;
        Some((id, close, serving))
    }

    /// Closes the oldest connection (of `uid`, if given) not being served.
    pub(super) fn evict(&mut self, uid: Option<u32>) -> Option<()> {
        let id = self
            .by_age
            .iter()
            .find(|(_, c)| uid.is_none_or(|u| c.uid == u) && !c.serving.load(Ordering::Acquire))
            .map(|(id, _)| *id)?;
        let evicted = self.remove(id)?;
        debug!(
            uid = evicted.uid,
            "agents' socket at its bound; closing an idle connection"
        );
        evicted.close.cancel();
        Some(())
    }

    pub(super) fn remove(&mut self, id: u64) -> Option<Registered> {
        let gone = self.by_age.remove(&id)?;
        if let Some(n) = self.per_uid.get_mut(&gone.uid) {
            *n -= 1;
            if *n == 0 {
                self.per_uid.remove(&gone.uid);
            }
        }
        Some(gone)
    }
}

/// Leaves the registry when its connection ends (however it ends).
pub(super) struct Unregister {
    pub(super) registry: Arc<Mutex<Registry>>,
    pub(super) id: u64,
}

impl Drop for Unregister {
    fn drop(&mut self) {
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.id);
    }
}
