//! Register, heartbeats and spoke listings.

use hub::Settings;
use hub_proto::v1 as proto;
use tonic::Code;

use crate::support::*;

#[tokio::test]
async fn register_issues_a_key_once_and_re_register_needs_it() {
    let hub = TestHub::start().await;
    let spoke = hub
        .register("billing", &["sync_doc"], &[("region", "eu")])
        .await;
    assert_eq!(spoke.name, "billing");

    let mut client = hub.spoke_client().await;
    let again = proto::RegisterRequest {
        name: "billing".into(),
        ..Default::default()
    };
    // The enrollment token cannot take over an existing name.
    assert_code(
        client
            .register(authed(again.clone(), ENROLLMENT_TOKEN))
            .await,
        Code::AlreadyExists,
        "billing",
    );

    // With its own key the spoke updates itself and gets no new key.
    let update = proto::RegisterRequest {
        name: "billing".into(),
        labels: [("region".to_string(), "us".to_string())].into(),
        capabilities: vec![proto::Capability {
            directive_type: "ai_task".into(),
            version: "2".into(),
        }],
        version: "1.1.0".into(),
        max_in_flight: 4,
        ..Default::default()
    };
    let res = client
        .register(authed(update, &spoke.key))
        .await
        .unwrap()
        .into_inner();
    assert!(res.spoke_key.is_empty(), "no key on re-register");
    assert_eq!(res.hints.unwrap().max_in_flight, 4);
    let stored = hub.spoke("billing").await;
    assert_eq!(stored.id, spoke.id);
    assert_eq!(stored.labels["region"], "us");
    assert_eq!(stored.version, "1.1.0");
    assert_eq!(stored.capabilities[0].directive_type, "ai_task");

    // Another spoke's key cannot re-register this name.
    let other = hub.register("payroll", &[], &[]).await;
    assert_code(
        client.register(authed(again.clone(), &other.key)).await,
        Code::Unauthenticated,
        "another spoke",
    );
    assert_code(
        client.register(authed(again, "not-a-token-at-all")).await,
        Code::Unauthenticated,
        "unknown",
    );
}

#[tokio::test]
async fn heartbeats_store_status_and_make_the_spoke_online() {
    let clock = hub::Clock::manual(1_800_000_000_000);
    let settings = Settings {
        heartbeat_interval: std::time::Duration::from_secs(7),
        clock: clock.clone(),
        ..Settings::default()
    };
    let mut hub = TestHub::start_with(settings).await;
    let mut spoke = hub.register("worker", &[], &[]).await;
    let fresh = hub.spoke("worker").await;
    assert_eq!(
        fresh.health,
        proto::SpokeHealth::Online as i32,
        "it just registered"
    );
    assert!(fresh.last_heartbeat_at.is_none());
    clock.advance(std::time::Duration::from_secs(7 * 11));
    let before = hub.spoke("worker").await;
    assert_eq!(
        before.health,
        proto::SpokeHealth::Offline as i32,
        "silent for 11 intervals"
    );

    let req = spoke.req(proto::HeartbeatRequest {
        status: proto::SpokeStatus::Degraded.into(),
        status_message: "disk 91% full".into(),
        in_flight_directives: 3,
        buffered_metric_points: 120,
        failed_metric_pushes: 2,
        version: "1.0.1".into(),
    });
    let res = spoke.client.heartbeat(req).await.unwrap().into_inner();
    assert_eq!(
        res.next_interval.unwrap().seconds,
        7,
        "the hub sets the interval"
    );
    assert!(res.hub_time.is_some());

    let after = hub.spoke("worker").await;
    assert_eq!(after.health, proto::SpokeHealth::Online as i32);
    assert_eq!(after.status, proto::SpokeStatus::Degraded as i32);
    assert_eq!(after.status_message, "disk 91% full");
    assert_eq!(after.reported_in_flight, 3);
    assert_eq!(after.reported_buffered_points, 120);
    assert_eq!(after.reported_failed_pushes, 2);
    assert_eq!(after.version, "1.0.1");
    assert!(after.last_heartbeat_at.is_some());

    // A heartbeat is answered from memory and written with a later commit;
    // a hub that stops writes what it has, so a restart keeps it.
    hub.restart().await;
    let restarted = hub.spoke("worker").await;
    assert_eq!(restarted.health, proto::SpokeHealth::Online as i32);
    assert_eq!(restarted.status, proto::SpokeStatus::Degraded as i32);
    assert_eq!(restarted.status_message, "disk 91% full");
    assert_eq!(restarted.reported_in_flight, 3);
    assert_eq!(restarted.version, "1.0.1");
    assert_eq!(restarted.last_heartbeat_at, after.last_heartbeat_at);
}

#[tokio::test]
async fn list_spokes_shows_health_outstanding_and_filters() {
    let clock = hub::Clock::manual(1_800_000_000_000);
    let hub = TestHub::start_with(Settings {
        clock: clock.clone(),
        ..Settings::default()
    })
    .await;
    let mut eu = hub
        .register("eu-1", &["sync_doc"], &[("region", "eu")])
        .await;
    hub.register("us-1", &["sync_doc"], &[("region", "us")])
        .await;
    hub.send("eu-1", "sync_doc", serde_json::json!({})).await;
    hub.send("eu-1", "sync_doc", serde_json::json!({})).await;
    // Four heartbeat intervals later only eu-1 has been heard from.
    clock.advance(Settings::default().heartbeat_interval * 4);
    let hb = eu.req(proto::HeartbeatRequest {
        status: proto::SpokeStatus::Ok.into(),
        ..Default::default()
    });
    eu.client.heartbeat(hb).await.unwrap();

    let mut admin = hub.admin().await;
    let all = admin
        .list_spokes(authed(proto::ListSpokesRequest::default(), ADMIN_TOKEN))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = all.spokes.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["eu-1", "us-1"]);
    assert_eq!(all.spokes[0].outstanding_directives, 2);
    assert_eq!(all.spokes[1].outstanding_directives, 0);

    let online = proto::ListSpokesRequest {
        health: proto::SpokeHealth::Online.into(),
        ..Default::default()
    };
    let online = admin
        .list_spokes(authed(online, ADMIN_TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(online.spokes.len(), 1);
    assert_eq!(online.spokes[0].name, "eu-1");

    let us = proto::ListSpokesRequest {
        selector: Some(proto::LabelSelector {
            match_labels: [("region".to_string(), "us".to_string())].into(),
        }),
        ..Default::default()
    };
    let us = admin
        .list_spokes(authed(us, ADMIN_TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(us.spokes.len(), 1);
    assert_eq!(us.spokes[0].name, "us-1");

    // Pages of one.
    let first = proto::ListSpokesRequest {
        page_size: 1,
        ..Default::default()
    };
    let first = admin
        .list_spokes(authed(first, ADMIN_TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.spokes[0].name, "eu-1");
    let second = proto::ListSpokesRequest {
        page_size: 1,
        page_token: first.next_page_token,
        ..Default::default()
    };
    let second = admin
        .list_spokes(authed(second, ADMIN_TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.spokes[0].name, "us-1");
}
