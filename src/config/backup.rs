//! The `[backup]` table: where the backup repository is and how WAL and base
//! backups are stored in it. Kept apart from the rest of the configuration
//! because the same table is also the whole of the small file the agent
//! renders for `archive_command` / `restore_command` (which run as the
//! PostgreSQL account and must not be able to read the node file with its
//! passwords).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::backup::schedule::Schedule;

/// `[backup]` as written.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackup {
    /// A directory (local disk or an NFS mount) that holds the repository,
    /// or `s3://bucket[/prefix]` for an S3-compatible object store.
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
    /// S3 only: the endpoint URL (default: AWS, from the region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
    /// S3 only: the region requests are signed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_region: Option<String>,
    /// S3 only: `http://endpoint/bucket/key` rather than
    /// `http://bucket.endpoint/key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_path_style: Option<bool>,
    /// S3 only: the file with the access key (see [`S3Credentials`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_credentials_file: Option<PathBuf>,
    /// S3 only: the largest object, in MiB, a base backup is stored in;
    /// larger backups are split into several objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_max_object_mib: Option<u64>,
    /// When the leader's agent takes a base backup: a five-field cron
    /// expression, UTC (see [`crate::backup::schedule`]). None: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// `"replica"` (the least lagging streaming replica, else the leader)
    /// or `"leader"`: where scheduled backups are taken from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_from: Option<String>,
    /// How long a scheduled backup may run before it is cancelled and
    /// counted as failed (default [`DEFAULT_SCHEDULE_TIMEOUT`]).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub schedule_timeout: Option<Duration>,
    /// `"leader"` (pg_basebackup from the leader) or `"backup"` (the newest
    /// backup that fits, then archived WAL, then streaming): how a new or
    /// re-cloned replica gets its data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_from: Option<String>,
}

/// Validated `[backup]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupConfig {
    /// The directory of a directory repository; for S3, the URL as
    /// `s3://bucket[/prefix]` (and [`BackupConfig::s3`] says where it is).
    pub repository: PathBuf,
    pub compress_level: i32,
    pub parallel: usize,
    pub keep: usize,
    pub archive_mode: ArchiveMode,
    /// Set when the repository is an S3 bucket.
    pub s3: Option<S3Config>,
    /// `backup.schedule`: when the leader's agent takes base backups.
    pub schedule: Option<Schedule>,
    pub schedule_from: ScheduleFrom,
    /// `backup.schedule_timeout`: a scheduled backup running longer is
    /// cancelled and counted as failed.
    pub schedule_timeout: Duration,
    /// `backup.clone_from`: where a replica's data directory comes from.
    pub clone_from: CloneFrom,
}

/// Where a new or re-cloned replica's data directory comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CloneFrom {
    /// `pg_basebackup` from the leader.
    #[default]
    Leader,
    /// The newest backup in the repository that lies on the leader's
    /// history, then archived WAL, then streaming; the leader when no
    /// backup fits or the restore fails.
    Backup,
}

impl CloneFrom {
    pub fn as_str(self) -> &'static str {
        match self {
            CloneFrom::Leader => "leader",
            CloneFrom::Backup => "backup",
        }
    }
}

/// Where scheduled backups are taken from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScheduleFrom {
    /// The least lagging streaming replica, or the leader when there is
    /// none: a backup then costs the primary no reads.
    #[default]
    Replica,
    Leader,
}

impl ScheduleFrom {
    pub fn as_str(self) -> &'static str {
        match self {
            ScheduleFrom::Replica => "replica",
            ScheduleFrom::Leader => "leader",
        }
    }
}

/// Where an S3 repository is and how to reach it. Holds the path of the
/// credentials file, never the secret: this is rendered into the
/// repository file and may show up in `Debug` output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix without leading or trailing `/`; empty for none.
    pub prefix: String,
    /// `http(s)://host[:port]`; `None` for AWS itself.
    pub endpoint: Option<String>,
    pub region: String,
    pub path_style: bool,
    pub credentials_file: PathBuf,
    /// The configuration file the keys were read from, for messages.
    pub config_path: PathBuf,
    /// `s3_max_object_mib`, in bytes.
    pub max_object_size: u64,
}

