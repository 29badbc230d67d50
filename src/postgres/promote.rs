//! Promotion of the local standby, finished as soon as PostgreSQL accepts
//! writes.
//!
//! `pg_promote(wait => true)` is not used, for two reasons measured in
//! node-loss failovers (bench/README.md, "Promotion"):
//!
//! - It checks for the end of recovery every 100 ms, so a promotion that
//!   takes 20 ms is reported after 100 ms.
//! - PostgreSQL's startup process can sleep through the request. While the
//!   primary is gone it asks for a new WAL receiver every
//!   `wal_retrieve_retry_interval`. If the promotion request arrives after
//!   it asked and before the postmaster's new child took over (tens of
//!   milliseconds), it cancels the receiver that never ran, counts that as
//!   a failed stream and, its last failure being recent, sleeps out the
//!   rest of `wal_retrieve_retry_interval` (`WaitForWALToBecomeAvailable`,
//!   wait event `RecoveryRetrieveRetryInterval`). A receiver that did run
//!   wakes it when it exits; this one never ran, and the promotion signal
//!   has been consumed, so nothing does. That cost up to 500 ms (pgha's
//!   default interval) in 8 of 48 promotions of a fault suite; with
//!   PostgreSQL's default of 5 s it would cost up to 5 s.
//!
//! So the request is sent without waiting, and the end of recovery is
//! polled every [`POLL`]. A startup process seen sleeping in that wait on
//! two polls in a row is woken with a configuration reload: its SIGHUP
//! handler sets the same latch the promotion signal does, and pgha has not
//! rewritten the configuration since its last reload, so the reload changes
//! nothing else. Once awake it
//! tries the local WAL once more, finds the promotion request already
//! registered and ends recovery.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::ctl::PgError;
use super::query;
use crate::model::{Lsn, Timeline};

/// How often the end of recovery is checked: one cheap local query.
pub const POLL: Duration = Duration::from_millis(5);

/// `pg_stat_activity.wait_event` of a startup process sleeping before its
/// next attempt to fetch WAL.
pub const RETRY_INTERVAL_WAIT: &str = "RecoveryRetrieveRetryInterval";

/// How a promotion went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Promoted {
    /// From the request to the first answer "not in recovery".
    pub elapsed: Duration,
    /// How many times the startup process had to be woken.
    pub wakeups: u32,
    /// The timeline the server writes on now.
    pub timeline: Option<Timeline>,
}

/// Whether to wake the startup process, given its wait event on this poll
/// and whether it was already sleeping in the retry interval on the
/// previous one. A single sighting may be the sleep the promotion signal is
/// about to end; a second one, a poll later, is the sleep nothing ends.
pub fn should_wake(startup_wait_event: Option<&str>, seen_before: bool) -> bool {
    seen_before && startup_wait_event == Some(RETRY_INTERVAL_WAIT)
}

fn sql(action: &str) -> impl FnOnce(tokio_postgres::Error) -> PgError {
    let action = action.to_string();
    move |source| PgError::Sql { action, source }
}

/// Asks the server to promote and returns once it accepts writes, or fails
/// after `timeout` (a server that stops answering counts too).
pub async fn promote(client: &Client, timeout: Duration) -> Result<Promoted, PgError> {
    tokio::time::timeout(timeout, promote_and_wait(client))
        .await
        .unwrap_or(Err(PgError::ToolTimeout {
            tool: "pg_promote".into(),
            action: "promote".into(),
            timeout,
        }))
}

