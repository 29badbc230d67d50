//! Server parameters from two sources: the member's own file
//! (`[postgres.parameters]`) and the cluster-wide map in etcd
//! (`postgresql.parameters`, `pgha config set` / `pgha edit-config`).
//!
//! The pure part says which names pgha owns, which values would break
//! replication, and how the two sources combine. [`check_values`] asks
//! PostgreSQL's own parser (the `postgres` binary, no server needed) whether
//! values are valid, so a bad value is refused before it reaches a
//! configuration file a restart would read.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// Parameters pgha sets itself, with the reason an operator is given when
/// trying to set one. Overriding them would break replication, fencing or
/// the agent's own connection.
pub const OWNED: &[(&str, &str)] = &[
    (
        "port",
        "pgha sets it from postgres.port in each member's file",
    ),
    (
        "listen_addresses",
        "pgha sets it from postgres.listen_addresses in each member's file",
    ),
    (
        "unix_socket_directories",
        "pgha keeps the agent's socket in its state directory",
    ),
    ("hba_file", "pgha writes pg_hba.conf in the data directory"),
    ("ident_file", "pgha manages the files in the data directory"),
    ("data_directory", "pgha sets it from postgres.data_dir"),
    ("config_file", "pgha writes postgresql.conf itself"),
    ("primary_conninfo", "pgha points each replica at the leader"),
    (
        "primary_slot_name",
        "pgha points each replica at the leader",
    ),
    (
        "recovery_target_timeline",
        "replicas must follow the leader's newest timeline",
    ),
    ("hot_standby", "pgha's replicas must accept reads"),
    (
        "synchronous_standby_names",
        "the leader sets it from synchronous_mode (pgha config set synchronous_mode=...)",
    ),
    ("wal_log_hints", "pg_rewind needs it on"),
    (
        "password_encryption",
        "pgha creates SCRAM verifiers (scram-sha-256)",
    ),
    ("cluster_name", "pgha sets it to the member name"),
    (
        "wal_receiver_status_interval",
        "the leader's choice of synchronous standbys relies on replies every second",
    ),
];

/// Parameters `[backup]` sets on a member that has one. Refused
/// cluster-wide: archiving commands name per-member paths, and on members
/// with `[backup]` two sources would fight.
pub const ARCHIVING: &[&str] = &["archive_mode", "archive_command", "restore_command"];

/// Parameters a hot standby must have at least as high as its primary
/// (PostgreSQL refuses to run a standby otherwise). A cluster-wide value
/// for them wins over a member's own, so that every member has the same
/// and a failover cannot leave a replica that cannot start.
pub const SAME_ON_EVERY_MEMBER: &[&str] = &[
    "max_connections",
    "max_prepared_transactions",
    "max_locks_per_transaction",
    "max_wal_senders",
    "max_worker_processes",
];

/// Why a parameter may not be set cluster-wide, `None` when it may.
pub fn refusal(name: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    if let Some((_, reason)) = OWNED.iter().find(|(n, _)| *n == lower) {
        return Some(format!("is managed by pgha ({reason})"));
    }
    if ARCHIVING.contains(&lower.as_str()) {
        return Some(
            "is set by pgha from [backup]; without [backup], set it per member in [postgres.parameters]"
                .into(),
        );
    }
    None
}

/// Checks a parameter name's spelling (PostgreSQL's own check of the
/// name comes later, in [`check_values`]): letters, digits, `_` and `.`
/// (extension parameters such as `pg_stat_statements.max`).
pub fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if valid {
        Ok(())
    } else {
        Err("is not a valid parameter name".into())
    }
}

/// Values that PostgreSQL accepts but that would stop replication:
/// `wal_level = minimal`, or no WAL sender or slot for the replicas.
/// Values that are not numbers are left to [`check_values`].
pub fn check_minimum(name: &str, value: &str) -> Result<(), String> {
    let number = || value.trim().parse::<i64>().ok();
    match name.to_ascii_lowercase().as_str() {
        "wal_level" if value.trim().eq_ignore_ascii_case("minimal") => {
            Err("must be replica or logical: replicas need the WAL of wal_level = replica".into())
        }
        // pg_basebackup -X stream takes two senders while a clone runs.
        "max_wal_senders" if number().is_some_and(|n| n < 2) => {
            Err("must be at least 2: replicas and clones stream through WAL senders".into())
        }
        "max_replication_slots" if number().is_some_and(|n| n < 1) => {
            Err("must be at least 1: every replica has a slot on the leader".into())
        }
        _ => Ok(()),
    }
}

