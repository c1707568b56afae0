//! PostgreSQL's own matters: one hub leads a database at a time (the
//! leader lock and the epoch every commit checks), and a
//! lost database answering UNAVAILABLE until it is back. Each test needs
//! `HUB_TEST_POSTGRES_URL` and says it skipped without it.

use std::time::Duration;

use sqlx::Connection;
use tonic::Code;

use super::*;
use crate::error::Error;

/// Lets connections to the database of `url` in or not; cutting them off
/// also ends every session on it: the database is gone for the hub.
async fn reachable(url: &str, yes: bool) {
    let server = std::env::var("HUB_TEST_POSTGRES_URL").unwrap();
    crate::store::set_postgres_database_reachable_for_test(&server, url, yes)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_second_hub_on_the_same_database_stands_by_until_the_first_closes() {
    let Some(url) = postgres_url().await else {
        return;
    };
    let first = open(&url).await;
    let (a, live) = spoke("a", NOW);
    commit(
        &first,
        &[
            Change::Spoke(a.clone(), live),
            event(Kind::SpokeRegistered, a.id),
        ],
    )
    .await;
    let second = Store::open(&url, Durability::Full).await.unwrap();
    let standby = tokio::spawn({
        let second = second.clone();
        async move { second.lead().await }
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!standby.is_finished(), "a second hub led beside the first");
    // It writes nothing while it stands by.
    let refused = second
        .writer()
        .unwrap()
        .commit(&[event(Kind::SpokeUpdated, a.id)])
        .await
        .expect_err("a standby wrote");
    assert!(matches!(refused, Error::NotLeading), "{refused:?}");
    assert_eq!(tonic::Status::from(refused).code(), Code::Unavailable);
    // Another database on the same server is another fleet.
    let elsewhere = open(&postgres_url().await.unwrap()).await;
    elsewhere.close().await;

    first.close().await;
    tokio::time::timeout(Duration::from_secs(10), standby)
        .await
        .expect("the standby leads once the first hub closed")
        .unwrap()
        .unwrap();
    // It goes on after the first hub's events.
    assert_eq!(second.last_event(), 1);
    commit(&second, &[event(Kind::SpokeUpdated, a.id)]).await;
    let seqs: Vec<i64> = events(&second).await.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2]);
    second.close().await;
}

#[tokio::test]
async fn a_hub_that_lost_its_lead_without_knowing_writes_nothing_more() {
    let Some(url) = postgres_url().await else {
        return;
    };
    let first = open(&url).await;
    let mut old_writer = first.writer().unwrap();
    let (a, live) = spoke("a", NOW);
    old_writer
        .commit(&[
            Change::Spoke(a.clone(), live),
            event(Kind::SpokeRegistered, a.id),
        ])
        .await
        .unwrap();
    // The first hub's lock is let go as a lost connection would, and a
    // second hub leads.
    first.drop_leader_lock_for_test().await;
    let second = open(&url).await;
    let refused = old_writer
        .commit(&[event(Kind::SpokeUpdated, a.id)])
        .await
        .expect_err("a replaced leader wrote");
    assert!(matches!(refused, Error::NotLeading), "{refused:?}");
    let why = tokio::time::timeout(Duration::from_secs(10), first.deposed())
        .await
        .expect("the replaced leader notices");
    assert!(why.contains("another hub leads"), "{why}");
    commit(&second, &[event(Kind::SpokeUpdated, a.id)]).await;
    let seqs: Vec<i64> = events(&second).await.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2], "only the leader's events are stored");
    drop(old_writer);
    first.close().await;
    second.close().await;
}

#[tokio::test]
async fn a_lost_database_answers_unavailable_and_the_store_recovers_when_it_returns() {
    let Some(url) = postgres_url().await else {
        return;
    };
    let store = open(&url).await;
    let mut writer = store.writer().unwrap();
    let (a, live) = spoke("a", NOW);
    writer
        .commit(&[
            Change::Spoke(a.clone(), live),
            event(Kind::SpokeRegistered, a.id),
        ])
        .await
        .unwrap();

    reachable(&url, false).await;
    let lost = writer
        .commit(&[event(Kind::SpokeUpdated, a.id)])
        .await
        .expect_err("the writer's session was ended");
    assert_eq!(tonic::Status::from(lost).code(), Code::Unavailable);
    // The next commit tries a new connection, and cannot have one yet.
    let refused = writer
        .commit(&[event(Kind::SpokeUpdated, a.id)])
        .await
        .expect_err("the database takes no connections");
    assert_eq!(tonic::Status::from(refused).code(), Code::Unavailable);
    let read = store
        .directive(Uuid::now_v7())
        .await
        .expect_err("no reader");
    assert_eq!(tonic::Status::from(read).code(), Code::Unavailable);
    assert!(store.ready().await.is_err(), "not ready while it is gone");
    assert!(!matches!(
        store.can_write(std::time::Duration::from_secs(1)).await,
        Ok(true)
    ));

    reachable(&url, true).await;
    writer
        .commit(&[event(Kind::SpokeUpdated, a.id)])
        .await
        .expect("a commit on a new connection");
    assert!(store.ready().await.unwrap());
    assert!(
        store
            .can_write(std::time::Duration::from_secs(1))
            .await
            .unwrap()
    );
    let seqs: Vec<i64> = events(&store).await.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2], "the failed commits gave no sequence");
    assert_eq!(store.last_event(), 2);
    drop(writer);
    store.close().await;
}

#[tokio::test]
async fn a_new_writer_connection_never_gives_a_stored_sequence_again() {
    let Some(url) = postgres_url().await else {
        return;
    };
    let store = open(&url).await;
    let (a, live) = spoke("a", NOW);
    commit(
        &store,
        &[
            Change::Spoke(a.clone(), live),
            event(Kind::SpokeRegistered, a.id),
        ],
    )
    .await;
    // A commit that landed while its answer was lost: the store's count is
    // behind what is stored.
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "INSERT INTO events (seq, type, time, details) VALUES (2, 'SPOKE_UPDATED', 0, '{}'); \
         UPDATE event_sequence SET last = 2",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    admin.close().await.unwrap();
    commit(&store, &[event(Kind::SpokeUpdated, a.id)]).await;
    let seqs: Vec<i64> = events(&store).await.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(store.last_event(), 3);
    store.close().await;
}

#[tokio::test]
async fn the_writer_syncs_each_commit_on_full_and_not_on_normal() {
    let Some(url) = postgres_url().await else {
        return;
    };
    let name = url.rsplit_once('/').unwrap().1;
    for (server, durability, expected) in [
        // The test server does not sync; `full` makes its commits sync.
        ("off", Durability::Full, "on"),
        // A server that waits for its standbys keeps doing so.
        ("remote_apply", Durability::Full, "remote_apply"),
        ("on", Durability::Normal, "off"),
    ] {
        let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
        let sql = format!("ALTER DATABASE {name} SET synchronous_commit = {server}");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
            .unwrap();
        admin.close().await.unwrap();
        let options = crate::store::Options {
            durability,
            ..Default::default()
        };
        let store = Store::open_with(&url, options).await.unwrap();
        store.lead().await.unwrap();
        let mut writer = store.writer().unwrap();
        let setting = writer.postgres_setting("synchronous_commit").await.unwrap();
        assert_eq!(
            setting, expected,
            "{durability:?} on a server with {server}"
        );
        let (a, live) = spoke(&format!("{server}-{durability:?}").to_lowercase(), NOW);
        writer.commit(&[Change::Spoke(a, live)]).await.unwrap();
        drop(writer);
        store.close().await;
    }
}
