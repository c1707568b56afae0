//! Bad input gets a precise status and changes nothing.

use hub::Settings;
use hub_proto::v1 as proto;
use hub_proto::v1::directive_target::Target;
use serde_json::json;
use tonic::{Code, Request};

use crate::metrics::{point, push};
use crate::support::*;

mod undecodable;

/// Everything an operator can read, to compare before and after.
async fn snapshot(
    hub: &TestHub,
) -> (
    Vec<proto::Directive>,
    Vec<proto::Spoke>,
    Vec<proto::StoredMetricPoint>,
) {
    let spokes = hub
        .admin()
        .await
        .list_spokes(authed(proto::ListSpokesRequest::default(), ADMIN_TOKEN))
        .await
        .unwrap()
        .into_inner()
        .spokes;
    let points = hub.points(proto::QueryMetricsRequest::default()).await;
    (hub.all_directives().await, spokes, points)
}

#[tokio::test]
async fn bad_input_gets_a_precise_status_and_changes_nothing() {
    let settings = Settings {
        max_message_bytes: 64 * 1024,
        max_payload_bytes: 8 * 1024,
        max_points_per_batch: 10,
        ..Settings::default()
    };
    let hub = TestHub::start_with(settings).await;
    let mut alice = hub.register("alice", &["t"], &[("team", "a")]).await;
    let mut bob = hub.register("bob", &["t"], &[]).await;
    let alices = hub.send("alice", "t", json!({"mine": true})).await;
    let bobs = hub.send("bob", "t", json!({})).await;
    {
        let mut stream = bob.watch().await;
        next_directive(&mut stream).await;
        bob.ack(&bobs.id, proto::AckOutcome::Completed, json!({"r": 1}))
            .await
            .unwrap();
    }
    push(
        &mut alice,
        vec![proto::PushMetricsRequest {
            batch_id: "once".into(),
            points: vec![point("statistics", "orders", 1.0)],
        }],
    )
    .await
    .unwrap();
    let before = snapshot(&hub).await;

    let mut spoke = hub.spoke_client().await;
    let mut admin = hub.admin().await;
    let ack = |id: &str| proto::AckRequest {
        directive_id: id.into(),
        outcome: proto::AckOutcome::Completed.into(),
        ..Default::default()
    };

    // Credentials.
    assert_code(
        spoke.ack(Request::new(ack(&alices.id))).await,
        Code::Unauthenticated,
        "authorization",
    );
    assert_code(
        spoke
            .ack(authed(ack(&alices.id), "wrong-key-0123456789"))
            .await,
        Code::Unauthenticated,
        "unknown spoke key",
    );
    assert_code(
        spoke
            .watch_directives(authed(proto::WatchDirectivesRequest {}, ADMIN_TOKEN))
            .await,
        Code::Unauthenticated,
        "unknown spoke key",
    );
    assert_code(
        admin
            .list_spokes(Request::new(proto::ListSpokesRequest::default()))
            .await,
        Code::Unauthenticated,
        "authorization",
    );
    assert_code(
        admin
            .list_spokes(authed(proto::ListSpokesRequest::default(), &alice.key))
            .await,
        Code::Unauthenticated,
        "admin token",
    );
    assert_code(
        admin
            .create_directive(authed(
                create_for("alice", "t", json!({})),
                ENROLLMENT_TOKEN,
            ))
            .await,
        Code::Unauthenticated,
        "admin token",
    );

    // Another spoke's directive looks exactly like one that does not exist.
    let foreign = bob
        .ack(&alices.id, proto::AckOutcome::Completed, json!({}))
        .await
        .unwrap_err();
    let missing_id = uuid::Uuid::now_v7().to_string();
    let missing = bob
        .ack(&missing_id, proto::AckOutcome::Completed, json!({}))
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::NotFound);
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(
        foreign.message().replace(&alices.id, "ID"),
        missing.message().replace(&missing_id, "ID")
    );

    // Missing or malformed fields name the field.
    assert_code(
        alice.client.ack(alice.req(ack("not-a-uuid"))).await,
        Code::InvalidArgument,
        "directive_id",
    );
    assert_code(
        alice
            .client
            .ack(alice.req(proto::AckRequest {
                directive_id: alices.id.clone(),
                ..Default::default()
            }))
            .await,
        Code::InvalidArgument,
        "outcome",
    );
    assert_code(
        alice
            .client
            .ack(alice.req(proto::AckRequest {
                directive_id: alices.id.clone(),
                outcome: proto::AckOutcome::InProgress.into(),
                progress: Some(101),
                ..Default::default()
            }))
            .await,
        Code::InvalidArgument,
        "progress",
    );
    assert_code(
        alice
            .client
            .heartbeat(alice.req(proto::HeartbeatRequest::default()))
            .await,
        Code::InvalidArgument,
        "status",
    );
    let bad_name = proto::RegisterRequest {
        name: "Bad Name<script>".into(),
        ..Default::default()
    };
    assert_code(
        spoke.register(authed(bad_name, ENROLLMENT_TOKEN)).await,
        Code::InvalidArgument,
        "name",
    );
    // Webhook URLs: the form, and the SSRF guard (metadata and link-local
    // addresses, the hub's own port), on a new spoke and on a
    // re-registration alike.
    let own_port = format!("http://127.0.0.1:{}/hook", hub.addr.port());
    for url in [
        "not a url",
        "ftp://spoke.example/hook",
        "http://spoke.example/hook",
        "https://user:pw@spoke.example/hook",
        "https://169.254.169.254/latest/meta-data/",
        "https://[fe80::1]/hook",
        "https://0.0.0.0/hook",
        own_port.as_str(),
    ] {
        let new = proto::RegisterRequest {
            name: "hooked".into(),
            webhook_url: url.into(),
            ..Default::default()
        };
        assert_code(
            spoke.register(authed(new, ENROLLMENT_TOKEN)).await,
            Code::InvalidArgument,
            "webhook_url",
        );
        let again = proto::RegisterRequest {
            name: "alice".into(),
            capabilities: vec![proto::Capability {
                directive_type: "t".into(),
                version: "1".into(),
            }],
            webhook_url: url.into(),
            ..Default::default()
        };
        assert_code(
            alice.client.register(alice.req(again)).await,
            Code::InvalidArgument,
            "webhook_url",
        );
    }
    let no_target = proto::CreateDirectiveRequest {
        r#type: "t".into(),
        ..Default::default()
    };
    assert_code(
        admin.create_directive(authed(no_target, ADMIN_TOKEN)).await,
        Code::InvalidArgument,
        "target",
    );
    assert_code(
        admin
            .create_directive(authed(create_for("alice", "", json!({})), ADMIN_TOKEN))
            .await,
        Code::InvalidArgument,
        "type",
    );
    let mut past = create_for("alice", "t", json!({}));
    past.expires_at = Some(pbjson_types::Timestamp {
        seconds: 1,
        nanos: 0,
    });
    assert_code(
        admin.create_directive(authed(past, ADMIN_TOKEN)).await,
        Code::InvalidArgument,
        "expires_at",
    );
    let empty_selector = proto::CreateDirectiveRequest {
        target: Some(proto::DirectiveTarget {
            target: Some(Target::Selector(proto::LabelSelector::default())),
        }),
        r#type: "t".into(),
        ..Default::default()
    };
    assert_code(
        admin
            .create_directive(authed(empty_selector, ADMIN_TOKEN))
            .await,
        Code::InvalidArgument,
        "target.selector.match_labels",
    );
    assert_code(
        admin
            .create_directive(authed(create_for("nobody", "t", json!({})), ADMIN_TOKEN))
            .await,
        Code::NotFound,
        "nobody",
    );
    assert_code(
        admin
            .get_directive(authed(
                proto::GetDirectiveRequest {
                    directive_id: "x".into(),
                },
                ADMIN_TOKEN,
            ))
            .await,
        Code::InvalidArgument,
        "directive_id",
    );
    assert_code(
        admin
            .get_spoke(authed(
                proto::GetSpokeRequest {
                    spoke_id: alice.id.clone(),
                    spoke_name: "alice".into(),
                },
                ADMIN_TOKEN,
            ))
            .await,
        Code::InvalidArgument,
        "spoke_name",
    );
    assert_code(
        push(
            &mut alice,
            vec![proto::PushMetricsRequest {
                batch_id: String::new(),
                points: vec![point("statistics", "orders", 1.0)],
            }],
        )
        .await,
        Code::InvalidArgument,
        "batch_id",
    );

    // State rules.
    assert_code(
        bob.ack(&bobs.id, proto::AckOutcome::Failed, json!({}))
            .await,
        Code::FailedPrecondition,
        "COMPLETED",
    );
    assert_code(
        alice
            .ack(&alices.id, proto::AckOutcome::Completed, json!({}))
            .await,
        Code::FailedPrecondition,
        "PENDING",
    );

    // A duplicate batch is reported, not stored again.
    let dup = push(
        &mut alice,
        vec![proto::PushMetricsRequest {
            batch_id: "once".into(),
            points: vec![point("statistics", "orders", 1.0)],
        }],
    )
    .await
    .unwrap();
    assert_eq!(dup.batches[0].status, proto::BatchStatus::Duplicate as i32);

    // Size limits.
    let big = create_for("alice", "t", json!({"blob": "x".repeat(100 * 1024)}));
    assert_code(
        admin.create_directive(authed(big, ADMIN_TOKEN)).await,
        Code::ResourceExhausted,
        "too large",
    );
    let over_payload = create_for("alice", "t", json!({"blob": "x".repeat(20 * 1024)}));
    assert_code(
        admin
            .create_directive(authed(over_payload, ADMIN_TOKEN))
            .await,
        Code::ResourceExhausted,
        "payload",
    );
    let too_many = proto::PushMetricsRequest {
        batch_id: "many".into(),
        points: vec![point("statistics", "orders", 1.0); 11],
    };
    assert_code(
        push(&mut alice, vec![too_many]).await,
        Code::ResourceExhausted,
        "limit is 10",
    );
    let mut huge_point = point("statistics", "orders", 1.0);
    huge_point.unit = "u".repeat(100 * 1024);
    let huge = proto::PushMetricsRequest {
        batch_id: "huge".into(),
        points: vec![huge_point],
    };
    assert_code(
        push(&mut alice, vec![huge]).await,
        Code::ResourceExhausted,
        "too large",
    );

    let after = snapshot(&hub).await;
    assert_eq!(before.0, after.0, "directives unchanged");
    assert_eq!(before.1, after.1, "spokes unchanged");
    assert_eq!(before.2, after.2, "metric points unchanged");
}

