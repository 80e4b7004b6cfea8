//! Appending to the audit log: recovery of the tail on open, and the writer
//! thread that group-commits appends.
//!
//! Why a dedicated thread: an append is acknowledged only once it is fsynced,
//! and an fsync blocks for milliseconds. One OS thread owns the file; callers
//! (async tasks or blocking code) queue events on a channel. The thread takes
//! everything queued, writes all the lines with one `write`, fsyncs once and
//! then answers each caller with the head after *its* record. Under load the
//! cost of an fsync is shared by every append waiting for it.
//!
//! A caller that knows it will make the log durable a moment later (the
//! rotation engine, recording a step whose replay is harmless: see
//! `rotation/steps.rs`) appends with [`AuditLog::append_unsynced`]: the line
//! is written at once (so it survives `kill -9`, and keeps its place in the
//! chain) but not fsynced; the next fsync of the file, by any later append or
//! [`AuditLog::sync`], covers it. Such a record is not acknowledged as
//! durable, and its head must not be stored in the state database until
//! [`AuditLog::synced_seq`] has passed it (`Inner::persist` enforces that).

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(test)]
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use chrono::{SecondsFormat, Utc};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use super::{AuditError, AuditEvent, AuditKey, AuditRecord, Chain, GENESIS};
use crate::group_commit::{Flow, GroupCommit};
use crate::private_file;
use crate::state::AuditHead;

/// Most appends written under one fsync; bounds the latency of the first caller.
const MAX_BATCH: usize = 4096;
/// How much of the file is read at a time when walking back from its end.
const TAIL_CHUNK: u64 = 64 * 1024;

/// The hash a record is known by: SHA-256 of its line, without the newline.
pub(crate) fn line_hash(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

/// The link to `line` of the kind `chain`: what a record of that kind
/// carries as `prev` for it, and the head after a record of that kind.
/// `None` for a keyed link without the key.
pub(crate) fn link_as(chain: Option<Chain>, key: Option<&AuditKey>, line: &[u8]) -> Option<String> {
    match chain {
        None => Some(line_hash(line)),
        Some(Chain::HmacSha256) => key.map(|k| k.link(line)),
    }
}

/// The kind of link a writer with `key` makes.
fn chain_of(key: Option<&AuditKey>) -> Option<Chain> {
    key.map(|_| Chain::HmacSha256)
}

/// The head of an empty log: what the first record points back to.
fn genesis_head() -> AuditHead {
    AuditHead {
        seq: 0,
        hash: GENESIS.to_owned(),
    }
}

type Reply = oneshot::Sender<Result<AuditHead, AuditError>>;

/// Called (on the writer's thread) when something else wrote to the log
/// while keyturn runs: see [`AuditLog::on_foreign_write`].
type ForeignHook = Arc<std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>>;

enum Msg {
    /// An event, and whether it must be durable before it is answered.
    Append(Box<AuditEvent>, Reply, bool),
    /// Make every line written so far durable; answered with the head.
    Sync(Reply),
    Close(oneshot::Sender<()>),
    /// Tests: block the writer until the sender is dropped, so appends queue up.
    #[cfg(test)]
    /// The writer says it is holding, then waits for the release.
    Hold(mpsc::Sender<()>, mpsc::Receiver<()>),
}

/// A cheap, cloneable handle to the audit log's writer thread.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    path: String,
    server: GroupCommit<Msg>,
    /// The head after the last acknowledged append (seq 0 and [`GENESIS`] when empty).
    head: Arc<Mutex<AuditHead>>,
    fsyncs: Arc<AtomicU64>,
    /// The seq of the last record known durable (fsynced).
    synced: Arc<AtomicU64>,
    /// The records found at open after the head the state database stored
    /// (first and last seq): see [`AuditLog::unconfirmed_at_open`].
    unconfirmed: Option<(u64, u64)>,
    /// See [`AuditLog::foreign_at_open`].
    foreign: Option<String>,
    on_foreign: ForeignHook,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.inner.path)
            .field("head", &self.head())
            .finish()
    }
}

impl AuditLog {
    /// Opens the log, creating it (0600, parent 0700) if missing, recovers
    /// the last record from the end of the file and starts the writer thread.
    ///
    /// A partial last line (the process died mid-write, so the append was
    /// never acknowledged) is cut off. A log whose end is *behind*
    /// `head_in_state` — fewer records, or a different record at that seq — was
    /// truncated or altered, and is refused: continuing would chain new
    /// records onto a tampered history.
    pub fn open(path: &Path, head_in_state: Option<&AuditHead>) -> Result<AuditLog, AuditError> {
        Self::open_with(path, head_in_state, false, None)
    }

    /// [`open`](Self::open), keyed when `key` is given: every record it
    /// appends links to the one before with HMAC-SHA256 under the key and
    /// says so (`"chain":"hmac-sha256"`). A plain log continues keyed; a
    /// keyed log without the key is refused ([`AuditError::NoKey`]).
    pub fn open_keyed(
        path: &Path,
        head_in_state: Option<&AuditHead>,
        key: Option<AuditKey>,
    ) -> Result<AuditLog, AuditError> {
        Self::open_with(path, head_in_state, false, key)
    }

    /// [`open`](Self::open), but every append is written and fsynced on the
    /// caller's thread before it returns, with no writer thread (engine tests
    /// under `tokio::time::pause()`: waiting on a thread would let the
    /// paused clock jump ahead).
    pub fn open_inline(
        path: &Path,
        head_in_state: Option<&AuditHead>,
    ) -> Result<AuditLog, AuditError> {
        Self::open_with(path, head_in_state, true, None)
    }

