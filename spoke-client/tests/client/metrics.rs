//! The metric buffer against the real hub: flushes by interval, by size and
//! on demand; a flush whose answer is lost is retried with the same batch
//! id and the hub stores each point once; overflow drops the oldest and
//! counts them.

use std::collections::HashSet;
use std::time::Duration;

use spoke_client::{Error, Point};

use crate::proxy::Proxy;
use crate::support::*;

async fn stored(hub: &TestHub, spoke: &str, n: usize) -> Vec<hub_proto::v1::StoredMetricPoint> {
    eventually(&format!("{n} points stored"), || async {
        let points = hub.points(spoke).await;
        (points.len() >= n).then_some(points)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushes_on_the_interval() {
    let hub = TestHub::start().await;
    let state = tempfile::tempdir().unwrap();
    let client = spoke("stats", &hub.url(), state.path())
        .flush_interval(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let running = run(&client);
    connected(&client).await;
    for i in 0..3 {
        client.record("statistics", "orders", f64::from(i), &[("shop", "eu")]);
    }
    let points = stored(&hub, "stats", 3).await;
    assert_eq!(points.len(), 3);
    let p = points[0].point.as_ref().unwrap();
    assert_eq!(
        (
            p.domain.as_str(),
            p.name.as_str(),
            p.labels["shop"].as_str()
        ),
        ("statistics", "orders", "eu")
    );
    eventually("the buffer to drain", || async {
        (client.status().buffered_points == 0).then_some(())
    })
    .await;
    client.shutdown();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushes_at_the_size_threshold_and_on_demand() {
    let hub = TestHub::start().await;
    let state = tempfile::tempdir().unwrap();
    let client = spoke("stats", &hub.url(), state.path())
        .flush_at_points(5)
        .max_batch_points(2)
        .build()
        .await
        .unwrap();
    assert!(matches!(client.flush().await, Err(Error::NotRunning)));
    let running = run(&client);
    connected(&client).await;

    // Reaching 5 points flushes without being asked (the interval is an hour).
    for i in 0..5 {
        client.record("statistics", "size", f64::from(i), &[]);
    }
    let points = stored(&hub, "stats", 5).await;
    let batches: HashSet<_> = points.iter().map(|p| p.batch_id.clone()).collect();
    assert_eq!(batches.len(), 3, "batches of at most 2 points");
    // The flusher is one task: a flush asked for now runs once the automatic
    // one has finished, and finds nothing left.
    let drained = client.flush().await.unwrap();
    assert_eq!(drained.batches, 0, "the automatic flush pushed every point");

    // On demand: the report says what the hub accepted and refused.
    client.record_point(Point::new("compensation", "payout", 1250.5).unit("EUR"));
    client.record("statistics", "broken", f64::NAN, &[]);
    let report = client.flush().await.unwrap();
    assert_eq!((report.accepted_points, report.rejected_points), (1, 0));
    assert_eq!(report.duplicate_batches, 0);
    assert_eq!(hub.points("stats").await.len(), 6);
    let status = client.status();
    assert_eq!(
        (
            status.buffered_points,
            status.rejected_points,
            status.failed_pushes
        ),
        (0, 1, 0)
    );

    client.shutdown();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_the_callers_own_is_pushed_as_is_and_a_resend_is_a_duplicate() {
    use hub_proto::v1::BatchStatus;

    let hub = TestHub::start().await;
    let state = tempfile::tempdir().unwrap();
    let client = spoke("stats", &hub.url(), state.path())
        .build()
        .await
        .unwrap();
    let points = || {
        vec![
            Point::new("statistics", "orders", 42.0).label("shop", "eu"),
            Point::new("compensation", "payout", 1234.5).unit("EUR"),
        ]
    };
    let early = client.push_batch("my-batch-1", points()).await;
    assert!(matches!(early, Err(Error::NotConnected)), "{early:?}");
    let running = run(&client);
    connected(&client).await;

    let first = client.push_batch("my-batch-1", points()).await.unwrap();
    assert_eq!(
        (
            first.batch_id.as_str(),
            first.status(),
            first.accepted_points
        ),
        ("my-batch-1", BatchStatus::Accepted, 2)
    );
    let again = client.push_batch("my-batch-1", points()).await.unwrap();
    assert_eq!(
        (again.status(), again.accepted_points),
        (BatchStatus::Duplicate, 2)
    );
    let stored = hub.points("stats").await;
    assert_eq!(stored.len(), 2, "stored once");
    assert!(stored.iter().all(|p| p.batch_id == "my-batch-1"));
    assert_eq!(
        client.status().buffered_points,
        0,
        "the buffer is not involved"
    );

    client.shutdown();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_whose_answer_is_lost_is_retried_and_stored_once() {
    let hub = TestHub::start().await;
    let proxy = Proxy::start(hub.addr).await;
    let state = tempfile::tempdir().unwrap();
    let client = spoke("stats", &proxy.url(), state.path())
        .build()
        .await
        .unwrap();
    let running = run(&client);
    connected(&client).await;
    for i in 0..5 {
        client.record("statistics", "lost_answer", f64::from(i), &[]);
    }
    eventually("points buffered", || async {
        (client.status().buffered_points == 5).then_some(())
    })
    .await;

    // The batch reaches the hub, its answer never comes back.
    proxy.stall();
    let flushing = {
        let client = client.clone();
        tokio::spawn(async move { client.flush().await })
    };
    let points = stored(&hub, "stats", 5).await;
    proxy.cut();
    let failed = flushing.await.unwrap();
    assert!(failed.is_err(), "the flush saw no answer: {failed:?}");
    assert_eq!(client.status().failed_pushes, 1);
    assert_eq!(client.status().buffered_points, 5, "nothing is forgotten");

    // Reconnected, the same batch goes again: the hub reports a duplicate.
    connected(&client).await;
    let retried = client.flush().await.unwrap();
    let background = retried.batches == 0; // the reconnect may have flushed first
    assert!(background || retried.duplicate_batches == 1, "{retried:?}");
    eventually("the buffer to drain", || async {
        (client.status().buffered_points == 0).then_some(())
    })
    .await;
    let after = hub.points("stats").await;
    assert_eq!(after.len(), 5, "each point stored once");
    assert_eq!(after, points);
    let ids: HashSet<_> = after.iter().map(|p| p.batch_id.clone()).collect();
    assert_eq!(ids.len(), 1, "one batch id throughout");

    client.shutdown();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_drops_the_oldest_and_counts_them_and_the_rest_survive_a_restart() {
    let hub = TestHub::start().await;
    let state = tempfile::tempdir().unwrap();
    let offline = spoke("stats", &hub.url(), state.path())
        .max_buffered_points(10)
        .flush_at_points(10)
        .build()
        .await
        .unwrap();
    // Not running: the points wait in the local store.
    for i in 0..15 {
        offline.record("statistics", "overflow", f64::from(i), &[]);
    }
    eventually("the overflow to be counted", || async {
        let s = offline.status();
        (s.buffered_points == 10 && s.dropped_points == 5).then_some(())
    })
    .await;
    drop(offline);

    // A new client on the same state pushes what was kept, newest ten.
    let client = spoke("stats", &hub.url(), state.path())
        .build()
        .await
        .unwrap();
    let running = run(&client);
    // Connecting with points waiting flushes them without being asked.
    let points = stored(&hub, "stats", 10).await;
    assert_eq!(
        client.flush().await.unwrap().accepted_points,
        0,
        "nothing left"
    );
    let mut values: Vec<f64> = points
        .iter()
        .map(|p| p.point.as_ref().unwrap().value)
        .collect();
    values.sort_by(f64::total_cmp);
    assert_eq!(values, (5..15).map(f64::from).collect::<Vec<_>>());
    client.shutdown();
    running.await.unwrap().unwrap();
}
