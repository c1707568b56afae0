//! The group commit on both backends: every kind of change lands and reads
//! back the same, metric batches are decided once in commit order, and an
//! event sequence is never given twice; a publisher's mark only moves
//! forward.

use uuid::Uuid;

use super::*;
use crate::directives::State;
use crate::store::{Cutoffs, DirectiveFilter, DirectiveUpdate, MetricFilter, StoredBatch};

async fn every_kind_of_change_commits_and_reads_back(url: String) {
    let store = open(&url).await;
    let (a, a_live) = spoke("a", NOW);
    let (old, old_live) = spoke("reused", NOW);
    commit(
        &store,
        &[
            Change::Spoke(a.clone(), a_live.clone()),
            Change::Spoke(old.clone(), old_live),
            event(Kind::SpokeRegistered, a.id),
        ],
    )
    .await;

    let (group, single_group) = (Uuid::now_v7(), Uuid::now_v7());
    let (single, fan1, fan2) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    // The deleted spoke's name is taken again in the same commit.
    let (new, new_live) = spoke("reused", NOW + 1);
    let delivered = DirectiveUpdate {
        id: fan1,
        state: State::Delivered,
        attempts: 1,
        updated_at: NOW + 2,
        ack_due_at: Some(NOW + 30_002),
        result: None,
        error: String::new(),
        progress: 0,
        progress_message: String::new(),
    };
    let done = commit(
        &store,
        &[
            Change::SpokeDeleted {
                id: old.id,
                at: NOW + 1,
            },
            Change::Spoke(new.clone(), new_live),
            Change::DirectiveCreated {
                id: single,
                spoke_id: a.id,
                fixed: fixed(single_group, Some("k1")),
                payload: Some(r#"{"one":1.5}"#.into()),
            },
            Change::IdempotencyKey {
                key: "k1".into(),
                group_id: single_group,
                fingerprint: "fp".into(),
                at: NOW,
            },
            Change::DirectiveGroup {
                group_id: group,
                payload: r#"{"fan":true}"#.into(),
                at: NOW,
            },
            Change::DirectiveCreated {
                id: fan1,
                spoke_id: a.id,
                fixed: fixed(group, None),
                payload: None,
            },
            Change::DirectiveCreated {
                id: fan2,
                spoke_id: new.id,
                fixed: fixed(group, None),
                payload: None,
            },
            // Merged into its row created above.
            Change::DirectiveUpdated(delivered),
            event(Kind::DirectiveCreated, a.id),
            Change::Metrics {
                spoke_id: a.id,
                batch: batch("m1", 2),
                at: NOW,
            },
        ],
    )
    .await;
    assert_eq!(done.metrics, [StoredBatch::Accepted(2)]);

    let mut beat = a_live.clone();
    beat.last_heartbeat_at = Some(NOW + 5);
    beat.status_message = "busy".into();
    beat.reported_buffered_points = u64::MAX;
    let completed = DirectiveUpdate {
        id: single,
        state: State::Completed,
        attempts: 1,
        updated_at: NOW + 6,
        ack_due_at: None,
        result: Some(r#"{"ok":true}"#.into()),
        error: String::new(),
        progress: 100,
        progress_message: "done".into(),
    };
    commit(
        &store,
        &[
            Change::Spoke(a.clone(), beat),
            Change::DirectiveUpdated(completed),
        ],
    )
    .await;

    let snapshot = store.snapshot().await.unwrap();
    let mut names: Vec<_> = snapshot
        .spokes
        .iter()
        .map(|(info, live)| (info.name.clone(), info.key_hash.clone(), live.clone()))
        .collect();
    names.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(names.len(), 2, "the deleted spoke is gone: {names:?}");
    assert_eq!(names[0].0, "a");
    assert_eq!(names[0].2.last_heartbeat_at, Some(NOW + 5));
    assert_eq!(names[0].2.status_message, "busy");
    assert_eq!(names[0].2.reported_buffered_points, i64::MAX as u64);
    assert_eq!(
        names[1].1, new.key_hash,
        "the name belongs to the new spoke"
    );
    let (info, _) = snapshot.spokes.iter().find(|(i, _)| i.id == a.id).unwrap();
    assert_eq!(info.labels, a.labels);
    assert_eq!(info.capabilities, a.capabilities);

    let mut outstanding: Vec<_> = snapshot
        .outstanding
        .iter()
        .map(|d| (d.id, d.state, d.attempts, d.ack_due_at))
        .collect();
    outstanding.sort_by_key(|d| d.0);
    assert_eq!(
        outstanding,
        [
            (fan1, State::Delivered, 1, Some(NOW + 30_002)),
            (fan2, State::Pending, 0, None)
        ]
    );
    assert_eq!(snapshot.outstanding[0].fixed.priority, -3);
    assert_eq!(snapshot.finals, [(State::Completed, 1)]);
    assert_eq!(snapshot.idempotency.len(), 1);
    assert_eq!(snapshot.idempotency[0].key, "k1");
    assert_eq!(snapshot.idempotency[0].group_id, single_group);
    assert_eq!(snapshot.idempotency[0].fingerprint, "fp");

    let record = store.directive(single).await.unwrap().unwrap();
    assert_eq!(record.spoke_name, "a");
    assert_eq!(record.payload, r#"{"one":1.5}"#);
    assert_eq!(record.state, State::Completed);
    assert_eq!(record.result.as_deref(), Some(r#"{"ok":true}"#));
    assert_eq!(record.progress_message, "done");
    assert_eq!(record.idempotency_key.as_deref(), Some("k1"));
    assert_eq!(record.expires_at, Some(NOW + 60_000));
    let fanned = store.directive(fan2).await.unwrap().unwrap();
    assert_eq!(fanned.payload, r#"{"fan":true}"#, "the group's payload");
    assert_eq!(fanned.spoke_name, "reused");
    assert_eq!(
        store.directive_state(fan1).await.unwrap(),
        Some((a.id, State::Delivered))
    );
    assert!(store.directive(Uuid::now_v7()).await.unwrap().is_none());
    let payloads = store.payloads(&[fan1, single]).await.unwrap();
    assert_eq!(payloads[&fan1], r#"{"fan":true}"#);
    assert_eq!(payloads[&single], r#"{"one":1.5}"#);
    let listed: Vec<Uuid> = store
        .group(group)
        .await
        .unwrap()
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(listed, [fan1, fan2]);
    let page = DirectiveFilter {
        spoke_id: Some(a.id),
        before_id: Some(fan2),
        ..Default::default()
    };
    let page: Vec<Uuid> = store
        .list_directives(&page, 10)
        .await
        .unwrap()
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(page, [fan1, single], "newest first, below the token");

    let events = events(&store).await;
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(store.last_event(), 3);
    assert_eq!(events[2].kind, Kind::MetricsReceived);
    assert_eq!(events[2].spoke_id, Some(a.id.to_string()));
    let details: serde_json::Value = serde_json::from_str(&events[2].details).unwrap();
    assert_eq!(details["batch_id"], "m1");
    assert_eq!(details["accepted"], 2);
    assert_eq!(store.oldest_event().await.unwrap(), Some(1));
    assert_eq!(store.recent_events(1).await.unwrap()[0].seq, 3);

    let points = store
        .query_points(&MetricFilter::default(), 10)
        .await
        .unwrap();
    assert_eq!(points.len(), 2);
    let (row, first) = &points[0];
    assert!(*row < points[1].0);
    assert_eq!(first.spoke_name, "a");
    assert_eq!(first.batch_id, "m1");
    let point = first.point.as_ref().unwrap();
    assert_eq!(point.value, 0.25);
    assert_eq!(point.labels["k"], "v");
    // No stored text holds a NUL: a filter with one finds nothing.
    let nul = DirectiveFilter {
        directive_type: Some("job\0".into()),
        ..Default::default()
    };
    assert!(store.list_directives(&nul, 10).await.unwrap().is_empty());
    let nul = MetricFilter {
        name: Some("n\0".into()),
        ..Default::default()
    };
    assert!(store.query_points(&nul, 10).await.unwrap().is_empty());
    store.close().await;
}
on_both_backends!(every_kind_of_change_commits_and_reads_back);

async fn metric_batches_are_decided_once_in_commit_order(url: String) {
    let store = open(&url).await;
    let (a, a_live) = spoke("a", NOW);
    let (b, b_live) = spoke("b", NOW);
    commit(
        &store,
        &[
            Change::Spoke(a.clone(), a_live),
            Change::Spoke(b.clone(), b_live),
        ],
    )
    .await;
    let metrics = |spoke: Uuid, id: &str, points: usize| Change::Metrics {
        spoke_id: spoke,
        batch: batch(id, points),
        at: NOW,
    };
    let first = commit(
        &store,
        &[
            metrics(a.id, "b1", 2),
            metrics(a.id, "b1", 3),
            event(Kind::SpokeUpdated, a.id),
            metrics(b.id, "b1", 1),
        ],
    )
    .await;
    assert_eq!(
        first.metrics,
        [
            StoredBatch::Accepted(2),
            StoredBatch::Duplicate(2),
            StoredBatch::Accepted(1)
        ]
    );
    let second = commit(
        &store,
        &[
            metrics(a.id, "b1", 5),
            metrics(a.id, "b2", 1),
            metrics(a.id, "b2", 4),
        ],
    )
    .await;
    assert_eq!(
        second.metrics,
        [
            StoredBatch::Duplicate(2),
            StoredBatch::Accepted(1),
            StoredBatch::Duplicate(1)
        ]
    );
    let events = events(&store).await;
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4], "a duplicate leaves no hole");
    let kinds: Vec<Kind> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            Kind::MetricsReceived,
            Kind::SpokeUpdated,
            Kind::MetricsReceived,
            Kind::MetricsReceived
        ]
    );
    let points = store
        .query_points(&MetricFilter::default(), 100)
        .await
        .unwrap();
    assert_eq!(points.len(), 2 + 1 + 1, "each stored batch's points, once");
    store.close().await;
}
on_both_backends!(metric_batches_are_decided_once_in_commit_order);

async fn an_event_sequence_is_never_given_twice_even_after_a_purge(url: String) {
    let store = open(&url).await;
    let (a, live) = spoke("a", NOW);
    commit(
        &store,
        &[
            Change::Spoke(a.clone(), live),
            event(Kind::SpokeRegistered, a.id),
            event(Kind::SpokeUpdated, a.id),
            event(Kind::SpokeUpdated, a.id),
        ],
    )
    .await;
    let cutoffs = Cutoffs {
        events_before: i64::MAX,
        points_before: 0,
        directives_before: 0,
        keys_before: 0,
    };
    let mut writer = store.writer().unwrap();
    let (purged, _) = writer.purge_step(&cutoffs).await.unwrap();
    assert_eq!(purged.events, 3);
    assert!(events(&store).await.is_empty());
    assert_eq!(store.oldest_event().await.unwrap(), None);
    drop(writer);
    store.close().await;

    let store = open(&url).await;
    assert_eq!(store.last_event(), 3, "the highest sequence ever given");
    commit(&store, &[event(Kind::SpokeUpdated, a.id)]).await;
    let seqs: Vec<i64> = events(&store).await.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [4]);
    assert_eq!(store.last_event(), 4);
    store.close().await;
}
on_both_backends!(an_event_sequence_is_never_given_twice_even_after_a_purge);

async fn a_publisher_mark_only_moves_forward(url: String) {
    let store = open(&url).await;
    assert_eq!(store.published_events("HUB_EVENTS").await.unwrap(), 0);
    let mark = |stream: &str, through: i64| Change::EventsPublished {
        stream: stream.into(),
        through,
    };
    // Several marks in one commit: the highest stays.
    commit(
        &store,
        &[
            mark("HUB_EVENTS", 5),
            mark("HUB_EVENTS", 9),
            mark("OTHER", 2),
        ],
    )
    .await;
    assert_eq!(store.published_events("HUB_EVENTS").await.unwrap(), 9);
    assert_eq!(store.published_events("OTHER").await.unwrap(), 2);
    // A lower mark later (a late acknowledgement) changes nothing.
    commit(&store, &[mark("HUB_EVENTS", 7)]).await;
    assert_eq!(store.published_events("HUB_EVENTS").await.unwrap(), 9);
    commit(&store, &[mark("HUB_EVENTS", 12)]).await;
    assert_eq!(store.published_events("HUB_EVENTS").await.unwrap(), 12);
    store.close().await;
}
on_both_backends!(a_publisher_mark_only_moves_forward);
