//! HTTPS for the API: rustls with the node's certificate and key, and
//! optional client-certificate verification against `api.tls.client_ca`.
//!
//! Handshakes run on each connection's own task in [`super::server`],
//! within the connection limit and `api.header_read_timeout`, so a slow
//! or silent client cannot hold up the others.

use std::io;
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use crate::config::TlsConfig;
use crate::pem::{self, PemError};

/// Builds the acceptor from `[api.tls]`; errors name the file at fault.
pub fn acceptor(cfg: &TlsConfig) -> io::Result<TlsAcceptor> {
    let invalid = |e: PemError| io::Error::new(io::ErrorKind::InvalidData, e);
    let (certs, key) = pem::read_key_pair(&cfg.certificate, &cfg.key).map_err(invalid)?;
    let provider = pem::provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?;
    let builder = match &cfg.client_ca {
        Some(ca) => {
            let roots = pem::read_ca(ca).map_err(invalid)?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: unusable client CA: {e}", ca.display()),
                )
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: key does not fit the certificate: {e}",
                cfg.key.display()
            ),
        )
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Why the client for the other members' APIs cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum PeerClientError {
    #[error("cannot read {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds no usable PEM certificate")]
    Certificate {
        path: std::path::PathBuf,
        #[source]
        source: reqwest::Error,
    },
    #[error("{certificate} and {key} are not a usable client certificate and key")]
    Identity {
        certificate: std::path::PathBuf,
        key: std::path::PathBuf,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot build the HTTP client")]
    Build(#[source] reqwest::Error),
}

/// The HTTP client an agent (or `pgha list`) uses for the other members'
/// APIs: it trusts `api.tls.ca` beside the system's roots, so members with
/// certificates from a private CA can read each other's status during a
/// race and confirm a failsafe leader, and it presents
/// `api.tls.client_certificate` to members that require one.
pub fn peer_client(
    api: &crate::config::ApiConfig,
    timeout: std::time::Duration,
) -> Result<reqwest::Client, PeerClientError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| PeerClientError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let mut builder = reqwest::Client::builder().timeout(timeout);
    if let Some(tls) = &api.tls {
        if let Some(ca) = &tls.ca {
            let certs = reqwest::Certificate::from_pem_bundle(&read(ca)?).map_err(|source| {
                PeerClientError::Certificate {
                    path: ca.clone(),
                    source,
                }
            })?;
            builder = builder.tls_certs_merge(certs);
        }
        if let Some((certificate, key)) = &tls.client_identity {
            let mut pem = read(certificate)?;
            pem.push(b'\n');
            pem.extend(read(key)?);
            let identity =
                reqwest::Identity::from_pem(&pem).map_err(|source| PeerClientError::Identity {
                    certificate: certificate.clone(),
                    key: key.clone(),
                    source,
                })?;
            builder = builder.identity(identity);
        }
    }
    builder.build().map_err(PeerClientError::Build)
}
