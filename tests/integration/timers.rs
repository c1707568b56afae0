//! Time-driven lifecycle on a manual clock: redelivery, exhaustion, expiry,
//! IN_PROGRESS extensions, and health; plus cancel, the in-flight window,
//! coalescing, long polls, revoke and rotate.

use std::time::Duration;

use hub::Settings;
use hub_proto::v1 as proto;
use hub_proto::v1::watch_directives_response::Message;
use serde_json::json;
use tonic::Code;

use crate::support::*;

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_missed_ack_deadline_redelivers_then_exhausts_to_failed() {
    let (hub, clock) = TestHub::start_manual(Settings::default()).await;
    let mut spoke = hub.register("slow", &["t"], &[]).await;
    let mut req = create_for("slow", "t", json!({"n": 1}));
    req.max_attempts = 2;
    let d = hub.create(req).await.directives.remove(0);
    let mut stream = spoke.watch().await;
    let first = next_directive(&mut stream).await;
    assert_eq!((first.id.as_str(), first.attempt), (d.id.as_str(), 1));

    clock.advance(DEADLINE + Duration::from_secs(1));
    let again = next_directive(&mut stream).await;
    assert_eq!(
        (again.id.as_str(), again.attempt),
        (d.id.as_str(), 2),
        "redelivered on the live stream"
    );

    clock.advance(DEADLINE + Duration::from_secs(1));
    let failed = wait_state(&hub, &d.id, proto::DirectiveState::Failed).await;
    assert_eq!(failed.error, "delivery attempts exhausted");
    assert_eq!(failed.attempt, 2);
    assert_code(
        spoke
            .ack(&d.id, proto::AckOutcome::Completed, json!({}))
            .await,
        Code::FailedPrecondition,
        "FAILED",
    );
}

#[tokio::test]
async fn deadlines_survive_a_hub_restart() {
    let (mut hub, clock) = TestHub::start_manual(Settings::default()).await;
    let mut spoke = hub.register("cron", &["t"], &[]).await;
    let d = hub.send("cron", "t", json!({})).await;
    let poll = |s: &mut Spoke| {
        let req = s.req(proto::PollDirectivesRequest {
            max_directives: 10,
            wait: None,
        });
        let mut client = s.client.clone();
        async move {
            client
                .poll_directives(req)
                .await
                .unwrap()
                .into_inner()
                .directives
        }
    };
    assert_eq!(poll(&mut spoke).await[0].attempt, 1);

    hub.restart().await;
    spoke.client = hub.spoke_client().await;
    assert!(
        poll(&mut spoke).await.is_empty(),
        "still within its deadline"
    );
    clock.advance(DEADLINE + Duration::from_secs(1));
    // The restarted hub's timer finds the due time in the store.
    wait_state(&hub, &d.id, proto::DirectiveState::Pending).await;
    let again = poll(&mut spoke).await;
    assert_eq!((again[0].id.as_str(), again[0].attempt), (d.id.as_str(), 2));
}

#[tokio::test]
async fn in_progress_acks_extend_the_deadline() {
    let (hub, clock) = TestHub::start_manual(Settings::default()).await;
    let mut spoke = hub.register("busy", &["t"], &[]).await;
    let d = hub.send("busy", "t", json!({})).await;
    let mut stream = spoke.watch().await;
    next_directive(&mut stream).await;
    clock.advance(Duration::from_secs(20));
    let progress = spoke.req(proto::AckRequest {
        directive_id: d.id.clone(),
        outcome: proto::AckOutcome::InProgress.into(),
        progress: Some(50),
        ..Default::default()
    });
    spoke.client.ack(progress).await.unwrap();
    // 40 s after delivery, 20 s after the progress ack: not due yet.
    clock.advance(Duration::from_secs(20));
    let sentinel = hub.send("busy", "t", json!({"sentinel": true})).await;
    assert_eq!(
        next_directive(&mut stream).await.id,
        sentinel.id,
        "no redelivery before the sentinel"
    );
    assert_eq!(
        hub.directive(&d.id).await.state,
        proto::DirectiveState::InProgress as i32
    );
    clock.advance(Duration::from_secs(11));
    let again = next_directive(&mut stream).await;
    assert_eq!((again.id.as_str(), again.attempt), (d.id.as_str(), 2));
}

