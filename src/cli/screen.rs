//! `keyturn status` for a person at a terminal: every line fits the width
//! (80 columns; cells shortened with `…`, errors wrapped under their row),
//! times relative to now, and colour only when it helps: stdout a terminal,
//! `NO_COLOR` unset or empty (<https://no-color.org>), `TERM` not `dumb`;
//! `--color always|never` overrides all of that. `--wide` prints the full
//! table ([`tables::render_status_table`](super::tables::render_status_table)), `--json` everything.
//!
//! Widths are display columns (`unicode-width`), not bytes or chars. Text
//! from elsewhere (error messages) has its control characters replaced
//! first, so it can neither break lines nor smuggle escape sequences.

use std::fmt::Write as _;

use anstyle::{AnsiColor, Style};
use chrono::{DateTime, Utc};
use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

use crate::api::protocol::{AgentLifecycle, StatusRow, TaskView};

/// The terminal width assumed: what fits everywhere.
pub const WIDTH: usize = 80;
/// Lines an error may take under its row before it is cut.
const ERROR_LINES: usize = 3;

/// `--color`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// When stdout is a terminal and NO_COLOR is unset or empty.
    Auto,
    Always,
    Never,
}

/// Whether to colour: `--color`, then the conventions for `auto`.
/// `no_color` and `term` are the environment's `NO_COLOR` and `TERM`.
pub fn use_color(
    choice: ColorChoice,
    is_terminal: bool,
    no_color: Option<&std::ffi::OsStr>,
    term: Option<&std::ffi::OsStr>,
) -> bool {
    match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => {
            is_terminal && no_color.is_none_or(|v| v.is_empty()) && term.is_none_or(|t| t != "dumb")
        }
    }
}

/// [`use_color`] for this process's stdout and environment.
pub fn color_for_stdout(choice: ColorChoice) -> bool {
    use std::io::IsTerminal;
    use_color(
        choice,
        std::io::stdout().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
        std::env::var_os("TERM").as_deref(),
    )
}

/// How to draw: the width every line must fit, and whether to colour.
#[derive(Debug, Clone, Copy)]
pub struct Screen {
    pub width: usize,
    pub color: bool,
}

impl Screen {
    fn paint(&self, style: Style, text: &str) -> String {
        if self.color && style != Style::new() {
            format!("{}{text}{}", style.render(), style.render_reset())
        } else {
            text.to_owned()
        }
    }
}

const BOLD: Style = Style::new().bold();
const RED: Style = Style::new().fg_color(Some(anstyle::Color::Ansi(AnsiColor::Red)));
const YELLOW: Style = Style::new().fg_color(Some(anstyle::Color::Ansi(AnsiColor::Yellow)));
const GREEN: Style = Style::new().fg_color(Some(anstyle::Color::Ansi(AnsiColor::Green)));
const DIM: Style = Style::new().dimmed();

/// The colour of a state: trouble red, work in progress yellow.
fn state_style(state: &str) -> Style {
    if state == "follow:waiting" {
        return YELLOW;
    }
    match state.split(':').next().unwrap_or(state) {
        "failed" | "interrupted" | "orphaned" | "breached" => RED.bold(),
        "rotating" | "requested" | "retiring" | "decommissioning" | "awaiting_ack" => YELLOW,
        "idle" | "follow" => GREEN,
        "decommissioned" | "stopped" => DIM,
        _ => Style::new(),
    }
}

/// `s` with each control character and bidi override or isolate (which
/// reorders what the terminal shows: a `--reason` carried one) replaced by
/// a space.
pub(super) fn clean(s: &str) -> String {
    s.chars()
        .map(|c| {
            if crate::config::validate::is_unprintable(c) {
                ' '
            } else {
                c
            }
        })
        .collect()
}

/// A row's STATE cell: its state, with the step of a rotation in progress
/// (`rotating:promote`).
pub(super) fn state_label(r: &StatusRow) -> String {
    match &r.step {
        Some(step) => format!("{}:{}", r.state, step),
        None => r.state.clone(),
    }
}

fn width(s: &str) -> usize {
    UnicodeWidthStr::width(s)
}

