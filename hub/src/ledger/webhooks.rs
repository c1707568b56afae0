//! Webhook delivery in the ledger: what a spoke's webhook worker POSTs
//! next, and what its answers decide.
//!
//! A webhook attempt takes a PENDING directive out of the spoke's delivery
//! order into its window and counts the attempt (logged, so a crash loop
//! cannot retry for ever); it stays PENDING while the request is out. A 2xx
//! answer makes it DELIVERED with its ack deadline running; a failure keeps
//! its window slot until a retry time (exponential backoff with jitter)
//! puts it back in the delivery order, or makes it FAILED once its
//! attempts are used up. Expiry, cancels and acks act on it as on any
//! directive that is not final. A crash while a request is out leaves it
//! PENDING with the attempt counted: it goes out again after the restart.

use std::sync::Arc;

use serde_json::json;
use tokio::sync::Notify;
use uuid::Uuid;

use super::{Delivery, Ledger, State};
use crate::directives::{DirectiveRecord, State as DState};
use crate::events::{Kind, NewEvent};
use crate::spokes::{Webhook, WebhookAttempt};
use crate::store::Change;

/// What a spoke's webhook worker gets from [`Ledger::webhook_take`].
#[derive(Debug)]
pub enum WebhookTake {
    /// The spoke no longer has webhook delivery (or is revoked or gone):
    /// the worker stops.
    Stop,
    /// Nothing to send now.
    Idle,
    /// POST this directive (its payload may be missing: see
    /// [`Delivery::missing_payloads`]) to this webhook.
    Post(Delivery, Arc<Webhook>),
}

impl Ledger {
    /// Spokes with webhook delivery that are not revoked.
    pub fn webhook_spokes(&self) -> Vec<Uuid> {
        Self::active(&self.lock())
            .filter(|s| s.info.webhook.is_some())
            .map(|s| s.info.id)
            .collect()
    }

