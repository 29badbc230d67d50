//! Backups: continuous WAL archiving into a repository, base backups, and
//! point-in-time restore. See `docs/backup.md`.
//!
//! - [`naming`]: WAL names and repository keys (pure).
//! - [`repo`]: the [`repo::Repository`] trait and the directory repository.
//! - [`s3`]: the repository in an S3-compatible object store.
//! - [`file`]: one WAL file in and out (`archive_command`,
//!   `restore_command`); [`crate::cli::wal`] wraps it.
//! - [`progress`]: progress lines of a long unpack (pure).
//! - [`replica`]: a replica's data directory from the newest backup that
//!   fits the leader's timeline (`backup.clone_from = "backup"`).
//! - [`retention`]: which backups and archived WAL `keep` lets go.
//! - [`run`]: a whole base backup as `pgha backup` and the agent's
//!   schedule take it (source, backup, end of WAL, retention).
//! - [`schedule`]: `backup.schedule` and whether a backup is due (pure).
//! - [`agent`]: what the agent sets up for PostgreSQL when `[backup]` is
//!   configured (the repository file, the archive settings).

pub mod agent;
pub mod base;
pub mod bootstrap;
pub mod chain;
pub mod file;
pub mod naming;
pub mod progress;
pub mod replica;
pub mod repo;
pub mod restore;
pub mod retention;
pub mod run;
pub mod s3;
pub mod schedule;

use std::path::PathBuf;

/// A backup or archive failure, naming the object involved.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Repository(#[from] repo::RepoError),
    #[error("{name}: not a WAL file name PostgreSQL would archive")]
    NotWal { name: String },
    #[error("{name}: not in the archive of {repo}")]
    NotArchived { name: String, repo: String },
    #[error(
        "{name}: refusing to archive: {archived} holds different content (local copy has sha256 {local_sha256}); the archive is left unchanged"
    )]
    Conflict {
        name: String,
        archived: String,
        local_sha256: String,
    },
    #[error("{name}: several archived copies with different content: {}", keys.join(", "))]
    Ambiguous { name: String, keys: Vec<String> },
    #[error("{key} already exists in the repository {repo}; it was left alone")]
    Exists { key: String, repo: String },
    #[error("{key}: corrupt object: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("{tool}: {detail}")]
    Tool { tool: String, detail: String },
    #[error("{0}")]
    Restore(String),
    #[error("cancelled")]
    Cancelled,
    #[error("cannot {action} {}", path.display())]
    Local {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why [`open_repository`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The S3 credentials file is missing, unsafe or malformed.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    S3(#[from] s3::OpenError),
}

/// The repository a validated `[backup]` table names. For S3 this reads
/// the credentials file, so it is done by the command that needs the
/// repository, as the account that runs it.
pub fn open_repository(
    cfg: &crate::config::backup::BackupConfig,
) -> Result<Box<dyn repo::Repository>, OpenError> {
    match &cfg.s3 {
        None => Ok(Box::new(repo::DirRepository::new(cfg.repository.clone()))),
        Some(s3cfg) => {
            let creds = s3cfg.load_credentials()?;
            Ok(Box::new(s3::S3Repository::new(s3cfg, &creds)?))
        }
    }
}
