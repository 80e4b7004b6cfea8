//! Schedule expressions and jitter.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::model::CredentialKey;

/// When a credential rotates. One per credential and kept small: a cron
/// expression is shared by every credential that writes it the same way.
#[derive(Debug, Clone)]
pub enum ScheduleSpec {
    Cron(Arc<CronSpec>),
    /// A fixed interval after the last rotation.
    Every(Duration),
}

/// A parsed cron expression.
#[derive(Debug)]
pub struct CronSpec {
    /// What the operator wrote.
    pub text: String,
    pub schedule: cron::Schedule,
    /// Shortest gap between two firings, computed once per expression.
    pub min_period: Option<Duration>,
    /// Widest gap between two firings (among the next 64), computed once
    /// per expression.
    pub max_period: Option<Duration>,
}

impl PartialEq for ScheduleSpec {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (ScheduleSpec::Cron(a), ScheduleSpec::Cron(b)) => a.text == b.text,
            (ScheduleSpec::Every(a), ScheduleSpec::Every(b)) => a == b,
            _ => false,
        }
    }
}

const DAY_NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

impl ScheduleSpec {
    /// Parses a standard 5-field expression (`min hour dom month dow`) or a
    /// 6-field one with seconds first. Day-of-week follows standard cron
    /// (0 or 7 = Sunday, 1 = Monday, names allowed); the `cron` crate counts
    /// 1 = Sunday, so the field is expanded and re-emitted as names, which
    /// both agree on.
    pub fn parse_cron(text: &str) -> Result<Self, String> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        let mut full: Vec<String> = match fields.len() {
            5 => std::iter::once("0")
                .chain(fields.iter().copied())
                .map(String::from)
                .collect(),
            6 => fields.iter().map(|s| s.to_string()).collect(),
            n => {
                return Err(format!(
                    "cron expression has {n} fields; expected 5 (min hour day month weekday) or 6 (sec min hour day month weekday)"
                ));
            }
        };
        // crontab(5) fires when either restricted day field matches; the
        // cron crate only when both do. Rather than fire on other days than
        // an operator used to crontab expects, such a schedule is refused.
        let unrestricted = |f: &str| f == "*" || f == "?";
        // A weekday that is none first (`0 0 1 1 * 1970` meant a year: six
        // fields start with seconds, and there is no year field).
        let weekday = translate_dow(&full[5]).map_err(|e| match fields.len() {
            6 => format!(
                "{e} (six fields are sec min hour day month weekday; there is no year field)"
            ),
            _ => e,
        })?;
        if !unrestricted(&full[3]) && !unrestricted(&full[5]) {
            return Err(format!(
                "cron expression {text:?} restricts both the day of the month ({}) and the day of the week ({}): crontab fires on either, keyturn would fire only when both match; restrict one of them (use * in the other)",
                full[3], full[5]
            ));
        }
        full[5] = weekday;
        let normalized = full.join(" ");
        // A parsed cron::Schedule holds a set per field (kilobytes); 100k
        // credentials usually share a handful of expressions, so share them.
        static CACHE: OnceLock<Mutex<HashMap<String, Arc<CronSpec>>>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        let cached = cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(text)
            .cloned();
        if let Some(spec) = cached {
            return Ok(ScheduleSpec::Cron(spec));
        }
        let schedule = cron::Schedule::from_str(&normalized)
            // The crate's bounds are inclusive, its words are not
            // ("Minutes must be less than 59. ('60' specified.)").
            .map_err(|e| {
                let e = e
                    .to_string()
                    .replace(" must be less than ", " must be at most ");
                format!("invalid cron expression {text:?}: {e}")
            })?;
        if schedule.upcoming(Utc).next().is_none() {
            return Err(format!("cron expression {text:?} never fires"));
        }
        let (min_period, max_period) = cron_periods(&schedule);
        let spec = Arc::new(CronSpec {
            text: text.to_owned(),
            min_period,
            max_period,
            schedule,
        });
        cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(text.to_owned(), spec.clone());
        Ok(ScheduleSpec::Cron(spec))
    }

    /// The first scheduled time strictly after `t`, before jitter.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            ScheduleSpec::Cron(c) => c.schedule.after(&t).next(),
            ScheduleSpec::Every(d) => Some(t + chrono::Duration::from_std(*d).ok()?),
        }
    }

    /// When a credential last rotated at `last` is next due, with its jitter
    /// `offset` applied. Cron schedules fire `offset` after the cron time (like
    /// systemd's RandomizedDelaySec). Interval schedules run `every` apart;
    /// the offset is taken off the interval after a credential's `first`
    /// version only, so credentials made together (a first start) do not
    /// rotate in lockstep and none is rotated less often than configured.
    /// Taking it off every interval would shorten each period by it.
    pub fn next_due(
        &self,
        last: DateTime<Utc>,
        offset: Duration,
        first: bool,
    ) -> Option<DateTime<Utc>> {
        let offset = chrono::Duration::from_std(offset).ok()?;
        match self {
            ScheduleSpec::Cron(_) => {
                // `last` may itself include the offset; step back so the cron
                // time it belonged to is not picked again.
                Some(self.next_after(last - offset)? + offset)
            }
            ScheduleSpec::Every(_) if first => Some(self.next_after(last)? - offset),
            ScheduleSpec::Every(_) => self.next_after(last),
        }
    }

    /// A short human description (`cron "0 */6 * * *"`, `every 6h`).
    pub fn describe(&self) -> String {
        match self {
            ScheduleSpec::Cron(c) => format!("cron {:?}", c.text),
            ScheduleSpec::Every(d) => format!("every {}", humantime::format_duration(*d)),
        }
    }

    /// The shortest gap between two firings, used to check jitter < period.
    pub fn min_period(&self) -> Option<Duration> {
        match self {
            ScheduleSpec::Every(d) => Some(*d),
            ScheduleSpec::Cron(c) => c.min_period,
        }
    }
}

