//! Group commit: everything the ledger decided since the last commit goes
//! into one transaction, with one sync, on the committer's own connection
//! ([`Writer`]).
//!
//! The writer is a plain SQLite connection (rusqlite) used on the
//! committer's thread: every statement runs there and then, with no hop to
//! a worker thread and back (through sqlx, each statement of a commit
//! waited for two thread hand-offs, which under load cost more than the
//! statement). Each kind of row has one prepared single-row statement, run
//! once per row. Changes to the same row within a batch are merged first:
//! the ledger always sends a row's whole mutable state, so the last change
//! wins.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior, params};
use uuid::Uuid;

use super::metrics::{StoredBatch, store_batch};
use super::{Durability, Store};
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
        /// The payload, JSON text; `None` for a directive of a fan-out,
        /// whose payload is stored once, in its group's row.
        payload: Option<Arc<str>>,
    },
    /// The payload of a fan-out, stored once for all its directives.
    DirectiveGroup {
        /// The create's group id.
        group_id: Uuid,
        /// The payload, JSON text.
        payload: Arc<str>,
        /// When, Unix ms.
        at: i64,
    },
    /// A spoke was deleted: its name is free again; the row stays for its
    /// history until retention.
    SpokeDeleted {
        /// The spoke.
        id: Uuid,
        /// When, Unix ms.
        at: i64,
    },
    /// A directive's whole mutable state.
    DirectiveUpdated(DirectiveUpdate),
    /// An idempotency key and the create it made.
    IdempotencyKey {
        /// The key.
        key: String,
        /// The group the create made.
        group_id: Uuid,
        /// What the create asked for (see `ledger`'s fingerprint).
        fingerprint: Arc<str>,
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
    deleted_at: Option<i64>,
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
    fingerprint: &'a str,
    created_at: i64,
}

const UPSERT_SPOKE: &str = "INSERT INTO spokes (id, name, key_hash, labels, capabilities, \
    version, max_in_flight, registered_at, revoked_at, last_heartbeat_at, last_seen_at, status, \
    status_message, reported_in_flight, reported_buffered_points, reported_failed_pushes, health, \
    deleted_at) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18) \
    ON CONFLICT (id) DO UPDATE SET name = excluded.name, key_hash = excluded.key_hash, \
    labels = excluded.labels, capabilities = excluded.capabilities, version = excluded.version, \
    max_in_flight = excluded.max_in_flight, revoked_at = excluded.revoked_at, \
    last_heartbeat_at = excluded.last_heartbeat_at, last_seen_at = excluded.last_seen_at, \
    status = excluded.status, status_message = excluded.status_message, \
    reported_in_flight = excluded.reported_in_flight, \
    reported_buffered_points = excluded.reported_buffered_points, \
    reported_failed_pushes = excluded.reported_failed_pushes, health = excluded.health, \
    deleted_at = COALESCE(excluded.deleted_at, spokes.deleted_at)";

const INSERT_DIRECTIVE: &str = "INSERT INTO directives (id, spoke_id, type, payload, \
    max_attempts, priority, created_at, expires_at, ack_deadline_ms, group_id, idempotency_key, \
    coalesce_key, state, attempts, updated_at, ack_due_at, result, error, progress, \
    progress_message) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, \
    ?16, ?17, ?18, ?19, ?20)";

const UPDATE_DIRECTIVE: &str = "UPDATE directives SET state = ?2, attempts = ?3, \
    updated_at = ?4, ack_due_at = ?5, result = ?6, error = ?7, progress = ?8, \
    progress_message = ?9 WHERE id = ?1";

const INSERT_KEY: &str = "INSERT INTO idempotency_keys (key, group_id, fingerprint, created_at) \
    VALUES (?1, ?2, ?3, ?4)";

const INSERT_GROUP: &str =
    "INSERT INTO directive_groups (group_id, payload, created_at) VALUES (?1, ?2, ?3)";

