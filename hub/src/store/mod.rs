//! Storage: the log the hub's in-memory ledger is rebuilt from, and the
//! place operators' queries read.
//!
//! Only this module touches sqlx and rusqlite. One interface at the level
//! of the domain ([`Store`] for reads, [`Writer`] for the group commit and
//! retention), two backends, each in its own folder with its own SQL and
//! its own migrations:
//!
//! - `sqlite/` (the default, `sqlite://…`): WAL mode, one writing
//!   connection (rusqlite, owned by the committer's thread: SQLite
//!   serialises writers anyway, and one connection avoids lock-upgrade
//!   failures), a small pool of readers, and a maintenance connection
//!   (migrations at open, WAL checkpoints). Migrations from
//!   `migrations/sqlite`.
//! - `postgres/` (`postgres://…`): one dedicated writing connection, a
//!   pool of readers, and a connection that holds the database's hub lock
//!   for the store's life (one hub per database until replicas are
//!   supported). Migrations from `migrations/postgres`, run under sqlx's
//!   advisory lock, so hubs starting at once migrate once.
//!
//! Writes arrive as [`Change`]s decided by the ledger and are committed in
//! groups ([`Writer::commit`]): one transaction and one sync for everything
//! gathered since the last commit, with multi-row statements on PostgreSQL.
//! Events get their sequence numbers at commit, in commit order; after
//! commit the highest committed sequence is published, which is what
//! WatchEvents waits on. A sequence is never used twice, even after
//! retention deleted its event.

mod batch;
mod changes;
mod filters;
mod postgres;
mod queries;
mod records;
mod retention;
mod snapshot;
mod sqlite;
#[cfg(test)]
mod tests;
mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

pub use changes::{Change, Committed, DirectiveUpdate, StoredBatch};
pub use filters::{DirectiveFilter, MetricFilter};
pub use postgres::{Leader, LeaderChanges};
pub use retention::{Cutoffs, Purged};
pub use snapshot::{IdempotencyRow, OutstandingRow, Snapshot};
pub use sqlite::ProcessLock;
pub use writer::Writer;

use crate::error::{Error, Result};

/// How hard a commit holds on to its data (`hub serve --sync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Durability {
    /// Every commit is synced to disk before anyone is answered: it survives
    /// power loss. (On PostgreSQL: the server's `synchronous_commit`, `on`
    /// unless its operator changed it.)
    #[default]
    Full,
    /// Commits reach the operating system before anyone is answered and are
    /// synced at checkpoints: they survive a killed hub, and an OS crash or
    /// power loss may lose the last moments. (On PostgreSQL: the writer's
    /// session runs with `synchronous_commit = off`.)
    Normal,
}

/// How the store connects (`hub serve --sync`, `--database-pool-size`,
/// `--database-connect-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Durability of commits.
    pub durability: Durability,
    /// Connections that read (operators' queries, the admin page).
    pub pool_size: u32,
    /// How long connecting to the database (or waiting for a reader) may
    /// take before the call is answered UNAVAILABLE.
    pub connect_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            durability: Durability::Full,
            pool_size: 8,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Handle to the hub's database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Backend,
    events: Arc<Sequence>,
}

#[derive(Clone, Debug)]
enum Backend {
    Sqlite(sqlite::Db),
    Postgres(postgres::Db),
}

/// The event sequence: what the next event gets, and what is committed.
#[derive(Debug)]
struct Sequence {
    /// The highest event sequence committed so far.
    committed: watch::Sender<i64>,
    /// The sequence the next event gets. Only the committer (one task)
    /// advances it, after a commit succeeded.
    next: AtomicI64,
}

/// Whether `url` names a PostgreSQL database.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// `url` as logs and errors may show it: without the user and password
/// (`postgres://***@host/db`) and without the query, which may carry a
/// password or a key file (`?***`).
pub fn redacted_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, _)) => (base, "?***"),
        None => (url, ""),
    };
    let base = match (base.find("://"), base.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &base[..scheme], &base[at..])
        }
        _ => base.to_owned(),
    };
    format!("{base}{query}")
}

