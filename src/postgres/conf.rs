//! Pure renderers for the files pgha writes into a PostgreSQL data
//! directory. Each returns the file's text; writing it is the caller's job,
//! so the formats are tested without touching a disk.

use std::collections::BTreeMap;

/// Name of the file initdb produced, kept and included by ours so that the
/// locale and other initdb choices survive.
pub const BASE_CONF: &str = "postgresql.base.conf";

/// `wal_receiver_status_interval`, in milliseconds: standbys reply to the
/// leader at least this often even when idle, so the leader can tell a
/// standby that stopped replying (`ha::sync::replies_stale_after_ms`) from
/// an idle one. PostgreSQL's default, 10 s, would hide a cut for as long.
pub const STATUS_INTERVAL_MS: u64 = 1000;

/// Where replication should come from, for a replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Slot on the upstream reserved for this member.
    pub slot: String,
}

/// Everything that goes into the managed `postgresql.conf`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSettings {
    pub cluster_name: String,
    pub listen_addresses: String,
    pub port: u16,
    pub socket_dir: String,
    /// Passfile used by the WAL receiver (never a password in conninfo).
    pub passfile: String,
    pub upstream: Option<Upstream>,
    /// Synchronous standby names, when the leader manages them.
    pub synchronous_standby_names: Option<String>,
    /// Operator's extra parameters (the member's file over the cluster-wide
    /// ones, see `params::effective`); pgha's own settings win on conflict
    /// (validation already rejects overriding them).
    pub extra: BTreeMap<String, String>,
    /// WAL archiving into the backup repository (`[backup]`).
    pub archive: Option<Archiving>,
}

/// `archive_mode`, `archive_command` and `restore_command`, set together
/// when a backup repository is configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Archiving {
    pub mode: String,
    pub archive_command: String,
    pub restore_command: String,
}

/// Quotes a word for the shell PostgreSQL runs archive and restore
/// commands with.
pub fn quote_shell(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\"'\"'"))
}

