//! Where backups and archived WAL are kept: a small trait, so that an object
//! store can stand beside the directory implementation, and the directory
//! (local disk or NFS) implementation itself.
//!
//! The trait has only what a content-addressed repository needs: list a
//! directory, read an object, create an object that does not exist yet
//! (never replace one), and delete (retention only). Keys are `/`-separated
//! relative paths built by [`super::naming`]; the implementation refuses any
//! other shape, so a key can never leave the repository.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid, UnlinkatFlags};

use crate::safe_fs::{Owner, mkdir_owned_at};

/// What went wrong, with the object named.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{key}: not found in the repository {repo}")]
    NotFound { repo: String, key: String },
    #[error("cannot {action} {key} in the repository {repo}")]
    Io {
        repo: String,
        action: &'static str,
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the repository {repo} does not exist (not mounted?); pgha never creates it here, so WAL cannot end up on the wrong disk"
    )]
    Missing { repo: String },
    #[error("{key}: not a valid repository key")]
    BadKey { key: String },
}

/// The outcome of [`Repository::create`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    /// Stored; the object's size in bytes.
    New { bytes: u64 },
    /// An object with this key already existed and was left alone.
    Existed,
}

pub trait Repository: Send + Sync {
    /// Where the repository is, for messages.
    fn location(&self) -> String;
    /// Names of the objects (and sub-directories) directly under `dir`,
    /// without hidden (`.`) names; empty when `dir` does not exist.
    fn list(&self, dir: &str) -> Result<Vec<String>, RepoError>;
    /// A reader over the object `key`.
    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>, RepoError>;
    /// Stores everything `src` yields under `key`, atomically (readers see
    /// the whole object or none) and durably (on disk before it returns),
    /// unless `key` already exists, in which case nothing is changed.
    fn create(&self, key: &str, src: &mut dyn Read) -> Result<Created, RepoError>;
    /// Removes `key` (retention only); a missing key is not an error.
    fn delete(&self, key: &str) -> Result<(), RepoError>;

    /// The largest object [`Repository::create`] stores with its
    /// guarantees; `None` for no limit. Base backups are split into
    /// objects of at most this size.
    fn max_object_size(&self) -> Option<u64> {
        None
    }

    /// Removes the directory `dir` if it is empty (retention, after the
    /// objects of a backup are gone); stores without directories do nothing.
    fn remove_empty_dir(&self, _dir: &str) -> Result<(), RepoError> {
        Ok(())
    }

    /// Reads all of `key`.
    fn read(&self, key: &str) -> Result<Vec<u8>, RepoError> {
        let mut out = Vec::new();
        self.open(key)?
            .read_to_end(&mut out)
            .map_err(|source| RepoError::Io {
                repo: self.location(),
                action: "read",
                key: key.into(),
                source,
            })?;
        Ok(out)
    }
}

/// Only keys that [`super::naming`] builds: relative, no `.`/`..`
/// components, no empty components, printable ASCII without spaces.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('/')
        && key.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && !c.starts_with('.')
                && c.bytes().all(|b| b.is_ascii_graphic() && b != b'\\')
        })
}

/// A repository in a directory.
///
/// Atomic creation: the content goes to a hidden temporary file in the
/// target directory (`O_EXCL | O_NOFOLLOW`), is fsynced, then hard-linked to
/// its key; `link` fails when the key exists, so an object is never
/// replaced, even by a racing writer. The directory is fsynced after the
/// link so that the new name survives a power loss (PostgreSQL deletes its
/// segment as soon as `archive_command` returns 0).
#[derive(Clone, Debug)]
pub struct DirRepository {
    root: PathBuf,
}

