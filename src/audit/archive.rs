//! `keyturn audit archive`: moves the audit log aside and starts a new one
//! whose first record (`audit.archived`) carries on the old chain.
//!
//! Why: a log that no longer verifies (a foreign write, a record edited,
//! the file lost or cut) made the daemon unstartable, and the runbook's way
//! out ("archive the log, start a new one") could not be taken: the start
//! refuses a log behind the head the state database stores, and an empty
//! one most of all. The new log is not a fresh chain: its first record has
//! the next seq and links (`prev`) to the old log's last record, or, when
//! that log is broken or gone, to the last record the state database
//! vouches for (its audit head), and it says which, where the old log went
//! and what was wrong with it. With an audit key the record is keyed like
//! every other, so it cannot be forged without the key. `audit verify`
//! accepts such a record first in a log (and only there) in place of the
//! genesis link.
//!
//! Crash safety: the new log is written and fsynced beside the old one,
//! the old one is linked to its archive name (never over an existing
//! file), the new one is renamed over it, and only then is the state's
//! audit head moved to the new record. A crash before the rename leaves
//! the old log in place (and possibly a second name for it); a crash after
//! it leaves a new log whose first record links to the state's head, which
//! the start accepts (see `recover_tail`).

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use chrono::{SecondsFormat, Utc};
use sha2::{Digest, Sha256};

use super::log::{RevLines, parse_seq_prev, writer_link};
use super::{Actor, AuditError, AuditEvent, AuditKey, AuditRecord, GENESIS, Outcome};
use crate::private_file;
use crate::state::AuditHead;

/// The event of the record a new log begins with.
pub const ARCHIVED_EVENT: &str = "audit.archived";

/// What the new log continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Continues {
    /// The old log verified: the new log links to its last record.
    Intact,
    /// The old log did not verify, or is gone: the new log links to the
    /// state database's audit head. The text says what was wrong.
    Broken(String),
}

/// What [`archive`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archived {
    /// Where the old log is now (`None`: there was none).
    pub to: Option<PathBuf>,
    /// The last seq of the old log (or of the state's head when broken).
    pub up_to: u64,
    /// The new log's head: its `audit.archived` record.
    pub head: AuditHead,
}

/// The last complete line of the log and whether it is a record (seq,
/// line). A partial last line (a crash mid-append) is not a line.
fn last_line(file: &File) -> std::io::Result<Option<Vec<u8>>> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len - 1)?;
    let mut lines = if last[0] == b'\n' {
        RevLines::new(file, len - 1)
    } else {
        let mut lines = RevLines::new(file, len);
        match lines.prev()? {
            Some((0, _)) | None => return Ok(None),
            Some(_) => lines,
        }
    };
    Ok(lines.prev()?.map(|(_, line)| line))
}

/// SHA-256 of a whole file, hex, and its length.
fn file_digest(file: &mut File) -> std::io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), len))
}

/// The default archive name: the log's own name with the UTC time.
pub fn default_archive_path(log: &Path) -> PathBuf {
    let stamp = Utc::now().format("%Y%m%dT%H%M%SZ");
    let mut name = log.as_os_str().to_owned();
    name.push(format!(".{stamp}"));
    PathBuf::from(name)
}