/// The longest prefix of `s` at most `max` columns wide.
fn take_width(s: &str, max: usize) -> &str {
    let mut used = 0;
    for (i, c) in s.char_indices() {
        used += c.width().unwrap_or(0);
        if used > max {
            return &s[..i];
        }
    }
    s
}

/// `s` cut to `max` columns, ending in `…` when cut.
fn ellipsize(s: &str, max: usize) -> String {
    if width(s) <= max {
        return s.to_owned();
    }
    format!("{}…", take_width(s, max.saturating_sub(1)))
}

/// `s` cut to `max` columns in the middle (`invoice-pro…ent/db`), so both
/// the agent's start and the credential at the end stay readable.
fn ellipsize_middle(s: &str, max: usize) -> String {
    if width(s) <= max {
        return s.to_owned();
    }
    let keep = max.saturating_sub(1);
    let head = take_width(s, keep / 2);
    let tail_w = keep - keep / 2;
    // The shortest suffix at most `tail_w` columns wide, from the end.
    let mut start = s.len();
    let mut used = 0;
    for (i, c) in s.char_indices().rev() {
        used += c.width().unwrap_or(0);
        if used > tail_w {
            break;
        }
        start = i;
    }
    format!("{head}…{}", &s[start..])
}

/// `text` word-wrapped after `indent` into at most `max_lines` lines of
/// `width_` columns (a word longer than a line is cut across lines); the
/// last line ends in `…` when text was left over.
fn wrap(text: &str, indent: &str, width_: usize, max_lines: usize) -> Vec<String> {
    let room = width_.saturating_sub(width(indent)).max(10);
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for mut word in text.split(' ').filter(|w| !w.is_empty()) {
        loop {
            let sep = usize::from(!line.is_empty());
            if width(&line) + sep + width(word) <= room {
                if sep == 1 {
                    line.push(' ');
                }
                line.push_str(word);
                break;
            }
            if width(word) <= room {
                // It fits on a line of its own.
                lines.push(std::mem::take(&mut line));
                continue;
            }
            // Longer than any line: cut it, starting where this line is.
            let part = take_width(word, room - width(&line) - sep);
            if !part.is_empty() {
                if sep == 1 {
                    line.push(' ');
                }
                line.push_str(part);
                word = &word[part.len()..];
            }
            lines.push(std::mem::take(&mut line));
        }
    }
    if !line.is_empty() {
        lines.push(line);
    }
    if lines.len() > max_lines {
        lines.truncate(max_lines);
        if let Some(last) = lines.last_mut() {
            *last = format!("{}…", take_width(last, room - 1));
        }
    }
    lines.into_iter().map(|l| format!("{indent}{l}")).collect()
}

/// A duration in its largest unit: `45s`, `12m`, `3h`, `5d`.
fn short(d: chrono::TimeDelta) -> String {
    let s = d.num_seconds().unsigned_abs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        // Black-box finding: 1h59m47s showed as "in 1h". Below ten hours
        // the minutes are shown too.
        3600..36_000 if (s % 3600) / 60 > 0 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        3600..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// A table whose columns shrink, widest first, to fit `width`: each column
/// has a minimum and a way to shorten (middle or end).
struct Fitted<const N: usize> {
    widths: [usize; N],
}

impl<const N: usize> Fitted<N> {
    /// Columns shrink one after another, in the order of `shrink` (column,
    /// narrowest it may get), until the line fits `total`.
    fn new(
        header: &[&str; N],
        rows: &[[String; N]],
        shrink: &[(usize, usize)],
        total: usize,
    ) -> Self {
        let mut widths = header.map(width);
        for r in rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(width(c));
            }
        }
        let gaps = 2 * N.saturating_sub(1);
        for &(i, min) in shrink {
            let over = (widths.iter().sum::<usize>() + gaps).saturating_sub(total);
            widths[i] -= over.min(widths[i].saturating_sub(min));
        }
        Fitted { widths }
    }

    /// One line: each cell cut to its column (the first in the middle, the
    /// rest at the end), padded, painted with its style; the last cell is
    /// not padded.
    fn line(&self, screen: &Screen, cells: &[String; N], styles: &[Style; N]) -> String {
        let mut out = String::new();
        for i in 0..N {
            let w = self.widths[i];
            let text = if i == 0 {
                ellipsize_middle(&cells[i], w)
            } else {
                ellipsize(&cells[i], w)
            };
            out.push_str(&screen.paint(styles[i], &text));
            if i + 1 < N {
                out.push_str(&" ".repeat(w.saturating_sub(width(&text)) + 2));
            }
        }
        out.push('\n');
        out
    }
}

