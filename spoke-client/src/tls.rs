//! TLS to the hub: the CA certificates to trust (the system's roots when
//! none is given), the name the hub's certificate must carry, and an
//! optional client identity for mutual TLS. Checked when the client is
//! built, with errors naming the setter; applied to every `https://`
//! endpoint when it is dialed.

use std::fmt;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::error::{Error, Result, causes};

/// The TLS options of the builder.
#[derive(Clone, Default)]
pub(crate) struct Tls {
    /// PEM CA certificates; empty: the system's roots.
    pub ca_certs: Vec<Vec<u8>>,
    /// Overrides the endpoint's host as the name to verify.
    pub domain_name: Option<String>,
    /// PEM certificate chain and private key shown to the hub.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Never prints the key.
impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("ca_certs", &self.ca_certs.len())
            .field("domain_name", &self.domain_name)
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

impl Tls {
    /// Checks every option against the endpoints, naming the setter at
    /// fault, and prepares each `https://` endpoint once as a dial would.
    pub fn check(&self, endpoints: &[String]) -> Result<()> {
        for pem in &self.ca_certs {
            let mut roots = RootCertStore::empty();
            for der in certificates("tls_ca_cert", pem)? {
                roots.add(der).map_err(|e| {
                    Error::config("tls_ca_cert", format!("a certificate does not parse: {e}"))
                })?;
            }
        }
        if let Some(name) = &self.domain_name {
            ServerName::try_from(name.as_str()).map_err(|_| {
                Error::config(
                    "tls_domain_name",
                    format!("{name:?} is not a DNS name or IP address"),
                )
            })?;
        }
        if let Some((cert, key)) = &self.identity {
            let chain = certificates("tls_identity", cert)?;
            rustls::server::ParsedCertificate::try_from(&chain[0]).map_err(|e| {
                Error::config(
                    "tls_identity",
                    format!("the first certificate does not parse: {e}"),
                )
            })?;
            PrivateKeyDer::from_pem_slice(key).map_err(|e| {
                Error::config(
                    "tls_identity",
                    format!("no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
                )
            })?;
            // rustls checks the key type and that the key belongs to the
            // certificate; an identity alone needs no roots.
            let alone = ClientTlsConfig::new().identity(Identity::from_pem(cert, key));
            Endpoint::from_static("https://localhost")
                .tls_config(alone)
                .map_err(|e| {
                    Error::config(
                        "tls_identity",
                        format!(
                            "the key cannot be used with the certificate: {}",
                            causes(&e)
                        ),
                    )
                })?;
        }
        let https: Vec<&String> = endpoints
            .iter()
            .filter(|url| url.starts_with("https://"))
            .collect();
        if https.is_empty() {
            let set = [
                ("tls_ca_cert", !self.ca_certs.is_empty()),
                ("tls_domain_name", self.domain_name.is_some()),
                ("tls_identity", self.identity.is_some()),
            ];
            if let Some((field, _)) = set.iter().find(|(_, set)| *set) {
                return Err(Error::config(
                    field,
                    "set, but no endpoint is https://: TLS would never be used",
                ));
            }
        }
        for url in https {
            self.endpoint(url)?;
        }
        Ok(())
    }

    /// A tonic endpoint for `url`, with TLS when it is `https://`.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| Error::config("endpoint", format!("{url}: {e}")))?;
        if !url.starts_with("https://") {
            return Ok(endpoint);
        }
        let mut tls = ClientTlsConfig::new();
        tls = if self.ca_certs.is_empty() {
            tls.with_native_roots()
        } else {
            tls.ca_certificates(self.ca_certs.iter().map(Certificate::from_pem))
        };
        if let Some(name) = &self.domain_name {
            tls = tls.domain_name(name);
        }
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        endpoint.tls_config(tls).map_err(|e| {
            let hint = if self.ca_certs.is_empty() {
                " (no tls_ca_cert given, so the system's root certificates are used)"
            } else {
                ""
            };
            Error::config("endpoint", format!("{url}: TLS: {}{hint}", causes(&e)))
        })
    }
}

/// The certificates of a PEM file: at least one.
fn certificates(field: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::config(field, format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(Error::config(
            field,
            "no \"BEGIN CERTIFICATE\" block: a PEM certificate is expected",
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    fn leaf() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["billing".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn field_of(tls: &Tls, endpoints: &[&str]) -> &'static str {
        let endpoints: Vec<String> = endpoints.iter().map(|e| e.to_string()).collect();
        match tls.check(&endpoints) {
            Err(Error::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    const HTTPS: &[&str] = &["https://127.0.0.1:50051"];

    #[test]
    fn a_ca_a_name_and_an_identity_pass() {
        let (cert, key) = leaf();
        let tls = Tls {
            ca_certs: vec![ca().into_bytes()],
            domain_name: Some("hub.internal".into()),
            identity: Some((cert.into_bytes(), key.into_bytes())),
        };
        tls.check(&["http://a:1".into(), HTTPS[0].into()]).unwrap();
        let endpoint = tls.endpoint(HTTPS[0]).unwrap();
        assert_eq!(endpoint.uri().scheme_str(), Some("https"));
    }

    #[test]
    fn each_mistake_names_its_setter() {
        let garbage = Tls {
            ca_certs: vec![b"not a certificate".to_vec()],
            ..Tls::default()
        };
        assert_eq!(field_of(&garbage, HTTPS), "tls_ca_cert");
        let broken = Tls {
            ca_certs: vec![
                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_vec(),
            ],
            ..Tls::default()
        };
        assert_eq!(field_of(&broken, HTTPS), "tls_ca_cert");
        let name = Tls {
            domain_name: Some("not a name".into()),
            ..Tls::default()
        };
        assert_eq!(field_of(&name, HTTPS), "tls_domain_name");
        let (cert, key) = leaf();
        let (_, other_key) = leaf();
        let no_key = Tls {
            identity: Some((cert.clone().into_bytes(), cert.clone().into_bytes())),
            ca_certs: vec![ca().into_bytes()],
            ..Tls::default()
        };
        assert_eq!(field_of(&no_key, HTTPS), "tls_identity");
        let mismatched = Tls {
            identity: Some((cert.into_bytes(), other_key.into_bytes())),
            ca_certs: vec![ca().into_bytes()],
            ..Tls::default()
        };
        assert_eq!(field_of(&mismatched, HTTPS), "tls_identity");
        let not_a_cert = Tls {
            identity: Some((key.clone().into_bytes(), key.into_bytes())),
            ca_certs: vec![ca().into_bytes()],
            ..Tls::default()
        };
        assert_eq!(field_of(&not_a_cert, HTTPS), "tls_identity");
        // TLS options with only plaintext endpoints: a mistake, not a no-op.
        let unused = Tls {
            ca_certs: vec![ca().into_bytes()],
            ..Tls::default()
        };
        assert_eq!(
            field_of(&unused, &["http://127.0.0.1:50051"]),
            "tls_ca_cert"
        );
        Tls::default()
            .check(&["http://127.0.0.1:50051".into()])
            .unwrap();
    }
}
