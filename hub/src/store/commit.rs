//! Group commit: everything the ledger decided since the last commit goes
//! into one transaction, with one sync.
//!
//! Each kind of row is written by multi-row statements (`VALUES (…), (…)`)
//! in chunks of fixed sizes, so a batch costs a handful of statements
//! whatever its size, and each statement has only a few texts, which stay
//! prepared in the connection's cache. Changes to the same row within
//! a batch are merged first: the ledger always sends a row's whole mutable
//! state, so the last change wins.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use sqlx::{AssertSqlSafe, Sqlite, Transaction};
use uuid::Uuid;

use super::Store;
use super::metrics::{StoredBatch, store_batch};
use crate::directives::{Fixed, State};
use crate::error::Result;
use crate::events::{Kind, NewEvent};
use crate::metrics::Batch;
use crate::spokes::{SpokeInfo, SpokeLive};

/// One write decided by the ledger.
#[derive(Debug, Clone)]
pub enum Change {
    /// A spoke's whole row: a new spoke, or any change to one.
    Spoke(Arc<SpokeInfo>, SpokeLive),
    /// A new directive, PENDING.
    DirectiveCreated {
        /// Its id.
        id: Uuid,
        /// Its spoke.
        spoke_id: Uuid,
        /// What never changes.
        fixed: Arc<Fixed>,
        /// The payload, JSON text.
        payload: Arc<str>,
    },
    /// A directive's whole mutable state.
    DirectiveUpdated(DirectiveUpdate),
    /// An idempotency key and the create it made.
    IdempotencyKey {
        /// The key.
        key: String,
        /// The group the create made.
        group_id: Uuid,
        /// When, Unix ms.
        at: i64,
    },
    /// An event; its sequence is given at commit.
    Event {
        /// What happened.
        event: NewEvent,
        /// When, Unix ms.
        at: i64,
    },
    /// A metric batch: stored unless the spoke stored one with its id
    /// before (decided here, in commit order); stored ones get an event.
    Metrics {
        /// The spoke.
        spoke_id: Uuid,
        /// The validated batch.
        batch: Arc<Batch>,
        /// When it arrived, Unix ms.
        at: i64,
    },
}

/// The mutable columns of a directive, all of them.
#[derive(Debug, Clone)]
pub struct DirectiveUpdate {
    /// The directive.
    pub id: Uuid,
    /// Its state.
    pub state: State,
    /// Deliveries so far.
    pub attempts: u32,
    /// Last change, Unix ms.
    pub updated_at: i64,
    /// When the current delivery's ack is due.
    pub ack_due_at: Option<i64>,
    /// The result JSON text of a COMPLETED directive.
    pub result: Option<String>,
    /// Error or reason of a final one.
    pub error: String,
    /// Latest progress.
    pub progress: u32,
    /// Latest progress message.
    pub progress_message: String,
}

/// What a commit did that only the database could decide.
#[derive(Debug, Clone, Default)]
pub struct Committed {
    /// For each `Change::Metrics` in the batch, in order: stored or duplicate.
    pub metrics: Vec<StoredBatch>,
}

struct SpokeRow<'a> {
    info: &'a SpokeInfo,
    live: &'a SpokeLive,
}

struct NewDirectiveRow<'a> {
    id: Uuid,
    spoke_id: Uuid,
    fixed: &'a Fixed,
    payload: &'a str,
    state: UpdateRow<'a>,
}

struct UpdateRow<'a> {
    id: Uuid,
    state: &'static str,
    attempts: u32,
    updated_at: i64,
    ack_due_at: Option<i64>,
    result: Option<&'a str>,
    error: &'a str,
    progress: u32,
    progress_message: &'a str,
}

impl<'a> From<&'a DirectiveUpdate> for UpdateRow<'a> {
    fn from(u: &'a DirectiveUpdate) -> Self {
        Self {
            id: u.id,
            state: u.state.as_str(),
            attempts: u.attempts,
            updated_at: u.updated_at,
            ack_due_at: u.ack_due_at,
            result: u.result.as_deref(),
            error: &u.error,
            progress: u.progress,
            progress_message: &u.progress_message,
        }
    }
}

struct EventRow {
    seq: i64,
    kind: Kind,
    time: i64,
    spoke_id: Option<Uuid>,
    directive_id: Option<Uuid>,
    /// JSON text.
    details: String,
}

