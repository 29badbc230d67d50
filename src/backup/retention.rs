//! Retention: keep the newest `keep` full backups and the archived WAL they
//! need; remove the rest (`pgha backup expire`, and after every backup).
//!
//! The selection ([`select`]) is pure. A WAL object is kept when any kept
//! backup may read it: recovery from a backup reads segments from the one
//! holding its start LSN upward, on the backup's timeline and on every
//! timeline descending from it (recovery follows
//! `recovery_target_timeline = latest`). So an object of segment `n` on
//! timeline `t` is kept when some kept backup `b` has `n >= segno(b.start)`
//! and `t` is `b`'s timeline or lists it as an ancestor in its history
//! file. When `t`'s ancestry is unknown (its history file is not archived)
//! it is treated as descending from everything: retention never guesses
//! in the direction of deleting. History files are always kept (a few
//! bytes each, and recovery reads them to find its way across timelines).

use std::collections::BTreeMap;

use serde::Serialize;

use super::BackupError;
use super::base::{self, Manifest};
use super::chain::Switch;
use super::naming::{self, WalKind, WalName};
use super::repo::Repository;
use crate::model::Timeline;

/// One archived object, as the selection sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Archived {
    pub key: String,
    pub name: WalName,
}

/// What retention removes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Backups kept, oldest first.
    pub kept: Vec<String>,
    /// Backups removed, oldest first.
    pub expired: Vec<String>,
    /// Archived objects removed.
    pub wal: Vec<String>,
}

/// The segment number an archived name refers to: segments, partial
/// segments and backup history files (named after the segment of the
/// backup's start); `None` for timeline history files.
fn segno_of_name(name: &WalName, seg_size: u64) -> Option<u64> {
    match name.kind() {
        WalKind::History => None,
        WalKind::Segment | WalKind::Partial => name.segno(seg_size),
        WalKind::BackupHistory => WalName::parse(&name.as_str()[..24])?.segno(seg_size),
    }
}

/// Whether `tl` is `from` or descends from it; `None` when `tl`'s history
/// file is missing, so its ancestry is unknown.
fn descends(
    tl: Timeline,
    from: Timeline,
    histories: &BTreeMap<Timeline, Vec<Switch>>,
) -> Option<bool> {
    if tl == from {
        return Some(true);
    }
    if tl.0 == 1 {
        return Some(false);
    }
    let history = histories.get(&tl)?;
    Some(history.iter().any(|s| s.parent == from))
}

/// Chooses what to remove. `backups` are the complete backups, oldest
/// first (as [`base::list`] returns them); with none, nothing is removed,
/// since an archive without a backup may be waiting for its first one.
pub fn select(
    backups: &[Manifest],
    keep: usize,
    archived: &[Archived],
    histories: &BTreeMap<Timeline, Vec<Switch>>,
) -> Selection {
    let keep = keep.max(1);
    if backups.is_empty() {
        return Selection::default();
    }
    let split = backups.len().saturating_sub(keep);
    let (expired, kept) = backups.split_at(split);
    let needed = |a: &Archived| -> bool {
        kept.iter().any(|b| {
            let Some(n) = segno_of_name(&a.name, b.wal_segment_size) else {
                return true;
            };
            let start = naming::segno_of(b.start_lsn, b.wal_segment_size);
            n >= start
                && descends(a.name.timeline(), Timeline(b.timeline), histories) != Some(false)
        })
    };
    Selection {
        kept: kept.iter().map(|b| b.id.clone()).collect(),
        expired: expired.iter().map(|b| b.id.clone()).collect(),
        wal: archived
            .iter()
            .filter(|a| !needed(a))
            .map(|a| a.key.clone())
            .collect(),
    }
}

/// What [`expire`] did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExpireReport {
    pub kept: Vec<String>,
    pub expired_backups: Vec<String>,
    pub expired_wal_objects: usize,
}

