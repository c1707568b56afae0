//! The outbound metric buffer. Points wait here, oldest first, until the hub
//! accepts them. A flush stamps a batch id on the oldest points and keeps it
//! until the hub answers for it, so a failed flush is retried with the same
//! id and the hub never counts a point twice.
//!
//! A batch the hub refuses for size is cut, never left to block the buffer.
//! The hub stores a batch id once, whole; so cutting must know what the hub
//! may already hold under the id, and a row of `metric_batches` says it for
//! each open batch: a push sends the batch's points up to `send_upto`, and
//! the hub holds nothing under the id, or the batch's points up to some
//! bound within `held_min..=held_max` (from pushes whose answer never
//! came). Every push sends a prefix of the batch (one push smaller than the
//! last only after a refusal), so that range says it all. A push is counted
//! in the range before it goes out (a crash keeps it), and taken back when
//! the hub refused it for sure.
//!
//! - A batch the hub certainly does not hold is cut freely: its points are
//!   unstamped and batched anew within the new bounds.
//! - A batch it may hold is pushed again under the same id, as a prefix
//!   within the bounds. Accepted: the hub held nothing, and now holds the
//!   prefix; a duplicate: it holds what an earlier push sent. Either way
//!   the points it holds go, and the rest are unstamped and batched anew.
//!   Points it may or may not hold (only when pushes of two different
//!   prefixes both went unanswered) are dropped and counted: never twice.

use hub_proto::v1 as proto;
use sqlx::SqliteConnection;

use super::Store;
use crate::error::{Error, Result};
use crate::metrics::Point;
use crate::wire::{timestamp_ns, unix_ns};

/// A point's size on the wire, near enough (the JSON of its labels is about
/// as long as their protobuf; 32 bytes for the value, time and framing), as
/// an SQL expression over a `metric_points` row.
macro_rules! point_bytes {
    () => {
        "length(CAST(domain AS BLOB)) + length(CAST(name AS BLOB)) \
         + length(CAST(unit AS BLOB)) + length(CAST(labels AS BLOB)) + 32"
    };
}

/// What the hub may hold under a batch id: the batch's points up to some
/// seq within `min..=max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    min: i64,
    max: i64,
}

impl Held {
    fn of(min: Option<i64>, max: Option<i64>) -> Option<Self> {
        Some(Self {
            min: min?,
            max: max?,
        })
    }

    /// `held`, widened by a push of the points up to `upto`.
    fn with(held: Option<Self>, upto: i64) -> Self {
        match held {
            None => Self {
                min: upto,
                max: upto,
            },
            Some(h) => Self {
                min: h.min.min(upto),
                max: h.max.max(upto),
            },
        }
    }
}

/// A batch taken for pushing.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PendingBatch {
    pub batch_id: String,
    pub points: Vec<proto::MetricPoint>,
    /// The points' size on the wire, near enough.
    pub bytes: u64,
    /// The seq of the last point sent: the batch's points up to it are.
    upto: i64,
    /// What the hub may hold under the id from earlier pushes (this one
    /// not counted).
    earlier: Option<Held>,
}

