//! `keyturn audit verify`: check the log's hash chain against the state.

use std::path::Path;

use super::{EXIT_FAILED, load_for_client};
use crate::audit::{AuditKey, Verification, VerifyReport, verify_all};
use crate::state::{SqliteStore, StateStore};

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
    println!(
        "{}: ok, {} records, chain intact{tail}{}",
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
