//! Base backups: `pg_basebackup` streamed into the repository, the
//! manifest that describes the result, listing and verification.
//!
//! `pg_basebackup -D - -Ft -X none` writes one tar to stdout, with the
//! server's `backup_manifest` injected at its end; that stream is
//! compressed (zstd, `parallel` worker threads, frame checksum on) straight
//! into the repository and the stored bytes are hashed, so the backup never
//! needs local disk space. The WAL the backup needs comes from the
//! archive, as for any restore.

use std::io::{BufRead, Read, Write};
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
    /// Uncompressed size.
    pub size: u64,
    /// sha256 of the uncompressed content. Only backups taken before
    /// `stored_sha256` existed carry it: hashing every byte of a large
    /// backup twice (here and in the server's SHA-256 manifest) cost CPU
    /// the compression needed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
    /// Size in the repository.
    pub stored_size: u64,
    /// sha256 of the object as stored (compressed): what the repository
    /// must give back. The content itself is covered by zstd's frame
    /// checksum and, after a restore, by the server's manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_sha256: Option<String>,
    /// The objects the stored bytes are split into, in order, when the
    /// repository caps the size of one object (see [`store`]). `key` is
    /// then the first of them, `stored_size` their sum, and
    /// `stored_sha256` absent: each piece carries its own. Empty when the
    /// file is the one object `key`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pieces: Vec<Piece>,
}

/// One object of a file stored in pieces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    pub key: String,
    pub stored_size: u64,
    /// sha256 of the object.
    pub stored_sha256: String,
}

/// What one stored object must hold.
struct Expected<'a> {
    key: &'a str,
    size: u64,
    /// `None` for backups from before stored checksums.
    sha256: Option<&'a str>,
}

impl ManifestFile {
    /// Every object of the file, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        let whole = self.pieces.is_empty().then_some(self.key.as_str());
        whole
            .into_iter()
            .chain(self.pieces.iter().map(|p| p.key.as_str()))
    }

    fn objects(&self) -> Vec<Expected<'_>> {
        if self.pieces.is_empty() {
            return vec![Expected {
                key: &self.key,
                size: self.stored_size,
                sha256: self.stored_sha256.as_deref(),
            }];
        }
        self.pieces
            .iter()
            .map(|p| Expected {
                key: &p.key,
                size: p.stored_size,
                sha256: Some(&p.stored_sha256),
            })
            .collect()
    }
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
    /// Lets another thread stop the backup (the agent does when it loses
    /// the leader key or shuts down).
    pub cancel: Option<&'a Cancel>,
    /// Compress at a lower CPU priority (nice 10): the agent's scheduled
    /// backups run beside its HA loop, which must not wait for CPU.
    pub background: bool,
    /// The source's `wal_segment_size` in bytes (set at initdb): the
    /// manifest records it, and every later walk of the WAL chain from
    /// this backup counts segments with it.
    pub wal_segment_size: u64,
}

/// Stops a running [`take`] from another thread: `take` records its
/// `pg_basebackup` here and [`Cancel::cancel`] terminates it; the backup
/// then fails as [`BackupError::Cancelled`] and leaves nothing behind. A
/// backup cancelled before it starts does not start.
#[derive(Debug, Default)]
pub struct Cancel {
    state: std::sync::Mutex<CancelState>,
}

#[derive(Debug, Default)]
struct CancelState {
    cancelled: bool,
    /// The running pg_basebackup, not yet reaped (so its pid cannot have
    /// been reused).
    child: Option<nix::unistd::Pid>,
}

