//! `keyturn audit verify`: walks the whole log, re-hashing every line, and
//! names the first record that breaks the chain.
//!
//! What each tampering looks like from here:
//! - a record edited in place: the *next* record's `prev` no longer matches
//!   (or the edited line no longer parses);
//! - a record deleted: a gap in `seq` where it was;
//! - two records swapped: `seq` goes backwards / jumps;
//! - the tail cut off: invisible from the file alone (it is a valid shorter
//!   chain), which is why the state database keeps the head; pass it in
//!   (`keyturn audit verify` does not call a log good without it).
//!
//! A keyed record (`"chain":"hmac-sha256"`) is checked with the audit key:
//! its `prev` must be the HMAC of the line before. Plain records may come
//! before keyed ones (a key configured later), never after them (a
//! downgrade); and when the key is given, the last record must be keyed, or
//! a whole log rewritten without the key would pass. Without the key, a
//! keyed record cannot be checked: that is an error, not a pass.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use super::log::link_as;
use super::{AuditKey, AuditRecord, GENESIS, KEY_HINT};
use crate::state::AuditHead;

/// Longer lines are refused rather than buffered (records are a few hundred bytes).
const MAX_LINE: u64 = 1024 * 1024;

/// What a good log contains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Complete records checked.
    pub records: u64,
    /// The last record's seq and hash; None for an empty log.
    pub head: Option<AuditHead>,
    /// The file ends with a partial line: an append the process died in the
    /// middle of, never acknowledged. Not tampering; the daemon cuts it on start.
    pub partial_tail: bool,
    /// The seq of the first keyed record, checked with the audit key (records
    /// from there on are all keyed); `None` for a plain chain.
    pub keyed_from: Option<u64>,
    /// The log begins with an `audit.archived` record (`keyturn audit
    /// archive`): the seq of the archived log's last record it goes on
    /// from. Its link is to a record in the archive (or, when that log was
    /// broken, to the state's head), not to [`GENESIS`].
    pub continues_from: Option<u64>,
}

/// The first bad record: where it is and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit log {path}{}: {problem}", location(.line, .seq))]
pub struct VerifyError {
    pub path: String,
    /// 1-based line number, where the problem is on a line.
    pub line: Option<u64>,
    /// The record's seq, where it could be read.
    pub seq: Option<u64>,
    pub problem: Problem,
}

fn location(line: &Option<u64>, seq: &Option<u64>) -> String {
    match (line, seq) {
        (Some(l), Some(s)) => format!(" line {l} (seq {s})"),
        (Some(l), None) => format!(" line {l}"),
        (None, _) => String::new(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("cannot read: {0}")]
    Io(String),
    #[error("not a valid audit record ({0}): the line was edited or damaged")]
    Unparsable(String),
    #[error("expected seq {expected}: records before it were deleted or reordered")]
    SeqGap { expected: u64, found: u64 },
    #[error(
        "expected seq {expected}: the record is repeated or out of order (duplicated or reordered)"
    )]
    SeqRepeat { expected: u64, found: u64 },
    #[error(
        "the first record does not point to GENESIS: the beginning of the log was removed or edited"
    )]
    NotGenesis,
    #[error(
        "prev hash does not match line {prev_line}: the record before it was edited, deleted or reordered"
    )]
    PrevMismatch { prev_line: u64 },
    #[error(
        "ends at seq {last_seq} but the state database records seq {head_seq}: the tail was truncated"
    )]
    Truncated { last_seq: u64, head_seq: u64 },
    #[error(
        "hash differs from the head recorded in the state database: the record was edited, or the tail was cut and rewritten"
    )]
    HeadMismatch,
    #[error(
        "prev HMAC does not match line {prev_line}: the record before it was edited, deleted or reordered, or the chain was rebuilt without the audit key (or with another key)"
    )]
    HmacMismatch { prev_line: u64 },
    #[error(
        "a plain (unkeyed) record after keyed ones: the chain was rebuilt without the audit key (a downgrade)"
    )]
    Downgrade,
    #[error(
        "the record is keyed (hmac-sha256) and no audit key was given, so the keyed part of the log (from this record on) could not be checked; {KEY_HINT}"
    )]
    NoKey,
    #[error(
        "the last record is plain (unkeyed) although the audit key is configured: the log was rewritten without the key, or the daemon has not run since the key was configured"
    )]
    UnkeyedEnd,
}

