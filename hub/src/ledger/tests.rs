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

/// Registers a spoke with webhook delivery and a window of 2; answers its
/// id and the secret the registration showed.
async fn webhook_spoke(ledger: &Ledger, name: &str) -> (Uuid, String) {
    let mut reg = registration(name);
    reg.max_in_flight = 2;
    reg.webhook_url = Some("https://spoke.example/hook".into());
    let (registered, done) = ledger.register(reg, format!("hash-{name}"), NOW).unwrap();
    assert!(commit_next(ledger, &mut writer(ledger)).await);
    committed(done).await.unwrap();
    let secret = registered.webhook_secret.expect("a secret shown once");
    assert!(secret.starts_with("whsec_"), "{secret}");
    (registered.record.id, secret)
}

/// Creates `n` directives for `spoke` and commits them.
async fn create_committed(ledger: &Ledger, spoke: &str, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    let mut waiting = Vec::new();
    for _ in 0..n {
        let (id, done) = created(ledger.create(&job(spoke, "job", None), NOW).unwrap());
        ids.push(id);
        waiting.push(done);
    }
    assert!(commit_next(ledger, &mut writer(ledger)).await);
    for done in waiting {
        committed(done).await.unwrap();
    }
    ids
}

fn take(ledger: &Ledger, spoke: Uuid, now: i64) -> Option<(Uuid, u32)> {
    match ledger.webhook_take(spoke, now) {
        super::WebhookTake::Post(delivery, webhook) => {
            assert_eq!(webhook.url, "https://spoke.example/hook");
            let d = &delivery.directives[0];
            Some((d.id, d.attempts))
        }
        super::WebhookTake::Idle => None,
        super::WebhookTake::Stop => panic!("the worker was told to stop"),
    }
}

#[tokio::test]
async fn a_webhook_spoke_gets_its_directives_only_by_webhook_within_its_window() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let (spoke, _) = webhook_spoke(&ledger, "w").await;
    let ids = create_committed(&ledger, "w", 3).await;
    assert_eq!(ledger.webhook_spokes(), vec![spoke]);

    // Not by poll (nor by a stream, which shares the same rule).
    assert!(ledger.poll(spoke, 10, NOW).directives.is_empty());
    // Two fit the window; the third waits.
    let first = take(&ledger, spoke, NOW).unwrap();
    let second = take(&ledger, spoke, NOW).unwrap();
    assert_eq!((first, second), ((ids[0], 1), (ids[1], 1)));
    assert_eq!(take(&ledger, spoke, NOW), None);
    // The attempt is stored before the request is answered; still PENDING.
    assert!(commit_next(&ledger, &mut writer(&ledger)).await);
    let stored = ledger.store().directive(ids[0]).await.unwrap().unwrap();
    assert_eq!((stored.state, stored.attempts), (State::Pending, 1));

    // A 2xx answer: DELIVERED, its ack deadline running.
    ledger.webhook_delivered(spoke, ids[0], 1, NOW + 5);
    assert!(commit_next(&ledger, &mut writer(&ledger)).await);
    let stored = ledger.store().directive(ids[0]).await.unwrap().unwrap();
    assert_eq!(stored.state, State::Delivered);
    assert_eq!(stored.ack_due_at, Some(NOW + 5 + 30_000));
    // A stale answer (another attempt) changes nothing.
    ledger.webhook_delivered(spoke, ids[1], 7, NOW + 5);
    assert_eq!(
        take(&ledger, spoke, NOW + 5),
        None,
        "the window is still full"
    );

    // A failure keeps the slot until the retry time, then goes out again.
    ledger.webhook_failed(spoke, ids[1], 1, "HTTP 500", 1_000, NOW + 10);
    assert_eq!(take(&ledger, spoke, NOW + 10), None);
    ledger.run_due(NOW + 500);
    assert_eq!(
        take(&ledger, spoke, NOW + 500),
        None,
        "not before its retry"
    );
    ledger.run_due(NOW + 1_010);
    assert_eq!(take(&ledger, spoke, NOW + 1_010), Some((ids[1], 2)));
    // The last attempt failing makes it FAILED, naming why; its slot frees.
    ledger.webhook_failed(spoke, ids[1], 2, "no answer within 1s", 2_000, NOW + 1_020);
    assert_eq!(take(&ledger, spoke, NOW + 1_020), None);
    ledger.run_due(NOW + 3_100);
    assert_eq!(take(&ledger, spoke, NOW + 3_100), Some((ids[1], 3)));
    ledger.webhook_failed(spoke, ids[1], 3, "HTTP 503", 4_000, NOW + 3_200);
    assert!(commit_next(&ledger, &mut writer(&ledger)).await);
    let failed = ledger.store().directive(ids[1]).await.unwrap().unwrap();
    assert_eq!((failed.state, failed.attempts), (State::Failed, 3));
    assert_eq!(
        failed.error,
        "webhook delivery failed 3 times; last: HTTP 503"
    );
    assert_eq!(take(&ledger, spoke, NOW + 3_200), Some((ids[2], 1)));
}

