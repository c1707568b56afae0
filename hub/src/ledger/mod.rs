//! The ledger: the hub's in-memory state of the fleet, and the authority
//! every decision is made against.
//!
//! It holds every spoke (registration, reported state, health, its live
//! stream) and every directive that is not final (state, attempts, due
//! times, the per-spoke delivery order and in-flight window). Calls decide
//! against it under one lock held for microseconds and never across an
//! `.await`; what they decide is appended to the log as [`Change`]s, which
//! the committer (`committer.rs`) writes in groups: one transaction and one
//! sync for everything gathered while the previous commit ran. A caller
//! whose answer depends on durability (a create, an ack, a registration)
//! waits for the commit that holds its changes; deliveries, heartbeats and
//! timer decisions do not wait for anything.
//!
//! The store is the log the ledger is rebuilt from: at start, and after a
//! failed commit (the changes of that batch and of anything decided after
//! it are answered UNAVAILABLE and dropped, and the ledger is read back from
//! what is committed).
//!
//! What happens after a commit is part of the commit, not of the request
//! that asked for it: new directives become deliverable and their spokes
//! are woken, and cancel notices are queued for streams, by the committer
//! ([`Effect`]), so a caller that gives up early changes nothing.

mod committer;
mod delivery;
mod directives;
mod due;
mod spokes;
#[cfg(test)]
mod tests;
mod webhooks;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{Notify, oneshot, watch};
use uuid::Uuid;

pub use committer::{Committer, run_committer, spawn_committer};
pub use delivery::{Delivery, End, Step, Subscription};
pub use directives::{AckStep, CancelStep, CreateStep, Created};
pub use due::TimerPlan;
pub use spokes::{HealthChange, Registered};
pub use webhooks::WebhookTake;

use self::directives::Entry;
use self::spokes::Spoke;
use crate::error::{Error, Result};
use crate::store::{Change, Cutoffs, IdempotencyRow, Purged, Snapshot, Store, StoredBatch};
use crate::telemetry::Telemetry;

/// The payload bytes the ledger keeps in memory for directives waiting to be
/// delivered; beyond it, payloads are read from the store when sent.
const PAYLOAD_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// Handle to the ledger; cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Poked when the log has something that waits for a commit.
    kick: Notify,
    /// Set when the hub stops: the committer writes what is left and ends.
    closing: watch::Sender<bool>,
    /// Why the latest commit failed; `None` once one succeeds.
    write_error: watch::Sender<Option<String>>,
    store: Store,
    timer_plan: TimerPlan,
    telemetry: Arc<Telemetry>,
    /// Poked when the set of spokes with webhook delivery may have changed.
    webhooks_changed: Notify,
}

/// Everything behind the lock.
#[derive(Default)]
struct State {
    spokes: HashMap<Uuid, Spoke>,
    by_key: HashMap<String, Uuid>,
    by_name: BTreeMap<String, Uuid>,
    directives: HashMap<Uuid, Entry>,
    /// Ack deadlines of deliveries: (due, directive).
    ack_due: BTreeSet<(i64, Uuid)>,
    /// Expiry times of directives that are not final: (at, directive).
    expiry: BTreeSet<(i64, Uuid)>,
    /// When failed webhook attempts are retried: (at, directive).
    retry_due: BTreeSet<(i64, Uuid)>,
    idempotency: HashMap<String, IdempotencyKey>,
    /// The same keys by age, for forgetting them in order.
    idempotency_order: VecDeque<(i64, String)>,
    /// How many directives are in each final state.
    finals: HashMap<&'static str, i64>,
    /// Spokes whose row changed since the last commit.
    dirty: HashSet<Uuid>,
    log: Log,
    /// Purges retention asked for, run by the committer between commits.
    purges: Vec<PurgeJob>,
    /// Whether a batch is being committed right now.
    committing: bool,
    /// Set after a failed commit until the ledger is rebuilt: writes are
    /// refused meanwhile.
    poisoned: bool,
    payload_bytes: usize,
    next_stream: u64,
}

/// Changes waiting for the next commit, with who waits for them and what
/// follows from them.
#[derive(Default)]
struct Log {
    changes: Vec<Change>,
    waiters: Vec<Waiter>,
    effects: Vec<Effect>,
}

