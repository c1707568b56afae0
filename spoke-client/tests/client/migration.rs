//! Hub-directed endpoint migration: the hub tells its spokes which
//! endpoints to use from now on (`hub serve --spoke-endpoints`, here
//! `Settings::spoke_endpoints`), they keep the hint in their state
//! directory and follow it from their next connection on, also after a
//! restart; a hint that never answers falls back to the configured
//! endpoints, and a bad one is ignored.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hub::Settings;
use hub_proto::v1 as proto;
use serde_json::{Value, json};
use spoke_client::{Backoff, Client, Context};

use crate::support::*;

/// Runs of each directive, by id.
type Runs = Arc<Mutex<HashMap<String, u32>>>;

/// A spoke configured with hub A's `endpoint` only, whose handler answers
/// its payload's `i` and counts its runs.
async fn worker(name: &str, endpoint: &str, dir: &std::path::Path, runs: &Runs) -> Client {
    let counted = runs.clone();
    spoke(name, endpoint, dir)
        .backoff(quick_backoff())
        .handler("step", "1", move |job: Value, ctx: Context| {
            *counted
                .lock()
                .unwrap()
                .entry(ctx.id().to_owned())
                .or_default() += 1;
            async move { Ok::<_, String>(json!({"i": job["i"]})) }
        })
        .build()
        .await
        .unwrap()
}

/// Reconnects quickly, so the tests wait on the hub and not on backoff.
fn quick_backoff() -> Backoff {
    Backoff::new(
        Duration::from_millis(100),
        1.6,
        0.0,
        Duration::from_millis(500),
    )
    .unwrap()
}

/// An address nothing listens on (a port the system just handed out and
/// took back), for a hub that is not there yet, or never will be.
fn free_addr() -> SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap()
}

/// Sends `count` numbered directives to each spoke; answers (id, i).
async fn send_each(hub: &TestHub, spokes: &[&str], from: u32, count: u32) -> Vec<(String, u32)> {
    let mut sent = Vec::new();
    for name in spokes {
        for i in from..from + count {
            sent.push((hub.send(name, "step", json!({"i": i})).await.id, i));
        }
    }
    sent
}

