//! The cycle on a plain PostgreSQL job queue, the design users build when
//! they do without the hub: one table with a row per job and a queue column
//! (one queue per spoke, as Redis has a stream and NATS a subject per
//! spoke). The producer INSERTs a job and, in the same statement (so the
//! same transaction), `pg_notify`s that the queue has work. Each worker (a
//! spoke) has its own connection, takes pending jobs with one `UPDATE …
//! WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED) RETURNING` (marks them
//! taken), and acks each with an `UPDATE` to done; a job's cycle ends when
//! that UPDATE returns. Every statement commits on its own with
//! `synchronous_commit = on`, the setting the hub's writer runs with under
//! `--sync full`: an answered INSERT or ack is on disk. Done rows stay, as
//! the hub keeps its completed directives.
//!
//! Workers wait with LISTEN/NOTIFY, never by polling, in one of two ways
//! ([`Listen`]): one listening connection for the whole process that wakes
//! the worker a notification names (what job queue libraries do: a
//! PostgreSQL before 17 signals every listening backend of a database on
//! every notifying commit, so a listener per worker costs the server a
//! wake-up per worker per job), or each worker LISTENing on its own
//! connection, the naive way. Either way a notification that arrives while
//! the worker runs a statement is kept for its next wait, so no wake-up is
//! lost and an idle worker costs nothing.

use std::sync::Arc;

use anyhow::Context;
use futures_util::{StreamExt, TryStreamExt};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::cycle::{self, CycleResult, CycleSpec, Item, Producer, ServerCpu, Tracker};
use crate::postgres::{Cluster, Database};

/// How the queue's workers learn that there is work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Listen {
    /// One LISTEN connection for all workers; the notification's payload
    /// names the queue, whose worker is woken in memory.
    Shared,
    /// Each worker LISTENs on its own queue's channel on its own connection.
    PerWorker,
}

/// Jobs one take may mark (as Redis's XREADGROUP COUNT).
const TAKE_LIMIT: usize = 256;

/// Worker connections made at once during the setup.
const CONNECT_CONCURRENCY: usize = 32;

/// The channel of [`Listen::Shared`].
const CHANNEL: &str = "jobs";

const SCHEMA: &str = "
CREATE TABLE jobs (
    id bigserial PRIMARY KEY,
    queue integer NOT NULL,
    payload jsonb NOT NULL,
    state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'taken', 'done')),
    created_at timestamptz NOT NULL DEFAULT now(),
    taken_at timestamptz,
    done_at timestamptz
);
CREATE INDEX jobs_pending ON jobs (queue, id) WHERE state = 'pending';
";

/// [`Listen::Shared`]: one channel, the queue as the payload.
const INSERT_SHARED: &str = "WITH job AS (INSERT INTO jobs (queue, payload) \
     VALUES ($1, $2::jsonb) RETURNING queue) SELECT pg_notify('jobs', queue::text) FROM job";

/// [`Listen::PerWorker`]: a channel per queue.
const INSERT_PER_WORKER: &str = "WITH job AS (INSERT INTO jobs (queue, payload) \
     VALUES ($1, $2::jsonb) RETURNING queue) SELECT pg_notify('jobs_' || queue, '') FROM job";

const TAKE: &str = "UPDATE jobs SET state = 'taken', taken_at = now() WHERE id IN \
     (SELECT id FROM jobs WHERE queue = $1 AND state = 'pending' ORDER BY id LIMIT $2 \
     FOR UPDATE SKIP LOCKED) RETURNING id, payload::text";

const ACK: &str =
    "UPDATE jobs SET state = 'done', done_at = now() WHERE id = $1 AND state = 'taken'";

/// How the queue runs.
#[derive(Debug, Clone, Copy)]
pub struct QueueSpec {
    /// Connections the producer inserts on (at most the window).
    pub producers: usize,
    /// How workers wait.
    pub listen: Listen,
}