/// An idempotency key: the create it made, and what that create asked for.
struct IdempotencyKey {
    group_id: Uuid,
    /// See `directives::fingerprint`; empty for keys stored before it was.
    fingerprint: Arc<str>,
    created_at: i64,
}

/// A purge retention asked for: run in bounded steps between commits.
struct PurgeJob {
    cutoffs: Cutoffs,
    purged: Purged,
    reply: oneshot::Sender<Result<Purged>>,
}

/// Someone waiting for the commit of their changes.
enum Waiter {
    Done(oneshot::Sender<Result<()>>),
    Metrics(oneshot::Sender<Result<StoredBatch>>),
}

/// What a commit sets off.
#[derive(Debug, Clone)]
enum Effect {
    /// A new directive may be delivered now.
    Publish(Uuid),
    /// Tell the spoke to stop working on a directive.
    Notice {
        spoke_id: Uuid,
        directive_id: Uuid,
        reason: String,
    },
}

/// Completes when the commit holding a call's changes is done.
pub type Committed = oneshot::Receiver<Result<()>>;

/// Waits for a commit; a dropped sender (the hub stopping) is UNAVAILABLE.
pub async fn committed(rx: Committed) -> Result<()> {
    rx.await.unwrap_or(Err(Error::ShuttingDown))
}

impl Ledger {
    /// A ledger rebuilt from what `store` holds; commits are counted in
    /// `telemetry`.
    pub async fn load(store: Store, telemetry: Arc<Telemetry>) -> Result<Self> {
        let snapshot = store.snapshot().await?;
        let (closing, _) = watch::channel(false);
        let ledger = Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                kick: Notify::new(),
                closing,
                write_error: watch::Sender::new(None),
                store,
                timer_plan: TimerPlan::default(),
                telemetry,
                webhooks_changed: Notify::new(),
            }),
        };
        ledger.lock().rebuild(snapshot);
        Ok(ledger)
    }

    /// Releases `state` after a call logged its changes, wakes the
    /// committer, and returns what completes when they are committed.
    fn commit_soon(&self, mut state: MutexGuard<'_, State>) -> Committed {
        let rx = state.waiter();
        drop(state);
        self.shared.kick.notify_one();
        rx
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The store behind the ledger.
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// The hub's own metrics.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.shared.telemetry
    }

    /// When the delivery timer should run next.
    pub fn timer_plan(&self) -> &TimerPlan {
        &self.shared.timer_plan
    }

    /// Completes once every change logged so far is committed (at once when
    /// nothing is pending): after it, the store answers for them.
    pub async fn barrier(&self) -> Result<()> {
        let rx = {
            let mut state = self.lock();
            if state.log.changes.is_empty() && state.dirty.is_empty() && !state.committing {
                return Ok(());
            }
            let (tx, rx) = oneshot::channel();
            state.log.waiters.push(Waiter::Done(tx));
            rx
        };
        self.shared.kick.notify_one();
        committed(rx).await
    }

    /// Stores a metric batch with the next commit; answers whether it was
    /// stored or a duplicate.
    pub async fn store_metrics(
        &self,
        spoke_id: Uuid,
        batch: Arc<crate::metrics::Batch>,
        now_ms: i64,
    ) -> Result<StoredBatch> {
        let rx = {
            let mut state = self.lock();
            state.writable()?;
            let (tx, rx) = oneshot::channel();
            state.log.changes.push(Change::Metrics {
                spoke_id,
                batch,
                at: now_ms,
            });
            state.log.waiters.push(Waiter::Metrics(tx));
            rx
        };
        self.shared.kick.notify_one();
        rx.await.unwrap_or(Err(Error::ShuttingDown))
    }

    /// Notes that the NATS JetStream stream `stream` acknowledged every
    /// event up to `through`; written with the next commit, waited for by
    /// nobody (a mark lost with a killed hub only means events published
    /// again, which the stream's duplicate window drops).
    pub fn events_published(&self, stream: Arc<str>, through: i64) {
        let mut state = self.lock();
        if state.writable().is_err() {
            return;
        }
        state
            .log
            .changes
            .push(Change::EventsPublished { stream, through });
        drop(state);
        self.shared.kick.notify_one();
    }

    /// Deletes what is older than the cutoffs, in bounded steps between
    /// commits (so a large purge never holds up a commit); answers what it
    /// deleted. Idempotency keys older than their cutoff are forgotten at
    /// once: a repeat with such a key creates anew.
    pub async fn purge(&self, cutoffs: Cutoffs) -> Result<Purged> {
        let (reply, rx) = oneshot::channel();
        self.lock().forget_keys(cutoffs.keys_before);
        self.lock().purges.push(PurgeJob {
            cutoffs,
            purged: Purged::default(),
            reply,
        });
        self.shared.kick.notify_one();
        rx.await.unwrap_or(Err(Error::ShuttingDown))
    }

    /// Why the latest commit failed, while no commit has succeeded since.
    pub fn write_error(&self) -> Option<String> {
        self.shared.write_error.borrow().clone()
    }

    /// Directives per state, as decided so far (the `/metrics` gauges).
    pub fn directives_by_state(&self) -> Vec<(String, i64)> {
        let state = self.lock();
        let mut counts = state.finals.clone();
        for entry in state.directives.values() {
            *counts.entry(entry.state.as_str()).or_default() += 1;
        }
        counts.into_iter().map(|(s, n)| (s.to_owned(), n)).collect()
    }

    /// Asks the committer to write what is left and stop; completes when it
    /// has (see [`run_committer`]).
    pub fn close(&self) {
        self.shared.closing.send_replace(true);
        self.shared.kick.notify_one();
    }
}

