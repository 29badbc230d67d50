//! The `[bootstrap]` table: how a new cluster gets its first database.
//! Without it the member that wins the bootstrap race runs `initdb`; with
//! `[bootstrap.from_backup]` it restores a backup instead, replays archived
//! WAL to a target and becomes the first leader (see "A new cluster from a
//! backup" in `docs/backup.md`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;
use super::backup::BackupConfig;
use crate::backup::restore::{Target, parse_target};

/// `[bootstrap]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBootstrap {
    /// initdb's `--wal-segsize`: `"16MB"`, `"4MB"`, `"1GB"`.
    #[serde(default)]
    pub wal_segment_size: Option<String>,
    #[serde(default)]
    pub from_backup: Option<RawFromBackup>,
}

/// `[bootstrap.from_backup]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFromBackup {
    /// `latest`, an RFC 3339 time or an LSN: where replay stops.
    #[serde(default)]
    pub target: Option<String>,
    /// One backup by id; default: the newest that suits the target.
    #[serde(default)]
    pub backup: Option<String>,
    /// The timeline replay follows; default: the newest archived.
    #[serde(default)]
    pub timeline: Option<u32>,
    /// A repository file (a `[backup]` table alone) naming the repository
    /// to restore from; default: this cluster's `[backup]`.
    #[serde(default)]
    pub repository_file: Option<PathBuf>,
}

/// Validated `[bootstrap]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootstrapConfig {
    /// initdb's `--wal-segsize` in MiB; `None`: PostgreSQL's default (16).
    pub wal_segment_mib: Option<u32>,
    pub from_backup: Option<FromBackup>,
}

/// Validated `[bootstrap.from_backup]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FromBackup {
    pub target: Target,
    /// The target as written (for the restore command's argument and logs).
    pub target_text: String,
    pub backup: Option<String>,
    /// `None`: the newest timeline archived when the restore begins.
    pub timeline: Option<u32>,
    /// The repository restored from: `repository_file`'s, or the cluster's.
    pub source: BackupConfig,
}

impl BootstrapConfig {
    pub fn validate(
        path: &Path,
        raw: RawBootstrap,
        cluster_backup: Option<&BackupConfig>,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<BootstrapConfig, ConfigError> {
        let bad = |key: &str, msg: String| ConfigError::invalid(path, key, msg);
        let wal_segment_mib = match &raw.wal_segment_size {
            None => None,
            Some(text) => {
                Some(parse_segment_size(text).map_err(|e| bad("bootstrap.wal_segment_size", e))?)
            }
        };
        if wal_segment_mib.is_some() && raw.from_backup.is_some() {
            return Err(bad(
                "bootstrap.wal_segment_size",
                "applies to initdb; a cluster restored from a backup keeps the backup's segment size".into(),
            ));
        }
        let Some(raw) = raw.from_backup else {
            return Ok(BootstrapConfig {
                wal_segment_mib,
                from_backup: None,
            });
        };
        let target_text = raw.target.unwrap_or_else(|| "latest".into());
        let target =
            parse_target(&target_text).map_err(|e| bad("bootstrap.from_backup.target", e))?;
        if let Some(id) = &raw.backup
            && !crate::backup::naming::is_backup_id(id)
        {
            return Err(bad(
                "bootstrap.from_backup.backup",
                format!(
                    "{id:?} is not a backup id (as `pgha backup list` prints: 20261202T101500Z)"
                ),
            ));
        }
        if raw.timeline == Some(0) {
            return Err(bad(
                "bootstrap.from_backup.timeline",
                "timelines start at 1".into(),
            ));
        }
        let source = match (&raw.repository_file, cluster_backup) {
            (Some(file), _) => load_source(path, &resolve(file))?,
            (None, Some(b)) => b.clone(),
            (None, None) => {
                return Err(bad(
                    "bootstrap.from_backup",
                    "needs a repository to restore from: configure [backup] or set bootstrap.from_backup.repository_file".into(),
                ));
            }
        };
        Ok(BootstrapConfig {
            wal_segment_mib,
            from_backup: Some(FromBackup {
                target,
                target_text,
                backup: raw.backup,
                timeline: raw.timeline,
                source,
            }),
        })
    }
}

/// `"16MB"`-style sizes (PostgreSQL's own spelling, `MB` or `GB`): a
/// power of two from 1 MB to 1 GB, as initdb accepts.
fn parse_segment_size(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let (digits, mib_per_unit) = if let Some(n) = t.strip_suffix("MB") {
        (n, 1)
    } else if let Some(n) = t.strip_suffix("GB") {
        (n, 1024)
    } else {
        return Err(format!("{text:?} must be a size in MB or GB, as \"16MB\""));
    };
    let mib = digits
        .trim()
        .parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(mib_per_unit))
        .ok_or_else(|| format!("{text:?} must be a size in MB or GB, as \"16MB\""))?;
    if !(1..=1024).contains(&mib) || !mib.is_power_of_two() {
        return Err(format!(
            "{text:?} must be a power of two from 1MB to 1GB (1, 2, 4, ... 1024 MB)"
        ));
    }
    Ok(mib)
}

