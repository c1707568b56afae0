//! Restarts on either side: the hub restarting mid-stream, or while acks
//! it committed are unanswered on the ack stream, and the spoke dying
//! between "handler finished" and "ack sent", with the metric points the
//! handler recorded.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hub::Settings;
use hub_proto::v1 as proto;
use serde_json::{Value, json};
use spoke_client::Context;
use tokio::sync::{mpsc, oneshot, watch};

use crate::proxy::Proxy;
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spoke_rides_out_a_hub_restart_and_runs_each_directive_once() {
    let mut hub = TestHub::start().await;
    let state = tempfile::tempdir().unwrap();
    let runs = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let counted = runs.clone();
    let client = spoke("worker", &hub.url(), state.path())
        .concurrency(4)
        .handler("step", "1", move |job: Value, ctx: Context| {
            *counted
                .lock()
                .unwrap()
                .entry(ctx.id().to_owned())
                .or_default() += 1;
            async move {
                // Long enough that some runs straddle the restart.
                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
                Ok::<_, String>(json!({"i": job["i"]}))
            }
        })
        .build()
        .await
        .unwrap();
    let running = run(&client);
    hub.wait_connected("worker").await;

    let mut sent = Vec::new();
    for i in 0..40 {
        if i == 20 {
            hub.restart().await;
        }
        sent.push((hub.send("worker", "step", json!({"i": i})).await.id, i));
    }
    for (id, i) in &sent {
        let d = hub.final_state(id).await;
        assert_eq!(d.state, proto::DirectiveState::Completed as i32, "{d:?}");
        assert_eq!(json(&d.result), json!({"i": i}));
    }
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 40);
    assert!(
        runs.values().all(|n| *n == 1),
        "a handler ran twice: {runs:?}"
    );
    client.shutdown();
    running.await.unwrap().unwrap();
}

