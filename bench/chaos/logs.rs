//! What the HA loop did during one fault, read from the agents' logs.
//!
//! Before each injection the bench notes the length of every node's
//! `agent.log` and `state/fence-keeper.log` ([`LogMarks::take`]); once the
//! fault has recovered it reads what was appended since
//! ([`LogMarks::read_since`]) and [`analyse`] counts the HA loop's turns
//! in that window. Byte offsets rather than timestamps delimit the window
//! because the fence keeper's lines carry no time.
//!
//! The patterns are the agent's own log lines (src/agent/mod.rs
//! `"decided"`, src/agent/executor.rs, src/agent/fence_keeper.rs); a
//! change of wording there must be followed here, and the unit tests
//! below hold one real line of each.

use std::path::PathBuf;
use std::time::SystemTime;

use serde::Serialize;

use crate::cluster::Cluster;

/// Two `AcquireLease` decisions of different members closer than this
/// raced for the same vacant lease.
const RACE_WINDOW_MS: f64 = 1_000.0;

/// Appended text of one node's logs in a fault's window.
pub struct NodeLog {
    pub node: String,
    pub agent: String,
    pub keeper: String,
}

/// Lengths of every node's logs at one instant.
pub struct LogMarks {
    files: Vec<(String, PathBuf, u64, PathBuf, u64)>,
}

fn len(path: &PathBuf) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn read_from(path: &PathBuf, offset: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    // A file shorter than the mark was replaced: read all of it.
    let start = if len(path) < offset { 0 } else { offset };
    let mut bytes = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

impl LogMarks {
    pub fn take(cluster: &Cluster) -> LogMarks {
        LogMarks {
            files: cluster
                .nodes
                .iter()
                .map(|n| {
                    let keeper = n.dir.join("state").join("fence-keeper.log");
                    (
                        n.name.clone(),
                        n.log_path.clone(),
                        len(&n.log_path),
                        keeper.clone(),
                        len(&keeper),
                    )
                })
                .collect(),
        }
    }

    pub fn read_since(&self) -> Vec<NodeLog> {
        self.files
            .iter()
            .map(|(node, agent, a, keeper, k)| NodeLog {
                node: node.clone(),
                agent: read_from(agent, *a),
                keeper: read_from(keeper, *k),
            })
            .collect()
    }
}

/// The HA loop's turns in one fault's window; see bench/README.md.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HaCounts {
    /// Groups of two or more members deciding `AcquireLease` within
    /// [`RACE_WINDOW_MS`] of each other.
    pub blind_races: usize,
    /// Synchronous records written (or carried by a promotion) degraded
    /// or with no members.
    pub degraded_records: usize,
    /// Rewinds started by a member that was not the leader at injection.
    pub needless_rewinds: usize,
    /// `Demote` decisions by any agent.
    pub agent_demotions: usize,
    /// Postmasters killed by a fence keeper at its lease deadline.
    pub keeper_fencings: usize,
    /// Per promotion: from the new leader's last `AcquireLease` (or,
    /// without one, its `Promote`) decision to its "promoted" line.
    pub promotion_ms: Vec<f64>,
    /// Per promotion, the agent's own `ms=` of its "promoted" line: the
    /// promote call alone (the issue's bimodal 107 / 609 ms figure).
    pub promote_call_ms: Vec<f64>,
    /// How many times the lease passed to another member (from the
    /// sequence of "acquired the leader lease" lines, starting with the
    /// leader at injection).
    pub leader_changes: usize,
}

impl HaCounts {
    pub fn add(&mut self, other: &HaCounts) {
        self.blind_races += other.blind_races;
        self.degraded_records += other.degraded_records;
        self.needless_rewinds += other.needless_rewinds;
        self.agent_demotions += other.agent_demotions;
        self.keeper_fencings += other.keeper_fencings;
        self.promotion_ms.extend_from_slice(&other.promotion_ms);
        self.promote_call_ms
            .extend_from_slice(&other.promote_call_ms);
        self.leader_changes += other.leader_changes;
    }
}

