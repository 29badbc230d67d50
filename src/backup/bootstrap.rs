//! A new cluster from a backup (`[bootstrap.from_backup]`): the member that
//! wins the bootstrap race unpacks a backup instead of running `initdb`,
//! replays archived WAL to the target, and promotes under the leader lease.
//!
//! The unpacking runs as the PostgreSQL account (`pgha backup
//! unpack-bootstrap`), like a replica's restore, so the files are that
//! account's own; the agent writes only the recovery settings, through its
//! symlink-safe handle on the data directory.

use std::collections::BTreeMap;

use super::BackupError;
use super::base::{self, Manifest};
use super::chain::{ArchiveIndex, Switch};
use super::naming;
use super::repo::Repository;
use super::restore::{self, Target};
use crate::model::Timeline;
use crate::postgres::conf::quote_conf;

/// The backup to restore and the timeline replay follows. The timeline is
/// `timeline` if given, else the newest archived one, and is written into
/// the recovery settings as a number: replay then follows exactly the
/// history checked here (with `latest`, a timeline archived in between,
/// say by another restore from this repository, would be followed
/// instead). The backup is `id` if given, else the newest that suits the
/// target, and must lie on that timeline's history (PostgreSQL refuses
/// one that does not, but only after the whole unpack). For a `latest`
/// target its WAL must also be archived without a gap to the end:
/// PostgreSQL would otherwise stop at the gap and promote there, as if the
/// rest had never been written. For a time or an LSN the backup must have
/// ended by the target; a gap before the target makes PostgreSQL stop with
/// an error instead, which fails the bootstrap.
pub fn choose<'a>(
    backups: &'a [Manifest],
    target: &Target,
    id: Option<&str>,
    timeline: Option<Timeline>,
    index: &ArchiveIndex,
    histories: &BTreeMap<Timeline, Vec<Switch>>,
) -> Result<(&'a Manifest, Timeline), BackupError> {
    let candidates = match id {
        Some(id) => {
            let pos = backups.iter().position(|m| m.id == id).ok_or_else(|| {
                BackupError::Restore(format!("no complete backup {id} in the repository"))
            })?;
            &backups[pos..=pos]
        }
        None => backups,
    };
    let timeline = timeline.unwrap_or_else(|| {
        index
            .timelines()
            .into_iter()
            .chain(backups.iter().map(|m| Timeline(m.timeline)))
            .max()
            .unwrap_or(Timeline(1))
    });
    if *target == Target::Latest {
        let m = super::replica::pick(candidates, timeline, index, histories)?;
        return Ok((m, timeline));
    }
    let history = match histories.get(&timeline) {
        Some(h) => h.as_slice(),
        None if timeline.0 <= 1 => &[],
        None => {
            return Err(BackupError::Restore(format!(
                "{} (the history of timeline {}) is not archived",
                naming::history_name(timeline),
                timeline.0
            )));
        }
    };
    let on_history: Vec<Manifest> = candidates
        .iter()
        .filter(|m| super::replica::lies_on(m, timeline, history))
        .cloned()
        .collect();
    if on_history.is_empty() {
        return Err(BackupError::Restore(match id {
            Some(id) => format!(
                "backup {id} does not lie on the history of timeline {}",
                timeline.0
            ),
            None => format!("no backup lies on the history of timeline {}", timeline.0),
        }));
    }
    let m = restore::choose(&on_history, target)?;
    let pos = candidates
        .iter()
        .position(|c| c.id == m.id)
        .expect("chosen from the candidates");
    Ok((&candidates[pos], timeline))
}

/// Lists the repository, chooses the backup (see [`choose`]) and unpacks
/// it into `dir` (empty or absent), checked as a restore is.
pub fn unpack(
    repo: &dyn Repository,
    dir: &std::path::Path,
    bin_dir: &std::path::Path,
    target: &Target,
    id: Option<&str>,
    timeline: Option<Timeline>,
    progress: &(dyn Fn(&Manifest, u64) + Sync),
) -> Result<(Manifest, Timeline), BackupError> {
    let backups = base::list(repo)?;
    let Some(newest) = backups.last() else {
        return Err(BackupError::Restore(
            "the repository holds no complete backup".into(),
        ));
    };
    let (index, histories) = base::archive_index(repo, newest.wal_segment_size)?;
    let (m, timeline) = choose(&backups, target, id, timeline, &index, &histories)?;
    progress(m, 0);
    restore::unpack(repo, m, dir, bin_dir, &|n| progress(m, n))?;
    Ok((m.clone(), timeline))
}