const DELETE_SPOKE: &str = "UPDATE spokes SET deleted_at = ?2 WHERE id = ?1";

const INSERT_EVENT: &str = "INSERT INTO events (seq, type, time, spoke_id, directive_id, \
    details) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// The rows of one batch, merged per row.
#[derive(Default)]
struct Rows<'a> {
    spokes: Vec<SpokeRow<'a>>,
    spoke_index: HashMap<Uuid, usize>,
    created: Vec<NewDirectiveRow<'a>>,
    updated: Vec<UpdateRow<'a>>,
    directive_index: HashMap<Uuid, Slot>,
    keys: Vec<KeyRow<'a>>,
    groups: Vec<(Uuid, &'a str, i64)>,
    deleted: Vec<(Uuid, i64)>,
    events: Vec<EventRow>,
}

#[derive(Clone, Copy)]
enum Slot {
    Created(usize),
    Updated(usize),
}

impl<'a> Rows<'a> {
    fn spoke(&mut self, info: &'a SpokeInfo, live: &'a SpokeLive) {
        let row = SpokeRow {
            info,
            live,
            deleted_at: None,
        };
        match self.spoke_index.get(&info.id) {
            Some(&i) => {
                let deleted_at = self.spokes[i].deleted_at;
                self.spokes[i] = SpokeRow { deleted_at, ..row };
            }
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

/// The one connection that writes, owned by the committer's thread.
pub struct Writer {
    conn: Connection,
    store: Store,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Writer(..)")
    }
}

impl Writer {
    /// Opens the writing connection to the database file at `path`.
    pub(super) fn open(path: &Path, durability: Durability, store: Store) -> Result<Self> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let synchronous = match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous}; \
             PRAGMA foreign_keys = ON; PRAGMA wal_autocheckpoint = 0;"
        ))?;
        conn.set_prepared_statement_cache_capacity(32);
        Ok(Self { conn, store })
    }

    /// Commits `changes` in one transaction, in order, with one sync.
    /// Nothing is written if it fails.
    pub fn commit(&mut self, changes: &[Change]) -> Result<Committed> {
        let store = &self.store;
        let first_seq = store.next_seq.load(Ordering::Relaxed);
        let result = commit(&mut self.conn, store, changes);
        match &result {
            Ok(_) => {
                store
                    .committed_changes
                    .fetch_add(changes.len() as u64, Ordering::Relaxed);
                let last = store.next_seq.load(Ordering::Relaxed) - 1;
                store.publish_events(last);
            }
            // Rolled back: the sequences handed out were not used.
            Err(_) => store.next_seq.store(first_seq, Ordering::Relaxed),
        }
        result
    }

    /// The connection, for the other writes of the store (retention).
    pub(super) fn conn(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

fn commit(conn: &mut Connection, store: &Store, changes: &[Change]) -> Result<Committed> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut rows = Rows::default();
    let mut committed = Committed::default();
    // Metric batches are decided in order, inside the transaction: a batch
    // id stored earlier in this same batch is a duplicate too.
    let mut metrics: Vec<(Uuid, &Arc<Batch>, i64, usize)> = Vec::new();
    for change in changes {
        match change {
            Change::Spoke(info, live) => rows.spoke(info, live),
            Change::DirectiveCreated {
                id,
                spoke_id,
                fixed,
                payload,
            } => rows.created(*id, *spoke_id, fixed, payload.as_deref().unwrap_or("")),
            Change::DirectiveGroup {
                group_id,
                payload,
                at,
            } => rows.groups.push((*group_id, payload, *at)),
            Change::SpokeDeleted { id, at } => match rows.spoke_index.get(id) {
                // Created or changed in this batch: its row carries the mark.
                Some(&i) => rows.spokes[i].deleted_at = Some(*at),
                None => rows.deleted.push((*id, *at)),
            },
            Change::DirectiveUpdated(update) => rows.updated(update),
            Change::IdempotencyKey {
                key,
                group_id,
                fingerprint,
                at,
            } => rows.keys.push(KeyRow {
                key,
                group_id: *group_id,
                fingerprint,
                created_at: *at,
            }),
            Change::Event { event, at } => {
                rows.events
                    .push(EventRow::new(store.take_seq(), event, *at));
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
                    seq: store.take_seq(),
                    kind: Kind::MetricsReceived,
                    time: *at,
                    spoke_id: Some(*spoke_id),
                    directive_id: None,
                    details: String::new(),
                });
            }
        }
    }
    // A deleted spoke's name may be taken again in this same batch.
    if !rows.deleted.is_empty() {
        let mut stmt = tx.prepare_cached(DELETE_SPOKE)?;
        for (id, at) in &rows.deleted {
            stmt.execute(params![id.to_string(), at])?;
        }
    }
    {
        let mut stmt = tx.prepare_cached(UPSERT_SPOKE)?;
        for r in &rows.spokes {
            let (info, live) = (r.info, r.live);
            stmt.execute(params![
                info.id.to_string(),
                info.name,
                info.key_hash,
                info.labels_json,
                info.capabilities_json,
                live.version,
                info.max_in_flight,
                info.registered_at,
                info.revoked_at,
                live.last_heartbeat_at,
                live.last_seen_at,
                live.status as i32,
                live.status_message,
                live.reported_in_flight,
                i64::try_from(live.reported_buffered_points).unwrap_or(i64::MAX),
                i64::try_from(live.reported_failed_pushes).unwrap_or(i64::MAX),
                live.health,
                r.deleted_at,
            ])?;
        }
    }
    if !rows.groups.is_empty() {
        let mut stmt = tx.prepare_cached(INSERT_GROUP)?;
        for (group_id, payload, at) in &rows.groups {
            stmt.execute(params![group_id.to_string(), payload, at])?;
        }
    }
    {
        let mut stmt = tx.prepare_cached(INSERT_DIRECTIVE)?;
        for r in &rows.created {
            let (f, u) = (r.fixed, &r.state);
            stmt.execute(params![
                r.id.to_string(),
                r.spoke_id.to_string(),
                f.directive_type,
                r.payload,
                f.max_attempts,
                f.priority,
                f.created_at,
                f.expires_at,
                f.ack_deadline_ms,
                f.group_id.to_string(),
                f.idempotency_key,
                f.coalesce_key,
                u.state,
                u.attempts,
                u.updated_at,
                u.ack_due_at,
                u.result,
                u.error,
                u.progress,
                u.progress_message,
            ])?;
        }
    }
    {
        let mut stmt = tx.prepare_cached(UPDATE_DIRECTIVE)?;
        for u in &rows.updated {
            stmt.execute(params![
                u.id.to_string(),
                u.state,
                u.attempts,
                u.updated_at,
                u.ack_due_at,
                u.result,
                u.error,
                u.progress,
                u.progress_message,
            ])?;
        }
    }
    {
        let mut stmt = tx.prepare_cached(INSERT_KEY)?;
        for k in &rows.keys {
            stmt.execute(params![
                k.key,
                k.group_id.to_string(),
                k.fingerprint,
                k.created_at
            ])?;
        }
    }
    let mut skipped = Vec::new();
    for (spoke_id, batch, at, event) in metrics {
        let stored = store_batch(&tx, spoke_id, batch, at)?;
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
        // A duplicate batch records no event; renumber the events after it
        // so the log has no hole (this batch's sequences are still private
        // to it).
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
        store
            .next_seq
            .store(base + events.len() as i64, Ordering::Relaxed);
        rows.events = events;
    }
    {
        let mut stmt = tx.prepare_cached(INSERT_EVENT)?;
        for e in &rows.events {
            stmt.execute(params![
                e.seq,
                e.kind.as_str(),
                e.time,
                e.spoke_id.map(|id| id.to_string()),
                e.directive_id.map(|id| id.to_string()),
                e.details,
            ])?;
        }
    }
    tx.commit()?;
    Ok(committed)
}
