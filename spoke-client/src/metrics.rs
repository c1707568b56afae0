//! The metric buffer: an actor that owns the buffer's table in the local
//! store. [`Client::record`](crate::Client::record) hands it a point through
//! a bounded channel and returns at once: recording never waits on the
//! network, nor on the disk. The actor writes points in groups, keeps the
//! buffer within its bound (dropping the oldest, counted), and wakes the
//! flusher when the buffer reaches its flush size.
//!
//! When a point is on disk:
//! - a point a handler records through its [`Context`](crate::Context)
//!   while it runs is kept with the run and written in the same local
//!   transaction as the run's outcome: a crash keeps both or neither (and
//!   then the directive runs again and records it again), so a finished
//!   run's points are never lost nor doubled;
//! - any other point is written by the actor as soon as it takes it from
//!   the channel, after the at most 8 192 points queued before it (written
//!   in groups of up to 1 024 per transaction): normally within
//!   milliseconds. A crash loses only what was still queued.
//!
//! Every point not kept is counted in
//! [`Status::dropped_points`](crate::Status) (or `rejected_points` for a
//! value that is not finite); that includes a point too large for the hub
//! even alone, which [`flush`](crate::flush) gives up on rather than let it
//! block the points behind it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use hub_proto::v1 as proto;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::error::{Error, Result};
use crate::status::Tracker;
use crate::store::{PendingBatch, Store};
use crate::wire::{timestamp_ns, unix_ns};

/// Points waiting in the channel to the actor; beyond it `record` drops
/// (and counts) rather than wait.
const CHANNEL: usize = 8192;
/// Most points written in one transaction.
const WRITE_GROUP: usize = 1024;

/// One measurement to record.
///
/// ```no_run
/// # fn demo(client: spoke_client::Client) {
/// use spoke_client::Point;
///
/// client.record_point(
///     Point::new("compensation", "payout", 1250.0)
///         .unit("EUR")
///         .label("region", "eu")
///         .at(std::time::SystemTime::now()),
/// );
/// # }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub(crate) domain: String,
    pub(crate) name: String,
    pub(crate) value: f64,
    pub(crate) unit: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) time: SystemTime,
}

impl Point {
    /// A point measured now. `domain` and `name`: 1 to 64 (name: 128)
    /// characters of letters, digits, `_`, `.`, `-`, starting with a letter;
    /// `value` must be finite. The hub refuses bad points one by one (see
    /// [`Status::rejected_points`](crate::Status)).
    pub fn new(domain: impl Into<String>, name: impl Into<String>, value: f64) -> Self {
        Self {
            domain: domain.into(),
            name: name.into(),
            value,
            unit: String::new(),
            labels: BTreeMap::new(),
            time: SystemTime::now(),
        }
    }

    /// The unit, e.g. `"ms"` or `"EUR"` (at most 32 characters).
    #[must_use]
    pub fn unit(mut self, unit: impl Into<String>) -> Self {
        self.unit = unit.into();
        self
    }

    /// Adds a label (at most 16 per point).
    #[must_use]
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// When the value was measured (default: when the point was made). The
    /// hub takes times up to 7 days old.
    #[must_use]
    pub fn at(mut self, time: SystemTime) -> Self {
        self.time = time;
        self
    }

    /// The point as the wire carries it.
    pub(crate) fn into_proto(self) -> proto::MetricPoint {
        proto::MetricPoint {
            domain: self.domain,
            name: self.name,
            value: self.value,
            unit: self.unit,
            labels: self.labels.into_iter().collect(),
            time: Some(timestamp_ns(unix_ns(self.time))),
        }
    }
}

enum Command {
    Record(Point),
    Take {
        max: u32,
        max_bytes: u64,
        reply: oneshot::Sender<Result<Option<PendingBatch>>>,
    },
    /// The hub answered for a batch, or refused it, or it is given up.
    Close {
        batch: PendingBatch,
        how: Close,
        reply: oneshot::Sender<Result<u64>>,
    },
    /// Points were written beside the actor (with a directive's outcome).
    Settle,
}