impl EventRow {
    fn new(seq: i64, event: &NewEvent, time: i64) -> Self {
        Self {
            seq,
            kind: event.kind,
            time,
            spoke_id: event.spoke_id,
            directive_id: event.directive_id,
            details: event.details.to_string(),
        }
    }
}

struct KeyRow<'a> {
    key: &'a str,
    group_id: Uuid,
    created_at: i64,
}

/// Most rows per statement. A statement carries its rows padded to the
/// next power of two with rows of NULLs (which it skips), so each kind of
/// statement has at most eleven texts (1, 2, 4, ... 1024 rows), each
/// prepared once and kept in the connection's statement cache, and a batch
/// costs one statement per kind of row.
const MAX_ROWS: usize = 1024;

type Query<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>;

/// One multi-row statement: its text around the rows' `VALUES` list (which
/// must skip rows whose first column is NULL), and how a row binds.
struct Statement<R> {
    head: &'static str,
    columns: usize,
    tail: &'static str,
    bind: for<'q> fn(Query<'q>, &R) -> Query<'q>,
}

fn upsert_spokes<'a>() -> Statement<SpokeRow<'a>> {
    Statement {
        head: "INSERT INTO spokes (id, name, key_hash, labels, capabilities, version, \
        max_in_flight, registered_at, revoked_at, last_heartbeat_at, last_seen_at, status, \
        status_message, reported_in_flight, reported_buffered_points, reported_failed_pushes, \
        health) SELECT * FROM (VALUES ",
        columns: 17,
        tail: ") WHERE column1 IS NOT NULL ON CONFLICT (id) DO UPDATE SET name = excluded.name, key_hash = excluded.key_hash, \
        labels = excluded.labels, capabilities = excluded.capabilities, version = excluded.version, \
        max_in_flight = excluded.max_in_flight, revoked_at = excluded.revoked_at, \
        last_heartbeat_at = excluded.last_heartbeat_at, last_seen_at = excluded.last_seen_at, \
        status = excluded.status, status_message = excluded.status_message, \
        reported_in_flight = excluded.reported_in_flight, \
        reported_buffered_points = excluded.reported_buffered_points, \
        reported_failed_pushes = excluded.reported_failed_pushes, health = excluded.health",
        bind: |q, r| {
            let (info, live) = (r.info, r.live);
            q.bind(info.id.to_string())
                .bind(info.name.clone())
                .bind(info.key_hash.clone())
                .bind(info.labels_json.clone())
                .bind(info.capabilities_json.clone())
                .bind(live.version.clone())
                .bind(i64::from(info.max_in_flight))
                .bind(info.registered_at)
                .bind(info.revoked_at)
                .bind(live.last_heartbeat_at)
                .bind(live.last_seen_at)
                .bind(live.status as i32)
                .bind(live.status_message.clone())
                .bind(i64::from(live.reported_in_flight))
                .bind(i64::try_from(live.reported_buffered_points).unwrap_or(i64::MAX))
                .bind(i64::try_from(live.reported_failed_pushes).unwrap_or(i64::MAX))
                .bind(live.health)
        },
    }
}

fn insert_directives<'a>() -> Statement<NewDirectiveRow<'a>> {
    Statement {
        head: "INSERT INTO directives (id, spoke_id, type, payload, max_attempts, priority, \
        created_at, expires_at, ack_deadline_ms, group_id, idempotency_key, coalesce_key, state, \
        attempts, updated_at, ack_due_at, result, error, progress, progress_message) \
        SELECT * FROM (VALUES ",
        columns: 20,
        tail: ") WHERE column1 IS NOT NULL",
        bind: |q, r| {
            let f = r.fixed;
            let q = q
                .bind(r.id.to_string())
                .bind(r.spoke_id.to_string())
                .bind(f.directive_type.clone())
                .bind(r.payload.to_owned())
                .bind(i64::from(f.max_attempts))
                .bind(i64::from(f.priority))
                .bind(f.created_at)
                .bind(f.expires_at)
                .bind(f.ack_deadline_ms)
                .bind(f.group_id.to_string())
                .bind(f.idempotency_key.clone())
                .bind(f.coalesce_key.clone());
            bind_state(q, &r.state)
        },
    }
}

