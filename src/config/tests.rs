//! Tests for parsing (`validate::parse`) and validation (`validate::validate`
//! and `validate::validate_ha`): every rule, every default, and the shape of
//! the error an operator sees.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::RawHa;
use super::*;

/// The file name every in-memory config pretends to come from. Its
/// directory is what relative paths are resolved against.
const PATH: &str = "/etc/pgha/node.toml";

/// Real PostgreSQL binaries on the test machine.
const REAL_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

const SUPER_PW: &str = "super-Secret-1";
const REPL_PW: &str = "repl-Secret-22";
const ETCD_PW: &str = "etcd-Secret-333";

/// A small valid configuration: only required keys, plus the real bin dir.
fn base_text() -> String {
    format!(
        r#"
cluster = "main"
name = "node1"

[etcd]
endpoints = ["http://127.0.0.1:2379"]

[postgres]
bin_dir = "{REAL_BIN_DIR}"
data_dir = "/var/lib/pgha/data"

[postgres.superuser]
username = "postgres"
password = "{SUPER_PW}"

[postgres.replication]
username = "replicator"
password = "{REPL_PW}"
"#
    )
}

/// The base document as a TOML table that tests edit before rendering it.
struct Doc(toml::Table);

fn doc() -> Doc {
    Doc(base_text().parse().expect("base config is valid TOML"))
}

impl Doc {
    /// Merges `snippet` (TOML `key = value` lines) into the table at dotted
    /// `section` ("" for the top level), creating tables as needed and
    /// replacing keys that are already there.
    fn set(mut self, section: &str, snippet: &str) -> Doc {
        let add: toml::Table = snippet
            .parse()
            .unwrap_or_else(|e| panic!("bad test snippet {snippet:?}: {e}"));
        let mut table = &mut self.0;
        for part in section.split('.').filter(|p| !p.is_empty()) {
            table = table
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .unwrap_or_else(|| panic!("{section} is not a table in the test doc"));
        }
        for (k, v) in add {
            table.insert(k, v);
        }
        self
    }

    /// Removes the key at dotted path `key`.
    fn unset(mut self, key: &str) -> Doc {
        let (section, last) = key.rsplit_once('.').unwrap_or(("", key));
        let mut table = &mut self.0;
        for part in section.split('.').filter(|p| !p.is_empty()) {
            table = table
                .get_mut(part)
                .and_then(toml::Value::as_table_mut)
                .expect("section exists");
        }
        assert!(table.remove(last).is_some(), "test doc has no {key}");
        self
    }

    fn text(&self) -> String {
        toml::to_string(&self.0).expect("test doc renders")
    }

    fn load(&self) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new(PATH), &self.text())
    }

    fn ok(&self) -> Config {
        self.load()
            .unwrap_or_else(|e| panic!("expected a valid config, got: {e}\n---\n{}", self.text()))
    }
}

/// Asserts `result` is an `Invalid` error for `key` whose message contains
/// `fragment`, and that the operator-facing text names file and key.
#[track_caller]
fn assert_invalid(result: Result<Config, ConfigError>, key: &str, fragment: &str) {
    match result {
        Ok(_) => panic!("expected an error for {key} ({fragment:?}), but the config was accepted"),
        Err(ConfigError::Invalid {
            path,
            key: got_key,
            message,
        }) => {
            assert_eq!(path, Path::new(PATH));
            assert_eq!(got_key, key, "wrong key; message was {message:?}");
            assert!(
                message.contains(fragment),
                "message for {key} is {message:?}, expected it to contain {fragment:?}"
            );
            let shown = ConfigError::Invalid {
                path,
                key: got_key,
                message: message.clone(),
            }
            .to_string();
            assert_eq!(shown, format!("{PATH}: {key}: {message}"));
        }
        Err(other) => panic!("expected Invalid for {key}, got {other:?}"),
    }
}

/// One row of a table-driven test: merge `snippet` into `section`, expect
/// an error naming `key` with a message containing `fragment`.
type Case = (&'static str, &'static str, &'static str, &'static str);

