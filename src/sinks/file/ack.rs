//! `ack = "open"`: the consumer acknowledges a version by opening the file
//! after keyturn put it in place.
//!
//! Before a delivery writes, an inotify watch goes on the file's directory
//! (not on the file: the atomic rename puts a new inode at the name, and a
//! watch on the file would follow the old one), and events are filtered by
//! the file's name. What happens up to keyturn's own rename
//! (`IN_MOVED_TO`) or, in place, its close after writing (`IN_CLOSE_WRITE`)
//! is keyturn's doing (it opens the file to see whether it already holds the
//! version); the first `IN_OPEN` (or `IN_CLOSE_NOWRITE`) of the name after
//! that is the consumer's. A delivery that finds the file already holding the
//! version writes nothing: then everything queued when it returns was
//! keyturn's, and any open after that counts. A watch ends when the sink
//! starts delivering a newer version, so a watch never outlives its version
//! by more than one delivery. After a restart (or when the directory did not
//! exist before the first delivery) the watch starts when it is asked for, and
//! any open from then on counts.
//!
//! Any process that can open the file acks it: that is the point (the
//! consumer needs no credentials to ack), and the file is readable only by
//! the agent's uid and group anyway.

use std::ffi::OsString;
use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use inotify::{EventMask, Inotify, WatchMask};

use super::*;
use crate::model::VersionNo;
use crate::sinks::AckWatch;

/// The open-ack state of one file sink.
#[derive(Default)]
pub(super) struct OpenAck {
    /// The version being (or last) delivered: a watch of an older one ends.
    current: Arc<AtomicU64>,
    /// The watch of the last delivery, until the engine takes it.
    slot: Mutex<Option<(VersionNo, AckWatch)>>,
}

/// A watch put on the directory before a delivery writes.
pub(super) struct Armed(Option<Inotify>);

fn mask() -> WatchMask {
    WatchMask::OPEN
        | WatchMask::CLOSE_NOWRITE
        | WatchMask::MOVED_TO
        | WatchMask::CLOSE_WRITE
        | WatchMask::ONLYDIR
}

fn watch_dir(path: &Path) -> io::Result<Inotify> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let inotify = Inotify::init()?;
    inotify.watches().add(dir, mask())?;
    Ok(inotify)
}

fn failed(path: &Path, what: &str, e: impl fmt::Display) -> PluginError {
    PluginError::new(
        ErrorKind::Transient,
        format!("file sink {}: {what}: {e}", path.display()),
    )
}

impl OpenAck {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<(VersionNo, AckWatch)>> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Before delivering `version` to `path`: ends the watches of older
    /// versions and watches the directory (if it exists yet).
    pub(super) fn arm(&self, path: &Path, version: VersionNo) -> Armed {
        self.current.store(version, Ordering::SeqCst);
        match watch_dir(path) {
            Ok(i) => Armed(Some(i)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Armed(None),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "file sink: cannot watch for the consumer's open; it can still ack with `keyturn ack`");
                Armed(None)
            }
        }
    }

    /// After `version` was put in place: the watch the engine takes next.
    pub(super) fn delivered(&self, path: &Path, version: VersionNo, armed: Armed) {
        let name = path.file_name().map(OsString::from).unwrap_or_default();
        let watch = match armed.0 {
            Some(mut inotify) => match drain(&mut inotify, &name) {
                Ok(true) => Box::pin(async { Ok(()) }) as AckWatch,
                Ok(false) => self.stream(path, inotify, name, version),
                Err(e) => {
                    let e = failed(path, "reading inotify events", e);
                    Box::pin(async move { Err(e) })
                }
            },
            None => self.starting_now(path, version),
        };
        *self.slot() = Some((version, watch));
    }

    /// The watch of `version`: the delivery's, or one starting now.
    pub(super) fn take(&self, path: &Path, version: VersionNo) -> AckWatch {
        let mut slot = self.slot();
        match slot.take() {
            Some((v, w)) if v == version => w,
            other => {
                *slot = other;
                drop(slot);
                self.starting_now(path, version)
            }
        }
    }

    fn starting_now(&self, path: &Path, version: VersionNo) -> AckWatch {
        // After a restart this sink delivered nothing yet (its `current` is
        // 0): the version asked for is the file's, not one replaced since.
        // A newer one delivered since still ends the watch.
        self.current.fetch_max(version, Ordering::SeqCst);
        let name = path.file_name().map(OsString::from).unwrap_or_default();
        match watch_dir(path) {
            Ok(inotify) => self.stream(path, inotify, name, version),
            Err(e) => {
                let e = failed(path, "watching its directory", e);
                Box::pin(async move { Err(e) })
            }
        }
    }

    /// Resolves at the first open of `name` while `version` is current.
    fn stream(
        &self,
        path: &Path,
        inotify: Inotify,
        name: OsString,
        version: VersionNo,
    ) -> AckWatch {
        let current = self.current.clone();
        let path = path.to_owned();
        Box::pin(async move {
            let mut events = inotify
                .into_event_stream([0u8; 4096])
                .map_err(|e| failed(&path, "watching its directory", e))?;
            while let Some(ev) = events.next().await {
                let ev = ev.map_err(|e| failed(&path, "reading inotify events", e))?;
                if current.load(Ordering::SeqCst) != version {
                    return Err(failed(
                        &path,
                        "open watch",
                        format!("version {version} was replaced before it was opened"),
                    ));
                }
                if ev.name.as_deref() == Some(name.as_os_str())
                    && ev
                        .mask
                        .intersects(EventMask::OPEN | EventMask::CLOSE_NOWRITE)
                {
                    return Ok(());
                }
            }
            Err(failed(&path, "open watch", "inotify stream ended"))
        })
    }
}

/// Reads what is queued right after a delivery. Returns whether the
/// consumer already opened the file after keyturn's rename or in-place
/// write.
fn drain(inotify: &mut Inotify, name: &OsStr) -> io::Result<bool> {
    let mut buf = [0u8; 4096];
    let mut written = false;
    loop {
        let events = match inotify.read_events(&mut buf) {
            Ok(ev) => ev,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        };
        let mut any = false;
        for ev in events {
            any = true;
            if ev.name != Some(name) {
                continue;
            }
            if ev
                .mask
                .intersects(EventMask::MOVED_TO | EventMask::CLOSE_WRITE)
            {
                written = true;
            } else if written
                && ev
                    .mask
                    .intersects(EventMask::OPEN | EventMask::CLOSE_NOWRITE)
            {
                return Ok(true);
            }
        }
        if !any {
            return Ok(false);
        }
    }
}
