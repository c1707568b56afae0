//! Retention's purges on PostgreSQL: the statements of one bounded step,
//! run on the writer's connection between commits, each its own short
//! transaction (see `store::retention`).

use sqlx::{PgConnection, Row};

use super::super::retention::{BATCH, first_id_at};
use super::super::{Cutoffs, Purged};
use super::Writer;
use crate::directives::State;
use crate::error::Result;

impl Writer {
    /// Deletes up to one batch of each kind of row older than its cutoff.
    /// Returns what it deleted and whether more may be due.
    pub(in crate::store) async fn purge_step(
        &mut self,
        cutoffs: &Cutoffs,
    ) -> Result<(Purged, bool)> {
        let result = match self.connection().await {
            Ok(conn) => purge_step(conn, cutoffs).await,
            Err(e) => Err(e),
        };
        self.settle(result)
    }
}

async fn purge_step(conn: &mut PgConnection, cutoffs: &Cutoffs) -> Result<(Purged, bool)> {
    let points_before_ns = cutoffs.points_before.saturating_mul(1_000_000);
    let directives_before = cutoffs.directives_before;
    let mut purged = Purged::default();
    // Ids are UUIDv7: the primary key's order is creation order, so a pass
    // reads only directives created before the cutoff (the hot path keeps
    // no index by state or time).
    let states = sqlx::query(
        "DELETE FROM directives WHERE id IN (SELECT id FROM directives \
         WHERE id < $1 AND state NOT IN ('PENDING', 'DELIVERED', 'IN_PROGRESS') \
         AND updated_at < $2 ORDER BY id LIMIT $3) RETURNING state",
    )
    .bind(first_id_at(directives_before))
    .bind(directives_before)
    .bind(BATCH)
    .fetch_all(&mut *conn)
    .await?;
    let mut more = states.len() as i64 == BATCH;
    for row in &states {
        purged.directive(State::parse(row.try_get::<&str, _>("state")?)?);
    }
    let statements: [(&str, i64); 6] = [
        (
            // Sequences follow time: the oldest events are the first ones,
            // so a pass looks at no more than a batch of them.
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT $2) \
             AND time < $1",
            cutoffs.events_before,
        ),
        (
            "DELETE FROM metric_points WHERE id IN \
             (SELECT id FROM metric_points WHERE time_ns < $1 LIMIT $2)",
            points_before_ns,
        ),
        (
            "DELETE FROM metric_batches WHERE (spoke_id, batch_id) IN \
             (SELECT spoke_id, batch_id FROM metric_batches WHERE received_at < $1 LIMIT $2)",
            cutoffs.points_before,
        ),
        (
            "DELETE FROM idempotency_keys WHERE key IN \
             (SELECT key FROM idempotency_keys WHERE created_at < $1 LIMIT $2)",
            cutoffs.keys_before,
        ),
        (
            "DELETE FROM directive_groups WHERE group_id IN (SELECT g.group_id \
             FROM directive_groups g WHERE g.created_at < $1 AND NOT EXISTS \
             (SELECT 1 FROM directives d WHERE d.group_id = g.group_id) LIMIT $2)",
            directives_before,
        ),
        (
            "DELETE FROM spokes WHERE id IN (SELECT s.id FROM spokes s \
             WHERE s.deleted_at < $1 \
             AND NOT EXISTS (SELECT 1 FROM directives d WHERE d.spoke_id = s.id) \
             AND NOT EXISTS (SELECT 1 FROM metric_points p WHERE p.spoke_id = s.id) \
             AND NOT EXISTS (SELECT 1 FROM metric_batches b WHERE b.spoke_id = s.id) \
             LIMIT $2)",
            directives_before,
        ),
    ];
    for (i, (sql, cutoff)) in statements.into_iter().enumerate() {
        let deleted = sqlx::query(sql)
            .bind(cutoff)
            .bind(BATCH)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        match i {
            0 => purged.events = deleted,
            1 => purged.points = deleted,
            3 => purged.keys = deleted,
            _ => {}
        }
        more |= deleted == BATCH as u64;
    }
    Ok((purged, more))
}