#[track_caller]
fn run_cases(cases: &[Case]) {
    let mut failures = Vec::new();
    for &(section, snippet, key, fragment) in cases {
        let d = doc().set(section, snippet);
        let result = std::panic::catch_unwind(|| assert_invalid(d.load(), key, fragment));
        if let Err(p) = result {
            let msg = p.downcast_ref::<String>().cloned().unwrap_or_default();
            failures.push(format!("[{section}] {snippet}: {msg}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn dur(s: &str) -> Duration {
    humantime::parse_duration(s).unwrap()
}

// ---------------------------------------------------------------- baseline

#[test]
fn base_config_is_valid() {
    let c = doc().ok();
    assert_eq!(c.cluster, "main");
    assert_eq!(c.name.as_str(), "node1");
    assert_eq!(c.path, Path::new(PATH));
}

#[test]
fn defaults_of_every_key_when_omitted() {
    let c = doc().unset("postgres.bin_dir").ok();
    assert_eq!(c.namespace, "pgha");
    assert_eq!(c.state_dir, Path::new("/var/lib/pgha/data.pgha"));
    assert_eq!(c.etcd.endpoints, vec!["http://127.0.0.1:2379".to_string()]);
    assert!(c.etcd.credentials.is_none());

    assert_eq!(c.ha.ttl, Duration::from_secs(3));
    assert_eq!(c.ha.loop_wait, Duration::from_millis(500));
    assert_eq!(c.ha.retry_timeout, Duration::from_millis(1000));
    assert_eq!(c.ha.fence_margin, Duration::from_millis(500));
    assert_eq!(c.ha.priority, 100);
    assert!(!c.ha.nofailover);
    assert_eq!(c.ha.maximum_lag_on_failover, 1024 * 1024);
    assert_eq!(c.ha.primary_start_timeout, Duration::from_secs(10));
    assert_eq!(c.ha.stream_stall_timeout, Duration::from_secs(15));
    assert!(c.ha.reclone_on_rewind_failure);
    assert_eq!(
        c.ha,
        HaConfig::default(),
        "HaConfig::default() must match an omitted [ha]"
    );

    let pg = &c.postgres;
    assert_eq!(pg.bin_dir, Path::new("/usr/lib/postgresql/15/bin"));
    assert_eq!(pg.data_dir, Path::new("/var/lib/pgha/data"));
    assert_eq!(pg.listen_addresses, "127.0.0.1");
    assert_eq!(pg.connect_host, "127.0.0.1");
    assert_eq!(pg.port, 5432);
    assert_eq!(pg.os_user, "postgres");
    assert_eq!(pg.superuser.username, "postgres");
    assert_eq!(pg.superuser.password.expose(), SUPER_PW);
    assert_eq!(pg.replication.username, "replicator");
    assert_eq!(pg.replication.password.expose(), REPL_PW);
    assert_eq!(pg.replication_networks, vec!["127.0.0.1/32".to_string()]);
    assert_eq!(pg.client_networks, vec!["127.0.0.1/32".to_string()]);
    assert!(pg.pg_hba.is_empty());
    assert!(pg.parameters.is_empty());

    assert_eq!(c.api.listen, "127.0.0.1:8008".parse().unwrap());
    assert_eq!(c.api.connect_url, "http://127.0.0.1:8008");
    assert_eq!(
        c.api.limits,
        crate::config::ApiLimits {
            header_read_timeout: dur("5s"),
            body_read_timeout: dur("10s"),
            idle_timeout: dur("60s"),
            max_connections: 256,
        }
    );

    assert_eq!(c.dcs_prefix(), "/pgha/main/");
    assert_eq!(
        c.passfile_path(),
        Path::new("/var/lib/pgha/data.pgha/postgres/pgpass")
    );
    assert_eq!(
        c.socket_dir(),
        Path::new("/var/lib/pgha/data.pgha/postgres/run")
    );
}

#[test]
fn every_key_set_explicitly_is_carried_over() {
    let text = format!(
        r#"
cluster = "orders-db"
namespace = "prod.eu"
name = "db_2"
state_dir = "/srv/pgha/state"

[etcd]
endpoints = ["https://etcd1:2379", "https://etcd2:2379"]
username = "pgha"
password = "{ETCD_PW}"

[ha]
ttl = "10s"
loop_wait = "1s"
retry_timeout = "3s"
fence_margin = "2s"
priority = 7
nofailover = true
maximum_lag_on_failover = 5000
primary_start_timeout = "1m"
stream_stall_timeout = "30s"
reclone_on_rewind_failure = false

[postgres]
bin_dir = "{REAL_BIN_DIR}"
data_dir = "/srv/pg/data"
listen_addresses = "10.1.2.3,127.0.0.1"
connect_host = "db2.example.com"
port = 6543
os_user = "pg"
replication_networks = ["10.1.0.0/16", "fd00::/8"]
client_networks = ["0.0.0.0/0"]
pg_hba = ["host all monitor 10.9.0.0/16 scram-sha-256"]

[postgres.superuser]
username = "admin"
password = "{SUPER_PW}"

[postgres.replication]
username = "repl_user"
password = "{REPL_PW}"

[postgres.parameters]
shared_buffers = "1GB"
max_connections = 300

[api]
listen = "0.0.0.0:9008"
connect_url = "https://db2.example.com:9008"
"#
    );
    let c = Config::from_toml(Path::new(PATH), &text).unwrap();
    assert_eq!(c.cluster, "orders-db");
    assert_eq!(c.namespace, "prod.eu");
    assert_eq!(c.name, MemberName::new("db_2"));
    assert_eq!(c.state_dir, Path::new("/srv/pgha/state"));
    assert_eq!(c.dcs_prefix(), "/prod.eu/orders-db/");
    assert_eq!(
        c.etcd.endpoints,
        vec!["https://etcd1:2379", "https://etcd2:2379"]
    );
    let (user, pw) = c.etcd.credentials.as_ref().expect("credentials");
    assert_eq!(user, "pgha");
    assert_eq!(pw.expose(), ETCD_PW);
    assert_eq!(
        c.ha,
        HaConfig {
            ttl: dur("10s"),
            loop_wait: dur("1s"),
            retry_timeout: dur("3s"),
            fence_margin: dur("2s"),
            priority: 7,
            nofailover: true,
            maximum_lag_on_failover: 5000,
            primary_start_timeout: dur("60s"),
            stream_stall_timeout: dur("30s"),
            reclone_on_rewind_failure: false,
            nosync: false,
        }
    );
    let pg = &c.postgres;
    assert_eq!(pg.data_dir, Path::new("/srv/pg/data"));
    assert_eq!(pg.listen_addresses, "10.1.2.3,127.0.0.1");
    assert_eq!(pg.connect_host, "db2.example.com");
    assert_eq!(pg.port, 6543);
    assert_eq!(pg.os_user, "pg");
    assert_eq!(pg.superuser.username, "admin");
    assert_eq!(pg.replication.username, "repl_user");
    assert_eq!(pg.replication_networks, vec!["10.1.0.0/16", "fd00::/8"]);
    assert_eq!(pg.client_networks, vec!["0.0.0.0/0"]);
    assert_eq!(
        pg.pg_hba,
        vec!["host all monitor 10.9.0.0/16 scram-sha-256"]
    );
    assert_eq!(
        pg.parameters.get("shared_buffers").map(String::as_str),
        Some("1GB")
    );
    assert_eq!(
        pg.parameters.get("max_connections").map(String::as_str),
        Some("300")
    );
    assert_eq!(c.api.listen, "0.0.0.0:9008".parse().unwrap());
    assert_eq!(c.api.connect_url, "https://db2.example.com:9008");
}

// ---------------------------------------------------------------- parse()

#[test]
fn unknown_keys_are_rejected_and_named_in_every_table() {
    run_cases(&[
        ("", "foo = 1", "foo", "unknown field `foo`"),
        ("etcd", "bogus = 1", "etcd.bogus", "unknown field `bogus`"),
        ("ha", "foo = 1", "ha.foo", "unknown field `foo`"),
        (
            "postgres",
            "bogus = 1",
            "postgres.bogus",
            "unknown field `bogus`",
        ),
        (
            "postgres.superuser",
            "role = 1",
            "postgres.superuser.role",
            "unknown field `role`",
        ),
        (
            "postgres.replication",
            "role = 1",
            "postgres.replication.role",
            "unknown field `role`",
        ),
        ("api", "foo = 1", "api.foo", "unknown field `foo`"),
        // A typo of a real key is the common case.
        (
            "ha",
            "loopwait = \"1s\"",
            "ha.loopwait",
            "unknown field `loopwait`",
        ),
        ("", "[misc]\nx = 1", "misc", "unknown field `misc`"),
    ]);
}

#[test]
fn wrong_types_name_the_key() {
    run_cases(&[
        (
            "postgres",
            "port = \"x\"",
            "postgres.port",
            "invalid type: string \"x\"",
        ),
        ("postgres", "port = 70000", "postgres.port", "expected u16"),
        ("postgres", "port = -1", "postgres.port", "expected u16"),
        ("", "cluster = 1", "cluster", "invalid type: integer"),
        ("", "state_dir = true", "state_dir", "invalid type"),
        (
            "etcd",
            "endpoints = \"http://127.0.0.1:2379\"",
            "etcd.endpoints",
            "expected a sequence",
        ),
        (
            "etcd",
            "endpoints = [1]",
            "etcd.endpoints[0]",
            "invalid type: integer",
        ),
        ("ha", "priority = -1", "ha.priority", "expected u32"),
        (
            "ha",
            "nofailover = \"yes\"",
            "ha.nofailover",
            "expected a boolean",
        ),
        (
            "ha",
            "maximum_lag_on_failover = -5",
            "ha.maximum_lag_on_failover",
            "expected u64",
        ),
        (
            "ha",
            "reclone_on_rewind_failure = 1",
            "ha.reclone_on_rewind_failure",
            "expected a boolean",
        ),
        (
            "postgres",
            "pg_hba = \"host all all ::/0 md5\"",
            "postgres.pg_hba",
            "expected a sequence",
        ),
        (
            "postgres",
            "replication_networks = [\"10.0.0.0/8\", 10]",
            "postgres.replication_networks[1]",
            "invalid type",
        ),
        (
            "postgres",
            "superuser = \"postgres\"",
            "postgres.superuser",
            "invalid type: string",
        ),
        (
            "postgres.superuser",
            "username = 0",
            "postgres.superuser.username",
            "invalid type: integer",
        ),
        (
            "api",
            "listen = 8008",
            "api.listen",
            "invalid type: integer",
        ),
    ]);
}

#[test]
fn missing_required_keys() {
    // The error names the full key of the missing field.
    assert_invalid(
        doc().unset("postgres.data_dir").load(),
        "postgres.data_dir",
        "is required",
    );
    assert_invalid(
        doc().unset("etcd.endpoints").load(),
        "etcd.endpoints",
        "is required",
    );
    assert_invalid(
        doc().unset("postgres.replication.password").load(),
        "postgres.replication.password",
        "is required",
    );
    assert_invalid(doc().unset("cluster").load(), "cluster", "is required");
    let shown = doc().unset("name").load().unwrap_err().to_string();
    assert_eq!(shown, format!("{PATH}: name: is required"));
}

#[test]
fn toml_syntax_errors_name_the_line() {
    let cases: &[(&str, usize, &str)] = &[
        // (text, line, message fragment); errors start mid-line here.
        ("cluster = \"main\"\nname = \"n\"\nx = = 1\n", 3, "="),
        ("cluster = \"main\"\n\n\n\nname = \"unterminated\n", 5, ""),
        (
            "cluster = \"main\"\nname = \"n\"\n[etcd\nendpoints = []\n",
            3,
            "",
        ),
        ("a = 1\nb = 2\nc = [1, 2\n", 3, ""),
    ];
    for &(text, line, fragment) in cases {
        match Config::from_toml(Path::new(PATH), text) {
            Err(ConfigError::Syntax {
                path,
                line: got,
                message,
            }) => {
                assert_eq!(path, Path::new(PATH));
                assert_eq!(got, line, "wrong line for {text:?} ({message})");
                assert!(message.contains(fragment), "{message:?}");
                assert!(!message.is_empty());
                let shown = ConfigError::Syntax {
                    path,
                    line: got,
                    message: message.clone(),
                }
                .to_string();
                assert_eq!(shown, format!("{PATH}: line {line}: {message}"));
            }
            other => panic!("expected a syntax error for {text:?}, got {other:?}"),
        }
    }
}

/// Known bug (see report): when the offending token starts a line, the
/// line number is one too small, because `syntax()` counts the lines of the
/// text *before* the token, and that text ends with the newline.
#[test]
fn toml_syntax_error_at_start_of_line_names_that_line() {
    match Config::from_toml(Path::new(PATH), "cluster = \"a\"\nname = \"n\"\n= 1\n") {
        Err(ConfigError::Syntax { line, .. }) => assert_eq!(line, 3),
        other => panic!("{other:?}"),
    }
    match Config::from_toml(Path::new(PATH), "cluster = \"a\"\ncluster = \"b\"\n") {
        Err(ConfigError::Syntax { line, .. }) => assert_eq!(line, 2),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unreadable_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let e = Config::load(&missing).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
    // The message says what failed; the cause follows once, in the chain.
    assert_eq!(e.to_string(), format!("{}: cannot read", missing.display()));
    let shown = crate::util::chain(&e).to_string();
    assert!(
        shown.starts_with(&format!("{}: cannot read: ", missing.display())),
        "{shown}"
    );
    assert_eq!(shown.matches("No such file").count(), 1, "{shown}");
}

#[test]
fn load_reads_the_file_and_records_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.toml");
    std::fs::write(&file, base_text()).unwrap();
    let c = Config::load(&file).unwrap();
    assert_eq!(c.path, file);
    assert_eq!(c.cluster, "main");
}

// ---------------------------------------------------------------- names

#[test]
fn cluster_namespace_and_member_names() {
    let long = "a".repeat(64);
    let long_cluster = format!("cluster = \"{long}\"");
    let long_name = format!("name = \"{long}\"");
    run_cases(&[
        ("", "cluster = \"\"", "cluster", "must be 1-63 characters"),
        (
            "",
            "cluster = \"a b\"",
            "cluster",
            "must be 1-63 characters",
        ),
        (
            "",
            "cluster = \"a/b\"",
            "cluster",
            "must be 1-63 characters",
        ),
        (
            "",
            "namespace = \"\"",
            "namespace",
            "must be 1-63 characters",
        ),
        (
            "",
            "namespace = \"x/y\"",
            "namespace",
            "must be 1-63 characters",
        ),
        ("", "name = \"node 1\"", "name", "must be 1-63 characters"),
        ("", "name = \"nöde\"", "name", "must be 1-63 characters"),
    ]);
    assert_invalid(doc().set("", &long_cluster).load(), "cluster", "1-63");
    assert_invalid(doc().set("", &long_name).load(), "name", "1-63");
    let ok63 = format!("name = \"{}\"", "a".repeat(63));
    assert_eq!(doc().set("", &ok63).ok().name.as_str().len(), 63);
    let c = doc()
        .set(
            "",
            "cluster = \"A-b_c.1\"\nnamespace = \"x.y-z\"\nname = \"Node-1.eu_west\"",
        )
        .ok();
    assert_eq!(c.dcs_prefix(), "/x.y-z/A-b_c.1/");
    assert_eq!(c.name.as_str(), "Node-1.eu_west");
}

// ---------------------------------------------------------------- etcd

#[test]
fn etcd_endpoints() {
    run_cases(&[
        (
            "etcd",
            "endpoints = []",
            "etcd.endpoints",
            "at least one endpoint is required",
        ),
        (
            "etcd",
            "endpoints = [\"127.0.0.1:2379\"]",
            "etcd.endpoints[0]",
            "must look like http://host:port",
        ),
        (
            "etcd",
            "endpoints = [\"http://a:2379\", \"b:2379\"]",
            "etcd.endpoints[1]",
            "\"b:2379\"",
        ),
        (
            "etcd",
            "endpoints = [\"http://\"]",
            "etcd.endpoints[0]",
            "must look like http://host:port",
        ),
        (
            "etcd",
            "endpoints = [\"ftp://a:2379\"]",
            "etcd.endpoints[0]",
            "must look like",
        ),
        (
            "etcd",
            "endpoints = [\"HTTP://a:2379\"]",
            "etcd.endpoints[0]",
            "must look like",
        ),
        (
            "etcd",
            "endpoints = [\"\"]",
            "etcd.endpoints[0]",
            "must look like",
        ),
    ]);
    let c = doc()
        .set(
            "etcd",
            "endpoints = [\"http://a:2379\", \"http://b:2379\", \"http://[::1]:2379\"]",
        )
        .ok();
    assert_eq!(
        c.etcd.endpoints,
        vec!["http://a:2379", "http://b:2379", "http://[::1]:2379"]
    );
    assert_eq!(c.etcd.tls, None);
}

/// Known bug (see report): the length check compares against
/// `"http://".len()`, so a bare `https://` passes.
#[test]
fn etcd_endpoint_bare_https_is_rejected() {
    assert_invalid(
        doc().set("etcd", "endpoints = [\"https://\"]").load(),
        "etcd.endpoints[0]",
        "must look like",
    );
}

#[test]
fn etcd_username_and_password_go_together() {
    assert_invalid(
        doc().set("etcd", "username = \"pgha\"").load(),
        "etcd.password",
        "required when etcd.username is set",
    );
    assert_invalid(
        doc()
            .set("etcd", &format!("password = \"{ETCD_PW}\""))
            .load(),
        "etcd.username",
        "required when etcd.password is set",
    );
    let c = doc()
        .set(
            "etcd",
            &format!("username = \"pgha\"\npassword = \"{ETCD_PW}\""),
        )
        .ok();
    let (u, p) = c.etcd.credentials.unwrap();
    assert_eq!(u, "pgha");
    assert_eq!(p.expose(), ETCD_PW);
}

// ---------------------------------------------------------------- etcd TLS

/// Throwaway PEM files made once per test run with the `openssl` command:
/// a CA, a certificate signed by it with its key, and a second key.
struct Pems {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    other_key: PathBuf,
    not_pem: PathBuf,
}

fn pems() -> &'static Pems {
    static PEMS: std::sync::OnceLock<Pems> = std::sync::OnceLock::new();
    PEMS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &str| {
            let out = std::process::Command::new("openssl")
                .args(args.split_whitespace())
                .current_dir(dir.path())
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
        openssl(&format!(
            "req -x509 {ec} -keyout ca.key -out ca.pem -days 2 -subj /CN=ca"
        ));
        openssl(&format!("req {ec} -keyout client.key -out client.csr -subj /CN=c"));
        std::fs::write(dir.path().join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        openssl(
            "x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile client.ext -out client.pem",
        );
        std::fs::write(dir.path().join("notes.txt"), "not a certificate\n").unwrap();
        let p = |n: &str| dir.path().join(n);
        Pems {
            ca: p("ca.pem"),
            cert: p("client.pem"),
            key: p("client.key"),
            other_key: p("ca.key"),
            not_pem: p("notes.txt"),
            _dir: dir,
        }
    })
}

/// `[etcd]` with https endpoints and the given extra lines.
fn https_etcd(extra: &str) -> Doc {
    doc().set(
        "etcd",
        &format!("endpoints = [\"https://e1:2379\", \"https://e2:2379\"]\n{extra}"),
    )
}

fn path_line(key: &str, path: &Path) -> String {
    format!("{key} = {:?}\n", path.display().to_string())
}

#[test]
fn etcd_tls_with_ca_and_client_certificate() {
    let p = pems();
    let c = https_etcd(
        &(path_line("ca_file", &p.ca)
            + &path_line("cert_file", &p.cert)
            + &path_line("key_file", &p.key)),
    )
    .ok();
    assert_eq!(
        c.etcd.tls,
        Some(EtcdTls {
            ca_file: Some(p.ca.clone()),
            client: Some(ClientCertificate {
                cert_file: p.cert.clone(),
                key_file: p.key.clone(),
            }),
        })
    );
    // The CA alone (servers verified, no client certificate), or nothing
    // at all (the system's roots) are fine too.
    let c = https_etcd(&path_line("ca_file", &p.ca)).ok();
    assert_eq!(c.etcd.tls.unwrap().client, None);
    let c = https_etcd("").ok();
    assert_eq!(
        c.etcd.tls,
        Some(EtcdTls {
            ca_file: None,
            client: None
        })
    );
}

#[test]
fn etcd_tls_paths_are_relative_to_the_config_file() {
    let p = pems();
    let dir = p.ca.parent().unwrap();
    let text =
        https_etcd("ca_file = \"ca.pem\"\ncert_file = \"client.pem\"\nkey_file = \"client.key\"")
            .text();
    let c = Config::from_toml(&dir.join("node.toml"), &text).unwrap();
    let tls = c.etcd.tls.unwrap();
    assert_eq!(tls.ca_file, Some(p.ca.clone()));
    assert_eq!(tls.client.unwrap().key_file, p.key);
}

/// The etcd client has one TLS setting for all endpoints, and TLS files
/// next to http:// endpoints would silently do nothing.
#[test]
fn etcd_endpoints_are_all_https_or_none() {
    let p = pems();
    assert_invalid(
        doc()
            .set(
                "etcd",
                "endpoints = [\"https://a:2379\", \"http://b:2379\"]",
            )
            .load(),
        "etcd.endpoints[1]",
        "mixes http:// and https://",
    );
    assert_invalid(
        doc()
            .set(
                "etcd",
                "endpoints = [\"http://a:2379\", \"https://b:2379\"]",
            )
            .load(),
        "etcd.endpoints[1]",
        "\"https://b:2379\"",
    );
    for key in ["ca_file", "cert_file", "key_file"] {
        assert_invalid(
            doc().set("etcd", &path_line(key, &p.ca)).load(),
            &format!("etcd.{key}"),
            "requires https:// endpoints",
        );
    }
}

#[test]
fn etcd_client_certificate_and_key_go_together() {
    let p = pems();
    assert_invalid(
        https_etcd(&path_line("cert_file", &p.cert)).load(),
        "etcd.key_file",
        "required when etcd.cert_file is set",
    );
    assert_invalid(
        https_etcd(&path_line("key_file", &p.key)).load(),
        "etcd.cert_file",
        "required when etcd.key_file is set",
    );
}

/// Bad files are found when the configuration is checked, and the error
/// names the key and the file.
#[test]
fn etcd_tls_files_must_exist_and_parse() {
    let p = pems();
    let missing = p.ca.with_file_name("missing.pem");
    let shown = |key: &str, file: &Path, extra: &str| {
        let e = https_etcd(&(path_line(key, file) + extra))
            .load()
            .expect_err("a bad file");
        let text = e.to_string();
        assert!(text.starts_with(&format!("{PATH}: etcd.")), "{text}");
        assert!(text.contains(&file.display().to_string()), "{text}");
        (e, text)
    };
    let (e, text) = shown("ca_file", &missing, "");
    assert_invalid(Err(e), "etcd.ca_file", "cannot read");
    assert!(text.contains("No such file"), "{text}");
    let (e, _) = shown("ca_file", &p.not_pem, "");
    assert_invalid(Err(e), "etcd.ca_file", "holds no PEM certificate");
    let (e, _) = shown("cert_file", &p.key, &path_line("key_file", &p.key));
    assert_invalid(Err(e), "etcd.cert_file", "holds no PEM certificate");
    let (e, _) = shown("key_file", &p.cert, &path_line("cert_file", &p.cert));
    assert_invalid(Err(e), "etcd.key_file", "holds no PEM private key");
    let (e, _) = shown("key_file", &p.other_key, &path_line("cert_file", &p.cert));
    assert_invalid(Err(e), "etcd.key_file", "does not fit the certificate");
}

// ---------------------------------------------------------------- ha timing

#[test]
fn invalid_durations() {
    run_cases(&[
        ("ha", "ttl = \"3x\"", "ha.ttl", "expected a duration"),
        ("ha", "ttl = \"\"", "ha.ttl", "expected a duration"),
        ("ha", "ttl = \"-3s\"", "ha.ttl", "expected a duration"),
        ("ha", "ttl = 3", "ha.ttl", "invalid type: integer"),
        (
            "ha",
            "loop_wait = \"half a second\"",
            "ha.loop_wait",
            "expected a duration",
        ),
        (
            "ha",
            "retry_timeout = 1.5",
            "ha.retry_timeout",
            "invalid type",
        ),
        (
            "ha",
            "fence_margin = \"500\"",
            "ha.fence_margin",
            "expected a duration",
        ),
        (
            "ha",
            "primary_start_timeout = \"ten seconds\"",
            "ha.primary_start_timeout",
            "expected a duration",
        ),
        (
            "ha",
            "stream_stall_timeout = 15",
            "ha.stream_stall_timeout",
            "invalid type: integer",
        ),
    ]);
}

#[test]
fn ttl_must_be_whole_seconds_and_at_least_two() {
    run_cases(&[
        (
            "ha",
            "ttl = \"2500ms\"",
            "ha.ttl",
            "must be a whole number of seconds, at least 2s (got 2s 500ms)",
        ),
        (
            "ha",
            "ttl = \"3s 1ns\"",
            "ha.ttl",
            "whole number of seconds",
        ),
        ("ha", "ttl = \"1s\"", "ha.ttl", "at least 2s (got 1s)"),
        ("ha", "ttl = \"0s\"", "ha.ttl", "at least 2s"),
        ("ha", "ttl = \"1999ms\"", "ha.ttl", "at least 2s"),
    ]);
    // Other spellings of whole seconds are fine.
    assert_eq!(
        doc().set("ha", "ttl = \"4000ms\"").ok().ha.ttl,
        Duration::from_secs(4)
    );
    assert_eq!(
        doc().set("ha", "ttl = \"1m\"").ok().ha.ttl,
        Duration::from_secs(60)
    );
}

#[test]
fn short_intervals_are_rejected_below_100ms() {
    run_cases(&[
        (
            "ha",
            "loop_wait = \"99ms\"",
            "ha.loop_wait",
            "must be at least 100ms (got 99ms)",
        ),
        (
            "ha",
            "loop_wait = \"0s\"",
            "ha.loop_wait",
            "must be at least 100ms",
        ),
        (
            "ha",
            "retry_timeout = \"99ms\"",
            "ha.retry_timeout",
            "must be at least 100ms (got 99ms)",
        ),
        (
            "ha",
            "retry_timeout = \"0s\"",
            "ha.retry_timeout",
            "must be at least 100ms",
        ),
        (
            "ha",
            "fence_margin = \"99ms\"",
            "ha.fence_margin",
            "must be at least 100ms (got 99ms)",
        ),
        (
            "ha",
            "fence_margin = \"0s\"",
            "ha.fence_margin",
            "must be at least 100ms",
        ),
    ]);
    let c = doc()
        .set("ha", "ttl = \"2s\"\nloop_wait = \"100ms\"\nretry_timeout = \"100ms\"\nfence_margin = \"100ms\"")
        .ok();
    assert_eq!(c.ha.loop_wait, Duration::from_millis(100));
    assert_eq!(c.ha.retry_timeout, Duration::from_millis(100));
    assert_eq!(c.ha.fence_margin, Duration::from_millis(100));
}

#[test]
fn timing_budget_must_fit_in_ttl() {
    run_cases(&[
        // 500ms + 600ms + 500ms + the agent's 400ms lead = 2s fit a 2s ttl
        // exactly; 1ms more does not, and neither do the defaults.
        (
            "ha",
            "ttl = \"2s\"\nretry_timeout = \"601ms\"",
            "ha.ttl",
            "must be at least loop_wait + retry_timeout + fence_margin + 400ms (the agent demotes itself that much before the fence keeper's deadline) = 2s 1ms (got 2s); lower retry_timeout or raise ttl",
        ),
        ("ha", "ttl = \"2s\"", "ha.ttl", "= 2s 400ms (got 2s)"),
        ("ha", "loop_wait = \"2s\"", "ha.ttl", "= 3s 900ms (got 3s)"),
        (
            "ha",
            "ttl = \"10s\"\nloop_wait = \"5s\"\nretry_timeout = \"4700ms\"\nfence_margin = \"100ms\"",
            "ha.ttl",
            "= 10s 200ms (got 10s)",
        ),
        (
            "ha",
            "ttl = \"10s\"\nfence_margin = \"9s\"",
            "ha.ttl",
            "= 10s 900ms (got 10s)",
        ),
    ]);
    // Boundary: the sum equal to ttl is accepted.
    let c = doc()
        .set("ha", "ttl = \"2s\"\nretry_timeout = \"600ms\"")
        .ok();
    assert_eq!(
        c.ha.loop_wait
            + c.ha.retry_timeout
            + c.ha.fence_margin
            + Duration::from_millis(crate::ha::lease::AGENT_LEAD_MS),
        c.ha.ttl
    );
    let c = doc()
        .set(
            "ha",
            "ttl = \"10s\"\nloop_wait = \"5s\"\nretry_timeout = \"3600ms\"\nfence_margin = \"1s\"",
        )
        .ok();
    assert_eq!(c.ha.ttl, Duration::from_secs(10));
}

#[test]
fn validate_ha_directly() {
    let p = Path::new(PATH);
    assert_eq!(
        validate::validate_ha(p, &RawHa::default()).unwrap(),
        HaConfig::default()
    );
    let mut raw = RawHa {
        ttl: Duration::from_secs(2),
        loop_wait: Duration::from_millis(600),
        ..RawHa::default()
    };
    let e = validate::validate_ha(p, &raw).unwrap_err();
    assert!(
        matches!(&e, ConfigError::Invalid { key, .. } if key == "ha.ttl"),
        "{e:?}"
    );
    // The whole-seconds rule is checked before the budget rule.
    raw.ttl = Duration::from_millis(100_500);
    let e = validate::validate_ha(p, &raw).unwrap_err();
    assert!(e.to_string().contains("whole number of seconds"), "{e}");
}

#[test]
fn stream_stall_timeout_at_least_one_second() {
    run_cases(&[
        (
            "ha",
            "stream_stall_timeout = \"999ms\"",
            "ha.stream_stall_timeout",
            "must be at least 1s (got 999ms)",
        ),
        (
            "ha",
            "stream_stall_timeout = \"0s\"",
            "ha.stream_stall_timeout",
            "must be at least 1s",
        ),
    ]);
    assert_eq!(
        doc()
            .set("ha", "stream_stall_timeout = \"1s\"")
            .ok()
            .ha
            .stream_stall_timeout,
        Duration::from_secs(1)
    );
}

#[test]
fn priority_nofailover_and_lag_are_passed_through() {
    let c = doc()
        .set(
            "ha",
            "priority = 0\nnofailover = true\nmaximum_lag_on_failover = 0",
        )
        .ok();
    assert_eq!(c.ha.priority, 0);
    assert!(c.ha.nofailover);
    assert_eq!(c.ha.maximum_lag_on_failover, 0);
}

// ---------------------------------------------------------------- bin_dir

const REQUIRED: [&str; 6] = [
    "postgres",
    "initdb",
    "pg_ctl",
    "pg_basebackup",
    "pg_rewind",
    "pg_controldata",
];

fn fake_bin_dir(dir: &Path, files: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    for f in files {
        std::fs::write(dir.join(f), "#!/bin/sh\n").unwrap();
    }
}

fn bin_dir_doc(bin_dir: &Path) -> Doc {
    doc().set(
        "postgres",
        &format!("bin_dir = {:?}", bin_dir.to_str().unwrap()),
    )
}

#[test]
fn bin_dir_must_exist_and_be_a_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-dir");
    assert_invalid(
        bin_dir_doc(&missing).load(),
        "postgres.bin_dir",
        "is not a directory",
    );
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    assert_invalid(
        bin_dir_doc(&file).load(),
        "postgres.bin_dir",
        &format!("{} is not a directory", file.display()),
    );
}

#[test]
fn bin_dir_must_hold_every_required_binary() {
    let tmp = tempfile::tempdir().unwrap();
    for missing in REQUIRED {
        let dir = tmp.path().join(format!("without-{missing}"));
        let present: Vec<&str> = REQUIRED.iter().copied().filter(|b| *b != missing).collect();
        fake_bin_dir(&dir, &present);
        assert_invalid(
            bin_dir_doc(&dir).load(),
            "postgres.bin_dir",
            &format!("has no {missing} binary"),
        );
    }
    // A directory in place of a binary does not count.
    let dir = tmp.path().join("dir-instead");
    fake_bin_dir(&dir, &REQUIRED[..5]);
    std::fs::create_dir(dir.join(REQUIRED[5])).unwrap();
    assert_invalid(
        bin_dir_doc(&dir).load(),
        "postgres.bin_dir",
        "has no pg_controldata binary",
    );
    // All six present: accepted.
    let dir = tmp.path().join("complete");
    fake_bin_dir(&dir, &REQUIRED);
    assert_eq!(bin_dir_doc(&dir).ok().postgres.bin_dir, dir);
}

// ---------------------------------------------------------------- paths

#[test]
fn relative_paths_are_resolved_against_the_config_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let conf_dir = tmp.path().join("conf");
    fake_bin_dir(&conf_dir.join("pgbin"), &REQUIRED);
    let file = conf_dir.join("node.toml");
    let text = doc()
        .set("postgres", "bin_dir = \"pgbin\"\ndata_dir = \"../data\"")
        .set("", "state_dir = \"state\"")
        .text();
    std::fs::write(&file, text).unwrap();
    let c = Config::load(&file).unwrap();
    assert_eq!(c.postgres.bin_dir, conf_dir.join("pgbin"));
    assert_eq!(c.postgres.data_dir, conf_dir.join("../data"));
    assert_eq!(c.state_dir, conf_dir.join("state"));

    // Relative to the file, not to the current directory: the same text
    // "read" from elsewhere fails to find pgbin.
    let other = tmp.path().join("elsewhere/node.toml");
    let e = Config::from_toml(&other, &std::fs::read_to_string(&file).unwrap()).unwrap_err();
    assert!(
        e.to_string()
            .contains(&tmp.path().join("elsewhere/pgbin").display().to_string()),
        "{e}"
    );

    // The default state_dir follows the resolved data_dir.
    let c = Config::from_toml(
        &file,
        &doc().set("postgres", "data_dir = \"pgdata\"").text(),
    )
    .unwrap();
    assert_eq!(c.postgres.data_dir, conf_dir.join("pgdata"));
    assert_eq!(c.state_dir, conf_dir.join("pgdata.pgha"));
}

#[test]
fn absolute_paths_are_kept() {
    let c = doc().set("", "state_dir = \"/run/pgha\"").ok();
    assert_eq!(c.state_dir, Path::new("/run/pgha"));
    assert_eq!(c.postgres.data_dir, Path::new("/var/lib/pgha/data"));
    assert_eq!(c.postgres.bin_dir, Path::new(REAL_BIN_DIR));
}

#[test]
fn data_dir_must_not_be_root() {
    assert_invalid(
        doc().set("postgres", "data_dir = \"/\"").load(),
        "postgres.data_dir",
        "other than /",
    );
    // A config file without a directory part and an empty data_dir.
    let e = Config::from_toml(
        Path::new("node.toml"),
        &doc().set("postgres", "data_dir = \"\"").text(),
    )
    .unwrap_err();
    assert!(
        matches!(&e, ConfigError::Invalid { key, .. } if key == "postgres.data_dir"),
        "{e:?}"
    );
}

/// Known doubtful behaviour (see report): with a directory in the config
/// path, an empty data_dir resolves to the config file's own directory.
#[test]
fn empty_data_dir_is_rejected() {
    assert_invalid(
        doc()
            .set("postgres", "data_dir = \"\"")
            .set("", "state_dir = \"/run/pgha\"")
            .load(),
        "postgres.data_dir",
        "",
    );
}

/// Known bug (see report): a trailing slash on data_dir makes the default
/// state_dir `<data_dir>/.pgha`, which is then rejected as inside data_dir,
/// with an error about a key the operator never wrote.
#[test]
fn state_dir_default_with_trailing_slash_on_data_dir() {
    let c = doc()
        .set("postgres", "data_dir = \"/var/lib/pgha/data/\"")
        .ok();
    assert_eq!(c.state_dir, Path::new("/var/lib/pgha/data.pgha"));
}

#[test]
fn state_dir_default_and_placement() {
    assert_eq!(
        doc().ok().state_dir,
        PathBuf::from("/var/lib/pgha/data.pgha")
    );
    let inside = "must not be inside postgres.data_dir";
    run_cases(&[
        (
            "",
            "state_dir = \"/var/lib/pgha/data/pgha\"",
            "state_dir",
            inside,
        ),
        (
            "",
            "state_dir = \"/var/lib/pgha/data\"",
            "state_dir",
            inside,
        ),
        (
            "",
            "state_dir = \"/var/lib/pgha/data/a/b\"",
            "state_dir",
            inside,
        ),
    ]);
    // Relative state_dir inside a relative data_dir, both resolved first.
    assert_invalid(
        doc()
            .set("postgres", "data_dir = \"data\"")
            .set("", "state_dir = \"data/state\"")
            .load(),
        "state_dir",
        inside,
    );
    // A sibling whose name merely starts with the data_dir's name is fine.
    assert_eq!(
        doc()
            .set("", "state_dir = \"/var/lib/pgha/data2\"")
            .ok()
            .state_dir,
        Path::new("/var/lib/pgha/data2")
    );
    // The parent of data_dir is fine too.
    assert_eq!(
        doc()
            .set("", "state_dir = \"/var/lib/pgha\"")
            .ok()
            .state_dir,
        Path::new("/var/lib/pgha")
    );
}

// ---------------------------------------------------------------- postgres

#[test]
fn port_listen_and_os_user() {
    run_cases(&[
        ("postgres", "port = 0", "postgres.port", "must be 1-65535"),
        (
            "postgres",
            "listen_addresses = \"\"",
            "postgres.listen_addresses",
            "must not be empty",
        ),
        (
            "postgres",
            "listen_addresses = \"  \"",
            "postgres.listen_addresses",
            "must not be empty",
        ),
        (
            "postgres",
            "connect_host = \"\"",
            "postgres.connect_host",
            "must not be empty",
        ),
        (
            "postgres",
            "connect_host = \" \"",
            "postgres.connect_host",
            "must not be empty",
        ),
        (
            "postgres",
            "os_user = \"\"",
            "postgres.os_user",
            "must not be empty",
        ),
    ]);
    assert_eq!(
        doc().set("postgres", "port = 65535").ok().postgres.port,
        65535
    );
    assert_eq!(doc().set("postgres", "port = 1").ok().postgres.port, 1);
}

#[test]
fn connect_host_defaults_to_first_listen_address() {
    let cases = [
        ("127.0.0.1", "127.0.0.1"),
        ("10.0.0.5", "10.0.0.5"),
        ("10.0.0.5, 127.0.0.1", "10.0.0.5"),
        (" db1.example.com ,10.0.0.5", "db1.example.com"),
        ("localhost", "localhost"),
        ("::1", "::1"),
    ];
    for (listen, expected) in cases {
        let c = doc()
            .set("postgres", &format!("listen_addresses = {listen:?}"))
            .ok();
        assert_eq!(
            c.postgres.connect_host, expected,
            "listen_addresses = {listen:?}"
        );
        assert_eq!(
            c.postgres.listen_addresses, listen,
            "listen_addresses is passed through as written"
        );
    }
}

/// A wildcard in listen_addresses says nothing about the address the
/// other members can reach: replicas would stream from 127.0.0.1, i.e.
/// from themselves or from nothing. The operator must name the host.
#[test]
fn wildcard_listen_addresses_require_an_explicit_connect_host() {
    let msg = "required when postgres.listen_addresses contains a wildcard";
    let key = "postgres.connect_host";
    run_cases(&[
        ("postgres", "listen_addresses = \"*\"", key, msg),
        ("postgres", "listen_addresses = \"*,10.0.0.5\"", key, msg),
        ("postgres", "listen_addresses = \"10.0.0.5, *\"", key, msg),
        ("postgres", "listen_addresses = \"0.0.0.0\"", key, msg),
        ("postgres", "listen_addresses = \"::\"", key, msg),
        ("postgres", "listen_addresses = \"127.0.0.1,::\"", key, msg),
    ]);
    // An explicit connect_host makes the wildcard fine.
    let c = doc()
        .set(
            "postgres",
            "listen_addresses = \"*\"\nconnect_host = \"10.9.9.9\"",
        )
        .ok();
    assert_eq!(c.postgres.connect_host, "10.9.9.9");
    assert_eq!(c.postgres.listen_addresses, "*");
}

#[test]
fn connect_host_must_not_be_a_wildcard() {
    let msg = "is a wildcard address";
    let key = "postgres.connect_host";
    run_cases(&[
        ("postgres", "connect_host = \"*\"", key, msg),
        ("postgres", "connect_host = \"0.0.0.0\"", key, msg),
        ("postgres", "connect_host = \" 0.0.0.0 \"", key, msg),
        ("postgres", "connect_host = \"::\"", key, msg),
        ("postgres", "connect_host = \"[::]\"", key, msg),
        ("postgres", "connect_host = \"0:0:0:0:0:0:0:0\"", key, msg),
    ]);
    // Also with a concrete listen address: the host is what peers dial.
    assert_invalid(
        doc()
            .set(
                "postgres",
                "listen_addresses = \"10.0.0.5\"\nconnect_host = \"0.0.0.0\"",
            )
            .load(),
        "postgres.connect_host",
        msg,
    );
}

#[test]
fn role_usernames() {
    let long = format!("username = \"{}\"", "a".repeat(64));
    let ident = "must be a lower-case identifier";
    run_cases(&[
        (
            "postgres.superuser",
            "username = \"Postgres\"",
            "postgres.superuser.username",
            ident,
        ),
        (
            "postgres.superuser",
            "username = \"\"",
            "postgres.superuser.username",
            ident,
        ),
        (
            "postgres.superuser",
            "username = \"1admin\"",
            "postgres.superuser.username",
            ident,
        ),
        (
            "postgres.superuser",
            "username = \"pg-admin\"",
            "postgres.superuser.username",
            ident,
        ),
        (
            "postgres.superuser",
            "username = \"pg admin\"",
            "postgres.superuser.username",
            ident,
        ),
        (
            "postgres.replication",
            "username = \"repl\\\"x\"",
            "postgres.replication.username",
            ident,
        ),
        (
            "postgres.replication",
            "username = \"Replicator\"",
            "postgres.replication.username",
            "\"Replicator\"",
        ),
        (
            "postgres.replication",
            "username = \"rép\"",
            "postgres.replication.username",
            ident,
        ),
    ]);
    assert_invalid(
        doc().set("postgres.superuser", &long).load(),
        "postgres.superuser.username",
        ident,
    );
    let ok63 = "a".repeat(63);
    let c = doc()
        .set("postgres.superuser", &format!("username = \"{ok63}\""))
        .set("postgres.replication", "username = \"_repl_2\"")
        .ok();
    assert_eq!(c.postgres.superuser.username, ok63);
    assert_eq!(c.postgres.replication.username, "_repl_2");
}

#[test]
fn superuser_and_replication_usernames_must_differ() {
    assert_invalid(
        doc()
            .set("postgres.replication", "username = \"postgres\"")
            .load(),
        "postgres.replication.username",
        "must differ from postgres.superuser.username",
    );
}

#[test]
fn short_passwords_are_rejected() {
    run_cases(&[
        (
            "postgres.superuser",
            "password = \"1234567\"",
            "postgres.superuser.password",
            "must be at least 8 characters",
        ),
        (
            "postgres.superuser",
            "password = \"\"",
            "postgres.superuser.password",
            "must be at least 8 characters",
        ),
        (
            "postgres.replication",
            "password = \"short\"",
            "postgres.replication.password",
            "must be at least 8 characters",
        ),
    ]);
    let c = doc()
        .set("postgres.superuser", "password = \"12345678\"")
        .ok();
    assert_eq!(c.postgres.superuser.password.expose(), "12345678");
    // The error message never repeats the password.
    let e = doc()
        .set("postgres.replication", "password = \"s3cr3t!\"")
        .load()
        .unwrap_err();
    assert!(!format!("{e} {e:?}").contains("s3cr3t!"), "{e:?}");
}

#[test]
fn networks_must_be_cidr() {
    let msg = "is not an address/prefix such as 10.0.0.0/8";
    run_cases(&[
        (
            "postgres",
            "replication_networks = [\"10.0.0.1\"]",
            "postgres.replication_networks[0]",
            msg,
        ),
        (
            "postgres",
            "replication_networks = [\"10.0.0.0/8\", \"10.0.0.0/33\"]",
            "postgres.replication_networks[1]",
            "\"10.0.0.0/33\"",
        ),
        (
            "postgres",
            "replication_networks = [\"::1/129\"]",
            "postgres.replication_networks[0]",
            msg,
        ),
        (
            "postgres",
            "client_networks = [\"db.example.com/32\"]",
            "postgres.client_networks[0]",
            msg,
        ),
        (
            "postgres",
            "client_networks = [\"10.0.0.0/x\"]",
            "postgres.client_networks[0]",
            msg,
        ),
        (
            "postgres",
            "client_networks = [\"10.0.0.0/-1\"]",
            "postgres.client_networks[0]",
            msg,
        ),
        (
            "postgres",
            "client_networks = [\"/8\"]",
            "postgres.client_networks[0]",
            msg,
        ),
        (
            "postgres",
            "client_networks = [\"\"]",
            "postgres.client_networks[0]",
            msg,
        ),
        (
            "postgres",
            "client_networks = [\"all\"]",
            "postgres.client_networks[0]",
            msg,
        ),
        (
            "postgres",
            "client_networks = [\"10.0.0.0/8\", \"10.0.0.0/8/8\"]",
            "postgres.client_networks[1]",
            msg,
        ),
    ]);
    let c = doc()
        .set("postgres", "replication_networks = [\"::/0\", \"fe80::/10\", \"10.0.0.0/8\"]\nclient_networks = []")
        .ok();
    assert_eq!(
        c.postgres.replication_networks,
        vec!["::/0", "fe80::/10", "10.0.0.0/8"]
    );
    assert!(c.postgres.client_networks.is_empty());
}

#[test]
fn pg_hba_lines() {
    run_cases(&[
        (
            "postgres",
            "pg_hba = [\"host all all 0.0.0.0/0 trust\"]",
            "postgres.pg_hba[0]",
            "the 'trust' method is not allowed",
        ),
        (
            "postgres",
            "pg_hba = [\"host all all 10.0.0.0/8 scram-sha-256\", \"local\tall\tall\ttrust\"]",
            "postgres.pg_hba[1]",
            "use scram-sha-256",
        ),
        (
            "postgres",
            "pg_hba = [\"\"]",
            "postgres.pg_hba[0]",
            "must be one non-empty pg_hba.conf line",
        ),
        (
            "postgres",
            "pg_hba = [\"   \"]",
            "postgres.pg_hba[0]",
            "must be one non-empty pg_hba.conf line",
        ),
        (
            "postgres",
            "pg_hba = [\"host all all ::/0 md5\\nhost all all ::/0 trust\"]",
            "postgres.pg_hba[0]",
            "one non-empty",
        ),
    ]);
    let lines = "pg_hba = [\"host all app 10.0.0.0/8 scram-sha-256\", \"hostssl all trusted_app 10.0.0.0/8 cert\"]";
    let c = doc().set("postgres", lines).ok();
    assert_eq!(
        c.postgres.pg_hba,
        vec![
            "host all app 10.0.0.0/8 scram-sha-256",
            "hostssl all trusted_app 10.0.0.0/8 cert"
        ]
    );
}

#[test]
fn managed_parameters_are_rejected() {
    let managed = [
        "port",
        "listen_addresses",
        "unix_socket_directories",
        "hba_file",
        "ident_file",
        "data_directory",
        "config_file",
        "primary_conninfo",
        "primary_slot_name",
        "recovery_target_timeline",
        "hot_standby",
        "synchronous_standby_names",
        "wal_log_hints",
        "password_encryption",
        "wal_receiver_status_interval",
        // Parameter names are case-insensitive in PostgreSQL.
        "Port",
        "HOT_STANDBY",
    ];
    for name in managed {
        assert_invalid(
            doc()
                .set("postgres.parameters", &format!("{name} = \"x\""))
                .load(),
            &format!("postgres.parameters.{name}"),
            "is managed by pgha and cannot be set here",
        );
    }
}

#[test]
fn parameter_names_must_be_plain() {
    run_cases(&[
        (
            "postgres.parameters",
            "shared-buffers = \"1GB\"",
            "postgres.parameters.shared-buffers",
            "is not a valid parameter name",
        ),
        (
            "postgres.parameters",
            "\"work mem\" = \"4MB\"",
            "postgres.parameters.work mem",
            "is not a valid parameter name",
        ),
        (
            "postgres.parameters",
            "\"a=b\" = 1",
            "postgres.parameters.a=b",
            "is not a valid parameter name",
        ),
    ]);
    // Extension parameters have a dot and must be quoted in TOML...
    let c = doc()
        .set("postgres.parameters", "\"pg_stat_statements.max\" = 1000")
        .ok();
    assert_eq!(
        c.postgres
            .parameters
            .get("pg_stat_statements.max")
            .map(String::as_str),
        Some("1000")
    );
    // ...because an unquoted dotted key is a nested table.
    assert_invalid(
        doc()
            .set("postgres.parameters", "pg_stat_statements.max = 1000")
            .load(),
        "postgres.parameters.pg_stat_statements",
        "must be a string, number or boolean, not table",
    );
}

/// Known gap (see report): an empty parameter name passes the name check.
#[test]
fn empty_parameter_name_is_rejected() {
    assert_invalid(
        doc().set("postgres.parameters", "\"\" = 1").load(),
        "postgres.parameters.",
        "is not a valid parameter name",
    );
}

#[test]
fn parameter_values_are_rendered_as_text() {
    let c = doc()
        .set(
            "postgres.parameters",
            r#"
log_connections = true
fsync = false
max_connections = 200
vacuum_cost_delay = -1
checkpoint_completion_target = 0.9
autovacuum_vacuum_scale_factor = 1.5e-2
seq_page_cost = 2.0
shared_buffers = "256MB"
log_line_prefix = "%m [%p] "
"#,
        )
        .ok();
    let p = &c.postgres.parameters;
    let get = |k: &str| p.get(k).map(String::as_str);
    assert_eq!(get("log_connections"), Some("on"));
    assert_eq!(get("fsync"), Some("off"));
    assert_eq!(get("max_connections"), Some("200"));
    assert_eq!(get("vacuum_cost_delay"), Some("-1"));
    assert_eq!(get("checkpoint_completion_target"), Some("0.9"));
    assert_eq!(get("autovacuum_vacuum_scale_factor"), Some("0.015"));
    assert_eq!(get("seq_page_cost"), Some("2"));
    assert_eq!(get("shared_buffers"), Some("256MB"));
    assert_eq!(get("log_line_prefix"), Some("%m [%p] "));
    assert_eq!(p.len(), 9);
}

#[test]
fn parameter_values_of_other_types_are_rejected() {
    let msg = "must be a string, number or boolean";
    run_cases(&[
        (
            "postgres.parameters",
            "shared_preload_libraries = [\"pg_stat_statements\"]",
            "postgres.parameters.shared_preload_libraries",
            "not array",
        ),
        (
            "postgres.parameters",
            "work_mem = { value = 4 }",
            "postgres.parameters.work_mem",
            "not table",
        ),
        (
            "postgres.parameters",
            "timezone = 1979-05-27T07:32:00Z",
            "postgres.parameters.timezone",
            msg,
        ),
    ]);
}

// ---------------------------------------------------------------- api

#[test]
fn api_listen_must_be_ip_and_port() {
    let msg = "must be an ip:port address";
    run_cases(&[
        ("api", "listen = \"localhost:8008\"", "api.listen", msg),
        ("api", "listen = \"127.0.0.1\"", "api.listen", msg),
        ("api", "listen = \":8008\"", "api.listen", msg),
        ("api", "listen = \"::1:8008\"", "api.listen", msg),
        (
            "api",
            "listen = \"127.0.0.1:99999\"",
            "api.listen",
            "\"127.0.0.1:99999\"",
        ),
        ("api", "listen = \"\"", "api.listen", msg),
    ]);
    let c = doc().set("api", "listen = \"[::1]:8080\"").ok();
    assert_eq!(c.api.listen, "[::1]:8080".parse().unwrap());
    assert_eq!(c.api.connect_url, "http://[::1]:8080");
}

/// Listening on every address says nothing about the address the other
/// members can reach; a derived `http://0.0.0.0:8008` would make a peer
/// read its own status (or nobody's) during a leader race.
#[test]
fn wildcard_api_listen_requires_an_explicit_connect_url() {
    let msg = "required when api.listen is a wildcard address";
    run_cases(&[
        ("api", "listen = \"0.0.0.0:8008\"", "api.connect_url", msg),
        ("api", "listen = \"[::]:8008\"", "api.connect_url", msg),
        ("api", "listen = \"[::0]:9000\"", "api.connect_url", msg),
    ]);
    let c = doc()
        .set(
            "api",
            "listen = \"[::]:8008\"\nconnect_url = \"http://10.0.0.5:8008\"",
        )
        .ok();
    assert_eq!(c.api.connect_url, "http://10.0.0.5:8008");
}

#[test]
fn api_connect_url_must_not_name_a_wildcard_host() {
    let msg = "names a wildcard address";
    run_cases(&[
        (
            "api",
            "connect_url = \"http://0.0.0.0:8008\"",
            "api.connect_url",
            msg,
        ),
        (
            "api",
            "connect_url = \"https://[::]:8008/\"",
            "api.connect_url",
            msg,
        ),
        (
            "api",
            "connect_url = \"http://0.0.0.0\"",
            "api.connect_url",
            msg,
        ),
        (
            "api",
            "listen = \"0.0.0.0:8008\"\nconnect_url = \"http://0.0.0.0:8008\"",
            "api.connect_url",
            msg,
        ),
    ]);
    // Host names and IPv6 literals are fine.
    for url in [
        "http://db1:8008",
        "https://[fd00::5]:8008",
        "http://10.0.0.5",
    ] {
        let c = doc().set("api", &format!("connect_url = {url:?}")).ok();
        assert_eq!(c.api.connect_url, url);
    }
}

#[test]
fn api_connection_limits() {
    let c = doc()
        .set(
            "api",
            "header_read_timeout = \"1500ms\"\nbody_read_timeout = \"3s\"\nidle_timeout = \"2m\"\nmax_connections = 40",
        )
        .ok();
    assert_eq!(
        c.api.limits,
        crate::config::ApiLimits {
            header_read_timeout: dur("1500ms"),
            body_read_timeout: dur("3s"),
            idle_timeout: dur("2m"),
            max_connections: 40,
        }
    );
    let short = "must be at least 100ms";
    run_cases(&[
        (
            "api",
            "header_read_timeout = \"0s\"",
            "api.header_read_timeout",
            short,
        ),
        (
            "api",
            "body_read_timeout = \"99ms\"",
            "api.body_read_timeout",
            short,
        ),
        ("api", "idle_timeout = \"0ms\"", "api.idle_timeout", short),
        ("api", "idle_timeout = \"soon\"", "api.idle_timeout", "soon"),
        (
            "api",
            "max_connections = 7",
            "api.max_connections",
            "must be from 8 to 65536 (got 7)",
        ),
        (
            "api",
            "max_connections = 100000",
            "api.max_connections",
            "must be from 8 to 65536",
        ),
        (
            "api",
            "max_connections = -1",
            "api.max_connections",
            "invalid value",
        ),
    ]);
}

#[test]
fn api_connect_url() {
    // Default: http:// + listen, as written.
    let c = doc().set("api", "listen = \"10.0.0.5:9000\"").ok();
    assert_eq!(c.api.connect_url, "http://10.0.0.5:9000");
    // Explicit: kept, trailing slashes trimmed.
    let c = doc()
        .set("api", "connect_url = \"https://node1.example.com:8008/\"")
        .ok();
    assert_eq!(c.api.connect_url, "https://node1.example.com:8008");
    let c = doc()
        .set("api", "connect_url = \"http://node1:8008//\"")
        .ok();
    assert_eq!(c.api.connect_url, "http://node1:8008");
    run_cases(&[
        (
            "api",
            "connect_url = \"node1:8008\"",
            "api.connect_url",
            "must start with http:// or https://",
        ),
        (
            "api",
            "connect_url = \"ftp://node1\"",
            "api.connect_url",
            "\"ftp://node1\"",
        ),
        (
            "api",
            "connect_url = \"\"",
            "api.connect_url",
            "must start with http:// or https://",
        ),
    ]);
}

// ---------------------------------------------------------------- secrets

#[test]
fn debug_output_never_contains_a_password() {
    let d = doc().set(
        "etcd",
        &format!("username = \"pgha\"\npassword = \"{ETCD_PW}\""),
    );
    let c = d.ok();
    // Guard: the passwords really are in the config.
    assert_eq!(c.postgres.superuser.password.expose(), SUPER_PW);
    assert_eq!(c.postgres.replication.password.expose(), REPL_PW);
    assert_eq!(c.etcd.credentials.as_ref().unwrap().1.expose(), ETCD_PW);

    let shown = format!(
        "{c:?} {c:#?} {:?} {:?} {:?}",
        c.postgres, c.etcd, c.postgres.superuser
    );
    for pw in [SUPER_PW, REPL_PW, ETCD_PW] {
        assert!(!shown.contains(pw), "Debug output contains a password");
    }
    // ...while the rest is there, so the check above is not vacuous.
    assert!(shown.contains("replicator") && shown.contains("pgha") && shown.contains("***"));

    // The raw form too.
    let raw: super::raw::RawConfig = validate::parse(Path::new(PATH), &d.text()).unwrap();
    let shown = format!("{raw:?}");
    for pw in [SUPER_PW, REPL_PW, ETCD_PW] {
        assert!(
            !shown.contains(pw),
            "RawConfig Debug output contains a password"
        );
    }
}

#[test]
fn validation_errors_never_contain_a_password() {
    // Every validation error raised after the passwords are read.
    let cases = [
        doc().set("postgres.replication", "username = \"postgres\""),
        doc().set("etcd", &format!("password = \"{ETCD_PW}\"")),
        doc().set("postgres", "port = 0"),
        doc().set("api", "listen = \"x\""),
    ];
    for d in cases {
        let e = d.load().unwrap_err();
        let shown = format!("{e} {e:?}");
        for pw in [SUPER_PW, REPL_PW, ETCD_PW] {
            assert!(!shown.contains(pw), "error shows a password: {shown}");
        }
    }
}

/// Known leak (see report): a password written as a number is echoed by
/// serde's "invalid type" message.
#[test]
fn type_error_on_password_does_not_echo_it() {
    let e = doc()
        .set("postgres.superuser", "password = 918273645")
        .load()
        .unwrap_err();
    assert!(!e.to_string().contains("918273645"), "{e}");
}

// ---------------------------------------------------------------- docs

/// The example in docs/configuration.md must be a valid configuration, and
/// the lines it marks `# default` must really be the defaults: dropping
/// them changes nothing.
#[test]
fn docs_example_is_valid_and_its_defaults_are_true() {
    let md = include_str!("../../docs/configuration.md");
    let start = md.find("```toml\n").expect("docs have a ```toml example") + "```toml\n".len();
    let len = md[start..].find("\n```").expect("example block is closed");
    let example = &md[start..start + len];

    let full =
        Config::from_toml(Path::new(PATH), example).unwrap_or_else(|e| panic!("docs example: {e}"));
    assert_eq!(full.postgres.bin_dir, Path::new(REAL_BIN_DIR));
    assert!(full.etcd.credentials.is_some());

    let defaults_marked = example.lines().filter(|l| l.contains("# default")).count();
    assert!(
        defaults_marked >= 10,
        "expected the example to mark its defaults, found {defaults_marked}"
    );
    let trimmed: String = example
        .lines()
        .filter(|l| !l.contains("# default"))
        .map(|l| format!("{l}\n"))
        .collect();
    let trimmed = Config::from_toml(Path::new(PATH), &trimmed)
        .unwrap_or_else(|e| panic!("trimmed example: {e}"));
    assert_eq!(format!("{trimmed:?}"), format!("{full:?}"));
}

#[test]
fn backup_table_is_validated_and_owns_the_archive_parameters() {
    assert!(doc().ok().backup.is_none());
    let cfg = doc().set("backup", "repository = \"repo\"").ok();
    let b = cfg.backup.expect("[backup] parsed");
    assert_eq!(b.repository, Path::new("/etc/pgha/repo"));
    assert_invalid(
        doc().set("backup", "repository = \"/r\"\nlevel = 3").load(),
        "backup.level",
        "unknown field",
    );
    assert_invalid(
        doc()
            .set("backup", "repository = \"/r\"\ncompress_level = 30")
            .load(),
        "backup.compress_level",
        "must be 1-19",
    );
    for name in ["archive_mode", "archive_command", "Restore_Command"] {
        assert_invalid(
            doc()
                .set("backup", "repository = \"/r\"")
                .set("postgres.parameters", &format!("{name} = \"x\""))
                .load(),
            &format!("postgres.parameters.{name}"),
            "is set by pgha from [backup]",
        );
    }
    // Without [backup] the operator may archive with a tool of their own.
    doc()
        .set("postgres.parameters", "archive_command = \"/bin/true\"")
        .ok();
}

#[test]
fn vip_table() {
    let text = format!(
        "{}\n[vip]\naddress = \"10.0.0.50/24\"\ninterface = \"eth0\"\narp_interval = \"100ms\"\n",
        base_text()
    );
    let cfg = Config::from_toml(Path::new(PATH), &text).expect("valid [vip]");
    let vip = cfg.vip.expect("[vip] present");
    assert_eq!(vip.cidr(), "10.0.0.50/24");
    assert_eq!((vip.arp_count, vip.arp_interval), (3, dur("100ms")));
    assert!(
        Config::from_toml(Path::new(PATH), &base_text())
            .unwrap()
            .vip
            .is_none()
    );
    assert_invalid(
        Config::from_toml(
            Path::new(PATH),
            &format!(
                "{}\n[vip]\naddress = \"10.0.0.50\"\ninterface = \"eth0\"\n",
                base_text()
            ),
        ),
        "vip.address",
        "prefix length",
    );
    let unknown = Config::from_toml(
        Path::new(PATH),
        &format!(
            "{}\n[vip]\naddress = \"10.0.0.50/24\"\ninterface = \"eth0\"\nbroadcast = true\n",
            base_text()
        ),
    );
    assert!(
        unknown.unwrap_err().to_string().contains("broadcast"),
        "unknown keys in [vip] are rejected"
    );
}

// ---------------------------------------------------------------- proxy TLS towards servers

/// A proxy-only file in a temp dir (with an empty auth file) plus `extra`
/// lines in `[proxy]`.
fn proxy_file(extra: &str) -> Result<ProxyFileConfig, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("userlist.txt"), "").unwrap();
    let path = dir.path().join("proxy.toml");
    let text = format!(
        "cluster = \"c\"\n[etcd]\nendpoints = [\"http://e1:2379\"]\n[proxy]\nlisten_rw = \"127.0.0.1:6432\"\nauth_file = \"userlist.txt\"\n{extra}"
    );
    ProxyFileConfig::from_toml(&path, &text)
}

