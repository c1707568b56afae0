//! Directive rows on PostgreSQL: the queries operators and the ledger read.
//! (Directives are written by the group commit, `commit.rs`.)

use std::collections::HashMap;

use sqlx::{AssertSqlSafe, Postgres, QueryBuilder};
use uuid::Uuid;

use super::super::DirectiveFilter;
use super::super::records::{self, Fields};
use super::Db;
use crate::directives::{DirectiveRecord, State};
use crate::error::Result;

const DIRECTIVE_COLUMNS: &str = "d.id, d.spoke_id, s.name AS spoke_name, d.type, \
    CASE d.payload WHEN '' THEN g.payload ELSE d.payload END AS payload, d.state, \
    d.attempts, d.max_attempts, d.priority, d.created_at, d.updated_at, d.expires_at, \
    d.ack_deadline_ms, d.ack_due_at, d.group_id, d.idempotency_key, d.coalesce_key, d.result, \
    d.error, d.progress, d.progress_message";

/// Directives with their spoke and, for a fan-out (whose rows hold an empty
/// payload), the group's one copy of the payload.
const DIRECTIVES: &str = "directives d JOIN spokes s ON s.id = d.spoke_id \
    LEFT JOIN directive_groups g ON g.group_id = d.group_id";

impl Db {
    /// One directive by id.
    pub(in crate::store) async fn directive(&self, id: Uuid) -> Result<Option<DirectiveRecord>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DIRECTIVE_COLUMNS} FROM {DIRECTIVES} WHERE d.id = $1"
        )))
        .bind(id)
        .fetch_optional(&mut *self.reader().await?)
        .await?;
        row.map(|r| records::directive(&r)).transpose()
    }

    /// A directive's spoke and state, as committed.
    pub(in crate::store) async fn directive_state(
        &self,
        id: Uuid,
    ) -> Result<Option<(Uuid, State)>> {
        let row = sqlx::query("SELECT spoke_id, state FROM directives WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *self.reader().await?)
            .await?;
        row.map(|r| Ok((r.uuid("spoke_id")?, State::parse(&r.text("state")?)?)))
            .transpose()
    }

    /// The payloads of `ids` (JSON text).
    pub(in crate::store) async fn payloads(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, String>> {
        let rows = sqlx::query(
            "SELECT d.id, CASE d.payload WHEN '' THEN g.payload ELSE d.payload END AS payload \
             FROM directives d LEFT JOIN directive_groups g ON g.group_id = d.group_id \
             WHERE d.id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&mut *self.reader().await?)
        .await?;
        rows.iter()
            .map(|r| Ok((r.uuid("id")?, r.text("payload")?)))
            .collect()
    }

    /// Directives matching `filter`, newest first, at most `limit`.
    pub(in crate::store) async fn list_directives(
        &self,
        filter: &DirectiveFilter,
        limit: u32,
    ) -> Result<Vec<DirectiveRecord>> {
        // No stored text holds a NUL (PostgreSQL refuses one in a query).
        if filter
            .directive_type
            .as_ref()
            .is_some_and(|t| t.contains('\0'))
        {
            return Ok(Vec::new());
        }
        let mut q: QueryBuilder<Postgres> = QueryBuilder::new(format!(
            "SELECT {DIRECTIVE_COLUMNS} FROM {DIRECTIVES} WHERE true"
        ));
        if let Some(spoke) = filter.spoke_id {
            q.push(" AND d.spoke_id = ").push_bind(spoke);
        }
        if let Some(state) = filter.state {
            q.push(" AND d.state = ").push_bind(state.as_str());
        }
        if let Some(t) = &filter.directive_type {
            q.push(" AND d.type = ").push_bind(t.clone());
        }
        if let Some(group) = filter.group_id {
            q.push(" AND d.group_id = ").push_bind(group);
        }
        if let Some(before) = filter.before_id {
            q.push(" AND d.id < ").push_bind(before);
        }
        q.push(" ORDER BY d.id DESC LIMIT ")
            .push_bind(i64::from(limit));
        let rows = q.build().fetch_all(&mut *self.reader().await?).await?;
        rows.iter().map(records::directive).collect()
    }
}
