//! The group commit on SQLite: everything the ledger decided since the
//! last commit goes into one transaction, with one sync, on the committer's
//! own connection ([`Writer`]).
//!
//! The writer is a plain SQLite connection (rusqlite) used on the
//! committer's thread: every statement runs there and then, with no hop to
//! a worker thread and back (through sqlx, each statement of a commit
//! waited for two thread hand-offs, which under load cost more than the
//! statement). Each kind of row has one prepared single-row statement, run
//! once per row of the batch (`store::batch` merged them per row).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior, params};

use super::super::batch::Rows;
use super::super::{Change, Committed, Durability};
use super::metrics::store_batch;
use crate::error::Result;

const UPSERT_SPOKE: &str = "INSERT INTO spokes (id, name, key_hash, labels, capabilities, \
    version, max_in_flight, registered_at, revoked_at, last_heartbeat_at, last_seen_at, status, \
    status_message, reported_in_flight, reported_buffered_points, reported_failed_pushes, health, \
    deleted_at, webhook_url, webhook_secret) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, \
    ?20) \
    ON CONFLICT (id) DO UPDATE SET name = excluded.name, key_hash = excluded.key_hash, \
    labels = excluded.labels, capabilities = excluded.capabilities, version = excluded.version, \
    max_in_flight = excluded.max_in_flight, revoked_at = excluded.revoked_at, \
    last_heartbeat_at = excluded.last_heartbeat_at, last_seen_at = excluded.last_seen_at, \
    status = excluded.status, status_message = excluded.status_message, \
    reported_in_flight = excluded.reported_in_flight, \
    reported_buffered_points = excluded.reported_buffered_points, \
    reported_failed_pushes = excluded.reported_failed_pushes, health = excluded.health, \
    deleted_at = COALESCE(excluded.deleted_at, spokes.deleted_at), \
    webhook_url = excluded.webhook_url, webhook_secret = excluded.webhook_secret";

const INSERT_DIRECTIVE: &str = "INSERT INTO directives (id, spoke_id, type, payload, \
    max_attempts, priority, created_at, expires_at, ack_deadline_ms, group_id, idempotency_key, \
    coalesce_key, state, attempts, updated_at, ack_due_at, result, error, progress, \
    progress_message) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, \
    ?16, ?17, ?18, ?19, ?20)";

const UPDATE_DIRECTIVE: &str = "UPDATE directives SET state = ?2, attempts = ?3, \
    updated_at = ?4, ack_due_at = ?5, result = ?6, error = ?7, progress = ?8, \
    progress_message = ?9 WHERE id = ?1";

const INSERT_KEY: &str = "INSERT INTO idempotency_keys (key, group_id, fingerprint, created_at) \
    VALUES (?1, ?2, ?3, ?4)";

const INSERT_GROUP: &str =
    "INSERT INTO directive_groups (group_id, payload, created_at) VALUES (?1, ?2, ?3)";

const DELETE_SPOKE: &str = "UPDATE spokes SET deleted_at = ?2 WHERE id = ?1";

const INSERT_EVENT: &str = "INSERT INTO events (seq, type, time, spoke_id, directive_id, \
    details) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// The one connection that writes, owned by the committer's thread.
pub(in crate::store) struct Writer {
    conn: Connection,
    /// Changes committed so far (for the checkpointer).
    committed_changes: Arc<AtomicU64>,
}

