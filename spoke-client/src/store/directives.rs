//! Received directives and their local status. The rules they serve: a
//! directive is recorded before its handler runs, and its outcome is
//! recorded (with the metric points the run recorded, in the same
//! transaction) before its ack is sent; so after a restart a FINISHED
//! directive is re-acked from its record and never run again, while one
//! left RECEIVED or RUNNING runs again. Each step only moves a directive
//! forward: a step that finds it elsewhere changes nothing and says so.

use super::Store;
use crate::error::{Error, Result};
use crate::handler::Outcome;
use crate::metrics::Point;

/// Where a directive stands locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LocalStatus {
    /// Recorded; the handler has not started.
    Received,
    /// The handler started.
    Running,
    /// The outcome is recorded; the hub has not confirmed the ack.
    Finished,
    /// The hub took the final ack.
    Acked,
    /// The hub will take no ack (cancelled, expired, unknown): nothing to do.
    Closed,
}

impl LocalStatus {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "RECEIVED" => Self::Received,
            "RUNNING" => Self::Running,
            "FINISHED" => Self::Finished,
            "ACKED" => Self::Acked,
            "CLOSED" => Self::Closed,
            other => return Err(Error::Corrupt(format!("directive status {other:?}"))),
        })
    }
}

/// A directive as recorded locally.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LocalDirective {
    pub id: String,
    pub status: LocalStatus,
    pub outcome: Option<Outcome>,
}

type Row = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
);

fn outcome_of(
    outcome: Option<String>,
    result: Option<String>,
    error: Option<String>,
) -> Result<Option<Outcome>> {
    Ok(match outcome.as_deref() {
        None => None,
        Some("COMPLETED") => {
            let text = result.unwrap_or_else(|| "{}".to_owned());
            let value =
                serde_json::from_str(&text).map_err(|e| Error::Corrupt(format!("result: {e}")))?;
            Some(Outcome::Completed(value))
        }
        Some("FAILED") => Some(Outcome::Failed(error.unwrap_or_default())),
        Some("REJECTED") => Some(Outcome::Rejected(error.unwrap_or_default())),
        Some(other) => return Err(Error::Corrupt(format!("outcome {other:?}"))),
    })
}

