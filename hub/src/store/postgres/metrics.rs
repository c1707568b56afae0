//! Metric rows on PostgreSQL: storing a commit's batches exactly once
//! (inside the group commit, on the writer, one statement for the batch
//! records and one for all their points), and querying points.

use std::collections::{HashMap, HashSet};

use hub_proto::v1 as proto;
use sqlx::{PgConnection, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::super::batch::MetricsRow;
use super::super::{MetricFilter, StoredBatch, records};
use super::Db;
use crate::error::{Error, Result};

/// Decides every metric batch of a commit, in order, exactly as one
/// statement per batch would: the first batch with a (spoke, batch id) not
/// stored before is stored, every other one is a duplicate of what was
/// stored (by an earlier commit, or earlier in this one).
pub(super) async fn store_batches(
    conn: &mut PgConnection,
    metrics: &[MetricsRow<'_>],
) -> Result<Vec<StoredBatch>> {
    if metrics.is_empty() {
        return Ok(Vec::new());
    }
    let mut first: HashMap<(Uuid, &str), usize> = HashMap::new();
    for (i, m) in metrics.iter().enumerate() {
        first
            .entry((m.spoke_id, m.batch.batch_id.as_str()))
            .or_insert(i);
    }
    let tried: Vec<&MetricsRow> = metrics
        .iter()
        .enumerate()
        .filter(|(i, m)| first[&(m.spoke_id, m.batch.batch_id.as_str())] == *i)
        .map(|(_, m)| m)
        .collect();
    let inserted: HashSet<(Uuid, String)> = sqlx::query(
        "INSERT INTO metric_batches (spoke_id, batch_id, accepted, rejected, received_at) \
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[]) \
         ON CONFLICT (spoke_id, batch_id) DO NOTHING RETURNING spoke_id, batch_id",
    )
    .bind(tried.iter().map(|m| m.spoke_id).collect::<Vec<_>>())
    .bind(
        tried
            .iter()
            .map(|m| m.batch.batch_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        tried
            .iter()
            .map(|m| m.batch.points.len() as i64)
            .collect::<Vec<_>>(),
    )
    .bind(
        tried
            .iter()
            .map(|m| m.batch.rejected.len() as i64)
            .collect::<Vec<_>>(),
    )
    .bind(tried.iter().map(|m| m.at).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| Ok((r.try_get("spoke_id")?, r.try_get("batch_id")?)))
    .collect::<Result<_>>()?;
    let key = |m: &MetricsRow| (m.spoke_id, m.batch.batch_id.clone());
    // Stored by an earlier commit: what was accepted then.
    let earlier: Vec<&MetricsRow> = tried
        .iter()
        .copied()
        .filter(|m| !inserted.contains(&key(m)))
        .collect();
    let mut stored_before: HashMap<(Uuid, String), i64> = HashMap::new();
    if !earlier.is_empty() {
        let rows = sqlx::query(
            "SELECT b.spoke_id, b.batch_id, b.accepted FROM metric_batches b \
             JOIN UNNEST($1::uuid[], $2::text[]) AS u (spoke_id, batch_id) \
             ON b.spoke_id = u.spoke_id AND b.batch_id = u.batch_id",
        )
        .bind(earlier.iter().map(|m| m.spoke_id).collect::<Vec<_>>())
        .bind(
            earlier
                .iter()
                .map(|m| m.batch.batch_id.as_str())
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut *conn)
        .await?;
        for r in rows {
            stored_before.insert(
                (r.try_get("spoke_id")?, r.try_get("batch_id")?),
                r.try_get("accepted")?,
            );
        }
    }
    let mut outcomes = Vec::with_capacity(metrics.len());
    for (i, m) in metrics.iter().enumerate() {
        let k = key(m);
        let outcome = if inserted.contains(&k) {
            let f = first[&(m.spoke_id, m.batch.batch_id.as_str())];
            let accepted = metrics[f].batch.points.len() as u32;
            if f == i {
                StoredBatch::Accepted(accepted)
            } else {
                StoredBatch::Duplicate(accepted)
            }
        } else {
            let accepted = stored_before
                .get(&k)
                .ok_or_else(|| Error::Corrupt("a metric batch neither new nor stored".into()))?;
            StoredBatch::Duplicate(*accepted as u32)
        };
        outcomes.push(outcome);
    }
    insert_points(conn, metrics, &outcomes).await?;
    Ok(outcomes)
}

/// Inserts the points of the batches stored now, in one statement.
async fn insert_points(
    conn: &mut PgConnection,
    metrics: &[MetricsRow<'_>],
    outcomes: &[StoredBatch],
) -> Result<()> {
    let (mut spoke, mut batch, mut domain, mut name) = (vec![], vec![], vec![], vec![]);
    let (mut value, mut unit, mut labels, mut time) = (vec![], vec![], vec![], vec![]);
    for (m, outcome) in metrics.iter().zip(outcomes) {
        if !matches!(outcome, StoredBatch::Accepted(_)) {
            continue;
        }
        for p in &m.batch.points {
            spoke.push(m.spoke_id);
            batch.push(m.batch.batch_id.as_str());
            domain.push(p.domain.as_str());
            name.push(p.name.as_str());
            value.push(p.value);
            unit.push(p.unit.as_str());
            labels.push(serde_json::to_string(&p.labels).unwrap_or_else(|_| "{}".to_owned()));
            time.push(p.time_ns);
        }
    }
    if spoke.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO metric_points (spoke_id, batch_id, domain, name, value, unit, labels, \
         time_ns) SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], \
         $5::float8[], $6::text[], $7::text[], $8::bigint[])",
    )
    .bind(spoke)
    .bind(batch)
    .bind(domain)
    .bind(name)
    .bind(value)
    .bind(unit)
    .bind(labels)
    .bind(time)
    .execute(conn)
    .await?;
    Ok(())
}

impl Db {
    /// Points matching `filter`, oldest first (by arrival), with their row
    /// ids for paging.
    pub(in crate::store) async fn query_points(
        &self,
        filter: &MetricFilter,
        limit: u32,
    ) -> Result<Vec<(i64, proto::StoredMetricPoint)>> {
        // No stored text holds a NUL (PostgreSQL refuses one in a query).
        let nul = |s: &Option<String>| s.as_ref().is_some_and(|s| s.contains('\0'));
        if nul(&filter.domain) || nul(&filter.name) {
            return Ok(Vec::new());
        }
        let mut q: QueryBuilder<Postgres> = QueryBuilder::new(
            "SELECT p.id, p.spoke_id, s.name AS spoke_name, p.batch_id, p.domain, p.name, \
             p.value, p.unit, p.labels, p.time_ns FROM metric_points p \
             JOIN spokes s ON s.id = p.spoke_id WHERE true",
        );
        if let Some(spoke) = filter.spoke_id {
            q.push(" AND p.spoke_id = ").push_bind(spoke);
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
        let rows = q.build().fetch_all(&mut *self.reader().await?).await?;
        rows.iter().map(records::point).collect()
    }
}