/// Streams the log at `path` and checks every link. With `head` (from the
/// state database), also checks the log reaches it: the record at
/// `head.seq` must exist and hash to `head.hash`. Without the audit key; a
/// keyed log fails with [`Problem::NoKey`].
pub fn verify_file(path: &Path, head: Option<&AuditHead>) -> Result<VerifyReport, VerifyError> {
    verify_file_keyed(path, head, None)
}

/// [`verify_file`] with the audit key, when one is configured: keyed
/// links are checked with it, and the log must end keyed. The error is
/// the first bad record ([`verify_all`] goes on past it).
pub fn verify_file_keyed(
    path: &Path,
    head: Option<&AuditHead>,
    key: Option<&AuditKey>,
) -> Result<VerifyReport, VerifyError> {
    let mut all = verify_all(path, head, key, 1);
    match all.problems.is_empty() {
        true => Ok(all.report),
        false => Err(all.problems.swap_remove(0)),
    }
}

/// Every bad record of a log, not only the first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// What was read, the bad records included.
    pub report: VerifyReport,
    /// The first `limit` problems, in the order of the file.
    pub problems: Vec<VerifyError>,
    /// Problems found beyond `limit`.
    pub more: u64,
    /// Where checking stopped before the end of the file (a read error, or
    /// keyed records without the key): the rest was not checked.
    pub stopped_at: Option<u64>,
}

