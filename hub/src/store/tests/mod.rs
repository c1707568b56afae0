//! The store's own tests, one body for both backends: each test runs on a
//! fresh SQLite file, and on a fresh PostgreSQL database when
//! `HUB_TEST_POSTGRES_URL` names a server (otherwise it says it skipped).
//! PostgreSQL's own matters (the hub lock, a lost connection) are in
//! `postgres.rs`.

mod commit;
mod postgres;

use std::collections::BTreeMap;
use std::sync::Arc;

use hub_proto::v1 as proto;
use uuid::Uuid;

use super::{Change, Committed, Durability, Store};
use crate::directives::Fixed;
use crate::events::{EventFilter, EventRecord, Kind, NewEvent};
use crate::metrics::Batch;
use crate::spokes::{SpokeInfo, SpokeLive};

const NOW: i64 = 1_800_000_000_000;

/// A fresh database on the test PostgreSQL server, or `None` (and a line
/// saying the test is skipped) without one.
async fn postgres_url() -> Option<String> {
    match std::env::var("HUB_TEST_POSTGRES_URL") {
        Ok(server) if !server.is_empty() => Some(
            super::create_postgres_database_for_test(&server)
                .await
                .expect("a test database"),
        ),
        _ => {
            eprintln!(
                "skipped: HUB_TEST_POSTGRES_URL is not set (source tests/lib/postgres.sh; pg_start)"
            );
            None
        }
    }
}

/// Runs the async fn `$body(url: String)` on each backend: one test each.
macro_rules! on_both_backends {
    ($body:ident) => {
        mod $body {
            #[tokio::test]
            async fn sqlite() {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("hub.db").display());
                super::$body(url).await;
            }

            #[tokio::test]
            async fn postgres() {
                if let Some(url) = crate::store::tests::postgres_url().await {
                    super::$body(url).await;
                }
            }
        }
    };
}
use on_both_backends;

/// A store that leads its database, as a serving hub's does.
async fn open(url: &str) -> Store {
    let store = Store::open(url, Durability::Full)
        .await
        .expect("open the store");
    store.lead().await.expect("lead the database");
    store
}

/// Commits `changes` with a writer of its own.
async fn commit(store: &Store, changes: &[Change]) -> Committed {
    store
        .writer()
        .unwrap()
        .commit(changes)
        .await
        .expect("the commit")
}

fn spoke(name: &str, at: i64) -> (Arc<SpokeInfo>, SpokeLive) {
    let labels = BTreeMap::from([("zone".to_owned(), "a".to_owned())]);
    let info = SpokeInfo::new(
        Uuid::now_v7(),
        name.into(),
        format!("hash-{name}-{at}"),
        labels,
        vec![("job".into(), "1".into())],
        8,
        at,
        None,
    );
    (Arc::new(info), SpokeLive::registered("1.0".into(), at))
}

fn fixed(group_id: Uuid, key: Option<&str>) -> Arc<Fixed> {
    Arc::new(Fixed {
        directive_type: "job".into(),
        priority: -3,
        max_attempts: 4,
        created_at: NOW,
        expires_at: Some(NOW + 60_000),
        ack_deadline_ms: 30_000,
        group_id,
        idempotency_key: key.map(str::to_owned),
        coalesce_key: None,
    })
}

fn batch(id: &str, points: usize) -> Arc<Batch> {
    let req = proto::PushMetricsRequest {
        batch_id: id.into(),
        points: (0..points)
            .map(|n| proto::MetricPoint {
                domain: "stats".into(),
                name: "n".into(),
                value: n as f64 + 0.25,
                unit: "s".into(),
                labels: [("k".to_owned(), "v".to_owned())].into(),
                time: Some(crate::wire::timestamp_ms(NOW)),
            })
            .collect(),
    };
    Arc::new(Batch::parse(req, 100, NOW * 1_000_000).unwrap())
}

fn event(kind: Kind, spoke: Uuid) -> Change {
    Change::Event {
        event: NewEvent::spoke(kind, spoke, serde_json::json!({"n": 1})),
        at: NOW,
    }
}

/// Every stored event, oldest first.
async fn events(store: &Store) -> Vec<EventRecord> {
    store
        .events_between(0, i64::MAX, &EventFilter::default(), 10_000)
        .await
        .unwrap()
}

#[test]
fn urls_are_logged_without_credentials_or_query() {
    use super::redacted_url;
    assert_eq!(
        redacted_url("postgres://hub:s3cret@db.internal:5432/fleet"),
        "postgres://***@db.internal:5432/fleet"
    );
    assert_eq!(
        redacted_url("postgresql://db.internal/fleet?user=hub&password=s3cret"),
        "postgresql://db.internal/fleet?***"
    );
    assert_eq!(
        redacted_url("sqlite:///var/lib/hub/hub.db"),
        "sqlite:///var/lib/hub/hub.db"
    );
}
