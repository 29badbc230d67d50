//! Small helpers with no better home.

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds since the Unix epoch, for records meant for humans.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Milliseconds on `CLOCK_BOOTTIME`: monotonic, shared by every process on
/// the host, and — unlike `CLOCK_MONOTONIC` — still advancing while the
/// machine is suspended, like the etcd server's lease clock. The agent and
/// the fence keeper exchange deadlines in this clock.
pub fn boottime_ms() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .expect("CLOCK_BOOTTIME is available on Linux");
    ts.tv_sec() as u64 * 1000 + ts.tv_nsec() as u64 / 1_000_000
}

/// An error and its causes on one line (`outer: cause: root cause`), for
/// log fields. Error messages in pgha never repeat their source, so each
/// cause appears once.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
