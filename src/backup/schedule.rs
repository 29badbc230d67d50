//! Scheduled base backups, the pure part: the five-field cron expression of
//! `backup.schedule`, the decision whether the leader's agent starts a
//! backup now, and whether a running one has overrun
//! `backup.schedule_timeout`. Time is always passed in (Unix seconds, UTC,
//! or durations the caller measured); nothing here reads a clock or the
//! repository.
//!
//! The expression follows Vixie cron: `minute hour day-of-month month
//! day-of-week`, each field `*`, a number, a range `a-b`, a step `*/n` or
//! `a-b/n`, or a comma-separated list of those; day-of-week 0 and 7 are
//! both Sunday. When day-of-month and day-of-week are both restricted, a
//! day matches if *either* does; a field whose text starts with `*` (also
//! `*/2`) counts as unrestricted, so `0 0 */2 * 1` means odd days that are
//! Mondays, as in Vixie cron. Names (`jan`, `mon`), `@daily` and the
//! like are not accepted.
//!
//! Written here rather than taken from a crate: the `cron` crate wants
//! six or seven fields (seconds first) and ANDs the two day fields;
//! `croner` accepts more syntax (`L`, `W`, `#`, names, seconds) and both
//! bring in `chrono`. These semantics fit in a few hundred lines.

use std::time::{Duration, SystemTime};

use super::base::Manifest;

/// A parsed `backup.schedule`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// The expression as written, for messages and the repository file.
    text: String,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    /// Bit 0 is Sunday; 7 is folded into 0.
    weekdays: u64,
    /// The day-of-month or day-of-week field starts with `*`: the two day
    /// fields must then both match (see the module documentation).
    day_star: bool,
}

/// Why an expression was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("expected 5 fields (minute hour day-of-month month day-of-week), found {found}")]
    FieldCount { found: usize },
    #[error("{field} {text:?}: {problem}")]
    Field {
        field: &'static str,
        text: String,
        problem: String,
    },
    #[error("never fires: no month it allows has any of the days of the month it allows")]
    Never,
}

/// Each field's name and range, in order.
const FIELDS: [(&str, u32, u32); 5] = [
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day-of-month", 1, 31),
    ("month", 1, 12),
    ("day-of-week", 0, 7),
];

/// How far [`Schedule::next_after`] and [`Schedule::latest_at_or_before`]
/// look: 28 years, after which weekdays and leap days repeat (within
/// 1901-2099), so a schedule that fires at all fires within it.
const SEARCH_DAYS: i64 = 28 * 366;

const MINUTES_PER_DAY: i64 = 24 * 60;

