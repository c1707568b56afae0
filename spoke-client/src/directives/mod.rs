//! Directives received from the hub: deduplication by id against the local
//! record, bounded concurrency, running handlers (a panic is caught and
//! acked FAILED), recording outcomes before acking, cancellation, and the
//! drain at shutdown.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

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
use crate::metrics::Buffer;
use crate::status::Tracker;
use crate::store::{LocalStatus, Store};
use crate::wire::{duration, json_of_struct, now_ms};

/// The hub's default ack deadline, assumed when a delivery carries none.
const DEFAULT_ACK_DEADLINE: Duration = Duration::from_secs(30);
/// The shortest renewal period, whatever the deadline.
const MIN_RENEWAL: Duration = Duration::from_millis(250);
/// Recorded outcomes resent at once after a reconnect.
const RESENDS_AT_ONCE: usize = 64;

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
    /// Runs of this process that have not finished, by directive id.
    active: Mutex<HashMap<String, Cancel>>,
    tasks: Mutex<JoinSet<()>>,
    /// Fired when shutdown gives up waiting: cancels every run.
    stop_all: CancellationToken,
    /// Told of each outcome recorded and each redelivery answered.
    observer: Option<Observer>,
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
            }),
        }
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

    /// Handles one delivery from the stream. Only a local store failure is
    /// an error; the directive then stays unacked and the hub redelivers it.
    pub async fn receive(&self, d: proto::Directive) -> Result<()> {
        let store = &self.inner.store;
        let payload = d
            .payload
            .as_ref()
            .map_or_else(|| serde_json::json!({}), json_of_struct);
        match store.directive(&d.id).await? {
            None => {}
            Some(rec) => match rec.status {
                LocalStatus::Received | LocalStatus::Running
                    if self.active().contains_key(&d.id) =>
                {
                    // Still running here: the hub missed our news; tell it.
                    tracing::debug!(directive_id = %d.id, attempt = d.attempt, "redelivered while running");
                    let this = self.clone();
                    self.spawn(async move { this.still_running(d.id).await });
                    return Ok(());
                }
                LocalStatus::Received | LocalStatus::Running => {
                    // A run an earlier process never finished: run it again.
                    tracing::info!(directive_id = %d.id, attempt = d.attempt, "running again: an earlier run did not finish");
                }
                LocalStatus::Finished | LocalStatus::Acked => {
                    tracing::info!(directive_id = %d.id, "already finished: acking the recorded outcome again");
                    if let Some(outcome) = rec.outcome {
                        self.observe(Event::Redelivered {
                            id: d.id.clone(),
                            attempt: d.attempt,
                        });
                        let this = self.clone();
                        self.spawn(async move { this.ack(&d.id, &outcome).await });
                    }
                    return Ok(());
                }
                LocalStatus::Closed => {
                    tracing::debug!(directive_id = %d.id, "delivery of a closed directive ignored");
                    return Ok(());
                }
            },
        }
        // Recorded before anything runs: a crash from here on reruns it.
        store
            .record_received(&d.id, &d.r#type, &payload, d.attempt, now_ms())
            .await?;
        let cancel = Cancel::child_of(&self.inner.stop_all);
        self.active().insert(d.id.clone(), cancel.clone());
        self.inner.status.update(|s| s.pending_directives += 1);
        let this = self.clone();
        self.spawn(async move {
            this.run(d, payload, cancel).await;
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

    async fn run(&self, d: proto::Directive, payload: serde_json::Value, cancel: Cancel) {
        let outcome = self.outcome_of(&d, payload, &cancel).await;
        self.active().remove(&d.id);
        if self.inner.stop_all.is_cancelled() {
            // Shutdown interrupted it: leave it unfinished to run again.
            return;
        }
        let store = &self.inner.store;
        if let Some(reason) = cancel.reason() {
            // The hub refuses acks of a cancelled directive.
            let _ = store.mark_closed(&d.id, &reason, now_ms()).await;
            return;
        }
        let Some(outcome) = outcome else { return };
        if let Err(e) = store.record_outcome(&d.id, &outcome, now_ms()).await {
            tracing::error!(directive_id = %d.id, error = %e, "could not record the outcome; not acking");
            self.inner.status.error(&e);
            return;
        }
        self.observe(Event::Finished {
            id: d.id.clone(),
            directive_type: d.r#type.clone(),
            outcome: outcome.name(),
        });
        self.ack(&d.id, &outcome).await;
    }

    /// Runs the handler once a slot is free; `None` if cancelled first.
    async fn outcome_of(
        &self,
        d: &proto::Directive,
        payload: serde_json::Value,
        cancel: &Cancel,
    ) -> Option<Outcome> {
        let status = &self.inner.status;
        let Some(handler) = self.inner.handlers.get(&d.r#type).cloned() else {
            status.update(|s| s.pending_directives -= 1);
            return Some(Outcome::rejected(format!(
                "no handler for directive type {:?}",
                d.r#type
            )));
        };
        let permit = tokio::select! {
            biased;
            () = cancel.token.cancelled() => None,
            permit = self.inner.slots.clone().acquire_owned() => permit.ok(),
        };
        status.update(|s| s.pending_directives -= 1);
        let _permit = permit?;
        if let Err(e) = self.inner.store.mark_running(&d.id, now_ms()).await {
            tracing::error!(directive_id = %d.id, error = %e, "could not record the start; not running");
            status.error(&e);
            return None;
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
        let lease = keep_leased(ctx.clone(), d.ack_deadline.as_ref());
        // Both the call and the future it returns may panic.
        let run = std::panic::catch_unwind(AssertUnwindSafe(|| handler(payload, ctx)));
        let outcome = match run {
            Ok(fut) => tokio::select! {
                outcome = AssertUnwindSafe(fut).catch_unwind() => outcome,
                never = lease => match never {},
            },
            Err(panic) => Err(panic),
        };
        status.update(|s| s.in_flight_directives -= 1);
        Some(outcome.unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-text panic payload".to_owned());
            tracing::error!(directive_id = %d.id, panic = %what, "handler panicked");
            Outcome::failed(format!("handler panicked: {what}"))
        }))
    }

    /// Sends a final ack; on success or refusal the record is settled, on
    /// any other failure it stays FINISHED and is sent again later.
    async fn ack(&self, id: &str, outcome: &Outcome) {
        let store = &self.inner.store;
        let settled = match self.inner.link.ack(outcome.ack(id)).await {
            Ok(_) => store.mark_acked(id, now_ms()).await,
            Err(Error::Status(s))
                if matches!(s.code(), Code::FailedPrecondition | Code::NotFound) =>
            {
                tracing::info!(directive_id = %id, reason = %s.message(), "hub takes no ack for this directive");
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

/// While a handler runs, renews its ack deadline at half the deadline, so
/// a long run is not delivered again nor failed as exhausted. A short run
/// sends nothing extra.
async fn keep_leased(ctx: Context, deadline: Option<&pbjson_types::Duration>) -> Infallible {
    let every = duration(deadline).unwrap_or(DEFAULT_ACK_DEADLINE) / 2;
    loop {
        tokio::time::sleep(every.max(MIN_RENEWAL)).await;
        if let Err(e) = ctx.renew().await {
            tracing::debug!(directive_id = %ctx.id(), error = %e, "could not renew the ack deadline");
        }
    }
}

#[cfg(test)]
mod tests;
