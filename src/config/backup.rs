//! The `[backup]` table: where the backup repository is and how WAL and base
//! backups are stored in it. Kept apart from the rest of the configuration
//! because the same table is also the whole of the small file the agent
//! renders for `archive_command` / `restore_command` (which run as the
//! PostgreSQL account and must not be able to read the node file with its
//! passwords).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[backup]` as written.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackup {
    /// A directory (local disk or an NFS mount) that holds the repository.
    pub repository: PathBuf,
    /// zstd level for WAL segments and base backups.
    #[serde(default = "default_compress_level")]
    pub compress_level: i32,
    /// How many files a base backup compresses and stores at once.
    #[serde(default = "default_parallel")]
    pub parallel: usize,
    /// How many full backups retention keeps (`pgha backup expire`).
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// `"on"` (only the primary archives) or `"always"` (replicas archive
    /// what they receive too, so a segment the old primary never archived
    /// before it died still reaches the repository).
    #[serde(default = "default_archive_mode")]
    pub archive_mode: String,
}

/// Validated `[backup]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupConfig {
    pub repository: PathBuf,
    pub compress_level: i32,
    pub parallel: usize,
    pub keep: usize,
    pub archive_mode: ArchiveMode,
}

/// Which servers run `archive_command`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchiveMode {
    On,
    Always,
}

impl ArchiveMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ArchiveMode::On => "on",
            ArchiveMode::Always => "always",
        }
    }
}

fn default_compress_level() -> i32 {
    3
}
fn default_parallel() -> usize {
    2
}
fn default_keep() -> usize {
    2
}
/// `always`: the only mode in which a segment the old primary completed
/// but never archived still reaches the repository (see `docs/backup.md`).
fn default_archive_mode() -> String {
    "always".into()
}

/// Server parameters that `[backup]` sets; the operator may not set them in
/// `[postgres.parameters]` as well, since two sources would fight.
pub const BACKUP_PARAMETERS: &[&str] = &["archive_mode", "archive_command", "restore_command"];

impl BackupConfig {
    /// Validates `raw`; `key_prefix` is `"backup"` in a node file and in the
    /// rendered repository file alike. Relative repository paths are
    /// resolved with `resolve` (against the file's directory).
    pub fn validate(
        path: &Path,
        raw: RawBackup,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<BackupConfig, ConfigError> {
        let bad = |key: &str, msg: String| ConfigError::invalid(path, key, msg);
        if raw.repository.as_os_str().is_empty() {
            return Err(bad("backup.repository", "must not be empty".into()));
        }
        let repository: PathBuf = resolve(&raw.repository).components().collect();
        if repository == Path::new("/") {
            return Err(bad(
                "backup.repository",
                "must name a directory other than /".into(),
            ));
        }
        // zstd accepts 1..=22; 20 and above need much more memory on both
        // sides, which a restore on a small host may not have.
        if !(1..=19).contains(&raw.compress_level) {
            return Err(bad(
                "backup.compress_level",
                format!("{} must be 1-19", raw.compress_level),
            ));
        }
        if !(1..=64).contains(&raw.parallel) {
            return Err(bad(
                "backup.parallel",
                format!("{} must be 1-64", raw.parallel),
            ));
        }
        if raw.keep == 0 {
            return Err(bad(
                "backup.keep",
                "must be at least 1 (retention never deletes the last backup)".into(),
            ));
        }
        let archive_mode = match raw.archive_mode.as_str() {
            "on" => ArchiveMode::On,
            "always" => ArchiveMode::Always,
            other => {
                return Err(bad(
                    "backup.archive_mode",
                    format!("{other:?} must be \"on\" or \"always\""),
                ));
            }
        };
        Ok(BackupConfig {
            repository,
            compress_level: raw.compress_level,
            parallel: raw.parallel,
            keep: raw.keep,
            archive_mode,
        })
    }

    /// The raw form again, for the rendered repository file (absolute
    /// path, every key spelt out).
    pub fn to_raw(&self) -> RawBackup {
        RawBackup {
            repository: self.repository.clone(),
            compress_level: self.compress_level,
            parallel: self.parallel,
            keep: self.keep,
            archive_mode: self.archive_mode.as_str().into(),
        }
    }
}

/// The repository file the agent renders for the PostgreSQL account: the
/// `[backup]` table and nothing else, so no secret.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryFile {
    pub backup: RawBackup,
}

