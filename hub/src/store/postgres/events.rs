//! Event rows on PostgreSQL, read back by sequence for WatchEvents. (They
//! are written by the group commit, in the transaction of the change they
//! record.)

use sqlx::{Postgres, QueryBuilder};

use super::super::records;
use super::Db;
use crate::error::Result;
use crate::events::{EventFilter, EventRecord};

impl Db {
    /// Events matching `filter` with `after < seq <= upto`, oldest first, at
    /// most `limit`.
    pub(in crate::store) async fn events_between(
        &self,
        after: i64,
        upto: i64,
        filter: &EventFilter,
        limit: u32,
    ) -> Result<Vec<EventRecord>> {
        let mut q: QueryBuilder<Postgres> = QueryBuilder::new(
            "SELECT seq, type, time, spoke_id, directive_id, details FROM events WHERE seq > ",
        );
        q.push_bind(after).push(" AND seq <= ").push_bind(upto);
        if let Some(spoke) = filter.spoke_id {
            q.push(" AND spoke_id = ").push_bind(spoke);
        }
        if !filter.kinds.is_empty() {
            let kinds: Vec<&str> = filter.kinds.iter().map(|k| k.as_str()).collect();
            q.push(" AND type = ANY(").push_bind(kinds).push(")");
        }
        q.push(" ORDER BY seq LIMIT ").push_bind(i64::from(limit));
        let rows = q.build().fetch_all(&mut *self.reader().await?).await?;
        rows.iter().map(records::event).collect()
    }

    /// The latest `limit` events, newest first.
    pub(in crate::store) async fn recent_events(&self, limit: u32) -> Result<Vec<EventRecord>> {
        let rows = sqlx::query(
            "SELECT seq, type, time, spoke_id, directive_id, details FROM events \
             ORDER BY seq DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&mut *self.reader().await?)
        .await?;
        rows.iter().map(records::event).collect()
    }

    /// The oldest stored event's sequence, if any is stored.
    pub(in crate::store) async fn oldest_event(&self) -> Result<Option<i64>> {
        let oldest: Option<i64> = sqlx::query_scalar("SELECT MIN(seq) FROM events")
            .fetch_one(&mut *self.reader().await?)
            .await?;
        Ok(oldest)
    }

    pub(in crate::store) async fn published_events(&self, stream: &str) -> Result<i64> {
        let published: Option<i64> =
            sqlx::query_scalar("SELECT published FROM event_publisher WHERE stream = $1")
                .bind(stream)
                .fetch_optional(&mut *self.reader().await?)
                .await?;
        Ok(published.unwrap_or(0))
    }
}
