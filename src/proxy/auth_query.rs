//! `auth_user` / `auth_query`: the SCRAM verifier of a user missing from
//! the auth file, fetched from the leader (by default from `pg_shadow`, as
//! pgbouncer does) and kept for `auth_cache_ttl`.
//!
//! Only SCRAM-SHA-256 verifiers are usable: the proxy checks the client's
//! proof against it and logs in to the servers with the keys the proof
//! reveals. An md5 hash or a plain password is refused (and logged); the
//! client then fails exactly as an unknown user or a wrong password does.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::IsNull;
use postgres_protocol::message::{backend, frontend};

use super::Shared;
use super::conn::ConnError;
use super::scram::ScramVerifier;
use super::server::{Credentials, Server, ServerError, error_fields};
use crate::config::proxy::AuthQueryConfig;

/// Bounds the cache against clients trying many user names.
const MAX_CACHED: usize = 10_000;
/// Login plus query on the leader.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

pub struct AuthQuery {
    cfg: AuthQueryConfig,
    /// User → (when fetched, verifier or none).
    cache: Mutex<HashMap<String, (Instant, Option<ScramVerifier>)>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthQueryError {
    #[error("no leader is known")]
    NoLeader,
    #[error("server_passfile has no password for auth_user {user:?} on {target}")]
    NoPassword { user: String, target: String },
    #[error("cannot log in as auth_user")]
    Login(#[source] ServerError),
    #[error("auth_query failed: {message} (SQLSTATE {code})")]
    Query { code: String, message: String },
    #[error("auth_query must return two columns (user name, secret)")]
    Columns,
    #[error("auth_query did not finish within {0:?}")]
    Timeout(Duration),
    #[error("connection to the leader failed during auth_query")]
    Conn(#[source] ConnError),
    #[error("protocol error during auth_query: {0}")]
    Protocol(String),
}

impl AuthQuery {
    pub fn new(cfg: AuthQueryConfig) -> AuthQuery {
        AuthQuery {
            cfg,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// `user`'s verifier; `None` for a user the leader does not know or
    /// whose secret is not a SCRAM verifier.
    pub async fn lookup(
        &self,
        shared: &Shared,
        user: &str,
    ) -> Result<Option<ScramVerifier>, AuthQueryError> {
        let now = Instant::now();
        if let Some((at, v)) = self.cache.lock().expect("auth cache").get(user)
            && now.duration_since(*at) < self.cfg.cache_ttl
        {
            return Ok(v.clone());
        }
        let secret = tokio::time::timeout(LOOKUP_TIMEOUT, self.fetch(shared, user))
            .await
            .map_err(|_| AuthQueryError::Timeout(LOOKUP_TIMEOUT))??;
        let verifier = match secret {
            None => None,
            Some(s) => match ScramVerifier::parse(&s) {
                Ok(v) => Some(v),
                Err(_) => {
                    // Never log the secret itself: its kind is enough.
                    let kind = if s.starts_with("md5") {
                        "an md5 hash"
                    } else {
                        "not a SCRAM-SHA-256 verifier"
                    };
                    tracing::warn!(
                        user,
                        "auth_query returned {kind} for this user: refusing the login (only SCRAM-SHA-256 verifiers can be checked and passed through)"
                    );
                    None
                }
            },
        };
        if !self.cfg.cache_ttl.is_zero() {
            let mut cache = self.cache.lock().expect("auth cache");
            if cache.len() >= MAX_CACHED {
                let ttl = self.cfg.cache_ttl;
                cache.retain(|_, (at, _)| now.duration_since(*at) < ttl);
                if cache.len() >= MAX_CACHED {
                    cache.clear();
                }
            }
            cache.insert(user.to_string(), (now, verifier.clone()));
        }
        Ok(verifier)
    }

    /// The secret column of the query's first row (`None`: no row, or
    /// NULL), from a fresh connection to the leader as `auth_user`.
    async fn fetch(&self, shared: &Shared, user: &str) -> Result<Option<String>, AuthQueryError> {
        let target = shared
            .routes
            .borrow()
            .rw_target()
            .cloned()
            .ok_or(AuthQueryError::NoLeader)?;
        let password = shared
            .passfile
            .as_ref()
            .and_then(|p| p.lookup(&target.host, target.port, &self.cfg.dbname, &self.cfg.user))
            .ok_or_else(|| AuthQueryError::NoPassword {
                user: self.cfg.user.clone(),
                target: target.to_string(),
            })?;
        let mut server = Server::connect(
            &target,
            &shared.server_tls,
            None,
            &self.cfg.user,
            &self.cfg.dbname,
            &Credentials::Password(password),
            LOOKUP_TIMEOUT,
        )
        .await
        .map_err(AuthQueryError::Login)?;
        let mut out = BytesMut::new();
        let proto = |e: std::io::Error| AuthQueryError::Protocol(e.to_string());
        frontend::parse("", &self.cfg.query, [0u32], &mut out).map_err(proto)?;
        frontend::bind(
            "",
            "",
            [0i16],
            [user],
            |v: &str, buf: &mut BytesMut| {
                buf.extend_from_slice(v.as_bytes());
                Ok(IsNull::No)
            },
            [0i16],
            &mut out,
        )
        .map_err(|_| AuthQueryError::Protocol("cannot encode the user name".into()))?;
        frontend::execute("", 0, &mut out).map_err(proto)?;
        frontend::sync(&mut out);
        server
            .conn
            .send(&out)
            .await
            .map_err(|e| AuthQueryError::Conn(e.into()))?;
        let mut secret: Option<Option<String>> = None;
        let mut failure = None;
        loop {
            let frame = server
                .conn
                .next_frame()
                .await
                .map_err(AuthQueryError::Conn)?;
            let mut raw = BytesMut::from(&frame.raw[..]);
            let msg = backend::Message::parse(&mut raw)
                .map_err(proto)?
                .ok_or_else(|| AuthQueryError::Protocol("truncated message".into()))?;
            match msg {
                backend::Message::DataRow(row) if secret.is_none() => {
                    let mut ranges = row.ranges();
                    let mut columns = Vec::new();
                    while let Some(r) =
                        fallible_iterator::FallibleIterator::next(&mut ranges).map_err(proto)?
                    {
                        columns.push(r);
                    }
                    if columns.len() < 2 {
                        failure.get_or_insert(AuthQueryError::Columns);
                        secret = Some(None);
                        continue;
                    }
                    secret = Some(
                        columns[1]
                            .clone()
                            .map(|r| String::from_utf8_lossy(&row.buffer()[r]).into_owned()),
                    );
                }
                backend::Message::ErrorResponse(body) => {
                    let (code, message) = error_fields(&body);
                    failure.get_or_insert(AuthQueryError::Query { code, message });
                }
                backend::Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        // A clean goodbye, so the server does not log a lost connection.
        let mut bye = BytesMut::new();
        frontend::terminate(&mut bye);
        let _ = server.conn.send(&bye).await;
        match failure {
            Some(e) => Err(e),
            None => Ok(secret.flatten()),
        }
    }
}
