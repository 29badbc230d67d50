//! What the agent prepares for PostgreSQL when `[backup]` is configured:
//! the repository file `archive_command` and `restore_command` read, the
//! repository directory when it is missing, and the server settings.

use std::path::Path;

use crate::config::backup::{BackupConfig, RepositoryFile};
use crate::postgres::conf::{Archiving, quote_shell};
use crate::safe_fs::{Owner, SafeFsError, Strictness, TrustedDir};

/// Name of the repository file in the PostgreSQL account's state directory.
pub const REPOSITORY_FILE: &str = "backup.toml";

/// Writes the repository file into `pg_dir` (the PostgreSQL account's
/// directory: the commands run as that account) and creates the repository
/// directory for that account when it does not exist yet. An existing
/// repository is left as it is: it may be an NFS mount with its own
/// ownership, and `pgha wal push` names it if it cannot write there.
pub fn prepare(
    cfg: &BackupConfig,
    pg_dir: &TrustedDir,
    pg_owner: Owner,
    pgha_bin: &Path,
) -> Result<Archiving, SafeFsError> {
    pg_dir.write(
        REPOSITORY_FILE,
        RepositoryFile::render(cfg).as_bytes(),
        0o600,
    )?;
    // An S3 repository is a bucket the operator made; nothing to create.
    if cfg.s3.is_none() && std::fs::symlink_metadata(&cfg.repository).is_err() {
        // Created through a descriptor, never following a symlink at the
        // last component, and handed to the PostgreSQL account.
        TrustedDir::create(&cfg.repository, pg_owner, 0o750, Strictness::OwnerOnly)?;
    }
    Ok(archiving(cfg, pgha_bin, &pg_dir.join(REPOSITORY_FILE)))
}

/// The archive settings for `postgresql.conf` (pure).
pub fn archiving(cfg: &BackupConfig, pgha_bin: &Path, repository_file: &Path) -> Archiving {
    let bin = quote_shell(&pgha_bin.display().to_string());
    let file = quote_shell(&repository_file.display().to_string());
    Archiving {
        mode: cfg.archive_mode.as_str().into(),
        archive_command: format!("{bin} wal push -c {file} %p"),
        restore_command: format!("{bin} wal get -c {file} %f %p"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::backup::ArchiveMode;

    #[test]
    fn commands_quote_paths_for_the_shell() {
        let cfg = BackupConfig {
            repository: "/r".into(),
            compress_level: 3,
            parallel: 2,
            keep: 2,
            archive_mode: ArchiveMode::On,
            s3: None,
            schedule: None,
            schedule_from: Default::default(),
            schedule_timeout: crate::config::backup::DEFAULT_SCHEDULE_TIMEOUT,
            clone_from: Default::default(),
        };
        let a = archiving(
            &cfg,
            Path::new("/opt/pg ha/pgha"),
            Path::new("/var/lib/it's/backup.toml"),
        );
        assert_eq!(a.mode, "on");
        assert_eq!(
            a.archive_command,
            r#"'/opt/pg ha/pgha' wal push -c '/var/lib/it'"'"'s/backup.toml' %p"#
        );
        assert!(
            a.restore_command
                .ends_with(" wal get -c '/var/lib/it'\"'\"'s/backup.toml' %f %p")
        );
    }
}