impl State {
    /// Remembers an idempotency key.
    fn remember_key(&mut self, row: IdempotencyRow) {
        self.idempotency_order
            .push_back((row.created_at, row.key.clone()));
        self.idempotency.insert(
            row.key,
            IdempotencyKey {
                group_id: row.group_id,
                fingerprint: row.fingerprint.into(),
                created_at: row.created_at,
            },
        );
    }

    /// Forgets idempotency keys made before `before` (Unix ms).
    fn forget_keys(&mut self, before: i64) {
        while self
            .idempotency_order
            .front()
            .is_some_and(|(at, _)| *at < before)
        {
            let Some((at, key)) = self.idempotency_order.pop_front() else {
                break;
            };
            // A key used again after a purge is remembered with its new time.
            if self
                .idempotency
                .get(&key)
                .is_some_and(|k| k.created_at == at)
            {
                self.idempotency.remove(&key);
            }
        }
    }

    /// Takes final directives deleted by retention out of the counts.
    fn forget_finals(&mut self, purged: &Purged) {
        for (state, n) in &purged.directives {
            if let Some(count) = self.finals.get_mut(state.as_str()) {
                *count = count.saturating_sub(i64::try_from(*n).unwrap_or(i64::MAX));
            }
        }
    }

    /// Refuses writes while the ledger is being rebuilt.
    fn writable(&self) -> Result<()> {
        if self.poisoned {
            Err(Error::Unavailable(
                "the hub could not write to its database; retry shortly",
            ))
        } else {
            Ok(())
        }
    }

    /// A waiter for the commit of what was just logged.
    fn waiter(&mut self) -> Committed {
        let (tx, rx) = oneshot::channel();
        self.log.waiters.push(Waiter::Done(tx));
        rx
    }

    /// Replaces everything but the live streams with `snapshot`.
    fn rebuild(&mut self, snapshot: Snapshot) {
        let mut streams = HashMap::new();
        for (id, spoke) in self.spokes.drain() {
            streams.insert(id, spoke.detach());
        }
        self.by_key.clear();
        self.by_name.clear();
        self.directives.clear();
        self.ack_due.clear();
        self.expiry.clear();
        self.retry_due.clear();
        self.dirty.clear();
        self.payload_bytes = 0;
        self.idempotency.clear();
        self.idempotency_order.clear();
        for row in snapshot.idempotency {
            self.remember_key(row);
        }
        self.finals = snapshot
            .finals
            .into_iter()
            .map(|(state, n)| (state.as_str(), n))
            .collect();
        for (info, live) in snapshot.spokes {
            let id = info.id;
            let mut spoke = Spoke::new(Arc::new(info), live);
            if let Some(stream) = streams.remove(&id) {
                spoke.attach(stream);
            }
            self.index_spoke(&spoke);
            self.spokes.insert(id, spoke);
        }
        for row in snapshot.outstanding {
            self.restore(row);
        }
        for spoke in self.spokes.values() {
            spoke.wake();
        }
    }
}
