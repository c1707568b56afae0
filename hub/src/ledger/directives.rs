//! Directives in the ledger: creating them (targets, idempotency,
//! coalescing), acks, cancels, and the final transitions they share.

use std::cmp::Reverse;
use std::sync::Arc;

use serde_json::json;
use uuid::Uuid;

use super::{Committed, Effect, Ledger, PAYLOAD_CACHE_BYTES, State};
use crate::directives::{
    Ack, AckApplied, AckOutcome, DirectiveRecord, Fixed, NewDirective, State as DState, Target,
};
use crate::error::{Error, Result};
use crate::events::{Kind, NewEvent};
use crate::store::{Change, DirectiveUpdate, IdempotencyRow, OutstandingRow};

/// A directive that is not final.
pub(super) struct Entry {
    pub(super) spoke_id: Uuid,
    pub(super) fixed: Arc<Fixed>,
    /// The payload, unless the cache was full when it was created (or the
    /// ledger was rebuilt since): then it is read from the store.
    pub(super) payload: Option<Arc<str>>,
    pub(super) state: DState,
    /// Whether its create is committed (only then may it be delivered).
    pub(super) committed: bool,
    pub(super) attempts: u32,
    pub(super) updated_at: i64,
    pub(super) ack_due_at: Option<i64>,
    pub(super) progress: u32,
    pub(super) progress_message: String,
    /// The attempt being POSTed to the spoke's webhook right now (the
    /// directive is PENDING, in the window, with no ack deadline).
    pub(super) posting: Option<u32>,
    /// When a failed webhook attempt is retried (PENDING, in the window).
    pub(super) retry_at: Option<i64>,
}

impl Entry {
    /// Its whole mutable state, for the log.
    pub(super) fn update(&self, id: Uuid) -> DirectiveUpdate {
        DirectiveUpdate {
            id,
            state: self.state,
            attempts: self.attempts,
            updated_at: self.updated_at,
            ack_due_at: self.ack_due_at,
            result: None,
            error: String::new(),
            progress: self.progress,
            progress_message: self.progress_message.clone(),
        }
    }

    /// The directive as it is now, without its payload.
    pub(super) fn record(&self, id: Uuid, spoke_name: &str) -> DirectiveRecord {
        let f = &self.fixed;
        DirectiveRecord {
            id,
            spoke_id: self.spoke_id,
            spoke_name: spoke_name.to_owned(),
            directive_type: f.directive_type.clone(),
            payload: String::new(),
            state: self.state,
            attempts: self.attempts,
            max_attempts: f.max_attempts,
            priority: f.priority,
            created_at: f.created_at,
            updated_at: self.updated_at,
            expires_at: f.expires_at,
            ack_deadline_ms: f.ack_deadline_ms,
            ack_due_at: self.ack_due_at,
            group_id: f.group_id,
            idempotency_key: f.idempotency_key.clone(),
            coalesce_key: f.coalesce_key.clone(),
            result: None,
            error: String::new(),
            progress: self.progress,
            progress_message: self.progress_message.clone(),
        }
    }
}

/// Directives a create made.
#[derive(Debug)]
pub struct Created {
    /// The create's group id.
    pub group_id: Uuid,
    /// One per target spoke, oldest first.
    pub directives: Vec<DirectiveRecord>,
    /// Spokes the fan-out matched that lack the type.
    pub skipped: u32,
}

/// What a create did.
#[derive(Debug)]
pub enum CreateStep {
    /// New directives, confirmed once the commit is done.
    Created(Created, Committed),
    /// The idempotency key was used before, by the create of this group.
    Replay(Uuid),
}

/// What an ack did.
#[derive(Debug)]
pub enum AckStep {
    /// Applied; answer once the commit is done.
    Logged(AckApplied, Committed),
    /// The directive is not outstanding: final or unknown; the store
    /// answers (after a barrier).
    Unknown,
}

/// What a cancel did.
#[derive(Debug)]
pub enum CancelStep {
    /// Cancelled; the spoke holding it is told after the commit.
    Logged {
        /// The commit.
        committed: Committed,
        /// Whether the spoke had received it.
        was_delivered: bool,
    },
    /// The directive is not outstanding: final or unknown.
    Unknown,
}

