//! TLS for the gRPC port: the server's certificate chain and private key,
//! checked when they are loaded so that a bad file stops the hub before it
//! binds, not at its first connection.

use std::fmt;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::error::causes;

/// A client that opens a connection and never finishes the handshake is
/// dropped after this long, so it cannot hold an accept slot forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The hub's certificate chain and private key (PEM), known to parse and to
/// belong together.
#[derive(Clone)]
pub struct TlsIdentity {
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// Which half of an identity is unusable, and why.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate chain.
    #[error("{0}")]
    Cert(String),
    /// The private key, or the pair (a key that does not match the
    /// certificate).
    #[error("{0}")]
    Key(String),
}

impl TlsIdentity {
    /// Checks a PEM certificate chain (leaf first) and its PEM private key
    /// (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem(cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Result<Self, TlsError> {
        let identity = Self {
            cert: cert.into(),
            key: key.into(),
        };
        let chain = CertificateDer::pem_slice_iter(&identity.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Cert(format!("not a PEM certificate file: {e}")))?;
        let leaf = chain.first().ok_or_else(|| {
            TlsError::Cert("no \"BEGIN CERTIFICATE\" block: a PEM certificate is expected".into())
        })?;
        rustls::server::ParsedCertificate::try_from(leaf)
            .map_err(|e| TlsError::Cert(format!("the first certificate does not parse: {e}")))?;
        PrivateKeyDer::from_pem_slice(&identity.key).map_err(|e| {
            TlsError::Key(format!(
                "no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"
            ))
        })?;
        // What the server will do at start: rustls checks the key type and
        // that the key belongs to the certificate.
        Server::builder()
            .tls_config(identity.server_config())
            .map_err(|e| {
                TlsError::Key(format!(
                    "cannot be used with the certificate: {}",
                    causes(&e)
                ))
            })?;
        Ok(identity)
    }

    /// The server-side TLS configuration for tonic.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .timeout(HANDSHAKE_TIMEOUT)
    }
}

/// Never prints the key.
impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity").finish_non_exhaustive()
    }
}
