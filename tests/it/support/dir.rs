//! Per-test scratch directories.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A fresh directory under `/tmp`, removed when dropped unless the test is
/// failing and `PGHA_KEEP_TEST_DIRS` is set (its path is then printed).
///
/// It lives directly under `/tmp` with a short name because PostgreSQL puts
/// unix sockets in it, and socket paths must stay under ~100 bytes. It is
/// mode 0755 because PostgreSQL runs as the unprivileged `postgres` user
/// and must be able to traverse it.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    /// `name` (the test's name, say) is part of the directory name so that
    /// kept directories can be told apart; keep it short.
    pub fn new(name: &str) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("pgha-{name}-"))
            .tempdir_in("/tmp")
            .expect("create a temp dir under /tmp");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod 0755 the test dir");
        let path = dir.path().to_path_buf();
        TestDir {
            dir: Some(dir),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A subdirectory, created (mode 0755) if missing.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).expect("create a subdir of the test dir");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
            .expect("chmod 0755 a subdir");
        p
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && std::env::var_os("PGHA_KEEP_TEST_DIRS").is_some()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("PGHA_KEEP_TEST_DIRS: keeping {}", dir.keep().display());
        }
    }
}