impl Ledger {
    /// Creates one directive per target spoke, sharing a new group id. A
    /// coalesce key cancels the spoke's PENDING directive with the same
    /// key. With an idempotency key already used, makes nothing.
    pub fn create(&self, new: &NewDirective, now_ms: i64) -> Result<CreateStep> {
        let mut state = self.lock();
        state.writable()?;
        let fingerprint: Option<Arc<str>> = new
            .idempotency_key
            .as_ref()
            .map(|_| fingerprint(new).into());
        if let Some((key, used)) = new
            .idempotency_key
            .as_ref()
            .and_then(|k| Some((k, state.idempotency.get(k)?)))
        {
            let same =
                used.fingerprint.is_empty() || Some(&used.fingerprint) == fingerprint.as_ref();
            if !same {
                return Err(Error::AlreadyExists(format!(
                    "idempotency key {key:?} was used by a different create (group {}); \
                     use a new key for a different request",
                    used.group_id
                )));
            }
            return Ok(CreateStep::Replay(used.group_id));
        }
        let (targets, skipped) = state.resolve(new)?;
        let group_id = Uuid::now_v7();
        let fixed = Arc::new(Fixed {
            directive_type: new.directive_type.clone(),
            priority: new.priority,
            max_attempts: new.max_attempts,
            created_at: now_ms,
            expires_at: new.expires_at,
            ack_deadline_ms: new.ack_deadline_ms,
            group_id,
            idempotency_key: new.idempotency_key.clone(),
            coalesce_key: new.coalesce_key.clone(),
        });
        let payload: Arc<str> = Arc::from(new.payload.as_str());
        // A fan-out stores its payload once, in its group's row.
        let fan_out = targets.len() > 1;
        if fan_out {
            state.log.changes.push(Change::DirectiveGroup {
                group_id,
                payload: payload.clone(),
                at: now_ms,
            });
        }
        let mut directives = Vec::with_capacity(targets.len());
        for spoke_id in targets {
            let id = Uuid::now_v7();
            if let Some(key) = &fixed.coalesce_key {
                state.coalesce(spoke_id, key, id, now_ms);
            }
            let cached = state.payload_bytes + payload.len() <= PAYLOAD_CACHE_BYTES;
            if cached {
                state.payload_bytes += payload.len();
            }
            let entry = Entry {
                spoke_id,
                fixed: fixed.clone(),
                payload: cached.then(|| payload.clone()),
                state: DState::Pending,
                committed: false,
                attempts: 0,
                updated_at: now_ms,
                ack_due_at: None,
                progress: 0,
                progress_message: String::new(),
                posting: None,
                retry_at: None,
            };
            let Some(spoke) = state.spokes.get_mut(&spoke_id) else {
                continue;
            };
            let mut record = entry.record(id, &spoke.info.name);
            record.payload = new.payload.clone();
            directives.push(record);
            state.insert(id, entry);
            state.log.changes.push(Change::DirectiveCreated {
                id,
                spoke_id,
                fixed: fixed.clone(),
                payload: (!fan_out).then(|| payload.clone()),
            });
            state.log.changes.push(Change::Event {
                event: NewEvent::directive(
                    Kind::DirectiveCreated,
                    spoke_id,
                    id,
                    json!({"type": fixed.directive_type, "group_id": group_id.to_string()}),
                ),
                at: now_ms,
            });
            state.log.effects.push(Effect::Publish(id));
        }
        if let (Some(key), Some(fingerprint)) = (&new.idempotency_key, fingerprint) {
            state.remember_key(IdempotencyRow {
                key: key.clone(),
                group_id,
                fingerprint: fingerprint.to_string(),
                created_at: now_ms,
            });
            state.log.changes.push(Change::IdempotencyKey {
                key: key.clone(),
                group_id,
                fingerprint,
                at: now_ms,
            });
        }
        let committed = self.commit_soon(state);
        if let Some(at) = new.expires_at {
            self.timer_plan().schedule(at);
        }
        Ok(CreateStep::Created(
            Created {
                group_id,
                directives,
                skipped,
            },
            committed,
        ))
    }