impl RepositoryFile {
    pub fn render(cfg: &BackupConfig) -> String {
        let mut text = String::from(
            "# Written by the pgha agent for archive_command/restore_command.\n\
             # Edit [backup] in the node's configuration instead.\n",
        );
        text.push_str(
            &toml::to_string(&RepositoryFile {
                backup: cfg.to_raw(),
            })
            .expect("a [backup] table always serialises"),
        );
        text
    }
}

/// Reads the `[backup]` table from `path`, which is either a node
/// configuration or a repository file rendered by the agent. The wal
/// commands run as the PostgreSQL account and may be given either; only
/// the node file needs its other sections to be valid as well.
pub fn load_backup_config(path: &Path) -> Result<BackupConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base_dir.join(p)
        }
    };
    let is_node_file = toml::from_str::<toml::Table>(&text)
        .map(|t| t.contains_key("cluster"))
        .unwrap_or(false);
    if is_node_file {
        let cfg = super::Config::from_toml(path, &text)?;
        return cfg
            .backup
            .ok_or_else(|| ConfigError::invalid(path, "backup", "is not configured"));
    }
    let file: RepositoryFile = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
        path: path.to_path_buf(),
        line: e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
            .unwrap_or(1),
        message: e.message().trim().to_string(),
    })?;
    BackupConfig::validate(path, file.backup, resolve)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> RawBackup {
        toml::from_str::<RepositoryFile>(text).unwrap().backup
    }

    #[test]
    fn defaults_and_relative_repository() {
        let cfg = BackupConfig::validate(
            Path::new("/etc/pgha/node.toml"),
            raw("[backup]\nrepository = \"repo\"\n"),
            |p| Path::new("/etc/pgha").join(p),
        )
        .unwrap();
        assert_eq!(cfg.repository, Path::new("/etc/pgha/repo"));
        assert_eq!(cfg.compress_level, 3);
        assert_eq!(cfg.parallel, 2);
        assert_eq!(cfg.keep, 2);
        assert_eq!(cfg.archive_mode, ArchiveMode::Always);
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            ("compress_level = 0", "backup.compress_level"),
            ("compress_level = 22", "backup.compress_level"),
            ("parallel = 0", "backup.parallel"),
            ("keep = 0", "backup.keep"),
            ("archive_mode = \"off\"", "backup.archive_mode"),
        ];
        for (line, key) in cases {
            let err = BackupConfig::validate(
                Path::new("/n.toml"),
                raw(&format!("[backup]\nrepository = \"/r\"\n{line}\n")),
                Path::to_path_buf,
            )
            .unwrap_err();
            match err {
                ConfigError::Invalid { key: k, .. } => assert_eq!(k, key, "{line}"),
                other => panic!("{line}: {other}"),
            }
        }
        let err = BackupConfig::validate(
            Path::new("/n.toml"),
            raw("[backup]\nrepository = \"/\"\n"),
            Path::to_path_buf,
        )
        .unwrap_err();
        assert!(err.to_string().contains("backup.repository"), "{err}");
    }

    #[test]
    fn rendered_file_round_trips_and_holds_only_backup() {
        let cfg = BackupConfig {
            repository: "/srv/pgha repo".into(),
            compress_level: 5,
            parallel: 3,
            keep: 4,
            archive_mode: ArchiveMode::Always,
        };
        let text = RepositoryFile::render(&cfg);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backup.toml");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(load_backup_config(&path).unwrap(), cfg);
        let table: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(table.keys().collect::<Vec<_>>(), ["backup"]);
    }
}
