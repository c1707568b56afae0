//! The batched paths: acks on one AckStream (answered in order, each with
//! its own result or error, the stream staying open) and CreateDirectives
//! (one result or error per item, replies that fit).

use hub::Settings;
use hub_proto::v1 as proto;
use proto::ack_stream_response::Outcome as AckOutcome;
use proto::create_directives_result::Outcome as CreateOutcome;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::support::*;

fn ack(id: &str, outcome: proto::AckOutcome) -> proto::AckRequest {
    proto::AckRequest {
        directive_id: id.into(),
        outcome: outcome.into(),
        result: Some(json_struct(json!({"via": "stream"}))),
        error: match outcome {
            proto::AckOutcome::Failed | proto::AckOutcome::Rejected => "it broke".into(),
            _ => String::new(),
        },
        ..Default::default()
    }
}

/// An open AckStream: send acks on `tx`, read answers from `answers`.
struct AckStream {
    tx: mpsc::Sender<proto::AckRequest>,
    answers: tonic::Streaming<proto::AckStreamResponse>,
}

impl AckStream {
    async fn open(spoke: &mut Spoke) -> Self {
        let (tx, rx) = mpsc::channel(64);
        let req = spoke.req(ReceiverStream::new(rx));
        let answers = spoke
            .client
            .ack_stream(req)
            .await
            .expect("AckStream opens")
            .into_inner();
        Self { tx, answers }
    }

    async fn send(&self, req: proto::AckRequest) {
        self.tx.send(req).await.expect("the stream is open");
    }

    async fn answer(&mut self) -> proto::AckStreamResponse {
        tokio::time::timeout(std::time::Duration::from_secs(10), self.answers.message())
            .await
            .expect("an answer within 10 s")
            .expect("the stream stays OK")
            .expect("the stream stays open")
    }
}

fn state_of(answer: &proto::AckStreamResponse) -> (proto::DirectiveState, bool) {
    match &answer.outcome {
        Some(AckOutcome::Ack(a)) => (a.state(), a.duplicate),
        other => panic!("expected a result, got {other:?}"),
    }
}

fn error_of(answer: &proto::AckStreamResponse) -> (Code, &str) {
    match &answer.outcome {
        Some(AckOutcome::Error(e)) => (Code::from_i32(e.code), e.message.as_str()),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn acks_on_a_stream_are_answered_in_order_each_with_its_own_result_or_error() {
    let hub = TestHub::start().await;
    let mut spoke = hub.register("streamer", &["t"], &[]).await;
    let other = hub.register("other", &["t"], &[]).await;
    let first = hub.send("streamer", "t", json!({"n": 1})).await;
    let second = hub.send("streamer", "t", json!({"n": 2})).await;
    let theirs = hub.send("other", "t", json!({})).await;
    let mut watch = spoke.watch().await;
    next_directive(&mut watch).await;
    next_directive(&mut watch).await;

    let mut acks = AckStream::open(&mut spoke).await;
    let sent = [
        ack(&second.id, proto::AckOutcome::InProgress),
        ack(&first.id, proto::AckOutcome::Completed),
        ack(&theirs.id, proto::AckOutcome::Completed),
        ack("not-a-uuid", proto::AckOutcome::Completed),
        ack(&first.id, proto::AckOutcome::Completed),
        ack(&first.id, proto::AckOutcome::Failed),
        ack(&second.id, proto::AckOutcome::Completed),
    ];
    for req in sent.iter().cloned() {
        acks.send(req).await;
    }
    let mut answers = Vec::new();
    for _ in 0..sent.len() {
        answers.push(acks.answer().await);
    }
    let ids: Vec<&str> = answers.iter().map(|a| a.directive_id.as_str()).collect();
    let sent_ids: Vec<&str> = sent.iter().map(|a| a.directive_id.as_str()).collect();
    assert_eq!(ids, sent_ids, "one answer per ack, in order");

    use proto::DirectiveState as S;
    assert_eq!(state_of(&answers[0]), (S::InProgress, false));
    assert_eq!(state_of(&answers[1]), (S::Completed, false));
    // Another spoke's directive looks like one that does not exist.
    assert_eq!(error_of(&answers[2]).0, Code::NotFound);
    let (code, message) = error_of(&answers[3]);
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("directive_id"), "{message}");
    assert_eq!(
        state_of(&answers[4]),
        (S::Completed, true),
        "a repeat is OK"
    );
    let (code, message) = error_of(&answers[5]);
    assert_eq!(code, Code::FailedPrecondition);
    assert!(message.contains("COMPLETED"), "{message}");
    assert_eq!(state_of(&answers[6]), (S::Completed, false));

    // Answered means committed, with the result.
    let stored = hub.directive(&first.id).await;
    assert_eq!(stored.state, S::Completed as i32);
    assert_eq!(
        struct_json(stored.result.as_ref().unwrap()),
        json!({"via": "stream"})
    );
    assert_eq!(
        hub.directive(&theirs.id).await.state,
        S::Pending as i32,
        "another spoke's directive is untouched"
    );
    drop(other);

    // The stream is still open for more.
    let third = hub.send("streamer", "t", json!({"n": 3})).await;
    assert_eq!(next_directive(&mut watch).await.id, third.id);
    acks.send(ack(&third.id, proto::AckOutcome::Rejected)).await;
    assert_eq!(state_of(&acks.answer().await), (S::Rejected, false));
}

#[tokio::test]
async fn acks_answered_on_a_stream_survive_a_restart() {
    let mut hub = TestHub::start().await;
    let mut spoke = hub.register("durable", &["t"], &[]).await;
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(hub.send("durable", "t", json!({ "n": n })).await.id);
    }
    let mut watch = spoke.watch().await;
    for _ in 0..ids.len() {
        next_directive(&mut watch).await;
    }
    let mut acks = AckStream::open(&mut spoke).await;
    for id in &ids {
        acks.send(ack(id, proto::AckOutcome::Completed)).await;
    }
    for _ in 0..ids.len() {
        acks.answer().await;
    }
    drop(acks);
    drop(watch);
    hub.restart().await;
    for id in &ids {
        assert_eq!(
            hub.directive(id).await.state,
            proto::DirectiveState::Completed as i32
        );
    }
}

