//! Base backups: `pg_basebackup` streamed into the repository, the
//! manifest that describes the result, listing and verification.
//!
//! `pg_basebackup -Ft -X none --compress=server-zstd` has the server
//! compress its tar (`parallel` worker threads there), writes it into a
//! private temporary directory, and pgha stores it into the repository
//! while it grows, hashing the stored bytes and releasing the stored part
//! of the temporary file; the server's `backup_manifest` is stored beside
//! it. The WAL the backup needs comes from the archive, as for any
//! restore. Backups of earlier versions (one tar compressed by pgha, the
//! `backup_manifest` inside it) are read as before.

use std::io::{BufRead, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
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
    /// Where the server's `backup_manifest` is: `backup_manifest`, a file
    /// of the backup of its own, or `base.tar:backup_manifest`, inside the
    /// tar (backups taken when pg_basebackup wrote to stdout and pgha
    /// compressed). `pgha restore` checks the restored files against it
    /// with `pg_verifybackup`.
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
    /// The server compressed the stored bytes (`pg_basebackup
    /// --compress=server-zstd`): zstd frames without a checksum, and
    /// `size` is the sum of the file sizes the server's `backup_manifest`
    /// lists (the tar's headers not counted), so neither is checked while
    /// reading; `pg_verifybackup` checks every file's size and CRC-32C
    /// after a restore. Files compressed by pgha carry zstd's frame
    /// checksum and their exact size.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub server_compressed: bool,
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
    pub progress: &'a (dyn Fn(u64, u64) + Sync),
    /// Lets another thread stop the backup (the agent does when it loses
    /// the leader key or shuts down).
    pub cancel: Option<&'a Cancel>,
    /// Store at a lower CPU priority (nice 10): the agent's scheduled
    /// backups run beside its HA loop, which must not wait for CPU. (The
    /// compression runs in the source server, which this does not reach.)
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
///
/// The server compresses (`--compress=server-zstd`, `level`, `parallel`
/// workers): what crosses the socket and reaches this host is the
/// compressed tar, not the database. pg_basebackup cannot put the
/// server's `backup_manifest` into a compressed tar on its standard
/// output, so it writes into a private temporary directory:
/// `base.tar.zst`, stored while it grows (its stored part released as it
/// goes, see [`Follow`]), then `backup_manifest`, stored as a file of its
/// own.
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
    let work = WorkDir::create(&id)?;
    let out_dir = work.path.join("out");
    let mut compress = format!("--compress=server-zstd:level={}", src.level);
    if src.parallel > 1 {
        compress.push_str(&format!(",workers={}", src.parallel));
    }
    let mut child = Command::new(src.bin_dir.join("pg_basebackup"))
        .arg("-D")
        .arg(&out_dir)
        .args(["-F", "t", "-X", "none", "-c", "fast", "-v", "-P", "-w"])
        // The temporary files are removed once stored; the repository
        // syncs what it stores.
        .arg("--no-sync")
        .arg(&compress)
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
        .stdout(Stdio::null())
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
    let stderr = child.stderr.take().expect("piped");
    let key = format!("backup/{id}/base.tar.zst");
    let max_object = repo.max_object_size();
    let background = src.background;
    let state = AtomicU8::new(RUNNING);
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (exited, log, stored) = std::thread::scope(|scope| {
        let log = scope.spawn(|| read_log(stderr, src.progress));
        let storing = scope.spawn(|| {
            if background {
                lower_thread_priority();
            }
            let mut follow = Follow::new(out_dir.join("base.tar.zst"), &state);
            store(repo, &key, &mut follow, max_object)
        });
        let exited = wait_for_exit(pid, || storing.is_finished());
        state.store(
            if exited.as_ref().is_ok_and(|&ok| ok) {
                EXITED_OK
            } else {
                EXITED_FAILED
            },
            Ordering::Release,
        );
        let stored = storing.join().expect("the store thread panicked");
        // Its standard error ends when it exits.
        let log = log.join().unwrap_or_default();
        (exited, log, stored)
    });
    if let Some(cancel) = src.cancel {
        cancel.finished();
    }
    let status = child.wait().map_err(|source| BackupError::Local {
        action: "wait for",
        path: "pg_basebackup".into(),
        source,
    })?;
    let remove = |pieces: &[Piece]| {
        for p in pieces {
            let _ = repo.delete(&p.key);
        }
        let _ = repo.remove_empty_dir(&format!("backup/{id}"));
    };
    if !status.success() || exited.is_err() {
        // Nothing of a failed backup stays behind: a schedule would
        // otherwise leave one empty directory per failure. (A failed
        // `store` removed what it had created itself.)
        remove(stored.as_deref().unwrap_or_default());
        if src.cancel.is_some_and(Cancel::is_cancelled) {
            return Err(BackupError::Cancelled);
        }
        if let Err(e) = stored {
            // The store failed first and pg_basebackup was stopped.
            return Err(e);
        }
        return Err(BackupError::Tool {
            tool: "pg_basebackup".into(),
            detail: format!("{status}: {}", log.trim()),
        });
    }
    let mut pieces = stored?;
    let described = (|| {
        // Another tablespace would be a tar of its own, which this backup
        // does not store: refused rather than silently left out.
        let mut others: Vec<String> = std::fs::read_dir(&out_dir)
            .map_err(|source| BackupError::Local {
                action: "read",
                path: out_dir.clone(),
                source,
            })?
            .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
            .filter(|n| n != "base.tar.zst" && n != "backup_manifest")
            .collect();
        if !others.is_empty() {
            others.sort();
            return Err(BackupError::Tool {
                tool: "pg_basebackup".into(),
                detail: format!(
                    "the backup has more than the main tablespace ({}); tablespaces are not supported",
                    others.join(", ")
                ),
            });
        }
        let path = out_dir.join("backup_manifest");
        let server = std::fs::read(&path).map_err(|source| BackupError::Local {
            action: "read",
            path,
            source,
        })?;
        let text = String::from_utf8_lossy(&server);
        let (start_lsn, timeline, stop_lsn) =
            parse_wal_range(&text).ok_or_else(|| BackupError::Tool {
                tool: "pg_basebackup".into(),
                detail: format!(
                    "no backup_manifest with a WAL range in its output: {}",
                    log.trim()
                ),
            })?;
        let content = content_size(&text);
        let data = zstd::bulk::Compressor::new(src.level)
            .and_then(|mut c| {
                c.include_checksum(true)?;
                c.compress(&server)
            })
            .map_err(|source| BackupError::Local {
                action: "compress",
                path: out_dir.join("backup_manifest"),
                source,
            })?;
        let mut stored = store(
            repo,
            &format!("backup/{id}/backup_manifest.zst"),
            &mut &data[..],
            max_object,
        )?;
        let manifest_file = stored_file("backup_manifest", server.len() as u64, &mut stored);
        Ok((content, manifest_file, start_lsn, timeline, stop_lsn))
    })();
    let (content, manifest_file, start_lsn, timeline, stop_lsn) = match described {
        Ok(d) => d,
        Err(e) => {
            // Not after the manifest's write is tried: one that failed
            // only in our eyes would then name removed pieces.
            remove(&pieces);
            return Err(e);
        }
    };
    drop(work);
    let mut tar = stored_file("base.tar", content, &mut pieces);
    tar.server_compressed = true;
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
        server_manifest: "backup_manifest".into(),
        files: vec![tar, manifest_file],
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    repo.create(&manifest_key(&id), &mut &json[..])?;
    Ok(manifest)
}

