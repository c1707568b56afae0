//! Rate limits (issue 11, item 9): every SpokeService call draws on its
//! spoke's budget and past it is answered RESOURCE_EXHAUSTED with a
//! `retry-after-ms` hint; acks of directives the hub delivered are free;
//! failed authentications are throttled per address; enrollments have a
//! budget of their own. Budgets here are tiny and the wait is zero, so a
//! refusal comes at once; each loop allows for a slow machine refilling a
//! slot or two meanwhile.

use std::time::Duration;

use hub::Settings;
use hub::guard::GuardSettings;
use hub_proto::v1 as proto;
use tonic::{Code, Status};

use crate::support::*;

fn limited(guard: GuardSettings) -> Settings {
    Settings {
        guard: GuardSettings {
            rate_limit_wait: Duration::ZERO,
            ..guard
        },
        ..Settings::default()
    }
}

/// The hint a rate-limited answer carries, checked against its message.
fn retry_after_ms(status: &Status) -> u64 {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let ms: u64 = status
        .metadata()
        .get("retry-after-ms")
        .expect("a retry-after-ms entry")
        .to_str()
        .unwrap()
        .parse()
        .expect("a number of milliseconds");
    assert!(
        status.message().contains(&format!("retry after {ms} ms")),
        "{status:?}"
    );
    ms
}

fn ok_heartbeat() -> proto::HeartbeatRequest {
    proto::HeartbeatRequest {
        status: proto::SpokeStatus::Ok.into(),
        ..Default::default()
    }
}

/// Calls `call` until it is refused; the refusal. Panics if 20 calls pass.
/// The next answer on an AckStream; panics after 10 s.
async fn next(
    answers: &mut tonic::Streaming<proto::AckStreamResponse>,
) -> Result<Option<proto::AckStreamResponse>, Status> {
    tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await
        .expect("an answer within 10 s")
}

async fn until_refused<T, F, Fut>(mut call: F) -> Status
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    for _ in 0..20 {
        if let Err(status) = call().await {
            return status;
        }
    }
    panic!("20 calls in a row were not refused");
}

#[tokio::test]
async fn a_spoke_over_its_budget_is_refused_with_a_hint_other_spokes_are_not() {
    let hub = TestHub::start_with(limited(GuardSettings {
        spoke_rate: 1,
        spoke_burst: 3,
        ..GuardSettings::default()
    }))
    .await;
    let mut noisy = hub.register("noisy", &["work"], &[]).await;
    let mut quiet = hub.register("quiet", &["work"], &[]).await;

    let status = until_refused(|| {
        let req = noisy.req(ok_heartbeat());
        let mut client = noisy.client.clone();
        async move { client.heartbeat(req).await }
    })
    .await;
    let ms = retry_after_ms(&status);
    assert!(
        (1..=1000).contains(&ms),
        "at 1/s the next slot is within 1 s: {ms}"
    );
    assert!(status.message().contains("--spoke-rate"), "{status:?}");

    // Every call draws on the same budget.
    let poll = proto::PollDirectivesRequest::default();
    let refused = noisy
        .client
        .poll_directives(noisy.req(poll))
        .await
        .unwrap_err();
    retry_after_ms(&refused);
    let watch = proto::WatchDirectivesRequest {};
    let refused = noisy
        .client
        .watch_directives(noisy.req(watch))
        .await
        .unwrap_err();
    retry_after_ms(&refused);

    // Another spoke has its own.
    let hb = quiet.req(ok_heartbeat());
    quiet
        .client
        .heartbeat(hb)
        .await
        .expect("the quiet spoke is not limited");
}

