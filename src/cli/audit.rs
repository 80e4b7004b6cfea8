//! `keyturn audit verify`: check the log's hash chain against the state;
//! `keyturn audit archive`: start a new log that carries on the old one.

use std::path::Path;

use super::{EXIT_FAILED, load_for_client};
use crate::audit::{
    Actor, AuditKey, Continues, KEY_HINT, Verification, VerifyReport, archive,
    default_archive_path, keyed_tail, verify_all,
};
use crate::state::{SqliteStore, StateStore, Write};

pub(super) fn audit_verify(path: &Path) -> u8 {
    let paths = match load_for_client(path) {
        Ok(c) => c.paths(),
        Err(code) => return code,
    };
    let db = crate::daemon::state_db_in(&paths.state_dir);
    let head = if db.exists() {
        match SqliteStore::open_read_only(&db).and_then(|s| s.audit_head()) {
            Ok(h) => h,
            Err(e) => {
                eprintln!("keyturn: {e}");
                return EXIT_FAILED;
            }
        }
    } else {
        None
    };
    let key = match AuditKey::load(paths.audit_key_file.as_deref()) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("keyturn: cannot load the audit key: {e}");
            return EXIT_FAILED;
        }
    };
    let all = verify_all(
        &paths.audit_log,
        head.as_ref(),
        key.as_ref(),
        MAX_LISTED_PROBLEMS,
    );
    if !all.problems.is_empty() {
        report_problems(&all);
        return EXIT_FAILED;
    }
    let report = all.report;
    // Records the state database knows nothing of: the chain is intact,
    // but a cut tail is a valid shorter chain, so that is not a pass.
    if head.is_none() && report.records > 0 {
        let why = if db.exists() {
            format!("the state database {} records no audit head", db.display())
        } else {
            format!("there is no state database at {}", db.display())
        };
        eprintln!(
            "keyturn: {}: {} records, chain intact, but the tail was NOT checked: {why}; \
             records cut off the end cannot be detected without the head it keeps{}",
            paths.audit_log.display(),
            report.records,
            keying(&report)
        );
        return EXIT_FAILED;
    }
    let stored = head.as_ref().map_or(0, |h| h.seq);
    let after = report
        .head
        .as_ref()
        .map_or(0, |h| h.seq.saturating_sub(stored));
    let tail = match (&head, after) {
        (None, _) => String::new(),
        (Some(_), 0) => ", tail checked against the state database".to_owned(),
        (Some(_), n) => format!(
            ", tail checked against the state database; the last {n} record(s) come after \
             the head it stored (seq {stored}): written while or just before the daemon \
             stopped, or appended by someone else (the daemon records `audit.unconfirmed` \
             for them at its next start)"
        ),
    };
    let continues = match report.continues_from {
        None => String::new(),
        Some(seq) => format!(
            ", going on from seq {seq} of an archived log (its first record, audit.archived, \
             says where that log went)"
        ),
    };
    println!(
        "{}: ok, {} records{continues}, chain intact{tail}{}",
        paths.audit_log.display(),
        report.records,
        keying(&report)
    );
    0
}

/// Bad records listed one per line; the rest are counted.
const MAX_LISTED_PROBLEMS: usize = 100;

/// Every bad record on its own line, then what was and was not checked.
fn report_problems(all: &Verification) {
    for p in &all.problems {
        eprintln!("keyturn: {p}");
    }
    let count = all.problems.len() as u64 + all.more;
    let more = match all.more {
        0 => String::new(),
        n => format!(" ({n} more not listed)"),
    };
    let checked = match all.stopped_at {
        Some(0) => "nothing could be checked".to_owned(),
        Some(line) => {
            format!("checking stopped at line {line}: the records from there on were NOT checked")
        }
        None => "the whole log was checked; the records between the bad ones are chained \
                 to the records around them as found"
            .to_owned(),
    };
    eprintln!("keyturn: {count} problem(s) found{more}; {checked}");
}

/// Whether the chain was checked with the audit key, for the report.
fn keying(report: &VerifyReport) -> String {
    match report.keyed_from {
        None if report.records == 0 => String::new(),
        Some(seq) => format!("; keyed (hmac-sha256) from seq {seq}, checked with the audit key"),
        None => "; plain sha-256, not keyed (no audit key: not proof against whoever can write both the log and the state database)".into(),
    }
}