/// Every archived object in the repository.
fn archived_objects(repo: &dyn Repository) -> Result<Vec<Archived>, BackupError> {
    let mut out = Vec::new();
    for dir in repo.list("archive")? {
        for f in repo.list(&format!("archive/{dir}"))? {
            if let Some((name, sha)) = naming::parse_archive_object(&f) {
                let key = naming::archive_key(&name, &sha);
                // An object in the wrong timeline directory is a stray:
                // not ours to delete.
                if key == format!("archive/{dir}/{f}") {
                    out.push(Archived { key, name });
                }
            }
        }
    }
    Ok(out)
}

/// Applies retention to `repo`. A backup is removed manifest first, so that
/// it stops being listed (and chosen by a restore) before any of its data
/// goes; then the WAL no kept backup needs.
pub fn expire(repo: &dyn Repository, keep: usize) -> Result<ExpireReport, BackupError> {
    let backups = base::list(repo)?;
    let seg = backups
        .first()
        .map_or(naming::DEFAULT_SEGMENT_SIZE, |b| b.wal_segment_size);
    let (_, histories) = base::archive_index(repo, seg)?;
    let archived = archived_objects(repo)?;
    let sel = select(&backups, keep, &archived, &histories);
    for id in &sel.expired {
        let m = backups
            .iter()
            .find(|b| &b.id == id)
            .expect("selected from the list");
        let dir = format!("backup/{id}");
        // A manifest is only trusted to name its own backup's objects:
        // one that names anything else is not deleted from.
        if let Some(key) = m
            .files
            .iter()
            .flat_map(|f| std::iter::once(f.key.as_str()).chain(f.keys()))
            .find(|k| k.strip_prefix(&dir).is_none_or(|r| !r.starts_with('/')))
        {
            return Err(BackupError::Corrupt {
                key: base::manifest_key(id),
                detail: format!("names {key:?}, outside {dir}/; nothing of it was removed"),
            });
        }
        repo.delete(&base::manifest_key(id))?;
        for key in m.files.iter().flat_map(|f| f.keys()) {
            repo.delete(key)?;
        }
        for rest in repo.list(&dir)? {
            repo.delete(&format!("{dir}/{rest}"))?;
        }
        repo.remove_empty_dir(&dir)?;
    }
    for key in &sel.wal {
        repo.delete(key)?;
    }
    Ok(ExpireReport {
        kept: sel.kept,
        expired_backups: sel.expired,
        expired_wal_objects: sel.wal.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::chain::parse_history;
    use crate::backup::naming::DEFAULT_SEGMENT_SIZE as SEG;

    fn backup(id: &str, tl: u32, start: &str) -> Manifest {
        Manifest {
            id: id.into(),
            label: format!("pgha {id}"),
            source: "node2".into(),
            timeline: tl,
            start_lsn: start.parse().unwrap(),
            stop_lsn: start.parse().unwrap(),
            start_time: "2026-01-31T02:00:00Z".into(),
            stop_time: "2026-01-31T02:00:09Z".into(),
            wal_segment_size: SEG,
            server_manifest: "base.tar:backup_manifest".into(),
            files: Vec::new(),
        }
    }

    fn objects(names: &[&str]) -> Vec<Archived> {
        names
            .iter()
            .map(|n| {
                let name = WalName::parse(n).unwrap();
                Archived {
                    key: naming::archive_key(&name, &"0".repeat(64)),
                    name,
                }
            })
            .collect()
    }

    fn removed(sel: &Selection) -> Vec<String> {
        sel.wal
            .iter()
            .map(|k| {
                k.rsplit('/')
                    .next()
                    .unwrap()
                    .split('.')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    /// Histories: TL2 branched from TL1 in segment 5, TL3 from TL2 in
    /// segment 8, TL4 from TL2 in segment 9 (a sibling of TL3).
    fn histories() -> BTreeMap<Timeline, Vec<Switch>> {
        let mut h = BTreeMap::new();
        h.insert(Timeline(2), parse_history("1\t0/5000060\tx\n").unwrap());
        h.insert(
            Timeline(3),
            parse_history("1\t0/5000060\tx\n2\t0/8000028\ty\n").unwrap(),
        );
        h.insert(
            Timeline(4),
            parse_history("1\t0/5000060\tx\n2\t0/9000028\ty\n").unwrap(),
        );
        h
    }

    #[test]
    fn selection_table() {
        let all = objects(&[
            "000000010000000000000002",
            "000000010000000000000003",
            "000000010000000000000003.00000028.backup",
            "000000010000000000000004",
            "000000010000000000000005.partial",
            "000000010000000000000006", // the old primary's, after the switch
            "00000002.history",
            "000000020000000000000005",
            "000000020000000000000006",
            "000000020000000000000007",
            "000000020000000000000008.partial",
            "00000003.history",
            "000000030000000000000008",
            "000000030000000000000009",
            "00000004.history",
            "000000040000000000000009",
            "00000005.history",
            "00000006000000000000000A", // no history file: ancestry unknown
        ]);
        struct Case {
            what: &'static str,
            backups: Vec<Manifest>,
            keep: usize,
            expired: &'static [&'static str],
            wal: &'static [&'static str],
        }
        let b1 = backup("20260101T000000Z", 1, "0/3000028");
        let b2 = backup("20260102T000000Z", 2, "0/6000028");
        let b3 = backup("20260103T000000Z", 3, "0/8800000");
        let cases = [
            Case {
                what: "no backup: nothing goes",
                backups: vec![],
                keep: 1,
                expired: &[],
                wal: &[],
            },
            Case {
                what: "keep all: only WAL older than the oldest backup",
                backups: vec![b1.clone(), b2.clone(), b3.clone()],
                keep: 3,
                expired: &[],
                wal: &["000000010000000000000002"],
            },
            Case {
                what: "keep 2: TL1 goes entirely (TL2 is not its descendant's copy), TL2 from segment 6 stays",
                backups: vec![b1.clone(), b2.clone(), b3.clone()],
                keep: 2,
                expired: &["20260101T000000Z"],
                wal: &[
                    "000000010000000000000002",
                    "000000010000000000000003",
                    "000000010000000000000003",
                    "000000010000000000000004",
                    "000000010000000000000005",
                    "000000010000000000000006",
                    "000000020000000000000005",
                ],
            },
            Case {
                what: "keep 1 on TL3: the sibling TL4 goes, TL2 before the start goes, unknown TL6 stays",
                backups: vec![b1.clone(), b2.clone(), b3.clone()],
                keep: 1,
                expired: &["20260101T000000Z", "20260102T000000Z"],
                wal: &[
                    "000000010000000000000002",
                    "000000010000000000000003",
                    "000000010000000000000003",
                    "000000010000000000000004",
                    "000000010000000000000005",
                    "000000010000000000000006",
                    "000000020000000000000005",
                    "000000020000000000000006",
                    "000000020000000000000007",
                    "000000020000000000000008",
                    "000000040000000000000009",
                ],
            },
            Case {
                what: "keep 0 is read as 1: the last backup is never removed",
                backups: vec![b1.clone()],
                keep: 0,
                expired: &[],
                wal: &["000000010000000000000002"],
            },
        ];
        for c in cases {
            let sel = select(&c.backups, c.keep, &all, &histories());
            assert_eq!(sel.expired, c.expired, "{}", c.what);
            assert_eq!(removed(&sel), c.wal, "{}", c.what);
            for h in ["00000002.history", "00000003.history", "00000005.history"] {
                assert!(
                    !sel.wal.iter().any(|k| k.contains(h)),
                    "{}: history file removed",
                    c.what
                );
            }
        }
    }

    /// The safety rule on a sweep: whatever is removed, for every kept
    /// backup, every segment recovery would read from its start to the end
    /// of every descending timeline is still there.
    #[test]
    fn never_removes_what_a_kept_backup_reads() {
        use crate::backup::chain::{ArchiveIndex, missing, path_to};
        let all = objects(&[
            "000000010000000000000001",
            "000000010000000000000002",
            "000000010000000000000003",
            "000000010000000000000004",
            "000000010000000000000005.partial",
            "00000002.history",
            "000000020000000000000005",
            "000000020000000000000006",
            "000000020000000000000007",
            "000000020000000000000008.partial",
            "00000003.history",
            "000000030000000000000008",
            "000000030000000000000009",
            "00000004.history",
            "000000040000000000000009",
            "00000004000000000000000A",
        ]);
        let h = histories();
        let starts = [
            (1, "0/1000028"),
            (1, "0/4000028"),
            (2, "0/5800000"),
            (2, "0/7000028"),
            (3, "0/8800000"),
            (4, "0/9000100"),
        ];
        for first in 0..starts.len() {
            for count in 1..=starts.len() - first {
                let backups: Vec<Manifest> = starts[first..first + count]
                    .iter()
                    .enumerate()
                    .map(|(i, (tl, lsn))| backup(&format!("2026010{}T000000Z", i + 1), *tl, lsn))
                    .collect();
                for keep in 1..=count {
                    let sel = select(&backups, keep, &all, &h);
                    let mut ix = ArchiveIndex::default();
                    for a in all.iter().filter(|a| !sel.wal.contains(&a.key)) {
                        ix.add(&a.name, SEG);
                    }
                    for b in &backups[count - keep..] {
                        for tl in 1..=4u32 {
                            if descends(Timeline(tl), Timeline(b.timeline), &h) != Some(true) {
                                continue;
                            }
                            let empty = Vec::new();
                            let path =
                                path_to(Timeline(tl), h.get(&Timeline(tl)).unwrap_or(&empty), SEG);
                            let mut all_ix = ArchiveIndex::default();
                            for a in &all {
                                all_ix.add(&a.name, SEG);
                            }
                            let last = crate::backup::chain::last_segment(&path, &all_ix);
                            let Some(last) = last else { continue };
                            let full = missing(&path, b.start_lsn, last, &all_ix, SEG);
                            let now = missing(&path, b.start_lsn, last, &ix, SEG);
                            assert_eq!(
                                now, full,
                                "backup {} on TL{} keep {keep}: TL{tl}",
                                b.id, b.timeline
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_manifest_naming_objects_outside_its_backup_is_not_acted_on() {
        use crate::backup::base::ManifestFile;
        use crate::backup::repo::{DirRepository, Repository};
        let dir = tempfile::tempdir().unwrap();
        let repo = DirRepository::new(dir.path());
        let store = |key: &str, data: &[u8]| {
            repo.create(key, &mut &data[..]).unwrap();
        };
        let other = "archive/00000001/not-a-wal-file";
        store(other, b"not the backup's");
        let mut evil = backup("20260101T000000Z", 1, "0/1000028");
        let file = ManifestFile {
            name: "base.tar".into(),
            key: other.into(),
            size: 1,
            sha256: String::new(),
            stored_size: 1,
            stored_sha256: None,
            pieces: Vec::new(),
            server_compressed: false,
        };
        evil.files = vec![file.clone()];
        let new = backup("20260102T000000Z", 1, "0/4000028");
        for m in [&evil, &new] {
            store(&base::manifest_key(&m.id), &serde_json::to_vec(m).unwrap());
        }
        let err = expire(&repo, 1).unwrap_err().to_string();
        assert!(err.contains("outside backup/20260101T000000Z/"), "{err}");
        assert_eq!(repo.read(other).unwrap(), b"not the backup's");
        assert_eq!(base::list(&repo).unwrap().len(), 2, "nothing was removed");

        // The same with the outside object as a later piece of a file
        // whose first piece is the backup's own.
        let inside = "backup/20260101T000000Z/base.tar.zst";
        store(inside, b"piece");
        let piece = |key: &str| base::Piece {
            key: key.into(),
            stored_size: 1,
            stored_sha256: String::new(),
        };
        evil.files = vec![ManifestFile {
            key: inside.into(),
            pieces: vec![piece(inside), piece(other)],
            ..file
        }];
        repo.delete(&base::manifest_key(&evil.id)).unwrap();
        store(
            &base::manifest_key(&evil.id),
            &serde_json::to_vec(&evil).unwrap(),
        );
        let err = expire(&repo, 1).unwrap_err().to_string();
        assert!(err.contains(&format!("names {other:?}")), "{err}");
        assert_eq!(repo.read(other).unwrap(), b"not the backup's");
        assert_eq!(repo.read(inside).unwrap(), b"piece");
        assert_eq!(base::list(&repo).unwrap().len(), 2, "nothing was removed");
    }
}
