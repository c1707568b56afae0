//! TLS on the gRPC port, with a CA and a server certificate made fresh for
//! each test: a client that trusts the CA calls the hub; a plaintext client
//! and a client trusting another CA cannot; the CLI dials `https://` with
//! `--tls-ca`. With `--tls-client-ca`, clients show certificates signed by
//! that CA: required (a client without one is refused) or optional.

use clap::Parser;
use hub::Settings;
use hub::config::{Cli, Command, Config};
use hub::tls::{ClientAuth, ClientAuthMode};
use hub_proto::v1 as proto;
use hub_proto::v1::admin_service_client::AdminServiceClient;
use hub_proto::v1::spoke_service_client::SpokeServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::support::*;

use hub::testing::TestPki as Pki;

async fn tls_hub(pki: &Pki) -> TestHub {
    TestHub::start_with(Settings {
        tls: Some(pki.identity()),
        ..Settings::default()
    })
    .await
}

/// Connects to `url`, trusting `ca` if given; the error text if it fails.
async fn connect(url: String, ca: Option<&str>) -> Result<Channel, String> {
    let mut endpoint = Channel::from_shared(url).unwrap();
    if let Some(ca) = ca {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    endpoint.connect().await.map_err(|e| hub::error::causes(&e))
}

/// Registers a spoke named `name` with the enrollment token.
async fn register(channel: Channel, name: &str) {
    let req = proto::RegisterRequest {
        name: name.into(),
        ..Default::default()
    };
    SpokeServiceClient::new(channel)
        .register(authed(req, ENROLLMENT_TOKEN))
        .await
        .expect("Register over TLS");
}

/// ListSpokes as the operator: the spokes' names, or the error text.
async fn spoke_names(channel: Result<Channel, String>) -> Result<Vec<String>, String> {
    let req = authed(proto::ListSpokesRequest::default(), ADMIN_TOKEN);
    let reply = AdminServiceClient::new(channel?)
        .list_spokes(req)
        .await
        .map_err(|s| s.to_string())?;
    Ok(reply
        .into_inner()
        .spokes
        .into_iter()
        .map(|s| s.name)
        .collect())
}

#[tokio::test]
async fn a_client_trusting_the_ca_calls_the_hub_and_a_plaintext_one_cannot() {
    let pki = Pki::new();
    let hub = tls_hub(&pki).await;
    let port = hub.addr.port();
    let https = format!("https://127.0.0.1:{port}");

    // Register a spoke and list it, both over TLS.
    let channel = connect(https.clone(), Some(&pki.ca)).await.unwrap();
    register(channel.clone(), "billing").await;
    assert_eq!(spoke_names(Ok(channel)).await.unwrap(), ["billing"]);
    // The certificate names localhost too.
    let by_name = connect(format!("https://localhost:{port}"), Some(&pki.ca)).await;
    assert_eq!(spoke_names(by_name).await.unwrap(), ["billing"]);

    // Plaintext HTTP/2 on the TLS port gets no answer.
    let plain = connect(format!("http://127.0.0.1:{port}"), None).await;
    let err = spoke_names(plain).await.expect_err("plaintext is refused");
    assert!(!err.is_empty());

    // A client trusting another CA refuses the hub's certificate.
    let other = Pki::new();
    let err = spoke_names(connect(https.clone(), Some(&other.ca)).await)
        .await
        .expect_err("an untrusted certificate is refused");
    assert!(err.contains("certificate"), "{err}");

    // Those failed handshakes did not hurt the hub.
    let again = connect(https, Some(&pki.ca)).await;
    assert_eq!(spoke_names(again).await.unwrap(), ["billing"]);
}

/// Runs `hub ARGS... spokes --json` against `hub`; stdout, or the exit
/// status and message.
async fn cli_spokes(args: &[&str]) -> Result<String, (i32, String)> {
    let mut argv = vec!["hub", "--admin-token", ADMIN_TOKEN];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["spokes", "--json"]);
    let cli = Cli::try_parse_from(argv).map_err(|e| (2, e.to_string()))?;
    let Command::Client(cmd) = cli.command else {
        panic!("not a client command");
    };
    let mut out = Vec::new();
    match hub::cli::run(&cli.global, cmd, &mut out).await {
        Ok(()) => Ok(String::from_utf8(out).unwrap()),
        Err(e) => Err((e.exit_code(), e.to_string())),
    }
}

