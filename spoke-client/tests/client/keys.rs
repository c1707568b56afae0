//! A new key after `hub rotate-key`: installed with `Client::install_key`
//! or through the `new-key` file in the state directory, it brings a client
//! the hub refused back to work; a revoked spoke waits in a terminal status.

use hub_proto::v1 as proto;
use serde_json::{Value, json};
use spoke_client::keys::NEW_KEY_FILE;
use spoke_client::{Client, Error, KeyState};

use crate::support::*;

/// `hub rotate-key NAME`: the new key.
async fn rotate(hub: &TestHub, name: &str) -> String {
    let req = proto::RotateSpokeKeyRequest {
        spoke_name: name.into(),
        ..Default::default()
    };
    hub.admin()
        .await
        .rotate_spoke_key(authed(req))
        .await
        .expect("RotateSpokeKey")
        .into_inner()
        .spoke_key
}

async fn pinger(hub: &TestHub, dir: &std::path::Path) -> Client {
    spoke("billing", &hub.url(), dir)
        .handler("ping", "1", |_: Value, _| async {
            Ok::<_, String>(json!({"pong": true}))
        })
        .build()
        .await
        .unwrap()
}

/// Waits until the hub refused the client's key; answers the hub's message.
async fn refused(client: &Client) -> String {
    eventually("the key refused", || async {
        match client.status().key {
            KeyState::Refused { message } => Some(message),
            _ => None,
        }
    })
    .await
}

async fn works(hub: &TestHub) {
    let d = hub.send("billing", "ping", json!({})).await;
    let done = hub.final_state(&d.id).await;
    assert_eq!(
        done.state,
        proto::DirectiveState::Completed as i32,
        "{done:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_installed_by_the_application_resumes_work() {
    let hub = TestHub::start().await;
    let state = tempfile::tempdir().unwrap();
    let client = pinger(&hub, state.path()).await;
    let running = run(&client);
    connected(&client).await;
    assert_eq!(client.status().key, KeyState::Accepted);

    let key = rotate(&hub, "billing").await;
    assert!(refused(&client).await.contains("rotated"));
    assert!(!client.status().connected);
    assert!(!running.is_finished(), "run waits for a new key");

    client.install_key(format!("{key}\n")).await.unwrap();
    connected(&client).await;
    assert_eq!(client.status().key, KeyState::Accepted);
    works(&hub).await;
    client.shutdown();
    running.await.unwrap().unwrap();

    // The key is kept: the next start needs nothing else.
    let again = Client::builder("billing")
        .endpoint(hub.url())
        .state_dir(state.path())
        .build()
        .await
        .unwrap();
    let running = run(&again);
    connected(&again).await;
    again.shutdown();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_written_to_the_new_key_file_resumes_work() {
    let hub = TestHub::start().await;
    let state = tempfile::tempdir().unwrap();
    let client = pinger(&hub, state.path()).await;
    let running = run(&client);
    connected(&client).await;

    let key = rotate(&hub, "billing").await;
    refused(&client).await;
    let file = state.path().join(NEW_KEY_FILE);
    std::fs::write(&file, format!("{key}\n")).unwrap();
    connected(&client).await;
    assert!(!file.exists(), "the file is removed once installed");
    works(&hub).await;
    client.shutdown();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_left_while_the_spoke_was_stopped_is_installed_at_start() {
    let hub = TestHub::start().await;
    let state = tempfile::tempdir().unwrap();
    let client = pinger(&hub, state.path()).await;
    let running = run(&client);
    connected(&client).await;
    client.shutdown();
    running.await.unwrap().unwrap();

    let key = rotate(&hub, "billing").await;
    let file = state.path().join(NEW_KEY_FILE);
    std::fs::write(&file, &key).unwrap();
    let again = Client::builder("billing")
        .endpoint(hub.url())
        .state_dir(state.path())
        .handler("ping", "1", |_: Value, _| async { Ok::<_, String>(()) })
        .build()
        .await
        .unwrap();
    assert!(!file.exists());
    let running = run(&again);
    connected(&again).await;
    assert_eq!(again.status().key, KeyState::Accepted);
    works(&hub).await;
    again.shutdown();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_spoke_stays_refused_and_tries_each_key_installed_later() {
    let hub = TestHub::start().await;
    let state = tempfile::tempdir().unwrap();
    let client = pinger(&hub, state.path()).await;
    let running = run(&client);
    connected(&client).await;
    hub.revoke("billing").await.unwrap();
    assert_eq!(refused(&client).await, "spoke key revoked");

    // A key installed later is tried at once; this one is no better.
    let register_calls = hub.rpc_count("Register").await;
    client.install_key("f".repeat(64)).await.unwrap();
    let message = eventually("the new key refused too", || async {
        match client.status().key {
            KeyState::Refused { message } if message != "spoke key revoked" => Some(message),
            _ => None,
        }
    })
    .await;
    assert!(message.contains("unknown"), "{message}");
    assert_eq!(hub.rpc_count("Register").await, register_calls + 1);
    assert!(!running.is_finished(), "run waits for a new key");
    client.shutdown();
    let err = running.await.unwrap().expect_err("stopped without a key");
    assert!(matches!(err, Error::Unauthenticated { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_string_that_cannot_be_a_key_is_refused_and_changes_nothing() {
    let hub = TestHub::start().await;
    let state = tempfile::tempdir().unwrap();
    let client = pinger(&hub, state.path()).await;
    for bad in [
        "",
        "short",
        &format!("{} {}", "a".repeat(20), "b".repeat(20)),
    ] {
        let err = client.install_key(bad).await.expect_err(bad);
        assert!(matches!(err, Error::Config { field: "key", .. }), "{err:?}");
    }
    // Still unregistered: the first start enrolls as usual.
    let running = run(&client);
    connected(&client).await;
    client.shutdown();
    running.await.unwrap().unwrap();
}
