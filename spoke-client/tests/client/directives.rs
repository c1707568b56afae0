//! Directives reach their handlers exactly once: the backlog after being
//! offline, typed payloads, results and errors, unknown types, a
//! redelivery while the outcome is being recorded, and the hub's cancel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use hub_proto::v1 as proto;
use serde::Deserialize;
use serde_json::{Value, json};
use spoke_client::{Context, Point};
use tokio::sync::{mpsc, watch};

use crate::support::*;

#[derive(Deserialize)]
struct SyncDoc {
    doc: String,
    pages: u32,
}

#[derive(Deserialize)]
struct AiTask {
    prompt: String,
    fail: bool,
}

type Runs = Arc<Mutex<HashMap<String, u32>>>;

fn count(runs: &Runs, ctx: &Context) {
    *runs.lock().unwrap().entry(ctx.id().to_owned()).or_default() += 1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directives_created_while_offline_are_all_handled_once() {
    let hub = TestHub::start().await;
    let state = tempfile::tempdir().unwrap();

    // First start: register with both types, then go away.
    let first = spoke("billing", &hub.url(), state.path())
        .handler("sync_doc", "1", |_: Value, _| async { Ok::<_, String>(()) })
        .handler("ai_task", "1", |_: Value, _| async { Ok::<_, String>(()) })
        .build()
        .await
        .unwrap();
    let running = run(&first);
    connected(&first).await;
    first.shutdown();
    running.await.unwrap().unwrap();

    // While it is offline.
    let mut docs = Vec::new();
    for i in 0..20u32 {
        let d = hub
            .send(
                "billing",
                "sync_doc",
                json!({"doc": format!("inv-{i}"), "pages": i}),
            )
            .await;
        docs.push((d.id, i));
    }
    let good = hub
        .send(
            "billing",
            "ai_task",
            json!({"prompt": "sum", "fail": false}),
        )
        .await;
    let bad = hub
        .send(
            "billing",
            "ai_task",
            json!({"prompt": "riddle", "fail": true}),
        )
        .await;
    let mut unknown = create_for("billing", "reindex", json!({}));
    unknown.force = true;
    let unknown = hub.create(unknown).await;

    // Second start, same state directory: typed handlers counting runs.
    let runs = Runs::default();
    let (r1, r2) = (runs.clone(), runs.clone());
    let client = spoke("billing", &hub.url(), state.path())
        .concurrency(3)
        .handler("sync_doc", "1", move |job: SyncDoc, ctx: Context| {
            count(&r1, &ctx);
            async move {
                Ok::<_, String>(
                    json!({"doc": job.doc, "pages": job.pages, "attempt": ctx.attempt()}),
                )
            }
        })
        .handler("ai_task", "2", move |job: AiTask, ctx: Context| {
            count(&r2, &ctx);
            async move {
                if job.fail {
                    Err(format!("the model could not answer {:?}", job.prompt))
                } else {
                    Ok(json!({"answer": 42}))
                }
            }
        })
        .build()
        .await
        .unwrap();
    let running = run(&client);

    for (id, i) in &docs {
        let d = hub.final_state(id).await;
        assert_eq!(d.state, proto::DirectiveState::Completed as i32, "{d:?}");
        assert_eq!(
            json(&d.result),
            json!({"doc": format!("inv-{i}"), "pages": i, "attempt": 1})
        );
    }
    let d = hub.final_state(&good.id).await;
    assert_eq!(
        (d.state, json(&d.result)),
        (
            proto::DirectiveState::Completed as i32,
            json!({"answer": 42})
        )
    );
    let d = hub.final_state(&bad.id).await;
    assert_eq!(d.state, proto::DirectiveState::Failed as i32);
    assert_eq!(d.error, "the model could not answer \"riddle\"");
    let d = hub.final_state(&unknown.id).await;
    assert_eq!(d.state, proto::DirectiveState::Rejected as i32);
    assert!(
        d.error
            .contains("no handler for directive type \"reindex\""),
        "{}",
        d.error
    );

    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 22, "every handled directive ran");
    assert!(runs.values().all(|n| *n == 1), "none ran twice: {runs:?}");

    client.shutdown();
    running.await.unwrap().unwrap();
    let status = client.status();
    assert!(!status.connected);
    assert_eq!(
        (status.in_flight_directives, status.pending_directives),
        (0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_longer_than_the_ack_deadline_is_kept_alive_not_redelivered() {
    let hub = TestHub::start().await;
    let state = tempfile::tempdir().unwrap();
    let runs = Runs::default();
    let counted = runs.clone();
    let client = spoke("slow", &hub.url(), state.path())
        .handler("crunch", "1", move |_: Value, ctx: Context| {
            count(&counted, &ctx);
            async move {
                ctx.progress(10, "warming up").await.unwrap();
                // Two and a half ack deadlines of two seconds each (the
                // client renews at half the deadline: a second of slack on
                // a busy machine).
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                Ok::<_, String>(json!({"attempt": ctx.attempt()}))
            }
        })
        .build()
        .await
        .unwrap();
    let running = run(&client);
    hub.wait_connected("slow").await;
    let mut req = create_for("slow", "crunch", json!({}));
    req.ack_deadline = Some(pbjson_types::Duration {
        seconds: 2,
        nanos: 0,
    });
    req.max_attempts = 2;
    let d = hub.create(req).await;
    let d = hub.final_state(&d.id).await;
    assert_eq!(d.state, proto::DirectiveState::Completed as i32, "{d:?}");
    assert_eq!((d.attempt, json(&d.result)), (1, json!({"attempt": 1})));
    assert_eq!(
        d.progress_message, "warming up",
        "renewals repeat the latest progress"
    );
    assert_eq!(runs.lock().unwrap()[&d.id], 1);
    client.shutdown();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_cancel_reaches_the_running_handler() {
    let hub = TestHub::start().await;
    let state = tempfile::tempdir().unwrap();
    let (started_tx, mut started) = mpsc::channel::<String>(1);
    let (seen_tx, mut seen) = mpsc::channel::<Option<String>>(1);
    let client = spoke("docs", &hub.url(), state.path())
        .handler("long_job", "1", move |_: Value, ctx: Context| {
            let (started, seen) = (started_tx.clone(), seen_tx.clone());
            async move {
                started.send(ctx.id().to_owned()).await.unwrap();
                ctx.cancelled().await;
                seen.send(ctx.cancel_reason()).await.unwrap();
                Err::<(), _>("stopped on cancel")
            }
        })
        .build()
        .await
        .unwrap();
    let running = run(&client);
    hub.wait_connected("docs").await;

    let d = hub.send("docs", "long_job", json!({})).await;
    assert_eq!(started.recv().await.unwrap(), d.id);
    hub.cancel(&d.id, "wrong document")
        .await
        .expect("CancelDirective");
    let reason = seen.recv().await.unwrap().expect("a reason");
    assert!(reason.contains("wrong document"), "{reason}");

    let d = hub.final_state(&d.id).await;
    assert_eq!(d.state, proto::DirectiveState::Cancelled as i32);
    eventually("the local record to close", || async {
        (local_status(state.path(), &d.id).await.as_deref() == Some("CLOSED")).then_some(())
    })
    .await;
    client.shutdown();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_while_the_outcome_is_recorded_runs_nothing_again() {
    let hub = TestHub::start_with(manual_clock()).await;
    let state = tempfile::tempdir().unwrap();
    let runs = Runs::default();
    let counted = runs.clone();
    let (paused_tx, mut paused) = mpsc::channel::<String>(4);
    let (release, released) = watch::channel(false);
    let client = spoke("once", &hub.url(), state.path())
        .handler("charge", "1", move |_: Value, ctx: Context| {
            count(&counted, &ctx);
            async move {
                // Measured on the hub's (manual) clock: it takes no point
                // from too far in the past.
                let at = UNIX_EPOCH + Duration::from_millis(MANUAL_CLOCK_MS as u64);
                ctx.record_point(Point::new("compensation", "charged", 12.5).at(at));
                Ok::<_, String>(json!({"attempt": ctx.attempt()}))
            }
        })
        .pause_before_outcome(move |id| {
            let (paused, mut released) = (paused_tx.clone(), released.clone());
            async move {
                paused.send(id).await.unwrap();
                released.wait_for(|r| *r).await.unwrap();
            }
        })
        .build()
        .await
        .unwrap();
    let running = run(&client);
    hub.wait_connected("once").await;
    let mut req = create_for("once", "charge", json!({}));
    req.max_attempts = 3;
    let d = hub.create(req).await;
    assert_eq!(paused.recv().await.unwrap(), d.id);

    // The handler returned and its outcome is not recorded yet when the
    // hub, its ack deadline passed, delivers the directive again.
    let deadline = hub.settings().ack_deadline;
    hub.settings()
        .clock
        .advance(deadline + Duration::from_secs(1));
    let answered = eventually("the redelivery answered", || async {
        let again = hub.directive(&d.id).await;
        let in_progress = proto::DirectiveState::InProgress as i32;
        let ran_again = runs.lock().unwrap().get(&d.id) > Some(&1);
        (again.attempt == 2 && again.state == in_progress || ran_again).then_some(again)
    })
    .await;
    assert_eq!(
        runs.lock().unwrap()[&d.id],
        1,
        "the redelivery started a second run: {answered:?}"
    );
    assert_eq!(answered.state, proto::DirectiveState::InProgress as i32);

    release.send_replace(true);
    let done = hub.final_state(&d.id).await;
    assert_eq!(
        done.state,
        proto::DirectiveState::Completed as i32,
        "{done:?}"
    );
    assert_eq!(json(&done.result), json!({"attempt": 1}));
    assert_eq!(hub.completions().await.get(&d.id), Some(&1));
    // The point went to the buffer with the outcome, before the ack.
    let report = client.flush().await.unwrap();
    assert_eq!(report.rejected_points, 0, "{report:?}");
    assert_eq!(
        hub.points("once").await.len(),
        1,
        "the run's one point, once"
    );
    assert_eq!(runs.lock().unwrap()[&d.id], 1);
    client.shutdown();
    running.await.unwrap().unwrap();
}
