//! Storage: the log the hub's in-memory ledger is rebuilt from, and the
//! place operators' queries read.
//!
//! Only this module touches sqlx and rusqlite. The embedded default is
//! SQLite in WAL mode with one writing connection ([`Writer`], owned by
//! the committer's thread: SQLite serialises writers anyway, and one
//! connection avoids lock-upgrade failures), a small pool of readers, and a
//! maintenance connection (migrations at open, WAL checkpoints). Migrations
//! are embedded from `migrations/sqlite`.
//!
//! Writes arrive as [`Change`]s decided by the ledger and are committed in
//! groups ([`Store::commit`]): one transaction and one sync for everything
//! gathered since the last commit, with multi-row statements. Events get
//! their sequence numbers here, in commit order; after commit the highest
//! committed sequence is published, which is what WatchEvents waits on.

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
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use tokio::sync::watch;

pub use commit::{Change, Committed, DirectiveUpdate, Writer};
pub use directives::DirectiveFilter;
pub use files::ProcessLock;
pub use load::{IdempotencyRow, OutstandingRow, Snapshot};
pub use metrics::{MetricFilter, StoredBatch};
pub use retention::{Cutoffs, Purged};

use crate::error::{Error, Result};

/// How hard a commit holds on to its data (`hub serve --sync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Durability {
    /// Every commit is synced to disk before anyone is answered: it survives
    /// power loss.
    #[default]
    Full,
    /// Commits reach the operating system before anyone is answered and are
    /// synced at checkpoints: they survive a killed hub, and an OS crash or
    /// power loss may lose the last moments.
    Normal,
}

/// Handle to the hub's database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
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
    /// The highest event sequence committed so far.
    committed_events: Arc<watch::Sender<i64>>,
    /// The sequence the next event gets. Only the committer (one task)
    /// advances it.
    next_seq: Arc<AtomicI64>,
}

/// Migrations for the SQLite backend, embedded in the binary.
static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

impl Store {
    /// Makes this process the only hub serving from the database at `url`
    /// until the returned lock is dropped (or the process ends): a second
    /// hub on the same SQLite database refuses to start with
    /// FAILED_PRECONDITION naming the lock. `None` for a database without a
    /// file (in memory).
    pub fn lock_for_process(url: &str) -> Result<Option<ProcessLock>> {
        if !url.starts_with("sqlite:") {
            return Ok(None);
        }
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::invalid("database_url", e.to_string()))?;
        ProcessLock::take(options.get_filename()).map_err(Error::FailedPrecondition)
    }

    /// Opens (creating if needed) the database at `url` and applies pending
    /// migrations. Only `sqlite:` URLs are supported so far.
    pub async fn open(url: &str, durability: Durability) -> Result<Self> {
        if !url.starts_with("sqlite:") {
            return Err(Error::invalid(
                "database_url",
                "only sqlite: URLs are supported by this build",
            ));
        }
        let synchronous = match durability {
            Durability::Full => SqliteSynchronous::Full,
            Durability::Normal => SqliteSynchronous::Normal,
        };
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| Error::invalid("database_url", e.to_string()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let path = options.get_filename().to_path_buf();
        files::make_private(&path);
        let maintenance = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        SQLITE_MIGRATIONS
            .run(&maintenance)
            .await
            .map_err(|e| Error::Database(e.into()))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        // AUTOINCREMENT remembers the highest sequence ever used, even after
        // retention deleted those events: a sequence is never reused.
        let last: i64 = sqlx::query_scalar(
            "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0), \
             COALESCE((SELECT MAX(seq) FROM events), 0))",
        )
        .fetch_one(&maintenance)
        .await?;
        Ok(Self {
            path,
            durability,
            reader,
            maintenance,
            committed_changes: Arc::default(),
            checkpointed: Arc::default(),
            committed_events: Arc::new(watch::Sender::new(last)),
            next_seq: Arc::new(AtomicI64::new(last + 1)),
        })
    }

    /// Publishes `last` as the highest committed event sequence.
    fn publish_events(&self, last: i64) {
        self.committed_events.send_if_modified(|seq| {
            let newer = last > *seq;
            if newer {
                *seq = last;
            }
            newer
        });
    }

    /// Follows the highest committed event sequence: every event up to it is
    /// readable.
    pub fn committed_events(&self) -> watch::Receiver<i64> {
        self.committed_events.subscribe()
    }

    /// The highest committed event sequence now.
    pub fn last_event(&self) -> i64 {
        *self.committed_events.borrow()
    }

    fn take_seq(&self) -> i64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Changes committed since the last checkpoint.
    pub fn changes_since_checkpoint(&self) -> u64 {
        self.committed_changes
            .load(Ordering::Relaxed)
            .saturating_sub(self.checkpointed.load(Ordering::Relaxed))
    }

    /// Copies committed pages from the WAL into the database file without
    /// waiting for readers or the writer (PASSIVE); the writer starts the
    /// WAL over once all of it is copied. A checkpoint syncs the database
    /// file, so the hub runs few: see `timers::run_checkpointer`.
    pub async fn checkpoint(&self) -> Result<()> {
        let changes = self.committed_changes.load(Ordering::Relaxed);
        sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&self.maintenance)
            .await?;
        self.checkpointed.store(changes, Ordering::Relaxed);
        Ok(())
    }

    /// Opens the one connection that writes (for the committer).
    pub fn writer(&self) -> Result<Writer> {
        Writer::open(&self.path, self.durability, self.clone())
    }

    /// Whether the database answers and every embedded migration is applied.
    pub async fn ready(&self) -> Result<bool> {
        let applied: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.reader)
                .await?;
        Ok(applied as usize == SQLITE_MIGRATIONS.iter().count())
    }

    /// Whether a write could start now: takes the write lock and lets it
    /// go at once, within `wait` (another process holding the database
    /// locked makes this fail).
    pub async fn can_write(&self, wait: Duration) -> Result<bool> {
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

    /// Runs `sql` on the writer connection: tests inject faults with it.
    #[cfg(test)]
    pub(crate) async fn execute_for_test(&self, sql: &'static str) {
        sqlx::query(sql)
            .execute(&self.maintenance)
            .await
            .expect("test SQL runs");
    }

    /// Closes both pools, waiting for in-flight statements to finish.
    pub async fn close(&self) {
        self.reader.close().await;
        self.maintenance.close().await;
    }
}