impl Store {
    /// Makes this process the only hub serving from the SQLite database at
    /// `url` until the returned lock is dropped (or the process ends): a
    /// second hub on the same SQLite database refuses to start with
    /// FAILED_PRECONDITION naming the lock. `None` for a database without a
    /// file (in memory) and for PostgreSQL, whose lock [`Store::open`]
    /// takes in the database itself.
    pub fn lock_for_process(url: &str) -> Result<Option<ProcessLock>> {
        if !url.starts_with("sqlite:") {
            return Ok(None);
        }
        sqlite::lock_for_process(url)
    }

    /// Opens (creating if needed) the database at `url` with default pool
    /// size and timeouts and applies pending migrations.
    pub async fn open(url: &str, durability: Durability) -> Result<Self> {
        let options = Options {
            durability,
            ..Options::default()
        };
        Self::open_with(url, options).await
    }

    /// Opens the database at `url` (`sqlite:…`, `postgres://…` or
    /// `postgresql://…`) and applies pending migrations. Before it writes,
    /// the hub must lead the database ([`Store::lead`]).
    pub async fn open_with(url: &str, options: Options) -> Result<Self> {
        let (backend, last) = if url.starts_with("sqlite:") {
            let (db, last) = sqlite::Db::open(url, options).await?;
            (Backend::Sqlite(db), last)
        } else if is_postgres_url(url) {
            let (db, last) = postgres::Db::open(url, options).await?;
            (Backend::Postgres(db), last)
        } else {
            return Err(Error::invalid(
                "database_url",
                "must be a sqlite:, postgres:// or postgresql:// URL",
            ));
        };
        Ok(Self {
            backend,
            events: Arc::new(Sequence {
                committed: watch::Sender::new(last),
                next: AtomicI64::new(last + 1),
            }),
        })
    }

    /// Waits until this hub leads the database; at once on SQLite (one hub
    /// per file: [`Store::lock_for_process`]) and when it already leads.
    /// On PostgreSQL, several hubs may open one database: one leads and
    /// writes, the others wait here (standbys) until its lock is let go
    /// (it closed its store, or died).
    pub async fn lead(&self) -> Result<()> {
        let Backend::Postgres(db) = &self.backend else {
            return Ok(());
        };
        if let Some(last) = db.lead().await? {
            self.led_after(last);
        }
        Ok(())
    }

    /// Tries once to lead ([`Store::lead`] without waiting): whether this
    /// hub leads now.
    pub async fn lead_now(&self) -> Result<bool> {
        let Backend::Postgres(db) = &self.backend else {
            return Ok(true);
        };
        if let Some(last) = db.lead_now().await? {
            self.led_after(last);
        }
        Ok(db.leads())
    }

    /// The gRPC URL the other replicas forward calls to while this hub
    /// leads (written when it takes the lead). Nothing on SQLite.
    pub fn advertise(&self, url: String) {
        if let Backend::Postgres(db) = &self.backend {
            db.advertise(url);
        }
    }

