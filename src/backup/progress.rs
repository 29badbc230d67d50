//! Progress of a long unpack, as text lines: bytes done of the total, the
//! rate, the time left. `pgha backup unpack-replica` writes them on its
//! standard error behind [`PREFIX`] while it unpacks a backup for a new
//! replica, and the agent relays them into its log, so that minutes of
//! unpacking a large backup do not go by in silence. Pure: the caller
//! passes the time in.

use std::fmt;
use std::time::{Duration, Instant};

/// Starts a progress line on the command's standard error; anything else
/// there (warnings, the final error) is kept for the error message.
pub const PREFIX: &str = "progress: ";

/// How often a running unpack reports.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// The text of a progress line, or `None` for another line.
pub fn parse_line(line: &str) -> Option<&str> {
    line.strip_prefix(PREFIX).map(str::trim_end)
}

/// Decides when to report, and what.
#[derive(Debug)]
pub struct Meter {
    total: u64,
    interval: Duration,
    started: Instant,
    /// The last report: when, and the bytes done then.
    last: Option<(Instant, u64)>,
    finished: bool,
}

/// One report.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Report {
    pub done: u64,
    pub total: u64,
    pub elapsed: Duration,
    /// Bytes per second since the previous report (over the whole run in
    /// the final report); none in the first.
    pub rate: Option<f64>,
    /// The last report: everything is done.
    pub finished: bool,
}

impl Meter {
    /// A meter for `total` bytes, started at `now`.
    pub fn new(total: u64, interval: Duration, now: Instant) -> Meter {
        Meter {
            total,
            interval,
            started: now,
            last: None,
            finished: false,
        }
    }

    /// `done` bytes are done at `now`: a report when one is due. The first
    /// call reports (the start, with the total), then one every
    /// `interval`, and one when `done` reaches the total; none after that.
    pub fn update(&mut self, done: u64, now: Instant) -> Option<Report> {
        if self.finished {
            return None;
        }
        let elapsed = now.saturating_duration_since(self.started);
        let total = self.total;
        let report = |rate, finished| Report {
            done,
            total,
            elapsed,
            rate,
            finished,
        };
        let Some((at, before)) = self.last else {
            self.last = Some((now, done));
            return Some(report(None, false));
        };
        if done >= self.total {
            self.finished = true;
            return Some(report(rate(done, elapsed), true));
        }
        let since = now.saturating_duration_since(at);
        if since < self.interval {
            return None;
        }
        self.last = Some((now, done));
        Some(report(rate(done.saturating_sub(before), since), false))
    }
}

fn rate(bytes: u64, over: Duration) -> Option<f64> {
    (!over.is_zero()).then(|| bytes as f64 / over.as_secs_f64())
}

/// `1.5 GiB of 4.0 GiB (37%), 12s elapsed, 52.3 MiB/s, about 49s left`;
/// the first report has no rate, the last says `done`.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let percent = if self.total == 0 {
            100
        } else {
            (u128::from(self.done) * 100 / u128::from(self.total)) as u64
        };
        write!(
            f,
            "{} of {} ({percent}%), {} elapsed",
            Bytes(self.done),
            Bytes(self.total),
            Seconds(self.elapsed)
        )?;
        match self.rate {
            Some(r) if self.finished => write!(f, ", {}/s on average, done", Bytes(r as u64)),
            None if self.finished => write!(f, ", done"),
            Some(r) => {
                write!(f, ", {}/s", Bytes(r as u64))?;
                let left = self.total.saturating_sub(self.done);
                if r >= 1.0 {
                    write!(
                        f,
                        ", about {} left",
                        Seconds(Duration::from_secs_f64(left as f64 / r))
                    )?;
                }
                Ok(())
            }
            None => Ok(()),
        }
    }
}

/// Bytes in binary units, one decimal from KiB on.
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut value = self.0 as f64 / 1024.0;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        write!(f, "{value:.1} {}", UNITS[unit])
    }
}

