//! TLS to the hub: trusting the hub's CA, the client registers and handles
//! a directive over `https://`; trusting another CA, it never connects and
//! its status says why; a CA that is not a certificate fails the build.

use hub_proto::v1 as proto;
use serde_json::{Value, json};
use spoke_client::Error;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_registers_and_handles_a_directive_over_tls() {
    let hub = TestHub::start_tls().await;
    let state = tempfile::tempdir().unwrap();
    let client = spoke("billing", &hub.url(), state.path())
        .tls_ca_cert(hub.ca.clone().unwrap())
        .handler("echo", "1", |payload: Value, _| async move {
            Ok::<_, String>(payload)
        })
        .build()
        .await
        .unwrap();
    let running = run(&client);
    hub.wait_connected("billing").await;

    let sent = hub.send("billing", "echo", json!({"doc": "a/b"})).await;
    let done = hub.final_state(&sent.id).await;
    assert_eq!(done.state, proto::DirectiveState::Completed as i32);
    assert_eq!(json(&done.result), json!({"doc": "a/b"}));
    assert_eq!(client.status().endpoint, Some(hub.url()));

    client.shutdown();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trusting_another_ca_never_connects_and_says_why() {
    let hub = TestHub::start_tls().await;
    let state = tempfile::tempdir().unwrap();
    let client = spoke("billing", &hub.url(), state.path())
        .tls_ca_cert(Pki::new().ca)
        .build()
        .await
        .unwrap();
    let running = run(&client);

    let error = eventually("a connection error", || async {
        client.status().last_error
    })
    .await;
    let url = hub.url();
    assert!(error.contains(&format!("cannot reach {url}")), "{error}");
    assert!(error.contains("invalid peer certificate"), "{error}");
    assert!(!client.status().connected);
    assert!(!hub.connected("billing").await, "the hub never saw it");

    client.shutdown();
    running.await.unwrap().unwrap();

    // A CA that is not a PEM certificate is refused when the client is built.
    let err = spoke("billing", &url, state.path())
        .tls_ca_cert("not a certificate")
        .build()
        .await
        .expect_err("a garbage CA fails the build");
    assert!(
        matches!(
            err,
            Error::Config {
                field: "tls_ca_cert",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("invalid configuration: tls_ca_cert: "),
        "{err}"
    );
}
