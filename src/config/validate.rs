//! Raw → typed configuration, with every rule in one place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{RawConfig, RawEtcd, RawRole};
use super::{
    ApiConfig, ApiLimits, ClientCertificate, Config, ConfigError, EtcdConfig, EtcdTls, HaConfig,
    PostgresConfig, RoleCredentials,
};
use crate::model::MemberName;
use crate::pem;

/// Binaries the agent runs; checked up front so that a wrong `bin_dir`
/// fails at start rather than at the first failover.
const REQUIRED_BINARIES: &[&str] = &[
    "postgres",
    "initdb",
    "pg_ctl",
    "pg_basebackup",
    "pg_rewind",
    "pg_controldata",
];

pub(super) fn parse<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    let de = toml::de::Deserializer::parse(text).map_err(|e| syntax(path, text, &e))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.message().to_string();
        // Never echo a value back for a password key: an unquoted
        // password would otherwise appear in the message.
        let message = if key.ends_with("password") {
            "must be a quoted string".to_string()
        } else {
            message
        };
        if key.is_empty() || key == "." {
            // serde reports missing top-level keys without a path.
            match message
                .strip_prefix("missing field `")
                .and_then(|m| m.strip_suffix('`'))
            {
                Some(field) => ConfigError::invalid(path, field, "is required"),
                None => syntax(path, text, &inner),
            }
        } else if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'))
        {
            ConfigError::invalid(path, &format!("{key}.{field}"), "is required")
        } else {
            ConfigError::invalid(path, &key, message)
        }
    })
}

fn syntax(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
        .unwrap_or(1);
    ConfigError::Syntax {
        path: path.to_path_buf(),
        line,
        message: e.message().trim().to_string(),
    }
}