/// What became of a pushed batch (see [`Store`]'s batch methods).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Close {
    /// The hub stored it now.
    Accepted,
    /// The hub had it already.
    Duplicate,
    /// The hub refused it for sure; it stays, to be pushed again.
    Refused,
    /// The hub refused it for sure and holds none of it: its points are
    /// batched anew.
    Released,
    /// Given up: what it sent (or, `whole`, all of it) is dropped.
    Abandoned { whole: bool },
}

/// Handle to the buffer actor; cheap to clone.
#[derive(Clone)]
pub(crate) struct Buffer {
    tx: mpsc::Sender<Command>,
    status: Tracker,
    /// The buffer's bound, also the most points one run keeps.
    max_points: u64,
}

/// The buffer's limits.
pub(crate) struct Limits {
    /// Most points kept; the oldest beyond it are dropped.
    pub max_points: u64,
    /// Wake the flusher at this many points.
    pub flush_at: u64,
}

impl Buffer {
    /// Starts the actor over `store`; it ends when every handle is gone.
    pub fn spawn(store: Store, status: Tracker, limits: Limits, wanted: Arc<Notify>) -> Self {
        let (tx, rx) = mpsc::channel(CHANNEL);
        let max_points = limits.max_points;
        let actor = Actor {
            store,
            status: status.clone(),
            limits,
            wanted,
            rx,
        };
        tokio::spawn(actor.run());
        Self {
            tx,
            status,
            max_points,
        }
    }

    /// A handle whose actor is gone: every point is counted as dropped.
    #[cfg(test)]
    pub fn detached() -> Self {
        let (tx, _) = mpsc::channel(1);
        Self {
            tx,
            status: Tracker::default(),
            max_points: 100_000,
        }
    }

    /// Whether `point` can be kept: a non-finite value is rejected (and
    /// counted), since the hub refuses it anyway and SQLite cannot store a
    /// NaN.
    pub fn admits(&self, point: &Point) -> bool {
        if point.value.is_finite() {
            return true;
        }
        tracing::warn!(domain = %point.domain, name = %point.name, "metric value not finite; point rejected");
        self.status.update(|s| s.rejected_points += 1);
        false
    }

    /// Queues a point; never waits. A non-finite value is rejected here
    /// (counted); if the actor is that far behind, the point is dropped
    /// (counted).
    pub fn record(&self, point: Point) {
        if !self.admits(&point) {
            return;
        }
        if self.tx.try_send(Command::Record(point)).is_err() {
            self.dropped(1);
        }
    }

    /// The most points one run keeps until its outcome.
    pub fn max_points(&self) -> u64 {
        self.max_points
    }

    /// Counts points that will never be pushed.
    pub fn dropped(&self, points: u64) {
        if points > 0 {
            self.status.update(|s| s.dropped_points += points);
        }
    }

    /// Points were written to the buffer's table beside the actor: it
    /// enforces the bound, counts them and wakes the flusher if due. If its
    /// channel is full, the next command it handles does the same.
    pub fn written(&self) {
        let _ = self.tx.try_send(Command::Settle);
    }

    /// The batch to push next, if any (see [`Store::take_batch`]).
    pub async fn take(&self, max: u32, max_bytes: u64) -> Result<Option<PendingBatch>> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Take {
            max,
            max_bytes,
            reply,
        })
        .await?;
        answer.await.map_err(|_| Error::NotRunning)?
    }

    /// Records what became of `batch` (its points need not be kept);
    /// answers how many points that dropped, already counted in
    /// [`Status::dropped_points`](crate::Status).
    pub async fn close(&self, batch: PendingBatch, how: Close) -> Result<u64> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Close { batch, how, reply }).await?;
        answer.await.map_err(|_| Error::NotRunning)?
    }

    async fn send(&self, cmd: Command) -> Result<()> {
        self.tx.send(cmd).await.map_err(|_| Error::NotRunning)
    }
}

