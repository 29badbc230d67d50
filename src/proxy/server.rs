//! One connection from the proxy to a PostgreSQL server: connect, log in
//! (SCRAM with the client's keys, or a password from the server passfile),
//! and remember what the server announced.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use super::conn::{Conn, ConnError};
use super::route::Target;
use super::scram::{self, ScramKeys, ScramKeysClient};
use super::server_tls::{NegotiationError, ServerStream, ServerTls};
use crate::secret::SecretString;
use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::{backend, frontend};

/// Servers are trusted to frame correctly; this only bounds a corrupt length.
const MAX_SERVER_MESSAGE: usize = 1 << 30;

/// How the proxy logs in to a server as a given user.
#[derive(Clone, Debug)]
pub enum Credentials {
    /// The keys recovered from the client's SCRAM proof.
    Keys(ScramKeys),
    /// From the server passfile.
    Password(SecretString),
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot connect to {target}")]
    Connect {
        target: String,
        #[source]
        source: NegotiationError,
    },
    #[error("{target} did not finish the login within {timeout:?}")]
    Timeout { target: String, timeout: Duration },
    #[error("{target} refused the login: {message} (SQLSTATE {code})")]
    Refused {
        target: String,
        code: String,
        message: String,
    },
    #[error("SCRAM login to {target} failed")]
    Scram {
        target: String,
        #[source]
        source: scram::ScramError,
    },
    #[error("{target} asked for an authentication method the proxy cannot answer ({method})")]
    Method {
        target: String,
        method: &'static str,
    },
    #[error("protocol error from {target}: {message}")]
    Protocol { target: String, message: String },
}

impl ServerError {
    /// Worth retrying while a client is held: the server is down, starting,
    /// or shutting down (a failover in progress). Authentication failures
    /// are not.
    pub fn is_transient(&self) -> bool {
        match self {
            ServerError::Connect { source, .. } => source.is_transient(),
            ServerError::Timeout { .. } => true,
            ServerError::Protocol { .. } => true,
            ServerError::Refused { code, .. } => {
                // cannot_connect_now, admin_shutdown, crash_shutdown,
                // too_many_connections, read_only_sql_transaction.
                matches!(code.as_str(), "57P03" | "57P01" | "57P02" | "53300")
            }
            ServerError::Scram { .. } | ServerError::Method { .. } => false,
        }
    }
}

pub struct Server {
    pub conn: Conn<ServerStream>,
    pub target: Target,
    pub process_id: i32,
    pub secret_key: i32,
    /// ParameterStatus values from the login, replayed to clients.
    pub params: Vec<(String, String)>,
    /// Server-side names of the statements prepared on this connection.
    pub prepared: HashSet<String>,
    pub created: Instant,
    pub last_used: Instant,
}

impl Server {
    /// Connects to `target` and logs in, within `timeout`: through
    /// `socket` (the member's Unix socket on this host) when given and
    /// connectable, else over TCP with TLS as `tls` says.
    pub async fn connect(
        target: &Target,
        tls: &ServerTls,
        socket: Option<&Path>,
        user: &str,
        database: &str,
        credentials: &Credentials,
        timeout: Duration,
    ) -> Result<Server, ServerError> {
        let login = Self::login(target, tls, socket, user, database, credentials);
        match tokio::time::timeout(timeout, login).await {
            Ok(r) => r,
            Err(_) => Err(ServerError::Timeout {
                target: target.to_string(),
                timeout,
            }),
        }
    }

