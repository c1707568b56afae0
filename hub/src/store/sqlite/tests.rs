//! The store across an upgrade: a database written by the previous release
//! keeps everything when this release's migrations run.

use std::borrow::Cow;

use sqlx::migrate::Migrator;
use sqlx::sqlite::SqlitePoolOptions;

use super::MIGRATIONS;
use crate::store::{Backend, Durability, Store};

/// The hardening migration's version: everything before it is the previous
/// release's schema.
const HARDENING: i64 = 20261201000001;

#[tokio::test]
async fn an_upgrade_keeps_spokes_directives_and_keys_and_frees_deleted_names() {
    if crate::testing::skip_on_postgres("an upgrade of SQLite's schema") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("hub.db").display());
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            url.parse::<sqlx::sqlite::SqliteConnectOptions>()
                .unwrap()
                .create_if_missing(true)
                .foreign_keys(true),
        )
        .await
        .unwrap();
    let previous = Migrator {
        migrations: Cow::Owned(
            MIGRATIONS
                .iter()
                .filter(|m| m.version < HARDENING)
                .cloned()
                .collect(),
        ),
        ignore_missing: false,
        locking: true,
        no_tx: false,
        table_name: Cow::Borrowed("_sqlx_migrations"),
        create_schemas: Cow::Borrowed(&[]),
    };
    previous.run(&pool).await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO spokes (id, name, key_hash, labels, capabilities, version, max_in_flight, \
         registered_at, health) VALUES ('0190f0f0-0000-7000-8000-000000000001', 'kept', 'h1', \
         '{}', '[]', '1', 32, 1, 'ONLINE'); \
         INSERT INTO directives (id, spoke_id, type, payload, state, max_attempts, priority, \
         created_at, updated_at, ack_deadline_ms, group_id) VALUES \
         ('0190f0f0-0000-7000-8000-0000000000d1', '0190f0f0-0000-7000-8000-000000000001', 't', \
         '{\"n\":1}', 'PENDING', 5, 0, 1, 1, 30000, '0190f0f0-0000-7000-8000-0000000000a1'); \
         INSERT INTO idempotency_keys (key, group_id, created_at) VALUES \
         ('k', '0190f0f0-0000-7000-8000-0000000000a1', 1);",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    let store = Store::open(&url, Durability::Full).await.unwrap();
    let snapshot = store.snapshot().await.unwrap();
    assert_eq!(snapshot.spokes.len(), 1);
    assert_eq!(snapshot.spokes[0].0.name, "kept");
    assert_eq!(snapshot.outstanding.len(), 1);
    assert_eq!(snapshot.idempotency[0].key, "k");
    assert_eq!(
        snapshot.idempotency[0].fingerprint, "",
        "an old key matches any repeat"
    );
    let id = snapshot.outstanding[0].id;
    let payloads = store.payloads(&[id]).await.unwrap();
    assert_eq!(payloads[&id], "{\"n\":1}");

    // A deleted spoke's name may be taken again; two live ones may not.
    let Backend::Sqlite(db) = &store.backend else {
        unreachable!("an sqlite: URL")
    };
    sqlx::raw_sql(
        "UPDATE spokes SET deleted_at = 2 WHERE name = 'kept'; \
             INSERT INTO spokes (id, name, key_hash, labels, capabilities, version, \
             max_in_flight, registered_at) VALUES ('0190f0f0-0000-7000-8000-000000000002', \
             'kept', 'h2', '{}', '[]', '1', 32, 3)",
    )
    .execute(&db.maintenance)
    .await
    .unwrap();
    let again = sqlx::query(
        "INSERT INTO spokes (id, name, key_hash, labels, capabilities, version, \
         max_in_flight, registered_at) VALUES ('0190f0f0-0000-7000-8000-000000000003', \
         'kept', 'h3', '{}', '[]', '1', 32, 4)",
    )
    .execute(&db.maintenance)
    .await;
    assert!(again.is_err(), "a live name is unique");
    let live = store.snapshot().await.unwrap().spokes;
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].0.key_hash, "h2");
    store.close().await;
}
