//! Metric rows on SQLite: storing a batch exactly once (inside a group
//! commit, on the writer), and querying points.

use hub_proto::v1 as proto;
use sqlx::{QueryBuilder, Sqlite};
use uuid::Uuid;

use super::super::{MetricFilter, StoredBatch, records};
use super::Db;
use crate::error::Result;
use crate::metrics::Batch;

/// Stores a batch's valid points in the commit's transaction, unless the
/// spoke already stored a batch with this id.
pub(super) fn store_batch(
    tx: &rusqlite::Transaction<'_>,
    spoke_id: Uuid,
    batch: &Batch,
    now_ms: i64,
) -> Result<StoredBatch> {
    let spoke = spoke_id.to_string();
    let inserted = tx
        .prepare_cached(
            "INSERT INTO metric_batches (spoke_id, batch_id, accepted, rejected, received_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (spoke_id, batch_id) DO NOTHING",
        )?
        .execute(rusqlite::params![
            spoke,
            batch.batch_id,
            batch.points.len() as i64,
            batch.rejected.len() as i64,
            now_ms
        ])?;
    if inserted == 0 {
        let accepted: i64 = tx
            .prepare_cached(
                "SELECT accepted FROM metric_batches WHERE spoke_id = ?1 AND batch_id = ?2",
            )?
            .query_row(rusqlite::params![spoke, batch.batch_id], |row| row.get(0))?;
        return Ok(StoredBatch::Duplicate(accepted as u32));
    }
    let mut insert = tx.prepare_cached(
        "INSERT INTO metric_points (spoke_id, batch_id, domain, name, value, unit, labels, time_ns) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    for p in &batch.points {
        let labels = serde_json::to_string(&p.labels).unwrap_or_else(|_| "{}".to_owned());
        insert.execute(rusqlite::params![
            spoke,
            batch.batch_id,
            p.domain,
            p.name,
            p.value,
            p.unit,
            labels,
            p.time_ns
        ])?;
    }
    Ok(StoredBatch::Accepted(batch.points.len() as u32))
}

impl Db {
    /// Points matching `filter`, oldest first (by arrival), with their row
    /// ids for paging.
    pub(in crate::store) async fn query_points(
        &self,
        filter: &MetricFilter,
        limit: u32,
    ) -> Result<Vec<(i64, proto::StoredMetricPoint)>> {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT p.id, p.spoke_id, s.name AS spoke_name, p.batch_id, p.domain, p.name, p.value, \
             p.unit, p.labels, p.time_ns FROM metric_points p JOIN spokes s ON s.id = p.spoke_id WHERE 1 = 1",
        );
        if let Some(spoke) = filter.spoke_id {
            q.push(" AND p.spoke_id = ").push_bind(spoke.to_string());
        }
        if let Some(domain) = &filter.domain {
            q.push(" AND p.domain = ").push_bind(domain.clone());
        }
        if let Some(name) = &filter.name {
            q.push(" AND p.name = ").push_bind(name.clone());
        }
        if let Some(start) = filter.start_ns {
            q.push(" AND p.time_ns >= ").push_bind(start);
        }
        if let Some(end) = filter.end_ns {
            q.push(" AND p.time_ns < ").push_bind(end);
        }
        if let Some(after) = filter.after_row {
            q.push(" AND p.id > ").push_bind(after);
        }
        q.push(" ORDER BY p.id LIMIT ").push_bind(i64::from(limit));
        let rows = q.build().fetch_all(&self.reader).await?;
        rows.iter().map(records::point).collect()
    }
}