/// Runs the cycle on a fresh database of `cluster`.
pub async fn cycle(
    cluster: &Cluster,
    spec: CycleSpec,
    queue: QueueSpec,
) -> anyhow::Result<CycleResult> {
    let database = cluster.fresh_database("queue").await?;
    let result = run(&database, cluster, spec, queue).await;
    let dropped = database.drop().await;
    let result = result?;
    dropped?;
    Ok(result)
}

async fn run(
    database: &Database,
    cluster: &Cluster,
    spec: CycleSpec,
    queue: QueueSpec,
) -> anyhow::Result<CycleResult> {
    // Explicit, whatever the server's default: the hub's writer's setting.
    let options = database.options()?.options([("synchronous_commit", "on")]);
    let mut conn = PgConnection::connect_with(&options)
        .await
        .context("connecting to the queue's database")?;
    sqlx::raw_sql(SCHEMA)
        .execute(&mut conn)
        .await
        .context("creating the jobs table")?;
    let _ = conn.close().await;

    let tracker = Tracker::new(spec.directives, spec.window);
    let mut tasks = JoinSet::new();
    let waits: Vec<Wait> = match queue.listen {
        Listen::PerWorker => {
            futures_util::stream::iter(0..spec.spokes)
                .map(|q| {
                    let options = &options;
                    async move {
                        let listener = listener(options, &format!("jobs_{q}")).await?;
                        anyhow::Ok(Wait::Own(Box::new(listener)))
                    }
                })
                .buffered(CONNECT_CONCURRENCY)
                .try_collect()
                .await?
        }
        Listen::Shared => {
            let wakers: Arc<Vec<Arc<Notify>>> =
                Arc::new((0..spec.spokes).map(|_| Arc::new(Notify::new())).collect());
            let listener = listener(&options, CHANNEL).await?;
            let (wakers2, tracker2) = (wakers.clone(), tracker.clone());
            tasks.spawn(async move {
                if let Err(e) = dispatch(listener, &wakers2).await {
                    tracker2.fail(format!("PostgreSQL listener: {e:#}"));
                }
            });
            let conns: Vec<PgConnection> = futures_util::stream::iter(0..spec.spokes)
                .map(|q| {
                    let options = &options;
                    async move {
                        PgConnection::connect_with(options)
                            .await
                            .with_context(|| format!("connecting worker {q}"))
                    }
                })
                .buffered(CONNECT_CONCURRENCY)
                .try_collect()
                .await?;
            conns
                .into_iter()
                .zip(wakers.iter())
                .map(|(conn, waker)| Wait::Shared(conn, waker.clone()))
                .collect()
        }
    };
    for (q, wait) in waits.into_iter().enumerate() {
        let tracker = tracker.clone();
        tasks.spawn(async move {
            if let Err(e) = work(wait, q, &tracker).await {
                tracker.fail(format!("PostgreSQL worker {q}: {e:#}"));
            }
        });
    }
    let producers = queue.producers.clamp(1, spec.window);
    let pool = PgPoolOptions::new()
        .max_connections(producers as u32)
        .connect_with(options)
        .await
        .context("connecting the producers")?;
    warm(&pool, producers).await?;
    let insert = match queue.listen {
        Listen::Shared => INSERT_SHARED,
        Listen::PerWorker => INSERT_PER_WORKER,
    };
    let producer = Arc::new(QueueProducer {
        pool: pool.clone(),
        insert,
    });
    let cpu = ServerCpu {
        processes: Vec::new(),
        database: cluster.postmaster(),
    };
    let result = cycle::drive(producer, tracker, spec.spokes, cpu, spec.timeout).await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    pool.close().await;
    result
}

/// A connection listening on `channel`.
async fn listener(options: &PgConnectOptions, channel: &str) -> anyhow::Result<PgListener> {
    // The listener's pool only makes its connection again if it breaks.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone())
        .await
        .with_context(|| format!("connecting the listener of {channel}"))?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener
        .listen(channel)
        .await
        .with_context(|| format!("LISTEN {channel}"))?;
    Ok(listener)
}

