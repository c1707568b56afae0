//! Directive rows: creating (with idempotency and coalescing), taking them
//! for delivery, acks, and queries.

use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, QueryBuilder, Row, Sqlite};
use uuid::Uuid;

use serde_json::json;

use super::{Store, Write};
use crate::directives::{Ack, AckOutcome, DirectiveRecord, State};
use crate::error::{Error, Result};
use crate::events::{Kind, NewEvent};

const DIRECTIVE_COLUMNS: &str = "d.id, d.spoke_id, s.name AS spoke_name, d.type, d.payload, d.state, \
    d.attempts, d.max_attempts, d.priority, d.created_at, d.updated_at, d.expires_at, \
    d.ack_deadline_ms, d.ack_due_at, d.group_id, d.idempotency_key, d.coalesce_key, d.result, \
    d.error, d.progress, d.progress_message";

/// Columns of `directives` alone, for RETURNING clauses (no join there).
const RETURNING_COLUMNS: &str = "id, spoke_id, type, payload, state, attempts, max_attempts, priority, \
    created_at, updated_at, expires_at, ack_deadline_ms, ack_due_at, group_id, idempotency_key, \
    coalesce_key, result, error, progress, progress_message";

pub(super) fn uuid_of(row: &SqliteRow, col: &str) -> Result<Uuid> {
    let s: String = row.try_get(col)?;
    Uuid::parse_str(&s).map_err(|e| Error::Corrupt(format!("{col}: {e}")))
}

