//! Background work driven by time: redelivery after missed ack deadlines,
//! exhaustion and expiry; the health sweeper; retention; WAL checkpoints. Due times live in
//! the ledger (and in the store it is rebuilt from, so a restarted hub
//! picks up where the last one stopped).

use std::time::Duration;

use crate::api::Hub;
use crate::store::Cutoffs;

/// Longest the delivery timer sleeps without looking at the ledger again.
const MAX_TIMER_SLEEP_MS: i64 = 60_000;

/// Redelivers, fails and expires directives as their due times pass.
pub async fn run_delivery_timer(hub: Hub) {
    let mut shutdown = hub.shutdown();
    let mut ticks = hub.clock().ticks();
    let plan = hub.timer_plan();
    loop {
        let now = hub.now_ms();
        plan.reset();
        let next = hub.ledger().run_due(now);
        let at = next
            .unwrap_or(i64::MAX)
            .min(now.saturating_add(MAX_TIMER_SLEEP_MS));
        plan.plan(at);
        let delay = Duration::from_millis(u64::try_from(at - hub.now_ms()).unwrap_or(0));
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = plan.kicked() => {}
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
        for change in hub.ledger().sweep_health(hub.now_ms(), interval_ms) {
            tracing::info!(spoke_id = %change.spoke_id, health = change.to, "spoke health changed");
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = ticks.changed() => {}
            () = shutdown.wait() => return,
        }
    }
}

/// How often the checkpointer looks at how much was committed.
const CHECKPOINT_LOOK: Duration = Duration::from_millis(200);
/// A checkpoint runs once this many changes were committed since the last
/// one (the WAL stays in the tens of megabytes at most)...
const CHECKPOINT_CHANGES: u64 = 20_000;
/// ...or this long after the last one, if anything was committed.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);

/// Copies committed pages from the WAL into the database file beside the
/// committer, so no commit waits for a checkpoint. A checkpoint syncs the
/// database file, which slows the I/O of the commits running meanwhile, so
/// it runs by volume or every few seconds, not after every commit.
pub async fn run_checkpointer(hub: Hub) {
    let mut shutdown = hub.shutdown();
    let mut last = tokio::time::Instant::now();
    loop {
        let changes = hub.store().changes_since_checkpoint();
        if changes >= CHECKPOINT_CHANGES || (changes > 0 && last.elapsed() >= CHECKPOINT_EVERY) {
            if let Err(e) = hub.store().checkpoint().await {
                tracing::warn!(error = %e, "WAL checkpoint failed");
            }
            last = tokio::time::Instant::now();
        }
        tokio::select! {
            () = tokio::time::sleep(CHECKPOINT_LOOK) => {}
            () = shutdown.wait() => return,
        }
    }
}

/// Deletes what is past its retention: events, metric points, final
/// directives, idempotency keys.
pub async fn run_retention(hub: Hub) {
    let mut shutdown = hub.shutdown();
    let mut ticks = hub.clock().ticks();
    let settings = hub.settings().clone();
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    loop {
        let now = hub.now_ms();
        let cutoffs = Cutoffs {
            events_before: now.saturating_sub(ms(settings.event_retention)),
            points_before: now.saturating_sub(ms(settings.metric_retention)),
            directives_before: now.saturating_sub(ms(settings.directive_retention)),
            keys_before: now.saturating_sub(ms(settings.idempotency_retention)),
        };
        match hub.ledger().purge(cutoffs).await {
            Ok(purged) if !purged.is_empty() => {
                tracing::info!(
                    events = purged.events,
                    points = purged.points,
                    directives = purged.directive_count(),
                    idempotency_keys = purged.keys,
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