/// Binds the mutable columns after the id.
fn bind_state<'q>(q: Query<'q>, u: &UpdateRow) -> Query<'q> {
    q.bind(u.state)
        .bind(i64::from(u.attempts))
        .bind(u.updated_at)
        .bind(u.ack_due_at)
        .bind(u.result.map(str::to_owned))
        .bind(u.error.to_owned())
        .bind(i64::from(u.progress))
        .bind(u.progress_message.to_owned())
}

fn update_directives<'a>() -> Statement<UpdateRow<'a>> {
    Statement {
        head: "WITH v (id, state, attempts, updated_at, ack_due_at, result, error, progress, \
        progress_message) AS (VALUES ",
        columns: 9,
        tail: ") UPDATE directives SET state = v.state, attempts = v.attempts, \
        updated_at = v.updated_at, ack_due_at = v.ack_due_at, result = v.result, \
        error = v.error, progress = v.progress, progress_message = v.progress_message \
        FROM v WHERE directives.id = v.id",
        bind: |q, r| bind_state(q.bind(r.id.to_string()), r),
    }
}

fn insert_keys<'a>() -> Statement<KeyRow<'a>> {
    Statement {
        head: "INSERT INTO idempotency_keys (key, group_id, created_at) SELECT * FROM (VALUES ",
        columns: 3,
        tail: ") WHERE column1 IS NOT NULL",
        bind: |q, r| {
            q.bind(r.key.to_owned())
                .bind(r.group_id.to_string())
                .bind(r.created_at)
        },
    }
}

fn insert_events() -> Statement<EventRow> {
    Statement {
        head: "INSERT INTO events (seq, type, time, spoke_id, directive_id, details) \
            SELECT * FROM (VALUES ",
        columns: 6,
        tail: ") WHERE column1 IS NOT NULL",
        bind: |q, r| {
            q.bind(r.seq)
                .bind(r.kind.as_str())
                .bind(r.time)
                .bind(r.spoke_id.map(|id| id.to_string()))
                .bind(r.directive_id.map(|id| id.to_string()))
                .bind(r.details.clone())
        },
    }
}

/// The rows of one batch, merged per row.
#[derive(Default)]
struct Rows<'a> {
    spokes: Vec<SpokeRow<'a>>,
    spoke_index: HashMap<Uuid, usize>,
    created: Vec<NewDirectiveRow<'a>>,
    updated: Vec<UpdateRow<'a>>,
    directive_index: HashMap<Uuid, Slot>,
    keys: Vec<KeyRow<'a>>,
    events: Vec<EventRow>,
}

#[derive(Clone, Copy)]
enum Slot {
    Created(usize),
    Updated(usize),
}

impl<'a> Rows<'a> {
    fn spoke(&mut self, info: &'a SpokeInfo, live: &'a SpokeLive) {
        let row = SpokeRow { info, live };
        match self.spoke_index.get(&info.id) {
            Some(&i) => self.spokes[i] = row,
            None => {
                self.spoke_index.insert(info.id, self.spokes.len());
                self.spokes.push(row);
            }
        }
    }

    fn created(&mut self, id: Uuid, spoke_id: Uuid, fixed: &'a Fixed, payload: &'a str) {
        self.directive_index
            .insert(id, Slot::Created(self.created.len()));
        self.created.push(NewDirectiveRow {
            id,
            spoke_id,
            fixed,
            payload,
            state: UpdateRow {
                id,
                state: State::Pending.as_str(),
                attempts: 0,
                updated_at: fixed.created_at,
                ack_due_at: None,
                result: None,
                error: "",
                progress: 0,
                progress_message: "",
            },
        });
    }

    fn updated(&mut self, update: &'a DirectiveUpdate) {
        let row = UpdateRow::from(update);
        match self.directive_index.get(&update.id) {
            Some(Slot::Created(i)) => self.created[*i].state = row,
            Some(Slot::Updated(i)) => self.updated[*i] = row,
            None => {
                self.directive_index
                    .insert(update.id, Slot::Updated(self.updated.len()));
                self.updated.push(row);
            }
        }
    }
}

impl Store {
    /// Commits `changes` in one transaction, in order, with one sync.
    /// Nothing is written if it fails.
    pub async fn commit(&self, changes: &[Change]) -> Result<Committed> {
        let first_seq = self.next_seq.load(Ordering::Relaxed);
        let result = self.try_commit(changes).await;
        match &result {
            Ok(_) => {
                self.commits.fetch_add(1, Ordering::Relaxed);
                let last = self.next_seq.load(Ordering::Relaxed) - 1;
                self.publish_events(last);
            }
            // Rolled back: the sequences handed out were not used.
            Err(_) => self.next_seq.store(first_seq, Ordering::Relaxed),
        }
        result
    }

