//! Received directives and their local status. The rules they serve: a
//! directive is recorded before its handler runs, and its outcome is
//! recorded before its ack is sent; so after a restart a FINISHED directive
//! is re-acked from its record and never run again, while one left RECEIVED
//! or RUNNING runs again.

use super::Store;
use crate::error::{Error, Result};
use crate::handler::Outcome;

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
    fn as_str(self) -> &'static str {
        match self {
            Self::Received => "RECEIVED",
            Self::Running => "RUNNING",
            Self::Finished => "FINISHED",
            Self::Acked => "ACKED",
            Self::Closed => "CLOSED",
        }
    }

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
    /// never finished (it runs again with the new attempt).
    pub async fn record_received(
        &self,
        id: &str,
        directive_type: &str,
        payload: &serde_json::Value,
        attempt: u32,
        now_ms: i64,
    ) -> Result<()> {
        sqlx::query(
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
        Ok(())
    }

    /// The handler is about to start.
    pub async fn mark_running(&self, id: &str, now_ms: i64) -> Result<()> {
        sqlx::query(
            "UPDATE directives SET status = 'RUNNING', runs = runs + 1, updated_at = $2 \
             WHERE id = $1 AND status = 'RECEIVED'",
        )
        .bind(id)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records how the run ended, before the ack is sent.
    pub async fn record_outcome(&self, id: &str, outcome: &Outcome, now_ms: i64) -> Result<()> {
        let (result, error) = match outcome {
            Outcome::Completed(v) => (Some(v.to_string()), None),
            Outcome::Failed(e) | Outcome::Rejected(e) => (None, Some(e.as_str())),
        };
        sqlx::query(
            "UPDATE directives SET status = 'FINISHED', outcome = $2, result = $3, error = $4, updated_at = $5 \
             WHERE id = $1 AND status IN ('RECEIVED', 'RUNNING')",
        )
        .bind(id)
        .bind(outcome.name())
        .bind(result)
        .bind(error)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The hub confirmed the final ack.
    pub async fn mark_acked(&self, id: &str, now_ms: i64) -> Result<()> {
        self.set_final(id, LocalStatus::Acked, "", now_ms).await
    }

    /// The hub will take no ack for `id`; `note` says why.
    pub async fn mark_closed(&self, id: &str, note: &str, now_ms: i64) -> Result<()> {
        self.set_final(id, LocalStatus::Closed, note, now_ms).await
    }

    async fn set_final(
        &self,
        id: &str,
        status: LocalStatus,
        note: &str,
        now_ms: i64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE directives SET status = $2, note = $3, updated_at = $4 \
             WHERE id = $1 AND status NOT IN ('ACKED', 'CLOSED')",
        )
        .bind(id)
        .bind(status.as_str())
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
        store
            .record_received("d1", "sync", &payload, 1, 1)
            .await
            .unwrap();
        store.mark_running("d1", 2).await.unwrap();
        assert_eq!(
            store.directive("d1").await.unwrap().unwrap().status,
            LocalStatus::Running
        );
        // Delivered again after a restart: back to RECEIVED with the new attempt.
        store
            .record_received("d1", "sync", &payload, 2, 3)
            .await
            .unwrap();
        assert_eq!(
            store.directive("d1").await.unwrap().unwrap().status,
            LocalStatus::Received
        );

        let done = Outcome::Completed(serde_json::json!({"pages": 3}));
        store.record_outcome("d1", &done, 4).await.unwrap();
        // A redelivery of a finished directive does not reopen it.
        store
            .record_received("d1", "sync", &payload, 3, 5)
            .await
            .unwrap();
        let rec = store.directive("d1").await.unwrap().unwrap();
        assert_eq!(
            (rec.status, rec.outcome),
            (LocalStatus::Finished, Some(done.clone()))
        );
        assert_eq!(store.unacked().await.unwrap().len(), 1);

        store.mark_acked("d1", 6).await.unwrap();
        assert!(store.unacked().await.unwrap().is_empty());
        store.mark_closed("d1", "late", 7).await.unwrap();
        assert_eq!(
            store.directive("d1").await.unwrap().unwrap().status,
            LocalStatus::Acked
        );
        assert_eq!(store.prune_directives(7).await.unwrap(), 1);
        assert_eq!(store.directive("d1").await.unwrap(), None);
    }
}