/// The settings that make the restored server replay to `target` on
/// `timeline` and then promote, for `postgresql.auto.conf` (which pgha
/// otherwise keeps empty, and empties again before the restore counts as
/// done). The first line is pgha's marker: a directory with these settings
/// is pgha's, never a database to adopt. Archiving stays as the cluster
/// configures it: the new timeline's history file must reach the
/// cluster's repository, and it is archived at the promotion. Hot standby
/// is off: nothing needs to read the server during replay, and with it on
/// PostgreSQL 14+ *pauses* replay for good when the backup's
/// `max_connections` (or another such limit) exceeds this cluster's.
pub fn recovery_settings(
    target: &Target,
    timeline: Timeline,
    restore_command: &str,
    backup: &str,
) -> String {
    let mut out = format!(
        "{} (recovery settings of the bootstrap from backup {backup})\n",
        crate::postgres::adopt::MANAGED_MARKER
    );
    let mut set = |k: &str, v: &str| out.push_str(&format!("{k} = {}\n", quote_conf(v)));
    set("restore_command", restore_command);
    set("recovery_target_timeline", &timeline.0.to_string());
    set("hot_standby", "off");
    match target {
        Target::Latest => {}
        Target::Time(t) => {
            // PostgreSQL reads `2026-01-31 02:00:00.123456+00`.
            let text = humantime::format_rfc3339_micros(*t).to_string();
            set(
                "recovery_target_time",
                &text.replacen('T', " ", 1).replace('Z', "+00"),
            );
        }
        Target::Lsn(l) => set("recovery_target_lsn", &l.to_string()),
    }
    if *target != Target::Latest {
        set("recovery_target_action", "promote");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::restore::parse_target;

    fn backup(id: &str, timeline: u32, start: &str, stop: &str, stop_time: &str) -> Manifest {
        Manifest {
            id: id.into(),
            label: String::new(),
            source: "n".into(),
            timeline,
            start_lsn: start.parse().unwrap(),
            stop_lsn: stop.parse().unwrap(),
            start_time: stop_time.into(),
            stop_time: stop_time.into(),
            wal_segment_size: 16 << 20,
            server_manifest: String::new(),
            files: vec![],
        }
    }

    fn archive(
        segments: &[(u32, std::ops::RangeInclusive<u64>)],
        histories: &[u32],
    ) -> ArchiveIndex {
        let mut index = ArchiveIndex::default();
        for (tl, range) in segments {
            index
                .segments
                .entry(Timeline(*tl))
                .or_default()
                .extend(range.clone());
        }
        index.histories = histories.iter().map(|t| Timeline(*t)).collect();
        index
    }

    fn histories(list: &[(u32, &[(u32, &str)])]) -> BTreeMap<Timeline, Vec<Switch>> {
        list.iter()
            .map(|(tl, switches)| {
                (
                    Timeline(*tl),
                    switches
                        .iter()
                        .map(|(parent, lsn)| Switch {
                            parent: Timeline(*parent),
                            switch: lsn.parse().unwrap(),
                        })
                        .collect(),
                )
            })
            .collect()
    }

    #[test]
    fn the_backup_suits_the_target() {
        // Both backups on timeline 1; the cluster failed over to 2 at
        // 0/8000000.
        let backups = [
            backup(
                "20261201T010000Z",
                1,
                "0/2000028",
                "0/3000000",
                "2026-12-01T01:00:10Z",
            ),
            backup(
                "20261201T020000Z",
                1,
                "0/6000028",
                "0/7000000",
                "2026-12-01T02:00:10Z",
            ),
        ];
        let full = archive(&[(1, 2..=7), (2, 8..=10)], &[2]);
        let h = histories(&[(2, &[(1, "0/8000000")])]);
        let at = |s: &str| parse_target(s).unwrap();
        type Case<'a> = (
            &'a str,
            Target,
            Option<&'a str>,
            Option<u32>,
            Result<(&'a str, u32), &'a str>,
        );
        let cases: Vec<Case> = vec![
            (
                "latest: the newest, on the newest timeline",
                Target::Latest,
                None,
                None,
                Ok(("20261201T020000Z", 2)),
            ),
            (
                "latest: a named older backup",
                Target::Latest,
                Some("20261201T010000Z"),
                None,
                Ok(("20261201T010000Z", 2)),
            ),
            (
                "latest on timeline 1, named",
                Target::Latest,
                None,
                Some(1),
                Ok(("20261201T020000Z", 1)),
            ),
            (
                "a time between the backups",
                at("2026-12-01T01:30:00Z"),
                None,
                None,
                Ok(("20261201T010000Z", 2)),
            ),
            (
                "a named backup that ended after the target",
                at("2026-12-01T01:30:00Z"),
                Some("20261201T020000Z"),
                None,
                Err("before the oldest backup"),
            ),
            (
                "an unknown id",
                Target::Latest,
                Some("20261201T030000Z"),
                None,
                Err("no complete backup 20261201T030000Z"),
            ),
            (
                "an LSN",
                at("0/6800000"),
                None,
                None,
                Ok(("20261201T010000Z", 2)),
            ),
            (
                "a timeline whose history is not archived",
                at("0/6800000"),
                None,
                Some(3),
                Err("00000003.history (the history of timeline 3) is not archived"),
            ),
        ];
        for (what, target, id, timeline, want) in cases {
            let got = choose(&backups, &target, id, timeline.map(Timeline), &full, &h)
                .map(|(m, t)| (m.id.clone(), t.0));
            match (want, &got) {
                (Ok((w, wt)), Ok((g, gt))) => assert_eq!((g.as_str(), *gt), (w, wt), "{what}"),
                (Err(w), Err(e)) => assert!(e.to_string().contains(w), "{what}: {e}"),
                _ => panic!("{what}: {got:?}"),
            }
        }
    }

    #[test]
    fn the_backup_must_lie_on_the_timelines_history() {
        // Timeline 2 left 1 at 0/5000000; the second backup was taken on 1
        // after that (the old primary went on for a while): it is not on
        // 2's history.
        let backups = [
            backup(
                "20261201T010000Z",
                1,
                "0/2000028",
                "0/3000000",
                "2026-12-01T01:00:10Z",
            ),
            backup(
                "20261201T020000Z",
                1,
                "0/6000028",
                "0/7000000",
                "2026-12-01T02:00:10Z",
            ),
        ];
        let index = archive(&[(1, 2..=7), (2, 5..=9)], &[2]);
        let h = histories(&[(2, &[(1, "0/5000000")])]);
        let target = parse_target("2026-12-01T03:00:00Z").unwrap();
        let (m, t) = choose(&backups, &target, None, None, &index, &h).unwrap();
        assert_eq!((m.id.as_str(), t.0), ("20261201T010000Z", 2));
        let err = choose(
            &backups,
            &target,
            Some("20261201T020000Z"),
            None,
            &index,
            &h,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("does not lie on the history of timeline 2"),
            "{err}"
        );
        // On timeline 1 itself, it is the newest.
        let (m, _) = choose(&backups, &target, None, Some(Timeline(1)), &index, &h).unwrap();
        assert_eq!(m.id, "20261201T020000Z");
    }

    #[test]
    fn latest_refuses_a_gap_that_would_end_replay_early() {
        let backups = [
            backup(
                "20261201T010000Z",
                1,
                "0/2000028",
                "0/3000000",
                "2026-12-01T01:00:10Z",
            ),
            backup(
                "20261201T020000Z",
                1,
                "0/6000028",
                "0/7000000",
                "2026-12-01T02:00:10Z",
            ),
        ];
        let h = histories(&[(2, &[(1, "0/8000000")])]);
        // Segment 4 is missing: only the newer backup replays to the end.
        let gap_before_newest = archive(&[(1, 2..=3), (1, 5..=7), (2, 8..=10)], &[2]);
        let latest = |id, index| choose(&backups, &Target::Latest, id, None, index, &h);
        assert_eq!(
            latest(None, &gap_before_newest).unwrap().0.id,
            "20261201T020000Z"
        );
        let err = latest(Some("20261201T010000Z"), &gap_before_newest).unwrap_err();
        assert!(err.to_string().contains("is not archived"), "{err}");
        // A gap on the newest timeline spoils every backup.
        let gap_after = archive(&[(1, 2..=7), (2, 8..=8), (2, 10..=10)], &[2]);
        let err = latest(None, &gap_after).unwrap_err();
        assert!(err.to_string().contains("00000002000000000000000"), "{err}");
        assert!(choose(&[], &Target::Latest, None, None, &gap_after, &h).is_err());
    }

    #[test]
    fn recovery_settings_replay_to_the_target_and_promote() {
        let cmd = "'/bin/pgha' wal get -c '/s/backup.toml' %f %p";
        let latest = recovery_settings(&Target::Latest, Timeline(3), cmd, "20261201T010000Z");
        // pgha's marker first: never taken for a database to adopt.
        assert!(latest.starts_with(crate::postgres::adopt::MANAGED_MARKER));
        assert!(latest.contains("from backup 20261201T010000Z"));
        assert!(
            latest.contains(
                "restore_command = '''/bin/pgha'' wal get -c ''/s/backup.toml'' %f %p'\n"
            )
        );
        assert!(latest.contains("recovery_target_timeline = '3'\n"));
        assert!(latest.contains("hot_standby = 'off'\n"));
        assert!(!latest.contains("recovery_target_action"));
        // Archiving is left to the cluster's settings.
        assert!(!latest.contains("archive_mode"));
        let at = recovery_settings(
            &parse_target("2026-12-01T01:30:00.25Z").unwrap(),
            Timeline(1),
            cmd,
            "x",
        );
        assert!(
            at.contains("recovery_target_time = '2026-12-01 01:30:00.250000+00'\n"),
            "{at}"
        );
        assert!(at.contains("recovery_target_action = 'promote'\n"));
        let lsn = recovery_settings(&parse_target("0/6800000").unwrap(), Timeline(1), cmd, "x");
        assert!(lsn.contains("recovery_target_lsn = '0/6800000'\n"));
    }
}
