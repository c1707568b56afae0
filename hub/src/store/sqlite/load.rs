//! The snapshot the ledger is rebuilt from, read from SQLite. (Two scans of
//! the directives: the hot path keeps no index by state.)

use sqlx::Row;

use super::super::{Snapshot, records};
use super::Db;
use crate::directives::State;
use crate::error::Result;

/// The columns `records::spoke` reads.
const SPOKE_COLUMNS: &str = "id, name, key_hash, labels, capabilities, version, max_in_flight, \
    registered_at, revoked_at, last_heartbeat_at, last_seen_at, status, status_message, \
    reported_in_flight, reported_buffered_points, reported_failed_pushes, health, webhook_url, \
    webhook_secret";

impl Db {
    /// Reads everything the ledger starts from, as committed.
    pub(in crate::store) async fn snapshot(&self) -> Result<Snapshot> {
        let spokes = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {SPOKE_COLUMNS} FROM spokes WHERE deleted_at IS NULL"
        )))
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(records::spoke)
        .collect::<Result<_>>()?;
        let outstanding = sqlx::query(
            "SELECT id, spoke_id, type, priority, max_attempts, created_at, expires_at, \
             ack_deadline_ms, group_id, idempotency_key, coalesce_key, state, attempts, updated_at, \
             ack_due_at, progress, progress_message FROM directives \
             WHERE state IN ('PENDING', 'DELIVERED', 'IN_PROGRESS')",
        )
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(records::outstanding)
        .collect::<Result<_>>()?;
        let idempotency = sqlx::query(
            "SELECT key, group_id, fingerprint, created_at FROM idempotency_keys \
             ORDER BY created_at",
        )
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(records::idempotency)
        .collect::<Result<_>>()?;
        let finals = sqlx::query(
            "SELECT state, COUNT(*) AS n FROM directives \
             WHERE state NOT IN ('PENDING', 'DELIVERED', 'IN_PROGRESS') GROUP BY state",
        )
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(|row| {
            let state: String = row.try_get("state")?;
            Ok((State::parse(&state)?, row.try_get("n")?))
        })
        .collect::<Result<_>>()?;
        Ok(Snapshot {
            spokes,
            outstanding,
            idempotency,
            finals,
        })
    }
}