#[tokio::test]
async fn the_cli_dials_https_with_the_given_ca() {
    let pki = Pki::new();
    let hub = tls_hub(&pki).await;
    let https = format!("https://127.0.0.1:{}", hub.addr.port());
    register(
        connect(https.clone(), Some(&pki.ca)).await.unwrap(),
        "billing",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca).unwrap();
    let ca = ca.to_str().unwrap();
    let bare = hub.addr.to_string();

    let out = cli_spokes(&["--addr", &https, "--tls-ca", ca])
        .await
        .unwrap();
    assert!(out.contains("\"billing\""), "{out}");
    // With --tls-ca, an address without a scheme is https.
    let out = cli_spokes(&["--addr", &bare, "--tls-ca", ca])
        .await
        .unwrap();
    assert!(out.contains("\"billing\""), "{out}");

    // Without the CA the system's roots do not know this hub.
    let (code, err) = cli_spokes(&["--addr", &https]).await.unwrap_err();
    assert_eq!(code, 1, "{err}");
    assert!(err.starts_with("cannot reach the hub at https://"), "{err}");
    assert!(err.contains("certificate"), "{err}");
    // Plaintext to the TLS port fails; --tls-ca with http:// is a usage error.
    let (code, _) = cli_spokes(&["--addr", &bare]).await.unwrap_err();
    assert_eq!(code, 1);
    let plain = format!("http://{bare}");
    let (code, err) = cli_spokes(&["--addr", &plain, "--tls-ca", ca])
        .await
        .unwrap_err();
    assert_eq!(code, 2);
    assert!(err.starts_with("--tls-ca (HUB_TLS_CA)"), "{err}");
    let missing = dir.path().join("missing.pem");
    let (code, err) = cli_spokes(&["--addr", &https, "--tls-ca", missing.to_str().unwrap()])
        .await
        .unwrap_err();
    assert_eq!(code, 2);
    assert!(err.starts_with("--tls-ca (HUB_TLS_CA)"), "{err}");
}

/// A CA for client certificates, made for one test (apart from the CA of
/// the hub's own certificate, as client CAs often are).
struct ClientCa {
    pem: String,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl ClientCa {
    fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "spokes' CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let issuer = rcgen::CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap())
            .expect("a self-signed CA");
        Self {
            pem: issuer.pem(),
            issuer,
        }
    }

    /// A client certificate for `name` signed by this CA, as an identity.
    fn identity(&self, name: &str) -> Identity {
        let (cert, key) = self.pems(name);
        Identity::from_pem(cert, key)
    }