/// Every pure check of one cluster-wide parameter; the error names why.
pub fn check_cluster_parameter(name: &str, value: &str) -> Result<(), String> {
    check_name(name)?;
    if let Some(reason) = refusal(name) {
        return Err(reason);
    }
    if value.contains('\n') || value.contains('\r') {
        return Err("must be a single line".into());
    }
    check_minimum(name, value)
}

/// The parameters a member runs with: the cluster-wide ones, then its own
/// file's on top (a per-member override, e.g. memory sizes for a smaller
/// machine), except for [`SAME_ON_EVERY_MEMBER`], where the cluster-wide
/// value wins. Returns the merged map and the local values that were
/// ignored for that reason.
pub fn effective(
    local: &BTreeMap<String, String>,
    cluster: &BTreeMap<String, String>,
) -> (BTreeMap<String, String>, Vec<String>) {
    let mut merged = cluster.clone();
    let mut ignored = Vec::new();
    for (name, value) in local {
        if SAME_ON_EVERY_MEMBER.contains(&name.to_ascii_lowercase().as_str())
            && cluster.contains_key(name)
        {
            ignored.push(name.clone());
            continue;
        }
        merged.insert(name.clone(), value.clone());
    }
    (merged, ignored)
}

/// How to run `postgres` for [`check_values`].
#[derive(Clone, Debug)]
pub struct Checker<'a> {
    pub bin_dir: &'a Path,
    /// uid and gid to run as: `postgres` refuses to run as root.
    pub run_as: Option<(u32, u32)>,
}

/// Asks PostgreSQL whether each value is valid: `postgres -C` parses every
/// `-c name=value` with the server's own rules (names, units, ranges,
/// enumerations) and exits without touching a data directory. Libraries in
/// `shared_preload_libraries` are looked up too, since a missing one stops
/// the server only at its next start. Returns the problems by name;
/// empty when every value is valid.
pub async fn check_values(
    checker: &Checker<'_>,
    parameters: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, std::io::Error> {
    let mut problems = BTreeMap::new();
    if parameters.is_empty() {
        return Ok(problems);
    }
    // One process for all; only when it fails, one per parameter to name
    // every bad value (the server stops at the first).
    if run_postgres_check(checker, parameters.iter())
        .await?
        .is_some()
    {
        for (name, value) in parameters {
            if let Some(message) =
                run_postgres_check(checker, std::iter::once((name, value))).await?
            {
                problems.insert(name.clone(), message);
            }
        }
    }
    if let Some(libraries) = parameters
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("shared_preload_libraries"))
        .map(|(_, v)| v)
        && let Some(missing) = missing_library(checker, libraries).await?
    {
        problems.insert(
            "shared_preload_libraries".into(),
            format!("library {missing:?} is not installed; the server would not start"),
        );
    }
    Ok(problems)
}

/// Runs `postgres -C` with `parameters`; `Some(message)` when it refuses.
async fn run_postgres_check<'p>(
    checker: &Checker<'_>,
    parameters: impl Iterator<Item = (&'p String, &'p String)>,
) -> Result<Option<String>, std::io::Error> {
    let mut cmd = tokio::process::Command::new(checker.bin_dir.join("postgres"));
    // No configuration file, and a data directory that does not exist:
    // nothing but the command line is read.
    cmd.args([
        "--config-file=/dev/null",
        "-c",
        "data_directory=/nonexistent",
        "-c",
        "hba_file=/dev/null",
        "-c",
        "ident_file=/dev/null",
        "-C",
        "server_version",
    ]);
    for (name, value) in parameters {
        cmd.arg("-c").arg(format!("{name}={value}"));
    }
    cmd.env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .current_dir("/")
        .kill_on_drop(true);
    if let Some((uid, gid)) = checker.run_as {
        cmd.uid(uid).gid(gid);
    }
    let out = tokio::time::timeout(Duration::from_secs(10), cmd.output())
        .await
        .map_err(|_| std::io::Error::other("postgres -C did not finish within 10 s"))??;
    if out.status.success() {
        return Ok(None);
    }
    Ok(Some(server_complaint(&String::from_utf8_lossy(
        &out.stderr,
    ))))
}

/// The lines of `postgres` output that say what is wrong, without the
/// log prefix: `invalid value for parameter "work_mem": "abc"`.
pub fn server_complaint(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .filter_map(|l| {
            ["FATAL:", "HINT:", "DETAIL:"]
                .iter()
                .find_map(|tag| l.split_once(tag).map(|(_, rest)| rest.trim()))
        })
        .collect();
    if lines.is_empty() {
        stderr.trim().to_string()
    } else {
        lines.join("; ")
    }
}