const RUNNING: u8 = 0;
const EXITED_OK: u8 = 1;
const EXITED_FAILED: u8 = 2;

/// Waits until the child `pid` exits, without reaping it (so that its pid
/// cannot be reused while [`Cancel`] may still signal it), and says
/// whether it succeeded. When `gave_up` turns true first (the store
/// failed), the child is stopped.
fn wait_for_exit(pid: nix::unistd::Pid, gave_up: impl Fn() -> bool) -> std::io::Result<bool> {
    use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
    let mut stopped = false;
    loop {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(Id::Pid(pid), flags) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code == 0 && !stopped),
            Ok(WaitStatus::Signaled(..)) => return Ok(false),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        if !stopped && gave_up() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            stopped = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// pg_basebackup's standard error: `-P` progress lines (`1234/5678 kB
/// (21%), ...`) go to `progress` as bytes, the rest is returned for error
/// messages.
fn read_log(stderr: impl Read, progress: &(dyn Fn(u64, u64) + Sync)) -> String {
    let mut log = String::new();
    for line in std::io::BufReader::new(stderr).split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line);
        for part in line.split('\r') {
            match progress_kb(part) {
                Some((done, total)) => {
                    progress(done.saturating_mul(1024), total.saturating_mul(1024))
                }
                None if part.trim().is_empty() => {}
                None => {
                    log.push_str(part);
                    log.push('\n');
                }
            }
        }
    }
    log
}

