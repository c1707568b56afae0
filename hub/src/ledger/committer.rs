//! The committer: the one task that writes the ledger's log to the store.
//!
//! It takes everything logged since its last commit, commits it as one
//! batch, then answers the waiters and applies the batch's effects. While a
//! commit runs, new changes gather for the next one, so the batch size
//! follows the load: an idle hub commits a lone write at once, a busy one
//! shares each sync among everything that arrived during the last.

use std::mem;
use std::time::Duration;

use super::{Effect, Ledger, Log, State, Waiter};
use crate::error::Error;
use crate::store::{Change, Committed, Writer};

/// Longest a changed spoke row (a heartbeat, a sign of life) waits in
/// memory before it is written when nothing else is.
const SPOKE_FLUSH: Duration = Duration::from_secs(1);
/// Pause between attempts to rebuild the ledger after a failed commit.
const REBUILD_RETRY: Duration = Duration::from_secs(1);

/// One batch taken from the log.
struct Batch {
    changes: Vec<Change>,
    waiters: Vec<Waiter>,
    effects: Vec<Effect>,
}

/// The committer, running on its own thread.
pub struct Committer(std::thread::JoinHandle<()>);

/// Starts the committer on a thread of its own (with a single-threaded
/// runtime): between the statements of a commit it is never queued behind
/// the calls the hub's runtime is serving, so a commit takes as long as the
/// database needs, not as long as the busiest moment's run queue.
pub fn spawn_committer(ledger: Ledger, writer: Writer) -> std::io::Result<Committer> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("hub-committer".into())
        .spawn(move || runtime.block_on(run_committer(ledger, writer)))?;
    Ok(Committer(thread))
}

impl Committer {
    /// Waits until the committer has written what is left and stopped
    /// (after [`Ledger::close`]); re-raises its panic.
    pub async fn join(self) {
        let joined = tokio::task::spawn_blocking(move || self.0.join()).await;
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(e) => panic!("joining the committer: {e}"),
        }
    }
}

/// Commits the ledger's log with `writer` until [`Ledger::close`]; then
/// writes what is left and returns. Between commits, it runs the purges
/// retention asked for, a bounded step at a time.
pub async fn run_committer(ledger: Ledger, mut writer: Writer) {
    let mut closing = ledger.shared.closing.subscribe();
    loop {
        let committed = commit_next(&ledger, &mut writer).await;
        // A stopping hub writes what it decided and leaves purges for the
        // next start.
        let stopping = *closing.borrow_and_update();
        let purged = !stopping && purge_step(&ledger, &mut writer).await;
        if committed || purged {
            continue;
        }
        if stopping {
            return;
        }
        tokio::select! {
            () = ledger.shared.kick.notified() => {}
            () = tokio::time::sleep(SPOKE_FLUSH) => {}
            _ = closing.changed() => {}
        }
    }
}

/// Commits everything logged so far as one batch; `false` when there was
/// nothing. After a failed commit, returns once the ledger is rebuilt.
pub(super) async fn commit_next(ledger: &Ledger, writer: &mut Writer) -> bool {
    let Some(batch) = ledger.lock().take_batch() else {
        return false;
    };
    let started = std::time::Instant::now();
    let result = writer.commit(&batch.changes).await;
    let telemetry = ledger.telemetry();
    match result {
        Ok(done) => {
            telemetry
                .commit_seconds
                .observe(started.elapsed().as_secs_f64());
            telemetry.commits.inc();
            telemetry.commit_changes.observe(batch.changes.len() as f64);
            ledger.lock().committed(batch, done);
            ledger
                .shared
                .write_error
                .send_if_modified(|e| e.take().is_some());
        }
        Err(e) => {
            telemetry.commit_failures.inc();
            ledger.shared.write_error.send_replace(Some(e.to_string()));
            tracing::error!(error = %e, changes = batch.changes.len(), "a commit failed; its calls are answered UNAVAILABLE and the ledger is rebuilt from the store");
            fail(batch.waiters);
            let later = {
                let mut state = ledger.lock();
                state.poisoned = true;
                state.committing = false;
                mem::take(&mut state.log)
            };
            fail(later.waiters);
            if matches!(e, Error::NotLeading) {
                // Another hub leads: this one stays refusing writes until
                // it stops (the server watches `Store::deposed`).
                return true;
            }
            rebuild(ledger, writer).await;
        }
    }
    true
}