fn item(spoke: &str, kind: &str, payload: serde_json::Value) -> proto::CreateDirectiveRequest {
    create_for(spoke, kind, payload)
}

fn created(result: &proto::CreateDirectivesResult) -> &proto::CreateDirectiveResponse {
    match &result.outcome {
        Some(CreateOutcome::Created(c)) => c,
        other => panic!("expected created, got {other:?}"),
    }
}

fn refused(result: &proto::CreateDirectivesResult) -> (Code, &str) {
    match &result.outcome {
        Some(CreateOutcome::Error(e)) => (Code::from_i32(e.code), e.message.as_str()),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn create_directives_answers_each_item_in_order_and_an_error_stops_only_its_item() {
    let hub = TestHub::start().await;
    let mut spoke = hub.register("bulk", &["t"], &[("team", "a")]).await;
    hub.register("bulk2", &["t"], &[("team", "a")]).await;
    let mut keyed = item("bulk", "t", json!({"k": 1}));
    keyed.idempotency_key = "once".into();
    let items = vec![
        item("bulk", "t", json!({"n": 1})),
        item("bulk", "bad type!", json!({})),
        item("nobody", "t", json!({})),
        keyed.clone(),
        keyed,
        proto::CreateDirectiveRequest {
            target: Some(proto::DirectiveTarget {
                target: Some(proto::directive_target::Target::Selector(
                    proto::LabelSelector {
                        match_labels: [("team".to_owned(), "a".to_owned())].into(),
                    },
                )),
            }),
            r#type: "t".into(),
            ..Default::default()
        },
    ];
    let reply = hub
        .admin()
        .await
        .create_directives(authed(
            proto::CreateDirectivesRequest {
                items,
                include_payloads: false,
            },
            ADMIN_TOKEN,
        ))
        .await
        .expect("the call succeeds")
        .into_inner();
    assert_eq!(reply.results.len(), 6);
    let first = created(&reply.results[0]);
    assert_eq!(first.directives.len(), 1);
    assert!(
        first.directives[0].payload.is_none(),
        "no payload echo unless asked"
    );
    let (code, message) = refused(&reply.results[1]);
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.starts_with("type"), "{message}");
    assert_eq!(refused(&reply.results[2]).0, Code::NotFound);
    let once = created(&reply.results[3]);
    let again = created(&reply.results[4]);
    assert!(!once.idempotent_replay);
    assert!(again.idempotent_replay);
    assert_eq!(once.group_id, again.group_id);
    assert_eq!(
        created(&reply.results[5]).directives.len(),
        2,
        "a fan-out item"
    );

    // Exactly what was reported was created: 1 + 1 (keyed, once) + 2.
    assert_eq!(hub.all_directives().await.len(), 4);
    let mut watch = spoke.watch().await;
    let d = next_directive(&mut watch).await;
    assert_eq!(d.id, first.directives[0].id);
    assert_eq!(struct_json(d.payload.as_ref().unwrap()), json!({"n": 1}));
}

#[tokio::test]
async fn create_directives_refuses_an_empty_or_oversized_batch_whole() {
    let hub = TestHub::start().await;
    hub.register("s", &["t"], &[]).await;
    let mut admin = hub.admin().await;
    for n in [0, 1001] {
        let req = proto::CreateDirectivesRequest {
            items: vec![item("s", "t", json!({})); n],
            include_payloads: false,
        };
        assert_code(
            admin.create_directives(authed(req, ADMIN_TOKEN)).await,
            Code::InvalidArgument,
            "items",
        );
    }
    assert!(hub.all_directives().await.is_empty());
}

#[tokio::test]
async fn a_create_directives_reply_too_large_with_payloads_comes_without_them() {
    let hub = TestHub::start_with(Settings {
        max_message_bytes: 64 * 1024,
        ..Settings::default()
    })
    .await;
    for n in 0..8 {
        hub.register(&format!("big{n}"), &["t"], &[]).await;
    }
    // A 10 kB payload fanned out to 8 spokes: the request fits the 64 KiB
    // limit, a reply echoing every payload would not.
    let blob = "x".repeat(10_000);
    let fan_out = proto::CreateDirectiveRequest {
        target: Some(proto::DirectiveTarget {
            target: Some(proto::directive_target::Target::AllSpokes(true)),
        }),
        r#type: "t".into(),
        payload: Some(json_struct(json!({ "blob": blob }))),
        ..Default::default()
    };
    let reply = hub
        .admin()
        .await
        .create_directives(authed(
            proto::CreateDirectivesRequest {
                items: vec![fan_out, item("big0", "t", json!({"n": 1}))],
                include_payloads: true,
            },
            ADMIN_TOKEN,
        ))
        .await
        .expect("committed work is reported, not failed")
        .into_inner();
    assert!(reply.payloads_omitted);
    assert!(!reply.directives_omitted);
    assert_eq!(created(&reply.results[0]).directives.len(), 8);
    assert_eq!(created(&reply.results[1]).directives.len(), 1);
    for result in &reply.results {
        for d in &created(result).directives {
            assert!(d.payload.is_none());
        }
    }
    let mut outstanding = 0;
    for n in 0..8 {
        outstanding += hub.spoke(&format!("big{n}")).await.outstanding_directives;
    }
    assert_eq!(outstanding, 9);

    // Small enough: the payloads are there when asked for.
    let reply = hub
        .admin()
        .await
        .create_directives(authed(
            proto::CreateDirectivesRequest {
                items: vec![item("big1", "t", json!({"small": true}))],
                include_payloads: true,
            },
            ADMIN_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!reply.payloads_omitted);
    let d = &created(&reply.results[0]).directives[0];
    assert_eq!(
        struct_json(d.payload.as_ref().unwrap()),
        json!({"small": true})
    );
}

#[tokio::test]
async fn an_ack_stream_ends_unauthenticated_once_its_key_is_revoked_or_rotated() {
    let hub = TestHub::start().await;
    for (name, revoke) in [("revoked", true), ("rotated", false)] {
        let mut spoke = hub.register(name, &["t"], &[]).await;
        let first = hub.send(name, "t", json!({})).await;
        let second = hub.send(name, "t", json!({})).await;
        let mut watch = spoke.watch().await;
        next_directive(&mut watch).await;
        next_directive(&mut watch).await;
        let mut acks = AckStream::open(&mut spoke).await;
        acks.send(ack(&first.id, proto::AckOutcome::Completed))
            .await;
        assert_eq!(
            state_of(&acks.answer().await),
            (proto::DirectiveState::Completed, false)
        );

        let mut admin = hub.admin().await;
        if revoke {
            let req = proto::RevokeSpokeRequest {
                spoke_name: name.into(),
                ..Default::default()
            };
            admin.revoke_spoke(authed(req, ADMIN_TOKEN)).await.unwrap();
        } else {
            let req = proto::RotateSpokeKeyRequest {
                spoke_name: name.into(),
                ..Default::default()
            };
            admin
                .rotate_spoke_key(authed(req, ADMIN_TOKEN))
                .await
                .unwrap();
        }
        acks.send(ack(&second.id, proto::AckOutcome::Completed))
            .await;
        let ended =
            tokio::time::timeout(std::time::Duration::from_secs(10), acks.answers.message())
                .await
                .expect("an answer within 10 s");
        assert_code(ended, Code::Unauthenticated, "");
        assert_eq!(
            hub.directive(&second.id).await.state,
            proto::DirectiveState::Delivered as i32,
            "the ack with the old key changed nothing"
        );
    }
}