impl Cancel {
    pub fn cancel(&self) {
        let mut s = self.lock();
        s.cancelled = true;
        if let Some(pid) = s.child {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.lock().cancelled
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CancelState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records the child, or terminates it at once when already cancelled.
    fn started(&self, pid: u32) {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let mut s = self.lock();
        if s.cancelled {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        s.child = Some(pid);
    }

    /// Forgets the child before it is reaped.
    fn finished(&self) {
        self.lock().child = None;
    }
}

/// Lowers the calling thread's CPU priority to nice 10 (on Linux the nice
/// value is per thread, and threads it starts inherit it: zstd's workers).
fn lower_thread_priority() {
    // SAFETY: setpriority only reads its integer arguments; `who = 0` is
    // the calling thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the backup's CPU priority");
    }
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
        .args(["--manifest-checksums=CRC32C", "-l", &label])
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
    if let Some(cancel) = src.cancel {
        cancel.started(child.id());
    }
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
    // multi-threaded encoder is a writer. The same loop picks the server's
    // backup_manifest (with the WAL range) out of the tar stream as it
    // passes; what is stored is hashed on the storing side, piece by
    // piece.
    let (mut pipe_r, pipe_w) = std::io::pipe().map_err(|source| BackupError::Local {
        action: "create a pipe for",
        path: "pg_basebackup".into(),
        source,
    })?;
    let (level, parallel, background) = (src.level, src.parallel, src.background);
    let max_object = repo.max_object_size();
    let result = std::thread::scope(|scope| {
        let compress = scope.spawn(move || -> std::io::Result<Compressed> {
            if background {
                lower_thread_priority();
            }
            let mut enc = zstd::stream::write::Encoder::new(pipe_w, level)?;
            enc.include_checksum(true)?;
            if parallel > 1 {
                enc.multithread(parallel as u32)?;
            }
            let mut scanner = TarScanner::new("backup_manifest");
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                let n = stdout.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                scanner.feed(&buf[..n]);
                enc.write_all(&buf[..n])?;
                total += n as u64;
                (src.progress)(total);
            }
            enc.finish()?.flush()?;
            Ok(Compressed {
                size: total,
                server_manifest: scanner.into_captured(),
            })
        });
        let stored = store(repo, &key, &mut pipe_r, max_object);
        drop(pipe_r);
        let compressed = compress.join().expect("the compression thread panicked");
        (stored, compressed)
    });
    if let Some(cancel) = src.cancel {
        cancel.finished();
    }
    let status = child.wait().map_err(|source| BackupError::Local {
        action: "wait for",
        path: "pg_basebackup".into(),
        source,
    })?;
    let log = err_thread.join().unwrap_or_default();
    if !status.success() {
        // Nothing of a failed backup stays behind: a schedule would
        // otherwise leave one empty directory per failure. (A failed
        // `store` removed what it had created itself.)
        if let Ok(pieces) = &result.0 {
            for p in pieces {
                let _ = repo.delete(&p.key);
            }
        }
        let _ = repo.remove_empty_dir(&format!("backup/{id}"));
        if src.cancel.is_some_and(Cancel::is_cancelled) {
            return Err(BackupError::Cancelled);
        }
        return Err(BackupError::Tool {
            tool: "pg_basebackup".into(),
            detail: format!("{status}: {}", log.trim()),
        });
    }
    let mut pieces = result.0?;
    let described = (|| {
        let compressed = result.1.map_err(|source| BackupError::Local {
            action: "compress the output of",
            path: "pg_basebackup".into(),
            source,
        })?;
        let server = String::from_utf8_lossy(&compressed.server_manifest).into_owned();
        let (start_lsn, timeline, stop_lsn) =
            parse_wal_range(&server).ok_or_else(|| BackupError::Tool {
                tool: "pg_basebackup".into(),
                detail: format!(
                    "no backup_manifest with a WAL range in its output: {}",
                    log.trim()
                ),
            })?;
        Ok((compressed.size, start_lsn, timeline, stop_lsn))
    })();
    let (size, start_lsn, timeline, stop_lsn) = match described {
        Ok(d) => d,
        Err(e) => {
            // Not after the manifest's write is tried: one that failed
            // only in our eyes would then name removed pieces.
            for p in &pieces {
                let _ = repo.delete(&p.key);
            }
            let _ = repo.remove_empty_dir(&format!("backup/{id}"));
            return Err(e);
        }
    };
    let manifest = Manifest {
        id: id.clone(),
        label,
        source: src.member.clone(),
        timeline: timeline.0,
        start_lsn,
        stop_lsn,
        start_time: humantime::format_rfc3339_seconds(started).to_string(),
        stop_time: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        wal_segment_size: src.wal_segment_size,
        server_manifest: "base.tar:backup_manifest".into(),
        files: vec![stored_file("base.tar", size, &mut pieces)],
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    repo.create(&manifest_key(&id), &mut &json[..])?;
    Ok(manifest)
}

/// The manifest entry of a file stored as `pieces` ([`store`]'s result):
/// one piece is described as a plain object, so that a backup that fits
/// in one object reads as one from before pieces existed.
pub(crate) fn stored_file(name: &str, size: u64, pieces: &mut Vec<Piece>) -> ManifestFile {
    let stored_size = pieces.iter().map(|p| p.stored_size).sum();
    if let [one] = pieces.as_slice() {
        return ManifestFile {
            name: name.into(),
            key: one.key.clone(),
            size,
            sha256: String::new(),
            stored_size,
            stored_sha256: Some(one.stored_sha256.clone()),
            pieces: Vec::new(),
        };
    }
    ManifestFile {
        name: name.into(),
        key: pieces.first().map(|p| p.key.clone()).unwrap_or_default(),
        size,
        sha256: String::new(),
        stored_size,
        stored_sha256: None,
        pieces: std::mem::take(pieces),
    }
}

/// Stores everything `src` yields as the objects `key`, `key.2`, `key.3`,
/// ..., each of at most `max` bytes (one object when `max` is `None`),
/// and returns them in order with their sizes and sha256.
///
/// An S3 object above 5 GiB cannot be put in place without the risk of
/// replacing one (see [`super::s3`]); pieces keep every object within what
/// the repository can create atomically and without replacing, so each is
/// created like any object. A piece key that already exists fails the
/// whole (nothing is replaced), and the pieces this call created are
/// removed again; pieces become part of a backup only through its
/// manifest, written after all of them.
pub(crate) fn store(
    repo: &dyn Repository,
    key: &str,
    src: &mut dyn Read,
    max: Option<u64>,
) -> Result<Vec<Piece>, BackupError> {
    let mut src = std::io::BufReader::with_capacity(1 << 20, src);
    let mut pieces: Vec<Piece> = Vec::new();
    let result = loop {
        let piece_key = match pieces.len() {
            0 => key.to_string(),
            n => format!("{key}.{}", n + 1),
        };
        let mut piece = HashingReader {
            inner: (&mut src).take(max.unwrap_or(u64::MAX)),
            hasher: Sha256::new(),
            bytes: 0,
        };
        match repo.create(&piece_key, &mut piece) {
            Ok(Created::New { .. }) => {}
            Ok(Created::Existed) => {
                break Err(BackupError::Exists {
                    key: piece_key,
                    repo: repo.location(),
                });
            }
            Err(e) => break Err(e.into()),
        }
        let full = max.is_some_and(|m| piece.bytes == m);
        pieces.push(Piece {
            key: piece_key,
            stored_size: piece.bytes,
            stored_sha256: hex(&piece.hasher.finalize()),
        });
        if !full {
            break Ok(());
        }
        // A full piece may have been the last: look before creating an
        // empty one.
        match src.fill_buf() {
            Ok([]) => break Ok(()),
            Ok(_) => {}
            Err(source) => {
                break Err(super::repo::RepoError::Io {
                    repo: repo.location(),
                    action: "write",
                    key: format!("{key}.{}", pieces.len() + 1),
                    source,
                }
                .into());
            }
        }
    };
    match result {
        Ok(()) => Ok(pieces),
        Err(e) => {
            for p in &pieces {
                let _ = repo.delete(&p.key);
            }
            Err(e)
        }
    }
}

struct Compressed {
    size: u64,
    server_manifest: Vec<u8>,
}

/// A reader that hashes what passes through it and counts it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// The stored bytes of a file: its objects one after another, each opened
/// when the one before ends (a stream held open while gigabytes of the
/// previous piece are read would time out) and checked at its end against
/// its size and sha256.
struct StoredReader<'a> {
    repo: &'a dyn Repository,
    objects: Vec<Expected<'a>>,
    /// The index in `objects` of `current`.
    at: usize,
    current: Option<Box<dyn Read + Send>>,
    hasher: Sha256,
    object_bytes: u64,
    /// Stored bytes read, all objects together.
    bytes: u64,
}

impl StoredReader<'_> {
    /// The end of the current object: checked, and the next one opened.
    fn end_of_object(&mut self) -> std::io::Result<()> {
        let o = &self.objects[self.at];
        let hasher = std::mem::replace(&mut self.hasher, Sha256::new());
        let size = std::mem::take(&mut self.object_bytes);
        if let Some(want) = o.sha256 {
            let got = hex(&hasher.finalize());
            if got != want || size != o.size {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "stored: {} holds {size} bytes with sha256 {got}, manifest says {} bytes with {want}",
                        o.key, o.size
                    ),
                ));
            }
        }
        self.current = None;
        self.at += 1;
        if let Some(next) = self.objects.get(self.at) {
            self.current = Some(
                self.repo
                    .open(next.key)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::NotFound, e))?,
            );
        }
        Ok(())
    }
}