fn directive_from_row(row: &SqliteRow, spoke_name: Option<&str>) -> Result<DirectiveRecord> {
    let state: String = row.try_get("state")?;
    Ok(DirectiveRecord {
        id: uuid_of(row, "id")?,
        spoke_id: uuid_of(row, "spoke_id")?,
        spoke_name: match spoke_name {
            Some(name) => name.to_owned(),
            None => row.try_get("spoke_name")?,
        },
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

/// Delivery order: higher priority first, then oldest (UUIDv7 ids sort by
/// creation time).
fn sort_for_delivery(directives: &mut [DirectiveRecord]) {
    directives.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.id.cmp(&b.id)));
}

/// One directive to insert (one per target spoke).
#[derive(Debug, Clone)]
pub struct NewDirectiveRow {
    /// Target spoke id.
    pub spoke_id: Uuid,
    /// Type.
    pub directive_type: String,
    /// Payload JSON text.
    pub payload: String,
    /// Priority.
    pub priority: i32,
    /// Expiry, Unix ms.
    pub expires_at: Option<i64>,
    /// Ack deadline, ms.
    pub ack_deadline_ms: i64,
    /// Deliveries allowed.
    pub max_attempts: u32,
    /// Coalesce key.
    pub coalesce_key: Option<String>,
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

/// A directive an operator cancelled.
#[derive(Debug, Clone)]
pub struct Cancelled {
    /// The directive after the cancel.
    pub directive: DirectiveRecord,
    /// Whether the spoke had received it (so it must be told).
    pub was_delivered: bool,
    /// Whether it was already cancelled (nothing changed).
    pub already: bool,
}

/// The result of applying an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckApplied {
    /// State after the ack.
    pub state: State,
    /// Whether it repeated an earlier final ack and changed nothing.
    pub duplicate: bool,
}

impl Store {
    /// Inserts one directive per row, sharing a new group id, in one
    /// transaction, with their events. A coalesce key cancels the spoke's
    /// PENDING directive with the same key. With an idempotency key already
    /// used, returns the directives of that earlier create instead (and
    /// `true`).
    pub async fn create_directives(
        &self,
        rows: &[NewDirectiveRow],
        idempotency_key: Option<&str>,
        now_ms: i64,
    ) -> Result<(Uuid, Vec<DirectiveRecord>, bool)> {
        let mut w = self.write(now_ms).await?;
        if let Some(key) = idempotency_key {
            let existing: Option<String> =
                sqlx::query_scalar("SELECT group_id FROM idempotency_keys WHERE key = $1")
                    .bind(key)
                    .fetch_optional(&mut *w.tx)
                    .await?;
            if let Some(group) = existing {
                w.tx.rollback().await?;
                let group_id = Uuid::parse_str(&group)
                    .map_err(|e| Error::Corrupt(format!("group_id: {e}")))?;
                return Ok((group_id, self.group(group_id).await?, true));
            }
        }
        let group_id = Uuid::now_v7();
        for row in rows {
            let id = Uuid::now_v7();
            if let Some(key) = &row.coalesce_key {
                let replaced: Vec<String> = sqlx::query_scalar(
                    "UPDATE directives SET state = 'CANCELLED', updated_at = $3, \
                     error = 'replaced by directive ' || $4 \
                     WHERE spoke_id = $1 AND coalesce_key = $2 AND state = 'PENDING' RETURNING id",
                )
                .bind(row.spoke_id.to_string())
                .bind(key)
                .bind(now_ms)
                .bind(id.to_string())
                .fetch_all(&mut *w.tx)
                .await?;
                for old in replaced {
                    let old = Uuid::parse_str(&old)
                        .map_err(|e| Error::Corrupt(format!("directive id: {e}")))?;
                    let reason = format!("replaced by directive {id}");
                    w.event(NewEvent::directive(
                        Kind::DirectiveCancelled,
                        row.spoke_id,
                        old,
                        json!({"reason": reason}),
                    ))
                    .await?;
                }
            }
            sqlx::query(
                "INSERT INTO directives (id, spoke_id, type, payload, state, max_attempts, priority, \
                 created_at, updated_at, expires_at, ack_deadline_ms, group_id, idempotency_key, coalesce_key) \
                 VALUES ($1, $2, $3, $4, 'PENDING', $5, $6, $7, $7, $8, $9, $10, $11, $12)",
            )
            .bind(id.to_string())
            .bind(row.spoke_id.to_string())
            .bind(&row.directive_type)
            .bind(&row.payload)
            .bind(i64::from(row.max_attempts))
            .bind(i64::from(row.priority))
            .bind(now_ms)
            .bind(row.expires_at)
            .bind(row.ack_deadline_ms)
            .bind(group_id.to_string())
            .bind(idempotency_key)
            .bind(row.coalesce_key.as_deref())
            .execute(&mut *w.tx)
            .await?;
            let details = json!({"type": row.directive_type, "group_id": group_id.to_string()});
            w.event(NewEvent::directive(
                Kind::DirectiveCreated,
                row.spoke_id,
                id,
                details,
            ))
            .await?;
        }
        if let Some(key) = idempotency_key {
            sqlx::query(
                "INSERT INTO idempotency_keys (key, group_id, created_at) VALUES ($1, $2, $3)",
            )
            .bind(key)
            .bind(group_id.to_string())
            .bind(now_ms)
            .execute(&mut *w.tx)
            .await?;
        }
        self.commit(w).await?;
        Ok((group_id, self.group(group_id).await?, false))
    }

    /// The directives of one create call, oldest first.
    async fn group(&self, group_id: Uuid) -> Result<Vec<DirectiveRecord>> {
        let filter = DirectiveFilter {
            group_id: Some(group_id),
            ..Default::default()
        };
        let mut directives = self
            .list_directives_from(&self.writer, &filter, u32::MAX)
            .await?;
        directives.sort_by_key(|d| d.id);
        Ok(directives)
    }

    /// Takes PENDING directives of the spoke for delivery, as many as its
    /// in-flight window has room for (at most `max`): each becomes DELIVERED
    /// with one more attempt and an ack due after its deadline. Returned in
    /// delivery order.
    pub async fn take_pending(
        &self,
        spoke_id: Uuid,
        spoke_name: &str,
        window: u32,
        max: u32,
        now_ms: i64,
    ) -> Result<Vec<DirectiveRecord>> {
        let mut w = self.write(now_ms).await?;
        let in_flight: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM directives WHERE spoke_id = $1 AND state IN ('DELIVERED', 'IN_PROGRESS')",
        )
        .bind(spoke_id.to_string())
        .fetch_one(&mut *w.tx)
        .await?;
        let room = (i64::from(window) - in_flight).clamp(0, i64::from(max));
        let taken = take(&mut w, spoke_id, spoke_name, "('PENDING')", room).await?;
        self.commit(w).await?;
        Ok(taken)
    }

    /// What a new stream starts with: the directives delivered before and not
    /// acked yet (sent again, while attempts remain), then PENDING ones as
    /// far as the window allows. Returned in delivery order.
    pub async fn take_backlog(
        &self,
        spoke_id: Uuid,
        spoke_name: &str,
        window: u32,
        now_ms: i64,
    ) -> Result<Vec<DirectiveRecord>> {
        let mut w = self.write(now_ms).await?;
        let mut taken = take(
            &mut w,
            spoke_id,
            spoke_name,
            "('DELIVERED', 'IN_PROGRESS')",
            -1,
        )
        .await?;
        let in_flight: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM directives WHERE spoke_id = $1 AND state IN ('DELIVERED', 'IN_PROGRESS')",
        )
        .bind(spoke_id.to_string())
        .fetch_one(&mut *w.tx)
        .await?;
        let room = (i64::from(window) - in_flight).max(0);
        taken.extend(take(&mut w, spoke_id, spoke_name, "('PENDING')", room).await?);
        self.commit(w).await?;
        sort_for_delivery(&mut taken);
        Ok(taken)
    }

    /// Applies an ack from `spoke_id`, with the rules of the contract.
    pub async fn apply_ack(&self, spoke_id: Uuid, ack: &Ack, now_ms: i64) -> Result<AckApplied> {
        let id = ack.directive_id.to_string();
        let spoke = spoke_id.to_string();
        let wanted = ack.outcome.state();
        let mut w = self.write(now_ms).await?;
        let updated = match &ack.outcome {
            AckOutcome::InProgress { progress, message } => sqlx::query(
                "UPDATE directives SET state = 'IN_PROGRESS', updated_at = $3, \
                 ack_due_at = $3 + ack_deadline_ms, progress = COALESCE($4, progress), progress_message = $5 \
                 WHERE id = $1 AND spoke_id = $2 AND state IN ('DELIVERED', 'IN_PROGRESS')",
            )
            .bind(&id)
            .bind(&spoke)
            .bind(now_ms)
            .bind(progress.map(i64::from))
            .bind(message)
            .execute(&mut *w.tx)
            .await?,
            AckOutcome::Completed(result) => finish(&mut w, &id, &spoke, State::Completed, Some(result), "").await?,
            AckOutcome::Failed(error) => finish(&mut w, &id, &spoke, State::Failed, None, error).await?,
            AckOutcome::Rejected(error) => finish(&mut w, &id, &spoke, State::Rejected, None, error).await?,
        };
        if updated.rows_affected() == 1 {
            let (kind, details) = match &ack.outcome {
                AckOutcome::InProgress { progress, message } => (
                    Kind::DirectiveProgress,
                    json!({"progress": progress, "message": message}),
                ),
                AckOutcome::Completed(_) => (Kind::DirectiveCompleted, json!({})),
                AckOutcome::Failed(error) => (Kind::DirectiveFailed, json!({"error": error})),
                AckOutcome::Rejected(error) => (Kind::DirectiveRejected, json!({"error": error})),
            };
            w.event(NewEvent::directive(
                kind,
                spoke_id,
                ack.directive_id,
                details,
            ))
            .await?;
            self.commit(w).await?;
            return Ok(AckApplied {
                state: wanted,
                duplicate: false,
            });
        }
        let current: Option<String> =
            sqlx::query_scalar("SELECT state FROM directives WHERE id = $1 AND spoke_id = $2")
                .bind(&id)
                .bind(&spoke)
                .fetch_optional(&mut *w.tx)
                .await?;
        w.tx.rollback().await?;
        let current = match current {
            None => return Err(Error::NotFound(format!("directive {id} not found"))),
            Some(s) => State::parse(&s)?,
        };
        match current {
            s if s == wanted && s.is_final() => Ok(AckApplied {
                state: s,
                duplicate: true,
            }),
            State::Pending => Err(Error::FailedPrecondition(format!(
                "directive {id} is PENDING: it is not delivered to this spoke right now"
            ))),
            s => Err(Error::FailedPrecondition(format!(
                "directive {id} is {}: it can no longer be acked as {}",
                s.as_str(),
                wanted.as_str()
            ))),
        }
    }

    /// Cancels a directive that is not final. Cancelling a CANCELLED one
    /// changes nothing; other final states are FAILED_PRECONDITION.
    pub async fn cancel_directive(&self, id: Uuid, reason: &str, now_ms: i64) -> Result<Cancelled> {
        let mut w = self.write(now_ms).await?;
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT state, spoke_id FROM directives WHERE id = $1")
                .bind(id.to_string())
                .fetch_optional(&mut *w.tx)
                .await?;
        let (state, spoke_id) =
            row.ok_or_else(|| Error::NotFound(format!("directive {id} not found")))?;
        let state = State::parse(&state)?;
        let spoke_id =
            Uuid::parse_str(&spoke_id).map_err(|e| Error::Corrupt(format!("spoke id: {e}")))?;
        let already = match state {
            State::Cancelled => true,
            s if s.is_final() => {
                return Err(Error::FailedPrecondition(format!(
                    "directive {id} is {}: only a directive that is not final can be cancelled",
                    s.as_str()
                )));
            }
            _ => false,
        };
        if !already {
            sqlx::query(
                "UPDATE directives SET state = 'CANCELLED', updated_at = $2, ack_due_at = NULL, error = $3 WHERE id = $1",
            )
            .bind(id.to_string())
            .bind(now_ms)
            .bind(reason)
            .execute(&mut *w.tx)
            .await?;
            w.event(NewEvent::directive(
                Kind::DirectiveCancelled,
                spoke_id,
                id,
                json!({"reason": reason}),
            ))
            .await?;
        }
        self.commit(w).await?;
        let directive = self
            .directive_from(&self.writer, id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("directive {id} not found")))?;
        Ok(Cancelled {
            directive,
            was_delivered: matches!(state, State::Delivered | State::InProgress),
            already,
        })
    }

    /// One directive by id.
    pub async fn directive(&self, id: Uuid) -> Result<Option<DirectiveRecord>> {
        self.directive_from(&self.reader, id).await
    }

    async fn directive_from(
        &self,
        pool: &sqlx::SqlitePool,
        id: Uuid,
    ) -> Result<Option<DirectiveRecord>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DIRECTIVE_COLUMNS} FROM directives d JOIN spokes s ON s.id = d.spoke_id WHERE d.id = $1"
        )))
        .bind(id.to_string())
        .fetch_optional(pool)
        .await?;
        row.map(|r| directive_from_row(&r, None)).transpose()
    }

    /// Directives matching `filter`, newest first, at most `limit`.
    pub async fn list_directives(
        &self,
        filter: &DirectiveFilter,
        limit: u32,
    ) -> Result<Vec<DirectiveRecord>> {
        self.list_directives_from(&self.reader, filter, limit).await
    }

    async fn list_directives_from(
        &self,
        pool: &sqlx::SqlitePool,
        filter: &DirectiveFilter,
        limit: u32,
    ) -> Result<Vec<DirectiveRecord>> {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
            "SELECT {DIRECTIVE_COLUMNS} FROM directives d JOIN spokes s ON s.id = d.spoke_id WHERE 1 = 1"
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
        let rows = q.build().fetch_all(pool).await?;
        rows.iter().map(|r| directive_from_row(r, None)).collect()
    }
}

