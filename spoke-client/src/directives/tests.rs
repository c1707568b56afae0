//! Directive handling without a hub: dedup, cancel, panics, bounds.

use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::handler::{self, Context};

fn directive(id: &str, kind: &str) -> proto::Directive {
    proto::Directive {
        id: id.into(),
        r#type: kind.into(),
        attempt: 1,
        payload: Some(crate::wire::struct_of_json(serde_json::json!({"n": 1}))),
        ..Default::default()
    }
}

async fn setup(
    handlers: Vec<(&str, BoxHandler)>,
    concurrency: usize,
) -> (Directives, Store, tempfile::TempDir) {
    setup_observed(handlers, concurrency, None).await
}

async fn setup_observed(
    handlers: Vec<(&str, BoxHandler)>,
    concurrency: usize,
    observer: Option<Observer>,
) -> (Directives, Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    let handlers = handlers
        .into_iter()
        .map(|(k, h)| (k.to_owned(), h))
        .collect();
    // No hub: every ack fails with NotConnected and the outcome stays
    // FINISHED, which is what these tests look at.
    let link = Link::new(Duration::from_secs(1));
    let d = Directives::new(
        handlers,
        store.clone(),
        link,
        Buffer::detached(),
        Tracker::default(),
        concurrency,
        observer,
    );
    (d, store, dir)
}

async fn settle(d: &Directives) {
    d.drain(Duration::from_secs(60)).await;
}

async fn status_of(store: &Store, id: &str) -> (LocalStatus, Option<Outcome>) {
    let rec = store.directive(id).await.unwrap().unwrap();
    (rec.status, rec.outcome)
}

#[tokio::test]
async fn a_hub_cancel_fires_the_running_handlers_signal() {
    let (started_tx, mut started) = mpsc::channel::<()>(1);
    let h = handler::boxed(move |_: serde_json::Value, ctx: Context| {
        let started = started_tx.clone();
        async move {
            started.send(()).await.unwrap();
            ctx.cancelled().await;
            Err::<(), _>(ctx.cancel_reason().unwrap())
        }
    });
    let (d, store, _dir) = setup(vec![("slow", h)], 4).await;
    d.receive(directive("d1", "slow")).await.unwrap();
    started.recv().await.unwrap();
    assert_eq!(status_of(&store, "d1").await.0, LocalStatus::Running);
    d.cancel("d1", "operator changed their mind");
    settle(&d).await;
    let rec = store.directive("d1").await.unwrap().unwrap();
    assert_eq!(
        rec.status,
        LocalStatus::Closed,
        "no ack is sent for a cancelled directive"
    );
}

#[tokio::test]
async fn unknown_types_are_rejected_and_panics_fail() {
    let boom = handler::boxed(|_: serde_json::Value, _ctx| async {
        if true {
            panic!("boom");
        }
        Ok::<(), String>(())
    });
    let (d, store, _dir) = setup(vec![("boom", boom)], 4).await;
    d.receive(directive("d1", "nobody_handles_this"))
        .await
        .unwrap();
    d.receive(directive("d2", "boom")).await.unwrap();
    settle(&d).await;
    assert_eq!(
        status_of(&store, "d1").await,
        (
            LocalStatus::Finished,
            Some(Outcome::Rejected(
                "no handler for directive type \"nobody_handles_this\"".into()
            ))
        )
    );
    assert_eq!(
        status_of(&store, "d2").await,
        (
            LocalStatus::Finished,
            Some(Outcome::Failed("handler panicked: boom".into()))
        )
    );
}

#[tokio::test]
async fn a_finished_directive_delivered_again_is_not_run_again() {
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let h = handler::boxed(move |_: serde_json::Value, _ctx| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, String>(serde_json::json!({"done": true})) }
    });
    let (d, store, _dir) = setup(vec![("t", h)], 4).await;
    d.receive(directive("d1", "t")).await.unwrap();
    settle(&d).await;
    let mut again = directive("d1", "t");
    again.attempt = 2;
    d.receive(again).await.unwrap();
    settle(&d).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        status_of(&store, "d1").await,
        (
            LocalStatus::Finished,
            Some(Outcome::Completed(serde_json::json!({"done": true})))
        )
    );
}

#[tokio::test]
async fn the_observer_hears_of_each_recorded_outcome_and_each_redelivery() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let heard = events.clone();
    let observer: Observer = Arc::new(move |e: &Event| heard.lock().unwrap().push(e.clone()));
    #[derive(serde::Deserialize)]
    struct Job {
        n: String,
    }
    let typed = handler::boxed(|job: Job, _ctx| async move { Ok::<_, String>(job.n) });
    let ok = handler::boxed(|_: serde_json::Value, _ctx| async { Ok::<_, String>(()) });
    let (d, store, _dir) =
        setup_observed(vec![("typed", typed), ("ok", ok)], 4, Some(observer)).await;
    d.receive(directive("d1", "ok")).await.unwrap();
    settle(&d).await;
    // Told once the outcome is recorded: what it was told is in the store.
    assert_eq!(status_of(&store, "d1").await.0, LocalStatus::Finished);
    // No handler runs for these two, and they are reported all the same.
    d.receive(directive("d2", "typed")).await.unwrap();
    settle(&d).await;
    d.receive(directive("d3", "nobody_handles_this"))
        .await
        .unwrap();
    settle(&d).await;
    let mut again = directive("d1", "ok");
    again.attempt = 2;
    d.receive(again).await.unwrap();
    settle(&d).await;
    let finished = |id: &str, kind: &str, outcome| Event::Finished {
        id: id.into(),
        directive_type: kind.into(),
        outcome,
    };
    assert_eq!(
        *events.lock().unwrap(),
        vec![
            finished("d1", "ok", "COMPLETED"),
            finished("d2", "typed", "REJECTED"),
            finished("d3", "nobody_handles_this", "REJECTED"),
            Event::Redelivered {
                id: "d1".into(),
                attempt: 2
            },
        ]
    );
}

