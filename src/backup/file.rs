//! One WAL file in and out of the repository: what `archive_command` and
//! `restore_command` do, kept apart from their command-line wrappers so it
//! is tested directly.

use std::io::{Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::BackupError;
use super::naming::{self, WalName};
use super::repo::{Created, Repository};

/// What [`push`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Stored under this key.
    Stored { key: String, bytes: u64 },
    /// Already archived with the same content: nothing to do.
    AlreadyArchived { key: String },
    /// Pushed by a standby (`archive_mode = always`) for a name already
    /// archived: the archived copy stays, whatever the standby's holds
    /// (see [`Origin::Standby`]), so the standby's file is not even read.
    KeptArchived { key: String },
}

/// Who runs `archive_command`, which decides what a conflict means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The primary: its WAL is the timeline's; a different archived copy is
    /// an error that must be seen (two clusters sharing a repository, a
    /// split brain), and PostgreSQL keeps retrying.
    Primary,
    /// A standby with `archive_mode = always`. It archives only to fill
    /// holes the primary may leave (a segment completed but not archived
    /// before it died). A standby legitimately holds a different copy of a
    /// name at a timeline switch: its walreceiver closes the old
    /// timeline's segment at the switch point and marks it for archiving
    /// under the full name, while the old primary may have archived that
    /// segment complete. Recovery on the new timeline never reads that copy
    /// (the new timeline owns the switch segment), so keeping the archived
    /// one loses nothing, and refusing would stall the standby's archiver
    /// on that file forever (it retries the oldest file first), filling its
    /// pg_wal.
    Standby,
}

impl Origin {
    /// From the WAL file's path as `archive_command` gets it (`%p`,
    /// relative to the data directory, which is the working directory):
    /// a standby has `standby.signal` in its data directory.
    pub fn of(wal_path: &Path) -> Origin {
        let data_dir = wal_path
            .parent()
            .and_then(Path::parent)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if data_dir.join("standby.signal").exists() {
            Origin::Standby
        } else {
            Origin::Primary
        }
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The archived copies of `name` (normally zero or one): their checksums.
pub fn archived_copies(repo: &dyn Repository, name: &WalName) -> Result<Vec<String>, BackupError> {
    let dir = naming::archive_dir(name.timeline());
    Ok(repo
        .list(&dir)?
        .iter()
        .filter_map(|f| naming::parse_archive_object(f))
        .filter(|(n, _)| n == name)
        .map(|(_, sha)| sha)
        .collect())
}

/// Archives the WAL file at `path`. Identical content already archived is a
/// success (PostgreSQL retries an archive_command whose success it did not
/// see); different content under the same name is refused, since one of the
/// two copies would otherwise silently shadow the other at restore.
pub fn push(
    repo: &dyn Repository,
    path: &Path,
    level: i32,
    origin: Origin,
) -> Result<Pushed, BackupError> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let name = WalName::parse(file_name).ok_or_else(|| BackupError::NotWal {
        name: path.display().to_string(),
    })?;
    // A standby only fills holes: when the name is archived, the archived
    // copy stays either way, so its file need not be read or hashed (this
    // keeps `always` cheap: one listing per segment on every replica).
    if origin == Origin::Standby
        && let Some(sha) = archived_copies(repo, &name)?.first()
    {
        return Ok(Pushed::KeptArchived {
            key: naming::archive_key(&name, sha),
        });
    }
    let data = std::fs::read(path).map_err(|source| BackupError::Local {
        action: "read",
        path: path.to_path_buf(),
        source,
    })?;
    let sha = sha256_hex(&data);
    let key = naming::archive_key(&name, &sha);
    let copies = archived_copies(repo, &name)?;
    if copies.contains(&sha) {
        return Ok(Pushed::AlreadyArchived { key });
    }
    if let Some(other) = copies.first() {
        return Err(BackupError::Conflict {
            name: name.to_string(),
            archived: naming::archive_key(&name, other),
            local_sha256: sha,
        });
    }
    let compressed = zstd::bulk::compress(&data, level).map_err(|source| BackupError::Local {
        action: "compress",
        path: path.to_path_buf(),
        source,
    })?;
    match repo.create(&key, &mut &compressed[..])? {
        Created::New { bytes } => Ok(Pushed::Stored { key, bytes }),
        // A concurrent push of the same content won the race.
        Created::Existed => Ok(Pushed::AlreadyArchived { key }),
    }
}

/// Decompresses the object `key` and checks it against the checksum in its
/// name.
pub fn fetch_verified(repo: &dyn Repository, key: &str, sha: &str) -> Result<Vec<u8>, BackupError> {
    let mut data = Vec::new();
    zstd::stream::read::Decoder::new(repo.open(key)?)
        .and_then(|mut d| d.read_to_end(&mut data))
        .map_err(|e| BackupError::Corrupt {
            key: key.to_string(),
            detail: format!("cannot decompress: {e}"),
        })?;
    let actual = sha256_hex(&data);
    if actual != sha {
        return Err(BackupError::Corrupt {
            key: key.to_string(),
            detail: format!("content has sha256 {actual}"),
        });
    }
    Ok(data)
}

/// Restores `name` to `dest` (what `restore_command` does). A missing file
/// is [`BackupError::NotArchived`], which PostgreSQL takes as "the end of
/// the archive"; a corrupt one is [`BackupError::Corrupt`], which must stop
/// recovery instead (see `cli::wal`).
pub fn get(repo: &dyn Repository, name: &str, dest: &Path) -> Result<String, BackupError> {
    let wal = WalName::parse(name).ok_or_else(|| BackupError::NotWal { name: name.into() })?;
    let copies = archived_copies(repo, &wal)?;
    let sha = match copies.as_slice() {
        [] => {
            return Err(BackupError::NotArchived {
                name: name.into(),
                repo: repo.location(),
            });
        }
        [one] => one.clone(),
        _ => {
            return Err(BackupError::Ambiguous {
                name: name.into(),
                keys: copies
                    .iter()
                    .map(|s| naming::archive_key(&wal, s))
                    .collect(),
            });
        }
    };
    let key = naming::archive_key(&wal, &sha);
    let data = fetch_verified(repo, &key, &sha)?;
    // Written beside the destination and renamed, so that PostgreSQL never
    // reads a half-written segment.
    let tmp = dest.with_extension("pgha-tmp");
    let local = |action: &'static str| {
        let path = dest.to_path_buf();
        move |source| BackupError::Local {
            action,
            path,
            source,
        }
    };
    let mut f = std::fs::File::create(&tmp).map_err(local("create"))?;
    f.write_all(&data).map_err(local("write"))?;
    f.sync_all().map_err(local("sync"))?;
    drop(f);
    std::fs::rename(&tmp, dest).map_err(local("rename into place"))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::repo::DirRepository;

