//! The plain tables of `keyturn status --wide` and of the agents that are
//! not simply active (`keyturn status`, `keyturn decommission`): aligned
//! columns, times in RFC 3339 to the second (UTC), `-` for what is absent.
//! And `status --json`, the same data as one document.
//! Text from elsewhere (error messages, reasons) has its control characters
//! replaced by spaces, so that it cannot break the table's lines.

use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};

use super::screen::{clean, state_label};
use crate::api::protocol::{AgentLifecycle, StatusRow, TaskView};

/// RFC 3339 to the second in UTC, or `-`.
fn time(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_else(|| "-".into())
}

/// Renders status rows as an aligned text table for humans.
///
/// Times are RFC 3339 to the second in UTC; absent values print as `-`. A
/// rotation in progress shows its step in the STATE column (`rotating:promote`).
/// LAST ERROR is the last column and is not padded, so a long message does not
/// widen every row; control characters in it are replaced by spaces so one
/// error cannot break the table's lines.
pub fn render_status_table(rows: &[StatusRow]) -> String {
    const HEADER: [&str; 9] = [
        "AGENT",
        "CREDENTIAL",
        "VAULT",
        "VERSION",
        "STAGE",
        "LAST ROTATED",
        "NEXT DUE",
        "STATE",
        "LAST ERROR",
    ];
    let cells: Vec<[String; 9]> = rows
        .iter()
        .map(|r| {
            let state = state_label(r);
            [
                r.agent.to_string(),
                r.credential.to_string(),
                clean(&r.vault),
                r.version.map_or_else(|| "-".into(), |v| v.to_string()),
                r.stage.map_or_else(|| "-".into(), |s| s.to_string()),
                time(r.last_rotated),
                if r.state.starts_with("follow") {
                    "follow".into()
                } else {
                    time(r.next_due)
                },
                clean(&state),
                r.last_error.as_deref().map_or_else(|| "-".into(), clean),
            ]
        })
        .collect();
    let mut out = render_table(&HEADER, &cells);
    // Consumers that have not acknowledged the current version, below the
    // table (rare, and too long for a column).
    for r in rows {
        let list = |l: &[String]| clean(&l.join(", "));
        if !r.awaiting_ack.is_empty() {
            let _ = writeln!(
                out,
                "{}/{}: awaiting ack: {}",
                r.agent,
                r.credential,
                list(&r.awaiting_ack)
            );
        }
        if !r.holdouts.is_empty() {
            let _ = writeln!(
                out,
                "{}/{}: holdouts (previous version retired at the grace deadline without their ack): {}",
                r.agent,
                r.credential,
                list(&r.holdouts)
            );
        }
    }
    out
}

/// Columns padded to their widest cell, two spaces apart; the last one is
/// not padded.
fn render_table<const N: usize>(header: &[&str; N], cells: &[[String; N]]) -> String {
    let mut widths = header.map(|h| h.chars().count());
    for row in cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cols: &[&str]| {
        let mut l = String::new();
        for (i, c) in cols.iter().enumerate() {
            if i + 1 == cols.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header);
    for row in cells {
        let refs: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&refs);
    }
    out
}