/// The shortest and the widest gap among the next 64 firings (validation
/// checks jitter < the shortest and `max_age` against the widest).
fn cron_periods(schedule: &cron::Schedule) -> (Option<Duration>, Option<Duration>) {
    let times: Vec<_> = schedule.upcoming(Utc).take(64).collect();
    let gaps = || times.windows(2).filter_map(|w| (w[1] - w[0]).to_std().ok());
    (gaps().min(), gaps().max())
}

/// Expands a standard day-of-week field into day names for the `cron` crate.
fn translate_dow(field: &str) -> Result<String, String> {
    if field == "*" || field == "?" {
        return Ok(field.to_owned());
    }
    let mut days = [false; 7];
    for part in field.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: usize = s
                    .parse()
                    .map_err(|_| format!("bad step {s:?} in weekday field"))?;
                if step == 0 {
                    return Err("step 0 in weekday field".into());
                }
                (r, step)
            }
            None => (part, 1),
        };
        let (lo, hi) = if range == "*" {
            (0, 6)
        } else if let Some((a, b)) = range.split_once('-') {
            (dow_number(a)?, dow_number(b)?)
        } else {
            let d = dow_number(range)?;
            (d, if step > 1 { 6 } else { d })
        };
        if lo > hi {
            return Err(format!("weekday range {range:?} runs backwards"));
        }
        for d in (lo..=hi).step_by(step) {
            days[d % 7] = true;
        }
    }
    let names: Vec<&str> = (0..7).filter(|d| days[*d]).map(|d| DAY_NAMES[d]).collect();
    Ok(names.join(","))
}

fn dow_number(s: &str) -> Result<usize, String> {
    if let Ok(n) = s.parse::<usize>() {
        return if n <= 7 {
            Ok(n)
        } else {
            Err(format!("weekday {n} out of range 0-7"))
        };
    }
    DAY_NAMES
        .iter()
        .position(|d| d.eq_ignore_ascii_case(s))
        .ok_or_else(|| format!("unknown weekday {s:?}"))
}

/// A stable offset in `[0, jitter)` for a credential: the same key gets the
/// same offset after every restart, different keys spread out.
pub fn jitter_offset(key: &CredentialKey, jitter: Duration) -> Duration {
    let span = jitter.as_millis() as u64;
    if span == 0 {
        return Duration::ZERO;
    }
    let digest = Sha256::digest(key.to_string().as_bytes());
    let n = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    Duration::from_millis(n % span)
}

