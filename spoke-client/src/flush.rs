//! The flusher: the one task that pushes metric batches, so two flushes
//! never race over the same batch. It flushes on its interval, when the
//! buffer reaches its flush size, when a connection comes up with points
//! waiting, and when [`Client::flush`](crate::Client::flush) asks; and once
//! more when the client shuts down.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use hub_proto::v1 as proto;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::error::{Error, Result};
use crate::link::Link;
use crate::metrics::Buffer;
use crate::status::Tracker;

/// What a flush pushed.
///
/// ```no_run
/// # async fn demo(client: spoke_client::Client) -> Result<(), spoke_client::Error> {
/// client.record("statistics", "orders_processed", 42.0, &[("shop", "eu")]);
/// let report = client.flush().await?;
/// println!("{} points accepted in {} batches", report.accepted_points, report.batches);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlushReport {
    /// Batches the hub answered for.
    pub batches: u32,
    /// Points the hub holds from those batches (for a duplicate batch: the
    /// ones it stored the first time).
    pub accepted_points: u64,
    /// Points the hub refused as invalid.
    pub rejected_points: u64,
    /// Batches the hub already had: an earlier flush reached it but its
    /// answer did not reach the client.
    pub duplicate_batches: u32,
}

/// A flush asked for by [`Client::flush`](crate::Client::flush).
pub(crate) struct FlushRequest {
    pub reply: oneshot::Sender<Result<FlushReport>>,
}

/// Pushes the buffer to the hub.
pub(crate) struct Flusher {
    pub buffer: Buffer,
    pub link: Link,
    pub status: Tracker,
    /// The client's own batch limit.
    pub max_batch: u32,
    /// The hub's batch limit from its hints (0: none known).
    pub hub_max_batch: Arc<AtomicU32>,
    pub interval: Duration,
    /// Poked by the buffer when it reaches its flush size.
    pub wanted: Arc<Notify>,
    /// How long the final flush may take.
    pub grace: Duration,
}

impl Flusher {
    /// Flushes on every trigger until `stop`, then once more, answering any
    /// request still queued with that last result.
    pub async fn run(self, mut requests: mpsc::Receiver<FlushRequest>, stop: CancellationToken) {
        let mut tick = tokio::time::interval_at(Instant::now() + self.interval, self.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut connection = self.link.subscribe();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => self.background().await,
                () = self.wanted.notified() => self.background().await,
                changed = connection.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let up = connection.borrow_and_update().is_some();
                    if up && self.status.snapshot().buffered_points > 0 {
                        self.background().await;
                    }
                }
                Some(req) = requests.recv() => {
                    let _ = req.reply.send(self.flush().await);
                }
            }
        }
        let last = match tokio::time::timeout(self.grace, self.flush()).await {
            Ok(result) => result,
            Err(_) => Err(Error::NotConnected),
        };
        if let Err(e) = &last {
            tracing::info!(error = %e, "final metric flush incomplete; the points stay buffered for the next start");
        }
        requests.close();
        while let Some(req) = requests.recv().await {
            let _ = req.reply.send(match &last {
                Ok(report) => Ok(*report),
                Err(_) => Err(Error::NotRunning),
            });
        }
    }

    /// A flush nobody waits for: only worth trying while connected.
    async fn background(&self) {
        if self.link.current().is_some()
            && let Err(e) = self.flush().await
        {
            tracing::debug!(error = %e, "metric flush failed; retrying later with the same batch");
        }
    }

    /// Pushes batches until the buffer is empty (or as many as it held when
    /// the flush began, so a busy recorder cannot keep a flush going).
    pub async fn flush(&self) -> Result<FlushReport> {
        if self.link.current().is_none() {
            return Err(Error::NotConnected);
        }
        let max = match self.hub_max_batch.load(Ordering::Relaxed) {
            0 => self.max_batch,
            hub => hub.min(self.max_batch),
        };
        let budget = self.status.snapshot().buffered_points / u64::from(max) + 2;
        let mut report = FlushReport::default();
        for _ in 0..budget {
            let Some(batch) = self.buffer.take(max).await? else {
                break;
            };
            let points = batch.points.len() as u64;
            let request = proto::PushMetricsRequest {
                batch_id: batch.batch_id.clone(),
                points: batch.points,
            };
            match self.link.push(request).await {
                Ok(answer) => {
                    self.buffer.done(batch.batch_id).await?;
                    tally(&mut report, &answer);
                    let rejected = answer.rejected.len() as u64;
                    for r in &answer.rejected {
                        tracing::warn!(batch_id = %answer.batch_id, index = r.index, reason = %r.reason, "hub rejected a metric point");
                    }
                    self.status.update(|s| s.rejected_points += rejected);
                }
                Err(Error::Status(s)) if s.code() == Code::InvalidArgument => {
                    // Resending cannot fix a batch the hub finds malformed;
                    // drop it rather than block the buffer behind it.
                    tracing::error!(batch_id = %batch.batch_id, error = %s, "hub refused a metric batch; dropping it");
                    self.buffer.done(batch.batch_id).await?;
                    self.status.update(|st| st.dropped_points += points);
                    self.status.error(&s);
                }
                Err(e) => {
                    self.status.update(|s| s.failed_pushes += 1);
                    self.status.error(&e);
                    return Err(e);
                }
            }
        }
        Ok(report)
    }
}

fn tally(report: &mut FlushReport, answer: &proto::BatchResult) {
    report.batches += 1;
    report.accepted_points += u64::from(answer.accepted_points);
    report.rejected_points += answer.rejected.len() as u64;
    if answer.status == proto::BatchStatus::Duplicate as i32 {
        report.duplicate_batches += 1;
    }
}
