-- The fast durable path: due times live in the hub's memory (rebuilt from
-- these columns at start), so the timers' indexes only cost writes now.
DROP INDEX directives_by_ack_due;
DROP INDEX directives_expiring;
-- A spoke's directives, newest first, without an entry that moves with
-- every state change.
DROP INDEX directives_by_spoke;
CREATE INDEX directives_by_spoke ON directives (spoke_id, id);
-- Retention deletes the oldest events by sequence (sequences follow time).
DROP INDEX events_by_time;
-- Counts by state and the list of outstanding directives come from the
-- hub's memory; only the start-up read scans for them. Events are read by
-- sequence; a spoke filter is applied while reading. (Both indexes cost a
-- write per change on the hot path.)
DROP INDEX directives_by_state;
DROP INDEX events_by_spoke;
