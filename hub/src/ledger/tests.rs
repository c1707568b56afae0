//! The ledger against a real database (SQLite, or PostgreSQL with
//! `HUB_TEST_DATABASE=postgres`): what waits for a commit, what a commit
//! holds, and what a failed commit leaves behind.

use std::collections::BTreeMap;
use std::sync::Arc;

use hub_proto::v1 as proto;
use uuid::Uuid;

use super::committer::commit_next;
use super::{CreateStep, Ledger, committed};
use crate::directives::{NewDirective, State, Target};
use crate::error::Error;
use crate::events::{EventFilter, Kind};
use crate::metrics::Batch;
use crate::spokes::Registration;
use crate::store::{Durability, Store, StoredBatch};

const NOW: i64 = 1_800_000_000_000;

async fn open(dir: &tempfile::TempDir) -> Ledger {
    let url = crate::testing::test_database(dir.path()).await;
    let store = Store::open(&url, Durability::Full).await.unwrap();
    store.lead().await.unwrap();
    Ledger::load(store, Default::default()).await.unwrap()
}

fn registration(name: &str) -> Registration {
    Registration {
        name: name.into(),
        labels: BTreeMap::new(),
        capabilities: vec![("job".into(), "1".into())],
        version: "1".into(),
        max_in_flight: 8,
        webhook_url: None,
    }
}

fn job(spoke: &str, directive_type: &str, coalesce: Option<&str>) -> NewDirective {
    NewDirective {
        target: Target::SpokeName(spoke.into()),
        directive_type: directive_type.into(),
        payload: r#"{"n":1}"#.into(),
        priority: 0,
        expires_at: None,
        ack_deadline_ms: 30_000,
        max_attempts: 3,
        idempotency_key: None,
        coalesce_key: coalesce.map(str::to_owned),
        force: true,
    }
}

fn created(step: CreateStep) -> (Uuid, super::Committed) {
    match step {
        CreateStep::Created(c, done) => (c.directives[0].id, done),
        CreateStep::Replay(_) => panic!("not a replay"),
    }
}

/// The writing connection (a new one each time is fine: they take turns).
fn writer(ledger: &Ledger) -> crate::store::Writer {
    ledger.store().writer().unwrap()
}

/// Registers a spoke and commits it.
async fn spoke(ledger: &Ledger, name: &str) -> Uuid {
    let (spoke, done) = ledger
        .register(registration(name), format!("hash-{name}"), NOW)
        .unwrap();
    assert!(commit_next(ledger, &mut writer(ledger)).await);
    committed(done).await.unwrap();
    spoke.record.id
}

#[tokio::test]
async fn writes_gathered_while_no_commit_runs_share_one_and_wait_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let spoke = spoke(&ledger, "a").await;
    let before = ledger.telemetry().commits.get();

    let mut waiting = Vec::new();
    for _ in 0..20 {
        waiting.push(created(ledger.create(&job("a", "job", None), NOW).unwrap()));
    }
    // Not committed: not confirmed, not deliverable.
    assert!(ledger.poll(spoke, 100, NOW).directives.is_empty());
    for (_, done) in &mut waiting {
        assert!(done.try_recv().is_err(), "confirmed before its commit");
    }

    assert!(commit_next(&ledger, &mut writer(&ledger)).await);
    for (_, done) in waiting {
        committed(done).await.unwrap();
    }
    assert_eq!(
        ledger.telemetry().commits.get() - before,
        1,
        "one commit for all 20"
    );
    let delivered = ledger.poll(spoke, 100, NOW);
    assert_eq!(
        delivered.directives.len(),
        8,
        "as many as the window allows"
    );
    assert!(delivered.directives.iter().all(|d| d.attempts == 1));
    // Delivery marks wait for nobody; they go with the next commit.
    assert!(commit_next(&ledger, &mut writer(&ledger)).await);
    let stored = ledger
        .store()
        .directive(delivered.directives[0].id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.state, State::Delivered);
    assert_eq!(stored.attempts, 1);
}