    /// A client certificate for `name` signed by this CA and its key, PEM.
    fn pems(&self, name: &str) -> (String, String) {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn auth(&self, mode: ClientAuthMode) -> ClientAuth {
        ClientAuth::from_pem(self.pem.clone(), mode).expect("a valid CA")
    }
}

async fn mtls_hub(pki: &Pki, clients: &ClientCa, mode: ClientAuthMode) -> TestHub {
    TestHub::start_with(Settings {
        tls: Some(pki.identity()),
        tls_client_auth: Some(clients.auth(mode)),
        ..Settings::default()
    })
    .await
}

/// ListSpokes over TLS trusting `pki`'s CA, showing `identity` if given:
/// the spokes' names, or the error text.
async fn list_as(
    hub: &TestHub,
    pki: &Pki,
    identity: Option<Identity>,
) -> Result<Vec<String>, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca));
    if let Some(identity) = identity {
        tls = tls.identity(identity);
    }
    let endpoint = Channel::from_shared(format!("https://127.0.0.1:{}", hub.addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    let channel = endpoint.connect().await.map_err(|e| hub::error::causes(&e));
    spoke_names(channel).await
}

#[tokio::test]
async fn a_required_client_certificate_lets_in_only_clients_the_ca_signed() {
    let pki = Pki::new();
    let clients = ClientCa::new();
    let hub = mtls_hub(&pki, &clients, ClientAuthMode::Required).await;

    // A client with a certificate from the CA registers and lists.
    let https = format!("https://127.0.0.1:{}", hub.addr.port());
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .identity(clients.identity("billing"));
    let channel = Channel::from_shared(https)
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    register(channel, "billing").await;
    let operator = clients.identity("operator");
    assert_eq!(
        list_as(&hub, &pki, Some(operator)).await.unwrap(),
        ["billing"]
    );

    // Without a certificate: refused in the handshake, with the token right.
    let err = list_as(&hub, &pki, None).await.expect_err("no certificate");
    assert!(err.contains("CertificateRequired"), "{err}");
    // With a certificate from another CA (of the same name, so its
    // signature is what fails): refused too.
    let stranger = ClientCa::new().identity("billing");
    let err = list_as(&hub, &pki, Some(stranger))
        .await
        .expect_err("another CA");
    assert!(err.contains("received fatal alert"), "{err}");

    // Those refusals did not hurt the hub.
    let operator = clients.identity("operator");
    assert_eq!(
        list_as(&hub, &pki, Some(operator)).await.unwrap(),
        ["billing"]
    );
}

#[tokio::test]
async fn the_cli_shows_its_client_certificate_to_a_hub_that_requires_one() {
    let pki = Pki::new();
    let clients = ClientCa::new();
    let hub = mtls_hub(&pki, &clients, ClientAuthMode::Required).await;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let ca = write("ca.pem", &pki.ca);
    let (cert, key) = clients.pems("operator");
    let (cert, key) = (write("cert.pem", &cert), write("key.pem", &key));
    let https = format!("https://127.0.0.1:{}", hub.addr.port());

    let out = cli_spokes(&[
        "--addr",
        &https,
        "--tls-ca",
        &ca,
        "--tls-client-cert",
        &cert,
        "--tls-client-key",
        &key,
    ])
    .await
    .expect("the hub lets the CLI in");
    assert_eq!(out.trim(), "[]", "no spokes yet, and no error");
    let (code, message) = cli_spokes(&["--addr", &https, "--tls-ca", &ca])
        .await
        .expect_err("no client certificate");
    assert_eq!(code, 1, "{message}");
    let (code, message) = cli_spokes(&["--addr", &https, "--tls-client-cert", &cert])
        .await
        .expect_err("a certificate without its key");
    assert_eq!(code, 2, "{message}");
}

#[tokio::test]
async fn an_optional_client_certificate_lets_in_clients_without_one_but_not_a_bad_one() {
    let pki = Pki::new();
    let clients = ClientCa::new();
    let hub = mtls_hub(&pki, &clients, ClientAuthMode::Optional).await;
    let https = format!("https://127.0.0.1:{}", hub.addr.port());
    register(connect(https, Some(&pki.ca)).await.unwrap(), "billing").await;

    assert_eq!(list_as(&hub, &pki, None).await.unwrap(), ["billing"]);
    let signed = clients.identity("operator");
    assert_eq!(
        list_as(&hub, &pki, Some(signed)).await.unwrap(),
        ["billing"]
    );
    // A certificate shown must still be one the CA signed.
    let stranger = ClientCa::new().identity("operator");
    let err = list_as(&hub, &pki, Some(stranger))
        .await
        .expect_err("another CA");
    assert!(err.contains("received fatal alert"), "{err}");
}

/// `hub serve --data-dir <tmp> ARGS...` loaded into a `Config`, or the
/// error text.
fn serve_config(dir: &std::path::Path, args: &[&str]) -> Result<Config, String> {
    let mut argv = vec!["hub", "serve", "--data-dir", dir.to_str().unwrap()];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
    let Command::Serve(serve) = cli.command else {
        panic!("not serve");
    };
    Config::load(*serve, &cli.global).map_err(|e| e.to_string())
}

#[test]
fn client_ca_and_http_tls_options_are_checked_before_the_hub_starts() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let (cert, key) = (write("hub.crt", &pki.cert), write("hub.key", &pki.key));
    let ca = write("clients.pem", &ClientCa::new().pem);
    let tls = ["--tls-cert", cert.as_str(), "--tls-key", key.as_str()];
    let with_tls = |more: &[&str]| {
        let mut args = tls.to_vec();
        args.extend_from_slice(more);
        serve_config(dir.path(), &args)
    };

    // Defaults: no client certificates asked for; HTTPS with a certificate.
    let config = with_tls(&[]).unwrap();
    assert!(config.settings.tls_client_auth.is_none());
    assert!(config.settings.http_tls);
    let plain = serve_config(dir.path(), &[]).unwrap();
    assert!(plain.settings.tls.is_none() && !plain.settings.http_tls);
    assert!(!with_tls(&["--http-tls", "off"]).unwrap().settings.http_tls);

    // A CA: required unless told optional.
    let config = with_tls(&["--tls-client-ca", &ca]).unwrap();
    let auth = config.settings.tls_client_auth.expect("client auth");
    assert_eq!(auth.mode(), ClientAuthMode::Required);
    let config = with_tls(&["--tls-client-ca", &ca, "--tls-client-auth", "optional"]).unwrap();
    let auth = config.settings.tls_client_auth.expect("client auth");
    assert_eq!(auth.mode(), ClientAuthMode::Optional);

    // Each mistake names its option.
    let starts = |result: Result<Config, String>, prefix: &str| {
        let err = result.expect_err("a configuration error");
        assert!(err.starts_with(prefix), "{err}");
        err
    };
    starts(
        serve_config(dir.path(), &["--tls-client-ca", &ca]),
        "--tls-client-ca (HUB_TLS_CLIENT_CA): needs --tls-cert",
    );
    starts(
        with_tls(&["--tls-client-auth", "optional"]),
        "--tls-client-auth (HUB_TLS_CLIENT_AUTH): needs --tls-client-ca",
    );
    starts(
        with_tls(&["--tls-client-ca", &ca, "--tls-client-auth", "sometimes"]),
        "error: invalid value 'sometimes' for '--tls-client-auth",
    );
    let missing = dir.path().join("missing.pem");
    let err = starts(
        with_tls(&["--tls-client-ca", missing.to_str().unwrap()]),
        "--tls-client-ca (HUB_TLS_CLIENT_CA): ",
    );
    assert!(err.contains("missing.pem"), "{err}");
    let garbage = write("garbage.pem", "not a certificate\n");
    let err = starts(
        with_tls(&["--tls-client-ca", &garbage]),
        "--tls-client-ca (HUB_TLS_CLIENT_CA): ",
    );
    assert!(err.contains("BEGIN CERTIFICATE"), "{err}");
    // A key where the CA belongs.
    starts(
        with_tls(&["--tls-client-ca", &key]),
        "--tls-client-ca (HUB_TLS_CLIENT_CA): ",
    );
    let broken = write(
        "broken.pem",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    starts(
        with_tls(&["--tls-client-ca", &broken]),
        "--tls-client-ca (HUB_TLS_CLIENT_CA): ",
    );
    starts(
        serve_config(dir.path(), &["--http-tls", "on"]),
        "--http-tls (HUB_HTTP_TLS): needs --tls-cert and --tls-key",
    );
}