/// Whole seconds as `1h 2m 5s`; under a second as `0s`.
struct Seconds(Duration);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = Duration::from_secs(self.0.as_secs());
        if whole.is_zero() {
            f.write_str("0s")
        } else {
            write!(f, "{}", humantime::format_duration(whole))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn when_the_meter_reports() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut m = Meter::new(100 * MIB, Duration::from_secs(5), t0);
        /// A report's rate in MiB/s and whether it is the last.
        type Seen = Option<(Option<f64>, bool)>;
        // (ms since start, bytes done) -> the report, if any
        let steps: &[(u64, u64, Seen)] = &[
            // The start reports at once, with no rate yet.
            (0, 0, Some((None, false))),
            (1_000, 10 * MIB, None),
            (4_999, 20 * MIB, None),
            // 5 s after the last report: 30 MiB in 5 s.
            (5_000, 30 * MIB, Some((Some(6.0), false))),
            (9_000, 30 * MIB, None),
            // A stalled unpack still reports, at rate 0, every interval.
            (10_000, 30 * MIB, Some((Some(0.0), false))),
            (15_000, 30 * MIB, Some((Some(0.0), false))),
            // Done: reported at once, with the average over the whole run
            // (100 MiB in 20 s), and only once.
            (20_000, 100 * MIB, Some((Some(5.0), true))),
            (25_000, 100 * MIB, None),
            (60_000, 100 * MIB, None),
        ];
        for &(ms, done, want) in steps {
            let got = m
                .update(done, at(ms))
                .map(|r| (r.rate.map(|b| b / MIB as f64), r.finished));
            assert_eq!(got, want, "at {ms} ms, {done} bytes");
        }
    }

    #[test]
    fn a_small_backup_reports_its_start_and_its_end() {
        let t0 = Instant::now();
        let mut m = Meter::new(3 * MIB, Duration::from_secs(5), t0);
        let start = m.update(0, t0).unwrap();
        assert_eq!(start.to_string(), "0 B of 3.0 MiB (0%), 0s elapsed");
        assert_eq!(m.update(MIB, t0 + Duration::from_millis(100)), None);
        let end = m.update(3 * MIB, t0 + Duration::from_millis(500)).unwrap();
        assert_eq!(
            end.to_string(),
            "3.0 MiB of 3.0 MiB (100%), 0s elapsed, 6.0 MiB/s on average, done"
        );
        // Done at the very first instant: no rate to give.
        let mut m = Meter::new(0, Duration::from_secs(5), t0);
        assert!(!m.update(0, t0).unwrap().finished);
        assert_eq!(
            m.update(0, t0).unwrap().to_string(),
            "0 B of 0 B (100%), 0s elapsed, done"
        );
    }

    #[test]
    fn report_lines() {
        let r = |done: u64, total: u64, secs: u64, rate: Option<f64>, finished: bool| Report {
            done,
            total,
            elapsed: Duration::from_secs(secs),
            rate,
            finished,
        };
        let cases = [
            (
                r(
                    3 * (MIB << 10) / 2,
                    4 << 30,
                    30,
                    Some(52.3 * MIB as f64),
                    false,
                ),
                "1.5 GiB of 4.0 GiB (37%), 30s elapsed, 52.3 MiB/s, about 48s left",
            ),
            (
                r(900, 2000, 5, Some(180.0), false),
                "900 B of 2.0 KiB (45%), 5s elapsed, 180 B/s, about 6s left",
            ),
            (
                r(10 << 30, 2 << 40, 3725, Some(3.0 * MIB as f64), false),
                "10.0 GiB of 2.0 TiB (0%), 1h 2m 5s elapsed, 3.0 MiB/s, about 8days 1h 13m 57s left",
            ),
            // Stalled: no estimate.
            (
                r(MIB, 2 * MIB, 10, Some(0.0), false),
                "1.0 MiB of 2.0 MiB (50%), 10s elapsed, 0 B/s",
            ),
            (
                r(u64::MAX, u64::MAX, 1, Some(1e30), true),
                "16384.0 PiB of 16384.0 PiB (100%), 1s elapsed, 16384.0 PiB/s on average, done",
            ),
        ];
        for (report, want) in cases {
            assert_eq!(report.to_string(), want);
        }
    }

    #[test]
    fn progress_lines_are_told_from_other_output() {
        let line = format!("{PREFIX}1.0 MiB of 2.0 MiB (50%), 1s elapsed\n");
        assert_eq!(
            parse_line(&line),
            Some("1.0 MiB of 2.0 MiB (50%), 1s elapsed")
        );
        assert_eq!(parse_line("error: backup 1: corrupt object"), None);
        assert_eq!(
            parse_line("2026-01-31T02:00:00Z  WARN pgha: progress: x"),
            None
        );
    }
}
