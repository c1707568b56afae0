//! Group commit: everything the ledger decided since the last commit goes
//! into one transaction, with one sync.
//!
//! Each kind of row is written by one multi-row statement whose rows arrive
//! as one JSON array parameter (`json_each`), so a batch costs a handful of
//! statements whatever its size, and every statement's text is fixed (it
//! stays prepared in the connection's cache). Changes to the same row within
//! a batch are merged first: the ledger always sends a row's whole mutable
//! state, so the last change wins.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Serialize;
use sqlx::{Sqlite, Transaction};
use uuid::Uuid;

use super::Store;
use super::metrics::{StoredBatch, store_batch};
use crate::directives::{Fixed, State};
use crate::error::Result;
use crate::events::NewEvent;
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

#[derive(Serialize)]
struct SpokeJson<'a> {
    id: String,
    name: &'a str,
    key_hash: &'a str,
    labels: &'a str,
    capabilities: &'a str,
    version: &'a str,
    max_in_flight: u32,
    registered_at: i64,
    revoked_at: Option<i64>,
    last_heartbeat_at: Option<i64>,
    last_seen_at: Option<i64>,
    status: i32,
    status_message: &'a str,
    reported_in_flight: u32,
    reported_buffered_points: i64,
    reported_failed_pushes: i64,
    health: &'a str,
}

#[derive(Serialize)]
struct NewDirectiveJson<'a> {
    id: String,
    spoke_id: String,
    r#type: &'a str,
    payload: &'a str,
    max_attempts: u32,
    priority: i32,
    created_at: i64,
    expires_at: Option<i64>,
    ack_deadline_ms: i64,
    group_id: String,
    idempotency_key: Option<&'a str>,
    coalesce_key: Option<&'a str>,
    #[serde(flatten)]
    state: UpdateJson<'a>,
}

#[derive(Serialize)]
struct UpdateJson<'a> {
    id: String,
    state: &'static str,
    attempts: u32,
    updated_at: i64,
    ack_due_at: Option<i64>,
    result: Option<&'a str>,
    error: &'a str,
    progress: u32,
    progress_message: &'a str,
}

impl<'a> From<&'a DirectiveUpdate> for UpdateJson<'a> {
    fn from(u: &'a DirectiveUpdate) -> Self {
        Self {
            id: u.id.to_string(),
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

#[derive(Serialize)]
struct EventJson {
    seq: i64,
    r#type: &'static str,
    time: i64,
    spoke_id: Option<String>,
    directive_id: Option<String>,
    details: String,
}

#[derive(Serialize)]
struct KeyJson<'a> {
    key: &'a str,
    group_id: String,
    created_at: i64,
}

const UPSERT_SPOKES: &str = "INSERT INTO spokes (id, name, key_hash, labels, capabilities, version, \
     max_in_flight, registered_at, revoked_at, last_heartbeat_at, last_seen_at, status, status_message, \
     reported_in_flight, reported_buffered_points, reported_failed_pushes, health) \
     SELECT value->>'id', value->>'name', value->>'key_hash', value->>'labels', value->>'capabilities', \
     value->>'version', value->>'max_in_flight', value->>'registered_at', value->>'revoked_at', \
     value->>'last_heartbeat_at', value->>'last_seen_at', value->>'status', value->>'status_message', \
     value->>'reported_in_flight', value->>'reported_buffered_points', value->>'reported_failed_pushes', \
     value->>'health' FROM json_each($1) WHERE true \
     ON CONFLICT (id) DO UPDATE SET name = excluded.name, key_hash = excluded.key_hash, \
     labels = excluded.labels, capabilities = excluded.capabilities, version = excluded.version, \
     max_in_flight = excluded.max_in_flight, revoked_at = excluded.revoked_at, \
     last_heartbeat_at = excluded.last_heartbeat_at, last_seen_at = excluded.last_seen_at, \
     status = excluded.status, status_message = excluded.status_message, \
     reported_in_flight = excluded.reported_in_flight, \
     reported_buffered_points = excluded.reported_buffered_points, \
     reported_failed_pushes = excluded.reported_failed_pushes, health = excluded.health";

const INSERT_DIRECTIVES: &str = "INSERT INTO directives (id, spoke_id, type, payload, state, attempts, \
     max_attempts, priority, created_at, updated_at, expires_at, ack_deadline_ms, ack_due_at, group_id, \
     idempotency_key, coalesce_key, result, error, progress, progress_message) \
     SELECT value->>'id', value->>'spoke_id', value->>'type', value->>'payload', value->>'state', \
     value->>'attempts', value->>'max_attempts', value->>'priority', value->>'created_at', \
     value->>'updated_at', value->>'expires_at', value->>'ack_deadline_ms', value->>'ack_due_at', \
     value->>'group_id', value->>'idempotency_key', value->>'coalesce_key', value->>'result', \
     value->>'error', value->>'progress', value->>'progress_message' FROM json_each($1)";

const UPDATE_DIRECTIVES: &str = "WITH v AS (SELECT value->>'id' AS id, value->>'state' AS state, \
     value->>'attempts' AS attempts, value->>'updated_at' AS updated_at, \
     value->>'ack_due_at' AS ack_due_at, value->>'result' AS result, value->>'error' AS error, \
     value->>'progress' AS progress, value->>'progress_message' AS progress_message \
     FROM json_each($1)) \
     UPDATE directives SET state = v.state, attempts = v.attempts, updated_at = v.updated_at, \
     ack_due_at = v.ack_due_at, result = v.result, error = v.error, progress = v.progress, \
     progress_message = v.progress_message FROM v WHERE directives.id = v.id";

const INSERT_KEYS: &str = "INSERT INTO idempotency_keys (key, group_id, created_at) \
     SELECT value->>'key', value->>'group_id', value->>'created_at' FROM json_each($1)";

const INSERT_EVENTS: &str = "INSERT INTO events (seq, type, time, spoke_id, directive_id, details) \
     SELECT value->>'seq', value->>'type', value->>'time', value->>'spoke_id', \
     value->>'directive_id', value->>'details' FROM json_each($1)";

/// The rows of one batch, merged per row.
#[derive(Default)]
struct Rows<'a> {
    spokes: Vec<SpokeJson<'a>>,
    spoke_index: HashMap<Uuid, usize>,
    created: Vec<NewDirectiveJson<'a>>,
    updated: Vec<UpdateJson<'a>>,
    directive_index: HashMap<Uuid, Slot>,
    keys: Vec<KeyJson<'a>>,
    events: Vec<EventJson>,
}