    fn open_with(
        path: &Path,
        head_in_state: Option<&AuditHead>,
        inline: bool,
        key: Option<AuditKey>,
    ) -> Result<AuditLog, AuditError> {
        let display = path.display().to_string();
        let io = |what: &str, e: std::io::Error| AuditError::Io {
            path: display.clone(),
            message: format!("{what}: {e}"),
        };
        private_file::create_parent(path).map_err(|e| io("cannot create its directory", e))?;
        let existed = path.exists();
        // O_APPEND: every write lands at the end, whatever the offset, so a
        // stray second writer can interleave lines but never overwrite them.
        let file = private_file::open_options()
            .read(true)
            .append(true)
            .open(path)
            .map_err(|e| io("cannot open", e))?;
        if !existed {
            // Make the new directory entry durable too.
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                File::open(parent)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| io("cannot fsync its directory", e))?;
            }
        }

        let (head, foreign) = match recover_tail(&file, &display, head_in_state, key.as_ref()) {
            Ok(found) => found,
            Err(e) => {
                // Black-box finding: a refused start left an empty log it
                // had created, which then looked like a log lost since.
                if !existed {
                    let _ = std::fs::remove_file(path);
                }
                return Err(e);
            }
        };
        let unconfirmed = head_in_state
            .filter(|stored| stored.seq > 0 && head.seq > stored.seq)
            .map(|stored| (stored.seq + 1, head.seq));
        // After recovery (which may cut a torn tail): what keyturn wrote.
        let len = file.metadata().map_err(|e| io("cannot stat", e))?.len();
        let head = Arc::new(Mutex::new(head));
        let fsyncs = Arc::new(AtomicU64::new(0));
        // What is in the file at open is durable: recovery fsyncs what it cuts,
        // and appends before a restart were acknowledged or replayed.
        let synced = Arc::new(AtomicU64::new(lock(&head).seq));
        let on_foreign: ForeignHook = Arc::default();
        let mut writer = Writer {
            on_foreign: Arc::clone(&on_foreign),
            path: display.clone(),
            file_path: path.to_owned(),
            file,
            head: Arc::clone(&head),
            fsyncs: Arc::clone(&fsyncs),
            synced: Arc::clone(&synced),
            unsynced: false,
            failed: None,
            cut_to: None,
            key,
            displaced_logged: false,
            len,
        };
        let serve = move |batch: &mut Vec<Msg>| writer.serve(batch);
        let server = if inline {
            GroupCommit::inline(serve)
        } else {
            GroupCommit::spawn_lingering(
                "keyturn-audit",
                MAX_BATCH,
                crate::group_commit::FSYNC_LINGER,
                &crate::group_commit::BUSY,
                serve,
            )
            .map_err(|e| io("cannot start the writer thread", e))?
        };
        Ok(AuditLog {
            inner: Arc::new(Inner {
                path: display,
                server,
                head,
                fsyncs,
                synced,
                unconfirmed,
                foreign,
                on_foreign,
            }),
        })
    }

    /// Runs `hook` each time the writer finds that something else wrote
    /// to (or cut) the log while keyturn runs. Black-box finding: that was
    /// only logged, and `keyturn_audit_chain_intact` stayed 1 (no alert)
    /// until a restart checked the chain. Set once; later calls are ignored.
    pub fn on_foreign_write(&self, hook: impl Fn() + Send + Sync + 'static) {
        let _ = self.inner.on_foreign.set(Box::new(hook));
    }

    /// The records (first and last seq) the log held at open after the
    /// head the state database had stored. The state lags the log by the
    /// records of a batch whose head was not stored yet when the daemon
    /// stopped (kill -9, power loss), so they are no proof of tampering; but
    /// nothing vouches for them either (without an audit key, anyone who can
    /// write the log can append a record that chains), so the daemon says so
    /// in the log before chaining onto them.
    pub fn unconfirmed_at_open(&self) -> Option<(u64, u64)> {
        self.inner.unconfirmed
    }

    /// Bytes after the last record at open that no crash can have left
    /// (see `end_partial_line`): what they are and where. The daemon
    /// records it as `audit.foreign_write` before anything else.
    pub fn foreign_at_open(&self) -> Option<&str> {
        self.inner.foreign.as_deref()
    }

    /// Appends one record; returns once it is written and fsynced, with the
    /// head after it (the caller persists it in the state database).
    pub async fn append(&self, ev: AuditEvent) -> Result<AuditHead, AuditError> {
        let rx = self.send(ev, true)?;
        rx.await.map_err(|_| self.closed())?
    }

    /// Appends one record without waiting for an fsync: returns once the
    /// line is written (it survives the process being killed, not a power
    /// cut), with the head after it. The record becomes durable with the
    /// next fsync of the log: a later [`append`](Self::append) or
    /// [`sync`](Self::sync). Until then its head must not be stored in the
    /// state database (a stored head the disk lacks reads as truncation).
    pub async fn append_unsynced(&self, ev: AuditEvent) -> Result<AuditHead, AuditError> {
        let rx = self.send(ev, false)?;
        rx.await.map_err(|_| self.closed())?
    }

    /// Makes every record written so far durable (one fsync, none if they
    /// already are); returns the head after the last of them.
    pub async fn sync(&self) -> Result<AuditHead, AuditError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .server
            .submit(Msg::Sync(tx))
            .map_err(|_| self.closed())?;
        rx.await.map_err(|_| self.closed())?
    }

    /// The seq of the last record known to be on disk.
    pub fn synced_seq(&self) -> u64 {
        self.inner.synced.load(Ordering::Acquire)
    }

    /// [`append`](Self::append) for blocking code. Must not be called from
    /// an async task (it blocks the thread); `spawn_blocking` threads are fine.
    pub fn append_blocking(&self, ev: AuditEvent) -> Result<AuditHead, AuditError> {
        let rx = self.send(ev, true)?;
        rx.blocking_recv().map_err(|_| self.closed())?
    }

    /// Whether a record after seq `after` is one `wanted` picks. Reads the
    /// log back from its end to `after` (a short walk when `after` is
    /// recent), skipping a line that does not parse (one being written).
    /// Blocking: for `spawn_blocking`.
    pub fn find_after(
        &self,
        after: u64,
        wanted: impl Fn(&AuditRecord) -> bool,
    ) -> Result<bool, AuditError> {
        let io = |what: &str, e: std::io::Error| AuditError::Io {
            path: self.inner.path.clone(),
            message: format!("{what}: {e}"),
        };
        let file = File::open(&self.inner.path).map_err(|e| io("cannot open", e))?;
        let len = file.metadata().map_err(|e| io("cannot stat", e))?.len();
        let mut lines = RevLines::new(&file, len);
        while let Some((_, line)) = lines.prev().map_err(|e| io("cannot read", e))? {
            let Ok(record) = serde_json::from_slice::<AuditRecord>(&line) else {
                continue;
            };
            if record.seq <= after {
                break;
            }
            if wanted(&record) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The head after the last acknowledged append; seq 0 and [`GENESIS`]
    /// for an empty log.
    pub fn head(&self) -> AuditHead {
        lock(&self.inner.head).clone()
    }

    /// How many fsyncs the writer has done (group commit makes this far
    /// smaller than the number of appends under load). Also a useful metric.
    pub fn fsync_count(&self) -> u64 {
        self.inner.fsyncs.load(Ordering::Relaxed)
    }

    pub fn path(&self) -> &str {
        &self.inner.path
    }

    /// Lets the appends queued before it finish, then stops the writer.
    /// Later appends (from any clone) fail with [`AuditError::Closed`].
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.server.submit(Msg::Close(tx)).is_ok() {
            // An Err means the writer is already gone: closed either way.
            let _ = rx.await;
        }
    }

    fn send(
        &self,
        ev: AuditEvent,
        durable: bool,
    ) -> Result<oneshot::Receiver<Result<AuditHead, AuditError>>, AuditError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .server
            .submit(Msg::Append(Box::new(ev), tx, durable))
            .map_err(|_| self.closed())?;
        Ok(rx)
    }

    fn closed(&self) -> AuditError {
        AuditError::Closed {
            path: self.inner.path.clone(),
        }
    }

    /// Returns once the writer is held (alone in its batch, so everything
    /// sent after this is queued behind it); dropping the sender releases it.
    #[cfg(test)]
    fn hold(&self) -> mpsc::Sender<()> {
        let (tx, rx) = mpsc::channel();
        let (held_tx, held_rx) = mpsc::channel();
        let _ = self.inner.server.submit(Msg::Hold(held_tx, rx));
        held_rx.recv().expect("the writer holds");
        tx
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What one batch asks of the writer.
#[derive(Default)]
struct Batch {
    appends: Vec<(Box<AuditEvent>, Reply)>,
    syncs: Vec<Reply>,
    /// Some caller needs its record (or everything written) on disk.
    durable: bool,
}

/// The thread that owns the file.
struct Writer {
    path: String,
    /// `path` as opened (`path` is its display form).
    file_path: std::path::PathBuf,
    file: File,
    head: Arc<Mutex<AuditHead>>,
    fsyncs: Arc<AtomicU64>,
    synced: Arc<AtomicU64>,
    /// Lines were written since the last fsync.
    unsynced: bool,
    /// Set after an fsync failed: the kernel may have dropped the dirty pages,
    /// so nothing about the file's content can be trusted any more.
    failed: Option<String>,
    /// A write failed and what part of it reached the file could not be cut
    /// off then (the file made immutable or read-only, say): the length to
    /// cut it back to, and why the write failed. Tried again before the next
    /// append, which goes on once it works (black-box finding: this was
    /// taken for a failed fsync, and only a restart brought appends back).
    cut_to: Option<(u64, String)>,
    /// Keys the chain; never leaves this thread.
    key: Option<AuditKey>,
    /// The file at `path` was found not to be the open one (logged once).
    displaced_logged: bool,
    /// The file's length as keyturn left it: another length at the next
    /// batch means something else wrote to it (or cut it).
    len: u64,
    on_foreign: ForeignHook,
}

impl Writer {
    /// One batch, in order: appends are written together (one write, one
    /// fsync); a close answers once the appends before it are done, and
    /// refuses the rest.
    fn serve(&mut self, msgs: &mut Vec<Msg>) -> Flow {
        let mut batch = Batch::default();
        for msg in msgs.drain(..) {
            match msg {
                Msg::Append(ev, reply, durable) => {
                    batch.durable |= durable;
                    batch.appends.push((ev, reply));
                }
                Msg::Sync(reply) => {
                    batch.durable = true;
                    batch.syncs.push(reply);
                }
                Msg::Close(reply) => {
                    // Whatever was written unsynced is made durable too.
                    batch.durable = true;
                    self.commit(std::mem::take(&mut batch));
                    let _ = reply.send(());
                    // What follows in `msgs` is dropped: those callers are
                    // told the log is closed.
                    return Flow::Stop;
                }
                #[cfg(test)]
                Msg::Hold(held, release) => {
                    self.commit(std::mem::take(&mut batch));
                    let _ = held.send(());
                    let _ = release.recv();
                }
            }
        }
        self.commit(batch);
        Flow::Continue
    }

    /// Answers every append and sync of a batch with `message`'s error.
    fn refuse(&self, appends: Vec<(Box<AuditEvent>, Reply)>, syncs: Vec<Reply>, message: &str) {
        for (_, reply) in appends {
            let _ = reply.send(Err(self.io_err(message)));
        }
        for reply in syncs {
            let _ = reply.send(Err(self.io_err(message)));
        }
    }

    /// Writes the batch's lines with one `write`; fsyncs once if any of its
    /// callers needs durability (covering lines written unsynced before);
    /// then answers each.
    fn commit(&mut self, batch: Batch) {
        let Batch {
            appends: batch,
            syncs,
            durable,
        } = batch;
        if batch.is_empty() && syncs.is_empty() && !(durable && self.unsynced) {
            return;
        }
        if let Some((len, why)) = self.cut_to.take() {
            match self.file.set_len(len).and_then(|()| self.file.sync_data()) {
                Ok(()) => {
                    self.len = len;
                    tracing::info!(path = %self.path, "audit log: the partial write of an earlier failed append is cut off; appending again");
                }
                Err(e) => {
                    let message = format!(
                        "{why}; and its partial write still cannot be cut off: {e} (fix that: free space, the file's attributes or permissions; keyturn goes on by itself)"
                    );
                    self.refuse(batch, syncs, &message);
                    self.cut_to = Some((len, why));
                    return;
                }
            }
        }
        if let Some(why) = &self.failed {
            let message = format!(
                "an earlier fsync (or the cut of a failed write) failed ({why}); restart keyturn"
            );
            self.refuse(batch, syncs, &message);
            return;
        }
        let mut batch = batch;
        // One fstat (needed for the length anyway) and one stat a batch.
        let opened = self.file.metadata();
        if let Some(message) = opened.as_ref().ok().and_then(|m| self.displaced(m)) {
            self.refuse(batch, syncs, &message);
            return;
        }
        let len_before = opened.map(|m| m.len());
        let mut buf = Vec::with_capacity(batch.len() * 256);
        if let Ok(len) = len_before
            && len != self.len
            && !batch.is_empty()
        {
            self.foreign_write(len, &mut batch, &mut buf);
        }
        let before = lock(&self.head).clone();
        let ts = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        let mut head = before.clone();
        let mut replies = Vec::with_capacity(batch.len());
        for (ev, reply) in batch {
            let record = AuditRecord {
                seq: head.seq + 1,
                ts: ts.clone(),
                prev: head.hash.clone(),
                chain: chain_of(self.key.as_ref()),
                event: *ev,
            };
            match serde_json::to_vec(&record) {
                Ok(line) => {
                    head = AuditHead {
                        seq: record.seq,
                        hash: writer_link(self.key.as_ref(), &line),
                    };
                    buf.extend_from_slice(&line);
                    buf.push(b'\n');
                    replies.push((reply, head.clone()));
                }
                Err(e) => {
                    let _ = reply.send(Err(self.io_err(&format!("cannot encode record: {e}"))));
                }
            }
        }
        if replies.is_empty() && !(durable && self.unsynced) {
            // Nothing written and nothing to make durable.
            for reply in syncs {
                let _ = reply.send(Ok(before.clone()));
            }
            return;
        }
        let written = if buf.is_empty() {
            Ok(())
        } else {
            self.file.write_all(&buf)
        };
        if let Err(e) = written {
            // Take back whatever part of the batch reached the file, so the
            // chain continues from the last acknowledged record.
            let message = format!("cannot write: {e}");
            match len_before {
                Ok(len) => {
                    if let Err(e2) = self.file.set_len(len).and_then(|()| self.file.sync_data()) {
                        tracing::error!(path = %self.path, error = %e2, "audit log: cannot cut off the partial write of a failed append; tried again before the next one");
                        self.cut_to = Some((len, message.clone()));
                    }
                }
                // Its length unknown, what reached the file cannot be cut.
                Err(e2) => {
                    self.failed = Some(format!(
                        "{message}; and cannot read the file's length to cut the partial write: {e2}"
                    ));
                }
            }
            for (reply, _) in replies {
                let _ = reply.send(Err(self.io_err(&message)));
            }
            for reply in syncs {
                let _ = reply.send(Err(self.io_err(&message)));
            }
            return;
        }
        if let Ok(len) = len_before {
            self.len = len + buf.len() as u64;
        }
        if !durable {
            self.unsynced = true;
            *lock(&self.head) = head;
            for (reply, head) in replies {
                let _ = reply.send(Ok(head));
            }
            return;
        }
        // fdatasync: the size change is metadata it covers; mtime is not needed.
        let synced = self.file.sync_data();
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = synced {
            let message = format!("cannot fsync: {e}");
            tracing::error!(path = %self.path, error = %e, "audit log fsync failed; refusing further appends");
            self.failed = Some(message.clone());
            for (reply, _) in replies {
                let _ = reply.send(Err(self.io_err(&message)));
            }
            for reply in syncs {
                let _ = reply.send(Err(self.io_err(&message)));
            }
            return;
        }
        self.unsynced = false;
        self.synced.store(head.seq, Ordering::Release);
        *lock(&self.head) = head.clone();
        for (reply, head) in replies {
            let _ = reply.send(Ok(head));
        }
        for reply in syncs {
            let _ = reply.send(Ok(head.clone()));
        }
    }

    /// Why the file at `path` is no longer the one this writer has open
    /// (moved, deleted or replaced while the daemon runs), if it is not:
    /// records appended to the open file would then go unseen (to a renamed
    /// file, or lost with a deleted one). Logged once, at the first batch
    /// that finds it; appends fail until the file is back, as on a full disk.
    fn displaced(&mut self, open: &std::fs::Metadata) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let why = match std::fs::metadata(&self.file_path) {
            Ok(m) if m.dev() == open.dev() && m.ino() == open.ino() => None,
            Ok(_) => {
                Some("is not the file keyturn opened (it was moved or replaced while keyturn runs)")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Some("is gone (moved or deleted while keyturn runs)")
            }
            // Cannot tell (permissions): the open file is still written.
            Err(_) => None,
        };
        let Some(why) = why else {
            if std::mem::take(&mut self.displaced_logged) {
                tracing::info!(path = %self.path, "the audit log keyturn opened is back at its path: appends go on");
            }
            return None;
        };
        if !std::mem::replace(&mut self.displaced_logged, true) {
            tracing::error!(path = %self.path, pid = std::process::id(), "the audit log {why}: appends fail (steps are retried) until the file keyturn opened is back at {}; move it back; a deleted one: copy it from /proc/PID/fd while keyturn runs, then restart (see the runbook KeyturnAuditAppendFailing); never start over with a new, empty log", self.path);
        }
        Some(format!(
            "{} {why}; put the file keyturn opened back there",
            self.path
        ))
    }

    /// The file is `len` bytes where keyturn left it at `self.len`:
    /// something else appended to it (or cut it) while keyturn runs. Its
    /// bytes are not keyturn's records, and `audit verify` stops at them;
    /// nothing else would notice. So it is said loudly: an error logged
    /// and an `audit.foreign_write` record first in this batch (started on
    /// a line of its own when the foreign bytes end mid-line), which names
    /// the byte range. The chain goes on from keyturn's last record.
    fn foreign_write(
        &mut self,
        len: u64,
        batch: &mut Vec<(Box<AuditEvent>, Reply)>,
        buf: &mut Vec<u8>,
    ) {
        use super::{Actor, Outcome};
        let what = if len > self.len {
            format!(
                "{} byte(s) at offset {}..{} were written to the audit log by something other than keyturn while it runs: they are no records of keyturn's (`keyturn audit verify` stops at them); find who can write {}",
                len - self.len,
                self.len,
                len,
                self.path
            )
        } else {
            format!(
                "the audit log was cut from {} to {len} bytes by something other than keyturn while it runs: records keyturn wrote are gone (`keyturn audit verify` fails); restore them from a backup",
                self.len
            )
        };
        tracing::error!(path = %self.path, "{what}");
        if let Some(hook) = self.on_foreign.get() {
            hook();
        }
        let mut last = [0u8; 1];
        if len > 0 && self.file.read_at(&mut last, len - 1).is_ok() && last[0] != b'\n' {
            buf.push(b'\n');
        }
        let mut ev = AuditEvent::new("audit.foreign_write", Actor::Daemon, Outcome::Failed);
        ev.error = Some(what);
        // No caller waits for this record.
        let (reply, _) = oneshot::channel();
        batch.insert(0, (Box::new(ev), reply));
        self.len = len;
    }

    fn io_err(&self, message: &str) -> AuditError {
        AuditError::Io {
            path: self.path.clone(),
            message: message.to_owned(),
        }
    }
}

