//! Directives beyond the handler limit: the window asked of the hub matches
//! the concurrency by default, so the rest wait at the hub with no deadline
//! running; and when the application asks for a larger window, the ones
//! waiting here for a free handler have their deadlines renewed. Either
//! way, waiting never costs a directive an attempt.
//!
//! The hub runs on a manual clock: the test moves it past the directives'
//! ack deadlines in steps, each after the renewals of the running ones
//! reached the hub, so only a directive nobody renews can miss its
//! deadline.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hub_proto::v1 as proto;
use serde_json::{Value, json};
use spoke_client::{Client, Context};
use tokio::sync::watch;

use crate::support::*;

const DEADLINE: Duration = Duration::from_secs(2);

type Runs = Arc<Mutex<HashMap<String, u32>>>;

/// A spoke whose `slow` handler counts its runs and waits for `release`.
fn slow_spoke(
    hub: &TestHub,
    state: &std::path::Path,
    runs: &Runs,
    release: &watch::Receiver<bool>,
) -> spoke_client::ClientBuilder {
    let (runs, release) = (runs.clone(), release.clone());
    spoke("slow", &hub.url(), state).handler("slow", "1", move |_: Value, ctx: Context| {
        *runs.lock().unwrap().entry(ctx.id().to_owned()).or_default() += 1;
        let mut release = release.clone();
        async move {
            release.wait_for(|r| *r).await.unwrap();
            Ok::<_, String>(json!({"attempt": ctx.attempt()}))
        }
    })
}

/// Creates `n` directives with a short deadline and a single attempt: one
/// missed deadline fails them.
async fn create(hub: &TestHub, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let mut req = create_for("slow", "slow", json!({"n": i}));
        req.ack_deadline = Some(pbjson_types::Duration {
            seconds: DEADLINE.as_secs() as i64,
            nanos: 0,
        });
        req.max_attempts = 1;
        ids.push(hub.create(req).await.id);
    }
    ids
}

fn ms(t: &Option<pbjson_types::Timestamp>) -> i64 {
    let t = t.as_ref().expect("a timestamp");
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

/// Moves the hub's clock past the deadline in steps of a quarter of it;
/// before each step, waits until every directive in `renewed` was renewed
/// at the hub's current time.
async fn pass_the_deadline(hub: &TestHub, renewed: &HashSet<String>) {
    for _ in 0..5 {
        let now = hub.settings().clock.now_ms();
        for id in renewed {
            eventually(&format!("{id} renewed"), || async {
                let d = hub.directive(id).await;
                (ms(&d.updated_at) >= now).then_some(())
            })
            .await;
        }
        hub.settings().clock.advance(DEADLINE / 4);
    }
}

/// Asserts that none of `ids` is FAILED now, releases the handlers, and
/// asserts that each completes after one run.
async fn none_failed_then_all_complete(
    hub: &TestHub,
    ids: &[String],
    runs: &Runs,
    release: &watch::Sender<bool>,
) {
    for id in ids {
        let d = hub.directive(id).await;
        assert_ne!(
            d.state,
            proto::DirectiveState::Failed as i32,
            "failed while waiting for a handler: {d:?}"
        );
    }
    release.send_replace(true);
    for id in ids {
        let d = hub.final_state(id).await;
        assert_eq!(d.state, proto::DirectiveState::Completed as i32, "{d:?}");
        assert_eq!(json(&d.result), json!({"attempt": 1}));
    }
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), ids.len());
    assert!(runs.values().all(|n| *n == 1), "none ran twice: {runs:?}");
}

/// The ids of the directives whose handlers run now, once `n` of them do.
async fn running(runs: &Runs, client: &Client, n: usize) -> HashSet<String> {
    eventually(&format!("{n} handlers running"), || async {
        let started: HashSet<String> = runs.lock().unwrap().keys().cloned().collect();
        (client.status().in_flight_directives == n as u64 && started.len() == n).then_some(started)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_defaults_directives_beyond_the_handler_limit_wait_at_the_hub_and_all_complete() {
    let hub = TestHub::start_with(manual_clock()).await;
    let state = tempfile::tempdir().unwrap();
    let runs = Runs::default();
    let (release, released) = watch::channel(false);
    // Default concurrency (8), default window.
    let client = slow_spoke(&hub, state.path(), &runs, &released)
        .build()
        .await
        .unwrap();
    let running_client = run(&client);
    hub.wait_connected("slow").await;
    let ids = create(&hub, 12).await;

    let started = running(&runs, &client, 8).await;
    assert_eq!(started.len(), 8);
    // The hub delivered no more than can run.
    let delivered = ids.len() - started.len();
    for id in ids.iter().filter(|id| !started.contains(*id)) {
        let d = hub.directive(id).await;
        assert_eq!(
            d.state,
            proto::DirectiveState::Pending as i32,
            "{delivered} directives should wait at the hub: {d:?}"
        );
    }
    assert_eq!(client.status().pending_directives, 0);

    // Longer than the deadline (and the one attempt) while they wait.
    pass_the_deadline(&hub, &started).await;
    none_failed_then_all_complete(&hub, &ids, &runs, &release).await;

    client.shutdown();
    running_client.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directives_queued_behind_a_larger_window_are_renewed_while_they_wait() {
    let hub = TestHub::start_with(manual_clock()).await;
    let state = tempfile::tempdir().unwrap();
    let runs = Runs::default();
    let (release, released) = watch::channel(false);
    let client = slow_spoke(&hub, state.path(), &runs, &released)
        .concurrency(2)
        .max_in_flight(6)
        .build()
        .await
        .unwrap();
    let running_client = run(&client);
    hub.wait_connected("slow").await;
    let ids = create(&hub, 6).await;

    let started = running(&runs, &client, 2).await;
    eventually("4 directives queued here", || async {
        (client.status().pending_directives == 4).then_some(())
    })
    .await;

    // Every delivered directive, queued or running, is renewed.
    let all: HashSet<String> = ids.iter().cloned().collect();
    pass_the_deadline(&hub, &all).await;
    for id in ids.iter().filter(|id| !started.contains(*id)) {
        let d = hub.directive(id).await;
        assert_eq!(
            (d.state, d.progress_message.as_str()),
            (
                proto::DirectiveState::InProgress as i32,
                "queued: waiting for a free handler slot"
            ),
            "{d:?}"
        );
    }
    none_failed_then_all_complete(&hub, &ids, &runs, &release).await;

    client.shutdown();
    running_client.await.unwrap().unwrap();
}