    /// Who leads the database now: `None` on SQLite (one hub per file).
    pub async fn leader(&self) -> Result<Option<Leader>> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(None),
            Backend::Postgres(db) => Ok(Some(db.leader().await?)),
        }
    }

    /// Hubs taking the lead, as they happen: `None` on SQLite.
    pub async fn leader_changes(&self) -> Result<Option<LeaderChanges>> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(None),
            Backend::Postgres(db) => Ok(Some(db.leader_changes().await?)),
        }
    }

    /// Completes, saying why, when this hub finds that another one leads
    /// the database now (it writes nothing more: every commit fails with
    /// [`Error::NotLeading`]). Never on SQLite.
    pub async fn deposed(&self) -> String {
        match &self.backend {
            Backend::Sqlite(_) => std::future::pending().await,
            Backend::Postgres(db) => db.deposed().await,
        }
    }

    /// Lets the PostgreSQL leader lock go as a lost connection would, the
    /// epoch unchanged: tests make another hub lead while this one runs.
    #[cfg(test)]
    pub(crate) async fn drop_leader_lock_for_test(&self) {
        if let Backend::Postgres(db) = &self.backend {
            db.drop_leader_lock_for_test().await;
        }
    }

    /// Follows the highest committed event sequence: every event up to it is
    /// readable.
    pub fn committed_events(&self) -> watch::Receiver<i64> {
        self.events.committed.subscribe()
    }

    /// The highest committed event sequence now.
    pub fn last_event(&self) -> i64 {
        *self.events.committed.borrow()
    }

    fn next_seq(&self) -> i64 {
        self.events.next.load(Ordering::Relaxed)
    }

    /// A commit succeeded: the next event gets `next`, and everything
    /// before it is committed.
    fn events_committed(&self, next: i64) {
        self.events.next.store(next, Ordering::Relaxed);
        self.raise_committed(next - 1);
    }

    /// This hub leads now, and `last` is the highest sequence stored: the
    /// previous leader's commits are all in, the next event goes after.
    fn led_after(&self, last: i64) {
        self.events.next.fetch_max(last + 1, Ordering::Relaxed);
        self.raise_committed(last);
    }

    /// Every event up to `last` is committed (a lower mark changes nothing).
    fn raise_committed(&self, last: i64) {
        self.events.committed.send_if_modified(|seq| {
            let newer = last > *seq;
            if newer {
                *seq = last;
            }
            newer
        });
    }

    /// Changes committed since the last checkpoint (always 0 on PostgreSQL,
    /// which checkpoints by itself).
    pub fn changes_since_checkpoint(&self) -> u64 {
        match &self.backend {
            Backend::Sqlite(db) => db.changes_since_checkpoint(),
            Backend::Postgres(_) => 0,
        }
    }

    /// Copies committed pages from SQLite's WAL into the database file
    /// without waiting for readers or the writer (PASSIVE); the writer
    /// starts the WAL over once all of it is copied. A checkpoint syncs the
    /// database file, so the hub runs few: see `timers::run_checkpointer`.
    /// Nothing to do on PostgreSQL.
    pub async fn checkpoint(&self) -> Result<()> {
        match &self.backend {
            Backend::Sqlite(db) => db.checkpoint().await,
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// The one connection that writes (for the committer).
    pub fn writer(&self) -> Result<Writer> {
        Writer::open(self)
    }

    /// Whether the database answers and every embedded migration is applied.
    pub async fn ready(&self) -> Result<bool> {
        match &self.backend {
            Backend::Sqlite(db) => db.ready().await,
            Backend::Postgres(db) => db.ready().await,
        }
    }

    /// Whether a write could start now, within `wait`: on SQLite, the write
    /// lock is free (another process holding the database locked makes
    /// this fail); on PostgreSQL, the server answers and is not a read-only
    /// standby.
    pub async fn can_write(&self, wait: Duration) -> Result<bool> {
        match &self.backend {
            Backend::Sqlite(db) => db.can_write(wait).await,
            Backend::Postgres(db) => db.can_write(wait).await,
        }
    }

    /// Makes every commit that inserts a directive of `directive_type`
    /// fail (a trigger): tests inject faults with it.
    #[cfg(test)]
    pub(crate) async fn refuse_directive_type_for_test(&self, directive_type: &str) {
        match &self.backend {
            Backend::Sqlite(db) => db.refuse_directive_type(directive_type).await,
            Backend::Postgres(db) => db.refuse_directive_type(directive_type).await,
        }
    }

    /// Closes the connections, waiting for in-flight statements to finish;
    /// on PostgreSQL this lets a standby lead the database.
    pub async fn close(&self) {
        match &self.backend {
            Backend::Sqlite(db) => db.close().await,
            Backend::Postgres(db) => db.close().await,
        }
    }
}

/// Creates an empty database on the PostgreSQL server at `server_url` (any
/// database there that the user may connect to) and returns its URL: each
/// test hub gets its own. Test support only.
#[cfg(any(test, feature = "testing"))]
pub async fn create_postgres_database_for_test(server_url: &str) -> Result<String> {
    postgres::create_database_for_test(server_url).await
}

/// Cuts the PostgreSQL database at `db_url` off (no new connections, and
/// every session on it ended: to the hub, the database is gone), or lets
/// connections in again; `server_url` is a superuser's. Test support only.
#[cfg(any(test, feature = "testing"))]
pub async fn set_postgres_database_reachable_for_test(
    server_url: &str,
    db_url: &str,
    reachable: bool,
) -> Result<()> {
    postgres::set_reachable_for_test(server_url, db_url, reachable).await
}