    async fn login(
        target: &Target,
        tls: &ServerTls,
        socket: Option<&Path>,
        user: &str,
        database: &str,
        credentials: &Credentials,
    ) -> Result<Server, ServerError> {
        let name = || target.to_string();
        let proto = |message: String| ServerError::Protocol {
            target: name(),
            message,
        };
        let local = match socket {
            Some(path) => match tokio::net::UnixStream::connect(path).await {
                Ok(s) => Some(ServerStream::Unix(s)),
                // Not running, or not here after all: the member's
                // address still serves.
                Err(e) => {
                    tracing::warn!(member = %target.member, path = %path.display(), error = %e, "cannot connect to the member's Unix socket; connecting over TCP");
                    None
                }
            },
            None => None,
        };
        let stream = match local {
            Some(s) => s,
            None => tls.connect(&target.host, target.port).await.map_err(|source| {
                if !source.is_transient() {
                    // An operator's problem (certificates, server_tls): say
                    // so in the proxy's log, not only to the client.
                    tracing::warn!(member = %target.member, error = %crate::util::chain(&source), "cannot open a server connection");
                }
                ServerError::Connect {
                    target: name(),
                    source,
                }
            })?,
        };
        let mut conn = Conn::new(stream, MAX_SERVER_MESSAGE);
        let io_err = |e: ConnError| proto(e.to_string());
        let mut out = BytesMut::new();
        frontend::startup_message([("user", user), ("database", database)], &mut out)
            .map_err(|e| proto(e.to_string()))?;
        conn.send(&out).await.map_err(|e| io_err(e.into()))?;

        enum Sasl {
            Keys(ScramKeysClient),
            Password(ScramSha256),
        }
        let mut sasl: Option<Sasl> = None;
        let mut params = Vec::new();
        let mut key = (0, 0);
        loop {
            let frame = conn.next_frame().await.map_err(io_err)?;
            let mut raw = BytesMut::from(&frame.raw[..]);
            let msg = backend::Message::parse(&mut raw)
                .map_err(|e| proto(e.to_string()))?
                .ok_or_else(|| proto("truncated message".into()))?;
            let mut out = BytesMut::new();
            match msg {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationSasl(body) => {
                    let mut has_scram = false;
                    let mut mechs = body.mechanisms();
                    while let Some(m) = fallible_iterator::FallibleIterator::next(&mut mechs)
                        .map_err(|e| proto(e.to_string()))?
                    {
                        has_scram |= m == "SCRAM-SHA-256";
                    }
                    if !has_scram {
                        return Err(ServerError::Method {
                            target: name(),
                            method: "SASL without SCRAM-SHA-256",
                        });
                    }
                    let (state, first) = match credentials {
                        Credentials::Keys(keys) => {
                            let c = ScramKeysClient::new(keys.clone(), scram::random_nonce());
                            let first = c.client_first().into_bytes();
                            (Sasl::Keys(c), first)
                        }
                        Credentials::Password(pw) => {
                            let c = ScramSha256::new(
                                pw.expose().as_bytes(),
                                ChannelBinding::unsupported(),
                            );
                            let first = c.message().to_vec();
                            (Sasl::Password(c), first)
                        }
                    };
                    frontend::sasl_initial_response("SCRAM-SHA-256", &first, &mut out)
                        .map_err(|e| proto(e.to_string()))?;
                    sasl = Some(state);
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let scram_err = |source| ServerError::Scram {
                        target: name(),
                        source,
                    };
                    let reply = match sasl.as_mut() {
                        Some(Sasl::Keys(c)) => {
                            c.server_first(body.data()).map_err(scram_err)?.into_bytes()
                        }
                        Some(Sasl::Password(c)) => {
                            c.update(body.data()).map_err(|e| proto(e.to_string()))?;
                            c.message().to_vec()
                        }
                        None => return Err(proto("SASL continue before SASL start".into())),
                    };
                    frontend::sasl_response(&reply, &mut out).map_err(|e| proto(e.to_string()))?;
                }
                backend::Message::AuthenticationSaslFinal(body) => match sasl.as_mut() {
                    Some(Sasl::Keys(c)) => {
                        c.server_final(body.data())
                            .map_err(|source| ServerError::Scram {
                                target: name(),
                                source,
                            })?
                    }
                    Some(Sasl::Password(c)) => {
                        c.finish(body.data()).map_err(|e| proto(e.to_string()))?
                    }
                    None => return Err(proto("SASL final before SASL start".into())),
                },
                backend::Message::AuthenticationCleartextPassword => match credentials {
                    Credentials::Password(pw) => {
                        frontend::password_message(pw.expose().as_bytes(), &mut out)
                            .map_err(|e| proto(e.to_string()))?
                    }
                    Credentials::Keys(_) => {
                        return Err(ServerError::Method {
                            target: name(),
                            method: "password (needs server_passfile)",
                        });
                    }
                },
                backend::Message::AuthenticationMd5Password(body) => match credentials {
                    Credentials::Password(pw) => {
                        let hash = postgres_protocol::authentication::md5_hash(
                            user.as_bytes(),
                            pw.expose().as_bytes(),
                            body.salt(),
                        );
                        frontend::password_message(hash.as_bytes(), &mut out)
                            .map_err(|e| proto(e.to_string()))?
                    }
                    Credentials::Keys(_) => {
                        return Err(ServerError::Method {
                            target: name(),
                            method: "md5 (needs server_passfile)",
                        });
                    }
                },
                backend::Message::ParameterStatus(body) => {
                    let n = body.name().map_err(|e| proto(e.to_string()))?;
                    let v = body.value().map_err(|e| proto(e.to_string()))?;
                    params.push((n.to_string(), v.to_string()));
                }
                backend::Message::BackendKeyData(body) => {
                    key = (body.process_id(), body.secret_key());
                }
                backend::Message::ReadyForQuery(_) => break,
                backend::Message::NoticeResponse(_) => {}
                backend::Message::ErrorResponse(body) => {
                    let (code, message) = error_fields(&body);
                    return Err(ServerError::Refused {
                        target: name(),
                        code,
                        message,
                    });
                }
                _ => return Err(proto(format!("unexpected message {:?}", frame.tag as char))),
            }
            if !out.is_empty() {
                conn.send(&out).await.map_err(|e| io_err(e.into()))?;
            }
        }
        let now = Instant::now();
        Ok(Server {
            conn,
            target: target.clone(),
            process_id: key.0,
            secret_key: key.1,
            params,
            prepared: HashSet::new(),
            created: now,
            last_used: now,
        })
    }