struct Actor {
    store: Store,
    status: Tracker,
    limits: Limits,
    wanted: Arc<Notify>,
    rx: mpsc::Receiver<Command>,
}

impl Actor {
    async fn run(mut self) {
        // Points left by an earlier process count from the start.
        self.settle().await;
        while let Some(cmd) = self.rx.recv().await {
            let Command::Record(first) = cmd else {
                self.handle(cmd).await;
                continue;
            };
            let mut points = vec![first];
            let mut next = None;
            while points.len() < WRITE_GROUP {
                match self.rx.try_recv() {
                    Ok(Command::Record(p)) => points.push(p),
                    Ok(other) => {
                        next = Some(other);
                        break;
                    }
                    Err(_) => break,
                }
            }
            if let Err(e) = self.store.insert_points(&points).await {
                tracing::error!(error = %e, points = points.len(), "could not buffer metric points");
                let lost = points.len() as u64;
                self.status.update(|s| s.dropped_points += lost);
                self.status.error(&e);
            }
            self.settle().await;
            if let Some(cmd) = next {
                self.handle(cmd).await;
            }
        }
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Record(_) => unreachable!("records are written in groups by run"),
            Command::Take {
                max,
                max_bytes,
                reply,
            } => {
                let _ = reply.send(self.store.take_batch(max, max_bytes).await);
            }
            Command::Close { batch, how, reply } => {
                let store = &self.store;
                let closed = match how {
                    Close::Accepted => store.answered(&batch, false).await,
                    Close::Duplicate => store.answered(&batch, true).await,
                    Close::Refused => store.refused(&batch).await.map(|()| 0),
                    Close::Released => store.release(&batch).await.map(|()| 0),
                    Close::Abandoned { whole } => store.abandon(&batch, whole).await,
                };
                if let Ok(dropped) = closed {
                    self.status.update(|s| s.dropped_points += dropped);
                }
                self.settle().await;
                let _ = reply.send(closed);
            }
            Command::Settle => self.settle().await,
        }
    }

    /// Enforces the bound, publishes the count, wakes the flusher if due.
    async fn settle(&mut self) {
        let counted = async {
            let dropped = self.store.drop_oldest(self.limits.max_points).await?;
            Ok::<_, Error>((dropped, self.store.buffered_points().await?))
        };
        match counted.await {
            Ok((dropped, buffered)) => {
                if dropped > 0 {
                    tracing::warn!(dropped, "metric buffer full: dropped the oldest points");
                }
                self.status.update(|s| {
                    s.dropped_points += dropped;
                    s.buffered_points = buffered;
                });
                if buffered >= self.limits.flush_at {
                    self.wanted.notify_one();
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "metric buffer bookkeeping failed");
                self.status.error(&e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overflow_keeps_the_newest_and_counts_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let status = Tracker::default();
        let wanted = Arc::new(Notify::new());
        let limits = Limits {
            max_points: 5,
            flush_at: 3,
        };
        let buffer = Buffer::spawn(store, status.clone(), limits, wanted.clone());
        for i in 0..8 {
            buffer.record(Point::new("statistics", "n", f64::from(i)));
        }
        // A take is answered after every earlier record was written.
        let batch = buffer.take(100, u64::MAX).await.unwrap().unwrap();
        let values: Vec<f64> = batch.points.iter().map(|p| p.value).collect();
        assert_eq!(values, vec![3.0, 4.0, 5.0, 6.0, 7.0]);
        let s = status.snapshot();
        assert_eq!((s.buffered_points, s.dropped_points), (5, 3));
        // The size threshold was reached: the flusher was woken.
        wanted.notified().await;
        buffer.close(batch, Close::Accepted).await.unwrap();
        assert_eq!(status.snapshot().buffered_points, 0);
    }
}