#[tokio::test]
async fn acks_of_delivered_directives_are_free_refused_acks_are_not() {
    let hub = TestHub::start_with(limited(GuardSettings {
        spoke_rate: 1,
        spoke_burst: 3,
        ..GuardSettings::default()
    }))
    .await;
    let mut spoke = hub.register("worker", &["work"], &[]).await;
    let mut stream = spoke.watch().await;
    let mut ids = Vec::new();
    for n in 0..6 {
        hub.send("worker", "work", serde_json::json!({ "n": n }))
            .await;
        ids.push(next_directive(&mut stream).await.id);
    }
    // Six acks with a budget of three calls: all applied.
    for id in &ids {
        let acked = spoke
            .ack(id, proto::AckOutcome::Completed, serde_json::json!({}))
            .await
            .expect("an ack of a delivered directive is free");
        assert_eq!(acked.state, proto::DirectiveState::Completed as i32);
    }
    // Acks the hub refuses (here: of directives that do not exist) cost a
    // call each, until the budget is gone.
    let status = until_refused(|| {
        let req = spoke.req(proto::AckRequest {
            directive_id: uuid::Uuid::now_v7().to_string(),
            outcome: proto::AckOutcome::Completed.into(),
            result: Some(json_struct(serde_json::json!({}))),
            ..Default::default()
        });
        let mut client = spoke.client.clone();
        async move {
            match client.ack(req).await {
                Err(s) if s.code() == Code::NotFound => Ok(()),
                other => other.map(|_| ()),
            }
        }
    })
    .await;
    retry_after_ms(&status);
}

