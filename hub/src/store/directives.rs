//! Directive rows: the queries operators and the ledger read. (Directives
//! are written by the group commit, `commit.rs`.)

use std::collections::HashMap;

use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, QueryBuilder, Row, Sqlite};
use uuid::Uuid;

use super::Store;
use crate::directives::{DirectiveRecord, State};
use crate::error::{Error, Result};

const DIRECTIVE_COLUMNS: &str = "d.id, d.spoke_id, s.name AS spoke_name, d.type, \
    CASE d.payload WHEN '' THEN g.payload ELSE d.payload END AS payload, d.state, \
    d.attempts, d.max_attempts, d.priority, d.created_at, d.updated_at, d.expires_at, \
    d.ack_deadline_ms, d.ack_due_at, d.group_id, d.idempotency_key, d.coalesce_key, d.result, \
    d.error, d.progress, d.progress_message";

/// Directives with their spoke and, for a fan-out (whose rows hold an empty
/// payload), the group's one copy of the payload.
const DIRECTIVES: &str = "directives d JOIN spokes s ON s.id = d.spoke_id \
    LEFT JOIN directive_groups g ON g.group_id = d.group_id";

pub(super) fn uuid_of(row: &SqliteRow, col: &str) -> Result<Uuid> {
    let s: String = row.try_get(col)?;
    Uuid::parse_str(&s).map_err(|e| Error::Corrupt(format!("{col}: {e}")))
}

fn directive_from_row(row: &SqliteRow) -> Result<DirectiveRecord> {
    let state: String = row.try_get("state")?;
    Ok(DirectiveRecord {
        id: uuid_of(row, "id")?,
        spoke_id: uuid_of(row, "spoke_id")?,
        spoke_name: row.try_get("spoke_name")?,
        directive_type: row.try_get("type")?,
        payload: row.try_get("payload")?,
        state: State::parse(&state)?,
        attempts: row.try_get::<i64, _>("attempts")? as u32,
        max_attempts: row.try_get::<i64, _>("max_attempts")? as u32,
        priority: row.try_get::<i64, _>("priority")? as i32,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        expires_at: row.try_get("expires_at")?,
        ack_deadline_ms: row.try_get("ack_deadline_ms")?,
        ack_due_at: row.try_get("ack_due_at")?,
        group_id: uuid_of(row, "group_id")?,
        idempotency_key: row.try_get("idempotency_key")?,
        coalesce_key: row.try_get("coalesce_key")?,
        result: row.try_get("result")?,
        error: row.try_get("error")?,
        progress: row.try_get::<i64, _>("progress")? as u32,
        progress_message: row.try_get("progress_message")?,
    })
}

/// Filters of a directive listing.
#[derive(Debug, Clone, Default)]
pub struct DirectiveFilter {
    /// Only this spoke.
    pub spoke_id: Option<Uuid>,
    /// Only this state.
    pub state: Option<State>,
    /// Only this type.
    pub directive_type: Option<String>,
    /// Only this group.
    pub group_id: Option<Uuid>,
    /// Only ids below this one (the page token: newest first).
    pub before_id: Option<Uuid>,
}

impl Store {
    /// One directive by id.
    pub async fn directive(&self, id: Uuid) -> Result<Option<DirectiveRecord>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DIRECTIVE_COLUMNS} FROM {DIRECTIVES} WHERE d.id = $1"
        )))
        .bind(id.to_string())
        .fetch_optional(&self.reader)
        .await?;
        row.map(|r| directive_from_row(&r)).transpose()
    }

    /// A directive's spoke and state, as committed.
    pub async fn directive_state(&self, id: Uuid) -> Result<Option<(Uuid, State)>> {
        let row = sqlx::query("SELECT spoke_id, state FROM directives WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| {
            let state: String = r.try_get("state")?;
            Ok((uuid_of(&r, "spoke_id")?, State::parse(&state)?))
        })
        .transpose()
    }

    /// The payloads of `ids` (JSON text), for deliveries whose payload the
    /// ledger does not hold in memory.
    pub async fn payloads(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, String>> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT d.id, CASE d.payload WHEN '' THEN g.payload ELSE d.payload END AS payload \
             FROM directives d LEFT JOIN directive_groups g ON g.group_id = d.group_id \
             WHERE d.id IN (",
        );
        let mut list = q.separated(", ");
        for id in ids {
            list.push_bind(id.to_string());
        }
        q.push(")");
        let rows = q.build().fetch_all(&self.reader).await?;
        rows.iter()
            .map(|r| Ok((uuid_of(r, "id")?, r.try_get("payload")?)))
            .collect()
    }

    /// The directives of one create call, oldest first.
    pub async fn group(&self, group_id: Uuid) -> Result<Vec<DirectiveRecord>> {
        let filter = DirectiveFilter {
            group_id: Some(group_id),
            ..Default::default()
        };
        let mut directives = self.list_directives(&filter, u32::MAX).await?;
        directives.sort_by_key(|d| d.id);
        Ok(directives)
    }

    /// Directives matching `filter`, newest first, at most `limit`.
    pub async fn list_directives(
        &self,
        filter: &DirectiveFilter,
        limit: u32,
    ) -> Result<Vec<DirectiveRecord>> {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
            "SELECT {DIRECTIVE_COLUMNS} FROM {DIRECTIVES} WHERE 1 = 1"
        ));
        if let Some(spoke) = filter.spoke_id {
            q.push(" AND d.spoke_id = ").push_bind(spoke.to_string());
        }
        if let Some(state) = filter.state {
            q.push(" AND d.state = ").push_bind(state.as_str());
        }
        if let Some(t) = &filter.directive_type {
            q.push(" AND d.type = ").push_bind(t.clone());
        }
        if let Some(group) = filter.group_id {
            q.push(" AND d.group_id = ").push_bind(group.to_string());
        }
        if let Some(before) = filter.before_id {
            q.push(" AND d.id < ").push_bind(before.to_string());
        }
        q.push(" ORDER BY d.id DESC LIMIT ")
            .push_bind(i64::from(limit));
        let rows = q.build().fetch_all(&self.reader).await?;
        rows.iter().map(directive_from_row).collect()
    }
}