    /// Applies an ack from `spoke_id`, with the rules of the contract.
    pub fn ack(&self, spoke_id: Uuid, ack: &Ack, now_ms: i64) -> Result<AckStep> {
        let id = ack.directive_id;
        let mut state = self.lock();
        state.writable()?;
        let Some(entry) = state.directives.get_mut(&id) else {
            return Ok(AckStep::Unknown);
        };
        if entry.spoke_id != spoke_id {
            return Err(Error::NotFound(format!("directive {id} not found")));
        }
        // A final ack that arrives after its ack deadline (the directive is
        // PENDING again, waiting for another delivery) still reports work
        // this spoke did: it is kept. Progress needs a live delivery.
        // So is any ack while its webhook request is out: the spoke has it.
        let late_final =
            entry.attempts > 0 && !matches!(ack.outcome, AckOutcome::InProgress { .. });
        if entry.state == DState::Pending && !late_final && entry.posting.is_none() {
            return Err(Error::FailedPrecondition(format!(
                "directive {id} is PENDING: it is not delivered to this spoke right now"
            )));
        }
        let (kind, details) = match &ack.outcome {
            AckOutcome::InProgress { progress, message } => {
                entry.state = DState::InProgress;
                if let Some(p) = progress {
                    entry.progress = *p;
                }
                entry.progress_message.clone_from(message);
                entry.updated_at = now_ms;
                let old = entry.ack_due_at;
                let due = now_ms.saturating_add(entry.fixed.ack_deadline_ms);
                entry.ack_due_at = Some(due);
                let update = entry.update(id);
                if let Some(old) = old {
                    state.ack_due.remove(&(old, id));
                }
                state.ack_due.insert((due, id));
                state.log.changes.push(Change::DirectiveUpdated(update));
                self.timer_plan().schedule(due);
                (
                    Kind::DirectiveProgress,
                    json!({"progress": progress, "message": message}),
                )
            }
            AckOutcome::Completed(result) => {
                state.finish(id, DState::Completed, Some(result.clone()), "", now_ms);
                (Kind::DirectiveCompleted, json!({}))
            }
            AckOutcome::Failed(error) => {
                state.finish(id, DState::Failed, None, error, now_ms);
                (Kind::DirectiveFailed, json!({"error": error}))
            }
            AckOutcome::Rejected(error) => {
                state.finish(id, DState::Rejected, None, error, now_ms);
                (Kind::DirectiveRejected, json!({"error": error}))
            }
        };
        state.log.changes.push(Change::Event {
            event: NewEvent::directive(kind, spoke_id, id, details),
            at: now_ms,
        });
        let committed = self.commit_soon(state);
        Ok(AckStep::Logged(
            AckApplied {
                state: ack.outcome.state(),
                duplicate: false,
            },
            committed,
        ))
    }

    /// Cancels a directive that is not final; the spoke is told once the
    /// cancel is committed, on its current or next stream.
    pub fn cancel(&self, id: Uuid, reason: &str, now_ms: i64) -> Result<CancelStep> {
        let mut state = self.lock();
        state.writable()?;
        let Some(entry) = state.finish(id, DState::Cancelled, None, reason, now_ms) else {
            return Ok(CancelStep::Unknown);
        };
        let was_delivered = matches!(entry.state, DState::Delivered | DState::InProgress);
        state.log.changes.push(Change::Event {
            event: NewEvent::directive(
                Kind::DirectiveCancelled,
                entry.spoke_id,
                id,
                json!({"reason": reason}),
            ),
            at: now_ms,
        });
        if was_delivered {
            state.log.effects.push(Effect::Notice {
                spoke_id: entry.spoke_id,
                directive_id: id,
                reason: reason.to_owned(),
            });
        }
        let committed = self.commit_soon(state);
        Ok(CancelStep::Logged {
            committed,
            was_delivered,
        })
    }
}

