//! A client's first moments: the connection limit, SSL/GSS negotiation,
//! the startup packet, SCRAM authentication, and the first server
//! connection (whose parameters the client is shown). Every failure here
//! ends in a PostgreSQL-style error or a closed socket, never a panic.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::codec::{self, Severity, Startup};
use super::conn::{Conn, ConnError, Stream};
use super::scram::{self, ScramError, ScramServer, ScramVerifier};
use super::session::{Session, Side};
use super::{Shared, server};

/// Serves one accepted connection to its end.
pub async fn serve(shared: Arc<Shared>, mut tcp: TcpStream, side: Side) {
    let _ = tcp.set_nodelay(true);
    let Ok(_permit) = shared.client_slots.clone().try_acquire_owned() else {
        shared.stats.clients_refused.fetch_add(1, Ordering::Relaxed);
        let mut out = BytesMut::new();
        codec::error_response(
            &mut out,
            Severity::Fatal,
            "53300",
            "sorry, too many clients already",
        );
        let _ = tcp.write_all(&out).await;
        return;
    };
    // The limit covers what the client controls (negotiation, login),
    // not the wait for a server, which hold_timeout bounds.
    let startup = tokio::time::timeout(shared.cfg.startup_timeout, login(&shared, tcp));
    let (client, user, database, keys) = match startup.await {
        Ok(Ok(Some(login))) => login,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "client login failed");
            return;
        }
        Err(_) => {
            // PostgreSQL closes such a connection silently too
            // ("incomplete startup packet" in its log only).
            tracing::debug!("client did not finish its login within startup_timeout");
            return;
        }
    };
    let session = match Session::start(shared.clone(), side, client, user, database, keys).await {
        Ok(Some(session)) => session,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(error = %e, "client left during its login");
            return;
        }
    };
    shared.stats.clients_active.fetch_add(1, Ordering::Relaxed);
    session.run().await;
    shared.stats.clients_active.fetch_sub(1, Ordering::Relaxed);
}

async fn read_startup<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
) -> Result<Startup, ConnError> {
    loop {
        if let Some(s) = codec::split_startup(buf)? {
            return Ok(s);
        }
        if io.read_buf(buf).await? == 0 {
            return Err(ConnError::Closed);
        }
    }
}

async fn fatal<S: Stream>(io: &mut S, code: &str, message: &str) {
    let mut out = BytesMut::new();
    codec::error_response(&mut out, Severity::Fatal, code, message);
    let _ = io.write_all(&out).await;
    let _ = io.flush().await;
}

/// A logged-in client: its connection, user, database and SCRAM keys.
type LoggedIn = (Conn<Box<dyn Stream>>, String, String, scram::ScramKeys);

/// Negotiation, startup packet and authentication. `None`: the connection
/// was a cancel request or was refused (the client has been told).
async fn login(shared: &Arc<Shared>, mut tcp: TcpStream) -> Result<Option<LoggedIn>, ConnError> {
    let mut buf = BytesMut::new();
    let mut stream: Box<dyn Stream>;
    let params = loop {
        match read_startup(&mut tcp, &mut buf).await? {
            Startup::Ssl => {
                let tls = shared.tls.read().expect("tls").clone();
                match tls {
                    Some(acceptor) => {
                        if !buf.is_empty() {
                            // Bytes sent before the handshake could be
                            // injected by a man in the middle (CVE-2021-23214).
                            fatal(
                                &mut tcp,
                                "08P01",
                                "received unencrypted data after SSL request",
                            )
                            .await;
                            return Ok(None);
                        }
                        tcp.write_all(b"S").await?;
                        let mut tls = acceptor.accept(tcp).await?;
                        match read_startup(&mut tls, &mut buf).await? {
                            Startup::Startup(params) => {
                                stream = Box::new(tls);
                                break params;
                            }
                            Startup::Cancel {
                                process_id,
                                secret_key,
                            } => {
                                cancel(shared, process_id, secret_key).await;
                                return Ok(None);
                            }
                            _ => {
                                fatal(&mut tls, "08P01", "invalid startup packet after TLS").await;
                                return Ok(None);
                            }
                        }
                    }
                    None => tcp.write_all(b"N").await?,
                }
            }
            Startup::GssEnc => tcp.write_all(b"N").await?,
            Startup::Cancel {
                process_id,
                secret_key,
            } => {
                cancel(shared, process_id, secret_key).await;
                return Ok(None);
            }
            Startup::UnsupportedVersion(v) => {
                let msg = format!(
                    "unsupported frontend protocol {}.{}: server supports 3.0 to 3.0",
                    (v >> 16) & 0xffff,
                    v & 0xffff
                );
                fatal(&mut tcp, "0A000", &msg).await;
                return Ok(None);
            }
            Startup::Startup(params) => {
                stream = Box::new(tcp);
                break params;
            }
        }
    };
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    if get("replication").is_some_and(|r| r != "false" && r != "off" && r != "0") {
        fatal(
            &mut stream,
            "08P01",
            "the pgha proxy does not accept replication connections",
        )
        .await;
        return Ok(None);
    }
    let Some(user) = get("user").filter(|u| !u.is_empty()) else {
        fatal(
            &mut stream,
            "28000",
            "no PostgreSQL user name specified in startup packet",
        )
        .await;
        return Ok(None);
    };
    let database = get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    let mut client = Conn::new(stream, shared.cfg.max_message_size);
    client.buf = buf;

    let verifier = match find_verifier(shared, &user).await {
        Ok(v) => v,
        Err(e) => {
            // The same for every user name, so it reveals nothing about
            // which users exist.
            tracing::warn!(user, error = %crate::util::chain(&e), "cannot look up a user's verifier with auth_query");
            shared
                .stats
                .auth_failures_total
                .fetch_add(1, Ordering::Relaxed);
            fatal(
                &mut client.io,
                "08006",
                "pgha proxy: cannot check the password now (auth_query failed)",
            )
            .await;
            return Ok(None);
        }
    };
    let keys = match authenticate(shared, &mut client, verifier).await? {
        Ok(keys) => keys,
        Err(e) => {
            shared
                .stats
                .auth_failures_total
                .fetch_add(1, Ordering::Relaxed);
            let (code, message) = match e {
                ScramError::BadProof => (
                    "28P01",
                    format!("password authentication failed for user \"{user}\""),
                ),
                ScramError::ChannelBinding => (
                    "08P01",
                    "SCRAM channel binding is not supported by the pgha proxy".into(),
                ),
                other => ("08P01", other.to_string()),
            };
            fatal(&mut client.io, code, &message).await;
            return Ok(None);
        }
    };
    Ok(Some((client, user, database, keys)))
}