/// Reads lines from the end of a file towards its start, a chunk at a time,
/// so recovering the head of a large log reads only its tail.
pub(super) struct RevLines<'a> {
    file: &'a File,
    /// File offset of `buf[0]`.
    start: u64,
    /// File bytes `[start, end of the not-yet-returned region)`.
    buf: Vec<u8>,
    exhausted: bool,
}

impl<'a> RevLines<'a> {
    /// `end`: the offset just past the region to walk (exclusive).
    pub(super) fn new(file: &'a File, end: u64) -> Self {
        Self {
            file,
            start: end,
            buf: Vec::new(),
            exhausted: false,
        }
    }

    /// The previous line (without its newline) and its file offset.
    pub(super) fn prev(&mut self) -> std::io::Result<Option<(u64, Vec<u8>)>> {
        if self.exhausted {
            return Ok(None);
        }
        loop {
            if let Some(i) = self.buf.iter().rposition(|&b| b == b'\n') {
                let line = self.buf.split_off(i + 1);
                self.buf.truncate(i);
                return Ok(Some((self.start + i as u64 + 1, line)));
            }
            if self.start == 0 {
                self.exhausted = true;
                return Ok(Some((0, std::mem::take(&mut self.buf))));
            }
            let n = TAIL_CHUNK.min(self.start);
            let from = self.start - n;
            // n <= TAIL_CHUNK, so the cast cannot truncate.
            let mut chunk = vec![0u8; n as usize];
            self.file.read_exact_at(&mut chunk, from)?;
            chunk.extend_from_slice(&self.buf);
            self.buf = chunk;
            self.start = from;
        }
    }
}

