//! The flusher: the one task that pushes metric batches, so two flushes
//! never race over the same batch. It flushes on its interval, when the
//! buffer reaches its flush size, when a connection comes up with points
//! waiting, and when [`Client::flush`](crate::Client::flush) asks; and once
//! more when the client shuts down.
//!
//! One batch never blocks the buffer. A batch is at most the hub's
//! `max_points_per_batch` hint (and the client's own limit) and about
//! 1 MiB. The hub's refusals are told apart:
//! - RESOURCE_EXHAUSTED with `retry-after-ms` metadata is a rate limit: the
//!   same batch is pushed again after the hinted delay (doubled for each
//!   refusal in a row, at most a minute), neither cut nor dropped;
//! - RESOURCE_EXHAUSTED without it is a size refusal (more points than the
//!   hub's hint, which it may have lowered since the batch was made, or a
//!   message over its size limit): the batch is cut, by the hint, or else
//!   by halving the byte bound for the rest of the run. The local store
//!   knows what the hub may hold under the batch's id from pushes whose
//!   answer never came, and cuts so that no point is ever pushed twice
//!   (`spoke-client/src/store/metrics.rs` has the rules); a single point
//!   refused alone is dropped;
//! - INVALID_ARGUMENT: the hub finds the batch malformed, and resending
//!   cannot fix it: it is dropped.
//!
//! Dropped points are counted in
//! [`Status::dropped_points`](crate::Status) and in the flush's report.

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
use crate::metrics::{Buffer, Close};
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
    /// Points this flush gave up on (also counted in
    /// [`Status::dropped_points`](crate::Status)): a point too large for
    /// the hub even alone, a batch the hub found malformed.
    pub dropped_points: u64,
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

/// The most bytes (near enough) in one batch, until the hub refuses less.
const MAX_BATCH_BYTES: u64 = 1 << 20;
/// The longest a rate-limited push waits before it is tried again,
/// whatever the hub's hint.
const MAX_RATE_LIMIT_WAIT: Duration = Duration::from_secs(60);
/// The metadata entry of the hub's rate-limit refusals: milliseconds until
/// a retry may succeed.
const RETRY_AFTER_MS: &str = "retry-after-ms";

/// What the flusher learned about the hub's limits during this run.
struct Sizing {
    /// Bytes per batch; halved whenever the hub refuses a batch whose point
    /// count was within its hint.
    bytes: u64,
}

/// How the hub refused a push.
enum Refusal {
    /// A rate limit: retry after the delay.
    RateLimited(Duration),
    /// Too many points or bytes.
    TooLarge,
    /// Malformed; resending cannot help.
    Invalid,
    /// Anything else (the connection failed, the hub is busy, ...): the
    /// batch may have been stored.
    Unknown,
}

fn refusal(e: &Error) -> Refusal {
    let Error::Status(s) = e else {
        return Refusal::Unknown;
    };
    match s.code() {
        Code::ResourceExhausted => match s
            .metadata()
            .get(RETRY_AFTER_MS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            Some(ms) => Refusal::RateLimited(Duration::from_millis(ms)),
            None => Refusal::TooLarge,
        },
        Code::InvalidArgument => Refusal::Invalid,
        _ => Refusal::Unknown,
    }
}