#[test]
fn proxy_server_tls_modes_and_their_ca() {
    use super::proxy::ServerTlsMode;
    let p = pems();
    // libpq's default.
    assert_eq!(
        proxy_file("").unwrap().proxy.server_tls,
        ServerTlsMode::Prefer
    );
    for (text, mode) in ServerTlsMode::VALUES {
        let ca = if mode.verifies() {
            path_line("server_tls_ca", &p.ca)
        } else {
            String::new()
        };
        let c = proxy_file(&format!("server_tls = \"{text}\"\n{ca}")).unwrap();
        assert_eq!(c.proxy.server_tls, mode, "{text}");
        assert_eq!(c.proxy.server_tls_ca.is_some(), mode.verifies(), "{text}");
        assert_eq!(mode.to_string(), text);
    }
    let cases: &[(&str, &str, &str)] = &[
        (
            "server_tls = \"allow\"\n",
            "proxy.server_tls",
            "must be one of disable, prefer, require, verify-ca, verify-full",
        ),
        (
            "server_tls = \"VERIFY-FULL\"\n",
            "proxy.server_tls",
            "must be one of",
        ),
        (
            "server_tls = \"verify-full\"\n",
            "proxy.server_tls_ca",
            "required with proxy.server_tls = \"verify-full\"",
        ),
        (
            "server_tls = \"verify-ca\"\n",
            "proxy.server_tls_ca",
            "required with",
        ),
        (
            "server_tls_ca = \"/nonexistent/ca.pem\"\n",
            "proxy.server_tls_ca",
            "only used with",
        ),
        (
            "server_tls = \"verify-full\"\nserver_tls_ca = \"/nonexistent/ca.pem\"\n",
            "proxy.server_tls_ca",
            "cannot read /nonexistent/ca.pem",
        ),
    ];
    for (extra, key, fragment) in cases {
        let err = proxy_file(extra).unwrap_err().to_string();
        assert!(
            err.contains("proxy.toml") && err.contains(key) && err.contains(fragment),
            "{extra:?}: {err}"
        );
    }
    let not_pem = format!(
        "server_tls = \"verify-ca\"\n{}",
        path_line("server_tls_ca", &p.not_pem)
    );
    let err = proxy_file(&not_pem).unwrap_err().to_string();
    assert!(err.contains("proxy.server_tls_ca"), "{err}");
}