/// A spoke process: its own runtime on its own thread. `kill` drops the
/// runtime with every task in it, as a crash would.
struct Process {
    kill: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Process {
    fn spawn<F, Fut>(body: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let (kill, killed) = oneshot::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                tokio::select! {
                    () = body() => {}
                    _ = killed => {}
                }
            });
            rt.shutdown_background();
        });
        Self {
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    fn kill(mut self) {
        let _ = self.kill.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoke_that_died_before_acking_re_acks_without_running_again() {
    let mut hub = TestHub::start().await;
    let state = tempfile::tempdir().unwrap();
    let (finished_tx, mut finished) = mpsc::channel::<String>(1);
    let (go_tx, go) = oneshot::channel::<()>();
    let go = Arc::new(Mutex::new(Some(go)));

    let (url, dir) = (hub.url(), state.path().to_owned());
    let first = Process::spawn(move || async move {
        let client = spoke("billing", &url, &dir)
            .handler("sync_doc", "1", move |_: Value, ctx: Context| {
                let (finished, go) = (finished_tx.clone(), go.lock().unwrap().take());
                async move {
                    finished.send(ctx.id().to_owned()).await.unwrap();
                    go.expect("one run").await.unwrap();
                    Ok::<_, String>(json!({"run": "first", "attempt": ctx.attempt()}))
                }
            })
            .build()
            .await
            .unwrap();
        let _ = client.run().await;
    });
    hub.wait_connected("billing").await;
    let d = hub.send("billing", "sync_doc", json!({"doc": "a"})).await;
    assert_eq!(finished.recv().await.unwrap(), d.id);

    // The hub goes away while the handler finishes: the outcome is recorded,
    // the ack cannot be sent, and then the spoke dies.
    hub.stop().await;
    go_tx.send(()).unwrap();
    eventually("the outcome recorded", || async {
        (local_status(state.path(), &d.id).await.as_deref() == Some("FINISHED")).then_some(())
    })
    .await;
    first.kill();
    hub.start_again().await;
    assert_eq!(
        hub.directive(&d.id).await.state,
        proto::DirectiveState::Delivered as i32
    );

    // The restarted spoke acks the recorded result and runs nothing.
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let client = spoke("billing", &hub.url(), state.path())
        .handler("sync_doc", "1", move |_: Value, _ctx: Context| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, String>(json!({"run": "second"})) }
        })
        .build()
        .await
        .unwrap();
    let running = run(&client);
    let done = hub.final_state(&d.id).await;
    assert_eq!(done.state, proto::DirectiveState::Completed as i32);
    assert_eq!(json(&done.result), json!({"run": "first", "attempt": 1}));
    eventually("the ack confirmed locally", || async {
        (local_status(state.path(), &d.id).await.as_deref() == Some("ACKED")).then_some(())
    })
    .await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the handler did not run again"
    );
    client.shutdown();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_unanswered_when_the_hub_restarts_are_sent_again_and_count_once() {
    let mut hub = TestHub::start_with(Settings {
        // Stopping waits this long for the stalled connection, which cannot
        // drain (its peer never hears the GOAWAY); nothing else needs it.
        shutdown_grace: Duration::from_millis(500),
        ..Settings::default()
    })
    .await;
    let proxy = Proxy::start(hub.addr).await;
    let state = tempfile::tempdir().unwrap();
    let runs = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let counted = runs.clone();
    let (started_tx, mut started) = mpsc::channel::<String>(8);
    let (release, released) = watch::channel(false);
    let client = spoke("worker", &proxy.url(), state.path())
        .concurrency(8)
        .handler("step", "1", move |job: Value, ctx: Context| {
            *counted
                .lock()
                .unwrap()
                .entry(ctx.id().to_owned())
                .or_default() += 1;
            let (started, mut released) = (started_tx.clone(), released.clone());
            async move {
                started.send(ctx.id().to_owned()).await.unwrap();
                released.wait_for(|r| *r).await.unwrap();
                Ok::<_, String>(json!({"i": job["i"]}))
            }
        })
        .handler("warm_up", "1", |_: Value, _ctx: Context| async {
            Ok::<_, String>(())
        })
        .build()
        .await
        .unwrap();
    let running = run(&client);
    hub.wait_connected("worker").await;
    // The ack stream is open and answering.
    let warm_up = hub.send("worker", "warm_up", json!({})).await;
    eventually("the first ack answered", || async {
        (local_status(state.path(), &warm_up.id).await.as_deref() == Some("ACKED")).then_some(())
    })
    .await;
    let mut sent = Vec::new();
    for i in 0..8 {
        sent.push((hub.send("worker", "step", json!({"i": i})).await.id, i));
    }
    for _ in 0..8 {
        started.recv().await.unwrap();
    }

    // The acks reach the hub and are committed; their answers do not
    // reach the spoke.
    proxy.stall();
    release.send_replace(true);
    for (id, _) in &sent {
        let d = hub.final_state(id).await;
        assert_eq!(d.state, proto::DirectiveState::Completed as i32, "{d:?}");
        assert_eq!(
            local_status(state.path(), id).await.as_deref(),
            Some("FINISHED")
        );
    }
    assert_eq!(hub.rpc_count("AckStream").await, 1);
    assert_eq!(hub.rpc_count("Ack").await, 0);

    hub.stop().await;
    proxy.cut();
    hub.start_again().await;
    for (id, i) in &sent {
        eventually("the ack sent again and answered", || async {
            (local_status(state.path(), id).await.as_deref() == Some("ACKED")).then_some(())
        })
        .await;
        let d = hub.directive(id).await;
        assert_eq!(d.state, proto::DirectiveState::Completed as i32, "{d:?}");
        assert_eq!(json(&d.result), json!({"i": i}));
    }
    assert_eq!(hub.rpc_count("Ack").await, 0, "sent again on the stream");
    let completions = hub.completions().await;
    for (id, _) in &sent {
        assert_eq!(completions.get(id), Some(&1), "{id} completed once");
    }
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 8);
    assert!(
        runs.values().all(|n| *n == 1),
        "a handler ran twice: {runs:?}"
    );
    client.shutdown();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_a_finished_handler_recorded_survive_a_kill_and_reach_the_hub_once() {
    let hub = TestHub::start().await;
    let state = tempfile::tempdir().unwrap();
    let (finished_tx, finished) = std::sync::mpsc::channel::<String>();
    let (hold, held) = std::sync::mpsc::channel::<()>();
    let held = Arc::new(Mutex::new(held));

    let (url, dir) = (hub.url(), state.path().to_owned());
    let first = Process::spawn(move || async move {
        let client = spoke("meter", &url, &dir)
            .handler("bill", "1", |job: Value, ctx: Context| async move {
                for i in 0..3 {
                    ctx.record("compensation", "billed", f64::from(i), &[("job", "a")]);
                }
                Ok::<_, String>(json!({"job": job["job"]}))
            })
            .on_event(move |event| {
                if let spoke_client::Event::Finished { id, .. } = event {
                    finished_tx.send(id.clone()).unwrap();
                    // The process dies here: the outcome is recorded, and
                    // this (only) worker does nothing more until the kill.
                    let _ = held.lock().unwrap().recv();
                }
            })
            .build()
            .await
            .unwrap();
        let _ = client.run().await;
    });
    hub.wait_connected("meter").await;
    let d = hub.send("meter", "bill", json!({"job": "a"})).await;
    let id = tokio::task::spawn_blocking(move || finished.recv().unwrap())
        .await
        .unwrap();
    assert_eq!(id, d.id);
    first.kill();
    drop(hold);

    // The next process on the same state: the outcome is acked from the
    // record, the points are pushed, and the handler does not run again.
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let client = spoke("meter", &hub.url(), state.path())
        .handler("bill", "1", move |_: Value, _ctx: Context| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, String>(json!({"job": "again"})) }
        })
        .build()
        .await
        .unwrap();
    let running = run(&client);
    let done = hub.final_state(&d.id).await;
    assert_eq!(done.state, proto::DirectiveState::Completed as i32);
    assert_eq!(json(&done.result), json!({"job": "a"}));
    connected(&client).await;
    client.flush().await.unwrap();
    let mut values: Vec<f64> = hub
        .points("meter")
        .await
        .iter()
        .map(|p| p.point.as_ref().unwrap().value)
        .collect();
    values.sort_by(f64::total_cmp);
    assert_eq!(values, vec![0.0, 1.0, 2.0], "each point once");
    let status = client.status();
    assert_eq!((status.buffered_points, status.dropped_points), (0, 0));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the handler did not run again"
    );
    client.shutdown();
    running.await.unwrap().unwrap();
}
