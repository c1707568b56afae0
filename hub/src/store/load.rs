//! What the ledger is rebuilt from at start (and after a failed commit):
//! every spoke, every directive that is not final (without payloads, which
//! are read when a delivery needs them), the idempotency keys, and how many
//! directives are in each final state. (Two scans of the directives: the
//! hot path keeps no index by state.)

use hub_proto::v1 as proto;
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use uuid::Uuid;

use super::Store;
use super::directives::uuid_of;
use crate::directives::{Fixed, State};
use crate::error::{Error, Result};
use crate::spokes::{SpokeInfo, SpokeLive};

/// A directive that is not final, as stored.
#[derive(Debug, Clone)]
pub struct OutstandingRow {
    /// Id.
    pub id: Uuid,
    /// Spoke id.
    pub spoke_id: Uuid,
    /// What never changes.
    pub fixed: Fixed,
    /// PENDING, DELIVERED or IN_PROGRESS.
    pub state: State,
    /// Deliveries so far.
    pub attempts: u32,
    /// Last change, Unix ms.
    pub updated_at: i64,
    /// When the current delivery's ack is due.
    pub ack_due_at: Option<i64>,
    /// Latest progress.
    pub progress: u32,
    /// Latest progress message.
    pub progress_message: String,
}

/// An idempotency key as stored.
#[derive(Debug, Clone)]
pub struct IdempotencyRow {
    /// The key.
    pub key: String,
    /// The group its create made.
    pub group_id: Uuid,
    /// What that create asked for (empty for keys stored before this was
    /// recorded: any request matches them).
    pub fingerprint: String,
    /// When, Unix ms.
    pub created_at: i64,
}

/// Everything the ledger starts from.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Every spoke, revoked ones too.
    pub spokes: Vec<(SpokeInfo, SpokeLive)>,
    /// Directives that are not final.
    pub outstanding: Vec<OutstandingRow>,
    /// Idempotency keys: the groups they made, what the creates asked for,
    /// and when, oldest first.
    pub idempotency: Vec<IdempotencyRow>,
    /// How many directives are in each final state.
    pub finals: Vec<(State, i64)>,
}

fn stored_health(name: &str) -> &'static str {
    match name {
        "ONLINE" => "ONLINE",
        "STALE" => "STALE",
        "REVOKED" => "REVOKED",
        _ => "OFFLINE",
    }
}

fn spoke_from_row(row: &SqliteRow) -> Result<(SpokeInfo, SpokeLive)> {
    let labels: String = row.try_get("labels")?;
    let capabilities: String = row.try_get("capabilities")?;
    let status: i32 = row.try_get("status")?;
    let health: String = row.try_get("health")?;
    let info = SpokeInfo::new(
        uuid_of(row, "id")?,
        row.try_get("name")?,
        row.try_get("key_hash")?,
        serde_json::from_str(&labels).map_err(|e| Error::Corrupt(format!("labels: {e}")))?,
        serde_json::from_str(&capabilities)
            .map_err(|e| Error::Corrupt(format!("capabilities: {e}")))?,
        row.try_get::<i64, _>("max_in_flight")? as u32,
        row.try_get("registered_at")?,
        row.try_get("revoked_at")?,
    );
    let live = SpokeLive {
        version: row.try_get("version")?,
        last_heartbeat_at: row.try_get("last_heartbeat_at")?,
        last_seen_at: row.try_get("last_seen_at")?,
        status: proto::SpokeStatus::try_from(status).unwrap_or(proto::SpokeStatus::Unspecified),
        status_message: row.try_get("status_message")?,
        reported_in_flight: row.try_get::<i64, _>("reported_in_flight")? as u32,
        reported_buffered_points: row.try_get::<i64, _>("reported_buffered_points")? as u64,
        reported_failed_pushes: row.try_get::<i64, _>("reported_failed_pushes")? as u64,
        health: stored_health(&health),
    };
    Ok((info, live))
}

fn outstanding_from_row(row: &SqliteRow) -> Result<OutstandingRow> {
    let state: String = row.try_get("state")?;
    Ok(OutstandingRow {
        id: uuid_of(row, "id")?,
        spoke_id: uuid_of(row, "spoke_id")?,
        fixed: Fixed {
            directive_type: row.try_get("type")?,
            priority: row.try_get::<i64, _>("priority")? as i32,
            max_attempts: row.try_get::<i64, _>("max_attempts")? as u32,
            created_at: row.try_get("created_at")?,
            expires_at: row.try_get("expires_at")?,
            ack_deadline_ms: row.try_get("ack_deadline_ms")?,
            group_id: uuid_of(row, "group_id")?,
            idempotency_key: row.try_get("idempotency_key")?,
            coalesce_key: row.try_get("coalesce_key")?,
        },
        state: State::parse(&state)?,
        attempts: row.try_get::<i64, _>("attempts")? as u32,
        updated_at: row.try_get("updated_at")?,
        ack_due_at: row.try_get("ack_due_at")?,
        progress: row.try_get::<i64, _>("progress")? as u32,
        progress_message: row.try_get("progress_message")?,
    })
}

impl Store {
    /// Reads everything the ledger starts from, as committed.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let spokes = sqlx::query(
            "SELECT id, name, key_hash, labels, capabilities, version, max_in_flight, registered_at, \
             revoked_at, last_heartbeat_at, last_seen_at, status, status_message, reported_in_flight, \
             reported_buffered_points, reported_failed_pushes, health FROM spokes \
             WHERE deleted_at IS NULL",
        )
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(spoke_from_row)
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
        .map(outstanding_from_row)
        .collect::<Result<_>>()?;
        let idempotency = sqlx::query(
            "SELECT key, group_id, fingerprint, created_at FROM idempotency_keys \
             ORDER BY created_at",
        )
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(|row| {
            Ok(IdempotencyRow {
                key: row.try_get("key")?,
                group_id: uuid_of(row, "group_id")?,
                fingerprint: row.try_get("fingerprint")?,
                created_at: row.try_get("created_at")?,
            })
        })
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
