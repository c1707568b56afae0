//! What the ledger is rebuilt from at start (and after a failed commit):
//! every spoke, every directive that is not final (without payloads, which
//! are read when a delivery needs them), the idempotency keys, and how many
//! directives are in each final state. Each backend reads it with its own
//! SQL ([`Store::snapshot`](super::Store::snapshot)).

use uuid::Uuid;

use crate::directives::{Fixed, State};
use crate::spokes::{SpokeInfo, SpokeLive};

/// A directive that is not final, as stored.
#[derive(Debug, Clone)]
pub struct OutstandingRow {
    /// Id.
    pub id: Uuid,
    /// Spoke id.
    pub spoke_id: Uuid,
    /// What never changes.
    pub fixed: Fixed,
    /// PENDING, DELIVERED or IN_PROGRESS.
    pub state: State,
    /// Deliveries so far.
    pub attempts: u32,
    /// Last change, Unix ms.
    pub updated_at: i64,
    /// When the current delivery's ack is due.
    pub ack_due_at: Option<i64>,
    /// Latest progress.
    pub progress: u32,
    /// Latest progress message.
    pub progress_message: String,
}

/// An idempotency key as stored.
#[derive(Debug, Clone)]
pub struct IdempotencyRow {
    /// The key.
    pub key: String,
    /// The group its create made.
    pub group_id: Uuid,
    /// What that create asked for (empty for keys stored before this was
    /// recorded: any request matches them).
    pub fingerprint: String,
    /// When, Unix ms.
    pub created_at: i64,
}

/// Everything the ledger starts from.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Every spoke, revoked ones too.
    pub spokes: Vec<(SpokeInfo, SpokeLive)>,
    /// Directives that are not final.
    pub outstanding: Vec<OutstandingRow>,
    /// Idempotency keys: the groups they made, what the creates asked for,
    /// and when, oldest first.
    pub idempotency: Vec<IdempotencyRow>,
    /// How many directives are in each final state.
    pub finals: Vec<(State, i64)>,
}