/// Milliseconds since the epoch of a line starting with an RFC 3339
/// timestamp (the agent's log format), or `None`.
fn line_ms(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let t = humantime::parse_rfc3339(stamp).ok()?;
    Some(t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs_f64() * 1000.0)
}

/// The value of `key=value` in a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn is_degraded_record(line: &str) -> bool {
    let record = line.contains("recorded the synchronous set")
        || (line.contains("decided action=Promote") && line.contains("SyncRecord"));
    record
        && (line.contains("degraded=true")
            || line.contains("degraded: true")
            || line.contains("members=[]")
            || line.contains("members: []"))
}

/// Counts the turns of the HA loop in the logs of one window;
/// `old_leader` is the node that led at injection.
pub fn analyse(logs: &[NodeLog], old_leader: &str) -> HaCounts {
    let mut counts = HaCounts::default();
    // (time, node) of every AcquireLease decision and lease acquisition.
    let mut races: Vec<(f64, &str)> = Vec::new();
    let mut acquisitions: Vec<(f64, &str)> = Vec::new();
    for log in logs {
        let mut candidate_since: Option<f64> = None;
        let mut promote_since: Option<f64> = None;
        for line in log.agent.lines() {
            let at = line_ms(line);
            if line.contains("decided action=AcquireLease") {
                if let Some(t) = at {
                    races.push((t, &log.node));
                    candidate_since = Some(t);
                }
            } else if line.contains("decided action=Promote") {
                promote_since = at;
            } else if line.contains("acquired the leader lease") && !line.contains("another member")
            {
                if let Some(t) = at {
                    acquisitions.push((t, &log.node));
                }
            } else if line.contains("decided action=Demote") {
                counts.agent_demotions += 1;
            } else if line.contains("starting background job job=Rewinding")
                && log.node != old_leader
            {
                counts.needless_rewinds += 1;
            } else if line.contains(": promoted ") {
                if let (Some(end), Some(start)) = (at, candidate_since.or(promote_since)) {
                    counts.promotion_ms.push(end - start);
                }
                if let Some(ms) = field(line, "ms").and_then(|v| v.parse().ok()) {
                    counts.promote_call_ms.push(ms);
                }
                candidate_since = None;
                promote_since = None;
            }
            if is_degraded_record(line) {
                counts.degraded_records += 1;
            }
        }
        counts.keeper_fencings += log
            .keeper
            .lines()
            .filter(|l| l.contains("lease deadline passed") && l.contains("killed postmaster"))
            .count();
    }
    races.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut i = 0;
    while i < races.len() {
        let mut j = i + 1;
        while j < races.len() && races[j].0 - races[i].0 <= RACE_WINDOW_MS {
            j += 1;
        }
        let members: std::collections::BTreeSet<&str> =
            races[i..j].iter().map(|(_, n)| *n).collect();
        if members.len() >= 2 {
            counts.blind_races += 1;
        }
        i = j;
    }
    acquisitions.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut holder = old_leader;
    for (_, node) in acquisitions {
        if node != holder {
            counts.leader_changes += 1;
            holder = node;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "2026-12-01T01:00:";

    fn node(name: &str, agent: &[&str], keeper: &[&str]) -> NodeLog {
        NodeLog {
            node: name.into(),
            agent: agent.iter().map(|l| format!("{l}\n")).collect(),
            keeper: keeper.iter().map(|l| format!("{l}\n")).collect(),
        }
    }

    #[test]
    fn a_clean_failover_counts_one_change_and_its_promotion_time() {
        let logs = [
            node(
                "node1",
                &[&format!(
                    "{T}01.000000Z  INFO pgha::agent: decided action=Demote {{ reason: LeaseLost }} reason=lease lost"
                )],
                &[],
            ),
            node(
                "node2",
                &[
                    &format!(
                        "{T}04.000000Z  INFO pgha::agent: decided action=AcquireLease reason=leader key vacant"
                    ),
                    &format!(
                        "{T}04.020000Z  INFO pgha::agent::executor: acquired the leader lease"
                    ),
                    &format!(
                        "{T}04.030000Z  INFO pgha::agent: decided action=Promote {{ sync: Some((SyncRecord {{ leader: MemberName(\"node2\"), members: [MemberName(\"node3\")], quorum: 1, degraded: false }}, x)) }} reason=promoting"
                    ),
                    &format!(
                        "{T}04.107000Z  INFO pgha::agent::executor: promoted ms=70 wakeups=3 timeline=2"
                    ),
                ],
                &[],
            ),
            node(
                "node3",
                &[&format!(
                    "{T}04.900000Z  INFO pgha::agent::executor: recorded the synchronous set members=[MemberName(\"node3\")] k=1 degraded=false"
                )],
                &[],
            ),
        ];
        let c = analyse(&logs, "node1");
        assert_eq!(
            c,
            HaCounts {
                agent_demotions: 1,
                promotion_ms: vec![c.promotion_ms[0]],
                promote_call_ms: vec![70.0],
                leader_changes: 1,
                ..HaCounts::default()
            }
        );
        assert!((c.promotion_ms[0] - 107.0).abs() < 0.01);
    }

    #[test]
    fn two_candidates_within_a_second_race_blind() {
        let logs = [
            node(
                "node2",
                &[&format!(
                    "{T}04.000000Z  INFO pgha::agent: decided action=AcquireLease reason=r"
                )],
                &[],
            ),
            node(
                "node3",
                &[
                    &format!(
                        "{T}04.400000Z  INFO pgha::agent: decided action=AcquireLease reason=r"
                    ),
                    // Later, alone: not a race.
                    &format!(
                        "{T}09.000000Z  INFO pgha::agent: decided action=AcquireLease reason=r"
                    ),
                ],
                &[],
            ),
        ];
        assert_eq!(analyse(&logs, "node1").blind_races, 1);
    }

    #[test]
    fn degraded_records_rewinds_of_replicas_and_keeper_kills_are_counted() {
        let logs = [
            node(
                "node1",
                &[&format!(
                    "{T}05.000000Z  INFO pgha::agent::executor: starting background job job=Rewinding leader=node2 host=h port=1"
                )],
                &[
                    "fence keeper: lease deadline passed 12 ms ago without renewal; killed postmaster 4242",
                ],
            ),
            node(
                "node3",
                &[
                    &format!(
                        "{T}05.000000Z  INFO pgha::agent::executor: starting background job job=Rewinding leader=node2 host=h port=1"
                    ),
                    &format!(
                        "{T}05.100000Z  INFO pgha::agent::executor: recorded the synchronous set members=[] k=0 degraded=true"
                    ),
                    &format!(
                        "{T}05.200000Z  INFO pgha::agent: decided action=Promote {{ sync: Some((SyncRecord {{ leader: MemberName(\"node3\"), members: [], quorum: 0, degraded: true }}, x)) }} reason=p"
                    ),
                ],
                &[],
            ),
        ];
        let c = analyse(&logs, "node1");
        assert_eq!(c.needless_rewinds, 1);
        assert_eq!(c.degraded_records, 2);
        assert_eq!(c.keeper_fencings, 1);
        assert_eq!(c.leader_changes, 0);
    }

    #[test]
    fn the_lease_returning_to_the_old_leader_is_two_changes() {
        let logs = [
            node(
                "node1",
                &[&format!(
                    "{T}09.000000Z  INFO pgha::agent::executor: acquired the leader lease"
                )],
                &[],
            ),
            node(
                "node2",
                &[&format!(
                    "{T}04.000000Z  INFO pgha::agent::executor: acquired the leader lease"
                )],
                &[],
            ),
        ];
        assert_eq!(analyse(&logs, "node1").leader_changes, 2);
    }
}
