//! One commit's rows, gathered from its [`Change`]s the same way for both
//! backends: changes to the same row are merged first (the ledger always
//! sends a row's whole mutable state, so the last change wins), then each
//! backend writes every kind of row its own way. Metric batches are
//! decided by the backend, inside its transaction; what it decided is
//! settled here (events of duplicates dropped), and events are numbered
//! last, consecutively, so the log has no hole.

use std::collections::HashMap;
use std::sync::Arc;

use uuid::Uuid;

use super::{Change, Committed, DirectiveUpdate, StoredBatch};
use crate::directives::{Fixed, State};
use crate::error::{Error, Result};
use crate::events::{Kind, NewEvent};
use crate::metrics::Batch;
use crate::spokes::{SpokeInfo, SpokeLive};

/// A spoke's row.
pub(super) struct SpokeRow<'a> {
    pub info: &'a SpokeInfo,
    pub live: &'a SpokeLive,
    pub deleted_at: Option<i64>,
}

/// A new directive's row.
pub(super) struct NewDirectiveRow<'a> {
    pub id: Uuid,
    pub spoke_id: Uuid,
    pub fixed: &'a Fixed,
    pub payload: &'a str,
    pub state: UpdateRow<'a>,
}

/// A directive's mutable columns.
pub(super) struct UpdateRow<'a> {
    pub id: Uuid,
    pub state: &'static str,
    pub attempts: u32,
    pub updated_at: i64,
    pub ack_due_at: Option<i64>,
    pub result: Option<&'a str>,
    pub error: &'a str,
    pub progress: u32,
    pub progress_message: &'a str,
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

/// An event's row; its sequence is given by [`Rows::number_events`].
pub(super) struct EventRow {
    pub seq: i64,
    pub kind: Kind,
    pub time: i64,
    pub spoke_id: Option<Uuid>,
    pub directive_id: Option<Uuid>,
    /// JSON text.
    pub details: String,
}

impl EventRow {
    fn new(event: &NewEvent, time: i64) -> Self {
        Self {
            seq: 0,
            kind: event.kind,
            time,
            spoke_id: event.spoke_id,
            directive_id: event.directive_id,
            details: event.details.to_string(),
        }
    }
}

/// An idempotency key's row.
pub(super) struct KeyRow<'a> {
    pub key: &'a str,
    pub group_id: Uuid,
    pub fingerprint: &'a str,
    pub created_at: i64,
}

/// A metric batch to decide, in commit order.
pub(super) struct MetricsRow<'a> {
    pub spoke_id: Uuid,
    pub batch: &'a Arc<Batch>,
    pub at: i64,
    /// Its event's place in `Rows::events`.
    event: usize,
}

/// The rows of one batch, merged per row.
#[derive(Default)]
pub(super) struct Rows<'a> {
    pub spokes: Vec<SpokeRow<'a>>,
    spoke_index: HashMap<Uuid, usize>,
    pub created: Vec<NewDirectiveRow<'a>>,
    pub updated: Vec<UpdateRow<'a>>,
    directive_index: HashMap<Uuid, Slot>,
    pub keys: Vec<KeyRow<'a>>,
    /// Fan-out payloads: group id, payload, created at.
    pub groups: Vec<(Uuid, &'a str, i64)>,
    /// Spokes deleted without another change in this batch: id, when.
    pub deleted: Vec<(Uuid, i64)>,
    pub metrics: Vec<MetricsRow<'a>>,
    pub events: Vec<EventRow>,
    /// Publishers' marks: stream, highest sequence acknowledged.
    pub published: Vec<(&'a str, i64)>,
}

#[derive(Clone, Copy)]
enum Slot {
    Created(usize),
    Updated(usize),
}

impl<'a> Rows<'a> {
    /// Gathers the rows of `changes`, in order.
    pub fn gather(changes: &'a [Change]) -> Self {
        let mut rows = Self::default();
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
                Change::Event { event, at } => rows.events.push(EventRow::new(event, *at)),
                Change::EventsPublished { stream, through } => {
                    match rows.published.iter_mut().find(|(s, _)| *s == &**stream) {
                        Some((_, mark)) => *mark = (*mark).max(*through),
                        None => rows.published.push((stream, *through)),
                    }
                }
                Change::Metrics {
                    spoke_id,
                    batch,
                    at,
                } => {
                    // Its event's place in the sequence is kept; whether the
                    // event is written is known once the batch is tried.
                    rows.metrics.push(MetricsRow {
                        spoke_id: *spoke_id,
                        batch,
                        at: *at,
                        event: rows.events.len(),
                    });
                    rows.events.push(EventRow {
                        seq: 0,
                        kind: Kind::MetricsReceived,
                        time: *at,
                        spoke_id: Some(*spoke_id),
                        directive_id: None,
                        details: String::new(),
                    });
                }
            }
        }
        rows
    }

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

    /// Takes what the backend decided for each metric batch, in order: a
    /// stored batch's event gets its details, a duplicate's is dropped (a
    /// duplicate records no event).
    pub fn settle_metrics(&mut self, outcomes: Vec<StoredBatch>) -> Result<Committed> {
        if outcomes.len() != self.metrics.len() {
            return Err(Error::Corrupt(
                "a metric batch without an outcome at commit".into(),
            ));
        }
        let mut skipped = Vec::new();
        for (m, outcome) in self.metrics.iter().zip(&outcomes) {
            match outcome {
                StoredBatch::Accepted(_) => {
                    self.events[m.event].details = serde_json::json!({
                        "batch_id": m.batch.batch_id,
                        "accepted": m.batch.points.len(),
                        "rejected": m.batch.rejected.len(),
                    })
                    .to_string();
                }
                StoredBatch::Duplicate(_) => skipped.push(m.event),
            }
        }
        if !skipped.is_empty() {
            self.events = std::mem::take(&mut self.events)
                .into_iter()
                .enumerate()
                .filter(|(i, _)| !skipped.contains(i))
                .map(|(_, e)| e)
                .collect();
        }
        Ok(Committed { metrics: outcomes })
    }

    /// Numbers the events consecutively from `first`, in commit order;
    /// returns the sequence the next commit starts from.
    pub fn number_events(&mut self, first: i64) -> i64 {
        for (n, e) in self.events.iter_mut().enumerate() {
            e.seq = first + n as i64;
        }
        first + self.events.len() as i64
    }
}