impl Schedule {
    pub fn parse(text: &str) -> Result<Schedule, ScheduleError> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(ScheduleError::FieldCount {
                found: fields.len(),
            });
        }
        let mut bits = [0u64; 5];
        for (i, (field, (name, min, max))) in fields.iter().zip(FIELDS).enumerate() {
            bits[i] = parse_field(field, min, max).map_err(|problem| ScheduleError::Field {
                field: name,
                text: field.to_string(),
                problem,
            })?;
        }
        let mut weekdays = bits[4];
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays | 1) & !(1 << 7);
        }
        let schedule = Schedule {
            text: fields.join(" "),
            minutes: bits[0],
            hours: bits[1],
            days: bits[2],
            months: bits[3],
            weekdays,
            day_star: fields[2].starts_with('*') || fields[4].starts_with('*'),
        };
        // `0 0 30 2 *` parses field by field, yet never fires; Vixie cron
        // would accept it silently.
        if schedule.next_after(0).is_none() {
            return Err(ScheduleError::Never);
        }
        Ok(schedule)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first time the schedule fires strictly after `t` (Unix seconds).
    pub fn next_after(&self, t: i64) -> Option<i64> {
        let start = t.div_euclid(60) + 1;
        let first = start.div_euclid(MINUTES_PER_DAY);
        (first..first + SEARCH_DAYS).find_map(|day| {
            let from = if day == first {
                start.rem_euclid(MINUTES_PER_DAY)
            } else {
                0
            };
            self.day_matches(day)
                .then(|| (from..MINUTES_PER_DAY).find(|&m| self.minute_matches(m)))
                .flatten()
                .map(|m| (day * MINUTES_PER_DAY + m) * 60)
        })
    }

    /// The last time the schedule fired at or before `t` (Unix seconds).
    pub fn latest_at_or_before(&self, t: i64) -> Option<i64> {
        let end = t.div_euclid(60);
        let last = end.div_euclid(MINUTES_PER_DAY);
        (last - SEARCH_DAYS + 1..=last).rev().find_map(|day| {
            let upto = if day == last {
                end.rem_euclid(MINUTES_PER_DAY)
            } else {
                MINUTES_PER_DAY - 1
            };
            self.day_matches(day)
                .then(|| (0..=upto).rev().find(|&m| self.minute_matches(m)))
                .flatten()
                .map(|m| (day * MINUTES_PER_DAY + m) * 60)
        })
    }

    fn minute_matches(&self, minute_of_day: i64) -> bool {
        bit(self.hours, minute_of_day / 60) && bit(self.minutes, minute_of_day % 60)
    }

    /// `day` counts days since 1970-01-01 (a Thursday).
    fn day_matches(&self, day: i64) -> bool {
        let (_, month, dom) = civil_from_days(day);
        if !bit(self.months, month) {
            return false;
        }
        let dom = bit(self.days, dom);
        let dow = bit(self.weekdays, (day + 4).rem_euclid(7));
        if self.day_star {
            dom && dow
        } else {
            dom || dow
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

fn bit(set: u64, n: i64) -> bool {
    (0..64).contains(&n) && set & (1 << n) != 0
}

/// One field: a comma-separated list of `*`, `n`, `a-b`, `*/s`, `a-b/s`.
fn parse_field(text: &str, min: u32, max: u32) -> Result<u64, String> {
    let mut set = 0u64;
    for item in text.split(',') {
        if item.is_empty() {
            return Err("empty list element".into());
        }
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => {
                let step = number(step)?;
                if step == 0 {
                    return Err("a step must be at least 1".into());
                }
                (range, Some(step))
            }
            None => (item, None),
        };
        let (first, last) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (
                in_range(number(a)?, min, max)?,
                in_range(number(b)?, min, max)?,
            );
            if a > b {
                return Err(format!("the range {a}-{b} runs backwards"));
            }
            (a, b)
        } else {
            let n = in_range(number(range)?, min, max)?;
            if step.is_some() {
                return Err(format!(
                    "a step needs * or a range before it (write {n}-{max}/...)"
                ));
            }
            (n, n)
        };
        let step = step.unwrap_or(1);
        let mut n = first;
        while n <= last {
            set |= 1 << n;
            n = match n.checked_add(step) {
                Some(next) => next,
                None => break,
            };
        }
    }
    Ok(set)
}

fn number(text: &str) -> Result<u32, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{text:?} is not a number"));
    }
    text.parse().map_err(|_| format!("{text} is too large"))
}

fn in_range(n: u32, min: u32, max: u32) -> Result<u32, String> {
    if (min..=max).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} is out of range {min}-{max}"))
    }
}

/// Year, month (1-12) and day (1-31) of a day counted from 1970-01-01, in
/// the proleptic Gregorian calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// What the leader's agent does about the schedule this loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// Only the member holding the leader key starts scheduled backups.
    NotLeader,
    /// The latest slot was already dealt with (started, skipped, or found
    /// taken) by this agent; or the schedule has not fired yet.
    Done,
    /// Start the backup for `slot` (after checking the repository for one
    /// taken since).
    Start { slot: i64 },
    /// `slot` came while the backup for `running` is still going: skip it.
    Skip { slot: i64, running: i64 },
}

/// Whether a scheduled backup is due at `now`. Only the latest slot at or
/// before `now` is ever considered: a slot missed while no agent led runs
/// once, late, until the next slot supersedes it; older ones are not
/// caught up. `handled` is the latest slot this agent dealt with, and
/// `running` the slot of its backup still in progress.
pub fn due(
    schedule: &Schedule,
    now: i64,
    leader: bool,
    handled: Option<i64>,
    running: Option<i64>,
) -> Due {
    if !leader {
        return Due::NotLeader;
    }
    let Some(slot) = schedule.latest_at_or_before(now) else {
        return Due::Done;
    };
    if handled.is_some_and(|h| h >= slot) {
        return Due::Done;
    }
    match running {
        Some(running) => Due::Skip { slot, running },
        None => Due::Start { slot },
    }
}

