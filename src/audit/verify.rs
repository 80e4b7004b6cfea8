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

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use super::{AuditRecord, GENESIS, log::line_hash};
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
}

/// Streams the log at `path` and checks every link. With `head` (from the
/// state database), also checks the log reaches it: the record at
/// `head.seq` must exist and hash to `head.hash`.
pub fn verify_file(path: &Path, head: Option<&AuditHead>) -> Result<VerifyReport, VerifyError> {
    let display = path.display().to_string();
    let fail = |line: Option<u64>, seq: Option<u64>, problem: Problem| VerifyError {
        path: display.clone(),
        line,
        seq,
        problem,
    };
    let file = File::open(path).map_err(|e| fail(None, None, Problem::Io(e.to_string())))?;
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let head = head.filter(|h| h.seq > 0);

    let mut buf = Vec::with_capacity(1024);
    let mut line_no = 0u64;
    let mut last: Option<AuditHead> = None;
    let mut partial_tail = false;
    let mut head_seen = false;
    loop {
        buf.clear();
        let n = (&mut reader)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| fail(Some(line_no + 1), None, Problem::Io(e.to_string())))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if buf.last() != Some(&b'\n') {
            if n as u64 > MAX_LINE {
                return Err(fail(
                    Some(line_no),
                    None,
                    Problem::Unparsable(format!("longer than {MAX_LINE} bytes")),
                ));
            }
            // Only the end of the file can stop a line short of its newline.
            partial_tail = true;
            break;
        }
        let line = &buf[..buf.len() - 1];
        let record: AuditRecord = serde_json::from_slice(line)
            .map_err(|e| fail(Some(line_no), None, Problem::Unparsable(e.to_string())))?;
        let at = |problem| fail(Some(line_no), Some(record.seq), problem);

        let expected = last.as_ref().map_or(1, |h| h.seq + 1);
        if record.seq > expected {
            return Err(at(Problem::SeqGap {
                expected,
                found: record.seq,
            }));
        }
        if record.seq < expected {
            return Err(at(Problem::SeqRepeat {
                expected,
                found: record.seq,
            }));
        }
        match &last {
            None if record.prev != GENESIS => return Err(at(Problem::NotGenesis)),
            Some(prev) if record.prev != prev.hash => {
                return Err(at(Problem::PrevMismatch {
                    prev_line: line_no - 1,
                }));
            }
            _ => {}
        }
        let this = AuditHead {
            seq: record.seq,
            hash: line_hash(line),
        };
        if let Some(h) = head
            && h.seq == this.seq
        {
            if h.hash != this.hash {
                return Err(at(Problem::HeadMismatch));
            }
            head_seen = true;
        }
        last = Some(this);
    }

    if let Some(h) = head
        && !head_seen
    {
        let last_seq = last.as_ref().map_or(0, |l| l.seq);
        return Err(fail(
            None,
            None,
            Problem::Truncated {
                last_seq,
                head_seq: h.seq,
            },
        ));
    }
    Ok(VerifyReport {
        records: last.as_ref().map_or(0, |l| l.seq),
        head: last,
        partial_tail,
    })
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let head = write_log(&path, 10);
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
                partial_tail: false
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
    fn a_partial_last_line_is_reported_not_failed() {
        let f = fixture();
        let mut text = std::fs::read(&f.path).unwrap();
        text.extend_from_slice(br#"{"seq":11,"#);
        std::fs::write(&f.path, text).unwrap();
        let report = f.verify(Some(&f.head)).unwrap();
        assert_eq!(report.records, 10);
        assert!(report.partial_tail);
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
}
