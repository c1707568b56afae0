//! Issue 11's defects of committed work lost or misreported, and DeleteSpoke:
//! each test shows what a user would have seen go wrong.

use std::time::Duration;

use hub::Settings;
use hub_proto::v1 as proto;
use serde_json::json;
use tonic::Code;

use crate::support::*;

/// Holds the hub's database locked the way another process would.
fn lock_database(hub: &TestHub) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(hub.data_dir().join("hub.db")).expect("open hub.db");
    db.execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    db
}

fn selector(key: &str, value: &str) -> Option<proto::DirectiveTarget> {
    Some(proto::DirectiveTarget {
        target: Some(proto::directive_target::Target::Selector(
            proto::LabelSelector {
                match_labels: [(key.to_owned(), value.to_owned())].into(),
            },
        )),
    })
}

async fn events(hub: &TestHub, after: u64) -> Result<Vec<proto::Event>, tonic::Status> {
    let req = proto::WatchEventsRequest {
        after_sequence: after,
        stop_after_replay: true,
        ..Default::default()
    };
    let mut stream = hub
        .admin()
        .await
        .watch_events(authed(req, ADMIN_TOKEN))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await? {
        out.extend(msg.event);
    }
    Ok(out)
}

/// Closes a stream and waits until the hub has seen it go (so nothing is
/// redelivered on it).
async fn gone(hub: &TestHub, name: &str, stream: tonic::Streaming<proto::WatchDirectivesResponse>) {
    drop(stream);
    eventually("the stream to be gone", || async {
        (!hub.spoke(name).await.connected).then_some(())
    })
    .await;
}

