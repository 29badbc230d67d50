//! Base backups: `pg_basebackup` streamed into the repository, the
//! manifest that describes the result, listing and verification.
//!
//! `pg_basebackup -D - -Ft -X none` writes one tar to stdout, with the
//! server's `backup_manifest` injected at its end; that stream is hashed
//! and compressed (zstd, `parallel` worker threads) straight into the
//! repository, so the backup never needs local disk space. The WAL the
//! backup needs comes from the archive, as for any restore.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::BackupError;
use super::chain::{self, ArchiveIndex};
use super::file::hex;
use super::naming::{self, WalName};
use super::repo::{Created, Repository};
use crate::model::{Lsn, Timeline};

/// `backup/<id>/manifest.json`: written last, so a backup without one is
/// incomplete and ignored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub id: String,
    pub label: String,
    /// The member the backup was taken from.
    pub source: String,
    pub timeline: u32,
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
    /// RFC 3339, UTC.
    pub start_time: String,
    pub stop_time: String,
    pub wal_segment_size: u64,
    /// The server's `backup_manifest` is inside `base.tar` (pg_basebackup
    /// injects it there when it writes to stdout); `pgha restore` checks
    /// the restored files against it with `pg_verifybackup`.
    pub server_manifest: String,
    pub files: Vec<ManifestFile>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    pub name: String,
    pub key: String,
    /// Uncompressed size and checksum.
    pub size: u64,
    pub sha256: String,
    /// Size in the repository.
    pub stored_size: u64,
}

pub fn manifest_key(id: &str) -> String {
    format!("backup/{id}/manifest.json")
}

impl Manifest {
    pub fn start(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339(&self.start_time).ok()
    }
    pub fn stop(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339(&self.stop_time).ok()
    }
    pub fn stored_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.stored_size).sum()
    }
}

/// Every complete backup, oldest first.
pub fn list(repo: &dyn Repository) -> Result<Vec<Manifest>, BackupError> {
    let mut out = Vec::new();
    for id in repo.list("backup")? {
        if !naming::is_backup_id(&id) {
            continue;
        }
        let key = manifest_key(&id);
        let data = match repo.read(&key) {
            Ok(d) => d,
            Err(super::repo::RepoError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let m: Manifest = serde_json::from_slice(&data).map_err(|e| BackupError::Corrupt {
            key: key.clone(),
            detail: e.to_string(),
        })?;
        out.push(m);
    }
    Ok(out)
}

/// Where to take a backup from and how.
pub struct BackupSource<'a> {
    pub member: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub bin_dir: &'a Path,
    pub passfile: &'a Path,
    pub level: i32,
    pub parallel: usize,
    /// Called with the bytes read from pg_basebackup so far.
    pub progress: &'a (dyn Fn(u64) + Sync),
}

/// Takes a base backup into `repo` and returns its manifest.
pub fn take(repo: &dyn Repository, src: &BackupSource<'_>) -> Result<Manifest, BackupError> {
    let started = SystemTime::now();
    let id = naming::backup_id(started);
    if repo
        .list(&format!("backup/{id}"))?
        .iter()
        .any(|f| f == "manifest.json")
    {
        return Err(BackupError::Tool {
            tool: "pg_basebackup".into(),
            detail: format!("backup {id} already exists; try again in a second"),
        });
    }
    let label = format!("pgha {id}");
    let mut child = Command::new(src.bin_dir.join("pg_basebackup"))
        .args(["-D", "-", "-F", "t", "-X", "none", "-c", "fast", "-v", "-w"])
        .args(["--manifest-checksums=SHA256", "-l", &label])
        .args([
            "-h",
            &src.host,
            "-p",
            &src.port.to_string(),
            "-U",
            &src.user,
        ])
        .env("PGPASSFILE", src.passfile)
        .env_remove("PGPASSWORD")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| BackupError::Local {
            action: "run",
            path: src.bin_dir.join("pg_basebackup"),
            source,
        })?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let key = format!("backup/{id}/base.tar.zst");
    // Compression runs on its own thread, writing into a pipe the
    // repository reads from: the repository trait takes a reader, the zstd
    // multi-threaded encoder is a writer.
    let (mut pipe_r, pipe_w) = std::io::pipe().map_err(|source| BackupError::Local {
        action: "create a pipe for",
        path: "pg_basebackup".into(),
        source,
    })?;
    // A second pipe feeds a tar reader that picks the server's
    // backup_manifest (with the WAL range) out of the stream as it passes.
    let (tar_r, mut tar_w) = std::io::pipe().map_err(|source| BackupError::Local {
        action: "create a pipe for",
        path: "pg_basebackup".into(),
        source,
    })?;
    let tar_thread = std::thread::spawn(move || server_manifest(tar_r));
    let (level, parallel) = (src.level, src.parallel);
    let mut hashed = 0u64;
    let result = std::thread::scope(|scope| {
        let compress = scope.spawn(move || -> std::io::Result<(u64, String)> {
            let mut enc = zstd::stream::write::Encoder::new(pipe_w, level)?;
            if parallel > 1 {
                enc.multithread(parallel as u32)?;
            }
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                let n = stdout.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                enc.write_all(&buf[..n])?;
                // The tar reader may stop early on a malformed stream; the
                // checksum and the server's manifest catch that later.
                let _ = tar_w.write_all(&buf[..n]);
                total += n as u64;
                (src.progress)(total);
            }
            enc.finish()?.flush()?;
            drop(tar_w);
            Ok((total, hex(&hasher.finalize())))
        });
        let stored = repo.create(&key, &mut pipe_r);
        drop(pipe_r);
        let compressed = compress.join().expect("the compression thread panicked");
        (stored, compressed)
    });
    let status = child.wait().map_err(|source| BackupError::Local {
        action: "wait for",
        path: "pg_basebackup".into(),
        source,
    })?;
    let log = err_thread.join().unwrap_or_default();
    if !status.success() {
        let _ = repo.delete(&key);
        return Err(BackupError::Tool {
            tool: "pg_basebackup".into(),
            detail: format!("{status}: {}", log.trim()),
        });
    }
    let stored = match result.0? {
        Created::New { bytes } => bytes,
        Created::Existed => {
            return Err(BackupError::Tool {
                tool: "pg_basebackup".into(),
                detail: format!("{key} already exists"),
            });
        }
    };
    let (size, sha256) = result.1.map_err(|source| BackupError::Local {
        action: "compress the output of",
        path: "pg_basebackup".into(),
        source,
    })?;
    hashed += size;
    let server = tar_thread.join().unwrap_or_default();
    let (start_lsn, timeline, stop_lsn) =
        parse_wal_range(&server).ok_or_else(|| BackupError::Tool {
            tool: "pg_basebackup".into(),
            detail: format!(
                "no backup_manifest with a WAL range in its output: {}",
                log.trim()
            ),
        })?;
    let manifest = Manifest {
        id: id.clone(),
        label,
        source: src.member.clone(),
        timeline: timeline.0,
        start_lsn,
        stop_lsn,
        start_time: humantime::format_rfc3339_seconds(started).to_string(),
        stop_time: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        wal_segment_size: naming::DEFAULT_SEGMENT_SIZE,
        server_manifest: "base.tar:backup_manifest".into(),
        files: vec![ManifestFile {
            name: "base.tar".into(),
            key,
            size: hashed,
            sha256,
            stored_size: stored,
        }],
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    repo.create(&manifest_key(&id), &mut &json[..])?;
    Ok(manifest)
}

