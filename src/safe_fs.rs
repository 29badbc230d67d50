//! File operations of an agent that may run as root, in directories that
//! an untrusted account may be able to change.
//!
//! When the agent is root, PostgreSQL runs as `postgres.os_user`, and that
//! account is untrusted: a database superuser reaches it with
//! `COPY ... TO PROGRAM`. Anything it can write, it can turn into a
//! symlink. A root process that opens, chmods or chowns *paths* inside such
//! a directory can be made to write, or hand over, any file of the system.
//!
//! So every directory the agent writes into is opened once, as a
//! [`TrustedDir`]: the last component is opened with `O_NOFOLLOW`, the
//! descriptor is checked to be a directory of the expected owner, and every
//! later operation is relative to that descriptor (`openat`, `renameat`,
//! `unlinkat`). Files are created under a fresh name with
//! `O_CREAT | O_EXCL | O_NOFOLLOW`, get their owner and mode through the
//! descriptor before any content is written, and are renamed into place:
//! a symlink planted at the final name is replaced, never followed.
//!
//! An earlier path component may still be a symlink the untrusted account
//! planted; what that can achieve is bounded by the owner check: the agent
//! only ever writes into a directory that already belongs to the account
//! the file is for, or into a directory it just created itself.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::{Gid, Uid};