impl Store {
    /// The local record of directive `id`, if it was ever received.
    pub async fn directive(&self, id: &str) -> Result<Option<LocalDirective>> {
        let row: Option<Row> = sqlx::query_as(
            "SELECT id, status, outcome, result, error FROM directives WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|(id, status, outcome, result, error)| {
            Ok(LocalDirective {
                id,
                status: LocalStatus::parse(&status)?,
                outcome: outcome_of(outcome, result, error)?,
            })
        })
        .transpose()
    }

    /// Records a delivery to run: a new directive, or one whose earlier run
    /// never finished (it runs again with the new attempt). `false`: the
    /// record holds an outcome or is settled, and nothing may run.
    pub async fn record_received(
        &self,
        id: &str,
        directive_type: &str,
        payload: &serde_json::Value,
        attempt: u32,
        now_ms: i64,
    ) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO directives (id, type, payload, attempt, status, received_at, updated_at) \
             VALUES ($1, $2, $3, $4, 'RECEIVED', $5, $5) \
             ON CONFLICT (id) DO UPDATE SET attempt = $4, status = 'RECEIVED', updated_at = $5 \
             WHERE status IN ('RECEIVED', 'RUNNING')",
        )
        .bind(id)
        .bind(directive_type)
        .bind(payload.to_string())
        .bind(i64::from(attempt))
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The handler is about to start. `false`: the directive is not
    /// RECEIVED (it finished or closed meanwhile), and the handler must
    /// not run.
    pub async fn mark_running(&self, id: &str, now_ms: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE directives SET status = 'RUNNING', runs = runs + 1, updated_at = $2 \
             WHERE id = $1 AND status = 'RECEIVED'",
        )
        .bind(id)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Records how the run ended, before the ack is sent, and the metric
    /// points the run recorded, in one transaction: a crash keeps both or
    /// neither (and then the directive runs again). `false`: no run was
    /// open (RECEIVED or RUNNING), and nothing was written.
    pub async fn record_outcome(
        &self,
        id: &str,
        outcome: &Outcome,
        points: &[Point],
        now_ms: i64,
    ) -> Result<bool> {
        let (result, error) = match outcome {
            Outcome::Completed(v) => (Some(v.to_string()), None),
            Outcome::Failed(e) | Outcome::Rejected(e) => (None, Some(e.as_str())),
        };
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE directives SET status = 'FINISHED', outcome = $2, result = $3, error = $4, updated_at = $5 \
             WHERE id = $1 AND status IN ('RECEIVED', 'RUNNING')",
        )
        .bind(id)
        .bind(outcome.name())
        .bind(result)
        .bind(error)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        super::metrics::insert_all(&mut tx, points).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Closes a run the hub cancelled (it takes no ack for it), keeping the
    /// points the run recorded, in one transaction. `false`: no run was
    /// open, and nothing was written.
    pub async fn close_run(
        &self,
        id: &str,
        note: &str,
        points: &[Point],
        now_ms: i64,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE directives SET status = 'CLOSED', note = $2, updated_at = $3 \
             WHERE id = $1 AND status IN ('RECEIVED', 'RUNNING')",
        )
        .bind(id)
        .bind(note)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        super::metrics::insert_all(&mut tx, points).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// The hub confirmed the final ack (also of a record closed earlier by
    /// a refusal: a redelivery was acked again, and this time taken).
    pub async fn mark_acked(&self, id: &str, now_ms: i64) -> Result<()> {
        sqlx::query(
            "UPDATE directives SET status = 'ACKED', note = '', updated_at = $2 \
             WHERE id = $1 AND status IN ('FINISHED', 'CLOSED') AND outcome IS NOT NULL",
        )
        .bind(id)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The hub will take no ack for `id` now; `note` says why. A recorded
    /// outcome is kept: should the hub deliver the directive again, the
    /// outcome is acked again, never run again.
    pub async fn mark_closed(&self, id: &str, note: &str, now_ms: i64) -> Result<()> {
        sqlx::query(
            "UPDATE directives SET status = 'CLOSED', note = $2, updated_at = $3 \
             WHERE id = $1 AND status NOT IN ('ACKED', 'CLOSED')",
        )
        .bind(id)
        .bind(note)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Directives whose outcome is recorded but whose ack the hub has not
    /// confirmed, oldest first.
    pub async fn unacked(&self) -> Result<Vec<LocalDirective>> {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, status, outcome, result, error FROM directives \
             WHERE status = 'FINISHED' ORDER BY updated_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(id, status, outcome, result, error)| {
                Ok(LocalDirective {
                    id,
                    status: LocalStatus::parse(&status)?,
                    outcome: outcome_of(outcome, result, error)?,
                })
            })
            .collect()
    }

    /// Forgets directives settled (ACKED or CLOSED) before `before_ms`: the
    /// hub never delivers a settled directive again.
    pub async fn prune_directives(&self, before_ms: i64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM directives WHERE status IN ('ACKED', 'CLOSED') AND updated_at < $1",
        )
        .bind(before_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_outcome_is_kept_until_acked_and_a_rerun_resets_an_unfinished_run() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let payload = serde_json::json!({"doc": "a"});
        assert!(
            store
                .record_received("d1", "sync", &payload, 1, 1)
                .await
                .unwrap()
        );
        assert!(store.mark_running("d1", 2).await.unwrap());
        assert_eq!(
            store.directive("d1").await.unwrap().unwrap().status,
            LocalStatus::Running
        );
        // Delivered again after a restart: back to RECEIVED with the new attempt.
        assert!(
            store
                .record_received("d1", "sync", &payload, 2, 3)
                .await
                .unwrap()
        );
        assert_eq!(
            store.directive("d1").await.unwrap().unwrap().status,
            LocalStatus::Received
        );

        let done = Outcome::Completed(serde_json::json!({"pages": 3}));
        let points = [crate::metrics::Point::new("statistics", "pages", 3.0)];
        assert!(store.record_outcome("d1", &done, &points, 4).await.unwrap());
        assert_eq!(
            store.buffered_points().await.unwrap(),
            1,
            "with the outcome"
        );
        // A second outcome for the same run writes nothing, points included.
        assert!(!store.record_outcome("d1", &done, &points, 4).await.unwrap());
        assert!(!store.close_run("d1", "late", &points, 4).await.unwrap());
        assert_eq!(store.buffered_points().await.unwrap(), 1);
        // A redelivery of a finished directive does not reopen it, and
        // nothing can start it.
        assert!(
            !store
                .record_received("d1", "sync", &payload, 3, 5)
                .await
                .unwrap()
        );
        assert!(!store.mark_running("d1", 5).await.unwrap());
        let rec = store.directive("d1").await.unwrap().unwrap();
        assert_eq!(
            (rec.status, rec.outcome),
            (LocalStatus::Finished, Some(done.clone()))
        );
        assert_eq!(store.unacked().await.unwrap().len(), 1);

        // Refused: closed, and the outcome is kept to ack again.
        store.mark_closed("d1", "PENDING", 6).await.unwrap();
        let rec = store.directive("d1").await.unwrap().unwrap();
        assert_eq!(
            (rec.status, rec.outcome),
            (LocalStatus::Closed, Some(done.clone()))
        );
        assert!(store.unacked().await.unwrap().is_empty());
        // Acked again on a redelivery, and taken.
        store.mark_acked("d1", 7).await.unwrap();
        store.mark_closed("d1", "late", 8).await.unwrap();
        assert_eq!(
            store.directive("d1").await.unwrap().unwrap().status,
            LocalStatus::Acked
        );
        assert_eq!(store.prune_directives(8).await.unwrap(), 1);
        assert_eq!(store.directive("d1").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_cancelled_run_closes_with_its_points_and_no_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let payload = serde_json::json!({});
        store
            .record_received("d1", "sync", &payload, 1, 1)
            .await
            .unwrap();
        let points = [crate::metrics::Point::new("statistics", "half", 1.0)];
        assert!(
            store
                .close_run("d1", "cancelled", &points, 2)
                .await
                .unwrap()
        );
        let rec = store.directive("d1").await.unwrap().unwrap();
        assert_eq!((rec.status, rec.outcome), (LocalStatus::Closed, None));
        assert_eq!(store.buffered_points().await.unwrap(), 1);
        store.mark_acked("d1", 3).await.unwrap();
        assert_eq!(
            store.directive("d1").await.unwrap().unwrap().status,
            LocalStatus::Closed,
            "nothing to ack without an outcome"
        );
    }
}