/// The contents of `s3_credentials_file`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    /// For temporary credentials (STS).
    #[serde(default)]
    pub session_token: Option<String>,
}

/// Never prints the secret.
impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// How long a scheduled backup may run when `schedule_timeout` is not
/// set: longer than a backup of a few terabytes takes at the speed of one
/// disk or network link, and short enough that a hung backup costs at
/// most the next few slots of an hourly schedule and none of a daily one.
pub const DEFAULT_SCHEDULE_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// The region requests are signed for when `s3_region` is not set.
pub const DEFAULT_S3_REGION: &str = "us-east-1";

/// `s3_max_object_mib` when not set. An object is copied into place in one
/// request (see [`crate::backup::s3`]), which a slow server must finish
/// within the client's timeout, and which holds a second copy of the
/// object meanwhile: smaller than the 5 GiB S3 allows.
pub const DEFAULT_S3_MAX_OBJECT_MIB: u64 = 1024;

/// A copy part, and so an object pgha can put in place without replacing
/// one, is at most 5 GiB in S3.
pub const S3_MAX_OBJECT_MIB_LIMIT: u64 = 5 << 10;

/// S3 bucket naming rules (the DNS-compatible ones every S3 server
/// accepts): 3-63 characters, lower-case letters, digits, `-` and `.`,
/// starting and ending with a letter or digit.
fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        && b.starts_with(|c: char| c.is_ascii_alphanumeric())
        && b.ends_with(|c: char| c.is_ascii_alphanumeric())
        && !b.contains("..")
}

