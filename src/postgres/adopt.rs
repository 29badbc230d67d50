//! Taking over a database pgha never managed: the existing production
//! server becomes a new cluster's first leader, without a dump and restore.
//!
//! pgha touches only what it needs: its own `postgresql.conf` (the
//! original is kept as the base it includes), its own `pg_hba.conf` (the
//! original is kept beside it), an empty `postgresql.auto.conf` (its
//! settings move into the base), and the two roles it logs in with. The
//! roles are set in single-user mode, before the server first starts under
//! pgha: no network login is needed, whatever authentication the database
//! used before, and the clear-text passwords never reach the server.

use super::conf::{self, BASE_CONF};
use super::ctl::{Instance, PgError};
use crate::safe_fs::TrustedDir;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// The first line pgha writes into `postgresql.auto.conf`; its presence (or
/// that of the base file) marks a data directory pgha manages.
pub const MANAGED_MARKER: &str = "# Managed by pgha";

/// The original `pg_hba.conf` of an adopted database, kept for reference:
/// its rules are not in force any more (pgha's `[postgres.hba]` are).
pub const HBA_BEFORE_ADOPTION: &str = "pg_hba.conf.before-pgha";

/// A data directory pgha has never managed, as found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unmanaged {
    /// Last ran as a primary (no signal file): it can become the leader.
    Primary,
    /// Set up to recover or stream from somewhere: pgha will not guess
    /// which history is the one to keep.
    Standby,
}

/// Whether `data` (an initialized data directory) was never managed by
/// pgha, and if so what it is. `None`: managed by pgha, or unreadable (the
/// caller then treats it as a foreign directory and touches nothing).
pub fn inspect(data: &TrustedDir) -> Option<Unmanaged> {
    if data.is_file(BASE_CONF).ok()? {
        return None;
    }
    let auto = data.read_to_string("postgresql.auto.conf").ok()?;
    if auto.is_some_and(|t| t.starts_with(MANAGED_MARKER)) {
        return None;
    }
    let signals = [conf::STANDBY_SIGNAL, "recovery.signal"];
    for s in signals {
        if data.is_file(s).ok()? {
            return Some(Unmanaged::Standby);
        }
    }
    Some(Unmanaged::Primary)
}

/// Settings of an adopted configuration that would take the server out of
/// pgha's hands: another data directory, authentication rules or pid file
/// than the ones pgha manages.
const CONFLICTING: [&str; 5] = [
    "data_directory",
    "hba_file",
    "ident_file",
    "external_pid_file",
    "config_file",
];

/// The adopted configuration with [`CONFLICTING`] settings commented out,
/// and the names of those it disabled. Everything else (memory, planner,
/// logging settings) stays in force; pgha's own settings follow the
/// include and win where both set a parameter.
pub fn sanitize_base(text: &str) -> (String, Vec<String>) {
    let mut out = String::with_capacity(text.len());
    let mut disabled = Vec::new();
    for line in text.lines() {
        let name = line
            .trim_start()
            .split(|c: char| c == '=' || c.is_whitespace())
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        if CONFLICTING.contains(&name.as_str()) {
            out.push_str("# disabled by pgha (it manages this setting): ");
            disabled.push(name);
        }
        out.push_str(line);
        out.push('\n');
    }
    (out, disabled)
}