async fn promote_and_wait(client: &Client) -> Result<Promoted, PgError> {
    let started = Instant::now();
    let signalled: bool = client
        .query_one(query::PROMOTE_NO_WAIT, &[])
        .await
        .map_err(sql("promote"))?
        .get(0);
    if !signalled {
        // pg_promote returns false only when it could not signal the
        // postmaster (it says why in the server log).
        return Err(PgError::Unexpected(
            "pg_promote could not signal the postmaster; see the server log".into(),
        ));
    }
    let mut wakeups = 0;
    let mut sleeping = false;
    loop {
        let row = client
            .query_one(query::PROMOTION_PROGRESS, &[])
            .await
            .map_err(sql("check the progress of the promotion"))?;
        let in_recovery: bool = row.get("in_recovery");
        if !in_recovery {
            return Ok(Promoted {
                elapsed: started.elapsed(),
                wakeups,
                timeline: row
                    .get::<_, Option<i32>>("timeline")
                    .map(|t| Timeline(t as u32)),
            });
        }
        let wait_event: Option<String> = row.get("startup_wait");
        if should_wake(wait_event.as_deref(), sleeping) {
            tracing::info!(
                after_ms = started.elapsed().as_millis() as u64,
                "the startup process sleeps out wal_retrieve_retry_interval after the promotion request; waking it"
            );
            client
                .batch_execute(query::RELOAD)
                .await
                .map_err(sql("wake the startup process"))?;
            wakeups += 1;
            sleeping = false;
        } else {
            sleeping = wait_event.as_deref() == Some(RETRY_INTERVAL_WAIT);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Where `timeline` branched off `parent`, from the timeline history file
/// the promotion wrote (`pg_wal/<TLI>.history`, lines of
/// `parentTLI<TAB>switchpoint<TAB>reason`).
///
/// This is the exact end of the parent's WAL that the new timeline kept. A
/// replica whose position on the parent is past it holds WAL the new
/// leader does not have, and must be rewound; the position the promoting
/// standby reported before promoting is no substitute, as it counts bytes
/// received after the last complete record.
pub async fn switch_point(
    client: &Client,
    timeline: Timeline,
    parent: Timeline,
) -> Result<Option<Lsn>, PgError> {
    let text: String = client
        .query_one(query::TIMELINE_HISTORY, &[&(timeline.0 as i32)])
        .await
        .map_err(|source| PgError::Sql {
            action: format!("read the history file of timeline {timeline}"),
            source,
        })?
        .get(0);
    Ok(parse_switch_point(&text, parent))
}

/// The switchpoint of `parent` in a timeline history file's text.
pub fn parse_switch_point(history: &str, parent: Timeline) -> Option<Lsn> {
    history
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let tli: u32 = fields.next()?.parse().ok()?;
            let lsn: Lsn = fields.next()?.parse().ok()?;
            Some((tli, lsn))
        })
        .find(|(tli, _)| *tli == parent.0)
        .map(|(_, lsn)| lsn)
}

/// How much of the end of the server log [`read_log_tail`] reads: far more
/// than the lines one promotion writes.
const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// The end of the server log (lossy UTF-8; empty when unreadable: the log
/// only adds detail to an error report).
pub fn read_log_tail(path: &std::path::Path) -> String {
    crate::safe_fs::read_untrusted(path, LOG_TAIL_BYTES, true)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Why the last promotion failed, from the server log: the last `FATAL`
/// or `PANIC` line after the last promotion request and before the
/// postmaster reports the startup process's death. The agent only sees its
/// connection close when the startup process dies at the timeline switch;
/// the cause ("could not write to file \"pg_wal/xlogtemp.…\": No space
/// left on device") is in the log. The walreceiver's own FATAL at the
/// request comes first, and the restart that follows refuses connections
/// with FATALs of its own, hence the bounds.
pub fn failed_promotion_cause(log: &str) -> Option<&str> {
    let since_request = log
        .rfind("received promote request")
        .map_or("", |at| &log[at..]);
    let until_death = since_request
        .find("startup process (")
        .map_or(since_request, |end| &since_request[..end]);
    until_death
        .lines()
        .rev()
        .find(|line| line.contains("FATAL:") || line.contains("PANIC:"))
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_point_of_the_parent_timeline() {
        let history = "1\t0/3000158\tno recovery target specified\n\n\
                       4\t0/4083260\tno recovery target specified\n";
        assert_eq!(
            parse_switch_point(history, Timeline(4)),
            Some("0/4083260".parse().unwrap())
        );
        assert_eq!(
            parse_switch_point(history, Timeline(1)),
            Some("0/3000158".parse().unwrap())
        );
        assert_eq!(parse_switch_point(history, Timeline(2)), None);
        assert_eq!(parse_switch_point("garbage\n", Timeline(1)), None);
        assert_eq!(parse_switch_point("", Timeline(1)), None);
    }

    #[test]
    fn wakes_only_a_startup_process_seen_sleeping_twice() {
        let cases = [
            (None, false, false),
            (None, true, false),
            (Some(RETRY_INTERVAL_WAIT), false, false),
            (Some(RETRY_INTERVAL_WAIT), true, true),
            (Some("RecoveryWalStream"), true, false),
            (Some("RecoveryWalStream"), false, false),
        ];
        for (event, seen_before, expected) in cases {
            assert_eq!(
                should_wake(event, seen_before),
                expected,
                "{event:?}, seen before: {seen_before}"
            );
        }
    }

    #[test]
    fn the_cause_of_a_failed_promotion_is_the_last_fatal_line_after_the_request() {
        // Shortened from a server whose WAL disk was full.
        let log = "\
2026-12-01 02:50:01.000 UTC [100] FATAL:  could not connect to the primary server: refused
2026-12-01 02:52:59.261 UTC [11732] LOG:  received promote request
2026-12-01 02:52:59.261 UTC [11939] FATAL:  terminating walreceiver process due to administrator command
2026-12-01 02:52:59.262 UTC [11732] LOG:  selected new timeline ID: 25
2026-12-01 02:52:59.329 UTC [11732] FATAL:  could not write to file \"pg_wal/xlogtemp.11732\": No space left on device
2026-12-01 02:52:59.335 UTC [11729] LOG:  startup process (PID 11732) exited with exit code 1
2026-12-01 02:52:59.351 UTC [11729] LOG:  shutting down due to startup process failure
2026-12-01 02:53:00.119 UTC [12065] LOG:  starting PostgreSQL 15.18
2026-12-01 02:53:00.201 UTC [12070] FATAL:  the database system is starting up
";
        assert_eq!(
            failed_promotion_cause(log),
            Some(
                "2026-12-01 02:52:59.329 UTC [11732] FATAL:  could not write to file \"pg_wal/xlogtemp.11732\": No space left on device"
            )
        );
        // Nothing since the request, or no request at all: no cause.
        let quiet = "x LOG:  received promote request\ny LOG:  database system is ready\n";
        assert_eq!(failed_promotion_cause(quiet), None);
        assert_eq!(failed_promotion_cause("z FATAL:  old news\n"), None);
    }
}
