//! Retention: deleting old events and metric points in bounded batches, on
//! the writer between commits (the committer runs it), each batch its own
//! short transaction.

use super::Writer;
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

impl Writer {
    /// Deletes up to one batch each of events older than `events_before_ms`
    /// and of metric points (and the batch records that guard against
    /// duplicates) older than `points_before_ms`. Returns what it deleted
    /// and whether more may be due; the committer calls it between commits
    /// until nothing is.
    pub fn purge_step(
        &mut self,
        events_before_ms: i64,
        points_before_ms: i64,
    ) -> Result<(Purged, bool)> {
        let points_before_ns = points_before_ms.saturating_mul(1_000_000);
        let statements: [(&str, i64); 3] = [
            (
                // Sequences follow time: the oldest events are the first ones,
                // so a pass looks at no more than a batch of them.
                "DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT ?2) \
                 AND time < ?1",
                events_before_ms,
            ),
            (
                "DELETE FROM metric_points WHERE id IN \
                 (SELECT id FROM metric_points WHERE time_ns < ?1 LIMIT ?2)",
                points_before_ns,
            ),
            (
                "DELETE FROM metric_batches WHERE rowid IN \
                 (SELECT rowid FROM metric_batches WHERE received_at < ?1 LIMIT ?2)",
                points_before_ms,
            ),
        ];
        let mut purged = Purged::default();
        let mut more = false;
        for (i, (sql, cutoff)) in statements.into_iter().enumerate() {
            let deleted = self
                .conn()
                .prepare_cached(sql)?
                .execute(rusqlite::params![cutoff, BATCH])? as u64;
            match i {
                0 => purged.events = deleted,
                1 => purged.points = deleted,
                _ => {}
            }
            more |= deleted == BATCH as u64;
        }
        Ok((purged, more))
    }
}