pub(super) fn validate(path: &Path, raw: RawConfig) -> Result<Config, ConfigError> {
    let bad = |key: &str, msg: String| ConfigError::invalid(path, key, msg);
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base_dir.join(p)
        }
    };

    if !is_identifier_like(&raw.cluster) {
        return Err(bad(
            "cluster",
            format!(
                "{:?} must be 1-63 characters of [A-Za-z0-9_.-]",
                raw.cluster
            ),
        ));
    }
    if !is_identifier_like(&raw.namespace) {
        return Err(bad(
            "namespace",
            format!(
                "{:?} must be 1-63 characters of [A-Za-z0-9_.-]",
                raw.namespace
            ),
        ));
    }
    if !MemberName::is_valid(&raw.name) {
        return Err(bad(
            "name",
            format!("{:?} must be 1-63 characters of [A-Za-z0-9_.-]", raw.name),
        ));
    }

    let etcd = validate_etcd(path, raw.etcd, &resolve)?;
    let proxy = raw
        .proxy
        .map(|p| super::proxy::validate_proxy(path, p, &resolve, Some(raw.name.as_str()), true))
        .transpose()?;

    let ha = validate_ha(path, &raw.ha)?;

    // postgres
    let pg = raw.postgres;
    let bin_dir = resolve(&pg.bin_dir);
    if !bin_dir.is_dir() {
        return Err(bad(
            "postgres.bin_dir",
            format!("{} is not a directory", bin_dir.display()),
        ));
    }
    for bin in REQUIRED_BINARIES {
        if !bin_dir.join(bin).is_file() {
            return Err(bad(
                "postgres.bin_dir",
                format!("{} has no {bin} binary", bin_dir.display()),
            ));
        }
    }
    if pg.data_dir.as_os_str().is_empty() {
        return Err(bad("postgres.data_dir", "must not be empty".into()));
    }
    // Normalised through its components so that a trailing slash does not
    // change the derived state_dir.
    let data_dir: PathBuf = resolve(&pg.data_dir).components().collect();
    if data_dir == Path::new("/") {
        return Err(bad(
            "postgres.data_dir",
            "must name a directory other than /".into(),
        ));
    }
    if pg.port == 0 {
        return Err(bad("postgres.port", "must be 1-65535".into()));
    }
    if pg.listen_addresses.trim().is_empty() {
        return Err(bad("postgres.listen_addresses", "must not be empty".into()));
    }
    // Peers stream from connect_host; a wildcard only says where the
    // server listens, not where it can be reached, so it is never guessed.
    let connect_host = match pg.connect_host {
        Some(h) if h.trim().is_empty() => {
            return Err(bad("postgres.connect_host", "must not be empty".into()));
        }
        Some(h) if is_wildcard_host(&h) => {
            return Err(bad(
                "postgres.connect_host",
                format!(
                    "{h:?} is a wildcard address; give the address the other members reach this server at"
                ),
            ));
        }
        Some(h) => h,
        None => {
            if let Some(w) = pg
                .listen_addresses
                .split(',')
                .map(str::trim)
                .find(|a| is_wildcard_host(a))
            {
                return Err(bad(
                    "postgres.connect_host",
                    format!(
                        "required when postgres.listen_addresses contains a wildcard ({w:?}): give the address the other members reach this server at"
                    ),
                ));
            }
            let first = pg.listen_addresses.split(',').next().unwrap_or("").trim();
            first.to_string()
        }
    };
    if pg.os_user.is_empty() {
        return Err(bad("postgres.os_user", "must not be empty".into()));
    }
    let superuser = role(path, "postgres.superuser", pg.superuser)?;
    let replication = role(path, "postgres.replication", pg.replication)?;
    if superuser.username == replication.username {
        return Err(bad(
            "postgres.replication.username",
            "must differ from postgres.superuser.username".into(),
        ));
    }
    for (key, nets) in [
        ("postgres.replication_networks", &pg.replication_networks),
        ("postgres.client_networks", &pg.client_networks),
    ] {
        for (i, net) in nets.iter().enumerate() {
            if !is_cidr(net) {
                return Err(bad(
                    &format!("{key}[{i}]"),
                    format!("{net:?} is not an address/prefix such as 10.0.0.0/8"),
                ));
            }
        }
    }
    for (i, line) in pg.pg_hba.iter().enumerate() {
        if line.contains('\n') || line.trim().is_empty() {
            return Err(bad(
                &format!("postgres.pg_hba[{i}]"),
                "must be one non-empty pg_hba.conf line".into(),
            ));
        }
        if line
            .split_whitespace()
            .nth(if line.trim_start().starts_with("local") {
                3
            } else {
                4
            })
            .is_some_and(|m| m.trim_matches('"') == "trust")
        {
            // Refusing trust is deliberate: a cluster manager that quietly
            // admits password-less logins is not secure by default.
            return Err(bad(
                &format!("postgres.pg_hba[{i}]"),
                "the 'trust' method is not allowed; use scram-sha-256".into(),
            ));
        }
    }
    let mut parameters = BTreeMap::new();
    for (name, value) in pg.parameters {
        let key = format!("postgres.parameters.{name}");
        let lower = name.to_ascii_lowercase();
        if let Some((_, reason)) = crate::postgres::params::OWNED
            .iter()
            .find(|(n, _)| *n == lower)
        {
            return Err(bad(
                &key,
                format!("is managed by pgha and cannot be set here ({reason})"),
            ));
        }
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        {
            return Err(bad(&key, "is not a valid parameter name".into()));
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => {
                if b {
                    "on".into()
                } else {
                    "off".into()
                }
            }
            other => {
                return Err(bad(
                    &key,
                    format!(
                        "must be a string, number or boolean, not {}",
                        other.type_str()
                    ),
                ));
            }
        };
        if text.contains('\n') || text.contains('\r') {
            return Err(bad(&key, "must be a single line".into()));
        }
        parameters.insert(name, text);
    }

    // api
    let limits = validate_api_limits(path, &raw.api)?;
    let listen: std::net::SocketAddr = raw.api.listen.parse().map_err(|_| {
        bad(
            "api.listen",
            format!("{:?} must be an ip:port address", raw.api.listen),
        )
    })?;
    // Peers read this node's /status through connect_url during a leader
    // race; a wildcard there would make them read their own status (or
    // another node's) and promote the wrong member.
    let connect_url = match raw.api.connect_url {
        Some(u) if u.starts_with("http://") || u.starts_with("https://") => {
            let u = u.trim_end_matches('/').to_string();
            if url_host(&u).is_some_and(is_wildcard_host) {
                return Err(bad(
                    "api.connect_url",
                    format!(
                        "{u:?} names a wildcard address; give the address the other members reach this API at"
                    ),
                ));
            }
            u
        }
        Some(u) => {
            return Err(bad(
                "api.connect_url",
                format!("{u:?} must start with http:// or https://"),
            ));
        }
        None if listen.ip().is_unspecified() => {
            return Err(bad(
                "api.connect_url",
                format!(
                    "required when api.listen is a wildcard address ({}): give the URL the other members reach this API at",
                    raw.api.listen
                ),
            ));
        }
        None => format!(
            "{}://{}",
            if raw.api.tls.is_some() {
                "https"
            } else {
                "http"
            },
            raw.api.listen
        ),
    };

    let basic_auth = match paired(
        path,
        ("api.username", raw.api.username),
        ("api.password", raw.api.password),
    )? {
        Some((u, p)) => {
            if u.is_empty() || u.contains(':') {
                return Err(bad(
                    "api.username",
                    "must be non-empty and contain no ':'".into(),
                ));
            }
            if p.expose().len() < 8 {
                return Err(bad("api.password", "must be at least 8 characters".into()));
            }
            Some((u, p))
        }
        None => None,
    };
    if let Some(t) = &raw.api.token
        && t.expose().len() < 16
    {
        return Err(bad("api.token", "must be at least 16 characters".into()));
    }
    if !raw.api.public_read && basic_auth.is_none() && raw.api.token.is_none() {
        return Err(bad(
            "api.public_read",
            "false requires api.username/api.password or api.token (otherwise nothing, not even a health check, could read the API)".into(),
        ));
    }
    let tls = match raw.api.tls {
        Some(t) => {
            let certificate = resolve(&t.certificate);
            let key = resolve(&t.key);
            let client_ca = t.client_ca.as_deref().map(resolve);
            let ca = t.ca.as_deref().map(resolve);
            let client_identity = paired(
                path,
                (
                    "api.tls.client_certificate",
                    t.client_certificate.as_deref().map(resolve),
                ),
                ("api.tls.client_key", t.client_key.as_deref().map(resolve)),
            )?;
            for (k, p) in [
                ("api.tls.certificate", Some(&certificate)),
                ("api.tls.key", Some(&key)),
                ("api.tls.client_ca", client_ca.as_ref()),
                ("api.tls.ca", ca.as_ref()),
                (
                    "api.tls.client_certificate",
                    client_identity.as_ref().map(|(c, _)| c),
                ),
                (
                    "api.tls.client_key",
                    client_identity.as_ref().map(|(_, k)| k),
                ),
            ] {
                if let Some(p) = p
                    && !p.is_file()
                {
                    return Err(bad(k, format!("{} is not a readable file", p.display())));
                }
            }
            Some(super::TlsConfig {
                certificate,
                key,
                client_ca,
                ca,
                client_identity,
            })
        }
        None => None,
    };
    let state_dir = match raw.state_dir {
        Some(p) => resolve(&p),
        None => {
            let mut s = data_dir.clone().into_os_string();
            s.push(".pgha");
            PathBuf::from(s)
        }
    };
    if state_dir.starts_with(&data_dir) {
        return Err(bad(
            "state_dir",
            "must not be inside postgres.data_dir (pg_basebackup and pg_rewind replace it)".into(),
        ));
    }

    let backup = match raw.backup {
        Some(b) => {
            for name in parameters.keys() {
                if super::backup::BACKUP_PARAMETERS.contains(&name.to_ascii_lowercase().as_str()) {
                    return Err(bad(
                        &format!("postgres.parameters.{name}"),
                        "is set by pgha from [backup]; remove it here".into(),
                    ));
                }
            }
            Some(super::backup::BackupConfig::validate(path, b, resolve)?)
        }
        None => None,
    };
    let bootstrap = super::bootstrap::BootstrapConfig::validate(
        path,
        raw.bootstrap.unwrap_or_default(),
        backup.as_ref(),
        resolve,
    )?;
    let vip = raw
        .vip
        .map(|v| super::vip::VipConfig::validate(path, v))
        .transpose()?;

    Ok(Config {
        path: path.to_path_buf(),
        cluster: raw.cluster,
        namespace: raw.namespace,
        name: MemberName::new(raw.name),
        state_dir,
        etcd,
        ha,
        postgres: PostgresConfig {
            bin_dir,
            data_dir,
            listen_addresses: pg.listen_addresses,
            connect_host,
            port: pg.port,
            os_user: pg.os_user,
            superuser,
            replication,
            replication_networks: pg.replication_networks,
            client_networks: pg.client_networks,
            pg_hba: pg.pg_hba,
            parameters,
        },
        api: ApiConfig {
            listen,
            connect_url,
            basic_auth,
            token: raw.api.token,
            public_read: raw.api.public_read,
            tls,
            limits,
        },
        proxy,
        backup,
        bootstrap,
        vip,
    })
}