impl Read for StoredReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let Some(current) = &mut self.current else {
                return Ok(0);
            };
            let n = current.read(buf)?;
            if n > 0 || buf.is_empty() {
                self.hasher.update(&buf[..n]);
                self.object_bytes += n as u64;
                self.bytes += n as u64;
                return Ok(n);
            }
            self.end_of_object()?;
        }
    }
}

/// Reads a stored backup file decompressed, handing it to `sink` in
/// chunks, and checks it against its manifest entry: each stored object's
/// sha256 and size (or, for backups that predate stored checksums, the
/// content's sha256), the sizes, and zstd's frame checksum. Whatever
/// `sink` returns as an error stops the read and is returned as is.
pub(crate) fn read_checked(
    repo: &dyn Repository,
    f: &ManifestFile,
    mut sink: impl FnMut(&[u8]) -> Result<(), BackupError>,
) -> Result<(), BackupError> {
    let corrupt = |detail: String| BackupError::Corrupt {
        key: f.key.clone(),
        detail,
    };
    let objects = f.objects();
    let first = repo.open(objects[0].key)?;
    let raw = StoredReader {
        repo,
        objects,
        at: 0,
        current: Some(first),
        hasher: Sha256::new(),
        object_bytes: 0,
        bytes: 0,
    };
    let mut decoder = zstd::stream::read::Decoder::new(raw).map_err(|e| corrupt(e.to_string()))?;
    // Backups that predate `stored_sha256` are checked on their content.
    let mut content = (f.pieces.is_empty() && f.stored_sha256.is_none()).then(Sha256::new);
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = decoder.read(&mut buf).map_err(|e| corrupt(e.to_string()))?;
        if n == 0 {
            break;
        }
        if let Some(h) = &mut content {
            h.update(&buf[..n]);
        }
        total += n as u64;
        sink(&buf[..n])?;
    }
    // Whatever follows the last frame is part of the stored bytes too, and
    // reading to their end checks the last object.
    let mut rest = decoder.finish();
    std::io::copy(&mut rest, &mut std::io::sink()).map_err(|e| corrupt(e.to_string()))?;
    let raw = rest.into_inner();
    if let Some(h) = content {
        let actual = hex(&h.finalize());
        if actual != f.sha256 || total != f.size {
            return Err(corrupt(format!(
                "content: {total} bytes with sha256 {actual}, manifest says {} bytes with {}",
                f.size, f.sha256
            )));
        }
    }
    if raw.bytes != f.stored_size || total != f.size {
        return Err(corrupt(format!(
            "stored: {} bytes ({total} uncompressed), manifest says {} bytes ({} uncompressed)",
            raw.bytes, f.stored_size, f.size
        )));
    }
    Ok(())
}

