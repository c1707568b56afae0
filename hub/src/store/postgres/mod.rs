//! The PostgreSQL backend (`postgres://…`): one dedicated writing
//! connection ([`Writer`], made on the committer's thread and made again
//! after a failure), a pool of readers for queries, and a connection that
//! holds the leader lock while this hub leads. Migrations are embedded
//! from `migrations/postgres` and run at open under sqlx's advisory lock,
//! so hubs starting at once migrate once.
//!
//! Several hubs may open one database; one leads at a time and the others
//! stand by ([`Db::lead`]). The leader lock is a session-level advisory
//! lock, which the server lets go when its holder closes the store or dies
//! (its connection ends, found within seconds by TCP keepalives). Taking
//! it raises the epoch in `hub_leader`, and every commit reads that epoch
//! with `FOR SHARE` in its own transaction and writes only under the epoch
//! its hub led with: raising the epoch waits for a commit that read it, and
//! every commit after that fails with [`Error::NotLeading`]. So a hub that
//! lost its lock without noticing (its lock's connection dropped, the
//! server restarted) writes nothing once another leads, and the new leader
//! reads the state after the old leader's last commit.

mod commit;
mod directives;
mod events;
mod load;
mod metrics;
mod retention;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Postgres};
use tokio::sync::Mutex;

pub(super) use commit::Writer;

use super::{Durability, Options, Snapshot};
use crate::error::{Error, Result, causes};

/// Migrations for the PostgreSQL backend, embedded in the binary.
static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// The leader lock: an advisory lock with two 32-bit keys ("hub!", 1), a
/// key space apart from the 64-bit key of sqlx's migration lock.
const LEADER_LOCK: (i32, i32) = (0x6875_6221, 1);

/// The notification channel a hub that takes the lead notifies.
const LEADER_CHANNEL: &str = "hub_leader";

/// How often a leader checks that it still leads, and how long a standby
/// whose connection failed waits before it connects again.
const LEADER_POLL: Duration = Duration::from_millis(250);

/// The highest event sequence ever given.
const LAST_SEQUENCE: &str = "SELECT GREATEST((SELECT last FROM event_sequence), \
     COALESCE((SELECT MAX(seq) FROM events), 0))";

/// What a call is told while the database cannot be reached.
const UNREACHABLE: &str = "the hub's database is unreachable; retry shortly";

/// Who leads a database (see [`Db::leader`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// Raised each time a hub takes the lead.
    pub epoch: i64,
    /// Where the leader takes calls; `None` while no hub leads.
    pub url: Option<String>,
    /// Marks calls forwarded between replicas.
    pub secret: String,
}

/// Hubs taking the lead, as they happen (see [`Db::leader_changes`]).
pub struct LeaderChanges(sqlx::postgres::PgListener);

impl LeaderChanges {
    /// Completes when a hub took the lead, or when the connection was
    /// lost and made again (a change may have been missed: read who leads
    /// again either way).
    pub async fn changed(&mut self) -> Result<()> {
        self.0.try_recv().await?;
        Ok(())
    }
}

/// An open PostgreSQL database; cheap to clone.
#[derive(Clone, Debug)]
pub(super) struct Db {
    reader: PgPool,
    /// Holds the leader lock while this hub leads; `None` before the
    /// first try and after a failure (made again at the next).
    lock: Arc<Mutex<Option<PgConnection>>>,
    /// The epoch this hub leads with; 0 while it does not lead.
    epoch: Arc<AtomicI64>,
    /// The gRPC URL other replicas forward calls to while this hub leads.
    advertised: Arc<std::sync::Mutex<Option<String>>>,
    /// How connections are made.
    options: Arc<PgConnectOptions>,
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

/// A connection for the leader lock. The server's TCP keepalives on it are
/// short, so the lock of a leader cut off from the server is let go within
/// seconds rather than the system's default hours.
async fn lock_connection(options: &PgConnectOptions, timeout: Duration) -> Result<PgConnection> {
    let mut conn = connect(options, timeout).await?;
    sqlx::raw_sql(
        "SET client_min_messages = warning; SET tcp_keepalives_idle = 5; \
         SET tcp_keepalives_interval = 2; SET tcp_keepalives_count = 3",
    )
    .execute(&mut conn)
    .await?;
    Ok(conn)
}

impl Db {
    /// Connects to the database at `url` and applies pending migrations;
    /// returns it and the highest event sequence ever used. It does not
    /// lead yet ([`Db::lead`]).
    pub(super) async fn open(url: &str, options: Options) -> Result<(Self, i64)> {
        let connect_with = connect_options(url)?;
        let mut conn = lock_connection(&connect_with, options.connect_timeout).await?;
        MIGRATIONS
            .run(&mut conn)
            .await
            .map_err(|e| Error::Database(e.into()))?;
        let last: i64 = sqlx::query_scalar(LAST_SEQUENCE)
            .fetch_one(&mut conn)
            .await?;
        let reader = PgPoolOptions::new()
            .max_connections(options.pool_size.max(1))
            .acquire_timeout(options.connect_timeout)
            .connect_with(connect_with.clone())
            .await?;
        let db = Self {
            reader,
            lock: Arc::new(Mutex::new(Some(conn))),
            epoch: Arc::new(AtomicI64::new(0)),
            advertised: Arc::default(),
            options: Arc::new(connect_with),
            durability: options.durability,
            connect_timeout: options.connect_timeout,
        };
        Ok((db, last))
    }