impl DirRepository {
    pub fn new(root: impl Into<PathBuf>) -> DirRepository {
        DirRepository { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn io(&self, action: &'static str, key: &str) -> impl FnOnce(std::io::Error) -> RepoError {
        let repo = self.location();
        let key = key.to_string();
        move |source| RepoError::Io {
            repo,
            action,
            key,
            source,
        }
    }

    fn errno(&self, action: &'static str, key: &str) -> impl FnOnce(Errno) -> RepoError {
        let io = self.io(action, key);
        move |e| io(std::io::Error::from(e))
    }

    /// The repository's root directory, opened; `Missing` when it is not
    /// there (pgha never creates it here). The configured path itself may
    /// be a symlink (to a mount, say): it is the operator's, not the
    /// PostgreSQL account's; only what is inside is walked without
    /// following links.
    fn open_root(&self) -> Result<OwnedFd, RepoError> {
        let flags = OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
        match nix::fcntl::open(&self.root, flags, Mode::empty()) {
            Ok(fd) => Ok(fd),
            Err(Errno::ENOENT) => Err(RepoError::Missing {
                repo: self.location(),
            }),
            Err(e) => Err(self.errno("open", "")(e)),
        }
    }

    /// The directory that holds `key`'s last component. Reached from the
    /// root one component at a time through descriptors, never following
    /// a symlink: the repository belongs to the PostgreSQL account, and
    /// pgha may run as root (`pgha backup`, the agent's scheduled
    /// backups), which must not be steered out of the repository by a link
    /// planted inside it. With `create`, missing directories are made, each
    /// synced into its parent so that a crash cannot lose a directory an
    /// object was linked into. As root they are made under a hidden name,
    /// handed to the owner of the root and only then renamed into place:
    /// that account's own processes (`archive_command`, a replica starting
    /// from a backup) must never find a directory of the repository that
    /// is root's. `None` when a directory is missing and `create` is false.
    fn parent_of<'k>(&self, key: &'k str, create: bool) -> Result<Option<Parent<'k>>, RepoError> {
        if !valid_key(key) {
            return Err(RepoError::BadKey { key: key.into() });
        }
        let mut dir = self.open_root()?;
        let owner = if create { root_owner(&dir) } else { None };
        let (dirs, name) = key.rsplit_once('/').unwrap_or(("", key));
        let mut path = self.root.clone();
        for c in dirs.split('/').filter(|c| !c.is_empty()) {
            path.push(c);
            let made = if create {
                self.mkdir(&dir, c, &path, owner, key)?
            } else {
                None
            };
            let next = match made {
                Some(fd) => {
                    nix::unistd::fsync(&dir).map_err(self.errno("sync the directory of", key))?;
                    fd
                }
                None => match nix::fcntl::openat(&dir, c, DIR_FLAGS, Mode::empty()) {
                    Ok(fd) => fd,
                    Err(Errno::ENOENT) if !create => return Ok(None),
                    Err(e) => return Err(self.errno("open the directory of", key)(e)),
                },
            };
            dir = next;
        }
        Ok(Some(Parent { dir, name, owner }))
    }

    /// Makes the directory `name` in `parent`; `None` when it exists.
    fn mkdir(
        &self,
        parent: &OwnedFd,
        name: &str,
        path: &Path,
        owner: Option<Owner>,
        key: &str,
    ) -> Result<Option<OwnedFd>, RepoError> {
        let mode = Mode::from_bits_truncate(DIR_MODE);
        match owner {
            Some(owner) => mkdir_owned_at(parent.as_fd(), Path::new(name), path, owner, DIR_MODE)
                .map_err(|e| RepoError::Io {
                    repo: self.location(),
                    action: "create the directory of",
                    key: key.into(),
                    source: std::io::Error::other(e),
                }),
            None => match nix::sys::stat::mkdirat(parent, name, mode) {
                Ok(()) => nix::fcntl::openat(parent, name, DIR_FLAGS, Mode::empty())
                    .map(Some)
                    .map_err(self.errno("open the directory of", key)),
                Err(Errno::EEXIST) => Ok(None),
                Err(e) => Err(self.errno("create the directory of", key)(e)),
            },
        }
    }
}

/// Where [`DirRepository::parent_of`] arrived.
struct Parent<'k> {
    dir: OwnedFd,
    /// The key's last component.
    name: &'k str,
    /// Who what is created there belongs to, when pgha runs as root.
    owner: Option<Owner>,
}

const DIR_MODE: u32 = 0o750;

/// Directories are opened without following a symlink at any step.
const DIR_FLAGS: OFlag = OFlag::O_DIRECTORY
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC)
    .union(OFlag::O_RDONLY);

/// As root, whatever is created belongs to the owner of the repository's
/// root directory (the PostgreSQL account, which archives into it): that
/// account must be able to read base backups, to start a replica from
/// one, and to expire them. `None` when not root, or when root owns it.
fn root_owner(root: &OwnedFd) -> Option<Owner> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let st = nix::sys::stat::fstat(root).ok()?;
    (st.st_uid != 0).then_some(Owner {
        uid: st.st_uid,
        gid: st.st_gid,
    })
}

