//! Directives received from the hub: deduplication by id (a claim in this
//! process, then the local record), bounded concurrency, running handlers
//! (a panic is caught and acked FAILED), renewing ack deadlines from
//! receipt on (so a directive waiting for a free handler loses no attempt),
//! recording outcomes (with the points the run recorded) before acking,
//! acking a recorded outcome again on every redelivery, cancellation, and
//! the drain at shutdown.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use hub_proto::v1 as proto;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::error::{Error, Result};
use crate::event::{self, Event, Observer};
use crate::handler::{BoxHandler, Cancel, Context, Outcome};
use crate::link::Link;
use crate::metrics::{Buffer, Point};
use crate::status::Tracker;
use crate::store::{LocalStatus, Store};
use crate::wire::{duration, json_of_struct, now_ms};

/// The hub's default ack deadline, assumed when a delivery carries none.
const DEFAULT_ACK_DEADLINE: Duration = Duration::from_secs(30);
/// The shortest renewal period, whatever the deadline.
const MIN_RENEWAL: Duration = Duration::from_millis(250);
/// Recorded outcomes resent at once after a reconnect.
const RESENDS_AT_ONCE: usize = 64;
/// The progress message of a directive waiting for a free handler slot,
/// which operators see while its deadline is renewed.
const QUEUED: &str = "queued: waiting for a free handler slot";

/// Testing only: awaited with a directive's id after its handler returned
/// and before its outcome is recorded.
pub(crate) type Pause = Arc<dyn Fn(String) -> BoxFuture<'static, ()> + Send + Sync>;

/// This process's hold on one directive id, from before its record is read
/// until its outcome is recorded: while it exists, no other delivery of the
/// id starts anything. Dropping it (the run ended, failed, or was aborted)
/// lets the id go.
struct Claim {
    directives: Directives,
    id: String,
    /// The run's cancellation signal, also what [`Directives::cancel`] fires.
    cancel: Cancel,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.directives.active().remove(&self.id);
    }
}

/// Runs directives; cheap to clone.
#[derive(Clone)]
pub(crate) struct Directives {
    inner: Arc<Inner>,
}

struct Inner {
    handlers: BTreeMap<String, BoxHandler>,
    store: Store,
    link: Link,
    buffer: Buffer,
    status: Tracker,
    slots: Arc<Semaphore>,
    /// Directives this process claimed (see [`Claim`]), by id.
    active: Mutex<HashMap<String, Cancel>>,
    tasks: Mutex<JoinSet<()>>,
    /// Fired when shutdown gives up waiting: cancels every run.
    stop_all: CancellationToken,
    /// Told of each outcome recorded and each redelivery answered.
    observer: Option<Observer>,
    /// Testing only (see [`Pause`]).
    pause: OnceLock<Pause>,
}

