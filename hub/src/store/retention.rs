//! Retention: deleting old events and metric points in bounded batches, so
//! a purge never holds the writer for long.

use super::Store;
use crate::error::Result;

/// Rows deleted per statement.
const BATCH: i64 = 1000;

/// What one purge deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    /// Events deleted.
    pub events: u64,
    /// Metric points deleted.
    pub points: u64,
}

impl Store {
    /// Deletes events older than `events_before_ms`, and metric points (and
    /// the batch records that guard against duplicates) older than
    /// `points_before_ms`, one bounded batch at a time.
    pub async fn purge(&self, events_before_ms: i64, points_before_ms: i64) -> Result<Purged> {
        let mut purged = Purged::default();
        let points_before_ns = points_before_ms.saturating_mul(1_000_000);
        let statements: [(&str, i64); 3] = [
            (
                // Sequences follow time: the oldest events are the first ones,
                // so a pass looks at no more than a batch of them.
                "DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT $2) \
                 AND time < $1",
                events_before_ms,
            ),
            (
                "DELETE FROM metric_points WHERE id IN \
                 (SELECT id FROM metric_points WHERE time_ns < $1 LIMIT $2)",
                points_before_ns,
            ),
            (
                "DELETE FROM metric_batches WHERE rowid IN \
                 (SELECT rowid FROM metric_batches WHERE received_at < $1 LIMIT $2)",
                points_before_ms,
            ),
        ];
        for (i, (sql, cutoff)) in statements.into_iter().enumerate() {
            loop {
                let deleted = sqlx::query(sql)
                    .bind(cutoff)
                    .bind(BATCH)
                    .execute(&self.writer)
                    .await?
                    .rows_affected();
                match i {
                    0 => purged.events += deleted,
                    1 => purged.points += deleted,
                    _ => {}
                }
                if deleted < BATCH as u64 {
                    break;
                }
                // Let other writers in between batches.
                tokio::task::yield_now().await;
            }
        }
        Ok(purged)
    }
}