/// `keyturn audit archive`: the old log moved aside, a new one started that
/// carries on its chain (see [`crate::audit::archive`]).
pub(super) fn audit_archive(path: &Path, to: Option<&Path>, broken: bool) -> u8 {
    let paths = match load_for_client(path) {
        Ok(c) => c.paths(),
        Err(code) => return code,
    };
    // Held until the new head is stored: no daemon starts meanwhile.
    let _lock = match crate::state::lock::acquire(&paths.state_dir) {
        Ok(l) => l,
        Err(e) => {
            match crate::state::lock::held(&paths.state_dir) {
                Some(holder) => eprintln!(
                    "keyturn: a keyturn daemon{} is running on {}: stop it first (`systemctl stop \
                     keyturn`); the log is archived only while no daemon writes it",
                    holder
                        .pid
                        .map(|p| format!(" (pid {p})"))
                        .unwrap_or_default(),
                    paths.state_dir.display()
                ),
                None => eprintln!("keyturn: {e}"),
            }
            return EXIT_FAILED;
        }
    };
    let log = &paths.audit_log;
    let db = crate::daemon::state_db_in(&paths.state_dir);
    let no_state = |why: &str| {
        eprintln!(
            "keyturn: {why}: there is no chain to go on from. Restore the state database from a \
             backup first; or, to really start over with new version numbers, move the audit log \
             away (`mv {} {}.old`) and start the daemon",
            log.display(),
            log.display()
        );
        EXIT_FAILED
    };
    if !db.exists() {
        return no_state(&format!("there is no state database at {}", db.display()));
    }
    let store = match SqliteStore::open(&db) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keyturn: {e}");
            return EXIT_FAILED;
        }
    };
    let head = match store.audit_head() {
        Ok(Some(h)) => h,
        Ok(None) => {
            return no_state(&format!(
                "the state database {} records no audit head",
                db.display()
            ));
        }
        Err(e) => {
            eprintln!("keyturn: {e}");
            return EXIT_FAILED;
        }
    };
    let key = match AuditKey::load(paths.audit_key_file.as_deref()) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("keyturn: cannot load the audit key: {e}");
            return EXIT_FAILED;
        }
    };
    // Black-box finding: an archive without the key turned a keyed log
    // back to plain (a new plain chain the daemon then went on without the
    // key), which `audit verify` refuses and the key is there to prevent.
    if key.is_none()
        && log.exists()
        && let Some(seq) =
            keyed_tail(log).or_else(|| verify_all(log, Some(&head), None, 1).report.keyed_from)
    {
        eprintln!(
            "keyturn: {} is keyed (hmac-sha256; record seq {seq}) and no audit key is given: the \
             new log's first record must be keyed too. {} (for the packaged unit's encrypted \
             credential: `systemd-run --pipe --wait -p User=keyturn \
             -p LoadCredentialEncrypted=keyturn-audit-key:/etc/keyturn/audit-key.cred \
             keyturn audit archive ...`)",
            log.display(),
            KEY_HINT
        );
        return EXIT_FAILED;
    }
    let continues = if log.exists() {
        let all = verify_all(log, Some(&head), key.as_ref(), MAX_LISTED_PROBLEMS);
        match all.problems.first() {
            None => Continues::Intact,
            Some(first) if broken => {
                let count = all.problems.len() as u64 + all.more;
                Continues::Broken(format!("{first} ({count} problem(s) in all)"))
            }
            Some(_) => {
                report_problems(&all);
                eprintln!(
                    "keyturn: {} does not verify: it is not archived as it is. Restore it from a \
                     backup if you can; to keep it as evidence and go on with a new log that \
                     links to the last record the state database vouches for (seq {}), run \
                     `keyturn audit archive --broken`",
                    log.display(),
                    head.seq
                );
                return EXIT_FAILED;
            }
        }
    } else if broken {
        Continues::Broken(format!("the audit log {} was missing", log.display()))
    } else {
        eprintln!(
            "keyturn: there is no audit log at {} but the state database records seq {}: restore \
             the log from a backup; or, if it is gone for good, start a new log that records the \
             loss with `keyturn audit archive --broken`",
            log.display(),
            head.seq
        );
        return EXIT_FAILED;
    };
    // Absolute, as it is written into the record (black-box finding: a
    // relative one named a place relative to some shell's directory).
    let to = to.map_or_else(|| default_archive_path(log), Path::to_path_buf);
    let to = std::path::absolute(&to).unwrap_or(to);
    if to.exists() {
        eprintln!(
            "keyturn: {} already exists: give another --to",
            to.display()
        );
        return EXIT_FAILED;
    }
    // SAFETY: getuid/getgid/getpid cannot fail.
    let actor = unsafe {
        Actor::Peer {
            uid: libc::getuid(),
            gid: libc::getgid(),
            pid: libc::getpid(),
        }
    };
    let done = match archive(log, &to, Some(&head), key.as_ref(), &continues, actor) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("keyturn: {e}");
            return EXIT_FAILED;
        }
    };
    if let Err(e) = store
        .apply(&[Write::AuditHead(done.head.clone())])
        .and_then(|()| store.checkpoint())
    {
        eprintln!(
            "keyturn: the new log is in place but its head could not be stored ({e}); the \
             daemon's start accepts it when its first record links to the head stored before \
             (an old log that ended at that head), and otherwise refuses it: then free the \
             state database's volume and run `keyturn audit archive --broken`"
        );
        return EXIT_FAILED;
    }
    let moved = match &done.to {
        Some(to) => format!("moved to {} (keep it: it is the evidence)", to.display()),
        None => "was missing".to_owned(),
    };
    let broke = match &continues {
        Continues::Intact => String::new(),
        Continues::Broken(why) => format!("; recorded as broken: {why}"),
    };
    println!(
        "{}: the old log {moved}; the new log begins with an audit.archived record, seq {}{broke}",
        log.display(),
        done.head.seq
    );
    0
}