/// The credentials table: one line per credential, its error (wrapped)
/// and the consumers it awaits under it.
pub fn render_status(rows: &[StatusRow], now: DateTime<Utc>, screen: &Screen) -> String {
    const HEADER: [&str; 7] = [
        "CREDENTIAL",
        "VAULT",
        "VER",
        "STAGE",
        "ROTATED",
        "NEXT DUE",
        "STATE",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            let state = state_label(r);
            [
                format!("{}/{}", r.agent, r.credential),
                clean(&r.vault),
                r.version.map_or_else(|| "-".into(), |v| v.to_string()),
                r.stage.map_or_else(|| "-".into(), |s| s.to_string()),
                r.last_rotated.map_or_else(
                    || "-".into(),
                    // Stamped ahead of this clock (a clock that ran ahead
                    // was set back): said so, not "ago".
                    |t| {
                        if t > now + chrono::TimeDelta::seconds(1) {
                            format!("in {} (clock?)", short(t - now))
                        } else {
                            format!("{} ago", short(now - t))
                        }
                    },
                ),
                match r.next_due {
                    _ if r.state.starts_with("follow") => "follow".into(),
                    Some(t) if t <= now => "now".into(),
                    Some(t) => format!("in {}", short(t - now)),
                    None => "-".into(),
                },
                clean(&state),
            ]
        })
        .collect();
    // The vault names go first, then the ids (cut in the middle), then the
    // state; the rest is short anyway.
    let fit = Fitted::new(&HEADER, &cells, &[(1, 8), (0, 16), (6, 10)], screen.width);
    let mut out = fit.line(screen, &HEADER.map(str::to_owned), &[BOLD; 7]);
    let plain = Style::new();
    for (r, c) in rows.iter().zip(&cells) {
        let mut styles = [plain; 7];
        styles[6] = state_style(&c[6]);
        out.push_str(&fit.line(screen, c, &styles));
        let mut below = |label: &str, text: String, style: Style| {
            for l in wrap(
                &format!("{label}{}", clean(&text)),
                "  ",
                screen.width,
                ERROR_LINES,
            ) {
                let _ = writeln!(out, "{}", screen.paint(style, &l));
            }
        };
        if let Some(e) = &r.last_error {
            below("error: ", e.clone(), RED);
        }
        if !r.awaiting_ack.is_empty() {
            below("awaiting ack: ", r.awaiting_ack.join(", "), YELLOW);
        }
        if !r.holdouts.is_empty() {
            below(
                "holdouts (retired at the grace deadline without their ack): ",
                r.holdouts.join(", "),
                YELLOW,
            );
        }
    }
    out
}

/// Tasks listed per agent on the fitted screen; the rest are counted.
pub const TASKS_PER_AGENT: usize = 5;