impl Writer {
    /// Opens the writing connection to the database file at `path`.
    pub(super) fn open(
        path: &Path,
        durability: Durability,
        committed_changes: Arc<AtomicU64>,
    ) -> Result<Self> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let synchronous = match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous}; \
             PRAGMA foreign_keys = ON; PRAGMA wal_autocheckpoint = 0;"
        ))?;
        conn.set_prepared_statement_cache_capacity(32);
        Ok(Self {
            conn,
            committed_changes,
        })
    }

    /// Commits `changes` in one transaction, in order, with one sync, their
    /// events numbered from `first_seq`; returns what the commit decided and
    /// the sequence the next event gets. Nothing is written if it fails.
    pub(in crate::store) fn commit(
        &mut self,
        changes: &[Change],
        first_seq: i64,
    ) -> Result<(Committed, i64)> {
        let done = commit(&mut self.conn, changes, first_seq)?;
        self.committed_changes
            .fetch_add(changes.len() as u64, Ordering::Relaxed);
        Ok(done)
    }

    /// The connection, for the other writes of the store (retention).
    pub(super) fn conn(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

fn commit(conn: &mut Connection, changes: &[Change], first_seq: i64) -> Result<(Committed, i64)> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut rows = Rows::gather(changes);
    // A deleted spoke's name may be taken again in this same batch.
    if !rows.deleted.is_empty() {
        let mut stmt = tx.prepare_cached(DELETE_SPOKE)?;
        for (id, at) in &rows.deleted {
            stmt.execute(params![id.to_string(), at])?;
        }
    }
    {
        let mut stmt = tx.prepare_cached(UPSERT_SPOKE)?;
        for r in &rows.spokes {
            let (info, live) = (r.info, r.live);
            stmt.execute(params![
                info.id.to_string(),
                info.name,
                info.key_hash,
                info.labels_json,
                info.capabilities_json,
                live.version,
                info.max_in_flight,
                info.registered_at,
                info.revoked_at,
                live.last_heartbeat_at,
                live.last_seen_at,
                live.status as i32,
                live.status_message,
                live.reported_in_flight,
                i64::try_from(live.reported_buffered_points).unwrap_or(i64::MAX),
                i64::try_from(live.reported_failed_pushes).unwrap_or(i64::MAX),
                live.health,
                r.deleted_at,
                info.webhook.as_ref().map(|w| w.url.as_str()),
                info.webhook.as_ref().map(|w| w.secret.as_str()),
            ])?;
        }
    }
    if !rows.groups.is_empty() {
        let mut stmt = tx.prepare_cached(INSERT_GROUP)?;
        for (group_id, payload, at) in &rows.groups {
            stmt.execute(params![group_id.to_string(), payload, at])?;
        }
    }
    {
        let mut stmt = tx.prepare_cached(INSERT_DIRECTIVE)?;
        for r in &rows.created {
            let (f, u) = (r.fixed, &r.state);
            stmt.execute(params![
                r.id.to_string(),
                r.spoke_id.to_string(),
                f.directive_type,
                r.payload,
                f.max_attempts,
                f.priority,
                f.created_at,
                f.expires_at,
                f.ack_deadline_ms,
                f.group_id.to_string(),
                f.idempotency_key,
                f.coalesce_key,
                u.state,
                u.attempts,
                u.updated_at,
                u.ack_due_at,
                u.result,
                u.error,
                u.progress,
                u.progress_message,
            ])?;
        }
    }
    {
        let mut stmt = tx.prepare_cached(UPDATE_DIRECTIVE)?;
        for u in &rows.updated {
            stmt.execute(params![
                u.id.to_string(),
                u.state,
                u.attempts,
                u.updated_at,
                u.ack_due_at,
                u.result,
                u.error,
                u.progress,
                u.progress_message,
            ])?;
        }
    }
    {
        let mut stmt = tx.prepare_cached(INSERT_KEY)?;
        for k in &rows.keys {
            stmt.execute(params![
                k.key,
                k.group_id.to_string(),
                k.fingerprint,
                k.created_at
            ])?;
        }
    }
    // Metric batches are decided in order, inside the transaction: a batch
    // id stored earlier in this same batch is a duplicate too.
    let mut outcomes = Vec::with_capacity(rows.metrics.len());
    for m in &rows.metrics {
        outcomes.push(store_batch(&tx, m.spoke_id, m.batch, m.at)?);
    }
    let committed = rows.settle_metrics(outcomes)?;
    let next = rows.number_events(first_seq);
    {
        let mut stmt = tx.prepare_cached(INSERT_EVENT)?;
        for e in &rows.events {
            stmt.execute(params![
                e.seq,
                e.kind.as_str(),
                e.time,
                e.spoke_id.map(|id| id.to_string()),
                e.directive_id.map(|id| id.to_string()),
                e.details,
            ])?;
        }
    }
    for (stream, through) in &rows.published {
        tx.prepare_cached(
            "INSERT INTO event_publisher (stream, published) VALUES (?1, ?2) \
             ON CONFLICT (stream) DO UPDATE SET published = MAX(published, excluded.published)",
        )?
        .execute(params![stream, through])?;
    }
    tx.commit()?;
    Ok((committed, next))
}