/// [`Listen::Shared`]: wakes the worker of the queue each notification
/// names.
async fn dispatch(mut listener: PgListener, wakers: &[Arc<Notify>]) -> anyhow::Result<()> {
    loop {
        match listener.try_recv().await.context("LISTEN")? {
            Some(notification) => {
                let queue: usize = notification
                    .payload()
                    .parse()
                    .context("a notification's payload")?;
                if let Some(waker) = wakers.get(queue) {
                    waker.notify_one();
                }
            }
            // The connection broke and was made again: notifications
            // meanwhile are lost, so every worker looks.
            None => wakers.iter().for_each(|w| w.notify_one()),
        }
    }
}

/// How one worker waits for work, with its connection.
enum Wait {
    /// Its own connection LISTENs.
    Own(Box<PgListener>),
    /// Woken by the shared listener.
    Shared(PgConnection, Arc<Notify>),
}

impl Wait {
    /// The worker's connection, after forgetting the notifications it has
    /// (the next take sees what they announced).
    async fn connection(&mut self) -> anyhow::Result<&mut PgConnection> {
        match self {
            Wait::Own(listener) => {
                while listener.next_buffered().is_some() {}
                Ok(sqlx::Acquire::acquire(&mut **listener).await?)
            }
            // A wake-up stored meanwhile stays: one extra take at worst.
            Wait::Shared(conn, _) => Ok(conn),
        }
    }

    /// Until a notification comes (or the connection was made again, when
    /// some may have been lost).
    async fn wait(&mut self) -> anyhow::Result<()> {
        match self {
            Wait::Own(listener) => {
                listener
                    .try_recv()
                    .await
                    .context("waiting for a notification")?;
            }
            Wait::Shared(_, waker) => waker.notified().await,
        }
        Ok(())
    }
}

/// Opens every producer connection before the run, so none is made during it.
async fn warm(pool: &PgPool, producers: usize) -> anyhow::Result<()> {
    let held: Vec<_> = futures_util::stream::iter(0..producers)
        .map(|_| pool.acquire())
        .buffer_unordered(CONNECT_CONCURRENCY)
        .try_collect()
        .await
        .context("connecting the producers")?;
    drop(held);
    Ok(())
}

async fn work(mut wait: Wait, queue: usize, tracker: &Tracker) -> anyhow::Result<()> {
    let queue = i32::try_from(queue).context("queue number")?;
    loop {
        let conn = wait.connection().await?;
        let jobs: Vec<(i64, String)> = sqlx::query_as(TAKE)
            .bind(queue)
            .bind(TAKE_LIMIT as i64)
            .fetch_all(&mut *conn)
            .await
            .context("take")?;
        let more = jobs.len() == TAKE_LIMIT;
        for (id, payload) in jobs {
            let acked = sqlx::query(ACK)
                .bind(id)
                .execute(&mut *conn)
                .await
                .context("ack")?;
            if acked.rows_affected() != 1 {
                tracker.fail(format!("job {id} was not taken when acked"));
            }
            match cycle::seq_of_json(payload.as_bytes()) {
                Some(seq) => tracker.complete(seq),
                None => tracker.fail(format!("job {id} has no seq")),
            }
        }
        if !more {
            wait.wait().await?;
        }
    }
}

struct QueueProducer {
    pool: PgPool,
    insert: &'static str,
}

impl Producer for QueueProducer {
    async fn create(&self, items: Vec<Item>) -> anyhow::Result<()> {
        for item in items {
            let payload = serde_json::to_string(&cycle::payload(item.seq))?;
            sqlx::query(self.insert)
                .bind(i32::try_from(item.spoke).context("queue number")?)
                .bind(payload)
                .execute(&self.pool)
                .await
                .context("INSERT")?;
        }
        Ok(())
    }
}