#[tokio::test]
async fn a_directive_replaced_in_the_same_commit_is_stored_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    spoke(&ledger, "a").await;
    let (old, first) = created(ledger.create(&job("a", "job", Some("k")), NOW).unwrap());
    let (new, second) = created(ledger.create(&job("a", "job", Some("k")), NOW).unwrap());
    assert!(commit_next(&ledger, &mut writer(&ledger)).await);
    committed(first).await.unwrap();
    committed(second).await.unwrap();
    let store = ledger.store();
    let old = store.directive(old).await.unwrap().unwrap();
    assert_eq!(old.state, State::Cancelled);
    assert_eq!(old.error, format!("replaced by directive {new}"));
    assert_eq!(
        store.directive(new).await.unwrap().unwrap().state,
        State::Pending
    );
}

#[tokio::test]
async fn a_batch_id_repeated_within_one_commit_is_stored_once_and_the_events_stay_gapless() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let spoke = spoke(&ledger, "a").await;
    let batch = |id: &str| {
        let req = proto::PushMetricsRequest {
            batch_id: id.into(),
            points: vec![proto::MetricPoint {
                domain: "stats".into(),
                name: "n".into(),
                value: 1.5,
                time: Some(crate::wire::timestamp_ms(NOW)),
                ..Default::default()
            }],
        };
        Arc::new(Batch::parse(req, 10, NOW * 1_000_000).unwrap())
    };
    let pushes = ["b1", "b1", "b2"].map(|id| {
        let ledger = ledger.clone();
        let b = batch(id);
        tokio::spawn(async move { ledger.store_metrics(spoke, b, NOW).await })
    });
    // Every push is logged before the committer starts.
    while ledger.lock().log.waiters.len() < 3 {
        tokio::task::yield_now().await;
    }
    assert!(commit_next(&ledger, &mut writer(&ledger)).await);
    let mut outcomes = Vec::new();
    for push in pushes {
        outcomes.push(push.await.unwrap().unwrap());
    }
    outcomes.sort_by_key(|o| matches!(o, StoredBatch::Duplicate(_)));
    assert_eq!(
        outcomes,
        [
            StoredBatch::Accepted(1),
            StoredBatch::Accepted(1),
            StoredBatch::Duplicate(1)
        ]
    );
    let store = ledger.store();
    let last = store.last_event();
    let events = store
        .events_between(0, last, &EventFilter::default(), 100)
        .await
        .unwrap();
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "no hole in the log");
    let received = events
        .iter()
        .filter(|e| e.kind == Kind::MetricsReceived)
        .count();
    assert_eq!(received, 2);
}

#[tokio::test]
async fn a_failed_commit_answers_unavailable_and_the_ledger_returns_to_what_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let spoke = spoke(&ledger, "a").await;
    ledger.store().refuse_directive_type_for_test("boom").await;
    let (boom, boom_done) = created(ledger.create(&job("a", "boom", None), NOW).unwrap());
    let (fine, fine_done) = created(ledger.create(&job("a", "job", None), NOW).unwrap());
    // The commit fails; the ledger is rebuilt before commit_next returns.
    assert!(commit_next(&ledger, &mut writer(&ledger)).await);
    for done in [boom_done, fine_done] {
        match committed(done).await {
            Err(Error::Unavailable(_)) => {}
            other => panic!("expected UNAVAILABLE, got {other:?}"),
        }
    }
    assert_eq!(ledger.telemetry().commit_failures.get(), 1);
    // It holds what the store holds: neither directive, nothing
    // outstanding, nothing to deliver.
    assert_eq!(ledger.spoke(spoke).unwrap().outstanding, 0);
    assert!(ledger.poll(spoke, 10, NOW).directives.is_empty());
    let store = ledger.store();
    assert!(store.directive(boom).await.unwrap().is_none());
    assert!(store.directive(fine).await.unwrap().is_none());

    let (after, done) = created(ledger.create(&job("a", "job", None), NOW).unwrap());
    assert!(commit_next(&ledger, &mut writer(&ledger)).await);
    committed(done).await.unwrap();
    let ids: Vec<Uuid> = ledger
        .poll(spoke, 10, NOW)
        .directives
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids, [after]);
}
