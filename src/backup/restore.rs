//! Point-in-time restore: pick the backup, unpack and check it, and write
//! the recovery settings so that a plain `pg_ctl start` replays archived
//! WAL to the target and stops there (promoted or paused).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::BackupError;
use super::base::{self, Manifest, ManifestFile};
use super::repo::Repository;
use crate::model::Lsn;
use crate::postgres::conf::{Archiving, quote_conf};

/// How far to replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Everything archived, on the newest timeline.
    Latest,
    Time(SystemTime),
    Lsn(Lsn),
}

/// Parses `latest`, an LSN (`X/Y`) or an RFC 3339 time (`Z` or `±HH:MM`
/// offset; a space may replace the `T`).
pub fn parse_target(text: &str) -> Result<Target, String> {
    let t = text.trim();
    if t == "latest" {
        return Ok(Target::Latest);
    }
    if t.contains('/') {
        return t.parse().map(Target::Lsn).map_err(|e| e.to_string());
    }
    parse_time(t).map(Target::Time).ok_or_else(|| {
        format!("{text:?} is not `latest`, an LSN (0/3000060) or a time (2026-01-31T02:00:00Z)")
    })
}

fn parse_time(t: &str) -> Option<SystemTime> {
    let t = t.replacen(' ', "T", 1);
    if t.len() < 19 || !t.is_char_boundary(10) {
        return None;
    }
    if let Ok(s) = humantime::parse_rfc3339_weak(t.trim_end_matches('Z'))
        && (t.ends_with('Z') || !t[10..].contains(['+', '-']))
    {
        return Some(s);
    }
    // An explicit offset: split it off and shift.
    let pos = t[10..].rfind(['+', '-'])? + 10;
    let (base, off) = t.split_at(pos);
    let sign: i64 = if off.starts_with('-') { -1 } else { 1 };
    let (h, m) = off[1..].split_once(':').unwrap_or((&off[1..], "0"));
    let secs = sign * (h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60);
    let local = humantime::parse_rfc3339_weak(base).ok()?;
    if secs >= 0 {
        local.checked_sub(std::time::Duration::from_secs(secs as u64))
    } else {
        local.checked_add(std::time::Duration::from_secs((-secs) as u64))
    }
}

/// The backup to restore for `target`: the newest that had finished by it.
pub fn choose<'a>(backups: &'a [Manifest], target: &Target) -> Result<&'a Manifest, BackupError> {
    let usable = |m: &&Manifest| match target {
        Target::Latest => true,
        Target::Time(t) => m.stop().is_some_and(|s| s <= *t),
        Target::Lsn(l) => m.stop_lsn <= *l,
    };
    if let Some(m) = backups.iter().rev().find(usable) {
        return Ok(m);
    }
    Err(BackupError::Restore(match (backups.first(), target) {
        (None, _) => "the repository holds no complete backup".into(),
        (Some(oldest), Target::Time(t)) => format!(
            "target {} is before the oldest backup {} (consistent from {})",
            humantime::format_rfc3339_seconds(*t),
            oldest.id,
            oldest.stop_time
        ),
        (Some(oldest), _) => format!(
            "target is before the oldest backup {} (consistent from {})",
            oldest.id, oldest.stop_lsn
        ),
    }))
}

/// The recovery settings appended to `postgresql.auto.conf` (pure).
pub fn recovery_settings(
    target: &Target,
    pause: bool,
    archiving: &Archiving,
    port: Option<u16>,
    socket_dir: &str,
) -> String {
    let mut out = String::from("\n# Written by pgha restore.\n");
    let mut set = |k: &str, v: &str| out.push_str(&format!("{k} = {}\n", quote_conf(v)));
    set("restore_command", &archiving.restore_command);
    // The restored server must not archive into the cluster's repository
    // or stream from its leader: it is a copy, not a member.
    set("archive_mode", "off");
    set("primary_conninfo", "");
    set("primary_slot_name", "");
    set("synchronous_standby_names", "");
    set("unix_socket_directories", socket_dir);
    if let Some(p) = port {
        set("port", &p.to_string());
    }
    set("recovery_target_timeline", "latest");
    match target {
        Target::Latest => {}
        Target::Time(t) => {
            let text = humantime::format_rfc3339_micros(*t).to_string();
            // PostgreSQL reads `2026-01-31 02:00:00.123456+00`.
            let text = text.replacen('T', " ", 1).replace('Z', "+00");
            set("recovery_target_time", &text);
        }
        Target::Lsn(l) => set("recovery_target_lsn", &l.to_string()),
    }
    if *target != Target::Latest {
        set(
            "recovery_target_action",
            if pause { "pause" } else { "promote" },
        );
    }
    out
}

