//! Retention: deleting what is past its age in bounded batches, on the
//! writer between commits (the committer runs it), each batch its own short
//! transaction: old events, metric points (and the batch records that guard
//! against duplicates), final directives, idempotency keys, fan-out
//! payloads no directive uses any more, and deleted spokes nothing refers
//! to any more.

use uuid::Uuid;

use super::Writer;
use crate::directives::State;
use crate::error::Result;

/// Rows deleted per statement.
const BATCH: i64 = 1000;

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
}

/// The smallest UUIDv7 of Unix ms `at`, as stored (lowercase, hyphenated):
/// ids below it were made before `at`.
fn first_id_at(at: i64) -> String {
    let ms = u128::try_from(at.max(0)).unwrap_or(0) & ((1 << 48) - 1);
    Uuid::from_u128(ms << 80).hyphenated().to_string()
}

impl Writer {
    /// Deletes up to one batch of each kind of row older than its cutoff.
    /// Returns what it deleted and whether more may be due; the committer
    /// calls it between commits until nothing is.
    pub fn purge_step(&mut self, cutoffs: &Cutoffs) -> Result<(Purged, bool)> {
        let points_before_ns = cutoffs.points_before.saturating_mul(1_000_000);
        let directives_before = cutoffs.directives_before;
        let mut purged = Purged::default();
        let mut more = false;
        {
            // Ids are UUIDv7: the primary key's order is creation order, so
            // a pass reads only directives created before the cutoff (the
            // hot path keeps no index by state or time).
            let mut stmt = self.conn().prepare_cached(
                "DELETE FROM directives WHERE id IN (SELECT id FROM directives \
                 WHERE id < ?1 AND state NOT IN ('PENDING', 'DELIVERED', 'IN_PROGRESS') \
                 AND updated_at < ?2 ORDER BY id LIMIT ?3) RETURNING state",
            )?;
            let mut rows = stmt.query(rusqlite::params![
                first_id_at(directives_before),
                directives_before,
                BATCH
            ])?;
            let mut deleted = 0;
            while let Some(row) = rows.next()? {
                let state = State::parse(&row.get::<_, String>(0)?)?;
                purged.add(Purged {
                    directives: vec![(state, 1)],
                    ..Purged::default()
                });
                deleted += 1;
            }
            more |= deleted == BATCH;
        }
        let statements: [(&str, rusqlite::types::Value); 6] = [
            (
                // Sequences follow time: the oldest events are the first ones,
                // so a pass looks at no more than a batch of them.
                "DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT ?2) \
                 AND time < ?1",
                cutoffs.events_before.into(),
            ),
            (
                "DELETE FROM metric_points WHERE id IN \
                 (SELECT id FROM metric_points WHERE time_ns < ?1 LIMIT ?2)",
                points_before_ns.into(),
            ),
            (
                "DELETE FROM metric_batches WHERE rowid IN \
                 (SELECT rowid FROM metric_batches WHERE received_at < ?1 LIMIT ?2)",
                cutoffs.points_before.into(),
            ),
            (
                "DELETE FROM idempotency_keys WHERE key IN \
                 (SELECT key FROM idempotency_keys WHERE created_at < ?1 LIMIT ?2)",
                cutoffs.keys_before.into(),
            ),
            (
                "DELETE FROM directive_groups WHERE group_id IN (SELECT g.group_id \
                 FROM directive_groups g WHERE g.created_at < ?1 AND NOT EXISTS \
                 (SELECT 1 FROM directives d WHERE d.group_id = g.group_id) LIMIT ?2)",
                directives_before.into(),
            ),
            (
                "DELETE FROM spokes WHERE id IN (SELECT s.id FROM spokes s \
                 WHERE s.deleted_at < ?1 \
                 AND NOT EXISTS (SELECT 1 FROM directives d WHERE d.spoke_id = s.id) \
                 AND NOT EXISTS (SELECT 1 FROM metric_points p WHERE p.spoke_id = s.id) \
                 AND NOT EXISTS (SELECT 1 FROM metric_batches b WHERE b.spoke_id = s.id) \
                 LIMIT ?2)",
                directives_before.into(),
            ),
        ];
        for (i, (sql, cutoff)) in statements.into_iter().enumerate() {
            let deleted = self
                .conn()
                .prepare_cached(sql)?
                .execute(rusqlite::params![cutoff, BATCH])? as u64;
            match i {
                0 => purged.events = deleted,
                1 => purged.points = deleted,
                3 => purged.keys = deleted,
                _ => {}
            }
            more |= deleted == BATCH as u64;
        }
        Ok((purged, more))
    }
}

#[cfg(test)]
mod tests {
    use super::first_id_at;
    use uuid::Uuid;

    #[test]
    fn ids_made_before_a_time_sort_below_its_first_id() {
        let at = 1_800_000_000_000;
        let before = Uuid::from_u128(((at as u128 - 1) << 80) | 0xffff_ffff).to_string();
        let after = Uuid::from_u128((at as u128) << 80 | 1).to_string();
        assert!(before < first_id_at(at));
        assert!(first_id_at(at) < after);
    }
}
