//! The status the application reports: `set_status` reaches the hub with
//! the next heartbeat, sent at once, and operators read it in GetSpoke.

use hub_proto::v1 as proto;
use spoke_client::SpokeStatus;

use crate::support::*;

/// The status and message GetSpoke shows for `name`.
async fn reported(hub: &TestHub, name: &str) -> (i32, String) {
    let req = proto::GetSpokeRequest {
        spoke_name: name.into(),
        ..Default::default()
    };
    let spoke = hub
        .admin()
        .await
        .get_spoke(authed(req))
        .await
        .expect("GetSpoke")
        .into_inner()
        .spoke
        .expect("a spoke");
    (spoke.status, spoke.status_message)
}

/// Waits until GetSpoke shows `status` and `message` for `name`.
async fn shows(hub: &TestHub, name: &str, status: proto::SpokeStatus, message: &str) {
    let want = (status as i32, message.to_owned());
    eventually(&format!("{name} reported as {want:?}"), || async {
        (reported(hub, name).await == want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_the_application_sets_reaches_the_hub_with_its_message() {
    // Heartbeats every hour: only the one sent at once can carry a change.
    let hub = TestHub::start_with(hub::Settings {
        heartbeat_interval: std::time::Duration::from_secs(3600),
        ..hub::Settings::default()
    })
    .await;
    let state = tempfile::tempdir().unwrap();
    let client = spoke("ledger", &hub.url(), state.path())
        .build()
        .await
        .unwrap();
    let running = run(&client);
    hub.wait_connected("ledger").await;
    shows(&hub, "ledger", proto::SpokeStatus::Ok, "").await;

    client.set_status(SpokeStatus::Degraded, "disk 91% full");
    shows(
        &hub,
        "ledger",
        proto::SpokeStatus::Degraded,
        "disk 91% full",
    )
    .await;
    let status = client.status();
    assert_eq!(
        (status.spoke_status, status.status_message.as_str()),
        (SpokeStatus::Degraded, "disk 91% full")
    );

    // A message longer than the hub takes is cut to its limit, not refused.
    let long = "x".repeat(2000);
    client.set_status(SpokeStatus::Error, long.clone());
    shows(&hub, "ledger", proto::SpokeStatus::Error, &long[..1024]).await;

    client.set_status(SpokeStatus::Ok, "");
    shows(&hub, "ledger", proto::SpokeStatus::Ok, "").await;
    client.shutdown();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_set_before_connecting_is_in_the_first_heartbeat() {
    let hub = TestHub::start().await;
    let state = tempfile::tempdir().unwrap();
    let client = spoke("ledger", &hub.url(), state.path())
        .build()
        .await
        .unwrap();
    client.set_status(SpokeStatus::Error, "the billing database is unreachable");
    let running = run(&client);
    hub.wait_connected("ledger").await;
    shows(
        &hub,
        "ledger",
        proto::SpokeStatus::Error,
        "the billing database is unreachable",
    )
    .await;
    client.shutdown();
    running.await.unwrap().unwrap();
}
