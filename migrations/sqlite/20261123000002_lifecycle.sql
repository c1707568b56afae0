-- Lifecycle: stored health for change events, last-seen times for the
-- health sweeper, the event log, and indexes for retention.

ALTER TABLE spokes ADD COLUMN health TEXT NOT NULL DEFAULT 'OFFLINE';
ALTER TABLE spokes ADD COLUMN last_seen_at INTEGER;

CREATE INDEX spokes_by_last_seen ON spokes (health, last_seen_at) WHERE revoked_at IS NULL;

CREATE TABLE events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    type         TEXT    NOT NULL,
    time         INTEGER NOT NULL,
    spoke_id     TEXT,
    directive_id TEXT,
    details      TEXT    NOT NULL
);

CREATE INDEX events_by_time ON events (time);
CREATE INDEX events_by_spoke ON events (spoke_id, seq);
CREATE INDEX metric_points_by_time ON metric_points (time_ns);
CREATE INDEX metric_batches_by_time ON metric_batches (received_at);

-- The expiry timer looks only at directives that can still expire.
DROP INDEX directives_by_expiry;
CREATE INDEX directives_expiring ON directives (expires_at)
    WHERE expires_at IS NOT NULL AND state IN ('PENDING', 'DELIVERED', 'IN_PROGRESS');
