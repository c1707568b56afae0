//! Delivery: which directives a spoke's stream or poll sends next, decided
//! in memory. A delivery is marked in the ledger and logged before it is
//! sent, and nobody waits for that mark to be committed; so the spoke's ack
//! (which can only follow the send) is always logged after its delivery. A
//! crash may lose the marks of the last batch: those directives go out
//! again after the restart, with the attempt number they had (see
//! ARCHITECTURE.md, "attempt").

use std::cmp::Reverse;
use std::collections::VecDeque;
use std::sync::{Arc, OnceLock, Weak};

use serde_json::json;
use tokio::sync::Notify;
use uuid::Uuid;

use super::{Ledger, State};
use crate::directives::{DirectiveRecord, State as DState};
use crate::error::{Error, Result};
use crate::events::{Kind, NewEvent};
use crate::store::Change;

/// Cancel notices kept per spoke for its next stream.
const MAX_NOTICES: usize = 1024;

/// Why a stream must end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// A newer stream of the same spoke took over.
    Superseded,
    /// The spoke's key stopped working (revoked or rotated).
    KeyInvalidated(&'static str),
}

/// One spoke's live stream, its long polls, and the cancel notices waiting
/// for a stream.
#[derive(Default)]
pub(super) struct Stream {
    current: Option<(u64, Arc<Signal>)>,
    polls: Weak<Notify>,
    notices: VecDeque<(Uuid, String)>,
    /// The webhook worker's wake-up, for a spoke with webhook delivery.
    pub(super) hook: Option<Arc<Notify>>,
}

/// What a stream task waits on.
#[derive(Default)]
struct Signal {
    wake: Notify,
    end: OnceLock<End>,
}

impl Stream {
    /// Wakes the live stream and the long polls, if any.
    pub(super) fn wake(&self) {
        if let Some((_, signal)) = &self.current {
            signal.wake.notify_one();
        }
        if let Some(polls) = self.polls.upgrade() {
            polls.notify_waiters();
        }
        if let Some(hook) = &self.hook {
            hook.notify_one();
        }
    }

    /// Ends the live stream, if any.
    pub(super) fn end(&mut self, end: End) {
        if let Some((_, signal)) = self.current.take() {
            let _ = signal.end.set(end);
            signal.wake.notify_one();
        }
    }

    pub(super) fn is_connected(&self) -> bool {
        self.current.is_some()
    }

    /// Queues a cancel notice for the current or next stream. A spoke that
    /// never holds a stream (it polls, or takes webhooks) keeps only the
    /// newest [`MAX_NOTICES`]: a notice is advice (an ack of a cancelled
    /// directive is refused anyway), and memory must stay bounded.
    pub(super) fn notice(&mut self, directive_id: Uuid, reason: String) {
        if self.notices.len() >= MAX_NOTICES {
            self.notices.pop_front();
        }
        self.notices.push_back((directive_id, reason));
        self.wake();
    }
}

/// A stream's registration; dropping it frees the spoke's slot (if still
/// its own).
pub struct Subscription {
    ledger: Ledger,
    spoke_id: Uuid,
    id: u64,
    signal: Arc<Signal>,
}

impl Subscription {
    /// Completes when the spoke may have something to receive (or the
    /// stream must end). A wake-up before the wait is kept.
    pub async fn woken(&self) {
        self.signal.wake.notified().await;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut state = self.ledger.lock();
        if let Some(spoke) = state.spokes.get_mut(&self.spoke_id)
            && spoke
                .stream
                .current
                .as_ref()
                .is_some_and(|(id, _)| *id == self.id)
        {
            spoke.stream.current = None;
        }
    }
}

/// What a stream sends next.
#[derive(Debug)]
pub enum Step {
    /// End the stream.
    End(End),
    /// Send these notices, then these directives (which are DELIVERED now).
    Work(Delivery),
}

/// Directives taken for delivery, and notices to send first.
#[derive(Debug, Default)]
pub struct Delivery {
    /// Cancel notices: directive and reason.
    pub notices: Vec<(Uuid, String)>,
    /// The directives, in delivery order, with their new attempt numbers.
    pub directives: Vec<DirectiveRecord>,
    /// Directives whose payload the ledger does not hold: read them from
    /// the store (it has them: only committed directives are delivered).
    pub missing_payloads: Vec<Uuid>,
}

impl Delivery {
    /// Whether there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.notices.is_empty() && self.directives.is_empty()
    }
}