/// Every directive in `sent` COMPLETED with its own result, each run once.
async fn all_completed_once(hub: &TestHub, sent: &[(String, u32)], runs: &Runs) {
    for (id, i) in sent {
        let d = hub.final_state(id).await;
        assert_eq!(d.state, proto::DirectiveState::Completed as i32, "{d:?}");
        assert_eq!(json(&d.result), json!({"i": i}));
    }
    let runs = runs.lock().unwrap();
    for (id, _) in sent {
        assert_eq!(runs.get(id), Some(&1), "runs of {id}: {runs:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spokes_follow_the_hub_to_its_new_address_and_lose_nothing() {
    let mut hub = TestHub::start().await;
    let a_url = hub.url();
    let b_addr = free_addr();
    let b_url = format!("http://{b_addr}");
    let names = ["billing", "docs"];
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let runs = Runs::default();
    let mut clients = Vec::new();
    for (name, dir) in names.iter().zip(&dirs) {
        let client = worker(name, &a_url, dir.path(), &runs).await;
        let running = run(&client);
        clients.push((client, running));
    }
    for name in names {
        hub.wait_connected(name).await;
    }
    let mut sent = send_each(&hub, &names, 0, 10).await;

    // The operator restarts hub A with `--spoke-endpoints <B>`: each spoke
    // registers again, learns where to go, and stays on A for now.
    hub.stop().await;
    let hinted = Settings {
        spoke_endpoints: vec![b_url.clone()],
        ..Settings::default()
    };
    let a_addr = hub.addr;
    hub.start_again_on(a_addr, hinted).await;
    for name in names {
        hub.wait_connected(name).await;
    }
    sent.extend(send_each(&hub, &names, 10, 5).await);
    for (client, _) in &clients {
        let status = client.status();
        assert_eq!(status.endpoint.as_deref(), Some(a_url.as_str()));
        assert!(!status.endpoints_from_hub, "{status:?}");
    }

    // The hub moves: A stops, B starts on the same database at its new
    // address (with no hint of its own: the spokes keep what they have).
    hub.stop().await;
    hub.start_again_on(b_addr, Settings::default()).await;
    assert_eq!(hub.url(), b_url);
    for name in names {
        hub.wait_connected(name).await;
    }
    sent.extend(send_each(&hub, &names, 15, 10).await);
    all_completed_once(&hub, &sent, &runs).await;
    for (client, _) in &clients {
        let status = client.status();
        assert!(status.connected, "{status:?}");
        assert_eq!(status.endpoint.as_deref(), Some(b_url.as_str()));
        assert_eq!(status.endpoints, [b_url.as_str()]);
        assert!(status.endpoints_from_hub, "{status:?}");
    }

    // A restarted spoke, still configured with A alone, goes to B at once.
    let (client, running) = clients.remove(0);
    client.shutdown();
    running.await.unwrap().unwrap();
    let client = worker(names[0], &a_url, dirs[0].path(), &runs).await;
    let status = client.status();
    assert_eq!(status.endpoints, [b_url.as_str()]);
    assert!(status.endpoints_from_hub, "{status:?}");
    let running = run(&client);
    connected(&client).await;
    assert_eq!(client.status().endpoint.as_deref(), Some(b_url.as_str()));
    let after_restart = send_each(&hub, &names, 25, 3).await;
    all_completed_once(&hub, &after_restart, &runs).await;
    assert_eq!(runs.lock().unwrap().len(), 2 * 28);
    clients.push((client, running));
    for (client, running) in clients {
        client.shutdown();
        running.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hint_that_never_answers_falls_back_to_the_configured_endpoints() {
    let dead = format!("http://{}", free_addr());
    let mut hub = TestHub::start_with(Settings {
        spoke_endpoints: vec![dead.clone()],
        ..Settings::default()
    })
    .await;
    let a_url = hub.url();
    let state = tempfile::tempdir().unwrap();
    let runs = Runs::default();
    let counted = runs.clone();
    let client = spoke("billing", &a_url, state.path())
        .backoff(quick_backoff())
        .endpoint_fallback_after(Duration::from_secs(2))
        .handler("step", "1", move |job: Value, ctx: Context| {
            *counted
                .lock()
                .unwrap()
                .entry(ctx.id().to_owned())
                .or_default() += 1;
            async move { Ok::<_, String>(json!({"i": job["i"]})) }
        })
        .build()
        .await
        .unwrap();
    let running = run(&client);
    hub.wait_connected("billing").await;
    let mut sent = send_each(&hub, &["billing"], 0, 3).await;
    all_completed_once(&hub, &sent, &runs).await;

    // The stream ends; the next connection dials the dead hint, gives up on
    // it after the fallback time and comes back to A.
    hub.restart().await;
    eventually("the spoke to try the hint and fall back to A", || async {
        let s = client.status();
        let tried = s.last_error.as_deref().is_some_and(|e| e.contains(&dead));
        (tried && s.connected && !s.endpoints_from_hub).then_some(s)
    })
    .await;
    hub.wait_connected("billing").await;
    let status = client.status();
    assert_eq!(status.endpoint.as_deref(), Some(a_url.as_str()));
    assert_eq!(status.endpoints, [a_url.as_str()]);
    sent.extend(send_each(&hub, &["billing"], 3, 3).await);
    all_completed_once(&hub, &sent, &runs).await;
    client.shutdown();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_hint_is_ignored() {
    // Settings skip the flag's checks: a hub sending mixed schemes, which
    // would let the spoke's key travel in clear.
    let mut hub = TestHub::start_with(Settings {
        spoke_endpoints: vec![
            "https://hub-b.example:7443".into(),
            "http://hub-c.example:7443".into(),
        ],
        ..Settings::default()
    })
    .await;
    let a_url = hub.url();
    let state = tempfile::tempdir().unwrap();
    let runs = Runs::default();
    let client = worker("billing", &a_url, state.path(), &runs).await;
    let running = run(&client);
    hub.wait_connected("billing").await;
    let mut sent = send_each(&hub, &["billing"], 0, 2).await;

    // The next connection, and the next process, stay on A.
    hub.restart().await;
    hub.wait_connected("billing").await;
    sent.extend(send_each(&hub, &["billing"], 2, 2).await);
    all_completed_once(&hub, &sent, &runs).await;
    let status = client.status();
    assert_eq!(status.endpoint.as_deref(), Some(a_url.as_str()));
    assert_eq!(status.endpoints, [a_url.as_str()]);
    assert!(!status.endpoints_from_hub, "{status:?}");
    client.shutdown();
    running.await.unwrap().unwrap();

    let client = worker("billing", &a_url, state.path(), &runs).await;
    assert_eq!(client.status().endpoints, [a_url.as_str()]);
    assert!(!client.status().endpoints_from_hub);
    let running = run(&client);
    connected(&client).await;
    assert_eq!(client.status().endpoint.as_deref(), Some(a_url.as_str()));
    client.shutdown();
    running.await.unwrap().unwrap();
}
