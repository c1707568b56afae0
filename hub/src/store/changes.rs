//! What the ledger hands the store to write ([`Change`]), and what a commit
//! answers that only the database could decide ([`Committed`]). Both
//! backends take the same changes.

use std::sync::Arc;

use uuid::Uuid;

use crate::directives::{Fixed, State};
use crate::events::NewEvent;
use crate::metrics::Batch;
use crate::spokes::{SpokeInfo, SpokeLive};

/// One write decided by the ledger.
#[derive(Debug, Clone)]
pub enum Change {
    /// A spoke's whole row: a new spoke, or any change to one.
    Spoke(Arc<SpokeInfo>, SpokeLive),
    /// A new directive, PENDING.
    DirectiveCreated {
        /// Its id.
        id: Uuid,
        /// Its spoke.
        spoke_id: Uuid,
        /// What never changes.
        fixed: Arc<Fixed>,
        /// The payload, JSON text; `None` for a directive of a fan-out,
        /// whose payload is stored once, in its group's row.
        payload: Option<Arc<str>>,
    },
    /// The payload of a fan-out, stored once for all its directives.
    DirectiveGroup {
        /// The create's group id.
        group_id: Uuid,
        /// The payload, JSON text.
        payload: Arc<str>,
        /// When, Unix ms.
        at: i64,
    },
    /// A spoke was deleted: its name is free again; the row stays for its
    /// history until retention.
    SpokeDeleted {
        /// The spoke.
        id: Uuid,
        /// When, Unix ms.
        at: i64,
    },
    /// A directive's whole mutable state.
    DirectiveUpdated(DirectiveUpdate),
    /// An idempotency key and the create it made.
    IdempotencyKey {
        /// The key.
        key: String,
        /// The group the create made.
        group_id: Uuid,
        /// What the create asked for (see `ledger`'s fingerprint).
        fingerprint: Arc<str>,
        /// When, Unix ms.
        at: i64,
    },
    /// An event; its sequence is given at commit.
    Event {
        /// What happened.
        event: NewEvent,
        /// When, Unix ms.
        at: i64,
    },
    /// A NATS JetStream stream acknowledged every event up to `through`
    /// (see `crate::nats`); the stored mark only moves forward.
    EventsPublished {
        /// The stream's name.
        stream: Arc<str>,
        /// The highest sequence it acknowledged, with all before it.
        through: i64,
    },
    /// A metric batch: stored unless the spoke stored one with its id
    /// before (decided here, in commit order); stored ones get an event.
    Metrics {
        /// The spoke.
        spoke_id: Uuid,
        /// The validated batch.
        batch: Arc<Batch>,
        /// When it arrived, Unix ms.
        at: i64,
    },
}

/// The mutable columns of a directive, all of them.
#[derive(Debug, Clone)]
pub struct DirectiveUpdate {
    /// The directive.
    pub id: Uuid,
    /// Its state.
    pub state: State,
    /// Deliveries so far.
    pub attempts: u32,
    /// Last change, Unix ms.
    pub updated_at: i64,
    /// When the current delivery's ack is due.
    pub ack_due_at: Option<i64>,
    /// The result JSON text of a COMPLETED directive.
    pub result: Option<String>,
    /// Error or reason of a final one.
    pub error: String,
    /// Latest progress.
    pub progress: u32,
    /// Latest progress message.
    pub progress_message: String,
}

/// What storing a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredBatch {
    /// Stored now, with this many points.
    Accepted(u32),
    /// Stored before, with this many points; nothing stored now.
    Duplicate(u32),
}

/// What a commit did that only the database could decide.
#[derive(Debug, Clone, Default)]
pub struct Committed {
    /// For each `Change::Metrics` in the batch, in order: stored or duplicate.
    pub metrics: Vec<StoredBatch>,
}
