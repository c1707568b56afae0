//! Reading stored rows back into domain records, the same way for both
//! backends. Each backend's row type says how to read one column
//! ([`Fields`]): SQLite stores ids as text, PostgreSQL as `uuid`; both store
//! integers as 64 bits, JSON as text.

use std::sync::Arc;

use hub_proto::v1 as proto;
use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use uuid::Uuid;

use super::{IdempotencyRow, OutstandingRow};
use crate::directives::{DirectiveRecord, Fixed, State};
use crate::error::{Error, Result};
use crate::events::{EventRecord, Kind};
use crate::spokes::{SpokeInfo, SpokeLive, Webhook};
use crate::wire::timestamp_ns;

/// How to read one column of a stored row.
pub(super) trait Fields {
    /// An integer column.
    fn int(&self, col: &str) -> Result<i64>;
    /// A nullable integer column.
    fn opt_int(&self, col: &str) -> Result<Option<i64>>;
    /// A text column.
    fn text(&self, col: &str) -> Result<String>;
    /// A nullable text column.
    fn opt_text(&self, col: &str) -> Result<Option<String>>;
    /// A floating-point column.
    fn float(&self, col: &str) -> Result<f64>;
    /// An id column.
    fn uuid(&self, col: &str) -> Result<Uuid>;
    /// A nullable id column.
    fn opt_uuid(&self, col: &str) -> Result<Option<Uuid>>;
}

fn parse_uuid(col: &str, s: &str) -> Result<Uuid> {
    Uuid::parse_str(s).map_err(|e| Error::Corrupt(format!("{col}: {e}")))
}

macro_rules! common_fields {
    () => {
        fn int(&self, col: &str) -> Result<i64> {
            Ok(self.try_get(col)?)
        }
        fn opt_int(&self, col: &str) -> Result<Option<i64>> {
            Ok(self.try_get(col)?)
        }
        fn text(&self, col: &str) -> Result<String> {
            Ok(self.try_get(col)?)
        }
        fn opt_text(&self, col: &str) -> Result<Option<String>> {
            Ok(self.try_get(col)?)
        }
        fn float(&self, col: &str) -> Result<f64> {
            Ok(self.try_get(col)?)
        }
    };
}

impl Fields for SqliteRow {
    common_fields!();
    fn uuid(&self, col: &str) -> Result<Uuid> {
        parse_uuid(col, &self.text(col)?)
    }
    fn opt_uuid(&self, col: &str) -> Result<Option<Uuid>> {
        self.opt_text(col)?.map(|s| parse_uuid(col, &s)).transpose()
    }
}

impl Fields for PgRow {
    common_fields!();
    fn uuid(&self, col: &str) -> Result<Uuid> {
        Ok(self.try_get(col)?)
    }
    fn opt_uuid(&self, col: &str) -> Result<Option<Uuid>> {
        Ok(self.try_get(col)?)
    }
}

fn stored_health(name: &str) -> &'static str {
    match name {
        "ONLINE" => "ONLINE",
        "STALE" => "STALE",
        "REVOKED" => "REVOKED",
        _ => "OFFLINE",
    }
}

/// A spoke's row (the columns of `SPOKE_COLUMNS` in each backend).
pub(super) fn spoke(row: &impl Fields) -> Result<(SpokeInfo, SpokeLive)> {
    let labels = row.text("labels")?;
    let capabilities = row.text("capabilities")?;
    let status = i32::try_from(row.int("status")?).unwrap_or(0);
    let info = SpokeInfo::new(
        row.uuid("id")?,
        row.text("name")?,
        row.text("key_hash")?,
        serde_json::from_str(&labels).map_err(|e| Error::Corrupt(format!("labels: {e}")))?,
        serde_json::from_str(&capabilities)
            .map_err(|e| Error::Corrupt(format!("capabilities: {e}")))?,
        row.int("max_in_flight")? as u32,
        row.int("registered_at")?,
        row.opt_int("revoked_at")?,
    )
    .with_webhook(
        match (
            row.opt_text("webhook_url")?,
            row.opt_text("webhook_secret")?,
        ) {
            (Some(url), Some(secret)) => Some(Arc::new(Webhook { url, secret })),
            _ => None,
        },
    );
    let live = SpokeLive {
        version: row.text("version")?,
        last_heartbeat_at: row.opt_int("last_heartbeat_at")?,
        last_seen_at: row.opt_int("last_seen_at")?,
        status: proto::SpokeStatus::try_from(status).unwrap_or(proto::SpokeStatus::Unspecified),
        status_message: row.text("status_message")?,
        reported_in_flight: row.int("reported_in_flight")? as u32,
        reported_buffered_points: row.int("reported_buffered_points")? as u64,
        reported_failed_pushes: row.int("reported_failed_pushes")? as u64,
        health: stored_health(&row.text("health")?),
    };
    Ok((info, live))
}

