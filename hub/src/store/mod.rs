//! Storage: the one interface the services use to reach the database.
//!
//! Only this module touches sqlx. The embedded default is SQLite in WAL mode
//! with one writer connection (SQLite serialises writers anyway; one
//! connection avoids lock-upgrade failures) and a small pool of readers.
//! Migrations are embedded from `migrations/sqlite` and run at open.

mod directives;
mod metrics;
mod spokes;

use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

pub use directives::{AckApplied, DirectiveFilter, NewDirectiveRow};
pub use metrics::{MetricFilter, StoredBatch};

use crate::error::{Error, Result};

/// Handle to the hub's database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    writer: SqlitePool,
    reader: SqlitePool,
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
        Ok(Self { writer, reader })
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
