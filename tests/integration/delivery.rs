//! WatchDirectives: backlog then live, ordering, one stream per spoke,
//! keepalives, surviving a restart; and PollDirectives.

use std::collections::HashSet;
use std::time::Duration;

use hub::Settings;
use hub_proto::v1 as proto;
use hub_proto::v1::watch_directives_response::Message;
use serde_json::json;
use tonic::Code;

use crate::support::*;

#[tokio::test]
async fn backlog_comes_first_in_priority_order_then_live_directives() {
    let hub = TestHub::start().await;
    let mut spoke = hub.register("billing", &["sync_doc"], &[]).await;

    let mut low = create_for("billing", "sync_doc", json!({"n": "low"}));
    low.priority = -1;
    let low = hub.create(low).await.directives.remove(0);
    let normal = hub
        .send("billing", "sync_doc", json!({"n": "normal"}))
        .await;
    let mut high = create_for("billing", "sync_doc", json!({"n": "high"}));
    high.priority = 10;
    let high = hub.create(high).await.directives.remove(0);

    let mut stream = spoke.watch().await;
    let got: Vec<_> = [
        next_directive(&mut stream).await,
        next_directive(&mut stream).await,
        next_directive(&mut stream).await,
    ]
    .into_iter()
    .map(|d| (d.id, d.attempt))
    .collect();
    assert_eq!(got, vec![(high.id, 1), (normal.id, 1), (low.id, 1)]);

    let live = hub.send("billing", "sync_doc", json!({"doc": "x"})).await;
    let d = next_directive(&mut stream).await;
    assert_eq!(d.id, live.id);
    assert_eq!(d.r#type, "sync_doc");
    assert_eq!(
        struct_json(d.payload.as_ref().unwrap()),
        json!({"doc": "x"})
    );
    assert_eq!(d.state, proto::DirectiveState::Delivered as i32);
    assert_eq!(
        hub.directive(&live.id).await.state,
        proto::DirectiveState::Delivered as i32
    );
}

#[tokio::test]
async fn creates_racing_the_backlog_arrive_exactly_once() {
    let hub = TestHub::start().await;
    let mut spoke = hub.register("racer", &["t"], &[]).await;
    let mut expected = HashSet::new();
    for i in 0..60 {
        expected.insert(hub.send("racer", "t", json!({"i": i})).await.id);
    }
    // More directives are created while the stream sends its backlog.
    let admin = hub.admin().await;
    let racing = tokio::spawn(async move {
        let mut admin = admin;
        let mut ids = Vec::new();
        for i in 0..60 {
            let req = authed(create_for("racer", "t", json!({"live": i})), ADMIN_TOKEN);
            ids.push(
                admin
                    .create_directive(req)
                    .await
                    .unwrap()
                    .into_inner()
                    .directives[0]
                    .id
                    .clone(),
            );
        }
        ids
    });
    let mut stream = spoke.watch().await;
    let mut seen = Vec::new();
    while seen.len() < 120 {
        let id = next_directive(&mut stream).await.id;
        // Acking frees the slot in the in-flight window for the next one.
        spoke
            .ack(&id, proto::AckOutcome::Completed, json!({}))
            .await
            .unwrap();
        seen.push(id);
    }
    expected.extend(racing.await.unwrap());
    // A sentinel created last marks the end: nothing may arrive before it
    // that was not expected, and nothing twice.
    let sentinel = hub.send("racer", "t", json!({"sentinel": true})).await;
    assert_eq!(next_directive(&mut stream).await.id, sentinel.id);
    let unique: HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no directive twice");
    assert_eq!(unique, expected, "every directive once");
}

#[tokio::test]
async fn a_new_stream_ends_the_old_one() {
    let hub = TestHub::start().await;
    let mut spoke = hub.register("single", &["t"], &[]).await;
    let mut first = spoke.watch().await;
    let mut second = spoke.watch().await;
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match first.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the old stream ends");
    assert_code(end, Code::Aborted, "superseded");
    // The new stream gets new work.
    let d = hub.send("single", "t", json!({})).await;
    assert_eq!(next_directive(&mut second).await.id, d.id);
}

#[tokio::test]
async fn keepalives_carry_the_hub_time() {
    let settings = Settings {
        keepalive_interval: Duration::from_millis(50),
        ..Settings::default()
    };
    let hub = TestHub::start_with(settings).await;
    let mut spoke = hub.register("quiet", &[], &[]).await;
    let mut stream = spoke.watch().await;
    let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a message")
        .unwrap()
        .unwrap();
    match msg.message {
        Some(Message::Keepalive(k)) => assert!(k.hub_time.unwrap().seconds > 1_700_000_000),
        other => panic!("expected a keepalive, got {other:?}"),
    }
}

#[tokio::test]
async fn outstanding_directives_survive_a_restart_and_are_delivered_again() {
    let mut hub = TestHub::start().await;
    let mut spoke = hub.register("durable", &["t"], &[]).await;
    let delivered = hub.send("durable", "t", json!({"k": 1})).await;
    let acked = hub.send("durable", "t", json!({"k": 2})).await;
    {
        let mut stream = spoke.watch().await;
        assert_eq!(next_directive(&mut stream).await.id, delivered.id);
        assert_eq!(next_directive(&mut stream).await.id, acked.id);
        spoke
            .ack(&acked.id, proto::AckOutcome::Completed, json!({"ok": true}))
            .await
            .unwrap();
    }
    let pending = hub.send("durable", "t", json!({"k": 3})).await;

    hub.restart().await;
    spoke.client = hub.spoke_client().await;
    let mut stream = spoke.watch().await;
    let a = next_directive(&mut stream).await;
    let b = next_directive(&mut stream).await;
    assert_eq!(
        (a.id.as_str(), a.attempt),
        (delivered.id.as_str(), 2),
        "redelivered with the next attempt"
    );
    assert_eq!(struct_json(a.payload.as_ref().unwrap()), json!({"k": 1}));
    assert_eq!((b.id.as_str(), b.attempt), (pending.id.as_str(), 1));
    let done = hub.directive(&acked.id).await;
    assert_eq!(
        done.state,
        proto::DirectiveState::Completed as i32,
        "the acked one stays done"
    );
    assert_eq!(
        struct_json(done.result.as_ref().unwrap()),
        json!({"ok": true})
    );
}

#[tokio::test]
async fn shutdown_ends_streams_with_unavailable() {
    let mut hub = TestHub::start().await;
    let mut spoke = hub.register("leaving", &[], &[]).await;
    let mut stream = spoke.watch().await;
    let reader = tokio::spawn(async move {
        let mut hints = None;
        loop {
            match stream.message().await {
                Ok(Some(proto::WatchDirectivesResponse {
                    message: Some(Message::Hints(h)),
                })) => hints = Some(h),
                Ok(Some(_)) => {}
                Ok(None) => return (hints, None),
                Err(status) => return (hints, Some(status.code())),
            }
        }
    });
    hub.stop().await;
    let (hints, code) = reader.await.unwrap();
    assert_eq!(code, Some(Code::Unavailable));
    assert!(
        hints.and_then(|h| h.retry_after).is_some(),
        "told when to come back"
    );
}

#[tokio::test]
async fn poll_returns_pending_directives_and_marks_them_delivered() {
    let hub = TestHub::start().await;
    let mut spoke = hub.register("cron", &["t"], &[]).await;
    let empty = spoke
        .client
        .poll_directives(spoke.req(proto::PollDirectivesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(empty.directives.is_empty());
    let first = hub.send("cron", "t", json!({"i": 1})).await;
    let second = hub.send("cron", "t", json!({"i": 2})).await;
    let req = spoke.req(proto::PollDirectivesRequest {
        max_directives: 10,
        wait: None,
    });
    let got = spoke
        .client
        .poll_directives(req)
        .await
        .unwrap()
        .into_inner()
        .directives;
    let ids: Vec<_> = got.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, [first.id.as_str(), second.id.as_str()]);
    assert!(got.iter().all(|d| d.attempt == 1));
    assert_eq!(
        hub.directive(&first.id).await.state,
        proto::DirectiveState::Delivered as i32
    );
    let again = spoke
        .client
        .poll_directives(spoke.req(proto::PollDirectivesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(
        again.directives.is_empty(),
        "delivered directives are not polled twice"
    );
}