impl PendingBatch {
    /// Whether an earlier push of this batch may have been stored: its
    /// answer never came.
    pub fn may_be_held(&self) -> bool {
        self.earlier.is_some()
    }
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

/// How many of `sizes` (oldest first, not empty) one push takes: at most
/// `max` points and `max_bytes`, and at least one point, however large.
fn prefix(sizes: &[(i64, i64)], max: u32, max_bytes: u64) -> usize {
    let mut total = 0u64;
    let mut n = 0;
    for (_, size) in sizes.iter().take(max.max(1) as usize) {
        total = total.saturating_add(u64::try_from(*size).unwrap_or(0));
        if n > 0 && total > max_bytes {
            break;
        }
        n += 1;
    }
    n.max(1)
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

    /// The batch to push next, counted as possibly held by the hub until
    /// it answers: the one a failed flush left (same id, same points, or a
    /// prefix of them when they exceed `max` points or `max_bytes`), or
    /// else a new batch of the oldest points within those bounds (at least
    /// one point, however large). `None` when the buffer is empty.
    pub async fn take_batch(&self, max: u32, max_bytes: u64) -> Result<Option<PendingBatch>> {
        let mut tx = self.pool.begin().await?;
        let open: Option<String> = sqlx::query_scalar(
            "SELECT batch_id FROM metric_points WHERE batch_id IS NOT NULL ORDER BY seq LIMIT 1",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let (batch_id, sizes, earlier, new) = match open {
            Some(id) => {
                let row: Option<(i64, Option<i64>, Option<i64>)> = sqlx::query_as(
                    "SELECT send_upto, held_min, held_max FROM metric_batches WHERE batch_id = $1",
                )
                .bind(&id)
                .fetch_optional(&mut *tx)
                .await?;
                let all: Vec<(i64, i64)> = sqlx::query_as(concat!(
                    "SELECT seq, ",
                    point_bytes!(),
                    " FROM metric_points WHERE batch_id = $1 ORDER BY seq"
                ))
                .bind(&id)
                .fetch_all(&mut *tx)
                .await?;
                let last = all.last().map_or(0, |(seq, _)| *seq);
                let (send_upto, earlier) = match row {
                    Some((upto, min, max)) => (upto, Held::of(min, max)),
                    // Stamped by an earlier version, which kept no row: it
                    // may have been pushed whole.
                    None => (last, Some(Held::with(None, last))),
                };
                let mut sizes: Vec<(i64, i64)> = all
                    .iter()
                    .copied()
                    .filter(|(seq, _)| *seq <= send_upto)
                    .collect();
                if sizes.is_empty() {
                    // The overflow dropped what was sent: send what is left.
                    sizes = all;
                }
                (id, sizes, earlier, false)
            }
            None => {
                // No open batch: any row left is of a batch the overflow
                // emptied.
                sqlx::query("DELETE FROM metric_batches")
                    .execute(&mut *tx)
                    .await?;
                let sizes: Vec<(i64, i64)> = sqlx::query_as(concat!(
                    "SELECT seq, ",
                    point_bytes!(),
                    " FROM metric_points WHERE batch_id IS NULL ORDER BY seq LIMIT $1"
                ))
                .bind(i64::from(max.max(1)))
                .fetch_all(&mut *tx)
                .await?;
                if sizes.is_empty() {
                    tx.commit().await?;
                    return Ok(None);
                }
                (uuid::Uuid::now_v7().to_string(), sizes, None, true)
            }
        };
        let n = prefix(&sizes, max, max_bytes);
        let upto = sizes[n - 1].0;
        let bytes = sizes[..n]
            .iter()
            .map(|(_, b)| u64::try_from(*b).unwrap_or(0))
            .sum();
        if new {
            sqlx::query(
                "UPDATE metric_points SET batch_id = $1 WHERE batch_id IS NULL AND seq <= $2",
            )
            .bind(&batch_id)
            .bind(upto)
            .execute(&mut *tx)
            .await?;
        }
        let held = Held::with(earlier, upto);
        sqlx::query(
            "INSERT INTO metric_batches (batch_id, send_upto, held_min, held_max) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (batch_id) DO UPDATE SET \
             send_upto = excluded.send_upto, held_min = excluded.held_min, \
             held_max = excluded.held_max",
        )
        .bind(&batch_id)
        .bind(upto)
        .bind(held.min)
        .bind(held.max)
        .execute(&mut *tx)
        .await?;
        let rows: Vec<PointRow> = sqlx::query_as(
            "SELECT domain, name, value, unit, labels, time_ns FROM metric_points \
             WHERE batch_id = $1 AND seq <= $2 ORDER BY seq",
        )
        .bind(&batch_id)
        .bind(upto)
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
        Ok(Some(PendingBatch {
            batch_id,
            points,
            bytes,
            upto,
            earlier,
        }))
    }

    /// The hub answered for `batch`: stored now (accepted) or already
    /// (`duplicate`). The points it holds go, the rest are batched anew;
    /// answers how many were dropped for not knowing whether it holds them.
    pub async fn answered(&self, batch: &PendingBatch, duplicate: bool) -> Result<u64> {
        let held = match (duplicate, batch.earlier) {
            (false, _) => Held::with(None, batch.upto),
            (true, Some(earlier)) => earlier,
            // A duplicate of a batch never pushed before: the hub holds
            // something under the id, what is not known.
            (true, None) => Held {
                min: i64::MIN,
                max: batch.upto,
            },
        };
        self.settle(&batch.batch_id, held).await
    }

    /// The hub refused `batch` for sure: the push counts no longer among
    /// those that may have stored it.
    pub async fn refused(&self, batch: &PendingBatch) -> Result<()> {
        sqlx::query("UPDATE metric_batches SET held_min = $2, held_max = $3 WHERE batch_id = $1")
            .bind(&batch.batch_id)
            .bind(batch.earlier.map(|h| h.min))
            .bind(batch.earlier.map(|h| h.max))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Lets go of a batch the hub holds none of (no earlier push may have
    /// stored it, and this one was refused): its points are batched anew.
    pub async fn release(&self, batch: &PendingBatch) -> Result<()> {
        self.settle(
            &batch.batch_id,
            Held {
                min: i64::MIN,
                max: i64::MIN,
            },
        )
        .await
        .map(drop)
    }

    /// Gives up on what `batch` sent, or on the whole batch (`whole`), and
    /// on whatever an earlier push may have stored: those points are
    /// dropped, the rest are batched anew. Answers how many were dropped.
    pub async fn abandon(&self, batch: &PendingBatch, whole: bool) -> Result<u64> {
        let max = match (whole, batch.earlier) {
            (true, _) => i64::MAX,
            (false, Some(earlier)) => earlier.max.max(batch.upto),
            (false, None) => batch.upto,
        };
        self.settle(&batch.batch_id, Held { min: i64::MIN, max })
            .await
    }

    /// Closes a batch the hub holds up to some bound within `held`: its
    /// points up to `held.min` go, those up to `held.max` are dropped
    /// (counted in the answer), the rest are unstamped.
    async fn settle(&self, batch_id: &str, held: Held) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let dropped =
            sqlx::query("DELETE FROM metric_points WHERE batch_id = $1 AND seq > $2 AND seq <= $3")
                .bind(batch_id)
                .bind(held.min)
                .bind(held.max)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        sqlx::query("DELETE FROM metric_points WHERE batch_id = $1 AND seq <= $2")
            .bind(batch_id)
            .bind(held.min)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE metric_points SET batch_id = NULL WHERE batch_id = $1")
            .bind(batch_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM metric_batches WHERE batch_id = $1")
            .bind(batch_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests;
