//! The event log: what each state change records, WatchEvents replay then
//! live with no gap, filters, and retention.

use std::collections::HashMap;
use std::time::Duration;

use hub::Settings;
use hub_proto::v1 as proto;
use hub_proto::v1::EventType as E;
use serde_json::json;

use crate::metrics::{point, push};
use crate::support::*;

async fn watch(
    hub: &TestHub,
    req: proto::WatchEventsRequest,
) -> tonic::Streaming<proto::WatchEventsResponse> {
    hub.admin()
        .await
        .watch_events(authed(req, ADMIN_TOKEN))
        .await
        .expect("watch events")
        .into_inner()
}

async fn next_event(stream: &mut tonic::Streaming<proto::WatchEventsResponse>) -> proto::Event {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event within 10 s")
        .expect("stream ok")
        .expect("stream open")
        .event
        .unwrap()
}

/// Reads events until `stop` matches one; returns them all.
async fn events_until(
    stream: &mut tonic::Streaming<proto::WatchEventsResponse>,
    stop: impl Fn(&proto::Event) -> bool,
) -> Vec<proto::Event> {
    let mut out = Vec::new();
    loop {
        let e = next_event(stream).await;
        let done = stop(&e);
        out.push(e);
        if done {
            return out;
        }
    }
}

fn kind(e: &proto::Event) -> E {
    E::try_from(e.r#type).unwrap()
}

#[tokio::test]
async fn replay_then_live_has_no_gap_and_no_duplicate() {
    let hub = TestHub::start().await;
    hub.register("busy", &["t"], &[]).await;
    for i in 0..40 {
        hub.send("busy", "t", json!({"i": i})).await;
    }
    let admin = hub.admin().await;
    let racing = tokio::spawn(async move {
        let mut admin = admin;
        for i in 0..40 {
            let req = authed(create_for("busy", "t", json!({"live": i})), ADMIN_TOKEN);
            admin.create_directive(req).await.unwrap();
        }
    });
    let mut stream = watch(&hub, proto::WatchEventsRequest::default()).await;
    racing.await.unwrap();
    let sentinel = hub.send("busy", "t", json!({"sentinel": true})).await;
    let events = events_until(&mut stream, |e| e.directive_id == sentinel.id).await;
    let seqs: Vec<u64> = events.iter().map(|e| e.sequence).collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(
        seqs, expected,
        "every sequence once, in order, from the first"
    );
    assert_eq!(kind(&events[0]), E::SpokeRegistered);
    let created = events
        .iter()
        .filter(|e| kind(e) == E::DirectiveCreated)
        .count();
    assert_eq!(created, 81);
}

#[tokio::test]
async fn every_state_change_is_an_event() {
    let (hub, clock) = TestHub::start_manual(Settings::default()).await;
    let mut spoke = hub.register("worker", &["t"], &[]).await;
    let mut stream = watch(&hub, proto::WatchEventsRequest::default()).await;

    let done = hub.send("worker", "t", json!({})).await;
    let failed = hub.send("worker", "t", json!({})).await;
    let rejected = hub.send("worker", "t", json!({})).await;
    let cancelled = hub.send("worker", "t", json!({})).await;
    let mut expiring = create_for("worker", "t", json!({}));
    expiring.expires_at = Some(pbjson_types::Timestamp {
        seconds: clock.now_ms() / 1000 + 5,
        nanos: 0,
    });
    let expiring = hub.create(expiring).await.directives.remove(0);
    {
        let mut directives = spoke.watch().await;
        for _ in 0..5 {
            next_directive(&mut directives).await;
        }
    }
    let progress = spoke.req(proto::AckRequest {
        directive_id: done.id.clone(),
        outcome: proto::AckOutcome::InProgress.into(),
        progress: Some(30),
        ..Default::default()
    });
    spoke.client.ack(progress).await.unwrap();
    spoke
        .ack(&done.id, proto::AckOutcome::Completed, json!({}))
        .await
        .unwrap();
    spoke
        .ack(&failed.id, proto::AckOutcome::Failed, json!({}))
        .await
        .unwrap();
    spoke
        .ack(&rejected.id, proto::AckOutcome::Rejected, json!({}))
        .await
        .unwrap();
    let cancel = authed(
        proto::CancelDirectiveRequest {
            directive_id: cancelled.id.clone(),
            reason: "no longer needed".into(),
        },
        ADMIN_TOKEN,
    );
    hub.admin().await.cancel_directive(cancel).await.unwrap();
    let mut now_point = point("statistics", "orders", 1.0);
    now_point.time = Some(pbjson_types::Timestamp {
        seconds: clock.now_ms() / 1000,
        nanos: 0,
    });
    push(
        &mut spoke,
        vec![proto::PushMetricsRequest {
            batch_id: "b1".into(),
            points: vec![now_point],
        }],
    )
    .await
    .unwrap();
    clock.advance(Duration::from_secs(6));
    wait_state(&hub, &expiring.id, proto::DirectiveState::Expired).await;
    // Silent for long enough: STALE, then OFFLINE; a heartbeat brings it back.
    let health_change = |from: &'static str, to: &'static str| {
        move |e: &proto::Event| {
            kind(e) == E::SpokeHealthChanged
                && e.details.as_ref().map(struct_json) == Some(json!({"from": from, "to": to}))
        }
    };
    clock.advance(Settings::default().heartbeat_interval * 4);
    let mut offline = events_until(&mut stream, health_change("ONLINE", "STALE")).await;
    clock.advance(Settings::default().heartbeat_interval * 7);
    offline.extend(events_until(&mut stream, health_change("STALE", "OFFLINE")).await);
    let heartbeat = spoke.req(proto::HeartbeatRequest {
        status: proto::SpokeStatus::Ok.into(),
        ..Default::default()
    });
    spoke.client.heartbeat(heartbeat).await.unwrap();
    let back = next_event(&mut stream).await;
    assert_eq!(kind(&back), E::SpokeHealthChanged);
    assert_eq!(
        struct_json(back.details.as_ref().unwrap()),
        json!({"from": "OFFLINE", "to": "ONLINE"})
    );

    let mut by_directive: HashMap<String, Vec<E>> = HashMap::new();
    for e in &offline {
        by_directive
            .entry(e.directive_id.clone())
            .or_default()
            .push(kind(e));
    }
    use E::*;
    assert_eq!(
        by_directive[&done.id],
        [
            DirectiveCreated,
            DirectiveDelivered,
            DirectiveProgress,
            DirectiveCompleted
        ]
    );
    assert_eq!(
        by_directive[&failed.id],
        [DirectiveCreated, DirectiveDelivered, DirectiveFailed]
    );
    assert_eq!(
        by_directive[&rejected.id],
        [DirectiveCreated, DirectiveDelivered, DirectiveRejected]
    );
    assert_eq!(
        by_directive[&cancelled.id],
        [DirectiveCreated, DirectiveDelivered, DirectiveCancelled]
    );
    assert_eq!(
        by_directive[&expiring.id],
        [DirectiveCreated, DirectiveDelivered, DirectiveExpired]
    );
    let spoke_events: Vec<E> = by_directive[""].clone();
    assert_eq!(
        spoke_events,
        [
            SpokeRegistered,
            MetricsReceived,
            SpokeHealthChanged,
            SpokeHealthChanged
        ]
    );
    let metrics = offline.iter().find(|e| kind(e) == MetricsReceived).unwrap();
    assert_eq!(
        struct_json(metrics.details.as_ref().unwrap()),
        json!({"batch_id": "b1", "accepted": 1, "rejected": 0})
    );
    assert!(offline.iter().all(|e| e.spoke_id == spoke.id));
}

#[tokio::test]
async fn watch_events_filters_by_type_and_spoke_and_resumes_after_a_sequence() {
    let hub = TestHub::start().await;
    let mut a = hub.register("a", &["t"], &[]).await;
    hub.register("b", &["t"], &[]).await;
    let da = hub.send("a", "t", json!({})).await;
    hub.send("b", "t", json!({})).await;
    {
        let mut stream = a.watch().await;
        next_directive(&mut stream).await;
    }
    a.ack(&da.id, proto::AckOutcome::Completed, json!({}))
        .await
        .unwrap();
    let only = proto::WatchEventsRequest {
        after_sequence: 0,
        types: vec![E::DirectiveCreated as i32, E::DirectiveCompleted as i32],
        spoke_id: a.id.clone(),
        ..Default::default()
    };
    let mut stream = watch(&hub, only).await;
    let created = next_event(&mut stream).await;
    let completed = next_event(&mut stream).await;
    assert_eq!(
        (kind(&created), created.directive_id.as_str()),
        (E::DirectiveCreated, da.id.as_str())
    );
    assert_eq!(kind(&completed), E::DirectiveCompleted);

    // Resuming after the created event skips it and everything before.
    let resume = proto::WatchEventsRequest {
        after_sequence: created.sequence,
        types: vec![E::DirectiveCreated as i32, E::DirectiveCompleted as i32],
        spoke_id: a.id.clone(),
        ..Default::default()
    };
    let mut resumed = watch(&hub, resume).await;
    assert_eq!(next_event(&mut resumed).await.sequence, completed.sequence);

    let bad = proto::WatchEventsRequest {
        types: vec![0],
        ..Default::default()
    };
    let err = hub
        .admin()
        .await
        .watch_events(authed(bad, ADMIN_TOKEN))
        .await;
    assert_code(err, tonic::Code::InvalidArgument, "types");
}

#[tokio::test]
async fn retention_deletes_old_events_and_points() {
    let settings = Settings {
        event_retention: Duration::from_secs(3600),
        metric_retention: Duration::from_secs(2 * 3600),
        ..Settings::default()
    };
    let (hub, clock) = TestHub::start_manual(settings).await;
    let mut spoke = hub.register("old", &[], &[]).await;
    let mut old_point = point("statistics", "orders", 1.0);
    old_point.time = Some(pbjson_types::Timestamp {
        seconds: clock.now_ms() / 1000,
        nanos: 0,
    });
    push(
        &mut spoke,
        vec![proto::PushMetricsRequest {
            batch_id: "old".into(),
            points: vec![old_point],
        }],
    )
    .await
    .unwrap();
    clock.advance(Duration::from_secs(3 * 3600));
    // A fresh event after the purge point.
    let fresh = hub.register("new", &[], &[]).await;
    eventually("the metric point to be purged", || async {
        hub.points(proto::QueryMetricsRequest::default())
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    let mut stream = watch(&hub, proto::WatchEventsRequest::default()).await;
    let kept = events_until(&mut stream, |e| {
        kind(e) == E::SpokeRegistered && e.spoke_id == fresh.id
    })
    .await;
    let cutoff = clock.now_ms() / 1000 - 3600;
    assert!(
        kept.iter()
            .all(|e| e.time.as_ref().unwrap().seconds >= cutoff),
        "only events younger than the retention remain: {kept:?}"
    );
    assert!(
        !kept.iter().any(|e| kind(e) == E::MetricsReceived
            || (kind(e) == E::SpokeRegistered && e.spoke_id == spoke.id)),
        "the old spoke's registration and metrics events are gone: {kept:?}"
    );
}