    /// Waits until this hub leads the database: takes the leader lock
    /// (waiting in the server while another hub holds it; connecting again
    /// after [`LEADER_POLL`] when the connection fails) and raises the
    /// epoch. Returns the highest event sequence stored then (the
    /// previous leader's last commit is in), or `None` when it already led.
    pub(super) async fn lead(&self) -> Result<Option<i64>> {
        if self.epoch.load(Ordering::Acquire) != 0 {
            return Ok(None);
        }
        loop {
            let mut slot = self.lock.lock().await;
            match self.try_lead(&mut slot, true).await {
                Ok(Some(last)) => return Ok(Some(last)),
                Ok(None) => {}
                Err(e) => {
                    *slot = None;
                    tracing::warn!(error = %causes(&e), "standby: cannot reach PostgreSQL; retrying");
                }
            }
            drop(slot);
            tokio::time::sleep(LEADER_POLL).await;
        }
    }

    /// Tries once to lead ([`Db::lead`] without the wait): the highest
    /// event sequence stored when it leads now, `None` when another hub
    /// leads (or this one already did).
    pub(super) async fn lead_now(&self) -> Result<Option<i64>> {
        if self.epoch.load(Ordering::Acquire) != 0 {
            return Ok(None);
        }
        let mut slot = self.lock.lock().await;
        let led = self.try_lead(&mut slot, false).await;
        if led.is_err() {
            *slot = None;
        }
        led
    }

    /// Whether this hub leads the database.
    pub(super) fn leads(&self) -> bool {
        self.epoch.load(Ordering::Acquire) != 0
    }

    /// The URL written as this hub's while it leads.
    pub(super) fn advertise(&self, url: String) {
        *self
            .advertised
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(url);
    }