#[derive(Clone, Copy)]
enum Slot {
    Created(usize),
    Updated(usize),
}

impl<'a> Rows<'a> {
    fn spoke(&mut self, info: &'a SpokeInfo, live: &'a SpokeLive) {
        let row = SpokeJson {
            id: info.id.to_string(),
            name: &info.name,
            key_hash: &info.key_hash,
            labels: &info.labels_json,
            capabilities: &info.capabilities_json,
            version: &live.version,
            max_in_flight: info.max_in_flight,
            registered_at: info.registered_at,
            revoked_at: info.revoked_at,
            last_heartbeat_at: live.last_heartbeat_at,
            last_seen_at: live.last_seen_at,
            status: live.status as i32,
            status_message: &live.status_message,
            reported_in_flight: live.reported_in_flight,
            reported_buffered_points: i64::try_from(live.reported_buffered_points)
                .unwrap_or(i64::MAX),
            reported_failed_pushes: i64::try_from(live.reported_failed_pushes).unwrap_or(i64::MAX),
            health: live.health,
        };
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
        self.created.push(NewDirectiveJson {
            id: id.to_string(),
            spoke_id: spoke_id.to_string(),
            r#type: &fixed.directive_type,
            payload,
            max_attempts: fixed.max_attempts,
            priority: fixed.priority,
            created_at: fixed.created_at,
            expires_at: fixed.expires_at,
            ack_deadline_ms: fixed.ack_deadline_ms,
            group_id: fixed.group_id.to_string(),
            idempotency_key: fixed.idempotency_key.as_deref(),
            coalesce_key: fixed.coalesce_key.as_deref(),
            state: UpdateJson {
                id: id.to_string(),
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
        let row = UpdateJson::from(update);
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

    fn event(&mut self, seq: i64, event: &NewEvent, at: i64) {
        self.events.push(EventJson {
            seq,
            r#type: event.kind.as_str(),
            time: at,
            spoke_id: event.spoke_id.map(|id| id.to_string()),
            directive_id: event.directive_id.map(|id| id.to_string()),
            details: event.details.to_string(),
        });
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
                Change::IdempotencyKey { key, group_id, at } => rows.keys.push(KeyJson {
                    key,
                    group_id: group_id.to_string(),
                    created_at: *at,
                }),
                Change::Event { event, at } => {
                    let seq = self.take_seq();
                    rows.event(seq, event, *at);
                }
                Change::Metrics {
                    spoke_id,
                    batch,
                    at,
                } => {
                    // Its event's place in the sequence is kept; whether the
                    // event is written is known once the batch is tried.
                    metrics.push((*spoke_id, batch, *at, rows.events.len()));
                    let seq = self.take_seq();
                    rows.events.push(EventJson {
                        seq,
                        r#type: crate::events::Kind::MetricsReceived.as_str(),
                        time: *at,
                        spoke_id: Some(spoke_id.to_string()),
                        directive_id: None,
                        details: String::new(),
                    });
                }
            }
        }
        execute(&mut tx, UPSERT_SPOKES, &rows.spokes).await?;
        execute(&mut tx, INSERT_DIRECTIVES, &rows.created).await?;
        execute(&mut tx, UPDATE_DIRECTIVES, &rows.updated).await?;
        execute(&mut tx, INSERT_KEYS, &rows.keys).await?;
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
            let mut events: Vec<EventJson> = std::mem::take(&mut rows.events)
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
        execute(&mut tx, INSERT_EVENTS, &rows.events).await?;
        tx.commit().await?;
        Ok(committed)
    }
}

/// Runs one multi-row statement over `rows`, if there are any.
async fn execute<T: Serialize>(
    tx: &mut Transaction<'static, Sqlite>,
    sql: &'static str,
    rows: &[T],
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let json = serde_json::to_string(rows)
        .map_err(|e| crate::Error::Corrupt(format!("encoding a batch: {e}")))?;
    sqlx::query(sql).bind(json).execute(&mut **tx).await?;
    Ok(())
}