/// Checks the whole log as [`verify_file_keyed`] does, but goes on past a
/// bad record: each record after one is checked against the record before
/// it as found, so an edit, a deletion or a reordering is named once, where
/// it is, and the records around it are still checked. A line that is not
/// a record is skipped (counted as one record for `seq`). Stops only where
/// nothing after can be checked: a read error, or keyed records without the
/// key. Keeps the first `limit` problems and counts the rest.
pub fn verify_all(
    path: &Path,
    head: Option<&AuditHead>,
    key: Option<&AuditKey>,
    limit: usize,
) -> Verification {
    let display = path.display().to_string();
    let fail = |line: Option<u64>, seq: Option<u64>, problem: Problem| VerifyError {
        path: display.clone(),
        line,
        seq,
        problem,
    };
    let mut out = Verification {
        report: VerifyReport {
            records: 0,
            head: None,
            partial_tail: false,
            keyed_from: None,
            continues_from: None,
        },
        problems: Vec::new(),
        more: 0,
        stopped_at: None,
    };
    let mut found = |e: VerifyError| {
        if out.problems.len() < limit {
            out.problems.push(e);
        } else {
            out.more += 1;
        }
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => {
            found(fail(None, None, Problem::Io(e.to_string())));
            out.stopped_at = Some(0);
            return out;
        }
    };
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let head = head.filter(|h| h.seq > 0);

    let mut buf = Vec::with_capacity(1024);
    let mut line_no = 0u64;
    let mut last: Option<AuditHead> = None;
    // The previous record's line, to link to; empty after a line that is
    // not a record (the next record is then not linked to it).
    let mut prev_line: Vec<u8> = Vec::with_capacity(1024);
    let mut prev_bad = false;
    // The seq expected next, once a record has been read.
    let mut expected = 1u64;
    let mut keyed_from = None;
    let mut continues_from = None;
    let mut partial_tail = false;
    let mut head_seen = false;
    let mut stopped_at = None;
    loop {
        buf.clear();
        let n = match (&mut reader).take(MAX_LINE + 1).read_until(b'\n', &mut buf) {
            Ok(n) => n,
            Err(e) => {
                found(fail(Some(line_no + 1), None, Problem::Io(e.to_string())));
                stopped_at = Some(line_no + 1);
                break;
            }
        };
        if n == 0 {
            break;
        }
        line_no += 1;
        if buf.last() != Some(&b'\n') {
            if n as u64 <= MAX_LINE {
                // Only the end of the file can stop a line short of its
                // newline. A crash appending the next record leaves its
                // beginning; anything else was written by someone else.
                partial_tail = true;
                if !crate::audit::log::crash_prefix(&buf, expected) {
                    found(fail(
                        Some(line_no),
                        None,
                        Problem::Unparsable(format!(
                            "{n} byte(s) after the last record are not the beginning of record seq {expected}, as a crash mid-append leaves: something else wrote them"
                        )),
                    ));
                }
                break;
            }
            found(fail(
                Some(line_no),
                None,
                Problem::Unparsable(format!("longer than {MAX_LINE} bytes")),
            ));
            // The rest of the long line.
            loop {
                buf.clear();
                match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut buf) {
                    Ok(0) => break,
                    Ok(_) if buf.last() == Some(&b'\n') => break,
                    Ok(_) => {}
                    Err(e) => {
                        found(fail(Some(line_no), None, Problem::Io(e.to_string())));
                        stopped_at = Some(line_no);
                        break;
                    }
                }
            }
            if stopped_at.is_some() {
                break;
            }
            prev_bad = true;
            expected += 1;
            continue;
        }
        let line = &buf[..buf.len() - 1];
        let record: AuditRecord = match serde_json::from_slice(line) {
            Ok(r) => r,
            Err(e) => {
                found(fail(
                    Some(line_no),
                    None,
                    Problem::Unparsable(e.to_string()),
                ));
                prev_bad = true;
                expected += 1;
                continue;
            }
        };
        let at = |problem| fail(Some(line_no), Some(record.seq), problem);
        // A log `keyturn audit archive` started goes on from the old one's seq.
        if line_no == 1 && record.seq > 1 && record.event.event == super::ARCHIVED_EVENT {
            expected = record.seq;
            continues_from = Some(record.seq - 1);
            // The state's head may still be the last record before the
            // archive (`audit archive` killed before it stored the new
            // one; black-box finding: verify called that a cut tail):
            // the first record links to it.
            if let Some(h) = head
                && h.seq + 1 == record.seq
                && h.hash == record.prev
            {
                head_seen = true;
            }
        }

        // One problem per record: the first of these that holds.
        let mut problem = None;
        if prev_bad {
            // Its seq may be off by the lines skipped; its link cannot be checked.
        } else if record.seq > expected {
            problem = Some(Problem::SeqGap {
                expected,
                found: record.seq,
            });
        } else if record.seq < expected {
            problem = Some(Problem::SeqRepeat {
                expected,
                found: record.seq,
            });
        }
        match (record.chain, keyed_from) {
            (Some(_), None) => keyed_from = Some(record.seq),
            (None, Some(_)) => {
                problem.get_or_insert(Problem::Downgrade);
            }
            _ => {}
        }
        let Some(own) = link_as(record.chain, key, line) else {
            if let Some(p) = problem {
                found(at(p));
            }
            found(at(Problem::NoKey));
            stopped_at = Some(line_no);
            break;
        };
        if problem.is_none() && !prev_bad {
            if line_no == 1 {
                if record.prev != GENESIS && continues_from.is_none() {
                    problem = Some(Problem::NotGenesis);
                }
            } else if link_as(record.chain, key, &prev_line).as_ref() != Some(&record.prev) {
                let prev_line = line_no - 1;
                problem = Some(match record.chain {
                    None => Problem::PrevMismatch { prev_line },
                    Some(_) => Problem::HmacMismatch { prev_line },
                });
            }
        }
        // The head a writer stored after this record: its own kind of link.
        let this = AuditHead {
            seq: record.seq,
            hash: own,
        };
        if let Some(h) = head
            && h.seq == this.seq
        {
            if h.hash != this.hash {
                problem.get_or_insert(Problem::HeadMismatch);
            }
            head_seen = true;
        }
        if let Some(p) = problem {
            found(at(p));
        }
        expected = this.seq + 1;
        last = Some(this);
        prev_bad = false;
        prev_line.clear();
        prev_line.extend_from_slice(line);
    }
    if stopped_at.is_none() {
        if key.is_some()
            && let Some(l) = &last
            && keyed_from.is_none()
        {
            found(fail(
                Some(line_no - partial_tail as u64),
                Some(l.seq),
                Problem::UnkeyedEnd,
            ));
        }
        if let Some(h) = head
            && !head_seen
        {
            let last_seq = last.as_ref().map_or(0, |l| l.seq);
            found(fail(
                None,
                None,
                Problem::Truncated {
                    last_seq,
                    head_seq: h.seq,
                },
            ));
        }
    }
    out.report = VerifyReport {
        records: last
            .as_ref()
            .map_or(0, |l| l.seq - continues_from.unwrap_or(0)),
        head: last,
        partial_tail,
        keyed_from,
        continues_from,
    };
    out.stopped_at = stopped_at;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::log::tests::write_log;

    struct Fixture {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        head: AuditHead,
        lines: Vec<String>,
    }

    /// A good log of ten records.
    fn fixture() -> Fixture {
        fixture_with(|path| write_log(path, 10))
    }

    /// The log `write` writes, returning its head.
    fn fixture_with(write: impl FnOnce(&Path) -> AuditHead) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let head = write(&path);
        let lines = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        Fixture {
            _dir: dir,
            path,
            head,
            lines,
        }
    }

    impl Fixture {
        fn rewrite(&self, lines: &[String]) {
            let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
            std::fs::write(&self.path, text).unwrap();
        }
        fn verify(&self, head: Option<&AuditHead>) -> Result<VerifyReport, VerifyError> {
            verify_file(&self.path, head)
        }
    }

    #[test]
    fn a_good_log_verifies() {
        let f = fixture();
        let report = f.verify(Some(&f.head)).unwrap();
        assert_eq!(
            report,
            VerifyReport {
                records: 10,
                head: Some(f.head.clone()),
                partial_tail: false,
                keyed_from: None,
                continues_from: None,
            }
        );
        assert_eq!(f.verify(None).unwrap().records, 10);
    }

    #[test]
    fn an_edited_record_is_named_by_the_next_one() {
        let f = fixture();
        let mut lines = f.lines.clone();
        assert!(lines[4].contains("event-5"));
        lines[4] = lines[4].replace("event-5", "event-6");
        f.rewrite(&lines);
        let err = f.verify(None).unwrap_err();
        assert_eq!((err.line, err.seq), (Some(6), Some(6)));
        assert_eq!(err.problem, Problem::PrevMismatch { prev_line: 5 });
        assert_eq!(
            err.to_string(),
            format!(
                "audit log {} line 6 (seq 6): prev hash does not match line 5: \
                 the record before it was edited, deleted or reordered",
                f.path.display()
            )
        );
    }

    #[test]
    fn a_deleted_record_is_a_seq_gap() {
        let f = fixture();
        let mut lines = f.lines.clone();
        lines.remove(4);
        f.rewrite(&lines);
        let err = f.verify(None).unwrap_err();
        assert_eq!((err.line, err.seq), (Some(5), Some(6)));
        assert_eq!(
            err.problem,
            Problem::SeqGap {
                expected: 5,
                found: 6
            }
        );
    }

    #[test]
    fn swapped_records_are_detected() {
        let f = fixture();
        let mut lines = f.lines.clone();
        lines.swap(3, 4);
        f.rewrite(&lines);
        let err = f.verify(None).unwrap_err();
        assert_eq!((err.line, err.seq), (Some(4), Some(5)));
        assert!(matches!(err.problem, Problem::SeqGap { expected: 4, .. }));

        // Swapped *and* renumbered: the hashes still give it away.
        let mut renumbered = f.lines.clone();
        renumbered.swap(3, 4);
        renumbered[3] = renumbered[3].replace(r#""seq":5,"#, r#""seq":4,"#);
        renumbered[4] = renumbered[4].replace(r#""seq":4,"#, r#""seq":5,"#);
        f.rewrite(&renumbered);
        let err = f.verify(None).unwrap_err();
        assert_eq!(err.line, Some(4));
        assert_eq!(err.problem, Problem::PrevMismatch { prev_line: 3 });
    }

    #[test]
    fn a_cut_tail_is_detected_only_with_the_head() {
        let f = fixture();
        f.rewrite(&f.lines[..9]);
        assert_eq!(f.verify(None).unwrap().records, 9);
        let err = f.verify(Some(&f.head)).unwrap_err();
        assert_eq!(
            err.problem,
            Problem::Truncated {
                last_seq: 9,
                head_seq: 10
            }
        );
        assert!(err.to_string().contains("the tail was truncated"), "{err}");
    }

    #[test]
    fn a_rewritten_tail_does_not_match_the_head() {
        let f = fixture();
        // An attacker cuts record 10 and writes another, correctly chained one.
        let mut lines = f.lines[..9].to_vec();
        let mut forged: AuditRecord = serde_json::from_str(&f.lines[9]).unwrap();
        forged.event.detail = Some("nothing happened".into());
        lines.push(serde_json::to_string(&forged).unwrap());
        f.rewrite(&lines);
        assert_eq!(
            f.verify(None).unwrap().records,
            10,
            "the chain itself is valid"
        );
        let err = f.verify(Some(&f.head)).unwrap_err();
        assert_eq!((err.line, err.seq), (Some(10), Some(10)));
        assert_eq!(err.problem, Problem::HeadMismatch);
    }

    #[test]
    fn garbage_and_a_moved_start_are_named() {
        let f = fixture();
        let mut lines = f.lines.clone();
        lines[2] = "not json".into();
        f.rewrite(&lines);
        let err = f.verify(None).unwrap_err();
        assert_eq!((err.line, err.seq), (Some(3), None));
        assert!(matches!(err.problem, Problem::Unparsable(_)));
        assert!(
            err.to_string()
                .contains(" line 3: not a valid audit record"),
            "{err}"
        );

        let mut lines = f.lines.clone();
        lines[0] = lines[0].replace(GENESIS, &"1".repeat(64));
        f.rewrite(&lines);
        assert_eq!(f.verify(None).unwrap_err().problem, Problem::NotGenesis);

        f.rewrite(&f.lines[1..]);
        let err = f.verify(None).unwrap_err();
        assert_eq!(
            err.problem,
            Problem::SeqGap {
                expected: 1,
                found: 2
            }
        );
    }

    #[test]
    fn every_bad_record_is_named_not_only_the_first() {
        let f = fixture_with(|path| write_log(path, 20));
        let mut lines = f.lines.clone();
        // An edit of record 3, a garbled record 8, record 13 deleted.
        lines[2] = lines[2].replace("event-3", "event-x");
        lines[7] = "garbage".into();
        lines.remove(12);
        f.rewrite(&lines);
        let all = verify_all(&f.path, Some(&f.head), None, 100);
        let found: Vec<_> = all
            .problems
            .iter()
            .map(|e| (e.line, e.seq, e.problem.clone()))
            .collect();
        assert!(matches!(found[1].2, Problem::Unparsable(_)), "{found:?}");
        assert_eq!(
            found,
            vec![
                (Some(4), Some(4), Problem::PrevMismatch { prev_line: 3 }),
                (Some(8), None, found[1].2.clone()),
                (
                    Some(13),
                    Some(14),
                    Problem::SeqGap {
                        expected: 13,
                        found: 14
                    }
                ),
            ],
            "each named once, where it is; the records after each still checked"
        );
        assert_eq!((all.more, all.stopped_at), (0, None));
        assert_eq!(all.report.records, 20);
        // The first is what verify_file_keyed reports.
        assert_eq!(
            f.verify(Some(&f.head)).unwrap_err(),
            all.problems[0].clone()
        );

        // Beyond the limit, counted; a cut tail is still found at the end.
        f.rewrite(&lines[..15]);
        let all = verify_all(&f.path, Some(&f.head), None, 2);
        assert_eq!(all.problems.len(), 2);
        assert_eq!(all.more, 2, "{all:?}");

        // Keyed records without the key: checking stops there and says so.
        let k = fixture_with(|path| {
            let h = write_log(path, 3);
            crate::audit::log::tests::append_keyed(
                path,
                Some(&h),
                4,
                6,
                Some(crate::audit::log::tests::test_key(b'a')),
            )
        });
        let mut lines = k.lines.clone();
        lines[0] = lines[0].replace("event-1", "event-x");
        k.rewrite(&lines);
        let all = verify_all(&k.path, Some(&k.head), None, 100);
        let found: Vec<_> = all.problems.iter().map(|e| e.problem.clone()).collect();
        assert_eq!(
            found,
            vec![Problem::PrevMismatch { prev_line: 1 }, Problem::NoKey]
        );
        assert_eq!(all.stopped_at, Some(4));
    }

    #[test]
    fn a_line_too_long_is_skipped_and_the_rest_checked() {
        let f = fixture();
        let mut lines = f.lines.clone();
        lines[3] = "x".repeat(MAX_LINE as usize + 10);
        f.rewrite(&lines);
        let all = verify_all(&f.path, Some(&f.head), None, 100);
        assert_eq!(all.problems.len(), 1, "{:?}", all.problems);
        assert_eq!(all.problems[0].line, Some(4));
        assert!(all.problems[0].to_string().contains("longer than"));
        assert_eq!(all.report.records, 10);
    }

    #[test]
    fn a_partial_last_line_is_reported_not_failed() {
        let f = fixture();
        let mut text = std::fs::read(&f.path).unwrap();
        text.extend_from_slice(br#"{"seq":11,"#);
        std::fs::write(&f.path, text).unwrap();
        let report = f.verify(Some(&f.head)).unwrap();
        assert_eq!(report.records, 10);
        assert!(report.partial_tail);
    }

    /// Black-box finding: 9.5 KB appended without a newline passed as
    /// a crash's partial line. Only a beginning of the next record is.
    #[test]
    fn bytes_after_the_last_record_that_no_crash_leaves_fail() {
        let f = fixture();
        let mut text = std::fs::read(&f.path).unwrap();
        text.extend_from_slice(b"ATTACKER WAS HERE; ");
        std::fs::write(&f.path, text).unwrap();
        let e = f.verify(Some(&f.head)).unwrap_err();
        assert!(
            e.to_string().contains(
                "19 byte(s) after the last record are not the beginning of record seq 11"
            ),
            "{e}"
        );
        // The beginning of another seq is no crash of this log's either.
        let f = fixture();
        let mut text = std::fs::read(&f.path).unwrap();
        text.extend_from_slice(br#"{"seq":12,"ts":"2026"#);
        std::fs::write(&f.path, text).unwrap();
        assert!(f.verify(Some(&f.head)).is_err());
    }

    #[test]
    fn empty_and_missing_logs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let err = verify_file(&path, None).unwrap_err();
        assert!(matches!(err.problem, Problem::Io(_)));
        std::fs::write(&path, b"").unwrap();
        let report = verify_file(&path, None).unwrap();
        assert_eq!((report.records, report.head), (0, None));
        let head = AuditHead {
            seq: 1,
            hash: "0".repeat(64),
        };
        assert!(matches!(
            verify_file(&path, Some(&head)).unwrap_err().problem,
            Problem::Truncated {
                last_seq: 0,
                head_seq: 1
            }
        ));
    }

    mod keyed {
        use super::*;
        use crate::audit::Chain;
        use crate::audit::log::line_hash;
        use crate::audit::log::tests::{append_keyed, test_key, write_log};

        /// A log of ten records, all keyed with `test_key(b'a')`.
        fn keyed_fixture() -> Fixture {
            fixture_with(|path| append_keyed(path, None, 1, 10, Some(test_key(b'a'))))
        }

        /// What an attacker who can write the log and the state database
        /// does: rewrites every record's link with `link` (and the `chain`
        /// field with `chain`), and computes the head the state would hold.
        fn rebuild(
            lines: &[String],
            link: impl Fn(&[u8]) -> String,
            chain: Option<Chain>,
        ) -> (Vec<String>, AuditHead) {
            let mut out: Vec<String> = Vec::new();
            for l in lines {
                let mut r: AuditRecord = serde_json::from_str(l).unwrap();
                r.prev = out
                    .last()
                    .map_or_else(|| GENESIS.to_owned(), |p| link(p.as_bytes()));
                r.chain = chain;
                out.push(serde_json::to_string(&r).unwrap());
            }
            let head = AuditHead {
                seq: out.len() as u64,
                hash: link(out.last().unwrap().as_bytes()),
            };
            (out, head)
        }

        fn edited(f: &Fixture) -> Vec<String> {
            let mut lines = f.lines.clone();
            assert!(lines[4].contains("event-5"));
            lines[4] = lines[4].replace("event-5", "event-6");
            lines
        }

        #[test]
        fn a_keyed_log_verifies_with_its_key() {
            let f = keyed_fixture();
            let key = test_key(b'a');
            let report = verify_file_keyed(&f.path, Some(&f.head), Some(&key)).unwrap();
            assert_eq!(report.records, 10);
            assert_eq!(report.keyed_from, Some(1));
            assert_eq!(report.head, Some(f.head.clone()));
            // A plain edit is still named by the next record.
            f.rewrite(&edited(&f));
            let err = verify_file_keyed(&f.path, Some(&f.head), Some(&key)).unwrap_err();
            assert_eq!((err.line, err.seq), (Some(6), Some(6)));
            assert_eq!(err.problem, Problem::HmacMismatch { prev_line: 5 });
        }

        #[test]
        fn a_chain_rebuilt_with_plain_sha256_is_detected() {
            let f = keyed_fixture();
            let key = test_key(b'a');
            // Without the key: plain links, the chain field kept or dropped,
            // and the state head updated to match.
            let (forged, head) = rebuild(&edited(&f), line_hash, Some(Chain::HmacSha256));
            f.rewrite(&forged);
            let err = verify_file_keyed(&f.path, Some(&head), Some(&key)).unwrap_err();
            assert_eq!((err.line, err.seq), (Some(2), Some(2)));
            assert_eq!(err.problem, Problem::HmacMismatch { prev_line: 1 });

            let (forged, head) = rebuild(&edited(&f), line_hash, None);
            f.rewrite(&forged);
            assert_eq!(
                verify_file(&f.path, Some(&head)).unwrap().records,
                10,
                "a consistent plain chain: only the key tells"
            );
            let err = verify_file_keyed(&f.path, Some(&head), Some(&key)).unwrap_err();
            assert_eq!((err.line, err.seq), (Some(10), Some(10)));
            assert_eq!(err.problem, Problem::UnkeyedEnd);
            assert!(
                err.to_string().contains("rewritten without the key"),
                "{err}"
            );

            // Plain from the edit on, the keyed part kept: a downgrade.
            let mut lines = f.lines.clone();
            let (tail, _) = rebuild(&edited(&f), line_hash, None);
            lines.truncate(4);
            let mut r: AuditRecord = serde_json::from_str(&tail[4]).unwrap();
            r.prev = line_hash(lines[3].as_bytes());
            lines.push(serde_json::to_string(&r).unwrap());
            f.rewrite(&lines);
            let err = verify_file_keyed(&f.path, None, Some(&key)).unwrap_err();
            assert_eq!((err.line, err.problem), (Some(5), Problem::Downgrade));
        }

        #[test]
        fn a_chain_rebuilt_with_another_key_is_detected() {
            let f = keyed_fixture();
            let wrong = test_key(b'b');
            let (forged, head) = rebuild(&edited(&f), |l| wrong.link(l), Some(Chain::HmacSha256));
            f.rewrite(&forged);
            assert!(verify_file_keyed(&f.path, Some(&head), Some(&wrong)).is_ok());
            let err = verify_file_keyed(&f.path, Some(&head), Some(&test_key(b'a'))).unwrap_err();
            assert_eq!((err.line, err.seq), (Some(2), Some(2)));
            assert_eq!(err.problem, Problem::HmacMismatch { prev_line: 1 });
        }

        #[test]
        fn a_keyed_log_without_the_key_is_not_a_pass() {
            let f = keyed_fixture();
            let err = verify_file(&f.path, Some(&f.head)).unwrap_err();
            assert_eq!((err.line, err.seq), (Some(1), Some(1)));
            assert_eq!(err.problem, Problem::NoKey);
            let text = err.to_string();
            assert!(text.contains("could not be checked"), "{text}");
            assert!(
                text.contains("audit_key_file") && text.contains("keyturn-audit-key"),
                "{text}"
            );
        }

        #[test]
        fn plain_then_keyed_verifies_and_plain_logs_still_do() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("audit.log");
            let h3 = write_log(&path, 3);
            // An old plain log, with or without a key configured since.
            let report = verify_file(&path, Some(&h3)).unwrap();
            assert_eq!((report.records, report.keyed_from), (3, None));
            let key = test_key(b'a');
            assert_eq!(
                verify_file_keyed(&path, Some(&h3), Some(&key))
                    .unwrap_err()
                    .problem,
                Problem::UnkeyedEnd,
                "the daemon has not run with the key yet"
            );
            // The daemon restarted with the key: keyed from seq 4 on.
            let h6 = append_keyed(&path, Some(&h3), 4, 6, Some(test_key(b'a')));
            let report = verify_file_keyed(&path, Some(&h6), Some(&key)).unwrap();
            assert_eq!((report.records, report.keyed_from), (6, Some(4)));
            // The state head may still be a plain one from before the switch.
            let report = verify_file_keyed(&path, Some(&h3), Some(&key)).unwrap();
            assert_eq!(report.records, 6);
        }
    }
}

/// Whether `key` is the key that keyed the end of the log at `path`: the
/// last record's link to the one before it must be that record's HMAC
/// under `key`. `Ok` when it cannot be told (no log, fewer than two
/// records, a plain end: the start says more about those). Reads the
/// file's last 1 MiB at most. `keyturn check`, the start and every reload
/// ask: a reload that named another key (or a key file rewritten with
/// another key) passed, and the next start refused the log as "truncated
/// or altered" (black-box finding).
pub fn key_matches_tail(path: &Path, key: &AuditKey) -> Result<(), String> {
    let Some((Some(before), last)) = tail(path) else {
        return Ok(());
    };
    let Ok(record) = serde_json::from_slice::<super::AuditRecord>(&last) else {
        return Ok(());
    };
    if record.chain != Some(super::Chain::HmacSha256) {
        return Ok(());
    }
    if key.link(&before) == record.prev {
        Ok(())
    } else {
        Err(format!(
            "the audit log {} was keyed with another key: its last record (seq {}) does not verify with this one, and the daemon would refuse to start on it; keep the key that wrote the log",
            path.display(),
            record.seq
        ))
    }
}

/// The sequence number of the audit log's last record at `path` when it
/// is keyed (HMAC-chained): a config that gives no audit key cannot start
/// on that log (black-box finding: `keyturn check` passed it). `None` for
/// a plain log, a missing one, or one whose tail cannot be read.
pub fn keyed_tail(path: &Path) -> Option<u64> {
    let (_, last) = tail(path)?;
    let record = serde_json::from_slice::<super::AuditRecord>(&last).ok()?;
    (record.chain == Some(super::Chain::HmacSha256)).then_some(record.seq)
}

/// The last whole line of the file at `path` (its last 1 MiB at most), and
/// the whole line before it when there is one in that window. A partial
/// last line is a crash's, cut at the start: not counted.
fn tail(path: &Path) -> Option<(Option<Vec<u8>>, Vec<u8>)> {
    use std::io::{Read, Seek, SeekFrom};
    const TAIL: u64 = 1 << 20;
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let from = len.saturating_sub(TAIL);
    file.seek(SeekFrom::Start(from)).ok()?;
    let mut tail = Vec::new();
    file.take(TAIL).read_to_end(&mut tail).ok()?;
    let end = tail.iter().rposition(|b| *b == b'\n')?;
    let mut lines = tail[..end].rsplit(|b| *b == b'\n');
    let last = lines.next()?.to_vec();
    // The first line read may be cut by the window: it is `before` only
    // when the window is the whole file or another line precedes it.
    let before = lines.next().map(<[u8]>::to_vec);
    let whole = from == 0 || lines.next().is_some();
    Some((before.filter(|_| whole), last))
}

#[cfg(test)]
mod key_tail_tests {
    use super::*;
    use crate::audit::log::tests::{append_keyed, test_key, write_log};

    /// Black-box finding: a reload (and `check`) took another audit key,
    /// and the next start refused the log. The key is checked against the
    /// log's last record.
    #[test]
    fn the_key_that_keyed_the_log_matches_its_tail_and_another_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        // No log yet, then a plain log: nothing to tell.
        key_matches_tail(&path, &test_key(1)).unwrap();
        let head = write_log(&path, 2);
        key_matches_tail(&path, &test_key(1)).unwrap();
        // Keyed from record 3 on.
        append_keyed(&path, Some(&head), 3, 4, Some(test_key(1)));
        key_matches_tail(&path, &test_key(1)).unwrap();
        let e = key_matches_tail(&path, &test_key(2)).unwrap_err();
        assert!(
            e.contains("was keyed with another key") && e.contains("seq 4"),
            "{e}"
        );
        assert!(!e.contains("KEYCANARY"), "{e}");
    }
}