/// The agents that are not simply active, for `keyturn status` and
/// `keyturn decommission`: decision → revoked → verified with durations,
/// the SLA and what is left, then each pending item with its error.
pub fn render_agents_table(rows: &[AgentLifecycle]) -> String {
    fn dur(ms: Option<i64>) -> String {
        match ms {
            Some(ms) if ms < 0 => format!("-{}", dur(Some(-ms))),
            Some(ms) if ms < 10_000 => format!("{:.3}s", ms as f64 / 1000.0),
            Some(ms) => {
                humantime::format_duration(std::time::Duration::from_secs((ms / 1000) as u64))
                    .to_string()
            }
            None => "-".into(),
        }
    }
    let header = [
        "AGENT", "STATE", "DECIDED", "REVOKED", "VERIFIED", "SLA", "LEFT", "ITEMS", "REASON",
    ];
    let cells: Vec<[String; 9]> = rows
        .iter()
        .map(|r| {
            let decided = match r.state.as_str() {
                "orphaned" => format!("orphaned since {}", time(r.orphaned_since)),
                _ => time(r.decided_at),
            };
            [
                r.agent.to_string(),
                clean(&r.state),
                decided,
                match r.revoked_at {
                    Some(_) => format!("+{}", dur(r.to_revoked_ms)),
                    None => "-".into(),
                },
                match r.verified_at {
                    Some(_) => format!("+{}", dur(r.to_verified_ms)),
                    None => "-".into(),
                },
                r.sla_seconds
                    .map_or_else(|| "-".into(), |s| dur(Some(s as i64 * 1000))),
                dur(r.remaining_ms),
                if r.state == "orphaned" {
                    "-".into()
                } else {
                    format!("{}/{}/{}", r.verified, r.revoked, r.items)
                },
                clean(r.reason.as_deref().unwrap_or("-")),
            ]
        })
        .collect();
    let mut out = render_table(&header, &cells);
    out.push_str(
        "(ITEMS: verified/revoked/total; REVOKED and VERIFIED: time after the decision)\n",
    );
    for r in rows {
        if let Some(t) = &r.tokens {
            let _ = writeln!(
                out,
                "  {} tokens issued up to {}: {}",
                r.agent,
                time(Some(t.issued_up_to)),
                match t.verified_at {
                    Some(_) => format!(
                        "inactive, verified +{} after the decision",
                        dur(t.to_verified_ms)
                    ),
                    None => "inactive, not verified yet".into(),
                }
            );
        }
        for p in &r.pending {
            let _ = writeln!(
                out,
                "  {} pending {}: {} attempt(s){}",
                r.agent,
                clean(&p.item),
                p.attempts,
                p.last_error
                    .as_deref()
                    .map(|e| format!(", last error: {}", clean(e)))
                    .unwrap_or_default()
            );
        }
    }
    out
}

