//! Storage: the one interface the services use to reach the database.
//!
//! Only this module touches sqlx. The embedded default is SQLite in WAL mode
//! with one writer connection (SQLite serialises writers anyway; one
//! connection avoids lock-upgrade failures) and a small pool of readers.
//! Migrations are embedded from `migrations/sqlite` and run at open.
//!
//! Every state change writes its event in the same transaction ([`Write`]);
//! after commit the highest committed sequence is published, which is what
//! WatchEvents waits on.

mod directives;
mod events;
mod metrics;
mod retention;
mod spokes;
mod timers;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};
use tokio::sync::watch;

pub use directives::{AckApplied, Cancelled, DirectiveFilter, NewDirectiveRow};
pub use metrics::{MetricFilter, StoredBatch};
pub use retention::Purged;
pub use spokes::HealthChange;
pub use timers::TimerSweep;

use crate::error::{Error, Result};
use crate::events::NewEvent;

/// Handle to the hub's database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    writer: SqlitePool,
    reader: SqlitePool,
    /// The highest event sequence committed so far.
    committed_events: Arc<watch::Sender<i64>>,
}

/// One write transaction, with the time it happens at and the last event it
/// recorded.
struct Write<'c> {
    tx: Transaction<'c, Sqlite>,
    now_ms: i64,
    last_event: i64,
}

impl Write<'_> {
    /// Records an event in this transaction.
    async fn event(&mut self, event: NewEvent) -> Result<()> {
        self.last_event = events::insert(&mut self.tx, &event, self.now_ms).await?;
        Ok(())
    }
}

/// Migrations for the SQLite backend, embedded in the binary.
static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

impl Store {
    /// Opens (creating if needed) the database at `url` and applies pending
    /// migrations. Only `sqlite:` URLs are supported so far.
    pub async fn open(url: &str) -> Result<Self> {
        if !url.starts_with("sqlite:") {
            return Err(Error::invalid(
                "database_url",
                "only sqlite: URLs are supported by this build",
            ));
        }
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::invalid("database_url", e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit survives power loss, not only a killed process.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        SQLITE_MIGRATIONS
            .run(&writer)
            .await
            .map_err(|e| Error::Database(e.into()))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        let last: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM events")
            .fetch_one(&reader)
            .await?;
        Ok(Self {
            writer,
            reader,
            committed_events: Arc::new(watch::Sender::new(last.unwrap_or(0))),
        })
    }

    /// Begins a write transaction happening at `now_ms`.
    async fn write(&self, now_ms: i64) -> Result<Write<'static>> {
        Ok(Write {
            tx: self.writer.begin().await?,
            now_ms,
            last_event: 0,
        })
    }

    /// Commits, then publishes the events it recorded.
    async fn commit(&self, w: Write<'static>) -> Result<()> {
        w.tx.commit().await?;
        let last = w.last_event;
        if last > 0 {
            self.committed_events.send_if_modified(|seq| {
                let newer = last > *seq;
                if newer {
                    *seq = last;
                }
                newer
            });
        }
        Ok(())
    }

    /// Follows the highest committed event sequence: every event up to it is
    /// readable.
    pub fn committed_events(&self) -> watch::Receiver<i64> {
        self.committed_events.subscribe()
    }

    /// Whether the database answers and every embedded migration is applied.
    pub async fn ready(&self) -> Result<bool> {
        let applied: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.reader)
                .await?;
        Ok(applied as usize == SQLITE_MIGRATIONS.iter().count())
    }

    /// Closes both pools, waiting for in-flight statements to finish.
    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }
}

/// Whether an error is a violation of a UNIQUE constraint.
fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}