#[tokio::test]
async fn expired_directives_are_never_delivered_and_refuse_acks() {
    let (hub, clock) = TestHub::start_manual(Settings::default()).await;
    let mut spoke = hub.register("late", &["t"], &[]).await;
    let expiry = |secs: i64| pbjson_types::Timestamp {
        seconds: hub::Clock::now_ms(&clock) / 1000 + secs,
        nanos: 0,
    };
    let mut delivered = create_for("late", "t", json!({"k": "delivered"}));
    delivered.expires_at = Some(expiry(10));
    let delivered = hub.create(delivered).await.directives.remove(0);
    let mut stream = spoke.watch().await;
    assert_eq!(next_directive(&mut stream).await.id, delivered.id);
    drop(stream);
    let mut pending = create_for("late", "t", json!({"k": "pending"}));
    pending.expires_at = Some(expiry(10));
    let pending = hub.create(pending).await.directives.remove(0);

    clock.advance(Duration::from_secs(11));
    wait_state(&hub, &pending.id, proto::DirectiveState::Expired).await;
    wait_state(&hub, &delivered.id, proto::DirectiveState::Expired).await;
    let mut stream = spoke.watch().await;
    let sentinel = hub.send("late", "t", json!({})).await;
    assert_eq!(
        next_directive(&mut stream).await.id,
        sentinel.id,
        "expired ones are not sent again"
    );
    assert_code(
        spoke
            .ack(&delivered.id, proto::AckOutcome::Completed, json!({}))
            .await,
        Code::FailedPrecondition,
        "EXPIRED",
    );
}

#[tokio::test]
async fn cancel_reaches_the_live_stream_and_refuses_later_acks() {
    let hub = TestHub::start().await;
    let mut spoke = hub.register("worker", &["t"], &[]).await;
    let d = hub.send("worker", "t", json!({})).await;
    let mut stream = spoke.watch().await;
    next_directive(&mut stream).await;
    let mut admin = hub.admin().await;
    let cancel = |reason: &str| {
        authed(
            proto::CancelDirectiveRequest {
                directive_id: d.id.clone(),
                reason: reason.into(),
            },
            ADMIN_TOKEN,
        )
    };
    let res = admin
        .cancel_directive(cancel("wrong customer"))
        .await
        .unwrap()
        .into_inner();
    let cancelled = res.directive.unwrap();
    assert_eq!(cancelled.state, proto::DirectiveState::Cancelled as i32);
    assert_eq!(cancelled.error, "wrong customer");
    match next_message(&mut stream).await.unwrap() {
        Message::Cancelled(c) => {
            assert_eq!(c.directive_id, d.id);
            assert_eq!(c.reason, "wrong customer");
        }
        other => panic!("expected a cancel message, got {other:?}"),
    }
    assert_code(
        spoke
            .ack(&d.id, proto::AckOutcome::Completed, json!({}))
            .await,
        Code::FailedPrecondition,
        "CANCELLED",
    );
    // Again: fine, nothing changes.
    let again = admin
        .cancel_directive(cancel("other"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.directive.unwrap().error, "wrong customer");

    let done = hub.send("worker", "t", json!({})).await;
    next_directive(&mut stream).await;
    spoke
        .ack(&done.id, proto::AckOutcome::Completed, json!({}))
        .await
        .unwrap();
    let req = authed(
        proto::CancelDirectiveRequest {
            directive_id: done.id.clone(),
            reason: String::new(),
        },
        ADMIN_TOKEN,
    );
    assert_code(
        admin.cancel_directive(req).await,
        Code::FailedPrecondition,
        "COMPLETED",
    );
}

#[tokio::test]
async fn the_in_flight_window_holds_back_the_rest_until_acks() {
    let hub = TestHub::start().await;
    let mut spoke = hub.register("narrow", &["t"], &[]).await;
    let req = spoke.req(proto::RegisterRequest {
        name: "narrow".into(),
        capabilities: vec![proto::Capability {
            directive_type: "t".into(),
            version: "1".into(),
        }],
        max_in_flight: 2,
        ..Default::default()
    });
    spoke.client.register(req).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(hub.send("narrow", "t", json!({"i": i})).await.id);
    }
    let mut stream = spoke.watch().await;
    let a = next_directive(&mut stream).await;
    let b = next_directive(&mut stream).await;
    assert_eq!(
        [a.id.as_str(), b.id.as_str()],
        [ids[0].as_str(), ids[1].as_str()]
    );
    let states: Vec<i32> = futures_states(&hub, &ids).await;
    assert_eq!(
        states,
        [2, 2, 1, 1, 1],
        "two DELIVERED, the rest held back PENDING"
    );
    spoke
        .ack(&a.id, proto::AckOutcome::Completed, json!({}))
        .await
        .unwrap();
    assert_eq!(
        next_directive(&mut stream).await.id,
        ids[2],
        "an ack frees one slot"
    );
    let in_progress = spoke.req(proto::AckRequest {
        directive_id: b.id.clone(),
        outcome: proto::AckOutcome::InProgress.into(),
        ..Default::default()
    });
    spoke.client.ack(in_progress).await.unwrap();
    assert_eq!(
        hub.directive(&ids[3]).await.state,
        proto::DirectiveState::Pending as i32,
        "IN_PROGRESS still holds its slot"
    );
    spoke
        .ack(&b.id, proto::AckOutcome::Failed, json!({}))
        .await
        .unwrap();
    assert_eq!(next_directive(&mut stream).await.id, ids[3]);
}

async fn futures_states(hub: &TestHub, ids: &[String]) -> Vec<i32> {
    let mut out = Vec::new();
    for id in ids {
        out.push(hub.directive(id).await.state);
    }
    out
}