/// Picks one entry's content out of a tar stream fed in arbitrary chunks,
/// without copying the rest: pg_basebackup's tar is ustar (512-byte
/// headers, data padded to 512 bytes, optional pax or GNU long-name
/// headers before an entry).
struct TarScanner {
    wanted: &'static str,
    header: Vec<u8>,
    /// Data bytes of the current entry still to come, and the padding
    /// after them.
    data_left: u64,
    pad_left: u64,
    capturing: bool,
    /// The name a pax (`x`) or GNU (`L`) header gave the next entry.
    long_name: Option<Vec<u8>>,
    meta: Option<(u8, Vec<u8>)>,
    captured: Vec<u8>,
    done: bool,
}

impl TarScanner {
    fn new(wanted: &'static str) -> Self {
        TarScanner {
            wanted,
            header: Vec::with_capacity(512),
            data_left: 0,
            pad_left: 0,
            capturing: false,
            long_name: None,
            meta: None,
            captured: Vec::new(),
            done: false,
        }
    }

    fn into_captured(self) -> Vec<u8> {
        self.captured
    }

    fn feed(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() && !self.done {
            if self.data_left > 0 {
                let n = (self.data_left.min(buf.len() as u64)) as usize;
                if self.capturing {
                    self.captured.extend_from_slice(&buf[..n]);
                } else if let Some((_, meta)) = &mut self.meta {
                    meta.extend_from_slice(&buf[..n]);
                }
                self.data_left -= n as u64;
                buf = &buf[n..];
                if self.data_left == 0 {
                    self.end_of_data();
                }
            } else if self.pad_left > 0 {
                let n = (self.pad_left.min(buf.len() as u64)) as usize;
                self.pad_left -= n as u64;
                buf = &buf[n..];
            } else {
                let n = (512 - self.header.len()).min(buf.len());
                self.header.extend_from_slice(&buf[..n]);
                buf = &buf[n..];
                if self.header.len() == 512 {
                    let header = std::mem::take(&mut self.header);
                    self.start_entry(&header);
                }
            }
        }
    }