/// Quotes a value for postgresql.conf: single quotes, with `'` doubled and
/// `\` escaped.
pub fn quote_conf(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// Quotes a value for a libpq connection string.
pub fn quote_conninfo(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The `primary_conninfo` for streaming from `up`. The password comes from
/// the passfile; `application_name` is the member name (pgha sets
/// cluster_name to it too) so the leader can tell standbys apart.
pub fn primary_conninfo(up: &Upstream, application_name: &str, passfile: &str) -> String {
    format!(
        "host={} port={} user={} passfile={} application_name={} sslmode=prefer connect_timeout=2 keepalives_idle=5 keepalives_interval=2 keepalives_count=3",
        quote_conninfo(&up.host),
        up.port,
        quote_conninfo(&up.user),
        quote_conninfo(passfile),
        quote_conninfo(application_name),
    )
}

pub fn render_postgresql_conf(s: &ServerSettings) -> String {
    let mut out = String::new();
    out.push_str("# Managed by pgha: rewritten on every start and role change. Put your\n");
    out.push_str("# settings in the pgha configuration file ([postgres.parameters]) or,\n");
    out.push_str(
        "# for every member, in etcd (pgha config set postgresql.parameters.NAME=VALUE).\n",
    );
    out.push_str(&format!("include_if_exists {}\n\n", quote_conf(BASE_CONF)));
    for (k, v) in &s.extra {
        out.push_str(&format!("{k} = {}\n", quote_conf(v)));
    }
    let mut own: Vec<(&str, String)> = vec![
        ("cluster_name", s.cluster_name.clone()),
        ("listen_addresses", s.listen_addresses.clone()),
        ("port", s.port.to_string()),
        ("unix_socket_directories", s.socket_dir.clone()),
        ("password_encryption", "scram-sha-256".into()),
        // pg_rewind needs either checksums (initdb --data-checksums) or
        // hint-bit WAL logging; clones of older clusters may lack checksums.
        ("wal_log_hints", "on".into()),
        ("hot_standby", "on".into()),
        ("recovery_target_timeline", "latest".into()),
        (
            "wal_receiver_status_interval",
            format!("{STATUS_INTERVAL_MS}ms"),
        ),
    ];
    // Operator may choose these (e.g. wal_level = logical); pgha only
    // supplies a replication-capable default.
    if !s.extra.contains_key("wal_level") {
        own.push(("wal_level", "replica".into()));
    }
    if !s.extra.contains_key("hot_standby_feedback") {
        own.push(("hot_standby_feedback", "on".into()));
    }
    // After a failover the WAL receiver reconnects to the new leader; the
    // default 5s between attempts would dominate the rejoin time.
    if !s.extra.contains_key("wal_retrieve_retry_interval") {
        own.push(("wal_retrieve_retry_interval", "500ms".into()));
    }
    // A walsender whose standby stopped replying holds its slot (the
    // standby cannot reconnect) until this expires; PostgreSQL's 60 s is
    // long next to pgha's failover times. Standbys reply every second
    // (above), so 10 s is ten missed replies, and the walsender asks for a
    // reply at half of it, which also covers pg_basebackup's WAL stream.
    if !s.extra.contains_key("wal_sender_timeout") {
        own.push(("wal_sender_timeout", "10s".into()));
    }
    if !s.extra.contains_key("max_wal_senders") {
        own.push(("max_wal_senders", "10".into()));
    }
    if !s.extra.contains_key("max_replication_slots") {
        own.push(("max_replication_slots", "10".into()));
    }
    if !s.extra.contains_key("wal_keep_size") {
        own.push(("wal_keep_size", "128MB".into()));
    }
    match &s.upstream {
        Some(up) => {
            own.push((
                "primary_conninfo",
                primary_conninfo(up, &s.cluster_name, &s.passfile),
            ));
            own.push(("primary_slot_name", up.slot.clone()));
        }
        None => {
            own.push(("primary_conninfo", String::new()));
            own.push(("primary_slot_name", String::new()));
        }
    }
    if let Some(a) = &s.archive {
        own.push(("archive_mode", a.mode.clone()));
        own.push(("archive_command", a.archive_command.clone()));
        own.push(("restore_command", a.restore_command.clone()));
    }
    own.push((
        "synchronous_standby_names",
        s.synchronous_standby_names.clone().unwrap_or_default(),
    ));
    out.push('\n');
    for (k, v) in own {
        out.push_str(&format!("{k} = {}\n", quote_conf(&v)));
    }
    out
}

/// Who may connect, and how. Everything uses SCRAM; nothing is `trust`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HbaPolicy {
    pub superuser: String,
    pub replication_user: String,
    pub replication_networks: Vec<String>,
    pub client_networks: Vec<String>,
    pub extra_lines: Vec<String>,
}

pub fn render_pg_hba(p: &HbaPolicy) -> String {
    let mut out = String::from(
        "# Managed by pgha. Extra lines come from postgres.pg_hba in its configuration.\n",
    );
    out.push_str("# TYPE  DATABASE     USER  ADDRESS  METHOD\n");
    out.push_str(&format!(
        "local   all          {}  scram-sha-256\n",
        p.superuser
    ));
    out.push_str(&format!(
        "local   replication  {}  scram-sha-256\n",
        p.replication_user
    ));
    for net in &p.replication_networks {
        out.push_str(&format!(
            "host    replication  {}  {}  scram-sha-256\n",
            p.replication_user, net
        ));
        // pg_rewind connects to a normal database as the superuser.
        out.push_str(&format!(
            "host    postgres     {}  {}  scram-sha-256\n",
            p.superuser, net
        ));
    }
    for line in &p.extra_lines {
        out.push_str(line);
        out.push('\n');
    }
    for net in &p.client_networks {
        out.push_str(&format!(
            "host    all          all  {}  scram-sha-256\n",
            net
        ));
    }
    out.push_str("local   all          all  scram-sha-256\n");
    out
}

/// One line of a libpq passfile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassEntry {
    pub host: String,
    pub port: String,
    pub database: String,
    pub user: String,
    pub password: String,
}

fn escape_pass_field(s: &str) -> String {
    s.replace('\\', "\\\\").replace(':', "\\:")
}

/// Renders a passfile (`host:port:db:user:password`, `:` and `\` escaped).
pub fn render_passfile(entries: &[PassEntry]) -> String {
    entries
        .iter()
        .map(|e| {
            format!(
                "{}:{}:{}:{}:{}\n",
                escape_pass_field(&e.host),
                escape_pass_field(&e.port),
                escape_pass_field(&e.database),
                escape_pass_field(&e.user),
                escape_pass_field(&e.password)
            )
        })
        .collect()
}