/// How long a cancelled scheduled backup may take to end before the agent
/// stops waiting for it. Cancelling terminates its `pg_basebackup`, after
/// which it normally ends within seconds; one blocked in the repository (a
/// hard NFS mount that stopped answering) or in a query to the leader may
/// never end, and would otherwise keep every later slot from starting.
pub const WIND_DOWN: Duration = Duration::from_secs(5 * 60);

/// What the leader's agent does about its running scheduled backup this
/// loop, besides reaping it once it has ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overrun {
    /// Within `schedule_timeout`, or cancelled and given [`WIND_DOWN`] to
    /// end: keep checking it.
    Wait,
    /// It has run for `schedule_timeout`: cancel it, as a failure.
    Cancel,
    /// Cancelled [`WIND_DOWN`] ago and still running: stop waiting for it
    /// (its task is aborted and forgotten) so that the next slot can start.
    Abandon,
}

/// Whether the running scheduled backup has overrun. `running_for` is how
/// long it has run, `cancelled_for` how long ago it was cancelled (for
/// any reason: timeout, leader key lost), `timeout` is
/// `backup.schedule_timeout`. Pure: the caller measures the times, and the
/// loop step never waits for the backup.
pub fn overrun(
    running_for: Duration,
    cancelled_for: Option<Duration>,
    timeout: Duration,
) -> Overrun {
    match cancelled_for {
        Some(c) if c >= WIND_DOWN => Overrun::Abandon,
        Some(_) => Overrun::Wait,
        None if running_for >= timeout => Overrun::Cancel,
        None => Overrun::Wait,
    }
}

/// The oldest complete backup that started at or after `slot`, if any:
/// the slot is then already covered (by another leader before a failover,
/// by this agent before a restart, or by an operator's `pgha backup`).
pub fn covering(backups: &[Manifest], slot: i64) -> Option<&Manifest> {
    let at = unix_time(slot);
    backups
        .iter()
        .find(|m| m.start().is_some_and(|start| start >= at))
}

