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

/// The backup to restore: `id` if given (it must suit the target), else the
/// newest that suits it. For `latest` that is the newest backup on the
/// history of the newest archived timeline whose WAL is archived without a
/// gap to the end: PostgreSQL would otherwise stop at the gap and promote
/// there, as if the rest had never been written. For a time or an LSN the
/// backup must have ended by the target; a gap before the target makes
/// PostgreSQL stop with an error instead, which fails the bootstrap.
pub fn choose<'a>(
    backups: &'a [Manifest],
    target: &Target,
    id: Option<&str>,
    index: &ArchiveIndex,
    histories: &BTreeMap<Timeline, Vec<Switch>>,
) -> Result<&'a Manifest, BackupError> {
    let candidates = match id {
        Some(id) => {
            let pos = backups.iter().position(|m| m.id == id).ok_or_else(|| {
                BackupError::Restore(format!("no complete backup {id} in the repository"))
            })?;
            &backups[pos..=pos]
        }
        None => backups,
    };
    if *target != Target::Latest {
        return restore::choose(candidates, target);
    }
    let newest = index
        .timelines()
        .into_iter()
        .chain(candidates.iter().map(|m| Timeline(m.timeline)))
        .max()
        .unwrap_or(Timeline(1));
    let m = super::replica::pick(candidates, newest, index, histories)?;
    // PostgreSQL finds the newest timeline by asking the archive for the
    // history files after the backup's own, one by one: a missing one
    // stops it early, on an older timeline.
    if let Some(t) = (m.timeline + 1..=newest.0).find(|t| !index.histories.contains(&Timeline(*t)))
    {
        return Err(BackupError::Restore(format!(
            "{} is not archived: replay from backup {} would end on timeline {} instead of the newest, {}",
            naming::history_name(Timeline(t)),
            m.id,
            t - 1,
            newest.0
        )));
    }
    Ok(m)
}

/// Lists the repository, chooses the backup (see [`choose`]) and unpacks
/// it into `dir` (empty or absent), checked as a restore is.
pub fn unpack(
    repo: &dyn Repository,
    dir: &std::path::Path,
    bin_dir: &std::path::Path,
    target: &Target,
    id: Option<&str>,
    progress: &(dyn Fn(&Manifest, u64) + Sync),
) -> Result<Manifest, BackupError> {
    let backups = base::list(repo)?;
    let Some(newest) = backups.last() else {
        return Err(BackupError::Restore(
            "the repository holds no complete backup".into(),
        ));
    };
    let (index, histories) = base::archive_index(repo, newest.wal_segment_size)?;
    let m = choose(&backups, target, id, &index, &histories)?;
    progress(m, 0);
    restore::unpack(repo, m, dir, bin_dir, &|n| progress(m, n))?;
    Ok(m.clone())
}

