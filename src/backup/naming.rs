//! Names: WAL file names as PostgreSQL writes them, and the repository keys
//! they are stored under. Pure, so that every rule is unit-tested.
//!
//! An archived WAL file is stored as
//! `archive/<timeline>/<wal name>.<sha256 of the content>.zst`. The checksum
//! in the name makes "already archived with the same content" a listing and
//! a string comparison (no download), and makes it impossible for two
//! different contents of one segment to share a key, so nothing archived is
//! ever overwritten.

use crate::model::{Lsn, Timeline};

/// What kind of file PostgreSQL hands to `archive_command`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalKind {
    /// `TTTTTTTTXXXXXXXXYYYYYYYY`
    Segment,
    /// `<segment>.partial`: the last, incomplete segment of the timeline a
    /// promoted server left.
    Partial,
    /// `TTTTTTTT.history`: the timeline history file a promotion creates.
    History,
    /// `<segment>.XXXXXXXX.backup`: the backup history file.
    BackupHistory,
}

/// A validated WAL file name. Validation is strict because the name becomes
/// part of a path: nothing but hex digits and the known suffixes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WalName(String);

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase())
}

impl WalName {
    pub fn parse(name: &str) -> Option<WalName> {
        let ok = match name.len() {
            24 => is_hex(name, 24),
            32 => name.strip_suffix(".partial").is_some_and(|s| is_hex(s, 24)),
            16 => name.strip_suffix(".history").is_some_and(|s| is_hex(s, 8)),
            40 => {
                name.ends_with(".backup")
                    && is_hex(&name[..24], 24)
                    && &name[24..25] == "."
                    && is_hex(&name[25..33], 8)
            }
            _ => false,
        };
        ok.then(|| WalName(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn kind(&self) -> WalKind {
        if self.0.ends_with(".partial") {
            WalKind::Partial
        } else if self.0.ends_with(".history") {
            WalKind::History
        } else if self.0.ends_with(".backup") {
            WalKind::BackupHistory
        } else {
            WalKind::Segment
        }
    }

    /// The timeline: the first eight hex digits of every kind of name.
    pub fn timeline(&self) -> Timeline {
        Timeline(u32::from_str_radix(&self.0[..8], 16).expect("validated hex"))
    }

    /// The segment number (for segments and partial segments).
    pub fn segno(&self, seg_size: u64) -> Option<u64> {
        match self.kind() {
            WalKind::Segment | WalKind::Partial => {
                let hi = u64::from_str_radix(&self.0[8..16], 16).ok()?;
                let lo = u64::from_str_radix(&self.0[16..24], 16).ok()?;
                Some(hi * segments_per_id(seg_size) + lo)
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for WalName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// PostgreSQL's default (and pgha's assumption when a backup does not say).
pub const DEFAULT_SEGMENT_SIZE: u64 = 16 * 1024 * 1024;

fn segments_per_id(seg_size: u64) -> u64 {
    0x1_0000_0000 / seg_size
}

/// The segment that holds `lsn`.
pub fn segno_of(lsn: Lsn, seg_size: u64) -> u64 {
    lsn.0 / seg_size
}

/// The name of segment `segno` on `tl` (PostgreSQL's `XLogFileName`).
pub fn segment_name(tl: Timeline, segno: u64, seg_size: u64) -> WalName {
    let per = segments_per_id(seg_size);
    WalName(format!(
        "{:08X}{:08X}{:08X}",
        tl.0,
        segno / per,
        segno % per
    ))
}

/// The history file name of `tl`.
pub fn history_name(tl: Timeline) -> WalName {
    WalName(format!("{:08X}.history", tl.0))
}

/// The directory of one timeline's archived files.
pub fn archive_dir(tl: Timeline) -> String {
    format!("archive/{:08X}", tl.0)
}

/// The key an archived file is stored under.
pub fn archive_key(name: &WalName, sha256: &str) -> String {
    format!("{}/{}.{sha256}.zst", archive_dir(name.timeline()), name)
}

/// Splits an object name in a timeline directory back into the WAL name
/// and the checksum; `None` for anything else (temporary files, strays).
pub fn parse_archive_object(file: &str) -> Option<(WalName, String)> {
    let rest = file.strip_suffix(".zst")?;
    let (name, sha) = rest.rsplit_once('.')?;
    let sha_ok = sha.len() == 64 && sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !sha_ok {
        return None;
    }
    Some((WalName::parse(name)?, sha.to_string()))
}

/// A backup id: the UTC start time, `YYYYMMDDTHHMMSSZ`, sortable as text.
pub fn backup_id(start: std::time::SystemTime) -> String {
    let secs = start
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let text = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs),
    )
    .to_string();
    // 2026-01-31T02:00:00Z -> 20260131T020000Z
    text.chars().filter(|c| *c != '-' && *c != ':').collect()
}

/// Whether `id` looks like one [`backup_id`] made (it becomes a path).
pub fn is_backup_id(id: &str) -> bool {
    id.len() == 16
        && id.bytes().enumerate().all(|(i, b)| match i {
            8 => b == b'T',
            15 => b == b'Z',
            _ => b.is_ascii_digit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_names_are_validated_strictly() {
        let good = [
            ("000000010000000000000003", WalKind::Segment),
            ("000000020000000000000003.partial", WalKind::Partial),
            ("00000002.history", WalKind::History),
            (
                "000000010000000000000002.00000028.backup",
                WalKind::BackupHistory,
            ),
        ];
        for (name, kind) in good {
            let w = WalName::parse(name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(w.kind(), kind, "{name}");
        }
        for bad in [
            "",
            "00000001000000000000000",
            "00000001000000000000000g",
            "000000010000000000000003x",
            "0000000a0000000000000003",
            "../../../etc/passwd00000",
            "00000001.partial",
            "000000010000000000000003.history",
            "RECOVERYHISTORY",
        ] {
            assert_eq!(WalName::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn segment_numbers_and_names_round_trip() {
        let seg = DEFAULT_SEGMENT_SIZE;
        let w = WalName::parse("0000000200000001000000FF").unwrap();
        assert_eq!(w.timeline(), Timeline(2));
        assert_eq!(w.segno(seg), Some(256 + 255));
        assert_eq!(segment_name(Timeline(2), 511, seg), w);
        assert_eq!(segno_of("1/FF000028".parse().unwrap(), seg), 511);
        // 1 GB segments: four per "xlogid".
        let big = 1024 * 1024 * 1024;
        assert_eq!(
            segment_name(Timeline(1), 5, big).as_str(),
            "000000010000000100000001"
        );
        assert_eq!(WalName::parse("00000003.history").unwrap().segno(seg), None);
    }

    #[test]
    fn archive_keys_carry_the_checksum() {
        let sha = "ab".repeat(32);
        let w = WalName::parse("000000030000000000000010").unwrap();
        let key = archive_key(&w, &sha);
        assert_eq!(
            key,
            format!("archive/00000003/000000030000000000000010.{sha}.zst")
        );
        let file = key.rsplit('/').next().unwrap();
        assert_eq!(parse_archive_object(file), Some((w, sha.clone())));
        let h = history_name(Timeline(3));
        assert_eq!(
            archive_key(&h, &sha),
            format!("archive/00000003/00000003.history.{sha}.zst")
        );
        assert_eq!(
            parse_archive_object(&format!("00000003.history.{sha}.zst")),
            Some((h, sha.clone()))
        );
        for stray in [
            "000000030000000000000010.zst",
            ".000000030000000000000010.123.pgha-tmp",
            &format!("000000030000000000000010.{}.zst", "AB".repeat(32)),
        ] {
            assert_eq!(parse_archive_object(stray), None, "{stray}");
        }
    }

    #[test]
    fn backup_ids_sort_by_time() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_769_824_800);
        let id = backup_id(t);
        assert_eq!(id, "20260131T020000Z");
        assert!(is_backup_id(&id));
        assert!(backup_id(t + std::time::Duration::from_secs(1)) > id);
        assert!(!is_backup_id("../20260131T0200"));
    }
}
