//! In-memory wake-ups: which spokes hold a live stream, and how a new
//! directive reaches that stream without the stream polling the database.
//!
//! Each connected spoke has one slot: a `Notify` that a create pokes after
//! commit, and a control channel used to end the stream when a newer one
//! replaces it. `Notify` keeps one permit when nobody waits, so a wake-up
//! that lands between "query the database" and "wait" is never lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use tokio::sync::{Notify, mpsc};
use uuid::Uuid;

/// Messages from the hub to one live stream's task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// A newer stream of the same spoke took over; end this one.
    Superseded,
    /// The spoke's key stopped working (revoked or rotated); end this one
    /// with UNAUTHENTICATED and this reason.
    KeyInvalidated(&'static str),
    /// A delivered directive was cancelled; tell the spoke.
    Cancelled {
        /// The directive.
        directive_id: Uuid,
        /// Why.
        reason: String,
    },
}

struct Slot {
    generation: u64,
    wake: Arc<Notify>,
    control: mpsc::Sender<Control>,
}

/// Registry of live streams; cheap to clone.
#[derive(Clone, Default)]
pub struct Dispatcher {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    next_generation: u64,
    slots: HashMap<Uuid, Slot>,
    /// Long polls waiting for work, per spoke.
    pollers: HashMap<Uuid, Weak<Notify>>,
}

/// A stream's registration; dropping it frees the slot (if still its own).
pub struct Subscription {
    dispatcher: Dispatcher,
    spoke_id: Uuid,
    generation: u64,
    /// Poked when the spoke has new work.
    pub wake: Arc<Notify>,
    /// Control messages for this stream.
    pub control: mpsc::Receiver<Control>,
}

impl Dispatcher {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new live stream for `spoke_id`, ending the older one.
    pub fn register(&self, spoke_id: Uuid) -> Subscription {
        let (tx, rx) = mpsc::channel(64);
        let wake = Arc::new(Notify::new());
        let mut inner = self.lock();
        inner.next_generation += 1;
        let generation = inner.next_generation;
        let old = inner.slots.insert(
            spoke_id,
            Slot {
                generation,
                wake: wake.clone(),
                control: tx,
            },
        );
        drop(inner);
        if let Some(old) = old {
            // The old stream may be stuck on a full send; it also notices the
            // closed sender once its slot is gone.
            let _ = old.control.try_send(Control::Superseded);
        }
        Subscription {
            dispatcher: self.clone(),
            spoke_id,
            generation,
            wake,
            control: rx,
        }
    }

    /// Wakes the spoke's live stream and long polls, if it has any.
    pub fn wake(&self, spoke_id: Uuid) {
        let mut inner = self.lock();
        if let Some(slot) = inner.slots.get(&spoke_id) {
            slot.wake.notify_one();
        }
        if let Some(poller) = inner.pollers.get(&spoke_id) {
            match poller.upgrade() {
                Some(notify) => notify.notify_waiters(),
                None => {
                    inner.pollers.remove(&spoke_id);
                }
            }
        }
    }

    /// The wake-up long polls of `spoke_id` wait on (shared by concurrent
    /// polls; it lives as long as one of them holds it).
    pub fn poll_waker(&self, spoke_id: Uuid) -> Arc<Notify> {
        let mut inner = self.lock();
        if let Some(notify) = inner.pollers.get(&spoke_id).and_then(Weak::upgrade) {
            return notify;
        }
        let notify = Arc::new(Notify::new());
        inner.pollers.insert(spoke_id, Arc::downgrade(&notify));
        notify
    }

    /// Sends a control message to the spoke's live stream, if it has one.
    pub fn send(&self, spoke_id: Uuid, msg: Control) -> bool {
        match self.lock().slots.get(&spoke_id) {
            Some(slot) => slot.control.try_send(msg).is_ok(),
            None => false,
        }
    }

    /// Whether the spoke holds a live stream on this hub.
    pub fn is_connected(&self, spoke_id: Uuid) -> bool {
        self.lock().slots.contains_key(&spoke_id)
    }

    /// Ends the spoke's live stream because its key stopped working.
    pub fn invalidate_key(&self, spoke_id: Uuid, reason: &'static str) {
        if let Some(slot) = self.lock().slots.remove(&spoke_id) {
            let _ = slot.control.try_send(Control::KeyInvalidated(reason));
        }
    }

    /// Number of live streams.
    pub fn connected(&self) -> usize {
        self.lock().slots.len()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut inner = self.dispatcher.lock();
        if inner
            .slots
            .get(&self.spoke_id)
            .is_some_and(|s| s.generation == self.generation)
        {
            inner.slots.remove(&self.spoke_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_stream_supersedes_the_old_one() {
        let d = Dispatcher::default();
        let id = Uuid::now_v7();
        let mut first = d.register(id);
        let second = d.register(id);
        assert_eq!(first.control.recv().await, Some(Control::Superseded));
        drop(first);
        assert!(
            d.is_connected(id),
            "dropping the old stream keeps the new slot"
        );
        drop(second);
        assert!(!d.is_connected(id));
    }

    #[tokio::test]
    async fn a_wake_before_waiting_is_kept() {
        let d = Dispatcher::default();
        let id = Uuid::now_v7();
        let reg = d.register(id);
        d.wake(id);
        // Completes at once thanks to the stored permit.
        reg.wake.notified().await;
    }
}