/// The settings that make the restored server replay to `target` and then
/// promote, for `postgresql.auto.conf` (which pgha otherwise keeps empty,
/// and empties again once the server has promoted). Archiving stays as the
/// cluster configures it: the new timeline's history file must reach the
/// cluster's repository, and it is archived at the promotion.
pub fn recovery_settings(target: &Target, restore_command: &str, backup: &str) -> String {
    let mut out = format!(
        "# Written by pgha to bootstrap the cluster from backup {backup}; removed once the server has promoted.\n"
    );
    let mut set = |k: &str, v: &str| out.push_str(&format!("{k} = {}\n", quote_conf(v)));
    set("restore_command", restore_command);
    set("recovery_target_timeline", "latest");
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
        // a and b on timeline 1; the cluster failed over to 2 at 0/8000000.
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
        let pick = |target: &Target, id: Option<&str>, index: &ArchiveIndex| {
            choose(&backups, target, id, index, &h).map(|m| m.id.clone())
        };
        type Case<'a> = (
            &'a str,
            Target,
            Option<&'a str>,
            &'a ArchiveIndex,
            Result<&'a str, &'a str>,
        );
        let cases: Vec<Case> = vec![
            (
                "latest: the newest",
                Target::Latest,
                None,
                &full,
                Ok("20261201T020000Z"),
            ),
            (
                "latest: a named older backup",
                Target::Latest,
                Some("20261201T010000Z"),
                &full,
                Ok("20261201T010000Z"),
            ),
            (
                "a time between the backups",
                at("2026-12-01T01:30:00Z"),
                None,
                &full,
                Ok("20261201T010000Z"),
            ),
            (
                "a named backup that ended after the target",
                at("2026-12-01T01:30:00Z"),
                Some("20261201T020000Z"),
                &full,
                Err("before the oldest backup"),
            ),
            (
                "an unknown id",
                Target::Latest,
                Some("20261201T030000Z"),
                &full,
                Err("no complete backup 20261201T030000Z"),
            ),
            (
                "an LSN",
                at("0/6800000"),
                None,
                &full,
                Ok("20261201T010000Z"),
            ),
        ];
        for (what, target, id, index, want) in cases {
            let got = pick(&target, id, index);
            match (want, &got) {
                (Ok(w), Ok(g)) => assert_eq!(g, w, "{what}"),
                (Err(w), Err(e)) => assert!(e.to_string().contains(w), "{what}: {e}"),
                _ => panic!("{what}: {got:?}"),
            }
        }
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
        assert_eq!(
            choose(&backups, &Target::Latest, None, &gap_before_newest, &h)
                .unwrap()
                .id,
            "20261201T020000Z"
        );
        let err = choose(
            &backups,
            &Target::Latest,
            Some("20261201T010000Z"),
            &gap_before_newest,
            &h,
        )
        .unwrap_err();
        assert!(err.to_string().contains("is not archived"), "{err}");
        // A gap on the newest timeline spoils every backup.
        let gap_after = archive(&[(1, 2..=7), (2, 8..=8), (2, 10..=10)], &[2]);
        let err = choose(&backups, &Target::Latest, None, &gap_after, &h).unwrap_err();
        assert!(err.to_string().contains("00000002000000000000000"), "{err}");
        // Timeline 3's history file is gone although 4's is there:
        // PostgreSQL would stop looking at timeline 2.
        let h4 = histories(&[
            (2, &[(1, "0/8000000")]),
            (4, &[(1, "0/8000000"), (2, "0/A000000"), (3, "0/B000000")]),
        ]);
        let holes = archive(
            &[(1, 2..=7), (2, 8..=10), (3, 10..=11), (4, 11..=12)],
            &[2, 4],
        );
        let err = choose(&backups, &Target::Latest, None, &holes, &h4).unwrap_err();
        assert!(
            err.to_string().contains("00000003.history is not archived"),
            "{err}"
        );
        assert!(choose(&[], &Target::Latest, None, &holes, &h4).is_err());
    }

    #[test]
    fn recovery_settings_replay_to_the_target_and_promote() {
        let cmd = "'/bin/pgha' wal get -c '/s/backup.toml' %f %p";
        let latest = recovery_settings(&Target::Latest, cmd, "20261201T010000Z");
        assert!(latest.contains("from backup 20261201T010000Z"));
        assert!(
            latest.contains(
                "restore_command = '''/bin/pgha'' wal get -c ''/s/backup.toml'' %f %p'\n"
            )
        );
        assert!(latest.contains("recovery_target_timeline = 'latest'\n"));
        assert!(!latest.contains("recovery_target_action"));
        // Archiving is left to the cluster's settings.
        assert!(!latest.contains("archive_mode"));
        let at = recovery_settings(&parse_target("2026-12-01T01:30:00.25Z").unwrap(), cmd, "x");
        assert!(
            at.contains("recovery_target_time = '2026-12-01 01:30:00.250000+00'\n"),
            "{at}"
        );
        assert!(at.contains("recovery_target_action = 'promote'\n"));
        let lsn = recovery_settings(&parse_target("0/6800000").unwrap(), cmd, "x");
        assert!(lsn.contains("recovery_target_lsn = '0/6800000'\n"));
    }
}
