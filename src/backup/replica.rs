//! A replica's data directory from the repository instead of from the
//! leader (`backup.clone_from = "backup"`): the newest backup that lies on
//! the leader's history is unpacked; PostgreSQL then replays archived WAL
//! through `restore_command` and streams from the leader once the archive
//! runs out. A large cluster's new member then costs the leader no reads.
//!
//! Run as the PostgreSQL account (`pgha backup unpack-replica`), so the
//! files are that account's own and the agent, which may be root, never
//! writes into a directory that account controls.

use super::BackupError;
use super::base::{self, Manifest};
use super::chain::{self, Switch};
use super::naming;
use super::repo::Repository;
use crate::model::{Lsn, Timeline};

/// The newest backup a replica of a leader on `timeline` can start from:
/// one taken on that timeline, or on an ancestor of it before the leader's
/// history left that ancestor. `history` is the history of `timeline`
/// (empty for timeline 1). A backup of a timeline the leader's history
/// abandoned, or left before the backup ended, would replay a past the
/// leader does not have.
pub fn choose<'a>(
    backups: &'a [Manifest],
    timeline: Timeline,
    history: &[Switch],
) -> Option<&'a Manifest> {
    backups.iter().rev().find(|m| lies_on(m, timeline, history))
}

/// Whether replay of `m` can continue onto `timeline` (whose history is
/// `history`): taken on it, or on an ancestor before the history left it.
pub fn lies_on(m: &Manifest, timeline: Timeline, history: &[Switch]) -> bool {
    let tl = Timeline(m.timeline);
    tl == timeline
        || history
            .iter()
            .any(|s| s.parent == tl && m.stop_lsn <= s.switch)
}

/// Unpacks into `dir` (empty or absent) the newest backup that fits a
/// leader on `timeline` and whose WAL is archived without a gap from its
/// start to the newest archived segment on the leader's history (a gap
/// the leader has recycled would leave the standby waiting for ever);
/// checks it like a restore does (stored checksums while unpacking,
/// `pg_verifybackup` after) and, when `system_id` is given, that it is a
/// copy of that database system (a repository reused by a rebuilt
/// cluster holds another system's backups). The caller starts the result
/// as a standby of the leader. `progress` is called with the backup chosen
/// and the bytes unpacked so far: once with 0 before the first byte, then
/// as [`super::restore::unpack`] goes.
pub fn unpack(
    repo: &dyn Repository,
    dir: &std::path::Path,
    bin_dir: &std::path::Path,
    timeline: Timeline,
    system_id: Option<&str>,
    progress: &(dyn Fn(&Manifest, u64) + Sync),
) -> Result<Manifest, BackupError> {
    let backups = base::list(repo)?;
    let Some(newest) = backups.last() else {
        return Err(BackupError::Restore(
            "the repository holds no complete backup".into(),
        ));
    };
    let (index, histories) = base::archive_index(repo, newest.wal_segment_size)?;
    let m = pick(&backups, timeline, &index, &histories)?;
    progress(m, 0);
    super::restore::unpack(repo, m, dir, bin_dir, &|n| progress(m, n))?;
    if let Some(want) = system_id {
        let found = system_identifier(dir, bin_dir)?;
        if found != want {
            return Err(BackupError::Restore(format!(
                "backup {} is of database system {found}, not this cluster's {want}",
                m.id
            )));
        }
    }
    Ok(m.clone())
}

