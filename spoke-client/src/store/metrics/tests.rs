//! The buffer's batches: retried as they were, cut when refused for size,
//! and settled so that no point is pushed twice nor left blocking.

use super::*;

const ANY: u64 = u64::MAX;

fn points(n: usize) -> Vec<Point> {
    (0..n)
        .map(|i| Point::new("statistics", "orders", i as f64).label("shop", "eu"))
        .collect()
}

fn values(batch: &PendingBatch) -> Vec<f64> {
    batch.points.iter().map(|p| p.value).collect()
}

async fn store_with(n: usize) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    store.insert_points(&points(n)).await.unwrap();
    (dir, store)
}

/// Takes and accepts every batch left; answers the values pushed.
async fn drain(store: &Store, max: u32) -> Vec<f64> {
    let mut pushed = Vec::new();
    while let Some(batch) = store.take_batch(max, ANY).await.unwrap() {
        assert!(!batch.may_be_held(), "a new batch: {batch:?}");
        pushed.extend(values(&batch));
        assert_eq!(store.answered(&batch, false).await.unwrap(), 0);
    }
    pushed
}

fn range(from: u32, to: u32) -> Vec<f64> {
    (from..to).map(f64::from).collect()
}

#[tokio::test]
async fn an_unanswered_batch_comes_back_with_the_same_id_and_points() {
    let (_dir, store) = store_with(5).await;
    let first = store.take_batch(3, ANY).await.unwrap().unwrap();
    assert_eq!(first.points.len(), 3);
    assert_eq!(first.points[0].labels["shop"], "eu");
    assert!(!first.may_be_held());
    store.insert_points(&points(1)).await.unwrap();
    let again = store.take_batch(3, ANY).await.unwrap().unwrap();
    assert_eq!(
        (&again.batch_id, &again.points),
        (&first.batch_id, &first.points),
        "a failed flush is retried as it was"
    );
    assert!(again.may_be_held(), "the first push went unanswered");
    assert_eq!(store.answered(&again, false).await.unwrap(), 0);
    let next = store.take_batch(3, ANY).await.unwrap().unwrap();
    assert_ne!(next.batch_id, first.batch_id);
    assert_eq!(next.points.len(), 3);
    store.answered(&next, false).await.unwrap();
    assert_eq!(store.take_batch(3, ANY).await.unwrap(), None);
    assert_eq!(store.buffered_points().await.unwrap(), 0);
}

#[tokio::test]
async fn a_refused_push_is_not_counted_as_possibly_stored() {
    let (_dir, store) = store_with(4).await;
    let first = store.take_batch(10, ANY).await.unwrap().unwrap();
    store.refused(&first).await.unwrap();
    let again = store.take_batch(10, ANY).await.unwrap().unwrap();
    assert_eq!(again.batch_id, first.batch_id, "same id, same points");
    assert_eq!(values(&again), values(&first));
    assert!(!again.may_be_held());
}

#[tokio::test]
async fn batches_stay_within_the_byte_bound_and_a_large_point_goes_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    let mut pts = points(4);
    pts.insert(
        2,
        Point::new("statistics", "big", 99.0).label("blob", "x".repeat(5000)),
    );
    store.insert_points(&pts).await.unwrap();
    let first = store.take_batch(100, 1000).await.unwrap().unwrap();
    assert_eq!(values(&first), vec![0.0, 1.0]);
    assert!(first.bytes <= 1000, "{}", first.bytes);
    store.answered(&first, false).await.unwrap();
    let big = store.take_batch(100, 1000).await.unwrap().unwrap();
    assert_eq!(values(&big), vec![99.0], "alone, though over the bound");
    assert!(big.bytes > 5000);
    store.answered(&big, false).await.unwrap();
    assert_eq!(drain(&store, 100).await, vec![2.0, 3.0]);
}

#[tokio::test]
async fn a_batch_the_hub_holds_none_of_is_released_and_batched_anew() {
    let (_dir, store) = store_with(10).await;
    let big = store.take_batch(10, ANY).await.unwrap().unwrap();
    // Refused for size on its first push: the hub holds none of it.
    store.refused(&big).await.unwrap();
    store.release(&big).await.unwrap();
    let small = store.take_batch(3, ANY).await.unwrap().unwrap();
    assert_ne!(small.batch_id, big.batch_id);
    assert_eq!(values(&small), range(0, 3));
    store.answered(&small, false).await.unwrap();
    assert_eq!(drain(&store, 3).await, range(3, 10));
}

#[tokio::test]
async fn a_batch_the_hub_may_hold_is_cut_under_its_id_and_an_accepted_prefix_frees_the_rest() {
    let (_dir, store) = store_with(10).await;
    let big = store.take_batch(10, ANY).await.unwrap().unwrap();
    // Its answer never came; then the hub's limit fell to 3.
    let probe = store.take_batch(3, ANY).await.unwrap().unwrap();
    assert_eq!(probe.batch_id, big.batch_id, "the same id tells");
    assert_eq!(values(&probe), range(0, 3));
    assert!(probe.may_be_held());
    // Accepted: the hub held nothing under the id, and now holds the prefix.
    assert_eq!(store.answered(&probe, false).await.unwrap(), 0);
    assert_eq!(drain(&store, 3).await, range(3, 10), "the rest, once");
}