impl Flusher {
    /// Flushes on every trigger until `stop`, then once more, answering any
    /// request still queued with that last result.
    pub async fn run(self, mut requests: mpsc::Receiver<FlushRequest>, stop: CancellationToken) {
        let mut tick = tokio::time::interval_at(Instant::now() + self.interval, self.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut connection = self.link.subscribe();
        let mut sizing = Sizing {
            bytes: MAX_BATCH_BYTES,
        };
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => self.background(&mut sizing, &stop).await,
                () = self.wanted.notified() => self.background(&mut sizing, &stop).await,
                changed = connection.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let up = connection.borrow_and_update().is_some();
                    if up && self.status.snapshot().buffered_points > 0 {
                        self.background(&mut sizing, &stop).await;
                    }
                }
                Some(req) = requests.recv() => {
                    let _ = req.reply.send(self.flush(&mut sizing, &stop).await);
                }
            }
        }
        // The last flush may wait out a rate limit within the grace period.
        let never = CancellationToken::new();
        let last = self.flush(&mut sizing, &never);
        let last = match tokio::time::timeout(self.grace, last).await {
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
    async fn background(&self, sizing: &mut Sizing, stop: &CancellationToken) {
        if self.link.current().is_some()
            && let Err(e) = self.flush(sizing, stop).await
        {
            tracing::debug!(error = %e, "metric flush failed; retrying later with the same batch");
        }
    }

    /// The most points per batch: the client's limit, or the hub's hint if
    /// lower.
    fn max_points(&self) -> u32 {
        match self.hub_max_batch.load(Ordering::Relaxed) {
            0 => self.max_batch,
            hub => hub.min(self.max_batch),
        }
    }

    /// Pushes batches until the buffer is empty (or as many points as it
    /// held when the flush began, and a batch more, so a busy recorder
    /// cannot keep a flush going). A rate-limited push waits for the hub's
    /// delay, unless `interrupt` fires first.
    async fn flush(
        &self,
        sizing: &mut Sizing,
        interrupt: &CancellationToken,
    ) -> Result<FlushReport> {
        if self.link.current().is_none() {
            return Err(Error::NotConnected);
        }
        let mut left = self.status.snapshot().buffered_points + u64::from(self.max_points());
        let mut report = FlushReport::default();
        // Rate-limit refusals in a row: each waits twice as long as the
        // hint (a push may cost the hub's budget more than the one call the
        // hint is for, and it must not lose that race forever).
        let mut limited = 0u32;
        while left > 0 {
            let max = self.max_points();
            let Some(mut batch) = self.buffer.take(max, sizing.bytes).await? else {
                break;
            };
            let sent = batch.points.len() as u64;
            let request = proto::PushMetricsRequest {
                batch_id: batch.batch_id.clone(),
                points: std::mem::take(&mut batch.points),
            };
            let e = match self.link.push(request).await {
                Ok(answer) => {
                    let duplicate = answer.status == proto::BatchStatus::Duplicate as i32;
                    let how = if duplicate {
                        Close::Duplicate
                    } else {
                        Close::Accepted
                    };
                    let unknown = self.buffer.close(batch, how).await?;
                    if unknown > 0 {
                        tracing::warn!(batch_id = %answer.batch_id, dropped = unknown, "two pushes of this batch went unanswered: points the hub may hold were dropped rather than sent twice");
                    }
                    tally(&mut report, &answer);
                    report.dropped_points += unknown;
                    let rejected = answer.rejected.len() as u64;
                    for r in &answer.rejected {
                        tracing::warn!(batch_id = %answer.batch_id, index = r.index, reason = %r.reason, "hub rejected a metric point");
                    }
                    self.status.update(|s| s.rejected_points += rejected);
                    left = left.saturating_sub(sent);
                    limited = 0;
                    continue;
                }
                Err(e) => e,
            };
            self.status.update(|s| s.failed_pushes += 1);
            self.status.error(&e);
            match refusal(&e) {
                Refusal::RateLimited(hint) => {
                    let after = hint
                        .saturating_mul(1 << limited.min(16))
                        .min(MAX_RATE_LIMIT_WAIT);
                    limited += 1;
                    tracing::debug!(batch_id = %batch.batch_id, ?after, "metric push rate limited; pushing the same batch again after the hub's delay");
                    self.buffer.close(batch, Close::Refused).await?;
                    tokio::select! {
                        () = tokio::time::sleep(after) => {}
                        () = interrupt.cancelled() => return Err(e),
                    }
                }
                Refusal::TooLarge if sent <= 1 => {
                    // Alone and still too large: it can never be pushed.
                    tracing::error!(batch_id = %batch.batch_id, error = %e, "hub refused a single metric point as too large; dropping it");
                    let dropped = self
                        .buffer
                        .close(batch, Close::Abandoned { whole: false })
                        .await?;
                    report.dropped_points += dropped;
                    left = left.saturating_sub(sent);
                }
                Refusal::TooLarge => {
                    if sent <= u64::from(max) {
                        // Within the hint, so the message was too large.
                        sizing.bytes = sizing.bytes.min(batch.bytes / 2).max(1);
                    }
                    tracing::info!(batch_id = %batch.batch_id, points = sent, max_points = max, max_bytes = sizing.bytes, "hub refused a metric batch for size; cutting it");
                    let how = if batch.may_be_held() {
                        // The hub may hold it from an unanswered push: the
                        // next take sends a prefix under the same id, which
                        // tells.
                        Close::Refused
                    } else {
                        Close::Released
                    };
                    self.buffer.close(batch, how).await?;
                }
                Refusal::Invalid => {
                    // Resending cannot fix a batch the hub finds malformed;
                    // drop it rather than block the buffer behind it.
                    tracing::error!(batch_id = %batch.batch_id, error = %e, "hub refused a metric batch; dropping it");
                    let dropped = self
                        .buffer
                        .close(batch, Close::Abandoned { whole: true })
                        .await?;
                    report.dropped_points += dropped;
                    left = left.saturating_sub(sent);
                }
                Refusal::Unknown => return Err(e),
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