/// A JSON object with `bad` (NaN or an infinity) at `a.b[2]`, which JSON
/// cannot carry: serde_json cannot even build it, so it is built by hand.
fn with_non_finite(bad: f64) -> pbjson_types::Struct {
    use pbjson_types::value::Kind;
    let number = |n| pbjson_types::Value {
        kind: Some(Kind::NumberValue(n)),
    };
    let list = pbjson_types::ListValue {
        values: vec![number(1.0), number(2.0), number(bad)],
    };
    let mut a = json_struct(json!({"ok": 1}));
    a.fields.insert(
        "b".into(),
        pbjson_types::Value {
            kind: Some(Kind::ListValue(list)),
        },
    );
    let mut top = json_struct(json!({"n": 1.5}));
    top.fields.insert(
        "a".into(),
        pbjson_types::Value {
            kind: Some(Kind::StructValue(a)),
        },
    );
    top
}

#[tokio::test]
async fn non_finite_numbers_in_payloads_and_results_name_the_field() {
    let hub = TestHub::start().await;
    let mut alice = hub.register("alice", &["t"], &[]).await;
    let sent = hub.send("alice", "t", json!({})).await;
    let mut stream = alice.watch().await;
    next_directive(&mut stream).await;
    let before = snapshot(&hub).await;
    let mut admin = hub.admin().await;

    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let mut create = create_for("alice", "t", json!({}));
        create.payload = Some(with_non_finite(bad));
        assert_code(
            admin
                .create_directive(authed(create.clone(), ADMIN_TOKEN))
                .await,
            Code::InvalidArgument,
            "payload.a.b[2]",
        );
        let many = proto::CreateDirectivesRequest {
            items: vec![create],
            include_payloads: false,
        };
        let reply = admin
            .create_directives(authed(many, ADMIN_TOKEN))
            .await
            .unwrap()
            .into_inner();
        let Some(proto::create_directives_result::Outcome::Error(e)) = &reply.results[0].outcome
        else {
            panic!("expected an item error, got {reply:?}");
        };
        assert_eq!(e.code, Code::InvalidArgument as i32, "{e:?}");
        assert!(e.message.contains("payload.a.b[2]"), "{e:?}");

        let ack = proto::AckRequest {
            directive_id: sent.id.clone(),
            outcome: proto::AckOutcome::Completed.into(),
            result: Some(with_non_finite(bad)),
            ..Default::default()
        };
        assert_code(
            alice.client.ack(alice.req(ack)).await,
            Code::InvalidArgument,
            "result.a.b[2]",
        );
    }
    assert_eq!(before, snapshot(&hub).await, "nothing changed");

    // The directive still takes a good result.
    alice
        .ack(&sent.id, proto::AckOutcome::Completed, json!({"x": 2.5}))
        .await
        .unwrap();
    let done = hub.directive(&sent.id).await;
    assert_eq!(done.state, proto::DirectiveState::Completed as i32);
    assert_eq!(
        struct_json(done.result.as_ref().unwrap()),
        json!({"x": 2.5})
    );
}