    fn start_entry(&mut self, h: &[u8]) {
        if h.iter().all(|&b| b == 0) {
            // The end-of-archive blocks (or padding): nothing follows.
            self.done = true;
            return;
        }
        let Some(size) = tar_size(&h[124..136]) else {
            self.done = true;
            return;
        };
        let kind = h[156];
        let name = match self.long_name.take() {
            Some(n) => n,
            None => {
                let field = |r: std::ops::Range<usize>| {
                    let f = &h[r];
                    f[..f.iter().position(|&b| b == 0).unwrap_or(f.len())].to_vec()
                };
                let (name, prefix) = (field(0..100), field(345..500));
                if &h[257..262] == b"ustar" && !prefix.is_empty() {
                    [prefix, b"/".to_vec(), name].concat()
                } else {
                    name
                }
            }
        };
        self.capturing = false;
        self.meta = None;
        match kind {
            b'x' | b'L' => self.meta = Some((kind, Vec::new())),
            _ => self.capturing = name == self.wanted.as_bytes(),
        }
        if self.capturing {
            self.captured.clear();
        }
        self.data_left = size;
        self.pad_left = (512 - size % 512) % 512;
        if size == 0 {
            self.end_of_data();
        }
    }

    fn end_of_data(&mut self) {
        self.capturing = false;
        match self.meta.take() {
            Some((b'L', name)) => {
                let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                self.long_name = Some(name[..end].to_vec());
            }
            Some((_, pax)) => self.long_name = pax_path(&pax),
            None => {}
        }
    }
}

