//! The group commit on PostgreSQL: everything the ledger decided since the
//! last commit goes into one transaction on the writer's own connection,
//! with one multi-row statement per kind of row (`UNNEST` of one array per
//! column), so a commit is a handful of round trips however many rows it
//! holds.
//!
//! The connection is made on the committer's thread at the first use and
//! dropped after any failure (the server rolls back what it held); the
//! next commit connects again. A new connection first reads the highest
//! event sequence stored: a commit whose answer was lost with the
//! connection may have landed, and its sequences must not be given again.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

use super::super::batch::{EventRow, Rows};
use super::super::{Change, Committed, Durability, Snapshot};
use super::{UNREACHABLE, connect, load, metrics};
use crate::error::{Error, Result, causes};

/// The one connection that writes, owned by the committer's thread.
pub(in crate::store) struct Writer {
    conn: Option<PgConnection>,
    options: Arc<PgConnectOptions>,
    /// The epoch the hub leads with (0: it does not lead); see `super`.
    epoch: Arc<AtomicI64>,
    durability: Durability,
    connect_timeout: Duration,
    /// The connection is new: the next commit reads the sequence stored.
    resync: bool,
}

impl Writer {
    pub(super) fn new(
        options: Arc<PgConnectOptions>,
        epoch: Arc<AtomicI64>,
        durability: Durability,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            conn: None,
            options,
            epoch,
            durability,
            connect_timeout,
            resync: true,
        }
    }

    /// The connection, made now if there is none.
    pub(super) async fn connection(&mut self) -> Result<&mut PgConnection> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => {
                self.resync = true;
                self.connect().await.map_err(|e| {
                    tracing::warn!(error = %causes(&e), "the writer cannot connect to PostgreSQL");
                    Error::Unavailable(UNREACHABLE)
                })?
            }
        };
        Ok(self.conn.insert(conn))
    }

    async fn connect(&self) -> Result<PgConnection> {
        let mut conn = connect(&self.options, self.connect_timeout).await?;
        let sql = match self.durability {
            // Answered once the commit is on the server's disk: the
            // server's setting, unless it is `off` (any other value
            // flushes locally, some wait for standbys as well).
            Durability::Full => {
                "SELECT set_config('synchronous_commit', 'on', false) \
                 WHERE current_setting('synchronous_commit') = 'off'"
            }
            // Answered once the commit reached the server, not its disk: a
            // killed hub loses nothing; a server crash may lose the last
            // moments.
            Durability::Normal => "SET synchronous_commit = off",
        };
        sqlx::query(sql).execute(&mut conn).await?;
        Ok(conn)
    }

    /// Forgets the connection after `result` failed (the server rolls back
    /// what it held): the next use connects again.
    pub(super) fn settle<T>(&mut self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result
            && self.conn.take().is_some()
        {
            tracing::warn!(error = %causes(e), "the writer's PostgreSQL connection failed; the next commit connects again");
        }
        result
    }

    /// Commits `changes` in one transaction, in order, their events
    /// numbered from `first_seq` (or after the highest stored, on a new
    /// connection); returns what the commit decided and the sequence the
    /// next event gets. Nothing is written if it fails.
    pub(in crate::store) async fn commit(
        &mut self,
        changes: &[Change],
        first_seq: i64,
    ) -> Result<(Committed, i64)> {
        let result = self.try_commit(changes, first_seq).await;
        if result.is_ok() {
            self.resync = false;
        }
        self.settle(result)
    }

    async fn try_commit(&mut self, changes: &[Change], first_seq: i64) -> Result<(Committed, i64)> {
        let resync = self.resync;
        let mine = self.epoch.load(Ordering::Acquire);
        if mine == 0 {
            return Err(Error::NotLeading);
        }
        let conn = self.connection().await?;
        let mut tx = conn.begin().await?;
        // The fence (see `super`): a hub that no longer leads writes nothing.
        let epoch: i64 = sqlx::query_scalar("SELECT epoch FROM hub_leader FOR SHARE")
            .fetch_one(&mut *tx)
            .await?;
        if epoch != mine {
            return Err(Error::NotLeading);
        }
        let mut first = first_seq;
        if resync {
            let last: i64 = sqlx::query_scalar("SELECT last FROM event_sequence")
                .fetch_one(&mut *tx)
                .await?;
            first = first.max(last + 1);
        }
        let mut rows = Rows::gather(changes);
        write_rows(&mut tx, &rows).await?;
        let outcomes = metrics::store_batches(&mut tx, &rows.metrics).await?;
        let committed = rows.settle_metrics(outcomes)?;
        let next = rows.number_events(first);
        insert_events(&mut tx, &rows.events, next - 1).await?;
        tx.commit().await?;
        Ok((committed, next))
    }

    /// A setting of the writer's session.
    #[cfg(test)]
    pub(in crate::store) async fn setting(&mut self, name: &str) -> Result<String> {
        let conn = self.connection().await?;
        Ok(sqlx::query_scalar("SELECT current_setting($1)")
            .bind(name)
            .fetch_one(conn)
            .await?)
    }

    /// Reads everything the ledger starts from through the writer's own
    /// connection.
    pub(in crate::store) async fn snapshot(&mut self) -> Result<Snapshot> {
        let result = match self.connection().await {
            Ok(conn) => load::snapshot(conn).await,
            Err(e) => Err(e),
        };
        self.settle(result)
    }
}