/// `user`'s verifier: from the auth file, else (with `auth_user`) from the
/// leader. `None`: nobody by that name (or no usable verifier).
async fn find_verifier(
    shared: &Shared,
    user: &str,
) -> Result<Option<ScramVerifier>, super::auth_query::AuthQueryError> {
    if let Some(v) = shared.auth.read().expect("auth file").get(user).cloned() {
        return Ok(Some(v));
    }
    match &shared.auth_query {
        Some(q) => q.lookup(shared, user).await,
        None => Ok(None),
    }
}

/// The SCRAM exchange. The outer error is I/O; the inner one what the
/// client gets told. A user without a verifier goes through the same
/// exchange against a verifier nobody knows the password of, so that
/// "no such user" and "wrong password" look the same from outside, as
/// with PostgreSQL.
async fn authenticate(
    shared: &Shared,
    client: &mut Conn<Box<dyn Stream>>,
    verifier: Option<ScramVerifier>,
) -> Result<Result<scram::ScramKeys, ScramError>, ConnError> {
    let known = verifier.is_some();
    let verifier = verifier.unwrap_or_else(|| shared.unknown_user_verifier.clone());
    let mut out = BytesMut::new();
    codec::auth_sasl(&mut out);
    client.send(&out).await?;

    let frame = client.next_frame().await?;
    if frame.tag != b'p' {
        return Ok(Err(ScramError::Malformed("expected a SASLInitialResponse")));
    }
    let Some((mechanism, data)) = codec::sasl_initial_response(frame.body()) else {
        return Ok(Err(ScramError::Malformed("SASLInitialResponse")));
    };
    if mechanism != "SCRAM-SHA-256" {
        return Ok(Err(ScramError::Malformed(
            "client selected an invalid SASL authentication mechanism",
        )));
    }
    let mut server = ScramServer::new(&verifier, scram::random_nonce());
    let first = match server.client_first(data) {
        Ok(f) => f,
        Err(e) => return Ok(Err(e)),
    };
    let mut out = BytesMut::new();
    codec::auth_sasl_continue(&mut out, first.as_bytes());
    client.send(&out).await?;

    let frame = client.next_frame().await?;
    if frame.tag != b'p' {
        return Ok(Err(ScramError::Malformed("expected a SASLResponse")));
    }
    match server.client_final(frame.body()) {
        Ok((_, _)) if !known => Ok(Err(ScramError::BadProof)),
        Ok((final_message, keys)) => {
            let mut out = BytesMut::new();
            codec::auth_sasl_final(&mut out, final_message.as_bytes());
            codec::auth_ok(&mut out);
            client.send(&out).await?;
            Ok(Ok(keys))
        }
        Err(e) => Ok(Err(e)),
    }
}

async fn cancel(shared: &Shared, process_id: i32, secret_key: i32) {
    if let Some(t) = shared.cancels.lookup(process_id, secret_key) {
        server::send_cancel(
            &shared.server_tls,
            &t.host,
            t.port,
            t.process_id,
            t.secret_key,
        )
        .await;
    }
}