    /// Completes when the set of spokes with webhook delivery may have
    /// changed. Create it before reading [`Ledger::webhook_spokes`].
    pub fn webhooks_changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.shared.webhooks_changed.notified()
    }

    pub(super) fn webhooks_may_have_changed(&self) {
        self.shared.webhooks_changed.notify_waiters();
    }

    /// The wake-up of spoke `spoke_id`'s webhook worker, woken whenever
    /// the spoke may have something to send; `None` if there is no such
    /// spoke.
    pub fn webhook_attach(&self, spoke_id: Uuid) -> Option<Arc<Notify>> {
        let mut state = self.lock();
        let spoke = state.spokes.get_mut(&spoke_id)?;
        let hook = spoke
            .stream
            .hook
            .get_or_insert_with(|| Arc::new(Notify::new()))
            .clone();
        // Whatever is ready now is for this worker.
        hook.notify_one();
        Some(hook)
    }

    /// Takes the spoke's next PENDING directive for a webhook request, as
    /// far as its window has room: counts the attempt and logs it.
    pub fn webhook_take(&self, spoke_id: Uuid, now_ms: i64) -> WebhookTake {
        let mut guard = self.lock();
        let state = &mut *guard;
        if state.poisoned {
            return WebhookTake::Idle;
        }
        let Some(spoke) = state.spokes.get_mut(&spoke_id) else {
            return WebhookTake::Stop;
        };
        let Some(webhook) = spoke.info.webhook.clone() else {
            return WebhookTake::Stop;
        };
        if spoke.info.revoked_at.is_some() {
            return WebhookTake::Stop;
        }
        if spoke.delivered.len() >= spoke.info.max_in_flight as usize {
            return WebhookTake::Idle;
        }
        let mut next = None;
        for &(prio, id) in &spoke.ready {
            // Expired ones wait for the timer; exhausted ones never go out.
            let deliverable = state.directives.get(&id).is_some_and(|d| {
                d.attempts < d.fixed.max_attempts && d.fixed.expires_at.is_none_or(|at| at > now_ms)
            });
            if deliverable {
                next = Some((prio, id));
                break;
            }
        }
        let Some(key) = next else {
            return WebhookTake::Idle;
        };
        spoke.ready.remove(&key);
        spoke.delivered.insert(key.1);
        let name = spoke.info.name.clone();
        let id = key.1;
        let Some(entry) = state.directives.get_mut(&id) else {
            return WebhookTake::Idle;
        };
        entry.attempts += 1;
        entry.posting = Some(entry.attempts);
        entry.updated_at = now_ms;
        let mut delivery = Delivery::default();
        let mut record: DirectiveRecord = entry.record(id, &name);
        match &entry.payload {
            Some(payload) => record.payload = payload.to_string(),
            None => delivery.missing_payloads.push(id),
        }
        state
            .log
            .changes
            .push(Change::DirectiveUpdated(entry.update(id)));
        delivery.directives.push(record);
        drop(guard);
        self.shared.kick.notify_one();
        WebhookTake::Post(delivery, webhook)
    }

    /// A 2xx answer to attempt `attempt` of directive `id`: DELIVERED, ack
    /// deadline running (unless an ack moved it on meanwhile). The spoke
    /// counts as seen.
    pub fn webhook_delivered(&self, spoke_id: Uuid, id: Uuid, attempt: u32, now_ms: i64) {
        let mut state = self.lock();
        if state.writable().is_err() {
            return;
        }
        state.seen(spoke_id, now_ms);
        let Some(entry) = state.directives.get_mut(&id) else {
            return;
        };
        if entry.posting != Some(attempt) {
            return;
        }
        entry.posting = None;
        if entry.state != DState::Pending {
            return;
        }
        entry.state = DState::Delivered;
        entry.updated_at = now_ms;
        let due = now_ms.saturating_add(entry.fixed.ack_deadline_ms);
        entry.ack_due_at = Some(due);
        let update = entry.update(id);
        state.ack_due.insert((due, id));
        state.log.changes.push(Change::DirectiveUpdated(update));
        state.log.changes.push(Change::Event {
            event: NewEvent::directive(
                Kind::DirectiveDelivered,
                spoke_id,
                id,
                json!({"attempt": attempt, "via": "webhook"}),
            ),
            at: now_ms,
        });
        drop(state);
        self.timer_plan().schedule(due);
        self.shared.kick.notify_one();
    }

    /// A failed attempt `attempt` of directive `id` (`error` says how):
    /// retried after `backoff_ms` while attempts remain, else FAILED.
    pub fn webhook_failed(
        &self,
        spoke_id: Uuid,
        id: Uuid,
        attempt: u32,
        error: &str,
        backoff_ms: i64,
        now_ms: i64,
    ) {
        let mut state = self.lock();
        if state.writable().is_err() {
            return;
        }
        let Some(entry) = state.directives.get_mut(&id) else {
            return;
        };
        if entry.posting != Some(attempt) {
            return;
        }
        entry.posting = None;
        if entry.state != DState::Pending {
            // The spoke acked it while the request was out: it has it.
            return;
        }
        if entry.attempts >= entry.fixed.max_attempts {
            let attempts = entry.attempts;
            let error = format!("webhook delivery failed {attempts} times; last: {error}");
            state.exhausted(id, &error, now_ms);
        } else {
            let at = now_ms.saturating_add(backoff_ms);
            entry.retry_at = Some(at);
            let attempts = entry.attempts;
            state.retry_due.insert((at, id));
            state.log.changes.push(Change::Event {
                event: NewEvent::directive(
                    Kind::DirectiveRequeued,
                    spoke_id,
                    id,
                    json!({
                        "attempts": attempts,
                        "reason": format!("webhook: {error}"),
                        "retry_in_ms": backoff_ms,
                    }),
                ),
                at: now_ms,
            });
            self.timer_plan().schedule(at);
        }
        drop(state);
        self.shared.kick.notify_one();
    }

    /// Records the latest webhook request to a spoke (shown by GetSpoke
    /// and the admin page; kept in memory only).
    pub fn webhook_attempted(&self, spoke_id: Uuid, attempt: WebhookAttempt) {
        if let Some(spoke) = self.lock().spokes.get_mut(&spoke_id) {
            spoke.last_webhook = Some(attempt);
        }
    }
}

impl State {
    /// Failed webhook attempts whose retry time came: back in the delivery
    /// order (out of the window).
    pub(super) fn retry(&mut self, now_ms: i64) -> usize {
        let due: Vec<(i64, Uuid)> = self
            .retry_due
            .iter()
            .take_while(|(at, _)| *at <= now_ms)
            .take(super::due::PASS)
            .copied()
            .collect();
        for &(at, id) in &due {
            self.retry_due.remove(&(at, id));
            let Some(entry) = self.directives.get_mut(&id) else {
                continue;
            };
            entry.retry_at = None;
            let spoke_id = entry.spoke_id;
            if let Some(spoke) = self.spokes.get_mut(&spoke_id) {
                spoke.delivered.remove(&id);
            }
            self.make_ready(id);
        }
        due.len()
    }

    /// Puts the directives a spoke's webhook held (requests out, retries
    /// waiting) back in its delivery order: the spoke left webhook delivery.
    pub(super) fn release_webhook(&mut self, spoke_id: Uuid) {
        let Some(spoke) = self.spokes.get(&spoke_id) else {
            return;
        };
        let held: Vec<Uuid> = spoke
            .delivered
            .iter()
            .copied()
            .filter(|id| {
                self.directives
                    .get(id)
                    .is_some_and(|d| d.state == DState::Pending)
            })
            .collect();
        for id in held {
            if let Some(entry) = self.directives.get_mut(&id) {
                entry.posting = None;
                if let Some(at) = entry.retry_at.take() {
                    self.retry_due.remove(&(at, id));
                }
            }
            if let Some(spoke) = self.spokes.get_mut(&spoke_id) {
                spoke.delivered.remove(&id);
            }
            self.make_ready(id);
        }
    }
}
