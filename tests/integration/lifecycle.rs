//! Acks, fan-out creates and directive listings.

use std::collections::HashSet;

use hub_proto::v1 as proto;
use hub_proto::v1::directive_target::Target;
use serde_json::json;
use tonic::Code;

use crate::support::*;

#[tokio::test]
async fn acks_move_a_directive_to_its_final_state_once() {
    let hub = TestHub::start().await;
    let mut spoke = hub.register("worker", &["sync_doc"], &[]).await;
    let d = hub.send("worker", "sync_doc", json!({"doc": "a"})).await;
    let mut stream = spoke.watch().await;
    assert_eq!(next_directive(&mut stream).await.id, d.id);

    let progress = spoke.req(proto::AckRequest {
        directive_id: d.id.clone(),
        outcome: proto::AckOutcome::InProgress.into(),
        progress: Some(40),
        progress_message: "halfway-ish".into(),
        ..Default::default()
    });
    let res = spoke.client.ack(progress).await.unwrap().into_inner();
    assert_eq!(res.state, proto::DirectiveState::InProgress as i32);
    let now = hub.directive(&d.id).await;
    assert_eq!(now.state, proto::DirectiveState::InProgress as i32);
    assert_eq!(
        (now.progress, now.progress_message.as_str()),
        (40, "halfway-ish")
    );

    let res = spoke
        .ack(&d.id, proto::AckOutcome::Completed, json!({"pages": 12}))
        .await
        .unwrap();
    assert_eq!(res.state, proto::DirectiveState::Completed as i32);
    assert!(!res.duplicate);
    let done = hub.directive(&d.id).await;
    assert_eq!(done.state, proto::DirectiveState::Completed as i32);
    assert_eq!(
        struct_json(done.result.as_ref().unwrap()),
        json!({"pages": 12})
    );
    assert!(done.ack_due_at.is_none());

    // The same final ack again: OK, nothing changes.
    let res = spoke
        .ack(&d.id, proto::AckOutcome::Completed, json!({"pages": 99}))
        .await
        .unwrap();
    assert!(res.duplicate);
    assert_eq!(res.state, proto::DirectiveState::Completed as i32);
    let still = hub.directive(&d.id).await;
    assert_eq!(
        struct_json(still.result.as_ref().unwrap()),
        json!({"pages": 12})
    );
    assert_eq!(still.updated_at, done.updated_at);

    // A different final outcome, or going back to work: refused, naming the state.
    assert_code(
        spoke.ack(&d.id, proto::AckOutcome::Failed, json!({})).await,
        Code::FailedPrecondition,
        "COMPLETED",
    );
    assert_code(
        spoke
            .ack(&d.id, proto::AckOutcome::InProgress, json!({}))
            .await,
        Code::FailedPrecondition,
        "COMPLETED",
    );
    assert_eq!(hub.directive(&d.id).await, still);
}

#[tokio::test]
async fn failed_and_rejected_acks_keep_the_error() {
    let hub = TestHub::start().await;
    let mut spoke = hub.register("worker", &["a", "b"], &[]).await;
    let a = hub.send("worker", "a", json!({})).await;
    let b = hub.send("worker", "b", json!({})).await;
    let mut stream = spoke.watch().await;
    next_directive(&mut stream).await;
    next_directive(&mut stream).await;
    spoke
        .ack(&a.id, proto::AckOutcome::Failed, json!({}))
        .await
        .unwrap();
    spoke
        .ack(&b.id, proto::AckOutcome::Rejected, json!({}))
        .await
        .unwrap();
    let a = hub.directive(&a.id).await;
    assert_eq!(
        (a.state, a.error.as_str()),
        (proto::DirectiveState::Failed as i32, "it broke")
    );
    let b = hub.directive(&b.id).await;
    assert_eq!(
        (b.state, b.error.as_str()),
        (proto::DirectiveState::Rejected as i32, "it broke")
    );
}