    fn setup() -> (tempfile::TempDir, DirRepository, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let repo = DirRepository::new(dir.path().join("repo"));
        std::fs::create_dir(repo.root()).unwrap();
        let wal = dir.path().join("pg_wal");
        std::fs::create_dir(&wal).unwrap();
        (dir, repo, wal)
    }

    #[test]
    fn push_then_get_round_trips_and_repush_is_a_no_op() {
        let (_d, repo, wal) = setup();
        let seg = wal.join("000000010000000000000002");
        let content: Vec<u8> = (0..100_000u32).flat_map(|i| i.to_le_bytes()).collect();
        std::fs::write(&seg, &content).unwrap();
        let key = match push(&repo, &seg, 3, Origin::Primary).unwrap() {
            Pushed::Stored { key, bytes } => {
                assert!(bytes < content.len() as u64, "compressed");
                key
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(
            push(&repo, &seg, 3, Origin::Primary).unwrap(),
            Pushed::AlreadyArchived { key: key.clone() }
        );
        let out = wal.join("RECOVERYXLOG");
        assert_eq!(get(&repo, "000000010000000000000002", &out).unwrap(), key);
        assert_eq!(std::fs::read(&out).unwrap(), content);
    }

    #[test]
    fn different_content_under_the_same_name_is_refused() {
        let (_d, repo, wal) = setup();
        let seg = wal.join("000000010000000000000002");
        std::fs::write(&seg, b"one").unwrap();
        push(&repo, &seg, 3, Origin::Primary).unwrap();
        std::fs::write(&seg, b"two").unwrap();
        let err = push(&repo, &seg, 3, Origin::Primary).unwrap_err();
        assert!(matches!(err, BackupError::Conflict { .. }), "{err}");
        assert!(
            err.to_string().contains("000000010000000000000002"),
            "{err}"
        );
        // The archived copy is untouched.
        let out = wal.join("out");
        get(&repo, "000000010000000000000002", &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"one");
    }

    #[test]
    fn a_standby_keeps_the_archived_copy_and_an_identical_one_is_a_no_op() {
        let (d, repo, wal) = setup();
        let seg = wal.join("000000010000000000000002");
        std::fs::write(&seg, b"the old primary's complete segment").unwrap();
        push(&repo, &seg, 3, Origin::Primary).unwrap();
        // The standby's copy, closed at the timeline switch.
        std::fs::write(&seg, b"the old primary's").unwrap();
        assert_eq!(Origin::of(&seg), Origin::Primary);
        std::fs::write(d.path().join("standby.signal"), b"").unwrap();
        assert_eq!(Origin::of(&seg), Origin::Standby);
        let pushed = push(&repo, &seg, 3, Origin::of(&seg)).unwrap();
        assert!(matches!(pushed, Pushed::KeptArchived { .. }), "{pushed:?}");
        let out = wal.join("out");
        get(&repo, "000000010000000000000002", &out).unwrap();
        assert_eq!(
            std::fs::read(&out).unwrap(),
            b"the old primary's complete segment"
        );
        assert_eq!(repo.list("archive/00000001").unwrap().len(), 1);
        // A segment the primary never archived: the standby fills the hole.
        let next = wal.join("000000010000000000000003");
        std::fs::write(&next, b"completed, never archived by the primary").unwrap();
        assert!(matches!(
            push(&repo, &next, 3, Origin::Standby).unwrap(),
            Pushed::Stored { .. }
        ));
        let again = push(&repo, &next, 3, Origin::Standby).unwrap();
        assert!(matches!(again, Pushed::KeptArchived { .. }), "{again:?}");
        // The primary's later push of the same content is a no-op.
        assert!(matches!(
            push(&repo, &next, 3, Origin::Primary).unwrap(),
            Pushed::AlreadyArchived { .. }
        ));
        // %p as PostgreSQL passes it: relative to the data directory.
        assert_eq!(
            Origin::of(Path::new("pg_wal/000000010000000000000003")),
            Origin::of(Path::new("./pg_wal/000000010000000000000003"))
        );
    }

    #[test]
    fn missing_corrupt_and_truncated_objects_are_named() {
        let (_d, repo, wal) = setup();
        let out = wal.join("out");
        let err = get(&repo, "000000010000000000000009", &out).unwrap_err();
        assert!(matches!(err, BackupError::NotArchived { .. }), "{err}");

        let seg = wal.join("000000010000000000000003");
        std::fs::write(&seg, vec![7u8; 1 << 16]).unwrap();
        let Pushed::Stored { key, .. } = push(&repo, &seg, 3, Origin::Primary).unwrap() else {
            panic!()
        };
        let path = repo.root().join(&key);
        let good = std::fs::read(&path).unwrap();
        // Truncated.
        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        let err = get(&repo, "000000010000000000000003", &out).unwrap_err();
        assert!(matches!(err, BackupError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(&key), "{err}");
        // Valid zstd, wrong content.
        std::fs::write(&path, zstd::bulk::compress(b"other", 3).unwrap()).unwrap();
        let err = get(&repo, "000000010000000000000003", &out).unwrap_err();
        assert!(matches!(err, BackupError::Corrupt { .. }), "{err}");
        assert!(!out.exists(), "nothing written on error");
    }

    #[test]
    fn history_files_go_to_their_timeline() {
        let (_d, repo, wal) = setup();
        let h = wal.join("00000002.history");
        std::fs::write(&h, b"1\t0/3000060\tno recovery target specified\n").unwrap();
        let Pushed::Stored { key, .. } = push(&repo, &h, 3, Origin::Primary).unwrap() else {
            panic!()
        };
        assert!(
            key.starts_with("archive/00000002/00000002.history."),
            "{key}"
        );
        let err = push(&repo, &wal.join("not-wal"), 3, Origin::Primary).unwrap_err();
        assert!(matches!(err, BackupError::NotWal { .. }), "{err}");
    }
}