impl S3Config {
    /// `s3://bucket[/prefix]` again.
    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    /// Reads the credentials file. It must be a regular file (not a
    /// symlink) that neither group nor others can read or write: it holds
    /// the secret key, and the commands that read it run as the PostgreSQL
    /// account, so it normally belongs to that account with mode 0600.
    pub fn load_credentials(&self) -> Result<S3Credentials, ConfigError> {
        use std::io::Read;
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let key = "backup.s3_credentials_file";
        let path = &self.credentials_file;
        let bad = |msg: String| {
            ConfigError::invalid(&self.config_path, key, format!("{}: {msg}", path.display()))
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| bad(format!("cannot open: {e}")))?;
        let meta = file
            .metadata()
            .map_err(|e| bad(format!("cannot stat: {e}")))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(bad(format!(
                "mode {:04o} lets group or others at the secret key; chmod 600 it",
                meta.mode() & 0o7777
            )));
        }
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(|e| bad(format!("cannot read: {e}")))?;
        let creds: S3Credentials = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
            path: path.clone(),
            line: e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
                .unwrap_or(1),
            message: e.message().trim().to_string(),
        })?;
        for (name, value) in [
            ("access_key_id", &creds.access_key_id),
            ("secret_access_key", &creds.secret_access_key),
        ] {
            if value.is_empty() || value.chars().any(|c| c.is_control() || c == ' ') {
                return Err(ConfigError::invalid(
                    path,
                    name,
                    "must be non-empty, without spaces or control characters",
                ));
            }
        }
        Ok(creds)
    }
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
        let text = raw.repository.to_string_lossy();
        let (repository, s3) = if let Some(rest) = text.strip_prefix("s3://") {
            let s3 = validate_s3(path, rest, &raw, &resolve)?;
            (PathBuf::from(s3.url()), Some(s3))
        } else {
            for (key, set) in [
                ("backup.s3_endpoint", raw.s3_endpoint.is_some()),
                ("backup.s3_region", raw.s3_region.is_some()),
                ("backup.s3_path_style", raw.s3_path_style.is_some()),
                (
                    "backup.s3_credentials_file",
                    raw.s3_credentials_file.is_some(),
                ),
                ("backup.s3_max_object_mib", raw.s3_max_object_mib.is_some()),
            ] {
                if set {
                    return Err(bad(key, "applies only to an s3:// repository".into()));
                }
            }
            let repository: PathBuf = resolve(&raw.repository).components().collect();
            if repository == Path::new("/") {
                return Err(bad(
                    "backup.repository",
                    "must name a directory other than /".into(),
                ));
            }
            (repository, None)
        };
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
        let schedule = match &raw.schedule {
            None => None,
            Some(text) => Some(
                Schedule::parse(text)
                    .map_err(|e| bad("backup.schedule", format!("{text:?}: {e}")))?,
            ),
        };
        // Accepted without `schedule` too, so that commenting the
        // schedule out is enough to stop scheduled backups.
        let schedule_from = match raw.schedule_from.as_deref() {
            None | Some("replica") => ScheduleFrom::Replica,
            Some("leader") => ScheduleFrom::Leader,
            Some(other) => {
                return Err(bad(
                    "backup.schedule_from",
                    format!("{other:?} must be \"replica\" or \"leader\""),
                ));
            }
        };
        // Checked without `schedule` too, like `schedule_from`.
        let schedule_timeout = raw.schedule_timeout.unwrap_or(DEFAULT_SCHEDULE_TIMEOUT);
        if schedule_timeout.is_zero() {
            return Err(bad(
                "backup.schedule_timeout",
                "must be greater than 0".into(),
            ));
        }
        let clone_from = match raw.clone_from.as_deref() {
            None | Some("leader") => CloneFrom::Leader,
            Some("backup") => CloneFrom::Backup,
            Some(other) => {
                return Err(bad(
                    "backup.clone_from",
                    format!("{other:?} must be \"leader\" or \"backup\""),
                ));
            }
        };
        Ok(BackupConfig {
            repository,
            compress_level: raw.compress_level,
            parallel: raw.parallel,
            keep: raw.keep,
            archive_mode,
            s3,
            schedule,
            schedule_from,
            schedule_timeout,
            clone_from,
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
            s3_endpoint: self.s3.as_ref().and_then(|s| s.endpoint.clone()),
            s3_region: self.s3.as_ref().map(|s| s.region.clone()),
            s3_path_style: self.s3.as_ref().map(|s| s.path_style),
            s3_credentials_file: self.s3.as_ref().map(|s| s.credentials_file.clone()),
            s3_max_object_mib: self.s3.as_ref().map(|s| s.max_object_size >> 20),
            schedule: self.schedule.as_ref().map(|s| s.as_str().into()),
            schedule_from: self
                .schedule
                .as_ref()
                .map(|_| self.schedule_from.as_str().into()),
            schedule_timeout: self.schedule.as_ref().map(|_| self.schedule_timeout),
            clone_from: (self.clone_from != CloneFrom::Leader)
                .then(|| self.clone_from.as_str().into()),
        }
    }
}