/// Runs one step of every purge asked for; answers the finished ones.
/// `false` when there was none.
async fn purge_step(ledger: &Ledger, writer: &mut Writer) -> bool {
    let jobs = mem::take(&mut ledger.lock().purges);
    if jobs.is_empty() {
        return false;
    }
    let mut unfinished = Vec::new();
    for mut job in jobs {
        match writer.purge_step(&job.cutoffs).await {
            Ok((step, more)) => {
                ledger.lock().forget_finals(&step);
                job.purged.add(step);
                if more {
                    unfinished.push(job);
                } else {
                    let _ = job.reply.send(Ok(mem::take(&mut job.purged)));
                }
            }
            Err(e) => {
                let _ = job.reply.send(Err(e));
            }
        }
    }
    ledger.lock().purges.extend(unfinished);
    true
}

/// Reads the ledger back from the store (through the writer: on
/// PostgreSQL its own connection, made again if the database was lost),
/// retrying until it can.
async fn rebuild(ledger: &Ledger, writer: &mut Writer) {
    loop {
        match writer.snapshot().await {
            Ok(snapshot) => {
                let mut state = ledger.lock();
                // Whatever was decided against the lost state goes too.
                let later = mem::take(&mut state.log);
                state.rebuild(snapshot);
                state.poisoned = false;
                // The next commit rewrites the spokes' rows (as stored, so
                // it changes nothing): a real write that shows whether the
                // database takes writes again (`/readyz`). With no spoke,
                // there is nothing waiting to be written.
                let ids: Vec<_> = state.spokes.keys().copied().collect();
                if ids.is_empty() {
                    ledger.shared.write_error.send_replace(None);
                }
                state.dirty.extend(ids);
                drop(state);
                ledger.webhooks_may_have_changed();
                fail(later.waiters);
                tracing::info!("ledger rebuilt from the store");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "rebuilding the ledger failed; retrying");
                tokio::time::sleep(REBUILD_RETRY).await;
            }
        }
    }
}

fn fail(waiters: Vec<Waiter>) {
    let error = || Error::Unavailable("the hub could not commit this write; retry");
    for waiter in waiters {
        match waiter {
            Waiter::Done(tx) => {
                let _ = tx.send(Err(error()));
            }
            Waiter::Metrics(tx) => {
                let _ = tx.send(Err(error()));
            }
        }
    }
}

impl State {
    /// Everything logged since the last commit, plus the rows of changed
    /// spokes; `None` when there is nothing to write.
    fn take_batch(&mut self) -> Option<Batch> {
        if self.log.changes.is_empty() && self.log.waiters.is_empty() && self.dirty.is_empty() {
            return None;
        }
        let Log {
            mut changes,
            waiters,
            effects,
        } = mem::take(&mut self.log);
        for id in self.dirty.drain() {
            if let Some(spoke) = self.spokes.get(&id) {
                changes.push(Change::Spoke(spoke.info.clone(), spoke.live.clone()));
            }
        }
        self.committing = true;
        Some(Batch {
            changes,
            waiters,
            effects,
        })
    }

    /// Answers the waiters of a committed batch and applies its effects.
    fn committed(&mut self, batch: Batch, done: Committed) {
        self.committing = false;
        let mut metrics = done.metrics.into_iter();
        for waiter in batch.waiters {
            match waiter {
                Waiter::Done(tx) => {
                    let _ = tx.send(Ok(()));
                }
                Waiter::Metrics(tx) => {
                    let outcome = metrics
                        .next()
                        .ok_or_else(|| Error::Corrupt("a metric batch without an outcome".into()));
                    let _ = tx.send(outcome);
                }
            }
        }
        for effect in batch.effects {
            self.apply(effect);
        }
    }
}
