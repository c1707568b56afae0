//! Spoke rows: registration, lookup by key, heartbeats, listing.

use std::collections::BTreeMap;

use hub_proto::v1 as proto;
use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, Row};
use uuid::Uuid;

use super::{Store, is_unique_violation};
use crate::error::{Error, Result};
use crate::spokes::{Heartbeat, Registration, SpokeRecord};

const SPOKE_COLUMNS: &str = "s.id, s.name, s.labels, s.capabilities, s.version, s.max_in_flight, \
    s.registered_at, s.revoked_at, s.last_heartbeat_at, s.status, s.status_message, \
    s.reported_in_flight, s.reported_buffered_points, s.reported_failed_pushes, \
    (SELECT COUNT(*) FROM directives d WHERE d.spoke_id = s.id \
       AND d.state IN ('PENDING', 'DELIVERED', 'IN_PROGRESS')) AS outstanding";

fn spoke_from_row(row: &SqliteRow) -> Result<SpokeRecord> {
    let id: String = row.try_get("id")?;
    let labels: String = row.try_get("labels")?;
    let capabilities: String = row.try_get("capabilities")?;
    let capabilities: Vec<(String, String)> = serde_json::from_str(&capabilities)
        .map_err(|e| Error::Corrupt(format!("capabilities: {e}")))?;
    let status: i32 = row.try_get("status")?;
    Ok(SpokeRecord {
        id: Uuid::parse_str(&id).map_err(|e| Error::Corrupt(format!("spoke id: {e}")))?,
        name: row.try_get("name")?,
        labels: serde_json::from_str(&labels)
            .map_err(|e| Error::Corrupt(format!("labels: {e}")))?,
        capabilities,
        version: row.try_get("version")?,
        max_in_flight: row.try_get::<i64, _>("max_in_flight")? as u32,
        registered_at: row.try_get("registered_at")?,
        revoked_at: row.try_get("revoked_at")?,
        last_heartbeat_at: row.try_get("last_heartbeat_at")?,
        status: proto::SpokeStatus::try_from(status).unwrap_or(proto::SpokeStatus::Unspecified),
        status_message: row.try_get("status_message")?,
        reported_in_flight: row.try_get::<i64, _>("reported_in_flight")? as u32,
        reported_buffered_points: row.try_get::<i64, _>("reported_buffered_points")? as u64,
        reported_failed_pushes: row.try_get::<i64, _>("reported_failed_pushes")? as u64,
        outstanding: row.try_get::<i64, _>("outstanding")? as u64,
    })
}

fn labels_json(labels: &BTreeMap<String, String>) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".to_owned())
}

fn capabilities_json(caps: &[(String, String)]) -> String {
    serde_json::to_string(caps).unwrap_or_else(|_| "[]".to_owned())
}

impl Store {
    /// Creates a spoke; ALREADY_EXISTS when the name is taken.
    pub async fn insert_spoke(
        &self,
        reg: &Registration,
        key_hash: &str,
        now_ms: i64,
    ) -> Result<SpokeRecord> {
        let id = Uuid::now_v7();
        let res = sqlx::query(
            "INSERT INTO spokes (id, name, key_hash, labels, capabilities, version, max_in_flight, registered_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(id.to_string())
        .bind(&reg.name)
        .bind(key_hash)
        .bind(labels_json(&reg.labels))
        .bind(capabilities_json(&reg.capabilities))
        .bind(&reg.version)
        .bind(i64::from(reg.max_in_flight))
        .bind(now_ms)
        .execute(&self.writer)
        .await;
        match res {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                return Err(Error::AlreadyExists(format!(
                    "a spoke named {:?} exists; re-register with its key",
                    reg.name
                )));
            }
            Err(e) => return Err(e.into()),
        }
        self.spoke_by_id_from(&self.writer, id)
            .await?
            .ok_or_else(|| Error::Corrupt("inserted spoke vanished".into()))
    }

    /// Replaces an existing spoke's labels, capabilities, version and window.
    pub async fn update_registration(&self, id: Uuid, reg: &Registration) -> Result<SpokeRecord> {
        sqlx::query(
            "UPDATE spokes SET labels = $2, capabilities = $3, version = $4, max_in_flight = $5 WHERE id = $1",
        )
        .bind(id.to_string())
        .bind(labels_json(&reg.labels))
        .bind(capabilities_json(&reg.capabilities))
        .bind(&reg.version)
        .bind(i64::from(reg.max_in_flight))
        .execute(&self.writer)
        .await?;
        self.spoke_by_id_from(&self.writer, id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("spoke {id} not found")))
    }

    /// The spoke whose key hashes to `key_hash`, revoked or not.
    pub async fn spoke_by_key_hash(&self, key_hash: &str) -> Result<Option<SpokeRecord>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {SPOKE_COLUMNS} FROM spokes s WHERE s.key_hash = $1"
        )))
        .bind(key_hash)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(spoke_from_row).transpose()
    }

    /// A spoke by id.
    pub async fn spoke_by_id(&self, id: Uuid) -> Result<Option<SpokeRecord>> {
        self.spoke_by_id_from(&self.reader, id).await
    }

    async fn spoke_by_id_from(
        &self,
        pool: &sqlx::SqlitePool,
        id: Uuid,
    ) -> Result<Option<SpokeRecord>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {SPOKE_COLUMNS} FROM spokes s WHERE s.id = $1"
        )))
        .bind(id.to_string())
        .fetch_optional(pool)
        .await?;
        row.as_ref().map(spoke_from_row).transpose()
    }

    /// A spoke by name.
    pub async fn spoke_by_name(&self, name: &str) -> Result<Option<SpokeRecord>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {SPOKE_COLUMNS} FROM spokes s WHERE s.name = $1"
        )))
        .bind(name)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(spoke_from_row).transpose()
    }

    /// Up to `limit` spokes ordered by name, after `after_name`.
    pub async fn list_spokes(&self, after_name: &str, limit: u32) -> Result<Vec<SpokeRecord>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {SPOKE_COLUMNS} FROM spokes s WHERE s.name > $1 ORDER BY s.name LIMIT $2"
        )))
        .bind(after_name)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(spoke_from_row).collect()
    }

    /// Every spoke that is not revoked (the candidates of a fan-out).
    pub async fn active_spokes(&self) -> Result<Vec<SpokeRecord>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {SPOKE_COLUMNS} FROM spokes s WHERE s.revoked_at IS NULL ORDER BY s.name"
        )))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(spoke_from_row).collect()
    }

    /// Stores a heartbeat.
    pub async fn record_heartbeat(&self, id: Uuid, hb: &Heartbeat, now_ms: i64) -> Result<()> {
        sqlx::query(
            "UPDATE spokes SET last_heartbeat_at = $2, status = $3, status_message = $4, \
             reported_in_flight = $5, reported_buffered_points = $6, reported_failed_pushes = $7, \
             version = COALESCE($8, version) WHERE id = $1",
        )
        .bind(id.to_string())
        .bind(now_ms)
        .bind(hb.status as i32)
        .bind(&hb.status_message)
        .bind(i64::from(hb.in_flight))
        .bind(i64::try_from(hb.buffered_points).unwrap_or(i64::MAX))
        .bind(i64::try_from(hb.failed_pushes).unwrap_or(i64::MAX))
        .bind(hb.version.as_deref())
        .execute(&self.writer)
        .await?;
        Ok(())
    }
}
