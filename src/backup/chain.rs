//! The WAL chain: which archived segments a restore from a backup needs, on
//! which timeline, and which of them are missing. Pure.
//!
//! Recovery with `recovery_target_timeline = 'latest'` reads segment `n`
//! from the newest timeline of the target's history that had begun by `n`:
//! a timeline created at LSN `L` owns the segments from `L`'s segment on
//! (its copy of that segment holds the switch), its parent keeps the ones
//! before. The `.partial` segment a promotion leaves is never needed.

use std::collections::{BTreeMap, BTreeSet};

use super::naming::{self, WalKind, WalName};
use crate::model::{Lsn, Timeline};

/// One line of a timeline history file: `parent` ended at `switch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Switch {
    pub parent: Timeline,
    pub switch: Lsn,
}

/// Parses a `TTTTTTTT.history` file: `parent<TAB>X/Y<TAB>reason` lines,
/// oldest first; comments and blank lines are skipped.
pub fn parse_history(text: &str) -> Result<Vec<Switch>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let mut parse = || -> Option<Switch> {
            let parent = fields.next()?.parse().ok()?;
            let switch = fields.next()?.parse().ok()?;
            Some(Switch {
                parent: Timeline(parent),
                switch,
            })
        };
        out.push(parse().ok_or_else(|| format!("line {}: {line:?}", i + 1))?);
    }
    Ok(out)
}

/// What is in the archive, by timeline.
#[derive(Clone, Debug, Default)]
pub struct ArchiveIndex {
    /// Segment numbers archived (full segments only) per timeline.
    pub segments: BTreeMap<Timeline, BTreeSet<u64>>,
    /// Timelines that have a history file.
    pub histories: BTreeSet<Timeline>,
}

impl ArchiveIndex {
    pub fn add(&mut self, name: &WalName, seg_size: u64) {
        match name.kind() {
            WalKind::Segment => {
                if let Some(n) = name.segno(seg_size) {
                    self.segments.entry(name.timeline()).or_default().insert(n);
                }
            }
            WalKind::History => {
                self.histories.insert(name.timeline());
            }
            WalKind::Partial | WalKind::BackupHistory => {}
        }
    }

    pub fn timelines(&self) -> BTreeSet<Timeline> {
        self.segments
            .keys()
            .chain(self.histories.iter())
            .copied()
            .collect()
    }
}

/// Where each timeline on the way to `target` begins: `(timeline, first
/// segment)`, oldest first. `history` is `target`'s history file (empty
/// for timeline 1).
pub fn path_to(target: Timeline, history: &[Switch], seg_size: u64) -> Vec<(Timeline, u64)> {
    let mut path = Vec::new();
    let mut begin = 0;
    for s in history {
        path.push((s.parent, begin));
        begin = naming::segno_of(s.switch, seg_size);
    }
    path.push((target, begin));
    path
}

/// The segments recovery reads from `start` (on a timeline of `path`) up
/// to and including segment `last`, and which of them `index` lacks.
pub fn missing(
    path: &[(Timeline, u64)],
    start: Lsn,
    last: u64,
    index: &ArchiveIndex,
    seg_size: u64,
) -> Vec<WalName> {
    let first = naming::segno_of(start, seg_size);
    let mut out = Vec::new();
    for n in first..=last {
        let Some(&(tl, _)) = path.iter().rev().find(|(_, begin)| *begin <= n) else {
            continue;
        };
        let present = index.segments.get(&tl).is_some_and(|s| s.contains(&n));
        if !present {
            out.push(naming::segment_name(tl, n, seg_size));
        }
    }
    out
}

/// The newest segment archived on any timeline of `path` that recovery
/// along it would read: the end of the chain a verify walks to.
pub fn last_segment(path: &[(Timeline, u64)], index: &ArchiveIndex) -> Option<u64> {
    path.iter()
        .enumerate()
        .filter_map(|(i, (tl, begin))| {
            let end = path.get(i + 1).map(|(_, b)| *b);
            index
                .segments
                .get(tl)?
                .iter()
                .rev()
                .copied()
                .find(|n| *n >= *begin && end.is_none_or(|e| *n < e))
        })
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::naming::DEFAULT_SEGMENT_SIZE as SEG;

    fn index(names: &[&str]) -> ArchiveIndex {
        let mut ix = ArchiveIndex::default();
        for n in names {
            ix.add(&WalName::parse(n).unwrap(), SEG);
        }
        ix
    }

    #[test]
    fn history_files_parse() {
        let h = parse_history(
            "1\t0/3000060\tno recovery target specified\n\n2\t0/5000028\tno recovery target specified\n",
        )
        .unwrap();
        assert_eq!(
            h,
            [
                Switch {
                    parent: Timeline(1),
                    switch: "0/3000060".parse().unwrap()
                },
                Switch {
                    parent: Timeline(2),
                    switch: "0/5000028".parse().unwrap()
                }
            ]
        );
        assert!(parse_history("x y z").is_err());
    }

    #[test]
    fn chain_follows_timeline_switches() {
        // TL1 until 0/3000060 (segment 3), TL2 until 0/5000028 (segment 5).
        let history = parse_history("1\t0/3000060\tx\n2\t0/5000028\ty\n").unwrap();
        let path = path_to(Timeline(3), &history, SEG);
        assert_eq!(path, [(Timeline(1), 0), (Timeline(2), 3), (Timeline(3), 5)]);
        let ix = index(&[
            "000000010000000000000001",
            "000000010000000000000002",
            "000000010000000000000003.partial",
            "000000020000000000000003",
            "000000020000000000000004",
            "000000030000000000000005",
            "000000030000000000000006",
            "00000002.history",
            "00000003.history",
        ]);
        assert_eq!(last_segment(&path, &ix), Some(6));
        let start = "0/1000028".parse().unwrap();
        assert!(missing(&path, start, 6, &ix, SEG).is_empty());
        // A TL1 segment 3 (a full copy from the old primary) does not
        // replace TL2's, which recovery reads.
        let mut gap = ix.clone();
        gap.segments.get_mut(&Timeline(2)).unwrap().remove(&3);
        gap.add(&WalName::parse("000000010000000000000003").unwrap(), SEG);
        assert_eq!(
            missing(&path, start, 6, &gap, SEG),
            [WalName::parse("000000020000000000000003").unwrap()]
        );
    }

    #[test]
    fn a_missing_segment_in_the_middle_is_found() {
        let path = path_to(Timeline(1), &[], SEG);
        let ix = index(&["000000010000000000000002", "000000010000000000000004"]);
        assert_eq!(last_segment(&path, &ix), Some(4));
        assert_eq!(
            missing(&path, "0/2000028".parse().unwrap(), 4, &ix, SEG),
            [WalName::parse("000000010000000000000003").unwrap()]
        );
    }
}