/// The S3 keys of `[backup]` for `repository = "s3://<rest>"`.
fn validate_s3(
    path: &Path,
    rest: &str,
    raw: &RawBackup,
    resolve: &impl Fn(&Path) -> PathBuf,
) -> Result<S3Config, ConfigError> {
    let bad = |key: &str, msg: String| ConfigError::invalid(path, key, msg);
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if !valid_bucket(bucket) {
        return Err(bad(
            "backup.repository",
            format!(
                "{bucket:?} is not a bucket name (3-63 lower-case letters, digits, '-' and '.')"
            ),
        ));
    }
    let prefix = prefix.trim_end_matches('/');
    if !prefix.is_empty() && !crate::backup::repo::valid_key(prefix) {
        return Err(bad(
            "backup.repository",
            format!(
                "{prefix:?} is not a key prefix (components of printable characters, no '.', '..' or empty ones)"
            ),
        ));
    }
    let region = raw
        .s3_region
        .clone()
        .unwrap_or_else(|| DEFAULT_S3_REGION.into());
    if region.is_empty()
        || !region
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
    {
        return Err(bad(
            "backup.s3_region",
            format!("{region:?} must be lower-case letters, digits and '-'"),
        ));
    }
    let endpoint = match &raw.s3_endpoint {
        None => None,
        Some(e) => Some(validate_endpoint(e).map_err(|m| bad("backup.s3_endpoint", m))?),
    };
    let Some(credentials_file) = &raw.s3_credentials_file else {
        return Err(bad(
            "backup.s3_credentials_file",
            "is required with an s3:// repository".into(),
        ));
    };
    if credentials_file.as_os_str().is_empty() {
        return Err(bad(
            "backup.s3_credentials_file",
            "must not be empty".into(),
        ));
    }
    let max_object_mib = raw.s3_max_object_mib.unwrap_or(DEFAULT_S3_MAX_OBJECT_MIB);
    if !(1..=S3_MAX_OBJECT_MIB_LIMIT).contains(&max_object_mib) {
        return Err(bad(
            "backup.s3_max_object_mib",
            format!(
                "{max_object_mib} must be 1-{S3_MAX_OBJECT_MIB_LIMIT} (5 GiB, what S3 copies in one part)"
            ),
        ));
    }
    Ok(S3Config {
        max_object_size: max_object_mib << 20,
        bucket: bucket.into(),
        prefix: prefix.into(),
        endpoint,
        region,
        path_style: raw.s3_path_style.unwrap_or(false),
        credentials_file: resolve(credentials_file).components().collect(),
        config_path: path.to_path_buf(),
    })
}

