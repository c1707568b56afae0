//! Retention: deleting what is past its age in bounded batches, on the
//! writer between commits (the committer runs it), each batch its own short
//! transaction: old events, metric points (and the batch records that guard
//! against duplicates), final directives, idempotency keys, fan-out
//! payloads no directive uses any more, and deleted spokes nothing refers
//! to any more. Each backend has its own statements
//! (`sqlite/retention.rs`, `postgres/retention.rs`).

use uuid::Uuid;

use crate::directives::State;

/// Rows deleted per statement.
pub(super) const BATCH: i64 = 1000;

/// What is old enough to delete: each a Unix ms time; rows older go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cutoffs {
    /// Events.
    pub events_before: i64,
    /// Metric points and batch records.
    pub points_before: i64,
    /// Final directives (by their last change), and deleted spokes.
    pub directives_before: i64,
    /// Idempotency keys.
    pub keys_before: i64,
}

/// What one purge deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Purged {
    /// Events deleted.
    pub events: u64,
    /// Metric points deleted.
    pub points: u64,
    /// Final directives deleted, by state.
    pub directives: Vec<(State, u64)>,
    /// Idempotency keys deleted.
    pub keys: u64,
}

impl Purged {
    /// Adds another step's counts.
    pub fn add(&mut self, other: Purged) {
        self.events += other.events;
        self.points += other.points;
        for (state, n) in other.directives {
            match self.directives.iter_mut().find(|(s, _)| *s == state) {
                Some((_, total)) => *total += n,
                None => self.directives.push((state, n)),
            }
        }
        self.keys += other.keys;
    }

    /// Final directives deleted, all states.
    pub fn directive_count(&self) -> u64 {
        self.directives.iter().map(|(_, n)| n).sum()
    }

    /// Whether nothing was deleted.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Counts one deleted final directive.
    pub(super) fn directive(&mut self, state: State) {
        self.add(Purged {
            directives: vec![(state, 1)],
            ..Purged::default()
        });
    }
}

/// The smallest UUIDv7 of Unix ms `at`: ids below it were made before
/// `at`. (Ids are UUIDv7, so the primary key's order is creation order on
/// both backends: SQLite compares the lowercase hyphenated text,
/// PostgreSQL the 16 bytes, and both orders agree.)
pub(super) fn first_id_at(at: i64) -> Uuid {
    let ms = u128::try_from(at.max(0)).unwrap_or(0) & ((1 << 48) - 1);
    Uuid::from_u128(ms << 80)
}

#[cfg(test)]
mod tests {
    use super::first_id_at;
    use uuid::Uuid;

    #[test]
    fn ids_made_before_a_time_sort_below_its_first_id() {
        let at = 1_800_000_000_000;
        let before = Uuid::from_u128(((at as u128 - 1) << 80) | 0xffff_ffff);
        let after = Uuid::from_u128((at as u128) << 80 | 1);
        assert!(before.to_string() < first_id_at(at).to_string());
        assert!(first_id_at(at).to_string() < after.to_string());
        assert!(before < first_id_at(at) && first_id_at(at) < after);
    }
}
