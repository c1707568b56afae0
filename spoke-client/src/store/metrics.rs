//! The outbound metric buffer. Points wait here, oldest first, until the hub
//! accepts them. A flush stamps a batch id on the oldest points and keeps it
//! until the hub answers, so a failed flush is retried with the same id and
//! the same points, and the hub never counts a point twice.

use hub_proto::v1 as proto;
use sqlx::SqliteConnection;

use super::Store;
use crate::error::{Error, Result};
use crate::metrics::Point;
use crate::wire::{timestamp_ns, unix_ns};

/// A batch taken for pushing.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PendingBatch {
    pub batch_id: String,
    pub points: Vec<proto::MetricPoint>,
}

type PointRow = (String, String, f64, String, String, i64);

/// Appends points to the buffer within the caller's transaction (a
/// directive's outcome and the points its run recorded commit together).
pub(super) async fn insert_all(conn: &mut SqliteConnection, points: &[Point]) -> Result<()> {
    for p in points {
        let labels = serde_json::to_string(&p.labels).unwrap_or_else(|_| "{}".to_owned());
        sqlx::query(
            "INSERT INTO metric_points (domain, name, value, unit, labels, time_ns) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&p.domain)
        .bind(&p.name)
        .bind(p.value)
        .bind(&p.unit)
        .bind(labels)
        .bind(unix_ns(p.time))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

impl Store {
    /// Appends points to the buffer in one transaction.
    pub async fn insert_points(&self, points: &[Point]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        insert_all(&mut tx, points).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Points in the buffer.
    pub async fn buffered_points(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM metric_points")
            .fetch_one(&self.pool)
            .await?;
        Ok(n as u64)
    }

    /// Drops the oldest points beyond `max`; answers how many it dropped.
    pub async fn drop_oldest(&self, max: u64) -> Result<u64> {
        let over = self.buffered_points().await?.saturating_sub(max);
        if over == 0 {
            return Ok(0);
        }
        let done = sqlx::query(
            "DELETE FROM metric_points WHERE seq IN \
             (SELECT seq FROM metric_points ORDER BY seq LIMIT $1)",
        )
        .bind(over as i64)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// The batch to push next: the one a failed flush left (same id, same
    /// points), or else a new batch of at most `max` of the oldest points.
    /// `None` when the buffer is empty.
    pub async fn take_batch(&self, max: u32) -> Result<Option<PendingBatch>> {
        let mut tx = self.pool.begin().await?;
        let open: Option<String> = sqlx::query_scalar(
            "SELECT batch_id FROM metric_points WHERE batch_id IS NOT NULL ORDER BY seq LIMIT 1",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let batch_id = match open {
            Some(id) => id,
            None => {
                let id = uuid::Uuid::now_v7().to_string();
                let stamped = sqlx::query(
                    "UPDATE metric_points SET batch_id = $1 WHERE seq IN \
                     (SELECT seq FROM metric_points WHERE batch_id IS NULL ORDER BY seq LIMIT $2)",
                )
                .bind(&id)
                .bind(i64::from(max))
                .execute(&mut *tx)
                .await?;
                if stamped.rows_affected() == 0 {
                    return Ok(None);
                }
                id
            }
        };
        let rows: Vec<PointRow> = sqlx::query_as(
            "SELECT domain, name, value, unit, labels, time_ns FROM metric_points \
             WHERE batch_id = $1 ORDER BY seq",
        )
        .bind(&batch_id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let points = rows
            .into_iter()
            .map(|(domain, name, value, unit, labels, time_ns)| {
                Ok(proto::MetricPoint {
                    domain,
                    name,
                    value,
                    unit,
                    labels: serde_json::from_str(&labels)
                        .map_err(|e| Error::Corrupt(format!("metric labels: {e}")))?,
                    time: Some(timestamp_ns(time_ns)),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(PendingBatch { batch_id, points }))
    }

    /// Removes a batch the hub answered for; answers how many points left.
    pub async fn delete_batch(&self, batch_id: &str) -> Result<u64> {
        let done = sqlx::query("DELETE FROM metric_points WHERE batch_id = $1")
            .bind(batch_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(n: usize) -> Vec<Point> {
        (0..n)
            .map(|i| Point::new("statistics", "orders", i as f64).label("shop", "eu"))
            .collect()
    }

    #[tokio::test]
    async fn an_unanswered_batch_comes_back_with_the_same_id_and_points() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        store.insert_points(&points(5)).await.unwrap();
        let first = store.take_batch(3).await.unwrap().unwrap();
        assert_eq!(first.points.len(), 3);
        assert_eq!(first.points[0].labels["shop"], "eu");
        store.insert_points(&points(1)).await.unwrap();
        let again = store.take_batch(3).await.unwrap().unwrap();
        assert_eq!(again, first, "a failed flush is retried as it was");
        assert_eq!(store.delete_batch(&first.batch_id).await.unwrap(), 3);
        let next = store.take_batch(3).await.unwrap().unwrap();
        assert_ne!(next.batch_id, first.batch_id);
        assert_eq!(next.points.len(), 3);
        store.delete_batch(&next.batch_id).await.unwrap();
        assert_eq!(store.take_batch(3).await.unwrap(), None);
    }

    #[tokio::test]
    async fn overflow_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        store.insert_points(&points(10)).await.unwrap();
        assert_eq!(store.drop_oldest(4).await.unwrap(), 6);
        assert_eq!(store.drop_oldest(4).await.unwrap(), 0);
        let batch = store.take_batch(100).await.unwrap().unwrap();
        let values: Vec<f64> = batch.points.iter().map(|p| p.value).collect();
        assert_eq!(values, vec![6.0, 7.0, 8.0, 9.0]);
    }
}
