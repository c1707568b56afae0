//! Event rows, read back by sequence for WatchEvents. (They are written by
//! the group commit, in the transaction of the change they record.)

use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite};

use super::Store;
use crate::error::Result;
use crate::events::{EventFilter, EventRecord, Kind};

fn event_from_row(row: &SqliteRow) -> Result<EventRecord> {
    let kind: String = row.try_get("type")?;
    Ok(EventRecord {
        seq: row.try_get("seq")?,
        kind: Kind::parse(&kind)?,
        time: row.try_get("time")?,
        spoke_id: row.try_get("spoke_id")?,
        directive_id: row.try_get("directive_id")?,
        details: row.try_get("details")?,
    })
}

impl Store {
    /// Events matching `filter` with `after < seq <= upto`, oldest first, at
    /// most `limit`.
    pub async fn events_between(
        &self,
        after: i64,
        upto: i64,
        filter: &EventFilter,
        limit: u32,
    ) -> Result<Vec<EventRecord>> {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT seq, type, time, spoke_id, directive_id, details FROM events WHERE seq > ",
        );
        q.push_bind(after).push(" AND seq <= ").push_bind(upto);
        if let Some(spoke) = filter.spoke_id {
            q.push(" AND spoke_id = ").push_bind(spoke.to_string());
        }
        if !filter.kinds.is_empty() {
            q.push(" AND type IN (");
            let mut list = q.separated(", ");
            for kind in &filter.kinds {
                list.push_bind(kind.as_str());
            }
            q.push(")");
        }
        q.push(" ORDER BY seq LIMIT ").push_bind(i64::from(limit));
        let rows = q.build().fetch_all(&self.reader).await?;
        rows.iter().map(event_from_row).collect()
    }
}

impl Store {
    /// The latest `limit` events, newest first.
    pub async fn recent_events(&self, limit: u32) -> Result<Vec<EventRecord>> {
        let rows = sqlx::query(
            "SELECT seq, type, time, spoke_id, directive_id, details FROM events ORDER BY seq DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    /// The oldest stored event's sequence, if any is stored.
    pub async fn oldest_event(&self) -> Result<Option<i64>> {
        let oldest: Option<i64> = sqlx::query_scalar("SELECT MIN(seq) FROM events")
            .fetch_one(&self.reader)
            .await?;
        Ok(oldest)
    }
}