/// `status --json`: what the text view shows, as one document. Every
/// credential; every task not ended (`null` when they could not be read);
/// every agent that is not simply active (decommissioning or decommissioned,
/// with its SLA, deadline, time left and each pending item with its
/// attempts and last error; or orphaned).
pub fn render_status_json(
    credentials: &[StatusRow],
    tasks: Option<&[TaskView]>,
    agents: &[AgentLifecycle],
) -> serde_json::Result<String> {
    #[derive(serde::Serialize)]
    struct StatusJson<'a> {
        credentials: &'a [StatusRow],
        tasks: Option<&'a [TaskView]>,
        agents: &'a [AgentLifecycle],
    }
    serde_json::to_string_pretty(&StatusJson {
        credentials,
        tasks,
        agents,
    })
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::api::protocol::tests::row;
    use crate::model::{AgentId, CredentialId};

    #[test]
    fn status_table_is_aligned_with_dashes_for_none() {
        let mut second = row();
        second.agent = AgentId::new("a").unwrap();
        second.credential = CredentialId::new("very-long-credential").unwrap();
        second.version = None;
        second.stage = None;
        second.last_rotated = None;
        second.next_due = Some(Utc.with_ymd_and_hms(2025, 6, 1, 0, 0, 0).unwrap());
        second.state = "failed".into();
        second.step = None;
        second.last_error = Some("vault local: disk full\nretrying".into());
        let table = render_status_table(&[row(), second]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("AGENT        CREDENTIAL            VAULT  VERSION"));
        assert!(
            lines[0].ends_with("STATE             LAST ERROR"),
            "{table}"
        );
        assert!(lines[1].contains("2025-01-02T03:04:05Z"), "{table}");
        assert!(lines[1].contains("rotating:promote"), "{table}");
        assert!(lines[1].ends_with(" -"), "{table}");
        assert!(lines[2].contains("2025-06-01T00:00:00Z"), "{table}");
        assert!(
            lines[2].ends_with("vault local: disk full retrying"),
            "{table}"
        );
        // Columns line up: NEXT DUE starts at the same offset on every line.
        let col = lines[0].find("NEXT DUE").unwrap();
        assert_eq!(&lines[1][col..col + 1], "-");
        assert_eq!(&lines[2][col..col + 4], "2025");
        // No rows: just the header.
        assert_eq!(render_status_table(&[]).lines().count(), 1);
    }

    #[test]
    fn status_lists_awaited_consumers_and_holdouts_below_the_table() {
        let mut row = StatusRow {
            agent: AgentId::new("a").unwrap(),
            state: "idle".into(),
            step: None,
            ..row()
        };
        let plain = render_status_table(std::slice::from_ref(&row));
        assert_eq!(plain.lines().count(), 2, "{plain}");
        row.holdouts = vec!["file:/run/a/db (ack=open)".into()];
        let table = render_status_table(std::slice::from_ref(&row));
        assert!(table.starts_with(&plain), "{table}");
        assert!(
            table.ends_with("a/db: holdouts (previous version retired at the grace deadline without their ack): file:/run/a/db (ack=open)\n"),
            "{table}"
        );
        // JSON: the lists are left out when empty.
        row.holdouts.clear();
        assert!(!serde_json::to_string(&row).unwrap().contains("holdouts"));
    }

    /// `status --json` whole, against `status.golden.json` beside this
    /// file: a decommission with its SLA, time left and a pending item,
    /// and an orphan, after the credentials and tasks.
    #[test]
    fn status_json_is_the_golden_document() {
        use crate::api::protocol::PendingItem;
        let at = |h: u32| Utc.with_ymd_and_hms(2025, 3, 1, h, 0, 0).unwrap();
        let decommissioning = AgentLifecycle {
            agent: AgentId::new("old-bot").unwrap(),
            state: "decommissioning".into(),
            owner: "alice@example.com".into(),
            tenant: "acme".into(),
            tier: "high".into(),
            orphaned_since: None,
            decided_at: Some(at(10)),
            actor: Some("uid 0".into()),
            by: Some("alice".into()),
            reason: Some("retired".into()),
            source: Some("command".into()),
            sla_seconds: Some(3600),
            deadline: Some(at(11)),
            remaining_ms: Some(1_800_000),
            revoked_at: None,
            verified_at: None,
            to_revoked_ms: None,
            to_verified_ms: None,
            items: 2,
            revoked: 1,
            verified: 1,
            pending: vec![PendingItem {
                item: "old-bot/db@bao".into(),
                attempts: 3,
                last_error: Some("vault bao: HTTP 503".into()),
            }],
            tokens: None,
        };
        let orphan = AgentLifecycle {
            agent: AgentId::new("gone-bot").unwrap(),
            state: "orphaned".into(),
            owner: "bob@example.com".into(),
            tenant: "acme".into(),
            tier: "low".into(),
            orphaned_since: Some(at(9)),
            decided_at: None,
            actor: None,
            by: None,
            reason: None,
            source: None,
            sla_seconds: None,
            deadline: None,
            remaining_ms: None,
            revoked_at: None,
            verified_at: None,
            to_revoked_ms: None,
            to_verified_ms: None,
            items: 0,
            revoked: 0,
            verified: 0,
            pending: Vec::new(),
            tokens: None,
        };
        let doc = render_status_json(&[row()], Some(&[]), &[decommissioning, orphan]).unwrap();
        assert_eq!(
            format!("{doc}\n"),
            include_str!("status.golden.json"),
            "status --json changed; if on purpose, update src/cli/status.golden.json to:\n{doc}"
        );
        // With no agents to show, the key is still there (an empty list).
        let empty = render_status_json(&[], None, &[]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&empty).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"credentials": [], "tasks": null, "agents": []})
        );
    }
}
