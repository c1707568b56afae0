//! TLS for both ports. The hub's certificate chain and private key, and the
//! CA that client certificates must chain to on the gRPC port
//! (`--tls-client-ca`), are checked when they are loaded, so that a bad
//! file stops the hub before it binds, not at its first connection.
//! [`TlsListener`] puts the HTTP port behind the same identity.
//!
//! The HTTP port never asks for a client certificate: browsers, Prometheus
//! scrapers and health probes talk to it, and the admin page has its own
//! sign-in.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::error::causes;
use crate::settings::Settings;

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

/// Which part of the TLS settings is unusable, and why.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate chain.
    #[error("{0}")]
    Cert(String),
    /// The private key, or the pair (a key that does not match the
    /// certificate).
    #[error("{0}")]
    Key(String),
    /// The CA file for client certificates.
    #[error("{0}")]
    ClientCa(String),
    /// A setting that needs `Settings::tls`, given without it.
    #[error("Settings::{0} needs Settings::tls (the hub's certificate and key)")]
    NoIdentity(&'static str),
}

/// The one crypto provider of the tree (tonic's `tls-ring`), named rather
/// than taken from the process default.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsIdentity {
    /// Checks a PEM certificate chain (leaf first) and its PEM private key
    /// (PKCS#8, PKCS#1 or SEC1), for both ports.
    pub fn from_pem(cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Result<Self, TlsError> {
        let identity = Self {
            cert: cert.into(),
            key: key.into(),
        };
        let chain = identity.chain()?;
        let leaf = chain.first().ok_or_else(|| {
            TlsError::Cert("no \"BEGIN CERTIFICATE\" block: a PEM certificate is expected".into())
        })?;
        rustls::server::ParsedCertificate::try_from(leaf)
            .map_err(|e| TlsError::Cert(format!("the first certificate does not parse: {e}")))?;
        identity.private_key()?;
        // What the server will do at start: rustls checks the key type and
        // that the key belongs to the certificate.
        Server::builder()
            .tls_config(identity.server_config(None))
            .map_err(|e| {
                TlsError::Key(format!(
                    "cannot be used with the certificate: {}",
                    causes(&e)
                ))
            })?;
        identity.http_acceptor()?;
        Ok(identity)
    }

    fn chain(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Cert(format!("not a PEM certificate file: {e}")))
    }

    fn private_key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| {
            TlsError::Key(format!(
                "no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"
            ))
        })
    }

    /// The gRPC port's TLS configuration for tonic, verifying client
    /// certificates when `clients` is given.
    pub fn server_config(&self, clients: Option<&ClientAuth>) -> ServerTlsConfig {
        let config = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .timeout(HANDSHAKE_TIMEOUT);
        match clients {
            Some(clients) => config
                .client_ca_root(Certificate::from_pem(&clients.ca))
                .client_auth_optional(clients.mode == ClientAuthMode::Optional),
            None => config,
        }
    }

    /// How a standby reaches the leading replica over TLS: it trusts the
    /// system's roots and this certificate (replicas share one, maybe
    /// self-signed), and presents it as its own when the leader asks for
    /// client certificates (`with_identity`; the leader's client CA must
    /// then accept it).
    pub fn client_config(&self, with_identity: bool) -> tonic::transport::ClientTlsConfig {
        let config = tonic::transport::ClientTlsConfig::new()
            .with_native_roots()
            .ca_certificate(Certificate::from_pem(&self.cert));
        match with_identity {
            true => config.identity(Identity::from_pem(&self.cert, &self.key)),
            false => config,
        }
    }

    /// The HTTP port's TLS acceptor: HTTP/2 or HTTP/1.1 by ALPN, no client
    /// certificates.
    pub fn http_acceptor(&self) -> Result<TlsAcceptor, TlsError> {
        let key_error = |e: rustls::Error| {
            TlsError::Key(format!(
                "cannot be used with the certificate: {}",
                causes(&e)
            ))
        };
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(key_error)?
            .with_no_client_auth()
            .with_single_cert(self.chain()?, self.private_key()?)
            .map_err(key_error)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// Never prints the key.
impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity").finish_non_exhaustive()
    }
}

/// Whether a gRPC client must show a certificate (`--tls-client-auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ClientAuthMode {
    /// A client without a certificate signed by the CA fails the handshake.
    #[default]
    Required,
    /// A client may connect without a certificate; one it shows must be
    /// signed by the CA.
    Optional,
}