/// The link a writer with `key` makes to `line`: the next record's `prev`.
pub(super) fn writer_link(key: Option<&AuditKey>, line: &[u8]) -> String {
    match key {
        Some(k) => k.link(line),
        None => line_hash(line),
    }
}

/// Finds the last record, cuts a partial last line, and checks the file is
/// not behind the head the state database remembers. Each link is checked
/// as the record carrying it says (plain or keyed); the head returned is
/// the link the next record (written with `key`) points back with.
fn recover_tail(
    file: &File,
    path: &str,
    head_in_state: Option<&AuditHead>,
    key: Option<&AuditKey>,
) -> Result<(AuditHead, Option<String>), AuditError> {
    let io = |what: &str, e: std::io::Error| AuditError::Io {
        path: path.to_owned(),
        message: format!("{what}: {e}"),
    };
    let tampered = |message: String| AuditError::Tampered {
        path: path.to_owned(),
        message,
    };
    let len = file.metadata().map_err(|e| io("cannot stat", e))?.len();
    // `kept`: the file's length without a partial last line.
    let (mut lines, kept) = if len == 0 {
        (RevLines::new(file, 0), 0)
    } else {
        let mut last = [0u8; 1];
        file.read_exact_at(&mut last, len - 1)
            .map_err(|e| io("cannot read", e))?;
        if last[0] == b'\n' {
            (RevLines::new(file, len - 1), len)
        } else {
            let mut lines = RevLines::new(file, len);
            let (offset, _partial) = lines
                .prev()
                .map_err(|e| io("cannot read", e))?
                .unwrap_or_default();
            (lines, offset)
        }
    };

    let state_head = head_in_state.filter(|h| h.seq > 0);
    let last_line = match lines.prev().map_err(|e| io("cannot read", e))? {
        Some((_, line)) if kept > 0 => Some(line),
        _ => None,
    };
    let Some(last_line) = last_line else {
        return match state_head {
            None => end_partial_line(file, path, len, kept, 1).map(|f| (genesis_head(), f)),
            Some(h) => Err(tampered(format!(
                "the log is empty or missing but the state database records seq {}: the audit log was lost, truncated or altered. Restore it from a backup",
                h.seq
            ))),
        };
    };
    // Black-box finding: whole lines someone appended while keyturn was
    // stopped (`echo ... >> audit.log`) made the start refuse the log,
    // where the same bytes without a newline were kept and reported. The
    // last record before them is the log's end; they are kept and
    // reported as `audit.foreign_write` (`foreign_lines`: where they are).
    let mut last_line = last_line;
    let mut foreign_lines = None;
    let last = match parse_seq_prev(&last_line) {
        Some(last) => last,
        None => {
            let mut found = None;
            for _ in 0..MAX_FOREIGN_LINES {
                match lines.prev().map_err(|e| io("cannot read", e))? {
                    Some((at, line)) => {
                        if let Some(parsed) = parse_seq_prev(&line) {
                            found = Some((at + line.len() as u64 + 1, line, parsed));
                            break;
                        }
                    }
                    None => break,
                }
            }
            let Some((end, line, parsed)) = found else {
                return Err(tampered(
                    "its last line is not a valid record: the audit log was altered".into(),
                ));
            };
            foreign_lines = Some(format!(
                "{} byte(s) at offset {end}..{kept}, after the last record, are whole lines keyturn did not write (written while it was stopped): they are kept as they are (`keyturn audit verify` stops at them); find who can write {path}",
                kept - end
            ));
            last_line = line;
            parsed
        }
    };
    // What is reported of the bytes after the last record.
    let report = |partial: Option<String>| match (foreign_lines.clone(), partial) {
        (Some(a), Some(b)) => Some(format!("{a}; and {b}")),
        (a, b) => a.or(b),
    };
    let no_key = |seq: u64| AuditError::NoKey {
        path: path.to_owned(),
        seq,
    };
    // The link of a line as the record after it (of kind `chain`) checks it.
    let link = |chain: Option<Chain>, seq: u64, line: &[u8]| {
        link_as(chain, key, line).ok_or_else(|| no_key(seq))
    };
    // Without the key the last record's link cannot be checked, and plain
    // records after keyed ones would be a downgrade.
    let own = link(last.2, last.0, &last_line)?;
    let head = AuditHead {
        seq: last.0,
        hash: writer_link(key, &last_line),
    };
    let Some(want) = state_head else {
        return end_partial_line(file, path, len, kept, head.seq + 1).map(|f| (head, report(f)));
    };
    if want.seq > head.seq {
        return Err(tampered(format!(
            "it ends at seq {} but the state database records seq {}: the audit log was truncated or altered",
            head.seq, want.seq
        )));
    }
    // Walk back to the record at the state's head, checking the links on the
    // way: usually only a few records, since the state lags by at most a batch.
    // `hash`: the link of the record at `seq` of its own kind (the head a
    // writer stored after it).
    let (mut seq, mut prev, mut chain) = last;
    let mut hash = own;
    let mut after_foreign = is_foreign_write(&last_line);
    let mut archived = super::archive::is_archived(&last_line);
    while seq > want.seq {
        let Some((_, line)) = lines.prev().map_err(|e| io("cannot read", e))? else {
            // A log `keyturn audit archive` started, and its crash before
            // moving the state's head on: its first record links to that head.
            if archived && seq == want.seq + 1 && prev == want.hash {
                seq = want.seq;
                hash = want.hash.clone();
            } else if archived && seq > want.seq + 1 {
                // Black-box finding: an older `state.db` restored after an
                // archive was refused as "truncated or altered".
                return Err(tampered(format!(
                    "the state database records seq {} but this log goes on after seq {} of an archived log (its first record, audit.archived, says where that log went): the state database is from before `keyturn audit archive`, and a state that old cannot be checked against this log. Restore a state database taken after the archive",
                    want.seq,
                    seq - 1
                )));
            }
            break;
        };
        let parsed = parse_seq_prev(&line);
        match parsed {
            Some((s, p, c)) if s + 1 == seq && link(chain, seq, &line)? == prev => {
                hash = link(c, s, &line)?;
                seq = s;
                prev = p;
                chain = c;
                after_foreign = is_foreign_write(&line);
                archived = super::archive::is_archived(&line);
            }
            // Black-box finding: bytes someone else wrote, which the record
            // after them (an `audit.foreign_write`) reported, made every
            // older state database unrestorable. They are no record of
            // keyturn's: skipped, and the record before them must still be
            // the one that record links to.
            _ if after_foreign => {}
            _ => {
                let keyed = if chain.is_some() {
                    " (or the audit key is not the one that wrote it)"
                } else {
                    ""
                };
                return Err(tampered(format!(
                    "the records before seq {seq} do not chain: the audit log was altered{keyed}"
                )));
            }
        }
    }
    if seq != want.seq || hash != want.hash {
        // The same seq with another link: with an audit key, a key other
        // than the one that wrote it gives exactly this.
        let keyed = if seq == want.seq && chain.is_some() {
            " (or the audit key is not the one that wrote it)"
        } else {
            ""
        };
        return Err(tampered(format!(
            "record seq {} is not the one the state database recorded: the audit log was truncated or altered{keyed}",
            want.seq
        )));
    }
    let foreign = end_partial_line(file, path, len, kept, head.seq + 1)?;
    Ok((head, report(foreign)))
}