fn fixed(row: &impl Fields) -> Result<Fixed> {
    Ok(Fixed {
        directive_type: row.text("type")?,
        priority: row.int("priority")? as i32,
        max_attempts: row.int("max_attempts")? as u32,
        created_at: row.int("created_at")?,
        expires_at: row.opt_int("expires_at")?,
        ack_deadline_ms: row.int("ack_deadline_ms")?,
        group_id: row.uuid("group_id")?,
        idempotency_key: row.opt_text("idempotency_key")?,
        coalesce_key: row.opt_text("coalesce_key")?,
    })
}

/// A directive that is not final, without its payload.
pub(super) fn outstanding(row: &impl Fields) -> Result<OutstandingRow> {
    Ok(OutstandingRow {
        id: row.uuid("id")?,
        spoke_id: row.uuid("spoke_id")?,
        fixed: fixed(row)?,
        state: State::parse(&row.text("state")?)?,
        attempts: row.int("attempts")? as u32,
        updated_at: row.int("updated_at")?,
        ack_due_at: row.opt_int("ack_due_at")?,
        progress: row.int("progress")? as u32,
        progress_message: row.text("progress_message")?,
    })
}

/// An idempotency key.
pub(super) fn idempotency(row: &impl Fields) -> Result<IdempotencyRow> {
    Ok(IdempotencyRow {
        key: row.text("key")?,
        group_id: row.uuid("group_id")?,
        fingerprint: row.text("fingerprint")?,
        created_at: row.int("created_at")?,
    })
}

/// A directive with its spoke's name and its payload.
pub(super) fn directive(row: &impl Fields) -> Result<DirectiveRecord> {
    let fixed = fixed(row)?;
    Ok(DirectiveRecord {
        id: row.uuid("id")?,
        spoke_id: row.uuid("spoke_id")?,
        spoke_name: row.text("spoke_name")?,
        directive_type: fixed.directive_type,
        payload: row.text("payload")?,
        state: State::parse(&row.text("state")?)?,
        attempts: row.int("attempts")? as u32,
        max_attempts: fixed.max_attempts,
        priority: fixed.priority,
        created_at: fixed.created_at,
        updated_at: row.int("updated_at")?,
        expires_at: fixed.expires_at,
        ack_deadline_ms: fixed.ack_deadline_ms,
        ack_due_at: row.opt_int("ack_due_at")?,
        group_id: fixed.group_id,
        idempotency_key: fixed.idempotency_key,
        coalesce_key: fixed.coalesce_key,
        result: row.opt_text("result")?,
        error: row.text("error")?,
        progress: row.int("progress")? as u32,
        progress_message: row.text("progress_message")?,
    })
}

/// An event.
pub(super) fn event(row: &impl Fields) -> Result<EventRecord> {
    Ok(EventRecord {
        seq: row.int("seq")?,
        kind: Kind::parse(&row.text("type")?)?,
        time: row.int("time")?,
        spoke_id: row.opt_uuid("spoke_id")?.map(|id| id.to_string()),
        directive_id: row.opt_uuid("directive_id")?.map(|id| id.to_string()),
        details: row.text("details")?,
    })
}

/// A stored metric point and its row id.
pub(super) fn point(row: &impl Fields) -> Result<(i64, proto::StoredMetricPoint)> {
    let labels = row.text("labels")?;
    let point = proto::MetricPoint {
        domain: row.text("domain")?,
        name: row.text("name")?,
        value: row.float("value")?,
        unit: row.text("unit")?,
        labels: serde_json::from_str(&labels)
            .map_err(|e| Error::Corrupt(format!("labels: {e}")))?,
        time: Some(timestamp_ns(row.int("time_ns")?)),
    };
    Ok((
        row.int("id")?,
        proto::StoredMetricPoint {
            spoke_id: row.uuid("spoke_id")?.to_string(),
            spoke_name: row.text("spoke_name")?,
            batch_id: row.text("batch_id")?,
            point: Some(point),
        },
    ))
}
