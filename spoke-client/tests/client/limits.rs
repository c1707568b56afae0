//! The metric buffer against the hub's limits: a batch the hub refuses for
//! size (its `max_points_per_batch` lowered while the client held a bigger
//! batch, or a message over its size limit) is cut and every point arrives
//! once; a point too large even alone is dropped and counted without
//! blocking the ones behind it; a rate-limited push waits for the hub's
//! delay and goes again as it was.

use std::collections::HashMap;
use std::time::Duration;

use hub::Settings;
use hub_proto::v1 as proto;
use spoke_client::Point;

use crate::proxy::Proxy;
use crate::support::*;

/// Points per batch id, as the hub stored them.
fn per_batch(points: &[proto::StoredMetricPoint]) -> HashMap<String, usize> {
    let mut batches = HashMap::new();
    for p in points {
        *batches.entry(p.batch_id.clone()).or_default() += 1;
    }
    batches
}

/// The values the hub stored, sorted.
fn values(points: &[proto::StoredMetricPoint]) -> Vec<f64> {
    let mut values: Vec<f64> = points
        .iter()
        .map(|p| p.point.as_ref().unwrap().value)
        .collect();
    values.sort_by(f64::total_cmp);
    values
}

fn range(from: u32, to: u32) -> Vec<f64> {
    (from..to).map(f64::from).collect()
}

/// Every point the hub stored for `spoke`, in pages small enough for a
/// hub with a small message limit.
async fn all_points(hub: &TestHub, spoke: &str) -> Vec<proto::StoredMetricPoint> {
    let mut points = Vec::new();
    let mut page_token = String::new();
    loop {
        let req = proto::QueryMetricsRequest {
            spoke_name: spoke.into(),
            page_size: 40,
            page_token,
            ..Default::default()
        };
        let page = hub
            .admin()
            .await
            .query_metrics(authed(req))
            .await
            .expect("query metrics")
            .into_inner();
        points.extend(page.points);
        if page.next_page_token.is_empty() {
            return points;
        }
        page_token = page.next_page_token;
    }
}

async fn buffer_drained(client: &spoke_client::Client) {
    eventually("the buffer to drain", || async {
        (client.status().buffered_points == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_held_over_a_lowered_hub_limit_is_cut_and_each_point_arrives_once() {
    let mut hub = TestHub::start_with(Settings {
        shutdown_grace: Duration::from_secs(1),
        ..Settings::default()
    })
    .await;
    let proxy = Proxy::start(hub.addr).await;
    let state = tempfile::tempdir().unwrap();
    let client = spoke("stats", &proxy.url(), state.path())
        .build()
        .await
        .unwrap();
    let running = run(&client);
    connected(&client).await;
    for i in 0..100 {
        client.record("statistics", "held", f64::from(i), &[]);
    }
    eventually("points buffered", || async {
        (client.status().buffered_points == 100).then_some(())
    })
    .await;

    // One batch of 100 reaches the hub; its answer never comes back.
    proxy.stall();
    let flushing = {
        let client = client.clone();
        tokio::spawn(async move { client.flush().await })
    };
    eventually("the batch stored", || async {
        (hub.points("stats").await.len() == 100).then_some(())
    })
    .await;
    // The hub goes, and comes back taking at most 10 points per batch:
    // the batch the client holds (same id, 100 points) is too big now.
    hub.stop().await;
    proxy.cut();
    assert!(flushing.await.unwrap().is_err(), "no answer came");
    let lowered = Settings {
        max_points_per_batch: 10,
        ..hub.settings().clone()
    };
    hub.start_again_with(lowered).await;
    for i in 100..125 {
        client.record("statistics", "held", f64::from(i), &[]);
    }

    // Reconnected, the client tells what the hub holds under the old id
    // (all 100) and sends the rest in batches of at most 10.
    buffer_drained(&client).await;
    let stored = hub.points("stats").await;
    assert_eq!(values(&stored), range(0, 125), "each point once");
    let batches = per_batch(&stored);
    let first = &stored[0].batch_id;
    assert_eq!(batches[first], 100, "the first batch, stored once");
    assert!(
        batches.iter().all(|(id, n)| id == first || *n <= 10),
        "{batches:?}"
    );
    let status = client.status();
    assert_eq!((status.dropped_points, status.buffered_points), (0, 0));

    client.shutdown();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_over_the_message_limit_are_cut_and_a_point_too_large_alone_is_dropped() {
    let hub = TestHub::start_with(Settings {
        max_message_bytes: 64 * 1024,
        max_payload_bytes: 32 * 1024,
        ..Settings::default()
    })
    .await;
    let state = tempfile::tempdir().unwrap();
    let client = spoke("stats", &hub.url(), state.path())
        .build()
        .await
        .unwrap();
    let running = run(&client);
    connected(&client).await;
    // About 800 bytes a point: 400 of them are five times the hub's limit.
    let wide = "w".repeat(250);
    let labels = [
        ("a", wide.as_str()),
        ("b", wide.as_str()),
        ("c", wide.as_str()),
    ];
    for i in 0..200 {
        client.record("statistics", "wide", f64::from(i), &labels);
    }
    // A point no message under the limit can carry, then more behind it.
    client
        .record_point(Point::new("statistics", "huge", -1.0).label("blob", "x".repeat(100 * 1024)));
    for i in 200..400 {
        client.record("statistics", "wide", f64::from(i), &labels);
    }

    let report = client.flush().await.unwrap();
    assert_eq!(report.accepted_points, 400, "{report:?}");
    assert_eq!(report.dropped_points, 1, "{report:?}");
    let stored = all_points(&hub, "stats").await;
    assert_eq!(
        values(&stored),
        range(0, 400),
        "each point once, none blocked"
    );
    let status = client.status();
    assert_eq!((status.dropped_points, status.buffered_points), (1, 0));
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("too large")),
        "{:?}",
        status.last_error
    );

    client.shutdown();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_push_waits_for_the_hubs_delay_and_goes_again_whole() {
    let mut settings = Settings::default();
    settings.guard.spoke_rate = 5;
    settings.guard.spoke_burst = 6;
    settings.guard.rate_limit_wait = Duration::ZERO;
    let hub = TestHub::start_with(settings).await;
    let state = tempfile::tempdir().unwrap();
    let client = spoke("stats", &hub.url(), state.path())
        .max_batch_points(4)
        .build()
        .await
        .unwrap();
    let running = run(&client);
    connected(&client).await;
    for i in 0..40 {
        client.record("statistics", "paced", f64::from(i), &[]);
    }
    eventually("points buffered", || async {
        (client.status().buffered_points == 40).then_some(())
    })
    .await;

    // Ten batches, a call of the budget each: more than the burst.
    let report = client.flush().await.unwrap();
    assert_eq!((report.batches, report.accepted_points), (10, 40));
    assert_eq!(report.dropped_points, 0);
    let status = client.status();
    assert!(status.failed_pushes > 0, "the hub refused some pushes");
    assert_eq!((status.dropped_points, status.buffered_points), (0, 0));
    let stored = hub.points("stats").await;
    assert_eq!(values(&stored), range(0, 40));
    let batches = per_batch(&stored);
    assert_eq!(batches.len(), 10, "{batches:?}");
    assert!(batches.values().all(|n| *n == 4), "none cut: {batches:?}");

    client.shutdown();
    running.await.unwrap().unwrap();
}