/// A tar header's size field: octal digits, or base-256 when the first
/// byte has its high bit set.
fn tar_size(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let digits: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| (b'0'..=b'7').contains(&b))
        .collect();
    if digits.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(std::str::from_utf8(&digits).ok()?, 8).ok()
}

/// The `path` record of a pax extended header (`<len> path=<name>\n`).
fn pax_path(pax: &[u8]) -> Option<Vec<u8>> {
    let mut rest = pax;
    while !rest.is_empty() {
        let space = rest.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
        if len <= space || len > rest.len() {
            return None;
        }
        let record = &rest[space + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(path) = record.strip_prefix(b"path=") {
            return Some(path.to_vec());
        }
        rest = &rest[len..];
    }
    None
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
        if let Err(e) = read_checked(repo, f, |_| Ok(())) {
            report.problems.push(e.to_string());
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
pub(crate) mod tests {
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
                sha256: String::new(),
                stored_size: 40,
                stored_sha256: Some("00".repeat(32)),
                pieces: Vec::new(),
            }],
        };
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"start_lsn\":\"0/5000028\""), "{json}");
        assert!(!json.contains("\"sha256\""), "no content checksum: {json}");
        assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), m);
        // 0/7000000 is the first byte of segment 7: segment 6 is the last needed.
        assert_eq!(stop_segment(&m).as_str(), "000000020000000000000006");
        assert!(m.stop().unwrap() > m.start().unwrap());
    }

    /// A tar like pg_basebackup's, with entries before and after the one
    /// wanted, a long name (GNU header) and a decoy in a subdirectory.
    fn sample_tar(manifest: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        };
        add("PG_VERSION", b"15\n");
        add(&format!("base/1/{}", "x".repeat(150)), &vec![7u8; 10_000]);
        add("global/backup_manifest", b"a decoy");
        add("empty", b"");
        add("backup_manifest", manifest);
        add("after", &vec![1u8; 513]);
        b.into_inner().unwrap()
    }

    #[test]
    fn the_tar_scanner_finds_the_manifest_in_chunks_of_any_size() {
        let manifest: Vec<u8> = (0..5000u32).flat_map(|i| i.to_le_bytes()).collect();
        let tar = sample_tar(&manifest);
        for chunk in [1, 7, 511, 512, 513, 4096, tar.len()] {
            let mut scanner = TarScanner::new("backup_manifest");
            for piece in tar.chunks(chunk) {
                scanner.feed(piece);
            }
            assert_eq!(scanner.into_captured(), manifest, "chunks of {chunk}");
        }
        // A stream without the entry captures nothing; garbage stops it.
        let mut scanner = TarScanner::new("backup_manifest");
        scanner.feed(&sample_tar(b"")[..]);
        assert!(scanner.into_captured().is_empty());
        let mut scanner = TarScanner::new("backup_manifest");
        scanner.feed(&[b'z'; 2048]);
        assert!(scanner.into_captured().is_empty());
    }

    #[test]
    fn tar_size_fields_in_octal_and_base_256() {
        assert_eq!(tar_size(b"00000001750\0"), Some(1000));
        assert_eq!(tar_size(b"     1750 \0\0\0"), Some(1000));
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[11] = 1;
        big[10] = 2;
        assert_eq!(tar_size(&big), Some(513));
        assert_eq!(
            pax_path(b"25 path=a/backup_manifest\n"),
            Some(b"a/backup_manifest".to_vec())
        );
        assert_eq!(pax_path(b"9 size=1\n"), None);
    }

    fn stored(repo: &super::super::repo::DirRepository, key: &str, content: &[u8]) -> ManifestFile {
        let data = zstd::stream::encode_all(content, 3).unwrap();
        repo.create(key, &mut &data[..]).unwrap();
        ManifestFile {
            name: "base.tar".into(),
            key: key.into(),
            size: content.len() as u64,
            sha256: String::new(),
            stored_size: data.len() as u64,
            stored_sha256: Some(super::super::file::sha256_hex(&data)),
            pieces: Vec::new(),
        }
    }

    fn read_all(repo: &dyn Repository, f: &ManifestFile) -> Result<Vec<u8>, BackupError> {
        let mut out = Vec::new();
        read_checked(repo, f, |c| {
            out.extend_from_slice(c);
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn stored_objects_are_checked_on_their_stored_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let repo = super::super::repo::DirRepository::new(dir.path());
        let content: Vec<u8> = (0..300_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let f = stored(&repo, "backup/a/base.tar.zst", &content);
        assert_eq!(read_all(&repo, &f).unwrap(), content);
        // The manifest disagrees about the stored bytes or the size.
        let wrong_sha = ManifestFile {
            stored_sha256: Some("00".repeat(32)),
            ..f.clone()
        };
        let err = read_all(&repo, &wrong_sha).unwrap_err();
        assert!(matches!(err, BackupError::Corrupt { .. }), "{err}");
        let wrong_size = ManifestFile {
            size: f.size + 1,
            ..f.clone()
        };
        assert!(read_all(&repo, &wrong_size).is_err());
        // One flipped byte in the repository: the stored checksum (or
        // zstd's own) catches it, whichever comes first.
        let path = dir.path().join(&f.key);
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let err = read_all(&repo, &f).unwrap_err();
        assert!(matches!(err, BackupError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn backups_from_before_stored_checksums_are_checked_on_their_content() {
        let dir = tempfile::tempdir().unwrap();
        let repo = super::super::repo::DirRepository::new(dir.path());
        let content = b"an older backup".repeat(1000);
        let legacy = ManifestFile {
            sha256: super::super::file::sha256_hex(&content),
            stored_sha256: None,
            ..stored(&repo, "backup/old/base.tar.zst", &content)
        };
        // As an older pgha wrote it: no stored_sha256 key at all.
        let json = serde_json::to_string(&legacy).unwrap();
        assert!(!json.contains("stored_sha256"), "{json}");
        let legacy: ManifestFile = serde_json::from_str(&json).unwrap();
        assert_eq!(read_all(&repo, &legacy).unwrap(), content);
        let wrong = ManifestFile {
            sha256: "11".repeat(32),
            ..legacy
        };
        let err = read_all(&repo, &wrong).unwrap_err();
        assert!(err.to_string().contains("content"), "{err}");
    }

    /// Bytes zstd cannot shrink, so that the stored stream is as long as
    /// the content.
    pub(crate) fn noise(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_stream_over_the_limit_is_stored_in_pieces_and_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let repo = super::super::repo::DirRepository::new(dir.path());
        let content = noise(300_000);
        let data = zstd::stream::encode_all(&content[..], 1).unwrap();
        let max = 64 << 10;
        let key = "backup/b/base.tar.zst";
        let mut pieces = store(&repo, key, &mut &data[..], Some(max)).unwrap();
        let keys: Vec<&str> = pieces.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                key,
                &format!("{key}.2"),
                &format!("{key}.3"),
                &format!("{key}.4"),
                &format!("{key}.5")
            ]
        );
        assert!(pieces[..4].iter().all(|p| p.stored_size == max));
        assert_eq!(pieces[4].stored_size, data.len() as u64 - 4 * max);
        for p in &pieces {
            let stored = repo.read(&p.key).unwrap();
            assert_eq!(p.stored_sha256, super::super::file::sha256_hex(&stored));
        }
        let f = stored_file("base.tar", content.len() as u64, &mut pieces);
        assert_eq!((f.key.as_str(), f.stored_sha256.as_deref()), (key, None));
        assert_eq!(f.stored_size, data.len() as u64);
        assert_eq!(f.keys().count(), 5);
        let json = serde_json::to_string(&f).unwrap();
        let f: ManifestFile = serde_json::from_str(&json).unwrap();
        assert!(read_all(&repo, &f).unwrap() == content, "read back differs");

        // Pieces out of order, one missing, one changed: each is caught.
        let mut swapped = f.clone();
        swapped.pieces[1].key = format!("{key}.3");
        swapped.pieces[2].key = format!("{key}.2");
        let err = read_all(&repo, &swapped).unwrap_err();
        assert!(matches!(err, BackupError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(&format!("{key}.3 holds")), "{err}");
        let mut bytes = repo.read(&format!("{key}.3")).unwrap();
        bytes[100] ^= 1;
        std::fs::write(dir.path().join(format!("{key}.3")), &bytes).unwrap();
        let err = read_all(&repo, &f).unwrap_err();
        assert!(err.to_string().contains(&format!("{key}.3 holds")), "{err}");
        repo.delete(&format!("{key}.4")).unwrap();
        let mut without_3 = f.clone();
        without_3.pieces.remove(2);
        let err = read_all(&repo, &without_3).unwrap_err();
        assert!(
            err.to_string().contains(&format!("{key}.4: not found")),
            "{err}"
        );
    }

    #[test]
    fn a_stream_within_the_limit_is_one_object_as_before_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let repo = super::super::repo::DirRepository::new(dir.path());
        let content = noise(10_000);
        let data = zstd::stream::encode_all(&content[..], 1).unwrap();
        // Exactly the limit: no empty second piece.
        let max = data.len() as u64;
        let mut pieces = store(&repo, "backup/b/base.tar.zst", &mut &data[..], Some(max)).unwrap();
        assert_eq!(pieces.len(), 1);
        assert_eq!(repo.list("backup/b").unwrap(), ["base.tar.zst"]);
        let f = stored_file("base.tar", content.len() as u64, &mut pieces);
        let json = serde_json::to_string(&f).unwrap();
        assert!(!json.contains("pieces"), "{json}");
        assert_eq!(
            f.stored_sha256.as_deref(),
            Some(super::super::file::sha256_hex(&data).as_str())
        );
        assert!(read_all(&repo, &f).unwrap() == content);
        // Twice the limit: two pieces, and nothing more.
        let twice = [&data[..], &data[..]].concat();
        let pieces = store(&repo, "backup/c/base.tar.zst", &mut &twice[..], Some(max)).unwrap();
        assert_eq!(pieces.len(), 2);
        assert_eq!(
            repo.list("backup/c").unwrap(),
            ["base.tar.zst", "base.tar.zst.2"]
        );
    }

    #[test]
    fn pieces_never_replace_an_object() {
        let dir = tempfile::tempdir().unwrap();
        let repo = super::super::repo::DirRepository::new(dir.path());
        let key = "backup/b/base.tar.zst";
        repo.create(&format!("{key}.3"), &mut &b"planted"[..])
            .unwrap();
        let data = noise(5000);
        let err = store(&repo, key, &mut &data[..], Some(2000)).unwrap_err();
        assert!(matches!(err, BackupError::Exists { .. }), "{err}");
        assert!(err.to_string().contains(&format!("{key}.3")), "{err}");
        // What this store created is gone; what was there is untouched.
        assert_eq!(repo.list("backup/b").unwrap(), ["base.tar.zst.3"]);
        assert_eq!(repo.read(&format!("{key}.3")).unwrap(), b"planted");
        // The first key taken: nothing is created at all.
        repo.create(key, &mut &b"first"[..]).unwrap();
        let err = store(&repo, key, &mut &data[..], Some(2000)).unwrap_err();
        assert!(matches!(err, BackupError::Exists { .. }), "{err}");
        assert_eq!(repo.read(key).unwrap(), b"first");
        assert_eq!(
            repo.list("backup/b").unwrap(),
            ["base.tar.zst", "base.tar.zst.3"]
        );
    }
}