/// Refuses a state database with no audit head (`state_db`, about to be
/// created or just opened empty) beside an audit log at `path` that holds
/// records: the inverse of a log behind the state's head. The state was
/// lost or replaced, and a start would treat every credential as new.
/// Reads the log only (from its end), so a refused start changes nothing.
///
/// One log is accepted: a lone `daemon.start` (seq 1). A first start
/// killed after appending it and before storing its head leaves exactly
/// that, and nothing was rotated yet. A partial last line is no record.
pub fn refuse_records_without_state(path: &Path, state_db: &Path) -> Result<(), AuditError> {
    let display = path.display().to_string();
    let io = |what: &str, e: std::io::Error| AuditError::Io {
        path: display.clone(),
        message: format!("{what}: {e}"),
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("cannot open", e)),
    };
    let len = file.metadata().map_err(|e| io("cannot stat", e))?.len();
    if len == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len - 1)
        .map_err(|e| io("cannot read", e))?;
    let mut lines = if last[0] == b'\n' {
        RevLines::new(&file, len - 1)
    } else {
        // Skip the partial line a crash mid-append leaves.
        let mut lines = RevLines::new(&file, len);
        match lines.prev().map_err(|e| io("cannot read", e))? {
            Some((0, _)) | None => return Ok(()),
            Some(_) => lines,
        }
    };
    let Some((_, line)) = lines.prev().map_err(|e| io("cannot read", e))? else {
        return Ok(());
    };
    #[derive(serde::Deserialize)]
    struct Last {
        seq: u64,
        event: String,
    }
    // A last line that is not a record still means the log is not new.
    let last: Option<Last> = serde_json::from_slice(&line).ok();
    if last
        .as_ref()
        .is_some_and(|l| l.seq == 1 && l.event == "daemon.start")
    {
        return Ok(());
    }
    Err(AuditError::StateLost {
        path: display,
        state_db: state_db.display().to_string(),
        last: last.map_or_else(
            || "its last line is not a valid record".to_owned(),
            |l| format!("up to seq {}", l.seq),
        ),
    })
}

/// Whether `partial`, the bytes after a log's last newline, can be what
/// a process killed while appending record `next_seq` left: a beginning
/// of that record's line (the writer writes `{"seq":N,"ts":"...` first).
pub(crate) fn crash_prefix(partial: &[u8], next_seq: u64) -> bool {
    let start = format!("{{\"seq\":{next_seq},\"ts\":\"");
    let start = start.as_bytes();
    partial.len() <= 1 << 20 && (partial.starts_with(start) || start.starts_with(partial))
}

/// Ends the file at its last newline (`kept` of `len` bytes). Bytes after
/// it that a crash appending record `next_seq` can have left are cut: an
/// append never acknowledged. Any others were written by something else
/// (black-box finding: 9.5 KB appended to a stopped daemon's log passed
/// `audit verify` and the start cut them with a warning, erasing the
/// evidence): they are kept, ended with a newline, and described in the
/// return value, which the daemon records as `audit.foreign_write`. Done
/// only after the checks against the state's head pass, so a refused log
/// is left exactly as it was found, for `audit verify`.
fn end_partial_line(
    file: &File,
    path: &str,
    len: u64,
    kept: u64,
    next_seq: u64,
) -> Result<Option<String>, AuditError> {
    if kept == len {
        return Ok(None);
    }
    let io = |what: &str, e: std::io::Error| AuditError::Io {
        path: path.to_owned(),
        message: format!("{what}: {e}"),
    };
    let mut partial = vec![0u8; (len - kept).min((1 << 20) + 1) as usize];
    file.read_exact_at(&mut partial, kept)
        .map_err(|e| io("cannot read its last line", e))?;
    if crash_prefix(&partial, next_seq) {
        tracing::warn!(
            path,
            offset = kept,
            bytes = len - kept,
            "audit log ends with a partial line (a crash mid-append, never acknowledged); cutting it off"
        );
        file.set_len(kept)
            .and_then(|()| file.sync_data())
            .map_err(|e| io("cannot cut the partial last line", e))?;
        return Ok(None);
    }
    let what = format!(
        "{} byte(s) at offset {kept}..{len}, after the last record, were written to the audit log by something other than keyturn while it was stopped: they are no record's beginning (a crash mid-append leaves one), so they are kept, on a line of their own (`keyturn audit verify` stops at them); find who can write {path}",
        len - kept
    );
    tracing::error!(path, "{what}");
    let mut f = file;
    f.write_all(b"\n")
        .and_then(|()| file.sync_data())
        .map_err(|e| io("cannot end the foreign bytes with a newline", e))?;
    Ok(Some(what))
}

/// The most lines after the last record that are taken for someone
/// else's writing (beyond them, the log is refused as altered).
const MAX_FOREIGN_LINES: usize = 10_000;

/// Whether `line` is an `audit.foreign_write` record: the bytes before it
/// (after keyturn's previous record) are someone else's.
fn is_foreign_write(line: &[u8]) -> bool {
    event_is(line, "audit.foreign_write")
}

/// Whether `line` is a record of the event `name`.
pub(super) fn event_is(line: &[u8], name: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Event<'a> {
        #[serde(borrow)]
        event: std::borrow::Cow<'a, str>,
    }
    serde_json::from_slice::<Event>(line).is_ok_and(|e| e.event == name)
}