    /// Listens for hubs taking the lead: [`LeaderChanges::changed`]
    /// completes at each (on one connection of its own).
    pub(super) async fn leader_changes(&self) -> Result<LeaderChanges> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.reader).await?;
        listener.listen(LEADER_CHANNEL).await?;
        Ok(LeaderChanges(listener))
    }

    /// Who leads the database now, as stored; `leading` is whether the
    /// leader lock is held (a leader that died leaves its row).
    pub(super) async fn leader(&self) -> Result<Leader> {
        let (epoch, url, secret, leading): (i64, Option<String>, String, bool) = sqlx::query_as(
            "SELECT epoch, grpc_url, secret, EXISTS (SELECT 1 FROM pg_locks \
             WHERE locktype = 'advisory' AND classid = $1 AND objid = $2 AND objsubid = 2 \
             AND granted) FROM hub_leader",
        )
        .bind(LEADER_LOCK.0)
        .bind(LEADER_LOCK.1)
        .fetch_one(&mut *self.reader().await?)
        .await?;
        Ok(Leader {
            epoch,
            url: url.filter(|_| leading),
            secret,
        })
    }

    /// Takes the leader lock, waiting for it when `wait` (the server
    /// answers the moment the holder lets it go or its session ends), and
    /// raises the epoch.
    async fn try_lead(&self, slot: &mut Option<PgConnection>, wait: bool) -> Result<Option<i64>> {
        let conn = match slot {
            Some(conn) => conn,
            None => slot.insert(lock_connection(&self.options, self.connect_timeout).await?),
        };
        if wait {
            sqlx::query("SELECT pg_advisory_lock($1, $2)")
                .bind(LEADER_LOCK.0)
                .bind(LEADER_LOCK.1)
                .execute(&mut *conn)
                .await?;
        } else if !try_leader_lock(conn).await? {
            return Ok(None);
        }
        // Waits for a commit of the previous leader that read the old
        // epoch; every later one of its commits fails.
        let url = self
            .advertised
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let epoch: i64 = sqlx::query_scalar(
            "UPDATE hub_leader SET epoch = epoch + 1, since = now(), grpc_url = $1 \
             RETURNING epoch",
        )
        .bind(url)
        .fetch_one(&mut *conn)
        .await?;
        // Standbys hear of it at once (see `Db::leader_changes`).
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(LEADER_CHANNEL)
            .bind(epoch.to_string())
            .execute(&mut *conn)
            .await?;
        let last: i64 = sqlx::query_scalar(LAST_SEQUENCE)
            .fetch_one(&mut *conn)
            .await?;
        self.epoch.store(epoch, Ordering::Release);
        tracing::info!(epoch, "leading: this hub serves from the database");
        Ok(Some(last))
    }

    /// Completes when this hub, which leads, finds that it no longer does:
    /// another hub raised the epoch (this one's leader lock was let go
    /// without its knowing, e.g. the server restarted). Checks every
    /// [`LEADER_POLL`]; takes the lock again on a new connection when its
    /// connection was lost and nobody else led meanwhile. Never completes
    /// while this hub does not lead.
    pub(super) async fn deposed(&self) -> String {
        loop {
            tokio::time::sleep(LEADER_POLL).await;
            let mine = self.epoch.load(Ordering::Acquire);
            if mine == 0 {
                continue;
            }
            let mut slot = self.lock.lock().await;
            match self.check_lead(&mut slot, mine).await {
                Ok(Some(epoch)) if epoch != mine => {
                    self.epoch.store(0, Ordering::Release);
                    return format!(
                        "another hub leads the database now (epoch {epoch}, this hub led with {mine})"
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    *slot = None;
                    tracing::warn!(error = %causes(&e), "the leader lock's connection failed; trying again");
                }
            }
        }
    }

    /// The epoch stored now, through the lock's connection; on a new
    /// connection, the lock is taken again first (`None` while another
    /// hub holds it: it is about to raise the epoch, or it is a standby
    /// that will).
    async fn check_lead(&self, slot: &mut Option<PgConnection>, mine: i64) -> Result<Option<i64>> {
        let conn = match slot {
            Some(conn) => conn,
            None => {
                let conn = slot.insert(lock_connection(&self.options, self.connect_timeout).await?);
                if !try_leader_lock(conn).await? {
                    tracing::warn!(
                        epoch = mine,
                        "another hub holds the leader lock; this hub writes nothing unless its epoch is still the stored one"
                    );
                }
                conn
            }
        };
        let epoch: i64 = sqlx::query_scalar("SELECT epoch FROM hub_leader")
            .fetch_one(&mut *conn)
            .await?;
        Ok(Some(epoch))
    }

    /// The one connection that writes; it connects at its first use, on
    /// the committer's thread.
    pub(super) fn writer(&self) -> Writer {
        Writer::new(
            self.options.clone(),
            self.epoch.clone(),
            self.durability,
            self.connect_timeout,
        )
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

    /// Lets the leader lock go without a word, as a lost connection would
    /// (the epoch stays): tests make another hub lead while this one runs.
    #[cfg(test)]
    pub(super) async fn drop_leader_lock_for_test(&self) {
        if let Some(conn) = self.lock.lock().await.take() {
            let _ = conn.close().await;
        }
    }

    /// Closes the readers, then lets the leader lock go (at once, so a
    /// standby takes over now) and closes its connection.
    pub(super) async fn close(&self) {
        self.reader.close().await;
        self.epoch.store(0, Ordering::Release);
        if let Some(mut lock) = self.lock.lock().await.take() {
            // A standby stopped while it waited for the lock left that
            // statement running: then the connection is only dropped (its
            // session ends, and with it the wait).
            let release = async {
                let _ = sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                    .bind(LEADER_LOCK.0)
                    .bind(LEADER_LOCK.1)
                    .execute(&mut lock)
                    .await;
                let _ = lock.close().await;
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), release).await;
        }
    }
}

/// Tries the leader lock on `conn` (a session lock: held until released
/// or the session ends). Taking it again on the session holding it counts
/// twice, which [`Db::close`]'s one release and the session's end both undo.
async fn try_leader_lock(conn: &mut PgConnection) -> Result<bool> {
    Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(LEADER_LOCK.0)
        .bind(LEADER_LOCK.1)
        .fetch_one(conn)
        .await?)
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