/// Writes every row but the metrics and the events, in the order SQLite's
/// commit writes them.
async fn write_rows(conn: &mut PgConnection, rows: &Rows<'_>) -> Result<()> {
    // A deleted spoke's name may be taken again in this same batch.
    if !rows.deleted.is_empty() {
        sqlx::query(
            "UPDATE spokes SET deleted_at = u.at \
             FROM UNNEST($1::uuid[], $2::bigint[]) AS u (id, at) WHERE spokes.id = u.id",
        )
        .bind(rows.deleted.iter().map(|(id, _)| *id).collect::<Vec<_>>())
        .bind(rows.deleted.iter().map(|(_, at)| *at).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    }
    upsert_spokes(conn, rows).await?;
    if !rows.groups.is_empty() {
        sqlx::query(
            "INSERT INTO directive_groups (group_id, payload, created_at) \
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::bigint[])",
        )
        .bind(rows.groups.iter().map(|g| g.0).collect::<Vec<_>>())
        .bind(rows.groups.iter().map(|g| g.1).collect::<Vec<_>>())
        .bind(rows.groups.iter().map(|g| g.2).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    }
    insert_directives(conn, rows).await?;
    update_directives(conn, rows).await?;
    for (stream, through) in &rows.published {
        sqlx::query(
            "INSERT INTO event_publisher (stream, published) VALUES ($1, $2) \
             ON CONFLICT (stream) DO UPDATE \
             SET published = GREATEST(event_publisher.published, EXCLUDED.published)",
        )
        .bind(*stream)
        .bind(*through)
        .execute(&mut *conn)
        .await?;
    }
    if !rows.keys.is_empty() {
        sqlx::query(
            "INSERT INTO idempotency_keys (key, group_id, fingerprint, created_at) \
             SELECT * FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::bigint[])",
        )
        .bind(rows.keys.iter().map(|k| k.key).collect::<Vec<_>>())
        .bind(rows.keys.iter().map(|k| k.group_id).collect::<Vec<_>>())
        .bind(rows.keys.iter().map(|k| k.fingerprint).collect::<Vec<_>>())
        .bind(rows.keys.iter().map(|k| k.created_at).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

async fn upsert_spokes(conn: &mut PgConnection, rows: &Rows<'_>) -> Result<()> {
    if rows.spokes.is_empty() {
        return Ok(());
    }
    let s = &rows.spokes;
    let big = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    sqlx::query(
        "INSERT INTO spokes (id, name, key_hash, labels, capabilities, version, max_in_flight, \
         registered_at, revoked_at, last_heartbeat_at, last_seen_at, status, status_message, \
         reported_in_flight, reported_buffered_points, reported_failed_pushes, health, \
         deleted_at, webhook_url, webhook_secret) \
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
         $6::text[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], \
         $12::bigint[], $13::text[], $14::bigint[], $15::bigint[], $16::bigint[], $17::text[], \
         $18::bigint[], $19::text[], $20::text[]) \
         ON CONFLICT (id) DO UPDATE SET name = excluded.name, key_hash = excluded.key_hash, \
         labels = excluded.labels, capabilities = excluded.capabilities, \
         version = excluded.version, max_in_flight = excluded.max_in_flight, \
         revoked_at = excluded.revoked_at, last_heartbeat_at = excluded.last_heartbeat_at, \
         last_seen_at = excluded.last_seen_at, status = excluded.status, \
         status_message = excluded.status_message, \
         reported_in_flight = excluded.reported_in_flight, \
         reported_buffered_points = excluded.reported_buffered_points, \
         reported_failed_pushes = excluded.reported_failed_pushes, health = excluded.health, \
         deleted_at = COALESCE(excluded.deleted_at, spokes.deleted_at), \
         webhook_url = excluded.webhook_url, webhook_secret = excluded.webhook_secret",
    )
    .bind(s.iter().map(|r| r.info.id).collect::<Vec<_>>())
    .bind(s.iter().map(|r| r.info.name.as_str()).collect::<Vec<_>>())
    .bind(
        s.iter()
            .map(|r| r.info.key_hash.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        s.iter()
            .map(|r| r.info.labels_json.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        s.iter()
            .map(|r| r.info.capabilities_json.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        s.iter()
            .map(|r| r.live.version.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        s.iter()
            .map(|r| i64::from(r.info.max_in_flight))
            .collect::<Vec<_>>(),
    )
    .bind(s.iter().map(|r| r.info.registered_at).collect::<Vec<_>>())
    .bind(s.iter().map(|r| r.info.revoked_at).collect::<Vec<_>>())
    .bind(
        s.iter()
            .map(|r| r.live.last_heartbeat_at)
            .collect::<Vec<_>>(),
    )
    .bind(s.iter().map(|r| r.live.last_seen_at).collect::<Vec<_>>())
    .bind(s.iter().map(|r| r.live.status as i64).collect::<Vec<_>>())
    .bind(
        s.iter()
            .map(|r| r.live.status_message.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        s.iter()
            .map(|r| i64::from(r.live.reported_in_flight))
            .collect::<Vec<_>>(),
    )
    .bind(
        s.iter()
            .map(|r| big(r.live.reported_buffered_points))
            .collect::<Vec<_>>(),
    )
    .bind(
        s.iter()
            .map(|r| big(r.live.reported_failed_pushes))
            .collect::<Vec<_>>(),
    )
    .bind(s.iter().map(|r| r.live.health).collect::<Vec<_>>())
    .bind(s.iter().map(|r| r.deleted_at).collect::<Vec<_>>())
    .bind(
        s.iter()
            .map(|r| r.info.webhook.as_ref().map(|w| w.url.as_str()))
            .collect::<Vec<_>>(),
    )
    .bind(
        s.iter()
            .map(|r| r.info.webhook.as_ref().map(|w| w.secret.as_str()))
            .collect::<Vec<_>>(),
    )
    .execute(conn)
    .await?;
    Ok(())
}

async fn insert_directives(conn: &mut PgConnection, rows: &Rows<'_>) -> Result<()> {
    if rows.created.is_empty() {
        return Ok(());
    }
    let c = &rows.created;
    sqlx::query(
        "INSERT INTO directives (id, spoke_id, type, payload, max_attempts, priority, \
         created_at, expires_at, ack_deadline_ms, group_id, idempotency_key, coalesce_key, \
         state, attempts, updated_at, ack_due_at, result, error, progress, progress_message) \
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bigint[], \
         $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::uuid[], $11::text[], \
         $12::text[], $13::text[], $14::bigint[], $15::bigint[], $16::bigint[], $17::text[], \
         $18::text[], $19::bigint[], $20::text[])",
    )
    .bind(c.iter().map(|r| r.id).collect::<Vec<_>>())
    .bind(c.iter().map(|r| r.spoke_id).collect::<Vec<_>>())
    .bind(
        c.iter()
            .map(|r| r.fixed.directive_type.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(c.iter().map(|r| r.payload).collect::<Vec<_>>())
    .bind(
        c.iter()
            .map(|r| i64::from(r.fixed.max_attempts))
            .collect::<Vec<_>>(),
    )
    .bind(
        c.iter()
            .map(|r| i64::from(r.fixed.priority))
            .collect::<Vec<_>>(),
    )
    .bind(c.iter().map(|r| r.fixed.created_at).collect::<Vec<_>>())
    .bind(c.iter().map(|r| r.fixed.expires_at).collect::<Vec<_>>())
    .bind(
        c.iter()
            .map(|r| r.fixed.ack_deadline_ms)
            .collect::<Vec<_>>(),
    )
    .bind(c.iter().map(|r| r.fixed.group_id).collect::<Vec<_>>())
    .bind(
        c.iter()
            .map(|r| r.fixed.idempotency_key.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(
        c.iter()
            .map(|r| r.fixed.coalesce_key.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(c.iter().map(|r| r.state.state).collect::<Vec<_>>())
    .bind(
        c.iter()
            .map(|r| i64::from(r.state.attempts))
            .collect::<Vec<_>>(),
    )
    .bind(c.iter().map(|r| r.state.updated_at).collect::<Vec<_>>())
    .bind(c.iter().map(|r| r.state.ack_due_at).collect::<Vec<_>>())
    .bind(c.iter().map(|r| r.state.result).collect::<Vec<_>>())
    .bind(c.iter().map(|r| r.state.error).collect::<Vec<_>>())
    .bind(
        c.iter()
            .map(|r| i64::from(r.state.progress))
            .collect::<Vec<_>>(),
    )
    .bind(
        c.iter()
            .map(|r| r.state.progress_message)
            .collect::<Vec<_>>(),
    )
    .execute(conn)
    .await?;
    Ok(())
}

async fn update_directives(conn: &mut PgConnection, rows: &Rows<'_>) -> Result<()> {
    if rows.updated.is_empty() {
        return Ok(());
    }
    let u = &rows.updated;
    sqlx::query(
        "UPDATE directives d SET state = u.state, attempts = u.attempts, \
         updated_at = u.updated_at, ack_due_at = u.ack_due_at, result = u.result, \
         error = u.error, progress = u.progress, progress_message = u.progress_message \
         FROM UNNEST($1::uuid[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], \
         $6::text[], $7::text[], $8::bigint[], $9::text[]) \
         AS u (id, state, attempts, updated_at, ack_due_at, result, error, progress, \
         progress_message) WHERE d.id = u.id",
    )
    .bind(u.iter().map(|r| r.id).collect::<Vec<_>>())
    .bind(u.iter().map(|r| r.state).collect::<Vec<_>>())
    .bind(u.iter().map(|r| i64::from(r.attempts)).collect::<Vec<_>>())
    .bind(u.iter().map(|r| r.updated_at).collect::<Vec<_>>())
    .bind(u.iter().map(|r| r.ack_due_at).collect::<Vec<_>>())
    .bind(u.iter().map(|r| r.result).collect::<Vec<_>>())
    .bind(u.iter().map(|r| r.error).collect::<Vec<_>>())
    .bind(u.iter().map(|r| i64::from(r.progress)).collect::<Vec<_>>())
    .bind(u.iter().map(|r| r.progress_message).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// Inserts the events and moves the stored high-water mark to `last`, in
/// one statement.
async fn insert_events(conn: &mut PgConnection, events: &[EventRow], last: i64) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "WITH inserted AS (INSERT INTO events (seq, type, time, spoke_id, directive_id, details) \
         SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::uuid[], $5::uuid[], \
         $6::text[])) UPDATE event_sequence SET last = GREATEST(last, $7)",
    )
    .bind(events.iter().map(|e| e.seq).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.time).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.spoke_id).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.directive_id).collect::<Vec<_>>())
    .bind(
        events
            .iter()
            .map(|e| e.details.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(last)
    .execute(conn)
    .await?;
    Ok(())
}