/// Just the chain fields of a record line.
pub(super) fn parse_seq_prev(line: &[u8]) -> Option<(u64, String, Option<Chain>)> {
    #[derive(serde::Deserialize)]
    struct Link {
        seq: u64,
        prev: String,
        #[serde(default)]
        chain: Option<Chain>,
    }
    let c: Link = serde_json::from_slice(line).ok()?;
    Some((c.seq, c.prev, c.chain))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::audit::{Actor, Outcome, verify_file};
    use crate::model::{AgentId, CredentialId};
    use std::fs::OpenOptions;
    use std::os::unix::fs::PermissionsExt;

    pub(crate) fn event(i: u64) -> AuditEvent {
        let mut ev = AuditEvent::new("rotation.create", Actor::Daemon, Outcome::Ok);
        ev.agent = Some(AgentId::new("invoice-bot").unwrap());
        ev.credential = Some(CredentialId::new("db").unwrap());
        ev.version = Some(i);
        ev.detail = Some(format!("event-{i}"));
        ev
    }

    /// A log with records 1..=n, closed (the writer thread has exited).
    pub(crate) fn write_log(path: &Path, n: u64) -> AuditHead {
        let log = AuditLog::open(path, None).unwrap();
        let mut head = log.head();
        for i in 1..=n {
            head = log.append_blocking(event(i)).unwrap();
        }
        head
    }

    /// A 32-byte test key whose bytes spell a canary.
    pub(crate) fn test_key(tag: u8) -> AuditKey {
        let mut bytes = b"KEYCANARY-audit-key-0123456789-x".to_vec();
        bytes[31] = tag;
        AuditKey::from_bytes(zeroize::Zeroizing::new(bytes)).unwrap()
    }

    /// Appends records `from..=to` to the log at `path` (continuing from
    /// `head`), keyed with `key` when given; closed after.
    pub(crate) fn append_keyed(
        path: &Path,
        head: Option<&AuditHead>,
        from: u64,
        to: u64,
        key: Option<AuditKey>,
    ) -> AuditHead {
        let log = AuditLog::open_keyed(path, head, key).unwrap();
        let mut head = log.head();
        for i in from..=to {
            head = log.append_blocking(event(i)).unwrap();
        }
        head
    }

    /// The log's lines, without their newlines.
    pub(crate) fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_form_one_valid_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit/audit.log");
        let log = AuditLog::open(&path, None).unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..500 {
            let log = log.clone();
            tasks.spawn(async move { log.append(event(i)).await.unwrap() });
        }
        let mut seqs = Vec::new();
        while let Some(head) = tasks.join_next().await {
            seqs.push(head.unwrap().seq);
        }
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (1..=500).collect::<Vec<_>>(),
            "each append got its own seq"
        );
        log.close().await;

        let report = verify_file(&path, Some(&log.head())).unwrap();
        assert_eq!(report.records, 500);
        assert_eq!(report.head, Some(log.head()));
        assert!(log.fsync_count() <= 500);
        eprintln!("500 concurrent appends: {} fsyncs", log.fsync_count());
    }

    /// bb9 #6: the log moved or deleted under the running daemon: appends
    /// fail (loudly, as on a full disk) instead of going to the old inode,
    /// and go on once the file is back; nothing is written to a new file.
    #[tokio::test]
    async fn appends_fail_while_the_file_is_not_at_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let moved = dir.path().join("audit.log.1");
        let log = AuditLog::open(&path, None).unwrap();
        log.append(event(1)).await.unwrap();

        std::fs::rename(&path, &moved).unwrap();
        for durable in [true, false] {
            let e = if durable {
                log.append(event(2)).await
            } else {
                log.append_unsynced(event(2)).await
            }
            .expect_err("appended to a file no longer at its path");
            assert!(e.to_string().contains("is gone"), "{e}");
        }
        assert!(!path.exists(), "no new log is started");

        // Another file at the path is not the one keyturn opened either.
        std::fs::write(&path, b"").unwrap();
        let e = log.append(event(2)).await.expect_err("replaced");
        assert!(
            e.to_string().contains("is not the file keyturn opened"),
            "{e}"
        );

        std::fs::rename(&moved, &path).unwrap();
        let head = log.append(event(2)).await.expect("the file is back");
        assert_eq!(head.seq, 2);
        assert_eq!(verify_file(&path, Some(&head)).unwrap().records, 2);
    }

    /// Black-box finding: with the log made immutable (`chattr +i`), a
    /// failed write whose partial bytes could not be cut off was taken for
    /// a failed fsync: appends were refused for good ("restart keyturn")
    /// after the file was writable again. The cut is tried again before
    /// each append, and appends go on once it works.
    #[tokio::test]
    async fn appends_go_on_once_a_failed_writes_bytes_can_be_cut_off() {
        crate::test_support::assert_root("chattr +i");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, None).unwrap();
        log.append(event(1)).await.unwrap();
        crate::test_support::chattr("+i", &path);
        for _ in 0..2 {
            let e = log.append(event(2)).await.expect_err("an immutable file");
            assert!(e.to_string().contains("cannot write"), "{e}");
            assert!(!e.to_string().contains("restart keyturn"), "{e}");
        }
        crate::test_support::chattr("-i", &path);
        let head = log.append(event(2)).await.expect("writable again");
        assert_eq!(head.seq, 2);
        assert_eq!(verify_file(&path, Some(&head)).unwrap().records, 2);
    }

    #[tokio::test]
    async fn queued_appends_share_one_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, None).unwrap();
        log.append(event(0)).await.unwrap();
        assert_eq!(log.fsync_count(), 1);

        // Hold the writer so that 200 appends are queued when it wakes up.
        let release = log.hold();
        let pending: Vec<_> = (1..=200)
            .map(|i| log.send(event(i), true).unwrap())
            .collect();
        drop(release);
        let mut heads = Vec::new();
        for rx in pending {
            heads.push(rx.await.unwrap().unwrap());
        }
        assert_eq!(log.fsync_count(), 2, "200 queued appends, one fsync");
        // Each caller got the head after its own record, in queue order.
        assert_eq!(
            heads.iter().map(|h| h.seq).collect::<Vec<_>>(),
            (2..=201).collect::<Vec<_>>()
        );
        let all = lines(&path);
        assert_eq!(heads[199].hash, line_hash(all[200].as_bytes()));
        assert_eq!(log.head(), heads[199]);
        assert_eq!(verify_file(&path, Some(&heads[199])).unwrap().records, 201);
    }

    #[tokio::test]
    async fn unsynced_appends_are_written_at_once_and_made_durable_by_the_next_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, None).unwrap();
        assert_eq!(log.synced_seq(), 0);
        let a = log.append_unsynced(event(1)).await.unwrap();
        let b = log.append_unsynced(event(2)).await.unwrap();
        assert_eq!((a.seq, b.seq), (1, 2));
        assert_eq!(log.fsync_count(), 0, "no fsync for unsynced appends");
        assert_eq!(log.synced_seq(), 0, "not durable yet");
        // Written already: another reader (or a restart after kill -9) sees them.
        assert_eq!(lines(&path).len(), 2);
        assert_eq!(verify_file(&path, Some(&b)).unwrap().records, 2);

        // One durable append covers the two before it.
        let c = log.append(event(3)).await.unwrap();
        assert_eq!(log.fsync_count(), 1);
        assert_eq!(log.synced_seq(), 3);
        assert_eq!(log.head(), c);

        // A sync with nothing unsynced costs nothing; one after an unsynced
        // append costs one fsync and answers with the head.
        assert_eq!(log.sync().await.unwrap(), c);
        assert_eq!(log.fsync_count(), 1);
        let d = log.append_unsynced(event(4)).await.unwrap();
        assert_eq!(log.sync().await.unwrap(), d);
        assert_eq!((log.fsync_count(), log.synced_seq()), (2, 4));

        // Close makes an unsynced tail durable.
        let e = log.append_unsynced(event(5)).await.unwrap();
        log.close().await;
        assert_eq!((log.fsync_count(), log.synced_seq()), (3, 5));
        assert_eq!(verify_file(&path, Some(&e)).unwrap().records, 5);
        let reopened = AuditLog::open(&path, Some(&e)).unwrap();
        assert_eq!(reopened.head(), e);
        assert_eq!(reopened.synced_seq(), 5);
    }

    #[tokio::test]
    async fn records_have_the_documented_shape() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/audit.log");
        let log = AuditLog::open(&path, None).unwrap();
        assert_eq!(log.head(), genesis_head());
        let h1 = log.append(event(1)).await.unwrap();
        let h2 = log.append(event(2)).await.unwrap();
        log.close().await;

        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);

        let all = lines(&path);
        assert_eq!(all.len(), 2);
        let first: serde_json::Value = serde_json::from_str(&all[0]).unwrap();
        assert_eq!(first["seq"], 1);
        assert_eq!(first["prev"], GENESIS);
        assert_eq!(first["event"], "rotation.create", "the event is flattened");
        assert_eq!(first["actor"]["type"], "daemon");
        assert_eq!(first["agent"], "invoice-bot");
        let ts = first["ts"].as_str().unwrap();
        assert!(chrono::DateTime::parse_from_rfc3339(ts).is_ok(), "{ts}");
        assert!(
            ts.ends_with('Z') && ts.len() == "2024-01-01T00:00:00.000Z".len(),
            "{ts}"
        );
        assert!(
            all[0].starts_with(r#"{"seq":1,"ts":"#),
            "seq and ts lead: {}",
            all[0]
        );

        let second: AuditRecord = serde_json::from_str(&all[1]).unwrap();
        assert_eq!(second.prev, h1.hash);
        assert_eq!(h1.hash, line_hash(all[0].as_bytes()));
        assert_eq!(h2.hash, line_hash(all[1].as_bytes()));
        assert_eq!(second.event, event(2));
    }

    #[tokio::test]
    async fn reopening_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let p = path.clone();
        let head = tokio::task::spawn_blocking(move || write_log(&p, 3))
            .await
            .unwrap();

        let log = AuditLog::open(&path, Some(&head)).unwrap();
        assert_eq!(log.head(), head);
        let h4 = log.append(event(4)).await.unwrap();
        assert_eq!(h4.seq, 4);
        log.close().await;
        // Without a head from state too (first start after a state reset).
        let log = AuditLog::open(&path, None).unwrap();
        assert_eq!(log.head(), h4);
        let h5 = log.append(event(5)).await.unwrap();
        log.close().await;

        let report = verify_file(&path, Some(&h5)).unwrap();
        assert_eq!(report.records, 5);
        assert_eq!(report.head, Some(h5));
    }

    #[tokio::test]
    async fn appends_after_close_fail_and_blocking_appends_work() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, None).unwrap();
        let l2 = log.clone();
        let h = tokio::task::spawn_blocking(move || l2.append_blocking(event(1)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(h.seq, 1);
        log.close().await;
        log.close().await; // twice is fine
        assert!(matches!(
            log.append(event(2)).await,
            Err(AuditError::Closed { .. })
        ));
        assert_eq!(log.head(), h);
        assert_eq!(lines(&path).len(), 1);
    }

    #[test]
    fn a_partial_last_line_is_cut_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let head = write_log(&path, 3);
        let good_len = std::fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"seq":4,"ts":"2024-01-01T00:"#).unwrap();
        drop(f);

        let log = AuditLog::open(&path, Some(&head)).unwrap();
        assert_eq!(log.head(), head);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len);
        let h4 = log.append_blocking(event(4)).unwrap();
        assert_eq!(h4.seq, 4);
        assert_eq!(verify_file(&path, Some(&h4)).unwrap().records, 4);
    }

    /// Defect (black-box): a line appended to the audit log by someone
    /// else while the daemon ran went unnoticed (nothing logged, the next
    /// record written after it with a duplicate seq). The next batch
    /// records `audit.foreign_write` naming the bytes, on a line of its
    /// own; the chain of keyturn's own records goes on.
    #[test]
    fn bytes_written_by_someone_else_are_recorded_at_the_next_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, None).unwrap();
        log.append_blocking(event(1)).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"seq":2,"forged":true}"#).unwrap();
        drop(f);
        let h = log.append_blocking(event(2)).unwrap();
        assert_eq!(h.seq, 3, "the foreign_write record, then the event");
        let all = lines(&path);
        assert_eq!(all.len(), 4, "{all:?}");
        assert_eq!(all[1], r#"{"seq":2,"forged":true}"#, "{all:?}");
        let noted: serde_json::Value = serde_json::from_str(&all[2]).unwrap();
        assert_eq!(noted["event"], "audit.foreign_write");
        assert_eq!(noted["seq"], 2);
        let error = noted["error"].as_str().unwrap();
        assert!(
            error.contains(&format!("23 byte(s) at offset {len}..{}", len + 23)),
            "{error}"
        );
        // Once: the next append finds the length it left.
        log.append_blocking(event(3)).unwrap();
        assert_eq!(lines(&path).len(), 5);
        let e = verify_file(&path, None).unwrap_err();
        assert!(e.to_string().contains("line 2"), "verify stops there: {e}");
    }

    /// Black-box finding: bytes appended to a stopped daemon's log (no
    /// newline) were cut at the next start with a warning: the evidence
    /// gone, no audit record. Bytes no crash can have left are kept, on a
    /// line of their own, and reported for an `audit.foreign_write`
    /// record; a crash's beginning of the next record is still cut.
    #[test]
    fn bytes_no_crash_leaves_after_the_last_record_are_kept_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let h2 = write_log(&path, 2);
        let len = std::fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"ATTACKER WAS HERE").unwrap();
        drop(f);
        let log = AuditLog::open(&path, Some(&h2)).unwrap();
        let what = log.foreign_at_open().expect("reported");
        assert!(
            what.contains(&format!("17 byte(s) at offset {len}..{}", len + 17)),
            "{what}"
        );
        assert_eq!(log.head(), h2, "the chain goes on from record 2");
        let h3 = log.append_blocking(event(3)).unwrap();
        assert_eq!(h3.seq, 3);
        let all = lines(&path);
        assert_eq!(all[2], "ATTACKER WAS HERE", "{all:?}");
        assert_eq!(all.len(), 4, "{all:?}");
        drop(log);
        // A crash's partial record after that: cut, nothing reported.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"seq":4,"ts":"2026-12"#).unwrap();
        drop(f);
        let log = AuditLog::open(&path, Some(&h3)).unwrap();
        assert_eq!(log.foreign_at_open(), None);
        assert_eq!(lines(&path).len(), 4);
    }

    /// Black-box finding: whole lines appended to a stopped daemon's log
    /// (`echo ... >> audit.log`) made the start refuse it ("its last line
    /// is not a valid record"), where the same bytes without a newline
    /// were kept and reported. They are kept and reported the same way;
    /// a state that records a later seq than the last record still refuses.
    #[test]
    fn whole_lines_appended_while_stopped_are_kept_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let h2 = write_log(&path, 2);
        let len = std::fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"hello world injected\nsecond line\n").unwrap();
        drop(f);
        let ahead = AuditHead {
            seq: 3,
            hash: h2.hash.clone(),
        };
        let e = AuditLog::open(&path, Some(&ahead)).unwrap_err();
        assert!(e.to_string().contains("truncated or altered"), "{e}");
        let log = AuditLog::open(&path, Some(&h2)).unwrap();
        let what = log.foreign_at_open().expect("reported");
        assert!(
            what.contains(&format!("33 byte(s) at offset {len}..{}", len + 33))
                && what.contains("whole lines keyturn did not write"),
            "{what}"
        );
        assert_eq!(log.head(), h2);
        let h3 = log.append_blocking(event(3)).unwrap();
        drop(log);
        let all = lines(&path);
        assert_eq!(
            all[2..4],
            ["hello world injected", "second line"],
            "{all:?}"
        );
        assert_eq!(all.len(), 5, "{all:?}");
        AuditLog::open(&path, Some(&h3)).unwrap();
    }

    /// Black-box finding: once the log held someone else's bytes (recorded
    /// `audit.foreign_write`), no state database backed up before them
    /// could be restored: "the records before seq N do not chain". The
    /// walk back from the end skips the bytes that record reported; the
    /// record before them must still link, and a line that does not link
    /// anywhere else is still refused.
    #[test]
    fn an_older_state_can_be_restored_across_a_reported_foreign_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let h2 = write_log(&path, 2);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"seq":3,"prev":"x"}"#).unwrap();
        drop(f);
        let log = AuditLog::open(&path, Some(&h2)).unwrap();
        assert!(log.foreign_at_open().is_some());
        let mut ev = AuditEvent::new("audit.foreign_write", Actor::Daemon, Outcome::Failed);
        ev.error = Some("reported".into());
        log.append_blocking(ev).unwrap();
        let h4 = log.append_blocking(event(4)).unwrap();
        drop(log);
        assert_eq!(h4.seq, 4);

        // The state of before the bytes (seq 2), and of seq 1.
        let h1 = AuditHead {
            seq: 1,
            hash: writer_link(None, lines(&path)[0].as_bytes()),
        };
        for older in [&h2, &h1] {
            let log = AuditLog::open(&path, Some(older)).unwrap();
            assert_eq!(log.head(), h4);
            assert_eq!(log.unconfirmed_at_open(), Some((older.seq + 1, 4)));
        }
        // A forged link to seq 2 still fails: the record before the bytes
        // must be the one the state recorded.
        let forged = AuditHead {
            seq: 2,
            hash: "0".repeat(64),
        };
        let e = AuditLog::open(&path, Some(&forged)).unwrap_err();
        assert!(e.to_string().contains("is not the one"), "{e}");
        // Bytes no `audit.foreign_write` reported (between records 1 and 2)
        // are refused as before.
        let all = lines(&path);
        let mut inserted = format!("{}\nJUNK\n", all[0]);
        inserted.push_str(&all[1..].join("\n"));
        inserted.push('\n');
        std::fs::write(&path, inserted).unwrap();
        let e = AuditLog::open(&path, Some(&h1)).unwrap_err();
        assert!(e.to_string().contains("do not chain"), "{e}");
    }

    #[test]
    fn a_refused_log_is_left_as_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let h3 = write_log(&path, 3);
        // Someone removed the final newline: it looks like a partial line, but
        // the state says record 3 was acknowledged, so nothing may be cut.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.pop();
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            AuditLog::open(&path, Some(&h3)),
            Err(AuditError::Tampered { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn a_file_holding_only_a_partial_line_becomes_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        std::fs::write(&path, b"{\"seq\":1,").unwrap();
        let log = AuditLog::open(&path, None).unwrap();
        assert_eq!(log.head(), genesis_head());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        assert_eq!(log.append_blocking(event(1)).unwrap().seq, 1);
    }

    #[test]
    fn a_log_behind_the_state_head_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let h5 = write_log(&path, 5);
        let all = lines(&path);
        let h4 = AuditHead {
            seq: 4,
            hash: line_hash(all[3].as_bytes()),
        };

        // State lagging behind the file is normal (the head is saved after the append).
        assert_eq!(AuditLog::open(&path, Some(&h4)).unwrap().head(), h5);

        let refused = |head: &AuditHead| match AuditLog::open(&path, Some(head)) {
            Err(AuditError::Tampered { message, .. }) => message,
            other => panic!("expected Tampered, got {other:?}"),
        };
        // A head that the file never reached.
        let ahead = AuditHead {
            seq: 6,
            hash: h5.hash.clone(),
        };
        assert!(refused(&ahead).contains("truncated"));
        // The record at the head's seq is another one.
        let other = AuditHead {
            seq: 4,
            hash: "f".repeat(64),
        };
        assert!(refused(&other).contains("truncated or altered"));
        let err = AuditLog::open(&path, Some(&other)).unwrap_err().to_string();
        assert!(err.contains("keyturn audit verify"), "{err}");

        // The tail deleted: the last line goes, the state still has seq 5.
        let kept: String = all[..4].iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&path, kept).unwrap();
        assert!(refused(&h5).contains("ends at seq 4"));
        // Everything deleted.
        std::fs::write(&path, b"").unwrap();
        assert!(refused(&h5).contains("empty"));
    }

    /// The inverse of a log behind the state's head: no head in state (the
    /// database is new) and records in the log. Refused, naming both files
    /// and what to do; the log is only read. A missing or empty log, one
    /// holding only a partial line, and the lone `daemon.start` of a first
    /// start killed before it stored its head are no history to lose.
    #[test]
    fn records_without_a_state_head_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let db = dir.path().join("state.db");
        let check = || refuse_records_without_state(&path, &db);
        check().expect("no log");
        std::fs::write(&path, b"").unwrap();
        check().expect("an empty log");
        std::fs::write(&path, b"{\"seq\":1,").unwrap();
        check().expect("only a partial line");
        std::fs::remove_file(&path).unwrap();

        let log = AuditLog::open(&path, None).unwrap();
        log.append_blocking(AuditEvent::new("daemon.start", Actor::Daemon, Outcome::Ok))
            .unwrap();
        check().expect("the lone daemon.start of a first start");
        log.append_blocking(event(2)).unwrap();
        drop(log);
        let bytes = std::fs::read(&path).unwrap();
        let err = check().unwrap_err();
        assert!(matches!(err, AuditError::StateLost { .. }), "{err:?}");
        let msg = err.to_string();
        for needle in [
            format!("the state database {} is missing or new", db.display()),
            format!(
                "the audit log {} already holds records (up to seq 2)",
                path.display()
            ),
            format!("Restore {} from a backup", db.display()),
            format!("`mv {0} {0}.old`", path.display()),
        ] {
            assert!(msg.contains(&needle), "{needle:?} in {msg}");
        }
        // A partial line after the records changes nothing.
        let mut partial = bytes.clone();
        partial.extend_from_slice(b"{\"seq\":3,");
        std::fs::write(&path, &partial).unwrap();
        assert!(check().unwrap_err().to_string().contains("up to seq 2"));
        assert_eq!(std::fs::read(&path).unwrap(), partial, "only read");
        // A single record that is not a daemon start.
        let single = dir.path().join("single.log");
        write_log(&single, 1);
        assert!(matches!(
            refuse_records_without_state(&single, &db),
            Err(AuditError::StateLost { .. })
        ));
        // A last line that is no record at all.
        std::fs::write(&path, b"not a record\n").unwrap();
        assert!(
            check()
                .unwrap_err()
                .to_string()
                .contains("its last line is not a valid record")
        );
    }

    #[test]
    fn an_edit_between_the_state_head_and_the_end_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_log(&path, 5);
        let mut all = lines(&path);
        let h2 = AuditHead {
            seq: 2,
            hash: line_hash(all[1].as_bytes()),
        };
        all[2] = all[2].replace("event-3", "event-9");
        std::fs::write(
            &path,
            all.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
        assert!(matches!(
            AuditLog::open(&path, Some(&h2)),
            Err(AuditError::Tampered { .. })
        ));
    }

    /// Records big enough that the walk back crosses several read chunks.
    #[test]
    fn the_tail_walk_crosses_chunk_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path, None).unwrap();
        let mut heads = Vec::new();
        for i in 0..300 {
            let mut ev = event(i);
            ev.detail = Some(format!("{i}-{}", "x".repeat(997)));
            heads.push(log.append_blocking(ev).unwrap());
        }
        drop(log);
        assert!(std::fs::metadata(&path).unwrap().len() > 4 * TAIL_CHUNK);
        // The state head far back: the walk reads most of the file, chunk by chunk.
        let reopened = AuditLog::open(&path, Some(&heads[10])).unwrap();
        assert_eq!(reopened.head(), heads[299]);
        let mut wrong = heads[10].clone();
        wrong.hash = heads[11].hash.clone();
        assert!(AuditLog::open(&path, Some(&wrong)).is_err());
    }

    #[test]
    fn a_keyed_log_links_with_the_hmac_and_reopens_only_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let h3 = append_keyed(&path, None, 1, 3, Some(test_key(b'a')));
        let all = lines(&path);
        let key = test_key(b'a');
        for (i, l) in all.iter().enumerate() {
            let r: AuditRecord = serde_json::from_str(l).unwrap();
            assert_eq!(r.chain, Some(Chain::HmacSha256), "{l}");
            assert!(l.contains(r#","chain":"hmac-sha256","#), "{l}");
            if i > 0 {
                assert_eq!(r.prev, key.link(all[i - 1].as_bytes()));
                assert_ne!(r.prev, line_hash(all[i - 1].as_bytes()));
            }
        }
        // The head in state is the link the next record carries.
        assert_eq!(h3.hash, key.link(all[2].as_bytes()));
        assert!(
            !std::fs::read_to_string(&path)
                .unwrap()
                .contains("KEYCANARY")
        );

        // With the key it continues; without it, or with another key, the
        // daemon refuses to chain onto it.
        let h4 = append_keyed(&path, Some(&h3), 4, 4, Some(test_key(b'a')));
        assert_eq!(h4.seq, 4);
        let err = AuditLog::open_keyed(&path, Some(&h4), None).unwrap_err();
        assert!(matches!(err, AuditError::NoKey { seq: 4, .. }), "{err}");
        assert!(err.to_string().contains("audit_key_file"), "{err}");
        assert!(matches!(
            AuditLog::open(&path, None),
            Err(AuditError::NoKey { .. })
        ));
        for head in [&h3, &h4] {
            let err = AuditLog::open_keyed(&path, Some(head), Some(test_key(b'b'))).unwrap_err();
            assert!(matches!(err, AuditError::Tampered { .. }), "{err}");
            // Defect (black-box): it said only "truncated or altered".
            assert!(
                err.to_string()
                    .contains("or the audit key is not the one that wrote it"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_plain_log_continues_keyed_once_a_key_is_configured() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let h2 = write_log(&path, 2);
        let plain = std::fs::read_to_string(&path).unwrap();
        assert!(!plain.contains("chain"), "plain records stay as they were");
        let h4 = append_keyed(&path, Some(&h2), 3, 4, Some(test_key(b'a')));
        let all = lines(&path);
        let r3: AuditRecord = serde_json::from_str(&all[2]).unwrap();
        assert_eq!(r3.chain, Some(Chain::HmacSha256));
        assert_eq!(r3.prev, test_key(b'a').link(all[1].as_bytes()));
        // The state head from the plain era (seq 2) still checks on reopen.
        assert_eq!(
            AuditLog::open_keyed(&path, Some(&h2), Some(test_key(b'a')))
                .unwrap()
                .head(),
            h4
        );
    }
}
