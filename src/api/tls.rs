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