#[test]
fn proxy_file_threads() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("userlist.txt"), "").unwrap();
    let path = dir.path().join("proxy.toml");
    let file = |threads: &str| {
        ProxyFileConfig::from_toml(
            &path,
            &format!(
                "cluster = \"c\"\n{threads}[etcd]\nendpoints = [\"http://e1:2379\"]\n[proxy]\nlisten_rw = \"127.0.0.1:6432\"\nauth_file = \"userlist.txt\"\n"
            ),
        )
    };
    assert_eq!(file("").unwrap().threads, 2, "two threads by default");
    assert_eq!(file("threads = 4\n").unwrap().threads, 4);
    assert_eq!(file("threads = 1\n").unwrap().threads, 1);
    for bad in ["threads = 0\n", "threads = 65\n"] {
        let err = file(bad).unwrap_err().to_string();
        assert!(
            err.contains("proxy.toml") && err.contains("threads") && err.contains("1-64"),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn proxy_server_tls_client_certificate() {
    let p = pems();
    let pair = format!(
        "{}{}",
        path_line("server_tls_certificate", &p.cert),
        path_line("server_tls_key", &p.key)
    );
    let c = proxy_file(&pair).unwrap();
    let client = c.proxy.server_tls_client.expect("a client certificate");
    assert_eq!(client.certificate, p.cert);
    assert_eq!(client.key, p.key);
    assert!(proxy_file("").unwrap().proxy.server_tls_client.is_none());
    let cases = [
        (
            path_line("server_tls_certificate", &p.cert),
            "proxy.server_tls_key",
        ),
        (
            path_line("server_tls_key", &p.key),
            "proxy.server_tls_certificate",
        ),
        (
            format!("server_tls = \"disable\"\n{pair}"),
            "proxy.server_tls_certificate",
        ),
        (
            format!(
                "{}{}",
                path_line("server_tls_certificate", &p.not_pem),
                path_line("server_tls_key", &p.key)
            ),
            "proxy.server_tls_certificate",
        ),
    ];
    for (extra, key) in cases {
        let err = proxy_file(&extra).unwrap_err().to_string();
        assert!(
            err.contains("proxy.toml") && err.contains(key),
            "{extra:?}: {err}"
        );
    }
}

#[test]
fn proxy_auth_query_needs_a_password_for_auth_user() {
    let dir = tempfile::tempdir().unwrap();
    let pass = dir.path().join("pgpass");
    std::fs::write(&pass, "*:*:*:pgha_auth:secret\n").unwrap();
    std::fs::set_permissions(&pass, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let with_pass = path_line("server_passfile", &pass);
    let c = proxy_file(&format!("auth_user = \"pgha_auth\"\n{with_pass}")).unwrap();
    let q = c.proxy.auth_query.unwrap();
    assert_eq!(
        q.query,
        "SELECT usename, passwd FROM pg_shadow WHERE usename=$1"
    );
    assert_eq!((q.dbname.as_str(), q.cache_ttl), ("postgres", dur("10s")));
    assert!(proxy_file("").unwrap().proxy.auth_query.is_none());

    // Without auth_file, auth_user is what lets anyone in.
    let dir2 = tempfile::tempdir().unwrap();
    let path = dir2.path().join("proxy.toml");
    let no_file = |extra: &str| {
        ProxyFileConfig::from_toml(
            &path,
            &format!(
                "cluster = \"c\"\n[etcd]\nendpoints = [\"http://e1:2379\"]\n[proxy]\nlisten_rw = \"127.0.0.1:6432\"\n{extra}"
            ),
        )
    };
    assert!(
        no_file(&format!("auth_user = \"pgha_auth\"\n{with_pass}"))
            .unwrap()
            .proxy
            .auth_file
            .is_none()
    );
    let cases = [
        (
            no_file("").unwrap_err(),
            "proxy.auth_file",
            "required unless proxy.auth_user",
        ),
        (
            proxy_file("auth_user = \"pgha_auth\"\n").unwrap_err(),
            "proxy.auth_user",
            "needs a password for \"pgha_auth\" in proxy.server_passfile",
        ),
        (
            proxy_file(&format!("auth_user = \"other\"\n{with_pass}")).unwrap_err(),
            "proxy.auth_user",
            "needs a password",
        ),
        (
            proxy_file(&format!(
                "auth_user = \"pgha_auth\"\nauth_query = \"SELECT 1, 'x'\"\n{with_pass}"
            ))
            .unwrap_err(),
            "proxy.auth_query",
            "$1",
        ),
    ];
    for (err, key, fragment) in cases {
        let err = err.to_string();
        assert!(err.contains(key) && err.contains(fragment), "{err}");
    }
}

#[test]
fn proxy_unix_sockets() {
    assert!(proxy_file("").unwrap().proxy.unix_sockets.is_empty());
    let c = proxy_file("[proxy.unix_sockets]\nnode1 = \"/var/run/postgresql\"\nnode2 = \"run\"\n")
        .unwrap();
    assert_eq!(
        c.proxy.unix_sockets.get("node1").map(PathBuf::as_path),
        Some(Path::new("/var/run/postgresql"))
    );
    // Relative to the file's directory.
    let node2 = &c.proxy.unix_sockets["node2"];
    assert!(node2.is_absolute() && node2.ends_with("run"), "{node2:?}");
    let long = format!("[proxy.unix_sockets]\nnode1 = \"/{}\"\n", "d".repeat(100));
    let cases: &[(&str, &str, &str)] = &[
        (
            "[proxy.unix_sockets]\n\"no de\" = \"/run\"\n",
            "proxy.unix_sockets.no de",
            "is not a member name",
        ),
        (
            &long,
            "proxy.unix_sockets.node1",
            "too long for a socket path",
        ),
    ];
    for (extra, key, fragment) in cases {
        let err = proxy_file(extra).unwrap_err().to_string();
        assert!(
            err.contains("proxy.toml") && err.contains(key) && err.contains(fragment),
            "{extra:?}: {err}"
        );
    }
}