pub(super) fn temp_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl Repository for DirRepository {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn list(&self, dir: &str) -> Result<Vec<String>, RepoError> {
        let fd = if dir.is_empty() {
            self.open_root()?
        } else {
            // `dir` is a key whose last component is the directory.
            let Some(Parent {
                dir: parent, name, ..
            }) = self.parent_of(dir, false)?
            else {
                return Ok(Vec::new());
            };
            match nix::fcntl::openat(&parent, name, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => return Ok(Vec::new()),
                Err(e) => return Err(self.errno("list", dir)(e)),
            }
        };
        let mut names = Vec::new();
        let listing = nix::dir::Dir::from_fd(fd).map_err(self.errno("list", dir))?;
        for entry in listing {
            let entry = entry.map_err(self.errno("list", dir))?;
            let name = entry.file_name().to_bytes();
            // `.` and `..`, and the hidden names of objects and
            // directories being created (or left by a crash), which are
            // not keys: whoever walks the listing would trip over them.
            if name.starts_with(b".") {
                continue;
            }
            if let Ok(name) = std::str::from_utf8(name) {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>, RepoError> {
        let not_found = || RepoError::NotFound {
            repo: self.location(),
            key: key.into(),
        };
        let Some(Parent { dir, name, .. }) = self.parent_of(key, false)? else {
            return Err(not_found());
        };
        let fd = match nix::fcntl::openat(
            &dir,
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Err(not_found()),
            Err(e) => return Err(self.errno("open", key)(e)),
        };
        Ok(Box::new(std::io::BufReader::with_capacity(
            1 << 20,
            File::from(fd),
        )))
    }

    fn create(&self, key: &str, src: &mut dyn Read) -> Result<Created, RepoError> {
        let Parent { dir, name, owner } = self.parent_of(key, true)?.expect("created");
        let exists = nix::sys::stat::fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW);
        if exists.is_ok() {
            return Ok(Created::Existed);
        }
        let tmp = format!(".{name}.{}.tmp", temp_suffix());
        let result = (|| {
            let fd = nix::fcntl::openat(
                &dir,
                tmp.as_str(),
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o640),
            )
            .map_err(self.errno("create a temporary file for", key))?;
            if let Some(o) = owner {
                nix::unistd::fchown(&fd, Some(Uid::from_raw(o.uid)), Some(Gid::from_raw(o.gid)))
                    .map_err(self.errno("hand to the repository's owner", key))?;
            }
            let mut file = File::from(fd);
            let bytes = {
                let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut file);
                let n = std::io::copy(src, &mut w).map_err(self.io("write", key))?;
                w.flush().map_err(self.io("write", key))?;
                n
            };
            file.sync_all().map_err(self.io("sync", key))?;
            drop(file);
            match nix::unistd::linkat(&dir, tmp.as_str(), &dir, name, AtFlags::empty()) {
                Ok(()) => {}
                Err(Errno::EEXIST) => return Ok(Created::Existed),
                Err(e) => return Err(self.errno("store", key)(e)),
            }
            nix::unistd::fsync(&dir).map_err(self.errno("sync the directory of", key))?;
            Ok(Created::New { bytes })
        })();
        let _ = nix::unistd::unlinkat(&dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        result
    }

    fn delete(&self, key: &str) -> Result<(), RepoError> {
        let Some(Parent { dir, name, .. }) = self.parent_of(key, false)? else {
            return Ok(());
        };
        match nix::unistd::unlinkat(&dir, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(self.errno("delete", key)(e)),
        }
    }

    fn remove_empty_dir(&self, dir: &str) -> Result<(), RepoError> {
        let Some(Parent {
            dir: parent, name, ..
        }) = self.parent_of(dir, false)?
        else {
            return Ok(());
        };
        match nix::unistd::unlinkat(&parent, name, UnlinkatFlags::RemoveDir) {
            // Not empty (a stray file) or already gone: leave it.
            Ok(()) | Err(Errno::ENOENT | Errno::ENOTEMPTY | Errno::EEXIST) => Ok(()),
            Err(e) => Err(self.errno("remove the directory", dir)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_leave_the_repository() {
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "a//b",
            "./a",
            "a/.hidden",
            "a b",
        ] {
            assert!(!valid_key(bad), "{bad:?}");
        }
        assert!(valid_key(
            "archive/00000001/000000010000000000000001.ab.zst"
        ));
        let repo = DirRepository::new("/nonexistent");
        assert!(matches!(repo.open("../x"), Err(RepoError::BadKey { .. })));
    }

    #[test]
    fn links_planted_in_the_repository_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("victim"), b"keep me").unwrap();
        let root = dir.path().join("repo");
        std::fs::create_dir(&root).unwrap();
        // The repository's owner replaces a directory with a link out.
        std::os::unix::fs::symlink(outside.path(), root.join("backup")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("victim"), root.join("file")).unwrap();
        // The configured path may itself be a link (to a mount).
        let link = dir.path().join("repo-link");
        std::os::unix::fs::symlink(&root, &link).unwrap();
        let repo = DirRepository::new(&link);
        repo.delete("backup/victim").unwrap_err();
        repo.create("backup/new", &mut &b"x"[..]).unwrap_err();
        assert!(repo.list("backup").is_err());
        assert!(repo.open("backup/victim").is_err());
        assert!(repo.open("file").is_err());
        repo.delete("file").unwrap();
        assert_eq!(
            std::fs::read(outside.path().join("victim")).unwrap(),
            b"keep me",
            "nothing outside the repository was touched"
        );
        assert!(!outside.path().join("new").exists());
        // Reading a key under missing directories creates nothing.
        assert!(repo.open("archive/00000001/x").is_err());
        assert!(repo.list("archive/00000001").unwrap().is_empty());
        repo.delete("archive/00000001/x").unwrap();
        assert!(!root.join("archive").exists());
        // Deleting the link named `file` removed the link, not its target.
        assert!(std::fs::symlink_metadata(root.join("file")).is_err());
    }

    #[test]
    fn objects_created_as_root_belong_to_the_repositorys_owner() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        std::fs::create_dir(&root).unwrap();
        let (uid, gid) = (4242, 4343);
        std::os::unix::fs::chown(&root, Some(uid), Some(gid)).unwrap();
        let repo = DirRepository::new(&root);
        repo.create("backup/x/f", &mut &b"data"[..]).unwrap();
        for p in ["backup", "backup/x", "backup/x/f"] {
            let meta = std::fs::symlink_metadata(root.join(p)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (uid, gid), "{p}");
            assert_eq!(
                meta.mode() & 0o777,
                if p.ends_with('f') { 0o640 } else { 0o750 },
                "{p}"
            );
        }
    }

    /// A directory made as root appears at its name only by a rename of
    /// one already handed to the repository's owner: the PostgreSQL
    /// account never finds a directory of the repository that is root's
    /// (and that it then could not write into).
    #[test]
    fn directories_made_as_root_are_never_roots_under_their_name() {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        std::fs::create_dir(&root).unwrap();
        std::os::unix::fs::chown(&root, Some(4242), Some(4343)).unwrap();
        let watch = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
        watch
            .add_watch(&root, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
            .unwrap();
        let repo = DirRepository::new(&root);
        repo.create("backup/f", &mut &b"data"[..]).unwrap();
        let events: Vec<(AddWatchFlags, String)> = watch
            .read_events()
            .unwrap()
            .into_iter()
            .map(|e| {
                let name = e.name.unwrap().to_string_lossy().into_owned();
                (e.mask, name)
            })
            .collect();
        assert!(
            events
                .iter()
                .all(|(m, n)| n != "backup" || !m.contains(AddWatchFlags::IN_CREATE)),
            "made in place: {events:?}"
        );
        assert!(
            events
                .iter()
                .any(|(m, n)| n == "backup" && m.contains(AddWatchFlags::IN_MOVED_TO)),
            "{events:?}"
        );
        assert_eq!(std::fs::metadata(root.join("backup")).unwrap().uid(), 4242);
    }

    #[test]
    fn create_never_replaces_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let repo = DirRepository::new(dir.path());
        assert_eq!(
            repo.create("a/b/obj", &mut &b"first"[..]).unwrap(),
            Created::New { bytes: 5 }
        );
        assert_eq!(
            repo.create("a/b/obj", &mut &b"second"[..]).unwrap(),
            Created::Existed
        );
        assert_eq!(repo.read("a/b/obj").unwrap(), b"first");
        assert_eq!(repo.list("a/b").unwrap(), ["obj"]);
        assert_eq!(repo.list("missing").unwrap(), Vec::<String>::new());
        assert!(matches!(
            repo.read("a/b/none"),
            Err(RepoError::NotFound { .. })
        ));
        repo.delete("a/b/obj").unwrap();
        repo.delete("a/b/obj").unwrap();
        assert!(repo.list("a/b").unwrap().is_empty());
        let on_disk = |d: &str| -> Vec<String> {
            std::fs::read_dir(dir.path().join(d))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(on_disk(""), ["a"], "no temporary directory left");
        assert_eq!(
            on_disk("a/b"),
            Vec::<String>::new(),
            "no temporary file left"
        );
        repo.remove_empty_dir("a/b").unwrap();
        assert!(repo.list("a").unwrap().is_empty());
    }

    #[test]
    fn a_failed_write_leaves_nothing_behind() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk full"))
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let repo = DirRepository::new(dir.path());
        let err = repo.create("x/obj", &mut Failing).unwrap_err();
        assert!(err.to_string().contains("x/obj"), "{err}");
        let missing = DirRepository::new(dir.path().join("unmounted"));
        let err = missing.create("x/obj", &mut &b""[..]).unwrap_err();
        assert!(matches!(err, RepoError::Missing { .. }), "{err}");
        assert!(repo.list("x").unwrap().is_empty());
    }
}