    async fn try_commit(&self, changes: &[Change]) -> Result<Committed> {
        let mut tx = self.writer.begin().await?;
        let mut rows = Rows::default();
        let mut committed = Committed::default();
        // Metric batches are decided in order, inside the transaction: a
        // batch id stored earlier in this same batch is a duplicate too.
        let mut metrics: Vec<(Uuid, &Arc<Batch>, i64, usize)> = Vec::new();
        for change in changes {
            match change {
                Change::Spoke(info, live) => rows.spoke(info, live),
                Change::DirectiveCreated {
                    id,
                    spoke_id,
                    fixed,
                    payload,
                } => rows.created(*id, *spoke_id, fixed, payload),
                Change::DirectiveUpdated(update) => rows.updated(update),
                Change::IdempotencyKey { key, group_id, at } => rows.keys.push(KeyRow {
                    key,
                    group_id: *group_id,
                    created_at: *at,
                }),
                Change::Event { event, at } => {
                    rows.events.push(EventRow::new(self.take_seq(), event, *at));
                }
                Change::Metrics {
                    spoke_id,
                    batch,
                    at,
                } => {
                    // Its event's place in the sequence is kept; whether the
                    // event is written is known once the batch is tried.
                    metrics.push((*spoke_id, batch, *at, rows.events.len()));
                    rows.events.push(EventRow {
                        seq: self.take_seq(),
                        kind: Kind::MetricsReceived,
                        time: *at,
                        spoke_id: Some(*spoke_id),
                        directive_id: None,
                        details: String::new(),
                    });
                }
            }
        }
        execute(&mut tx, &upsert_spokes(), &rows.spokes).await?;
        execute(&mut tx, &insert_directives(), &rows.created).await?;
        execute(&mut tx, &update_directives(), &rows.updated).await?;
        execute(&mut tx, &insert_keys(), &rows.keys).await?;
        let mut skipped = Vec::new();
        for (spoke_id, batch, at, event) in metrics {
            let stored = store_batch(&mut tx, spoke_id, batch, at).await?;
            match stored {
                StoredBatch::Accepted(_) => {
                    rows.events[event].details = serde_json::json!({
                        "batch_id": batch.batch_id,
                        "accepted": batch.points.len(),
                        "rejected": batch.rejected.len(),
                    })
                    .to_string();
                }
                StoredBatch::Duplicate(_) => skipped.push(event),
            }
            committed.metrics.push(stored);
        }
        if !skipped.is_empty() {
            // A duplicate batch records no event; later events keep their
            // sequences, so the log has a hole there that no reader can
            // tell from a purged event. Renumber instead: the sequences of
            // this batch are still private to it.
            let base = rows.events.first().map_or(0, |e| e.seq);
            let mut events: Vec<EventRow> = std::mem::take(&mut rows.events)
                .into_iter()
                .enumerate()
                .filter(|(i, _)| !skipped.contains(i))
                .map(|(_, e)| e)
                .collect();
            for (n, e) in events.iter_mut().enumerate() {
                e.seq = base + n as i64;
            }
            self.next_seq
                .store(base + events.len() as i64, Ordering::Relaxed);
            rows.events = events;
        }
        execute(&mut tx, &insert_events(), &rows.events).await?;
        tx.commit().await?;
        Ok(committed)
    }
}

/// Runs `statement` over `rows`: one statement per [`MAX_ROWS`], padded.
async fn execute<R>(
    tx: &mut Transaction<'static, Sqlite>,
    statement: &Statement<R>,
    rows: &[R],
) -> Result<()> {
    for chunk in rows.chunks(MAX_ROWS) {
        let n = chunk.len().next_power_of_two();
        let mut sql = String::with_capacity(statement.head.len() + n * statement.columns * 3 + 512);
        sql.push_str(statement.head);
        for i in 0..n {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            for c in 0..statement.columns {
                sql.push_str(if c == 0 { "?" } else { ", ?" });
            }
            sql.push(')');
        }
        sql.push_str(statement.tail);
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for row in chunk {
            query = (statement.bind)(query, row);
        }
        for _ in 0..(n - chunk.len()) * statement.columns {
            query = query.bind(None::<i64>);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}
