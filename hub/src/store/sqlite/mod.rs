//! The SQLite backend (the default): one database file in WAL mode, one
//! writing connection ([`Writer`], rusqlite, owned by the committer's
//! thread), a pool of read-only connections for queries, and a maintenance
//! connection for migrations and WAL checkpoints. Migrations are embedded
//! from `migrations/sqlite`.

mod commit;
mod directives;
mod events;
mod files;
mod load;
mod metrics;
mod retention;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

pub(super) use commit::Writer;
pub use files::ProcessLock;

use super::{Durability, Options};
use crate::error::{Error, Result};

/// Migrations for the SQLite backend, embedded in the binary.
static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// An open SQLite database; cheap to clone.
#[derive(Clone, Debug)]
pub(super) struct Db {
    /// The database file (the [`Writer`] opens it too).
    path: PathBuf,
    durability: Durability,
    reader: SqlitePool,
    /// Runs migrations, and WAL checkpoints beside the writer, so a commit
    /// never waits for one (the writer's automatic checkpoints are off).
    maintenance: SqlitePool,
    /// Changes committed so far, and as of the last checkpoint.
    committed_changes: Arc<AtomicU64>,
    checkpointed: Arc<AtomicU64>,
}

fn connect_options(url: &str) -> Result<SqliteConnectOptions> {
    SqliteConnectOptions::from_str(url).map_err(|e| Error::invalid("database_url", e.to_string()))
}

/// See [`super::Store::lock_for_process`].
pub(super) fn lock_for_process(url: &str) -> Result<Option<ProcessLock>> {
    let options = connect_options(url)?;
    ProcessLock::take(options.get_filename()).map_err(Error::FailedPrecondition)
}

impl Db {
    /// Opens (creating if needed) the database at `url` and applies pending
    /// migrations; returns it and the highest event sequence ever used.
    pub(super) async fn open(url: &str, options: Options) -> Result<(Self, i64)> {
        let synchronous = match options.durability {
            Durability::Full => SqliteSynchronous::Full,
            Durability::Normal => SqliteSynchronous::Normal,
        };
        let connect = connect_options(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let path = connect.get_filename().to_path_buf();
        files::make_private(&path);
        let maintenance = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(connect.clone())
            .await?;
        MIGRATIONS
            .run(&maintenance)
            .await
            .map_err(|e| Error::Database(e.into()))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(options.pool_size.max(1))
            .connect_with(connect.read_only(true))
            .await?;
        // AUTOINCREMENT remembers the highest sequence ever used, even after
        // retention deleted those events: a sequence is never reused.
        let last: i64 = sqlx::query_scalar(
            "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0), \
             COALESCE((SELECT MAX(seq) FROM events), 0))",
        )
        .fetch_one(&maintenance)
        .await?;
        let db = Self {
            path,
            durability: options.durability,
            reader,
            maintenance,
            committed_changes: Arc::default(),
            checkpointed: Arc::default(),
        };
        Ok((db, last))
    }

    /// Opens the one connection that writes.
    pub(super) fn writer(&self) -> Result<Writer> {
        Writer::open(&self.path, self.durability, self.committed_changes.clone())
    }

    pub(super) fn changes_since_checkpoint(&self) -> u64 {
        self.committed_changes
            .load(Ordering::Relaxed)
            .saturating_sub(self.checkpointed.load(Ordering::Relaxed))
    }

    pub(super) async fn checkpoint(&self) -> Result<()> {
        let changes = self.committed_changes.load(Ordering::Relaxed);
        sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&self.maintenance)
            .await?;
        self.checkpointed.store(changes, Ordering::Relaxed);
        Ok(())
    }

    pub(super) async fn ready(&self) -> Result<bool> {
        let applied: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.reader)
                .await?;
        Ok(applied as usize == MIGRATIONS.iter().count())
    }

    /// Takes the write lock and lets it go at once, within `wait`.
    pub(super) async fn can_write(&self, wait: Duration) -> Result<bool> {
        let probe = async {
            let mut conn = self.maintenance.acquire().await?;
            sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
            sqlx::query("ROLLBACK").execute(&mut *conn).await?;
            Ok::<_, Error>(())
        };
        match tokio::time::timeout(wait, probe).await {
            Ok(Ok(())) => Ok(true),
            Ok(Err(Error::Database(sqlx::Error::Database(e))))
                if e.code()
                    .and_then(|c| c.parse::<i32>().ok())
                    .map(|c| c & 0xff)
                    == Some(5) =>
            {
                Ok(false)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Ok(false),
        }
    }

    /// Makes every commit that inserts a directive of `directive_type`
    /// fail: tests inject faults with it.
    #[cfg(test)]
    pub(super) async fn refuse_directive_type(&self, directive_type: &str) {
        let sql = format!(
            "CREATE TRIGGER refuse_{directive_type} BEFORE INSERT ON directives \
             WHEN NEW.type = '{directive_type}' \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&self.maintenance)
            .await
            .expect("test SQL runs");
    }

    /// Closes both pools, waiting for in-flight statements to finish.
    pub(super) async fn close(&self) {
        self.reader.close().await;
        self.maintenance.close().await;
    }
}
