//! `pgha wal push` and `pgha wal get`: PostgreSQL's `archive_command` and
//! `restore_command`. They run as the PostgreSQL account, started by the
//! server for every WAL file, so they are synchronous, start no runtime
//! and read only the repository file (no secret).
//!
//! Exit codes follow what PostgreSQL makes of them:
//! - 0: done (for push: also "already archived with the same content").
//! - 1: not done. For push, PostgreSQL keeps the file and retries; for get,
//!   "not in the archive", which recovery takes as the end of the archive.
//! - 126 (get only): the archived object is corrupt or ambiguous. Above 125
//!   PostgreSQL stops recovery instead of treating the file as missing,
//!   which would end recovery early and silently lose every later commit.
//! - 2: usage or configuration error.

use std::path::PathBuf;

use clap::Subcommand;

use crate::backup::file::{self, Pushed};
use crate::backup::{BackupError, OpenError, open_repository};
use crate::config::backup::load_backup_config;

/// Exit code of `wal get` for an object that exists but cannot be trusted.
pub const EXIT_CORRUPT: i32 = 126;

#[derive(Debug, Subcommand)]
pub enum WalAction {
    /// Archive one WAL file (archive_command = 'pgha wal push -c FILE %p').
    Push {
        /// The node configuration or the repository file the agent writes
        /// (`<state_dir>/postgres/backup.toml`).
        #[arg(short, long)]
        config: PathBuf,
        /// The WAL file (%p).
        path: PathBuf,
    },
    /// Restore one WAL file (restore_command = 'pgha wal get -c FILE %f %p').
    Get {
        /// The node's configuration file (e.g. /etc/pgha/pgha.toml).
        #[arg(short, long)]
        config: PathBuf,
        /// The WAL file name (%f).
        name: String,
        /// Where to write it (%p).
        path: PathBuf,
    },
}

/// Runs the command; returns the process exit code.
pub fn main(action: &WalAction) -> i32 {
    let config = match action {
        WalAction::Push { config, .. } | WalAction::Get { config, .. } => config,
    };
    let cfg = match load_backup_config(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgha wal: {e}");
            return super::EXIT_CONFIG;
        }
    };
    let repo = match open_repository(&cfg) {
        Ok(r) => r,
        Err(e @ OpenError::Config(_)) => {
            eprintln!("pgha wal: {e}");
            return super::EXIT_CONFIG;
        }
        Err(e) => {
            eprintln!("pgha wal: {}", chain(&e));
            return super::EXIT_FAILURE;
        }
    };
    match action {
        WalAction::Push { path, .. } => match file::push(
            repo.as_ref(),
            path,
            cfg.compress_level,
            file::Origin::of(path),
        ) {
            Ok(Pushed::Stored { .. } | Pushed::AlreadyArchived { .. }) => 0,
            // A standby found the name archived (normally by the primary,
            // with the same content): nothing to do.
            Ok(Pushed::KeptArchived { .. }) => 0,
            Err(e) => {
                eprintln!("pgha wal push {}: {}", path.display(), chain(&e));
                super::EXIT_FAILURE
            }
        },
        WalAction::Get { name, path, .. } => match file::get(repo.as_ref(), name, path) {
            Ok(_) => 0,
            Err(e @ BackupError::NotArchived { .. }) => {
                eprintln!("pgha wal get: {e}");
                super::EXIT_FAILURE
            }
            Err(e @ (BackupError::Corrupt { .. } | BackupError::Ambiguous { .. })) => {
                eprintln!("pgha wal get {name}: {e}; stopping recovery");
                EXIT_CORRUPT
            }
            Err(e) => {
                eprintln!("pgha wal get {name}: {}", chain(&e));
                super::EXIT_FAILURE
            }
        },
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