#[tokio::test]
async fn leaving_webhook_delivery_puts_what_the_webhook_held_back_for_the_stream_and_polls() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let (spoke, _) = webhook_spoke(&ledger, "w").await;
    let ids = create_committed(&ledger, "w", 2).await;
    let out = take(&ledger, spoke, NOW).unwrap();
    let waiting = take(&ledger, spoke, NOW).unwrap();
    ledger.webhook_failed(spoke, waiting.0, 1, "HTTP 500", 10_000, NOW);

    let mut reg = registration("w");
    reg.max_in_flight = 2;
    let (registered, done) = ledger.reregister(spoke, reg, NOW + 1).unwrap();
    assert!(registered.webhook_secret.is_none());
    assert!(registered.record.webhook_url.is_none());
    assert!(commit_next(&ledger, &mut writer(&ledger)).await);
    committed(done.expect("a change")).await.unwrap();
    assert!(ledger.webhook_spokes().is_empty());
    assert!(matches!(
        ledger.webhook_take(spoke, NOW + 1),
        super::WebhookTake::Stop
    ));

    // Both go out by poll now, with their next attempt; the answer of the
    // request that was out is stale and changes nothing.
    let polled = ledger.poll(spoke, 10, NOW + 2);
    let mut got: Vec<(Uuid, u32)> = polled
        .directives
        .iter()
        .map(|d| (d.id, d.attempts))
        .collect();
    got.sort();
    assert_eq!(got, vec![(ids[0], 2), (ids[1], 2)]);
    ledger.webhook_delivered(spoke, out.0, 1, NOW + 3);
    // Nor does its old retry time (before the new ack deadlines).
    ledger.run_due(NOW + 10_001);
    assert!(ledger.poll(spoke, 10, NOW + 10_001).directives.is_empty());
}

#[tokio::test]
async fn the_webhook_secret_is_shown_when_made_kept_across_a_restart_and_rotated_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir).await;
    let (spoke, secret) = webhook_spoke(&ledger, "w").await;
    // The same registration again (with the spoke's key) shows nothing.
    let mut reg = registration("w");
    reg.max_in_flight = 2;
    reg.webhook_url = Some("https://spoke.example/other".into());
    let (again, _) = ledger.reregister(spoke, reg.clone(), NOW).unwrap();
    assert_eq!(again.webhook_secret, None);
    assert_eq!(
        again.record.webhook_url.as_deref(),
        Some("https://spoke.example/other")
    );
    // An enrollment retried with the name's key answers as the first.
    let (retried, _) = ledger.register(reg, "hash-w".into(), NOW).unwrap();
    assert_eq!(retried.webhook_secret.as_deref(), Some(secret.as_str()));
    let (rotated, done) = ledger.rotate_key(spoke, "hash-w2".into(), NOW).unwrap();
    let rotated = rotated.expect("a new secret");
    assert_ne!(rotated, secret);
    assert!(commit_next(&ledger, &mut writer(&ledger)).await);
    committed(done).await.unwrap();

    // What a restart rebuilds the ledger from.
    let snapshot = ledger.store().snapshot().await.unwrap();
    let (info, _) = snapshot
        .spokes
        .iter()
        .find(|(info, _)| info.id == spoke)
        .unwrap();
    assert_eq!(info.key_hash, "hash-w2");
    let webhook = info.webhook.as_ref().unwrap();
    assert_eq!(webhook.url, "https://spoke.example/other");
    assert_eq!(webhook.secret, rotated);
}