    /// Cheap liveness check of an idle connection: a server that closed it
    /// (restart, `pg_terminate_backend`, idle timeout) has made the socket
    /// readable; a healthy idle one has nothing to say.
    pub fn looks_alive(&self) -> bool {
        if !self.conn.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(
            self.conn.io.probe(&mut probe),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        )
    }
}

/// SQLSTATE and message of an ErrorResponse.
pub fn error_fields(body: &backend::ErrorResponseBody) -> (String, String) {
    let mut code = String::new();
    let mut message = String::new();
    let mut fields = body.fields();
    while let Ok(Some(f)) = fallible_iterator::FallibleIterator::next(&mut fields) {
        match f.type_() {
            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            _ => {}
        }
    }
    (code, message)
}

/// Sends a CancelRequest for `process_id` to the server at `host:port`,
/// over TLS as `tls` says (the key is as secret as the session's data).
pub async fn send_cancel(tls: &ServerTls, host: &str, port: u16, process_id: i32, secret_key: i32) {
    let mut out = BytesMut::new();
    frontend::cancel_request(process_id, secret_key, &mut out);
    let attempt = async {
        let mut s = tls
            .connect(host, port)
            .await
            .map_err(|e| std::io::Error::other(crate::util::chain(&e).to_string()))?;
        tokio::io::AsyncWriteExt::write_all(&mut s, &out).await?;
        tokio::io::AsyncWriteExt::flush(&mut s).await?;
        // The server closes the socket once it has handled the request.
        let mut sink = [0u8; 1];
        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut sink).await;
        Ok::<_, std::io::Error>(())
    };
    if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(5), attempt).await {
        tracing::warn!(host, port, error = %e, "cannot forward a cancel request");
    }
}