/// Moves the log at `log` to `to` and starts a new log there whose first
/// record links to it (see the module). The daemon must be stopped (the
/// caller holds the state directory's lock); `state_head` is the state
/// database's audit head, which the caller moves to the returned head.
/// `key`: the audit key, when configured (the new record is keyed).
pub fn archive(
    log: &Path,
    to: &Path,
    state_head: Option<&AuditHead>,
    key: Option<&AuditKey>,
    continues: &Continues,
    actor: Actor,
) -> Result<Archived, AuditError> {
    let display = log.display().to_string();
    let io = |what: String, e: std::io::Error| AuditError::Io {
        path: display.clone(),
        message: format!("{what}: {e}"),
    };
    let old = match File::open(log) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io("cannot open".into(), e)),
    };
    let state_seq = state_head.map_or(0, |h| h.seq);
    // The old log's last record, as far as it can be read.
    let last = match &old {
        Some(f) => last_line(f)
            .map_err(|e| io("cannot read".into(), e))?
            .and_then(|line| parse_seq_prev(&line).map(|(seq, _, _)| (seq, line))),
        None => None,
    };
    let (up_to, prev) = match (continues, &last) {
        (Continues::Intact, Some((seq, line))) => (*seq, writer_link(key, line)),
        (Continues::Intact, None) if state_seq == 0 => {
            return Err(AuditError::Io {
                path: display,
                message: "holds no record: there is nothing to archive".into(),
            });
        }
        (Continues::Intact, None) => {
            return Err(AuditError::Tampered {
                path: display,
                message: format!(
                    "it holds no record but the state database records seq {state_seq}"
                ),
            });
        }
        // Past every seq either side used, linked to what the state vouches for.
        (Continues::Broken(_), _) => (
            state_seq.max(last.as_ref().map_or(0, |(s, _)| *s)),
            state_head.map_or_else(|| GENESIS.to_owned(), |h| h.hash.clone()),
        ),
    };
    if up_to == 0 {
        return Err(AuditError::Io {
            path: display,
            message: "holds no record and the state database records none: there is nothing to archive; the daemon starts a new log by itself".into(),
        });
    }

    let (detail, outcome, error) = match (&old, continues) {
        (Some(f), c) => {
            let mut f = f.try_clone().map_err(|e| io("cannot read".into(), e))?;
            let (digest, len) = file_digest(&mut f).map_err(|e| io("cannot read".into(), e))?;
            // (Black-box finding: a broken log's archive was said to hold
            // records up to the state's seq, which it may not.)
            let held = last.as_ref().map_or_else(
                || "no record that can be read".to_owned(),
                |(seq, _)| format!("records up to seq {seq}"),
            );
            let detail = format!(
                "the audit log ({held}) was moved to {} ({len} bytes, sha256 {digest}); this log goes on after seq {up_to}",
                to.display()
            );
            match c {
                Continues::Intact => (detail, Outcome::Ok, None),
                Continues::Broken(why) => (
                    detail,
                    Outcome::Failed,
                    Some(format!(
                        "the archived log did not verify: {why}; this record links to the last record the state database vouches for (seq {state_seq})"
                    )),
                ),
            }
        }
        (None, c) => (
            format!("there was no audit log at {display}; this log goes on from seq {up_to}"),
            Outcome::Failed,
            Some(match c {
                Continues::Broken(why) => format!(
                    "{why}; this record links to the last record the state database vouches for (seq {state_seq})"
                ),
                Continues::Intact => "the audit log was missing".to_owned(),
            }),
        ),
    };
    let mut event = AuditEvent::new(ARCHIVED_EVENT, actor, outcome);
    event.detail = Some(detail);
    event.error = error;
    let record = AuditRecord {
        seq: up_to + 1,
        ts: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        prev,
        chain: key.map(|_| super::Chain::HmacSha256),
        event,
    };
    let mut line = serde_json::to_vec(&record).map_err(|e| AuditError::Io {
        path: display.clone(),
        message: format!("cannot encode the record: {e}"),
    })?;
    let head = AuditHead {
        seq: record.seq,
        hash: writer_link(key, &line),
    };
    line.push(b'\n');

    // The new log, complete and durable, beside the old one.
    let mut fresh = log.as_os_str().to_owned();
    fresh.push(".new");
    let fresh = PathBuf::from(fresh);
    let _ = std::fs::remove_file(&fresh);
    let mut f = private_file::open_options()
        .write(true)
        .create_new(true)
        .open(&fresh)
        .map_err(|e| io(format!("cannot create {}", fresh.display()), e))?;
    f.write_all(&line)
        .and_then(|()| f.sync_all())
        .map_err(|e| io(format!("cannot write {}", fresh.display()), e))?;
    drop(f);

    // The old log under its archive name, never over another file.
    let moved = match old {
        None => None,
        Some(_) => {
            match std::fs::hard_link(log, to) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) => copy_new(log, to)
                    .map_err(|e| io(format!("cannot copy it to {}", to.display()), e))?,
                Err(e) => {
                    let _ = std::fs::remove_file(&fresh);
                    return Err(io(format!("cannot move it to {}", to.display()), e));
                }
            }
            sync_parent(to).map_err(|e| io(format!("cannot fsync {}", to.display()), e))?;
            Some(to.to_owned())
        }
    };
    std::fs::rename(&fresh, log).map_err(|e| io("cannot put the new log in place".into(), e))?;
    sync_parent(log).map_err(|e| io("cannot fsync its directory".into(), e))?;
    Ok(Archived {
        to: moved,
        up_to,
        head,
    })
}

