//! TLS from the proxy to the servers (`server_tls`), with libpq's
//! `sslmode` meanings: the proxy sends an `SSLRequest`, upgrades on `S`,
//! and on `N` goes on in plain text only with `prefer`.
//!
//! The certificate checks are rustls' own (webpki) with the configured
//! trust anchors; `verify-ca` accepts a certificate whatever names it
//! holds, and `prefer`/`require` check only that the server holds the key
//! of the certificate it shows (the handshake signature), as libpq does.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use crate::config::proxy::{ProxyTls, ServerTlsMode};

/// What the proxy needs to open a server connection: the mode and, unless
/// it is `disable`, the rustls client configuration, rebuilt from its
/// files on [`reload`](Self::reload).
pub struct ServerTls {
    pub mode: ServerTlsMode,
    ca: Option<PathBuf>,
    client: Option<ProxyTls>,
    connector: RwLock<Option<TlsConnector>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    #[error("cannot load server_tls_ca")]
    Ca(#[source] crate::pem::PemError),
    #[error("cannot load server_tls_certificate and server_tls_key")]
    ClientCertificate(#[source] crate::pem::PemError),
    #[error("TLS client configuration refused")]
    Config(#[source] rustls::Error),
    #[error("server_tls = \"{0}\" needs server_tls_ca")]
    MissingCa(ServerTlsMode),
}

/// Why no connection (plain or TLS) to a server came about.
#[derive(Debug, thiserror::Error)]
pub enum NegotiationError {
    #[error("cannot connect")]
    Connect(#[source] io::Error),
    #[error("the server does not accept TLS (answered N to SSLRequest) and server_tls = \"{0}\"")]
    Refused(ServerTlsMode),
    #[error("the server answered SSLRequest with {0:?} (neither S nor N)")]
    BadAnswer(char),
    #[error("TLS handshake failed")]
    Handshake(#[source] io::Error),
    #[error("the host name {0:?} cannot be checked against a certificate")]
    BadName(String),
}

impl NegotiationError {
    /// A certificate the proxy refuses, or a server without TLS when TLS
    /// is required, stays so until an operator acts: retrying within the
    /// hold only delays the error. A reset or refused connection may be a
    /// server restarting.
    pub fn is_transient(&self) -> bool {
        match self {
            NegotiationError::Connect(_) => true,
            NegotiationError::Handshake(e) => e
                .get_ref()
                .is_none_or(|inner| inner.downcast_ref::<rustls::Error>().is_none()),
            NegotiationError::Refused(_)
            | NegotiationError::BadAnswer(_)
            | NegotiationError::BadName(_) => false,
        }
    }
}

impl ServerTls {
    /// Reads the trust anchors (for the verify modes) and the client
    /// certificate, and builds the client configuration.
    pub fn new(
        mode: ServerTlsMode,
        ca: Option<&Path>,
        client: Option<&ProxyTls>,
    ) -> Result<ServerTls, ServerTlsError> {
        let connector = connector(mode, ca, client)?;
        Ok(ServerTls {
            mode,
            ca: ca.map(Path::to_path_buf),
            client: client.cloned(),
            connector: RwLock::new(connector),
        })
    }

    /// Reads the files again (SIGHUP: a renewed CA or client certificate).
    /// On error the previous configuration stays in use; connections
    /// already open keep theirs.
    pub fn reload(&self) -> Result<(), ServerTlsError> {
        let fresh = connector(self.mode, self.ca.as_deref(), self.client.as_ref())?;
        *self.connector.write().expect("server TLS configuration") = fresh;
        Ok(())
    }

    /// Connects to `host:port` and negotiates TLS as the mode says.
    pub async fn connect(&self, host: &str, port: u16) -> Result<ServerStream, NegotiationError> {
        let mut tcp = TcpStream::connect((host, port))
            .await
            .map_err(NegotiationError::Connect)?;
        let _ = tcp.set_nodelay(true);
        // A clone (an Arc) so that no lock is held across the handshake.
        let connector = self
            .connector
            .read()
            .expect("server TLS configuration")
            .clone();
        let Some(connector) = connector else {
            return Ok(ServerStream::Plain(tcp));
        };
        let mut out = BytesMut::new();
        frontend::ssl_request(&mut out);
        tcp.write_all(&out)
            .await
            .map_err(NegotiationError::Connect)?;
        // Exactly one byte: anything the server (or a man in the middle)
        // sent after it must go through the TLS handshake, not be taken
        // as plain text (CVE-2021-23222).
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer)
            .await
            .map_err(NegotiationError::Connect)?;
        match answer[0] {
            b'S' => {
                let name = ServerName::try_from(host.to_string())
                    .map_err(|_| NegotiationError::BadName(host.to_string()))?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(NegotiationError::Handshake)?;
                Ok(ServerStream::Tls(Box::new(tls)))
            }
            b'N' if !self.mode.requires_tls() => Ok(ServerStream::Plain(tcp)),
            b'N' => Err(NegotiationError::Refused(self.mode)),
            other => Err(NegotiationError::BadAnswer(other as char)),
        }
    }
}

/// The rustls client configuration for `mode` (`None` for `disable`).
fn connector(
    mode: ServerTlsMode,
    ca: Option<&Path>,
    client: Option<&ProxyTls>,
) -> Result<Option<TlsConnector>, ServerTlsError> {
    let provider = crate::pem::provider();
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, ca) {
        (ServerTlsMode::Disable, _) => return Ok(None),
        (ServerTlsMode::Prefer | ServerTlsMode::Require, _) => {
            Arc::new(Unverified(provider.clone()))
        }
        (ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull, None) => {
            return Err(ServerTlsError::MissingCa(mode));
        }
        (ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull, Some(ca)) => {
            let roots = crate::pem::read_ca(ca).map_err(ServerTlsError::Ca)?;
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| ServerTlsError::Config(rustls::Error::General(e.to_string())))?;
            if mode == ServerTlsMode::VerifyCa {
                Arc::new(AnyName(webpki))
            } else {
                webpki
            }
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(ServerTlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    // Shown only to a server that asks for a certificate (`cert`
    // authentication or `clientcert` in its pg_hba.conf).
    let mut config = match client {
        Some(client) => {
            let (chain, key) = crate::pem::read_key_pair(&client.certificate, &client.key)
                .map_err(ServerTlsError::ClientCertificate)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(ServerTlsError::Config)?
        }
        None => builder.with_no_client_auth(),
    };
    // What PostgreSQL 17's direct TLS requires; older servers ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Some(TlsConnector::from(Arc::new(config))))
}

/// A server connection, in plain text or TLS over TCP, or through the
/// Unix socket of a server on this host (never TLS: nothing leaves the
/// host, and PostgreSQL refuses TLS there).
pub enum ServerStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl ServerStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, ServerStream::Tls(_))
    }

    /// Non-blocking read of the socket underneath, for the liveness probe
    /// of idle connections. Under TLS this reads raw record bytes, so it
    /// is only for connections that are dropped when it finds any.
    pub fn probe(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ServerStream::Plain(s) => s.try_read(buf),
            ServerStream::Tls(s) => s.get_ref().0.try_read(buf),
            ServerStream::Unix(s) => s.try_read(buf),
        }
    }
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            ServerStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ServerStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            ServerStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            ServerStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// `prefer` and `require`: any certificate, but the handshake signature
/// must still be the certificate key's (so the session keys are the
/// server's, whoever it is).
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: webpki's chain check, with a certificate for another name
/// accepted. Every other verdict (expired, unknown issuer, wrong usage)
/// stands.
#[derive(Debug)]
struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connection_trouble_is_retried() {
        let cert = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            )
        };
        let cases = [
            (
                NegotiationError::Connect(io::ErrorKind::ConnectionRefused.into()),
                true,
            ),
            (
                NegotiationError::Handshake(io::ErrorKind::ConnectionReset.into()),
                true,
            ),
            (NegotiationError::Handshake(cert()), false),
            (NegotiationError::Refused(ServerTlsMode::Require), false),
            (NegotiationError::BadAnswer('E'), false),
            (NegotiationError::BadName("a b".into()), false),
        ];
        for (error, transient) in cases {
            assert_eq!(error.is_transient(), transient, "{error:?}");
        }
    }

    #[test]
    fn verify_modes_need_a_ca() {
        for mode in [ServerTlsMode::VerifyCa, ServerTlsMode::VerifyFull] {
            assert!(matches!(
                ServerTls::new(mode, None, None),
                Err(ServerTlsError::MissingCa(m)) if m == mode
            ));
        }
        assert!(
            ServerTls::new(ServerTlsMode::Disable, None, None)
                .unwrap()
                .connector
                .read()
                .unwrap()
                .is_none()
        );
        assert!(
            ServerTls::new(ServerTlsMode::Require, None, None)
                .unwrap()
                .connector
                .read()
                .unwrap()
                .is_some()
        );
    }
}