impl Ledger {
    /// Registers the spoke's new live stream, ending the older one; the
    /// spoke counts as seen.
    pub fn subscribe(&self, spoke_id: Uuid, now_ms: i64) -> Result<Subscription> {
        let mut state = self.lock();
        state.next_stream += 1;
        let id = state.next_stream;
        let spoke = state
            .spokes
            .get_mut(&spoke_id)
            .ok_or_else(|| Error::Unauthenticated("unknown spoke key"))?;
        spoke.stream.end(End::Superseded);
        let signal = Arc::new(Signal::default());
        spoke.stream.current = Some((id, signal.clone()));
        state.seen(spoke_id, now_ms);
        drop(state);
        Ok(Subscription {
            ledger: self.clone(),
            spoke_id,
            id,
            signal,
        })
    }

    /// What a new stream starts with: the directives delivered before and
    /// not acked yet (again, with the next attempt, while attempts remain),
    /// then PENDING ones as far as the window allows; notices first.
    pub fn backlog(&self, sub: &Subscription, now_ms: i64) -> Step {
        self.step(sub, u32::MAX, true, now_ms)
    }

    /// What the stream sends next: notices, then up to `max` PENDING
    /// directives as far as the window allows.
    pub fn next(&self, sub: &Subscription, max: u32, now_ms: i64) -> Step {
        self.step(sub, max, false, now_ms)
    }

    fn step(&self, sub: &Subscription, max: u32, backlog: bool, now_ms: i64) -> Step {
        if let Some(end) = sub.signal.end.get() {
            return Step::End(end.clone());
        }
        let mut state = self.lock();
        let mut delivery = Delivery::default();
        if let Some(spoke) = state.spokes.get_mut(&sub.spoke_id) {
            delivery.notices = spoke.stream.notices.drain(..).collect();
        }
        // A spoke with a webhook gets its directives there; its stream
        // carries notices only.
        let webhook = state
            .spokes
            .get(&sub.spoke_id)
            .is_some_and(|s| s.info.webhook.is_some());
        if backlog && !webhook {
            state.redeliver(sub.spoke_id, now_ms, &mut delivery);
        }
        if !webhook {
            state.take_ready(sub.spoke_id, max, now_ms, &mut delivery);
        }
        drop(state);
        if backlog {
            sort_for_delivery(&mut delivery.directives);
        }
        self.schedule_acks(&delivery);
        Step::Work(delivery)
    }

    /// Puts back cancel notices a stream could not send (it ended first),
    /// ahead of newer ones, for the spoke's next stream.
    pub fn unsent_notices(&self, spoke_id: Uuid, notices: Vec<(Uuid, String)>) {
        if notices.is_empty() {
            return;
        }
        let mut state = self.lock();
        if let Some(spoke) = state.spokes.get_mut(&spoke_id) {
            for notice in notices.into_iter().rev() {
                spoke.stream.notices.push_front(notice);
            }
            spoke.stream.wake();
        }
    }

    /// Takes up to `max` PENDING directives for a poll (no notices: a poll
    /// has no stream to carry them).
    pub fn poll(&self, spoke_id: Uuid, max: u32, now_ms: i64) -> Delivery {
        let mut delivery = Delivery::default();
        let mut state = self.lock();
        if state
            .spokes
            .get(&spoke_id)
            .is_some_and(|s| s.info.webhook.is_none())
        {
            state.take_ready(spoke_id, max, now_ms, &mut delivery);
        }
        drop(state);
        self.schedule_acks(&delivery);
        delivery
    }

    /// The wake-up long polls of `spoke_id` wait on (shared by concurrent
    /// polls; it lives as long as one of them holds it).
    pub fn poll_waker(&self, spoke_id: Uuid) -> Arc<Notify> {
        let mut state = self.lock();
        let Some(spoke) = state.spokes.get_mut(&spoke_id) else {
            return Arc::new(Notify::new());
        };
        if let Some(notify) = spoke.stream.polls.upgrade() {
            return notify;
        }
        let notify = Arc::new(Notify::new());
        spoke.stream.polls = Arc::downgrade(&notify);
        notify
    }

    /// Whether the spoke holds a live stream on this hub.
    pub fn is_connected(&self, spoke_id: Uuid) -> bool {
        self.lock()
            .spokes
            .get(&spoke_id)
            .is_some_and(|s| s.stream.is_connected())
    }

    /// Number of live streams.
    pub fn connected(&self) -> usize {
        self.lock()
            .spokes
            .values()
            .filter(|s| s.stream.is_connected())
            .count()
    }

    fn schedule_acks(&self, delivery: &Delivery) {
        if let Some(due) = delivery
            .directives
            .iter()
            .filter_map(|d| d.ack_due_at)
            .min()
        {
            self.timer_plan().schedule(due);
        }
    }
}