/// `to` as a new file (never over one) with `from`'s bytes, durable.
fn copy_new(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut src = File::open(from)?;
    let mut dst = private_file::open_options()
        .write(true)
        .create_new(true)
        .open(to)?;
    std::io::copy(&mut src, &mut dst)?;
    dst.sync_all()
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => File::open(dir)?.sync_all(),
        None => File::open(".")?.sync_all(),
    }
}

/// Whether `line` is an [`ARCHIVED_EVENT`] record.
pub(crate) fn is_archived(line: &[u8]) -> bool {
    super::log::event_is(line, ARCHIVED_EVENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::log::tests::{append_keyed, lines, test_key, write_log};
    use crate::audit::{AuditLog, verify_all};

    fn operator() -> Actor {
        Actor::Peer {
            uid: 0,
            gid: 0,
            pid: 1,
        }
    }

    #[test]
    fn an_intact_log_is_archived_and_the_new_one_goes_on_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        let to = dir.path().join("audit.log.old");
        let head = write_log(&log, 5);
        let before = std::fs::read(&log).unwrap();
        let done = archive(&log, &to, Some(&head), None, &Continues::Intact, operator()).unwrap();
        assert_eq!(done.up_to, 5);
        assert_eq!(done.to.as_deref(), Some(to.as_path()));
        assert_eq!(
            std::fs::read(&to).unwrap(),
            before,
            "the archive is the old log"
        );
        let new = lines(&log);
        assert_eq!(new.len(), 1);
        let record: AuditRecord = serde_json::from_str(&new[0]).unwrap();
        assert_eq!(record.seq, 6);
        assert_eq!(record.event.event, ARCHIVED_EVENT);
        assert_eq!(
            record.prev, head.hash,
            "it links to the old log's last record"
        );
        assert!(record.event.detail.unwrap().contains("audit.log.old"));
        assert!(!dir.path().join("audit.log.new").exists());

        // The new log verifies against the head the caller stores.
        let all = verify_all(&log, Some(&done.head), None, 10);
        assert!(all.problems.is_empty(), "{:?}", all.problems);
        assert_eq!(all.report.continues_from, Some(5));
        assert_eq!(all.report.records, 1);
        // And the daemon goes on from it.
        let opened = AuditLog::open(&log, Some(&done.head)).unwrap();
        let next = opened
            .append_blocking(crate::audit::log::tests::event(7))
            .unwrap();
        assert_eq!(next.seq, 7);
        drop(opened);
        let all = verify_all(&log, Some(&next), None, 10);
        assert!(all.problems.is_empty(), "{:?}", all.problems);
        assert_eq!(all.report.records, 2);
    }

    #[test]
    fn a_crash_before_the_head_is_stored_still_starts() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        let head = write_log(&log, 3);
        archive(
            &log,
            &dir.path().join("a"),
            Some(&head),
            None,
            &Continues::Intact,
            operator(),
        )
        .unwrap();
        // The state still stores seq 3: the new first record links to it,
        // for `audit verify` too (black-box finding: "the tail was cut").
        let all = verify_all(&log, Some(&head), None, 10);
        assert!(all.problems.is_empty(), "{:?}", all.problems);
        let opened = AuditLog::open(&log, Some(&head)).unwrap();
        assert_eq!(opened.head().seq, 4);
        drop(opened);
        // A first record that does not link to the stored head is refused.
        let other = AuditHead {
            seq: 3,
            hash: "ab".repeat(32),
        };
        let e = AuditLog::open(&log, Some(&other)).unwrap_err();
        assert!(matches!(e, AuditError::Tampered { .. }), "{e}");
        // A state from before the archive is said to be that.
        let older = AuditHead {
            seq: 1,
            hash: "cd".repeat(32),
        };
        let e = AuditLog::open(&log, Some(&older)).unwrap_err().to_string();
        assert!(e.contains("from before `keyturn audit archive`"), "{e}");
    }

    #[test]
    fn a_broken_or_missing_log_goes_on_from_the_state_head() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        let head = write_log(&log, 4);
        // Record 2 edited: the log no longer verifies.
        let mut edited = lines(&log);
        edited[1] = edited[1].replace("event-2", "event-X");
        std::fs::write(&log, edited.join("\n") + "\n").unwrap();
        assert!(!verify_all(&log, Some(&head), None, 10).problems.is_empty());
        let why = Continues::Broken("record 3 does not link".into());
        let done = archive(
            &log,
            &dir.path().join("a"),
            Some(&head),
            None,
            &why,
            operator(),
        )
        .unwrap();
        let record: AuditRecord = serde_json::from_str(&lines(&log)[0]).unwrap();
        assert_eq!((record.seq, record.prev.as_str()), (5, head.hash.as_str()));
        assert_eq!(record.event.outcome, Outcome::Failed);
        assert!(
            record
                .event
                .error
                .unwrap()
                .contains("record 3 does not link")
        );
        assert!(
            verify_all(&log, Some(&done.head), None, 10)
                .problems
                .is_empty()
        );

        // Gone altogether: a new log, nothing archived.
        std::fs::remove_file(&log).unwrap();
        let gone = Continues::Broken("the audit log was missing".into());
        let again = archive(
            &log,
            &dir.path().join("b"),
            Some(&done.head),
            None,
            &gone,
            operator(),
        )
        .unwrap();
        assert_eq!(again.to, None);
        assert!(!dir.path().join("b").exists());
        assert_eq!(again.head.seq, 6);
        AuditLog::open(&log, Some(&again.head)).unwrap();
    }

    #[test]
    fn a_keyed_log_goes_on_keyed_and_an_archived_record_elsewhere_is_no_start() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        let key = test_key(b'a');
        let head = append_keyed(&log, None, 1, 3, Some(test_key(b'a')));
        let done = archive(
            &log,
            &dir.path().join("a"),
            Some(&head),
            Some(&key),
            &Continues::Intact,
            operator(),
        )
        .unwrap();
        let all = verify_all(&log, Some(&done.head), Some(&key), 10);
        assert!(all.problems.is_empty(), "{:?}", all.problems);
        assert_eq!(all.report.keyed_from, Some(4));
        // Without the key it is not a pass.
        assert!(
            !verify_all(&log, Some(&done.head), None, 10)
                .problems
                .is_empty()
        );

        // An archived record in the middle of a log does not restart the chain.
        let plain = dir.path().join("plain.log");
        let head = write_log(&plain, 2);
        let mut text = lines(&plain);
        let mut forged: AuditRecord = serde_json::from_str(&text[1]).unwrap();
        forged.event.event = ARCHIVED_EVENT.into();
        forged.seq = 9;
        text[1] = serde_json::to_string(&forged).unwrap();
        std::fs::write(&plain, text.join("\n") + "\n").unwrap();
        assert!(
            !verify_all(&plain, Some(&head), None, 10)
                .problems
                .is_empty()
        );
    }
}