#[tokio::test]
async fn fan_out_makes_one_directive_per_matching_spoke_in_one_group() {
    let hub = TestHub::start().await;
    let eu1 = hub
        .register("eu-1", &["sync_doc"], &[("region", "eu")])
        .await;
    let eu2 = hub
        .register("eu-2", &["sync_doc"], &[("region", "eu"), ("tier", "gold")])
        .await;
    let _eu3 = hub.register("eu-3", &["other"], &[("region", "eu")]).await;
    let _us = hub
        .register("us-1", &["sync_doc"], &[("region", "us")])
        .await;

    let req = proto::CreateDirectiveRequest {
        target: Some(proto::DirectiveTarget {
            target: Some(Target::Selector(proto::LabelSelector {
                match_labels: [("region".to_string(), "eu".to_string())].into(),
            })),
        }),
        r#type: "sync_doc".into(),
        payload: Some(json_struct(json!({"doc": "policy"}))),
        ..Default::default()
    };
    let res = hub.create(req).await;
    assert_eq!(res.skipped_spokes, 1, "eu-3 did not declare sync_doc");
    let spokes: HashSet<_> = res.directives.iter().map(|d| d.spoke_id.clone()).collect();
    assert_eq!(spokes, HashSet::from([eu1.id.clone(), eu2.id.clone()]));
    assert!(res.directives.iter().all(|d| d.group_id == res.group_id));

    let all = proto::CreateDirectiveRequest {
        target: Some(proto::DirectiveTarget {
            target: Some(Target::AllSpokes(true)),
        }),
        r#type: "sync_doc".into(),
        force: true,
        ..Default::default()
    };
    let res = hub.create(all).await;
    assert_eq!(res.directives.len(), 4, "force includes eu-3");
    assert_eq!(res.skipped_spokes, 0);

    let by_group = proto::ListDirectivesRequest {
        group_id: res.group_id.clone(),
        ..Default::default()
    };
    let listed = hub
        .admin()
        .await
        .list_directives(authed(by_group, ADMIN_TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.directives.len(), 4);
}

#[tokio::test]
async fn capability_check_and_idempotency_key() {
    let hub = TestHub::start().await;
    hub.register("worker", &["sync_doc"], &[]).await;
    let mut admin = hub.admin().await;
    assert_code(
        admin
            .create_directive(authed(
                create_for("worker", "ai_task", json!({})),
                ADMIN_TOKEN,
            ))
            .await,
        Code::FailedPrecondition,
        "ai_task",
    );
    let mut forced = create_for("worker", "ai_task", json!({}));
    forced.force = true;
    assert_eq!(hub.create(forced).await.directives.len(), 1);

    let mut keyed = create_for("worker", "sync_doc", json!({"v": 1}));
    keyed.idempotency_key = "deploy-42".into();
    let first = hub.create(keyed.clone()).await;
    let second = hub.create(keyed).await;
    assert!(!first.idempotent_replay);
    assert!(second.idempotent_replay);
    assert_eq!(first.directives, second.directives);
    assert_eq!(
        hub.all_directives().await.len(),
        2,
        "the repeat created nothing"
    );
}

#[tokio::test]
async fn list_directives_filters_and_pages() {
    let hub = TestHub::start().await;
    let mut a = hub.register("a", &["x", "y"], &[]).await;
    hub.register("b", &["x"], &[]).await;
    let mut made = Vec::new();
    for i in 0..5 {
        made.push(hub.send("a", "x", json!({"i": i})).await.id);
    }
    let y = hub.send("a", "y", json!({})).await;
    hub.send("b", "x", json!({})).await;
    let mut stream = a.watch().await;
    for _ in 0..6 {
        next_directive(&mut stream).await;
    }
    a.ack(&y.id, proto::AckOutcome::Completed, json!({}))
        .await
        .unwrap();

    let mut admin = hub.admin().await;
    let list = |req: proto::ListDirectivesRequest| {
        let req = authed(req, ADMIN_TOKEN);
        let mut admin = admin.clone();
        async move { admin.list_directives(req).await.unwrap().into_inner() }
    };
    let of_a = list(proto::ListDirectivesRequest {
        spoke_name: "a".into(),
        r#type: "x".into(),
        page_size: 2,
        ..Default::default()
    })
    .await;
    assert_eq!(of_a.directives.len(), 2);
    let mut paged: Vec<String> = of_a.directives.iter().map(|d| d.id.clone()).collect();
    let mut token = of_a.next_page_token;
    while !token.is_empty() {
        let page = list(proto::ListDirectivesRequest {
            spoke_name: "a".into(),
            r#type: "x".into(),
            page_size: 2,
            page_token: token,
            ..Default::default()
        })
        .await;
        paged.extend(page.directives.iter().map(|d| d.id.clone()));
        token = page.next_page_token;
    }
    made.reverse();
    assert_eq!(paged, made, "newest first, every page, nothing twice");

    let completed = list(proto::ListDirectivesRequest {
        state: proto::DirectiveState::Completed.into(),
        ..Default::default()
    })
    .await;
    assert_eq!(completed.directives.len(), 1);
    assert_eq!(completed.directives[0].id, y.id);
    assert_code(
        admin
            .list_directives(authed(
                proto::ListDirectivesRequest {
                    spoke_name: "nobody".into(),
                    ..Default::default()
                },
                ADMIN_TOKEN,
            ))
            .await,
        Code::NotFound,
        "nobody",
    );
}