/// Two keys that only make sense together (a user and its password, a
/// certificate and its key): both, or neither; one alone names the other
/// as missing.
pub(super) fn paired<A, B>(
    path: &Path,
    (a_key, a): (&str, Option<A>),
    (b_key, b): (&str, Option<B>),
) -> Result<Option<(A, B)>, ConfigError> {
    match (a, b) {
        (Some(a), Some(b)) => Ok(Some((a, b))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError::invalid(
            path,
            b_key,
            format!("required when {a_key} is set"),
        )),
        (None, Some(_)) => Err(ConfigError::invalid(
            path,
            a_key,
            format!("required when {b_key} is set"),
        )),
    }
}

/// `[etcd]`, shared by node and proxy configuration files.
pub(super) fn validate_etcd(
    path: &Path,
    etcd: RawEtcd,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<EtcdConfig, ConfigError> {
    let bad = |key: &str, msg: String| ConfigError::invalid(path, key, msg);
    if etcd.endpoints.is_empty() {
        return Err(bad(
            "etcd.endpoints",
            "at least one endpoint is required".into(),
        ));
    }
    for (i, ep) in etcd.endpoints.iter().enumerate() {
        let rest = ep
            .strip_prefix("http://")
            .or_else(|| ep.strip_prefix("https://"));
        let valid = rest
            .and_then(|r| r.trim_end_matches('/').rsplit_once(':'))
            .is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
        if !valid {
            return Err(bad(
                &format!("etcd.endpoints[{i}]"),
                format!("{ep:?} must look like http://host:port"),
            ));
        }
    }
    let etcd_tls = validate_etcd_tls(path, &etcd, &resolve)?;
    let credentials = paired(
        path,
        ("etcd.username", etcd.username),
        ("etcd.password", etcd.password),
    )?;

    Ok(EtcdConfig {
        endpoints: etcd.endpoints,
        credentials,
        tls: etcd_tls,
    })
}

/// TLS towards etcd. The etcd client applies one TLS setting to every
/// endpoint, so the endpoints are either all `https://` or all `http://`;
/// TLS files with `http://` endpoints would be silently unused, so they are
/// rejected. The files are read and checked here, so that a wrong path or a
/// key that does not fit its certificate stops the start instead of
/// showing up as "etcd unavailable" in every loop.
fn validate_etcd_tls(
    path: &Path,
    raw: &RawEtcd,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Option<EtcdTls>, ConfigError> {
    let bad = |key: &str, msg: String| ConfigError::invalid(path, key, msg);
    let file_error = |key: &str, e: pem::PemError| bad(key, crate::util::chain(&e).to_string());
    let https = |ep: &String| ep.starts_with("https://");
    let tls = raw.endpoints.first().is_some_and(https);
    if let Some(i) = raw.endpoints.iter().position(|ep| https(ep) != tls) {
        return Err(bad(
            &format!("etcd.endpoints[{i}]"),
            format!(
                "{:?} mixes http:// and https:// endpoints; use https:// for every endpoint or for none",
                raw.endpoints[i]
            ),
        ));
    }
    let given = [
        ("etcd.ca_file", &raw.ca_file),
        ("etcd.cert_file", &raw.cert_file),
        ("etcd.key_file", &raw.key_file),
    ];
    if !tls {
        return match given.iter().find(|(_, v)| v.is_some()) {
            Some((key, _)) => Err(bad(
                key,
                "requires https:// endpoints in etcd.endpoints".into(),
            )),
            None => Ok(None),
        };
    }
    let ca_file = match &raw.ca_file {
        Some(p) => {
            let p = resolve(p);
            pem::read_ca(&p).map_err(|e| file_error("etcd.ca_file", e))?;
            Some(p)
        }
        None => None,
    };
    let client = match paired(
        path,
        ("etcd.cert_file", raw.cert_file.as_ref()),
        ("etcd.key_file", raw.key_file.as_ref()),
    )? {
        Some((cert, key)) => {
            let (cert_file, key_file) = (resolve(cert), resolve(key));
            pem::read_certificates(&cert_file).map_err(|e| file_error("etcd.cert_file", e))?;
            pem::read_private_key(&key_file).map_err(|e| file_error("etcd.key_file", e))?;
            pem::read_key_pair(&cert_file, &key_file)
                .map_err(|e| file_error("etcd.key_file", e))?;
            Some(ClientCertificate {
                cert_file,
                key_file,
            })
        }
        None => None,
    };
    Ok(Some(EtcdTls { ca_file, client }))
}

/// The fewest connections `api.max_connections` may allow: during a leader
/// race every peer reads `/status` at once, and the load balancers'
/// checks and a metrics scrape must still fit beside them.
const MIN_API_CONNECTIONS: usize = 8;
/// More than this many descriptors for HTTP clients defeats the purpose
/// of the limit (leaving descriptors for etcd and PostgreSQL).
const MAX_API_CONNECTIONS: usize = 65536;

fn validate_api_limits(path: &Path, api: &super::raw::RawApi) -> Result<ApiLimits, ConfigError> {
    let bad = |key: &str, msg: String| ConfigError::invalid(path, key, msg);
    // A zero timeout would close every connection at once; below 100 ms a
    // client across a slow link could not send a request head at all.
    for (key, d) in [
        ("api.header_read_timeout", api.header_read_timeout),
        ("api.body_read_timeout", api.body_read_timeout),
        ("api.idle_timeout", api.idle_timeout),
    ] {
        if d < Duration::from_millis(100) {
            return Err(bad(
                key,
                format!(
                    "must be at least 100ms (got {})",
                    humantime::format_duration(d)
                ),
            ));
        }
    }
    if !(MIN_API_CONNECTIONS..=MAX_API_CONNECTIONS).contains(&api.max_connections) {
        return Err(bad(
            "api.max_connections",
            format!(
                "must be from {MIN_API_CONNECTIONS} to {MAX_API_CONNECTIONS} (got {})",
                api.max_connections
            ),
        ));
    }
    Ok(ApiLimits {
        header_read_timeout: api.header_read_timeout,
        body_read_timeout: api.body_read_timeout,
        idle_timeout: api.idle_timeout,
        max_connections: api.max_connections,
    })
}

/// The timing rules. They exist so that one slow etcd round trip never
/// turns into a failover, and so that a leader always stops accepting
/// writes before its lease can expire for the others.
pub(crate) fn validate_ha(path: &Path, raw: &super::raw::RawHa) -> Result<HaConfig, ConfigError> {
    let bad = |key: &str, msg: String| ConfigError::invalid(path, key, msg);
    let ms = |d: Duration| humantime::format_duration(d).to_string();
    // etcd leases have whole-second TTLs; rounding silently would make the
    // fencing arithmetic below wrong.
    if raw.ttl.subsec_nanos() != 0 || raw.ttl < Duration::from_secs(2) {
        return Err(bad(
            "ha.ttl",
            format!(
                "must be a whole number of seconds, at least 2s (got {})",
                ms(raw.ttl)
            ),
        ));
    }
    if raw.loop_wait < Duration::from_millis(100) {
        return Err(bad(
            "ha.loop_wait",
            format!("must be at least 100ms (got {})", ms(raw.loop_wait)),
        ));
    }
    if raw.retry_timeout < Duration::from_millis(100) {
        return Err(bad(
            "ha.retry_timeout",
            format!("must be at least 100ms (got {})", ms(raw.retry_timeout)),
        ));
    }
    if raw.fence_margin < Duration::from_millis(100) {
        return Err(bad(
            "ha.fence_margin",
            format!("must be at least 100ms (got {})", ms(raw.fence_margin)),
        ));
    }
    if raw.stream_stall_timeout < Duration::from_secs(1) {
        return Err(bad(
            "ha.stream_stall_timeout",
            format!("must be at least 1s (got {})", ms(raw.stream_stall_timeout)),
        ));
    }
    // The leader renews every loop_wait and gives one renewal up to
    // retry_timeout; it must then still have fence_margin left before the
    // lease can expire, to stop PostgreSQL, plus the agent's own lead on
    // the fence keeper (it demotes itself that much earlier). If the sum
    // exceeded the TTL, a single slow renewal would demote a healthy leader.
    let lead = Duration::from_millis(crate::ha::lease::AGENT_LEAD_MS);
    let budget = raw.loop_wait + raw.retry_timeout + raw.fence_margin + lead;
    if budget > raw.ttl {
        return Err(bad(
            "ha.ttl",
            format!(
                "must be at least loop_wait + retry_timeout + fence_margin + {} (the agent demotes itself that much before the fence keeper's deadline) = {} (got {}); lower retry_timeout or raise ttl",
                ms(lead),
                ms(budget),
                ms(raw.ttl)
            ),
        ));
    }
    Ok(HaConfig {
        ttl: raw.ttl,
        loop_wait: raw.loop_wait,
        retry_timeout: raw.retry_timeout,
        fence_margin: raw.fence_margin,
        priority: raw.priority,
        nofailover: raw.nofailover,
        maximum_lag_on_failover: raw.maximum_lag_on_failover,
        primary_start_timeout: raw.primary_start_timeout,
        stream_stall_timeout: raw.stream_stall_timeout,
        reclone_on_rewind_failure: raw.reclone_on_rewind_failure,
        nosync: raw.nosync,
    })
}

fn role(path: &Path, key: &str, raw: RawRole) -> Result<RoleCredentials, ConfigError> {
    if !is_pg_identifier(&raw.username) {
        return Err(ConfigError::invalid(
            path,
            &format!("{key}.username"),
            format!(
                "{:?} must be a lower-case identifier ([a-z_][a-z0-9_]*)",
                raw.username
            ),
        ));
    }
    if raw.password.expose().len() < 8 {
        return Err(ConfigError::invalid(
            path,
            &format!("{key}.password"),
            "must be at least 8 characters",
        ));
    }
    Ok(RoleCredentials {
        username: raw.username,
        password: raw.password,
    })
}

fn is_identifier_like(s: &str) -> bool {
    MemberName::is_valid(s)
}

/// Role names are used unquoted in SQL and pg_hba.conf; allowing only plain
/// identifiers avoids every quoting problem.
fn is_pg_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= 63
}

/// `*`, `0.0.0.0`, `::` and other spellings of "every address": fine to
/// listen on, meaningless as an address to connect to.
fn is_wildcard_host(host: &str) -> bool {
    let host = host.trim();
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare == "*"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified())
}

/// The host part of an `http(s)://host[:port][/path]` URL, brackets kept
/// for IPv6 literals.
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if authority.starts_with('[') {
        return authority.find(']').map(|end| &authority[..=end]);
    }
    Some(authority.split(':').next().unwrap_or(authority))
}

fn is_cidr(s: &str) -> bool {
    let Some((addr, prefix)) = s.split_once('/') else {
        return false;
    };
    let Ok(prefix) = prefix.parse::<u8>() else {
        return false;
    };
    match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => prefix <= 32,
        Ok(std::net::IpAddr::V6(_)) => prefix <= 128,
        Err(_) => false,
    }
}
