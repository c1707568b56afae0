//! Due times: ack deadlines (redelivery, exhaustion) and expiry, found
//! through indexes on the due columns, never by scanning every directive.
//! `ack_due_at` is set only while a directive is DELIVERED or IN_PROGRESS.

use serde_json::json;
use sqlx::Row;
use uuid::Uuid;

use super::Store;
use super::directives::uuid_of;
use crate::error::Result;
use crate::events::{Kind, NewEvent};

/// Directives handled per timer transaction.
const BATCH: i64 = 500;

/// What one timer pass did.
#[derive(Debug, Clone, Default)]
pub struct TimerSweep {
    /// Spokes with directives back in PENDING or freed window slots.
    pub wake: Vec<Uuid>,
    /// Delivered directives that expired: (spoke, directive); the spoke
    /// should be told to stop.
    pub expired_in_flight: Vec<(Uuid, Uuid)>,
    /// Whether a full batch was handled (more may be due).
    pub more: bool,
}

impl Store {
    /// The earliest due time (ack deadline or expiry) of any directive.
    pub async fn next_due(&self) -> Result<Option<i64>> {
        let ack: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(ack_due_at) FROM directives WHERE ack_due_at IS NOT NULL",
        )
        .fetch_one(&self.reader)
        .await?;
        let expiry: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(expires_at) FROM directives \
             WHERE expires_at IS NOT NULL AND state IN ('PENDING', 'DELIVERED', 'IN_PROGRESS')",
        )
        .fetch_one(&self.reader)
        .await?;
        Ok(match (ack, expiry) {
            (Some(a), Some(e)) => Some(a.min(e)),
            (a, e) => a.or(e),
        })
    }

    /// Acts on everything due at `now_ms`: expired directives become EXPIRED;
    /// directives whose ack deadline passed go back to PENDING for another
    /// delivery, or become FAILED when their attempts are used up.
    pub async fn run_timers(&self, now_ms: i64) -> Result<TimerSweep> {
        let mut sweep = TimerSweep::default();
        let mut w = self.write(now_ms).await?;

        let expired = sqlx::query(
            "SELECT id, spoke_id, state FROM directives \
             WHERE expires_at IS NOT NULL AND state IN ('PENDING', 'DELIVERED', 'IN_PROGRESS') \
             AND expires_at <= $1 ORDER BY expires_at LIMIT $2",
        )
        .bind(now_ms)
        .bind(BATCH)
        .fetch_all(&mut *w.tx)
        .await?;
        for row in &expired {
            let (id, spoke) = (uuid_of(row, "id")?, uuid_of(row, "spoke_id")?);
            let state: String = row.try_get("state")?;
            sqlx::query(
                "UPDATE directives SET state = 'EXPIRED', updated_at = $2, ack_due_at = NULL, \
                 error = 'expired before it was completed' WHERE id = $1",
            )
            .bind(id.to_string())
            .bind(now_ms)
            .execute(&mut *w.tx)
            .await?;
            w.event(NewEvent::directive(
                Kind::DirectiveExpired,
                spoke,
                id,
                json!({"was": state}),
            ))
            .await?;
            if state != "PENDING" {
                sweep.expired_in_flight.push((spoke, id));
                sweep.wake.push(spoke);
            }
        }

        let overdue = sqlx::query(
            "SELECT id, spoke_id, attempts, max_attempts FROM directives \
             WHERE ack_due_at IS NOT NULL AND ack_due_at <= $1 ORDER BY ack_due_at LIMIT $2",
        )
        .bind(now_ms)
        .bind(BATCH)
        .fetch_all(&mut *w.tx)
        .await?;
        for row in &overdue {
            let (id, spoke) = (uuid_of(row, "id")?, uuid_of(row, "spoke_id")?);
            let attempts: i64 = row.try_get("attempts")?;
            let max_attempts: i64 = row.try_get("max_attempts")?;
            if attempts >= max_attempts {
                sqlx::query(
                    "UPDATE directives SET state = 'FAILED', updated_at = $2, ack_due_at = NULL, \
                     error = 'delivery attempts exhausted' WHERE id = $1",
                )
                .bind(id.to_string())
                .bind(now_ms)
                .execute(&mut *w.tx)
                .await?;
                let details = json!({"error": "delivery attempts exhausted", "attempts": attempts});
                w.event(NewEvent::directive(
                    Kind::DirectiveFailed,
                    spoke,
                    id,
                    details,
                ))
                .await?;
            } else {
                sqlx::query("UPDATE directives SET state = 'PENDING', updated_at = $2, ack_due_at = NULL WHERE id = $1")
                    .bind(id.to_string())
                    .bind(now_ms)
                    .execute(&mut *w.tx)
                    .await?;
            }
            sweep.wake.push(spoke);
        }
        self.commit(w).await?;
        sweep.more = expired.len() as i64 == BATCH || overdue.len() as i64 == BATCH;
        sweep.wake.sort_unstable();
        sweep.wake.dedup();
        Ok(sweep)
    }
}