#[tokio::test]
async fn a_coalesce_key_replaces_the_pending_directive() {
    let hub = TestHub::start().await;
    hub.register("cfg", &["reload"], &[]).await;
    let mut first = create_for("cfg", "reload", json!({"v": 1}));
    first.coalesce_key = "config".into();
    let first = hub.create(first).await.directives.remove(0);
    let mut second = create_for("cfg", "reload", json!({"v": 2}));
    second.coalesce_key = "config".into();
    let second = hub.create(second).await.directives.remove(0);
    let old = hub.directive(&first.id).await;
    assert_eq!(old.state, proto::DirectiveState::Cancelled as i32);
    assert!(
        old.error.contains(&second.id),
        "the reason names the new id: {}",
        old.error
    );
    assert_eq!(
        hub.directive(&second.id).await.state,
        proto::DirectiveState::Pending as i32
    );
}

#[tokio::test]
async fn idempotent_fan_out_creates_nothing_new() {
    let hub = TestHub::start().await;
    hub.register("a", &["t"], &[]).await;
    hub.register("b", &["t"], &[]).await;
    let req = proto::CreateDirectiveRequest {
        target: Some(proto::DirectiveTarget {
            target: Some(proto::directive_target::Target::AllSpokes(true)),
        }),
        r#type: "t".into(),
        idempotency_key: "rollout-7".into(),
        ..Default::default()
    };
    let first = hub.create(req.clone()).await;
    let second = hub.create(req).await;
    assert_eq!(first.directives.len(), 2);
    assert_eq!(first.directives, second.directives);
    assert_eq!(first.group_id, second.group_id);
    assert!(second.idempotent_replay);
    assert_eq!(hub.all_directives().await.len(), 2);
}

#[tokio::test]
async fn a_long_poll_returns_when_work_arrives() {
    let hub = TestHub::start().await;
    let spoke = hub.register("cron", &["t"], &[]).await;
    let req = spoke.req(proto::PollDirectivesRequest {
        max_directives: 5,
        wait: Some(pbjson_types::Duration {
            seconds: 20,
            nanos: 0,
        }),
    });
    let mut client = spoke.client.clone();
    let poll = tokio::spawn(async move { client.poll_directives(req).await });
    // Give the poll time to find nothing and start waiting. (Should the
    // create win the race, the poll returns at once and the test proves
    // less, but it cannot pass with a poll that does not wait and returns
    // empty.)
    tokio::time::sleep(Duration::from_millis(100)).await;
    let d = hub.send("cron", "t", json!({"wake": true})).await;
    let got = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .expect("the poll returns well before its 20 s wait")
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!(got.directives.len(), 1);
    assert_eq!(got.directives[0].id, d.id);
    assert_eq!(
        hub.directive(&d.id).await.state,
        proto::DirectiveState::Delivered as i32
    );
}

#[tokio::test]
async fn revoke_and_rotate_stop_a_key_at_once() {
    let hub = TestHub::start().await;
    let mut spoke = hub.register("rogue", &["t"], &[]).await;
    let d = hub.send("rogue", "t", json!({})).await;
    let mut stream = spoke.watch().await;
    next_directive(&mut stream).await;
    let mut admin = hub.admin().await;

    // Rotate: the old key stops, the live stream ends, the new key works.
    let rotate = authed(
        proto::RotateSpokeKeyRequest {
            spoke_name: "rogue".into(),
            ..Default::default()
        },
        ADMIN_TOKEN,
    );
    let new_key = admin
        .rotate_spoke_key(rotate)
        .await
        .unwrap()
        .into_inner()
        .spoke_key;
    assert!(!new_key.is_empty());
    assert_code(
        next_message(&mut stream).await,
        Code::Unauthenticated,
        "rotated",
    );
    assert_code(
        spoke
            .ack(&d.id, proto::AckOutcome::Completed, json!({}))
            .await,
        Code::Unauthenticated,
        "unknown spoke key",
    );
    spoke.key = new_key;
    let mut stream = spoke.watch().await;
    assert_eq!(next_directive(&mut stream).await.id, d.id);

    // Revoke: refused at once, stream ended, health REVOKED.
    let revoke = authed(
        proto::RevokeSpokeRequest {
            spoke_name: "rogue".into(),
            ..Default::default()
        },
        ADMIN_TOKEN,
    );
    let revoked = admin
        .revoke_spoke(revoke)
        .await
        .unwrap()
        .into_inner()
        .spoke
        .unwrap();
    assert_eq!(revoked.health, proto::SpokeHealth::Revoked as i32);
    assert_code(
        next_message(&mut stream).await,
        Code::Unauthenticated,
        "revoked",
    );
    assert_code(
        spoke
            .ack(&d.id, proto::AckOutcome::Completed, json!({}))
            .await,
        Code::Unauthenticated,
        "revoked",
    );
    assert_code(
        admin
            .create_directive(authed(create_for("rogue", "t", json!({})), ADMIN_TOKEN))
            .await,
        Code::FailedPrecondition,
        "revoked",
    );
}
