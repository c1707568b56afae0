//! Due times: ack deadlines (redelivery, exhaustion) and expiry, kept in
//! ordered sets in memory, so the delivery timer looks only at what is due
//! and never at the store.

use std::sync::atomic::{AtomicI64, Ordering};

use serde_json::json;
use tokio::sync::Notify;
use uuid::Uuid;

use super::{Effect, Ledger, State};
use crate::directives::State as DState;
use crate::events::{Kind, NewEvent};
use crate::store::Change;

/// Directives handled per pass under the lock, so a burst of due times does
/// not hold it for long.
pub(super) const PASS: usize = 500;

/// When the delivery timer plans to wake next, so that a new, earlier due
/// time can wake it sooner.
#[derive(Debug)]
pub struct TimerPlan {
    planned_ms: AtomicI64,
    kick: Notify,
}

impl Default for TimerPlan {
    fn default() -> Self {
        Self {
            planned_ms: AtomicI64::new(i64::MAX),
            kick: Notify::new(),
        }
    }
}

impl TimerPlan {
    /// Makes sure the timer runs no later than `due_ms`.
    pub fn schedule(&self, due_ms: i64) {
        if due_ms < self.planned_ms.fetch_min(due_ms, Ordering::SeqCst) {
            self.kick.notify_one();
        }
    }

    /// Forgets the plan: until the next [`TimerPlan::plan`], any due time
    /// scheduled counts as earlier and leaves a kick behind, so nothing
    /// slips between a pass and the sleep after it.
    pub fn reset(&self) {
        self.planned_ms.store(i64::MAX, Ordering::SeqCst);
    }

    /// Records that the timer will wake at `at_ms` (or earlier).
    pub fn plan(&self, at_ms: i64) {
        self.planned_ms.fetch_min(at_ms, Ordering::SeqCst);
    }

    /// Completes when an earlier due time was scheduled.
    pub async fn kicked(&self) {
        self.kick.notified().await;
    }
}

impl Ledger {
    /// Acts on everything due at `now_ms`: expired directives become
    /// EXPIRED (a spoke that had one is told); directives whose ack deadline
    /// passed go back to PENDING for another delivery, or become FAILED when
    /// their attempts are used up. Returns the next due time.
    pub fn run_due(&self, now_ms: i64) -> Option<i64> {
        loop {
            let mut state = self.lock();
            let done = state.expire(now_ms) + state.overdue(now_ms) + state.retry(now_ms);
            let next = state.next_due();
            drop(state);
            if done > 0 {
                // Expiry notices go out only after their commit: now.
                self.shared.kick.notify_one();
            }
            if done < PASS {
                return next;
            }
        }
    }
}

impl State {
    /// Makes a directive whose attempts are used up FAILED with `error`,
    /// logging its event.
    pub(super) fn exhausted(&mut self, id: Uuid, error: &str, now_ms: i64) {
        if let Some(entry) = self.finish(id, DState::Failed, None, error, now_ms) {
            self.log.changes.push(Change::Event {
                event: NewEvent::directive(
                    Kind::DirectiveFailed,
                    entry.spoke_id,
                    id,
                    json!({"error": error, "attempts": entry.attempts}),
                ),
                at: now_ms,
            });
        }
    }

    fn next_due(&self) -> Option<i64> {
        [&self.ack_due, &self.expiry, &self.retry_due]
            .into_iter()
            .filter_map(|due| due.first().map(|(at, _)| *at))
            .min()
    }

    fn expire(&mut self, now_ms: i64) -> usize {
        let due: Vec<Uuid> = self
            .expiry
            .iter()
            .take_while(|(at, _)| *at <= now_ms)
            .take(PASS)
            .map(|(_, id)| *id)
            .collect();
        for &id in &due {
            let reason = "expired before it was completed";
            let Some(entry) = self.finish(id, DState::Expired, None, reason, now_ms) else {
                continue;
            };
            self.log.changes.push(Change::Event {
                event: NewEvent::directive(
                    Kind::DirectiveExpired,
                    entry.spoke_id,
                    id,
                    json!({"was": entry.state.as_str()}),
                ),
                at: now_ms,
            });
            if entry.state != DState::Pending {
                self.log.effects.push(Effect::Notice {
                    spoke_id: entry.spoke_id,
                    directive_id: id,
                    reason: reason.to_owned(),
                });
            }
        }
        due.len()
    }

    fn overdue(&mut self, now_ms: i64) -> usize {
        let due: Vec<(i64, Uuid)> = self
            .ack_due
            .iter()
            .take_while(|(at, _)| *at <= now_ms)
            .take(PASS)
            .copied()
            .collect();
        for &(at, id) in &due {
            self.ack_due.remove(&(at, id));
            let Some(entry) = self.directives.get_mut(&id) else {
                continue;
            };
            entry.ack_due_at = None;
            if entry.attempts >= entry.fixed.max_attempts {
                self.exhausted(id, "delivery attempts exhausted", now_ms);
            } else {
                entry.state = DState::Pending;
                entry.updated_at = now_ms;
                let update = entry.update(id);
                let (spoke_id, attempts) = (entry.spoke_id, entry.attempts);
                if let Some(spoke) = self.spokes.get_mut(&spoke_id) {
                    spoke.delivered.remove(&id);
                }
                self.log.changes.push(Change::DirectiveUpdated(update));
                self.log.changes.push(Change::Event {
                    event: NewEvent::directive(
                        Kind::DirectiveRequeued,
                        spoke_id,
                        id,
                        json!({"attempts": attempts, "reason": "ack deadline passed"}),
                    ),
                    at: now_ms,
                });
                self.make_ready(id);
            }
        }
        due.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::TimerPlan;

    #[tokio::test]
    async fn only_an_earlier_due_time_kicks_the_timer() {
        let plan = TimerPlan::default();
        plan.plan(1_000);
        plan.schedule(5_000);
        let kicked = tokio::time::timeout(Duration::from_millis(10), plan.kicked()).await;
        assert!(kicked.is_err(), "a later due time does not kick");
        plan.schedule(500);
        plan.kicked().await;
    }
}