/// The file (in the data directory) that makes PostgreSQL start in
/// standby mode.
pub const STANDBY_SIGNAL: &str = "standby.signal";
pub const RECOVERY_SIGNAL: &str = "recovery.signal";

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ServerSettings {
        ServerSettings {
            cluster_name: "node1".into(),
            listen_addresses: "127.0.0.1".into(),
            port: 5433,
            socket_dir: "/tmp/s".into(),
            passfile: "/tmp/pgpass".into(),
            upstream: None,
            synchronous_standby_names: None,
            extra: BTreeMap::from([("work_mem".to_string(), "8MB".to_string())]),
            archive: None,
        }
    }

    #[test]
    fn conf_quotes_values() {
        assert_eq!(quote_conf("it's"), "'it''s'");
        assert_eq!(quote_conf(r"a\b"), r"'a\\b'");
        assert_eq!(quote_conninfo("it's"), r"'it\'s'");
    }

    #[test]
    fn primary_conf_has_no_upstream() {
        let text = render_postgresql_conf(&settings());
        assert!(text.contains("include_if_exists 'postgresql.base.conf'"));
        assert!(text.contains("port = '5433'\n"));
        assert!(text.contains("primary_conninfo = ''\n"));
        assert!(text.contains("work_mem = '8MB'\n"));
        assert!(text.contains("wal_level = 'replica'\n"));
    }

    #[test]
    fn standbys_reply_every_second_and_silent_ones_time_out_in_10s() {
        let text = render_postgresql_conf(&settings());
        assert!(text.contains("wal_receiver_status_interval = '1000ms'\n"));
        assert!(text.contains("wal_sender_timeout = '10s'\n"));
        let mut s = settings();
        s.extra.insert("wal_sender_timeout".into(), "60s".into());
        let text = render_postgresql_conf(&s);
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("wal_sender_timeout"))
            .collect();
        assert_eq!(lines, ["wal_sender_timeout = '60s'"]);
    }

    #[test]
    fn replica_conf_streams_through_a_passfile() {
        let mut s = settings();
        s.upstream = Some(Upstream {
            host: "10.0.0.2".into(),
            port: 5432,
            user: "replicator".into(),
            slot: "node1".into(),
        });
        let text = render_postgresql_conf(&s);
        let line = text
            .lines()
            .find(|l| l.starts_with("primary_conninfo"))
            .unwrap();
        assert!(line.contains("host=''10.0.0.2''"), "{line}");
        assert!(line.contains("passfile=''/tmp/pgpass''"), "{line}");
        assert!(line.contains("application_name=''node1''"), "{line}");
        assert!(
            !line.contains("password"),
            "no password in conninfo: {line}"
        );
        assert!(text.contains("primary_slot_name = 'node1'\n"));
    }

    #[test]
    fn hba_admits_only_configured_networks_with_scram() {
        let text = render_pg_hba(&HbaPolicy {
            superuser: "postgres".into(),
            replication_user: "replicator".into(),
            replication_networks: vec!["10.0.0.0/24".into()],
            client_networks: vec!["192.168.1.0/24".into()],
            extra_lines: vec!["host app app 10.1.0.0/16 scram-sha-256".into()],
        });
        assert!(text.contains("host    replication  replicator  10.0.0.0/24  scram-sha-256"));
        assert!(text.contains("host    all          all  192.168.1.0/24  scram-sha-256"));
        assert!(text.contains("host app app 10.1.0.0/16 scram-sha-256"));
        assert!(!text.contains("trust"));
        assert!(!text.contains("0.0.0.0/0"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.ends_with("scram-sha-256"), "{line}");
        }
    }

    #[test]
    fn passfile_escapes_separators() {
        let text = render_passfile(&[PassEntry {
            host: "*".into(),
            port: "5432".into(),
            database: "*".into(),
            user: "rep".into(),
            password: r"a:b\c".into(),
        }]);
        assert_eq!(text, "*:5432:*:rep:a\\:b\\\\c\n");
    }
}