/// Unpacks `m` into `dir` (which must be empty or absent), checking the
/// stored checksum while unpacking, syncs it, and checks the files against
/// the server's backup manifest with `pg_verifybackup`. `progress` is
/// called with the uncompressed bytes unpacked so far, of the sum of the
/// manifest's file sizes.
pub fn unpack(
    repo: &dyn Repository,
    m: &Manifest,
    dir: &Path,
    bin_dir: &Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(), BackupError> {
    let local = |action: &'static str, path: PathBuf| {
        move |source| BackupError::Local {
            action,
            path,
            source,
        }
    };
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(BackupError::Restore(format!(
                    "{} is not empty; restore needs an empty or new directory",
                    dir.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(local("create", dir.to_path_buf()))?;
        }
        Err(e) => return Err(local("read", dir.to_path_buf())(e)),
    }
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(local("set the mode of", dir.to_path_buf()))?;
    let dir_handle = std::fs::File::open(dir).map_err(local("open", dir.to_path_buf()))?;
    with_writeback(&dir_handle, || {
        // `progress` gets the bytes of the whole backup, not of one file.
        let mut before = 0u64;
        m.files.iter().try_for_each(|f| {
            // The size of a tar the server compressed leaves its headers
            // out: the total is reached when the file is done, not before.
            let within = f.size.saturating_sub(1);
            let file_progress = |n: u64| progress(before + n.min(within));
            if f.name.ends_with(".tar") {
                unpack_file(repo, f, dir, &file_progress)?;
            } else {
                write_file(repo, f, dir, &file_progress)?;
            }
            before += f.size;
            progress(before);
            Ok::<(), BackupError>(())
        })
    })?;
    // On disk before anything says the restore is done: a restored
    // directory whose files a power loss can empty would start, replay
    // from the backup's start and miss whatever no WAL record rewrites.
    // One syncfs instead of an fsync per file: the directory is new, and
    // nothing else of interest is dirty on its file system.
    // pg_verifybackup runs meanwhile: it reads the files (from the page
    // cache, whose content the sync does not change) while the disk
    // writes them, and the restore is done only once both succeeded.
    let verify = std::process::Command::new(bin_dir.join("pg_verifybackup"))
        .arg("-n")
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(local("run", bin_dir.join("pg_verifybackup")))?;
    let synced = nix::unistd::syncfs(&dir_handle);
    let out = verify
        .wait_with_output()
        .map_err(local("wait for", bin_dir.join("pg_verifybackup")))?;
    synced
        .map_err(std::io::Error::from)
        .map_err(local("sync the file system of", dir.to_path_buf()))?;
    if !out.status.success() {
        return Err(BackupError::Tool {
            tool: "pg_verifybackup".into(),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    // A backup of a replica carries its standby.signal; the restored
    // server must run recovery to the target and stop, not follow anyone.
    let _ = std::fs::remove_file(dir.join("standby.signal"));
    Ok(())
}

/// Runs `work` while a second thread keeps the file system of `dir`
/// writing back. The kernel starts writing on its own only once a tenth of
/// memory is dirty, so the final sync of a restore would otherwise write
/// all of it after the unpacking, at the disk's speed, instead of while
/// the next files are unpacked.
fn with_writeback<T>(dir: &std::fs::File, work: impl FnOnce() -> T) -> T {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                // Errors show in the final sync, which is checked.
                let _ = nix::unistd::syncfs(dir);
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        let result = work();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        result
    })
}

/// Unpacks one stored tar into `dir`: reading, checking and decompressing
/// on one thread, file creation and writes on this one, so that on two
/// cores the two halves overlap instead of adding up.
fn unpack_file(
    repo: &dyn Repository,
    f: &ManifestFile,
    dir: &Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(), BackupError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
    let (read, unpacked) = std::thread::scope(|scope| {
        let reader = scope.spawn(move || {
            let mut total = 0u64;
            base::read_checked(repo, f, |chunk| {
                total += chunk.len() as u64;
                progress(total);
                // The unpacking side hung up: it failed, and says why.
                tx.send(chunk.to_vec())
                    .map_err(|_| BackupError::Restore("unpacking stopped".into()))
            })
        });
        let mut stream = ChunkReader {
            chunks: rx,
            current: Vec::new(),
            at: 0,
        };
        let mut archive = tar::Archive::new(&mut stream);
        archive.set_preserve_permissions(true);
        archive.set_overwrite(false);
        let unpacked = archive.unpack(dir).and_then(|()| {
            // The tar's trailing padding: read to the end so that the
            // reader finishes and checks the whole object.
            std::io::copy(&mut stream, &mut std::io::sink()).map(|_| ())
        });
        drop(stream);
        (
            reader.join().expect("the restore reader panicked"),
            unpacked,
        )
    });
    match (read, unpacked) {
        (Ok(()), Ok(())) => Ok(()),
        // A corrupt object explains a failed unpack better than the unpack
        // error does.
        (Err(e @ BackupError::Corrupt { .. }), _) => Err(e),
        (_, Err(e)) => Err(BackupError::Restore(format!(
            "cannot unpack {} into {}: {e}",
            f.key,
            dir.display()
        ))),
        (Err(e), Ok(())) => Err(e),
    }
}

/// Writes a stored file that is not a tar (the server's `backup_manifest`
/// of a backup the server compressed) into `dir` under its name, as a new
/// file.
fn write_file(
    repo: &dyn Repository,
    f: &ManifestFile,
    dir: &Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(), BackupError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if f.name.is_empty() || f.name.starts_with('.') || f.name.contains('/') {
        return Err(BackupError::Corrupt {
            key: f.key.clone(),
            detail: format!("{:?} is not a file name", f.name),
        });
    }
    let path = dir.join(&f.name);
    let local = |source| BackupError::Local {
        action: "write",
        path: path.clone(),
        source,
    };
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(local)?;
    let mut total = 0u64;
    base::read_checked(repo, f, |chunk| {
        total += chunk.len() as u64;
        progress(total);
        out.write_all(chunk).map_err(local)
    })
}

/// Reads the chunks a channel delivers as one stream; the sender hanging
/// up is the end of it.
struct ChunkReader {
    chunks: std::sync::mpsc::Receiver<Vec<u8>>,
    current: Vec<u8>,
    at: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.current.len() {
            match self.chunks.recv() {
                Ok(chunk) => {
                    self.current = chunk;
                    self.at = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn manifest(id: &str, stop: &str, stop_lsn: &str) -> Manifest {
        Manifest {
            id: id.into(),
            label: String::new(),
            source: "n".into(),
            timeline: 1,
            start_lsn: "0/1000000".parse().unwrap(),
            stop_lsn: stop_lsn.parse().unwrap(),
            start_time: stop.into(),
            stop_time: stop.into(),
            wal_segment_size: 16 << 20,
            server_manifest: String::new(),
            files: vec![],
        }
    }

    /// A tar of `files`, as pg_basebackup writes one.
    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// Stores `content` zstd-compressed (`checksum`: with the frame
    /// checksum, as pgha compresses; without, as the server does).
    fn put(
        repo: &super::super::repo::DirRepository,
        name: &str,
        key: &str,
        content: &[u8],
        checksum: bool,
    ) -> ManifestFile {
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        c.include_checksum(checksum).unwrap();
        let data = c.compress(content).unwrap();
        repo.create(key, &mut &data[..]).unwrap();
        ManifestFile {
            name: name.into(),
            key: key.into(),
            size: content.len() as u64,
            sha256: String::new(),
            stored_size: data.len() as u64,
            stored_sha256: Some(super::super::file::sha256_hex(&data)),
            pieces: Vec::new(),
            server_compressed: !checksum,
        }
    }

    /// Both layouts unpack to the same directory, `backup_manifest`
    /// included: one tar holding it (backups of earlier versions), and a
    /// tar the server compressed beside the manifest as a file of its own.
    #[test]
    fn both_layouts_unpack_with_the_server_manifest_in_place() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let repo = super::super::repo::DirRepository::new(tmp.path().join("repo"));
        std::fs::create_dir(tmp.path().join("repo")).unwrap();
        // A pg_verifybackup that checks only that the manifest is there.
        let bin = tmp.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let fake = bin.join("pg_verifybackup");
        std::fs::write(&fake, "#!/bin/sh\ntest -f \"$2/backup_manifest\"\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let server_manifest = br#"{"PostgreSQL-Backup-Manifest-Version": 1}"#;
        let relation = super::super::base::tests::noise(100_000);
        let data: [(&str, &[u8]); 2] = [("PG_VERSION", b"15\n"), ("base/1/1259", &relation)];

        let mut legacy = manifest("20260131T010000Z", "2026-01-31T01:00:10Z", "0/3000000");
        legacy.server_manifest = "base.tar:backup_manifest".into();
        let mut with_manifest = data.to_vec();
        with_manifest.push(("backup_manifest", server_manifest));
        legacy.files = vec![put(
            &repo,
            "base.tar",
            "backup/20260131T010000Z/base.tar.zst",
            &tar_of(&with_manifest),
            true,
        )];

        let mut current = manifest("20260131T020000Z", "2026-01-31T02:00:10Z", "0/5000000");
        current.server_manifest = "backup_manifest".into();
        current.files = vec![
            put(
                &repo,
                "base.tar",
                "backup/20260131T020000Z/base.tar.zst",
                &tar_of(&data),
                false,
            ),
            put(
                &repo,
                "backup_manifest",
                "backup/20260131T020000Z/backup_manifest.zst",
                server_manifest,
                true,
            ),
        ];
        // The server's tar is larger than the sizes its manifest lists.
        current.files[0].size = 100_003;

        for m in [&legacy, &current] {
            let dir = tmp.path().join(&m.id);
            let seen = std::sync::Mutex::new(Vec::new());
            unpack(&repo, m, &dir, &bin, &|n| seen.lock().unwrap().push(n)).unwrap();
            assert_eq!(std::fs::read(dir.join("PG_VERSION")).unwrap(), b"15\n");
            assert!(std::fs::read(dir.join("base/1/1259")).unwrap() == relation);
            assert_eq!(
                std::fs::read(dir.join("backup_manifest")).unwrap(),
                server_manifest
            );
            let seen = seen.into_inner().unwrap();
            let total: u64 = m.files.iter().map(|f| f.size).sum();
            assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
            assert_eq!(seen.iter().filter(|&&n| n >= total).count(), 1, "{seen:?}");
        }

        // A stored manifest that would land outside the directory.
        let mut evil = current.clone();
        evil.id = "20260131T030000Z".into();
        evil.files[1].name = "../backup_manifest".into();
        let err = unpack(&repo, &evil, &tmp.path().join("evil"), &bin, &|_| {}).unwrap_err();
        assert!(matches!(err, BackupError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn targets_parse() {
        let t = UNIX_EPOCH + Duration::from_secs(1_769_824_800);
        assert_eq!(parse_target("latest"), Ok(Target::Latest));
        assert_eq!(
            parse_target("0/3000060"),
            Ok(Target::Lsn("0/3000060".parse().unwrap()))
        );
        assert_eq!(parse_target("2026-01-31T02:00:00Z"), Ok(Target::Time(t)));
        assert_eq!(parse_target("2026-01-31 02:00:00"), Ok(Target::Time(t)));
        assert_eq!(
            parse_target("2026-01-31T03:30:00+01:30"),
            Ok(Target::Time(t))
        );
        assert_eq!(
            parse_target("2026-01-31T00:00:00-02:00"),
            Ok(Target::Time(t))
        );
        assert_eq!(
            parse_target("2026-01-31T02:00:00.250Z"),
            Ok(Target::Time(t + Duration::from_millis(250)))
        );
        for bad in ["", "yesterday", "1/zz", "2026-13-01T00:00:00Z"] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_newest_backup_before_the_target_is_chosen() {
        let backups = [
            manifest("20260131T010000Z", "2026-01-31T01:00:10Z", "0/3000000"),
            manifest("20260131T020000Z", "2026-01-31T02:00:10Z", "0/5000000"),
        ];
        let at = |s: &str| parse_target(s).unwrap();
        assert_eq!(choose(&backups, &Target::Latest).unwrap().id, backups[1].id);
        assert_eq!(
            choose(&backups, &at("2026-01-31T01:30:00Z")).unwrap().id,
            backups[0].id
        );
        assert_eq!(
            choose(&backups, &at("0/5000000")).unwrap().id,
            backups[1].id
        );
        let err = choose(&backups, &at("2026-01-31T01:00:05Z")).unwrap_err();
        assert!(
            err.to_string()
                .contains("before the oldest backup 20260131T010000Z"),
            "{err}"
        );
        assert!(choose(&[], &Target::Latest).is_err());
    }

    #[test]
    fn recovery_settings_stop_at_the_target() {
        let a = Archiving {
            mode: "on".into(),
            archive_command: "x".into(),
            restore_command: "'/bin/pgha' wal get -c '/r.toml' %f %p".into(),
        };
        let t = parse_target("2026-01-31T02:00:00.5Z").unwrap();
        let text = recovery_settings(&t, false, &a, Some(6000), "/tmp");
        assert!(
            text.contains("recovery_target_time = '2026-01-31 02:00:00.500000+00'\n"),
            "{text}"
        );
        assert!(text.contains("recovery_target_action = 'promote'\n"));
        assert!(text.contains("restore_command = '''/bin/pgha'' wal get -c ''/r.toml'' %f %p'\n"));
        assert!(text.contains("archive_mode = 'off'\n"));
        assert!(text.contains("port = '6000'\n"));
        let paused = recovery_settings(&parse_target("0/5000000").unwrap(), true, &a, None, "/tmp");
        assert!(paused.contains("recovery_target_lsn = '0/5000000'\n"));
        assert!(paused.contains("recovery_target_action = 'pause'\n"));
        let latest = recovery_settings(&Target::Latest, false, &a, None, "/tmp");
        assert!(!latest.contains("recovery_target_action"));
        assert!(!latest.contains("port"));
    }
}