/// The server's `backup_manifest` from a tar stream (empty if absent).
fn server_manifest(r: impl Read) -> String {
    let mut text = String::new();
    let mut archive = tar::Archive::new(r);
    if let Ok(entries) = archive.entries() {
        for mut e in entries.flatten() {
            if e.path().is_ok_and(|p| p == Path::new("backup_manifest")) {
                let _ = e.read_to_string(&mut text);
            }
        }
    }
    text
}

/// The WAL range of the server's backup manifest:
/// `"WAL-Ranges": [{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100" }]`.
/// With several ranges (the source changed timeline during the backup)
/// the backup starts on the first and ends on the last.
pub fn parse_wal_range(server_manifest: &str) -> Option<(Lsn, Timeline, Lsn)> {
    let v: serde_json::Value = serde_json::from_str(server_manifest).ok()?;
    let ranges = v.get("WAL-Ranges")?.as_array()?;
    let lsn = |r: &serde_json::Value, k: &str| r.get(k)?.as_str()?.parse::<Lsn>().ok();
    let first = ranges.first()?;
    let last = ranges.last()?;
    let tl = first.get("Timeline")?.as_u64()?;
    Some((
        lsn(first, "Start-LSN")?,
        Timeline(tl as u32),
        lsn(last, "End-LSN")?,
    ))
}

/// The segment holding the last byte a backup needs.
pub fn stop_segment(m: &Manifest) -> WalName {
    let last = Lsn(m.stop_lsn.0.saturating_sub(1).max(m.start_lsn.0));
    naming::segment_name(
        Timeline(m.timeline),
        naming::segno_of(last, m.wal_segment_size),
        m.wal_segment_size,
    )
}

/// Reads the archive's listing and history files.
pub fn archive_index(
    repo: &dyn Repository,
    seg_size: u64,
) -> Result<
    (
        ArchiveIndex,
        std::collections::BTreeMap<Timeline, Vec<chain::Switch>>,
    ),
    BackupError,
