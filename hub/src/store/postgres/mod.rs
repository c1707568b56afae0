//! The PostgreSQL backend (`postgres://…`): one dedicated writing
//! connection ([`Writer`], made on the committer's thread and made again
//! after a failure), a pool of readers for queries, and a connection that
//! holds the database's hub lock for the store's life. Migrations are
//! embedded from `migrations/postgres` and run at open under sqlx's
//! advisory lock, so hubs starting at once migrate once.
//!
//! One hub per database, until replicas are supported: the hub lock is a
//! session-level advisory lock, so a second hub on the same database
//! refuses to start, and the server lets the lock go when its holder
//! closes the store or dies (its connection ends).

mod commit;
mod directives;
mod events;
mod load;
mod metrics;
mod retention;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Postgres};
use tokio::sync::Mutex;

pub(super) use commit::Writer;

use super::{Durability, Options, Snapshot};
use crate::error::{Error, Result};

/// Migrations for the PostgreSQL backend, embedded in the binary.
static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// The hub lock: an advisory lock with two 32-bit keys ("hub!", 1), a key
/// space apart from the 64-bit key of sqlx's migration lock.
const HUB_LOCK: (i32, i32) = (0x6875_6221, 1);

/// How long a starting hub waits for the hub lock before it refuses: a hub
/// killed a moment ago holds it until the server notices its connection
/// is gone.
const HUB_LOCK_GRACE: Duration = Duration::from_secs(1);

/// What a second hub on the same database is told.
const ANOTHER_HUB: &str = "another hub is serving from this PostgreSQL database; \
    running several replicas is not supported yet: stop the other hub first";

/// What a call is told while the database cannot be reached.
const UNREACHABLE: &str = "the hub's database is unreachable; retry shortly";

/// An open PostgreSQL database; cheap to clone.
#[derive(Clone, Debug)]
pub(super) struct Db {
    reader: PgPool,
    /// Holds the hub lock; `None` once the store is closed.
    lock: Arc<Mutex<Option<PgConnection>>>,
    /// How the writer connects.
    writer: Arc<PgConnectOptions>,
    durability: Durability,
    connect_timeout: Duration,
}

fn connect_options(url: &str) -> Result<PgConnectOptions> {
    // The parser's messages name the part that is wrong, never the URL
    // (which may hold a password).
    PgConnectOptions::from_str(url)
        .map(|o| o.application_name("hub"))
        .map_err(|e| Error::invalid("database_url", format!("not a PostgreSQL URL: {e}")))
}

/// One connection, within `timeout`.
async fn connect(options: &PgConnectOptions, timeout: Duration) -> Result<PgConnection> {
    match tokio::time::timeout(timeout, PgConnection::connect_with(options)).await {
        Ok(conn) => Ok(conn?),
        Err(_) => Err(Error::Database(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "connecting to PostgreSQL took longer than {timeout:?} (--database-connect-timeout)"
            ),
        )))),
    }
}