/// Reads the repository file `file` names. A node configuration is refused:
/// it holds passwords, and may itself point back here.
fn load_source(path: &Path, file: &Path) -> Result<BackupConfig, ConfigError> {
    let key = "bootstrap.from_backup.repository_file";
    let text = std::fs::read_to_string(file)
        .map_err(|e| ConfigError::invalid(path, key, format!("{}: {e}", file.display())))?;
    let is_node_file = toml::from_str::<toml::Table>(&text)
        .map(|t| t.contains_key("cluster"))
        .unwrap_or(false);
    if is_node_file {
        return Err(ConfigError::invalid(
            path,
            key,
            format!(
                "{} is a node configuration; give a repository file holding only a [backup] table",
                file.display()
            ),
        ));
    }
    super::backup::load_backup_config(file)
        .map_err(|e| ConfigError::invalid(path, key, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster_backup() -> BackupConfig {
        let raw: super::super::backup::RawBackup = toml::from_str("repository = \"/r\"").unwrap();
        BackupConfig::validate(Path::new("/n.toml"), raw, |p: &Path| p.to_path_buf()).unwrap()
    }

    fn load(text: &str, backup: Option<&BackupConfig>) -> Result<BootstrapConfig, String> {
        let raw: RawBootstrap = toml::from_str(text).map_err(|e| e.to_string())?;
        BootstrapConfig::validate(Path::new("/etc/pgha/n.toml"), raw, backup, |p: &Path| {
            Path::new("/etc/pgha").join(p)
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn without_the_table_the_cluster_starts_with_initdb() {
        assert_eq!(load("", None).unwrap().from_backup, None);
    }

    #[test]
    fn defaults_restore_the_newest_backup_of_the_clusters_repository_to_latest() {
        let b = cluster_backup();
        let f = load("[from_backup]\n", Some(&b))
            .unwrap()
            .from_backup
            .unwrap();
        assert_eq!(f.target, Target::Latest);
        assert_eq!(f.target_text, "latest");
        assert_eq!(f.backup, None);
        assert_eq!(f.source, b);
        assert_eq!(f.timeline, None);
    }

    #[test]
    fn target_and_backup_are_checked() {
        let b = cluster_backup();
        let f = load(
            "[from_backup]\ntarget = \"2026-12-01T10:00:00Z\"\nbackup = \"20261201T090000Z\"\n",
            Some(&b),
        )
        .unwrap()
        .from_backup
        .unwrap();
        assert!(matches!(f.target, Target::Time(_)));
        assert_eq!(f.backup.as_deref(), Some("20261201T090000Z"));
        let err = load("[from_backup]\ntarget = \"yesterday\"\n", Some(&b)).unwrap_err();
        assert!(
            err.contains("/etc/pgha/n.toml") && err.contains("bootstrap.from_backup.target"),
            "{err}"
        );
        let err = load("[from_backup]\nbackup = \"last\"\n", Some(&b)).unwrap_err();
        assert!(err.contains("bootstrap.from_backup.backup"), "{err}");
        let t = load("[from_backup]\ntimeline = 3\n", Some(&b)).unwrap();
        assert_eq!(t.from_backup.unwrap().timeline, Some(3));
        let err = load("[from_backup]\ntimeline = 0\n", Some(&b)).unwrap_err();
        assert!(err.contains("bootstrap.from_backup.timeline"), "{err}");
        let err = load("[from_backup]\ntargett = \"latest\"\n", Some(&b)).unwrap_err();
        assert!(err.contains("targett"), "{err}");
    }

    #[test]
    fn wal_segment_size_is_a_power_of_two_for_initdb() {
        let size =
            |v: &str| load(&format!("wal_segment_size = {v:?}\n"), None).map(|c| c.wal_segment_mib);
        assert_eq!(load("", None).unwrap().wal_segment_mib, None);
        assert_eq!(size("16MB"), Ok(Some(16)));
        assert_eq!(size("4MB"), Ok(Some(4)));
        assert_eq!(size("1MB"), Ok(Some(1)));
        assert_eq!(size("1GB"), Ok(Some(1024)));
        for bad in ["3MB", "0MB", "2GB", "16", "16mb", "16 kB", "MB", "-4MB", ""] {
            let err = size(bad).unwrap_err();
            assert!(err.contains("bootstrap.wal_segment_size"), "{bad}: {err}");
        }
        let b = cluster_backup();
        let err = load("wal_segment_size = \"4MB\"\n[from_backup]\n", Some(&b)).unwrap_err();
        assert!(err.contains("keeps the backup's segment size"), "{err}");
    }

    #[test]
    fn a_repository_is_required() {
        let err = load("[from_backup]\n", None).unwrap_err();
        assert!(
            err.contains("bootstrap.from_backup") && err.contains("repository_file"),
            "{err}"
        );
    }

    #[test]
    fn another_repository_comes_from_a_repository_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("old.toml");
        std::fs::write(&file, "[backup]\nrepository = \"old-repo\"\n").unwrap();
        let text = format!(
            "[from_backup]\nrepository_file = {:?}\n",
            file.display().to_string()
        );
        let f = load(&text, None).unwrap().from_backup.unwrap();
        // Relative to the repository file's own directory.
        assert_eq!(f.source.repository, dir.path().join("old-repo"));

        std::fs::write(&file, "cluster = \"c\"\nname = \"n\"\n").unwrap();
        let err = load(&text, None).unwrap_err();
        assert!(err.contains("is a node configuration"), "{err}");

        std::fs::write(&file, "[backup]\nrepository = \"/r\"\nkeep = 0\n").unwrap();
        let err = load(&text, None).unwrap_err();
        assert!(
            err.contains("bootstrap.from_backup.repository_file") && err.contains("backup.keep"),
            "{err}"
        );
        let missing = format!(
            "[from_backup]\nrepository_file = {:?}\n",
            dir.path().join("none.toml").display().to_string()
        );
        let err = load(&missing, None).unwrap_err();
        assert!(err.contains("none.toml"), "{err}");
    }
}