/// Who a directory (and every file created in it) belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    /// The account this process runs as.
    pub fn current() -> Owner {
        Owner {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SafeFsError {
    #[error("{path} is a symbolic link; pgha does not follow links here")]
    Symlink { path: PathBuf },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("{path} belongs to uid {found}, but pgha needs it to belong to uid {expected}{hint}")]
    WrongOwner {
        path: PathBuf,
        found: u32,
        expected: u32,
        hint: &'static str,
    },
    #[error("{path} is writable by group or others (mode {mode:o}); pgha needs it private")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads at most `max` bytes of a file the PostgreSQL account can write
/// (`postmaster.pid`, the server log): from its start, or its last `max`
/// bytes with `tail`. The last component is never followed as a symlink,
/// and anything but a regular file is refused, so a link to `/dev/zero` or
/// a FIFO planted in its place can neither exhaust nor hang the (root)
/// reader. `None` when it cannot be read so.
pub fn read_untrusted(path: &Path, max: u64, tail: bool) -> Option<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    if tail {
        file.seek(SeekFrom::Start(meta.len().saturating_sub(max)))
            .ok()?;
    }
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(Errno) -> SafeFsError {
    let path = path.to_path_buf();
    move |e| SafeFsError::Io {
        action,
        path,
        source: std::io::Error::from(e),
    }
}

/// How strictly an existing directory is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strictness {
    /// The directory must belong to the owner; nothing more (a data
    /// directory: PostgreSQL itself decides which modes it accepts).
    OwnerOnly,
    /// Also refuse group or other write permission: the directory holds
    /// files safety depends on (fence state, former-primary mark).
    Private,
}

/// A directory opened without following a symlink, checked, and used only
/// through its descriptor.
#[derive(Debug)]
pub struct TrustedDir {
    fd: OwnedFd,
    path: PathBuf,
    owner: Owner,
}

/// Names of temporary files: unique within the process, so that two writes
/// never share one, and unpredictable enough not to be pre-planted in bulk.
fn temp_name(name: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        ".{name}.{}.{}.pgha-tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn open_dir_nofollow(dirfd: Option<BorrowedFd<'_>>, name: &Path) -> Result<OwnedFd, Errno> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
    match dirfd {
        Some(d) => nix::fcntl::openat(d, name, flags, Mode::empty()),
        None => nix::fcntl::open(name, flags, Mode::empty()),
    }
}

/// Creates the directory `name` in `parent`, owned by `owner` with `mode`,
/// and returns its descriptor; `None` when `name` already exists.
///
/// The directory is made under a temporary name, handed to `owner`, and
/// only then renamed into place without replacing anything. So `name` never
/// exists, even for an instant, with another owner: several agents of one
/// host that share a directory (a backup repository) may start at once, and
/// one that found the directory between another's `mkdir` and `chown`
/// would refuse it as someone else's. A link planted at `name` makes the
/// rename fail with `EEXIST`, and the caller's open then refuses it.
pub(crate) fn mkdir_owned_at(
    parent: BorrowedFd<'_>,
    name: &Path,
    path: &Path,
    owner: Owner,
    mode: u32,
) -> Result<Option<OwnedFd>, SafeFsError> {
    let tmp = temp_name(&name.to_string_lossy());
    let private = Mode::from_bits_truncate(0o700);
    nix::sys::stat::mkdirat(parent, tmp.as_str(), private).map_err(io_err("create", path))?;
    let remove_tmp = || {
        let _ = nix::unistd::unlinkat(parent, tmp.as_str(), nix::unistd::UnlinkatFlags::RemoveDir);
    };
    let prepared = open_dir_nofollow(Some(parent), Path::new(&tmp))
        .map_err(|e| classify_open(e, path))
        .and_then(|fd| set_owner_and_mode(fd.as_fd(), path, owner, mode).map(|()| fd));
    let fd = match prepared {
        Ok(fd) => fd,
        Err(e) => {
            remove_tmp();
            return Err(e);
        }
    };
    match nix::fcntl::renameat2(
        parent,
        tmp.as_str(),
        parent,
        name,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    ) {
        Ok(()) => Ok(Some(fd)),
        Err(Errno::EEXIST) => {
            remove_tmp();
            Ok(None)
        }
        // A file system without RENAME_NOREPLACE: create in place; a
        // concurrent opener may then briefly see the directory as ours
        // before the owner is set, which is what the rename avoids.
        Err(Errno::EINVAL | Errno::ENOSYS) => {
            remove_tmp();
            match nix::sys::stat::mkdirat(parent, name, private) {
                Ok(()) => {
                    let fd = open_dir_nofollow(Some(parent), name)
                        .map_err(|e| classify_open(e, path))?;
                    set_owner_and_mode(fd.as_fd(), path, owner, mode)?;
                    Ok(Some(fd))
                }
                Err(Errno::EEXIST) => Ok(None),
                Err(e) => Err(io_err("create", path)(e)),
            }
        }
        Err(e) => {
            remove_tmp();
            Err(io_err("rename into place", path)(e))
        }
    }
}

fn is_dir(st: &FileStat) -> bool {
    (st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR.bits()
}

fn is_regular(st: &FileStat) -> bool {
    (st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG.bits()
}

impl TrustedDir {
    /// Creates the directory `path` if it does not exist (its parents as
    /// ordinary directories of the current account), then opens it.
    ///
    /// A directory created here gets `owner` and `mode` through its
    /// descriptor. An existing one must already belong to `owner`: pgha
    /// never takes over a directory someone else made, since it cannot know
    /// what that account left inside. With [`Strictness::Private`] its mode
    /// is also tightened to `mode` (it is ours) after checking that nobody
    /// else could write it.
    pub fn create(
        path: &Path,
        owner: Owner,
        mode: u32,
        strictness: Strictness,
    ) -> Result<TrustedDir, SafeFsError> {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|source| SafeFsError::Io {
                action: "create",
                path: parent.to_path_buf(),
                source,
            })?;
        }
        if let Some(name) = path.file_name() {
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            // The parent is opened as the path says (it may be a link such
            // as /tmp); only the last component is ours to create.
            let parent_fd = nix::fcntl::open(
                parent,
                OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(io_err("open", parent))?;
            if let Some(fd) = mkdir_owned_at(parent_fd.as_fd(), Path::new(name), path, owner, mode)?
            {
                return Ok(TrustedDir {
                    fd,
                    path: path.to_path_buf(),
                    owner,
                });
            }
            return Self::open_checked(path, owner, mode, strictness);
        }
        // A path without a last component ("/", ".."): it exists already.
        Self::open_checked(path, owner, mode, strictness)
    }

    /// Opens an existing directory with the same checks as [`create`](Self::create).
    pub fn open(
        path: &Path,
        owner: Owner,
        strictness: Strictness,
    ) -> Result<TrustedDir, SafeFsError> {
        let fd = open_dir_nofollow(None, path).map_err(|e| classify_open(e, path))?;
        let st = nix::sys::stat::fstat(&fd).map_err(io_err("inspect", path))?;
        check_dir(&st, path, owner, strictness)?;
        Ok(TrustedDir {
            fd,
            path: path.to_path_buf(),
            owner,
        })
    }

    fn open_checked(
        path: &Path,
        owner: Owner,
        mode: u32,
        strictness: Strictness,
    ) -> Result<TrustedDir, SafeFsError> {
        let fd = open_dir_nofollow(None, path).map_err(|e| classify_open(e, path))?;
        Self::finish(fd, path.to_path_buf(), owner, mode, strictness)
    }

    fn finish(
        fd: OwnedFd,
        path: PathBuf,
        owner: Owner,
        mode: u32,
        strictness: Strictness,
    ) -> Result<TrustedDir, SafeFsError> {
        let st = nix::sys::stat::fstat(&fd).map_err(io_err("inspect", &path))?;
        if !is_dir(&st) {
            return Err(SafeFsError::NotADirectory { path });
        }
        check_dir(&st, &path, owner, strictness)?;
        if strictness == Strictness::Private && st.st_mode & 0o7777 != mode {
            nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(mode))
                .map_err(io_err("set the mode of", &path))?;
        }
        Ok(TrustedDir { fd, path, owner })
    }

    /// Creates (if missing) and opens the subdirectory `name`, owned by
    /// `owner`.
    pub fn subdir(
        &self,
        name: &str,
        owner: Owner,
        mode: u32,
        strictness: Strictness,
    ) -> Result<TrustedDir, SafeFsError> {
        let path = self.path.join(name);
        if let Some(fd) = mkdir_owned_at(self.fd.as_fd(), Path::new(name), &path, owner, mode)? {
            return Ok(TrustedDir { fd, path, owner });
        }
        let fd = open_dir_nofollow(Some(self.fd.as_fd()), Path::new(name))
            .map_err(|e| classify_open(e, &path))?;
        Self::finish(fd, path, owner, mode, strictness)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` inside this directory, for messages and for
    /// handing to other programs (which then run as the owner).
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// A second descriptor for the same directory (for a child process).
    pub fn try_clone_fd(&self) -> std::io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// Wraps a directory descriptor inherited from the parent process and
    /// checks it again.
    pub fn from_fd(
        fd: OwnedFd,
        path: PathBuf,
        owner: Owner,
        strictness: Strictness,
    ) -> Result<TrustedDir, SafeFsError> {
        let st = nix::sys::stat::fstat(&fd).map_err(io_err("inspect", &path))?;
        check_dir(&st, &path, owner, strictness)?;
        Ok(TrustedDir { fd, path, owner })
    }

    /// Replaces `name` atomically with `contents`, owned by the directory's
    /// owner with exactly `mode`. Not synced to disk: see
    /// [`write_durable`](Self::write_durable).
    pub fn write(&self, name: &str, contents: &[u8], mode: u32) -> Result<(), SafeFsError> {
        self.write_inner(name, contents, mode, false)
    }

    /// Like [`write`](Self::write), and on disk before it returns (file and
    /// directory synced): for marks that must survive a power loss.
    pub fn write_durable(&self, name: &str, contents: &[u8], mode: u32) -> Result<(), SafeFsError> {
        self.write_inner(name, contents, mode, true)
    }

    fn write_inner(
        &self,
        name: &str,
        contents: &[u8],
        mode: u32,
        durable: bool,
    ) -> Result<(), SafeFsError> {
        let path = self.path.join(name);
        let tmp = temp_name(name);
        let fd = nix::fcntl::openat(
            &self.fd,
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )
        .map_err(io_err("create a temporary file for", &path))?;
        let result = (|| {
            set_owner_and_mode(fd.as_fd(), &path, self.owner, mode)?;
            let mut file = File::from(fd);
            file.write_all(contents).map_err(|source| SafeFsError::Io {
                action: "write",
                path: path.clone(),
                source,
            })?;
            if durable {
                file.sync_all().map_err(|source| SafeFsError::Io {
                    action: "sync",
                    path: path.clone(),
                    source,
                })?;
            }
            drop(file);
            nix::fcntl::renameat(&self.fd, tmp.as_str(), &self.fd, name)
                .map_err(io_err("rename into place", &path))?;
            if durable {
                nix::unistd::fsync(&self.fd).map_err(io_err("sync the directory of", &path))?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = nix::unistd::unlinkat(
                &self.fd,
                tmp.as_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
        result
    }

    /// Renames `from` to `to` inside this directory (a symlink is renamed
    /// as a link, never followed).
    pub fn rename(&self, from: &str, to: &str) -> Result<(), SafeFsError> {
        nix::fcntl::renameat(&self.fd, from, &self.fd, to)
            .map_err(io_err("rename", &self.path.join(from)))
    }

    /// Reads `name` if it is a regular file; `None` when it does not exist.
    /// A symlink or anything else is an error, never followed.
    pub fn read_to_string(&self, name: &str) -> Result<Option<String>, SafeFsError> {
        let path = self.path.join(name);
        let fd = match nix::fcntl::openat(
            &self.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::ELOOP) => return Err(SafeFsError::Symlink { path }),
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        let st = nix::sys::stat::fstat(&fd).map_err(io_err("inspect", &path))?;
        if !is_regular(&st) {
            return Err(SafeFsError::NotAFile { path });
        }
        let mut text = String::new();
        std::io::Read::read_to_string(&mut File::from(fd), &mut text).map_err(|source| {
            SafeFsError::Io {
                action: "read",
                path,
                source,
            }
        })?;
        Ok(Some(text))
    }

    /// Whether `name` exists as a regular file (a symlink does not count).
    pub fn is_file(&self, name: &str) -> Result<bool, SafeFsError> {
        match nix::sys::stat::fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if is_regular(&st) => Ok(true),
            Ok(_) => Err(SafeFsError::NotAFile {
                path: self.path.join(name),
            }),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(io_err("inspect", &self.path.join(name))(e)),
        }
    }

    /// Removes the entry `name` (a symlink is removed, not followed).
    /// Missing is fine.
    pub fn remove(&self, name: &str) -> Result<(), SafeFsError> {
        match nix::unistd::unlinkat(&self.fd, name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(io_err("remove", &self.path.join(name))(e)),
        }
    }

    /// Opens `name` for appending (created with `mode` when missing), for
    /// logs. Refuses a symlink or a file of another owner.
    pub fn open_append(&self, name: &str, mode: u32) -> Result<File, SafeFsError> {
        self.open_file(name, mode, OFlag::O_WRONLY | OFlag::O_APPEND)
    }

    /// Opens `name` for reading and writing without truncating (created
    /// with `mode` when missing), for lock files.
    pub fn open_rw(&self, name: &str, mode: u32) -> Result<File, SafeFsError> {
        self.open_file(name, mode, OFlag::O_RDWR)
    }

    fn open_file(&self, name: &str, mode: u32, access: OFlag) -> Result<File, SafeFsError> {
        let path = self.path.join(name);
        let fd = nix::fcntl::openat(
            &self.fd,
            name,
            access | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::from_bits_truncate(mode),
        )
        .map_err(|e| match e {
            Errno::ELOOP => SafeFsError::Symlink { path: path.clone() },
            e => io_err("open", &path)(e),
        })?;
        let st = nix::sys::stat::fstat(&fd).map_err(io_err("inspect", &path))?;
        if !is_regular(&st) {
            return Err(SafeFsError::NotAFile { path });
        }
        if st.st_uid != self.owner.uid {
            // Created just now by this process as root for another owner,
            // or left by someone else: give it to the owner only if we
            // created it (it then belongs to us).
            if st.st_uid != Owner::current().uid {
                return Err(SafeFsError::WrongOwner {
                    path,
                    found: st.st_uid,
                    expected: self.owner.uid,
                    hint: "",
                });
            }
            set_owner_and_mode(fd.as_fd(), &path, self.owner, mode)?;
        }
        // Clear O_NONBLOCK (only there so a FIFO could not block the open).
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(access))
            .map_err(io_err("open", &path))?;
        Ok(File::from(fd))
    }
}

fn classify_open(e: Errno, path: &Path) -> SafeFsError {
    match e {
        // O_DIRECTORY | O_NOFOLLOW on a symlink fails with ENOTDIR (or
        // ELOOP); look again only to name the problem right.
        Errno::ELOOP | Errno::ENOTDIR
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) =>
        {
            SafeFsError::Symlink {
                path: path.to_path_buf(),
            }
        }
        Errno::ELOOP | Errno::ENOTDIR => SafeFsError::NotADirectory {
            path: path.to_path_buf(),
        },
        e => io_err("open", path)(e),
    }
}

fn check_dir(
    st: &FileStat,
    path: &Path,
    owner: Owner,
    strictness: Strictness,
) -> Result<(), SafeFsError> {
    if !is_dir(st) {
        return Err(SafeFsError::NotADirectory {
            path: path.to_path_buf(),
        });
    }
    if st.st_uid != owner.uid {
        return Err(SafeFsError::WrongOwner {
            path: path.to_path_buf(),
            found: st.st_uid,
            expected: owner.uid,
            hint: if strictness == Strictness::Private {
                "; it holds the fence state and the former-primary mark, which the PostgreSQL OS \
                 user must not be able to change (move it away and let pgha create it)"
            } else {
                "; chown it, or remove it and let pgha create it"
            },
        });
    }
    if strictness == Strictness::Private && st.st_mode & 0o022 != 0 {
        return Err(SafeFsError::TooOpen {
            path: path.to_path_buf(),
            mode: st.st_mode & 0o7777,
        });
    }
    Ok(())
}

/// Sets owner and mode through the descriptor (never through the path).
fn set_owner_and_mode(
    fd: BorrowedFd<'_>,
    path: &Path,
    owner: Owner,
    mode: u32,
) -> Result<(), SafeFsError> {
    if owner != Owner::current() {
        nix::unistd::fchown(
            fd,
            Some(Uid::from_raw(owner.uid)),
            Some(Gid::from_raw(owner.gid)),
        )
        .map_err(io_err("set the owner of", path))?;
    }
    // Exactly `mode`, whatever the umask took away at creation.
    nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(mode))
        .map_err(io_err("set the mode of", path))
}

#[cfg(test)]
#[path = "safe_fs_test.rs"]
mod tests;