/// Spreads `n` overdue rotations evenly over `[now, now + spread)`, most
/// overdue first (the caller sorts). A restart after downtime then does not
/// fire every overdue rotation in the same second.
pub fn catch_up_times(now: DateTime<Utc>, n: usize, spread: Duration) -> Vec<DateTime<Utc>> {
    let spread = chrono::Duration::from_std(spread).unwrap_or(chrono::Duration::zero());
    (0..n)
        .map(|i| now + spread * (i as i32) / (n.max(1) as i32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, TimeZone, Timelike, Weekday};

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    #[test]
    fn five_field_cron_fires_on_the_minute_and_six_field_cron_has_seconds() {
        for (cron, next) in [
            ("*/15 * * * *", at(2026, 1, 1, 10, 15, 0)),
            ("*/20 * * * * *", at(2026, 1, 1, 10, 7, 40)),
        ] {
            let s = ScheduleSpec::parse_cron(cron).unwrap();
            assert_eq!(
                s.next_after(at(2026, 1, 1, 10, 7, 30)),
                Some(next),
                "{cron}"
            );
        }
    }

    #[test]
    fn weekday_numbers_follow_standard_cron() {
        // 2026-01-01 is a Thursday. "1" must mean Monday, "0" and "7" Sunday.
        let mon = ScheduleSpec::parse_cron("0 9 * * 1").unwrap();
        let t = mon.next_after(at(2026, 1, 1, 0, 0, 0)).unwrap();
        assert_eq!((t.weekday(), t.hour()), (Weekday::Mon, 9));
        for sunday in ["0 9 * * 0", "0 9 * * 7", "0 9 * * sun"] {
            let t = ScheduleSpec::parse_cron(sunday)
                .unwrap()
                .next_after(at(2026, 1, 1, 0, 0, 0))
                .unwrap();
            assert_eq!(t.weekday(), Weekday::Sun, "{sunday}");
        }
        let weekdays = ScheduleSpec::parse_cron("0 9 * * 1-5").unwrap();
        let t = weekdays.next_after(at(2026, 1, 2, 10, 0, 0)).unwrap(); // Friday after 9
        assert_eq!(t.weekday(), Weekday::Mon);
    }

    #[test]
    fn bad_cron_is_rejected_with_a_reason() {
        assert!(
            ScheduleSpec::parse_cron("* * *")
                .unwrap_err()
                .contains("3 fields")
        );
        assert!(ScheduleSpec::parse_cron("61 * * * *").is_err());
        assert!(
            ScheduleSpec::parse_cron("0 0 * * 9")
                .unwrap_err()
                .contains("out of range")
        );
        assert!(
            ScheduleSpec::parse_cron("0 0 30 2 *")
                .unwrap_err()
                .contains("never fires")
        );
    }

    #[test]
    fn jitter_is_stable_and_bounded() {
        let k = |c: &str| CredentialKey::new("a".parse().unwrap(), c.parse().unwrap());
        let j = Duration::from_secs(300);
        assert_eq!(jitter_offset(&k("db"), j), jitter_offset(&k("db"), j));
        assert!(jitter_offset(&k("db"), j) < j);
        let distinct: std::collections::HashSet<_> = (0..50)
            .map(|i| jitter_offset(&k(&format!("c{i}")), j))
            .collect();
        assert!(
            distinct.len() > 40,
            "offsets should spread, got {}",
            distinct.len()
        );
        assert_eq!(jitter_offset(&k("db"), Duration::ZERO), Duration::ZERO);
    }

    /// Black-box finding: the cron crate's bounds read one too low
    /// ("Minutes must be less than 59" for 60), and a year in a sixth field
    /// was blamed on both day fields being restricted.
    #[test]
    fn out_of_range_fields_are_named_with_their_real_bounds() {
        for (text, needle) in [
            ("60 * * * *", "Minutes must be at most 59"),
            ("0 24 * * *", "Hours must be at most 23"),
            ("0 0 32 * *", "Days of Month must be at most 31"),
        ] {
            let e = ScheduleSpec::parse_cron(text).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
        let e = ScheduleSpec::parse_cron("0 0 1 1 * 1970").unwrap_err();
        assert!(
            e.contains("weekday 1970 out of range") && e.contains("there is no year field"),
            "{e}"
        );
        assert!(ScheduleSpec::parse_cron("59 23 31 12 *").is_ok());
    }

    /// Defect (black-box): `0 0 13 * 5` fired only on a Friday the 13th
    /// (crontab: every Friday and every 13th), and `0 0 30 2 1` was refused
    /// as never firing (crontab: every Monday). Both day fields restricted
    /// is refused with the reason.
    #[test]
    fn restricting_both_day_fields_is_refused() {
        for text in ["0 0 13 * 5", "0 0 30 2 1", "0 0 1-7 * MON"] {
            let e = ScheduleSpec::parse_cron(text).unwrap_err();
            assert!(e.contains("restricts both the day of the month"), "{e}");
        }
        for text in ["0 0 13 * *", "0 0 * * 5", "0 0 ? * MON", "0 0 1 * ?"] {
            assert!(ScheduleSpec::parse_cron(text).is_ok(), "{text}");
        }
    }

    #[test]
    fn next_due_applies_the_offset_without_drift() {
        let off = Duration::from_secs(180);
        let cron = ScheduleSpec::parse_cron("0 */6 * * *").unwrap();
        // Rotated at 00:03 (00:00 + offset): next is 06:03, not 12:03.
        for first in [true, false] {
            assert_eq!(
                cron.next_due(at(2026, 1, 1, 0, 3, 0), off, first),
                Some(at(2026, 1, 1, 6, 3, 0))
            );
        }
        let every = ScheduleSpec::Every(Duration::from_secs(3600));
        // The first version: the offset sets the phase.
        assert_eq!(
            every.next_due(at(2026, 1, 1, 0, 0, 0), off, true),
            Some(at(2026, 1, 1, 0, 57, 0))
        );
        // Then an hour apart: the offset is not taken off again.
        assert_eq!(
            every.next_due(at(2026, 1, 1, 0, 57, 0), off, false),
            Some(at(2026, 1, 1, 1, 57, 0))
        );
    }

    #[test]
    fn catch_up_spreads_over_the_window() {
        let now = at(2026, 1, 1, 0, 0, 0);
        let times = catch_up_times(now, 4, Duration::from_secs(60));
        assert_eq!(
            times,
            vec![
                now,
                at(2026, 1, 1, 0, 0, 15),
                at(2026, 1, 1, 0, 0, 30),
                at(2026, 1, 1, 0, 0, 45)
            ]
        );
    }

    #[test]
    fn min_period_of_cron() {
        let s = ScheduleSpec::parse_cron("*/20 * * * * *").unwrap();
        assert_eq!(s.min_period(), Some(Duration::from_secs(20)));
    }
}
