//! Spoke rows: registration, lookup by key, heartbeats, listing.

use std::collections::BTreeMap;

use hub_proto::v1 as proto;
use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, Row};
use uuid::Uuid;

use serde_json::json;

use super::{Store, Write, is_unique_violation};
use crate::error::{Error, Result};
use crate::events::{Kind, NewEvent};
use crate::spokes::{
    Heartbeat, OFFLINE_AFTER_INTERVALS, Registration, STALE_AFTER_INTERVALS, SpokeRecord,
    health_at, health_name,
};

const SPOKE_COLUMNS: &str = "s.id, s.name, s.labels, s.capabilities, s.version, s.max_in_flight, \
    s.registered_at, s.revoked_at, s.last_heartbeat_at, s.last_seen_at, s.status, s.status_message, \
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
        last_seen_at: row.try_get("last_seen_at")?,
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
    /// Creates a spoke (ONLINE, seen now); ALREADY_EXISTS when the name is
    /// taken.
    pub async fn insert_spoke(
        &self,
        reg: &Registration,
        key_hash: &str,
        now_ms: i64,
    ) -> Result<SpokeRecord> {
        let id = Uuid::now_v7();
        let mut w = self.write(now_ms).await?;
        let res = sqlx::query(
            "INSERT INTO spokes (id, name, key_hash, labels, capabilities, version, max_in_flight, \
             registered_at, health, last_seen_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'ONLINE', $8)",
        )
        .bind(id.to_string())
        .bind(&reg.name)
        .bind(key_hash)
        .bind(labels_json(&reg.labels))
        .bind(capabilities_json(&reg.capabilities))
        .bind(&reg.version)
        .bind(i64::from(reg.max_in_flight))
        .bind(now_ms)
        .execute(&mut *w.tx)
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
        w.event(NewEvent::spoke(
            Kind::SpokeRegistered,
            id,
            json!({"name": reg.name}),
        ))
        .await?;
        self.commit(w).await?;
        self.spoke_by_id_from(&self.writer, id)
            .await?
            .ok_or_else(|| Error::Corrupt("inserted spoke vanished".into()))
    }

    /// Replaces an existing spoke's labels, capabilities, version and window;
    /// the spoke counts as seen.
    pub async fn update_registration(
        &self,
        id: Uuid,
        reg: &Registration,
        now_ms: i64,
    ) -> Result<SpokeRecord> {
        let mut w = self.write(now_ms).await?;
        sqlx::query(
            "UPDATE spokes SET labels = $2, capabilities = $3, version = $4, max_in_flight = $5 WHERE id = $1",
        )
        .bind(id.to_string())
        .bind(labels_json(&reg.labels))
        .bind(capabilities_json(&reg.capabilities))
        .bind(&reg.version)
        .bind(i64::from(reg.max_in_flight))
        .execute(&mut *w.tx)
        .await?;
        seen(&mut w, id).await?;
        self.commit(w).await?;
        self.spoke_by_id_from(&self.writer, id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("spoke {id} not found")))
    }

    /// Records a sign of life (a stream opened or closed): back to ONLINE
    /// if it was not.
    pub async fn mark_seen(&self, id: Uuid, now_ms: i64) -> Result<()> {
        let mut w = self.write(now_ms).await?;
        seen(&mut w, id).await?;
        self.commit(w).await
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

    /// Stores a heartbeat; the spoke counts as seen.
    pub async fn record_heartbeat(&self, id: Uuid, hb: &Heartbeat, now_ms: i64) -> Result<()> {
        let mut w = self.write(now_ms).await?;
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
        .execute(&mut *w.tx)
        .await?;
        seen(&mut w, id).await?;
        self.commit(w).await
    }

    /// Revokes a spoke: its key stops working. Revoking twice is a no-op.
    pub async fn revoke_spoke(&self, id: Uuid, now_ms: i64) -> Result<()> {
        let mut w = self.write(now_ms).await?;
        let changed = sqlx::query(
            "UPDATE spokes SET revoked_at = $2, health = 'REVOKED' WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(id.to_string())
        .bind(now_ms)
        .execute(&mut *w.tx)
        .await?
        .rows_affected();
        if changed == 1 {
            w.event(NewEvent::spoke(Kind::SpokeRevoked, id, json!({})))
                .await?;
        }
        self.commit(w).await
    }

    /// Replaces a spoke's key hash; the old key stops working.
    pub async fn rotate_key(&self, id: Uuid, key_hash: &str, now_ms: i64) -> Result<()> {
        let mut w = self.write(now_ms).await?;
        let changed =
            sqlx::query("UPDATE spokes SET key_hash = $2 WHERE id = $1 AND revoked_at IS NULL")
                .bind(id.to_string())
                .bind(key_hash)
                .execute(&mut *w.tx)
                .await?
                .rows_affected();
        if changed == 0 {
            return Err(Error::FailedPrecondition(format!("spoke {id} is revoked")));
        }
        w.event(NewEvent::spoke(Kind::SpokeKeyRotated, id, json!({})))
            .await?;
        self.commit(w).await
    }

    /// Moves spokes whose last sign of life is older than the thresholds to
    /// STALE or OFFLINE, recording each change; spokes in `connected` are
    /// marked seen instead. Returns the changes.
    pub async fn sweep_health(
        &self,
        now_ms: i64,
        interval_ms: i64,
        connected: impl Fn(Uuid) -> bool,
    ) -> Result<Vec<HealthChange>> {
        let stale_cutoff = now_ms - STALE_AFTER_INTERVALS * interval_ms;
        let offline_cutoff = now_ms - OFFLINE_AFTER_INTERVALS * interval_ms;
        let rows = sqlx::query(
            "SELECT id, health, last_seen_at FROM spokes WHERE revoked_at IS NULL AND \
             ((health = 'ONLINE' AND COALESCE(last_seen_at, 0) < $1) OR \
              (health = 'STALE' AND COALESCE(last_seen_at, 0) < $2)) LIMIT 1000",
        )
        .bind(stale_cutoff)
        .bind(offline_cutoff)
        .fetch_all(&self.reader)
        .await?;
        let mut w = self.write(now_ms).await?;
        let mut changes = Vec::new();
        for row in rows {
            let id: String = row.try_get("id")?;
            let id = Uuid::parse_str(&id).map_err(|e| Error::Corrupt(format!("spoke id: {e}")))?;
            if connected(id) {
                seen(&mut w, id).await?;
                continue;
            }
            let from: String = row.try_get("health")?;
            let to = health_name(health_at(
                row.try_get("last_seen_at")?,
                now_ms,
                interval_ms,
                false,
            ));
            if to != from {
                set_health(&mut w, id, &from, to).await?;
                changes.push(HealthChange { spoke_id: id, to });
            }
        }
        self.commit(w).await?;
        Ok(changes)
    }
}

/// A health change made by the sweeper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthChange {
    /// The spoke.
    pub spoke_id: Uuid,
    /// Its new health's stored name.
    pub to: &'static str,
}

