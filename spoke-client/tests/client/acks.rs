//! How acks reach the hub: over one AckStream per connection, final acks
//! and progress reports alike; with unary Ack when the hub has no
//! AckStream, trying the stream again on the next connection; a refused
//! ack handled the same way on both paths; and a refused late ack sent
//! again when the hub delivers the directive again.

use std::time::Duration;

use hub_proto::v1 as proto;
use serde_json::{Value, json};
use spoke_client::{Client, Context};
use tokio::sync::{mpsc, watch};

use crate::older_hub::OlderHub;
use crate::support::*;

/// A spoke whose `step` handler reports progress, then completes with the
/// payload's `i`.
async fn stepper(name: &str, url: &str, dir: &std::path::Path) -> Client {
    spoke(name, url, dir)
        .concurrency(4)
        .handler("step", "1", |job: Value, ctx: Context| async move {
            ctx.progress(50, "halfway")
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(json!({"i": job["i"]}))
        })
        .build()
        .await
        .unwrap()
}

/// Sends `n` steps to `name` and checks each completes with its result
/// and its progress report, and is ACKED locally (the answer came back).
async fn steps_complete(hub: &TestHub, name: &str, state: &std::path::Path, n: u32) {
    let mut sent = Vec::new();
    for i in 0..n {
        sent.push((hub.send(name, "step", json!({"i": i})).await.id, i));
    }
    for (id, i) in &sent {
        let d = hub.final_state(id).await;
        assert_eq!(d.state, proto::DirectiveState::Completed as i32, "{d:?}");
        assert_eq!(json(&d.result), json!({"i": i}));
        assert_eq!(d.progress_message, "halfway");
        eventually("the answer to reach the spoke", || async {
            (local_status(state, id).await.as_deref() == Some("ACKED")).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_and_progress_reports_share_one_stream() {
    let hub = TestHub::start().await;
    let state = tempfile::tempdir().unwrap();
    let client = stepper("fast", &hub.url(), state.path()).await;
    let running = run(&client);
    hub.wait_connected("fast").await;

    steps_complete(&hub, "fast", state.path(), 10).await;
    assert_eq!(hub.rpc_count("AckStream").await, 1, "one stream");
    assert_eq!(hub.rpc_count("Ack").await, 0, "no unary Ack");
    client.shutdown();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_without_ack_stream_gets_unary_acks_and_the_next_connection_tries_again() {
    let mut hub = TestHub::start().await;
    let older = OlderHub::start(&hub.url()).await;
    let state = tempfile::tempdir().unwrap();
    let client = stepper("legacy", &older.url(), state.path()).await;
    let running = run(&client);
    hub.wait_connected("legacy").await;

    steps_complete(&hub, "legacy", state.path(), 3).await;
    assert_eq!(older.refused(), 1, "asked once for the connection");
    assert_eq!(hub.rpc_count("AckStream").await, 0);
    assert_eq!(
        hub.rpc_count("Ack").await,
        6,
        "3 progress reports, 3 final acks"
    );

    // A new connection (the hub behind the front restarted) may reach a
    // newer hub: its first ack asks for the stream again.
    hub.restart().await;
    hub.wait_connected("legacy").await;
    steps_complete(&hub, "legacy", state.path(), 1).await;
    assert_eq!(older.refused(), 2);
    assert_eq!(hub.rpc_count("Ack").await, 2);
    client.shutdown();
    running.await.unwrap().unwrap();
}

/// A handler finishes after the hub gave up on its directive (attempts
/// exhausted): the hub refuses the late ack with FAILED_PRECONDITION, the
/// spoke closes its record, and the hub's outcome stands.
async fn a_refused_ack_closes_the_local_record(hub: &TestHub, url: &str) {
    let state = tempfile::tempdir().unwrap();
    let (started_tx, mut started) = mpsc::channel::<String>(1);
    let (release, released) = watch::channel(false);
    let client = spoke("late", url, state.path())
        .handler("slow", "1", move |_: Value, ctx: Context| {
            let (started, mut released) = (started_tx.clone(), released.clone());
            async move {
                started.send(ctx.id().to_owned()).await.unwrap();
                released.wait_for(|r| *r).await.unwrap();
                Ok::<_, String>(json!({"late": true}))
            }
        })
        .build()
        .await
        .unwrap();
    let running = run(&client);
    hub.wait_connected("late").await;
    let mut req = create_for("late", "slow", json!({}));
    req.max_attempts = 1;
    let d = hub.create(req).await;
    assert_eq!(started.recv().await.unwrap(), d.id);

    let deadline = hub.settings().ack_deadline;
    hub.settings()
        .clock
        .advance(deadline + Duration::from_secs(1));
    let failed = hub.final_state(&d.id).await;
    assert_eq!(failed.state, proto::DirectiveState::Failed as i32);
    release.send_replace(true);
    eventually("the local record to close", || async {
        (local_status(state.path(), &d.id).await.as_deref() == Some("CLOSED")).then_some(())
    })
    .await;
    assert_eq!(
        hub.directive(&d.id).await,
        failed,
        "the late ack changed nothing"
    );
    client.shutdown();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_on_the_stream_closes_the_record() {
    let hub = TestHub::start_with(manual_clock()).await;
    a_refused_ack_closes_the_local_record(&hub, &hub.url()).await;
    assert_eq!(hub.rpc_count("Ack").await, 0, "refused on the stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_of_a_unary_ack_closes_the_record() {
    let hub = TestHub::start_with(manual_clock()).await;
    let older = OlderHub::start(&hub.url()).await;
    a_refused_ack_closes_the_local_record(&hub, &older.url()).await;
    assert_eq!(
        hub.rpc_count("AckStream").await,
        0,
        "refused as a unary Ack"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_ack_refused_is_sent_again_on_the_redelivery_and_nothing_runs_again() {
    let hub = TestHub::start_with(manual_clock()).await;
    let older = OlderHub::start(&hub.url()).await;
    let state = tempfile::tempdir().unwrap();
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = runs.clone();
    let (started_tx, mut started) = mpsc::channel::<String>(1);
    let (release, released) = watch::channel(false);
    let client = spoke("late", &older.url(), state.path())
        .handler("slow", "1", move |_: Value, ctx: Context| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (started, mut released) = (started_tx.clone(), released.clone());
            async move {
                started.send(ctx.id().to_owned()).await.unwrap();
                released.wait_for(|r| *r).await.unwrap();
                Ok::<_, String>(json!({"attempt": ctx.attempt()}))
            }
        })
        .build()
        .await
        .unwrap();
    let running = run(&client);
    hub.wait_connected("late").await;
    let mut req = create_for("late", "slow", json!({}));
    req.max_attempts = 2;
    let d = hub.create(req).await;
    assert_eq!(started.recv().await.unwrap(), d.id);

    // The handler finishes; the hub in front refuses its final ack as
    // late (an older hub did so while the directive waited to be
    // delivered again), and the real hub never hears of it.
    older.refuse_acks(true);
    release.send_replace(true);
    eventually("the final ack refused", || async {
        (local_status(state.path(), &d.id).await.as_deref() == Some("CLOSED")).then_some(())
    })
    .await;
    older.refuse_acks(false);
    assert_eq!(older.refused_acks(), 1);

    // Its ack deadline passed, the hub delivers it again: the recorded
    // outcome is acked again, and taken.
    let deadline = hub.settings().ack_deadline;
    hub.settings()
        .clock
        .advance(deadline + Duration::from_secs(1));
    let done = hub.final_state(&d.id).await;
    assert_eq!(
        done.state,
        proto::DirectiveState::Completed as i32,
        "{done:?}"
    );
    assert_eq!(
        (done.attempt, json(&done.result)),
        (2, json!({"attempt": 1}))
    );
    eventually("the ack confirmed locally", || async {
        (local_status(state.path(), &d.id).await.as_deref() == Some("ACKED")).then_some(())
    })
    .await;
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    client.shutdown();
    running.await.unwrap().unwrap();
}
