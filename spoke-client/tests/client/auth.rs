//! Keys and failover: the key is kept and reused, a key the hub refuses
//! stops the client in a clear terminal status instead of retrying forever
//! (it waits for a new key, see `keys.rs`), and an unreachable endpoint is
//! skipped.

use std::time::Duration;

use serde_json::Value;
use spoke_client::{Client, Error, KeyState};
use tonic::Code;

use crate::support::*;

async fn register_once(hub: &TestHub, name: &str, dir: &std::path::Path) {
    let client = spoke(name, &hub.url(), dir)
        .handler("ping", "1", |_: Value, _| async { Ok::<_, String>(()) })
        .build()
        .await
        .unwrap();
    let running = run(&client);
    connected(&client).await;
    client.shutdown();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stored_key_is_reused_and_a_key_the_hub_refuses_stops_the_client() {
    let hub = TestHub::start().await;
    let state = tempfile::tempdir().unwrap();
    register_once(&hub, "billing", state.path()).await;

    // Restart without the enrollment token: the stored key is enough.
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

    // Another hub has never seen that key: as good as revoked. The client
    // stops trying it and waits for a new key until it is shut down.
    let other = TestHub::start().await;
    let client = spoke("billing", &other.url(), state.path())
        .build()
        .await
        .unwrap();
    let running = run(&client);
    let status = eventually("the key refused", || async {
        let s = client.status();
        matches!(s.key, KeyState::Refused { .. }).then_some(s)
    })
    .await;
    assert_eq!(
        status.key,
        KeyState::Refused {
            message: "unknown enrollment token or spoke key".into()
        }
    );
    assert!(!status.connected);
    assert!(status.last_error.unwrap().contains("credentials"));
    assert!(!running.is_finished(), "run waits for a new key");
    client.shutdown();
    let err = running
        .await
        .unwrap()
        .expect_err("run ends with the reason");
    assert!(matches!(err, Error::Unauthenticated { .. }), "{err:?}");
    assert!(err.to_string().contains("not retrying"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_observer_hears_each_registration_new_then_with_the_stored_key() {
    use std::sync::{Arc, Mutex};

    use spoke_client::Event;

    let hub = TestHub::start().await;
    let state = tempfile::tempdir().unwrap();
    let heard = Arc::new(Mutex::new(Vec::new()));
    for _start in 0..2 {
        let events = heard.clone();
        let client = spoke("audited", &hub.url(), state.path())
            .on_event(move |e: &Event| events.lock().unwrap().push(e.clone()))
            .build()
            .await
            .unwrap();
        let running = run(&client);
        connected(&client).await;
        client.shutdown();
        running.await.unwrap().unwrap();
    }
    let registrations: Vec<(String, bool)> = heard
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Event::Registered { spoke_id, new, .. } => Some((spoke_id.clone(), *new)),
            _ => None,
        })
        .collect();
    assert_eq!(registrations.len(), 2, "{registrations:?}");
    assert!(!registrations[0].0.is_empty());
    assert_eq!(registrations[1].0, registrations[0].0, "the same spoke");
    assert_eq!((registrations[0].1, registrations[1].1), (true, false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_stops_the_running_client_in_a_terminal_status() {
    let hub = TestHub::start().await;
    let state = tempfile::tempdir().unwrap();
    let client = spoke("billing", &hub.url(), state.path())
        .handler("ping", "1", |_: Value, _| async { Ok::<_, String>(()) })
        .build()
        .await
        .unwrap();
    let running = run(&client);
    hub.wait_connected("billing").await;
    assert_eq!(client.status().key, KeyState::Accepted);
    hub.revoke("billing").await.expect("RevokeSpoke");
    let status = eventually("the key refused", || async {
        let s = client.status();
        matches!(s.key, KeyState::Refused { .. }).then_some(s)
    })
    .await;
    assert_eq!(
        status.key,
        KeyState::Refused {
            message: "spoke key revoked".into()
        }
    );
    assert!(!status.connected);
    assert!(!running.is_finished(), "run waits for a new key");
    client.shutdown();
    let err = running.await.unwrap().expect_err("stopped without a key");
    assert!(matches!(err, Error::Unauthenticated { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_name_without_its_key_is_fatal() {
    let hub = TestHub::start().await;
    let first = tempfile::tempdir().unwrap();
    register_once(&hub, "billing", first.path()).await;
    let second = tempfile::tempdir().unwrap();
    let client = spoke("billing", &hub.url(), second.path())
        .build()
        .await
        .unwrap();
    let err = run(&client).await.unwrap().expect_err("the name is taken");
    assert!(
        matches!(
            err,
            Error::Refused {
                code: Code::AlreadyExists,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_first_start_needs_an_enrollment_token() {
    let state = tempfile::tempdir().unwrap();
    let err = Client::builder("billing")
        .endpoint("http://127.0.0.1:1")
        .state_dir(state.path())
        .build()
        .await
        .expect_err("no key and no token");
    assert!(
        matches!(
            err,
            Error::Config {
                field: "enrollment_token",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_fails_over_to_the_next() {
    let hub = TestHub::start().await;
    // A port nobody listens on.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let state = tempfile::tempdir().unwrap();
    let client = Client::builder("billing")
        .endpoint(&dead_url)
        .endpoint(hub.url())
        .enrollment_token(ENROLLMENT_TOKEN)
        .state_dir(state.path())
        .connect_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let running = run(&client);
    connected(&client).await;
    assert_eq!(client.status().endpoint, Some(hub.url()));
    client.shutdown();
    running.await.unwrap().unwrap();
}
