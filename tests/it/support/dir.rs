//! Per-test scratch directories.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A fresh directory under [`root`], removed when dropped unless the test is
/// failing and `PGHA_KEEP_TEST_DIRS` is set (its path is then printed).
///
/// It lives directly under the root with a short name because PostgreSQL
/// puts unix sockets in it, and socket paths must stay under ~100 bytes. It
/// is mode 0755 because PostgreSQL runs as the unprivileged `postgres` user
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
            .tempdir_in(root())
            .expect("create a test dir");
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

/// Where test directories go: `PGHA_TEST_DIR_ROOT` if set, else `/dev/shm`
/// when it is a memory file system with room to spare, else `/tmp`.
///
/// Memory, because the suite's timing assertions are about pgha, not about
/// the disk: on a virtual disk busy with the build's writeback and with
/// every test's PostgreSQL and etcd syncing, one rename of the fence
/// keeper's heartbeat file was measured taking 0.75 s, and a whole-disk
/// stall of 4-5 s starved every keeper and etcd at once, so a leader lost
/// its lease in a test that asserts it keeps it. Those stalls are real and
/// pgha meets them on the safe side (docs/architecture.md, "Fence keeper");
/// the tests that assert the safe side provoke them on purpose.
fn root() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        if let Some(dir) = std::env::var_os("PGHA_TEST_DIR_ROOT") {
            return PathBuf::from(dir);
        }
        const ROOM: u64 = 4 << 30;
        let shm = Path::new("/dev/shm");
        match nix::sys::statfs::statfs(shm) {
            Ok(fs)
                if fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC
                    && fs.blocks_available() * fs.block_size() as u64 >= ROOM
                    && nix::unistd::access(shm, nix::unistd::AccessFlags::W_OK).is_ok() =>
            {
                shm.to_path_buf()
            }
            _ => PathBuf::from("/tmp"),
        }
    })
    .clone()
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