/// Marks a spoke seen now; if its stored health was STALE or OFFLINE it
/// becomes ONLINE, with an event.
async fn seen(w: &mut Write<'_>, id: Uuid) -> Result<()> {
    let from: Option<String> = sqlx::query_scalar(
        "UPDATE spokes SET last_seen_at = $2 WHERE id = $1 AND revoked_at IS NULL RETURNING health",
    )
    .bind(id.to_string())
    .bind(w.now_ms)
    .fetch_optional(&mut *w.tx)
    .await?;
    match from.as_deref() {
        Some(from @ ("STALE" | "OFFLINE")) => set_health(w, id, from, "ONLINE").await,
        _ => Ok(()),
    }
}

async fn set_health(w: &mut Write<'_>, id: Uuid, from: &str, to: &str) -> Result<()> {
    sqlx::query("UPDATE spokes SET health = $2 WHERE id = $1")
        .bind(id.to_string())
        .bind(to)
        .execute(&mut *w.tx)
        .await?;
    w.event(NewEvent::spoke(
        Kind::SpokeHealthChanged,
        id,
        json!({"from": from, "to": to}),
    ))
    .await
}

impl Store {
    /// Spokes per stored health (ONLINE, STALE, OFFLINE, REVOKED).
    pub async fn spokes_by_health(&self) -> Result<Vec<(String, i64)>> {
        Ok(
            sqlx::query_as("SELECT health, COUNT(*) FROM spokes GROUP BY health")
                .fetch_all(&self.reader)
                .await?,
        )
    }
}