/// The newest of `backups` (oldest first) that fits a server on
/// `timeline` (see [`choose`]) and whose WAL is archived without a gap from
/// its start to the newest archived segment on that timeline's history;
/// the error says why each newer backup was passed over. Pure: `index` and
/// `histories` are the archive as [`base::archive_index`] read it.
pub fn pick<'a>(
    backups: &'a [Manifest],
    timeline: Timeline,
    index: &chain::ArchiveIndex,
    histories: &std::collections::BTreeMap<Timeline, Vec<Switch>>,
) -> Result<&'a Manifest, BackupError> {
    let Some(newest) = backups.last() else {
        return Err(BackupError::Restore(
            "the repository holds no complete backup".into(),
        ));
    };
    let seg = newest.wal_segment_size;
    let history = match histories.get(&timeline) {
        Some(h) => h.clone(),
        None if timeline.0 <= 1 => Vec::new(),
        None => {
            return Err(BackupError::Restore(format!(
                "{} (the history of timeline {}) is not archived",
                naming::history_name(timeline),
                timeline.0
            )));
        }
    };
    let path = chain::path_to(timeline, &history, seg);
    let mut rejected = Vec::new();
    let mut candidates = backups;
    loop {
        let Some(m) = choose(candidates, timeline, &history) else {
            rejected.push(format!(
                "no {}backup lies on the history of timeline {}",
                if rejected.is_empty() { "" } else { "other " },
                timeline.0
            ));
            return Err(BackupError::Restore(rejected.join("; ")));
        };
        let stop = naming::segno_of(Lsn(m.stop_lsn.0.saturating_sub(1)), seg);
        let last = chain::last_segment(&path, index).unwrap_or(0).max(stop);
        let missing = chain::missing(&path, m.start_lsn, last, index, seg);
        match missing.first() {
            None => return Ok(m),
            Some(first) => {
                rejected.push(format!(
                    "backup {}: {first} is not archived ({} segment(s) missing after its start)",
                    m.id,
                    missing.len()
                ));
                let pos = candidates
                    .iter()
                    .position(|c| c.id == m.id)
                    .expect("chosen from the candidates");
                candidates = &candidates[..pos];
            }
        }
    }
}

/// The database system identifier in `dir`'s control file.
fn system_identifier(
    dir: &std::path::Path,
    bin_dir: &std::path::Path,
) -> Result<String, BackupError> {
    let tool = bin_dir.join("pg_controldata");
    let out = std::process::Command::new(&tool)
        .arg("-D")
        .arg(dir)
        .env("LC_ALL", "C")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| BackupError::Local {
            action: "run",
            path: tool.clone(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Database system identifier:"))
        .map(|v| v.trim().to_string())
        .filter(|_| out.status.success())
        .ok_or_else(|| BackupError::Tool {
            tool: "pg_controldata".into(),
            detail: format!(
                "{}: no system identifier: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup(id: &str, timeline: u32, stop_lsn: &str) -> Manifest {
        Manifest {
            id: id.into(),
            label: String::new(),
            source: "n".into(),
            timeline,
            start_lsn: "0/1000000".parse().unwrap(),
            stop_lsn: stop_lsn.parse().unwrap(),
            start_time: String::new(),
            stop_time: String::new(),
            wal_segment_size: 16 << 20,
            server_manifest: String::new(),
            files: vec![],
        }
    }

    fn switch(parent: u32, lsn: &str) -> Switch {
        Switch {
            parent: Timeline(parent),
            switch: lsn.parse().unwrap(),
        }
    }

    #[test]
    fn the_newest_backup_on_the_leaders_history_is_chosen() {
        // Oldest first, as base::list returns them.
        let backups = [
            backup("a", 1, "0/2000000"),
            backup("b", 1, "0/6000000"),
            backup("c", 2, "0/7000000"),
            // Taken on timeline 3, which the leader (on 4) never had.
            backup("d", 3, "0/8000000"),
        ];
        // Timeline 1 forked to 2 at 0/5000000; 2 forked to 4 at 0/9000000.
        let history_of_4 = [switch(1, "0/5000000"), switch(2, "0/9000000")];
        let cases: &[(&str, u32, &[Switch], Option<&str>)] = &[
            ("leader on the backups' own timeline", 1, &[], Some("b")),
            (
                "leader on 4: the newest on its path is c (d is on a sibling)",
                4,
                &history_of_4,
                Some("c"),
            ),
            (
                "leader on 2: c, taken on 2 itself",
                2,
                &[switch(1, "0/5000000")],
                Some("c"),
            ),
            (
                "leader on 5 forked from 1 before any backup ended",
                5,
                &[switch(1, "0/1800000")],
                None,
            ),
            (
                "leader on 6 forked from 1 after a only",
                6,
                &[switch(1, "0/3000000")],
                Some("a"),
            ),
            (
                "a backup ending exactly at the switch fits",
                7,
                &[switch(1, "0/2000000")],
                Some("a"),
            ),
        ];
        for (what, tl, history, want) in cases {
            let got = choose(&backups, Timeline(*tl), history).map(|m| m.id.as_str());
            assert_eq!(got, *want, "{what}");
        }
        assert_eq!(choose(&[], Timeline(1), &[]).map(|m| m.id.as_str()), None);
    }
}