> {
    let mut index = ArchiveIndex::default();
    let mut histories = std::collections::BTreeMap::new();
    for dir in repo.list("archive")? {
        for f in repo.list(&format!("archive/{dir}"))? {
            let Some((name, sha)) = naming::parse_archive_object(&f) else {
                continue;
            };
            index.add(&name, seg_size);
            if name.kind() == naming::WalKind::History {
                let key = naming::archive_key(&name, &sha);
                let data = super::file::fetch_verified(repo, &key, &sha)?;
                let h = chain::parse_history(&String::from_utf8_lossy(&data)).map_err(|e| {
                    BackupError::Corrupt {
                        key: key.clone(),
                        detail: format!("not a timeline history file: {e}"),
                    }
                })?;
                histories.insert(name.timeline(), h);
            }
        }
    }
    Ok((index, histories))
}

/// What [`verify`] found wrong with one backup.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub id: String,
    pub problems: Vec<String>,
    /// Timelines whose chain from the backup was walked.
    pub timelines: Vec<u32>,
    pub segments_checked: u64,
}

/// Checks a backup: every file against its checksum, and the WAL chain from
/// its start to the newest archived segment on every timeline that descends
/// from it.
pub fn verify(repo: &dyn Repository, m: &Manifest) -> Result<VerifyReport, BackupError> {
    let mut report = VerifyReport {
        id: m.id.clone(),
        ..Default::default()
    };
    for f in &m.files {
        match repo.open(&f.key) {
            Err(e) => report.problems.push(e.to_string()),
            Ok(r) => {
                let mut hasher = Sha256::new();
                let mut total = 0u64;
                let outcome = zstd::stream::read::Decoder::new(r).and_then(|mut d| {
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let n = d.read(&mut buf)?;
                        if n == 0 {
                            return Ok(());
                        }
                        hasher.update(&buf[..n]);
                        total += n as u64;
                    }
                });
                let sha = hex(&hasher.finalize());
                if let Err(e) = outcome {
                    report
                        .problems
                        .push(format!("{}: corrupt object: {e}", f.key));
                } else if sha != f.sha256 || total != f.size {
                    report.problems.push(format!(
                        "{}: corrupt object: {total} bytes with sha256 {sha}, manifest says {} bytes with {}",
                        f.key, f.size, f.sha256
                    ));
                }
            }
        }
    }
    let seg = m.wal_segment_size;
    let (index, histories) = archive_index(repo, seg)?;
    let start_tl = Timeline(m.timeline);
    for tl in index.timelines() {
        let history = histories.get(&tl).cloned().unwrap_or_default();
        if tl != start_tl && !history.iter().any(|s| s.parent == start_tl) {
            continue;
        }
        if tl.0 > 1 && !histories.contains_key(&tl) {
            report.problems.push(format!(
                "{}: history file not archived",
                naming::history_name(tl)
            ));
            continue;
        }
        let path = chain::path_to(tl, &history, seg);
        report.timelines.push(tl.0);
        let stop = naming::segno_of(Lsn(m.stop_lsn.0.saturating_sub(1)), seg);
        let last = chain::last_segment(&path, &index).unwrap_or(0).max(stop);
        let missing = chain::missing(&path, m.start_lsn, last, &index, seg);
        report.segments_checked += last + 1 - naming::segno_of(m.start_lsn, seg);
        for w in missing {
            report.problems.push(format!(
                "{w}: missing from the archive (needed on timeline {})",
                tl.0
            ));
        }
    }
    report.problems.dedup();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_range_from_the_server_manifest() {
        let text = r#"{ "PostgreSQL-Backup-Manifest-Version": 1,
"Files": [],
"WAL-Ranges": [
{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100" }
],
"Manifest-Checksum": "x"}"#;
        let (s, tl, e) = parse_wal_range(text).unwrap();
        assert_eq!(s, "0/2000028".parse().unwrap());
        assert_eq!(tl, Timeline(1));
        assert_eq!(e, "0/2000100".parse().unwrap());
        assert_eq!(parse_wal_range("nothing"), None);
    }

    #[test]
    fn manifest_round_trips_and_names_its_stop_segment() {
        let m = Manifest {
            id: "20260131T020000Z".into(),
            label: "pgha 20260131T020000Z".into(),
            source: "node2".into(),
            timeline: 2,
            start_lsn: "0/5000028".parse().unwrap(),
            stop_lsn: "0/7000000".parse().unwrap(),
            start_time: "2026-01-31T02:00:00Z".into(),
            stop_time: "2026-01-31T02:00:09Z".into(),
            wal_segment_size: naming::DEFAULT_SEGMENT_SIZE,
            server_manifest: "base.tar:backup_manifest".into(),
            files: vec![ManifestFile {
                name: "base.tar".into(),
                key: "backup/20260131T020000Z/base.tar.zst".into(),
                size: 100,
                sha256: "00".repeat(32),
                stored_size: 40,
            }],
        };
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"start_lsn\":\"0/5000028\""), "{json}");
        assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), m);
        // 0/7000000 is the first byte of segment 7: segment 6 is the last needed.
        assert_eq!(stop_segment(&m).as_str(), "000000020000000000000006");
        assert!(m.stop().unwrap() > m.start().unwrap());
    }
}