fn of_type(events: &[proto::Event], kind: proto::EventType) -> Vec<&proto::Event> {
    events.iter().filter(|e| e.r#type == kind as i32).collect()
}

#[tokio::test]
async fn a_create_whose_caller_gives_up_is_delivered_once_its_commit_lands() {
    if hub::testing::skip_on_postgres("holds SQLite's write lock from another connection") {
        return;
    }
    let hub = TestHub::start().await;
    let mut spoke = hub.register("idle", &["t"], &[]).await;
    let mut stream = spoke.watch().await;

    let db = lock_database(&hub);
    let mut req = authed(create_for("idle", "t", json!({"n": 7})), ADMIN_TOKEN);
    req.set_timeout(Duration::from_millis(300));
    let gave_up = hub.admin().await.create_directive(req).await;
    assert!(gave_up.is_err(), "the caller gave up: {gave_up:?}");
    db.execute_batch("COMMIT").expect("let the lock go");

    let d = next_directive(&mut stream).await;
    assert_eq!(struct_json(d.payload.as_ref().unwrap()), json!({"n": 7}));
}

#[tokio::test]
async fn a_large_fan_out_is_confirmed_without_payloads_and_stores_its_payload_once() {
    let hub = TestHub::start().await;
    for n in 0..60 {
        hub.register(&format!("s{n:02}"), &["t"], &[("fleet", "a")])
            .await;
    }
    let blob = "x".repeat(100 * 1024);
    let req = proto::CreateDirectiveRequest {
        target: selector("fleet", "a"),
        r#type: "t".into(),
        payload: Some(json_struct(json!({"blob": blob}))),
        ..Default::default()
    };
    let res = hub.create(req).await;
    assert_eq!(res.directive_count, 60);
    assert!(res.payloads_omitted, "6 MB of payloads do not fit a reply");
    assert!(!res.directives_omitted);
    assert_eq!(res.directives.len(), 60);
    assert!(res.directives.iter().all(|d| d.payload.is_none()));

    let one = hub.directive(&res.directives[0].id).await;
    assert_eq!(
        struct_json(one.payload.as_ref().unwrap()),
        json!({"blob": blob})
    );
    if hub::testing::skip_on_postgres("the rest reads hub.db with SQLite") {
        return;
    }
    let db = rusqlite::Connection::open(hub.data_dir().join("hub.db")).unwrap();
    let (groups, inline): (i64, i64) = db
        .query_row(
            "SELECT (SELECT COUNT(*) FROM directive_groups), \
             (SELECT COALESCE(SUM(length(payload)), 0) FROM directives)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((groups, inline), (1, 0), "the payload is stored once");
}

#[tokio::test]
async fn list_pages_are_bounded_by_bytes_and_lose_nothing() {
    let hub = TestHub::start().await;
    hub.register("big", &["t"], &[]).await;
    let blob = "y".repeat(1024 * 1024 - 64);
    for n in 0..5 {
        hub.send("big", "t", json!({"blob": blob, "n": n})).await;
    }
    let mut admin = hub.admin().await;
    let first = admin
        .list_directives(authed(proto::ListDirectivesRequest::default(), ADMIN_TOKEN))
        .await
        .expect("a page that fits")
        .into_inner();
    assert!(!first.directives.is_empty() && first.directives.len() < 5);
    assert!(!first.next_page_token.is_empty());
    let all = hub.all_directives().await;
    let mut seen: Vec<_> = all
        .iter()
        .map(|d| struct_json(d.payload.as_ref().unwrap())["n"].clone())
        .collect();
    seen.sort_by_key(|n| n.as_i64());
    assert_eq!(seen, (0..5).map(|n| json!(n)).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_final_ack_after_the_deadline_keeps_the_result() {
    let (hub, clock) = TestHub::start_manual(Settings::default()).await;
    let mut spoke = hub.register("late", &["t"], &[]).await;
    let d = hub.send("late", "t", json!({})).await;
    let mut stream = spoke.watch().await;
    next_directive(&mut stream).await;
    gone(&hub, "late", stream).await;
    clock.advance(Duration::from_secs(31));
    wait_state(&hub, &d.id, proto::DirectiveState::Pending).await;

    spoke
        .ack(&d.id, proto::AckOutcome::Completed, json!({"done": true}))
        .await
        .expect("the work was done: the late ack is taken");
    let done = hub.directive(&d.id).await;
    assert_eq!(done.state, proto::DirectiveState::Completed as i32);
    assert_eq!(
        struct_json(done.result.as_ref().unwrap()),
        json!({"done": true})
    );
    // Progress still needs a live delivery.
    let d2 = hub.send("late", "t", json!({})).await;
    let mut stream = spoke.watch().await;
    next_directive(&mut stream).await;
    gone(&hub, "late", stream).await;
    clock.advance(Duration::from_secs(31));
    wait_state(&hub, &d2.id, proto::DirectiveState::Pending).await;
    assert_code(
        spoke
            .ack(&d2.id, proto::AckOutcome::InProgress, json!({}))
            .await,
        Code::FailedPrecondition,
        "PENDING",
    );
}

#[tokio::test]
async fn cancel_notices_wait_for_the_next_stream_however_many() {
    let hub = TestHub::start().await;
    let mut spoke = hub.register_with_window("many", &["t"], &[], 200).await;
    let mut ids = Vec::new();
    for n in 0..100 {
        ids.push(hub.send("many", "t", json!({"n": n})).await.id);
    }
    let mut stream = spoke.watch().await;
    for _ in 0..100 {
        next_directive(&mut stream).await;
    }
    drop(stream);
    let mut admin = hub.admin().await;
    for id in &ids {
        let req = proto::CancelDirectiveRequest {
            directive_id: id.clone(),
            reason: "not needed".into(),
        };
        admin
            .cancel_directive(authed(req, ADMIN_TOKEN))
            .await
            .unwrap();
    }
    let mut stream = spoke.watch().await;
    let mut told = Vec::new();
    while told.len() < ids.len() {
        match next_message(&mut stream).await.unwrap() {
            proto::watch_directives_response::Message::Cancelled(c) => told.push(c.directive_id),
            other => panic!("only cancel notices expected, got {other:?}"),
        }
    }
    told.sort();
    ids.sort();
    assert_eq!(told, ids);
}

#[tokio::test]
async fn an_idempotency_key_is_tied_to_its_request_and_forgotten_after_retention() {
    let (hub, clock) = TestHub::start_manual(Settings {
        idempotency_retention: Duration::from_secs(3600),
        directive_retention: Duration::from_secs(7200),
        ..Settings::default()
    })
    .await;
    let mut spoke = hub.register("idem", &["t"], &[]).await;
    let mut req = create_for("idem", "t", json!({"n": 1}));
    req.idempotency_key = "order-1".into();
    let first = hub.create(req.clone()).await;
    let again = hub.create(req.clone()).await;
    assert!(again.idempotent_replay);
    assert_eq!(again.group_id, first.group_id);

    let mut other = req.clone();
    other.payload = Some(json_struct(json!({"n": 2})));
    let res = hub
        .admin()
        .await
        .create_directive(authed(other.clone(), ADMIN_TOKEN))
        .await;
    assert_code(res, Code::AlreadyExists, "order-1");

    let id = first.directives[0].id.clone();
    let mut stream = spoke.watch().await;
    next_directive(&mut stream).await;
    spoke
        .ack(&id, proto::AckOutcome::Completed, json!({}))
        .await
        .unwrap();

    clock.advance(Duration::from_secs(3601));
    let fresh = eventually("the key to be forgotten", || {
        let other = other.clone();
        let hub = &hub;
        async move {
            let res = hub
                .admin()
                .await
                .create_directive(authed(other, ADMIN_TOKEN))
                .await;
            res.ok().map(|r| r.into_inner())
        }
    })
    .await;
    assert!(!fresh.idempotent_replay);
    assert_ne!(fresh.group_id, first.group_id);

    clock.advance(Duration::from_secs(7201));
    eventually("the completed directive to be purged", || async {
        let req = proto::GetDirectiveRequest {
            directive_id: id.clone(),
        };
        let res = hub
            .admin()
            .await
            .get_directive(authed(req, ADMIN_TOKEN))
            .await;
        matches!(res, Err(s) if s.code() == Code::NotFound).then_some(())
    })
    .await;
}

#[tokio::test]
async fn watching_events_retention_removed_is_out_of_range() {
    let (hub, clock) = TestHub::start_manual(Settings {
        event_retention: Duration::from_secs(3600),
        ..Settings::default()
    })
    .await;
    hub.register("old", &["t"], &[]).await;
    hub.send("old", "t", json!({})).await;
    clock.advance(Duration::from_secs(7200));
    hub.send("old", "t", json!({})).await;
    let oldest = eventually("old events to be purged", || async {
        let all = events(&hub, 0).await.unwrap();
        (all.first()?.sequence > 1).then(|| all[0].sequence)
    })
    .await;
    let res = events(&hub, 1).await;
    assert_code(
        res,
        Code::OutOfRange,
        &format!("oldest stored event is {oldest}"),
    );
    assert!(
        events(&hub, oldest - 1).await.is_ok(),
        "resuming at the gap"
    );
}

#[tokio::test]
async fn a_requeue_and_a_changed_registration_write_events() {
    let (hub, clock) = TestHub::start_manual(Settings::default()).await;
    let mut spoke = hub.register("ev", &["t"], &[]).await;
    let d = hub.send("ev", "t", json!({})).await;
    let mut stream = spoke.watch().await;
    next_directive(&mut stream).await;
    clock.advance(Duration::from_secs(31));
    let again = next_directive(&mut stream).await;
    assert_eq!(again.attempt, 2);
    // A timer's decision is written with the next commit; nobody waits.
    let requeued = eventually("the requeue event", || async {
        let all = events(&hub, 0).await.unwrap();
        let requeued: Vec<proto::Event> = of_type(&all, proto::EventType::DirectiveRequeued)
            .into_iter()
            .cloned()
            .collect();
        (!requeued.is_empty()).then_some(requeued)
    })
    .await;
    assert_eq!(requeued.len(), 1);
    assert_eq!(requeued[0].directive_id, d.id);

    let reg = |labels: &[(&str, &str)]| proto::RegisterRequest {
        name: "ev".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        capabilities: vec![proto::Capability {
            directive_type: "t".into(),
            version: "1".into(),
        }],
        version: "1.0.0".into(),
        ..Default::default()
    };
    spoke.client.register(spoke.req(reg(&[]))).await.unwrap();
    spoke
        .client
        .register(spoke.req(reg(&[("zone", "b")])))
        .await
        .unwrap();
    let all = events(&hub, 0).await.unwrap();
    let updated = of_type(&all, proto::EventType::SpokeUpdated);
    assert_eq!(
        updated.len(),
        1,
        "only the registration that changed something"
    );
    assert_eq!(updated[0].spoke_id, spoke.id);
}

#[tokio::test]
async fn a_locked_database_answers_unavailable_and_readyz_says_so() {
    if hub::testing::skip_on_postgres("holds SQLite's write lock from another connection") {
        return;
    }
    let hub = TestHub::start().await;
    hub.register("r", &["t"], &[]).await;
    let ready = http(hub.http_addr, "GET", "/readyz", &[], "").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    let db = lock_database(&hub);
    let ready = http(hub.http_addr, "GET", "/readyz", &[], "").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains("locked"), "{ready}");
    let res = hub
        .admin()
        .await
        .create_directive(authed(create_for("r", "t", json!({})), ADMIN_TOKEN))
        .await;
    assert_code(res, Code::Unavailable, "");
    let ready = http(hub.http_addr, "GET", "/readyz", &[], "").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");

    db.execute_batch("ROLLBACK").unwrap();
    eventually("the hub to take writes again", || async {
        let ready = http(hub.http_addr, "GET", "/readyz", &[], "").await;
        ready.starts_with("HTTP/1.1 200").then_some(())
    })
    .await;
    hub.send("r", "t", json!({})).await;
}

/// PostgreSQL's counterpart of the locked database: the server goes away
/// (every session ends, none is let in) and comes back.
#[tokio::test]
async fn a_lost_postgres_database_answers_unavailable_and_the_hub_recovers_when_it_returns() {
    if !hub::testing::on_postgres() {
        eprintln!("skipped on SQLite: a PostgreSQL server going away");
        return;
    }
    let hub = TestHub::start().await;
    hub.register("r", &["t"], &[]).await;
    let ready = http(hub.http_addr, "GET", "/readyz", &[], "").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    hub.set_database_reachable(false).await;
    let res = hub
        .admin()
        .await
        .create_directive(authed(create_for("r", "t", json!({})), ADMIN_TOKEN))
        .await;
    assert_code(res, Code::Unavailable, "");
    let ready = http(hub.http_addr, "GET", "/readyz", &[], "").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    let res = hub
        .admin()
        .await
        .list_directives(authed(proto::ListDirectivesRequest::default(), ADMIN_TOKEN))
        .await;
    assert_code(res, Code::Unavailable, "");

    hub.set_database_reachable(true).await;
    eventually("the hub to take writes again", || async {
        let ready = http(hub.http_addr, "GET", "/readyz", &[], "").await;
        ready.starts_with("HTTP/1.1 200").then_some(())
    })
    .await;
    hub.send("r", "t", json!({})).await;
    assert_eq!(
        hub.all_directives().await.len(),
        1,
        "the failed create left nothing"
    );
}

#[tokio::test]
async fn a_deleted_spoke_frees_its_name_and_its_work_is_cancelled() {
    let mut hub = TestHub::start().await;
    let mut spoke = hub.register("gone", &["t"], &[]).await;
    let delivered = hub.send("gone", "t", json!({})).await;
    let mut stream = spoke.watch().await;
    next_directive(&mut stream).await;
    let pending = hub.send("gone", "t", json!({})).await;

    let req = proto::DeleteSpokeRequest {
        spoke_name: "gone".into(),
        ..Default::default()
    };
    let res = hub
        .admin()
        .await
        .delete_spoke(authed(req.clone(), ADMIN_TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(res.cancelled_directives, 2);
    assert_eq!(res.spoke.unwrap().id, spoke.id);
    let end = loop {
        match next_message(&mut stream).await {
            // The second directive may have gone out before the delete.
            Ok(proto::watch_directives_response::Message::Directive(_)) => continue,
            other => break other,
        }
    };
    assert_code(end, Code::Unauthenticated, "deleted");
    for id in [&delivered.id, &pending.id] {
        assert_eq!(
            hub.directive(id).await.state,
            proto::DirectiveState::Cancelled as i32
        );
    }
    let hb = proto::HeartbeatRequest::default();
    assert_code(
        spoke.client.heartbeat(spoke.req(hb)).await,
        Code::Unauthenticated,
        "",
    );
    assert_code(
        hub.admin()
            .await
            .delete_spoke(authed(req, ADMIN_TOKEN))
            .await,
        Code::NotFound,
        "gone",
    );

    let again = hub.register("gone", &["t"], &[]).await;
    assert_ne!(again.id, spoke.id, "the name is free for a new spoke");
    hub.restart().await;
    assert_eq!(hub.spoke("gone").await.id, again.id);
    assert_eq!(
        hub.directive(&pending.id).await.state,
        proto::DirectiveState::Cancelled as i32,
        "history stays"
    );
    let all = events(&hub, 0).await.unwrap();
    assert_eq!(of_type(&all, proto::EventType::SpokeDeleted).len(), 1);
}