#[tokio::test]
async fn list_spokes_refuses_a_page_token_it_did_not_issue() {
    let hub = TestHub::start().await;
    for name in ["a1", "b2", "c3"] {
        hub.register(name, &[], &[]).await;
    }
    let mut admin = hub.admin().await;
    let list = |page_token: &str| {
        authed(
            proto::ListSpokesRequest {
                page_size: 2,
                page_token: page_token.into(),
                ..Default::default()
            },
            ADMIN_TOKEN,
        )
    };
    for forged in ["not a token!", "Z", "\u{0}", &"x".repeat(300)] {
        assert_code(
            admin.list_spokes(list(forged)).await,
            Code::InvalidArgument,
            "page_token",
        );
    }
    // The tokens it does issue still page through every spoke.
    let first = admin.list_spokes(list("")).await.unwrap().into_inner();
    assert_eq!(first.spokes.len(), 2);
    let second = admin
        .list_spokes(list(&first.next_page_token))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = first
        .spokes
        .iter()
        .chain(&second.spokes)
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, ["a1", "b2", "c3"]);
    assert!(second.next_page_token.is_empty());
}

/// A NUL character in free text is refused, naming the field, on both
/// backends: PostgreSQL cannot store one in text, and taken it would fail
/// the commit of every call that shared its batch.
#[tokio::test]
async fn a_nul_character_in_free_text_is_refused_and_changes_nothing() {
    let hub = TestHub::start().await;
    let mut spoke = hub.register("nul", &["t"], &[]).await;
    let d = hub.send("nul", "t", json!({})).await;
    let before = snapshot(&hub).await;
    let mut admin = hub.admin().await;

    let heartbeat = proto::HeartbeatRequest {
        status: proto::SpokeStatus::Ok.into(),
        status_message: "fine\0really".into(),
        ..Default::default()
    };
    assert_code(
        spoke.client.heartbeat(spoke.req(heartbeat)).await,
        Code::InvalidArgument,
        "status_message",
    );
    let mut keyed = create_for("nul", "t", json!({}));
    keyed.idempotency_key = "k\0".into();
    assert_code(
        admin.create_directive(authed(keyed, ADMIN_TOKEN)).await,
        Code::InvalidArgument,
        "idempotency_key",
    );
    let failed = proto::AckRequest {
        directive_id: d.id.clone(),
        outcome: proto::AckOutcome::Failed.into(),
        error: "disk\0full".into(),
        ..Default::default()
    };
    assert_code(
        spoke.client.ack(spoke.req(failed)).await,
        Code::InvalidArgument,
        "error",
    );
    let cancel = proto::CancelDirectiveRequest {
        directive_id: d.id.clone(),
        reason: "\0".into(),
    };
    assert_code(
        admin.cancel_directive(authed(cancel, ADMIN_TOKEN)).await,
        Code::InvalidArgument,
        "reason",
    );
    let batch = proto::PushMetricsRequest {
        batch_id: "b\0".into(),
        points: vec![point("statistics", "orders", 1.0)],
    };
    assert_code(
        push(&mut spoke, vec![batch]).await,
        Code::InvalidArgument,
        "batch_id",
    );
    assert_eq!(snapshot(&hub).await, before);

    // The hub goes on writing.
    let ok = proto::HeartbeatRequest {
        status: proto::SpokeStatus::Ok.into(),
        status_message: "fine".into(),
        ..Default::default()
    };
    spoke.client.heartbeat(spoke.req(ok)).await.unwrap();
    hub.send("nul", "t", json!({})).await;
    assert_eq!(hub.all_directives().await.len(), 2);
}