/// The CA (PEM, one or more certificates) that gRPC clients' certificates
/// must chain to, and whether they must show one.
#[derive(Clone)]
pub struct ClientAuth {
    ca: Vec<u8>,
    mode: ClientAuthMode,
}

impl ClientAuth {
    /// Checks that `ca` holds PEM certificates that all parse, as the
    /// server will use them (tonic would skip one that does not parse).
    pub fn from_pem(ca: impl Into<Vec<u8>>, mode: ClientAuthMode) -> Result<Self, TlsError> {
        let ca = ca.into();
        let certs = CertificateDer::pem_slice_iter(&ca)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::ClientCa(format!("not a PEM certificate file: {e}")))?;
        if certs.is_empty() {
            return Err(TlsError::ClientCa(
                "no \"BEGIN CERTIFICATE\" block: a PEM CA certificate is expected".into(),
            ));
        }
        let mut roots = RootCertStore::empty();
        for (n, cert) in certs.into_iter().enumerate() {
            roots.add(cert).map_err(|e| {
                TlsError::ClientCa(format!("certificate {} does not parse: {e}", n + 1))
            })?;
        }
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::ClientCa(format!("cannot verify clients with it: {e}")))?;
        Ok(Self { ca, mode })
    }

    /// Whether a certificate is required.
    pub fn mode(&self) -> ClientAuthMode {
        self.mode
    }
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientAuth")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// What each port serves with: tonic's TLS configuration for the gRPC
/// port and the HTTP port's acceptor, each `None` for plaintext.
pub fn for_ports(
    settings: &Settings,
) -> Result<(Option<ServerTlsConfig>, Option<TlsAcceptor>), TlsError> {
    let Some(identity) = &settings.tls else {
        if settings.tls_client_auth.is_some() {
            return Err(TlsError::NoIdentity("tls_client_auth"));
        }
        if settings.http_tls {
            return Err(TlsError::NoIdentity("http_tls"));
        }
        return Ok((None, None));
    };
    let grpc = identity.server_config(settings.tls_client_auth.as_ref());
    let http = match settings.http_tls {
        true => Some(identity.http_acceptor()?),
        false => None,
    };
    Ok((Some(grpc), http))
}

/// A listener whose connections are TLS streams: it accepts on the inner
/// listener and runs each handshake in a task of its own, under the
/// handshake timeout, so a slow or silent client holds no one else up;
/// `accept` yields the connections whose handshake finished. Dropping it
/// stops accepting.
pub struct TlsListener<L: Listener> {
    ready: mpsc::Receiver<(TlsStream<L::Io>, L::Addr)>,
    local_addr: std::io::Result<L::Addr>,
    accepting: JoinHandle<()>,
}

impl<L> TlsListener<L>
where
    L: Listener,
    L::Addr: Clone + fmt::Debug + Sync,
{
    /// Starts accepting on `inner` (needs a Tokio runtime).
    pub fn new(mut inner: L, acceptor: TlsAcceptor) -> Self {
        let local_addr = inner.local_addr();
        let (done, ready) = mpsc::channel(64);
        let accepting = tokio::spawn(async move {
            loop {
                let (io, peer) = inner.accept().await;
                let (acceptor, done) = (acceptor.clone(), done.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                        Ok(Ok(tls)) => {
                            // Fails only when the listener is gone.
                            let _ = done.send((tls, peer)).await;
                        }
                        // Per connection and caused by the peer: not worth
                        // more than a debug line.
                        Ok(Err(e)) => {
                            tracing::debug!(?peer, error = %e, "HTTP port: TLS handshake failed");
                        }
                        Err(_) => tracing::debug!(?peer, "HTTP port: TLS handshake timed out"),
                    }
                });
            }
        });
        Self {
            ready,
            local_addr,
            accepting,
        }
    }
}

impl<L> Listener for TlsListener<L>
where
    L: Listener,
    L::Addr: Clone + Sync,
{
    type Io = TlsStream<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accepting task ended (it runs until dropped): nothing more
            // will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        match &self.local_addr {
            Ok(addr) => Ok(addr.clone()),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        }
    }
}

impl<L: Listener> Drop for TlsListener<L> {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}