/// Marks up to `limit` (-1: all) of the spoke's directives in `states`
/// delivered, one more attempt each, skipping expired ones and ones whose
/// attempts are used up; records a DELIVERED event for each.
async fn take(
    w: &mut Write<'_>,
    spoke_id: Uuid,
    spoke_name: &str,
    states: &str,
    limit: i64,
) -> Result<Vec<DirectiveRecord>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(AssertSqlSafe(format!(
        "UPDATE directives SET \
           state = CASE state WHEN 'IN_PROGRESS' THEN 'IN_PROGRESS' ELSE 'DELIVERED' END, \
           attempts = attempts + 1, updated_at = $2, ack_due_at = $2 + ack_deadline_ms \
         WHERE id IN (SELECT id FROM directives WHERE spoke_id = $1 AND state IN {states} \
                      AND (expires_at IS NULL OR expires_at > $2) AND attempts < max_attempts \
                      ORDER BY priority DESC, id LIMIT $3) \
         RETURNING {RETURNING_COLUMNS}"
    )))
    .bind(spoke_id.to_string())
    .bind(w.now_ms)
    .bind(limit)
    .fetch_all(&mut *w.tx)
    .await?;
    let mut directives = rows
        .iter()
        .map(|r| directive_from_row(r, Some(spoke_name)))
        .collect::<Result<Vec<_>>>()?;
    sort_for_delivery(&mut directives);
    for d in &directives {
        w.event(NewEvent::directive(
            Kind::DirectiveDelivered,
            spoke_id,
            d.id,
            json!({"attempt": d.attempts}),
        ))
        .await?;
    }
    Ok(directives)
}