/// The names in a `shared_preload_libraries` value.
pub fn library_names(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(|l| l.trim().trim_matches('"').trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// The first library in `value` that is not installed, looked up as the
/// server does: a name with a `/` is a path (`$libdir` expanded), any
/// other is `$libdir/NAME` with or without `.so`.
async fn missing_library(
    checker: &Checker<'_>,
    value: &str,
) -> Result<Option<String>, std::io::Error> {
    let names = library_names(value);
    if names.is_empty() {
        return Ok(None);
    }
    let out = tokio::process::Command::new(checker.bin_dir.join("pg_config"))
        .arg("--pkglibdir")
        .stdin(Stdio::null())
        .output()
        .await;
    // Without pg_config the lookup is skipped: the value was still
    // parsed, and a missing library shows in the server log at restart.
    let out = match out {
        Ok(out) if out.status.success() => out,
        _ => return Ok(None),
    };
    let libdir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(names.into_iter().find(|name| {
        let path = name.replace("$libdir", &libdir);
        let candidates = if path.contains('/') {
            vec![path.clone(), format!("{path}.so")]
        } else {
            vec![format!("{libdir}/{path}"), format!("{libdir}/{path}.so")]
        };
        !candidates.iter().any(|c| Path::new(c).is_file())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn owned_and_archiving_parameters_are_refused_with_a_reason() {
        for (name, expected) in [
            ("synchronous_standby_names", "synchronous_mode"),
            ("PORT", "postgres.port"),
            ("primary_conninfo", "leader"),
            ("archive_command", "[backup]"),
            ("restore_command", "[backup]"),
            ("hba_file", "pg_hba.conf"),
        ] {
            let reason = check_cluster_parameter(name, "x").unwrap_err();
            assert!(reason.contains(expected), "{name}: {reason}");
        }
        for name in ["work_mem", "max_connections", "pg_stat_statements.max"] {
            assert_eq!(check_cluster_parameter(name, "1"), Ok(()), "{name}");
        }
    }

    #[test]
    fn names_and_values_that_break_replication_are_refused() {
        let cases = [
            ("wal_level", "minimal", false),
            ("wal_level", "Minimal", false),
            ("wal_level", "logical", true),
            ("max_wal_senders", "1", false),
            ("max_wal_senders", "2", true),
            ("max_replication_slots", "0", false),
            ("max_replication_slots", "abc", true),
            ("work_mem", "64MB\nport = 1", false),
            ("work mem", "1", false),
            ("", "1", false),
        ];
        for (name, value, ok) in cases {
            assert_eq!(
                check_cluster_parameter(name, value).is_ok(),
                ok,
                "{name} = {value:?}"
            );
        }
    }

    #[test]
    fn a_members_file_overrides_the_cluster_except_where_members_must_agree() {
        let local = map(&[
            ("work_mem", "8MB"),
            ("max_connections", "50"),
            ("shared_buffers", "64MB"),
        ]);
        let cluster = map(&[
            ("work_mem", "64MB"),
            ("max_connections", "200"),
            ("random_page_cost", "1.1"),
        ]);
        let (merged, ignored) = effective(&local, &cluster);
        assert_eq!(
            merged,
            map(&[
                ("work_mem", "8MB"),
                ("max_connections", "200"),
                ("shared_buffers", "64MB"),
                ("random_page_cost", "1.1"),
            ])
        );
        assert_eq!(ignored, vec!["max_connections".to_string()]);
        // Without a cluster-wide value the member's own one is used.
        let (merged, ignored) = effective(&local, &BTreeMap::new());
        assert_eq!(merged, local);
        assert!(ignored.is_empty());
    }

    #[test]
    fn server_messages_lose_their_log_prefix() {
        let stderr = "2026-12-01 04:22:18.611 GMT [3202] FATAL:  invalid value for parameter \"wal_level\": \"foo\"\n2026-12-01 04:22:18.611 GMT [3202] HINT:  Available values: minimal, replica, logical.\n";
        assert_eq!(
            server_complaint(stderr),
            "invalid value for parameter \"wal_level\": \"foo\"; Available values: minimal, replica, logical."
        );
        assert_eq!(
            library_names(" pg_stat_statements, \"$libdir/auto_explain\" ,"),
            vec!["pg_stat_statements", "$libdir/auto_explain"]
        );
    }
}