/// What a create asked for, as a digest: a repeat with the same
/// idempotency key must ask for the same thing. The expiry is left out: a
/// client retrying "expire in an hour" computes a later time each try.
fn fingerprint(new: &NewDirective) -> String {
    let target = match &new.target {
        Target::SpokeId(id) => json!({"spoke_id": id.to_string()}),
        Target::SpokeName(name) => json!({"spoke_name": name}),
        Target::Selector(labels) => json!({"selector": labels}),
        Target::All => json!({"all_spokes": true}),
    };
    let asked = json!({
        "target": target,
        "type": new.directive_type,
        "payload": new.payload,
        "priority": new.priority,
        "ack_deadline_ms": new.ack_deadline_ms,
        "max_attempts": new.max_attempts,
        "coalesce_key": new.coalesce_key,
        "force": new.force,
    });
    crate::auth::hash_secret(&asked.to_string())
}

impl Ledger {
    /// Up to `limit` directives that are not final, oldest first, as they
    /// are now, for the admin page; payloads the ledger does not hold are
    /// listed to be read from the store.
    pub fn outstanding(&self, limit: usize) -> super::Delivery {
        let state = self.lock();
        let mut ids: Vec<Uuid> = state.directives.keys().copied().collect();
        ids.sort_unstable();
        let mut out = super::Delivery::default();
        for id in ids.into_iter().take(limit) {
            let Some(entry) = state.directives.get(&id) else {
                continue;
            };
            let name = state
                .spokes
                .get(&entry.spoke_id)
                .map_or("", |s| s.info.name.as_str());
            let mut record = entry.record(id, name);
            match &entry.payload {
                Some(payload) => record.payload = payload.to_string(),
                None => out.missing_payloads.push(id),
            }
            out.directives.push(record);
        }
        out
    }
}

impl State {
    /// The spokes a create aims at, and how many matched but lack the type.
    fn resolve(&self, new: &NewDirective) -> Result<(Vec<Uuid>, u32)> {
        let single = match &new.target {
            Target::SpokeId(id) => Some(
                self.spokes
                    .get(id)
                    .ok_or_else(|| Error::NotFound(format!("spoke {id} not found")))?,
            ),
            Target::SpokeName(name) => Some(
                self.by_name
                    .get(name)
                    .and_then(|id| self.spokes.get(id))
                    .ok_or_else(|| Error::NotFound(format!("spoke {name:?} not found")))?,
            ),
            Target::Selector(_) | Target::All => None,
        };
        if let Some(spoke) = single {
            let info = &spoke.info;
            if info.revoked_at.is_some() {
                return Err(Error::FailedPrecondition(format!(
                    "spoke {:?} is revoked",
                    info.name
                )));
            }
            if !new.force && !info.handles(&new.directive_type) {
                return Err(Error::FailedPrecondition(format!(
                    "spoke {:?} did not declare directive type {:?}; set force to send it anyway",
                    info.name, new.directive_type
                )));
            }
            return Ok((vec![info.id], 0));
        }
        let mut skipped = 0;
        let mut targets = Vec::new();
        for spoke in Ledger::active(self) {
            if let Target::Selector(selector) = &new.target
                && !spoke.info.matches(selector)
            {
                continue;
            }
            if new.force || spoke.info.handles(&new.directive_type) {
                targets.push(spoke.info.id);
            } else {
                skipped += 1;
            }
        }
        Ok((targets, skipped))
    }

    /// Cancels the spoke's PENDING directives with coalesce key `key`:
    /// directive `by` replaces them.
    fn coalesce(&mut self, spoke_id: Uuid, key: &str, by: Uuid, now_ms: i64) {
        let olds: Vec<Uuid> = self
            .spokes
            .get(&spoke_id)
            .and_then(|s| s.coalesce.get(key))
            .into_iter()
            .flatten()
            .copied()
            .filter(|old| {
                self.directives
                    .get(old)
                    .is_some_and(|d| d.state == DState::Pending)
            })
            .collect();
        for old in olds {
            let reason = format!("replaced by directive {by}");
            self.finish(old, DState::Cancelled, None, &reason, now_ms);
            self.log.changes.push(Change::Event {
                event: NewEvent::directive(
                    Kind::DirectiveCancelled,
                    spoke_id,
                    old,
                    json!({"reason": reason}),
                ),
                at: now_ms,
            });
        }
    }