/// Takes the hub lock on `conn`, waiting [`HUB_LOCK_GRACE`] at most.
async fn take_hub_lock(conn: &mut PgConnection) -> Result<bool> {
    let deadline = tokio::time::Instant::now() + HUB_LOCK_GRACE;
    loop {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
            .bind(HUB_LOCK.0)
            .bind(HUB_LOCK.1)
            .fetch_one(&mut *conn)
            .await?;
        if locked || tokio::time::Instant::now() >= deadline {
            return Ok(locked);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Db {
    /// Connects to the database at `url`, takes the hub lock and applies
    /// pending migrations; returns it and the highest event sequence ever
    /// used.
    pub(super) async fn open(url: &str, options: Options) -> Result<(Self, i64)> {
        let connect_with = connect_options(url)?;
        let mut lock = connect(&connect_with, options.connect_timeout).await?;
        // Migrations' notices ("already exists, skipping") are not news.
        sqlx::query("SET client_min_messages = warning")
            .execute(&mut lock)
            .await?;
        if !take_hub_lock(&mut lock).await? {
            let _ = lock.close().await;
            return Err(Error::FailedPrecondition(ANOTHER_HUB.into()));
        }
        MIGRATIONS
            .run(&mut lock)
            .await
            .map_err(|e| Error::Database(e.into()))?;
        let last: i64 = sqlx::query_scalar(
            "SELECT GREATEST((SELECT last FROM event_sequence), \
             COALESCE((SELECT MAX(seq) FROM events), 0))",
        )
        .fetch_one(&mut lock)
        .await?;
        let reader = PgPoolOptions::new()
            .max_connections(options.pool_size.max(1))
            .acquire_timeout(options.connect_timeout)
            .connect_with(connect_with.clone())
            .await?;
        let db = Self {
            reader,
            lock: Arc::new(Mutex::new(Some(lock))),
            writer: Arc::new(connect_with),
            durability: options.durability,
            connect_timeout: options.connect_timeout,
        };
        Ok((db, last))
    }

    /// The one connection that writes; it connects at its first use, on
    /// the committer's thread.
    pub(super) fn writer(&self) -> Writer {
        Writer::new(self.writer.clone(), self.durability, self.connect_timeout)
    }

    /// A reader's connection; UNAVAILABLE when none can be had within the
    /// connect timeout (the database is down, unreachable, or refuses).
    async fn reader(&self) -> Result<PoolConnection<Postgres>> {
        self.reader.acquire().await.map_err(|e| {
            tracing::warn!(error = %e, "no connection to PostgreSQL for a read");
            Error::Unavailable(UNREACHABLE)
        })
    }

    /// Reads everything the ledger starts from, as committed.
    pub(super) async fn snapshot(&self) -> Result<Snapshot> {
        load::snapshot(&mut *self.reader().await?).await
    }

    pub(super) async fn ready(&self) -> Result<bool> {
        let applied: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(&mut *self.reader().await?)
                .await?;
        Ok(applied as usize == MIGRATIONS.iter().count())
    }

    /// Whether the server answers within `wait` and takes writes (it is not
    /// a standby in recovery).
    pub(super) async fn can_write(&self, wait: Duration) -> Result<bool> {
        let probe = async {
            let writable: bool = sqlx::query_scalar("SELECT NOT pg_is_in_recovery()")
                .fetch_one(&mut *self.reader().await?)
                .await?;
            Ok::<_, Error>(writable)
        };
        match tokio::time::timeout(wait, probe).await {
            Ok(writable) => Ok(writable?),
            Err(_) => Ok(false),
        }
    }

    /// Makes every commit that inserts a directive of `directive_type`
    /// fail: tests inject faults with it.
    #[cfg(test)]
    pub(super) async fn refuse_directive_type(&self, directive_type: &str) {
        let sql = format!(
            "CREATE FUNCTION refuse_{directive_type}() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$; \
             CREATE TRIGGER refuse_{directive_type} BEFORE INSERT ON directives FOR EACH ROW \
             WHEN (NEW.type = '{directive_type}') EXECUTE FUNCTION refuse_{directive_type}()"
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut *self.reader().await.expect("a reader"))
            .await
            .expect("test SQL runs");
    }

    /// Closes the readers, then lets the hub lock go (at once, so a hub
    /// started next finds it free) and closes its connection.
    pub(super) async fn close(&self) {
        self.reader.close().await;
        if let Some(mut lock) = self.lock.lock().await.take() {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                .bind(HUB_LOCK.0)
                .bind(HUB_LOCK.1)
                .execute(&mut lock)
                .await;
            let _ = lock.close().await;
        }
    }
}

/// See [`super::create_postgres_database_for_test`].
#[cfg(any(test, feature = "testing"))]
pub(super) async fn create_database_for_test(server_url: &str) -> Result<String> {
    let mut conn = connect(&connect_options(server_url)?, Duration::from_secs(10)).await?;
    let name = format!("hub_test_{}", uuid::Uuid::now_v7().simple());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await?;
    let _ = conn.close().await;
    // The same URL with the new database as its path.
    let authority = server_url.find("://").map_or(0, |i| i + 3);
    let end = server_url[authority..]
        .find(['/', '?'])
        .map_or(server_url.len(), |i| authority + i);
    let query = server_url[end..]
        .find('?')
        .map_or("", |i| &server_url[end + i..]);
    Ok(format!("{}/{name}{query}", &server_url[..end]))
}

/// See [`super::set_postgres_database_reachable_for_test`].
#[cfg(any(test, feature = "testing"))]
pub(super) async fn set_reachable_for_test(
    server_url: &str,
    db_url: &str,
    yes: bool,
) -> Result<()> {
    let name = connect_options(db_url)?
        .get_database()
        .map(str::to_owned)
        .ok_or_else(|| Error::invalid("database_url", "names no database"))?;
    let mut admin = connect(&connect_options(server_url)?, Duration::from_secs(10)).await?;
    let sql = format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS {yes}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut admin)
        .await?;
    if !yes {
        // Waits until each session has ended.
        sqlx::query(
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&name)
        .execute(&mut admin)
        .await?;
    }
    let _ = admin.close().await;
    Ok(())
}