impl Directives {
    pub fn new(
        handlers: BTreeMap<String, BoxHandler>,
        store: Store,
        link: Link,
        buffer: Buffer,
        status: Tracker,
        concurrency: usize,
        observer: Option<Observer>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                handlers,
                store,
                link,
                buffer,
                status,
                slots: Arc::new(Semaphore::new(concurrency)),
                active: Mutex::default(),
                tasks: Mutex::default(),
                stop_all: CancellationToken::new(),
                observer,
                pause: OnceLock::new(),
            }),
        }
    }

    /// Testing only: pauses every run between its handler's return and the
    /// recording of its outcome.
    pub fn pause_before_outcome(&self, pause: Pause) {
        let _ = self.inner.pause.set(pause);
    }

    fn observe(&self, event: Event) {
        event::tell(self.inner.observer.as_ref(), event);
    }

    fn active(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cancel>> {
        self.inner
            .active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn spawn(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while tasks.try_join_next().is_some() {}
        tasks.spawn(work);
    }

    /// Takes `id` for this process, unless a claim on it exists: the one
    /// gate every delivery passes before it reads the local record.
    fn claim(&self, id: &str) -> Option<Claim> {
        let mut active = self.active();
        if active.contains_key(id) {
            return None;
        }
        let cancel = Cancel::child_of(&self.inner.stop_all);
        active.insert(id.to_owned(), cancel.clone());
        Some(Claim {
            directives: self.clone(),
            id: id.to_owned(),
            cancel,
        })
    }

    /// Handles one delivery from the stream. Only a local store failure is
    /// an error; the directive then stays unacked and the hub redelivers it.
    ///
    /// One life per directive, received → running → outcome: the delivery
    /// first claims the id (see [`Claim`]), and only then reads the record.
    /// A claim is held from before the record is read until after the
    /// outcome is recorded, so a redelivery meanwhile is answered "still
    /// running", and one after it finds the outcome and acks it again; a
    /// second run can start neither while one exists nor after an outcome.
    pub async fn receive(&self, d: proto::Directive) -> Result<()> {
        let Some(claim) = self.claim(&d.id) else {
            // Running here: the hub missed our news; tell it.
            tracing::debug!(directive_id = %d.id, attempt = d.attempt, "redelivered while running");
            let this = self.clone();
            self.spawn(async move { this.still_running(d.id).await });
            return Ok(());
        };
        let store = &self.inner.store;
        let payload = d
            .payload
            .as_ref()
            .map_or_else(|| serde_json::json!({}), json_of_struct);
        if let Some(rec) = store.directive(&d.id).await? {
            match (rec.status, rec.outcome) {
                (LocalStatus::Received | LocalStatus::Running, _) => {
                    // No run holds a claim, and none recorded an outcome:
                    // an earlier process died mid-run (or this one could
                    // not record it). Run it again.
                    tracing::info!(directive_id = %d.id, attempt = d.attempt, "running again: an earlier run recorded no outcome");
                }
                (_, Some(outcome)) => {
                    // FINISHED, ACKED, or CLOSED by a refused ack: a hub
                    // that delivers it again will take the outcome now.
                    drop(claim);
                    tracing::info!(directive_id = %d.id, attempt = d.attempt, "already finished: acking the recorded outcome again");
                    self.observe(Event::Redelivered {
                        id: d.id.clone(),
                        attempt: d.attempt,
                    });
                    let this = self.clone();
                    self.spawn(async move { this.ack(&d.id, &outcome).await });
                    return Ok(());
                }
                (_, None) => {
                    tracing::debug!(directive_id = %d.id, "delivery of a closed directive ignored");
                    return Ok(());
                }
            }
        }
        // Recorded before anything runs: a crash from here on reruns it.
        if !store
            .record_received(&d.id, &d.r#type, &payload, d.attempt, now_ms())
            .await?
        {
            // Only a run claims an open record, and none was open.
            tracing::warn!(directive_id = %d.id, "the record moved on meanwhile; not running");
            return Ok(());
        }
        self.inner.status.update(|s| s.pending_directives += 1);
        let this = self.clone();
        self.spawn(async move {
            this.run(d, payload, claim).await;
        });
        Ok(())
    }

    /// The hub cancelled `id`: fire its signal. A run not started yet will
    /// not start.
    pub fn cancel(&self, id: &str, reason: &str) {
        let reason = if reason.is_empty() {
            "cancelled by the hub".to_owned()
        } else {
            format!("cancelled by the hub: {reason}")
        };
        match self.active().get(id) {
            Some(cancel) => {
                tracing::info!(directive_id = %id, %reason, "cancelling a running directive");
                cancel.fire(reason);
            }
            None => {
                let (store, id) = (self.inner.store.clone(), id.to_owned());
                self.spawn(async move {
                    let _ = store.mark_closed(&id, &reason, now_ms()).await;
                });
            }
        }
    }

    /// Runs a claimed directive and records how it ended; the claim is let
    /// go only once that is recorded (or nothing will be).
    async fn run(&self, d: proto::Directive, payload: serde_json::Value, claim: Claim) {
        let cancel = claim.cancel.clone();
        let ran = self.outcome_of(&d, payload, &cancel).await;
        if ran.is_some()
            && let Some(pause) = self.inner.pause.get()
        {
            pause(d.id.clone()).await;
        }
        let buffer = &self.inner.buffer;
        let store = &self.inner.store;
        if self.inner.stop_all.is_cancelled() {
            // Shutdown interrupted it: it stays unfinished and runs again,
            // recording its points again.
            buffer.dropped(ran.map_or(0, |(_, points)| points.len() as u64));
            return;
        }
        let (written, points, outcome) = match (cancel.reason(), ran) {
            // The hub refuses acks of a cancelled directive; the work done
            // (if it started) is kept.
            (Some(reason), ran) => {
                let points = ran.map(|(_, points)| points).unwrap_or_default();
                let written = store.close_run(&d.id, &reason, &points, now_ms()).await;
                (written, points, None)
            }
            (None, Some((outcome, points))) => {
                let written = store
                    .record_outcome(&d.id, &outcome, &points, now_ms())
                    .await;
                (written, points, Some(outcome))
            }
            // It did not run (its start could not be recorded): it stays
            // unfinished and runs again.
            (None, None) => return,
        };
        match written {
            Ok(true) if points.is_empty() => {}
            Ok(true) => buffer.written(),
            Ok(false) => {
                tracing::warn!(directive_id = %d.id, "the run's record moved on; its outcome is not kept");
                buffer.dropped(points.len() as u64);
                return;
            }
            Err(e) => {
                tracing::error!(directive_id = %d.id, error = %e, "could not record the outcome; not acking");
                buffer.dropped(points.len() as u64);
                self.inner.status.error(&e);
                return;
            }
        }
        drop(claim);
        let Some(outcome) = outcome else { return };
        self.observe(Event::Finished {
            id: d.id.clone(),
            directive_type: d.r#type.clone(),
            outcome: outcome.name(),
        });
        self.ack(&d.id, &outcome).await;
    }

    /// Runs the handler once a slot is free: its outcome and the points it
    /// recorded; `None` if it did not run (cancelled first, or its record
    /// could not be marked running).
    async fn outcome_of(
        &self,
        d: &proto::Directive,
        payload: serde_json::Value,
        cancel: &Cancel,
    ) -> Option<(Outcome, Vec<Point>)> {
        let status = &self.inner.status;
        let Some(handler) = self.inner.handlers.get(&d.r#type).cloned() else {
            status.update(|s| s.pending_directives -= 1);
            let outcome =
                Outcome::rejected(format!("no handler for directive type {:?}", d.r#type));
            return Some((outcome, Vec::new()));
        };
        // Renewed from now on, waiting for a slot included: the window the
        // hub was asked for may exceed the concurrency, and waiting must not
        // cost an attempt.
        let running = OnceLock::new();
        let lease = keep_leased(&self.inner.link, &d.id, &running, d.ack_deadline.as_ref());
        tokio::pin!(lease);
        let permit = tokio::select! {
            biased;
            () = cancel.token.cancelled() => None,
            permit = self.inner.slots.clone().acquire_owned() => permit.ok(),
            never = &mut lease => match never {},
        };
        status.update(|s| s.pending_directives -= 1);
        let _permit = permit?;
        match self.inner.store.mark_running(&d.id, now_ms()).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(directive_id = %d.id, "the record is no longer RECEIVED; not running");
                return None;
            }
            Err(e) => {
                tracing::error!(directive_id = %d.id, error = %e, "could not record the start; not running");
                status.error(&e);
                return None;
            }
        }
        status.update(|s| s.in_flight_directives += 1);
        let ctx = Context::new(
            d.id.clone(),
            d.r#type.clone(),
            d.attempt,
            cancel.clone(),
            self.inner.link.clone(),
            self.inner.buffer.clone(),
        );
        let _ = running.set(ctx.clone());
        // Both the call and the future it returns may panic.
        let run = std::panic::catch_unwind(AssertUnwindSafe(|| handler(payload, ctx.clone())));
        let outcome = match run {
            Ok(fut) => tokio::select! {
                outcome = AssertUnwindSafe(fut).catch_unwind() => outcome,
                never = &mut lease => match never {},
            },
            Err(panic) => Err(panic),
        };
        status.update(|s| s.in_flight_directives -= 1);
        let outcome = outcome.unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-text panic payload".to_owned());
            tracing::error!(directive_id = %d.id, panic = %what, "handler panicked");
            Outcome::failed(format!("handler panicked: {what}"))
        });
        Some((outcome, ctx.take_points()))
    }

    /// Sends a final ack; on success the record is settled (ACKED). On a
    /// refusal (FAILED_PRECONDITION, NOT_FOUND) it is CLOSED but keeps its
    /// outcome: it is not resent on reconnect, yet a hub that delivers the
    /// directive again (an older hub refuses a late ack while it waits to
    /// deliver it again) gets it acked again then, never run again. On any
    /// other failure it stays FINISHED and is sent again on reconnect.
    async fn ack(&self, id: &str, outcome: &Outcome) {
        let store = &self.inner.store;
        let settled = match self.inner.link.ack(outcome.ack(id)).await {
            Ok(_) => store.mark_acked(id, now_ms()).await,
            Err(Error::Status(s))
                if matches!(s.code(), Code::FailedPrecondition | Code::NotFound) =>
            {
                tracing::info!(directive_id = %id, reason = %s.message(), "hub takes no ack for this directive now; a redelivery is acked again");
                store.mark_closed(id, s.message(), now_ms()).await
            }
            Err(e) => {
                tracing::debug!(directive_id = %id, error = %e, "ack not delivered; it is sent again on reconnect");
                self.inner.status.error(&e);
                Ok(())
            }
        };
        if let Err(e) = settled {
            self.inner.status.error(&e);
        }
    }

    /// Tells the hub a directive delivered again is still being worked on.
    async fn still_running(&self, id: String) {
        let ack = proto::AckRequest {
            directive_id: id,
            outcome: proto::AckOutcome::InProgress.into(),
            ..Default::default()
        };
        let _ = self.inner.link.ack(ack).await;
    }

    /// Sends again every recorded outcome the hub has not confirmed (after
    /// a reconnect or a restart), several at a time so that they share the
    /// ack stream.
    pub async fn resend_acks(&self) {
        match self.inner.store.unacked().await {
            Ok(unacked) => {
                futures_util::stream::iter(unacked)
                    .for_each_concurrent(RESENDS_AT_ONCE, |rec| async move {
                        if let Some(outcome) = rec.outcome {
                            self.ack(&rec.id, &outcome).await;
                        }
                    })
                    .await;
            }
            Err(e) => self.inner.status.error(&e),
        }
    }

    /// Waits up to `grace` for every run to finish; then fires their
    /// cancellation signals and stops them. Stopped runs stay RECEIVED or
    /// RUNNING locally and run again after a restart (the hub redelivers).
    pub async fn drain(&self, grace: Duration) {
        let mut tasks = std::mem::take(
            &mut *self
                .inner
                .tasks
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let finished =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if finished.is_err() {
            tracing::warn!(
                running = tasks.len(),
                "grace period over: cancelling the remaining handlers"
            );
            self.inner.stop_all.cancel();
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            self.active().clear();
            self.inner.status.update(|s| {
                s.in_flight_directives = 0;
                s.pending_directives = 0;
            });
        }
    }
}

/// From its receipt until its handler returns, renews a directive's ack
/// deadline at half the deadline, so that neither a long run nor a wait for
/// a free handler slot gets it delivered again or failed as exhausted.
/// While it waits (`running` unset) the renewal says it is queued; once
/// its handler runs, it repeats the run's latest progress. A directive
/// that starts and ends quickly sends nothing extra.
async fn keep_leased(
    link: &Link,
    id: &str,
    running: &OnceLock<Context>,
    deadline: Option<&pbjson_types::Duration>,
) -> Infallible {
    let every = duration(deadline).unwrap_or(DEFAULT_ACK_DEADLINE) / 2;
    loop {
        tokio::time::sleep(every.max(MIN_RENEWAL)).await;
        let renewed = match running.get() {
            Some(ctx) => ctx.renew().await,
            None => {
                let ack = proto::AckRequest {
                    directive_id: id.to_owned(),
                    outcome: proto::AckOutcome::InProgress.into(),
                    progress_message: QUEUED.to_owned(),
                    ..Default::default()
                };
                link.ack(ack).await.map(drop)
            }
        };
        if let Err(e) = renewed {
            tracing::debug!(directive_id = %id, error = %e, "could not renew the ack deadline");
        }
    }
}

#[cfg(test)]
mod tests;