/// `name` as an SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `name` as an SQL string literal.
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The statements that give pgha its two roles, one per line (single-user
/// mode ends a statement at a newline). Each role is created when missing
/// and otherwise altered, so running them twice is harmless. The passwords
/// go in as SCRAM verifiers.
pub fn roles_sql(
    superuser: &str,
    superuser_verifier: &str,
    replication_user: &str,
    replication_verifier: &str,
) -> String {
    let mut sql = String::new();
    for (role, attributes, verifier) in [
        (superuser, "SUPERUSER LOGIN", superuser_verifier),
        (replication_user, "REPLICATION LOGIN", replication_verifier),
    ] {
        sql.push_str(&format!(
            "DO $pgha$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = {}) THEN CREATE ROLE {}; END IF; END $pgha$;\n",
            quote_literal(role),
            quote_ident(role),
        ));
        sql.push_str(&format!(
            "ALTER ROLE {} WITH {attributes} PASSWORD {};\n",
            quote_ident(role),
            quote_literal(verifier),
        ));
    }
    sql
}

impl Instance {
    /// What [`inspect`] finds in this member's data directory.
    pub fn unmanaged(&self) -> Option<Unmanaged> {
        inspect(&self.data_dir_handle().ok()?)
    }

    /// Puts pgha's configuration files in place of the adopted ones,
    /// keeping the originals: `postgresql.conf` becomes the base pgha
    /// includes (with `postgresql.auto.conf`'s settings appended, where
    /// they keep their precedence), `pg_hba.conf` is kept as
    /// [`HBA_BEFORE_ADOPTION`]. Returns the settings it disabled. Run
    /// again after an interruption, it finds the base in place and does
    /// nothing.
    pub fn adopt_config_files(&self) -> Result<Vec<String>, PgError> {
        let data = self.data_dir_handle()?;
        if data.is_file(BASE_CONF)? {
            return Ok(Vec::new());
        }
        let mut base = data.read_to_string("postgresql.conf")?.unwrap_or_default();
        if let Some(auto) = data.read_to_string("postgresql.auto.conf")?
            && !auto.starts_with(MANAGED_MARKER)
        {
            base.push_str("\n# From postgresql.auto.conf (ALTER SYSTEM), moved here by pgha\n");
            base.push_str(&auto);
        }
        let (base, disabled) = sanitize_base(&base);
        if data.is_file("pg_hba.conf")? && !data.is_file(HBA_BEFORE_ADOPTION)? {
            data.rename("pg_hba.conf", HBA_BEFORE_ADOPTION)?;
        }
        // The base is written last: its presence marks the directory as
        // managed, so a crash before this point repeats the whole step.
        data.write_durable(BASE_CONF, base.as_bytes(), 0o600)?;
        if data.is_file("postgresql.conf")? {
            data.rename("postgresql.conf", "postgresql.conf.before-pgha")?;
        }
        Ok(disabled)
    }

    /// Creates or updates pgha's roles in single-user mode (the server
    /// must be stopped). Crash recovery, if the database was not shut down
    /// cleanly, happens here.
    pub async fn set_roles_single_user(&self, sql: &str) -> Result<(), PgError> {
        let action = "set pgha's roles in single-user mode";
        let mut cmd = self.command("postgres");
        cmd.arg("--single")
            .arg("-D")
            .arg(&self.data_dir)
            // Statements end at a newline; no echo of the input.
            .arg("template1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(super::ctl::io(format!("run postgres to {action}")))?;
        let mut stdin = child.stdin.take().expect("piped");
        stdin
            .write_all(sql.as_bytes())
            .await
            .map_err(super::ctl::io(format!("write to postgres to {action}")))?;
        drop(stdin);
        let timeout = Duration::from_secs(300);
        let out = tokio::time::timeout(timeout, child.wait_with_output())
            .await
            .map_err(|_| PgError::ToolTimeout {
                tool: "postgres".into(),
                action: action.into(),
                timeout,
            })?
            .map_err(super::ctl::io(format!("run postgres to {action}")))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Single-user mode reports a failed statement on stderr and goes
        // on; any ERROR means a role is not as pgha needs it.
        if !out.status.success() || stderr.contains("ERROR:") || stderr.contains("FATAL:") {
            return Err(PgError::Tool {
                tool: "postgres --single".into(),
                action: action.into(),
                status: out.status.to_string(),
                stderr: stderr.trim().to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_disables_only_settings_that_would_escape_pgha() {
        let base = "shared_buffers = 1GB\n\
                    data_directory = '/var/lib/postgresql/15/main'\n\
                    hba_file='/etc/postgresql/15/main/pg_hba.conf'\n  \
                    ident_file = '/etc/x'\n\
                    # hba_file = 'commented already'\n\
                    external_pid_file = '/run/x.pid'\n\
                    work_mem = 64MB\n";
        let (out, disabled) = sanitize_base(base);
        assert_eq!(
            disabled,
            vec![
                "data_directory",
                "hba_file",
                "ident_file",
                "external_pid_file"
            ]
        );
        assert!(
            out.contains("\nshared_buffers = 1GB\n") || out.starts_with("shared_buffers = 1GB\n")
        );
        assert!(out.contains("\nwork_mem = 64MB\n"));
        assert!(out.contains("# disabled by pgha (it manages this setting): data_directory"));
        assert!(out.contains("# disabled by pgha (it manages this setting): hba_file='/etc"));
        assert!(out.contains("\n# hba_file = 'commented already'\n"));
        // Nothing else changes: same lines, in order.
        assert_eq!(out.lines().count(), base.lines().count());
    }

    #[test]
    fn roles_sql_creates_or_alters_each_role_on_one_line_each() {
        let sql = roles_sql(
            "post\"gres",
            "SCRAM-SHA-256$4096:a$b:c",
            "re'pl",
            "SCRAM-SHA-256$4096:d$e:f",
        );
        let lines: Vec<&str> = sql.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].contains("rolname = 'post\"gres'"));
        assert!(lines[0].contains("CREATE ROLE \"post\"\"gres\";"));
        assert_eq!(
            lines[1],
            "ALTER ROLE \"post\"\"gres\" WITH SUPERUSER LOGIN PASSWORD 'SCRAM-SHA-256$4096:a$b:c';"
        );
        assert!(lines[2].contains("rolname = 're''pl'"));
        assert_eq!(
            lines[3],
            "ALTER ROLE \"re'pl\" WITH REPLICATION LOGIN PASSWORD 'SCRAM-SHA-256$4096:d$e:f';"
        );
    }

    fn dir_with(files: &[(&str, &str)]) -> (tempfile::TempDir, TrustedDir) {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("data");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        for (name, text) in files {
            std::fs::write(d.join(name), text).unwrap();
        }
        let handle = TrustedDir::open(
            &d,
            crate::safe_fs::Owner::current(),
            crate::safe_fs::Strictness::OwnerOnly,
        )
        .unwrap();
        (t, handle)
    }

    #[test]
    fn inspect_tells_managed_from_unmanaged_directories() {
        let (_t, d) = dir_with(&[
            ("postgresql.conf", "x"),
            ("postgresql.auto.conf", "# Do not edit\n"),
        ]);
        assert_eq!(inspect(&d), Some(Unmanaged::Primary));
        let (_t, d) = dir_with(&[("standby.signal", "")]);
        assert_eq!(inspect(&d), Some(Unmanaged::Standby));
        let (_t, d) = dir_with(&[("recovery.signal", "")]);
        assert_eq!(inspect(&d), Some(Unmanaged::Standby));
        let (_t, d) = dir_with(&[(
            "postgresql.auto.conf",
            "# Managed by pgha; use the pgha configuration.\n",
        )]);
        assert_eq!(inspect(&d), None);
        let (_t, d) = dir_with(&[(BASE_CONF, "")]);
        assert_eq!(inspect(&d), None);
    }
}