#[tokio::test]
async fn a_duplicate_of_a_cut_batch_settles_all_it_held() {
    let (_dir, store) = store_with(10).await;
    let _big = store.take_batch(10, ANY).await.unwrap().unwrap();
    let probe = store.take_batch(3, ANY).await.unwrap().unwrap();
    // The unanswered push of all ten was stored: none is sent again.
    assert_eq!(store.answered(&probe, true).await.unwrap(), 0);
    assert_eq!(store.buffered_points().await.unwrap(), 0);
    assert_eq!(store.take_batch(3, ANY).await.unwrap(), None);
}

#[tokio::test]
async fn what_two_unanswered_pushes_leave_unknown_is_dropped_and_counted() {
    let (_dir, store) = store_with(10).await;
    let _all = store.take_batch(10, ANY).await.unwrap().unwrap();
    let five = store.take_batch(5, ANY).await.unwrap().unwrap();
    assert_eq!(values(&five), range(0, 5));
    let three = store.take_batch(3, ANY).await.unwrap().unwrap();
    assert_eq!(values(&three), range(0, 3));
    // The hub holds the first five or all ten: the five after them are
    // dropped (counted), never pushed twice.
    assert_eq!(store.answered(&three, true).await.unwrap(), 5);
    assert_eq!(store.take_batch(3, ANY).await.unwrap(), None);
}

#[tokio::test]
async fn a_refused_cut_keeps_what_earlier_pushes_may_have_stored() {
    let (_dir, store) = store_with(10).await;
    let _all = store.take_batch(10, ANY).await.unwrap().unwrap();
    let five = store.take_batch(5, ANY).await.unwrap().unwrap();
    store.refused(&five).await.unwrap();
    let three = store.take_batch(3, ANY).await.unwrap().unwrap();
    // Only the push of all ten may have stored the batch.
    assert_eq!(store.answered(&three, true).await.unwrap(), 0);
    assert_eq!(store.buffered_points().await.unwrap(), 0);
}

#[tokio::test]
async fn abandoning_drops_what_was_sent_or_may_be_held_and_frees_the_rest() {
    let (_dir, store) = store_with(6).await;
    let one = store.take_batch(1, ANY).await.unwrap().unwrap();
    store.refused(&one).await.unwrap();
    assert_eq!(store.abandon(&one, false).await.unwrap(), 1);
    assert_eq!(drain(&store, 10).await, range(1, 6));

    store.insert_points(&points(6)).await.unwrap();
    let _all = store.take_batch(6, ANY).await.unwrap().unwrap();
    let first = store.take_batch(1, ANY).await.unwrap().unwrap();
    store.refused(&first).await.unwrap();
    assert_eq!(
        store.abandon(&first, false).await.unwrap(),
        6,
        "the hub may hold all six"
    );
    assert_eq!(store.buffered_points().await.unwrap(), 0);
}

#[tokio::test]
async fn a_batch_stamped_by_an_earlier_version_may_be_held_whole() {
    let (_dir, store) = store_with(4).await;
    sqlx::query("UPDATE metric_points SET batch_id = 'old-batch'")
        .execute(&store.pool)
        .await
        .unwrap();
    let probe = store.take_batch(2, ANY).await.unwrap().unwrap();
    assert_eq!(probe.batch_id, "old-batch");
    assert_eq!(values(&probe), range(0, 2));
    assert!(probe.may_be_held());
    assert_eq!(store.answered(&probe, true).await.unwrap(), 0);
    assert_eq!(store.buffered_points().await.unwrap(), 0);
}

#[tokio::test]
async fn overflow_drops_the_oldest() {
    let (_dir, store) = store_with(10).await;
    assert_eq!(store.drop_oldest(4).await.unwrap(), 6);
    assert_eq!(store.drop_oldest(4).await.unwrap(), 0);
    let batch = store.take_batch(100, ANY).await.unwrap().unwrap();
    assert_eq!(values(&batch), range(6, 10));
}

#[tokio::test]
async fn a_cut_batch_whose_sent_points_overflowed_sends_what_is_left() {
    let (_dir, store) = store_with(6).await;
    let _all = store.take_batch(6, ANY).await.unwrap().unwrap();
    let probe = store.take_batch(2, ANY).await.unwrap().unwrap();
    assert_eq!(values(&probe), range(0, 2));
    assert_eq!(store.drop_oldest(3).await.unwrap(), 3);
    let rest = store.take_batch(2, ANY).await.unwrap().unwrap();
    assert_eq!(rest.batch_id, probe.batch_id);
    assert_eq!(values(&rest), range(3, 5));
    // Accepted: nothing else was stored under the id.
    assert_eq!(store.answered(&rest, false).await.unwrap(), 0);
    assert_eq!(drain(&store, 10).await, vec![5.0]);
}