#[tokio::test]
async fn concurrency_is_bounded_and_shutdown_cancels_after_the_grace() {
    let (release_tx, release) = oneshot::channel::<()>();
    let release = Arc::new(tokio::sync::Mutex::new(Some(release)));
    let (started_tx, mut started) = mpsc::channel::<String>(8);
    let h = handler::boxed(move |_: serde_json::Value, ctx: Context| {
        let (started, release) = (started_tx.clone(), release.clone());
        async move {
            started.send(ctx.id().to_owned()).await.unwrap();
            if let Some(rx) = release.lock().await.take() {
                let _ = rx.await;
            }
            ctx.cancelled().await;
            Ok::<(), String>(())
        }
    });
    let (d, store, _dir) = setup(vec![("t", h)], 2).await;
    for id in ["a", "b", "c"] {
        d.receive(directive(id, "t")).await.unwrap();
    }
    let first = [started.recv().await.unwrap(), started.recv().await.unwrap()];
    let status = d.inner.status.snapshot();
    assert_eq!(
        (status.in_flight_directives, status.pending_directives),
        (2, 1)
    );
    drop(release_tx);
    // Nothing finishes without a cancel: a zero grace cancels and stops
    // them, and they stay unfinished to run again after a restart.
    d.drain(Duration::ZERO).await;
    for id in first {
        assert_eq!(status_of(&store, &id).await.0, LocalStatus::Running);
    }
    let status = d.inner.status.snapshot();
    assert_eq!(
        (status.in_flight_directives, status.pending_directives),
        (0, 0)
    );
}

#[tokio::test]
async fn a_redelivery_between_the_handler_and_its_outcome_does_not_run_it_again() {
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let h = handler::boxed(move |_: serde_json::Value, ctx: Context| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move {
            ctx.record("statistics", "done", 1.0, &[]);
            Ok::<_, String>(serde_json::json!({"attempt": ctx.attempt()}))
        }
    });
    let (d, store, _dir) = setup(vec![("t", h)], 4).await;
    let (paused_tx, mut paused) = mpsc::channel::<String>(1);
    let release = Arc::new(tokio::sync::Notify::new());
    let gate = release.clone();
    d.pause_before_outcome(Arc::new(move |id| {
        let (paused, gate) = (paused_tx.clone(), gate.clone());
        Box::pin(async move {
            paused.send(id).await.unwrap();
            gate.notified().await;
        })
    }));
    d.receive(directive("d1", "t")).await.unwrap();
    assert_eq!(paused.recv().await.unwrap(), "d1");
    // The handler returned; its outcome is not recorded yet.
    assert_eq!(status_of(&store, "d1").await.0, LocalStatus::Running);
    let mut again = directive("d1", "t");
    again.attempt = 2;
    d.receive(again).await.unwrap();
    release.notify_one();
    settle(&d).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the redelivery ran nothing");
    assert_eq!(
        status_of(&store, "d1").await,
        (
            LocalStatus::Finished,
            Some(Outcome::Completed(serde_json::json!({"attempt": 1})))
        )
    );
    assert_eq!(
        store.buffered_points().await.unwrap(),
        1,
        "the run's point is written with its outcome"
    );
    // After the outcome: acked again from the record, never run.
    let mut third = directive("d1", "t");
    third.attempt = 3;
    d.receive(third).await.unwrap();
    settle(&d).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(store.buffered_points().await.unwrap(), 1);
}

#[tokio::test]
async fn a_record_closed_by_a_refused_ack_is_acked_again_when_delivered_again() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let heard = events.clone();
    let observer: Observer = Arc::new(move |e: &Event| heard.lock().unwrap().push(e.clone()));
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let h = handler::boxed(move |_: serde_json::Value, _ctx| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, String>(()) }
    });
    let (d, store, _dir) = setup_observed(vec![("t", h)], 4, Some(observer)).await;
    d.receive(directive("d1", "t")).await.unwrap();
    settle(&d).await;
    // As the ack path does when the hub answers FAILED_PRECONDITION.
    store.mark_closed("d1", "PENDING", now_ms()).await.unwrap();
    let mut again = directive("d1", "t");
    again.attempt = 2;
    d.receive(again).await.unwrap();
    settle(&d).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        events.lock().unwrap().last(),
        Some(&Event::Redelivered {
            id: "d1".into(),
            attempt: 2
        }),
        "the recorded outcome is acked again"
    );
}

#[tokio::test]
async fn a_hub_cancel_before_the_handler_starts_closes_the_record() {
    let (release_tx, release) = oneshot::channel::<()>();
    let release = Arc::new(tokio::sync::Mutex::new(Some(release)));
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let h = handler::boxed(move |_: serde_json::Value, _ctx: Context| {
        counted.fetch_add(1, Ordering::SeqCst);
        let release = release.clone();
        async move {
            if let Some(rx) = release.lock().await.take() {
                let _ = rx.await;
            }
            Ok::<(), String>(())
        }
    });
    // One slot, taken by "a": "b" waits for it, and is cancelled first.
    let (d, store, _dir) = setup(vec![("t", h)], 1).await;
    d.receive(directive("a", "t")).await.unwrap();
    d.receive(directive("b", "t")).await.unwrap();
    d.cancel("b", "no longer needed");
    release_tx.send(()).unwrap();
    settle(&d).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "b never ran");
    assert_eq!(
        status_of(&store, "b").await,
        (LocalStatus::Closed, None),
        "no ack is sent for a cancelled directive"
    );
    assert_eq!(status_of(&store, "a").await.0, LocalStatus::Finished);
}