#[tokio::test]
async fn an_ack_stream_ends_resource_exhausted_when_refused_acks_exceed_the_budget() {
    let hub = TestHub::start_with(limited(GuardSettings {
        spoke_rate: 1,
        spoke_burst: 3,
        ..GuardSettings::default()
    }))
    .await;
    let mut spoke = hub.register("worker", &["work"], &[]).await;
    let mut stream = spoke.watch().await;
    let mut ids = Vec::new();
    for n in 0..6 {
        hub.send("worker", "work", serde_json::json!({ "n": n }))
            .await;
        ids.push(next_directive(&mut stream).await.id);
    }
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut answers = spoke
        .client
        .ack_stream(spoke.req(requests))
        .await
        .expect("the stream opens")
        .into_inner();
    let ack = |id: String| proto::AckRequest {
        directive_id: id,
        outcome: proto::AckOutcome::Completed.into(),
        result: Some(json_struct(serde_json::json!({}))),
        ..Default::default()
    };
    // Acks of delivered directives: free, however many.
    for id in &ids {
        tx.send(ack(id.clone())).await.unwrap();
        let answer = next(&mut answers).await.unwrap().expect("an answer");
        assert!(
            matches!(
                answer.outcome,
                Some(proto::ack_stream_response::Outcome::Ack(_))
            ),
            "{answer:?}"
        );
    }
    // Refused acks: answered NOT_FOUND while the budget lasts, then the
    // stream ends RESOURCE_EXHAUSTED with the hint.
    let mut refused = None;
    for _ in 0..20 {
        tx.send(ack(uuid::Uuid::now_v7().to_string()))
            .await
            .unwrap();
        match next(&mut answers).await {
            Ok(Some(answer)) => match answer.outcome {
                Some(proto::ack_stream_response::Outcome::Error(e)) => {
                    assert_eq!(e.code, Code::NotFound as i32, "{e:?}");
                }
                other => panic!("expected NOT_FOUND, got {other:?}"),
            },
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    let status = refused.expect("refused within 20 unknown acks");
    retry_after_ms(&status);
}

#[tokio::test]
async fn failed_authentications_are_throttled_per_address() {
    let hub = TestHub::start_with(limited(GuardSettings {
        auth_failure_limit: 3,
        auth_failure_window: Duration::from_secs(3600),
        ..GuardSettings::default()
    }))
    .await;
    let spoke = hub.register("worker", &["work"], &[]).await;
    let mut client = hub.spoke_client().await;
    for _ in 0..3 {
        let wrong = authed(ok_heartbeat(), "not-a-key");
        assert_code(
            client.heartbeat(wrong).await,
            Code::Unauthenticated,
            "unknown spoke key",
        );
    }
    // The address is now refused without a check: a wrong key, the right
    // key, and the admin token alike.
    let wrong = authed(ok_heartbeat(), "not-a-key");
    let status = client.heartbeat(wrong).await.unwrap_err();
    let ms = retry_after_ms(&status);
    assert!(ms > 60_000, "a third of an hour: {ms}");
    assert!(
        status.message().contains("failed authentications"),
        "{status:?}"
    );
    let right = spoke.req(ok_heartbeat());
    retry_after_ms(&client.heartbeat(right).await.unwrap_err());
    let list = authed(proto::ListSpokesRequest::default(), ADMIN_TOKEN);
    retry_after_ms(&hub.admin().await.list_spokes(list).await.unwrap_err());
    let enroll = authed(
        proto::RegisterRequest {
            name: "another".into(),
            ..Default::default()
        },
        ENROLLMENT_TOKEN,
    );
    retry_after_ms(&client.register(enroll).await.unwrap_err());
}

#[tokio::test]
async fn enrollments_have_a_budget_re_registration_does_not_use_it() {
    let hub = TestHub::start_with(limited(GuardSettings {
        enrollments_per_minute: 1,
        enrollment_burst: 2,
        ..GuardSettings::default()
    }))
    .await;
    let first = hub.register("first", &["work"], &[]).await;
    hub.register("second", &["work"], &[]).await;
    let mut client = hub.spoke_client().await;
    let register = |name: &str, token: &str| {
        authed(
            proto::RegisterRequest {
                name: name.into(),
                capabilities: vec![proto::Capability {
                    directive_type: "work".into(),
                    version: "1".into(),
                }],
                version: "1.0.0".into(),
                ..Default::default()
            },
            token,
        )
    };
    let status = client
        .register(register("third", ENROLLMENT_TOKEN))
        .await
        .unwrap_err();
    let ms = retry_after_ms(&status);
    assert!((1..=60_000).contains(&ms), "{ms}");
    assert!(status.message().contains("enrollments"), "{status:?}");
    // Nothing was created.
    let spokes = hub
        .admin()
        .await
        .list_spokes(authed(proto::ListSpokesRequest::default(), ADMIN_TOKEN))
        .await
        .unwrap()
        .into_inner()
        .spokes;
    assert_eq!(spokes.len(), 2, "{spokes:?}");
    // A spoke registering again with its key is not an enrollment.
    client
        .register(register("first", &first.key))
        .await
        .expect("re-registration");
}

#[tokio::test]
async fn a_one_batch_push_costs_one_call_and_its_retry_after_the_hint_is_taken() {
    let hub = TestHub::start_with(limited(GuardSettings {
        spoke_rate: 1,
        spoke_burst: 3,
        ..GuardSettings::default()
    }))
    .await;
    let mut spoke = hub.register("pusher", &[], &[]).await;
    let batch = |n: usize| proto::PushMetricsRequest {
        batch_id: format!("b{n}"),
        points: vec![crate::metrics::point("statistics", "orders", n as f64)],
    };
    // A burst of three calls is three one-batch pushes.
    for n in 0..3 {
        crate::metrics::push(&mut spoke, vec![batch(n)])
            .await
            .unwrap_or_else(|s| panic!("push {n} of a burst of 3: {s:?}"));
    }
    let mut n = 3;
    let refused = until_refused(|| {
        n += 1;
        let req = spoke.req(tokio_stream::iter(vec![batch(n)]));
        let mut client = spoke.client.clone();
        async move { client.push_metrics(req).await }
    })
    .await;
    let ms = retry_after_ms(&refused);
    // The hint says when one call fits again, and a push of one batch is
    // one call: waiting that long is enough.
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let reply = crate::metrics::push(&mut spoke, vec![batch(100)])
        .await
        .expect("the retry after the hinted delay is taken");
    assert_eq!(reply.batches[0].accepted_points, 1);
}
