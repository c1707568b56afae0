//! Metric rows on PostgreSQL: a commit's batches as the group statement
//! stores them, exactly once (inside the one statement of the group
//! commit), and querying points.

use std::collections::HashMap;

use hub_proto::v1 as proto;
use sqlx::postgres::PgArguments;
use sqlx::{PgConnection, Postgres, QueryBuilder};
use uuid::Uuid;

use super::super::batch::MetricsRow;
use super::super::{MetricFilter, StoredBatch, records};
use super::Db;
use super::commit::add;
use crate::error::{Error, Result};

/// A commit's metric batches as the group statement takes them. Repeats
/// within the commit are settled here (only the first of each (spoke,
/// batch id) is tried); the statement tries the rest with one `ON
/// CONFLICT DO NOTHING` insert and stores the points of only the batches
/// it inserted.
pub(super) struct Batches<'r, 'a> {
    metrics: &'r [MetricsRow<'a>],
    /// For each batch, the first in this commit with its (spoke, batch id).
    first: Vec<usize>,
    /// The batches tried, in commit order.
    tried: Vec<usize>,
}

impl<'r, 'a> Batches<'r, 'a> {
    pub fn new(metrics: &'r [MetricsRow<'a>]) -> Self {
        let mut seen: HashMap<(Uuid, &str), usize> = HashMap::new();
        let mut tried = Vec::new();
        let first = metrics
            .iter()
            .enumerate()
            .map(|(i, m)| {
                *seen
                    .entry((m.spoke_id, m.batch.batch_id.as_str()))
                    .or_insert_with(|| {
                        tried.push(i);
                        i
                    })
            })
            .collect();
        Self {
            metrics,
            first,
            tried,
        }
    }

    /// The place (from 1) of batch `i` among those tried, if it is tried:
    /// its event is written only if the statement stores it.
    pub fn ordinal(&self, i: usize) -> Option<i64> {
        self.tried.binary_search(&i).ok().map(|k| k as i64 + 1)
    }

    /// Binds the tried batches (5 arrays) and all their points (7 arrays,
    /// each point naming its batch's ordinal).
    pub fn bind(&self, args: &mut PgArguments) -> Result<()> {
        let tried: Vec<&MetricsRow> = self.tried.iter().map(|&i| &self.metrics[i]).collect();
        add(args, tried.iter().map(|m| m.spoke_id).collect::<Vec<_>>())?;
        add(
            args,
            tried
                .iter()
                .map(|m| m.batch.batch_id.as_str())
                .collect::<Vec<_>>(),
        )?;
        add(
            args,
            tried
                .iter()
                .map(|m| m.batch.points.len() as i64)
                .collect::<Vec<_>>(),
        )?;
        add(
            args,
            tried
                .iter()
                .map(|m| m.batch.rejected.len() as i64)
                .collect::<Vec<_>>(),
        )?;
        add(args, tried.iter().map(|m| m.at).collect::<Vec<_>>())?;
        let (mut batch, mut domain, mut name, mut value) = (vec![], vec![], vec![], vec![]);
        let (mut unit, mut labels, mut time) = (vec![], vec![], vec![]);
        for (k, m) in tried.iter().enumerate() {
            for p in &m.batch.points {
                batch.push(k as i64 + 1);
                domain.push(p.domain.as_str());
                name.push(p.name.as_str());
                value.push(p.value);
                unit.push(p.unit.as_str());
                labels.push(serde_json::to_string(&p.labels).unwrap_or_else(|_| "{}".to_owned()));
                time.push(p.time_ns);
            }
        }
        add(args, batch)?;
        add(args, domain)?;
        add(args, name)?;
        add(args, value)?;
        add(args, unit)?;
        add(args, labels)?;
        add(args, time)
    }

    /// Every batch's outcome, in order, from what the statement says of
    /// the tried ones: `stored` whether it inserted each, `before` what an
    /// earlier commit accepted for it, as the statement's snapshot saw it.
    /// A batch neither inserted nor seen was committed by another writer
    /// while the statement ran: it is read again now.
    pub async fn decide(
        &self,
        conn: &mut PgConnection,
        stored: &[bool],
        before: &[Option<i64>],
    ) -> Result<Vec<StoredBatch>> {
        if stored.len() != self.tried.len() || before.len() != self.tried.len() {
            return Err(Error::Corrupt(
                "the commit answered for other metric batches than it was given".into(),
            ));
        }
        let mut accepted_before = HashMap::new();
        for (k, &i) in self.tried.iter().enumerate() {
            if stored[k] {
                continue;
            }
            let accepted = match before[k] {
                Some(accepted) => accepted,
                None => stored_accepted(conn, &self.metrics[i]).await?,
            };
            accepted_before.insert(i, accepted);
        }
        let mut outcomes = Vec::with_capacity(self.metrics.len());
        for (i, &f) in self.first.iter().enumerate() {
            let outcome = match accepted_before.get(&f) {
                Some(&accepted) => StoredBatch::Duplicate(accepted as u32),
                None => {
                    let accepted = self.metrics[f].batch.points.len() as u32;
                    if f == i {
                        StoredBatch::Accepted(accepted)
                    } else {
                        StoredBatch::Duplicate(accepted)
                    }
                }
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }
}

/// What the stored batch with `m`'s (spoke, batch id) accepted.
async fn stored_accepted(conn: &mut PgConnection, m: &MetricsRow<'_>) -> Result<i64> {
    sqlx::query_scalar("SELECT accepted FROM metric_batches WHERE spoke_id = $1 AND batch_id = $2")
        .bind(m.spoke_id)
        .bind(m.batch.batch_id.as_str())
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| Error::Corrupt("a metric batch neither new nor stored".into()))
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