/// `http(s)://host[:port]` with nothing after it (a trailing `/` is
/// dropped); returns it normalised.
fn validate_endpoint(e: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(e).map_err(|err| format!("{e:?}: {err}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{e:?} must start with http:// or https://"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{e:?} has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{e:?}: credentials go in s3_credentials_file, not in the URL"
        ));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{e:?} must be scheme://host[:port] only (the bucket goes in repository)"
        ));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
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
        assert_eq!(cfg.schedule, None);
        assert_eq!(cfg.schedule_from, ScheduleFrom::Replica);
        assert_eq!(cfg.schedule_timeout, DEFAULT_SCHEDULE_TIMEOUT);
        assert_eq!(cfg.clone_from, CloneFrom::Leader);
    }

    #[test]
    fn clone_from_key() {
        let load = |v: &str| {
            BackupConfig::validate(
                Path::new("/n.toml"),
                raw(&format!(
                    "[backup]\nrepository = \"/r\"\nclone_from = \"{v}\"\n"
                )),
                Path::to_path_buf,
            )
        };
        assert_eq!(load("backup").unwrap().clone_from, CloneFrom::Backup);
        assert_eq!(load("leader").unwrap().clone_from, CloneFrom::Leader);
        let err = load("replica").unwrap_err().to_string();
        assert!(
            err.contains("backup.clone_from") && err.contains("/n.toml"),
            "{err}"
        );
    }

    #[test]
    fn schedule_keys() {
        let cfg = BackupConfig::validate(
            Path::new("/n.toml"),
            raw("[backup]\nrepository = \"/r\"\nschedule = \"0  2 * * *\"\n"),
            Path::to_path_buf,
        )
        .unwrap();
        assert_eq!(
            cfg.schedule.as_ref().map(Schedule::as_str),
            Some("0 2 * * *")
        );
        assert_eq!(cfg.schedule_from, ScheduleFrom::Replica);
        // Without a schedule, schedule_from is checked and kept.
        let cfg = BackupConfig::validate(
            Path::new("/n.toml"),
            raw("[backup]\nrepository = \"/r\"\nschedule_from = \"leader\"\n"),
            Path::to_path_buf,
        )
        .unwrap();
        assert_eq!(
            (cfg.schedule, cfg.schedule_from),
            (None, ScheduleFrom::Leader)
        );
        // The message names the file, the key, the expression and the field.
        let err = BackupConfig::validate(
            Path::new("/etc/pgha/n.toml"),
            raw("[backup]\nrepository = \"/r\"\nschedule = \"61 * * * *\"\n"),
            Path::to_path_buf,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"/etc/pgha/n.toml: backup.schedule: "61 * * * *": minute "61": 61 is out of range 0-59"#
        );
    }

    #[test]
    fn schedule_timeout_key() {
        let load = |line: &str| {
            BackupConfig::validate(
                Path::new("/etc/pgha/n.toml"),
                raw(&format!(
                    "[backup]\nrepository = \"/r\"\nschedule = \"0 2 * * *\"\n{line}\n"
                )),
                Path::to_path_buf,
            )
        };
        let cases = [
            ("", DEFAULT_SCHEDULE_TIMEOUT),
            ("schedule_timeout = \"2h 30m\"", Duration::from_secs(9000)),
            ("schedule_timeout = \"1ms\"", Duration::from_millis(1)),
        ];
        for (line, want) in cases {
            assert_eq!(load(line).unwrap().schedule_timeout, want, "{line}");
        }
        assert_eq!(
            load("schedule_timeout = \"0s\"").unwrap_err().to_string(),
            "/etc/pgha/n.toml: backup.schedule_timeout: must be greater than 0"
        );
        // Not a duration: the parser's message, with the file.
        let err = toml::from_str::<RepositoryFile>(
            "[backup]\nrepository = \"/r\"\nschedule_timeout = \"soon\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("schedule_timeout"), "{err}");
        // The rendered repository file keeps it next to the schedule.
        let cfg = load("schedule_timeout = \"45m\"").unwrap();
        assert!(
            RepositoryFile::render(&cfg).contains("schedule_timeout = \"45m\""),
            "{}",
            RepositoryFile::render(&cfg)
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            ("compress_level = 0", "backup.compress_level"),
            ("compress_level = 22", "backup.compress_level"),
            ("parallel = 0", "backup.parallel"),
            ("keep = 0", "backup.keep"),
            ("archive_mode = \"off\"", "backup.archive_mode"),
            ("schedule = \"0 2 * *\"", "backup.schedule"),
            ("schedule = \"0 25 * * *\"", "backup.schedule"),
            ("schedule = \"@daily\"", "backup.schedule"),
            ("schedule_from = \"primary\"", "backup.schedule_from"),
            ("schedule_timeout = \"0s\"", "backup.schedule_timeout"),
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
            s3: None,
            schedule: Some(Schedule::parse("30 2 * * 0").unwrap()),
            schedule_from: ScheduleFrom::Leader,
            schedule_timeout: Duration::from_secs(90 * 60),
            clone_from: CloneFrom::Backup,
        };
        let text = RepositoryFile::render(&cfg);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backup.toml");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(load_backup_config(&path).unwrap(), cfg);
        let table: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(table.keys().collect::<Vec<_>>(), ["backup"]);
    }

    #[test]
    fn s3_repository_keys() {
        let cfg = BackupConfig::validate(
            Path::new("/etc/pgha/node.toml"),
            raw("[backup]\nrepository = \"s3://my-bucket/pg/main/\"\n\
                 s3_endpoint = \"http://127.0.0.1:9000/\"\n\
                 s3_path_style = true\n\
                 s3_credentials_file = \"s3.credentials\"\n"),
            |p| Path::new("/etc/pgha").join(p),
        )
        .unwrap();
        let s3 = cfg.s3.clone().expect("an S3 repository");
        assert_eq!(s3.bucket, "my-bucket");
        assert_eq!(s3.prefix, "pg/main");
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s3.region, DEFAULT_S3_REGION);
        assert!(s3.path_style);
        assert_eq!(s3.credentials_file, Path::new("/etc/pgha/s3.credentials"));
        assert_eq!(s3.max_object_size, DEFAULT_S3_MAX_OBJECT_MIB << 20);
        assert_eq!(cfg.repository, Path::new("s3://my-bucket/pg/main"));

        // The rendered file names the credentials file, and reads back the
        // same; it never holds a secret (the file is not even read here).
        let text = RepositoryFile::render(&cfg);
        assert!(
            text.contains("s3_credentials_file = \"/etc/pgha/s3.credentials\""),
            "{text}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backup.toml");
        std::fs::write(&path, &text).unwrap();
        let back = load_backup_config(&path).unwrap();
        let mut expected = cfg.clone();
        expected.s3.as_mut().unwrap().config_path = path.clone();
        assert_eq!(back, expected);

        // A bucket alone: no prefix, AWS, virtual-hosted.
        let cfg = BackupConfig::validate(
            Path::new("/n.toml"),
            raw(
                "[backup]\nrepository = \"s3://b.example\"\ns3_region = \"eu-west-3\"\n\
                 s3_credentials_file = \"/c\"\ns3_max_object_mib = 5120\n",
            ),
            Path::to_path_buf,
        )
        .unwrap();
        let text = RepositoryFile::render(&cfg);
        assert!(text.contains("s3_max_object_mib = 5120"), "{text}");
        let s3 = cfg.s3.unwrap();
        assert_eq!(
            (s3.prefix.as_str(), s3.endpoint, s3.path_style),
            ("", None, false)
        );
        assert_eq!(s3.region, "eu-west-3");
        assert_eq!(s3.max_object_size, 5 << 30);
    }

    #[test]
    fn bad_s3_values_name_the_key() {
        let s3 = "repository = \"s3://bucket/p\"\ns3_credentials_file = \"/c\"";
        let cases = [
            (
                "repository = \"s3://Bucket\"\ns3_credentials_file = \"/c\"",
                "backup.repository",
            ),
            (
                "repository = \"s3://b\"\ns3_credentials_file = \"/c\"",
                "backup.repository",
            ),
            (
                "repository = \"s3://\"\ns3_credentials_file = \"/c\"",
                "backup.repository",
            ),
            (
                "repository = \"s3://bucket/a/../b\"\ns3_credentials_file = \"/c\"",
                "backup.repository",
            ),
            (
                "repository = \"s3://bucket/a//b\"\ns3_credentials_file = \"/c\"",
                "backup.repository",
            ),
            ("repository = \"s3://bucket\"", "backup.s3_credentials_file"),
            (
                &format!("{s3}\ns3_endpoint = \"ftp://host\""),
                "backup.s3_endpoint",
            ),
            (
                &format!("{s3}\ns3_endpoint = \"http://host/bucket\""),
                "backup.s3_endpoint",
            ),
            (
                &format!("{s3}\ns3_endpoint = \"https://key:secret@host\""),
                "backup.s3_endpoint",
            ),
            (
                &format!("{s3}\ns3_endpoint = \"not a url\""),
                "backup.s3_endpoint",
            ),
            (&format!("{s3}\ns3_region = \"\""), "backup.s3_region"),
            (
                &format!("{s3}\ns3_region = \"EU West\""),
                "backup.s3_region",
            ),
            (
                "repository = \"/r\"\ns3_region = \"us-east-1\"",
                "backup.s3_region",
            ),
            (
                "repository = \"/r\"\ns3_endpoint = \"http://h\"",
                "backup.s3_endpoint",
            ),
            (
                "repository = \"/r\"\ns3_path_style = true",
                "backup.s3_path_style",
            ),
            (
                "repository = \"/r\"\ns3_credentials_file = \"/c\"",
                "backup.s3_credentials_file",
            ),
            (
                &format!("{s3}\ns3_max_object_mib = 0"),
                "backup.s3_max_object_mib",
            ),
            (
                &format!("{s3}\ns3_max_object_mib = 5121"),
                "backup.s3_max_object_mib",
            ),
            (
                "repository = \"/r\"\ns3_max_object_mib = 64",
                "backup.s3_max_object_mib",
            ),
        ];
        for (lines, key) in cases {
            let err = BackupConfig::validate(
                Path::new("/n.toml"),
                raw(&format!("[backup]\n{lines}\n")),
                Path::to_path_buf,
            )
            .unwrap_err();
            match err {
                ConfigError::Invalid { key: k, path, .. } => {
                    assert_eq!(k, key, "{lines}");
                    assert_eq!(path, Path::new("/n.toml"));
                }
                other => panic!("{lines}: {other}"),
            }
        }
    }
}