async fn finish(
    w: &mut Write<'_>,
    id: &str,
    spoke: &str,
    state: State,
    result: Option<&String>,
    error: &str,
) -> Result<sqlx::sqlite::SqliteQueryResult> {
    Ok(sqlx::query(
        "UPDATE directives SET state = $3, updated_at = $4, ack_due_at = NULL, result = $5, error = $6 \
         WHERE id = $1 AND spoke_id = $2 AND state IN ('DELIVERED', 'IN_PROGRESS')",
    )
    .bind(id)
    .bind(spoke)
    .bind(state.as_str())
    .bind(w.now_ms)
    .bind(result)
    .bind(error)
    .execute(&mut *w.tx)
    .await?)
}

impl Store {
    /// Directives per state.
    pub async fn directives_by_state(&self) -> Result<Vec<(String, i64)>> {
        Ok(
            sqlx::query_as("SELECT state, COUNT(*) FROM directives GROUP BY state")
                .fetch_all(&self.reader)
                .await?,
        )
    }

    /// Directives that are not final, oldest first, at most `limit`.
    pub async fn outstanding_directives(&self, limit: u32) -> Result<Vec<DirectiveRecord>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DIRECTIVE_COLUMNS} FROM directives d JOIN spokes s ON s.id = d.spoke_id \
             WHERE d.state IN ('PENDING', 'DELIVERED', 'IN_PROGRESS') ORDER BY d.id LIMIT $1"
        )))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(|r| directive_from_row(r, None)).collect()
    }
}
