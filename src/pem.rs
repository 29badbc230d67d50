//! PEM certificate and key files, read the same way for the API's HTTPS
//! server and for the etcd client, so that a bad file is reported the same
//! way (naming the file) in both places, and when the configuration is
//! checked rather than at the first connection.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a valid PEM file", path.display())]
    Malformed {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)", path.display())]
    NoKey { path: PathBuf },
    #[error("{} holds a certificate that cannot be used as a CA", path.display())]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{} holds a private key rustls cannot use", path.display())]
    BadKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the key in {} does not fit the certificate in {}", key.display(), certificate.display())]
    KeyMismatch {
        certificate: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

fn open(path: &Path) -> Result<BufReader<std::fs::File>, PemError> {
    std::fs::File::open(path)
        .map(BufReader::new)
        .map_err(|source| PemError::Read {
            path: path.to_path_buf(),
            source,
        })
}

/// Every certificate in `path`; at least one.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = rustls_pemfile::certs(&mut open(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| PemError::Malformed {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key in `path`.
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    rustls_pemfile::private_key(&mut open(path)?)
        .map_err(|source| PemError::Malformed {
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| PemError::NoKey {
            path: path.to_path_buf(),
        })
}

/// The certificates of `path` as trust anchors.
pub fn read_ca(path: &Path) -> Result<rustls::RootCertStore, PemError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certificates(path)? {
        roots.add(cert).map_err(|source| PemError::BadCa {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(roots)
}

/// The certificate chain of `certificate` and the key of `key`, checked to
/// belong together (a mismatch would only show at the first handshake).
/// Only a proven mismatch or an unusable key is an error: a certificate
/// rustls cannot inspect (an old X.509 v1, say) is left for the peer that
/// verifies it to judge.
pub fn read_key_pair(
    certificate: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PemError> {
    let certs = read_certificates(certificate)?;
    let private = read_private_key(key)?;
    let mismatch = |source| PemError::KeyMismatch {
        certificate: certificate.to_path_buf(),
        key: key.to_path_buf(),
        source,
    };
    let signing_key = provider()
        .key_provider
        .load_private_key(private.clone_key())
        .map_err(|source| PemError::BadKey {
            path: key.to_path_buf(),
            source,
        })?;
    match rustls::sign::CertifiedKey::new(certs.clone(), signing_key).keys_match() {
        Err(e @ rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(mismatch(e))
        }
        _ => Ok((certs, private)),
    }
}

/// The process-wide rustls crypto provider, or aws-lc-rs (the one pgha is
/// built with) when none was installed.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}
