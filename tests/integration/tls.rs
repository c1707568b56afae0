//! TLS on the gRPC port, with a CA and a server certificate made fresh for
//! each test: a client that trusts the CA calls the hub; a plaintext client
//! and a client trusting another CA cannot; the CLI dials `https://` with
//! `--tls-ca`.

use clap::Parser;
use hub::Settings;
use hub::config::{Cli, Command};
use hub_proto::v1 as proto;
use hub_proto::v1::admin_service_client::AdminServiceClient;
use hub_proto::v1::spoke_service_client::SpokeServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

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