/// Delivery order: higher priority first, then oldest (UUIDv7 ids sort by
/// creation time).
fn sort_for_delivery(directives: &mut [DirectiveRecord]) {
    directives.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.id.cmp(&b.id)));
}

impl State {
    /// Sends again every directive the spoke has in flight, while attempts
    /// remain (a new stream: the old one may have lost them).
    fn redeliver(&mut self, spoke_id: Uuid, now_ms: i64, out: &mut Delivery) {
        let Some(spoke) = self.spokes.get(&spoke_id) else {
            return;
        };
        let ids: Vec<Uuid> = spoke.delivered.iter().copied().collect();
        for id in ids {
            let again = self
                .directives
                .get(&id)
                .is_some_and(|d| d.attempts < d.fixed.max_attempts);
            if again {
                self.deliver(id, now_ms, out);
            }
        }
    }

    /// Takes up to `max` committed PENDING directives of the spoke, in
    /// delivery order, as far as its window has room.
    fn take_ready(&mut self, spoke_id: Uuid, max: u32, now_ms: i64, out: &mut Delivery) {
        if self.poisoned {
            return;
        }
        let Some(spoke) = self.spokes.get_mut(&spoke_id) else {
            return;
        };
        let window = spoke.info.max_in_flight as usize;
        let room = window
            .saturating_sub(spoke.delivered.len())
            .min(max as usize);
        let mut taken = Vec::with_capacity(room.min(spoke.ready.len()));
        for &(prio, id) in &spoke.ready {
            if taken.len() >= room {
                break;
            }
            // Expired ones wait for the timer; exhausted ones never go out.
            let deliverable = self.directives.get(&id).is_some_and(|d| {
                d.attempts < d.fixed.max_attempts && d.fixed.expires_at.is_none_or(|at| at > now_ms)
            });
            if deliverable {
                taken.push((prio, id));
            }
        }
        for key in &taken {
            spoke.ready.remove(key);
        }
        for (_, id) in taken {
            self.deliver(id, now_ms, out);
        }
    }

    /// Marks one directive delivered (one more attempt, a new ack deadline)
    /// and logs it.
    fn deliver(&mut self, id: Uuid, now_ms: i64, out: &mut Delivery) {
        let Some(entry) = self.directives.get_mut(&id) else {
            return;
        };
        let Some(spoke) = self.spokes.get_mut(&entry.spoke_id) else {
            return;
        };
        if entry.state == DState::Pending {
            entry.state = DState::Delivered;
        }
        // Off the webhook path, if it was on it (the spoke changed modes).
        entry.posting = None;
        if let Some(at) = entry.retry_at.take() {
            self.retry_due.remove(&(at, id));
        }
        spoke.delivered.insert(id);
        entry.attempts += 1;
        entry.updated_at = now_ms;
        if let Some(old) = entry.ack_due_at {
            self.ack_due.remove(&(old, id));
        }
        let due = now_ms.saturating_add(entry.fixed.ack_deadline_ms);
        entry.ack_due_at = Some(due);
        self.ack_due.insert((due, id));
        let mut record = entry.record(id, &spoke.info.name);
        match &entry.payload {
            Some(payload) => record.payload = payload.to_string(),
            None => out.missing_payloads.push(id),
        }
        self.log
            .changes
            .push(Change::DirectiveUpdated(entry.update(id)));
        self.log.changes.push(Change::Event {
            event: NewEvent::directive(
                Kind::DirectiveDelivered,
                entry.spoke_id,
                id,
                json!({"attempt": entry.attempts}),
            ),
            at: now_ms,
        });
        out.directives.push(record);
    }

    /// Puts a PENDING directive back in its spoke's delivery order and
    /// wakes the spoke.
    pub(super) fn make_ready(&mut self, id: Uuid) {
        let Some(entry) = self.directives.get(&id) else {
            return;
        };
        if entry.state != DState::Pending || !entry.committed {
            return;
        }
        if let Some(spoke) = self.spokes.get_mut(&entry.spoke_id) {
            spoke.ready.insert((Reverse(entry.fixed.priority), id));
            spoke.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_for_a_spoke_without_a_stream_stay_bounded_keeping_the_newest() {
        let mut stream = Stream::default();
        let ids: Vec<Uuid> = (0..MAX_NOTICES + 10).map(|_| Uuid::now_v7()).collect();
        for id in &ids {
            stream.notice(*id, "cancelled".into());
        }
        assert_eq!(stream.notices.len(), MAX_NOTICES);
        assert_eq!(stream.notices.front().map(|n| n.0), Some(ids[10]));
        assert_eq!(stream.notices.back().map(|n| n.0), ids.last().copied());
    }
}
