//! The phases of a takeover, read from the new leader's agent log: how
//! long from the decision to take over to PostgreSQL accepting writes, and
//! where that time went.
//!
//! The agent logs each step with a timestamp: `decided
//! action=AcquireLease`, `acquired the leader lease`, `decided
//! action=Promote`, and `promoted` the moment the server left recovery
//! (with `wakeups=N`, how often its startup process had to be woken; see
//! `src/postgres/promote.rs`). All processes run on this host, so their
//! wall clocks agree.

use std::path::Path;
use std::time::SystemTime;

use serde_json::{Value, json};

/// One takeover, in milliseconds between the logged steps.
#[derive(Clone, Copy, Debug)]
pub struct Phases {
    /// Decision to take over → leader lease held (etcd transaction and
    /// the fence keeper's acknowledgement).
    pub lease_ms: f64,
    /// Lease held → promotion decided (the next HA loop).
    pub decide_ms: f64,
    /// Promotion decided → PostgreSQL accepts writes.
    pub promote_ms: f64,
    /// Decision to take over → PostgreSQL accepts writes.
    pub total_ms: f64,
    pub wakeups: u32,
}

impl Phases {
    pub fn json(&self) -> Value {
        let round = |x: f64| x.round() as i64;
        json!({
            "lease_ms": round(self.lease_ms),
            "decide_ms": round(self.decide_ms),
            "promote_ms": round(self.promote_ms),
            "total_ms": round(self.total_ms),
            "startup_wakeups": self.wakeups,
        })
    }
}

/// The timestamp that starts every agent log line (RFC 3339, UTC).
fn stamp(line: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(line.split_whitespace().next()?).ok()
}

fn ms_between(a: SystemTime, b: SystemTime) -> f64 {
    b.duration_since(a)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// The first takeover logged at or after `since`, if the log holds a
/// complete one.
pub fn read(log: &Path, since: SystemTime) -> Option<Phases> {
    let text = std::fs::read_to_string(log).ok()?;
    parse(&text, since)
}

fn parse(text: &str, since: SystemTime) -> Option<Phases> {
    let lines: Vec<(SystemTime, &str)> = text
        .lines()
        .filter_map(|l| Some((stamp(l)?, l)))
        .filter(|(t, _)| *t >= since)
        .collect();
    let acquired = lines
        .iter()
        .position(|(_, l)| l.contains("acquired the leader lease"))?;
    // The race this member won: its last decision to take over before it
    // held the lease (an earlier attempt may have failed).
    let decided = lines[..acquired]
        .iter()
        .rposition(|(_, l)| l.contains("decided action=AcquireLease"))?;
    let promote = acquired
        + lines[acquired..]
            .iter()
            .position(|(_, l)| l.contains("decided action=Promote"))?;
    let promoted = promote
        + lines[promote..]
            .iter()
            .position(|(_, l)| l.contains(" promoted ") && l.contains("wakeups="))?;
    let wakeups = lines[promoted]
        .1
        .split_whitespace()
        .find_map(|w| w.strip_prefix("wakeups="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let t = |i: usize| lines[i].0;
    Some(Phases {
        lease_ms: ms_between(t(decided), t(acquired)),
        decide_ms: ms_between(t(acquired), t(promote)),
        promote_ms: ms_between(t(promote), t(promoted)),
        total_ms: ms_between(t(decided), t(promoted)),
        wakeups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
2026-11-30T19:34:25.100000Z  INFO pgha::agent: decided action=AcquireLease reason=no leader; this member is the healthiest candidate
2026-11-30T19:34:25.120000Z ERROR pgha::agent::executor: action failed action=AcquireLease error=etcd unavailable
2026-11-30T19:34:25.300000Z  INFO pgha::agent: decided action=AcquireLease reason=no leader; this member is the healthiest candidate
2026-11-30T19:34:25.318000Z  INFO pgha::agent::executor: acquired the leader lease
2026-11-30T19:34:25.325000Z  INFO pgha::agent: decided action=Promote { sync: None } reason=holding the lease; promoting
2026-11-30T19:34:25.431000Z  INFO pgha::agent::executor: promoted ms=104 wakeups=1 timeline=3
";

    #[test]
    fn phases_of_the_race_that_won() {
        let since = humantime::parse_rfc3339("2026-11-30T19:34:25Z").unwrap();
        let p = parse(LOG, since).unwrap();
        assert_eq!(
            (
                p.lease_ms.round(),
                p.decide_ms.round(),
                p.promote_ms.round(),
                p.total_ms.round(),
                p.wakeups
            ),
            (18.0, 7.0, 106.0, 131.0, 1)
        );
    }

    #[test]
    fn nothing_before_since_counts() {
        let since = humantime::parse_rfc3339("2026-11-30T19:34:26Z").unwrap();
        assert!(parse(LOG, since).is_none());
    }
}