    /// Adds a directive that is not final to the indexes.
    fn insert(&mut self, id: Uuid, entry: Entry) {
        let Some(spoke) = self.spokes.get_mut(&entry.spoke_id) else {
            return;
        };
        spoke.outstanding += 1;
        match entry.state {
            DState::Pending if entry.committed => {
                spoke.ready.insert((Reverse(entry.fixed.priority), id));
            }
            DState::Delivered | DState::InProgress => {
                spoke.delivered.insert(id);
            }
            _ => {}
        }
        if let Some(key) = &entry.fixed.coalesce_key {
            spoke.coalesce.entry(key.clone()).or_default().push(id);
        }
        if let Some(due) = entry.ack_due_at {
            self.ack_due.insert((due, id));
        }
        if let Some(at) = entry.fixed.expires_at {
            self.expiry.insert((at, id));
        }
        self.directives.insert(id, entry);
    }

    /// A directive read back from the store.
    pub(super) fn restore(&mut self, row: OutstandingRow) {
        let entry = Entry {
            spoke_id: row.spoke_id,
            fixed: Arc::new(row.fixed),
            payload: None,
            state: row.state,
            committed: true,
            attempts: row.attempts,
            updated_at: row.updated_at,
            ack_due_at: row.ack_due_at.filter(|_| row.state != DState::Pending),
            progress: row.progress,
            progress_message: row.progress_message,
            posting: None,
            retry_at: None,
        };
        self.insert(row.id, entry);
    }

    /// Moves a directive that is not final to a final `state`, logging the
    /// change (not its event: the caller's details differ). Frees its
    /// window slot. `None` when it is not outstanding.
    pub(super) fn finish(
        &mut self,
        id: Uuid,
        state: DState,
        result: Option<String>,
        error: &str,
        now_ms: i64,
    ) -> Option<Entry> {
        let entry = self.directives.remove(&id)?;
        *self.finals.entry(state.as_str()).or_default() += 1;
        if let Some(spoke) = self.spokes.get_mut(&entry.spoke_id) {
            spoke.outstanding = spoke.outstanding.saturating_sub(1);
            spoke.ready.remove(&(Reverse(entry.fixed.priority), id));
            if spoke.delivered.remove(&id) {
                // A slot in the window is free.
                spoke.wake();
            }
            if let Some(key) = &entry.fixed.coalesce_key
                && let Some(ids) = spoke.coalesce.get_mut(key)
            {
                ids.retain(|d| *d != id);
                if ids.is_empty() {
                    spoke.coalesce.remove(key);
                }
            }
        }
        if let Some(due) = entry.ack_due_at {
            self.ack_due.remove(&(due, id));
        }
        if let Some(at) = entry.retry_at {
            self.retry_due.remove(&(at, id));
        }
        if let Some(at) = entry.fixed.expires_at {
            self.expiry.remove(&(at, id));
        }
        if let Some(payload) = &entry.payload {
            self.payload_bytes = self.payload_bytes.saturating_sub(payload.len());
        }
        self.log
            .changes
            .push(Change::DirectiveUpdated(DirectiveUpdate {
                id,
                state,
                attempts: entry.attempts,
                updated_at: now_ms,
                ack_due_at: None,
                result,
                error: error.to_owned(),
                progress: entry.progress,
                progress_message: entry.progress_message.clone(),
            }));
        Some(entry)
    }

    /// Applies what a commit sets off.
    pub(super) fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::Publish(id) => {
                if let Some(entry) = self.directives.get_mut(&id) {
                    entry.committed = true;
                }
                self.make_ready(id);
            }
            Effect::Notice {
                spoke_id,
                directive_id,
                reason,
            } => {
                if let Some(spoke) = self.spokes.get_mut(&spoke_id) {
                    spoke.stream.notice(directive_id, reason);
                }
            }
        }
    }
}