/// The kilobytes done and in all (the server's estimate) of a
/// pg_basebackup `-P` line.
fn progress_kb(line: &str) -> Option<(u64, u64)> {
    let (done, rest) = line.trim_start().split_once('/')?;
    let total = rest.split_once(" kB")?.0;
    if total.is_empty() || !total.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((done.parse().ok()?, total.parse().ok()?))
}

/// The sum of the file sizes a server `backup_manifest` lists: the
/// content of its tar, headers not counted.
fn content_size(server_manifest: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(server_manifest).unwrap_or_default();
    v.get("Files")
        .and_then(|f| f.as_array())
        .map(|files| files.iter().filter_map(|f| f.get("Size")?.as_u64()).sum())
        .unwrap_or(0)
}

/// A private directory for pg_basebackup's output (mode 0700 in the
/// temporary directory, `TMPDIR`), removed when dropped.
struct WorkDir {
    path: std::path::PathBuf,
}

impl WorkDir {
    fn create(id: &str) -> Result<WorkDir, BackupError> {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!(".pgha-backup-{id}-{}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| BackupError::Local {
                action: "create",
                path: path.clone(),
                source,
            })?;
        Ok(WorkDir { path })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Reads a file another process is still writing, to its end once that
/// process has exited (`state`): a failed writer is an error, so that a
/// truncated stream is never taken for a whole one. What was read is
/// released from the file (`FALLOC_FL_PUNCH_HOLE`, where the file system
/// has it), so that the file holds only what the repository has not taken
/// yet rather than the whole compressed backup.
struct Follow<'a> {
    path: std::path::PathBuf,
    file: Option<std::fs::File>,
    state: &'a AtomicU8,
    read: u64,
    /// Where the released part ends; `None` once the file system
    /// refused.
    released: Option<u64>,
    /// Bytes read between two releases.
    release_step: u64,
}

impl<'a> Follow<'a> {
    fn new(path: std::path::PathBuf, state: &'a AtomicU8) -> Self {
        Follow {
            path,
            file: None,
            state,
            read: 0,
            released: Some(0),
            release_step: 32 << 20,
        }
    }

    fn release(&mut self) {
        use std::os::fd::AsRawFd;
        let (Some(file), Some(released)) = (&self.file, self.released) else {
            return;
        };
        if self.read.saturating_sub(released) < self.release_step {
            return;
        }
        // SAFETY: fallocate only reads its integer arguments; the
        // descriptor is open for as long as `file` lives.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                self.read as libc::off_t,
            )
        };
        // Unsupported: the file keeps its blocks until it is removed.
        self.released = (rc == 0).then_some(self.read);
    }
}