/// Unix seconds as a `SystemTime`.
pub fn unix_time(secs: i64) -> SystemTime {
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rfc3339: &str) -> i64 {
        humantime::parse_rfc3339(rfc3339)
            .unwrap()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn show(t: i64) -> String {
        humantime::format_rfc3339_seconds(unix_time(t)).to_string()
    }

    /// 2026-01-31 is a Saturday.
    #[test]
    fn next_fire_times() {
        let cases = [
            ("* * * * *", "2026-01-31T02:00:30Z", "2026-01-31T02:01:00Z"),
            // Strictly after: a fire time is not its own successor.
            ("* * * * *", "2026-01-31T02:00:00Z", "2026-01-31T02:01:00Z"),
            ("0 2 * * *", "2026-01-31T02:00:00Z", "2026-02-01T02:00:00Z"),
            ("0 2 * * *", "2026-01-31T01:59:59Z", "2026-01-31T02:00:00Z"),
            (
                "*/15 * * * *",
                "2026-01-31T02:07:00Z",
                "2026-01-31T02:15:00Z",
            ),
            (
                "*/15 * * * *",
                "2026-01-31T02:50:00Z",
                "2026-01-31T03:00:00Z",
            ),
            (
                "5-10/2 * * * *",
                "2026-01-31T02:06:00Z",
                "2026-01-31T02:07:00Z",
            ),
            (
                "5-10/2 * * * *",
                "2026-01-31T02:09:00Z",
                "2026-01-31T03:05:00Z",
            ),
            (
                "1,31,59 * * * *",
                "2026-01-31T02:31:00Z",
                "2026-01-31T02:59:00Z",
            ),
            (
                "0 1-3,22 * * *",
                "2026-01-31T03:00:00Z",
                "2026-01-31T22:00:00Z",
            ),
            ("0 0 1 * *", "2026-01-31T12:00:00Z", "2026-02-01T00:00:00Z"),
            // No 31st in February or April.
            ("0 0 31 * *", "2026-02-01T00:00:00Z", "2026-03-31T00:00:00Z"),
            ("0 0 31 * *", "2026-03-31T00:00:00Z", "2026-05-31T00:00:00Z"),
            ("0 0 29 2 *", "2026-01-01T00:00:00Z", "2028-02-29T00:00:00Z"),
            (
                "30 23 31 12 *",
                "2026-12-31T23:30:00Z",
                "2027-12-31T23:30:00Z",
            ),
            // Sunday as 0 and as 7.
            ("0 0 * * 0", "2026-01-31T00:00:00Z", "2026-02-01T00:00:00Z"),
            ("0 0 * * 7", "2026-01-31T00:00:00Z", "2026-02-01T00:00:00Z"),
            (
                "0 0 * * 5-7",
                "2026-01-31T00:00:00Z",
                "2026-02-01T00:00:00Z",
            ),
            (
                "0 9 * * 1-5",
                "2026-01-30T09:00:00Z",
                "2026-02-02T09:00:00Z",
            ),
            // Both day fields restricted: the 13th or a Friday.
            ("0 0 13 * 5", "2026-01-31T00:00:00Z", "2026-02-06T00:00:00Z"),
            ("0 0 1 * 3", "2026-01-28T00:00:00Z", "2026-02-01T00:00:00Z"),
            // A day field starting with `*` makes both required: odd days
            // that are Mondays (2026-02-02 is an even Monday).
            (
                "0 0 */2 * 1",
                "2026-01-31T00:00:00Z",
                "2026-02-09T00:00:00Z",
            ),
            // The 2nd that is a Sunday, Tuesday, Thursday or Saturday (the
            // 2nd or a Sunday would be 2026-02-01).
            (
                "0 0 2 * */2",
                "2026-01-31T00:00:00Z",
                "2026-04-02T00:00:00Z",
            ),
            (
                "0 12 * 6-8 *",
                "2026-01-31T00:00:00Z",
                "2026-06-01T12:00:00Z",
            ),
            (
                "*/100 */7 * * *",
                "2026-01-31T21:00:00Z",
                "2026-02-01T00:00:00Z",
            ),
            // Extra blanks between fields are fine.
            (
                " 0  2 * *\t* ",
                "2026-01-31T02:00:00Z",
                "2026-02-01T02:00:00Z",
            ),
        ];
        for (expr, after, want) in cases {
            let s = Schedule::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
            let got = s.next_after(at(after)).map(show);
            assert_eq!(got.as_deref(), Some(want), "{expr} after {after}");
        }
    }

    #[test]
    fn latest_fire_times() {
        let cases = [
            ("* * * * *", "2026-01-31T02:00:30Z", "2026-01-31T02:00:00Z"),
            // At or before: a fire time is its own latest.
            ("0 2 * * *", "2026-01-31T02:00:00Z", "2026-01-31T02:00:00Z"),
            ("0 2 * * *", "2026-01-31T01:59:59Z", "2026-01-30T02:00:00Z"),
            (
                "*/15 * * * *",
                "2026-01-31T02:14:59Z",
                "2026-01-31T02:00:00Z",
            ),
            ("0 0 31 * *", "2026-03-30T00:00:00Z", "2026-01-31T00:00:00Z"),
            ("0 0 29 2 *", "2026-01-01T00:00:00Z", "2024-02-29T00:00:00Z"),
            ("0 0 13 * 5", "2026-02-12T00:00:00Z", "2026-02-06T00:00:00Z"),
            (
                "0 0 */2 * 1",
                "2026-02-08T00:00:00Z",
                "2026-01-19T00:00:00Z",
            ),
            (
                "59 23 * * *",
                "2026-01-31T23:58:59Z",
                "2026-01-30T23:59:00Z",
            ),
        ];
        for (expr, before, want) in cases {
            let s = Schedule::parse(expr).unwrap();
            let got = s.latest_at_or_before(at(before)).map(show);
            assert_eq!(got.as_deref(), Some(want), "{expr} before {before}");
        }
    }

    #[test]
    fn invalid_expressions_and_their_messages() {
        let fields = "expected 5 fields (minute hour day-of-month month day-of-week)";
        let cases = [
            ("", format!("{fields}, found 0")),
            ("* * * *", format!("{fields}, found 4")),
            ("0 * * * * *", format!("{fields}, found 6")),
            ("@daily", format!("{fields}, found 1")),
            (
                "60 * * * *",
                r#"minute "60": 60 is out of range 0-59"#.into(),
            ),
            ("* 24 * * *", r#"hour "24": 24 is out of range 0-23"#.into()),
            (
                "* * 0 * *",
                r#"day-of-month "0": 0 is out of range 1-31"#.into(),
            ),
            (
                "* * 32 * *",
                r#"day-of-month "32": 32 is out of range 1-31"#.into(),
            ),
            (
                "* * * 13 *",
                r#"month "13": 13 is out of range 1-12"#.into(),
            ),
            (
                "* * * * 8",
                r#"day-of-week "8": 8 is out of range 0-7"#.into(),
            ),
            (
                "* * * jan *",
                r#"month "jan": "jan" is not a number"#.into(),
            ),
            (
                "* * * * mon",
                r#"day-of-week "mon": "mon" is not a number"#.into(),
            ),
            ("-5 * * * *", r#"minute "-5": "" is not a number"#.into()),
            ("5- * * * *", r#"minute "5-": "" is not a number"#.into()),
            (
                "1-2-3 * * * *",
                r#"minute "1-2-3": "2-3" is not a number"#.into(),
            ),
            (
                "*/0 * * * *",
                r#"minute "*/0": a step must be at least 1"#.into(),
            ),
            ("*/ * * * *", r#"minute "*/": "" is not a number"#.into()),
            ("*/x * * * *", r#"minute "*/x": "x" is not a number"#.into()),
            (
                "5/10 * * * *",
                r#"minute "5/10": a step needs * or a range before it (write 5-59/...)"#.into(),
            ),
            (
                "1,,2 * * * *",
                r#"minute "1,,2": empty list element"#.into(),
            ),
            ("1, * * * *", r#"minute "1,": empty list element"#.into()),
            (
                "* 20-10 * * *",
                r#"hour "20-10": the range 20-10 runs backwards"#.into(),
            ),
            ("** * * * *", r#"minute "**": "**" is not a number"#.into()),
            (
                "99999999999 * * * *",
                r#"minute "99999999999": 99999999999 is too large"#.into(),
            ),
            (
                "0 0 30 2 *",
                "never fires: no month it allows has any of the days of the month it allows".into(),
            ),
            (
                "0 0 31 4,6,9,11 *",
                "never fires: no month it allows has any of the days of the month it allows".into(),
            ),
        ];
        for (expr, message) in cases {
            match Schedule::parse(expr) {
                Ok(s) => panic!("{expr:?} parsed as {s:?}"),
                Err(e) => assert_eq!(e.to_string(), message, "{expr:?}"),
            }
        }
    }

    #[test]
    fn text_is_kept_normalised() {
        let s = Schedule::parse("  0  2 *\t* *").unwrap();
        assert_eq!(s.as_str(), "0 2 * * *");
        assert_eq!(Schedule::parse(s.as_str()).unwrap(), s);
        // Both day fields restricted, but one of them through a leap day:
        // fires on Mondays in February at least.
        assert!(Schedule::parse("0 0 30 2 1").is_ok());
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(
            civil_from_days(at("2000-02-29T00:00:00Z") / 86_400),
            (2000, 2, 29)
        );
        assert_eq!(
            civil_from_days(at("2026-01-31T00:00:00Z") / 86_400),
            (2026, 1, 31)
        );
    }

    #[test]
    fn the_due_decision() {
        let hourly = Schedule::parse("0 * * * *").unwrap();
        let t = at("2026-01-31T10:20:00Z");
        let slot = at("2026-01-31T10:00:00Z");
        let earlier = at("2026-01-31T09:00:00Z");
        let cases = [
            // (leader, handled, running) -> decision
            ((false, None, None), Due::NotLeader),
            ((false, Some(earlier), Some(earlier)), Due::NotLeader),
            // A new leader (or a restarted agent) takes the current slot,
            // even 20 minutes late; the repository check comes next.
            ((true, None, None), Due::Start { slot }),
            ((true, Some(earlier), None), Due::Start { slot }),
            // Dealt with already: once per slot.
            ((true, Some(slot), None), Due::Done),
            ((true, Some(slot), Some(slot)), Due::Done),
            // The previous slot's backup still runs: this one is skipped.
            (
                (true, Some(earlier), Some(earlier)),
                Due::Skip {
                    slot,
                    running: earlier,
                },
            ),
            // A clock that went back: nothing runs twice.
            ((true, Some(at("2026-01-31T11:00:00Z")), None), Due::Done),
        ];
        for ((leader, handled, running), want) in cases {
            assert_eq!(
                due(&hourly, t, leader, handled, running),
                want,
                "leader {leader}, handled {handled:?}, running {running:?}"
            );
        }
        // Several missed slots: only the latest runs, once.
        let daily = Schedule::parse("0 2 * * *").unwrap();
        let now = at("2026-01-31T23:00:00Z");
        let last = at("2026-01-31T02:00:00Z");
        assert_eq!(
            due(&daily, now, true, Some(at("2026-01-27T02:00:00Z")), None),
            Due::Start { slot: last }
        );
        assert_eq!(due(&daily, now, true, Some(last), None), Due::Done);
        // Exactly at the slot.
        assert_eq!(
            due(&daily, at("2026-02-01T02:00:00Z"), true, Some(last), None),
            Due::Start {
                slot: at("2026-02-01T02:00:00Z")
            }
        );
    }

    #[test]
    fn the_overrun_decision() {
        let s = Duration::from_secs;
        let hour = s(3600);
        let cases = [
            // (running for, cancelled for, timeout) -> decision
            ((s(0), None, hour), Overrun::Wait),
            ((s(3599), None, hour), Overrun::Wait),
            // At the timeout exactly, and long after it (a loop that
            // stalled): cancel once.
            ((s(3600), None, hour), Overrun::Cancel),
            ((s(86_400), None, hour), Overrun::Cancel),
            // The tiniest timeout cancels at the first check.
            (
                (Duration::from_millis(1), None, Duration::from_millis(1)),
                Overrun::Cancel,
            ),
            (
                (Duration::ZERO, None, Duration::from_millis(1)),
                Overrun::Wait,
            ),
            // Cancelled (by the timeout or on losing the leader key): it
            // winds down, however long it has run, until WIND_DOWN.
            ((s(3700), Some(s(0)), hour), Overrun::Wait),
            ((s(3700), Some(WIND_DOWN - s(1)), hour), Overrun::Wait),
            ((s(10), Some(s(5)), hour), Overrun::Wait),
            ((s(3700), Some(WIND_DOWN), hour), Overrun::Abandon),
            ((s(10), Some(WIND_DOWN + s(1)), hour), Overrun::Abandon),
        ];
        for ((running_for, cancelled_for, timeout), want) in cases {
            assert_eq!(
                overrun(running_for, cancelled_for, timeout),
                want,
                "running for {running_for:?}, cancelled for {cancelled_for:?}, timeout {timeout:?}"
            );
        }
    }

    #[test]
    fn a_backup_started_at_or_after_the_slot_covers_it() {
        let m = |id: &str, start: &str| Manifest {
            id: id.into(),
            label: format!("pgha {id}"),
            source: "node2".into(),
            timeline: 1,
            start_lsn: "0/2000028".parse().unwrap(),
            stop_lsn: "0/2000100".parse().unwrap(),
            start_time: start.into(),
            stop_time: start.into(),
            wal_segment_size: super::super::naming::DEFAULT_SEGMENT_SIZE,
            server_manifest: "base.tar:backup_manifest".into(),
            files: Vec::new(),
        };
        let list = [
            m("a", "2026-01-31T01:59:59Z"),
            m("b", "2026-01-31T02:00:00Z"),
            m("c", "2026-01-31T02:30:00Z"),
            m("bad", "not a time"),
        ];
        let cases = [
            ("2026-01-31T01:00:00Z", Some("a")),
            ("2026-01-31T02:00:00Z", Some("b")),
            ("2026-01-31T02:00:01Z", Some("c")),
            ("2026-01-31T03:00:00Z", None),
        ];
        for (slot, want) in cases {
            assert_eq!(
                covering(&list, at(slot)).map(|m| m.id.as_str()),
                want,
                "{slot}"
            );
        }
        assert!(covering(&[], 0).is_none());
    }
}
