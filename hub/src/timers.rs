//! Background work driven by time: redelivery after missed ack deadlines,
//! exhaustion and expiry; the health sweeper; retention. Due times live in
//! the store, so a restarted hub picks up where the last one stopped.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::api::Hub;
use crate::dispatch::Control;

/// Longest the delivery timer sleeps without looking at the store again.
const MAX_TIMER_SLEEP_MS: i64 = 60_000;
/// Pause after a failed pass (e.g. the database is briefly unavailable).
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

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
}

/// Redelivers, fails and expires directives as their due times pass.
pub async fn run_delivery_timer(hub: Hub) {
    let mut shutdown = hub.shutdown();
    let mut ticks = hub.clock().ticks();
    let plan = hub.timer_plan();
    loop {
        let now = hub.now_ms();
        // Until the next plan is known, any due time scheduled counts as
        // earlier and leaves a kick behind, so nothing slips between this
        // pass and the sleep.
        plan.planned_ms.store(i64::MAX, Ordering::SeqCst);
        let delay = match hub.store().run_timers(now).await {
            Ok(sweep) => {
                for (spoke, directive_id) in sweep.expired_in_flight {
                    hub.dispatcher().send(
                        spoke,
                        Control::Cancelled {
                            directive_id,
                            reason: "expired before it was completed".to_owned(),
                        },
                    );
                }
                for spoke in sweep.wake {
                    hub.dispatcher().wake(spoke);
                }
                if sweep.more {
                    continue;
                }
                match hub.store().next_due().await {
                    Ok(next) => {
                        let at = next
                            .unwrap_or(i64::MAX)
                            .min(now.saturating_add(MAX_TIMER_SLEEP_MS));
                        plan.planned_ms.fetch_min(at, Ordering::SeqCst);
                        Duration::from_millis(u64::try_from(at - hub.now_ms()).unwrap_or(0))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the next due time failed");
                        RETRY_AFTER_ERROR
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "delivery timer pass failed");
                RETRY_AFTER_ERROR
            }
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = plan.kick.notified() => {}
            () = ticks.changed() => {}
            () = shutdown.wait() => return,
        }
    }
}

/// Moves spokes to STALE and OFFLINE as signs of life stop, once per
/// heartbeat interval.
pub async fn run_health_sweeper(hub: Hub) {
    let mut shutdown = hub.shutdown();
    let mut ticks = hub.clock().ticks();
    let interval = hub.settings().heartbeat_interval;
    let interval_ms = i64::try_from(interval.as_millis()).unwrap_or(i64::MAX);
    loop {
        let dispatcher = hub.dispatcher().clone();
        match hub
            .store()
            .sweep_health(hub.now_ms(), interval_ms, |id| dispatcher.is_connected(id))
            .await
        {
            Ok(changes) => {
                for change in changes {
                    tracing::info!(spoke_id = %change.spoke_id, health = change.to, "spoke health changed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "health sweep failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = ticks.changed() => {}
            () = shutdown.wait() => return,
        }
    }
}

/// Deletes events and metric points past their retention.
pub async fn run_retention(hub: Hub) {
    let mut shutdown = hub.shutdown();
    let mut ticks = hub.clock().ticks();
    let settings = hub.settings().clone();
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    loop {
        let now = hub.now_ms();
        let events_before = now.saturating_sub(ms(settings.event_retention));
        let points_before = now.saturating_sub(ms(settings.metric_retention));
        match hub.store().purge(events_before, points_before).await {
            Ok(purged) if purged.events + purged.points > 0 => {
                tracing::info!(
                    events = purged.events,
                    points = purged.points,
                    "retention purge"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention purge failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(settings.retention_interval) => {}
            () = ticks.changed() => {}
            () = shutdown.wait() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_an_earlier_due_time_kicks_the_timer() {
        let plan = TimerPlan::default();
        plan.planned_ms.store(1_000, Ordering::SeqCst);
        plan.schedule(5_000);
        let kicked = tokio::time::timeout(Duration::from_millis(10), plan.kick.notified()).await;
        assert!(kicked.is_err(), "a later due time does not kick");
        plan.schedule(500);
        plan.kick.notified().await;
        assert_eq!(plan.planned_ms.load(Ordering::SeqCst), 500);
    }
}