/// Every task not ended, per agent, soonest to expire first: id, issuers,
/// tenant, use case, sensitivity and when it expires (`ending`: its
/// credentials are being revoked; `overdue`: past its TTL and not all
/// revoked). Fitted, at most [`TASKS_PER_AGENT`] an agent and a count line
/// for the rest; `wide`, every task with its expiry as a time. Never a
/// credential: a task view holds none.
pub fn render_tasks(tasks: &[TaskView], now: DateTime<Utc>, screen: &Screen, wide: bool) -> String {
    const HEADER: [&str; 7] = [
        "AGENT", "TASK", "ISSUERS", "TENANT", "USE CASE", "SENS", "EXPIRES",
    ];
    let mut sorted: Vec<&TaskView> = tasks.iter().collect();
    sorted.sort_by(|a, b| (&a.agent, a.expires_at).cmp(&(&b.agent, b.expires_at)));
    let mut shown: Vec<&TaskView> = Vec::new();
    // (agent, tasks not shown)
    let mut more: Vec<(&str, usize)> = Vec::new();
    for t in &sorted {
        let of_agent = shown.iter().filter(|s| s.agent == t.agent).count();
        if wide || of_agent < TASKS_PER_AGENT {
            shown.push(t);
        } else {
            match more.last_mut() {
                Some((a, n)) if *a == t.agent => *n += 1,
                _ => more.push((&t.agent, 1)),
            }
        }
    }
    let expires = |t: &TaskView| -> (String, Style) {
        let open = t.items.iter().any(|i| match i.state.as_str() {
            "verified" => false,
            "expiring" => i.expires_at.is_none_or(|e| e > now),
            _ => true,
        });
        if t.expires_at <= now && open {
            ("overdue".into(), RED.bold())
        } else if t.state == "ending" {
            ("ending".into(), YELLOW)
        } else if wide {
            (
                t.expires_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                Style::new(),
            )
        } else if t.expires_at <= now {
            ("now".into(), Style::new())
        } else {
            (format!("in {}", short(t.expires_at - now)), Style::new())
        }
    };
    let cells: Vec<[String; 7]> = shown
        .iter()
        .map(|t| {
            [
                clean(&t.agent),
                t.task.clone(),
                clean(
                    &t.items
                        .iter()
                        .map(|i| i.issuer.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                clean(&t.tenant),
                clean(&t.use_case),
                clean(&t.sensitivity),
                expires(t).0,
            ]
        })
        .collect();
    // The task id stays whole (`keyturn task end` needs it); the free text
    // shrinks first, then the agent and the issuers.
    let fit = Fitted::new(
        &HEADER,
        &cells,
        &[(4, 8), (3, 6), (0, 10), (2, 8), (5, 4)],
        screen.width,
    );
    let mut out = fit.line(screen, &HEADER.map(str::to_owned), &[BOLD; 7]);
    for (k, (t, c)) in shown.iter().zip(&cells).enumerate() {
        let mut styles = [Style::new(); 7];
        styles[6] = expires(t).1;
        out.push_str(&fit.line(screen, c, &styles));
        // After an agent's last row shown: how many of its tasks are not.
        if shown.get(k + 1).is_none_or(|next| next.agent != t.agent)
            && let Some((agent, n)) = more.iter().find(|(a, _)| *a == t.agent)
        {
            let total = tasks.iter().filter(|x| x.agent == *agent).count();
            for l in wrap(
                &format!(
                    "… and {n} more of {} ({total} in all; see status --json)",
                    ellipsize_middle(&clean(agent), 24)
                ),
                "",
                screen.width,
                2,
            ) {
                let _ = writeln!(out, "{}", screen.paint(DIM, &l));
            }
        }
    }
    out
}

/// The agents that are not simply active (decommissions, orphans): one
/// line each, with the revocation times, reason and pending items under it.
pub fn render_agents(rows: &[AgentLifecycle], screen: &Screen) -> String {
    const HEADER: [&str; 6] = ["AGENT", "STATE", "DECIDED", "SLA", "LEFT", "ITEMS"];
    fn time(t: Option<DateTime<Utc>>) -> String {
        t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_else(|| "-".into())
    }
    fn ms(ms: Option<i64>) -> String {
        match ms {
            Some(ms) if ms.abs() < 10_000 => format!("{:.3}s", ms as f64 / 1000.0),
            Some(ms) => {
                let sign = if ms < 0 { "-" } else { "" };
                format!("{sign}{}", short(chrono::TimeDelta::milliseconds(ms)))
            }
            None => "-".into(),
        }
    }
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.agent.to_string(),
                clean(&r.state),
                match r.state.as_str() {
                    "orphaned" => time(r.orphaned_since),
                    _ => time(r.decided_at),
                },
                r.sla_seconds
                    .map_or_else(|| "-".into(), |s| ms(Some(s as i64 * 1000))),
                ms(r.remaining_ms),
                if r.state == "orphaned" {
                    "-".into()
                } else {
                    format!("{}/{}/{}", r.verified, r.revoked, r.items)
                },
            ]
        })
        .collect();
    let fit = Fitted::new(&HEADER, &cells, &[(0, 16), (1, 10)], screen.width);
    let mut out = fit.line(screen, &HEADER.map(str::to_owned), &[BOLD; 6]);
    for (r, c) in rows.iter().zip(&cells) {
        let mut styles = [Style::new(); 6];
        styles[1] = state_style(&r.state);
        out.push_str(&fit.line(screen, c, &styles));
        let mut under = |text: String, style: Style| {
            for l in wrap(&clean(&text), "  ", screen.width, ERROR_LINES) {
                let _ = writeln!(out, "{}", screen.paint(style, &l));
            }
        };
        if r.state == "orphaned" {
            under(
                format!("orphaned since {}", time(r.orphaned_since)),
                Style::new(),
            );
        } else {
            let after = |at: Option<DateTime<Utc>>, d: Option<i64>| match at {
                Some(_) => format!("+{}", ms(d)),
                None => "-".into(),
            };
            under(
                format!(
                    "revoked {}, verified {}; reason: {}",
                    after(r.revoked_at, r.to_revoked_ms),
                    after(r.verified_at, r.to_verified_ms),
                    r.reason.as_deref().unwrap_or("-")
                ),
                Style::new(),
            );
        }
        for p in &r.pending {
            under(
                format!(
                    "pending {}: {} attempt(s){}",
                    p.item,
                    p.attempts,
                    p.last_error
                        .as_deref()
                        .map(|e| format!(", last error: {e}"))
                        .unwrap_or_default()
                ),
                RED,
            );
        }
    }
    out.push_str("(ITEMS: verified/revoked/total; revoked, verified: time after the decision)\n");
    out
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use chrono::TimeZone;

    use super::*;
    use crate::api::protocol::PendingItem;
    use crate::api::protocol::ShownStage;
    use crate::model::{AgentId, CredentialId};

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
    }

    /// Black-box finding: a `--reason` holding a bidi override reached the
    /// terminal through `status` and `decommission` (ESC and newlines did
    /// not).
    #[test]
    fn control_characters_and_bidi_overrides_are_cleaned() {
        assert_eq!(
            clean("retired\u{202e}evil\x1b[31m\nnext\u{2066}"),
            "retired evil [31m next "
        );
    }

    fn row(agent: &str, cred: &str) -> StatusRow {
        StatusRow {
            agent: AgentId::new(agent).unwrap(),
            credential: CredentialId::new(cred).unwrap(),
            vault: "bao".into(),
            version: Some(12),
            stage: Some(ShownStage::Current),
            last_rotated: Some(now() - chrono::TimeDelta::hours(3)),
            next_due: Some(now() + chrono::TimeDelta::minutes(90)),
            state: "idle".into(),
            step: None,
            rotation: None,
            last_error: None,
            awaiting_ack: Vec::new(),
            holdouts: Vec::new(),
        }
    }

    fn long_rows() -> Vec<StatusRow> {
        let longest = "a".repeat(63) + "z";
        let mut failing = row(&longest, &("c".repeat(60) + "-end"));
        failing.vault = "bao-eu-west-primary+aws-secrets-manager-backup".into();
        failing.state = "rotating".into();
        failing.step = Some("promote".into());
        failing.last_error = Some(format!(
            "vault bao: HTTP 503 {} 金庫の応答なし\x1b[31m {}",
            "x".repeat(150),
            "word ".repeat(60)
        ));
        failing.awaiting_ack = vec!["file:/run/keyturn/agents/".to_owned() + &"p".repeat(90)];
        let mut fresh = row("invoice-bot", "db");
        fresh.version = None;
        fresh.stage = None;
        fresh.last_rotated = None;
        fresh.next_due = Some(now() - chrono::TimeDelta::seconds(5));
        vec![failing, fresh]
    }

    fn agents() -> Vec<AgentLifecycle> {
        let mut a: AgentLifecycle = serde_json::from_value(serde_json::json!({
            "agent": "b".repeat(64),
            "state": "decommissioning",
            "owner": "alice@example.com",
            "tenant": "acme",
            "tier": "high",
        }))
        .unwrap();
        a.decided_at = Some(Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap());
        a.sla_seconds = Some(3600);
        a.remaining_ms = Some(-1_234_567_890);
        a.items = 12;
        a.revoked = 10;
        a.verified = 9;
        a.reason = Some("left the company; ".repeat(20));
        a.pending = vec![PendingItem {
            item: "vault bao ".to_owned() + &"q".repeat(100),
            attempts: 7,
            last_error: Some("timeout ".repeat(30)),
        }];
        vec![a]
    }

    #[test]
    fn short_durations_keep_the_minutes_below_ten_hours() {
        let d = |s: i64| short(chrono::TimeDelta::seconds(s));
        assert_eq!(d(7187), "1h59m");
        assert_eq!(d(3600), "1h");
        assert_eq!(d(3599), "59m");
        assert_eq!(d(11 * 3600 + 59 * 60), "11h");
        assert_eq!(d(3 * 86_400 + 5), "3d");
    }

    /// Black-box finding: a last rotation stamped two hours ahead (a clock
    /// that ran ahead, set back) showed as "2h ago".
    #[test]
    fn a_last_rotation_ahead_of_the_clock_is_not_shown_as_past() {
        let screen = Screen {
            width: WIDTH,
            color: false,
        };
        let mut ahead = row("bot", "db");
        ahead.last_rotated = Some(now() + chrono::TimeDelta::hours(2));
        let text = render_status(&[ahead], now(), &screen);
        assert!(text.contains("in 2h (clock?)"), "{text}");
        assert!(!text.contains("ago"), "{text}");
    }

    fn assert_fits(text: &str) {
        for l in text.lines() {
            assert!(width(l) <= WIDTH, "{} columns: {l:?}", width(l));
        }
    }

    #[test]
    fn every_line_fits_80_columns_with_the_longest_ids() {
        let screen = Screen {
            width: WIDTH,
            color: false,
        };
        let text = render_status(&long_rows(), now(), &screen);
        assert_fits(&text);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("CREDENTIAL"), "{text}");
        // The long credential: its start and its end are both there.
        assert!(
            lines[1].starts_with("aaaa") && lines[1].contains("…"),
            "{text}"
        );
        assert!(lines[1].contains("c-end "), "{text}");
        assert!(
            lines[1].contains("3h ago") && lines[1].contains("in 1h"),
            "{text}"
        );
        assert!(lines[1].ends_with("rotating:promote"), "{text}");
        // The error under its row, wrapped to three lines, the escape gone.
        let errors: Vec<&&str> = lines.iter().filter(|l| l.starts_with("  ")).collect();
        assert!(
            errors[0].starts_with("  error: vault bao: HTTP 503"),
            "{text}"
        );
        assert!(errors[2].ends_with('…'), "{text}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("  awaiting ack: file:/run/keyturn/agents/ppp")),
            "{text}"
        );
        assert!(!text.contains('\x1b'), "{text}");
        // The short row is untouched: dashes, due now.
        let fresh = lines
            .iter()
            .find(|l| l.starts_with("invoice-bot/db"))
            .unwrap();
        assert!(fresh.contains(" - ") && fresh.contains("now"), "{fresh}");
        // The agents section fits too and keeps the full decision time.
        let agents_text = render_agents(&agents(), &screen);
        assert_fits(&agents_text);
        assert!(
            agents_text.contains("decommissioning  2026-01-02T03:04:05Z"),
            "{agents_text}"
        );
        assert!(agents_text.contains("9/10/12"), "{agents_text}");
        assert!(agents_text.contains("-14d"), "{agents_text}");
    }

    #[test]
    fn display_width_counts_wide_characters_twice() {
        assert_eq!(width("金庫"), 4);
        let cut = ellipsize("金庫金庫金庫", 5);
        assert_eq!(cut, "金庫…");
        assert!(width(&cut) <= 5);
        let wrapped = wrap(&"金".repeat(100), "  ", 20, 3);
        assert_eq!(wrapped.len(), 3);
        for l in &wrapped {
            assert!(width(l) <= 20, "{l}");
        }
        assert_eq!(
            ellipsize_middle("invoice-processing-bot/db", 12),
            "invoi…bot/db"
        );
    }

    #[test]
    fn colour_only_when_asked_or_on_a_terminal_without_no_color() {
        let mut screen = Screen {
            width: WIDTH,
            color: true,
        };
        let coloured = render_status(&long_rows(), now(), &screen);
        assert!(coloured.contains("\x1b["), "{coloured}");
        assert!(render_agents(&agents(), &screen).contains("\x1b["));
        // The escapes take no columns: the same text without them fits.
        screen.color = false;
        let plain = render_status(&long_rows(), now(), &screen);
        assert!(!plain.contains('\x1b'));
        assert_eq!(coloured.lines().count(), plain.lines().count());

        let (tty, pipe) = (true, false);
        let set = Some(OsStr::new("1"));
        let empty = Some(OsStr::new(""));
        let dumb = Some(OsStr::new("dumb"));
        let xterm = Some(OsStr::new("xterm-256color"));
        use ColorChoice::*;
        assert!(use_color(Auto, tty, None, xterm));
        assert!(!use_color(Auto, pipe, None, xterm));
        assert!(!use_color(Auto, tty, set, xterm), "NO_COLOR wins over auto");
        assert!(
            use_color(Auto, tty, empty, xterm),
            "an empty NO_COLOR is unset"
        );
        assert!(!use_color(Auto, tty, None, dumb));
        assert!(use_color(Always, pipe, set, dumb), "--color always wins");
        assert!(!use_color(Never, tty, None, xterm));
    }

    fn task(agent: &str, n: i64, state: &str) -> TaskView {
        serde_json::from_value(serde_json::json!({
            "task": format!("{n:024x}"),
            "agent": agent,
            "tenant": "tenant-".to_owned() + &"t".repeat(40),
            "use_case": "use-case-".to_owned() + &"u".repeat(40),
            "run_id": "run-1",
            "initiator": "alice@example.com",
            "sensitivity": "high",
            "policy": "invoicing",
            "started_by": "uid=1001",
            "started_at": now() - chrono::TimeDelta::minutes(5),
            "expires_at": now() + chrono::TimeDelta::minutes(n),
            "state": state,
            "items": [
                {"issuer": "bao-eu-west-primary", "handle": "acc", "state": "issued"},
                {"issuer": "sts", "handle": "h", "state": "issued"},
            ],
        }))
        .unwrap()
    }

    #[test]
    fn tasks_fit_80_columns_keep_their_ids_and_count_the_rest() {
        let screen = Screen {
            width: WIDTH,
            color: false,
        };
        let long_agent = "b".repeat(64);
        let mut tasks: Vec<TaskView> = (1..=8).map(|n| task(&long_agent, n, "live")).collect();
        tasks.push(task("bot", 30, "ending"));
        let mut overdue = task("bot", -3, "ending");
        overdue.task = "f".repeat(24);
        tasks.push(overdue);
        let text = render_tasks(&tasks, now(), &screen, false);
        assert_fits(&text);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("AGENT") && lines[0].contains("EXPIRES"),
            "{text}"
        );
        // Per agent, soonest first; every id shown is whole.
        assert!(
            lines[1].contains(&format!("{:024x}", 1)) && lines[1].contains("in 1m"),
            "{text}"
        );
        assert!(lines[5].contains(&format!("{:024x}", 5)), "{text}");
        assert!(!text.contains(&format!("{:024x}", 6)), "{text}");
        // The rest of that agent's tasks: a count line under them.
        assert!(
            lines[6].contains("and 3 more of") && lines[6].contains("(8 in all;"),
            "{text}"
        );
        assert!(
            lines[7].contains("overdue") && lines[7].contains(&"f".repeat(24)),
            "{text}"
        );
        assert!(
            lines[8].contains("ending") && lines[8].contains(&format!("{:024x}", 30)),
            "{text}"
        );
        assert_eq!(lines.len(), 9, "{text}");

        // Wide: every task, its expiry as a time, nothing cut.
        let wide = render_tasks(
            &tasks,
            now(),
            &Screen {
                width: usize::MAX,
                color: false,
            },
            true,
        );
        assert_eq!(wide.lines().count(), 11, "{wide}");
        assert!(
            wide.contains(&"t".repeat(40)) && wide.contains("2026-03-01T12:08:00Z"),
            "{wide}"
        );
        assert!(!wide.contains('…'), "{wide}");
    }
}
