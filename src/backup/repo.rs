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
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

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
    /// Names of the objects (and sub-directories) directly under `dir`;
    /// empty when `dir` does not exist.
    fn list(&self, dir: &str) -> Result<Vec<String>, RepoError>;
    /// A reader over the object `key`.
    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>, RepoError>;
    /// Stores everything `src` yields under `key`, atomically (readers see
    /// the whole object or none) and durably (on disk before it returns),
    /// unless `key` already exists, in which case nothing is changed.
    fn create(&self, key: &str, src: &mut dyn Read) -> Result<Created, RepoError>;
    /// Removes `key` (retention only); a missing key is not an error.
    fn delete(&self, key: &str) -> Result<(), RepoError>;

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

    fn path(&self, key: &str) -> Result<PathBuf, RepoError> {
        if !valid_key(key) {
            return Err(RepoError::BadKey { key: key.into() });
        }
        Ok(self.root.join(key))
    }

    /// Run as root (`pgha backup`, a scheduled backup, the agent), what
    /// is created belongs to the owner of the repository's directory (the
    /// PostgreSQL account, which archives into it): that account must read
    /// base backups to start a replica from one, and expire them. `None`
    /// when not root, or when root owns the repository.
    fn owner_for_root(&self) -> Option<(u32, u32)> {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        let meta = std::fs::metadata(&self.root).ok()?;
        (meta.uid() != 0).then(|| (meta.uid(), meta.gid()))
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

    /// Creates the directories of `key` (each fsynced into its parent when
    /// new, so that a crash cannot lose a directory an object was linked
    /// into).
    fn make_parents(&self, key: &str) -> Result<(), RepoError> {
        if !self.root.is_dir() {
            return Err(RepoError::Missing {
                repo: self.location(),
            });
        }
        let mut dir = self.root.clone();
        let comps: Vec<&str> = key.split('/').collect();
        for c in &comps[..comps.len() - 1] {
            let parent = dir.clone();
            dir.push(c);
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    if let Some((uid, gid)) = self.owner_for_root() {
                        std::os::unix::fs::lchown(&dir, Some(uid), Some(gid)).map_err(
                            self.io("hand to the repository's owner the directory of", key),
                        )?;
                    }
                    sync_dir(&parent).map_err(self.io("sync the directory of", key))?
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(self.io("create the directory of", key)(e)),
            }
        }
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
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
        let path = if dir.is_empty() {
            self.root.clone()
        } else {
            self.path(dir)?
        };
        let entries = match std::fs::read_dir(&path) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io("list", dir)(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(self.io("list", dir))?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>, RepoError> {
        let path = self.path(key)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    RepoError::NotFound {
                        repo: self.location(),
                        key: key.into(),
                    }
                } else {
                    self.io("open", key)(e)
                }
            })?;
        Ok(Box::new(std::io::BufReader::with_capacity(1 << 20, file)))
    }

    fn create(&self, key: &str, src: &mut dyn Read) -> Result<Created, RepoError> {
        let path = self.path(key)?;
        if std::fs::symlink_metadata(&path).is_ok() {
            return Ok(Created::Existed);
        }
        self.make_parents(key)?;
        let dir = path.parent().expect("a key has a file name").to_path_buf();
        let file_name = path.file_name().expect("file name").to_string_lossy();
        let tmp = dir.join(format!(".{file_name}.{}.tmp", temp_suffix()));
        let result = (|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .mode(0o640)
                .open(&tmp)
                .map_err(self.io("create a temporary file for", key))?;
            if let Some((uid, gid)) = self.owner_for_root() {
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                    .map_err(self.io("hand to the repository's owner", key))?;
            }
            let bytes = {
                let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut file);
                let n = std::io::copy(src, &mut w).map_err(self.io("write", key))?;
                w.flush().map_err(self.io("write", key))?;
                n
            };
            file.sync_all().map_err(self.io("sync", key))?;
            drop(file);
            match std::fs::hard_link(&tmp, &path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Ok(Created::Existed);
                }
                Err(e) => return Err(self.io("store", key)(e)),
            }
            sync_dir(&dir).map_err(self.io("sync the directory of", key))?;
            Ok(Created::New { bytes })
        })();
        let _ = std::fs::remove_file(&tmp);
        result
    }

    fn delete(&self, key: &str) -> Result<(), RepoError> {
        let path = self.path(key)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io("delete", key)(e)),
        }
    }

    fn remove_empty_dir(&self, dir: &str) -> Result<(), RepoError> {
        let path = self.path(dir)?;
        match std::fs::remove_dir(&path) {
            Ok(()) => Ok(()),
            // Not empty (a stray file) or already gone: leave it.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::DirectoryNotEmpty
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(self.io("remove the directory", dir)(e)),
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