impl Read for Follow<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let failed =
            || std::io::Error::other("pg_basebackup failed before its output was complete");
        loop {
            // The state before the read: a read that finds nothing after
            // the writer exited has reached the real end.
            let state = self.state.load(Ordering::Acquire);
            if state == EXITED_FAILED {
                return Err(failed());
            }
            if self.file.is_none() {
                // Read and write: punching a hole needs a descriptor open
                // for writing. Nothing is written through it.
                match std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&self.path)
                {
                    Ok(f) => self.file = Some(f),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && state == RUNNING => {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let n = self.file.as_mut().expect("opened").read(buf)?;
            if n > 0 || buf.is_empty() {
                self.read += n as u64;
                self.release();
                return Ok(n);
            }
            if state == EXITED_OK {
                return Ok(0);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
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
            server_compressed: false,
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
        server_compressed: false,
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
    if raw.bytes != f.stored_size || (total != f.size && !f.server_compressed) {
        return Err(corrupt(format!(
            "stored: {} bytes ({total} uncompressed), manifest says {} bytes ({} uncompressed)",
            raw.bytes, f.stored_size, f.size
        )));
    }
    Ok(())
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
                server_compressed: false,
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

    #[test]
    fn progress_lines_of_pg_basebackup() {
        assert_eq!(
            progress_kb("  1234/3070000 kB (0%), 0/1 tablespace"),
            Some((1234, 3_070_000))
        );
        assert_eq!(
            progress_kb("3070000/3070000 kB (100%), 1/1 tablespace (...base/5/1249)"),
            Some((3_070_000, 3_070_000))
        );
        assert_eq!(
            progress_kb("pg_basebackup: write-ahead log start point: 0/2000028 on timeline 1"),
            None
        );
        assert_eq!(progress_kb("0/2000028"), None);
        let seen = std::sync::Mutex::new(Vec::new());
        let log = read_log(
            &b"pg_basebackup: initiating base backup\n  10/20 kB (50%), 0/1 tablespace\n20/20 kB (100%), 1/1 tablespace\npg_basebackup: base backup completed\n"[..],
            &|n, total| seen.lock().unwrap().push((n, total)),
        );
        assert_eq!(
            *seen.lock().unwrap(),
            [(10 * 1024, 20 * 1024), (20 * 1024, 20 * 1024)]
        );
        assert_eq!(
            log,
            "pg_basebackup: initiating base backup\npg_basebackup: base backup completed\n"
        );
    }

    #[test]
    fn content_size_sums_the_servers_files() {
        let text = r#"{ "PostgreSQL-Backup-Manifest-Version": 1,
"Files": [
{ "Path": "PG_VERSION", "Size": 3, "Last-Modified": "x", "Checksum-Algorithm": "CRC32C", "Checksum": "a" },
{ "Path": "base/1/1249", "Size": 8192, "Last-Modified": "x" }
], "WAL-Ranges": [] }"#;
        assert_eq!(content_size(text), 8195);
        assert_eq!(content_size("not json"), 0);
    }

    #[test]
    fn a_followed_file_ends_when_its_writer_exits_and_fails_when_it_fails() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.zst");
        let content = noise(3 << 20);
        for outcome in [EXITED_OK, EXITED_FAILED] {
            let _ = std::fs::remove_file(&path);
            let state = AtomicU8::new(RUNNING);
            let (read, ()) = std::thread::scope(|scope| {
                let reader = scope.spawn(|| {
                    let mut out = Vec::new();
                    let mut follow = Follow::new(path.clone(), &state);
                    follow.release_step = 1 << 20;
                    follow.read_to_end(&mut out).map(|_| (out, follow.released))
                });
                // The file appears late and grows in steps.
                std::thread::sleep(std::time::Duration::from_millis(50));
                let mut f = std::fs::File::create(&path).unwrap();
                for part in content.chunks(1 << 20) {
                    f.write_all(part).unwrap();
                    std::thread::sleep(std::time::Duration::from_millis(30));
                }
                state.store(outcome, Ordering::Release);
                (reader.join().unwrap(), ())
            });
            if outcome == EXITED_OK {
                let (read, released) = read.unwrap();
                assert!(read == content, "the whole file, in order");
                // What was read is no longer on disk, where the file
                // system can release it (ext4, xfs, tmpfs can).
                if let Some(released) = released {
                    use std::os::unix::fs::MetadataExt;
                    assert!(released >= 2 << 20, "{released}");
                    let blocks = std::fs::metadata(&path).unwrap().blocks() * 512;
                    assert!(blocks <= content.len() as u64 - released, "{blocks}");
                }
            } else {
                assert!(read.is_err());
            }
        }
        // A writer that exits without having written anything.
        let state = AtomicU8::new(EXITED_OK);
        let mut out = Vec::new();
        let err = Follow::new(dir.path().join("never"), &state)
            .read_to_end(&mut out)
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
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
            server_compressed: false,
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
